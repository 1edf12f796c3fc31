/* Every op of the CUDA backend against the CPU backend, in the exact fp32 mode (TF32 off), on
 * fresh random inputs. Pure outputs are poisoned with NaN before each GPU run, so an element the
 * kernel never wrote fails the check; accumulating outputs (every backward adds into its
 * gradients) start from the same random values on both sides, so a kernel that overwrites
 * instead of adding fails too. Tolerance: 1e-5 relative (whole-tensor L2); NaN never passes.
 * NVFP4 quantization must match byte for byte. Determinism: the ops whose reductions could
 * vary run twice and must give the same bits. Without a GPU it says so and exits 77 (skipped). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/ops.h"
#include "tests/check.h"

#ifndef QWEN3_HAVE_CUDA
int main(void) {
  printf("test_cuda_ops: this build has no CUDA backend; skipped\n");
  return 77;
}
#else
#include "kernels/cuda/cuda.h"   /* cuda_ctx.tf32: the test switches modes between ops */
#include "kernels/cuda/cuda_device.h"

#define TOL 1e-5

static const struct backend *cpu = &backend_cpu, *gpu;

/* ---- data ---------------------------------------------------------------------------------- */

static uint64_t rng = 0x5eed;

static double uniform(double lo, double hi) {
  return lo + (hi - lo) * (double)(splitmix64(&rng) >> 11) * 0x1.0p-53;
}

static float *rand_floats(size_t n, double lo, double hi) {
  float *a = xmalloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) a[i] = (float)uniform(lo, hi);
  return a;
}

static int32_t *rand_ints(size_t n, int lo, int hi) {
  int32_t *a = xmalloc((n ? n : 1) * sizeof(int32_t));
  for (size_t i = 0; i < n; i++) a[i] = lo + (int32_t)uniform(0, hi - lo);
  return a;
}

/* device copy of a host array */
static void *up(const void *host, size_t bytes) {
  void *d = gpu->alloc(bytes);
  if (!d) die("test: out of GPU memory (%zu bytes)", bytes);
  gpu->to_device(d, host, bytes);
  return d;
}

/* device buffer filled with NaN: a poisoned output */
static float *poisoned(size_t n) {
  float *nan = xmalloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) nan[i] = NAN;
  float *d = up(nan, n * sizeof(float));
  free(nan);
  return d;
}

static float *down(const float *d, size_t n) {
  float *h = xmalloc((n ? n : 1) * sizeof(float));
  gpu->to_host(h, d, n * sizeof(float));
  return h;
}

static double rel_err(const float *a, const float *ref, size_t n) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - ref[i];
    diff += d * d;
    norm += (double)ref[i] * ref[i];
  }
  return sqrt(diff) / (norm > 0 ? sqrt(norm) : 1.0);
}

static float *clone(const float *a, size_t n) {
  float *c = xmalloc((n ? n : 1) * sizeof(float));
  memcpy(c, a, n * sizeof(float));
  return c;
}

/* Compares a device result with the CPU's, then frees the device buffer. For an accumulating
 * output, `init` holds the values both sides started from, and what is compared is what each
 * added: a small gradient added to large starting values cannot hide inside them. Adding into
 * those values rounds the totals, though, on each side and in each of the LM head's chunks, so
 * the difference of the additions may also hold a few roundings of the totals: 2^-22 of their
 * norm (an LM head gradient of ~1e-8 per element added to values of ~1 is at that floor). */
static void expect_from(const char *what, float *dev, const float *ref, const float *init,
                        size_t n, double tol) {
  float *h = down(dev, n);
  double diff = 0, norm = 0, total = 0;
  for (size_t i = 0; i < n; i++) {
    double a = h[i], b = ref[i];
    total += b * b;
    if (init) a -= init[i], b -= init[i];
    diff += (a - b) * (a - b);
    norm += b * b;
  }
  double e = sqrt(diff) / (norm > 0 ? sqrt(norm) : 1.0);
  double floor = init ? ldexp(sqrt(total), -22) : 0;
  int ok = sqrt(diff) <= tol * sqrt(norm) + floor;   /* false for NaN */
  printf("%-58s rel err %.2e%s\n", what, e, init && !(e <= tol) && ok ? " (rounding of the totals)" : "");
  CHECK(ok, "%s: rel err %.3e > %.0e (and above the rounding floor %.2e)", what, e, tol, floor);
  free(h);
  gpu->free(dev);
}

static void expect(const char *what, float *dev, const float *ref, size_t n, double tol) {
  expect_from(what, dev, ref, NULL, n, tol);
}

/* ---- the ops --------------------------------------------------------------------------------- */

static void test_embedding(int n, int dim, int vocab) {
  float *table = rand_floats((size_t)vocab * dim, -1, 1);
  int32_t *tok = rand_ints(n, 0, vocab / 4 + 1);   /* repeats: the backward must add them all */
  float *out = xmalloc((size_t)n * dim * sizeof(float));
  cpu->embedding_forward(out, tok, table, n, dim);
  float *d_table = up(table, (size_t)vocab * dim * 4), *d_out = poisoned((size_t)n * dim);
  int32_t *d_tok = up(tok, (size_t)n * 4);
  gpu->embedding_forward(d_out, d_tok, d_table, n, dim);
  char name[96];
  snprintf(name, sizeof name, "embedding forward n=%d dim=%d", n, dim);
  expect(name, d_out, out, (size_t)n * dim, 0);

  float *dout = rand_floats((size_t)n * dim, -1, 1);
  float *dtab = rand_floats((size_t)vocab * dim, -1, 1), *dtab0 = clone(dtab, (size_t)vocab * dim);
  float *d_dtab = up(dtab, (size_t)vocab * dim * 4), *d_dout = up(dout, (size_t)n * dim * 4);
  cpu->embedding_backward(dtab, dout, tok, n, dim);
  gpu->embedding_backward(d_dtab, d_dout, d_tok, n, dim);
  snprintf(name, sizeof name, "embedding backward n=%d dim=%d", n, dim);
  expect_from(name, d_dtab, dtab, dtab0, (size_t)vocab * dim, TOL);
  free(dtab0);
  gpu->free(d_table);
  gpu->free(d_tok);
  gpu->free(d_dout);
  free(table); free(tok); free(out); free(dout); free(dtab);
}

static void test_rmsnorm(int n, int dim) {
  float eps = 1e-6f;
  size_t sz = (size_t)n * dim;
  float *x = rand_floats(sz, -2, 2), *w = rand_floats(dim, 0.5, 1.5), *out = xmalloc(sz * 4);
  cpu->rmsnorm_forward(out, x, w, n, dim, eps);
  float *d_x = up(x, sz * 4), *d_w = up(w, dim * 4), *d_out = poisoned(sz);
  gpu->rmsnorm_forward(d_out, d_x, d_w, n, dim, eps);
  char name[96];
  snprintf(name, sizeof name, "rmsnorm forward n=%d dim=%d", n, dim);
  expect(name, d_out, out, sz, TOL);

  float *dout = rand_floats(sz, -1, 1), *dx = rand_floats(sz, -1, 1), *dw = rand_floats(dim, -1, 1);
  float *dx0 = clone(dx, sz), *dw0 = clone(dw, dim);
  float *d_dout = up(dout, sz * 4), *d_dx = up(dx, sz * 4), *d_dw = up(dw, dim * 4);
  cpu->rmsnorm_backward(dx, dw, dout, x, w, n, dim, eps);
  gpu->rmsnorm_backward(d_dx, d_dw, d_dout, d_x, d_w, n, dim, eps);
  snprintf(name, sizeof name, "rmsnorm backward dx n=%d dim=%d", n, dim);
  expect_from(name, d_dx, dx, dx0, sz, TOL);
  snprintf(name, sizeof name, "rmsnorm backward dw n=%d dim=%d", n, dim);
  expect_from(name, d_dw, dw, dw0, dim, TOL);
  free(dx0); free(dw0);
  gpu->free(d_x); gpu->free(d_w); gpu->free(d_dout);
  free(x); free(w); free(out); free(dout); free(dx); free(dw);
}

static void test_qk_norm_rope(int n, int heads, int hd, double theta, int max_pos) {
  float eps = 1e-6f;
  size_t sz = (size_t)n * heads * hd;
  float *x = rand_floats(sz, -2, 2), *w = rand_floats(hd, 0.5, 1.5), *out = xmalloc(sz * 4);
  int32_t *pos = rand_ints(n, 0, max_pos);
  cpu->qk_norm_rope_forward(out, x, w, pos, n, heads, hd, eps, theta);
  float *d_x = up(x, sz * 4), *d_w = up(w, hd * 4), *d_out = poisoned(sz);
  int32_t *d_pos = up(pos, n * 4);
  gpu->qk_norm_rope_forward(d_out, d_x, d_w, d_pos, n, heads, hd, eps, theta);
  char name[96];
  snprintf(name, sizeof name, "qk_norm_rope forward n=%d h=%d hd=%d pos<%d", n, heads, hd, max_pos);
  expect(name, d_out, out, sz, TOL);

  float *dout = rand_floats(sz, -1, 1), *dx = rand_floats(sz, -1, 1), *dw = rand_floats(hd, -1, 1);
  float *dx0 = clone(dx, sz), *dw0 = clone(dw, hd);
  float *d_dout = up(dout, sz * 4), *d_dx = up(dx, sz * 4), *d_dw = up(dw, hd * 4);
  cpu->qk_norm_rope_backward(dx, dw, dout, x, w, pos, n, heads, hd, eps, theta);
  gpu->qk_norm_rope_backward(d_dx, d_dw, d_dout, d_x, d_w, d_pos, n, heads, hd, eps, theta);
  snprintf(name, sizeof name, "qk_norm_rope backward dx hd=%d", hd);
  expect_from(name, d_dx, dx, dx0, sz, TOL);
  snprintf(name, sizeof name, "qk_norm_rope backward dw hd=%d", hd);
  expect_from(name, d_dw, dw, dw0, hd, TOL);
  free(dx0); free(dw0);
  gpu->free(d_x); gpu->free(d_w); gpu->free(d_pos); gpu->free(d_dout);
  free(x); free(w); free(out); free(pos); free(dout); free(dx); free(dw);
}

/* tq == tk: training (forward and backward); tq < tk: decoding against a cache of k_stride.
 * tol is TOL in the exact fp32 mode; the tensor-core path of the TF32 mode gets its own. */
static double attn_tol = TOL;

static void test_attention(int batch, int tq, int tk, int k_stride, int heads, int kv, int hd) {
  struct attn_shape s = {batch, tq, tk, k_stride, heads, kv, hd};
  size_t nq = (size_t)batch * tq * heads * hd, nk = (size_t)batch * k_stride * kv * hd;
  size_t nl = (size_t)batch * heads * tq;
  float *q = rand_floats(nq, -1, 1), *k = rand_floats(nk, -1, 1), *v = rand_floats(nk, -1, 1);
  float *ctx = xmalloc(nq * 4), *lse = xmalloc(nl * 4);
  cpu->attention_forward(ctx, lse, q, k, v, &s);
  float *d_q = up(q, nq * 4), *d_k = up(k, nk * 4), *d_v = up(v, nk * 4);
  float *d_ctx = poisoned(nq), *d_lse = poisoned(nl);
  gpu->attention_forward(d_ctx, d_lse, d_q, d_k, d_v, &s);
  char name[96];
  snprintf(name, sizeof name, "attention fwd b=%d tq=%d tk=%d h=%d/%d hd=%d ctx", batch, tq, tk,
           heads, kv, hd);
  expect(name, d_ctx, ctx, nq, attn_tol);
  snprintf(name, sizeof name, "attention fwd b=%d tq=%d tk=%d h=%d/%d hd=%d lse", batch, tq, tk,
           heads, kv, hd);
  expect(name, d_lse, lse, nl, attn_tol);

  if (tq == tk) {
    float *dctx = rand_floats(nq, -1, 1);
    float *dq = rand_floats(nq, -1, 1), *dk = rand_floats(nk, -1, 1), *dv = rand_floats(nk, -1, 1);
    float *dq0 = clone(dq, nq), *dk0 = clone(dk, nk), *dv0 = clone(dv, nk);
    float *d_dctx = up(dctx, nq * 4), *d_dq = up(dq, nq * 4), *d_dk = up(dk, nk * 4),
          *d_dv = up(dv, nk * 4);
    float *d_ctx2 = up(ctx, nq * 4), *d_lse2 = up(lse, nl * 4);
    /* a second run from the same start: determinism */
    float *d_dq2 = up(dq, nq * 4), *d_dk2 = up(dk, nk * 4), *d_dv2 = up(dv, nk * 4);
    cpu->attention_backward(dq, dk, dv, dctx, q, k, v, ctx, lse, &s);
    gpu->attention_backward(d_dq, d_dk, d_dv, d_dctx, d_q, d_k, d_v, d_ctx2, d_lse2, &s);
    gpu->attention_backward(d_dq2, d_dk2, d_dv2, d_dctx, d_q, d_k, d_v, d_ctx2, d_lse2, &s);
    float *a1 = down(d_dk, nk), *a2 = down(d_dk2, nk), *b1 = down(d_dq, nq), *b2 = down(d_dq2, nq);
    CHECK(!memcmp(a1, a2, nk * 4) && !memcmp(b1, b2, nq * 4),
          "attention backward is not deterministic (tq=%d hd=%d)", tq, hd);
    free(a1); free(a2); free(b1); free(b2);
    gpu->free(d_dq2); gpu->free(d_dk2); gpu->free(d_dv2);
    snprintf(name, sizeof name, "attention bwd T=%d h=%d/%d hd=%d dq", tq, heads, kv, hd);
    expect_from(name, d_dq, dq, dq0, nq, attn_tol);
    snprintf(name, sizeof name, "attention bwd T=%d h=%d/%d hd=%d dk", tq, heads, kv, hd);
    expect_from(name, d_dk, dk, dk0, nk, attn_tol);
    snprintf(name, sizeof name, "attention bwd T=%d h=%d/%d hd=%d dv", tq, heads, kv, hd);
    expect_from(name, d_dv, dv, dv0, nk, attn_tol);
    free(dq0); free(dk0); free(dv0);
    gpu->free(d_dctx); gpu->free(d_ctx2); gpu->free(d_lse2);
    free(dctx); free(dq); free(dk); free(dv);
  }
  gpu->free(d_q); gpu->free(d_k); gpu->free(d_v);
  free(q); free(k); free(v); free(ctx); free(lse);
}

static void test_elementwise(size_t n) {
  float *g = rand_floats(n, -4, 4), *u = rand_floats(n, -2, 2), *out = xmalloc(n * 4);
  cpu->swiglu_forward(out, g, u, n);
  float *d_g = up(g, n * 4), *d_u = up(u, n * 4), *d_out = poisoned(n);
  gpu->swiglu_forward(d_out, d_g, d_u, n);
  expect("swiglu forward", d_out, out, n, TOL);
  float *dout = rand_floats(n, -1, 1), *dg = rand_floats(n, -1, 1), *du = rand_floats(n, -1, 1);
  float *dg0 = clone(dg, n), *du0 = clone(du, n);
  float *d_dout = up(dout, n * 4), *d_dg = up(dg, n * 4), *d_du = up(du, n * 4);
  cpu->swiglu_backward(dg, du, dout, g, u, n);
  gpu->swiglu_backward(d_dg, d_du, d_dout, d_g, d_u, n);
  expect_from("swiglu backward dg", d_dg, dg, dg0, n, TOL);
  expect_from("swiglu backward du", d_du, du, du0, n, TOL);
  free(dg0); free(du0);

  float *a = rand_floats(n, -1, 1), *d_a = up(a, n * 4);
  cpu->add_inplace(a, g, n);
  gpu->add_inplace(d_a, d_g, n);
  cpu->scale(a, 0.37f, n);
  gpu->scale(d_a, 0.37f, n);
  expect("add_inplace then scale", d_a, a, n, 0);

  double s_cpu = cpu->sum_squares(g, n), s_gpu = gpu->sum_squares(d_g, n);
  double s_again = gpu->sum_squares(d_g, n);
  double e = fabs(s_gpu - s_cpu) / s_cpu;
  printf("%-58s rel err %.2e\n", "sum_squares", e);
  CHECK(e <= 1e-12, "sum_squares: %.17g vs %.17g", s_gpu, s_cpu);
  CHECK(s_gpu == s_again, "sum_squares is not deterministic");

  int rows = 333, cols = (int)(n / 333 < 517 ? n / 333 : 517);
  float *t = xmalloc((size_t)rows * cols * 4), *d_t = poisoned((size_t)rows * cols);
  cpu->transpose(t, g, rows, cols);
  gpu->transpose(d_t, d_g, rows, cols);
  expect("transpose 333 x 517", d_t, t, (size_t)rows * cols, 0);
  gpu->free(d_g); gpu->free(d_u); gpu->free(d_dout);
  free(g); free(u); free(out); free(dout); free(dg); free(du); free(a); free(t);
}

static void test_linear(int n, int in, int out_dim) {
  size_t nx = (size_t)n * in, nw = (size_t)out_dim * in, ny = (size_t)n * out_dim;
  float *x = rand_floats(nx, -1, 1), *w = rand_floats(nw, -0.1, 0.1), *y = xmalloc(ny * 4);
  cpu->linear_forward(y, x, w, n, in, out_dim);
  float *d_x = up(x, nx * 4), *d_w = up(w, nw * 4), *d_y = poisoned(ny);
  gpu->linear_forward(d_y, d_x, d_w, n, in, out_dim);
  char name[96];
  snprintf(name, sizeof name, "linear forward %d x %d -> %d", n, in, out_dim);
  expect(name, d_y, y, ny, TOL);
  float *dy = rand_floats(ny, -1, 1), *dx = rand_floats(nx, -1, 1), *dw = rand_floats(nw, -1, 1);
  float *dx0 = clone(dx, nx), *dw0 = clone(dw, nw);
  float *d_dy = up(dy, ny * 4), *d_dx = up(dx, nx * 4), *d_dw = up(dw, nw * 4);
  cpu->linear_backward(dx, dw, dy, x, w, n, in, out_dim);
  gpu->linear_backward(d_dx, d_dw, d_dy, d_x, d_w, n, in, out_dim);
  snprintf(name, sizeof name, "linear backward dx %d x %d -> %d", n, in, out_dim);
  expect_from(name, d_dx, dx, dx0, nx, TOL);
  snprintf(name, sizeof name, "linear backward dw %d x %d -> %d", n, in, out_dim);
  expect_from(name, d_dw, dw, dw0, nw, TOL);
  free(dx0); free(dw0);
  gpu->free(d_x); gpu->free(d_w); gpu->free(d_dy);
  free(x); free(w); free(y); free(dy); free(dx); free(dw);
}

static void test_lm_head(int n, int dim, int vocab) {
  size_t nx = (size_t)n * dim, nw = (size_t)vocab * dim;
  float *x = rand_floats(nx, -1, 1), *w = rand_floats(nw, -0.2, 0.2);
  int32_t *tgt = rand_ints(n, 0, vocab);
  for (int i = 0; i < n; i += 7) tgt[i] = -1;   /* masked rows: no loss, no gradient */
  float *nll = xmalloc(n * 4), *g_nll = xmalloc(n * 4);
  float *dx = rand_floats(nx, -1, 1), *dw = rand_floats(nw, -1, 1);
  float *dx0 = clone(dx, nx), *dw0 = clone(dw, nw);
  float *d_x = up(x, nx * 4), *d_w = up(w, nw * 4), *d_dx = up(dx, nx * 4), *d_dw = up(dw, nw * 4);
  int32_t *d_t = up(tgt, n * 4);
  float scale = 1.0f / n;
  for (int i = 0; i < n; i++) g_nll[i] = NAN;
  cpu->lm_head_loss(nll, dx, dw, x, w, tgt, n, dim, vocab, scale);
  gpu->lm_head_loss(g_nll, d_dx, d_dw, d_x, d_w, d_t, n, dim, vocab, scale);
  char name[96];
  double e = rel_err(g_nll, nll, n);
  snprintf(name, sizeof name, "lm_head_loss nll n=%d dim=%d vocab=%d", n, dim, vocab);
  printf("%-58s rel err %.2e\n", name, e);
  CHECK(e <= TOL, "%s: rel err %.3e", name, e);
  snprintf(name, sizeof name, "lm_head_loss dx vocab=%d", vocab);
  expect_from(name, d_dx, dx, dx0, nx, TOL);
  snprintf(name, sizeof name, "lm_head_loss dw vocab=%d", vocab);
  expect_from(name, d_dw, dw, dw0, nw, TOL);
  free(dx0); free(dw0);
  /* evaluation: no gradients asked */
  for (int i = 0; i < n; i++) g_nll[i] = NAN;
  gpu->lm_head_loss(g_nll, NULL, NULL, d_x, d_w, d_t, n, dim, vocab, 0);
  e = rel_err(g_nll, nll, n);
  CHECK(e <= TOL, "lm_head_loss without gradients: rel err %.3e", e);
  gpu->free(d_x); gpu->free(d_w); gpu->free(d_t);
  free(x); free(w); free(tgt); free(nll); free(g_nll); free(dx); free(dw);
}

static void test_adamw(size_t n) {
  float *p = rand_floats(n, -1, 1), *g = rand_floats(n, -1, 1), *m = rand_floats(n, -0.1, 0.1);
  float *v = rand_floats(n, 0, 0.01), *p0 = clone(p, n);
  float *d_p = up(p, n * 4), *d_g = up(g, n * 4), *d_m = up(m, n * 4), *d_v = up(v, n * 4);
  cpu->adamw_update(p, g, m, v, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
  gpu->adamw_update(d_p, d_g, d_m, d_v, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
  expect_from("adamw update of the params", d_p, p, p0, n, 1e-5);
  free(p0);
  expect("adamw first moments", d_m, m, n, 1e-6);
  expect("adamw second moments", d_v, v, n, 1e-6);
  gpu->free(d_g);
  free(p); free(g); free(m); free(v);
}

/* NVFP4: the same bytes as the CPU quantizer, and the same S_dec */
static void check_quantize(const char *what, const float *x, int rows, int cols, int tiles,
                           int sr, uint64_t seed) {
  size_t n = (size_t)rows * cols;
  float *q = xmalloc(n * 4), *d_x = up(x, n * 4), *d_q = poisoned(n);
  float dec = cpu->nvfp4_quantize_dequantize(q, x, rows, cols, tiles, sr, seed);
  float g_dec = gpu->nvfp4_quantize_dequantize(d_q, d_x, rows, cols, tiles, sr, seed);
  float *g_q = down(d_q, n);
  int same = isnan(dec) ? isnan(g_dec) : (dec == g_dec && !memcmp(q, g_q, n * 4));
  printf("%-58s %s\n", what, same ? "identical" : "DIFFERENT");
  CHECK(same, "%s: S_dec %g vs %g, bytes %s", what, g_dec, dec,
        memcmp(q, g_q, n * 4) ? "differ" : "equal");
  /* in place (xq aliases x) gives the same */
  if (!isnan(dec)) {
    gpu->nvfp4_quantize_dequantize(d_x, d_x, rows, cols, tiles, sr, seed);
    float *again = down(d_x, n);
    CHECK(!memcmp(again, q, n * 4), "%s: in-place result differs", what);
    free(again);
  }
  gpu->free(d_x); gpu->free(d_q);
  free(q); free(g_q);
}

static void test_nvfp4(void) {
  int rows = 96, cols = 160;
  size_t n = (size_t)rows * cols;
  float *x = rand_floats(n, -3, 3);
  const char *kinds[2] = {"1x16", "16x16"};
  char name[96];
  for (int tiles = 0; tiles < 2; tiles++)
    for (int sr = 0; sr < 2; sr++) {
      snprintf(name, sizeof name, "nvfp4 %s %s random", kinds[tiles], sr ? "SR" : "RN");
      check_quantize(name, x, rows, cols, tiles, sr, 0x1234 + tiles);
    }
  /* heavy tails: blocks whose scales underflow to E4M3 subnormals and zero */
  float *y = xmalloc(n * 4);
  for (size_t i = 0; i < n; i++) y[i] = x[i] * powf(10.0f, (float)uniform(-12, 4));
  for (int tiles = 0; tiles < 2; tiles++) {
    snprintf(name, sizeof name, "nvfp4 %s heavy-tailed", kinds[tiles]);
    check_quantize(name, y, rows, cols, tiles, 0, 0);
  }
  /* exact ties of the element rounding, zeros, and huge values */
  static const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, 0.0f, -0.0f};
  for (size_t i = 0; i < n; i++) y[i] = ties[i % 10] * ((i / 16) % 2 ? -1.0f : 1.0f);
  check_quantize("nvfp4 1x16 exact ties", y, rows, cols, 0, 0, 0);
  for (size_t i = 0; i < n; i++) y[i] = x[i] * 1e30f;
  check_quantize("nvfp4 1x16 near 1e30", y, rows, cols, 0, 1, 99);
  memset(y, 0, n * 4);
  check_quantize("nvfp4 1x16 zeros", y, rows, cols, 0, 0, 0);
  memcpy(y, x, n * 4);
  y[n / 2] = NAN;
  check_quantize("nvfp4 non-finite input gives NaN", y, rows, cols, 0, 0, 0);

  float *r = xmalloc(n * 4), *d_x = up(x, n * 4), *d_r = poisoned(n);
  cpu->nvfp4_rht(r, x, rows, cols, 0xa5c3);
  gpu->nvfp4_rht(d_r, d_x, rows, cols, 0xa5c3);
  expect("nvfp4 random Hadamard transform", d_r, r, n, 0);

  int m = 64, nn = 48, k = 160;
  float *a = rand_floats((size_t)m * k, -1, 1), *b = rand_floats((size_t)nn * k, -1, 1);
  float *c = rand_floats((size_t)m * nn, -1, 1), *c0 = clone(c, (size_t)m * nn);
  float *d_a = up(a, (size_t)m * k * 4), *d_b = up(b, (size_t)nn * k * 4);
  float *d_c = up(c, (size_t)m * nn * 4);
  cpu->nvfp4_gemm(c, a, 0.5f, b, 0.25f, m, nn, k, 1.0f);
  gpu->nvfp4_gemm(d_c, d_a, 0.5f, d_b, 0.25f, m, nn, k, 1.0f);
  expect_from("nvfp4 gemm (beta 1)", d_c, c, c0, (size_t)m * nn, TOL);
  free(c0);
  gpu->free(d_x); gpu->free(d_a); gpu->free(d_b);
  free(x); free(y); free(r); free(a); free(b); free(c);
}

int main(void) {
  if (cuda_device_count() == 0) {
    printf("test_cuda_ops: no GPU; skipped\n");
    return 77;
  }
  setenv("QWEN3_CUDA_TF32", "0", 1);        /* the exact fp32 mode */
  setenv("QWEN3_CUDA_SCRATCH_MB", "64", 1);  /* small arena: the LM head runs in several chunks */
  gpu = &backend_cuda;
  gpu->init(0, 1);
  cpu->init(0, 1);

  test_embedding(300, 96, 500);
  test_rmsnorm(200, 2560);
  test_rmsnorm(37, 64);
  test_qk_norm_rope(130, 4, 128, 5e6, 40000);
  test_qk_norm_rope(77, 6, 16, 1e4, 300);
  test_attention(2, 77, 77, 77, 4, 2, 16);
  test_attention(1, 64, 64, 64, 6, 3, 8);
  test_attention(1, 300, 300, 300, 8, 2, 128);
  test_attention(1, 257, 257, 257, 32, 8, 128);
  test_attention(2, 130, 130, 130, 4, 4, 64);
  test_attention(1, 1, 300, 512, 8, 2, 128);    /* decode: one query against a cache */
  test_attention(1, 5, 100, 128, 4, 2, 16);     /* a prefill continuing a cache */
  /* the TF32 mode's tensor-core attention (head_dim 64 and 128, 16 queries or more) against
   * the CPU: TF32 rounds operands to 10 mantissa bits, so 3e-3 relative */
  cuda_ctx.tf32 = 1;
  attn_tol = 3e-3;
  test_attention(2, 80, 80, 80, 4, 2, 64);
  test_attention(1, 100, 100, 100, 2, 1, 128);
  test_attention(1, 16, 16, 16, 8, 2, 64);
  test_attention(1, 512, 512, 512, 32, 8, 128);
  test_attention(2, 40, 150, 160, 4, 4, 128);   /* queries after a cache */
  test_attention(1, 130, 200, 210, 3, 1, 64);
  test_attention(1, 1, 100, 128, 8, 2, 128);    /* decode stays on the fp32 kernels */
  cuda_ctx.tf32 = 0;
  attn_tol = TOL;
  test_elementwise(333 * 517);
  test_linear(100, 96, 160);
  test_linear(256, 2560, 1024);
  test_lm_head(70, 64, 1000);
  test_lm_head(300, 128, 151936);   /* three chunks of the arena at the real vocabulary */
  test_adamw(100003);
  test_nvfp4();
  size_t in_use, peak;
  gpu->memory(&in_use, &peak);
  printf("device memory: %.1f MiB in use at the end (arena included), %.1f MiB peak\n",
         in_use / 1048576.0, peak / 1048576.0);
  return checks_report();
}
#endif
