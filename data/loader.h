/* Training and validation samples from token shards, drawn deterministically from a seed.
 *
 * Plain shards are one token stream cut into windows of seq + 1 tokens at stride seq (inputs
 * and next-token targets). Shards with a loss mask (chat/SFT) give one sample per document,
 * truncated or padded to seq, so a sample never attends to another; targets are -1 wherever
 * the mask is 0 and on padding. Sample g of a run is taken from a fresh permutation of all
 * samples every epoch: epoch g / n, permuted index g % n. */
#ifndef QWEN3_LOADER_H
#define QWEN3_LOADER_H

#include <stdint.h>

#include "data/shard.h"

struct loader {
  struct shard *shards;
  int n_shards;
  int seq;
  int documents;            /* 1: one sample per document (the shards carry a loss mask) */
  uint64_t n_samples;
  uint64_t *first_sample;   /* [n_shards + 1]: samples of shard i start here */
  uint64_t seed;
  uint64_t perm_epoch;      /* the epoch `perm` belongs to; UINT64_MAX: none yet */
  uint64_t *perm;
  uint64_t truncated;       /* samples drawn so far whose document was longer than seq + 1 */
};

/* Loads every shard; dies naming the file and field when one is unreadable, mixes masked and
 * unmasked shards, has tokens past vocab_size or, for training, holds no sample. */
void loader_open(struct loader *l, char *const *paths, int n_paths, int seq, uint64_t seed,
                 int vocab_size, const char *field, int training);
void loader_close(struct loader *l);

/* The k-th sample in shard order (validation): seq tokens, targets and positions. */
void loader_sample(struct loader *l, uint64_t k, int32_t *tokens, int32_t *targets,
                   int32_t *positions);
/* The g-th sample of the shuffled training stream. */
void loader_shuffled(struct loader *l, uint64_t g, int32_t *tokens, int32_t *targets,
                     int32_t *positions);

/* Scoring (evaluation): every document scored on its own, in chunks of seq + 1 tokens that
 * overlap by one, so that each token of a document after its first is predicted exactly once,
 * from at most seq tokens of its own document. */
struct score_chunk {
  int shard;
  uint64_t doc;     /* index within the shard */
  uint64_t start;   /* first token of the chunk, relative to the document */
};
/* All chunks of all documents, in shard and document order; returns their number. */
uint64_t loader_score_chunks(const struct loader *l, struct score_chunk **chunks);
/* tokens/targets/positions (seq each) of one chunk; targets are -1 past its end and, in
 * shards with a loss mask, where the mask is 0. */
void loader_score_sample(const struct loader *l, const struct score_chunk *ch, int32_t *tokens,
                         int32_t *targets, int32_t *positions);

#endif
