/* NVFP4 scalar formats: E2M1 and E4M3 encode/decode, the per-tensor scale, and the counter-based
 * generator behind stochastic rounding. The tensor quantizers are in nvfp4_quantize.c. */
#include "kernels/nvfp4.h"

#include <float.h>
#include <math.h>

static const float E2M1_VALUES[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

/* The sign bit is (x < 0), not signbit(x): -0.0 encodes as +0, as in TE's reference. */
static uint8_t e2m1_sign(float x) { return x < 0.0f ? 8 : 0; }

uint8_t nvfp4_e2m1_encode_rn(float x) {
  /* Midpoints between neighbouring magnitudes. A value on a midpoint goes to the even code (the
   * one whose mantissa bit is 0), which gives REFERENCE.md's table: 0.25->0, 0.75->1, 1.25->1,
   * 1.75->2, 2.5->2, 3.5->4, 5->4. Everything past 5 saturates to 6; NaN gives 0. */
  static const float MIDPOINTS[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  float a = fabsf(x);
  uint8_t m = 0;
  while (m < 7 && (a > MIDPOINTS[m] || (a == MIDPOINTS[m] && (m & 1)))) m++;
  return e2m1_sign(x) | m;
}

uint8_t nvfp4_e2m1_encode_sr(float x, uint32_t u) {
  if (isnan(x)) return 0;
  float a = fabsf(x);
  uint8_t m = 7;
  if (a < NVFP4_E2M1_MAX) {
    m = 0;
    while (E2M1_VALUES[m + 1] <= a) m++;
    /* a - lo is exact (lo <= a < 2 lo, or lo = 0) and the gap is a power of two, so frac is the
     * exact fraction and frac * 2^32 is exact in double: P(round up) = ceil(frac 2^32) / 2^32. */
    float frac = (a - E2M1_VALUES[m]) / (E2M1_VALUES[m + 1] - E2M1_VALUES[m]);
    if ((double)u < ldexp(frac, 32)) m++;
  }
  return e2m1_sign(x) | m;
}

float nvfp4_e2m1_decode(uint8_t code) {
  float v = E2M1_VALUES[code & 7];
  return code & 8 ? -v : v;
}

uint8_t nvfp4_e4m3_encode(float x) {
  if (isnan(x)) return 0x7f;
  uint8_t sign = x < 0.0f ? 0x80 : 0;
  double a = fabs((double)x);
  if (a >= NVFP4_E4M3_MAX) return sign | 0x7e;
  /* a's binade 2^e (subnormals share the lowest one, 2^-6) holds 8 values 2^(e-3) apart. The
   * count n of those steps, rounded to nearest even (exact: a has 24 bits, the step is a power
   * of two), gives the code directly: (e + 6) * 8 + n covers subnormals (e = -6, n < 8), normals
   * (n in 8..15), and a round-up into the next binade (n = 16). */
  int e;
  frexp(a, &e);
  e -= 1;
  if (a < 0x1p-6) e = -6;
  double n = nearbyint(ldexp(a, 3 - e));
  return sign | (uint8_t)((e + 6) * 8 + (int)n);
}

float nvfp4_e4m3_decode(uint8_t byte) {
  int e = (byte >> 3) & 15, m = byte & 7;
  if (e == 15 && m == 7) return NAN;
  float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
  return byte & 0x80 ? -v : v;
}

struct nvfp4_tensor_scale nvfp4_tensor_scale(float amax) {
  float enc = fminf(NVFP4_E4M3_MAX * NVFP4_E2M1_MAX / amax, FLT_MAX);
  if (amax == 0.0f || enc == 0.0f) enc = 1.0f;
  return (struct nvfp4_tensor_scale){.amax = amax, .enc = enc, .dec = 1.0f / enc};
}

void nvfp4_philox4x32_10(uint32_t out[4], const uint32_t counter[4], const uint32_t key[2]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; round++) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}
