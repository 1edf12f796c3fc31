/* The LM head fused with cross-entropy. Rows that have a target are gathered into chunks of
 * LOSS_CHUNK_ROWS; each chunk's logits [rows, vocab] come from one GEMM, are turned into
 * softmax - onehot in place, and feed two more GEMMs for dx and dw. Masked rows (target < 0,
 * e.g. prompt tokens in SFT) cost nothing. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu.h"

/* Big enough for efficient GEMMs, small enough that a 151936-word chunk of logits (39 MB)
 * stays modest. */
#define LOSS_CHUNK_ROWS 64

/* Returns the row's nll; when want_grad, overwrites the logits with softmax - onehot(target). */
static double row_loss(float *logits, int vocab, int target, int want_grad) {
  float max = -FLT_MAX;
  for (int j = 0; j < vocab; j++)
    if (logits[j] > max) max = logits[j];
  float target_logit = logits[target];
  double sum = 0.0;
  for (int j = 0; j < vocab; j++) {
    float e = expf(logits[j] - max);
    sum += e;
    if (want_grad) logits[j] = e;
  }
  if (want_grad) {
    float inv_sum = (float)(1.0 / sum);
    for (int j = 0; j < vocab; j++) logits[j] *= inv_sum;
    logits[target] -= 1.0f;
  }
  return (double)max + log(sum) - target_logit;
}

void cpu_lm_head_loss(float *nll, void *dx_, float *dw, const void *x_, const void *w_,
                      const int32_t *targets, int n, int dim, int vocab, float grad_scale) {
  float *dx = dx_;
  const float *x = x_;
  const float *w = w_;
  int want_grad = dx != NULL;
  int *rows = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int));
  int valid = 0;
  for (int i = 0; i < n; i++) {
    nll[i] = 0.0f;
    if (targets[i] >= 0) {
      if (targets[i] >= vocab) die("lm_head_loss: target %d outside vocab %d", targets[i], vocab);
      rows[valid++] = i;
    }
  }
  int chunk_rows = valid < LOSS_CHUNK_ROWS ? (valid > 0 ? valid : 1) : LOSS_CHUNK_ROWS;
  float *xc = xmalloc((size_t)chunk_rows * dim * sizeof(float));
  float *dxc = xmalloc((size_t)chunk_rows * dim * sizeof(float));
  float *logits = xmalloc((size_t)chunk_rows * vocab * sizeof(float));
  for (int start = 0; start < valid; start += chunk_rows) {
    int m = valid - start < chunk_rows ? valid - start : chunk_rows;
    const int *chunk = rows + start;
    for (int r = 0; r < m; r++)
      memcpy(xc + (size_t)r * dim, x + (size_t)chunk[r] * dim, (size_t)dim * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, vocab, dim, 1.0f, xc, dim, w, dim,
                0.0f, logits, vocab);
#pragma omp parallel for
    for (int r = 0; r < m; r++)
      nll[chunk[r]] =
          (float)row_loss(logits + (size_t)r * vocab, vocab, targets[chunk[r]], want_grad);
    if (!want_grad) continue;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, dim, vocab, grad_scale, logits,
                vocab, w, dim, 0.0f, dxc, dim);
    for (int r = 0; r < m; r++) {
      float *dxi = dx + (size_t)chunk[r] * dim;
      for (int d = 0; d < dim; d++) dxi[d] += dxc[(size_t)r * dim + d];
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, vocab, dim, m, grad_scale, logits, vocab,
                xc, dim, 1.0f, dw, dim);
  }
  free(rows);
  free(xc);
  free(dxc);
  free(logits);
}
