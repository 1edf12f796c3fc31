/* The CUDA backend's NVFP4 ops (kernels/ops.h; numerics in kernels/nvfp4.h):
 *  - cuda_nvfp4_quantize: xq = q * s_b in the activation dtype (NVFP4_ROWS_INT: the integer
 *    operand of cuda_nvfp4_gemv_packed), byte-identical to the CPU's cpu_nvfp4_quantize on the
 *    fp32 values of x, and S_dec written to device memory;
 *  - cuda_nvfp4_quantize_rows_cols: its NVFP4_ROWS and NVFP4_COLS calls on one x, fused;
 *  - cuda_nvfp4_pack: the same quantization of fp32 weights (NVFP4_ROWS or NVFP4_TILES, round
 *    to nearest) written as packed E2M1 codes and E4M3 scale bytes, the bytes of the CPU's
 *    nvfp4_quantize, for cuda_nvfp4_gemv_packed (cuda_linear.cu);
 *  - cuda_nvfp4_gemm: the emulated NVFP4 GEMM, alpha = S_dec,a * S_dec,b read by cuBLASLt from
 *    device memory, so no call waits for the host.
 *
 * How exactness is kept. Every step is the fp32 operation the host code performs, in the same
 * order, written with __fmul_rn/__fdiv_rn/__fadd_rn/__fsub_rn so that nvcc neither contracts a
 * product into an FMA nor approximates a division. The host's E4M3 and E2M1 conversions (double
 * frexp/ldexp/nearbyint, midpoint loops, a double comparison for stochastic rounding) are
 * reproduced by fp32/integer code that is exact on the same inputs: the E4M3 step count is a
 * product by a power of two (exact) rounded with rintf (ties to even, as nearbyint); an E2M1
 * value is the element scaled by the inverse of the grid's local step (a power of two), rounded
 * to an integer (rintf; floorf and the draw for stochastic rounding) and scaled back, which is
 * what the host's midpoint and threshold walks choose; the stochastic comparison
 * u < frac * 2^32 is u < ceil(frac * 2^32) in 32-bit integers (frac * 2^32 is exact in fp32).
 * These scalar functions are __host__ __device__ so that a host program can compare them, and
 * the kernels' block logic, with the CPU quantizer byte for byte. bf16 inputs are widened to
 * fp32 exactly, and the outputs q * s_b (at most 6 significant bits, exponents within fp32's)
 * are exact in bf16.
 * Denormals must be kept (no -ftz, no --use_fast_math): the first call checks once, on the
 * device, that FLT_MIN * 0.5 does not flush, and dies if it does.
 * Maxima are taken on the bits of |x| as unsigned integers: order-independent, and the bits of
 * a non-finite |x| (0x7f800000 and up) exceed every finite one, so the tensor amax doubles as
 * the non-finite flag.
 *
 * One call of cuda_nvfp4_quantize, all on cuda_ctx.stream, nothing returned to the host:
 *   1. the amax kernel: a grid of one resident wave (at most a few hundred to a thousand
 *      blocks) writes each block's maximum over its share of x (for NVFP4_COLS with the RHT:
 *      of the transformed values, computed as the quantize kernel computes them) into its own
 *      word of scratch: no memset, no atomics, nothing left over from a previous call;
 *   2. the layout's quantize kernel, also one resident wave: each block first reduces those
 *      per-block maxima (a few KB from L2), computes S_enc exactly as nvfp4_tensor_scale, and
 *      its block 0 / thread 0 writes *dec: S_dec, or NaN when the amax is non-finite, and then
 *      no thread writes xq.
 * Bytes moved: the amax kernel reads x, the quantize kernel reads x again and writes xq.
 * A small NVFP4_ROWS or NVFP4_ROWS_INT x (decoding's few token rows, CUDA_NVFP4_SMALL_VALUES)
 * takes one kernel of one block instead, which does both passes and the reduction between them
 * itself.
 * cuda_nvfp4_quantize_rows_cols does the same for an output gradient's two operands: one amax
 * kernel takes both maxima from one read of x, one quantize kernel writes both operands from
 * another (reads 2 |x|, writes 2 |x| in the activation dtype, where two calls read 4 |x|).
 * cuda_nvfp4_quantize_weight runs the quantize kernel alone, on the per-chunk maxima AdamW wrote
 * with the masters (ops.h adamw_update) in place of the amax kernel's: w is read once.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_gemv.cuh"
#include "kernels/cuda/cuda_nvfp4.cuh"

/* ---- exact scalar arithmetic, the same on host and device (more in cuda_nvfp4.cuh) ---------- */

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

/* The E2M1 grid's step around a (0.5 below 2, 1 below 4, 2 above) as k = 1 / step and the
 * step itself: the kernels round a * k to an integer and scale back by the step, both exact
 * (powers of two; the integers stay below 16), which replaces the host's table walks. */
__host__ __device__ static inline void nv_e2m1_step(float a, float *k, float *step) {
  const bool low = a < 2.0f, mid = a < 4.0f;
  *k = low ? 2.0f : mid ? 1.0f : 0.5f;
  *step = low ? 0.5f : mid ? 1.0f : 2.0f;
}

/* decode(nvfp4_e2m1_encode_rn(y)): the nearest E2M1 value, saturating at 6, with the sign of
 * (y < 0) (so -0.0 for a negative y that rounds to zero, +0 for y = -0.0). The host's ties go
 * to the even code, and a code's parity is that of its value's multiple of the local step
 * (0, .5, 1, 1.5 | 2, 3, 4 | 4, 6 are codes 0..7), so rintf (ties to even) of a * k is the same
 * choice, the ties 1.75 and 3.5 between two steps included. Clamping a to 6 first saturates
 * (6 * 0.5 = 3 is exact). y is finite or ±inf (x and the block factor are finite); a NaN would
 * give 6 where the host gives 0. */
__host__ __device__ static inline float nv_e2m1_rn(float y) {
  const float a = fminf(fabsf(y), 6.0f);
  float k, step;
  nv_e2m1_step(a, &k, &step);
  const float v = NV_MUL(rintf(NV_MUL(a, k)), step);
  return y < 0.0f ? -v : v;
}

/* decode(nvfp4_e2m1_encode_sr(y, u)). With t = a * k (exact): the host's lower neighbour is
 * floor(t) * step and its fraction (a - lo) / (hi - lo) is t - floor(t), exact (Sterbenz, or
 * floor(t) = 0); it rounds up iff u < frac * 2^32, which for an integer u is
 * u < ceil(frac * 2^32), a 32-bit integer (frac <= 1 - 2^-24). a clamped to 6 gives t = 3,
 * frac 0: 6, never rounded up, as the host's saturation. */
__host__ __device__ static inline float nv_e2m1_sr(float y, uint32_t u) {
  const float a = fminf(fabsf(y), 6.0f);
  float k, step;
  nv_e2m1_step(a, &k, &step);
  const float t = NV_MUL(a, k), n = floorf(t);
  const float scaled = NV_MUL(NV_SUB(t, n), 4294967296.0f);
#ifdef __CUDA_ARCH__
  const uint32_t threshold = __float2uint_ru(scaled);
#else
  const uint32_t threshold = (uint32_t)ceilf(scaled);
#endif
  const float v = NV_MUL(u < threshold ? NV_ADD(n, 1.0f) : n, step);
  return y < 0.0f ? -v : v;
}

/* nvfp4_e2m1_encode_rn's code of an E2M1 value q (nv_e2m1_rn's or nv_e2m1_sr's; -0.0, a
 * negative value rounded to zero, is code 8): the sign bit, then the index of |q| in 0, .5, 1,
 * 1.5, 2, 3, 4, 6, which is 2|q| below 2, |q| + 2 below 4 and |q|/2 + 4 above (exact). */
__host__ __device__ static inline uint32_t nv_e2m1_code(float q) {
  const float a = fabsf(q);
  const float i = a < 2.0f ? a * 2.0f : a < 4.0f ? a + 2.0f : a * 0.5f + 4.0f;
  return (nv_f2u(q) >> 28 & 8u) | (uint32_t)i;
}

/* A block's scale, as nvfp4_quantize derives it from the block's amax: byte = E4M3(amax_b *
 * enc_over_6), s its value s_b, and the element factor enc_b = min(1 / (s_b * S_dec), FLT_MAX). */
struct nv_block {
  float s, enc_b;
  uint32_t byte;
};
__host__ __device__ static inline struct nv_block nv_block_scale(float amax_b, float enc_over_6,
                                                                 float dec) {
  struct nv_block b;
  b.byte = nv_e4m3_encode(NV_MUL(amax_b, enc_over_6));
  b.s = nv_e4m3_decode(b.byte);
  b.enc_b = fminf(NV_DIV(1.0f, NV_MUL(b.s, dec)), FLT_MAX);
  return b;
}

/* The E2M1 values q of the 4 elements v * enc_b with flat indices 4*quad .. 4*quad+3 (one
 * Philox draw serves them). */
__host__ __device__ static inline void nv_e2m1_4(float q[4], const float v[4], float enc_b,
                                                 int stochastic, uint64_t seed, uint64_t quad) {
  if (stochastic) {
    uint32_t u[4];
    nv_philox(u, quad, seed);
NV_UNROLL
    for (int j = 0; j < 4; j++) q[j] = nv_e2m1_sr(NV_MUL(v[j], enc_b), u[j]);
  } else {
NV_UNROLL
    for (int j = 0; j < 4; j++) q[j] = nv_e2m1_rn(NV_MUL(v[j], enc_b));
  }
}

/* q * s_b of those 4 elements in block b */
__host__ __device__ static inline void nv_quantize4(float out[4], const float v[4],
                                                    const struct nv_block &b, int stochastic,
                                                    uint64_t seed, uint64_t quad) {
  nv_e2m1_4(out, v, b.enc_b, stochastic, seed, quad);
NV_UNROLL
  for (int j = 0; j < 4; j++) out[j] = NV_MUL(out[j], b.s);
}

/* nvfp4_rht on one tile of 16 values: the signs (a flip of the sign bit, as the host's
 * negation), the 4 butterfly stages h = 1, 2, 4, 8 (each pair (j, j + h) becomes a + b, a - b,
 * one rounding each; the pairs of a stage are independent, so their order is free), then the
 * scaling by 1/4 (a single rounded product, as the host's 0.25f * v). */
__host__ __device__ static inline void nv_rht16(float v[16], uint32_t signs) {
NV_UNROLL
  for (int i = 0; i < 16; i++) v[i] = nv_u2f(nv_f2u(v[i]) ^ (signs >> i & 1u) << 31);
NV_UNROLL
  for (int stage = 0; stage < 4; stage++) {
    const int h = 1 << stage;
NV_UNROLL
    for (int p = 0; p < 8; p++) {
      const int j = p / h * 2 * h + p % h;
      const float a = v[j], b = v[j + h];
      v[j] = NV_ADD(a, b);
      v[j + h] = NV_SUB(a, b);
    }
  }
NV_UNROLL
  for (int i = 0; i < 16; i++) v[i] = NV_MUL(0.25f, v[i]);
}


/* ---- device helpers ------------------------------------------------------------------------- */

enum { NV_THREADS = CUDA_THREADS, NV_WARPS = NV_THREADS / 32 };

/* An NVFP4_ROWS (or NVFP4_ROWS_INT) x of at most CUDA_NVFP4_SMALL_VALUES values (cuda.h) is
 * quantized by one kernel of one block (nvfp4_rows_small_kernel), not by the amax and rows
 * kernels. Decoding's inputs are such at Qwen3-4B and 8B's widths (1 to 4 token rows of at most
 * 12288 values: 49152 for 8B's down projection at 4 rows; 14B's at 4 rows and 32B's at 3 or 4
 * take the two kernels); for them the two kernels ran grids of 1 to 5 blocks each, and the
 * second launch, its wait for the first and its read of the partial maxima cost more than
 * either kernel's work (bench/NOTES.md: ~1 us a launch even with PDL; a decoding layer ran 4
 * such pairs). The bound, 65536 values: a thread of the block (1024 of them, rounding to
 * nearest) then has at most 8 groups of bf16 (16 of fp32) a pass, 2 (4) trips of
 * NV_ROWS_UNROLL loads, where the two kernels' threads had 1 (2) each at that size, and x, at
 * most 128 KB in bf16, stays in the SM's L1 (256 KB on the H100/H200) for the second pass.
 * Above it the one SM's serial trips keep growing while the two kernels' grids spread over the
 * GPU. (A bound reasoned from those counts, not a measured crossover.)
 * Threads: 1024, or 512 for stochastic rounding, whose Philox draws take the rows kernel to
 * 94-98 registers: a thread of 1024 may have 64, and ptxas spilled up to 184 bytes there.
 * (Decoding rounds to nearest: 57-63 registers.) */
__host__ __device__ constexpr int nv_small_threads(bool sr) { return sr ? 512 : 1024; }

/* Groups each thread of the 1x16 kernel takes (and tiles each warp of the 16x16 kernel), all
 * loaded before any is quantized: one load per thread per trip of a grid-stride loop would
 * leave too few bytes in flight to reach the memory's rate. */
#define NV_ROWS_UNROLL 4

/* Adjacent columns of x each thread of the transposing kernels loads per row on their vector
 * path (one 4-byte bf16 pair or 8-byte fp32 pair: a warp reads 128 or 256 contiguous bytes of a
 * row, where single values gave it 64 or 128 with twice the load instructions). */
#define NV_COLS_RUN 2

/* NV_AMAX_BACKWARDS: the amax kernels walk x from its end to its start, the quantize kernels
 * from its start (grid-stride trips in both). The quantize pass then first rereads what the
 * amax pass read last, and the L2 (50 MB on the H200) still holds up to about half of it (x's
 * lines are evicted oldest first while xq's are written): of a 40 MB x, ~15-20 MB of the
 * second read comes from L2, not HBM. It also starts the amax pass on x's end, the part its
 * producer (written start to end) left in L2 last. Maxima are order-independent: no bit moves.
 *
 * Both kernels of a call are launched as programmatic dependents (cuda_launch_pdl): the amax
 * kernel's blocks are scheduled while the op before it finishes, and the quantize kernel's
 * while the amax kernel's last blocks run, so neither pays a whole launch gap; each waits in
 * pdl_wait (its first statement) for the kernel before it to finish, which makes the partial
 * maxima (and, through the amax kernel's own wait, x) visible to it. */

/* N consecutive values at p in fp32: loads of up to 16 bytes when VEC (p aligned to them) */
template <bool VEC, int N, typename T>
__device__ __forceinline__ void nv_load(float v[N], const T *p) {
  if (VEC) {
    constexpr int BYTES = N * sizeof(T) < 16 ? N * sizeof(T) : 16, W = BYTES / sizeof(T);
    struct alignas(BYTES) chunk {
      T v[W];
    };
NV_UNROLL
    for (int i = 0; i < N / W; i++) {
      const chunk q = reinterpret_cast<const chunk *>(p)[i];
NV_UNROLL
      for (int j = 0; j < W; j++) v[i * W + j] = load_f(&q.v[j]);
    }
  } else {
NV_UNROLL
    for (int j = 0; j < N; j++) v[j] = load_f(p + j);
  }
}

/* N consecutive values at p as T: stores of up to 16 bytes when VEC (p aligned to them) */
template <bool VEC, int N, typename T>
__device__ __forceinline__ void nv_store(T *p, const float v[N]) {
  if (VEC) {
    constexpr int BYTES = N * sizeof(T) < 16 ? N * sizeof(T) : 16, W = BYTES / sizeof(T);
    struct alignas(BYTES) chunk {
      T v[W];
    };
NV_UNROLL
    for (int i = 0; i < N / W; i++) {
      chunk q;
NV_UNROLL
      for (int j = 0; j < W; j++) store_f(&q.v[j], v[i * W + j]);
      reinterpret_cast<chunk *>(p)[i] = q;
    }
  } else {
NV_UNROLL
    for (int j = 0; j < N; j++) store_f(p + j, v[j]);
  }
}

/* What the rows and tiles kernels write for the N elements from flat index i0 of x (i0 % 4 ==
 * 0, all in one block b), given their E2M1 values q: */
/* nvfp4_quantize: xq = q * s_b in Tout, with vector stores when VEC (xq aligned to them) */
template <typename Tout, bool VEC>
struct nv_write_act {
  Tout *xq;
  template <int N>
  __device__ __forceinline__ void put(size_t i0, const float q[N], const nv_block &b) const {
    float out[N];
NV_UNROLL
    for (int j = 0; j < N; j++) out[j] = NV_MUL(q[j], b.s);
    nv_store<VEC, N>(xq + i0, out);
  }
};

/* nvfp4_pack: the codes, two a byte (element 2i in the low nibble), and the E4M3 byte of each
 * 1x16 block of x's rows, from the thread holding its first element (a block starts at a flat
 * index i0 % 16 == 0, as cols % 16 == 0; in a 16x16 tile each row's block is the tile's). Byte
 * stores: no alignment asked of codes or scales (pack runs once a weight, when loading). */
struct nv_write_packed {
  uint8_t *codes, *scales;
  template <int N>
  __device__ __forceinline__ void put(size_t i0, const float q[N], const nv_block &b) const {
NV_UNROLL
    for (int j = 0; j < N; j += 2)
      codes[i0 / 2 + j / 2] = (uint8_t)(nv_e2m1_code(q[j]) | nv_e2m1_code(q[j + 1]) << 4);
    if (i0 % 16 == 0) scales[i0 / 16] = (uint8_t)b.byte;
  }
};

/* The integer operand as gemv_nvfp4 reads it (cuda_gemv.cuh; ops.h NVFP4_ROWS_INT; op.k 16-byte
 * aligned): 2q as int8, N values a thread in one store, and each block's s_b from the thread
 * holding its first element. */
struct nv_write_i8 {
  gemv_i8_operand op;
  template <int N>
  __device__ __forceinline__ void put(size_t i0, const float q[N], const nv_block &b) const {
    static_assert(N == 4 || N == 8, "one or two words of int8, one store");
    uint32_t w[N / 4];
NV_UNROLL
    for (int j = 0; j < N / 4; j++) {
      w[j] = 0;
NV_UNROLL
      for (int e = 0; e < 4; e++)
        w[j] |= (uint32_t)(uint8_t)(int8_t)__float2int_rn(2.0f * q[4 * j + e]) << 8 * e;
    }
    if constexpr (N == 8) *reinterpret_cast<uint2 *>(op.k + i0) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<uint32_t *>(op.k + i0) = w[0];
    if (i0 % 16 == 0) op.s[i0 / 16] = b.s;
  }
};

/* C adjacent values of x, moved by one load of C * sizeof(T) bytes */
template <typename T, int C>
struct alignas(C * sizeof(T)) nv_run {
  T v[C];
};

/* x[16g + r][c .. c + C - 1], r = 0..15, of x [rows, cols]: tile g of rows c .. c + C - 1 of xᵀ
 * (x + c aligned to C values). The lanes of a warp take consecutive runs of C columns, so each
 * of the 16 loads is coalesced. */
template <int C, typename T>
__device__ __forceinline__ void nv_load_cols(nv_run<T, C> run[16], const T *x, uint32_t cols,
                                             uint32_t c, uint32_t g) {
  const nv_run<T, C> *p = reinterpret_cast<const nv_run<T, C> *>(x + (size_t)16 * g * cols + c);
NV_UNROLL
  for (int r = 0; r < 16; r++) run[r] = p[(size_t)r * (cols / C)];
}

/* column k of those 16 runs in fp32 */
template <int C, typename T>
__device__ __forceinline__ void nv_col16(float v[16], const nv_run<T, C> run[16], int k) {
NV_UNROLL
  for (int r = 0; r < 16; r++) v[r] = load_f(&run[r].v[k]);
}

/* The amax pass's per-block maxima: max[k][b] for b < n is block b's maximum of the bits of |x|
 * (k = 0) or of the second set of values an amax kernel reduces (k = 1). Every block of the
 * amax kernel writes its own words, so no call needs them cleared (nor sees a previous call's),
 * and the quantize kernels reduce them again, block by block: max is order-independent. */
struct nv_parts {
  const uint32_t *max[2];
  uint32_t n;
};

/* part[k * gridDim.x + blockIdx.x] = the largest m[k] of the block (every thread calls this) */
template <int K>
__device__ __forceinline__ void nv_block_amax(uint32_t *part, uint32_t m[K]) {
  nv_block_max<K, NV_WARPS>(m);
  if (threadIdx.x == 0)
NV_UNROLL
    for (int k = 0; k < K; k++) part[k * gridDim.x + blockIdx.x] = m[k];
}

/* One operand's tensor scale, as nvfp4_quantize derives it from the amax. */
struct nv_scale {
  float enc_over_6, dec;
  bool finite;   /* false: the amax is non-finite and the operand is not written */
};

/* The tensor scale of an operand whose amax has the bits `amax` (those of a non-finite one:
 * 0x7f800000 and up); block 0 / thread 0 writes *dec: S_dec, or NaN for a non-finite amax. */
__device__ __forceinline__ nv_scale nv_scale_of(uint32_t amax, float *dec) {
  const bool finite = amax < 0x7f800000u;
  const struct nv_tensor_scale ts = nv_tensor_scale(nv_u2f(finite ? amax : 0u));
  if (blockIdx.x == 0 && threadIdx.x == 0) *dec = finite ? ts.dec : nv_u2f(0x7fc00000u);
  nv_scale sc;
  sc.enc_over_6 = __fmul_rn(ts.enc, 1.0f / 6.0f);
  sc.dec = ts.dec;
  sc.finite = finite;
  return sc;
}

/* The K tensor scales of a quantize kernel from parts.max[k] (every thread calls this, before
 * any returns; nv_scale_of writes *dec[k]). Each block reads the n partial maxima (a few KB,
 * from L2) once: the grids are one resident wave. */
template <int K>
__device__ __forceinline__ void nv_read_scales(nv_scale sc[K], const nv_parts &parts,
                                               float *const dec[K]) {
  uint32_t m[K];
NV_UNROLL
  for (int k = 0; k < K; k++) m[k] = 0;
  /* NV_PARTS_AHEAD predicated loads a thread issues before it takes any maximum: n (the amax
   * grid, at most 8 blocks an SM: 1056 on the H200; or AdamW's parts, up to 1520 a Qwen3-4B
   * matrix) takes at most two L2 round trips before the block can start, where a loop of
   * load-then-max waited for each load in turn (3-5 of them).
   * 4, not 8: 8 took the bf16 rows kernel from 62 to 72 registers (4 blocks an SM to 3). */
  constexpr int NV_PARTS_AHEAD = 4;
  for (uint32_t i0 = threadIdx.x; i0 < parts.n; i0 += NV_PARTS_AHEAD * NV_THREADS) {
    uint32_t p[K][NV_PARTS_AHEAD];
NV_UNROLL
    for (int j = 0; j < NV_PARTS_AHEAD; j++) {
      const uint32_t i = i0 + j * NV_THREADS;
NV_UNROLL
      for (int k = 0; k < K; k++) p[k][j] = i < parts.n ? parts.max[k][i] : 0;
    }
NV_UNROLL
    for (int j = 0; j < NV_PARTS_AHEAD; j++)
NV_UNROLL
      for (int k = 0; k < K; k++) m[k] = max(m[k], p[k][j]);
  }
  nv_block_max<K, NV_WARPS>(m);
NV_UNROLL
  for (int k = 0; k < K; k++) sc[k] = nv_scale_of(m[k], dec[k]);
}

/* nv_read_scales of one operand */
__device__ __forceinline__ nv_scale nv_read_scale(const nv_parts &parts, float *dec) {
  nv_scale sc[1];
  float *const decs[1] = {dec};
  nv_read_scales<1>(sc, parts, decs);
  return sc[0];
}

/* The 16 values of one 1x16 block (flat index i0 of its first, i0 % 16 == 0) quantized with
 * scale sc: q * s_b into out. */
template <bool SR>
__device__ __forceinline__ void nv_quantize16(float out[16], const float v[16],
                                              const nv_scale &sc, uint64_t seed, size_t i0) {
  const nv_block b = nv_block_scale(nv_u2f(nv_absmax<16>(v)), sc.enc_over_6, sc.dec);
NV_UNROLL
  for (int j = 0; j < 4; j++) nv_quantize4(out + 4 * j, v + 4 * j, b, SR, seed, i0 / 4 + j);
}

/* ---- kernels -------------------------------------------------------------------------------- */

/* *out = the bits of probe * 0.5 with probe = FLT_MIN: 0x00400000 unless this file's code
 * flushes denormals to zero (the argument keeps the compiler from folding it). */
__global__ void nvfp4_denormal_probe_kernel(uint32_t *out, float probe) {
  *out = nv_f2u(__fmul_rn(probe, 0.5f));
}

/* The thread's max of the bits of |x| over its groups of x, a flat run of ngroups groups of
 * N = 16 / sizeof(T) values (one 16-byte load each); grid-stride with 4 loads in flight.
 * Backwards, group ngroups - 1 first (see NV_AMAX_BACKWARDS). */
template <typename T, bool VEC>
__device__ __forceinline__ uint32_t nv_amax_groups(const T *x, size_t ngroups) {
  constexpr int N = 16 / sizeof(T);
  uint32_t m = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   /* group ngroups - 1 - r */
  for (; r + 3 * stride < ngroups; r += 4 * stride) {
    float v[4][N];
NV_UNROLL
    for (int j = 0; j < 4; j++) nv_load<VEC, N>(v[j], x + (ngroups - 1 - r - j * stride) * N);
NV_UNROLL
    for (int j = 0; j < 4; j++) m = max(m, nv_absmax<N>(v[j]));
  }
  for (; r < ngroups; r += stride) {
    float v[N];
    nv_load<VEC, N>(v, x + (ngroups - 1 - r) * N);
    m = max(m, nv_absmax<N>(v));
  }
  return m;
}

/* part[blockIdx.x] = the block's max of the bits of |x| (nv_amax_groups). */
template <typename T, bool VEC>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_amax_kernel(uint32_t *part, const T *x, size_t ngroups) {
  pdl_wait();
  pdl_release();
  uint32_t m[1] = {nv_amax_groups<T, VEC>(x, ngroups)};
  nv_block_amax<1>(part, m);
}

/* The same over the RHT-transformed tiles of xᵀ (NVFP4_COLS with the transform): item t is
 * columns c .. c + C - 1 of x, c = C (t % (cols / C)), and tile g = t / (cols / C), each
 * column transformed exactly as nvfp4_cols_kernel does; K = 2 also takes the plain max of |x|
 * (the rows operand of nvfp4_quantize_rows_cols) from the same loads, into
 * part[gridDim.x + blockIdx.x]. Backwards, item items - 1 first (NV_AMAX_BACKWARDS). */
template <typename T, int K, int C>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_amax_cols_kernel(uint32_t *part, const T *x, uint32_t cols, size_t items,
                           int rht_signs) {
  uint32_t m[K];
NV_UNROLL
  for (int k = 0; k < K; k++) m[k] = 0;
  pdl_wait();
  pdl_release();
  const uint32_t runs = cols / C;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < items; r += stride) {
    const size_t t = items - 1 - r;   /* backwards (NV_AMAX_BACKWARDS) */
    const uint32_t g = (uint32_t)t / runs, c = C * ((uint32_t)t - g * runs);
    nv_run<T, C> run[16];
    nv_load_cols<C>(run, x, cols, c, g);
NV_UNROLL
    for (int k = 0; k < C; k++) {
      float v[16];
      nv_col16<C>(v, run, k);
      if (K == 2) m[K - 1] = max(m[K - 1], nv_absmax<16>(v));
      nv_rht16(v, (uint32_t)rht_signs & 0xffffu);   /* the host's (uint16_t) */
      m[0] = max(m[0], nv_absmax<16>(v));
    }
  }
  nv_block_amax<K>(part, m);
}

/* NVFP4_ROWS: x is a flat run of 16-element blocks (cols % 16 == 0), read as groups of
 * N = 16 / sizeof(Tin) values (one 16-byte load: 8 bf16 or 4 fp32). Group g (elements
 * N g .. N g + N - 1, and their N / 4 Philox counters) is held by one thread, and the
 * 16 / N groups of a block by aligned lanes, which reduce the block's amax by shuffles. A
 * thread takes NV_ROWS_UNROLL groups a grid stride apart. ngroups % (16 / N) == 0 and the
 * stride is a multiple of 32, so a block's lanes are in or out of range together. In place
 * (xq == x, same dtype) is safe: a thread reads its elements before it writes them, and no
 * other thread touches them. out writes the group's elements (nv_write_act, _packed or _i8), sc is
 * the tensor scale (finite). */
template <typename Tin, class Out, bool VEC, bool SR>
__device__ __forceinline__ void nv_rows_groups(const Out &out, const Tin *x, size_t ngroups,
                                               const nv_scale &sc, uint64_t seed) {
  constexpr int N = 16 / sizeof(Tin), LANES = 16 / N;
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t mask = ((1u << LANES) - 1) << (lane & ~(uint32_t)(LANES - 1));
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t g0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g0 < ngroups;
       g0 += NV_ROWS_UNROLL * stride) {
    float v[NV_ROWS_UNROLL][N];
NV_UNROLL
    for (int u = 0; u < NV_ROWS_UNROLL; u++)
      if (g0 + u * stride < ngroups) nv_load<VEC, N>(v[u], x + (g0 + u * stride) * N);
NV_UNROLL
    for (int u = 0; u < NV_ROWS_UNROLL; u++) {
      const size_t g = g0 + u * stride;
      if (g >= ngroups) break;
      uint32_t m = nv_absmax<N>(v[u]);
NV_UNROLL
      for (int o = 1; o < LANES; o *= 2) m = max(m, __shfl_xor_sync(mask, m, o));
      float q[N];
      const nv_block b = nv_block_scale(nv_u2f(m), sc.enc_over_6, sc.dec);
NV_UNROLL
      for (int j = 0; j < N / 4; j++)
        nv_e2m1_4(q + 4 * j, v[u] + 4 * j, b.enc_b, SR, seed, g * (N / 4) + j);
      out.template put<N>(g * N, q, b);
    }
  }
}

/* NVFP4_ROWS after the amax kernel: the tensor scale from its partial maxima, then the groups
 * (nv_rows_groups) over the grid. */
template <typename Tin, class Out, bool VEC, bool SR>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_rows_kernel(Out out, float *dec, const Tin *x, size_t ngroups, nv_parts parts,
                      uint64_t seed) {
  pdl_wait();
  pdl_release();
  const nv_scale sc = nv_read_scale(parts, dec);
  if (!sc.finite) return;
  nv_rows_groups<Tin, Out, VEC, SR>(out, x, ngroups, sc, seed);
}

/* NVFP4_ROWS of a small x (at most CUDA_NVFP4_SMALL_VALUES values, see nv_small_threads) in
 * one kernel of one block: the amax over x (nv_amax_groups), reduced in the block, the tensor
 * scale (*dec written as nvfp4_rows_kernel writes it), then the groups (nv_rows_groups): the
 * two-kernel path's arithmetic, so its bytes, and the same Philox counters (flat group
 * indices). The quantize pass reads x again, mostly from this SM's L1. In place is safe as
 * there: every read of the amax pass comes before the block's barrier (nv_block_max). */
template <typename Tin, class Out, bool VEC, bool SR>
__global__ void __launch_bounds__(nv_small_threads(SR))
    nvfp4_rows_small_kernel(Out out, float *dec, const Tin *x, size_t ngroups, uint64_t seed) {
  pdl_wait();
  pdl_release();
  uint32_t m[1] = {nv_amax_groups<Tin, VEC>(x, ngroups)};
  nv_block_max<1, nv_small_threads(SR) / 32>(m);
  const nv_scale sc = nv_scale_of(m[0], dec);
  if (!sc.finite) return;
  nv_rows_groups<Tin, Out, VEC, SR>(out, x, ngroups, sc, seed);
}

/* NVFP4_TILES: one warp per 16x16 tile (warp-uniform loop). Lane l holds row l/2 of the tile as
 * two quads, columns 4*(l&1) .. +3 and 8 + 4*(l&1) .. +3, so that each load instruction of a
 * lane pair covers one whole 32-byte sector of fp32. A warp takes NV_ROWS_UNROLL tiles a grid
 * stride apart and loads them all before it quantizes any: a single tile (1 KB of fp32 per
 * warp, then the reduction, the scale's division and the stores before the next load) kept
 * too little in flight once the grid became one resident wave. tiles < 2^28 (fewer than 2^32
 * blocks of 16, checked by the caller), so t never wraps. out writes each quad (nv_write_act or
 * _packed). */
template <typename Tin, class Out, bool VEC, bool SR>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_tiles_kernel(Out out, float *dec, const Tin *x, uint32_t cols, uint32_t tiles,
                       nv_parts parts, uint64_t seed) {
  pdl_wait();
  pdl_release();
  const nv_scale sc = nv_read_scale(parts, dec);
  if (!sc.finite) return;
  const uint32_t lane = threadIdx.x & 31, tiles_per_row = cols / 16;
  const uint32_t warps = gridDim.x * NV_WARPS;
  for (uint32_t t0 = blockIdx.x * NV_WARPS + (threadIdx.x >> 5); t0 < tiles;
       t0 += NV_ROWS_UNROLL * warps) {
    float v[NV_ROWS_UNROLL][2][4];
    size_t i0[NV_ROWS_UNROLL];
NV_UNROLL
    for (int u = 0; u < NV_ROWS_UNROLL; u++) {
      const uint32_t t = t0 + u * warps;
      if (t >= tiles) break;
      const uint32_t bi = t / tiles_per_row, bj = t - bi * tiles_per_row;
      /* the flat index of the lane's first quad; its second is 8 elements on */
      i0[u] = ((size_t)bi * 16 + (lane >> 1)) * cols + bj * 16 + 4 * (lane & 1);
      nv_load<VEC, 4>(v[u][0], x + i0[u]);
      nv_load<VEC, 4>(v[u][1], x + i0[u] + 8);
    }
NV_UNROLL
    for (int u = 0; u < NV_ROWS_UNROLL; u++) {
      if (t0 + u * warps >= tiles) break;
      uint32_t m = max(nv_absmax<4>(v[u][0]), nv_absmax<4>(v[u][1]));
      m = __reduce_max_sync(0xffffffffu, m);
      const nv_block b = nv_block_scale(nv_u2f(m), sc.enc_over_6, sc.dec);
NV_UNROLL
      for (int h = 0; h < 2; h++) {
        float q[4];
        nv_e2m1_4(q, v[u][h], b.enc_b, SR, seed, i0[u] / 4 + 2 * h);
        out.template put<4>(i0[u] + 8 * h, q, b);
      }
    }
  }
}

/* Whole-sector stores of the 1x16 blocks a warp's lanes quantized, one block a lane, each to a
 * row of its own (the transposing kernel's xq [cols, rows]). Stored by its lane, a bf16 block
 * is two 16-byte stores, so each warp store instruction touched 32 sectors and wrote half of
 * each: ncu put nvfp4_cols_kernel at 65% of the L2's throughput and 25% of DRAM's
 * (bench/NOTES.md, session 13). With STAGE (bf16 out; nvfp4_cols_kernel says where it is on)
 * a lane puts its block in the warp's shared stage (64 pieces of 16 bytes) and
 * nv_flush_blocks then moves whole blocks an instruction: in store s, lane L writes piece
 * 32 s + L, half L % 2 of lane 16 s + L / 2's block (16 whole 32-byte sectors an instruction).
 * The bytes are the lanes' own: nothing is recomputed. Without STAGE the lane stores its block. */
template <bool STAGE, bool VEC, typename Tout>
__device__ __forceinline__ void nv_put_block(Tout *dst, const float out[16], uint4 *stage) {
  if constexpr (STAGE) {
    static_assert(sizeof(Tout) == 2, "a staged block is 32 bytes");
    const uint32_t lane = threadIdx.x & 31;
    uint4 half[2];
    Tout *h = reinterpret_cast<Tout *>(half);
NV_UNROLL
    for (int j = 0; j < 16; j++) store_f(&h[j], out[j]);
    /* lanes 4-7 of each 8 write their second half first: the 8 lanes of a shared-memory phase
     * then hit 8 distinct groups of 4 banks (a 2-way conflict otherwise) */
    const uint32_t first = lane >> 2 & 1;
    stage[2 * lane + first] = first ? half[1] : half[0];
    stage[2 * lane + (first ^ 1)] = first ? half[0] : half[1];
  } else {
    nv_store<VEC, 16>(dst, out);
  }
}

/* With STAGE, the staged blocks to their rows (dst: the lane's block's first element, NULL when
 * it put none). Warp-collective: every lane calls it, after its nv_put_block if any. */
template <bool STAGE, typename Tout>
__device__ __forceinline__ void nv_flush_blocks(Tout *dst, const uint4 *stage) {
  if constexpr (STAGE) {
    const uint32_t lane = threadIdx.x & 31;
    __syncwarp();
NV_UNROLL
    for (int s = 0; s < 2; s++) {
      const uint32_t piece = 32 * s + lane;
      Tout *d = reinterpret_cast<Tout *>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(dst), piece / 2));
      if (d) reinterpret_cast<uint4 *>(d)[piece % 2] = stage[piece];
    }
    __syncwarp();   /* the next block rewrites the stage */
  }
}

/* NVFP4_COLS: xq [cols, rows] = xᵀ, RHT-transformed (rht_signs >= 0) and quantized 1x16 along
 * its rows. Item t (one thread) is C adjacent columns c .. c + C - 1 of x, c = C (t % runs)
 * with runs = cols / C, and tile g = t / runs of 16 rows: it loads x[16g .. 16g+15][c .. c+C-1]
 * (one C-value load per row, coalesced across the warp, which takes consecutive runs), and for
 * each of its columns transforms the 16 values in registers and writes xq[c + k][16g .. 16g+15],
 * one contiguous 32- or 64-byte run. Their flat indices in xq, (c + k) * rows + 16g + j
 * (rows % 16 == 0, so the run is 4 whole quads), give the Philox counters, as the CPU's
 * quantizer of the transposed tensor numbers them. C is NV_COLS_RUN on the vector path (x
 * aligned to it) and 1 on the scalar one.
 * ROWS (nvfp4_quantize_rows_cols) also writes the NVFP4_ROWS operand of x from the same loads:
 * G = 16 / C lanes cover 16 columns; items % G == 0 (runs % G == 0 as cols % 16 == 0), so the
 * warp's lanes G q .. G q + G - 1, q = 0 .. 2C - 1, hold one 16x16 tile q of x, rows
 * 16g_q .. 16g_q+15 by 16 consecutive columns from a multiple of 16 (the warp's tiles may lie
 * in two tile rows). The warp transposes its 2C tiles through shared memory: tile q is rows
 * 16 (q % 2) .. of block q / 2, a block being 32 rows padded to 17 words plus one word (545 =
 * 1 mod 32: the column writes of the C blocks and the row reads of one hit 32 distinct banks).
 * For h < C, lane L then quantizes row L of block h, row L % 16 of tile q = 2h + L / 16, one
 * whole 1x16 block, and stores it as one contiguous run, as the rows kernel would; the tile's
 * g_q and first column come from its first item, base + G q. Its scale is sc[1]
 * (parts.max[1]), the cols operand's sc[0].
 * The cols operand's blocks go out through nv_put_block and nv_flush_blocks: with STAGE (bf16
 * out on the vector path, round to nearest, no ROWS) the warp stores whole sectors, so every
 * lane runs the column loop (one without a block flushes NULL). */
template <typename Tin, typename Tout, bool VEC, bool SR, bool ROWS>
__global__ void __launch_bounds__(NV_THREADS)
    nvfp4_cols_kernel(Tout *xq, float *dec, Tout *rows_q, float *rows_dec, const Tin *x,
                      uint32_t rows, uint32_t cols, size_t items, nv_parts parts, uint64_t seed,
                      uint64_t rows_seed, int rht_signs) {
  constexpr int C = VEC ? NV_COLS_RUN : 1, G = 16 / C, BLOCK = 32 * 17 + 1;
  /* whole-sector stores only where they paid (session 13, alternately against direct stores, at
   * 2048 x 2560 / 2048 x 9728): round to nearest without ROWS 10% / 16% faster; with stochastic
   * rounding, or ROWS (the rows operand staged too), 2-9% slower: the Philox draws or the second
   * operand bind those before the L2 does, and the warp's two barriers a block cost more */
  constexpr bool STAGE = VEC && sizeof(Tout) == 2 && !SR && !ROWS;
  __shared__ float tile[ROWS ? NV_WARPS : 1][ROWS ? C * BLOCK : 1];
  __shared__ uint4 stage_all[STAGE ? NV_WARPS : 1][STAGE ? 64 : 1];
  pdl_wait();
  pdl_release();
  nv_scale sc[1 + ROWS];
  float *const decs[2] = {dec, rows_dec};
  nv_read_scales<1 + ROWS>(sc, parts, decs);
  if (!sc[0].finite && !(ROWS && sc[ROWS].finite)) return;
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, runs = cols / C;
  uint4 *const stage = stage_all[STAGE ? warp : 0];
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  /* warp-uniform loop (the __syncwarp calls); t < items is uniform over each group of G lanes */
  for (size_t base = (size_t)blockIdx.x * blockDim.x + (threadIdx.x & ~31u); base < items;
       base += stride) {
    const size_t t = base + lane;
    const bool valid = t < items;
    const uint32_t g = (uint32_t)t / runs, c = C * ((uint32_t)t - g * runs);
    nv_run<Tin, C> run[16];
    if (valid) nv_load_cols<C>(run, x, cols, c, g);
    if (ROWS) {
      if (valid) {
        const uint32_t q = lane / G;
        float *w = tile[warp] + q / 2 * BLOCK + q % 2 * 16 * 17 + C * (lane % G);
NV_UNROLL
        for (int r = 0; r < 16; r++)
NV_UNROLL
          for (int k = 0; k < C; k++) w[r * 17 + k] = load_f(&run[r].v[k]);
      }
      __syncwarp();
    }
    /* one column at a time, not unrolled: two columns' RHT and rounding interleaved took
     * 120-130 registers (2 blocks per SM); the next column moves into slot 0 instead */
    if (sc[0].finite)   /* uniform */
#pragma unroll 1
      for (int k = 0; k < C; k++) {
        Tout *dst = nullptr;
        if (valid) {
          float v[16], out[16];
          nv_col16<C>(v, run, 0);
NV_UNROLL
          for (int r = 0; r < 16; r++)
NV_UNROLL
            for (int j = 0; j + 1 < C; j++) run[r].v[j] = run[r].v[j + 1];
          if (rht_signs >= 0) nv_rht16(v, (uint32_t)rht_signs & 0xffffu);   /* as (uint16_t) */
          const size_t i0 = (size_t)(c + k) * rows + (size_t)16 * g;   /* xq's (c + k, 16g) */
          nv_quantize16<SR>(out, v, sc[0], seed, i0);
          dst = xq + i0;
          nv_put_block<STAGE, VEC>(dst, out, stage);
        }
        nv_flush_blocks<STAGE>(dst, stage);
      }
    if (ROWS) {
#pragma unroll 1
      for (int h = 0; h < C; h++) {
        const size_t tq = base + (2 * h + lane / 16) * G;   /* tile q's first item */
        if (tq < items && sc[ROWS].finite) {
          const uint32_t gq = (uint32_t)tq / runs, cq = C * ((uint32_t)tq - gq * runs);
          float v[16], out[16];
NV_UNROLL
          for (int j = 0; j < 16; j++) v[j] = tile[warp][h * BLOCK + lane * 17 + j];
          /* x's element (16 g_q + L % 16, c_q): the first of the lane's block */
          const size_t i0 = ((size_t)16 * gq + (lane & 15)) * cols + cq;
          nv_quantize16<SR>(out, v, sc[ROWS], rows_seed, i0);
          nv_store<VEC, 16>(rows_q + i0, out);
        }
      }
      __syncwarp();   /* the next iteration rewrites the tile */
    }
  }
}

/* ---- launches ------------------------------------------------------------------------------- */

/* Blocks for `threads` threads of a grid-stride kernel, at most the blocks of NV_THREADS that
 * fit on the GPU at once (*per_sm: the kernel's own static, asked once): one resident wave
 * reads at the full rate, and each quantize block reduces the amax partials only once. */
template <typename K>
static int nv_grid(K kernel, int *per_sm, size_t threads) {
  if (*per_sm == 0) {
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, NV_THREADS, 0));
    if (*per_sm < 1) *per_sm = 1;
  }
  const size_t want = (threads + NV_THREADS - 1) / NV_THREADS;
  const size_t cap = (size_t)*per_sm * (size_t)(cuda_ctx.sm_count > 0 ? cuda_ctx.sm_count : 1);
  return (int)(want < 1 ? 1 : want < cap ? want : cap);
}

struct nv_args {
  void *xq;
  float *dec;
  const void *x;
  nv_parts parts;
  int rows, cols;
  uint64_t seed;
  int rht_signs;   /* NVFP4_COLS with the transform: the mask; else -1 */
  /* nvfp4_quantize_rows_cols: the NVFP4_ROWS operand written beside xq (the NVFP4_COLS one) */
  void *rows_q;
  float *rows_dec;
  uint64_t rows_seed;
};

/* The quantize kernels, one struct per layout: vec says whether the vector paths may be taken
 * (a NULL xq, nvfp4_pack's, counts as aligned), launch runs the instantiation for input Tin,
 * output Tout; the rows and tiles kernels' run takes what they write (nv_write_act for
 * nvfp4_quantize, nv_write_i8 for its NVFP4_ROWS_INT, nv_write_packed for nvfp4_pack). */
struct nv_rows {
  template <typename Tin, typename Tout>
  static bool vec(const nv_args &a) {
    return cuda_aligned16(a.x) && cuda_aligned16(a.xq);
  }
  template <typename Tin, typename Tout, bool VEC, bool SR>
  static void launch(const nv_args &a) {
    run<Tin, VEC, SR>(a, nv_write_act<Tout, VEC>{(Tout *)a.xq});
  }
  template <typename Tin>
  static size_t groups(const nv_args &a) {
    return (size_t)a.rows * (size_t)a.cols / (16 / sizeof(Tin));
  }
  template <typename Tin, bool VEC, bool SR, class Out>
  static void run(const nv_args &a, Out out) {
    static int per_sm;
    const size_t ngroups = groups<Tin>(a);
    auto kernel = nvfp4_rows_kernel<Tin, Out, VEC, SR>;
    const int blocks = nv_grid(kernel, &per_sm, (ngroups + NV_ROWS_UNROLL - 1) / NV_ROWS_UNROLL);
    CUDA_LAUNCH_PDL("nvfp4_rows_kernel", kernel, dim3(blocks), dim3(NV_THREADS), 0, out, a.dec,
                    (const Tin *)a.x, ngroups, a.parts, a.seed);
  }
};

/* NVFP4_ROWS of at most CUDA_NVFP4_SMALL_VALUES values: the one-block kernel, no amax pass
 * (a.parts unused); vec as nv_rows'. */
struct nv_rows_small : nv_rows {
  template <typename Tin, typename Tout, bool VEC, bool SR>
  static void launch(const nv_args &a) {
    run<Tin, VEC, SR>(a, nv_write_act<Tout, VEC>{(Tout *)a.xq});
  }
  template <typename Tin, bool VEC, bool SR, class Out>
  static void run(const nv_args &a, Out out) {
    auto kernel = nvfp4_rows_small_kernel<Tin, Out, VEC, SR>;
    CUDA_LAUNCH_PDL("nvfp4_rows_small_kernel", kernel, dim3(1), dim3(nv_small_threads(SR)), 0,
                    out, a.dec, (const Tin *)a.x, groups<Tin>(a), a.seed);
  }
};

struct nv_tiles {
  template <typename Tin, typename Tout>
  static bool vec(const nv_args &a) {
    return vec4_aligned<Tin>(a.x) && vec4_aligned<Tout>(a.xq);
  }
  template <typename Tin, typename Tout, bool VEC, bool SR>
  static void launch(const nv_args &a) {
    run<Tin, VEC, SR>(a, nv_write_act<Tout, VEC>{(Tout *)a.xq});
  }
  template <typename Tin, bool VEC, bool SR, class Out>
  static void run(const nv_args &a, Out out) {
    static int per_sm;
    const size_t tiles = (size_t)a.rows * (size_t)a.cols / 256;
    auto kernel = nvfp4_tiles_kernel<Tin, Out, VEC, SR>;
    CUDA_LAUNCH_PDL("nvfp4_tiles_kernel", kernel, dim3(nv_grid(kernel, &per_sm, tiles * 32)),
                    dim3(NV_THREADS), 0, out, a.dec, (const Tin *)a.x, (uint32_t)a.cols,
                    (uint32_t)tiles, a.parts, a.seed);
  }
};

/* x aligned to the column runs of the transposing kernels' vector path */
template <typename T>
static bool nv_runs_aligned(const void *x) {
  return ((uintptr_t)x & (NV_COLS_RUN * sizeof(T) - 1)) == 0;
}

/* NVFP4_COLS, and with ROWS the fused pair of nvfp4_quantize_rows_cols */
template <bool ROWS>
struct nv_cols {
  template <typename Tin, typename Tout>
  static bool vec(const nv_args &a) {
    /* the loads take runs of NV_COLS_RUN values from even columns; each run of 16 stores is 32-
     * or 64-byte aligned relative to xq (and to rows_q) */
    return nv_runs_aligned<Tin>(a.x) && cuda_aligned16(a.xq) &&
           (!ROWS || cuda_aligned16(a.rows_q));
  }
  template <typename Tin, typename Tout, bool VEC, bool SR>
  static void launch(const nv_args &a) {
    static int per_sm;
    const size_t items = (size_t)(a.cols / (VEC ? NV_COLS_RUN : 1)) * (size_t)(a.rows / 16);
    auto kernel = nvfp4_cols_kernel<Tin, Tout, VEC, SR, ROWS>;
    CUDA_LAUNCH_PDL(ROWS ? "nvfp4_cols_kernel (rows and cols)" : "nvfp4_cols_kernel", kernel,
                    dim3(nv_grid(kernel, &per_sm, items)), dim3(NV_THREADS), 0, (Tout *)a.xq,
                    a.dec, (Tout *)a.rows_q, a.rows_dec, (const Tin *)a.x, (uint32_t)a.rows,
                    (uint32_t)a.cols, items, a.parts, a.seed, a.rows_seed, a.rht_signs);
  }
};

/* From the runtime choices (x's dtype, the activation dtype, alignment, rounding) to the
 * template instantiation of layout K. */
template <class K, typename Tin, typename Tout, bool VEC>
static void nv_launch_sr(const nv_args &a, bool sr) {
  if (sr) K::template launch<Tin, Tout, VEC, true>(a);
  else K::template launch<Tin, Tout, VEC, false>(a);
}

template <class K, typename Tin, typename Tout>
static void nv_launch_vec(const nv_args &a, bool sr) {
  if (K::template vec<Tin, Tout>(a)) nv_launch_sr<K, Tin, Tout, true>(a, sr);
  else nv_launch_sr<K, Tin, Tout, false>(a, sr);
}

template <class K, typename Tin>
static void nv_launch_out(const nv_args &a, bool sr) {
  if (cuda_ctx.act == DT_BF16) nv_launch_vec<K, Tin, bf16>(a, sr);
  else nv_launch_vec<K, Tin, float>(a, sr);
}

template <class K>
static void nv_launch(const nv_args &a, enum dtype x_type, bool sr) {
  if (x_type == DT_BF16) nv_launch_out<K, bf16>(a, sr);
  else nv_launch_out<K, float>(a, sr);
}

/* Kernel K for x of Tin writing through out (nv_write_packed, nv_write_i8), rounding to
 * nearest: its vector path when K::vec allows (xq NULL or aligned). */
template <class K, typename Tin, class Out>
static void nv_run_rn(const nv_args &a, Out out) {
  if (K::template vec<Tin, Tin>(a)) K::template run<Tin, true, false>(a, out);
  else K::template run<Tin, false, false>(a, out);
}

/* NVFP4_ROWS or NVFP4_ROWS_INT through the rows kernel K (nv_rows after the amax kernel, or
 * nv_rows_small); NVFP4_ROWS_INT rounds to nearest (cuda_nvfp4_quantize refuses sr for it). */
template <class K>
static void nv_rows_launch(const nv_args &a, enum nvfp4_layout layout, enum dtype x_type,
                           bool sr) {
  if (layout == NVFP4_ROWS) {
    nv_launch<K>(a, x_type, sr);
    return;
  }
  const nv_write_i8 out = {gemv_i8_operand_at(a.xq, a.rows, a.cols)};
  if (x_type == DT_BF16) nv_run_rn<K, bf16>(a, out);
  else nv_run_rn<K, float>(a, out);
}

/* The amax pass over the values the layout quantizes, into per-block maxima in scratch (no
 * memset, no atomics): of x for rht_signs < 0 (max[1] then repeats max[0]), else of the
 * transformed tiles of xᵀ, and with both also of x (max[1]), from the same loads. */
template <typename T>
static nv_parts nv_amax_t(const void *x, int rows, int cols, int rht_signs, bool both) {
  nv_parts p;
  uint32_t *part;
  if (rht_signs >= 0) {
    static int per_sm[2][2];
    const bool run = nv_runs_aligned<T>(x);
    const size_t items = (size_t)(cols / (run ? NV_COLS_RUN : 1)) * (size_t)(rows / 16);
    auto kernel = run ? both ? nvfp4_amax_cols_kernel<T, 2, NV_COLS_RUN>
                             : nvfp4_amax_cols_kernel<T, 1, NV_COLS_RUN>
                      : both ? nvfp4_amax_cols_kernel<T, 2, 1> : nvfp4_amax_cols_kernel<T, 1, 1>;
    const int blocks = nv_grid(kernel, &per_sm[run][both], items);
    part = (uint32_t *)cuda_scratch(2 * (size_t)blocks * sizeof(uint32_t), "nvfp4 amax partials");
    CUDA_LAUNCH_PDL("nvfp4_amax_cols_kernel", kernel, dim3(blocks), dim3(NV_THREADS), 0, part,
                    (const T *)x, (uint32_t)cols, items, rht_signs);
    p.max[0] = part;
    p.max[1] = both ? part + blocks : part;
    p.n = (uint32_t)blocks;
    return p;
  }
  static int per_sm[2];
  const bool vec = cuda_aligned16(x);
  const size_t ngroups = (size_t)rows * (size_t)cols / (16 / sizeof(T));
  auto kernel = vec ? nvfp4_amax_kernel<T, true> : nvfp4_amax_kernel<T, false>;
  const int blocks = nv_grid(kernel, &per_sm[vec], (ngroups + 3) / 4);
  part = (uint32_t *)cuda_scratch((size_t)blocks * sizeof(uint32_t), "nvfp4 amax partials");
  CUDA_LAUNCH_PDL("nvfp4_amax_kernel", kernel, dim3(blocks), dim3(NV_THREADS), 0, part,
                  (const T *)x, ngroups);
  p.max[0] = p.max[1] = part;
  p.n = (uint32_t)blocks;
  return p;
}

static nv_parts nv_amax(const void *x, enum dtype x_type, int rows, int cols, int rht_signs,
                        bool both) {
  return x_type == DT_BF16 ? nv_amax_t<bf16>(x, rows, cols, rht_signs, both)
                           : nv_amax_t<float>(x, rows, cols, rht_signs, both);
}

/* Once per process (the one synchronization of these ops): the device keeps denormals in this
 * file's code, without which the scales of small blocks would differ from the CPU's. */
static void nv_check_denormals(void) {
  static int checked;
  if (checked) return;
  uint32_t *probe = (uint32_t *)cuda_scratch(sizeof(uint32_t), "nvfp4 denormal probe");
  nvfp4_denormal_probe_kernel<<<1, 1, 0, cuda_ctx.stream>>>(probe, FLT_MIN);
  CUDA_LAUNCHED("nvfp4_denormal_probe_kernel");
  CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.host_result, probe, sizeof *probe, cudaMemcpyDeviceToHost,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  uint32_t bits;
  memcpy(&bits, cuda_ctx.host_result, sizeof bits);
  if (bits != 0x00400000u)
    cuda_fail("cuda_nvfp4_quantize",
              "the device flushed a denormal to zero: the NVFP4 kernels must be built without "
              "-ftz=true or --use_fast_math to match the CPU bit for bit",
              __FILE__, __LINE__);
  checked = 1;
}

static const char *const nv_layout_names[] = {"NVFP4_ROWS", "NVFP4_TILES", "NVFP4_COLS",
                                              "NVFP4_ROWS_INT"};

/* The CPU's shape rule for a known layout, stopping op otherwise; 2^32 blocks of 16 keep the
 * kernels' 32-bit tile and item indices. */
static void nv_check_shape(const char *op, int rows, int cols, enum nvfp4_layout layout) {
  const bool tiled = layout == NVFP4_TILES || layout == NVFP4_COLS;
  if (rows < 0 || cols < 0 || cols % 16 || (tiled && rows % 16) ||
      (size_t)rows * (size_t)cols / 16 > UINT32_MAX) {
    char detail[256];
    snprintf(detail, sizeof detail,
             "shape [%d, %d] refused for %s: cols (and rows for NVFP4_TILES and NVFP4_COLS) "
             "must be non-negative multiples of 16, with fewer than 2^32 blocks of 16",
             rows, cols, nv_layout_names[layout]);
    cuda_fail(op, detail, __FILE__, __LINE__);
  }
}

/* The quantize kernel of the layout, after its amax (a.parts) */
static void nv_quantize_layout(const nv_args &a, enum nvfp4_layout layout, enum dtype x_type,
                               bool sr) {
  if (layout == NVFP4_ROWS || layout == NVFP4_ROWS_INT)
    nv_rows_launch<nv_rows>(a, layout, x_type, sr);
  else if (layout == NVFP4_TILES) nv_launch<nv_tiles>(a, x_type, sr);
  else nv_launch<nv_cols<false>>(a, x_type, sr);
}

/* ---- ops ------------------------------------------------------------------------------------ */

extern "C" void cuda_nvfp4_quantize(void *xq, float *dec, const void *x, enum dtype x_type,
                                    int rows, int cols, enum nvfp4_layout layout, int stochastic,
                                    uint64_t seed, int rht_signs) {
  char detail[256];
  if ((unsigned)layout > NVFP4_ROWS_INT || (x_type != DT_F32 && x_type != DT_BF16)) {
    snprintf(detail, sizeof detail, "unknown layout %d or x_type %d", (int)layout, (int)x_type);
    cuda_fail("cuda_nvfp4_quantize", detail, __FILE__, __LINE__);
  }
  nv_check_shape("cuda_nvfp4_quantize", rows, cols, layout);
  if (layout == NVFP4_ROWS_INT && (stochastic || xq == x || !cuda_aligned16(xq))) {
    snprintf(detail, sizeof detail,
             "NVFP4_ROWS_INT%s%s%s refused: it rounds to nearest, into a 16-byte aligned xq "
             "apart from x", stochastic ? " with stochastic rounding" : "",
             xq == x ? " in place" : "", cuda_aligned16(xq) ? "" : " into an unaligned xq");
    cuda_fail("cuda_nvfp4_quantize", detail, __FILE__, __LINE__);
  }
  /* in place, each thread reads its own elements before writing them, at the same offsets */
  if (xq == x && (layout == NVFP4_COLS || x_type != cuda_ctx.act)) {
    snprintf(detail, sizeof detail,
             "in place (xq == x) for %s with x %s and xq %s: only NVFP4_ROWS and NVFP4_TILES "
             "with x in the activation dtype may alias",
             nv_layout_names[layout], x_type == DT_BF16 ? "bf16" : "fp32",
             cuda_ctx.act == DT_BF16 ? "bf16" : "fp32");
    cuda_fail("cuda_nvfp4_quantize", detail, __FILE__, __LINE__);
  }
  nv_check_denormals();
  const int rht = layout == NVFP4_COLS ? rht_signs : -1;
  nv_args a = {};
  a.xq = xq, a.dec = dec, a.x = x, a.rows = rows, a.cols = cols, a.seed = seed;
  a.rht_signs = rht;
  const bool sr = stochastic != 0;
  if ((layout == NVFP4_ROWS || layout == NVFP4_ROWS_INT) &&
      (size_t)rows * (size_t)cols <= CUDA_NVFP4_SMALL_VALUES) {
    nv_rows_launch<nv_rows_small>(a, layout, x_type, sr);
    return;
  }
  a.parts = nv_amax(x, x_type, rows, cols, rht, false);
  nv_quantize_layout(a, layout, x_type, sr);
}

/* cuda_nvfp4_quantize's quantize kernel alone, the parts standing for its amax kernel's partial
 * maxima (nv_read_scales reduces any number of them); the two-kernel path at every size, the
 * NVFP4_ROWS of a small w too (the one-block kernel takes an amax of its own). */
extern "C" void cuda_nvfp4_quantize_weight(void *xq, float *dec, const float *w, int rows,
                                           int cols, enum nvfp4_layout layout,
                                           const uint32_t *amax_parts, size_t n_parts) {
  if ((unsigned)layout > NVFP4_COLS || !amax_parts || n_parts == 0 || n_parts > UINT32_MAX ||
      xq == w) {
    char detail[160];
    snprintf(detail, sizeof detail,
             "layout %d with %zu amax parts%s refused: NVFP4_ROWS, NVFP4_TILES or NVFP4_COLS, "
             "1 to 2^32 - 1 parts, xq apart from w", (int)layout, n_parts,
             xq == w ? ", in place," : "");
    cuda_fail("cuda_nvfp4_quantize_weight", detail, __FILE__, __LINE__);
  }
  nv_check_shape("cuda_nvfp4_quantize_weight", rows, cols, layout);
  nv_check_denormals();
  nv_args a = {};
  a.xq = xq, a.dec = dec, a.x = w, a.rows = rows, a.cols = cols, a.rht_signs = -1;
  a.parts.max[0] = a.parts.max[1] = amax_parts;
  a.parts.n = (uint32_t)n_parts;
  nv_quantize_layout(a, layout, DT_F32, false);
}

/* nvfp4_quantize's two passes over w (fp32, round to nearest) with the rows or tiles kernel
 * writing the codes and scale bytes of q * s_b instead of the values: the same arithmetic, so
 * the same bytes as the CPU's nvfp4_quantize (a tile's scale byte goes to each of its rows). */
extern "C" void cuda_nvfp4_pack(uint8_t *codes, uint8_t *scales, float *dec, const float *w,
                                int rows, int cols, enum nvfp4_layout layout) {
  if (layout != NVFP4_ROWS && layout != NVFP4_TILES) {
    char detail[128];
    snprintf(detail, sizeof detail, "layout %d refused: NVFP4_ROWS or NVFP4_TILES", (int)layout);
    cuda_fail("cuda_nvfp4_pack", detail, __FILE__, __LINE__);
  }
  nv_check_shape("cuda_nvfp4_pack", rows, cols, layout);
  nv_check_denormals();
  nv_args a = {};
  a.dec = dec, a.x = w, a.rows = rows, a.cols = cols, a.rht_signs = -1;
  a.parts = nv_amax(w, DT_F32, rows, cols, -1, false);
  const nv_write_packed out = {codes, scales};
  if (layout == NVFP4_ROWS) nv_run_rn<nv_rows, float>(a, out);
  else nv_run_rn<nv_tiles, float>(a, out);
}

/* Two passes over x for both operands: the amax pass (one kernel: the plain max for the rows
 * operand and, with the RHT, the transformed max for the cols operand from the same loads) and
 * nvfp4_cols_kernel<ROWS>, which writes both. x is in the activation dtype. */
extern "C" void cuda_nvfp4_quantize_rows_cols(void *rows_q, float *rows_dec, uint64_t rows_seed,
                                              void *cols_q, float *cols_dec, uint64_t cols_seed,
                                              const void *x, int rows, int cols, int stochastic,
                                              int rht_signs) {
  if (rows < 0 || cols < 0 || rows % 16 || cols % 16 ||
      (size_t)rows * (size_t)cols / 16 > UINT32_MAX || rows_q == x || cols_q == x ||
      cols_q == rows_q) {
    char detail[256];
    snprintf(detail, sizeof detail,
             "shape [%d, %d]%s refused: rows and cols must be non-negative multiples of 16, with "
             "fewer than 2^32 blocks of 16, and x, rows_q and cols_q distinct (the CPU's two "
             "calls would quantize a rows_q == x again)",
             rows, cols, rows_q == x || cols_q == x || cols_q == rows_q ? " with aliases" : "");
    cuda_fail("cuda_nvfp4_quantize_rows_cols", detail, __FILE__, __LINE__);
  }
  nv_check_denormals();
  nv_args a = {};
  a.xq = cols_q, a.dec = cols_dec, a.x = x, a.rows = rows, a.cols = cols, a.seed = cols_seed;
  a.rht_signs = rht_signs;
  a.rows_q = rows_q, a.rows_dec = rows_dec, a.rows_seed = rows_seed;
  a.parts = nv_amax(x, cuda_ctx.act, rows, cols, rht_signs, true);
  const bool sr = stochastic != 0;
  if (cuda_ctx.act == DT_BF16) nv_launch_vec<nv_cols<true>, bf16, bf16>(a, sr);
  else nv_launch_vec<nv_cols<true>, float, float>(a, sr);
}

extern "C" void cuda_nvfp4_gemm(void *c, enum dtype c_type, const void *a, const float *dec_a,
                                const void *b, const float *dec_b, int b_kn, int m, int n, int k,
                                float beta) {
  /* as nvfp4_gemm.c: leading dimensions of at least 1 (the GEMM returns for m or n = 0 and
   * gives c = beta * c for k = 0). The operands q * s_b have at most 6 significant bits, so
   * bf16 and TF32 (when the mode allows it) read them exactly. */
  const int ldk = k > 1 ? k : 1, ldn = n > 1 ? n : 1;
  cuda_gemm_scaled(0, b_kn ? 0 : 1, m, n, k, dec_a, dec_b, a, ldk, b, b_kn ? ldn : ldk, beta, c,
                   ldn, cuda_ctx.act, c_type);
}
