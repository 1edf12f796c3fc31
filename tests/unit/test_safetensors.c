/* data/safetensors: write/read round trips, bf16 rounding, every kind of malformed file refused
 * with a message that names the problem, and sharded model directories. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/safetensors.h"

static int n_pass, n_fail;
static char g_dir[64];

static void check(int ok, const char *what) {
  printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (ok) n_pass++;
  else n_fail++;
}

static char *path_in(const char *name) {
  static char buf[8][256];
  static int k;
  char *p = buf[k++ % 8];
  snprintf(p, 256, "%s/%s", g_dir, name);
  return p;
}

static uint32_t bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}

static float from_bits(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

/* A hand-made file: header length (hlen, or strlen(header) when hlen is 0), header, data. */
static void write_raw(const char *path, uint64_t hlen, const char *header, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) die("cannot create %s", path);
  if (!hlen) hlen = strlen(header);
  fwrite(&hlen, 8, 1, f);
  fwrite(header, 1, strlen(header), f);
  if (len) fwrite(data, 1, len, f);
  fclose(f);
}

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f) die("cannot create %s", path);
  fputs(text, f);
  fclose(f);
}

/* Opening path must fail with a message containing the file's path and want. */
static void expect_refused(const char *what, const char *path, const char *want) {
  struct st_file *f;
  char err[1024] = "", label[1200];
  int rc = st_open(&f, path, err, sizeof err);
  int ok = rc == -1 && !f && strstr(err, path) && strstr(err, want);
  snprintf(label, sizeof label, "refuses %s: %s", what, err);
  check(ok, label);
  if (!rc) st_close(f);
}

/* A raw file of 16 zero data bytes with the given header. */
static void expect_header_refused(const char *what, const char *header, const char *want) {
  static const unsigned char zeros[16];
  const char *p = path_in("bad.safetensors");
  write_raw(p, 0, header, zeros, sizeof zeros);
  expect_refused(what, p, want);
}

static void test_round_trip(void) {
  /* Values that a careless copy would change: NaN with payload, -0, infinities, a subnormal. */
  float a[6] = {from_bits(0x7fc12345u), -0.0f, INFINITY, -INFINITY, from_bits(0x00000001u), 3.14159265f};
  float s = 42.5f, b[5] = {1.0f, -2.5f, 1e-3f, 65504.0f, from_bits(0x3f808000u)};
  struct st_write_tensor ts[] = {
    {.name = "zeta.weight", .dtype = ST_F32, .ndim = 2, .shape = {2, 3}, .data = a},
    {.name = "alpha", .dtype = ST_F32, .ndim = 0, .data = &s},
    {.name = "empty", .dtype = ST_F32, .ndim = 2, .shape = {0, 4}, .data = NULL},
    {.name = "model.b", .dtype = ST_BF16, .ndim = 1, .shape = {5}, .data = b},
  };
  char err[1024];
  const char *p = path_in("rt.safetensors");
  int rc = st_write(p, ts, 4, 1, err, sizeof err);
  check(rc == 0, rc ? err : "writes 4 tensors (F32, scalar, empty, BF16)");
  struct st_file *f;
  rc = st_open(&f, p, err, sizeof err);
  check(rc == 0, rc ? err : "reopens the written file");
  if (rc) return;
  check(st_count(f) == 4, "holds 4 tensors");
  check(strcmp(st_tensor_at(f, 0)->name, "alpha") == 0 && strcmp(st_tensor_at(f, 3)->name, "zeta.weight") == 0,
        "tensors listed sorted by name");
  check(st_metadata(f, "format") && strcmp(st_metadata(f, "format"), "pt") == 0, "__metadata__ format = pt");
  const struct st_tensor *t = st_find(f, "zeta.weight");
  float back[6];
  check(t && t->dtype == ST_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6,
        "F32 dtype and shape kept");
  check(t && st_read_f32(t, back, 6, err, sizeof err) == 0 && memcmp(back, a, sizeof a) == 0,
        "F32 round trip is bit-exact (NaN payload, -0, inf, subnormal)");
  t = st_find(f, "alpha");
  check(t && t->ndim == 0 && t->numel == 1 && st_read_f32(t, back, 1, err, sizeof err) == 0 && back[0] == 42.5f,
        "scalar round trip");
  t = st_find(f, "empty");
  check(t && t->numel == 0 && t->nbytes == 0 && t->shape[1] == 4, "empty tensor round trip");
  t = st_find(f, "model.b");
  int ok = t && t->dtype == ST_BF16 && st_read_f32(t, back, 5, err, sizeof err) == 0;
  for (int i = 0; ok && i < 5; i++) ok = bits(back[i]) == ((uint32_t)st_f32_to_bf16(b[i]) << 16);
  check(ok, "BF16 tensor reads back as the rounded values");
  check(st_find(f, "nope") == NULL, "find of an absent name gives NULL");
  check(t && st_read_f32(t, back, 4, err, sizeof err) == -1 && strstr(err, "model.b"),
        "read with the wrong element count refused");
  st_close(f);

  /* The layout Hugging Face writes: 8-byte aligned header padded with spaces, metadata first. */
  size_t len;
  char *raw = read_file(p, &len);
  uint64_t hlen;
  memcpy(&hlen, raw, 8);
  check(hlen % 8 == 0 && strncmp(raw + 8, "{\"__metadata__\":{\"format\":\"pt\"},\"alpha\":", 40) == 0,
        "header 8-byte aligned, metadata first, names sorted");
  size_t close = hlen;
  while (close > 0 && raw[8 + close - 1] == ' ') close--;
  check(close > 0 && raw[8 + close - 1] == '}' && hlen - close < 8, "header padded with fewer than 8 spaces");
  check(len == 8 + hlen + 6 * 4 + 4 + 5 * 2, "file size = header + data exactly");
  free(raw);
}

static void test_bf16(void) {
  static const struct { uint32_t in; uint16_t out; const char *what; } cases[] = {
    {0x3f800000u, 0x3f80, "1.0 exact"},
    {0x3f808000u, 0x3f80, "1 + 2^-8: tie rounds to even (down)"},
    {0x3f818000u, 0x3f82, "1 + 3*2^-8: tie rounds to even (up)"},
    {0x3f808001u, 0x3f81, "just above a tie rounds up"},
    {0x3f807fffu, 0x3f80, "just below a tie rounds down"},
    {0xbf818000u, 0xbf82, "negative tie to even"},
    {0x7f7fffffu, 0x7f80, "FLT_MAX rounds to inf"},
    {0x7f800000u, 0x7f80, "inf stays inf"},
    {0x80000000u, 0x8000, "-0 stays -0"},
    {0x00018000u, 0x0002, "subnormal tie to even"},
    {0x3fffffffu, 0x4000, "carry into the exponent"},
  };
  char label[160];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint16_t got = st_f32_to_bf16(from_bits(cases[i].in));
    snprintf(label, sizeof label, "bf16(0x%08x) = 0x%04x: %s", cases[i].in, got, cases[i].what);
    check(got == cases[i].out, label);
  }
  uint16_t nan = st_f32_to_bf16(from_bits(0x7f800001u));
  check((nan & 0x7f80) == 0x7f80 && (nan & 0x7f), "signalling NaN with low payload stays NaN");
  check(st_bf16_to_f32(0x3fc0) == 1.5f, "bf16 0x3fc0 -> 1.5");
}

static void test_other_dtypes(void) {
  /* F16: 1.0, -2.0, 65504 (max), smallest subnormal 2^-24, inf; F64: 0.1 and -1e300 (-> -inf). */
  uint16_t h[5] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00};
  double d[2] = {0.1, -1e300};
  int32_t ints[2] = {7, -7};
  unsigned char data[10 + 16 + 8];
  memcpy(data, h, 10);
  memcpy(data + 10, d, 16);
  memcpy(data + 26, ints, 8);
  const char *p = path_in("dtypes.safetensors");
  write_raw(p, 0,
            "{\"h\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[0,10]},"
            "\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[10,26]},"
            "\"i\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[26,34]}}",
            data, sizeof data);
  struct st_file *f;
  char err[1024];
  int rc = st_open(&f, p, err, sizeof err);
  check(rc == 0, rc ? err : "opens a hand-made F16/F64/I32 file (header not padded)");
  if (rc) return;
  float x[5];
  rc = st_read_f32(st_find(f, "h"), x, 5, err, sizeof err);
  check(rc == 0 && x[0] == 1.0f && x[1] == -2.0f && x[2] == 65504.0f && x[3] == ldexpf(1.0f, -24) && isinf(x[4]),
        "F16 -> fp32 (normal, max, subnormal, inf)");
  rc = st_read_f32(st_find(f, "d"), x, 2, err, sizeof err);
  check(rc == 0 && x[0] == 0.1f && isinf(x[1]) && x[1] < 0, "F64 -> fp32");
  const struct st_tensor *t = st_find(f, "i");
  check(t && st_read_f32(t, x, 2, err, sizeof err) == -1 && strstr(err, "I32"), "I32 read as floats refused");
  check(t && t->nbytes == 8 && memcmp(t->data, ints, 8) == 0, "raw bytes of an I32 tensor");
  st_close(f);
}

static void test_malformed(void) {
  const char *p = path_in("short.safetensors");
  FILE *fp = fopen(p, "wb");
  fwrite("\x10\0\0", 1, 3, fp);
  fclose(fp);
  expect_refused("a 3-byte file", p, "too short");
  p = path_in("empty.safetensors");
  fclose(fopen(p, "wb"));
  expect_refused("an empty file", p, "too short");
  p = path_in("huge.safetensors");
  write_raw(p, (uint64_t)1 << 40, "{}", NULL, 0);
  expect_refused("a huge header length", p, "limit");
  p = path_in("past.safetensors");
  write_raw(p, 1000, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", NULL, 0);
  expect_refused("a header running past the end", p, "past the end");
  p = path_in("missing.safetensors");
  expect_refused("a missing file", p, "cannot open");

  /* A valid file cut short: its last tensor's offsets now run past the data. */
  float v[4] = {1, 2, 3, 4};
  struct st_write_tensor t = {.name = "w", .dtype = ST_F32, .ndim = 1, .shape = {4}, .data = v};
  char err[1024];
  p = path_in("cut.safetensors");
  if (st_write(p, &t, 1, 0, err, sizeof err) == 0) {
    struct stat sb;
    stat(p, &sb);
    if (truncate(p, sb.st_size - 1) != 0) die("truncate");
    expect_refused("a truncated file", p, "out of range");
  }

  expect_header_refused("bad JSON", "{\"a\":{\"dtype\":\"F32\",", "not valid JSON");
  expect_header_refused("a header that is an array", "[1,2]", "not a JSON object");
  expect_header_refused("duplicate tensor names",
                        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                        "duplicate");
  expect_header_refused("an unknown dtype", "{\"a\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}",
                        "unknown dtype 'F128'");
  expect_header_refused("a missing dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", "'a': dtype");
  expect_header_refused("a shape/offset mismatch",
                        "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "'a': data_offsets span 8");
  expect_header_refused("offsets out of range",
                        "{\"a\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,32]}}", "'a': data_offsets [0, 32] out of range");
  expect_header_refused("begin after end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}",
                        "out of range");
  expect_header_refused("negative offsets", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}",
                        "'a': data_offsets are not");
  expect_header_refused("overlapping tensors",
                        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                        "'a' and 'b' overlap");
  expect_header_refused("a negative shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,0]}}",
                        "'a': shape[1]");
  expect_header_refused("a fractional shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}",
                        "'a': shape[0]");
  expect_header_refused("a shape product that overflows",
                        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
                        "overflows");
  expect_header_refused("too many dimensions",
                        "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}",
                        "9 dimensions");
  expect_header_refused("data_offsets with one number", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}",
                        "'a': data_offsets missing");
  expect_header_refused("a non-object entry", "{\"a\":[1]}", "'a': entry is not an object");
  expect_header_refused("non-string metadata", "{\"__metadata__\":{\"format\":1}}", "__metadata__ value 'format'");

  /* Zero-size tensors may share an offset; they hold no bytes to overlap. */
  static const unsigned char zeros[16];
  p = path_in("zero.safetensors");
  write_raw(p, 0,
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
            zeros, 16);
  struct st_file *f;
  int rc = st_open(&f, p, err, sizeof err);
  check(rc == 0, rc ? err : "accepts a zero-size tensor inside another's range");
  if (!rc) st_close(f);
}

static void test_writer_refusals(void) {
  float v[2] = {1, 2};
  struct st_write_tensor ts[2] = {
    {.name = "x", .dtype = ST_F32, .ndim = 1, .shape = {2}, .data = v},
    {.name = "x", .dtype = ST_F32, .ndim = 1, .shape = {2}, .data = v},
  };
  char err[1024];
  const char *p = path_in("w.safetensors");
  check(st_write(p, ts, 2, 0, err, sizeof err) == -1 && strstr(err, "'x' given twice") && access(p, F_OK) != 0,
        "writer refuses a name given twice and leaves no file");
  ts[1].name = "y";
  ts[1].dtype = ST_I32;
  check(st_write(p, ts, 2, 0, err, sizeof err) == -1 && strstr(err, "'y'") && strstr(err, "I32"),
        "writer refuses a dtype it cannot convert to");
  ts[1].dtype = ST_BF16;
  ts[1].shape[0] = -2;
  check(st_write(p, ts, 2, 0, err, sizeof err) == -1 && strstr(err, "shape[0]"), "writer refuses a negative shape");
  check(st_write(path_in("nodir/w.safetensors"), ts, 1, 0, err, sizeof err) == -1 && strstr(err, "nodir"),
        "writer reports an unwritable path");
}

/* Writes dir/name holding the named tensors (each [2], value i+1). */
static void write_shard(const char *dir, const char *name, const char *const *names, int n) {
  static float vals[8][2];
  struct st_write_tensor ts[8];
  for (int i = 0; i < n; i++) {
    vals[i][0] = (float)(i + 1);
    vals[i][1] = (float)-(i + 1);
    ts[i] = (struct st_write_tensor){.name = names[i], .dtype = ST_F32, .ndim = 1, .shape = {2}, .data = vals[i]};
  }
  char path[512], err[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  if (st_write(path, ts, (size_t)n, 1, err, sizeof err)) die("%s", err);
}

static void expect_model_refused(const char *what, const char *dir, const char *want) {
  struct st_model *m;
  char err[1024] = "", label[1200];
  int rc = st_model_open(&m, dir, err, sizeof err);
  snprintf(label, sizeof label, "refuses %s: %s", what, err);
  check(rc == -1 && !m && strstr(err, want), label);
  if (!rc) st_model_close(m);
}

static void test_sharded(void) {
  char dir[256], index[300], err[1024];
  snprintf(dir, sizeof dir, "%s/sharded", g_dir);
  make_dirs(dir);
  snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
  const char *s1[] = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"};
  const char *s2[] = {"model.norm.weight", "lm_head.weight", "unindexed.extra"};
  write_shard(dir, "model-00001-of-00002.safetensors", s1, 2);
  write_shard(dir, "model-00002-of-00002.safetensors", s2, 3);
  const char *good =
    "{\"metadata\":{\"total_size\":32},\"weight_map\":{"
    "\"model.embed_tokens.weight\":\"model-00001-of-00002.safetensors\","
    "\"model.layers.0.mlp.up_proj.weight\":\"model-00001-of-00002.safetensors\","
    "\"model.norm.weight\":\"model-00002-of-00002.safetensors\","
    "\"lm_head.weight\":\"model-00002-of-00002.safetensors\"}}";
  write_text(index, good);
  struct st_model *m;
  int rc = st_model_open(&m, dir, err, sizeof err);
  check(rc == 0, rc ? err : "opens a 2-shard model through its index");
  if (rc == 0) {
    check(st_model_count(m) == 4, "model lists the 4 indexed tensors");
    check(strcmp(st_model_tensor_at(m, 0)->name, "lm_head.weight") == 0, "model tensors sorted by name");
    const struct st_tensor *t = st_model_find(m, "model.norm.weight");
    float v[2];
    check(t && strstr(t->path, "00002-of") && st_read_f32(t, v, 2, err, sizeof err) == 0 && v[0] == 1.0f,
          "finds a tensor in the second shard and reads it");
    t = st_model_find(m, "model.layers.0.mlp.up_proj.weight");
    check(t && strstr(t->path, "00001-of") && st_read_f32(t, v, 2, err, sizeof err) == 0 && v[1] == -2.0f,
          "finds a tensor in the first shard and reads it");
    check(st_model_find(m, "unindexed.extra") == NULL, "a tensor the index does not name is not part of the model");
    st_model_close(m);
  }

  write_text(index, "{\"weight_map\":{\"model.norm.weight\":\"model-00003-of-00002.safetensors\"}}");
  expect_model_refused("a missing shard file", dir, "model-00003-of-00002.safetensors: cannot open");
  write_text(index, "{\"weight_map\":{\"model.norm.weight\":\"model-00001-of-00002.safetensors\"}}");
  expect_model_refused("an index naming the wrong shard", dir, "'model.norm.weight' in");
  write_text(index, "{\"weight_map\":{\"model.norm.weight\":\"../sharded/model-00002-of-00002.safetensors\"}}");
  expect_model_refused("a shard path outside the directory", dir, "same directory");
  write_text(index, "{\"metadata\":{}}");
  expect_model_refused("an index without weight_map", dir, "weight_map missing");
  write_text(index, "{\"weight_map\":{");
  expect_model_refused("an index that is not JSON", dir, "not valid JSON");
  write_text(index, good);

  /* A single file wins over an index, as in transformers. */
  const char *single[] = {"only.weight"};
  write_shard(dir, "model.safetensors", single, 1);
  rc = st_model_open(&m, dir, err, sizeof err);
  check(rc == 0 && st_model_count(m) == 1 && st_model_find(m, "only.weight"),
        rc ? err : "model.safetensors preferred over the index");
  if (rc == 0) st_model_close(m);
  expect_model_refused("a directory without weights", g_dir, "neither model.safetensors");
}

static int rm_entry(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
  return remove(path);
}

/* Tensors given as stored bytes (any dtype: NVFP4 codes and scales) are written as they are. */
static void test_write_bytes(void) {
  uint8_t codes[6] = {0x10, 0xf7, 0x08, 0x80, 0x3c, 0xc3}, scales[3] = {0x38, 0x00, 0x7e};
  float one = 1.0f, two = 2.0f;
  struct st_write_tensor ts[] = {
    {.name = "w.weight", .dtype = ST_U8, .ndim = 2, .shape = {2, 3}, .bytes = codes},
    {.name = "w.weight_scale", .dtype = ST_F8_E4M3, .ndim = 1, .shape = {3}, .bytes = scales},
    {.name = "w.weight_scale_2", .dtype = ST_F32, .ndim = 0, .bytes = &one},
  };
  char err[1024];
  const char *p = path_in("bytes.safetensors");
  int rc = st_write(p, ts, 3, 1, err, sizeof err);
  check(rc == 0, rc ? err : "writes U8, F8_E4M3 and a scalar F32 given as bytes");
  struct st_file *f;
  if (rc || st_open(&f, p, err, sizeof err) != 0) return;
  const struct st_tensor *w = st_find(f, "w.weight"), *sc = st_find(f, "w.weight_scale");
  const struct st_tensor *s2 = st_find(f, "w.weight_scale_2");
  check(w && w->dtype == ST_U8 && w->nbytes == 6 && !memcmp(w->data, codes, 6) && sc &&
            sc->dtype == ST_F8_E4M3 && !memcmp(sc->data, scales, 3) && s2 && s2->ndim == 0 &&
            !memcmp(s2->data, &one, 4),
        "the bytes, dtypes and shapes read back as written");
  st_close(f);
  struct st_write_tensor bad = {.name = "x", .dtype = ST_U8, .ndim = 1, .shape = {1}, .data = &two};
  check(st_write(p, &bad, 1, 0, err, sizeof err) == -1 && strstr(err, "U8"),
        "floats converted to U8 refused");
  bad = (struct st_write_tensor){.name = "x", .dtype = ST_F32, .ndim = 0, .data = &two,
                                 .bytes = &one};
  check(st_write(p, &bad, 1, 0, err, sizeof err) == -1 && strstr(err, "both"),
        "floats and bytes at once refused");
}

int main(void) {
  double t0 = now_seconds();
  snprintf(g_dir, sizeof g_dir, "/tmp/qwen3_test_st_XXXXXX");
  if (!mkdtemp(g_dir)) die("mkdtemp failed");
  test_round_trip();
  test_bf16();
  test_other_dtypes();
  test_malformed();
  test_writer_refusals();
  test_write_bytes();
  test_sharded();
  nftw(g_dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
  printf("(%.3f s)\n", now_seconds() - t0);
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}
