/* data/nvfp4_export (qwen3-convert h52hf --nvfp4): a tiny checkpoint written here, exported as
 * ModelOpt's NVFP4 checkpoint, and read back: (a) the layout ModelOpt writes and vLLM loads
 * (tensor names, U8 / F8_E4M3 / F32 dtypes, shapes, hf_quant_config.json and config.json's
 * quantization_config); (b) the values: codes (element 2i in the low nibble) times their E4M3
 * scales times weight_scale_2 are exactly nvfp4_dequantize of the training quantizer's result,
 * with the 16x16 tiles the job recorded, and the training forward's own values where the
 * tensor holds its fused group's amax; (c) bad uses refused with a message naming the cause. */
#define _XOPEN_SOURCE 700
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/nvfp4_export.h"
#include "data/safetensors.h"
#include "job.pb-c.h"
#include "kernels/nvfp4.h"
#include "tests/check.h"
#include "trainer/train.h"

static const char *g_dir;   /* checks_dir's */
static char g_convert[4096], err[2048];


/* hidden 32, q 2x16, kv 1x16, intermediate 48: every linear's rows and columns divide by 16 */
static const struct qwen3_config CFG = {.hidden_size = 32, .num_layers = 2, .num_heads = 2,
                                        .num_kv_heads = 1, .head_dim = 16,
                                        .intermediate_size = 48, .vocab_size = 64,
                                        .rope_theta = 1e6, .rms_norm_eps = 1e-6,
                                        .tie_embeddings = 1, .max_seq_len = 64};

static const char *const LINEAR[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj"};

static void linear_shape(const struct qwen3_config *c, int k, int64_t s[2]) {
  const int64_t H = c->hidden_size, Q = (int64_t)c->num_heads * c->head_dim,
                KV = (int64_t)c->num_kv_heads * c->head_dim, I = c->intermediate_size;
  const int64_t rows[7] = {Q, KV, KV, H, I, I, H}, cols[7] = {H, H, H, Q, H, H, I};
  s[0] = rows[k], s[1] = cols[k];
}

/* Deterministic weights: tensor t's scale falls with t (so q holds the q/k/v amax and gate the
 * gate/up amax), with a zero block and a tiny block in every matrix. */
static float weight(int t, size_t i, int64_t cols) {
  size_t r = i / (size_t)cols, c = i % (size_t)cols;
  if (r == 1 && c < 16) return 0.0f;
  float v = sinf(0.37f * (float)i + 1.3f * (float)t) * (2.0f - 0.2f * (float)t);
  return r == 2 && c < 16 ? v * 1e-5f : v;
}

static int write_checkpoint(const char *root, const struct qwen3_config *c, const uint8_t *job,
                            size_t job_len, int poison) {
  char tmp[4200], file[64], path[4300], name[128];
  if (ckpt_begin(root, 0, err, sizeof err) != 0) return -1;
  ckpt_step_path(tmp, sizeof tmp, root, 0, 1);
  ckpt_stage_file(file, sizeof file, 0, 1);
  snprintf(path, sizeof path, "%s/%s", tmp, file);
  struct ckpt_stage_writer *w;
  if (ckpt_stage_create(&w, path, 0, 1, err, sizeof err) != 0) return -1;
  float *buf = xmalloc(64 * 64 * sizeof *buf);
  int t = 0, rc = 0;
#define PUT(nd, r, k, ...)                                                                 \
  do {                                                                                     \
    int64_t s_[2] = {r, k};                                                                \
    snprintf(name, sizeof name, __VA_ARGS__);                                              \
    for (size_t i = 0; i < (size_t)(r * k); i++) buf[i] = weight(t, i, k);                 \
    if (poison && t == 2) buf[5] = NAN;                                                    \
    t++;                                                                                   \
    if (!rc) rc = ckpt_stage_put(w, name, nd, s_, buf, NULL, NULL, err, sizeof err);       \
  } while (0)
  PUT(2, c->vocab_size, c->hidden_size, "model.embed_tokens.weight");
  PUT(1, c->hidden_size, 1, "model.norm.weight");
  for (int l = 0; l < c->num_layers; l++) {
    t = 0;   /* layer by layer alike: q has the largest amax of its group, gate of its own */
    for (int k = 0; k < 7; k++) {
      int64_t s[2];
      linear_shape(c, k, s);
      PUT(2, s[0], s[1], "model.layers.%d.%s.weight", l, LINEAR[k]);
    }
    PUT(1, c->hidden_size, 1, "model.layers.%d.input_layernorm.weight", l);
    PUT(1, c->hidden_size, 1, "model.layers.%d.post_attention_layernorm.weight", l);
    PUT(1, c->head_dim, 1, "model.layers.%d.self_attn.q_norm.weight", l);
    PUT(1, c->head_dim, 1, "model.layers.%d.self_attn.k_norm.weight", l);
  }
#undef PUT
  free(buf);
  if (ckpt_stage_finish(w, err, sizeof err) != 0 || rc) return -1;
  struct ckpt_state s = {.n_stages = 1, .config = *c, .job = job, .job_len = job_len};
  return ckpt_commit(root, &s, 0, err, sizeof err);
}

/* A job that trained layers [0, 1) of 2 in NVFP4 with 16x16 weight tiles. */
static size_t nvfp4_job(uint8_t *out, size_t cap) {
  Qwen3__Job job = QWEN3__JOB__INIT;
  Qwen3__Precision p = QWEN3__PRECISION__INIT;
  p.has_linear = 1, p.linear = QWEN3__LINEAR_PRECISION__NVFP4;
  p.has_bf16_last_layers = 1, p.bf16_last_layers = 1;
  p.has_weight_2d = 1, p.weight_2d = 1;
  job.precision = &p;
  size_t n = qwen3__job__get_packed_size(&job);
  if (n > cap) die("job too large");
  return qwen3__job__pack(&job, out);
}

/* The stored value of every element of a quantized linear, as a loader computes it. */
static int served(const struct st_model *f, const char *module, int64_t rows, int64_t cols,
                  float *out) {
  char name[160];
  snprintf(name, sizeof name, "%s.weight", module);
  const struct st_tensor *w = st_model_find(f, name);
  snprintf(name, sizeof name, "%s.weight_scale", module);
  const struct st_tensor *s = st_model_find(f, name);
  snprintf(name, sizeof name, "%s.weight_scale_2", module);
  const struct st_tensor *s2 = st_model_find(f, name);
  if (!w || !s || !s2 || w->nbytes != (uint64_t)(rows * cols / 2) ||
      s->nbytes != (uint64_t)(rows * cols / 16) || s2->nbytes != 4)
    return -1;
  float dec;
  memcpy(&dec, s2->data, 4);
  const uint8_t *codes = w->data, *scales = s->data;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) {
      size_t i = (size_t)(r * cols + c);
      uint8_t code = (uint8_t)(c % 2 ? codes[i / 2] >> 4 : codes[i / 2] & 15);
      out[i] = nvfp4_e2m1_decode(code) * nvfp4_e4m3_decode(scales[r * (cols / 16) + c / 16]) * dec;
    }
  return 0;
}

/* What the training quantizer makes of `n` stacked linears k0.. of a layer. */
static void expected(const struct qwen3_config *c, int k0, int n, enum nvfp4_block block,
                     float *out, int64_t *rows_out) {
  int64_t rows = 0, s[2] = {0, 0};
  float *x = xmalloc(64 * 128 * sizeof *x);
  for (int k = k0; k < k0 + n; k++) {
    linear_shape(c, k, s);
    for (size_t i = 0; i < (size_t)(s[0] * s[1]); i++) x[rows * s[1] + i] = weight(k, i, s[1]);
    rows += s[0];
  }
  uint8_t codes[64 * 128 / 2], scales[64 * 128 / 16];
  struct nvfp4_tensor_scale ts;
  if (nvfp4_quantize(codes, scales, &ts, x, (int)rows, (int)s[1], block, NVFP4_ROUND_NEAREST,
                     0) != NVFP4_OK)
    die("quantize");
  nvfp4_dequantize(out, codes, scales, ts.dec, (int)rows, (int)s[1], block);
  *rows_out = rows;
  free(x);
}

/* Every linear of layer l matches the training quantizer's group result. */
static int values_match(const struct st_model *f, int l, enum nvfp4_block block) {
  static const int GROUP_FIRST[4] = {0, 3, 4, 6}, GROUP_N[4] = {3, 1, 2, 1};
  float want[64 * 128], got[64 * 64];
  char module[128];
  int ok = 1;
  for (int g = 0; g < 4; g++) {
    int64_t rows, r0 = 0, s[2];
    expected(&CFG, GROUP_FIRST[g], GROUP_N[g], block, want, &rows);
    for (int k = GROUP_FIRST[g]; k < GROUP_FIRST[g] + GROUP_N[g]; k++) {
      linear_shape(&CFG, k, s);
      snprintf(module, sizeof module, "model.layers.%d.%s", l, LINEAR[k]);
      int same = served(f, module, s[0], s[1], got) == 0 &&
                 !memcmp(got, want + r0 * s[1], (size_t)(s[0] * s[1]) * sizeof(float));
      CHECK(same, "%s: served values are the training quantizer's (%s blocks)", module,
            block == NVFP4_BLOCK_16X16 ? "16x16" : "1x16");
      ok = ok && same;
      r0 += s[0];
    }
  }
  return ok;
}

static int has_string(const json_t *a, const char *s) {
  size_t i;
  json_t *v;
  json_array_foreach(a, i, v) if (json_is_string(v) && !strcmp(json_string_value(v), s)) return 1;
  return 0;
}

static void check_json(const char *hf, int excluded_layer) {
  char path[700];
  snprintf(path, sizeof path, "%s/hf_quant_config.json", hf);
  json_t *h = json_load_file(path, 0, NULL);
  json_t *q = json_object_get(h, "quantization");
  json_t *ex = json_object_get(q, "exclude_modules");
  CHECK(h && json_is_object(json_object_get(h, "producer")) &&
            !strcmp(json_string_value(json_object_get(q, "quant_algo")), "NVFP4") &&
            json_integer_value(json_object_get(q, "group_size")) == 16 &&
            json_is_null(json_object_get(q, "kv_cache_quant_algo")) && json_is_array(ex),
        "hf_quant_config.json: producer, quantization {quant_algo NVFP4, group_size 16, "
        "kv_cache_quant_algo null, exclude_modules}");
  CHECK(has_string(ex, "lm_head") && has_string(ex, "model.embed_tokens") &&
            has_string(ex, "model.norm") && has_string(ex, "model.layers.*.input_layernorm") &&
            !has_string(ex, "model.layers.0.*") &&
            has_string(ex, "model.layers.1.*") == excluded_layer,
        "exclude_modules: lm_head, embeddings, norms%s", excluded_layer ? ", layer 1" : "");

  snprintf(path, sizeof path, "%s/config.json", hf);
  json_t *c = json_load_file(path, 0, NULL);
  json_t *qc = json_object_get(c, "quantization_config");
  json_t *g0 = json_object_get(json_object_get(qc, "config_groups"), "group_0");
  json_t *wt = json_object_get(g0, "weights"), *act = json_object_get(g0, "input_activations");
  CHECK(qc && !strcmp(json_string_value(json_object_get(qc, "quant_method")), "modelopt") &&
            !strcmp(json_string_value(json_object_get(qc, "quant_algo")), "NVFP4") &&
            json_equal(json_object_get(qc, "ignore"), ex) &&
            json_is_object(json_object_get(qc, "producer")) &&
            has_string(json_object_get(g0, "targets"), "Linear"),
        "config.json quantization_config: quant_method modelopt, quant_algo NVFP4, ignore, "
        "producer, config_groups.group_0.targets [Linear]");
  for (int k = 0; k < 2; k++) {
    json_t *x = k ? act : wt;
    CHECK(json_integer_value(json_object_get(x, "num_bits")) == 4 &&
              json_integer_value(json_object_get(x, "group_size")) == 16 &&
              !strcmp(json_string_value(json_object_get(x, "type")), "float") &&
              json_is_false(json_object_get(x, "dynamic")),
          "group_0.%s: 4-bit float, group_size 16, dynamic false", k ? "input_activations" : "weights");
  }
  CHECK(!strcmp(json_string_value(json_object_get(c, "torch_dtype")), "bfloat16"),
        "config.json: torch_dtype bfloat16");
  struct qwen3_config back;
  CHECK(hf_config_load(&back, path, err, sizeof err) == 0 &&
            !memcmp(&back, &CFG, sizeof back),
        "config.json still loads as the model's config: %s", err);
  json_decref(h);
  json_decref(c);
}

static void test_recorded_job(void) {
  uint8_t job[256];
  size_t job_len = nvfp4_job(job, sizeof job);
  CHECK(write_checkpoint(in_dir("ck"), &CFG, job, job_len, 0) == 0, "checkpoint: %s", err);
  const char *hf = in_dir("hf");
  struct nvfp4_export_report r;
  make_dirs(hf);
  CHECK(nvfp4_export(in_dir("ck"), hf, 5e9, &r, err, sizeof err) == 0, "export: %s", err);
  CHECK(r.recorded && r.first_layer == 0 && r.end_layer == 1 && r.weight_2d && r.n_shards == 1,
        "the job's range [0, 1) and 16x16 tiles are used");

  struct st_file *f;
  char path[700], name[160];
  snprintf(path, sizeof path, "%s/model.safetensors", hf);
  if (st_open(&f, path, err, sizeof err) != 0) {
    CHECK(0, "open %s: %s", path, err);
    return;
  }
  CHECK(st_metadata(f, "format") && !strcmp(st_metadata(f, "format"), "pt"),
        "__metadata__ format pt");
  /* (a) layer 0 quantized, layer 1 and the rest bf16 */
  size_t want_count = 2 + 7 * 4 + 7 + 2 * 4;
  CHECK(st_count(f) == want_count, "%zu tensors, want %zu", st_count(f), want_count);
  for (int k = 0; k < 7; k++) {
    int64_t s[2];
    linear_shape(&CFG, k, s);
    const struct st_tensor *t;
    snprintf(name, sizeof name, "model.layers.0.%s.weight", LINEAR[k]);
    t = st_find(f, name);
    CHECK(t && t->dtype == ST_U8 && t->ndim == 2 && t->shape[0] == s[0] && t->shape[1] == s[1] / 2,
          "%s: U8 [out, in/2]", name);
    snprintf(name, sizeof name, "model.layers.0.%s.weight_scale", LINEAR[k]);
    t = st_find(f, name);
    CHECK(t && t->dtype == ST_F8_E4M3 && t->ndim == 2 && t->shape[0] == s[0] &&
              t->shape[1] == s[1] / 16,
          "%s: F8_E4M3 [out, in/16]", name);
    for (int j = 0; j < 2; j++) {
      snprintf(name, sizeof name, "model.layers.0.%s.%s", LINEAR[k], j ? "input_scale" : "weight_scale_2");
      t = st_find(f, name);
      float v = 0;
      if (t && t->nbytes == 4) memcpy(&v, t->data, 4);
      CHECK(t && t->dtype == ST_F32 && t->ndim == 0 && (j ? v == 1.0f : v > 0),
            "%s: F32 scalar%s", name, j ? " 1.0" : "");
    }
    snprintf(name, sizeof name, "model.layers.1.%s.weight", LINEAR[k]);
    t = st_find(f, name);
    CHECK(t && t->dtype == ST_BF16 && t->shape[0] == s[0] && t->shape[1] == s[1],
          "%s (outside the range): BF16 [out, in]", name);
    snprintf(name, sizeof name, "model.layers.1.%s.weight_scale", LINEAR[k]);
    CHECK(!st_find(f, name), "%s: absent", name);
  }
  const struct st_tensor *e = st_find(f, "model.embed_tokens.weight");
  CHECK(e && e->dtype == ST_BF16, "embed_tokens: BF16");
  st_close(f);
  /* (b) exact values; q (its group's amax), o and down are the training forward's own */
  struct st_model *m;
  if (st_model_open(&m, hf, err, sizeof err) != 0) {
    CHECK(0, "open %s: %s", hf, err);
    return;
  }
  values_match(m, 0, NVFP4_BLOCK_16X16);
  float alone[64 * 128], got[64 * 64];
  int64_t rows;
  for (int k = 0; k < 7; k += 3) {   /* q, o, down */
    int64_t s[2];
    linear_shape(&CFG, k, s);
    expected(&CFG, k, 1, NVFP4_BLOCK_16X16, alone, &rows);
    snprintf(name, sizeof name, "model.layers.0.%s", LINEAR[k]);
    CHECK(served(m, name, s[0], s[1], got) == 0 &&
              !memcmp(got, alone, (size_t)(s[0] * s[1]) * sizeof(float)),
          "%s: the training forward's 16x16 values, bit for bit", name);
  }
  st_model_close(m);
  check_json(hf, 1);
}

/* A converted model records no training: every layer quantized, 1x16 blocks; and shards. */
static void test_no_record_sharded(void) {
  CHECK(write_checkpoint(in_dir("plain"), &CFG, NULL, 0, 0) == 0, "checkpoint: %s", err);
  const char *hf = in_dir("hf_plain");
  struct nvfp4_export_report r;
  make_dirs(hf);
  CHECK(nvfp4_export(in_dir("plain"), hf, 3000, &r, err, sizeof err) == 0, "export: %s", err);
  CHECK(!r.recorded && r.first_layer == 0 && r.end_layer == 2 && !r.weight_2d && r.n_shards > 1,
        "every layer, 1x16, %d shards", r.n_shards);
  struct st_model *m;
  CHECK(st_model_open(&m, hf, err, sizeof err) == 0, "sharded model opens: %s", err);
  if (!m) return;
  size_t n = st_model_count(m);
  CHECK(n == r.n_tensors && n == 2 + 2 * (7 * 4 + 4), "%zu tensors in the index", n);
  /* the loaders read each module from the file the index names: a fused group stays whole */
  const struct st_tensor *q = st_model_find(m, "model.layers.1.self_attn.q_proj.weight_scale_2");
  const struct st_tensor *v = st_model_find(m, "model.layers.1.self_attn.v_proj.weight");
  CHECK(q && v && !strcmp(q->path, v->path), "q_proj and v_proj in one shard");
  values_match(m, 0, NVFP4_BLOCK_1X16);
  values_match(m, 1, NVFP4_BLOCK_1X16);
  st_model_close(m);
  check_json(hf, 0);
}

/* precision.bf16_first_layers -1 is the first 2 blocks (one per 8 below 16); a stored job
 * without the field was written when the default was 0 (checkpoint_save writes it now), so it
 * reads as 0, not as the default. */
static void test_first_layers(void) {
  static const int L[] = {2, 7, 8, 15, 16, 28, 36}, WANT[] = {0, 0, 1, 1, 2, 2, 2};
  Qwen3__Precision p = QWEN3__PRECISION__INIT;
  for (size_t i = 0; i < sizeof L / sizeof L[0]; i++)
    CHECK(nvfp4_bf16_first_layers(&p, L[i]) == WANT[i], "default at %d layers: %d (want %d)",
          L[i], nvfp4_bf16_first_layers(&p, L[i]), WANT[i]);
  p.has_bf16_first_layers = 1, p.bf16_first_layers = 0;
  CHECK(nvfp4_bf16_first_layers(&p, 36) == 0, "an explicit 0 is kept");
  p.bf16_first_layers = 5;
  CHECK(nvfp4_bf16_first_layers(&p, 36) == 5, "an explicit 5 is kept");

  for (int set = 0; set < 2; set++) {
    Qwen3__Job job = QWEN3__JOB__INIT;
    Qwen3__Precision q = QWEN3__PRECISION__INIT;
    q.has_linear = 1, q.linear = QWEN3__LINEAR_PRECISION__NVFP4;
    q.has_bf16_first_layers = set, q.bf16_first_layers = set ? 1 : -1;
    job.precision = &q;
    uint8_t bytes[64];
    size_t n = qwen3__job__pack(&job, bytes);
    Qwen3__Job *back = qwen3__job__unpack(NULL, n, bytes);
    CHECK(back && back->precision, "the stored job unpacks");
    if (!back || !back->precision) continue;
    const int stored = nvfp4_stored_first_layers(back->precision, 28);
    CHECK(stored == (set ? 1 : 0) && nvfp4_bf16_first_layers(back->precision, 28) == (set ? 1 : 2),
          "a stored job %s the field reads as %d first BF16 layers (want %d)",
          set ? "with 1 in" : "without", stored, set ? 1 : 0);
    qwen3__job__free_unpacked(back, NULL);
  }
}

static void test_refusals(void) {
  /* in_features 24: not a multiple of 16 */
  struct qwen3_config c = CFG;
  c.hidden_size = 24;
  CHECK(write_checkpoint(in_dir("narrow"), &c, NULL, 0, 0) == 0, "checkpoint: %s", err);
  make_dirs(in_dir("hf_narrow"));
  CHECK(nvfp4_export(in_dir("narrow"), in_dir("hf_narrow"), 5e9, NULL, err, sizeof err) != 0 &&
            strstr(err, "model.layers.0.self_attn.q_proj.weight") &&
            strstr(err, "in_features 24, not a multiple of 16"),
        "in_features 24 refused, naming the tensor: %s", err);
  CHECK(access(in_dir("hf_narrow/config.json"), F_OK) != 0, "and no config.json written");

  CHECK(write_checkpoint(in_dir("nan"), &CFG, NULL, 0, 1) == 0, "checkpoint: %s", err);
  make_dirs(in_dir("hf_nan"));
  CHECK(nvfp4_export(in_dir("nan"), in_dir("hf_nan"), 5e9, NULL, err, sizeof err) != 0 &&
            strstr(err, "non-finite"),
        "a NaN weight refused: %s", err);

  char cmd[8192];
  snprintf(cmd, sizeof cmd, "'%s' h52hf '%s' '%s' --nvfp4 --dtype fp32 >'%s/log' 2>&1", g_convert,
           in_dir("ck"), in_dir("hf_fp32"), g_dir);
  CHECK(system(cmd) != 0 && access(in_dir("hf_fp32/config.json"), F_OK) != 0,
        "qwen3-convert refuses --nvfp4 with --dtype fp32");
}

int main(void) {
  g_dir = checks_dir("qwen3-nvfp4x");
  test_program(g_convert, sizeof g_convert, "qwen3-convert");
  test_recorded_job();
  test_no_record_sharded();
  test_refusals();
  test_first_layers();
  return checks_report_in(g_dir);
}
