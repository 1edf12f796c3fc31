/* GPU discovery for backend selection. The CUDA kernels themselves come with the CUDA backend
 * work; this file is what lets `backend: AUTO` see a GPU and say which backend it picked. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_device.h"

extern "C" int cuda_device_count(void) {
  int n = 0;
  /* no driver or no device is not an error here: AUTO then means CPU */
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

extern "C" int cuda_device_name(int device, char *name, int len) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return -1;
  snprintf(name, (size_t)len, "%s (sm_%d%d, %.0f GiB)", prop.name, prop.major, prop.minor,
           (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
  return 0;
}

extern "C" size_t cuda_device_memory(int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return 0;
  return prop.totalGlobalMem;
}

extern "C" void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

extern "C" void cuda_precision(enum dtype *act, int *tf32) {
  /* QWEN3_CUDA_TF32 chose between fp32 and tf32 before bf16 existed; it is refused rather than
   * ignored, so an old script that asked for exact fp32 does not silently train in bf16 */
  const char *old = getenv("QWEN3_CUDA_TF32");
  if (old)
    die("QWEN3_CUDA_TF32=%s is no longer read: set QWEN3_CUDA_PRECISION=fp32|tf32 instead "
        "(fp32 was QWEN3_CUDA_TF32=0, tf32 was =1; bf16 is the default)", old);
  const char *v = getenv("QWEN3_CUDA_PRECISION");
  if (!v || !*v || !strcmp(v, "bf16")) {
    *act = DT_BF16;   /* bf16 storage and GEMMs; the NVFP4 GEMMs' fp32 operands are exact in TF32 */
    *tf32 = 1;
  } else if (!strcmp(v, "tf32") || !strcmp(v, "fp32")) {
    *act = DT_F32;
    *tf32 = !strcmp(v, "tf32");
  } else {
    die("QWEN3_CUDA_PRECISION=%s: expected bf16 (the default), tf32 or fp32", v);
  }
}
