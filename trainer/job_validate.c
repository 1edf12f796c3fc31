/* Every invalid job is refused before any work, with every problem named by its field or file.
 *
 * Three passes, each run only when the previous found nothing: job_validate (every field against
 * its range and the limits below; every rank), job_validate_files (every input file opened with
 * the run's own readers; rank 0) and job_validate_outputs (output_dir and checkpoint.dir written
 * and locked; rank 0). The problems are collected, not printed: train_main.c lets the ranks
 * agree, the first rank that found any prints them, and every rank finalizes MPI and exits 1. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "data/hf_config.h"
#include "data/loader.h"
#include "data/safetensors.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "trainer/checkpoint.h"
#include "trainer/evaluate.h"
#include "trainer/job.h"
#include "trainer/schedule.h"
#include "trainer/layout.h"

/* Stated limits: far above any Qwen3 (Qwen3-4B: hidden 2560, 36 layers, 32 heads of 128,
 * intermediate 9728, vocabulary 151936, 262144 positions), low enough that every product the
 * engine forms in int or size_t arithmetic stays far from overflow. */
#define MAX_HIDDEN (1 << 16)
#define MAX_INTERMEDIATE (1 << 18)
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 1024
#define MAX_VOCAB (1 << 24)
#define MAX_SEQ_LEN (1 << 20)
#define MAX_MICRO_BATCH_TOKENS (1 << 24)   /* data.micro_batch_size x data.seq_len */
#define MAX_STEPS 1000000000
#define MAX_SHARDS 100000
#define MAX_PROMPTS 8192   /* generation tags prompts as p and 16384 + p, below MPI's 32767 */
#define MAX_STOP_IDS 61    /* a 64-slot header: the count, <|im_end|>, <|endoftext|>, these */
#define MAX_PATH_LEN 2048

/* ---- the problem list ------------------------------------------------------------------------ */

static char *problems;   /* one line each */
static size_t problems_len;
static int n_problems;

void job_problem(const char *fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  size_t n = strlen(msg);
  problems = xrealloc(problems, problems_len + n + 2);
  memcpy(problems + problems_len, msg, n);
  problems[problems_len + n] = '\n';
  problems_len += n + 1;
  problems[problems_len] = 0;
  n_problems++;
}

int job_problem_count(void) { return n_problems; }

void job_problems_print(void) {
  if (!n_problems) return;
  fflush(stdout);
  for (char *line = problems; *line;) {
    char *end = strchr(line, '\n');
    fprintf(stderr, "qwen3: invalid job: %.*s\n", (int)(end - line), line);
    line = end + 1;
  }
  fprintf(stderr, "qwen3: error: the job has %d error%s (listed above); nothing was run\n",
          n_problems, n_problems > 1 ? "s" : "");
  fflush(stderr);
}

#define complain job_problem
#define NEED(cond, ...) \
  do {                  \
    if (!(cond)) complain(__VA_ARGS__); \
  } while (0)

static void need_path(const char *field, const char *path) {
  if (!path || !*path) complain("%s: empty path", field);
  else if (strlen(path) > MAX_PATH_LEN)
    complain("%s: the path is %zu bytes long; at most %d are allowed", field, strlen(path),
             MAX_PATH_LEN);
}

static void need_file(const char *field, const char *path) {
  struct stat st;
  need_path(field, path);
  if (!path || !*path || strlen(path) > MAX_PATH_LEN) return;
  if (access(path, R_OK) != 0)
    complain("%s: cannot read '%s': %s", field, path, strerror(errno));
  else if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
    complain("%s: '%s' is not a regular file", field, path);
}

static void need_dir(const char *field, const char *path) {
  struct stat st;
  need_path(field, path);
  if (!path || !*path || strlen(path) > MAX_PATH_LEN) return;
  if (stat(path, &st) != 0) complain("%s: cannot read directory '%s': %s", field, path,
                                     strerror(errno));
  else if (!S_ISDIR(st.st_mode)) complain("%s: '%s' is not a directory", field, path);
  else if (access(path, R_OK | X_OK) != 0)
    complain("%s: cannot read directory '%s': %s", field, path, strerror(errno));
}

/* ---- every field of every section: enums in range, no NaN or infinity ------------------------- */

/* A .pb job may hold any value: an enum number the schema does not name, a NaN double (--set
 * refuses both, a binary job does not). Walks every field of every section. */
static void check_values(const ProtobufCMessage *msg, const char *prefix) {
  const ProtobufCMessageDescriptor *d = msg->descriptor;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    const char *base = (const char *)msg + f->offset;
    char name[256];
    snprintf(name, sizeof name, "%s%s%s", prefix, *prefix ? "." : "", f->name);
    size_t n = 1;
    const char *values = base;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
      n = *(const size_t *)((const char *)msg + f->quantifier_offset);
      values = *(const char *const *)base;
    }
    for (size_t k = 0; k < n; k++) {
      char item[300];
      if (f->label == PROTOBUF_C_LABEL_REPEATED) snprintf(item, sizeof item, "%s[%zu]", name, k);
      else snprintf(item, sizeof item, "%s", name);
      switch (f->type) {
      case PROTOBUF_C_TYPE_DOUBLE: {
        double v = ((const double *)values)[k];
        NEED(isfinite(v), "%s is %g; only finite numbers are allowed", item, v);
        break;
      }
      case PROTOBUF_C_TYPE_ENUM: {
        int v = ((const int *)values)[k];
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        if (!protobuf_c_enum_descriptor_get_value(ed, v)) {
          char allowed[512];
          size_t used = 0;
          allowed[0] = 0;
          for (unsigned e = 0; e < ed->n_values && used < sizeof allowed; e++)
            used += (size_t)snprintf(allowed + used, sizeof allowed - used, "%s%s", e ? "|" : "",
                                     ed->values[e].name);
          complain("%s is %d, which names no value; allowed values are %s", item, v, allowed);
        }
        break;
      }
      case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = ((const ProtobufCMessage *const *)values)[k];
        if (sub) check_values(sub, item);
        break;
      }
      default:
        break;
      }
    }
  }
}

/* ---- the model -------------------------------------------------------------------------------- */

static int has_shape_fields(const Qwen3__Model *m) {
  return m->has_hidden_size || m->has_num_layers || m->has_num_heads || m->has_num_kv_heads ||
         m->has_head_dim || m->has_intermediate_size || m->has_vocab_size || m->has_rope_theta ||
         m->has_rms_norm_eps || m->has_tie_embeddings;
}

/* init.hf_dir's config.json must describe the model the job builds: its weights were trained
 * with its rope_theta and rms_norm_eps, and the job's (or their defaults) would silently differ.
 * Without a model shape in the job, the shape is taken from it. */
static void check_hf_dir_config(const Job *job, struct qwen3_config *cfg, int shape_given) {
  const char *dir = job->init->hf_dir;
  char path[4200], err[1024];
  snprintf(path, sizeof path, "%s/config.json", dir);
  struct qwen3_config hf;
  if (hf_config_load(&hf, path, err, sizeof err) != 0) {
    complain("init.hf_dir: a Hugging Face model directory holds its config.json: %s", err);
    return;
  }
  if (!shape_given) {
    int max_seq_len = cfg->max_seq_len;
    *cfg = hf;
    cfg->max_seq_len = max_seq_len;
    return;
  }
  const struct {
    const char *key, *field;
    double hf, job;
  } f[] = {{"hidden_size", "model.hidden_size", hf.hidden_size, cfg->hidden_size},
           {"num_hidden_layers", "model.num_layers", hf.num_layers, cfg->num_layers},
           {"num_attention_heads", "model.num_heads", hf.num_heads, cfg->num_heads},
           {"num_key_value_heads", "model.num_kv_heads", hf.num_kv_heads, cfg->num_kv_heads},
           {"head_dim", "model.head_dim", hf.head_dim, cfg->head_dim},
           {"intermediate_size", "model.intermediate_size", hf.intermediate_size,
            cfg->intermediate_size},
           {"vocab_size", "model.vocab_size", hf.vocab_size, cfg->vocab_size},
           {"rope_theta", "model.rope_theta", hf.rope_theta, cfg->rope_theta},
           {"rms_norm_eps", "model.rms_norm_eps", hf.rms_norm_eps, cfg->rms_norm_eps},
           {"tie_word_embeddings", "model.tie_embeddings", hf.tie_embeddings,
            cfg->tie_embeddings}};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
    NEED(f[i].hf == f[i].job,
         "init.hf_dir: %s says %s %.9g, but the job's %s is %.9g: the weights belong to the "
         "model of config.json; give model.hf_config=%s (or drop the model shape fields), or set "
         "%s to %.9g", path, f[i].key, f[i].hf, f[i].field, f[i].job, path, f[i].field, f[i].hf);
}

/* The model shape from config.json, from init.hf_dir or from the job's own fields. */
static void resolve_model(const Job *job, int seq_len, struct qwen3_config *cfg) {
  const Qwen3__Model *m = job->model;
  memset(cfg, 0, sizeof *cfg);
  NEED(!m->has_max_seq_len || (m->max_seq_len > 0 && m->max_seq_len <= MAX_SEQ_LEN),
       "model.max_seq_len must be in [1, %d] (is %d)", MAX_SEQ_LEN, m->max_seq_len);
  cfg->max_seq_len = m->has_max_seq_len ? m->max_seq_len : seq_len;
  int from_hf_dir = job->init->hf_dir && !m->hf_config && !has_shape_fields(m);
  if (m->hf_config) {
    need_path("model.hf_config", m->hf_config);
    NEED(!has_shape_fields(m),
         "model: give either hf_config or the shape fields, not both (hf_config is '%s')",
         m->hf_config);
    char err[1024];
    int max_seq_len = cfg->max_seq_len;
    if (hf_config_load(cfg, m->hf_config, err, sizeof err) != 0) {
      complain("model.hf_config: %s", err);
      return;
    }
    cfg->max_seq_len = max_seq_len;
  } else if (!from_hf_dir) {
#define REQUIRED(field)                                                                         \
  NEED(m->has_##field, "model." #field " is required (or give model.hf_config, a Hugging Face " \
                       "config.json, or init.hf_dir)")
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
  }
  if (job->init->hf_dir && job_problem_count() == 0 && strlen(job->init->hf_dir) <= MAX_PATH_LEN)
    check_hf_dir_config(job, cfg, !from_hf_dir);
}

static void check_shape(const struct qwen3_config *c) {
  NEED(c->hidden_size > 0 && c->hidden_size <= MAX_HIDDEN,
       "model.hidden_size must be in [1, %d] (is %d)", MAX_HIDDEN, c->hidden_size);
  NEED(c->num_layers > 0 && c->num_layers <= MAX_LAYERS,
       "model.num_layers must be in [1, %d] (is %d)", MAX_LAYERS, c->num_layers);
  NEED(c->num_heads > 0 && c->num_heads <= MAX_HEADS, "model.num_heads must be in [1, %d] (is %d)",
       MAX_HEADS, c->num_heads);
  NEED(c->num_kv_heads > 0 && c->num_kv_heads <= MAX_HEADS,
       "model.num_kv_heads must be in [1, %d] (is %d)", MAX_HEADS, c->num_kv_heads);
  if (c->num_heads > 0 && c->num_kv_heads > 0)
    NEED(c->num_heads % c->num_kv_heads == 0,
         "model.num_heads (%d) must be a multiple of model.num_kv_heads (%d) for grouped-query "
         "attention", c->num_heads, c->num_kv_heads);
  NEED(c->head_dim > 0 && c->head_dim % 2 == 0 && c->head_dim <= MAX_HEAD_DIM,
       "model.head_dim must be even and in [2, %d] (rotate-half RoPE pairs dim j with j + "
       "head_dim/2); is %d", MAX_HEAD_DIM, c->head_dim);
  NEED(c->intermediate_size > 0 && c->intermediate_size <= MAX_INTERMEDIATE,
       "model.intermediate_size must be in [1, %d] (is %d)", MAX_INTERMEDIATE,
       c->intermediate_size);
  NEED(c->vocab_size > 0 && c->vocab_size <= MAX_VOCAB, "model.vocab_size must be in [1, %d] (is %d)",
       MAX_VOCAB, c->vocab_size);
  NEED(c->rope_theta > 0 && isfinite(c->rope_theta), "model.rope_theta must be > 0 and finite (is %g)",
       c->rope_theta);
  NEED(c->rms_norm_eps > 0 && c->rms_norm_eps < 1, "model.rms_norm_eps must be in (0, 1) (is %g)",
       c->rms_norm_eps);
}

/* parallel.virtual_stages: interleaved 1F1B's layout and schedule need these (schedule.h) */
static void check_virtual_stages(const Qwen3__Parallel *p, const struct qwen3_config *c) {
  int v = p->virtual_stages, pp = p->pipeline_stages;
  NEED(v >= 1 && v <= SCHEDULE_MAX_CHUNKS, "parallel.virtual_stages must be in [1, %d] (is %d)",
       SCHEDULE_MAX_CHUNKS, v);
  if (v <= 1 || v > SCHEDULE_MAX_CHUNKS) return;
  NEED(pp >= 2, "parallel.virtual_stages = %d needs parallel.pipeline_stages >= 2 (is %d): the "
       "chunks of one stage would only hand activations to themselves", v, pp);
  NEED(p->schedule == QWEN3__PIPELINE_SCHEDULE__ONE_F_ONE_B,
       "parallel.virtual_stages = %d needs parallel.schedule ONE_F_ONE_B (interleaved 1F1B)", v);
  NEED(pp < 1 || p->micro_batches % pp == 0,
       "parallel.micro_batches (%d) must be a multiple of parallel.pipeline_stages (%d) with "
       "parallel.virtual_stages = %d: interleaved 1F1B sends micro-batches through each chunk "
       "in groups of pipeline_stages", p->micro_batches, pp, v);
  NEED((long long)pp * v <= c->num_layers,
       "parallel.pipeline_stages x parallel.virtual_stages (%d x %d) is more than the model's %d "
       "layers: every chunk needs at least one", pp, v, c->num_layers);
  NEED((long long)pp * v <= LAYOUT_MAX_STAGES,
       "parallel.pipeline_stages x parallel.virtual_stages (%d x %d) is more than %d chunks", pp,
       v, LAYOUT_MAX_STAGES);
  NEED(p->n_layers_per_stage == 0,
       "parallel.layers_per_stage cannot be combined with parallel.virtual_stages = %d: the "
       "layers split evenly over the %d chunks", v, pp * v);
}

static void check_parallel(const Job *job, const struct qwen3_config *c, int world) {
  const Qwen3__Parallel *p = job->parallel;
  NEED(p->pipeline_stages >= 1 && p->pipeline_stages <= LAYOUT_MAX_STAGES,
       "parallel.pipeline_stages must be in [1, %d] (is %d)", LAYOUT_MAX_STAGES,
       p->pipeline_stages);
  NEED(p->micro_batches >= 1 && p->micro_batches <= JOB_MAX_MICRO_BATCHES,
       "parallel.micro_batches must be in [1, %d] (is %d)", JOB_MAX_MICRO_BATCHES,
       p->micro_batches);
  NEED(p->zero == 0 || p->zero == 1, "parallel.zero must be 0 or 1 (is %d)", p->zero);
  if (p->pipeline_stages < 1 || p->pipeline_stages > LAYOUT_MAX_STAGES || c->num_layers <= 0)
    return;
  NEED(p->pipeline_stages <= c->num_layers,
       "parallel.pipeline_stages (%d) is more than the model's %d layers: every stage needs at "
       "least one", p->pipeline_stages, c->num_layers);
  if (world > 0)
    NEED(world % p->pipeline_stages == 0,
         "parallel.pipeline_stages (%d) must divide the number of processes (%d): processes = "
         "stages x data-parallel replicas", p->pipeline_stages, world);
  check_virtual_stages(p, c);
  if (p->n_layers_per_stage && p->pipeline_stages <= c->num_layers) {
    char err[512];
    int first[LAYOUT_MAX_STAGES + 1];
    if (p->n_layers_per_stage > LAYOUT_MAX_STAGES)
      complain("parallel.layers_per_stage lists %zu stages; at most %d are allowed",
               p->n_layers_per_stage, LAYOUT_MAX_STAGES);
    else if (layout_split_layers(p->pipeline_stages, c->num_layers, p->layers_per_stage,
                                 (int)p->n_layers_per_stage, first, err, sizeof err) != 0)
      complain("%s", err);
  }
}

static void check_precision(const Job *job, const struct qwen3_config *c) {
  const Qwen3__Precision *p = job->precision;
  NEED(p->bf16_first_layers >= -1 && p->bf16_first_layers <= c->num_layers,
       "precision.bf16_first_layers must be -1 (the first 2 blocks) or in [0, num_layers=%d] "
       "(is %d)", c->num_layers, p->bf16_first_layers);
  NEED(p->bf16_last_layers >= -1 && p->bf16_last_layers <= c->num_layers,
       "precision.bf16_last_layers must be -1 (the last 15%%) or in [0, num_layers=%d] (is %d)",
       c->num_layers, p->bf16_last_layers);
  NEED(p->bf16_final_fraction >= 0 && p->bf16_final_fraction <= 1,
       "precision.bf16_final_fraction must be in [0, 1] (is %g)", p->bf16_final_fraction);
  NEED(p->bf16_final_fraction == 0 || p->linear == QWEN3__LINEAR_PRECISION__NVFP4,
       "precision.bf16_final_fraction (%g) switches NVFP4 linears to BF16 late in training; "
       "precision.linear is not NVFP4, so there is nothing to switch: leave it 0",
       p->bf16_final_fraction);
  if (p->linear != QWEN3__LINEAR_PRECISION__NVFP4) return;
  /* NVFP4 blocks are 16 wide along every GEMM's reduction dimension, and Wgrad reduces over
   * the tokens of a micro-batch */
  long long widths[] = {c->hidden_size, (long long)c->num_heads * c->head_dim,
                        (long long)c->num_kv_heads * c->head_dim, c->intermediate_size};
  const char *names[] = {"model.hidden_size", "model.num_heads x head_dim",
                         "model.num_kv_heads x head_dim", "model.intermediate_size"};
  for (int i = 0; i < 4; i++)
    NEED(widths[i] % 16 == 0, "precision.linear NVFP4 needs %s (%lld) to be a multiple of 16",
         names[i], widths[i]);
  long long tokens = (long long)job->data->micro_batch_size * job->data->seq_len;
  NEED(tokens % 16 == 0, "precision.linear NVFP4 needs data.micro_batch_size x data.seq_len (%lld) "
       "to be a multiple of 16", tokens);
}

static void check_data(const Job *job, const struct qwen3_config *c) {
  const Qwen3__Data *d = job->data;
  NEED(d->has_seq_len, "data.seq_len is required (tokens per training sequence)");
  if (d->has_seq_len) {
    NEED(d->seq_len > 0 && d->seq_len <= MAX_SEQ_LEN,
         "data.seq_len must be > 0 and at most %d (is %d)", MAX_SEQ_LEN, d->seq_len);
    NEED(c->max_seq_len <= 0 || d->seq_len <= c->max_seq_len,
         "data.seq_len (%d) is longer than model.max_seq_len (%d)", d->seq_len, c->max_seq_len);
  }
  NEED(d->micro_batch_size >= 1, "data.micro_batch_size must be >= 1 (is %d)",
       d->micro_batch_size);
  long long tokens = (long long)d->micro_batch_size * d->seq_len;
  NEED(tokens <= MAX_MICRO_BATCH_TOKENS,
       "data.micro_batch_size x data.seq_len is %lld tokens; at most %d are allowed", tokens,
       MAX_MICRO_BATCH_TOKENS);
  if (job->train->steps > 0)
    NEED(d->n_train > 0, "data.train: a training job (train.steps = %d) needs at least one "
                         "token shard", job->train->steps);
  NEED(d->n_train <= MAX_SHARDS && d->n_valid <= MAX_SHARDS,
       "data.train and data.valid may list at most %d shards each (they list %zu and %zu)",
       MAX_SHARDS, d->n_train, d->n_valid);
  for (size_t i = 0; i < d->n_train && i < MAX_SHARDS; i++) {
    char field[64];
    snprintf(field, sizeof field, "data.train[%zu]", i);
    need_file(field, d->train[i]);
  }
  for (size_t i = 0; i < d->n_valid && i < MAX_SHARDS; i++) {
    char field[64];
    snprintf(field, sizeof field, "data.valid[%zu]", i);
    need_file(field, d->valid[i]);
  }
}

static void check_optim(const Job *job) {
  const Qwen3__Optim *o = job->optim;
  NEED(o->lr >= 0, "optim.lr must be >= 0 (is %g)", o->lr);
  NEED(o->min_lr >= 0 && o->min_lr <= o->lr, "optim.min_lr must be in [0, optim.lr] (is %g)",
       o->min_lr);
  NEED(o->warmup_steps >= 0, "optim.warmup_steps must be >= 0 (is %d)", o->warmup_steps);
  NEED(o->beta1 >= 0 && o->beta1 < 1, "optim.beta1 must be in [0, 1) (is %g)", o->beta1);
  NEED(o->beta2 >= 0 && o->beta2 < 1, "optim.beta2 must be in [0, 1) (is %g)", o->beta2);
  NEED(o->eps > 0 && o->eps < 1, "optim.eps must be in (0, 1) (is %g)", o->eps);
  NEED(o->weight_decay >= 0 && o->weight_decay <= 1, "optim.weight_decay must be in [0, 1] (is %g)",
       o->weight_decay);
  NEED(o->grad_clip >= 0, "optim.grad_clip must be >= 0, 0 disables (is %g)", o->grad_clip);
}

static void check_eval(const Job *job, const struct qwen3_config *c) {
  const Qwen3__Eval *e = job->eval;
  NEED(e->every >= 0, "eval.every must be >= 0 (is %d)", e->every);
  NEED(e->valid_batches >= 0, "eval.valid_batches must be >= 0, 0 = all (is %d)",
       e->valid_batches);
  /* a completion and its prompt (at least one token) fit the model's positions and KV cache */
  NEED(e->max_new_tokens >= 0 && e->max_new_tokens <= MAX_SEQ_LEN,
       "eval.max_new_tokens must be in [0, %d] (is %d)", MAX_SEQ_LEN, e->max_new_tokens);
  if (e->n_prompts > 0 && e->max_new_tokens >= 0)
    NEED(c->max_seq_len <= 0 || e->max_new_tokens < c->max_seq_len,
         "eval.max_new_tokens must be in [0, model.max_seq_len - 1 = %d] (is %d): prompt and "
         "completion share the model's %d positions", c->max_seq_len - 1, e->max_new_tokens,
         c->max_seq_len);
  NEED(e->temperature >= 0, "eval.temperature must be >= 0, 0 is greedy (is %g)", e->temperature);
  NEED(e->top_k >= 0 && e->top_k <= c->vocab_size,
       "eval.top_k must be in [0, model.vocab_size = %d], 0 is off (is %d)", c->vocab_size,
       e->top_k);
  NEED(e->top_p > 0 && e->top_p <= 1, "eval.top_p must be in (0, 1] (is %g)", e->top_p);
  NEED(e->kv_tolerance >= 0, "eval.kv_tolerance must be >= 0 (is %g)", e->kv_tolerance);
  NEED(e->n_stop_ids <= MAX_STOP_IDS, "eval.stop_ids lists %zu ids; at most %d are allowed",
       e->n_stop_ids, MAX_STOP_IDS);
  for (size_t i = 0; i < e->n_stop_ids; i++)
    NEED(e->stop_ids[i] >= 0 && e->stop_ids[i] < c->vocab_size,
         "eval.stop_ids[%zu] = %d is outside the vocabulary [0, %d)", i, e->stop_ids[i],
         c->vocab_size);
  NEED(e->n_prompts <= MAX_PROMPTS, "eval.prompts lists %zu prompts; at most %d are allowed",
       e->n_prompts, MAX_PROMPTS);
  for (size_t i = 0; i < e->n_prompts && i < MAX_PROMPTS; i++) {
    const Qwen3__Prompt *p = e->prompts[i];
    NEED(p->n_ids > 0 || p->user, "eval.prompts[%zu]: give user text or ids", i);
    NEED(!(p->n_ids > 0 && (p->user || p->system)),
         "eval.prompts[%zu]: give either ids or user/system text, not both", i);
    if (p->user) NEED(job->tokenizer, "eval.prompts[%zu] is text: the job needs a tokenizer", i);
    if (p->n_ids > 0 && e->max_new_tokens >= 0 && c->max_seq_len > 0)
      NEED((long long)p->n_ids + e->max_new_tokens <= c->max_seq_len,
           "eval.prompts[%zu]: %zu prompt ids + eval.max_new_tokens %d is more than "
           "model.max_seq_len %d", i, p->n_ids, e->max_new_tokens, c->max_seq_len);
    int bad = 0;
    for (size_t k = 0; k < p->n_ids && bad < 3; k++)
      if (p->ids[k] < 0 || p->ids[k] >= c->vocab_size) {
        complain("eval.prompts[%zu].ids[%zu] = %d is outside the vocabulary [0, %d)", i, k,
                 p->ids[k], c->vocab_size);
        bad++;
      }
  }
}

static void check_run(const Job *job) {
  NEED(job->train->steps >= 0 && job->train->steps <= MAX_STEPS,
       "train.steps must be in [0, %d], 0 evaluates (is %d)", MAX_STEPS, job->train->steps);
  if (job->train->steps == 0)
    NEED(job->data->n_valid > 0 || (job->eval->n_prompts > 0 && job->eval->max_new_tokens > 0),
         "train.steps = 0 asks for an evaluation, but the job has neither data.valid nor "
         "eval.prompts to evaluate");
  NEED(job->train->log_every >= 1, "train.log_every must be >= 1 (is %d)", job->train->log_every);
  need_path("output_dir", job->output_dir);
  const Qwen3__Checkpoint *k = job->checkpoint;
  if (k->dir) need_path("checkpoint.dir", k->dir);
  NEED(k->every >= -1,
       "checkpoint.every must be >= -1: 0 saves only at the end, -1 never (is %d)", k->every);
  NEED(k->keep_last >= 0, "checkpoint.keep_last must be >= 0, 0 keeps all (is %d)", k->keep_last);
  NEED(k->resume && *k->resume, "checkpoint.resume must be AUTO, NEVER or a checkpoint directory");
  if (k->resume && strcmp(k->resume, "AUTO") && strcmp(k->resume, "NEVER"))
    need_path("checkpoint.resume (AUTO, NEVER or a checkpoint directory)", k->resume);
  if (job->tokenizer) need_file("tokenizer", job->tokenizer);
  NEED(!(job->init->hf_dir && job->init->checkpoint),
       "init: give either hf_dir or checkpoint, not both");
  if (job->init->hf_dir) need_dir("init.hf_dir", job->init->hf_dir);
  if (job->init->checkpoint) need_dir("init.checkpoint", job->init->checkpoint);
  NEED(job->init->std > 0 && job->init->std <= 1, "init.std must be in (0, 1] (is %g)",
       job->init->std);
#ifndef QWEN3_HAVE_CUDA
  NEED(job->backend != QWEN3__BACKEND__CUDA,
       "backend: CUDA, but this build has no CUDA backend (nvcc was not found at build time); "
       "use AUTO or CPU");
#endif
}

int job_validate(const Job *job, int world, struct qwen3_config *cfg) {
  int before = job_problem_count();
  check_values(&job->base, "");
  if (job_problem_count() > before) {   /* NaN or unnamed enums: nothing below can be trusted */
    memset(cfg, 0, sizeof *cfg);
    return job_problem_count() - before;
  }
  resolve_model(job, job->data->seq_len, cfg);
  if (job_problem_count() == before) {
    check_shape(cfg);
    if (job_problem_count() == before) {
      check_parallel(job, cfg, world);
      check_precision(job, cfg);
      check_eval(job, cfg);
    }
  }
  check_data(job, cfg);
  check_optim(job);
  check_run(job);
  return job_problem_count() - before;
}

/* ---- input files, through the readers the run uses --------------------------------------------- */

/* training: each shard must give a sample (packed ones with data.pack), as loader_open asks */
static void check_shards(char *const *paths, size_t n, const char *field, int seq,
                         const struct qwen3_config *c, int training, int pack) {
  int masked0 = -1;
  for (size_t i = 0; i < n; i++) {
    struct shard s;
    char err[1024];
    if (shard_load(&s, paths[i], err, sizeof err) != 0) {
      complain("%s[%zu]: %s", field, i, err);
      continue;
    }
    NEED(s.vocab_size <= (uint32_t)c->vocab_size,
         "%s[%zu]: %s was built for a vocabulary of %u tokens; the model has %d", field, i,
         paths[i], s.vocab_size, c->vocab_size);
    int masked = s.loss_mask != NULL;
    if (masked0 < 0) masked0 = masked;
    else NEED(masked == masked0, "%s[%zu]: %s %s a loss mask but %s[0] does%s: mix chat and "
              "plain shards in separate runs", field, i, paths[i], masked ? "has" : "has no",
              field, masked0 ? "" : " not");
    if (training && loader_shard_check(&s, seq, pack, err, sizeof err) != 0)
      complain("%s[%zu]: %s %s", field, i, paths[i], err);
    shard_free(&s);
  }
}

/* The text prompts through the job's tokenizer and chat template: each must fit, with
 * eval.max_new_tokens, in the model's positions. */
static void check_tokenizer(const Job *job, const struct qwen3_config *c) {
  char err[1024];
  struct tokenizer *tok = tokenizer_load(job->tokenizer, err, sizeof err);
  if (!tok) {
    complain("tokenizer: %s", err);
    return;
  }
  NEED(tokenizer_vocab_size(tok) <= (uint32_t)c->vocab_size,
       "tokenizer: %s has %u tokens; the model's vocabulary (model.vocab_size) has only %d",
       job->tokenizer, tokenizer_vocab_size(tok), c->vocab_size);
  const Qwen3__Eval *e = job->eval;
  for (size_t p = 0; p < e->n_prompts; p++) {
    const Qwen3__Prompt *q = e->prompts[p];
    if (!q->user) continue;
    int32_t *ids = NULL;
    size_t n = 0;
    if (eval_prompt_ids(q, tok, &ids, &n, err, sizeof err) != 0)
      complain("eval.prompts[%zu]: %s", p, err);
    else
      NEED((long long)n + e->max_new_tokens <= c->max_seq_len,
           "eval.prompts[%zu]: %zu prompt tokens + eval.max_new_tokens %d is more than "
           "model.max_seq_len %d", p, n, e->max_new_tokens, c->max_seq_len);
    free(ids);
  }
  tokenizer_free(tok);
}

/* A checkpoint to load: its run state and shape read now, not after the model is built. */
static void check_checkpoint(const char *field, const char *path, const struct qwen3_config *c) {
  char err[1024];
  struct ckpt *ck;
  if (ckpt_open(&ck, path, err, sizeof err) != 0) {
    complain("%s: %s", field, err);
    return;
  }
  /* the same words as checkpoint.c's check when it loads: the shape, before the model is built */
  const struct qwen3_config *h = &ckpt_get_state(ck)->config;
  const struct {
    const char *key;
    int have, want;
  } f[] = {{"hidden_size", h->hidden_size, c->hidden_size},
           {"num_hidden_layers", h->num_layers, c->num_layers},
           {"num_attention_heads", h->num_heads, c->num_heads},
           {"num_key_value_heads", h->num_kv_heads, c->num_kv_heads},
           {"head_dim", h->head_dim, c->head_dim},
           {"intermediate_size", h->intermediate_size, c->intermediate_size},
           {"vocab_size", h->vocab_size, c->vocab_size},
           {"tie_word_embeddings", h->tie_embeddings, c->tie_embeddings}};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
    NEED(f[i].have == f[i].want, "%s: %s/model.h5: a checkpoint of another model shape: its %s "
         "is %d, the job's model has %d", field, ckpt_dir(ck), f[i].key, f[i].have, f[i].want);
  ckpt_close(ck);
}

int job_validate_files(const Job *job, const struct qwen3_config *cfg) {
  int before = job_problem_count();
  const Qwen3__Data *d = job->data;
  if (job->tokenizer) check_tokenizer(job, cfg);
  check_shards(d->train, d->n_train, "data.train", d->seq_len, cfg, 1, d->pack);
  check_shards(d->valid, d->n_valid, "data.valid", d->seq_len, cfg, 0, 0);
  if (job->init->hf_dir) {
    char err[1024];
    struct st_model *m;
    if (st_model_open(&m, job->init->hf_dir, err, sizeof err) != 0)
      complain("init.hf_dir: %s", err);
    else
      st_model_close(m);
  }
  if (job->init->checkpoint) check_checkpoint("init.checkpoint", job->init->checkpoint, cfg);
  const char *resume = job->checkpoint->resume;
  if (!strcmp(resume, "AUTO")) {
    char root[4096], dir[4096], err[1024];
    checkpoint_root(job, root, sizeof root);
    int found = ckpt_find_latest(root, dir, sizeof dir, err, sizeof err);
    if (found < 0) complain("checkpoint.resume AUTO: %s", err);
    else if (found > 0) check_checkpoint("checkpoint.resume AUTO", dir, cfg);
  } else if (strcmp(resume, "NEVER")) {
    check_checkpoint("checkpoint.resume", resume, cfg);
  }
  return job_problem_count() - before;
}

/* ---- outputs ------------------------------------------------------------------------------------ */

int job_validate_outputs(const Job *job) {
  int before = job_problem_count();
  char err[1024];
  if (make_dirs(job->output_dir) != 0)
    complain("output_dir: cannot create '%s': %s", job->output_dir, strerror(errno));
  else if (probe_writable(job->output_dir, err, sizeof err) != 0)
    complain("output_dir: %s", err);
  if (job_problem_count() == before && job->train->steps > 0 &&
      checkpoint_prepare(job, err, sizeof err) != 0)
    complain("%s", err);
  return job_problem_count() - before;
}
