/* Hostile files for the HDF5 readers (data/h5_check.c, shard.c, ckpt_file.c) and the tokenizer
 * loader: each damage a reviewer or the fuzzers found is refused with a message naming the file,
 * the object and what is allowed, never read past a buffer (run under -DQWEN3_SANITIZE=ON). */
#define _POSIX_C_SOURCE 200809L
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/nvfp4_dump.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "tests/check.h"

static char err[1024];


static int has(const char *s, const char *a, const char *b) {
  return strstr(s, a) && (!b || strstr(s, b));
}

/* ---- shards -------------------------------------------------------------------------------- */

/* A valid shard, then `damage` applied to it through HDF5's API. */
static const char *shard_with(const char *name, void (*damage)(hid_t)) {
  const char *path = in_dir(name);
  struct shard_writer *w = shard_writer_new(1);
  const uint32_t ids[] = {1, 2, 3, 4};
  const uint8_t mask[] = {0, 1, 1, 0};
  shard_writer_add(w, ids, mask, 4);
  if (shard_writer_finish(w, path, 10, "bytes", err, sizeof err) != 0) die("%s", err);
  hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
  damage(f);
  H5Fclose(f);
  return path;
}

static void replace_attr(hid_t loc, const char *name, hid_t type, int rank, hsize_t n,
                         const void *value) {
  H5Adelete(loc, name);
  hid_t s = rank ? H5Screate_simple(1, &n, NULL) : H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, type, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, type, value);
  H5Aclose(a);
  H5Sclose(s);
}

static void replace_dataset(hid_t loc, const char *name, hid_t type, int rank,
                            const hsize_t *dims, const void *data, int chunked) {
  H5Ldelete(loc, name, H5P_DEFAULT);
  hid_t s = H5Screate_simple(rank, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (chunked) {
    hsize_t chunk[2] = {1024, 1};
    H5Pset_chunk(dcpl, rank, chunk);
  }
  hid_t d = H5Dcreate2(loc, name, type, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  if (data) H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(s);
}

static void no_damage(hid_t f) { (void)f; }
static void vocab_array(hid_t f) {
  const uint32_t v[64] = {10, 10, 10};
  replace_attr(f, "vocab_size", H5T_STD_U32LE, 1, 64, v);
}
static void vocab_string(hid_t f) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, 3);
  replace_attr(f, "vocab_size", t, 0, 1, "10");
  H5Tclose(t);
}
static void vocab_negative(hid_t f) {
  const int64_t v = -5;
  replace_attr(f, "vocab_size", H5T_STD_I64LE, 0, 1, &v);
}
static void tokenizer_long(hid_t f) {
  char s[200];
  memset(s, 'x', sizeof s);
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, sizeof s);
  H5Tset_strpad(t, H5T_STR_NULLPAD);
  replace_attr(f, "tokenizer", t, 0, 1, s);
  H5Tclose(t);
}
static void tokens_float(hid_t f) {
  const float v[4] = {1, 2, 3, 4};
  hsize_t n = 4;
  replace_dataset(f, "tokens", H5T_IEEE_F32LE, 1, &n, v, 0);
}
static void tokens_int64(hid_t f) {
  const int64_t v[4] = {1, 2, 3, 4};
  hsize_t n = 4;
  replace_dataset(f, "tokens", H5T_STD_I64LE, 1, &n, v, 0);
}
static void tokens_2d(hid_t f) {
  const uint32_t v[4] = {1, 2, 3, 4};
  hsize_t n[2] = {2, 2};
  replace_dataset(f, "tokens", H5T_STD_U32LE, 2, n, v, 0);
}
static void tokens_huge(hid_t f) {   /* claims 2^40 tokens, stores none: a 4 TB allocation */
  hsize_t n = (hsize_t)1 << 40;
  replace_dataset(f, "tokens", H5T_STD_U32LE, 1, &n, NULL, 1);
}
static void offsets_u32(hid_t f) {
  const uint32_t v[2] = {0, 4};
  hsize_t n = 2;
  replace_dataset(f, "doc_offsets", H5T_STD_U32LE, 1, &n, v, 0);
}
static void mask_u16(hid_t f) {
  const uint16_t v[4] = {0, 1, 1, 0};
  hsize_t n = 4;
  replace_dataset(f, "loss_mask", H5T_STD_U16LE, 1, &n, v, 0);
}
static void tokens_external(hid_t f) {
  H5Ldelete(f, "tokens", H5P_DEFAULT);
  H5Lcreate_external("/etc/passwd", "tokens", f, "tokens", H5P_DEFAULT, H5P_DEFAULT);
}

static void test_shards(void) {
  struct shard s;
  CHECK(shard_load(&s, shard_with("ok.h5", no_damage), err, sizeof err) == 0 && s.n_tokens == 4 &&
        s.vocab_size == 10 && !strcmp(s.tokenizer, "bytes") && s.loss_mask, "a valid shard: %s", err);
  shard_free(&s);
  const struct {
    const char *what;
    void (*damage)(hid_t);
    const char *a, *b;
  } cases[] = {
    {"vocab_size an array", vocab_array, "'vocab_size' must be a scalar", "[64]"},
    {"vocab_size a string", vocab_string, "'vocab_size' must be an integer", "string"},
    {"vocab_size negative", vocab_negative, "'vocab_size' is -5", "allowed: 1 to"},
    {"tokenizer too long", tokenizer_long, "'tokenizer' is a string of 200 bytes", "at most 79"},
    {"tokens float32", tokens_float, "'tokens' is float32", "must be uint32"},
    {"tokens int64", tokens_int64, "'tokens' is int64", "must be uint32"},
    {"tokens 2-D", tokens_2d, "'tokens' is a 2-D array [2, 2]", "must be a 1-D array"},
    {"tokens claims 4 TB", tokens_huge, "'tokens' claims 4398046511104 bytes", "file's size"},
    {"doc_offsets uint32", offsets_u32, "'doc_offsets' is uint32", "must be uint64"},
    {"loss_mask uint16", mask_u16, "'loss_mask' is uint16", "must be uint8"},
    {"tokens an external link", tokens_external, "'tokens' is an external link", NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char name[64];
    snprintf(name, sizeof name, "bad%zu.h5", i);
    const char *path = shard_with(name, cases[i].damage);
    err[0] = 0;
    int rc = shard_load(&s, path, err, sizeof err);
    CHECK(rc == -1 && has(err, path, NULL) && has(err, cases[i].a, cases[i].b),
          "shard with %s: refused naming the file, saying '%s': got rc %d, '%s'", cases[i].what,
          cases[i].a, rc, err);
  }
}

/* ---- checkpoints --------------------------------------------------------------------------- */

static char step_dir[600];

static void write_checkpoint(void) {
  char root[600], tmp[700], path[800], file[64];
  snprintf(root, sizeof root, "%s", in_dir("ckpt"));
  if (ckpt_begin(root, 7, err, sizeof err) != 0) die("%s", err);
  ckpt_step_path(tmp, sizeof tmp, root, 7, 1);
  ckpt_stage_file(file, sizeof file, 0, 1);
  snprintf(path, sizeof path, "%s/%s", tmp, file);
  struct ckpt_stage_writer *w;
  const float wt[6] = {1, 2, 3, 4, 5, 6};
  const int64_t s2[2] = {2, 3};
  if (ckpt_stage_create(&w, path, 0, 1, err, sizeof err) != 0 ||
      ckpt_stage_put(w, "model.embed_tokens.weight", 2, s2, wt, NULL, NULL, err, sizeof err) != 0 ||
      ckpt_stage_finish(w, err, sizeof err) != 0)
    die("%s", err);
  const uint8_t job[] = {1, 2, 3};
  struct ckpt_state s = {.step = 7, .samples_seen = 3, .tokens_seen = 99, .n_stages = 1,
                         .config = {3, 1, 1, 1, 3, 4, 2, 10000.0, 1e-6, 0, 32},
                         .job = job, .job_len = 3};
  if (ckpt_commit(root, &s, 0, err, sizeof err) != 0) die("%s", err);
  ckpt_step_path(step_dir, sizeof step_dir, root, 7, 0);
}

/* A copy of the step directory, with `damage` applied to its model.h5 and stage file. */
static const char *ckpt_with(const char *name, void (*damage)(hid_t model, hid_t stage)) {
  const char *d = in_dir(name);
  char cmd[2000], path[800];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", d, step_dir, d);
  if (system(cmd) != 0) die("cannot copy %s", step_dir);
  snprintf(path, sizeof path, "%s/model.h5", d);
  hid_t m = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
  snprintf(path, sizeof path, "%s/stage_000_of_001.h5", d);
  hid_t s = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
  damage(m, s);
  H5Fclose(m);
  H5Fclose(s);
  return d;
}

static void ck_none(hid_t m, hid_t s) { (void)m, (void)s; }
static void ck_hidden_array(hid_t m, hid_t s) {
  hid_t g = H5Gopen2(m, "config", H5P_DEFAULT);
  const int64_t v[32] = {3};
  replace_attr(g, "hidden_size", H5T_STD_I64LE, 1, 32, v);
  H5Gclose(g);
}
static void ck_hidden_huge(hid_t m, hid_t s) {
  hid_t g = H5Gopen2(m, "config", H5P_DEFAULT);
  const int64_t v = (int64_t)1 << 40;
  replace_attr(g, "hidden_size", H5T_STD_I64LE, 0, 1, &v);
  H5Gclose(g);
}
static void ck_step_edited(hid_t m, hid_t s) {
  const int64_t v = 8;
  replace_attr(m, "step", H5T_STD_I64LE, 0, 1, &v);
}
static void ck_eps_nan(hid_t m, hid_t s) {
  hid_t g = H5Gopen2(m, "config", H5P_DEFAULT);
  const double v = 0.0 / 0.0;
  replace_attr(g, "rms_norm_eps", H5T_IEEE_F64LE, 0, 1, &v);
  H5Gclose(g);
}
static void ck_link_outside(hid_t m, hid_t s) {
  H5Ldelete(m, "model.embed_tokens.weight", H5P_DEFAULT);
  H5Lcreate_external("../other/stage_000_of_001.h5", "model.embed_tokens.weight", m,
                     "model.embed_tokens.weight", H5P_DEFAULT, H5P_DEFAULT);
}
static void ck_link_other_object(hid_t m, hid_t s) {
  H5Ldelete(m, "model.embed_tokens.weight", H5P_DEFAULT);
  H5Lcreate_external("stage_000_of_001.h5", "model.embed_tokens.weight.adam_v", m,
                     "model.embed_tokens.weight", H5P_DEFAULT, H5P_DEFAULT);
}
static void ck_stage_link(hid_t m, hid_t s) {   /* the stage file itself links elsewhere */
  H5Ldelete(s, "model.embed_tokens.weight", H5P_DEFAULT);
  H5Lcreate_external("/tmp/x.h5", "w", s, "model.embed_tokens.weight", H5P_DEFAULT, H5P_DEFAULT);
}
static void ck_tensor_f64(hid_t m, hid_t s) {
  const double v[6] = {1, 2, 3, 4, 5, 6};
  hsize_t d[2] = {2, 3};
  replace_dataset(s, "model.embed_tokens.weight", H5T_IEEE_F64LE, 2, d, v, 0);
}
static void ck_job_2d(hid_t m, hid_t s) {
  const uint8_t v[4] = {1, 2, 3, 4};
  hsize_t d[2] = {2, 2};
  replace_dataset(m, "job.pb", H5T_STD_U8LE, 2, d, v, 0);
}

static void test_checkpoints(void) {
  write_checkpoint();
  struct ckpt *c = NULL;
  CHECK(ckpt_open(&c, ckpt_with("ck_ok", ck_none), err, sizeof err) == 0 &&
        ckpt_get_state(c)->step == 7 && ckpt_get_state(c)->job_len == 3,
        "a valid checkpoint opens: %s", err);
  ckpt_close(c);
  const struct {
    const char *what;
    void (*damage)(hid_t, hid_t);
    int at_read;   /* refused by ckpt_read rather than ckpt_open */
    const char *a, *b;
  } cases[] = {
    {"config/hidden_size an array", ck_hidden_array, 0, "'hidden_size' must be a scalar", "[32]"},
    {"config/hidden_size 2^40", ck_hidden_huge, 0, "'hidden_size' is 1099511627776", "allowed: 1 to 2147483647"},
    {"rms_norm_eps NaN", ck_eps_nan, 0, "attribute 'rms_norm_eps' is", "must be a finite number"},
    {"step edited", ck_step_edited, 0, "fails its checksum state_sha256", NULL},
    {"a link out of the step directory", ck_link_outside, 0, "external link 'model.embed_tokens.weight' points to '../other/stage_000_of_001.h5'", "same step directory"},
    {"a link to another tensor", ck_link_other_object, 0, "points to object 'model.embed_tokens.weight.adam_v'", NULL},
    {"job.pb 2-D", ck_job_2d, 0, "'job.pb' is a 2-D array", "1-D"},
    {"an external link in a stage file", ck_stage_link, 1, "'model.embed_tokens.weight' is an external link", "stage_000_of_001.h5"},
    {"a float64 tensor", ck_tensor_f64, 1, "'model.embed_tokens.weight' is float64", "must be float32"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char name[64];
    snprintf(name, sizeof name, "ck_bad%zu", i);
    const char *d = ckpt_with(name, cases[i].damage);
    err[0] = 0;
    int rc = ckpt_open(&c, d, err, sizeof err);
    if (cases[i].at_read && rc == 0) {
      float buf[6];
      const int64_t shape[2] = {2, 3};
      rc = ckpt_read(c, "model.embed_tokens.weight", CKPT_WEIGHTS, 2, shape, buf, err, sizeof err);
      ckpt_close(c);
    } else if (rc == 0) {
      ckpt_close(c);
    }
    CHECK(rc == -1 && has(err, d, NULL) && has(err, cases[i].a, cases[i].b),
          "checkpoint with %s: refused saying '%s': got rc %d, '%s'", cases[i].what, cases[i].a,
          rc, err);
  }
}

/* ---- tokenizer.json ------------------------------------------------------------------------ */

static void test_tokenizer_files(void) {
  const char *tiny = "tests/fuzz/corpus/fuzz_tokenizer/tiny.json";
  CHECK(tokenizer_validate(tiny, err, sizeof err) == 0, "the tiny tokenizer validates: %s", err);
  size_t len;
  char *text = read_file(tiny, &len);
  if (!text) die("%s: cannot read", tiny);
  const struct {
    const char *what, *from, *to, *a;
  } cases[] = {
    {"a huge id", "\"He\": 256", "\"He\": 2147483646", "not an id from 0 to 16777215"},
    {"truncated JSON", "\"merges\"", "", "line 1 column"},
    {"a merge of unknown tokens", "[\"H\", \"e\"]", "[\"H\", \"zz\"]", "model.merges[0]"},
    {"a bad regex", "\"Regex\": \"", "\"Regex\": \"(", "pre_tokenizer Split regex"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    const char *at = strstr(text, cases[i].from);
    CHECK(at != NULL, "the tiny tokenizer holds %s", cases[i].from);
    if (!at) continue;
    const char *path = in_dir("tok.json");
    FILE *f = fopen(path, "w");
    fwrite(text, 1, (size_t)(at - text), f);
    fputs(cases[i].to, f);
    if (cases[i].to[0]) fputs(at + strlen(cases[i].from), f);
    fclose(f);
    err[0] = 0;
    CHECK(tokenizer_validate(path, err, sizeof err) == -1 && has(err, path, cases[i].a),
          "tokenizer.json with %s: refused saying '%s': '%s'", cases[i].what, cases[i].a, err);
  }
  free(text);
}

/* ---- NVFP4 dumps (qwen3-nvfp4 quantize) ---------------------------------------------------- */

static void put_string(hid_t loc, const char *name, const char *value) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, strlen(value) + 1);
  replace_attr(loc, name, t, 0, 1, value);
  H5Tclose(t);
}

/* a 16 x 32 tensor "t" in 1x16 blocks, damaged by `damage` */
static const char *dump_with(const char *name, void (*damage)(hid_t g)) {
  const char *path = in_dir(name);
  hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hid_t g = H5Gcreate2(f, "t", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  const int64_t shape[2] = {16, 32};
  const float one = 1.0f;
  static uint8_t codes[16 * 16], scales[16 * 2];
  const hsize_t cd[2] = {16, 16}, sd[2] = {16, 2};
  replace_attr(g, "shape", H5T_NATIVE_INT64, 1, 2, shape);
  put_string(g, "block", "1x16");
  put_string(g, "dtype", "F32");
  replace_attr(g, "amax", H5T_NATIVE_FLOAT, 0, 1, &one);
  replace_attr(g, "tensor_scale_enc", H5T_NATIVE_FLOAT, 0, 1, &one);
  replace_attr(g, "tensor_scale_dec", H5T_NATIVE_FLOAT, 0, 1, &one);
  replace_dataset(g, "codes", H5T_NATIVE_UINT8, 2, cd, codes, 0);
  replace_dataset(g, "scales", H5T_NATIVE_UINT8, 2, sd, scales, 0);
  damage(g);
  H5Gclose(g);
  H5Fclose(f);
  return path;
}

static void d_none(hid_t g) { (void)g; }
static void d_shape_3(hid_t g) {   /* three values where the reader holds two */
  const int64_t shape[3] = {16, 32, 7};
  replace_attr(g, "shape", H5T_NATIVE_INT64, 1, 3, shape);
}
static void d_shape_scalar(hid_t g) {
  const int64_t v = 16;
  replace_attr(g, "shape", H5T_NATIVE_INT64, 0, 1, &v);
}
static void d_shape_i32(hid_t g) {
  const int32_t shape[2] = {16, 32};
  replace_attr(g, "shape", H5T_NATIVE_INT32, 1, 2, shape);
}
static void d_codes_u16(hid_t g) {
  static uint16_t codes[16 * 16];
  const hsize_t cd[2] = {16, 16};
  replace_dataset(g, "codes", H5T_NATIVE_UINT16, 2, cd, codes, 0);
}
static void d_scales_short(hid_t g) {
  static uint8_t scales[8 * 2];
  const hsize_t sd[2] = {8, 2};
  replace_dataset(g, "scales", H5T_NATIVE_UINT8, 2, sd, scales, 0);
}

static void test_dumps(void) {
  struct nvfp4_dump_tensor t;
  CHECK(nvfp4_dump_read(dump_with("dump_ok.h5", d_none), "t", &t, err, sizeof err) == 0 &&
        t.rows == 16 && t.cols == 32, "a valid dump reads: %s", err);
  nvfp4_dump_tensor_free(&t);
  static const struct {
    const char *what;
    void (*damage)(hid_t);
    const char *a, *b;
  } cases[] = {
    {"a shape of three values", d_shape_3, "shape attribute", "two 8-byte integers"},
    {"a scalar shape", d_shape_scalar, "shape attribute", "two 8-byte integers"},
    {"a shape of 4-byte integers", d_shape_i32, "shape attribute", "two 8-byte integers"},
    {"uint16 codes", d_codes_u16, "codes", NULL},
    {"scales of the wrong shape", d_scales_short, "scales", "[8, 2]"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char name[64];
    snprintf(name, sizeof name, "dump_%zu.h5", i);
    const char *path = dump_with(name, cases[i].damage);
    int rc = nvfp4_dump_read(path, "t", &t, err, sizeof err);
    CHECK(rc == -1 && has(err, path, NULL) && has(err, cases[i].a, cases[i].b),
          "NVFP4 dump with %s: refused naming '%s': '%s'", cases[i].what, cases[i].a, err);
  }
}

int main(void) {
  const char *dir = checks_dir("test_file_readers");
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
  test_shards();
  test_checkpoints();
  test_tokenizer_files();
  test_dumps();
  return checks_report_in(dir);
}
