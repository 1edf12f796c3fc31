/* The CPU backend's NVFP4 ops: the host quantizers of kernels/nvfp4*.c behind the backend's
 * signatures. The CPU stores everything in fp32, so x_type is fp32 and the dec pointers are
 * host memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu.h"
#include "kernels/nvfp4.h"

static void transpose(float *out, const float *x, int rows, int cols) {
  enum { TILE = 32 };   /* tiles keep both the reads and the writes in cache */
#pragma omp parallel for collapse(2) if ((long)rows * cols > 65536)
  for (int r0 = 0; r0 < rows; r0 += TILE)
    for (int c0 = 0; c0 < cols; c0 += TILE)
      for (int r = r0; r < r0 + TILE && r < rows; r++)
        for (int c = c0; c < c0 + TILE && c < cols; c++)
          out[(size_t)c * rows + r] = x[(size_t)r * cols + c];
}

/* cpu_nvfp4_quantize with the tensor amax given (amax: max |x|) or, for NULL, taken here */
static void quantize(float *xq, float *dec, const float *x, int rows, int cols,
                     enum nvfp4_layout layout, int stochastic, uint64_t seed, int rht_signs,
                     const float *amax) {
  if (rows < 0 || cols < 0 || cols % 16 || (layout != NVFP4_ROWS && rows % 16))
    die("cpu_nvfp4_quantize: shape [%d, %d] refused: cols (and rows but for 1x16 rows) must be "
        "non-negative multiples of 16", rows, cols);
  enum nvfp4_rounding rounding = stochastic ? NVFP4_ROUND_STOCHASTIC : NVFP4_ROUND_NEAREST;
  struct nvfp4_tensor_scale ts;
  int rc;
  if (layout == NVFP4_COLS) {   /* xᵀ, transformed along its rows, quantized 1x16 in place */
    transpose(xq, x, rows, cols);
    if (rht_signs >= 0) nvfp4_rht(xq, xq, cols, rows, (uint16_t)rht_signs);
    rc = nvfp4_quantize_dequantize(xq, &ts, xq, cols, rows, NVFP4_BLOCK_1X16, rounding, seed,
                                   amax);
  } else {
    rc = nvfp4_quantize_dequantize(xq, &ts, x, rows, cols,
                                   layout == NVFP4_TILES ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16,
                                   rounding, seed, amax);
  }
  *dec = rc == NVFP4_OK ? ts.dec : NAN;
}

/* NVFP4_ROWS_INT (ops.h): nvfp4_quantize's codes and scales of x, each code as 2q in int8 and
 * each scale byte as s_b in fp32; nothing written for a non-finite x, as NVFP4_ROWS. */
static void quantize_int(void *xq, float *dec, const float *x, int rows, int cols) {
  if (rows < 0 || cols < 0 || cols % 16)
    die("cpu_nvfp4_quantize: shape [%d, %d] refused for NVFP4_ROWS_INT: cols must be a "
        "non-negative multiple of 16", rows, cols);
  const size_t n = (size_t)rows * cols;
  uint8_t *codes = xmalloc(n / 2 + 1), *scales = xmalloc(n / 16 + 1);
  struct nvfp4_tensor_scale ts;
  int rc = nvfp4_quantize(codes, scales, &ts, x, rows, cols, NVFP4_BLOCK_1X16,
                          NVFP4_ROUND_NEAREST, 0);
  if (rc == NVFP4_OK) {
    int8_t *k = xq;
    float *s = (float *)((char *)xq + nvfp4_int_scales_at(rows, cols));
    for (size_t i = 0; i < n; i++)   /* -0.0 (code 8) gives 0 */
      k[i] = (int8_t)(2.0f * nvfp4_e2m1_decode((uint8_t)(codes[i / 2] >> 4 * (i & 1))));
    for (size_t b = 0; b < n / 16; b++) s[b] = nvfp4_e4m3_decode(scales[b]);
  }
  *dec = rc == NVFP4_OK ? ts.dec : NAN;
  free(codes);
  free(scales);
}

void cpu_nvfp4_quantize(void *xq, float *dec, const void *x, enum dtype x_type, int rows,
                        int cols, enum nvfp4_layout layout, int stochastic, uint64_t seed,
                        int rht_signs) {
  if (x_type != DT_F32) die("cpu_nvfp4_quantize: the CPU backend stores every tensor in fp32");
  if ((unsigned)layout > NVFP4_ROWS_INT) die("cpu_nvfp4_quantize: unknown layout %d", (int)layout);
  if (layout != NVFP4_ROWS_INT) {
    quantize(xq, dec, x, rows, cols, layout, stochastic, seed, rht_signs, NULL);
    return;
  }
  if (stochastic || xq == x || (uintptr_t)xq % 16)
    die("cpu_nvfp4_quantize: NVFP4_ROWS_INT%s%s%s refused: it rounds to nearest, into a 16-byte "
        "aligned xq apart from x", stochastic ? " with stochastic rounding" : "",
        xq == x ? " in place" : "", (uintptr_t)xq % 16 ? " into an unaligned xq" : "");
  quantize_int(xq, dec, x, rows, cols);
}

/* The largest part is the bits of max |w| (a NaN's or Inf's: 0x7f800000 and up, not finite as a
 * float either), which stands for the quantizer's own pass over w. */
void cpu_nvfp4_quantize_weight(void *xq, float *dec, const float *w, int rows, int cols,
                               enum nvfp4_layout layout, const uint32_t *amax_parts,
                               size_t n_parts) {
  if ((unsigned)layout > NVFP4_COLS || !amax_parts || !n_parts)
    die("cpu_nvfp4_quantize_weight: layout %d with %zu amax parts refused: NVFP4_ROWS, "
        "NVFP4_TILES or NVFP4_COLS, and at least one part", (int)layout, n_parts);
  uint32_t bits = 0;
  for (size_t i = 0; i < n_parts; i++)
    if (amax_parts[i] > bits) bits = amax_parts[i];
  float amax;
  memcpy(&amax, &bits, sizeof amax);
  quantize(xq, dec, w, rows, cols, layout, 0, 0, -1, &amax);
}

void cpu_nvfp4_quantize_rows_cols(void *rows_q, float *rows_dec, uint64_t rows_seed,
                                  void *cols_q, float *cols_dec, uint64_t cols_seed,
                                  const void *x, int rows, int cols, int stochastic,
                                  int rht_signs) {
  cpu_nvfp4_quantize(rows_q, rows_dec, x, DT_F32, rows, cols, NVFP4_ROWS, stochastic, rows_seed,
                     -1);
  cpu_nvfp4_quantize(cols_q, cols_dec, x, DT_F32, rows, cols, NVFP4_COLS, stochastic, cols_seed,
                     rht_signs);
}

void cpu_nvfp4_gemm(void *c, enum dtype c_type, const void *a, const float *dec_a,
                    const void *b, const float *dec_b, int b_kn, int m, int n, int k,
                    float beta) {
  if (c_type != DT_F32) die("cpu_nvfp4_gemm: the CPU backend stores every tensor in fp32");
  nvfp4_gemm(c, a, *dec_a, b, *dec_b, b_kn, m, n, k, beta);
}

/* 1x16 scales as they are; 16x16 tiles quantized into the first rows/16 rows of `scales`, then
 * each tile row's scales copied to its 16 rows, from the last row up: row r reads tile row
 * r/16 <= r, which no row above it has overwritten yet. */
void cpu_nvfp4_pack(uint8_t *codes, uint8_t *scales, float *dec, const float *w, int rows,
                    int cols, enum nvfp4_layout layout) {
  int tiles = layout == NVFP4_TILES;
  if ((layout != NVFP4_ROWS && !tiles) || rows < 0 || cols < 0 || cols % 16 ||
      (tiles && rows % 16))
    die("cpu_nvfp4_pack: layout %d, shape [%d, %d] refused: NVFP4_ROWS or NVFP4_TILES, cols "
        "(and rows for tiles) non-negative multiples of 16", (int)layout, rows, cols);
  struct nvfp4_tensor_scale ts;
  int rc = nvfp4_quantize(codes, scales, &ts, w, rows, cols,
                          tiles ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16, NVFP4_ROUND_NEAREST, 0);
  size_t nb = (size_t)cols / 16;
  if (rc == NVFP4_OK && tiles)
    for (int r = rows - 1; r > 0; r--) memmove(scales + r * nb, scales + (size_t)(r / 16) * nb, nb);
  *dec = rc == NVFP4_OK ? ts.dec : NAN;
}

/* out [n, out_dim] = alpha * x · Wᵀ, x [n, in_dim] the integer operand's values: row o of the
 * weight, 16 values at a time, code * scale (exact in fp32), into each token's sum in order of
 * the columns: the sums of nvfp4_gemm's Fprop on the NVFP4_ROWS operand of the same x. */
static void gemv_packed(float *out, const float *x, float alpha, const uint8_t *codes,
                        const uint8_t *scales, int n, int in_dim, int out_dim) {
  float e2m1[16];
  for (int c = 0; c < 16; c++) e2m1[c] = nvfp4_e2m1_decode((uint8_t)c);
  const size_t nb = (size_t)in_dim / 16;
#pragma omp parallel for if ((long)out_dim * in_dim > 65536)
  for (int o = 0; o < out_dim; o++) {
    float acc[NVFP4_GEMV_MAX_ROWS] = {0};
    const uint8_t *code = codes + (size_t)o * in_dim / 2;
    for (size_t b = 0; b < nb; b++) {
      const float s = nvfp4_e4m3_decode(scales[(size_t)o * nb + b]);
      for (int i = 0; i < 16; i++) {
        const size_t c = b * 16 + i;
        const float wv = e2m1[(code[c / 2] >> (4 * (c & 1))) & 15] * s;
        for (int t = 0; t < n; t++) acc[t] += x[(size_t)t * in_dim + c] * wv;
      }
    }
    for (int t = 0; t < n; t++) out[(size_t)t * out_dim + o] = alpha * acc[t];
  }
}

/* Every shape is checked before any product runs: a refused call writes nothing. */
void cpu_nvfp4_gemv_packed(void *const *outs, const void *xq, const float *dec_x,
                           const uint8_t *const *codes, const uint8_t *const *scales,
                           const float *const *dec_w, const int *out_dims, int count, int n,
                           int in_dim) {
  if (count < 1 || count > NVFP4_GEMV_MAX_MATS || n < 1 || n > NVFP4_GEMV_MAX_ROWS ||
      in_dim < 16 || in_dim % 16)
    die("cpu_nvfp4_gemv_packed: %d rows of [%d] against %d matrices refused: 1 to %d rows, "
        "in_dim a multiple of 16, 1 to %d matrices", n, in_dim, count, NVFP4_GEMV_MAX_ROWS,
        NVFP4_GEMV_MAX_MATS);
  for (int j = 0; j < count; j++)
    if (out_dims[j] < 1)
      die("cpu_nvfp4_gemv_packed: matrix %d of %d is [%d, %d]: at least one row", j, count,
          out_dims[j], in_dim);
  /* x's values k * s / 2, NVFP4_ROWS's q * s_b exactly, once for every matrix and weight row */
  const size_t nx = (size_t)n * in_dim;
  const int8_t *k = xq;
  const float *s = (const float *)((const char *)xq + nvfp4_int_scales_at(n, in_dim));
  float *x = xmalloc(nx * sizeof *x);
  for (size_t i = 0; i < nx; i++) x[i] = (float)k[i] * s[i / 16] * 0.5f;
  for (int j = 0; j < count; j++)
    gemv_packed(outs[j], x, *dec_x * *dec_w[j], codes[j], scales[j], n, in_dim, out_dims[j]);
  free(x);
}
