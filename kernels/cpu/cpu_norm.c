/* RMSNorm over rows, and the per-head q/k RMSNorm fused with rotate-half RoPE.
 * Means of squares and the weight-gradient sums accumulate in double; every weight gradient is
 * summed column by column in row order, so results do not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "kernels/cpu/cpu.h"

/* 1 / sqrt(mean(x²) + eps) of one row */
static float row_rstd(const float *x, int dim, float eps) {
  double ss = 0.0;
  for (int j = 0; j < dim; j++) ss += (double)x[j] * x[j];
  return (float)(1.0 / sqrt(ss / dim + eps));
}

/* Backward of y = x * r * w for one row given g = dy * w:
 * dx_j = r g_j - x_j r³ / dim · Σ_k g_k x_k, added to dx when acc has ACC_DX. */
static void row_norm_backward(float *dx, const float *g, const float *x, float r, int dim,
                              int acc) {
  double gx = 0.0;
  for (int j = 0; j < dim; j++) gx += (double)g[j] * x[j];
  double c = gx * r * r * r / dim;
  for (int j = 0; j < dim; j++) {
    float d = (float)(r * (double)g[j] - c * x[j]);
    dx[j] = acc & ACC_DX ? dx[j] + d : d;
  }
}

/* a weight gradient's column sum into dw[j] */
static void dw_store(float *dw, int j, double sum, int acc) {
  dw[j] = acc & ACC_DW ? dw[j] + (float)sum : (float)sum;
}

void cpu_rmsnorm_forward(void *out_, const void *x_, const float *w, int n, int dim, float eps) {
  float *out = out_;
  const float *x = x_;
#pragma omp parallel for
  for (int i = 0; i < n; i++) {
    const float *xi = x + (size_t)i * dim;
    float *oi = out + (size_t)i * dim;
    float r = row_rstd(xi, dim, eps);
    for (int j = 0; j < dim; j++) oi[j] = xi[j] * r * w[j];
  }
}

void cpu_rmsnorm_backward(void *dx_, float *dw, const void *dout_, const void *x_, const float *w,
                          int n, int dim, float eps, int acc) {
  float *dx = dx_;
  const float *dout = dout_;
  const float *x = x_;
  float *rstd = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(float));
#pragma omp parallel
  {
    float *g = xmalloc((size_t)dim * sizeof(float));
#pragma omp for
    for (int i = 0; i < n; i++) {
      const float *xi = x + (size_t)i * dim, *di = dout + (size_t)i * dim;
      rstd[i] = row_rstd(xi, dim, eps);
      if (!dx) continue;
      for (int j = 0; j < dim; j++) g[j] = di[j] * w[j];
      row_norm_backward(dx + (size_t)i * dim, g, xi, rstd[i], dim, acc);
    }
    free(g);
  }
#pragma omp parallel for
  for (int j = 0; j < dim; j++) {
    double sum = 0.0;
    for (int i = 0; i < n; i++)
      sum += (double)dout[(size_t)i * dim + j] * (x[(size_t)i * dim + j] * rstd[i]);
    dw_store(dw, j, sum, acc);
  }
  free(rstd);
}

/* cos and sin of position · inv_freq for every row, [n, head_dim/2] each, computed as HF's
 * Qwen3RotaryEmbedding does in fp32: inv_freq = 1 / theta^(2j/head_dim), angle = pos · inv_freq,
 * each step rounded to fp32 (cos/sin themselves are evaluated in double and rounded). */
static void rope_tables(float *cos_t, float *sin_t, const int32_t *positions, int n, int head_dim,
                        double theta) {
  int half = head_dim / 2;
  float *inv_freq = xmalloc((size_t)half * sizeof(float));
  for (int j = 0; j < half; j++) {
    float exponent = (float)(2 * j) / (float)head_dim;
    inv_freq[j] = 1.0f / (float)pow((double)(float)theta, (double)exponent);
  }
#pragma omp parallel for
  for (int i = 0; i < n; i++)
    for (int j = 0; j < half; j++) {
      float angle = (float)positions[i] * inv_freq[j];
      cos_t[(size_t)i * half + j] = (float)cos((double)angle);
      sin_t[(size_t)i * half + j] = (float)sin((double)angle);
    }
  free(inv_freq);
}

/* The tensors share the tokens, so one cos/sin table serves them all. */
void cpu_qk_norm_rope_forward(void *const *out, const void *const *x, const float *const *w,
                              const int *heads, int count, const int32_t *positions, int n,
                              int head_dim, float eps, double theta) {
  if (head_dim % 2) die("qk_norm_rope: head_dim %d is odd", head_dim);
  if (count < 1 || count > 2) die("qk_norm_rope: %d tensors a call; 1 or 2 are allowed", count);
  int half = head_dim / 2;
  size_t table = (size_t)(n > 0 ? n : 1) * half;
  float *cos_t = xmalloc(table * sizeof(float)), *sin_t = xmalloc(table * sizeof(float));
  rope_tables(cos_t, sin_t, positions, n, head_dim, theta);
#pragma omp parallel
  {
    float *xn = xmalloc((size_t)head_dim * sizeof(float));
    for (int t = 0; t < count; t++) {
      const float *x_t = x[t], *w_t = w[t];
      float *out_t = out[t];
      const int heads_t = heads[t];
#pragma omp for collapse(2)
      for (int i = 0; i < n; i++)
        for (int h = 0; h < heads_t; h++) {
          size_t base = ((size_t)i * heads_t + h) * head_dim;
          const float *xh = x_t + base, *c = cos_t + (size_t)i * half;
          const float *s = sin_t + (size_t)i * half;
          float *oh = out_t + base;
          float r = row_rstd(xh, head_dim, eps);
          for (int j = 0; j < head_dim; j++) xn[j] = xh[j] * r * w_t[j];
          for (int j = 0; j < half; j++) {
            oh[j] = xn[j] * c[j] + (-xn[j + half]) * s[j];
            oh[j + half] = xn[j + half] * c[j] + xn[j] * s[j];
          }
        }
    }
    free(xn);
  }
  free(cos_t);
  free(sin_t);
}

/* The gradient reaching the normed value xn_j through out = xn·cos + rotate_half(xn)·sin:
 * the transpose of the rotation, i.e. a rotation by -angle. */
static float rope_backward_at(const float *dout, const float *c, const float *s, int j, int half) {
  return j < half ? dout[j] * c[j] + dout[j + half] * s[j]
                  : dout[j] * c[j - half] - dout[j - half] * s[j - half];
}

void cpu_qk_norm_rope_backward(void *dx_, float *dw, const void *dout_, const void *x_,
                               const float *w, const int32_t *positions, int n, int heads,
                               int head_dim, float eps, double theta, int acc) {
  float *dx = dx_;
  const float *dout = dout_;
  const float *x = x_;
  if (head_dim % 2) die("qk_norm_rope: head_dim %d is odd", head_dim);
  int half = head_dim / 2;
  size_t table = (size_t)(n > 0 ? n : 1) * half, rows = (size_t)n * heads;
  float *cos_t = xmalloc(table * sizeof(float)), *sin_t = xmalloc(table * sizeof(float));
  float *rstd = xmalloc((rows > 0 ? rows : 1) * sizeof(float));
  rope_tables(cos_t, sin_t, positions, n, head_dim, theta);
#pragma omp parallel
  {
    float *g = xmalloc((size_t)head_dim * sizeof(float));
#pragma omp for collapse(2)
    for (int i = 0; i < n; i++)
      for (int h = 0; h < heads; h++) {
        size_t row = (size_t)i * heads + h, base = row * head_dim;
        const float *c = cos_t + (size_t)i * half, *s = sin_t + (size_t)i * half;
        rstd[row] = row_rstd(x + base, head_dim, eps);
        if (!dx) continue;
        for (int j = 0; j < head_dim; j++)
          g[j] = rope_backward_at(dout + base, c, s, j, half) * w[j];
        row_norm_backward(dx + base, g, x + base, rstd[row], head_dim, acc);
      }
    free(g);
  }
#pragma omp parallel for
  for (int j = 0; j < head_dim; j++) {
    double sum = 0.0;
    for (size_t row = 0; row < rows; row++) {
      size_t i = row / heads, base = row * head_dim;
      float dxn = rope_backward_at(dout + base, cos_t + i * half, sin_t + i * half, j, half);
      sum += (double)dxn * (x[base + j] * rstd[row]);
    }
    dw_store(dw, j, sum, acc);
  }
  free(cos_t);
  free(sin_t);
  free(rstd);
}
