/* What every fuzz target shares: a private scratch directory, writing the input to a file there
 * (our readers take paths), HDF5 kept quiet, and a check that a reader closed every HDF5 object
 * it opened (a leaked id would keep a stale file open for the next input). */
#ifndef QWEN3_FUZZ_COMMON_H
#define QWEN3_FUZZ_COMMON_H

#define _POSIX_C_SOURCE 200809L
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char fuzz_dir[64];

static inline void fuzz_init(void) {
  if (fuzz_dir[0]) return;
  snprintf(fuzz_dir, sizeof fuzz_dir, "/tmp/qwen3-fuzz-XXXXXX");
  if (!mkdtemp(fuzz_dir)) {
    perror("mkdtemp");
    abort();
  }
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

/* Writes data[0..n) to fuzz_dir/name; returns the path in a static buffer. */
static inline const char *fuzz_write(const char *name, const uint8_t *data, size_t n) {
  static char path[4][256];
  static int k;
  char *p = path[k++ & 3];
  snprintf(p, sizeof path[0], "%s/%s", fuzz_dir, name);
  FILE *f = fopen(p, "wb");
  if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
    perror(p);
    abort();
  }
  return p;
}

/* Every HDF5 object a reader opened is closed again, whatever the input. */
static inline void fuzz_check_hdf5_closed(const char *who) {
  ssize_t open = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
  if (open != 0) {
    fprintf(stderr, "%s left %zd HDF5 objects open\n", who, open);
    abort();
  }
}

#endif
