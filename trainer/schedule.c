/* Pipeline schedules (schedule.h). A forward of a micro-batch through a chunk is RECV_ACT, FWD,
 * SEND_ACT and a backward RECV_GRAD, BWD, SEND_GRAD, minus the transfers that have no peer at the
 * model's first and last chunk; the schedules differ only in how they interleave these pieces.
 *
 * Sends never block (comm.h) and receives do, so a rank can only ever wait in a receive, and a
 * list is deadlock-free when the send each receive waits for is issued by a peer that does not
 * itself wait, directly or through others, on the receiving rank. tests/unit/test_schedule.c
 * checks that for every rank of pipelines up to 8 stages, 4 chunks and 32 micro-batches, and
 * also with sends that block until their receive is posted. */
#include "trainer/schedule.h"

#include <stdlib.h>

#include "common/util.h"

struct builder {
  struct schedule *s;
  int pp, chunks, stage;
  int live[SCHEDULE_MAX_CHUNKS];    /* per chunk, walking the list: activations held */
  int slots[SCHEDULE_MAX_CHUNKS];   /* and input slots held (schedule.h: max_slots) */
};

/* The transfers are left out where the peer does not exist (the model's first and last
 * chunk); FWD and BWD keep the count of activations each chunk holds, whose peak is the
 * schedule's promise, and the slots' span (max_slots) is counted beside it. */
static void push(struct builder *b, enum action_kind kind, int mb, int chunk) {
  int tag;
  int is_transfer = kind != ACT_FWD && kind != ACT_BWD;
  struct action a = {kind, mb, chunk};
  if (is_transfer && action_peer(&a, b->pp, b->chunks, b->stage, &tag) < 0) return;
  b->s->actions[b->s->n++] = a;
  if (kind == ACT_FWD && ++b->live[chunk] > b->s->max_live[chunk])
    b->s->max_live[chunk] = b->live[chunk];
  if (kind == ACT_BWD) b->live[chunk]--;
  int peer_chunk, first = chunk_source(b->pp, b->stage, chunk, &peer_chunk) < 0;
  if (kind == (first ? ACT_FWD : ACT_RECV_ACT) && ++b->slots[chunk] > b->s->max_slots[chunk])
    b->s->max_slots[chunk] = b->slots[chunk];
  if (kind == (first ? ACT_BWD : ACT_SEND_GRAD)) b->slots[chunk]--;
}

static void recv_and_forward(struct builder *b, int mb, int chunk) {
  push(b, ACT_RECV_ACT, mb, chunk);
  push(b, ACT_FWD, mb, chunk);
}

static void backward_and_send(struct builder *b, int mb, int chunk) {
  push(b, ACT_BWD, mb, chunk);
  push(b, ACT_SEND_GRAD, mb, chunk);
}

static int min_int(int a, int b) { return a < b ? a : b; }

/* The k-th forward (backward: `backward` set) of an interleaved rank, over the m x v
 * (micro-batch, chunk) pairs: Megatron's order, groups of pp micro-batches through chunk 0, then
 * the same through chunk 1, and so on; backwards visit the chunks in reverse. */
static void virtual_mb(const struct builder *b, int k, int backward, int *mb, int *chunk) {
  int group = b->pp * b->chunks, in_group = k % group;
  *mb = k / group * b->pp + in_group % b->pp;
  *chunk = in_group / b->pp;
  if (backward) *chunk = b->chunks - 1 - *chunk;
}

/* 1F1B over the rank's m micro-batches (one chunk): `warmup` forwards ahead, then steady
 * steps of one forward and one backward, then the cool-down drains the backwards.
 *
 * Within a steady step the forward's SEND_ACT waits until after the backward's RECV_GRAD:
 * RECV_ACT f, FWD f, RECV_GRAD i, SEND_ACT f, BWD i, SEND_GRAD i. The next stage sends the
 * gradient of i before it needs activation f, so neither order deadlocks while sends never
 * block; but this one also holds when a send completes only as its receive is posted (NCCL on
 * one stream, MPI rendezvous): neighbours then meet in the same order, gradient i first,
 * activation f next. SEND_ACT first would have this stage blocked sending f while the next
 * blocks sending gradient i (pp 2, micro_batches 2 already). The activation still leaves before
 * this stage's backward, so the next stage, which wants it right after sending gradient i, waits
 * for the transfer only, never for our compute. */
static void one_f_one_b(struct builder *b, int warmup, int m) {
  for (int mb = 0; mb < warmup; mb++) {
    recv_and_forward(b, mb, 0);
    push(b, ACT_SEND_ACT, mb, 0);
  }
  for (int i = 0; i + warmup < m; i++) {
    recv_and_forward(b, warmup + i, 0);
    push(b, ACT_RECV_GRAD, i, 0);
    push(b, ACT_SEND_ACT, warmup + i, 0);
    backward_and_send(b, i, 0);
  }
  for (int mb = m - warmup; mb < m; mb++) {
    push(b, ACT_RECV_GRAD, mb, 0);
    backward_and_send(b, mb, 0);
  }
}

/* The transfers after one step of the interleaved schedule: the step's outputs out (sa: the
 * forward's activation, sg: the backward's input gradient) and the next step's inputs in (ra,
 * rg); k < 0 leaves one out. The ring (the last stage sends to stage 0) and pp = 2 (both
 * directions between the same two stages) make a cycle of sends if every stage sent first, so,
 * as Megatron orders unbatched transfers, even stages send first and odd stages receive first:
 * an even stage's send meets an odd neighbour's receive (test_schedule.c proves it for pp up to
 * 8, the odd ones included, where the wrap joins two even stages). Each step's receives are
 * those of the next step, so Megatron's warm-up is two forwards longer per stage than plain
 * 1F1B's: the timed schedule still has the textbook bubble. */
struct exchange {
  int sa, ra, sg, rg;   /* virtual indices (virtual_mb) of each transfer; -1: none */
};

static void transfer(struct builder *b, enum action_kind kind, int k) {
  if (k < 0) return;
  int mb, chunk;
  virtual_mb(b, k, kind == ACT_RECV_GRAD || kind == ACT_SEND_GRAD, &mb, &chunk);
  push(b, kind, mb, chunk);
}

static void exchange(struct builder *b, struct exchange x) {
  if (b->stage % 2 == 0) {
    transfer(b, ACT_SEND_ACT, x.sa);
    transfer(b, ACT_RECV_ACT, x.ra);
    transfer(b, ACT_SEND_GRAD, x.sg);
    transfer(b, ACT_RECV_GRAD, x.rg);
  } else {
    transfer(b, ACT_RECV_ACT, x.ra);
    transfer(b, ACT_SEND_ACT, x.sa);
    transfer(b, ACT_RECV_GRAD, x.rg);
    transfer(b, ACT_SEND_GRAD, x.sg);
  }
}

static void compute(struct builder *b, enum action_kind kind, int k) {
  int mb, chunk;
  virtual_mb(b, k, kind == ACT_BWD, &mb, &chunk);
  push(b, kind, mb, chunk);
}

/* Megatron's interleaved 1F1B over `total` = m x v forwards and backwards, each step followed
 * by the exchange of its outputs and of the next step's inputs. */
static void interleaved(struct builder *b, int warmup, int total) {
  transfer(b, ACT_RECV_ACT, 0);
  for (int k = 0; k < warmup; k++) {
    compute(b, ACT_FWD, k);
    exchange(b, (struct exchange){.sa = k, .ra = k + 1 < total ? k + 1 : -1, .sg = -1,
                                  .rg = k + 1 == warmup ? 0 : -1});
  }
  for (int i = 0; i + warmup < total; i++) {
    int f = warmup + i;
    compute(b, ACT_FWD, f);
    compute(b, ACT_BWD, i);
    exchange(b, (struct exchange){.sa = f, .ra = f + 1 < total ? f + 1 : -1, .sg = i,
                                  .rg = i + 1 < total ? i + 1 : -1});
  }
  for (int k = total - warmup; k < total; k++) {
    compute(b, ACT_BWD, k);
    exchange(b, (struct exchange){.sa = -1, .ra = -1, .sg = k, .rg = k + 1 < total ? k + 1 : -1});
  }
}

void schedule_build(struct schedule *s, enum schedule_kind kind, int pp, int chunks,
                    int micro_batches, int stage) {
  int m = micro_batches;
  if (pp < 1 || m < 1 || stage < 0 || stage >= pp || chunks < 1 ||
      chunks > SCHEDULE_MAX_CHUNKS ||
      (chunks > 1 && (kind != SCHEDULE_1F1B || pp < 2 || m % pp)))
    die("schedule_build: bad pipeline (pp %d, chunks %d, micro_batches %d, stage %d)", pp,
        chunks, m, stage);
  /* at most six actions per micro-batch and chunk */
  *s = (struct schedule){
      .actions = xmalloc(6 * (size_t)m * chunks * sizeof *s->actions), .chunks = chunks};
  struct builder b = {.s = s, .pp = pp, .chunks = chunks, .stage = stage};
  switch (kind) {
  case SCHEDULE_GPIPE:
    one_f_one_b(&b, m, m);   /* every forward first */
    break;
  case SCHEDULE_1F1B:
    if (chunks == 1) {
      /* Megatron's non-interleaved 1F1B. Stage s runs pp - s - 1 forwards ahead so that the
       * last stage can start backwards at once; a stage then never holds more than pp - s
       * activations. */
      one_f_one_b(&b, min_int(pp - stage - 1, m), m);
    } else {
      /* Megatron's interleaved 1F1B: (pp - s - 1) x 2 + (v - 1) x pp forwards ahead, so that
       * chunk v - 1 of the last stage has its first micro-batch when the warm-up ends; with
       * m = pp every forward goes first. */
      int total = m * chunks;
      interleaved(&b, m == pp ? total : min_int((pp - stage - 1) * 2 + (chunks - 1) * pp, total),
                  total);
    }
    break;
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

int chunk_source(int pp, int stage, int chunk, int *peer_chunk) {
  int k = chunk * pp + stage - 1;   /* the model chunk before */
  *peer_chunk = k < 0 ? -1 : k / pp;
  return k < 0 ? -1 : k % pp;
}

int chunk_dest(int pp, int chunks, int stage, int chunk, int *peer_chunk) {
  int k = chunk * pp + stage + 1;   /* the model chunk after */
  *peer_chunk = k < pp * chunks ? k / pp : -1;
  return k < pp * chunks ? k % pp : -1;
}

int action_peer(const struct action *a, int pp, int chunks, int stage, int *tag) {
  int peer = -1, peer_chunk, receiver = a->chunk, gradient = 0;
  switch (a->kind) {
  case ACT_RECV_ACT: peer = chunk_source(pp, stage, a->chunk, &peer_chunk); break;
  case ACT_SEND_ACT:
    peer = chunk_dest(pp, chunks, stage, a->chunk, &peer_chunk);
    receiver = peer_chunk;
    break;
  case ACT_RECV_GRAD:
    peer = chunk_dest(pp, chunks, stage, a->chunk, &peer_chunk);
    gradient = 1;
    break;
  case ACT_SEND_GRAD:
    peer = chunk_source(pp, stage, a->chunk, &peer_chunk);
    receiver = peer_chunk;
    gradient = 1;
    break;
  case ACT_FWD:
  case ACT_BWD: break;
  }
  *tag = ((a->mb * chunks) + receiver) * 2 + gradient;
  return peer;
}

/* ---- timing ------------------------------------------------------------------------------- */

/* The messages from one stage to another: the time each was sent, in order; receives take them
 * in the same order (the schedules pair up, test_schedule.c). */
struct timed_channel {
  double *sent;
  int n_sent, n_received;
};

struct timed_pipeline {
  const struct schedule *ranks;
  int pp, chunks;
  struct timed_channel *ch;   /* [from * pp + to] */
  double *clock;              /* when each stage's last action ended */
  int *pc, *live;             /* each stage's next action, chunk activations held */
  double fwd, bwd;
  int peak_live;
};

/* Runs the next action of `stage`: 1 if it ran, 0 if it waits for a message. */
static int run_action(struct timed_pipeline *t, int stage) {
  struct action a = t->ranks[stage].actions[t->pc[stage]];
  double *clock = &t->clock[stage];
  int tag, peer = action_peer(&a, t->pp, t->chunks, stage, &tag);
  switch (a.kind) {
  case ACT_RECV_ACT:
  case ACT_RECV_GRAD: {
    struct timed_channel *ch = &t->ch[peer * t->pp + stage];
    if (ch->n_received == ch->n_sent) return 0;
    double arrived = ch->sent[ch->n_received++];
    if (arrived > *clock) *clock = arrived;
    break;
  }
  case ACT_SEND_ACT:
  case ACT_SEND_GRAD: {
    struct timed_channel *ch = &t->ch[stage * t->pp + peer];
    ch->sent[ch->n_sent++] = *clock;
    break;
  }
  case ACT_FWD:
    *clock += t->fwd;
    if (++t->live[stage] > t->peak_live) t->peak_live = t->live[stage];
    break;
  case ACT_BWD:
    *clock += t->bwd;
    t->live[stage]--;
    break;
  }
  t->pc[stage]++;
  return 1;
}

void schedule_simulate(struct schedule_timing *out, enum schedule_kind kind, int pp, int chunks,
                       int micro_batches, double fwd, double bwd) {
  struct schedule *ranks = xcalloc((size_t)pp, sizeof *ranks);
  struct timed_pipeline t = {
    .ranks = ranks, .pp = pp, .chunks = chunks,
    .ch = xcalloc((size_t)pp * pp, sizeof *t.ch), .clock = xcalloc((size_t)pp, sizeof(double)),
    .pc = xcalloc((size_t)pp, sizeof(int)), .live = xcalloc((size_t)pp, sizeof(int)),
    .fwd = fwd, .bwd = bwd,
  };
  long long left = 0;
  for (int s = 0; s < pp; s++) {
    schedule_build(&ranks[s], kind, pp, chunks, micro_batches, s);
    left += ranks[s].n;
  }
  /* a stage sends at most two messages per micro-batch and chunk */
  for (int i = 0; i < pp * pp; i++)
    t.ch[i].sent = xcalloc(2 * (size_t)micro_batches * chunks, sizeof(double));
  /* a stage runs until it waits; the lists form a Kahn process network, so the times do not
   * depend on the order in which the stages are stepped */
  while (left > 0) {
    long long before = left;
    for (int s = 0; s < pp; s++)
      while (t.pc[s] < ranks[s].n && run_action(&t, s)) left--;
    if (left == before)
      die("schedule_simulate: the schedule of %d stages, %d chunks and %d micro-batches "
          "deadlocks", pp, chunks, micro_batches);
  }
  double step = 0;
  for (int s = 0; s < pp; s++) step = t.clock[s] > step ? t.clock[s] : step;
  *out = (struct schedule_timing){
    .step = step,
    .bubble = step > 0 ? 1 - micro_batches * chunks * (fwd + bwd) / step : 0,
    .peak_live = t.peak_live,
  };
  for (int s = 0; s < pp; s++) schedule_free(&ranks[s]);
  for (int i = 0; i < pp * pp; i++) free(t.ch[i].sent);
  free(ranks);
  free(t.ch);
  free(t.clock);
  free(t.pc);
  free(t.live);
}
