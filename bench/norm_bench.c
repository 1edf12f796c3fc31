/* RMSNorm and the q/k norm + RoPE of the CUDA backend at Qwen3-4B's training shapes, timed on
 * device buffers beside a device-to-device copy, the bandwidth a memory-bound op could reach.
 *
 *   build/bench/norm_bench [--budget SECONDS] [--calls N]     (default 10 s, 50 calls a batch)
 *
 * One micro-batch of 2048 tokens: rmsnorm over [2048, 2560], q/k norm + RoPE over
 * [2048, 32, 128] (q) and [2048, 8, 128] (k), each alone and both in one call (qk_fwd_qk, as
 * worker/block.c calls it), through backend_cuda's ops, activations in the
 * backend's dtype (bf16 unless QWEN3_CUDA_PRECISION says otherwise), weights and their gradients
 * fp32. The rmsnorm backward runs with acc 0 and with ACC_DX | ACC_DW (a residual's gradient, as
 * training runs it); the q/k backward with ACC_DW (a micro-batch after the first). An op's time
 * is the median over repeats of a batch of N calls between two synchronizes, divided by N. Its
 * bytes are the least it must move: every input read once, every output written once (a
 * gradient it adds to, read and written); GB/s is bytes / time and of_copy that over the copy's
 * GB/s (a copy of the q tensor, its bytes read and written).
 *
 * Prints a table and a `RESULT system=ours-norm op=... us=... gbps=... of_copy=...` line per op
 * (also appended to $GPU_BENCH_RESULTS when set), or why nothing ran (as attn_bench.c). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_result.h"
#include "common/util.h"
#include "kernels/ops.h"

#if defined(QWEN3_HAVE_CUDA) && defined(__has_include)
#if __has_include("kernels/cuda/cuda_backend.cu")
#define NORM_BENCH_CUDA 1
/* bound to the symbol backend_cuda under a name of our own, as attn_bench.c does */
extern const struct backend norm_bench_backend_cuda __asm__("backend_cuda");
#endif
#endif

#define TOKENS 2048
#define DIM 2560
#define HEADS 32
#define KV_HEADS 8
#define HEAD_DIM 128
#define EPS 1e-6f
#define THETA 1e6

#ifdef NORM_BENCH_CUDA
enum {
  RMS_FWD, RMS_BWD, RMS_BWD_ACC, QK_FWD_Q, QK_FWD_K, QK_FWD_QK, QK_BWD_Q, QK_BWD_K, COPY, OPS
};
static const char *const op_name[OPS] = {"rms_fwd",  "rms_bwd",  "rms_bwd_acc", "qk_fwd_q",
                                         "qk_fwd_k", "qk_fwd_qk", "qk_bwd_q",  "qk_bwd_k",
                                         "copy"};

struct bufs {
  void *x, *dout, *out, *dx;       /* [TOKENS, DIM] */
  void *qx, *qdout, *qout, *qdx;   /* [TOKENS, HEADS, HEAD_DIM]; k takes [TOKENS, KV_HEADS, ..] */
  void *kx, *kout;                 /* [TOKENS, KV_HEADS, HEAD_DIM]: k beside q in qk_fwd_qk */
  float *w, *dw, *qw, *kw, *qdw;
  int32_t *pos;
};

static void run(const struct backend *be, const void *arg, int op) {
  const struct bufs *b = arg;
  const size_t copy_bytes = (size_t)TOKENS * HEADS * HEAD_DIM * dtype_bytes(be->act_dtype());
  switch (op) {
  case RMS_FWD: be->rmsnorm_forward(b->out, b->x, b->w, TOKENS, DIM, EPS); break;
  case RMS_BWD: be->rmsnorm_backward(b->dx, b->dw, b->dout, b->x, b->w, TOKENS, DIM, EPS, 0); break;
  case RMS_BWD_ACC:
    be->rmsnorm_backward(b->dx, b->dw, b->dout, b->x, b->w, TOKENS, DIM, EPS, ACC_DX | ACC_DW);
    break;
  case QK_FWD_Q:
  case QK_FWD_K:
  case QK_FWD_QK: {
    void *out[] = {b->qout, b->kout};
    const void *x[] = {b->qx, b->kx};
    const float *w[] = {b->qw, b->kw};
    const int heads[] = {op == QK_FWD_K ? KV_HEADS : HEADS, KV_HEADS};
    be->qk_norm_rope_forward(out, x, w, heads, op == QK_FWD_QK ? 2 : 1, b->pos, TOKENS, HEAD_DIM,
                             EPS, THETA);
    break;
  }
  case QK_BWD_Q:
  case QK_BWD_K:
    be->qk_norm_rope_backward(b->qdx, b->qdw, b->qdout, b->qx, b->qw, b->pos, TOKENS,
                              op == QK_BWD_Q ? HEADS : KV_HEADS, HEAD_DIM, EPS, THETA, ACC_DW);
    break;
  case COPY: be->copy(b->qout, b->qx, copy_bytes); break;
  }
}

/* The least bytes op moves (see the top of this file). */
static double op_bytes(int op, size_t act) {
  const double rows = (double)TOKENS * DIM * act, w = DIM * 4.0, pos = TOKENS * 4.0;
  const double qk = (double)TOKENS * HEAD_DIM * act, qw = HEAD_DIM * 4.0;
  switch (op) {
  case RMS_FWD: return 2 * rows + w;
  case RMS_BWD: return 3 * rows + 2 * w;           /* x, dout, w; dx, dw */
  case RMS_BWD_ACC: return 4 * rows + 3 * w;       /* dx and dw read too */
  case QK_FWD_Q: return 2 * qk * HEADS + qw + pos;
  case QK_FWD_K: return 2 * qk * KV_HEADS + qw + pos;
  case QK_FWD_QK: return 2 * qk * (HEADS + KV_HEADS) + 2 * qw + pos;
  case QK_BWD_Q: return 3 * qk * HEADS + 3 * qw + pos;   /* dw read and written */
  case QK_BWD_K: return 3 * qk * KV_HEADS + 3 * qw + pos;
  default: return 2 * qk * HEADS;                  /* the copy: read and written */
  }
}

static void bench(const struct backend *be, double budget, int calls) {
  const enum dtype act = be->act_dtype();
  const size_t nr = (size_t)TOKENS * DIM, nq = (size_t)TOKENS * HEADS * HEAD_DIM;
  const size_t nk = (size_t)TOKENS * KV_HEADS * HEAD_DIM;
  struct bufs b = {
      .x = bench_random(be, nr, act, 1), .dout = bench_random(be, nr, act, 2),
      .out = bench_alloc(be, nr * dtype_bytes(act)), .dx = bench_random(be, nr, act, 3),
      .qx = bench_random(be, nq, act, 4), .qdout = bench_random(be, nq, act, 5),
      .qout = bench_alloc(be, nq * dtype_bytes(act)), .qdx = bench_alloc(be, nq * dtype_bytes(act)),
      .kx = bench_random(be, nk, act, 8), .kout = bench_alloc(be, nk * dtype_bytes(act)),
      .w = bench_random(be, DIM, DT_F32, 6), .dw = bench_alloc(be, DIM * sizeof(float)),
      .qw = bench_random(be, HEAD_DIM, DT_F32, 7), .kw = bench_random(be, HEAD_DIM, DT_F32, 9),
      .qdw = bench_alloc(be, HEAD_DIM * sizeof(float)),
      .pos = bench_alloc(be, TOKENS * sizeof(int32_t))};
  int32_t pos[TOKENS];
  for (int i = 0; i < TOKENS; i++) pos[i] = i;
  be->to_device(b.pos, pos, sizeof pos);

  double us[OPS], gbps[OPS];
  for (int op = 0; op < OPS; op++) {
    const double t = bench_time(be, run, &b, op, calls, budget / OPS);
    us[op] = t * 1e6;
    gbps[op] = op_bytes(op, dtype_bytes(act)) / t / 1e9;
  }
  printf("%-12s %9s %9s %9s %8s\n", "op", "us", "MB", "GB/s", "of copy");
  for (int op = 0; op < OPS; op++)
    printf("%-12s %9.2f %9.2f %9.0f %8.2f\n", op_name[op], us[op],
           op_bytes(op, dtype_bytes(act)) / 1e6, gbps[op], gbps[op] / gbps[COPY]);
  for (int op = 0; op < OPS; op++) {
    char line[256];
    snprintf(line, sizeof line,
             "RESULT system=ours-norm op=%s us=%.3f gbps=%.1f of_copy=%.3f mbytes=%.2f calls=%d "
             "dtype=%s",
             op_name[op], us[op], gbps[op], gbps[op] / gbps[COPY],
             op_bytes(op, dtype_bytes(act)) / 1e6, calls, act == DT_BF16 ? "bf16" : "fp32");
    result_line(line);
  }
  void *all[] = {b.x, b.dout, b.out, b.dx, b.qx, b.qdout, b.qout, b.qdx, b.kx, b.kout, b.w, b.dw,
                 b.qw, b.kw, b.qdw, b.pos};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) be->free(all[i]);
}
#endif

int main(int argc, char **argv) {
  double budget = 10;
  int calls = 50;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--budget") && i + 1 < argc) {
      budget = atof(argv[++i]);
    } else if (!strcmp(argv[i], "--calls") && i + 1 < argc && atoi(argv[i + 1]) > 0) {
      calls = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      printf("usage: norm_bench [--budget SECONDS] [--calls N]   (default 10 s, 50 calls)\n");
      return 0;
    } else {
      fprintf(stderr, "norm_bench: bad argument '%s'\n", argv[i]);
      return 2;
    }
  }
#ifdef NORM_BENCH_CUDA
  const struct backend *be = &norm_bench_backend_cuda;
  be->init(0, 1, 0);
  printf("norm_bench: backend %s, %d tokens: rmsnorm dim %d, q/k norm + RoPE %d / %d heads of "
         "%d; %d calls a batch, budget %.0f s\n",
         be->name, TOKENS, DIM, HEADS, KV_HEADS, HEAD_DIM, calls, budget);
  fflush(stdout);
  bench(be, budget, calls);
  return 0;
#else
#ifdef QWEN3_HAVE_CUDA
  printf("norm_bench: this build's CUDA library has no backend table (kernels/cuda/cuda_backend.cu)"
         "; nothing to time\n");
#else
  printf("norm_bench: no CUDA in this build; nothing to time\n");
#endif
  (void)budget;
  (void)calls;
  return 0;
#endif
}
