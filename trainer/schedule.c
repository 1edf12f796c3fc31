/* Pipeline schedules (schedule.h). A forward of a micro-batch is RECV_ACT, FWD, SEND_ACT and a
 * backward RECV_GRAD, BWD, SEND_GRAD, minus the transfers that have no peer on the first and last
 * stage; the schedules differ only in how they interleave these pieces.
 *
 * Sends never block (comm.h) and receives do, so a rank can only ever wait in a receive, and a
 * list is deadlock-free when the send each receive waits for is issued by a peer that does not
 * itself wait, directly or through others, on the receiving rank. tests/unit/test_schedule.c
 * checks that for every rank of pipelines up to 8 stages and 32 micro-batches, and also with
 * sends that block until their receive is posted. */
#include "trainer/schedule.h"

#include <stdlib.h>

#include "common/util.h"

struct builder {
  struct schedule *s;
  int first, last;   /* this stage is the first / last of the pipeline (both when pp == 1) */
};

static void push(struct builder *b, enum action_kind kind, int mb) {
  b->s->actions[b->s->n++] = (struct action){kind, mb};
}

/* The transfers are left out where the peer does not exist (first and last stage). */
static void recv_and_forward(struct builder *b, int mb) {
  if (!b->first) push(b, ACT_RECV_ACT, mb);
  push(b, ACT_FWD, mb);
}

static void send_act(struct builder *b, int mb) {
  if (!b->last) push(b, ACT_SEND_ACT, mb);
}

static void recv_grad(struct builder *b, int mb) {
  if (!b->last) push(b, ACT_RECV_GRAD, mb);
}

static void backward_and_send(struct builder *b, int mb) {
  push(b, ACT_BWD, mb);
  if (!b->first) push(b, ACT_SEND_GRAD, mb);
}

static int min_int(int a, int b) { return a < b ? a : b; }

void schedule_build(struct schedule *s, enum schedule_kind kind, int pp, int micro_batches,
                    int stage) {
  if (pp < 1 || micro_batches < 1 || stage < 0 || stage >= pp)
    die("schedule_build: bad pipeline (pp %d, micro_batches %d, stage %d)", pp, micro_batches,
        stage);
  /* at most six actions per micro-batch */
  *s = (struct schedule){.actions = xmalloc(6 * (size_t)micro_batches * sizeof *s->actions)};
  struct builder b = {s, stage == 0, stage == pp - 1};
  int m = micro_batches;
  switch (kind) {
  case SCHEDULE_GPIPE:
    for (int mb = 0; mb < m; mb++) {
      recv_and_forward(&b, mb);
      send_act(&b, mb);
    }
    for (int mb = 0; mb < m; mb++) {
      recv_grad(&b, mb);
      backward_and_send(&b, mb);
    }
    s->max_live = m;
    break;
  case SCHEDULE_1F1B: {
    /* Megatron's non-interleaved 1F1B. Stage s runs pp - s - 1 forwards ahead so that the last
     * stage can start backwards at once; then each steady step is one forward (of mb
     * warmup + i) and one backward (of mb i), so a stage never holds more than pp - s
     * activations; the cool-down drains the remaining backwards.
     *
     * Within a steady step the forward's SEND_ACT waits until after the backward's RECV_GRAD:
     * RECV_ACT f, FWD f, RECV_GRAD i, SEND_ACT f, BWD i, SEND_GRAD i. Stage s + 1 sends the
     * gradient of mb i before it needs activation f, so neither order deadlocks while sends
     * never block; but this one also holds when a send completes only as its receive is posted
     * (NCCL on one stream, MPI rendezvous): neighbours then meet in the same order, gradient i
     * first, activation f next. SEND_ACT first would have stage s blocked sending f while
     * stage s + 1 blocks sending gradient i (pp 2, micro_batches 2 already). The activation
     * still leaves before this stage's backward, so stage s + 1, which wants it right after
     * sending gradient i, waits for the transfer only, never for our compute. */
    int warmup = min_int(pp - stage - 1, m);
    for (int mb = 0; mb < warmup; mb++) {
      recv_and_forward(&b, mb);
      send_act(&b, mb);
    }
    for (int i = 0; i + warmup < m; i++) {
      recv_and_forward(&b, warmup + i);
      recv_grad(&b, i);
      send_act(&b, warmup + i);
      backward_and_send(&b, i);
    }
    for (int mb = m - warmup; mb < m; mb++) {
      recv_grad(&b, mb);
      backward_and_send(&b, mb);
    }
    s->max_live = min_int(pp - stage, m);
    break;
  }
  default:
    die("schedule_build: unknown schedule kind %d", (int)kind);
  }
}

void schedule_free(struct schedule *s) {
  free(s->actions);
  *s = (struct schedule){0};
}

const char *action_name(enum action_kind k) {
  switch (k) {
  case ACT_RECV_ACT: return "RECV_ACT";
  case ACT_FWD: return "FWD";
  case ACT_SEND_ACT: return "SEND_ACT";
  case ACT_RECV_GRAD: return "RECV_GRAD";
  case ACT_BWD: return "BWD";
  case ACT_SEND_GRAD: return "SEND_GRAD";
  }
  return "?";
}
