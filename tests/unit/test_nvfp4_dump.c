/* NVFP4 dumps (data/nvfp4_dump.h): a safetensors file written here is dumped, and every dumped
 * tensor's codes, scales and tensor scale equal nvfp4_quantize's bit for bit, its dequantized
 * values nvfp4_dequantize's; skipped tensors are reported with their names; 1x16 blocks, --match,
 * --all and model directories; bad input (garbage, missing, NaN, bad regex) is refused with a
 * message naming the file (and tensor), and leaves no output behind. */
#define _XOPEN_SOURCE 700   /* mkdtemp, open_memstream */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/nvfp4_dump.h"
#include "data/safetensors.h"
#include "tests/check.h"

static char dir[64], src[128], out[128];

static float randn(uint64_t *state) {
  double u[2];
  for (int i = 0; i < 2; i++) {
    *state ^= *state << 13, *state ^= *state >> 7, *state ^= *state << 17;
    u[i] = ((*state >> 11) + 0.5) * 0x1p-53;
  }
  return (float)(sqrt(-2 * log(u[0])) * cos(2 * M_PI * u[1]));
}

/* Random values whose magnitude changes from row to row and column to column, so that blocks get
 * different scales; given 32 rows, one all-zero 16x16 block and one tiny block (E4M3 subnormal or zero scale). */
static float *weights(int rows, int cols, uint64_t seed) {
  float *x = xmalloc((size_t)rows * cols * sizeof *x);
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++)
      x[r * cols + c] = randn(&seed) * 0.02f * (1 + r % 7) * (1 + (c / 16) % 3);
  for (int r = 0; r < 16 && rows >= 32 && cols >= 16; r++)
    for (int c = 0; c < 16; c++) {
      x[r * cols + c] = 0;
      x[(16 + r) * cols + c] *= 1e-5f;
    }
  return x;
}

enum { NT = 7 };
static const char *const NAMES[NT] = {
    "model.layers.0.mlp.up_proj.weight",    "model.layers.0.self_attn.o_proj.weight",
    "model.embed_tokens.weight",            "model.norm.weight",
    "model.layers.0.odd_rows.weight",       "model.layers.0.cube.weight",
    "model.layers.0.int.weight"};

static void write_source(void) {
  float *up = weights(48, 64, 1), *o = weights(32, 32, 2), *emb = weights(32, 16, 3),
        *norm = weights(1, 64, 4), *odd = weights(20, 32, 5), *cube = weights(2, 256, 6);
  struct st_write_tensor t[6] = {
      {NAMES[0], ST_F32, 2, {48, 64}, up, NULL},   {NAMES[1], ST_BF16, 2, {32, 32}, o, NULL},
      {NAMES[2], ST_BF16, 2, {32, 16}, emb, NULL}, {NAMES[3], ST_F32, 1, {64}, norm, NULL},
      {NAMES[4], ST_F32, 2, {20, 32}, odd, NULL},  {NAMES[5], ST_F32, 3, {2, 16, 16}, cube, NULL}};
  char err[512];
  if (st_write(src, t, 6, 1, err, sizeof err) != 0) die("%s", err);
  free(up), free(o), free(emb), free(norm), free(odd), free(cube);
}

/* Dumps src with the options, logging into a string; returns the status, the log in *log. */
static int dump(const char *input, struct nvfp4_dump_options o, struct nvfp4_dump_summary *sum,
                char **log, char *err, size_t errlen) {
  size_t len;
  o.log = open_memstream(log, &len);
  int rc = nvfp4_dump_quantize(input, out, &o, sum, err, errlen);
  fclose(o.log);
  return rc;
}

/* The dumped tensor equals what nvfp4_quantize makes of the source tensor, bit for bit. */
static void check_tensor(const char *name, enum nvfp4_block block, int with_dequantized) {
  char err[512];
  struct st_file *f;
  if (st_open(&f, src, err, sizeof err) != 0) die("%s", err);
  const struct st_tensor *st = st_find(f, name);
  int rows = (int)st->shape[0], cols = (int)st->shape[1], n = rows * cols;
  int ns = nvfp4_num_scales(rows, cols, block);
  float *x = xmalloc(n * sizeof *x), *deq = xmalloc(n * sizeof *deq), *orig = xmalloc(n * sizeof *orig);
  uint8_t *codes = xmalloc(n / 2), *scales = xmalloc(ns);
  struct nvfp4_tensor_scale ts;
  st_read_f32(st, x, n, err, sizeof err);
  nvfp4_quantize(codes, scales, &ts, x, rows, cols, block, NVFP4_ROUND_NEAREST, 0);
  nvfp4_dequantize(deq, codes, scales, ts.dec, rows, cols, block);

  struct nvfp4_dump_tensor t;
  int rc = nvfp4_dump_read(out, name, &t, err, sizeof err);
  CHECK(rc == 0, "%s: read back: %s", name, err);
  if (rc == 0) {
    CHECK(t.rows == rows && t.cols == cols && t.block == block, "%s: shape or block", name);
    CHECK(!memcmp(t.codes, codes, n / 2), "%s: codes differ from nvfp4_quantize's", name);
    CHECK(!memcmp(t.scales, scales, ns), "%s: scales differ from nvfp4_quantize's", name);
    CHECK(!memcmp(&t.scale, &ts, sizeof ts), "%s: tensor scale (amax %g dec %g) differs", name,
          t.scale.amax, t.scale.dec);
    CHECK(!strcmp(t.dtype, st_dtype_name(st->dtype)), "%s: dtype %s", name, t.dtype);
    CHECK(with_dequantized == (t.dequantized != NULL), "%s: dequantized present %d", name,
          t.dequantized != NULL);
    if (t.dequantized)
      CHECK(!memcmp(t.dequantized, deq, n * sizeof *deq),
            "%s: dequantized differs from nvfp4_dequantize's", name);
    rc = nvfp4_dump_original(out, name, orig, n, err, sizeof err);
    CHECK(rc == 0 && !memcmp(orig, x, n * sizeof *x), "%s: original: %s", name,
          rc ? err : "values differ");
    nvfp4_dump_tensor_free(&t);
  }
  free(x), free(deq), free(orig), free(codes), free(scales);
  st_close(f);
}

static int has(const char *haystack, const char *needle) { return strstr(haystack, needle) != NULL; }

static void test_default(void) {
  struct nvfp4_dump_summary sum;
  char err[512], *log;
  int rc = dump(src, (struct nvfp4_dump_options){NVFP4_BLOCK_16X16, NULL, 0, 1, NULL}, &sum, &log,
                err, sizeof err);
  CHECK(rc == 0, "dump: %s", err);
  CHECK(sum.quantized == 2 && sum.skipped == 4, "16x16: %d quantized, %d skipped (want 2, 4)",
        sum.quantized, sum.skipped);
  for (int i = 2; i < 6; i++) {
    char line[160];
    snprintf(line, sizeof line, "skip %s: ", NAMES[i]);
    CHECK(has(log, line), "the log does not report skipping %s:\n%s", NAMES[i], log);
  }
  CHECK(has(log, "not a multiple of 16x16") && has(log, "3-D") && has(log, "embed_tokens stays"),
        "skip reasons missing:\n%s", log);
  free(log);
  check_tensor(NAMES[0], NVFP4_BLOCK_16X16, 1);
  check_tensor(NAMES[1], NVFP4_BLOCK_16X16, 1);
  char e2[512];
  struct nvfp4_dump_tensor t;
  CHECK(nvfp4_dump_read(out, NAMES[2], &t, e2, sizeof e2) != 0 && has(e2, out) &&
            has(e2, NAMES[2]),
        "reading a skipped tensor: '%s'", e2);
}

static void test_1x16_match_all(void) {
  struct nvfp4_dump_summary sum;
  char err[512], *log;
  int rc = dump(src, (struct nvfp4_dump_options){NVFP4_BLOCK_1X16, "odd_rows|up_proj", 0, 0, NULL},
                &sum, &log, err, sizeof err);
  CHECK(rc == 0 && sum.quantized == 2 && sum.skipped == 0,
        "1x16 --match: rc %d, %d quantized, %d skipped (want 2, 0): %s", rc, sum.quantized,
        sum.skipped, err);
  free(log);
  check_tensor(NAMES[0], NVFP4_BLOCK_1X16, 0);
  check_tensor(NAMES[4], NVFP4_BLOCK_1X16, 0);

  rc = dump(src, (struct nvfp4_dump_options){NVFP4_BLOCK_16X16, "embed", 1, 0, NULL}, &sum, &log,
            err, sizeof err);
  CHECK(rc == 0 && sum.quantized == 1, "--all --match embed: rc %d, %d quantized", rc,
        sum.quantized);
  free(log);
  check_tensor(NAMES[2], NVFP4_BLOCK_16X16, 0);

  /* a model directory reads the same */
  char model[160], cmd[400];
  snprintf(model, sizeof model, "%s/model", dir);
  snprintf(cmd, sizeof cmd, "%s/model.safetensors", model);
  mkdir(model, 0755);
  if (link(src, cmd) != 0) die("cannot link %s", cmd);
  rc = dump(model, (struct nvfp4_dump_options){NVFP4_BLOCK_16X16, NULL, 0, 0, NULL}, &sum, &log,
            err, sizeof err);
  CHECK(rc == 0 && sum.quantized == 2, "model directory: rc %d, %d quantized: %s", rc,
        sum.quantized, err);
  free(log);
  check_tensor(NAMES[1], NVFP4_BLOCK_16X16, 0);
}

static void test_refusals(void) {
  struct nvfp4_dump_summary sum;
  char err[512], *log, bad[160];
  unlink(out);
  struct nvfp4_dump_options o = {NVFP4_BLOCK_16X16, NULL, 0, 0, NULL};

  snprintf(bad, sizeof bad, "%s/garbage.safetensors", dir);
  FILE *f = fopen(bad, "wb");
  fputs("\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", f);
  fclose(f);
  int rc = dump(bad, o, &sum, &log, err, sizeof err);
  free(log);
  CHECK(rc != 0 && has(err, bad), "garbage input: rc %d, message '%s' must name %s", rc, err, bad);
  CHECK(access(out, F_OK) != 0, "a refused input left %s behind", out);

  snprintf(bad, sizeof bad, "%s/missing.safetensors", dir);
  rc = dump(bad, o, &sum, &log, err, sizeof err);
  free(log);
  CHECK(rc != 0 && has(err, bad), "missing input: '%s'", err);

  snprintf(bad, sizeof bad, "%s/nan.safetensors", dir);
  float *x = weights(16, 16, 9);
  x[37] = NAN;
  struct st_write_tensor t = {"model.layers.3.mlp.down_proj.weight", ST_F32, 2, {16, 16}, x, NULL};
  if (st_write(bad, &t, 1, 0, err, sizeof err) != 0) die("%s", err);
  free(x);
  rc = dump(bad, o, &sum, &log, err, sizeof err);
  free(log);
  CHECK(rc != 0 && has(err, bad) && has(err, t.name) && has(err, "NaN"),
        "NaN tensor: message '%s' must name the file and tensor", err);
  CHECK(access(out, F_OK) != 0, "a failed dump left %s behind", out);

  o.match = "([unclosed";
  rc = dump(src, o, &sum, &log, err, sizeof err);
  free(log);
  CHECK(rc != 0 && has(err, "([unclosed"), "bad regex: '%s'", err);

  struct nvfp4_dump_tensor d;
  CHECK(nvfp4_dump_read(src, NAMES[0], &d, err, sizeof err) != 0 && has(err, src),
        "reading a safetensors file as a dump: '%s'", err);
}

int main(void) {
  snprintf(dir, sizeof dir, "/tmp/test_nvfp4_dump.XXXXXX");
  if (!mkdtemp(dir)) die("mkdtemp failed");
  snprintf(src, sizeof src, "%s/w.safetensors", dir);
  snprintf(out, sizeof out, "%s/dump.h5", dir);
  write_source();
  test_default();
  test_1x16_match_all();
  test_refusals();
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) printf("could not remove %s\n", dir);
  return checks_report();
}
