/* Checkpoint step directories (data/ckpt_file.c). A valid checkpoint (model.h5 and one stage
 * file) is written once; each input is a recipe (fuzz_h5.h) that rewrites some of its objects:
 * the root attributes and config attributes of model.h5 (type, dataspace, value), job.pb, the
 * tensor links (soft, external to other files or objects), and the stage file's tensors (type,
 * shape, layout, filters). The target opens the directory and reads every tensor it lists:
 * every damage is refused with a message, never a fault. (A rewritten model.h5 fails its
 * run-state checksum; the attribute checks run before that check, so they are exercised.) */
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/fuzz_h5.h"

#include "common/util.h"
#include "data/ckpt_file.h"

static char base[256], work[256];
static const char *const TENSORS[] = {"model.embed_tokens.weight", "model.norm.weight"};

static void make_base(void) {
  char root[256], step[300], path[400], err[512], file[64];
  snprintf(root, sizeof root, "%s/root", fuzz_dir);
  if (ckpt_begin(root, 5, err, sizeof err) != 0) die("%s", err);
  ckpt_step_path(step, sizeof step, root, 5, 1);
  ckpt_stage_file(file, sizeof file, 0, 1);
  snprintf(path, sizeof path, "%s/%s", step, file);
  struct ckpt_stage_writer *w;
  const float wt[6] = {1, 2, 3, 4, 5, 6}, m[6] = {0.5f}, v[6] = {0.25f};
  const int64_t s2[2] = {2, 3}, s1[1] = {3};
  if (ckpt_stage_create(&w, path, 0, 1, err, sizeof err) != 0 ||
      ckpt_stage_put(w, TENSORS[0], 2, s2, wt, m, v, err, sizeof err) != 0 ||
      ckpt_stage_put(w, TENSORS[1], 1, s1, wt, NULL, NULL, err, sizeof err) != 0 ||
      ckpt_stage_finish(w, err, sizeof err) != 0)
    die("%s", err);
  const uint8_t job[] = {0x0a, 0x04, 't', 'i', 'n', 'y'};
  struct ckpt_state s = {.step = 5, .samples_seen = 40, .tokens_seen = 1280, .n_stages = 1,
                         .config = {3, 1, 1, 1, 3, 4, 2, 10000.0, 1e-6, 0, 32},
                         .job = job, .job_len = sizeof job};
  if (ckpt_commit(root, &s, 0, err, sizeof err) != 0) die("%s", err);
  snprintf(base, sizeof base, "%s/root/step_00000005", fuzz_dir);
  snprintf(work, sizeof work, "%s/work", fuzz_dir);
  mkdir(work, 0755);
}

static void copy(const char *name) {
  char from[400], to[400];
  snprintf(from, sizeof from, "%s/%s", base, name);
  snprintf(to, sizeof to, "%s/%s", work, name);
  size_t n;
  char *bytes = read_file(from, &n);
  FILE *f = fopen(to, "wb");
  if (!bytes || !f || fwrite(bytes, 1, n, f) != n || fclose(f) != 0) abort();
  free(bytes);
}

static void rewrite_model(struct recipe *r, hid_t m) {
  const int64_t i64 = 7;
  const uint64_t u64 = 40;
  const double f64 = 10000.0;
  const char *root_attrs[] = {"format_version", "step", "samples_seen", "tokens_seen",
                              "n_stages", "state_sha256"};
  for (int i = 0; i < 6; i++)
    if (take(r) % 3 == 1) {
      H5Adelete(m, root_attrs[i]);
      fz_attr(r, m, root_attrs[i], H5T_STD_I64LE, &i64, sizeof i64);
    }
  const char *cfg_attrs[] = {"hidden_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                             "tie_word_embeddings", "max_position_embeddings", "rope_theta",
                             "rms_norm_eps"};
  if (take(r) % 2) {
    hid_t g = H5Gopen2(m, "config", H5P_DEFAULT);
    for (int i = 0; i < 11; i++)
      if (take(r) % 3 == 1) {
        H5Adelete(g, cfg_attrs[i]);
        if (i < 9) fz_attr(r, g, cfg_attrs[i], H5T_STD_I64LE, &u64, sizeof u64);
        else fz_attr(r, g, cfg_attrs[i], H5T_IEEE_F64LE, &f64, sizeof f64);
      }
    H5Gclose(g);
  }
  if (take(r) % 3 == 1) {
    const uint8_t job[] = {0x0a, 0x04, 't', 'i', 'n', 'y'};
    hsize_t n = sizeof job;
    H5Ldelete(m, "job.pb", H5P_DEFAULT);
    fz_dataset(r, m, "job.pb", H5T_STD_U8LE, 1, &n, job, sizeof job);
  }
  if (take(r) % 3 == 1) {   /* a tensor link leads elsewhere */
    const char *name = TENSORS[take(r) % 2];
    H5Ldelete(m, name, H5P_DEFAULT);
    const char *files[] = {"stage_000_of_001.h5", "/etc/passwd", "../root/step_00000005/model.h5",
                           "model.h5", "..", "", "missing.h5"};
    const char *objs[] = {TENSORS[0], TENSORS[1], "/", "config", "job.pb", "x/y"};
    unsigned k = take(r);
    if (k % 5 == 4) H5Lcreate_soft("/config", m, name, H5P_DEFAULT, H5P_DEFAULT);
    else if (k % 5 == 3) H5Lcreate_hard(m, "config", m, name, H5P_DEFAULT, H5P_DEFAULT);
    else H5Lcreate_external(files[take(r) % 7], objs[take(r) % 6], m, name, H5P_DEFAULT, H5P_DEFAULT);
  }
}

static void rewrite_stage(struct recipe *r, hid_t st) {
  const float wt[6] = {1, 2, 3, 4, 5, 6};
  const char *suffix[] = {"", ".adam_m", ".adam_v"};
  for (int t = 0; t < 2; t++)
    for (int p = 0; p < 3; p++)
      if (take(r) % 3 == 1) {
        char name[128];
        snprintf(name, sizeof name, "%s%s", TENSORS[t], suffix[p]);
        hsize_t dims[2] = {t ? 3 : 2, 3};
        H5Ldelete(st, name, H5P_DEFAULT);
        fz_dataset(r, st, name, H5T_IEEE_F32LE, t ? 1 : 2, dims, wt, t ? 12 : 24);
      }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  if (!base[0]) make_base();
  struct recipe r = {data, size};
  copy("model.h5");
  copy("stage_000_of_001.h5");
  char path[400];
  H5E_BEGIN_TRY {
    snprintf(path, sizeof path, "%s/model.h5", work);
    hid_t m = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (m >= 0) {
      rewrite_model(&r, m);
      H5Fclose(m);
    }
    snprintf(path, sizeof path, "%s/stage_000_of_001.h5", work);
    hid_t st = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (st >= 0) {
      rewrite_stage(&r, st);
      H5Fclose(st);
    }
  }
  H5E_END_TRY;
  fuzz_check_hdf5_closed("the recipe writer");

  struct ckpt *c;
  char err[1024] = "";
  if (ckpt_open(&c, work, err, sizeof err) == 0) {
    const struct ckpt_state *s = ckpt_get_state(c);
    if (s->n_stages < 1 || (s->job_len && !s->job)) abort();
    for (size_t i = 0; i < ckpt_count(c); i++) {
      const char *name = ckpt_name_at(c, i);
      int ndim;
      int64_t shape[2];
      if (ckpt_shape(c, name, &ndim, shape, err, sizeof err) != 0) {
        if (!err[0]) abort();
        continue;
      }
      if (ndim < 1 || ndim > 2 || shape[0] < 1 || shape[1] < 1) abort();
      size_t n = (size_t)shape[0] * (size_t)shape[1];
      float *buf = malloc(n * sizeof *buf);
      for (int part = CKPT_WEIGHTS; part <= CKPT_ADAM_V; part++)
        ckpt_read(c, name, (enum ckpt_part)part, ndim, shape, buf, err, sizeof err);
      free(buf);
    }
    ckpt_close(c);
  } else if (!err[0]) {
    abort();
  }
  fuzz_check_hdf5_closed("ckpt_open/ckpt_read");
  return 0;
}
