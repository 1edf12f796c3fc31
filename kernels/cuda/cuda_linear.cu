/* The GEMM-based ops of the CUDA backend: linear forward/backward (the CPU backend's three
 * GEMMs, through cuda_gemm) and the LM head fused with cross-entropy (cuda_lm_head_loss), which
 * works through the rows in chunks so the [n, vocab] logits never exist whole.
 *
 * lm_head_loss, per chunk of rows [r0, r0 + m):
 *   logits [m, vocab] = x[r0:r0+m] · wᵀ                      (scratch buffer, beta 0)
 *   one block per row: max, sum of expf(l - max) in double, nll = max + log(sum) - l[target];
 *     with gradients wanted the row is overwritten with softmax - onehot(target)
 *   dx[r0:r0+m] += grad_scale · dlogits · w                  (beta 1, straight into dx's rows)
 *   dw          += grad_scale · dlogitsᵀ · x[r0:r0+m]         (beta 1)
 * Unlike the CPU backend, masked rows (target < 0) are not compacted away: they go through the
 * logits GEMM like the others, then get nll 0 and an all-zero dlogits row, so they add exactly
 * nothing to dx and dw. The chunk's row count comes from the scratch arena's size (see
 * loss_chunk_rows). The per-row nll stays on the device until one copy back at the end, followed
 * by the op's one synchronization; a target >= vocab is flagged on the device and reported after
 * that synchronization, as the CPU backend reports it. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/cuda/cuda.h"

/* ---------------------------------------------------------------- linear */

extern "C" void cuda_linear_forward(float *out, const float *x, const float *w, int n, int in_dim,
                                    int out_dim) {
  if (n == 0) return;
  /* out [n, out_dim] = x [n, in_dim] · w [out_dim, in_dim]ᵀ */
  cuda_gemm(0, 1, n, out_dim, in_dim, 1.0f, x, in_dim, w, in_dim, 0.0f, out, out_dim);
}

extern "C" void cuda_linear_backward(float *dx, float *dw, const float *dout, const float *x,
                                     const float *w, int n, int in_dim, int out_dim) {
  if (n == 0) return;
  /* dx [n, in_dim] += dout [n, out_dim] · w [out_dim, in_dim] */
  if (dx) cuda_gemm(0, 0, n, in_dim, out_dim, 1.0f, dout, out_dim, w, in_dim, 1.0f, dx, in_dim);
  /* dw [out_dim, in_dim] += dout [n, out_dim]ᵀ · x [n, in_dim] */
  if (dw) cuda_gemm(1, 0, out_dim, in_dim, n, 1.0f, dout, out_dim, x, in_dim, 1.0f, dw, in_dim);
}

/* ---------------------------------------------------------------- lm_head_loss */

#define LOSS_THREADS 512          /* threads per row block; a multiple of 32, at most 1024 */
#define LOSS_MAX_CHUNK_ROWS 4096  /* rows per chunk at most */
#define LOSS_NO_BAD_ROW 0x7f7f7f7f /* the bad-row flag after cudaMemsetAsync(.., 0x7f, 4) */

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

/* Block-wide reductions in a fixed order (warp shuffles, then warp 0 over the warp results);
 * every thread gets the result. `shared` holds one value per warp. */
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

static __device__ double block_sum(double v, double *shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

/* One block per row of the chunk (rows row0 .. row0 + gridDim.x - 1 of the whole batch). The
 * arithmetic is the CPU backend's row_loss: float max, float e = expf(l - max), double sum,
 * nll = (double)max + log(sum) - target_logit, and dlogits = e * (float)(1/sum), minus 1 at the
 * target. Rows with target < 0, and rows with a target >= vocab (flagged in *bad_row, the
 * smallest such row), get nll 0 and a zero dlogits row. */
static __global__ void lm_loss_rows_kernel(float *logits, float *nll_rows, int *bad_row,
                                           const int32_t *targets, int row0, int vocab,
                                           int want_grad) {
  __shared__ float s_max[32];
  __shared__ double s_sum[32];
  __shared__ float s_target_logit;
  int row = row0 + (int)blockIdx.x;
  float *l = logits + (size_t)blockIdx.x * (size_t)vocab;
  int t = targets[row];
  if (t < 0 || t >= vocab) { /* uniform over the block */
    if (threadIdx.x == 0) {
      nll_rows[row] = 0.0f;
      if (t >= vocab) atomicMin(bad_row, row);
    }
    if (want_grad)
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) l[j] = 0.0f;
    return;
  }
  /* read before any thread overwrites the row (the writes follow block_max's barriers) */
  if (threadIdx.x == 0) s_target_logit = l[t];

  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    float v = l[j];
    if (v > mx) mx = v;
  }
  mx = block_max(mx, s_max);

  double sum = 0.0;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    float e = expf(l[j] - mx);
    sum += (double)e;
    if (want_grad) l[j] = e;
  }
  sum = block_sum(sum, s_sum); /* its barriers also publish s_target_logit */

  if (threadIdx.x == 0) nll_rows[row] = (float)((double)mx + log(sum) - (double)s_target_logit);
  if (want_grad) {
    float inv_sum = (float)(1.0 / sum);
    /* each thread rescales the same elements it wrote above */
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      float p = l[j] * inv_sum;
      if (j == t) p -= 1.0f;
      l[j] = p;
    }
  }
}

/* Rows per chunk: as many [vocab] fp32 rows as the scratch arena holds after `other_bytes` (and
 * some alignment slack), at most LOSS_MAX_CHUNK_ROWS and at most n, rounded down to a multiple of
 * 64 when that still leaves at least 64 and the chunk does not take every row. At least 1 (if
 * even one row does not fit, cuda_scratch2 dies naming the op). */
static int loss_chunk_rows(int n, int vocab, size_t other_bytes) {
  size_t row_bytes = (size_t)vocab * sizeof(float);
  size_t slack = other_bytes + 1024;
  size_t avail = cuda_ctx.scratch_bytes > slack ? cuda_ctx.scratch_bytes - slack : 0;
  size_t rows = avail / row_bytes;
  if (rows > LOSS_MAX_CHUNK_ROWS) rows = LOSS_MAX_CHUNK_ROWS;
  if (rows > (size_t)n) rows = (size_t)n;
  if (rows >= 64 && rows < (size_t)n) rows -= rows % 64;
  if (rows < 1) rows = 1;
  return (int)rows;
}

extern "C" void cuda_lm_head_loss(float *nll, float *dx, float *dw, const float *x,
                                  const float *w, const int32_t *targets, int n, int dim,
                                  int vocab, float grad_scale) {
  if (n <= 0) return;
  if (vocab <= 0) {
    char detail[64];
    snprintf(detail, sizeof detail, "vocab %d", vocab);
    cuda_fail("cuda_lm_head_loss", detail, __FILE__, __LINE__);
  }
  int want_grad = dx != NULL;
  /* scratch: [nll_rows: n floats][bad_row: one int] then the chunk's logits */
  size_t nll_bytes = round_up((size_t)n * sizeof(float), 256);
  size_t small_bytes = nll_bytes + 256;
  int rows = loss_chunk_rows(n, vocab, small_bytes);
  void *small = NULL, *big = NULL;
  cuda_scratch2(&small, small_bytes, &big, (size_t)rows * (size_t)vocab * sizeof(float),
                "lm_head_loss logits chunk");
  float *nll_rows = (float *)small;
  int *bad_row = (int *)((char *)small + nll_bytes);
  float *logits = (float *)big;
  CUDA_CHECK(cudaMemsetAsync(bad_row, 0x7f, sizeof(int), cuda_ctx.stream));

  for (int r0 = 0; r0 < n; r0 += rows) {
    int m = n - r0 < rows ? n - r0 : rows;
    const float *xc = x + (size_t)r0 * (size_t)dim;
    /* logits [m, vocab] = x_chunk [m, dim] · w [vocab, dim]ᵀ */
    cuda_gemm(0, 1, m, vocab, dim, 1.0f, xc, dim, w, dim, 0.0f, logits, vocab);
    lm_loss_rows_kernel<<<m, LOSS_THREADS, 0, cuda_ctx.stream>>>(logits, nll_rows, bad_row,
                                                                  targets, r0, vocab, want_grad);
    CUDA_LAUNCHED("lm_loss_rows_kernel");
    if (!want_grad) continue;
    /* dx_chunk [m, dim] += grad_scale · dlogits [m, vocab] · w [vocab, dim] */
    cuda_gemm(0, 0, m, dim, vocab, grad_scale, logits, vocab, w, dim, 1.0f,
              dx + (size_t)r0 * (size_t)dim, dim);
    /* dw [vocab, dim] += grad_scale · dlogits [m, vocab]ᵀ · x_chunk [m, dim] */
    if (dw) cuda_gemm(1, 0, vocab, dim, m, grad_scale, logits, vocab, xc, dim, 1.0f, dw, dim);
  }

  /* the flag through the pinned result buffer (it holds at least one double); the nll straight
   * into the caller's (pageable) array: correct for pageable memory once the stream is synced */
  int bad_local = LOSS_NO_BAD_ROW;
  int *bad_host = cuda_ctx.host_result ? (int *)cuda_ctx.host_result : &bad_local;
  CUDA_CHECK(cudaMemcpyAsync(bad_host, bad_row, sizeof(int), cudaMemcpyDeviceToHost,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaMemcpyAsync(nll, nll_rows, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  int bad = *bad_host;
  if (bad != LOSS_NO_BAD_ROW) {
    int32_t target = 0;
    CUDA_CHECK(cudaMemcpyAsync(&target, targets + bad, sizeof target, cudaMemcpyDeviceToHost,
                               cuda_ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
    char detail[128];
    snprintf(detail, sizeof detail, "lm_head_loss: target %d outside vocab %d (row %d)",
             (int)target, vocab, bad);
    cuda_fail("cuda_lm_head_loss", detail, __FILE__, __LINE__);
  }
}
