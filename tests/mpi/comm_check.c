/* Exercises comm.h under mpirun; tests/mpi/test_comm.sh runs it in several layouts.
 *
 *   comm_check PP            layout, point-to-point, reductions, broadcast, barriers
 *   comm_check PP die RANK   rank RANK dies while the others wait in a barrier
 *   comm_check PP abort RANK likewise, but calls comm_abort(3)
 *   comm_check PP hook RANK  likewise, but calls g_abort_hook(4), which die() calls
 *   comm_check PP tied       uses GROUP_TIED (which must die when PP is 1)
 *   comm_check PP large      stage 0 sends stage 1 a message of more than INT_MAX bytes
 *   comm_check PP truncate   stage 1 receives a message longer than its buffer: an MPI error
 *
 * Each rank prints its failures; rank 0 ends with "comm_check ...: N checks, M failed" summed over
 * all ranks, and the exit status is non-zero when M is. */
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm.h"
#include "common/util.h"

static struct comm c;
static int n_checks, n_failed;

static void check(int ok, const char *fmt, ...) PRINTF_LIKE(2, 3);
static void check(int ok, const char *fmt, ...) {
  n_checks++;
  if (ok) return;
  n_failed++;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  printf("rank %d: FAIL %s\n", c.rank, msg);
  fflush(stdout);
}

/* The world ranks of a group's members in the order of their rank within it; returns the count. */
static int members(enum comm_group g, int *out) {
  int n = 0;
  switch (g) {
  case GROUP_WORLD:
    for (int r = 0; r < c.world; r++) out[n++] = r;
    break;
  case GROUP_PIPE:
    for (int s = 0; s < c.pp; s++) out[n++] = c.replica * c.pp + s;
    break;
  case GROUP_DP:
    for (int d = 0; d < c.dp; d++) out[n++] = d * c.pp + c.stage;
    break;
  case GROUP_TIED:
    out[n++] = c.replica * c.pp;
    out[n++] = c.replica * c.pp + c.pp - 1;
    break;
  }
  return n;
}

static const char *group_name(enum comm_group g) {
  static const char *names[] = {"WORLD", "PIPE", "DP", "TIED"};
  return names[g];
}

/* The contents of the message named `id` (messages that could be confused get different ids):
 * 8-byte words, so that filling and checking the large message takes moments. */
static uint64_t word(int id, size_t w) {
  return (w + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(id + 1) * 0xD1B54A32D192ED03ull;
}

/* The id of message i from stage `from` to stage `to` of this replica. */
static int p2p_id(int from, int to, int i) { return ((c.replica * 16 + from) * 16 + to) * 4 + i; }

static void fill(unsigned char *buf, size_t n, int id) {
  for (size_t j = 0; j < n; j += 8) {
    uint64_t v = word(id, j / 8);
    memcpy(buf + j, &v, n - j < 8 ? n - j : 8);
  }
}

/* The offset of the first byte that differs from the pattern; n if none. */
static size_t first_mismatch(const unsigned char *buf, size_t n, int id) {
  for (size_t j = 0; j < n; j += 8) {
    unsigned char want[8];
    uint64_t v = word(id, j / 8);
    memcpy(want, &v, 8);
    for (size_t k = 0; k < 8 && j + k < n; k++)
      if (buf[j + k] != want[k]) return j + k;
  }
  return n;
}

/* Every stage sends three messages of growing size (0 bytes, a few, past the eager limit) to each
 * neighbour on one tag before receiving anything: sends must not block, and messages of one tag
 * must arrive in order. */
static void check_p2p(void) {
  enum { N_MSG = 3 };
  static const size_t sizes[N_MSG] = {0, 13, 1 << 20};
  int peers[2] = {c.stage - 1, c.stage + 1};
  unsigned char *out[2][N_MSG], *in[2][N_MSG];
  for (int p = 0; p < 2; p++) {
    if (peers[p] < 0 || peers[p] >= c.pp) continue;
    for (int i = 0; i < N_MSG; i++) {
      out[p][i] = xmalloc(sizes[i]);
      fill(out[p][i], sizes[i], p2p_id(c.stage, peers[p], i));
      comm_send(&c, out[p][i], sizes[i], peers[p], 5);
    }
  }
  for (int p = 0; p < 2; p++) {
    if (peers[p] < 0 || peers[p] >= c.pp) continue;
    for (int i = 0; i < N_MSG; i++) {
      in[p][i] = xcalloc(1, sizes[i]);
      comm_recv(&c, in[p][i], sizes[i], peers[p], 5);
      size_t bad = first_mismatch(in[p][i], sizes[i], p2p_id(peers[p], c.stage, i));
      check(bad == sizes[i], "message %d of %zu bytes from stage %d differs at byte %zu", i,
            sizes[i], peers[p], bad);
    }
  }
  comm_wait_sends(&c);
  for (int p = 0; p < 2; p++) {
    if (peers[p] < 0 || peers[p] >= c.pp) continue;
    for (int i = 0; i < N_MSG; i++) {
      free(out[p][i]);
      free(in[p][i]);
    }
  }
}

/* Integer-valued sums are exact, so the result is known; a sum of awkward floats must come out
 * bit-identical on every member and when repeated. */
static void check_allreduce(enum comm_group g) {
  int who[64];
  int n_members = members(g, who);
  enum { N = 100003 };   /* odd and large enough that Open MPI picks a segmented algorithm */
  float *f = xmalloc(N * sizeof *f);
  double *d = xmalloc(N * sizeof *d);
  for (int i = 0; i < N; i++) {
    f[i] = (float)((c.rank + 1) * (i % 1000 + 1));
    d[i] = (double)(c.rank + 1) * (i + 1);
  }
  comm_allreduce_sum_float(&c, g, f, N);
  comm_allreduce_sum_double(&c, g, d, N);
  int rank_sum = 0;
  for (int m = 0; m < n_members; m++) rank_sum += who[m] + 1;
  int bad_f = -1, bad_d = -1;
  for (int i = N - 1; i >= 0; i--) {
    if (f[i] != (float)(rank_sum * (i % 1000 + 1))) bad_f = i;
    if (d[i] != (double)rank_sum * (i + 1)) bad_d = i;
  }
  check(bad_f < 0, "allreduce float over %s: element %d wrong", group_name(g), bad_f);
  check(bad_d < 0, "allreduce double over %s: element %d wrong", group_name(g), bad_d);

  float *a = xmalloc(N * sizeof *a), *b = xmalloc(N * sizeof *b);
  for (int i = 0; i < N; i++) a[i] = b[i] = (float)sin(c.rank * 1000.0 + i) * 1e-3f * (i % 7 + 1);
  comm_allreduce_sum_float(&c, g, a, N);
  comm_allreduce_sum_float(&c, g, b, N);
  check(memcmp(a, b, N * sizeof *a) == 0, "allreduce over %s differs when repeated",
        group_name(g));
  memcpy(b, a, N * sizeof *a);
  comm_broadcast(&c, g, b, N * sizeof *b, 0);
  check(memcmp(a, b, N * sizeof *a) == 0, "allreduce over %s differs between members",
        group_name(g));
  free(f);
  free(d);
  free(a);
  free(b);
}

/* From the group's last member, so that root is not simply world rank 0. */
static void check_broadcast(enum comm_group g) {
  int who[64];
  int n_members = members(g, who), root = n_members - 1;
  size_t n = 3000 + 17 * (size_t)g;
  unsigned char *buf = xcalloc(1, n);
  int id = who[root] * 4 + g;
  if (c.rank == who[root]) fill(buf, n, id);
  comm_broadcast(&c, g, buf, n, root);
  size_t bad = first_mismatch(buf, n, id);
  check(bad == n, "broadcast over %s from member %d differs at byte %zu", group_name(g), root, bad);
  free(buf);
}

static void run_checks(void) {
  check(c.stage == c.rank % c.pp && c.replica == c.rank / c.pp && c.dp == c.world / c.pp,
        "layout: stage %d replica %d dp %d for rank %d of %d with pp %d", c.stage, c.replica, c.dp,
        c.rank, c.world, c.pp);
  check_p2p();
  enum comm_group groups[] = {GROUP_WORLD, GROUP_PIPE, GROUP_DP, GROUP_TIED};
  for (int i = 0; i < 4; i++) {
    enum comm_group g = groups[i];
    /* the middle stages are not in GROUP_TIED; with one stage there is none */
    int in_tied = c.pp > 1 && (c.stage == 0 || c.stage == c.pp - 1);
    if (g == GROUP_TIED && !in_tied) continue;
    check_allreduce(g);
    check_broadcast(g);
    comm_barrier(&c, g);
  }
}

/* Stage 0 sends stage 1 more than INT_MAX bytes, which comm_mpi.c cuts into chunks. */
static void check_large(void) {
  size_t n = (size_t)INT_MAX + 4099;
  unsigned char *buf = xmalloc(n);
  if (c.stage == 0) {
    fill(buf, n, p2p_id(0, 1, 0));
    comm_send(&c, buf, n, 1, 0);
    comm_wait_sends(&c);
  } else if (c.stage == 1) {
    comm_recv(&c, buf, n, 0, 0);
    size_t bad = first_mismatch(buf, n, p2p_id(0, 1, 0));
    check(bad == n, "message of %zu bytes differs at byte %zu", n, bad);
  }
  free(buf);
}

int main(int argc, char **argv) {
  comm_init(&c, &argc, &argv);
  if (argc < 2)
    die("usage: comm_check PP [die RANK | abort RANK | hook RANK | stall | tied | large | "
        "truncate]");
  comm_set_layout(&c, atoi(argv[1]));
  const char *mode = argc > 2 ? argv[2] : "all";
  if (strcmp(mode, "die") == 0 || strcmp(mode, "abort") == 0 || strcmp(mode, "hook") == 0) {
    int victim = argc > 3 ? atoi(argv[3]) : 0;
    if (c.rank == victim) {
      sleep(1);   /* let the others block first */
      if (strcmp(mode, "abort") == 0) comm_abort(&c, 3);
      if (strcmp(mode, "hook") == 0 && g_abort_hook) g_abort_hook(4);
      die("deliberate failure for test_comm");
    }
    comm_barrier(&c, GROUP_WORLD);
    die("rank %d passed a barrier that rank %d never reached", c.rank, victim);
  } else if (strcmp(mode, "stall") == 0) {
    /* the last stage stops (a hung process, SIGSTOP); stage 0 waits for its message and the
     * others in a barrier: each must give up after QWEN3_COMM_TIMEOUT_S and end the job */
    if (c.stage == c.pp - 1) raise(SIGSTOP);
    char buf[8];
    if (c.stage == 0) comm_recv(&c, buf, sizeof buf, c.pp - 1, 0);
    comm_barrier(&c, GROUP_WORLD);
    die("rank %d went past a stopped rank", c.rank);
  } else if (strcmp(mode, "tied") == 0) {
    comm_barrier(&c, GROUP_TIED);
  } else if (strcmp(mode, "large") == 0) {
    check_large();
  } else if (strcmp(mode, "truncate") == 0) {
    char buf[16] = {0};
    if (c.stage == 0) comm_send(&c, buf, sizeof buf, 1, 0);
    if (c.stage == 1) comm_recv(&c, buf, sizeof buf / 2, 0, 0);
    comm_wait_sends(&c);
  } else {
    run_checks();
  }
  double counts[2] = {n_checks, n_failed};
  comm_allreduce_sum_double(&c, GROUP_WORLD, counts, 2);
  if (c.rank == 0)
    printf("comm_check %s pp %d dp %d: %.0f checks, %.0f failed\n", mode, c.pp, c.dp, counts[0],
           counts[1]);
  comm_finalize(&c);
  return counts[1] > 0;
}
