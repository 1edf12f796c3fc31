/* Internal declarations of the CUDA backend: the per-process execution context, the check
 * macros, and one group of ops per cuda_*.cu file. cuda_backend.cu gathers the ops into
 * backend_cuda. Every op has exactly the signature of its field in struct backend
 * (kernels/ops.h), which documents what it computes; pointers are device memory except where
 * ops.h says "host".
 *
 * Rules every kernel file follows:
 *  - all work goes on cuda_ctx.stream; nothing synchronizes except the ops whose result the
 *    interface returns to the host (sum_squares, nvfp4_quantize_dequantize, lm_head_loss's nll);
 *  - no cudaMalloc inside an op: temporary memory comes from cuda_scratch();
 *  - deterministic: no floating-point atomics whose order varies; reductions over rows go
 *    through per-block partials summed in a fixed order;
 *  - fp32 storage and fp32 arithmetic; GEMMs use TF32 only when cuda_ctx.tf32 is set, so the
 *    fp32 mode matches the CPU backend to rounding. */
#ifndef QWEN3_CUDA_H
#define QWEN3_CUDA_H

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Dies naming the file, line and call; g_abort_hook then ends every rank. */
void cuda_fail(const char *what, const char *detail, const char *file, int line);

#define CUDA_CHECK(call)                                                               \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) cuda_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(call)                                                              \
  do {                                                                                  \
    cublasStatus_t s_ = (call);                                                         \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                    \
      cuda_fail(#call, cublasGetStatusString(s_), __FILE__, __LINE__);                  \
  } while (0)

/* After every kernel launch. With QWEN3_CUDA_DEBUG=1 in the environment it also synchronizes,
 * so a faulting kernel is named at its own launch. */
void cuda_check_launch(const char *kernel, const char *file, int line);
#define CUDA_LAUNCHED(name) cuda_check_launch(name, __FILE__, __LINE__)

struct cuda_context {
  int device;
  int sm_count;
  cudaStream_t stream;
  cublasLtHandle_t lt;
  void *lt_workspace;          /* cuBLASLt's workspace */
  size_t lt_workspace_bytes;
  char *scratch;               /* the arena ops take temporary memory from */
  size_t scratch_bytes;
  int tf32;                    /* 1: GEMMs may use TF32 (QWEN3_CUDA_TF32=1); 0: exact fp32 */
  int debug;                   /* 1: synchronize and check after every launch */
  double *host_result;         /* pinned host memory for the results returned to the host */
};
extern struct cuda_context cuda_ctx;

/* A temporary buffer of at least `bytes` from the arena, 256-byte aligned. It is valid until
 * the calling op returns (ops never overlap: they run in order on one stream). Dies naming
 * `what` when the arena is too small (the arena's size is QWEN3_CUDA_SCRATCH_MB). */
void *cuda_scratch(size_t bytes, const char *what);
/* The same arena cut in two: the second buffer follows the first. */
void cuda_scratch2(void **a, size_t a_bytes, void **b, size_t b_bytes, const char *what);

/* Shared memory one block may opt in to on this process's GPU (read once). */
int cuda_smem_optin(void);

/* 16-byte aligned: the float4 paths of the kernels need it of every pointer they vectorize. */
static inline int cuda_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Threads per block and blocks for n elements of a grid-stride loop. */
#define CUDA_THREADS 256
static inline int cuda_blocks(size_t n) {
  size_t b = (n + CUDA_THREADS - 1) / CUDA_THREADS;
  return (int)(b < 1 ? 1 : b > 65535u * 16 ? 65535u * 16 : b);
}

/* ---- cuda_gemm.cu: row-major C[m,n] = alpha * op(A) · op(B) + beta * C, fp32 storage,
 * fp32 accumulation (TF32 inputs when cuda_ctx.tf32). op(A) is [m,k]: A is [m,k] with leading
 * dimension lda when !trans_a, [k,m] when trans_a; likewise op(B) is [k,n] from B [k,n] or, when
 * trans_b, B [n,k]. The algorithm is chosen once per shape and cached, so a run repeats bit for
 * bit. */
void cuda_gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
               int lda, const float *b, int ldb, float beta, float *c, int ldc);

/* ---- cuda_elementwise.cu */
void cuda_embedding_forward(float *out, const int32_t *tokens, const float *table, int n, int dim);
void cuda_embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int n,
                             int dim);
void cuda_swiglu_forward(float *out, const float *g, const float *u, size_t n);
void cuda_swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                          size_t n);
void cuda_add_inplace(float *a, const float *b, size_t n);
void cuda_scale(float *a, float s, size_t n);
double cuda_sum_squares(const float *x, size_t n);
void cuda_transpose(float *out, const float *x, int rows, int cols);

/* ---- cuda_norm.cu */
void cuda_rmsnorm_forward(float *out, const float *x, const float *w, int n, int dim, float eps);
void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x,
                           const float *w, int n, int dim, float eps);
void cuda_qk_norm_rope_forward(float *out, const float *x, const float *w,
                               const int32_t *positions, int n, int heads, int head_dim,
                               float eps, double theta);
void cuda_qk_norm_rope_backward(float *dx, float *dw, const float *dout, const float *x,
                                const float *w, const int32_t *positions, int n, int heads,
                                int head_dim, float eps, double theta);

/* ---- cuda_attention.cu */
void cuda_attention_forward(float *ctx, float *lse, const float *q, const float *k,
                            const float *v, const struct attn_shape *s);
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dctx, const float *q,
                             const float *k, const float *v, const float *ctx, const float *lse,
                             const struct attn_shape *s);

/* ---- cuda_attention_tc.cu: the TF32 tensor-core attention used when cuda_ctx.tf32 is set.
 * Same arguments and semantics as cuda_attention_forward/backward; return 1 when they did the
 * work, 0 (nothing launched) for a shape or GPU they do not handle (the caller then runs the
 * fp32 kernels): head_dim 64 or 128, tq >= 16, 16-byte aligned tensors, enough shared memory.
 * The backward takes D [batch, heads, tq] = rowsum(dctx * ctx), which the caller computes once
 * for whichever path runs (the fp32 kernels read the same D). */
int cuda_attention_tc_forward(float *ctx, float *lse, const float *q, const float *k,
                              const float *v, const struct attn_shape *s);
int cuda_attention_tc_backward(float *dq, float *dk, float *dv, const float *dctx,
                               const float *q, const float *k, const float *v, const float *lse,
                               const float *D, const struct attn_shape *s);

/* ---- cuda_linear.cu */
void cuda_linear_forward(float *out, const float *x, const float *w, int n, int in_dim,
                         int out_dim);
void cuda_linear_backward(float *dx, float *dw, const float *dout, const float *x,
                          const float *w, int n, int in_dim, int out_dim);
void cuda_lm_head_loss(float *nll, float *dx, float *dw, const float *x, const float *w,
                       const int32_t *targets, int n, int dim, int vocab, float grad_scale);

/* ---- cuda_adamw.cu */
void cuda_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int t);

/* ---- cuda_nvfp4.cu */
float cuda_nvfp4_quantize_dequantize(float *xq, const float *x, int rows, int cols,
                                     int tiles_16x16, int stochastic, uint64_t seed);
void cuda_nvfp4_rht(float *out, const float *x, int rows, int cols, uint16_t signs);
void cuda_nvfp4_gemm(float *c, const float *a, float s_dec_a, const float *b, float s_dec_b,
                     int m, int n, int k, float beta);

#ifdef __cplusplus
}

/* Raises a kernel's dynamic shared memory limit past the default 48 KB, once per kernel
 * (`done` is the kernel's own flag). */
template <typename K>
static inline void cuda_allow_smem(K kernel, size_t bytes, bool *done) {
  if (*done) return;
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)bytes));
  *done = true;
}
#endif
#endif
