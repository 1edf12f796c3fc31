/* What the benchmark programs share: their RESULT lines, printed and appended to
 * $GPU_BENCH_RESULTS when set (bench/gpu_bench.sh collects every part's there for its table),
 * their random inputs in backend memory, and the median of repeated timings of an op. */
#ifndef QWEN3_BENCH_RESULT_H
#define QWEN3_BENCH_RESULT_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "kernels/ops.h"

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

static inline int bench_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* the median of v[0 .. n-1] (n >= 1), which it sorts */
static inline double bench_median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* `bytes` of backend memory, or the program ends saying so */
static inline void *bench_alloc(const struct backend *be, size_t bytes) {
  void *p = be->alloc(bytes);
  if (!p) {
    fprintf(stderr, "cannot allocate %zu bytes of %s memory\n", bytes, be->name);
    exit(1);
  }
  return p;
}

/* n values of dtype t in backend memory, uniform in [-1, 1), the same for the same seed */
static inline void *bench_random(const struct backend *be, size_t n, enum dtype t,
                                 uint64_t seed) {
  float *host = malloc(n * sizeof *host);
  if (!host) {
    fprintf(stderr, "out of host memory for %zu random values\n", n);
    exit(1);
  }
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; i++) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    host[i] = (float)((double)(s >> 40) * 0x1.0p-23 - 1.0);
  }
  float *f32 = bench_alloc(be, n * sizeof *f32);
  be->to_device(f32, host, n * sizeof *f32);
  free(host);
  if (t == DT_F32) return f32;
  void *dev = bench_alloc(be, n * dtype_bytes(t));
  be->convert(dev, t, f32, DT_F32, n);
  be->free(f32);
  return dev;
}

/* Seconds of one call of fn(be, arg, op): one untimed call (an op's first call sets things up),
 * then batches of `calls` calls between two synchronizes, at least 3 and at most
 * BENCH_MAX_REPEATS of them, until `seconds` have passed; the median batch over `calls`. */
#define BENCH_MAX_REPEATS 50
typedef void (*bench_op)(const struct backend *be, const void *arg, int op);
static inline double bench_time(const struct backend *be, bench_op fn, const void *arg, int op,
                                int calls, double seconds) {
  double t[BENCH_MAX_REPEATS];
  int n = 0;
  fn(be, arg, op);
  be->synchronize();
  const double start = now_seconds();
  do {
    const double a = now_seconds();
    for (int i = 0; i < calls; i++) fn(be, arg, op);
    be->synchronize();
    t[n++] = (now_seconds() - a) / calls;
  } while (n < BENCH_MAX_REPEATS && (n < 3 || now_seconds() - start < seconds));
  return bench_median(t, n);
}

#endif
