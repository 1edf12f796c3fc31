#include "worker/block.h"

#include "common/util.h"
#include "worker/nvfp4_linear.h"

/* The Qwen3 decoder block (REFERENCE.md "Forward"). q/k-norm + RoPE writes new slots (Q, K)
 * rather than overwriting QR, KR in place: its backward needs the values before the norm. */
const struct stage QWEN3_BLOCK[] = {
  /* name            op                 in                  out                 params */
  { "input_norm",    OP_RMSNORM,        {S_X},              {S_XN},             {P_INPUT_NORM}, 1 },
  { "qkv_proj",      OP_LINEAR,         {S_XN},             {S_QR, S_KR, S_V},  {P_Q, P_K, P_V}, 3 },
  { "qk_norm_rope",  OP_QK_NORM_ROPE,   {S_QR, S_KR},       {S_Q, S_K},         {P_Q_NORM, P_K_NORM}, 2 },
  { "attention",     OP_ATTENTION,      {S_Q, S_K, S_V},    {S_CTX, S_LSE},     {0}, 0 },
  { "o_proj",        OP_LINEAR,         {S_CTX},            {S_AO},             {P_O}, 1 },
  { "attn_residual", OP_ADD,            {S_X, S_AO},        {S_H},              {0}, 0 },
  { "post_norm",     OP_RMSNORM,        {S_H},              {S_HN},             {P_POST_NORM}, 1 },
  { "gate_up",       OP_LINEAR,         {S_HN},             {S_G, S_U},         {P_GATE, P_UP}, 2 },
  { "mlp_merge",     OP_SWIGLU,         {S_G, S_U},         {S_M},              {0}, 0 },
  { "down_proj",     OP_LINEAR,         {S_M},              {S_D},              {P_DOWN}, 1 },
  { "mlp_residual",  OP_ADD,            {S_H, S_D},         {S_Y},              {0}, 0 },
};
const int QWEN3_BLOCK_STAGES = sizeof QWEN3_BLOCK / sizeof QWEN3_BLOCK[0];

int block_timing;
double block_stage_seconds[sizeof QWEN3_BLOCK / sizeof QWEN3_BLOCK[0]][N_PHASES];

size_t slot_width(const struct qwen3_config *c, enum slot s) {
  switch (s) {
  case S_X: case S_XN: case S_AO: case S_H: case S_HN: case S_D: case S_Y:
    return (size_t)c->hidden_size;
  case S_QR: case S_Q: case S_CTX:
    return (size_t)c->num_heads * c->head_dim;
  case S_KR: case S_K: case S_V:
    return (size_t)c->num_kv_heads * c->head_dim;
  case S_LSE:
    return (size_t)c->num_heads;
  case S_G: case S_U: case S_M:
    return (size_t)c->intermediate_size;
  default:
    return 0;
  }
}

enum dtype slot_dtype(const struct worker_plan *p, enum slot s) {
  return s == S_LSE ? DT_F32 : p->act;
}

int slot_needed_by_backward(enum slot s) {
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++) {
    const struct stage *st = &QWEN3_BLOCK[i];
    switch (st->op) {
    case OP_RMSNORM: case OP_LINEAR:            /* dW and dx need the input */
      if (st->in[0] == s) return 1;
      break;
    case OP_QK_NORM_ROPE: case OP_SWIGLU:       /* both inputs */
      if (st->in[0] == s || st->in[1] == s) return 1;
      break;
    case OP_ATTENTION:                          /* q, k, v, and ctx with its log-sum-exp */
      for (int k = 0; k < 3; k++)
        if (st->in[k] == s) return 1;
      if (st->out[0] == s || st->out[1] == s) return 1;
      break;
    case OP_ADD:                                /* its backward copies the gradient */
      break;
    }
  }
  return 0;
}

/* a norm weight: fp32 master */
static float *param_w(struct worker *w, int layer, enum layer_param p) {
  return w->weights + w->params[w->layer_param[layer][p]].offset;
}

/* a linear weight: the act-typed copy */
static const void *param_wa(struct worker *w, int layer, enum layer_param p) {
  return worker_weight_act(w, w->layer_param[layer][p]);
}

static float *param_g(struct worker *w, int layer, enum layer_param p) {
  return w->grads + w->params[w->layer_param[layer][p]].offset;
}

/* Tokens per sequence in this call: the plan's in training, fewer in generation. */
static int seq_now(const struct worker *w) { return w->seq_now ? w->seq_now : w->plan.seq; }

static struct attn_shape attention_shape(const struct worker *w, int live) {
  const struct qwen3_config *c = &w->plan.cfg;
  int t = seq_now(w);
  struct attn_shape s = {
    .batch = w->plan.batch, .tq = t, .tk = t, .k_stride = t,
    .heads = c->num_heads, .kv_heads = c->num_kv_heads, .head_dim = c->head_dim,
    .doc_start = w->packed[live] ? w->doc_start + (size_t)live * w->plan.batch * w->plan.seq
                                 : NULL,
  };
  if (!w->kv) return s;
  s.k_stride = w->kv->max_len;
  if (w->kv_seq != INFER_EACH && t > 1) {   /* a prompt: the sequence's cached tokens too */
    s.tk = w->kv->len[w->kv_seq] + t;
  } else {   /* one query per sequence: the whole cache, read up to each token's position */
    s.batch = w->kv_seq == INFER_EACH ? t : 1;
    s.tq = 1;
    s.tk = w->kv->max_len;
    s.key_last = w->positions + (size_t)live * w->plan.batch * w->plan.seq;
  }
  return s;
}

/* With a KV cache attached, the attention stage writes this call's keys and values into the
 * layer's cache at their positions (the cache's row of a token is its position, in its
 * sequence's rows) and attends over the cache instead of the K and V slots. Nothing here reads
 * the cache's lengths on the host when decoding, so the same ops serve every step
 * (worker_infer records them). */
static void attach_kv_cache(struct worker *w, int layer, const void **k, const void **v,
                            const int32_t *positions, int n) {
  if (!w->kv) return;
  int width = (int)slot_width(&w->plan.cfg, S_K), each = w->kv_seq == INFER_EACH;
  size_t seq_span = (size_t)w->kv->max_len * width * dtype_bytes(w->plan.act);
  size_t span = (size_t)w->kv->n_seq * seq_span;   /* K (or V) of every sequence */
  char *ck = (char *)w->kv->data + 2 * (size_t)layer * span, *cv = ck + span;
  if (!each) {
    ck += (size_t)w->kv_seq * seq_span;
    cv += (size_t)w->kv_seq * seq_span;
  }
  w->be->kv_append(ck, cv, *k, *v, positions, n, width, each ? w->kv->max_len : 0);
  *k = ck;
  *v = cv;
}

static double stage_clock(const struct worker *w) {
  if (!block_timing) return 0;
  w->be->synchronize();
  return now_seconds();
}

/* The forward of stage i of local layer `layer` over n tokens, reading and writing slots a. */
static void stage_forward(struct worker *w, int i, void **a, int live, int layer, int n) {
  const struct backend *be = w->be;
  const struct qwen3_config *c = &w->plan.cfg;
  const struct stage *s = &QWEN3_BLOCK[i];
  const int32_t *pos = w->positions + (size_t)live * w->plan.batch * w->plan.seq;
  float eps = (float)c->rms_norm_eps;
  switch (s->op) {
  case OP_RMSNORM:
    be->rmsnorm_forward(a[s->out[0]], a[s->in[0]], param_w(w, layer, s->params[0]), n,
                        (int)slot_width(c, s->in[0]), eps);
    break;
  case OP_LINEAR: {
    int in = (int)slot_width(c, s->in[0]), outs[3];
    void *y[3];
    const void *wa[3];
    for (int k = 0; k < s->n_params; k++) {
      y[k] = a[s->out[k]];
      wa[k] = param_wa(w, layer, s->params[k]);
      outs[k] = (int)slot_width(c, s->out[k]);
    }
    /* the stage's layers in one call (one input) */
    if (nvfp4_layer(w, layer))
      nvfp4_linear_forward(w, layer, s->params, y, outs, s->n_params, a[s->in[0]], n, in);
    else
      be->linear_forward(y, a[s->in[0]], wa, outs, s->n_params, n, in);
    break;
  }
  case OP_QK_NORM_ROPE: {
    void *y[2];
    const void *x[2];
    const float *nw[2];
    int heads[2];
    for (int k = 0; k < s->n_params; k++) {
      y[k] = a[s->out[k]];
      x[k] = a[s->in[k]];
      nw[k] = param_w(w, layer, s->params[k]);
      heads[k] = (int)(slot_width(c, s->in[k]) / c->head_dim);
    }
    /* q and k in one call (one launch on the GPU) */
    be->qk_norm_rope_forward(y, x, nw, heads, s->n_params, pos, n, c->head_dim, eps,
                             c->rope_theta);
    break;
  }
  case OP_ATTENTION: {
    struct attn_shape shape = attention_shape(w, live);
    const void *k = a[s->in[1]], *v = a[s->in[2]];
    attach_kv_cache(w, layer, &k, &v, pos, n);
    be->attention_forward(a[s->out[0]], a[s->out[1]], a[s->in[0]], k, v, &shape);
    break;
  }
  case OP_ADD: {
    be->add(a[s->out[0]], a[s->in[0]], a[s->in[1]], (size_t)n * slot_width(c, s->out[0]),
            w->plan.act);
    break;
  }
  case OP_SWIGLU:
    be->swiglu_forward(a[s->out[0]], a[s->in[0]], a[s->in[1]],
                       (size_t)n * slot_width(c, s->out[0]));
    break;
  }
}

void block_forward(struct worker *w, int live, int layer) {
  void **a = w->slot[live * w->plan.n_layers + layer];
  int n = w->plan.batch * seq_now(w);
  enum phase phase = !w->seq_now ? PHASE_FORWARD
                     : (w->kv && w->kv_seq == INFER_EACH) ? PHASE_DECODE : PHASE_PREFILL;
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++) {
    double t0 = stage_clock(w);
    stage_forward(w, i, a, live, layer, n);
    if (block_timing) block_stage_seconds[i][phase] += stage_clock(w) - t0;
  }
}

/* The stages whose backward writes the gradient of slot s: those that read s. */
static int slot_readers(enum slot s) {
  int n = 0;
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++)
    for (int k = 0; k < 3; k++) n += QWEN3_BLOCK[i].in[k] == s;
  return n;
}

/* The stage whose forward writes slot s; -1 for the layer's input. */
static int producer(enum slot s) {
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++)
    for (int k = 0; k < 3; k++)
      if (QWEN3_BLOCK[i].out[k] == s) return i;
  return -1;
}

int slot_recomputed(const struct worker_plan *p, enum slot s) {
  int i = producer(s);
  if (i < 0 || (p->recompute & RECOMPUTE_LAYER)) return 0;
  return (QWEN3_BLOCK[i].op == OP_RMSNORM && (p->recompute & RECOMPUTE_NORMS)) ||
         (QWEN3_BLOCK[i].op == OP_SWIGLU && (p->recompute & RECOMPUTE_SWIGLU));
}

void block_backward(struct worker *w, int live, int layer, const void *dy, void *dx) {
  const struct backend *be = w->be;
  const struct qwen3_config *c = &w->plan.cfg;
  if (w->plan.recompute & RECOMPUTE_LAYER) block_forward(w, live, layer);
  void **a = w->slot[live * w->plan.n_layers + layer];
  const int32_t *pos = w->positions + (size_t)live * w->plan.batch * w->plan.seq;
  int n = w->plan.batch * w->plan.seq;
  float eps = (float)c->rms_norm_eps;
  struct attn_shape shape = attention_shape(w, live);

  /* No gradient slot is zeroed: the first stage (in reverse order) that writes d[s] overwrites
   * it, the later ones add (ACC_DX once written[s]). The weights' gradients are overwritten by
   * the step's first backward (ACC_DW after it). */
  size_t act = dtype_bytes(w->plan.act);
  void *d[N_SLOTS];
  int written[N_SLOTS] = {0};
  for (int s = 0; s < N_SLOTS; s++) d[s] = w->dslot[s];
  d[S_Y] = (void *)dy;
  d[S_X] = dx;
  written[S_Y] = 1;
  const int dw_acc = w->grads_fresh ? 0 : ACC_DW;

  for (int i = QWEN3_BLOCK_STAGES - 1; i >= 0; i--) {
    const struct stage *s = &QWEN3_BLOCK[i];
    double t0 = stage_clock(w);
    /* an input this backward reads that was not kept is rebuilt from the kept slots first */
    for (int k = 0; k < 3; k++)
      if (s->in[k] != S_NONE && slot_recomputed(&w->plan, s->in[k]))
        stage_forward(w, producer(s->in[k]), a, live, layer, n);
    int acc[3];   /* each input's: add to its gradient once something wrote it */
    for (int k = 0; k < 3; k++)
      acc[k] = (s->in[k] != S_NONE && written[s->in[k]] ? ACC_DX : 0) | dw_acc;
    switch (s->op) {
    case OP_RMSNORM:
      be->rmsnorm_backward(d[s->in[0]], param_g(w, layer, s->params[0]), d[s->out[0]],
                           a[s->in[0]], param_w(w, layer, s->params[0]), n,
                           (int)slot_width(c, s->in[0]), eps, acc[0]);
      break;
    case OP_LINEAR:
      for (int k = 0; k < s->n_params; k++) {
        int in = (int)slot_width(c, s->in[0]), out = (int)slot_width(c, s->out[k]);
        if (nvfp4_layer(w, layer))
          nvfp4_linear_backward(w, live, layer, s->params[k], s->params[0], d[s->in[0]],
                                param_g(w, layer, s->params[k]), d[s->out[k]], a[s->in[0]], n,
                                in, out, acc[0]);
        else
          be->linear_backward(d[s->in[0]], param_g(w, layer, s->params[k]), d[s->out[k]],
                              a[s->in[0]], param_wa(w, layer, s->params[k]), n, in, out,
                              acc[0]);
        acc[0] |= ACC_DX;   /* the stage's next layer adds to the input's gradient */
      }
      break;
    case OP_QK_NORM_ROPE:
      for (int k = 0; k < s->n_params; k++)
        be->qk_norm_rope_backward(d[s->in[k]], param_g(w, layer, s->params[k]), d[s->out[k]],
                                  a[s->in[k]], param_w(w, layer, s->params[k]), pos, n,
                                  (int)(slot_width(c, s->in[k]) / c->head_dim), c->head_dim,
                                  eps, c->rope_theta, acc[k]);
      break;
    case OP_ATTENTION:   /* q, k and v are first written together or not at all */
      be->attention_backward(d[s->in[0]], d[s->in[1]], d[s->in[2]], d[s->out[0]], a[s->in[0]],
                             a[s->in[1]], a[s->in[2]], a[s->out[0]], a[s->out[1]], &shape,
                             acc[0]);
      break;
    case OP_ADD:   /* the output's gradient flows unchanged to both inputs */
      for (int k = 0; k < 2; k++) {
        enum slot in = s->in[k];
        size_t bytes = (size_t)n * slot_width(c, in) * act;
        if (written[in])
          be->add(d[in], d[in], d[s->out[0]], bytes / act, w->plan.act);
        else if (slot_readers(in) == 1)   /* nothing else writes it: read the output's in place */
          d[in] = d[s->out[0]];
        else   /* a later stage adds to it: a copy of its own */
          be->copy(d[in], d[s->out[0]], bytes);
      }
      break;
    case OP_SWIGLU:
      be->swiglu_backward(d[s->in[0]], d[s->in[1]], d[s->out[0]], a[s->in[0]], a[s->in[1]],
                          (size_t)n * slot_width(c, s->out[0]), acc[0]);
      break;
    }
    for (int k = 0; k < 3; k++)
      if (s->in[k] != S_NONE) written[s->in[k]] = 1;
    if (block_timing) block_stage_seconds[i][PHASE_BACKWARD] += stage_clock(w) - t0;
  }
}
