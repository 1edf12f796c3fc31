/* comm.h's tensor calls over NCCL, for jobs in which every rank drives a GPU of its own
 * (DESIGN.md, Parallel layout). comm_mpi.c stays the transport of the job: it keeps the layout and
 * the control messages, checks each tensor call's peer and group, and hands the call over here
 * (comm_device.h). Built with QWEN3_HAVE_NCCL (CMake finds NCCL in CUDA builds); otherwise this
 * file is only the stub of comm_nccl_enable at its end.
 *
 * Communicators: one per group that exists (GROUP_PIPE when pp > 1, GROUP_DP when dp > 1,
 * GROUP_TIED on the first and last stage when pp > 1), rank within it as in comm_mpi.c (the stage,
 * the replica, 0 for the first stage and 1 for the last); the unique id comes from the group's
 * rank 0 over the group's MPI communicator. GROUP_WORLD has none: a float sum over the world
 * (nothing in the trainer does one) goes through the host over MPI.
 *
 * Streams and ordering. The pipeline's transfers and the tied embedding's sums run on one
 * communication stream, in the order the host issued them, so the schedules (trainer/schedule.c,
 * proven to hold when a send completes only as its receive is posted: "NCCL on one stream") pair
 * them without deadlock. The data-parallel group's operations run on a second stream of their
 * own: its sums may be started during backward (comm_allreduce_sum_float_start) and run for the
 * rest of it, and the pipeline's transfers must not queue behind them. One stream per
 * communicator keeps each communicator's operations in the order every member issued them, which
 * is what NCCL needs. Against the compute stream (the backend's):
 *  - a send first copies the buffer, on the compute stream, into a device buffer of ours (a send
 *    buffer), then the communication stream waits for that copy and sends from the send buffer.
 *    So the caller may write its buffer as soon as comm_send_tensor returns (comm.h), and the
 *    compute stream never waits for a send: later kernels run while the tensor travels. The copy
 *    costs a device-to-device pass over the tensor (tens of microseconds for an activation) and
 *    QWEN3_NCCL_SEND_BUFFERS (default 2) buffers of the largest tensor sent; a send that finds
 *    them all in flight first waits (polling, see below) for the oldest to be delivered. We chose
 *    this over making the compute stream wait for each send to finish, which stalls the compute
 *    stream for the whole transfer and until the peer reaches its receive.
 *  - a receive has the communication stream wait for the work queued so far on the compute
 *    stream (which may still read the buffer), receives into the buffer, then the host waits for
 *    it (polling) and the compute stream waits on its event. So a receive blocks as comm.h says:
 *    when it returns the data is there, and the kernels the trainer launches next on the compute
 *    stream read it. The host waiting too (not only the compute stream) costs little, since the
 *    next kernels need the data anyway, and it keeps the rule below.
 *  - an all-reduce is ordered like a receive: in place, ncclFloat, ncclSum; so are the sharded
 *    collectives. A started all-reduce is queued the same way, and only comm_wait_reductions
 *    waits for it (the host, then the compute stream).
 * The rule this keeps: the compute stream only ever waits on NCCL work that the host has seen
 * complete. So a lost peer or a stuck transfer can only hold the host in one of the waits here,
 * which poll with a time-out, never in a synchronisation of the backend's that has none.
 *
 * Errors and hangs: every NCCL and CUDA call is checked (file, line, the operation, NCCL's
 * message). Waits poll cudaEventQuery, check ncclCommGetAsyncError of every communicator, and
 * give up after QWEN3_COMM_TIMEOUT_S seconds (default 600). On an error or a time-out every
 * communicator is aborted (ncclCommAbort) and die() names the rank, group and operation; die()
 * then ends the job through g_abort_hook, which this file chains so that a die() from anywhere
 * (a CUDA error in a kernel, say) also aborts the communicators before MPI_Abort. */
#define _POSIX_C_SOURCE 200809L
#include "comm/comm.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#ifndef QWEN3_HAVE_NCCL

int comm_nccl_enable(struct comm *c, void *compute_stream) {
  (void)compute_stream;
  const char *env = getenv("QWEN3_NCCL");
  if (c->world == 1 || !env || !*env || !strcmp(env, "0")) return 0;
  if (!strcmp(env, "1"))
    die("QWEN3_NCCL=1, but this build has no NCCL (CMake found no nccl.h and libnccl with nvcc)");
  die("QWEN3_NCCL=%s: expected 0 (off) or 1 (required); unset: on when every rank has a GPU", env);
}

#else

#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "comm/comm_device.h"

#define MAX_SEND_BUFFERS 16

struct group {
  ncclComm_t comm;     /* NULL where the group does not exist for this rank */
  const char *name;
  int rank, size;
  cudaStream_t stream;   /* where its operations run (see the top of this file) */
  cudaEvent_t started;   /* after its last started all-reduce */
  int pending;           /* started all-reduces not yet waited for */
};

struct send_buffer {
  void *buf;
  size_t cap;
  cudaEvent_t done;    /* recorded on the communication stream after the send from buf */
  int busy;            /* the send may still be in flight */
  unsigned long seq;   /* the order of the sends: the oldest is waited for first */
  char what[160];      /* the send, for error messages */
};

struct nccl_state {
  struct comm *c;
  struct group groups[GROUP_TIED + 1];   /* indexed by enum comm_group; GROUP_WORLD unused */
  int device;
  cudaStream_t compute;   /* the backend's */
  cudaStream_t stream;    /* ours: the pipeline's transfers and the tied sums */
  cudaStream_t dp_stream; /* ours: the data-parallel group's operations */
  cudaEvent_t ready;      /* compute -> communication stream */
  cudaEvent_t done;       /* communication -> compute stream, after a receive or all-reduce */
  struct send_buffer sends[MAX_SEND_BUFFERS];
  int n_sends, max_sends;
  unsigned long send_seq;
  double timeout;
  float *warmup;          /* two floats, for the connections made at enable time */
};

/* The one state of this process, for the abort hook (which takes no argument). */
static struct nccl_state *g_nccl;
static volatile int g_aborted;
static void (*g_prev_abort_hook)(int code);

/* ncclCommAbort on every communicator, once. Called on the way out only: after it, no NCCL call
 * is made, and the work queued on the communication stream ends without finishing. */
static void abort_comms(void) {
  if (!g_nccl || g_aborted) return;
  g_aborted = 1;
  /* Should an abort itself hang, SIGALRM ends this process in 20 s, and mpirun then the job:
   * the job must end either way. Nothing in the trainer handles SIGALRM. */
  alarm(20);
  for (int g = 0; g <= GROUP_TIED; g++)
    if (g_nccl->groups[g].comm) {
      ncclCommAbort(g_nccl->groups[g].comm);   /* unchecked: we are dying anyway */
      g_nccl->groups[g].comm = NULL;
    }
}

/* g_abort_hook while NCCL is on: die() anywhere aborts the communicators, then MPI's hook ends
 * the job. */
static void abort_hook(int code) {
  abort_comms();
  if (g_prev_abort_hook) g_prev_abort_hook(code);
}

static _Noreturn void fail(const char *fmt, ...) PRINTF_LIKE(1, 2);
static _Noreturn void fail(const char *fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  abort_comms();
  die("%s", msg);
}

static const char *nccl_last_error(void) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char *m = ncclGetLastError(NULL);
  return m && *m ? m : "no further detail";
#else
  return "no further detail";
#endif
}

/* Every NCCL call: `what` names the operation and its group for the message. */
#define NCCL_CHECK(what, call)                                                              \
  do {                                                                                      \
    ncclResult_t r_ = (call);                                                               \
    if (r_ != ncclSuccess)                                                                  \
      fail("NCCL error at %s:%d during %s: %s: %s (%s)", __FILE__, __LINE__, (what), #call, \
           ncclGetErrorString(r_), nccl_last_error());                                      \
  } while (0)

/* Every CUDA runtime call of this file (comm/ does not use the backend's macros). */
#define CUDA_RT_CHECK(what, call)                                                      \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess)                                                             \
      fail("CUDA error at %s:%d during %s: %s: %s", __FILE__, __LINE__, (what), #call, \
           cudaGetErrorString(e_));                                                    \
  } while (0)

/* Dies when any communicator has met an error since: a peer or network failure shows here. */
static void check_async(struct nccl_state *s, const char *what) {
  for (int g = 0; g <= GROUP_TIED; g++) {
    struct group *gr = &s->groups[g];
    if (!gr->comm) continue;
    ncclResult_t async = ncclSuccess;
    NCCL_CHECK(what, ncclCommGetAsyncError(gr->comm, &async));
    if (async != ncclSuccess && async != ncclInProgress)
      fail("NCCL error on group %s (rank %d of %d) during %s: %s (%s)", gr->name, gr->rank,
           gr->size, what, ncclGetErrorString(async), nccl_last_error());
  }
}

static void pause_us(long us) {
  struct timespec ts = {0, us * 1000};
  nanosleep(&ts, NULL);
}

/* Waits until `ev`, recorded on the communication stream after `what`, has happened. Spins for
 * the first millisecond (a pipeline's critical path runs through here), then sleeps 50 us between
 * polls; dies after the time-out or on a NCCL error. */
static void wait_event(struct nccl_state *s, cudaEvent_t ev, const char *what) {
  double start = now_seconds();
  for (unsigned long polls = 0;; polls++) {
    cudaError_t e = cudaEventQuery(ev);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady)
      fail("CUDA error while waiting for NCCL: %s: %s", what, cudaGetErrorString(e));
    double waited = now_seconds() - start;
    if (waited > 1e-3 || polls % 64 == 0) check_async(s, what);
    if (waited > s->timeout)
      fail("NCCL: %s did not complete within %.0f s (QWEN3_COMM_TIMEOUT_S): a peer is gone, "
           "stuck, or waits for something else",
           what, s->timeout);
    if (waited > 1e-3) pause_us(50);
  }
}

static struct nccl_state *state_of(void *state) { return state; }

/* NCCL reads and writes device memory only: a host buffer here is a caller's bug that would
 * otherwise fault inside a NCCL kernel. */
static void check_device_buffer(struct nccl_state *s, const void *buf, size_t bytes,
                                const char *what) {
  if (!bytes) return;
  struct cudaPointerAttributes a;
  cudaError_t e = cudaPointerGetAttributes(&a, buf);
  if (e != cudaSuccess) {
    cudaGetLastError();   /* clear it: the error is ours to report */
    fail("NCCL %s: buffer %p is not device memory (%s)", what, buf, cudaGetErrorString(e));
  }
  if ((a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) || a.device != s->device)
    fail("NCCL %s: buffer %p is not device memory of GPU %d (memory type %d, device %d)", what,
         buf, s->device, (int)a.type, a.device);
}

/* The compute stream's work so far happens before what `stream` does next. */
static void comm_after_compute(struct nccl_state *s, cudaStream_t stream, const char *what) {
  CUDA_RT_CHECK(what, cudaEventRecord(s->ready, s->compute));
  CUDA_RT_CHECK(what, cudaStreamWaitEvent(stream, s->ready, 0));
}

/* The host waits until the work queued so far on both communication streams has happened. */
static void wait_streams(struct nccl_state *s, const char *what) {
  cudaStream_t streams[] = {s->stream, s->dp_stream};
  for (int i = 0; i < 2; i++) {
    CUDA_RT_CHECK(what, cudaEventRecord(s->done, streams[i]));
    wait_event(s, s->done, what);
  }
}

/* After a receive or all-reduce was queued on `stream`: the host waits for it, then orders the
 * compute stream after it (a wait on an event already complete, which keeps the ordering
 * explicit). */
static void finish_on_compute(struct nccl_state *s, cudaStream_t stream, const char *what) {
  CUDA_RT_CHECK(what, cudaEventRecord(s->done, stream));
  wait_event(s, s->done, what);
  CUDA_RT_CHECK(what, cudaStreamWaitEvent(s->compute, s->done, 0));
}

/* A send buffer of at least `bytes` whose previous send was delivered: a free one, else a new
 * one while fewer than max_sends exist, else the oldest once its send completed. */
static struct send_buffer *take_send_buffer(struct nccl_state *s, size_t bytes, const char *what) {
  struct send_buffer *b = NULL;
  for (int i = 0; i < s->n_sends && !b; i++) {
    struct send_buffer *x = &s->sends[i];
    if (x->busy) {
      cudaError_t e = cudaEventQuery(x->done);
      if (e == cudaErrorNotReady) continue;
      CUDA_RT_CHECK(x->what, e);
      x->busy = 0;
    }
    b = x;
  }
  if (!b && s->n_sends < s->max_sends) {
    b = &s->sends[s->n_sends++];
    CUDA_RT_CHECK(what, cudaEventCreateWithFlags(&b->done, cudaEventDisableTiming));
  }
  if (!b) {
    b = &s->sends[0];
    for (int i = 1; i < s->n_sends; i++)
      if (s->sends[i].seq < b->seq) b = &s->sends[i];
    wait_event(s, b->done, b->what);
    b->busy = 0;
  }
  if (b->cap < bytes) {
    /* Stream-ordered, on the compute stream that writes it next. Its last send completed (the
     * host saw it), so freeing it is safe on any stream; and unlike cudaFree, which waits for the
     * whole device, this never waits for the sends still in flight (they wait for peers). */
    if (b->buf) CUDA_RT_CHECK(what, cudaFreeAsync(b->buf, s->compute));
    b->buf = NULL;
    b->cap = 0;
    if (cudaMallocAsync(&b->buf, bytes, s->compute) != cudaSuccess) {
      cudaGetLastError();
      fail("NCCL %s: no device memory for a send buffer of %.1f MiB (QWEN3_NCCL_SEND_BUFFERS=%d "
           "of them may exist)",
           what, bytes / 1048576.0, s->max_sends);
    }
    b->cap = bytes;
  }
  return b;
}

static void nccl_send(void *state, const void *buf, size_t bytes, int to_stage, int tag) {
  struct nccl_state *s = state_of(state);
  struct group *pipe = &s->groups[GROUP_PIPE];
  char what[160];
  snprintf(what, sizeof what, "send of %zu bytes to stage %d (tag %d) on group pipe", bytes,
           to_stage, tag);
  check_device_buffer(s, buf, bytes, what);
  struct send_buffer *b = take_send_buffer(s, bytes, what);
  /* the tensor as the compute stream has it at this point of its order */
  if (bytes)
    CUDA_RT_CHECK(what, cudaMemcpyAsync(b->buf, buf, bytes, cudaMemcpyDeviceToDevice, s->compute));
  comm_after_compute(s, s->stream, what);
  NCCL_CHECK(what, ncclGroupStart());
  NCCL_CHECK(what, ncclSend(b->buf, bytes, ncclUint8, to_stage, pipe->comm, s->stream));
  NCCL_CHECK(what, ncclGroupEnd());
  CUDA_RT_CHECK(what, cudaEventRecord(b->done, s->stream));
  b->busy = 1;
  b->seq = s->send_seq++;
  memcpy(b->what, what, sizeof what);
}

static void nccl_recv(void *state, void *buf, size_t bytes, int from_stage, int tag) {
  struct nccl_state *s = state_of(state);
  struct group *pipe = &s->groups[GROUP_PIPE];
  char what[160];
  snprintf(what, sizeof what, "receive of %zu bytes from stage %d (tag %d) on group pipe", bytes,
           from_stage, tag);
  check_device_buffer(s, buf, bytes, what);
  comm_after_compute(s, s->stream, what);   /* earlier kernels may still read buf */
  NCCL_CHECK(what, ncclGroupStart());
  NCCL_CHECK(what, ncclRecv(buf, bytes, ncclUint8, from_stage, pipe->comm, s->stream));
  NCCL_CHECK(what, ncclGroupEnd());
  finish_on_compute(s, s->stream, what);
}

static void nccl_wait_sends(void *state) {
  struct nccl_state *s = state_of(state);
  for (int i = 0; i < s->n_sends; i++)
    if (s->sends[i].busy) {
      wait_event(s, s->sends[i].done, s->sends[i].what);
      s->sends[i].busy = 0;
    }
}

/* Group g when this rank has its communicator, else NULL (GROUP_WORLD: staged by comm_mpi.c). */
static struct group *device_group(struct nccl_state *s, enum comm_group g) {
  return g >= GROUP_PIPE && g <= GROUP_TIED && s->groups[g].comm ? &s->groups[g] : NULL;
}

/* The all-reduce of buf, queued on its group's stream after the compute stream's work so far;
 * then either finished (the host waits, then the compute stream) or only started, for
 * nccl_wait_reductions. 0 when the group has no communicator here.
 * NCCL's sum order is that of its algorithm (ring or tree, chosen from the group's size, the
 * message size and the machine), the same in every run of the same job on the same machine and
 * the same bits on every member. It may round differently from MPI's. */
static int allreduce(void *state, enum comm_group g, float *buf, size_t n, int finish) {
  struct nccl_state *s = state_of(state);
  struct group *gr = device_group(s, g);
  if (!gr) return 0;
  char what[160];
  snprintf(what, sizeof what, "all-reduce (sum) of %zu floats on group %s (rank %d of %d)", n,
           gr->name, gr->rank, gr->size);
  check_device_buffer(s, buf, n * sizeof *buf, what);
  comm_after_compute(s, gr->stream, what);
  NCCL_CHECK(what, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, gr->comm, gr->stream));
  if (finish) {
    finish_on_compute(s, gr->stream, what);
  } else {
    CUDA_RT_CHECK(what, cudaEventRecord(gr->started, gr->stream));
    gr->pending = 1;
  }
  return 1;
}

static int nccl_allreduce_sum_float(void *state, enum comm_group g, float *buf, size_t n) {
  return allreduce(state, g, buf, n, 1);
}

static int nccl_allreduce_start(void *state, enum comm_group g, float *buf, size_t n) {
  return allreduce(state, g, buf, n, 0);
}

static void nccl_wait_reductions(void *state) {
  struct nccl_state *s = state_of(state);
  for (int g = 0; g <= GROUP_TIED; g++) {
    struct group *gr = &s->groups[g];
    if (!gr->pending) continue;
    char what[96];
    snprintf(what, sizeof what, "the all-reduces started on group %s (rank %d of %d)", gr->name,
             gr->rank, gr->size);
    wait_event(s, gr->started, what);
    CUDA_RT_CHECK(what, cudaStreamWaitEvent(s->compute, gr->started, 0));
    gr->pending = 0;
  }
}

/* comm.h's sharded collectives. Member i's shard is [i * shard, (i + 1) * shard) clipped to n,
 * so the last may be shorter or empty, which ncclReduceScatter and ncclAllGather (equal counts
 * for every member) cannot express: one in-place ncclReduce (ncclBroadcast) per member's shard,
 * with that member as the root, in one NCCL group so that they go as one launch. */
static int nccl_sharded_float(void *state, enum comm_group g, float *buf, size_t n, size_t shard,
                              int reduce) {
  struct nccl_state *s = state_of(state);
  struct group *gr = device_group(s, g);
  if (!gr) return 0;
  if (shard == 0 || (size_t)gr->size * shard < n)
    fail("internal: %zu floats in %d shards of %zu", n, gr->size, shard);
  char what[160];
  snprintf(what, sizeof what, "%s of %zu floats in shards of %zu on group %s (rank %d of %d)",
           reduce ? "reduce-scatter (sum)" : "all-gather", n, shard, gr->name, gr->rank,
           gr->size);
  check_device_buffer(s, buf, n * sizeof *buf, what);
  comm_after_compute(s, gr->stream, what);
  NCCL_CHECK(what, ncclGroupStart());
  for (int i = 0; i < gr->size; i++) {
    size_t b = (size_t)i * shard < n ? (size_t)i * shard : n;
    size_t len = n - b < shard ? n - b : shard;
    if (!len) continue;   /* alike on every member */
    if (reduce)
      NCCL_CHECK(what, ncclReduce(buf + b, buf + b, len, ncclFloat, ncclSum, i, gr->comm,
                                  gr->stream));
    else
      NCCL_CHECK(what, ncclBroadcast(buf + b, buf + b, len, ncclFloat, i, gr->comm, gr->stream));
  }
  NCCL_CHECK(what, ncclGroupEnd());
  finish_on_compute(s, gr->stream, what);
  return 1;
}

static void nccl_finalize(void *state) {
  struct nccl_state *s = state_of(state);
  nccl_wait_sends(s);
  nccl_wait_reductions(s);
  const char *what = "finalize";
  wait_streams(s, "finalize (the last operations)");
  for (int g = 0; g <= GROUP_TIED; g++)
    if (s->groups[g].comm) {
      NCCL_CHECK(s->groups[g].name, ncclCommDestroy(s->groups[g].comm));
      CUDA_RT_CHECK(what, cudaEventDestroy(s->groups[g].started));
      s->groups[g].comm = NULL;
    }
  for (int i = 0; i < s->n_sends; i++) {
    if (s->sends[i].buf) CUDA_RT_CHECK(what, cudaFreeAsync(s->sends[i].buf, s->compute));
    CUDA_RT_CHECK(what, cudaEventDestroy(s->sends[i].done));
  }
  CUDA_RT_CHECK(what, cudaFree(s->warmup));
  CUDA_RT_CHECK(what, cudaEventDestroy(s->ready));
  CUDA_RT_CHECK(what, cudaEventDestroy(s->done));
  CUDA_RT_CHECK(what, cudaStreamDestroy(s->stream));
  CUDA_RT_CHECK(what, cudaStreamDestroy(s->dp_stream));
  g_abort_hook = g_prev_abort_hook;
  g_prev_abort_hook = NULL;
  g_nccl = NULL;
  free(s);
}

/* ---- enabling ------------------------------------------------------------------------------ */

static int env_int(const char *name, int fallback, int lo, int hi) {
  const char *v = getenv(name);
  if (!v || !*v) return fallback;
  char *end;
  long x = strtol(v, &end, 10);
  if (*end || x < lo || x > hi) die("%s=%s: expected a whole number from %d to %d", name, v, lo, hi);
  return (int)x;
}

/* Makes the communicator of group g (collective over its members): rank 0 of the group makes the
 * unique id and broadcasts it over the group's MPI communicator. */
static void group_init(struct nccl_state *s, enum comm_group g, const char *name, int rank,
                       int size) {
  struct group *gr = &s->groups[g];
  gr->name = name;
  gr->rank = rank;
  gr->size = size;
  gr->stream = g == GROUP_DP ? s->dp_stream : s->stream;
  char what[96];
  snprintf(what, sizeof what, "creating the communicator of group %s (rank %d of %d)", name, rank,
           size);
  ncclUniqueId id;
  memset(&id, 0, sizeof id);
  if (rank == 0) NCCL_CHECK(what, ncclGetUniqueId(&id));
  comm_broadcast(s->c, g, &id, sizeof id, 0);
  NCCL_CHECK(what, ncclCommInitRank(&gr->comm, size, id, rank));
  CUDA_RT_CHECK(what, cudaEventCreateWithFlags(&gr->started, cudaEventDisableTiming));
}

/* One tiny transfer on every communicator, so that NCCL makes its connections now, where every
 * rank is, rather than inside the first step's transfers; and a NCCL that cannot work on this
 * machine fails here, at start-up. */
static void warm_up(struct nccl_state *s) {
  struct comm *c = s->c;
  const char *what = "the first transfers (making connections)";
  CUDA_RT_CHECK(what, cudaMalloc((void **)&s->warmup, 2 * sizeof(float)));
  CUDA_RT_CHECK(what, cudaMemsetAsync(s->warmup, 0, 2 * sizeof(float), s->stream));
  CUDA_RT_CHECK(what, cudaStreamSynchronize(s->stream));   /* before either stream reads it */
  struct group *pipe = &s->groups[GROUP_PIPE];
  if (pipe->comm) {
    /* both directions with both neighbours in one group: NCCL runs them together */
    NCCL_CHECK(what, ncclGroupStart());
    if (c->stage + 1 < c->pp) {
      NCCL_CHECK(what, ncclSend(s->warmup, 1, ncclFloat, c->stage + 1, pipe->comm, s->stream));
      NCCL_CHECK(what, ncclRecv(s->warmup + 1, 1, ncclFloat, c->stage + 1, pipe->comm, s->stream));
    }
    if (c->stage > 0) {
      NCCL_CHECK(what, ncclSend(s->warmup, 1, ncclFloat, c->stage - 1, pipe->comm, s->stream));
      NCCL_CHECK(what, ncclRecv(s->warmup + 1, 1, ncclFloat, c->stage - 1, pipe->comm, s->stream));
    }
    NCCL_CHECK(what, ncclGroupEnd());
  }
  struct group *dp = &s->groups[GROUP_DP];
  if (dp->comm)
    NCCL_CHECK(what, ncclAllReduce(s->warmup, s->warmup, 1, ncclFloat, ncclSum, dp->comm,
                                   dp->stream));
  struct group *tied = &s->groups[GROUP_TIED];
  if (tied->comm)
    NCCL_CHECK(what, ncclAllReduce(s->warmup, s->warmup, 1, ncclFloat, ncclSum, tied->comm,
                                   tied->stream));
  wait_streams(s, what);
}

/* What each rank says about itself before the job decides. */
enum { NCCL_READY = 1, NCCL_OFF_BY_ENV = 2, NCCL_NO_STREAM = 3, NCCL_NO_DEVICE = 4 };
struct rank_gpu {
  int status;
  unsigned char uuid[16];
};

static const char *status_reason(int status) {
  switch (status) {
  case NCCL_OFF_BY_ENV: return "has QWEN3_NCCL=0";
  case NCCL_NO_STREAM: return "runs a backend without a GPU stream (CPU)";
  case NCCL_NO_DEVICE: return "cannot query its GPU";
  }
  return "?";
}

int comm_nccl_enable(struct comm *c, void *compute_stream) {
  if (c->world == 1) return 0;
  if (c->pp < 1) die("comm_nccl_enable called before comm_set_layout");
  if (g_nccl) die("comm_nccl_enable called twice");
  const char *env = getenv("QWEN3_NCCL");
  int want = -1;   /* -1: when possible; 1: required */
  if (env && *env) {
    if (!strcmp(env, "0")) want = 0;
    else if (!strcmp(env, "1")) want = 1;
    else die("QWEN3_NCCL=%s: expected 0 (off) or 1 (required); unset: on when every rank has a GPU",
             env);
  }

  /* Every rank must decide alike: gather each rank's state and GPU, and decide from the whole. */
  struct rank_gpu me = {0};
  int device = -1;
  if (want == 0) {
    me.status = NCCL_OFF_BY_ENV;
  } else if (!compute_stream) {
    me.status = NCCL_NO_STREAM;
  } else {
    struct cudaDeviceProp prop;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
      cudaGetLastError();
      me.status = NCCL_NO_DEVICE;
    } else {
      me.status = NCCL_READY;
      memcpy(me.uuid, prop.uuid.bytes, sizeof me.uuid);
    }
  }
  struct rank_gpu *all = xmalloc((size_t)c->world * sizeof *all);
  if (MPI_Allgather(&me, (int)sizeof me, MPI_BYTE, all, (int)sizeof me, MPI_BYTE,
                    MPI_COMM_WORLD) != MPI_SUCCESS)
    die("comm_nccl_enable: MPI_Allgather of the ranks' GPUs failed");
  char why[256] = "";
  int any_gpu = 0;   /* a run without GPUs need not say that tensors go over MPI */
  for (int r = 0; r < c->world; r++) any_gpu |= all[r].status == NCCL_READY;
  for (int r = 0; r < c->world && !why[0]; r++)
    if (all[r].status != NCCL_READY)
      snprintf(why, sizeof why, "rank %d %s", r, status_reason(all[r].status));
  for (int r = 0; r < c->world && !why[0]; r++)
    for (int q = r + 1; q < c->world && !why[0]; q++)
      if (!memcmp(all[r].uuid, all[q].uuid, sizeof all[r].uuid))
        snprintf(why, sizeof why,
                 "ranks %d and %d share a GPU (NCCL needs a GPU for each rank: run at most as "
                 "many processes per machine as it has GPUs)",
                 r, q);
  free(all);
  if (why[0]) {
    if (want == 1) die("QWEN3_NCCL=1, but NCCL cannot carry this job's tensors: %s", why);
    if (c->rank == 0 && want != 0 && any_gpu)
      info("comm: tensors go over MPI, staged through host memory: %s", why);
    return 0;
  }

  struct nccl_state *s = xcalloc(1, sizeof *s);
  s->c = c;
  s->device = device;
  s->compute = (cudaStream_t)compute_stream;
  s->timeout = c->timeout;
  s->max_sends = env_int("QWEN3_NCCL_SEND_BUFFERS", 2, 1, MAX_SEND_BUFFERS);
  /* from here on a die() anywhere aborts whatever communicators exist */
  g_nccl = s;
  g_aborted = 0;
  g_prev_abort_hook = g_abort_hook;
  g_abort_hook = abort_hook;
  const char *what = "enabling NCCL";
  /* the highest priority: a transfer's few blocks start as soon as SMs free up, rather than
   * after every compute kernel queued before them, so transfers overlap the compute */
  int least, greatest;
  CUDA_RT_CHECK(what, cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUDA_RT_CHECK(what, cudaStreamCreateWithPriority(&s->stream, cudaStreamNonBlocking, greatest));
  CUDA_RT_CHECK(what, cudaStreamCreateWithPriority(&s->dp_stream, cudaStreamNonBlocking, greatest));
  CUDA_RT_CHECK(what, cudaEventCreateWithFlags(&s->ready, cudaEventDisableTiming));
  CUDA_RT_CHECK(what, cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming));
  /* every rank makes them in the same order, each collective over its members only */
  if (c->pp > 1) group_init(s, GROUP_PIPE, "pipe", c->stage, c->pp);
  if (c->dp > 1) group_init(s, GROUP_DP, "dp", c->replica, c->dp);
  if (c->pp > 1 && (c->stage == 0 || c->stage == c->pp - 1))
    group_init(s, GROUP_TIED, "tied", c->stage == 0 ? 0 : 1, 2);
  warm_up(s);

  struct comm_device_transport t = {
    .state = s,
    .send = nccl_send,
    .recv = nccl_recv,
    .wait_sends = nccl_wait_sends,
    .allreduce_sum_float = nccl_allreduce_sum_float,
    .allreduce_start = nccl_allreduce_start,
    .wait_reductions = nccl_wait_reductions,
    .sharded_float = nccl_sharded_float,
    .finalize = nccl_finalize,
  };
  comm_set_device_transport(c, &t);
  if (c->rank == 0) {
    int v = 0;
    NCCL_CHECK(what, ncclGetVersion(&v));
    int major = v >= 10000 ? v / 10000 : v / 1000;
    int minor = v >= 10000 ? v / 100 % 100 : v / 100 % 10;
    info("comm: NCCL %d.%d.%d on: tensors (pipeline transfers, gradient sums) over NCCL on a "
         "stream of their own, control messages over MPI; time-out %.0f s",
         major, minor, v % 100, s->timeout);
  }
  return 1;
}

#endif
