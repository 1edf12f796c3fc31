/* Linear layers as single-precision GEMMs through CBLAS (OpenBLAS threads them itself). */
#include <cblas.h>

#include "kernels/cpu/cpu.h"

void cpu_linear_forward(void *const *outs, const void *x, const void *const *ws,
                        const int *out_dims, int count, int n, int in_dim) {
  if (n == 0) return;
  for (int j = 0; j < count; j++)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out_dims[j], in_dim, 1.0f, x, in_dim,
                ws[j], in_dim, 0.0f, outs[j], out_dims[j]);
}

void cpu_linear_backward(void *dx_, float *dw, const void *dout_, const void *x_, const void *w_,
                         int n, int in_dim, int out_dim, int acc) {
  float *dx = dx_;
  const float *dout = dout_;
  const float *x = x_;
  const float *w = w_;
  /* n == 0 still runs: an overwritten dw is then zero (a GEMM with k == 0 scales C by beta) */
  if (dx && n > 0)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in_dim, out_dim, 1.0f, dout,
                out_dim, w, in_dim, acc & ACC_DX ? 1.0f : 0.0f, dx, in_dim);
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, n, 1.0f, dout, out_dim,
                x, in_dim, acc & ACC_DW ? 1.0f : 0.0f, dw, in_dim);
}
