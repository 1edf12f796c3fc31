/* Checkpoint save and load throughput of one pipeline rank of a Qwen3-4B-shaped model.
 *
 *   build/bench/ckpt_bench DIR [STAGE [STAGES]]      (default: stage 0 of 8)
 *
 * The rank holds the stage's fp32 weights and both AdamW moments, as in training. Save is what
 * a checkpoint costs once training has staged the tensors to host memory: the stage file written
 * tensor by tensor from host memory (what checkpoint.c's writer thread does: whole chunks with
 * their Fletcher32 checksums, fsynced) plus the commit (model.h5, renames, fsyncs); load is
 * checkpoint_resume's (every tensor read by name through model.h5's links, checksums verified).
 * The shape is Qwen3-4B's (REFERENCE.md) unless overridden by QWEN3_BENCH_LAYERS for a quick run.
 * Prints one `RESULT system=ours-ckpt ...` line (also appended to $GPU_BENCH_RESULTS when set),
 * beside bench/ckpt_baseline.py's for safetensors and torch.save. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "trainer/layout.h"
#include "worker/worker.h"
#include "bench/bench_result.h"

static void check(int rc, const char *err) {
  if (rc != 0) die("%s", err);
}

int main(int argc, char **argv) {
  if (argc < 2) die("usage: ckpt_bench DIR [STAGE [STAGES]]");
  const char *root = argv[1];
  int stage = argc > 2 ? atoi(argv[2]) : 0, stages = argc > 3 ? atoi(argv[3]) : 8;
  struct qwen3_config cfg = {
    .hidden_size = 2560, .num_layers = 36, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128,
    .intermediate_size = 9728, .vocab_size = 151936, .rope_theta = 5e6, .rms_norm_eps = 1e-6,
    .tie_embeddings = 1, .max_seq_len = 16,
  };
  if (getenv("QWEN3_BENCH_LAYERS")) cfg.num_layers = atoi(getenv("QWEN3_BENCH_LAYERS"));
  int first[LAYOUT_MAX_STAGES + 1];
  char err[1024];
  check(layout_split_layers(stages, cfg.num_layers, NULL, 0, first, err, sizeof err), err);

  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, first[stage], first[stage + 1] - first[stage], stage == 0,
                   stage == stages - 1, 1, 16, 1, 0, DT_F32);
  struct worker w;
  worker_init(&w, &backend_cpu, &plan);
  worker_init_weights(&w, 1, 0.02f);
  memcpy(w.adam_m, w.weights, plan.param_floats * sizeof(float));
  memcpy(w.adam_v, w.weights, plan.param_floats * sizeof(float));
  double gib = 3.0 * plan.param_floats * sizeof(float) / (1 << 30);
  printf("stage %d of %d: layers %d-%d%s, %zu parameters, %.2f GiB of weights + AdamW moments\n",
         stage, stages, plan.first_layer, plan.first_layer + plan.n_layers - 1,
         plan.has_embedding ? " + embedding" : "", plan.param_floats, gib);

  /* save: one stage file, then the commit (model.h5, renames, fsyncs) as a 1-stage checkpoint */
  double t0 = now_seconds();
  check(ckpt_begin(root, 1, err, sizeof err), err);
  char dir[4096], file[64], path[4200];
  ckpt_step_path(dir, sizeof dir, root, 1, 1);
  ckpt_stage_file(file, sizeof file, 0, 1);
  snprintf(path, sizeof path, "%s/%s", dir, file);
  struct ckpt_stage_writer *sw;
  check(ckpt_stage_create(&sw, path, 0, 1, err, sizeof err), err);
  for (int i = 0; i < w.n_params; i++) {
    const struct param *p = &w.params[i];
    int64_t shape[2] = {p->rows, p->cols};
    check(ckpt_stage_put(sw, p->name, p->cols == 1 ? 1 : 2, shape, w.weights + p->offset,
                         w.adam_m + p->offset, w.adam_v + p->offset, err, sizeof err), err);
  }
  check(ckpt_stage_finish(sw, err, sizeof err), err);
  double write = now_seconds() - t0;
  struct ckpt_state st = {.step = 1, .n_stages = 1, .config = cfg};
  check(ckpt_commit(root, &st, 1, err, sizeof err), err);
  double save = now_seconds() - t0;

  /* load: by name, every part, into the same buffers (zeroed first) */
  memset(w.weights, 0, plan.param_floats * sizeof(float));
  float *check_v = xmalloc(plan.param_floats * sizeof(float));
  memcpy(check_v, w.adam_m, plan.param_floats * sizeof(float));
  t0 = now_seconds();
  struct ckpt *ck;
  check(ckpt_open(&ck, root, err, sizeof err), err);
  float *dst[3] = {w.weights, w.adam_m, w.adam_v};
  for (int i = 0; i < w.n_params; i++) {
    const struct param *p = &w.params[i];
    int64_t shape[2] = {p->rows, p->cols};
    for (int part = 0; part < 3; part++)
      check(ckpt_read(ck, p->name, (enum ckpt_part)part, p->cols == 1 ? 1 : 2, shape,
                      dst[part] + p->offset, err, sizeof err), err);
  }
  ckpt_close(ck);
  double load = now_seconds() - t0;
  if (memcmp(check_v, w.weights, plan.param_floats * sizeof(float)) != 0)
    die("the loaded weights differ from the saved ones");

  printf("save %.2f s = %.2f GiB/s (the stage file %.2f s, the commit %.2f s), load %.2f s = "
         "%.2f GiB/s (bit-exact)\n", save, gib / save, write, save - write, load, gib / load);
  char line[512];
  snprintf(line, sizeof line, "RESULT system=ours-ckpt stage=%d stages=%d gib=%.3f save_s=%.3f "
           "save_gibps=%.3f load_s=%.3f load_gibps=%.3f", stage, stages, gib, save, gib / save,
           load, gib / load);
  result_line(line);
  free(check_v);
  worker_free(&w);
  return 0;
}
