/* The one backend interface. Every operation the engine runs is a field of `struct backend`;
 * the CPU backend (kernels/cpu, fp32, CBLAS) is the reference that every other backend is
 * tested against. The engine never dereferences a buffer it got from a backend: it allocates,
 * copies and calls ops through this table, so a CUDA backend plugs in without touching it.
 *
 * Conventions shared by every op:
 *  - Matrices are row-major. A linear weight is [out, in] (nn.Linear layout), y = x · Wᵀ.
 *  - Activations are [n, dim] with n = batch × seq tokens, row b*T + t.
 *  - Q is [n, heads, head_dim]; K and V are [n, kv_heads, head_dim].
 *  - Types. Every `void *` tensor is an activation, an activation gradient or the weight copy
 *    the GEMMs read, stored in the backend's activation dtype (act_dtype: fp32 on the CPU, bf16
 *    on the GPU unless its fp32/tf32 test modes are chosen); arithmetic inside every op is fp32.
 *    Every `float *` is fp32 whatever the mode: master weights (norm weights are read from
 *    them), parameter gradients, AdamW state, the log-sum-exp, the per-token NLL.
 *  - Every backward op takes `acc`, which says what it adds to (+=) rather than overwrites:
 *    ACC_DX its input gradients, ACC_DW its parameter gradients. A slot read by two stages (a
 *    residual) and a weight used by several micro-batches sum their gradients by accumulating
 *    after the first write; a gradient an op overwrites is not read, so nothing zeroes it
 *    first (what cuBLAS's beta = 0 does). A NULL input-gradient pointer means "not needed".
 *  - Results stay in backend memory: the NLL and the sums of sum_into are read by the engine
 *    once per step, so a step synchronizes with the host only for its log line.
 */
#ifndef QWEN3_OPS_H
#define QWEN3_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {   /* the CUDA backend's .cu files define the table */
#endif

/* The `acc` bits of the backward ops (see the top of this file). */
enum { ACC_DX = 1, ACC_DW = 2 };

/* Storage types of tensors. */
enum dtype { DT_F32, DT_BF16 };
/* Layouts of an NVFP4 operand (nvfp4_quantize). */
enum nvfp4_layout { NVFP4_ROWS, NVFP4_TILES, NVFP4_COLS, NVFP4_ROWS_INT };
/* NVFP4_ROWS_INT's operand of x [rows, cols] (cols a multiple of 16), the bytes from xq on:
 *   int8  k [rows * cols]   at 0: 2q of each value (an integer of -12..12), row-major;
 *   fp32  s [rows * cols / 16]   at nvfp4_int_scales_at: the block scale s_b of each 1x16
 *                           block, row-major (value i's is s[i / 16]), from the first 16-byte
 *                           boundary after k (as k's size is a multiple of 16, right after it);
 * nvfp4_int_operand_bytes in all. Value i is k[i] * s[i / 16] / 2 = q * s_b, exactly (a -0.0 of
 * NVFP4_ROWS, a negative value rounded to zero, becomes +0: its k is 0). */
static inline size_t nvfp4_int_scales_at(int rows, int cols) {
  return ((size_t)rows * (size_t)cols + 15) / 16 * 16;
}
static inline size_t nvfp4_int_operand_bytes(int rows, int cols) {
  return nvfp4_int_scales_at(rows, cols) + (size_t)rows * (size_t)cols / 16 * sizeof(float);
}
/* adamw_update's amax parts: one per ADAMW_AMAX_CHUNK consecutive values of its p (64 KiB of
 * fp32), the last part maybe over fewer. Large enough that the quantizer's blocks read few parts
 * (1520 for a 9728 x 2560 matrix), small enough that a matrix has a block of the update for
 * each SM or more (160 for a 1024 x 2560 one). */
#define ADAMW_AMAX_CHUNK 16384
/* The most token rows nvfp4_gemv_packed takes (a decoding step's), and the most matrices. */
#define NVFP4_GEMV_MAX_ROWS 4
#define NVFP4_GEMV_MAX_MATS 3
static inline size_t dtype_bytes(enum dtype t) { return t == DT_BF16 ? 2 : 4; }

/* Attention shape. Queries are the last tq of tk key positions of each sequence (tq == tk in
 * training; tq < tk when decoding against a KV cache). Keys/values of sequence b start at row
 * b * k_stride (k_stride >= tk; a KV cache is allocated for its maximum length). */
struct attn_shape {
  int batch, tq, tk, k_stride;
  int heads, kv_heads, head_dim;
  /* Document masking of packed sequences: NULL (plain causal), or [batch * tq] int32 in
   * backend memory: the first key (an index into its sequence's keys, 0 .. tk-1) that query row
   * i may see. Query i (row t = i % tq of its sequence) then sees keys doc_start[i] ..
   * tk - tq + t, so documents packed into one sequence never attend across each other; a
   * document's first token sees itself only. */
  const int32_t *doc_start;
  /* Decoding against a cache of a fixed size: NULL, or (tq == 1 only) [batch] int32 in backend
   * memory, the last key (0 .. tk-1) the query of sequence b sees, in place of tk - 1. The keys
   * after it are not read, so tk can be the cache's whole length and the shape the same at
   * every step of a generation (what a recorded decode step needs, see capture_begin). */
  const int32_t *key_last;
};

/* One AdamW step's scalars (kernels' adamw_update). */
struct adamw_step {
  float lr, beta1, beta2, eps, weight_decay;
  float grad_scale;   /* the gradient clipping factor; 1: none */
  int t;              /* the step, counted from 1 */
};

struct backend {
  const char *name;
  /* 1: buffers from alloc live on a device, and the host must go through to_host/to_device
   * (and comm's tensor calls stage through them); 0: they are plain host memory. */
  int device_memory;

  /* Binds this process to its share of the machine, local_rank of local_size processes on it:
   * CPU threads, or the GPU to use. rows: the most token rows one op call will carry (a
   * micro-batch, micro_batch_size x seq_len; 0 when not known), by which a GPU sizes its
   * scratch memory. Call once before any other op. */
  void (*init)(int local_rank, int local_size, int rows);

  /* memory: alloc returns zeroed memory or NULL */
  void *(*alloc)(size_t bytes);
  void (*free)(void *p);
  void (*to_device)(void *dst, const void *host_src, size_t bytes);
  void (*to_host)(void *host_dst, const void *src, size_t bytes);
  void (*copy)(void *dst, const void *src, size_t bytes);
  void (*zero)(void *p, size_t bytes);
  void (*synchronize)(void);
  /* Host memory the backend copies to and from fastest (pinned on a GPU, malloc's on the CPU),
   * for large staging buffers; host_alloc returns NULL when out of memory, host_free takes
   * NULL. */
  void *(*host_alloc)(size_t bytes);
  void (*host_free)(void *p);
  /* Bytes held now and at most so far (NULL where the backend does not count them). */
  void (*memory)(size_t *in_use, size_t *peak);

  /* The dtype of every `void *` tensor (see the top of this file); fixed by init. */
  enum dtype (*act_dtype)(void);
  /* dst[i] = src[i] for n values, converting between dtypes (to bf16: round to nearest even). */
  void (*convert)(void *dst, enum dtype dst_type, const void *src, enum dtype src_type,
                  size_t n);

  /* out[i,:] = table[tokens[i],:]; table is the weight copy */
  void (*embedding_forward)(void *out, const int32_t *tokens, const void *table, int n, int dim);
  /* dtable[tokens[i],:] += dout[i,:] */
  void (*embedding_backward)(float *dtable, const void *dout, const int32_t *tokens, int n,
                             int dim);

  /* out = x * rsqrt(mean(x²) + eps) * w, per row of dim (HF Qwen3RMSNorm) */
  void (*rmsnorm_forward)(void *out, const void *x, const float *w, int n, int dim, float eps);
  void (*rmsnorm_backward)(void *dx, float *dw, const void *dout, const void *x, const float *w,
                           int n, int dim, float eps, int acc);

  /* Per head of head_dim: RMSNorm with weight w (shared by all heads), then rotate-half RoPE at
   * positions[i] with inv_freq[j] = theta^(-2j/head_dim). x and out are [n, heads, head_dim].
   * The forward takes count (1 or 2) tensors of the same tokens: for c < count,
   * out[c] [n, heads[c], head_dim] = that of x[c] with weight w[c]. One call for q and k, so a
   * backend may run them as one launch, with one evaluation of a token's cos/sin for both
   * (decoding's q/k stage is then one link of the chain, not two); each tensor's values are
   * those of a call of its own. */
  void (*qk_norm_rope_forward)(void *const *out, const void *const *x, const float *const *w,
                               const int *heads, int count, const int32_t *positions, int n,
                               int head_dim, float eps, double theta);
  void (*qk_norm_rope_backward)(void *dx, float *dw, const void *dout, const void *x,
                                const float *w, const int32_t *positions, int n, int heads,
                                int head_dim, float eps, double theta, int acc);

  /* Causal grouped-query attention, scale head_dim^-0.5, softmax in fp32. ctx is
   * [batch*tq, heads, head_dim]; lse [batch, heads, tq] receives each row's log-sum-exp, which
   * the backward uses to rebuild the probabilities without storing them. */
  void (*attention_forward)(void *ctx, float *lse, const void *q, const void *k, const void *v,
                            const struct attn_shape *s);
  void (*attention_backward)(void *dq, void *dk, void *dv, const void *dctx, const void *q,
                             const void *k, const void *v, const void *ctx, const float *lse,
                             const struct attn_shape *s, int acc);

  /* out = silu(g) * u, elementwise over n values */
  void (*swiglu_forward)(void *out, const void *g, const void *u, size_t n);
  void (*swiglu_backward)(void *dg, void *du, const void *dout, const void *g, const void *u,
                          size_t n, int acc);

  /* The linear layers of one input (q|k|v, gate|up, or one): for j < count (at most 3),
   * outs[j][n, out_dims[j]] = x[n, in_dim] · ws[j][out_dims[j], in_dim]ᵀ; ws are weight copies.
   * One call, so a backend may run them as one product (decoding streams q, k and v in one
   * launch). */
  void (*linear_forward)(void *const *outs, const void *x, const void *const *ws,
                         const int *out_dims, int count, int n, int in_dim);
  /* dx (+)= dout · w ; dw (+)= doutᵀ · x   (dx or dw may be NULL) */
  void (*linear_backward)(void *dx, float *dw, const void *dout, const void *x, const void *w,
                          int n, int in_dim, int out_dim, int acc);

  /* out[i] = a[i] + b[i], all of dtype t (activations, their gradients, or fp32 parameter
   * gradients); out may be a (an accumulation) */
  void (*add)(void *out, const void *a, const void *b, size_t n, enum dtype t);
  /* A KV cache's append: row i * seq_rows + positions[i] of k_cache and of v_cache (rows of
   * `width` values) = row i of k and of v, for i < n: the tokens of one sequence (seq_rows 0),
   * or one token of each of n sequences of seq_rows rows each. positions are in backend
   * memory. */
  void (*kv_append)(void *k_cache, void *v_cache, const void *k, const void *v,
                    const int32_t *positions, int n, int width, int seq_rows);
  /* a[i] *= s */
  void (*scale)(float *a, float s, size_t n);
  /* Greedy decoding's token, picked where the logits are: dst[r] (int32) = the first index of
   * the largest value of row r of x [rows, n] (fp32) that is not NaN, 0 when every value is NaN
   * (ties to the lowest index; a row of -inf gives 0): kernels/argmax.h's argmax_first, which
   * the sampler runs on the host, so both pick the same token, whatever order a backend visits
   * the values in. A decoding step then copies `rows` ids to the host instead of rows x vocab
   * logits (608 KB a sequence at Qwen3's vocabulary). No copy, synchronization or allocation:
   * a recorded decoding step (capture_begin) ends with it. */
  void (*argmax_rows)(int32_t *dst, const float *x, int rows, int n);

  /* The LM head and cross-entropy, fused and chunked so the [n, vocab] logits never exist
   * whole. For each row i with targets[i] >= 0: nll[i] = logsumexp(logits_i) - logits_i[t].
   * Rows with targets[i] < 0 get nll[i] = 0 and no gradient. When dx != NULL, accumulates
   * dx += grad_scale * dlogits · w and dw += grad_scale * dlogitsᵀ · x, where
   * dlogits = softmax(logits) - onehot(target). x is [n, dim], w is [vocab, dim] (the weight
   * copy); nll (n floats) is backend memory. Targets must be < vocab (the data loader checks
   * them): the CPU dies on one that is not, a device backend writes a NaN nll for it. */
  void (*lm_head_loss)(float *nll, void *dx, float *dw, const void *x, const void *w,
                       const int32_t *targets, int n, int dim, int vocab, float grad_scale);

  /* *acc += the sum of x[i] (squares == 0) or of x[i]² (squares == 1) over n values, in
   * double, in an order that depends on n alone. acc is one double of backend memory: sums
   * stay on the device until the engine reads them, once per step. */
  void (*sum_into)(double *acc, const float *x, size_t n, int squares);

  /* NVFP4, emulated exactly (kernels/nvfp4.h has the numerics): what an FP4 tensor core
   * computes, on the exact values q * s_b. Nothing returns to the host.
   * nvfp4_quantize quantizes x [rows, cols] of dtype x_type (the activation dtype, or fp32 for
   * the master weights) and writes xq = q * s_b in the activation dtype (exact in bf16) and
   * *dec (one float of backend memory) = S_dec, the factor the GEMM's alpha takes. When x (or
   * its transform) holds a non-finite value, *dec is NaN and xq is not to be used: the GEMM
   * spreads the NaN into the step's loss or gradient norm. The layouts of xq:
   *   NVFP4_ROWS   [rows, cols], 1x16 blocks along each row (activations, output gradients);
   *   NVFP4_TILES  [rows, cols], 16x16 tiles, so W and Wᵀ quantize alike (weights);
   *   NVFP4_COLS   [cols, rows] = xᵀ with its rows quantized 1x16, after the random Hadamard
   *                transform of every 16-wide tile of those rows when rht_signs >= 0 (the
   *                16-bit sign mask): Wgrad's operands, whose reduction runs over x's rows.
   *   NVFP4_ROWS_INT  NVFP4_ROWS's quantization (its codes, scales and S_dec) written as
   *                nvfp4_gemv_packed's integer operand (above: k then s, not in the activation
   *                dtype), xq 16-byte aligned; round to nearest only (stochastic is refused:
   *                decoding's operands round to nearest).
   * Shapes: cols a multiple of 16; rows too for NVFP4_TILES and NVFP4_COLS (the backend stops,
   * naming the shape, otherwise). stochastic: rounding seeded by seed, each draw indexed by its
   * element of xq. xq may alias x for NVFP4_ROWS and NVFP4_TILES. */
  void (*nvfp4_quantize)(void *xq, float *dec, const void *x, enum dtype x_type, int rows,
                         int cols, enum nvfp4_layout layout, int stochastic, uint64_t seed,
                         int rht_signs);
  /* A weight's quantization whose amax AdamW already took: exactly
   *   nvfp4_quantize(xq, dec, w, DT_F32, rows, cols, layout, 0, 0, -1)
   * for layout NVFP4_ROWS, NVFP4_TILES or NVFP4_COLS (no transform), but the tensor amax is the
   * largest of amax_parts[0 .. n_parts) (backend memory: adamw_update's over w, see there)
   * instead of a pass over w, which is then read once, not twice. The parts must cover w: their
   * maximum is then the bits of max |w|, a non-finite one's included. */
  void (*nvfp4_quantize_weight)(void *xq, float *dec, const float *w, int rows, int cols,
                                enum nvfp4_layout layout, const uint32_t *amax_parts,
                                size_t n_parts);
  /* An output gradient's two operands from one read of x (the activation dtype): exactly
   *   nvfp4_quantize(rows_q, rows_dec, x, act, rows, cols, NVFP4_ROWS, stochastic, rows_seed, -1)
   *   nvfp4_quantize(cols_q, cols_dec, x, act, rows, cols, NVFP4_COLS, stochastic, cols_seed,
   *                  rht_signs)
   * (Dgrad's dY and Wgrad's transformed dYᵀ), each with its own tensor scale. */
  void (*nvfp4_quantize_rows_cols)(void *rows_q, float *rows_dec, uint64_t rows_seed,
                                   void *cols_q, float *cols_dec, uint64_t cols_seed,
                                   const void *x, int rows, int cols, int stochastic,
                                   int rht_signs);
  /* c [m, n] = (*dec_a * *dec_b) * a [m, k] · op(b) + beta * c, fp32 accumulation: the NVFP4
   * GEMM. a and b are nvfp4_quantize outputs (the activation dtype); b is [n, k] (b_kn 0: op
   * transposes it, as cuBLASLt's FP4 TN GEMM) or [k, n] (b_kn 1: a 16x16-tiled W used as Wᵀ);
   * c is of c_type, the activation dtype or fp32. dec_a and dec_b are backend memory. */
  void (*nvfp4_gemm)(void *c, enum dtype c_type, const void *a, const float *dec_a,
                     const void *b, const float *dec_b, int b_kn, int m, int n, int k,
                     float beta);
  /* Decoding from packed NVFP4 weights, the layout qwen3-convert h52hf --nvfp4 writes
   * (ModelOpt's); NULL where a backend has neither op (decoding then runs on nvfp4_gemm's
   * operands). nvfp4_pack writes w [rows, cols] (fp32: the masters) as codes [rows, cols/2]
   * (two E2M1 codes a byte, element 2i in the low nibble), E4M3 scales [rows, cols/16] (one per
   * 16 consecutive values of a row; NVFP4_TILES: each of a 16x16 tile's rows carries the tile's
   * scale) and *dec = S_dec, for layout NVFP4_ROWS or NVFP4_TILES: code * scale is exactly the
   * q * s_b nvfp4_quantize writes for that layout, *dec its S_dec (NaN for a non-finite w, the
   * codes and scales then not to be used). codes, scales and dec are backend memory.
   * nvfp4_gemv_packed: the packed weights of one input (q|k|v, gate|up, or one), as
   * linear_forward's: for j < count (1 to NVFP4_GEMV_MAX_MATS),
   *   outs[j] [n, out_dims[j]] (activation dtype) = (*dec_x * *dec_w[j]) * x · W_jᵀ
   * xq the NVFP4_ROWS_INT operand of x [n, in_dim] (nvfp4_int_operand_bytes(n, in_dim) bytes:
   * row t's integers at k + t * in_dim, its scales at s + t * in_dim / 16), so x's values are
   * NVFP4_ROWS's q * s_b; W_j [out_dims[j], in_dim] the code * scale values of the packed
   * weight codes[j], scales[j]; fp32 accumulation, n <= NVFP4_GEMV_MAX_ROWS: nvfp4_gemm's
   * Fprop on the NVFP4_ROWS operand of the same x (the same sums, up to their fp32 order),
   * reading each weight at 4.5 bits a value instead of 16, in one call, so a backend may stream
   * all the matrices in one launch, and x as integers, so that the products of a 16-value block
   * may be summed as integers (exact either way). */
  void (*nvfp4_pack)(uint8_t *codes, uint8_t *scales, float *dec, const float *w, int rows,
                     int cols, enum nvfp4_layout layout);
  void (*nvfp4_gemv_packed)(void *const *outs, const void *xq, const float *dec_x,
                            const uint8_t *const *codes, const uint8_t *const *scales,
                            const float *const *dec_w, const int *out_dims, int count, int n,
                            int in_dim);

  /* AdamW with decoupled weight decay (torch.optim.AdamW), step t counted from 1, on the
   * clipped gradient g = fp32(g * grad_scale) (what torch's clip_grad_norm_ leaves):
   *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
   *   p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p)
   * In the same pass p_act, when not NULL, receives the new p in the activation dtype (the
   * weight copy; NULL on a backend whose copy is the masters themselves), and amax_parts, when
   * not NULL (backend memory), the maxima nvfp4_quantize_weight reads: for each chunk
   * i < ceil(n / ADAMW_AMAX_CHUNK), amax_parts[i] = the largest bit pattern of |new p| (fp32
   * bits with the sign cleared, compared as unsigned integers: the order of the values, with
   * every NaN and Inf, 0x7f800000 and up, above all finite ones) over p[i * ADAMW_AMAX_CHUNK,
   * min((i + 1) * ADAMW_AMAX_CHUNK, n)). Each word is written once, nothing else: no clearing
   * first. g is left as it is: the next step's first backward overwrites it (see ACC_DW). */
  void (*adamw_update)(float *p, void *p_act, const float *g, float *m, float *v, size_t n,
                       const struct adamw_step *s, uint32_t *amax_parts);

  /* Overlap of the optimizer with the next step's forward; NULL where a backend runs every op
   * in order (the CPU). side_stream(1): the ops that follow run on a second stream, which
   * first waits for all the work issued so far; side_stream(0): back to the main stream. Of
   * the ops, only adamw_update, convert and sum_into may run on the side stream.
   * mark(i) records mark i (0 <= i < 4096) on the current stream; wait_mark(i) makes the
   * current stream wait for the work before the latest mark(i) (nothing, if never marked).
   * to_host, synchronize, alloc and free wait for the side stream too. */
  void (*side_stream)(int on);
  void (*mark)(int i);
  void (*wait_mark)(int i);

  /* The stream every op runs on (a cudaStream_t), for comm's NCCL transport to order its own
   * stream against; NULL where the backend has none (the CPU). */
  void *(*native_stream)(void);

  /* Recording ops to replay them (a CUDA graph: one launch instead of hundreds, which is what
   * decoding one token needs); NULL where the backend runs each op as it is called (the CPU).
   * Between capture_begin and capture_end the ops are recorded, not run, and must not copy to
   * or from the host or synchronize; the recording waits for every mark first. replay runs the
   * recorded ops on the current stream, reading whatever their buffers hold then;
   * capture_end returns the recording, replay_free frees it. */
  void (*capture_begin)(void);
  void *(*capture_end)(void);
  void (*replay)(void *recording);
  void (*replay_free)(void *recording);
};

extern const struct backend backend_cpu;
#ifdef QWEN3_HAVE_CUDA
/* kernels/cuda. QWEN3_CUDA_PRECISION picks its mode at init: bf16 (the default: bf16
 * activations and weight copy, bf16 tensor-core GEMMs and attention, fp32 accumulation), tf32
 * (fp32 storage, TF32 GEMMs) or fp32 (exact fp32, the mode the tests compare with the CPU);
 * QWEN3_CUDA_DEBUG=1 checks every launch synchronously. */
extern const struct backend backend_cuda;
#endif

#ifdef __cplusplus
}
#endif

#endif
