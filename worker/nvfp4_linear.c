/* The NVFP4 recipe of a linear stage (REFERENCE.md "NVFP4", TE's NVFP4BlockScaling):
 *   Fprop  y  = X(1x16, RN) · W(16x16, RN)ᵀ
 *   Dgrad  dX = dY(1x16, SR) · W(the same values)
 *   Wgrad  dW = RHT(dYᵀ)(1x16, SR) · RHT(Xᵀ)(1x16, RN)ᵀ   (RHT along the token dimension)
 * Every GEMM runs on the exact values q·s_b (exact in bf16, so in the bf16 mode the operands are
 * bf16 and the GEMMs run on bf16 tensor cores) with fp32 accumulation and alpha = S_dec,A ·
 * S_dec,B, which is what an FP4 tensor core computes. The tensor scales stay in backend memory
 * (q_dec): nothing comes back to the host inside a step. Weights are quantized once per
 * optimizer step, layer by layer as the forward reaches them; with 16x16 tiles W serves Dgrad
 * as it is (the GEMM reads it as [k, n]), so only the 1x16 weight recipe keeps a second,
 * transposed copy. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/block.h"
#include "worker/nvfp4_linear.h"
#include "kernels/nvfp4.h"

static int is_matrix(const struct param *p) { return p->cols > 1; }

/* Whether the plan gives local layer `layer` NVFP4 buffers (paused or not). */
static int planned(const struct worker *w, int layer) {
  int g = w->plan.first_layer + layer;
  return g >= w->plan.nvfp4.first_layer && g < w->plan.nvfp4.end_layer;
}

int nvfp4_layer(const struct worker *w, int layer) {
  return !w->nvfp4_paused && planned(w, layer);
}

/* The largest row width any linear of the block reads or writes. */
static size_t widest(const struct qwen3_config *c) {
  size_t m = (size_t)c->hidden_size;
  if ((size_t)c->num_heads * c->head_dim > m) m = (size_t)c->num_heads * c->head_dim;
  if ((size_t)c->intermediate_size > m) m = (size_t)c->intermediate_size;
  return m;
}

/* The tensor scales of one linear's operands, kept per layer and matrix: the weight (and its
 * transposed copy), and the last micro-batch's forward input, Dgrad's output gradient and
 * Wgrad's two operands. */
enum { DEC_W, DEC_WT, DEC_X, DEC_DY, DEC_DYT, DEC_XT, N_DECS };
static const char *const DEC_NAMES[N_DECS] = {
    "weight", "transposed weight", "input (Fprop)", "output gradient (Dgrad)",
    "output gradient (Wgrad)", "input (Wgrad)"};

static size_t dec_bytes(const struct worker_plan *p) {
  size_t bytes = (size_t)p->n_layers * N_LAYER_PARAMS * N_DECS * sizeof(float);
  return (bytes + 255) / 256 * 256;   /* the weights after them stay 256-byte aligned */
}

/* Spans of q_scratch, each tokens x widest values of the activation dtype: the forward's
 * quantized X (then Dgrad's dY; in decoding from packed weights, X's integer operand), and
 * Wgrad's two transposed operands. */
enum { SPAN_A, SPAN_B, SPAN_C, N_SPANS };

size_t nvfp4_amax_part_count(int rows, int cols) {
  return ((size_t)rows * cols + ADAMW_AMAX_CHUNK - 1) / ADAMW_AMAX_CHUNK;
}

void nvfp4_plan_sizes(struct worker_plan *p, size_t nvfp4_matrix_values, size_t amax_parts,
                      size_t packed_bytes) {
  size_t tokens = (size_t)p->batch * p->seq, bytes = dtype_bytes(p->act);
  size_t copies = p->nvfp4.weight_2d ? 1 : 2;
  p->wq_bytes = nvfp4_matrix_values ? dec_bytes(p) + copies * nvfp4_matrix_values * bytes +
                                          amax_parts * sizeof(uint32_t)
                                    : 0;
  p->q_scratch_bytes = nvfp4_matrix_values ? N_SPANS * tokens * widest(&p->cfg) * bytes : 0;
  p->fp4_bytes = packed_bytes ? dec_bytes(p) + packed_bytes : 0;
}

/* ---- decoding from packed weights ----------------------------------------------------------
 * A KV cache's fp4 buffer: the tensor scales S_dec as in q_dec (one float per layer, parameter
 * and operand slot; only DEC_W is used), then every NVFP4 matrix in parameter order, its codes
 * then its scales, each 256-byte aligned (the GPU's loads are 16 bytes wide). */

static size_t round256(size_t n) { return (n + 255) / 256 * 256; }

size_t nvfp4_packed_matrix_bytes(int rows, int cols) {
  return round256((size_t)rows * cols / 2) + round256((size_t)rows * cols / 16);
}

/* the codes of local layer `layer`'s matrix `which` in fp4, its scales after them */
static uint8_t *packed_of(const struct worker *w, void *fp4, int layer, enum layer_param which) {
  size_t at = dec_bytes(&w->plan);
  for (int l = 0; l < w->plan.n_layers; l++) {
    if (!planned(w, l)) continue;
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      const struct param *p = &w->params[w->layer_param[l][k]];
      if (!is_matrix(p)) continue;
      if (l == layer && k == (int)which) return (uint8_t *)fp4 + at;
      at += nvfp4_packed_matrix_bytes(p->rows, p->cols);
    }
  }
  die("internal: layer %d parameter %d has no packed NVFP4 weight", layer, (int)which);
}

/* the scales of a [rows, cols] matrix whose codes are at `codes` */
static uint8_t *packed_scales(uint8_t *codes, int rows, int cols) {
  return codes + round256((size_t)rows * cols / 2);
}

static float *packed_dec(const struct worker *w, void *fp4, int layer, enum layer_param which) {
  return (float *)fp4 + ((size_t)layer * N_LAYER_PARAMS + which) * N_DECS + DEC_W;
}

void nvfp4_pack_weights(const struct worker *w, void *fp4) {
  enum nvfp4_layout layout = w->plan.nvfp4.weight_2d ? NVFP4_TILES : NVFP4_ROWS;
  for (int l = 0; l < w->plan.n_layers; l++) {
    if (!planned(w, l)) continue;
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      const struct param *p = &w->params[w->layer_param[l][k]];
      if (!is_matrix(p)) continue;
      uint8_t *codes = packed_of(w, fp4, l, (enum layer_param)k);
      w->be->nvfp4_pack(codes, packed_scales(codes, p->rows, p->cols),
                        packed_dec(w, fp4, l, (enum layer_param)k), w->weights + p->offset,
                        p->rows, p->cols, layout);
    }
  }
}

/* the bytes of one span of n rows */
static size_t span_bytes(const struct worker *w, int n) {
  return (size_t)n * widest(&w->plan.cfg) * dtype_bytes(w->plan.act);
}

static void *span(struct worker *w, int which, int n) {
  return (char *)w->q_scratch + (size_t)which * span_bytes(w, n);
}

static float *dec(const struct worker *w, int layer, enum layer_param which, int slot) {
  return w->q_dec + ((size_t)layer * N_LAYER_PARAMS + which) * N_DECS + slot;
}

/* W (then Wᵀ for the 1x16 recipe) of parameter i, in the activation dtype */
static void *wq_of(const struct worker *w, int i, int transposed) {
  const struct param *p = &w->params[i];
  size_t at = w->wq_offset[i] + (transposed ? (size_t)p->rows * p->cols : 0);
  return (char *)w->wq + at * dtype_bytes(w->plan.act);
}

/* Tests and measurements: QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 makes every weight quantization take
 * its own amax pass, as before AdamW took the maxima: the same numbers, one more read.
 * AdamW still writes the parts, and still no weight copy of an NVFP4 layer's matrices
 * (optim.c): the switch changes where the amax comes from and nothing else. */
static int amax_pass_forced(void) {
  const char *v = getenv("QWEN3_NVFP4_WEIGHT_AMAX_PASS");
  return v && strcmp(v, "1") == 0;
}

/* The parts are valid when the optimizer wrote them since this was last called, as it does
 * (optim.c) before the call of the next step's worker_prepare_step: whatever else writes the
 * masters (init, loading a model or a checkpoint) leaves amax_parts_fresh clear, and so does
 * an evaluation's worker_prepare_step between steps, which takes it (the next step then pays
 * the amax passes once more, as the weight copy's conversion). */
void nvfp4_weights_changed(struct worker *w) {
  memset(w->wq_stale, 1, (size_t)w->plan.n_layers);
  w->amax_parts_valid = w->amax_parts_fresh && !amax_pass_forced();
  w->amax_parts_fresh = 0;
}

uint32_t *nvfp4_amax_parts(const struct worker *w, int param) {
  return w->amax_parts ? w->amax_parts[param] : NULL;
}

/* xq = parameter i's masters quantized in `layout` (no transform), S_dec into *dec: with the
 * amax AdamW took of them when its parts are valid, else with a pass of the quantizer's own */
static void quantize_weight(const struct worker *w, int i, void *xq, float *dec,
                            enum nvfp4_layout layout) {
  const struct param *p = &w->params[i];
  const float *weight = w->weights + p->offset;
  if (w->amax_parts_valid)
    w->be->nvfp4_quantize_weight(xq, dec, weight, p->rows, p->cols, layout, w->amax_parts[i],
                                 nvfp4_amax_part_count(p->rows, p->cols));
  else
    w->be->nvfp4_quantize(xq, dec, weight, DT_F32, p->rows, p->cols, layout, 0, 0, -1);
}

/* Local layer `layer`'s matrices quantized from the current fp32 masters: by its first NVFP4
 * forward after the masters changed, which runs after the optimizer's update of this layer
 * alone (worker.c waits for it), so the next step's forward overlaps the rest of the update. */
static void quantize_layer_weights(struct worker *w, int layer) {
  int tiles = w->plan.nvfp4.weight_2d;
  for (int k = 0; k < N_LAYER_PARAMS; k++) {
    int i = w->layer_param[layer][k];
    if (!is_matrix(&w->params[i])) continue;
    quantize_weight(w, i, wq_of(w, i, 0), dec(w, layer, k, DEC_W),
                    tiles ? NVFP4_TILES : NVFP4_ROWS);
    if (!tiles)   /* 1x16 along Dgrad's reduction dimension needs its own pass */
      quantize_weight(w, i, wq_of(w, i, 1), dec(w, layer, k, DEC_WT), NVFP4_COLS);
  }
  w->wq_stale[layer] = 0;
}

void nvfp4_worker_init(struct worker *w) {
  const struct worker_plan *p = &w->plan;
  w->wq_offset = xmalloc((size_t)w->n_params * sizeof(size_t));
  size_t *part_at = xmalloc((size_t)w->n_params * sizeof(size_t));
  size_t at = 0, parts = 0, copies = p->nvfp4.weight_2d ? 1 : 2;
  for (int i = 0; i < w->n_params; i++) w->wq_offset[i] = part_at[i] = SIZE_MAX;
  for (int l = 0; l < p->n_layers; l++) {
    if (!planned(w, l)) continue;
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      int i = w->layer_param[l][k];
      const struct param *m = &w->params[i];
      if (!is_matrix(m)) continue;
      w->wq_offset[i] = at;
      at += copies * (size_t)m->rows * m->cols;
      part_at[i] = parts;
      parts += nvfp4_amax_part_count(m->rows, m->cols);
    }
  }
  size_t weights_end = dec_bytes(p) + at * dtype_bytes(p->act);
  size_t bytes = at ? weights_end + parts * sizeof(uint32_t) : 0;
  if (bytes != p->wq_bytes) die("internal: NVFP4 weight plan %zu != %zu bytes", bytes, p->wq_bytes);
  if (bytes) {
    w->wq_stale = xmalloc((size_t)p->n_layers);
    nvfp4_weights_changed(w);
    if (!(w->q_dec = w->be->alloc(bytes)))
      die("out of %s memory for NVFP4 weights (%.1f MiB)", w->be->name, bytes / 1048576.0);
    w->wq = (char *)w->q_dec + dec_bytes(p);
    w->rht_signs = nvfp4_rht_signs(p->nvfp4.seed);
  }
  if (bytes) {   /* after the weights, in the same allocation */
    uint32_t *first = (uint32_t *)((char *)w->q_dec + weights_end);
    w->amax_parts = xmalloc((size_t)w->n_params * sizeof *w->amax_parts);
    for (int i = 0; i < w->n_params; i++)
      w->amax_parts[i] = part_at[i] == SIZE_MAX ? NULL : first + part_at[i];
  }
  free(part_at);
}

void nvfp4_worker_free(struct worker *w) {
  if (w->q_dec) w->be->free(w->q_dec);
  free(w->wq_offset);
  free(w->wq_stale);
  free(w->amax_parts);
  w->amax_parts = NULL;
  w->wq_stale = NULL;
  w->q_dec = NULL;
  w->wq = NULL;
}

int nvfp4_nonfinite_operand(struct worker *w, char *msg, size_t len) {
  if (!w->q_dec) return 0;
  /* the scales in table order; the slots of high-precision matrices stay 0 (alloc zeroes) */
  size_t n = (size_t)w->plan.n_layers * N_LAYER_PARAMS * N_DECS, i = 0;
  float *decs = xmalloc(n * sizeof(float));
  w->be->to_host(decs, w->q_dec, n * sizeof(float));
  while (i < n && !isnan(decs[i])) i++;
  free(decs);
  if (i == n) return 0;
  int layer = (int)(i / (N_LAYER_PARAMS * N_DECS)), k = (int)(i / N_DECS % N_LAYER_PARAMS);
  snprintf(msg, len, "the NVFP4 quantization of %s's %s met a non-finite value",
           w->params[w->layer_param[layer][k]].name, DEC_NAMES[i % N_DECS]);
  return 1;
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

void nvfp4_linear_forward(struct worker *w, int layer, const enum layer_param *which,
                          void *const *outs, const int *out_dims, int count, const void *x,
                          int n, int in_dim) {
  const struct backend *be = w->be;
  enum dtype act = w->plan.act;
  void *xq = span(w, SPAN_A, n);
  float *dec_x = dec(w, layer, which[0], DEC_X);
  if (count < 1 || count > NVFP4_GEMV_MAX_MATS)
    die("internal: a linear stage of %d matrices", count);
  if (w->wq_stale[layer]) quantize_layer_weights(w, layer);
  void *fp4 = w->kv ? w->kv->fp4 : NULL;
  if (fp4 && n <= NVFP4_PACKED_DECODE_ROWS) {   /* one call for the stage's matrices */
    /* x as the packed GEMV's integer operand: 1.25 bytes a value, within span A's 2 (bf16) or
     * 4 (fp32) a value of the widest row */
    if (nvfp4_int_operand_bytes(n, in_dim) > span_bytes(w, n))
      die("internal: the integer operand of %d x %d (%zu bytes) exceeds its span (%zu)", n,
          in_dim, nvfp4_int_operand_bytes(n, in_dim), span_bytes(w, n));
    be->nvfp4_quantize(xq, dec_x, x, act, n, in_dim, NVFP4_ROWS_INT, 0, 0, -1);
    const uint8_t *codes[NVFP4_GEMV_MAX_MATS], *scales[NVFP4_GEMV_MAX_MATS];
    const float *dec_w[NVFP4_GEMV_MAX_MATS];
    for (int k = 0; k < count; k++) {
      uint8_t *c = packed_of(w, fp4, layer, which[k]);
      codes[k] = c;
      scales[k] = packed_scales(c, out_dims[k], in_dim);
      dec_w[k] = packed_dec(w, fp4, layer, which[k]);
    }
    be->nvfp4_gemv_packed(outs, xq, dec_x, codes, scales, dec_w, out_dims, count, n, in_dim);
    return;
  }
  be->nvfp4_quantize(xq, dec_x, x, act, n, in_dim, NVFP4_ROWS, 0, 0, -1);
  for (int k = 0; k < count; k++)
    be->nvfp4_gemm(outs[k], act, xq, dec_x, wq_of(w, w->layer_param[layer][which[k]], 0),
                   dec(w, layer, which[k], DEC_W), 0, n, out_dims[k], in_dim, 0.0f);
}

void nvfp4_linear_backward(struct worker *w, int live, int layer, enum layer_param which,
                           enum layer_param x_of, void *dx, float *dw, const void *dout,
                           const void *x, int n, int in_dim, int out_dim, int acc) {
  const struct backend *be = w->be;
  const struct nvfp4_policy *pol = &w->plan.nvfp4;
  float dx_beta = acc & ACC_DX ? 1.0f : 0.0f, dw_beta = acc & ACC_DW ? 1.0f : 0.0f;
  enum dtype act = w->plan.act;
  int i = w->layer_param[layer][which];
  void *a = span(w, SPAN_A, n), *b = span(w, SPAN_B, n), *c = span(w, SPAN_C, n);

  /* dY's two operands from one read: 1x16 along its rows for Dgrad, and RHT(dYᵀ) for Wgrad */
  int signs = pol->rht ? w->rht_signs : -1;
  float *dec_dy = dec(w, layer, which, DEC_DY), *dec_b = dec(w, layer, which, DEC_DYT);
  be->nvfp4_quantize_rows_cols(a, dec_dy, operand_seed(w, live, layer, which, 0), b, dec_b,
                               operand_seed(w, live, layer, which, 1), dout, n, out_dim,
                               pol->stochastic, signs);

  /* Dgrad: dX (+)= dY(1x16, SR) · W, W read as [out, in] = [k, n] (16x16) or its 1x16 Wᵀ copy */
  if (pol->weight_2d)
    be->nvfp4_gemm(dx, act, a, dec_dy, wq_of(w, i, 0), dec(w, layer, which, DEC_W), 1, n, in_dim,
                   out_dim, dx_beta);
  else
    be->nvfp4_gemm(dx, act, a, dec_dy, wq_of(w, i, 1), dec(w, layer, which, DEC_WT), 0, n,
                   in_dim, out_dim, dx_beta);

  /* Wgrad: dW (+)= RHT(dYᵀ)(SR) · RHT(Xᵀ)(RN)ᵀ, the transform running along the tokens */
  float *dec_c = dec(w, layer, x_of, DEC_XT);
  if (which == x_of) be->nvfp4_quantize(c, dec_c, x, act, n, in_dim, NVFP4_COLS, 0, 0, signs);
  be->nvfp4_gemm(dw, DT_F32, b, dec_b, c, dec_c, 0, out_dim, in_dim, n, dw_beta);
}
