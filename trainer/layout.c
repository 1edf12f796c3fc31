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
  first[0] = 0;
  for (int s = 0; s < pp; s++) {
    if (counts[s] < 1) {
      snprintf(err, errlen, "parallel.layers_per_stage[%d] is %d; every stage needs >= 1 layer", s,
               counts[s]);
      return -1;
    }
    first[s + 1] = first[s] + counts[s];
  }
  if (first[pp] != num_layers) {
    snprintf(err, errlen, "parallel.layers_per_stage sums to %d; the model has %d layers",
             first[pp], num_layers);
    return -1;
  }
  return 0;
}
