/* NVFP4 quantizers on the host (fp32 arrays): the CPU backend's implementation and the bit-exact
 * reference for the CUDA kernels. Numerics are Transformer Engine's (REFERENCE.md, "NVFP4"):
 *
 *   S_enc = min(448*6 / amax, FLT_MAX), or 1 when amax == 0 or S_enc == 0;  S_dec = 1 / S_enc
 *   s_b   = e4m3_rne_satfinite(amax_b * (S_enc * (1/6.f)))              one E4M3 scale per block
 *   q     = e2m1_satfinite(x * min(1 / (float(s_b) * S_dec), FLT_MAX))  one E2M1 code per element
 *   x̂     = q * s_b * S_dec
 *
 * every step a single fp32 operation rounded to nearest (no FMA contraction, no flush-to-zero:
 * a GPU kernel must use __fmul_rn/__fdiv_rn and keep denormals to match these bytes).
 *
 * Layouts, for a row-major [rows, cols] input (cols = K, the GEMM's reduction dimension):
 *  - codes: rows*cols/2 bytes, row-major; element 2i in the low nibble of byte i, 2i+1 in the high
 *    nibble. A code is sign (bit 3) | E2M1 magnitude index 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6).
 *  - NVFP4_BLOCK_1X16: blocks of 16 consecutive elements of a row; scales [rows, cols/16].
 *  - NVFP4_BLOCK_16X16: 16x16 tiles; scales [rows/16, cols/16]. Quantizing Wᵀ gives the
 *    transposed codes and scales of W, so a weight is quantized once for Fprop and Dgrad.
 *
 * Defined edge behaviour:
 *  - Zero tensor: amax = 0, S_enc = S_dec = 1, every scale and code 0.
 *  - A zero block gets scale 0 and codes 0. A block so much smaller than amax that its scale
 *    rounds to E4M3 zero (amax_b < amax * 2^-10 / 448) gets scale 0 and codes saturated to ±6
 *    (x * FLT_MAX clamps), exactly as TE; it dequantizes to 0 either way. Smaller scales that
 *    stay above 2^-10 are E4M3 subnormals, encoded exactly.
 *  - Values past a format's range saturate (satfinite): scales to 448, elements to ±6.
 *  - The sign bit of a code is (x < 0): -0.0 encodes as +0 (TE's reference does the same), a
 *    negative value that rounds to zero keeps its sign (code 8).
 *  - Non-finite input (NaN or ±Inf anywhere in the tensor): the quantizers return
 *    NVFP4_ERR_NONFINITE and write nothing. TE has no defined behaviour here (its kernel and its
 *    reference disagree); silently mapping NaN to a finite code would hide a diverged step.
 *
 * Stochastic rounding (gradients): |x| between adjacent E2M1 magnitudes a < b rounds up to b iff
 * u < ((|x|-a)/(b-a)) * 2^32, compared exactly (the fraction is exact in fp32 and is scaled by a
 * power of two), where u is a uniform uint32 drawn for element i = row*cols + col of the input:
 *   u_i = philox4x32_10(key = {seed lo, seed hi}, counter = {(i/4) lo, (i/4) hi, 0, 0})[i % 4].
 * Same seed, same bytes, on any backend; scales always round to nearest.
 *
 * Random Hadamard transform (Wgrad operands): R = diag(s) · H16 / 4, H16 the Sylvester Hadamard
 * matrix (H[i][j] = (-1)^popcount(i & j)), s_j = -1 where bit j of the sign mask is set. As in TE,
 * each 16-element tile v of a row is replaced by the row vector v · R, i.e.
 *   y_j = 1/4 * sum_i v_i * s_i * H[i][j].
 * R is orthogonal, so for two matrices transformed alike along their reduction dimension the
 * product is unchanged: (A·R)(B·R)ᵀ = A·Bᵀ. For Wgrad = dYᵀ·X the reduction runs over tokens: the
 * caller transposes dY [tokens, out] and X [tokens, in] to [out, tokens] and [in, tokens], applies
 * nvfp4_rht to both (tiles of 16 tokens), then quantizes them 1x16. */
#ifndef QWEN3_NVFP4_H
#define QWEN3_NVFP4_H

#include <stdint.h>

#define NVFP4_E2M1_MAX 6.0f
#define NVFP4_E4M3_MAX 448.0f

enum nvfp4_status { NVFP4_OK = 0, NVFP4_ERR_SHAPE = -1, NVFP4_ERR_NONFINITE = -2 };
enum nvfp4_block { NVFP4_BLOCK_1X16, NVFP4_BLOCK_16X16 };
enum nvfp4_rounding { NVFP4_ROUND_NEAREST, NVFP4_ROUND_STOCHASTIC };

/* The per-tensor scale: amax = max |x| over the tensor, enc = S_enc, dec = S_dec. */
struct nvfp4_tensor_scale {
  float amax, enc, dec;
};

/* ---- scalar formats ------------------------------------------------------------------------ */

/* E2M1 code of x (already scaled), round to nearest even, saturating to ±6; NaN gives 0. */
uint8_t nvfp4_e2m1_encode_rn(float x);
/* E2M1 code of x (already scaled), stochastically rounded with the uniform draw u (see above);
 * saturating to ±6; NaN gives 0. */
uint8_t nvfp4_e2m1_encode_sr(float x, uint32_t u);
/* Value of a 4-bit code (the high nibble is ignored). */
float nvfp4_e2m1_decode(uint8_t code);
/* E4M3 (fn: no inf, 0x7f/0xff NaN) byte of x, round to nearest even, saturating to ±448; NaN
 * gives 0x7f. */
uint8_t nvfp4_e4m3_encode(float x);
float nvfp4_e4m3_decode(uint8_t byte);

/* S_enc and S_dec from a tensor's amax (amax is stored as given). */
struct nvfp4_tensor_scale nvfp4_tensor_scale(float amax);

/* Philox-4x32-10 (Salmon et al. 2011, as in Random123 and cuRAND): four uint32 from a 128-bit
 * counter and a 64-bit key. */
void nvfp4_philox4x32_10(uint32_t out[4], const uint32_t counter[4], const uint32_t key[2]);

/* ---- tensors ------------------------------------------------------------------------------- */

/* Number of E4M3 block scales of a [rows, cols] tensor. */
int nvfp4_num_scales(int rows, int cols, enum nvfp4_block block);

/* Quantizes x [rows, cols] to codes (rows*cols/2 bytes), E4M3 scales (nvfp4_num_scales bytes)
 * and the tensor scale. seed is used only for NVFP4_ROUND_STOCHASTIC. Returns NVFP4_ERR_SHAPE
 * unless cols (and for 16x16 also rows) is a multiple of 16, NVFP4_ERR_NONFINITE for NaN/Inf
 * input (nothing written in either case), else NVFP4_OK. */
int nvfp4_quantize(uint8_t *codes, uint8_t *scales, struct nvfp4_tensor_scale *ts, const float *x,
                   int rows, int cols, enum nvfp4_block block, enum nvfp4_rounding rounding,
                   uint64_t seed);

/* out = q * s_b * s_dec for every element. With s_dec = 1 it gives q * s_b: at most 6
 * significant bits, exact in fp32 and in bf16, which is what an emulated NVFP4 GEMM consumes. */
void nvfp4_dequantize(float *out, const uint8_t *codes, const uint8_t *scales, float s_dec,
                      int rows, int cols, enum nvfp4_block block);

/* The engine's emulation: quantizes x as nvfp4_quantize would and writes xq = q * s_b (fp32,
 * without S_dec) and the tensor scale (ts->dec is the GEMM's alpha factor). xq may alias x.
 * amax: NULL, or max |x| known already (a non-finite one for an x that holds a NaN or Inf),
 * which then stands for the pass over x. Same status codes as nvfp4_quantize. */
int nvfp4_quantize_dequantize(float *xq, struct nvfp4_tensor_scale *ts, const float *x, int rows,
                              int cols, enum nvfp4_block block, enum nvfp4_rounding rounding,
                              uint64_t seed, const float *amax);

/* ---- transforms and GEMM ------------------------------------------------------------------- */

/* The 16-bit sign mask of the run's RHT, derived from a seed:
 * philox4x32_10(key = seed, counter = {0, 0, 0, 1})[0] & 0xffff (counter word 3 = 1 keeps it apart
 * from the stochastic-rounding draws). */
uint16_t nvfp4_rht_signs(uint64_t seed);

/* out [rows, cols] = x with every 16-element tile of every row replaced by v · diag(s)·H16/4.
 * cols must be a multiple of 16; out may alias x. */
void nvfp4_rht(float *out, const float *x, int rows, int cols, uint16_t signs);

/* The emulated NVFP4 GEMM: c [m, n] = alpha * a · op(b) + beta * c with alpha = s_dec_a * s_dec_b,
 * a [m, k] and b the q * s_b values of two quantized operands (nvfp4_quantize_dequantize), b
 * [n, k] (b_kn 0: TN, as cuBLASLt's FP4 GEMM) or [k, n] (b_kn 1), fp32 accumulation
 * (cblas_sgemm). */
void nvfp4_gemm(float *c, const float *a, float s_dec_a, const float *b, float s_dec_b, int b_kn,
                int m, int n, int k, float beta);

#endif
