#include "trainer/optim.h"

#include <math.h>
#include <stdlib.h>

#include "common/util.h"

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

/* sum_squares of grads [from, to) clipped to the rank's shard [b, e) */
static double shard_sum_squares(struct worker *w, size_t from, size_t to) {
  size_t b = w->plan.shard_begin, e = w->plan.shard_end;
  if (from < b) from = b;
  if (to > e) to = e;
  return from < to ? w->be->sum_squares(w->grads + from, to - from) : 0;
}

static double param_sum_squares(struct worker *w, int i) {
  const struct param *t = &w->params[i];
  return shard_sum_squares(w, t->offset, t->offset + (size_t)t->rows * t->cols);
}

/* The squared gradient norm, summed per tensor and grouped by global layer (embedding first,
 * final norm and head last) in a fixed order, so every pipeline layout gets the same bits.
 * ZeRO-1: each replica holds the summed gradient of its shard only; a tensor's sum of squares
 * is then the sum over replicas (MPI's order over GROUP_DP) of its pieces' sums, each group the
 * sum of its tensors' in table order, and the groups are added in the same fixed order: within
 * rounding (not bitwise) of the unsharded norm. */
static double grad_norm_squared(struct worker *w, struct comm *c) {
  const struct worker_plan *p = &w->plan;
  int groups = p->cfg.num_layers + 2;
  double *sq = xcalloc((size_t)groups, sizeof(double));
  for (int l = 0; l < p->n_layers; l++)
    for (int k = 0; k < N_LAYER_PARAMS; k++)
      sq[1 + p->first_layer + l] += param_sum_squares(w, w->layer_param[l][k]);
  /* the tied embedding counts once: the last stage leaves its copy out */
  if (p->has_embedding) sq[0] = param_sum_squares(w, w->embed_param);
  if (p->has_head) {
    sq[groups - 1] = param_sum_squares(w, w->final_norm_param);
    if (!p->cfg.tie_embeddings) sq[groups - 1] += param_sum_squares(w, w->head_param);
  }
  if (p->shards > 1) comm_allreduce_sum_double(c, GROUP_DP, sq, (size_t)groups);
  /* every group lives on one stage: the sum over stages only adds zeros */
  if (c->pp > 1) comm_allreduce_sum_double(c, GROUP_PIPE, sq, (size_t)groups);
  double total = 0;
  for (int g = 0; g < groups; g++) total += sq[g];
  free(sq);
  return total;
}

/* AdamW on parameters [from, to) clipped to the shard; decayed below decay_floats */
static void adamw_range(struct worker *w, const Qwen3__Optim *o, double lr, int t, size_t from,
                        size_t to, float weight_decay) {
  size_t b = w->plan.shard_begin, e = w->plan.shard_end;
  if (from < b) from = b;
  if (to > e) to = e;
  if (from >= to) return;
  float *m = w->adam_m + (from - b), *v = w->adam_v + (from - b);
  w->be->adamw_update(w->weights + from, w->grads + from, m, v, to - from, (float)lr,
                      (float)o->beta1, (float)o->beta2, (float)o->eps, weight_decay, t);
}

double optimizer_step(struct worker *w, struct comm *c, const Qwen3__Optim *o, double lr, int t) {
  const struct backend *be = w->be;
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
  if (zero)   /* ZeRO-1: each replica sums its shard of the gradients only */
    comm_reduce_scatter_sum_float(c, GROUP_DP, w->grads, p->param_floats, p->shard_stride);
  else if (c->dp > 1)
    comm_allreduce_sum_float(c, GROUP_DP, w->grads, p->param_floats);
  double sq = grad_norm_squared(w, c);
  double norm = sqrt(sq);
  if (o->grad_clip > 0 && norm > o->grad_clip)   /* torch.nn.utils.clip_grad_norm_ */
    be->scale(w->grads + p->shard_begin, (float)(o->grad_clip / (norm + 1e-6)),
              p->shard_end - p->shard_begin);

  adamw_range(w, o, lr, t, 0, p->decay_floats, (float)o->weight_decay);
  adamw_range(w, o, lr, t, p->decay_floats, p->param_floats, 0.0f);
  if (zero) comm_allgather_float(c, GROUP_DP, w->weights, p->param_floats, p->shard_stride);
  return norm;
}
