/* The run's output files (metrics.jsonl, eval.jsonl, scores.jsonl): every write, flush, sync and
 * close is checked, and a failure (a full disk, an I/O error) stops the run naming the file
 * instead of leaving it silently empty. */
#ifndef QWEN3_OUTPUT_H
#define QWEN3_OUTPUT_H

#include <jansson.h>
#include <stdio.h>

struct output {
  FILE *f;
  char path[4200];
};

/* Opens output_dir/name (mode "w" or "a"), creating output_dir; dies naming the file. */
void output_open(struct output *o, const char *output_dir, const char *name, const char *mode);
/* One compact JSON object and a newline, flushed; takes the reference of obj. Dies naming the
 * file when any part of it cannot be written. */
void output_json_line(struct output *o, json_t *obj, int real_precision);
/* fflush, fsync, fclose, each checked; dies naming the file. */
void output_close(struct output *o);

#endif
