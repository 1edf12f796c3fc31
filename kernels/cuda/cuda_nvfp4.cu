/* The CUDA backend's NVFP4 ops (kernels/ops.h; numerics in kernels/nvfp4.h):
 *  - cuda_nvfp4_quantize_dequantize: xq = q * s_b, byte-identical to the CPU's
 *    nvfp4_quantize_dequantize (kernels/nvfp4_quantize.c), and S_dec returned to the host;
 *  - cuda_nvfp4_rht: the 16-point random Hadamard transform, bit-identical to nvfp4_rht.c;
 *  - cuda_nvfp4_gemm: the emulated NVFP4 GEMM through cuda_gemm (TN).
 *
 * How exactness is kept. Every step is the fp32 operation the host code performs, in the same
 * order, written with __fmul_rn/__fdiv_rn/__fadd_rn/__fsub_rn so that nvcc neither contracts a
 * product into an FMA nor approximates a division. The host's E4M3 and E2M1 conversions (double
 * frexp/ldexp/nearbyint, midpoint loops, a double comparison for stochastic rounding) are
 * reproduced by fp32/integer code that is exact on the same inputs: the E4M3 step count is a
 * product by a power of two (exact) rounded with rintf (ties to even, as nearbyint); the E2M1
 * midpoint loop is a count of nested comparisons; the stochastic comparison u < frac * 2^32 is
 * u < ceil(frac * 2^32) in integers (frac * 2^32 is exact in fp32). These scalar functions are
 * __host__ __device__ so that a host program can compare them, and the kernels' block logic,
 * with the CPU quantizer byte for byte. Denormals must be kept (no -ftz, no --use_fast_math):
 * the amax kernel also computes FLT_MIN * 0.5 on the device and the op dies if that flushed.
 * Maxima are taken on the bits of |x| as unsigned integers: order-independent, and the bits of
 * a non-finite |x| (0x7f800000 and up) exceed every finite one, so the tensor amax doubles as the
 * non-finite flag.
 *
 * One call of quantize_dequantize: a memset and an amax kernel (atomicMax of per-block maxima),
 * then the block kernel, which reads the amax, computes S_enc exactly as nvfp4_tensor_scale and
 * writes nothing when the amax is non-finite; then one readback of the amax (and the denormal
 * probe) through cuda_ctx.host_result and one stream synchronization; S_dec is computed on the
 * host by the same function. NaN input: NaN returned, xq untouched. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda.h"

/* ---- exact scalar arithmetic, the same on host and device ----------------------------------- */

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

/* nvfp4_tensor_scale: S_enc = min(448*6 / amax, FLT_MAX), 1 when amax = 0 or S_enc = 0. */
struct nv_tensor_scale {
  float enc, dec;
};
__host__ __device__ static inline struct nv_tensor_scale nv_tensor_scale(float amax) {
  float enc = fminf(NV_DIV(448.0f * 6.0f, amax), FLT_MAX);
  if (amax == 0.0f || enc == 0.0f) enc = 1.0f;
  struct nv_tensor_scale ts = {enc, NV_DIV(1.0f, enc)};
  return ts;
}

/* nvfp4_e4m3_encode. The host computes, in double, e = the binade of |x| (at least -6) and
 * n = nearbyint(|x| * 2^(3-e)); here |x| * 2^(3-e) is the same exact product in fp32 (a scaling
 * by a power of two whose result lies in [0, 16]) and rintf rounds ties to even. */
__host__ __device__ static inline uint32_t nv_e4m3_encode(float x) {
  if (x != x) return 0x7f;
  const uint32_t sign = x < 0.0f ? 0x80 : 0;
  const float a = fabsf(x);
  if (a >= 448.0f) return sign | 0x7e;
  int e = (int)(nv_f2u(a) >> 23) - 127;   /* fp32 zero and subnormals: -127 */
  if (e < -6) e = -6;                     /* below 2^-6: the E4M3 subnormal binade */
  const float n = rintf(NV_MUL(a, nv_u2f((uint32_t)(127 + 3 - e) << 23)));
  return sign | (uint32_t)((e + 6) * 8 + (int)n);
}

/* nvfp4_e4m3_decode, built from bits (the host's ldexpf values are exact). */
__host__ __device__ static inline float nv_e4m3_decode(uint32_t byte) {
  const uint32_t e = byte >> 3 & 15, m = byte & 7;
  if (e == 15 && m == 7) return nv_u2f(0x7fc00000u);
  const float v = e ? nv_u2f((e + 120) << 23 | m << 20) : NV_MUL((float)m, 0x1p-9f);
  return byte & 0x80 ? -v : v;
}

/* E2M1 magnitude of index m (0..7): 0, .5, 1, 1.5, 2, 3, 4, 6, from a nibble table of 2*value. */
__host__ __device__ static inline float nv_e2m1_value(uint32_t m) {
  return (float)(0xC8643210u >> 4 * m & 15) * 0.5f;
}

/* nvfp4_e2m1_decode: -0.0 for code 8, as the host's (code & 8 ? -v : v). */
__host__ __device__ static inline float nv_e2m1_decode(uint32_t code) {
  const float v = nv_e2m1_value(code & 7);
  return code & 8 ? -v : v;
}

/* nvfp4_e2m1_encode_rn. The host's loop stops at the first midpoint that a does not pass; the
 * conditions are nested (the midpoints increase), so that index is the number that hold. NaN
 * passes none and gives 0. */
__host__ __device__ static inline uint32_t nv_e2m1_encode_rn(float x) {
  const float a = fabsf(x);
  const uint32_t m = (uint32_t)(a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) +
                     (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return (x < 0.0f ? 8u : 0u) | m;
}

/* nvfp4_e2m1_encode_sr. The host rounds up iff (double)u < ldexp(frac, 32); frac * 2^32 is exact
 * in fp32 (frac is exact and < 1), so that is u < ceil(frac * 2^32) in 64-bit integers. */
__host__ __device__ static inline uint32_t nv_e2m1_encode_sr(float x, uint32_t u) {
  if (x != x) return 0;
  const float a = fabsf(x);
  uint32_t m = 7;
  if (a < 6.0f) {
    m = (uint32_t)(a >= 0.5f) + (a >= 1.0f) + (a >= 1.5f) + (a >= 2.0f) + (a >= 3.0f) +
        (a >= 4.0f);
    /* (a - lo) / (hi - lo): a - lo is exact (Sterbenz, or lo = 0) and the gap is a power of
     * two, so multiplying by its inverse gives the same correctly rounded quotient, cheaper */
    const float inv_gap = m < 4 ? 2.0f : m < 6 ? 1.0f : 0.5f;
    const float frac = NV_MUL(NV_SUB(a, nv_e2m1_value(m)), inv_gap);
    const float scaled = NV_MUL(frac, 4294967296.0f);
    if ((uint64_t)u < (uint64_t)ceilf(scaled)) m++;
  }
  return (x < 0.0f ? 8u : 0u) | m;
}

/* nvfp4_philox4x32_10 with counter {ctr lo, ctr hi, 0, 0} and key {seed lo, seed hi}. */
__host__ __device__ static inline void nv_philox(uint32_t out[4], uint64_t ctr, uint64_t seed) {
  uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
NV_UNROLL
  for (int round = 0; round < 10; round++) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* A block's scale from its amax, as nvfp4_quantize: s_b = E4M3(amax_b * enc_over_6) (returned
 * as its value) and the element factor enc_b = min(1 / (s_b * S_dec), FLT_MAX). */
__host__ __device__ static inline float nv_block_scale(float amax_b, float enc_over_6, float dec,
                                                      float *enc_b) {
  const float s = nv_e4m3_decode(nv_e4m3_encode(NV_MUL(amax_b, enc_over_6)));
  *enc_b = fminf(NV_DIV(1.0f, NV_MUL(s, dec)), FLT_MAX);
  return s;
}

/* q * s_b of the 4 elements with flat indices 4*quad .. 4*quad+3 (one Philox draw serves them). */
__host__ __device__ static inline void nv_quantize4(float out[4], const float v[4], float s,
                                                    float enc_b, int stochastic, uint64_t seed,
                                                    uint64_t quad) {
  uint32_t code[4];
  if (stochastic) {
    uint32_t u[4];
    nv_philox(u, quad, seed);
NV_UNROLL
    for (int j = 0; j < 4; j++) code[j] = nv_e2m1_encode_sr(NV_MUL(v[j], enc_b), u[j]);
  } else {
NV_UNROLL
    for (int j = 0; j < 4; j++) code[j] = nv_e2m1_encode_rn(NV_MUL(v[j], enc_b));
  }
NV_UNROLL
  for (int j = 0; j < 4; j++) out[j] = NV_MUL(nv_e2m1_decode(code[j]), s);
}

/* max of the bits of |v| over 4 values */
__host__ __device__ static inline uint32_t nv_absmax4(const float v[4]) {
  uint32_t m = 0;
NV_UNROLL
  for (int j = 0; j < 4; j++) {
    const uint32_t b = nv_f2u(v[j]) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

/* The RHT's butterfly for a value whose partner sits h places away: the lower index gets a + b,
 * the upper a - b, where a is the lower's value (nvfp4_rht.c's inner loop). */
__host__ __device__ static inline float nv_butterfly(float mine, float partner, int upper) {
  return upper ? NV_SUB(partner, mine) : NV_ADD(mine, partner);
}

/* Signs and the two in-register butterfly stages (h = 1, 2) of the 4 values of tile lane ql
 * (elements 4*ql .. 4*ql+3 of the tile). */
__host__ __device__ static inline void nv_rht_local(float v[4], uint32_t signs, int ql) {
NV_UNROLL
  for (int j = 0; j < 4; j++) v[j] = nv_u2f(nv_f2u(v[j]) ^ (signs >> (4 * ql + j) & 1u) << 31);
NV_UNROLL
  for (int h = 1; h < 4; h *= 2) {
    float w[4];
NV_UNROLL
    for (int j = 0; j < 4; j++) w[j] = nv_butterfly(v[j], v[j ^ h], j & h);
NV_UNROLL
    for (int j = 0; j < 4; j++) v[j] = w[j];
  }
}

/* ---- device helpers ------------------------------------------------------------------------- */


template <bool VEC>
__device__ __forceinline__ void nv_load4(float v[4], const float *p) {
  if (VEC) {
    const float4 t = *reinterpret_cast<const float4 *>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
NV_UNROLL
    for (int j = 0; j < 4; j++) v[j] = p[j];
  }
}

template <bool VEC>
__device__ __forceinline__ void nv_store4(float *p, const float v[4]) {
  if (VEC) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
NV_UNROLL
    for (int j = 0; j < 4; j++) p[j] = v[j];
  }
}

enum { NV_THREADS = 256, NV_WARPS = NV_THREADS / 32 };

/* ---- kernels -------------------------------------------------------------------------------- */

/* state[0] = max over the tensor of the bits of |x| (atomicMax of per-block maxima; zeroed by the
 * caller); state[1] = bits of probe * 0.5, probe = FLT_MIN: 0x00400000 unless denormals flush. */
template <bool VEC>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_amax_kernel(uint32_t *state, const float *x, size_t nquads, float probe) {
  uint32_t m = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (; q + 3 * stride < nquads; q += 4 * stride) {   /* 4 loads in flight */
    float v[4][4];
    NV_UNROLL
    for (int j = 0; j < 4; j++) nv_load4<VEC>(v[j], x + 4 * (q + j * stride));
    NV_UNROLL
    for (int j = 0; j < 4; j++) {
      const uint32_t b = nv_absmax4(v[j]);
      m = b > m ? b : m;
    }
  }
  for (; q < nquads; q += stride) {
    float v[4];
    nv_load4<VEC>(v, x + 4 * q);
    const uint32_t b = nv_absmax4(v);
    m = b > m ? b : m;
  }
  __shared__ uint32_t warp_max[NV_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  m = __reduce_max_sync(0xffffffffu, m);
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < NV_WARPS ? warp_max[lane] : 0;
    m = __reduce_max_sync(0xffffffffu, m);
    if (lane == 0) atomicMax(state, m);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) state[1] = nv_f2u(__fmul_rn(probe, 0.5f));
}

/* The tensor scale's factors from the amax the previous kernel left; false when it is
 * non-finite (then the kernel writes nothing). */
__device__ __forceinline__ bool nv_read_scale(const uint32_t *state, float *enc_over_6,
                                              float *dec) {
  const uint32_t amax = state[0];
  if (amax >= 0x7f800000u) return false;
  const struct nv_tensor_scale ts = nv_tensor_scale(nv_u2f(amax));
  *enc_over_6 = __fmul_rn(ts.enc, 1.0f / 6.0f);
  *dec = ts.dec;
  return true;
}

/* 1x16 blocks: the tensor is a flat run of 16-element blocks (cols % 16 == 0). Thread q holds
 * elements 4q .. 4q+3 (and q is their Philox counter); the 4 threads of a block are one quad of
 * a warp. nquads % 4 == 0 and the grid stride is a multiple of 32, so a quad's lanes are in or
 * out of range together. */
template <bool VEC, bool SR>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_qdq_1x16_kernel(float *xq, const float *x, size_t nquads, const uint32_t *state,
                          uint64_t seed) {
  float enc_over_6, dec;
  if (!nv_read_scale(state, &enc_over_6, &dec)) return;
  const uint32_t lane = threadIdx.x & 31, quad_mask = 0xfu << (lane & ~3u);
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < nquads; q += stride) {
    float v[4], out[4], enc_b;
    nv_load4<VEC>(v, x + 4 * q);
    uint32_t m = nv_absmax4(v), o;
    o = __shfl_xor_sync(quad_mask, m, 1);
    m = o > m ? o : m;
    o = __shfl_xor_sync(quad_mask, m, 2);
    m = o > m ? o : m;
    const float s = nv_block_scale(nv_u2f(m), enc_over_6, dec, &enc_b);
    nv_quantize4(out, v, s, enc_b, SR, seed, q);
    nv_store4<VEC>(xq + 4 * q, out);
  }
}

/* 16x16 tiles: one warp per tile (warp-uniform loop). Lane l holds row l/2 of the tile as two
 * quads, columns 4*(l&1) .. +3 and 8 + 4*(l&1) .. +3, so that each load instruction of a lane
 * pair covers one whole 32-byte sector. tiles < 2^32 (checked by the caller). */
template <bool VEC, bool SR>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_qdq_16x16_kernel(float *xq, const float *x, uint32_t cols, uint32_t tiles,
                           const uint32_t *state, uint64_t seed) {
  float enc_over_6, dec;
  if (!nv_read_scale(state, &enc_over_6, &dec)) return;
  const uint32_t lane = threadIdx.x & 31, tiles_per_row = cols / 16;
  const uint32_t warps = gridDim.x * NV_WARPS;
  for (uint32_t t = blockIdx.x * NV_WARPS + (threadIdx.x >> 5); t < tiles; t += warps) {
    const uint32_t bi = t / tiles_per_row, bj = t - bi * tiles_per_row;
    const size_t i0 = ((size_t)bi * 16 + (lane >> 1)) * cols + bj * 16 + 4 * (lane & 1);
    float v[2][4], out[4], enc_b;
    nv_load4<VEC>(v[0], x + i0);
    nv_load4<VEC>(v[1], x + i0 + 8);
    uint32_t m = nv_absmax4(v[0]), m1 = nv_absmax4(v[1]);
    m = __reduce_max_sync(0xffffffffu, m1 > m ? m1 : m);
    const float s = nv_block_scale(nv_u2f(m), enc_over_6, dec, &enc_b);
    NV_UNROLL
    for (int h = 0; h < 2; h++) {
      nv_quantize4(out, v[h], s, enc_b, SR, seed, (i0 + 8 * h) / 4);
      nv_store4<VEC>(xq + i0 + 8 * h, out);
    }
  }
}

/* RHT: tile t (16 floats at 16t, a flat run as nvfp4_rht.c walks it) is held by the 4 threads of
 * a quad, 4 values each; stages h = 1, 2 in registers, h = 4, 8 across lanes. */
template <bool VEC>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_rht_kernel(float *out, const float *x, size_t nquads, uint32_t signs) {
  const uint32_t lane = threadIdx.x & 31, quad_mask = 0xfu << (lane & ~3u);
  const int ql = (int)(lane & 3);
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < nquads; q += stride) {
    float v[4];
    nv_load4<VEC>(v, x + 4 * q);
    nv_rht_local(v, signs, ql);
NV_UNROLL
    for (int hl = 1; hl < 4; hl *= 2) {   /* h = 4 * hl elements = hl lanes */
NV_UNROLL
      for (int j = 0; j < 4; j++)
        v[j] = nv_butterfly(v[j], __shfl_xor_sync(quad_mask, v[j], hl), ql & hl);
    }
NV_UNROLL
    for (int j = 0; j < 4; j++) v[j] = __fmul_rn(0.25f, v[j]);
    nv_store4<VEC>(out + 4 * q, v);
  }
}

/* ---- ops ------------------------------------------------------------------------------------ */

static int nv_grid(size_t threads) { return cuda_blocks(threads); }

float cuda_nvfp4_quantize_dequantize(float *xq, const float *x, int rows, int cols,
                                     int tiles_16x16, int stochastic, uint64_t seed) {
  /* the CPU's shape rule and answer (NaN, nothing written) */
  const int block_rows = tiles_16x16 ? 16 : 1;
  if (rows < 0 || cols < 0 || cols % 16 || rows % block_rows) {
    fprintf(stderr,
            "cuda_nvfp4_quantize_dequantize: shape [%d, %d] refused: cols (and rows for 16x16 "
            "tiles) must be non-negative multiples of 16\n",
            rows, cols);
    return NAN;
  }
  const size_t n = (size_t)rows * cols, nquads = n / 4;
  if (n == 0) return nv_tensor_scale(0.0f).dec;   /* amax 0: S_dec = 1, nothing to write */
  cudaStream_t st = cuda_ctx.stream;
  uint32_t *state = (uint32_t *)cuda_scratch(2 * sizeof(uint32_t), "nvfp4 amax");

  CUDA_CHECK(cudaMemsetAsync(state, 0, 2 * sizeof(uint32_t), st));
  int amax_blocks = nv_grid(nquads), cap = 8 * (cuda_ctx.sm_count > 0 ? cuda_ctx.sm_count : 132);
  if (amax_blocks > cap) amax_blocks = cap;
  if (cuda_aligned16(x))
    nvfp4_amax_kernel<true><<<amax_blocks, NV_THREADS, 0, st>>>(state, x, nquads, FLT_MIN);
  else
    nvfp4_amax_kernel<false><<<amax_blocks, NV_THREADS, 0, st>>>(state, x, nquads, FLT_MIN);
  CUDA_LAUNCHED("nvfp4_amax_kernel");

  const bool vec = cuda_aligned16(x) && cuda_aligned16(xq), sr = stochastic != 0;
#define NV_LAUNCH(kernel, grid, ...)                                                   \
  do {                                                                                 \
    if (vec && sr) kernel<true, true><<<grid, NV_THREADS, 0, st>>>(__VA_ARGS__);       \
    else if (vec) kernel<true, false><<<grid, NV_THREADS, 0, st>>>(__VA_ARGS__);       \
    else if (sr) kernel<false, true><<<grid, NV_THREADS, 0, st>>>(__VA_ARGS__);        \
    else kernel<false, false><<<grid, NV_THREADS, 0, st>>>(__VA_ARGS__);               \
    CUDA_LAUNCHED(#kernel);                                                            \
  } while (0)
  if (tiles_16x16) {
    const size_t tiles = n / 256;
    if (tiles > UINT32_MAX)
      cuda_fail("cuda_nvfp4_quantize_dequantize", "more than 2^32 16x16 tiles", __FILE__, __LINE__);
    NV_LAUNCH(nvfp4_qdq_16x16_kernel, nv_grid(tiles * 32), xq, x, (uint32_t)cols,
              (uint32_t)tiles, state, seed);
  } else {
    NV_LAUNCH(nvfp4_qdq_1x16_kernel, nv_grid(nquads), xq, x, nquads, state, seed);
  }
#undef NV_LAUNCH

  CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.host_result, state, 2 * sizeof(uint32_t),
                             cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  uint32_t got[2];
  memcpy(got, cuda_ctx.host_result, sizeof got);
  if (got[1] != 0x00400000u)
    cuda_fail("cuda_nvfp4_quantize_dequantize",
              "the device flushed a denormal to zero: the NVFP4 kernels must be built without "
              "-ftz=true or --use_fast_math to match the CPU bit for bit",
              __FILE__, __LINE__);
  if (got[0] >= 0x7f800000u) return NAN;   /* NaN or Inf in x: nothing was written */
  return nv_tensor_scale(nv_u2f(got[0])).dec;
}

void cuda_nvfp4_rht(float *out, const float *x, int rows, int cols, uint16_t signs) {
  /* nvfp4_rht.c's walk: rows * (cols / 16) tiles of 16 consecutive floats */
  if (rows <= 0 || cols < 16) return;
  const size_t nquads = (size_t)rows * (size_t)(cols / 16) * 4;
  cudaStream_t st = cuda_ctx.stream;
  if (cuda_aligned16(x) && cuda_aligned16(out))
    nvfp4_rht_kernel<true><<<nv_grid(nquads), NV_THREADS, 0, st>>>(out, x, nquads, signs);
  else
    nvfp4_rht_kernel<false><<<nv_grid(nquads), NV_THREADS, 0, st>>>(out, x, nquads, signs);
  CUDA_LAUNCHED("nvfp4_rht_kernel");
}

void cuda_nvfp4_gemm(float *c, const float *a, float s_dec_a, const float *b, float s_dec_b,
                     int m, int n, int k, float beta) {
  /* as nvfp4_gemm.c: alpha is the fp32 product of the two tensor scales; leading dimensions of
   * at least 1 (cuda_gemm returns for m or n = 0 and gives c = beta * c for k = 0). The
   * operands q * s_b have at most 6 significant bits, so TF32 (when the mode allows it) reads
   * them exactly. */
  const float alpha = s_dec_a * s_dec_b;
  const int ldk = k > 1 ? k : 1, ldn = n > 1 ? n : 1;
  cuda_gemm(0, 1, m, n, k, alpha, a, ldk, b, ldk, beta, c, ldn, DT_F32, DT_F32);
}
