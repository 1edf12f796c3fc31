/* Asynchronous copies from global to shared memory (cp.async, sm_80+), for the kernels that
 * stage their operands in shared memory: the bf16 tensor-core attention's tiles and the fused
 * decode kernels' weight rows. */
#ifndef QWEN3_CUDA_CP_ASYNC_CUH
#define QWEN3_CUDA_CP_ASYNC_CUH

#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; valid == false writes 16 zero bytes and reads nothing
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared; valid == false writes a zero
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
// the copies this thread issued since its last commit form one group
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// all but this thread's newest N groups have landed and are visible to it
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// everything this thread committed has landed and is visible to it
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait<0>(); }

#endif
