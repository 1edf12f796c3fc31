/* Checkpoints of a training run (DESIGN.md "Files on disk"): a directory step_%08d/ holding one
 * HDF5 file per pipeline stage with that stage's fp32 weights and AdamW moments under Hugging
 * Face tensor names, and model.h5 written by rank 0 with external links to every tensor by name
 * plus the run state. Written under a temporary name, synced, renamed; `latest` replaced last.
 * The stage files are written by a thread while training goes on.
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

/* Collective (every rank calls it at the same step boundary). The rank's n chunks (workers,
 * parallel.virtual_stages) all go into its stage's file. Waits for the previous save to be
 * committed (checkpoint_wait), then the ranks of replica 0 copy their stage's weights and AdamW
 * moments into a host staging buffer (checkpoint_stage_ahead's, kept) and return, while a
 * thread of each writes and fsyncs its stage file. Once every rank's file is synced (found by
 * checkpoint_poll or checkpoint_wait), rank 0 writes model.h5 with the run state and the job,
 * commits the directory atomically, moves `latest` and removes checkpoints beyond
 * checkpoint.keep_last. Dies naming the file on any failure, at the latest in the next
 * checkpoint_poll, checkpoint_wait or checkpoint_save; the previous checkpoint stays intact. */
void checkpoint_save(const Job *job, struct comm *c, struct worker *chunks, int n,
                     const struct train_state *s);
/* Collective at every step boundary while a save is in flight (a no-op otherwise): commits it
 * if every rank's writer has finished, without waiting for them. */
void checkpoint_poll(void);
/* The host memory (pinned on a GPU) a save stages for a chunk of plan p (a stage: the sum over
 * its chunks) on the ranks that write
 * (replica 0): its weights and both AdamW moments in fp32, the tied copy left out. Held from the
 * start of the run (checkpoint_stage_ahead) to its end. */
size_t checkpoint_staging_bytes(const struct worker_plan *p);
/* At the start of a training run, on every rank (the ranks of replica 0 act): starts allocating
 * the staging buffer of this rank's n chunks on a thread (signals blocked), so that no save, the
 * one a stop signal asks for least of all, waits the tens of seconds pinning GiBs takes. Logs its
 * size and seconds when it is ready. The first save waits for the thread if it has not finished
 * and takes the buffer; should it have failed, the save allocates its own as before.
 * checkpoint_release joins the thread of a run that never saved. */
void checkpoint_stage_ahead(const struct comm *c, const struct worker *chunks, int n);
/* Collective: waits for every rank's writer and commits the save in flight, if any. */
void checkpoint_wait(void);

/* Collective. checkpoint.resume: AUTO (latest under the checkpoint dir, if any), NEVER, or a
 * checkpoint directory. Loads the weights and AdamW moments of this rank's n chunks by name
 * and fills s.
 * Returns 1 when the run resumes, 0 when it starts fresh. Dies on a damaged or mismatched
 * checkpoint, naming the file and tensor. */
int checkpoint_resume(const Job *job, struct comm *c, struct worker *chunks, int n,
                      struct train_state *s);

/* checkpoint.dir, or <output_dir>/checkpoints */
void checkpoint_root(const Job *job, char *out, size_t len);

/* Writes, fsyncs and removes a 4 KiB probe file in dir: 0, or -1 with err naming the file (a
 * read-only or full file system is found before any work, not at the first save). */
int probe_writable(const char *dir, char *err, size_t errlen);

/* Rank 0 of a training run, before any work: creates checkpoint.dir, checks that it takes a
 * write, and locks it for the life of the process (flock on <dir>/.lock, which names the
 * holder's pid and host; a second run refuses). Refuses a run that would overwrite committed
 * steps or move `latest` back (resume NEVER, or a checkpoint older than the newest step in the
 * directory) unless checkpoint.overwrite, which deletes the newer steps at its first save.
 * Returns 0, or -1 with err naming the directory and what to do. */
int checkpoint_prepare(const Job *job, char *err, size_t errlen);
/* At exit, on every rank: waits for the save in flight and commits it (checkpoint_wait: collective
 * when a save is in flight), waits for checkpoint_stage_ahead's thread, frees the staging buffer
 * and releases the lock (which the process's exit would release too). */
void checkpoint_release(void);

/* init.checkpoint: the weights of this rank's n chunks only (a run from them starts at step 0
 * with a fresh optimizer). Returns the step the checkpoint was saved at, for the log. */
int checkpoint_load_weights(const char *dir, struct worker *chunks, int n);


#endif
