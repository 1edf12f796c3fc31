/* Causal grouped-query attention on bf16 tensor cores: the path of the bf16 mode, used when the
 * shape is one this file handles (head_dim 64 or 128, tq >= 16, 16-byte aligned tensors, enough
 * shared memory); everything else stays on the generic kernels of cuda_attention.cu. Same
 * semantics as those (kernels/ops.h): q/ctx [batch*tq, heads, hd], k/v rows of sequence b from
 * b*k_stride, queries the last tq of tk keys, GQA read in place (no expanded K/V), lse
 * [batch, heads, tq] = natural log-sum-exp of the scaled scores, the backward adds into dq/dk/dv
 * with ACC_DX and overwrites them without (any may be NULL), D = rowsum(dctx * ctx) from the
 * caller. Tensors are bf16, lse and
 * D fp32.
 *
 * Documents (attn_shape.doc_start, packed sequences): query row i also masks the keys before
 * doc_start[i]. Each kernel has a DOC = false instantiation, the same code as without document
 * masking (doc_start is an extra argument it never reads), and a DOC = true one, which keeps
 * the first keys of its query rows in shared memory (past the tiles; dK/dV: in each query
 * stage) and reads them per tile rather than holding them in registers. Besides the causal
 * skips below, DOC kernels skip the key tiles before the smallest first key of a query tile
 * (forward, dQ; per warp, the tiles before the smallest of its rows), and in dK/dV the query
 * tiles after the last row whose document starts at or before the key tile's last key (per
 * warp, a query tile whose 32 rows all start after its 16 keys).
 *
 * Arithmetic (as FlashAttention-2). Every product is warp-level
 * mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32: bf16 operands, fp32 accumulation. Scores,
 * softmax statistics (running max and sum), exp and dS = P (dP - D) are fp32; P and dS are
 * rounded to bf16 only where they feed the next product (P V, P^T dO, dS K, dS^T Q). The
 * accumulating outputs read the old bf16 value, add the fp32 increment and round once (or, not
 * accumulating, round the increment).
 *
 * Fragments (PTX ISA "Matrix Fragments for mma.m16n8k16", .bf16), g = lane / 4, t = lane % 4;
 * each register holds two consecutive bf16 along k (low half first):
 *   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
 *   B 16x8:  b0 (k = 2t..2t+1, n = g)  b1 (k = 2t+8.., n = g)
 *   C 16x8:  c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
 * A score tile computed as C over 16 keys (two n8 tiles j, j+1) is exactly the A fragment of
 * the next product over those 16 keys: a0 = (c0,c1) of j, a1 = (c2,c3) of j, a2 = (c0,c1) of
 * j+1, a3 = (c2,c3) of j+1, so P and dS go from accumulators to operands without shuffles.
 * All operands come from shared memory through ldmatrix.x4 (four 8x8 b16 matrices, lane i
 * giving the address of row i%8 of matrix i/8):
 *   - A of a row-major [row][k] tile, and B of a [k][n] tile with .trans (V in P V, dO and Q in
 *     the dK/dV products, K in dS K): lane address row r0 + lane%16, column c0 + 8*(lane/16);
 *   - B of a [n][k] tile stored row-major (K in Q K^T, V in dO V^T, Q and dO in the transposed
 *     score products), two n8 tiles at once: row n0 + lane%8 + 8*(lane/16), column
 *     k0 + 8*((lane/8)%2).
 * Either way the four registers are {b0, b1} of n tile n0 and {b0, b1} of n tile n0 + 8.
 *
 * Shared memory: row-major bf16 tiles [rows][hd + 8] filled by cp.async (16-byte chunks, rows
 * past the end zero-filled, so padding rows and keys past tk are finite and then masked). The
 * row stride hd + 8 bf16 = 4 (mod 32) words puts the eight 16-byte rows of every ldmatrix
 * phase on distinct banks. Loads of the next tile are issued right after the barrier that ends
 * the use of its buffer, so they overlap the products of the current tile (double buffering,
 * one __syncthreads per tile).
 *
 * Kernels (key tiles and query tiles that the causal mask hides entirely are never visited; a
 * warp whose rows see none of a tile's keys skips its products; only tiles that cross the
 * diagonal or the end of the sequence evaluate the mask):
 *  - forward: one block of NW warps per (16*NW-query tile, head, sequence), warp w owns 16 query
 *    rows; key tiles of BK double-buffered; S = Q K^T, online softmax in the log2 domain, O +=
 *    P V in registers; ctx = O / l, lse = (m + log2 l) ln 2.
 *  - dK/dV: one block of 8 warps per (64-key tile, kv head or a part of its query
 *    heads, sequence).
 *    K and V stay in shared memory; the block walks its query heads in order and, for each,
 *    the 64-query tiles that see its keys (Q, dO, lse, D double-buffered); warp w owns keys
 *    16(w%4).. and queries 32(w/4).. of each query tile: S^T = K Q^T, dP^T = V dO^T, P^T =
 *    exp(S^T - lse), dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q in registers. Warps
 *    4..7 hand their sums to warps 0..3 through shared memory, which add the total once into
 *    dk, dv. When (key tiles x kv heads x sequences) blocks would leave SMs without one (short
 *    or few sequences), the group's query heads are cut into parts, one block per part writes
 *    its fp32 sums to a scratch plane of its own, and a small kernel adds the planes in order
 *    into dk, dv.
 *  - dQ: one block of NW warps per (16*NW-query tile, head, sequence), Q and dO in shared
 *    memory, K/V tiles of BK double-buffered; S, dP, dS as above, dQ += dS K in registers.
 *
 * Deterministic: every output element is summed by one thread in a fixed order (tiles and
 * heads in index order, the two query halves of dK/dV and the scratch planes in a fixed order,
 * the mma's own order fixed by the hardware); row max/sum use a fixed xor-shuffle over the 4
 * lanes of a row; no atomics; nothing depends on block scheduling. */
#include <limits.h>

#include "kernels/cuda/cuda_attention_bf16.cuh"


/* ---- kernels ------------------------------------------------------------------------------ */
namespace attn_bf16 {

constexpr int PAD = 8;  // bf16 of padding per shared row: stride = 4 (mod 32) words

// Document masking: the smallest (MAX: the largest) of x over the block's NT threads, in every
// thread, through NT / 32 ints of shared memory `part`. One barrier; part is read after it, so
// nothing may write there before the next one.
template <int NT, bool MAX>
__device__ __forceinline__ int block_reduce(int x, int *part) {
  x = MAX ? __reduce_max_sync(0xffffffffu, x) : __reduce_min_sync(0xffffffffu, x);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
  __syncthreads();
  x = part[0];
#pragma unroll
  for (int w = 1; w < NT / 32; w++) x = MAX ? max(x, part[w]) : min(x, part[w]);
  return x;
}

// Rows [0, n) of a global [.][ld_g] bf16 matrix (D columns) into s[ROWS][D + PAD] by cp.async;
// rows >= n become zeros.
template <int NT, int ROWS, int D>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, size_t ld_g, int n) {
  constexpr int CH = D / 8, TOTAL = ROWS * CH, ITER = (TOTAL + NT - 1) / NT;
#pragma unroll
  for (int i = 0; i < ITER; i++) {
    const int idx = threadIdx.x + i * NT;
    if (TOTAL % NT != 0 && idx >= TOTAL) break;
    const int r = idx / CH, c = idx % CH * 8;
    const bool ok = r < n;
    cp_async16(s + r * (D + PAD) + c, ok ? g + (size_t)r * ld_g + c : g, ok);
  }
}

// ldmatrix lane addresses (element offsets inside a [.][LDS] tile), see the file comment
template <int LDS>
__device__ __forceinline__ int addr_a(int r0, int c0, int lane) {  // A; B of [k][n] with .trans
  return (r0 + (lane & 15)) * LDS + c0 + ((lane >> 4) << 3);
}
template <int LDS>
__device__ __forceinline__ int addr_b(int n0, int k0, int lane) {  // B of a [n][k] tile
  return (n0 + (lane & 7) + ((lane >> 4) << 3)) * LDS + k0 + (((lane >> 3) & 1) << 3);
}

/* Shared by the forward and dQ kernels, after they issued their query-side tiles: with DOC,
 * the rows' first keys go to shared memory at `first` (past the tiles; 0 for padding rows,
 * whose results are never written) and the key tiles start at the one of the smallest (BQ <=
 * NT); without, at key tile 0. Issues that tile's K and V loads and commits the group. Returns
 * the first key tile; *sFirst is the rows' first keys (NULL without DOC). */
template <int NT, int BQ, int BK, int D, bool DOC>
__device__ __forceinline__ int first_key_tile(const int32_t *doc_q, int nq, int32_t *first,
                                              const int32_t **sFirst, bf16 *sKV, const bf16 *k,
                                              const bf16 *v, size_t k_base, size_t k_ld,
                                              int tk) {
  constexpr int LDS = D + PAD;
  int kt_begin = 0;
  *sFirst = nullptr;
  if constexpr (DOC) {
    const int i = threadIdx.x;
    if (i < BQ) first[i] = i < nq ? doc_q[i] : 0;
    kt_begin = block_reduce<NT, false>(i < nq ? doc_q[i] : INT_MAX, first + BQ) / BK;  // seen
    *sFirst = first;
  }
  const int k1 = kt_begin * BK, nk = min(BK, tk - k1);
  bf16 *st = sKV + (kt_begin & 1) * 2 * BK * LDS;
  load_tile<NT, BK, D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
  load_tile<NT, BK, D>(st + BK * LDS, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
  cp_async_commit();
  return kt_begin;
}

/* ------------------------------------------------------------------------------------------ */
/* forward */

template <int D, int NW, int BK>
struct FwdCfg {
  static constexpr int NT = 32 * NW, BQ = 16 * NW, LDS = D + PAD;
  static constexpr size_t smem = sizeof(bf16) * (size_t)(BQ + 4 * BK) * LDS;  // Q, 2 x (K, V)
  // documents: then the rows' first keys and the partials of their minimum (int32)
  static constexpr size_t DOC_BYTES = sizeof(int32_t) * (BQ + NT / 32);
};

template <int D, int NW, int BK, int MINB, bool DOC>
__global__ void __launch_bounds__(32 * NW, MINB)
    attn_bf16_fwd_kernel(bf16 *__restrict__ ctx, float *__restrict__ lse,
                         const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                         const bf16 *__restrict__ v, Dims s, const int32_t *__restrict__ doc) {
  using C = FwdCfg<D, NW, BK>;
  constexpr int LDS = C::LDS, KS = D / 16, NN = BK / 8, ND = D / 8, NT = C::NT, BQ = C::BQ;
  bf16 *sQ = reinterpret_cast<bf16 *>(smem_base());
  bf16 *sKV = sQ + BQ * LDS;  // stage st: K at sKV + st * 2 * BK * LDS, V right after
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const QueryTile qt = query_tile<D>(s, BQ, BK);
  const auto [h, b, q0, nq, kh, off, n_kt, q_ld, k_ld, q_base, k_base] = qt;
  const int32_t *doc_q = DOC ? doc + (size_t)b * s.tq + q0 : nullptr;  // the rows' first keys

  load_tile<NT, BQ, D>(sQ, q + q_base, q_ld, nq);
  const int32_t *sFirst;
  const int kt_begin = first_key_tile<NT, BQ, BK, D, DOC>(
      doc_q, nq, reinterpret_cast<int32_t *>(smem_base() + C::smem), &sFirst, sKV, k, v, k_base,
      k_ld, s.tk);

  float o[ND][4], m[2], l[2];
  int lim[2];  // last key rows g, g+8 see
  fwd_rows(o, m, l, lim, qt, warp * 16, s.tk);
  const int warp_lo = off + q0 + warp * 16;          // the smallest limit of this warp's rows
  const int warp_hi = min(warp_lo + 15, s.tk - 1);   // the largest
  uint32_t qa[KS][4];  // this warp's 16 rows of Q as A fragments, loaded once

  for (int kt = kt_begin; kt < n_kt; kt++) {
    cp_async_wait_all();
    __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1's buffer
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * BK, nk = min(BK, s.tk - k1);
      bf16 *st = sKV + ((kt + 1) & 1) * 2 * BK * LDS;
      load_tile<NT, BK, D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
      load_tile<NT, BK, D>(st + BK * LDS, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
      cp_async_commit();
    }
    if (kt == kt_begin) {
#pragma unroll
      for (int ks = 0; ks < KS; ks++) ldsm4(qa[ks], sQ + addr_a<LDS>(warp * 16, ks * 16, lane));
    }
    const int k0 = kt * BK;
    if (k0 > warp_hi) continue;  // every key of the tile is masked for every row of the warp
    // DOC: the same before the first key of every row; else mask when some row's is past k0
    // (the first keys are read from shared memory in each tile: registers are short)
    bool doc_mask = false;
    if constexpr (DOC) {
      const int f0 = sFirst[warp * 16 + g], f1 = sFirst[warp * 16 + g + 8];
      if (k0 + BK <= __reduce_min_sync(0xffffffffu, min(f0, f1))) continue;
      doc_mask = k0 < __reduce_max_sync(0xffffffffu, max(f0, f1));
    }
    const bf16 *sK = sKV + (kt & 1) * 2 * BK * LDS;
    const bf16 *sV = sK + BK * LDS;

    // S = Q K^T: 16 rows x BK keys
    float sc[NN][4];
#pragma unroll
    for (int j = 0; j < NN; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++)
#pragma unroll
      for (int jj = 0; jj < NN / 2; jj++) {
        uint32_t bb[4];
        ldsm4(bb, sK + addr_b<LDS>(16 * jj, 16 * ks, lane));
        mma(sc[2 * jj], qa[ks], bb[0], bb[1]);
        mma(sc[2 * jj + 1], qa[ks], bb[2], bb[3]);
      }

    const bool mask = k0 + BK - 1 > warp_lo || k0 + BK > s.tk || doc_mask;
#pragma unroll
    for (int j = 0; j < NN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + 8 * j + 2 * t + (e & 1);
        if (mask && (key > lim[e >> 1] || (DOC && key < sFirst[warp * 16 + g + 8 * (e >> 1)])))
          sc[j][e] = -INFINITY;
      }
    online_softmax<DOC>(sc, o, m, l, s.scale_log2);
    // O += P V over 16 keys at a time, P in bf16 straight from the accumulators
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      const uint32_t pa[4] = {pack(sc[2 * kk][0], sc[2 * kk][1]),
                              pack(sc[2 * kk][2], sc[2 * kk][3]),
                              pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int nn = 0; nn < D / 16; nn++) {
        uint32_t bb[4];
        ldsm4_t(bb, sV + addr_a<LDS>(16 * kk, 16 * nn, lane));
        mma(o[2 * nn], pa, bb[0], bb[1]);
        mma(o[2 * nn + 1], pa, bb[2], bb[3]);
      }
    }
  }

  store_ctx(ctx, lse, o, m, l, qt, warp * 16, s);
}

/* ------------------------------------------------------------------------------------------ */
/* backward (1): dK, dV for one (64-key tile, kv head or one of its query heads, sequence) */

template <int D, bool DOC>
struct DkvCfg {
  static constexpr int NT = 256, BK = 64, BQ = 64, LDS = D + PAD;
  static constexpr size_t KV_BYTES = sizeof(bf16) * 2 * BK * LDS;  // sK, sV
  // one stage: sQ, sdO (bf16), then lse, D (fp32), then (DOC) the rows' first keys (int32)
  static constexpr size_t STAGE_BYTES =
      sizeof(bf16) * 2 * BQ * LDS + sizeof(float) * 2 * BQ + (DOC ? sizeof(int32_t) * BQ : 0);
  static constexpr size_t smem = KV_BYTES + 2 * STAGE_BYTES;
  static_assert(STAGE_BYTES % 16 == 0, "16-byte aligned stages");
  static_assert(2 * STAGE_BYTES >= sizeof(float) * 4 * 32 * 8 * (D / 8),
                "the final hand-over fits in the stages");
};

template <int D, int MINB, bool DOC>
__global__ void __launch_bounds__(256, MINB)
    attn_bf16_dkdv_kernel(bf16 *__restrict__ dk, bf16 *__restrict__ dv, float *__restrict__ part,
                          const bf16 *__restrict__ dctx, const bf16 *__restrict__ q,
                          const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                          const float *__restrict__ lse, const float *__restrict__ Dsum, Dims s,
                          int nsplit, const int32_t *__restrict__ doc) {
  using C = DkvCfg<D, DOC>;
  constexpr int LDS = C::LDS, KS = D / 16, ND = D / 8, NT = C::NT, BK = C::BK, BQ = C::BQ;
  unsigned char *sm = smem_base();
  bf16 *sK = reinterpret_cast<bf16 *>(sm), *sV = sK + BK * LDS;
  unsigned char *stages = sm + C::KV_BYTES;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int kw = warp & 3, qh = warp >> 2;  // keys 16kw.., queries 32qh.. of each query tile
  const KvTile kv = kv_tile<D>(s, nsplit, BK, BQ);  // the lambda below reads it
  const auto [kh, split, hpb, h0, b, k0, nk, off, qt_begin, n_qt, q_ld, k_ld, k_base] = kv;
  const int32_t *doc_b = DOC ? doc + (size_t)b * s.tq : nullptr;  // first keys of the rows
  // DOC: the query tiles past the last row whose document starts at or before this tile's
  // last key see none of its keys (rows are scanned: doc_start need not be monotonic)
  int qt_end = n_qt;
  if constexpr (DOC) {
    int last = -1;
    for (int i = max(0, k0 - off) + threadIdx.x; i < s.tq; i += NT)
      if (doc_b[i] < k0 + nk) last = i;
    // the partials go to stage 1, which nothing fills before the loop's first barrier
    last = block_reduce<NT, true>(last, reinterpret_cast<int *>(stages + C::STAGE_BYTES));
    qt_end = last < 0 ? qt_begin : last / BQ + 1;
  }
  const int per_head = qt_end - qt_begin, n_it = hpb * per_head;

  // query tile `it` (head h0 + it / per_head, tile qt_begin + it % per_head) -> stage
  auto issue_q = [&](int it, unsigned char *st) {
    const QStage t = q_stage<D>(kv, s, it, per_head, BQ);
    const int q0 = t.q0, nq = t.nq;
    bf16 *sq = reinterpret_cast<bf16 *>(st);
    load_tile<NT, BQ, D>(sq, q + t.q_base, kv.q_ld, nq);
    load_tile<NT, BQ, D>(sq + BQ * LDS, dctx + t.q_base, kv.q_ld, nq);
    float *sf = reinterpret_cast<float *>(st + sizeof(bf16) * 2 * BQ * LDS);
    if (threadIdx.x < 2 * BQ) load_lse_d(sf, lse, Dsum, t, BQ);
    if constexpr (DOC) {
      static_assert(3 * BQ <= NT, "one thread per first key");
      const int i = (int)threadIdx.x - 2 * BQ;
      if (i >= 0 && i < BQ)
        cp_async4(sf + 2 * BQ + i, doc + (size_t)kv.b * s.tq + (i < nq ? q0 + i : 0), i < nq);
    }
  };

  load_tile<NT, BK, D>(sK, k + k_base, k_ld, nk);
  load_tile<NT, BK, D>(sV, v + k_base, k_ld, nk);
  if (!DOC || n_it > 0) issue_q(0, stages);  // DOC: no query may see these keys
  cp_async_commit();

  float ak[ND][4], av[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) ak[n][e] = av[n][e] = 0.0f;
  const int key_lo = k0 + 16 * kw;  // this warp's first key

  for (int it = 0; it < n_it; it++) {
    cp_async_wait_all();
    __syncthreads();  // stage it visible to all; everyone is done with stage it-1
    if (it + 1 < n_it) {
      issue_q(it + 1, stages + ((it + 1) & 1) * C::STAGE_BYTES);
      cp_async_commit();
    }
    const auto [q0, nq, q_base, r] = q_stage<D>(kv, s, it, per_head, BQ);
    // skip when the warp's queries are all padding, or all precede its first key
    if (32 * qh >= nq || key_lo > off + q0 + min(32 * qh + 31, nq - 1)) continue;
    const unsigned char *st = stages + (it & 1) * C::STAGE_BYTES;
    const bf16 *sQ = reinterpret_cast<const bf16 *>(st), *sdO = sQ + BQ * LDS;
    const float *sL = reinterpret_cast<const float *>(st + sizeof(bf16) * 2 * BQ * LDS);
    const float *sD = sL + BQ;
    const int32_t *sF = reinterpret_cast<const int32_t *>(sD + BQ);  // DOC: first keys
    // DOC: the smallest and the largest first key of the warp's 32 queries; skip when every
    // one starts its document after the warp's last key
    int first_hi = 0;
    if constexpr (DOC) {
      const int qi = 32 * qh + lane;
      const bool ok = qi < nq;
      const int f = sF[qi];
      if (key_lo + 15 < __reduce_min_sync(0xffffffffu, ok ? f : INT_MAX)) continue;
      first_hi = __reduce_max_sync(0xffffffffu, ok ? f : 0);
    }

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x 32 queries per warp
    float sT[4][4], dpT[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) sT[j][e] = dpT[j][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      uint32_t a[4], bb[4];
      ldsm4(a, sK + addr_a<LDS>(16 * kw, 16 * ks, lane));
#pragma unroll
      for (int jj = 0; jj < 2; jj++) {
        ldsm4(bb, sQ + addr_b<LDS>(32 * qh + 16 * jj, 16 * ks, lane));
        mma(sT[2 * jj], a, bb[0], bb[1]);
        mma(sT[2 * jj + 1], a, bb[2], bb[3]);
      }
      ldsm4(a, sV + addr_a<LDS>(16 * kw, 16 * ks, lane));
#pragma unroll
      for (int jj = 0; jj < 2; jj++) {
        ldsm4(bb, sdO + addr_b<LDS>(32 * qh + 16 * jj, 16 * ks, lane));
        mma(dpT[2 * jj], a, bb[0], bb[1]);
        mma(dpT[2 * jj + 1], a, bb[2], bb[3]);
      }
    }

    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - D); element (key row, query column)
    const bool mask = k0 + BK - 1 > off + q0 || q0 + BQ > s.tq || (DOC && first_hi > key_lo);
    dkdv_scores<DOC>(sT, dpT, sL, sD, sF, 32 * qh, key_lo + g, mask, nq, off + q0, s.scale_log2);

    // dV += P^T dO, dK += dS^T Q over 16 queries at a time
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
      const uint32_t pa[4] = {pack(sT[2 * kk][0], sT[2 * kk][1]),
                              pack(sT[2 * kk][2], sT[2 * kk][3]),
                              pack(sT[2 * kk + 1][0], sT[2 * kk + 1][1]),
                              pack(sT[2 * kk + 1][2], sT[2 * kk + 1][3])};
      const uint32_t sa[4] = {pack(dpT[2 * kk][0], dpT[2 * kk][1]),
                              pack(dpT[2 * kk][2], dpT[2 * kk][3]),
                              pack(dpT[2 * kk + 1][0], dpT[2 * kk + 1][1]),
                              pack(dpT[2 * kk + 1][2], dpT[2 * kk + 1][3])};
#pragma unroll
      for (int nn = 0; nn < D / 16; nn++) {
        uint32_t bb[4];
        ldsm4_t(bb, sdO + addr_a<LDS>(32 * qh + 16 * kk, 16 * nn, lane));
        mma(av[2 * nn], pa, bb[0], bb[1]);
        mma(av[2 * nn + 1], pa, bb[2], bb[3]);
        ldsm4_t(bb, sQ + addr_a<LDS>(32 * qh + 16 * kk, 16 * nn, lane));
        mma(ak[2 * nn], sa, bb[0], bb[1]);
        mma(ak[2 * nn + 1], sa, bb[2], bb[3]);
      }
    }
  }

  // warps 4..7 hand their sums to warps 0..3 (the stages are free once everyone is here)
  cp_async_wait_all();
  __syncthreads();
  float *red = reinterpret_cast<float *>(stages);
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
  if (qh != 0) return;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int j = 16 * kw + g + 8 * i;
    if (j >= nk) continue;
    // this warp's sums and those warp kw + 4 handed over, element e = 2i + c of n tile n
    auto sk = [&](int n, int c) { return ak[n][2 * i + c] + red[((kw * ND + n) * 8 + 2 * i + c) * 32 + lane]; };
    auto sv = [&](int n, int c) { return av[n][2 * i + c] + red[((kw * ND + n) * 8 + 4 + 2 * i + c) * 32 + lane]; };
    store_dkdv<D>(dk, dv, part, s, nsplit, split, b, kh, k0 + j, k_base + (size_t)j * k_ld, sk,
                  sv);
  }
}

// dk += scale * sum of the dK planes, dv += sum of the dV planes, planes in order; 4 values
// per thread. part is [2][nsplit][batch][tk][kv_heads][hd] (all dK planes, then all dV).
__global__ void attn_bf16_dkdv_reduce(bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                                      const float *__restrict__ part, Dims s, int hd,
                                      int nsplit) {
  const size_t plane = (size_t)s.batch * s.tk * s.kv_heads * hd, n4 = plane / 4;
  const size_t vbase = (size_t)nsplit * plane;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t idx = 4 * i;
    const size_t rest = idx / hd;  // (b * tk + key) * kv_heads + kh
    const int d = (int)(idx % hd);
    const size_t bk = rest / s.kv_heads;
    const int kh = (int)(rest % s.kv_heads);
    const int key = (int)(bk % s.tk), b = (int)(bk / s.tk);
    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
    for (int p = 0; p < nsplit; p++) {
      const float4 x = *reinterpret_cast<const float4 *>(part + p * plane + idx);
      const float4 y = *reinterpret_cast<const float4 *>(part + vbase + p * plane + idx);
      sk.x += x.x, sk.y += x.y, sk.z += x.z, sk.w += x.w;
      sv.x += y.x, sv.y += y.y, sv.z += y.z, sv.w += y.w;
    }
    const size_t dst = (((size_t)b * s.k_stride + key) * s.kv_heads + kh) * hd + d;
    if (dk) {
      add_bf16x2(dk + dst, s.scale * sk.x, s.scale * sk.y, s.acc);
      add_bf16x2(dk + dst + 2, s.scale * sk.z, s.scale * sk.w, s.acc);
    }
    if (dv) {
      add_bf16x2(dv + dst, sv.x, sv.y, s.acc);
      add_bf16x2(dv + dst + 2, sv.z, sv.w, s.acc);
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* backward (2): dQ for one (16*NW-query tile, head, sequence) */

template <int D, int NW, int BK>
struct DqCfg {
  static constexpr int NT = 32 * NW, BQ = 16 * NW, LDS = D + PAD;
  // sQ, sdO, 2 x (K, V)
  static constexpr size_t smem = sizeof(bf16) * (size_t)(2 * BQ + 4 * BK) * LDS;
  // documents: then the rows' first keys and the partials of their minimum (int32)
  static constexpr size_t DOC_BYTES = sizeof(int32_t) * (BQ + NT / 32);
};

template <int D, int NW, int BK, int MINB, bool DOC>
__global__ void __launch_bounds__(32 * NW, MINB)
    attn_bf16_dq_kernel(bf16 *__restrict__ dq, const bf16 *__restrict__ dctx,
                        const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                        const bf16 *__restrict__ v, const float *__restrict__ lse,
                        const float *__restrict__ Dsum, Dims s, const int32_t *__restrict__ doc) {
  using C = DqCfg<D, NW, BK>;
  constexpr int LDS = C::LDS, KS = D / 16, NN = BK / 8, ND = D / 8, NT = C::NT, BQ = C::BQ;
  bf16 *sQ = reinterpret_cast<bf16 *>(smem_base());
  bf16 *sdO = sQ + BQ * LDS, *sKV = sdO + BQ * LDS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const QueryTile qt = query_tile<D>(s, BQ, BK);
  const auto [h, b, q0, nq, kh, off, n_kt, q_ld, k_ld, q_base, k_base] = qt;
  const int32_t *doc_q = DOC ? doc + (size_t)b * s.tq + q0 : nullptr;  // the rows' first keys

  load_tile<NT, BQ, D>(sQ, q + q_base, q_ld, nq);
  load_tile<NT, BQ, D>(sdO, dctx + q_base, q_ld, nq);
  const int32_t *sFirst;
  const int kt_begin = first_key_tile<NT, BQ, BK, D, DOC>(
      doc_q, nq, reinterpret_cast<int32_t *>(smem_base() + C::smem), &sFirst, sKV, k, v, k_base,
      k_ld, s.tk);

  float l2[2], Dr[2];
  int lim[2];  // last key rows g, g+8 see; -1 for padding rows
  dq_rows(l2, Dr, lim, lse, Dsum, qt, warp * 16, s);
  // the largest key this warp's rows see; below every key when its rows are all padding
  const int warp_hi = 16 * warp < nq ? off + q0 + min(16 * warp + 15, nq - 1) : -1;
  const int warp_lo = off + q0 + 16 * warp;
  float acc[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int kt = kt_begin; kt < n_kt; kt++) {
    cp_async_wait_all();
    __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1's buffer
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * BK, nk = min(BK, s.tk - k1);
      bf16 *st = sKV + ((kt + 1) & 1) * 2 * BK * LDS;
      load_tile<NT, BK, D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
      load_tile<NT, BK, D>(st + BK * LDS, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
      cp_async_commit();
    }
    const int k0 = kt * BK;
    if (k0 > warp_hi) continue;  // every key of the tile is masked for every row of the warp
    // DOC: the same before the first key of every row; else mask when some row's is past k0
    // (the first keys are read from shared memory in each tile: registers are short)
    bool doc_mask = false;
    if constexpr (DOC) {
      const int f0 = sFirst[warp * 16 + g], f1 = sFirst[warp * 16 + g + 8];
      if (k0 + BK <= __reduce_min_sync(0xffffffffu, min(f0, f1))) continue;
      doc_mask = k0 < __reduce_max_sync(0xffffffffu, max(f0, f1));
    }
    const bf16 *sK = sKV + (kt & 1) * 2 * BK * LDS;
    const bf16 *sV = sK + BK * LDS;

    // S = Q K^T and dP = dO V^T: 16 rows x BK keys per warp
    float sc[NN][4], dp[NN][4];
#pragma unroll
    for (int j = 0; j < NN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) sc[j][e] = dp[j][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
      uint32_t a[4], bb[4];
      ldsm4(a, sQ + addr_a<LDS>(16 * warp, 16 * ks, lane));
#pragma unroll
      for (int jj = 0; jj < NN / 2; jj++) {
        ldsm4(bb, sK + addr_b<LDS>(16 * jj, 16 * ks, lane));
        mma(sc[2 * jj], a, bb[0], bb[1]);
        mma(sc[2 * jj + 1], a, bb[2], bb[3]);
      }
      ldsm4(a, sdO + addr_a<LDS>(16 * warp, 16 * ks, lane));
#pragma unroll
      for (int jj = 0; jj < NN / 2; jj++) {
        ldsm4(bb, sV + addr_b<LDS>(16 * jj, 16 * ks, lane));
        mma(dp[2 * jj], a, bb[0], bb[1]);
        mma(dp[2 * jj + 1], a, bb[2], bb[3]);
      }
    }

    // dS = P (dP - D), P = exp(S - lse)
    bool mask = k0 + BK - 1 > warp_lo || 16 * warp + 16 > nq;
    if constexpr (DOC) mask = mask || doc_mask;
    dq_scores<DOC>(sc, dp, l2, Dr, lim, DOC ? sFirst + warp * 16 + g : nullptr, k0, mask,
                   s.scale_log2);

    // dQ += dS K over 16 keys at a time
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      const uint32_t sa[4] = {pack(dp[2 * kk][0], dp[2 * kk][1]),
                              pack(dp[2 * kk][2], dp[2 * kk][3]),
                              pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int nn = 0; nn < D / 16; nn++) {
        uint32_t bb[4];
        ldsm4_t(bb, sK + addr_a<LDS>(16 * kk, 16 * nn, lane));
        mma(acc[2 * nn], sa, bb[0], bb[1]);
        mma(acc[2 * nn + 1], sa, bb[2], bb[3]);
      }
    }
  }

  store_dq(dq, acc, qt, warp * 16, s);
}

}  // namespace attn_bf16

/* ---- host side ---------------------------------------------------------------------------- */
namespace attn_bf16 {

/* The configurations (per head_dim): warps per block, key tile, blocks per SM asked of the
 * register allocator (none spills at hd 128: 222 / 236 / 250 registers for fwd / dQ / dK-dV,
 * 217 / 240 / 254 for their DOC instantiations; hd 64 spills 8-12 bytes at 128 registers, 16
 * DOC). On an H200 at T 2048, 32/8 heads, hd 128 the forward took 0.152 ms with 8 warps x 64
 * keys, 0.151 with 4 x 64 (two blocks per SM), 0.171 with 8 x 32; dQ 0.206 with 8 x 64, 0.203
 * with 4 x 64 or 8 x 32 (two per SM), 0.215 with 4 x 32: all within noise but the 32-key
 * forward, so the larger tiles stay. */
template <int D>
struct Plan;
template <>
struct Plan<64> {
  static constexpr int FWD_NW = 8, FWD_BK = 64, FWD_MINB = 2;
  static constexpr int DQ_NW = 8, DQ_BK = 64, DQ_MINB = 2;
  static constexpr int DKV_MINB = 2;
};
template <>
struct Plan<128> {
  static constexpr int FWD_NW = 8, FWD_BK = 64, FWD_MINB = 1;
  static constexpr int DQ_NW = 8, DQ_BK = 64, DQ_MINB = 1;
  static constexpr int DKV_MINB = 1;
};

template <int D, int NW, int BK, int MINB>
static void launch_fwd(bf16 *ctx, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       const Shape &d) {
  using C = FwdCfg<D, NW, BK>;
  // documents (doc_start) or plain causal: one instantiation each
  auto *kernel = d.doc ? attn_bf16_fwd_kernel<D, NW, BK, MINB, true>
                       : attn_bf16_fwd_kernel<D, NW, BK, MINB, false>;
  const size_t smem = C::smem + (d.doc ? C::DOC_BYTES : 0);
  static bool done[2] = {false, false};
  cuda_allow_smem(kernel, smem, &done[d.doc != nullptr]);
  dim3 grid(d.heads, (d.tq + C::BQ - 1) / C::BQ, d.batch);
  kernel<<<grid, C::NT, smem, cuda_ctx.stream>>>(ctx, lse, q, k, v, d, d.doc);
  CUDA_LAUNCHED("attn_bf16_fwd_kernel");
}

int dkdv_parts(const Shape &d, int hd, long blocks, long slots, const float *Dsum,
               float **part) {
  int nsplit = 1;
  while (nsplit < d.group && blocks * nsplit < slots) {
    nsplit++;
    while (d.group % nsplit) nsplit++;
  }
  *part = nullptr;
  if (nsplit == 1) return 1;
  // the planes go past D, which the caller may keep in the arena; in place when they do not fit
  const size_t plane = (size_t)d.batch * d.tk * d.kv_heads * hd;
  const size_t rows = (size_t)d.batch * d.heads * d.tq;
  *part = (float *)cuda_scratch_after(Dsum + rows, 2 * (size_t)nsplit * plane * sizeof(float));
  return *part ? nsplit : 1;
}

void dkdv_reduce(bf16 *dk, bf16 *dv, const float *part, const Dims &d, int hd, int nsplit) {
  const size_t n4 = (size_t)d.batch * d.tk * d.kv_heads * hd / 4;
  const size_t cap = (size_t)cuda_ctx.sm_count * 16;
  const int blocks = (int)((n4 + 255) / 256 < cap ? (n4 + 255) / 256 : cap);
  attn_bf16_dkdv_reduce<<<blocks, 256, 0, cuda_ctx.stream>>>(dk, dv, part, d, hd, nsplit);
  CUDA_LAUNCHED("attn_bf16_dkdv_reduce");
}

template <int D, int MINB, bool DOC>
static void launch_dkdv(bf16 *dk, bf16 *dv, const bf16 *dctx, const bf16 *q, const bf16 *k,
                        const bf16 *v, const float *lse, const float *Dsum, const Shape &d) {
  using C = DkvCfg<D, DOC>;
  // One block per (key tile, kv head) sums the whole group in place when there are at least
  // as many blocks as resident slots (SMs x MINB): the longest blocks go first and the shorter
  // ones fill in behind them (measured at T 2048, 32/8 heads, hd 128, 256 blocks on 132 SMs:
  // 0.32 ms in place against 0.35 ms cut in 4 with the planes). With fewer blocks (short or
  // few sequences) the group is cut into the fewest parts that fill the slots.
  const long blocks = (long)d.kv_heads * ((d.tk + C::BK - 1) / C::BK) * d.batch;
  float *part;
  const int nsplit = dkdv_parts(d, D, blocks, (long)cuda_ctx.sm_count * MINB, Dsum, &part);
  static bool done = false;
  cuda_allow_smem(attn_bf16_dkdv_kernel<D, MINB, DOC>, C::smem, &done);
  dim3 grid(d.kv_heads * nsplit, (d.tk + C::BK - 1) / C::BK, d.batch);
  attn_bf16_dkdv_kernel<D, MINB, DOC>
      <<<grid, C::NT, C::smem, cuda_ctx.stream>>>(dk, dv, part, dctx, q, k, v, lse, Dsum, d,
                                                   nsplit, d.doc);
  CUDA_LAUNCHED("attn_bf16_dkdv_kernel");
  if (nsplit > 1) dkdv_reduce(dk, dv, part, d, D, nsplit);
}

template <int D, int NW, int BK, int MINB>
static void launch_dq(bf16 *dq, const bf16 *dctx, const bf16 *q, const bf16 *k, const bf16 *v,
                      const float *lse, const float *Dsum, const Shape &d) {
  using C = DqCfg<D, NW, BK>;
  auto *kernel = d.doc ? attn_bf16_dq_kernel<D, NW, BK, MINB, true>
                       : attn_bf16_dq_kernel<D, NW, BK, MINB, false>;
  const size_t smem = C::smem + (d.doc ? C::DOC_BYTES : 0);
  static bool done[2] = {false, false};
  cuda_allow_smem(kernel, smem, &done[d.doc != nullptr]);
  dim3 grid(d.heads, (d.tq + C::BQ - 1) / C::BQ, d.batch);
  kernel<<<grid, C::NT, smem, cuda_ctx.stream>>>(dq, dctx, q, k, v, lse, Dsum, d, d.doc);
  CUDA_LAUNCHED("attn_bf16_dq_kernel");
}

template <int D>
static size_t fwd_smem(bool doc) {
  using C = FwdCfg<D, Plan<D>::FWD_NW, Plan<D>::FWD_BK>;
  return C::smem + (doc ? C::DOC_BYTES : 0);
}
template <int D>
static size_t bwd_smem(bool doc) {
  using Q = DqCfg<D, Plan<D>::DQ_NW, Plan<D>::DQ_BK>;
  const size_t a = doc ? DkvCfg<D, true>::smem : DkvCfg<D, false>::smem;
  const size_t b = Q::smem + (doc ? Q::DOC_BYTES : 0);
  return a > b ? a : b;
}

template <int D>
static void forward(bf16 *ctx, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                    const Shape &d) {
  using P = Plan<D>;
  launch_fwd<D, P::FWD_NW, P::FWD_BK, P::FWD_MINB>(ctx, lse, q, k, v, d);
}

template <int D>
static void backward(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dctx, const bf16 *q,
                     const bf16 *k, const bf16 *v, const float *lse, const float *Dsum,
                     const Shape &d) {
  using P = Plan<D>;
  if ((dk || dv) && d.doc)
    launch_dkdv<D, P::DKV_MINB, true>(dk, dv, dctx, q, k, v, lse, Dsum, d);
  else if (dk || dv)
    launch_dkdv<D, P::DKV_MINB, false>(dk, dv, dctx, q, k, v, lse, Dsum, d);
  if (dq) launch_dq<D, P::DQ_NW, P::DQ_BK, P::DQ_MINB>(dq, dctx, q, k, v, lse, Dsum, d);
}

}  // namespace attn_bf16

extern "C" int cuda_attention_bf16_forward(void *ctx, float *lse, const void *q, const void *k,
                                           const void *v, const struct attn_shape *s) {
  using namespace attn_bf16;
  Shape d;
  const bool doc = s->doc_start != NULL;
  if (!make_dims(&d, s) || !aligned16_all(ctx, q, k, v)) return 0;
  if (attn_wg::forward((bf16 *)ctx, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, d,
                       s->head_dim))
    return 1;
  if ((size_t)cuda_smem_optin() < (s->head_dim == 64 ? fwd_smem<64>(doc) : fwd_smem<128>(doc)))
    return 0;
  with_head_dim(s->head_dim, [&](auto hd) {
    forward<hd.value>((bf16 *)ctx, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, d);
  });
  return 1;
}

extern "C" int cuda_attention_bf16_backward(void *dq, void *dk, void *dv, const void *dctx,
                                            const void *q, const void *k, const void *v,
                                            const float *lse, const float *D,
                                            const struct attn_shape *s, int acc) {
  using namespace attn_bf16;
  Shape d;
  const bool doc = s->doc_start != NULL;
  if (!make_dims(&d, s) || !aligned16_all(q, k, v, dctx, dq, dk, dv)) return 0;
  d.acc = (acc & ACC_DX) != 0;
  if (!dq && !dk && !dv) return 1;
  if (attn_wg::backward((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dctx, (const bf16 *)q,
                        (const bf16 *)k, (const bf16 *)v, lse, D, d, s->head_dim))
    return 1;
  if ((size_t)cuda_smem_optin() < (s->head_dim == 64 ? bwd_smem<64>(doc) : bwd_smem<128>(doc)))
    return 0;
  with_head_dim(s->head_dim, [&](auto hd) {
    backward<hd.value>((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dctx, (const bf16 *)q,
                       (const bf16 *)k, (const bf16 *)v, lse, D, d);
  });
  return 1;
}
