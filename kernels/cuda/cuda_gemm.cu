/* cuda_gemm: the CUDA backend's one dense GEMM, row-major through cuBLASLt (declared and
 * documented in kernels/cuda/cuda.h), and cuda_gemm_scaled, the same GEMM scaled by two factors
 * in device memory. The matmul descriptor, the three matrix layouts and the algorithm
 * cublasLtMatmulAlgoGetHeuristic picks are built once per shape and types and kept in a small
 * static table, so a run repeats bit for bit and no call creates descriptors after the
 * first of its shape.
 *
 * Types. A and B share one dtype (cuBLASLt has no fp32 x bf16 product). fp32 A/B give fp32 C,
 * computed in CUBLAS_COMPUTE_32F, or CUBLAS_COMPUTE_32F_FAST_TF32 when cuda_ctx.tf32; bf16 A/B
 * give bf16 or fp32 C, computed in CUBLAS_COMPUTE_32F (fp32 accumulation; a bf16 C is rounded
 * once, from the fp32 result, and beta * C is added in fp32 before that rounding). alpha and
 * beta are fp32 host values (cuda_gemm); cuda_gemm_scaled multiplies the product by two scale
 * factors in device memory that cuBLASLt reads when the GEMM runs (its device pointer mode), so a
 * scale the GPU computed reaches the GEMM without a host synchronization.
 *
 * Row-major <-> column-major mapping. cuBLASLt is column-major; a row-major matrix X [r, c] with
 * leading dimension ld is, byte for byte, the column-major matrix Xᵀ [c, r] with the same ld.
 * So the row-major product
 *        C [m,n] = op(A) [m,k] · op(B) [k,n]
 * is computed as the column-major product
 *        Cᵀ [n,m] = op(B)ᵀ [n,k] · op(A)ᵀ [k,m]
 * i.e. cuBLASLt's first operand ("A" to cuBLASLt) is our b, its second ("B") is our a, and the
 * transpose flags carry over unchanged:
 *   our b, !trans_b: memory is row-major [k,n] ld ldb = col-major [n,k] ld ldb = op(B)ᵀ
 *                    -> Lt A: layout rows n, cols k, ld ldb, TRANSA = N
 *   our b,  trans_b: memory is row-major [n,k] ld ldb = col-major [k,n] ld ldb; op(B)ᵀ is its
 *                    transpose -> Lt A: layout rows k, cols n, ld ldb, TRANSA = T
 *   our a, !trans_a: memory is row-major [m,k] ld lda = col-major [k,m] ld lda = op(A)ᵀ
 *                    -> Lt B: layout rows k, cols m, ld lda, TRANSB = N
 *   our a,  trans_a: memory is row-major [k,m] ld lda = col-major [m,k] ld lda
 *                    -> Lt B: layout rows m, cols k, ld lda, TRANSB = T
 *   our c:           row-major [m,n] ld ldc = col-major [n,m] ld ldc -> Lt C = Lt D: rows n,
 *                    cols m, ld ldc
 * and the Lt problem is M = n, N = m, K = k.
 *
 * Cache. Key: (trans_a, trans_b, m, n, k, lda, ldb, ldc, beta == 0 (host beta only),
 * dtypes of a/b and of c, tf32 (fp32 operands only), where the scalars live, alignment of a,
 * b and c). The alignment (largest power of two <= 256 dividing the address) is part of the
 * key because cuBLASLt's heuristic assumes 256-byte-aligned buffers unless told otherwise; we
 * tell it the actual alignment, so an algorithm is never reused on a pointer it cannot handle.
 * The table holds CACHE_SIZE entries searched linearly (the last hit is tried first); when
 * full, the oldest entry is evicted (round robin). Eviction does not break reproducibility: the
 * heuristic is deterministic, so a re-created entry gets the same algorithm. The table is not
 * locked: ops run from one host thread per process. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"

#define CACHE_SIZE 256

struct gemm_key {
  int trans_a, trans_b;
  int m, n, k;
  int lda, ldb, ldc;
  int beta_zero;
  int ab, c_type; /* enum dtype values */
  int tf32;
  int device_scalars; /* 1: alpha and beta in device memory (CUBLASLT_POINTER_MODE_DEVICE) */
  int align_a, align_b, align_c;
};

struct gemm_entry {
  int used;
  struct gemm_key key;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t lt_a, lt_b, lt_c; /* cuBLASLt's A (our b), B (our a), C = D (our c) */
  cublasLtMatmulAlgo_t algo;
};

static struct gemm_entry g_cache[CACHE_SIZE];
static int g_last = -1; /* index of the last hit */
static int g_next = 0;  /* next slot to fill or evict */

static int ptr_align(const void *p) {
  uintptr_t a = (uintptr_t)p;
  int al = 256;
  while (al > 1 && (a & (uintptr_t)(al - 1))) al >>= 1;
  return al;
}

static cudaDataType_t lt_type(int t) { return t == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F; }
static const char *dtype_name(int t) { return t == DT_BF16 ? "bf16" : "fp32"; }

static int key_equal(const struct gemm_key *x, const struct gemm_key *y) {
  return memcmp(x, y, sizeof *x) == 0;
}

static void entry_destroy(struct gemm_entry *e) {
  if (!e->used) return;
  CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_a));
  CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_b));
  CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_c));
  CUBLAS_CHECK(cublasLtMatmulDescDestroy(e->desc));
  e->used = 0;
}

static void entry_build(struct gemm_entry *e, const struct gemm_key *key) {
  memset(e, 0, sizeof *e);
  e->key = *key;
  /* key->tf32 is 0 for bf16 operands, which need plain CUBLAS_COMPUTE_32F */
  cublasComputeType_t compute = key->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&e->desc, compute, CUDA_R_32F));
  /* Lt A is our b, Lt B is our a (see the mapping at the top) */
  cublasOperation_t op_lt_a = key->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_lt_b = key->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasLtPointerMode_t pm =
      key->device_scalars ? CUBLASLT_POINTER_MODE_DEVICE : CUBLASLT_POINTER_MODE_HOST;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_lt_a,
                                              sizeof op_lt_a));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_lt_b,
                                              sizeof op_lt_b));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof pm));
  /* layouts describe the matrices as stored (before the transpose op) */
  uint64_t a_rows = key->trans_b ? (uint64_t)key->k : (uint64_t)key->n;
  uint64_t a_cols = key->trans_b ? (uint64_t)key->n : (uint64_t)key->k;
  uint64_t b_rows = key->trans_a ? (uint64_t)key->m : (uint64_t)key->k;
  uint64_t b_cols = key->trans_a ? (uint64_t)key->k : (uint64_t)key->m;
  cudaDataType_t ab = lt_type(key->ab), c = lt_type(key->c_type);
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&e->lt_a, ab, a_rows, a_cols, key->ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&e->lt_b, ab, b_rows, b_cols, key->lda));
  CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&e->lt_c, c, (uint64_t)key->n, (uint64_t)key->m, key->ldc));

  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = (uint64_t)cuda_ctx.lt_workspace_bytes;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws, sizeof ws));
  uint32_t al_lt_a = (uint32_t)key->align_b, al_lt_b = (uint32_t)key->align_a,
           al_c = (uint32_t)key->align_c;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_lt_a, sizeof al_lt_a));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_lt_b, sizeof al_lt_b));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c));

  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  memset(&result, 0, sizeof result);
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(cuda_ctx.lt, e->desc, e->lt_a, e->lt_b,
                                                     e->lt_c, e->lt_c, pref, 1, &result, &found);
  CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  e->used = 1;
  if (st != CUBLAS_STATUS_SUCCESS || found < 1 || result.state != CUBLAS_STATUS_SUCCESS) {
    char detail[352];
    snprintf(detail, sizeof detail,
             "no cuBLASLt algorithm (%s) for trans_a %d trans_b %d m %d n %d k %d lda %d ldb %d "
             "ldc %d a/b %s c %s tf32 %d device scalars %d align a/b/c %d/%d/%d workspace %zu",
             st != CUBLAS_STATUS_SUCCESS ? cublasGetStatusString(st) : "none found", key->trans_a,
             key->trans_b, key->m, key->n, key->k, key->lda, key->ldb, key->ldc,
             dtype_name(key->ab), dtype_name(key->c_type), key->tf32, key->device_scalars,
             key->align_a, key->align_b, key->align_c, cuda_ctx.lt_workspace_bytes);
    cuda_fail("cublasLtMatmulAlgoGetHeuristic", detail, __FILE__, __LINE__);
  }
  e->algo = result.algo;
}

static struct gemm_entry *cache_get(const struct gemm_key *key) {
  if (g_last >= 0 && g_cache[g_last].used && key_equal(&g_cache[g_last].key, key))
    return &g_cache[g_last];
  for (int i = 0; i < CACHE_SIZE; i++)
    if (g_cache[i].used && key_equal(&g_cache[i].key, key)) {
      g_last = i;
      return &g_cache[i];
    }
  int slot = g_next;
  g_next = (g_next + 1) % CACHE_SIZE;
  entry_destroy(&g_cache[slot]);
  entry_build(&g_cache[slot], key);
  g_last = slot;
  return &g_cache[slot];
}

/* C = beta * C over a row-major [m, n] block with leading dimension ldc (the k == 0 case), C
 * stored as T, beta the host's or, when beta_dev is not NULL, *beta_dev; beta == 0 writes exact
 * zeros, whatever C held. */
template <typename T>
static __global__ void gemm_scale_c_kernel(T *c, int m, int n, int ldc, float beta_host,
                                           const float *beta_dev) {
  const float beta = beta_dev ? *beta_dev : beta_host;
  size_t total = (size_t)m * (size_t)n;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t r = i / (size_t)n, col = i % (size_t)n;
    T *p = c + r * (size_t)ldc + col;
    store_f(p, beta == 0.0f ? 0.0f : beta * load_f(p));
  }
}

/* The body of both entry points: alpha and beta are the host's, or, when dev is not NULL,
 * dev[0] and dev[1] in device memory (alpha and beta are then unused). */
static void gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, float beta,
                 const float *dev, const void *a, int lda, const void *b, int ldb, void *c,
                 int ldc, enum dtype ab, enum dtype c_type) {
  if (ab == DT_F32 && c_type != DT_F32) { /* the one pair of enum dtype values not supported */
    char detail[160];
    snprintf(detail, sizeof detail, "a/b %s with c %s is not supported (m %d n %d k %d)",
             dtype_name(ab), dtype_name(c_type), m, n, k);
    cuda_fail("cuda_gemm", detail, __FILE__, __LINE__);
  }
  if (m < 0 || n < 0 || k < 0) {
    char detail[128];
    snprintf(detail, sizeof detail, "negative size m %d n %d k %d", m, n, k);
    cuda_fail("cuda_gemm", detail, __FILE__, __LINE__);
  }
  if (m == 0 || n == 0) return;
  if (ldc < n || lda < (trans_a ? m : k) || ldb < (trans_b ? k : n) || lda < 1 || ldb < 1) {
    char detail[200];
    snprintf(detail, sizeof detail,
             "bad leading dimension: trans_a %d trans_b %d m %d n %d k %d lda %d ldb %d ldc %d",
             trans_a, trans_b, m, n, k, lda, ldb, ldc);
    cuda_fail("cuda_gemm", detail, __FILE__, __LINE__);
  }
  if (k == 0) {
    if (!dev && beta == 1.0f) return;
    int blocks = cuda_blocks((size_t)m * (size_t)n);
    const float *beta_dev = dev ? dev + 1 : NULL;
    if (c_type == DT_BF16)
      gemm_scale_c_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>((bf16 *)c, m, n, ldc,
                                                                         beta, beta_dev);
    else
      gemm_scale_c_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>((float *)c, m, n, ldc,
                                                                         beta, beta_dev);
    CUDA_LAUNCHED("gemm_scale_c_kernel");
    return;
  }
  struct gemm_key key;
  memset(&key, 0, sizeof key); /* the key is compared with memcmp */
  key.trans_a = trans_a ? 1 : 0;
  key.trans_b = trans_b ? 1 : 0;
  key.m = m;
  key.n = n;
  key.k = k;
  key.lda = lda;
  key.ldb = ldb;
  key.ldc = ldc;
  key.beta_zero = !dev && beta == 0.0f; /* a device beta is not known here */
  key.ab = (int)ab;
  key.c_type = (int)c_type;
  key.tf32 = ab == DT_F32 && cuda_ctx.tf32; /* TF32 concerns fp32 operands alone */
  key.device_scalars = dev != NULL;
  key.align_a = ptr_align(a);
  key.align_b = ptr_align(b);
  key.align_c = ptr_align(c);
  struct gemm_entry *e = cache_get(&key);
  /* Lt A = our b, Lt B = our a, Lt C = Lt D = our c */
  const void *alpha_p = dev ? (const void *)dev : &alpha;
  const void *beta_p = dev ? (const void *)(dev + 1) : &beta;
  CUBLAS_CHECK(cublasLtMatmul(cuda_ctx.lt, e->desc, alpha_p, b, e->lt_a, a, e->lt_b, beta_p, c,
                              e->lt_c, c, e->lt_c, &e->algo, cuda_ctx.lt_workspace,
                              cuda_ctx.lt_workspace_bytes, cuda_ctx.stream));
}

extern "C" void cuda_gemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const void *a, int lda, const void *b, int ldb, float beta, void *c,
                          int ldc, enum dtype ab, enum dtype c_type) {
  gemm(trans_a, trans_b, m, n, k, alpha, beta, NULL, a, lda, b, ldb, c, ldc, ab, c_type);
}

/* alpha = *scale_a * *scale_b (one rounding, as the CPU's product of the two) and beta */
static __global__ void gemm_scalars_kernel(float *scalars, const float *scale_a,
                                           const float *scale_b, float beta) {
  scalars[0] = __fmul_rn(*scale_a, *scale_b);
  scalars[1] = beta;
}

extern "C" const float *cuda_gemm_device_scalars(const float *scale_a, const float *scale_b,
                                                 float beta) {
  float *scalars = (float *)cuda_scratch(2 * sizeof(float), "gemm alpha and beta");
  gemm_scalars_kernel<<<1, 1, 0, cuda_ctx.stream>>>(scalars, scale_a, scale_b, beta);
  CUDA_LAUNCHED("gemm_scalars_kernel");
  return scalars;
}

extern "C" void cuda_gemm_scaled(int trans_a, int trans_b, int m, int n, int k,
                                 const float *scale_a, const float *scale_b, const void *a,
                                 int lda, const void *b, int ldb, float beta, void *c, int ldc,
                                 enum dtype ab, enum dtype c_type) {
  gemm(trans_a, trans_b, m, n, k, 0.0f, 0.0f, cuda_gemm_device_scalars(scale_a, scale_b, beta),
       a, lda, b, ldb, c, ldc, ab, c_type);
}
