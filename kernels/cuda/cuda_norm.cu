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

/* Threads for one row of dim: one float4 (or float) per thread and pass, at most 256. */
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

/* dw[j] += (float)Σ_c partial[c, j], chunks in order */
static __global__ void dw_finalize_kernel(float *__restrict__ dw, const double *__restrict__ partial,
                                   int chunks, int dim) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  double acc = 0.0;
  for (int c = 0; c < chunks; c++) acc += partial[(size_t)c * dim + j];
  dw[j] = __fadd_rn(dw[j], (float)acc);
}

static void dw_finalize(float *dw, const double *partial, int chunks, int dim) {
  int threads = dw_threads(dim);
  dw_finalize_kernel<<<(dim + threads - 1) / threads, threads, 0, cuda_ctx.stream>>>(
      dw, partial, chunks, dim);
  CUDA_LAUNCHED("dw_finalize_kernel");
}

/* ---- RMSNorm -------------------------------------------------------------------------------- */

/* One block per row (blocks stride over rows). */
template <bool VEC>
static __global__ void rmsnorm_forward_kernel(float *__restrict__ out, const float *__restrict__ x,
                                       const float *__restrict__ w, int n, int dim, float eps) {
  __shared__ double sh[32];
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const float *xi = x + (size_t)i * dim;
    float *oi = out + (size_t)i * dim;
    double ss = 0.0;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float4 a = ((const float4 *)xi)[v];
        ss += (double)a.x * a.x;
        ss += (double)a.y * a.y;
        ss += (double)a.z * a.z;
        ss += (double)a.w * a.w;
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += (double)xi[j] * xi[j];
    }
    const float r = rstd_of(block_sum_double(ss, sh), dim, eps);
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float4 a = ((const float4 *)xi)[v], wv = ((const float4 *)w)[v], o;
        o.x = __fmul_rn(__fmul_rn(a.x, r), wv.x);
        o.y = __fmul_rn(__fmul_rn(a.y, r), wv.y);
        o.z = __fmul_rn(__fmul_rn(a.z, r), wv.z);
        o.w = __fmul_rn(__fmul_rn(a.w, r), wv.w);
        ((float4 *)oi)[v] = o;
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        oi[j] = __fmul_rn(__fmul_rn(xi[j], r), w[j]);
    }
  }
}

extern "C" void cuda_rmsnorm_forward(float *out, const float *x, const float *w, int n, int dim,
                                     float eps) {
  if (n <= 0 || dim <= 0) return;
  const int threads = row_threads(dim), grid = n < 65535 * 16 ? n : 65535 * 16;
  if (dim % 4 == 0 && cuda_aligned16(out) && cuda_aligned16(x) && cuda_aligned16(w)) {
    rmsnorm_forward_kernel<true><<<grid, threads, 0, cuda_ctx.stream>>>(out, x, w, n, dim, eps);
  } else {
    rmsnorm_forward_kernel<false><<<grid, threads, 0, cuda_ctx.stream>>>(out, x, w, n, dim, eps);
  }
  CUDA_LAUNCHED("rmsnorm_forward_kernel");
}

/* One block per row: rstd[i]; when dx != NULL, with g = dout * w,
 * dx += (float)(r g - x r³ Σ(g x) / dim). */
template <bool VEC>
static __global__ void rmsnorm_backward_rows_kernel(float *__restrict__ dx, float *__restrict__ rstd,
                                             const float *__restrict__ dout,
                                             const float *__restrict__ x,
                                             const float *__restrict__ w, int n, int dim,
                                             float eps) {
  __shared__ double sh[32];
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const float *xi = x + (size_t)i * dim, *di = dout + (size_t)i * dim;
    double ss = 0.0;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float4 a = ((const float4 *)xi)[v];
        ss += (double)a.x * a.x;
        ss += (double)a.y * a.y;
        ss += (double)a.z * a.z;
        ss += (double)a.w * a.w;
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += (double)xi[j] * xi[j];
    }
    const float r = rstd_of(block_sum_double(ss, sh), dim, eps);
    if (threadIdx.x == 0) rstd[i] = r;
    if (!dx) continue;
    double gx = 0.0;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float4 a = ((const float4 *)xi)[v], d = ((const float4 *)di)[v],
               wv = ((const float4 *)w)[v];
        gx += (double)__fmul_rn(d.x, wv.x) * a.x;
        gx += (double)__fmul_rn(d.y, wv.y) * a.y;
        gx += (double)__fmul_rn(d.z, wv.z) * a.z;
        gx += (double)__fmul_rn(d.w, wv.w) * a.w;
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        gx += (double)__fmul_rn(di[j], w[j]) * xi[j];
    }
    gx = block_sum_double(gx, sh);
    const double c = gx * r * r * r / dim;
    float *dxi = dx + (size_t)i * dim;
    if (VEC) {
      for (int v = threadIdx.x; v < dim / 4; v += blockDim.x) {
        float4 a = ((const float4 *)xi)[v], d = ((const float4 *)di)[v],
               wv = ((const float4 *)w)[v], o = ((float4 *)dxi)[v];
        o.x = __fadd_rn(o.x, dx_term(r, __fmul_rn(d.x, wv.x), c, a.x));
        o.y = __fadd_rn(o.y, dx_term(r, __fmul_rn(d.y, wv.y), c, a.y));
        o.z = __fadd_rn(o.z, dx_term(r, __fmul_rn(d.z, wv.z), c, a.z));
        o.w = __fadd_rn(o.w, dx_term(r, __fmul_rn(d.w, wv.w), c, a.w));
        ((float4 *)dxi)[v] = o;
      }
    } else {
      for (int j = threadIdx.x; j < dim; j += blockDim.x)
        dxi[j] = __fadd_rn(dxi[j], dx_term(r, __fmul_rn(di[j], w[j]), c, xi[j]));
    }
  }
}

/* partial[chunk, j] = Σ_{i in chunk, in order} (double)dout[i,j] * (x[i,j] * rstd[i]) */
static __global__ void rmsnorm_dw_partial_kernel(double *__restrict__ partial,
                                          const float *__restrict__ dout,
                                          const float *__restrict__ x,
                                          const float *__restrict__ rstd, int n, int dim,
                                          int rows_per_chunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  const int chunk = blockIdx.y;
  const int i0 = chunk * rows_per_chunk, i1 = min(n, i0 + rows_per_chunk);
  double acc = 0.0;
  for (int i = i0; i < i1; i++) {
    const size_t k = (size_t)i * dim + j;
    acc += (double)dout[k] * (double)__fmul_rn(x[k], rstd[i]);
  }
  partial[(size_t)chunk * dim + j] = acc;
}

extern "C" void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x,
                                      const float *w, int n, int dim, float eps) {
  if (n <= 0 || dim <= 0) return;
  size_t rpc;
  const int chunks = dw_chunks((size_t)n, dim, &rpc);
  void *a, *b;
  cuda_scratch2(&a, (size_t)n * sizeof(float), &b, (size_t)chunks * dim * sizeof(double),
                "rmsnorm_backward");
  float *rstd = (float *)a;
  double *partial = (double *)b;

  const int threads = row_threads(dim), grid = n < 65535 * 16 ? n : 65535 * 16;
  if (dim % 4 == 0 && cuda_aligned16(dx) && cuda_aligned16(dout) && cuda_aligned16(x) &&
      cuda_aligned16(w)) {
    rmsnorm_backward_rows_kernel<true><<<grid, threads, 0, cuda_ctx.stream>>>(dx, rstd, dout, x,
                                                                              w, n, dim, eps);
  } else {
    rmsnorm_backward_rows_kernel<false><<<grid, threads, 0, cuda_ctx.stream>>>(dx, rstd, dout, x,
                                                                               w, n, dim, eps);
  }
  CUDA_LAUNCHED("rmsnorm_backward_rows_kernel");

  const int dwt = dw_threads(dim);
  dim3 dgrid((dim + dwt - 1) / dwt, chunks);
  rmsnorm_dw_partial_kernel<<<dgrid, dwt, 0, cuda_ctx.stream>>>(partial, dout, x, rstd, n, dim,
                                                                (int)rpc);
  CUDA_LAUNCHED("rmsnorm_dw_partial_kernel");
  dw_finalize(dw, partial, chunks, dim);
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

/* cos_t / sin_t [n, half]: angle = (float)positions[i] * inv_freq[j] in fp32, cos and sin of it
 * in double, rounded to float. */
static __global__ void rope_tables_kernel(float *__restrict__ cos_t, float *__restrict__ sin_t,
                                   const int32_t *__restrict__ positions, int n, int half,
                                   inv_freq_table inv) {
  const size_t total = (size_t)n * half;
  for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < total;
       k += (size_t)gridDim.x * blockDim.x) {
    const size_t i = k / half;
    const int j = (int)(k - i * half);
    const float angle = __fmul_rn((float)positions[i], inv.v[j]);
    double s, c;
    sincos((double)angle, &s, &c);
    cos_t[k] = (float)c;
    sin_t[k] = (float)s;
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
 * (k < PAIRS, p < half), i.e. elements p and p + half, which is all rotate-half needs: no shared
 * memory. PAIRS: half <= 32 * PAIRS. All loads of the group are issued before any arithmetic. */
template <int PAIRS, int R>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_forward_kernel(float *__restrict__ out, const float *__restrict__ x,
                                const float *__restrict__ w, const float *__restrict__ cos_t,
                                const float *__restrict__ sin_t, size_t rows, int heads,
                                int head_dim, float eps) {
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
  for (size_t row0 = ((size_t)blockIdx.x * QK_WARPS + (threadIdx.x >> 5)) * R; row0 < rows;
       row0 += (size_t)gridDim.x * QK_WARPS * R) {
    float xa[R][PAIRS], xb[R][PAIRS], cv[R][PAIRS], sv[R][PAIRS];
#pragma unroll
    for (int q = 0; q < R; q++) {
      const size_t row = row0 + q;
      if (row < rows) {
        const float *xh = x + row * head_dim;
        const size_t t = token_of(row, heads) * half;
#pragma unroll
        for (int k = 0; k < PAIRS; k++) {
          const int p = lane + 32 * k;
          if (p < half) {
            xa[q][k] = xh[p];
            xb[q][k] = xh[p + half];
            cv[q][k] = cos_t[t + p];
            sv[q][k] = sin_t[t + p];
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
      float *oh = out + row * head_dim;
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int p = lane + 32 * k;
        if (p < half) {
          const float na = __fmul_rn(__fmul_rn(xa[q][k], r), wa[k]);
          const float nb = __fmul_rn(__fmul_rn(xb[q][k], r), wb[k]);
          oh[p] = __fadd_rn(__fmul_rn(na, cv[q][k]), __fmul_rn(-nb, sv[q][k]));
          oh[p + half] = __fadd_rn(__fmul_rn(nb, cv[q][k]), __fmul_rn(na, sv[q][k]));
        }
      }
    }
  }
}

extern "C" void cuda_qk_norm_rope_forward(float *out, const float *x, const float *w,
                                          const int32_t *positions, int n, int heads,
                                          int head_dim, float eps, double theta) {
  if (head_dim % 2 || head_dim <= 0 || head_dim > 2 * ROPE_MAX_HALF)
    cuda_fail("qk_norm_rope_forward", "head_dim must be even and at most 256", __FILE__,
              __LINE__);
  if (n <= 0 || heads <= 0) return;
  const int half = head_dim / 2;
  const size_t table = (size_t)n * half * sizeof(float);
  void *a, *b;
  cuda_scratch2(&a, table, &b, table, "qk_norm_rope_forward");
  float *cos_t = (float *)a, *sin_t = (float *)b;
  rope_tables(cos_t, sin_t, positions, n, head_dim, theta);
  const size_t rows = (size_t)n * heads;
  const int r = half <= 64 ? QK_FWD_ROWS : (QK_FWD_ROWS + 1) / 2;
  size_t blocks = (rows + (size_t)QK_WARPS * r - 1) / ((size_t)QK_WARPS * r);
  if (blocks > 65535u * 16) blocks = 65535u * 16;
  if (half <= 64) {
    qk_norm_rope_forward_kernel<2, QK_FWD_ROWS><<<(int)blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(
        out, x, w, cos_t, sin_t, rows, heads, head_dim, eps);
  } else {
    qk_norm_rope_forward_kernel<4, (QK_FWD_ROWS + 1) / 2>
        <<<(int)blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(out, x, w, cos_t, sin_t, rows, heads,
                                                             head_dim, eps);
  }
  CUDA_LAUNCHED("qk_norm_rope_forward_kernel");
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
 * dx += (float)(r g - x r³ Σ(g x) / head_dim). Each lane owns the columns p and p + half of its
 * pairs, so it also sums the weight gradient (double)dxn_j * (x_j * r) of its columns over the
 * warp's rows, in row order, in registers; the warp's sums go to partial[w, head_dim]. */
template <int PAIRS, int R>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_backward_kernel(float *__restrict__ dx, double *__restrict__ partial,
                                 const float *__restrict__ dout, const float *__restrict__ x,
                                 const float *__restrict__ w, const float *__restrict__ cos_t,
                                 const float *__restrict__ sin_t, size_t rows, size_t rpw,
                                 int heads, int head_dim, float eps) {
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
        const float *xh = x + base, *dh = dout + base;
#pragma unroll
        for (int k = 0; k < PAIRS; k++) {
          const int p = lane + 32 * k;
          if (p < half) {
            xa[q][k] = xh[p];
            xb[q][k] = xh[p + half];
            const float da = dh[p], db = dh[p + half], cp = cos_t[t + p], sp = sin_t[t + p];
            na[q][k] = __fadd_rn(__fmul_rn(da, cp), __fmul_rn(db, sp));
            nb[q][k] = __fsub_rn(__fmul_rn(db, cp), __fmul_rn(da, sp));
            if (dx) {
              oa[q][k] = dx[base + p];
              ob[q][k] = dx[base + p + half];
            }
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
      float *dxh = dx + row * head_dim;
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int p = lane + 32 * k;
        if (p < half) {
          dxh[p] = __fadd_rn(oa[q][k], dx_term(r, ga[k], cc, xa[q][k]));
          dxh[p + half] = __fadd_rn(ob[q][k], dx_term(r, gb[k], cc, xb[q][k]));
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

/* dw[j] += (float)Σ_c partial[c, j]: one block per column, a fixed tree over the chunks */
static __global__ void dw_colsum_kernel(float *__restrict__ dw, const double *__restrict__ partial,
                                        int chunks, int dim) {
  __shared__ double sh[32];
  const int j = blockIdx.x;
  double acc = 0.0;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[(size_t)c * dim + j];
  const double t = block_sum_double(acc, sh);
  if (threadIdx.x == 0) dw[j] = __fadd_rn(dw[j], (float)t);
}

extern "C" void cuda_qk_norm_rope_backward(float *dx, float *dw, const float *dout, const float *x,
                                           const float *w, const int32_t *positions, int n,
                                           int heads, int head_dim, float eps, double theta) {
  if (head_dim % 2 || head_dim <= 0 || head_dim > 2 * ROPE_MAX_HALF)
    cuda_fail("qk_norm_rope_backward", "head_dim must be even and at most 256", __FILE__,
              __LINE__);
  if (n <= 0 || heads <= 0) return;
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
  const int blocks = (int)((warps + QK_WARPS - 1) / QK_WARPS);
  if (half <= 64) {
    qk_norm_rope_backward_kernel<2, QK_BWD_ROWS><<<blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(
        dx, partial, dout, x, w, cos_t, sin_t, rows, rpw, heads, head_dim, eps);
  } else {
    qk_norm_rope_backward_kernel<4, QK_BWD_ROWS>
        <<<blocks, QK_WARPS * 32, 0, cuda_ctx.stream>>>(dx, partial, dout, x, w, cos_t, sin_t,
                                                        rows, rpw, heads, head_dim, eps);
  }
  CUDA_LAUNCHED("qk_norm_rope_backward_kernel");
  dw_colsum_kernel<<<head_dim, 256, 0, cuda_ctx.stream>>>(dw, partial, (int)warps, head_dim);
  CUDA_LAUNCHED("dw_colsum_kernel");
}
