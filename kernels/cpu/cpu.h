/* Internal declarations of the CPU backend: each cpu_*.c file defines one group of ops and
 * cpu_backend.c gathers them into backend_cpu. Signatures are exactly those of struct backend
 * (kernels/ops.h), which documents what every op computes. The CPU stores every tensor in fp32:
 * each `void *` of the interface is a float *, named with a trailing _ and cast once on entry. */
#ifndef QWEN3_CPU_H
#define QWEN3_CPU_H

#include "kernels/ops.h"

/* cpu_elementwise.c */
void cpu_embedding_forward(void *out, const int32_t *tokens, const void *table, int n, int dim);
void cpu_embedding_backward(float *dtable, const void *dout, const int32_t *tokens, int n,
                            int dim);
void cpu_kv_append(void *k_cache, void *v_cache, const void *k, const void *v,
                   const int32_t *positions, int n, int width, int seq_rows);
void cpu_swiglu_forward(void *out, const void *g, const void *u, size_t n);
void cpu_swiglu_backward(void *dg, void *du, const void *dout, const void *g, const void *u,
                         size_t n, int acc);
void cpu_add(void *out, const void *a, const void *b, size_t n, enum dtype t);
void cpu_scale(float *a, float s, size_t n);
void cpu_argmax_rows(int32_t *dst, const float *x, int rows, int n);
void cpu_sum_into(double *acc, const float *x, size_t n, int squares);

/* cpu_norm.c */
void cpu_rmsnorm_forward(void *out, const void *x, const float *w, int n, int dim, float eps);
void cpu_rmsnorm_backward(void *dx, float *dw, const void *dout, const void *x, const float *w,
                          int n, int dim, float eps, int acc);
void cpu_qk_norm_rope_forward(void *const *out, const void *const *x, const float *const *w,
                              const int *heads, int count, const int32_t *positions, int n,
                              int head_dim, float eps, double theta);
void cpu_qk_norm_rope_backward(void *dx, float *dw, const void *dout, const void *x,
                               const float *w, const int32_t *positions, int n, int heads,
                               int head_dim, float eps, double theta, int acc);

/* cpu_attention.c */
void cpu_attention_forward(void *ctx, float *lse, const void *q, const void *k, const void *v,
                           const struct attn_shape *s);
void cpu_attention_backward(void *dq, void *dk, void *dv, const void *dctx, const void *q,
                            const void *k, const void *v, const void *ctx, const float *lse,
                            const struct attn_shape *s, int acc);

/* cpu_linear.c */
void cpu_linear_forward(void *const *outs, const void *x, const void *const *ws,
                        const int *out_dims, int count, int n, int in_dim);
void cpu_linear_backward(void *dx, float *dw, const void *dout, const void *x, const void *w,
                         int n, int in_dim, int out_dim, int acc);

/* cpu_loss.c */
void cpu_lm_head_loss(float *nll, void *dx, float *dw, const void *x, const void *w,
                      const int32_t *targets, int n, int dim, int vocab, float grad_scale);

/* cpu_nvfp4.c */
void cpu_nvfp4_quantize(void *xq, float *dec, const void *x, enum dtype x_type, int rows,
                        int cols, enum nvfp4_layout layout, int stochastic, uint64_t seed,
                        int rht_signs);
void cpu_nvfp4_quantize_weight(void *xq, float *dec, const float *w, int rows, int cols,
                               enum nvfp4_layout layout, const uint32_t *amax_parts,
                               size_t n_parts);
void cpu_nvfp4_quantize_rows_cols(void *rows_q, float *rows_dec, uint64_t rows_seed,
                                  void *cols_q, float *cols_dec, uint64_t cols_seed,
                                  const void *x, int rows, int cols, int stochastic,
                                  int rht_signs);
void cpu_nvfp4_gemm(void *c, enum dtype c_type, const void *a, const float *dec_a,
                    const void *b, const float *dec_b, int b_kn, int m, int n, int k,
                    float beta);
void cpu_nvfp4_pack(uint8_t *codes, uint8_t *scales, float *dec, const float *w, int rows,
                    int cols, enum nvfp4_layout layout);
void cpu_nvfp4_gemv_packed(void *const *outs, const void *xq, const float *dec_x,
                           const uint8_t *const *codes, const uint8_t *const *scales,
                           const float *const *dec_w, const int *out_dims, int count, int n,
                           int in_dim);

/* cpu_adamw.c */
void cpu_adamw_update(float *p, void *p_act, const float *g, float *m, float *v, size_t n,
                      const struct adamw_step *s, uint32_t *amax_parts);

#endif
