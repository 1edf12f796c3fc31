/* The check that counts and the closing line "N passed, M failed" that CI reads: plain C that a
 * CUDA host test (C++) includes too, where tests/check.h, which adds what the C tests share
 * beyond these, cannot go (common/util.h's C11 _Noreturn). */
#ifndef QWEN3_TEST_CHECK_CORE_H
#define QWEN3_TEST_CHECK_CORE_H

#include <stdio.h>

static int checks_passed, checks_failed;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (cond) {                                            \
      checks_passed++;                                     \
    } else {                                               \
      checks_failed++;                                     \
      printf("FAIL %s:%d: ", __FILE__, __LINE__);          \
      printf(__VA_ARGS__);                                 \
      printf("\n");                                        \
    }                                                      \
  } while (0)

static inline int checks_report(void) {
  printf("%d passed, %d failed\n", checks_passed, checks_failed);
  return checks_failed ? 1 : 0;
}

#endif
