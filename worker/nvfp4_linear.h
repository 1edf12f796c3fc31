/* NVFP4 linear stages (nvfp4_linear.c): the worker's side of the recipe. */
#ifndef QWEN3_NVFP4_LINEAR_H
#define QWEN3_NVFP4_LINEAR_H

#include "worker/worker.h"

/* Whether local layer `layer` trains its linears in NVFP4. */
int nvfp4_layer(const struct worker *w, int layer);
/* Fills the plan's NVFP4 buffer sizes given the floats of its NVFP4 matrices. */
void nvfp4_plan_sizes(struct worker_plan *p, size_t nvfp4_matrix_floats);
void nvfp4_worker_init(struct worker *w);
void nvfp4_worker_free(struct worker *w);
/* W and Wᵀ of every NVFP4 matrix, from the current fp32 master weights. */
void nvfp4_quantize_weights(struct worker *w);

/* out [n, out_dim] = the NVFP4 GEMM of x and the layer's quantized weight `which`. x, out, dx
 * and dout are of the activation dtype; the recipe's operands are fp32 (exact in bf16). */
void nvfp4_linear_forward(struct worker *w, int layer, enum layer_param which, void *out,
                          const void *x, int n, int in_dim, int out_dim);
/* dx += Dgrad, dw += Wgrad, with the recipe's rounding of each operand. */
void nvfp4_linear_backward(struct worker *w, int live, int layer, enum layer_param which,
                           void *dx, float *dw, const void *dout, const void *x, int n,
                           int in_dim, int out_dim);

#endif
