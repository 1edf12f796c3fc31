/* Causal grouped-query attention of the CUDA backend at Qwen3-4B's shape: forward, backward and
 * both, timed on device buffers, beside torch SDPA (bench/torch_train_bench.py attention).
 *
 *   build/bench/attn_bench [--budget SECONDS] [T ...]        (default: 2048 4096 8192, 20 s)
 *   build/bench/attn_bench --decode MAX_LEN [--budget SECONDS] [K ...]   (default K: MAX_LEN)
 *
 * B = 1, 32 query heads, 8 KV heads, head_dim 128, tq = tk = T, through backend_cuda's
 * attention_forward / attention_backward, tensors in the backend's activation dtype (bf16 unless
 * QWEN3_CUDA_PRECISION says otherwise; the result line names it). FLOPs follow
 * FlashAttention's convention: forward = 4 T² heads head_dim / 2 (the causal half of QKᵀ and PV,
 * 2 FLOPs per multiply-add), backward = 2.5 × forward. Each time is the median of repeats,
 * bracketed by the backend's synchronize; the repeats shrink when one call is slow.
 *
 * --decode times decoding's attention instead: one sequence's 32 queries against a cache of
 * MAX_LEN rows of which the first K are read (attn_shape.key_last = K - 1, the shape a recorded
 * decoding step uses), as chains of DEC_LINKS calls recorded into one replay (capture_begin),
 * the way a decoding step of 36 layers runs them: the KV append alone, the attention alone, both,
 * and an add of one hidden row (2560 values, the least a link of the chain costs). Each chain's
 * time over DEC_LINKS is a link's cost inside a recorded step, launch and dependency included.
 * One `RESULT system=ours-attn-decode max_len=... keys=... append_us=... attention_us=...
 * both_us=... add_us=...` line per K.
 *
 * Prints one `RESULT system=ours-attn T=... fwd_ms=... ...` line per T (ours-attn-mma-sync under
 * QWEN3_CUDA_WGMMA=0, the mma.sync kernels where Hopper's wgmma ones would run) (also appended to
 * $GPU_BENCH_RESULTS when set), or a line saying why nothing ran: a build without CUDA, or one
 * whose CUDA library has no backend table yet (kernels/cuda/cuda_backend.cu, checked at compile
 * time so that this program links whatever state the backend is in). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_result.h"
#include "common/util.h"
#include "kernels/ops.h"

#if defined(QWEN3_HAVE_CUDA) && defined(__has_include)
#if __has_include("kernels/cuda/cuda_backend.cu")
#define ATTN_BENCH_CUDA 1
/* bound to the symbol backend_cuda under a name of our own, so that this compiles whether or not
 * (and however) a header declares it */
extern const struct backend attn_bench_backend_cuda __asm__("backend_cuda");
#endif
#endif

#define HEADS 32
#define KV_HEADS 8
#define HEAD_DIM 128

#ifdef ATTN_BENCH_CUDA
/* QWEN3_CUDA_WGMMA=0 keeps an H100/H200 on the mma.sync kernels: named apart in the results */
static const char *attn_system(void) {
  const char *e = getenv("QWEN3_CUDA_WGMMA");
  return e && !strcmp(e, "0") ? "ours-attn-mma-sync" : "ours-attn";
}

#define MAX_REPEATS 10

static void bench_one(const struct backend *be, int T, double seconds) {
  struct attn_shape s = {.batch = 1, .tq = T, .tk = T, .k_stride = T,
                         .heads = HEADS, .kv_heads = KV_HEADS, .head_dim = HEAD_DIM};
  size_t nq = (size_t)T * HEADS * HEAD_DIM, nk = (size_t)T * KV_HEADS * HEAD_DIM;
  const enum dtype act = be->act_dtype();
  void *q = bench_random(be, nq, act, 1), *k = bench_random(be, nk, act, 2);
  void *v = bench_random(be, nk, act, 3), *dctx = bench_random(be, nq, act, 4);
  float *lse = be->alloc((size_t)HEADS * T * sizeof(float));
  void *ctx = be->alloc(nq * sizeof(float)), *dq = be->alloc(nq * sizeof(float));
  void *dk = be->alloc(nk * sizeof(float)), *dv = be->alloc(nk * sizeof(float));
  if (!ctx || !lse || !dq || !dk || !dv) {
    fprintf(stderr, "attn_bench: cannot allocate the T=%d buffers\n", T);
    exit(1);
  }
  /* one untimed pass, which also tells how many repeats the budget allows */
  double t0 = now_seconds();
  be->attention_forward(ctx, lse, q, k, v, &s);
  be->attention_backward(dq, dk, dv, dctx, q, k, v, ctx, lse, &s, 0);
  be->synchronize();
  double first = now_seconds() - t0;
  int repeats = first > 0 ? (int)(seconds / 2 / first) : MAX_REPEATS;
  repeats = repeats < 1 ? 1 : repeats > MAX_REPEATS ? MAX_REPEATS : repeats;
  double fwd[MAX_REPEATS], bwd[MAX_REPEATS], both[MAX_REPEATS];
  for (int r = 0; r < repeats; r++) {
    double a = now_seconds();
    be->attention_forward(ctx, lse, q, k, v, &s);
    be->synchronize();
    double b = now_seconds();
    be->attention_backward(dq, dk, dv, dctx, q, k, v, ctx, lse, &s, 0);   /* as training's */
    be->synchronize();
    double c = now_seconds();
    fwd[r] = b - a;
    bwd[r] = c - b;
    both[r] = c - a;
  }
  double tf = bench_median(fwd, repeats), tb = bench_median(bwd, repeats),
         tfb = bench_median(both, repeats);
  double fwd_flops = 4.0 * T * (double)T * HEADS * HEAD_DIM / 2;
  char line[512];
  snprintf(line, sizeof line,
           "RESULT system=%s T=%d heads=%d kv_heads=%d head_dim=%d fwd_ms=%.4g "
           "bwd_ms=%.4g fwdbwd_ms=%.4g fwd_tflops=%.4g bwd_tflops=%.4g fwdbwd_tflops=%.4g "
           "repeats=%d dtype=%s",
           attn_system(), T, HEADS, KV_HEADS, HEAD_DIM, tf * 1e3, tb * 1e3, tfb * 1e3, fwd_flops / tf / 1e12,
           2.5 * fwd_flops / tb / 1e12, 3.5 * fwd_flops / tfb / 1e12, repeats,
           be->act_dtype() == DT_BF16 ? "bf16" : "fp32");
  result_line(line);
  void *bufs[] = {q, k, v, dctx, ctx, lse, dq, dk, dv};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) be->free(bufs[i]);
}

/* ---- decoding: chains of recorded calls ---- */
#define DEC_LINKS 36
#define DEC_HIDDEN 2560
enum { DEC_APPEND, DEC_ATTENTION, DEC_BOTH, DEC_ADD, DEC_CHAINS };

struct dec_bufs {
  struct attn_shape s;
  void *q, *k_new, *v_new, *k_cache, *v_cache, *ctx, *x, *y;
  float *lse;
  int32_t *pos;
};

static void dec_link(const struct backend *be, struct dec_bufs *b, int chain) {
  const int width = KV_HEADS * HEAD_DIM;
  if (chain == DEC_APPEND || chain == DEC_BOTH)
    be->kv_append(b->k_cache, b->v_cache, b->k_new, b->v_new, b->pos, 1, width, b->s.k_stride);
  if (chain == DEC_ATTENTION || chain == DEC_BOTH)
    be->attention_forward(b->ctx, b->lse, b->q, b->k_cache, b->v_cache, &b->s);
  if (chain == DEC_ADD) be->add(b->y, b->x, b->y, DEC_HIDDEN, be->act_dtype());
}

static void dec_replay(const struct backend *be, const void *rec, int op) {
  (void)op;
  be->replay((void *)rec);
}

static void bench_decode(const struct backend *be, int max_len, int keys, double seconds) {
  const enum dtype act = be->act_dtype();
  const size_t nc = (size_t)max_len * KV_HEADS * HEAD_DIM, nk = (size_t)KV_HEADS * HEAD_DIM;
  struct dec_bufs b = {
    .s = {.batch = 1, .tq = 1, .tk = max_len, .k_stride = max_len, .heads = HEADS,
          .kv_heads = KV_HEADS, .head_dim = HEAD_DIM},
    .q = bench_random(be, (size_t)HEADS * HEAD_DIM, act, 1),
    .k_new = bench_random(be, nk, act, 2), .v_new = bench_random(be, nk, act, 3),
    .k_cache = bench_random(be, nc, act, 4), .v_cache = bench_random(be, nc, act, 5),
    .x = bench_random(be, DEC_HIDDEN, act, 6), .y = bench_random(be, DEC_HIDDEN, act, 7),
    .ctx = bench_alloc(be, (size_t)HEADS * HEAD_DIM * sizeof(float)),
    .lse = bench_alloc(be, HEADS * sizeof(float)),
    .pos = bench_alloc(be, sizeof(int32_t)),
  };
  const int32_t last = keys - 1;
  be->to_device(b.pos, &last, sizeof last);
  b.s.key_last = b.pos;   /* the query at position K - 1 sees keys 0 .. K - 1 */
  double us[DEC_CHAINS];
  for (int chain = 0; chain < DEC_CHAINS; chain++) {
    dec_link(be, &b, chain);   /* an op's first call sets things up; not recorded */
    be->synchronize();
    be->capture_begin();
    for (int i = 0; i < DEC_LINKS; i++) dec_link(be, &b, chain);
    void *rec = be->capture_end();
    us[chain] = bench_time(be, dec_replay, rec, 0, 20, seconds / DEC_CHAINS) / DEC_LINKS * 1e6;
    be->replay_free(rec);
  }
  char line[512];
  snprintf(line, sizeof line,
           "RESULT system=ours-attn-decode max_len=%d keys=%d heads=%d kv_heads=%d head_dim=%d "
           "append_us=%.3f attention_us=%.3f both_us=%.3f add_us=%.3f links=%d dtype=%s",
           max_len, keys, HEADS, KV_HEADS, HEAD_DIM, us[DEC_APPEND], us[DEC_ATTENTION],
           us[DEC_BOTH], us[DEC_ADD], DEC_LINKS, act == DT_BF16 ? "bf16" : "fp32");
  result_line(line);
  void *bufs[] = {b.q, b.k_new, b.v_new, b.k_cache, b.v_cache, b.ctx, b.x, b.y, b.lse, b.pos};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) be->free(bufs[i]);
}
#endif

int main(int argc, char **argv) {
  double budget = 20;
  int ts[16], n = 0, max_len = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--budget") && i + 1 < argc) {
      budget = atof(argv[++i]);
    } else if (!strcmp(argv[i], "--decode") && i + 1 < argc && atoi(argv[i + 1]) > 0) {
      max_len = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      printf("usage: attn_bench [--budget SECONDS] [T ...]   (default 2048 4096 8192)\n"
             "       attn_bench --decode MAX_LEN [--budget SECONDS] [K ...]   (default K: "
             "MAX_LEN)\n");
      return 0;
    } else if (n < 16 && atoi(argv[i]) > 0) {
      ts[n++] = atoi(argv[i]);
    } else {
      fprintf(stderr, "attn_bench: bad argument '%s'\n", argv[i]);
      return 2;
    }
  }
  for (int i = 0; i < n && max_len; i++)
    if (ts[i] > max_len) {
      fprintf(stderr, "attn_bench: %d keys do not fit a cache of %d rows\n", ts[i], max_len);
      return 2;
    }
  if (!n && max_len) {
    ts[n++] = max_len;
  } else if (!n) {
    ts[n++] = 2048;
    ts[n++] = 4096;
    ts[n++] = 8192;
  }
#ifdef ATTN_BENCH_CUDA
  const struct backend *be = &attn_bench_backend_cuda;
  be->init(0, 1, 0);
  printf("attn_bench: backend %s, B=1, %d q / %d kv heads, head_dim %d, causal; budget %.0f s\n",
         be->name, HEADS, KV_HEADS, HEAD_DIM, budget);
  fflush(stdout);
  double start = now_seconds();
  for (int i = 0; i < n; i++) {
    double left = budget - (now_seconds() - start);
    if (left <= 0) {
      char line[128];
      snprintf(line, sizeof line, "RESULT system=%s %s=%d status=skipped",
               max_len ? "ours-attn-decode" : attn_system(), max_len ? "keys" : "T", ts[i]);
      result_line(line);
      continue;
    }
    if (max_len)
      bench_decode(be, max_len, ts[i], left / (n - i));
    else
      bench_one(be, ts[i], left / (n - i));
  }
  return 0;
#else
#ifdef QWEN3_HAVE_CUDA
  printf("attn_bench: this build's CUDA library has no backend table (kernels/cuda/cuda_backend.cu)"
         "; nothing to time\n");
#else
  printf("attn_bench: no CUDA in this build; nothing to time\n");
#endif
  (void)budget;
  (void)ts;
  (void)max_len;
  return 0;
#endif
}
