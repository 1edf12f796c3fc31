/* --plan N: every layout a job could run in on N processes (pipeline stages x data-parallel
 * replicas, ZeRO, schedule, micro-batches, interleaved chunks per stage), with the largest rank's
 * memory and the simulated pipeline bubble, best first. Nothing is run. */
#ifndef QWEN3_PLAN_H
#define QWEN3_PLAN_H

#include "common/qwen3_config.h"
#include "kernels/ops.h"
#include "trainer/job.h"
#include "worker/worker.h"

#define PLAN_MAX_PROCESSES 4096

/* The plan of local chunk `chunk` of rank `rank` when the job runs as pp stages x dp replicas:
 * the chunk's layers and activations (stage_plan), and its shard of the AdamW state under
 * parallel.zero. --dry-run prints it for every rank of the job's layout; --plan takes the
 * largest over the ranks (their chunks summed) of every layout. */
void plan_rank(struct worker_plan *p, const Job *job, const struct qwen3_config *cfg, int pp,
               int dp, int rank, int chunk, enum dtype act);

/* What the processes would run on. */
struct plan_device {
  enum dtype act;           /* the backend's activation dtype */
  double limit;             /* bytes one process may hold; 0: no limit */
  double overhead;          /* bytes each process holds besides the plan: CUDA workspace, context */
  const char *limit_from;   /* where the limit comes from, for the header */
};

/* Prints to stdout the layouts of the job on `processes` processes, the recommended one first,
 * and the command line that runs it. */
void plan_print(const Job *job, const char *job_path, const struct qwen3_config *cfg,
                int processes, const struct plan_device *dev);

#endif
