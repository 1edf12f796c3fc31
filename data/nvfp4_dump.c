/* NVFP4 dumps of a model's weights; the file layout is in nvfp4_dump.h. */
#define _XOPEN_SOURCE 700   /* realpath */
#include "data/nvfp4_dump.h"

#include <hdf5.h>
#include <limits.h>
#include <regex.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/h5_quiet.h"
#include "data/ckpt_file.h"
#include "data/h5_check.h"
#include "data/safetensors.h"


static const char *block_name(enum nvfp4_block b) { return b == NVFP4_BLOCK_16X16 ? "16x16" : "1x16"; }

/* ---- the input: a safetensors file, a model directory or a checkpoint, seen as one list ---- */
struct input {
  struct st_file *file;
  struct st_model *model;
  struct ckpt *ck;          /* a checkpoint: its fp32 weights, read one tensor at a time */
  struct st_tensor cur;     /* the checkpoint tensor last read, presented as F32 safetensors */
  char name[CKPT_MAX_NAME];
  float *buf;
};

static int is_checkpoint(const char *dir) {
  char probe[4200];
  snprintf(probe, sizeof probe, "%s/model.h5", dir);
  if (access(probe, R_OK) == 0) return 1;
  snprintf(probe, sizeof probe, "%s/latest", dir);
  return access(probe, R_OK) == 0;
}

static int input_open(struct input *in, const char *path, char *err, size_t errlen) {
  struct stat sb;
  memset(in, 0, sizeof *in);
  if (stat(path, &sb) != 0) return errorf(err, errlen, "%s: no such file or directory", path);
  if (S_ISDIR(sb.st_mode) && is_checkpoint(path)) return ckpt_open(&in->ck, path, err, errlen);
  return S_ISDIR(sb.st_mode) ? st_model_open(&in->model, path, err, errlen)
                             : st_open(&in->file, path, err, errlen);
}
static size_t input_count(const struct input *in) {
  if (in->ck) return ckpt_count(in->ck);
  return in->model ? st_model_count(in->model) : st_count(in->file);
}
/* Reads checkpoint tensor `name` into in->cur; NULL with err set on failure. */
static const struct st_tensor *ckpt_tensor(struct input *in, const char *name, char *err,
                                           size_t errlen) {
  int ndim;
  int64_t shape[2];
  if (ckpt_shape(in->ck, name, &ndim, shape, err, errlen) != 0) return NULL;
  size_t n = (size_t)shape[0] * (ndim == 2 ? (size_t)shape[1] : 1);
  in->buf = xrealloc(in->buf, n * sizeof(float));
  if (ckpt_read(in->ck, name, CKPT_WEIGHTS, ndim, shape, in->buf, err, errlen) != 0) return NULL;
  snprintf(in->name, sizeof in->name, "%s", name);
  in->cur = (struct st_tensor){.name = in->name, .path = ckpt_dir(in->ck), .dtype = ST_F32,
                               .ndim = ndim, .shape = {shape[0], ndim == 2 ? shape[1] : 0},
                               .numel = n, .nbytes = n * sizeof(float), .data = in->buf};
  return &in->cur;
}
static const struct st_tensor *input_at(struct input *in, size_t i, char *err, size_t errlen) {
  if (in->ck) return ckpt_tensor(in, ckpt_name_at(in->ck, i), err, errlen);
  return in->model ? st_model_tensor_at(in->model, i) : st_tensor_at(in->file, i);
}
static const struct st_tensor *input_find(struct input *in, const char *name, char *err,
                                          size_t errlen) {
  if (in->ck) {
    for (size_t i = 0; i < ckpt_count(in->ck); i++)
      if (!strcmp(ckpt_name_at(in->ck, i), name)) return ckpt_tensor(in, name, err, errlen);
    return NULL;
  }
  return in->model ? st_model_find(in->model, name) : st_find(in->file, name);
}
static void input_close(struct input *in) {
  st_model_close(in->model);
  st_close(in->file);
  ckpt_close(in->ck);
  free(in->buf);
}

/* Why tensor t is not quantized, or NULL if it is. */
static const char *skip_reason(const struct st_tensor *t, const struct nvfp4_dump_options *o,
                               char *buf, size_t len) {
  static const char *const HIGH_PRECISION[] = {"embed_tokens", "lm_head", "norm"};
  for (int i = 0; i < 3 && !o->all; i++)
    if (strstr(t->name, HIGH_PRECISION[i])) {
      snprintf(buf, len, "%s stays high precision in the recipe (--all includes it)",
               HIGH_PRECISION[i]);
      return buf;
    }
  if (t->ndim != 2) {
    snprintf(buf, len, "%d-D, not a matrix", t->ndim);
    return buf;
  }
  if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16 && t->dtype != ST_F64) {
    snprintf(buf, len, "dtype %s is not a float type", st_dtype_name(t->dtype));
    return buf;
  }
  int64_t rows = t->shape[0], cols = t->shape[1];
  if (cols % 16 || (o->block == NVFP4_BLOCK_16X16 && rows % 16) || rows == 0) {
    snprintf(buf, len, "shape [%lld, %lld] is not a multiple of %s blocks", (long long)rows,
             (long long)cols, block_name(o->block));
    return buf;
  }
  if (rows > INT_MAX || cols > INT_MAX || t->numel > (uint64_t)INT_MAX) {
    snprintf(buf, len, "shape [%lld, %lld] is too large", (long long)rows, (long long)cols);
    return buf;
  }
  if (strchr(t->name, '/')) return "the name holds '/', which HDF5 reads as a path";
  return NULL;
}

/* ---- writing ------------------------------------------------------------------------------- */
/* A [rows, cols] dataset of elem-byte elements, chunked in whole rows of about 1 MiB. */
static int write_2d(hid_t g, const char *name, hid_t file_type, hid_t mem_type, hsize_t rows,
                    hsize_t cols, size_t elem, const void *data) {
  hsize_t dims[2] = {rows, cols}, chunk[2] = {(1u << 20) / (cols * elem), cols};
  if (chunk[0] < 1) chunk[0] = 1;
  if (chunk[0] > rows) chunk[0] = rows;
  hid_t space = H5Screate_simple(2, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(dcpl, 2, chunk);
  H5Pset_fletcher32(dcpl);   /* a damaged dump is caught when read */
  hid_t ds = H5Dcreate2(g, name, file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  herr_t rc = ds < 0 ? -1 : H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(space);
  return rc < 0 ? -1 : 0;
}

static int write_attr(hid_t obj, const char *name, hid_t file_type, hid_t mem_type, hsize_t n,
                      const void *value) {
  hid_t space = n ? H5Screate_simple(1, &n, NULL) : H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
  herr_t rc = a < 0 ? -1 : H5Awrite(a, mem_type, value);
  if (a >= 0) H5Aclose(a);
  H5Sclose(space);
  return rc < 0 ? -1 : 0;
}

static int write_string_attr(hid_t obj, const char *name, const char *value) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, strlen(value) + 1);
  int rc = write_attr(obj, name, t, t, 0, value);
  H5Tclose(t);
  return rc;
}

static int write_float_attr(hid_t obj, const char *name, float v) {
  return write_attr(obj, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 0, &v);
}

/* Quantizes one tensor into its group. */
static int dump_tensor(hid_t file, const char *out, const struct st_tensor *t,
                       const struct nvfp4_dump_options *o, char *err, size_t errlen) {
  int rows = (int)t->shape[0], cols = (int)t->shape[1], rc = 0;
  size_t n = (size_t)t->numel, nscales = (size_t)nvfp4_num_scales(rows, cols, o->block);
  float *x = xmalloc(n * sizeof *x);
  uint8_t *codes = xmalloc(n / 2), *scales = xmalloc(nscales);
  struct nvfp4_tensor_scale ts;
  if (st_read_f32(t, x, n, err, errlen) != 0) {   /* its message names the file and tensor */
    rc = -1;
  } else if (nvfp4_quantize(codes, scales, &ts, x, rows, cols, o->block, NVFP4_ROUND_NEAREST, 0) !=
             NVFP4_OK) {
    /* the shape was checked, so the quantizer refused NaN or Inf */
    rc = errorf(err, errlen, "%s: tensor '%s' holds NaN or Inf, which NVFP4 cannot represent",
              t->path, t->name);
  } else {
    hid_t g = H5Gcreate2(file, t->name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int64_t shape[2] = {rows, cols};
    if (o->dequantized) nvfp4_dequantize(x, codes, scales, ts.dec, rows, cols, o->block);
    if (g < 0 ||
        write_2d(g, "codes", H5T_STD_U8LE, H5T_NATIVE_UINT8, rows, cols / 2, 1, codes) ||
        write_2d(g, "scales", H5T_STD_U8LE, H5T_NATIVE_UINT8,
                 o->block == NVFP4_BLOCK_16X16 ? rows / 16 : rows, cols / 16, 1, scales) ||
        (o->dequantized &&
         write_2d(g, "dequantized", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, rows, cols, 4, x)) ||
        write_float_attr(g, "tensor_scale_dec", ts.dec) ||
        write_float_attr(g, "tensor_scale_enc", ts.enc) || write_float_attr(g, "amax", ts.amax) ||
        write_string_attr(g, "block", block_name(o->block)) ||
        write_attr(g, "shape", H5T_STD_I64LE, H5T_NATIVE_INT64, 2, shape) ||
        write_string_attr(g, "dtype", st_dtype_name(t->dtype)))
      rc = errorf(err, errlen, "%s: writing tensor '%s' failed (disk full?)", out, t->name);
    if (g >= 0) H5Gclose(g);
  }
  free(x);
  free(codes);
  free(scales);
  return rc;
}

int nvfp4_dump_quantize(const char *input, const char *out, const struct nvfp4_dump_options *o,
                        struct nvfp4_dump_summary *summary, char *err, size_t errlen) {
  struct nvfp4_dump_summary sum = {0, 0};
  regex_t re;
  if (o->match && regcomp(&re, o->match, REG_EXTENDED | REG_NOSUB) != 0)
    return errorf(err, errlen, "--match '%s' is not a valid regular expression", o->match);
  struct input in;
  int rc = input_open(&in, input, err, errlen);
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp%d", out, (int)getpid());
  hid_t file = -1;
  struct quiet q;
  quiet_on(&q);
  char source[PATH_MAX];   /* absolute, so that `show` finds it from anywhere */
  if (rc == 0 && !realpath(input, source)) snprintf(source, sizeof source, "%s", input);
  if (rc == 0) {
    file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    int32_t version = NVFP4_DUMP_VERSION;
    if (file < 0) rc = errorf(err, errlen, "%s: cannot create the dump file", tmp);
    else if (write_attr(file, "format_version", H5T_STD_I32LE, H5T_NATIVE_INT32, 0, &version) ||
             write_string_attr(file, "source", source))
      rc = errorf(err, errlen, "%s: writing the root attributes failed", tmp);
  }
  size_t count = rc == 0 ? input_count(&in) : 0;
  double t0 = now_seconds();
  for (size_t i = 0; i < count && rc == 0; i++) {
    const struct st_tensor *t = input_at(&in, i, err, errlen);
    if (!t) {
      rc = -1;
      break;
    }
    char buf[160];
    if (o->match && regexec(&re, t->name, 0, NULL, 0) != 0) continue;
    const char *why = skip_reason(t, o, buf, sizeof buf);
    if (why) {
      sum.skipped++;
      if (o->log) fprintf(o->log, "skip %s: %s\n", t->name, why);
      continue;
    }
    if ((rc = dump_tensor(file, out, t, o, err, errlen)) != 0) break;
    sum.quantized++;
    if (o->log)
      fprintf(o->log, "[%zu/%zu] %s [%lld, %lld] %.1fs\n", i + 1, count, t->name,
              (long long)t->shape[0], (long long)t->shape[1], now_seconds() - t0);
  }
  if (file >= 0 && H5Fclose(file) < 0 && rc == 0)
    rc = errorf(err, errlen, "%s: closing the dump failed (disk full?)", tmp);
  quiet_off(&q);
  if (rc == 0 && rename(tmp, out) != 0)
    rc = errorf(err, errlen, "%s: cannot rename the finished dump into place", out);
  if (rc != 0 && file >= 0) unlink(tmp);
  input_close(&in);
  if (o->match) regfree(&re);
  if (summary) *summary = sum;
  return rc;
}

/* ---- reading ------------------------------------------------------------------------------- */
/* A dump is untrusted input like any HDF5 file (data/h5_check.h): every attribute and dataset
 * is checked for type, size and dataspace before it is read. */

/* The `shape` attribute: exactly two 8-byte integers. */
static int read_shape(hid_t g, const char *path, const char *name, int64_t shape[2], char *err,
                      size_t errlen) {
  if (H5Aexists(g, "shape") <= 0)
    return errorf(err, errlen, "%s: tensor '%s' has no shape attribute", path, name);
  hid_t a = H5Aopen(g, "shape", H5P_DEFAULT);
  if (a < 0) return errorf(err, errlen, "%s: tensor '%s': cannot open its shape", path, name);
  hid_t type = H5Aget_type(a), space = H5Aget_space(a);
  hsize_t dims[H5S_MAX_RANK];
  int ok = type >= 0 && space >= 0 && H5Tget_class(type) == H5T_INTEGER &&
           H5Tget_size(type) == 8 && H5Sis_simple(space) > 0 &&
           H5Sget_simple_extent_ndims(space) == 1 &&
           H5Sget_simple_extent_dims(space, dims, NULL) == 1 && dims[0] == 2 &&
           H5Aread(a, H5T_NATIVE_INT64, shape) >= 0;
  if (type >= 0) H5Tclose(type);
  if (space >= 0) H5Sclose(space);
  H5Aclose(a);
  return ok ? 0 : errorf(err, errlen, "%s: tensor '%s': its shape attribute must be two 8-byte "
                         "integers", path, name);
}

/* Dataset name of g, of exactly (cls, elem) and [rows, cols], into a new buffer. */
static void *read_2d(hid_t g, const char *path, const char *name, enum h5c_class cls,
                     hid_t mem_type, size_t elem, hsize_t rows, hsize_t cols, uint64_t limit,
                     char *err, size_t errlen) {
  int rank;
  hsize_t dims[2];
  uint64_t bytes;
  hid_t ds = h5c_open_dataset(g, path, name, "NVFP4 dump dataset", cls, elem, 2, 2, 0, &rank,
                              dims, err, errlen);
  if (ds < 0) return NULL;
  void *buf = NULL;
  if (dims[0] != rows || dims[1] != cols)
    errorf(err, errlen, "%s: dataset '%s' is [%llu, %llu], the tensor's shape needs [%llu, %llu]",
           path, name, (unsigned long long)dims[0], (unsigned long long)dims[1],
           (unsigned long long)rows, (unsigned long long)cols);
  else if (h5c_bytes(path, name, 2, dims, elem, limit, "the file's size", &bytes, err, errlen) == 0 &&
           (buf = h5c_alloc(bytes, path, name, err, errlen)) &&
           H5Dread(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
    errorf(err, errlen, "%s: dataset '%s' cannot be read (its checksum fails?)", path, name);
    free(buf);
    buf = NULL;
  }
  H5Dclose(ds);
  return buf;
}

static int read_float_attr(hid_t g, const char *path, const char *name, float *out, char *err,
                           size_t errlen) {
  double v;
  if (h5c_attr_f64(g, path, name, &v, err, errlen) != 0) return -1;
  *out = (float)v;   /* written as float: exact */
  return 0;
}

int nvfp4_dump_read(const char *path, const char *name, struct nvfp4_dump_tensor *t, char *err,
                    size_t errlen) {
  memset(t, 0, sizeof *t);
  struct quiet q;
  quiet_on(&q);
  int rc = 0;
  hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT), g = -1;
  int64_t shape[2];
  char block[8] = "";
  int is16 = 0;
  uint64_t limit = file >= 0 ? h5c_file_size(file) : 0;
  if (file < 0) {
    rc = errorf(err, errlen, "%s: not an HDF5 file", path);
  } else if (h5c_exists(file, path, name, err, errlen) != 1 ||
             (g = H5Gopen2(file, name, H5P_DEFAULT)) < 0) {
    rc = errorf(err, errlen, "%s: no tensor '%s' in this dump", path, name);
  } else if (read_shape(g, path, name, shape, err, errlen) ||
             h5c_attr_str(g, path, "block", block, sizeof block, err, errlen) ||
             read_float_attr(g, path, "amax", &t->scale.amax, err, errlen) ||
             read_float_attr(g, path, "tensor_scale_enc", &t->scale.enc, err, errlen) ||
             read_float_attr(g, path, "tensor_scale_dec", &t->scale.dec, err, errlen) ||
             h5c_attr_str(g, path, "dtype", t->dtype, sizeof t->dtype, err, errlen)) {
    rc = -1;
  } else if ((!(is16 = !strcmp(block, "16x16")) && strcmp(block, "1x16") != 0) || shape[0] <= 0 ||
             shape[1] <= 0 || shape[1] % 16 || (is16 && shape[0] % 16) ||
             shape[0] > INT_MAX || shape[1] > INT_MAX || shape[0] * shape[1] > INT_MAX) {
    rc = errorf(err, errlen, "%s: tensor '%s' has a bad shape or block attribute", path, name);
  } else {
    t->rows = (int)shape[0];
    t->cols = (int)shape[1];
    t->block = is16 ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16;
    int scale_rows = t->block == NVFP4_BLOCK_16X16 ? t->rows / 16 : t->rows;
    int has_deq = h5c_exists(g, path, "dequantized", err, errlen);
    if (!(t->codes = read_2d(g, path, "codes", H5C_UINT, H5T_NATIVE_UINT8, 1, t->rows,
                             t->cols / 2, limit, err, errlen)) ||
        !(t->scales = read_2d(g, path, "scales", H5C_UINT, H5T_NATIVE_UINT8, 1, scale_rows,
                              t->cols / 16, limit, err, errlen)) ||
        has_deq < 0 ||
        (has_deq && !(t->dequantized = read_2d(g, path, "dequantized", H5C_FLOAT,
                                               H5T_NATIVE_FLOAT, 4, t->rows, t->cols, limit,
                                               err, errlen))))
      rc = -1;
  }
  if (g >= 0) H5Gclose(g);
  if (file >= 0) H5Fclose(file);
  quiet_off(&q);
  if (rc != 0) nvfp4_dump_tensor_free(t);
  return rc;
}

void nvfp4_dump_tensor_free(struct nvfp4_dump_tensor *t) {
  free(t->codes);
  free(t->scales);
  free(t->dequantized);
  t->codes = t->scales = NULL;
  t->dequantized = NULL;
}

int nvfp4_dump_original(const char *path, const char *name, float *dst, size_t n, char *err,
                        size_t errlen) {
  char source[4096] = "";
  struct quiet q;
  quiet_on(&q);
  hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  int rc_source = file < 0 ? -1 : h5c_attr_str(file, path, "source", source, sizeof source, err, errlen);
  if (file >= 0) H5Fclose(file);
  quiet_off(&q);
  if (file < 0) return errorf(err, errlen, "%s: not an HDF5 file", path);
  if (rc_source != 0) return -1;
  if (!source[0]) return errorf(err, errlen, "%s: an empty source attribute", path);
  struct input in;
  if (input_open(&in, source, err, errlen) != 0) return -1;
  err[0] = 0;
  const struct st_tensor *t = input_find(&in, name, err, errlen);
  int rc = t    ? st_read_f32(t, dst, n, err, errlen)
           : err[0] ? -1
                    : errorf(err, errlen, "%s: no tensor '%s' (the source of %s)", source, name, path);
  input_close(&in);
  return rc;
}
