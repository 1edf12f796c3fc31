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
 *   qwen3-convert h52hf CKPT_DIR HF_DIR --nvfp4 [--max-shard-size BYTES]
 *     the same, as NVIDIA ModelOpt's NVFP4 checkpoint for vLLM, SGLang and TensorRT-LLM: the
 *     decoder linears quantized with the training recipe's quantizer, the rest bf16, plus
 *     hf_quant_config.json (data/nvfp4_export.h).
 *
 * Tensors are converted one at a time (h52hf: one shard at a time), so memory stays near the
 * largest tensor (shard). A failed conversion leaves no whole-looking output: hf2h5 commits
 * the checkpoint only at the end; h52hf writes config.json, without which no loader takes the
 * directory for a model, last. */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/hf_shards.h"
#include "data/nvfp4_export.h"
#include "data/safetensors.h"

static void usage(void) {
  fprintf(stderr,
          "usage: qwen3-convert hf2h5 HF_DIR CKPT_DIR\n"
          "       qwen3-convert h52hf CKPT_DIR HF_DIR [--dtype bf16|fp32 | --nvfp4] "
          "[--max-shard-size BYTES]\n"
          "\n"
          "--nvfp4 writes NVIDIA ModelOpt's NVFP4 checkpoint (hf_quant_config.json, quant_algo\n"
          "NVFP4) for vLLM, SGLang and TensorRT-LLM: q/k/v/o/gate/up/down of the layers the\n"
          "checkpoint's job trained in NVFP4 (all layers if it records none) quantized as in\n"
          "training (round to nearest, its 16x16 or 1x16 weight blocks; q/k/v and gate/up share\n"
          "one tensor scale, as the loaders fuse them), everything else bf16. No activation\n"
          "calibration exists: every input_scale is 1.0, so served activations get dynamic\n"
          "16-element block scales (amax/6) under a fixed tensor scale of 1, not training's\n"
          "per-forward amax.\n");
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

/* hf2h5 writes step 0: into a root that already holds steps it would move `latest` back (and a
 * run resumed from there would overwrite the later steps). Such a root is refused. */
static void refuse_existing_checkpoint(const char *root) {
  char latest[4300], target[4096];
  snprintf(latest, sizeof latest, "%s/latest", root);
  ssize_t n = readlink(latest, target, sizeof target - 1);
  if (n >= 0 || access(latest, F_OK) == 0) {
    target[n > 0 ? n : 0] = 0;
    die("%s: already holds a checkpoint (latest -> %s); hf2h5 writes step 0 and would move latest "
        "back: convert into a new or empty directory", root, n > 0 ? target : "?");
  }
  DIR *d = opendir(root);
  if (!d) return;   /* a new directory */
  struct dirent *e;
  while ((e = readdir(d)))
    if (!strncmp(e->d_name, "step_", 5)) {
      char name[300];
      snprintf(name, sizeof name, "%s", e->d_name);
      closedir(d);
      die("%s: already holds checkpoint steps (%s); hf2h5 writes step 0 and would overwrite or "
          "shadow them: convert into a new or empty directory", root, name);
    }
  closedir(d);
}

/* The tensors of a Qwen3 model of config c, with their shapes: the safetensors must hold exactly
 * these (lm_head.weight may be absent only with tied embeddings), or the model and its config
 * disagree. */
static void check_tensors(const char *hf_dir, const struct qwen3_config *c,
                          const struct st_model *m) {
  struct want {
    char name[128];
    int ndim;
    int64_t shape[2];
    int optional;
  };
  size_t cap = 16 + 11 * (size_t)c->num_layers, n = 0;
  struct want *w = xcalloc(cap, sizeof *w);
  const int64_t H = c->hidden_size, V = c->vocab_size, I = c->intermediate_size, D = c->head_dim;
  const int64_t Q = (int64_t)c->num_heads * D, KV = (int64_t)c->num_kv_heads * D;
#define WANT(nd, r, k, opt, ...)                                               \
  do {                                                                         \
    snprintf(w[n].name, sizeof w[n].name, __VA_ARGS__);                        \
    w[n].ndim = nd, w[n].shape[0] = r, w[n].shape[1] = k, w[n].optional = opt; \
    n++;                                                                       \
  } while (0)
  WANT(2, V, H, 0, "model.embed_tokens.weight");
  WANT(1, H, 1, 0, "model.norm.weight");
  WANT(2, V, H, c->tie_embeddings, "lm_head.weight");
  for (int l = 0; l < c->num_layers; l++) {
    WANT(1, H, 1, 0, "model.layers.%d.input_layernorm.weight", l);
    WANT(1, H, 1, 0, "model.layers.%d.post_attention_layernorm.weight", l);
    WANT(2, Q, H, 0, "model.layers.%d.self_attn.q_proj.weight", l);
    WANT(2, KV, H, 0, "model.layers.%d.self_attn.k_proj.weight", l);
    WANT(2, KV, H, 0, "model.layers.%d.self_attn.v_proj.weight", l);
    WANT(2, H, Q, 0, "model.layers.%d.self_attn.o_proj.weight", l);
    WANT(1, D, 1, 0, "model.layers.%d.self_attn.q_norm.weight", l);
    WANT(1, D, 1, 0, "model.layers.%d.self_attn.k_norm.weight", l);
    WANT(2, I, H, 0, "model.layers.%d.mlp.gate_proj.weight", l);
    WANT(2, I, H, 0, "model.layers.%d.mlp.up_proj.weight", l);
    WANT(2, H, I, 0, "model.layers.%d.mlp.down_proj.weight", l);
  }
#undef WANT
  size_t found = 0;
  for (size_t i = 0; i < n; i++) {
    const struct st_tensor *t = st_model_find(m, w[i].name);
    if (!t) {
      if (w[i].optional) continue;
      die("%s: tensor '%s' is missing; config.json describes a Qwen3 model with %d layers%s that "
          "needs it", hf_dir, w[i].name, c->num_layers,
          c->tie_embeddings ? "" : " and untied embeddings (tie_word_embeddings false)");
    }
    found++;
    int64_t second = t->ndim > 1 ? t->shape[1] : 1;
    if (t->ndim != w[i].ndim || t->shape[0] != w[i].shape[0] || second != w[i].shape[1]) {
      char have[64];
      if (t->ndim == 2) snprintf(have, sizeof have, "[%lld, %lld]", (long long)t->shape[0], (long long)t->shape[1]);
      else if (t->ndim == 1) snprintf(have, sizeof have, "[%lld]", (long long)t->shape[0]);
      else snprintf(have, sizeof have, "%d dimensions", t->ndim);
      if (w[i].ndim == 2)
        die("%s: tensor '%s' has shape %s but config.json (%s) implies [%lld, %lld]", t->path,
            w[i].name, have, "hidden_size, num_attention_heads, num_key_value_heads, head_dim, "
            "intermediate_size, vocab_size", (long long)w[i].shape[0], (long long)w[i].shape[1]);
      die("%s: tensor '%s' has shape %s but config.json (hidden_size, head_dim) implies [%lld]",
          t->path, w[i].name, have, (long long)w[i].shape[0]);
    }
  }
  if (found != st_model_count(m))
    for (size_t j = 0; j < st_model_count(m); j++) {
      const char *name = st_model_tensor_at(m, j)->name;
      size_t i = 0;
      while (i < n && strcmp(w[i].name, name)) i++;
      if (i == n)
        die("%s: tensor '%s' is not part of the Qwen3 model config.json describes (%d layers); "
            "a config for another model?", st_model_tensor_at(m, j)->path, name, c->num_layers);
    }
  free(w);
}

static void hf2h5(const char *hf_dir, const char *root) {
  char err[1024], path[4300], tmp[4200], file[64];
  struct qwen3_config cfg;
  snprintf(path, sizeof path, "%s/config.json", hf_dir);
  if (hf_config_load(&cfg, path, err, sizeof err) != 0) die("%s", err);
  refuse_existing_checkpoint(root);
  struct st_model *m;
  if (st_model_open(&m, hf_dir, err, sizeof err) != 0) die("%s", err);
  check_tensors(hf_dir, &cfg, m);
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
    else hf_shard_file(file, sizeof file, s, n_shards);
    snprintf(path, sizeof path, "%s/%s", hf_dir, file);
    if (st_write(path, w, (size_t)k, 1, err, sizeof err) != 0) die("%s", err);
    for (int j = 0; j < k; j++) free((void *)w[j].data);
  }
  free(w);
  if (n_shards > 1) {
    const char **names = xmalloc(n * sizeof *names);
    int *shard = xmalloc(n * sizeof *shard);
    for (size_t i = 0; i < n; i++) names[i] = t[i].name, shard[i] = t[i].shard;
    if (hf_write_index(hf_dir, names, shard, n, n_shards, all, err, sizeof err) != 0)
      die("%s", err);
    free(names);
    free(shard);
  }
  snprintf(path, sizeof path, "%s/config.json", hf_dir);
  if (hf_config_write(path, &ckpt_get_state(c)->config,
                      dtype == ST_BF16 ? "bfloat16" : "float32", err, sizeof err) != 0)
    die("%s", err);
  info("h52hf: %zu tensors, %.2f GB %s in %d file%s, from %s to %s", n, all / 1e9,
       st_dtype_name(dtype), n_shards, n_shards == 1 ? "" : "s", ckpt_dir(c), hf_dir);
  free(t);
  ckpt_close(c);
}

static void h52hf_nvfp4(const char *ckpt_path, const char *hf_dir, double max_shard) {
  char err[1024];
  struct nvfp4_export_report r;
  refuse_existing_model(hf_dir);
  if (make_dirs(hf_dir) != 0) die("%s: cannot create", hf_dir);
  if (nvfp4_export(ckpt_path, hf_dir, max_shard, &r, err, sizeof err) != 0) die("%s", err);
  info("h52hf --nvfp4: layers %d-%d in NVFP4 with %s weight scales (%s), %zu tensors, %.2f GB in "
       "%d file%s, to %s", r.first_layer, r.end_layer - 1, r.weight_2d ? "16x16" : "1x16",
       r.recorded ? "as the checkpoint's job trained them" : "the checkpoint records no NVFP4 "
       "training: every layer", r.n_tensors, r.bytes / 1e9, r.n_shards,
       r.n_shards == 1 ? "" : "s", hf_dir);
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
  int nvfp4 = 0, fp32 = 0;
  for (int i = 4; i < argc; i++) {
    if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
      const char *d = argv[++i];
      if (!strcmp(d, "bf16")) dtype = ST_BF16;
      else if (!strcmp(d, "fp32")) dtype = ST_F32, fp32 = 1;
      else die("--dtype: expected bf16 or fp32, got '%s'", d);
    } else if (!strcmp(argv[i], "--nvfp4")) {
      nvfp4 = 1;
    } else if (!strcmp(argv[i], "--max-shard-size") && i + 1 < argc) {
      char *end;
      max_shard = strtod(argv[++i], &end);
      if (*end || !(max_shard > 0)) die("--max-shard-size: expected bytes > 0, got '%s'", argv[i]);
    } else {
      usage();
    }
  }
  if (nvfp4) {
    /* the loaders' NVFP4 kernels take bf16 (or fp16) activations, never fp32 */
    if (fp32) die("--nvfp4 writes its high-precision tensors as bf16; --dtype fp32 is refused");
    h52hf_nvfp4(argv[2], argv[3], max_shard);
  } else {
    h52hf(argv[2], argv[3], dtype, max_shard);
  }
  return 0;
}
