/* Linear layers as single-precision GEMMs through CBLAS (OpenBLAS threads them itself). */
#include <cblas.h>

#include "kernels/cpu/cpu.h"

void cpu_linear_forward(void *out_, const void *x_, const void *w_, int n, int in_dim,
                        int out_dim) {
  float *out = out_;
  const float *x = x_;
  const float *w = w_;
  if (n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out_dim, in_dim, 1.0f, x, in_dim, w,
              in_dim, 0.0f, out, out_dim);
}

void cpu_linear_backward(void *dx_, float *dw, const void *dout_, const void *x_, const void *w_,
                         int n, int in_dim, int out_dim) {
  float *dx = dx_;
  const float *dout = dout_;
  const float *x = x_;
  const float *w = w_;
  if (n == 0) return;
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in_dim, out_dim, 1.0f, dout,
                out_dim, w, in_dim, 1.0f, dx, in_dim);
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, n, 1.0f, dout, out_dim,
                x, in_dim, 1.0f, dw, in_dim);
}
