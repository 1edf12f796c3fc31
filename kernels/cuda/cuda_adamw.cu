/* AdamW (torch.optim.AdamW, decoupled weight decay) for the CUDA backend, in exactly the
 * operation order of kernels/cpu/cpu_adamw.c: the step's scalars are computed on the host by the
 * CPU's own double-precision expressions (glibc pow/sqrt) and rounded to fp32 where it rounds
 * them, and the per-element update uses the round-to-nearest intrinsics so that nvcc cannot
 * contract a multiply-add into an FMA the CPU (built without FMA) does not do. With IEEE sqrtf
 * and division (nvcc's defaults) a GPU step therefore matches a CPU step bit for bit.
 * Purely elementwise: no reductions, so nothing to order. The same pass writes the weight copy
 * (bf16 in the bf16 mode) when asked, so the copy costs no second read of the masters. */
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"

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

/* A: the weight copy's storage type; copy NULL: no copy. */
template <typename A, bool VEC>
static __global__ void adamw_kernel(float *__restrict__ p, A *__restrict__ copy,
                                    const float *__restrict__ g, float *__restrict__ m,
                                    float *__restrict__ v, size_t n, adamw_scalars s) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 pv = ((float4 *)p)[i], gv = ((const float4 *)g)[i], mv = ((float4 *)m)[i],
             vv = ((float4 *)v)[i];
      adamw1(pv.x, gv.x, mv.x, vv.x, s);
      adamw1(pv.y, gv.y, mv.y, vv.y, s);
      adamw1(pv.z, gv.z, mv.z, vv.z, s);
      adamw1(pv.w, gv.w, mv.w, vv.w, s);
      ((float4 *)p)[i] = pv;
      ((float4 *)m)[i] = mv;
      ((float4 *)v)[i] = vv;
      if (copy) {
        const float f[4] = {pv.x, pv.y, pv.z, pv.w};
        store4(copy, i, f);
      }
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw1(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (copy) store_f(&copy[i], pi);
  }
}

template <typename A>
static void launch_adamw(float *p, A *copy, const float *g, float *m, float *v, size_t n,
                         const adamw_scalars &s) {
  if (cuda_aligned16(p) && cuda_aligned16(g) && cuda_aligned16(m) && cuda_aligned16(v) &&
      vec4_aligned<A>(copy))
    adamw_kernel<A, true><<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(
        p, copy, g, m, v, n, s);
  else
    adamw_kernel<A, false><<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(
        p, copy, g, m, v, n, s);
  CUDA_LAUNCHED("adamw_kernel");
}


extern "C" void cuda_adamw_update(float *p, void *p_act, const float *g, float *m, float *v,
                                  size_t n, const struct adamw_step *st) {
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
  CUDA_ACT_DISPATCH(A, launch_adamw<A>(p, (A *)p_act, g, m, v, n, s));
}
