/* Causal grouped-query attention, one (sequence, query head) at a time, its products as
 * single-precision GEMMs over strided head views (as HF's eager fp32 attention computes them):
 * S = scale · Q Kᵀ, then a row softmax with double sums, then ctx = P V. Masked scores are
 * computed and thrown away: the GEMMs are so much faster than loops that the wasted half is
 * cheaper than skipping it. In a packed sequence (attn_shape.doc_start) a row's keys before its
 * document's first are masked like the future ones, zero in P and dS, so that they add nothing
 * to any product. The row loops between the GEMMs stay serial: they cost 1/head_dim
 * of the GEMMs, and OpenMP threads spinning between BLAS calls would steal the cores of BLAS's
 * own threads. The backward rebuilds P = exp(S - lse) from the saved log-sum-exp instead of
 * storing it (the flash-attention recipe), so the CPU and GPU backends save the same tensors. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "kernels/cpu/cpu.h"

static void check_shape(const struct attn_shape *s) {
  if (s->kv_heads <= 0 || s->heads % s->kv_heads)
    die("attention: %d heads do not split into %d kv heads", s->heads, s->kv_heads);
  if (s->tq > s->tk || s->tk > s->k_stride)
    die("attention: need tq <= tk <= k_stride, got %d, %d, %d", s->tq, s->tk, s->k_stride);
  if (s->key_last && s->tq != 1) die("attention: key_last is for one query (tq %d)", s->tq);
}

/* First row of sequence b, head h in [batch*tq, heads, head_dim] (q, ctx, dq, dctx). */
static size_t q_offset(const struct attn_shape *s, int b, int h) {
  return ((size_t)b * s->tq * s->heads + h) * s->head_dim;
}

/* First row of sequence b, kv head kh in [.., kv_heads, head_dim] with k_stride rows per
 * sequence (k, v, dk, dv). */
static size_t k_offset(const struct attn_shape *s, int b, int kh) {
  return ((size_t)b * s->k_stride * s->kv_heads + kh) * s->head_dim;
}

/* Query i sees keys 0 .. tk - tq + i. */
static int last_key(const struct attn_shape *s, int i) { return s->tk - s->tq + i; }

/* ... and, in a packed sequence, none before its document's first: doc_start[row]. */
static int first_key(const struct attn_shape *s, int b, int i) {
  if (!s->doc_start) return 0;
  int first = s->doc_start[(size_t)b * s->tq + i];
  if (first < 0 || first > last_key(s, i))
    die("attention: doc_start %d of query %d of sequence %d is outside its keys 0 .. %d", first,
        i, b, last_key(s, i));
  return first;
}

/* S[tq, tk] = scale · Q_h K_khᵀ for one sequence and head */
static void head_scores(float *S, const float *q, const float *k, const struct attn_shape *s,
                        int b, int h) {
  int hd = s->head_dim, kh = h / (s->heads / s->kv_heads);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->tq, s->tk, hd,
              (float)(1.0 / sqrt((double)hd)), q + q_offset(s, b, h), s->heads * hd,
              k + k_offset(s, b, kh), s->kv_heads * hd, 0.0f, S, s->tk);
}

void cpu_attention_forward(void *ctx_, float *lse, const void *q_, const void *k_, const void *v_,
                           const struct attn_shape *s) {
  float *ctx = ctx_;
  const float *q = q_;
  const float *k = k_;
  const float *v = v_;
  check_shape(s);
  if (s->key_last) {   /* decoding: each sequence alone, over the keys it sees */
    for (int b = 0; b < s->batch; b++) {
      struct attn_shape one = *s;
      one.batch = 1;
      one.tk = s->key_last[b] + 1;
      one.key_last = NULL;
      one.doc_start = s->doc_start ? s->doc_start + b : NULL;
      if (one.tk < 1 || one.tk > s->tk)
        die("attention: key_last %d of sequence %d is outside its keys 0 .. %d", one.tk - 1, b,
            s->tk - 1);
      cpu_attention_forward(ctx + q_offset(s, b, 0), lse + (size_t)b * s->heads,
                            q + q_offset(s, b, 0), k + k_offset(s, b, 0), v + k_offset(s, b, 0),
                            &one);
    }
    return;
  }
  int hd = s->head_dim, tq = s->tq, tk = s->tk;
  float *P = xmalloc((size_t)(tq > 0 ? tq : 1) * tk * sizeof(float));
  for (int b = 0; b < s->batch; b++)
    for (int h = 0; h < s->heads; h++) {
      head_scores(P, q, k, s, b, h);
      float *row_lse = lse + ((size_t)b * s->heads + h) * tq;
      for (int i = 0; i < tq; i++) {
        float *p = P + (size_t)i * tk;
        int first = first_key(s, b, i), last = last_key(s, i);
        float max = p[first];
        for (int j = first + 1; j <= last; j++)
          if (p[j] > max) max = p[j];
        double sum = 0.0;
        for (int j = first; j <= last; j++) {
          double e = exp((double)p[j] - max);
          sum += e;
          p[j] = (float)e;
        }
        for (int j = first; j <= last; j++) p[j] = (float)(p[j] / sum);
        for (int j = 0; j < first; j++) p[j] = 0.0f;
        for (int j = last + 1; j < tk; j++) p[j] = 0.0f;
        row_lse[i] = (float)(max + log(sum));
      }
      int kh = h / (s->heads / s->kv_heads);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tq, hd, tk, 1.0f, P, tk,
                  v + k_offset(s, b, kh), s->kv_heads * hd, 0.0f, ctx + q_offset(s, b, h),
                  s->heads * hd);
    }
  free(P);
}

/* With P = softmax(S), dP = dO Vᵀ and D_i = dO_i · O_i (= Σ_j P_ij dP_ij):
 * dS = P ∘ (dP - D), dQ = scale · dS K, dK = scale · dSᵀ Q, dV = Pᵀ dO.
 * Heads run one after another, so the query heads of a group add into their shared dK and dV
 * rows through the GEMMs' beta = 1 without any race; without ACC_DX the group's first head
 * writes them (beta = 0). */
void cpu_attention_backward(void *dq_, void *dk_, void *dv_, const void *dctx_, const void *q_,
                            const void *k_, const void *v_, const void *ctx_, const float *lse,
                            const struct attn_shape *s, int acc) {
  float *dq = dq_;
  float *dk = dk_;
  float *dv = dv_;
  const float *dctx = dctx_;
  const float *q = q_;
  const float *k = k_;
  const float *v = v_;
  const float *ctx = ctx_;
  check_shape(s);
  if (s->key_last) die("attention backward: key_last is for decoding only");
  int hd = s->head_dim, tq = s->tq, tk = s->tk, qld = s->heads * hd, kld = s->kv_heads * hd;
  float scale = (float)(1.0 / sqrt((double)hd));
  size_t square = (size_t)(tq > 0 ? tq : 1) * tk;
  float *P = xmalloc(square * sizeof(float)), *dS = xmalloc(square * sizeof(float));
  for (int b = 0; b < s->batch; b++)
    for (int h = 0; h < s->heads; h++) {
      int kh = h / (s->heads / s->kv_heads);
      size_t qo = q_offset(s, b, h), ko = k_offset(s, b, kh);
      float beta_q = acc & ACC_DX ? 1.0f : 0.0f;
      float beta_kv = (acc & ACC_DX) || h % (s->heads / s->kv_heads) ? 1.0f : 0.0f;
      head_scores(P, q, k, s, b, h);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tq, tk, hd, 1.0f, dctx + qo, qld,
                  v + ko, kld, 0.0f, dS, tk); /* dP */
      const float *row_lse = lse + ((size_t)b * s->heads + h) * tq;
      for (int i = 0; i < tq; i++) {
        float *p = P + (size_t)i * tk, *ds = dS + (size_t)i * tk;
        const float *o = ctx + qo + (size_t)i * qld, *dout = dctx + qo + (size_t)i * qld;
        int first = first_key(s, b, i), last = last_key(s, i);
        double d_i = 0.0;
        for (int d = 0; d < hd; d++) d_i += (double)dout[d] * o[d];
        for (int j = first; j <= last; j++) {
          p[j] = (float)exp((double)p[j] - row_lse[i]);
          ds[j] = (float)(p[j] * (ds[j] - d_i));
        }
        for (int j = 0; j < first; j++) p[j] = ds[j] = 0.0f;
        for (int j = last + 1; j < tk; j++) p[j] = ds[j] = 0.0f;
      }
      if (dq)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tq, hd, tk, scale, dS, tk,
                    k + ko, kld, beta_q, dq + qo, qld);
      if (dk)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk, hd, tq, scale, dS, tk, q + qo,
                    qld, beta_kv, dk + ko, kld);
      if (dv)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk, hd, tq, 1.0f, P, tk, dctx + qo,
                    qld, beta_kv, dv + ko, kld);
    }
  free(P);
  free(dS);
}
