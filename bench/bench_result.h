/* The benchmark programs' RESULT lines: printed, and appended to $GPU_BENCH_RESULTS when set
 * (bench/gpu_bench.sh collects every part's there for its table). */
#ifndef QWEN3_BENCH_RESULT_H
#define QWEN3_BENCH_RESULT_H

#include <stdio.h>
#include <stdlib.h>

static inline void result_line(const char *line) {
  printf("%s\n", line);
  fflush(stdout);
  const char *path = getenv("GPU_BENCH_RESULTS");
  FILE *f = path && *path ? fopen(path, "a") : NULL;
  if (f) {
    fprintf(f, "%s\n", line);
    fclose(f);
  }
}

#endif
