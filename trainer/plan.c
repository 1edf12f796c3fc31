/* --plan (plan.h). Each layout is the job with its parallel section changed; its memory comes
 * from the plans --dry-run prints (plan_rank) and its bubble from the timed schedule
 * (schedule_simulate), so the table can only disagree with a real run where those do. */
#include "trainer/plan.h"

#include <stdio.h>
#include <stdlib.h>

#include "trainer/layout.h"
#include "trainer/schedule.h"
#include "trainer/train.h"

/* The cost model's units: the forward of one micro-batch through one layer is 1, its backward 2
 * (the gradients of the inputs and of the weights each take a GEMM as large as the forward's). */
#define FWD_COST 1.0
#define BWD_COST 2.0

/* The schedules a job can name, with the kind the trainer runs for each. */
static const struct {
  Qwen3__PipelineSchedule job;
  enum schedule_kind kind;
} SCHEDULES[] = {
  {QWEN3__PIPELINE_SCHEDULE__ONE_F_ONE_B, SCHEDULE_1F1B},
  {QWEN3__PIPELINE_SCHEDULE__GPIPE, SCHEDULE_GPIPE},
};
#define N_SCHEDULES (int)(sizeof SCHEDULES / sizeof SCHEDULES[0])
#define PLAN_MAX_CHUNKS 4   /* interleaved layouts listed: 2 and 4 chunks per stage */

struct layout {
  Qwen3__Parallel par;        /* the job's parallel section, set to this layout */
  enum schedule_kind kind;
  int dp;
  long long global;           /* sequences per step */
  int max_layers;             /* of the largest chunk, which sets the pipeline's pace */
  size_t state, act, total;   /* the largest of any rank: weights+grads+adam, activations, both */
  struct schedule_timing t;   /* with FWD_COST and BWD_COST */
  double time;                /* estimated time per step: max_layers x t.step */
  int runs;                   /* the trainer can run it (interleaved 1F1B: not with eval.every) */
  int fits;
  int index;                  /* in the order of enumerate, the last tie-break */
};

void plan_rank(struct worker_plan *p, const Job *job, const struct qwen3_config *cfg, int pp,
               int dp, int rank, int chunk, enum dtype act) {
  stage_plan(p, job, cfg, pp, rank % pp, chunk, act);
  if (job->parallel->zero && dp > 1) worker_plan_shard(p, dp, rank / pp);
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

/* Fills in the memory, timing and fit of a layout whose parallel section and dp are set. */
static void measure(struct layout *l, const Job *job, const struct qwen3_config *cfg,
                    int processes, const struct plan_device *dev) {
  Job as_planned = *job;
  as_planned.parallel = &l->par;
  int pp = l->par.pipeline_stages, v = l->par.virtual_stages;
  for (int r = 0; r < processes; r++) {
    size_t state = 0, act = 0;
    for (int chunk = 0; chunk < v; chunk++) {
      struct worker_plan p;
      plan_rank(&p, &as_planned, cfg, pp, l->dp, r, chunk, dev->act);
      state += worker_plan_state_bytes(&p);
      act += worker_plan_activation_bytes(&p);
      if (p.n_layers > l->max_layers) l->max_layers = p.n_layers;
    }
    l->state = max_size(l->state, state);
    l->act = max_size(l->act, act);
    l->total = max_size(l->total, state + act);
  }
  schedule_simulate(&l->t, l->kind, pp, v, l->par.micro_batches, FWD_COST, BWD_COST);
  l->time = l->max_layers * l->t.step;
  l->fits = dev->limit == 0 || l->total + dev->overhead <= dev->limit;
  l->runs = v == 1 || job->eval->every <= 0;   /* job_validate.c */
}

/* Micro-batches per replica that keep the global batch at `global` sequences with dp replicas,
 * when that is a whole number the job may use; else the job's own. */
static int micro_batches_for(const Job *job, long long global, int dp) {
  long long per_micro_batch = (long long)dp * job->data->micro_batch_size;
  if (global % per_micro_batch == 0 && global / per_micro_batch <= JOB_MAX_MICRO_BATCHES)
    return (int)(global / per_micro_batch);
  return job->parallel->micro_batches;
}

/* The layout of the job's parallel section as pp stages x dp replicas with the given ZeRO,
 * schedule and chunks per stage, at the global batch. */
static void add_layout(struct layout *l, int index, const Job *job, long long global, int pp,
                       int dp, int zero, int s, int v) {
  *l = (struct layout){.par = *job->parallel, .kind = SCHEDULES[s].kind, .dp = dp, .index = index};
  l->par.pipeline_stages = pp;
  l->par.zero = zero;
  l->par.schedule = SCHEDULES[s].job;
  l->par.virtual_stages = v;
  l->par.micro_batches = micro_batches_for(job, global, dp);
  if (pp != job->parallel->pipeline_stages || v > 1) l->par.n_layers_per_stage = 0;
  l->global = (long long)dp * l->par.micro_batches * job->data->micro_batch_size;
}

/* Every layout: pp dividing the processes and at most the model's layers, ZeRO 1 only with
 * several replicas, every schedule, and interleaved 1F1B with 2 and 4 chunks per stage where it
 * applies (pp >= 2, micro-batches a multiple of pp, a layer per chunk); the fewest stages first,
 * then ZeRO 1, then the schedules in SCHEDULES' order (1F1B, the job's default, first), then
 * the interleaved ones. The job's layers_per_stage is kept for its own pp only; other pps and
 * the interleaved layouts split the layers evenly. Returns how many were written to out. */
static int enumerate(struct layout *out, const Job *job, const struct qwen3_config *cfg,
                     int processes, long long global) {
  int n = 0;
  for (int pp = 1; pp <= processes && pp <= cfg->num_layers && pp <= LAYOUT_MAX_STAGES; pp++) {
    if (processes % pp) continue;
    int dp = processes / pp;
    for (int zero = dp > 1; zero >= 0; zero--) {
      for (int s = 0; s < N_SCHEDULES; s++, n++)
        add_layout(&out[n], n, job, global, pp, dp, zero, s, 1);
      for (int v = 2; v <= PLAN_MAX_CHUNKS; v *= 2) {
        struct layout l;
        add_layout(&l, n, job, global, pp, dp, zero, 0, v);
        if (pp >= 2 && l.par.micro_batches % pp == 0 && pp * v <= cfg->num_layers &&
            pp * v <= LAYOUT_MAX_STAGES)
          out[n++] = l;
      }
    }
  }
  return n;
}

/* Best first: the layouts that fit, then the least estimated time per sequence (per step at
 * equal global batches), then the least memory, then the order of enumerate. */
static int compare(const void *pa, const void *pb) {
  const struct layout *a = pa, *b = pb;
  if (a->fits != b->fits) return b->fits - a->fits;
  double ta = a->time * (double)b->global, tb = b->time * (double)a->global;
  if (ta != tb) return ta < tb ? -1 : 1;
  if (a->total != b->total) return a->total < b->total ? -1 : 1;
  return a->index - b->index;
}

static const char *schedule_name(Qwen3__PipelineSchedule s) {
  return protobuf_c_enum_descriptor_get_value(&qwen3__pipeline_schedule__descriptor, s)->name;
}

static double mib(size_t bytes) { return bytes / 1048576.0; }

static void print_header(const Job *job, const struct qwen3_config *cfg, int processes,
                         long long global, int job_dp, const struct plan_device *dev) {
  const Qwen3__Parallel *par = job->parallel;
  printf("plan for %d processes: %s, %d layers; the layouts that fit first, then by estimated "
         "time per step, then by memory\n", processes, job->name, cfg->num_layers);
  printf("global batch: %lld sequences of %d tokens per step, the job's on %d processes "
         "(data.micro_batch_size %d x parallel.micro_batches %d x %d replicas%s); each layout "
         "keeps it with micro-batches = global / (replicas x micro_batch_size), where that is a "
         "whole number\n",
         global, job->data->seq_len, processes, job->data->micro_batch_size, par->micro_batches,
         job_dp, processes % par->pipeline_stages ? ", rounded: its stages do not divide the "
         "processes" : "");
  if (par->n_layers_per_stage)
    printf("layers: as parallel.layers_per_stage lists them with %d stages, evenly with "
           "others\n", par->pipeline_stages);
  printf("memory: the largest rank's, as --dry-run counts it, activations in %s; ",
         dev->act == DT_BF16 ? "bf16" : "fp32");
  if (dev->limit > 0)
    printf("a process may hold %.4g GiB (%s)", dev->limit / 1073741824.0, dev->limit_from);
  else
    printf("no limit (--plan-memory GIB sets one)");
  if (dev->overhead > 0)
    printf("; each GPU process also holds %.1f MiB of CUDA workspace and context",
           dev->overhead / 1048576.0);
  printf("\n");
  printf("est. time per step = layers of the largest stage x micro-batches x (%g + %g) / (1 - "
         "bubble), in forwards of one layer over one micro-batch; bubble: the idle fraction of "
         "the simulated schedule; transfers and the data-parallel reduction are not counted\n",
         FWD_COST, BWD_COST);
  printf("chunks: parallel.virtual_stages, chunks of layers per stage (interleaved 1F1B: chunks x "
         "the transfers, bubble (stages - 1) / (chunks x micro-batches + stages - 1) against "
         "1F1B's (stages - 1) / (micro-batches + stages - 1); peak live counts chunk "
         "activations)%s\n", job->eval->every > 0 ? ". With eval.every the trainer does not run "
         "interleaved layouts: the command below skips them" : "");
  printf("    %-6s %-8s %-4s %-11s %-13s %12s  %12s  %12s  %-6s  %-9s  %-9s  %s\n", "stages",
         "replicas", "zero", "schedule", "micro-batches", "weights+adam", "activations",
         "largest rank", "bubble", "peak live", "est. time", "chunks");
}

static void print_layout_row(int i, const struct layout *l, long long global) {
  printf("%2d. %-6d %-8d %-4d %-11s %-13d %8.1f MiB  %8.1f MiB  %8.1f MiB  %-6.3f  %-9d  %-9.0f  "
         "%d", i + 1, l->par.pipeline_stages, l->dp, l->par.zero, schedule_name(l->par.schedule),
         l->par.micro_batches, mib(l->state), mib(l->act), mib(l->total), l->t.bubble,
         l->t.peak_live, l->time, l->par.virtual_stages);
  if (l->global != global) printf(" global batch %lld", l->global);
  if (!l->fits) printf(" does not fit");
  if (!l->runs) printf(" (interleaved: not with eval.every)");
  printf("\n");
}

void plan_print(const Job *job, const char *job_path, const struct qwen3_config *cfg,
                int processes, const struct plan_device *dev) {
  int job_dp = processes / job->parallel->pipeline_stages;
  if (job_dp < 1) job_dp = 1;
  long long global =
      (long long)job->data->micro_batch_size * job->parallel->micro_batches * job_dp;
  /* at most two ZeRO settings, every schedule and the interleaved ones per pp */
  struct layout *layouts =
      xcalloc((size_t)processes * 2 * (N_SCHEDULES + PLAN_MAX_CHUNKS), sizeof *layouts);
  int n = enumerate(layouts, job, cfg, processes, global);
  for (int i = 0; i < n; i++) measure(&layouts[i], job, cfg, processes, dev);
  qsort(layouts, (size_t)n, sizeof *layouts, compare);

  print_header(job, cfg, processes, global, job_dp, dev);
  for (int i = 0; i < n; i++) print_layout_row(i, &layouts[i], global);
  const struct layout *best = NULL;
  for (int i = 0; i < n && !best; i++)
    if (layouts[i].fits && layouts[i].runs) best = &layouts[i];
  if (best)
    printf("recommended: mpirun -np %d qwen3-train %s --set parallel.pipeline_stages=%d --set "
           "parallel.zero=%d --set parallel.schedule=%s --set parallel.micro_batches=%d --set "
           "parallel.virtual_stages=%d%s\n",
           processes, job_path, best->par.pipeline_stages, best->par.zero,
           schedule_name(best->par.schedule), best->par.micro_batches, best->par.virtual_stages,
           best->par.n_layers_per_stage < job->parallel->n_layers_per_stage
               ? " --set parallel.layers_per_stage=" : "");
  else
    printf("no layout fits in %.4g GiB per process: more processes, parallel.recompute or a "
           "smaller data.micro_batch_size need less\n", dev->limit / 1073741824.0);
  free(layouts);
}
