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
  nvfp4_linear_forward(&w, 0, P_GATE, P_GATE, y, x, n, in, out);
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
  nvfp4_linear_forward(&w, 0, P_GATE, P_GATE, y, x, N, IN, OUT);
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  CHECK(!nvfp4_nonfinite_operand(&w, msg, sizeof msg), "finite operands reported: %s", msg);
  dy[5] = INFINITY;
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  int named = nvfp4_nonfinite_operand(&w, msg, sizeof msg);
  printf("an Inf in dY: %s\n", named ? msg : "(nothing named)");
  CHECK(named && strstr(msg, "gate_proj") && strstr(msg, "output gradient (Dgrad)"),
        "an Inf in dY is named as gate_proj's Dgrad output gradient: \"%s\"", msg);
  x[3] = NAN;
  nvfp4_linear_forward(&w, 0, P_GATE, P_GATE, y, x, N, IN, OUT);
  CHECK(isnan(y[0]) && isnan(y[N * OUT - 1]), "a NaN input spreads through the whole product");
  x[3] = 1.0f, dy[5] = 0.0f;   /* finite operands again clear their scales */
  nvfp4_linear_forward(&w, 0, P_GATE, P_GATE, y, x, N, IN, OUT);
  nvfp4_linear_backward(&w, 0, 0, P_GATE, P_GATE, dx, dw, dy, x, N, IN, OUT, ACC_DX | ACC_DW);
  CHECK(!nvfp4_nonfinite_operand(&w, msg, sizeof msg), "finite again, yet reported: %s", msg);
  w.weights[w.params[w.layer_param[0][P_DOWN]].offset] = NAN;
  worker_prepare_step(&w, 2);
  nvfp4_linear_forward(&w, 0, P_GATE, P_GATE, y, x, N, IN, OUT);   /* quantizes the layer */
  named = nvfp4_nonfinite_operand(&w, msg, sizeof msg);
  printf("a NaN weight: %s\n", named ? msg : "(nothing named)");
  CHECK(named && strstr(msg, "down_proj") && strstr(msg, "'s weight"),
        "a NaN master weight is named: \"%s\"", msg);
  worker_free(&w);
  free(x), free(y), free(dy), free(dx), free(dw);
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
  return checks_report();
}
