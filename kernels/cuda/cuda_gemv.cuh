/* The decoding GEMV's weight formats and loads (cuda_linear.cu's gemv_kernel runs them), and
 * gemv_nvfp4's integer operand, which the NVFP4 quantizer writes (cuda_nvfp4.cu's
 * NVFP4_ROWS_INT). */
#ifndef QWEN3_CUDA_GEMV_CUH
#define QWEN3_CUDA_GEMV_CUH

#include <cuda_fp8.h>
#include <stdint.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"
#include "kernels/cuda/cuda_nvfp4.cuh"

/* Decode's linear layers: a few token rows against whole weight matrices. cuBLASLt's GEMM
 * tiles give such a product one block per 128 output rows or so, too few to keep the memory
 * busy (measured on the H200 at Qwen3-4B's shapes, one token: 0.6 TB/s of its 4.3 for the
 * q/k/v weights); here warps stream weight rows with 16-byte loads, GEMV_UNROLL of them in
 * flight per lane (NVFP4's one more at 16 lanes a row), and each row's n dot products come out
 * of it.
 *  - The matrices of one call (q|k|v, gate|up: up to GEMV_MAX_MATS, one input) are one launch:
 *    their rows are numbered on, so k's and v's 1024 rows do not run as launches of their own
 *    (ncu at 4B's shape: 0.7 TB/s each, bench/NOTES.md).
 *  - A row is read by WPR warps (1, 2, 4 or 8, from the shape: enough warps to fill every
 *    SM, each with at least GEMV_UNROLL loads to issue), each taking every WPR-th 16-byte
 *    column group; o and down (2560 rows at 4B) had too few warps at one a row (2.3 TB/s).
 *    A short row (fewer 16-byte groups than GEMV_UNROLL a lane at 32 lanes) is read by 16
 *    lanes instead, two rows a warp (cuda_linear.cu's gemv_lanes_per_row).
 *  - The first loads of weights are issued before pdl_wait: nothing in a step writes weights.
 * Per row the lanes sum strided slices in fp32 and combine them by a fixed butterfly, then the
 * row's warps in warp order through shared memory: the same bits every run. Each more token
 * costs the dense kernel about 30% of its one-token time (its x loads, conversions and FMAs),
 * so it is taken for n <= GEMV_MAX_ROWS, when in_dim is a multiple of a 16-byte vector and x
 * and the weights are 16-byte aligned; cuBLASLt otherwise.
 * The kernel is a template over the weights' format (gemv_dense: the weight copy;
 * gemv_nvfp4: nvfp4_pack's codes and scales against x as integers, cuda_nvfp4_gemv_packed,
 * which reads a weight at 4.5 bits a value instead of 16, so a 16-byte load is 32 values and a
 * lane has 4x fewer loads a row). */
#define GEMV_MAX_ROWS 4
#define GEMV_MAX_MATS 3
#define GEMV_WARPS 8   /* warps per block */
#define GEMV_UNROLL 4

/* 16 bytes: the raw load (the read-only path: nothing in the op writes w or x) */
static __device__ __forceinline__ uint4 gemv_load(const void *p) { return __ldg((const uint4 *)p); }

/* the values of 16 bytes of T in fp32 */
template <typename T>
struct gemv_vec {
  static constexpr int N = 16 / sizeof(T);
  float f[N];
  __device__ __forceinline__ gemv_vec(uint4 u) {
    const T *t = (const T *)&u;
#pragma unroll
    for (int i = 0; i < N; i++) f[i] = load_f(&t[i]);
  }
};

/* f = the N values of T at p (16-byte aligned) in fp32, N * sizeof(T) / 16 loads */
template <typename T, int N>
static __device__ __forceinline__ void gemv_load_x(float (&f)[N], const T *__restrict__ p) {
  constexpr int V = gemv_vec<T>::N;
#pragma unroll
  for (int i = 0; i < N / V; i++) {
    const gemv_vec<T> v(gemv_load(p + i * V));
#pragma unroll
    for (int j = 0; j < V; j++) f[i * V + j] = v.f[j];
  }
}

/* The weight formats the kernel reads, F: a lane's 16-byte load of a weight row holds F::N of
 * its values (from a column c that is a multiple of N), the outputs are of type F::act.
 *   mat           one matrix: its pointers;
 *   row           a row's pointers (row_of: row r; at: from column c on);
 *   chunk         what a lane loads for one 16-byte group of a row (load: at column off of a
 *                 row from at, off a constant, so the batch's addresses are one register's);
 *   ONE_ROW       one token row (a decoding step of one sequence) has an instantiation of its
 *                 own (gemv_kernel's R);
 *   PART          the row's last batch is loaded at once, predicated (rows of a few chunks a
 *                 lane, as NVFP4's are at Qwen3's widths: all in flight before pdl_wait),
 *                 else its chunks one at a time (rows of many: the predicated batch took the
 *                 dense kernels from 40-48 registers to 54-62);
 *                 gemv_kernel makes its batch one chunk longer at 16 lanes a row;
 *   weights       a chunk made ready for dot_rows, once for every token row (gemv_dense: in
 *                 fp32);
 *   xin           the operand x as the format reads it (gemv_dense: a pointer to x's values
 *                 in F::act; gemv_nvfp4: the integer operand), passed by value;
 *   dot_rows      acc[t] += those N weights · token row t's N values of x from column col
 *                 (row t at t * in_dim), for t < n <= R, fp32 accumulation (gemv_nvfp4: exact
 *                 integer sums of a block, then one fp32 FMA);
 *   finish        a row's output from its sum.
 * gemv_dense: the weight copy in the activation dtype T (linear_forward). */
template <typename T>
struct gemv_dense {
  typedef T act;
  static constexpr int N = 16 / sizeof(T);
  static constexpr bool PART = false;
  static constexpr bool ONE_ROW = false;
  struct mat {
    const T *w;
  };
  typedef const T *row;
  static __device__ __forceinline__ row row_of(const mat &m, int in_dim, int r) {
    return m.w + (size_t)r * in_dim;
  }
  typedef uint4 chunk;
  static __device__ __forceinline__ row at(const row &w, int c) { return w + c; }
  static __device__ __forceinline__ chunk load(const row &w, int off) {
    return gemv_load(w + off);
  }
  typedef gemv_vec<T> weights;
  typedef const T *__restrict__ xin;
  template <int R>
  static __device__ __forceinline__ void dot_rows(float (&acc)[R], const weights &w, xin x,
                                                  int col, int in_dim, int n) {
#pragma unroll
    for (int t = 0; t < R; t++) {
      if (t >= n) break;
      float v[N];
      gemv_load_x<T, N>(v, x + (size_t)t * in_dim + col);
#pragma unroll
      for (int i = 0; i < N; i++) acc[t] = fmaf(w.f[i], v[i], acc[t]);
    }
  }
  static __device__ __forceinline__ float finish(const mat &, float sum) { return sum; }
};

/* PTX prmt: the bytes of {b, a} picked by the 4 selectors in c's low 16 bits. __byte_perm masks
 * each selector to 3 bits (an AND a call), which the selectors here never need. */
static __device__ __forceinline__ uint32_t gemv_prmt(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

/* 2|q| of the E2M1 magnitudes 0..7 as bytes, the table that prmt selects from: 0 1 2 3 | 4 6 8
 * 12 (one table for nv_e2m1x8_i8 and nv_e2m1x8_dot_split) */
constexpr uint32_t E2M1_2Q_LO = 0x03020100u, E2M1_2Q_HI = 0x0C080604u;

/* 2q for the 8 E2M1 codes of a word (element j in bits 4j..4j+3) as 8 int8, element j in byte j
 * of lo (j < 4) or hi: 2q is an integer of -12..12. Byte permutes from tables: the magnitude's
 * 3 bits select from 2|q| and from -2|q|, the sign bit then picks one of the two (every
 * selector's top bit, prmt's sign-replicate mode, is 0). */
static __device__ __forceinline__ void nv_e2m1x8_i8(uint32_t q, uint32_t &lo, uint32_t &hi) {
  const uint32_t NEG_LO = 0xFDFEFF00u, NEG_HI = 0xF4F8FAFCu;   /* E2M1_2Q's negatives */
  const uint32_t mag = q & 0x77777777u, mag_hi = mag >> 16;
  const uint32_t pick = 0x32103210u | (q & 0x88888888u) >> 1;  /* byte j, or j + 4 if negative */
  lo = gemv_prmt(gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, mag), gemv_prmt(NEG_LO, NEG_HI, mag), pick);
  hi = gemv_prmt(gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, mag_hi), gemv_prmt(NEG_LO, NEG_HI, mag_hi), pick >> 16);
}

/* The integer dot product of a word's 8 E2M1 codes (as nv_e2m1x8_i8 reads them) with the 8
 * int8 of x_lo and x_hi, as two sums that differ by it: pos += the positive codes' terms, neg
 * += minus the negative codes'. Each 4 codes select from the table of 2|q| twice, as they are
 * and with their sign bits flipped: the selector's top bit is prmt's sign-replicate flag and the
 * table's bytes are all below 0x80, so a code with it set gives 0. For one token row: 2
 * permutes and 2 dp4a for 4 codes, against nv_e2m1x8_i8's 3 permutes, 1 dp4a and the sign
 * selectors' arithmetic, 3 instructions fewer a block of 16, and two table words to hold
 * instead of four (the GEMV's PTX at one token row and 16 lanes: 1235 -> 1052 instructions;
 * gate|up 9.8 -> 8.6 us, down 7.2 -> 6.2, decoding one sequence 4.8% faster, bench/NOTES.md,
 * session 21). At several token rows each dp4a is paid a row, and nv_e2m1x8_i8 is fewer. */
static __device__ __forceinline__ void nv_e2m1x8_dot_split(uint32_t q, uint32_t x_lo,
                                                           uint32_t x_hi, int &pos, int &neg) {
  const uint32_t flip = q ^ 0x88888888u;
  pos = __dp4a((int)gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, q), (int)x_lo, pos);
  pos = __dp4a((int)gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, q >> 16), (int)x_hi, pos);
  neg = __dp4a((int)gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, flip), (int)x_lo, neg);
  neg = __dp4a((int)gemv_prmt(E2M1_2Q_LO, E2M1_2Q_HI, flip >> 16), (int)x_hi, neg);
}

/* An NVFP4 operand as integers (ops.h NVFP4_ROWS_INT, gemv_nvfp4's x): k[i] = 2q of value i
 * (-12..12) and s[b] its block b's scale s_b in fp32, so that value i is k[i] * s[i / 16] / 2. */
struct gemv_i8_operand {
  int8_t *k;
  float *s;
};

/* The NVFP4_ROWS_INT operand of x [rows, cols] at xq (ops.h: k, then s from
 * nvfp4_int_scales_at) */
static inline gemv_i8_operand gemv_i8_operand_at(void *xq, int rows, int cols) {
  return {(int8_t *)xq, (float *)((char *)xq + nvfp4_int_scales_at(rows, cols))};
}

/* gemv_nvfp4: nvfp4_pack's weights (ops.h), codes [out_dim, in_dim/2] and E4M3 scales
 * [out_dim, in_dim/16], against x as integers (gemv_i8_operand): a 16-byte load is 32 codes,
 * two blocks of 16, and goes with the 2 bytes of their scales (one 2-byte load). The codes
 * become 2q in int8 (nv_e2m1x8_i8, ~1.4 instructions a value) and meet x's 2q in __dp4a, 4
 * products an instruction; at one token row they meet x as magnitudes, the negative codes'
 * sum subtracted (nv_e2m1x8_dot_split). A block's integer sum of 2q_w * 2q_x is at most
 * 16 * 144, exact; times s_w * s_x / 4 (E4M3 times E4M3: 8 significant bits, exact) it is the
 * block's exact dot product, added into the row's sum by one FMA (one rounding a block and token),
 * and the row's sum multiplied by *dec_x * *dec_w at the end. The fp32 dot this replaced summed the
 * block's 16 products q_w * (q_x s_x) in fp32, also exactly, then took the sum times s_w into the
 * row's by one FMA: the same exact value rounded once in the same order, so the same bits (-0.0, a
 * value of x that the integers hold as +0, changes no sum: each block's starts at +0). It converted
 * each code to half and to float and took an FMA a value, which at one token row bound the GEMV by
 * its issue rate (~1.35 TB/s on the H200), not by its bytes. */
template <typename T>
struct gemv_nvfp4 {
  typedef T act;
  static constexpr int N = 32;
  static constexpr bool PART = true;
  static constexpr bool ONE_ROW = true;
  struct mat {
    const uint8_t *codes, *scales;
    const float *dec_x, *dec_w;
  };
  struct chunk {
    uint4 q;
    uint32_t s;
  };
  struct row {
    const uint8_t *codes, *scales;
  };
  static __device__ __forceinline__ row row_of(const mat &m, int in_dim, int r) {
    return {m.codes + (size_t)r * (in_dim / 2), m.scales + (size_t)r * (in_dim / 16)};
  }
  static __device__ __forceinline__ row at(const row &w, int c) {
    return {w.codes + c / 2, w.scales + c / 16};
  }
  static __device__ __forceinline__ chunk load(const row &w, int off) {
    chunk k;
    k.q = gemv_load(w.codes + off / 2);
    k.s = __ldg((const unsigned short *)(w.scales + off / 16));
    return k;
  }
  /* The codes stay packed until dot_rows turns them into 2q, a block's two words at a time,
   * once for all the token rows they meet: decoded in the constructor instead (8 words a chunk
   * live at once) the one-row kernels went past ptxas's 64-register target (8 bytes of
   * spills); decoded for each token row, four rows took 4x the byte permutes. */
  struct weights {
    uint32_t q[4];   /* the 32 codes, 8 a word, in column order */
    float s[2];      /* the two blocks' scales / 4 */
    /* both E4M3 scales by one cvt.rn.f16x2.e4m3x2 (sm_89 on: every E4M3 value, subnormals and
     * NaN, is a half exactly), byte b to half b; nv_e4m3_decode's bit moves and branches were
     * ~12 instructions a scale, a quarter of a chunk's */
    __device__ __forceinline__ weights(const chunk &c) : q{c.q.x, c.q.y, c.q.z, c.q.w} {
      const float2 f = __half22float2(
          __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)c.s, __NV_E4M3)));
      s[0] = f.x * 0.25f, s[1] = f.y * 0.25f;
    }
  };
  typedef gemv_i8_operand xin;
  template <int R>
  static __device__ __forceinline__ void dot_rows(float (&acc)[R], const weights &w, xin x,
                                                  int col, int in_dim, int n) {
    float2 xs[R];   /* token row t's scales of the two blocks */
#pragma unroll
    for (int t = 0; t < R; t++)
      if (t < n)
        xs[t] = __ldg(reinterpret_cast<const float2 *>(x.s + ((size_t)t * in_dim + col) / 16));
#pragma unroll
    for (int b = 0; b < 2; b++) {   /* columns col + 16b .. col + 16b + 15 */
      if constexpr (R == 1) {   /* one token row: the codes' signs split (nv_e2m1x8_dot_split) */
        const uint4 xk = gemv_load(x.k + col + 16 * b);
        int pos = 0, neg = 0;
        nv_e2m1x8_dot_split(w.q[2 * b], xk.x, xk.y, pos, neg);
        nv_e2m1x8_dot_split(w.q[2 * b + 1], xk.z, xk.w, pos, neg);
        acc[0] = fmaf((float)(pos - neg), w.s[b] * (b ? xs[0].y : xs[0].x), acc[0]);
      } else {
        uint32_t k[4];
        nv_e2m1x8_i8(w.q[2 * b], k[0], k[1]);
        nv_e2m1x8_i8(w.q[2 * b + 1], k[2], k[3]);
#pragma unroll
        for (int t = 0; t < R; t++) {
          if (t >= n) break;
          const size_t at = (size_t)t * in_dim + col + 16 * b;
          const uint4 xk = gemv_load(x.k + at);
          int sum = __dp4a((int)k[0], (int)xk.x, 0);
          sum = __dp4a((int)k[1], (int)xk.y, sum);
          sum = __dp4a((int)k[2], (int)xk.z, sum);
          sum = __dp4a((int)k[3], (int)xk.w, sum);
          acc[t] = fmaf((float)sum, w.s[b] * (b ? xs[t].y : xs[t].x), acc[t]);
        }
      }
    }
  }
  static __device__ __forceinline__ float finish(const mat &m, float sum) {
    return (*m.dec_x * *m.dec_w) * sum;
  }
};

/* The lane's batch of chunks of row r at columns c, c + stride, ... (w: the row); PART: the
 * row's last batch, maybe partial: only the chunks inside the row. */
template <class F, bool PART, int U>
static __device__ __forceinline__ void gemv_fetch(typename F::chunk (&wb)[U],
                                                  const typename F::row &w, int c, int stride,
                                                  int in_dim) {
  const typename F::row p = F::at(w, c);
#pragma unroll
  for (int u = 0; u < U; u++)
    if (!PART || c + u * stride < in_dim) wb[u] = F::load(p, u * stride);
}

/* acc[t] += the batch's weights times x's same columns of token row t, for t < n <= R */
template <class F, bool PART, int U, int R>
static __device__ __forceinline__ void gemv_fma(float (&acc)[R],
                                                const typename F::chunk (&wb)[U],
                                                typename F::xin x, int c, int stride, int n,
                                                int in_dim) {
#pragma unroll
  for (int u = 0; u < U; u++) {
    if (PART && c + u * stride >= in_dim) break;
    const typename F::weights wv(wb[u]);
    F::template dot_rows<R>(acc, wv, x, c + u * stride, in_dim, n);
  }
}

#endif
