/* Internal declarations of the CUDA backend: the per-process execution context, the check
 * macros, and one group of ops per cuda_*.cu file. cuda_backend.cu gathers the ops into
 * backend_cuda. Every op has exactly the signature of its field in struct backend
 * (kernels/ops.h), which documents what it computes; pointers are device memory except where
 * ops.h says "host".
 *
 * Rules every kernel file follows:
 *  - all work goes on cuda_ctx.stream; no compute op synchronizes with the host (results such
 *    as the NVFP4 scales stay in device memory; the first nvfp4_quantize alone waits once, for
 *    its check that the device keeps denormals);
 *  - no cudaMalloc inside an op: temporary memory comes from cuda_scratch();
 *  - deterministic: no floating-point atomics whose order varies; reductions over rows go
 *    through per-block partials summed in a fixed order;
 *  - activations (every `void *` of ops.h) are stored as cuda_ctx.act: bf16 in the default
 *    mode, fp32 in the tf32 and fp32 modes; kernels are templates over that storage type
 *    (cuda_dtype.cuh) and compute in fp32. GEMMs on fp32 operands use TF32 only when
 *    cuda_ctx.tf32 is set, so the fp32 mode matches the CPU backend to rounding. */
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
  cudaStream_t stream;         /* the stream ops run on: main_stream, or side_stream */
  cudaStream_t main_stream, side_stream;   /* side: the optimizer's, overlapping the next step */
  cudaEvent_t side_tail;       /* recorded when the side stream's work was last handed back */
  int side_busy;               /* side_tail marks work that to_host/synchronize must wait for */
  cudaEvent_t *marks;          /* ops.h mark/wait_mark; created when first recorded */
  cublasLtHandle_t lt;
  void *lt_workspace;          /* cuBLASLt's workspace */
  size_t lt_workspace_bytes;
  char *scratch;               /* the arena ops take temporary memory from */
  char *side_scratch;          /* the side stream's (cuda_scratch) */
  size_t scratch_bytes;
  enum dtype act;              /* storage of activations: DT_BF16 (mode bf16) or DT_F32 */
  int tf32;                    /* 1: GEMMs on fp32 operands may use TF32 (modes bf16, tf32) */
  int debug;                   /* 1: synchronize and check after every launch */
  int capturing;               /* between capture_begin and capture_end: ops are recorded */
  int pdl;                     /* 1: cuda_launch_pdl lets a kernel start before the last ends */
  int wgmma;                   /* 1: attention on Hopper's wgmma kernels (cuda_attention_wgmma.cu) */
  int gemm_tune;               /* 1: a GEMM shape's first call times cuBLASLt's candidates
                                  (on unless QWEN3_CUDA_GEMM_TUNE=0) */
  double *host_result;         /* pinned host memory for the results returned to the host */
};
extern struct cuda_context cuda_ctx;

/* A temporary buffer of at least `bytes` from the current stream's arena (the side stream has
 * a small one of its own), 256-byte aligned. It is valid until the calling op returns (a
 * stream's ops never overlap: they run in order). Dies naming `what` when the arena is too
 * small (the main arena's size is QWEN3_CUDA_SCRATCH_MB). */
void *cuda_scratch(size_t bytes, const char *what);
/* The same arena cut in two: the second buffer follows the first. */
void cuda_scratch2(void **a, size_t a_bytes, void **b, size_t b_bytes, const char *what);
/* For an op that calls another while its own temporaries live in the arena: `bytes` of the
 * arena past `in_use_end` (the end of what the caller still needs there; a pointer outside the
 * arena means none of it is in use), 256-byte aligned; NULL when they do not fit. */
void *cuda_scratch_after(const void *in_use_end, size_t bytes);

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

/* ---- cuda_gemm.cu: row-major C[m,n] = alpha * op(A) · op(B) + beta * C with fp32
 * accumulation. A and B are of dtype ab, C of dtype c (ab fp32: c fp32, TF32 inputs when
 * cuda_ctx.tf32; ab bf16: c bf16 or fp32). op(A) is [m,k]: A is [m,k] with leading dimension
 * lda when !trans_a, [k,m] when trans_a; likewise op(B) is [k,n] from B [k,n] or, when trans_b,
 * B [n,k]. The algorithm is chosen once per shape and types (the fastest of cuBLASLt's
 * candidates that give its first one's bits, or with QWEN3_CUDA_GEMM_TUNE=0 the first;
 * cuda_gemm.cu) and cached, so a run repeats bit for bit. */
void cuda_gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const void *a,
               int lda, const void *b, int ldb, float beta, void *c, int ldc, enum dtype ab,
               enum dtype c_type);
/* What the GEMM shapes' first calls chose so far: shapes tuned, shapes that kept another
 * candidate than the heuristic's first, candidates left out because their bits differed from
 * the first's (what a test and a benchmark report). cuda_gemm_forget empties the cache of
 * chosen algorithms (a test compares the choices with QWEN3_CUDA_GEMM_TUNE on and off). */
struct cuda_gemm_tuning {
  long shapes, switched, other_bits;
};
struct cuda_gemm_tuning cuda_gemm_tuning(void);
void cuda_gemm_forget(void);
/* The same GEMM with alpha = *scale_a * *scale_b, two floats of device memory read when it
 * runs (cuBLASLt's device pointer mode, the product formed by a one-thread kernel), so scales
 * computed on the GPU reach it without a host synchronization. On the H200 a bf16 x bf16 ->
 * fp32, beta 1 GEMM (NVFP4's Wgrad) runs 1.3x slower in this mode than with host scalars on
 * the heuristic's first algorithm, 1.05x on the one the tuning keeps (bench/NOTES.md). */
/* {*scale_a * *scale_b, beta} in the scratch arena, written on the stream: the alpha and beta
 * of a GEMM in cuBLASLt's device pointer mode. */
const float *cuda_gemm_device_scalars(const float *scale_a, const float *scale_b, float beta);
void cuda_gemm_scaled(int trans_a, int trans_b, int m, int n, int k, const float *scale_a,
                      const float *scale_b, const void *a, int lda, const void *b, int ldb,
                      float beta, void *c, int ldc, enum dtype ab, enum dtype c_type);

/* ---- cuda_elementwise.cu */
void cuda_convert(void *dst, enum dtype dst_type, const void *src, enum dtype src_type,
                  size_t n);
void cuda_embedding_forward(void *out, const int32_t *tokens, const void *table, int n, int dim);
void cuda_embedding_backward(float *dtable, const void *dout, const int32_t *tokens, int n,
                             int dim);
void cuda_swiglu_forward(void *out, const void *g, const void *u, size_t n);
void cuda_swiglu_backward(void *dg, void *du, const void *dout, const void *g, const void *u,
                          size_t n, int acc);
void cuda_add(void *out, const void *a, const void *b, size_t n, enum dtype t);
void cuda_kv_append(void *k_cache, void *v_cache, const void *k, const void *v,
                    const int32_t *positions, int n, int width, int seq_rows);
void cuda_scale(float *a, float s, size_t n);
void cuda_sum_into(double *acc, const float *x, size_t n, int squares);

/* ---- cuda_argmax.cu */
void cuda_argmax_rows(int32_t *dst, const float *x, int rows, int n);

/* ---- cuda_norm.cu */
void cuda_rmsnorm_forward(void *out, const void *x, const float *w, int n, int dim, float eps);
void cuda_rmsnorm_backward(void *dx, float *dw, const void *dout, const void *x, const float *w,
                           int n, int dim, float eps, int acc);
void cuda_qk_norm_rope_forward(void *const *out, const void *const *x, const float *const *w,
                               const int *heads, int count, const int32_t *positions, int n,
                               int head_dim, float eps, double theta);
void cuda_qk_norm_rope_backward(void *dx, float *dw, const void *dout, const void *x,
                                const float *w, const int32_t *positions, int n, int heads,
                                int head_dim, float eps, double theta, int acc);

/* ---- cuda_attention.cu: the dispatcher, and the fp32-arithmetic flash kernels that take any
 * shape (decode's tq = 1 included) and either storage type */
void cuda_attention_forward(void *ctx, float *lse, const void *q, const void *k, const void *v,
                            const struct attn_shape *s);
void cuda_attention_backward(void *dq, void *dk, void *dv, const void *dctx, const void *q,
                             const void *k, const void *v, const void *ctx, const float *lse,
                             const struct attn_shape *s, int acc);

/* ---- cuda_attention_bf16.cu: the bf16 tensor-core attention (mma.sync m16n8k16, fp32
 * accumulation; on an H100/H200, Hopper's wgmma kernels of cuda_attention_wgmma.cu first, where
 * they take the shape and cuda_ctx.wgmma) used in the bf16 mode; tensors are __nv_bfloat16, lse and D fp32. Same
 * semantics as cuda_attention_forward/backward; return 1 when they did the work, 0 (nothing
 * launched) for a shape or GPU they do not handle (the caller then runs the generic kernels).
 * The backward takes D [batch, heads, tq] = rowsum(dctx * ctx) in fp32, computed once by the
 * dispatcher for whichever path runs; D may sit in the scratch arena, so the backward takes
 * its own temporaries past it (cuda_scratch_after). */
int cuda_attention_bf16_forward(void *ctx, float *lse, const void *q, const void *k,
                                const void *v, const struct attn_shape *s);
int cuda_attention_bf16_backward(void *dq, void *dk, void *dv, const void *dctx, const void *q,
                                 const void *k, const void *v, const float *lse, const float *D,
                                 const struct attn_shape *s, int acc);

/* ---- cuda_linear.cu */
void cuda_linear_forward(void *const *outs, const void *x, const void *const *ws,
                         const int *out_dims, int count, int n, int in_dim);
void cuda_linear_backward(void *dx, float *dw, const void *dout, const void *x, const void *w,
                          int n, int in_dim, int out_dim, int acc);
void cuda_lm_head_loss(float *nll, void *dx, float *dw, const void *x, const void *w,
                       const int32_t *targets, int n, int dim, int vocab, float grad_scale);
void cuda_nvfp4_gemv_packed(void *const *outs, const void *xq, const float *dec_x,
                            const uint8_t *const *codes, const uint8_t *const *scales,
                            const float *const *dec_w, const int *out_dims, int count, int n,
                            int in_dim);

/* ---- cuda_adamw.cu */
void cuda_adamw_update(float *p, void *p_act, const float *g, float *m, float *v, size_t n,
                       const struct adamw_step *s, uint32_t *amax_parts);

/* ---- cuda_nvfp4.cu: x of dtype x_type (fp32 or bf16), xq of dtype cuda_ctx.act (NVFP4_ROWS_INT:
 * ops.h's integer operand); dec, dec_a and dec_b are device memory */
void cuda_nvfp4_quantize(void *xq, float *dec, const void *x, enum dtype x_type, int rows,
                         int cols, enum nvfp4_layout layout, int stochastic, uint64_t seed,
                         int rht_signs);
void cuda_nvfp4_quantize_weight(void *xq, float *dec, const float *w, int rows, int cols,
                                enum nvfp4_layout layout, const uint32_t *amax_parts,
                                size_t n_parts);
void cuda_nvfp4_quantize_rows_cols(void *rows_q, float *rows_dec, uint64_t rows_seed,
                                   void *cols_q, float *cols_dec, uint64_t cols_seed,
                                   const void *x, int rows, int cols, int stochastic,
                                   int rht_signs);
void cuda_nvfp4_gemm(void *c, enum dtype c_type, const void *a, const float *dec_a,
                     const void *b, const float *dec_b, int b_kn, int m, int n, int k,
                     float beta);
void cuda_nvfp4_pack(uint8_t *codes, uint8_t *scales, float *dec, const float *w, int rows,
                     int cols, enum nvfp4_layout layout);
/* cuda_nvfp4_quantize of an NVFP4_ROWS (or NVFP4_ROWS_INT) x of at most this many values
 * (rows * cols) is one kernel of one block, its own amax pass included (cuda_nvfp4.cu says why);
 * larger x take the amax and rows kernels. */
#define CUDA_NVFP4_SMALL_VALUES 65536

/* ---- cuda_fp4_gemm.cu: the native NVFP4 GEMM of Blackwell GPUs through cuBLASLt. Not used by
 * the trainer (which emulates NVFP4 on every GPU, cuda_nvfp4.cu); tested by
 * tests/gpu/test_fp4_native.c.
 *
 * 1 when this process's current GPU has compute capability 10.x or 12.x and cuBLASLt finds an
 * algorithm for a small FP4 GEMM; else 0 (no driver, no GPU, Hopper, ...). Never fails; needs
 * no backend init; the answer is computed once. */
int cuda_fp4_native_available(void);
/* Bytes of the swizzled block scales of an operand with `rows` rows (the non-K dimension) and k
 * columns (K, a multiple of 16): roundup(rows, 128) * roundup(k / 16, 4). */
size_t cuda_fp4_swizzled_scale_bytes(int rows, int k);
/* dst (cuda_fp4_swizzled_scale_bytes(rows, k) bytes) = the row-major E4M3 scales src
 * [rows, k/16] (NVFP4_BLOCK_1X16, as nvfp4_quantize writes them) in the 128x4-tile layout
 * cuBLASLt reads for CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3 (the formula is at the top of
 * cuda_fp4_gemm.cu), padding as zero scales. Device memory; dst and src must not overlap. */
void cuda_fp4_swizzle_scales(uint8_t *dst, const uint8_t *src, int rows, int k);
/* c [m, n] = alpha * dequant(a) · dequant(b)ᵀ + beta * c, c row-major of dtype c_type (bf16
 * or fp32), alpha = *dec_a * *dec_b (device memory, multiplied on the device; cuBLASLt's device
 * pointer mode), fp32 accumulation on the FP4 tensor cores. a [m, k] and b [n, k] are
 * row-major packed E2M1 codes (k/2 bytes a row, element 2i in the low nibble), both K-contiguous
 * as cuBLASLt's FP4 GEMM requires ("TN"); a_scales and b_scales their E4M3 1x16 block scales
 * already swizzled by cuda_fp4_swizzle_scales. So with the tensor scales' S_dec it computes,
 * up to the order of the fp32 additions, what nvfp4_gemm computes on the host from
 * nvfp4_dequantize's q * s_b.
 * Returns 1 when it ran (queued on cuda_ctx.stream), 0 when cuBLASLt has no algorithm for this
 * shape, dtype and these alignments (nothing launched: e.g. a GPU without FP4, or k not a
 * multiple of 32); dies on m, n or k <= 0 or k not a multiple of 16. beta == 0 does not read c. */
int cuda_fp4_gemm(void *c, enum dtype c_type, const uint8_t *a, const uint8_t *a_scales,
                  const float *dec_a, const uint8_t *b, const uint8_t *b_scales,
                  const float *dec_b, int m, int n, int k, float beta);

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

/* Programmatic dependent launch (Hopper on). Decoding one token is a chain of ~500 small
 * kernels, each a few microseconds; launched through cuda_launch_pdl, a kernel's blocks are
 * scheduled while the kernel before it on the stream is still running (once every block of that
 * one has called pdl_release) and wait in pdl_wait until it has finished and its writes are
 * visible, so the gap between kernels shrinks and a GEMV can load its weights (which nothing in
 * the chain writes) before it waits. The rule for a kernel launched so: pdl_wait() comes first,
 * before every read or write of memory that another op writes or reads, and before any thread
 * returns; pdl_release() after it. The one exception, loads issued before the wait: memory the
 * kernel just before it on the stream does not write (every kernel here waits before it
 * releases, so when this one starts, all the kernels before that one have finished). Weights
 * qualify: only AdamW writes them, at the end of a step, never right before a kernel that reads
 * them early (a GEMV; the q/k-norm + RoPE, after the q|k|v projection). Kernels launched with
 * <<< >>> wait for the whole kernel before them as usual; in both launches these instructions
 * cost nothing. QWEN3_CUDA_PDL=0 turns it off (cuda_ctx.pdl), for measuring it. */
#ifdef __CUDACC__
static __device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
static __device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

template <typename... Params, typename... Args>
static inline void cuda_launch_pdl(const char *name, const char *file, int line,
                                   void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                   Args... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = cuda_ctx.pdl;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = cuda_ctx.stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (e != cudaSuccess) cuda_fail(name, cudaGetErrorString(e), file, line);
  cuda_check_launch(name, file, line);
}
/* CUDA_LAUNCH_PDL("name", kernel, grid, block, smem, args...): a kernel whose template
 * arguments hold commas goes in as a variable (auto *k = kernel<T, 4>;). */
#define CUDA_LAUNCH_PDL(name, kernel, grid, block, smem, ...) \
  cuda_launch_pdl(name, __FILE__, __LINE__, kernel, grid, block, smem, __VA_ARGS__)
#endif
#endif
