/* qwen3-nvfp4: look at what the NVFP4 recipe makes of a model's weights (data/nvfp4_dump.h).
 *
 *   qwen3-nvfp4 quantize INPUT OUT.h5 [--block 16x16|1x16] [--match REGEX] [--all] [--dequantized]
 *   qwen3-nvfp4 show OUT.h5 NAME [--rows R] [--cols C] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/nvfp4_dump.h"

static const char USAGE[] =
    "usage:\n"
    "  qwen3-nvfp4 quantize INPUT OUT.h5 [--block 16x16|1x16] [--match REGEX] [--all]\n"
    "                       [--dequantized] [--quiet]\n"
    "  qwen3-nvfp4 show OUT.h5 NAME [--rows R] [--cols C]\n"
    "\n"
    "quantize: quantizes the weights of INPUT (a .safetensors file, a Hugging Face model\n"
    "directory, or a checkpoint: a step directory or a root with `latest`) exactly as training does (kernels/nvfp4.h, round to nearest) and writes the\n"
    "result to OUT.h5. Quantized: every 2-D float tensor whose shape the blocks divide, except\n"
    "names containing embed_tokens, lm_head or norm (high precision in the recipe).\n"
    "  --block B      16x16 (default: the recipe's weight blocks) or 1x16 (activation blocks)\n"
    "  --match REGEX  only tensors whose name matches (POSIX extended regex; a substring works)\n"
    "  --all          include embed_tokens, lm_head and norm tensors too\n"
    "  --dequantized  also store the dequantized float32 values\n"
    "  --quiet        no progress or skip lines on stderr\n"
    "\n"
    "show: prints the top-left R x C excerpt (default 2 x 16) of tensor NAME: the blocks' E4M3\n"
    "scales decoded, then per element its code, E2M1 value, dequantized value and the original\n"
    "(read from the input recorded in OUT.h5, when it is still there).\n"
    "\n"
    "OUT.h5 layout (chunked datasets with Fletcher32 checksums):\n"
    "  /                 attrs format_version (int32), source (input's absolute path)\n"
    "  /NAME/codes       uint8 [rows, cols/2]; element 2i in the low nibble, 2i+1 in the high\n"
    "                    nibble; code = sign (bit 3) | index of 0, .5, 1, 1.5, 2, 3, 4, 6\n"
    "  /NAME/scales      uint8 E4M3 [rows/16, cols/16] (16x16) or [rows, cols/16] (1x16)\n"
    "  /NAME/dequantized float32 [rows, cols] (with --dequantized)\n"
    "  /NAME attrs       tensor_scale_dec (S_dec), tensor_scale_enc (S_enc), amax (float32),\n"
    "                    block (\"16x16\"|\"1x16\"), shape (int64[2]), dtype (source dtype)\n"
    "  value = e2m1(code) * e4m3(scale) * S_dec\n";

static _Noreturn void usage_error(const char *what) {
  fprintf(stderr, "qwen3-nvfp4: %s\n\n%s", what, USAGE);
  exit(2);
}

static int parse_count(const char *s, const char *flag) {
  char *end;
  long v = strtol(s, &end, 10);
  if (*end || v < 1 || v > 1 << 20) die("%s needs a positive count, not '%s'", flag, s);
  return (int)v;
}

static int cmd_quantize(int argc, char **argv) {
  const char *paths[2];
  int npaths = 0, quiet = 0;
  struct nvfp4_dump_options o = {NVFP4_BLOCK_16X16, NULL, 0, 0, stderr};
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    int has_value = i + 1 < argc;
    if (!strcmp(a, "--block") && has_value) {
      const char *b = argv[++i];
      if (strcmp(b, "16x16") && strcmp(b, "1x16")) usage_error("--block is 16x16 or 1x16");
      o.block = strcmp(b, "16x16") ? NVFP4_BLOCK_1X16 : NVFP4_BLOCK_16X16;
    } else if (!strcmp(a, "--match") && has_value) {
      o.match = argv[++i];
    } else if (!strcmp(a, "--all")) {
      o.all = 1;
    } else if (!strcmp(a, "--dequantized")) {
      o.dequantized = 1;
    } else if (!strcmp(a, "--quiet")) {
      quiet = 1;
    } else if (a[0] == '-' || npaths == 2) {
      usage_error("quantize: unexpected argument");
    } else {
      paths[npaths++] = a;
    }
  }
  if (npaths != 2) usage_error("quantize needs INPUT and OUT.h5");
  if (quiet) o.log = NULL;
  struct nvfp4_dump_summary sum;
  char err[1024];
  double t0 = now_seconds();
  if (nvfp4_dump_quantize(paths[0], paths[1], &o, &sum, err, sizeof err) != 0) die("%s", err);
  if (!quiet)
    fprintf(stderr, "%s: %d tensors quantized (%s blocks), %d skipped, %.1fs\n", paths[1],
            sum.quantized, o.block == NVFP4_BLOCK_16X16 ? "16x16" : "1x16", sum.skipped,
            now_seconds() - t0);
  return 0;
}

static int cmd_show(int argc, char **argv) {
  const char *paths[2];
  int npaths = 0, rows = 2, cols = 16;
  for (int i = 0; i < argc; i++) {
    if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows = parse_count(argv[++i], "--rows");
    else if (!strcmp(argv[i], "--cols") && i + 1 < argc) cols = parse_count(argv[++i], "--cols");
    else if (argv[i][0] == '-' || npaths == 2) usage_error("show: unexpected argument");
    else paths[npaths++] = argv[i];
  }
  if (npaths != 2) usage_error("show needs OUT.h5 and a tensor NAME");
  struct nvfp4_dump_tensor t;
  char err[1024];
  if (nvfp4_dump_read(paths[0], paths[1], &t, err, sizeof err) != 0) die("%s", err);
  if (rows > t.rows) rows = t.rows;
  if (cols > t.cols) cols = t.cols;
  int is16 = t.block == NVFP4_BLOCK_16X16, scale_cols = t.cols / 16;
  printf("%s  [%d, %d] from %s, %s blocks\n", paths[1], t.rows, t.cols, t.dtype,
         is16 ? "16x16" : "1x16");
  printf("amax %.6g  S_enc %.6g  S_dec %.6g\n", t.scale.amax, t.scale.enc, t.scale.dec);

  float *orig = xmalloc((size_t)t.rows * t.cols * sizeof *orig);
  if (nvfp4_dump_original(paths[0], paths[1], orig, (size_t)t.rows * t.cols, err, sizeof err) != 0) {
    printf("(originals not shown: %s)\n", err);
    free(orig);
    orig = NULL;
  }

  printf("\nblock scales of the excerpt (E4M3 byte, s_b, s_b * S_dec):\n");
  for (int br = 0; br < (is16 ? (rows + 15) / 16 : rows); br++)
    for (int bc = 0; bc < (cols + 15) / 16; bc++) {
      uint8_t b = t.scales[(size_t)br * scale_cols + bc];
      float sb = nvfp4_e4m3_decode(b);
      char where[64];
      if (is16) snprintf(where, sizeof where, "rows %d..%d", br * 16, br * 16 + 15);
      else snprintf(where, sizeof where, "row %d", br);
      printf("  %-14s cols %5d..%-5d  0x%02x  %-10.6g %.6g\n", where, bc * 16, bc * 16 + 15, b, sb,
             sb * t.scale.dec);
    }

  printf("\n%6s %6s  %4s %5s %14s %14s %12s\n", "row", "col", "code", "e2m1", "dequantized",
         "original", "error");
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) {
      size_t i = (size_t)r * t.cols + c;
      uint8_t code = (t.codes[i / 2] >> (4 * (i % 2))) & 0xf;
      size_t s = (size_t)(is16 ? r / 16 : r) * scale_cols + c / 16;
      float q = nvfp4_e2m1_decode(code), x = q * nvfp4_e4m3_decode(t.scales[s]) * t.scale.dec;
      printf("%6d %6d   0x%x %5.1f %14.6g", r, c, code, q, x);
      if (orig) printf(" %14.6g %12.3g", orig[i], x - orig[i]);
      printf("\n");
    }
  free(orig);
  nvfp4_dump_tensor_free(&t);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
    fputs(USAGE, stdout);
    return 0;
  }
  if (argc >= 2 && !strcmp(argv[1], "quantize")) return cmd_quantize(argc - 2, argv + 2);
  if (argc >= 2 && !strcmp(argv[1], "show")) return cmd_show(argc - 2, argv + 2);
  usage_error(argc < 2 ? "no command" : "unknown command");
}
