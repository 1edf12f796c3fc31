/* Causal grouped-query attention on the GPU: the dispatcher, and generic flash-attention kernels
 * with fp32 FMA arithmetic (no tensor cores) for any shape. They follow the CPU backend,
 * kernels/cpu/cpu_attention.c: q, ctx [batch*tq, heads, head_dim]; k, v rows of sequence b from
 * b*k_stride; query i at position tk - tq + i sees keys 0 .. tk - tq + i, or with document
 * masking (attn_shape.doc_start, packed sequences) keys doc_start[row] .. tk - tq + i; query
 * head h reads kv head h / (heads/kv_heads) in place; scale head_dim^-0.5; lse
 * [batch, heads, tq] = log sum exp of the scaled scores.
 *
 * Documents. Every kernel is instantiated twice: DOC = false for plain causal attention, whose
 * code is the same as without document masking (doc_start is an extra kernel argument it never
 * reads), and DOC = true, picked when doc_start is set. A masked score contributes nothing,
 * exactly as one past the causal limit. DOC kernels also skip what is masked entirely: the
 * forward and dQ start at the key tile of the smallest first key of their query tile, dK/dV
 * skips the query tiles none of whose rows' documents start at or before its last key.
 *
 * Storage. The kernels are templates over the storage type T (float or bf16, cuda_dtype.cuh) of
 * q, k, v, ctx and their gradients; lse and D are fp32 always. Tiles are converted to fp32 as
 * they are staged in shared memory and results rounded to T only when written, so the arithmetic
 * is the same for both types, and the float instantiation is the "fp32 mode" tested against the
 * CPU backend. The dispatcher runs the bf16 mode's tensor-core kernels (cuda_attention_bf16.cu,
 * which runs Hopper's wgmma ones of cuda_attention_wgmma.cu first where they take the shape)
 * where they take the shape, and these kernels for everything else (the fp32 and tf32 modes
 * included: TF32 applies to GEMMs only).
 *
 * Algorithm. Every kernel works on a tile of BQ queries x BK keys held in shared memory by 256
 * threads laid out 16 x 16: thread (ty, tx) owns a few contiguous rows (ty*R ...) and the strided
 * columns tx, tx+16, ... of the score tile, plus a register tile of the head_dim-wide output.
 * head_dim is padded with zeros up to a compile-time DM (32, 64 or 128); the zero lanes add
 * exact zeros to every dot product, so any head_dim from 1 to 128 works. Rows and keys past
 * the end of a tile are zero-filled and masked.
 *  - forward, one block per (query tile, head, sequence): the Q tile stays in shared memory
 *    while the block walks the key tiles 0 .. the last one its causal rows can see, computing
 *    S = scale * Q K^T, the online softmax (running max m and sum l per row) and O += P V.
 *    ctx = O / l, lse = m + log(l). When there are too few query tiles to fill the GPU
 *    (decoding, tq = 1), the key tiles are split among several blocks per query tile (at most
 *    64, at least 2 key tiles each); each writes its unnormalized (O, m, l) to fp32 scratch and
 *    attn_fwd_combine_kernel merges them in split order.
 *  - backward, three kernels: (0) D_i = dctx_i . ctx_i, one warp per row; (1) one block per
 *    (key tile, kv head, sequence) walks every query head of its group and every query tile
 *    that sees its keys, rebuilds P = exp(S - lse) and dS = P (dP - D) with dP = dO V^T, and
 *    accumulates dV += P^T dO and dK += dS^T Q in registers, added once to dk, dv at the end;
 *    (2) one block per (query tile, head, sequence) walks its key tiles, rebuilds dS the same
 *    way and accumulates dQ += dS K, added once to dq. No T x T matrix ever exists in memory.
 *    Both kernels recompute P; K and V are never expanded per query head. "Added" is
 *    "written" when the call has no ACC_DX (ops.h): the old value is then not read.
 *
 * Deterministic: every output element is owned by exactly one thread of one block, which sums
 * its terms in a fixed order (d, key and query loops run in index order, but for decoding's
 * scores: each slice of the head dims in order, then the slices in order; grouped query heads in
 * head order; key splits merged in split order); row max and row sum use a fixed xor-shuffle
 * tree whose result is the same in every lane; there are no atomics and nothing depends on block
 * scheduling. Same inputs on the same GPU model, same bits (the number of key splits follows the
 * SM count, so another GPU model may round differently).
 *
 * Tiles (queries x keys, fastest measured on H200): forward 64x64 for head_dim <= 64, 64x32 for
 * head_dim 128 (77 KB, two blocks per SM), 16 x 64 when tq <= 16; dK/dV 64 keys x 64 queries
 * (172 KB at head_dim 128, one block per SM); dQ 64x64, 64x32 at head_dim 128. Where a block
 * cannot have that much shared memory (sm_120/121: 99 KB) dK/dV and dQ fall back to 32x32. */
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_device.h"
#include "kernels/cuda/cuda_dtype.cuh"

namespace {

constexpr int NT = 256;  // threads per block, 16 x 16
constexpr int PAD = 4;   // floats of padding per shared-memory row (keeps 16-byte alignment)

struct Dims {
  int batch, tq, tk, k_stride, heads, kv_heads, head_dim, group;
  float scale;
  bool vec4;  // head_dim % 4 == 0 and every tensor 16-byte aligned: float4 loads of fp32 storage
  bool acc;   // the backward adds into dq, dk, dv (ACC_DX) rather than overwriting them
};

// The host's view: Dims and attn_shape.doc_start, which goes to the kernels as an argument of
// its own (read only by their DOC instantiations).
struct Shape : Dims {
  const int32_t *doc;
};

// N consecutive floats of shared memory (N-float aligned) into registers.
template <int N>
__device__ __forceinline__ void lds(float (&dst)[N], const float *src) {
  if constexpr (N == 4) {
    float4 t = *reinterpret_cast<const float4 *>(src);
    dst[0] = t.x, dst[1] = t.y, dst[2] = t.z, dst[3] = t.w;
  } else if constexpr (N == 2) {
    float2 t = *reinterpret_cast<const float2 *>(src);
    dst[0] = t.x, dst[1] = t.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; i++) dst[i] = src[i];
  }
}

template <int N>
__device__ __forceinline__ void sts(float *dst, const float (&src)[N]) {
  if constexpr (N == 4) {
    *reinterpret_cast<float4 *>(dst) = make_float4(src[0], src[1], src[2], src[3]);
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2 *>(dst) = make_float2(src[0], src[1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; i++) dst[i] = src[i];
  }
}

/* acc[r][c] += sum over d of bt[d][ty*R + r] * a[tx + 16c][d]: one thread's R x C tile of a
 * product of two shared-memory tiles, `a` stored by rows (ld a_ld), `bt` stored transposed
 * (ld bt_ld). Every product of scores (S, dP and their transposes) is this loop; the order of
 * the sums is fixed, so results repeat bit for bit. */
template <int DM, int R, int C>
__device__ __forceinline__ void tile_dot(float (&acc)[R][C], const float *a, int a_ld,
                                         const float *bt, int bt_ld) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 2
  for (int d = 0; d < DM; d += 4) {
    float af[C][4];
#pragma unroll
    for (int c = 0; c < C; c++) lds<4>(af[c], a + (tx + 16 * c) * a_ld + d);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      float bf[R];
      lds<R>(bf, bt + (d + e) * bt_ld + ty * R);
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < C; c++) acc[r][c] = fmaf(bf[r], af[c][e], acc[r][c]);
    }
  }
}

// Reductions over the 16 lanes that share ty (one half of a warp). Each step combines a lane
// with its xor partner; + and max are commutative, so both lanes get the same bits.
__device__ __forceinline__ float half_warp_max(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float half_warp_sum(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Document masking: the smallest of first[0 .. n) (n <= NT), in every thread of the block,
// through NT / 32 floats of shared memory `part`. One barrier; part is read after it, so
// nothing may write there before the next one.
__device__ __forceinline__ int block_min(const int32_t *first, int n, float *part) {
  int *p = reinterpret_cast<int *>(part);
  const int x =
      __reduce_min_sync(0xffffffffu, (int)threadIdx.x < n ? first[threadIdx.x] : INT_MAX);
  if ((threadIdx.x & 31) == 0) p[threadIdx.x >> 5] = x;
  __syncthreads();
  int m = p[0];
#pragma unroll
  for (int w = 1; w < NT / 32; w++) m = min(m, p[w]);
  return m;
}

// Loads rows [0, n) of a [rows][ld_g] global matrix of storage type T (head_dim hd columns used)
// into fp32 shared memory, zero-filling rows >= n and columns >= hd up to DM.
//   TRANSPOSE = false: s[row * (DM + PAD) + d];  TRANSPOSE = true: s[d * (ROWS + PAD) + row].
// vec4 (hd and ld_g multiples of 4, g 16-byte aligned): the row-major copy of fp32 storage moves
// float4s; bf16 storage takes the element-wise path.
template <int DM, int ROWS, bool TRANSPOSE, typename T>
__device__ __forceinline__ void load_tile(float *s, const T *g, size_t ld_g, int n, int hd,
                                          bool vec4) {
  if constexpr (!TRANSPOSE && std::is_same_v<T, float>) {
    if (vec4) {
      for (int idx = threadIdx.x; idx < ROWS * DM / 4; idx += NT) {
        int r = idx / (DM / 4), d = idx % (DM / 4) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < n && d < hd) x = *reinterpret_cast<const float4 *>(g + (size_t)r * ld_g + d);
        *reinterpret_cast<float4 *>(s + r * (DM + PAD) + d) = x;
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < ROWS * DM; idx += NT) {
    int r = idx / DM, d = idx % DM;
    float x = 0.0f;
    if (r < n && d < hd) x = load_f(g + (size_t)r * ld_g + d);
    if (TRANSPOSE)
      s[d * (ROWS + PAD) + r] = x;
    else
      s[r * (DM + PAD) + d] = x;
  }
}

// Columns of the head_dim-wide register tiles: thread tx owns NC = DM/16 columns, in NCH chunks
// of VEC consecutive floats: column = ch * 16 * VEC + tx * VEC + e.
template <int DM>
struct Cols {
  static constexpr int NC = DM / 16, VEC = NC < 4 ? NC : 4, NCH = NC / VEC;
  static __device__ __forceinline__ int col(int tx, int ch, int e) {
    return ch * 16 * VEC + tx * VEC + e;
  }
};

/* ------------------------------------------------------------------------------------------ */
/* forward */

template <int DM, int BQ, int BK>
struct Fwd {
  static constexpr int RQ = BQ / 16, RK = BK / 16;
  static constexpr int QT_LD = BQ + PAD;  // sQt [DM][QT_LD]  Q transposed
  static constexpr int K_LD = DM + PAD;   // sK, sV [BK][K_LD]
  static constexpr int PT_LD = BQ + PAD;  // sPt [BK][PT_LD]  P transposed
  static constexpr size_t smem = sizeof(float) * ((size_t)DM * QT_LD + 2 * BK * K_LD + BK * PT_LD);
};

template <typename T, int DM, int BQ, int BK, bool DOC>
__global__ void __launch_bounds__(NT, 2)  // <= 128 registers: two blocks per SM
    attn_fwd_kernel(T *__restrict__ ctx, float *__restrict__ lse, const T *__restrict__ q,
                    const T *__restrict__ k, const T *__restrict__ v, Dims s, int n_split,
                    float *__restrict__ part_o, float *__restrict__ part_ml,
                    const int32_t *__restrict__ doc) {
  using C = Fwd<DM, BQ, BK>;
  using CC = Cols<DM>;
  constexpr int RQ = C::RQ, RK = C::RK;
  extern __shared__ float4 smem_f4[];
  float *sQt = reinterpret_cast<float *>(smem_f4);
  float *sK = sQt + DM * C::QT_LD;
  float *sV = sK + BK * C::K_LD;
  float *sPt = sV + BK * C::K_LD;

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int b = blockIdx.z, h = blockIdx.y;
  const int split = blockIdx.x % n_split;
  const int q0 = (gridDim.x / n_split - 1 - blockIdx.x / n_split) * BQ;  // longest rows first
  const int nq = min(BQ, s.tq - q0);
  const int kh = h / s.group, hd = s.head_dim, off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * hd, k_ld = (size_t)s.kv_heads * hd;
  const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * hd;
  const size_t k_base = (size_t)b * s.k_stride * k_ld + (size_t)kh * hd;

  // key tiles kt_first .. n_kt - 1 reach from the first key of the rows' documents (DOC; else
  // key 0) to the last row's last key; split `split` of n_split takes [kt_begin, kt_end) of
  // them (n_split = 1: all)
  const int32_t *doc_q = DOC ? doc + (size_t)b * s.tq + q0 : nullptr;  // the rows' first keys
  int kt_first = 0;
  if constexpr (DOC) kt_first = block_min(doc_q, nq, sK) / BK;  // sK: filled after a barrier
  const int n_kt = (off + q0 + nq - 1) / BK + 1;
  const int per_split = (n_kt - kt_first + n_split - 1) / n_split;
  const int kt_begin = kt_first + split * per_split, kt_end = min(n_kt, kt_begin + per_split);

  load_tile<DM, BQ, true>(sQt, q + q_base, q_ld, nq, hd, s.vec4);

  float o[RQ][CC::NC], m[RQ], l[RQ];
  int lim[RQ];    // last key each row sees (clamped to tk - 1 for the padding rows)
  int first[RQ];  // DOC: first key each row sees (0 for the padding rows)
#pragma unroll
  for (int r = 0; r < RQ; r++) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    lim[r] = min(off + q0 + ty * RQ + r, s.tk - 1);
    first[r] = DOC && ty * RQ + r < nq ? doc_q[ty * RQ + r] : 0;
#pragma unroll
    for (int n = 0; n < CC::NC; n++) o[r][n] = 0.0f;
  }

  for (int kt = kt_begin; kt < kt_end; kt++) {
    const int k0 = kt * BK, nk = min(BK, s.tk - k0);
    __syncthreads();  // the previous tile's sK, sV, sPt are no longer read
    load_tile<DM, BK, false>(sK, k + k_base + (size_t)k0 * k_ld, k_ld, nk, hd, s.vec4);
    load_tile<DM, BK, false>(sV, v + k_base + (size_t)k0 * k_ld, k_ld, nk, hd, s.vec4);
    __syncthreads();

    // S = Q K^T: rows ty*RQ + r, keys tx + 16c
    float sc[RQ][RK];
#pragma unroll
    for (int r = 0; r < RQ; r++)
#pragma unroll
      for (int c = 0; c < RK; c++) sc[r][c] = 0.0f;
    tile_dot<DM>(sc, sK, C::K_LD, sQt, C::QT_LD);

    // online softmax; P goes to sPt[key][row]
#pragma unroll
    for (int r = 0; r < RQ; r++) {
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < RK; c++) {
        const int key = k0 + tx + 16 * c;
        sc[r][c] = key <= lim[r] && (!DOC || key >= first[r]) ? sc[r][c] * s.scale : -INFINITY;
        mx = fmaxf(mx, sc[r][c]);
      }
      mx = half_warp_max(mx);
      // Without documents every row sees key 0, so without splits m_new is finite from the
      // first tile on; a later split, or a tile before the row's document, may see no key of
      // a row yet (m_new = -inf), then it stays empty.
      const float m_new = fmaxf(m[r], mx), m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[r] - m_use);  // 0 while m = -inf
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < RK; c++) {
        sc[r][c] = expf(sc[r][c] - m_use);  // masked: exp(-inf) = 0
        sum += sc[r][c];
      }
      sum = half_warp_sum(sum);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
#pragma unroll
      for (int n = 0; n < CC::NC; n++) o[r][n] *= alpha;
    }
#pragma unroll
    for (int c = 0; c < RK; c++) {
      float p[RQ];
#pragma unroll
      for (int r = 0; r < RQ; r++) p[r] = sc[r][c];
      sts<RQ>(sPt + (tx + 16 * c) * C::PT_LD + ty * RQ, p);
    }
    __syncthreads();

    // O += P V (keys past tk have P = 0 and zero V rows)
#pragma unroll 4
    for (int j = 0; j < BK; j++) {
      float pf[RQ];
      lds<RQ>(pf, sPt + j * C::PT_LD + ty * RQ);
#pragma unroll
      for (int ch = 0; ch < CC::NCH; ch++) {
        float vf[CC::VEC];
        lds<CC::VEC>(vf, sV + j * C::K_LD + CC::col(tx, ch, 0));
#pragma unroll
        for (int r = 0; r < RQ; r++)
#pragma unroll
          for (int e = 0; e < CC::VEC; e++)
            o[r][ch * CC::VEC + e] = fmaf(pf[r], vf[e], o[r][ch * CC::VEC + e]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RQ; r++) {
    const int row = ty * RQ + r;
    if (row >= nq) continue;
    if (n_split == 1) {
      const float inv = 1.0f / l[r];
      T *out = ctx + q_base + (size_t)row * q_ld;
#pragma unroll
      for (int ch = 0; ch < CC::NCH; ch++)
#pragma unroll
        for (int e = 0; e < CC::VEC; e++) {
          const int d = CC::col(tx, ch, e);
          if (d < hd) store_f(out + d, o[r][ch * CC::VEC + e] * inv);
        }
      if (tx == 0) lse[((size_t)b * s.heads + h) * s.tq + q0 + row] = m[r] + logf(l[r]);
    } else {  // the unnormalized partial of this split, for attn_fwd_combine_kernel
      const size_t prow =
          (size_t)split * s.batch * s.tq * s.heads + ((size_t)b * s.tq + q0 + row) * s.heads + h;
      float *out = part_o + prow * hd;
#pragma unroll
      for (int ch = 0; ch < CC::NCH; ch++)
#pragma unroll
        for (int e = 0; e < CC::VEC; e++) {
          const int d = CC::col(tx, ch, e);
          if (d < hd) out[d] = o[r][ch * CC::VEC + e];
        }
      if (tx == 0) part_ml[2 * prow] = m[r], part_ml[2 * prow + 1] = l[r];
    }
  }
}

// Decoding's key splits (attn_decode_kernel below): split j of n_split takes the keys
// [j kps, (j + 1) kps) of its sequence, kps = dec_keys_per_split(last, n_split), from the keys
// the step reads, 0 .. last, not from the cache's rows: a long cache early in a generation
// (4096 rows, 192 keys) then splits its keys as a short one does (6 splits of 32 keys, one
// tile a block) instead of leaving them to the first split's block (6 tiles in a chain: 21.1
// against 7.9 us a link, bench/NOTES.md, session 18). A multiple of DEC_SPLIT_KEYS; a split
// past the last key holds none, and its block writes an empty partial (m = -inf, l = 0) that
// the merge weighs 0, as the splits past a short sequence's last key did (a merge that read
// only the live splits, from key_last, cost a full cache 2.3 us more a link: session 22). At
// last = tk - 1 this is the host's kps (launch_decode), so a full cache splits as it did; so
// does every step of one to three sequences of Qwen3-4B in a cache of 192 rows (kps 32 either
// way), while 4 to 16 sequences' early steps now take more, shorter splits (other roundings).
// (A last outside 0 .. tk - 1 breaks ops.h's contract; the max keeps kps 32 even at -1.)
constexpr int DEC_SPLIT_KEYS = 32;   // keys per split at least, and their multiple
__device__ __forceinline__ int dec_keys_per_split(int last, int n_split) {
  return max(1, ((last + n_split) / n_split + DEC_SPLIT_KEYS - 1) / DEC_SPLIT_KEYS) *
         DEC_SPLIT_KEYS;
}

// Merges the n_split partials of each row, in split order: with M = max m_s and
// w_s = exp(m_s - M), ctx = sum w_s O_s / L and lse = M + log L, L = sum w_s l_s. One thread
// per (row, d).
template <typename T>
__global__ void __launch_bounds__(NT)
    attn_fwd_combine_kernel(T *__restrict__ ctx, float *__restrict__ lse,
                            const float *__restrict__ part_o, const float *__restrict__ part_ml,
                            Dims s, int n_split) {
  pdl_wait();
  pdl_release();
  const size_t rows = (size_t)s.batch * s.tq * s.heads;
  const size_t idx = (size_t)blockIdx.x * NT + threadIdx.x;
  if (idx >= rows * s.head_dim) return;
  const size_t row = idx / s.head_dim;  // (b * tq + i) * heads + h
  const int d = (int)(idx % s.head_dim);
  // unrolled so that several splits' loads are in flight: the loops are latency, not bytes
  float M = -INFINITY;
#pragma unroll 8
  for (int sp = 0; sp < n_split; sp++) M = fmaxf(M, part_ml[2 * (sp * rows + row)]);
  float L = 0.0f, acc = 0.0f;
#pragma unroll 8
  for (int sp = 0; sp < n_split; sp++) {
    const size_t pr = sp * rows + row;
    const float w = expf(part_ml[2 * pr] - M);  // 0 for an empty split (m = -inf)
    L = fmaf(w, part_ml[2 * pr + 1], L);
    acc = fmaf(w, part_o[pr * s.head_dim + d], acc);
  }
  store_f(ctx + idx, acc / L);
  if (d == 0) {
    const int h = (int)(row % s.heads);
    const size_t bi = row / s.heads;
    const int i = (int)(bi % s.tq);
    const size_t b = bi / s.tq;
    lse[(b * s.heads + h) * s.tq + i] = M + logf(L);
  }
}

/* ------------------------------------------------------------------------------------------ */
/* decode: one query per sequence (tq == 1) against a KV cache
 *
 * One block per (kv head, key split, sequence) serves every query head of the group, so each
 * cached key and value is read once per group, not once per query head. A decoding step gives a
 * block a few dozen to a few hundred keys: its time is a chain of latencies, not bytes. With one
 * warp per scheduler the chain was every instruction's (session 18: ~7 us a block for 32 keys,
 * 6 cycles an instruction), so the block has DEC_NT = 512 threads that split each step of a
 * tile of DEC_TILE keys among them, a few instructions each:
 *  - stage: the tile's K and V rows, loaded 16 bytes at a time while the block still works on the
 *    previous tile, into shared memory as fp32 (K's rows padded by 4 floats, so that at head_dim
 *    64 or 128 the 32 lanes reading 32 rows 16 bytes each hit every bank once per quarter warp);
 *  - scores: warp w takes query head h = w / S and the S-th slice sl = w % S of the head dims
 *    (S the largest power of 2 with S x group <= 16), lane j the partial dot of key j over that
 *    slice;
 *  - softmax: warp h adds key j's S partials in slice order, and keeps the head's running max
 *    m and sum l (a fixed shuffle tree, the same bits in every lane);
 *  - P V: thread t owns outputs (head, dim) t, t + DEC_NT, ..., rescales them by the tile's
 *    alpha and adds the tile's keys in key order.
 * The keys end at attn_shape.key_last[b] when set (a cache of a fixed size, read up to the
 * current token: the same launch at every step) and start at doc_start[b]. Splits leave
 * unnormalized partials that attn_fwd_combine_kernel merges in split order, as for the forward
 * above; their size comes from the keys the step reads (dec_keys_per_split), the grid's count
 * from the cache's rows. */

constexpr int DEC_NT = 512;                       // threads per block
constexpr int DEC_NW = DEC_NT / 32;               // warps: the group's heads x slices
constexpr int DEC_TILE = 32;                      // keys per tile: a lane each
static_assert(DEC_SPLIT_KEYS % DEC_TILE == 0, "a key split is whole tiles");
constexpr int DEC_OUTS = CUDA_DECODE_MAX_GROUP * 128 / DEC_NT;   // outputs a thread owns
static_assert(DEC_NW == CUDA_DECODE_MAX_GROUP, "a warp for each query head of a full group");

// A tile's K and V rows j0 .. j0 + n - 1 in flight: every load issued before any is used.
template <typename T>
struct DecTile {
  static constexpr int V = 16 / sizeof(T);                      // values a 16-byte load
  static constexpr int LOADS = 2 * DEC_TILE * 128 / V / DEC_NT;   // a thread's, head_dim 128
  uint4 raw[LOADS];

  // f(u, is_k, r, e) for each chunk c = threadIdx.x + u * DEC_NT of the tile this thread has:
  // V values of K (c < n * hd / V) or of V, row r, from column e
  template <class F>
  static __device__ __forceinline__ void chunks(int n, int hd, F f) {
    const int per_row = hd / V, half = n * per_row;
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
      const int c = threadIdx.x + u * DEC_NT;
      if (c < 2 * half) {
        const int cc = c < half ? c : c - half;
        f(u, c < half, cc / per_row, cc % per_row * V);
      }
    }
  }
  __device__ __forceinline__ void load(const T *kb, const T *vb, size_t ld, int j0, int n,
                                       int hd) {
    chunks(n, hd, [&](int u, bool is_k, int r, int e) {
      raw[u] = *reinterpret_cast<const uint4 *>((is_k ? kb : vb) + (j0 + r) * ld + e);
    });
  }
  // the V values of a load in fp32 (bf16: the upper half of a float's bits, exactly)
  static __device__ __forceinline__ void unpack(float *dst, const uint4 &r, const float *) {
    *reinterpret_cast<uint4 *>(dst) = r;
  }
  static __device__ __forceinline__ void unpack(float *dst, const uint4 &r, const bf16 *) {
    reinterpret_cast<float4 *>(dst)[0] =
        make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u),
                    __uint_as_float(r.y << 16), __uint_as_float(r.y & 0xffff0000u));
    reinterpret_cast<float4 *>(dst)[1] =
        make_float4(__uint_as_float(r.z << 16), __uint_as_float(r.z & 0xffff0000u),
                    __uint_as_float(r.w << 16), __uint_as_float(r.w & 0xffff0000u));
  }
  // ... then stored in fp32: sk [DEC_TILE][kld], sv [DEC_TILE][hd]
  __device__ __forceinline__ void stage(float *sk, float *sv, int kld, int n, int hd) const {
    chunks(n, hd, [&](int u, bool is_k, int r, int e) {
      unpack(is_k ? sk + r * kld + e : sv + r * hd + e, raw[u], (const T *)nullptr);
    });
  }
};

// The same tile a value at a time, where rows are not 16-byte aligned or head_dim is not a
// multiple of a load (the tests' odd shapes; no prefetch); K's columns hd .. kld - 5 are zeros.
template <typename T>
__device__ __forceinline__ void dec_stage_scalar(float *sk, float *sv, int kld, const T *kb,
                                                 const T *vb, size_t ld, int j0, int n, int hd) {
  const int kw = kld - 4;   // K's columns, head_dim rounded up to 4
  for (int c = threadIdx.x; c < n * (kw + hd); c += DEC_NT) {
    const int r = c / (kw + hd), e = c % (kw + hd);
    if (e < kw) sk[r * kld + e] = e < hd ? load_f(kb + (j0 + r) * ld + e) : 0.0f;
    else sv[r * hd + e - kw] = load_f(vb + (j0 + r) * ld + e - kw);
  }
}

__device__ __forceinline__ float dec_warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float dec_warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(DEC_NT, 1)   // (without the 1, ptxas keeps 64 registers)
    attn_decode_kernel(T *__restrict__ ctx, float *__restrict__ lse, const T *__restrict__ q,
                       const T *__restrict__ k, const T *__restrict__ v, Dims s, int slices,
                       const int32_t *__restrict__ doc_start,
                       const int32_t *__restrict__ key_last, float *__restrict__ part_o,
                       float *__restrict__ part_ml) {
  extern __shared__ float4 dec_smem4[];
  pdl_wait();
  pdl_release();
  const int kh = blockIdx.x, split = blockIdx.y, b = blockIdx.z, n_split = gridDim.y;
  const int last = key_last ? key_last[b] : s.tk - 1;
  const int first = doc_start ? doc_start[b] : 0;   // (its load beside last's)
  const int keys_per_split = dec_keys_per_split(last, n_split);
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, hd = s.head_dim, group = s.group;
  const int hd4 = (hd + 3) & ~3, kld = hd4 + 4;   // q's and K's rows, zero-padded
  float *sq = reinterpret_cast<float *>(dec_smem4);   // [group][hd4] the queries, scaled
  float *sk = sq + group * hd4;                       // [DEC_TILE][kld]
  float *sv = sk + DEC_TILE * kld;                    // [DEC_TILE][hd]
  float *sps = sv + DEC_TILE * hd;                    // [slices][group][DEC_TILE] partial scores
  float *sp = sps + slices * group * DEC_TILE;        // [group][DEC_TILE] probabilities
  float *sa = sp + group * DEC_TILE;   // [group] the tile's rescale; at the end [group][2] m, l
  const size_t q_row = ((size_t)b * s.heads + (size_t)kh * group) * hd;
  for (int i = t; i < group * hd4; i += DEC_NT) {
    const int h = i / hd4, e = i % hd4;
    sq[i] = e < hd ? s.scale * load_f(q + q_row + (size_t)h * hd + e) : 0.0f;
  }
  const int k0 = max(first, split * keys_per_split);
  const int k1 = min(last + 1, (split + 1) * keys_per_split);
  const size_t ld = (size_t)s.kv_heads * hd;
  const T *kb = k + (size_t)b * s.k_stride * ld + (size_t)kh * hd;
  const T *vb = v + (size_t)b * s.k_stride * ld + (size_t)kh * hd;
  const bool vec = s.vec4 && hd % DecTile<T>::V == 0;
  DecTile<T> tile;
  if (vec && k0 < k1) tile.load(kb, vb, ld, k0, min(DEC_TILE, k1 - k0), hd);
  // scores: warp w, head w / slices, dims [e0, e1) of its slice (a multiple of 4 wide)
  const int sh = warp / slices, sl = warp % slices;
  const int sw = ((hd4 + slices - 1) / slices + 3) & ~3;
  const int e0 = min(hd4, sl * sw), e1 = min(hd4, e0 + sw);
  float m = -INFINITY, l = 0.0f, o[DEC_OUTS];   // m, l: warp h < group's, of head h
#pragma unroll
  for (int i = 0; i < DEC_OUTS; i++) o[i] = 0.0f;
  for (int j0 = k0; j0 < k1; j0 += DEC_TILE) {
    const int n = min(DEC_TILE, k1 - j0);
    if (vec) {
      tile.stage(sk, sv, kld, n, hd);
      __syncthreads();   // the tile (and, the first time, the queries) published
      const int next = j0 + DEC_TILE;   // its loads in flight while this tile is worked on
      if (next < k1) tile.load(kb, vb, ld, next, min(DEC_TILE, k1 - next), hd);
    } else {
      dec_stage_scalar(sk, sv, kld, kb, vb, ld, j0, n, hd);
      __syncthreads();
    }
    if (sh < group && lane < n) {
      const float4 *qr = reinterpret_cast<const float4 *>(sq + sh * hd4);
      const float4 *kr = reinterpret_cast<const float4 *>(sk + lane * kld);
      float acc = 0.0f;
#pragma unroll 8
      for (int e = e0 / 4; e < e1 / 4; e++) {
        const float4 a = qr[e], c = kr[e];
        acc = fmaf(a.x, c.x, acc), acc = fmaf(a.y, c.y, acc);
        acc = fmaf(a.z, c.z, acc), acc = fmaf(a.w, c.w, acc);
      }
      sps[(sl * group + sh) * DEC_TILE + lane] = acc;
    }
    __syncthreads();
    if (warp < group) {
      float sc = -INFINITY;
      if (lane < n) {
        sc = sps[warp * DEC_TILE + lane];
        for (int x = 1; x < slices; x++) sc += sps[(x * group + warp) * DEC_TILE + lane];
      }
      const float m_new = fmaxf(m, dec_warp_max(sc));   // finite: the tile has a key
      const float alpha = expf(m - m_new);               // 0 while m = -inf
      const float p = lane < n ? expf(sc - m_new) : 0.0f;
      m = m_new;
      l = l * alpha + dec_warp_sum(p);
      sp[warp * DEC_TILE + lane] = p;
      if (lane == 0) sa[warp] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < DEC_OUTS; i++) {
      const int idx = t + i * DEC_NT, h = idx / hd, d = idx % hd;
      if (h >= group) continue;   // (not break: that spills o to the stack)
      const float *ph = sp + h * DEC_TILE;
      float acc = o[i] * sa[h];
#pragma unroll 8
      for (int j = 0; j < n; j++) acc = fmaf(ph[j], sv[j * hd + d], acc);
      o[i] = acc;
    }
    __syncthreads();   // every tile's shared memory is rewritten by the next
  }
  // the heads' m and l, from their warps to every thread
  const size_t rows = (size_t)s.batch * s.heads;
  const size_t row0 = (size_t)b * s.heads + (size_t)kh * group;
  if (warp < group && lane == 0) {
    const size_t row = row0 + warp, pr = split * rows + row;
    sa[2 * warp] = m, sa[2 * warp + 1] = l;
    if (n_split == 1) lse[row] = m + logf(l);
    else part_ml[2 * pr] = m, part_ml[2 * pr + 1] = l;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < DEC_OUTS; i++) {
    const int idx = t + i * DEC_NT, h = idx / hd;
    if (h >= group) continue;
    if (n_split == 1) store_f(ctx + row0 * hd + idx, o[i] / sa[2 * h + 1]);
    else part_o[(split * rows + row0) * hd + idx] = o[i];
  }
}

/* ------------------------------------------------------------------------------------------ */
/* backward (0): D[b, h, i] = dctx_i . ctx_i, one warp per row, summed in double */

template <typename T>
__global__ void __launch_bounds__(NT)
    attn_bwd_dot_kernel(float *__restrict__ D, const T *__restrict__ dctx,
                        const T *__restrict__ ctx, Dims s) {
  const size_t rows = (size_t)s.batch * s.tq * s.heads;
  const size_t row = (size_t)blockIdx.x * (NT / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // a whole warp leaves together
  const T *a = dctx + row * s.head_dim, *c = ctx + row * s.head_dim;
  double sum = 0.0;
  for (int d = lane; d < s.head_dim; d += 32) sum += (double)load_f(a + d) * (double)load_f(c + d);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    const int h = (int)(row % s.heads);
    const size_t bi = row / s.heads;
    const int i = (int)(bi % s.tq);
    const size_t b = bi / s.tq;
    D[(b * s.heads + h) * s.tq + i] = (float)sum;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* backward (1): dK, dV for one (key tile, kv head, sequence) */

template <int DM, int BK, int BQ>
struct Dkv {
  static constexpr int RK = BK / 16, RQ = BQ / 16;
  static constexpr int KT_LD = BK + PAD;  // sKt, sVt [DM][KT_LD]  K, V transposed
  static constexpr int Q_LD = DM + PAD;   // sQ, sdO [BQ][Q_LD]
  static constexpr int P_LD = BK + PAD;   // sP, sdS [BQ][P_LD]
  static constexpr size_t smem =
      sizeof(float) * (2 * (size_t)DM * KT_LD + 2 * BQ * Q_LD + 2 * BQ * P_LD + 2 * BQ);
};

template <typename T, int DM, int BK, int BQ, bool DOC>
__global__ void __launch_bounds__(NT)
    attn_bwd_dkdv_kernel(T *__restrict__ dk, T *__restrict__ dv, const T *__restrict__ dctx,
                         const T *__restrict__ q, const T *__restrict__ k,
                         const T *__restrict__ v, const float *__restrict__ lse,
                         const float *__restrict__ D, Dims s, const int32_t *__restrict__ doc) {
  using C = Dkv<DM, BK, BQ>;
  using CC = Cols<DM>;
  constexpr int RK = C::RK, RQ = C::RQ;
  extern __shared__ float4 smem_f4[];
  float *sKt = reinterpret_cast<float *>(smem_f4);
  float *sVt = sKt + DM * C::KT_LD;
  float *sQ = sVt + DM * C::KT_LD;
  float *sdO = sQ + BQ * C::Q_LD;
  float *sP = sdO + BQ * C::Q_LD;
  float *sdS = sP + BQ * C::P_LD;
  float *sL = sdS + BQ * C::P_LD;
  float *sD = sL + BQ;

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int b = blockIdx.z, kh = blockIdx.y;
  const int k0 = blockIdx.x * BK;  // the first keys have the most queries: first
  const int nk = min(BK, s.tk - k0);
  const int hd = s.head_dim, off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * hd, k_ld = (size_t)s.kv_heads * hd;
  const size_t k_base = ((size_t)b * s.k_stride + k0) * k_ld + (size_t)kh * hd;

  load_tile<DM, BK, true>(sKt, k + k_base, k_ld, nk, hd, s.vec4);
  load_tile<DM, BK, true>(sVt, v + k_base, k_ld, nk, hd, s.vec4);

  float adk[RK][CC::NC], adv[RK][CC::NC];
#pragma unroll
  for (int r = 0; r < RK; r++)
#pragma unroll
    for (int n = 0; n < CC::NC; n++) adk[r][n] = adv[r][n] = 0.0f;

  // query i sees key j when j <= off + i: the first query that sees key k0
  const int qt_begin = max(0, k0 - off) / BQ, n_qt = (s.tq + BQ - 1) / BQ;
  const int32_t *doc_b = DOC ? doc + (size_t)b * s.tq : nullptr;  // first keys of the rows
  for (int g = 0; g < s.group; g++) {
    const int h = kh * s.group + g;
    const float *lse_h = lse + ((size_t)b * s.heads + h) * s.tq;
    const float *D_h = D + ((size_t)b * s.heads + h) * s.tq;
    for (int qt = qt_begin; qt < n_qt; qt++) {
      const int q0 = qt * BQ, nq = min(BQ, s.tq - q0);
      const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * hd;
      // the previous tile's sQ, sdO, sP, sdS, sL, sD are no longer read; DOC: a query tile
      // whose rows all start their documents after this tile's last key is skipped (BQ <= NT)
      if constexpr (DOC) {
        if (!__syncthreads_or((int)threadIdx.x < nq && doc_b[q0 + threadIdx.x] < k0 + nk))
          continue;
      } else {
        __syncthreads();
      }
      load_tile<DM, BQ, false>(sQ, q + q_base, q_ld, nq, hd, s.vec4);
      load_tile<DM, BQ, false>(sdO, dctx + q_base, q_ld, nq, hd, s.vec4);
      for (int i = threadIdx.x; i < BQ; i += NT) {
        sL[i] = i < nq ? lse_h[q0 + i] : 0.0f;
        sD[i] = i < nq ? D_h[q0 + i] : 0.0f;
      }
      int first[RQ];  // DOC: first key of query tx + 16c
#pragma unroll
      for (int c = 0; c < RQ; c++)
        first[c] = DOC && tx + 16 * c < nq ? doc_b[q0 + tx + 16 * c] : 0;
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T: keys ty*RK + r, queries tx + 16c
      float st[RK][RQ], dpt[RK][RQ];
#pragma unroll
      for (int r = 0; r < RK; r++)
#pragma unroll
        for (int c = 0; c < RQ; c++) st[r][c] = dpt[r][c] = 0.0f;
      tile_dot<DM>(st, sQ, C::Q_LD, sKt, C::KT_LD);
      tile_dot<DM>(dpt, sdO, C::Q_LD, sVt, C::KT_LD);

      // P = exp(S - lse), dS = P (dP - D); stored [query][key]
#pragma unroll
      for (int c = 0; c < RQ; c++) {
        const int i = tx + 16 * c;
        const float li = sL[i], Di = sD[i];
        float p[RK], ds[RK];
#pragma unroll
        for (int r = 0; r < RK; r++) {
          const int key = k0 + ty * RK + r;
          const bool seen = i < nq && key <= off + q0 + i && (!DOC || key >= first[c]);
          const float pr = expf(st[r][c] * s.scale - li);
          p[r] = seen ? pr : 0.0f;
          ds[r] = seen ? pr * (dpt[r][c] - Di) : 0.0f;
        }
        sts<RK>(sP + i * C::P_LD + ty * RK, p);
        sts<RK>(sdS + i * C::P_LD + ty * RK, ds);
      }
      __syncthreads();

      // dV += P^T dO, dK += dS^T Q (padding queries have P = dS = 0)
#pragma unroll 2
      for (int i = 0; i < BQ; i++) {
        float pf[RK], sf[RK];
        lds<RK>(pf, sP + i * C::P_LD + ty * RK);
        lds<RK>(sf, sdS + i * C::P_LD + ty * RK);
#pragma unroll
        for (int ch = 0; ch < CC::NCH; ch++) {
          float of[CC::VEC], qf[CC::VEC];
          lds<CC::VEC>(of, sdO + i * C::Q_LD + CC::col(tx, ch, 0));
          lds<CC::VEC>(qf, sQ + i * C::Q_LD + CC::col(tx, ch, 0));
#pragma unroll
          for (int r = 0; r < RK; r++)
#pragma unroll
            for (int e = 0; e < CC::VEC; e++) {
              const int n = ch * CC::VEC + e;
              adv[r][n] = fmaf(pf[r], of[e], adv[r][n]);
              adk[r][n] = fmaf(sf[r], qf[e], adk[r][n]);
            }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RK; r++) {
    const int j = ty * RK + r;
    if (j >= nk) continue;
    const size_t row = k_base + (size_t)j * k_ld;
#pragma unroll
    for (int ch = 0; ch < CC::NCH; ch++)
#pragma unroll
      for (int e = 0; e < CC::VEC; e++) {
        const int d = CC::col(tx, ch, e);
        if (d >= hd) continue;
        if (dk)
          store_f(dk + row + d,
                  (s.acc ? load_f(dk + row + d) : 0.0f) + s.scale * adk[r][ch * CC::VEC + e]);
        if (dv)
          store_f(dv + row + d, (s.acc ? load_f(dv + row + d) : 0.0f) + adv[r][ch * CC::VEC + e]);
      }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* backward (2): dQ for one (query tile, head, sequence) */

template <int DM, int BQ, int BK>
struct Dq {
  static constexpr int RQ = BQ / 16, RK = BK / 16;
  static constexpr int QT_LD = BQ + PAD;  // sQt, sdOt [DM][QT_LD]  Q, dO transposed
  static constexpr int K_LD = DM + PAD;   // sK, sV [BK][K_LD]
  static constexpr int ST_LD = BQ + PAD;  // sdSt [BK][ST_LD]  dS transposed
  static constexpr size_t smem =
      sizeof(float) * (2 * (size_t)DM * QT_LD + 2 * BK * K_LD + BK * ST_LD);
};

template <typename T, int DM, int BQ, int BK, bool DOC>
__global__ void __launch_bounds__(NT, 2)  // <= 128 registers: two blocks per SM
    attn_bwd_dq_kernel(T *__restrict__ dq, const T *__restrict__ dctx, const T *__restrict__ q,
                       const T *__restrict__ k, const T *__restrict__ v,
                       const float *__restrict__ lse, const float *__restrict__ D, Dims s,
                       const int32_t *__restrict__ doc) {
  using C = Dq<DM, BQ, BK>;
  using CC = Cols<DM>;
  constexpr int RQ = C::RQ, RK = C::RK;
  extern __shared__ float4 smem_f4[];
  float *sQt = reinterpret_cast<float *>(smem_f4);
  float *sdOt = sQt + DM * C::QT_LD;
  float *sK = sdOt + DM * C::QT_LD;
  float *sV = sK + BK * C::K_LD;
  float *sdSt = sV + BK * C::K_LD;

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest rows first
  const int nq = min(BQ, s.tq - q0);
  const int kh = h / s.group, hd = s.head_dim, off = s.tk - s.tq;
  const size_t q_ld = (size_t)s.heads * hd, k_ld = (size_t)s.kv_heads * hd;
  const size_t q_base = ((size_t)b * s.tq + q0) * q_ld + (size_t)h * hd;
  const size_t k_base = (size_t)b * s.k_stride * k_ld + (size_t)kh * hd;
  const float *lse_h = lse + ((size_t)b * s.heads + h) * s.tq + q0;
  const float *D_h = D + ((size_t)b * s.heads + h) * s.tq + q0;

  load_tile<DM, BQ, true>(sQt, q + q_base, q_ld, nq, hd, s.vec4);
  load_tile<DM, BQ, true>(sdOt, dctx + q_base, q_ld, nq, hd, s.vec4);

  const int32_t *doc_q = DOC ? doc + (size_t)b * s.tq + q0 : nullptr;  // the rows' first keys
  float acc[RQ][CC::NC], lr[RQ], Dr[RQ];
  int lim[RQ];    // last key each row sees; -1 for padding rows
  int first[RQ];  // DOC: first key each row sees
#pragma unroll
  for (int r = 0; r < RQ; r++) {
    const int i = ty * RQ + r;
    lr[r] = i < nq ? lse_h[i] : 0.0f;
    Dr[r] = i < nq ? D_h[i] : 0.0f;
    lim[r] = i < nq ? off + q0 + i : -1;
    first[r] = DOC && i < nq ? doc_q[i] : 0;
#pragma unroll
    for (int n = 0; n < CC::NC; n++) acc[r][n] = 0.0f;
  }

  // key tiles from the first one the rows' documents reach (DOC; else 0) to the last row's
  // last key
  int kt_first = 0;
  if constexpr (DOC) kt_first = block_min(doc_q, nq, sK) / BK;  // sK: filled after a barrier
  const int n_kt = (off + q0 + nq - 1) / BK + 1;
  for (int kt = kt_first; kt < n_kt; kt++) {
    const int k0 = kt * BK, nk = min(BK, s.tk - k0);
    __syncthreads();  // the previous tile's sK, sV, sdSt are no longer read
    load_tile<DM, BK, false>(sK, k + k_base + (size_t)k0 * k_ld, k_ld, nk, hd, s.vec4);
    load_tile<DM, BK, false>(sV, v + k_base + (size_t)k0 * k_ld, k_ld, nk, hd, s.vec4);
    __syncthreads();

    // S = Q K^T and dP = dO V^T: rows ty*RQ + r, keys tx + 16c
    float sc[RQ][RK], dp[RQ][RK];
#pragma unroll
    for (int r = 0; r < RQ; r++)
#pragma unroll
      for (int c = 0; c < RK; c++) sc[r][c] = dp[r][c] = 0.0f;
    tile_dot<DM>(sc, sK, C::K_LD, sQt, C::QT_LD);
    tile_dot<DM>(dp, sV, C::K_LD, sdOt, C::QT_LD);

    // dS = P (dP - D), P = exp(S - lse); stored [key][row]
#pragma unroll
    for (int c = 0; c < RK; c++) {
      const int key = k0 + tx + 16 * c;
      float ds[RQ];
#pragma unroll
      for (int r = 0; r < RQ; r++) {
        const float p = expf(sc[r][c] * s.scale - lr[r]);
        ds[r] = key <= lim[r] && (!DOC || key >= first[r]) ? p * (dp[r][c] - Dr[r]) : 0.0f;
      }
      sts<RQ>(sdSt + (tx + 16 * c) * C::ST_LD + ty * RQ, ds);
    }
    __syncthreads();

    // dQ += dS K (keys past tk have dS = 0 and zero K rows)
#pragma unroll 4
    for (int j = 0; j < BK; j++) {
      float sf[RQ];
      lds<RQ>(sf, sdSt + j * C::ST_LD + ty * RQ);
#pragma unroll
      for (int ch = 0; ch < CC::NCH; ch++) {
        float kf[CC::VEC];
        lds<CC::VEC>(kf, sK + j * C::K_LD + CC::col(tx, ch, 0));
#pragma unroll
        for (int r = 0; r < RQ; r++)
#pragma unroll
          for (int e = 0; e < CC::VEC; e++)
            acc[r][ch * CC::VEC + e] = fmaf(sf[r], kf[e], acc[r][ch * CC::VEC + e]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RQ; r++) {
    const int i = ty * RQ + r;
    if (i >= nq) continue;
    T *out = dq + q_base + (size_t)i * q_ld;
#pragma unroll
    for (int ch = 0; ch < CC::NCH; ch++)
#pragma unroll
      for (int e = 0; e < CC::VEC; e++) {
        const int d = CC::col(tx, ch, e);
        if (d < hd)
          store_f(out + d, (s.acc ? load_f(out + d) : 0.0f) + s.scale * acc[r][ch * CC::VEC + e]);
      }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* host side */

[[noreturn]] void refuse(const char *what, const struct attn_shape *a, const char *why) {
  char detail[256];
  snprintf(detail, sizeof detail,
           "%s (batch %d, tq %d, tk %d, k_stride %d, heads %d, kv_heads %d, head_dim %d)", why,
           a->batch, a->tq, a->tk, a->k_stride, a->heads, a->kv_heads, a->head_dim);
  cuda_fail(what, detail, __FILE__, __LINE__);
  __builtin_unreachable();
}


// Checks the shape (as the CPU backend does, plus this file's limits); false: nothing to do.
bool make_dims(Shape *d, const struct attn_shape *a, const char *what) {
  if (a->batch < 0 || a->tq < 0 || a->heads < 0) refuse(what, a, "negative size");
  if (a->kv_heads <= 0 || a->heads % a->kv_heads)
    refuse(what, a, "heads do not split into kv_heads");
  if (a->tq > a->tk || a->tk > a->k_stride) refuse(what, a, "need tq <= tk <= k_stride");
  if (a->batch == 0 || a->tq == 0 || a->heads == 0) return false;
  if (a->head_dim < 1 || a->head_dim > 128)
    refuse(what, a, "head_dim must be 1 .. 128 for the CUDA attention kernels");
  if (a->batch > 65535 || a->heads > 65535) refuse(what, a, "batch and heads must be <= 65535");
  d->batch = a->batch, d->tq = a->tq, d->tk = a->tk, d->k_stride = a->k_stride;
  d->heads = a->heads, d->kv_heads = a->kv_heads, d->head_dim = a->head_dim;
  d->group = a->heads / a->kv_heads;
  d->scale = (float)(1.0 / sqrt((double)a->head_dim));  // as the CPU backend
  d->vec4 = a->head_dim % 4 == 0;
  d->acc = true;  // the backward sets it from its acc argument
  d->doc = a->doc_start;
  return true;
}

// Blocks of the forward grid that keep the GPU busy without splitting the keys.
constexpr int FWD_BUSY_BLOCKS_PER_SM = 4;

// Key splits for a forward of `blocks` blocks: enough for about busy_per_sm blocks per SM, at
// most max_split and 64, fewer while the partials of the rows (head_dim + 2 floats each per
// split) would take more than half the scratch arena; 1 when there is nothing to split.
int key_splits(size_t blocks, int busy_per_sm, int max_split, size_t rows, int head_dim) {
  const size_t busy = (size_t)busy_per_sm * (cuda_ctx.sm_count > 0 ? cuda_ctx.sm_count : 1);
  int n_split = blocks < busy ? (int)((busy + blocks - 1) / blocks) : 1;
  if (n_split > max_split) n_split = max_split;
  if (n_split > 64) n_split = 64;
  while (n_split > 1 &&
         (size_t)n_split * rows * (head_dim + 2) * sizeof(float) > cuda_ctx.scratch_bytes / 2)
    n_split--;
  return n_split < 1 ? 1 : n_split;
}

// The unnormalized partials (O, and m with l) of n_split > 1 key splits, in the scratch arena;
// then merged into ctx and lse by attn_fwd_combine_kernel.
void split_partials(int n_split, size_t rows, int head_dim, float **part_o, float **part_ml,
                    const char *what) {
  *part_o = *part_ml = nullptr;
  if (n_split == 1) return;
  void *a, *b;
  cuda_scratch2(&a, (size_t)n_split * rows * head_dim * sizeof(float), &b,
                (size_t)n_split * rows * 2 * sizeof(float), what);
  *part_o = (float *)a, *part_ml = (float *)b;
}

template <typename T>
void combine_splits(T *ctx, float *lse, const float *part_o, const float *part_ml, const Dims &d,
                    int n_split) {
  if (n_split == 1) return;
  const size_t n = (size_t)d.batch * d.tq * d.heads * d.head_dim;
  CUDA_LAUNCH_PDL("attn_fwd_combine_kernel", attn_fwd_combine_kernel<T>,
                  dim3((unsigned)((n + NT - 1) / NT)), dim3(NT), 0, ctx, lse, part_o, part_ml,
                  (Dims)d, n_split);
}

template <typename T, int DM, int BQ, int BK>
void launch_fwd(T *ctx, float *lse, const T *q, const T *k, const T *v, const Shape &d) {
  constexpr size_t smem = Fwd<DM, BQ, BK>::smem;
  // documents (doc_start) or plain causal: one instantiation each
  auto *kernel =
      d.doc ? attn_fwd_kernel<T, DM, BQ, BK, true> : attn_fwd_kernel<T, DM, BQ, BK, false>;
  static bool done[2] = {false, false};
  cuda_allow_smem(kernel, smem, &done[d.doc != nullptr]);
  const int n_qt = (d.tq + BQ - 1) / BQ, n_kt = (d.tk + BK - 1) / BK;
  // Few query tiles (decoding, a short prefill against a long cache): the keys are split among
  // several blocks per tile, each leaving an unnormalized partial that a second kernel merges
  // in a fixed order. At least 2 key tiles per split.
  const size_t rows = (size_t)d.batch * d.tq * d.heads;
  const int n_split = key_splits((size_t)n_qt * d.heads * d.batch, FWD_BUSY_BLOCKS_PER_SM,
                                 n_kt / 2, rows, d.head_dim);
  float *part_o, *part_ml;
  split_partials(n_split, rows, d.head_dim, &part_o, &part_ml, "attention forward key splits");
  dim3 grid(n_qt * n_split, d.heads, d.batch);
  kernel<<<grid, NT, smem, cuda_ctx.stream>>>(ctx, lse, q, k, v, d, n_split, part_o, part_ml,
                                              d.doc);
  CUDA_LAUNCHED("attn_fwd_kernel");
  combine_splits(ctx, lse, part_o, part_ml, d, n_split);
}

template <typename T>
void launch_decode(T *ctx, float *lse, const T *q, const T *k, const T *v, const Shape &d,
                   const struct attn_shape *a) {
  if (d.group > CUDA_DECODE_MAX_GROUP)
    refuse("cuda_attention_forward", a, "more than 16 query heads per kv head");
  // Key splits until the GPU has about a block per SM (one fits an SM), each of at least
  // DEC_SPLIT_KEYS keys: a block's time is mostly latency, which a split of fewer keys shortens
  // (one sequence of a 192-key cache: 6 splits of 32 keys on 48 blocks, not 2 of 128 on 16).
  // This sizes the grid for the cache's rows; each step's kernels split the keys it reads over
  // it (dec_keys_per_split), the same splits at the cache's last row.
  const int chunks = (d.tk + DEC_SPLIT_KEYS - 1) / DEC_SPLIT_KEYS;
  const size_t rows = (size_t)d.batch * d.heads;
  int n_split = key_splits((size_t)d.kv_heads * d.batch, 1, chunks, rows, d.head_dim);
  const int keys_per_split =
      ((d.tk + n_split - 1) / n_split + DEC_SPLIT_KEYS - 1) / DEC_SPLIT_KEYS * DEC_SPLIT_KEYS;
  n_split = (d.tk + keys_per_split - 1) / keys_per_split;
  float *part_o, *part_ml;
  split_partials(n_split, rows, d.head_dim, &part_o, &part_ml, "attention decode key splits");
  int slices = 1;   // of the head dims, a warp each: the most that DEC_NW warps cover
  while (2 * slices * d.group <= DEC_NW) slices *= 2;
  // the queries, a tile's K (padded rows) and V, partial scores, probabilities, m and l
  const size_t hd4 = (d.head_dim + 3) & ~3;
  const size_t smem = sizeof(float) * (d.group * hd4 + DEC_TILE * (hd4 + 4 + d.head_dim) +
                                       (size_t)(slices + 1) * d.group * DEC_TILE + 2 * d.group);
  dim3 grid(d.kv_heads, n_split, d.batch);
  CUDA_LAUNCH_PDL("attn_decode_kernel", attn_decode_kernel<T>, grid, dim3(DEC_NT), smem, ctx,
                  lse, q, k, v, (Dims)d, slices, a->doc_start, a->key_last, part_o, part_ml);
  combine_splits(ctx, lse, part_o, part_ml, d, n_split);
}

template <typename T, int DM, int BK, int BQ>
void launch_dkdv(T *dk, T *dv, const T *dctx, const T *q, const T *k, const T *v,
                 const float *lse, const float *D, const Shape &d) {
  constexpr size_t smem = Dkv<DM, BK, BQ>::smem;
  auto *kernel = d.doc ? attn_bwd_dkdv_kernel<T, DM, BK, BQ, true>
                       : attn_bwd_dkdv_kernel<T, DM, BK, BQ, false>;
  static bool done[2] = {false, false};
  cuda_allow_smem(kernel, smem, &done[d.doc != nullptr]);
  dim3 grid((d.tk + BK - 1) / BK, d.kv_heads, d.batch);
  kernel<<<grid, NT, smem, cuda_ctx.stream>>>(dk, dv, dctx, q, k, v, lse, D, d, d.doc);
  CUDA_LAUNCHED("attn_bwd_dkdv_kernel");
}

template <typename T, int DM, int BQ, int BK>
void launch_dq(T *dq, const T *dctx, const T *q, const T *k, const T *v, const float *lse,
               const float *D, const Shape &d) {
  constexpr size_t smem = Dq<DM, BQ, BK>::smem;
  auto *kernel =
      d.doc ? attn_bwd_dq_kernel<T, DM, BQ, BK, true> : attn_bwd_dq_kernel<T, DM, BQ, BK, false>;
  static bool done[2] = {false, false};
  cuda_allow_smem(kernel, smem, &done[d.doc != nullptr]);
  dim3 grid((d.tq + BQ - 1) / BQ, d.heads, d.batch);
  kernel<<<grid, NT, smem, cuda_ctx.stream>>>(dq, dctx, q, k, v, lse, D, d, d.doc);
  CUDA_LAUNCHED("attn_bwd_dq_kernel");
}

// The tile sizes: 64 x 64 where the GPU gives a block enough shared memory, else the smaller
// tiles (tiles that fit in 99 KB, the least of the architectures built) .
constexpr size_t SMALL_GPU_SMEM = 99 * 1024;

// Forward tiles: 64 queries x 64 keys (head_dim <= 64) or x 32 keys (head_dim 128: the block
// then takes 77 KB and two fit on an SM, faster on H200); 16 queries when there are at most 16
// (decoding). All fit in 99 KB.
template <typename T, int DM>
void forward_dm(T *ctx, float *lse, const T *q, const T *k, const T *v, const Shape &d) {
  static_assert(Fwd<DM, 64, DM == 128 ? 32 : 64>::smem <= SMALL_GPU_SMEM, "forward tile");
  if (d.tq <= 16)
    launch_fwd<T, DM, 16, 64>(ctx, lse, q, k, v, d);
  else
    launch_fwd<T, DM, 64, DM == 128 ? 32 : 64>(ctx, lse, q, k, v, d);
}

template <typename T>
void generic_forward(T *ctx, float *lse, const T *q, const T *k, const T *v, const Shape &d) {
  if (d.head_dim <= 32)
    forward_dm<T, 32>(ctx, lse, q, k, v, d);
  else if (d.head_dim <= 64)
    forward_dm<T, 64>(ctx, lse, q, k, v, d);
  else
    forward_dm<T, 128>(ctx, lse, q, k, v, d);
}

template <typename T, int DM>
void backward_dm(T *dq, T *dk, T *dv, const T *dctx, const T *q, const T *k, const T *v,
                 const float *lse, const float *D, const Shape &d, const struct attn_shape *a) {
  const size_t optin = (size_t)cuda_smem_optin();
  if (dk || dv) {
    if constexpr (Dkv<DM, 64, 64>::smem <= SMALL_GPU_SMEM) {
      launch_dkdv<T, DM, 64, 64>(dk, dv, dctx, q, k, v, lse, D, d);
    } else {
      if (optin >= Dkv<DM, 64, 64>::smem)
        launch_dkdv<T, DM, 64, 64>(dk, dv, dctx, q, k, v, lse, D, d);
      else if (optin >= Dkv<DM, 32, 32>::smem)
        launch_dkdv<T, DM, 32, 32>(dk, dv, dctx, q, k, v, lse, D, d);
      else
        refuse("cuda_attention_backward", a, "not enough shared memory per block on this GPU");
    }
  }
  if (dq) {
    constexpr int BK = DM == 128 ? 32 : 64;  // head_dim 128: two blocks per SM on H200
    if constexpr (Dq<DM, 64, BK>::smem <= SMALL_GPU_SMEM) {
      launch_dq<T, DM, 64, BK>(dq, dctx, q, k, v, lse, D, d);
    } else {
      if (optin >= Dq<DM, 64, BK>::smem)
        launch_dq<T, DM, 64, BK>(dq, dctx, q, k, v, lse, D, d);
      else if (optin >= Dq<DM, 32, 32>::smem)
        launch_dq<T, DM, 32, 32>(dq, dctx, q, k, v, lse, D, d);
      else
        refuse("cuda_attention_backward", a, "not enough shared memory per block on this GPU");
    }
  }
}

template <typename T>
void generic_backward(T *dq, T *dk, T *dv, const T *dctx, const T *q, const T *k, const T *v,
                      const float *lse, const float *D, const Shape &d,
                      const struct attn_shape *a) {
  if (d.head_dim <= 32)
    backward_dm<T, 32>(dq, dk, dv, dctx, q, k, v, lse, D, d, a);
  else if (d.head_dim <= 64)
    backward_dm<T, 64>(dq, dk, dv, dctx, q, k, v, lse, D, d, a);
  else
    backward_dm<T, 128>(dq, dk, dv, dctx, q, k, v, lse, D, d, a);
}

}  // namespace

extern "C" void cuda_attention_forward(void *ctx, float *lse, const void *q, const void *k,
                                       const void *v, const struct attn_shape *s) {
  Shape d;
  if (!make_dims(&d, s, "cuda_attention_forward")) return;
  if (s->tq == 1) {   // decoding
    d.vec4 = d.vec4 && cuda_aligned16(k) && cuda_aligned16(v);   // 16-byte loads of K, V rows
    CUDA_ACT_DISPATCH(T, launch_decode<T>((T *)ctx, lse, (const T *)q, (const T *)k,
                                          (const T *)v, d, s));
    return;
  }
  if (s->key_last) refuse("cuda_attention_forward", s, "key_last is for one query (tq 1)");
  // The mode's tensor-core kernel where it takes the shape; the generic kernels for the rest.
  if (cuda_ctx.act == DT_BF16 && cuda_attention_bf16_forward(ctx, lse, q, k, v, s)) return;
  d.vec4 = d.vec4 && cuda_aligned16(q) && cuda_aligned16(k) && cuda_aligned16(v);
  CUDA_ACT_DISPATCH(T, generic_forward<T>((T *)ctx, lse, (const T *)q, (const T *)k,
                                          (const T *)v, d));
}

extern "C" void cuda_attention_backward(void *dq, void *dk, void *dv, const void *dctx,
                                        const void *q, const void *k, const void *v,
                                        const void *ctx, const float *lse,
                                        const struct attn_shape *s, int acc) {
  Shape d;
  if (s->key_last) refuse("cuda_attention_backward", s, "key_last is for decoding only");
  if (!make_dims(&d, s, "cuda_attention_backward")) return;
  d.acc = (acc & ACC_DX) != 0;
  d.vec4 = d.vec4 && cuda_aligned16(q) && cuda_aligned16(k) && cuda_aligned16(v) &&
           cuda_aligned16(dctx);
  if (!dq && !dk && !dv) return;
  const size_t rows = (size_t)d.batch * d.tq * d.heads;
  float *D = (float *)cuda_scratch(rows * sizeof(float), "attention backward D = rowsum(dctx*ctx)");
  CUDA_ACT_DISPATCH(T, attn_bwd_dot_kernel<T>
                    <<<(unsigned)((rows + NT / 32 - 1) / (NT / 32)), NT, 0, cuda_ctx.stream>>>(
                        D, (const T *)dctx, (const T *)ctx, d));
  CUDA_LAUNCHED("attn_bwd_dot_kernel");
  // The mode's tensor-core kernel where it takes the shape; the generic kernels for the rest.
  if (cuda_ctx.act == DT_BF16 &&
      cuda_attention_bf16_backward(dq, dk, dv, dctx, q, k, v, lse, D, s, acc))
    return;
  CUDA_ACT_DISPATCH(T, generic_backward<T>((T *)dq, (T *)dk, (T *)dv, (const T *)dctx,
                                           (const T *)q, (const T *)k, (const T *)v, lse, D, d,
                                           s));
}
