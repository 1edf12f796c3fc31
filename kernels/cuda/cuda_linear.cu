/* The GEMM-based ops of the CUDA backend: linear forward/backward (the CPU backend's three
 * GEMMs, through cuda_gemm, on cuda_ctx.act operands) and the LM head fused with cross-entropy
 * (cuda_lm_head_loss), which works through the rows in chunks so the [n, vocab] logits never
 * exist whole.
 *
 * lm_head_loss, per chunk of rows [r0, r0 + m):
 *   logits [m, vocab] fp32 = x[r0:r0+m] · wᵀ                  (scratch buffer, beta 0)
 *   one block per row: max, sum of expf(l - max) in double, nll = max + log(sum) - l[target],
 *     written straight into the caller's device array; with gradients wanted the row's
 *     softmax - onehot(target) goes to dlogits
 *   dx[r0:r0+m] += grad_scale · dlogits · w                  (beta 1, straight into dx's rows)
 *   dw          += grad_scale · dlogitsᵀ · x[r0:r0+m]         (beta 1, fp32)
 * dlogits is stored as the activations are, because both backward GEMMs pair it with an
 * activation-typed operand (w or x) and cuBLASLt needs A and B of one type: in the fp32 and tf32
 * modes it overwrites the logits in place, in the bf16 mode it is a second, bf16 buffer next to
 * the fp32 logits. grad_scale stays the GEMMs' alpha in both modes, so bf16 rounds
 * softmax - onehot itself, never its product with a tiny scale.
 * Unlike the CPU backend, masked rows (target < 0) are not compacted away: they go through the
 * logits GEMM like the others, then get nll 0 and an all-zero dlogits row, so they add exactly
 * nothing to dx and dw. The chunk's row count comes from the scratch arena's size (see
 * loss_chunk_rows). Nothing synchronizes: the nll stays on the device for the engine to read.
 * A target >= vocab (the CPU backend dies on it; shards are checked against the vocabulary when
 * read) cannot be reported without a synchronization, so its row gets nll NaN and no gradient:
 * the step's loss is then NaN, and the trainer stops on a non-finite loss. */
#include <float.h>
#include <math.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_reduce.cuh"

/* ---------------------------------------------------------------- linear */

/* Decode's linear layers: a few token rows against a whole weight matrix. cuBLASLt's GEMM
 * tiles give such a product one block per 128 output rows or so, too few to keep the memory
 * busy (measured on the H200 at Qwen3-4B's shapes, one token: 0.6 TB/s of its 4.3 for the
 * q/k/v weights); here one warp reads one weight row with 16-byte loads, GEMV_UNROLL of them in
 * flight per lane, so every SM streams weights, and each row's n dot products come out of it.
 * Per row the lanes sum strided slices in fp32 and combine them by a fixed butterfly: the same
 * bits every run. Each more token costs the kernel about 30% of its one-token time (its x
 * loads, conversions and FMAs), so it is taken for n <= GEMV_MAX_ROWS (measured per layer with
 * synchronizations, bench/NOTES.md: q/k/v 30 us at one token against cuBLASLt's 54; 90 us at
 * eight against cuBLASLt's 59 at 32), when in_dim is a multiple of a 16-byte vector and x and
 * w are 16-byte aligned; cuBLASLt otherwise. */
#define GEMV_MAX_ROWS 4
#define GEMV_WARPS 8   /* output rows per block */
#define GEMV_UNROLL 4

template <typename T>
struct gemv_vec {   /* 16 bytes of T, unpacked to fp32 */
  static constexpr int N = 16 / sizeof(T);
  float f[N];
  __device__ __forceinline__ void load(const T *p) {
    const uint4 u = *(const uint4 *)p;
    const T *t = (const T *)&u;
#pragma unroll
    for (int i = 0; i < N; i++) f[i] = load_f(&t[i]);
  }
};

template <typename T>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(T *__restrict__ out, const T *__restrict__ x, const T *__restrict__ w, int n,
                int in_dim, int out_dim) {
  constexpr int V = gemv_vec<T>::N, STEP = 32 * V;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
  if (row >= out_dim) return;
  const T *wr = w + (size_t)row * in_dim;
  float acc[GEMV_MAX_ROWS];
#pragma unroll
  for (int t = 0; t < GEMV_MAX_ROWS; t++) acc[t] = 0.0f;
  int c = lane * V;
  for (; c + (GEMV_UNROLL - 1) * STEP < in_dim; c += GEMV_UNROLL * STEP) {
    gemv_vec<T> wv[GEMV_UNROLL];   /* every load issued before the first is used */
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) wv[u].load(wr + c + u * STEP);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
      for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        if (t >= n) break;
        gemv_vec<T> xv;
        xv.load(x + (size_t)t * in_dim + c + u * STEP);
#pragma unroll
        for (int i = 0; i < V; i++) acc[t] = fmaf(wv[u].f[i], xv.f[i], acc[t]);
      }
  }
  for (; c < in_dim; c += STEP) {
    gemv_vec<T> wv;
    wv.load(wr + c);
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
      if (t >= n) break;
      gemv_vec<T> xv;
      xv.load(x + (size_t)t * in_dim + c);
#pragma unroll
      for (int i = 0; i < V; i++) acc[t] = fmaf(wv.f[i], xv.f[i], acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < GEMV_MAX_ROWS; t++) {
    if (t >= n) break;
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) store_f(out + (size_t)t * out_dim + row, v);
  }
}

template <typename T>
static void gemv(T *out, const T *x, const T *w, int n, int in_dim, int out_dim) {
  gemv_kernel<T><<<(out_dim + GEMV_WARPS - 1) / GEMV_WARPS, GEMV_WARPS * 32, 0,
                   cuda_ctx.stream>>>(out, x, w, n, in_dim, out_dim);
  CUDA_LAUNCHED("gemv_kernel");
}

extern "C" void cuda_linear_forward(void *out, const void *x, const void *w, int n, int in_dim,
                                    int out_dim) {
  if (n == 0) return;
  enum dtype act = cuda_ctx.act;
  /* out [n, out_dim] = x [n, in_dim] · w [out_dim, in_dim]ᵀ */
  if (n <= GEMV_MAX_ROWS && in_dim % (int)(16 / dtype_bytes(act)) == 0 && cuda_aligned16(x) &&
      cuda_aligned16(w)) {
    CUDA_ACT_DISPATCH(T, gemv<T>((T *)out, (const T *)x, (const T *)w, n, in_dim, out_dim));
    return;
  }
  cuda_gemm(0, 1, n, out_dim, in_dim, 1.0f, x, in_dim, w, in_dim, 0.0f, out, out_dim, act, act);
}

extern "C" void cuda_linear_backward(void *dx, float *dw, const void *dout, const void *x,
                                     const void *w, int n, int in_dim, int out_dim) {
  if (n == 0) return;
  enum dtype act = cuda_ctx.act;
  /* dx [n, in_dim] += dout [n, out_dim] · w [out_dim, in_dim] */
  if (dx)
    cuda_gemm(0, 0, n, in_dim, out_dim, 1.0f, dout, out_dim, w, in_dim, 1.0f, dx, in_dim, act,
              act);
  /* dw [out_dim, in_dim] += dout [n, out_dim]ᵀ · x [n, in_dim], accumulated in fp32 */
  if (dw)
    cuda_gemm(1, 0, out_dim, in_dim, n, 1.0f, dout, out_dim, x, in_dim, 1.0f, dw, in_dim, act,
              DT_F32);
}

/* ---------------------------------------------------------------- lm_head_loss */

#define LOSS_THREADS 512          /* threads per row block; a multiple of 32, at most 1024 */
#define LOSS_MAX_CHUNK_ROWS 4096  /* rows per chunk at most */

/* The block-wide max in a fixed order (warp shuffles, then warp 0 over the warp results); every
 * thread gets the result. `shared` holds one value per warp. */
static __device__ float block_max(float v, float *shared) {
  for (int o = 16; o > 0; o >>= 1) {
    float u = __shfl_down_sync(0xffffffffu, v, o);
    if (u > v) v = u;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : -FLT_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      float u = __shfl_down_sync(0xffffffffu, v, o);
      if (u > v) v = u;
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads(); /* shared may be reused right after */
  return v;
}

/* One block per row of the chunk (rows row0 .. row0 + gridDim.x - 1 of the whole batch). The
 * arithmetic is the CPU backend's row_loss: float max, float e = expf(l - max), double sum,
 * nll = (double)max + log(sum) - target_logit, and dlogits = e * (float)(1/sum), minus 1 at the
 * target, stored as T. dlogits == NULL: no gradient wanted. dlogits may be the logits themselves
 * (T float): each thread writes only the elements it has just read, after the last read of the
 * row by any other thread (the target logit, before block_max's barriers). e is computed again
 * in the last pass rather than kept, which gives the same float and lets dlogits be a narrower
 * type than the logits. Rows with target < 0 get nll 0, rows with a target >= vocab nll NaN; both
 * get a zero dlogits row. */
template <typename T>
static __global__ void lm_loss_rows_kernel(const float *logits, T *dlogits, float *nll,
                                           const int32_t *targets, int row0, int vocab) {
  __shared__ float s_max[32];
  __shared__ double s_sum[32];
  __shared__ float s_target_logit;
  int row = row0 + (int)blockIdx.x;
  size_t offset = (size_t)blockIdx.x * (size_t)vocab;
  const float *l = logits + offset;
  T *dl = dlogits ? dlogits + offset : NULL;
  int t = targets[row];
  if (t < 0 || t >= vocab) { /* uniform over the block */
    if (threadIdx.x == 0) nll[row] = t < 0 ? 0.0f : CUDART_NAN_F;
    if (dl)
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) store_f(dl + j, 0.0f);
    return;
  }
  if (threadIdx.x == 0) s_target_logit = l[t];

  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    float v = l[j];
    if (v > mx) mx = v;
  }
  mx = block_max(mx, s_max); /* its barriers also publish s_target_logit */

  double sum = 0.0;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += (double)expf(l[j] - mx);
  sum = block_sum_double(sum, s_sum);

  if (threadIdx.x == 0) nll[row] = (float)((double)mx + log(sum) - (double)s_target_logit);
  if (dl) {
    float inv_sum = (float)(1.0 / sum);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      float p = expf(l[j] - mx) * inv_sum;
      if (j == t) p -= 1.0f;
      store_f(dl + j, p);
    }
  }
}

/* Rows per chunk: as many rows of `row_bytes` as the scratch arena holds (less some alignment
 * slack), at most LOSS_MAX_CHUNK_ROWS and at most n, rounded down to a multiple of 64 when that
 * still leaves at least 64 and the chunk does not take every row. At least 1 (if even one row
 * does not fit, cuda_scratch2 dies naming the op). */
static int loss_chunk_rows(int n, size_t row_bytes) {
  size_t slack = 1024;
  size_t avail = cuda_ctx.scratch_bytes > slack ? cuda_ctx.scratch_bytes - slack : 0;
  size_t rows = avail / row_bytes;
  if (rows > LOSS_MAX_CHUNK_ROWS) rows = LOSS_MAX_CHUNK_ROWS;
  if (rows > (size_t)n) rows = (size_t)n;
  if (rows >= 64 && rows < (size_t)n) rows -= rows % 64;
  if (rows < 1) rows = 1;
  return (int)rows;
}

extern "C" void cuda_lm_head_loss(float *nll, void *dx, float *dw, const void *x, const void *w,
                                  const int32_t *targets, int n, int dim, int vocab,
                                  float grad_scale) {
  if (n <= 0) return;
  if (vocab <= 0) {
    char detail[64];
    snprintf(detail, sizeof detail, "vocab %d", vocab);
    cuda_fail("cuda_lm_head_loss", detail, __FILE__, __LINE__);
  }
  enum dtype act = cuda_ctx.act;
  size_t act_bytes = dtype_bytes(act);
  int want_grad = dx != NULL;
  /* scratch: the chunk's fp32 logits, then (bf16 mode, with gradients) its bf16 dlogits */
  int separate = want_grad && act != DT_F32;
  size_t row_bytes = (size_t)vocab * (sizeof(float) + (separate ? act_bytes : 0));
  int rows = loss_chunk_rows(n, row_bytes);
  void *logits_buf = NULL, *dlogits_buf = NULL;
  cuda_scratch2(&logits_buf, (size_t)rows * (size_t)vocab * sizeof(float), &dlogits_buf,
                separate ? (size_t)rows * (size_t)vocab * act_bytes : 0,
                "lm_head_loss logits chunk");
  float *logits = (float *)logits_buf;
  void *dlogits = !want_grad ? NULL : separate ? dlogits_buf : logits_buf;

  for (int r0 = 0; r0 < n; r0 += rows) {
    int m = n - r0 < rows ? n - r0 : rows;
    const void *xc = (const char *)x + (size_t)r0 * (size_t)dim * act_bytes;
    /* logits [m, vocab] = x_chunk [m, dim] · w [vocab, dim]ᵀ, in fp32 */
    cuda_gemm(0, 1, m, vocab, dim, 1.0f, xc, dim, w, dim, 0.0f, logits, vocab, act, DT_F32);
    CUDA_ACT_DISPATCH(T, lm_loss_rows_kernel<T><<<m, LOSS_THREADS, 0, cuda_ctx.stream>>>(
                             logits, (T *)dlogits, nll, targets, r0, vocab));
    CUDA_LAUNCHED("lm_loss_rows_kernel");
    if (!want_grad) continue;
    /* dx_chunk [m, dim] += grad_scale · dlogits [m, vocab] · w [vocab, dim] */
    cuda_gemm(0, 0, m, dim, vocab, grad_scale, dlogits, vocab, w, dim, 1.0f,
              (char *)dx + (size_t)r0 * (size_t)dim * act_bytes, dim, act, act);
    /* dw [vocab, dim] += grad_scale · dlogits [m, vocab]ᵀ · x_chunk [m, dim], in fp32 */
    if (dw)
      cuda_gemm(1, 0, vocab, dim, m, grad_scale, dlogits, vocab, xc, dim, 1.0f, dw, dim, act,
                DT_F32);
  }
}
