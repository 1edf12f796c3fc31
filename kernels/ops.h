/* The one backend interface. Every operation the engine runs is a field of `struct backend`;
 * the CPU backend (kernels/cpu, fp32, CBLAS) is the reference that every other backend is
 * tested against. The engine never dereferences a buffer it got from a backend: it allocates,
 * copies and calls ops through this table, so a CUDA backend plugs in without touching it.
 *
 * Conventions shared by every op:
 *  - Matrices are row-major. A linear weight is [out, in] (nn.Linear layout), y = x · Wᵀ.
 *  - Activations are [n, dim] with n = batch × seq tokens, row b*T + t.
 *  - Q is [n, heads, head_dim]; K and V are [n, kv_heads, head_dim].
 *  - Every backward ACCUMULATES (+=) into its input gradients and parameter gradients, so that
 *    a slot read by two stages (a residual) and a weight used by several micro-batches sum
 *    their gradients without extra code. A NULL input-gradient pointer means "not needed".
 *  - Parameters, gradients and optimizer state are fp32 on every backend.
 */
#ifndef QWEN3_OPS_H
#define QWEN3_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {   /* the CUDA backend's .cu files define the table */
#endif

/* Attention shape. Queries are the last tq of tk key positions of each sequence (tq == tk in
 * training; tq < tk when decoding against a KV cache). Keys/values of sequence b start at row
 * b * k_stride (k_stride >= tk; a KV cache is allocated for its maximum length). */
struct attn_shape {
  int batch, tq, tk, k_stride;
  int heads, kv_heads, head_dim;
};

struct backend {
  const char *name;
  /* 1: buffers from alloc live on a device, and the host must go through to_host/to_device
   * (and comm's tensor calls stage through them); 0: they are plain host memory. */
  int device_memory;

  /* Binds this process to its share of the machine, local_rank of local_size processes on it:
   * CPU threads, or the GPU to use. Call once before any other op. */
  void (*init)(int local_rank, int local_size);

  /* memory: alloc returns zeroed memory or NULL */
  void *(*alloc)(size_t bytes);
  void (*free)(void *p);
  void (*to_device)(void *dst, const void *host_src, size_t bytes);
  void (*to_host)(void *host_dst, const void *src, size_t bytes);
  void (*copy)(void *dst, const void *src, size_t bytes);
  void (*zero)(void *p, size_t bytes);
  void (*synchronize)(void);
  /* Bytes held now and at most so far (NULL where the backend does not count them). */
  void (*memory)(size_t *in_use, size_t *peak);

  /* out[i,:] = table[tokens[i],:] */
  void (*embedding_forward)(float *out, const int32_t *tokens, const float *table, int n, int dim);
  /* dtable[tokens[i],:] += dout[i,:] */
  void (*embedding_backward)(float *dtable, const float *dout, const int32_t *tokens, int n,
                             int dim);

  /* out = x * rsqrt(mean(x²) + eps) * w, per row of dim (HF Qwen3RMSNorm) */
  void (*rmsnorm_forward)(float *out, const float *x, const float *w, int n, int dim, float eps);
  void (*rmsnorm_backward)(float *dx, float *dw, const float *dout, const float *x,
                           const float *w, int n, int dim, float eps);

  /* Per head of head_dim: RMSNorm with weight w (shared by all heads), then rotate-half RoPE at
   * positions[i] with inv_freq[j] = theta^(-2j/head_dim). x and out are [n, heads, head_dim]. */
  void (*qk_norm_rope_forward)(float *out, const float *x, const float *w,
                               const int32_t *positions, int n, int heads, int head_dim,
                               float eps, double theta);
  void (*qk_norm_rope_backward)(float *dx, float *dw, const float *dout, const float *x,
                                const float *w, const int32_t *positions, int n, int heads,
                                int head_dim, float eps, double theta);

  /* Causal grouped-query attention, scale head_dim^-0.5, softmax in fp32. ctx is
   * [batch*tq, heads, head_dim]; lse [batch, heads, tq] receives each row's log-sum-exp, which
   * the backward uses to rebuild the probabilities without storing them. */
  void (*attention_forward)(float *ctx, float *lse, const float *q, const float *k,
                            const float *v, const struct attn_shape *s);
  void (*attention_backward)(float *dq, float *dk, float *dv, const float *dctx,
                             const float *q, const float *k, const float *v, const float *ctx,
                             const float *lse, const struct attn_shape *s);

  /* out = silu(g) * u, elementwise over n values */
  void (*swiglu_forward)(float *out, const float *g, const float *u, size_t n);
  void (*swiglu_backward)(float *dg, float *du, const float *dout, const float *g,
                          const float *u, size_t n);

  /* out[n, out_dim] = x[n, in_dim] · w[out_dim, in_dim]ᵀ */
  void (*linear_forward)(float *out, const float *x, const float *w, int n, int in_dim,
                         int out_dim);
  /* dx += dout · w ; dw += doutᵀ · x   (dx or dw may be NULL) */
  void (*linear_backward)(float *dx, float *dw, const float *dout, const float *x,
                          const float *w, int n, int in_dim, int out_dim);

  /* a[i] += b[i] */
  void (*add_inplace)(float *a, const float *b, size_t n);
  /* a[i] *= s */
  void (*scale)(float *a, float s, size_t n);

  /* The LM head and cross-entropy, fused and chunked so the [n, vocab] logits never exist
   * whole. For each row i with targets[i] >= 0: nll[i] = logsumexp(logits_i) - logits_i[t].
   * Rows with targets[i] < 0 get nll[i] = 0 and no gradient. When dx != NULL, accumulates
   * dx += grad_scale * dlogits · w and dw += grad_scale * dlogitsᵀ · x, where
   * dlogits = softmax(logits) - onehot(target). x is [n, dim], w is [vocab, dim]. nll is a
   * host array of n floats. */
  void (*lm_head_loss)(float *nll, float *dx, float *dw, const float *x, const float *w,
                       const int32_t *targets, int n, int dim, int vocab, float grad_scale);

  /* Sum of squares of n values, accumulated in double, returned to the host. */
  double (*sum_squares)(const float *x, size_t n);

  /* out [cols, rows] = xᵀ for x [rows, cols] */
  void (*transpose)(float *out, const float *x, int rows, int cols);

  /* NVFP4 emulation (kernels/nvfp4.h has the numerics): quantizes x [rows, cols] along its rows
   * (1x16 blocks) or in 16x16 tiles, round-to-nearest or stochastic (seeded), and writes
   * xq = q * s_b, exact in bf16. Returns S_dec, the factor a GEMM's alpha takes; NaN when x holds
   * a non-finite value (nothing written). xq may alias x. */
  float (*nvfp4_quantize_dequantize)(float *xq, const float *x, int rows, int cols,
                                     int tiles_16x16, int stochastic, uint64_t seed);
  /* Random Hadamard transform of every 16-wide tile of every row; out may alias x. */
  void (*nvfp4_rht)(float *out, const float *x, int rows, int cols, uint16_t signs);
  /* c [m, n] = s_dec_a * s_dec_b * a [m, k] · b [n, k]ᵀ + beta * c, fp32 accumulation: the
   * NVFP4 GEMM (TN) on q * s_b operands. */
  void (*nvfp4_gemm)(float *c, const float *a, float s_dec_a, const float *b, float s_dec_b,
                     int m, int n, int k, float beta);

  /* AdamW with decoupled weight decay (torch.optim.AdamW), step t counted from 1:
   *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
   *   p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p)                            */
  void (*adamw_update)(float *p, const float *g, float *m, float *v, size_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int t);

  /* The stream every op runs on (a cudaStream_t), for comm's NCCL transport to order its own
   * stream against; NULL where the backend has none (the CPU). */
  void *(*native_stream)(void);
};

extern const struct backend backend_cpu;
#ifdef QWEN3_HAVE_CUDA
/* kernels/cuda: fp32 storage; GEMMs in TF32 unless QWEN3_CUDA_TF32=0 (the exact fp32 mode the
 * tests compare with the CPU); QWEN3_CUDA_DEBUG=1 checks every launch synchronously. */
extern const struct backend backend_cuda;
#endif

#ifdef __cplusplus
}
#endif

#endif
