/* NVFP4 tensor quantizers: amax, block scales, element codes, and their inverse. Layouts and
 * numerics are specified in nvfp4.h. */
#include "kernels/nvfp4.h"

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "common/util.h"

enum {
  BLOCK = 16,
  PARALLEL_MIN = 1 << 15 /* elements; below this OpenMP's fork costs more than it saves */
};

static int block_rows(enum nvfp4_block block) { return block == NVFP4_BLOCK_16X16 ? BLOCK : 1; }

static int shape_ok(int rows, int cols, enum nvfp4_block block) {
  return rows >= 0 && cols >= 0 && cols % BLOCK == 0 && rows % block_rows(block) == 0;
}

int nvfp4_num_scales(int rows, int cols, enum nvfp4_block block) {
  return rows / block_rows(block) * (cols / BLOCK);
}

/* The scale byte that covers element (r, c). */
static size_t scale_index(int r, int c, int cols, enum nvfp4_block block) {
  return (size_t)(r / block_rows(block)) * (cols / BLOCK) + c / BLOCK;
}

/* max |x| over n values; NVFP4_ERR_NONFINITE if any is NaN or Inf. */
static int tensor_amax(float *amax, const float *x, size_t n) {
  float m = 0.0f;
  int nonfinite = 0;
#pragma omp parallel for reduction(max : m) reduction(| : nonfinite) if (n >= PARALLEL_MIN)
  for (size_t i = 0; i < n; i++) {
    nonfinite |= !isfinite(x[i]);
    m = fmaxf(m, fabsf(x[i]));
  }
  *amax = m;
  return nonfinite ? NVFP4_ERR_NONFINITE : NVFP4_OK;
}

/* Codes of the 16 consecutive elements x[i0 .. i0+15] (i0 = flat index, a multiple of 16) of one
 * block row, times the block's encode scale, packed into 8 bytes. */
static void encode_16(uint8_t *packed, const float *x, float enc_b, size_t i0,
                      enum nvfp4_rounding rounding, uint64_t seed) {
  uint8_t code[BLOCK];
  if (rounding == NVFP4_ROUND_STOCHASTIC) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    for (int g = 0; g < BLOCK; g += 4) {
      size_t ctr = (i0 + g) / 4;
      const uint32_t counter[4] = {(uint32_t)ctr, (uint32_t)(ctr >> 32), 0, 0};
      uint32_t u[4];
      nvfp4_philox4x32_10(u, counter, key);
      for (int j = 0; j < 4; j++) code[g + j] = nvfp4_e2m1_encode_sr(x[g + j] * enc_b, u[j]);
    }
  } else {
    for (int j = 0; j < BLOCK; j++) code[j] = nvfp4_e2m1_encode_rn(x[j] * enc_b);
  }
  for (int j = 0; j < BLOCK / 2; j++) packed[j] = (uint8_t)(code[2 * j] | code[2 * j + 1] << 4);
}

/* nvfp4_quantize once the shape is checked and the tensor's amax (finite) known */
static void quantize_scaled(uint8_t *codes, uint8_t *scales, struct nvfp4_tensor_scale *ts,
                            const float *x, int rows, int cols, enum nvfp4_block block,
                            enum nvfp4_rounding rounding, uint64_t seed, float amax) {
  *ts = nvfp4_tensor_scale(amax);
  const float enc_over_6 = ts->enc * (1.0f / 6.0f), dec = ts->dec;
  const int br = block_rows(block), nbr = rows / br, nbc = cols / BLOCK;

#pragma omp parallel for collapse(2) if ((size_t)rows * cols >= PARALLEL_MIN)
  for (int bi = 0; bi < nbr; bi++)
    for (int bj = 0; bj < nbc; bj++) {
      const int r0 = bi * br, c0 = bj * BLOCK;
      float amax_b = 0.0f;
      for (int r = r0; r < r0 + br; r++)
        for (int c = c0; c < c0 + BLOCK; c++) amax_b = fmaxf(amax_b, fabsf(x[(size_t)r * cols + c]));
      uint8_t s_b = nvfp4_e4m3_encode(amax_b * enc_over_6);
      scales[scale_index(r0, c0, cols, block)] = s_b;
      /* s_b = 0 makes this FLT_MAX: codes saturate, the block still dequantizes to 0 (nvfp4.h). */
      float enc_b = fminf(1.0f / (nvfp4_e4m3_decode(s_b) * dec), FLT_MAX);
      for (int r = r0; r < r0 + br; r++) {
        size_t i0 = (size_t)r * cols + c0;
        encode_16(codes + i0 / 2, x + i0, enc_b, i0, rounding, seed);
      }
    }
}

int nvfp4_quantize(uint8_t *codes, uint8_t *scales, struct nvfp4_tensor_scale *ts, const float *x,
                   int rows, int cols, enum nvfp4_block block, enum nvfp4_rounding rounding,
                   uint64_t seed) {
  if (!shape_ok(rows, cols, block)) return NVFP4_ERR_SHAPE;
  float amax;
  int status = tensor_amax(&amax, x, (size_t)rows * cols);
  if (status == NVFP4_OK)
    quantize_scaled(codes, scales, ts, x, rows, cols, block, rounding, seed, amax);
  return status;
}

void nvfp4_dequantize(float *out, const uint8_t *codes, const uint8_t *scales, float s_dec,
                      int rows, int cols, enum nvfp4_block block) {
#pragma omp parallel for if ((size_t)rows * cols >= PARALLEL_MIN)
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) {
      size_t i = (size_t)r * cols + c;
      float q = nvfp4_e2m1_decode((uint8_t)(codes[i / 2] >> (4 * (i & 1))));
      out[i] = q * nvfp4_e4m3_decode(scales[scale_index(r, c, cols, block)]) * s_dec;
    }
}

int nvfp4_quantize_dequantize(float *xq, struct nvfp4_tensor_scale *ts, const float *x, int rows,
                              int cols, enum nvfp4_block block, enum nvfp4_rounding rounding,
                              uint64_t seed, const float *amax) {
  if (!shape_ok(rows, cols, block)) return NVFP4_ERR_SHAPE;
  size_t n = (size_t)rows * cols;
  float m = amax ? *amax : 0.0f;
  int status = amax ? (isfinite(m) ? NVFP4_OK : NVFP4_ERR_NONFINITE) : tensor_amax(&m, x, n);
  if (status != NVFP4_OK) return status;
  uint8_t *codes = xmalloc(n / 2 + 1);
  uint8_t *scales = xmalloc((size_t)nvfp4_num_scales(rows, cols, block) + 1);
  quantize_scaled(codes, scales, ts, x, rows, cols, block, rounding, seed, m);
  nvfp4_dequantize(xq, codes, scales, 1.0f, rows, cols, block);
  free(codes);
  free(scales);
  return NVFP4_OK;
}
