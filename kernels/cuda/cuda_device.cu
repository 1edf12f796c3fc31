/* GPU discovery for backend selection. The CUDA kernels themselves come with the CUDA backend
 * work; this file is what lets `backend: AUTO` see a GPU and say which backend it picked. */
#include <cuda_runtime.h>
#include <stdio.h>

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
