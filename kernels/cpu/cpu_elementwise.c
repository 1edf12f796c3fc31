/* The memory-bound ops: embedding, SwiGLU, residual add, the KV cache's append, scaling, greedy
 * decoding's argmax and the sums. */
#include <math.h>
#include <string.h>

#include "common/util.h"
#include "kernels/argmax.h"
#include "kernels/cpu/cpu.h"

void cpu_embedding_forward(void *out_, const int32_t *tokens, const void *table_, int n, int dim) {
  float *out = out_;
  const float *table = table_;
#pragma omp parallel for
  for (int i = 0; i < n; i++)
    memcpy(out + (size_t)i * dim, table + (size_t)tokens[i] * dim, (size_t)dim * sizeof(float));
}

/* Serial on purpose: two rows with the same token add into the same table row. */
void cpu_embedding_backward(float *dtable, const void *dout_, const int32_t *tokens, int n,
                            int dim) {
  const float *dout = dout_;
  for (int i = 0; i < n; i++) {
    float *row = dtable + (size_t)tokens[i] * dim;
    const float *d = dout + (size_t)i * dim;
    for (int j = 0; j < dim; j++) row[j] += d[j];
  }
}

/* silu(g) = g / (1 + exp(-g)), the form torch evaluates (exp overflows to inf for very negative
 * g and the quotient correctly becomes -0). */
void cpu_swiglu_forward(void *out_, const void *g_, const void *u_, size_t n) {
  float *out = out_;
  const float *g = g_;
  const float *u = u_;
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void cpu_swiglu_backward(void *dg_, void *du_, const void *dout_, const void *g_, const void *u_,
                         size_t n, int acc) {
  float *dg = dg_;
  float *du = du_;
  const float *dout = dout_;
  const float *g = g_;
  const float *u = u_;
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) {
    float sig = 1.0f / (1.0f + expf(-g[i]));
    float silu = g[i] * sig;
    float dgi = dout[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig)), dui = dout[i] * silu;
    if (dg) dg[i] = acc & ACC_DX ? dg[i] + dgi : dgi;
    if (du) du[i] = acc & ACC_DX ? du[i] + dui : dui;
  }
}

/* t is DT_F32 on the CPU whatever the tensor: activations and gradients are all fp32 here. */
void cpu_add(void *out_, const void *a_, const void *b_, size_t n, enum dtype t) {
  if (t != DT_F32) die("internal: the CPU backend holds fp32 tensors only");
  float *out = out_;
  const float *a = a_, *b = b_;
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void cpu_kv_append(void *k_cache, void *v_cache, const void *k, const void *v,
                   const int32_t *positions, int n, int width, int seq_rows) {
  size_t row = (size_t)width * sizeof(float);
  for (int i = 0; i < n; i++) {
    size_t at = ((size_t)i * seq_rows + positions[i]) * row;
    memcpy((char *)k_cache + at, (const char *)k + i * row, row);
    memcpy((char *)v_cache + at, (const char *)v + i * row, row);
  }
}

void cpu_scale(float *a, float s, size_t n) {
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) a[i] *= s;
}

void cpu_argmax_rows(int32_t *dst, const float *x, int rows, int n) {
  for (int r = 0; r < rows; r++) dst[r] = argmax_first(x + (size_t)r * n, n);
}

/* Serial: the sum's order must depend on n alone, not on the thread count. */
void cpu_sum_into(double *acc, const float *x, size_t n, int squares) {
  double sum = 0.0;
  if (squares)
    for (size_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
  else
    for (size_t i = 0; i < n; i++) sum += x[i];
  *acc += sum;
}
