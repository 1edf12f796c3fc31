/* Runs every rank's action list of a pipeline in a simulator and proves, for GPipe and 1F1B with
 * pp = 1..8 and micro_batches = 1..32, and for interleaved 1F1B with v = 2..4 chunks per stage
 * (pp >= 2, micro_batches a multiple of pp), that sends and receives pair up in order with the
 * right peer, chunk and tag, that nothing deadlocks, that each chunk computes every micro-batch
 * forward then backward exactly once, and that no chunk holds more activations than the schedule
 * promises. Broken schedules must be caught.
 *
 * The simulated transport is comm.h's: a send completes at once and appends its message to the
 * FIFO of its (from, to) channel, whatever its kind (NCCL pairs a pair of ranks' transfers in
 * issue order); a receive completes only when that FIFO is non-empty and must find its own
 * message at the head: its kind, micro-batch and tag, from the model chunk before its own
 * (activations) or after it (gradients). Each channel has one writer and one reader, so
 * the ranks form a Kahn process network: whether it deadlocks does not depend on the order in
 * which the simulator steps the ranks, and one run decides it for every real interleaving.
 *
 * Every pipeline is also run with blocking sends (a send completes only when its peer's next
 * action is the matching receive and nothing else is in flight on the channel), the semantics of
 * NCCL point-to-point on one stream and of MPI rendezvous. The schedules keep to those as well, so
 * the GPU transport need not buffer sends to be safe. schedule_simulate, which times the lists,
 * must give every schedule the textbook step and bubble.
 *
 * Each rank's list is also replayed against the buffers the trainer's run_schedule (train.c)
 * gives each chunk: its one received gradient (w->grad_in), its one outgoing gradient
 * (w->grad_out) and its max_slots activation slots, which the order within a rank must keep
 * apart (check_trainer_buffers). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "trainer/schedule.h"


enum check {
  CHK_PAIRING, CHK_DEADLOCK, CHK_ORDER, CHK_ONCE, CHK_LIVE, CHK_PROMISE, CHK_BLOCKING,
  CHK_GRAD_IN, CHK_GRAD_OUT, CHK_SLOTS, N_CHECKS
};
static const char *check_names[N_CHECKS] = {
    "sends and receives pair up in order", "terminates without deadlock",
    "data dependencies respected",         "FWD and BWD once per micro-batch",
    "live activations <= max_live",        "max_live as promised",
    "no deadlock with blocking sends",     "grad_in read by its BWD before reuse",
    "grad_out sent before the next BWD",   "slot peak == max_slots >= max_live",
};

enum { MAX_PP = 8, MAX_MB = 32, MAX_V = 4 };

/* A message in flight: what the sender says it is. The receiver checks it against its own
 * action, and the sender's model chunk against its own by the layout's rule (model chunk k =
 * local chunk x pp + stage), independently of schedule.c's action_peer. */
struct message {
  enum action_kind kind;   /* the send */
  int mb, tag;
  int from_model_chunk;
};

struct channel {   /* the messages sent from one stage to another but not yet received, oldest
                    * first: NCCL pairs a pair of ranks' transfers in issue order, whatever their
                    * kind or tag */
  struct message *msg;
  int head, tail;
};

struct sim {
  int pp, v, m;
  int blocking;                          /* sends wait for their receive */
  struct schedule *ranks;
  struct channel ch[MAX_PP][MAX_PP];     /* [from][to] */
  int pc[MAX_PP];                        /* the next action of each stage */
  int live[MAX_PP][MAX_V], peak[MAX_PP][MAX_V];
  int live_all[MAX_PP], peak_all[MAX_PP];   /* over the chunks of a stage */
  int *done;                   /* [stage][chunk][kind][mb]: how often that action has completed */
  unsigned failed;             /* bit per enum check */
  char msg[N_CHECKS][256];     /* the first failure of each check */
};

static void fail(struct sim *sim, enum check c, const char *fmt, ...) PRINTF_LIKE(3, 4);
static void fail(struct sim *sim, enum check c, const char *fmt, ...) {
  if (sim->failed & (1u << c)) return;
  sim->failed |= 1u << c;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(sim->msg[c], sizeof sim->msg[c], fmt, ap);
  va_end(ap);
}

static int *done(struct sim *sim, int stage, int chunk, enum action_kind k, int mb) {
  return &sim->done[(((size_t)stage * sim->v + chunk) * 6 + k) * sim->m + mb];
}

static int channel_len(const struct channel *ch) { return ch->tail - ch->head; }

static int model_chunk(const struct sim *sim, int stage, int chunk) {
  return chunk * sim->pp + stage;
}

/* Whether the action of (stage, chunk) has a peer by the layout: nothing flows into the model's
 * first chunk's input or out of its last chunk's output. */
static int has_peer(const struct sim *sim, int stage, int chunk, enum action_kind k) {
  int mc = model_chunk(sim, stage, chunk), last = sim->pp * sim->v - 1;
  switch (k) {
  case ACT_RECV_ACT:
  case ACT_SEND_GRAD: return mc > 0;
  case ACT_SEND_ACT:
  case ACT_RECV_GRAD: return mc < last;
  default: return 0;
  }
}

static int is_send(enum action_kind k) { return k == ACT_SEND_ACT || k == ACT_SEND_GRAD; }
static int is_recv(enum action_kind k) { return k == ACT_RECV_ACT || k == ACT_RECV_GRAD; }

/* The action that must have completed on this chunk before (kind, mb) may run; -1 if none. */
static int prerequisite(const struct sim *sim, int stage, int chunk, enum action_kind k) {
  switch (k) {
  case ACT_FWD: return has_peer(sim, stage, chunk, ACT_RECV_ACT) ? ACT_RECV_ACT : -1;
  case ACT_SEND_ACT: return ACT_FWD;
  case ACT_RECV_GRAD: return ACT_FWD;   /* a gradient for an output never produced */
  case ACT_BWD: return has_peer(sim, stage, chunk, ACT_RECV_GRAD) ? ACT_RECV_GRAD : ACT_FWD;
  case ACT_SEND_GRAD: return ACT_BWD;
  default: return -1;
  }
}

/* The receive at `stage` checks the message at the head of its channel. */
static void check_message(struct sim *sim, int stage, struct action a, int tag,
                          const struct message *got) {
  int want_from = model_chunk(sim, stage, a.chunk) + (a.kind == ACT_RECV_ACT ? -1 : 1);
  enum action_kind want_kind = a.kind == ACT_RECV_ACT ? ACT_SEND_ACT : ACT_SEND_GRAD;
  if (got->kind != want_kind || got->mb != a.mb || got->tag != tag ||
      got->from_model_chunk != want_from)
    fail(sim, CHK_PAIRING, "stage %d: %s %d of chunk %d (tag %d, from model chunk %d) receives "
         "%s %d of model chunk %d (tag %d)", stage, action_name(a.kind), a.mb, a.chunk, tag,
         want_from, action_name(got->kind), got->mb, got->from_model_chunk, got->tag);
}

/* Tries the next action of `stage`: 1 if it completed, 0 if it must wait for a peer, -1 if the
 * list is broken beyond simulating (a transfer with no peer, a micro-batch out of range). */
static int step(struct sim *sim, int stage) {
  struct action a = sim->ranks[stage].actions[sim->pc[stage]];
  const char *name = action_name(a.kind);
  if (a.mb < 0 || a.mb >= sim->m || a.chunk < 0 || a.chunk >= sim->v) {
    fail(sim, CHK_ONCE, "stage %d: %s of micro-batch %d, chunk %d out of range", stage, name,
         a.mb, a.chunk);
    return -1;
  }
  int tag, peer = action_peer(&a, sim->pp, sim->v, stage, &tag);
  int is_transfer = a.kind != ACT_FWD && a.kind != ACT_BWD;
  if (is_transfer && (peer < 0 || !has_peer(sim, stage, a.chunk, a.kind))) {
    fail(sim, CHK_PAIRING, "stage %d of %d: %s %d of chunk %d has no peer stage", stage, sim->pp,
         name, a.mb, a.chunk);
    return -1;
  }
  if (is_send(a.kind) && sim->blocking) {
    const struct schedule *p = &sim->ranks[peer];
    int ptag;
    if (channel_len(&sim->ch[stage][peer]) > 0 || sim->pc[peer] == p->n ||
        !is_recv(p->actions[sim->pc[peer]].kind) ||
        action_peer(&p->actions[sim->pc[peer]], sim->pp, sim->v, peer, &ptag) != stage)
      return 0;
  }
  if (is_recv(a.kind)) {
    struct channel *ch = &sim->ch[peer][stage];
    if (channel_len(ch) == 0) return 0;
    check_message(sim, stage, a, tag, &ch->msg[ch->head++]);
  }
  int pre = prerequisite(sim, stage, a.chunk, a.kind);
  if (pre >= 0 && *done(sim, stage, a.chunk, (enum action_kind)pre, a.mb) == 0)
    fail(sim, CHK_ORDER, "stage %d chunk %d: %s %d before %s %d", stage, a.chunk, name, a.mb,
         action_name((enum action_kind)pre), a.mb);
  if (is_send(a.kind)) {
    struct channel *ch = &sim->ch[stage][peer];
    ch->msg[ch->tail++] = (struct message){a.kind, a.mb, tag, model_chunk(sim, stage, a.chunk)};
  }
  int *live = &sim->live[stage][a.chunk], *peak = &sim->peak[stage][a.chunk];
  if (a.kind == ACT_FWD && ++*live > *peak) {
    *peak = *live;
    if (*peak > sim->ranks[stage].max_live[a.chunk])
      fail(sim, CHK_LIVE, "stage %d chunk %d holds %d activations after FWD %d, max_live is %d",
           stage, a.chunk, *peak, a.mb, sim->ranks[stage].max_live[a.chunk]);
  }
  if (a.kind == ACT_FWD && ++sim->live_all[stage] > sim->peak_all[stage])
    sim->peak_all[stage] = sim->live_all[stage];
  if (a.kind == ACT_BWD) {
    --*live;
    sim->live_all[stage]--;
  }
  ++*done(sim, stage, a.chunk, a.kind, a.mb);
  sim->pc[stage]++;
  return 1;
}

static void print_stuck(const struct sim *sim) {
  printf("  stuck state (pp %d, chunks %d, micro_batches %d, %s sends):\n", sim->pp, sim->v,
         sim->m, sim->blocking ? "blocking" : "asynchronous");
  for (int s = 0; s < sim->pp; s++) {
    const struct schedule *r = &sim->ranks[s];
    if (sim->pc[s] == r->n) {
      printf("    stage %d: finished\n", s);
      continue;
    }
    struct action a = r->actions[sim->pc[s]];
    int in_flight = 0;
    for (int from = 0; from < sim->pp; from++) in_flight += channel_len(&sim->ch[from][s]);
    printf("    stage %d: waits in action %d/%d, %s %d of chunk %d; %d messages in flight to it\n",
           s, sim->pc[s], r->n, action_name(a.kind), a.mb, a.chunk, in_flight);
  }
}

/* Runs the lists in ranks[0..pp-1] to the end or to a deadlock; sim->failed says what broke. */
static void simulate(struct sim *sim, struct schedule *ranks, int pp, int v, int m, int blocking,
                     int print) {
  *sim = (struct sim){.pp = pp, .v = v, .m = m, .blocking = blocking, .ranks = ranks};
  int total = 0;
  for (int s = 0; s < pp; s++) total += ranks[s].n;
  for (int f = 0; f < pp; f++)
    for (int t = 0; t < pp; t++) sim->ch[f][t].msg = xcalloc(total, sizeof(struct message));
  sim->done = xcalloc((size_t)pp * v * 6 * m, sizeof(int));

  int left = total, broken = 0;
  while (left > 0 && !broken) {
    int progressed = 0;
    for (int s = 0; s < pp && !broken; s++) {
      while (sim->pc[s] < ranks[s].n) {
        int r = step(sim, s);
        if (r < 0) broken = 1;
        if (r <= 0) break;
        progressed = 1;
        left--;
      }
    }
    if (!progressed && !broken) {
      fail(sim, CHK_DEADLOCK, "deadlock with %d of %d actions left", left, total);
      if (print) print_stuck(sim);
      break;
    }
  }
  if (broken) fail(sim, CHK_DEADLOCK, "simulation stopped by a broken action");

  if (left == 0) {
    for (int f = 0; f < pp; f++)
      for (int t = 0; t < pp; t++)
        if (channel_len(&sim->ch[f][t]))
          fail(sim, CHK_PAIRING, "stage %d: %d messages sent to stage %d never received", f,
               channel_len(&sim->ch[f][t]), t);
    for (int s = 0; s < pp; s++)
      for (int c = 0; c < v; c++)
        for (int k = ACT_RECV_ACT; k <= ACT_SEND_GRAD; k++) {
          int expect = k == ACT_FWD || k == ACT_BWD || has_peer(sim, s, c, (enum action_kind)k);
          for (int mb = 0; mb < m; mb++) {
            int got = *done(sim, s, c, (enum action_kind)k, mb);
            if (got != expect)
              fail(sim, CHK_ONCE, "stage %d chunk %d: %s %d ran %d times, expected %d", s, c,
                   action_name((enum action_kind)k), mb, got, expect);
          }
        }
  }
  for (int f = 0; f < pp; f++)
    for (int t = 0; t < pp; t++) free(sim->ch[f][t].msg);
  free(sim->done);
}

/* Of the first n forwards of an interleaved rank, those of chunk c: Megatron's order runs
 * groups of pp micro-batches through chunk 0, then chunk 1, ... (backwards: chunk v - 1 first,
 * so the first n backwards hold forwards_of(n, v - 1 - c) of chunk c). */
static int forwards_of(const struct sim *sim, int n, int c) {
  int group = sim->pp * sim->v, in = n % group - c * sim->pp;
  return n / group * sim->pp + (in < 0 ? 0 : in > sim->pp ? sim->pp : in);
}

/* The documented bound of max_live: GPipe holds every micro-batch, 1F1B pp - s on stage s.
 * Interleaved 1F1B runs w = (pp - s - 1) x 2 + (v - 1) x pp forwards ahead (all with m = pp),
 * then steady steps of one forward and one backward: after steady step t chunk c holds
 * forwards_of(w + 1 + t, c) - forwards_of(t, v - 1 - c), and max_live is the largest of these. */
static int promised_live(const struct sim *sim, enum schedule_kind kind, int s, int c) {
  int pp = sim->pp, m = sim->m, v = sim->v, total = m * v;
  if (kind == SCHEDULE_GPIPE) return m;
  if (v == 1) return pp - s < m ? pp - s : m;
  int w = m == pp ? total : (pp - s - 1) * 2 + (v - 1) * pp, most = 0;
  if (w > total) w = total;
  for (int t = 0; t <= total - w; t++) {
    int ahead = w + 1 + t > total ? total : w + 1 + t;
    int held = forwards_of(sim, ahead, c) - forwards_of(sim, t, v - 1 - c);
    if (held > most) most = held;
  }
  return most;
}

/* max_live is exactly the peak the simulation saw and the documented bound of each kind. */
static void check_promise(struct sim *sim, enum schedule_kind kind) {
  for (int s = 0; s < sim->pp; s++) {
    /* Megatron's bound on all chunks at once: the warm-up's forwards and one more */
    int w = (sim->pp - s - 1) * 2 + (sim->v - 1) * sim->pp;
    if (sim->v > 1 && sim->m > sim->pp && sim->peak_all[s] > w + 1)
      fail(sim, CHK_PROMISE, "stage %d: %d chunk activations at once, more than warm-up %d + 1",
           s, sim->peak_all[s], w);
    for (int c = 0; c < sim->v; c++) {
      int max_live = sim->ranks[s].max_live[c], want = promised_live(sim, kind, s, c);
      if (max_live != want)
        fail(sim, CHK_PROMISE, "stage %d chunk %d: max_live %d, expected %d", s, c, max_live,
             want);
      else if (sim->peak[s][c] != max_live)
        fail(sim, CHK_PROMISE, "stage %d chunk %d: peak %d activations, max_live %d", s, c,
             sim->peak[s][c], max_live);
    }
  }
}

/* ---- the trainer's buffers ---------------------------------------------------------------- */

/* run_schedule (train.c) runs a rank's list on one worker per local chunk, whose buffers the
 * chunk's micro-batches share: the simulator proves the order between ranks, these rules the
 * order within one. The state of one chunk's buffers, walking its rank's list: */
struct chunk_buffers {
  int grad_in;         /* the micro-batch whose received gradient w->grad_in holds, not yet read
                        * by its BWD; -1: none */
  int grad_out;        /* the micro-batch whose input gradient BWD left in w->grad_out, not yet
                        * sent; -1: none */
  char held[MAX_MB];   /* micro-batches holding an activation slot (live_of[mb] >= 0) */
  int slots, peak;     /* slots held, the most at once */
};

/* grad_in: RECV_GRAD writes the chunk's one w->grad_in and BWD reads it (and uses it as
 * scratch). A received gradient must be read by its own micro-batch's BWD before the chunk's
 * next RECV_GRAD overwrites it, and each BWD but the model's last chunk's (which starts from the
 * loss) must find its own micro-batch's gradient there, not another's or stale data. */
static void grad_in_rule(struct sim *sim, int stage, struct action a, struct chunk_buffers *b) {
  if (a.kind == ACT_RECV_GRAD) {
    if (b->grad_in >= 0)
      fail(sim, CHK_GRAD_IN, "stage %d chunk %d: RECV_GRAD %d overwrites grad_in before BWD %d "
           "read it", stage, a.chunk, a.mb, b->grad_in);
    b->grad_in = a.mb;
  } else if (a.kind == ACT_BWD && has_peer(sim, stage, a.chunk, ACT_RECV_GRAD)) {
    if (b->grad_in != a.mb)
      fail(sim, CHK_GRAD_IN, "stage %d chunk %d: BWD %d reads grad_in holding micro-batch %d "
           "(-1: nothing received)", stage, a.chunk, a.mb, b->grad_in);
    b->grad_in = -1;
  }
}

/* grad_out: BWD leaves the gradient of the chunk's input in its one w->grad_out and SEND_GRAD
 * sends it from there (comm.h lets the buffer be reused once the send returns). The chunk's next
 * BWD overwrites it, so the SEND_GRAD of each micro-batch must come first. The model's first
 * chunk sends nothing back. */
static void grad_out_rule(struct sim *sim, int stage, struct action a, struct chunk_buffers *b) {
  if (!has_peer(sim, stage, a.chunk, ACT_SEND_GRAD)) return;
  if (a.kind == ACT_BWD) {
    if (b->grad_out >= 0)
      fail(sim, CHK_GRAD_OUT, "stage %d chunk %d: BWD %d overwrites grad_out before SEND_GRAD %d",
           stage, a.chunk, a.mb, b->grad_out);
    b->grad_out = a.mb;
  } else if (a.kind == ACT_SEND_GRAD) {
    if (b->grad_out != a.mb)
      fail(sim, CHK_GRAD_OUT, "stage %d chunk %d: SEND_GRAD %d sends grad_out holding "
           "micro-batch %d (-1: no BWD since the last send)", stage, a.chunk, a.mb, b->grad_out);
    b->grad_out = -1;
  }
}

/* Activation slots, as claim_live and release_live: any action of a micro-batch without a slot
 * claims one (its first: RECV_ACT, FWD on the model's first chunk), SEND_GRAD frees it (BWD on
 * the first chunk, which sends nothing). The worker is planned with max_slots[chunk] of them and
 * dies when a claim finds none free. */
static void slot_rule(struct sim *sim, int stage, struct action a, struct chunk_buffers *b) {
  int first = !has_peer(sim, stage, a.chunk, ACT_RECV_ACT);
  if (!b->held[a.mb]) {
    b->held[a.mb] = 1;
    if (++b->slots > b->peak) b->peak = b->slots;
  }
  if (a.kind == (first ? ACT_BWD : ACT_SEND_GRAD)) {
    b->held[a.mb] = 0;
    b->slots--;
  }
}

/* At the end of the list both gradient buffers are free, and every slot too: the trainer keeps
 * live_of across steps, so a slot held now is one fewer next step. The peak of slots is exactly
 * max_slots, neither an allocation too small (the trainer dies) nor memory wasted, and a slot
 * spans its micro-batch's activations, so max_slots >= max_live. */
static void check_chunk_end(struct sim *sim, int stage, int chunk, const struct chunk_buffers *b) {
  const struct schedule *r = &sim->ranks[stage];
  if (b->grad_in >= 0)
    fail(sim, CHK_GRAD_IN, "stage %d chunk %d: the gradient of %d is received, never read", stage,
         chunk, b->grad_in);
  if (b->grad_out >= 0)
    fail(sim, CHK_GRAD_OUT, "stage %d chunk %d: the gradient of %d is computed, never sent",
         stage, chunk, b->grad_out);
  if (b->slots != 0)
    fail(sim, CHK_SLOTS, "stage %d chunk %d: %d slots still held after the list", stage, chunk,
         b->slots);
  else if (b->peak != r->max_slots[chunk] || r->max_slots[chunk] < r->max_live[chunk])
    fail(sim, CHK_SLOTS, "stage %d chunk %d: peak %d slots, max_slots %d, max_live %d", stage,
         chunk, b->peak, r->max_slots[chunk], r->max_live[chunk]);
}

/* Replays each rank's list, in order, against its chunks' buffers. */
static void check_trainer_buffers(struct sim *sim) {
  for (int s = 0; s < sim->pp; s++) {
    const struct schedule *r = &sim->ranks[s];
    struct chunk_buffers b[MAX_V];
    for (int c = 0; c < sim->v; c++) b[c] = (struct chunk_buffers){.grad_in = -1, .grad_out = -1};
    for (int i = 0; i < r->n; i++) {
      struct action a = r->actions[i];
      if (a.mb < 0 || a.mb >= sim->m || a.chunk < 0 || a.chunk >= sim->v)
        continue;   /* CHK_ONCE says so */
      grad_in_rule(sim, s, a, &b[a.chunk]);
      grad_out_rule(sim, s, a, &b[a.chunk]);
      slot_rule(sim, s, a, &b[a.chunk]);
    }
    for (int c = 0; c < sim->v; c++) check_chunk_end(sim, s, c, &b[c]);
  }
}

static int n_passed, n_failed;

static void tally(int ok) {
  if (ok)
    n_passed++;
  else
    n_failed++;
}

static void build_all(struct schedule *ranks, enum schedule_kind kind, int pp, int v, int m) {
  for (int s = 0; s < pp; s++) schedule_build(&ranks[s], kind, pp, v, m, s);
}

static void free_all(struct schedule *ranks, int pp) {
  for (int s = 0; s < pp; s++) schedule_free(&ranks[s]);
}

/* The pipelines a kind is proven on: pp 1..MAX_PP and micro_batches 1..MAX_MB; with v > 1 (1F1B
 * only) pp >= 2 and micro_batches a multiple of pp, as job_validate.c requires. */
static int valid(int pp, int v, int m) { return v == 1 || (pp >= 2 && m % pp == 0); }

static void test_kind(enum schedule_kind kind, int v, const char *name) {
  int ok[N_CHECKS] = {0}, runs = 0;
  char first[N_CHECKS][320] = {{0}};
  for (int pp = 1; pp <= MAX_PP; pp++)
    for (int m = 1; m <= MAX_MB; m++) {
      if (!valid(pp, v, m)) continue;
      struct schedule ranks[MAX_PP];
      struct sim sim, blocking;
      build_all(ranks, kind, pp, v, m);
      simulate(&sim, ranks, pp, v, m, 0, 1);
      check_promise(&sim, kind);
      check_trainer_buffers(&sim);
      simulate(&blocking, ranks, pp, v, m, 1, 1);
      if (blocking.failed & (1u << CHK_DEADLOCK))
        fail(&sim, CHK_BLOCKING, "%s", blocking.msg[CHK_DEADLOCK]);
      runs++;
      for (int c = 0; c < N_CHECKS; c++) {
        int pass = !(sim.failed & (1u << c));
        tally(pass);
        ok[c] += pass;
        if (!pass && !first[c][0])
          snprintf(first[c], sizeof first[c], "pp %d, micro_batches %d: %s", pp, m, sim.msg[c]);
      }
      free_all(ranks, pp);
    }
  for (int c = 0; c < N_CHECKS; c++) {
    printf("%s %-9s %-38s %d/%d pipelines", ok[c] == runs ? "PASS" : "FAIL", name,
           check_names[c], ok[c], runs);
    if (first[c][0]) printf("; first failure: %s", first[c]);
    printf("\n");
  }
}

static int find(const struct schedule *s, enum action_kind k, int mb, int chunk) {
  for (int i = 0; i < s->n; i++)
    if (s->actions[i].kind == k && s->actions[i].mb == mb && s->actions[i].chunk == chunk)
      return i;
  die("action %s %d of chunk %d not in the list", action_name(k), mb, chunk);
}

static void swap_actions(struct schedule *s, int i, int j) {
  struct action t = s->actions[i];
  s->actions[i] = s->actions[j];
  s->actions[j] = t;
}

/* Moves action `from` to index `to`, shifting the actions between by one. */
static void move_action(struct schedule *s, int from, int to) {
  struct action a = s->actions[from];
  int dir = to > from ? 1 : -1;
  for (int i = from; i != to; i += dir) s->actions[i] = s->actions[i + dir];
  s->actions[to] = a;
}

/* Breaks a correct schedule in one way and expects the simulator to flag `expect`. */
static void negative(const char *what, enum schedule_kind kind, int pp, int v, int m, int stage,
                     int blocking, enum check expect, void (*breaker)(struct schedule *)) {
  struct schedule ranks[MAX_PP];
  struct sim sim;
  build_all(ranks, kind, pp, v, m);
  breaker(&ranks[stage]);
  simulate(&sim, ranks, pp, v, m, blocking, expect == CHK_DEADLOCK);
  check_trainer_buffers(&sim);
  int ok = (sim.failed & (1u << expect)) != 0;
  tally(ok);
  printf("%s broken schedule caught: %s -> %s\n", ok ? "PASS" : "FAIL", what,
         ok ? sim.msg[expect] : "not detected");
  free_all(ranks, pp);
}

/* Waits for the gradient of micro-batch 0 before sending its activation: the next stage can never
 * produce that gradient. */
static void recv_grad_before_send_act(struct schedule *s) {
  swap_actions(s, find(s, ACT_SEND_ACT, 0, 0), find(s, ACT_RECV_GRAD, 0, 0));
}
/* SEND_ACT before RECV_GRAD in the steady step, as Megatron orders its batched transfers: a
 * deadlock once sends block. */
static void send_act_before_recv_grad(struct schedule *s) {
  swap_actions(s, find(s, ACT_RECV_GRAD, 0, 0), find(s, ACT_SEND_ACT, 1, 0));
}
static void recv_acts_out_of_order(struct schedule *s) {
  int first = find(s, ACT_RECV_ACT, 0, 0), second = find(s, ACT_RECV_ACT, 1, 0);
  s->actions[first].mb = 1;
  s->actions[second].mb = 0;
}
static void bwd_before_fwd(struct schedule *s) {
  swap_actions(s, find(s, ACT_FWD, 0, 0), find(s, ACT_BWD, 0, 0));
}
static void fwd_twice(struct schedule *s) { s->actions[find(s, ACT_FWD, 1, 0)].mb = 0; }
static void max_live_understated(struct schedule *s) { s->max_live[0]--; }
/* Interleaved: micro-batch 0's forwards of chunks 0 and 1 run in each other's place. */
static void chunks_swapped(struct schedule *s) {
  enum action_kind fwd[] = {ACT_RECV_ACT, ACT_FWD, ACT_SEND_ACT};
  for (int k = 0; k < 3; k++) {
    int a = find(s, fwd[k], 0, 0), b = find(s, fwd[k], 0, 1);
    s->actions[a].chunk = 1;
    s->actions[b].chunk = 0;
  }
}
/* Interleaved: the last stage's chunk 0 sends micro-batch 0 to stage 0's chunk 2, not 1. */
static void sent_to_wrong_chunk(struct schedule *s) {
  s->actions[find(s, ACT_SEND_ACT, 0, 0)].chunk = 1;
}
static void chunk_max_live_understated(struct schedule *s) { s->max_live[1]--; }
/* Interleaved, an odd stage: its send of micro-batch 0 before its receive of micro-batch 1, as
 * an even stage orders them: stage 0 is sending micro-batch 1 meanwhile. */
static void odd_stage_sends_first(struct schedule *s) {
  swap_actions(s, find(s, ACT_RECV_ACT, 1, 0), find(s, ACT_SEND_ACT, 0, 0));
}
/* The cool-down fetches micro-batch 7's gradient before micro-batch 6's backward has read its
 * own: no deadlock, no pairing error, but w->grad_in is overwritten. */
static void recv_grad_early(struct schedule *s) {
  move_action(s, find(s, ACT_RECV_GRAD, 7, 0), find(s, ACT_BWD, 6, 0));
}
/* Micro-batch 6's gradient leaves after micro-batch 7's backward has overwritten w->grad_out. */
static void send_grad_late(struct schedule *s) {
  move_action(s, find(s, ACT_SEND_GRAD, 6, 0), find(s, ACT_BWD, 7, 0));
}
static void max_slots_understated(struct schedule *s) { s->max_slots[0]--; }
static void chunk_max_slots_overstated(struct schedule *s) { s->max_slots[1]++; }

/* schedule_simulate with forward 1 and backward 2 per chunk. Plain: both schedules take
 * (m + pp - 1) x 3, so the bubble is (pp - 1) / (m + pp - 1), and stage 0 holds the most
 * activations, its max_live. Interleaved with v chunks: (v m + pp - 1) x 3, the bubble
 * (pp - 1) / (v m + pp - 1): Megatron's (pp - 1) / (v m) of the ideal time (Narayanan et al.
 * 2021, section 2.2.2) is the same idle time relative to v m x 3 instead of the whole step. */
static void test_timing(enum schedule_kind kind, int v, const char *name) {
  int ok = 0, runs = 0;
  char first[256] = "";
  for (int pp = 1; pp <= MAX_PP; pp++)
    for (int m = 1; m <= MAX_MB; m++) {
      if (!valid(pp, v, m)) continue;
      struct schedule_timing t;
      struct schedule s0;
      schedule_simulate(&t, kind, pp, v, m, 1, 2);
      schedule_build(&s0, kind, pp, v, m, 0);
      int slots = v * m + pp - 1, live = 0;
      for (int c = 0; c < v; c++) live += s0.max_live[c];
      double bubble = (double)(pp - 1) / slots;
      int pass = t.step == 3.0 * slots && fabs(t.bubble - bubble) < 1e-12 &&
                 (v > 1 ? t.peak_live <= live : t.peak_live == live);
      if (!pass && !first[0])
        snprintf(first, sizeof first, "pp %d, micro_batches %d: step %g (want %d), bubble %g "
                 "(want %g), peak %d (max_live of stage 0 %d)", pp, m, t.step, 3 * slots,
                 t.bubble, bubble, t.peak_live, live);
      schedule_free(&s0);
      ok += pass;
      runs++;
    }
  tally(ok == runs);
  printf("%s %-9s %-38s %d/%d pipelines%s%s\n", ok == runs ? "PASS" : "FAIL", name,
         "simulated step and bubble", ok, runs, first[0] ? "; first failure: " : "", first);
}

int main(void) {
  test_kind(SCHEDULE_GPIPE, 1, "gpipe");
  test_kind(SCHEDULE_1F1B, 1, "1f1b");
  test_kind(SCHEDULE_1F1B, 2, "1f1b v=2");
  test_kind(SCHEDULE_1F1B, 3, "1f1b v=3");
  test_kind(SCHEDULE_1F1B, 4, "1f1b v=4");
  test_timing(SCHEDULE_GPIPE, 1, "gpipe");
  test_timing(SCHEDULE_1F1B, 1, "1f1b");
  test_timing(SCHEDULE_1F1B, 2, "1f1b v=2");
  test_timing(SCHEDULE_1F1B, 3, "1f1b v=3");
  test_timing(SCHEDULE_1F1B, 4, "1f1b v=4");
  negative("1f1b pp 4 mb 8 stage 1: RECV_GRAD 0 swapped with SEND_ACT 0", SCHEDULE_1F1B, 4, 1, 8,
           1, 0, CHK_DEADLOCK, recv_grad_before_send_act);
  negative("1f1b pp 2 mb 2 stage 0, blocking sends: SEND_ACT 1 before RECV_GRAD 0",
           SCHEDULE_1F1B, 2, 1, 2, 0, 1, CHK_DEADLOCK, send_act_before_recv_grad);
  negative("gpipe pp 3 mb 4 stage 2: RECV_ACT 0 and 1 exchanged", SCHEDULE_GPIPE, 3, 1, 4, 2, 0,
           CHK_PAIRING, recv_acts_out_of_order);
  negative("1f1b pp 1 mb 2: BWD 0 swapped with FWD 0", SCHEDULE_1F1B, 1, 1, 2, 0, 0, CHK_ORDER,
           bwd_before_fwd);
  negative("gpipe pp 2 mb 3 stage 0: FWD 1 made FWD 0", SCHEDULE_GPIPE, 2, 1, 3, 0, 0, CHK_ONCE,
           fwd_twice);
  negative("1f1b pp 4 mb 8 stage 0: max_live one too small", SCHEDULE_1F1B, 4, 1, 8, 0, 0,
           CHK_LIVE, max_live_understated);
  negative("1f1b v=2 pp 4 mb 8 stage 1: chunks 0 and 1 of mb 0 swapped", SCHEDULE_1F1B, 4, 2, 8,
           1, 0, CHK_PAIRING, chunks_swapped);
  negative("1f1b v=3 pp 2 mb 4 stage 1: chunk 0 sends mb 0 to chunk 2", SCHEDULE_1F1B, 2, 3, 4,
           1, 0, CHK_PAIRING, sent_to_wrong_chunk);
  negative("1f1b v=2 pp 4 mb 8 stage 0: max_live of chunk 1 one too small", SCHEDULE_1F1B, 4, 2,
           8, 0, 0, CHK_LIVE, chunk_max_live_understated);
  negative("1f1b v=2 pp 2 mb 4 stage 1, blocking sends: SEND_ACT 0 before RECV_ACT 1",
           SCHEDULE_1F1B, 2, 2, 4, 1, 1, CHK_DEADLOCK, odd_stage_sends_first);
  negative("1f1b pp 4 mb 8 stage 1: RECV_GRAD 7 moved before BWD 6", SCHEDULE_1F1B, 4, 1, 8, 1,
           0, CHK_GRAD_IN, recv_grad_early);
  negative("1f1b pp 4 mb 8 stage 1: SEND_GRAD 6 moved after BWD 7", SCHEDULE_1F1B, 4, 1, 8, 1, 0,
           CHK_GRAD_OUT, send_grad_late);
  negative("1f1b pp 4 mb 8 stage 1: max_slots one too small", SCHEDULE_1F1B, 4, 1, 8, 1, 0,
           CHK_SLOTS, max_slots_understated);
  negative("1f1b v=2 pp 4 mb 8 stage 0: max_slots of chunk 1 one too large", SCHEDULE_1F1B, 4, 2,
           8, 0, 0, CHK_SLOTS, chunk_max_slots_overstated);
  printf("%d passed, %d failed\n", n_passed, n_failed);
  return n_failed ? 1 : 0;
}
