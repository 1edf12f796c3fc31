#include "worker/worker.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/block.h"
#include "worker/nvfp4_linear.h"

/* ---- the parameter table ------------------------------------------------------------------ */

static const struct {
  const char *suffix;
  int is_matrix;
} LAYER_PARAM_NAMES[N_LAYER_PARAMS] = {
  [P_INPUT_NORM] = {"input_layernorm.weight", 0},
  [P_Q] = {"self_attn.q_proj.weight", 1},
  [P_K] = {"self_attn.k_proj.weight", 1},
  [P_V] = {"self_attn.v_proj.weight", 1},
  [P_Q_NORM] = {"self_attn.q_norm.weight", 0},
  [P_K_NORM] = {"self_attn.k_norm.weight", 0},
  [P_O] = {"self_attn.o_proj.weight", 1},
  [P_POST_NORM] = {"post_attention_layernorm.weight", 0},
  [P_GATE] = {"mlp.gate_proj.weight", 1},
  [P_UP] = {"mlp.up_proj.weight", 1},
  [P_DOWN] = {"mlp.down_proj.weight", 1},
};

/* [rows, cols] of a layer parameter, nn.Linear layout */
static void layer_param_shape(const struct qwen3_config *c, enum layer_param p, int *rows,
                              int *cols) {
  int d = c->hidden_size, q = c->num_heads * c->head_dim, kv = c->num_kv_heads * c->head_dim;
  int f = c->intermediate_size;
  switch (p) {
  case P_INPUT_NORM: case P_POST_NORM: *rows = d; *cols = 1; break;
  case P_Q_NORM: case P_K_NORM: *rows = c->head_dim; *cols = 1; break;
  case P_Q: *rows = q; *cols = d; break;
  case P_K: case P_V: *rows = kv; *cols = d; break;
  case P_O: *rows = d; *cols = q; break;
  case P_GATE: case P_UP: *rows = f; *cols = d; break;
  case P_DOWN: *rows = d; *cols = f; break;
  default: *rows = *cols = 0;
  }
}

static int add_param(struct param *table, int n, size_t *floats, const char *name, int rows,
                     int cols, int decay) {
  if (table) {
    struct param *p = &table[n];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->rows = rows;
    p->cols = cols;
    p->offset = *floats;
    p->decay = decay;
  }
  *floats += (size_t)rows * cols;
  return n + 1;
}

/* Lays out the stage's tensors: matrices (decayed) first, then vectors, so AdamW runs over two
 * contiguous ranges. With table == NULL only counts. Fills layer_param / the special indices
 * when given. Returns the number of tensors. */
static int param_table(const struct worker_plan *p, struct param *table,
                       int (*layer_param)[N_LAYER_PARAMS], int *embed, int *norm, int *head,
                       size_t *floats, size_t *decay_floats) {
  const struct qwen3_config *c = &p->cfg;
  char name[96];
  int n = 0, e = -1, h = -1, fn = -1;
  *floats = 0;
  for (int pass = 1; pass >= 0; pass--) {   /* pass 1: matrices, pass 0: vectors */
    if (pass == 1 && (p->has_embedding || (p->has_head && c->tie_embeddings))) {
      e = n;
      n = add_param(table, n, floats, "model.embed_tokens.weight", c->vocab_size, c->hidden_size, 1);
    }
    if (pass == 1 && p->has_head && !c->tie_embeddings) {
      h = n;
      n = add_param(table, n, floats, "lm_head.weight", c->vocab_size, c->hidden_size, 1);
    }
    for (int l = 0; l < p->n_layers; l++)
      for (int k = 0; k < N_LAYER_PARAMS; k++) {
        if (LAYER_PARAM_NAMES[k].is_matrix != pass) continue;
        int rows, cols;
        layer_param_shape(c, (enum layer_param)k, &rows, &cols);
        snprintf(name, sizeof name, "model.layers.%d.%s", p->first_layer + l,
                 LAYER_PARAM_NAMES[k].suffix);
        if (layer_param) layer_param[l][k] = n;
        n = add_param(table, n, floats, name, rows, cols, pass);
      }
    if (pass == 1) *decay_floats = *floats;
    if (pass == 0 && p->has_head) {
      fn = n;
      n = add_param(table, n, floats, "model.norm.weight", c->hidden_size, 1, 0);
    }
  }
  if (embed) *embed = e;
  if (head) *head = (p->has_head && c->tie_embeddings) ? e : h;
  if (norm) *norm = fn;
  return n;
}

/* ---- the plan ------------------------------------------------------------------------------ */

static size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

/* Bytes of one slot for one layer and micro-batch, rounded up to 256 so that every slot of the
 * shared allocations starts aligned for vector loads and the GEMMs. */
static size_t slot_bytes(const struct worker_plan *p, enum slot s) {
  return round_up(p->slot_values[s] * dtype_bytes(slot_dtype(p, s)), 256);
}

/* Slots kept per layer and live micro-batch from forward to backward: the layer's input, and
 * what backward reads unless it is recomputed. The others share one transient buffer. */
static int slot_stored(const struct worker_plan *p, enum slot s) {
  return s == S_X || (!(p->recompute & RECOMPUTE_LAYER) && slot_needed_by_backward(s) &&
                      !slot_recomputed(p, s));
}

void worker_plan_make(struct worker_plan *p, const struct qwen3_config *cfg, int first_layer,
                      int n_layers, int has_embedding, int has_head, int batch, int seq,
                      int n_live, unsigned recompute, enum dtype act) {
  memset(p, 0, sizeof *p);
  p->cfg = *cfg;
  p->first_layer = first_layer;
  p->n_layers = n_layers;
  p->has_embedding = has_embedding;
  p->has_head = has_head;
  p->batch = batch;
  p->seq = seq;
  p->n_live = n_live;
  p->recompute = recompute;
  p->act = act;
  if ((double)batch * seq * (cfg->intermediate_size > cfg->num_heads * cfg->head_dim
                                 ? cfg->intermediate_size : cfg->num_heads * cfg->head_dim) >
      (double)INT32_MAX)
    die("a micro-batch of %d x %d tokens is too large for one activation buffer", batch, seq);
  param_table(p, NULL, NULL, NULL, NULL, NULL, &p->param_floats, &p->decay_floats);
  worker_plan_shard(p, 1, 0);

  size_t stored = 0, transient = 0;
  for (int s = S_X; s < N_SLOTS; s++) {
    p->slot_values[s] = (size_t)batch * seq * slot_width(cfg, (enum slot)s);
    if (s == S_Y) continue;   /* a layer's output is the next layer's input */
    if (slot_stored(p, (enum slot)s)) stored += slot_bytes(p, (enum slot)s);
    else transient += slot_bytes(p, (enum slot)s);
  }
  size_t boundary = slot_bytes(p, S_X);   /* the stage output, the LM head's input, ... */
  size_t per_live = n_layers * stored + boundary + (has_head ? 2 * boundary : 0);
  p->act_bytes = n_live * per_live + transient;
  size_t grads = 0;
  for (int s = S_X; s < N_SLOTS; s++)
    if (s != S_X && s != S_Y && s != S_LSE) grads += slot_bytes(p, (enum slot)s);
  p->scratch_bytes = grads + 3 * boundary;
  p->weight_copy_bytes = act == DT_F32 ? 0 : round_up(p->param_floats * dtype_bytes(act), 256);
}

#define SHARD_ALIGN 64   /* floats: 256 bytes */

void worker_plan_shard(struct worker_plan *p, int shards, int index) {
  if (shards < 1 || index < 0 || index >= shards)
    die("internal: shard %d of %d", index, shards);
  size_t blocks = (p->param_floats + SHARD_ALIGN - 1) / SHARD_ALIGN;
  size_t stride = (blocks + shards - 1) / shards * SHARD_ALIGN;
  size_t b = (size_t)index * stride, e = b + stride;
  p->shards = shards;
  p->shard_index = index;
  p->shard_stride = shards == 1 ? p->param_floats : stride;
  p->shard_begin = b < p->param_floats ? b : p->param_floats;
  p->shard_end = e < p->param_floats ? e : p->param_floats;
  if (shards == 1) p->shard_begin = 0, p->shard_end = p->param_floats;
}

void worker_plan_nvfp4(struct worker_plan *p, const struct nvfp4_policy *policy) {
  p->nvfp4 = *policy;
  size_t values = 0, parts = 0, packed = 0;
  for (int l = 0; l < p->n_layers; l++) {
    int g = p->first_layer + l;
    if (g < policy->first_layer || g >= policy->end_layer) continue;
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      int rows, cols;
      layer_param_shape(&p->cfg, (enum layer_param)k, &rows, &cols);
      if (!LAYER_PARAM_NAMES[k].is_matrix) continue;
      values += (size_t)rows * cols;
      parts += nvfp4_amax_part_count(rows, cols);
      if (policy->packed_decode) packed += nvfp4_packed_matrix_bytes(rows, cols);
    }
  }
  nvfp4_plan_sizes(p, values, parts, packed);
}

size_t worker_plan_state_bytes(const struct worker_plan *p) {
  /* one stage with a tied embedding collects the head's gradient apart (worker_init) */
  size_t tied = p->has_embedding && p->has_head && p->cfg.tie_embeddings
                    ? (size_t)p->cfg.vocab_size * p->cfg.hidden_size : 0;
  size_t shard = p->shard_end - p->shard_begin;
  return (2 * p->param_floats + 2 * shard + tied) * sizeof(float) + p->wq_bytes +
         p->weight_copy_bytes;
}

size_t worker_plan_activation_bytes(const struct worker_plan *p) {
  return p->act_bytes + p->scratch_bytes + p->q_scratch_bytes +
         3 * (size_t)p->n_live * p->batch * p->seq * sizeof(int32_t);
}

/* ---- allocation ---------------------------------------------------------------------------- */

static void *must_alloc(const struct backend *be, size_t bytes, const char *what) {
  void *p = be->alloc(bytes);
  if (!p) die("out of %s memory: %s needs %.1f MiB", be->name, what, bytes / 1048576.0);
  return p;
}

/* Activations: per live micro-batch, per layer, the stored slots; then the stage output, the
 * LM head's input and gradient; transient (recomputed) slots shared at the end. */
static void alloc_activations(struct worker *w) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  size_t tokens = (size_t)p->batch * p->seq, boundary = slot_bytes(p, S_X);
  w->acts = must_alloc(be, p->act_bytes, "activations");
  w->slot = xcalloc((size_t)p->n_live * (p->n_layers ? p->n_layers : 1), sizeof *w->slot);
  w->final_normed = xcalloc((size_t)p->n_live, sizeof(void *));
  w->head_grad = xcalloc((size_t)p->n_live, sizeof(void *));
  char *cursor = w->acts;
  char *transient = w->acts + p->act_bytes;
  for (int s = S_X; s < N_SLOTS; s++)
    if (s != S_Y && !slot_stored(p, (enum slot)s)) transient -= slot_bytes(p, (enum slot)s);
  for (int live = 0; live < p->n_live; live++) {
    for (int l = 0; l < p->n_layers; l++) {
      void **a = w->slot[live * p->n_layers + l];
      char *t = transient;
      for (int s = S_X; s < N_SLOTS; s++) {
        if (s == S_Y) continue;
        if (slot_stored(p, (enum slot)s)) {
          a[s] = cursor;
          cursor += slot_bytes(p, (enum slot)s);
        } else {
          a[s] = t;
          t += slot_bytes(p, (enum slot)s);
        }
      }
    }
    char *out = cursor;
    cursor += boundary;
    for (int l = 0; l < p->n_layers; l++)
      w->slot[live * p->n_layers + l][S_Y] =
          l + 1 < p->n_layers ? w->slot[live * p->n_layers + l + 1][S_X] : out;
    if (p->n_layers == 0) die("a pipeline stage needs at least one layer");
    if (p->has_head) {
      w->final_normed[live] = cursor;
      cursor += boundary;
      w->head_grad[live] = cursor;
      cursor += boundary;
    }
  }
  size_t ibytes = (size_t)p->n_live * tokens * sizeof(int32_t);
  w->tokens = must_alloc(be, ibytes, "token ids");
  w->targets = must_alloc(be, ibytes, "targets");
  w->positions = must_alloc(be, ibytes, "positions");
  w->doc_start = must_alloc(be, ibytes, "document starts");
  w->packed = xcalloc((size_t)p->n_live, sizeof(int));
  w->host_doc_start = xcalloc(tokens, sizeof(int32_t));

  w->scratch = must_alloc(be, p->scratch_bytes, "gradient scratch");
  cursor = w->scratch;
  for (int s = S_X; s < N_SLOTS; s++) {
    if (s == S_X || s == S_Y || s == S_LSE) continue;
    w->dslot[s] = cursor;
    cursor += slot_bytes(p, (enum slot)s);
  }
  w->grad_in = cursor;
  w->grad_tmp = cursor + boundary;
  w->grad_out = cursor + 2 * boundary;
  w->nll = must_alloc(be, tokens * sizeof(float), "per-token losses");
  w->stream = xcalloc((size_t)p->n_live, sizeof(uint64_t));
  if (p->q_scratch_bytes) w->q_scratch = must_alloc(be, p->q_scratch_bytes, "NVFP4 operands");
  if (p->has_head) {   /* fp32 logits, then the GEMM's output in the activation dtype */
    w->logits = must_alloc(be, (size_t)p->cfg.vocab_size * (sizeof(float) + dtype_bytes(p->act)),
                           "logits");
    w->greedy = must_alloc(be, sizeof(int32_t), "greedy token");
  }
}


static void free_activations(struct worker *w) {
  const struct backend *be = w->be;
  be->free(w->acts);
  be->free(w->tokens);
  be->free(w->targets);
  be->free(w->positions);
  be->free(w->doc_start);
  free(w->packed);
  free(w->host_doc_start);
  be->free(w->scratch);
  be->free(w->nll);
  if (w->q_scratch) be->free(w->q_scratch);
  if (w->logits) be->free(w->logits);
  if (w->greedy) be->free(w->greedy);
  free(w->slot);
  free(w->final_normed);
  free(w->head_grad);
  free(w->stream);
  w->q_scratch = w->logits = NULL;
  w->greedy = NULL;
}

void worker_reshape(struct worker *w, int batch, int seq, int n_live) {
  const struct worker_plan *old = &w->plan;
  if (batch == old->batch && seq == old->seq && n_live == old->n_live) return;
  struct worker_plan p;
  worker_plan_make(&p, &old->cfg, old->first_layer, old->n_layers, old->has_embedding,
                   old->has_head, batch, seq, n_live, old->recompute, old->act);
  if (old->wq_bytes) worker_plan_nvfp4(&p, &old->nvfp4);
  worker_plan_shard(&p, old->shards, old->shard_index);
  free_activations(w);
  w->plan = p;
  alloc_activations(w);
}

void worker_init(struct worker *w, const struct backend *be, const struct worker_plan *p) {
  memset(w, 0, sizeof *w);
  w->be = be;
  w->plan = *p;
  size_t floats, decay;
  w->n_params = param_table(p, NULL, NULL, NULL, NULL, NULL, &floats, &decay);
  w->params = xcalloc((size_t)w->n_params, sizeof *w->params);
  w->layer_param = xcalloc((size_t)(p->n_layers ? p->n_layers : 1), sizeof *w->layer_param);
  param_table(p, w->params, w->layer_param, &w->embed_param, &w->final_norm_param,
              &w->head_param, &floats, &decay);
  /* each parameter's weight group (worker.h), looked up by the optimizer every step */
  w->param_group = xmalloc((size_t)w->n_params * sizeof(int));
  for (int i = 0; i < w->n_params; i++)   /* the final norm, an untied head */
    w->param_group[i] = WEIGHTS_LAYER + p->n_layers;
  for (int l = 0; l < p->n_layers; l++)
    for (int k = 0; k < N_LAYER_PARAMS; k++)
      w->param_group[w->layer_param[l][k]] = WEIGHTS_LAYER + l;
  if (w->embed_param >= 0) w->param_group[w->embed_param] = WEIGHTS_EMBED;
  /* A tied embedding used twice on one stage collects the head's gradient apart and adds it
   * once per step (worker_gather_tied_grads), exactly as two stages add theirs: the sum, and
   * so the run, is then the same bit for bit in every pipeline layout. */
  if (p->has_embedding && p->has_head && p->cfg.tie_embeddings)
    w->tied_head_grads = must_alloc(be, (size_t)p->cfg.vocab_size * p->cfg.hidden_size *
                                    sizeof(float), "tied head gradients");

  size_t pbytes = p->param_floats * sizeof(float);
  w->weights = must_alloc(be, pbytes, "weights");
  w->grads = must_alloc(be, pbytes, "gradients");
  /* AdamW moments of this rank's shard only: adam_m[i] is parameter shard_begin + i */
  size_t sbytes = (p->shard_end - p->shard_begin) * sizeof(float);
  w->adam_m = must_alloc(be, sbytes ? sbytes : sizeof(float), "AdamW first moments");
  w->adam_v = must_alloc(be, sbytes ? sbytes : sizeof(float), "AdamW second moments");
  w->weights_act = p->weight_copy_bytes ? must_alloc(be, p->weight_copy_bytes, "weight copy")
                                        : (void *)w->weights;
  w->sums = must_alloc(be, (SUM_NORM + p->cfg.num_layers + 2) * sizeof(double), "step sums");

  nvfp4_worker_init(w);
  alloc_activations(w);
}

void worker_free(struct worker *w) {
  const struct backend *be = w->be;
  free_activations(w);
  be->free(w->weights);
  be->free(w->grads);
  be->free(w->adam_m);
  be->free(w->adam_v);
  if (w->weights_act != w->weights) be->free(w->weights_act);
  be->free(w->sums);
  if (w->tied_head_grads) be->free(w->tied_head_grads);
  free(w->params);
  free(w->layer_param);
  free(w->param_group);
  nvfp4_worker_free(w);
  memset(w, 0, sizeof *w);
}

/* ---- seeded init ----------------------------------------------------------------------------- */

static uint64_t fnv1a(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
  return h;
}

void worker_init_weights(struct worker *w, uint64_t seed, float std) {
  float *host = xmalloc(w->plan.param_floats * sizeof(float));
  /* each tensor has its own stream, so threads over tensors draw the same numbers (a 4B stage
   * takes minutes on one core) */
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < w->n_params; i++) {
    const struct param *p = &w->params[i];
    float *x = host + p->offset;
    size_t n = (size_t)p->rows * p->cols;
    if (p->cols == 1) {   /* norm weights */
      for (size_t k = 0; k < n; k++) x[k] = 1.0f;
      continue;
    }
    uint64_t state = seed ^ fnv1a(p->name);
    for (size_t k = 0; k < n; k += 2) {   /* Box-Muller, two normals per pair of uniforms */
      double u1 = ((splitmix64(&state) >> 11) + 1.0) * 0x1.0p-53;
      double u2 = (splitmix64(&state) >> 11) * 0x1.0p-53;
      double r = sqrt(-2.0 * log(u1));
      x[k] = (float)(std * r * cos(2 * M_PI * u2));
      if (k + 1 < n) x[k + 1] = (float)(std * r * sin(2 * M_PI * u2));
    }
  }
  w->be->to_device(w->weights, host, w->plan.param_floats * sizeof(float));
  free(host);
}

void worker_zero_grads(struct worker *w) {
  w->grads_fresh = 1;
  w->zero_pending = ZERO_EMBED_GRAD | ZERO_HEAD_GRAD;
  /* the squared-norm sums, which a layer may start adding to in this step's backward */
  w->be->zero(w->sums + SUM_NORM, ((size_t)w->plan.cfg.num_layers + 2) * sizeof(double));
}

/* The gradient of `which` (ZERO_EMBED_GRAD or ZERO_HEAD_GRAD), which ops only add to, is zeroed
 * just before the step's first op adds to it, not when the step starts: until the forward has
 * waited for its weight group, the last step's update may still be reading it on the side
 * stream (optim.c). */
static void zero_before_first_add(struct worker *w, int which, float *grad) {
  if (!(w->zero_pending & which)) return;
  w->zero_pending &= ~which;
  w->be->zero(grad, (size_t)w->plan.cfg.vocab_size * w->plan.cfg.hidden_size * sizeof(float));
}

void worker_gather_tied_grads(struct worker *w) {
  if (!w->tied_head_grads) return;
  float *embed = w->grads + w->params[w->embed_param].offset;
  w->be->add(embed, embed, w->tied_head_grads,
             (size_t)w->plan.cfg.vocab_size * w->plan.cfg.hidden_size, DT_F32);
}

int worker_weight_groups(const struct worker *w) { return WEIGHTS_LAYER + w->plan.n_layers + 1; }

int worker_weight_group(const struct worker *w, int param) { return w->param_group[param]; }

/* Before reading weight group g: the optimizer's update of it is done (ops.h wait_mark). */
static void wait_weights(const struct worker *w, int g) {
  if (w->be->wait_mark) w->be->wait_mark(g);
}
/* Before reading every master: the whole update is done. */
static void wait_all_weights(const struct worker *w) {
  for (int g = 0; g < worker_weight_groups(w); g++) wait_weights(w, g);
}

void worker_prepare_step(struct worker *w, int step) {
  w->step = step;
  /* anything but the optimizer that writes the masters (loading, init) leaves the flag clear;
   * the NVFP4 layers' matrices in the copy are read only while their layers run in BF16 */
  int stale = w->weights_act != w->weights &&
              (!w->weights_act_fresh || (w->nvfp4_paused && w->nvfp4_copies_stale));
  if (stale) {   /* the copy reads every master: the whole update first */
    wait_all_weights(w);
    w->be->convert(w->weights_act, w->plan.act, w->weights, DT_F32, w->plan.param_floats);
    w->nvfp4_copies_stale = 0;
  }
  w->weights_act_fresh = 0;
  if (w->plan.wq_bytes) nvfp4_weights_changed(w);
}

/* ---- forward and backward of the stage ----------------------------------------------------- */

void *worker_input(struct worker *w, int live) {
  return w->slot[live * w->plan.n_layers][S_X];
}

void *worker_output(struct worker *w, int live) {
  return w->slot[live * w->plan.n_layers + w->plan.n_layers - 1][S_Y];
}

size_t worker_boundary_bytes(const struct worker *w) {
  return w->plan.slot_values[S_X] * dtype_bytes(w->plan.act);
}

/* The weight copy of parameter i, as the GEMMs and the embedding read it. */
const void *worker_weight_act(const struct worker *w, int i) {
  return (const char *)w->weights_act + w->params[i].offset * dtype_bytes(w->plan.act);
}

/* The first stage's tokens of live slot `live`, in backend memory. */
static int32_t *live_tokens(const struct worker *w, int live) {
  return w->tokens + (size_t)live * w->plan.batch * w->plan.seq;
}

/* The stage's forward of n tokens in live slot `live`: on the first stage the embedding of
 * its tokens (already copied to live_tokens), then every layer, each after the optimizer's
 * update of its weights; on the last stage it also waits for the head's weights (a tied head
 * reads the embedding). */
static void forward_layers(struct worker *w, int live, int n) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  if (p->has_embedding) {
    int32_t *dev = live_tokens(w, live);
    wait_weights(w, WEIGHTS_EMBED);
    be->embedding_forward(worker_input(w, live), dev, worker_weight_act(w, w->embed_param), n,
                          p->cfg.hidden_size);
  }
  for (int l = 0; l < p->n_layers; l++) {
    wait_weights(w, WEIGHTS_LAYER + l);
    block_forward(w, live, l);
  }
  if (p->has_head) {
    wait_weights(w, WEIGHTS_EMBED);
    wait_weights(w, WEIGHTS_LAYER + p->n_layers);
  }
}

void worker_forward(struct worker *w, int live, const struct micro_batch *mb, float grad_scale,
                    float *nll) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  int n = p->batch * p->seq, d = p->cfg.hidden_size;
  size_t at = (size_t)live * n;
  w->stream[live] = mb->stream;
  be->to_device(w->positions + at, mb->positions, (size_t)n * sizeof(int32_t));
  /* A token at position p of its document, row t of its sequence, sees keys t - p .. t; a
   * document that began before the sequence (p > t: a later chunk of a long one) sees from 0. */
  w->packed[live] = 0;
  for (int i = 0; i < n; i++) {
    int first = i % p->seq - mb->positions[i];
    w->host_doc_start[i] = first > 0 ? first : 0;
    w->packed[live] |= first > 0;
  }
  if (w->packed[live])
    be->to_device(w->doc_start + at, w->host_doc_start, (size_t)n * sizeof(int32_t));
  if (p->has_embedding)
    be->to_device(live_tokens(w, live), mb->tokens, (size_t)n * sizeof(int32_t));
  forward_layers(w, live, n);
  if (!p->has_head) return;

  const struct param *norm = &w->params[w->final_norm_param];
  const struct param *head = &w->params[w->head_param];
  be->to_device(w->targets + at, mb->targets, (size_t)n * sizeof(int32_t));
  be->rmsnorm_forward(w->final_normed[live], worker_output(w, live), w->weights + norm->offset, n,
                      d, (float)p->cfg.rms_norm_eps);
  int train = grad_scale > 0;
  if (train) be->zero(w->head_grad[live], worker_boundary_bytes(w));
  float *dhead = w->tied_head_grads ? w->tied_head_grads : w->grads + head->offset;
  if (train) zero_before_first_add(w, ZERO_HEAD_GRAD, dhead);   /* forward_layers waited */
  be->lm_head_loss(w->nll, train ? w->head_grad[live] : NULL, train ? dhead : NULL,
                   w->final_normed[live], worker_weight_act(w, w->head_param), w->targets + at,
                   n, d, p->cfg.vocab_size, grad_scale);
  /* the step's loss sums training forwards only: an evaluation between steps reads nll */
  if (train) be->sum_into(w->sums + SUM_LOSS, w->nll, (size_t)n, 0);
  if (nll) be->to_host(nll, w->nll, (size_t)n * sizeof(float));
}

double worker_take_loss(struct worker *w) {
  if (!w->plan.has_head) return 0;
  double sum;
  w->be->to_host(&sum, w->sums + SUM_LOSS, sizeof sum);
  w->be->zero(w->sums + SUM_LOSS, sizeof sum);
  return sum;
}

void worker_backward(struct worker *w, int live, const struct layer_hook *hook) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  int n = p->batch * p->seq, d = p->cfg.hidden_size;
  const void *dy = w->grad_in;
  if (p->has_head) {   /* grad_tmp is overwritten (no ACC_DX) */
    const struct param *norm = &w->params[w->final_norm_param];
    be->rmsnorm_backward(w->grad_tmp, w->grads + norm->offset, w->head_grad[live],
                         worker_output(w, live), w->weights + norm->offset, n, d,
                         (float)p->cfg.rms_norm_eps, w->grads_fresh ? 0 : ACC_DW);
    dy = w->grad_tmp;
  }
  for (int l = p->n_layers - 1; l >= 0; l--) {
    void *dx = l == 0 ? w->grad_out : (dy == w->grad_tmp ? w->grad_in : w->grad_tmp);
    block_backward(w, live, l, dy, dx);
    if (hook) hook->done(hook->ctx, l);
    dy = dx;
  }
  if (p->has_embedding) {
    float *dtable = w->grads + w->params[w->embed_param].offset;
    zero_before_first_add(w, ZERO_EMBED_GRAD, dtable);
    be->embedding_backward(dtable, w->grad_out, w->tokens + (size_t)live * n, n, d);
  }
  w->grads_fresh = 0;
}

/* ---- inference ------------------------------------------------------------------------------ */

static size_t kv_data_bytes(const struct worker_plan *p, int max_len, int n_seq) {
  return 2 * (size_t)p->n_layers * n_seq * max_len * slot_width(&p->cfg, S_K) * dtype_bytes(p->act);
}

/* a decoding step's logits of every sequence, fp32 and as the activations */
static size_t kv_logit_bytes(const struct worker_plan *p, int n_seq) {
  return p->has_head ? (size_t)n_seq * p->cfg.vocab_size * (sizeof(float) + dtype_bytes(p->act))
                     : 0;
}

/* their greedy tokens (argmax_rows) */
static size_t kv_greedy_bytes(const struct worker_plan *p, int n_seq) {
  return p->has_head ? (size_t)n_seq * sizeof(int32_t) : 0;
}

size_t kv_packed_bytes(const struct worker_plan *p, int n_seq, const struct backend *be) {
  return be->nvfp4_gemv_packed && n_seq <= NVFP4_PACKED_DECODE_ROWS ? p->fp4_bytes : 0;
}

size_t kv_cache_bytes(const struct worker_plan *p, int max_len, int n_seq,
                      const struct backend *be) {
  return kv_data_bytes(p, max_len, n_seq) + kv_logit_bytes(p, n_seq) +
         kv_greedy_bytes(p, n_seq) + kv_packed_bytes(p, n_seq, be);
}

void kv_cache_init(struct kv_cache *kv, const struct worker *w, int max_len, int n_seq) {
  const struct worker_plan *p = &w->plan;
  memset(kv, 0, sizeof *kv);
  kv->data = must_alloc(w->be, kv_data_bytes(p, max_len, n_seq), "KV cache");
  kv->max_len = max_len;
  kv->n_seq = n_seq;
  kv->len = xcalloc((size_t)n_seq, sizeof(int));
  if (p->has_head) {
    kv->logits = must_alloc(w->be, kv_logit_bytes(p, n_seq), "decoding logits");
    kv->greedy = must_alloc(w->be, kv_greedy_bytes(p, n_seq), "decoding tokens");
  }
  size_t fp4_bytes = w->nvfp4_paused ? 0 : kv_packed_bytes(p, n_seq, w->be);
  if (fp4_bytes) {
    kv->fp4 = must_alloc(w->be, fp4_bytes, "NVFP4 weights packed for decoding");
    wait_all_weights(w);   /* packing reads the masters */
    nvfp4_pack_weights(w, kv->fp4);
  }
}

void kv_cache_free(struct kv_cache *kv, const struct worker *w) {
  if (kv->decode_step) w->be->replay_free(kv->decode_step);
  w->be->free(kv->data);
  if (kv->logits) w->be->free(kv->logits);
  if (kv->greedy) w->be->free(kv->greedy);
  if (kv->fp4) w->be->free(kv->fp4);
  free(kv->len);
  memset(kv, 0, sizeof *kv);
}

/* The device work of worker_infer: the layers, and on the last stage the fp32 logits of the
 * last token, or of each of the n (INFER_EACH), into `logits` (then their act-typed GEMM
 * output), and when greedy is not NULL the token of each of those rows into it. */
static void infer_ops(struct worker *w, int n, int each, float *logits, int32_t *greedy) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  int d = p->cfg.hidden_size, vocab = p->cfg.vocab_size, rows = each ? n : 1;
  forward_layers(w, 0, n);
  if (!p->has_head) return;
  const struct param *norm = &w->params[w->final_norm_param];
  size_t act = dtype_bytes(p->act);
  void *last = w->final_normed[0];
  void *out = logits + (size_t)rows * vocab;
  be->rmsnorm_forward(last, (char *)worker_output(w, 0) + (size_t)(n - rows) * d * act,
                      w->weights + norm->offset, rows, d, (float)p->cfg.rms_norm_eps);
  const void *head = worker_weight_act(w, w->head_param);
  be->linear_forward(&out, last, &head, &vocab, 1, rows, d);
  be->convert(logits, DT_F32, out, p->act, (size_t)rows * vocab);
  if (greedy) be->argmax_rows(greedy, logits, rows, vocab);
}

void worker_infer(struct worker *w, const int32_t *tokens, const int32_t *positions, int n,
                  struct kv_cache *kv, int seq, float *logits, int32_t *ids) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  int each = seq == INFER_EACH;
  if (p->batch != 1 || n < 1 || n > p->seq || (each && (!kv || n != kv->n_seq)) ||
      (!each && (seq < 0 || (kv ? seq >= kv->n_seq : seq != 0))))
    die("internal: worker_infer of %d tokens of sequence %d on a plan of %d x %d (%d cached "
        "sequences)", n, seq, p->batch, p->seq, kv ? kv->n_seq : 0);
  /* a token's row in its sequence's cache is its position, and the cache is filled in order */
  for (int i = 0; kv && i < n; i++) {
    int s = each ? i : seq, row = kv->len[s] + (each ? 0 : i);
    if (positions[i] != row || row >= kv->max_len)
      die("internal: worker_infer: token %d of %d is at position %d, its cache row is %d of %d",
          i, n, positions[i], row, kv->max_len);
  }
  w->seq_now = n;
  w->kv = kv;
  w->kv_seq = seq;
  w->packed[0] = 0;   /* one document per sequence; positions continue the cache's */
  be->to_device(w->positions, positions, (size_t)n * sizeof(int32_t));
  if (p->has_embedding) be->to_device(live_tokens(w, 0), tokens, (size_t)n * sizeof(int32_t));
  float *dev_logits = each ? kv->logits : w->logits;
  int32_t *dev_ids = !ids ? NULL : each ? kv->greedy : w->greedy;
  /* A decoding step runs the same ops at every step (they read the positions and the tokens
   * from device memory), hundreds of small launches: recorded once per cache, then replayed.
   * Not under --timing, which synchronizes around every stage. */
  int record = each && be->capture_begin && !block_timing;
  if (record && kv->decode_step && kv->decode_greedy != (ids != NULL))
    die("internal: worker_infer: a cache's decoding steps all pick their tokens or none does");
  if (record && kv->decode_step) {
    be->replay(kv->decode_step);
  } else if (record) {
    be->capture_begin();
    infer_ops(w, n, each, dev_logits, dev_ids);
    kv->decode_step = be->capture_end();
    kv->decode_greedy = ids != NULL;
    be->replay(kv->decode_step);
  } else {
    infer_ops(w, n, each, dev_logits, dev_ids);
  }
  for (int i = 0; kv && i < n; i++) kv->len[each ? i : seq]++;
  w->seq_now = 0;
  w->kv = NULL;
  size_t rows = each ? (size_t)n : 1;
  if (p->has_head && ids) be->to_host(ids, dev_ids, rows * sizeof(int32_t));
  else if (p->has_head) be->to_host(logits, dev_logits, rows * p->cfg.vocab_size * sizeof(float));
}
