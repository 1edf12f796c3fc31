/* The ModelOpt NVFP4 export (nvfp4_export.h): which tensors go out quantized, their bytes, and
 * the two json files that tell a loader so. */
#define _POSIX_C_SOURCE 200809L
#include "data/nvfp4_export.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/hf_shards.h"
#include "kernels/nvfp4.h"
#include "trainer/train.h"   /* the recipe's default range, as its job stored it */

enum { BLOCK = 16, MAX_GROUP = 3 };

/* The decoder linears, by fused group: the loaders' qkv_proj (0) and gate_up_proj (2). */
static const struct {
  const char *module;
  int group;
} LINEARS[] = {
    {"self_attn.q_proj", 0}, {"self_attn.k_proj", 0}, {"self_attn.v_proj", 0},
    {"self_attn.o_proj", 1}, {"mlp.gate_proj", 2},    {"mlp.up_proj", 2},
    {"mlp.down_proj", 3},
};
#define N_LINEARS (sizeof LINEARS / sizeof LINEARS[0])
#define N_GROUPS 4

/* Modules never quantized, besides lm_head and the layers outside the range. */
static const char *const HIGH_PRECISION[] = {
    "model.embed_tokens", "model.norm", "model.layers.*.input_layernorm",
    "model.layers.*.post_attention_layernorm", "model.layers.*.self_attn.q_norm",
    "model.layers.*.self_attn.k_norm",
};

struct tensor {
  const char *name;
  int ndim;
  int64_t shape[2];   /* [rows, cols]; cols 1 for a vector */
  int unit;
};

/* What goes out together: one bf16 tensor, or a fused group quantized as one matrix. */
struct unit {
  int quantized, n;
  size_t member[MAX_GROUP];
  double bytes;
  int shard;
};

struct export {
  struct ckpt *c;
  const char *hf_dir;
  enum nvfp4_block block;
  struct tensor *t;
  size_t n_t;
  struct unit *u;
  size_t n_u;
  char *err;
  size_t errlen;
};

/* The NVFP4 range and blocks the checkpoint's job trained with; every layer with 1x16 blocks
 * when it records none. */
static int recorded_policy(const struct ckpt_state *s, struct nvfp4_export_report *r,
                           const char *dir, char *err, size_t errlen) {
  int L = s->config.num_layers;
  *r = (struct nvfp4_export_report){.first_layer = 0, .end_layer = L};
  if (!s->job) return 0;
  Qwen3__Job *job = qwen3__job__unpack(NULL, s->job_len, s->job);
  if (!job) return errorf(err, errlen, "%s: the stored job.pb does not decode", dir);
  const Qwen3__Precision *p = job->precision;
  if (p && p->linear == QWEN3__LINEAR_PRECISION__NVFP4) {
    r->first_layer = nvfp4_stored_first_layers(p, L);
    r->end_layer = L - nvfp4_bf16_last_layers(p, L);
    r->weight_2d = p->weight_2d;
    r->recorded = 1;
  }
  qwen3__job__free_unpacked(job, NULL);
  if (r->first_layer >= r->end_layer)
    return errorf(err, errlen, "%s: its job trained no decoder layer in NVFP4 (bf16_first_layers "
                  "%d, layers up to %d of %d in NVFP4): nothing to export in NVFP4", dir,
                  r->first_layer, r->end_layer, L);
  return 0;
}

static size_t find(const struct export *e, const char *name) {
  for (size_t i = 0; i < e->n_t; i++)
    if (!strcmp(e->t[i].name, name)) return i;
  return SIZE_MAX;
}

/* Stored bytes of a quantized [rows, cols] weight: codes, scales, weight_scale_2, input_scale. */
static double nvfp4_bytes(const struct tensor *t) {
  return (double)t->shape[0] * (double)t->shape[1] * (0.5 + 1.0 / BLOCK) + 8;
}

/* The fused groups of layers [first, end), checked for shapes the format can hold. */
static int plan_groups(struct export *e, int first, int end) {
  const int br = e->block == NVFP4_BLOCK_16X16 ? BLOCK : 1;
  char name[CKPT_MAX_NAME + 64];
  for (int l = first; l < end; l++)
    for (int g = 0; g < N_GROUPS; g++) {
      struct unit *u = &e->u[e->n_u];
      *u = (struct unit){.quantized = 1};
      for (size_t k = 0; k < N_LINEARS; k++) {
        if (LINEARS[k].group != g) continue;
        snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, LINEARS[k].module);
        size_t i = find(e, name);
        if (i == SIZE_MAX)
          return errorf(e->err, e->errlen, "%s: has no tensor '%s', which a Qwen3 decoder layer "
                        "needs", ckpt_dir(e->c), name);
        const struct tensor *t = &e->t[i];
        if (t->ndim != 2 || t->shape[1] % BLOCK != 0)
          return errorf(e->err, e->errlen, "%s: '%s' has in_features %lld, not a multiple of %d: "
                        "NVFP4 scales cover %d consecutive inputs", ckpt_dir(e->c), name,
                        (long long)t->shape[1], BLOCK, BLOCK);
        if (t->shape[0] % br != 0)
          return errorf(e->err, e->errlen, "%s: '%s' has out_features %lld, not a multiple of 16, "
                        "which its 16x16 weight tiles (precision.weight_2d) need", ckpt_dir(e->c),
                        name, (long long)t->shape[0]);
        if (u->n && t->shape[1] != e->t[u->member[0]].shape[1])
          return errorf(e->err, e->errlen, "%s: '%s' and '%s' are fused by the loaders but have "
                        "in_features %lld and %lld", ckpt_dir(e->c), e->t[u->member[0]].name, name,
                        (long long)e->t[u->member[0]].shape[1], (long long)t->shape[1]);
        u->member[u->n++] = i;
        u->bytes += nvfp4_bytes(t);
        e->t[i].unit = (int)e->n_u;
      }
      e->n_u++;
    }
  return 0;
}

static char *out_name(const char *weight, const char *suffix) {
  size_t stem = strlen(weight) - strlen(".weight");
  char *s = xmalloc(stem + strlen(suffix) + 1);
  memcpy(s, weight, stem);
  strcpy(s + stem, suffix);
  return s;
}

/* The output tensors of one shard, each owning its name and its data: floats that st_write
 * stores as bf16, or the bytes of a quantized tensor stored as they are. */
struct outs {
  struct st_write_tensor *t;
  size_t n, cap;
};

static struct st_write_tensor *put(struct outs *o, char *name, enum st_dtype dtype, int ndim,
                                   int64_t rows, int64_t cols, void *bytes) {
  if (o->n == o->cap) o->t = xrealloc(o->t, (o->cap = o->cap ? 2 * o->cap : 64) * sizeof *o->t);
  o->t[o->n] = (struct st_write_tensor){.name = name, .dtype = dtype, .ndim = ndim,
                                        .shape = {rows, cols}, .bytes = bytes};
  return &o->t[o->n++];
}

static void *scalar(float v) {
  float *p = xmalloc(sizeof *p);
  *p = v;
  return p;
}

static int put_bf16(struct export *e, const struct tensor *t, struct outs *o) {
  size_t n = (size_t)t->shape[0] * (size_t)t->shape[1];
  float *x = xmalloc(n * sizeof *x);
  if (ckpt_read(e->c, t->name, CKPT_WEIGHTS, t->ndim, t->shape, x, e->err, e->errlen) != 0) {
    free(x);
    return -1;
  }
  put(o, xstrdup(t->name), ST_BF16, t->ndim, t->shape[0], t->shape[1], NULL)->data = x;
  return 0;
}

/* Quantizes a fused group as one matrix (one amax, one weight_scale_2) and splits it into its
 * members' tensors, 16x16 tile scales repeated on each of the tile's rows. */
static int put_group(struct export *e, const struct unit *u, struct outs *o) {
  const int64_t cols = e->t[u->member[0]].shape[1], nb = cols / BLOCK;
  int64_t rows = 0;
  for (int k = 0; k < u->n; k++) rows += e->t[u->member[k]].shape[0];
  float *x = xmalloc((size_t)rows * cols * sizeof *x);
  for (int k = 0, r0 = 0; k < u->n; r0 += (int)e->t[u->member[k]].shape[0], k++) {
    const struct tensor *t = &e->t[u->member[k]];
    if (ckpt_read(e->c, t->name, CKPT_WEIGHTS, 2, t->shape, x + (size_t)r0 * cols, e->err,
                  e->errlen) != 0) {
      free(x);
      return -1;
    }
  }
  uint8_t *codes = xmalloc((size_t)rows * cols / 2);
  uint8_t *scales = xmalloc((size_t)nvfp4_num_scales((int)rows, (int)cols, e->block));
  struct nvfp4_tensor_scale ts;
  int status = nvfp4_quantize(codes, scales, &ts, x, (int)rows, (int)cols, e->block,
                              NVFP4_ROUND_NEAREST, 0);
  free(x);
  if (status != NVFP4_OK) {
    free(codes);
    free(scales);
    return errorf(e->err, e->errlen, "%s: '%s'%s holds a non-finite value: nothing to quantize",
                  ckpt_dir(e->c), e->t[u->member[0]].name,
                  u->n > 1 ? " or a tensor fused with it" : "");
  }
  const int br = e->block == NVFP4_BLOCK_16X16 ? BLOCK : 1;
  for (int k = 0, r0 = 0; k < u->n; r0 += (int)e->t[u->member[k]].shape[0], k++) {
    const struct tensor *t = &e->t[u->member[k]];
    const int64_t m = t->shape[0];
    uint8_t *w = xmalloc((size_t)m * cols / 2), *s = xmalloc((size_t)m * nb);
    memcpy(w, codes + (size_t)r0 * cols / 2, (size_t)m * cols / 2);
    for (int64_t r = 0; r < m; r++)
      memcpy(s + r * nb, scales + (size_t)((r0 + r) / br) * nb, (size_t)nb);
    put(o, out_name(t->name, ".weight"), ST_U8, 2, m, cols / 2, w);
    put(o, out_name(t->name, ".weight_scale"), ST_F8_E4M3, 2, m, nb, s);
    put(o, out_name(t->name, ".weight_scale_2"), ST_F32, 0, 0, 0, scalar(ts.dec));
    put(o, out_name(t->name, ".input_scale"), ST_F32, 0, 0, 0, scalar(1.0f));
  }
  free(codes);
  free(scales);
  return 0;
}

static void outs_free(struct outs *o) {
  for (size_t i = 0; i < o->n; i++) {
    free((void *)o->t[i].name);
    free((void *)o->t[i].data);
    free((void *)o->t[i].bytes);
  }
  o->n = 0;
}

static json_t *exclude_modules(const struct qwen3_config *c, const struct nvfp4_export_report *r) {
  json_t *a = json_array();
  char name[64];
  json_array_append_new(a, json_string("lm_head"));
  for (size_t i = 0; i < sizeof HIGH_PRECISION / sizeof *HIGH_PRECISION; i++)
    json_array_append_new(a, json_string(HIGH_PRECISION[i]));
  for (int l = 0; l < c->num_layers; l++)
    if (l < r->first_layer || l >= r->end_layer) {
      snprintf(name, sizeof name, "model.layers.%d.*", l);
      json_array_append_new(a, json_string(name));
    }
  return a;
}

static int dump(json_t *j, const char *path, char *err, size_t errlen) {
  char tmp[4400];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int rc = json_dump_file(j, tmp, JSON_INDENT(4)) != 0 || rename(tmp, path) != 0
               ? errorf(err, errlen, "%s: cannot write", path)
               : 0;
  json_decref(j);
  return rc;
}

/* hf_quant_config.json as ModelOpt's get_quant_config writes it, then config.json with the
 * quantization_config its convert_hf_quant_config_format derives from that. */
static int write_configs(const char *hf_dir, const struct qwen3_config *c,
                         const struct nvfp4_export_report *r, char *err, size_t errlen) {
  char path[4300], base[4300];
  json_t *producer = json_pack("{s:s,s:s}", "name", "qwen3-train", "version", "h52hf-nvfp4-1");
  json_t *q = json_pack("{s:s,s:n,s:i,s:o}", "quant_algo", "NVFP4", "kv_cache_quant_algo",
                        "group_size", BLOCK, "exclude_modules", exclude_modules(c, r));
  snprintf(path, sizeof path, "%s/hf_quant_config.json", hf_dir);
  if (dump(json_pack("{s:O,s:o}", "producer", producer, "quantization", q), path, err,
           errlen) != 0) {
    json_decref(producer);
    return -1;
  }

  json_t *scheme = json_pack("{s:b,s:i,s:s,s:i}", "dynamic", 0, "num_bits", 4, "type", "float",
                             "group_size", BLOCK);
  json_t *qc = json_pack(
      "{s:{s:{s:O,s:O,s:[s]}},s:o,s:s,s:o,s:s}", "config_groups", "group_0", "input_activations",
      scheme, "weights", scheme, "targets", "Linear", "ignore", exclude_modules(c, r),
      "quant_algo", "NVFP4", "producer", producer, "quant_method", "modelopt");
  json_decref(scheme);
  /* hf_config_write owns the model keys; the quantization_config goes into what it wrote */
  snprintf(base, sizeof base, "%s/config.json.base", hf_dir);
  snprintf(path, sizeof path, "%s/config.json", hf_dir);
  json_error_t jerr;
  json_t *cfg = NULL;
  if (hf_config_write(base, c, "bfloat16", err, errlen) != 0 ||
      !(cfg = json_load_file(base, 0, &jerr))) {
    if (!cfg && err[0] == 0) errorf(err, errlen, "%s: %s", base, jerr.text);
    json_decref(qc);
    unlink(base);
    return -1;
  }
  unlink(base);
  json_object_set_new(cfg, "quantization_config", qc);
  return dump(cfg, path, err, errlen);
}

int nvfp4_export(const char *ckpt_path, const char *hf_dir, double max_shard,
                 struct nvfp4_export_report *report, char *err, size_t errlen) {
  struct export e = {.hf_dir = hf_dir, .err = err, .errlen = errlen};
  struct outs o = {0};
  const char **names = NULL;
  int *shard_of = NULL, rc = -1;
  err[0] = 0;
  if (ckpt_open(&e.c, ckpt_path, err, errlen) != 0) return -1;
  const struct ckpt_state *s = ckpt_get_state(e.c);
  struct nvfp4_export_report r;
  if (recorded_policy(s, &r, ckpt_dir(e.c), err, errlen) != 0) goto out;
  e.block = r.weight_2d ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16;
  e.n_t = ckpt_count(e.c);
  e.t = xcalloc(e.n_t ? e.n_t : 1, sizeof *e.t);
  for (size_t i = 0; i < e.n_t; i++) {
    e.t[i] = (struct tensor){.name = ckpt_name_at(e.c, i), .unit = -1};
    if (ckpt_shape(e.c, e.t[i].name, &e.t[i].ndim, e.t[i].shape, err, errlen) != 0) goto out;
  }
  e.u = xcalloc(e.n_t + 1, sizeof *e.u);
  if (plan_groups(&e, r.first_layer, r.end_layer) != 0) goto out;
  for (size_t i = 0; i < e.n_t; i++)
    if (e.t[i].unit < 0) {
      e.t[i].unit = (int)e.n_u;
      e.u[e.n_u++] = (struct unit){.n = 1, .member = {i},
                                   .bytes = 2.0 * (double)e.t[i].shape[0] * e.t[i].shape[1]};
    }

  /* shards in checkpoint order, a fused group never split: at its first member's place */
  int n_shards = 1;
  double in_shard = 0;
  size_t *order = xmalloc(e.n_u * sizeof *order), n_order = 0;
  char *placed = xcalloc(e.n_u, 1);
  for (size_t i = 0; i < e.n_t; i++) {
    int k = e.t[i].unit;
    if (placed[k]) continue;
    placed[k] = 1;
    if (in_shard > 0 && in_shard + e.u[k].bytes > max_shard) n_shards++, in_shard = 0;
    in_shard += e.u[k].bytes;
    r.bytes += e.u[k].bytes;
    e.u[k].shard = n_shards - 1;
    order[n_order++] = (size_t)k;
  }
  free(placed);

  char path[4300], file[64];
  names = xmalloc(4 * e.n_t * sizeof *names);
  shard_of = xmalloc(4 * e.n_t * sizeof *shard_of);
  for (size_t j = 0; j < n_order;) {
    int sh = e.u[order[j]].shard;
    for (; j < n_order && e.u[order[j]].shard == sh; j++) {
      const struct unit *u = &e.u[order[j]];
      if ((u->quantized ? put_group(&e, u, &o) : put_bf16(&e, &e.t[u->member[0]], &o)) != 0) {
        free(order);
        goto out;
      }
    }
    if (n_shards == 1) snprintf(file, sizeof file, "model.safetensors");
    else hf_shard_file(file, sizeof file, sh, n_shards);
    snprintf(path, sizeof path, "%s/%s", hf_dir, file);
    if (st_write(path, o.t, o.n, 1, err, errlen) != 0) {
      free(order);
      goto out;
    }
    for (size_t i = 0; i < o.n; i++) {   /* the index keeps the names: moved out of o */
      names[r.n_tensors] = o.t[i].name;
      shard_of[r.n_tensors++] = sh;
      o.t[i].name = NULL;
    }
    outs_free(&o);
  }
  free(order);
  r.n_shards = n_shards;
  if (n_shards > 1 &&
      hf_write_index(hf_dir, names, shard_of, r.n_tensors, n_shards, r.bytes, err, errlen) != 0)
    goto out;
  if (write_configs(hf_dir, &s->config, &r, err, errlen) != 0) goto out;
  if (report) *report = r;
  rc = 0;
out:
  outs_free(&o);
  free(o.t);
  if (names)
    for (size_t i = 0; i < r.n_tensors; i++) free((void *)names[i]);
  free(names);
  free(shard_of);
  free(e.t);
  free(e.u);
  ckpt_close(e.c);
  return rc;
}
