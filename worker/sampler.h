/* The next-token sampler of evaluation generation (DESIGN.md "Evaluation generation"): from one
 * sequence's logits (host fp32, vocab entries) to one token id.
 *
 * Order, as Hugging Face's logits processors: temperature, then top-k, then top-p, then the draw.
 *  - temperature <= 0: greedy, the argmax (kernels/argmax.h); ties go to the lowest id.
 *  - top_k > 0: keep the k highest logits (exactly k; ties at the k-th value go to the lower ids,
 *    where HF would keep every tied token). 0 is off.
 *  - top_p < 1: keep the smallest set of most probable tokens whose probability sums to >= top_p:
 *    in descending order the token that crosses top_p is kept, so a top token that alone exceeds
 *    top_p is kept alone. 1 is off.
 *  - the draw: u in [0,1) from Philox-4x32-10 (kernels/nvfp4.h) with key = {seed lo, seed hi} and
 *    counter = {stream, step, 0, 0}: u = (out[0] >> 8) * 2^-24. The token is found by inverse CDF
 *    over the kept tokens in a defined order: descending logit (= descending probability), ties
 *    by id. A counter-based draw needs no state, so any backend, any rank and a replay draw the
 *    same u for (seed, prompt, token index).
 * Probabilities are softmax(logits / T) accumulated in double. NaN and -inf logits are never drawn
 * (probability 0); +inf logits share all the mass equally. When no token has a finite or +inf
 * logit the result is the greedy one (the lowest id that is not NaN, else 0).
 *
 * Cost for vocab V = 151936: one pass for the softmax normaliser plus a sort of only the tokens
 * that can matter. With top-k a size-k heap selects them (O(V log k)); without, a histogram of
 * log-probabilities stands in for the sorted order: the nucleus cut and the draw each locate their
 * bin from the bin masses, and only that bin is sorted.
 * The parameters are assumed valid (trainer/job_validate.c checks a job's). */
#ifndef QWEN3_SAMPLER_H
#define QWEN3_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

struct sampler {
  float temperature;   /* <= 0: greedy */
  int top_k;           /* 0: off */
  float top_p;         /* 1: off; in (0, 1] */
  uint64_t seed;
};

/* 1 when s picks the argmax (temperature <= 0): what a backend can pick on its own (ops.h
 * argmax_rows, the same function on the CPU), so that only the token comes back to the host. */
int sampler_greedy(const struct sampler *s);

/* Bytes of scratch sampler_next needs for a vocabulary of that size. */
size_t sampler_scratch_bytes(int vocab);

/* The next token for one sequence: stream is the prompt's index, step the index of the token
 * being generated. scratch holds sampler_scratch_bytes(vocab) bytes (reuse it across calls), or is
 * NULL to allocate inside. Returns a token id in [0, vocab). */
int sampler_next(const struct sampler *s, const float *logits, int vocab, uint32_t stream,
                 uint32_t step, void *scratch);

/* The uniform draw of (seed, stream, step) in [0, 1), 24 bits: what a GPU port must reproduce. */
float sampler_uniform(uint64_t seed, uint32_t stream, uint32_t step);

/* 1 if token is one of the n stop tokens (e.g. <|im_end|>, <|endoftext|>), else 0. */
int sampler_is_stop(int token, const int *stop, int n);

#endif
