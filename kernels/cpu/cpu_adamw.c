/* AdamW in the operation order of torch.optim.AdamW (its single-tensor and foreach paths run
 * the same sequence), so that a CPU step and a PyTorch step round alike: the scalars are
 * computed in double as Python computes them, then rounded to fp32 where torch's fp32 kernels
 * round them. */
#include <math.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu.h"

/* torch.lerp: two formulas, chosen by the weight, so that both ends are exact */
static float torch_lerp(float self, float end, float weight) {
  return weight < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

/* amax_parts[c] = the largest bits of |p[i]| over chunk c of n values (ops.h adamw_update) */
static void chunk_amax(uint32_t *amax_parts, const float *p, size_t n) {
  size_t chunks = (n + ADAMW_AMAX_CHUNK - 1) / ADAMW_AMAX_CHUNK;
#pragma omp parallel for
  for (size_t c = 0; c < chunks; c++) {
    size_t end = n - c * ADAMW_AMAX_CHUNK < ADAMW_AMAX_CHUNK ? n : (c + 1) * ADAMW_AMAX_CHUNK;
    uint32_t m = 0;
    for (size_t i = c * ADAMW_AMAX_CHUNK; i < end; i++) {
      uint32_t b;
      memcpy(&b, &p[i], sizeof b);
      b &= 0x7fffffffu;
      if (b > m) m = b;
    }
    amax_parts[c] = m;
  }
}

/* The CPU's weight copy is the masters themselves: p_act must be NULL or p. The amax parts
 * take a second pass over p, which on the CPU costs little beside the update. */
void cpu_adamw_update(float *p, void *p_act, const float *g, float *m, float *v, size_t n,
                      const struct adamw_step *s, uint32_t *amax_parts) {
  if (p_act && p_act != p) die("internal: the CPU backend has no separate weight copy");
  float decay = (float)(1.0 - (double)s->lr * s->weight_decay);
  float m_weight = (float)(1.0 - s->beta1);   /* exp_avg.lerp_(grad, 1 - beta1) */
  float v_weight = (float)(1.0 - s->beta2);   /* exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2) */
  float step_size = (float)((double)s->lr / (1.0 - pow(s->beta1, s->t)));
  float bc2_sqrt = (float)sqrt(1.0 - pow(s->beta2, s->t));
  float beta2 = s->beta2, eps = s->eps, scale = s->grad_scale;
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) {
    float gi = g[i] * scale;   /* clip_grad_norm_'s g.mul_(clip_coef); exact when scale is 1 */
    float pi = p[i] * decay;
    float mi = torch_lerp(m[i], gi, m_weight);
    float vi = v[i] * beta2 + v_weight * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + (-step_size) * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
  if (amax_parts) chunk_amax(amax_parts, p, n);
}
