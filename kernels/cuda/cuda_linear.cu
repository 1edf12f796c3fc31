/* The GEMM-based ops of the CUDA backend: linear forward/backward (the CPU backend's three
 * GEMMs, through cuda_gemm, on cuda_ctx.act operands; decoding's few rows through the GEMV
 * below, which also serves nvfp4_gemv_packed) and the LM head fused with cross-entropy
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
#include "kernels/cuda/cuda_gemv.cuh"
#include "kernels/cuda/cuda_reduce.cuh"

/* ---------------------------------------------------------------- linear */

/* The decoding GEMV: its description and weight formats are in cuda_gemv.cuh. */

/* The matrices of one launch; row r of the launch is row r - end[j-1] of matrix j, the first j
 * with r < end[j]. */
template <class F>
struct gemv_mats {
  typename F::mat w[GEMV_MAX_MATS];
  typename F::act *out[GEMV_MAX_MATS];
  int end[GEMV_MAX_MATS];
  int count;
};

/* A lane issues a batch of GEMV_UNROLL weight loads, then uses them; its first batch before
 * pdl_wait. At 16 lanes a row (LPR, gemv_lanes_per_row) NVFP4's batch (F::PART) is one load
 * more: a row of 2560 columns (5 loads a lane) is then one batch, all in flight before
 * pdl_wait, where a batch of 4 left the fifth to be issued, and waited for, after the first
 * four were used (gate|up 10.3 -> 9.9 us, decoding 2.5% faster; 62 registers at R = 1, 78 at
 * R = 4: as many blocks an SM as before; bench/NOTES.md, session 20; 64 at R = 1 since the
 * sign-split decode, still four blocks an SM). The dense kernels keep their 4 (no Qwen3 shape
 * reads 16 lanes a row of them; 5 took bf16's to 60 registers). (Holding a second batch in
 * flight while using the first took 84 registers against 46 and streamed slower under ncu.) The
 * matrix of a row is picked with constant indices: a variable index copies the parameters to
 * local memory, and the weight loads through those pointers then left the read-only path and
 * serialized. R: the most token rows the instantiation takes (1 for F::ONE_ROW at n = 1, else
 * GEMV_MAX_ROWS): at R = 1 the rows loop is gone, and with it the x loads the compiler hoisted
 * for rows that do not exist (the NVFP4 kernel at 32 lanes: 58 registers, 64 with the
 * sign-split decode, four blocks an SM; 76 at R = 4, three, as its dot_rows decodes a word once
 * for all the token rows; with its fp32 dot it took 100-108 there, two blocks; the dense
 * kernels gain little, 48 to 40, and stay at R = 4). The NVFP4 kernel at R = 4 asks for three
 * blocks an SM: left to itself ptxas held some of its instantiations at 64 registers with 24-32
 * bytes of spills. Every other instantiation has no minimum (0): any minimum, even 1, let ptxas
 * take 52-56 registers for the dense kernels, and BF16 decoding was 3% slower with them
 * (session 19). */
template <class F, int WPR, int R, int LPR>
static __global__ void __launch_bounds__(GEMV_WARPS * 32, F::ONE_ROW && R > 1 ? 3 : 0)
    gemv_kernel(gemv_mats<F> m, typename F::xin x, int n, int in_dim) {
  static_assert(LPR == 32 || (LPR == 16 && WPR == 1), "a row of several warps takes whole ones");
  typedef typename F::act T;
  constexpr int U = LPR == 16 && F::PART ? GEMV_UNROLL + 1 : GEMV_UNROLL;
  constexpr int STRIDE = WPR * LPR * F::N;
  __shared__ float warp_sums[GEMV_WARPS][R];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % WPR;
  const int row_lane = lane % LPR;   /* the lane's place among its row's lanes */
  const int row = (blockIdx.x * (GEMV_WARPS / WPR) + warp / WPR) * (32 / LPR) + lane / LPR;
  typename F::mat w = m.w[0];
  T *out = m.out[0];
  int first = 0, last_end = m.end[0];
#pragma unroll
  for (int k = 1; k < GEMV_MAX_MATS; k++)
    if (k < m.count && row >= m.end[k - 1]) {
      w = m.w[k], out = m.out[k], first = m.end[k - 1];
      last_end = m.end[k];
    }
  const bool live = row < last_end;
  const int r = row - first, out_dim = last_end - first;
  const typename F::row wr = F::row_of(w, in_dim, r);
  const int c0 = (part * LPR + row_lane) * F::N;
  typename F::chunk wb[U];
  if (live && (F::PART || c0 + (U - 1) * STRIDE < in_dim))
    gemv_fetch<F, F::PART>(wb, wr, c0, STRIDE, in_dim);
  pdl_wait();
  pdl_release();
  float acc[R];
#pragma unroll
  for (int t = 0; t < R; t++) acc[t] = 0.0f;
  int c = c0;
  for (; live && c + (U - 1) * STRIDE < in_dim; c += U * STRIDE) {
    if (c != c0) gemv_fetch<F, false>(wb, wr, c, STRIDE, in_dim);
    gemv_fma<F, false, U, R>(acc, wb, x, c, STRIDE, n, in_dim);
  }
  if (F::PART) {
    if (live && c < in_dim) {   /* the last batch, of fewer chunks */
      if (c != c0) gemv_fetch<F, true>(wb, wr, c, STRIDE, in_dim);
      gemv_fma<F, true, U, R>(acc, wb, x, c, STRIDE, n, in_dim);
    }
  } else {
    for (; live && c < in_dim; c += STRIDE) {   /* the last groups, fewer than a batch */
      typename F::chunk one[1];
      gemv_fetch<F, false>(one, wr, c, STRIDE, in_dim);
      gemv_fma<F, false, 1, R>(acc, one, x, c, STRIDE, n, in_dim);
    }
  }
#pragma unroll
  for (int t = 0; t < R; t++) {
    if (t >= n) break;
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
  }
  if (WPR == 1) {
    if (live && row_lane == 0)
#pragma unroll
      for (int t = 0; t < R; t++) {
        if (t >= n) break;
        store_f(out + (size_t)t * out_dim + r, F::finish(w, acc[t]));
      }
    return;
  }
  if (lane == 0)
#pragma unroll
    for (int t = 0; t < R; t++) warp_sums[warp][t] = acc[t];
  __syncthreads();
  if (live && part == 0 && lane < n) {
    T *const y = out + (size_t)lane * out_dim + r;
    float v = warp_sums[warp][lane];
#pragma unroll
    for (int p = 1; p < WPR; p++) v += warp_sums[warp + p][lane];
    store_f(y, F::finish(w, v));
  }
}

/* Warps per weight row: doubled from 1 while the launch has fewer warps than fill every SM
 * (64 each) and each warp keeps at least GEMV_UNROLL 16-byte loads of its row. A function of
 * the shape and the GPU only, so the sums' order is too. */
static int gemv_warps_per_row(int rows, int in_dim, int vec) {
  const int groups = in_dim / (32 * vec);   /* 16-byte loads of a row per lane, at one warp */
  int wpr = 1;
  while (wpr < GEMV_WARPS && (long)rows * wpr < 64L * cuda_ctx.sm_count &&
         groups / (2 * wpr) >= GEMV_UNROLL)
    wpr *= 2;
  return wpr;
}

/* Lanes per weight row: 16, two rows a warp, when a lane at 32 lanes a row would have fewer
 * of its row's 16-byte loads than GEMV_UNROLL (NVFP4's rows of 2560 columns, 2.5 loads a lane:
 * q|k|v and gate|up). ncu counted 415 instructions a warp at 32 lanes, a row's, of which the
 * 2.5 loads' decoding and dot products were about half: the rest its fixed costs (the matrix
 * and the addresses of a batch, x's loads, the butterfly, the store), and the third load ran
 * in half the lanes. Two rows a warp share those instructions (lanes l and l + 16 read the
 * same columns of x), and each lane's 5 loads run in every lane: 326 a row (bench/NOTES.md,
 * session 20). The shape's function too; warps per row then 1. */
static int gemv_lanes_per_row(int in_dim, int vec) {
  return in_dim / (32 * vec) < GEMV_UNROLL ? 16 : 32;
}

/* The type of format F's instantiations of gemv_kernel (taken from one: the host compiler keeps
 * gemv_dense's __restrict__ x in a pointer type written out, not in the kernel's) */
template <class F>
using gemv_kernel_ptr = decltype(&gemv_kernel<F, 1, GEMV_MAX_ROWS, 32>);

/* The instantiation of gemv_kernel for wpr warps a row (lpr lanes a row, 16 only at one warp)
 * and at most R token rows */
template <class F, int R>
static gemv_kernel_ptr<F> gemv_pick(int wpr, int lpr) {
  if (lpr == 16) return gemv_kernel<F, 1, R, 16>;
  return wpr == 1 ? gemv_kernel<F, 1, R, 32> : wpr == 2 ? gemv_kernel<F, 2, R, 32>
                   : wpr == 4 ? gemv_kernel<F, 4, R, 32> : gemv_kernel<F, 8, R, 32>;
}

/* One launch for the count matrices w[j] of one input, outs[j] [n, out_dims[j]]. */
template <class F>
static void gemv_launch(const typename F::mat *w, void *const *outs, const int *out_dims,
                        int count, typename F::xin x, int n, int in_dim) {
  gemv_mats<F> m = {};
  int rows = 0;
  for (int j = 0; j < count; j++) {
    m.w[j] = w[j];
    m.out[j] = (typename F::act *)outs[j];
    m.end[j] = rows += out_dims[j];
  }
  m.count = count;
  const int lpr = gemv_lanes_per_row(in_dim, F::N);
  const int wpr = lpr == 32 ? gemv_warps_per_row(rows, in_dim, F::N) : 1;
  const int rows_per_block = GEMV_WARPS / wpr * (32 / lpr);
  const dim3 grid((unsigned)((rows + rows_per_block - 1) / rows_per_block));
  gemv_kernel_ptr<F> kernel = gemv_pick<F, GEMV_MAX_ROWS>(wpr, lpr);
  if constexpr (F::ONE_ROW)
    if (n == 1) kernel = gemv_pick<F, 1>(wpr, lpr);
  CUDA_LAUNCH_PDL("gemv_kernel", kernel, grid, dim3(GEMV_WARPS * 32), 0, m, x, n, in_dim);
}

template <typename T>
static void gemv(void *const *outs, const T *x, const void *const *ws, const int *out_dims,
                 int count, int n, int in_dim) {
  typename gemv_dense<T>::mat w[GEMV_MAX_MATS];
  for (int j = 0; j < count; j++) w[j].w = (const T *)ws[j];
  gemv_launch<gemv_dense<T>>(w, outs, out_dims, count, x, n, in_dim);
}

extern "C" void cuda_linear_forward(void *const *outs, const void *x, const void *const *ws,
                                    const int *out_dims, int count, int n, int in_dim) {
  if (n == 0) return;
  enum dtype act = cuda_ctx.act;
  /* outs[j] [n, out_dims[j]] = x [n, in_dim] · ws[j] [out_dims[j], in_dim]ᵀ */
  int fits = n <= GEMV_MAX_ROWS && count <= GEMV_MAX_MATS &&
             in_dim % (int)(16 / dtype_bytes(act)) == 0 && cuda_aligned16(x);
  for (int j = 0; j < count; j++) fits = fits && cuda_aligned16(ws[j]) && out_dims[j] > 0;
  if (fits) {
    CUDA_ACT_DISPATCH(T, gemv<T>(outs, (const T *)x, ws, out_dims, count, n, in_dim));
    return;
  }
  for (int j = 0; j < count; j++)
    cuda_gemm(0, 1, n, out_dims[j], in_dim, 1.0f, x, in_dim, ws[j], in_dim, 0.0f, outs[j],
              out_dims[j], act, act);
}

extern "C" void cuda_linear_backward(void *dx, float *dw, const void *dout, const void *x,
                                     const void *w, int n, int in_dim, int out_dim, int acc) {
  /* no early return for n == 0: an overwritten dw is then zero (cuda_gemm's k == 0 case) */
  enum dtype act = cuda_ctx.act;
  /* dx [n, in_dim] (+)= dout [n, out_dim] · w [out_dim, in_dim] */
  if (dx)
    cuda_gemm(0, 0, n, in_dim, out_dim, 1.0f, dout, out_dim, w, in_dim,
              acc & ACC_DX ? 1.0f : 0.0f, dx, in_dim, act, act);
  /* dw [out_dim, in_dim] (+)= dout [n, out_dim]ᵀ · x [n, in_dim], accumulated in fp32 */
  if (dw)
    cuda_gemm(1, 0, out_dim, in_dim, n, 1.0f, dout, out_dim, x, in_dim,
              acc & ACC_DW ? 1.0f : 0.0f, dw, in_dim, act, DT_F32);
}

/* outs[j] [n, out_dims[j]] = (*dec_x * *dec_w[j]) * x · W_jᵀ from nvfp4_pack's codes and
 * scales, x as NVFP4_ROWS_INT's integer operand xq: the GEMV kernel on gemv_nvfp4, the count
 * matrices in one launch (rows numbered on, as linear_forward's), nothing allocated or
 * synchronized (graph capture records it as any kernel). Every matrix is checked before
 * anything runs. A 16-byte aligned xq and in_dim % 32 == 0 keep every load of x aligned: its
 * integers' 16 bytes, and its scales' pairs (s starts 16-byte aligned, a row's scales 8 bytes a
 * pair on from it). */
extern "C" void cuda_nvfp4_gemv_packed(void *const *outs, const void *xq, const float *dec_x,
                                       const uint8_t *const *codes,
                                       const uint8_t *const *scales, const float *const *dec_w,
                                       const int *out_dims, int count, int n, int in_dim) {
  static_assert(GEMV_MAX_ROWS == NVFP4_GEMV_MAX_ROWS, "the GEMV's rows are the op's");
  static_assert(GEMV_MAX_MATS == NVFP4_GEMV_MAX_MATS, "the GEMV's matrices are the op's");
  char detail[256];
  if (count < 1 || count > NVFP4_GEMV_MAX_MATS || n < 0 || n > NVFP4_GEMV_MAX_ROWS ||
      in_dim < 0 || in_dim % 32 || !cuda_aligned16(xq)) {
    snprintf(detail, sizeof detail,
             "%d matrices, n %d, in_dim %d, xq %p refused: 1 to %d matrices, n at most %d, "
             "in_dim a non-negative multiple of 32 (a 16-byte load of codes), xq 16-byte aligned",
             count, n, in_dim, xq, NVFP4_GEMV_MAX_MATS, NVFP4_GEMV_MAX_ROWS);
    cuda_fail("cuda_nvfp4_gemv_packed", detail, __FILE__, __LINE__);
  }
  int rows = 0;
  for (int j = 0; j < count; j++) {
    if (out_dims[j] < 0 || !cuda_aligned16(codes[j]) || ((uintptr_t)scales[j] & 1)) {
      snprintf(detail, sizeof detail,
               "matrix %d: out_dim %d, codes %p, scales %p refused: out_dim non-negative, codes "
               "16-byte aligned, scales 2-byte aligned", j, out_dims[j], codes[j], scales[j]);
      cuda_fail("cuda_nvfp4_gemv_packed", detail, __FILE__, __LINE__);
    }
    rows += out_dims[j];
  }
  if (n == 0 || rows == 0) return;
  CUDA_ACT_DISPATCH(T, {
    typename gemv_nvfp4<T>::mat w[GEMV_MAX_MATS];
    for (int j = 0; j < count; j++) w[j] = {codes[j], scales[j], dec_x, dec_w[j]};
    /* read only: gemv_i8_operand is also what the quantizers write through */
    gemv_launch<gemv_nvfp4<T>>(w, outs, out_dims, count,
                               gemv_i8_operand_at(const_cast<void *>(xq), n, in_dim), n, in_dim);
  });
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

/* Rows per chunk: the chunks as few as the scratch arena allows (it holds `fit` rows of
 * `row_bytes`, less some alignment slack, and a chunk takes at most LOSS_MAX_CHUNK_ROWS), and of
 * equal size (a last chunk of a few rows would cost a pass over dw like a full one), rounded up
 * to a multiple of 64 where that still fits. At least 1 (if even one row does not fit,
 * cuda_scratch2 dies naming the op). */
static int loss_chunk_rows(int n, size_t row_bytes) {
  size_t slack = 1024;
  size_t avail = cuda_ctx.scratch_bytes > slack ? cuda_ctx.scratch_bytes - slack : 0;
  size_t fit = avail / row_bytes;
  if (fit > LOSS_MAX_CHUNK_ROWS) fit = LOSS_MAX_CHUNK_ROWS;
  if (fit < 1) return 1;
  if (fit >= (size_t)n) return n;
  size_t chunks = ((size_t)n + fit - 1) / fit;
  size_t rows = ((size_t)n + chunks - 1) / chunks;
  size_t rounded = (rows + 63) / 64 * 64;
  return (int)(rounded <= fit ? rounded : rows);
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
