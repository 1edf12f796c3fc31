#define _POSIX_C_SOURCE 200809L
#include "data/shard.h"

#include <hdf5.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

/* Reads a 1-D dataset of `type` into a new buffer; returns its length or -1. */
static int64_t read_vector(hid_t file, const char *name, hid_t type, size_t elem, void **out) {
  hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
  if (ds < 0) return -1;
  hid_t space = H5Dget_space(ds);
  int64_t n = -1;
  if (space >= 0 && H5Sget_simple_extent_ndims(space) == 1) {
    hsize_t dim;
    H5Sget_simple_extent_dims(space, &dim, NULL);
    void *buf = xmalloc(dim * elem);
    if (H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0) {
      *out = buf;
      n = (int64_t)dim;
    } else {
      free(buf);
    }
  }
  if (space >= 0) H5Sclose(space);
  H5Dclose(ds);
  return n;
}

int shard_load(struct shard *s, const char *path, char *err, size_t errlen) {
  memset(s, 0, sizeof *s);
  if (access(path, R_OK) != 0) return errorf(err, errlen, "%s: cannot read the token shard", path);
  hid_t file = -1;
  H5E_BEGIN_TRY { file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT); }
  H5E_END_TRY;
  if (file < 0) return errorf(err, errlen, "%s: not an HDF5 file", path);

  int rc = -1;
  int64_t n_tok, n_off;
  H5E_BEGIN_TRY {
    n_tok = read_vector(file, "tokens", H5T_NATIVE_UINT32, 4, (void **)&s->tokens);
    n_off = read_vector(file, "doc_offsets", H5T_NATIVE_UINT64, 8, (void **)&s->doc_offsets);
  }
  H5E_END_TRY;
  if (n_tok < 0) {
    errorf(err, errlen, "%s: no 1-D dataset 'tokens' (is this a qwen3-prep shard?)", path);
    goto done;
  }
  if (n_off < 2) {
    errorf(err, errlen, "%s: dataset 'doc_offsets' missing or empty", path);
    goto done;
  }
  s->n_tokens = (uint64_t)n_tok;
  s->n_docs = (uint64_t)n_off - 1;
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
  if (H5Lexists(file, "loss_mask", H5P_DEFAULT) > 0) {
    int64_t n_mask = read_vector(file, "loss_mask", H5T_NATIVE_UINT8, 1, (void **)&s->loss_mask);
    if (n_mask != n_tok) {
      errorf(err, errlen, "%s: loss_mask has %lld entries for %lld tokens", path, (long long)n_mask,
           (long long)n_tok);
      goto done;
    }
  }
  if (H5Aexists(file, "vocab_size") <= 0) {
    errorf(err, errlen, "%s: attribute 'vocab_size' missing", path);
    goto done;
  }
  hid_t a = H5Aopen(file, "vocab_size", H5P_DEFAULT);
  herr_t ok = H5Aread(a, H5T_NATIVE_UINT32, &s->vocab_size);
  H5Aclose(a);
  if (ok < 0) {
    errorf(err, errlen, "%s: attribute 'vocab_size' unreadable", path);
    goto done;
  }
  if (H5Aexists(file, "tokenizer") > 0) {
    a = H5Aopen(file, "tokenizer", H5P_DEFAULT);
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, sizeof s->tokenizer);
    H5Tset_strpad(t, H5T_STR_NULLTERM);
    H5Aread(a, t, s->tokenizer);
    H5Tclose(t);
    H5Aclose(a);
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
