/* The CPU backend against plain double-precision implementations written here from the
 * definitions (HF transformers Qwen3 in fp32, torch.optim.AdamW): every forward is compared
 * with its reference, every backward with central finite differences of the reference forward
 * under a random projection of the output, and every backward is called twice to show that it
 * accumulates. Prints one line per check and ends with "N passed, M failed". */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/nvfp4.h"
#include "kernels/ops.h"
#include "tests/argmax_cases.h"

static const struct backend *be = &backend_cpu;
static int passed, failed;

#define FORWARD_TOL 1e-5 /* fp32 op vs double reference, relative L2 */
#define GRAD_TOL 1e-4    /* fp32 backward vs finite differences of the double forward */
#define ACCUM_TOL 1e-5   /* the second backward call adds what the first added */
#define FD_STEP 1e-5

static void check(const char *name, double err, double tol) {
  int ok = err <= tol; /* false for NaN */
  printf("%s %-44s rel err %.2e (tol %.0e)\n", ok ? "PASS" : "FAIL", name, err, tol);
  if (ok) passed++;
  else failed++;
}

/* ---- data --------------------------------------------------------------------------------- */

static uint64_t rng_state = 12345;

static double uniform(double lo, double hi) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return lo + (hi - lo) * (double)(z >> 11) / 9007199254740992.0;
}

static float *rand_floats(size_t n, double lo, double hi) {
  float *a = xmalloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) a[i] = (float)uniform(lo, hi);
  return a;
}

static int32_t *rand_ints(int n, int lo, int hi) { /* each in [lo, hi) */
  int32_t *a = xmalloc((size_t)(n ? n : 1) * sizeof(int32_t));
  for (int i = 0; i < n; i++) a[i] = lo + (int32_t)(uniform(0, hi - lo));
  return a;
}

static double *to_double(const float *a, size_t n) {
  double *d = xmalloc((n ? n : 1) * sizeof(double));
  for (size_t i = 0; i < n; i++) d[i] = a[i];
  return d;
}

static double *new_doubles(size_t n) { return xcalloc(n ? n : 1, sizeof(double)); }

static float *copy_floats(const float *a, size_t n) {
  float *c = xmalloc((n ? n : 1) * sizeof(float));
  memcpy(c, a, n * sizeof(float));
  return c;
}

static double rel_err(const double *a, const double *ref, size_t n) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < n; i++) {
    diff += (a[i] - ref[i]) * (a[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return sqrt(diff) / (norm > 0 ? sqrt(norm) : 1.0);
}

static void check_forward(const char *name, const float *out, const double *ref, size_t n) {
  double *d = to_double(out, n);
  check(name, rel_err(d, ref, n), FORWARD_TOL);
  free(d);
}

/* ---- finite differences and accumulation ---------------------------------------------------- */

/* A double-precision reference forward: in[] are its inputs, out receives its output. */
typedef void (*forward_fn)(const void *shape, double *const *in, double *out);

/* d(r · f(in)) / d in[which], by central differences */
static double *finite_diff(forward_fn f, const void *shape, double *const *in, int which,
                           size_t in_n, size_t out_n, const double *r) {
  double *grad = new_doubles(in_n), *out = new_doubles(out_n);
  for (size_t e = 0; e < in_n; e++) {
    double saved = in[which][e], side[2];
    for (int s = 0; s < 2; s++) {
      in[which][e] = saved + (s ? -FD_STEP : FD_STEP);
      f(shape, in, out);
      side[s] = 0.0;
      for (size_t o = 0; o < out_n; o++) side[s] += r[o] * out[o];
    }
    in[which][e] = saved;
    grad[e] = (side[0] - side[1]) / (2 * FD_STEP);
  }
  free(out);
  return grad;
}

/* A gradient buffer that starts random, so that += is visible, and is snapshotted between the
 * two backward calls of a test. */
struct grad {
  float *g, *start, *once;
  size_t n;
};

/* A gradient buffer: random values for an op that only accumulates (embedding, LM head), or,
 * `poisoned`, NaN for an op whose first call has no ACC_DX / ACC_DW and must overwrite the
 * buffer without reading it (its second call, with them, adds); start is what the first call's
 * increment is measured from. */
static struct grad grad_new(size_t n, int poisoned) {
  struct grad b = {rand_floats(n, -1, 1), NULL, NULL, n};
  b.start = poisoned ? xcalloc(n, sizeof(float)) : copy_floats(b.g, n);
  for (size_t i = 0; poisoned && i < n; i++) b.g[i] = NAN;
  return b;
}

/* The acc argument of a backward's call 0 (overwrite) and 1 (add). */
static int call_acc(int call) { return call ? ACC_DX | ACC_DW : 0; }

static void grad_mark(struct grad *b) { b->once = copy_floats(b->g, b->n); }

/* The first call's increment against finite differences, the second's against the first. */
static void grad_verify(const char *op, const char *input, struct grad *b, const double *fd) {
  double *first = new_doubles(b->n), *second = new_doubles(b->n);
  for (size_t i = 0; i < b->n; i++) {
    first[i] = (double)b->once[i] - b->start[i];
    second[i] = (double)b->g[i] - b->once[i];
  }
  char name[96];
  snprintf(name, sizeof name, "%s backward d%s", op, input);
  check(name, rel_err(first, fd, b->n), GRAD_TOL);
  snprintf(name, sizeof name, "%s backward d%s accumulates", op, input);
  check(name, rel_err(second, first, b->n), ACCUM_TOL);
  free(first);
  free(second);
  free(b->g);
  free(b->start);
  free(b->once);
}

/* ---- memory ---------------------------------------------------------------------------------- */

static void test_memory(void) {
  size_t n = 1000;
  float *host = rand_floats(n, -1, 1), *back = rand_floats(n, -1, 1);
  float *a = be->alloc(n * sizeof(float)), *b = be->alloc(n * sizeof(float));
  double zero_sum = 0;
  be->sum_into(&zero_sum, a, n, 1);
  be->to_device(a, host, n * sizeof(float));
  be->copy(b, a, n * sizeof(float));
  be->to_host(back, b, n * sizeof(float));
  int same = memcmp(host, back, n * sizeof(float)) == 0;
  be->zero(b, n * sizeof(float));
  be->synchronize();
  double zeroed = 0;
  be->sum_into(&zeroed, b, n, 1);
  check("memory: zeroed alloc, round trip, zero", zero_sum + zeroed + (same ? 0 : 1), 0);
  be->free(a);
  be->free(b);
  free(host);
  free(back);
}

/* ---- embedding ------------------------------------------------------------------------------- */

struct embed_shape {
  int n, dim, vocab;
  const int32_t *tokens;
};

static void ref_embedding(const void *shape, double *const *in, double *out) {
  const struct embed_shape *s = shape;
  for (int i = 0; i < s->n; i++)
    for (int j = 0; j < s->dim; j++) out[i * s->dim + j] = in[0][s->tokens[i] * s->dim + j];
}

static void test_embedding(void) {
  int32_t tokens[] = {3, 0, 7, 3, 10, 3, 5}; /* repeats must add up in the backward */
  struct embed_shape s = {7, 9, 11, tokens};
  size_t out_n = (size_t)s.n * s.dim, table_n = (size_t)s.vocab * s.dim;
  float *table = rand_floats(table_n, -1, 1), *out = rand_floats(out_n, -1, 1);
  double *in[] = {to_double(table, table_n)}, *ref = new_doubles(out_n);
  be->embedding_forward(out, tokens, table, s.n, s.dim);
  ref_embedding(&s, in, ref);
  check_forward("embedding forward", out, ref, out_n);

  float *dout = rand_floats(out_n, -1, 1);
  double *r = to_double(dout, out_n);
  struct grad dtable = grad_new(table_n, 0);
  be->embedding_backward(dtable.g, dout, tokens, s.n, s.dim);
  grad_mark(&dtable);
  be->embedding_backward(dtable.g, dout, tokens, s.n, s.dim);
  double *fd = finite_diff(ref_embedding, &s, in, 0, table_n, out_n, r);
  grad_verify("embedding", "table", &dtable, fd);
  free(fd), free(r), free(dout), free(ref), free(in[0]), free(out), free(table);
}

/* ---- rmsnorm --------------------------------------------------------------------------------- */

struct norm_shape {
  int n, dim;
  double eps;
};

static void ref_rmsnorm(const void *shape, double *const *in, double *out) {
  const struct norm_shape *s = shape;
  for (int i = 0; i < s->n; i++) {
    const double *x = in[0] + (size_t)i * s->dim;
    double ms = 0.0;
    for (int j = 0; j < s->dim; j++) ms += x[j] * x[j] / s->dim;
    for (int j = 0; j < s->dim; j++) out[i * s->dim + j] = x[j] / sqrt(ms + s->eps) * in[1][j];
  }
}

static void test_rmsnorm(void) {
  struct norm_shape s = {6, 37, 1e-6};
  size_t n = (size_t)s.n * s.dim;
  float *x = rand_floats(n, -2, 2), *w = rand_floats(s.dim, 0.5, 1.5);
  float *out = rand_floats(n, -1, 1);
  double *in[] = {to_double(x, n), to_double(w, s.dim)}, *ref = new_doubles(n);
  be->rmsnorm_forward(out, x, w, s.n, s.dim, (float)s.eps);
  ref_rmsnorm(&s, in, ref);
  check_forward("rmsnorm forward", out, ref, n);

  float *dout = rand_floats(n, -1, 1);
  double *r = to_double(dout, n);
  struct grad dx = grad_new(n, 1), dw = grad_new(s.dim, 1);
  for (int call = 0; call < 2; call++) {
    be->rmsnorm_backward(dx.g, dw.g, dout, x, w, s.n, s.dim, (float)s.eps, call_acc(call));
    if (call == 0) grad_mark(&dx), grad_mark(&dw);
  }
  double *fd_x = finite_diff(ref_rmsnorm, &s, in, 0, n, n, r);
  double *fd_w = finite_diff(ref_rmsnorm, &s, in, 1, s.dim, n, r);
  grad_verify("rmsnorm", "x", &dx, fd_x);
  grad_verify("rmsnorm", "w", &dw, fd_w);
  free(fd_x), free(fd_w), free(r), free(dout), free(ref), free(in[0]), free(in[1]);
  free(out), free(x), free(w);
}

/* ---- q/k norm + RoPE ------------------------------------------------------------------------- */

struct rope_shape {
  int n, heads, head_dim;
  double eps, theta;
  const int32_t *positions;
};

/* The angles exactly as HF Qwen3RotaryEmbedding forms them in fp32:
 * inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)); freqs = pos * inv_freq. */
static double hf_angle(const struct rope_shape *s, int position, int j) {
  float exponent = (float)(2 * j) / (float)s->head_dim;
  float inv_freq = 1.0f / powf((float)s->theta, exponent);
  return (float)position * inv_freq;
}

static void ref_qk_norm_rope(const void *shape, double *const *in, double *out) {
  const struct rope_shape *s = shape;
  int hd = s->head_dim, half = hd / 2;
  double *xn = new_doubles(hd);
  for (int i = 0; i < s->n; i++)
    for (int h = 0; h < s->heads; h++) {
      const double *x = in[0] + ((size_t)i * s->heads + h) * hd;
      double *o = out + ((size_t)i * s->heads + h) * hd;
      double ms = 0.0;
      for (int j = 0; j < hd; j++) ms += x[j] * x[j] / hd;
      for (int j = 0; j < hd; j++) xn[j] = x[j] / sqrt(ms + s->eps) * in[1][j];
      for (int j = 0; j < hd; j++) { /* x·cos + cat(-x2, x1)·sin, angles repeated per half */
        double a = hf_angle(s, s->positions[i], j % half);
        double rotated = j < half ? -xn[j + half] : xn[j - half];
        o[j] = xn[j] * cos(a) + rotated * sin(a);
      }
    }
  free(xn);
}

static void test_qk_norm_rope(void) {
  /* large positions too: there the fp32 rounding of the angle, which HF does and a double
   * computation would not, is far above the tolerance */
  int32_t positions[] = {0, 1, 17, 4095, 100003, 262143};
  struct rope_shape s = {6, 3, 16, 1e-6, 5e6, positions};
  size_t n = (size_t)s.n * s.heads * s.head_dim;
  float *x = rand_floats(n, -2, 2), *w = rand_floats(s.head_dim, 0.5, 1.5);
  float *out = rand_floats(n, -1, 1);
  double *in[] = {to_double(x, n), to_double(w, s.head_dim)}, *ref = new_doubles(n);
  {
    void *o[] = {out};
    const void *i[] = {x};
    const float *nw[] = {w};
    be->qk_norm_rope_forward(o, i, nw, &s.heads, 1, positions, s.n, s.head_dim, (float)s.eps,
                             s.theta);
  }
  ref_qk_norm_rope(&s, in, ref);
  check_forward("qk_norm_rope forward", out, ref, n);
  {
    /* q and k in one call (k: fewer heads, its own weight): each tensor the bits of a call of
     * its own, so k's rows are normed with k's weight and laid out by k's head count */
    const int kh = 2, both_heads[] = {s.heads, kh};
    size_t kn = (size_t)s.n * kh * s.head_dim;
    float *kx = rand_floats(kn, -2, 2), *kw = rand_floats(s.head_dim, 0.5, 1.5);
    float *kout = rand_floats(kn, -1, 1), *q2 = rand_floats(n, -1, 1), *k2 = rand_floats(kn, -1, 1);
    void *ko[] = {kout}, *both_o[] = {q2, k2};
    const void *kxs[] = {kx}, *both_x[] = {x, kx};
    const float *kws[] = {kw}, *both_w[] = {w, kw};
    be->qk_norm_rope_forward(ko, kxs, kws, &kh, 1, positions, s.n, s.head_dim, (float)s.eps,
                             s.theta);
    be->qk_norm_rope_forward(both_o, both_x, both_w, both_heads, 2, positions, s.n, s.head_dim,
                             (float)s.eps, s.theta);
    int same = !memcmp(q2, out, n * sizeof(float)) && !memcmp(k2, kout, kn * sizeof(float));
    check("qk_norm_rope forward of q and k in one call, bit for bit", same ? 0.0 : 1.0, 0.0);
    free(kx), free(kw), free(kout), free(q2), free(k2);
  }

  float *dout = rand_floats(n, -1, 1);
  double *r = to_double(dout, n);
  struct grad dx = grad_new(n, 1), dw = grad_new(s.head_dim, 1);
  for (int call = 0; call < 2; call++) {
    be->qk_norm_rope_backward(dx.g, dw.g, dout, x, w, positions, s.n, s.heads, s.head_dim,
                              (float)s.eps, s.theta, call_acc(call));
    if (call == 0) grad_mark(&dx), grad_mark(&dw);
  }
  double *fd_x = finite_diff(ref_qk_norm_rope, &s, in, 0, n, n, r);
  double *fd_w = finite_diff(ref_qk_norm_rope, &s, in, 1, s.head_dim, n, r);
  grad_verify("qk_norm_rope", "x", &dx, fd_x);
  grad_verify("qk_norm_rope", "w", &dw, fd_w);
  free(fd_x), free(fd_w), free(r), free(dout), free(ref), free(in[0]), free(in[1]);
  free(out), free(x), free(w);
}

/* ---- attention ------------------------------------------------------------------------------- */

/* ctx (and lse when not NULL) of causal GQA attention, straight from the definition */
static void ref_attention_lse(const struct attn_shape *s, const double *q, const double *k,
                              const double *v, double *ctx, double *lse) {
  int hd = s->head_dim;
  double *p = new_doubles(s->tk);
  for (int b = 0; b < s->batch; b++)
    for (int h = 0; h < s->heads; h++)
      for (int i = 0; i < s->tq; i++) {
        int kv = h / (s->heads / s->kv_heads), visible = s->tk - s->tq + i + 1;
        const double *qi = q + (((size_t)b * s->tq + i) * s->heads + h) * hd;
        double max = -INFINITY, sum = 0.0;
        for (int j = 0; j < visible; j++) {
          const double *kj = k + (((size_t)b * s->k_stride + j) * s->kv_heads + kv) * hd;
          p[j] = 0.0;
          for (int d = 0; d < hd; d++) p[j] += qi[d] * kj[d] / sqrt((double)hd);
          max = fmax(max, p[j]);
        }
        for (int j = 0; j < visible; j++) sum += exp(p[j] - max);
        double *ci = ctx + (((size_t)b * s->tq + i) * s->heads + h) * hd;
        for (int d = 0; d < hd; d++) {
          ci[d] = 0.0;
          for (int j = 0; j < visible; j++)
            ci[d] += exp(p[j] - max) / sum *
                     v[(((size_t)b * s->k_stride + j) * s->kv_heads + kv) * hd + d];
        }
        if (lse) lse[((size_t)b * s->heads + h) * s->tq + i] = max + log(sum);
      }
  free(p);
}

/* Packed sequences (doc_start, tq = tk): each document on its own, as a plain causal sequence
 * through the reference above. A document starts at row t where doc_start[t] == t. */
static void ref_attention_docs(const struct attn_shape *s, const double *q, const double *k,
                               const double *v, double *ctx, double *lse) {
  size_t q_row = (size_t)s->heads * s->head_dim, k_row = (size_t)s->kv_heads * s->head_dim;
  double *doc_lse = new_doubles((size_t)s->heads * s->tq);
  for (int b = 0; b < s->batch; b++)
    for (int a = 0; a < s->tq;) {
      const int32_t *first = s->doc_start + (size_t)b * s->tq;
      int n = 1;
      while (a + n < s->tq && first[a + n] != a + n) n++;
      struct attn_shape one = {1, n, n, n, s->heads, s->kv_heads, s->head_dim, NULL, NULL};
      size_t qo = ((size_t)b * s->tq + a) * q_row, ko = ((size_t)b * s->k_stride + a) * k_row;
      ref_attention_lse(&one, q + qo, k + ko, v + ko, ctx + qo, lse ? doc_lse : NULL);
      for (int h = 0; lse && h < s->heads; h++)
        for (int t = 0; t < n; t++)
          lse[((size_t)b * s->heads + h) * s->tq + a + t] = doc_lse[(size_t)h * n + t];
      a += n;
    }
  free(doc_lse);
}

static void ref_attention_any(const struct attn_shape *s, const double *q, const double *k,
                              const double *v, double *ctx, double *lse) {
  if (s->doc_start) ref_attention_docs(s, q, k, v, ctx, lse);
  else ref_attention_lse(s, q, k, v, ctx, lse);
}

static void ref_attention(const void *shape, double *const *in, double *out) {
  ref_attention_any(shape, in[0], in[1], in[2], out, NULL);
}

static void test_attention(const char *label, struct attn_shape s) {
  size_t q_n = (size_t)s.batch * s.tq * s.heads * s.head_dim;
  size_t kv_n = (size_t)s.batch * s.k_stride * s.kv_heads * s.head_dim;
  size_t lse_n = (size_t)s.batch * s.heads * s.tq;
  float *q = rand_floats(q_n, -1.5, 1.5), *k = rand_floats(kv_n, -1.5, 1.5);
  float *v = rand_floats(kv_n, -1, 1);
  float *ctx = rand_floats(q_n, -1, 1), *lse = rand_floats(lse_n, -1, 1);
  double *in[] = {to_double(q, q_n), to_double(k, kv_n), to_double(v, kv_n)};
  double *ref = new_doubles(q_n), *ref_lse = new_doubles(lse_n);
  be->attention_forward(ctx, lse, q, k, v, &s);
  ref_attention_any(&s, in[0], in[1], in[2], ref, ref_lse);
  char name[96];
  snprintf(name, sizeof name, "attention %s forward ctx", label);
  check_forward(name, ctx, ref, q_n);
  snprintf(name, sizeof name, "attention %s forward lse", label);
  check_forward(name, lse, ref_lse, lse_n);

  float *dctx = rand_floats(q_n, -1, 1);
  double *r = to_double(dctx, q_n);
  struct grad dq = grad_new(q_n, 1), dk = grad_new(kv_n, 1), dv = grad_new(kv_n, 1);
  /* key rows past tk (k_stride > tk) are no key's: nothing writes them, the check reads 0 */
  for (int b = 0; b < s.batch; b++)
    for (size_t i = ((size_t)b * s.k_stride + s.tk) * s.kv_heads * s.head_dim;
         i < (size_t)(b + 1) * s.k_stride * s.kv_heads * s.head_dim; i++)
      dk.g[i] = dv.g[i] = 0.0f;
  for (int call = 0; call < 2; call++) {
    be->attention_backward(dq.g, dk.g, dv.g, dctx, q, k, v, ctx, lse, &s, call_acc(call));
    if (call == 0) grad_mark(&dq), grad_mark(&dk), grad_mark(&dv);
  }
  double *fd_q = finite_diff(ref_attention, &s, in, 0, q_n, q_n, r);
  double *fd_k = finite_diff(ref_attention, &s, in, 1, kv_n, q_n, r);
  double *fd_v = finite_diff(ref_attention, &s, in, 2, kv_n, q_n, r);
  snprintf(name, sizeof name, "attention %s", label);
  grad_verify(name, "q", &dq, fd_q);
  grad_verify(name, "k", &dk, fd_k);
  grad_verify(name, "v", &dv, fd_v);
  for (int i = 0; i < 3; i++) free(in[i]);
  free(fd_q), free(fd_k), free(fd_v), free(r), free(dctx), free(ref), free(ref_lse);
  free(q), free(k), free(v), free(ctx), free(lse);
}

/* Decoding against a cache of a fixed size (attn_shape.key_last): one query per sequence sees
 * keys 0 .. key_last[b] and gives what the same query gives against exactly those keys; the
 * keys after it are NaN, which must not be read. */
static void test_attention_key_last(void) {
  static const int32_t last[] = {3, 8, 0};
  struct attn_shape s = {3, 1, 9, 11, 4, 2, 6, NULL, last};
  size_t q_row = (size_t)s.heads * s.head_dim, k_row = (size_t)s.kv_heads * s.head_dim;
  size_t q_n = s.batch * q_row, kv_n = (size_t)s.batch * s.k_stride * k_row;
  float *q = rand_floats(q_n, -1.5, 1.5), *k = rand_floats(kv_n, -1.5, 1.5);
  float *v = rand_floats(kv_n, -1, 1);
  for (int b = 0; b < s.batch; b++)
    for (size_t i = (size_t)(last[b] + 1) * k_row; i < (size_t)s.k_stride * k_row; i++)
      k[b * s.k_stride * k_row + i] = v[b * s.k_stride * k_row + i] = NAN;
  float *ctx = rand_floats(q_n, -1, 1), *lse = rand_floats((size_t)s.batch * s.heads, -1, 1);
  be->attention_forward(ctx, lse, q, k, v, &s);
  double *ref = new_doubles(q_n), *ref_lse = new_doubles((size_t)s.batch * s.heads);
  for (int b = 0; b < s.batch; b++) {
    struct attn_shape one = {1, 1, last[b] + 1, s.k_stride, 4, 2, 6, NULL, NULL};
    size_t n_k = (size_t)(last[b] + 1) * k_row;
    double *qd = to_double(q + b * q_row, q_row);
    double *kd = to_double(k + b * s.k_stride * k_row, n_k);
    double *vd = to_double(v + b * s.k_stride * k_row, n_k);
    ref_attention_lse(&one, qd, kd, vd, ref + b * q_row, ref_lse + (size_t)b * s.heads);
    free(qd), free(kd), free(vd);
  }
  check_forward("attention decode, key_last forward ctx", ctx, ref, q_n);
  check_forward("attention decode, key_last forward lse", lse, ref_lse, (size_t)s.batch * s.heads);
  free(q), free(k), free(v), free(ctx), free(lse), free(ref), free(ref_lse);
}

/* doc_start of zeros (one document per sequence) gives bit for bit what NULL gives */
static void test_attention_one_document(void) {
  struct attn_shape s = {2, 5, 5, 5, 4, 2, 6, NULL, NULL};
  size_t q_n = (size_t)s.batch * s.tq * s.heads * s.head_dim;
  size_t kv_n = (size_t)s.batch * s.k_stride * s.kv_heads * s.head_dim;
  size_t lse_n = (size_t)s.batch * s.heads * s.tq;
  float *q = rand_floats(q_n, -1.5, 1.5), *k = rand_floats(kv_n, -1.5, 1.5);
  float *v = rand_floats(kv_n, -1, 1), *dctx = rand_floats(q_n, -1, 1);
  float *out[2][5];   /* [NULL, zeros][ctx, lse, dq, dk, dv] */
  int32_t *zeros = xcalloc((size_t)s.batch * s.tq, sizeof(int32_t));
  for (int z = 0; z < 2; z++) {
    s.doc_start = z ? zeros : NULL;
    out[z][0] = xcalloc(q_n, sizeof(float));
    out[z][1] = xcalloc(lse_n, sizeof(float));
    out[z][2] = xcalloc(q_n, sizeof(float));
    out[z][3] = xcalloc(kv_n, sizeof(float));
    out[z][4] = xcalloc(kv_n, sizeof(float));
    be->attention_forward(out[z][0], out[z][1], q, k, v, &s);
    be->attention_backward(out[z][2], out[z][3], out[z][4], dctx, q, k, v, out[z][0], out[z][1],
                           &s, 0);
  }
  size_t n[5] = {q_n, lse_n, q_n, kv_n, kv_n};
  int differ = 0;
  for (int o = 0; o < 5; o++) differ += memcmp(out[0][o], out[1][o], n[o] * sizeof(float)) != 0;
  check("attention doc_start zeros == NULL, bit for bit", differ, 0);
  for (int z = 0; z < 2; z++)
    for (int o = 0; o < 5; o++) free(out[z][o]);
  free(zeros), free(q), free(k), free(v), free(dctx);
}

/* ---- swiglu ---------------------------------------------------------------------------------- */

struct flat_shape {
  size_t n;
};

static void ref_swiglu(const void *shape, double *const *in, double *out) {
  const struct flat_shape *s = shape;
  for (size_t i = 0; i < s->n; i++) out[i] = in[0][i] / (1.0 + exp(-in[0][i])) * in[1][i];
}

static void test_swiglu(void) {
  struct flat_shape s = {29};
  float *g = rand_floats(s.n, -6, 6), *u = rand_floats(s.n, -2, 2);
  float *out = rand_floats(s.n, 0, 1);
  g[0] = -100.0f; /* exp(-g) overflows: silu must still be -0, not NaN */
  double *in[] = {to_double(g, s.n), to_double(u, s.n)}, *ref = new_doubles(s.n);
  be->swiglu_forward(out, g, u, s.n);
  ref_swiglu(&s, in, ref);
  check_forward("swiglu forward", out, ref, s.n);

  float *dout = rand_floats(s.n, -1, 1);
  double *r = to_double(dout, s.n);
  struct grad dg = grad_new(s.n, 1), du = grad_new(s.n, 1);
  for (int call = 0; call < 2; call++) {
    be->swiglu_backward(dg.g, du.g, dout, g, u, s.n, call_acc(call));
    if (call == 0) grad_mark(&dg), grad_mark(&du);
  }
  double *fd_g = finite_diff(ref_swiglu, &s, in, 0, s.n, s.n, r);
  double *fd_u = finite_diff(ref_swiglu, &s, in, 1, s.n, s.n, r);
  grad_verify("swiglu", "g", &dg, fd_g);
  grad_verify("swiglu", "u", &du, fd_u);
  free(fd_g), free(fd_u), free(r), free(dout), free(ref), free(in[0]), free(in[1]);
  free(g), free(u), free(out);
}

/* ---- linear ---------------------------------------------------------------------------------- */

struct linear_shape {
  int n, in_dim, out_dim;
};

static void ref_linear(const void *shape, double *const *in, double *out) {
  const struct linear_shape *s = shape;
  for (int i = 0; i < s->n; i++)
    for (int o = 0; o < s->out_dim; o++) {
      double acc = 0.0;
      for (int j = 0; j < s->in_dim; j++)
        acc += in[0][(size_t)i * s->in_dim + j] * in[1][(size_t)o * s->in_dim + j];
      out[(size_t)i * s->out_dim + o] = acc;
    }
}

static void test_linear(void) {
  struct linear_shape s = {5, 13, 7};
  size_t x_n = (size_t)s.n * s.in_dim, w_n = (size_t)s.out_dim * s.in_dim;
  size_t out_n = (size_t)s.n * s.out_dim;
  float *x = rand_floats(x_n, -1, 1), *w = rand_floats(w_n, -1, 1);
  float *out = rand_floats(out_n, -1, 1);
  double *in[] = {to_double(x, x_n), to_double(w, w_n)}, *ref = new_doubles(out_n);
  void *outs[] = {out};
  const void *ws[] = {w};
  be->linear_forward(outs, x, ws, &s.out_dim, 1, s.n, s.in_dim);
  ref_linear(&s, in, ref);
  check_forward("linear forward", out, ref, out_n);

  float *dout = rand_floats(out_n, -1, 1);
  double *r = to_double(dout, out_n);
  struct grad dx = grad_new(x_n, 1), dw = grad_new(w_n, 1);
  be->linear_backward(dx.g, dw.g, dout, x, w, s.n, s.in_dim, s.out_dim, 0);
  grad_mark(&dx), grad_mark(&dw);
  /* the second increment comes in two calls, each with one gradient NULL */
  be->linear_backward(dx.g, NULL, dout, x, w, s.n, s.in_dim, s.out_dim, ACC_DX | ACC_DW);
  be->linear_backward(NULL, dw.g, dout, x, w, s.n, s.in_dim, s.out_dim, ACC_DX | ACC_DW);
  double *fd_x = finite_diff(ref_linear, &s, in, 0, x_n, out_n, r);
  double *fd_w = finite_diff(ref_linear, &s, in, 1, w_n, out_n, r);
  grad_verify("linear", "x", &dx, fd_x);
  grad_verify("linear", "w", &dw, fd_w);
  free(fd_x), free(fd_w), free(r), free(dout), free(ref), free(in[0]), free(in[1]);
  free(x), free(w), free(out);
}

/* ---- add, scale, sums ------------------------------------------------------------------------ */

static void test_reductions_and_updates(void) {
  size_t n = 1001;
  float *a = rand_floats(n, -1, 1), *b = rand_floats(n, -1, 1);
  double *ref = new_doubles(n);
  for (size_t i = 0; i < n; i++) ref[i] = ((double)a[i] + b[i]) * -0.375;
  float *sum = rand_floats(n, -1, 1);
  be->add(sum, a, b, n, DT_F32);
  be->add(a, a, b, n, DT_F32);   /* in place */
  for (size_t i = 0; i < n; i++)
    if (sum[i] != a[i]) die("add: out of place %g, in place %g at %zu", sum[i], a[i], i);
  free(sum);
  be->scale(a, -0.375f, n);
  check_forward("add + scale", a, ref, n);
  double ss = 0.0, s1 = 0.0;
  for (size_t i = 0; i < n; i++) ss += (double)a[i] * a[i], s1 += a[i];
  double got = 0.5, got1 = -0.25;   /* sum_into adds to what is there */
  be->sum_into(&got, a, n, 1);
  be->sum_into(&got1, a, n, 0);
  check("sum_into, squares", fabs(got - 0.5 - ss) / ss, 1e-12);
  check("sum_into, values", fabs(got1 + 0.25 - s1) / fabs(s1), 1e-12);
  free(a), free(b), free(ref);
}

/* ---- greedy decoding's argmax ---------------------------------------------------------------- */

/* The definition, literally: the first index of the largest value that is not NaN, else 0. */
static int argmax_reference(const float *x, int n) {
  int best = -1;
  for (int i = 0; i < n; i++)
    if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
  return best < 0 ? 0 : best;
}

/* argmax_rows over every kind of tests/argmax_cases.h at once (rows > 1: each row's answer its
 * own), dst poisoned with -7, against the definition and the kinds' known answers. */
static void test_argmax_rows(int n) {
  float *x = rand_floats((size_t)ARGMAX_KINDS * n, -3, 3);
  argmax_cases(x, n);
  int32_t dst[ARGMAX_KINDS];
  for (int k = 0; k < ARGMAX_KINDS; k++) dst[k] = -7;
  be->argmax_rows(dst, x, ARGMAX_KINDS, n);
  int wrong = 0;
  for (int k = 0; k < ARGMAX_KINDS; k++) {
    int known = argmax_case_answer(k, n);
    wrong += dst[k] != argmax_reference(x + (size_t)k * n, n) || (known >= 0 && dst[k] != known);
  }
  char name[64];
  snprintf(name, sizeof name, "argmax_rows %dx%d: rows wrong", ARGMAX_KINDS, n);
  check(name, wrong, 0);
  free(x);
}

/* ---- LM head + cross-entropy ----------------------------------------------------------------- */

struct loss_shape {
  int n, dim, vocab;
  const int32_t *targets;
};

/* nll of every row (0 for masked rows) from logits = x · wᵀ */
static void ref_loss(const void *shape, double *const *in, double *out) {
  const struct loss_shape *s = shape;
  double *logits = new_doubles(s->vocab);
  for (int i = 0; i < s->n; i++) {
    out[i] = 0.0;
    if (s->targets[i] < 0) continue;
    double max = -INFINITY, sum = 0.0;
    for (int c = 0; c < s->vocab; c++) {
      logits[c] = 0.0;
      for (int d = 0; d < s->dim; d++)
        logits[c] += in[0][(size_t)i * s->dim + d] * in[1][(size_t)c * s->dim + d];
      max = fmax(max, logits[c]);
    }
    for (int c = 0; c < s->vocab; c++) sum += exp(logits[c] - max);
    out[i] = max + log(sum) - logits[s->targets[i]];
  }
  free(logits);
}

static void test_lm_head_loss(const char *label, int n, int dim, int vocab) {
  int32_t *targets = rand_ints(n, -1, vocab); /* about one row in vocab+1 masked */
  targets[0] = -100;
  targets[n - 1] = vocab - 1;
  struct loss_shape s = {n, dim, vocab, targets};
  size_t x_n = (size_t)n * dim, w_n = (size_t)vocab * dim;
  float *x = rand_floats(x_n, -2, 2), *w = rand_floats(w_n, -1, 1), *nll = rand_floats(n, 1, 2);
  double *in[] = {to_double(x, x_n), to_double(w, w_n)}, *ref = new_doubles(n);
  ref_loss(&s, in, ref);
  char name[96];
  snprintf(name, sizeof name, "lm_head_loss %s nll, no grad", label);
  float *dw_untouched = rand_floats(w_n, -1, 1), *dw_before = copy_floats(dw_untouched, w_n);
  be->lm_head_loss(nll, NULL, dw_untouched, x, w, targets, n, dim, vocab, 1.0f);
  int dw_same = memcmp(dw_untouched, dw_before, w_n * sizeof(float)) == 0;
  check_forward(name, nll, ref, n);
  snprintf(name, sizeof name, "lm_head_loss %s dx NULL leaves dw", label);
  check(name, dw_same ? 0.0 : 1.0, 0);

  float grad_scale = 0.37f;
  double *r = new_doubles(n);
  for (int i = 0; i < n; i++) r[i] = grad_scale;
  struct grad dx = grad_new(x_n, 0), dw = grad_new(w_n, 0);
  for (int call = 0; call < 2; call++) {
    be->lm_head_loss(nll, dx.g, dw.g, x, w, targets, n, dim, vocab, grad_scale);
    if (call == 0) grad_mark(&dx), grad_mark(&dw);
  }
  snprintf(name, sizeof name, "lm_head_loss %s nll, with grad", label);
  check_forward(name, nll, ref, n);
  double masked = 0.0; /* a masked row must get exactly nothing */
  for (int i = 0; i < n; i++)
    if (targets[i] < 0)
      for (int d = 0; d < dim; d++) {
        size_t e = (size_t)i * dim + d;
        masked += fabs((double)dx.g[e] - dx.start[e]);
      }
  snprintf(name, sizeof name, "lm_head_loss %s masked rows untouched", label);
  check(name, masked, 0);
  double *fd_x = finite_diff(ref_loss, &s, in, 0, x_n, n, r);
  double *fd_w = finite_diff(ref_loss, &s, in, 1, w_n, n, r);
  snprintf(name, sizeof name, "lm_head_loss %s", label);
  grad_verify(name, "x", &dx, fd_x);
  grad_verify(name, "w", &dw, fd_w);
  free(fd_x), free(fd_w), free(r), free(ref), free(in[0]), free(in[1]);
  free(x), free(w), free(nll), free(dw_untouched), free(dw_before), free(targets);
}

/* Both gradients of the loss over the full vocabulary, in double: a first pass over chunks of
 * the vocabulary finds every row's log-sum-exp (online), a second forms
 * P = grad_scale * (softmax - onehot) per chunk and accumulates dx += P · w_chunk and
 * dw_chunk = Pᵀ · x. BLAS in double, so that the reference stays cheap at vocab 151936. */
static void ref_loss_grads(double *dx, double *dw, const double *x, const double *w,
                           const int32_t *targets, int n, int dim, int vocab, double grad_scale) {
  enum { CHUNK = 4096 };
  double *logits = new_doubles((size_t)n * CHUNK), *lse = new_doubles(n);
  double *max = new_doubles(n);
  for (int i = 0; i < n; i++) max[i] = -INFINITY;
  for (int c0 = 0; c0 < vocab; c0 += CHUNK) {
    int m = vocab - c0 < CHUNK ? vocab - c0 : CHUNK;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, dim, 1.0, x, dim,
                w + (size_t)c0 * dim, dim, 0.0, logits, m);
    for (int i = 0; i < n; i++) {
      double mx = max[i];
      for (int c = 0; c < m; c++) mx = fmax(mx, logits[(size_t)i * m + c]);
      double sum = lse[i] * exp(max[i] - mx);   /* lse holds the sum until the end */
      for (int c = 0; c < m; c++) sum += exp(logits[(size_t)i * m + c] - mx);
      lse[i] = sum;
      max[i] = mx;
    }
  }
  for (int i = 0; i < n; i++) lse[i] = max[i] + log(lse[i]);
  memset(dx, 0, (size_t)n * dim * sizeof(double));
  for (int c0 = 0; c0 < vocab; c0 += CHUNK) {
    int m = vocab - c0 < CHUNK ? vocab - c0 : CHUNK;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, dim, 1.0, x, dim,
                w + (size_t)c0 * dim, dim, 0.0, logits, m);
    for (int i = 0; i < n; i++)
      for (int c = 0; c < m; c++) {
        double *p = &logits[(size_t)i * m + c];
        *p = targets[i] < 0 ? 0.0
                            : grad_scale * (exp(*p - lse[i]) - (targets[i] == c0 + c ? 1.0 : 0.0));
      }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dim, m, 1.0, logits, m,
                w + (size_t)c0 * dim, dim, 1.0, dx, dim);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, dim, n, 1.0, logits, m, x, dim, 0.0,
                dw + (size_t)c0 * dim, dim);
  }
  free(logits), free(lse), free(max);
}

/* The Qwen3 vocabulary with a small dim: the nll of a few rows against the reference, both
 * gradients against ref_loss_grads, and the time, since the loss must stay cheap enough for CI
 * and the demo. */
static void test_lm_head_loss_full_vocab(void) {
  int n = 96, dim = 64, vocab = 151936;
  int32_t *targets = rand_ints(n, 0, vocab);
  targets[5] = -1;
  size_t x_n = (size_t)n * dim, w_n = (size_t)vocab * dim;
  float *x = rand_floats(x_n, -1, 1), *w = rand_floats(w_n, -0.5, 0.5);
  float *nll = rand_floats(n, 0, 1);
  float *dx = xcalloc(x_n, sizeof(float)), *dw = xcalloc(w_n, sizeof(float));
  double t0 = now_seconds();
  be->lm_head_loss(nll, dx, dw, x, w, targets, n, dim, vocab, 1.0f / n);
  double seconds = now_seconds() - t0;
  int rows = 8;
  struct loss_shape s = {rows, dim, vocab, targets};
  double *in[] = {to_double(x, x_n), to_double(w, w_n)}, *ref = new_doubles(rows);
  ref_loss(&s, in, ref);
  check_forward("lm_head_loss vocab 151936 nll", nll, ref, rows);
  double *ref_dx = new_doubles(x_n), *ref_dw = new_doubles(w_n);
  ref_loss_grads(ref_dx, ref_dw, in[0], in[1], targets, n, dim, vocab, 1.0 / n);
  check_forward("lm_head_loss vocab 151936 dx", dx, ref_dx, x_n);
  check_forward("lm_head_loss vocab 151936 dw", dw, ref_dw, w_n);
  printf("     lm_head_loss %d rows x dim %d x vocab %d with grads: %.3f s\n", n, dim, vocab,
         seconds);
  free(in[0]), free(in[1]), free(ref), free(ref_dx), free(ref_dw), free(x), free(w), free(nll);
  free(dx), free(dw), free(targets);
}

/* ---- AdamW ----------------------------------------------------------------------------------- */

static void test_adamw(const char *label, float beta1) {
  size_t n = 53;
  int steps = 6;
  /* a large lr, so that the change of p is well above p's own fp32 rounding */
  float lr = 5e-2f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  float *p = rand_floats(n, -1, 1), *p0 = copy_floats(p, n);
  float *m = xcalloc(n, sizeof(float)), *v = xcalloc(n, sizeof(float));
  double *rp = to_double(p, n), *rm = new_doubles(n), *rv = new_doubles(n);
  for (int t = 1; t <= steps; t++) {
    float *g = rand_floats(n, -1, 1);
    g[t] = 0.0f; /* a zero gradient: v may be 0, eps keeps the step finite */
    /* every other step clipped: the update sees fp32(g * scale); g itself is left as it is */
    float scale = t % 2 ? 1.0f : 0.375f, *gs = copy_floats(g, n), *g0 = copy_floats(g, n);
    for (size_t i = 0; i < n; i++) gs[i] = g[i] * scale;
    struct adamw_step st = {lr, beta1, beta2, eps, wd, scale, t};
    be->adamw_update(p, NULL, g, m, v, n, &st, NULL);
    check("adamw leaves the gradient as it is", memcmp(g, g0, n * sizeof(float)) != 0, 0);
    free(g0);
    for (size_t i = 0; i < n; i++) {
      rm[i] = beta1 * rm[i] + (1.0 - beta1) * gs[i];
      rv[i] = beta2 * rv[i] + (1.0 - beta2) * (double)gs[i] * gs[i];
      double mhat = rm[i] / (1.0 - pow(beta1, t)), vhat = rv[i] / (1.0 - pow(beta2, t));
      rp[i] -= lr * (mhat / (sqrt(vhat) + eps) + wd * rp[i]);
    }
    free(g);
    free(gs);
  }
  /* compare the change of p, which |p| would otherwise hide */
  double *change = new_doubles(n), *ref_change = new_doubles(n);
  for (size_t i = 0; i < n; i++) {
    change[i] = (double)p[i] - p0[i];
    ref_change[i] = rp[i] - p0[i];
  }
  char name[96];
  snprintf(name, sizeof name, "adamw %s, %d steps: p - p0", label, steps);
  check(name, rel_err(change, ref_change, n), FORWARD_TOL);
  snprintf(name, sizeof name, "adamw %s, %d steps: p", label, steps);
  check_forward(name, p, rp, n);
  snprintf(name, sizeof name, "adamw %s, %d steps: m", label, steps);
  check_forward(name, m, rm, n);
  snprintf(name, sizeof name, "adamw %s, %d steps: v", label, steps);
  check_forward(name, v, rv, n);
  free(p), free(p0), free(m), free(v), free(rp), free(rm), free(rv);
  free(change), free(ref_change);
}

/* ---- AdamW's amax parts and the weight quantization from them -------------------------------- */

static uint32_t abs_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  return b & 0x7fffffffu;
}

/* One AdamW step (the third, lr 1e-3) of n values in place, with amax parts into parts (NULL:
 * none). */
static void adamw_step_parts(float *p, const float *g, float *m, float *v, size_t n,
                             uint32_t *parts) {
  struct adamw_step st = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3};
  be->adamw_update(p, NULL, g, m, v, n, &st, parts);
}

/* ops.h adamw_update's amax parts over 3 whole chunks and a short last one (an odd length):
 * each the largest |new p| bits of its chunk, counted again here from the updated p. Chunk 0's
 * maximum is its last value (negative), chunk 1 is all -0.0 (its part 0: the sign cleared),
 * chunk 2 has a NaN gradient (its part a NaN's bits, the others finite), the last chunk's
 * maximum is its last value. No word past the parts is written, and the update itself is the
 * one without parts, bit for bit. */
static void test_adamw_amax_parts(void) {
  const size_t C = ADAMW_AMAX_CHUNK, n = 3 * C + 1003, chunks = 4;
  float *p = rand_floats(n, -1, 1), *g = rand_floats(n, -1, 1), *m = rand_floats(n, -0.1, 0.1);
  float *v = rand_floats(n, 0, 0.01);
  p[C - 1] = -7.0f;
  for (size_t i = C; i < 2 * C; i++) p[i] = -0.0f, g[i] = m[i] = v[i] = 0.0f;
  g[2 * C + 5] = NAN;
  p[n - 1] = 9.0f;
  float *p2 = copy_floats(p, n), *m2 = copy_floats(m, n), *v2 = copy_floats(v, n);
  uint32_t parts[5] = {1, 1, 1, 1, 0xdeadbeefu};
  adamw_step_parts(p, g, m, v, n, parts);
  adamw_step_parts(p2, g, m2, v2, n, NULL);
  int same = !memcmp(p, p2, n * 4) && !memcmp(m, m2, n * 4) && !memcmp(v, v2, n * 4);
  check("adamw with amax parts: the update is the one without", !same, 0);
  int parts_ok = parts[4] == 0xdeadbeefu;
  for (size_t c = 0; c < chunks; c++) {
    uint32_t want = 0;
    for (size_t i = c * C; i < n && i < (c + 1) * C; i++)
      if (abs_bits(p[i]) > want) want = abs_bits(p[i]);
    parts_ok &= parts[c] == want;
  }
  check("adamw amax parts: the chunks' maxima, no more words", !parts_ok, 0);
  int special = parts[0] == abs_bits(p[C - 1]) && parts[1] == 0 && parts[2] > 0x7f800000u &&
                parts[3] == abs_bits(p[n - 1]) && parts[0] < 0x7f800000u;
  check("adamw amax parts: negative, -0.0, NaN and last-value maxima", !special, 0);
  free(p), free(g), free(m), free(v), free(p2), free(m2), free(v2);
}

/* nvfp4_quantize_weight of a [rows, cols] weight from the parts its AdamW step wrote (3 chunks,
 * the last short, holding the weight's largest value) against nvfp4_quantize of the same
 * weight: xq (q * s_b, which gives the codes and scales) and S_dec bit for bit, in each layout;
 * a NaN in the weight gives S_dec NaN in both. And the parts are what it reads: without the
 * last one its S_dec is another. */
static void test_quantize_weight(int with_nan) {
  const int rows = 48, cols = 784;
  const size_t n = (size_t)rows * cols, n_parts = (n + ADAMW_AMAX_CHUNK - 1) / ADAMW_AMAX_CHUNK;
  float *p = rand_floats(n, -1, 1), *g = rand_floats(n, -1, 1), *m = rand_floats(n, -0.1, 0.1);
  float *v = rand_floats(n, 0, 0.01);
  p[n - 2] = 4.0f;
  if (with_nan) g[n / 2] = NAN;
  uint32_t *parts = xmalloc(n_parts * sizeof *parts);
  adamw_step_parts(p, g, m, v, n, parts);
  static const char *const names[] = {"rows", "tiles", "cols"};
  float *want = xmalloc(n * 4), *got = xmalloc(n * 4);
  for (int layout = NVFP4_ROWS; layout <= NVFP4_COLS; layout++) {
    float dec_want, dec_got, dec_short;
    be->nvfp4_quantize(want, &dec_want, p, DT_F32, rows, cols, layout, 0, 0, -1);
    be->nvfp4_quantize_weight(got, &dec_got, p, rows, cols, layout, parts, n_parts);
    int same = with_nan ? isnan(dec_want) && isnan(dec_got)
                        : !memcmp(&dec_want, &dec_got, 4) && !memcmp(want, got, n * 4);
    char name[96];
    snprintf(name, sizeof name, "nvfp4_quantize_weight %s%s = nvfp4_quantize", names[layout],
             with_nan ? " (NaN)" : "");
    check(name, !same, 0);
    if (with_nan) continue;
    be->nvfp4_quantize_weight(got, &dec_short, p, rows, cols, layout, parts, n_parts - 1);
    snprintf(name, sizeof name, "nvfp4_quantize_weight %s reads the parts", names[layout]);
    check(name, dec_short == dec_got, 0);
  }
  free(p), free(g), free(m), free(v), free(parts), free(want), free(got);
}

static uint32_t f32_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}

/* NVFP4_ROWS_INT (ops.h) against NVFP4_ROWS on x [rows, cols]: the same S_dec; k = 2q of
 * nvfp4_quantize's code and s = its scale byte's value, so that each k * s / 2 is NVFP4_ROWS's
 * q * s_b bit for bit (its -0.0, a negative value rounded to zero, as +0); nothing written
 * past nvfp4_int_operand_bytes. A non-finite x: S_dec NaN and nothing written. */
static void check_int_operand(const char *label, const float *x, int rows, int cols) {
  const size_t n = (size_t)rows * cols, bytes = nvfp4_int_operand_bytes(rows, cols);
  enum { GUARD = 64 };
  float *q = xmalloc(n * 4 + 4), dec_q, dec_i;
  uint8_t *op = xmalloc(bytes + GUARD), *codes = xmalloc(n / 2 + 1), *scales = xmalloc(n / 16 + 1);
  memset(op, 0x5a, bytes + GUARD);
  be->nvfp4_quantize(q, &dec_q, x, DT_F32, rows, cols, NVFP4_ROWS, 0, 0, -1);
  be->nvfp4_quantize(op, &dec_i, x, DT_F32, rows, cols, NVFP4_ROWS_INT, 0, 0, -1);
  struct nvfp4_tensor_scale ts;
  int finite = nvfp4_quantize(codes, scales, &ts, x, rows, cols, NVFP4_BLOCK_1X16,
                              NVFP4_ROUND_NEAREST, 0) == NVFP4_OK;
  const int8_t *k = (const int8_t *)op;
  const float *s = (const float *)(op + nvfp4_int_scales_at(rows, cols));
  int same = finite ? f32_bits(dec_i) == f32_bits(dec_q) : isnan(dec_i) && isnan(dec_q);
  for (size_t i = 0; finite && i < n; i++) {
    const float v = k[i] * s[i / 16] / 2;
    same &= k[i] == (int)(2.0f * nvfp4_e2m1_decode((uint8_t)(codes[i / 2] >> 4 * (i & 1))));
    same &= f32_bits(s[i / 16]) == f32_bits(nvfp4_e4m3_decode(scales[i / 16]));
    same &= f32_bits(v) == f32_bits(q[i]) || (f32_bits(q[i]) == 0x80000000u && f32_bits(v) == 0);
  }
  for (size_t i = finite ? bytes : 0; i < bytes + GUARD; i++) same &= op[i] == 0x5a;
  char name[96];
  snprintf(name, sizeof name, "nvfp4 rows int %dx%d %s = rows", rows, cols, label);
  check(name, !same, 0);
  free(q), free(op), free(codes), free(scales);
}

/* nvfp4_gemv_packed on the NVFP4_ROWS_INT operand of x [n, in_dim] against the op's sums on
 * NVFP4_ROWS's values, written here in its order (a row's columns in order, each product
 * x * (code * scale)): bit for bit, since k * s / 2 is that value exactly. Two matrices, n = 1
 * to NVFP4_GEMV_MAX_ROWS, x and the weights heavy-tailed (zero blocks, negative values rounded
 * to -0.0). */
static void test_gemv_packed_int(void) {
  enum { IN = 320, MATS = 2 };
  const int out_dims[MATS] = {24, 40};
  uint8_t *codes[MATS], *scales[MATS];
  float dec_w[MATS];
  const float *dec_w_of[MATS] = {&dec_w[0], &dec_w[1]};
  for (int j = 0; j < MATS; j++) {
    const size_t nw = (size_t)out_dims[j] * IN;
    float *w = rand_floats(nw, -1, 1);
    for (size_t i = 0; i < nw; i += 5) w[i] *= powf(10.0f, (float)uniform(-6, 1));
    codes[j] = xmalloc(nw / 2), scales[j] = xmalloc(nw / 16);
    be->nvfp4_pack(codes[j], scales[j], &dec_w[j], w, out_dims[j], IN, NVFP4_ROWS);
    free(w);
  }
  for (int n = 1; n <= NVFP4_GEMV_MAX_ROWS; n++) {
    const size_t nx = (size_t)n * IN;
    float *x = rand_floats(nx, -3, 3), *xq = xmalloc(nx * 4), dec_x, dec_xi;
    for (size_t i = 0; i < nx; i += 3) x[i] *= powf(10.0f, (float)uniform(-8, 2));
    for (size_t i = 32; i < 48; i++) x[i] = 0.0f;
    void *op = xmalloc(nvfp4_int_operand_bytes(n, (int)IN));
    be->nvfp4_quantize(xq, &dec_x, x, DT_F32, n, IN, NVFP4_ROWS, 0, 0, -1);
    be->nvfp4_quantize(op, &dec_xi, x, DT_F32, n, IN, NVFP4_ROWS_INT, 0, 0, -1);
    int same = f32_bits(dec_x) == f32_bits(dec_xi);
    for (int j = 0; j < MATS; j++) {
      float *got = xmalloc((size_t)n * out_dims[j] * 4);
      void *outs[1] = {got};
      be->nvfp4_gemv_packed(outs, op, &dec_xi, (const uint8_t *const *)&codes[j],
                            (const uint8_t *const *)&scales[j], &dec_w_of[j], &out_dims[j], 1,
                            n, IN);
      for (int o = 0; o < out_dims[j]; o++) {
        float acc[NVFP4_GEMV_MAX_ROWS] = {0};
        for (int c = 0; c < IN; c++) {
          const size_t at = (size_t)o * IN + c;
          const float wv = nvfp4_e2m1_decode((uint8_t)(codes[j][at / 2] >> 4 * (at & 1))) *
                           nvfp4_e4m3_decode(scales[j][at / 16]);
          for (int t = 0; t < n; t++) acc[t] += xq[(size_t)t * IN + c] * wv;
        }
        for (int t = 0; t < n; t++)
          same &= f32_bits(got[(size_t)t * out_dims[j] + o]) ==
                  f32_bits(dec_x * dec_w[j] * acc[t]);
      }
      free(got);
    }
    char name[96];
    snprintf(name, sizeof name, "nvfp4_gemv_packed int x, %d rows = rows' sums", n);
    check(name, !same, 0);
    free(x), free(xq), free(op);
  }
  for (int j = 0; j < MATS; j++) free(codes[j]), free(scales[j]);
}

/* check_int_operand on heavy tails (E4M3 subnormal and zero scales, whose codes saturate), rows
 * not a multiple of 16, exact ties and signed zeros, a zero x, a NaN, an empty x; then the
 * packed GEMV on that operand. */
static void test_nvfp4_int_operand(void) {
  const int rows = 37, cols = 160;
  const size_t n = (size_t)rows * cols;
  float *x = rand_floats(n, -3, 3), *y = xmalloc(n * 4);
  for (size_t i = 0; i < n; i++) y[i] = x[i] * powf(10.0f, (float)uniform(-12, 4));
  check_int_operand("heavy-tailed", y, rows, cols);
  static const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, 0.0f, -0.0f};
  for (size_t i = 0; i < n; i++) y[i] = ties[i % 10] * ((i / 16) % 2 ? -1.0f : 1.0f);
  y[7] = -1e-3f;   /* rounds to -0.0 */
  check_int_operand("exact ties", y, rows, cols);
  memset(y, 0, n * 4);
  check_int_operand("zeros", y, 2, 32);
  memcpy(y, x, n * 4);
  y[n / 2] = NAN;
  check_int_operand("one NaN", y, rows, cols);
  check_int_operand("empty", x, 0, 32);
  free(x), free(y);
  test_gemv_packed_int();
}

int main(void) {
  double t0 = now_seconds();
  test_memory();
  test_embedding();
  test_rmsnorm();
  test_qk_norm_rope();
  /* training shape, 4 query heads on 2 kv heads */
  test_attention("gqa 4/2", (struct attn_shape){2, 5, 5, 5, 4, 2, 6, NULL, NULL});
  /* decoding against a cache: 3 queries at the end of 7 keys, cache rows for 9 */
  test_attention("gqa kv-cache", (struct attn_shape){2, 3, 7, 9, 4, 2, 6, NULL, NULL});
  test_attention("mha 3/3", (struct attn_shape){1, 6, 6, 6, 3, 3, 8, NULL, NULL});
  /* packed: documents of 3, 4, 2 tokens and of 1, 5, 3 (one that sees only itself) */
  static const int32_t packed[] = {0, 0, 0, 3, 3, 3, 3, 7, 7, 0, 1, 1, 1, 1, 1, 6, 6, 6};
  test_attention("gqa packed", (struct attn_shape){2, 9, 9, 9, 4, 2, 6, packed, NULL});
  test_attention("mha packed", (struct attn_shape){2, 9, 9, 9, 3, 3, 8, packed, NULL});
  test_attention_one_document();
  test_attention_key_last();
  test_swiglu();
  test_linear();
  test_reductions_and_updates();
  test_argmax_rows(37);       /* lanes of 16 and a tail */
  test_argmax_rows(48);       /* no tail */
  test_argmax_rows(1);
  test_argmax_rows(151936);   /* Qwen3's vocabulary */
  test_lm_head_loss("small", 9, 6, 23);
  test_lm_head_loss("chunked", 150, 5, 17);
  test_lm_head_loss_full_vocab();
  test_adamw("beta1 0.9", 0.9f);
  test_adamw("beta1 0.3", 0.3f);
  test_adamw_amax_parts();
  test_quantize_weight(0);
  test_quantize_weight(1);
  test_nvfp4_int_operand();
  printf("     total %.2f s\n", now_seconds() - t0);
  printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}
