/* qwen3-convert: Hugging Face model directories <-> checkpoints (DESIGN.md "Files on disk").
 *
 *   qwen3-convert hf2h5 HF_DIR CKPT_DIR
 *     config.json + model.safetensors (or its shards and index) -> CKPT_DIR/step_00000000/, a
 *     one-stage checkpoint with zero AdamW moments, and CKPT_DIR/latest pointing at it. A job
 *     starts from it with init.checkpoint (weights) or checkpoint.resume.
 *   qwen3-convert h52hf CKPT_DIR HF_DIR [--dtype bf16|fp32] [--max-shard-size BYTES]
 *     a checkpoint (a step directory, or a checkpoint directory whose `latest` is followed) ->
 *     HF_DIR/config.json and model.safetensors, or model-0000N-of-0000M.safetensors with
 *     model.safetensors.index.json when the weights exceed the shard size (default 5 GB, as
 *     transformers' save_pretrained). fp32 is bit-exact; bf16 rounds to nearest even.
 *
 * Tensors are converted one at a time (h52hf: one shard at a time), so memory stays near the
 * largest tensor (shard). A failed conversion leaves no whole-looking output: hf2h5 commits
 * the checkpoint only at the end; h52hf writes config.json, without which no loader takes the
 * directory for a model, last. */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/safetensors.h"

static void usage(void) {
  fprintf(stderr,
          "usage: qwen3-convert hf2h5 HF_DIR CKPT_DIR\n"
          "       qwen3-convert h52hf CKPT_DIR HF_DIR [--dtype bf16|fp32] "
          "[--max-shard-size BYTES]\n");
  exit(2);
}

/* On a terminal one line redrawn in place; in a log a line at every tenth of the bytes. */
static void progress(const char *what, size_t done, size_t total, double bytes, double all) {
  static int last_tenth;
  int tenth = all > 0 ? (int)(10 * bytes / all) : 10;
  if (isatty(2)) {
    fprintf(stderr, "\r%s: %zu/%zu tensors, %.2f/%.2f GB", what, done, total, bytes / 1e9,
            all / 1e9);
    if (done == total) fputc('\n', stderr);
  } else if (tenth > last_tenth) {
    fprintf(stderr, "%s: %3d%%, %zu/%zu tensors\n", what, 10 * tenth, done, total);
  }
  last_tenth = tenth;
}

static void hf2h5(const char *hf_dir, const char *root) {
  char err[1024], path[4300], tmp[4200], file[64];
  struct qwen3_config cfg;
  snprintf(path, sizeof path, "%s/config.json", hf_dir);
  if (hf_config_load(&cfg, path, err, sizeof err) != 0) die("%s", err);
  struct st_model *m;
  if (st_model_open(&m, hf_dir, err, sizeof err) != 0) die("%s", err);
  size_t n = st_model_count(m);
  double all = 0, done = 0;
  for (size_t i = 0; i < n; i++) all += 4.0 * (double)st_model_tensor_at(m, i)->numel;

  if (ckpt_begin(root, 0, err, sizeof err) != 0) die("%s", err);
  ckpt_step_path(tmp, sizeof tmp, root, 0, 1);
  ckpt_stage_file(file, sizeof file, 0, 1);
  snprintf(path, sizeof path, "%s/%s", tmp, file);
  struct ckpt_stage_writer *w;
  if (ckpt_stage_create(&w, path, 0, 1, err, sizeof err) != 0) die("%s", err);
  float *buf = NULL;
  size_t cap = 0;
  for (size_t i = 0; i < n; i++) {
    const struct st_tensor *t = st_model_tensor_at(m, i);
    if (t->ndim < 1 || t->ndim > 2)
      die("%s: tensor '%s' has %d dimensions; a Qwen3 model holds vectors and matrices", t->path,
          t->name, t->ndim);
    if (t->numel > cap) buf = xrealloc(buf, (cap = t->numel) * sizeof(float));
    if (st_read_f32(t, buf, t->numel, err, sizeof err) != 0) die("%s", err);
    int64_t shape[2] = {t->shape[0], t->ndim > 1 ? t->shape[1] : 1};
    if (ckpt_stage_put(w, t->name, t->ndim, shape, buf, NULL, NULL, err, sizeof err) != 0)
      die("%s", err);
    done += 4.0 * (double)t->numel;
    progress("hf2h5", i + 1, n, done, all);
  }
  free(buf);
  if (ckpt_stage_finish(w, err, sizeof err) != 0) die("%s", err);
  struct ckpt_state s = {.n_stages = 1, .config = cfg};
  if (ckpt_commit(root, &s, 0, err, sizeof err) != 0) die("%s", err);
  st_model_close(m);
  ckpt_step_path(path, sizeof path, root, 0, 0);
  info("hf2h5: %zu tensors, %.2f GB fp32, from %s to %s", n, all / 1e9, hf_dir, path);
}

struct out_tensor {
  const char *name;
  int ndim;
  int64_t shape[2];
  size_t numel;
  int shard;
};

/* HF_DIR must not already hold a model: a mix of old and new files would load as neither. */
static void refuse_existing_model(const char *hf_dir) {
  const char *names[] = {"config.json", "model.safetensors", "model.safetensors.index.json"};
  char path[4300];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", hf_dir, names[i]);
    if (access(path, F_OK) == 0)
      die("%s: already exists; convert into a directory without a model", path);
  }
}

static void write_index(const char *hf_dir, const struct out_tensor *t, size_t n, int n_shards,
                        double total_bytes) {
  char path[4300], tmp[4400], file[64];
  json_t *map = json_object(), *root = json_object();
  for (size_t i = 0; i < n; i++) {
    snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", t[i].shard + 1, n_shards);
    json_object_set_new(map, t[i].name, json_string(file));
  }
  json_object_set_new(root, "metadata",
                      json_pack("{s:I}", "total_size", (json_int_t)total_bytes));
  json_object_set_new(root, "weight_map", map);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", hf_dir);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  if (json_dump_file(root, tmp, JSON_INDENT(2) | JSON_SORT_KEYS) != 0 || rename(tmp, path) != 0)
    die("%s: cannot write", path);
  json_decref(root);
}

static void h52hf(const char *ckpt_path, const char *hf_dir, enum st_dtype dtype,
                  double max_shard) {
  char err[1024], path[4300], file[64];
  struct ckpt *c;
  if (ckpt_open(&c, ckpt_path, err, sizeof err) != 0) die("%s", err);
  refuse_existing_model(hf_dir);
  if (make_dirs(hf_dir) != 0) die("%s: cannot create", hf_dir);
  size_t n = ckpt_count(c);
  if (n == 0) die("%s: the checkpoint holds no tensor", ckpt_dir(c));
  struct out_tensor *t = xcalloc(n, sizeof *t);
  double elem = (double)st_dtype_size(dtype), all = 0, in_shard = 0;
  int n_shards = 1;
  for (size_t i = 0; i < n; i++) {
    t[i].name = ckpt_name_at(c, i);
    if (ckpt_shape(c, t[i].name, &t[i].ndim, t[i].shape, err, sizeof err) != 0) die("%s", err);
    t[i].numel = (size_t)t[i].shape[0] * (size_t)t[i].shape[1];
    double bytes = elem * (double)t[i].numel;
    if (in_shard > 0 && in_shard + bytes > max_shard) {
      n_shards++;
      in_shard = 0;
    }
    in_shard += bytes;
    all += bytes;
    t[i].shard = n_shards - 1;
  }

  double done = 0;
  struct st_write_tensor *w = xcalloc(n, sizeof *w);
  for (int s = 0, i = 0; s < n_shards; s++) {
    int k = 0;
    for (; i < (int)n && t[i].shard == s; i++, k++) {
      float *data = xmalloc(t[i].numel * sizeof(float));
      if (ckpt_read(c, t[i].name, CKPT_WEIGHTS, t[i].ndim, t[i].shape, data, err,
                    sizeof err) != 0)
        die("%s", err);
      w[k] = (struct st_write_tensor){.name = t[i].name, .dtype = dtype, .ndim = t[i].ndim,
                                      .shape = {t[i].shape[0], t[i].shape[1]}, .data = data};
      done += elem * (double)t[i].numel;
      progress("h52hf", (size_t)i + 1, n, done, all);
    }
    if (n_shards == 1) snprintf(file, sizeof file, "model.safetensors");
    else snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
    snprintf(path, sizeof path, "%s/%s", hf_dir, file);
    if (st_write(path, w, (size_t)k, 1, err, sizeof err) != 0) die("%s", err);
    for (int j = 0; j < k; j++) free((void *)w[j].data);
  }
  free(w);
  if (n_shards > 1) write_index(hf_dir, t, n, n_shards, all);
  snprintf(path, sizeof path, "%s/config.json", hf_dir);
  if (hf_config_write(path, &ckpt_get_state(c)->config,
                      dtype == ST_BF16 ? "bfloat16" : "float32", err, sizeof err) != 0)
    die("%s", err);
  info("h52hf: %zu tensors, %.2f GB %s in %d file%s, from %s to %s", n, all / 1e9,
       st_dtype_name(dtype), n_shards, n_shards == 1 ? "" : "s", ckpt_dir(c), hf_dir);
  free(t);
  ckpt_close(c);
}

int main(int argc, char **argv) {
  if (argc < 4) usage();
  if (!strcmp(argv[1], "hf2h5")) {
    if (argc != 4) usage();
    hf2h5(argv[2], argv[3]);
    return 0;
  }
  if (strcmp(argv[1], "h52hf") != 0) usage();
  enum st_dtype dtype = ST_BF16;
  double max_shard = 5e9;
  for (int i = 4; i < argc; i++) {
    if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
      const char *d = argv[++i];
      if (!strcmp(d, "bf16")) dtype = ST_BF16;
      else if (!strcmp(d, "fp32")) dtype = ST_F32;
      else die("--dtype: expected bf16 or fp32, got '%s'", d);
    } else if (!strcmp(argv[i], "--max-shard-size") && i + 1 < argc) {
      char *end;
      max_shard = strtod(argv[++i], &end);
      if (*end || !(max_shard > 0)) die("--max-shard-size: expected bytes > 0, got '%s'", argv[i]);
    } else {
      usage();
    }
  }
  h52hf(argv[2], argv[3], dtype, max_shard);
  return 0;
}
