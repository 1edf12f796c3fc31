/* SwiGLU's forward value, shared by swiglu_forward_kernel (cuda_elementwise.cu) and the fused
 * decode kernels (cuda_nvfp4.cu), so both round alike. */
#ifndef QWEN3_CUDA_SWIGLU_CUH
#define QWEN3_CUDA_SWIGLU_CUH

#include <math.h>

/* silu(g) * u = g / (1 + exp(-g)) * u, as the CPU (and torch) evaluate it */
static __device__ __forceinline__ float swiglu_fwd1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

#endif
