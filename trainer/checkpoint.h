/* Checkpoints of a training run (DESIGN.md "Files on disk"): a directory step_%08d/ holding one
 * HDF5 file per pipeline stage with that stage's fp32 weights and AdamW moments under Hugging
 * Face tensor names, and model.h5 written by rank 0 with external links to every tensor by name
 * plus the run state. Written under a temporary name, synced, renamed; `latest` replaced last.
 * Tensors are found by name, so a checkpoint written by one pipeline layout loads into another. */
#ifndef QWEN3_CHECKPOINT_H
#define QWEN3_CHECKPOINT_H

#include <stdint.h>

#include "comm/comm.h"
#include "trainer/job.h"
#include "worker/worker.h"

/* What a resumed run needs besides tensors. Every sampling and rounding random number of the
 * engine is counter-based on (seed, step, ...), so the step is the whole RNG state. */
struct train_state {
  int step;                /* optimizer steps completed */
  uint64_t samples_seen;   /* global samples consumed: the data loaders' position */
  uint64_t tokens_seen;    /* target tokens trained on */
};

/* Collective (every rank calls it at the same step boundary): the ranks of replica 0 write their
 * stage files, rank 0 writes model.h5 with the run state and the job, commits the directory
 * atomically, moves `latest` and removes checkpoints beyond checkpoint.keep_last. Dies naming
 * the file on any failure; the previous checkpoint stays intact. */
void checkpoint_save(const Job *job, struct comm *c, struct worker *w,
                     const struct train_state *s);

/* Collective. checkpoint.resume: AUTO (latest under the checkpoint dir, if any), NEVER, or a
 * checkpoint directory. Loads this stage's weights and AdamW moments by name and fills s.
 * Returns 1 when the run resumes, 0 when it starts fresh. Dies on a damaged or mismatched
 * checkpoint, naming the file and tensor. */
int checkpoint_resume(const Job *job, struct comm *c, struct worker *w, struct train_state *s);

/* init.checkpoint: this stage's weights only (fresh optimizer, step 0). */
void checkpoint_load_weights(const char *dir, struct worker *w);


#endif
