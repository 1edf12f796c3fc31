/* safetensors files (REFERENCE.md "safetensors"): an 8-byte little-endian header length N, N bytes
 * of JSON naming every tensor's dtype, shape and byte range, then the data. A file is untrusted
 * input (a download, a half-written copy), so opening one checks every size, offset and shape
 * before any byte of data is handed out; a file that opens is safe to read in full.
 *
 * A reader maps the file (a 4B model is 8 GB; nothing is copied until a tensor is read). A model
 * directory is `model.safetensors` or `model.safetensors.index.json` with its shards; both look
 * the same to a caller: a sorted list of tensors found by name.
 *
 * The writer writes fp32 tensors as F32 or BF16 (round to nearest even) to one file, the way
 * Hugging Face's writer lays it out, under a temporary name renamed into place at the end.
 *
 * Every function that can fail returns 0, or -1 with a message in err naming the file and the
 * tensor or field at fault. */
#ifndef QWEN3_SAFETENSORS_H
#define QWEN3_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

enum st_dtype {
  ST_F64, ST_F32, ST_F16, ST_BF16, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL,
  ST_F8_E4M3, ST_F8_E5M2, ST_NDTYPES
};
const char *st_dtype_name(enum st_dtype d);  /* "BF16" */
size_t st_dtype_size(enum st_dtype d);       /* bytes per element */

#define ST_MAX_DIMS 8

struct st_tensor {
  const char *name;
  const char *path;           /* the file that holds it, for messages */
  enum st_dtype dtype;
  int ndim;                   /* 0 for a scalar */
  int64_t shape[ST_MAX_DIMS];
  uint64_t numel;
  uint64_t nbytes;            /* numel * st_dtype_size(dtype) */
  const void *data;           /* nbytes little-endian bytes inside the mapped file; no alignment promised */
};

/* ---- one file ---------------------------------------------------------------------------- */
struct st_file;
int st_open(struct st_file **out, const char *path, char *err, size_t errlen);
void st_close(struct st_file *f);                  /* NULL is fine; invalidates its tensors */
size_t st_count(const struct st_file *f);
const struct st_tensor *st_tensor_at(const struct st_file *f, size_t i);  /* sorted by name */
const struct st_tensor *st_find(const struct st_file *f, const char *name); /* NULL if absent */
/* A value of the header's __metadata__ (e.g. "format"); NULL if absent. */
const char *st_metadata(const struct st_file *f, const char *key);

/* Converts a F32, BF16, F16 or F64 tensor to fp32 into dst, which holds n == t->numel floats. */
int st_read_f32(const struct st_tensor *t, float *dst, size_t n, char *err, size_t errlen);

/* ---- a model directory ------------------------------------------------------------------- */
/* Opens dir/model.safetensors if present (as transformers does), else
 * dir/model.safetensors.index.json: every shard it names must exist, open, and hold the tensors
 * the index assigns to it. The model's tensors are the index's (sorted by name). */
struct st_model;
int st_model_open(struct st_model **out, const char *dir, char *err, size_t errlen);
void st_model_close(struct st_model *m);
size_t st_model_count(const struct st_model *m);
const struct st_tensor *st_model_tensor_at(const struct st_model *m, size_t i);
const struct st_tensor *st_model_find(const struct st_model *m, const char *name);

/* ---- writing ----------------------------------------------------------------------------- */
struct st_write_tensor {
  const char *name;
  enum st_dtype dtype;        /* the type stored in the file */
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  const float *data;          /* numel floats, stored as dtype ST_F32 or ST_BF16; or NULL and */
  const void *bytes;          /* numel * st_dtype_size(dtype) bytes stored as they are (any
                                 dtype: U8 packed codes, F8_E4M3 scales, ...) */
};
/* Writes the tensors (any order; stored sorted by name) to path. pt_metadata adds
 * "__metadata__":{"format":"pt"}, which transformers' loader expects of PyTorch weights. */
int st_write(const char *path, const struct st_write_tensor *tensors, size_t n, int pt_metadata,
             char *err, size_t errlen);

/* The scalar conversions, shared with anyone who stores bf16. */
uint16_t st_f32_to_bf16(float x);             /* round to nearest even; NaN stays NaN */
float st_bf16_to_f32(uint16_t b);
float st_f16_to_f32(uint16_t h);

#endif
