/* Bus bandwidth of our tensor transport (comm.h over NCCL, comm/comm_nccl.c) against the same
 * NCCL calls made directly, in the manner of nccl-tests, one GPU per rank:
 *
 *   mpirun -np N -x NCCL_NVLS_ENABLE build/bench/comm_bench p2p|coll [--sizes LIST] [--seconds S]
 *
 * LIST: sizes in bytes with K, M or G (binary) suffixes, comma-separated (default 1M,16M,128M,1G);
 * S: about how long each timed loop runs (default 0.25 s). A mode per process, because the
 * layout and NCCL can be set up only once:
 *  - p2p: layout pp = N; stage 0 sends to stage 1 (comm_send_tensor, then comm_wait_sends, and
 *    comm_recv_tensor) against ncclSend / ncclRecv between world ranks 0 and 1; the other ranks
 *    idle. busbw = bytes / time.
 *  - coll: layout pp = 1, so GROUP_DP holds all N ranks. comm_allreduce_sum_float against
 *    ncclAllReduce (busbw = bytes / time * 2(N-1)/N); comm_reduce_scatter_sum_float and
 *    comm_allgather_float on n = bytes / 4 floats in shards of ceil(n / N) rounded up to 64
 *    floats, against in-place ncclReduceScatter / ncclAllGather on those shards (busbw =
 *    bytes / time * (N-1)/N). NCCL wants equal shards, so it moves shard * N floats, which may
 *    exceed n by less than 65 floats a rank; its busbw counts the bytes it moved.
 * NCCL alone runs on a communicator of its own over the world, on a stream of its own.
 *
 * Before any timing every op runs once on each side on rank-dependent values, and the results
 * are checked (a failure ends the job naming the op, the rank and the first wrong float).
 * Each time is the slowest rank's host wall time over a loop, after a device synchronize and a
 * barrier, divided by the loop's count; the count comes from the slowest rank's warm-up calls.
 *
 * Rank 0 prints a human line and one
 *   RESULT system=comm op=p2p|allreduce|reduce_scatter|allgather np=N bytes=B ours_busbw=X
 *          nccl_busbw=Y ours_us=U nccl_us=V
 * per op and size (GB/s = 1e9 bytes/s) on stdout; bench/multi_gpu.sh collects them. Without a
 * GPU on every rank, in a build without CUDA or NCCL, or with fewer than 2 ranks it says so and
 * exits 1. NVLink multicast (NVLS) is off unless NCCL_NVLS_ENABLE says otherwise: the lent GPU
 * machines forbid it, and both sides then run the same algorithms. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "common/util.h"
#include "kernels/ops.h"

#if defined(QWEN3_HAVE_CUDA) && defined(QWEN3_HAVE_NCCL)
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "kernels/cuda/cuda_device.h"

/* Every CUDA and NCCL call: both return 0 (cudaSuccess, ncclSuccess) on success, else a code
 * that their own function names. */
#define CHECK(call, describe)                                                     \
  do {                                                                            \
    int rc_ = (int)(call);                                                        \
    if (rc_ != 0)                                                                 \
      die("comm_bench: %s:%d: %s: %s", __FILE__, __LINE__, #call, describe(rc_)); \
  } while (0)
#define CUDA_CHECK(call) CHECK(call, cudaGetErrorString)
#define NCCL_CHECK(call) CHECK(call, ncclGetErrorString)

#define MAX_SIZES 16
#define WARMUP 3
#define MIN_ITERS 3
#define MAX_ITERS 1000
/* the checks' size: about 1 MiB, and not a multiple of 64 floats, so that the last shard of
 * the sharded collectives is shorter than the others */
#define VERIFY_FLOATS (262144 + 37)

enum op { OP_P2P, OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER };
static const char *const OP_NAMES[] = {"p2p", "allreduce", "reduce_scatter", "allgather"};

struct bench {
  struct comm c;
  const struct backend *be;
  ncclComm_t nccl;       /* NCCL alone: every rank of the world, rank as in the world */
  cudaStream_t stream;   /* NCCL alone's */
  float *buf;            /* device, large enough for every size of both sides */
  float *host;           /* the checks' copy */
};

/* floats in each of `members` shards of n, as the trainer cuts them (rounded up to 64) */
static size_t shard_of(size_t n, int members) {
  size_t s = (n + (size_t)members - 1) / (size_t)members;
  return (s + 63) / 64 * 64;
}

/* One call of op on n floats by our transport. Each returns only once its transfer is done on
 * this rank (comm.h: receives and sums block; the sender waits for its send), so a call is one
 * complete transfer, as one NCCL call plus a stream synchronize is below. */
static void ours_once(struct bench *b, enum op op, size_t n) {
  struct comm *c = &b->c;
  switch (op) {
  case OP_P2P:
    if (c->stage == 0) {
      comm_send_tensor(c, b->buf, n * sizeof(float), 1, 0);
      comm_wait_sends(c);
    } else if (c->stage == 1) {
      comm_recv_tensor(c, b->buf, n * sizeof(float), 0, 0);
    }
    break;
  case OP_ALLREDUCE: comm_allreduce_sum_float(c, GROUP_DP, b->buf, n); break;
  case OP_REDUCE_SCATTER:
    comm_reduce_scatter_sum_float(c, GROUP_DP, b->buf, n, shard_of(n, c->dp));
    break;
  case OP_ALLGATHER: comm_allgather_float(c, GROUP_DP, b->buf, n, shard_of(n, c->dp)); break;
  }
}

/* The same op through NCCL alone, in place, then a synchronize of its stream: the host waits
 * for every call, as it does for ours, so that both loops time complete transfers one after the
 * other and neither overlaps calls the other cannot. */
static void nccl_once(struct bench *b, enum op op, size_t n) {
  int rank = b->c.rank;
  size_t shard = shard_of(n, b->c.world);
  switch (op) {
  case OP_P2P:
    if (rank == 0) NCCL_CHECK(ncclSend(b->buf, n, ncclFloat, 1, b->nccl, b->stream));
    else if (rank == 1) NCCL_CHECK(ncclRecv(b->buf, n, ncclFloat, 0, b->nccl, b->stream));
    break;
  case OP_ALLREDUCE:
    NCCL_CHECK(ncclAllReduce(b->buf, b->buf, n, ncclFloat, ncclSum, b->nccl, b->stream));
    break;
  case OP_REDUCE_SCATTER:
    NCCL_CHECK(ncclReduceScatter(b->buf, b->buf + rank * shard, shard, ncclFloat, ncclSum, b->nccl,
                                 b->stream));
    break;
  case OP_ALLGATHER:
    NCCL_CHECK(ncclAllGather(b->buf + rank * shard, b->buf, shard, ncclFloat, b->nccl, b->stream));
    break;
  }
  CUDA_CHECK(cudaStreamSynchronize(b->stream));
}

static void run_once(struct bench *b, int ours, enum op op, size_t n) {
  if (ours) ours_once(b, op, n);
  else nccl_once(b, op, n);
}

/* ---- the checks -------------------------------------------------------------------------- */

/* exact in a float, and different from its neighbours: a float moved to the wrong place shows */
static float pattern(size_t i) { return (float)(i % 251); }

/* What member r holds at float i before op; shard is the op's shard size (sharded ops). */
static float input_of(enum op op, int r, size_t i, size_t shard) {
  switch (op) {
  case OP_P2P: return r == 0 ? pattern(i) : -1.0f;
  case OP_ALLGATHER: return i / shard == (size_t)r ? pattern(i) : -1.0f;
  default: return (float)(r + 1) * pattern(i);
  }
}

/* What it must hold after, NAN where nothing is promised. The sums of small integers are exact
 * in any order. Our reduce-scatter leaves the rest of buf as it was (comm.h); NCCL's says
 * nothing about it. Ranks idle in p2p keep their input. */
static float expected_of(enum op op, int r, int members, size_t i, size_t shard, int ours) {
  float total = (float)(members * (members + 1) / 2) * pattern(i);
  switch (op) {
  case OP_P2P: return r <= 1 ? pattern(i) : -1.0f;
  case OP_ALLREDUCE: return total;
  case OP_REDUCE_SCATTER:
    if (i / shard == (size_t)r) return total;
    return ours ? input_of(op, r, i, shard) : NAN;
  case OP_ALLGATHER: return pattern(i);
  }
  return NAN;
}

/* Runs op once on known values and checks every float this rank holds; dies at the first
 * wrong one. */
static void verify(struct bench *b, int ours, enum op op) {
  const struct backend *be = b->be;
  int r = b->c.rank, members = b->c.world;
  size_t n = VERIFY_FLOATS, shard = shard_of(n, members);
  /* NCCL alone's sharded ops cover shard * members floats */
  size_t count = !ours && (op == OP_REDUCE_SCATTER || op == OP_ALLGATHER) ? shard * members : n;
  for (size_t i = 0; i < count; i++) b->host[i] = input_of(op, r, i, shard);
  be->to_device(b->buf, b->host, count * sizeof(float));
  be->synchronize();   /* NCCL alone's stream does not follow the backend's */
  run_once(b, ours, op, ours ? n : count);
  be->to_host(b->host, b->buf, count * sizeof(float));
  for (size_t i = 0; i < count; i++) {
    float want = expected_of(op, r, members, i, shard, ours);
    if (!isnan(want) && b->host[i] != want)
      die("comm_bench: %s by %s gave a wrong result on %d ranks: float %zu of %zu is %g, "
          "expected %g",
          OP_NAMES[op], ours ? "our transport" : "NCCL alone", members, i, count,
          (double)b->host[i], (double)want);
  }
}

/* ---- timing ------------------------------------------------------------------------------ */

/* The largest of every rank's x (each rank fills its slot of a world-sized sum). */
static double max_over_ranks(struct comm *c, double x) {
  double *all = xcalloc((size_t)c->world, sizeof *all);
  all[c->rank] = x;
  comm_allreduce_sum_double(c, GROUP_WORLD, all, (size_t)c->world);
  double m = 0;
  for (int i = 0; i < c->world; i++) m = all[i] > m ? all[i] : m;
  free(all);
  return m;
}

/* Every rank has finished everything queued, then they start together. */
static void start_together(struct bench *b) {
  b->be->synchronize();
  CUDA_CHECK(cudaDeviceSynchronize());
  comm_barrier(&b->c, GROUP_WORLD);
}

/* Seconds per call of op on n floats: the slowest rank's wall time over the loop. */
static double time_op(struct bench *b, int ours, enum op op, size_t n, double seconds) {
  start_together(b);
  double last = 0;
  for (int i = 0; i < WARMUP; i++) {   /* connections, send buffers of this size */
    double t0 = now_seconds();
    run_once(b, ours, op, n);
    last = now_seconds() - t0;
  }
  /* every rank must loop as often as the others: the count comes from the slowest */
  last = max_over_ranks(&b->c, last);
  int iters = last > 0 ? (int)(seconds / last) : MAX_ITERS;
  iters = iters < MIN_ITERS ? MIN_ITERS : iters > MAX_ITERS ? MAX_ITERS : iters;
  start_together(b);
  double t0 = now_seconds();
  for (int i = 0; i < iters; i++) run_once(b, ours, op, n);
  return max_over_ranks(&b->c, now_seconds() - t0) / iters;
}

/* bytes / time in GB/s, scaled as nccl-tests does so that every op compares with link speed */
static double busbw(enum op op, int np, double bytes, double seconds) {
  double f = op == OP_ALLREDUCE ? 2.0 * (np - 1) / np
             : op == OP_P2P     ? 1.0
                                : (double)(np - 1) / np;
  return bytes / seconds * f / 1e9;
}

static void bench_size(struct bench *b, enum op op, size_t bytes, double seconds) {
  int np = b->c.world;
  size_t n = bytes / sizeof(float);
  double ours_s = time_op(b, 1, op, n, seconds), nccl_s = time_op(b, 0, op, n, seconds);
  size_t nccl_bytes = op == OP_REDUCE_SCATTER || op == OP_ALLGATHER
                          ? shard_of(n, np) * np * sizeof(float)
                          : bytes;
  double ours_bw = busbw(op, np, (double)bytes, ours_s);
  double nccl_bw = busbw(op, np, (double)nccl_bytes, nccl_s);
  if (b->c.rank != 0) return;
  printf("%-15s %10.2f MiB   ours %10.1f us %8.2f GB/s   nccl %10.1f us %8.2f GB/s   %5.2fx\n",
         OP_NAMES[op], bytes / 1048576.0, ours_s * 1e6, ours_bw, nccl_s * 1e6, nccl_bw,
         ours_bw / nccl_bw);
  printf("RESULT system=comm op=%s np=%d bytes=%zu ours_busbw=%.2f nccl_busbw=%.2f ours_us=%.1f "
         "nccl_us=%.1f\n",
         OP_NAMES[op], np, bytes, ours_bw, nccl_bw, ours_s * 1e6, nccl_s * 1e6);
  fflush(stdout);
}

/* ---- set-up ------------------------------------------------------------------------------ */

/* "1M,16M,128M,1G" -> bytes: the count, or -1 on anything else or a size that is no whole
 * number of floats */
static int parse_sizes(const char *list, size_t *sizes) {
  int k = 0;
  for (const char *p = list; *p;) {
    char *end;
    unsigned long long v = strtoull(p, &end, 10);
    int shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
    if (shift) end++;
    if (end == p || (*end && *end != ',') || k == MAX_SIZES || !v || (v << shift) % sizeof(float))
      return -1;
    sizes[k++] = (size_t)(v << shift);
    p = *end ? end + 1 : end;
  }
  return k ? k : -1;
}

/* a communicator of NCCL's own over the world: the id from rank 0, sent over MPI */
static ncclComm_t nccl_world(struct comm *c) {
  ncclUniqueId id;
  memset(&id, 0, sizeof id);
  if (c->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  comm_broadcast(c, GROUP_WORLD, &id, sizeof id, 0);
  ncclComm_t comm;
  NCCL_CHECK(ncclCommInitRank(&comm, c->world, id, c->rank));
  return comm;
}

/* Ends every rank alike with `code`, rank 0 saying why: a job that cannot run this bench is no
 * crash, and every rank comes here on the same grounds. */
static int refuse(struct comm *c, int code, const char *why) {
  if (c->rank == 0) fprintf(stderr, "comm_bench: %s\n", why);
  comm_finalize(c);
  return code;
}

int main(int argc, char **argv) {
  /* before MPI and NCCL start: the lent machines forbid NVLink multicast (see the top) */
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  struct bench b = {0};
  struct comm *c = &b.c;
  comm_init(c, &argc, &argv);
  size_t sizes[MAX_SIZES] = {1 << 20, 16 << 20, 128 << 20, (size_t)1 << 30};
  int n_sizes = 4, p2p = -1;
  double seconds = 0.25;
  for (int i = 1; i < argc && n_sizes > 0; i++) {
    if (!strcmp(argv[i], "p2p") || !strcmp(argv[i], "coll")) p2p = !strcmp(argv[i], "p2p");
    else if (!strcmp(argv[i], "--sizes") && i + 1 < argc) n_sizes = parse_sizes(argv[++i], sizes);
    else if (!strcmp(argv[i], "--seconds") && i + 1 < argc && atof(argv[i + 1]) > 0)
      seconds = atof(argv[++i]);
    else n_sizes = -1;
  }
  if (p2p < 0 || n_sizes < 0)
    return refuse(c, 2, "usage: comm_bench p2p|coll [--sizes 1M,16M,128M,1G] [--seconds 0.25] "
                        "(sizes in bytes, multiples of 4, up to 16)");
  if (c->world < 2)
    return refuse(c, 1, "1 rank: nothing to transfer (mpirun -np 2 or more, one GPU each)");
  /* every rank must decide alike: one without a GPU stops them all */
  if (max_over_ranks(c, cuda_device_count() == 0) > 0)
    return refuse(c, 1, "a rank sees no GPU; needs one GPU per rank and a NCCL build");
  comm_set_layout(c, p2p ? c->world : 1);
  b.be = &backend_cuda;
  b.be->init(c->local_rank, c->local_size, 0);
  comm_set_device_copy(c, b.be->to_host, b.be->to_device);
  if (!comm_nccl_enable(c, b.be->native_stream()))
    return refuse(c, 1, "our transport did not switch NCCL on (see above); needs one GPU per "
                        "rank and a NCCL build");
  b.nccl = nccl_world(c);
  CUDA_CHECK(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));

  /* one buffer for both sides and every size: NCCL alone's sharded ops need shard * N floats */
  size_t floats = shard_of(VERIFY_FLOATS, c->world) * c->world;
  for (int i = 0; i < n_sizes; i++) {
    size_t n = sizes[i] / sizeof(float), need = shard_of(n, c->world) * c->world;
    floats = need > floats ? need : floats;
  }
  b.buf = b.be->alloc(floats * sizeof(float));
  if (!b.buf) die("comm_bench: no device memory for %.1f MiB", floats * 4 / 1048576.0);
  b.host = xmalloc(shard_of(VERIFY_FLOATS, c->world) * c->world * sizeof(float));

  int first = p2p ? OP_P2P : OP_ALLREDUCE, last = p2p ? OP_P2P : OP_ALLGATHER;
  for (int op = first; op <= last; op++)
    for (int ours = 1; ours >= 0; ours--) verify(&b, ours, op);
  if (c->rank == 0) {
    printf("comm_bench: %s on %d ranks, one GPU each; results checked (%d floats); "
           "time per call = the slowest rank's, loops of about %.2f s\n",
           p2p ? "stage 0 -> stage 1" : "collectives over GROUP_DP", c->world, VERIFY_FLOATS,
           seconds);
    fflush(stdout);
  }
  /* the checks left values that repeated sums would grow into infinities: start from zeros */
  b.be->zero(b.buf, floats * sizeof(float));
  for (int op = first; op <= last; op++)
    for (int i = 0; i < n_sizes; i++) bench_size(&b, op, sizes[i], seconds);

  start_together(&b);
  NCCL_CHECK(ncclCommDestroy(b.nccl));
  CUDA_CHECK(cudaStreamDestroy(b.stream));
  b.be->free(b.buf);
  free(b.host);
  comm_finalize(c);
  return 0;
}

#else

int main(void) {
  fprintf(stderr, "comm_bench: built without %s; needs one GPU per rank and a NCCL build\n",
#ifdef QWEN3_HAVE_CUDA
          "NCCL (CMake found no nccl.h and libnccl: set NCCL_ROOT)"
#else
          "CUDA"
#endif
  );
  return 1;
}

#endif
