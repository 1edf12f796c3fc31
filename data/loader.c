#include "data/loader.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"

void loader_open(struct loader *l, char *const *paths, int n_paths, int seq, uint64_t seed,
                 int vocab_size, const char *field, int training) {
  memset(l, 0, sizeof *l);
  l->seq = seq;
  l->seed = seed;
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
    uint64_t n = masked ? s->n_docs : (s->n_tokens > 0 ? (s->n_tokens - 1) / (uint64_t)seq : 0);
    if (n == 0 && training)
      die("%s[%d]: %s holds no sample: %llu tokens, need at least data.seq_len + 1 = %d", field,
          i, paths[i], (unsigned long long)s->n_tokens, seq + 1);
    l->first_sample[i + 1] = l->first_sample[i] + n;
  }
  l->n_samples = l->first_sample[n_paths];
}

void loader_close(struct loader *l) {
  for (int i = 0; i < l->n_shards; i++) shard_free(&l->shards[i]);
  free(l->shards);
  free(l->first_sample);
  free(l->perm);
  memset(l, 0, sizeof *l);
}

void loader_sample(struct loader *l, uint64_t k, int32_t *tokens, int32_t *targets,
                   int32_t *positions) {
  k %= l->n_samples;
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
