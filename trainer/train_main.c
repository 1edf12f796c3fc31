/* qwen3-train JOB.pb: train or evaluate, as the job says, on every rank mpirun started. */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/util.h"
#include "kernels/ops.h"
#include "trainer/checkpoint.h"
#include "trainer/job.h"
#include "trainer/plan.h"
#include "trainer/train.h"
#ifdef QWEN3_HAVE_CUDA
#include "kernels/cuda/cuda_device.h"
#endif

static const char USAGE[] =
    "usage: qwen3-train JOB.pb [options]\n"
    "  mpirun -np N qwen3-train JOB.pb     N = pipeline stages x data-parallel replicas\n"
    "options:\n"
    "  --set section.field=value   override a field of the job (repeatable)\n"
    "  --print-job                 print the effective job, defaults included, and exit\n"
    "  --dry-run                   validate, print the rank layout and memory, and exit\n"
    "  --plan N                    validate, list every layout of N processes (stages, replicas,\n"
    "                              ZeRO, schedule) with memory and pipeline bubble, best first,\n"
    "                              and exit; N in [1, 4096], one process runs it\n"
    "  --plan-memory GIB           with --plan: the memory of one device, in GiB (default: the\n"
    "                              GPU's for a CUDA job with a GPU visible, else no limit)\n"
    "  --timing                    print per-stage forward/backward times at the end\n"
    "  --fail-at RANK:STEP         make RANK fail at STEP (for failure tests)\n";

/* What a GPU process holds besides its plan's memory: the CUDA context (about this much) and
 * cuda_workspace_bytes(job_rows(job)) */
#define CUDA_CONTEXT_MIB 500

/* The token rows of one micro-batch: what the backend sizes its scratch memory by. */
static int job_rows(const Job *job) {
  long rows = (long)job->data->micro_batch_size * job->data->seq_len;
  return rows > 0 && rows <= INT32_MAX ? (int)rows : 0;
}

/* CUDA when the job asks for it, or for AUTO when a GPU is found; the CPU otherwise. */
static const struct backend *choose_backend(const Job *job, const struct qwen3_config *cfg,
                                            const struct comm *c) {
#ifdef QWEN3_HAVE_CUDA
  int gpus = cuda_device_count();
  if (job->backend == QWEN3__BACKEND__CUDA && gpus == 0)
    die("backend: CUDA, but no GPU is visible to rank %d (check CUDA_VISIBLE_DEVICES and the "
        "driver); use backend: CPU or AUTO", c->rank);
  if (job->backend == QWEN3__BACKEND__CPU || gpus == 0) return &backend_cpu;
  int group = cfg->num_heads / cfg->num_kv_heads;
  if (job->eval->n_prompts > 0 && job->eval->max_new_tokens > 0 && group > CUDA_DECODE_MAX_GROUP)
    die("model: %d query heads per kv head; the CUDA backend generates text with at most %d, "
        "and eval.prompts would fail at the first evaluation: run this job with backend: CPU, "
        "or without eval.prompts", group, CUDA_DECODE_MAX_GROUP);
  if (c->rank == 0) {
    char name[256] = "?";
    cuda_device_name(0, name, sizeof name);
    info("backend CUDA: %d GPU(s) on this machine, %s; %d process(es) here", gpus, name,
         c->local_size);
  }
  return &backend_cuda;
#else
  (void)c, (void)cfg;
  if (job->backend == QWEN3__BACKEND__CUDA)
    die("backend: CUDA, but this build has no CUDA backend (nvcc was not found at build time)");
  return &backend_cpu;
#endif
}

/* The activation dtype of the backend the job would run on, for the estimates of --dry-run and
 * --plan; *on_gpu: that backend is CUDA. */
static enum dtype estimate_act_dtype(const Job *job, int *on_gpu) {
  enum dtype act = DT_F32;
  *on_gpu = 0;
#ifdef QWEN3_HAVE_CUDA
  *on_gpu = job->backend == QWEN3__BACKEND__CUDA ||
            (job->backend == QWEN3__BACKEND__AUTO && cuda_device_count() > 0);
  int tf32;
  if (*on_gpu) cuda_precision(&act, &tf32);
#else
  (void)job;
#endif
  return act;
}

/* --plan's device: limit_gib (--plan-memory) when given, else the memory of GPU 0 when the job
 * would run on a GPU that is visible, else none. */
static struct plan_device plan_device(const Job *job, double limit_gib) {
  int on_gpu;
  struct plan_device d = {.act = estimate_act_dtype(job, &on_gpu)};
#ifdef QWEN3_HAVE_CUDA
  if (on_gpu) d.overhead = cuda_workspace_bytes(job_rows(job)) + CUDA_CONTEXT_MIB * 1048576.0;
  if (on_gpu && cuda_device_count() > 0) {
    d.limit = (double)cuda_device_memory(0);
    d.limit_from = "the memory of GPU 0";
  }
#endif
  if (limit_gib > 0) {
    d.limit = limit_gib * 1073741824.0;
    d.limit_from = "--plan-memory";
  }
  return d;
}

/* Every rank read and checked the same job; the ranks agree on whether any found a problem (a
 * file may be readable on one machine and not on another). Returns the lowest rank that found
 * one, or -1. Collective. */
static int first_rank_with_problems(struct comm *c) {
  if (c->world == 1) return job_problem_count() ? 0 : -1;
  double *found = xcalloc((size_t)c->world, sizeof(double));
  found[c->rank] = job_problem_count();
  comm_allreduce_sum_double(c, GROUP_WORLD, found, (size_t)c->world);
  int first = -1;
  for (int r = 0; r < c->world && first < 0; r++)
    if (found[r] > 0) first = r;
  free(found);
  return first;
}

/* An invalid job: one rank lists the problems, every rank finalizes MPI and exits 1. No rank
 * calls MPI_Abort (and Open MPI prints no abort banner): they all reach this point together. */
static void refuse_if_invalid(struct comm *c) {
  int first = first_rank_with_problems(c);
  if (first < 0) return;
  if (c->rank == first) job_problems_print();
  comm_finalize(c);
  exit(1);
}

/* Command-line mistakes: every rank parses the same line and refuses the same way. */
static _Noreturn void usage_error(struct comm *c, const char *fmt, ...) PRINTF_LIKE(2, 3);
static _Noreturn void usage_error(struct comm *c, const char *fmt, ...) {
  if (c->rank == 0) {
    va_list ap;
    va_start(ap, fmt);
    fputs(USAGE, stderr);
    fprintf(stderr, "qwen3: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
  }
  comm_finalize(c);
  exit(1);
}

int main(int argc, char **argv) {
  struct comm c;
  comm_init(&c, &argc, &argv);
  /* a stop signal before the first step boundary is kept for it, not fatal */
  train_catch_stop_signals();

  const char *job_path = NULL;
  int print_job = 0, dry_run = 0, plan = 0;
  double plan_gib = 0;
  struct run_options opt = {0};
  const char *sets[256];
  int n_sets = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      if (c.rank == 0) fputs(USAGE, stdout);
      comm_finalize(&c);
      return 0;
    } else if (!strcmp(a, "--set") && i + 1 < argc) {
      if (n_sets == 256) usage_error(&c, "too many --set options (256 at most)");
      sets[n_sets++] = argv[++i];
    } else if (!strncmp(a, "--set=", 6)) {
      if (n_sets == 256) usage_error(&c, "too many --set options (256 at most)");
      sets[n_sets++] = a + 6;
    } else if (!strcmp(a, "--print-job")) {
      print_job = 1;
    } else if (!strcmp(a, "--dry-run")) {
      dry_run = 1;
    } else if (!strcmp(a, "--plan") && i + 1 < argc) {
      char *end;
      long n = strtol(argv[++i], &end, 10);
      if (end == argv[i] || *end || n < 1 || n > PLAN_MAX_PROCESSES)
        usage_error(&c, "--plan expects a number of processes in [1, %d], got '%s'",
                    PLAN_MAX_PROCESSES, argv[i]);
      plan = (int)n;
    } else if (!strcmp(a, "--plan-memory") && i + 1 < argc) {
      char *end;
      plan_gib = strtod(argv[++i], &end);
      if (end == argv[i] || *end || !(plan_gib > 0) || plan_gib > 1e6)
        usage_error(&c, "--plan-memory expects the GiB of one device, a number in (0, 1e6], "
                    "got '%s'", argv[i]);
    } else if (!strcmp(a, "--timing")) {
      opt.timing = 1;
    } else if (!strcmp(a, "--fail-at") && i + 1 < argc) {
      char end;
      if (sscanf(argv[++i], "%d:%d%c", &opt.fail_rank, &opt.fail_step, &end) != 2 ||
          opt.fail_step < 1)
        usage_error(&c, "--fail-at expects RANK:STEP with STEP >= 1, got '%s'", argv[i]);
    } else if (a[0] == '-') {
      usage_error(&c, "unknown or incomplete option '%s'", a);
    } else if (!job_path) {
      job_path = a;
    } else {
      usage_error(&c, "more than one job file given ('%s' and another)", a);
    }
  }
  if (!job_path) usage_error(&c, "no job file given");
  progress_seconds();   /* a bad QWEN3_PROGRESS_SECONDS stops the job before any work */
  if (plan && dry_run) usage_error(&c, "give --plan or --dry-run, not both");
  if (plan_gib > 0 && !plan) usage_error(&c, "--plan-memory is for --plan N");

  char err[1024];
  Job *job = job_load(job_path, err, sizeof err);
  if (!job) job_problem("%s", err);
  for (int i = 0; job && i < n_sets; i++)
    if (job_set(job, sets[i], err, sizeof err) != 0) job_problem("%s", err);
  refuse_if_invalid(&c);
  if (print_job) {
    if (c.rank == 0) job_print(stdout, job);
    comm_finalize(&c);
    return 0;
  }
  /* every field (every rank), then every input file (rank 0), then the outputs (rank 0): each
   * pass only when the ones before found nothing, and nothing is created for an invalid job */
  struct qwen3_config cfg;
  job_validate(job, plan ? 0 : c.world, &cfg);   /* --plan: the processes are the plan's */
  refuse_if_invalid(&c);
  if (c.rank == 0) job_validate_files(job, &cfg);
  refuse_if_invalid(&c);
  if (!dry_run && !plan && c.rank == 0) job_validate_outputs(job);
  refuse_if_invalid(&c);
  if (plan) {
    if (c.rank == 0) {
      struct plan_device dev = plan_device(job, plan_gib);
      plan_print(job, job_path, &cfg, plan, &dev);
      info("plan: the job is valid; nothing was run");
    }
    comm_finalize(&c);
    return 0;
  }
  comm_set_layout(&c, job->parallel->pipeline_stages);
  if (dry_run) {
    int on_gpu;
    enum dtype act = estimate_act_dtype(job, &on_gpu);
    const struct backend *be = &backend_cpu;
#ifdef QWEN3_HAVE_CUDA
    if (on_gpu) be = &backend_cuda;
#endif
    print_layout(job, &cfg, &c, act, be);
#ifdef QWEN3_HAVE_CUDA
    /* what a GPU process holds besides the table's two columns */
    if (c.rank == 0 && on_gpu)
      printf("on the GPU each process also holds %.1f MiB of CUDA workspace (scratch arena, "
             "cuBLASLt) and the CUDA context (about %d MiB)\n",
             cuda_workspace_bytes(job_rows(job)) / 1048576.0, CUDA_CONTEXT_MIB);
#endif
    if (c.rank == 0) info("dry run: the job is valid; nothing was run");
    comm_finalize(&c);
    return 0;
  }
  const struct backend *be = choose_backend(job, &cfg, &c);
  be->init(c.local_rank, c.local_size, job_rows(job));
  if (be->device_memory) comm_set_device_copy(&c, be->to_host, be->to_device);
  /* NCCL for tensors when every rank drives a GPU of its own; collective, so every rank calls */
  comm_nccl_enable(&c, be->native_stream ? be->native_stream() : NULL);
  if (job->train->steps > 0) train_run(job, &cfg, &c, be, &opt);
  else eval_run(job, &cfg, &c, be, &opt);
  checkpoint_release();
  comm_finalize(&c);
  return log_finish();   /* the console log is an output too */
}
