/* The native Blackwell NVFP4 GEMM (kernels/cuda/cuda_fp4_gemm.cu) against the emulation on the
 * CPU. Random A [m, k] and B [n, k], with heavy tails (a few elements up to ~1e4 times the
 * typical one, so block scales span the E4M3 range and some blocks fall to subnormal or zero
 * scales) and zero blocks, are quantized by the CPU quantizer (nvfp4_quantize, 1x16 blocks);
 * their codes and row-major scales go to the GPU, the scales are swizzled there
 * (cuda_fp4_swizzle_scales: checked byte for byte against a host copy of PyTorch's to_blocked,
 * padding zeros included), and cuda_fp4_gemm's result is compared with nvfp4_gemm on
 * nvfp4_dequantize's q * s_b and the two S_dec:
 *  - fp32 C: relative L2 <= 1e-5 (the same exact products, summed in another order in fp32);
 *  - bf16 C: relative L2 <= 4e-3 (one bf16 rounding, 2^-9 relative, of each element; beta * C is
 *    added from bf16 values the CPU also uses);
 *  - beta 0 with C poisoned with NaN first (cuBLASLt must not read it), and beta 1 onto random C;
 *  - no NaN anywhere.
 * Shapes: m and n not multiples of 128, k multiples of 32 but not of 64 (a K tail in the last
 * 128x4 scale tile) and one multiple of 64. Shapes the documentation does not promise (k a
 * multiple of 16 only, m or n not a multiple of 16) are tried too: there cuda_fp4_gemm may
 * answer 0 (no algorithm), which is reported, not failed; when it runs it must be right.
 * Skips (exit 77) without a CUDA build, without a GPU, and on a GPU without native FP4 (the
 * project's H200, compute capability 9.0). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/nvfp4.h"
#include "kernels/ops.h"
#include "tests/check.h"

#ifndef QWEN3_HAVE_CUDA
int main(void) {
  printf("test_fp4_native: this build has no CUDA backend; skipped\n");
  return 77;
}
#else
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_device.h"

#define F32_TOL 1e-5
#define BF16_TOL 4e-3

/* ---- host helpers ------------------------------------------------------------------------- */

static uint64_t rng = 0xf4f4;

static double uniform01(void) { return (double)(splitmix64(&rng) >> 11) * 0x1.0p-53; }

static double normal(void) {
  double u = uniform01(), v = uniform01();
  return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* Mostly normal; 1 in 64 elements is a normal divided by a small uniform (a heavy tail, up to
 * ~1e4); one row in 7 is scaled by 1e-3 (small blocks next to the tensor's amax: small and
 * subnormal E4M3 scales); one 16-element block in 11 is zero (scale 0). */
static float *rand_heavy(int rows, int cols) {
  float *x = xmalloc((size_t)rows * (size_t)cols * sizeof(float));
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) {
      double v = normal();
      if (splitmix64(&rng) % 64 == 0) v /= (uniform01() + 1e-4);
      if (r % 7 == 3) v *= 1e-3;
      if ((r * (cols / 16) + c / 16) % 11 == 5) v = 0;
      x[(size_t)r * cols + c] = (float)v;
    }
  return x;
}

static uint16_t bf16_of(float f) { /* round to nearest even; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(u >> 16 | 0x40);
  return (uint16_t)((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

static float f32_of_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* PyTorch's to_blocked written forward, as its view/permute/reshape chain reads: for the padded
 * [rows_p, kb_p] matrix, block (rb, cb) of 128x4 is tile rb * (kb_p/4) + cb; inside it row
 * r = a * 32 + b (a < 4, b < 32) and column c go to b * 16 + a * 4 + c. Padding is zero. */
static void to_blocked_host(uint8_t *dst, const uint8_t *src, int rows, int kb) {
  int rows_p = (rows + 127) / 128 * 128, kb_p = (kb + 3) / 4 * 4;
  memset(dst, 0, (size_t)rows_p * (size_t)kb_p);
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < kb; c++) {
      size_t tile = (size_t)(r / 128) * (size_t)(kb_p / 4) + (size_t)(c / 4);
      int a = (r % 128) / 32, b = r % 32;
      dst[tile * 512 + (size_t)(b * 16 + a * 4 + c % 4)] = src[(size_t)r * kb + c];
    }
}

static void *dev_copy(const void *host, size_t bytes) {
  void *d;
  CUDA_CHECK(cudaMalloc(&d, bytes ? bytes : 1));
  if (bytes) CUDA_CHECK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
  return d;
}

/* ---- one operand: quantized on the host, codes and swizzled scales on the device ------------- */

struct operand {
  int rows, k;
  uint8_t *codes, *scales;        /* host: rows*k/2 codes, rows*k/16 row-major scales */
  struct nvfp4_tensor_scale ts;
  float *qsb;                     /* host: q * s_b, [rows, k] */
  uint8_t *d_codes, *d_scales_sw; /* device */
  float *d_dec;
};

static void operand_make(struct operand *o, int rows, int k, const char *name) {
  o->rows = rows, o->k = k;
  float *x = rand_heavy(rows, k);
  size_t nscales = (size_t)nvfp4_num_scales(rows, k, NVFP4_BLOCK_1X16);
  o->codes = xmalloc((size_t)rows * k / 2);
  o->scales = xmalloc(nscales);
  int st = nvfp4_quantize(o->codes, o->scales, &o->ts, x, rows, k, NVFP4_BLOCK_1X16,
                          NVFP4_ROUND_NEAREST, 0);
  CHECK(st == NVFP4_OK, "%s: nvfp4_quantize gave %d", name, st);
  o->qsb = xmalloc((size_t)rows * k * sizeof(float));
  nvfp4_dequantize(o->qsb, o->codes, o->scales, 1.0f, rows, k, NVFP4_BLOCK_1X16);
  free(x);

  o->d_codes = dev_copy(o->codes, (size_t)rows * k / 2);
  uint8_t *d_scales = dev_copy(o->scales, nscales);
  size_t sw_bytes = cuda_fp4_swizzled_scale_bytes(rows, k);
  CUDA_CHECK(cudaMalloc((void **)&o->d_scales_sw, sw_bytes));
  CUDA_CHECK(cudaMemset(o->d_scales_sw, 0xA5, sw_bytes)); /* poison: padding must be written */
  cuda_fp4_swizzle_scales(o->d_scales_sw, d_scales, rows, k);
  o->d_dec = dev_copy(&o->ts.dec, sizeof(float));

  uint8_t *want = xmalloc(sw_bytes), *got = xmalloc(sw_bytes);
  to_blocked_host(want, o->scales, rows, k / 16);
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  CUDA_CHECK(cudaMemcpy(got, o->d_scales_sw, sw_bytes, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < sw_bytes; i++) bad += want[i] != got[i];
  CHECK(bad == 0, "%s [%d, %d]: %zu of %zu swizzled scale bytes differ from to_blocked", name,
        rows, k, bad, sw_bytes);
  free(want), free(got);
  CUDA_CHECK(cudaFree(d_scales));
}

static void operand_free(struct operand *o) {
  free(o->codes), free(o->scales), free(o->qsb);
  CUDA_CHECK(cudaFree(o->d_codes));
  CUDA_CHECK(cudaFree(o->d_scales_sw));
  CUDA_CHECK(cudaFree(o->d_dec));
}

/* ---- one GEMM ----------------------------------------------------------------------------- */

/* Returns 0 when cuda_fp4_gemm had no algorithm (and !required), else 1. */
static int run_case(const struct operand *A, const struct operand *B, enum dtype c_type,
                    float beta, int required) {
  int m = A->rows, n = B->rows, k = A->k;
  size_t mn = (size_t)m * n;
  const char *cname = c_type == DT_BF16 ? "bf16" : "fp32";
  /* C's start: NaN (poison) for beta 0; random values, representable in C's dtype, for beta 1 */
  float *c0 = xmalloc(mn * sizeof(float));
  for (size_t i = 0; i < mn; i++) {
    float v = (float)(normal() * 30.0);
    c0[i] = beta == 0.0f ? NAN : c_type == DT_BF16 ? f32_of_bf16(bf16_of(v)) : v;
  }
  float *ref = xmalloc(mn * sizeof(float));
  memcpy(ref, c0, mn * sizeof(float));
  if (beta == 0.0f)
    for (size_t i = 0; i < mn; i++) ref[i] = 0.0f; /* cblas with beta 0 may read C: give it 0 */
  nvfp4_gemm(ref, A->qsb, A->ts.dec, B->qsb, B->ts.dec, 0, m, n, k, beta);

  size_t esz = dtype_bytes(c_type);
  void *host_c = xmalloc(mn * esz);
  for (size_t i = 0; i < mn; i++) {
    if (c_type == DT_BF16) ((uint16_t *)host_c)[i] = bf16_of(c0[i]);
    else ((float *)host_c)[i] = c0[i];
  }
  void *d_c = dev_copy(host_c, mn * esz);
  int ran = cuda_fp4_gemm(d_c, c_type, A->d_codes, A->d_scales_sw, A->d_dec, B->d_codes,
                          B->d_scales_sw, B->d_dec, m, n, k, beta);
  if (!ran) {
    CHECK(!required, "m %d n %d k %d c %s beta %g: cuBLASLt found no FP4 algorithm", m, n, k,
          cname, beta);
    if (!required)
      printf("  m %4d n %4d k %4d c %s beta %g: no cuBLASLt algorithm (not promised); "
             "skipped\n", m, n, k, cname, beta);
    CUDA_CHECK(cudaFree(d_c));
    free(c0), free(ref), free(host_c);
    return 0;
  }
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  CUDA_CHECK(cudaMemcpy(host_c, d_c, mn * esz, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  size_t nans = 0;
  for (size_t i = 0; i < mn; i++) {
    float g = c_type == DT_BF16 ? f32_of_bf16(((uint16_t *)host_c)[i]) : ((float *)host_c)[i];
    if (isnan(g) || isnan(ref[i])) {
      nans++;
      continue;
    }
    double d = (double)g - (double)ref[i];
    num += d * d;
    den += (double)ref[i] * (double)ref[i];
  }
  double rel = den > 0 ? sqrt(num / den) : sqrt(num);
  double tol = c_type == DT_BF16 ? BF16_TOL : F32_TOL;
  printf("  m %4d n %4d k %4d c %s beta %g: relative L2 %.3g (tolerance %.0e)%s\n", m, n, k,
         cname, beta, rel, tol, nans ? ", NaN present" : "");
  CHECK(nans == 0, "m %d n %d k %d c %s beta %g: %zu NaN", m, n, k, cname, beta, nans);
  CHECK(rel <= tol, "m %d n %d k %d c %s beta %g: relative L2 %.3g > %.0e", m, n, k, cname,
        beta, rel, tol);
  CUDA_CHECK(cudaFree(d_c));
  free(c0), free(ref), free(host_c);
  return 1;
}

static void test_shape(int m, int n, int k, int required) {
  struct operand A, B;
  operand_make(&A, m, k, "A");
  operand_make(&B, n, k, "B");
  static const enum dtype types[2] = {DT_F32, DT_BF16};
  static const float betas[2] = {0.0f, 1.0f};
  for (int t = 0; t < 2; t++)
    for (int bi = 0; bi < 2; bi++)
      if (!run_case(&A, &B, types[t], betas[bi], required)) goto done; /* the shape is refused */
done:
  operand_free(&A);
  operand_free(&B);
}

int main(void) {
  if (cuda_device_count() == 0) {
    printf("test_fp4_native: no GPU; skipped\n");
    return 77;
  }
  if (!cuda_fp4_native_available()) {
    char name[160] = "?";
    cuda_device_name(0, name, sizeof name);
    printf("test_fp4_native: %s has no native FP4 GEMM (needs compute capability 10.x or 12.x "
           "and cuBLASLt's NVFP4 kernels); skipped\n", name);
    return 77;
  }
  backend_cuda.init(0, 1, 0);

  /* documented-friendly shapes: m, n multiples of 16 (not of 128), k multiple of 32 */
  test_shape(144, 80, 96, 1);   /* k 96: one full and one half 128x4 scale tile along k */
  test_shape(208, 272, 160, 1); /* m, n past one 128-row band */
  test_shape(16, 400, 224, 1);
  test_shape(384, 128, 512, 1); /* aligned everywhere: the baseline */
  /* not promised by the documentation: answered, or refused without failing */
  test_shape(100, 72, 96, 0);   /* m not a multiple of 16 */
  test_shape(144, 80, 48, 0);   /* k a multiple of 16 only */
  test_shape(130, 36, 80, 0);

  return checks_report();
}
#endif
