/* The next-token sampler; the contract is in sampler.h. */
#include "worker/sampler.h"

#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "kernels/argmax.h"
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

/* The tokens of mass > 0 in bin b, sorted. */
static int collect_bin(struct cand *out, const float *logits, int vocab, float m, float t, int b) {
  int n = 0;
  for (int i = 0; i < vocab; i++) {
    float d = neg_log_w(logits[i], m, t);
    if (bin_of(d) != b) continue;   /* before expf: most tokens stop here */
    float w = expf(-d);
    if (w > 0) out[n++] = (struct cand){logits[i], w, i};
  }
  qsort(out, (size_t)n, sizeof *out, cmp_cand);
  return n;
}

/* Does the cumulative mass `cum` reach `mass`? The nucleus is closed (>=), the draw's interval of
 * a token half-open, so a draw u*kept < kept never falls past the last kept token. */
static int reaches(double cum, double mass, int closed) { return closed ? cum >= mass : cum > mass; }

/* Walks sorted tokens from the cumulative mass *cum (of all tokens before them) to the first that
 * reaches mass; returns its index (the last one if rounding keeps cum a hair short), with *cum
 * including it. */
static int walk(const struct cand *c, int n, double *cum, double mass, int closed) {
  for (int i = 0; i < n; i++)
    if (reaches(*cum += c[i].w, mass, closed)) return i;
  return n - 1;
}

/* The first nonempty bin at which the cumulative bin mass reaches mass, with the mass of the bins
 * before it in *before (the last nonempty bin if rounding keeps the total a hair short). */
static int locate(const double *bin_mass, double mass, int closed, double *before) {
  double acc = 0;
  int last = 0;
  for (int b = 0; b < NBINS; b++) {
    if (bin_mass[b] == 0) continue;
    last = b;
    *before = acc;
    if (reaches(acc += bin_mass[b], mass, closed)) break;
  }
  return last;
}

size_t sampler_scratch_bytes(int vocab) { return (size_t)vocab * sizeof(struct cand); }

float sampler_uniform(uint64_t seed, uint32_t stream, uint32_t step) {
  uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)}, counter[4] = {stream, step, 0, 0};
  uint32_t out[4];
  nvfp4_philox4x32_10(out, counter, key);
  return (float)(out[0] >> 8) * 0x1p-24f;
}

int sampler_greedy(const struct sampler *s) { return !(s->temperature > 0); }

int sampler_next(const struct sampler *s, const float *logits, int vocab, uint32_t stream,
                 uint32_t step, void *scratch) {
  int top = argmax_first(logits, vocab);
  float m = logits[top], t = s->temperature;
  if (sampler_greedy(s) || !(m > -INFINITY)) return top;

  struct cand *cands = scratch ? scratch : xmalloc(sampler_scratch_bytes(vocab));
  double u = sampler_uniform(s->seed, stream, step), total = 0, cum = 0;
  int token;
  if (s->top_k > 0 && s->top_k < vocab) {
    int n = select_top_k(cands, logits, vocab, s->top_k);
    for (int i = 0; i < n; i++) total += cands[i].w = expf(-neg_log_w(cands[i].logit, m, t));
    double kept = total;
    if (s->top_p < 1) {   /* the nucleus ends at the token that reaches top_p */
      n = walk(cands, n, &cum, s->top_p * total, 1) + 1;
      kept = cum;
    }
    cum = 0;
    token = cands[walk(cands, n, &cum, u * kept, 0)].id;
  } else {
    /* The same walks over the whole vocabulary, with bins standing in for the tokens they hold:
     * only the bin where a walk stops has to be sorted. */
    double bin_mass[NBINS] = {0}, before = 0;
    for (int i = 0; i < vocab; i++) {
      float d = neg_log_w(logits[i], m, t), w = expf(-d);
      if (w > 0) {
        total += w;
        bin_mass[bin_of(d)] += w;
      }
    }
    double kept = total;
    int cut_bin = NBINS, cut_n = 0;
    if (s->top_p < 1) {   /* drop the mass past the nucleus from the histogram */
      double need = s->top_p * total;
      cut_bin = locate(bin_mass, need, 1, &before);
      cum = before;
      cut_n = walk(cands, collect_bin(cands, logits, vocab, m, t, cut_bin), &cum, need, 1) + 1;
      kept = cum;
      bin_mass[cut_bin] = cum - before;
      for (int b = cut_bin + 1; b < NBINS; b++) bin_mass[b] = 0;
    }
    double target = u * kept;
    int b = locate(bin_mass, target, 0, &before);
    int n = collect_bin(cands, logits, vocab, m, t, b);
    cum = before;
    token = cands[walk(cands, b == cut_bin ? cut_n : n, &cum, target, 0)].id;
  }
  if (!scratch) free(cands);
  return token;
}

int sampler_is_stop(int token, const int *stop, int n) {
  for (int i = 0; i < n; i++)
    if (stop[i] == token) return 1;
  return 0;
}
