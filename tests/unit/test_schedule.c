/* Runs every rank's action list of a pipeline in a simulator and proves, for GPipe and 1F1B with
 * pp = 1..8 and micro_batches = 1..32, that sends and receives pair up in order, that nothing
 * deadlocks, that each rank computes every micro-batch forward then backward exactly once, and
 * that no rank holds more activations than the schedule promises. Broken schedules must be caught.
 *
 * The simulated transport is comm.h's: a send completes at once and appends its micro-batch to the
 * FIFO of its (from, to, direction) channel; a receive completes only when that FIFO is non-empty
 * and must find its own micro-batch at the head. Each channel has one writer and one reader, so
 * the ranks form a Kahn process network: whether it deadlocks does not depend on the order in
 * which the simulator steps the ranks, and one run decides it for every real interleaving.
 *
 * Every pipeline is also run with blocking sends (a send completes only when its peer's next
 * action is the matching receive and nothing else is in flight on the channel), the semantics of
 * NCCL point-to-point on one stream and of MPI rendezvous. The schedules keep to those as well, so
 * the GPU transport need not buffer sends to be safe. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "trainer/schedule.h"

enum check {
  CHK_PAIRING, CHK_DEADLOCK, CHK_ORDER, CHK_ONCE, CHK_LIVE, CHK_PROMISE, CHK_BLOCKING, N_CHECKS
};
static const char *check_names[N_CHECKS] = {
    "sends and receives pair up in order", "terminates without deadlock",
    "data dependencies respected",         "FWD and BWD once per micro-batch",
    "live activations <= max_live",        "max_live as promised",
    "no deadlock with blocking sends",
};

enum { MAX_PP = 8, MAX_MB = 32 };

struct channel {   /* the micro-batches sent but not yet received, oldest first */
  int *mb;
  int head, tail;
};

struct sim {
  int pp, m;
  int blocking;                 /* sends wait for their receive */
  struct schedule *ranks;
  struct channel act[MAX_PP];   /* stage s -> s + 1 */
  struct channel grad[MAX_PP];  /* stage s + 1 -> s */
  int pc[MAX_PP];               /* the next action of each stage */
  int live[MAX_PP], peak[MAX_PP];
  int *done;                    /* [stage][kind][mb]: how often that action has completed */
  unsigned failed;              /* bit per enum check */
  char msg[N_CHECKS][256];      /* the first failure of each check */
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

static int *done(struct sim *sim, int stage, enum action_kind k, int mb) {
  return &sim->done[((size_t)stage * 6 + k) * sim->m + mb];
}

static int channel_len(const struct channel *ch) { return ch->tail - ch->head; }

/* The channel an action sends on or receives from; NULL for compute or a missing peer. */
static struct channel *channel_of(struct sim *sim, int stage, enum action_kind k) {
  switch (k) {
  case ACT_SEND_ACT: return stage + 1 < sim->pp ? &sim->act[stage] : NULL;
  case ACT_RECV_ACT: return stage > 0 ? &sim->act[stage - 1] : NULL;
  case ACT_SEND_GRAD: return stage > 0 ? &sim->grad[stage - 1] : NULL;
  case ACT_RECV_GRAD: return stage + 1 < sim->pp ? &sim->grad[stage] : NULL;
  default: return NULL;
  }
}

/* The stage a transfer goes to or comes from. */
static int peer_of(int stage, enum action_kind k) {
  return k == ACT_SEND_ACT || k == ACT_RECV_GRAD ? stage + 1 : stage - 1;
}

/* The receive that matches a send. */
static enum action_kind matching_recv(enum action_kind send) {
  return send == ACT_SEND_ACT ? ACT_RECV_ACT : ACT_RECV_GRAD;
}

/* The action that must have completed on this rank before (kind, mb) may run; -1 if none. */
static int prerequisite(const struct sim *sim, int stage, enum action_kind k) {
  switch (k) {
  case ACT_FWD: return stage > 0 ? ACT_RECV_ACT : -1;
  case ACT_SEND_ACT: return ACT_FWD;
  case ACT_RECV_GRAD: return ACT_FWD;   /* a gradient for an output never produced */
  case ACT_BWD: return stage + 1 < sim->pp ? ACT_RECV_GRAD : ACT_FWD;
  case ACT_SEND_GRAD: return ACT_BWD;
  default: return -1;
  }
}

/* Tries the next action of `stage`: 1 if it completed, 0 if it must wait for a peer, -1 if the
 * list is broken beyond simulating (a transfer with no peer, a micro-batch out of range). */
static int step(struct sim *sim, int stage) {
  struct action a = sim->ranks[stage].actions[sim->pc[stage]];
  const char *name = action_name(a.kind);
  if (a.mb < 0 || a.mb >= sim->m) {
    fail(sim, CHK_ONCE, "stage %d: %s of micro-batch %d out of range", stage, name, a.mb);
    return -1;
  }
  int is_transfer = a.kind != ACT_FWD && a.kind != ACT_BWD;
  struct channel *ch = channel_of(sim, stage, a.kind);
  if (is_transfer && !ch) {
    fail(sim, CHK_PAIRING, "stage %d of %d: %s %d has no peer stage", stage, sim->pp, name, a.mb);
    return -1;
  }
  int is_send = a.kind == ACT_SEND_ACT || a.kind == ACT_SEND_GRAD;
  if (is_send && sim->blocking) {
    int peer = peer_of(stage, a.kind);
    const struct schedule *p = &sim->ranks[peer];
    if (channel_len(ch) > 0 || sim->pc[peer] == p->n ||
        p->actions[sim->pc[peer]].kind != matching_recv(a.kind))
      return 0;
  }
  if (a.kind == ACT_RECV_ACT || a.kind == ACT_RECV_GRAD) {
    if (channel_len(ch) == 0) return 0;
    int got = ch->mb[ch->head++];
    if (got != a.mb)
      fail(sim, CHK_PAIRING, "stage %d: %s %d receives the message of micro-batch %d", stage,
           name, a.mb, got);
  }
  int pre = prerequisite(sim, stage, a.kind);
  if (pre >= 0 && *done(sim, stage, (enum action_kind)pre, a.mb) == 0)
    fail(sim, CHK_ORDER, "stage %d: %s %d before %s %d", stage, name, a.mb,
         action_name((enum action_kind)pre), a.mb);
  if (is_send) ch->mb[ch->tail++] = a.mb;
  if (a.kind == ACT_FWD && ++sim->live[stage] > sim->peak[stage]) {
    sim->peak[stage] = sim->live[stage];
    if (sim->peak[stage] > sim->ranks[stage].max_live)
      fail(sim, CHK_LIVE, "stage %d holds %d activations after FWD %d, max_live is %d", stage,
           sim->peak[stage], a.mb, sim->ranks[stage].max_live);
  }
  if (a.kind == ACT_BWD) sim->live[stage]--;
  ++*done(sim, stage, a.kind, a.mb);
  sim->pc[stage]++;
  return 1;
}

static void print_stuck(const struct sim *sim) {
  printf("  stuck state (pp %d, micro_batches %d, %s sends):\n", sim->pp, sim->m,
         sim->blocking ? "blocking" : "asynchronous");
  for (int s = 0; s < sim->pp; s++) {
    const struct schedule *r = &sim->ranks[s];
    if (sim->pc[s] == r->n) {
      printf("    stage %d: finished\n", s);
      continue;
    }
    struct action a = r->actions[sim->pc[s]];
    printf("    stage %d: waits in action %d/%d, %s %d; in flight to it: %d activations, %d "
           "gradients\n",
           s, sim->pc[s], r->n, action_name(a.kind), a.mb,
           s > 0 ? channel_len(&sim->act[s - 1]) : 0,
           s + 1 < sim->pp ? channel_len(&sim->grad[s]) : 0);
  }
}

/* Runs the lists in ranks[0..pp-1] to the end or to a deadlock; sim->failed says what broke. */
static void simulate(struct sim *sim, struct schedule *ranks, int pp, int m, int blocking,
                     int print) {
  *sim = (struct sim){.pp = pp, .m = m, .blocking = blocking, .ranks = ranks};
  int total = 0;
  for (int s = 0; s < pp; s++) total += ranks[s].n;
  for (int s = 0; s < pp; s++) {
    sim->act[s].mb = xcalloc(total, sizeof(int));
    sim->grad[s].mb = xcalloc(total, sizeof(int));
  }
  sim->done = xcalloc((size_t)pp * 6 * m, sizeof(int));

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
    for (int s = 0; s + 1 < pp; s++) {
      if (channel_len(&sim->act[s]))
        fail(sim, CHK_PAIRING, "stage %d: %d activations sent to stage %d never received", s,
             channel_len(&sim->act[s]), s + 1);
      if (channel_len(&sim->grad[s]))
        fail(sim, CHK_PAIRING, "stage %d: %d gradients sent to stage %d never received", s + 1,
             channel_len(&sim->grad[s]), s);
    }
    for (int s = 0; s < pp; s++)
      for (int k = ACT_RECV_ACT; k <= ACT_SEND_GRAD; k++) {
        int expect = k == ACT_FWD || k == ACT_BWD || channel_of(sim, s, (enum action_kind)k);
        for (int mb = 0; mb < m; mb++) {
          int got = *done(sim, s, (enum action_kind)k, mb);
          if (got != expect)
            fail(sim, CHK_ONCE, "stage %d: %s %d ran %d times, expected %d", s,
                 action_name((enum action_kind)k), mb, got, expect);
        }
      }
  }
  for (int s = 0; s < pp; s++) {
    free(sim->act[s].mb);
    free(sim->grad[s].mb);
  }
  free(sim->done);
}

/* max_live is exactly the peak the simulation saw and the documented bound of each kind. */
static void check_promise(struct sim *sim, enum schedule_kind kind) {
  for (int s = 0; s < sim->pp; s++) {
    int max_live = sim->ranks[s].max_live;
    int want = kind == SCHEDULE_GPIPE ? sim->m : (sim->pp - s < sim->m ? sim->pp - s : sim->m);
    if (max_live != want || (kind == SCHEDULE_1F1B && max_live > sim->pp))
      fail(sim, CHK_PROMISE, "stage %d: max_live %d, expected %d", s, max_live, want);
    else if (sim->peak[s] != max_live)
      fail(sim, CHK_PROMISE, "stage %d: peak %d activations, max_live %d", s, sim->peak[s],
           max_live);
  }
}

static int n_passed, n_failed;

static void tally(int ok) {
  if (ok)
    n_passed++;
  else
    n_failed++;
}

static void build_all(struct schedule *ranks, enum schedule_kind kind, int pp, int m) {
  for (int s = 0; s < pp; s++) schedule_build(&ranks[s], kind, pp, m, s);
}

static void free_all(struct schedule *ranks, int pp) {
  for (int s = 0; s < pp; s++) schedule_free(&ranks[s]);
}

static void test_kind(enum schedule_kind kind, const char *name) {
  int ok[N_CHECKS] = {0}, runs = 0;
  char first[N_CHECKS][320] = {{0}};
  for (int pp = 1; pp <= MAX_PP; pp++)
    for (int m = 1; m <= MAX_MB; m++) {
      struct schedule ranks[MAX_PP];
      struct sim sim, blocking;
      build_all(ranks, kind, pp, m);
      simulate(&sim, ranks, pp, m, 0, 1);
      check_promise(&sim, kind);
      simulate(&blocking, ranks, pp, m, 1, 1);
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
    printf("%s %-6s %-38s %d/%d pipelines", ok[c] == runs ? "PASS" : "FAIL", name,
           check_names[c], ok[c], runs);
    if (first[c][0]) printf("; first failure: %s", first[c]);
    printf("\n");
  }
}

static int find(const struct schedule *s, enum action_kind k, int mb) {
  for (int i = 0; i < s->n; i++)
    if (s->actions[i].kind == k && s->actions[i].mb == mb) return i;
  die("action %s %d not in the list", action_name(k), mb);
}

static void swap_actions(struct schedule *s, int i, int j) {
  struct action t = s->actions[i];
  s->actions[i] = s->actions[j];
  s->actions[j] = t;
}

/* Breaks a correct schedule in one way and expects the simulator to flag `expect`. */
static void negative(const char *what, enum schedule_kind kind, int pp, int m, int stage,
                     int blocking, enum check expect, void (*breaker)(struct schedule *)) {
  struct schedule ranks[MAX_PP];
  struct sim sim;
  build_all(ranks, kind, pp, m);
  breaker(&ranks[stage]);
  simulate(&sim, ranks, pp, m, blocking, expect == CHK_DEADLOCK);
  int ok = (sim.failed & (1u << expect)) != 0;
  tally(ok);
  printf("%s broken schedule caught: %s -> %s\n", ok ? "PASS" : "FAIL", what,
         ok ? sim.msg[expect] : "not detected");
  free_all(ranks, pp);
}

/* Waits for the gradient of micro-batch 0 before sending its activation: the next stage can never
 * produce that gradient. */
static void recv_grad_before_send_act(struct schedule *s) {
  swap_actions(s, find(s, ACT_SEND_ACT, 0), find(s, ACT_RECV_GRAD, 0));
}
/* SEND_ACT before RECV_GRAD in the steady step, as Megatron orders its batched transfers: a
 * deadlock once sends block. */
static void send_act_before_recv_grad(struct schedule *s) {
  swap_actions(s, find(s, ACT_RECV_GRAD, 0), find(s, ACT_SEND_ACT, 1));
}
static void recv_acts_out_of_order(struct schedule *s) {
  int first = find(s, ACT_RECV_ACT, 0), second = find(s, ACT_RECV_ACT, 1);
  s->actions[first].mb = 1;
  s->actions[second].mb = 0;
}
static void bwd_before_fwd(struct schedule *s) {
  swap_actions(s, find(s, ACT_FWD, 0), find(s, ACT_BWD, 0));
}
static void fwd_twice(struct schedule *s) { s->actions[find(s, ACT_FWD, 1)].mb = 0; }
static void max_live_understated(struct schedule *s) { s->max_live--; }

int main(void) {
  test_kind(SCHEDULE_GPIPE, "gpipe");
  test_kind(SCHEDULE_1F1B, "1f1b");
  negative("1f1b pp 4 mb 8 stage 1: RECV_GRAD 0 swapped with SEND_ACT 0", SCHEDULE_1F1B, 4, 8, 1,
           0, CHK_DEADLOCK, recv_grad_before_send_act);
  negative("1f1b pp 2 mb 2 stage 0, blocking sends: SEND_ACT 1 before RECV_GRAD 0",
           SCHEDULE_1F1B, 2, 2, 0, 1, CHK_DEADLOCK, send_act_before_recv_grad);
  negative("gpipe pp 3 mb 4 stage 2: RECV_ACT 0 and 1 exchanged", SCHEDULE_GPIPE, 3, 4, 2, 0,
           CHK_PAIRING, recv_acts_out_of_order);
  negative("1f1b pp 1 mb 2: BWD 0 swapped with FWD 0", SCHEDULE_1F1B, 1, 2, 0, 0, CHK_ORDER,
           bwd_before_fwd);
  negative("gpipe pp 2 mb 3 stage 0: FWD 1 made FWD 0", SCHEDULE_GPIPE, 2, 3, 0, 0, CHK_ONCE,
           fwd_twice);
  negative("1f1b pp 4 mb 8 stage 0: max_live one too small", SCHEDULE_1F1B, 4, 8, 0, 0, CHK_LIVE,
           max_live_understated);
  printf("%d passed, %d failed\n", n_passed, n_failed);
  return n_failed ? 1 : 0;
}
