/* The few lines every C test program shares: a check that counts, and the closing line
 * "N passed, M failed" that CI reads; for the tests that run the project's programs, their path
 * and a scratch directory kept only when a check failed. */
#ifndef QWEN3_TEST_CHECK_H
#define QWEN3_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "tests/check_core.h"

/* path (of len bytes) = the build's program `name`, beside the tests' folder (build/tests/..). */
static inline void test_program(char *path, size_t len, const char *name) {
  ssize_t n = readlink("/proc/self/exe", path, len - 64);
  if (n < 0) die("cannot find this program");
  path[n] = 0;
  snprintf(strrchr(path, '/'), 64, "/../%s", name);
}

/* A test's scratch directory, /tmp/PREFIX-XXXXXX, made now; checks_report_in removes it. */
static char checks_scratch[128];

static inline const char *checks_dir(const char *prefix) {
  snprintf(checks_scratch, sizeof checks_scratch, "/tmp/%s-XXXXXX", prefix);
  if (!mkdtemp(checks_scratch)) die("cannot make the scratch directory %s", checks_scratch);
  return checks_scratch;
}

/* checks_scratch/name, in one of 8 buffers used in turn (one call may take several). */
static inline const char *in_dir(const char *name) {
  static char buf[8][512];
  static int k;
  char *p = buf[k++ % 8];
  snprintf(p, sizeof buf[0], "%s/%s", checks_scratch, name);
  return p;
}

/* checks_report, and the scratch directory dir removed when every check passed (kept, and
 * named, for a look when one failed). */
static inline int checks_report_in(const char *dir) {
  int rc = checks_report();
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (rc) printf("kept %s\n", dir);
  else if (system(cmd) != 0) warn("cannot remove %s", dir);
  return rc;
}

#endif
