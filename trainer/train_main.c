/* qwen3-train JOB.pb: train or evaluate, as the job says, on every rank mpirun started. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/util.h"
#include "kernels/ops.h"
#include "trainer/job.h"
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
    "  --timing                    print per-stage forward/backward times at the end\n"
    "  --fail-at RANK:STEP         make RANK fail at STEP (for failure tests)\n";

/* CUDA when the job asks for it, or for AUTO when a GPU is found; the CPU otherwise. */
static const struct backend *choose_backend(const Job *job, const struct comm *c) {
#ifdef QWEN3_HAVE_CUDA
  int gpus = cuda_device_count();
  if (job->backend == QWEN3__BACKEND__CUDA && gpus == 0)
    die("backend: CUDA, but no GPU is visible to rank %d (check CUDA_VISIBLE_DEVICES and the "
        "driver); use backend: CPU or AUTO", c->rank);
  if (job->backend == QWEN3__BACKEND__CPU || gpus == 0) return &backend_cpu;
  if (c->rank == 0) {
    char name[256] = "?";
    cuda_device_name(0, name, sizeof name);
    info("backend CUDA: %d GPU(s) on this machine, %s; %d process(es) here", gpus, name,
         c->local_size);
  }
  return &backend_cuda;
#else
  (void)c;
  if (job->backend == QWEN3__BACKEND__CUDA)
    die("backend: CUDA, but this build has no CUDA backend (nvcc was not found at build time)");
  return &backend_cpu;
#endif
}

int main(int argc, char **argv) {
  struct comm c;
  comm_init(&c, &argc, &argv);

  const char *job_path = NULL;
  int print_job = 0, dry_run = 0;
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
      if (n_sets == 256) die("too many --set options (256 at most)");
      sets[n_sets++] = argv[++i];
    } else if (!strncmp(a, "--set=", 6)) {
      if (n_sets == 256) die("too many --set options (256 at most)");
      sets[n_sets++] = a + 6;
    } else if (!strcmp(a, "--print-job")) {
      print_job = 1;
    } else if (!strcmp(a, "--dry-run")) {
      dry_run = 1;
    } else if (!strcmp(a, "--timing")) {
      opt.timing = 1;
    } else if (!strcmp(a, "--fail-at") && i + 1 < argc) {
      if (sscanf(argv[++i], "%d:%d", &opt.fail_rank, &opt.fail_step) != 2 || opt.fail_step < 1)
        die("--fail-at expects RANK:STEP with STEP >= 1, got '%s'", argv[i]);
    } else if (a[0] == '-') {
      if (c.rank == 0) fputs(USAGE, stderr);
      die("unknown or incomplete option '%s'", a);
    } else if (!job_path) {
      job_path = a;
    } else {
      die("more than one job file given ('%s' and '%s')", job_path, a);
    }
  }
  if (!job_path) {
    if (c.rank == 0) fputs(USAGE, stderr);
    die("no job file given");
  }

  Job *job = job_load(job_path);
  for (int i = 0; i < n_sets; i++) {
    char err[1024];
    if (job_set(job, sets[i], err, sizeof err) != 0) die("%s", err);
  }
  if (print_job) {
    if (c.rank == 0) job_print(stdout, job);
    comm_finalize(&c);
    return 0;
  }
  struct qwen3_config cfg;
  job_validate(job, c.world, c.rank, &cfg);
  comm_set_layout(&c, job->parallel->pipeline_stages);
  if (dry_run) {
    print_layout(job, &cfg, &c);
#ifdef QWEN3_HAVE_CUDA
    /* what a GPU process holds besides the table's two columns */
    if (c.rank == 0 && (job->backend == QWEN3__BACKEND__CUDA ||
                        (job->backend == QWEN3__BACKEND__AUTO && cuda_device_count() > 0)))
      printf("on the GPU each process also holds %.1f MiB of CUDA workspace (scratch arena, "
             "cuBLASLt) and the CUDA context (about 500 MiB)\n",
             cuda_workspace_bytes() / 1048576.0);
#endif
    if (c.rank == 0) info("dry run: the job is valid; nothing was run");
    comm_finalize(&c);
    return 0;
  }
  const struct backend *be = choose_backend(job, &c);
  be->init(c.local_rank, c.local_size);
  if (be->device_memory) comm_set_device_copy(&c, be->to_host, be->to_device);
  /* NCCL for tensors when every rank drives a GPU of its own; collective, so every rank calls */
  comm_nccl_enable(&c, be->native_stream ? be->native_stream() : NULL);
  if (job->train->steps > 0) train_run(job, &cfg, &c, be, &opt);
  else eval_run(job, &cfg, &c, be, &opt);
  comm_finalize(&c);
  return 0;
}
