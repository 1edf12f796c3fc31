#define _GNU_SOURCE   /* sync_file_range */
#include "data/ckpt_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/h5_check.h"
#include "data/h5_quiet.h"
#include "data/sha256.h"

/* A chunk is the unit of Fletcher32 checking and of I/O: big enough that a 1.5 GB embedding is
 * a few hundred chunks, small enough that a damaged one is found near where it is. */
#define CHUNK_BYTES (4u << 20)

/* While a stage file is written, the kernel is told to start writing its dirty pages to disk
 * every this many bytes: the disk then works while the next chunks are summed and copied, and
 * the fsync at the end finds little left, instead of all of it (a host with much memory would
 * otherwise keep gigabytes dirty until the fsync). */
#define WRITEBACK_BYTES (64u << 20)

/* Tensors are written as raw chunks (H5Dwrite_chunk) in the file's byte order, with no type
 * conversion. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoint tensors are written as little-endian floats without conversion"
#endif

static const char *const PART_SUFFIX[] = {"", ".adam_m", ".adam_v"};

/* ---- errors -------------------------------------------------------------------------------- */

/* HDF5 keeps a stack of what went wrong, outermost last; the innermost entry says why
 * ("data error detected by Fletcher32 checksum", "truncated file: eof = ..."). */
static herr_t innermost(unsigned n, const H5E_error2_t *e, void *reason) {
  if (n == 0 && e->desc) {
    snprintf(reason, 256, "%s", e->desc);
    for (char *c = reason; (c = strchr(c, '\n'));) *c = ' ';   /* one line ("time = ...\n") */
  }
  return 0;
}

static void h5_fail(char *err, size_t errlen, const char *fmt, ...) PRINTF_LIKE(3, 4);
static void h5_fail(char *err, size_t errlen, const char *fmt, ...) {
  char reason[256] = "";
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost, reason);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  if (reason[0] && n >= 0 && (size_t)n < errlen)
    snprintf(err + n, errlen - (size_t)n, " (HDF5: %s)", reason);
}

/* Every HDF5 call goes through H5_CHECK: a negative result fills err (with HDF5's reason) and
 * jumps to the function's `out`, where whatever was opened is closed. */
#define H5_CHECK(call, ...)                  \
  do {                                       \
    if ((call) < 0) {                        \
      h5_fail(err, errlen, __VA_ARGS__);     \
      goto out;                              \
    }                                        \
  } while (0)

/* ---- names and directories ----------------------------------------------------------------- */

void ckpt_step_path(char *out, size_t len, const char *root, int64_t step, int tmp) {
  snprintf(out, len, "%s/step_%08lld%s", root, (long long)step, tmp ? ".tmp" : "");
}

void ckpt_stage_file(char *out, size_t len, int stage, int n_stages) {
  snprintf(out, len, "stage_%03d_of_%03d.h5", stage, n_stages);
}

static int exists(const char *path) {
  struct stat st;
  return lstat(path, &st) == 0;
}

/* The data of a file (or the entries of a directory) reach the disk before a rename that
 * publishes them. */
static int sync_path(const char *path, char *err, size_t errlen) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return errorf(err, errlen, "%s: cannot open to sync: %s", path, strerror(errno));
  int rc = fsync(fd);
  int e = errno;
  close(fd);
  if (rc != 0) return errorf(err, errlen, "%s: fsync failed: %s", path, strerror(e));
  return 0;
}

/* A step directory holds files only. */
static int remove_dir(const char *path, char *err, size_t errlen) {
  DIR *d = opendir(path);
  if (!d) return errorf(err, errlen, "%s: cannot open to remove: %s", path, strerror(errno));
  struct dirent *e;
  char file[4096];
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    snprintf(file, sizeof file, "%s/%s", path, e->d_name);
    if (unlink(file) != 0) {
      int saved = errno;
      closedir(d);
      return errorf(err, errlen, "%s: cannot remove: %s", file, strerror(saved));
    }
  }
  closedir(d);
  if (rmdir(path) != 0) return errorf(err, errlen, "%s: cannot remove: %s", path, strerror(errno));
  return 0;
}

int ckpt_begin(const char *root, int64_t step, char *err, size_t errlen) {
  char tmp[4096];
  if (make_dirs(root) != 0)
    return errorf(err, errlen, "%s: cannot create the checkpoint directory: %s", root, strerror(errno));
  ckpt_step_path(tmp, sizeof tmp, root, step, 1);
  if (exists(tmp) && remove_dir(tmp, err, errlen) != 0) return -1;
  if (mkdir(tmp, 0755) != 0) return errorf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
  return 0;
}

/* ---- datasets and attributes --------------------------------------------------------------- */

/* Rows per chunk of a dataset of `rows` rows of row_bytes: about CHUNK_BYTES a chunk, the rows
 * shared evenly among the chunks, since the last chunk is stored whole (padded with the fill
 * value) however few of its rows the dataset has. */
static hsize_t chunk_rows(hsize_t rows, hsize_t row_bytes) {
  hsize_t fit = CHUNK_BYTES / row_bytes;
  if (fit < 1) fit = 1;
  hsize_t chunks = (rows + fit - 1) / fit;
  return (rows + chunks - 1) / chunks;
}

/* A chunked, Fletcher32-checked dataset of `ndim` dims with fill value 0, chunk0 rows a chunk. */
static hid_t create_dataset(hid_t loc, const char *file, const char *name, hid_t file_type,
                            int ndim, const hsize_t *dims, hsize_t chunk0, char *err,
                            size_t errlen) {
  hid_t space = -1, dcpl = -1, ds = -1;
  const double zero = 0;
  hsize_t chunk[2] = {chunk0, ndim > 1 ? dims[1] : 1};
  H5_CHECK(space = H5Screate_simple(ndim, dims, NULL), "%s: tensor '%s': bad shape", file, name);
  H5_CHECK(dcpl = H5Pcreate(H5P_DATASET_CREATE), "%s: tensor '%s'", file, name);
  H5_CHECK(H5Pset_chunk(dcpl, ndim, chunk), "%s: tensor '%s': cannot chunk", file, name);
  H5_CHECK(H5Pset_fletcher32(dcpl), "%s: tensor '%s': no Fletcher32 filter", file, name);
  H5_CHECK(H5Pset_fill_value(dcpl, H5T_NATIVE_DOUBLE, &zero), "%s: tensor '%s'", file, name);
  H5_CHECK(ds = H5Dcreate2(loc, name, file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT),
           "%s: cannot create dataset '%s'", file, name);
out:
  h5c_close(dcpl);
  h5c_close(space);
  return ds;
}

/* A dataset holding `data` (memory type mem_type), written through HDF5's filter pipeline (the
 * small job.pb; tensors take write_tensor's faster way). */
static int write_dataset(hid_t loc, const char *file, const char *name, hid_t file_type,
                         hid_t mem_type, int ndim, const hsize_t *dims, const void *data,
                         char *err, size_t errlen) {
  int rc = -1;
  hsize_t row_elems = ndim > 1 ? dims[1] : 1;
  hid_t ds = create_dataset(loc, file, name, file_type, ndim, dims,
                            chunk_rows(dims[0], H5Tget_size(file_type) * row_elems), err, errlen);
  if (ds < 0) return -1;
  H5_CHECK(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
           "%s: cannot write '%s'", file, name);
  rc = 0;
out:
  h5c_close(ds);
  return rc;
}

static int put_attr(hid_t loc, const char *file, const char *name, hid_t file_type,
                    hid_t mem_type, const void *value, char *err, size_t errlen) {
  int rc = -1;
  hid_t space = -1, attr = -1;
  H5_CHECK(space = H5Screate(H5S_SCALAR), "%s: attribute '%s'", file, name);
  H5_CHECK(attr = H5Acreate2(loc, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT),
           "%s: cannot create attribute '%s'", file, name);
  H5_CHECK(H5Awrite(attr, mem_type, value), "%s: cannot write attribute '%s'", file, name);
  rc = 0;
out:
  h5c_close(attr);
  h5c_close(space);
  return rc;
}

static int put_i64(hid_t loc, const char *file, const char *name, int64_t v, char *err,
                   size_t errlen) {
  return put_attr(loc, file, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, err, errlen);
}

static int put_f64(hid_t loc, const char *file, const char *name, double v, char *err,
                   size_t errlen) {
  return put_attr(loc, file, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, err, errlen);
}

/* ---- stage files --------------------------------------------------------------------------- */

/* HDF5's Fletcher32 checksum (H5_checksum_fletcher32, what its filter appends to a chunk) of n
 * bytes, n even. Over the big-endian 16-bit words w[0..m): sum1 = sum of w[k] and
 * sum2 = sum of (m - k) w[k], each modulo 65535 and stored as 1..65535, or 0 when every word is
 * 0 (HDF5 folds its sums with (s & 0xffff) + (s >> 16), which keeps the value modulo 65535 and
 * never turns a non-zero sum into 0); the result is sum2 << 16 | sum1. HDF5 adds one word at a
 * time; here 16 lanes add blocks of 16 words (the compiler vectorizes the lane loop), in groups
 * of at most 255 blocks, after which a lane's second sum could overflow 32 bits. */
static uint32_t fletcher32(const uint8_t *p, size_t n) {
  uint64_t sum1 = 0, sum2 = 0;
  int nonzero = 0;
  size_t words = n / 2, blocks = words / 16;
  while (blocks > 0) {
    size_t g = blocks < 255 ? blocks : 255;
    blocks -= g;
    /* s1: each lane's words; s2: each lane's s1 summed before every block of the group */
    uint32_t s1[16] = {0}, s2[16] = {0};
    for (size_t b = 0; b < g; b++, p += 32)
      for (int j = 0; j < 16; j++) {
        s2[j] += s1[j];
        s1[j] += (uint32_t)p[2 * j] << 8 | p[2 * j + 1];
      }
    /* the group as one run of 16 g words: its own sum1, and its sum2 (weights 16 g down to 1) */
    uint64_t g1 = 0, g2 = 0;
    for (int j = 0; j < 16; j++) {
      g1 += s1[j];
      g2 += 16 * (uint64_t)s2[j] + (uint64_t)(16 - j) * s1[j];
    }
    sum2 = (sum2 + 16 * g * sum1 + g2) % 65535;   /* the words before weigh 16 g more */
    sum1 = (sum1 + g1) % 65535;
    nonzero |= g1 != 0;
  }
  for (size_t k = 0; k < words % 16; k++, p += 2) {
    uint32_t w = (uint32_t)p[0] << 8 | p[1];
    sum1 = (sum1 + w) % 65535;
    sum2 = (sum2 + sum1) % 65535;
    nonzero |= w != 0;
  }
  if (!nonzero) return 0;
  return (uint32_t)(sum2 ? sum2 : 65535) << 16 | (uint32_t)(sum1 ? sum1 : 65535);
}

struct ckpt_stage_writer {
  hid_t file;
  int fd;                /* the same file, for writeback and the fsync */
  char path[4096];
  uint8_t *chunk;        /* one chunk on its way to the file, checksum included */
  size_t chunk_cap;
  size_t unsubmitted;    /* bytes written since writeback was last started */
};

/* Writes `rows` rows of row_floats from data as whole chunks straight into the file
 * (H5Dwrite_chunk), each with its Fletcher32 checksum appended as the filter would: HDF5's own
 * write path copies every chunk twice and sums it a byte at a time. A chunk is copied once, into
 * w->chunk, where the last one is padded with the fill value and the checksum is appended; it
 * is then summed and handed to write() from the cache. */
static int write_chunks(struct ckpt_stage_writer *w, hid_t ds, const char *name, hsize_t rows,
                        hsize_t row_floats, hsize_t chunk0, const float *data, char *err,
                        size_t errlen) {
  size_t row_bytes = (size_t)row_floats * sizeof(float), bytes = (size_t)chunk0 * row_bytes;
  if (bytes + 4 > w->chunk_cap) {
    free(w->chunk);
    w->chunk_cap = bytes + 4 > CHUNK_BYTES + 4 ? bytes + 4 : CHUNK_BYTES + 4;
    if (!(w->chunk = malloc(w->chunk_cap))) {
      w->chunk_cap = 0;
      return errorf(err, errlen, "%s: tensor '%s': out of memory for a chunk of %zu bytes",
                    w->path, name, bytes);
    }
  }
  for (hsize_t r = 0; r < rows; r += chunk0) {
    hsize_t n = rows - r < chunk0 ? rows - r : chunk0;
    size_t have = (size_t)n * row_bytes;
    memcpy(w->chunk, (const uint8_t *)data + (size_t)r * row_bytes, have);
    memset(w->chunk + have, 0, bytes - have);
    uint32_t sum = fletcher32(w->chunk, bytes);
    for (int i = 0; i < 4; i++) w->chunk[bytes + i] = (uint8_t)(sum >> (8 * i));   /* LE */
    hsize_t offset[2] = {r, 0};
    H5_CHECK(H5Dwrite_chunk(ds, H5P_DEFAULT, 0, offset, bytes + 4, w->chunk),
             "%s: cannot write tensor '%s' (rows %llu-%llu)", w->path, name,
             (unsigned long long)r, (unsigned long long)(r + n - 1));
    w->unsubmitted += bytes + 4;
    if (w->unsubmitted >= WRITEBACK_BYTES) {
      /* only a hint: where it fails (a file system without it), the fsync does it all, and an
       * error of the writes it starts is the fsync's to report */
      (void)sync_file_range(w->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
      w->unsubmitted = 0;
    }
  }
  return 0;
out:
  return -1;
}

/* A tensor's dataset; data NULL: all zeros, stored as nothing (a chunk never written reads as
 * the fill value), so the zero moments of a converted model cost no disk. */
static int write_tensor(struct ckpt_stage_writer *w, const char *name, int ndim,
                        const hsize_t *dims, const float *data, char *err, size_t errlen) {
  hsize_t row_floats = ndim > 1 ? dims[1] : 1;
  hsize_t chunk0 = chunk_rows(dims[0], row_floats * sizeof(float));
  hid_t ds = create_dataset(w->file, w->path, name, H5T_IEEE_F32LE, ndim, dims, chunk0, err,
                            errlen);
  if (ds < 0) return -1;
  int rc = data ? write_chunks(w, ds, name, dims[0], row_floats, chunk0, data, err, errlen) : 0;
  if (H5Dclose(ds) < 0 && rc == 0) {
    h5_fail(err, errlen, "%s: cannot write tensor '%s'", w->path, name);
    rc = -1;
  }
  return rc;
}

int ckpt_stage_create(struct ckpt_stage_writer **out, const char *path, int stage, int n_stages,
                      char *err, size_t errlen) {
  *out = NULL;
  struct ckpt_stage_writer *w = calloc(1, sizeof *w);   /* no xcalloc: may run on a writer thread */
  if (!w) return errorf(err, errlen, "%s: out of memory", path);
  w->fd = -1;
  snprintf(w->path, sizeof w->path, "%s", path);
  struct quiet q;
  quiet_on(&q);
  int rc = -1;
  H5_CHECK(w->file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
           "%s: cannot create", path);
  if ((w->fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
    errorf(err, errlen, "%s: cannot open to sync: %s", path, strerror(errno));
    goto out;
  }
  if (put_i64(w->file, path, "format_version", CKPT_FORMAT_VERSION, err, errlen) != 0 ||
      put_i64(w->file, path, "stage", stage, err, errlen) != 0 ||
      put_i64(w->file, path, "n_stages", n_stages, err, errlen) != 0)
    goto out;
  rc = 0;
out:
  quiet_off(&q);
  if (rc != 0) {
    char ignored[64];
    ckpt_stage_finish(w, ignored, sizeof ignored);
  } else {
    *out = w;
  }
  return rc;
}

int ckpt_stage_put(struct ckpt_stage_writer *w, const char *name, int ndim, const int64_t *shape,
                   const float *weights, const float *adam_m, const float *adam_v, char *err,
                   size_t errlen) {
  if (ndim < 1 || ndim > 2 || shape[0] < 1 || (ndim == 2 && shape[1] < 1))
    return errorf(err, errlen, "%s: tensor '%s': only non-empty vectors and matrices are stored",
                w->path, name);
  if (strchr(name, '/') || !name[0] || strlen(name) > CKPT_MAX_NAME)
    return errorf(err, errlen, "%s: tensor name '%s' is empty, longer than %d or holds '/'",
                w->path, name, CKPT_MAX_NAME);
  hsize_t dims[2] = {(hsize_t)shape[0], ndim > 1 ? (hsize_t)shape[1] : 1};
  const float *parts[3] = {weights, adam_m, adam_v};
  struct quiet q;
  quiet_on(&q);
  int rc = 0;
  char full[256];
  for (int p = 0; p < 3 && rc == 0; p++) {
    snprintf(full, sizeof full, "%s%s", name, PART_SUFFIX[p]);
    rc = write_tensor(w, full, ndim, dims, parts[p], err, errlen);
  }
  quiet_off(&q);
  return rc;
}

int ckpt_stage_finish(struct ckpt_stage_writer *w, char *err, size_t errlen) {
  struct quiet q;
  quiet_on(&q);
  int rc = 0;
  if (w->file >= 0 && H5Fclose(w->file) < 0) {
    h5_fail(err, errlen, "%s: cannot finish writing", w->path);
    rc = -1;
  }
  quiet_off(&q);
  if (w->fd >= 0) {
    if (rc == 0 && fsync(w->fd) != 0)
      rc = errorf(err, errlen, "%s: fsync failed: %s", w->path, strerror(errno));
    close(w->fd);   /* read-only: the fsync above is what could fail */
  }
  free(w->chunk);
  free(w);
  return rc;
}

int ckpt_thread_safe(void) {
  hbool_t yes = 0;
  return H5is_library_threadsafe(&yes) >= 0 && yes;
}

/* ---- the run-state checksum ---------------------------------------------------------------- */

/* The tensors are covered by Fletcher32; the run state of model.h5 (its attributes, the config,
 * job.pb and the link index) by state_sha256: the SHA-256 of this canonical encoding, written at
 * commit and checked at load. */
struct state_link {
  const char *name, *file, *obj;
};

struct bytes {
  uint8_t *p;
  size_t n, cap;
};

static void put_bytes(struct bytes *b, const void *data, size_t n) {
  if (b->n + n > b->cap) {
    while (b->n + n > b->cap) b->cap = b->cap ? 2 * b->cap : 4096;
    b->p = xrealloc(b->p, b->cap);
  }
  if (n) memcpy(b->p + b->n, data, n);
  b->n += n;
}

static void put_u64(struct bytes *b, uint64_t v) {
  uint8_t le[8];
  for (int i = 0; i < 8; i++) le[i] = (uint8_t)(v >> (8 * i));
  put_bytes(b, le, 8);
}

static void put_str(struct bytes *b, const char *s) {
  put_u64(b, strlen(s));
  put_bytes(b, s, strlen(s));
}

static int by_state_link(const void *a, const void *b) {
  return strcmp(((const struct state_link *)a)->name, ((const struct state_link *)b)->name);
}

/* links sorted by name */
static void state_hash(const struct ckpt_state *s, int64_t version, const struct state_link *links,
                       size_t n_links, char hex[65]) {
  struct bytes b = {0};
  const struct qwen3_config *c = &s->config;
  put_str(&b, "qwen3-train checkpoint run state");
  put_u64(&b, (uint64_t)version);
  put_u64(&b, (uint64_t)s->step);
  put_u64(&b, s->samples_seen);
  put_u64(&b, s->tokens_seen);
  put_u64(&b, (uint64_t)s->n_stages);
  const int64_t ints[] = {c->hidden_size,       c->num_layers,  c->num_heads,
                          c->num_kv_heads,      c->head_dim,    c->intermediate_size,
                          c->vocab_size,        c->tie_embeddings, c->max_seq_len};
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) put_u64(&b, (uint64_t)ints[i]);
  uint64_t bits;
  memcpy(&bits, &c->rope_theta, 8);
  put_u64(&b, bits);
  memcpy(&bits, &c->rms_norm_eps, 8);
  put_u64(&b, bits);
  put_u64(&b, s->job_len);
  put_bytes(&b, s->job, s->job_len);
  put_u64(&b, n_links);
  for (size_t i = 0; i < n_links; i++) {
    put_str(&b, links[i].name);
    put_str(&b, links[i].file);
    put_str(&b, links[i].obj);
  }
  sha256_hex(b.p, b.n, hex);
  free(b.p);
}

/* ---- committing: model.h5, rename, latest, pruning ----------------------------------------- */

struct linker {
  hid_t model;
  const char *model_path, *stage_file;
  char *err;
  size_t errlen;
  struct state_link *links;   /* what was linked, for the run-state checksum */
  size_t n_links, cap_links;
};

/* Links one dataset of a stage file into model.h5 under its own name. */
static herr_t link_one(hid_t group, const char *name, const H5L_info_t *info, void *data) {
  struct linker *k = data;
  char *err = k->err;
  size_t errlen = k->errlen;
  htri_t there;
  H5_CHECK(there = H5Lexists(k->model, name, H5P_DEFAULT), "%s: '%s'", k->model_path, name);
  if (there) {
    errorf(err, errlen, "%s: tensor '%s' is in two stage files (the second: %s)", k->model_path,
         name, k->stage_file);
    return -1;
  }
  H5_CHECK(H5Lcreate_external(k->stage_file, name, k->model, name, H5P_DEFAULT, H5P_DEFAULT),
           "%s: cannot link '%s' to %s", k->model_path, name, k->stage_file);
  if (k->n_links == k->cap_links)
    k->links = xrealloc(k->links, (k->cap_links = k->cap_links ? 2 * k->cap_links : 64) *
                                      sizeof *k->links);
  k->links[k->n_links++] = (struct state_link){xstrdup(name), xstrdup(k->stage_file), xstrdup(name)};
  return 0;
out:
  return -1;
}

static int write_config(hid_t model, const char *path, const struct qwen3_config *c, char *err,
                        size_t errlen) {
  int rc = -1;
  hid_t g = -1;
  H5_CHECK(g = H5Gcreate2(model, "config", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
           "%s: cannot create group 'config'", path);
  const struct {
    const char *key;
    int64_t v;
  } ints[] = {{"hidden_size", c->hidden_size},
              {"num_hidden_layers", c->num_layers},
              {"num_attention_heads", c->num_heads},
              {"num_key_value_heads", c->num_kv_heads},
              {"head_dim", c->head_dim},
              {"intermediate_size", c->intermediate_size},
              {"vocab_size", c->vocab_size},
              {"tie_word_embeddings", c->tie_embeddings},
              {"max_position_embeddings", c->max_seq_len}};
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
    if (put_i64(g, path, ints[i].key, ints[i].v, err, errlen) != 0) goto out;
  if (put_f64(g, path, "rope_theta", c->rope_theta, err, errlen) != 0 ||
      put_f64(g, path, "rms_norm_eps", c->rms_norm_eps, err, errlen) != 0)
    goto out;
  rc = 0;
out:
  h5c_close(g);
  return rc;
}

static int write_model_file(const char *dir, const struct ckpt_state *s, char *err,
                            size_t errlen) {
  char path[4300], stage_path[4400], stage_file[64];
  snprintf(path, sizeof path, "%s/model.h5", dir);
  int rc = -1;
  hid_t model = -1, stage = -1, str = -1;
  char hex[65];
  struct linker k = {-1, path, NULL, err, errlen, NULL, 0, 0};
  H5_CHECK(model = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), "%s: cannot create",
           path);
  k.model = model;
  for (int i = 0; i < s->n_stages; i++) {
    ckpt_stage_file(stage_file, sizeof stage_file, i, s->n_stages);
    snprintf(stage_path, sizeof stage_path, "%s/%s", dir, stage_file);
    if (!exists(stage_path)) {
      errorf(err, errlen, "%s: missing: stage %d did not write its tensors", stage_path, i);
      goto out;
    }
    H5_CHECK(stage = H5Fopen(stage_path, H5F_ACC_RDONLY, H5P_DEFAULT), "%s: cannot open",
             stage_path);
    k.stage_file = stage_file;
    if (H5Literate(stage, H5_INDEX_NAME, H5_ITER_INC, NULL, link_one, &k) < 0) {
      if (!err[0]) h5_fail(err, errlen, "%s: cannot list its tensors", stage_path);
      goto out;
    }
    H5_CHECK(H5Fclose(stage), "%s: cannot close", stage_path);
    stage = -1;
  }
  qsort(k.links, k.n_links, sizeof *k.links, by_state_link);
  state_hash(s, CKPT_FORMAT_VERSION, k.links, k.n_links, hex);
  H5_CHECK(str = H5Tcopy(H5T_C_S1), "%s: state_sha256", path);
  H5_CHECK(H5Tset_size(str, sizeof hex), "%s: state_sha256", path);
  if (put_attr(model, path, "state_sha256", str, str, hex, err, errlen) != 0) goto out;
  if (put_i64(model, path, "format_version", CKPT_FORMAT_VERSION, err, errlen) != 0 ||
      put_i64(model, path, "step", s->step, err, errlen) != 0 ||
      put_attr(model, path, "samples_seen", H5T_STD_U64LE, H5T_NATIVE_UINT64, &s->samples_seen,
               err, errlen) != 0 ||
      put_attr(model, path, "tokens_seen", H5T_STD_U64LE, H5T_NATIVE_UINT64, &s->tokens_seen,
               err, errlen) != 0 ||
      put_i64(model, path, "n_stages", s->n_stages, err, errlen) != 0 ||
      write_config(model, path, &s->config, err, errlen) != 0)
    goto out;
  if (s->job_len > 0) {
    hsize_t n = s->job_len;
    if (write_dataset(model, path, "job.pb", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, &n, s->job, err,
                      errlen) != 0)
      goto out;
  }
  hid_t m = model;
  model = -1;
  H5_CHECK(H5Fclose(m), "%s: cannot finish writing", path);
  rc = sync_path(path, err, errlen);
out:
  for (size_t i = 0; i < k.n_links; i++) {
    free((char *)k.links[i].name);
    free((char *)k.links[i].file);
    free((char *)k.links[i].obj);
  }
  free(k.links);
  h5c_close(str);
  h5c_close(stage);
  h5c_close(model);
  return rc;
}

static int is_digits(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] < '0' || s[i] > '9') return 0;
  return 1;
}

static int by_step_desc(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x < y) - (x > y);
}

/* After a commit: committed steps before `step` beyond the newest keep_last - 1 go, and so do
 * directories that interrupted saves left (.tmp, .old). A failure here is only a warning: the
 * new checkpoint is already whole. */
static void prune(const char *root, int64_t step, int keep_last) {
  DIR *d = opendir(root);
  if (!d) return;
  int64_t *older = NULL;
  size_t n = 0, cap = 0;
  char path[4096], err[1024];
  struct dirent *e;
  while ((e = readdir(d))) {
    const char *s = e->d_name;
    size_t len = strlen(s);
    if (len < 13 || strncmp(s, "step_", 5) != 0 || !is_digits(s + 5, 8)) continue;
    if (len == 13) {
      int64_t k = strtoll(s + 5, NULL, 10);
      if (k >= step) continue;
      if (n == cap) older = xrealloc(older, (cap = cap ? 2 * cap : 16) * sizeof *older);
      older[n++] = k;
    } else if (!strcmp(s + 13, ".tmp") || !strcmp(s + 13, ".old")) {
      snprintf(path, sizeof path, "%s/%s", root, s);
      if (remove_dir(path, err, sizeof err) != 0) warn("checkpoint: %s", err);
    }
  }
  closedir(d);
  if (keep_last > 0 && n > 0) {
    qsort(older, n, sizeof *older, by_step_desc);
    for (size_t i = (size_t)keep_last - 1; i < n; i++) {
      ckpt_step_path(path, sizeof path, root, older[i], 0);
      if (remove_dir(path, err, sizeof err) != 0) warn("checkpoint: %s", err);
    }
  }
  free(older);
}

int ckpt_commit(const char *root, const struct ckpt_state *s, int keep_last, char *err,
                size_t errlen) {
  char tmp[4200], dir[4200], old[4300], name[64], link_tmp[4200], latest[4200];
  ckpt_step_path(tmp, sizeof tmp, root, s->step, 1);
  ckpt_step_path(dir, sizeof dir, root, s->step, 0);
  snprintf(old, sizeof old, "%s.old", dir);
  snprintf(name, sizeof name, "step_%08lld", (long long)s->step);
  snprintf(link_tmp, sizeof link_tmp, "%s/latest.tmp", root);
  snprintf(latest, sizeof latest, "%s/latest", root);
  err[0] = 0;
  struct quiet q;
  quiet_on(&q);
  int rc = write_model_file(tmp, s, err, errlen);
  quiet_off(&q);
  if (rc != 0 || sync_path(tmp, err, errlen) != 0) return -1;
  /* The same step saved again (a run resumed from an earlier checkpoint than `latest`): the old
   * copy is moved aside and removed only after the new one is in place. Between the two
   * renames `latest` may name neither, if it named this step; a crash exactly there leaves the
   * old copy as step_%08d.old for a person to rename back. */
  if (exists(dir) && rename(dir, old) != 0)
    return errorf(err, errlen, "%s: cannot move aside: %s", dir, strerror(errno));
  if (rename(tmp, dir) != 0)
    return errorf(err, errlen, "%s: cannot rename to %s: %s", tmp, dir, strerror(errno));
  if (sync_path(root, err, errlen) != 0) return -1;
  unlink(link_tmp);
  if (symlink(name, link_tmp) != 0)
    return errorf(err, errlen, "%s: cannot create: %s", link_tmp, strerror(errno));
  if (rename(link_tmp, latest) != 0)
    return errorf(err, errlen, "%s: cannot replace: %s", latest, strerror(errno));
  if (sync_path(root, err, errlen) != 0) return -1;
  prune(root, s->step, keep_last);
  return 0;
}

/* ---- finding a checkpoint ------------------------------------------------------------------ */

int ckpt_find_latest(const char *root, char *out, size_t len, char *err, size_t errlen) {
  char link[4096], target[4096], model[4096];
  out[0] = 0;
  snprintf(link, sizeof link, "%s/latest", root);
  if (!exists(link)) return 0;
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n < 0) return errorf(err, errlen, "%s: not a symlink to a step directory: %s", link, strerror(errno));
  target[n] = 0;
  if (target[0] == '/') snprintf(out, len, "%s", target);
  else snprintf(out, len, "%s/%s", root, target);
  snprintf(model, sizeof model, "%s/model.h5", out);
  if (!exists(model))
    return errorf(err, errlen, "%s points at '%s', which is not a whole checkpoint (no model.h5)",
                link, target);
  return 1;
}

int ckpt_resolve(const char *path, char *out, size_t len, char *err, size_t errlen) {
  char probe[4096];
  struct stat st;
  if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
    return errorf(err, errlen, "%s: no such checkpoint directory", path);
  snprintf(probe, sizeof probe, "%s/model.h5", path);
  if (exists(probe)) {
    snprintf(out, len, "%s", path);
    return 0;
  }
  int found = ckpt_find_latest(path, out, len, err, errlen);
  if (found < 0) return -1;
  if (found == 0)
    return errorf(err, errlen, "%s: not a checkpoint: it holds neither model.h5 (a step directory) "
                "nor latest (a checkpoint directory)", path);
  return 0;
}

/* ---- reading ------------------------------------------------------------------------------- */

struct link {
  char *name;   /* the dataset's name in model.h5: a tensor name plus its part's suffix */
  int file;     /* into ckpt.files */
  char *obj;    /* the dataset inside that file */
};

struct ckpt {
  char dir[4096], model_path[4200];
  char state_sha256[65];   /* as stored */
  struct ckpt_state state;
  uint8_t *job;
  struct link *links;
  size_t n_links, cap_links;
  char **names;   /* weight tensors, sorted */
  size_t n_names;
  char **files;   /* stage file names (in dir) */
  hid_t *file_ids;
  int n_files;
};

struct lister {
  struct ckpt *c;
  char *err;
  size_t errlen;
};

static int file_index(struct ckpt *c, const char *file) {
  for (int i = 0; i < c->n_files; i++)
    if (!strcmp(c->files[i], file)) return i;
  c->files = xrealloc(c->files, (size_t)(c->n_files + 1) * sizeof *c->files);
  c->file_ids = xrealloc(c->file_ids, (size_t)(c->n_files + 1) * sizeof *c->file_ids);
  c->files[c->n_files] = xstrdup(file);
  c->file_ids[c->n_files] = -1;
  return c->n_files++;
}

/* The link policy: only model.h5 holds external links, and only to a regular file (not a
 * symlink) directly inside its own step directory, to the dataset of the same name. */
static herr_t list_one(hid_t group, const char *name, const H5L_info_t *info, void *data) {
  struct lister *l = data;
  struct ckpt *c = l->c;
  char *err = l->err;
  size_t errlen = l->errlen;
  if (info->type == H5L_TYPE_HARD) return 0;   /* config, job.pb */
  if (info->type != H5L_TYPE_EXTERNAL) {
    errorf(err, errlen, "%s: '%s' is a %s link; model.h5 holds only external links to its "
           "stage files", c->model_path, name, info->type == H5L_TYPE_SOFT ? "soft" : "user-defined");
    return -1;
  }
  if (strlen(name) > CKPT_MAX_NAME + 8) {
    errorf(err, errlen, "%s: link name '%.40s...' is longer than %d bytes", c->model_path, name,
           CKPT_MAX_NAME + 8);
    return -1;
  }
  if (info->u.val_size < 3 || info->u.val_size > 8192) {
    errorf(err, errlen, "%s: external link '%s' has a value of %zu bytes (damaged file?)",
           c->model_path, name, info->u.val_size);
    return -1;
  }
  char *val = xmalloc(info->u.val_size);
  const char *file, *obj;
  unsigned flags;
  int rc = -1;
  H5_CHECK(H5Lget_val(group, name, val, info->u.val_size, H5P_DEFAULT), "%s: link '%s'",
           c->model_path, name);
  if (val[info->u.val_size - 1] != 0) {
    errorf(err, errlen, "%s: external link '%s' is malformed", c->model_path, name);
    goto out;
  }
  H5_CHECK(H5Lunpack_elink_val(val, info->u.val_size, &flags, &file, &obj), "%s: link '%s'",
           c->model_path, name);
  /* a checkpoint only ever links to files of its own directory */
  char target[8400];
  struct stat st;
  snprintf(target, sizeof target, "%s/%s", c->dir, file);
  if (!file[0] || strchr(file, '/') || !strcmp(file, ".") || !strcmp(file, "..") ||
      !strcmp(file, "model.h5")) {
    errorf(err, errlen, "%s: external link '%s' points to '%s'; links may only name a stage file "
           "of the same step directory", c->model_path, name, file);
    goto out;
  }
  if (lstat(target, &st) == 0 && !S_ISREG(st.st_mode)) {
    errorf(err, errlen, "%s: external link '%s' points to '%s', which is not a regular file of the "
           "step directory (a symlink?); links may only name a stage file there", c->model_path,
           name, file);
    goto out;
  }
  if (strcmp(obj, name) != 0 && !(obj[0] == '/' && !strcmp(obj + 1, name))) {
    errorf(err, errlen, "%s: external link '%s' points to object '%s'; a tensor link must name the "
           "dataset of the same name", c->model_path, name, obj);
    goto out;
  }
  if (c->n_links == c->cap_links)
    c->links = xrealloc(c->links, (c->cap_links = c->cap_links ? 2 * c->cap_links : 64) *
                                      sizeof *c->links);
  c->links[c->n_links++] = (struct link){xstrdup(name), file_index(c, file), xstrdup(name)};
  rc = 0;
out:
  free(val);
  return rc;
}

static int by_link_name(const void *a, const void *b) {
  return strcmp(((const struct link *)a)->name, ((const struct link *)b)->name);
}

static int has_suffix(const char *s, const char *suffix) {
  size_t n = strlen(s), k = strlen(suffix);
  return n >= k && !strcmp(s + n - k, suffix);
}

static int read_config(hid_t model, const char *path, struct qwen3_config *c, char *err,
                       size_t errlen) {
  int rc = -1;
  hid_t g = -1;
  if (h5c_require_hard(model, path, "config", err, errlen) != 0) return -1;
  H5_CHECK(g = H5Gopen2(model, "config", H5P_DEFAULT), "%s: no group 'config'", path);
  int64_t v[9];
  const char *keys[9] = {"hidden_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                         "tie_word_embeddings", "max_position_embeddings"};
  char where[4300];
  snprintf(where, sizeof where, "%s: group 'config'", path);
  for (int i = 0; i < 9; i++)
    if (h5c_attr_int(g, where, keys[i], i == 7 ? 0 : 1, i == 7 ? 1 : INT32_MAX, &v[i], err,
                     errlen) != 0)
      goto out;
  *c = (struct qwen3_config){.hidden_size = (int)v[0], .num_layers = (int)v[1],
                             .num_heads = (int)v[2], .num_kv_heads = (int)v[3],
                             .head_dim = (int)v[4], .intermediate_size = (int)v[5],
                             .vocab_size = (int)v[6], .tie_embeddings = (int)v[7],
                             .max_seq_len = (int)v[8]};
  if (h5c_attr_f64(g, where, "rope_theta", &c->rope_theta, err, errlen) != 0 ||
      h5c_attr_f64(g, where, "rms_norm_eps", &c->rms_norm_eps, err, errlen) != 0)
    goto out;
  if (!(c->rope_theta > 0) || !(c->rms_norm_eps > 0)) {
    errorf(err, errlen, "%s: rope_theta (%g) and rms_norm_eps (%g) must be > 0", where,
           c->rope_theta, c->rms_norm_eps);
    goto out;
  }
  rc = 0;
out:
  h5c_close(g);
  return rc;
}

/* The job spec of the run; at most this many bytes (a job is a few KB). */
#define CKPT_MAX_JOB_BYTES (16u << 20)

static int read_job(hid_t model, struct ckpt *c, char *err, size_t errlen) {
  int rc = -1;
  hid_t ds = -1;
  hsize_t dims[2];
  int rank;
  uint64_t bytes;
  int there = h5c_exists(model, c->model_path, "job.pb", err, errlen);
  if (there <= 0) return there;
  ds = h5c_open_dataset(model, c->model_path, "job.pb", "dataset", H5C_UINT, 1, 1, 1, 0, &rank,
                        dims, err, errlen);
  if (ds < 0) return -1;
  if (h5c_bytes(c->model_path, "job.pb", 1, dims, 1, CKPT_MAX_JOB_BYTES, "the limit of 16 MiB",
                &bytes, err, errlen) != 0 ||
      !(c->job = h5c_alloc(bytes, c->model_path, "the job spec 'job.pb'", err, errlen)))
    goto out;
  H5_CHECK(H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, c->job),
           "%s: 'job.pb' fails its checksum or cannot be read: the file is damaged", c->model_path);
  c->state.job = c->job;
  c->state.job_len = (size_t)bytes;
  rc = 0;
out:
  h5c_close(ds);
  return rc;
}

/* Stage files per checkpoint: far more than any pipeline. */
#define CKPT_MAX_STAGES 4096

static int open_model(struct ckpt *c, char *err, size_t errlen) {
  int rc = -1;
  hid_t model = -1;
  int64_t version, step, n_stages;
  const char *p = c->model_path;
  H5_CHECK(model = H5Fopen(p, H5F_ACC_RDONLY, H5P_DEFAULT),
           "%s: cannot open (truncated or damaged?)", p);
  if (h5c_attr_int(model, p, "format_version", 0, INT32_MAX, &version, err, errlen) != 0) goto out;
  if (version != CKPT_FORMAT_VERSION) {
    errorf(err, errlen, "%s: checkpoint format version %lld; this build reads version %d%s", p,
           (long long)version, CKPT_FORMAT_VERSION,
           version == 1 ? " (version 1 had no run-state checksum)" : "");
    goto out;
  }
  if (h5c_attr_str(model, p, "state_sha256", c->state_sha256, sizeof c->state_sha256, err,
                   errlen) != 0 ||
      h5c_attr_int(model, p, "step", 0, INT64_MAX, &step, err, errlen) != 0 ||
      h5c_attr_u64(model, p, "samples_seen", &c->state.samples_seen, err, errlen) != 0 ||
      h5c_attr_u64(model, p, "tokens_seen", &c->state.tokens_seen, err, errlen) != 0 ||
      h5c_attr_int(model, p, "n_stages", 1, CKPT_MAX_STAGES, &n_stages, err, errlen) != 0 ||
      read_config(model, p, &c->state.config, err, errlen) != 0 || read_job(model, c, err, errlen) != 0)
    goto out;
  c->state.step = step;
  c->state.n_stages = (int)n_stages;
  struct lister l = {c, err, errlen};
  err[0] = 0;
  if (H5Literate(model, H5_INDEX_NAME, H5_ITER_INC, NULL, list_one, &l) < 0) {
    if (!err[0]) h5_fail(err, errlen, "%s: cannot list its tensors", p);
    goto out;
  }
  rc = 0;
out:
  h5c_close(model);
  return rc;
}

int ckpt_open(struct ckpt **out, const char *path, char *err, size_t errlen) {
  *out = NULL;
  struct ckpt *c = xcalloc(1, sizeof *c);
  if (ckpt_resolve(path, c->dir, sizeof c->dir, err, errlen) != 0) {
    free(c);
    return -1;
  }
  snprintf(c->model_path, sizeof c->model_path, "%s/model.h5", c->dir);
  struct quiet q;
  quiet_on(&q);
  int rc = open_model(c, err, errlen);
  quiet_off(&q);
  if (rc != 0) {
    ckpt_close(c);
    return -1;
  }
  qsort(c->links, c->n_links, sizeof *c->links, by_link_name);
  struct state_link *sl = xmalloc((c->n_links ? c->n_links : 1) * sizeof *sl);
  for (size_t i = 0; i < c->n_links; i++)
    sl[i] = (struct state_link){c->links[i].name, c->files[c->links[i].file], c->links[i].obj};
  char hex[65];
  state_hash(&c->state, CKPT_FORMAT_VERSION, sl, c->n_links, hex);
  free(sl);
  if (strcmp(hex, c->state_sha256) != 0) {
    errorf(err, errlen, "%s: the run state (step, counters, config, job.pb, tensor links) fails "
           "its checksum state_sha256: the file is damaged or was edited", c->model_path);
    ckpt_close(c);
    return -1;
  }
  c->names = xmalloc((c->n_links ? c->n_links : 1) * sizeof *c->names);
  for (size_t i = 0; i < c->n_links; i++)
    if (!has_suffix(c->links[i].name, PART_SUFFIX[CKPT_ADAM_M]) &&
        !has_suffix(c->links[i].name, PART_SUFFIX[CKPT_ADAM_V]))
      c->names[c->n_names++] = c->links[i].name;
  *out = c;
  return 0;
}

void ckpt_close(struct ckpt *c) {
  if (!c) return;
  for (int i = 0; i < c->n_files; i++) {
    if (c->file_ids[i] >= 0) H5Fclose(c->file_ids[i]);
    free(c->files[i]);
  }
  for (size_t i = 0; i < c->n_links; i++) {
    free(c->links[i].name);
    free(c->links[i].obj);
  }
  free(c->files);
  free(c->file_ids);
  free(c->links);
  free(c->names);
  free(c->job);
  free(c);
}

const char *ckpt_dir(const struct ckpt *c) { return c->dir; }
const struct ckpt_state *ckpt_get_state(const struct ckpt *c) { return &c->state; }
size_t ckpt_count(const struct ckpt *c) { return c->n_names; }
const char *ckpt_name_at(const struct ckpt *c, size_t i) { return c->names[i]; }

static void shape_text(char *out, size_t len, int ndim, const int64_t *shape) {
  if (ndim == 1) snprintf(out, len, "[%lld]", (long long)shape[0]);
  else snprintf(out, len, "[%lld, %lld]", (long long)shape[0], (long long)shape[1]);
}

/* Opens the dataset of tensor `name`, part `part`; *file_path names its stage file. */
static hid_t open_tensor(struct ckpt *c, const char *name, enum ckpt_part part,
                         char *file_path, size_t fp_len, int *ndim, hsize_t dims[2], char *err,
                         size_t errlen) {
  char full[256];
  snprintf(full, sizeof full, "%s%s", name, PART_SUFFIX[part]);
  struct link key = {.name = full};
  const struct link *l = bsearch(&key, c->links, c->n_links, sizeof *c->links, by_link_name);
  if (!l) {
    errorf(err, errlen, "%s: the checkpoint has no tensor '%s'%s (a checkpoint of another model "
         "shape?)", c->model_path, full, part == CKPT_WEIGHTS ? "" : " (AdamW moments)");
    return -1;
  }
  snprintf(file_path, fp_len, "%s/%s", c->dir, c->files[l->file]);
  hid_t ds = -1;
  if (c->file_ids[l->file] < 0) {
    struct stat st;
    if (lstat(file_path, &st) != 0) {
      errorf(err, errlen, "%s: missing (it holds tensor '%s')", file_path, full);
      return -1;
    }
    if (!S_ISREG(st.st_mode)) {
      errorf(err, errlen, "%s: not a regular file (it holds tensor '%s'); a checkpoint's stage "
             "files lie in its step directory", file_path, full);
      return -1;
    }
    H5_CHECK(c->file_ids[l->file] = H5Fopen(file_path, H5F_ACC_RDONLY, H5P_DEFAULT),
             "%s: cannot open, truncated or damaged (it holds tensor '%s')", file_path, full);
  }
  ds = h5c_open_dataset(c->file_ids[l->file], file_path, l->obj, "tensor", H5C_FLOAT, 4, 1, 2, 0,
                        ndim, dims, err, errlen);
out:
  return ds;
}

int ckpt_shape(struct ckpt *c, const char *name, int *ndim, int64_t shape[2], char *err,
               size_t errlen) {
  char file_path[8200], limit[96];
  hsize_t dims[2] = {0, 1};
  uint64_t bytes;
  struct quiet q;
  quiet_on(&q);
  hid_t ds = open_tensor(c, name, CKPT_WEIGHTS, file_path, sizeof file_path, ndim, dims, err,
                         errlen);
  int rc = -1;
  if (ds >= 0) {
    /* the weights are always written, uncompressed: they fit in their file */
    hid_t f = H5Iget_file_id(ds);
    uint64_t size = f < 0 ? 0 : h5c_file_size(f);
    h5c_close(f);
    snprintf(limit, sizeof limit, "its file's size (%llu bytes)", (unsigned long long)size);
    if (h5c_bytes(file_path, name, *ndim, dims, 4, size, limit, &bytes, err, errlen) == 0) {
      shape[0] = (int64_t)dims[0];
      shape[1] = *ndim > 1 ? (int64_t)dims[1] : 1;
      rc = 0;
    }
  }
  h5c_close(ds);
  quiet_off(&q);
  return rc;
}

/* Reads tensor `full` (dims[0] rows of dims[1] floats) as write_chunks wrote it: every chunk raw
 * (H5Dread_chunk), its Fletcher32 checked here 16 lanes at a time instead of by HDF5's filter,
 * which sums a byte pair at a time; a chunk never written reads as the fill value, zeros.
 * Returns 1 when read, 0 when the dataset is laid out otherwise (the caller reads it through
 * HDF5), -1 on an error in err. */
static int read_chunks(hid_t ds, const char *file, const char *full, int nd, const hsize_t *dims,
                       float *dst, char *err, size_t errlen) {
  int rc = -1;
  hid_t dcpl = -1, type = -1;
  uint8_t *buf = NULL;
  hsize_t chunk[2] = {0, 1};
  unsigned flags, cd[8];
  size_t n_cd = 8;
  H5_CHECK(dcpl = H5Dget_create_plist(ds), "%s: tensor '%s'", file, full);
  H5_CHECK(type = H5Dget_type(ds), "%s: tensor '%s'", file, full);
  /* whole rows a chunk, at most the tensor's (so a chunk's buffer is bounded by the tensor the
   * job's model expects, whatever the file says) */
  if (H5Pget_layout(dcpl) != H5D_CHUNKED || H5Pget_chunk(dcpl, 2, chunk) != nd ||
      chunk[0] < 1 || chunk[0] > dims[0] || (nd == 2 && chunk[1] != dims[1]) ||
      H5Pget_nfilters(dcpl) != 1 ||
      H5Pget_filter2(dcpl, 0, &flags, &n_cd, cd, 0, NULL, NULL) != H5Z_FILTER_FLETCHER32 ||
      H5Tequal(type, H5T_IEEE_F32LE) <= 0) {
    rc = 0;
    goto out;
  }
  size_t row_bytes = (size_t)(nd == 2 ? dims[1] : 1) * sizeof(float);
  size_t bytes = (size_t)chunk[0] * row_bytes;
  if (!(buf = malloc(bytes + 4))) {
    errorf(err, errlen, "%s: tensor '%s': out of memory for a chunk of %zu bytes", file, full,
           bytes);
    goto out;
  }
  for (hsize_t r = 0; r < dims[0]; r += chunk[0]) {
    hsize_t offset[2] = {r, 0}, size = 0;
    haddr_t addr;
    unsigned mask = 0;
    size_t have = (size_t)(dims[0] - r < chunk[0] ? dims[0] - r : chunk[0]) * row_bytes;
    uint8_t *at = (uint8_t *)dst + (size_t)r * row_bytes;
    H5_CHECK(H5Dget_chunk_info_by_coord(ds, offset, &mask, &addr, &size),
             "%s: tensor '%s': cannot find rows %llu on: the file is damaged", file, full,
             (unsigned long long)r);
    if (addr == HADDR_UNDEF) {   /* never written: the fill value */
      memset(at, 0, have);
      continue;
    }
    if (mask != 0 || size != bytes + 4) {
      errorf(err, errlen, "%s: tensor '%s' fails its checksum or cannot be read: the file is "
             "damaged (rows %llu on: a chunk of %llu bytes, %zu expected)", file, full,
             (unsigned long long)r, (unsigned long long)size, bytes + 4);
      goto out;
    }
    /* straight into dst while the chunk and its 4-byte checksum end before the tensor does
     * (the checksum lands on the next chunk's first row, read next); the last one through buf,
     * which also takes its padding */
    uint8_t *into = r + chunk[0] < dims[0] ? at : buf;
    H5_CHECK(H5Dread_chunk(ds, H5P_DEFAULT, offset, &mask, into),
             "%s: tensor '%s' cannot be read (rows %llu on): the file is damaged", file, full,
             (unsigned long long)r);
    uint32_t stored = 0;
    for (int i = 0; i < 4; i++) stored |= (uint32_t)into[bytes + i] << (8 * i);
    uint32_t sum = fletcher32(into, bytes);
    if (sum != stored) {
      errorf(err, errlen, "%s: tensor '%s' fails its checksum: the file is damaged (rows %llu "
             "on: Fletcher32 %08x stored, %08x computed)", file, full, (unsigned long long)r,
             stored, sum);
      goto out;
    }
    if (into == buf) memcpy(at, buf, have);
  }
  rc = 1;
out:
  free(buf);
  h5c_close(type);
  h5c_close(dcpl);
  return rc;
}

int ckpt_read(struct ckpt *c, const char *name, enum ckpt_part part, int ndim,
              const int64_t *shape, float *dst, char *err, size_t errlen) {
  char file_path[8200], full[256], have[64], want[64];
  snprintf(full, sizeof full, "%s%s", name, PART_SUFFIX[part]);
  struct quiet q;
  quiet_on(&q);
  int rc = -1, nd;
  hsize_t dims[2] = {0, 1};
  int64_t stored[2];
  hid_t ds = open_tensor(c, name, part, file_path, sizeof file_path, &nd, dims, err, errlen);
  if (ds < 0) goto out;
  stored[0] = (int64_t)dims[0];
  stored[1] = nd > 1 ? (int64_t)dims[1] : 1;
  if (nd != ndim || dims[0] != (hsize_t)shape[0] || (ndim == 2 && dims[1] != (hsize_t)shape[1])) {
    shape_text(have, sizeof have, nd, stored);
    shape_text(want, sizeof want, ndim, shape);
    errorf(err, errlen, "%s: tensor '%s' has shape %s, the job's model needs %s (a checkpoint of "
         "another model shape?)", file_path, full, have, want);
    goto out;
  }
  int raw = read_chunks(ds, file_path, full, nd, dims, dst, err, errlen);
  if (raw < 0) goto out;
  if (raw == 0)
    H5_CHECK(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst),
             "%s: tensor '%s' fails its checksum or cannot be read: the file is damaged",
             file_path, full);
  rc = 0;
out:
  h5c_close(ds);
  quiet_off(&q);
  return rc;
}
