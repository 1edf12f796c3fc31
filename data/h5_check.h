/* Checked reads of HDF5 files we did not necessarily write (token shards, checkpoints, NVFP4
 * dumps). An HDF5 file is untrusted input: before any attribute or dataset is read, its
 * datatype class, element size and signedness, its dataspace (scalar, or the rank the reader
 * expects) and, for datasets, its storage (no external raw-data files, no virtual datasets,
 * bounded chunks, only the Fletcher32 filter) are checked, and every size derived from the file
 * is computed with overflow checks and bounded by the file's size or a stated limit before
 * anything is allocated. No value is converted between types silently: a reader says exactly
 * which type it accepts.
 *
 * Every function returns 0 (or an id >= 0), or -1 with a message in err naming the file (`file`),
 * the object and what is allowed. Callers silence HDF5's own error printing (h5_quiet.h). */
#ifndef QWEN3_H5_CHECK_H
#define QWEN3_H5_CHECK_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

/* The element type a reader accepts. */
enum h5c_class {
  H5C_UINT,     /* unsigned integer of exactly `size` bytes (either byte order) */
  H5C_SINT,     /* signed integer of exactly `size` bytes */
  H5C_FLOAT,    /* IEEE float of exactly `size` bytes */
};

/* A chunk of a dataset we read is at most this many bytes (ours are at most 4 MiB). */
#define H5C_MAX_CHUNK_BYTES (64u << 20)

/* 1 if loc holds a link called name, 0 if not, -1 on error. A name holding '/' or "." is refused
 * (every object we read sits directly under its group). */
int h5c_exists(hid_t loc, const char *file, const char *name, char *err, size_t errlen);
/* name must be a hard link in loc (not a soft or external link, which would lead elsewhere). */
int h5c_require_hard(hid_t loc, const char *file, const char *name, char *err, size_t errlen);

/* Scalar integer attribute of any integer type of at most 8 bytes; its value must lie in
 * [lo, hi]. */
int h5c_attr_int(hid_t loc, const char *file, const char *name, int64_t lo, int64_t hi,
                 int64_t *out, char *err, size_t errlen);
/* Scalar unsigned (or non-negative signed) integer attribute of at most 8 bytes. */
int h5c_attr_u64(hid_t loc, const char *file, const char *name, uint64_t *out, char *err,
                 size_t errlen);
/* Scalar float attribute (4 or 8 bytes), finite. */
int h5c_attr_f64(hid_t loc, const char *file, const char *name, double *out, char *err,
                 size_t errlen);
/* Scalar fixed-length string attribute of at most cap - 1 bytes; out is NUL-terminated. */
int h5c_attr_str(hid_t loc, const char *file, const char *name, char *out, size_t cap,
                 char *err, size_t errlen);

/* Opens dataset `name` of loc after checking that it is a hard link to a dataset whose type is
 * exactly (cls, size), whose dataspace is simple of a rank in [min_rank, max_rank] (at most 2;
 * *rank and dims[] receive it) with every dim >= 1 (0 is allowed when allow_empty), and whose storage is
 * contiguous, compact or chunked in chunks of at most H5C_MAX_CHUNK_BYTES, with no filter but
 * Fletcher32 and no external raw data. `what` says what the dataset is ("token shard dataset",
 * "tensor") in messages. Returns the dataset id or -1. */
hid_t h5c_open_dataset(hid_t loc, const char *file, const char *name, const char *what,
                       enum h5c_class cls, size_t size, int min_rank, int max_rank,
                       int allow_empty, int *rank, hsize_t dims[2], char *err, size_t errlen);

/* *bytes = elem * dims[0] * ... * dims[ndim-1] without overflow, and at most `limit`
 * (limit_what says what bounds it, e.g. "the file's size, 1234 bytes"). */
int h5c_bytes(const char *file, const char *name, int ndim, const hsize_t *dims, size_t elem,
              uint64_t limit, const char *limit_what, uint64_t *bytes, char *err, size_t errlen);

/* Closes any HDF5 id (file, group, dataset, dataspace, type, attribute, property list) on the
 * way out of a failed call, quietly: the first error is the one reported. < 0: nothing. */
void h5c_close(hid_t id);

/* The size of an open file in bytes (0 on error). */
uint64_t h5c_file_size(hid_t file);

/* malloc(bytes) (at least 1), or NULL with a message saying what the memory was for. */
void *h5c_alloc(uint64_t bytes, const char *file, const char *what, char *err, size_t errlen);

#endif
