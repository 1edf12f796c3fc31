/* Causal grouped-query attention on tensor cores (TF32): the fast path of cuda_attention.cu,
 * used when cuda_ctx.tf32 is set ("fast" mode) and the shape is one this file handles
 * (head_dim 64 or 128, tq >= 16, 16-byte aligned tensors, enough shared memory); everything
 * else stays on the exact fp32 kernels of cuda_attention.cu. Same interface and semantics as
 * those (kernels/ops.h): fp32 tensors in memory, q/ctx [batch*tq, heads, hd], k/v rows of
 * sequence b from b*k_stride, queries the last tq of tk keys, GQA read in place, lse
 * [batch, heads, tq] = natural log-sum-exp of the scaled scores, the backward ACCUMULATES into
 * dq/dk/dv (any may be NULL), D = rowsum(dctx * ctx).
 *
 * Arithmetic. Every matrix product is warp-level mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32:
 * operands rounded fp32 -> tf32 with cvt.rna (10-bit mantissa), fp32 accumulation; softmax,
 * exp and the row statistics in fp32 (exp2 of log2e-scaled scores). Expected relative error
 * against the fp32 kernels ~1e-3 or below.
 *
 * Fragments (PTX ISA "Matrix Fragments for mma.m16n8k8", .tf32), g = lane / 4, t = lane % 4:
 *   A 16x8:  a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
 *   B 8x8:   b0 (k=t, n=g)  b1 (k=t+4, n=g)
 *   C 16x8:  c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
 * A probability tile P computed as C (rows x keys) feeds the next product (P V) as A without
 * any shuffle by permuting the reduction index inside each 8-key step: k = t <-> key 2t and
 * k = t+4 <-> key 2t+1, so a = {c0, c2, c1, c3}, and B is read at keys 2t and 2t+1. A sum
 * over k does not depend on the order of its terms' labels, so this is exact.
 *
 * Shared memory: row-major tiles [rows][hd + 4] filled by cp.async (16-byte chunks, rows past
 * the end zero-filled), rounded to tf32 in place by the thread that copied each chunk. The row
 * stride hd + 4 = 4 (mod 32) words makes every fragment load conflict-free: "row" loads
 * X[n0+g][k0+t] hit bank 4g+t, "key" loads X[k0+2t][n0+g] hit bank 8t+g.
 *
 * Kernels (BQ queries x BK keys per tile):
 *  - forward, one block of 4 warps per (64-query tile, head, sequence); warp w owns 16 query
 *    rows, Q's A-fragments in registers; K/V tiles of 64 keys (hd 64) or 32 keys (hd 128)
 *    double-buffered with cp.async; S = Q K^T, online softmax (running max and sum per row),
 *    O += P V in registers; ctx = O / l, lse = m + log l. 68 KB (hd 64) / 66 KB (hd 128).
 *  - backward (0): D = rowsum(dctx * ctx), computed once by the caller for both paths.
 *  - backward (1) dK/dV, one block of 8 warps per (64-key tile, kv head, sequence): K, V stay
 *    in shared memory; the block walks the group's query heads in order and, for each, the
 *    32-query tiles that see its keys (Q, dO, lse, D double-buffered); warp w owns keys
 *    16(w%4).. and queries 16(w/4).. of each query tile: S^T = K Q^T, dP^T = V dO^T,
 *    P = exp(S - lse), dS = P (dP - D), dV += P^T dO, dK += dS^T Q in registers. At the end
 *    warps 4..7 hand their sums to warps 0..3 through shared memory, which add them (own +
 *    other, fixed) and add the total once to dk, dv. 133 KB at hd 128 (needs the opt-in of
 *    sm_90/sm_100; GPUs with less take the fp32 kernels), 69 KB at hd 64.
 *  - backward (2) dQ, one block of 4 warps per (64-query tile, head, sequence): Q and dO stay
 *    in shared memory, K/V tiles of 32 (hd 64) or 16 (hd 128) keys double-buffered; S, dP,
 *    dS as above, dQ += dS K in registers, added once to dq. 68 KB / 99 KB.
 *
 * Deterministic: every output element is owned by one thread of one block and summed in a
 * fixed order (key tiles and query tiles in index order, query heads in head order, the two
 * query halves of dK/dV combined in a fixed order, mma's internal order is fixed by the
 * hardware); row max/sum use a fixed xor-shuffle over the 4 lanes of a row, whose result is
 * the same in each lane; no atomics; nothing depends on block scheduling. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda.h"

/* ---- device primitives (inline PTX, sm_80+) ---------------------------------------------- */
namespace attn_tc {

__device__ __forceinline__ float *smem_base() {
  extern __shared__ float4 attn_tc_smem[];
  return reinterpret_cast<float *>(attn_tc_smem);
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// d += A B, one m16n8k8 TF32 product with fp32 accumulators
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared; valid == false writes 16 zero bytes and reads nothing
__device__ __forceinline__ void cp_async16(float *dst, const float *src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared; valid == false writes a zero
__device__ __forceinline__ void cp_async4(float *dst, const float *src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// all but the newest N committed groups of this thread have landed and are visible to it
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace attn_tc

/* ---- kernels ------------------------------------------------------------------------------ */
// [tc-kernels-begin]
namespace attn_tc {

constexpr int PADF = 4;  // floats of padding per shared row: stride = 4 (mod 32) words
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Dims {
  int batch, tq, tk, k_stride, heads, kv_heads, group;
  float scale;       // head_dim^-0.5
  float scale_log2;  // head_dim^-0.5 * log2(e)
};

__device__ __forceinline__ uint32_t bits(float x) { return __float_as_uint(x); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Rows [0, n) of a global [.][ld_g] matrix (D columns) into s[ROWS][D + PADF] by cp.async;
// rows >= n become zeros.
template <int NT, int ROWS, int D>
__device__ __forceinline__ void issue_tile(float *s, const float *g, size_t ld_g, int n) {
  constexpr int CH = D / 4;
#pragma unroll 4
  for (int idx = threadIdx.x; idx < ROWS * CH; idx += NT) {
    const int r = idx / CH, c = idx % CH * 4;
    const bool ok = r < n;
    cp_async16(s + r * (D + PADF) + c, ok ? g + (size_t)r * ld_g + c : g, ok);
  }
}
// Rounds to tf32, in place, exactly the chunks this thread copied with issue_tile (visible to
// it after its cp_async_wait).
template <int NT, int ROWS, int D>
__device__ __forceinline__ void round_tile(float *s) {
  constexpr int CH = D / 4;
#pragma unroll 4
  for (int idx = threadIdx.x; idx < ROWS * CH; idx += NT) {
    const int r = idx / CH, c = idx % CH * 4;
    float4 *p = reinterpret_cast<float4 *>(s + r * (D + PADF) + c);
    float4 x = *p;
    x.x = __uint_as_float(to_tf32(x.x));
    x.y = __uint_as_float(to_tf32(x.y));
    x.z = __uint_as_float(to_tf32(x.z));
    x.w = __uint_as_float(to_tf32(x.w));
    *p = x;
  }
}

// A fragment of rows r0.., columns k0.. of a shared [.][LD] tile already in tf32
template <int LD>
__device__ __forceinline__ void lda(uint32_t (&a)[4], const float *s, int r0, int k0, int g,
                                    int t) {
  a[0] = bits(s[(r0 + g) * LD + k0 + t]);
  a[1] = bits(s[(r0 + g + 8) * LD + k0 + t]);
  a[2] = bits(s[(r0 + g) * LD + k0 + t + 4]);
  a[3] = bits(s[(r0 + g + 8) * LD + k0 + t + 4]);
}

/* ------------------------------------------------------------------------------------------ */
/* forward */

template <int D, int BK>
struct FwdCfg {
  static constexpr int NT = 128, BQ = 64, LD = D + PADF;
  static constexpr int STAGE = 2 * BK * LD;  // K tile then V tile
  static constexpr size_t smem = sizeof(float) * 2 * STAGE;
  static_assert(BQ * LD <= STAGE, "the Q tile is staged in the second K/V buffer");
};

template <int D, int BK>
__global__ void __launch_bounds__(128, 2)
    attn_tc_fwd_kernel(float *__restrict__ ctx, float *__restrict__ lse,
                       const float *__restrict__ q, const float *__restrict__ k,
                       const float *__restrict__ v, Dims s) {
  using C = FwdCfg<D, BK>;
  constexpr int LD = C::LD, KS = D / 8, NN = BK / 8, ND = D / 8, NT = C::NT, BQ = C::BQ;
  float *sm = smem_base();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest rows first
  const int nq = min(BQ, s.tq - q0);
  const int kh = h / s.group, off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * D, k_ld = (size_t)s.kv_heads * D;
  const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * D;
  const size_t k_base = (size_t)b * s.k_stride * k_ld + (size_t)kh * D;
  const int n_kt = (off + q0 + nq - 1) / BK + 1;

  // Q into the second buffer, key tile 0 into the first
  issue_tile<NT, BQ, D>(sm + C::STAGE, q + q_base, q_ld, nq);
  {
    const int nk = min(BK, s.tk);
    issue_tile<NT, BK, D>(sm, k + k_base, k_ld, nk);
    issue_tile<NT, BK, D>(sm + BK * LD, v + k_base, k_ld, nk);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qa[KS][4];
  {
    const float *sQ = sm + C::STAGE;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      qa[ks][0] = to_tf32(sQ[(warp * 16 + g) * LD + ks * 8 + t]);
      qa[ks][1] = to_tf32(sQ[(warp * 16 + g + 8) * LD + ks * 8 + t]);
      qa[ks][2] = to_tf32(sQ[(warp * 16 + g) * LD + ks * 8 + t + 4]);
      qa[ks][3] = to_tf32(sQ[(warp * 16 + g + 8) * LD + ks * 8 + t + 4]);
    }
  }
  __syncthreads();  // the second buffer is free for key tile 1

  float o[ND][4], m[2], l[2];
  int lim[2];  // last key rows g, g+8 see (clamped to tk - 1 for padding rows)
#pragma unroll
  for (int i = 0; i < 2; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    lim[i] = min(off + q0 + warp * 16 + g + 8 * i, s.tk - 1);
  }
#pragma unroll
  for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const int warp_lim = off + q0 + warp * 16;  // the smallest limit of this warp's rows

  for (int kt = 0; kt < n_kt; kt++) {
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * BK, nk = min(BK, s.tk - k1);
      float *st = sm + ((kt + 1) & 1) * C::STAGE;
      issue_tile<NT, BK, D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
      issue_tile<NT, BK, D>(st + BK * LD, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    const float *sK = sm + (kt & 1) * C::STAGE;
    const float *sV = sK + BK * LD;
    round_tile<NT, 2 * BK, D>(sm + (kt & 1) * C::STAGE);  // K and V rows are contiguous
    __syncthreads();

    // S = Q K^T: warp rows x BK keys
    float sc[NN][4];
#pragma unroll
    for (int j = 0; j < NN; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++)
#pragma unroll
      for (int j = 0; j < NN; j++)
        mma_tf32(sc[j], qa[ks], bits(sK[(8 * j + g) * LD + 8 * ks + t]),
                 bits(sK[(8 * j + g) * LD + 8 * ks + t + 4]));

    const int k0 = kt * BK;
    const bool mask = k0 + BK - 1 > warp_lim || k0 + BK > s.tk;
#pragma unroll
    for (int j = 0; j < NN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float x = sc[j][e] * s.scale_log2;
        sc[j][e] = mask && k0 + 8 * j + 2 * t + (e & 1) > lim[e >> 1] ? -INFINITY : x;
      }
    // online softmax. Every row sees key 0, so m is finite from the first tile on.
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NN; j++) mx = fmaxf(mx, fmaxf(sc[j][2 * i], sc[j][2 * i + 1]));
      const float m_new = fmaxf(m[i], quad_max(mx));
      const float alpha = exp2f(m[i] - m_new);  // 0 on the first tile (m = -inf)
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NN; j++) {
        sc[j][2 * i] = exp2f(sc[j][2 * i] - m_new);  // masked: exp2(-inf) = 0
        sc[j][2 * i + 1] = exp2f(sc[j][2 * i + 1] - m_new);
        sum += sc[j][2 * i] + sc[j][2 * i + 1];
      }
      l[i] = l[i] * alpha + sum;  // this lane's share; the quad is summed at the end
      m[i] = m_new;
#pragma unroll
      for (int n = 0; n < ND; n++) o[n][2 * i] *= alpha, o[n][2 * i + 1] *= alpha;
    }
    // O += P V, keys of step j: k = t <-> key 8j+2t, k = t+4 <-> key 8j+2t+1
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const uint32_t pa[4] = {to_tf32(sc[j][0]), to_tf32(sc[j][2]), to_tf32(sc[j][1]),
                              to_tf32(sc[j][3])};
      const float *v0 = sV + (8 * j + 2 * t) * LD + g;
#pragma unroll
      for (int n = 0; n < ND; n++) mma_tf32(o[n], pa, bits(v0[8 * n]), bits(v0[LD + 8 * n]));
    }
    __syncthreads();  // this buffer is refilled two tiles on
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    const float L = quad_sum(l[i]);
    const int row = warp * 16 + g + 8 * i;
    if (row < nq) {
      const float inv = 1.0f / L;
      float *out = ctx + q_base + (size_t)row * q_ld + 2 * t;
#pragma unroll
      for (int n = 0; n < ND; n++)
        *reinterpret_cast<float2 *>(out + 8 * n) =
            make_float2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
      if (t == 0) lse[((size_t)b * s.heads + h) * s.tq + q0 + row] = (m[i] + log2f(L)) * LN2;
    }
  }
}


/* ------------------------------------------------------------------------------------------ */
/* backward (1): dK, dV for one (64-key tile, kv head, sequence), 8 warps */

template <int D>
struct DkvCfg {
  static constexpr int NT = 256, BK = 64, BQ = 32, LD = D + PADF;
  static constexpr int KSZ = BK * LD;                // sK, sV
  static constexpr int QSTAGE = 2 * BQ * LD + 2 * BQ;  // sQ, sdO, lse, D
  static constexpr size_t smem = sizeof(float) * (2 * KSZ + 2 * QSTAGE);
  static_assert(2 * QSTAGE >= 4 * 32 * 8 * (D / 8), "the final hand-over fits in the stages");
};

template <int D>
__global__ void __launch_bounds__(256, 1)
    attn_tc_dkdv_kernel(float *__restrict__ dk, float *__restrict__ dv,
                        const float *__restrict__ dctx, const float *__restrict__ q,
                        const float *__restrict__ k, const float *__restrict__ v,
                        const float *__restrict__ lse, const float *__restrict__ Dsum, Dims s) {
  using C = DkvCfg<D>;
  constexpr int LD = C::LD, KS = D / 8, ND = D / 8, NT = C::NT, BK = C::BK, BQ = C::BQ;
  float *sm = smem_base();
  float *sK = sm, *sV = sm + C::KSZ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kw = warp & 3, qh = warp >> 2;  // keys 16kw.., queries 16qh.. of each query tile
  const int b = blockIdx.z, kh = blockIdx.y;
  const int k0 = blockIdx.x * BK;  // the first keys have the most queries: first
  const int nk = min(BK, s.tk - k0);
  const int off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * D, k_ld = (size_t)s.kv_heads * D;
  const size_t k_base = ((size_t)b * s.k_stride + k0) * k_ld + (size_t)kh * D;
  // query i sees key j when j <= off + i: the first query tile that sees key k0
  const int qt_begin = max(0, k0 - off) / BQ, n_qt = (s.tq + BQ - 1) / BQ;
  const int per_head = n_qt - qt_begin, n_it = s.group * per_head;

  // query tile `it` (head kh*group + it / per_head, tile qt_begin + it % per_head) -> stage
  auto issue_q = [&](int it, float *st) {
    const int h = kh * s.group + it / per_head, q0 = (qt_begin + it % per_head) * BQ;
    const int nq = min(BQ, s.tq - q0);
    const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * D;
    issue_tile<NT, BQ, D>(st, q + q_base, q_ld, nq);
    issue_tile<NT, BQ, D>(st + BQ * LD, dctx + q_base, q_ld, nq);
    const size_t r = ((size_t)b * s.heads + h) * s.tq + q0;
    for (int i = threadIdx.x; i < 2 * BQ; i += NT) {
      const int ii = i % BQ;
      const bool ok = ii < nq;
      const float *src = (i < BQ ? lse : Dsum) + (ok ? r + ii : 0);
      cp_async4(st + 2 * BQ * LD + i, src, ok);
    }
  };

  issue_tile<NT, BK, D>(sK, k + k_base, k_ld, nk);
  issue_tile<NT, BK, D>(sV, v + k_base, k_ld, nk);
  issue_q(0, sm + 2 * C::KSZ);
  cp_async_commit();

  float ak[ND][4], av[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) ak[n][e] = av[n][e] = 0.0f;

  for (int it = 0; it < n_it; it++) {
    if (it + 1 < n_it) issue_q(it + 1, sm + 2 * C::KSZ + ((it + 1) & 1) * C::QSTAGE);
    cp_async_commit();
    cp_async_wait<1>();
    float *st = sm + 2 * C::KSZ + (it & 1) * C::QSTAGE;
    const float *sQ = st, *sdO = st + BQ * LD, *sL = st + 2 * BQ * LD, *sD = sL + BQ;
    if (it == 0) {
      round_tile<NT, BK, D>(sK);
      round_tile<NT, BK, D>(sV);
    }
    round_tile<NT, 2 * BQ, D>(st);  // Q and dO rows are contiguous
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x 16 queries per warp
    float sT[2][4], dpT[2][4];
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) sT[j][e] = dpT[j][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      uint32_t a[4];
      lda<LD>(a, sK, 16 * kw, 8 * ks, g, t);
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const float *qr = sQ + (16 * qh + 8 * j + g) * LD + 8 * ks + t;
        mma_tf32(sT[j], a, bits(qr[0]), bits(qr[4]));
      }
      lda<LD>(a, sV, 16 * kw, 8 * ks, g, t);
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const float *orow = sdO + (16 * qh + 8 * j + g) * LD + 8 * ks + t;
        mma_tf32(dpT[j], a, bits(orow[0]), bits(orow[4]));
      }
    }

    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - D); element (key, query)
    const int q0 = (qt_begin + it % per_head) * BQ, nq = min(BQ, s.tq - q0);
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + 16 * kw + g + 8 * (e >> 1);
        const int ql = 16 * qh + 8 * j + 2 * t + (e & 1);
        const bool seen = ql < nq && key <= off + q0 + ql;
        const float p = exp2f(sT[j][e] * s.scale_log2 - sL[ql] * LOG2E);
        sT[j][e] = seen ? p : 0.0f;
        dpT[j][e] = seen ? p * (dpT[j][e] - sD[ql]) : 0.0f;
      }

    // dV += P^T dO, dK += dS^T Q; queries of step j: k = t <-> 8j+2t, k = t+4 <-> 8j+2t+1
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const uint32_t pa[4] = {to_tf32(sT[j][0]), to_tf32(sT[j][2]), to_tf32(sT[j][1]),
                              to_tf32(sT[j][3])};
      const uint32_t sa[4] = {to_tf32(dpT[j][0]), to_tf32(dpT[j][2]), to_tf32(dpT[j][1]),
                              to_tf32(dpT[j][3])};
      const int r = (16 * qh + 8 * j + 2 * t) * LD + g;
#pragma unroll
      for (int n = 0; n < ND; n++) {
        mma_tf32(av[n], pa, bits(sdO[r + 8 * n]), bits(sdO[r + LD + 8 * n]));
        mma_tf32(ak[n], sa, bits(sQ[r + 8 * n]), bits(sQ[r + LD + 8 * n]));
      }
    }
    __syncthreads();  // this stage is refilled two tiles on
  }

  // warps 4..7 hand their sums to warps 0..3 (the stages are free: the last group is empty)
  cp_async_wait<0>();
  float *red = sm + 2 * C::KSZ;
  if (qh == 1) {
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        red[((kw * ND + n) * 8 + e) * 32 + lane] = ak[n][e];
        red[((kw * ND + n) * 8 + 4 + e) * 32 + lane] = av[n][e];
      }
  }
  __syncthreads();
  if (qh == 0) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int j = 16 * kw + g + 8 * i;
      if (j >= nk) continue;
      const size_t row = k_base + (size_t)j * k_ld + 2 * t;
#pragma unroll
      for (int n = 0; n < ND; n++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
          const int e = 2 * i + c;
          const float sk = ak[n][e] + red[((kw * ND + n) * 8 + e) * 32 + lane];
          const float sv = av[n][e] + red[((kw * ND + n) * 8 + 4 + e) * 32 + lane];
          if (dk) dk[row + 8 * n + c] += s.scale * sk;
          if (dv) dv[row + 8 * n + c] += sv;
        }
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* backward (2): dQ for one (64-query tile, head, sequence), 4 warps */

template <int D, int BK>
struct DqCfg {
  static constexpr int NT = 128, BQ = 64, LD = D + PADF;
  static constexpr int QSZ = BQ * LD;        // sQ, sdO
  static constexpr int STAGE = 2 * BK * LD;  // K tile then V tile
  static constexpr size_t smem = sizeof(float) * (2 * QSZ + 2 * STAGE);
};

template <int D, int BK>
__global__ void __launch_bounds__(128, 2)
    attn_tc_dq_kernel(float *__restrict__ dq, const float *__restrict__ dctx,
                      const float *__restrict__ q, const float *__restrict__ k,
                      const float *__restrict__ v, const float *__restrict__ lse,
                      const float *__restrict__ Dsum, Dims s) {
  using C = DqCfg<D, BK>;
  constexpr int LD = C::LD, KS = D / 8, NN = BK / 8, ND = D / 8, NT = C::NT, BQ = C::BQ;
  float *sm = smem_base();
  float *sQ = sm, *sdO = sm + C::QSZ, *sKV = sm + 2 * C::QSZ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest rows first
  const int nq = min(BQ, s.tq - q0);
  const int kh = h / s.group, off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * D, k_ld = (size_t)s.kv_heads * D;
  const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * D;
  const size_t k_base = (size_t)b * s.k_stride * k_ld + (size_t)kh * D;
  const int n_kt = (off + q0 + nq - 1) / BK + 1;

  issue_tile<NT, BQ, D>(sQ, q + q_base, q_ld, nq);
  issue_tile<NT, BQ, D>(sdO, dctx + q_base, q_ld, nq);
  {
    const int nk = min(BK, s.tk);
    issue_tile<NT, BK, D>(sKV, k + k_base, k_ld, nk);
    issue_tile<NT, BK, D>(sKV + BK * LD, v + k_base, k_ld, nk);
  }
  cp_async_commit();

  float l2[2], Dr[2];
  int lim[2];  // last key rows g, g+8 see; -1 for padding rows
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = warp * 16 + g + 8 * i;
    const size_t ri = ((size_t)b * s.heads + h) * s.tq + q0 + r;
    l2[i] = r < nq ? lse[ri] * LOG2E : 0.0f;
    Dr[i] = r < nq ? Dsum[ri] : 0.0f;
    lim[i] = r < nq ? off + q0 + r : -1;
  }
  float acc[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int kt = 0; kt < n_kt; kt++) {
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * BK, nk = min(BK, s.tk - k1);
      float *st = sKV + ((kt + 1) & 1) * C::STAGE;
      issue_tile<NT, BK, D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
      issue_tile<NT, BK, D>(st + BK * LD, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    if (kt == 0) round_tile<NT, 2 * BQ, D>(sQ);  // Q and dO rows are contiguous
    const float *sK = sKV + (kt & 1) * C::STAGE;
    const float *sV = sK + BK * LD;
    round_tile<NT, 2 * BK, D>(sKV + (kt & 1) * C::STAGE);
    __syncthreads();

    // S = Q K^T and dP = dO V^T: 16 rows x BK keys per warp
    float sc[NN][4], dp[NN][4];
#pragma unroll
    for (int j = 0; j < NN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) sc[j][e] = dp[j][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      uint32_t a[4];
      lda<LD>(a, sQ, 16 * warp, 8 * ks, g, t);
#pragma unroll
      for (int j = 0; j < NN; j++) {
        const float *kr = sK + (8 * j + g) * LD + 8 * ks + t;
        mma_tf32(sc[j], a, bits(kr[0]), bits(kr[4]));
      }
      lda<LD>(a, sdO, 16 * warp, 8 * ks, g, t);
#pragma unroll
      for (int j = 0; j < NN; j++) {
        const float *vr = sV + (8 * j + g) * LD + 8 * ks + t;
        mma_tf32(dp[j], a, bits(vr[0]), bits(vr[4]));
      }
    }

    // dS = P (dP - D), P = exp(S - lse)
    const int k0 = kt * BK;
#pragma unroll
    for (int j = 0; j < NN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = e >> 1;
        const float p = exp2f(sc[j][e] * s.scale_log2 - l2[i]);
        dp[j][e] = k0 + 8 * j + 2 * t + (e & 1) <= lim[i] ? p * (dp[j][e] - Dr[i]) : 0.0f;
      }

    // dQ += dS K; keys of step j: k = t <-> 8j+2t, k = t+4 <-> 8j+2t+1
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const uint32_t sa[4] = {to_tf32(dp[j][0]), to_tf32(dp[j][2]), to_tf32(dp[j][1]),
                              to_tf32(dp[j][3])};
      const float *k0r = sK + (8 * j + 2 * t) * LD + g;
#pragma unroll
      for (int n = 0; n < ND; n++) mma_tf32(acc[n], sa, bits(k0r[8 * n]), bits(k0r[LD + 8 * n]));
    }
    __syncthreads();  // this buffer is refilled two tiles on
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int row = warp * 16 + g + 8 * i;
    if (row >= nq) continue;
    float *out = dq + q_base + (size_t)row * q_ld + 2 * t;
#pragma unroll
    for (int n = 0; n < ND; n++) {
      float2 x = *reinterpret_cast<float2 *>(out + 8 * n);
      x.x += s.scale * acc[n][2 * i];
      x.y += s.scale * acc[n][2 * i + 1];
      *reinterpret_cast<float2 *>(out + 8 * n) = x;
    }
  }
}

}  // namespace attn_tc
// [tc-kernels-end]

/* ---- host side ---------------------------------------------------------------------------- */
namespace attn_tc {
namespace {


// The shapes this file handles; false: the caller uses the fp32 kernels.
bool make_dims(Dims *d, const struct attn_shape *a) {
  if (a->head_dim != 64 && a->head_dim != 128) return false;
  if (a->tq < 16 || a->batch <= 0 || a->heads <= 0 || a->kv_heads <= 0) return false;
  if (a->heads % a->kv_heads || a->tq > a->tk || a->tk > a->k_stride) return false;
  if (a->batch > 65535 || a->heads > 65535) return false;
  d->batch = a->batch, d->tq = a->tq, d->tk = a->tk, d->k_stride = a->k_stride;
  d->heads = a->heads, d->kv_heads = a->kv_heads, d->group = a->heads / a->kv_heads;
  d->scale = (float)(1.0 / sqrt((double)a->head_dim));  // as the CPU backend
  d->scale_log2 = (float)(1.4426950408889634 / sqrt((double)a->head_dim));
  return true;
}

template <int D, int BK>
void launch_fwd(float *ctx, float *lse, const float *q, const float *k, const float *v,
                const Dims &d) {
  using C = FwdCfg<D, BK>;
  static bool done = false;
  cuda_allow_smem(attn_tc_fwd_kernel<D, BK>, C::smem, &done);
  dim3 grid((d.tq + C::BQ - 1) / C::BQ, d.heads, d.batch);
  attn_tc_fwd_kernel<D, BK><<<grid, C::NT, C::smem, cuda_ctx.stream>>>(ctx, lse, q, k, v, d);
  CUDA_LAUNCHED("attn_tc_fwd_kernel");
}

template <int D, int BK>
void launch_bwd(float *dq, float *dk, float *dv, const float *dctx, const float *q,
                const float *k, const float *v, const float *lse, const float *Dsum,
                const Dims &d) {
  if (dk || dv) {
    using C = DkvCfg<D>;
    static bool done = false;
    cuda_allow_smem(attn_tc_dkdv_kernel<D>, C::smem, &done);
    dim3 grid((d.tk + C::BK - 1) / C::BK, d.kv_heads, d.batch);
    attn_tc_dkdv_kernel<D>
        <<<grid, C::NT, C::smem, cuda_ctx.stream>>>(dk, dv, dctx, q, k, v, lse, Dsum, d);
    CUDA_LAUNCHED("attn_tc_dkdv_kernel");
  }
  if (dq) {
    using C = DqCfg<D, BK>;
    static bool done = false;
    cuda_allow_smem(attn_tc_dq_kernel<D, BK>, C::smem, &done);
    dim3 grid((d.tq + C::BQ - 1) / C::BQ, d.heads, d.batch);
    attn_tc_dq_kernel<D, BK>
        <<<grid, C::NT, C::smem, cuda_ctx.stream>>>(dq, dctx, q, k, v, lse, Dsum, d);
    CUDA_LAUNCHED("attn_tc_dq_kernel");
  }
}

}  // namespace
}  // namespace attn_tc

using namespace attn_tc;

extern "C" int cuda_attention_tc_forward(float *ctx, float *lse, const float *q, const float *k,
                                         const float *v, const struct attn_shape *s) {
  Dims d;
  if (!make_dims(&d, s)) return 0;
  if (!cuda_aligned16(ctx) || !cuda_aligned16(q) || !cuda_aligned16(k) || !cuda_aligned16(v))
    return 0;
  const size_t optin = (size_t)cuda_smem_optin();
  if (s->head_dim == 64) {
    if (optin < FwdCfg<64, 64>::smem) return 0;
    launch_fwd<64, 64>(ctx, lse, q, k, v, d);
  } else {
    if (optin < FwdCfg<128, 32>::smem) return 0;
    launch_fwd<128, 32>(ctx, lse, q, k, v, d);
  }
  return 1;
}

extern "C" int cuda_attention_tc_backward(float *dq, float *dk, float *dv, const float *dctx,
                                          const float *q, const float *k, const float *v,
                                          const float *lse, const float *Dsum,
                                          const struct attn_shape *s) {
  Dims d;
  if (!make_dims(&d, s)) return 0;
  if (!cuda_aligned16(q) || !cuda_aligned16(k) || !cuda_aligned16(v) || !cuda_aligned16(dctx) ||
      (dq && !cuda_aligned16(dq)))
    return 0;
  const size_t optin = (size_t)cuda_smem_optin();
  const size_t need = s->head_dim == 64
                          ? (DkvCfg<64>::smem > DqCfg<64, 32>::smem ? DkvCfg<64>::smem
                                                                    : DqCfg<64, 32>::smem)
                          : (DkvCfg<128>::smem > DqCfg<128, 16>::smem ? DkvCfg<128>::smem
                                                                      : DqCfg<128, 16>::smem);
  if (optin < need) return 0;
  if (!dq && !dk && !dv) return 1;
  if (s->head_dim == 64)
    launch_bwd<64, 32>(dq, dk, dv, dctx, q, k, v, lse, Dsum, d);
  else
    launch_bwd<128, 16>(dq, dk, dv, dctx, q, k, v, lse, Dsum, d);
  return 1;
}
