/* NVFP4 linear stages (nvfp4_linear.c): the worker's side of the recipe. */
#ifndef QWEN3_NVFP4_LINEAR_H
#define QWEN3_NVFP4_LINEAR_H

#include "worker/worker.h"

/* Whether local layer `layer` runs its linears in NVFP4 now (not while w->nvfp4_paused). */
int nvfp4_layer(const struct worker *w, int layer);
/* Fills the plan's NVFP4 buffer sizes given the values of its NVFP4 matrices and the sums of
 * nvfp4_amax_part_count and of nvfp4_packed_matrix_bytes over them. */
void nvfp4_plan_sizes(struct worker_plan *p, size_t nvfp4_matrix_values, size_t amax_parts,
                      size_t packed_bytes);
/* AdamW's amax parts of one [rows, cols] matrix (ops.h adamw_update): ceil(values / chunk). */
size_t nvfp4_amax_part_count(int rows, int cols);
/* Bytes of one [rows, cols] matrix packed for decoding: its codes, then its scales. */
size_t nvfp4_packed_matrix_bytes(int rows, int cols);
/* Packs the stage's NVFP4 matrices from the fp32 masters into fp4 (plan.fp4_bytes of backend
 * memory; a KV cache's, kv_cache_init), in the layout nvfp4_linear_forward reads. */
void nvfp4_pack_weights(const struct worker *w, void *fp4);
void nvfp4_worker_init(struct worker *w);
void nvfp4_worker_free(struct worker *w);
/* The fp32 master weights changed: each NVFP4 layer's matrices are quantized again by the
 * layer's next forward, with the amax AdamW took of them (nvfp4_amax_parts) when it wrote
 * them (w->amax_parts_fresh) and QWEN3_NVFP4_WEIGHT_AMAX_PASS=1 is not set, else with an amax
 * pass of their own. */
void nvfp4_weights_changed(struct worker *w);
/* Where AdamW writes parameter `param`'s amax parts (backend memory, nvfp4_amax_part_count
 * words): an NVFP4 matrix's; else NULL. */
uint32_t *nvfp4_amax_parts(const struct worker *w, int param);
/* After a step whose loss or gradient norm is not finite: 1 and a message naming the first
 * NVFP4 operand whose tensor scale is NaN (the operand held a non-finite value), else 0. */
int nvfp4_nonfinite_operand(struct worker *w, char *msg, size_t len);

/* Decoding steps of at most this many sequences read packed weights; more take the GEMM on the
 * training's operands, and a KV cache for more does not pack them. Session 10 kept it at one
 * (the packed GEMV converted each code to fp32 for every token row: four sequences decoded 493
 * tok/s packed against 673); since session 17 the GEMV decodes a word of codes once for all its
 * token rows and each row costs two __dp4a a word, so up to NVFP4_GEMV_MAX_ROWS, what the op
 * takes (measured in bench/NOTES.md, session 17). */
#define NVFP4_PACKED_DECODE_ROWS NVFP4_GEMV_MAX_ROWS

/* The NVFP4 forward of a linear stage: the count (1 to NVFP4_GEMV_MAX_MATS) matrices which[k]
 * of local layer `layer` that read the same x [n, in_dim], as linear_forward's: outs[k]
 * [n, out_dims[k]] = the NVFP4 GEMM of x and the layer's quantized weight which[k]. x is
 * quantized once for all of them (round to nearest, so its operand is the same for each; its
 * tensor scale is kept in which[0]'s slot). x, outs, dx and dout are of the activation dtype,
 * and so are the recipe's operands (exact in bf16). Inside worker_infer with a KV cache holding
 * packed weights, n <= NVFP4_PACKED_DECODE_ROWS rows read the packed weights instead, all the
 * stage's matrices in one nvfp4_gemv_packed call (the same values, 4.5 bits each). */
void nvfp4_linear_forward(struct worker *w, int layer, const enum layer_param *which,
                          void *const *outs, const int *out_dims, int count, const void *x,
                          int n, int in_dim);
/* dx (+)= Dgrad, dw (+)= Wgrad (added as acc's ACC_DX and ACC_DW say, ops.h), with the
 * recipe's rounding of each operand. x_of: the linear of the same stage whose call quantizes
 * Wgrad's operand from x (round to nearest, so the same for all of them): the call with
 * which == x_of quantizes it, and the stage's other linears, called after it, reuse it. */
void nvfp4_linear_backward(struct worker *w, int live, int layer, enum layer_param which,
                           enum layer_param x_of, void *dx, float *dw, const void *dout,
                           const void *x, int n, int in_dim, int out_dim, int acc);

#endif
