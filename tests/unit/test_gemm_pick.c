/* The rule by which the CUDA GEMM keeps one of cuBLASLt's timed candidates
 * (kernels/cuda/cuda_gemm_pick.h): never one whose bits differ from the heuristic's first, the
 * fastest of the others, the first when it did not run. Plain C: runs in every build. */
#include "kernels/cuda/cuda_gemm_pick.h"
#include "tests/check_core.h"

static int pick(int found, const int *ran, const unsigned long long *hash, const float *ms,
                long *other) {
  *other = 0;
  return gemm_pick(found, ran, hash, ms, other);
}

int main(void) {
  long other;
  {   /* the fastest has other bits: the fastest of the same bits is kept */
    int ran[4] = {1, 1, 1, 1};
    unsigned long long hash[4] = {7, 7, 9, 7};
    float ms[4] = {2.0f, 1.5f, 0.5f, 1.2f};
    CHECK(pick(4, ran, hash, ms, &other) == 3, "kept %d, not 3 (the fastest with candidate 0's bits)",
          pick(4, ran, hash, ms, &other));
    CHECK(other == 1, "%ld candidates with other bits, not 1", other);
  }
  {   /* only other bits are faster: candidate 0 stays */
    int ran[3] = {1, 1, 1};
    unsigned long long hash[3] = {7, 8, 9};
    float ms[3] = {2.0f, 1.0f, 0.5f};
    CHECK(pick(3, ran, hash, ms, &other) == 0, "kept %d, not 0", pick(3, ran, hash, ms, &other));
    CHECK(other == 2, "%ld candidates with other bits, not 2", other);
  }
  {   /* a candidate that did not run is never kept, whatever its time and hash */
    int ran[3] = {1, 0, 1};
    unsigned long long hash[3] = {7, 7, 7};
    float ms[3] = {2.0f, 0.1f, 1.0f};
    CHECK(pick(3, ran, hash, ms, &other) == 2, "kept %d, not 2", pick(3, ran, hash, ms, &other));
    CHECK(other == 0, "%ld candidates with other bits, not 0", other);
  }
  {   /* candidate 0 did not run: nothing to compare bits with, so 0 is kept */
    int ran[3] = {0, 1, 1};
    unsigned long long hash[3] = {0, 7, 7};
    float ms[3] = {0.0f, 1.0f, 0.5f};
    CHECK(pick(3, ran, hash, ms, &other) == 0, "kept %d, not 0", pick(3, ran, hash, ms, &other));
  }
  {   /* a tie keeps the earlier; a slower one never replaces the first */
    int ran[3] = {1, 1, 1};
    unsigned long long hash[3] = {7, 7, 7};
    float ms[3] = {1.0f, 1.0f, 3.0f};
    CHECK(pick(3, ran, hash, ms, &other) == 0, "kept %d, not 0", pick(3, ran, hash, ms, &other));
  }
  {   /* one candidate: it is kept */
    int ran[1] = {1};
    unsigned long long hash[1] = {7};
    float ms[1] = {1.0f};
    CHECK(pick(1, ran, hash, ms, &other) == 0, "kept %d, not 0", pick(1, ran, hash, ms, &other));
  }
  return checks_report();
}
