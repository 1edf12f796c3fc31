/* While one of our HDF5 calls runs, our own message (naming the file and tensor) replaces the
 * error stack HDF5 would print; quiet_off puts HDF5's printer back. */
#ifndef QWEN3_H5_QUIET_H
#define QWEN3_H5_QUIET_H

#include <hdf5.h>

struct quiet {
  H5E_auto2_t fn;
  void *data;
};

static inline void quiet_on(struct quiet *q) {
  H5Eget_auto2(H5E_DEFAULT, &q->fn, &q->data);
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static inline void quiet_off(const struct quiet *q) { H5Eset_auto2(H5E_DEFAULT, q->fn, q->data); }

#endif
