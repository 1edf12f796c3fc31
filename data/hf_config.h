/* Hugging Face config.json <-> struct qwen3_config.
 *
 * Loading refuses what the engine does not compute rather than computing something else:
 * model_type other than "qwen3", hidden_act other than "silu", attention_bias, sliding-window
 * attention, and any RoPE scaling. rope_theta is read at the top level (transformers 4) or from
 * "rope_parameters" (transformers 5); both present and different is refused.
 *
 * The size keys (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
 * vocab_size) are required. Every other key, when absent, takes the default of transformers'
 * Qwen3Config, so that a file means here what it means there: num_key_value_heads 32 (null:
 * num_attention_heads), head_dim 128 (not hidden/heads: Qwen3Config sets it), rope_theta 10000,
 * rms_norm_eps 1e-6, tie_word_embeddings false, max_position_embeddings 32768.
 *
 * Both functions return 0, or -1 with a message naming the file and the key in err. */
#ifndef QWEN3_HF_CONFIG_H
#define QWEN3_HF_CONFIG_H

#include <stddef.h>

#include "common/qwen3_config.h"

int hf_config_load(struct qwen3_config *c, const char *path, char *err, size_t errlen);

/* Writes a config.json that transformers 4.5x and 5.x load as Qwen3ForCausalLM, laid out like
 * the official Qwen3 configs. torch_dtype names the weights' type: "bfloat16" or "float32".
 * Written under a temporary name and renamed. */
int hf_config_write(const char *path, const struct qwen3_config *c, const char *torch_dtype, char *err,
                    size_t errlen);

#endif
