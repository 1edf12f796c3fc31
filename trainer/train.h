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

/* The plan of local chunk `chunk` of this job's stage `stage` (layers, batch shape, live
 * micro-batches), its activations of dtype act (the backend's). With parallel.virtual_stages 1
 * chunk 0 is the whole stage. */
void stage_plan(struct worker_plan *p, const Job *job, const struct qwen3_config *cfg, int pp,
                int stage, int chunk, enum dtype act);

/* precision.bf16_first_layers resolved: -1 means the first 2 blocks, one per 8 blocks in a
 * model of fewer than 16. */
int nvfp4_bf16_first_layers(const Qwen3__Precision *prec, int num_layers);

/* The same for the precision of a job stored in a checkpoint: checkpoints record the resolved
 * number (checkpoint_save); a stored job without it was written when the default was 0. */
int nvfp4_stored_first_layers(const Qwen3__Precision *prec, int num_layers);

/* precision.bf16_last_layers resolved: -1 means the last 15% of blocks, rounded up. */
int nvfp4_bf16_last_layers(const Qwen3__Precision *prec, int num_layers);

/* --dry-run: the rank layout with parameters and memory per rank, printed by rank 0. `be`: the
 * backend the job would run on (not initialized: its table says what it has). */
void print_layout(const Job *job, const struct qwen3_config *cfg, const struct comm *c,
                  enum dtype act, const struct backend *be);

/* SIGTERM, SIGUSR1 and SIGUSR2 make every rank finish its step, checkpoint, and exit 0.
 * Through Open MPI 4.1's mpirun:
 *  - SIGUSR1 / SIGUSR2 to mpirun are forwarded to every rank as they are: the ranks save at the
 *    next step boundary and exit 0, and so does mpirun. This is the signal to send to mpirun.
 *  - SIGTERM (or SIGINT) to mpirun is not forwarded as such: mpirun aborts the job, sending the
 *    ranks SIGCONT and SIGTERM, then SIGKILL odls_base_sigkill_timeout seconds later (default
 *    1). The ranks save at the next step boundary if the step and the save end within that
 *    time (raise it with `mpirun --mca odls_base_sigkill_timeout 600`), and exit 0; mpirun
 *    itself always exits 1 after a SIGTERM, whatever the ranks return.
 *  - SIGTERM sent to the ranks themselves (Slurm signals every process of a step): exit 0, and
 *    mpirun with them. */
void train_catch_stop_signals(void);

void train_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
               const struct backend *be, const struct run_options *opt);

/* train.steps = 0: load the weights (init.checkpoint, init.hf_dir, or the checkpoint that
 * checkpoint.resume names) and evaluate once. */
void eval_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
              const struct backend *be, const struct run_options *opt);

#endif
