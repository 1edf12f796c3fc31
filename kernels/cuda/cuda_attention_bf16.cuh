/* What the two bf16 tensor-core attention files share (cuda_attention_bf16.cu: mma.sync, any
 * GPU from sm_80; cuda_attention_wgmma.cu: Hopper's wgmma): the inline-PTX primitives, the
 * shape the kernels take, and the dK/dV planes that let more blocks share a kv head's queries.
 * Fragment layouts and the arithmetic are described in cuda_attention_bf16.cu's comment. */
#ifndef QWEN3_CUDA_ATTENTION_BF16_CUH
#define QWEN3_CUDA_ATTENTION_BF16_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_dtype.cuh"

/* ---- device primitives (inline PTX, sm_80+) ---------------------------------------------- */
namespace attn_bf16 {

__device__ __forceinline__ unsigned char *smem_base() {
  extern __shared__ float4 attn_bf16_smem[];
  return reinterpret_cast<unsigned char *>(attn_bf16_smem);
}

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane i addresses row i%8 of matrix i/8 (see the file comment)
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// The same, each matrix transposed: lane 4g+t receives elements (2t, g) and (2t+1, g)
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += A B, one m16n8k16 bf16 product with fp32 accumulators
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats -> one register of two bf16 (round to nearest even), lo in the low half
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&x);
}

// 16 bytes global -> shared; valid == false writes 16 zero bytes and reads nothing
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared; valid == false writes a zero
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// everything this thread committed has landed and is visible to it
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// 2^x as PTX's ex2.approx.ftz.f32. exp2f compiles to ex2.approx.f32, which keeps subnormal
// inputs and results and pays instructions for it around the special-function unit's own, on
// every score of kernels whose issue slots are half busy; the .ftz form made them 3-5% faster
// (bench/NOTES.md, session 9). A result under 2^-126 is 0 here: a probability that small adds
// nothing to a row whose largest is 1; -inf still gives 0, NaN still NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// *p (two bf16) += (x, y), rounded once; *p = (x, y) when not acc (0 + x is x exactly)
__device__ __forceinline__ void add_bf16x2(bf16 *p, float x, float y, bool acc) {
  __nv_bfloat162 *q = reinterpret_cast<__nv_bfloat162 *>(p);
  const float2 old = acc ? __bfloat1622float2(*q) : make_float2(0.0f, 0.0f);
  *q = __floats2bfloat162_rn(old.x + x, old.y + y);
}

}  // namespace attn_bf16

namespace attn_bf16 {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Dims {
  int batch, tq, tk, k_stride, heads, kv_heads, group;
  float scale;       // head_dim^-0.5
  float scale_log2;  // head_dim^-0.5 * log2(e)
  bool acc;          // the backward adds into dq, dk, dv (ACC_DX) rather than overwriting them
};

// The host's view: Dims and attn_shape.doc_start, which goes to the kernels as an argument of
// its own (read only by their DOC instantiations).
struct Shape : Dims {
  const int32_t *doc;
};

// The shapes the tensor-core kernels handle (both files; each adds its own limits); false: the
// caller uses the generic kernels.
static inline bool make_dims(Shape *d, const struct attn_shape *a) {
  if (a->head_dim != 64 && a->head_dim != 128) return false;
  if (a->tq < 16 || a->batch <= 0 || a->heads <= 0 || a->kv_heads <= 0) return false;
  if (a->heads % a->kv_heads || a->tq > a->tk || a->tk > a->k_stride) return false;
  if (a->batch > 65535 || (a->tk + 15) / 16 > 65535) return false;  // grid y and z
  d->batch = a->batch, d->tq = a->tq, d->tk = a->tk, d->k_stride = a->k_stride;
  d->heads = a->heads, d->kv_heads = a->kv_heads, d->group = a->heads / a->kv_heads;
  d->scale = (float)(1.0 / sqrt((double)a->head_dim));  // as the CPU backend
  d->scale_log2 = (float)(1.4426950408889634 / sqrt((double)a->head_dim));
  d->doc = a->doc_start;
  d->acc = true;  // the backward sets it from its acc argument
  return true;
}

/* ---- pieces both files' kernels run ------------------------------------------------------ */

// A forward or dQ block's query tile: BQ queries from q0 of head h of sequence b (blockIdx.x and
// .z; blockIdx.y counts tiles from the last, so the longest rows go first), its kv head, the
// offsets of its rows in Q (ctx, dO, dQ) and of the sequence in K/V, and the BK-key tiles up to
// the last key of its last row.
struct QueryTile {
  int h, b, q0, nq, kh, off, n_kt;
  size_t q_ld, k_ld, q_base, k_base;
};
template <int D>
__device__ __forceinline__ QueryTile query_tile(const Dims &s, int bq, int bk) {
  QueryTile r;
  r.h = blockIdx.x, r.b = blockIdx.z;
  r.q0 = (gridDim.y - 1 - blockIdx.y) * bq;
  r.nq = min(bq, s.tq - r.q0);
  r.kh = r.h / s.group, r.off = s.tk - s.tq;
  r.q_ld = (size_t)s.heads * D, r.k_ld = (size_t)s.kv_heads * D;
  r.q_base = ((size_t)r.b * s.tq + r.q0) * r.q_ld + (size_t)r.h * D;
  r.k_base = (size_t)r.b * s.k_stride * r.k_ld + (size_t)r.kh * D;
  r.n_kt = (r.off + r.q0 + r.nq - 1) / bk + 1;
  return r;
}

// A dK/dV block's key tile: BK keys from k0 of kv head kh of sequence b (blockIdx.x / nsplit and
// .z; blockIdx.y is the slow axis, so the longest blocks go first), its part `split` of the
// group's query heads (hpb heads from h0), the offsets of its keys in K/V, and the query tiles
// of BQ from the first that sees key k0 (query i sees key j when j <= off + i).
struct KvTile {
  int kh, split, hpb, h0, b, k0, nk, off, qt_begin, n_qt;
  size_t q_ld, k_ld, k_base;
};
template <int D>
__device__ __forceinline__ KvTile kv_tile(const Dims &s, int nsplit, int bk, int bq) {
  KvTile r;
  r.kh = blockIdx.x / nsplit, r.split = blockIdx.x % nsplit;
  r.hpb = s.group / nsplit, r.h0 = r.kh * s.group + r.split * r.hpb;
  r.b = blockIdx.z, r.k0 = blockIdx.y * bk, r.nk = min(bk, s.tk - r.k0), r.off = s.tk - s.tq;
  r.q_ld = (size_t)s.heads * D, r.k_ld = (size_t)s.kv_heads * D;
  r.k_base = ((size_t)r.b * s.k_stride + r.k0) * r.k_ld + (size_t)r.kh * D;
  r.qt_begin = max(0, r.k0 - r.off) / bq, r.n_qt = (s.tq + bq - 1) / bq;
  return r;
}

// Query tile `it` of a dK/dV block's walk (head h0 + it / per_head, tile qt_begin + it %
// per_head): its first row q0 and nq rows, its Q and dO rows at q_base, its lse and D at r.
struct QStage {
  int q0, nq;
  size_t q_base, r;
};
template <int D>
__device__ __forceinline__ QStage q_stage(const KvTile &kv, const Dims &s, int it, int per_head,
                                          int bq) {
  const int h = kv.h0 + it / per_head, q0 = (kv.qt_begin + it % per_head) * bq;
  return {q0, min(bq, s.tq - q0), ((size_t)kv.b * s.tq + q0) * kv.q_ld + (size_t)h * D,
          ((size_t)kv.b * s.heads + h) * s.tq + q0};
}
// lse, then D, of a query tile's bq rows into sf (2 bq floats), one value a thread for the
// block's first 2 bq threads; rows past nq get 0
__device__ __forceinline__ void load_lse_d(float *sf, const float *lse, const float *Dsum,
                                           const QStage &t, int bq) {
  const int i = threadIdx.x, ii = i % bq;
  const bool ok = ii < t.nq;
  cp_async4(sf + i, (i < bq ? lse : Dsum) + (ok ? t.r + ii : 0), ok);
}

// The forward's running state of rows row0 + g and row0 + g + 8: O = 0, m = -inf, l = 0, and
// the last key each sees (clamped to tk - 1 for padding rows, which then stay finite)
template <int ND>
__device__ __forceinline__ void fwd_rows(float (&o)[ND][4], float (&m)[2], float (&l)[2],
                                         int (&lim)[2], const QueryTile &qt, int row0, int tk) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    lim[i] = min(qt.off + qt.q0 + row0 + g + 8 * i, tk - 1);
  }
#pragma unroll
  for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
}

// One key tile of the online softmax for rows g and g+8: the raw scores sc (Q K^T, -inf where
// masked) become P = exp2((sc - m_new) * scale_log2) in place, one FFMA and the exponent a
// score (the scale folded into the FFMA rather than a multiply of its own), and m (a raw score),
// l (this lane's share; the quad is summed at the end) and the accumulators o follow. Without
// documents every row sees key 0, so m is finite from the first tile on; with them a row may
// see no key of a tile before its document's (m_new = -inf), and then stays empty: m_use = 0
// keeps exp2(-inf - -inf) = NaN out.
template <bool DOC, int NN, int ND>
__device__ __forceinline__ void online_softmax(float (&sc)[NN][4], float (&o)[ND][4],
                                               float (&m)[2], float (&l)[2], float scale_log2) {
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NN; j++) mx = fmaxf(mx, fmaxf(sc[j][2 * i], sc[j][2 * i + 1]));
    const float m_new = fmaxf(m[i], quad_max(mx));
    const float m_use = DOC && m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2_ftz((m[i] - m_use) * scale_log2);  // 0 on the first tile (m = -inf)
    const float shift = -m_use * scale_log2;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < NN; j++) {   // masked: exp2(-inf) = 0
      sc[j][2 * i] = exp2_ftz(fmaf(sc[j][2 * i], scale_log2, shift));
      sc[j][2 * i + 1] = exp2_ftz(fmaf(sc[j][2 * i + 1], scale_log2, shift));
      sum += sc[j][2 * i] + sc[j][2 * i + 1];
    }
    l[i] = l[i] * alpha + sum;
    m[i] = m_new;
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][2 * i] *= alpha, o[n][2 * i + 1] *= alpha;
  }
}

// ctx = O / l and lse = (m scale_log2 + log2 l) ln 2 for rows row0 + g and row0 + g + 8 of the tile
// (padding rows are not written)
template <int ND>
__device__ __forceinline__ void store_ctx(bf16 *ctx, float *lse, const float (&o)[ND][4],
                                          const float (&m)[2], const float (&l)[2],
                                          const QueryTile &qt, int row0, const Dims &s) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const float L = quad_sum(l[i]);
    const int row = row0 + g + 8 * i;
    if (row < qt.nq) {
      const float inv = 1.0f / L;
      bf16 *out = ctx + qt.q_base + (size_t)row * qt.q_ld + 2 * t;
#pragma unroll
      for (int n = 0; n < ND; n++)
        *reinterpret_cast<__nv_bfloat162 *>(out + 8 * n) =
            __floats2bfloat162_rn(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
      if (t == 0)
        lse[((size_t)qt.b * s.heads + qt.h) * s.tq + qt.q0 + row] =
            (m[i] * s.scale_log2 + log2f(L)) * LN2;
    }
  }
}

// The lse (times log2 e), D and last key seen (-1: a padding row) of rows row0 + g, + 8 (dQ)
__device__ __forceinline__ void dq_rows(float (&l2)[2], float (&Dr)[2], int (&lim)[2],
                                        const float *lse, const float *Dsum, const QueryTile &qt,
                                        int row0, const Dims &s) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = row0 + g + 8 * i;
    const size_t ri = ((size_t)qt.b * s.heads + qt.h) * s.tq + qt.q0 + r;
    l2[i] = r < qt.nq ? lse[ri] * LOG2E : 0.0f;
    Dr[i] = r < qt.nq ? Dsum[ri] : 0.0f;
    lim[i] = r < qt.nq ? qt.off + qt.q0 + r : -1;
  }
}

// dS = P (dP - D) in place of dp, P = exp(S - lse), rows g and g+8 against keys k0 + 8j + 2t..;
// when `mask`, keys past a row's limit (DOC: or before its document's first key, first[0] and
// first[8], read from shared memory) get 0
template <bool DOC, int NN>
__device__ __forceinline__ void dq_scores(const float (&sc)[NN][4], float (&dp)[NN][4],
                                          const float (&l2)[2], const float (&Dr)[2],
                                          const int (&lim)[2], const int32_t *first, int k0,
                                          bool mask, float scale_log2) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int j = 0; j < NN; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int i = e >> 1, key = k0 + 8 * j + 2 * t + (e & 1);
      const float p = exp2_ftz(sc[j][e] * scale_log2 - l2[i]);
      bool seen = !mask || key <= lim[i];
      if constexpr (DOC) seen = seen && (!mask || key >= first[8 * i]);
      dp[j][e] = seen ? p * (dp[j][e] - Dr[i]) : 0.0f;
    }
}

// dq (+)= scale * acc for rows row0 + g and row0 + g + 8 (padding rows are not written)
template <int ND>
__device__ __forceinline__ void store_dq(bf16 *dq, const float (&acc)[ND][4], const QueryTile &qt,
                                         int row0, const Dims &s) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int row = row0 + g + 8 * i;
    if (row >= qt.nq) continue;
    bf16 *out = dq + qt.q_base + (size_t)row * qt.q_ld + 2 * t;
#pragma unroll
    for (int n = 0; n < ND; n++)
      add_bf16x2(out + 8 * n, s.scale * acc[n][2 * i], s.scale * acc[n][2 * i + 1], s.acc);
  }
}

// dK/dV: P^T = exp(S^T - lse) in place of sT and dS^T = P^T (dP^T - D) in place of dpT, key
// rows key_g and key_g + 8 against the stage's query columns qc0 + 8j + 2t.. (lse, D and, DOC,
// the queries' first keys from shared memory). When `mask`, pairs not seen get 0: a padding
// query (column >= nq), a key past the query's limit lim0 + column, (DOC) a key before the
// query's first.
template <bool DOC, int NJ>
__device__ __forceinline__ void dkdv_scores(float (&sT)[NJ][4], float (&dpT)[NJ][4],
                                            const float *sL, const float *sD, const int32_t *sF,
                                            int qc0, int key_g, bool mask, int nq, int lim0,
                                            float scale_log2) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int j = 0; j < NJ; j++) {
    const int ql = qc0 + 8 * j + 2 * t;  // columns ql, ql + 1
    const float2 L = *reinterpret_cast<const float2 *>(sL + ql);
    const float2 Dd = *reinterpret_cast<const float2 *>(sD + ql);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int key = key_g + 8 * (e >> 1), qc = ql + (e & 1);
      const float p = exp2_ftz(sT[j][e] * scale_log2 - ((e & 1) ? L.y : L.x) * LOG2E);
      const bool seen =
          !mask || (qc < nq && key <= lim0 + qc && (!DOC || key >= sF[qc]));
      sT[j][e] = seen ? p : 0.0f;
      dpT[j][e] = seen ? p * (dpT[j][e] - ((e & 1) ? Dd.y : Dd.x)) : 0.0f;
    }
  }
}

// The group's dK (unscaled) and dV sums of key row k_row (k_base + key * k_ld: columns 2t +
// 8n, n < D/8), from sk(n, c), sv(n, c), c = 0, 1: added into dk and dv (dK times the softmax
// scale) when one block holds the group (nsplit 1), else written to this block's plane of part,
// [2][nsplit][batch][tk][kv_heads][hd], reduced by dkdv_reduce.
template <int D, typename SK, typename SV>
__device__ __forceinline__ void store_dkdv(bf16 *dk, bf16 *dv, float *part, const Dims &s,
                                           int nsplit, int split, int b, int kh, int key,
                                           size_t k_row, SK sk, SV sv) {
  const int t = threadIdx.x & 3;
  const size_t plane = (size_t)s.batch * s.tk * s.kv_heads * D;
  float *pk = nsplit == 1 ? nullptr
                          : part + ((((size_t)split * s.batch + b) * s.tk + key) * s.kv_heads +
                                    kh) * D + 2 * t;
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    const float k0 = sk(n, 0), k1 = sk(n, 1), v0 = sv(n, 0), v1 = sv(n, 1);
    if (nsplit == 1) {
      if (dk) add_bf16x2(dk + k_row + 2 * t + 8 * n, s.scale * k0, s.scale * k1, s.acc);
      if (dv) add_bf16x2(dv + k_row + 2 * t + 8 * n, v0, v1, s.acc);
    } else {
      *reinterpret_cast<float2 *>(pk + 8 * n) = make_float2(k0, k1);
      *reinterpret_cast<float2 *>(pk + nsplit * plane + 8 * n) = make_float2(v0, v1);
    }
  }
}

// Every tensor given (NULL: not given) 16-byte aligned, as the kernels' cp.async loads need
template <typename... P>
static inline bool aligned16_all(P... p) {
  return ((!p || cuda_aligned16(p)) && ...);
}

// f(std::integral_constant<int, D>()) for head_dim D = 64 or 128: the kernels' instantiation
template <typename F>
static inline void with_head_dim(int head_dim, F f) {
  if (head_dim == 64)
    f(std::integral_constant<int, 64>());
  else
    f(std::integral_constant<int, 128>());
}

/* dK/dV over few blocks (short or few sequences): each kv head's query heads are cut into
 * nsplit parts, one block a part; each writes its fp32 sums to a plane of its own and
 * dkdv_reduce adds the planes in order. dkdv_parts picks nsplit (1: no planes, the blocks add
 * straight into dk, dv) for `blocks` blocks against `slots` resident ones, and takes the planes
 * from the scratch arena past D (NULL, nsplit 1, when they do not fit). */
int dkdv_parts(const Shape &d, int hd, long blocks, long slots, const float *Dsum, float **part);
void dkdv_reduce(bf16 *dk, bf16 *dv, const float *part, const Dims &d, int hd, int nsplit);

}  // namespace attn_bf16

namespace attn_wg {
using attn_bf16::Shape;
// Hopper's wgmma kernels (cuda_attention_wgmma.cu) when cuda_ctx.wgmma and they take the shape
// (no documents, their shared memory): true when they ran, false (nothing launched) otherwise.
bool forward(bf16 *ctx, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, const Shape &d,
             int head_dim);
bool backward(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dctx, const bf16 *q, const bf16 *k,
              const bf16 *v, const float *lse, const float *Dsum, const Shape &d, int head_dim);
}  // namespace attn_wg

#endif
