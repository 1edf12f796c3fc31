/* The shape of a Qwen3 model: everything the engine needs, read from a job's model section or a
 * Hugging Face config.json. Never hard-code one of these values anywhere else. */
#ifndef QWEN3_CONFIG_H
#define QWEN3_CONFIG_H

struct qwen3_config {
  int hidden_size;
  int num_layers;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int intermediate_size;
  int vocab_size;
  double rope_theta;
  double rms_norm_eps;
  int tie_embeddings;
  int max_seq_len;
};

#endif
