/* The CPU backend's NVFP4 ops: the host quantizers of kernels/nvfp4*.c behind the backend's
 * signatures. The CPU stores everything in fp32, so x_type is fp32 and the dec pointers are
 * host memory. */
#include <math.h>

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

void cpu_nvfp4_quantize(void *xq_, float *dec, const void *x_, enum dtype x_type, int rows,
                        int cols, enum nvfp4_layout layout, int stochastic, uint64_t seed,
                        int rht_signs) {
  float *xq = xq_;
  const float *x = x_;
  if (x_type != DT_F32) die("cpu_nvfp4_quantize: the CPU backend stores every tensor in fp32");
  if (rows < 0 || cols < 0 || cols % 16 || (layout != NVFP4_ROWS && rows % 16))
    die("cpu_nvfp4_quantize: shape [%d, %d] refused: cols (and rows but for 1x16 rows) must be "
        "non-negative multiples of 16", rows, cols);
  enum nvfp4_rounding rounding = stochastic ? NVFP4_ROUND_STOCHASTIC : NVFP4_ROUND_NEAREST;
  struct nvfp4_tensor_scale ts;
  int rc;
  if (layout == NVFP4_COLS) {   /* xᵀ, transformed along its rows, quantized 1x16 in place */
    transpose(xq, x, rows, cols);
    if (rht_signs >= 0) nvfp4_rht(xq, xq, cols, rows, (uint16_t)rht_signs);
    rc = nvfp4_quantize_dequantize(xq, &ts, xq, cols, rows, NVFP4_BLOCK_1X16, rounding, seed);
  } else {
    rc = nvfp4_quantize_dequantize(xq, &ts, x, rows, cols,
                                   layout == NVFP4_TILES ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16,
                                   rounding, seed);
  }
  *dec = rc == NVFP4_OK ? ts.dec : NAN;
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
