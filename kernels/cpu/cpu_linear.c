/* Linear layers as single-precision GEMMs through CBLAS (OpenBLAS threads them itself). */
#include <cblas.h>

#include "kernels/cpu/cpu.h"

void cpu_linear_forward(float *out, const float *x, const float *w, int n, int in_dim,
                        int out_dim) {
  if (n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out_dim, in_dim, 1.0f, x, in_dim, w,
              in_dim, 0.0f, out, out_dim);
}

void cpu_linear_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         int n, int in_dim, int out_dim) {
  if (n == 0) return;
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in_dim, out_dim, 1.0f, dout,
                out_dim, w, in_dim, 1.0f, dx, in_dim);
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, n, 1.0f, dout, out_dim,
                x, in_dim, 1.0f, dw, in_dim);
}
