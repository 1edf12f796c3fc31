/* Jobs (trainer/job.c) from arbitrary bytes: a binary qwen3.Job followed by --set assignments.
 * The input is [2-byte little-endian length L][L bytes of job.pb][assignments, one per line].
 * job_load dies on a garbage .pb; the abort hook brings the target back from that die(). */
#include "tests/fuzz/fuzz_common.h"

#include <setjmp.h>

#include "common/util.h"
#include "trainer/job.h"

static jmp_buf back;
static void come_back(int code) { longjmp(back, 1); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  static FILE *devnull;
  if (!devnull) devnull = fopen("/dev/null", "w");
  if (size < 2) return 0;
  size_t len = (size_t)data[0] | (size_t)data[1] << 8;
  data += 2, size -= 2;
  if (len > size) len = size;
  const char *path = fuzz_write("job.pb", data, len);
  g_abort_hook = come_back;
  if (setjmp(back)) return 0;   /* job_load refused the .pb (it frees what it read first) */
  Job *job = job_load(path);
  g_abort_hook = NULL;
  char *sets = malloc(size - len + 1), err[1024];
  memcpy(sets, data + len, size - len);
  sets[size - len] = 0;
  for (char *line = sets, *next; line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = 0;
    /* job_set remembers which repeated messages (eval.prompts) it replaced in a static list
     * that outlives the job, so a second Job in one process would see its list as replaced
     * already: those assignments are left out here (one job per process in qwen3-train). */
    if (strstr(line, "prompts")) continue;
    if (*line && job_set(job, line, err, sizeof err) != 0 && !err[0]) abort();
  }
  free(sets);
  job_print(devnull, job);
  qwen3__job__free_unpacked(job, NULL);
  return 0;
}
