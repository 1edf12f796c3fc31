#define _POSIX_C_SOURCE 200809L
#include "trainer/train.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/loader.h"
#include "trainer/checkpoint.h"
#include "trainer/evaluate.h"
#include "trainer/layout.h"
#include "trainer/optim.h"
#include "trainer/output.h"
#include "trainer/plan.h"
#include "trainer/schedule.h"
#include "worker/block.h"

static enum schedule_kind schedule_kind_of(const Job *job) {
  return job->parallel->schedule == QWEN3__PIPELINE_SCHEDULE__GPIPE ? SCHEDULE_GPIPE
                                                                    : SCHEDULE_1F1B;
}

void stage_plan(struct worker_plan *p, const Job *job, const struct qwen3_config *cfg, int pp,
                int stage, int chunk, enum dtype act) {
  const Qwen3__Parallel *par = job->parallel;
  int v = par->virtual_stages, first[LAYOUT_MAX_STAGES + 1];
  char err[512];
  /* the model chunks: one per stage, or pp x v (at most LAYOUT_MAX_STAGES) split evenly
   * (job_validate.c) */
  if (layout_split_layers(pp * v, cfg->num_layers, par->layers_per_stage,
                          (int)par->n_layers_per_stage, first, err, sizeof err) != 0)
    die("%s", err);
  struct schedule s;
  schedule_build(&s, schedule_kind_of(job), pp, v, par->micro_batches, stage);
  int k = chunk * pp + stage;
  worker_plan_make(p, cfg, first[k], first[k + 1] - first[k], k == 0, k == pp * v - 1,
                   job->data->micro_batch_size, job->data->seq_len, s.max_slots[chunk],
                   (par->recompute ? RECOMPUTE_LAYER : 0) |
                       (par->recompute_norms ? RECOMPUTE_NORMS : 0) |
                       (par->recompute_swiglu ? RECOMPUTE_SWIGLU : 0),
                   act);
  schedule_free(&s);
  const Qwen3__Precision *prec = job->precision;
  if (prec->linear == QWEN3__LINEAR_PRECISION__NVFP4) {
    struct nvfp4_policy policy = {
      .first_layer = nvfp4_bf16_first_layers(prec, cfg->num_layers),
      .end_layer = cfg->num_layers - nvfp4_bf16_last_layers(prec, cfg->num_layers),
      .rht = prec->rht, .stochastic = prec->stochastic_rounding, .weight_2d = prec->weight_2d,
      .seed = job->init->seed, .packed_decode = job->eval->packed_nvfp4,
    };
    worker_plan_nvfp4(p, &policy);
  }
}

int nvfp4_bf16_first_layers(const Qwen3__Precision *prec, int num_layers) {
  /* the recipe's optional first 1-2 blocks in high precision: 2, and one per 8 blocks in small
   * models, where two would be a large share (models under 8 blocks, the tests', keep none) */
  if (prec->bf16_first_layers >= 0) return prec->bf16_first_layers;
  return num_layers / 8 < 2 ? num_layers / 8 : 2;
}

int nvfp4_stored_first_layers(const Qwen3__Precision *prec, int num_layers) {
  return prec->has_bf16_first_layers ? nvfp4_bf16_first_layers(prec, num_layers) : 0;
}

int nvfp4_bf16_last_layers(const Qwen3__Precision *prec, int num_layers) {
  /* the recipe keeps the last ~15% of blocks in high precision */
  return prec->bf16_last_layers >= 0 ? prec->bf16_last_layers : (num_layers * 15 + 99) / 100;
}

/* What eval.prompts' generation takes on top of the table: every prompt decodes together, so
 * the KV cache holds all of them at the longest one's length, and NVFP4 layers their weights
 * packed for decoding where the backend decodes from them, for a generation of at most
 * NVFP4_PACKED_DECODE_ROWS prompts (worker.c kv_cache_bytes). */
static void print_generation_memory(const Job *job, const struct qwen3_config *cfg,
                                    const struct comm *c, enum dtype act,
                                    const struct backend *be) {
  const Qwen3__Eval *e = job->eval;
  if (e->n_prompts == 0 || e->max_new_tokens <= 0) return;
  int n = (int)e->n_prompts, prompt = eval_longest_prompt(job), len = prompt + e->max_new_tokens;
  if (!e->kv_cache) {
    printf("generation (eval.prompts): %d sequences of up to %d tokens, no KV cache "
           "(eval.kv_cache false: every token replays its whole sequence)\n", n, len);
    return;
  }
  size_t most = 0;
  int packed = 0;
  for (int s = 0; s < c->pp; s++) {   /* replica 0 generates */
    size_t bytes = 0;
    for (int k = 0; k < job->parallel->virtual_stages; k++) {
      struct worker_plan p;
      stage_plan(&p, job, cfg, c->pp, s, k, act);
      bytes += kv_cache_bytes(&p, len, n, be);
      packed |= kv_packed_bytes(&p, n, be) > 0;
    }
    if (bytes > most) most = bytes;
  }
  printf("generation (eval.prompts): %d sequences of up to %d tokens (the longest prompt, %d "
         "tokens, and eval.max_new_tokens) decode together: their KV cache and a step's logits%s "
         "take up to %.1f MiB more on a rank of replica 0\n", n, len, prompt,
         packed ? " (and the NVFP4 layers' weights, packed for decoding)" : "",
         most / 1048576.0);
}

void print_layout(const Job *job, const struct qwen3_config *cfg, const struct comm *c,
                  enum dtype act, const struct backend *be) {
  if (c->rank != 0) return;
  char chunks[64] = "";
  if (job->parallel->virtual_stages > 1)
    snprintf(chunks, sizeof chunks, " (interleaved: %d chunks per stage)",
             job->parallel->virtual_stages);
  printf("layout: %d processes = %d pipeline stages x %d data-parallel replicas%s, schedule %s%s, "
         "%d micro-batches of %d x %d tokens\n",
         c->world, c->pp, c->dp,
         job->parallel->zero && c->dp > 1 ? " (ZeRO-1: AdamW state sharded over replicas)" : "",
         protobuf_c_enum_descriptor_get_value(&qwen3__pipeline_schedule__descriptor,
                                              job->parallel->schedule)->name,
         chunks, job->parallel->micro_batches, job->data->micro_batch_size, job->data->seq_len);
  printf("%-5s %-6s %-8s %-9s %-14s %-14s %-13s %s\n", "rank", "stage", "replica", "layers",
         "parameters", "weights+adam", "activations", "holds");
  int v = job->parallel->virtual_stages;
  for (int r = 0; r < c->world; r++) {
    /* the rank's chunks: their layers listed, their memory summed */
    char layers[256] = "", nvfp4[256] = "";
    size_t params = 0, state = 0, acts = 0;
    int embedding = 0, head = 0, recompute = 0;
    for (int k = 0; k < v; k++) {
      struct worker_plan p;
      plan_rank(&p, job, cfg, c->pp, c->dp, r, k, act);
      size_t len = strlen(layers);
      snprintf(layers + len, sizeof layers - len, "%s%d-%d", k ? "," : "", p.first_layer,
               p.first_layer + p.n_layers - 1);
      int a = p.nvfp4.first_layer > p.first_layer ? p.nvfp4.first_layer : p.first_layer;
      int b = p.first_layer + p.n_layers < p.nvfp4.end_layer ? p.first_layer + p.n_layers
                                                            : p.nvfp4.end_layer;
      len = strlen(nvfp4);
      if (a < b) snprintf(nvfp4 + len, sizeof nvfp4 - len, "nvfp4 layers %d-%d ", a, b - 1);
      params += p.param_floats;
      state += worker_plan_state_bytes(&p);
      acts += worker_plan_activation_bytes(&p);
      embedding |= p.has_embedding;
      head |= p.has_head;
      recompute |= p.recompute & RECOMPUTE_LAYER;
    }
    printf("%-5d %-6d %-8d %-9s %-14zu %8.1f MiB   %8.1f MiB  %s%s%s%s\n", r, r % c->pp, r / c->pp,
           layers, params, state / 1048576.0, acts / 1048576.0, embedding ? "embedding " : "",
           head ? "final-norm lm-head loss " : "", nvfp4, recompute ? "(recompute)" : "");
  }
  long long global = (long long)job->data->micro_batch_size * job->parallel->micro_batches * c->dp;
  printf("global batch: %lld sequences = %lld tokens per step\n", global,
         global * job->data->seq_len);
  size_t staging = 0;
  for (int s = 0; s < c->pp; s++) {
    size_t stage = 0;
    for (int k = 0; k < v; k++) {
      struct worker_plan p;
      stage_plan(&p, job, cfg, c->pp, s, k, act);
      stage += checkpoint_staging_bytes(&p);
    }
    if (stage > staging) staging = stage;
  }
  printf("checkpoint saves: each rank of replica 0 stages its stage's weights and AdamW moments "
         "in host memory (pinned on a GPU), up to %.1f MiB, held from %s\n", staging / 1048576.0,
         job->checkpoint->every >= 0 ? "the start of the run"
                                     : "a stop signal's save (checkpoint.every -1) on");
  print_generation_memory(job, cfg, c, act, be);
}

/* ---- the step log ---------------------------------------------------------------------------- */

static double resident_mib(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  double kib = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, "VmRSS: %lf", &kib) == 1) break;
  if (f) fclose(f);
  return kib / 1024.0;
}

/* A run resumed at `step` drops the lines a killed run logged after that step's checkpoint, so
 * that every step appears once. */
static void trim_metrics(const char *path, int step) {
  size_t len;
  char *text = read_file(path, &len);
  if (!text) return;   /* no earlier log */
  char tmp[4300];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  struct output out = {.f = fopen(tmp, "w")};
  snprintf(out.path, sizeof out.path, "%.4000s", tmp);
  if (!out.f) die("output_dir: cannot write '%s': %s", tmp, strerror(errno));
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    json_t *o = json_loads(line, 0, NULL);
    json_t *s = o ? json_object_get(o, "step") : NULL;
    if (s && json_integer_value(s) <= step && fprintf(out.f, "%s\n", line) < 0)
      die("output_dir: cannot write '%s': %s", tmp, strerror(errno));
    json_decref(o);
  }
  free(text);
  output_close(&out);
  if (rename(tmp, path) != 0) die("output_dir: cannot rewrite '%s': %s", path, strerror(errno));
}

/* output_dir/metrics.jsonl: one JSON object per logged step and per validation; a resumed run
 * (resumed_step > 0) continues the file. */
static void open_metrics(struct output *o, const Job *job, int resumed_step) {
  if (make_dirs(job->output_dir) != 0)
    die("output_dir: cannot create '%s': %s", job->output_dir, strerror(errno));
  char path[4200];
  snprintf(path, sizeof path, "%s/metrics.jsonl", job->output_dir);
  if (resumed_step > 0) trim_metrics(path, resumed_step);
  output_open(o, job->output_dir, "metrics.jsonl", resumed_step > 0 ? "a" : "w");
}

struct step_log {
  int step, steps, done;   /* done: steps taken by this process (a resumed run starts later) */
  double loss, lr, grad_norm, tokens, seconds, elapsed;
  double device_peak_mib;   /* the backend's peak device memory; < 0 on the CPU */
};

static double device_peak_mib(const struct backend *be) {
  if (!be->memory) return -1;
  size_t in_use, peak;
  be->memory(&in_use, &peak);
  return peak / 1048576.0;
}

static void log_step(struct output *metrics, const struct step_log *s) {
  char eta[32];
  format_duration(eta, sizeof eta, s->elapsed / s->done * (s->steps - s->step));
  double tps = s->tokens / s->seconds;
  char device[48] = "";
  if (s->device_peak_mib >= 0)
    snprintf(device, sizeof device, " | device peak %.0f MiB", s->device_peak_mib);
  info("step %*d/%d | loss %.4f | lr %.3e | grad %.3f | %.0f tok/s | %.0f MiB%s | eta %s",
       (int)floor(log10(s->steps)) + 1, s->step, s->steps, s->loss, s->lr, s->grad_norm, tps,
       resident_mib(), device, eta);
  json_t *o = json_pack("{s:i, s:f, s:f, s:f, s:f, s:f, s:f}", "step", s->step, "loss", s->loss,
                        "lr", s->lr, "grad_norm", s->grad_norm, "tokens_per_s", tps,
                        "step_seconds", s->seconds, "tokens", s->tokens);
  if (s->device_peak_mib >= 0)
    json_object_set_new(o, "device_peak_mib", json_real(s->device_peak_mib));
  output_json_line(metrics, o, 9);
}

/* --timing: rank 0's seconds of the parts of a step, and per stage of the block table, per
 * phase. A synchronize around every part and stage makes each its own time. */
static double part_seconds[3];

static double part_clock(const struct backend *be, int timing) {
  if (!timing) return 0;
  be->synchronize();
  return now_seconds();
}

static void print_stage_times(void) {
  info("per-stage seconds of rank 0: %14s %9s %9s %9s %9s", "", "forward", "backward", "prefill",
       "decode");
  for (int i = 0; i < QWEN3_BLOCK_STAGES; i++)
    info("  %-14s %9.3f %9.3f %9.3f %9.3f", QWEN3_BLOCK[i].name,
         block_stage_seconds[i][PHASE_FORWARD], block_stage_seconds[i][PHASE_BACKWARD],
         block_stage_seconds[i][PHASE_PREFILL], block_stage_seconds[i][PHASE_DECODE]);
}

static void log_validation(struct output *metrics, int step, const struct eval_summary *ev) {
  json_t *o = json_pack("{s:i, s:f, s:f, s:f, s:f}", "step", step, "val_loss", ev->valid_loss,
                        "val_ppl", ev->valid_ppl, "val_tokens", ev->valid_tokens,
                        "val_tokens_per_s", ev->valid_tokens_per_s);
  output_json_line(metrics, o, 9);
}

/* ---- one optimizer step through the pipeline ------------------------------------------------- */

/* One local chunk of the rank (parallel.virtual_stages; the whole stage with one): its worker
 * is run.w[k], the rest is the schedule's bookkeeping for it. A micro-batch's slot is taken at
 * its first action and freed as schedule.h's max_slots counts. */
struct chunk {
  int *live_of;     /* [n_mb]: activation slot, -1 when free */
  int *live_busy;   /* [n_live] */
  int last_bwd;     /* the chunk's last backward in the action list: its gradients are final */
  int first;        /* the model's first chunk: nothing to send back, slots free after backward */
  struct worker *w;
  struct comm *c;   /* for reduce_layer */
};

struct run {
  const Job *job;
  struct comm *c;
  struct worker *w;          /* [v]: one worker per local chunk, as optimizer_step takes them */
  struct chunk *chunk;       /* [v] */
  int v;
  struct schedule sched;
  struct loader train;
  int n_mb, tokens_per_mb;
  int32_t *tokens, *targets, *positions;   /* host, [n_mb][tokens_per_mb] */
  uint64_t stream_base;                     /* samples seen before this step */
  /* What the last backward of a step starts for each layer: the sum over the replicas
   * (parallel.overlap_reduction: replicas, no ZeRO), or, without replicas, the norm's squares */
  enum by_layer by_layer;
};

/* Global sample index of sequence i of micro-batch m of this replica, the run having consumed
 * `seen` samples: the global batch is consecutive in the shuffled stream and replica d takes
 * every dp-th sample, so a run resumed with another layout continues the same stream. */
static uint64_t sample_index(const struct run *r, uint64_t seen, int m, int i) {
  int mbs = r->job->data->micro_batch_size;
  return seen + (uint64_t)(m * mbs + i) * r->c->dp + r->c->replica;
}

static double load_step_batch(struct run *r, uint64_t seen) {
  int mbs = r->job->data->micro_batch_size, seq = r->job->data->seq_len;
  long long count = 0;
  for (int m = 0; m < r->n_mb; m++)
    for (int i = 0; i < mbs; i++) {
      size_t at = (size_t)m * r->tokens_per_mb + (size_t)i * seq;
      loader_shuffled(&r->train, sample_index(r, seen, m, i), r->tokens + at, r->targets + at,
                      r->positions + at);
      for (int t = 0; t < seq; t++) count += r->targets[at + t] >= 0;
    }
  double total = (double)count;
  if (r->c->dp > 1) comm_allreduce_sum_double(r->c, GROUP_DP, &total, 1);
  return total;
}

static int claim_live(struct chunk *k, int mb) {
  if (k->live_of[mb] >= 0) return k->live_of[mb];
  for (int i = 0; i < k->w->plan.n_live; i++)
    if (!k->live_busy[i]) {
      k->live_busy[i] = 1;
      return k->live_of[mb] = i;
    }
  die("schedule holds more micro-batches than its promise of %d", k->w->plan.n_live);
}

static void release_live(struct chunk *k, int mb) {
  k->live_busy[k->live_of[mb]] = 0;
  k->live_of[mb] = -1;
}

/* layer_hooks of the chunk's last backward: the layer's gradients are final; sum them over the
 * replicas now, or, without replicas, their squares for the norm */
static void reduce_layer(void *ctx, int layer) {
  struct chunk *k = ctx;
  optimizer_reduce_layer(k->w, k->c, layer);
}

static void norm_layer(void *ctx, int layer) {
  struct chunk *k = ctx;
  optimizer_norm_layer(k->w, layer);
}

/* Runs this rank's action list, each action on its chunk's worker; returns the summed NLL of
 * the micro-batches (the chunk with the head has it, the others add 0). */
static double run_schedule(struct run *r, float grad_scale) {
  struct comm *c = r->c;
  for (int i = 0; i < r->sched.n; i++) {
    const struct action *a = &r->sched.actions[i];
    struct chunk *k = &r->chunk[a->chunk];
    struct worker *w = k->w;
    int live = claim_live(k, a->mb);
    size_t at = (size_t)a->mb * r->tokens_per_mb, act_bytes = worker_boundary_bytes(w);
    int tag, peer = action_peer(a, c->pp, r->sched.chunks, c->stage, &tag);
    switch (a->kind) {
    case ACT_RECV_ACT:
      comm_recv_tensor(c, worker_input(w, live), act_bytes, peer, tag);
      break;
    case ACT_FWD: {
      struct micro_batch mb = {r->tokens + at, r->targets + at, r->positions + at,
                               r->stream_base + (uint64_t)a->mb};
      worker_forward(w, live, &mb, grad_scale, NULL);
      break;
    }
    case ACT_SEND_ACT:
      comm_send_tensor(c, worker_output(w, live), act_bytes, peer, tag);
      break;
    case ACT_RECV_GRAD:
      comm_recv_tensor(c, w->grad_in, act_bytes, peer, tag);
      break;
    case ACT_BWD: {
      struct layer_hook hook = {r->by_layer == BY_LAYER_REDUCED ? reduce_layer : norm_layer, k};
      worker_backward(w, live, r->by_layer && i == k->last_bwd ? &hook : NULL);
      if (k->first) release_live(k, a->mb);
      break;
    }
    case ACT_SEND_GRAD:
      comm_send_tensor(c, w->grad_out, act_bytes, peer, tag);
      release_live(k, a->mb);
      break;
    }
  }
  comm_wait_sends(c);
  double loss = 0;
  for (int k = 0; k < r->v; k++) loss += worker_take_loss(&r->w[k]);
  return loss;
}

/* SIGTERM, SIGUSR1, SIGUSR2 (Slurm preemption, a scheduler's warning): finish the step,
 * checkpoint on every rank, exit 0. Installed first thing in main, so that a signal during
 * start-up waits for the first step boundary instead of killing the rank. How each reaches the
 * ranks through Open MPI's mpirun: see train.h. */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) { stop_signal = sig; }

static const char *stop_name(void) {
  return stop_signal == SIGTERM ? "SIGTERM" : stop_signal == SIGUSR1 ? "SIGUSR1" : "SIGUSR2";
}

void train_catch_stop_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGUSR1, &sa, NULL);
  sigaction(SIGUSR2, &sa, NULL);
}

/* Weights of a fresh run's n chunks: a checkpoint's, a Hugging Face model's, or seeded random
 * (each tensor by its name, whatever chunk holds it). Returns the step init.checkpoint was saved
 * at (0 for the others): what an evaluation run evaluates. */
static int init_weights(const Job *job, struct worker *chunks, int n) {
  char err[1024];
  if (job->init->checkpoint) return checkpoint_load_weights(job->init->checkpoint, chunks, n);
  for (int k = 0; k < n; k++) {
    if (!job->init->hf_dir)
      worker_init_weights(&chunks[k], job->init->seed, (float)job->init->std);
    else if (worker_load_hf(&chunks[k], job->init->hf_dir, err, sizeof err) != 0)
      die("init.hf_dir: %s", err);
  }
  return 0;
}

void train_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
               const struct backend *be, const struct run_options *opt) {
  struct run r = {.job = job, .c = c, .v = job->parallel->virtual_stages};
  r.n_mb = job->parallel->micro_batches;
  r.w = xcalloc((size_t)r.v, sizeof *r.w);
  r.chunk = xcalloc((size_t)r.v, sizeof *r.chunk);
  for (int k = 0; k < r.v; k++) {
    struct worker_plan plan;
    plan_rank(&plan, job, cfg, c->pp, c->dp, c->rank, k, be->act_dtype());
    worker_init(&r.w[k], be, &plan);
    struct chunk *ch = &r.chunk[k];
    *ch = (struct chunk){.w = &r.w[k], .c = c, .first = c->stage == 0 && k == 0};
    ch->live_of = xmalloc((size_t)r.n_mb * sizeof(int));
    for (int m = 0; m < r.n_mb; m++) ch->live_of[m] = -1;
    ch->live_busy = xcalloc((size_t)plan.n_live, sizeof(int));
  }
  /* a stop signal's save then finds it ready; a run that saves only on a signal
   * (checkpoint.every -1) does not hold it for nothing: such a save allocates it then */
  if (job->checkpoint->every >= 0) checkpoint_stage_ahead(c, r.w, r.v);
  init_weights(job, r.w, r.v);
  struct train_state st = {0};
  int resumed = checkpoint_resume(job, c, r.w, r.v, &st);
  schedule_build(&r.sched, schedule_kind_of(job), c->pp, r.v, r.n_mb, c->stage);
  for (int i = 0; i < r.sched.n; i++)
    if (r.sched.actions[i].kind == ACT_BWD) r.chunk[r.sched.actions[i].chunk].last_bwd = i;
  r.by_layer = c->dp == 1 ? BY_LAYER_NORMED
               : r.w[0].plan.shards == 1 && job->parallel->overlap_reduction ? BY_LAYER_REDUCED
                                                                             : BY_LAYER_NOTHING;
  loader_open(&r.train, job->data->train, (int)job->data->n_train, job->data->seq_len,
              job->data->seed, cfg->vocab_size, "data.train",
              LOADER_TRAINING | (job->data->pack ? LOADER_PACK : 0));
  block_timing = opt->timing;

  r.tokens_per_mb = job->data->micro_batch_size * job->data->seq_len;
  size_t all = (size_t)r.n_mb * r.tokens_per_mb;
  r.tokens = xmalloc(all * sizeof(int32_t));
  r.targets = xmalloc(all * sizeof(int32_t));
  r.positions = xmalloc(all * sizeof(int32_t));

  struct output metrics_file = {0}, *metrics = NULL;
  if (c->rank == 0) {
    metrics = &metrics_file;
    open_metrics(metrics, job, resumed ? st.step : 0);
    info("training %s: %d steps, %llu %ssamples of %d tokens in data.train (%.1f%% padding), "
         "backend %s", job->name, job->train->steps, (unsigned long long)r.train.n_samples,
         r.train.pack ? "packed " : "", job->data->seq_len, 100 * loader_padding(&r.train),
         be->name);
    if (resumed) info("resumed at step %d (%llu samples seen)", st.step,
                      (unsigned long long)st.samples_seen);
  }

  double started = now_seconds();
  int steps = job->train->steps;
  uint64_t global_batch = (uint64_t)job->data->micro_batch_size * r.n_mb * c->dp;
  int first_step = st.step + 1;
  /* precision.bf16_final_fraction: steps after bf16_from run every linear in BF16 */
  int bf16_from = steps - (int)lround(job->precision->bf16_final_fraction * steps);
  for (int step = first_step; step <= steps; step++) {
    checkpoint_poll();   /* commits the last save once every rank has written its file */
    if (opt->fail_step == step && opt->fail_rank == c->rank)
      die("failing on purpose at step %d (--fail-at %d:%d)", step, c->rank, step);
    double t0 = now_seconds();
    double lr = lr_schedule(job->optim, steps, step);
    double targets = load_step_batch(&r, st.samples_seen);
    if (targets <= 0) die("step %d: the global batch has no target token (all masked)", step);
    double t1 = part_clock(be, opt->timing);
    if (step > bf16_from && (step == first_step || step == bf16_from + 1))
      info("step %d: every linear in BF16 from here to step %d (precision.bf16_final_fraction "
           "%g)", step, steps, job->precision->bf16_final_fraction);
    for (int k = 0; k < r.v; k++) {
      r.w[k].nvfp4_paused = step > bf16_from;
      worker_zero_grads(&r.w[k]);
      worker_prepare_step(&r.w[k], step);
    }
    double t2 = part_clock(be, opt->timing);
    r.stream_base = st.samples_seen;
    double loss_sum = run_schedule(&r, (float)(1.0 / targets));
    double t3 = part_clock(be, opt->timing);
    /* no synchronize: the optimizer's update may still run on the backend's side stream while
     * the next step's forward starts (optim.c); that step's time includes what it waited for */
    double grad_norm = optimizer_step(r.w, r.v, c, job->optim, lr, step, r.by_layer);
    if (opt->timing) {
      part_seconds[0] += t2 - t1;
      part_seconds[1] += t3 - t2;
      part_seconds[2] += part_clock(be, 1) - t3;
      /* the first step also pays for loading kernels and choosing GEMM algorithms: a profile
       * of the steps after it says where a step's time goes */
      if (step == first_step && steps > first_step) {
        memset(part_seconds, 0, sizeof part_seconds);
        memset(block_stage_seconds, 0, sizeof(double) * QWEN3_BLOCK_STAGES * N_PHASES);
      }
    }
    if (c->world > 1) comm_allreduce_sum_double(c, GROUP_WORLD, &loss_sum, 1);
    double loss = loss_sum / targets;
    stop_if_nonfinite(r.w, r.v, step, "loss", loss);
    st.step = step;
    st.samples_seen += global_batch;
    st.tokens_seen += (uint64_t)targets;
    if (metrics && (step % job->train->log_every == 0 || step == steps || step == 1)) {
      struct step_log s = {step, steps, step - first_step + 1, loss, lr, grad_norm,
                           (double)r.tokens_per_mb * r.n_mb * c->dp, now_seconds() - t0,
                           now_seconds() - started, device_peak_mib(be)};
      log_step(metrics, &s);
    }
    /* every rank must agree to stop at the same step: a signal may reach only some */
    double stop = stop_signal;
    if (c->world > 1) comm_allreduce_sum_double(c, GROUP_WORLD, &stop, 1);
    int every = job->checkpoint->every;
    if (stop || (every >= 0 && step == steps) || (every > 0 && step % every == 0))
      checkpoint_save(job, c, r.w, r.v, &st);
    /* after the save: an evaluation that fails (eval.check_kv) loses no training */
    int evaluation = (job->eval->every > 0 && step % job->eval->every == 0) || step == steps;
    if (!stop && evaluation) {
      checkpoint_wait();   /* the save of this step is committed before the evaluation */
      struct eval_summary ev;
      int n_live[SCHEDULE_MAX_CHUNKS];   /* evaluation reshapes the activations */
      for (int k = 0; k < r.v; k++) n_live[k] = r.w[k].plan.n_live;
      int batch = r.w[0].plan.batch, seq = r.w[0].plan.seq;
      evaluate(job, c, r.w, r.v, step, &ev);
      for (int k = 0; k < r.v; k++) worker_reshape(&r.w[k], batch, seq, n_live[k]);
      if (metrics && ev.has_valid) log_validation(metrics, step, &ev);
    }
    if (stop) {
      if (c->rank == 0)
        info("stopped by a signal after step %d; checkpoint saved (%s)", step, stop_name());
      break;
    }
  }
  if (r.train.truncated && c->rank == 0)
    warn("%llu training samples were truncated: their documents are longer than "
         "data.seq_len + 1 tokens",
         (unsigned long long)r.train.truncated);
  if (opt->timing && c->rank == 0) {
    if (steps > first_step)
      info("--timing: steps %d-%d (the first left out)", first_step + 1, steps);
    print_stage_times();
    info("per-part seconds of rank 0: zero gradients + weight copy %.3f, forward and backward "
         "%.3f (the block stages above, the embedding, the head and loss, transfers), optimizer "
         "%.3f (with --timing it does not overlap the next step)", part_seconds[0],
         part_seconds[1], part_seconds[2]);
  }
  if (metrics) output_close(metrics);
  free(r.tokens);
  free(r.targets);
  free(r.positions);
  loader_close(&r.train);
  schedule_free(&r.sched);
  for (int k = 0; k < r.v; k++) {
    free(r.chunk[k].live_of);
    free(r.chunk[k].live_busy);
    worker_free(&r.w[k]);
  }
  free(r.chunk);
  free(r.w);
}

void eval_run(const Job *job, const struct qwen3_config *cfg, struct comm *c,
              const struct backend *be, const struct run_options *opt) {
  /* one chunk per stage whatever parallel.virtual_stages says: the tensors load by name */
  Qwen3__Parallel par = *job->parallel;
  par.virtual_stages = 1;
  Job one = *job;
  one.parallel = &par;
  struct worker_plan plan;
  stage_plan(&plan, &one, cfg, c->pp, c->stage, 0, be->act_dtype());
  struct worker w;
  worker_init(&w, be, &plan);
  int saved = init_weights(job, &w, 1);
  struct train_state st = {0};
  if (!checkpoint_resume(job, c, &w, 1, &st)) st.step = saved;
  block_timing = opt->timing;
  if (c->rank == 0)
    info("evaluating %s at step %d, backend %s", job->name, st.step, be->name);
  struct eval_summary ev;
  evaluate(job, c, &w, 1, st.step, &ev);
  if (c->rank == 0 && ev.has_valid) {
    struct output metrics;
    open_metrics(&metrics, job, st.step > 0 ? st.step : 0);
    log_validation(&metrics, st.step, &ev);
    output_close(&metrics);
  }
  if (opt->timing && c->rank == 0) print_stage_times();
  worker_free(&w);
}
