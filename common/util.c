#define _POSIX_C_SOURCE 200809L
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

char g_log_tag[32];
void (*g_abort_hook)(int code);
/* errno of the first failed write of the console log (standard output), for log_finish */
static int g_stdout_errno;

static void vlog(FILE *f, const char *kind, const char *fmt, va_list ap) {
  char msg[4096];
  vsnprintf(msg, sizeof msg, fmt, ap);
  if (g_log_tag[0])
    fprintf(f, "qwen3 [%s] %s%s\n", g_log_tag, kind, msg);
  else
    fprintf(f, "qwen3: %s%s\n", kind, msg);
  if (fflush(f) != 0 && f == stdout && !g_stdout_errno) g_stdout_errno = errno ? errno : EIO;
}

int log_finish(void) {
  if (fflush(stdout) != 0 && !g_stdout_errno) g_stdout_errno = errno ? errno : EIO;
  if (!g_stdout_errno && !ferror(stdout)) return 0;
  fprintf(stderr, "qwen3%s%s%s: error: the console log (standard output) is incomplete: a write "
          "of it failed (%s)\n", g_log_tag[0] ? " [" : "", g_log_tag, g_log_tag[0] ? "]" : "",
          g_stdout_errno ? strerror(g_stdout_errno) : "an earlier write");
  return 1;
}

void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(stderr, "error: ", fmt, ap);
  va_end(ap);
  fflush(stdout);
  if (g_abort_hook) g_abort_hook(1);
  exit(1);
}

void warn(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(stderr, "warning: ", fmt, ap);
  va_end(ap);
}

void info(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(stdout, "", fmt, ap);
  va_end(ap);
}

int errorf(char *err, size_t errlen, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return -1;
}

void *xmalloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) die("out of memory allocating %zu bytes", bytes);
  return p;
}

void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p) die("out of memory allocating %zu x %zu bytes", n, size);
  return p;
}

void *xrealloc(void *p, size_t bytes) {
  void *q = realloc(p, bytes ? bytes : 1);
  if (!q) die("out of memory reallocating %zu bytes", bytes);
  return q;
}

char *xstrdup(const char *s) {
  size_t n = strlen(s) + 1;
  return memcpy(xmalloc(n), s, n);
}

uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void format_duration(char *out, size_t len, double s) {
  if (s < 60) snprintf(out, len, "%.0fs", s);
  else if (s < 3600) snprintf(out, len, "%dm%02ds", (int)s / 60, (int)s % 60);
  else snprintf(out, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

double progress_seconds(void) {
  static double seconds = -1;
  if (seconds >= 0) return seconds;
  const char *v = getenv("QWEN3_PROGRESS_SECONDS");
  seconds = 10;
  if (v && *v) {
    char *end;
    seconds = strtod(v, &end);
    if (*end || !(seconds >= 0) || !isfinite(seconds))
      die("QWEN3_PROGRESS_SECONDS=%s: expected a number of seconds >= 0", v);
  }
  return seconds;
}

char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 16, n = 0;
  char *buf = xmalloc(cap);
  for (;;) {
    if (n + 1 >= cap) buf = xrealloc(buf, cap *= 2);
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (got == 0) break;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    free(buf);
    errno = EIO;
    return NULL;
  }
  buf[n] = 0;
  if (len) *len = n;
  return buf;
}

int make_dirs(const char *path) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) {
    errno = ENAMETOOLONG;
    return -1;
  }
  for (char *p = tmp + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
    *p = '/';
  }
  if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
  return 0;
}
