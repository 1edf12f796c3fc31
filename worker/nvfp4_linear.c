/* The NVFP4 recipe of a linear stage (REFERENCE.md "NVFP4", TE's NVFP4BlockScaling):
 *   Fprop  y  = X(1x16, RN) · W(16x16, RN)ᵀ
 *   Dgrad  dX = dY(1x16, SR) · W(the same values)
 *   Wgrad  dW = RHT(dYᵀ)(1x16, SR) · RHT(Xᵀ)(1x16, RN)ᵀ   (RHT along the token dimension)
 * Every GEMM runs on the exact values q·s_b with fp32 accumulation and alpha = S_dec,A · S_dec,B,
 * which is what an FP4 tensor core computes. Weights are quantized once per optimizer step. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common/util.h"
#include "worker/block.h"
#include "worker/nvfp4_linear.h"
#include "kernels/nvfp4.h"

static int is_matrix(const struct param *p) { return p->cols > 1; }

int nvfp4_layer(const struct worker *w, int layer) {
  int g = w->plan.first_layer + layer;
  return g >= w->plan.nvfp4.first_layer && g < w->plan.nvfp4.end_layer;
}

/* The largest row width any linear of the block reads or writes. */
static size_t widest(const struct qwen3_config *c) {
  size_t m = (size_t)c->hidden_size;
  if ((size_t)c->num_heads * c->head_dim > m) m = (size_t)c->num_heads * c->head_dim;
  if ((size_t)c->intermediate_size > m) m = (size_t)c->intermediate_size;
  return m;
}

/* Spans of q_scratch, each tokens x widest floats: the recipe's three operands, then, when the
 * activations are not fp32, the fp32 copies of X and dY the recipe starts from. */
enum { SPAN_A, SPAN_B, SPAN_C, SPAN_X, SPAN_DY };

void nvfp4_plan_sizes(struct worker_plan *p, size_t nvfp4_matrix_floats) {
  size_t tokens = (size_t)p->batch * p->seq;
  p->wq_floats = 2 * nvfp4_matrix_floats;
  /* forward: X quantized; backward: dY quantized, dYᵀ and Xᵀ transformed */
  int spans = p->act == DT_F32 ? SPAN_C + 1 : SPAN_DY + 1;
  p->q_scratch_floats = nvfp4_matrix_floats ? spans * tokens * widest(&p->cfg) : 0;
}

static float *span(struct worker *w, int which, int n) {
  return w->q_scratch + (size_t)which * n * widest(&w->plan.cfg);
}

/* x as fp32: itself when the activations are fp32, else converted into span `into`. */
static const float *as_f32(struct worker *w, const void *x, size_t values, int into, int n) {
  if (w->plan.act == DT_F32) return x;
  float *f = span(w, into, n);
  w->be->convert(f, DT_F32, x, w->plan.act, values);
  return f;
}

static float check_dec(float dec, const struct worker *w, int layer, const char *what) {
  if (isnan(dec))
    die("step %d: NVFP4 quantization of %s in layer %d met a non-finite value: the run "
        "diverged", w->step, what, w->plan.first_layer + layer);
  return dec;
}

void nvfp4_quantize_weights(struct worker *w) {
  const struct backend *be = w->be;
  const struct nvfp4_policy *pol = &w->plan.nvfp4;
  for (int i = 0; i < w->n_params; i++) {
    const struct param *p = &w->params[i];
    if (w->wq_offset[i] == SIZE_MAX) continue;
    float *wq = w->wq + w->wq_offset[i], *wqt = wq + (size_t)p->rows * p->cols;
    const float *weight = w->weights + p->offset;
    float dec = be->nvfp4_quantize_dequantize(wq, weight, p->rows, p->cols, pol->weight_2d, 0, 0);
    if (isnan(dec)) die("step %d: %s holds a non-finite value: the run diverged", w->step, p->name);
    w->wq_dec[i] = dec;
    if (pol->weight_2d) {   /* 16x16 tiles: Wᵀ quantizes to the transpose, bit for bit */
      be->transpose(wqt, wq, p->rows, p->cols);
      w->wqt_dec[i] = dec;
    } else {                /* 1x16 along Dgrad's reduction dimension needs its own pass */
      be->transpose(wqt, weight, p->rows, p->cols);
      w->wqt_dec[i] = be->nvfp4_quantize_dequantize(wqt, wqt, p->cols, p->rows, 0, 0, 0);
    }
  }
}

void nvfp4_worker_init(struct worker *w) {
  const struct worker_plan *p = &w->plan;
  w->wq_offset = xmalloc((size_t)w->n_params * sizeof(size_t));
  w->wq_dec = xcalloc((size_t)w->n_params, sizeof(float));
  w->wqt_dec = xcalloc((size_t)w->n_params, sizeof(float));
  size_t at = 0;
  for (int i = 0; i < w->n_params; i++) w->wq_offset[i] = SIZE_MAX;
  for (int l = 0; l < p->n_layers; l++) {
    if (!nvfp4_layer(w, l)) continue;
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      int i = w->layer_param[l][k];
      if (!is_matrix(&w->params[i])) continue;
      w->wq_offset[i] = at;
      at += 2 * (size_t)w->params[i].rows * w->params[i].cols;
    }
  }
  if (at != p->wq_floats) die("internal: NVFP4 weight plan %zu != %zu floats", at, p->wq_floats);
  if (at && !(w->wq = w->be->alloc(p->wq_floats * sizeof(float))))
    die("out of %s memory for NVFP4 weights (%.1f MiB)", w->be->name,
        p->wq_floats * sizeof(float) / 1048576.0);
  w->rht_signs = nvfp4_rht_signs(p->nvfp4.seed);
}

void nvfp4_worker_free(struct worker *w) {
  if (w->wq) w->be->free(w->wq);
  free(w->wq_offset);
  free(w->wq_dec);
  free(w->wqt_dec);
}

/* A distinct, layout-independent seed for every stochastically rounded operand: the run's seed,
 * the step, the global layer, the parameter and the micro-batch's stream. */
static uint64_t operand_seed(const struct worker *w, int live, int layer, int param, int operand) {
  uint64_t x = w->plan.nvfp4.seed;
  uint64_t parts[] = {(uint64_t)w->step, (uint64_t)(w->plan.first_layer + layer),
                      (uint64_t)param, (uint64_t)operand, w->stream[live]};
  for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
    x ^= parts[i] + 0x9E3779B97F4A7C15ull + (x << 6) + (x >> 2);
    x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9ull;
  }
  return x;
}

void nvfp4_linear_forward(struct worker *w, int layer, enum layer_param which, void *out,
                          const void *x, int n, int in_dim, int out_dim) {
  const struct backend *be = w->be;
  int i = w->layer_param[layer][which];
  float *xq = span(w, SPAN_A, n);
  const float *xf = as_f32(w, x, (size_t)n * in_dim, SPAN_X, n);
  float dec = check_dec(be->nvfp4_quantize_dequantize(xq, xf, n, in_dim, 0, 0, 0), w, layer,
                        "an activation");
  float *y = w->plan.act == DT_F32 ? out : span(w, SPAN_B, n);
  be->nvfp4_gemm(y, xq, dec, w->wq + w->wq_offset[i], w->wq_dec[i], n, out_dim, in_dim, 0.0f);
  if (y != out) be->convert(out, w->plan.act, y, DT_F32, (size_t)n * out_dim);
}

void nvfp4_linear_backward(struct worker *w, int live, int layer, enum layer_param which,
                           void *dx, float *dw, const void *dout_act, const void *x_act, int n,
                           int in_dim, int out_dim) {
  const struct backend *be = w->be;
  const struct nvfp4_policy *pol = &w->plan.nvfp4;
  int i = w->layer_param[layer][which];
  float *a = span(w, SPAN_A, n), *b = span(w, SPAN_B, n), *c = span(w, SPAN_C, n);
  const float *dout = as_f32(w, dout_act, (size_t)n * out_dim, SPAN_DY, n);
  const float *x = as_f32(w, x_act, (size_t)n * in_dim, SPAN_X, n);

  /* Dgrad: dX += dY(1x16, SR) · W */
  float dec_dy = check_dec(be->nvfp4_quantize_dequantize(a, dout, n, out_dim, 0, pol->stochastic,
                                                         operand_seed(w, live, layer, which, 0)),
                           w, layer, "an output gradient");
  const float *wqt = w->wq + w->wq_offset[i] + (size_t)out_dim * in_dim;
  if (w->plan.act == DT_F32) {
    be->nvfp4_gemm(dx, a, dec_dy, wqt, w->wqt_dec[i], n, in_dim, out_dim, 1.0f);
  } else {   /* accumulate in fp32 through span B, free until Wgrad */
    be->convert(b, DT_F32, dx, w->plan.act, (size_t)n * in_dim);
    be->nvfp4_gemm(b, a, dec_dy, wqt, w->wqt_dec[i], n, in_dim, out_dim, 1.0f);
    be->convert(dx, w->plan.act, b, DT_F32, (size_t)n * in_dim);
  }

  /* Wgrad: dW += RHT(dYᵀ)(SR) · RHT(Xᵀ)(RN)ᵀ, the transform running along the tokens */
  be->transpose(b, dout, n, out_dim);
  be->transpose(c, x, n, in_dim);
  if (pol->rht) {
    be->nvfp4_rht(b, b, out_dim, n, w->rht_signs);
    be->nvfp4_rht(c, c, in_dim, n, w->rht_signs);
  }
  float dec_b = check_dec(be->nvfp4_quantize_dequantize(b, b, out_dim, n, 0, pol->stochastic,
                                                        operand_seed(w, live, layer, which, 1)),
                          w, layer, "a weight gradient operand");
  float dec_c = check_dec(be->nvfp4_quantize_dequantize(c, c, in_dim, n, 0, 0, 0), w, layer,
                          "a weight gradient operand");
  be->nvfp4_gemm(dw, b, dec_b, c, dec_c, out_dim, in_dim, n, 1.0f);
}
