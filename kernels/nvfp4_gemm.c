/* The NVFP4 GEMM, emulated: the operands are q * s_b values (exact in fp32), the product is
 * accumulated in fp32 and the two tensor scales are folded into alpha, as cuBLASLt does on
 * FP4 tensor cores. Only the accumulation order differs from the hardware. */
#include <cblas.h>

#include "kernels/nvfp4.h"

void nvfp4_gemm(float *c, const float *a, float s_dec_a, const float *b, float s_dec_b, int b_kn,
                int m, int n, int k, float beta) {
  /* Leading dimensions of at least 1 keep BLAS's argument checks quiet for empty shapes; k = 0
   * then gives c = beta * c as BLAS defines it. */
  const int ldk = k > 1 ? k : 1, ldn = n > 1 ? n : 1;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, b_kn ? CblasNoTrans : CblasTrans, m, n, k,
              s_dec_a * s_dec_b, a, ldk, b, b_kn ? ldn : ldk, beta, c, ldn);
}
