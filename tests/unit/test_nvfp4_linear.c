/* One NVFP4 linear layer through the engine's own path (worker/nvfp4_linear.c on a worker with
 * the CPU backend): Fprop, Dgrad and Wgrad against the independent numpy reference
 * (tests/nvfp4_reference.py, tests/fixtures/nvfp4/linear.bin), which quantizes, transforms and
 * multiplies in float64 from REFERENCE.md. Quantized operands are exact in both, so the only
 * difference left is the fp32 accumulation of the GEMM: each result must be within 1e-6
 * relative L2, and every element within 1e-6 of the result's largest magnitude. A wrong
 * rounding, a missing transform or a wrong draw moves whole quantization steps (percents).
 * Cases: the recipe (RHT, stochastic rounding, 16x16 weights) and every part switched off. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "tests/check.h"
#include "kernels/nvfp4.h"
#include "worker/block.h"
#include "worker/nvfp4_linear.h"
#include "worker/worker.h"

#define FIXTURE "tests/fixtures/nvfp4/linear.bin"
#define TOL 1e-6

struct reader {
  const char *p, *end;
};

static const void *take(struct reader *r, size_t bytes) {
  if ((size_t)(r->end - r->p) < bytes) die("%s truncated", FIXTURE);
  const void *at = r->p;
  r->p += bytes;
  return at;
}

static int32_t take_i32(struct reader *r) {
  int32_t v;
  memcpy(&v, take(r, 4), 4);
  return v;
}

static uint64_t take_u64(struct reader *r) {
  uint64_t v;
  memcpy(&v, take(r, 8), 8);
  return v;
}

static float *take_f32(struct reader *r, size_t n) {
  float *x = xmalloc(n * sizeof(float));
  memcpy(x, take(r, n * sizeof(float)), n * sizeof(float));
  return x;
}

static void compare(const char *what, const char *name, const float *got, const float *ref,
                    size_t n) {
  double diff = 0, norm = 0, worst = 0, amax = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)got[i] - ref[i];
    diff += d * d;
    norm += (double)ref[i] * ref[i];
    worst = fmax(worst, fabs(d));
    amax = fmax(amax, fabs(ref[i]));
  }
  double rel = sqrt(diff / norm), elem = worst / amax;
  printf("%-7s %-6s relative L2 %.1e, worst element %.1e of max|ref|\n", name, what, rel, elem);
  CHECK(rel <= TOL && elem <= TOL, "%s: %s off the reference: relative L2 %.2e, worst element "
        "%.2e of max|ref| (tol %.0e)", name, what, rel, elem, TOL);
}

/* The forward of the fixtures' linear, gate_proj, as a stage of its own. */
static void gate_forward(struct worker *w, float *y, const float *x, int n, int in, int out) {
  const enum layer_param gate = P_GATE;
  void *outs[1] = {y};
  nvfp4_linear_forward(w, 0, &gate, outs, &out, 1, x, n, in);
}

static void run_case(struct reader *r) {
  char name[33] = {0};
  memcpy(name, take(r, 32), 32);
  int n = take_i32(r), in = take_i32(r), out = take_i32(r);
  struct nvfp4_policy pol = {.first_layer = 0, .end_layer = 1};
  pol.rht = take_i32(r);
  pol.stochastic = take_i32(r);
  pol.weight_2d = take_i32(r);
  int step = take_i32(r), layer = take_i32(r), param = take_i32(r);
  pol.seed = take_u64(r);
  uint64_t stream = take_u64(r);
  float *x = take_f32(r, (size_t)n * in), *wt = take_f32(r, (size_t)out * in);
  float *dy = take_f32(r, (size_t)n * out), *y_ref = take_f32(r, (size_t)n * out);
  float *dx_ref = take_f32(r, (size_t)n * in), *dw_ref = take_f32(r, (size_t)out * in);

  /* one layer whose gate_proj is the fixture's linear: [intermediate, hidden] = [out, in] */
  CHECK(param == P_GATE && layer == 0, "%s: the fixture keys gate_proj of layer 0 (%d, %d)",
        name, param, layer);
  struct qwen3_config cfg = {.hidden_size = in, .num_layers = 1, .num_heads = 2,
                             .num_kv_heads = 1, .head_dim = in / 2, .intermediate_size = out,
                             .vocab_size = 32, .rope_theta = 1e6, .rms_norm_eps = 1e-6,
                             .max_seq_len = n};
  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, 0, 1, 1, 1, 1, n, 1, 0, DT_F32);
  worker_plan_nvfp4(&plan, &pol);
  struct worker w;
  worker_init(&w, &backend_cpu, &plan);
  const struct param *p = &w.params[w.layer_param[0][P_GATE]];
  CHECK(p->rows == out && p->cols == in, "%s: gate_proj is %d x %d", name, p->rows, p->cols);
  memset(w.weights, 0, plan.param_floats * sizeof(float));
  memcpy(w.weights + p->offset, wt, sizeof(float) * out * in);
  worker_prepare_step(&w, step);   /* keys the draws by step; the forward quantizes W */
  w.stream[0] = stream;            /* as worker_forward sets it from the micro-batch */

  float *y = xcalloc((size_t)n * out, sizeof(float)), *dx = xcalloc((size_t)n * in, sizeof(float));
  float *dw = xcalloc((size_t)out * in, sizeof(float));
  /* poisoned: without ACC_DX and ACC_DW the backward overwrites both and reads neither */
  for (size_t i = 0; i < (size_t)n * in; i++) dx[i] = NAN;
  for (size_t i = 0; i < (size_t)out * in; i++) dw[i] = NAN;
  gate_forward(&w, y, x, n, in, out);
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, n, in, out, 0);
  compare("Fprop", name, y, y_ref, (size_t)n * out);
  compare("Dgrad", name, dx, dx_ref, (size_t)n * in);
  compare("Wgrad", name, dw, dw_ref, (size_t)out * in);

  worker_free(&w);
  free(x), free(wt), free(dy), free(y_ref), free(dx_ref), free(dw_ref), free(y), free(dx), free(dw);
}

/* A non-finite value reaching an NVFP4 operand leaves a NaN tensor scale (and a NaN product),
 * and the worker names the operand and its weight: the trainer's stop message. */
static void test_nonfinite(void) {
  enum { N = 16, IN = 32, OUT = 48 };
  struct qwen3_config cfg = {.hidden_size = IN, .num_layers = 1, .num_heads = 2,
                             .num_kv_heads = 1, .head_dim = IN / 2, .intermediate_size = OUT,
                             .vocab_size = 32, .rope_theta = 1e6, .rms_norm_eps = 1e-6,
                             .max_seq_len = N};
  struct nvfp4_policy pol = {.first_layer = 0, .end_layer = 1, .rht = 1, .stochastic = 1,
                             .weight_2d = 1, .seed = 7};
  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, 0, 1, 1, 1, 1, N, 1, 0, DT_F32);
  worker_plan_nvfp4(&plan, &pol);
  struct worker w;
  worker_init(&w, &backend_cpu, &plan);
  for (size_t i = 0; i < plan.param_floats; i++) w.weights[i] = 0.01f * (float)(i % 13);
  worker_prepare_step(&w, 1);
  float *x = xcalloc((size_t)N * IN, sizeof(float)), *y = xcalloc((size_t)N * OUT, sizeof(float));
  float *dy = xcalloc((size_t)N * OUT, sizeof(float)), *dx = xcalloc((size_t)N * IN, sizeof(float));
  float *dw = xcalloc((size_t)OUT * IN, sizeof(float));
  for (int i = 0; i < N * IN; i++) x[i] = (float)(i % 7) - 3.0f;
  for (int i = 0; i < N * OUT; i++) dy[i] = 0.1f * (float)(i % 5);
  char msg[512] = "";
  gate_forward(&w, y, x, N, IN, OUT);
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  CHECK(!nvfp4_nonfinite_operand(&w, msg, sizeof msg), "finite operands reported: %s", msg);
  dy[5] = INFINITY;
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  int named = nvfp4_nonfinite_operand(&w, msg, sizeof msg);
  printf("an Inf in dY: %s\n", named ? msg : "(nothing named)");
  CHECK(named && strstr(msg, "gate_proj") && strstr(msg, "output gradient (Dgrad)"),
        "an Inf in dY is named as gate_proj's Dgrad output gradient: \"%s\"", msg);
  x[3] = NAN;
  gate_forward(&w, y, x, N, IN, OUT);
  CHECK(isnan(y[0]) && isnan(y[N * OUT - 1]), "a NaN input spreads through the whole product");
  x[3] = 1.0f, dy[5] = 0.0f;   /* finite operands again clear their scales */
  gate_forward(&w, y, x, N, IN, OUT);
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  CHECK(!nvfp4_nonfinite_operand(&w, msg, sizeof msg), "finite again, yet reported: %s", msg);
  w.weights[w.params[w.layer_param[0][P_DOWN]].offset] = NAN;
  worker_prepare_step(&w, 2);
  gate_forward(&w, y, x, N, IN, OUT);   /* quantizes the layer */
  named = nvfp4_nonfinite_operand(&w, msg, sizeof msg);
  printf("a NaN weight: %s\n", named ? msg : "(nothing named)");
  CHECK(named && strstr(msg, "down_proj") && strstr(msg, "'s weight"),
        "a NaN master weight is named: \"%s\"", msg);
  worker_free(&w);
  free(x), free(y), free(dy), free(dx), free(dw);
}

/* Decoding from packed weights (ops.h nvfp4_pack, nvfp4_gemv_packed): a KV cache packs the
 * stage's NVFP4 matrices; their codes times their scales are the quantized weight's values bit
 * for bit, and each linear stage of the block (q|k|v: 3 matrices of 64, 32 and 32 rows; o;
 * gate|up; down) of at most NVFP4_PACKED_DECODE_ROWS rows inside that cache's decoding makes
 * one packed call for all its matrices (counted through a backend whose op is wrapped) and
 * gives the GEMM path's result within the fp32 accumulation's difference; more rows, or no
 * cache, take the GEMM, and a cache for more sequences packs nothing. A decoding step through
 * the block (worker_infer) makes one packed call per linear stage. The wrapper also runs
 * each matrix of a call alone (count 1), which must give the grouped call's bits. Both weight
 * layouts. */
static int packed_calls, packed_count, packed_matrices;
static void counted_gemv(void *const *outs, const void *xq, const float *dec_x,
                         const uint8_t *const *codes, const uint8_t *const *scales,
                         const float *const *dec_w, const int *out_dims, int count, int n,
                         int in_dim) {
  packed_calls++;
  packed_count = count;
  packed_matrices += count;
  backend_cpu.nvfp4_gemv_packed(outs, xq, dec_x, codes, scales, dec_w, out_dims, count, n, in_dim);
  for (int j = 0; j < count; j++) {
    size_t bytes = (size_t)n * out_dims[j] * sizeof(float);
    void *alone = xmalloc(bytes);
    backend_cpu.nvfp4_gemv_packed(&alone, xq, dec_x, &codes[j], &scales[j], &dec_w[j],
                                  &out_dims[j], 1, n, in_dim);
    CHECK(memcmp(alone, outs[j], bytes) == 0,
          "nvfp4_gemv_packed: matrix %d of %d ([%d, %d]) alone gives the grouped call's bits", j,
          count, out_dims[j], in_dim);
    free(alone);
  }
}

/* The block's linear stages on x (as wide as the widest input) through the GEMM (no cache) and
 * within the cache kv: one packed call per stage, of all its matrices, for few enough rows. */
static void check_packed_stages(struct worker *w, struct kv_cache *kv, const float *x,
                                int weight_2d) {
  enum { ROWS = NVFP4_PACKED_DECODE_ROWS + 1 };
  const struct qwen3_config *c = &w->plan.cfg;
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++) {
    const struct stage *s = &QWEN3_BLOCK[i];
    if (s->op != OP_LINEAR) continue;
    int in = (int)slot_width(c, s->in[0]), outs[3];
    float *ref[3], *got[3];
    for (int k = 0; k < s->n_params; k++) {
      outs[k] = (int)slot_width(c, s->out[k]);
      ref[k] = xcalloc((size_t)ROWS * outs[k], sizeof(float));
      got[k] = xcalloc((size_t)ROWS * outs[k], sizeof(float));
    }
    for (int n = 1; n <= ROWS; n++) {
      w->kv = NULL;
      nvfp4_linear_forward(w, 0, s->params, (void **)ref, outs, s->n_params, x, n, in);
      for (int k = 0; k < s->n_params; k++)
        for (int j = 0; j < n * outs[k]; j++) got[k][j] = NAN;
      int before = packed_calls;
      w->kv = kv;
      nvfp4_linear_forward(w, 0, s->params, (void **)got, outs, s->n_params, x, n, in);
      w->kv = NULL;
      int calls = packed_calls - before, want = n <= NVFP4_PACKED_DECODE_ROWS;
      CHECK(calls == want && (!want || packed_count == s->n_params),
            "%s, %d rows in a decoding step: %s path taken (%d packed calls of %d matrices)",
            s->name, n, want ? "the packed" : "the GEMM", calls, packed_count);
      for (int k = 0; k < s->n_params; k++) {
        char what[64];
        snprintf(what, sizeof what, "%s %s[%d] n%d", weight_2d ? "16x16" : "1x16", s->name, k,
                 n);
        compare(what, "packed", got[k], ref[k], (size_t)n * outs[k]);
      }
    }
    for (int k = 0; k < s->n_params; k++) free(ref[k]), free(got[k]);
  }
}

static void test_packed_decode(int weight_2d) {
  enum { T = 8, IN = 64, OUT = 96, MAX_LEN = 16 };
  struct qwen3_config cfg = {.hidden_size = IN, .num_layers = 1, .num_heads = 2,
                             .num_kv_heads = 1, .head_dim = IN / 2, .intermediate_size = OUT,
                             .vocab_size = 32, .rope_theta = 1e6, .rms_norm_eps = 1e-6,
                             .max_seq_len = MAX_LEN};
  struct nvfp4_policy pol = {.first_layer = 0, .end_layer = 1, .rht = 1, .stochastic = 1,
                             .weight_2d = weight_2d, .seed = 7, .packed_decode = 0};
  struct backend be = backend_cpu;
  be.nvfp4_gemv_packed = counted_gemv;
  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, 0, 1, 1, 1, 1, T, 1, 0, DT_F32);
  worker_plan_nvfp4(&plan, &pol);
  CHECK(plan.fp4_bytes == 0, "eval.packed_nvfp4 false: no packed weights planned");
  pol.packed_decode = 1;
  worker_plan_make(&plan, &cfg, 0, 1, 1, 1, 1, T, 1, 0, DT_F32);
  worker_plan_nvfp4(&plan, &pol);
  CHECK(plan.fp4_bytes > 0, "an NVFP4 stage plans packed weights for decoding");
  struct worker w;
  worker_init(&w, &be, &plan);
  uint64_t rng = 12345;
  for (size_t i = 0; i < plan.param_floats; i++) {   /* heavy-tailed, signed, some zero */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    float u = (float)((rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
    w.weights[i] = i % 97 == 0 ? 0.0f : u * u * u * 8.0f;
  }
  worker_prepare_step(&w, 1);
  const struct param *gate = &w.params[w.layer_param[0][P_GATE]];

  /* the packed matrix against the quantizer's values for the same layout, and its S_dec */
  uint8_t *codes = xmalloc((size_t)OUT * IN / 2), *scales = xmalloc((size_t)OUT * IN / 16);
  float *wq = xmalloc((size_t)OUT * IN * sizeof(float));
  float *back = xmalloc((size_t)OUT * IN * sizeof(float)), dec_p, dec_q;
  enum nvfp4_layout layout = weight_2d ? NVFP4_TILES : NVFP4_ROWS;
  be.nvfp4_pack(codes, scales, &dec_p, w.weights + gate->offset, OUT, IN, layout);
  be.nvfp4_quantize(wq, &dec_q, w.weights + gate->offset, DT_F32, OUT, IN, layout, 0, 0, -1);
  nvfp4_dequantize(back, codes, scales, 1.0f, OUT, IN, NVFP4_BLOCK_1X16);
  CHECK(dec_p == dec_q && memcmp(back, wq, (size_t)OUT * IN * sizeof(float)) == 0,
        "%s: packed codes x scales equal the quantizer's q * s_b bit for bit, S_dec %g (%g)",
        weight_2d ? "16x16" : "1x16", dec_p, dec_q);
  float keep = w.weights[gate->offset + 5];
  w.weights[gate->offset + 5] = INFINITY;
  be.nvfp4_pack(codes, scales, &dec_p, w.weights + gate->offset, OUT, IN, layout);
  CHECK(isnan(dec_p), "a non-finite weight packs to a NaN S_dec");
  w.weights[gate->offset + 5] = keep;

  /* the block's linear stages through the engine: without a cache (the GEMM), then within
   * one (packed) */
  float *x = xcalloc((size_t)T * OUT, sizeof(float));
  for (int i = 0; i < T * OUT; i++) x[i] = (float)((i * 37) % 23) / 7.0f - 1.5f;
  struct kv_cache kv;
  kv_cache_init(&kv, &w, MAX_LEN, 1);
  CHECK(kv.fp4 != NULL, "a KV cache of an NVFP4 stage holds its packed weights");
  check_packed_stages(&w, &kv, x, weight_2d);

  /* a prompt of 3 tokens, then a decoding step of one: one packed call per linear stage */
  int stages = 0, matrices = 0;
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++)
    if (QWEN3_BLOCK[i].op == OP_LINEAR) stages++, matrices += QWEN3_BLOCK[i].n_params;
  const int32_t tokens[4] = {1, 5, 7, 2}, positions[4] = {0, 1, 2, 3};
  float *logits = xmalloc((size_t)cfg.vocab_size * sizeof(float));
  worker_infer(&w, tokens, positions, 3, &kv, 0, logits, NULL);
  int calls = packed_calls;
  packed_matrices = 0;
  worker_infer(&w, tokens + 3, positions + 3, 1, &kv, INFER_EACH, logits, NULL);
  CHECK(packed_calls - calls == stages && packed_matrices == matrices,
        "a decoding step: %d packed calls of %d matrices (the block's %d linear stages of %d)",
        packed_calls - calls, packed_matrices, stages, matrices);
  free(logits);
  kv_cache_free(&kv, &w);
  kv_cache_init(&kv, &w, MAX_LEN, NVFP4_PACKED_DECODE_ROWS + 1);
  CHECK(kv.fp4 == NULL, "a KV cache of %d sequences does not pack the weights",
        NVFP4_PACKED_DECODE_ROWS + 1);
  kv_cache_free(&kv, &w);
  worker_free(&w);
  free(codes), free(scales), free(wq), free(back), free(x);
}

int main(void) {
  size_t len;
  char *buf = read_file(FIXTURE, &len);
  if (!buf) die("cannot read %s (run tests from the repository root)", FIXTURE);
  struct reader r = {buf, buf + len};
  if (memcmp(take(&r, 8), "NVFP4LN1", 8) != 0) die("%s: not an NVFP4LN1 file", FIXTURE);
  uint32_t count;
  memcpy(&count, take(&r, 4), 4);
  for (uint32_t i = 0; i < count; i++) run_case(&r);
  CHECK(count >= 2 && r.p == r.end, "%s: %u cases, read to the end", FIXTURE, count);
  free(buf);
  test_nonfinite();
  test_packed_decode(1);
  test_packed_decode(0);
  return checks_report();
}
