/* NVFP4 quantizers (kernels/nvfp4.h): codes, scales and tensor scales bit-exact against the
 * vectors of the independent numpy reference (tests/nvfp4_reference.py, file formats described
 * there); stochastic rounding reproducible and unbiased; the Hadamard transform orthogonal; the
 * emulated GEMM against float64; edge values, zero tensors, bad shapes and non-finite input. */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/nvfp4.h"

#define FIXTURES "tests/fixtures/nvfp4/"

static int passed, failed;

static void check(int ok, const char *fmt, ...) PRINTF_LIKE(2, 3);
static void check(int ok, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("%s  ", ok ? "ok  " : "FAIL");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  ok ? passed++ : failed++;
}

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* A little-endian fixture file, read front to back. */
struct reader {
  const char *p, *end;
};

static const void *take(struct reader *r, size_t bytes) {
  if ((size_t)(r->end - r->p) < bytes) die("nvfp4 fixture truncated");
  const void *at = r->p;
  r->p += bytes;
  return at;
}

static uint32_t take_u32(struct reader *r) {
  uint32_t v;
  memcpy(&v, take(r, 4), 4);
  return v;
}

static char *load_fixture(const char *name, const char *magic, struct reader *r) {
  size_t len;
  char *buf = read_file(name, &len);
  if (!buf) die("cannot read %s (run tests from the repository root)", name);
  r->p = buf;
  r->end = buf + len;
  if (memcmp(take(r, 8), magic, 8) != 0) die("%s: not an %s file", name, magic);
  return buf;
}

static float randn(uint64_t *state) {
  /* Box-Muller over a splitmix64 stream: test data only */
  double u[2];
  for (int i = 0; i < 2; i++) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    u[i] = ((z >> 11) + 0.5) * 0x1p-53;
  }
  return (float)(sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

static float *random_matrix(int rows, int cols, uint64_t seed) {
  float *x = xmalloc(sizeof(float) * rows * cols);
  for (int i = 0; i < rows * cols; i++) x[i] = randn(&seed);
  return x;
}

static void test_philox(void) {
  /* Known-answer vectors of Random123 (kat_vectors, philox4x32_10) */
  static const uint32_t ctr[3][4] = {{0, 0, 0, 0},
                                     {~0u, ~0u, ~0u, ~0u},
                                     {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}};
  static const uint32_t key[3][2] = {{0, 0}, {~0u, ~0u}, {0xa4093822, 0x299f31d0}};
  static const uint32_t want[3][4] = {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
                                      {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
                                      {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}};
  int ok = 1;
  for (int t = 0; t < 3; t++) {
    uint32_t out[4];
    nvfp4_philox4x32_10(out, ctr[t], key[t]);
    ok &= memcmp(out, want[t], sizeof out) == 0;
  }
  check(ok, "philox4x32_10 matches the Random123 known-answer vectors");
}

static void test_scalars(void) {
  struct reader r;
  char *buf = load_fixture(FIXTURES "scalars.bin", "NVFP4SC1", &r);
  const char *names[2] = {"E2M1", "E4M3"};
  for (int f = 0; f < 2; f++) {
    uint32_t n = take_u32(&r);
    const char *in = take(&r, 4 * (size_t)n);
    const uint8_t *want = take(&r, n);
    int bad = 0;
    for (uint32_t i = 0; i < n; i++) {
      float x;
      memcpy(&x, in + 4 * i, 4);
      uint8_t got = f == 0 ? nvfp4_e2m1_encode_rn(x) : nvfp4_e4m3_encode(x);
      if (got != want[i] && bad++ < 3)
        printf("      %s(%a) = 0x%02x, reference 0x%02x\n", names[f], x, got, want[i]);
    }
    check(bad == 0, "%s round-to-nearest-even encode of %u edge values bit-exact (%d differ)",
          names[f], n, bad);
  }
  free(buf);

  int ok = nvfp4_e4m3_encode(nvfp4_e4m3_decode(0x80)) == 0;   /* -0 encodes as +0 */
  for (int b = 0; b < 256; b++)
    if ((b & 0x7f) != 0x7f && b != 0x80) ok &= nvfp4_e4m3_encode(nvfp4_e4m3_decode((uint8_t)b)) == b;
  ok &= nvfp4_e4m3_decode(0x7e) == 448.0f && nvfp4_e4m3_decode(0x01) == 0x1p-9f;
  ok &= isnan(nvfp4_e4m3_decode(0x7f)) && nvfp4_e4m3_encode(NAN) == 0x7f;
  ok &= nvfp4_e4m3_encode(INFINITY) == 0x7e && nvfp4_e4m3_encode(-1e30f) == 0xfe;
  check(ok, "E4M3 decode/encode round trip of all finite codes (-0 -> +0), satfinite, NaN");

  ok = 1;
  static const float e2m1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int c = 0; c < 16; c++) {
    float v = c & 8 ? -e2m1[c & 7] : e2m1[c & 7];
    ok &= same_bits(nvfp4_e2m1_decode((uint8_t)c), v) && nvfp4_e2m1_encode_rn(v) == (c == 8 ? 0 : c);
  }
  ok &= nvfp4_e2m1_encode_rn(INFINITY) == 7 && nvfp4_e2m1_encode_rn(-INFINITY) == 15;
  check(ok, "E2M1 decode table, encode of every value, saturation of +-Inf");

  /* SR: 0.3f lies (0.3f / 0.5) of the way from 0 to 0.5, which times 2^32 is exactly
   * 2576980480; 4.5 lies 1/4 of the way from 4 to 6; exact values never move; past 6 saturates */
  ok = nvfp4_e2m1_encode_sr(0.3f, 0) == 1 && nvfp4_e2m1_encode_sr(0.3f, 0xffffffffu) == 0;
  ok &= nvfp4_e2m1_encode_sr(0.3f, 2576980479u) == 1 && nvfp4_e2m1_encode_sr(0.3f, 2576980480u) == 0;
  ok &= nvfp4_e2m1_encode_sr(-0.3f, 0) == 9 && nvfp4_e2m1_encode_sr(1.5f, 0) == 3;
  ok &= nvfp4_e2m1_encode_sr(4.5f, 0x3fffffffu) == 7 && nvfp4_e2m1_encode_sr(4.5f, 0x40000000u) == 6;
  ok &= nvfp4_e2m1_encode_sr(7.0f, 0xffffffffu) == 7 && nvfp4_e2m1_encode_sr(-1e30f, 0) == 15;
  check(ok, "E2M1 stochastic rounding thresholds (u < frac * 2^32 rounds up)");

  struct nvfp4_tensor_scale z = nvfp4_tensor_scale(0.0f), inf = nvfp4_tensor_scale(INFINITY);
  struct nvfp4_tensor_scale tiny = nvfp4_tensor_scale(1e-38f);
  check(z.enc == 1 && z.dec == 1 && inf.enc == 1 && inf.dec == 1 && tiny.enc == FLT_MAX,
        "tensor scale: amax 0 and Inf give 1, tiny amax clamps S_enc to FLT_MAX");
}

static void test_fixture_tensors(void) {
  struct reader r;
  char *buf = load_fixture(FIXTURES "tensors.bin", "NVFP4TN1", &r);
  uint32_t count = take_u32(&r);
  int fused_same = 1;
  for (uint32_t t = 0; t < count; t++) {
    char name[33] = {0};
    memcpy(name, take(&r, 32), 32);
    int32_t hdr[4];
    uint64_t seed;
    memcpy(hdr, take(&r, sizeof hdr), sizeof hdr);
    memcpy(&seed, take(&r, 8), 8);
    int rows = hdr[0], cols = hdr[1];
    enum nvfp4_block block = hdr[2] == 16 ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16;
    enum nvfp4_rounding rounding = hdr[3] ? NVFP4_ROUND_STOCHASTIC : NVFP4_ROUND_NEAREST;
    size_t n = (size_t)rows * cols, ns = (size_t)nvfp4_num_scales(rows, cols, block);
    float *x = xmalloc(4 * n);
    memcpy(x, take(&r, 4 * n), 4 * n);
    float want_ts[3];
    memcpy(want_ts, take(&r, sizeof want_ts), sizeof want_ts);
    const uint8_t *want_codes = take(&r, n / 2), *want_scales = take(&r, ns);

    uint8_t *codes = xmalloc(n / 2), *scales = xmalloc(ns);
    struct nvfp4_tensor_scale ts;
    int status = nvfp4_quantize(codes, scales, &ts, x, rows, cols, block, rounding, seed);
    int bad_codes = 0, bad_scales = 0;
    for (size_t i = 0; i < n / 2; i++) bad_codes += codes[i] != want_codes[i];
    for (size_t i = 0; i < ns; i++) bad_scales += scales[i] != want_scales[i];
    int ts_ok = same_bits(ts.amax, want_ts[0]) && same_bits(ts.enc, want_ts[1]) &&
                same_bits(ts.dec, want_ts[2]);
    check(status == NVFP4_OK && !bad_codes && !bad_scales && ts_ok,
          "%-22s %dx%-3d %s %s: %zu code bytes, %zu scales, tensor scale bit-exact "
          "(%d/%d differ%s)",
          name, rows, cols, block == NVFP4_BLOCK_16X16 ? "16x16" : "1x16 ",
          hdr[3] ? "SR" : "RN", n / 2, ns, bad_codes, bad_scales, ts_ok ? "" : ", tensor scale");

    /* the engine's fused path must be the same numbers: xq = q * s_b, and xq * S_dec = x̂ */
    float *xq = xmalloc(4 * n), *xhat = xmalloc(4 * n);
    struct nvfp4_tensor_scale ts2;
    status = nvfp4_quantize_dequantize(xq, &ts2, x, rows, cols, block, rounding, seed, NULL);
    nvfp4_dequantize(xhat, want_codes, want_scales, want_ts[2], rows, cols, block);
    fused_same &= status == NVFP4_OK && same_bits(ts2.dec, want_ts[2]);
    for (size_t i = 0; i < n; i++) fused_same &= same_bits(xq[i] * ts2.dec, xhat[i]);
    free(x), free(codes), free(scales), free(xq), free(xhat);
  }
  check(fused_same, "quantize_dequantize * S_dec == dequantize(reference codes), all %u cases",
        count);
  free(buf);
}

static void test_weight_transpose(void) {
  const int rows = 48, cols = 64;
  float *w = random_matrix(rows, cols, 7), *wt = xmalloc(sizeof(float) * rows * cols);
  w[3 * cols + 5] = 40.0f;   /* an outlier, so the tiles' scales differ */
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) wt[c * rows + r] = w[r * cols + c];
  uint8_t codes[48 * 64 / 2], codes_t[48 * 64 / 2], scales[12], scales_t[12];
  struct nvfp4_tensor_scale ts, ts_t;
  nvfp4_quantize(codes, scales, &ts, w, rows, cols, NVFP4_BLOCK_16X16, NVFP4_ROUND_NEAREST, 0);
  nvfp4_quantize(codes_t, scales_t, &ts_t, wt, cols, rows, NVFP4_BLOCK_16X16, NVFP4_ROUND_NEAREST, 0);
  int ok = same_bits(ts.dec, ts_t.dec);
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) {
      int i = r * cols + c, j = c * rows + r;
      ok &= (codes[i / 2] >> 4 * (i & 1) & 15) == (codes_t[j / 2] >> 4 * (j & 1) & 15);
    }
  for (int bi = 0; bi < rows / 16; bi++)
    for (int bj = 0; bj < cols / 16; bj++)
      ok &= scales[bi * (cols / 16) + bj] == scales_t[bj * (rows / 16) + bi];
  check(ok, "16x16 blocks: W and W^T quantize to transposed codes and scales");
  free(w), free(wt);
}

/* Large tensors take the OpenMP paths: they must give the bytes of the serial one, here the
 * row-by-row quantization of a matrix whose every row holds the global amax. */
static void test_parallel_matches_serial(void) {
  enum { R = 256, C = 256, N = R * C };
  float *x = random_matrix(R, C, 9);
  for (int r = 0; r < R; r++) x[r * C + r % C] = r % 2 ? -12.0f : 12.0f;
  uint8_t *codes = xmalloc(N / 2), *scales = xmalloc(N / 16), row_codes[C / 2], row_scales[C / 16];
  struct nvfp4_tensor_scale ts, row_ts;
  int ok = nvfp4_quantize(codes, scales, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0) ==
           NVFP4_OK;
  for (int r = 0; r < R; r++) {
    nvfp4_quantize(row_codes, row_scales, &row_ts, x + r * C, 1, C, NVFP4_BLOCK_1X16,
                   NVFP4_ROUND_NEAREST, 0);
    ok &= same_bits(ts.dec, row_ts.dec) && !memcmp(codes + r * C / 2, row_codes, C / 2) &&
          !memcmp(scales + r * C / 16, row_scales, C / 16);
  }
  check(ok, "%dx%d tensor (parallel path) equals its rows quantized one at a time", R, C);
  free(x), free(codes), free(scales);
}

static void test_edge_tensors(void) {
  enum { R = 16, C = 32, N = R * C };
  float x[N] = {0};
  uint8_t codes[N / 2], scales[N / 16];
  struct nvfp4_tensor_scale ts;
  int ok = 1;
  for (int sr = 0; sr < 2; sr++) {
    memset(codes, 0xab, sizeof codes);
    memset(scales, 0xab, sizeof scales);
    ok &= nvfp4_quantize(codes, scales, &ts, x, R, C, NVFP4_BLOCK_1X16,
                         sr ? NVFP4_ROUND_STOCHASTIC : NVFP4_ROUND_NEAREST, 1) == NVFP4_OK;
    ok &= ts.amax == 0 && ts.enc == 1 && ts.dec == 1;
    for (int i = 0; i < N / 2; i++) ok &= codes[i] == 0;
    for (int i = 0; i < N / 16; i++) ok &= scales[i] == 0;
  }
  check(ok, "zero tensor: S_enc = S_dec = 1, all codes and scales 0 (RN and SR)");

  const float bad[3] = {NAN, INFINITY, -INFINITY};
  ok = 1;
  for (int b = 0; b < 3; b++) {
    for (int i = 0; i < N; i++) x[i] = (float)(i % 7) - 3.0f;
    x[N / 2 + 3] = bad[b];
    memset(codes, 0xab, sizeof codes);
    memset(scales, 0xab, sizeof scales);
    ts = (struct nvfp4_tensor_scale){-1, -1, -1};
    ok &= nvfp4_quantize(codes, scales, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0) ==
          NVFP4_ERR_NONFINITE;
    for (int i = 0; i < N / 2; i++) ok &= codes[i] == 0xab;
    for (int i = 0; i < N / 16; i++) ok &= scales[i] == 0xab;
    ok &= ts.amax == -1;
    float xq[N];
    memset(xq, 0, sizeof xq);
    ok &= nvfp4_quantize_dequantize(xq, &ts, x, R, C, NVFP4_BLOCK_16X16, NVFP4_ROUND_STOCHASTIC,
                                    0, NULL) == NVFP4_ERR_NONFINITE;
    for (int i = 0; i < N; i++) ok &= xq[i] == 0;
  }
  check(ok, "NaN, +Inf, -Inf input: NVFP4_ERR_NONFINITE and nothing written");

  ok = nvfp4_quantize(codes, scales, &ts, x, 16, 24, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0) ==
       NVFP4_ERR_SHAPE;
  ok &= nvfp4_quantize(codes, scales, &ts, x, 8, 32, NVFP4_BLOCK_16X16, NVFP4_ROUND_NEAREST, 0) ==
        NVFP4_ERR_SHAPE;
  ok &= nvfp4_quantize(codes, scales, &ts, x, 8, 32, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0) ==
        NVFP4_OK;
  check(ok, "shapes: cols %% 16 (and rows %% 16 for 16x16) enforced");
}

static void test_stochastic_rounding(void) {
  enum { R = 32, C = 64, N = R * C, SEEDS = 256 };
  float *x = random_matrix(R, C, 11);
  float *xq = xmalloc(sizeof(float) * N), *mean = xcalloc(N, sizeof(float));
  uint8_t a[N / 2], b[N / 2], s_a[N / 16], s_b[N / 16];
  struct nvfp4_tensor_scale ts;

  nvfp4_quantize(a, s_a, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_STOCHASTIC, 42);
  nvfp4_quantize(b, s_b, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_STOCHASTIC, 42);
  int same = !memcmp(a, b, sizeof a) && !memcmp(s_a, s_b, sizeof s_a);
  nvfp4_quantize(b, s_b, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_STOCHASTIC, 43);
  int differ = 0;
  for (int i = 0; i < N / 2; i++) differ += a[i] != b[i];
  check(same && differ > N / 8 && !memcmp(s_a, s_b, sizeof s_a),
        "SR reproducible for one seed; another seed changes %d of %d bytes, not the scales",
        differ, N / 2);

  /* Each SR code is a grid neighbour of x, so it is the RN code or next to it (same sign);
   * the mean over seeds converges to x while RN keeps its rounding error. */
  uint8_t rn_codes[N / 2];
  float *rn = xmalloc(sizeof(float) * N);
  nvfp4_quantize(rn_codes, s_a, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0);
  nvfp4_dequantize(rn, rn_codes, s_a, ts.dec, R, C, NVFP4_BLOCK_1X16);
  int neighbours = 1;
  for (int s = 0; s < SEEDS; s++) {
    nvfp4_quantize(a, s_b, &ts, x, R, C, NVFP4_BLOCK_1X16, NVFP4_ROUND_STOCHASTIC, 1000 + s);
    nvfp4_dequantize(xq, a, s_b, ts.dec, R, C, NVFP4_BLOCK_1X16);
    for (int i = 0; i < N; i++) {
      int sr = a[i / 2] >> 4 * (i & 1) & 15, nearest = rn_codes[i / 2] >> 4 * (i & 1) & 15;
      neighbours &= (sr & 8) == (nearest & 8) && abs((sr & 7) - (nearest & 7)) <= 1;
      mean[i] += xq[i] / SEEDS;
    }
  }
  double rn_err = 0, sr_err = 0;
  for (int i = 0; i < N; i++) {
    rn_err += fabs(rn[i] - x[i]);
    sr_err += fabs(mean[i] - x[i]);
  }
  check(neighbours, "SR codes are the RN code or its neighbour, %d seeds", SEEDS);
  check(sr_err < 0.25 * rn_err,
        "SR unbiased: mean of %d seeds has |error| %.3g vs RN %.3g (sum over %d elements)",
        SEEDS, sr_err, rn_err, N);
  free(x), free(xq), free(mean), free(rn);
}

static void test_rht(void) {
  enum { K = 128, M = 256, NB = 20 };   /* M * K / 16 tiles: the parallel path */
  /* the transform's matrix, one row per unit vector: M·Mᵀ = I */
  uint16_t signs = nvfp4_rht_signs(2026);
  float eye[16 * 16] = {0}, m[16 * 16];
  for (int i = 0; i < 16; i++) eye[i * 16 + i] = 1;
  nvfp4_rht(m, eye, 16, 16, signs);
  double worst = 0;
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) {
      double d = 0;
      for (int k = 0; k < 16; k++) d += (double)m[i * 16 + k] * m[j * 16 + k];
      worst = fmax(worst, fabs(d - (i == j)));
    }
  int entries_ok = 1;
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) {
      int negative = signs >> i & 1;   /* H[i][j] = (-1)^popcount(i & j) */
      for (int bits = i & j; bits; bits &= bits - 1) negative ^= 1;
      entries_ok &= m[i * 16 + j] == (negative ? -0.25f : 0.25f);
    }
  check(worst == 0 && entries_ok && signs != nvfp4_rht_signs(2027) &&
            signs == nvfp4_rht_signs(2026),
        "RHT matrix is diag(s)·H16/4 (signs 0x%04x), R·R^T = I (max dev %.1e)", signs, worst);

  /* without signs H/4 is its own inverse: twice gives back the input (in place) */
  float *x = random_matrix(M, K, 3), *y = xmalloc(sizeof(float) * M * K);
  memcpy(y, x, sizeof(float) * M * K);
  nvfp4_rht(y, y, M, K, 0);
  nvfp4_rht(y, y, M, K, 0);
  double dev = 0;
  for (int i = 0; i < M * K; i++) dev = fmax(dev, fabs(y[i] - x[i]));
  check(dev < 1e-5, "H16/4 applied twice (in place) returns the input (max dev %.1e)", dev);

  /* Wgrad invariance: tiles of both operands along the reduction dimension */
  float *b = random_matrix(NB, K, 4), *xr = xmalloc(sizeof(float) * M * K),
        *br = xmalloc(sizeof(float) * NB * K);
  nvfp4_rht(xr, x, M, K, signs);
  nvfp4_rht(br, b, NB, K, signs);
  double rel = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < NB; j++) {
      double d0 = 0, d1 = 0, mag = 0;
      for (int k = 0; k < K; k++) {
        d0 += (double)x[i * K + k] * b[j * K + k];
        d1 += (double)xr[i * K + k] * br[j * K + k];
        mag += fabs((double)x[i * K + k] * b[j * K + k]);
      }
      rel = fmax(rel, fabs(d1 - d0) / mag);
    }
  check(rel < 1e-6, "(A·R)(B·R)^T = A·B^T with R along K (max rel dev %.1e)", rel);
  free(x), free(y), free(b), free(xr), free(br);
}

static void test_gemm(void) {
  enum { M = 40, N = 32, K = 96 };
  float *a = random_matrix(M, K, 5), *b = random_matrix(N, K, 6);
  for (int i = 0; i < M * K; i += 37) a[i] *= 30.0f;   /* heavy tail */
  float *aq = xmalloc(sizeof(float) * M * K), *bq = xmalloc(sizeof(float) * N * K);
  float *c = xmalloc(sizeof(float) * M * N);
  struct nvfp4_tensor_scale ta, tb;
  nvfp4_quantize_dequantize(aq, &ta, a, M, K, NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0, NULL);
  nvfp4_quantize_dequantize(bq, &tb, b, N, K, NVFP4_BLOCK_16X16, NVFP4_ROUND_NEAREST, 0, NULL);
  nvfp4_gemm(c, aq, ta.dec, bq, tb.dec, 0, M, N, K, 0.0f);
  double worst = 0, quant_err = 0, quant_mag = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double ref = 0, mag = 0, exact = 0;
      for (int k = 0; k < K; k++) {
        double p = (double)aq[i * K + k] * ta.dec * ((double)bq[j * K + k] * tb.dec);
        ref += p;
        mag += fabs(p);
        exact += (double)a[i * K + k] * b[j * K + k];
      }
      worst = fmax(worst, fabs(c[i * N + j] - ref) / mag);
      quant_err += fabs(ref - exact);
      quant_mag += fabs(exact);
    }
  check(worst < 1e-6, "emulated GEMM = alpha·A·B^T of the dequantized operands in float64 "
        "(max error %.1e of sum|a·b|)", worst);
  check(quant_err / quant_mag < 0.2, "NVFP4 GEMM within %.1f%% of the unquantized product",
        100 * quant_err / quant_mag);

  float *c2 = xmalloc(sizeof(float) * M * N);
  memcpy(c2, c, sizeof(float) * M * N);
  nvfp4_gemm(c2, aq, ta.dec, bq, tb.dec, 0, M, N, K, 1.0f);
  int ok = 1;
  for (int i = 0; i < M * N; i++) ok &= fabsf(c2[i] - 2 * c[i]) <= 1e-6f * fabsf(c[i]) + 1e-30f;
  check(ok, "emulated GEMM accumulates with beta = 1");

  /* b given as [k, n] (a 16x16-tiled W read as Wᵀ for Dgrad): the same product */
  float *bt = xmalloc(sizeof(float) * N * K);
  for (int j = 0; j < N; j++)
    for (int k = 0; k < K; k++) bt[k * N + j] = bq[j * K + k];
  nvfp4_gemm(c2, aq, ta.dec, bt, tb.dec, 1, M, N, K, 0.0f);
  ok = 1;
  for (int i = 0; i < M * N; i++) ok &= fabsf(c2[i] - c[i]) <= 1e-6f * fabsf(c[i]) + 1e-30f;
  check(ok, "emulated GEMM with b as [k, n] equals it with b as [n, k]");
  free(a), free(b), free(aq), free(bq), free(bt), free(c), free(c2);
}

int main(void) {
  double t0 = now_seconds();
  test_philox();
  test_scalars();
  test_fixture_tensors();
  test_weight_transpose();
  test_parallel_matches_serial();
  test_edge_tensors();
  test_stochastic_rounding();
  test_rht();
  test_gemm();
  printf("(%.2f s)\n", now_seconds() - t0);
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
