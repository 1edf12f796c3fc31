/* The next-token sampler; the contract is in sampler.h. */
#include "worker/sampler.h"

#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "kernels/nvfp4.h"

/* A kept token: its logit decides the order, w = exp((logit - max) / T) its unnormalised mass. */
struct cand {
  float logit, w;
  int id;
};

/* The defined order: descending logit, ties by ascending id. */
static int before(const struct cand *a, const struct cand *b) {
  return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int cmp_cand(const void *pa, const void *pb) {
  const struct cand *a = pa, *b = pb;
  return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

/* -log of a token's mass relative to the top token's: 0 for the top (also when it is +inf, where
 * x - m would be NaN), +inf for -inf, NaN for NaN. */
static float neg_log_w(float x, float m, float t) { return x == m ? 0.0f : (m - x) / t; }

/* The histogram of neg_log_w that finds the few bins worth sorting: BINS_PER_UNIT bins per
 * natural-log unit; everything past NBINS / BINS_PER_UNIT (mass < e^-64 of the top) shares the
 * last bin. */
#define BINS_PER_UNIT 4
#define NBINS 256

static int bin_of(float d) {
  return d < (float)NBINS / BINS_PER_UNIT ? (int)(d * BINS_PER_UNIT) : NBINS - 1;
}

static int argmax(const float *x, int n) {
  int best = -1;
  for (int i = 0; i < n; i++)
    if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
  return best < 0 ? 0 : best;
}

/* The k best tokens with a logit above -inf, sorted; returns how many (<= k). A heap whose root is
 * the worst kept token: a token enters only if it comes before the root. */
static int select_top_k(struct cand *heap, const float *logits, int vocab, int k) {
  int n = 0;
  for (int i = 0; i < vocab; i++) {
    struct cand c = {logits[i], 0.0f, i};
    if (!(c.logit > -INFINITY)) continue;   /* -inf and NaN: probability 0 */
    int at;
    if (n < k) {   /* sift up from a new leaf */
      at = n++;
      while (at > 0 && before(&heap[(at - 1) / 2], &c)) {
        heap[at] = heap[(at - 1) / 2];
        at = (at - 1) / 2;
      }
    } else if (before(&c, &heap[0])) {   /* replace the root, sift down */
      at = 0;
      for (;;) {
        int child = 2 * at + 1;
        if (child >= n) break;
        if (child + 1 < n && before(&heap[child], &heap[child + 1])) child++;
        if (!before(&c, &heap[child])) break;
        heap[at] = heap[child];
        at = child;
      }
    } else {
      continue;
    }
    heap[at] = c;
  }
  qsort(heap, (size_t)n, sizeof *heap, cmp_cand);
  return n;
}

/* All tokens of mass > 0 in the bins whose cumulative mass (from the top) first exceeds `need`,
 * sorted: a prefix of the defined order, since bins are monotone in the logit. */
static int select_prefix(struct cand *out, const float *logits, int vocab, float m, float t,
                         const double *bin_mass, double need) {
  int last = NBINS - 1;
  double acc = 0;
  for (int b = 0; b < NBINS; b++)
    if ((acc += bin_mass[b]) > need) {
      last = b;
      break;
    }
  int n = 0;
  for (int i = 0; i < vocab; i++) {
    float d = neg_log_w(logits[i], m, t), w = expf(-d);
    if (w > 0 && bin_of(d) <= last) out[n++] = (struct cand){logits[i], w, i};
  }
  qsort(out, (size_t)n, sizeof *out, cmp_cand);
  return n;
}

size_t sampler_scratch_bytes(int vocab) { return (size_t)vocab * sizeof(struct cand); }

float sampler_uniform(uint64_t seed, uint32_t stream, uint32_t step) {
  uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)}, counter[4] = {stream, step, 0, 0};
  uint32_t out[4];
  nvfp4_philox4x32_10(out, counter, key);
  return (float)(out[0] >> 8) * 0x1p-24f;
}

int sampler_next(const struct sampler *s, const float *logits, int vocab, uint32_t stream,
                 uint32_t step, void *scratch) {
  int top = argmax(logits, vocab);
  float m = logits[top], t = s->temperature;
  if (!(t > 0) || !(m > -INFINITY)) return top;

  struct cand *cands = scratch ? scratch : xmalloc(sampler_scratch_bytes(vocab));
  double u = sampler_uniform(s->seed, stream, step), total = 0;
  int n;
  if (s->top_k > 0 && s->top_k < vocab) {
    n = select_top_k(cands, logits, vocab, s->top_k);
    int kept = 0;   /* drop tokens whose mass underflows to 0: they can never be drawn */
    for (int i = 0; i < n; i++) {
      cands[i].w = expf(-neg_log_w(cands[i].logit, m, t));
      if (cands[i].w > 0) {
        total += cands[i].w;
        kept++;
      }
    }
    n = kept;   /* sorted by logit, so the zero masses are the tail */
  } else {
    double bin_mass[NBINS] = {0};
    for (int i = 0; i < vocab; i++) {
      float d = neg_log_w(logits[i], m, t), w = expf(-d);
      if (w > 0) {
        total += w;
        bin_mass[bin_of(d)] += w;
      }
    }
    /* Only the prefix that top_p keeps, or that the draw reaches, has to be sorted. */
    double need = s->top_p < 1 ? s->top_p * total : u * total;
    n = select_prefix(cands, logits, vocab, m, t, bin_mass, need);
  }

  /* Nucleus: cut after the token whose cumulative mass reaches top_p; the draw then covers the
   * kept mass only (renormalised). Without top_p the draw covers the whole distribution. */
  double kept_mass = total;
  if (s->top_p < 1) {
    double cum = 0, need = s->top_p * total;
    int i = 0;
    while (i < n && (cum += cands[i].w) < need) i++;
    n = i < n ? i + 1 : n;
    kept_mass = cum;
  }
  double target = u * kept_mass, cum = 0;
  int token = cands[n - 1].id;   /* if rounding leaves cum a hair below target */
  for (int i = 0; i < n; i++)
    if ((cum += cands[i].w) > target) {
      token = cands[i].id;
      break;
    }
  if (!scratch) free(cands);
  return token;
}

int sampler_is_stop(int token, const int *stop, int n) {
  for (int i = 0; i < n; i++)
    if (stop[i] == token) return 1;
  return 0;
}
