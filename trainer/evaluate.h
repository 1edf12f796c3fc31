/* Evaluation: validation loss, perplexity and per-document scores over data.valid, and
 * generation for eval.prompts, through the same pipeline and block table as training. */
#ifndef QWEN3_EVALUATE_H
#define QWEN3_EVALUATE_H

#include "comm/comm.h"
#include "trainer/job.h"
#include "worker/worker.h"

struct eval_summary {
  int has_valid;
  double valid_loss, valid_ppl;
  double valid_tokens;
  double valid_tokens_per_s;   /* positions through the model a second, scored or not */
};

/* Collective. Replica 0 evaluates, through the rank's n chunks (parallel.virtual_stages; one
 * worker each, in local chunk order); the other replicas return at once. Rank 0 prints the
 * results and writes output_dir/scores.jsonl and appends to output_dir/eval.jsonl; the summary
 * is filled on rank 0. Dies (the whole job) when eval.check_kv finds the cached and replayed
 * paths apart. The workers are left reshaped: the caller reshapes them back for training. */
void evaluate(const Job *job, struct comm *c, struct worker *chunks, int n, int step,
              struct eval_summary *summary);

struct tokenizer;
/* The ids of one of eval.prompts: its ids as given, or its text through the chat template with
 * the generation prompt (tok loaded). *ids malloc'd, *n of them; 0, or -1 with err. */
int eval_prompt_ids(const Qwen3__Prompt *q, const struct tokenizer *tok, int32_t **ids,
                    size_t *n, char *err, size_t errlen);
/* The length in tokens of the longest of eval.prompts, the job's tokenizer loaded for text ones
 * (the job is valid: dies on what job_validate refuses). */
int eval_longest_prompt(const Job *job);

#endif
