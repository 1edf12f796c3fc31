/* Internal declarations of the CPU backend: each cpu_*.c file defines one group of ops and
 * cpu_backend.c gathers them into backend_cpu. Signatures are exactly those of struct backend
 * (kernels/ops.h), which documents what every op computes. */
#ifndef QWEN3_CPU_H
#define QWEN3_CPU_H

#include "kernels/ops.h"

/* cpu_elementwise.c */
void cpu_embedding_forward(float *out, const int32_t *tokens, const float *table, int n, int dim);
void cpu_embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int n,
                            int dim);
void cpu_swiglu_forward(float *out, const float *g, const float *u, size_t n);
void cpu_swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                         size_t n);
void cpu_add_inplace(float *a, const float *b, size_t n);
void cpu_scale(float *a, float s, size_t n);
double cpu_sum_squares(const float *x, size_t n);

/* cpu_norm.c */
void cpu_rmsnorm_forward(float *out, const float *x, const float *w, int n, int dim, float eps);
void cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                          int n, int dim, float eps);
void cpu_qk_norm_rope_forward(float *out, const float *x, const float *w,
                              const int32_t *positions, int n, int heads, int head_dim, float eps,
                              double theta);
void cpu_qk_norm_rope_backward(float *dx, float *dw, const float *dout, const float *x,
                               const float *w, const int32_t *positions, int n, int heads,
                               int head_dim, float eps, double theta);

/* cpu_attention.c */
void cpu_attention_forward(float *ctx, float *lse, const float *q, const float *k, const float *v,
                           const struct attn_shape *s);
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dctx, const float *q,
                            const float *k, const float *v, const float *ctx, const float *lse,
                            const struct attn_shape *s);

/* cpu_linear.c */
void cpu_linear_forward(float *out, const float *x, const float *w, int n, int in_dim,
                        int out_dim);
void cpu_linear_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         int n, int in_dim, int out_dim);

/* cpu_loss.c */
void cpu_lm_head_loss(float *nll, float *dx, float *dw, const float *x, const float *w,
                      const int32_t *targets, int n, int dim, int vocab, float grad_scale);

/* cpu_nvfp4.c */
void cpu_transpose(float *out, const float *x, int rows, int cols);
float cpu_nvfp4_quantize_dequantize(float *xq, const float *x, int rows, int cols,
                                    int tiles_16x16, int stochastic, uint64_t seed);

/* cpu_adamw.c */
void cpu_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, int t);

#endif
