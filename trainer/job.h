/* The job spec: loading a binary qwen3.Job, command-line overrides, the effective job in text
 * format, and validation of every field before any work starts. */
#ifndef QWEN3_JOB_H
#define QWEN3_JOB_H

#include <stddef.h>
#include <stdio.h>

#include "common/qwen3_config.h"
#include "job.pb-c.h"

typedef Qwen3__Job Job;

/* Reads and decodes a .pb job; dies naming the file when it is missing, truncated or garbage.
 * Every section is present afterwards (absent ones hold their defaults). */
Job *job_load(const char *path);

/* Applies "section.field=value" (scalars, enums by name, strings; a repeated scalar field is
 * replaced by the comma-separated values; a repeated message such as eval.prompts is replaced by one new
 * element on the first assignment that reaches it, which later assignments fill in).
 * Returns 0, or -1 with err naming the field and what is allowed. */
int job_set(Job *job, const char *assignment, char *err, size_t errlen);

/* Writes the effective job, defaults included, in protobuf text format. */
void job_print(FILE *f, const Job *job);

/* Checks every field and file the job names and resolves the model shape (from the job or the
 * Hugging Face config.json). `world` is the number of processes (0: unknown). On any problem
 * rank 0 prints every error found, each naming its field or file, and every rank dies. */
void job_validate(const Job *job, int world, int rank, struct qwen3_config *cfg);

#endif
