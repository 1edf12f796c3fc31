/* cuda_gemm: the CUDA backend's one dense GEMM, row-major through cuBLASLt (declared and
 * documented in kernels/cuda/cuda.h), and cuda_gemm_scaled, the same GEMM scaled by two factors
 * in device memory. The matmul descriptor, the three matrix layouts and the algorithm are
 * chosen once per shape and types and kept in a small static table, so no call creates
 * descriptors after the first of its shape.
 *
 * Algorithm. cublasLtMatmulAlgoGetHeuristic's first pick is often not the fastest of its own
 * list: on the H200, NVFP4's Wgrad (bf16 -> fp32, beta 1, 9728 x 2560 x 2048, scalars in device
 * memory) took 218 us with its first and 152 us with its seventh, and a bf16 Fprop 140 against
 * 130 (bench/NOTES.md, session 14). So the first call of a shape times the heuristic's first
 * GEMM_CANDIDATES on operands of its own (random, the same size and types; the call's buffers
 * are never written) and keeps the fastest, but only among the candidates whose result equals
 * the first candidate's bit for bit there (a hash of D; split-K ones do not): the choice may
 * differ between processes, the bits may not, so a run still repeats bit for bit and a resumed
 * run or another pipeline layout still matches (tests/gpu/test_gpu_train.sh). Not with
 * QWEN3_CUDA_GEMM_TUNE=0, not while the stream is being recorded, and not when the operands
 * would need more than GEMM_TUNE_MAX_BYTES or cannot be allocated: the first candidate is kept
 * then.
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
#include "kernels/cuda/cuda_gemm_pick.h"

#define CACHE_SIZE 256
#define GEMM_CANDIDATES 8                        /* the heuristic's first ones, timed */
#define GEMM_TUNE_MAX_BYTES ((size_t)1 << 30)   /* the tuning operands' memory, at most */
#define GEMM_TUNE_RUNS 3                         /* timed calls of each candidate */

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
static struct cuda_gemm_tuning g_tuning;
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

/* ---- Tuning: which of the heuristic's candidates a shape keeps (the top of this file) */

/* x[i] = a value in [-1, 1) from a hash of i and seed */
template <typename T>
static __global__ void gemm_tune_fill_kernel(T *x, size_t n, uint32_t seed) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = ((uint32_t)i ^ (uint32_t)(i >> 32) * 0x27d4eb2fu) * 0x9e3779b1u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    store_f(&x[i], (float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f);
  }
}

/* *hash += the sum over d's m x n values (leading dimension ld) of a 64-bit mix of each value's
 * bits and index: a sum, so the order the threads add in does not matter */
template <typename T>
static __global__ void gemm_tune_hash_kernel(unsigned long long *hash, const T *d, int m, int n,
                                             int ld) {
  unsigned long long h = 0;
  const size_t total = (size_t)m * (size_t)n;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t bits = 0;
    memcpy(&bits, &d[i / (size_t)n * (size_t)ld + i % (size_t)n], sizeof(T));
    unsigned long long x = bits + i * 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    h += x ^ (x >> 31);
  }
  for (int off = 16; off > 0; off >>= 1) h += __shfl_down_sync(0xffffffffu, h, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(hash, h);
}

/* bytes of x, of dtype t, filled by gemm_tune_fill_kernel */
static void tune_fill(void *x, int t, size_t bytes, uint32_t seed) {
  const size_t n = bytes / dtype_bytes((enum dtype)t);
  const int blocks = cuda_blocks(n);
  if (t == DT_BF16)
    gemm_tune_fill_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>((bf16 *)x, n, seed);
  else
    gemm_tune_fill_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>((float *)x, n, seed);
  CUDA_LAUNCHED("gemm_tune_fill_kernel");
}

/* *hash += gemm_tune_hash_kernel's sum over the key's D */
static void tune_hash(unsigned long long *hash, const void *d, const struct gemm_key *key) {
  const int blocks = cuda_blocks((size_t)key->m * key->n);
  if (key->c_type == DT_BF16)
    gemm_tune_hash_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>(
        hash, (const bf16 *)d, key->m, key->n, key->ldc);
  else
    gemm_tune_hash_kernel<<<blocks, CUDA_THREADS, 0, cuda_ctx.stream>>>(
        hash, (const float *)d, key->m, key->n, key->ldc);
  CUDA_LAUNCHED("gemm_tune_hash_kernel");
}

static size_t round256(size_t bytes) { return (bytes + 255) / 256 * 256; }

/* The operands a candidate runs on: our a, our b, C (read when beta is not 0) and D, and the
 * hashes and device scalars, in one allocation; tune_alloc returns 0 when it is too large or
 * not available. */
struct tune_buffers {
  char *base;
  void *a, *b, *c, *d;
  unsigned long long *hash;   /* GEMM_CANDIDATES */
  float *scalars;             /* alpha 1, beta 1 for the device pointer mode */
};

static int tune_alloc(struct tune_buffers *t, const struct gemm_key *key) {
  const size_t ab = dtype_bytes((enum dtype)key->ab), cb = dtype_bytes((enum dtype)key->c_type);
  const size_t a_bytes = (size_t)(key->trans_a ? key->k : key->m) * (size_t)key->lda * ab;
  const size_t b_bytes = (size_t)(key->trans_b ? key->n : key->k) * (size_t)key->ldb * ab;
  const size_t c_bytes = (size_t)key->m * (size_t)key->ldc * cb;
  const size_t at_b = round256(a_bytes), at_c = at_b + round256(b_bytes),
               at_d = at_c + round256(c_bytes), at_hash = at_d + round256(c_bytes),
               total = at_hash + GEMM_CANDIDATES * sizeof(unsigned long long) + 2 * sizeof(float);
  if (total > GEMM_TUNE_MAX_BYTES) return 0;
  /* once a shape, freed after the timing: the operands may outgrow the scratch arena, which
   * may hold live data when a shape first runs */
  if (cudaMalloc((void **)&t->base, total) != cudaSuccess) {
    cudaGetLastError();   /* out of memory is no error here: the first candidate is kept */
    return 0;
  }
  t->a = t->base, t->b = t->base + at_b, t->c = t->base + at_c, t->d = t->base + at_d;
  t->hash = (unsigned long long *)(t->base + at_hash);
  t->scalars = (float *)(t->hash + GEMM_CANDIDATES);
  static const float ones[2] = {1.0f, 1.0f};
  CUDA_CHECK(cudaMemcpyAsync(t->scalars, ones, sizeof ones, cudaMemcpyHostToDevice,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaMemsetAsync(t->hash, 0, GEMM_CANDIDATES * sizeof(unsigned long long),
                             cuda_ctx.stream));
  tune_fill(t->a, key->ab, a_bytes, 0x51u);
  tune_fill(t->b, key->ab, b_bytes, 0x52u);
  tune_fill(t->c, key->c_type, c_bytes, 0x53u);
  return 1;
}

/* The index of the candidate the entry keeps (gemm_pick: 0, the heuristic's first, or the
 * fastest of those that reproduce candidate 0's bits on the tuning operands; a candidate that
 * splits K sums in another order, so its bits differ and it is left out). */
static int tune_pick(const struct gemm_entry *e, const cublasLtMatmulHeuristicResult_t *results,
                     int found) {
  const struct gemm_key *key = &e->key;
  struct tune_buffers t;
  if (found < 2 || !cuda_ctx.gemm_tune || cuda_ctx.capturing || !tune_alloc(&t, key)) return 0;
  const float alpha = 1.0f, beta = key->beta_zero ? 0.0f : 1.0f;
  const void *alpha_p = key->device_scalars ? (const void *)t.scalars : &alpha;
  const void *beta_p = key->device_scalars ? (const void *)(t.scalars + 1) : &beta;
  cudaEvent_t ev[GEMM_CANDIDATES][2];
  int ran[GEMM_CANDIDATES] = {0};
  for (int r = 0; r < found; r++) {
    for (int i = 0; i < 2; i++) CUDA_CHECK(cudaEventCreate(&ev[r][i]));
    if (results[r].state != CUBLAS_STATUS_SUCCESS) continue;
    ran[r] = 1;
    for (int run = 0; run <= GEMM_TUNE_RUNS && ran[r]; run++) {
      if (run == 1) CUDA_CHECK(cudaEventRecord(ev[r][0], cuda_ctx.stream));
      ran[r] = cublasLtMatmul(cuda_ctx.lt, e->desc, alpha_p, t.b, e->lt_a, t.a, e->lt_b, beta_p,
                              t.c, e->lt_c, t.d, e->lt_c, &results[r].algo,
                              cuda_ctx.lt_workspace, cuda_ctx.lt_workspace_bytes,
                              cuda_ctx.stream) == CUBLAS_STATUS_SUCCESS;
      if (run == 0 && ran[r]) tune_hash(t.hash + r, t.d, key);   /* the untimed first call's */
    }
    if (ran[r]) CUDA_CHECK(cudaEventRecord(ev[r][1], cuda_ctx.stream));
    cudaGetLastError();   /* a candidate that failed to launch leaves no sticky error */
  }
  unsigned long long hash[GEMM_CANDIDATES];
  CUDA_CHECK(cudaMemcpyAsync(hash, t.hash, sizeof hash, cudaMemcpyDeviceToHost, cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  float ms[GEMM_CANDIDATES] = {0};
  for (int r = 0; r < found; r++)
    if (ran[r]) CUDA_CHECK(cudaEventElapsedTime(&ms[r], ev[r][0], ev[r][1]));
  const int best = gemm_pick(found, ran, hash, ms, &g_tuning.other_bits);
  g_tuning.shapes++;
  g_tuning.switched += best != 0;
  for (int r = 0; r < found; r++)
    for (int i = 0; i < 2; i++) CUDA_CHECK(cudaEventDestroy(ev[r][i]));
  CUDA_CHECK(cudaFree(t.base));
  return best;
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

  cublasLtMatmulHeuristicResult_t results[GEMM_CANDIDATES];
  int found = 0;
  memset(results, 0, sizeof results);
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(cuda_ctx.lt, e->desc, e->lt_a, e->lt_b,
                                                     e->lt_c, e->lt_c, pref, GEMM_CANDIDATES,
                                                     results, &found);
  CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  e->used = 1;
  if (st != CUBLAS_STATUS_SUCCESS || found < 1 || results[0].state != CUBLAS_STATUS_SUCCESS) {
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
  e->algo = results[tune_pick(e, results, found)].algo;
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

extern "C" struct cuda_gemm_tuning cuda_gemm_tuning(void) { return g_tuning; }

extern "C" void cuda_gemm_forget(void) {
  for (int i = 0; i < CACHE_SIZE; i++) entry_destroy(&g_cache[i]);
  g_last = -1;
  g_next = 0;
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
