/* The optimizer step against torch: trainer/optim.c's lr_schedule() and optimizer_step() on a
 * real worker (CPU backend, one stage holding a tied 2-layer Qwen3) replay the runs of
 * tests/fixtures/optim/adamw.safetensors, made by tests/optim_fixture.py with torch.optim.AdamW
 * (two parameter groups: matrices decayed, norm weights not), clip_grad_norm_ and LambdaLR over
 * warmup + cosine, warmup + linear and warmup + constant schedules, clipping on some steps.
 *
 * Every step: the lr equals torch's to float precision (|a - b| <= 2^-24 |b|); the gradient norm
 * optimizer_step returns is torch's within 1e-6 relative. After each step the fixture holds (every
 * step for cosine, the last for the others): for every tensor, the parameter, exp_avg and
 * exp_avg_sq within 1e-6 relative L2 (||ours - torch|| <= 1e-6 ||torch||), and the parameter's
 * change since the start within 1e-5 relative L2, since a small error in the update hides under
 * the parameter itself (a norm weight near 1 moves by about lr per step). */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/util.h"
#include "data/safetensors.h"
#include "tests/check.h"
#include "trainer/optim.h"
#include "worker/worker.h"

#define FIXTURE "tests/fixtures/optim/adamw.safetensors"
#define STATE_TOL 1e-6
#define CHANGE_TOL 1e-5

static struct st_file *fixture;

static const char *meta(const char *key) {
  const char *v = st_metadata(fixture, key);
  if (!v) die("%s: no \"%s\" in __metadata__", FIXTURE, key);
  return v;
}
static double meta_num(const char *key) { return strtod(meta(key), NULL); }

/* A flat F32 vector of the fixture (every tensor in the order of __metadata__["params"]). */
static float *flat(const char *name, size_t n) {
  const struct st_tensor *t = st_find(fixture, name);
  if (!t) die("%s: no tensor %s", FIXTURE, name);
  if (t->numel != n) die("%s: %s has %llu values, expected %zu", FIXTURE, name,
                         (unsigned long long)t->numel, n);
  float *x = xmalloc(n * sizeof(float));
  char err[512];
  if (st_read_f32(t, x, n, err, sizeof err) != 0) die("%s", err);
  return x;
}

/* A F64 vector, read as doubles (st_read_f32 would round them). */
static double *doubles(const char *name, size_t n) {
  const struct st_tensor *t = st_find(fixture, name);
  if (!t || t->dtype != ST_F64 || t->numel != n)
    die("%s: no F64 [%zu] tensor %s", FIXTURE, n, name);
  double *x = xmalloc(n * sizeof(double));
  memcpy(x, t->data, n * sizeof(double));
  return x;
}

/* Where each of the worker's tensors sits in the fixture's flat vectors. */
struct layout {
  size_t *at;     /* [w->n_params] offset into a flat vector */
  size_t total;   /* floats of a flat vector */
};

static struct layout map_params(const struct worker *w) {
  json_error_t jerr;
  json_t *list = json_loads(meta("params"), 0, &jerr);
  if (!json_is_array(list)) die("%s: __metadata__ params: %s", FIXTURE, jerr.text);
  struct layout l = {xcalloc((size_t)w->n_params, sizeof(size_t)), 0};
  int found = 0;
  size_t i;
  json_t *entry;
  json_array_foreach(list, i, entry) {
    const char *name = json_string_value(json_array_get(entry, 0));
    json_t *shape = json_array_get(entry, 1);
    size_t numel = 1, d;
    json_t *dim;
    json_array_foreach(shape, d, dim) numel *= (size_t)json_integer_value(dim);
    int k = 0;
    while (k < w->n_params && (!name || strcmp(w->params[k].name, name) != 0)) k++;
    CHECK(k < w->n_params, "fixture tensor %s is a parameter of the worker", name ? name : "?");
    if (k < w->n_params) {
      const struct param *p = &w->params[k];
      CHECK((size_t)p->rows * p->cols == numel, "%s: %d x %d in the worker, %zu in the fixture",
            name, p->rows, p->cols, numel);
      /* the policy: matrices (the embedding too) decay, vectors do not */
      CHECK(p->decay == (json_array_size(shape) == 2), "%s: decay %d", name, p->decay);
      l.at[k] = l.total;
      found++;
    }
    l.total += numel;
  }
  CHECK(found == w->n_params, "the fixture has all %d tensors of the worker (found %d)",
        w->n_params, found);
  if (found != w->n_params) die("cannot map the fixture onto the worker");
  json_decref(list);
  return l;
}

/* a flat fixture vector -> a worker buffer laid out by w->params */
static void scatter(const struct worker *w, const struct layout *l, float *dst, const float *src) {
  for (int k = 0; k < w->n_params; k++)
    memcpy(dst + w->params[k].offset, src + l->at[k],
           (size_t)w->params[k].rows * w->params[k].cols * sizeof(float));
}

/* ||a - b|| / ||b||, with (a - base, b - base) when base is given */
static double rel_l2(const float *a, const float *b, const float *base, size_t n) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < n; i++) {
    double x = a[i], y = b[i];
    if (base) x -= base[i], y -= base[i];
    diff += (x - y) * (x - y);
    norm += y * y;
  }
  return norm > 0 ? sqrt(diff / norm) : sqrt(diff);
}

/* Every tensor of one state buffer against the fixture's; returns the worst error. */
static double compare(const struct worker *w, const struct layout *l, const float *ours,
                      const float *ref, const float *init, double tol, const char *what,
                      const char *run, int step) {
  double worst = 0;
  for (int k = 0; k < w->n_params; k++) {
    const struct param *p = &w->params[k];
    size_t n = (size_t)p->rows * p->cols;
    double e = rel_l2(ours + p->offset, ref + l->at[k], init ? init + l->at[k] : NULL, n);
    CHECK(e <= tol, "%s step %d: %s of %s off by %.2e relative L2 (tol %.0e)", run, step, what,
          p->name, e, tol);
    if (!(e <= worst)) worst = e;
  }
  return worst;
}

static void replay(struct worker *w, const struct layout *l, const char *run,
                   Qwen3__LrSchedule schedule) {
  Qwen3__Optim o = QWEN3__OPTIM__INIT;
  o.lr = meta_num("lr");
  o.min_lr = meta_num("min_lr");
  o.warmup_steps = (int)meta_num("warmup_steps");
  o.schedule = schedule;
  o.beta1 = meta_num("beta1");
  o.beta2 = meta_num("beta2");
  o.eps = meta_num("eps");
  o.weight_decay = meta_num("weight_decay");
  o.grad_clip = meta_num("grad_clip");
  char key[96];
  snprintf(key, sizeof key, "steps.%s", run);
  int steps = (int)meta_num(key);
  snprintf(key, sizeof key, "%s.lr", run);
  double *lr_ref = doubles(key, (size_t)steps);
  snprintf(key, sizeof key, "%s.grad_norm", run);
  double *norm_ref = doubles(key, (size_t)steps);

  /* one stage, one replica: optimizer_step makes no transport call, so no MPI is started */
  struct comm c = {.rank = 0, .world = 1, .pp = 1, .dp = 1, .local_size = 1};
  size_t pf = w->plan.param_floats;
  float *init = flat("init", l->total);
  scatter(w, l, w->weights, init);
  w->be->zero(w->adam_m, pf * sizeof(float));   /* a fresh AdamW, as torch's */
  w->be->zero(w->adam_v, pf * sizeof(float));

  int lr_ok = 1, norm_ok = 1, clipped = 0;
  double worst_state = 0, worst_change = 0;
  for (int step = 1; step <= steps; step++) {
    double lr = lr_schedule(&o, steps, step);
    int same = fabs(lr - lr_ref[step - 1]) <= 0x1p-24 * fabs(lr_ref[step - 1]);
    CHECK(same, "%s step %d: lr %.9g, torch %.9g", run, step, lr, lr_ref[step - 1]);
    lr_ok &= same;

    worker_zero_grads(w);
    snprintf(key, sizeof key, "grad.%d", step);
    float *g = flat(key, l->total);
    scatter(w, l, w->grads, g);
    free(g);
    double norm = optimizer_step(w, 1, &c, &o, lr, step, BY_LAYER_NOTHING);
    double e = fabs(norm - norm_ref[step - 1]) / norm_ref[step - 1];
    CHECK(e <= 1e-6, "%s step %d: gradient norm %.9g, torch %.9g", run, step, norm,
          norm_ref[step - 1]);
    norm_ok &= e <= 1e-6;
    clipped += norm_ref[step - 1] > o.grad_clip;

    snprintf(key, sizeof key, "%s.%d.param", run, step);
    if (!st_find(fixture, key)) continue;
    float *ref = flat(key, l->total);
    double e1 = compare(w, l, w->weights, ref, NULL, STATE_TOL, "parameter", run, step);
    double e2 = compare(w, l, w->weights, ref, init, CHANGE_TOL, "change of the parameter", run,
                        step);
    free(ref);
    snprintf(key, sizeof key, "%s.%d.exp_avg", run, step);
    ref = flat(key, l->total);
    double e3 = compare(w, l, w->adam_m, ref, NULL, STATE_TOL, "exp_avg", run, step);
    free(ref);
    snprintf(key, sizeof key, "%s.%d.exp_avg_sq", run, step);
    ref = flat(key, l->total);
    double e4 = compare(w, l, w->adam_v, ref, NULL, STATE_TOL, "exp_avg_sq", run, step);
    free(ref);
    worst_state = fmax(worst_state, fmax(e1, fmax(e3, e4)));
    worst_change = fmax(worst_change, e2);
  }
  printf("%-8s %d steps (%d clipped): lr %s, gradient norm %s; worst relative L2: state %.1e, "
         "change of a parameter %.1e\n", run, steps, clipped, lr_ok ? "exact" : "WRONG",
         norm_ok ? "ok" : "WRONG", worst_state, worst_change);
  CHECK(clipped > 0 && clipped < steps, "%s: clipping active on some steps, not all", run);
  free(lr_ref), free(norm_ref), free(init);
}

int main(void) {
  char err[512];
  if (st_open(&fixture, FIXTURE, err, sizeof err) != 0)
    die("%s (run tests from the repository root)", err);
  struct qwen3_config cfg = {
    .hidden_size = (int)meta_num("hidden_size"), .num_layers = (int)meta_num("num_layers"),
    .num_heads = (int)meta_num("num_heads"), .num_kv_heads = (int)meta_num("num_kv_heads"),
    .head_dim = (int)meta_num("head_dim"), .intermediate_size = (int)meta_num("intermediate_size"),
    .vocab_size = (int)meta_num("vocab_size"), .rope_theta = 1e6, .rms_norm_eps = 1e-6,
    .tie_embeddings = (int)meta_num("tie_embeddings"), .max_seq_len = 16};
  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, 0, cfg.num_layers, 1, 1, 1, 16, 1, 0, DT_F32);
  struct worker w;
  worker_init(&w, &backend_cpu, &plan);
  struct layout l = map_params(&w);
  CHECK(l.total == plan.param_floats, "fixture and worker hold %zu and %zu floats", l.total,
        plan.param_floats);

  replay(&w, &l, "cosine", QWEN3__LR_SCHEDULE__COSINE);
  replay(&w, &l, "linear", QWEN3__LR_SCHEDULE__LINEAR);
  replay(&w, &l, "constant", QWEN3__LR_SCHEDULE__CONSTANT);

  free(l.at);
  worker_free(&w);
  st_close(fixture);
  return checks_report();
}
