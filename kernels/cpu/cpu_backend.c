/* The CPU backend table. Host memory is device memory here, so the memory ops are libc calls;
 * the compute ops live in the other cpu_*.c files. */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/util.h"
#include "kernels/cpu/cpu.h"
#include "kernels/nvfp4.h"

/* A zero-byte request still gets a real pointer: NULL means out of memory. */
static void *cpu_alloc(size_t bytes) { return calloc(1, bytes ? bytes : 1); }
static void cpu_free(void *p) { free(p); }
static void *cpu_host_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void cpu_zero(void *p, size_t bytes) { memset(p, 0, bytes); }
static void cpu_synchronize(void) {}
static enum dtype cpu_act_dtype(void) { return DT_F32; }

/* Only fp32 lives here: a conversion between two fp32 tensors is a copy. */
static void cpu_convert(void *dst, enum dtype dst_type, const void *src, enum dtype src_type,
                        size_t n) {
  if (dst_type != DT_F32 || src_type != DT_F32)
    die("internal: the CPU backend holds fp32 tensors only");
  memmove(dst, src, n * sizeof(float));
}

/* Each rank on the machine gets an equal share of the cores for OpenMP and OpenBLAS, unless the
 * user set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS: more threads than cores only thrash. */
static void cpu_init(int local_rank, int local_size, int rows) {
  (void)rows;   /* the CPU backend has no arena to size */
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int share = (int)(cores / (local_size > 0 ? local_size : 1));
  if (share < 1) share = 1;
  if (!getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(share);
#ifdef _OPENMP
  if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(share);
#endif
}

const struct backend backend_cpu = {
  .name = "cpu",
  .init = cpu_init,
  .alloc = cpu_alloc,
  .free = cpu_free,
  .host_alloc = cpu_host_alloc,
  .host_free = cpu_free,
  .to_device = cpu_copy,
  .to_host = cpu_copy,
  .copy = cpu_copy,
  .zero = cpu_zero,
  .synchronize = cpu_synchronize,
  .act_dtype = cpu_act_dtype,
  .convert = cpu_convert,
  .embedding_forward = cpu_embedding_forward,
  .embedding_backward = cpu_embedding_backward,
  .rmsnorm_forward = cpu_rmsnorm_forward,
  .rmsnorm_backward = cpu_rmsnorm_backward,
  .qk_norm_rope_forward = cpu_qk_norm_rope_forward,
  .qk_norm_rope_backward = cpu_qk_norm_rope_backward,
  .attention_forward = cpu_attention_forward,
  .attention_backward = cpu_attention_backward,
  .kv_append = cpu_kv_append,
  .swiglu_forward = cpu_swiglu_forward,
  .swiglu_backward = cpu_swiglu_backward,
  .linear_forward = cpu_linear_forward,
  .linear_backward = cpu_linear_backward,
  .add = cpu_add,
  .scale = cpu_scale,
  .argmax_rows = cpu_argmax_rows,
  .lm_head_loss = cpu_lm_head_loss,
  .sum_into = cpu_sum_into,
  .nvfp4_quantize = cpu_nvfp4_quantize,
  .nvfp4_quantize_weight = cpu_nvfp4_quantize_weight,
  .nvfp4_quantize_rows_cols = cpu_nvfp4_quantize_rows_cols,
  .nvfp4_gemm = cpu_nvfp4_gemm,
  .nvfp4_pack = cpu_nvfp4_pack,
  .nvfp4_gemv_packed = cpu_nvfp4_gemv_packed,
  .adamw_update = cpu_adamw_update,
};
