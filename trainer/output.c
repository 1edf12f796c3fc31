#define _POSIX_C_SOURCE 200809L
#include "trainer/output.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

void output_open(struct output *o, const char *output_dir, const char *name, const char *mode) {
  snprintf(o->path, sizeof o->path, "%s/%s", output_dir, name);
  if (make_dirs(output_dir) != 0)
    die("output_dir: cannot create '%s': %s", output_dir, strerror(errno));
  o->f = fopen(o->path, mode);
  if (!o->f) die("output_dir: cannot write '%s': %s", o->path, strerror(errno));
}

static _Noreturn void write_failed(struct output *o, const char *what) {
  int e = errno;
  die("output_dir: cannot %s '%s': %s; the run stops rather than lose its log", what, o->path,
      e ? strerror(e) : "write error");
}

void output_json_line(struct output *o, json_t *obj, int real_precision) {
  errno = 0;
  int rc = json_dumpf(obj, o->f, JSON_COMPACT | JSON_REAL_PRECISION(real_precision));
  json_decref(obj);
  if (rc != 0 || fputc('\n', o->f) == EOF || fflush(o->f) != 0 || ferror(o->f))
    write_failed(o, "write");
}

void output_close(struct output *o) {
  if (!o->f) return;
  errno = 0;
  if (fflush(o->f) != 0 || ferror(o->f)) write_failed(o, "write");
  /* fsync fails with EINVAL on what cannot be synced (a pipe, /dev/stdout): that is no loss */
  if (fsync(fileno(o->f)) != 0 && errno != EINVAL && errno != EROFS) write_failed(o, "sync");
  FILE *f = o->f;
  o->f = NULL;
  if (fclose(f) != 0) write_failed(o, "close");
}
