#include "trainer/layout.h"

#include <stdio.h>

int layout_split_layers(int pp, int num_layers, const int *counts, int n_counts, int *first,
                        char *err, size_t errlen) {
  if (pp < 1 || pp > LAYOUT_MAX_STAGES || pp > num_layers) {
    snprintf(err, errlen, "parallel.pipeline_stages (%d) must be in [1, min(num_layers=%d, %d)]",
             pp, num_layers, LAYOUT_MAX_STAGES);
    return -1;
  }
  if (n_counts == 0) {
    first[0] = 0;
    for (int s = 0; s < pp; s++)
      first[s + 1] = first[s] + num_layers / pp + (s < num_layers % pp ? 1 : 0);
    return 0;
  }
  if (n_counts != pp) {
    snprintf(err, errlen, "parallel.layers_per_stage lists %d stages; parallel.pipeline_stages is %d",
             n_counts, pp);
    return -1;
  }
  /* summed in 64 bits, each count first bounded by the model: a sum of huge counts must not
   * wrap around to num_layers */
  long long sum = 0;
  for (int s = 0; s < pp; s++) {
    if (counts[s] < 1 || counts[s] > num_layers) {
      snprintf(err, errlen, "parallel.layers_per_stage[%d] is %d; each stage holds between 1 and "
               "the model's %d layers", s, counts[s], num_layers);
      return -1;
    }
    sum += counts[s];
  }
  if (sum != num_layers) {
    snprintf(err, errlen, "parallel.layers_per_stage sums to %lld; the model has %d layers", sum,
             num_layers);
    return -1;
  }
  first[0] = 0;
  for (int s = 0; s < pp; s++) first[s + 1] = first[s] + counts[s];
  return 0;
}
