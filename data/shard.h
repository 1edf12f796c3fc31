/* HDF5 token shards (DESIGN.md "Files on disk"): `tokens` (uint32), `doc_offsets` (uint64,
 * n_docs + 1 entries: document d is tokens[doc_offsets[d] .. doc_offsets[d+1])) and, for chat/SFT
 * data, `loss_mask` (uint8, 1 on tokens the model is trained to predict). Root attributes:
 * `vocab_size` (uint32), `tokenizer` (string: sha256 of the tokenizer.json, or "bytes" / "ids"),
 * `format_version` (int). */
#ifndef QWEN3_SHARD_H
#define QWEN3_SHARD_H

#include <stddef.h>
#include <stdint.h>

#define SHARD_FORMAT_VERSION 1

struct shard {
  char *path;
  uint64_t n_tokens, n_docs;
  uint32_t *tokens;
  uint64_t *doc_offsets;   /* n_docs + 1 */
  uint8_t *loss_mask;      /* NULL when the shard has none */
  uint32_t vocab_size;
  char tokenizer[80];
};

/* Loads a whole shard into memory. Returns 0, or -1 with a message naming the file and what is
 * wrong in err. */
int shard_load(struct shard *s, const char *path, char *err, size_t errlen);
void shard_free(struct shard *s);

/* Builds a shard document by document, then writes it under a temporary name and renames it,
 * so a reader never sees a half-written shard. */
struct shard_writer;
struct shard_writer *shard_writer_new(int with_loss_mask);
/* mask may be NULL for a shard without loss mask */
void shard_writer_add(struct shard_writer *w, const uint32_t *ids, const uint8_t *mask, size_t n);
uint64_t shard_writer_tokens(const struct shard_writer *w);
uint64_t shard_writer_docs(const struct shard_writer *w);
uint64_t shard_writer_masked(const struct shard_writer *w);   /* tokens with mask 1 */
/* Returns 0, or -1 with err filled. Frees the writer either way. */
int shard_writer_finish(struct shard_writer *w, const char *path, uint32_t vocab_size,
                        const char *tokenizer, char *err, size_t errlen);

#endif
