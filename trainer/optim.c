#include "trainer/optim.h"

#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "worker/nvfp4_linear.h"

double lr_schedule(const Qwen3__Optim *o, int total_steps, int step) {
  if (step <= o->warmup_steps) return o->lr * step / o->warmup_steps;
  int decay_steps = total_steps - o->warmup_steps;
  double progress = decay_steps > 1 ? (double)(step - o->warmup_steps - 1) / (decay_steps - 1) : 1;
  switch (o->schedule) {
  case QWEN3__LR_SCHEDULE__CONSTANT:
    return o->lr;
  case QWEN3__LR_SCHEDULE__LINEAR:
    return o->lr + (o->min_lr - o->lr) * progress;
  default:
    return o->min_lr + 0.5 * (o->lr - o->min_lr) * (1 + cos(M_PI * progress));
  }
}

/* Adds the squares of grads [from, to), clipped to the rank's shard [b, e), into the device
 * sum of group g. */
static void shard_sum_squares(struct worker *w, int g, size_t from, size_t to) {
  size_t b = w->plan.shard_begin, e = w->plan.shard_end;
  if (from < b) from = b;
  if (to > e) to = e;
  if (from < to) w->be->sum_into(w->sums + SUM_NORM + g, w->grads + from, to - from, 1);
}

static void param_sum_squares(struct worker *w, int g, int i) {
  const struct param *t = &w->params[i];
  shard_sum_squares(w, g, t->offset, t->offset + (size_t)t->rows * t->cols);
}

/* The squared norms of local layer l's gradients into its group's device sum (worker_zero_grads
 * zeroed the sums), tensor by tensor in table order. */
static void layer_sum_squares(struct worker *w, int l) {
  for (int k = 0; k < N_LAYER_PARAMS; k++)
    param_sum_squares(w, 1 + w->plan.first_layer + l, w->layer_param[l][k]);
}

void optimizer_norm_layer(struct worker *w, int layer) {
  const struct backend *be = w->be;
  if (be->side_stream) be->side_stream(1);
  layer_sum_squares(w, layer);
  if (be->side_stream) be->side_stream(0);
}

/* The squared gradient norm, summed per tensor and grouped by global layer (embedding first,
 * final norm and head last) in a fixed order, so every pipeline layout gets the same bits (and
 * so does a layer summed early by optimizer_norm_layer: the same sums in the same order). The
 * sums run on the device and come back in one copy per chunk; every group lives in one chunk of
 * one stage, so adding the chunks' groups and then the stages' only adds zeros.
 * ZeRO-1: each replica holds the summed gradient of its shard only; a tensor's sum of squares
 * is then the sum over replicas (MPI's order over GROUP_DP) of its pieces' sums, each group the
 * sum of its tensors' in table order, and the groups are added in the same fixed order: within
 * rounding (not bitwise) of the unsharded norm. */
static double grad_norm_squared(struct worker *chunks, int n, struct comm *c, int layers_normed) {
  int groups = chunks[0].plan.cfg.num_layers + 2;
  double *sq = xcalloc((size_t)groups, sizeof(double));
  double *part = xmalloc((size_t)groups * sizeof(double));
  for (int i = 0; i < n; i++) {
    struct worker *w = &chunks[i];
    const struct worker_plan *p = &w->plan;
    for (int l = 0; l < p->n_layers && !layers_normed; l++) layer_sum_squares(w, l);
    /* the tied embedding counts once: the last stage leaves its copy out */
    if (p->has_embedding) param_sum_squares(w, 0, w->embed_param);
    if (p->has_head) {
      param_sum_squares(w, groups - 1, w->final_norm_param);
      if (!p->cfg.tie_embeddings) param_sum_squares(w, groups - 1, w->head_param);
    }
    w->be->to_host(part, w->sums + SUM_NORM, (size_t)groups * sizeof(double));
    for (int g = 0; g < groups; g++) sq[g] += part[g];
  }
  free(part);
  if (chunks[0].plan.shards > 1) comm_allreduce_sum_double(c, GROUP_DP, sq, (size_t)groups);
  if (c->pp > 1) comm_allreduce_sum_double(c, GROUP_PIPE, sq, (size_t)groups);
  double total = 0;
  for (int g = 0; g < groups; g++) total += sq[g];
  free(sq);
  return total;
}

/* Where AdamW writes parameter i's amax parts for the NVFP4 quantizer: an NVFP4 matrix's, when
 * this rank updates all of it. Under ZeRO-1 a shard may end inside a matrix, and each rank has
 * the maxima of its own piece only: a MAX all-reduce of them over the data-parallel group would
 * give the quantizer its amax; until then it keeps its own pass there. */
static uint32_t *amax_parts_of(const struct worker *w, int i) {
  return w->plan.shards == 1 ? nvfp4_amax_parts(w, i) : NULL;
}

/* Calls fn(w, arg, from, to, decay, amax_parts) on the parameters of weight group g (worker.h:
 * WEIGHTS_*), neighbours in the flat buffer with the same decay merged into one run [from, to)
 * with amax_parts NULL; with `amax`, a parameter with amax parts (amax_parts_of) is a run of
 * its own, with them: the parts' chunks count from the parameter's first value. */
typedef void (*run_fn)(struct worker *w, const void *arg, size_t from, size_t to, int decay,
                       uint32_t *amax_parts);
static void for_group_runs(struct worker *w, int g, int amax, run_fn fn, const void *arg) {
  size_t from = 0, to = 0;
  int decay = 0;
  uint32_t *parts = NULL;   /* the run's */
  for (int i = 0; i < w->n_params; i++) {
    const struct param *p = &w->params[i];
    if (worker_weight_group(w, i) != g) continue;
    size_t end = p->offset + (size_t)p->rows * p->cols;
    uint32_t *own = amax ? amax_parts_of(w, i) : NULL;
    if (to > from && p->offset == to && p->decay == decay && !parts && !own) {
      to = end;
      continue;
    }
    if (to > from) fn(w, arg, from, to, decay, parts);
    from = p->offset, to = end, decay = p->decay, parts = own;
  }
  if (to > from) fn(w, arg, from, to, decay, parts);
}

/* AdamW on parameters [from, to) clipped to the shard, decayed or not; the weight copy in the
 * same pass unless ZeRO's all-gather of the masters comes after, and the amax parts when given
 * (one whole parameter's, never clipped: amax_parts_of). An NVFP4 matrix (one with amax parts)
 * of a layer in NVFP4 gets no copy: its GEMMs read its quantization, and the step that pauses
 * NVFP4 converts the copies first (worker_prepare_step). */
static void adamw_run(struct worker *w, const void *arg, size_t from, size_t to, int decay,
                      uint32_t *amax_parts) {
  const struct adamw_step *st = arg;
  size_t b = w->plan.shard_begin, e = w->plan.shard_end;
  if (from < b) from = b;
  if (to > e) to = e;
  if (from >= to) return;
  struct adamw_step s = *st;
  if (!decay) s.weight_decay = 0;
  int skip_copy = amax_parts && !w->nvfp4_paused;
  w->nvfp4_copies_stale |= skip_copy;
  void *copy = w->weights_act != w->weights && w->plan.shards == 1 && !skip_copy
                   ? (char *)w->weights_act + from * dtype_bytes(w->plan.act) : NULL;
  w->be->adamw_update(w->weights + from, copy, w->grads + from, w->adam_m + (from - b),
                      w->adam_v + (from - b), to - from, &s, amax_parts);
}

/* Starts the sum over the replicas of gradients [from, to) */
static void start_sum_run(struct worker *w, const void *arg, size_t from, size_t to, int decay,
                          uint32_t *amax_parts) {
  (void)decay, (void)amax_parts;
  comm_allreduce_sum_float_start((struct comm *)arg, GROUP_DP, w->grads + from, to - from);
}

void optimizer_reduce_layer(struct worker *w, struct comm *c, int layer) {
  for_group_runs(w, WEIGHTS_LAYER + layer, 0, start_sum_run, c);
}

/* The gradient sums of one chunk before the norm: the tied embedding's between its two copies,
 * then the replicas' */
static void sum_chunk_grads(struct worker *w, struct comm *c, int layers_reduced) {
  const struct worker_plan *p = &w->plan;
  worker_gather_tied_grads(w);
  /* with tied embeddings on two stages, each copy got only its own use's gradient */
  int tied_copy = p->cfg.tie_embeddings && c->pp > 1 && (p->has_embedding || p->has_head);
  if (tied_copy) {
    const struct param *e = &w->params[w->embed_param];
    comm_allreduce_sum_float(c, GROUP_TIED, w->grads + e->offset, (size_t)e->rows * e->cols);
  }
  int zero = p->shards > 1;
  if (zero && p->shards != c->dp) die("internal: %d shards for %d replicas", p->shards, c->dp);
  if (zero && layers_reduced) die("internal: ZeRO-1 with the layers' sums started in backward");
  if (zero) {   /* ZeRO-1: each replica sums its shard of the gradients only */
    comm_reduce_scatter_sum_float(c, GROUP_DP, w->grads, p->param_floats, p->shard_stride);
  } else if (layers_reduced) {   /* the rest: the embedding, the final norm, an untied head */
    for_group_runs(w, WEIGHTS_EMBED, 0, start_sum_run, c);
    for_group_runs(w, WEIGHTS_LAYER + p->n_layers, 0, start_sum_run, c);
  } else if (c->dp > 1) {
    comm_allreduce_sum_float(c, GROUP_DP, w->grads, p->param_floats);
  }
}

/* AdamW on one chunk (after the norm) */
static void update_chunk(struct worker *w, struct comm *c, const struct adamw_step *st) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  int zero = p->shards > 1;
  /* Without ZeRO the update runs on the backend's side stream, one weight group after the
   * other, each marked, while the host goes on to issue the next step: that step's forward
   * waits for each group's mark just before it reads the group (worker.c), so the update of
   * the later layers overlaps the forward of the first ones. With several chunks a later
   * chunk's mark g replaces an earlier one's, which then waits for more than it needs, never
   * less. The same pass writes the weight copy, and the NVFP4 matrices' amax parts, which the
   * next quantization of each (nvfp4_linear.c) reads instead of the masters once more. ZeRO's
   * all-gather needs every shard updated first: it stays in order. */
  int overlap = !zero && be->side_stream;
  if (overlap) be->side_stream(1);
  for (int g = 0; g < worker_weight_groups(w); g++) {
    for_group_runs(w, g, 1, adamw_run, st);
    if (be->mark) be->mark(g);
  }
  if (overlap) be->side_stream(0);
  w->weights_act_fresh = w->weights_act != w->weights && !zero;
  w->amax_parts_fresh = w->amax_parts && !zero;
  if (zero) comm_allgather_float(c, GROUP_DP, w->weights, p->param_floats, p->shard_stride);
}

void stop_if_nonfinite(struct worker *chunks, int n, int step, const char *what, double value) {
  if (isfinite(value)) return;
  char why[512] = "";
  for (int i = 0; i < n && !nvfp4_nonfinite_operand(&chunks[i], why, sizeof why); i++) {}
  die("step %d: the %s is %g; stopping%s%s", step, what, value, *why ? ": " : "", why);
}

double optimizer_step(struct worker *chunks, int n, struct comm *c, const Qwen3__Optim *o,
                      double lr, int t, enum by_layer by_layer) {
  int layers_reduced = by_layer == BY_LAYER_REDUCED;
  for (int i = 0; i < n; i++) sum_chunk_grads(&chunks[i], c, layers_reduced);
  if (layers_reduced) comm_wait_reductions(c);
  double norm = sqrt(grad_norm_squared(chunks, n, c, by_layer == BY_LAYER_NORMED));
  stop_if_nonfinite(chunks, n, t, "gradient norm", norm);   /* before the update: nothing lost */
  struct adamw_step st = {
    .lr = (float)lr, .beta1 = (float)o->beta1, .beta2 = (float)o->beta2, .eps = (float)o->eps,
    .weight_decay = (float)o->weight_decay, .grad_scale = 1.0f, .t = t,
  };
  if (o->grad_clip > 0 && norm > o->grad_clip)   /* torch.nn.utils.clip_grad_norm_ */
    st.grad_scale = (float)(o->grad_clip / (norm + 1e-6));
  for (int i = 0; i < n; i++) update_chunk(&chunks[i], c, &st);
  return norm;
}
