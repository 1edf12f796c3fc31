/* Which of a GEMM shape's timed cuBLASLt candidates cuda_gemm keeps (cuda_gemm.cu's tuning):
 * plain C, so a unit test of every build checks the rule without a GPU. */
#ifndef QWEN3_CUDA_GEMM_PICK_H
#define QWEN3_CUDA_GEMM_PICK_H

/* Candidates 0 .. found - 1, the heuristic's order; ran[r]: candidate r ran; hash[r]: a hash of
 * its result on the tuning operands; ms[r]: its time. Keeps candidate 0 (the heuristic's first)
 * unless another that ran gives candidate 0's bits in less time (the fastest of those; a tie
 * keeps the earlier), so the choice never changes a result's bits. Nothing is chosen but 0
 * when candidate 0 did not run. *other_bits counts the candidates that ran with other bits. */
static inline int gemm_pick(int found, const int *ran, const unsigned long long *hash,
                            const float *ms, long *other_bits) {
  int best = 0;
  for (int r = 1; r < found && ran[0]; r++) {
    if (!ran[r]) continue;
    if (hash[r] != hash[0]) (*other_bits)++;
    else if (ms[r] < ms[best]) best = r;
  }
  return best;
}

#endif
