/* AdamW in the operation order of torch.optim.AdamW (its single-tensor and foreach paths run
 * the same sequence), so that a CPU step and a PyTorch step round alike: the scalars are
 * computed in double as Python computes them, then rounded to fp32 where torch's fp32 kernels
 * round them. */
#include <math.h>

#include "kernels/cpu/cpu.h"

/* torch.lerp: two formulas, chosen by the weight, so that both ends are exact */
static float torch_lerp(float self, float end, float weight) {
  return weight < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

void cpu_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, int t) {
  float decay = (float)(1.0 - (double)lr * weight_decay);
  float m_weight = (float)(1.0 - beta1);      /* exp_avg.lerp_(grad, 1 - beta1) */
  float v_weight = (float)(1.0 - beta2);      /* exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2) */
  float step_size = (float)((double)lr / (1.0 - pow(beta1, t)));
  float bc2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) {
    float pi = p[i] * decay;
    float mi = torch_lerp(m[i], g[i], m_weight);
    float vi = v[i] * beta2 + v_weight * g[i] * g[i];
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + (-step_size) * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
}
