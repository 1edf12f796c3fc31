/* Training and validation samples from token shards, drawn deterministically from a seed.
 *
 * Plain shards are one token stream cut into windows of seq + 1 tokens at stride seq (inputs
 * and next-token targets). Shards with a loss mask (chat/SFT) give one sample per document,
 * truncated or padded to seq, so a sample never attends to another; targets are -1 wherever
 * the mask is 0 and on padding.
 *
 * Packed (LOADER_PACK, data.pack): several documents per sample. Each document becomes pieces
 * of at most seq + 1 tokens (a masked document is truncated to one, as above; a plain one is cut
 * into pieces that overlap by one token, so that each of its tokens after the first is a target
 * exactly once). A piece of n tokens takes n - 1 slots of a sample: its last token is only a
 * target, since it predicts nothing of its own document. Positions restart at 0 with every
 * piece, which is what makes the engine mask attention between them (attn_shape.doc_start), and
 * no target crosses a piece's end, so each piece gets the loss it would get alone. The pieces
 * are packed once, at open, by first-fit decreasing (a pure function of the shards and seq: the
 * same samples on every rank and after a resume); pieces with no target are left out.
 *
 * Sample g of a run is taken from a fresh permutation of all samples every epoch: epoch g / n,
 * permuted index g % n. */
#ifndef QWEN3_LOADER_H
#define QWEN3_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "data/shard.h"

/* loader_open's flags */
enum {
  LOADER_TRAINING = 1,   /* a shard that holds no sample is an error */
  LOADER_PACK = 2,       /* several documents per sample (data.pack) */
};

/* A document, or a piece of one, in a packed sample. */
struct loader_piece {
  uint64_t begin;          /* its first token, in its shard */
  uint32_t shard;
  unsigned len : 31;       /* tokens, 2 .. seq + 1; it fills len - 1 slots */
  unsigned truncated : 1;  /* a masked document longer than seq + 1 tokens, cut here */
};

struct loader {
  struct shard *shards;
  int n_shards;
  int seq;
  int documents;            /* 1: one sample per document (the shards carry a loss mask) */
  int pack;                 /* 1: packed samples (LOADER_PACK) */
  uint64_t n_samples;
  uint64_t *first_sample;   /* [n_shards + 1]: samples of shard i start here (not packed) */
  struct loader_piece *pieces;   /* packed: sample k is pieces[pack_first[k] .. pack_first[k+1]) */
  uint64_t *pack_first;     /* packed: [n_samples + 1] */
  uint64_t slots_used;      /* of the n_samples x seq input slots, those holding a token */
  uint64_t seed;
  uint64_t perm_epoch;      /* the epoch `perm` belongs to; UINT64_MAX: none yet */
  uint64_t *perm;
  uint64_t truncated;       /* samples (packed: pieces) drawn so far whose document was longer
                               than seq + 1 and was cut */
};

/* Loads every shard; dies naming the file and field when one is unreadable, mixes masked and
 * unmasked shards, has tokens past vocab_size or, with LOADER_TRAINING, holds no sample. */
void loader_open(struct loader *l, char *const *paths, int n_paths, int seq, uint64_t seed,
                 int vocab_size, const char *field, int flags);
void loader_close(struct loader *l);

/* 0 when shard s gives at least one sample of seq tokens, packed or not; else -1 with err
 * saying what it lacks (job validation and loader_open share these words). */
int loader_shard_check(const struct shard *s, int seq, int pack, char *err, size_t errlen);

/* The fraction of the samples' input slots (n_samples x seq) that hold no token: padding. */
double loader_padding(const struct loader *l);

/* The k-th sample in shard order (packed: in packing order): seq tokens, targets and
 * positions. */
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
