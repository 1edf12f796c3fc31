/* data/hf_config: both rope_theta forms, transformers' defaults, every refusal naming the file and
 * key, and write -> load round trips. */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/hf_config.h"

static int n_pass, n_fail;
static char g_path[64];

static void check(int ok, const char *what) {
  printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (ok) n_pass++;
  else n_fail++;
}

/* The config.json of Qwen3-4B-Instruct-2507, as published. */
static const char *QWEN3_4B =
  "{\"architectures\":[\"Qwen3ForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
  "\"bos_token_id\":151643,\"eos_token_id\":151645,\"head_dim\":128,\"hidden_act\":\"silu\","
  "\"hidden_size\":2560,\"initializer_range\":0.02,\"intermediate_size\":9728,"
  "\"max_position_embeddings\":262144,\"max_window_layers\":36,\"model_type\":\"qwen3\","
  "\"num_attention_heads\":32,\"num_hidden_layers\":36,\"num_key_value_heads\":8,\"rms_norm_eps\":1e-06,"
  "\"rope_scaling\":null,\"rope_theta\":5000000,\"sliding_window\":null,\"tie_word_embeddings\":true,"
  "\"torch_dtype\":\"bfloat16\",\"transformers_version\":\"4.51.0\",\"use_cache\":true,"
  "\"use_sliding_window\":false,\"vocab_size\":151936}";

/* Writes QWEN3_4B with key set to value (a JSON text) or, when value is NULL, removed. Up to two
 * edits: key2/value2 may be NULL for none. */
static void write_edited(const char *key, const char *value, const char *key2, const char *value2) {
  json_t *root = json_loads(QWEN3_4B, 0, NULL);
  const char *keys[2] = {key, key2}, *values[2] = {value, value2};
  for (int i = 0; i < 2; i++) {
    if (!keys[i]) continue;
    if (values[i]) json_object_set_new(root, keys[i], json_loads(values[i], JSON_DECODE_ANY, NULL));
    else json_object_del(root, keys[i]);
  }
  if (json_dump_file(root, g_path, 0) != 0) die("cannot write %s", g_path);
  json_decref(root);
}

static int load(struct qwen3_config *c, char *err, size_t errlen) { return hf_config_load(c, g_path, err, errlen); }

static void expect_refused(const char *what, const char *want) {
  struct qwen3_config c;
  char err[1024] = "", label[1200];
  int rc = load(&c, err, sizeof err);
  snprintf(label, sizeof label, "refuses %s: %s", what, err);
  check(rc == -1 && strstr(err, g_path) && strstr(err, want) && c.hidden_size == 0, label);
}

static void test_published(void) {
  struct qwen3_config c;
  char err[1024];
  write_edited(NULL, NULL, NULL, NULL);
  int rc = load(&c, err, sizeof err);
  check(rc == 0, rc ? err : "loads the Qwen3-4B-Instruct-2507 config");
  check(c.hidden_size == 2560 && c.num_layers == 36 && c.num_heads == 32 && c.num_kv_heads == 8 &&
          c.head_dim == 128 && c.intermediate_size == 9728 && c.vocab_size == 151936,
        "4B sizes");
  check(c.rope_theta == 5e6 && c.rms_norm_eps == 1e-6 && c.tie_embeddings == 1 && c.max_seq_len == 262144,
        "4B rope_theta (an integer in the file), eps, tied, max_position_embeddings");
}

static void test_rope_forms(void) {
  struct qwen3_config c;
  char err[1024];
  write_edited("rope_theta", NULL, "rope_parameters", "{\"rope_theta\":1000000.0,\"rope_type\":\"default\"}");
  int rc = load(&c, err, sizeof err);
  check(rc == 0 && c.rope_theta == 1e6, rc ? err : "rope_theta from rope_parameters (transformers 5)");
  write_edited("rope_parameters", "{\"rope_theta\":5000000,\"rope_type\":\"default\"}", NULL, NULL);
  rc = load(&c, err, sizeof err);
  check(rc == 0 && c.rope_theta == 5e6, rc ? err : "rope_theta in both places, agreeing");
  write_edited("rope_scaling", "{\"rope_type\":\"default\",\"rope_theta\":5000000}", NULL, NULL);
  rc = load(&c, err, sizeof err);
  check(rc == 0 && c.rope_theta == 5e6, rc ? err : "rope_scaling of type default (transformers 5 alias)");
  write_edited("rope_parameters", "{\"rope_theta\":1000000,\"rope_type\":\"default\"}", NULL, NULL);
  expect_refused("two different rope_theta", "rope_parameters.rope_theta");
  write_edited("rope_scaling", "{\"rope_type\":\"yarn\",\"factor\":4.0}", NULL, NULL);
  expect_refused("rope_scaling yarn", "rope_scaling: RoPE scaling 'yarn' is not supported");
  write_edited("rope_scaling", "{\"type\":\"linear\",\"factor\":2.0}", NULL, NULL);
  expect_refused("rope_scaling of the old 'type' form", "'linear'");
  write_edited("rope_parameters", "{\"rope_type\":\"llama3\",\"rope_theta\":5000000}", NULL, NULL);
  expect_refused("rope_parameters llama3", "rope_parameters: RoPE scaling 'llama3'");
  write_edited("rope_scaling", "{\"factor\":2.0}", NULL, NULL);
  expect_refused("rope_scaling without a type", "rope_scaling: RoPE scaling without a rope_type");
  write_edited("rope_theta", "-5", NULL, NULL);
  expect_refused("a negative rope_theta", "rope_theta");
}

static void test_defaults(void) {
  struct qwen3_config c;
  char err[1024];
  json_t *root = json_loads(QWEN3_4B, 0, NULL);
  static const char *const optional[] = {"head_dim", "num_key_value_heads", "rope_theta", "rms_norm_eps",
                                         "tie_word_embeddings", "max_position_embeddings", "hidden_act",
                                         "attention_bias", "rope_scaling", "use_sliding_window"};
  for (size_t i = 0; i < sizeof optional / sizeof optional[0]; i++) json_object_del(root, optional[i]);
  json_dump_file(root, g_path, 0);
  int rc = load(&c, err, sizeof err);
  check(rc == 0, rc ? err : "loads a config with every optional key absent");
  check(c.head_dim == 128 && c.num_kv_heads == 32 && c.rope_theta == 10000.0 && c.rms_norm_eps == 1e-6 &&
          c.tie_embeddings == 0 && c.max_seq_len == 32768,
        "absent keys take Qwen3Config's defaults (head_dim 128, kv heads 32, theta 1e4, eps 1e-6, untied, 32768)");
  json_object_set_new(root, "num_key_value_heads", json_null());
  json_object_set_new(root, "num_attention_heads", json_integer(16));
  json_dump_file(root, g_path, 0);
  rc = load(&c, err, sizeof err);
  check(rc == 0 && c.num_kv_heads == 16, rc ? err : "num_key_value_heads null = num_attention_heads");
  json_object_set_new(root, "num_attention_heads", json_integer(4));
  json_object_del(root, "num_key_value_heads");
  json_dump_file(root, g_path, 0);
  expect_refused("4 heads with the default 32 kv heads", "not a multiple of num_key_value_heads 32");
  json_decref(root);
}

static void test_refusals(void) {
  write_edited("model_type", "\"llama\"", NULL, NULL);
  expect_refused("model_type llama", "model_type is 'llama'");
  write_edited("model_type", "\"qwen3_moe\"", NULL, NULL);
  expect_refused("model_type qwen3_moe", "model_type is 'qwen3_moe'");
  write_edited("model_type", NULL, NULL, NULL);
  expect_refused("a missing model_type", "model_type missing");
  write_edited("hidden_act", "\"gelu\"", NULL, NULL);
  expect_refused("hidden_act gelu", "hidden_act is 'gelu'");
  write_edited("attention_bias", "true", NULL, NULL);
  expect_refused("attention_bias true", "attention_bias");
  write_edited("use_sliding_window", "true", NULL, NULL);
  expect_refused("sliding windows", "use_sliding_window");
  write_edited("layer_types", "[\"full_attention\",\"sliding_attention\"]", NULL, NULL);
  expect_refused("a sliding layer type", "layer_types[1]");
  write_edited("hidden_size", NULL, NULL, NULL);
  expect_refused("a missing hidden_size", "hidden_size is missing");
  write_edited("vocab_size", "-3", NULL, NULL);
  expect_refused("a negative vocab_size", "vocab_size must be a positive integer");
  write_edited("intermediate_size", "9728.5", NULL, NULL);
  expect_refused("a fractional intermediate_size", "intermediate_size must be a positive integer");
  write_edited("num_hidden_layers", "\"36\"", NULL, NULL);
  expect_refused("a layer count given as a string", "num_hidden_layers");
  write_edited("num_key_value_heads", "5", NULL, NULL);
  expect_refused("heads not a multiple of kv heads", "num_attention_heads 32 is not a multiple");
  write_edited("head_dim", "127", NULL, NULL);
  expect_refused("an odd head_dim", "head_dim 127 must be even");
  write_edited("tie_word_embeddings", "\"yes\"", NULL, NULL);
  expect_refused("a non-boolean tie_word_embeddings", "tie_word_embeddings must be true or false");
  write_edited("rms_norm_eps", "0", NULL, NULL);
  expect_refused("a zero rms_norm_eps", "rms_norm_eps");
  FILE *f = fopen(g_path, "w");
  fputs("{\"model_type\": \"qwen3\",", f);
  fclose(f);
  expect_refused("bad JSON", "cannot read JSON");
  unlink(g_path);
  expect_refused("a missing file", "cannot read JSON");
}

static int same_config(const struct qwen3_config *a, const struct qwen3_config *b) {
  return a->hidden_size == b->hidden_size && a->num_layers == b->num_layers && a->num_heads == b->num_heads &&
         a->num_kv_heads == b->num_kv_heads && a->head_dim == b->head_dim &&
         a->intermediate_size == b->intermediate_size && a->vocab_size == b->vocab_size &&
         a->rope_theta == b->rope_theta && a->rms_norm_eps == b->rms_norm_eps &&
         a->tie_embeddings == b->tie_embeddings && a->max_seq_len == b->max_seq_len;
}

static void test_write(void) {
  const struct qwen3_config cases[] = {
    {48, 2, 4, 2, 16, 96, 300, 1e6, 1e-6, 1, 128},
    {64, 3, 6, 3, 8, 100, 64, 5e6, 1e-5, 0, 4096},
    {2560, 36, 32, 8, 128, 9728, 151936, 1.0 / 3.0, 3e-7, 1, 262144},
  };
  char err[1024], label[128];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct qwen3_config back;
    int rc = hf_config_write(g_path, &cases[i], i ? "bfloat16" : "float32", err, sizeof err);
    if (rc == 0) rc = load(&back, err, sizeof err);
    snprintf(label, sizeof label, "write -> load round trip %zu is exact", i);
    check(rc == 0 && same_config(&back, &cases[i]), rc ? err : label);
  }
  size_t len;
  char *text = read_file(g_path, &len);
  check(text && strstr(text, "\"Qwen3ForCausalLM\"") && strstr(text, "\"model_type\": \"qwen3\"") &&
          strstr(text, "\"torch_dtype\": \"bfloat16\"") && strstr(text, "\"hidden_act\": \"silu\"") &&
          strstr(text, "\"attention_bias\": false") && strstr(text, "\"rope_scaling\": null"),
        "written config names Qwen3ForCausalLM, qwen3, bfloat16, silu, no bias, no rope scaling");
  free(text);
  hf_config_write(g_path, &cases[0], "float32", err, sizeof err);
  text = read_file(g_path, &len);
  check(text && strstr(text, "\"rms_norm_eps\": 1e-6,") && strstr(text, "\"rope_theta\": 1000000.0,"),
        "reals written short (1e-6, 1000000.0), not 9.9999999999999995e-07");
  free(text);
  check(hf_config_write(g_path, &cases[0], "float16", err, sizeof err) == -1 && strstr(err, "torch_dtype"),
        "writer refuses an unknown torch_dtype");
  struct qwen3_config bad = cases[0];
  bad.num_kv_heads = 3;
  check(hf_config_write(g_path, &bad, "float32", err, sizeof err) == -1 && strstr(err, "num_key_value_heads 3"),
        "writer refuses an inconsistent config");
  unlink(g_path);
}

int main(void) {
  double t0 = now_seconds();
  snprintf(g_path, sizeof g_path, "/tmp/qwen3_test_hf_config_%ld.json", (long)getpid());
  test_published();
  test_rope_forms();
  test_defaults();
  test_refusals();
  test_write();
  unlink(g_path);
  printf("(%.3f s)\n", now_seconds() - t0);
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}
