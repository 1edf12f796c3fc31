/* Greedy decoding's pick on the host: the sampler's argmax and the CPU backend's argmax_rows
 * (ops.h), one function so that a token picked on the host and one picked by the backend are
 * the same token. */
#ifndef QWEN3_ARGMAX_H
#define QWEN3_ARGMAX_H

/* The first index of the largest of x[0 .. n) that is not NaN; 0 when every value is NaN. Ties
 * go to the lowest index; -0.0 and +0.0 tie; a row of -inf (and NaN) gives its first -inf. */
int argmax_first(const float *x, int n);

#endif
