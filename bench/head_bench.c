/* The LM head fused with cross-entropy (lm_head_loss) of the CUDA backend at Qwen3-4B's shape,
 * timed beside what bounds it, and the other per-micro-batch work on the [vocab, dim] tables.
 *
 *   build/bench/head_bench [--budget SECONDS] [N ...]     (token rows; default 2048 16384, 10 s)
 *
 * dim 2560, vocab 151936 (tied embedding), activations in the backend's dtype (bf16 unless
 * QWEN3_CUDA_PRECISION says otherwise), gradients of the table fp32. Per N:
 *   loss       lm_head_loss with both gradients: dx, and dw added to (what a training forward
 *              runs); it works through the rows in chunks the scratch arena holds
 *              (sized as the trainer sizes it for a micro-batch of the largest N, or
 *              QWEN3_CUDA_SCRATCH_MB: the chunk is printed);
 *   loss_fwd   lm_head_loss without gradients (an evaluation);
 *   gemms      the op's three GEMMs alone at its shapes, each whole: logits = x·wᵀ (into an
 *              activation buffer), dx = dlogits·w, dw += dlogitsᵀ·x (fp32): what the op would
 *              take on cuBLASLt with no chunks and no loss kernel;
 *   embed_bwd  embedding_backward of the N rows into the fp32 table;
 *   tied_add   a [vocab, dim] fp32 gradient added into another (the tied head's share into the
 *              embedding's, once a step);
 *   copy       a device copy of a [vocab, dim] fp32 table, the bandwidth reference.
 * The GEMM ops' TFLOP/s count 2 N dim vocab per GEMM (three for loss and gemms, one for
 * loss_fwd); the others' GB/s their least bytes (every input read once, every output written
 * once). Each time is the median of repeats (bench_result.h bench_time).
 *
 * Prints a table and one `RESULT system=ours-head op=... n=... ms=...` line per op and N (also
 * appended to $GPU_BENCH_RESULTS when set), or why nothing ran (as attn_bench.c). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_result.h"
#include "common/util.h"
#include "kernels/ops.h"

#if defined(QWEN3_HAVE_CUDA) && defined(__has_include)
#if __has_include("kernels/cuda/cuda_backend.cu")
#define HEAD_BENCH_CUDA 1
/* bound to the symbol backend_cuda under a name of our own, as attn_bench.c does */
extern const struct backend head_bench_backend_cuda __asm__("backend_cuda");
#include "kernels/cuda/cuda_device.h"
#endif
#endif

#define DIM 2560
#define VOCAB 151936
#define MAX_N 8

#ifdef HEAD_BENCH_CUDA
enum { LOSS, LOSS_FWD, GEMMS, EMBED_BWD, TIED_ADD, COPY, OPS };
static const char *const op_name[OPS] = {"loss", "loss_fwd", "gemms", "embed_bwd", "tied_add",
                                         "copy"};

struct bufs {
  int n;
  void *x, *w, *dx, *logits;   /* [n, DIM], [VOCAB, DIM], [n, DIM], [n, VOCAB]: activations */
  float *dw, *dtable, *nll;     /* [VOCAB, DIM] twice, [n] */
  int32_t *targets;             /* [n], in [0, VOCAB): also the embedding's tokens */
};

static void run(const struct backend *be, const void *arg, int op) {
  const struct bufs *b = arg;
  const int n = b->n, vocab = VOCAB;
  const size_t table = (size_t)VOCAB * DIM;
  switch (op) {
  case LOSS:
    be->lm_head_loss(b->nll, b->dx, b->dw, b->x, b->w, b->targets, n, DIM, VOCAB, 1.0f / n);
    break;
  case LOSS_FWD:
    be->lm_head_loss(b->nll, NULL, NULL, b->x, b->w, b->targets, n, DIM, VOCAB, 0.0f);
    break;
  case GEMMS:
    be->linear_forward(&b->logits, b->x, (const void *const *)&b->w, &vocab, 1, n, DIM);
    be->linear_backward(b->dx, b->dw, b->logits, b->x, b->w, n, DIM, VOCAB, ACC_DW);
    break;
  case EMBED_BWD: be->embedding_backward(b->dtable, b->dx, b->targets, n, DIM); break;
  case TIED_ADD: be->add(b->dtable, b->dtable, b->dw, table, DT_F32); break;
  case COPY: be->copy(b->dtable, b->dw, table * sizeof(float)); break;
  }
}

/* FLOPs (the GEMM ops) or least bytes (the others) of op on n rows */
static double op_work(int op, int n, size_t act) {
  const double gemm = 2.0 * n * DIM * VOCAB, table = (double)VOCAB * DIM * 4;
  switch (op) {
  case LOSS:
  case GEMMS: return 3 * gemm;
  case LOSS_FWD: return gemm;
  case EMBED_BWD: return (double)n * DIM * (act + 2 * 4.0) + n * 4.0;   /* rows read, added to */
  case TIED_ADD: return 3 * table;
  default: return 2 * table;
  }
}

static int is_gemm(int op) { return op == LOSS || op == LOSS_FWD || op == GEMMS; }

static void bench(const struct backend *be, int n, double budget, int scratch_mib) {
  const enum dtype act = be->act_dtype();
  const size_t table = (size_t)VOCAB * DIM;
  struct bufs b = {.n = n,
                   .x = bench_random(be, (size_t)n * DIM, act, 1),
                   .w = bench_random(be, table, act, 2),
                   .dx = bench_alloc(be, (size_t)n * DIM * dtype_bytes(act)),
                   .logits = bench_alloc(be, (size_t)n * VOCAB * dtype_bytes(act)),
                   .dw = bench_random(be, table, DT_F32, 3),
                   .dtable = bench_random(be, table, DT_F32, 4),
                   .nll = bench_alloc(be, (size_t)n * sizeof(float)),
                   .targets = bench_alloc(be, (size_t)n * sizeof(int32_t))};
  int32_t *t = xmalloc((size_t)n * sizeof *t);
  for (int i = 0; i < n; i++) t[i] = (int32_t)(((uint64_t)i * 2654435761u) % VOCAB);
  be->to_device(b.targets, t, (size_t)n * sizeof *t);
  free(t);

  double ms[OPS];
  for (int op = 0; op < OPS; op++)
    ms[op] = 1e3 * bench_time(be, run, &b, op, 1, budget / OPS);
  printf("%-10s %6s %10s %12s\n", "op", "n", "ms", "TFLOP/s|GB/s");
  for (int op = 0; op < OPS; op++) {
    const double rate =
        op_work(op, n, dtype_bytes(act)) / (ms[op] * 1e-3) / (is_gemm(op) ? 1e12 : 1e9);
    printf("%-10s %6d %10.3f %12.1f\n", op_name[op], n, ms[op], rate);
    char line[256];
    snprintf(line, sizeof line,
             "RESULT system=ours-head op=%s n=%d ms=%.4f %s=%.1f scratch_mb=%d dtype=%s",
             op_name[op], n, ms[op], is_gemm(op) ? "tflops" : "gbps", rate, scratch_mib,
             act == DT_BF16 ? "bf16" : "fp32");
    result_line(line);
  }
  void *all[] = {b.x, b.w, b.dx, b.logits, b.dw, b.dtable, b.nll, b.targets};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) be->free(all[i]);
}
#endif

int main(int argc, char **argv) {
  double budget = 10;
  int ns[MAX_N], count = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--budget") && i + 1 < argc) {
      budget = atof(argv[++i]);
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      printf("usage: head_bench [--budget SECONDS] [N ...]   (default 2048 16384, 10 s)\n");
      return 0;
    } else if (atoi(argv[i]) > 0 && count < MAX_N) {
      ns[count++] = atoi(argv[i]);
    } else {
      fprintf(stderr, "head_bench: bad argument '%s' (token rows > 0, at most %d)\n", argv[i],
              MAX_N);
      return 2;
    }
  }
  if (!count) ns[count++] = 2048, ns[count++] = 16384;
#ifdef HEAD_BENCH_CUDA
  const struct backend *be = &head_bench_backend_cuda;
  int largest = 0;
  for (int i = 0; i < count; i++) largest = ns[i] > largest ? ns[i] : largest;
  be->init(0, 1, largest);
  const size_t act = dtype_bytes(be->act_dtype());
  const double scratch = (double)cuda_scratch_bytes(largest);
  printf("head_bench: backend %s, dim %d, vocab %d; scratch %.0f MiB (for %d rows): lm_head_loss "
         "chunks of at most %.0f rows; budget %.0f s\n",
         be->name, DIM, VOCAB, scratch / 1048576, largest, scratch / ((double)VOCAB * (4 + act)),
         budget);
  fflush(stdout);
  for (int i = 0; i < count; i++) bench(be, ns[i], budget / count, (int)(scratch / 1048576));
  return 0;
#else
#ifdef QWEN3_HAVE_CUDA
  printf("head_bench: this build's CUDA library has no backend table (kernels/cuda/cuda_backend.cu)"
         "; nothing to time\n");
#else
  printf("head_bench: no CUDA in this build; nothing to time\n");
#endif
  (void)budget;
  (void)ns;
  return 0;
#endif
}
