/* Jobs (trainer/job.c) from arbitrary bytes: a binary qwen3.Job followed by --set assignments.
 * The input is [2-byte little-endian length L][L bytes of job.pb][assignments, one per line].
 * A refusal must say why (a message in err); a crash, a sanitizer report or a silent refusal
 * ends the run. */
#include "tests/fuzz/fuzz_common.h"

#include "common/util.h"
#include "trainer/job.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  static FILE *devnull;
  if (!devnull) devnull = fopen("/dev/null", "w");
  if (size < 2) return 0;
  size_t len = (size_t)data[0] | (size_t)data[1] << 8;
  data += 2, size -= 2;
  if (len > size) len = size;
  const char *path = fuzz_write("job.pb", data, len);
  char err[1024] = "";
  Job *job = job_load(path, err, sizeof err);
  if (!job) {
    if (!err[0]) abort();
    return 0;
  }
  char *sets = malloc(size - len + 1);
  memcpy(sets, data + len, size - len);
  sets[size - len] = 0;
  for (char *line = sets, *next; line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = 0;
    if (*line && job_set(job, line, err, sizeof err) != 0 && !err[0]) abort();
  }
  free(sets);
  job_print(devnull, job);
  qwen3__job__free_unpacked(job, NULL);
  return 0;
}
