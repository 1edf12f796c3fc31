/* The 16-point random Hadamard transform applied to Wgrad operands before NVFP4 quantization: it
 * spreads an outlier over its tile so that one large value does not crush the block's other 15
 * to zero, and, being orthogonal, leaves the GEMM's result unchanged. */
#include "kernels/nvfp4.h"

#include <stddef.h>

uint16_t nvfp4_rht_signs(uint64_t seed) {
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  const uint32_t counter[4] = {0, 0, 0, 1};
  uint32_t u[4];
  nvfp4_philox4x32_10(u, counter, key);
  return (uint16_t)(u[0] & 0xffff);
}

void nvfp4_rht(float *out, const float *x, int rows, int cols, uint16_t signs) {
  const size_t tiles = (size_t)rows * (cols / 16);
#pragma omp parallel for if (tiles >= 2048) /* small inputs: the fork costs more */
  for (size_t t = 0; t < tiles; t++) {
    /* y = v·diag(s)·H/4 = H·(s∘v)/4 (H is symmetric): signs, then a fast Walsh-Hadamard
     * transform in 4 butterfly stages, then the exact scaling by 1/4. */
    float v[16];
    for (int i = 0; i < 16; i++) v[i] = signs >> i & 1 ? -x[t * 16 + i] : x[t * 16 + i];
    for (int h = 1; h < 16; h *= 2)
      for (int i = 0; i < 16; i += 2 * h)
        for (int j = i; j < i + h; j++) {
          float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (int i = 0; i < 16; i++) out[t * 16 + i] = 0.25f * v[i];
  }
}
