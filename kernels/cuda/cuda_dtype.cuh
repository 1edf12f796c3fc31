/* Activation storage types of the CUDA kernels. A kernel that reads or writes activations is a
 * template over its storage type T (float or __nv_bfloat16) and computes in fp32: it reads
 * through load_f and writes through store_f (round to nearest even into bf16). The host side
 * picks the instantiation from cuda_ctx.act with CUDA_ACT_DISPATCH. */
#ifndef QWEN3_CUDA_DTYPE_CUH
#define QWEN3_CUDA_DTYPE_CUH

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

static __device__ __forceinline__ float load_f(const float *p) { return *p; }
static __device__ __forceinline__ float load_f(const bf16 *p) { return __bfloat162float(*p); }
static __device__ __forceinline__ void store_f(float *p, float v) { *p = v; }
static __device__ __forceinline__ void store_f(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* Four consecutive values of T moved as one load or store (16 bytes of fp32, 8 of bf16): the
 * vector paths of the kernels, taken when every pointer they vectorize is aligned to it. */
template <typename T>
struct alignas(4 * sizeof(T)) vec4 {
  T v[4];
};

template <typename T>
static inline bool vec4_aligned(const void *p) {
  return ((uintptr_t)p & (4 * sizeof(T) - 1)) == 0;
}

/* f[0..3] = the four values of group i of p, in fp32 */
template <typename T>
static __device__ __forceinline__ void load4(float f[4], const T *p, size_t i) {
  const vec4<T> q = ((const vec4<T> *)p)[i];
#pragma unroll
  for (int k = 0; k < 4; k++) f[k] = load_f(&q.v[k]);
}

template <typename T>
static __device__ __forceinline__ void store4(T *p, size_t i, const float f[4]) {
  vec4<T> q;
#pragma unroll
  for (int k = 0; k < 4; k++) store_f(&q.v[k], f[k]);
  ((vec4<T> *)p)[i] = q;
}

/* Runs `body` with T the storage type of cuda_ctx.act; body is a statement using T, e.g.
 *   CUDA_ACT_DISPATCH(T, kernel<T><<<b, t, 0, s>>>((T *)out, (const T *)x, n));           */
#define CUDA_ACT_DISPATCH(T, ...)      \
  do {                                 \
    if (cuda_ctx.act == DT_BF16) {     \
      typedef bf16 T;                  \
      __VA_ARGS__;                     \
    } else {                           \
      typedef float T;                 \
      __VA_ARGS__;                     \
    }                                  \
  } while (0)

#endif
