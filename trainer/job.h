/* The job spec: loading a binary qwen3.Job, command-line overrides, the effective job in text
 * format, and validation of every field before any work starts. */
#ifndef QWEN3_JOB_H
#define QWEN3_JOB_H

#include <stddef.h>
#include <stdio.h>

#include "common/qwen3_config.h"
#include "common/util.h"
#include "job.pb-c.h"

typedef Qwen3__Job Job;

#define JOB_MAX_BYTES (16 << 20)
#define JOB_MAX_MICRO_BATCHES (1 << 16)   /* parallel.micro_batches; --plan keeps within it */

/* Reads and decodes a .pb job; NULL with err naming the file when it is missing, truncated,
 * garbage or not a regular file of at most JOB_MAX_BYTES. Every section is present afterwards
 * (absent ones hold their defaults). */
Job *job_load(const char *path, char *err, size_t errlen);

/* Applies "section.field=value" (scalars, enums by name, strings; a repeated scalar field is
 * replaced by the comma-separated values; a repeated message such as eval.prompts is replaced by one new
 * element on the first assignment that reaches it, which later assignments fill in).
 * Returns 0, or -1 with err naming the field and what is allowed. */
int job_set(Job *job, const char *assignment, char *err, size_t errlen);

/* Writes the effective job, defaults included, in protobuf text format. */
void job_print(FILE *f, const Job *job);

/* Problems of a job, collected before any work so that every rank can agree on them and exit
 * cleanly (no MPI_Abort): each is one line naming its field or file and what is allowed. */
void job_problem(const char *fmt, ...) PRINTF_LIKE(1, 2);
int job_problem_count(void);
/* Prints every problem ("qwen3: invalid job: ...") and the closing line to stderr. */
void job_problems_print(void);

/* Checks every field of the job against its range and stated limits, and resolves the model
 * shape (from the job, model.hf_config or init.hf_dir's config.json). `world` is the number of
 * processes (0: unknown). Cheap: every rank runs it. Returns the number of problems found. */
int job_validate(const Job *job, int world, struct qwen3_config *cfg);

/* Opens, with the readers the run itself uses, every input file the job names: the tokenizer
 * (and the text prompts through it), the token shards, init.hf_dir's tensors, the checkpoints
 * to load. Rank 0 runs it after job_validate found nothing. Returns the number of problems. */
int job_validate_files(const Job *job, const struct qwen3_config *cfg);

/* The outputs, after the inputs passed: output_dir is created and a probe written to it (a full
 * or read-only disk is found now, not after training); for a training run checkpoint.dir too,
 * locked against a second run for as long as this process lives (checkpoint.c). Rank 0 only. */
int job_validate_outputs(const Job *job);

#endif
