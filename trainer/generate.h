/* Text generation through the pipeline: prefill, then decode, every stage keeping its layers'
 * KV cache; the last stage samples and sends each token back to the other stages. */
#ifndef QWEN3_GENERATE_H
#define QWEN3_GENERATE_H

#include <stdint.h>

#include "comm/comm.h"
#include "worker/sampler.h"
#include "worker/worker.h"

struct gen_config {
  int max_new_tokens;
  struct sampler sampler;
  const int *stop;   /* token ids that end a completion (kept in the output) */
  int n_stop;
  int use_kv;        /* 0: the reference path, a full replay of the sequence per token */
  int check_kv;      /* also run the replay per token and compare it with the cached path */
};

struct gen_result {
  int32_t *ids;          /* the completion (malloc'd), stop token included */
  int n;
  int stopped;           /* ended by a stop token, not by max_new_tokens */
  double prefill_s;      /* the prefill round (every prompt once, until the first tokens came
                          * back), shared among the prompts by their lengths */
  double decode_s;       /* from the first to the last token */
  /* check_kv, on the last stage: */
  float *step_diff;      /* [n]: largest logit difference of each step between the two paths */
  int first_mismatch;    /* first step whose tokens differ between the two paths; -1: none */
};

/* Collective over the stages of one replica: each stage calls it with the same prompts and its
 * n chunks (parallel.virtual_stages; one worker each, in local chunk order). Each prompt is
 * prefilled on its own, then with the KV cache every sequence decodes together, one token of
 * each per step (one pass over the weights for all of them). The workers are reshaped for
 * one sequence of the longest prompt + max_new_tokens, or the number of prompts if larger.
 * Results are complete on stage 0 (ids, timings) and on the last stage (ids, the KV check). */
void generate(struct worker *chunks, int n, struct comm *c, const struct gen_config *g,
              int n_prompts, int32_t *const *prompts, const int *prompt_len,
              struct gen_result *out);

/* The path of a forward through the pipeline: every stage's chunk 0, then every stage's chunk
 * 1, and so on (interleaved 1F1B's order of the layers, schedule.h's chunk_source and
 * chunk_dest). Chunk k of this stage receives its `bytes` of input from the model chunk before
 * it (nothing for the model's first chunk) and sends its output to the one after (nothing from
 * the model's last). Each rank runs its chunks in order, so the transfers form one chain and
 * every pair of ranks meets its messages in the order they were sent. */
void pipeline_recv_input(struct comm *c, struct worker *chunk, int k, size_t bytes, int tag);
void pipeline_send_output(struct comm *c, struct worker *chunk, int k, int n, size_t bytes,
                          int tag);

#endif
