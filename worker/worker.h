/* The model slice of one pipeline stage: its parameters, its activations for the micro-batches
 * in flight, and forward/backward over its layers. A worker never talks to another rank: the
 * trainer moves its input, output and gradient buffers between stages. */
#ifndef QWEN3_WORKER_H
#define QWEN3_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "common/qwen3_config.h"
#include "kernels/ops.h"

/* Parameters of one decoder layer, in the order of the checkpoint's tensor names. */
enum layer_param {
  P_INPUT_NORM, P_Q, P_K, P_V, P_Q_NORM, P_K_NORM, P_O, P_POST_NORM, P_GATE, P_UP, P_DOWN,
  N_LAYER_PARAMS
};

/* One tensor of the stage, named as in Hugging Face checkpoints. */
struct param {
  char name[96];
  int rows, cols;   /* cols = 1 for vectors */
  size_t offset;    /* in floats, into weights / grads / adam_m / adam_v */
  int decay;        /* weight decay applies (matrices only) */
};

/* Named activation slots of one layer (see block.c). S_NONE marks an unused table entry. */
enum slot {
  S_NONE, S_X, S_XN, S_QR, S_KR, S_V, S_Q, S_K, S_LSE, S_CTX, S_AO, S_H, S_HN, S_G, S_U, S_M,
  S_D, S_Y, N_SLOTS
};

/* Which layers train their linear stages in NVFP4, and how (REFERENCE.md "NVFP4"). */
struct nvfp4_policy {
  int first_layer, end_layer;   /* global layers [first, end) use NVFP4; empty: none */
  int rht;                      /* random Hadamard transform of the Wgrad operands */
  int stochastic;               /* stochastic rounding of the gradient operands */
  int weight_2d;                /* 16x16 weight tiles (one quantization for Fprop and Dgrad) */
  uint64_t seed;                /* the run's RHT signs and rounding draws */
  int packed_decode;            /* a KV cache packs the matrices for decoding (eval.packed_nvfp4) */
};

/* What backward recomputes rather than keeps from the forward: every slot but each layer's
 * input (the whole layer's forward runs again), or only the cheap ones, the RMSNorm outputs and
 * the SwiGLU product (rebuilt just before the backward stage that reads them). */
enum { RECOMPUTE_LAYER = 1, RECOMPUTE_NORMS = 2, RECOMPUTE_SWIGLU = 4 };

/* The shape of everything a stage allocates, computed before allocating anything. */
struct worker_plan {
  struct qwen3_config cfg;
  int first_layer, n_layers;
  int has_embedding;   /* stage 0: token embedding */
  int has_head;        /* last stage: final norm, LM head, loss */
  int batch, seq;      /* micro-batch: batch sequences of seq tokens */
  int n_live;          /* micro-batches whose activations are held at once */
  unsigned recompute;  /* RECOMPUTE_* flags: what backward rebuilds instead of keeping */
  enum dtype act;      /* storage of activations, their gradients and the weight copy */
  size_t param_floats, decay_floats;   /* decayed parameters come first */
  size_t slot_values[N_SLOTS];         /* per layer per micro-batch, of slot_dtype */
  size_t act_bytes;                    /* all activations of all live micro-batches */
  size_t scratch_bytes;                /* backward gradients (+ recompute buffers) */
  size_t weight_copy_bytes;            /* the act-typed weight copy (0 when act is fp32) */
  struct nvfp4_policy nvfp4;
  size_t wq_bytes;     /* NVFP4 tensor scales, the quantized weights (activation dtype), then
                          AdamW's amax parts of their masters (nvfp4_linear.c) */
  size_t q_scratch_bytes;              /* quantized activations and gradients */
  size_t fp4_bytes;    /* the NVFP4 matrices packed for decoding (a KV cache's, nvfp4_linear.c) */
  /* ZeRO-1: this rank's shard [shard_begin, shard_end) of the flat parameter buffer, the one
   * whose AdamW moments it holds and updates; shard_stride is every shard's length but maybe
   * the last's (a multiple of 64 floats, 256 bytes), shards the number of shards. Without
   * sharding (worker_plan_make) one shard covers everything. */
  int shards, shard_index;
  size_t shard_stride, shard_begin, shard_end;
};

struct worker {
  const struct backend *be;
  struct worker_plan plan;
  struct param *params;
  int n_params;
  /* one allocation per parameter group, laid out by `params` */
  float *weights, *grads, *adam_m, *adam_v;   /* adam_*: plan.shard_begin..shard_end only */
  /* What the GEMMs and the embedding read: the weights in the activation dtype, made from the
   * fp32 masters once per optimizer step (worker_prepare_step); `weights` itself when the
   * activations are fp32. Norm weights are read from the masters. */
  void *weights_act;
  int weights_act_fresh;       /* the optimizer wrote the copy with the masters: no pass needed */
  int nvfp4_copies_stale;      /* ... but for the NVFP4 layers' matrices, which read their
                                  quantized operands instead (until nvfp4_paused: optim.c) */
  /* No backward has run since worker_zero_grads: the next one overwrites the gradients of the
   * layers and the final norm (ops without ACC_DW) instead of adding to them. */
  int grads_fresh;
  int zero_pending;            /* ZERO_*_GRAD: gradients still to zero before their first add */
  int (*layer_param)[N_LAYER_PARAMS];     /* [local layer][which] -> index into params */
  int *param_group;                       /* [n_params] -> weight group (WEIGHTS_*) */
  int embed_param, final_norm_param, head_param;   /* indices into params, -1 when absent */
  float *tied_head_grads;      /* the LM head's share of a tied embedding's gradient */

  /* Activations and their gradients are of dtype plan.act (slot_dtype: the log-sum-exp is
   * fp32), in backend memory. */
  char *acts;                  /* one allocation: every live micro-batch's slots */
  void *(*slot)[N_SLOTS];      /* [live * n_layers + layer][slot] */
  void **final_normed;         /* [live] input of the LM head */
  void **head_grad;            /* [live] gradient of final_normed, made with the loss */
  int32_t *tokens, *targets, *positions;   /* [live][batch*seq], backend memory */
  /* Packed sequences (several documents in one): [live][batch*seq] in backend memory, each
   * token's first visible key (attn_shape.doc_start), made from the positions, which restart at
   * 0 with every document; packed[live] says whether the micro-batch has more than one document
   * in a sequence (else attention is plain causal and doc_start unused). */
  int32_t *doc_start;
  int *packed;
  int32_t *host_doc_start;     /* batch*seq: where worker_forward builds it */
  char *scratch;               /* one allocation: gradient slots, grad_in, grad_out */
  void *dslot[N_SLOTS];
  void *grad_in;               /* gradient of the stage output (received) */
  void *grad_out;              /* gradient of the stage input (to send) */
  void *grad_tmp;              /* between layers, alternating with grad_in */
  float *nll;                  /* backend memory: per-position loss of the last micro-batch */
  /* Backend memory, read by the host once per step: sums[SUM_LOSS] is the NLL summed over the
   * step's micro-batches; sums[SUM_NORM + g] the squared gradient norm of group g (optim.c). */
  double *sums;

  /* NVFP4: weights quantized once per optimizer step (worker_prepare_step) */
  size_t *wq_offset;           /* [n_params] values into wq: W (then Wᵀ, 1x16 recipe);
                                  SIZE_MAX: high precision */
  float *q_dec;                /* the NVFP4 tensor scales (nvfp4_linear.c), then wq */
  unsigned char *wq_stale;     /* [n_layers] 1: the layer's wq predates the masters */
  /* [n_params]: where AdamW writes an NVFP4 matrix's amax parts (ops.h adamw_update; after wq
   * in q_dec's allocation), NULL for the other parameters; the array itself is NULL without
   * NVFP4 layers (nvfp4_linear.c) */
  uint32_t **amax_parts;
  int amax_parts_fresh;        /* the optimizer wrote the parts with the masters (optim.c) */
  int amax_parts_valid;        /* the parts hold the maxima of the masters the layers quantize,
                                  and the quantizer takes them (QWEN3_NVFP4_WEIGHT_AMAX_PASS) */
  void *wq;
  void *q_scratch;
  uint16_t rht_signs;
  int nvfp4_paused;            /* 1: every linear runs in high precision now, NVFP4 layers too
                                  (precision.bf16_final_fraction); their buffers stay */
  int step;
  uint64_t *stream;            /* [live]: the micro-batch's random stream */

  /* inference (worker_infer): this call's tokens, and the KV cache in use with the sequence
   * they belong to (INFER_EACH: one token of each of its sequences) */
  int seq_now;                 /* 0: plan.seq (training) */
  struct kv_cache *kv;
  int kv_seq;
  float *logits;               /* [vocab] fp32, last stage, then the GEMM's act-typed output */
  int32_t *greedy;             /* last stage: argmax_rows' token of logits (backend memory) */
};

enum { SUM_LOSS, SUM_NORM };

/* The keys and values of n_seq sequences for every layer of a stage, in backend memory:
 * [layer][K, V][sequence][max_len][kv_heads * head_dim]. A token's row is its position;
 * sequence s holds len[s] tokens. */
struct kv_cache {
  void *data;                  /* of dtype plan.act */
  int max_len, n_seq;
  int *len;                    /* [n_seq], host */
  float *logits;               /* last stage: [n_seq][vocab] fp32, then the GEMM's act-typed
                                * output (backend memory): a decoding step's logits */
  int32_t *greedy;             /* last stage: [n_seq] argmax_rows' token of each sequence's
                                * logits (backend memory) */
  void *decode_step;           /* the recorded ops of a decoding step (backend capture_begin) */
  int decode_greedy;           /* 1: decode_step ends with argmax_rows into greedy */
  /* The stage's NVFP4 matrices packed (ops.h nvfp4_pack) from the masters as they were when
   * the cache was made, which its decoding steps of at most NVFP4_PACKED_DECODE_ROWS tokens
   * read; NULL without NVFP4 layers, for more sequences, or where the backend has no packed
   * ops. */
  void *fp4;
};

/* worker_infer's seq for a decoding step: one new token of each sequence of the cache */
#define INFER_EACH (-1)

/* Computes sizes and offsets; no allocation. Dies on shapes it cannot hold. */
void worker_plan_make(struct worker_plan *p, const struct qwen3_config *cfg, int first_layer,
                      int n_layers, int has_embedding, int has_head, int batch, int seq,
                      int n_live, unsigned recompute, enum dtype act);
/* ZeRO-1: shard the AdamW state over `shards` data-parallel replicas; this is replica `index`.
 * The buffer splits into shards of ceil(blocks / shards) blocks of 64 floats, the last maybe
 * shorter (or empty). */
void worker_plan_shard(struct worker_plan *p, int shards, int index);
/* Makes global layers [first, end) of the plan train their linears in NVFP4. */
void worker_plan_nvfp4(struct worker_plan *p, const struct nvfp4_policy *policy);
/* Bytes of parameters + gradients + AdamW state (this rank's shard of it), and of activations
 * + scratch. */
size_t worker_plan_state_bytes(const struct worker_plan *p);
size_t worker_plan_activation_bytes(const struct worker_plan *p);

void worker_init(struct worker *w, const struct backend *be, const struct worker_plan *p);
/* Re-plans the activations for micro-batches of batch x seq with n_live in flight (generation
 * and evaluation use other shapes than training); parameters stay. */
void worker_reshape(struct worker *w, int batch, int seq, int n_live);
void worker_free(struct worker *w);
/* Seeded init: every tensor drawn from its own stream, keyed by its name, so that any pipeline
 * layout gives identical weights. Norm weights start at 1. */
void worker_init_weights(struct worker *w, uint64_t seed, float std);
/* Loads every parameter of the stage from a Hugging Face model directory (model.safetensors or
 * an index with shards), checking each shape. Returns 0, or -1 with err naming the tensor. */
int worker_load_hf(struct worker *w, const char *dir, char *err, size_t errlen);

/* Host-side inputs of one micro-batch: batch*seq entries each. targets[i] < 0: no loss. */
struct micro_batch {
  const int32_t *tokens, *targets, *positions;
  uint64_t stream;   /* distinct per micro-batch of a step: keys its stochastic rounding */
};

/* Where the stage input lives for live micro-batch slot `live` (RECV_ACT writes here on stages
 * without the embedding) and where its output is (SEND_ACT reads it). */
void *worker_input(struct worker *w, int live);
void *worker_output(struct worker *w, int live);
/* Bytes of one micro-batch's stage input or output (and of their gradients): batch x seq x
 * hidden values of dtype plan.act. */
size_t worker_boundary_bytes(const struct worker *w);
/* Weight groups, in the order a forward reads them: WEIGHTS_EMBED (the token embedding, also
 * the tied LM head), WEIGHTS_LAYER + l for local layer l, then the final norm and an untied
 * LM head. The optimizer updates and marks them in this order (backend mark/wait_mark with the
 * group as the mark), and a forward waits for a group's mark before it reads the group. */
enum { WEIGHTS_EMBED, WEIGHTS_LAYER };
int worker_weight_groups(const struct worker *w);
int worker_weight_group(const struct worker *w, int param);

/* Parameter i in the weight copy (weights_act), as the GEMMs and the embedding read it. */
const void *worker_weight_act(const struct worker *w, int i);

/* Forward of one micro-batch through the stage. On the last stage it also computes the loss
 * and, when training (grad_scale > 0), its gradient scaled by grad_scale and the NLL of the
 * micro-batch's targets added into sums[SUM_LOSS], on the device (an evaluation between steps
 * leaves the step's loss alone). nll, when not NULL, receives the batch*seq per-position values
 * (a host copy: this waits for the forward). */
void worker_forward(struct worker *w, int live, const struct micro_batch *mb, float grad_scale,
                    float *nll);
/* The NLL summed since the last call (last stage; 0 elsewhere), read from the device. */
double worker_take_loss(struct worker *w);
/* Called by worker_backward after each layer's backward (local index, the last layer first),
 * once that layer's weight gradients hold this micro-batch's share. */
struct layer_hook {
  void (*done)(void *ctx, int layer);
  void *ctx;
};
/* Backward of one micro-batch: from w->grad_in (received) or, on the last stage, from the loss.
 * Accumulates parameter gradients (the step's first backward writes them); leaves the input
 * gradient in w->grad_out. hook may be NULL. */
void worker_backward(struct worker *w, int live, const struct layer_hook *hook);

/* Starts a step's gradients: the first backward overwrites those of the layers and the final
 * norm, and the ones ops only add to (the embedding's rows, summed by scatter-adds, and the LM
 * head's, by lm_head_loss) are zeroed before their first add; so no pass over every gradient
 * (4 bytes a parameter) is spent on zeroing them. Zeroes the step's squared-norm sums. */
enum { ZERO_EMBED_GRAD = 1, ZERO_HEAD_GRAD = 2 };
void worker_zero_grads(struct worker *w);
/* After the micro-batches of a step: adds the LM head's share of a tied embedding's gradient. */
void worker_gather_tied_grads(struct worker *w);

/* Bytes of the NVFP4 matrices a KV cache of n_seq sequences packs for decoding on backend be:
 * the plan's, when be decodes from packed weights and n_seq <= NVFP4_PACKED_DECODE_ROWS (the
 * decoding steps that read them); else 0. */
size_t kv_packed_bytes(const struct worker_plan *p, int n_seq, const struct backend *be);
/* Backend bytes kv_cache_init takes on be: the keys and values of n_seq sequences of max_len
 * tokens in the plan's layers, on the last stage a decoding step's logits and greedy tokens, and
 * kv_packed_bytes (for --dry-run). */
size_t kv_cache_bytes(const struct worker_plan *p, int max_len, int n_seq,
                      const struct backend *be);
void kv_cache_init(struct kv_cache *kv, const struct worker *w, int max_len, int n_seq);
void kv_cache_free(struct kv_cache *kv, const struct worker *w);
/* Inference through the stage (live slot 0, after worker_reshape(w, 1, T, 1) with T at least
 * the longest sequence and the number of sequences decoded together) of n new tokens at
 * positions[0..n): with seq >= 0, tokens of sequence seq of the KV cache (a prompt; without a
 * cache, seq 0 and the n tokens are the whole sequence); with seq = INFER_EACH, one token of
 * each of the cache's n = kv->n_seq sequences (a decoding step). Attention sees the cached
 * tokens too, and the new keys and values are appended. The first stage embeds tokens; the
 * others read worker_input(w, 0). The last stage writes to the host array `logits` the logits
 * of the sequence's last token, or of each token ([n][vocab]) for INFER_EACH; or, when ids is
 * not NULL (greedy decoding), the backend picks the token of each of those rows (ops.h
 * argmax_rows) and only the ids come back, to ids ([1], or [n] for INFER_EACH), and logits is
 * not written. A cache's decoding steps all pick their tokens or none does (the recorded step
 * ends with the pick or not). */
void worker_infer(struct worker *w, const int32_t *tokens, const int32_t *positions, int n,
                  struct kv_cache *kv, int seq, float *logits, int32_t *ids);
/* Before the micro-batches of optimizer step `step`, and before any forward after the weights
 * changed (loading, evaluation): makes the act-typed weight copy and quantizes the NVFP4
 * weights. */
void worker_prepare_step(struct worker *w, int step);

#endif
