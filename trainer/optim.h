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

/* Overlapped data-parallel reduction (parallel.overlap_reduction; several replicas, no ZeRO):
 * starts the sum over the replicas of local layer `layer`'s gradients, once the step's last
 * backward has passed it; backward goes on while it runs. Call it for every layer of every chunk
 * in the step, then optimizer_step with layers_reduced 1. */
void optimizer_reduce_layer(struct worker *w, struct comm *c, int layer);

/* Without replicas, where a layer's gradients are final once the step's last backward has
 * passed it: adds the squares of local layer `layer`'s gradients into the step's norm sums,
 * on the backend's side stream, so that they run beside the rest of the backward rather than
 * between it and the update. Call it for every layer of every chunk in the step, then
 * optimizer_step with BY_LAYER_NORMED. */
void optimizer_norm_layer(struct worker *w, int layer);

/* What the step's last backward started for every layer (optimizer_step's by_layer). */
enum by_layer { BY_LAYER_NOTHING, BY_LAYER_REDUCED, BY_LAYER_NORMED };

/* Stops the run when value (the step's `what`) is not finite, naming the NVFP4 operand that met
 * a non-finite value when one of the n chunks has one. */
void stop_if_nonfinite(struct worker *chunks, int n, int step, const char *what, double value);

/* One step over the rank's n chunks (parallel.virtual_stages; one worker each, in local chunk
 * order): sums tied-embedding gradients between the chunk with the embedding and the one with
 * the head, sums gradients over replicas (the rest of them, and waits for all, when
 * optimizer_reduce_layer started every layer's), clips to optim.grad_clip by the global L2
 * norm (the layers' squares already summed when optimizer_norm_layer did) and applies AdamW
 * (step t, 1-based); a non-finite norm stops the run before any update. Returns the global
 * gradient norm before clipping. */
double optimizer_step(struct worker *chunks, int n, struct comm *c, const Qwen3__Optim *o,
                      double lr, int t, enum by_layer by_layer);

#endif
