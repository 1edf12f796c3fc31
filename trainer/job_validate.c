/* Every invalid job is refused before any work, with every problem named by its field. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "data/hf_config.h"
#include "trainer/job.h"
#include "trainer/layout.h"

static int n_errors;
static int quiet;   /* ranks other than 0 find the same errors: one copy is enough */

static void complain(const char *fmt, ...) PRINTF_LIKE(1, 2);
static void complain(const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!quiet) fprintf(stderr, "qwen3: invalid job: %s\n", msg);
  n_errors++;
}

static void need_file(const char *field, const char *path) {
  if (!path || !*path) complain("%s: empty path", field);
  else if (access(path, R_OK) != 0) complain("%s: cannot read '%s'", field, path);
}

static void need_dir(const char *field, const char *path) {
  char probe[4096];
  snprintf(probe, sizeof probe, "%s/.", path);
  if (!path || !*path) complain("%s: empty path", field);
  else if (access(probe, R_OK) != 0) complain("%s: cannot read directory '%s'", field, path);
}

#define NEED(cond, ...) \
  do {                  \
    if (!(cond)) complain(__VA_ARGS__); \
  } while (0)

/* The model shape from config.json or from the job's own fields, which must then all be set. */
static void resolve_model(const Qwen3__Model *m, int seq_len, struct qwen3_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  NEED(!m->has_max_seq_len || m->max_seq_len > 0, "model.max_seq_len must be > 0 (is %d)",
       m->max_seq_len);
  if (m->hf_config) {
    NEED(!(m->has_hidden_size || m->has_num_layers || m->has_num_heads || m->has_num_kv_heads ||
           m->has_head_dim || m->has_intermediate_size || m->has_vocab_size ||
           m->has_rope_theta || m->has_rms_norm_eps || m->has_tie_embeddings),
         "model: give either hf_config or the shape fields, not both (hf_config is '%s')",
         m->hf_config);
    char err[1024];
    if (hf_config_load(cfg, m->hf_config, err, sizeof err) != 0) {
      complain("model.hf_config: %s", err);
      return;
    }
    cfg->max_seq_len = m->has_max_seq_len ? m->max_seq_len : seq_len;
    return;
  }
#define REQUIRED(field)                                                                         \
  NEED(m->has_##field, "model." #field " is required (or give model.hf_config, a Hugging Face " \
                       "config.json)")
  REQUIRED(hidden_size);
  REQUIRED(num_layers);
  REQUIRED(num_heads);
  REQUIRED(num_kv_heads);
  REQUIRED(head_dim);
  REQUIRED(intermediate_size);
  REQUIRED(vocab_size);
  REQUIRED(rope_theta);
#undef REQUIRED
  cfg->hidden_size = m->hidden_size;
  cfg->num_layers = m->num_layers;
  cfg->num_heads = m->num_heads;
  cfg->num_kv_heads = m->num_kv_heads;
  cfg->head_dim = m->head_dim;
  cfg->intermediate_size = m->intermediate_size;
  cfg->vocab_size = m->vocab_size;
  cfg->rope_theta = m->rope_theta;
  cfg->rms_norm_eps = m->rms_norm_eps;
  cfg->tie_embeddings = m->tie_embeddings;
  cfg->max_seq_len = m->has_max_seq_len ? m->max_seq_len : seq_len;
}

static void check_shape(const struct qwen3_config *c) {
  NEED(c->hidden_size > 0, "model.hidden_size must be > 0 (is %d)", c->hidden_size);
  NEED(c->num_layers > 0, "model.num_layers must be > 0 (is %d)", c->num_layers);
  NEED(c->num_heads > 0, "model.num_heads must be > 0 (is %d)", c->num_heads);
  NEED(c->num_kv_heads > 0, "model.num_kv_heads must be > 0 (is %d)", c->num_kv_heads);
  if (c->num_heads > 0 && c->num_kv_heads > 0)
    NEED(c->num_heads % c->num_kv_heads == 0,
         "model.num_heads (%d) must be a multiple of model.num_kv_heads (%d) for grouped-query "
         "attention", c->num_heads, c->num_kv_heads);
  NEED(c->head_dim > 0 && c->head_dim % 2 == 0,
       "model.head_dim must be even and > 0 (rotate-half RoPE pairs dim j with j + head_dim/2); "
       "is %d", c->head_dim);
  NEED(c->intermediate_size > 0, "model.intermediate_size must be > 0 (is %d)",
       c->intermediate_size);
  NEED(c->vocab_size > 0, "model.vocab_size must be > 0 (is %d)", c->vocab_size);
  NEED(c->rope_theta > 0 && isfinite(c->rope_theta), "model.rope_theta must be > 0 (is %g)",
       c->rope_theta);
  NEED(c->rms_norm_eps > 0 && c->rms_norm_eps < 1, "model.rms_norm_eps must be in (0, 1) (is %g)",
       c->rms_norm_eps);
}

static void check_parallel(const Job *job, const struct qwen3_config *c, int world) {
  const Qwen3__Parallel *p = job->parallel;
  NEED(p->pipeline_stages >= 1, "parallel.pipeline_stages must be >= 1 (is %d)",
       p->pipeline_stages);
  NEED(p->micro_batches >= 1, "parallel.micro_batches must be >= 1 (is %d)", p->micro_batches);
  if (p->pipeline_stages < 1 || c->num_layers <= 0) return;
  NEED(p->pipeline_stages <= c->num_layers,
       "parallel.pipeline_stages (%d) is more than the model's %d layers: every stage needs at "
       "least one", p->pipeline_stages, c->num_layers);
  if (world > 0)
    NEED(world % p->pipeline_stages == 0,
         "parallel.pipeline_stages (%d) must divide the number of processes (%d): processes = "
         "stages x data-parallel replicas", p->pipeline_stages, world);
  if (p->n_layers_per_stage) {
    char err[512];
    int first[LAYOUT_MAX_STAGES + 1];
    if (layout_split_layers(p->pipeline_stages, c->num_layers, p->layers_per_stage,
                            (int)p->n_layers_per_stage, first, err, sizeof err) != 0)
      complain("%s", err);
  }
  NEED(p->pipeline_stages <= LAYOUT_MAX_STAGES, "parallel.pipeline_stages must be <= %d",
       LAYOUT_MAX_STAGES);
}

static void check_precision(const Job *job, const struct qwen3_config *c) {
  const Qwen3__Precision *p = job->precision;
  NEED(p->bf16_first_layers >= 0 && p->bf16_first_layers <= c->num_layers,
       "precision.bf16_first_layers must be in [0, num_layers=%d] (is %d)", c->num_layers,
       p->bf16_first_layers);
  NEED(p->bf16_last_layers >= -1 && p->bf16_last_layers <= c->num_layers,
       "precision.bf16_last_layers must be -1 (the last 15%%) or in [0, num_layers=%d] (is %d)",
       c->num_layers, p->bf16_last_layers);
  if (p->linear != QWEN3__LINEAR_PRECISION__NVFP4) return;
  /* NVFP4 blocks are 16 wide along every GEMM's reduction dimension, and Wgrad reduces over
   * the tokens of a micro-batch */
  int widths[] = {c->hidden_size, c->num_heads * c->head_dim, c->num_kv_heads * c->head_dim,
                  c->intermediate_size};
  const char *names[] = {"model.hidden_size", "model.num_heads x head_dim",
                         "model.num_kv_heads x head_dim", "model.intermediate_size"};
  for (int i = 0; i < 4; i++)
    NEED(widths[i] % 16 == 0, "precision.linear NVFP4 needs %s (%d) to be a multiple of 16",
         names[i], widths[i]);
  long tokens = (long)job->data->micro_batch_size * job->data->seq_len;
  NEED(tokens % 16 == 0, "precision.linear NVFP4 needs data.micro_batch_size x data.seq_len (%ld) "
       "to be a multiple of 16", tokens);
}

static void check_data(const Job *job, const struct qwen3_config *c) {
  const Qwen3__Data *d = job->data;
  NEED(d->has_seq_len, "data.seq_len is required (tokens per training sequence)");
  if (d->has_seq_len) {
    NEED(d->seq_len > 0, "data.seq_len must be > 0 (is %d)", d->seq_len);
    NEED(c->max_seq_len <= 0 || d->seq_len <= c->max_seq_len,
         "data.seq_len (%d) is longer than model.max_seq_len (%d)", d->seq_len, c->max_seq_len);
  }
  NEED(d->micro_batch_size >= 1, "data.micro_batch_size must be >= 1 (is %d)",
       d->micro_batch_size);
  if (job->train->steps > 0)
    NEED(d->n_train > 0, "data.train: a training job (train.steps = %d) needs at least one "
                         "token shard", job->train->steps);
  for (size_t i = 0; i < d->n_train; i++) {
    char field[64];
    snprintf(field, sizeof field, "data.train[%zu]", i);
    need_file(field, d->train[i]);
  }
  for (size_t i = 0; i < d->n_valid; i++) {
    char field[64];
    snprintf(field, sizeof field, "data.valid[%zu]", i);
    need_file(field, d->valid[i]);
  }
}

static void check_optim(const Job *job) {
  const Qwen3__Optim *o = job->optim;
  NEED(o->lr >= 0 && isfinite(o->lr), "optim.lr must be >= 0 (is %g)", o->lr);
  NEED(o->min_lr >= 0 && o->min_lr <= o->lr, "optim.min_lr must be in [0, optim.lr] (is %g)",
       o->min_lr);
  NEED(o->warmup_steps >= 0, "optim.warmup_steps must be >= 0 (is %d)", o->warmup_steps);
  NEED(o->beta1 >= 0 && o->beta1 < 1, "optim.beta1 must be in [0, 1) (is %g)", o->beta1);
  NEED(o->beta2 >= 0 && o->beta2 < 1, "optim.beta2 must be in [0, 1) (is %g)", o->beta2);
  NEED(o->eps > 0, "optim.eps must be > 0 (is %g)", o->eps);
  NEED(o->weight_decay >= 0, "optim.weight_decay must be >= 0 (is %g)", o->weight_decay);
  NEED(o->grad_clip >= 0, "optim.grad_clip must be >= 0, 0 disables (is %g)", o->grad_clip);
}

static void check_run(const Job *job, const struct qwen3_config *c) {
  NEED(job->train->steps >= 0, "train.steps must be >= 0, 0 evaluates (is %d)", job->train->steps);
  if (job->train->steps == 0)
    NEED(job->data->n_valid > 0 || (job->eval->n_prompts > 0 && job->eval->max_new_tokens > 0),
         "train.steps = 0 asks for an evaluation, but the job has neither data.valid nor "
         "eval.prompts to evaluate");
  NEED(job->train->log_every >= 1, "train.log_every must be >= 1 (is %d)", job->train->log_every);
  NEED(job->output_dir && *job->output_dir, "output_dir must not be empty");
  const Qwen3__Checkpoint *k = job->checkpoint;
  NEED(k->every >= -1,
       "checkpoint.every must be >= -1: 0 saves only at the end, -1 never (is %d)", k->every);
  NEED(k->keep_last >= 0, "checkpoint.keep_last must be >= 0, 0 keeps all (is %d)", k->keep_last);
  NEED(k->resume && *k->resume, "checkpoint.resume must be AUTO, NEVER or a checkpoint directory");
  const Qwen3__Eval *e = job->eval;
  NEED(e->every >= 0, "eval.every must be >= 0 (is %d)", e->every);
  NEED(e->valid_batches >= 0, "eval.valid_batches must be >= 0, 0 = all (is %d)",
       e->valid_batches);
  NEED(e->max_new_tokens >= 0, "eval.max_new_tokens must be >= 0 (is %d)", e->max_new_tokens);
  NEED(e->temperature >= 0, "eval.temperature must be >= 0, 0 is greedy (is %g)", e->temperature);
  NEED(e->top_k >= 0, "eval.top_k must be >= 0, 0 is off (is %d)", e->top_k);
  NEED(e->top_p > 0 && e->top_p <= 1, "eval.top_p must be in (0, 1] (is %g)", e->top_p);
  for (size_t i = 0; i < e->n_prompts; i++) {
    const Qwen3__Prompt *p = e->prompts[i];
    NEED(p->n_ids > 0 || p->user, "eval.prompts[%zu]: give user text or ids", i);
    NEED(!(p->n_ids > 0 && (p->user || p->system)),
         "eval.prompts[%zu]: give either ids or user/system text, not both", i);
    if (p->user) NEED(job->tokenizer, "eval.prompts[%zu] is text: the job needs a tokenizer", i);
    for (size_t k = 0; k < p->n_ids; k++)
      NEED(p->ids[k] >= 0 && p->ids[k] < c->vocab_size,
           "eval.prompts[%zu].ids[%zu] = %d is outside the vocabulary [0, %d)", i, k, p->ids[k],
           c->vocab_size);
  }
  if (job->tokenizer) need_file("tokenizer", job->tokenizer);
  NEED(!(job->init->hf_dir && job->init->checkpoint),
       "init: give either hf_dir or checkpoint, not both");
  if (job->init->hf_dir) need_dir("init.hf_dir", job->init->hf_dir);
  if (job->init->checkpoint) need_dir("init.checkpoint", job->init->checkpoint);
  NEED(job->init->std > 0, "init.std must be > 0 (is %g)", job->init->std);
#ifndef QWEN3_HAVE_CUDA
  NEED(job->backend != QWEN3__BACKEND__CUDA,
       "backend: CUDA, but this build has no CUDA backend (nvcc was not found at build time); "
       "use AUTO or CPU");
#endif
}

void job_validate(const Job *job, int world, int rank, struct qwen3_config *cfg) {
  n_errors = 0;
  quiet = rank != 0;
  resolve_model(job->model, job->data->seq_len, cfg);
  if (n_errors == 0) {
    check_shape(cfg);
    check_parallel(job, cfg, world);
    check_precision(job, cfg);
  }
  check_data(job, cfg);
  check_optim(job);
  check_run(job, cfg);
  if (n_errors) die("the job has %d error%s (listed above); nothing was run", n_errors,
                    n_errors > 1 ? "s" : "");
}
