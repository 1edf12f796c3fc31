#define _POSIX_C_SOURCE 200809L
#include "data/shard.h"

#include <hdf5.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/h5_check.h"
#include "data/h5_quiet.h"

/* Reads the 1-D dataset `name` (exactly uint of `elem` bytes: no conversion) into a new buffer
 * after checking its size against the file's: a shard stores its data uncompressed, so a
 * dataset never holds more bytes than the file. */
static int read_vector(hid_t file, const char *path, const char *name, size_t elem,
                       uint64_t file_size, void **out, uint64_t *n, char *err, size_t errlen) {
  hsize_t dims[2];
  int rank;
  uint64_t bytes;
  char limit[96], what[96];
  hid_t ds = h5c_open_dataset(file, path, name, "token shard dataset", H5C_UINT, elem, 1, 1, 1,
                              &rank, dims, err, errlen);
  if (ds < 0) return -1;
  int rc = -1;
  snprintf(limit, sizeof limit, "the file's size (%llu bytes)", (unsigned long long)file_size);
  snprintf(what, sizeof what, "the shard dataset '%s'", name);
  void *buf = NULL;
  hsize_t dim = dims[0];
  if (h5c_bytes(path, name, 1, &dim, elem, file_size, limit, &bytes, err, errlen) != 0 ||
      !(buf = h5c_alloc(bytes, path, what, err, errlen)))
    goto out;
  hid_t mem = elem == 1 ? H5T_NATIVE_UINT8 : elem == 4 ? H5T_NATIVE_UINT32 : H5T_NATIVE_UINT64;
  if (dim > 0 && H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
    errorf(err, errlen, "%s: dataset '%s' fails its checksum or cannot be read: the file is damaged",
           path, name);
    free(buf);
    goto out;
  }
  *out = buf;
  *n = dim;
  rc = 0;
out:
  H5Dclose(ds);
  return rc;
}

int shard_load(struct shard *s, const char *path, char *err, size_t errlen) {
  memset(s, 0, sizeof *s);
  if (access(path, R_OK) != 0) return errorf(err, errlen, "%s: cannot read the token shard", path);
  struct quiet q;
  quiet_on(&q);
  hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file < 0) {
    quiet_off(&q);
    return errorf(err, errlen, "%s: not an HDF5 file (or a damaged one)", path);
  }

  int rc = -1;
  uint64_t n_tok = 0, n_off = 0, n_mask = 0, size = h5c_file_size(file);
  int64_t version, vocab;
  int there = h5c_exists(file, path, "tokens", err, errlen);
  if (there == 0)
    errorf(err, errlen, "%s: no dataset 'tokens' (is this a qwen3-prep shard?)", path);
  if (there <= 0) goto done;
  if (h5c_attr_int(file, path, "format_version", SHARD_FORMAT_VERSION, SHARD_FORMAT_VERSION,
                   &version, err, errlen) != 0 ||
      h5c_attr_int(file, path, "vocab_size", 1, UINT32_MAX, &vocab, err, errlen) != 0)
    goto done;
  s->vocab_size = (uint32_t)vocab;
  if (H5Aexists(file, "tokenizer") > 0 &&
      h5c_attr_str(file, path, "tokenizer", s->tokenizer, sizeof s->tokenizer, err, errlen) != 0)
    goto done;
  if (read_vector(file, path, "tokens", 4, size, (void **)&s->tokens, &n_tok, err, errlen) != 0 ||
      read_vector(file, path, "doc_offsets", 8, size, (void **)&s->doc_offsets, &n_off, err,
                  errlen) != 0)
    goto done;
  if (n_off < 2) {
    errorf(err, errlen, "%s: dataset 'doc_offsets' has %llu entries; a shard needs at least 2 "
           "(one document)", path, (unsigned long long)n_off);
    goto done;
  }
  s->n_tokens = n_tok;
  s->n_docs = n_off - 1;
  if (s->doc_offsets[0] != 0 || s->doc_offsets[s->n_docs] != s->n_tokens) {
    errorf(err, errlen, "%s: doc_offsets must run from 0 to the token count %llu", path,
         (unsigned long long)s->n_tokens);
    goto done;
  }
  for (uint64_t d = 0; d < s->n_docs; d++)
    if (s->doc_offsets[d] > s->doc_offsets[d + 1]) {
      errorf(err, errlen, "%s: doc_offsets decrease at document %llu", path, (unsigned long long)d);
      goto done;
    }
  there = h5c_exists(file, path, "loss_mask", err, errlen);
  if (there < 0) goto done;
  if (there) {
    if (read_vector(file, path, "loss_mask", 1, size, (void **)&s->loss_mask, &n_mask, err,
                    errlen) != 0)
      goto done;
    if (n_mask != n_tok) {
      errorf(err, errlen, "%s: loss_mask has %llu entries for %llu tokens", path,
             (unsigned long long)n_mask, (unsigned long long)n_tok);
      goto done;
    }
  }
  for (uint64_t i = 0; i < s->n_tokens; i++)
    if (s->tokens[i] >= s->vocab_size) {
      errorf(err, errlen, "%s: token %llu is %u, past the shard's vocab_size %u", path,
           (unsigned long long)i, s->tokens[i], s->vocab_size);
      goto done;
    }
  s->path = xstrdup(path);
  rc = 0;
done:
  H5Fclose(file);
  quiet_off(&q);
  if (rc != 0) shard_free(s);
  return rc;
}

void shard_free(struct shard *s) {
  free(s->path);
  free(s->tokens);
  free(s->doc_offsets);
  free(s->loss_mask);
  memset(s, 0, sizeof *s);
}

struct shard_writer {
  uint32_t *tokens;
  uint8_t *mask;
  uint64_t *offsets;
  uint64_t n_tokens, cap_tokens, n_docs, cap_docs, n_masked;
  int with_mask;
};

struct shard_writer *shard_writer_new(int with_loss_mask) {
  struct shard_writer *w = xcalloc(1, sizeof *w);
  w->with_mask = with_loss_mask;
  w->cap_docs = 1024;
  w->offsets = xmalloc(w->cap_docs * sizeof *w->offsets);
  w->offsets[0] = 0;
  return w;
}

void shard_writer_add(struct shard_writer *w, const uint32_t *ids, const uint8_t *mask,
                      size_t n) {
  if (w->n_tokens + n > w->cap_tokens) {
    while (w->n_tokens + n > w->cap_tokens) w->cap_tokens = w->cap_tokens ? 2 * w->cap_tokens : 65536;
    w->tokens = xrealloc(w->tokens, w->cap_tokens * sizeof *w->tokens);
    if (w->with_mask) w->mask = xrealloc(w->mask, w->cap_tokens);
  }
  memcpy(w->tokens + w->n_tokens, ids, n * sizeof *ids);
  if (w->with_mask) {
    for (size_t i = 0; i < n; i++) {
      w->mask[w->n_tokens + i] = mask ? (mask[i] != 0) : 0;
      w->n_masked += w->mask[w->n_tokens + i];
    }
  }
  w->n_tokens += n;
  if (w->n_docs + 2 > w->cap_docs)
    w->offsets = xrealloc(w->offsets, (w->cap_docs *= 2) * sizeof *w->offsets);
  w->offsets[++w->n_docs] = w->n_tokens;
}

uint64_t shard_writer_tokens(const struct shard_writer *w) { return w->n_tokens; }
uint64_t shard_writer_docs(const struct shard_writer *w) { return w->n_docs; }
uint64_t shard_writer_masked(const struct shard_writer *w) { return w->n_masked; }

static int write_vector(hid_t file, const char *name, hid_t type, const void *data, uint64_t n) {
  hsize_t dim = n, chunk = n < 65536 ? (n ? n : 1) : 65536;
  hid_t space = H5Screate_simple(1, &dim, NULL);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(dcpl, 1, &chunk);
  H5Pset_fletcher32(dcpl);   /* a damaged shard is caught at load */
  hid_t ds = H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  herr_t rc = ds < 0 ? -1 : H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(space);
  return rc < 0 ? -1 : 0;
}

static int write_attrs(hid_t file, uint32_t vocab_size, const char *tokenizer) {
  hid_t scalar = H5Screate(H5S_SCALAR);
  int version = SHARD_FORMAT_VERSION;
  hid_t a = H5Acreate2(file, "vocab_size", H5T_STD_U32LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
  herr_t rc = H5Awrite(a, H5T_NATIVE_UINT32, &vocab_size);
  H5Aclose(a);
  a = H5Acreate2(file, "format_version", H5T_STD_I32LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
  rc |= H5Awrite(a, H5T_NATIVE_INT, &version);
  H5Aclose(a);
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, strlen(tokenizer) + 1);
  a = H5Acreate2(file, "tokenizer", t, scalar, H5P_DEFAULT, H5P_DEFAULT);
  rc |= H5Awrite(a, t, tokenizer);
  H5Aclose(a);
  H5Tclose(t);
  H5Sclose(scalar);
  return rc < 0 ? -1 : 0;
}

int shard_writer_finish(struct shard_writer *w, const char *path, uint32_t vocab_size,
                        const char *tokenizer, char *err, size_t errlen) {
  int rc = 0;
  for (uint64_t i = 0; i < w->n_tokens && rc == 0; i++)
    if (w->tokens[i] >= vocab_size)
      rc = errorf(err, errlen, "%s: token %u at position %llu is past vocab_size %u", path,
                w->tokens[i], (unsigned long long)i, vocab_size);
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
  hid_t file = -1;
  if (rc == 0) {
    H5E_BEGIN_TRY { file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT); }
    H5E_END_TRY;
    if (file < 0) rc = errorf(err, errlen, "%s: cannot create the shard file", tmp);
  }
  if (rc == 0) {
    if (write_vector(file, "tokens", H5T_STD_U32LE, w->tokens, w->n_tokens) ||
        write_vector(file, "doc_offsets", H5T_STD_U64LE, w->offsets, w->n_docs + 1) ||
        (w->with_mask && write_vector(file, "loss_mask", H5T_STD_U8LE, w->mask, w->n_tokens)) ||
        write_attrs(file, vocab_size, tokenizer))
      rc = errorf(err, errlen, "%s: writing the shard failed (disk full?)", tmp);
    if (H5Fclose(file) < 0 && rc == 0) rc = errorf(err, errlen, "%s: closing the shard failed", tmp);
    if (rc == 0 && rename(tmp, path) != 0)
      rc = errorf(err, errlen, "%s: cannot rename the finished shard into place", path);
    if (rc != 0) unlink(tmp);
  }
  free(w->tokens);
  free(w->mask);
  free(w->offsets);
  free(w);
  return rc;
}
