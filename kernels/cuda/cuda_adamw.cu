/* AdamW (torch.optim.AdamW, decoupled weight decay) for the CUDA backend, in exactly the
 * operation order of kernels/cpu/cpu_adamw.c: the step's scalars are computed on the host by the
 * CPU's own double-precision expressions (glibc pow/sqrt) and rounded to fp32 where it rounds
 * them, and the per-element update uses the round-to-nearest intrinsics so that nvcc cannot
 * contract a multiply-add into an FMA the CPU (built without FMA) does not do. With IEEE sqrtf
 * and division (nvcc's defaults) a GPU step therefore matches a CPU step bit for bit.
 * Elementwise, but for the amax parts, maxima (order-independent). The same pass writes the
 * weight copy (bf16 in the bf16 mode) and the amax parts when asked, so neither costs a second
 * read of the masters. */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_nvfp4.cuh"

struct adamw_scalars {
  float grad_scale; /* the clipping factor: g * grad_scale rounds as torch's g.mul_(coef) */
  float decay;      /* 1 - lr * wd */
  float m_weight;   /* 1 - beta1 */
  float v_weight;   /* 1 - beta2 */
  float beta2;
  float step_size;  /* lr / (1 - beta1^t) */
  float bc2_sqrt;   /* sqrt(1 - beta2^t) */
  float eps;
};

/* torch.lerp: two formulas, chosen by the weight, so that both ends are exact */
static __device__ __forceinline__ float torch_lerp(float self, float end, float weight) {
  return weight < 0.5f ? __fadd_rn(self, __fmul_rn(weight, __fsub_rn(end, self)))
                       : __fsub_rn(end, __fmul_rn(__fsub_rn(end, self), __fsub_rn(1.0f, weight)));
}

static __device__ __forceinline__ void adamw1(float &p, float g_raw, float &m, float &v,
                                              const adamw_scalars &s) {
  const float g = __fmul_rn(g_raw, s.grad_scale);
  const float pi = __fmul_rn(p, s.decay);
  const float mi = torch_lerp(m, g, s.m_weight);
  const float vi = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.v_weight, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2_sqrt), s.eps);
  p = __fadd_rn(pi, __fdiv_rn(__fmul_rn(-s.step_size, mi), denom));
  m = mi;
  v = vi;
}

/* Float4 groups of each tensor a thread loads before it updates any, with amax parts. Block b
 * then updates chunk b of ADAMW_AMAX_CHUNK values (ops.h), so that its part has one writer:
 * 4096 groups, 16 a thread. A matrix of 160 chunks (Qwen3-4B's k and v) runs fewer blocks than
 * the GPU holds, whose threads, with one group in flight each, would leave the memory idle part
 * of the time; two each: 59 registers (4 blocks an SM), four: 95 (2 blocks), for the same bytes
 * in flight. */
#define ADAMW_UNROLL 2

/* A: the weight copy's storage type; copy NULL: no copy. PARTS: amax_parts[b] = the largest
 * |p| of chunk b, as bits, reduced with the quantizers' own maxima (cuda_nvfp4.cuh). Without
 * parts (every parameter but the NVFP4 matrices) the grid strides over the whole range one
 * group a thread: blocks of one group a thread end within microseconds, and the optimizer runs
 * on a stream of lower priority beside the next step's forward, whose kernels take the SMs as
 * the blocks end (a chunk's block holds them ~17 times as long). */
template <typename A, bool VEC, bool PARTS>
static __global__ void __launch_bounds__(CUDA_THREADS)
    adamw_kernel(float *__restrict__ p, A *__restrict__ copy, const float *__restrict__ g,
                 float *__restrict__ m, float *__restrict__ v, size_t n, adamw_scalars s,
                 uint32_t *__restrict__ amax_parts) {
  constexpr int U = PARTS ? ADAMW_UNROLL : 1;
  const size_t lo = PARTS ? (size_t)blockIdx.x * ADAMW_AMAX_CHUNK : 0;
  const size_t hi = !PARTS || n - lo < ADAMW_AMAX_CHUNK ? n : lo + ADAMW_AMAX_CHUNK;
  const size_t first = PARTS ? threadIdx.x : (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = PARTS ? blockDim.x : (size_t)gridDim.x * blockDim.x;
  /* groups [lo / 4, mid / 4) on the vector path (lo is a multiple of 4), then single values */
  const size_t mid = VEC ? lo + (hi - lo) / 4 * 4 : lo;
  uint32_t amax = 0;
  if constexpr (VEC) {
    for (size_t i0 = lo / 4 + first; i0 < mid / 4; i0 += U * stride) {
      float4 pv[U], gv[U], mv[U], vv[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const size_t i = i0 + u * stride;
        if (i >= mid / 4) break;
        pv[u] = ((float4 *)p)[i];
        gv[u] = ((const float4 *)g)[i];
        mv[u] = ((float4 *)m)[i];
        vv[u] = ((float4 *)v)[i];
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const size_t i = i0 + u * stride;
        if (i >= mid / 4) break;
        adamw1(pv[u].x, gv[u].x, mv[u].x, vv[u].x, s);
        adamw1(pv[u].y, gv[u].y, mv[u].y, vv[u].y, s);
        adamw1(pv[u].z, gv[u].z, mv[u].z, vv[u].z, s);
        adamw1(pv[u].w, gv[u].w, mv[u].w, vv[u].w, s);
        ((float4 *)p)[i] = pv[u];
        ((float4 *)m)[i] = mv[u];
        ((float4 *)v)[i] = vv[u];
        const float f[4] = {pv[u].x, pv[u].y, pv[u].z, pv[u].w};
        if (copy) store4(copy, i, f);
        if (PARTS) amax = max(amax, nv_absmax<4>(f));
      }
    }
  }
  for (size_t i = mid + first; i < hi; i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw1(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (copy) store_f(&copy[i], pi);
    if (PARTS) amax = max(amax, nv_absmax<1>(&pi));
  }
  if (PARTS) {   /* the same in every thread of the block */
    nv_block_max<1, CUDA_THREADS / 32>(&amax);
    if (threadIdx.x == 0) amax_parts[blockIdx.x] = amax;
  }
}

template <typename A, bool VEC>
static void launch_adamw_as(float *p, A *copy, const float *g, float *m, float *v, size_t n,
                            const adamw_scalars &s, uint32_t *amax_parts) {
  if (!amax_parts) {
    adamw_kernel<A, VEC, false><<<cuda_blocks(VEC ? n / 4 : n), CUDA_THREADS, 0,
                                  cuda_ctx.stream>>>(p, copy, g, m, v, n, s, NULL);
    return;
  }
  const size_t chunks = (n + ADAMW_AMAX_CHUNK - 1) / ADAMW_AMAX_CHUNK;
  if (chunks > INT_MAX) {   /* one block a chunk */
    char detail[96];
    snprintf(detail, sizeof detail, "%zu values: more than %d chunks", n, INT_MAX);
    cuda_fail("cuda_adamw_update", detail, __FILE__, __LINE__);
  }
  adamw_kernel<A, VEC, true><<<(unsigned)chunks, CUDA_THREADS, 0, cuda_ctx.stream>>>(
      p, copy, g, m, v, n, s, amax_parts);
}

template <typename A>
static void launch_adamw(float *p, A *copy, const float *g, float *m, float *v, size_t n,
                         const adamw_scalars &s, uint32_t *amax_parts) {
  if (cuda_aligned16(p) && cuda_aligned16(g) && cuda_aligned16(m) && cuda_aligned16(v) &&
      vec4_aligned<A>(copy))
    launch_adamw_as<A, true>(p, copy, g, m, v, n, s, amax_parts);
  else
    launch_adamw_as<A, false>(p, copy, g, m, v, n, s, amax_parts);
  CUDA_LAUNCHED("adamw_kernel");
}


extern "C" void cuda_adamw_update(float *p, void *p_act, const float *g, float *m, float *v,
                                  size_t n, const struct adamw_step *st, uint32_t *amax_parts) {
  if (n == 0) return;
  /* the CPU's expressions, term for term */
  adamw_scalars s;
  s.grad_scale = st->grad_scale;
  s.decay = (float)(1.0 - (double)st->lr * st->weight_decay);
  s.m_weight = (float)(1.0 - st->beta1);
  s.v_weight = (float)(1.0 - st->beta2);
  s.beta2 = st->beta2;
  s.step_size = (float)((double)st->lr / (1.0 - pow((double)st->beta1, (double)st->t)));
  s.bc2_sqrt = (float)sqrt(1.0 - pow((double)st->beta2, (double)st->t));
  s.eps = st->eps;
  CUDA_ACT_DISPATCH(A, launch_adamw<A>(p, (A *)p_act, g, m, v, n, s, amax_parts));
}
