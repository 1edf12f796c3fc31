/* data/ckpt_file and qwen3-convert: a two-stage checkpoint written and read back bit for bit;
 * the writer's chunks and checksums byte for byte as HDF5's Fletcher32 filter writes them; the
 * commit protocol (keep_last, stale .tmp directories, an interrupted save leaves `latest`
 * loadable); damage refused naming the file and the tensor (a flipped byte, a truncated or
 * missing stage file, another model shape); and the Hugging Face -> checkpoint -> Hugging Face
 * round trip through the qwen3-convert program, bit-exact in fp32, sharded or not. */
#define _XOPEN_SOURCE 700
#include <hdf5.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/safetensors.h"
#include "tests/check.h"

static const char *g_dir;   /* checks_dir's */
static char err[2048];


/* ---- a synthetic two-stage checkpoint ------------------------------------------------------ */

struct tensor {
  const char *name;
  int stage, ndim;
  int64_t shape[2];
};

static const struct tensor TENSORS[] = {
    {"model.embed_tokens.weight", 0, 2, {8, 4}},
    {"model.layers.0.input_layernorm.weight", 0, 1, {4, 1}},
    {"model.layers.1.mlp.up_proj.weight", 1, 2, {600, 4}},
    {"model.norm.weight", 1, 1, {4, 1}},
};
#define N_TENSORS (sizeof TENSORS / sizeof TENSORS[0])

static const struct qwen3_config CFG = {.hidden_size = 4, .num_layers = 2, .num_heads = 2,
                                        .num_kv_heads = 1, .head_dim = 2,
                                        .intermediate_size = 600, .vocab_size = 8,
                                        .rope_theta = 1e6, .rms_norm_eps = 1e-6,
                                        .tie_embeddings = 1, .max_seq_len = 64};

/* Values that tell step, tensor, part and element apart. */
static float value(int64_t step, size_t t, int part, size_t i) {
  return (float)step * 1000.0f + (float)t * 100.0f + (float)part * 10.0f + (float)i * 0.001f;
}

static size_t numel(const struct tensor *t) { return (size_t)(t->shape[0] * t->shape[1]); }

static void fill(float *buf, int64_t step, size_t t, int part) {
  for (size_t i = 0; i < numel(&TENSORS[t]); i++) buf[i] = value(step, t, part, i);
}

/* Writes the stage files of `step` (all, or only stage 0 with only_first) into the .tmp dir. */
static int write_stages(const char *root, int64_t step, int only_first) {
  char tmp[4200], file[64], path[4300];
  float *part[3];
  for (int p = 0; p < 3; p++) part[p] = xmalloc(2400 * sizeof(float));
  if (ckpt_begin(root, step, err, sizeof err) != 0) return -1;
  ckpt_step_path(tmp, sizeof tmp, root, step, 1);
  for (int s = 0; s < (only_first ? 1 : 2); s++) {
    ckpt_stage_file(file, sizeof file, s, 2);
    snprintf(path, sizeof path, "%s/%s", tmp, file);
    struct ckpt_stage_writer *w;
    if (ckpt_stage_create(&w, path, s, 2, err, sizeof err) != 0) return -1;
    for (size_t t = 0; t < N_TENSORS; t++) {
      if (TENSORS[t].stage != s) continue;
      for (int p = 0; p < 3; p++) fill(part[p], step, t, p);
      if (ckpt_stage_put(w, TENSORS[t].name, TENSORS[t].ndim, TENSORS[t].shape, part[0], part[1],
                         part[2], err, sizeof err) != 0)
        return -1;
    }
    if (ckpt_stage_finish(w, err, sizeof err) != 0) return -1;
  }
  for (int p = 0; p < 3; p++) free(part[p]);
  return 0;
}

static const uint8_t JOB[] = {0x0a, 0x04, 't', 'i', 'n', 'y', 0x00, 0xff};

static int save(const char *root, int64_t step, int keep_last) {
  if (write_stages(root, step, 0) != 0) return -1;
  struct ckpt_state s = {.step = step, .samples_seen = (uint64_t)step * 16,
                         .tokens_seen = (uint64_t)step * 1000, .n_stages = 2, .config = CFG,
                         .job = JOB, .job_len = sizeof JOB};
  return ckpt_commit(root, &s, keep_last, err, sizeof err);
}

/* Every part of every tensor reads back bit for bit, with the state. */
static int matches(const char *path, int64_t step) {
  struct ckpt *c;
  if (ckpt_open(&c, path, err, sizeof err) != 0) return 0;
  const struct ckpt_state *s = ckpt_get_state(c);
  int ok = s->step == step && s->samples_seen == (uint64_t)step * 16 &&
           s->tokens_seen == (uint64_t)step * 1000 && s->n_stages == 2 &&
           s->job_len == sizeof JOB && !memcmp(s->job, JOB, sizeof JOB) &&
           !memcmp(&s->config, &CFG, sizeof CFG) && ckpt_count(c) == N_TENSORS;
  float got[2400], want[2400];
  for (size_t t = 0; ok && t < N_TENSORS; t++) {
    ok = !strcmp(ckpt_name_at(c, t), TENSORS[t].name);
    int ndim;
    int64_t shape[2];
    ok = ok && ckpt_shape(c, TENSORS[t].name, &ndim, shape, err, sizeof err) == 0 &&
         ndim == TENSORS[t].ndim && shape[0] == TENSORS[t].shape[0];
    for (int p = 0; ok && p < 3; p++) {
      fill(want, step, t, p);
      ok = ckpt_read(c, TENSORS[t].name, (enum ckpt_part)p, TENSORS[t].ndim, TENSORS[t].shape,
                     got, err, sizeof err) == 0 &&
           !memcmp(got, want, numel(&TENSORS[t]) * sizeof(float));
    }
  }
  ckpt_close(c);
  return ok;
}

static int is_dir(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static void test_round_trip_and_commit(void) {
  const char *root = in_dir("run");
  CHECK(save(root, 1, 2) == 0, "save step 1: %s", err);
  CHECK(matches(root, 1), "step 1 reads back through `latest`: %s", err);
  CHECK(matches(in_dir("run/step_00000001"), 1), "step 1 reads back from its directory: %s", err);
  CHECK(save(root, 2, 2) == 0 && save(root, 3, 2) == 0, "save steps 2, 3: %s", err);
  CHECK(!is_dir(in_dir("run/step_00000001")) && is_dir(in_dir("run/step_00000002")),
        "keep_last 2 removed step 1 only");
  CHECK(matches(root, 3), "latest is step 3: %s", err);

  /* a save killed after its first stage file: nothing committed, step 3 still loads */
  CHECK(write_stages(root, 4, 1) == 0, "half a save of step 4: %s", err);
  CHECK(matches(root, 3), "an interrupted save leaves step 3 loadable: %s", err);
  struct ckpt_state s4 = {.step = 4, .n_stages = 2, .config = CFG};
  CHECK(ckpt_commit(root, &s4, 2, err, sizeof err) == -1 &&
            strstr(err, "stage_001_of_002.h5") && strstr(err, "missing"),
        "commit refuses a missing stage file: %s", err);
  CHECK(matches(root, 3) && !is_dir(in_dir("run/step_00000004")),
        "a refused commit leaves latest at step 3: %s", err);

  /* the stale .tmp of step 4 is replaced by the next save of step 4; one of another step goes */
  mkdir(in_dir("run/step_00000009.tmp"), 0755);
  CHECK(save(root, 4, 2) == 0 && matches(root, 4), "save over a stale .tmp: %s", err);
  CHECK(!is_dir(in_dir("run/step_00000009.tmp")) && !is_dir(in_dir("run/step_00000004.tmp")),
        "stale .tmp directories removed after the commit");
  /* the same step again (a run resumed from an earlier checkpoint) */
  CHECK(save(root, 4, 0) == 0 && matches(root, 4) && !is_dir(in_dir("run/step_00000004.old")),
        "saving a step again replaces it: %s", err);

  char out[4200];
  CHECK(ckpt_find_latest(in_dir("nothing-here"), out, sizeof out, err, sizeof err) == 0 && !out[0],
        "no latest: a fresh run");
  CHECK(ckpt_resolve(in_dir("run/step_00000003"), out, sizeof out, err, sizeof err) == 0,
        "a step directory resolves to itself: %s", err);
  CHECK(ckpt_resolve(g_dir, out, sizeof out, err, sizeof err) == -1 &&
            strstr(err, "not a checkpoint"),
        "a directory without model.h5 or latest is refused: %s", err);
  struct ckpt *c = NULL;
  mkdir(in_dir("run2"), 0755);
  CHECK(symlink("step_00000007", in_dir("run2/latest")) == 0 &&
            ckpt_open(&c, in_dir("run2"), err, sizeof err) == -1 &&
            strstr(err, "run2/latest") && strstr(err, "step_00000007"),
        "a dangling latest is refused: %s", err);
}

/* ---- the writer's chunks against HDF5's own ------------------------------------------------ */

/* ckpt_stage_put computes the Fletcher32 checksums itself and writes whole chunks: every chunk
 * it stores, checksum and padding included, must be byte for byte the one HDF5's filter stores
 * for the same data and chunking (HDF5's reader would also accept a byte-swapped checksum, so a
 * read-back alone would not tell). */
static void test_chunks_as_hdf5_writes_them(void) {
  const struct {
    const char *name;
    int ndim;
    int64_t shape[2];
    int pattern;   /* 0 random bits, 1 zeros, 2 every byte 0xff (sums of 0 mod 65535) */
  } cases[] = {
      {"random.padded_last_chunk", 2, {1049, 1000}, 0},   /* 2 chunks of 525 rows */
      {"zeros", 2, {600, 4}, 1},
      {"all_ff", 1, {70, 1}, 2},
      {"seven", 1, {7, 1}, 0},
  };
  const char *ours = in_dir("chunks.h5"), *ref = in_dir("chunks_hdf5.h5");
  size_t max = 1049 * 1000;
  float *data = xmalloc(max * sizeof(float));
  uint8_t *a = xmalloc(4 * max + 64), *b = xmalloc(4 * max + 64);
  struct ckpt_stage_writer *w;
  CHECK(ckpt_stage_create(&w, ours, 0, 1, err, sizeof err) == 0, "create: %s", err);
  hid_t rf = H5Fcreate(ref, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  uint32_t x = 99;
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    size_t n = (size_t)(cases[k].shape[0] * cases[k].shape[1]);
    for (size_t i = 0; i < n; i++) {
      x = x * 1664525u + 1013904223u;
      uint32_t bits = cases[k].pattern == 0 ? x : cases[k].pattern == 1 ? 0 : 0xffffffffu;
      memcpy(&data[i], &bits, 4);
    }
    CHECK(ckpt_stage_put(w, cases[k].name, cases[k].ndim, cases[k].shape, data, NULL, NULL, err,
                         sizeof err) == 0,
          "put %s: %s", cases[k].name, err);
  }
  CHECK(ckpt_stage_finish(w, err, sizeof err) == 0, "finish: %s", err);
  hid_t of = H5Fopen(ours, H5F_ACC_RDONLY, H5P_DEFAULT);
  x = 99;
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    size_t n = (size_t)(cases[k].shape[0] * cases[k].shape[1]);
    for (size_t i = 0; i < n; i++) {   /* the same values again */
      x = x * 1664525u + 1013904223u;
      uint32_t bits = cases[k].pattern == 0 ? x : cases[k].pattern == 1 ? 0 : 0xffffffffu;
      memcpy(&data[i], &bits, 4);
    }
    /* HDF5's filter, with the chunking the writer chose */
    hid_t ods = H5Dopen2(of, cases[k].name, H5P_DEFAULT);
    hid_t dcpl = H5Dget_create_plist(ods);
    hsize_t chunk[2], dims[2] = {(hsize_t)cases[k].shape[0], (hsize_t)cases[k].shape[1]};
    int ndim = H5Pget_chunk(dcpl, 2, chunk);
    hid_t space = H5Screate_simple(ndim, dims, NULL);
    hid_t rds = H5Dcreate2(rf, cases[k].name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl,
                           H5P_DEFAULT);
    CHECK(ndim == cases[k].ndim && rds >= 0 &&
              H5Dwrite(rds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0,
          "%s: the same dataset through HDF5's filter", cases[k].name);
    hsize_t n_ours = 0, n_ref = 0;
    hid_t ospace = H5Dget_space(ods), rspace = H5Dget_space(rds);
    H5Dget_num_chunks(ods, ospace, &n_ours);
    H5Dget_num_chunks(rds, rspace, &n_ref);
    int same = n_ours == n_ref && n_ours == (dims[0] + chunk[0] - 1) / chunk[0];
    for (hsize_t c = 0; same && c < n_ours; c++) {
      hsize_t offset[2], size_a = 0, size_b = 0;
      unsigned mask;
      haddr_t addr;
      uint32_t fa = 1, fb = 1;
      same = H5Dget_chunk_info(ods, ospace, c, offset, &mask, &addr, &size_a) >= 0 &&
             H5Dget_chunk_storage_size(rds, offset, &size_b) >= 0 && size_a == size_b &&
             size_a <= 4 * max + 64 && H5Dread_chunk(ods, H5P_DEFAULT, offset, &fa, a) >= 0 &&
             H5Dread_chunk(rds, H5P_DEFAULT, offset, &fb, b) >= 0 && fa == 0 && fb == 0 &&
             !memcmp(a, b, size_a);
    }
    CHECK(same, "%s: %llu chunks of %llu rows, each byte for byte as HDF5's filter writes it",
          cases[k].name, (unsigned long long)n_ours, (unsigned long long)chunk[0]);
    H5Sclose(ospace);
    H5Sclose(rspace);
    H5Sclose(space);
    H5Pclose(dcpl);
    H5Dclose(rds);
    H5Dclose(ods);
  }
  H5Fclose(of);
  H5Fclose(rf);
  free(data);
  free(a);
  free(b);
}

/* ---- damage -------------------------------------------------------------------------------- */

static int copy_file(const char *from, const char *to) {
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "cp -r '%s' '%s'", from, to);
  return system(cmd);
}

/* Fails to read `tensor` (of the copy `dir` of step 4) with a message naming `file` and it. */
static void expect_read_fails(const char *what, const char *dir, const char *file,
                              const char *tensor, int64_t cols, const char *also) {
  struct ckpt *c;
  const struct tensor *t = NULL;
  for (size_t i = 0; i < N_TENSORS; i++)
    if (!strcmp(TENSORS[i].name, tensor)) t = &TENSORS[i];
  float buf[2400];
  int64_t shape[2] = {t->shape[0], cols};
  int rc = ckpt_open(&c, dir, err, sizeof err);
  if (rc == 0) rc = ckpt_read(c, tensor, CKPT_WEIGHTS, t->ndim, shape, buf, err, sizeof err);
  CHECK(rc == -1 && strstr(err, file) && strstr(err, tensor) && strstr(err, also),
        "%s: refused naming %s and %s: %s", what, file, tensor, err);
  ckpt_close(c);
}

static void test_damage(void) {
  const char *good = in_dir("run/step_00000004");
  char dir[600], path[700];

  /* a flipped byte inside the data of a tensor: Fletcher32 */
  snprintf(dir, sizeof dir, "%s", in_dir("flipped"));
  copy_file(good, dir);
  snprintf(path, sizeof path, "%s/stage_001_of_002.h5", dir);
  hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t ds = H5Dopen2(f, "model.layers.1.mlp.up_proj.weight", H5P_DEFAULT);
  hsize_t offset[2];
  unsigned mask;
  haddr_t addr = 0;
  hsize_t size = 0;
  hid_t space = H5Dget_space(ds);
  herr_t ok = H5Dget_chunk_info(ds, space, 0, offset, &mask, &addr, &size);
  H5Sclose(space);
  H5Dclose(ds);
  H5Fclose(f);
  CHECK(ok >= 0 && size > 100, "found the first chunk of up_proj (%llu bytes)",
        (unsigned long long)size);
  FILE *fp = fopen(path, "r+b");
  unsigned char byte;
  fseek(fp, (long)addr + 77, SEEK_SET);
  byte = (unsigned char)fgetc(fp);
  fseek(fp, (long)addr + 77, SEEK_SET);
  fputc(byte ^ 0x10, fp);
  fclose(fp);
  expect_read_fails("a flipped byte", dir, "stage_001_of_002.h5",
                    "model.layers.1.mlp.up_proj.weight", 4, "checksum");
  CHECK(matches(good, 4), "the original is untouched: %s", err);

  /* a truncated stage file */
  snprintf(dir, sizeof dir, "%s", in_dir("truncated"));
  copy_file(good, dir);
  snprintf(path, sizeof path, "%s/stage_000_of_002.h5", dir);
  struct stat st;
  stat(path, &st);
  CHECK(truncate(path, st.st_size / 2) == 0, "truncate %s", path);
  expect_read_fails("a truncated stage file", dir, "stage_000_of_002.h5",
                    "model.embed_tokens.weight", 4, "truncated");

  /* a missing stage file */
  snprintf(dir, sizeof dir, "%s", in_dir("missing"));
  copy_file(good, dir);
  snprintf(path, sizeof path, "%s/stage_001_of_002.h5", dir);
  unlink(path);
  expect_read_fails("a missing stage file", dir, "stage_001_of_002.h5", "model.norm.weight", 1,
                    "missing");

  /* another model shape: a tensor of another shape, and a tensor the checkpoint lacks */
  expect_read_fails("another shape", good, "stage_000_of_002.h5", "model.embed_tokens.weight",
                    5, "[8, 5]");
  struct ckpt *c;
  float buf[16];
  int64_t shape[2] = {4, 1};
  int rc = ckpt_open(&c, good, err, sizeof err);
  if (rc == 0)
    rc = ckpt_read(c, "model.layers.7.input_layernorm.weight", CKPT_WEIGHTS, 1, shape, buf, err,
                   sizeof err);
  CHECK(rc == -1 && strstr(err, "model.h5") && strstr(err, "model.layers.7.input_layernorm"),
        "a tensor the checkpoint lacks is refused naming it: %s", err);
  ckpt_close(c);
}

/* ---- qwen3-convert round trip -------------------------------------------------------------- */

static const struct qwen3_config HF_CFG = {.hidden_size = 8, .num_layers = 1, .num_heads = 2,
                                           .num_kv_heads = 1, .head_dim = 4,
                                           .intermediate_size = 12, .vocab_size = 16,
                                           .rope_theta = 5e6, .rms_norm_eps = 1e-6,
                                           .tie_embeddings = 0, .max_seq_len = 128};

struct hf_tensor {
  char name[96];
  int ndim;
  int64_t shape[2];
  float *data;
};

static int make_hf_tensors(struct hf_tensor *t) {
  const struct {
    const char *name;
    int rows, cols;
  } spec[] = {{"lm_head.weight", 16, 8},
              {"model.embed_tokens.weight", 16, 8},
              {"model.layers.0.input_layernorm.weight", 8, 0},
              {"model.layers.0.mlp.down_proj.weight", 8, 12},
              {"model.layers.0.mlp.gate_proj.weight", 12, 8},
              {"model.layers.0.mlp.up_proj.weight", 12, 8},
              {"model.layers.0.post_attention_layernorm.weight", 8, 0},
              {"model.layers.0.self_attn.k_norm.weight", 4, 0},
              {"model.layers.0.self_attn.k_proj.weight", 4, 8},
              {"model.layers.0.self_attn.o_proj.weight", 8, 8},
              {"model.layers.0.self_attn.q_norm.weight", 4, 0},
              {"model.layers.0.self_attn.q_proj.weight", 8, 8},
              {"model.layers.0.self_attn.v_proj.weight", 4, 8},
              {"model.norm.weight", 8, 0}};
  int n = (int)(sizeof spec / sizeof spec[0]);
  uint32_t x = 12345;
  for (int i = 0; i < n; i++) {
    snprintf(t[i].name, sizeof t[i].name, "%s", spec[i].name);
    t[i].ndim = spec[i].cols ? 2 : 1;
    t[i].shape[0] = spec[i].rows;
    t[i].shape[1] = spec[i].cols ? spec[i].cols : 1;
    size_t m = (size_t)(t[i].shape[0] * t[i].shape[1]);
    t[i].data = xmalloc(m * sizeof(float));
    for (size_t j = 0; j < m; j++) {   /* every bit pattern matters: random mantissas */
      x = x * 1664525u + 1013904223u;
      uint32_t bits = (x & 0x807fffffu) | (0x3c000000u + ((x >> 4) & 0x03000000u));
      memcpy(&t[i].data[j], &bits, 4);
    }
  }
  t[2].data[0] = -0.0f;
  t[2].data[1] = 1e-40f;   /* subnormal */
  t[2].data[2] = 3.0e38f;
  return n;
}

/* Writes HF_DIR as two shards with an index, as transformers does for big models. */
static void write_hf(const char *dir, struct hf_tensor *t, int n) {
  mkdir(dir, 0755);
  char path[700];
  snprintf(path, sizeof path, "%s/config.json", dir);
  CHECK(hf_config_write(path, &HF_CFG, "float32", err, sizeof err) == 0, "config.json: %s", err);
  json_t *map = json_object();
  for (int s = 0; s < 2; s++) {
    struct st_write_tensor w[16];
    int k = 0;
    char file[64];
    snprintf(file, sizeof file, "model-%05d-of-00002.safetensors", s + 1);
    for (int i = s; i < n; i += 2) {
      w[k++] = (struct st_write_tensor){t[i].name, ST_F32, t[i].ndim,
                                        {t[i].shape[0], t[i].shape[1]}, t[i].data, NULL};
      json_object_set_new(map, t[i].name, json_string(file));
    }
    snprintf(path, sizeof path, "%s/%s", dir, file);
    CHECK(st_write(path, w, (size_t)k, 1, err, sizeof err) == 0, "write %s: %s", path, err);
  }
  json_t *index = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", map);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  json_dump_file(index, path, JSON_INDENT(2));
  json_decref(index);
}

/* HF_DIR holds exactly the tensors t, bit for bit (bf16: rounded). */
static int same_model(const char *dir, const struct hf_tensor *t, int n, int bf16) {
  struct st_model *m;
  if (st_model_open(&m, dir, err, sizeof err) != 0) return 0;
  int ok = (int)st_model_count(m) == n;
  for (int i = 0; ok && i < n; i++) {
    const struct st_tensor *s = st_model_find(m, t[i].name);
    size_t k = (size_t)(t[i].shape[0] * t[i].shape[1]);
    ok = s && s->dtype == (bf16 ? ST_BF16 : ST_F32) && s->ndim == t[i].ndim &&
         s->shape[0] == t[i].shape[0] && s->numel == k;
    float *got = xmalloc(k * sizeof(float));
    ok = ok && st_read_f32(s, got, k, err, sizeof err) == 0;
    for (size_t j = 0; ok && j < k; j++) {
      float want = bf16 ? st_bf16_to_f32(st_f32_to_bf16(t[i].data[j])) : t[i].data[j];
      ok = !memcmp(&got[j], &want, 4);
      if (!ok) snprintf(err, sizeof err, "%s[%zu] differs", t[i].name, j);
    }
    free(got);
  }
  st_model_close(m);
  struct qwen3_config cfg;
  char path[700];
  snprintf(path, sizeof path, "%s/config.json", dir);
  ok = ok && hf_config_load(&cfg, path, err, sizeof err) == 0 &&
       !memcmp(&cfg, &HF_CFG, sizeof cfg);
  return ok;
}

static char g_convert[4096];

static int convert(const char *args) {
  char cmd[8192];
  snprintf(cmd, sizeof cmd, "'%s' %s >>'%s/convert.log' 2>&1", g_convert, args, g_dir);
  return system(cmd);
}

/* 1 if the conversion log holds `what` */
static int log_has(const char *what) {
  char path[4200];
  snprintf(path, sizeof path, "%s/convert.log", g_dir);
  size_t len;
  char *text = read_file(path, &len);
  int found = text && strstr(text, what);
  free(text);
  return found;
}

static void test_convert(void) {
  struct hf_tensor t[16];
  int n = make_hf_tensors(t);
  char hf[600], ck[600], back[600], args[4096];
  snprintf(hf, sizeof hf, "%s", in_dir("hf"));
  snprintf(ck, sizeof ck, "%s", in_dir("converted"));
  write_hf(hf, t, n);

  snprintf(args, sizeof args, "hf2h5 '%s' '%s'", hf, ck);
  CHECK(convert(args) == 0, "qwen3-convert %s", args);
  /* into a root that holds a checkpoint already: refused, latest stays */
  CHECK(convert(args) != 0 && log_has("already holds a checkpoint (latest -> step_00000000)"),
        "hf2h5 into an existing checkpoint root is refused");
  /* a model whose tensors disagree with its config.json: refused naming the tensor */
  char bad[600];
  snprintf(bad, sizeof bad, "%s", in_dir("hf-missing"));
  write_hf(bad, t + 1, n - 1);
  snprintf(args, sizeof args, "hf2h5 '%s' '%s'", bad, in_dir("never"));
  CHECK(convert(args) != 0 && log_has("is missing; config.json describes a Qwen3 model"),
        "hf2h5 of a model missing tensor %s is refused naming it", t[0].name);
  CHECK(log_has(t[0].name), "the refusal names %s", t[0].name);
  struct ckpt *c;
  CHECK(ckpt_open(&c, ck, err, sizeof err) == 0, "the converted checkpoint opens: %s", err);
  if (c) {
    const struct ckpt_state *s = ckpt_get_state(c);
    CHECK(s->step == 0 && s->n_stages == 1 && (int)ckpt_count(c) == n && !s->job &&
              strstr(ckpt_dir(c), "step_00000000"),
          "step 0, one stage, %d tensors", n);
    float v[96];
    int64_t shape[2] = {12, 8};
    int zero = ckpt_read(c, "model.layers.0.mlp.up_proj.weight", CKPT_ADAM_V, 2, shape, v, err,
                         sizeof err) == 0;
    for (int i = 0; zero && i < 96; i++) zero = v[i] == 0;
    CHECK(zero, "AdamW moments start at zero: %s", err);
    ckpt_close(c);
  }

  snprintf(back, sizeof back, "%s", in_dir("back-fp32"));
  snprintf(args, sizeof args, "h52hf '%s' '%s' --dtype fp32", ck, back);
  CHECK(convert(args) == 0 && access(in_dir("back-fp32/model.safetensors"), F_OK) == 0,
        "qwen3-convert %s: one file", args);
  CHECK(same_model(back, t, n, 0), "HF -> checkpoint -> HF is bit-exact in fp32: %s", err);

  snprintf(back, sizeof back, "%s", in_dir("back-sharded"));
  snprintf(args, sizeof args, "h52hf '%s/step_00000000' '%s' --dtype fp32 --max-shard-size 1000",
           ck, back);
  CHECK(convert(args) == 0 &&
            access(in_dir("back-sharded/model.safetensors.index.json"), F_OK) == 0,
        "qwen3-convert %s: shards with an index", args);
  CHECK(same_model(back, t, n, 0), "sharded: bit-exact in fp32: %s", err);

  snprintf(back, sizeof back, "%s", in_dir("back-bf16"));
  snprintf(args, sizeof args, "h52hf '%s' '%s'", ck, back);
  CHECK(convert(args) == 0, "qwen3-convert %s", args);
  CHECK(same_model(back, t, n, 1), "bf16 by default, rounded to nearest even: %s", err);

  snprintf(args, sizeof args, "h52hf '%s' '%s'", ck, back);
  CHECK(convert(args) != 0, "h52hf refuses a directory that already holds a model");
  snprintf(args, sizeof args, "hf2h5 '%s' '%s'", g_dir, in_dir("nothing"));
  CHECK(convert(args) != 0 && access(in_dir("nothing/latest"), F_OK) != 0,
        "hf2h5 without config.json fails and commits nothing");
  for (int i = 0; i < n; i++) free(t[i].data);
}

int main(void) {
  g_dir = checks_dir("qwen3-ckpt");
  test_program(g_convert, sizeof g_convert, "qwen3-convert");
  test_round_trip_and_commit();
  test_chunks_as_hdf5_writes_them();
  test_damage();
  test_convert();
  return checks_report_in(g_dir);
}
