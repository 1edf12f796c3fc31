/* RMSNorm over rows, and the per-head q/k RMSNorm fused with rotate-half RoPE, for the CUDA
 * backend; the math mirrors kernels/cpu/cpu_norm.c step for step.
 *
 * Numerics: as on the CPU, the mean of squares and Σ g·x accumulate in double and the row's
 * rstd is (float)(1 / sqrt(ss/dim + eps)) computed in double; the elementwise products use the
 * round-to-nearest intrinsics so nvcc does not contract them into FMAs the CPU (built without
 * FMA) does not have. RoPE: inv_freq is computed on the host by the CPU's very expression (glibc
 * pow), angle = (float)pos * inv_freq in fp32, cos/sin evaluated in double and rounded: exactly
 * the CPU's tables up to CUDA's double cos/sin (<= 2 ulp of double, invisible after rounding to
 * float). Each block evaluates them for the tokens it works on, into shared memory, so no table
 * kernel runs before either direction.
 *
 * Types: x, out, dout and dx are activations of the storage type T (float or bf16,
 * cuda_dtype.cuh), read and written through load_f / store_f; all arithmetic is the fp32 and
 * double arithmetic above, so the fp32 instantiations are the fp32 kernels exactly. The weight w
 * (a master weight) and its gradient dw are fp32 in every mode.
 *
 * Memory traffic: each op reads its inputs once and writes its outputs once (the backward also
 * its small dw partials), so at the training shapes it is bound by memory bandwidth. A thread
 * keeps its share of a row in registers from the load to the store: RMSNorm spreads a row over
 * one block (8 or 16 values a thread, so dim <= 8192), the q/k norm gives a (token, head) row to
 * a team of lanes of a warp. Loads and stores move 16 bytes where the row length and the
 * pointers' alignment allow, one value otherwise, and all of a step's loads are issued before its
 * arithmetic.
 *
 * Determinism: no atomics. A row's sums go through a fixed reduction tree (xor butterflies,
 * which leave every lane with the bitwise same value, then the warp sums in warp order). The
 * weight gradient is a sum over rows: every block of a backward owns a chunk of consecutive
 * rows fixed by the shape alone (never by the GPU's SM count); its threads add the terms of their
 * columns over the chunk in row order, in double, in registers, the block combines them in a
 * fixed order into partials [blocks, dim] in cuda_scratch, and dw_finalize_kernel adds a
 * column's partials in a fixed tree and adds the float result to dw, as the CPU adds its double
 * row-order sum. */
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

/* ---- vectors and sums ----------------------------------------------------------------------- */

/* V consecutive values of T moved as one load or store: 16 bytes (V = VEC_OF(T)) on the vector
 * paths, one value (V = 1) on the scalar paths, taken when a row's length is not a multiple of
 * VEC_OF(T) or a pointer is not 16-byte aligned. Kernels keep what they load in this form (bf16
 * takes half the registers of fp32) and convert a value where they use it. */
#define VEC_OF(T) ((int)(16 / sizeof(T)))

template <typename T, int V>
struct alignas(V * sizeof(T)) vecn {
  T v[V];
};

/* Vector i of p, or zeros when !live (past a row's end, a row past the block's, an accumulation
 * not asked for: p is not read then). */
template <typename T, int V>
static __device__ __forceinline__ vecn<T, V> load_vec(const T *p, size_t i, bool live) {
  vecn<T, V> q;
  if (live) {
    q = ((const vecn<T, V> *)p)[i];
  } else {
#pragma unroll
    for (int e = 0; e < V; e++) store_f(&q.v[e], 0.0f);
  }
  return q;
}

template <typename T, int V>
static __device__ __forceinline__ void store_vec(T *p, size_t i, const float *f) {
  vecn<T, V> q;
#pragma unroll
  for (int e = 0; e < V; e++) store_f(&q.v[e], f[e]);
  ((vecn<T, V> *)p)[i] = q;
}

/* The vector path: rows of len values, every pointer given (NULL counts as aligned) 16-byte
 * aligned. */
template <typename T>
static bool vec_path(int len, const void *a, const void *b, const void *c = NULL) {
  return len % VEC_OF(T) == 0 && cuda_aligned16(a) && cuda_aligned16(b) && cuda_aligned16(c);
}

/* v[0..N-1] each summed over the block, the same values in every thread: block_sum_double's
 * tree (the warps' xor butterflies, then their sums in warp order) for N sums at once, which
 * shuffle side by side. sh holds 32 N doubles. */
template <int N>
static __device__ __forceinline__ void block_sums_double(double *v, double *sh) {
#pragma unroll
  for (int k = 0; k < N; k++) v[k] = warp_sum_double(v[k]);
  __syncthreads();  /* sh may still be read by the previous step */
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < N; k++) sh[(threadIdx.x >> 5) * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; k++) v[k] = 0.0;
  for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
#pragma unroll
    for (int k = 0; k < N; k++) v[k] += sh[w * N + k];
  }
}

/* ---- the weight gradient's partials --------------------------------------------------------- */

#define DW_SLICES 32

/* dw[j] (+)= (float)Σ_b partial[b, j] over the `parts` partials; acc: add to dw rather than
 * overwrite. A block takes 32 columns with 32 slices of threads: slice s adds the partials s,
 * s + 32, ... in order, then the slices' sums are added pairwise (a fixed tree). */
static __global__ void __launch_bounds__(32 * DW_SLICES)
    dw_finalize_kernel(float *__restrict__ dw, const double *__restrict__ partial, int parts,
                       int dim, bool acc) {
  __shared__ double sh[DW_SLICES][32];
  pdl_wait();
  pdl_release();
  const int c = threadIdx.x & 31, s = threadIdx.x >> 5, j = blockIdx.x * 32 + c;
  double sum = 0.0;
  if (j < dim) {
#pragma unroll 4
    for (int b = s; b < parts; b += DW_SLICES) sum += partial[(size_t)b * dim + j];
  }
  sh[s][c] = sum;
  for (int h = DW_SLICES / 2; h > 0; h >>= 1) {
    __syncthreads();
    if (s < h) sh[s][c] += sh[s + h][c];
  }
  if (s == 0 && j < dim) dw[j] = acc ? __fadd_rn(dw[j], (float)sh[0][c]) : (float)sh[0][c];
}

static void dw_finalize(float *dw, const double *partial, int parts, int dim, int acc) {
  CUDA_LAUNCH_PDL("dw_finalize_kernel", dw_finalize_kernel, dim3((dim + 31) / 32),
                  dim3(32 * DW_SLICES), 0, dw, partial, parts, dim, (acc & ACC_DW) != 0);
}

/* With no rows an overwritten dw is zero, as the CPU's empty sums leave it. */
static void zero_dw_of_no_rows(float *dw, int dim, int acc) {
  if (dim > 0 && !(acc & ACC_DW))
    CUDA_CHECK(cudaMemsetAsync(dw, 0, (size_t)dim * sizeof(float), cuda_ctx.stream));
}

/* ---- RMSNorm -------------------------------------------------------------------------------- */

/* A block takes R rows at a time (a step): their loads are in flight together and their sums
 * are reduced together. Each thread holds RMS_STEP_VALUES values of each tensor a step reads,
 * C = 16 / R of each row: thread t the values t C .. t C + C-1, as PER = C / V vectors. R = 2 up
 * to dim 4096, else 1, so a block has at most 512 threads and dim is at most 8192 (a row lives
 * in one block's registers). R = 2 keeps twice the bytes in flight for the registers a thread
 * holds (not measured against R = 1). */
#define RMS_STEP_VALUES 16
#define RMS_MAX_THREADS 512
/* Registers of a backward thread: 96 where bf16 training shapes run (the vector path, two rows a
 * step), so that two blocks of up to 320 threads (dim 2560) share an SM; 128, what a block of
 * 512 threads may have, elsewhere. No backward kernel spills at these (nvcc 13.0, sm_90); the
 * weight is read from shared memory, which leaves the registers to the rows and dw. */
#define RMS_BWD_REGS(V, R) ((V) > 1 && (R) == 2 ? 96 : 128)
/* Blocks of the backward: each owns rms_rows_per_block consecutive rows (see there); 256, about
 * two an SM of an H200, each writing dim partials (5 MB at dim 2560). Measured on an H200
 * (bench/norm_bench.c, 2048 x 2560 bf16): 28.5 us, 0.23 of the copy's bandwidth (the kernels
 * this file had before took about 45 us); more blocks in flight is the next thing to try. */
#define RMS_BWD_BLOCKS 256

static int rms_rows_at_once(int dim) {
  if (dim > RMS_STEP_VALUES * RMS_MAX_THREADS)
    cuda_fail("rmsnorm", "dim must be at most 8192 (a row lives in one block's registers)",
              __FILE__, __LINE__);
  return dim <= RMS_STEP_VALUES / 2 * RMS_MAX_THREADS ? 2 : 1;
}

static int rms_threads(int dim, int r) {
  const int per_warp = 32 * RMS_STEP_VALUES / r;
  return (dim + per_warp - 1) / per_warp * 32;
}

/* The thread's vectors of row i of p, zeros past the row's end or everywhere when !live */
template <typename T, int V, int PER>
static __device__ __forceinline__ void load_row(vecn<T, V> *f, const T *p, size_t i, int dim,
                                                bool live) {
#pragma unroll
  for (int k = 0; k < PER; k++) {
    const int v = threadIdx.x * PER + k;
    f[k] = load_vec<T, V>(p, i * (dim / V) + v, live && v < dim / V);
  }
}

/* The thread's weights, zeros past the row's end */
template <int V, int PER>
static __device__ __forceinline__ void load_row_weights(float (*f)[V], const float *w, int dim) {
#pragma unroll
  for (int k = 0; k < PER; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) {
      const int j = (threadIdx.x * PER + k) * V + e;
      f[k][e] = j < dim ? w[j] : 0.0f;
    }
  }
}

/* Σ x² of the thread's values of a row, in column order (both directions take it, so they
 * compute the same rstd) */
template <typename T, int V, int PER>
static __device__ __forceinline__ double row_sum_squares(const vecn<T, V> *x) {
  double ss = 0.0;
#pragma unroll
  for (int k = 0; k < PER; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) {
      const float a = load_f(&x[k].v[e]);
      ss += (double)a * a;
    }
  }
  return ss;
}

/* Blocks stride over steps. */
template <typename T, int V, int R>
static __global__ void __launch_bounds__(RMS_MAX_THREADS)
    rmsnorm_forward_kernel(T *__restrict__ out, const T *__restrict__ x,
                           const float *__restrict__ w, int n, int dim, float eps) {
  constexpr int PER = RMS_STEP_VALUES / R / V;
  __shared__ double sh[32 * R];
  pdl_wait();
  pdl_release();
  float wv[PER][V];
  load_row_weights<V, PER>(wv, w, dim);
  for (int i0 = blockIdx.x * R; i0 < n; i0 += gridDim.x * R) {
    vecn<T, V> xr[R][PER];
    double ss[R];
#pragma unroll
    for (int q = 0; q < R; q++) load_row<T, V, PER>(xr[q], x, (size_t)(i0 + q), dim, i0 + q < n);
#pragma unroll
    for (int q = 0; q < R; q++) ss[q] = row_sum_squares<T, V, PER>(xr[q]);
    block_sums_double<R>(ss, sh);
#pragma unroll
    for (int q = 0; q < R; q++) {
      if (i0 + q >= n) break;  /* uniform over the block */
      const float r = rstd_of(ss[q], dim, eps);
#pragma unroll
      for (int k = 0; k < PER; k++) {
        const int v = threadIdx.x * PER + k;
        if (v >= dim / V) break;  /* so are the rest */
        float o[V];
#pragma unroll
        for (int e = 0; e < V; e++)
          o[e] = __fmul_rn(__fmul_rn(load_f(&xr[q][k].v[e]), r), wv[k][e]);
        store_vec<T, V>(out, (size_t)(i0 + q) * (dim / V) + v, o);
      }
    }
  }
}

template <typename T>
static void rmsnorm_forward_launch(T *out, const T *x, const float *w, int n, int dim, float eps) {
  constexpr int VW = VEC_OF(T);
  const int r = rms_rows_at_once(dim), threads = rms_threads(dim, r);
  const int grid = (n + r - 1) / r < 65535 * 16 ? (n + r - 1) / r : 65535 * 16;
  auto *kernel =
      vec_path<T>(dim, out, x)
          ? (r == 2 ? rmsnorm_forward_kernel<T, VW, 2> : rmsnorm_forward_kernel<T, VW, 1>)
          : (r == 2 ? rmsnorm_forward_kernel<T, 1, 2> : rmsnorm_forward_kernel<T, 1, 1>);
  CUDA_LAUNCH_PDL("rmsnorm_forward_kernel", kernel, dim3(grid), dim3(threads), 0, out, x, w, n,
                  dim, eps);
}

extern "C" void cuda_rmsnorm_forward(void *out, const void *x, const float *w, int n, int dim,
                                     float eps) {
  if (n <= 0 || dim <= 0) return;
  CUDA_ACT_DISPATCH(T, rmsnorm_forward_launch((T *)out, (const T *)x, w, n, dim, eps));
}

/* Rows per block of the backward: about RMS_BWD_BLOCKS blocks, an even number of rows (R divides
 * it). A function of the shape only: the chunks are the weight gradient's summation tree. */
static int rms_rows_per_block(int n) {
  const int r = (n + RMS_BWD_BLOCKS - 1) / RMS_BWD_BLOCKS;
  return (r + 1) & ~1;
}

/* Block b takes the rows [b rpb, (b+1) rpb), a step at a time. Per row: r = rstd, g = dout * w,
 * dx (+)= (float)(r g - x r³ Σ(g x) / dim) when dx != NULL (acc: added, else dx is not read; 0
 * + t is t exactly); each thread adds (double)dout_j * (x_j * r) of its columns over the rows in
 * order, and the block's sums go to partial[b, dim]. */
template <typename T, int V, int R>
static __global__ void __maxnreg__(RMS_BWD_REGS(V, R))
    rmsnorm_backward_kernel(T *__restrict__ dx, double *__restrict__ partial,
                            const T *__restrict__ dout, const T *__restrict__ x,
                            const float *__restrict__ w, int n, int dim, int rpb, float eps,
                            bool acc) {
  constexpr int PER = RMS_STEP_VALUES / R / V;
  __shared__ double sh[32 * 2 * R];
  extern __shared__ __align__(16) float s_w[];  /* w, zeros past dim: blockDim.x C values */
  pdl_wait();
  pdl_release();
  double dw[PER][V];
  for (int j = threadIdx.x; j < (int)blockDim.x * PER * V; j += blockDim.x)
    s_w[j] = j < dim ? w[j] : 0.0f;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < PER; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) dw[k][e] = 0.0;
  }
  const int first = blockIdx.x * rpb, end = first + min(rpb, n - first);
  for (int i0 = first; i0 < end; i0 += R) {
    vecn<T, V> xr[R][PER], dr[R][PER], orow[R][PER];
    double s[2 * R];  /* s[q] = Σ x², s[R + q] = Σ g x of row i0 + q */
#pragma unroll
    for (int q = 0; q < R; q++) {
      const bool live = i0 + q < end;
      load_row<T, V, PER>(xr[q], x, (size_t)(i0 + q), dim, live);
      load_row<T, V, PER>(dr[q], dout, (size_t)(i0 + q), dim, live);
      load_row<T, V, PER>(orow[q], dx, (size_t)(i0 + q), dim, live && acc);
    }
#pragma unroll
    for (int q = 0; q < R; q++) {
      s[q] = row_sum_squares<T, V, PER>(xr[q]);
      s[R + q] = 0.0;
#pragma unroll
      for (int k = 0; k < PER; k++) {
        const vecn<float, V> wk = load_vec<float, V>(s_w, threadIdx.x * PER + k, true);
#pragma unroll
        for (int e = 0; e < V; e++)
          s[R + q] += (double)__fmul_rn(load_f(&dr[q][k].v[e]), wk.v[e]) * load_f(&xr[q][k].v[e]);
      }
    }
    block_sums_double<2 * R>(s, sh);
#pragma unroll
    for (int q = 0; q < R; q++) {
      if (i0 + q >= end) break;  /* uniform over the block */
      const float r = rstd_of(s[q], dim, eps);
      const double c = s[R + q] * r * r * r / dim;
#pragma unroll
      for (int k = 0; k < PER; k++) {
        const int v = threadIdx.x * PER + k;
        float o[V];
        const vecn<float, V> wk = load_vec<float, V>(s_w, threadIdx.x * PER + k, true);
#pragma unroll
        for (int e = 0; e < V; e++) {
          const float a = load_f(&xr[q][k].v[e]), d = load_f(&dr[q][k].v[e]);
          dw[k][e] += (double)d * (double)__fmul_rn(a, r);
          o[e] = __fadd_rn(load_f(&orow[q][k].v[e]), dx_term(r, __fmul_rn(d, wk.v[e]), c, a));
        }
        if (dx && v < dim / V) store_vec<T, V>(dx, (size_t)(i0 + q) * (dim / V) + v, o);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < PER; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) {
      const int j = (threadIdx.x * PER + k) * V + e;
      if (j < dim) partial[(size_t)blockIdx.x * dim + j] = dw[k][e];
    }
  }
}

template <typename T>
static void rmsnorm_backward_launch(T *dx, float *dw, const T *dout, const T *x, const float *w,
                                    int n, int dim, float eps, int acc) {
  constexpr int VW = VEC_OF(T);
  const int r = rms_rows_at_once(dim), threads = rms_threads(dim, r);
  const int rpb = rms_rows_per_block(n), blocks = (n + rpb - 1) / rpb;
  double *partial = (double *)cuda_scratch((size_t)blocks * dim * sizeof(double),
                                           "rmsnorm_backward");
  auto *kernel =
      vec_path<T>(dim, dx, dout, x)
          ? (r == 2 ? rmsnorm_backward_kernel<T, VW, 2> : rmsnorm_backward_kernel<T, VW, 1>)
          : (r == 2 ? rmsnorm_backward_kernel<T, 1, 2> : rmsnorm_backward_kernel<T, 1, 1>);
  CUDA_LAUNCH_PDL("rmsnorm_backward_kernel", kernel, dim3(blocks), dim3(threads),
                  (size_t)threads * RMS_STEP_VALUES / r * sizeof(float), dx,
                  partial, dout, x, w, n, dim, rpb, eps, dx != NULL && (acc & ACC_DX) != 0);
  dw_finalize(dw, partial, blocks, dim, acc);
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

#define QK_WARPS 8  /* warps per block */
/* Blocks of the backward: each owns qk_rows_per_block consecutive rows (see there); 256, about
 * two an SM of an H200 (two fit at its 128 registers a thread). Measured on an H200
 * (bench/norm_bench.c, 2048 tokens x 32 / 8 heads x 128, bf16): 41.6 / 13.5 us, 0.25 / 0.19 of
 * the copy's bandwidth (about 120 us for both before). */
#define QK_BWD_BLOCKS 256

/* The token of a (token, head) row: a 32-bit division where it suffices. */
static __device__ __forceinline__ size_t token_of(size_t row, int heads) {
  return row <= 0xffffffffu ? (size_t)((unsigned)row / (unsigned)heads) : row / (size_t)heads;
}

/* How a block covers (token, head) rows of head_dim = 2 half values. The pairs (j, j + half)
 * come in groups of V consecutive ones; a team of 2^team_log2 lanes (the fewest, up to a warp,
 * that take a group each) takes a row, lane t of it the groups g = t + 2^team_log2 k (k < PAIRS,
 * g < half / V), i.e. the values V g .. V g + V-1 and their partners half + V g .., which is all
 * rotate-half needs. At head_dim 128 in bf16: teams of 8 lanes, 4 rows a warp, 16-byte loads. A
 * block takes QK_WARPS 32 / 2^team_log2 consecutive rows at a time (a step); the cos/sin of the
 * step's tokens go to shared memory after the step's loads are issued, so that their latencies
 * overlap. Measured on an H200 (bench/norm_bench.c, 2048 tokens x 32 / 8 heads x 128, bf16):
 * the forward 13.8 / 5.5 us, 0.50 / 0.31 of the copy's bandwidth (the layout of one warp a row
 * and 2-byte loads it replaces took about 55 us for both). */
struct qk_layout {
  bool vec;            /* V = VEC_OF(T), else 1 */
  int team_log2;       /* teams of 2^team_log2 lanes */
  int pairs;           /* PAIRS: 1 or 4 */
  int step;            /* rows a block takes at once */
  size_t rope_bytes;   /* the cos/sin tables of a step's tokens */
};

template <typename T>
static qk_layout qk_layout_of(int head_dim, int heads, bool vec) {
  qk_layout l;
  const int half = head_dim / 2, groups = half / (vec ? VEC_OF(T) : 1);
  l.vec = vec;
  l.team_log2 = 0;
  while ((1 << l.team_log2) < groups && l.team_log2 < 5) l.team_log2++;
  l.pairs = groups <= 32 ? 1 : 4;   /* groups <= 128 = ROPE_MAX_HALF */
  l.step = QK_WARPS * (32 >> l.team_log2);
  const int tokens = (l.step - 1) / heads + 2 < l.step ? (l.step - 1) / heads + 2 : l.step;
  l.rope_bytes = 2 * (size_t)tokens * half * sizeof(float);
  return l;
}

/* The step's cos/sin tables, [tokens, half] each, from token t0 on; the caller syncs. */
static __device__ __forceinline__ void rope_step_tables(float *s_cos, float *s_sin,
                                                        const int32_t *positions,
                                                        const inv_freq_table &inv, size_t t0,
                                                        int tokens, int half) {
  for (int k = threadIdx.x; k < tokens * half; k += blockDim.x)
    rope_angle(&s_cos[k], &s_sin[k], positions[t0 + k / half], inv.v[k % half]);
}

/* The lane's vectors of a row: group g's values (V g ..) into a[k], their partners
 * (half + V g ..) into b[k]; zeros for groups past the row's end, or everywhere when !live */
template <typename T, int V, int PAIRS>
static __device__ __forceinline__ void load_pairs(vecn<T, V> *a, vecn<T, V> *b, const T *p,
                                                  size_t row, int head_dim, int t, int team,
                                                  bool live) {
  const int half = head_dim / 2;
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
    const int g = t + team * k;
    const size_t i = row * (head_dim / V) + g;
    a[k] = load_vec<T, V>(p, i, live && g < half / V);
    b[k] = load_vec<T, V>(p, i + half / V, live && g < half / V);
  }
}

/* The lane's weights w[V g + e] and w[half + V g + e] (zeros for groups past the row's end):
 * one value at a time, as the weight's alignment is not known. */
template <int V, int PAIRS>
static __device__ __forceinline__ void load_pair_weights(float (*a)[V], float (*b)[V],
                                                         const float *w, int head_dim, int t,
                                                         int team) {
  const int half = head_dim / 2;
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
    const int g = t + team * k;
#pragma unroll
    for (int e = 0; e < V; e++) {
      a[k][e] = g < half / V ? w[V * g + e] : 0.0f;
      b[k][e] = g < half / V ? w[half + V * g + e] : 0.0f;
    }
  }
}

/* Σ x² of the lane's values of a row, a then b of each value in turn (both directions take it,
 * so they compute the same rstd) */
template <typename T, int V, int PAIRS>
static __device__ __forceinline__ double pair_sum_squares(const vecn<T, V> *a,
                                                          const vecn<T, V> *b) {
  double ss = 0.0;
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) {
      const float xa = load_f(&a[k].v[e]), xb = load_f(&b[k].v[e]);
      ss += (double)xa * xa;
      ss += (double)xb * xb;
    }
  }
  return ss;
}

/* Sum over a team of 2^team_log2 lanes: its xor butterfly, the same value in every lane of it */
static __device__ __forceinline__ double team_sum_double(double v, int team_log2) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1)
    if (m < (1 << team_log2)) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

/* The gradient reaching the normed values at j and j + half from dout there: the rotation by
 * -angle (the CPU's rope_backward_at) */
static __device__ __forceinline__ void rope_backward(float *na, float *nb, float da, float db,
                                                     float c, float s) {
  *na = __fadd_rn(__fmul_rn(da, c), __fmul_rn(db, s));
  *nb = __fsub_rn(__fmul_rn(db, c), __fmul_rn(da, s));
}

/* The forward's tensors (q and k, or one alone: heads[1] = 0, its pointers never read), picked
 * with constant indices (an array indexed by a variable goes to local memory). */
template <typename T>
struct qk_tensors {
  T *out[2];
  const T *x[2];
  const float *w[2];
  int heads[2];
};

/* A row of a forward launch. The launch numbers its rows token by token, heads = heads[0] +
 * heads[1] a token: tensor 0's heads, then tensor 1's. So a token's q and k rows are neighbours,
 * and a step that holds rows of both evaluates the token's cos/sin once for them (where q's
 * launch and k's each evaluated it). row: the row in its own tensor. */
template <typename T>
struct qk_row {
  T *out;
  const T *x;
  bool second;
  size_t token, row;
};

template <typename T>
static __device__ __forceinline__ qk_row<T> qk_row_of(const qk_tensors<T> &qk, size_t row,
                                                      int heads) {
  const size_t token = token_of(row, heads);
  const int h = (int)(row - token * heads);
  const bool second = h >= qk.heads[0];
  return {second ? qk.out[1] : qk.out[0], second ? qk.x[1] : qk.x[0], second, token,
          token * (second ? qk.heads[1] : qk.heads[0]) + (second ? h - qk.heads[0] : h)};
}

/* The most norm weight values a thread of the forward stages: both tensors' head_dim <= 256 */
#define QK_W_PER_THREAD (2 * 2 * ROPE_MAX_HALF / (QK_WARPS * 32))
static_assert(QK_W_PER_THREAD * QK_WARPS * 32 >= 2 * 2 * ROPE_MAX_HALF,
              "a block's threads stage both tensors' weights at the largest head_dim");

/* The forward: blocks stride over steps (see qk_layout) of the launch's rows (qk_row_of). Per
 * row: r = rstd, xn = x * r * w, out = xn cos + rotate_half(xn) sin. A row's arithmetic is that
 * of a launch of its tensor alone (its lanes, its sums' order, its token's cos/sin, the same
 * fp32 weights), so each tensor's bits are too.
 * The block's norm weights, both tensors', go to shared memory: a lane's row may be of either
 * tensor, and the row's weights in registers, loaded each step, took 79 registers a thread
 * against 64 in bf16 (four blocks an SM down to three). They are loaded before pdl_wait
 * (cuda.h's exception: AdamW, which writes them, never runs just before), at most
 * QK_W_PER_THREAD a thread, and stored once the first step's x and position loads are issued
 * and its table evaluated (a store waits for its value: before those loads it would hold them
 * up when the wait is short). The tensors' pointers come as __restrict__ parameters, so x and
 * w are read through the read-only path (ld.global.nc) as the one-tensor kernel's were; taken
 * from a struct parameter they were not. */
template <typename T, int V, int PAIRS>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_forward_kernel(T *__restrict__ out0, T *__restrict__ out1,
                                const T *__restrict__ x0, const T *__restrict__ x1,
                                const float *__restrict__ w0, const float *__restrict__ w1,
                                int heads0, int heads1, const int32_t *__restrict__ positions,
                                inv_freq_table inv, size_t rows, int head_dim, int team_log2,
                                float eps) {
  /* the weights [2, head_dim], then the cos and sin of the step's tokens */
  extern __shared__ __align__(16) float s_w[];
  const qk_tensors<T> qk = {{out0, out1}, {x0, x1}, {w0, w1}, {heads0, heads1}};
  const int heads = heads0 + heads1;
  const int half = head_dim / 2, team = 1 << team_log2, t = threadIdx.x & (team - 1);
  const int step = QK_WARPS * 32 >> team_log2, mine = threadIdx.x >> team_log2;
  float *s_rope = s_w + 2 * head_dim;
  float wv[QK_W_PER_THREAD];
#pragma unroll
  for (int k = 0; k < QK_W_PER_THREAD; k++) {
    const int i = threadIdx.x + k * QK_WARPS * 32;
    wv[k] = i < head_dim && heads0 > 0                        ? w0[i]
            : i >= head_dim && i < 2 * head_dim && heads1 > 0 ? w1[i - head_dim]
                                                              : 0.0f;
  }
  pdl_wait();
  pdl_release();
  const size_t first = (size_t)blockIdx.x * step;
  for (size_t base = first; base < rows; base += (size_t)gridDim.x * step) {
    const qk_row<T> r = qk_row_of(qk, base + mine, heads);
    const bool live = base + mine < rows;
    const size_t end = base + step < rows ? base + step : rows;
    vecn<T, V> xa[PAIRS], xb[PAIRS];
    load_pairs<T, V, PAIRS>(xa, xb, r.x, r.row, head_dim, t, team, live);
    const size_t t0 = token_of(base, heads);
    const int tokens = (int)(token_of(end - 1, heads) - t0) + 1;
    float *s_cos = s_rope, *s_sin = s_rope + tokens * half;
    rope_step_tables(s_cos, s_sin, positions, inv, t0, tokens, half);
    if (base == first) {   /* published by this step's barrier, never written again */
#pragma unroll
      for (int k = 0; k < QK_W_PER_THREAD; k++) {
        const int i = threadIdx.x + k * QK_WARPS * 32;
        if (i < 2 * head_dim) s_w[i] = wv[k];
      }
    }
    __syncthreads();
    /* row_rstd adds j = 0..head_dim-1 in order; here each lane's terms, then the tree */
    const float rs = rstd_of(team_sum_double(pair_sum_squares<T, V, PAIRS>(xa, xb), team_log2),
                             head_dim, eps);
    if (live) {
      const int tk = (int)(r.token - t0) * half;
      const float *sw = s_w + (r.second ? head_dim : 0);
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int g = t + team * k;
        if (g >= half / V) break;  /* so are the rest */
        const vecn<float, V> c = load_vec<float, V>(s_cos + tk, g, true);
        const vecn<float, V> s = load_vec<float, V>(s_sin + tk, g, true);
        const vecn<float, V> wa = load_vec<float, V>(sw, g, true);
        const vecn<float, V> wb = load_vec<float, V>(sw + half, g, true);
        float oa[V], ob[V];
#pragma unroll
        for (int e = 0; e < V; e++) {
          const float na = __fmul_rn(__fmul_rn(load_f(&xa[k].v[e]), rs), wa.v[e]);
          const float nb = __fmul_rn(__fmul_rn(load_f(&xb[k].v[e]), rs), wb.v[e]);
          oa[e] = __fadd_rn(__fmul_rn(na, c.v[e]), __fmul_rn(-nb, s.v[e]));
          ob[e] = __fadd_rn(__fmul_rn(nb, c.v[e]), __fmul_rn(na, s.v[e]));
        }
        const size_t i = r.row * (head_dim / V) + g;
        store_vec<T, V>(r.out, i, oa);
        store_vec<T, V>(r.out, i + half / V, ob);
      }
    }
    __syncthreads();   /* the next step's rotations overwrite these */
  }
}

/* One launch for the tensors (see qk_row_of). The layout (qk_layout_of) follows head_dim and
 * the vector path alone, and so does a row's arithmetic; two tensors that would take different
 * paths (one not 16-byte aligned), whose sums of squares would then group differently, get a
 * launch each. At decoding's shapes (1-4 tokens of 32 + 8 heads of 128, bf16: steps of 32 rows)
 * that is 40-160 rows, 2-5 blocks of one step each (one token: q's 32 rows, then k's 8). */
template <typename T>
static void qk_norm_rope_forward_launch(void *const *out, const void *const *x,
                                        const float *const *w, const int *heads, int count,
                                        const int32_t *positions, const inv_freq_table &inv,
                                        int n, int head_dim, float eps) {
  constexpr int VW = VEC_OF(T);
  const int half = head_dim / 2;
  const bool vec = vec_path<T>(half, out[0], x[0]);
  if (count == 2 && vec != vec_path<T>(half, out[1], x[1])) {
    for (int c = 0; c < 2; c++)
      qk_norm_rope_forward_launch<T>(out + c, x + c, w + c, heads + c, 1, positions, inv, n,
                                     head_dim, eps);
    return;
  }
  qk_tensors<T> qk = {};
  for (int c = 0; c < count; c++) {
    qk.out[c] = (T *)out[c], qk.x[c] = (const T *)x[c], qk.w[c] = w[c];
    qk.heads[c] = heads[c] > 0 ? heads[c] : 0;   /* none: no rows, its pointers never read */
  }
  const int all = qk.heads[0] + qk.heads[1];
  if (all == 0) return;
  const qk_layout l = qk_layout_of<T>(head_dim, all, vec);
  const size_t rows = (size_t)n * all;
  size_t blocks = (rows + l.step - 1) / l.step;
  if (blocks > 65535u * 16) blocks = 65535u * 16;
  auto *kernel = l.vec           ? qk_norm_rope_forward_kernel<T, VW, 1>
                 : l.pairs == 1 ? qk_norm_rope_forward_kernel<T, 1, 1>
                                : qk_norm_rope_forward_kernel<T, 1, 4>;
  CUDA_LAUNCH_PDL("qk_norm_rope_forward_kernel", kernel, dim3((unsigned)blocks),
                  dim3(QK_WARPS * 32), 2 * head_dim * sizeof(float) + l.rope_bytes, qk.out[0],
                  qk.out[1], qk.x[0], qk.x[1], qk.w[0], qk.w[1], qk.heads[0], qk.heads[1],
                  positions, inv, rows, head_dim, l.team_log2, eps);
}

extern "C" void cuda_qk_norm_rope_forward(void *const *out, const void *const *x,
                                          const float *const *w, const int *heads, int count,
                                          const int32_t *positions, int n, int head_dim,
                                          float eps, double theta) {
  struct inv_freq_table inv;
  rope_setup(&inv, head_dim, theta);   /* dies on a head_dim it cannot take */
  if (count < 1 || count > 2)
    cuda_fail("qk_norm_rope", "1 or 2 tensors a call", __FILE__, __LINE__);
  if (n <= 0) return;
  CUDA_ACT_DISPATCH(T, qk_norm_rope_forward_launch<T>(out, x, w, heads, count, positions, inv, n,
                                                      head_dim, eps));
}

/* Rows per block of the backward: about QK_BWD_BLOCKS blocks, a multiple of 32 rows (a step of
 * head_dim 128 in bf16). A function of the shape only: the chunks are the weight gradient's
 * summation tree. */
static size_t qk_rows_per_block(size_t rows) {
  const size_t r = (rows + QK_BWD_BLOCKS - 1) / QK_BWD_BLOCKS;
  return (r + 31) / 32 * 32;
}

/* The backward: block b takes the rows [b rpb, (b+1) rpb), a step at a time. Per row: r = rstd;
 * rope_backward turns dout into dxn; when dx != NULL, g = dxn * w and
 * dx (+)= (float)(r g - x r³ Σ(g x) / head_dim) (acc: added, else dx is not read). Each lane adds
 * the weight gradient's terms (double)dxn_j * (x_j * r) of its columns over its rows in order;
 * then a butterfly adds the teams' sums, and the block the warps' in warp order, into
 * partial[b, head_dim]. dxn is computed twice, for Σ(g x) and after it, rather than held in
 * registers across the sum. */
template <typename T, int V, int PAIRS>
static __global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_backward_kernel(T *__restrict__ dx, double *__restrict__ partial,
                                 const T *__restrict__ dout, const T *__restrict__ x,
                                 const float *__restrict__ w,
                                 const int32_t *__restrict__ positions, inv_freq_table inv,
                                 size_t rows, size_t rpb, int heads, int head_dim, int team_log2,
                                 float eps, bool acc) {
  /* the warps' dw sums [QK_WARPS, head_dim], then the cos and sin of the step's tokens */
  extern __shared__ __align__(16) double s_dw[];
  pdl_wait();
  pdl_release();
  const int half = head_dim / 2, team = 1 << team_log2, t = threadIdx.x & (team - 1);
  const int step = QK_WARPS * 32 >> team_log2, mine = threadIdx.x >> team_log2;
  float *s_rope = (float *)(s_dw + QK_WARPS * head_dim);
  float wa[PAIRS][V], wb[PAIRS][V];
  double dwa[PAIRS][V], dwb[PAIRS][V];
  load_pair_weights<V, PAIRS>(wa, wb, w, head_dim, t, team);
#pragma unroll
  for (int k = 0; k < PAIRS; k++) {
#pragma unroll
    for (int e = 0; e < V; e++) dwa[k][e] = dwb[k][e] = 0.0;
  }
  const size_t first = (size_t)blockIdx.x * rpb, end = first + rpb < rows ? first + rpb : rows;
  for (size_t base = first; base < end; base += step) {
    const size_t row = base + mine, last = base + step < end ? base + step : end;
    const bool live = row < end;
    vecn<T, V> xa[PAIRS], xb[PAIRS], da[PAIRS], db[PAIRS], oa[PAIRS], ob[PAIRS];
    load_pairs<T, V, PAIRS>(xa, xb, x, row, head_dim, t, team, live);
    load_pairs<T, V, PAIRS>(da, db, dout, row, head_dim, t, team, live);
    load_pairs<T, V, PAIRS>(oa, ob, dx, row, head_dim, t, team, live && acc);
    const size_t t0 = token_of(base, heads);
    const int tokens = (int)(token_of(last - 1, heads) - t0) + 1;
    float *s_cos = s_rope, *s_sin = s_rope + tokens * half;
    rope_step_tables(s_cos, s_sin, positions, inv, t0, tokens, half);
    __syncthreads();
    const int tk = live ? (int)(token_of(row, heads) - t0) * half : 0;
    double gx = 0.0;
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
      const int g = t + team * k;
      if (g >= half / V) break;  /* so are the rest */
      const vecn<float, V> c = load_vec<float, V>(s_cos + tk, g, true);
      const vecn<float, V> s = load_vec<float, V>(s_sin + tk, g, true);
#pragma unroll
      for (int e = 0; e < V; e++) {
        float na, nb;
        rope_backward(&na, &nb, load_f(&da[k].v[e]), load_f(&db[k].v[e]), c.v[e], s.v[e]);
        gx += (double)__fmul_rn(na, wa[k][e]) * load_f(&xa[k].v[e]);
        gx += (double)__fmul_rn(nb, wb[k][e]) * load_f(&xb[k].v[e]);
      }
    }
    const float r = rstd_of(team_sum_double(pair_sum_squares<T, V, PAIRS>(xa, xb), team_log2),
                            head_dim, eps);
    gx = team_sum_double(gx, team_log2);
    if (live) {
      const double cc = gx * r * r * r / head_dim;
#pragma unroll
      for (int k = 0; k < PAIRS; k++) {
        const int g = t + team * k;
        if (g >= half / V) break;
        const vecn<float, V> c = load_vec<float, V>(s_cos + tk, g, true);
        const vecn<float, V> s = load_vec<float, V>(s_sin + tk, g, true);
        float ga[V], gb[V];
#pragma unroll
        for (int e = 0; e < V; e++) {
          const float xva = load_f(&xa[k].v[e]), xvb = load_f(&xb[k].v[e]);
          float na, nb;
          rope_backward(&na, &nb, load_f(&da[k].v[e]), load_f(&db[k].v[e]), c.v[e], s.v[e]);
          dwa[k][e] += (double)na * (double)__fmul_rn(xva, r);
          dwb[k][e] += (double)nb * (double)__fmul_rn(xvb, r);
          ga[e] = __fadd_rn(load_f(&oa[k].v[e]), dx_term(r, __fmul_rn(na, wa[k][e]), cc, xva));
          gb[e] = __fadd_rn(load_f(&ob[k].v[e]), dx_term(r, __fmul_rn(nb, wb[k][e]), cc, xvb));
        }
        if (dx) {
          const size_t i = row * (head_dim / V) + g;
          store_vec<T, V>(dx, i, ga);
          store_vec<T, V>(dx, i + half / V, gb);
        }
      }
    }
    __syncthreads();   /* the next step's rotations overwrite these */
  }
  /* the warp's teams hold the same columns: a butterfly over the team bits of the lane */
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    if (m < team) continue;
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
#pragma unroll
      for (int e = 0; e < V; e++) {
        dwa[k][e] += __shfl_xor_sync(0xffffffffu, dwa[k][e], m);
        dwb[k][e] += __shfl_xor_sync(0xffffffffu, dwb[k][e], m);
      }
    }
  }
  double *sw = s_dw + (threadIdx.x >> 5) * head_dim;
  if ((threadIdx.x & 31) < team) {
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
      const int g = t + team * k;
      if (g >= half / V) break;
#pragma unroll
      for (int e = 0; e < V; e++) {
        sw[V * g + e] = dwa[k][e];
        sw[half + V * g + e] = dwb[k][e];
      }
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
    double sum = 0.0;
    for (int wp = 0; wp < QK_WARPS; wp++) sum += s_dw[wp * head_dim + j];
    partial[(size_t)blockIdx.x * head_dim + j] = sum;
  }
}

template <typename T>
static void qk_norm_rope_backward_launch(T *dx, float *dw, const T *dout, const T *x,
                                         const float *w, const int32_t *positions,
                                         const inv_freq_table &inv, size_t rows, int heads,
                                         int head_dim, float eps, int acc) {
  constexpr int VW = VEC_OF(T);
  const qk_layout l = qk_layout_of<T>(head_dim, heads, vec_path<T>(head_dim / 2, dx, dout, x));
  const size_t rpb = qk_rows_per_block(rows), blocks = (rows + rpb - 1) / rpb;
  double *partial = (double *)cuda_scratch(blocks * head_dim * sizeof(double),
                                           "qk_norm_rope_backward");
  auto *kernel = l.vec           ? qk_norm_rope_backward_kernel<T, VW, 1>
                 : l.pairs == 1 ? qk_norm_rope_backward_kernel<T, 1, 1>
                                : qk_norm_rope_backward_kernel<T, 1, 4>;
  CUDA_LAUNCH_PDL("qk_norm_rope_backward_kernel", kernel, dim3((unsigned)blocks),
                  dim3(QK_WARPS * 32), QK_WARPS * head_dim * sizeof(double) + l.rope_bytes, dx,
                  partial, dout, x, w, positions, inv, rows, rpb, heads, head_dim, l.team_log2,
                  eps, dx != NULL && (acc & ACC_DX) != 0);
  dw_finalize(dw, partial, (int)blocks, head_dim, acc);
}

extern "C" void cuda_qk_norm_rope_backward(void *dx, float *dw, const void *dout, const void *x,
                                           const float *w, const int32_t *positions, int n,
                                           int heads, int head_dim, float eps, double theta,
                                           int acc) {
  struct inv_freq_table inv;
  rope_setup(&inv, head_dim, theta);   /* dies on a head_dim it cannot take */
  if (n <= 0 || heads <= 0) return zero_dw_of_no_rows(dw, head_dim, acc);
  CUDA_ACT_DISPATCH(T, qk_norm_rope_backward_launch((T *)dx, dw, (const T *)dout, (const T *)x,
                                                    w, positions, inv, (size_t)n * heads, heads,
                                                    head_dim, eps, acc));
}
