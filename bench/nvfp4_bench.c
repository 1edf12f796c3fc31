/* NVFP4 quantization and GEMMs of the CUDA backend at Qwen3-4B's shapes (hidden 2560,
 * intermediate 9728), timed on device buffers:
 *
 *   build/bench/nvfp4_bench [--tokens N] [--repeats R]        (default: 2048 tokens, 50)
 *
 *  - cuda_nvfp4_quantize of each layout the linear recipe uses: NVFP4_ROWS of activations
 *    [N, 2560] and [N, 9728] (x in the activation dtype), NVFP4_COLS with the RHT of the same,
 *    NVFP4_TILES of fp32 master weights [9728, 2560] and [2560, 9728]; round to nearest and
 *    stochastic. Bytes moved by one call: the amax pass reads x, the quantize pass reads x
 *    and writes xq. Beside each, a cudaMemcpyAsync device to device moving the same bytes
 *    (half of them read, half written), timed in the same run: of_copy is the quantizer's rate
 *    over the copy's (the goal: 0.7 or more). Tensors of a few MB stay in the 50 MB L2 between
 *    the two passes, as in training; the copy of the same size enjoys the same.
 *  - nvfp4_quantize_rows_cols of an output gradient [N, 2560] and [N, 9728] (the RHT on)
 *    against the two nvfp4_quantize calls it replaces; bytes: x read twice, both operands
 *    written (4 |x|), and of_copy against the copy of those bytes.
 *  - cuda_nvfp4_gemm (alpha from device memory) against cuda_gemm with a host alpha, same
 *    shape, operands and types, for Fprop (x · Wᵀ), Dgrad (dY · W, W as [k, n]) and Wgrad
 *    (dYᵀ · X over the tokens, into fp32): they should cost the same.
 *  - Fprop's and Wgrad's GEMM through cuBLASLt directly with alpha/beta on the host, in
 *    device memory, and alpha as a device vector with beta on the host, each with every
 *    algorithm of the heuristic's first LT_CANDIDATES (rank 0 is its first; cuda_gemm keeps the
 *    fastest that gives rank 0's bits; op=gemm_scalars).
 *  - decoding's MLP half of a layer for one token from packed weights, the 7-op chain the
 *    decode path runs (norm, quantize, GEMV, SwiGLU, quantize, GEMV, add: op=decode_mlp_chain,
 *    chain_us; chain_recorded_us from one recording of R chains, replayed as a decoding step
 *    is), and its two nvfp4_gemv_packed calls alone (gemv_gate_up_us, gemv_down_us).
 * Each time is the mean of R back-to-back calls between two CUDA events on the backend's
 * stream, after one untimed call. Tensors are in the backend's activation dtype (bf16 unless
 * QWEN3_CUDA_PRECISION says otherwise).
 *
 * Prints `RESULT system=ours-nvfp4 op=quantize ...`, `op=quantize_rows_cols ...`, `op=gemm ...`,
 * `op=gemm_scalars ...` and `op=decode_mlp_chain ...` lines (also appended to
 * $GPU_BENCH_RESULTS when set), or a line saying why nothing ran (no CUDA in the build, no
 * GPU), exiting 0. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_result.h"
#include "kernels/ops.h"

#ifdef QWEN3_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_device.h"

#define HIDDEN 2560
#define INTER 9728

static const struct backend *be = &backend_cuda;

/* Mean seconds of one call over `repeats` back-to-back calls on the backend's stream. */
typedef void (*bench_fn)(void *arg);
static double time_calls(bench_fn fn, void *arg, int repeats) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  fn(arg);   /* untimed: first-call work (algorithm choice, the denormal check) */
  CUDA_CHECK(cudaEventRecord(start, cuda_ctx.stream));
  for (int r = 0; r < repeats; r++) fn(arg);
  CUDA_CHECK(cudaEventRecord(stop, cuda_ctx.stream));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return ms * 1e-3 / repeats;
}

static void replay_call(void *recording) { be->replay(recording); }

/* The same from a recording of `repeats` calls, replayed as a decoding step replays its ops:
 * one launch for the lot, so that no host launch stands between two kernels (time_calls' chain
 * of seven eager ops took ~4 us an op, the GEMVs' gains not showing: bench/NOTES.md, session
 * 21). One replay timed by time_calls, after its untimed one (which uploads the recording). 0
 * where the backend records nothing. */
static double time_recorded(bench_fn fn, void *arg, int repeats) {
  if (!be->capture_begin) return 0.0;
  be->capture_begin();
  for (int r = 0; r < repeats; r++) fn(arg);
  void *rec = be->capture_end();
  const double t = time_calls(replay_call, rec, 1);
  be->replay_free(rec);
  return t / repeats;
}

struct quantize_call {
  void *xq;
  float *dec;
  const void *x;
  enum dtype x_type;
  int rows, cols, stochastic, rht_signs;
  enum nvfp4_layout layout;
};

static void run_quantize(void *arg) {
  const struct quantize_call *q = arg;
  be->nvfp4_quantize(q->xq, q->dec, q->x, q->x_type, q->rows, q->cols, q->layout, q->stochastic,
                     0x1234, q->rht_signs);
}

struct copy_call {
  void *dst;
  const void *src;
  size_t bytes;
};

static void run_copy(void *arg) {
  const struct copy_call *c = arg;
  CUDA_CHECK(cudaMemcpyAsync(c->dst, c->src, c->bytes, cudaMemcpyDeviceToDevice,
                             cuda_ctx.stream));
}

static const char *dtype_name(enum dtype t) { return t == DT_BF16 ? "bf16" : "fp32"; }

/* One quantize case and the copy of the same bytes; xq, the copy's buffers and dec are large
 * enough for every case. */
static void bench_quantize(const char *name, enum nvfp4_layout layout, int rows, int cols,
                           enum dtype x_type, int rht_signs, void *xq, float *dec, void *copy_a,
                           void *copy_b, int repeats) {
  enum dtype act = be->act_dtype();
  size_t n = (size_t)rows * cols;
  void *x = bench_random(be, n, x_type, (uint64_t)rows * 31 + cols);
  size_t moved = 2 * n * dtype_bytes(x_type) + n * dtype_bytes(act);
  struct copy_call cc = {copy_b, copy_a, moved / 2};
  double t_copy = time_calls(run_copy, &cc, repeats);
  for (int sr = 0; sr < 2; sr++) {
    struct quantize_call qc = {xq, dec, x, x_type, rows, cols, sr, rht_signs, layout};
    double t = time_calls(run_quantize, &qc, repeats);
    char line[512];
    snprintf(line, sizeof line,
             "RESULT system=ours-nvfp4 op=quantize layout=%s rounding=%s rows=%d cols=%d x=%s "
             "xq=%s us=%.2f bytes=%zu GBps=%.0f copy_us=%.2f copy_GBps=%.0f of_copy=%.2f",
             name, sr ? "sr" : "rn", rows, cols, dtype_name(x_type), dtype_name(act), t * 1e6,
             moved, moved / t / 1e9, t_copy * 1e6, moved / t_copy / 1e9, t_copy / t);
    result_line(line);
  }
  be->free(x);
}

struct rows_cols_call {
  void *rows_q, *cols_q;
  float *dec;
  const void *x;
  int rows, cols, stochastic, rht_signs, fused;
};

static void run_rows_cols(void *arg) {
  const struct rows_cols_call *q = arg;
  if (q->fused) {
    be->nvfp4_quantize_rows_cols(q->rows_q, q->dec, 0x1234, q->cols_q, q->dec + 1, 0x5678, q->x,
                                 q->rows, q->cols, q->stochastic, q->rht_signs);
  } else {
    be->nvfp4_quantize(q->rows_q, q->dec, q->x, be->act_dtype(), q->rows, q->cols, NVFP4_ROWS,
                       q->stochastic, 0x1234, -1);
    be->nvfp4_quantize(q->cols_q, q->dec + 1, q->x, be->act_dtype(), q->rows, q->cols,
                       NVFP4_COLS, q->stochastic, 0x5678, q->rht_signs);
  }
}

/* An output gradient's two operands: nvfp4_quantize_rows_cols (reads x twice, writes both)
 * against the two nvfp4_quantize calls it replaces (read x four times), and the copy of the
 * fused call's bytes. */
static void bench_rows_cols(int rows, int cols, int rht_signs, void *rows_q, void *cols_q,
                            float *dec, void *copy_a, void *copy_b, int repeats) {
  enum dtype act = be->act_dtype();
  size_t n = (size_t)rows * cols, moved = 4 * n * dtype_bytes(act);
  void *x = bench_random(be, n, act, (uint64_t)rows * 37 + cols);
  struct copy_call cc = {copy_b, copy_a, moved / 2};
  double t_copy = time_calls(run_copy, &cc, repeats);
  for (int sr = 0; sr < 2; sr++) {
    struct rows_cols_call q = {rows_q, cols_q, dec, x, rows, cols, sr, rht_signs, 1};
    double t_fused = time_calls(run_rows_cols, &q, repeats);
    q.fused = 0;
    double t_two = time_calls(run_rows_cols, &q, repeats);
    char line[512];
    snprintf(line, sizeof line,
             "RESULT system=ours-nvfp4 op=quantize_rows_cols rht=%d rounding=%s rows=%d cols=%d "
             "x=%s us=%.2f two_calls_us=%.2f speedup=%.2f bytes=%zu GBps=%.0f copy_us=%.2f "
             "of_copy=%.2f",
             rht_signs >= 0, sr ? "sr" : "rn", rows, cols, dtype_name(act), t_fused * 1e6,
             t_two * 1e6, t_two / t_fused, moved, moved / t_fused / 1e9, t_copy * 1e6,
             t_copy / t_fused);
    result_line(line);
  }
  be->free(x);
}

struct gemm_call {
  int nvfp4, b_kn, m, n, k;
  float beta;
  void *c;
  enum dtype c_type;
  const void *a, *b;
  const float *dec;   /* dec[0], dec[1]: the operands' S_dec in device memory */
};

static void run_gemm(void *arg) {
  const struct gemm_call *g = arg;
  if (g->nvfp4)
    be->nvfp4_gemm(g->c, g->c_type, g->a, g->dec, g->b, g->dec + 1, g->b_kn, g->m, g->n, g->k,
                   g->beta);
  else   /* the same product with a host alpha: cuda_nvfp4_gemm's leading dimensions */
    cuda_gemm(0, !g->b_kn, g->m, g->n, g->k, 0.25f, g->a, g->k, g->b, g->b_kn ? g->n : g->k,
              g->beta, g->c, g->n, cuda_ctx.act, g->c_type);
}

static void bench_gemm(const char *pass, int m, int n, int k, int b_kn, enum dtype c_type,
                       float beta, const float *dec, int repeats) {
  enum dtype act = be->act_dtype();
  void *a = bench_random(be, (size_t)m * k, act, 1);
  void *b = bench_random(be, (size_t)n * k, act, 2);
  void *c = bench_random(be, (size_t)m * n, c_type, 3);
  struct gemm_call g = {1, b_kn, m, n, k, beta, c, c_type, a, b, dec};
  double t_nvfp4 = time_calls(run_gemm, &g, repeats);
  g.nvfp4 = 0;
  double t_plain = time_calls(run_gemm, &g, repeats);
  double flops = 2.0 * m * (double)n * k;
  char line[512];
  snprintf(line, sizeof line,
           "RESULT system=ours-nvfp4 op=gemm pass=%s m=%d n=%d k=%d b_kn=%d ab=%s c=%s beta=%g "
           "nvfp4_us=%.2f plain_us=%.2f nvfp4_tflops=%.1f plain_tflops=%.1f ratio=%.3f",
           pass, m, n, k, b_kn, dtype_name(act), dtype_name(c_type), beta, t_nvfp4 * 1e6,
           t_plain * 1e6, flops / t_nvfp4 / 1e12, flops / t_plain / 1e12, t_nvfp4 / t_plain);
  result_line(line);
  be->free(a);
  be->free(b);
  be->free(c);
}

/* ---- the GEMM's scalars: cuBLASLt's pointer modes, on cuda_nvfp4_gemm's layout (b [n, k]) */

struct lt_call {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
  const void *alpha, *beta, *a, *b;
  void *c;
};

static cublasStatus_t lt_matmul(const struct lt_call *l) {
  return cublasLtMatmul(cuda_ctx.lt, l->desc, l->alpha, l->b, l->la, l->a, l->lb, l->beta, l->c,
                        l->lc, l->c, l->lc, &l->algo, cuda_ctx.lt_workspace,
                        cuda_ctx.lt_workspace_bytes, cuda_ctx.stream);
}

static void run_lt(void *arg) { CUBLAS_CHECK(lt_matmul(arg)); }

/* One configuration word of the chosen algorithm, or -1 where this cuBLASLt has none */
static long long lt_config(const cublasLtMatmulAlgo_t *algo, cublasLtMatmulAlgoConfigAttributes_t
                           attr) {
  uint32_t v = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &v, sizeof v, &written) !=
          CUBLAS_STATUS_SUCCESS || written == 0)
    return -1;
  return (long long)v;
}

/* the heuristic's candidates timed for each pointer mode (rank 0: its first) */
#define LT_CANDIDATES 8

/* c [m, n] = alpha a [m, k] · bᵀ + beta c through cuBLASLt directly (cuda_gemm's row-major
 * mapping: Lt A = b, transposed; Lt B = a; Lt D = c as [n, m] column-major), alpha = 0.25 and
 * beta given (a) both on the host, (b) both in device memory, (c) alpha a device vector of
 * Lt D's n rows, beta on the host; each mode with each of the heuristic's first LT_CANDIDATES
 * algorithms (its id, tile, split-K, stages and reduction scheme), so a slower mode shows
 * whether another algorithm would serve it. "unsupported" when the heuristic has none or the
 * call fails. */
static void bench_lt_modes(const char *pass, int m, int n, int k, enum dtype c_type, float beta,
                           int repeats) {
  static const struct {
    cublasLtPointerMode_t mode;
    const char *name;
  } modes[] = {{CUBLASLT_POINTER_MODE_HOST, "host"},
               {CUBLASLT_POINTER_MODE_DEVICE, "device"},
               {CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST, "alpha_vector_beta_host"}};
  enum dtype act = be->act_dtype();
  cudaDataType_t ab_t = act == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  cudaDataType_t c_t = c_type == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  cublasComputeType_t compute =
      act == DT_F32 && cuda_ctx.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  void *a = bench_random(be, (size_t)m * k, act, 4);
  void *b = bench_random(be, (size_t)n * k, act, 5);
  void *c = bench_random(be, (size_t)m * n, c_type, 6);
  float host_scalars[2] = {0.25f, beta}, *alpha_vec = malloc((size_t)n * sizeof(float));
  if (!alpha_vec) {
    fprintf(stderr, "nvfp4_bench: out of host memory\n");
    exit(1);
  }
  for (int i = 0; i < n; i++) alpha_vec[i] = 0.25f;
  float *d_scalars = bench_alloc(be, sizeof host_scalars);
  float *d_alpha_vec = bench_alloc(be, (size_t)n * 4);
  be->to_device(d_scalars, host_scalars, sizeof host_scalars);
  be->to_device(d_alpha_vec, alpha_vec, (size_t)n * 4);
  free(alpha_vec);
  for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) {
    struct lt_call l;
    memset(&l, 0, sizeof l);
    cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&l.desc, compute, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t,
                                                sizeof op_t));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n,
                                                sizeof op_n));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_POINTER_MODE,
                                                &modes[i].mode, sizeof modes[i].mode));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.la, ab_t, (uint64_t)k, (uint64_t)n, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.lb, ab_t, (uint64_t)k, (uint64_t)m, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.lc, c_t, (uint64_t)n, (uint64_t)m, n));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = (uint64_t)cuda_ctx.lt_workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t results[LT_CANDIDATES];
    memset(results, 0, sizeof results);
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(cuda_ctx.lt, l.desc, l.la, l.lb, l.lc,
                                                       l.lc, pref, LT_CANDIDATES, results, &found);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    if (st != CUBLAS_STATUS_SUCCESS) found = 0;
    for (int r = 0; r < (found > 0 ? found : 1); r++) {
      const cublasLtMatmulHeuristicResult_t *result = &results[r];
      char line[640];
      int ok = found > 0 && result->state == CUBLAS_STATUS_SUCCESS;
      if (ok) {
        int host = modes[i].mode == CUBLASLT_POINTER_MODE_HOST;
        l.algo = result->algo;
        l.alpha = modes[i].mode == CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST
                      ? (const void *)d_alpha_vec
                      : host ? (const void *)&host_scalars[0] : (const void *)d_scalars;
        l.beta = modes[i].mode == CUBLASLT_POINTER_MODE_DEVICE ? (const void *)(d_scalars + 1)
                                                               : (const void *)&host_scalars[1];
        l.a = a, l.b = b, l.c = c;
        ok = lt_matmul(&l) == CUBLAS_STATUS_SUCCESS;   /* the untimed first call, checked */
      }
      if (ok) {
        double t = time_calls(run_lt, &l, repeats);
        snprintf(line, sizeof line,
                 "RESULT system=ours-nvfp4 op=gemm_scalars pass=%s mode=%s m=%d n=%d k=%d ab=%s "
                 "c=%s beta=%g rank=%d us=%.2f tflops=%.1f algo=%lld tile=%lld splitk=%lld "
                 "stages=%lld reduction=%lld workspace=%zu",
                 pass, modes[i].name, m, n, k, dtype_name(act), dtype_name(c_type), beta, r,
                 t * 1e6, 2.0 * m * (double)n * k / t / 1e12,
                 lt_config(&l.algo, CUBLASLT_ALGO_CONFIG_ID),
                 lt_config(&l.algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                 lt_config(&l.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                 lt_config(&l.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                 lt_config(&l.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                 result->workspaceSize);
      } else {
        snprintf(line, sizeof line,
                 "RESULT system=ours-nvfp4 op=gemm_scalars pass=%s mode=%s m=%d n=%d k=%d ab=%s "
                 "c=%s beta=%g rank=%d unsupported (%s)",
                 pass, modes[i].name, m, n, k, dtype_name(act), dtype_name(c_type), beta, r,
                 st != CUBLAS_STATUS_SUCCESS ? cublasGetStatusString(st)
                 : found < 1                ? "no algorithm found"
                                            : "the call failed");
        cudaGetLastError();   /* a failed call leaves no sticky error for the next one */
      }
      result_line(line);
    }
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(l.la));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(l.lb));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(l.lc));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(l.desc));
  }
  be->free(a);
  be->free(b);
  be->free(c);
  be->free(d_scalars);
  be->free(d_alpha_vec);
}

/* Decoding's MLP half of a layer for one token from packed weights: run_decode_mlp runs the 7
 * ops the decode path runs (block_forward's stages post_norm .. mlp_residual), or one of its
 * two GEMVs alone (part); weights packed from random fp32 masters, the norm weight 1. Bytes:
 * the packed weights (4.5 bits a value), what the GEMVs read. */
enum decode_mlp_part { MLP_CHAIN, MLP_GATE_UP, MLP_DOWN };
struct decode_mlp_call {
  enum decode_mlp_part part;
  void *y, *h, *hn, *xq, *g, *u, *m, *mq, *d;
  float *norm_w, *dec;   /* dec[0], dec[1]: the two operands' S_dec */
  uint8_t *codes[3], *scales[3];
  float *dec_w[3];
};

static void run_decode_mlp(void *arg) {
  struct decode_mlp_call *c = arg;
  const uint8_t *const *codes = (const uint8_t *const *)c->codes;
  const uint8_t *const *scales = (const uint8_t *const *)c->scales;
  const float *const *dec_w = (const float *const *)c->dec_w;
  const float eps = 1e-6f;
  enum dtype act = be->act_dtype();
  void *gu[2] = {c->g, c->u}, *d[1] = {c->d};
  const int gu_dims[2] = {INTER, INTER}, d_dims[1] = {HIDDEN};
  if (c->part == MLP_GATE_UP || c->part == MLP_DOWN) {
    if (c->part == MLP_GATE_UP)
      be->nvfp4_gemv_packed(gu, c->xq, c->dec, codes, scales, dec_w, gu_dims, 2, 1, HIDDEN);
    else
      be->nvfp4_gemv_packed(d, c->mq, c->dec + 1, codes + 2, scales + 2, dec_w + 2, d_dims, 1,
                            1, INTER);
    return;
  }
  be->rmsnorm_forward(c->hn, c->h, c->norm_w, 1, HIDDEN, eps);
  be->nvfp4_quantize(c->xq, c->dec, c->hn, act, 1, HIDDEN, NVFP4_ROWS_INT, 0, 0, -1);
  be->nvfp4_gemv_packed(gu, c->xq, c->dec, codes, scales, dec_w, gu_dims, 2, 1, HIDDEN);
  be->swiglu_forward(c->m, c->g, c->u, INTER);
  be->nvfp4_quantize(c->mq, c->dec + 1, c->m, act, 1, INTER, NVFP4_ROWS_INT, 0, 0, -1);
  be->nvfp4_gemv_packed(d, c->mq, c->dec + 1, codes + 2, scales + 2, dec_w + 2, d_dims, 1, 1,
                        INTER);
  be->add(c->y, c->h, c->d, HIDDEN, act);
}

static void bench_decode_mlp(int repeats) {
  enum dtype act = be->act_dtype();
  const size_t ab = dtype_bytes(act), nw = (size_t)HIDDEN * INTER;
  struct decode_mlp_call c = {0};
  const int rows[3] = {INTER, INTER, HIDDEN}, cols[3] = {HIDDEN, HIDDEN, INTER};
  for (int j = 0; j < 3; j++) {
    float *w = bench_random(be, nw, DT_F32, 11 + (uint64_t)j);
    c.codes[j] = bench_alloc(be, nw / 2);
    c.scales[j] = bench_alloc(be, nw / 16);
    c.dec_w[j] = bench_alloc(be, sizeof(float));
    be->nvfp4_pack(c.codes[j], c.scales[j], c.dec_w[j], w, rows[j], cols[j], NVFP4_ROWS);
    be->free(w);
  }
  float *ones = malloc(HIDDEN * sizeof(float));
  for (int i = 0; i < HIDDEN; i++) ones[i] = 1.0f;
  c.norm_w = bench_alloc(be, HIDDEN * sizeof(float));
  be->to_device(c.norm_w, ones, HIDDEN * sizeof(float));
  free(ones);
  c.h = bench_random(be, HIDDEN, act, 17);
  void **act_bufs[] = {&c.y, &c.hn, &c.d};
  for (size_t i = 0; i < sizeof act_bufs / sizeof *act_bufs; i++)
    *act_bufs[i] = bench_alloc(be, HIDDEN * ab);
  void **inter_bufs[] = {&c.g, &c.u, &c.m};
  for (size_t i = 0; i < sizeof inter_bufs / sizeof *inter_bufs; i++)
    *inter_bufs[i] = bench_alloc(be, INTER * ab);
  c.xq = bench_alloc(be, nvfp4_int_operand_bytes(1, HIDDEN));   /* the GEMVs' integer operands */
  c.mq = bench_alloc(be, nvfp4_int_operand_bytes(1, INTER));
  c.dec = bench_alloc(be, 2 * sizeof(float));
  c.part = MLP_CHAIN;
  double t_chain = time_calls(run_decode_mlp, &c, repeats);
  double t_chain_rec = time_recorded(run_decode_mlp, &c, repeats);
  /* the chain's GEMVs alone, on the operands its last run left */
  c.part = MLP_GATE_UP;
  double t_gate_up = time_calls(run_decode_mlp, &c, repeats);
  c.part = MLP_DOWN;
  double t_down = time_calls(run_decode_mlp, &c, repeats);
  const size_t bytes = 3 * (nw / 2 + nw / 16);
  char line[384];
  snprintf(line, sizeof line,
           "RESULT system=ours-nvfp4 op=decode_mlp_chain n=1 hidden=%d inter=%d act=%s "
           "chain_us=%.2f chain_recorded_us=%.2f weight_bytes=%zu chain_GBps=%.0f "
           "gemv_gate_up_us=%.2f gemv_down_us=%.2f gemv_GBps=%.0f",
           HIDDEN, INTER, dtype_name(act), t_chain * 1e6, t_chain_rec * 1e6, bytes,
           bytes / t_chain / 1e9, t_gate_up * 1e6, t_down * 1e6,
           bytes / (t_gate_up + t_down) / 1e9);
  result_line(line);
  void *bufs[] = {c.y, c.h, c.hn, c.xq, c.g, c.u, c.m, c.mq, c.d, c.norm_w, c.dec};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) be->free(bufs[i]);
  for (int j = 0; j < 3; j++) be->free(c.codes[j]), be->free(c.scales[j]), be->free(c.dec_w[j]);
}

static void run_all(int tokens, int repeats) {
  be->init(0, 1, 0);
  enum dtype act = be->act_dtype();
  printf("nvfp4_bench: backend %s, activations %s, %d tokens, hidden %d, intermediate %d, "
         "%d repeats\n", be->name, dtype_name(act), tokens, HIDDEN, INTER, repeats);
  fflush(stdout);
  size_t most = (size_t)INTER * HIDDEN > (size_t)tokens * INTER ? (size_t)INTER * HIDDEN
                                                               : (size_t)tokens * INTER;
  void *xq = bench_alloc(be, most * dtype_bytes(act));
  /* moved / 2 is at most 8 bytes a value: fp32 x read twice and fp32 operands written twice
   * (rows_cols in the fp32 modes) */
  void *copy_a = bench_alloc(be, most * 8), *copy_b = bench_alloc(be, most * 8);
  float *dec = bench_alloc(be, 2 * sizeof(float));
  const float decs[2] = {1.0f / 2688, 1.0f / 2688};
  be->to_device(dec, decs, sizeof decs);

  bench_quantize("rows", NVFP4_ROWS, tokens, HIDDEN, act, -1, xq, dec, copy_a, copy_b, repeats);
  bench_quantize("rows", NVFP4_ROWS, tokens, INTER, act, -1, xq, dec, copy_a, copy_b, repeats);
  bench_quantize("cols+rht", NVFP4_COLS, tokens, HIDDEN, act, 0xa5c3, xq, dec, copy_a, copy_b,
                 repeats);
  bench_quantize("cols+rht", NVFP4_COLS, tokens, INTER, act, 0xa5c3, xq, dec, copy_a, copy_b,
                 repeats);
  bench_quantize("tiles", NVFP4_TILES, INTER, HIDDEN, DT_F32, -1, xq, dec, copy_a, copy_b,
                 repeats);
  bench_quantize("tiles", NVFP4_TILES, HIDDEN, INTER, DT_F32, -1, xq, dec, copy_a, copy_b,
                 repeats);
  /* an output gradient's two operands: [N, 2560] (attention's projections) and [N, 9728] */
  void *xq2 = bench_alloc(be, most * dtype_bytes(act));
  bench_rows_cols(tokens, HIDDEN, 0xa5c3, xq, xq2, dec, copy_a, copy_b, repeats);
  bench_rows_cols(tokens, INTER, 0xa5c3, xq, xq2, dec, copy_a, copy_b, repeats);
  be->free(xq2);
  be->free(xq);
  be->free(copy_a);
  be->free(copy_b);

  /* the MLP's up projection: Fprop y = x · Wᵀ, Dgrad dx = dy · W (W [INTER, HIDDEN] as
   * [k, n]), Wgrad dW = dyᵀ · x over the tokens into fp32 gradients */
  bench_gemm("fprop", tokens, INTER, HIDDEN, 0, act, 0.0f, dec, repeats);
  bench_gemm("dgrad", tokens, HIDDEN, INTER, 1, act, 1.0f, dec, repeats);
  bench_gemm("wgrad", INTER, HIDDEN, tokens, 0, DT_F32, 1.0f, dec, repeats);
  /* why device scalars cost Wgrad more: the same GEMMs in cuBLASLt's three pointer modes */
  bench_lt_modes("fprop", tokens, INTER, HIDDEN, act, 0.0f, repeats);
  bench_lt_modes("wgrad", INTER, HIDDEN, tokens, DT_F32, 1.0f, repeats);
  const struct cuda_gemm_tuning t = cuda_gemm_tuning();
  char line[160];
  snprintf(line, sizeof line,
           "RESULT system=ours-nvfp4 op=gemm_tuning shapes=%ld switched=%ld other_bits=%ld",
           t.shapes, t.switched, t.other_bits);
  result_line(line);
  be->free(dec);
  bench_decode_mlp(repeats);
}
#endif

int main(int argc, char **argv) {
  int tokens = 2048, repeats = 50;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--tokens") && i + 1 < argc && atoi(argv[i + 1]) > 0) {
      tokens = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--repeats") && i + 1 < argc && atoi(argv[i + 1]) > 0) {
      repeats = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      printf("usage: nvfp4_bench [--tokens N] [--repeats R]   (default 2048 tokens, 50)\n");
      return 0;
    } else {
      fprintf(stderr, "nvfp4_bench: bad argument '%s'\n", argv[i]);
      return 2;
    }
  }
  if (tokens % 16) {
    fprintf(stderr, "nvfp4_bench: --tokens must be a multiple of 16 (NVFP4_COLS tiles)\n");
    return 2;
  }
#ifdef QWEN3_HAVE_CUDA
  if (cuda_device_count() == 0) {
    printf("nvfp4_bench: no GPU; nothing to time\n");
    return 0;
  }
  run_all(tokens, repeats);
  return 0;
#else
  printf("nvfp4_bench: no CUDA in this build; nothing to time\n");
  (void)tokens;
  (void)repeats;
  return 0;
#endif
}
