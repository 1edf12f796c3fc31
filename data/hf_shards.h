/* The shards of a Hugging Face model directory: their file names and the
 * model.safetensors.index.json that maps every tensor to one (hf_write_index returns 0, or -1
 * with a message naming the file in err). */
#ifndef QWEN3_HF_SHARDS_H
#define QWEN3_HF_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#include "data/safetensors.h"

/* model-0000K-of-0000N.safetensors, the name transformers gives shard k (0-based) of n. */
void hf_shard_file(char *out, size_t len, int shard, int n_shards);

/* hf_dir/model.safetensors.index.json: tensor names[i] lives in shard shard[i]. */
int hf_write_index(const char *hf_dir, const char *const *names, const int *shard, size_t n,
                   int n_shards, double total_bytes, char *err, size_t errlen);

#endif
