/* comm.h over MPI on host memory. Every MPI call goes through MPI_CHECK: MPI_COMM_WORLD returns
 * errors instead of aborting with MPI's own message (communicators split from it inherit that),
 * and MPI_CHECK turns an error into die(), which names the rank and the call and then aborts every
 * rank through g_abort_hook.
 *
 * MPI counts are int, so transfers and reductions larger than INT_MAX elements go in chunks; both
 * sides of a transfer cut the same chunks, and MPI keeps messages of one (source, tag,
 * communicator) in order, so the chunks reassemble in place.
 *
 * Tensors in device memory go through the host with the backend's copies (comm_set_device_copy),
 * unless a device transport (comm_nccl.c, comm_device.h) took the tensor calls over.
 *
 * No wait for a peer is unbounded: every call that waits starts the non-blocking form of its MPI
 * operation and polls it (wait_request) for at most c->timeout seconds (QWEN3_COMM_TIMEOUT_S),
 * then dies naming the operation. A peer that exits is MPI's to report (mpirun ends the job); a
 * peer that is stopped or stuck would otherwise hold every rank forever. */
#define _POSIX_C_SOURCE 200809L
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "comm/comm_device.h"
#include "common/util.h"

#define MPI_CHECK(call)                                                         \
  do {                                                                          \
    int err_ = (call);                                                          \
    if (err_ != MPI_SUCCESS) {                                                  \
      char msg_[MPI_MAX_ERROR_STRING];                                          \
      int len_ = 0;                                                             \
      MPI_Error_string(err_, msg_, &len_);                                      \
      die("%s: %s failed: %.*s", __func__, #call, len_, msg_);                  \
    }                                                                           \
  } while (0)

struct mpi_state {
  MPI_Comm pipe, dp, tied;   /* MPI_COMM_NULL until comm_set_layout; tied also off the ends */
  MPI_Request *sends;        /* outstanding comm_send chunks, completed by comm_wait_sends */
  char **staged;             /* [n_sends]: the copy a send's first chunk owns; NULL for others */
  int n_sends, cap_sends;
  MPI_Request *sums;         /* comm_allreduce_sum_float_start's, until comm_wait_reductions */
  int n_sums, cap_sums;
  int tag_ub;                /* the largest tag this MPI allows */
  comm_copy_fn to_host, to_device;   /* tensors in device memory: staged through the host */
  struct comm_device_transport dev;  /* the tensor calls, when NCCL took them over */
};

/* g_abort_hook. MPI_Abort is the one call left unchecked (here and in comm_abort): it does not
 * return, and a failure to abort has nowhere better to go than die()'s exit(1). */
static void abort_job(int code) { MPI_Abort(MPI_COMM_WORLD, code); }

static struct mpi_state *state(struct comm *c) { return c->impl; }

/* QWEN3_COMM_TIMEOUT_S: the longest wait for a peer, 600 s unless set. */
static double comm_timeout_from_env(void) {
  const char *old = getenv("QWEN3_NCCL_TIMEOUT_S");
  if (old && *old)
    die("QWEN3_NCCL_TIMEOUT_S was renamed QWEN3_COMM_TIMEOUT_S (it bounds every wait for a peer, "
        "over MPI as well as NCCL): set that instead");
  const char *v = getenv("QWEN3_COMM_TIMEOUT_S");
  if (!v || !*v) return 600;
  char *end;
  double x = strtod(v, &end);
  if (*end || !(x > 0)) die("QWEN3_COMM_TIMEOUT_S=%s: expected a positive number of seconds", v);
  return x;
}

static const char *group_name(enum comm_group g) {
  static const char *names[] = {"world", "pipe", "dp", "tied"};
  return g >= GROUP_WORLD && g <= GROUP_TIED ? names[g] : "?";
}

/* Polls *r until it completes; spins for the first millisecond (a pipeline's critical path
 * waits here), then sleeps 50 us between polls. Dies after c->timeout seconds, naming `what`. */
static void wait_request(struct comm *c, MPI_Request *r, MPI_Status *status, const char *what) {
  double start = now_seconds();
  for (;;) {
    int done, err = MPI_Test(r, &done, status ? status : MPI_STATUS_IGNORE);
    if (err != MPI_SUCCESS) {   /* the operation's own error (a truncated message, say) */
      char msg[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(err, msg, &len);
      die("%s failed: %.*s", what, len, msg);
    }
    if (done) return;
    double waited = now_seconds() - start;
    if (waited > c->timeout)
      die("%s: no answer within %.0f s (QWEN3_COMM_TIMEOUT_S): a rank is gone, stuck, or waits "
          "for something else",
          what, c->timeout);
    if (waited > 1e-3) nanosleep(&(struct timespec){0, 50000}, NULL);
  }
}

void comm_init(struct comm *c, int *argc, char ***argv) {
  /* until the handler is set, errors abort inside MPI with its own message */
  /* FUNNELED: the checkpoint writer is a second thread (trainer/checkpoint.c); only the main
   * thread calls MPI, which is what this level allows */
  int provided;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  if (provided < MPI_THREAD_FUNNELED)
    warn("this MPI library runs processes of one thread only (MPI_THREAD_FUNNELED not "
         "provided); the checkpoint writer thread makes no MPI calls");
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  struct mpi_state *st = xcalloc(1, sizeof *st);
  st->pipe = st->dp = st->tied = MPI_COMM_NULL;
  *c = (struct comm){.impl = st, .timeout = comm_timeout_from_env()};
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c->world));
  MPI_Comm node;   /* the ranks sharing this machine: they share its cores (or GPUs) */
  MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL,
                                &node));
  MPI_CHECK(MPI_Comm_rank(node, &c->local_rank));
  MPI_CHECK(MPI_Comm_size(node, &c->local_size));
  MPI_CHECK(MPI_Comm_free(&node));
  snprintf(g_log_tag, sizeof g_log_tag, "rank %d/%d", c->rank, c->world);
  g_abort_hook = abort_job;
  int *ub, flag;
  MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag));
  st->tag_ub = flag ? *ub : 32767;   /* 32767 is the least the standard guarantees */
}

void comm_set_layout(struct comm *c, int pp) {
  struct mpi_state *st = state(c);
  if (st->pipe != MPI_COMM_NULL) die("comm_set_layout called twice");
  if (pp < 1 || c->world % pp != 0)
    die("parallel.pipeline_stages = %d does not divide the world size %d (mpirun -np): the world "
        "is pipeline_stages x data-parallel replicas",
        pp, c->world);
  c->pp = pp;
  c->dp = c->world / pp;
  c->stage = c->rank % pp;
  c->replica = c->rank / pp;
  /* keys order the members so that the rank within GROUP_PIPE is the stage, within GROUP_DP the
   * replica, and within GROUP_TIED 0 the first stage and 1 the last */
  MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, c->replica, c->stage, &st->pipe));
  MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, c->stage, c->replica, &st->dp));
  if (pp > 1) {
    int ends = c->stage == 0 || c->stage == pp - 1;
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, ends ? c->replica : MPI_UNDEFINED, c->stage,
                             &st->tied));
  }
}

static MPI_Comm group_comm(struct comm *c, enum comm_group g) {
  struct mpi_state *st = state(c);
  if (g != GROUP_WORLD && st->pipe == MPI_COMM_NULL)
    die("communication group %d used before comm_set_layout", (int)g);
  switch (g) {
  case GROUP_WORLD: return MPI_COMM_WORLD;
  case GROUP_PIPE: return st->pipe;
  case GROUP_DP: return st->dp;
  case GROUP_TIED:
    if (c->pp == 1) die("GROUP_TIED needs parallel.pipeline_stages > 1: one stage holds both ends");
    if (st->tied == MPI_COMM_NULL)
      die("GROUP_TIED used on stage %d, which is neither the first nor the last of %d", c->stage,
          c->pp);
    return st->tied;
  }
  die("unknown communication group %d", (int)g);
}

/* The pipeline peer `stage` of this replica, checked: a message to oneself or past the ends is a
 * schedule bug that would otherwise hang. */
static void check_peer(struct comm *c, int stage, int tag, const char *what) {
  if (state(c)->pipe == MPI_COMM_NULL) die("%s before comm_set_layout", what);
  if (stage < 0 || stage >= c->pp || stage == c->stage)
    die("%s: peer stage %d invalid on stage %d of %d", what, stage, c->stage, c->pp);
  if (tag < 0 || tag > state(c)->tag_ub)
    die("%s: tag %d outside 0..%d", what, tag, state(c)->tag_ub);
}

static int chunk_of(size_t left) { return left > INT_MAX ? INT_MAX : (int)left; }

/* Frees the copies once every outstanding send completed, so that a long run of sends between
 * two waits (a generation, say) does not hold every copy. */
static void reap_sends(struct mpi_state *st) {
  int all;
  MPI_CHECK(MPI_Testall(st->n_sends, st->sends, &all, MPI_STATUSES_IGNORE));
  if (!all) return;
  for (int i = 0; i < st->n_sends; i++) free(st->staged[i]);
  st->n_sends = 0;
}

/* Sends `copy`, a host buffer of ours that comm_wait_sends frees. */
static void send_copy(struct comm *c, char *copy, size_t bytes, int to_stage, int tag) {
  struct mpi_state *st = state(c);
  const char *p = copy;
  size_t left = bytes;
  do {   /* once even for 0 bytes: the receive waits for a message */
    int n = chunk_of(left);
    if (st->n_sends == st->cap_sends) {
      st->cap_sends = st->cap_sends ? 2 * st->cap_sends : 16;
      st->sends = xrealloc(st->sends, st->cap_sends * sizeof *st->sends);
      st->staged = xrealloc(st->staged, st->cap_sends * sizeof *st->staged);
    }
    MPI_CHECK(MPI_Isend(p, n, MPI_BYTE, to_stage, tag, st->pipe, &st->sends[st->n_sends]));
    st->staged[st->n_sends++] = p == copy ? copy : NULL;
    p += n;
    left -= n;
  } while (left > 0);
}

/* the caller may reuse buf at once (comm.h): MPI sends from a copy of ours */
void comm_send(struct comm *c, const void *buf, size_t bytes, int to_stage, int tag) {
  check_peer(c, to_stage, tag, "comm_send");
  if (state(c)->n_sends >= 16) reap_sends(state(c));
  char *copy = xmalloc(bytes ? bytes : 1);
  memcpy(copy, buf, bytes);
  send_copy(c, copy, bytes, to_stage, tag);
}

void comm_set_device_copy(struct comm *c, comm_copy_fn to_host, comm_copy_fn to_device) {
  state(c)->to_host = to_host;
  state(c)->to_device = to_device;
}

void comm_set_device_transport(struct comm *c, const struct comm_device_transport *t) {
  state(c)->dev = t ? *t : (struct comm_device_transport){0};
}

void comm_send_tensor(struct comm *c, const void *buf, size_t bytes, int to_stage, int tag) {
  struct mpi_state *st = state(c);
  if (st->dev.send) {
    check_peer(c, to_stage, tag, "comm_send_tensor");
    st->dev.send(st->dev.state, buf, bytes, to_stage, tag);
    return;
  }
  if (!st->to_host) {
    comm_send(c, buf, bytes, to_stage, tag);
    return;
  }
  check_peer(c, to_stage, tag, "comm_send_tensor");
  if (st->n_sends >= 16) reap_sends(st);
  char *copy = xmalloc(bytes ? bytes : 1);
  st->to_host(copy, buf, bytes);   /* the one copy: device straight into the send buffer */
  send_copy(c, copy, bytes, to_stage, tag);
}

void comm_recv_tensor(struct comm *c, void *buf, size_t bytes, int from_stage, int tag) {
  struct mpi_state *st = state(c);
  if (st->dev.recv) {
    check_peer(c, from_stage, tag, "comm_recv_tensor");
    st->dev.recv(st->dev.state, buf, bytes, from_stage, tag);
    return;
  }
  if (!st->to_device) {
    comm_recv(c, buf, bytes, from_stage, tag);
    return;
  }
  char *host = xmalloc(bytes ? bytes : 1);
  comm_recv(c, host, bytes, from_stage, tag);
  st->to_device(buf, host, bytes);
  free(host);
}

void comm_recv(struct comm *c, void *buf, size_t bytes, int from_stage, int tag) {
  check_peer(c, from_stage, tag, "comm_recv");
  char *p = buf;
  size_t left = bytes;
  do {
    int n = chunk_of(left), got;
    MPI_Status status;
    MPI_Request r;
    char what[96];
    snprintf(what, sizeof what, "comm_recv: receive of %d bytes from stage %d (tag %d)", n,
             from_stage, tag);
    /* a longer message fails here with MPI_ERR_TRUNCATE, a shorter one in the check below */
    MPI_CHECK(MPI_Irecv(p, n, MPI_BYTE, from_stage, tag, state(c)->pipe, &r));
    wait_request(c, &r, &status, what);
    MPI_CHECK(MPI_Get_count(&status, MPI_BYTE, &got));
    if (got != n)
      die("comm_recv: %d bytes from stage %d (tag %d), expected %d", got, from_stage, tag, n);
    p += n;
    left -= n;
  } while (left > 0);
}

void comm_wait_sends(struct comm *c) {
  struct mpi_state *st = state(c);
  if (st->dev.wait_sends) st->dev.wait_sends(st->dev.state);
  /* every chunk first: a message's later chunks send from the copy its first chunk owns */
  for (int i = 0; i < st->n_sends; i++)
    wait_request(c, &st->sends[i], NULL, "delivery of a sent message");
  for (int i = 0; i < st->n_sends; i++) free(st->staged[i]);
  st->n_sends = 0;
}

/* MPI_Allreduce's summation order is the collective algorithm's, which Open MPI picks from the
 * communicator size and the message size alone; with a fixed layout and buffer the order, and so
 * every bit of the result, is the same in every run and on every member (IEEE addition of two
 * numbers is commutative). A different number of replicas may round differently. */
static void allreduce(struct comm *c, enum comm_group g, void *buf, size_t n, MPI_Datatype type,
                      size_t size) {
  MPI_Comm comm = group_comm(c, g);
  char *p = buf;
  for (size_t left = n; left > 0;) {
    int k = chunk_of(left);
    MPI_Request r;
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p, k, type, MPI_SUM, comm, &r));
    char what[96];
    snprintf(what, sizeof what, "sum of %d values over group %s", k, group_name(g));
    wait_request(c, &r, NULL, what);
    p += (size_t)k * size;
    left -= k;
  }
}

void comm_allreduce_sum_float(struct comm *c, enum comm_group g, float *buf, size_t n) {
  struct mpi_state *st = state(c);
  if (st->dev.allreduce_sum_float) {
    group_comm(c, g);   /* dies naming a group this rank is not in */
    if (st->dev.allreduce_sum_float(st->dev.state, g, buf, n)) return;
  }
  if (!st->to_host) {
    allreduce(c, g, buf, n, MPI_FLOAT, sizeof *buf);
    return;
  }
  float *host = xmalloc((n ? n : 1) * sizeof *host);
  st->to_host(host, buf, n * sizeof *host);
  allreduce(c, g, host, n, MPI_FLOAT, sizeof *host);
  st->to_device(buf, host, n * sizeof *host);
  free(host);
}

void comm_allreduce_sum_float_start(struct comm *c, enum comm_group g, float *buf, size_t n) {
  struct mpi_state *st = state(c);
  MPI_Comm comm = group_comm(c, g);   /* dies naming a group this rank is not in */
  if (st->dev.allreduce_start && st->dev.allreduce_start(st->dev.state, g, buf, n)) return;
  if (st->to_host) {   /* staged through the host: nothing to overlap with */
    comm_allreduce_sum_float(c, g, buf, n);
    return;
  }
  for (size_t left = n; left > 0;) {
    int k = chunk_of(left);
    if (st->n_sums == st->cap_sums) {
      st->cap_sums = st->cap_sums ? 2 * st->cap_sums : 64;
      st->sums = xrealloc(st->sums, st->cap_sums * sizeof *st->sums);
    }
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, k, MPI_FLOAT, MPI_SUM, comm,
                             &st->sums[st->n_sums++]));
    buf += k;
    left -= k;
  }
}

void comm_wait_reductions(struct comm *c) {
  struct mpi_state *st = state(c);
  if (st->dev.wait_reductions) st->dev.wait_reductions(st->dev.state);
  for (int i = 0; i < st->n_sums; i++)
    wait_request(c, &st->sums[i], NULL, "a sum started during backward");
  st->n_sums = 0;
}

void comm_allreduce_sum_double(struct comm *c, enum comm_group g, double *buf, size_t n) {
  allreduce(c, g, buf, n, MPI_DOUBLE, sizeof *buf);
}

/* Member i's shard of n floats cut in shards of `shard`: [*begin, *begin + return). */
static size_t shard_range(size_t n, size_t shard, int i, size_t *begin) {
  size_t b = (size_t)i * shard;
  if (b > n) b = n;
  *begin = b;
  return n - b < shard ? n - b : shard;
}

/* The sharded collectives on host memory. MPI's counts and displacements are int, so they go in
 * rounds: round k moves floats [k * step, (k + 1) * step) of every shard, packed into
 * consecutive pieces of `pack` (the layout MPI_Reduce_scatter and MPI_Allgatherv want). */
static void sharded(struct comm *c, enum comm_group g, float *buf, size_t n, size_t shard,
                    int reduce) {
  MPI_Comm comm = group_comm(c, g);
  int size, me;
  MPI_CHECK(MPI_Comm_size(comm, &size));
  MPI_CHECK(MPI_Comm_rank(comm, &me));
  if (shard == 0 || (size_t)size * shard < n)
    die("internal: %zu floats in %d shards of %zu", n, size, shard);
  size_t step = (size_t)INT_MAX / (size_t)size;
  if (step > shard) step = shard;
  int *counts = xmalloc((size_t)size * sizeof *counts), *displs = xmalloc((size_t)size * sizeof *displs);
  float *pack = xmalloc((size_t)size * step * sizeof *pack), *mine = xmalloc(step * sizeof *mine);
  for (size_t at = 0; at < shard; at += step) {
    int total = 0;
    for (int i = 0; i < size; i++) {
      size_t b, len = shard_range(n, shard, i, &b);
      size_t k = len > at ? len - at : 0;
      counts[i] = (int)(k < step ? k : step);
      displs[i] = total;
      total += counts[i];
      if (reduce || i == me) memcpy(pack + displs[i], buf + b + at, counts[i] * sizeof *buf);
    }
    size_t b;
    shard_range(n, shard, me, &b);
    MPI_Request r;
    if (reduce) {
      MPI_CHECK(MPI_Ireduce_scatter(pack, mine, counts, MPI_FLOAT, MPI_SUM, comm, &r));
      wait_request(c, &r, NULL, "reduce-scatter");
      memcpy(buf + b + at, mine, counts[me] * sizeof *buf);
    } else {
      MPI_CHECK(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, pack, counts, displs,
                                MPI_FLOAT, comm, &r));
      wait_request(c, &r, NULL, "all-gather");
      for (int i = 0; i < size; i++) {
        size_t bi;
        shard_range(n, shard, i, &bi);
        memcpy(buf + bi + at, pack + displs[i], counts[i] * sizeof *buf);
      }
    }
  }
  free(counts);
  free(displs);
  free(pack);
  free(mine);
}

/* A tensor in device memory goes through a host copy of the whole buffer. */
static void sharded_tensor(struct comm *c, enum comm_group g, float *buf, size_t n, size_t shard,
                           int reduce) {
  struct mpi_state *st = state(c);
  group_comm(c, g);
  if (st->dev.sharded_float && st->dev.sharded_float(st->dev.state, g, buf, n, shard, reduce))
    return;
  if (!st->to_host) {
    sharded(c, g, buf, n, shard, reduce);
    return;
  }
  float *host = xmalloc((n ? n : 1) * sizeof *host);
  st->to_host(host, buf, n * sizeof *host);
  sharded(c, g, host, n, shard, reduce);
  st->to_device(buf, host, n * sizeof *host);
  free(host);
}

void comm_reduce_scatter_sum_float(struct comm *c, enum comm_group g, float *buf, size_t n,
                                   size_t shard) {
  sharded_tensor(c, g, buf, n, shard, 1);
}

void comm_allgather_float(struct comm *c, enum comm_group g, float *buf, size_t n, size_t shard) {
  sharded_tensor(c, g, buf, n, shard, 0);
}

void comm_broadcast(struct comm *c, enum comm_group g, void *buf, size_t bytes, int root) {
  MPI_Comm comm = group_comm(c, g);
  int size;
  MPI_CHECK(MPI_Comm_size(comm, &size));
  if (root < 0 || root >= size) die("comm_broadcast: root %d outside a group of %d", root, size);
  char *p = buf;
  for (size_t left = bytes; left > 0;) {
    int k = chunk_of(left);
    MPI_Request r;
    MPI_CHECK(MPI_Ibcast(p, k, MPI_BYTE, root, comm, &r));
    wait_request(c, &r, NULL, "broadcast");
    p += k;
    left -= k;
  }
}

void comm_barrier(struct comm *c, enum comm_group g) {
  MPI_Request r;
  MPI_CHECK(MPI_Ibarrier(group_comm(c, g), &r));
  wait_request(c, &r, NULL, "barrier");
}

_Noreturn void comm_abort(struct comm *c, int code) {
  /* the hook chain: comm_nccl.c aborts its communicators first, then abort_job */
  if (g_abort_hook) g_abort_hook(code);
  abort_job(code);
  exit(code);   /* MPI_Abort does not return; the compiler does not know */
}

void comm_finalize(struct comm *c) {
  struct mpi_state *st = state(c);
  comm_wait_sends(c);
  comm_wait_reductions(c);
  if (st->dev.finalize) st->dev.finalize(st->dev.state);   /* restores g_abort_hook */
  st->dev = (struct comm_device_transport){0};
  MPI_Comm *comms[] = {&st->pipe, &st->dp, &st->tied};
  for (int i = 0; i < 3; i++)
    if (*comms[i] != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(comms[i]));
  /* after MPI_Finalize a failing rank can only exit on its own */
  g_abort_hook = NULL;
  MPI_CHECK(MPI_Finalize());
  free(st->sends);
  free(st->staged);
  free(st->sums);
  free(st);
  c->impl = NULL;
}
