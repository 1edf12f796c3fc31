/* Fixed-order reductions in double shared by the kernels: the xor butterfly gives every lane of
 * a warp the bitwise same sum (a + b == b + a), and a block adds its warp sums in warp order, so
 * each result is a fixed function of the inputs and runs repeat bit for bit. */
#ifndef QWEN3_CUDA_REDUCE_CUH
#define QWEN3_CUDA_REDUCE_CUH

static __device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

/* Sum of v over the block, the same value in every thread; blockDim.x a multiple of 32, at most
 * 1024; sh holds 32 doubles of shared memory. */
static __device__ double block_sum_double(double v, double *sh) {
  v = warp_sum_double(v);
  __syncthreads();  /* sh may still be read by a previous call */
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += sh[w];
  return t;
}

#endif
