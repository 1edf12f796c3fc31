/* The memory-bound ops of the CUDA backend: embedding forward/backward, SwiGLU, residual add,
 * scaling, the squared norm and the tiled transpose. Each mirrors kernels/cpu/cpu_elementwise.c
 * (and cpu_transpose) formula for formula.
 *
 * Numerics: the arithmetic uses the explicit round-to-nearest intrinsics (__fadd_rn, __fmul_rn,
 * ...) wherever nvcc would otherwise contract a multiply-add into an FMA, so every elementwise
 * result rounds exactly as the CPU backend's (built without FMA) does; only expf may differ from
 * glibc's by an ulp.
 *
 * Determinism: no floating-point atomics anywhere.
 *  - embedding_backward: each element dtable[t, d] belongs to one thread (column d, token class
 *    t % Q), which walks the tokens in index order, so every dtable element receives its
 *    additions in exactly the CPU's order (bit-identical to cpu_embedding_backward). To hide
 *    memory latency a thread reads a chunk of EB_K rows at once and resolves repeated tokens
 *    inside the chunk in registers.
 *  - sum_squares: a fixed grid (a function of n only) of per-thread double sums in grid-stride
 *    order, a fixed tree per block into per-block partials in cuda_scratch, then one block sums
 *    the partials in a fixed order; the result does not depend on timing. */
#include <stdint.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_reduce.cuh"


/* ---- embedding ------------------------------------------------------------------------------ */

template <bool VEC>
static __global__ void embedding_forward_kernel(float *__restrict__ out, const int32_t *__restrict__ tokens,
                                         const float *__restrict__ table, int n, int dim) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const float *src = table + (size_t)tokens[row] * dim;
    float *dst = out + (size_t)row * dim;
    if (VEC) {
      const float4 *s4 = (const float4 *)src;
      float4 *d4 = (float4 *)dst;
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) d4[v] = s4[v];
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = src[j];
    }
  }
}

extern "C" void cuda_embedding_forward(float *out, const int32_t *tokens, const float *table,
                                       int n, int dim) {
  if (n <= 0 || dim <= 0) return;
  int grid = n < 65535 * 16 ? n : 65535 * 16;
  if (dim % 4 == 0 && cuda_aligned16(out) && cuda_aligned16(table)) {
    embedding_forward_kernel<true><<<grid, 256, 0, cuda_ctx.stream>>>(out, tokens, table, n, dim);
  } else {
    embedding_forward_kernel<false><<<grid, 256, 0, cuda_ctx.stream>>>(out, tokens, table, n, dim);
  }
  CUDA_LAUNCHED("embedding_forward_kernel");
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
 * order so that the last store to a repeated row carries the full sum. */
static __global__ void __launch_bounds__(32)
    embedding_backward_kernel(float *__restrict__ dtable, const float *__restrict__ dout,
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
            g[k] = dout[(size_t)row_s[i0 + k] * dim + d];
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

extern "C" void cuda_embedding_backward(float *dtable, const float *dout, const int32_t *tokens,
                                        int n, int dim) {
  if (n <= 0 || dim <= 0) return;
  const int col_blocks = (dim + 31) / 32;
  /* about 16 warps per SM in all; more token classes than ~n/64 would leave them idle */
  int nq = (cuda_ctx.sm_count * 16 + col_blocks - 1) / col_blocks;
  if (nq > n / 64) nq = n / 64;
  if (nq > 64) nq = 64;
  if (nq < 1) nq = 1;
  embedding_backward_kernel<<<dim3(col_blocks, nq), 32, 0, cuda_ctx.stream>>>(dtable, dout, tokens,
                                                                            n, dim);
  CUDA_LAUNCHED("embedding_backward_kernel");
}

/* ---- SwiGLU --------------------------------------------------------------------------------- */

/* silu(g) * u = g / (1 + exp(-g)) * u, as the CPU (and torch) evaluate it */
static __device__ __forceinline__ float swiglu_fwd1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

template <bool VEC>
static __global__ void swiglu_forward_kernel(float *__restrict__ out, const float *__restrict__ g,
                                      const float *__restrict__ u, size_t n) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 gv = ((const float4 *)g)[i], uv = ((const float4 *)u)[i], o;
      o.x = swiglu_fwd1(gv.x, uv.x);
      o.y = swiglu_fwd1(gv.y, uv.y);
      o.z = swiglu_fwd1(gv.z, uv.z);
      o.w = swiglu_fwd1(gv.w, uv.w);
      ((float4 *)out)[i] = o;
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) out[i] = swiglu_fwd1(g[i], u[i]);
}

extern "C" void cuda_swiglu_forward(float *out, const float *g, const float *u, size_t n) {
  if (n == 0) return;
  if (cuda_aligned16(out) && cuda_aligned16(g) && cuda_aligned16(u)) {
    swiglu_forward_kernel<true><<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(out, g,
                                                                                          u, n);
  } else {
    swiglu_forward_kernel<false><<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(out, g, u,
                                                                                       n);
  }
  CUDA_LAUNCHED("swiglu_forward_kernel");
}

/* sig = 1/(1+exp(-g)); dg += dout*u*sig*(1 + g*(1-sig)); du += dout*silu(g), in the CPU's order.
 * dg / du may be NULL (ops.h: "not needed"): HAS_DG / HAS_DU say which are written. */
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

template <bool VEC, bool HAS_DG, bool HAS_DU>
static __global__ void swiglu_backward_kernel(float *__restrict__ dg, float *__restrict__ du,
                                       const float *__restrict__ dout, const float *__restrict__ g,
                                       const float *__restrict__ u, size_t n) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 dv = ((const float4 *)dout)[i], gv = ((const float4 *)g)[i],
             uv = ((const float4 *)u)[i];
      float4 dgv = make_float4(0.f, 0.f, 0.f, 0.f), duv = dgv;
      if (HAS_DG) dgv = ((float4 *)dg)[i];
      if (HAS_DU) duv = ((float4 *)du)[i];
      swiglu_bwd1<HAS_DG, HAS_DU>(dgv.x, duv.x, dv.x, gv.x, uv.x);
      swiglu_bwd1<HAS_DG, HAS_DU>(dgv.y, duv.y, dv.y, gv.y, uv.y);
      swiglu_bwd1<HAS_DG, HAS_DU>(dgv.z, duv.z, dv.z, gv.z, uv.z);
      swiglu_bwd1<HAS_DG, HAS_DU>(dgv.w, duv.w, dv.w, gv.w, uv.w);
      if (HAS_DG) ((float4 *)dg)[i] = dgv;
      if (HAS_DU) ((float4 *)du)[i] = duv;
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) {
    float dgs = HAS_DG ? dg[i] : 0.f, dus = HAS_DU ? du[i] : 0.f;
    swiglu_bwd1<HAS_DG, HAS_DU>(dgs, dus, dout[i], g[i], u[i]);
    if (HAS_DG) dg[i] = dgs;
    if (HAS_DU) du[i] = dus;
  }
}

template <bool HAS_DG, bool HAS_DU>
static void swiglu_backward_launch(float *dg, float *du, const float *dout, const float *g,
                                   const float *u, size_t n) {
  if (cuda_aligned16(dg) && cuda_aligned16(du) && cuda_aligned16(dout) && cuda_aligned16(g) &&
      cuda_aligned16(u)) {
    swiglu_backward_kernel<true, HAS_DG, HAS_DU>
        <<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(dg, du, dout, g, u, n);
  } else {
    swiglu_backward_kernel<false, HAS_DG, HAS_DU>
        <<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(dg, du, dout, g, u, n);
  }
  CUDA_LAUNCHED("swiglu_backward_kernel");
}

extern "C" void cuda_swiglu_backward(float *dg, float *du, const float *dout, const float *g,
                                     const float *u, size_t n) {
  if (n == 0) return;
  if (dg && du) swiglu_backward_launch<true, true>(dg, du, dout, g, u, n);
  else if (dg) swiglu_backward_launch<true, false>(dg, du, dout, g, u, n);
  else if (du) swiglu_backward_launch<false, true>(dg, du, dout, g, u, n);
}

/* ---- add, scale ----------------------------------------------------------------------------- */

template <bool VEC>
static __global__ void add_inplace_kernel(float *__restrict__ a, const float *__restrict__ b, size_t n) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 av = ((float4 *)a)[i], bv = ((const float4 *)b)[i];
      av.x = __fadd_rn(av.x, bv.x);
      av.y = __fadd_rn(av.y, bv.y);
      av.z = __fadd_rn(av.z, bv.z);
      av.w = __fadd_rn(av.w, bv.w);
      ((float4 *)a)[i] = av;
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) a[i] = __fadd_rn(a[i], b[i]);
}

extern "C" void cuda_add_inplace(float *a, const float *b, size_t n) {
  if (n == 0) return;
  if (cuda_aligned16(a) && cuda_aligned16(b)) {
    add_inplace_kernel<true><<<cuda_blocks(n / 4), CUDA_THREADS, 0, cuda_ctx.stream>>>(a, b, n);
  } else {
    add_inplace_kernel<false><<<cuda_blocks(n), CUDA_THREADS, 0, cuda_ctx.stream>>>(a, b, n);
  }
  CUDA_LAUNCHED("add_inplace_kernel");
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

/* ---- sum of squares ------------------------------------------------------------------------- */

#define SS_MAX_BLOCKS 1024

template <bool VEC>
static __global__ void sum_squares_partial_kernel(const float *__restrict__ x, size_t n,
                                           double *__restrict__ partial) {
  __shared__ double sh[32];
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  double acc = 0.0;
  size_t start = 0;
  if (VEC) {
    const size_t n4 = n / 4;
    for (size_t i = tid; i < n4; i += stride) {
      float4 v = ((const float4 *)x)[i];
      acc += (double)v.x * v.x;
      acc += (double)v.y * v.y;
      acc += (double)v.z * v.z;
      acc += (double)v.w * v.w;
    }
    start = n4 * 4;
  }
  for (size_t i = start + tid; i < n; i += stride) acc += (double)x[i] * x[i];
  double t = block_sum_double(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = t;
}

/* one block: the partials in a fixed order */
static __global__ void sum_partials_kernel(const double *__restrict__ partial, int nb,
                                    double *__restrict__ result) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) acc += partial[b];
  double t = block_sum_double(acc, sh);
  if (threadIdx.x == 0) *result = t;
}

extern "C" double cuda_sum_squares(const float *x, size_t n) {
  if (n == 0) return 0.0;
  const bool vec = cuda_aligned16(x);
  int nb = cuda_blocks(vec ? n / 4 : n);
  if (nb > SS_MAX_BLOCKS) nb = SS_MAX_BLOCKS;
  double *partial = (double *)cuda_scratch((size_t)(nb + 1) * sizeof(double), "sum_squares");
  double *result = partial + nb;
  if (vec) {
    sum_squares_partial_kernel<true><<<nb, CUDA_THREADS, 0, cuda_ctx.stream>>>(x, n, partial);
  } else {
    sum_squares_partial_kernel<false><<<nb, CUDA_THREADS, 0, cuda_ctx.stream>>>(x, n, partial);
  }
  CUDA_LAUNCHED("sum_squares_partial_kernel");
  sum_partials_kernel<<<1, CUDA_THREADS, 0, cuda_ctx.stream>>>(partial, nb, result);
  CUDA_LAUNCHED("sum_partials_kernel");
  CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.host_result, result, sizeof(double), cudaMemcpyDeviceToHost,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  return cuda_ctx.host_result[0];
}

/* ---- transpose ------------------------------------------------------------------------------ */

#define TR_TILE 32
#define TR_ROWS 8

/* out[c * rows + r] = x[r * cols + c], through a padded 32x32 shared tile so that both the read
 * and the write are coalesced. Blocks stride over the tiles in both directions. */
static __global__ void __launch_bounds__(TR_TILE *TR_ROWS)
    transpose_kernel(float *__restrict__ out, const float *__restrict__ x, int rows, int cols) {
  __shared__ float tile[TR_TILE][TR_TILE + 1];
  const int tiles_r = (rows + TR_TILE - 1) / TR_TILE, tiles_c = (cols + TR_TILE - 1) / TR_TILE;
  for (int ty = blockIdx.y; ty < tiles_r; ty += gridDim.y) {
    for (int tx = blockIdx.x; tx < tiles_c; tx += gridDim.x) {
      const int r0 = ty * TR_TILE, c0 = tx * TR_TILE;
      {
        const int c = c0 + threadIdx.x;
        for (int k = threadIdx.y; k < TR_TILE; k += TR_ROWS) {
          const int r = r0 + k;
          if (r < rows && c < cols) tile[k][threadIdx.x] = x[(size_t)r * cols + c];
        }
      }
      __syncthreads();
      {
        const int r = r0 + threadIdx.x;
        for (int k = threadIdx.y; k < TR_TILE; k += TR_ROWS) {
          const int c = c0 + k;
          if (r < rows && c < cols) out[(size_t)c * rows + r] = tile[threadIdx.x][k];
        }
      }
      __syncthreads();
    }
  }
}

extern "C" void cuda_transpose(float *out, const float *x, int rows, int cols) {
  if (rows <= 0 || cols <= 0) return;
  const int tiles_r = (rows + TR_TILE - 1) / TR_TILE, tiles_c = (cols + TR_TILE - 1) / TR_TILE;
  dim3 grid(tiles_c < (1 << 20) ? tiles_c : (1 << 20), tiles_r < 65535 ? tiles_r : 65535);
  transpose_kernel<<<grid, dim3(TR_TILE, TR_ROWS), 0, cuda_ctx.stream>>>(out, x, rows, cols);
  CUDA_LAUNCHED("transpose_kernel");
}
