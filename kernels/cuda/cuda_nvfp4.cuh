/* NVFP4's scalar formats on the device (kernels/nvfp4.h has the numerics), shared by the
 * quantizers and nvfp4_pack (cuda_nvfp4.cu), the packed-weight GEMV (cuda_gemv.cuh) and
 * AdamW's amax parts (cuda_adamw.cu): the exactly rounded fp32 operations the quantizers are
 * written with, the decoding of E4M3 scale bytes, and the maxima an amax is reduced with. The
 * scalar functions are __host__ __device__ so that a host program can compare them with the
 * CPU's byte for byte. */
#ifndef QWEN3_CUDA_NVFP4_CUH
#define QWEN3_CUDA_NVFP4_CUH

#include <stdint.h>
#include <string.h>

/* Every step of the quantizers is the single rounded fp32 operation the host performs: nvcc
 * neither contracts these into an FMA nor approximates the division. */
#ifdef __CUDA_ARCH__
#define NV_UNROLL _Pragma("unroll")
#define NV_MUL(a, b) __fmul_rn((a), (b))
#define NV_DIV(a, b) __fdiv_rn((a), (b))
#define NV_ADD(a, b) __fadd_rn((a), (b))
#define NV_SUB(a, b) __fsub_rn((a), (b))
#else
#define NV_UNROLL
#define NV_MUL(a, b) ((a) * (b))
#define NV_DIV(a, b) ((a) / (b))
#define NV_ADD(a, b) ((a) + (b))
#define NV_SUB(a, b) ((a) - (b))
#endif

__host__ __device__ static inline uint32_t nv_f2u(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
#endif
}

__host__ __device__ static inline float nv_u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, 4);
  return x;
#endif
}

/* The high and low words of the 64-bit product a * b. On the device as two 32-bit products,
 * which ptxas pairs into one IMAD.WIDE.U32 when both are used (the 64-bit product written as
 * such, (uint64_t)a * b and a shift, left an extra IADD3 of a zero uniform register on about half
 * of the Philox rounds: 4 per draw, 1 instruction per element of stochastic rounding). */
__host__ __device__ static inline uint32_t nv_mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return (uint32_t)((uint64_t)a * b >> 32);
#endif
}

/* nvfp4_philox4x32_10 with counter {ctr lo, ctr hi, 0, 0} and key {seed lo, seed hi}, the
 * same words (tests/unit/test_cuda_nvfp4_scalars.cu compares them). */
__host__ __device__ static inline void nv_philox(uint32_t out[4], uint64_t ctr, uint64_t seed) {
  uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
NV_UNROLL
  for (int round = 0; round < 10; round++) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t n0 = nv_mulhi(0xCD9E8D57u, c2) ^ c1 ^ k0, n1 = 0xCD9E8D57u * c2;
    const uint32_t n2 = nv_mulhi(0xD2511F53u, c0) ^ c3 ^ k1, n3 = 0xD2511F53u * c0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* nvfp4_e4m3_decode, built from bits (the host's ldexpf values are exact). */
__host__ __device__ static inline float nv_e4m3_decode(uint32_t byte) {
  const uint32_t e = byte >> 3 & 15, m = byte & 7;
  if (e == 15 && m == 7) return nv_u2f(0x7fc00000u);
  const float v = e ? nv_u2f((e + 120) << 23 | m << 20) : NV_MUL((float)m, 0x1p-9f);
  return byte & 0x80 ? -v : v;
}

/* The maxima an amax is reduced with, on the bits of |x| (cuda_nvfp4.cu says why): one code for
 * the quantizers' amax pass and the amax parts AdamW writes with the masters, which stand in
 * for that pass's maxima. */

/* max of the bits of |v| over N values */
template <int N>
__host__ __device__ static inline uint32_t nv_absmax(const float *v) {
  uint32_t m = 0;
NV_UNROLL
  for (int j = 0; j < N; j++) {
    const uint32_t b = nv_f2u(v[j]) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

/* m[k] = the largest m[k] of the block's WARPS warps, in every thread (every thread calls this,
 * at most once a kernel: a second call would rewrite the shared words others may still read) */
template <int K, int WARPS>
__device__ __forceinline__ void nv_block_max(uint32_t m[K]) {
  static_assert(WARPS <= 32, "one warp reduces the warps' maxima");
  __shared__ uint32_t warp_max[K][WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
NV_UNROLL
  for (int k = 0; k < K; k++) {
    m[k] = __reduce_max_sync(0xffffffffu, m[k]);
    if (lane == 0) warp_max[k][warp] = m[k];
  }
  __syncthreads();
NV_UNROLL
  for (int k = 0; k < K; k++)
    m[k] = __reduce_max_sync(0xffffffffu, lane < WARPS ? warp_max[k][lane] : 0u);
}

#endif
