#include "trainer/optim.h"

#include <math.h>

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

double optimizer_step(struct worker *w, struct comm *c, const Qwen3__Optim *o, double lr, int t) {
  const struct backend *be = w->be;
  const struct worker_plan *p = &w->plan;
  /* with tied embeddings on two stages, each copy got only its own use's gradient */
  int tied_copy = p->cfg.tie_embeddings && c->pp > 1 && (p->has_embedding || p->has_head);
  if (tied_copy) {
    const struct param *e = &w->params[w->embed_param];
    comm_allreduce_sum_float(c, GROUP_TIED, w->grads + e->offset, (size_t)e->rows * e->cols);
  }
  if (c->dp > 1) comm_allreduce_sum_float(c, GROUP_DP, w->grads, p->param_floats);

  /* the global norm counts the tied embedding once: the last stage leaves its copy out */
  double sq;
  if (tied_copy && p->has_head && !p->has_embedding) {
    const struct param *e = &w->params[w->embed_param];
    size_t n = (size_t)e->rows * e->cols;
    sq = be->sum_squares(w->grads, e->offset) +
         be->sum_squares(w->grads + e->offset + n, p->param_floats - e->offset - n);
  } else {
    sq = be->sum_squares(w->grads, p->param_floats);
  }
  if (c->pp > 1) comm_allreduce_sum_double(c, GROUP_PIPE, &sq, 1);
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
