/* Pipeline schedules as data: the ordered list of actions one rank performs for one optimizer
 * step. The trainer executes the list; tests/unit/test_schedule.c runs every rank's list in a
 * simulator to prove that sends and receives pair up and nothing deadlocks, and
 * schedule_simulate times the lists to predict the pipeline bubble. */
#ifndef QWEN3_SCHEDULE_H
#define QWEN3_SCHEDULE_H

/* With parallel.virtual_stages = v (interleaved 1F1B) the model's layers are cut into pp x v
 * chunks; model chunk k lives on stage k % pp as that rank's local chunk k / pp (Megatron's
 * layout), so a micro-batch passes stages 0..pp-1 v times: the last stage's chunk c sends to
 * stage 0's chunk c + 1. With v = 1 each rank has one chunk and the pipeline is the plain one. */
#define SCHEDULE_MAX_CHUNKS 16

enum action_kind {
  ACT_RECV_ACT,    /* receive micro-batch mb's input activations of the chunk from its source */
  ACT_FWD,         /* forward micro-batch mb through the chunk's layers */
  ACT_SEND_ACT,    /* send mb's output activations to the next model chunk */
  ACT_RECV_GRAD,   /* receive the gradient of mb's output from the next model chunk */
  ACT_BWD,         /* backward of mb through the chunk's layers */
  ACT_SEND_GRAD,   /* send the gradient of mb's input to the previous model chunk */
};

struct action {
  enum action_kind kind;
  int mb;
  int chunk;   /* the rank's local chunk, 0..v-1 */
};

enum schedule_kind { SCHEDULE_GPIPE, SCHEDULE_1F1B };

struct schedule {
  struct action *actions;
  int n;
  int chunks;                           /* v */
  int max_live[SCHEDULE_MAX_CHUNKS];    /* per chunk: the most micro-batches whose activations
                                         * it holds at once */
  /* per chunk: the most micro-batches whose activation slot the trainer holds at once: from
   * the input's arrival (RECV_ACT; FWD on the model's first chunk, which receives nothing) to
   * the send of its gradient (SEND_GRAD; BWD on the first chunk). max_live with one chunk per
   * stage; interleaved 1F1B may receive a chunk's next input before a backward: more. */
  int max_slots[SCHEDULE_MAX_CHUNKS];
};

/* The action list of `stage` (0-based) of a pipeline of `pp` stages with `chunks` chunks per
 * stage for `micro_batches` micro-batches. Transfers with no peer (into the model's first chunk,
 * out of its last) are left out. Sends are asynchronous (comm.h), receives block. chunks > 1
 * needs SCHEDULE_1F1B, pp >= 2 and micro_batches a multiple of pp (job_validate.c says so to
 * the user; here it is fatal). */
void schedule_build(struct schedule *s, enum schedule_kind kind, int pp, int chunks,
                    int micro_batches, int stage);
void schedule_free(struct schedule *s);
const char *action_name(enum action_kind k);

/* Where a transfer action of `stage` goes or comes from: returns the peer stage, or -1 when
 * the action is a computation or its chunk is the model's first (RECV_ACT, SEND_GRAD) or last
 * (SEND_ACT, RECV_GRAD); *tag is the message's tag, the same on both sides and distinct for
 * every (micro-batch, receiving chunk, direction): (mb x v + chunk) x 2 + direction, below
 * 2^21 for JOB_MAX_MICRO_BATCHES and SCHEDULE_MAX_CHUNKS (Open MPI allows 2^23 at least). */
int action_peer(const struct action *a, int pp, int chunks, int stage, int *tag);
/* The neighbours of chunk `chunk` of `stage` in the model: the stage holding the model chunk
 * before (next: after) it, its local chunk in *peer_chunk; -1 at the model's ends. */
int chunk_source(int pp, int stage, int chunk, int *peer_chunk);
int chunk_dest(int pp, int chunks, int stage, int chunk, int *peer_chunk);

/* One optimizer step of a whole pipeline in time, for --plan. */
struct schedule_timing {
  double step;     /* from the first forward to the end of the last backward */
  double bubble;   /* the fraction of stages x step that stages sit idle */
  int peak_live;   /* the most chunk activations (micro-batch x chunk) one stage held at once */
};

/* Runs the action lists of all `pp` stages against each other: a forward of one chunk costs
 * fwd, a backward bwd, a transfer nothing; a send completes at once and a receive waits for its
 * send, as in comm.h. Dies if the lists deadlock (tests/unit/test_schedule.c proves they do
 * not). */
void schedule_simulate(struct schedule_timing *t, enum schedule_kind kind, int pp, int chunks,
                       int micro_batches, double fwd, double bwd);

#endif
