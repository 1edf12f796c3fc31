/* cuda_fp4_gemm: the native Blackwell NVFP4 GEMM through cuBLASLt (CUDA_R_4F_E2M1 operands,
 * CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3 block scales), the test of whether this process's GPU
 * has it, and the kernel that puts row-major E4M3 block scales into the tiled layout cuBLASLt
 * reads. Declared and documented in kernels/cuda/cuda.h ("cuda_fp4_gemm.cu").
 *
 * Not wired into training: the trainer and the worker keep the emulated GEMM (cuda_nvfp4.cu: the
 * exact bf16 values q * s_b through cuda_gemm_scaled) on every GPU, Blackwell included. This file
 * is compiled for every architecture of the build (its kernel is plain integer code) and is only
 * exercised by tests/gpu/test_fp4_native.c, which skips where cuda_fp4_native_available() is 0
 * (the H200 this project runs on: compute capability 9.0). It has not run on a Blackwell GPU yet.
 *
 * What cuBLASLt's FP4 GEMM requires (cuBLAS documentation, cublasLtMatmul, "supported data
 * types" and its FP8/FP4 requirements; NVIDIA/CUDALibrarySamples cuBLASLt/LtNvfp4Matmul): the
 * "TN" format (Lt A transposed, Lt B not, i.e. both operands contiguous along K), compute type
 * CUBLAS_COMPUTE_32F, scale type CUDA_R_32F, 16-byte aligned pointers and leading dimensions
 * (for 4-bit data: K a multiple of 32). Whatever else a given cuBLASLt refuses, its heuristic
 * says so, and cuda_fp4_gemm then returns 0 without launching anything.
 *
 * Row-major mapping, as in cuda_gemm.cu: our row-major c [m, n] = a [m, k] · b [n, k]ᵀ is the
 * column-major cᵀ [n, m] = b · aᵀ, so cuBLASLt's A is our b (stored column-major [k, n], ld k,
 * TRANSA = T), its B is our a (column-major [k, m], ld k, TRANSB = N), its C = D our c (column-
 * major [n, m], ld n), and the Lt problem is M = n, N = m, K = k. Lt A's block scales run along
 * its K for each of its M = n "rows": exactly our b's row-major [n, k/16] scales, swizzled; Lt
 * B's are our a's [m, k/16].
 *
 * The scale layout (cuBLAS documentation, "1D Block Scaling Factors Layout"). The scales of an
 * operand with `rows` rows (the non-K dimension) and kb = k/16 scales per row are stored in
 * tiles of 128 rows x 4 scales (512 bytes, covering 128 x 64 elements). The scale matrix is
 * padded to rows_p = roundup(rows, 128) and kb_p = roundup(kb, 4); tiles are laid out with the
 * K tiles of one 128-row band consecutive (tile index (r / 128) * (kb_p / 4) + c / 4), and
 * within a tile scale (r, c) sits at byte
 *        (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4).
 * The same formula is PyTorch's to_blocked (aten's tests and torchao mx_formats/utils.py:
 * view(rows_p/128, 128, kb_p/4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 32, 4).transpose(1, 2)
 * .reshape(-1, 32, 16)), which is what torch._scaled_mm hands cuBLASLt for NVFP4, and Transformer
 * Engine's nvte_swizzle_scaling_factors (row-major scale_inv padded to 128x4 for row scales).
 * The padding is written as zero scales: a zero scale makes whatever codes lie past k or past
 * the last row contribute exactly 0 (E2M1 has no NaN or Inf).
 *
 * Descriptors, layouts and the algorithm are built once per (m, n, k, c dtype, alignments) and
 * cached, as in cuda_gemm.cu, so a shape repeats bit for bit; the scale pointers change with
 * every call and are set on the cached descriptor before each cublasLtMatmul. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda.h"

#define FP4_CACHE_SIZE 64

struct fp4_key {
  int m, n, k;
  int c_type; /* enum dtype */
  int align_a, align_b, align_c, align_sa, align_sb;
};

struct fp4_entry {
  int used;
  int found; /* 0: cuBLASLt has no algorithm for this key (nothing else is built) */
  struct fp4_key key;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t lt_a, lt_b, lt_c; /* Lt A (our b), Lt B (our a), Lt C = D (our c) */
  cublasLtMatmulAlgo_t algo;
};

static struct fp4_entry g_fp4_cache[FP4_CACHE_SIZE];
static int g_fp4_next = 0;

static int fp4_align(const void *p) {
  uintptr_t a = (uintptr_t)p;
  int al = 256;
  while (al > 1 && (a & (uintptr_t)(al - 1))) al >>= 1;
  return al;
}

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

extern "C" size_t cuda_fp4_swizzled_scale_bytes(int rows, int k) {
  return round_up((size_t)rows, 128) * round_up((size_t)(k / 16), 4);
}

/* ---- the scale swizzle ---------------------------------------------------------------------- */

/* One thread per byte of the swizzled array (padding included, so every byte is written and the
 * writes are coalesced): the inverse of the layout formula at the top finds the (r, c) it holds. */
static __global__ void fp4_swizzle_scales_kernel(uint8_t *dst, const uint8_t *src, int rows,
                                                 int kb, int kb_tiles, size_t total) {
  for (size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x; o < total;
       o += (size_t)gridDim.x * blockDim.x) {
    size_t tile = o / 512;
    int within = (int)(o % 512);
    size_t r = (tile / (size_t)kb_tiles) * 128 + (size_t)((within % 16) / 4) * 32 + within / 16;
    int c = (int)(tile % (size_t)kb_tiles) * 4 + within % 4;
    dst[o] = (r < (size_t)rows && c < kb) ? src[r * (size_t)kb + (size_t)c] : (uint8_t)0;
  }
}

extern "C" void cuda_fp4_swizzle_scales(uint8_t *dst, const uint8_t *src, int rows, int k) {
  if (rows < 0 || k < 0 || k % 16) {
    char detail[96];
    snprintf(detail, sizeof detail, "rows %d k %d (k must be a multiple of 16)", rows, k);
    cuda_fail("cuda_fp4_swizzle_scales", detail, __FILE__, __LINE__);
  }
  size_t total = cuda_fp4_swizzled_scale_bytes(rows, k);
  if (total == 0) return;
  int kb = k / 16, kb_tiles = (int)(round_up((size_t)kb, 4) / 4);
  fp4_swizzle_scales_kernel<<<cuda_blocks(total), CUDA_THREADS, 0, cuda_ctx.stream>>>(
      dst, src, rows, kb, kb_tiles, total);
  CUDA_LAUNCHED("fp4_swizzle_scales_kernel");
}

/* ---- descriptors ---------------------------------------------------------------------------- */

/* Builds the descriptor and layouts of key on handle lt and asks the heuristic for one
 * algorithm with workspace_bytes of workspace. Returns the cuBLAS status of the first call that
 * failed, else CUBLAS_STATUS_SUCCESS with *found (0 or 1) and *algo set. Never dies: it also
 * serves cuda_fp4_native_available, which must not fail on a GPU without FP4. On error the
 * objects created so far are destroyed. */
static cublasStatus_t fp4_build(cublasLtHandle_t lt, const struct fp4_key *key,
                                size_t workspace_bytes, cublasLtMatmulDesc_t *desc,
                                cublasLtMatrixLayout_t *lt_a, cublasLtMatrixLayout_t *lt_b,
                                cublasLtMatrixLayout_t *lt_c, cublasLtMatmulAlgo_t *algo,
                                int *found) {
  *desc = NULL, *lt_a = *lt_b = *lt_c = NULL, *found = 0;
  cublasLtMatmulPreference_t pref = NULL;
  cublasStatus_t st;
  cublasOperation_t op_a = CUBLAS_OP_T, op_b = CUBLAS_OP_N; /* "TN": both K-contiguous */
  cublasLtPointerMode_t pm = CUBLASLT_POINTER_MODE_DEVICE;  /* alpha and beta on the device */
  int32_t scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3;
  cudaDataType_t c_type = key->c_type == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  uint64_t ws = (uint64_t)workspace_bytes;
  uint32_t al_a = (uint32_t)key->align_b, al_b = (uint32_t)key->align_a,
           al_c = (uint32_t)key->align_c;
  cublasLtMatmulHeuristicResult_t result;
  memset(&result, 0, sizeof result);
#define FP4_TRY(call)                        \
  do {                                       \
    st = (call);                             \
    if (st != CUBLAS_STATUS_SUCCESS) goto fail; \
  } while (0)
  FP4_TRY(cublasLtMatmulDescCreate(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  FP4_TRY(cublasLtMatmulDescSetAttribute(*desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
  FP4_TRY(cublasLtMatmulDescSetAttribute(*desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
  FP4_TRY(cublasLtMatmulDescSetAttribute(*desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof pm));
  FP4_TRY(cublasLtMatmulDescSetAttribute(*desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &scale_mode,
                                         sizeof scale_mode));
  FP4_TRY(cublasLtMatmulDescSetAttribute(*desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &scale_mode,
                                         sizeof scale_mode));
  /* layouts as stored: Lt A = our b, col-major [k, n]; Lt B = our a, col-major [k, m] */
  FP4_TRY(cublasLtMatrixLayoutCreate(lt_a, CUDA_R_4F_E2M1, (uint64_t)key->k, (uint64_t)key->n,
                                     key->k));
  FP4_TRY(cublasLtMatrixLayoutCreate(lt_b, CUDA_R_4F_E2M1, (uint64_t)key->k, (uint64_t)key->m,
                                     key->k));
  FP4_TRY(cublasLtMatrixLayoutCreate(lt_c, c_type, (uint64_t)key->n, (uint64_t)key->m, key->n));
  FP4_TRY(cublasLtMatmulPreferenceCreate(&pref));
  FP4_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                               sizeof ws));
  FP4_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                               &al_a, sizeof al_a));
  FP4_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                               &al_b, sizeof al_b));
  FP4_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                               &al_c, sizeof al_c));
  FP4_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                               &al_c, sizeof al_c));
  {
    /* NOT_SUPPORTED (and the like) from the heuristic means "no algorithm", not an error */
    int n_found = 0;
    cublasStatus_t h = cublasLtMatmulAlgoGetHeuristic(lt, *desc, *lt_a, *lt_b, *lt_c, *lt_c,
                                                      pref, 1, &result, &n_found);
    *found = h == CUBLAS_STATUS_SUCCESS && n_found >= 1 && result.state == CUBLAS_STATUS_SUCCESS;
    if (*found) *algo = result.algo;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  return CUBLAS_STATUS_SUCCESS;
fail:
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (*lt_c) cublasLtMatrixLayoutDestroy(*lt_c);
  if (*lt_b) cublasLtMatrixLayoutDestroy(*lt_b);
  if (*lt_a) cublasLtMatrixLayoutDestroy(*lt_a);
  if (*desc) cublasLtMatmulDescDestroy(*desc);
  *desc = NULL, *lt_a = *lt_b = *lt_c = NULL, *found = 0;
  return st;
#undef FP4_TRY
}

static void fp4_entry_destroy(struct fp4_entry *e) {
  if (!e->used) return;
  if (e->found) {
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_a));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_b));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_c));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(e->desc));
  }
  e->used = 0;
}

static struct fp4_entry *fp4_cache_get(const struct fp4_key *key) {
  for (int i = 0; i < FP4_CACHE_SIZE; i++)
    if (g_fp4_cache[i].used && memcmp(&g_fp4_cache[i].key, key, sizeof *key) == 0)
      return &g_fp4_cache[i];
  struct fp4_entry *e = &g_fp4_cache[g_fp4_next];
  g_fp4_next = (g_fp4_next + 1) % FP4_CACHE_SIZE;
  fp4_entry_destroy(e);
  memset(e, 0, sizeof *e);
  e->key = *key;
  CUBLAS_CHECK(fp4_build(cuda_ctx.lt, key, cuda_ctx.lt_workspace_bytes, &e->desc, &e->lt_a,
                         &e->lt_b, &e->lt_c, &e->algo, &e->found));
  if (!e->found) { /* remember the refusal; keep no descriptors for it */
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_a));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_b));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(e->lt_c));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(e->desc));
  }
  e->used = 1;
  return e;
}

/* ---- availability --------------------------------------------------------------------------- */

/* 1 only for compute capability 10.x (B200, GB200, B300) or 12.x (RTX 50, RTX PRO 6000 Blackwell,
 * DGX Spark): the architectures with block-scaled FP4 tensor-core MMA that cuBLASLt drives, and
 * that this build has code for (sm_100a, sm_121a; cuBLASLt carries its own kernels). The
 * heuristic then has the last word, on a 128 x 128 x 128 problem with a bf16 C. Its own
 * cuBLASLt handle: callable before the backend's init, and nothing here may die. */
extern "C" int cuda_fp4_native_available(void) {
  static int cached = -1;
  if (cached >= 0) return cached;
  cached = 0;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError(); /* no driver or device: clear the (non-sticky) error, and say no */
    return cached;
  }
  if (major != 10 && major != 12) return cached;
  cublasLtHandle_t lt = NULL;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) return cached;
  struct fp4_key key;
  memset(&key, 0, sizeof key);
  key.m = key.n = key.k = 128;
  key.c_type = DT_BF16;
  key.align_a = key.align_b = key.align_c = key.align_sa = key.align_sb = 256;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t lt_a, lt_b, lt_c;
  cublasLtMatmulAlgo_t algo;
  int found = 0;
  if (fp4_build(lt, &key, (size_t)32 << 20, &desc, &lt_a, &lt_b, &lt_c, &algo, &found) ==
      CUBLAS_STATUS_SUCCESS) {
    cublasLtMatrixLayoutDestroy(lt_a);
    cublasLtMatrixLayoutDestroy(lt_b);
    cublasLtMatrixLayoutDestroy(lt_c);
    cublasLtMatmulDescDestroy(desc);
    cached = found ? 1 : 0;
  }
  cublasLtDestroy(lt);
  return cached;
}

/* ---- the GEMM ------------------------------------------------------------------------------- */

extern "C" int cuda_fp4_gemm(void *c, enum dtype c_type, const uint8_t *a, const uint8_t *a_scales,
                             const float *dec_a, const uint8_t *b, const uint8_t *b_scales,
                             const float *dec_b, int m, int n, int k, float beta) {
  if (m <= 0 || n <= 0 || k <= 0 || k % 16) {
    char detail[128];
    snprintf(detail, sizeof detail, "m %d n %d k %d (positive, k a multiple of 16)", m, n, k);
    cuda_fail("cuda_fp4_gemm", detail, __FILE__, __LINE__);
  }
  struct fp4_key key;
  memset(&key, 0, sizeof key); /* compared with memcmp */
  key.m = m, key.n = n, key.k = k;
  key.c_type = (int)c_type;
  key.align_a = fp4_align(a), key.align_b = fp4_align(b), key.align_c = fp4_align(c);
  /* not told to the heuristic (it has no preference for them) but kept apart all the same */
  key.align_sa = fp4_align(a_scales), key.align_sb = fp4_align(b_scales);
  struct fp4_entry *e = fp4_cache_get(&key);
  if (!e->found) return 0;
  /* Lt A is our b, Lt B our a: their scale pointers follow them */
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                              &b_scales, sizeof b_scales));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                              &a_scales, sizeof a_scales));
  const float *scalars = cuda_gemm_device_scalars(dec_a, dec_b, beta);
  CUBLAS_CHECK(cublasLtMatmul(cuda_ctx.lt, e->desc, scalars, b, e->lt_a, a, e->lt_b, scalars + 1,
                              c, e->lt_c, c, e->lt_c, &e->algo, cuda_ctx.lt_workspace,
                              cuda_ctx.lt_workspace_bytes, cuda_ctx.stream));
  return 1;
}
