/* The CUDA quantizers' scalar functions (kernels/cuda/cuda_nvfp4.cuh), run on the host, against
 * the CPU's (kernels/nvfp4.h): a host program, so it needs a CUDA build but no GPU. The kernels
 * run the same source on the device, where tests/gpu/test_cuda_ops.c compares whole tensors. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda_nvfp4.cuh"
#include "tests/check_core.h"
extern "C" {
#include "kernels/nvfp4.h"
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* nv_philox (32-bit high and low products) gives nvfp4_philox4x32_10's words for counter
 * {ctr lo, ctr hi, 0, 0} and key {seed lo, seed hi}: edge words, then random ones. */
static void test_philox(void) {
  static const uint64_t edges[] = {0, 1, 2, 3, 0xffffffffull, 0x100000000ull, ~0ull,
                                   0x8000000000000000ull, 0x9E3779B9BB67AE85ull};
  const int n_edges = (int)(sizeof edges / sizeof edges[0]);
  uint64_t rng = 42;
  int bad = 0, n = 0;
  for (int t = 0; t < n_edges * n_edges + 1000000; t++, n++) {
    const uint64_t ctr = t < n_edges * n_edges ? edges[t / n_edges] : splitmix(&rng);
    const uint64_t seed = t < n_edges * n_edges ? edges[t % n_edges] : splitmix(&rng);
    const uint32_t counter[4] = {(uint32_t)ctr, (uint32_t)(ctr >> 32), 0, 0};
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    uint32_t want[4], got[4];
    nvfp4_philox4x32_10(want, counter, key);
    nv_philox(got, ctr, seed);
    bad += memcmp(want, got, sizeof want) != 0;
  }
  CHECK(bad == 0, "nv_philox differs from nvfp4_philox4x32_10 on %d of %d counter/key pairs",
        bad, n);
}

int main(void) {
  test_philox();
  return checks_report();
}
