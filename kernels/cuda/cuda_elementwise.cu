/* The memory-bound ops of the CUDA backend: dtype conversion, embedding forward/backward,
 * SwiGLU, residual add, scaling and the fixed-order sums. Each mirrors
 * kernels/cpu/cpu_elementwise.c formula for formula.
 *
 * Types: the activation kernels are templates over the storage type T (float or bf16,
 * cuda_dtype.cuh) and compute in fp32; their fp32 instantiations are today's fp32 kernels
 * exactly. scale and sum_into act on fp32 buffers (gradients, master weights) only.
 *
 * Numerics: the arithmetic uses the explicit round-to-nearest intrinsics (__fadd_rn, __fmul_rn,
 * ...) wherever nvcc would otherwise contract a multiply-add into an FMA, so every elementwise
 * result rounds exactly as the CPU backend's (built without FMA) does; only expf may differ from
 * glibc's by an ulp. In bf16 storage each result is then rounded once to bf16 (nearest even).
 *
 * Determinism: no floating-point atomics anywhere.
 *  - embedding_backward: each element dtable[t, d] belongs to one thread (column d, token class
 *    t % Q), which walks the tokens in index order, so every dtable element receives its
 *    additions in exactly the CPU's order (bit-identical to cpu_embedding_backward in fp32). To
 *    hide memory latency a thread reads a chunk of EB_K rows at once and resolves repeated tokens
 *    inside the chunk in registers.
 *  - sum_into: a fixed grid (a function of n only) of per-thread double sums in grid-stride
 *    order, a fixed tree per block into per-block partials in cuda_scratch, then one block sums
 *    the partials in a fixed order and adds the total into *acc; the result does not depend on
 *    timing or on the alignment of x. */
#include <stdint.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_reduce.cuh"

/* ---- conversion ----------------------------------------------------------------------------- */

template <typename D, typename S, bool VEC>
static __global__ void convert_kernel(D *__restrict__ dst, const S *__restrict__ src, size_t n) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float f[4];
      load4(f, src, i);
      store4(dst, i, f);
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) store_f(dst + i, load_f(src + i));
}

template <typename D, typename S>
static void convert_launch(D *dst, const S *src, size_t n) {
  if (vec4_aligned<D>(dst) && vec4_aligned<S>(src)) {
    convert_kernel<D, S, true><<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(dst, src,
                                                                                        n);
  } else {
    convert_kernel<D, S, false><<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(dst, src, n);
  }
  CUDA_LAUNCHED("convert_kernel");
}

extern "C" void cuda_convert(void *dst, enum dtype dst_type, const void *src, enum dtype src_type,
                             size_t n) {
  if (n == 0) return;
  if (dst_type == src_type) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, n * dtype_bytes(dst_type), cudaMemcpyDeviceToDevice,
                               cuda_ctx.stream));
  } else if (dst_type == DT_BF16) {
    convert_launch((bf16 *)dst, (const float *)src, n);
  } else {
    convert_launch((float *)dst, (const bf16 *)src, n);
  }
}

/* ---- embedding ------------------------------------------------------------------------------ */

/* A row copy in the storage type: no conversion, so vec4<T> moves the bits as they are. */
template <typename T, bool VEC>
static __global__ void embedding_forward_kernel(T *__restrict__ out,
                                                const int32_t *__restrict__ tokens,
                                                const T *__restrict__ table, int n, int dim) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const T *src = table + (size_t)tokens[row] * dim;
    T *dst = out + (size_t)row * dim;
    if (VEC) {
      const vec4<T> *s4 = (const vec4<T> *)src;
      vec4<T> *d4 = (vec4<T> *)dst;
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) d4[v] = s4[v];
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = src[j];
    }
  }
}

template <typename T>
static void embedding_forward_launch(T *out, const int32_t *tokens, const T *table, int n,
                                     int dim) {
  const int grid = n < 65535 * 16 ? n : 65535 * 16;
  if (dim % 4 == 0 && vec4_aligned<T>(out) && vec4_aligned<T>(table)) {
    embedding_forward_kernel<T, true><<<grid, 256, 0, cuda_ctx.stream>>>(out, tokens, table, n,
                                                                         dim);
  } else {
    embedding_forward_kernel<T, false><<<grid, 256, 0, cuda_ctx.stream>>>(out, tokens, table, n,
                                                                          dim);
  }
  CUDA_LAUNCHED("embedding_forward_kernel");
}

extern "C" void cuda_embedding_forward(void *out, const int32_t *tokens, const void *table, int n,
                                       int dim) {
  if (n <= 0 || dim <= 0) return;
  CUDA_ACT_DISPATCH(T, embedding_forward_launch((T *)out, tokens, (const T *)table, n, dim));
}

#define EB_K 16        /* tokens whose rows one thread reads before writing any */
#define EB_TILE 1024   /* tokens scanned per pass through shared memory */

/* One warp per block. Thread d of block (x, q) owns column d = 32x + lane of the table rows whose
 * token t has t % Q == q (Q = gridDim.y), and adds dout[i, d] into dtable[t, d] for those i in
 * increasing order, the CPU's order: each dtable element is written by one thread only, its
 * additions in the CPU's sequence, so the result is bit-identical to cpu_embedding_backward
 * whatever Q is. The split by q only exists to put more warps to work.
 * Per tile of tokens the warp compacts the matching (token, row) pairs into shared memory with a
 * ballot; then, per chunk of EB_K pairs, all loads are issued first, a token repeated inside the
 * chunk continues from the value its latest earlier occurrence produced, and the stores go out in
 * order so that the last store to a repeated row carries the full sum. dout is of the storage
 * type T, dtable fp32. */
template <typename T>
static __global__ void __launch_bounds__(32)
    embedding_backward_kernel(float *__restrict__ dtable, const T *__restrict__ dout,
                              const int32_t *__restrict__ tokens, int n, int dim) {
  __shared__ int32_t tok_s[EB_TILE], row_s[EB_TILE];
  const int lane = threadIdx.x;
  const int d = blockIdx.x * 32 + lane;
  const unsigned q = blockIdx.y, nq = gridDim.y;
  for (int t0 = 0; t0 < n; t0 += EB_TILE) {
    const int tn = min(EB_TILE, n - t0);
    __syncwarp();  /* the previous tile is no longer read */
    int cnt = 0;
    for (int k0 = 0; k0 < tn; k0 += 32) {
      const int k = k0 + lane;
      const int32_t t = k < tn ? tokens[t0 + k] : 0;
      const bool match = k < tn && (uint32_t)t % nq == q;
      const unsigned mask = __ballot_sync(0xffffffffu, match);
      if (match) {
        const int pos = cnt + __popc(mask & ((1u << lane) - 1u));
        tok_s[pos] = t;
        row_s[pos] = t0 + k;
      }
      cnt += __popc(mask);
    }
    __syncwarp();
    if (d < dim) {
      for (int i0 = 0; i0 < cnt; i0 += EB_K) {
        const int m = min(EB_K, cnt - i0);
        int tok[EB_K];
        float v[EB_K], g[EB_K];
#pragma unroll
        for (int k = 0; k < EB_K; k++) {
          if (k < m) {
            tok[k] = tok_s[i0 + k];
            g[k] = load_f(dout + (size_t)row_s[i0 + k] * dim + d);
            v[k] = dtable[(size_t)tok[k] * dim + d];
          }
        }
#pragma unroll
        for (int k = 0; k < EB_K; k++) {
          if (k < m) {
#pragma unroll
            for (int k2 = 0; k2 < k; k2++)
              if (tok[k2] == tok[k]) v[k] = v[k2];
            v[k] = __fadd_rn(v[k], g[k]);
          }
        }
#pragma unroll
        for (int k = 0; k < EB_K; k++)
          if (k < m) dtable[(size_t)tok[k] * dim + d] = v[k];
      }
    }
  }
}

extern "C" void cuda_embedding_backward(float *dtable, const void *dout, const int32_t *tokens,
                                        int n, int dim) {
  if (n <= 0 || dim <= 0) return;
  const int col_blocks = (dim + 31) / 32;
  /* about 16 warps per SM in all; more token classes than ~n/64 would leave them idle */
  int nq = (cuda_ctx.sm_count * 16 + col_blocks - 1) / col_blocks;
  if (nq > n / 64) nq = n / 64;
  if (nq > 64) nq = 64;
  if (nq < 1) nq = 1;
  CUDA_ACT_DISPATCH(T, embedding_backward_kernel<T><<<dim3(col_blocks, nq), 32, 0,
                                                      cuda_ctx.stream>>>(dtable, (const T *)dout,
                                                                         tokens, n, dim));
  CUDA_LAUNCHED("embedding_backward_kernel");
}

/* ---- SwiGLU --------------------------------------------------------------------------------- */

/* silu(g) * u = g / (1 + exp(-g)) * u, as the CPU (and torch) evaluate it */
static __device__ __forceinline__ float swiglu_fwd1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

template <typename T, bool VEC>
static __global__ void swiglu_forward_kernel(T *__restrict__ out, const T *__restrict__ g,
                                             const T *__restrict__ u, size_t n) {
  pdl_wait();
  pdl_release();
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float gv[4], uv[4], o[4];
      load4(gv, g, i);
      load4(uv, u, i);
#pragma unroll
      for (int k = 0; k < 4; k++) o[k] = swiglu_fwd1(gv[k], uv[k]);
      store4(out, i, o);
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride)
    store_f(out + i, swiglu_fwd1(load_f(g + i), load_f(u + i)));
}

template <typename T>
static void swiglu_forward_launch(T *out, const T *g, const T *u, size_t n) {
  const bool vec = vec4_aligned<T>(out) && vec4_aligned<T>(g) && vec4_aligned<T>(u);
  auto *kernel = vec ? swiglu_forward_kernel<T, true> : swiglu_forward_kernel<T, false>;
  CUDA_LAUNCH_PDL("swiglu_forward_kernel", kernel, dim3(cuda_blocks(vec ? n / 4 : n)),
                  dim3(CUDA_THREADS), 0, out, g, u, n);
}

extern "C" void cuda_swiglu_forward(void *out, const void *g, const void *u, size_t n) {
  if (n == 0) return;
  CUDA_ACT_DISPATCH(T, swiglu_forward_launch((T *)out, (const T *)g, (const T *)u, n));
}

/* sig = 1/(1+exp(-g)); dg += dout*u*sig*(1 + g*(1-sig)); du += dout*silu(g), in the CPU's order.
 * dg / du may be NULL (ops.h: "not needed"): HAS_DG / HAS_DU say which are written. Without
 * ACC_DX the kernel starts them from zero instead of reading them (0 + x is x exactly). */
template <bool HAS_DG, bool HAS_DU>
static __device__ __forceinline__ void swiglu_bwd1(float &dg, float &du, float d, float g, float u) {
  float sig = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
  if (HAS_DG) {
    float a = __fmul_rn(__fmul_rn(d, u), sig);
    float b = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sig)));
    dg = __fadd_rn(dg, __fmul_rn(a, b));
  }
  if (HAS_DU) du = __fadd_rn(du, __fmul_rn(d, __fmul_rn(g, sig)));
}

template <typename T, bool VEC, bool HAS_DG, bool HAS_DU>
static __global__ void swiglu_backward_kernel(T *__restrict__ dg, T *__restrict__ du,
                                              const T *__restrict__ dout, const T *__restrict__ g,
                                              const T *__restrict__ u, size_t n, bool acc) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float dv[4], gv[4], uv[4], dgv[4] = {0.f, 0.f, 0.f, 0.f}, duv[4] = {0.f, 0.f, 0.f, 0.f};
      load4(dv, dout, i);
      load4(gv, g, i);
      load4(uv, u, i);
      if (HAS_DG && acc) load4(dgv, dg, i);
      if (HAS_DU && acc) load4(duv, du, i);
#pragma unroll
      for (int k = 0; k < 4; k++) swiglu_bwd1<HAS_DG, HAS_DU>(dgv[k], duv[k], dv[k], gv[k], uv[k]);
      if (HAS_DG) store4(dg, i, dgv);
      if (HAS_DU) store4(du, i, duv);
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) {
    float dgs = HAS_DG && acc ? load_f(dg + i) : 0.f, dus = HAS_DU && acc ? load_f(du + i) : 0.f;
    swiglu_bwd1<HAS_DG, HAS_DU>(dgs, dus, load_f(dout + i), load_f(g + i), load_f(u + i));
    if (HAS_DG) store_f(dg + i, dgs);
    if (HAS_DU) store_f(du + i, dus);
  }
}

template <typename T, bool HAS_DG, bool HAS_DU>
static void swiglu_backward_launch(T *dg, T *du, const T *dout, const T *g, const T *u, size_t n,
                                   bool acc) {
  if (vec4_aligned<T>(dg) && vec4_aligned<T>(du) && vec4_aligned<T>(dout) &&
      vec4_aligned<T>(g) && vec4_aligned<T>(u)) {
    swiglu_backward_kernel<T, true, HAS_DG, HAS_DU>
        <<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(dg, du, dout, g, u, n, acc);
  } else {
    swiglu_backward_kernel<T, false, HAS_DG, HAS_DU>
        <<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(dg, du, dout, g, u, n, acc);
  }
  CUDA_LAUNCHED("swiglu_backward_kernel");
}

template <typename T>
static void swiglu_backward_any(T *dg, T *du, const T *dout, const T *g, const T *u, size_t n,
                                bool acc) {
  if (dg && du) swiglu_backward_launch<T, true, true>(dg, du, dout, g, u, n, acc);
  else if (dg) swiglu_backward_launch<T, true, false>(dg, du, dout, g, u, n, acc);
  else if (du) swiglu_backward_launch<T, false, true>(dg, du, dout, g, u, n, acc);
}

extern "C" void cuda_swiglu_backward(void *dg, void *du, const void *dout, const void *g,
                                     const void *u, size_t n, int acc) {
  if (n == 0) return;
  CUDA_ACT_DISPATCH(T, swiglu_backward_any((T *)dg, (T *)du, (const T *)dout, (const T *)g,
                                           (const T *)u, n, (acc & ACC_DX) != 0));
}

/* ---- add, scale ----------------------------------------------------------------------------- */

/* out may be a: each element is read before it is written, by the same thread (no
 * __restrict__ on out and a). */
template <typename T, bool VEC>
static __global__ void add_kernel(T *out, const T *a, const T *__restrict__ b, size_t n) {
  pdl_wait();
  pdl_release();
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float av[4], bv[4];
      load4(av, a, i);
      load4(bv, b, i);
#pragma unroll
      for (int k = 0; k < 4; k++) av[k] = __fadd_rn(av[k], bv[k]);
      store4(out, i, av);
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride)
    store_f(out + i, __fadd_rn(load_f(a + i), load_f(b + i)));
}

template <typename T>
static void add_launch(T *out, const T *a, const T *b, size_t n) {
  const bool vec = vec4_aligned<T>(out) && vec4_aligned<T>(a) && vec4_aligned<T>(b);
  auto *kernel = vec ? add_kernel<T, true> : add_kernel<T, false>;
  CUDA_LAUNCH_PDL("add_kernel", kernel, dim3(cuda_blocks(vec ? n / 4 : n)), dim3(CUDA_THREADS), 0,
                  out, a, b, n);
}

/* t, not cuda_ctx.act: the engine also adds fp32 parameter gradients (a tied embedding's). */
extern "C" void cuda_add(void *out, const void *a, const void *b, size_t n, enum dtype t) {
  if (n == 0) return;
  if (t == DT_BF16) add_launch((bf16 *)out, (const bf16 *)a, (const bf16 *)b, n);
  else add_launch((float *)out, (const float *)a, (const float *)b, n);
}

/* ---- the KV cache's append ----------------------------------------------------------------- */

/* One block row per token: element c of row i of k and v goes to row i * seq_rows +
 * positions[i] of each cache. The position is read on the device, so a recorded decode step
 * appends where the token it is replayed for belongs. */
template <typename T>
static __global__ void kv_append_kernel(T *__restrict__ k_cache, T *__restrict__ v_cache,
                                        const T *__restrict__ k, const T *__restrict__ v,
                                        const int32_t *__restrict__ positions, int width,
                                        size_t seq_rows) {
  pdl_wait();
  pdl_release();
  const int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  const size_t to = (i * seq_rows + (size_t)positions[i]) * width + c;
  const size_t from = (size_t)i * width + c;
  k_cache[to] = k[from];
  v_cache[to] = v[from];
}

extern "C" void cuda_kv_append(void *k_cache, void *v_cache, const void *k, const void *v,
                               const int32_t *positions, int n, int width, int seq_rows) {
  const size_t row = (size_t)width * dtype_bytes(cuda_ctx.act);
  for (int i = 0; i < n; i += 65535) {   /* grid.y's limit */
    const int rows = n - i < 65535 ? n - i : 65535;
    dim3 grid((unsigned)((width + CUDA_THREADS - 1) / CUDA_THREADS), (unsigned)rows);
    const char *ki = (const char *)k + i * row, *vi = (const char *)v + i * row;
    char *kc = (char *)k_cache + (size_t)i * seq_rows * row;   /* token i's sequence */
    char *vc = (char *)v_cache + (size_t)i * seq_rows * row;
    CUDA_ACT_DISPATCH(T, CUDA_LAUNCH_PDL("kv_append_kernel", kv_append_kernel<T>, grid,
                                         dim3(CUDA_THREADS), 0, (T *)kc, (T *)vc, (const T *)ki,
                                         (const T *)vi, positions + i, width,
                                         (size_t)seq_rows));
  }
}

template <bool VEC>
static __global__ void scale_kernel(float *__restrict__ a, float s, size_t n) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 av = ((float4 *)a)[i];
      av.x = __fmul_rn(av.x, s);
      av.y = __fmul_rn(av.y, s);
      av.z = __fmul_rn(av.z, s);
      av.w = __fmul_rn(av.w, s);
      ((float4 *)a)[i] = av;
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) a[i] = __fmul_rn(a[i], s);
}

extern "C" void cuda_scale(float *a, float s, size_t n) {
  if (n == 0) return;
  if (cuda_aligned16(a)) {
    scale_kernel<true><<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(a, s, n);
  } else {
    scale_kernel<false><<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(a, s, n);
  }
  CUDA_LAUNCHED("scale_kernel");
}

/* ---- sums ---------------------------------------------------------------------------------- */

#define SUM_MAX_BLOCKS 1024

/* acc + x, or acc + x² with one rounding (an explicit FMA, so the two load paths below cannot
 * differ by a contraction nvcc chose in one and not the other). */
template <bool SQUARES>
static __device__ __forceinline__ double sum_term(double acc, float v) {
  return SQUARES ? __fma_rn((double)v, (double)v, acc) : acc + (double)v;
}

/* Thread tid sums the groups of 4 values tid, tid + stride, ... and then the tail values
 * 4 (n/4) + tid, ...; VEC only changes how a group is loaded, so the sum is the same for any
 * alignment of x and depends on n alone. */
template <bool VEC, bool SQUARES>
static __global__ void sum_partial_kernel(const float *__restrict__ x, size_t n,
                                          double *__restrict__ partial) {
  __shared__ double sh[32];
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const size_t n4 = n / 4;
  double acc = 0.0;
  for (size_t i = tid; i < n4; i += stride) {
    float v[4];
    if (VEC) {
      const float4 q = ((const float4 *)x)[i];
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; k++) v[k] = x[4 * i + k];
    }
#pragma unroll
    for (int k = 0; k < 4; k++) acc = sum_term<SQUARES>(acc, v[k]);
  }
  for (size_t i = n4 * 4 + tid; i < n; i += stride) acc = sum_term<SQUARES>(acc, x[i]);
  const double t = block_sum_double(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = t;
}

/* one block: *acc += the partials, in a fixed order */
static __global__ void sum_partials_kernel(const double *__restrict__ partial, int nb,
                                           double *__restrict__ acc) {
  __shared__ double sh[32];
  double s = 0.0;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) s += partial[b];
  const double t = block_sum_double(s, sh);
  if (threadIdx.x == 0) *acc += t;
}

template <bool SQUARES>
static void sum_partial_launch(const float *x, size_t n, double *partial, int nb) {
  if (cuda_aligned16(x)) {
    sum_partial_kernel<true, SQUARES><<<nb, CUDA_THREADS, 0, cuda_ctx.stream>>>(x, n, partial);
  } else {
    sum_partial_kernel<false, SQUARES><<<nb, CUDA_THREADS, 0, cuda_ctx.stream>>>(x, n, partial);
  }
  CUDA_LAUNCHED("sum_partial_kernel");
}

/* No host synchronization: *acc stays on the device until the engine reads it. The partials'
 * scratch may be reused by the next op, which runs after these kernels on the same stream. */
extern "C" void cuda_sum_into(double *acc, const float *x, size_t n, int squares) {
  if (n == 0) return;
  int nb = cuda_blocks(n / 4);
  if (nb > SUM_MAX_BLOCKS) nb = SUM_MAX_BLOCKS;
  double *partial = (double *)cuda_scratch((size_t)nb * sizeof(double), "sum_into");
  if (squares) sum_partial_launch<true>(x, n, partial, nb);
  else sum_partial_launch<false>(x, n, partial, nb);
  sum_partials_kernel<<<1, CUDA_THREADS, 0, cuda_ctx.stream>>>(partial, nb, acc);
  CUDA_LAUNCHED("sum_partials_kernel");
}
