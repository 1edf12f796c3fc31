/* Communication between the ranks of a job: the rank layout, point-to-point transfers along a
 * pipeline, and reductions over groups. comm_mpi.c implements it over MPI on host memory (CPU);
 * comm_nccl.c will implement the same calls over NCCL on device memory. Every call dies (and so
 * aborts the whole job) on error: no rank is ever left waiting for a peer that is gone.
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
 * the buffer as soon as comm_send returns (MPI sends from a copy; NCCL orders the reuse on its
 * stream); comm_wait_sends waits until every send was delivered. Receives block. Messages
 * between a pair of stages with the same tag arrive in the order they were sent. */
void comm_send(struct comm *c, const void *buf, size_t bytes, int to_stage, int tag);
void comm_recv(struct comm *c, void *buf, size_t bytes, int from_stage, int tag);
void comm_wait_sends(struct comm *c);

/* In-place sums over a group; the order of summation is fixed, so results are reproducible. */
void comm_allreduce_sum_float(struct comm *c, enum comm_group g, float *buf, size_t n);
void comm_allreduce_sum_double(struct comm *c, enum comm_group g, double *buf, size_t n);
/* From the group's member `root` (rank within the group: for GROUP_PIPE the stage) to all. */
void comm_broadcast(struct comm *c, enum comm_group g, void *buf, size_t bytes, int root);
void comm_barrier(struct comm *c, enum comm_group g);

#endif
