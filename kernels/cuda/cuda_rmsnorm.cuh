/* The RMSNorm forward's pieces (cuda_norm.cu's rmsnorm_forward_kernel), shared with the fused
 * decode kernels (cuda_nvfp4.cu), which normalize a row themselves: a row's values spread over a
 * block as the forward kernel spreads them (thread t holds values t C .. t C + C - 1, C =
 * RMS_STEP_VALUES / R), so the double sum of squares, and every bit after it, is the same. */
#ifndef QWEN3_CUDA_RMSNORM_CUH
#define QWEN3_CUDA_RMSNORM_CUH

#include <stddef.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_reduce.cuh"

/* A block takes R rows at a time (a step): their loads are in flight together and their sums
 * are reduced together. Each thread holds RMS_STEP_VALUES values of each tensor a step reads,
 * C = 16 / R of each row: thread t the values t C .. t C + C-1, as PER = C / V vectors. R = 2 up
 * to dim 4096, else 1, so a block has at most 512 threads and dim is at most 8192 (a row lives
 * in one block's registers). R = 2 keeps twice the bytes in flight for the registers a thread
 * holds (not measured against R = 1). */
#define RMS_STEP_VALUES 16
#define RMS_MAX_THREADS 512

static inline int rms_rows_at_once(int dim) {
  if (dim > RMS_STEP_VALUES * RMS_MAX_THREADS)
    cuda_fail("rmsnorm", "dim must be at most 8192 (a row lives in one block's registers)",
              __FILE__, __LINE__);
  return dim <= RMS_STEP_VALUES / 2 * RMS_MAX_THREADS ? 2 : 1;
}

/* 1 / sqrt(mean(x²) + eps) from the row's sum of squares, as row_rstd does */
static __device__ __forceinline__ float rstd_of(double ss, int dim, float eps) {
  return (float)(1.0 / sqrt(ss / dim + (double)eps));
}

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

/* Row `row` of out = the thread's values of xr (a row of x, load_row's) * r * w (wv,
 * load_row_weights'), r the row's rstd, two products rounded in the CPU's order. */
template <typename T, int V, int PER>
static __device__ __forceinline__ void rms_row_store(T *out, size_t row, const vecn<T, V> *xr,
                                                     const float (*wv)[V], float r, int dim) {
#pragma unroll
  for (int k = 0; k < PER; k++) {
    const int v = threadIdx.x * PER + k;
    if (v >= dim / V) break;  /* so are the rest */
    float o[V];
#pragma unroll
    for (int e = 0; e < V; e++) o[e] = __fmul_rn(__fmul_rn(load_f(&xr[k].v[e]), r), wv[k][e]);
    store_vec<T, V>(out, row * (dim / V) + v, o);
  }
}

#endif
