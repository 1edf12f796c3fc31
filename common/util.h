/* Small things every folder uses: fatal errors, checked allocation, timing. An error anywhere
 * ends the whole job: die() prints one line naming the rank and calls the abort hook, which the
 * trainer sets to MPI_Abort so that no other rank is left waiting. */
#ifndef QWEN3_UTIL_H
#define QWEN3_UTIL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define PRINTF_LIKE(a, b) __attribute__((format(printf, a, b)))
#else
#define PRINTF_LIKE(a, b)
#endif

/* "rank 3" once MPI is up; empty in single-process tools. Set by the trainer. */
extern char g_log_tag[32];
/* Called by die() after printing; never returns. NULL: exit(1). */
extern void (*g_abort_hook)(int code);

_Noreturn void die(const char *fmt, ...) PRINTF_LIKE(1, 2);
void warn(const char *fmt, ...) PRINTF_LIKE(1, 2);
void info(const char *fmt, ...) PRINTF_LIKE(1, 2);
/* At the end of a run: flushes standard output and returns 0, or prints on standard error that
 * the console log is incomplete (the errno of its first failed write) and returns 1. */
int log_finish(void);

/* For functions that report errors to their caller: formats the message into err (naming the
 * file, field or tensor at fault) and returns -1. */
int errorf(char *err, size_t errlen, const char *fmt, ...) PRINTF_LIKE(3, 4);

void *xmalloc(size_t bytes);          /* dies naming the size on failure */
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t bytes);
char *xstrdup(const char *s);

double now_seconds(void);             /* monotonic clock */
/* "42s", "3m05s" or "2h10m": an estimate for a progress line */
void format_duration(char *out, size_t len, double seconds);
/* How often long work (a validation, a generation) prints where it is: QWEN3_PROGRESS_SECONDS,
 * 10 by default; dies naming the variable on a value that is not a number >= 0. */
double progress_seconds(void);

/* splitmix64: a tiny, well-mixed generator; the same state gives the same numbers on every
 * rank and in every resumed run (data order, seeded init). */
uint64_t splitmix64(uint64_t *state);

/* Reads a whole file into a NUL-terminated buffer; NULL with errno set on failure. */
char *read_file(const char *path, size_t *len);
/* mkdir -p; 0 on success, -1 with errno */
int make_dirs(const char *path);

#endif
