/* Checkpoint files (DESIGN.md "Files on disk"): the HDF5 level, with no knowledge of workers or
 * ranks. The trainer (trainer/checkpoint.c) and qwen3-convert both write and read through it.
 *
 * A checkpoint root holds committed step directories, `latest` and nothing half-written:
 *
 *   <root>/step_00000100/stage_000_of_002.h5   stage 0's tensors
 *   <root>/step_00000100/stage_001_of_002.h5   stage 1's tensors
 *   <root>/step_00000100/model.h5              the index and the run state
 *   <root>/latest -> step_00000100             a relative symlink, replaced atomically
 *
 * A stage file holds, at its root, three fp32 datasets per tensor, in the tensor's Hugging Face
 * shape ([rows, cols], or [n] for a vector): `<name>` (the master weights), `<name>.adam_m` and
 * `<name>.adam_v` (AdamW moments), e.g. `model.layers.3.mlp.up_proj.weight.adam_v`. Every
 * dataset is chunked (about 4 MiB a chunk, whole rows) with the Fletcher32 filter, so a flipped
 * byte fails the read of its chunk. The writer computes the checksums itself and writes whole
 * chunks (H5Dwrite_chunk): the file is the one HDF5's filter would write, and HDF5 reads it.
 * Root attributes: format_version, stage, n_stages.
 *
 * model.h5 holds an external link, under the same name, to every dataset of every stage file
 * (the links are the index: which file holds which tensor; `h5ls -r model.h5` lists the whole
 * model), and the run state: root attributes format_version, step, samples_seen, tokens_seen,
 * n_stages; group `config` with the Hugging Face config.json keys as attributes (hidden_size,
 * num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
 * vocab_size, rope_theta, rms_norm_eps, tie_word_embeddings, max_position_embeddings); dataset
 * `job.pb` (uint8): the packed qwen3.Job of the run that wrote it (absent from converted models).
 *
 * Commit protocol (a kill at any moment leaves the previous checkpoint loadable): stage files go
 * to <root>/step_%08d.tmp/ and are fsynced; model.h5 is written last, then the directory is
 * fsynced and renamed to step_%08d/, the root fsynced, and `latest` replaced by renaming a new
 * symlink over it. Only then are older step directories (beyond keep_last) and stale .tmp
 * directories removed.
 *
 * Every function that can fail returns 0 (or a count), or -1 with a message in err naming the
 * file and the tensor at fault. */
#ifndef QWEN3_CKPT_FILE_H
#define QWEN3_CKPT_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "common/qwen3_config.h"

#define CKPT_FORMAT_VERSION 2
#define CKPT_MAX_NAME 200   /* bytes of a tensor name */

/* The run state of model.h5. */
struct ckpt_state {
  int64_t step;
  uint64_t samples_seen, tokens_seen;
  int n_stages;
  struct qwen3_config config;
  const uint8_t *job;   /* packed qwen3.Job; NULL when none (a converted model) */
  size_t job_len;
};

/* <root>/step_%08d, or <root>/step_%08d.tmp while it is being written. */
void ckpt_step_path(char *out, size_t len, const char *root, int64_t step, int tmp);
/* stage_%03d_of_%03d.h5 */
void ckpt_stage_file(char *out, size_t len, int stage, int n_stages);

/* ---- writing ------------------------------------------------------------------------------- */

/* Creates <root> if needed and an empty <root>/step_%08d.tmp/, removing what an interrupted
 * save left there. */
int ckpt_begin(const char *root, int64_t step, char *err, size_t errlen);

/* One stage file, written tensor by tensor. */
struct ckpt_stage_writer;
int ckpt_stage_create(struct ckpt_stage_writer **out, const char *path, int stage, int n_stages,
                      char *err, size_t errlen);
/* ndim 1 (shape[0]) or 2; adam_m / adam_v NULL: zeros (a model that never trained), which take
 * no space in the file. */
int ckpt_stage_put(struct ckpt_stage_writer *w, const char *name, int ndim, const int64_t *shape,
                   const float *weights, const float *adam_m, const float *adam_v, char *err,
                   size_t errlen);
/* Closes and fsyncs the file; frees w whatever happens. */
int ckpt_stage_finish(struct ckpt_stage_writer *w, char *err, size_t errlen);
/* 1 when this HDF5 is thread-safe (it then serialises its calls), so that a stage file may be
 * written on a thread of its own while other threads use HDF5; 0 when it is not. The three calls
 * above never die(): they may run on a thread that must not end the job itself. */
int ckpt_thread_safe(void);

/* After all s->n_stages stage files of step s->step are in the .tmp directory: writes model.h5,
 * commits the directory, moves `latest`, then removes committed steps before s->step beyond the
 * newest keep_last (0: keep all) and stale .tmp directories. */
int ckpt_commit(const char *root, const struct ckpt_state *s, int keep_last, char *err,
                size_t errlen);

/* ---- reading ------------------------------------------------------------------------------- */

/* The step directory `path` means: itself when it holds model.h5, else what its `latest` points
 * at (a checkpoint root). */
int ckpt_resolve(const char *path, char *out, size_t len, char *err, size_t errlen);
/* For resume AUTO: the step directory `latest` under root points at; 0 with out empty when root
 * has no `latest` (a fresh run), -1 when `latest` is broken. */
int ckpt_find_latest(const char *root, char *out, size_t len, char *err, size_t errlen);

enum ckpt_part { CKPT_WEIGHTS, CKPT_ADAM_M, CKPT_ADAM_V };

struct ckpt;
/* Opens a step directory or a checkpoint root (see ckpt_resolve) and reads the run state. */
int ckpt_open(struct ckpt **out, const char *path, char *err, size_t errlen);
void ckpt_close(struct ckpt *c);   /* NULL is fine */
const char *ckpt_dir(const struct ckpt *c);   /* the step directory */
const struct ckpt_state *ckpt_get_state(const struct ckpt *c);
/* The weight tensors, sorted by name. */
size_t ckpt_count(const struct ckpt *c);
const char *ckpt_name_at(const struct ckpt *c, size_t i);
/* The stored shape of a tensor (ndim 1 or 2). */
int ckpt_shape(struct ckpt *c, const char *name, int *ndim, int64_t shape[2], char *err,
               size_t errlen);
/* Reads one part of tensor `name` into dst, after checking that it is stored with the shape the
 * caller expects. */
int ckpt_read(struct ckpt *c, const char *name, enum ckpt_part part, int ndim,
              const int64_t *shape, float *dst, char *err, size_t errlen);

#endif
