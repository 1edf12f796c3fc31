/* The CPU backend's NVFP4 ops: the host quantizers of kernels/nvfp4.c behind the backend's
 * signatures, and the transposes the Wgrad operands need. */
#include <math.h>

#include "kernels/cpu/cpu.h"
#include "kernels/nvfp4.h"

void cpu_transpose(float *out, const float *x, int rows, int cols) {
  enum { TILE = 32 };   /* tiles keep both the reads and the writes in cache */
#pragma omp parallel for collapse(2) if ((long)rows * cols > 65536)
  for (int r0 = 0; r0 < rows; r0 += TILE)
    for (int c0 = 0; c0 < cols; c0 += TILE)
      for (int r = r0; r < r0 + TILE && r < rows; r++)
        for (int c = c0; c < c0 + TILE && c < cols; c++)
          out[(size_t)c * rows + r] = x[(size_t)r * cols + c];
}

float cpu_nvfp4_quantize_dequantize(float *xq, const float *x, int rows, int cols,
                                    int tiles_16x16, int stochastic, uint64_t seed) {
  struct nvfp4_tensor_scale ts;
  int rc = nvfp4_quantize_dequantize(xq, &ts, x, rows, cols,
                                     tiles_16x16 ? NVFP4_BLOCK_16X16 : NVFP4_BLOCK_1X16,
                                     stochastic ? NVFP4_ROUND_STOCHASTIC : NVFP4_ROUND_NEAREST,
                                     seed);
  return rc == NVFP4_OK ? ts.dec : NAN;
}
