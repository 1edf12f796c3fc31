/* Inside comm/ only: how a transport that reads device memory itself (comm_nccl.c) takes over
 * the tensor calls of comm.h from comm_mpi.c, which stays the implementation of everything else
 * (layout, control messages, the double sums, broadcasts, barriers, abort). comm_mpi.c checks
 * the peer, tag and group of a call before it hands it over. */
#ifndef QWEN3_COMM_DEVICE_H
#define QWEN3_COMM_DEVICE_H

#include <stddef.h>

#include "comm/comm.h"

struct comm_device_transport {
  void *state;
  void (*send)(void *state, const void *buf, size_t bytes, int to_stage, int tag);
  void (*recv)(void *state, void *buf, size_t bytes, int from_stage, int tag);
  /* waits until every send was delivered */
  void (*wait_sends)(void *state);
  /* 1: done; 0: this group has no device communicator (GROUP_WORLD), stage it through the host */
  int (*allreduce_sum_float)(void *state, enum comm_group g, float *buf, size_t n);
  /* the same, started only (1), finished by wait_reductions; 0 as above */
  int (*allreduce_start)(void *state, enum comm_group g, float *buf, size_t n);
  void (*wait_reductions)(void *state);
  /* comm_reduce_scatter_sum_float (reduce 1) or comm_allgather_float (reduce 0); 0 as above */
  int (*sharded_float)(void *state, enum comm_group g, float *buf, size_t n, size_t shard,
                       int reduce);
  /* called by comm_finalize after the last wait, before MPI ends */
  void (*finalize)(void *state);
};

/* Hands the tensor calls to `t` (copied); NULL gives them back to MPI. */
void comm_set_device_transport(struct comm *c, const struct comm_device_transport *t);

#endif
