/* The optimizer step of a stage: gradient reductions between ranks, global-norm clipping and
 * AdamW, plus the learning-rate schedule. */
#ifndef QWEN3_OPTIM_H
#define QWEN3_OPTIM_H

#include "comm/comm.h"
#include "trainer/job.h"
#include "worker/worker.h"

/* Learning rate at step (1-based) of total_steps: linear warmup over optim.warmup_steps, then
 * optim.schedule down to optim.min_lr at the last step. */
double lr_schedule(const Qwen3__Optim *o, int total_steps, int step);

/* Sums tied-embedding gradients between first and last stage, sums gradients over replicas,
 * clips to optim.grad_clip by the global L2 norm and applies AdamW (step t, 1-based).
 * Returns the global gradient norm before clipping. */
double optimizer_step(struct worker *w, struct comm *c, const Qwen3__Optim *o, double lr, int t);

#endif
