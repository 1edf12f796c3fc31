/* Causal grouped-query attention on Hopper's warpgroup tensor-core instructions (wgmma,
 * sm_90a): the bf16 mode's kernels on an H100 or H200 for the shapes they take (head_dim 64 or
 * 128, no document masking, tq >= 16, 16-byte aligned tensors); documents, other GPUs and
 * QWEN3_CUDA_WGMMA=0 go to cuda_attention_bf16.cu (mma.sync), the rest to the generic kernels.
 * Semantics, arithmetic and determinism are those of cuda_attention_bf16.cu (its comment): bf16
 * products with fp32 accumulation, softmax statistics in fp32, P and dS rounded to bf16 where
 * they feed the next product, every output summed by one thread in a fixed order, no atomics.
 *
 * Why a second set of kernels: mma.sync takes both operands from registers, so each product
 * first copies its tiles out of shared memory with ldmatrix; at head_dim 128 that is about 0.6
 * ldmatrix.x4 per m16n8k16, which by our count makes shared memory's bandwidth, not the tensor
 * cores, their bound (bench/NOTES.md, session 8). wgmma reads B, and A where it is a tile, from
 * shared memory itself, for 64 rows of a warpgroup at once.
 *
 * Shared memory tiles are [64 rows][D] bf16 in the descriptors' 128-byte-swizzle layout (PTX
 * ISA, "Shared Memory Matrix Layout"; the layout without swizzle, tried first, ran 1.3x slower
 * than the mma.sync kernels on an H200): panels of 64 columns, each [64 rows][128 bytes], the
 * 16-byte chunk c of row r stored at chunk c ^ (r % 8) of its row, every tile 1024-byte aligned
 * (the XOR is taken from address bits 7-9). One tile serves both ways:
 *   - K-major, K along the columns (Q, K, V, dO in Q K^T, dO V^T, K Q^T, V dO^T): 8-row groups
 *     1024 bytes apart (SBO); a k16 step moves 32 bytes inside a panel row;
 *   - MN-major, K along the rows (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q): panels 8 KB
 *     apart along N (LBO), 8-row groups 1024 bytes apart along K (SBO); a k16 step moves two
 *     groups.
 * cp.async fills the tiles 16 bytes a thread, eight threads a row (one 128-byte shared write).
 * Those writes are the generic proxy's and wgmma reads through the async proxy, so every thread
 * fences (fence.proxy.async) before the barrier that publishes a tile.
 *
 * Fragments: a warpgroup is 4 warps; warp w holds rows 16w..16w+15 of every m64 product, in
 * mma.sync's C layout per n8 block (d[j][0..1]: row g, columns 8j+2t..; d[j][2..3]: row g+8),
 * and A from registers takes mma.sync's A layout, so P and dS go from accumulators to operands
 * as in cuda_attention_bf16.cu. Each product is issued, committed and waited for before its
 * accumulators are read (wgmma.wait_group 0, then an empty asm that ties the registers to that
 * point, so the compiler moves no read above the wait).
 *
 * Kernels, one warpgroup (128 threads) a block, two blocks an SM:
 *  - forward: a block per (64-query tile, head, sequence), key tiles of 64 double-buffered;
 *  - dK/dV: a block per (64-key tile, kv head or part of its query heads, sequence), K and V
 *    held, (Q, dO, lse, D) of each 64-query tile double-buffered; as cuda_attention_bf16.cu;
 *  - dQ: a block per (64-query tile, head, sequence), Q and dO held, key tiles double-buffered. */
#include "kernels/cuda/cuda_attention_bf16.cuh"

namespace attn_wg {
using namespace attn_bf16;

// The block's dynamic shared memory from its first 1024-byte boundary (the swizzled tiles'
// alignment); each kernel asks for ALIGN_SLACK bytes more than its tiles take.
constexpr size_t ALIGN_SLACK = 1024;
__device__ __forceinline__ unsigned char *smem_tiles() {
  unsigned char *p = smem_base();
  return p + ((1024 - (smem_u32(p) & 1023)) & 1023);
}

constexpr int NT = 128, BQ = 64, BK = 64;  // a warpgroup; query and key tiles of 64 rows
// elements of a 64-column panel of a 64-row tile (8 KB); unused where no kernel is compiled
[[maybe_unused]] constexpr int PANEL = 64 * 64;

template <int D>
struct Tile {
  static constexpr size_t BYTES = sizeof(bf16) * 64 * D;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTN_WG_DEVICE 1
#endif

#ifdef ATTN_WG_DEVICE
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// the accumulators are final here: no read of them may move above this point
template <int N>
__device__ __forceinline__ void wg_tie(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[j][e])::"memory");
}
// commit the products issued since the last commit, wait for all of them, and tie each
// accumulator to that point
template <typename... Acc>
__device__ __forceinline__ void wg_finish(Acc &...acc) {
  wg_commit();
  wg_wait_all();
  (wg_tie(acc), ...);
}
__device__ __forceinline__ void fence_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A shared-memory matrix descriptor, 128-byte swizzle (PTX ISA "Matrix Descriptor Format":
// address, LBO and SBO in 16-byte units in bits 0-13, 16-29, 32-45; the swizzle in bits 62-63)
__device__ __forceinline__ uint64_t desc(const bf16 *p, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}
// k16 step ks of a tile read K-major (K along its columns); LBO is not used by this layout
template <int D>
__device__ __forceinline__ uint64_t desc_k(const bf16 *tile, int ks) {
  return desc(tile + (ks / 4) * PANEL + (ks % 4) * 16, 16, 1024);
}
// k16 step kk of a tile read MN-major (K along its rows)
template <int D>
__device__ __forceinline__ uint64_t desc_mn(const bf16 *tile, int kk) {
  return desc(tile + kk * 16 * 64, 2 * PANEL, 1024);
}

// d = A B (add 0) or d += A B: m64n64k16, A and B K-major tiles in shared memory
__device__ __forceinline__ void wg_ss_n64(float (&d)[8][4], uint64_t a, uint64_t b, int add) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(a), "l"(b), "r"(add));
}

// d += A B: m64n64k16, A from registers (mma.sync's A fragments), B an MN-major tile
__device__ __forceinline__ void wg_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// d += A B: m64n128k16, A from registers (mma.sync's A fragments), B an MN-major tile
__device__ __forceinline__ void wg_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

template <int D>
__device__ __forceinline__ void wg_rs(float (&d)[D / 8][4], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (D == 64)
    wg_rs_n64(d, a, b);
  else
    wg_rs_n128(d, a, b);
}

// S = A B^T over head_dim: 64 rows of A x 64 rows of B, both [64][D] tiles read K-major
template <int D>
__device__ __forceinline__ void wg_scores(float (&s)[8][4], const bf16 *a, const bf16 *b) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) wg_ss_n64(s, desc_k<D>(a, ks), desc_k<D>(b, ks), ks);
}

// S1 = A1 B1^T and S2 = A2 B2^T (64 x 64 over head_dim), issued together and waited for
template <int D>
__device__ __forceinline__ void wg_scores2(float (&s1)[8][4], const bf16 *a1, const bf16 *b1,
                                           float (&s2)[8][4], const bf16 *a2, const bf16 *b2) {
  wg_fence();
  wg_scores<D>(s1, a1, b1);
  wg_scores<D>(s2, a2, b2);
  wg_finish(s1, s2);
}

// d += P B over 64 rows of B (a [64][D] tile read MN-major), P the 64 x 64 accumulators p
// rounded to bf16 as A fragments
template <int D>
__device__ __forceinline__ void wg_pb(float (&d)[D / 8][4], const float (&p)[8][4], const bf16 *b) {
  uint32_t a[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    a[kk][0] = pack(p[2 * kk][0], p[2 * kk][1]);
    a[kk][1] = pack(p[2 * kk][2], p[2 * kk][3]);
    a[kk][2] = pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[kk][3] = pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; kk++) wg_rs<D>(d, a[kk], desc_mn<D>(b, kk));
}
#endif  // ATTN_WG_DEVICE

// Rows [0, n) of a global [.][ld_g] bf16 matrix into a [64][D] swizzled tile by cp.async (rows
// >= n zero): eight consecutive threads copy one 128-byte panel row.
template <int D>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, size_t ld_g, int n) {
  constexpr int CH = D / 8, ITER = 64 * CH / NT;
#pragma unroll
  for (int i = 0; i < ITER; i++) {
    const int idx = threadIdx.x + i * NT, r = idx / CH, c = idx % CH;
    const bool ok = r < n;
    cp_async16(s + (c / 8) * PANEL + r * 64 + ((c % 8) ^ (r & 7)) * 8,
               ok ? g + (size_t)r * ld_g + c * 8 : g, ok);
  }
}

// everything this thread copied has landed; published to the async proxy by the next barrier
__device__ __forceinline__ void tiles_landed() {
  cp_async_wait_all();
#ifdef ATTN_WG_DEVICE
  fence_async_proxy();
#endif
}

// K and V of key tile kt (BK rows from kt BK; rows past tk zero) into the stage at st (K, then V)
template <int D>
__device__ __forceinline__ void load_kv(bf16 *st, const bf16 *k, const bf16 *v, size_t k_base,
                                        size_t k_ld, int kt, int tk) {
  const int k1 = kt * BK, nk = min(BK, tk - k1);
  load_tile<D>(st, k + k_base + (size_t)k1 * k_ld, k_ld, nk);
  load_tile<D>(st + 64 * D, v + k_base + (size_t)k1 * k_ld, k_ld, nk);
}

// The top of key tile kt in a forward or dQ block (two stages at sKV): tile kt has landed and is
// published, to wgmma too; every thread is done with tile kt-1, whose stage starts loading
// tile kt+1. Returns tile kt's K (its V follows it).
template <int D>
__device__ __forceinline__ const bf16 *key_tile(bf16 *sKV, int kt, const QueryTile &qt,
                                                const bf16 *k, const bf16 *v, int tk) {
  tiles_landed();
  __syncthreads();
  if (kt + 1 < qt.n_kt) {
    load_kv<D>(sKV + ((kt + 1) & 1) * 2 * 64 * D, k, v, qt.k_base, qt.k_ld, kt + 1, tk);
    cp_async_commit();
  }
  return sKV + (kt & 1) * 2 * 64 * D;
}

/* ------------------------------------------------------------------------------------------ */
/* forward */

template <int D>
__global__ void __launch_bounds__(NT, 2)
    attn_wg_fwd_kernel(bf16 *__restrict__ ctx, float *__restrict__ lse,
                       const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                       const bf16 *__restrict__ v, Dims s) {
#ifdef ATTN_WG_DEVICE
  constexpr int ND = D / 8, T = 64 * D;
  bf16 *sQ = reinterpret_cast<bf16 *>(smem_tiles());
  bf16 *sKV = sQ + T;  // stage st: K at sKV + 2 T st, V after it
  const int warp = threadIdx.x >> 5, t = threadIdx.x & 3;
  const QueryTile qt = query_tile<D>(s, BQ, BK);
  const auto [h, b, q0, nq, kh, off, n_kt, q_ld, k_ld, q_base, k_base] = qt;

  load_tile<D>(sQ, q + q_base, q_ld, nq);
  load_kv<D>(sKV, k, v, k_base, k_ld, 0, s.tk);
  cp_async_commit();

  float o[ND][4], sc[8][4], m[2], l[2];
  int lim[2];  // last key rows g, g+8 see
  fwd_rows(o, m, l, lim, qt, warp * 16, s.tk);
  const int warp_lo = off + q0 + warp * 16;  // the smallest limit of this warp's rows

  for (int kt = 0; kt < n_kt; kt++) {
    const bf16 *sK = key_tile<D>(sKV, kt, qt, k, v, s.tk), *sV = sK + T;
    const int k0 = kt * BK;

    wg_fence();
    wg_scores<D>(sc, sQ, sK);
    wg_finish(sc);

    const bool mask = k0 + BK - 1 > warp_lo || k0 + BK > s.tk;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + 8 * j + 2 * t + (e & 1);
        if (mask && key > lim[e >> 1]) sc[j][e] = -INFINITY;
      }
    online_softmax<false>(sc, o, m, l, s.scale_log2);
    wg_pb<D>(o, sc, sV);  // O += P V
    wg_finish(o);
  }

  store_ctx(ctx, lse, o, m, l, qt, warp * 16, s);
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* backward (1): dK, dV for one (64-key tile, kv head or a part of its query heads, sequence) */

template <int D>
struct DkvCfg {
  // one stage: Q, dO tiles, then lse and D of the 64 queries (fp32), padded to keep the next
  // stage's tiles 1024-byte aligned
  static constexpr size_t STAGE = 2 * Tile<D>::BYTES + 1024;
  static_assert(sizeof(float) * 2 * BQ <= 1024, "lse and D fit the pad");
  static constexpr size_t smem = 2 * Tile<D>::BYTES + 2 * STAGE + ALIGN_SLACK;  // K, V, stages
};

template <int D>
__global__ void __launch_bounds__(NT, 2)
    attn_wg_dkdv_kernel(bf16 *__restrict__ dk, bf16 *__restrict__ dv, float *__restrict__ part,
                        const bf16 *__restrict__ dctx, const bf16 *__restrict__ q,
                        const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                        const float *__restrict__ lse, const float *__restrict__ Dsum, Dims s,
                        int nsplit) {
#ifdef ATTN_WG_DEVICE
  using C = DkvCfg<D>;
  constexpr int ND = D / 8, T = 64 * D;
  unsigned char *sm = smem_tiles();
  bf16 *sK = reinterpret_cast<bf16 *>(sm), *sV = sK + T;
  unsigned char *stages = sm + 2 * Tile<D>::BYTES;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const KvTile kv = kv_tile<D>(s, nsplit, BK, BQ);  // the lambda below reads it
  const auto [kh, split, hpb, h0, b, k0, nk, off, qt_begin, n_qt, q_ld, k_ld, k_base] = kv;
  const int per_head = n_qt - qt_begin, n_it = hpb * per_head;

  // query tile `it` (head h0 + it / per_head, tile qt_begin + it % per_head) -> stage
  static_assert(2 * BQ == NT, "every thread loads one lse or D");
  auto issue_q = [&](int it, unsigned char *st) {
    const QStage t = q_stage<D>(kv, s, it, per_head, BQ);
    bf16 *sq = reinterpret_cast<bf16 *>(st);
    load_tile<D>(sq, q + t.q_base, kv.q_ld, t.nq);
    load_tile<D>(sq + T, dctx + t.q_base, kv.q_ld, t.nq);
    load_lse_d(reinterpret_cast<float *>(st + 2 * Tile<D>::BYTES), lse, Dsum, t, BQ);
  };

  load_tile<D>(sK, k + k_base, k_ld, nk);
  load_tile<D>(sV, v + k_base, k_ld, nk);
  issue_q(0, stages);
  cp_async_commit();

  float ak[ND][4], av[ND][4], sT[8][4], dpT[8][4];
#pragma unroll
  for (int n = 0; n < ND; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) ak[n][e] = av[n][e] = 0.0f;
  const int key_g = k0 + 16 * warp + g;  // this thread's keys: key_g and key_g + 8

  for (int it = 0; it < n_it; it++) {
    tiles_landed();
    __syncthreads();  // stage it visible to all; everyone is done with stage it-1
    if (it + 1 < n_it) {
      issue_q(it + 1, stages + ((it + 1) & 1) * C::STAGE);
      cp_async_commit();
    }
    const auto [q0, nq, q_base, r] = q_stage<D>(kv, s, it, per_head, BQ);
    const unsigned char *st = stages + (it & 1) * C::STAGE;
    const bf16 *sQ = reinterpret_cast<const bf16 *>(st), *sdO = sQ + T;
    const float *sL = reinterpret_cast<const float *>(st + 2 * Tile<D>::BYTES), *sD = sL + BQ;

    // S^T = K Q^T and dP^T = V dO^T: 64 keys x 64 queries
    wg_scores2<D>(sT, sK, sQ, dpT, sV, sdO);

    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - D); element (key row, query column)
    const bool mask = k0 + BK - 1 > off + q0 || q0 + BQ > s.tq;
    dkdv_scores<false>(sT, dpT, sL, sD, nullptr, 0, key_g, mask, nq, off + q0, s.scale_log2);
    // dV += P^T dO, dK += dS^T Q
    wg_pb<D>(av, sT, sdO);
    wg_pb<D>(ak, dpT, sQ);
    wg_finish(av, ak);
  }
  cp_async_wait_all();  // n_it == 0 leaves nothing in flight either

#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int j = 16 * warp + g + 8 * i;
    if (j >= nk) continue;
    auto sk = [&](int n, int c) { return ak[n][2 * i + c]; };
    auto sv = [&](int n, int c) { return av[n][2 * i + c]; };
    store_dkdv<D>(dk, dv, part, s, nsplit, split, b, kh, k0 + j, k_base + (size_t)j * k_ld, sk,
                  sv);
  }
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* backward (2): dQ for one (64-query tile, head, sequence) */

template <int D>
__global__ void __launch_bounds__(NT, 2)
    attn_wg_dq_kernel(bf16 *__restrict__ dq, const bf16 *__restrict__ dctx,
                      const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                      const bf16 *__restrict__ v, const float *__restrict__ lse,
                      const float *__restrict__ Dsum, Dims s) {
#ifdef ATTN_WG_DEVICE
  constexpr int ND = D / 8, T = 64 * D;
  bf16 *sQ = reinterpret_cast<bf16 *>(smem_tiles());
  bf16 *sdO = sQ + T, *sKV = sdO + T;  // stage st: K at sKV + 2 T st, V after it
  const int warp = threadIdx.x >> 5;
  const QueryTile qt = query_tile<D>(s, BQ, BK);
  const auto [h, b, q0, nq, kh, off, n_kt, q_ld, k_ld, q_base, k_base] = qt;

  load_tile<D>(sQ, q + q_base, q_ld, nq);
  load_tile<D>(sdO, dctx + q_base, q_ld, nq);
  load_kv<D>(sKV, k, v, k_base, k_ld, 0, s.tk);
  cp_async_commit();

  float l2[2], Dr[2];
  int lim[2];  // last key rows g, g+8 see; -1 for padding rows
  dq_rows(l2, Dr, lim, lse, Dsum, qt, warp * 16, s);
  const bool pad = 16 * warp + 16 > nq;  // some row of this warp is padding
  const int warp_lo = off + q0 + 16 * warp;
  float acc[ND][4], sc[8][4], dp[8][4];
#pragma unroll
  for (int n = 0; n < ND; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int kt = 0; kt < n_kt; kt++) {
    const bf16 *sK = key_tile<D>(sKV, kt, qt, k, v, s.tk), *sV = sK + T;
    const int k0 = kt * BK;

    // S = Q K^T and dP = dO V^T: 64 rows x 64 keys
    wg_scores2<D>(sc, sQ, sK, dp, sdO, sV);

    // dS = P (dP - D), P = exp(S - lse)
    const bool mask = k0 + BK - 1 > warp_lo || pad;
    dq_scores<false>(sc, dp, l2, Dr, lim, nullptr, k0, mask, s.scale_log2);
    wg_pb<D>(acc, dp, sK);  // dQ += dS K
    wg_finish(acc);
  }

  store_dq(dq, acc, qt, warp * 16, s);
#endif
}

/* ---- host side ---------------------------------------------------------------------------- */

template <int D>
constexpr size_t fwd_smem() { return 5 * Tile<D>::BYTES + ALIGN_SLACK; }  // Q, 2 x (K, V)
template <int D>
constexpr size_t dq_smem() { return 6 * Tile<D>::BYTES + ALIGN_SLACK; }  // Q, dO, 2 x (K, V)
template <int D>
constexpr size_t bwd_smem() { return dq_smem<D>() > DkvCfg<D>::smem ? dq_smem<D>() : DkvCfg<D>::smem; }

template <int D>
static void launch_fwd(bf16 *ctx, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       const Dims &d) {
  static bool done = false;
  cuda_allow_smem(attn_wg_fwd_kernel<D>, fwd_smem<D>(), &done);
  dim3 grid(d.heads, (d.tq + BQ - 1) / BQ, d.batch);
  attn_wg_fwd_kernel<D><<<grid, NT, fwd_smem<D>(), cuda_ctx.stream>>>(ctx, lse, q, k, v, d);
  CUDA_LAUNCHED("attn_wg_fwd_kernel");
}

template <int D>
static void launch_bwd(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dctx, const bf16 *q,
                       const bf16 *k, const bf16 *v, const float *lse, const float *Dsum,
                       const Shape &d) {
  if (dk || dv) {
    // Blocks differ in length (key tile j sees the query tiles from j on): with fewer than
    // about 1.5 waves of them (two resident per SM) every block starts at once and the SMs
    // holding the longest run alone at the end. Cutting the group into parts (planes reduced
    // after) gives the longest-first order later blocks to fill in with: at T 2048, 32/8 heads,
    // 256 blocks on 264 slots become 512.
    const long blocks = (long)d.kv_heads * ((d.tk + BK - 1) / BK) * d.batch;
    float *part;
    const int nsplit = dkdv_parts(d, D, blocks, 3L * cuda_ctx.sm_count, Dsum, &part);
    static bool done = false;
    cuda_allow_smem(attn_wg_dkdv_kernel<D>, DkvCfg<D>::smem, &done);
    dim3 grid(d.kv_heads * nsplit, (d.tk + BK - 1) / BK, d.batch);
    attn_wg_dkdv_kernel<D><<<grid, NT, DkvCfg<D>::smem, cuda_ctx.stream>>>(
        dk, dv, part, dctx, q, k, v, lse, Dsum, d, nsplit);
    CUDA_LAUNCHED("attn_wg_dkdv_kernel");
    if (nsplit > 1) dkdv_reduce(dk, dv, part, d, D, nsplit);
  }
  if (dq) {
    static bool done = false;
    cuda_allow_smem(attn_wg_dq_kernel<D>, dq_smem<D>(), &done);
    dim3 grid(d.heads, (d.tq + BQ - 1) / BQ, d.batch);
    attn_wg_dq_kernel<D><<<grid, NT, dq_smem<D>(), cuda_ctx.stream>>>(dq, dctx, q, k, v, lse,
                                                                      Dsum, d);
    CUDA_LAUNCHED("attn_wg_dq_kernel");
  }
}

}  // namespace attn_wg

// cuda_attention_bf16.cu's entry points call these first, with the shape made and the tensors
// checked for alignment.
bool attn_wg::forward(bf16 *ctx, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                      const Shape &d, int head_dim) {
  if (!cuda_ctx.wgmma || d.doc ||
      (size_t)cuda_smem_optin() < (head_dim == 64 ? fwd_smem<64>() : fwd_smem<128>()))
    return false;
  with_head_dim(head_dim, [&](auto hd) { launch_fwd<hd.value>(ctx, lse, q, k, v, d); });
  return true;
}

bool attn_wg::backward(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dctx, const bf16 *q,
                       const bf16 *k, const bf16 *v, const float *lse, const float *Dsum,
                       const Shape &d, int head_dim) {
  if (!cuda_ctx.wgmma || d.doc ||
      (size_t)cuda_smem_optin() < (head_dim == 64 ? bwd_smem<64>() : bwd_smem<128>()))
    return false;
  with_head_dim(head_dim, [&](auto hd) {
    launch_bwd<hd.value>(dq, dk, dv, dctx, q, k, v, lse, Dsum, d);
  });
  return true;
}
