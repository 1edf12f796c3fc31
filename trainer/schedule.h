/* Pipeline schedules as data: the ordered list of actions one rank performs for one optimizer
 * step. The trainer executes the list; tests/unit/test_schedule.c runs every rank's list in a
 * simulator to prove that sends and receives pair up and nothing deadlocks. */
#ifndef QWEN3_SCHEDULE_H
#define QWEN3_SCHEDULE_H

enum action_kind {
  ACT_RECV_ACT,    /* receive micro-batch mb's input activations from stage - 1 */
  ACT_FWD,         /* forward micro-batch mb through this stage's layers */
  ACT_SEND_ACT,    /* send mb's output activations to stage + 1 */
  ACT_RECV_GRAD,   /* receive the gradient of mb's output from stage + 1 */
  ACT_BWD,         /* backward of mb through this stage's layers */
  ACT_SEND_GRAD,   /* send the gradient of mb's input to stage - 1 */
};

struct action {
  enum action_kind kind;
  int mb;
};

enum schedule_kind { SCHEDULE_GPIPE, SCHEDULE_1F1B };

struct schedule {
  struct action *actions;
  int n;
  int max_live;   /* the most micro-batches whose activations this rank holds at once */
};

/* The action list of `stage` (0-based) of a pipeline of `pp` stages for `micro_batches`
 * micro-batches. The first stage has no RECV_ACT / SEND_GRAD, the last no SEND_ACT / RECV_GRAD.
 * Sends are asynchronous (comm.h), receives block. */
void schedule_build(struct schedule *s, enum schedule_kind kind, int pp, int micro_batches,
                    int stage);
void schedule_free(struct schedule *s);
const char *action_name(enum action_kind k);

#endif
