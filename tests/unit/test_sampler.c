/* The sampler (worker/sampler.h): greedy and its ties; temperature draws against softmax(l/T)
 * (chi-square); top-k keeps k; top-p with a dominant token and at its boundary; the fast path
 * token for token against a naive full-sort reference, at vocab 151936 too; reproducibility;
 * -inf, +inf, NaN and huge logits; stop tokens; and the time of one call at the Qwen3 vocab. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "tests/check.h"
#include "worker/sampler.h"

#define QWEN3_VOCAB 151936

static float randn(uint64_t *state) {   /* xorshift + Box-Muller: fixed data, no libc rand */
  double u[2];
  for (int i = 0; i < 2; i++) {
    *state ^= *state << 13, *state ^= *state >> 7, *state ^= *state << 17;
    u[i] = ((*state >> 11) + 0.5) * 0x1p-53;
  }
  return (float)(sqrt(-2 * log(u[0])) * cos(2 * M_PI * u[1]));
}

/* ---- the reference: sort everything, then apply the definitions literally ------------------ */
struct ref {
  float logit;
  int id;
};
static int cmp_ref(const void *pa, const void *pb) {
  const struct ref *a = pa, *b = pb;
  if (a->logit != b->logit) return a->logit > b->logit ? -1 : 1;
  return a->id - b->id;
}

static int reference_next(const struct sampler *s, const float *logits, int vocab, uint32_t stream,
                          uint32_t step) {
  struct ref *r = xmalloc((size_t)vocab * sizeof *r);
  int n = 0;
  for (int i = 0; i < vocab; i++)
    if (logits[i] > -INFINITY) r[n++] = (struct ref){logits[i], i};
  qsort(r, (size_t)n, sizeof *r, cmp_ref);
  if (s->top_k > 0 && s->top_k < n) n = s->top_k;
  float m = r[0].logit;
  double *w = xmalloc((size_t)n * sizeof *w), total = 0;
  for (int i = 0; i < n; i++) total += w[i] = expf((r[i].logit - m) / s->temperature);
  if (s->top_p < 1) {
    double cum = 0;
    int keep = n;
    for (int i = 0; i < n; i++)
      if ((cum += w[i]) >= s->top_p * total) {
        keep = i + 1;
        break;
      }
    n = keep;
    total = cum;
  }
  double target = sampler_uniform(s->seed, stream, step) * total, cum = 0;
  int token = r[n - 1].id;
  for (int i = 0; i < n; i++)
    if ((cum += w[i]) > target) {
      token = r[i].id;
      break;
    }
  free(r);
  free(w);
  return token;
}

/* ---- helpers ------------------------------------------------------------------------------- */
/* Counts of n draws at steps 0..n-1 of stream 7. */
static void draw_counts(const struct sampler *s, const float *logits, int vocab, int n,
                        long *counts) {
  void *scratch = xmalloc(sampler_scratch_bytes(vocab));
  memset(counts, 0, (size_t)vocab * sizeof *counts);
  for (int i = 0; i < n; i++) counts[sampler_next(s, logits, vocab, 7, (uint32_t)i, scratch)]++;
  free(scratch);
}

static void softmax(double *p, const float *logits, int n, double t) {
  double m = -INFINITY, z = 0;
  for (int i = 0; i < n; i++) m = fmax(m, logits[i]);
  for (int i = 0; i < n; i++) z += p[i] = exp((logits[i] - m) / t);
  for (int i = 0; i < n; i++) p[i] /= z;
}

/* Pearson's statistic of counts against probabilities p over n draws. */
static double chi_square(const long *counts, const double *p, int vocab, int n) {
  double x2 = 0;
  for (int i = 0; i < vocab; i++) {
    double e = p[i] * n;
    x2 += (counts[i] - e) * (counts[i] - e) / e;
  }
  return x2;
}

/* ---- tests --------------------------------------------------------------------------------- */
static void test_greedy(void) {
  struct sampler g = {0, 0, 1, 1};
  float a[] = {1, 3, 3, 2};
  CHECK(sampler_next(&g, a, 4, 0, 0, NULL) == 1, "greedy tie goes to the lowest id");
  float b[] = {NAN, 1, 5, NAN, 5.5f};
  CHECK(sampler_next(&g, b, 5, 0, 0, NULL) == 4, "greedy skips NaN");
  float c[] = {-INFINITY, -INFINITY, -INFINITY};
  CHECK(sampler_next(&g, c, 3, 0, 0, NULL) == 0, "greedy over all -inf gives 0");
  struct sampler hot = {1, 0, 1, 1};
  CHECK(sampler_next(&hot, c, 3, 0, 5, NULL) == 0, "sampling over all -inf falls back to 0");
  struct sampler topk_greedy = {0, 2, 0.3f, 99};
  CHECK(sampler_next(&topk_greedy, a, 4, 3, 9, NULL) == 1, "temperature 0 ignores top-k/top-p");
  /* past the short vectors above: the vector pass over 16 running maxima, then the tail */
  enum { LONG = 1003 };
  float d[LONG];
  for (int i = 0; i < LONG; i++) d[i] = (float)((i * 37) % 101) / 101.0f;
  d[17] = d[998] = NAN;
  d[700] = d[500] = d[1001] = 2.0f;   /* a tie: the lowest id, not the one in the tail */
  CHECK(sampler_next(&g, d, LONG, 0, 0, NULL) == 500, "greedy tie over 1003 logits");
  d[1002] = 3.0f;                      /* the maximum in the tail past the last 16 */
  CHECK(sampler_next(&g, d, LONG, 0, 0, NULL) == 1002, "greedy maximum in the tail");
  d[1002] = NAN, d[40] = INFINITY;
  CHECK(sampler_next(&g, d, LONG, 0, 0, NULL) == 40, "greedy +inf among NaN");
  for (int i = 0; i < LONG; i++) d[i] = NAN;
  CHECK(sampler_next(&g, d, LONG, 0, 0, NULL) == 0, "greedy over all NaN gives 0");
}

static void test_temperature(void) {
  enum { V = 8, N = 200000 };
  float logits[V] = {2.0f, 1.5f, 0.3f, -1.0f, 0.0f, 1.5f, -2.5f, 0.9f};
  long counts[V];
  double p[V];
  const float temps[] = {1.0f, 0.5f, 2.0f};
  for (int k = 0; k < 3; k++) {
    struct sampler s = {temps[k], 0, 1, 1234};
    draw_counts(&s, logits, V, N, counts);
    softmax(p, logits, V, temps[k]);
    double x2 = chi_square(counts, p, V, N);
    /* 7 degrees of freedom: P(X2 > 35) ~ 1e-5 */
    CHECK(x2 < 35, "T=%g: chi-square %.1f against softmax(l/T) too large", temps[k], x2);
  }
}

static void test_top_k(void) {
  enum { V = 100, N = 20000 };
  float logits[V];
  uint64_t st = 42;
  for (int i = 0; i < V; i++) logits[i] = randn(&st);
  logits[10] = logits[20] = 3.0f;   /* a tie inside the k */
  struct sampler s = {1.0f, 5, 1, 5};
  long counts[V];
  draw_counts(&s, logits, V, N, counts);
  struct ref r[V];
  for (int i = 0; i < V; i++) r[i] = (struct ref){logits[i], i};
  qsort(r, V, sizeof *r, cmp_ref);
  int in_top = 0, seen = 0;
  for (int i = 0; i < 5; i++) {
    in_top += counts[r[i].id];
    seen += counts[r[i].id] > 0;
  }
  CHECK(in_top == N, "top-k 5: %d of %d draws outside the top 5", N - in_top, N);
  CHECK(seen == 5, "top-k 5: only %d of the 5 tokens were drawn", seen);
  double p[5];
  float kept[5];
  for (int i = 0; i < 5; i++) kept[i] = r[i].logit;
  softmax(p, kept, 5, 1.0);
  long kc[5];
  for (int i = 0; i < 5; i++) kc[i] = counts[r[i].id];
  double x2 = chi_square(kc, p, 5, N);
  CHECK(x2 < 28, "top-k 5: chi-square %.1f against the renormalised top 5", x2);

  /* exactly k even with ties at the k-th value: the lower ids win */
  float flat[6] = {1, 1, 1, 1, 1, 1};
  struct sampler s2 = {1.0f, 2, 1, 5};
  draw_counts(&s2, flat, 6, 2000, counts);
  CHECK(counts[0] + counts[1] == 2000 && counts[0] > 800 && counts[1] > 800,
        "top-k 2 over 6 equal logits: counts %ld %ld (rest %ld)", counts[0], counts[1],
        2000 - counts[0] - counts[1]);
}

static void test_top_p(void) {
  /* top token 0.9: with p = 0.5 it alone is the nucleus, never "no token" */
  float dom[4] = {logf(0.9f), logf(0.05f), logf(0.03f), logf(0.02f)};
  struct sampler s = {1.0f, 0, 0.5f, 77};
  long counts[4];
  draw_counts(&s, dom, 4, 5000, counts);
  CHECK(counts[0] == 5000, "top-p 0.5, top prob 0.9: top token %ld of 5000", counts[0]);
  s.top_k = 3;   /* the same through the top-k path */
  draw_counts(&s, dom, 4, 5000, counts);
  CHECK(counts[0] == 5000, "top-k 3 + top-p 0.5, top prob 0.9: top token %ld of 5000", counts[0]);

  /* 0.4 0.3 0.2 0.1: p = 0.65 keeps {0, 1} (0.4 < 0.65 <= 0.7, the crossing token included) */
  float four[4] = {logf(0.4f), logf(0.3f), logf(0.2f), logf(0.1f)};
  struct sampler q = {1.0f, 0, 0.65f, 3};
  enum { N = 40000 };
  draw_counts(&q, four, 4, N, counts);
  CHECK(counts[2] == 0 && counts[3] == 0, "top-p 0.65 drew dropped tokens (%ld, %ld)", counts[2],
        counts[3]);
  double f0 = (double)counts[0] / N;
  CHECK(fabs(f0 - 0.4 / 0.7) < 0.015, "top-p 0.65: token 0 frequency %.4f, expected %.4f", f0,
        0.4 / 0.7);
  q.top_p = 0.75f;   /* now 0.7 < 0.75: token 2 crosses and is kept, token 3 not */
  draw_counts(&q, four, 4, N, counts);
  CHECK(counts[2] > 0 && counts[3] == 0, "top-p 0.75: token 2 %ld (want > 0), token 3 %ld (want 0)",
        counts[2], counts[3]);
  double f2 = (double)counts[2] / N;
  CHECK(fabs(f2 - 0.2 / 0.9) < 0.015, "top-p 0.75: token 2 frequency %.4f, expected %.4f", f2,
        0.2 / 0.9);
}

/* The fast paths (heap, histogram prefix) pick exactly the token a full sort picks. */
static void test_against_reference(void) {
  const struct {
    int vocab, draws;
    float scale;
  } shapes[] = {{1000, 1000, 2.0f}, {1000, 1000, 20.0f}, {1000, 1000, 0.01f}, {QWEN3_VOCAB, 8, 3.0f}};
  const struct sampler configs[] = {
      {1.0f, 0, 1, 11},   {0.7f, 0, 1, 12},   {1.3f, 40, 1, 13},  {1.0f, 0, 0.9f, 14},
      {0.6f, 0, 0.5f, 15}, {1.0f, 50, 0.8f, 16}, {2.0f, 5000, 0.95f, 17}, {0.05f, 0, 0.99f, 18}};
  uint64_t st = 9;
  for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
    int v = shapes[k].vocab;
    float *logits = xmalloc((size_t)v * sizeof *logits);
    for (int i = 0; i < v; i++) logits[i] = shapes[k].scale * randn(&st);
    for (int i = 0; i < v; i += 97) logits[i] = logits[(i * 7) % v];   /* some exact ties */
    void *scratch = xmalloc(sampler_scratch_bytes(v));
    for (size_t c = 0; c < sizeof configs / sizeof *configs; c++) {
      int mismatches = 0;
      for (int d = 0; d < shapes[k].draws; d++) {
        int got = sampler_next(&configs[c], logits, v, 2, (uint32_t)d, scratch);
        mismatches += got != reference_next(&configs[c], logits, v, 2, (uint32_t)d);
      }
      CHECK(mismatches == 0, "vocab %d scale %g config %zu: %d of %d draws differ from the "
            "full-sort reference", v, shapes[k].scale, c, mismatches, shapes[k].draws);
    }
    free(scratch);
    free(logits);
  }
}

static void test_reproducible(void) {
  enum { V = 50 };
  float logits[V];
  uint64_t st = 5;
  for (int i = 0; i < V; i++) logits[i] = randn(&st);
  struct sampler s = {1.0f, 0, 1, 2024};
  int same = 1, differ_step = 0, differ_seed = 0, differ_stream = 0;
  struct sampler other = s;
  other.seed = 2025;
  for (uint32_t step = 0; step < 200; step++) {
    int a = sampler_next(&s, logits, V, 3, step, NULL);
    same &= a == sampler_next(&s, logits, V, 3, step, NULL);
    differ_step += a != sampler_next(&s, logits, V, 3, step + 1, NULL);
    differ_seed += a != sampler_next(&other, logits, V, 3, step, NULL);
    differ_stream += a != sampler_next(&s, logits, V, 4, step, NULL);
  }
  CHECK(same, "the same (seed, stream, step) drew different tokens");
  CHECK(differ_step > 100 && differ_seed > 100 && differ_stream > 100,
        "draws barely change with step (%d), seed (%d), stream (%d) of 200", differ_step,
        differ_seed, differ_stream);
  float lo = 1, hi = 0;
  for (uint32_t i = 0; i < 100000; i++) {
    float u = sampler_uniform(1, 0, i);
    lo = fminf(lo, u), hi = fmaxf(hi, u);
  }
  CHECK(lo >= 0 && hi < 1 && lo < 1e-3f && hi > 0.999f, "uniform range [%g, %g]", lo, hi);
  CHECK(sampler_uniform(1, 0, 0) != sampler_uniform(1, 0, 1) &&
            sampler_uniform(1, 0, 0) != sampler_uniform(1, 1, 0) &&
            sampler_uniform(1, 0, 0) != sampler_uniform(0x100000001ull, 0, 0),
        "uniform ignores step, stream or the high word of the seed");
}

static void test_extremes(void) {
  long counts[6];
  float with_inf[6] = {-INFINITY, 0.5f, -INFINITY, 0.2f, NAN, -INFINITY};
  struct sampler s = {1.0f, 0, 1, 8};
  draw_counts(&s, with_inf, 6, 4000, counts);
  CHECK(counts[0] + counts[2] + counts[4] + counts[5] == 0 && counts[1] > 0 && counts[3] > 0,
        "-inf/NaN drawn: %ld %ld %ld %ld", counts[0], counts[2], counts[4], counts[5]);
  s.top_k = 4;   /* top-k larger than the finite tokens */
  draw_counts(&s, with_inf, 6, 4000, counts);
  CHECK(counts[1] + counts[3] == 4000, "top-k 4 with 2 finite tokens drew a -inf/NaN token");

  float plus_inf[6] = {1e30f, INFINITY, 3, INFINITY, -INFINITY, NAN};
  struct sampler t = {0.8f, 0, 0.9f, 8};
  draw_counts(&t, plus_inf, 6, 4000, counts);
  CHECK(counts[1] + counts[3] == 4000, "+inf tokens must take all the mass");
  t.top_p = 1;
  draw_counts(&t, plus_inf, 6, 4000, counts);
  CHECK(counts[1] > 1700 && counts[3] > 1700, "two +inf tokens share the draws: %ld %ld",
        counts[1], counts[3]);

  float huge[4] = {-3e38f, 3e38f, 2.9e38f, -FLT_MAX};
  struct sampler h = {1.0f, 0, 1, 8};
  draw_counts(&h, huge, 4, 1000, counts);
  CHECK(counts[1] == 1000, "huge logits: the top is e^(1e37) times likelier, drawn %ld", counts[1]);
  h.temperature = 1e38f;   /* differences of 1e37 / 1e38: mass e^-0.1 */
  draw_counts(&h, huge, 4, 20000, counts);
  CHECK(counts[1] > 0 && counts[2] > 0 && counts[0] == 0 && counts[3] == 0,
        "huge temperature: counts %ld %ld %ld %ld", counts[0], counts[1], counts[2], counts[3]);
  float near[3] = {1.0f, 1.0f + 1e-6f, 0.0f};
  struct sampler cold = {1e-30f, 0, 1, 8};
  draw_counts(&cold, near, 3, 1000, counts);
  CHECK(counts[1] == 1000, "tiny temperature behaves as greedy: %ld", counts[1]);
  struct sampler one = {1.0f, 1, 1, 8};
  float single[1] = {-5};
  CHECK(sampler_next(&one, single, 1, 0, 0, NULL) == 0, "vocab of one");
}

static void test_stop(void) {
  const int stop[2] = {151645, 151643};
  CHECK(sampler_is_stop(151645, stop, 2) && sampler_is_stop(151643, stop, 2), "stop tokens");
  CHECK(!sampler_is_stop(151644, stop, 2) && !sampler_is_stop(0, stop, 0), "not stop tokens");
}

static void test_speed(void) {
  float *logits = xmalloc(QWEN3_VOCAB * sizeof *logits);
  uint64_t st = 77;
  for (int i = 0; i < QWEN3_VOCAB; i++) logits[i] = 3 * randn(&st);
  void *scratch = xmalloc(sampler_scratch_bytes(QWEN3_VOCAB));
  const struct sampler configs[] = {{1, 0, 1, 1}, {0.7f, 50, 1, 1}, {0.7f, 0, 0.9f, 1},
                                    {0.7f, 20, 0.8f, 1}, {0, 0, 1, 1}};
  const char *names[] = {"T=1", "T=0.7 top-k 50", "T=0.7 top-p 0.9", "T=0.7 k 20 p 0.8",
                         "greedy"};
  for (int c = 0; c < 5; c++) {
    double t0 = now_seconds();
    int n = 50, sum = 0;
    for (int i = 0; i < n; i++) sum += sampler_next(&configs[c], logits, QWEN3_VOCAB, 0, i, scratch);
    double ms = (now_seconds() - t0) * 1e3 / n;
    printf("vocab %d, %-18s %.3f ms per token\n", QWEN3_VOCAB, names[c], ms);
    CHECK(sum >= 0 && ms < 50, "%s: %.1f ms per token is too slow", names[c], ms);
  }
  free(scratch);
  free(logits);
}

int main(void) {
  test_greedy();
  test_temperature();
  test_top_k();
  test_top_p();
  test_against_reference();
  test_reproducible();
  test_extremes();
  test_stop();
  test_speed();
  return checks_report();
}
