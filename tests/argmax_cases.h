/* Rows that trip a wrong argmax (ops.h argmax_rows), shared by the CPU op's test (test_ops.c)
 * and the CUDA op's (test_cuda_ops.c), with the answers ops.h defines. */
#ifndef QWEN3_TEST_ARGMAX_CASES_H
#define QWEN3_TEST_ARGMAX_CASES_H

#include <math.h>

/* Row k of x [ARGMAX_KINDS, n], which holds random values, becomes kind k: ties at the first, a
 * middle and the last index; a tie in the middle and at the end; the maximum only at the end
 * (past the 16 lanes of the host's argmax when n is not a multiple of 16); NaN at the first
 * index and over the second half (after the maximum in every lane of the host's argmax); every
 * value NaN; every value -inf; -inf among NaN; -0.0 tying +0.0 among negative values; +inf
 * among NaN; and the random values as they are. */
#define ARGMAX_KINDS 10
static inline void argmax_cases(float *x, int n) {
  int mid = n / 2;
  for (int k = 0; k < ARGMAX_KINDS; k++) {
    float *r = x + (size_t)k * n;
    switch (k) {
    case 0: r[0] = r[mid] = r[n - 1] = 7; break;
    case 1: r[mid] = r[n - 1] = 7; break;
    case 2: r[n - 1] = 7; break;
    case 3:
      for (int i = mid; i < n; i++) r[i] = NAN;
      r[0] = NAN;
      break;
    case 4: for (int i = 0; i < n; i++) r[i] = NAN; break;
    case 5: for (int i = 0; i < n; i++) r[i] = -INFINITY; break;
    case 6:
      for (int i = 0; i < n; i++) r[i] = NAN;
      r[mid] = r[n - 1] = -INFINITY;
      break;
    case 7:
      for (int i = 0; i < n; i++) r[i] = -1 - r[i] * r[i];
      r[mid] = -0.0f;
      r[n - 1] = 0.0f;
      break;
    case 8:
      for (int i = 0; i < n; i++) r[i] = NAN;
      r[n - 1] = INFINITY;
      break;
    default: break;
    }
  }
}

/* The answer of kind k where the random values do not decide it; -1 where they do. */
static inline int argmax_case_answer(int k, int n) {
  switch (k) {
  case 0: case 4: case 5: return 0;       /* the first of a tie; all NaN; all -inf */
  case 1: case 6: case 7: return n / 2;   /* the first of a tie; the first -inf; -0.0 */
  case 2: case 8: return n - 1;           /* the maximum in the tail; +inf */
  default: return -1;
  }
}

#endif
