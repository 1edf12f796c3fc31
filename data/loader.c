#include "data/loader.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/* ---- packing --------------------------------------------------------------------------------- */

/* The pieces of shard s (its index `shard`) that have a target, into out when not NULL; returns
 * their number. */
static uint64_t shard_pieces(const struct shard *s, uint32_t shard, int seq,
                             struct loader_piece *out) {
  uint64_t n = 0, most = (uint64_t)seq + 1;
  for (uint64_t d = 0; d < s->n_docs; d++) {
    uint64_t begin = s->doc_offsets[d], end = s->doc_offsets[d + 1];
    /* a masked document is one piece, cut to seq + 1 tokens as when it is not packed; a plain
     * one continues in the next piece, from the last token of this one */
    for (uint64_t at = begin; at + 1 < end; at += (uint64_t)seq) {
      uint64_t len = end - at < most ? end - at : most;
      int has_target = !s->loss_mask;
      for (uint64_t j = 1; j < len && !has_target; j++) has_target = s->loss_mask[at + j];
      if (has_target) {
        if (out)
          out[n] = (struct loader_piece){at, shard, (uint32_t)len, s->loss_mask && len < end - at};
        n++;
      }
      if (s->loss_mask) break;
    }
  }
  return n;
}

/* Longest first; ties in shard and token order, so that the packing is the same everywhere. */
static int longest_first(const void *a_, const void *b_) {
  const struct loader_piece *a = a_, *b = b_;
  if (a->len != b->len) return a->len > b->len ? -1 : 1;
  if (a->shard != b->shard) return a->shard < b->shard ? -1 : 1;
  return a->begin < b->begin ? -1 : a->begin > b->begin;
}

/* First-fit decreasing: each piece, longest first, goes into the first sample with room for
 * it. `room` is a max-tree over candidate samples (as many as pieces: never more are needed),
 * leaf b holding sample b's free slots, so the first fit is found in log(n) steps. Returns the
 * number of samples; bin_of[p] is piece p's. */
static uint64_t first_fit(const struct loader_piece *pieces, uint64_t n, int seq,
                          uint64_t *bin_of) {
  uint64_t leaves = 1, bins = 0;
  while (leaves < n) leaves *= 2;
  int32_t *room = xmalloc(2 * leaves * sizeof *room);
  for (uint64_t i = 0; i < 2 * leaves; i++) room[i] = seq;
  for (uint64_t p = 0; p < n; p++) {
    int32_t need = (int32_t)pieces[p].len - 1;
    uint64_t i = 1;
    while (i < leaves) i = room[2 * i] >= need ? 2 * i : 2 * i + 1;
    room[i] -= need;
    bin_of[p] = i - leaves;
    if (bin_of[p] >= bins) bins = bin_of[p] + 1;
    for (i /= 2; i >= 1; i /= 2)
      room[i] = room[2 * i] > room[2 * i + 1] ? room[2 * i] : room[2 * i + 1];
  }
  free(room);
  return bins;
}

static void pack(struct loader *l) {
  uint64_t n = 0;
  for (int i = 0; i < l->n_shards; i++)
    n += shard_pieces(&l->shards[i], (uint32_t)i, l->seq, NULL);
  struct loader_piece *sorted = xmalloc((n ? n : 1) * sizeof *sorted);
  n = 0;
  for (int i = 0; i < l->n_shards; i++)
    n += shard_pieces(&l->shards[i], (uint32_t)i, l->seq, sorted + n);
  qsort(sorted, n, sizeof *sorted, longest_first);
  uint64_t *bin_of = xmalloc((n ? n : 1) * sizeof *bin_of);
  l->n_samples = first_fit(sorted, n, l->seq, bin_of);
  /* samples in the order first-fit opened them, each holding its pieces longest first */
  l->pack_first = xcalloc(l->n_samples + 1, sizeof *l->pack_first);
  for (uint64_t p = 0; p < n; p++) l->pack_first[bin_of[p] + 1]++;
  for (uint64_t b = 0; b < l->n_samples; b++) l->pack_first[b + 1] += l->pack_first[b];
  uint64_t *fill = xmalloc((l->n_samples ? l->n_samples : 1) * sizeof *fill);
  memcpy(fill, l->pack_first, l->n_samples * sizeof *fill);
  l->pieces = xmalloc((n ? n : 1) * sizeof *l->pieces);
  for (uint64_t p = 0; p < n; p++) {
    l->pieces[fill[bin_of[p]]++] = sorted[p];
    l->slots_used += sorted[p].len - 1;
  }
  free(fill);
  free(bin_of);
  free(sorted);
}

static void packed_sample(struct loader *l, uint64_t k, int32_t *tokens, int32_t *targets,
                          int32_t *positions) {
  int t = 0;
  for (uint64_t p = l->pack_first[k]; p < l->pack_first[k + 1]; p++) {
    const struct loader_piece *c = &l->pieces[p];
    const struct shard *s = &l->shards[c->shard];
    const uint32_t *doc = s->tokens + c->begin;
    const uint8_t *mask = s->loss_mask ? s->loss_mask + c->begin : NULL;
    for (int j = 0; j + 1 < (int)c->len; j++, t++) {
      tokens[t] = (int32_t)doc[j];
      targets[t] = !mask || mask[j + 1] ? (int32_t)doc[j + 1] : -1;
      positions[t] = j;
    }
    l->truncated += c->truncated;
  }
  /* padding continues the last piece's positions, as it does after an unpacked document: a
   * sample of one piece then stays plain causal, and padding has no target anyway */
  for (int next = positions[t - 1] + 1; t < l->seq; t++, next++) {
    tokens[t] = 0;
    targets[t] = -1;
    positions[t] = next;
  }
}

/* ---- opening --------------------------------------------------------------------------------- */

/* Samples of shard s alone when not packed: its windows, or its documents */
static uint64_t shard_samples(const struct shard *s, int seq) {
  if (s->loss_mask) return s->n_docs;
  return s->n_tokens > 0 ? (s->n_tokens - 1) / (uint64_t)seq : 0;
}

/* Slots holding a token when not packed: all of a window's, min(len, seq) of a document's. */
static uint64_t unpacked_slots(const struct loader *l) {
  if (!l->documents) return l->n_samples * (uint64_t)l->seq;
  uint64_t used = 0;
  for (int i = 0; i < l->n_shards; i++) {
    const struct shard *s = &l->shards[i];
    for (uint64_t d = 0; d < s->n_docs; d++) {
      uint64_t len = s->doc_offsets[d + 1] - s->doc_offsets[d];
      used += len < (uint64_t)l->seq ? len : (uint64_t)l->seq;
    }
  }
  return used;
}

int loader_shard_check(const struct shard *s, int seq, int pack, char *err, size_t errlen) {
  if (pack && shard_pieces(s, 0, seq, NULL) == 0)
    return errorf(err, errlen, s->loss_mask
                  ? "holds no document with a loss-masked token after its first (within "
                    "data.seq_len + 1 tokens): data.pack has nothing to train on"
                  : "holds no document of 2 tokens or more: data.pack has nothing to train on");
  if (!pack && shard_samples(s, seq) == 0)
    return errorf(err, errlen, "holds no sample: %llu tokens, need at least data.seq_len + 1 = "
                  "%d", (unsigned long long)s->n_tokens, seq + 1);
  return 0;
}

void loader_open(struct loader *l, char *const *paths, int n_paths, int seq, uint64_t seed,
                 int vocab_size, const char *field, int flags) {
  memset(l, 0, sizeof *l);
  l->seq = seq;
  l->seed = seed;
  l->pack = (flags & LOADER_PACK) != 0;
  l->perm_epoch = UINT64_MAX;
  l->n_shards = n_paths;
  l->shards = xcalloc((size_t)n_paths, sizeof *l->shards);
  l->first_sample = xcalloc((size_t)n_paths + 1, sizeof *l->first_sample);
  for (int i = 0; i < n_paths; i++) {
    struct shard *s = &l->shards[i];
    char err[1024];
    if (shard_load(s, paths[i], err, sizeof err) != 0) die("%s[%d]: %s", field, i, err);
    if (s->vocab_size > (uint32_t)vocab_size)
      die("%s[%d]: %s was built for a vocabulary of %u tokens; the model has %d", field, i,
          paths[i], s->vocab_size, vocab_size);
    int masked = s->loss_mask != NULL;
    if (i == 0) l->documents = masked;
    else if (masked != l->documents)
      die("%s[%d]: %s %s a loss mask but %s does%s: mix chat and plain shards in separate runs",
          field, i, paths[i], masked ? "has" : "has no", paths[0], l->documents ? "" : " not");
    if ((flags & LOADER_TRAINING) && loader_shard_check(s, seq, l->pack, err, sizeof err) != 0)
      die("%s[%d]: %s %s", field, i, paths[i], err);
    l->first_sample[i + 1] = l->first_sample[i] + shard_samples(s, seq);
  }
  l->n_samples = l->first_sample[n_paths];
  if (l->pack) pack(l);
  else l->slots_used = unpacked_slots(l);
}

void loader_close(struct loader *l) {
  for (int i = 0; i < l->n_shards; i++) shard_free(&l->shards[i]);
  free(l->shards);
  free(l->first_sample);
  free(l->pieces);
  free(l->pack_first);
  free(l->perm);
  memset(l, 0, sizeof *l);
}

double loader_padding(const struct loader *l) {
  double slots = (double)l->n_samples * l->seq;
  return slots > 0 ? 1.0 - (double)l->slots_used / slots : 0.0;
}

/* ---- samples --------------------------------------------------------------------------------- */

void loader_sample(struct loader *l, uint64_t k, int32_t *tokens, int32_t *targets,
                   int32_t *positions) {
  k %= l->n_samples;
  if (l->pack) {
    packed_sample(l, k, tokens, targets, positions);
    return;
  }
  int i = 0;
  while (k >= l->first_sample[i + 1]) i++;
  const struct shard *s = &l->shards[i];
  uint64_t local = k - l->first_sample[i];
  int seq = l->seq;
  for (int t = 0; t < seq; t++) positions[t] = t;
  if (!l->documents) {
    const uint32_t *w = s->tokens + local * (uint64_t)seq;
    for (int t = 0; t < seq; t++) {
      tokens[t] = (int32_t)w[t];
      targets[t] = (int32_t)w[t + 1];
    }
    return;
  }
  uint64_t begin = s->doc_offsets[local], len = s->doc_offsets[local + 1] - begin;
  if (len > (uint64_t)seq + 1) {
    len = (uint64_t)seq + 1;
    l->truncated++;
  }
  const uint32_t *doc = s->tokens + begin;
  const uint8_t *mask = s->loss_mask + begin;
  for (int t = 0; t < seq; t++) {
    int have = (uint64_t)t < len, next = (uint64_t)t + 1 < len;
    tokens[t] = have ? (int32_t)doc[t] : 0;
    targets[t] = next && mask[t + 1] ? (int32_t)doc[t + 1] : -1;
  }
}

void loader_shuffled(struct loader *l, uint64_t g, int32_t *tokens, int32_t *targets,
                     int32_t *positions) {
  uint64_t epoch = g / l->n_samples;
  if (epoch != l->perm_epoch) {   /* the order depends only on (seed, epoch) */
    if (!l->perm) l->perm = xmalloc(l->n_samples * sizeof *l->perm);
    for (uint64_t i = 0; i < l->n_samples; i++) l->perm[i] = i;
    uint64_t state = l->seed * 0x100000001B3ull ^ epoch;
    for (uint64_t i = l->n_samples - 1; i > 0; i--) {   /* Fisher-Yates */
      uint64_t j = splitmix64(&state) % (i + 1), t = l->perm[i];
      l->perm[i] = l->perm[j];
      l->perm[j] = t;
    }
    l->perm_epoch = epoch;
  }
  loader_sample(l, l->perm[g % l->n_samples], tokens, targets, positions);
}

uint64_t loader_score_chunks(const struct loader *l, struct score_chunk **chunks) {
  uint64_t n = 0, cap = 1024;
  struct score_chunk *out = xmalloc(cap * sizeof *out);
  for (int i = 0; i < l->n_shards; i++) {
    const struct shard *s = &l->shards[i];
    for (uint64_t d = 0; d < s->n_docs; d++) {
      uint64_t len = s->doc_offsets[d + 1] - s->doc_offsets[d];
      for (uint64_t start = 0; start + 1 < len; start += (uint64_t)l->seq) {
        if (n == cap) out = xrealloc(out, (cap *= 2) * sizeof *out);
        out[n++] = (struct score_chunk){i, d, start};
      }
    }
  }
  *chunks = out;
  return n;
}

void loader_score_sample(const struct loader *l, const struct score_chunk *ch, int32_t *tokens,
                         int32_t *targets, int32_t *positions) {
  const struct shard *s = &l->shards[ch->shard];
  uint64_t begin = s->doc_offsets[ch->doc] + ch->start, end = s->doc_offsets[ch->doc + 1];
  for (int t = 0; t < l->seq; t++) {
    uint64_t at = begin + (uint64_t)t;
    int have = at < end, next = at + 1 < end;
    tokens[t] = have ? (int32_t)s->tokens[at] : 0;
    targets[t] = next && (!s->loss_mask || s->loss_mask[at + 1]) ? (int32_t)s->tokens[at + 1] : -1;
    positions[t] = t;
  }
}
