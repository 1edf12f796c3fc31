/* Which layers each pipeline stage owns. */
#ifndef QWEN3_LAYOUT_H
#define QWEN3_LAYOUT_H

#include <stddef.h>

#define LAYOUT_MAX_STAGES 256

/* first[s] is the first layer of stage s, first[pp] = num_layers. With counts (n_counts ==
 * pp, each >= 1, summing to num_layers) the split is as listed; with n_counts == 0 the layers
 * split as evenly as possible, earlier stages taking the remainder. Returns 0, or -1 with err
 * naming parallel.layers_per_stage. */
int layout_split_layers(int pp, int num_layers, const int *counts, int n_counts, int *first,
                        char *err, size_t errlen);

#endif
