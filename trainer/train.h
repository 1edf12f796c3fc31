/* The training run of one rank: the pipeline schedule over micro-batches, the optimizer step,
 * and the step log. */
#ifndef QWEN3_TRAIN_H
#define QWEN3_TRAIN_H

#include "comm/comm.h"
#include "kernels/ops.h"
#include "trainer/job.h"
#include "worker/worker.h"

struct run_options {
  int timing;                 /* --timing: per-stage times */
  int fail_rank, fail_step;   /* --fail-at RANK:STEP, for failure tests; fail_step 0: off */
};

/* The plan of this job's stage `stage` (layers, batch shape, live micro-batches). */
void stage_plan(struct worker_plan *p, const Job *job, const struct qwen3_config *cfg, int pp,
                int stage);

/* precision.bf16_last_layers resolved: -1 means the last 15% of blocks, rounded up. */
int nvfp4_bf16_last_layers(const Qwen3__Precision *prec, int num_layers);

/* --dry-run: the rank layout with parameters and memory per rank, printed by rank 0. */
void print_layout(const Job *job, const struct qwen3_config *cfg, const struct comm *c);

void train_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
               const struct backend *be, const struct run_options *opt);

/* train.steps = 0: load the weights (init.checkpoint, init.hf_dir, or the checkpoint that
 * checkpoint.resume names) and evaluate once. */
void eval_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
              const struct backend *be, const struct run_options *opt);

#endif
