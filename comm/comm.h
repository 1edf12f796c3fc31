/* Communication between the ranks of a job: the rank layout, point-to-point transfers along a
 * pipeline, and reductions over groups. comm_mpi.c implements every call over MPI on host memory;
 * once comm_nccl_enable succeeded, comm_nccl.c carries the tensor calls (comm_send_tensor,
 * comm_recv_tensor, the float sums and the sharded collectives) over NCCL on device memory, while
 * control messages (tokens, flags, small host scalars) stay on MPI. Every call dies (and so
 * aborts the whole job) on error: no rank is ever left waiting for a peer that is gone, and no
 * wait for a peer lasts longer than c->timeout seconds (QWEN3_COMM_TIMEOUT_S, 600 by default).
 *
 * Layout (DESIGN.md): world = pipeline_stages x data_parallel; rank r is stage r % pp of
 * replica r / pp, so the stages of one replica are neighbours. */
#ifndef QWEN3_COMM_H
#define QWEN3_COMM_H

#include <stddef.h>

enum comm_group {
  GROUP_WORLD,   /* every rank */
  GROUP_PIPE,    /* the stages of this rank's replica */
  GROUP_DP,      /* the same stage in every replica: gradient averaging */
  GROUP_TIED,    /* first and last stage of this replica: tied embedding gradients (pp > 1) */
};

struct comm {
  int rank, world;     /* in GROUP_WORLD */
  int pp, dp;          /* pipeline stages, data-parallel replicas */
  int stage, replica;
  int local_rank, local_size;   /* among the ranks on this machine */
  double timeout;      /* seconds any wait for a peer may take (QWEN3_COMM_TIMEOUT_S, 600) */
  void *impl;          /* transport state */
};

/* Starts the transport (MPI_Init), fills rank/world, names the rank in every log line and makes
 * die() abort the whole job. Call once, first thing in main. */
void comm_init(struct comm *c, int *argc, char ***argv);
/* Splits the world into pipelines of pp stages; dies if world % pp != 0. */
void comm_set_layout(struct comm *c, int pp);
void comm_finalize(struct comm *c);
/* Ends every rank of the job at once with exit code `code`. */
_Noreturn void comm_abort(struct comm *c, int code);

/* Point-to-point with another stage of this replica. Sends never block and the caller may reuse
 * the buffer as soon as comm_send returns (MPI sends from a host copy; NCCL from a device copy
 * made on the compute stream); comm_wait_sends waits until every send was delivered. Receives
 * block. Messages between a pair of stages with the same tag arrive in the order they were sent;
 * over NCCL, which has no tags, tensor messages between a pair of stages pair in the order they
 * were issued, whatever their tags (the schedules issue them in matching order). */
void comm_send(struct comm *c, const void *buf, size_t bytes, int to_stage, int tag);
void comm_recv(struct comm *c, void *buf, size_t bytes, int from_stage, int tag);
void comm_wait_sends(struct comm *c);

/* Tensors (activations, their gradients, parameter gradients) may live in device memory. Once
 * the trainer has given comm its backend's copies, the MPI transport stages tensors through
 * host memory with them; a transport that reads device memory itself (NCCL) ignores them.
 * With NCCL, "blocks" means: when comm_recv_tensor returns, the data has arrived and the compute
 * stream is ordered after it, so kernels launched next on that stream read it; a send's data is
 * taken at its place in the compute stream's order. */
typedef void (*comm_copy_fn)(void *dst, const void *src, size_t bytes);
void comm_set_device_copy(struct comm *c, comm_copy_fn to_host, comm_copy_fn to_device);
void comm_send_tensor(struct comm *c, const void *buf, size_t bytes, int to_stage, int tag);
void comm_recv_tensor(struct comm *c, void *buf, size_t bytes, int from_stage, int tag);

/* In-place sums over a group; the order of summation is fixed, so results are reproducible.
 * The float sum takes a tensor (device memory, see comm_set_device_copy); the double sum takes
 * host memory. */
void comm_allreduce_sum_float(struct comm *c, enum comm_group g, float *buf, size_t n);
void comm_allreduce_sum_double(struct comm *c, enum comm_group g, double *buf, size_t n);
/* The float sum, started now and finished by comm_wait_reductions, so that it runs while the
 * caller goes on (the data-parallel reduction during backward): over NCCL on a stream of its
 * own, after the compute stream's work so far; over MPI on host memory as MPI_Iallreduce; a
 * tensor staged through the host is summed at once. Until comm_wait_reductions returns nothing
 * may read or write buf. Every member starts the same sums in the same order. With two members
 * the result is comm_allreduce_sum_float's, bit for bit (a + b); with more, the transport's
 * algorithm may sum in another order. */
void comm_allreduce_sum_float_start(struct comm *c, enum comm_group g, float *buf, size_t n);
void comm_wait_reductions(struct comm *c);
/* Sharded collectives over a tensor `buf` of n floats that every member of the group holds in
 * full, cut into consecutive shards of `shard` floats (member i's: [i * shard, (i + 1) * shard)
 * clipped to n, so the last may be shorter or empty). Reduce-scatter: member i's shard of buf
 * becomes the sum of every member's; the rest of buf is left as it was. All-gather: every
 * member's shard of buf is copied into the same place of every other member's buf. */
void comm_reduce_scatter_sum_float(struct comm *c, enum comm_group g, float *buf, size_t n,
                                   size_t shard);
void comm_allgather_float(struct comm *c, enum comm_group g, float *buf, size_t n, size_t shard);
/* From the group's member `root` (rank within the group: for GROUP_PIPE the stage) to all. */
void comm_broadcast(struct comm *c, enum comm_group g, void *buf, size_t bytes, int root);
void comm_barrier(struct comm *c, enum comm_group g);

/* NCCL for the tensor calls when every rank drives a GPU of its own. Collective: every rank calls
 * it, after comm_set_layout and once its backend bound its GPU, with the backend's compute stream
 * (a cudaStream_t), or NULL where the backend has none (the CPU). Returns 1 on every rank when
 * NCCL is on, 0 on every rank when it is not: with a world of one, in a build without NCCL, when
 * any rank has no stream, when two ranks share a GPU (NCCL refuses that), or with QWEN3_NCCL=0
 * in the environment. QWEN3_NCCL=1 makes each of those an error instead. A wait on NCCL work
 * longer than c->timeout aborts the job; QWEN3_NCCL_SEND_BUFFERS
 * (default 2) is how many device copies of sent tensors may be in flight. */
int comm_nccl_enable(struct comm *c, void *compute_stream);

#endif
