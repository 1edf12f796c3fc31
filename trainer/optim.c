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

/* The squared gradient norm, summed per tensor and grouped by global layer (embedding first,
 * final norm and head last) in a fixed order, so every pipeline layout gets the same bits. */
static double grad_norm_squared(struct worker *w, struct comm *c) {
  const struct worker_plan *p = &w->plan;
  int groups = p->cfg.num_layers + 2;
  double *sq = xcalloc((size_t)groups, sizeof(double));
  for (int l = 0; l < p->n_layers; l++)
    for (int k = 0; k < N_LAYER_PARAMS; k++) {
      const struct param *t = &w->params[w->layer_param[l][k]];
      sq[1 + p->first_layer + l] += w->be->sum_squares(w->grads + t->offset, (size_t)t->rows * t->cols);
    }
  /* the tied embedding counts once: the last stage leaves its copy out */
  if (p->has_embedding) {
    const struct param *t = &w->params[w->embed_param];
    sq[0] = w->be->sum_squares(w->grads + t->offset, (size_t)t->rows * t->cols);
  }
  if (p->has_head) {
    const struct param *t = &w->params[w->final_norm_param];
    sq[groups - 1] = w->be->sum_squares(w->grads + t->offset, (size_t)t->rows);
    if (!p->cfg.tie_embeddings) {
      t = &w->params[w->head_param];
      sq[groups - 1] += w->be->sum_squares(w->grads + t->offset, (size_t)t->rows * t->cols);
    }
  }
  /* every group lives on one stage: the sum over stages only adds zeros */
  if (c->pp > 1) comm_allreduce_sum_double(c, GROUP_PIPE, sq, (size_t)groups);
  double total = 0;
  for (int g = 0; g < groups; g++) total += sq[g];
  free(sq);
  return total;
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
  if (c->dp > 1) comm_allreduce_sum_float(c, GROUP_DP, w->grads, p->param_floats);
  double sq = grad_norm_squared(w, c);
  double norm = sqrt(sq);
  if (o->grad_clip > 0 && norm > o->grad_clip)   /* torch.nn.utils.clip_grad_norm_ */
    be->scale(w->grads, (float)(o->grad_clip / (norm + 1e-6)), p->param_floats);

  be->adamw_update(w->weights, w->grads, w->adam_m, w->adam_v, p->decay_floats, (float)lr,
                   (float)o->beta1, (float)o->beta2, (float)o->eps, (float)o->weight_decay, t);
  size_t rest = p->param_floats - p->decay_floats;
  be->adamw_update(w->weights + p->decay_floats, w->grads + p->decay_floats,
                   w->adam_m + p->decay_floats, w->adam_v + p->decay_floats, rest, (float)lr,
                   (float)o->beta1, (float)o->beta2, (float)o->eps, 0.0f, t);
  return norm;
}
