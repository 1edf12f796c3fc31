/* Checkpoints of a run: which rank writes and reads what, and when the ranks wait for each other.
 * The files themselves (layout, commit protocol, checks) are data/ckpt_file.c's. */
#define _GNU_SOURCE   /* nftw, flock, gethostname */
#include "trainer/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "common/util.h"
#include "data/ckpt_file.h"
#include "trainer/train.h"

void checkpoint_root(const Job *job, char *out, size_t len) {
  const char *dir = job->checkpoint->dir;
  if (dir && *dir) snprintf(out, len, "%s", dir);
  else snprintf(out, len, "%s/checkpoints", job->output_dir);
}
#define checkpoint_dir checkpoint_root

int probe_writable(const char *dir, char *err, size_t errlen) {
  char path[4200];
  snprintf(path, sizeof path, "%s/.qwen3-write-probe.%ld", dir, (long)getpid());
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errorf(err, errlen, "'%s' is not writable: cannot create %s: %s", dir, path,
                            strerror(errno));
  char block[4096];
  memset(block, 0, sizeof block);
  int rc = 0;
  if (write(fd, block, sizeof block) != (ssize_t)sizeof block || fsync(fd) != 0)
    rc = errorf(err, errlen, "'%s' is not writable (full disk?): cannot write 4 KiB to %s: %s",
                dir, path, errno ? strerror(errno) : "short write");
  if (close(fd) != 0 && rc == 0)
    rc = errorf(err, errlen, "'%s' is not writable: cannot close %s: %s", dir, path,
                strerror(errno));
  unlink(path);
  return rc;
}

/* ---- one run per checkpoint.dir, and no step overwritten unasked ------------------------------ */

static int lock_fd = -1;           /* <root>/.lock, flock'ed for the life of the process */
static int64_t replace_after = -1; /* checkpoint.overwrite: steps after the first save go */

/* The largest committed step_%08d under root; -1 when none. */
static int64_t newest_step(const char *root) {
  DIR *d = opendir(root);
  int64_t max = -1;
  struct dirent *e;
  while (d && (e = readdir(d))) {
    long long step;
    int end = 0;
    if (strlen(e->d_name) == 13 && sscanf(e->d_name, "step_%8lld%n", &step, &end) == 1 &&
        end == 13 && step > max)
      max = step;
  }
  if (d) closedir(d);
  return max;
}

/* checkpoint.resume AUTO: the step `latest` names, into dir. A run ended between renaming its
 * step into place (the commit: the directory then holds the whole checkpoint) and moving
 * `latest` leaves a newer whole step that `latest` does not name. Without checkpoint.overwrite
 * nothing else leaves one (a run that would is refused), so AUTO continues from it and says so
 * through *newer; with overwrite a newer step may be an abandoned run's, and `latest` holds.
 * Returns as ckpt_find_latest. */
static int find_auto(const Job *job, const char *root, char *dir, size_t len, int *newer,
                     char *err, size_t errlen) {
  *newer = 0;
  int found = ckpt_find_latest(root, dir, len, err, errlen);
  int64_t newest = newest_step(root);
  if (found < 0 || job->checkpoint->overwrite || newest < 0) return found;
  char path[4096], model[4200];
  ckpt_step_path(path, sizeof path, root, newest, 0);
  snprintf(model, sizeof model, "%s/model.h5", path);
  if (access(model, F_OK) != 0 || (found > 0 && !strcmp(dir, path))) return found;
  snprintf(dir, len, "%s", path);
  *newer = 1;
  return 1;
}

static int take_lock(const char *root, char *err, size_t errlen) {
  char path[4200], host[256] = "?";
  snprintf(path, sizeof path, "%s/.lock", root);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    return errorf(err, errlen, "checkpoint.dir: cannot create the lock file %s: %s", path,
                  strerror(errno));
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    char holder[256] = "";
    ssize_t n = pread(fd, holder, sizeof holder - 1, 0);
    holder[n > 0 ? n : 0] = 0;
    holder[strcspn(holder, "\n")] = 0;
    close(fd);
    if (e == EWOULDBLOCK)
      return errorf(err, errlen, "checkpoint.dir: '%s' is in use by another run (%s, holding %s); "
                    "two runs in one checkpoint.dir would delete each other's steps: give this "
                    "run its own checkpoint.dir, or wait for that one to end", root,
                    holder[0] ? holder : "pid unknown", path);
    return errorf(err, errlen, "checkpoint.dir: cannot lock %s: %s", path, strerror(e));
  }
  gethostname(host, sizeof host - 1);
  char me[320];
  int len = snprintf(me, sizeof me, "pid %ld on host %s\n", (long)getpid(), host);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, me, (size_t)len, 0) != len || fsync(fd) != 0) {
    int e = errno;
    close(fd);
    return errorf(err, errlen, "checkpoint.dir: cannot write the lock file %s: %s", path,
                  strerror(e));
  }
  lock_fd = fd;
  return 0;
}

int checkpoint_prepare(const Job *job, char *err, size_t errlen) {
  char root[4096], dir[4096] = "", why[1024];
  checkpoint_root(job, root, sizeof root);
  if (make_dirs(root) != 0)
    return errorf(err, errlen, "checkpoint.dir: cannot create '%s': %s", root, strerror(errno));
  if (probe_writable(root, why, sizeof why) != 0)
    return errorf(err, errlen, "checkpoint.dir: %s", why);
  if (take_lock(root, err, errlen) != 0) return -1;
  /* the step this run starts after */
  const char *resume = job->checkpoint->resume;
  int64_t start = 0;
  if (strcmp(resume, "NEVER")) {
    int found = 1, newer;
    if (!strcmp(resume, "AUTO")) found = find_auto(job, root, dir, sizeof dir, &newer, why, sizeof why);
    else if (ckpt_resolve(resume, dir, sizeof dir, why, sizeof why) != 0) found = -1;
    if (found < 0) return errorf(err, errlen, "checkpoint.resume %s: %s", resume, why);
    struct ckpt *ck;
    if (found > 0) {
      if (ckpt_open(&ck, dir, why, sizeof why) != 0)
        return errorf(err, errlen, "checkpoint.resume %s: %s", resume, why);
      start = ckpt_get_state(ck)->step;
      ckpt_close(ck);
    }
  }
  int64_t newest = newest_step(root);
  if (newest > start) {
    if (!job->checkpoint->overwrite)
      return errorf(err, errlen, "checkpoint.dir: '%s' already holds step %lld, and this run "
                    "starts after step %lld (checkpoint.resume %s): it would overwrite steps and "
                    "move `latest` back. Continue the newest with checkpoint.resume: AUTO, give "
                    "another checkpoint.dir, or set checkpoint.overwrite: true to start over "
                    "(the steps after the run's first save are then deleted)", root,
                    (long long)newest, (long long)start, resume);
    replace_after = start;
  }
  return 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* checkpoint.overwrite: after the first save of a run that started over, the steps after it
 * belong to the abandoned run; they go, so that `latest` is again the newest step. */
static void remove_steps_after(const char *root, int64_t step) {
  DIR *d = opendir(root);
  struct dirent *e;
  char path[4400];
  while (d && (e = readdir(d))) {
    long long s;
    int end = 0;
    if (sscanf(e->d_name, "step_%8lld%n", &s, &end) == 1 && end == 13 && s > step &&
        (e->d_name[13] == 0 || !strcmp(e->d_name + 13, ".old"))) {
      snprintf(path, sizeof path, "%s/%s", root, e->d_name);
      if (nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        die("checkpoint.overwrite: cannot remove %s: %s", path, strerror(errno));
      info("checkpoint.overwrite: removed %s of the earlier run", path);
    }
  }
  if (d) closedir(d);
}

/* With tied embeddings and pp > 1 the last stage holds a copy of stage 0's embedding (kept
 * identical by the optimizer): the checkpoint holds it once, from stage 0, and both load it. */
static int is_tied_copy(const struct worker *w, const struct param *p) {
  return !w->plan.has_embedding && !strcmp(p->name, "model.embed_tokens.weight");
}

static void param_shape(const struct param *p, int *ndim, int64_t shape[2]) {
  *ndim = p->cols == 1 ? 1 : 2;
  shape[0] = p->rows;
  shape[1] = p->cols;
}

/* Host staging for loading goes tensor by tensor: one buffer of the largest tensor. */
static size_t largest_param(const struct worker *w) {
  size_t max = 1;
  for (int i = 0; i < w->n_params; i++) {
    size_t n = (size_t)w->params[i].rows * w->params[i].cols;
    if (n > max) max = n;
  }
  return max;
}

/* ---- the save in flight ----------------------------------------------------------------------
 * checkpoint_save copies this rank's tensors into a host staging buffer and returns; a writer
 * thread writes the stage file from it and fsyncs it while training goes on. Rank 0 commits the
 * step directory (model.h5, the rename, `latest`) once every rank's file is synced. The ranks
 * agree on that from their main threads, never the writer's (MPI is not initialised for
 * threads): at a step boundary once every writer has finished (checkpoint_poll), or waiting for
 * the writers (checkpoint_wait: before the next save, before an evaluation, at exit). Until
 * then `latest` names the previous checkpoint, which a crash leaves intact. */

struct staged_tensor {
  char name[CKPT_MAX_NAME + 1];
  int ndim;
  int64_t shape[2];
  size_t offset;   /* in floats, into each part of the staging buffer */
};

static struct {
  int active;              /* a save began and is not committed yet: the same on every rank */
  struct comm *c;
  double began, staged;    /* now_seconds() when checkpoint_save began and when it returned */
  /* the stage file (replica 0's ranks) */
  int writing;             /* the writer was started and is not joined yet */
  int threaded;            /* it runs on `thread`; else it ran inside checkpoint_save */
  pthread_t thread;
  atomic_int finished;     /* the writer's last act */
  char path[4200];
  int stage, n_stages;
  struct staged_tensor *tensors;
  int n_tensors;
  float *staging;          /* [weights | adam_m | adam_v], `part` floats each */
  const struct backend *staging_be;   /* whose host_alloc made it (pinned on a GPU) */
  size_t part, capacity;   /* floats of one part; floats allocated */
  size_t filled;           /* floats of each part staged so far */
  char err[1024];          /* the writer's error; empty when it succeeded */
  double delay;            /* QWEN3_CKPT_WRITE_DELAY */
  /* the commit (rank 0) */
  char root[4096];
  struct ckpt_state state;
  uint8_t *job;            /* state.job: the packed Job */
  int keep_last;
} save;

/* Bytes the kernel can still give without swapping (/proc/meminfo's MemAvailable); SIZE_MAX
 * where it does not say. */
static size_t host_available(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  char line[256];
  unsigned long long kib = 0;
  int found = 0;
  while (f && !found && fgets(line, sizeof line, f))
    found = sscanf(line, "MemAvailable: %llu kB", &kib) == 1;
  if (f) fclose(f);
  return found ? (size_t)kib * 1024 : SIZE_MAX;
}

/* be's host_alloc (pinned on a GPU); NULL when out of memory. The buffer's pages are touched
 * at once (the GPU backend pins them) or at the first save: more than the host has would end
 * the process by the kernel's OOM killer, not by an error, so a buffer larger than what is
 * available now counts as out of memory. Called from the main thread and from the one
 * allocating ahead. */
static void *staging_alloc(const struct backend *be, size_t bytes) {
  return bytes > host_available() ? NULL : be->host_alloc(bytes);
}

static void staging_free(const struct backend *be, void *p) {
  if (p) be->host_free(p);
}

static void free_staging(void) {
  staging_free(save.staging_be, save.staging);
  save.staging = NULL;
  save.capacity = 0;
}

/* Seconds a test asks a thread to sleep first (QWEN3_CKPT_WRITE_DELAY, QWEN3_CKPT_STAGING_DELAY:
 * in the environment of some ranks only), as on a slow disk or a slow pinning of memory. */
static double test_delay(const char *name) {
  const char *delay = getenv(name);
  return delay ? atof(delay) : 0;
}

static void sleep_seconds(double s) {
  struct timespec left = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
  while (s > 0 && nanosleep(&left, &left) != 0 && errno == EINTR) continue;
}

/* Starts fn on *thread with every signal blocked in it: stop signals stay with the main thread
 * (train.c's handler). Returns pthread_create's code. */
static int start_thread(pthread_t *thread, void *(*fn)(void *)) {
  sigset_t all, old;
  sigfillset(&all);
  int rc = pthread_sigmask(SIG_BLOCK, &all, &old);
  if (rc != 0) die("checkpoint: pthread_sigmask: %s", strerror(rc));
  rc = pthread_create(thread, NULL, fn, NULL);
  int rc_mask = pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc_mask != 0) die("checkpoint: pthread_sigmask: %s", strerror(rc_mask));
  return rc;
}

/* ---- the staging buffer, allocated ahead -----------------------------------------------------
 * Pinning the staging buffer takes tens of seconds for a large model (48 GB for Qwen3-4B on one
 * GPU: about 20 s on an H200 host). Paid at the first save, it would come out of the grace
 * period of a stop signal that arrives before any save. So a thread allocates it from the start
 * of the run; the first save joins the thread and takes its buffer. (On a GPU the backend's
 * host_alloc faults the pages in before it pins them, so training's CUDA calls wait only for
 * the pinning: about 2 s at 48 GB.) */
static struct {
  int started;                 /* the thread was started and is not joined yet */
  pthread_t thread;
  const struct backend *be;
  size_t bytes;                /* what stage_begin will need */
  void *buf;                   /* the thread's result until a save takes it; NULL if it failed */
  double delay;                /* QWEN3_CKPT_STAGING_DELAY */
} ahead;

/* The thread: neither die() nor MPI, as the writer's. It says when the buffer is ready if
 * that took a second or more (the test's delay counts) or it holds a GiB or more. */
static void *allocate_ahead(void *unused) {
  (void)unused;
  double t0 = now_seconds();
  sleep_seconds(ahead.delay);
  ahead.buf = staging_alloc(ahead.be, ahead.bytes);
  const char *pinned = ahead.be->device_memory ? "pinned " : "";
  int gib = ahead.bytes >= (1u << 30);   /* a test's model holds less than a GiB */
  double size = ahead.bytes / (gib ? 1073741824.0 : 1048576.0);
  if (ahead.buf && (gib || now_seconds() - t0 >= 1))
    info("checkpoint: %.1f %s of %shost staging ready for saves (allocated in %.1f s, in the "
         "background)", size, gib ? "GiB" : "MiB", pinned, now_seconds() - t0);
  else if (!ahead.buf)
    warn("checkpoint: out of host memory for the %.1f %s of %shost staging of saves; the first "
         "save tries again", size, gib ? "GiB" : "MiB", pinned);
  return NULL;
}

void checkpoint_stage_ahead(const struct comm *c, const struct worker *chunks, int n) {
  if (c->replica != 0) return;   /* as in checkpoint_save: the other replicas never stage */
  ahead.be = chunks[0].be;
  ahead.bytes = 0;
  for (int k = 0; k < n; k++) ahead.bytes += checkpoint_staging_bytes(&chunks[k].plan);
  ahead.delay = test_delay("QWEN3_CKPT_STAGING_DELAY");
  int rc = start_thread(&ahead.thread, allocate_ahead);
  if (rc != 0)
    warn("checkpoint: cannot start the thread that allocates the staging buffer of saves (%s); "
         "the first save allocates it", strerror(rc));
  ahead.started = rc == 0;
}

static void join_ahead(void) {
  if (!ahead.started) return;
  int rc = pthread_join(ahead.thread, NULL);
  if (rc != 0)
    die("checkpoint: cannot join the thread that allocates the staging buffer: %s", strerror(rc));
  ahead.started = 0;
}

/* The first save: waits for the thread if it has not finished and takes its buffer, if it
 * allocated one of the `bytes` the save needs (the plans it was sized by say so; a mismatch is
 * reported and the save allocates its own). */
static void take_ahead(size_t bytes) {
  join_ahead();
  if (!ahead.buf) return;
  if (ahead.bytes == bytes) {
    save.staging = ahead.buf;
    save.staging_be = ahead.be;
    save.capacity = bytes / sizeof(float);
  } else {
    warn("internal: the staging buffer allocated ahead holds %zu bytes, a save needs %zu; "
         "allocating it again", ahead.bytes, bytes);
    staging_free(ahead.be, ahead.buf);
  }
  ahead.buf = NULL;
}

size_t checkpoint_staging_bytes(const struct worker_plan *p) {
  size_t tied = !p->has_embedding && p->has_head && p->cfg.tie_embeddings
                    ? (size_t)p->cfg.vocab_size * p->cfg.hidden_size : 0;
  return 3 * (p->param_floats - tied) * sizeof(float);
}

/* The floats of chunk w a save stages, the tied copy left out; adds its tensors to *tensors */
static size_t staged_floats(const struct worker *w, int *tensors) {
  size_t floats = 0;
  for (int i = 0; i < w->n_params; i++)
    if (!is_tied_copy(w, &w->params[i])) {
      floats += (size_t)w->params[i].rows * w->params[i].cols;
      (*tensors)++;
    }
  return floats;
}

/* Room for the tensors of this rank's n chunks, the tied copy excepted, in the staging buffer
 * (allocated once, ahead or else for the largest save): the writer thread writes them while
 * training changes the originals. */
static void stage_begin(const struct worker *chunks, int n) {
  size_t floats = 0, planned = 0;
  int tensors = 0;
  for (int k = 0; k < n; k++) {
    floats += staged_floats(&chunks[k], &tensors);
    planned += checkpoint_staging_bytes(&chunks[k].plan);
  }
  if (3 * floats * sizeof(float) != planned)
    die("internal: %zu floats staged for plans of %zu bytes", 3 * floats, planned);
  take_ahead(planned);
  if (3 * floats > save.capacity) {
    free_staging();
    const struct backend *be = chunks[0].be;
    save.staging = staging_alloc(be, planned);
    save.staging_be = be;
    if (!save.staging) {
      size_t available = host_available();
      die("checkpoint: out of host memory for the staging buffer of a save (%.2f GiB: the "
          "weights and AdamW moments of this stage; %.2f GiB available)",
          3.0 * floats * sizeof(float) / (1 << 30),
          available == SIZE_MAX ? -1.0 : available / 1073741824.0);
    }
    save.capacity = 3 * floats;
  }
  save.tensors = xrealloc(save.tensors, (size_t)(tensors ? tensors : 1) * sizeof *save.tensors);
  save.n_tensors = 0;
  save.part = floats;
  save.filled = 0;
}

/* Chunk w's tensors after those staged before. adam_m / adam_v: the moments of the whole
 * chunk, laid out as the weights. */
static void stage_chunk(const struct worker *w, const float *adam_m, const float *adam_v) {
  const float *src[3] = {w->weights, adam_m, adam_v};
  for (int i = 0; i < w->n_params; i++) {
    const struct param *p = &w->params[i];
    if (is_tied_copy(w, p)) continue;
    struct staged_tensor *t = &save.tensors[save.n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", p->name);
    param_shape(p, &t->ndim, t->shape);
    t->offset = save.filled;
    size_t count = (size_t)p->rows * p->cols;
    for (int k = 0; k < 3; k++)
      w->be->to_host(save.staging + k * save.part + t->offset, src[k] + p->offset,
                     count * sizeof(float));
    save.filled += count;
  }
}

/* The writer: the stage file from the staging buffer, fsynced. It calls neither die() nor MPI;
 * an error is left in save.err for the main thread. */
static void *write_stage(void *unused) {
  (void)unused;
  sleep_seconds(save.delay);
  const float *part[3] = {save.staging, save.staging + save.part, save.staging + 2 * save.part};
  struct ckpt_stage_writer *sw;
  if (ckpt_stage_create(&sw, save.path, save.stage, save.n_stages, save.err,
                        sizeof save.err) == 0) {
    int rc = 0;
    for (int i = 0; i < save.n_tensors && rc == 0; i++) {
      const struct staged_tensor *t = &save.tensors[i];
      rc = ckpt_stage_put(sw, t->name, t->ndim, t->shape, part[0] + t->offset,
                          part[1] + t->offset, part[2] + t->offset, save.err, sizeof save.err);
    }
    char later[1024];   /* after a failed put, closing the file says nothing new */
    if (rc == 0) ckpt_stage_finish(sw, save.err, sizeof save.err);
    else ckpt_stage_finish(sw, later, sizeof later);
  }
  atomic_store(&save.finished, 1);
  return NULL;
}

/* With an HDF5 that is not thread-safe, the file is written here and now. */
static void start_writer(void) {
  save.delay = test_delay("QWEN3_CKPT_WRITE_DELAY");
  save.err[0] = 0;
  atomic_store(&save.finished, 0);
  save.writing = 1;
  save.threaded = ckpt_thread_safe();
  if (!save.threaded) {
    static int warned;
    if (!warned++)
      warn("checkpoint: this HDF5 is not thread-safe: every save is written before training "
           "goes on");
    write_stage(NULL);
    return;
  }
  int rc = start_thread(&save.thread, write_stage);
  if (rc != 0)
    die("checkpoint: cannot start the thread that writes %s: %s", save.path, strerror(rc));
}

/* Waits for this rank's writer; dies with its error, which names the file. */
static void join_writer(void) {
  if (save.threaded) {
    int rc = pthread_join(save.thread, NULL);
    if (rc != 0)
      die("checkpoint: cannot join the thread that writes %s: %s", save.path, strerror(rc));
  }
  save.writing = 0;
  if (save.err[0])
    die("checkpoint: step %lld was not saved: %s", (long long)save.state.step, save.err);
}

/* Rank 0: every stage file is synced; model.h5, the rename, `latest`. */
static void commit(void) {
  char err[1024], path[4200];
  if (ckpt_commit(save.root, &save.state, save.keep_last, err, sizeof err) != 0)
    die("checkpoint: %s", err);
  ckpt_step_path(path, sizeof path, save.root, save.state.step, 0);
  info("checkpoint: step %lld saved to %s (training paused %.2f s to stage it; committed %.1f s "
       "after the save began)", (long long)save.state.step, path, save.staged - save.began,
       now_seconds() - save.began);
  if (replace_after >= 0) {
    remove_steps_after(save.root, save.state.step);
    replace_after = -1;
  }
  free(save.job);
  save.job = NULL;
}

/* Collective while a save is active (which every rank knows alike): commits it when every rank's
 * file is written; wait: waits for this rank's writer first, so that it always commits. */
static void settle(int wait) {
  if (!save.active) return;
  double done = 1;
  if (save.writing) {
    if (wait || atomic_load(&save.finished)) join_writer();
    else done = 0;
  }
  struct comm *c = save.c;
  if (c->world > 1) comm_allreduce_sum_double(c, GROUP_WORLD, &done, 1);
  if (done < c->world) return;
  if (c->rank == 0) commit();
  save.active = 0;
}

void checkpoint_poll(void) { settle(0); }

void checkpoint_wait(void) { settle(1); }

/* ZeRO-1: this rank's shard of a moment into place in `full` (the whole chunk), then every
 * replica's shard over GROUP_DP */
static void gather_moments(struct comm *c, const struct worker *w, float *full,
                           const float *shard) {
  const struct worker_plan *p = &w->plan;
  size_t len = p->shard_end - p->shard_begin;
  if (len) w->be->copy(full + p->shard_begin, shard, len * sizeof(float));
  comm_allgather_float(c, GROUP_DP, full, p->param_floats, p->shard_stride);
}

void checkpoint_save(const Job *job, struct comm *c, struct worker *chunks, int n,
                     const struct train_state *s) {
  char err[1024], tmp[4096], file[64];
  double waited = now_seconds();
  settle(1);   /* one save at a time: the previous one is committed first */
  double t0 = now_seconds();
  if (c->rank == 0 && t0 - waited > 1)
    info("checkpoint: waited %.1f s for the previous save to reach the disk", t0 - waited);
  checkpoint_dir(job, save.root, sizeof save.root);
  if (c->rank == 0 && ckpt_begin(save.root, s->step, err, sizeof err) != 0)
    die("checkpoint: %s", err);
  comm_barrier(c, GROUP_WORLD);   /* the empty .tmp directory exists */
  if (c->replica == 0) stage_begin(chunks, n);   /* the other replicas hold the same tensors */
  for (int k = 0; k < n; k++) {
    struct worker *w = &chunks[k];
    /* ZeRO-1: the replicas all-gather the AdamW moments of the whole chunk: the first moments
     * into the gradient buffer (dead between the optimizer step and the next step's zeroing),
     * the second into a temporary; replica 0 stages them */
    const float *adam_m = w->adam_m, *adam_v = w->adam_v;
    float *tmp_v = NULL;
    if (w->plan.shards > 1) {
      size_t floats = w->plan.param_floats;
      tmp_v = w->be->alloc(floats * sizeof(float));
      if (!tmp_v) die("checkpoint: out of %s memory for the gathered AdamW moments (%.1f MiB)",
                      w->be->name, floats * sizeof(float) / 1048576.0);
      gather_moments(c, w, w->grads, w->adam_m);
      gather_moments(c, w, tmp_v, w->adam_v);
      adam_m = w->grads;
      adam_v = tmp_v;
    }
    if (c->replica == 0) stage_chunk(w, adam_m, adam_v);
    if (tmp_v) w->be->free(tmp_v);
  }
  save.state = (struct ckpt_state){.step = s->step, .samples_seen = s->samples_seen,
                                   .tokens_seen = s->tokens_seen, .n_stages = c->pp,
                                   .config = chunks[0].plan.cfg};
  if (c->replica == 0) {
    ckpt_step_path(tmp, sizeof tmp, save.root, s->step, 1);
    ckpt_stage_file(file, sizeof file, c->stage, c->pp);
    snprintf(save.path, sizeof save.path, "%s/%s", tmp, file);
    save.stage = c->stage;
    save.n_stages = c->pp;
    start_writer();
  }
  if (c->rank == 0) {
    /* the job as it ran, with the number of BF16 first layers written out: a stored -1 would
     * mean whatever a later version's default is, and an absent field means 0 (the default
     * before -1, nvfp4_stored_first_layers) */
    Job stored = *job;
    Qwen3__Precision prec = *job->precision;
    prec.has_bf16_first_layers = 1;
    prec.bf16_first_layers = nvfp4_bf16_first_layers(job->precision, save.state.config.num_layers);
    stored.precision = &prec;
    save.state.job_len = qwen3__job__get_packed_size(&stored);
    save.job = xmalloc(save.state.job_len);
    qwen3__job__pack(&stored, save.job);
    save.state.job = save.job;
    save.keep_last = job->checkpoint->keep_last;
  }
  save.c = c;
  save.active = 1;
  save.began = t0;
  save.staged = now_seconds();
}

void checkpoint_release(void) {
  if (save.active) {
    struct comm *c = save.c;
    settle(1);
    comm_barrier(c, GROUP_WORLD);   /* nobody exits before the commit */
  }
  join_ahead();   /* a run that ended before its first save */
  staging_free(ahead.be, ahead.buf);
  ahead.buf = NULL;
  free_staging();
  free(save.tensors);
  save.tensors = NULL;
  if (lock_fd >= 0) close(lock_fd);   /* closing releases the flock */
  lock_fd = -1;
}

/* The checkpoint must be of the job's model: the tensors this stage loads match by name and
 * shape, and this catches what they cannot see (more layers than the job has). */
static void check_config(const char *dir, const struct qwen3_config *have,
                         const struct qwen3_config *want) {
  const struct {
    const char *key;
    int have, want;
  } f[] = {{"hidden_size", have->hidden_size, want->hidden_size},
           {"num_hidden_layers", have->num_layers, want->num_layers},
           {"num_attention_heads", have->num_heads, want->num_heads},
           {"num_key_value_heads", have->num_kv_heads, want->num_kv_heads},
           {"head_dim", have->head_dim, want->head_dim},
           {"intermediate_size", have->intermediate_size, want->intermediate_size},
           {"vocab_size", have->vocab_size, want->vocab_size},
           {"tie_word_embeddings", have->tie_embeddings, want->tie_embeddings}};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
    if (f[i].have != f[i].want)
      die("checkpoint: %s/model.h5: a checkpoint of another model shape: its %s is %d, the "
          "job's model has %d", dir, f[i].key, f[i].have, f[i].want);
  if (have->rope_theta != want->rope_theta || have->rms_norm_eps != want->rms_norm_eps)
    warn("checkpoint: %s/model.h5 was written with rope_theta %g, rms_norm_eps %g; the job uses "
         "%g, %g", dir, have->rope_theta, have->rms_norm_eps, want->rope_theta,
         want->rms_norm_eps);
}

/* A chunk's tensors by name; the AdamW moments too when `moments`, of which a rank keeps its
 * shard only (ZeRO-1): the part of each tensor inside [shard_begin, shard_end). */
static void load_chunk(struct ckpt *ck, struct worker *w, int moments) {
  char err[1024];
  size_t max = largest_param(w);
  float *host = xmalloc(max * sizeof(float));
  float *dst[3] = {w->weights, w->adam_m, w->adam_v};
  size_t sb = w->plan.shard_begin, se = w->plan.shard_end;
  for (int i = 0; i < w->n_params; i++) {
    const struct param *p = &w->params[i];
    int ndim;
    int64_t shape[2];
    param_shape(p, &ndim, shape);
    size_t n = (size_t)p->rows * p->cols;
    for (int k = 0; k < (moments ? 3 : 1); k++) {
      size_t from = k == 0 || p->offset > sb ? p->offset : sb;
      size_t to = k == 0 || p->offset + n < se ? p->offset + n : se;
      if (from >= to) continue;   /* none of this tensor's moments is in the shard */
      if (ckpt_read(ck, p->name, (enum ckpt_part)k, ndim, shape, host, err, sizeof err) != 0)
        die("checkpoint: %s", err);
      w->be->to_device(k == 0 ? dst[k] + from : dst[k] + (from - sb), host + (from - p->offset),
                       (to - from) * sizeof(float));
    }
  }
  free(host);
}

/* This rank's n chunks */
static void load_stage(struct ckpt *ck, struct worker *chunks, int n, int moments) {
  for (int k = 0; k < n; k++) load_chunk(ck, &chunks[k], moments);
  check_config(ckpt_dir(ck), &ckpt_get_state(ck)->config, &chunks[0].plan.cfg);
}

/* What a job's precision trains, in words (equal words, equal precisions): "BF16 linears", or
 * its NVFP4 layers [first, end) and the fields that give them, first as resolve_first reads it
 * (a running job's or a stored one's). */
static void describe_precision(char *out, size_t len, const Qwen3__Precision *p, int L,
                               int (*resolve_first)(const Qwen3__Precision *, int)) {
  if (p->linear != QWEN3__LINEAR_PRECISION__NVFP4) {
    snprintf(out, len, "BF16 linears");
    return;
  }
  const int first = resolve_first(p, L), end = L - nvfp4_bf16_last_layers(p, L);
  snprintf(out, len, "NVFP4 linears in layers [%d, %d) of %d (precision.bf16_first_layers %d, "
           "bf16_last_layers %d)", first, end, L, first, L - end);
}

/* A resumed run continues the one it resumes only if the data section and the NVFP4 layers did
 * not change, and an evaluation (train.steps 0) runs the weights as they trained only with the
 * same NVFP4 layers: the checkpoint keeps the job that wrote it, so say what differs (the user
 * may mean it; a checkpoint from before bf16_first_layers' default of 2 blocks is one such). */
static void compare_job(const char *dir, const struct ckpt_state *st, const Job *job) {
  if (!st->job) return;   /* a converted model: no run to continue */
  const int training = job->train->steps > 0;
  Job *old = qwen3__job__unpack(NULL, st->job_len, st->job);
  if (training && (!old || !old->data)) {
    warn("%s: the stored job does not decode; the data stream is not checked", dir);
  } else if (training) {   /* an evaluation has no sample stream to continue */
    const Qwen3__Data *a = old->data, *b = job->data;
    int same_files = a->n_train == b->n_train;
    for (size_t i = 0; same_files && i < a->n_train; i++)
      same_files = !strcmp(a->train[i], b->train[i]);
    if (a->seed != b->seed || a->seq_len != b->seq_len || !same_files)
      warn("%s was written with data.seed %llu, data.seq_len %d and %zu train shard(s); this job "
           "has %llu, %d and %zu%s: the resumed run draws a different sample stream", dir,
           (unsigned long long)a->seed, a->seq_len, a->n_train, (unsigned long long)b->seed,
           b->seq_len, b->n_train, same_files ? "" : " (other files)");
  }
  if (old && old->precision) {
    char was[160], now[160];
    describe_precision(was, sizeof was, old->precision, st->config.num_layers,
                       nvfp4_stored_first_layers);
    describe_precision(now, sizeof now, job->precision, st->config.num_layers,
                       nvfp4_bf16_first_layers);
    if (strcmp(was, now))
      warn("%s was trained with %s; this job %s %s: %s", dir, was,
           training ? "trains" : "evaluates with", now,
           training ? "the resumed run's linears change precision"
                    : "its linears run in another precision than they trained in");
  }
  if (old) qwen3__job__free_unpacked(old, NULL);
}

int checkpoint_resume(const Job *job, struct comm *c, struct worker *chunks, int n,
                      struct train_state *s) {
  const char *resume = job->checkpoint->resume;
  if (!strcmp(resume, "NEVER")) return 0;
  char root[4096], dir[4096] = "", err[1024];
  /* rank 0 decides, so that every rank loads the same step even if `latest` moves */
  if (c->rank == 0) {
    if (!strcmp(resume, "AUTO")) {
      checkpoint_dir(job, root, sizeof root);
      int newer;
      if (find_auto(job, root, dir, sizeof dir, &newer, err, sizeof err) < 0)
        die("checkpoint.resume AUTO: %s", err);
      if (newer)
        info("checkpoint: %s is whole but `latest` does not name it (a run ended while "
             "committing it): continuing from it", dir);
    } else if (ckpt_resolve(resume, dir, sizeof dir, err, sizeof err) != 0) {
      die("checkpoint.resume: %s", err);
    }
  }
  comm_broadcast(c, GROUP_WORLD, dir, sizeof dir, 0);
  if (!dir[0]) return 0;
  struct ckpt *ck;
  if (ckpt_open(&ck, dir, err, sizeof err) != 0) die("checkpoint.resume: %s", err);
  load_stage(ck, chunks, n, 1);
  const struct ckpt_state *st = ckpt_get_state(ck);
  s->step = (int)st->step;
  s->samples_seen = st->samples_seen;
  s->tokens_seen = st->tokens_seen;
  if (c->rank == 0) {
    compare_job(dir, st, job);
    info("checkpoint: %s %s (step %d, written by %d stage%s)",
         job->train->steps > 0 ? "resuming from" : "loading", dir, s->step, st->n_stages,
         st->n_stages == 1 ? "" : "s");
    if (job->train->steps > 0 && s->step >= job->train->steps)
      info("checkpoint: step %d is already at train.steps = %d; nothing to train", s->step,
           job->train->steps);
  }
  ckpt_close(ck);
  return 1;
}

int checkpoint_load_weights(const char *dir, struct worker *chunks, int n) {
  char err[1024];
  struct ckpt *ck;
  if (ckpt_open(&ck, dir, err, sizeof err) != 0) die("init.checkpoint: %s", err);
  load_stage(ck, chunks, n, 0);
  int step = (int)ckpt_get_state(ck)->step;
  ckpt_close(ck);
  return step;
}
