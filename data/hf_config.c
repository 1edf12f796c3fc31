#define _POSIX_C_SOURCE 200809L
#include "data/hf_config.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

/* transformers' Qwen3Config defaults for keys a config.json may leave out. */
#define QWEN3_DEFAULT_KV_HEADS 32
#define QWEN3_DEFAULT_HEAD_DIM 128
#define QWEN3_DEFAULT_ROPE_THETA 10000.0
#define QWEN3_DEFAULT_RMS_EPS 1e-6
#define QWEN3_DEFAULT_MAX_POS 32768

/* A positive int; absent gives def, or an error when def is 0 (required). */
static int get_int(json_t *root, const char *path, const char *key, int def, int *out, char *err, size_t errlen) {
  json_t *v = json_object_get(root, key);
  if (!v) {
    if (!def) return errorf(err, errlen, "%s: %s is missing", path, key);
    *out = def;
    return 0;
  }
  if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > INT_MAX)
    return errorf(err, errlen, "%s: %s must be a positive integer", path, key);
  *out = (int)json_integer_value(v);
  return 0;
}

/* A positive finite number; absent gives def. */
static int get_positive(json_t *obj, const char *path, const char *key, double def, double *out, char *err,
                        size_t errlen) {
  json_t *v = json_object_get(obj, key);
  if (!v) {
    *out = def;
    return 0;
  }
  if (!json_is_number(v) || !(json_number_value(v) > 0) || !isfinite(json_number_value(v)))
    return errorf(err, errlen, "%s: %s must be a positive number", path, key);
  *out = json_number_value(v);
  return 0;
}

/* A boolean; absent or null gives 0. */
static int get_bool(json_t *root, const char *path, const char *key, int *out, char *err, size_t errlen) {
  json_t *v = json_object_get(root, key);
  if (v && !json_is_boolean(v) && !json_is_null(v)) return errorf(err, errlen, "%s: %s must be true or false", path, key);
  *out = json_is_true(v);
  return 0;
}

/* The rope_theta of a "rope_parameters" (or transformers 5's "rope_scaling" alias) object:
 * *theta stays 0 when it names none. Only the plain "default" rotation is accepted. */
static int get_rope_object(json_t *root, const char *path, const char *key, double *theta, char *err,
                           size_t errlen) {
  json_t *v = json_object_get(root, key);
  if (!v || json_is_null(v)) return 0;
  if (!json_is_object(v)) return errorf(err, errlen, "%s: %s must be an object or null", path, key);
  json_t *type = json_object_get(v, "rope_type");
  if (!type) type = json_object_get(v, "type");
  if (type && (!json_is_string(type) || strcmp(json_string_value(type), "default") != 0))
    return errorf(err, errlen, "%s: %s: RoPE scaling '%s' is not supported (only plain RoPE)", path, key,
                json_is_string(type) ? json_string_value(type) : "?");
  if (!type && json_object_size(v) > (json_object_get(v, "rope_theta") ? 1u : 0u))
    return errorf(err, errlen, "%s: %s: RoPE scaling without a rope_type is not supported (only plain RoPE)", path,
                key);
  json_t *t = json_object_get(v, "rope_theta");
  if (t && (!json_is_number(t) || !(json_number_value(t) > 0) || !isfinite(json_number_value(t))))
    return errorf(err, errlen, "%s: %s.rope_theta must be a positive number", path, key);
  *theta = t ? json_number_value(t) : 0;
  return 0;
}

static int get_rope_theta(json_t *root, const char *path, double *theta, char *err, size_t errlen) {
  double top, params = 0, alias = 0;
  if (get_positive(root, path, "rope_theta", 0, &top, err, errlen) ||
      get_rope_object(root, path, "rope_parameters", &params, err, errlen) ||
      get_rope_object(root, path, "rope_scaling", &alias, err, errlen))
    return -1;
  double found[3] = {top, params, alias};
  static const char *const where[3] = {"rope_theta", "rope_parameters.rope_theta", "rope_scaling.rope_theta"};
  *theta = 0;
  for (int i = 0; i < 3; i++) {
    if (found[i] == 0) continue;
    if (*theta != 0 && found[i] != *theta)
      return errorf(err, errlen, "%s: %s = %g disagrees with another rope_theta = %g", path, where[i], found[i], *theta);
    *theta = found[i];
  }
  if (*theta == 0) *theta = QWEN3_DEFAULT_ROPE_THETA;
  return 0;
}

/* The features of other models that Qwen3Config can carry but this engine does not compute. */
static int refuse_unsupported(json_t *root, const char *path, char *err, size_t errlen) {
  json_t *v = json_object_get(root, "model_type");
  if (!json_is_string(v)) return errorf(err, errlen, "%s: model_type missing or not a string (expected \"qwen3\")", path);
  if (strcmp(json_string_value(v), "qwen3") != 0)
    return errorf(err, errlen, "%s: model_type is '%s'; only 'qwen3' models are supported", path, json_string_value(v));
  v = json_object_get(root, "hidden_act");
  if (v && (!json_is_string(v) || strcmp(json_string_value(v), "silu") != 0))
    return errorf(err, errlen, "%s: hidden_act is '%s'; only 'silu' is supported", path,
                json_is_string(v) ? json_string_value(v) : "?");
  int flag = 0;
  if (get_bool(root, path, "attention_bias", &flag, err, errlen)) return -1;
  if (flag) return errorf(err, errlen, "%s: attention_bias is true; biases are not supported", path);
  if (get_bool(root, path, "use_sliding_window", &flag, err, errlen)) return -1;
  if (flag) return errorf(err, errlen, "%s: use_sliding_window is true; sliding-window attention is not supported", path);
  v = json_object_get(root, "layer_types");
  if (v && !json_is_null(v)) {
    if (!json_is_array(v)) return errorf(err, errlen, "%s: layer_types must be an array", path);
    for (size_t i = 0; i < json_array_size(v); i++) {
      const char *s = json_string_value(json_array_get(v, i));
      if (!s || strcmp(s, "full_attention") != 0)
        return errorf(err, errlen, "%s: layer_types[%zu] is '%s'; only 'full_attention' is supported", path, i,
                    s ? s : "?");
    }
  }
  return 0;
}

/* What the engine needs of any config, loaded or about to be written. */
static int check_config(const struct qwen3_config *c, const char *path, char *err, size_t errlen) {
  if (c->hidden_size < 1 || c->num_layers < 1 || c->num_heads < 1 || c->num_kv_heads < 1 || c->head_dim < 1 ||
      c->intermediate_size < 1 || c->vocab_size < 1 || c->max_seq_len < 1)
    return errorf(err, errlen, "%s: every size must be positive", path);
  if (c->num_heads % c->num_kv_heads != 0)
    return errorf(err, errlen, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d", path,
                c->num_heads, c->num_kv_heads);
  if (c->head_dim % 2 != 0)
    return errorf(err, errlen, "%s: head_dim %d must be even (RoPE rotates pairs of halves)", path, c->head_dim);
  if (!(c->rope_theta > 0) || !isfinite(c->rope_theta) || !(c->rms_norm_eps > 0) || !isfinite(c->rms_norm_eps))
    return errorf(err, errlen, "%s: rope_theta and rms_norm_eps must be positive", path);
  return 0;
}

static int parse(struct qwen3_config *c, json_t *root, const char *path, char *err, size_t errlen) {
  if (!json_is_object(root)) return errorf(err, errlen, "%s: not a JSON object", path);
  if (refuse_unsupported(root, path, err, errlen)) return -1;
  if (get_int(root, path, "hidden_size", 0, &c->hidden_size, err, errlen) ||
      get_int(root, path, "num_hidden_layers", 0, &c->num_layers, err, errlen) ||
      get_int(root, path, "num_attention_heads", 0, &c->num_heads, err, errlen) ||
      get_int(root, path, "intermediate_size", 0, &c->intermediate_size, err, errlen) ||
      get_int(root, path, "vocab_size", 0, &c->vocab_size, err, errlen) ||
      get_int(root, path, "head_dim", QWEN3_DEFAULT_HEAD_DIM, &c->head_dim, err, errlen) ||
      get_int(root, path, "max_position_embeddings", QWEN3_DEFAULT_MAX_POS, &c->max_seq_len, err, errlen) ||
      get_positive(root, path, "rms_norm_eps", QWEN3_DEFAULT_RMS_EPS, &c->rms_norm_eps, err, errlen) ||
      get_rope_theta(root, path, &c->rope_theta, err, errlen) ||
      get_bool(root, path, "tie_word_embeddings", &c->tie_embeddings, err, errlen))
    return -1;
  /* Qwen3Config: an explicit null means "as many as the query heads"; absent means its default. */
  if (json_is_null(json_object_get(root, "num_key_value_heads"))) c->num_kv_heads = c->num_heads;
  else if (get_int(root, path, "num_key_value_heads", QWEN3_DEFAULT_KV_HEADS, &c->num_kv_heads, err, errlen)) return -1;
  return check_config(c, path, err, errlen);
}

int hf_config_load(struct qwen3_config *c, const char *path, char *err, size_t errlen) {
  memset(c, 0, sizeof *c);
  json_error_t jerr;
  json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) return errorf(err, errlen, "%s: cannot read JSON: %s (line %d)", path, jerr.text, jerr.line);
  int rc = parse(c, root, path, err, errlen);
  json_decref(root);
  if (rc) memset(c, 0, sizeof *c);
  return rc;
}

/* Significant digits to print x with: 15 writes 1e6 as 1000000.0 and 1e-6 as 1e-6 (17 would
 * write 9.9999999999999995e-07); more only where 15 would not read back exactly. */
static int digits_for(double x) {
  char buf[40];
  for (int p = 15; p < 17; p++) {
    snprintf(buf, sizeof buf, "%.*g", p, x);
    if (strtod(buf, NULL) == x) return p;
  }
  return 17;
}

int hf_config_write(const char *path, const struct qwen3_config *c, const char *torch_dtype, char *err,
                    size_t errlen) {
  if (check_config(c, path, err, errlen)) return -1;
  if (!torch_dtype || (strcmp(torch_dtype, "bfloat16") != 0 && strcmp(torch_dtype, "float32") != 0))
    return errorf(err, errlen, "%s: torch_dtype must be \"bfloat16\" or \"float32\"", path);
  json_t *root = json_pack(
    "{s:[s], s:b, s:f, s:i, s:s, s:i, s:f, s:i, s:i, s:i, s:s, s:i, s:i, s:i, s:f, s:n, s:f, s:n, s:b, s:s, s:b,"
    " s:b, s:i}",
    "architectures", "Qwen3ForCausalLM", "attention_bias", 0, "attention_dropout", 0.0, "head_dim", c->head_dim,
    "hidden_act", "silu", "hidden_size", c->hidden_size, "initializer_range", 0.02, "intermediate_size",
    c->intermediate_size, "max_position_embeddings", c->max_seq_len, "max_window_layers", c->num_layers,
    "model_type", "qwen3", "num_attention_heads", c->num_heads, "num_hidden_layers", c->num_layers,
    "num_key_value_heads", c->num_kv_heads, "rms_norm_eps", c->rms_norm_eps, "rope_scaling", "rope_theta",
    c->rope_theta, "sliding_window", "tie_word_embeddings", c->tie_embeddings != 0, "torch_dtype", torch_dtype,
    "use_cache", 1, "use_sliding_window", 0, "vocab_size", c->vocab_size);
  if (!root) return errorf(err, errlen, "%s: cannot build the JSON", path);
  int digits = digits_for(c->rope_theta);
  if (digits_for(c->rms_norm_eps) > digits) digits = digits_for(c->rms_norm_eps);
  char *text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(digits));
  json_decref(root);
  if (!text) return errorf(err, errlen, "%s: cannot encode the JSON", path);

  size_t tlen = strlen(path) + 32;
  char *tmp = xmalloc(tlen);
  snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
  int rc = 0;
  FILE *f = fopen(tmp, "w");
  if (!f) rc = errorf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
  else {
    int bad = fputs(text, f) == EOF || fputc('\n', f) == EOF || fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad = (fclose(f) != 0) || bad;
    if (bad) rc = errorf(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
    else if (rename(tmp, path) != 0) rc = errorf(err, errlen, "%s: cannot rename into place: %s", path, strerror(errno));
    if (rc) unlink(tmp);
  }
  free(tmp);
  free(text);
  return rc;
}
