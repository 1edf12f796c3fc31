/* Greedy decoding's argmax on the device (ops.h argmax_rows): one block per row, so a decoding
 * step's few sequences read their logits in parallel and only their ids go to the host.
 *
 * Each thread keeps the best (value, index) of a strided part of its row, then the block
 * reduces the pairs. "Better" is a total order: the larger value, and of equal values the lower
 * index; a NaN is never better than anything (both comparisons are false), and a thread that saw
 * only NaN holds (-inf, NO_INDEX), which any -inf of the row beats by its index. So the result is
 * the CPU's argmax_first whatever order the values are visited and the pairs combined in: the
 * same bits on every run. */
#include <stdint.h>

#include "kernels/cuda/cuda.h"

#define ARGMAX_THREADS 1024
#define NO_INDEX INT32_MAX   /* nothing but NaN seen: the row's answer is then 0 */

/* (v, i) = the better of (v, i) and (ov, oi) */
static __device__ __forceinline__ void take_better(float &v, int &i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

/* vec: the row is 16-byte aligned and n a multiple of 4, so it is read as float4. */
static __global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_rows_kernel(int32_t *__restrict__ dst, const float *__restrict__ x, int n, bool vec) {
  __shared__ float sv[ARGMAX_THREADS / 32];
  __shared__ int si[ARGMAX_THREADS / 32];
  pdl_wait();
  pdl_release();
  const float *row = x + (size_t)blockIdx.x * n;
  float v = -INFINITY;
  int i = NO_INDEX;
  if (vec) {
    for (int g = threadIdx.x; g < n / 4; g += blockDim.x) {
      const float4 q = reinterpret_cast<const float4 *>(row)[g];
      take_better(v, i, q.x, 4 * g);
      take_better(v, i, q.y, 4 * g + 1);
      take_better(v, i, q.z, 4 * g + 2);
      take_better(v, i, q.w, 4 * g + 3);
    }
  } else {
    for (int j = threadIdx.x; j < n; j += blockDim.x) take_better(v, i, row[j], j);
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1)
    take_better(v, i, __shfl_xor_sync(0xffffffffu, v, m), __shfl_xor_sync(0xffffffffu, i, m));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = v, si[warp] = i;
  __syncthreads();
  if (warp != 0) return;
  v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
  i = lane < (int)(blockDim.x >> 5) ? si[lane] : NO_INDEX;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1)
    take_better(v, i, __shfl_xor_sync(0xffffffffu, v, m), __shfl_xor_sync(0xffffffffu, i, m));
  if (lane == 0) dst[blockIdx.x] = i == NO_INDEX ? 0 : i;
}

extern "C" void cuda_argmax_rows(int32_t *dst, const float *x, int rows, int n) {
  if (rows <= 0) return;
  const bool vec = n % 4 == 0 && cuda_aligned16(x);
  CUDA_LAUNCH_PDL("argmax_rows_kernel", argmax_rows_kernel, dim3((unsigned)rows),
                  dim3(ARGMAX_THREADS), 0, dst, x, n, vec);
}
