/* RMSNorm over rows, and the per-head q/k RMSNorm fused with rotate-half RoPE, for the CUDA
 * backend; the math mirrors kernels/cpu/cpu_norm.c step for step.
 *
 * Numerics: as on the CPU, the mean of squares and Σ g·x accumulate in double and the row's
 * rstd is (float)(1 / sqrt(ss/dim + eps)) computed in double; the elementwise products use the
 * round-to-nearest intrinsics so nvcc does not contract them into FMAs the CPU (built without
 * FMA) does not have. RoPE: inv_freq is computed on the host by the CPU's very expression (glibc
 * pow), angle = (float)pos * inv_freq in fp32, cos/sin evaluated in double and rounded, into
 * [n, head_dim/2] tables in cuda_scratch, exactly the CPU's tables up to CUDA's double cos/sin
 * (<= 2 ulp of double, invisible after rounding to float).
 *
 * Types: x, out, dout and dx are activations of the storage type T (float or bf16,
 * cuda_dtype.cuh), read and written through load_f / store_f; all arithmetic is the fp32 and
 * double arithmetic above, so the fp32 instantiations are the fp32 kernels exactly. The weight w
 * (a master weight) and its gradient dw are fp32 in every mode.
 *
 * Determinism: no atomics. A row's sums go through a fixed reduction tree (an xor butterfly,
 * which leaves every lane with the bitwise same value, then the warp sums in warp order). The
 * weight gradient is a sum over rows: the rows are cut into chunks fixed by the shape alone (never
 * by the GPU's SM count), each column's sum over a chunk is taken in row order, in double, into
 * partials [chunks, dim] in cuda_scratch, and a second kernel sums a column's partials in a fixed
 * order (chunk order for RMSNorm, a fixed tree for q/k norm) and adds the float result to dw, as
 * the CPU adds its double row-order sum. RMSNorm takes the chunk sums in a separate pass, one
 * thread per column; the q/k norm backward takes them in the row kernel itself, one warp per
 * chunk, each lane summing the columns it already holds. */
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_reduce.cuh"

#define ROPE_MAX_HALF 128  /* head_dim <= 256 */

/* 1 / sqrt(mean(x²) + eps) from the row's sum of squares, as row_rstd does */
static __device__ __forceinline__ float rstd_of(double ss, int dim, float eps) {
  return (float)(1.0 / sqrt(ss / dim + (double)eps));
}

/* dx_j += (float)(r g_j - c x_j), c = Σ g x · r³ / dim, without contraction */
static __device__ __forceinline__ float dx_term(float r, float g, double c, float x) {
  return (float)__dsub_rn(__dmul_rn((double)r, (double)g), __dmul_rn(c, (double)x));
}

/* Threads for one row of dim: one group of 4 values (or one value) per thread and pass, at most
 * 256. */
static int row_threads(int dim) {
  int per = (dim + 3) / 4;
  int t = (per + 31) / 32 * 32;
  return t < 32 ? 32 : t > 256 ? 256 : t;
}

/* ---- the weight-gradient reduction over rows ------------------------------------------------ */

/* Row chunks for a [rows, cols] column sum: about 160k threads in all, at least 16 rows per
 * chunk, at most 1024 chunks; a function of the shape only, so a run repeats bit for bit. */
static int dw_chunks(size_t rows, int cols, size_t *rows_per_chunk) {
  size_t target = (size_t)160 * 1024 / (size_t)cols;
  if (target < 1) target = 1;
  if (target > 1024) target = 1024;
  size_t rpc = (rows + target - 1) / target;
  if (rpc < 16) rpc = 16;
  *rows_per_chunk = rpc;
  return (int)((rows + rpc - 1) / rpc);
}

static int dw_threads(int cols) {
  int t = (cols + 31) / 32 * 32;
  return t > 256 ? 256 : t;
}

/* dw[j] (+)= (float)Σ_c partial[c, j], chunks in order; acc: add to dw rather than overwrite */
static __global__ void dw_finalize_kernel(float *__restrict__ dw, const double *__restrict__ partial,
                                   int chunks, int dim, bool acc) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  double sum = 0.0;
  for (int c = 0; c < chunks; c++) sum += partial[(size_t)c * dim + j];
  dw[j] = acc ? __fadd_rn(dw[j], (float)sum) : (float)sum;
}

static void dw_finalize(float *dw, const double *partial, int chunks, int dim, bool acc) {
  int threads = dw_threads(dim);
  dw_finalize_kernel<<<(dim + threads - 1) / threads, threads, 0, cuda_ctx.stream>>>(
      dw, partial, chunks, dim, acc);
  CUDA_LAUNCHED("dw_finalize_kernel");
}

/* ---- RMSNorm -------------------------------------------------------------------------------- */

/* Σ x² of row xi in double: each thread its own values in order, then the block's fixed tree */
template <typename T, bool VEC>
static __device__ __forceinline__ double row_sum_squares(const T *xi, int dim, double *sh) {
  double ss = 0.0;
  if (VEC) {
    for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
      float a[4];
      load4(a, xi, v);
#pragma unroll
      for (int k = 0; k < 4; k++) ss += (double)a[k] * a[k];
    }
  } else {
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
      const float a = load_f(xi + j);
      ss += (double)a * a;
    }
  }
  return block_sum_double(ss, sh);
}

/* One block per row (blocks stride over rows). */
template <typename T, bool VEC>
static __global__ void rmsnorm_forward_kernel(T *__restrict__ out, const T *__restrict__ x,
                                              const float *__restrict__ w, int n, int dim,
                                              float eps) {
  __shared__ double sh[32];
  pdl_wait();
  pdl_release();
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const T *xi = x + (size_t)i * dim;
    T *oi = out + (size_t)i * dim;
    const float r = rstd_of(row_sum_squares<T, VEC>(xi, dim, sh), dim, eps);
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float a[4], o[4];
        load4(a, xi, v);
        const float4 wv = ((const float4 *)w)[v];
        const float wk[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int k = 0; k < 4; k++) o[k] = __fmul_rn(__fmul_rn(a[k], r), wk[k]);
        store4(oi, v, o);
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        store_f(oi + j, __fmul_rn(__fmul_rn(load_f(xi + j), r), w[j]));
    }
  }
}

template <typename T>
static void rmsnorm_forward_launch(T *out, const T *x, const float *w, int n, int dim, float eps) {
  const int threads = row_threads(dim), grid = n < 65535 * 16 ? n : 65535 * 16;
  auto *kernel = dim % 4 == 0 && vec4_aligned<T>(out) && vec4_aligned<T>(x) && cuda_aligned16(w)
                     ? rmsnorm_forward_kernel<T, true>
                     : rmsnorm_forward_kernel<T, false>;
  CUDA_LAUNCH_PDL("rmsnorm_forward_kernel", kernel, dim3(grid), dim3(threads), 0, out, x, w, n,
                  dim, eps);
}

extern "C" void cuda_rmsnorm_forward(void *out, const void *x, const float *w, int n, int dim,
                                     float eps) {
  if (n <= 0 || dim <= 0) return;
  CUDA_ACT_DISPATCH(T, rmsnorm_forward_launch((T *)out, (const T *)x, w, n, dim, eps));
}

/* One block per row: rstd[i]; when dx != NULL, with g = dout * w,
 * dx (+)= (float)(r g - x r³ Σ(g x) / dim), added when acc (0 + t is t exactly). */
template <typename T, bool VEC>
static __global__ void rmsnorm_backward_rows_kernel(T *__restrict__ dx, float *__restrict__ rstd,
                                                    const T *__restrict__ dout,
                                                    const T *__restrict__ x,
                                                    const float *__restrict__ w, int n, int dim,
                                                    float eps, bool acc) {
  __shared__ double sh[32];
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const T *xi = x + (size_t)i * dim, *di = dout + (size_t)i * dim;
    const float r = rstd_of(row_sum_squares<T, VEC>(xi, dim, sh), dim, eps);
    if (threadIdx.x == 0) rstd[i] = r;
    if (!dx) continue;
    double gx = 0.0;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float a[4], d[4];
        load4(a, xi, v);
        load4(d, di, v);
        const float4 wv = ((const float4 *)w)[v];
        const float wk[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int k = 0; k < 4; k++) gx += (double)__fmul_rn(d[k], wk[k]) * a[k];
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        gx += (double)__fmul_rn(load_f(di + j), w[j]) * load_f(xi + j);
    }
    gx = block_sum_double(gx, sh);
    const double c = gx * r * r * r / dim;
    T *dxi = dx + (size_t)i * dim;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float a[4], d[4], o[4] = {0.f, 0.f, 0.f, 0.f};
        load4(a, xi, v);
        load4(d, di, v);
        if (acc) load4(o, dxi, v);
        const float4 wv = ((const float4 *)w)[v];
        const float wk[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int k = 0; k < 4; k++)
          o[k] = __fadd_rn(o[k], dx_term(r, __fmul_rn(d[k], wk[k]), c, a[k]));
        store4(dxi, v, o);
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        store_f(dxi + j, __fadd_rn(acc ? load_f(dxi + j) : 0.0f,
                                   dx_term(r, __fmul_rn(load_f(di + j), w[j]), c, load_f(xi + j))));
    }
  }
}

/* partial[chunk, j] = Σ_{i in chunk, in order} (double)dout[i,j] * (x[i,j] * rstd[i]) */
template <typename T>
static __global__ void rmsnorm_dw_partial_kernel(double *__restrict__ partial,
                                                 const T *__restrict__ dout,
                                                 const T *__restrict__ x,
                                                 const float *__restrict__ rstd, int n, int dim,
                                                 int rows_per_chunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  const int chunk = blockIdx.y;
  const int i0 = chunk * rows_per_chunk, i1 = min(n, i0 + rows_per_chunk);
  double acc = 0.0;
  for (int i = i0; i < i1; i++) {
    const size_t k = (size_t)i * dim + j;
    acc += (double)load_f(dout + k) * (double)__fmul_rn(load_f(x + k), rstd[i]);
  }
  partial[(size_t)chunk * dim + j] = acc;
}

template <typename T>
static void rmsnorm_backward_launch(T *dx, float *dw, const T *dout, const T *x, const float *w,
                                    int n, int dim, float eps, int acc) {
  size_t rpc;
  const int chunks = dw_chunks((size_t)n, dim, &rpc);
  void *a, *b;
  cuda_scratch2(&a, (size_t)n * sizeof(float), &b, (size_t)chunks * dim * sizeof(double),
                "rmsnorm_backward");
  float *rstd = (float *)a;
  double *partial = (double *)b;

  const int threads = row_threads(dim), grid = n < 65535 * 16 ? n : 65535 * 16;
  if (dim % 4 == 0 && vec4_aligned<T>(dx) && vec4_aligned<T>(dout) && vec4_aligned<T>(x) &&
      cuda_aligned16(w)) {
    rmsnorm_backward_rows_kernel<T, true><<<grid, threads, 0, cuda_ctx.stream>>>(
        dx, rstd, dout, x, w, n, dim, eps, (acc & ACC_DX) != 0);
  } else {
    rmsnorm_backward_rows_kernel<T, false><<<grid, threads, 0, cuda_ctx.stream>>>(
        dx, rstd, dout, x, w, n, dim, eps, (acc & ACC_DX) != 0);
  }
  CUDA_LAUNCHED("rmsnorm_backward_rows_kernel");

  const int dwt = dw_threads(dim);
  dim3 dgrid((dim + dwt - 1) / dwt, chunks);
  rmsnorm_dw_partial_kernel<T><<<dgrid, dwt, 0, cuda_ctx.stream>>>(partial, dout, x, rstd, n,
                                                                   dim, (int)rpc);
  CUDA_LAUNCHED("rmsnorm_dw_partial_kernel");
  dw_finalize(dw, partial, chunks, dim, (acc & ACC_DW) != 0);
}

/* With no rows an overwritten dw is zero, as the CPU's empty sums leave it. */
static void zero_dw_of_no_rows(float *dw, int dim, int acc) {
  if (dim > 0 && !(acc & ACC_DW))
    CUDA_CHECK(cudaMemsetAsync(dw, 0, (size_t)dim * sizeof(float), cuda_ctx.stream));
}

extern "C" void cuda_rmsnorm_backward(void *dx, float *dw, const void *dout, const void *x,
                                      const float *w, int n, int dim, float eps, int acc) {
  if (n <= 0 || dim <= 0) return zero_dw_of_no_rows(dw, dim, acc);
  CUDA_ACT_DISPATCH(T, rmsnorm_backward_launch((T *)dx, dw, (const T *)dout, (const T *)x, w, n,
                                               dim, eps, acc));
}

/* ---- q/k norm + RoPE ------------------------------------------------------------------------ */

struct inv_freq_table {
  float v[ROPE_MAX_HALF];
};

/* inv_freq[j] = 1 / theta^(2j/head_dim), the CPU's expression evaluated on the host */
static int rope_setup(struct inv_freq_table *inv, int head_dim, double theta) {
  if (head_dim % 2 || head_dim <= 0 || head_dim > 2 * ROPE_MAX_HALF)
    cuda_fail("qk_norm_rope", "head_dim must be even and at most 256", __FILE__, __LINE__);
  const int half = head_dim / 2;
  for (int j = 0; j < half; j++) {
    float exponent = (float)(2 * j) / (float)head_dim;
    inv->v[j] = 1.0f / (float)pow((double)(float)theta, (double)exponent);
  }
  return half;
}

/* The rotation of RoPE at a position: angle = (float)position * inv_freq[j] in fp32, cos and sin
 * of it in double, rounded to float. */
static __device__ __forceinline__ void rope_angle(float *c, float *s, int32_t position, float inv) {
  double sd, cd;
  sincos((double)__fmul_rn((float)position, inv), &sd, &cd);
  *c = (float)cd;
  *s = (float)sd;
}

/* cos_t / sin_t [n, half]: rope_angle of positions[i] and inv_freq[j]. */
static __global__ void rope_tables_kernel(float *__restrict__ cos_t, float *__restrict__ sin_t,
                                   const int32_t *__restrict__ positions, int n, int half,
                                   inv_freq_table inv) {
  const size_t total = (size_t)n * half;
  for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < total;
       k += (size_t)gridDim.x * blockDim.x) {
    const size_t i = k / half;
    const int j = (int)(k - i * half);
    rope_angle(&cos_t[k], &sin_t[k], positions[i], inv.v[j]);
  }
}

static void rope_tables(float *cos_t, float *sin_t, const int32_t *positions, int n, int head_dim,
                        double theta) {
  struct inv_freq_table inv;
  const int half = rope_setup(&inv, head_dim, theta);
  rope_tables_kernel<<<cuda_blocks((size_t)n * half), CUDA_THREADS, 0, cuda_ctx.stream>>>(
      cos_t, sin_t, positions, n, half, inv);
  CUDA_LAUNCHED("rope_tables_kernel");
}

#define QK_WARPS 8  /* warps per block */
/* Rows (token, head) a warp of the forward loads before it computes any, for more bytes in
 * flight (measured on an H200 at 8192 tokens x 32 heads x 128: 1 row 119 us, 2 rows 113 us, 4 rows
 * 116 us). The backward, which holds more per row, is fastest at 1 (235 us vs 330 us at 2 or 4). */
#define QK_FWD_ROWS 2
#define QK_BWD_ROWS 1

/* The token of a (token, head) row: a 32-bit division where it suffices. */
static __device__ __forceinline__ size_t token_of(size_t row, int heads) {
  return row <= 0xffffffffu ? (size_t)((unsigned)row / (unsigned)heads) : row / (size_t)heads;
}

/* One warp per group of R consecutive (token, head) rows. Lane l holds the pairs p = l + 32k
 * (k < PAIRS, p < half), i.e. elements p and p + half, which is all rotate-half needs. PAIRS:
 * half <= 32 * PAIRS. All loads of the group are issued before any arithmetic. The rotations of
 * the block's tokens (at most one a row) are computed first into shared memory: no table kernel
 * before it (decoding launches this for q and for k of every layer). */
template <typename T, int PAIRS, int R>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_forward_kernel(T *__restrict__ out, const T *__restrict__ x,
                                const float *__restrict__ w, const int32_t *__restrict__ positions,
                                inv_freq_table inv, size_t rows, int heads, int head_dim,
                                float eps) {
  constexpr int BLOCK_ROWS = QK_WARPS * R;
  __shared__ float s_cos[BLOCK_ROWS * ROPE_MAX_HALF], s_sin[BLOCK_ROWS * ROPE_MAX_HALF];
  pdl_wait();
  pdl_release();
  const int lane = threadIdx.x & 31, half = head_dim / 2;
  float wa[PAIRS], wb[PAIRS];
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
    const int p = lane + 32 * k;
    if (p < half) {
      wa[k] = w[p];
      wb[k] = w[p + half];
    }
  }
  for (size_t base = (size_t)blockIdx.x * BLOCK_ROWS; base < rows;
       base += (size_t)gridDim.x * BLOCK_ROWS) {
    const size_t t0 = token_of(base, heads);
    const size_t end = base + BLOCK_ROWS < rows ? base + BLOCK_ROWS : rows;
    const int tokens = (int)(token_of(end - 1, heads) - t0) + 1;
    for (int k = threadIdx.x; k < tokens * half; k += blockDim.x)
      rope_angle(&s_cos[k], &s_sin[k], positions[t0 + k / half], inv.v[k % half]);
    __syncthreads();
    const size_t row0 = base + (size_t)(threadIdx.x >> 5) * R;
    float xa[R][PAIRS], xb[R][PAIRS], cv[R][PAIRS], sv[R][PAIRS];
#pragma unroll
    for (int q = 0; q < R; q++) {
      const size_t row = row0 + q;
      if (row < rows) {
        const T *xh = x + row * head_dim;
        const int t = (int)(token_of(row, heads) - t0) * half;
#pragma unroll
        for (int k = 0; k < PAIRS; k++) {
          const int p = lane + 32 * k;
          if (p < half) {
            xa[q][k] = load_f(xh + p);
            xb[q][k] = load_f(xh + p + half);
            cv[q][k] = s_cos[t + p];
            sv[q][k] = s_sin[t + p];
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < R; q++) {
      const size_t row = row0 + q;
      if (row >= rows) break;  /* uniform over the warp */
      /* row_rstd adds j = 0..head_dim-1 in order; here each lane's terms, then the tree */
      double ss = 0.0;
#pragma unroll
      for (int k = 0; k < PAIRS; k++)
        if (lane + 32 * k < half) ss += (double)xa[q][k] * xa[q][k];
#pragma unroll
      for (int k = 0; k < PAIRS; k++)
        if (lane + 32 * k < half) ss += (double)xb[q][k] * xb[q][k];
      const float r = rstd_of(warp_sum_double(ss), head_dim, eps);
      T *oh = out + row * head_dim;
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int p = lane + 32 * k;
        if (p < half) {
          const float na = __fmul_rn(__fmul_rn(xa[q][k], r), wa[k]);
          const float nb = __fmul_rn(__fmul_rn(xb[q][k], r), wb[k]);
          store_f(oh + p, __fadd_rn(__fmul_rn(na, cv[q][k]), __fmul_rn(-nb, sv[q][k])));
          store_f(oh + p + half, __fadd_rn(__fmul_rn(nb, cv[q][k]), __fmul_rn(na, sv[q][k])));
        }
      }
    }
    __syncthreads();   /* the next rows' rotations overwrite these */
  }
}

template <typename T>
static void qk_norm_rope_forward_launch(T *out, const T *x, const float *w,
                                        const int32_t *positions, const inv_freq_table &inv,
                                        size_t rows, int heads, int head_dim, float eps) {
  const int half = head_dim / 2;
  const int r = half <= 64 ? QK_FWD_ROWS : (QK_FWD_ROWS + 1) / 2;
  size_t blocks = (rows + (size_t)QK_WARPS * r - 1) / ((size_t)QK_WARPS * r);
  if (blocks > 65535u * 16) blocks = 65535u * 16;
  auto *kernel = half <= 64 ? qk_norm_rope_forward_kernel<T, 2, QK_FWD_ROWS>
                            : qk_norm_rope_forward_kernel<T, 4, (QK_FWD_ROWS + 1) / 2>;
  CUDA_LAUNCH_PDL("qk_norm_rope_forward_kernel", kernel, dim3((unsigned)blocks),
                  dim3(QK_WARPS * 32), 0, out, x, w, positions, inv, rows, heads, head_dim, eps);
}

extern "C" void cuda_qk_norm_rope_forward(void *out, const void *x, const float *w,
                                          const int32_t *positions, int n, int heads,
                                          int head_dim, float eps, double theta) {
  struct inv_freq_table inv;
  rope_setup(&inv, head_dim, theta);   /* dies on a head_dim it cannot take */
  if (n <= 0 || heads <= 0) return;
  CUDA_ACT_DISPATCH(T, qk_norm_rope_forward_launch((T *)out, (const T *)x, w, positions, inv,
                                                   (size_t)n * heads, heads, head_dim, eps));
}

/* Rows per warp of the backward: a function of the shape only (the weight gradient's summation
 * order depends on it), at least 16 rows per warp and at most 4096 warps. */
static size_t qk_rows_per_warp(size_t rows) {
  size_t rpw = (rows + 4095) / 4096;
  return rpw < 16 ? 16 : rpw;
}

/* Warp w takes the rows [w rpw, (w+1) rpw) in order, R at a time (all their loads first). Per
 * row: r = rstd; rope_backward rotates dout by -angle (j < half: dout[j] c_j + dout[j+half] s_j;
 * j + half: dout[j+half] c_j - dout[j] s_j), giving dxn; when dx != NULL, g = dxn * w and
 * dx (+)= (float)(r g - x r³ Σ(g x) / head_dim). Each lane owns the columns p and p + half of its
 * pairs, so it also sums the weight gradient (double)dxn_j * (x_j * r) of its columns over the
 * warp's rows, in row order, in registers; the warp's sums go to partial[w, head_dim]. */
template <typename T, int PAIRS, int R>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_backward_kernel(T *__restrict__ dx, double *__restrict__ partial,
                                 const T *__restrict__ dout, const T *__restrict__ x,
                                 const float *__restrict__ w, const float *__restrict__ cos_t,
                                 const float *__restrict__ sin_t, size_t rows, size_t rpw,
                                 int heads, int head_dim, float eps, bool acc) {
  const int lane = threadIdx.x & 31, half = head_dim / 2;
  const size_t warp = (size_t)blockIdx.x * QK_WARPS + (threadIdx.x >> 5);
  const size_t r0 = warp * rpw;
  if (r0 >= rows) return;
  const size_t r1 = r0 + rpw < rows ? r0 + rpw : rows;
  float wa[PAIRS], wb[PAIRS];
  double dwa[PAIRS], dwb[PAIRS];
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
    const int p = lane + 32 * k;
    dwa[k] = dwb[k] = 0.0;
    if (p < half) {
      wa[k] = w[p];
      wb[k] = w[p + half];
    }
  }
  for (size_t row0 = r0; row0 < r1; row0 += R) {
    float xa[R][PAIRS], xb[R][PAIRS], na[R][PAIRS], nb[R][PAIRS], oa[R][PAIRS], ob[R][PAIRS];
#pragma unroll
    for (int q = 0; q < R; q++) {
      const size_t row = row0 + q;
      if (row < r1) {
        const size_t base = row * head_dim, t = token_of(row, heads) * half;
        const T *xh = x + base, *dh = dout + base;
#pragma unroll
        for (int k = 0; k < PAIRS; k++) {
          const int p = lane + 32 * k;
          if (p < half) {
            xa[q][k] = load_f(xh + p);
            xb[q][k] = load_f(xh + p + half);
            const float da = load_f(dh + p), db = load_f(dh + p + half);
            const float cp = cos_t[t + p], sp = sin_t[t + p];
            na[q][k] = __fadd_rn(__fmul_rn(da, cp), __fmul_rn(db, sp));
            nb[q][k] = __fsub_rn(__fmul_rn(db, cp), __fmul_rn(da, sp));
            oa[q][k] = dx && acc ? load_f(dx + base + p) : 0.0f;
            ob[q][k] = dx && acc ? load_f(dx + base + p + half) : 0.0f;
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < R; q++) {
      const size_t row = row0 + q;
      if (row >= r1) break;  /* uniform over the warp */
      double ss = 0.0;
#pragma unroll
      for (int k = 0; k < PAIRS; k++)
        if (lane + 32 * k < half) ss += (double)xa[q][k] * xa[q][k];
#pragma unroll
      for (int k = 0; k < PAIRS; k++)
        if (lane + 32 * k < half) ss += (double)xb[q][k] * xb[q][k];
      const float r = rstd_of(warp_sum_double(ss), head_dim, eps);
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        if (lane + 32 * k < half) {
          dwa[k] += (double)na[q][k] * (double)__fmul_rn(xa[q][k], r);
          dwb[k] += (double)nb[q][k] * (double)__fmul_rn(xb[q][k], r);
        }
      }
      if (!dx) continue;
      double gx = 0.0;
      float ga[PAIRS], gb[PAIRS];
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        if (lane + 32 * k < half) {
          ga[k] = __fmul_rn(na[q][k], wa[k]);
          gb[k] = __fmul_rn(nb[q][k], wb[k]);
          gx += (double)ga[k] * xa[q][k];
          gx += (double)gb[k] * xb[q][k];
        }
      }
      gx = warp_sum_double(gx);
      const double cc = gx * r * r * r / head_dim;
      T *dxh = dx + row * head_dim;
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int p = lane + 32 * k;
        if (p < half) {
          store_f(dxh + p, __fadd_rn(oa[q][k], dx_term(r, ga[k], cc, xa[q][k])));
          store_f(dxh + p + half, __fadd_rn(ob[q][k], dx_term(r, gb[k], cc, xb[q][k])));
        }
      }
    }
  }
  double *pw = partial + warp * head_dim;
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
    const int p = lane + 32 * k;
    if (p < half) {
      pw[p] = dwa[k];
      pw[p + half] = dwb[k];
    }
  }
}

/* dw[j] (+)= (float)Σ_c partial[c, j]: one block per column, a fixed tree over the chunks */
static __global__ void dw_colsum_kernel(float *__restrict__ dw, const double *__restrict__ partial,
                                        int chunks, int dim, bool acc) {
  __shared__ double sh[32];
  const int j = blockIdx.x;
  double sum = 0.0;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) sum += partial[(size_t)c * dim + j];
  const double t = block_sum_double(sum, sh);
  if (threadIdx.x == 0) dw[j] = acc ? __fadd_rn(dw[j], (float)t) : (float)t;
}

template <typename T>
static void qk_norm_rope_backward_launch(T *dx, double *partial, const T *dout, const T *x,
                                         const float *w, const float *cos_t, const float *sin_t,
                                         size_t rows, size_t rpw, size_t warps, int heads,
                                         int head_dim, float eps, bool acc) {
  const int blocks = (int)((warps + QK_WARPS - 1) / QK_WARPS);
  if (head_dim / 2 <= 64) {
    qk_norm_rope_backward_kernel<T, 2, QK_BWD_ROWS><<<blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(
        dx, partial, dout, x, w, cos_t, sin_t, rows, rpw, heads, head_dim, eps, acc);
  } else {
    qk_norm_rope_backward_kernel<T, 4, QK_BWD_ROWS><<<blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(
        dx, partial, dout, x, w, cos_t, sin_t, rows, rpw, heads, head_dim, eps, acc);
  }
  CUDA_LAUNCHED("qk_norm_rope_backward_kernel");
}

extern "C" void cuda_qk_norm_rope_backward(void *dx, float *dw, const void *dout, const void *x,
                                           const float *w, const int32_t *positions, int n,
                                           int heads, int head_dim, float eps, double theta,
                                           int acc) {
  if (head_dim % 2 || head_dim <= 0 || head_dim > 2 * ROPE_MAX_HALF)
    cuda_fail("qk_norm_rope_backward", "head_dim must be even and at most 256", __FILE__,
              __LINE__);
  if (n <= 0 || heads <= 0) return zero_dw_of_no_rows(dw, head_dim, acc);
  const int half = head_dim / 2;
  const size_t rows = (size_t)n * heads;
  const size_t rpw = qk_rows_per_warp(rows), warps = (rows + rpw - 1) / rpw;

  /* one arena cut three ways, each piece 256-byte aligned */
  const size_t table = ((size_t)n * half * sizeof(float) + 255) & ~(size_t)255;
  char *arena = (char *)cuda_scratch(2 * table + warps * head_dim * sizeof(double),
                                     "qk_norm_rope_backward");
  float *cos_t = (float *)arena, *sin_t = (float *)(arena + table);
  double *partial = (double *)(arena + 2 * table);

  rope_tables(cos_t, sin_t, positions, n, head_dim, theta);
  CUDA_ACT_DISPATCH(T, qk_norm_rope_backward_launch((T *)dx, partial, (const T *)dout,
                                                    (const T *)x, w, cos_t, sin_t, rows, rpw,
                                                    warps, heads, head_dim, eps,
                                                    (acc & ACC_DX) != 0));
  dw_colsum_kernel<<<head_dim, 256, 0, cuda_ctx.stream>>>(dw, partial, (int)warps, head_dim,
                                                          (acc & ACC_DW) != 0);
  CUDA_LAUNCHED("dw_colsum_kernel");
}
