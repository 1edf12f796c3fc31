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

static float *param_w(struct worker *w, int layer, enum layer_param p) {
  return w->weights + w->params[w->layer_param[layer][p]].offset;
}

static float *param_g(struct worker *w, int layer, enum layer_param p) {
  return w->grads + w->params[w->layer_param[layer][p]].offset;
}

/* Tokens per sequence in this call: the plan's in training, fewer in generation. */
static int seq_now(const struct worker *w) { return w->seq_now ? w->seq_now : w->plan.seq; }

static struct attn_shape attention_shape(const struct worker *w) {
  const struct qwen3_config *c = &w->plan.cfg;
  int t = seq_now(w);
  struct attn_shape s = {
    .batch = w->plan.batch, .tq = t, .tk = t, .k_stride = t,
    .heads = c->num_heads, .kv_heads = c->num_kv_heads, .head_dim = c->head_dim,
  };
  if (w->kv) {   /* the cache holds the earlier tokens of the (one) sequence */
    s.tk = w->kv->len + t;
    s.k_stride = w->kv->max_len;
  }
  return s;
}

/* With a KV cache attached, the attention stage appends this call's keys and values to the
 * layer's cache and attends over the cache instead of the K and V slots. */
static void attach_kv_cache(struct worker *w, int layer, const float **k, const float **v,
                            int n) {
  if (!w->kv) return;
  size_t width = slot_width(&w->plan.cfg, S_K), span = (size_t)w->kv->max_len * width;
  float *ck = w->kv->data + 2 * (size_t)layer * span, *cv = ck + span;
  size_t at = (size_t)w->kv->len * width, bytes = (size_t)n * width * sizeof(float);
  w->be->copy(ck + at, *k, bytes);
  w->be->copy(cv + at, *v, bytes);
  *k = ck;
  *v = cv;
}

static double stage_clock(const struct worker *w) {
  if (!block_timing) return 0;
  w->be->synchronize();
  return now_seconds();
}

void block_forward(struct worker *w, int live, int layer) {
  const struct backend *be = w->be;
  const struct qwen3_config *c = &w->plan.cfg;
  float **a = w->slot[live * w->plan.n_layers + layer];
  const int32_t *pos = w->positions + (size_t)live * w->plan.batch * w->plan.seq;
  int n = w->plan.batch * seq_now(w);
  float eps = (float)c->rms_norm_eps;
  struct attn_shape shape = attention_shape(w);
  enum phase phase = !w->seq_now ? PHASE_FORWARD
                     : (w->kv && w->kv->len > 0) ? PHASE_DECODE : PHASE_PREFILL;

  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++) {
    const struct stage *s = &QWEN3_BLOCK[i];
    double t0 = stage_clock(w);
    switch (s->op) {
    case OP_RMSNORM:
      be->rmsnorm_forward(a[s->out[0]], a[s->in[0]], param_w(w, layer, s->params[0]), n,
                          (int)slot_width(c, s->in[0]), eps);
      break;
    case OP_LINEAR:
      for (int k = 0; k < s->n_params; k++) {
        int in = (int)slot_width(c, s->in[0]), out = (int)slot_width(c, s->out[k]);
        if (nvfp4_layer(w, layer))
          nvfp4_linear_forward(w, layer, s->params[k], a[s->out[k]], a[s->in[0]], n, in, out);
        else
          be->linear_forward(a[s->out[k]], a[s->in[0]], param_w(w, layer, s->params[k]), n, in,
                             out);
      }
      break;
    case OP_QK_NORM_ROPE:
      for (int k = 0; k < s->n_params; k++)
        be->qk_norm_rope_forward(a[s->out[k]], a[s->in[k]], param_w(w, layer, s->params[k]),
                                 pos, n, (int)(slot_width(c, s->in[k]) / c->head_dim),
                                 c->head_dim, eps, c->rope_theta);
      break;
    case OP_ATTENTION: {
      const float *k = a[s->in[1]], *v = a[s->in[2]];
      attach_kv_cache(w, layer, &k, &v, n);
      be->attention_forward(a[s->out[0]], a[s->out[1]], a[s->in[0]], k, v, &shape);
      break;
    }
    case OP_ADD: {
      size_t len = (size_t)n * slot_width(c, s->out[0]);
      be->copy(a[s->out[0]], a[s->in[0]], len * sizeof(float));
      be->add_inplace(a[s->out[0]], a[s->in[1]], len);
      break;
    }
    case OP_SWIGLU:
      be->swiglu_forward(a[s->out[0]], a[s->in[0]], a[s->in[1]],
                         (size_t)n * slot_width(c, s->out[0]));
      break;
    }
    if (block_timing) block_stage_seconds[i][phase] += stage_clock(w) - t0;
  }
}

void block_backward(struct worker *w, int live, int layer, const float *dy, float *dx) {
  const struct backend *be = w->be;
  const struct qwen3_config *c = &w->plan.cfg;
  if (w->plan.recompute) block_forward(w, live, layer);
  float **a = w->slot[live * w->plan.n_layers + layer];
  const int32_t *pos = w->positions + (size_t)live * w->plan.batch * w->plan.seq;
  int n = w->plan.batch * w->plan.seq;
  float eps = (float)c->rms_norm_eps;
  struct attn_shape shape = attention_shape(w);

  /* every backward op accumulates, so each gradient slot starts at zero */
  float *d[N_SLOTS];
  for (int s = 0; s < N_SLOTS; s++) {
    d[s] = w->dslot[s];
    if (d[s]) be->zero(d[s], (size_t)n * slot_width(c, (enum slot)s) * sizeof(float));
  }
  d[S_Y] = (float *)dy;
  d[S_X] = dx;
  be->zero(dx, (size_t)n * c->hidden_size * sizeof(float));

  for (int i = QWEN3_BLOCK_STAGES - 1; i >= 0; i--) {
    const struct stage *s = &QWEN3_BLOCK[i];
    double t0 = stage_clock(w);
    switch (s->op) {
    case OP_RMSNORM:
      be->rmsnorm_backward(d[s->in[0]], param_g(w, layer, s->params[0]), d[s->out[0]],
                           a[s->in[0]], param_w(w, layer, s->params[0]), n,
                           (int)slot_width(c, s->in[0]), eps);
      break;
    case OP_LINEAR:
      for (int k = 0; k < s->n_params; k++) {
        int in = (int)slot_width(c, s->in[0]), out = (int)slot_width(c, s->out[k]);
        if (nvfp4_layer(w, layer))
          nvfp4_linear_backward(w, live, layer, s->params[k], d[s->in[0]],
                                param_g(w, layer, s->params[k]), d[s->out[k]], a[s->in[0]], n,
                                in, out);
        else
          be->linear_backward(d[s->in[0]], param_g(w, layer, s->params[k]), d[s->out[k]],
                              a[s->in[0]], param_w(w, layer, s->params[k]), n, in, out);
      }
      break;
    case OP_QK_NORM_ROPE:
      for (int k = 0; k < s->n_params; k++)
        be->qk_norm_rope_backward(d[s->in[k]], param_g(w, layer, s->params[k]), d[s->out[k]],
                                  a[s->in[k]], param_w(w, layer, s->params[k]), pos, n,
                                  (int)(slot_width(c, s->in[k]) / c->head_dim), c->head_dim,
                                  eps, c->rope_theta);
      break;
    case OP_ATTENTION:
      be->attention_backward(d[s->in[0]], d[s->in[1]], d[s->in[2]], d[s->out[0]], a[s->in[0]],
                             a[s->in[1]], a[s->in[2]], a[s->out[0]], a[s->out[1]], &shape);
      break;
    case OP_ADD: {
      size_t len = (size_t)n * slot_width(c, s->out[0]);
      be->add_inplace(d[s->in[0]], d[s->out[0]], len);
      be->add_inplace(d[s->in[1]], d[s->out[0]], len);
      break;
    }
    case OP_SWIGLU:
      be->swiglu_backward(d[s->in[0]], d[s->in[1]], d[s->out[0]], a[s->in[0]], a[s->in[1]],
                          (size_t)n * slot_width(c, s->out[0]));
      break;
    }
    if (block_timing) block_stage_seconds[i][PHASE_BACKWARD] += stage_clock(w) - t0;
  }
}
