/* The memory-bound ops: embedding, SwiGLU, residual add, scaling and the squared norm. */
#include <math.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

void cpu_embedding_forward(float *out, const int32_t *tokens, const float *table, int n, int dim) {
#pragma omp parallel for
  for (int i = 0; i < n; i++)
    memcpy(out + (size_t)i * dim, table + (size_t)tokens[i] * dim, (size_t)dim * sizeof(float));
}

/* Serial on purpose: two rows with the same token add into the same table row. */
void cpu_embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int n,
                            int dim) {
  for (int i = 0; i < n; i++) {
    float *row = dtable + (size_t)tokens[i] * dim;
    const float *d = dout + (size_t)i * dim;
    for (int j = 0; j < dim; j++) row[j] += d[j];
  }
}

/* silu(g) = g / (1 + exp(-g)), the form torch evaluates (exp overflows to inf for very negative
 * g and the quotient correctly becomes -0). */
void cpu_swiglu_forward(float *out, const float *g, const float *u, size_t n) {
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void cpu_swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                         size_t n) {
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) {
    float sig = 1.0f / (1.0f + expf(-g[i]));
    float silu = g[i] * sig;
    if (dg) dg[i] += dout[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
    if (du) du[i] += dout[i] * silu;
  }
}

void cpu_add_inplace(float *a, const float *b, size_t n) {
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) a[i] += b[i];
}

void cpu_scale(float *a, float s, size_t n) {
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) a[i] *= s;
}

double cpu_sum_squares(const float *x, size_t n) {
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum)
  for (size_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
  return sum;
}
