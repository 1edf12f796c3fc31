#ifndef QWEN3_CUDA_DEVICE_H
#define QWEN3_CUDA_DEVICE_H
#include <stddef.h>

#include "kernels/ops.h"
#ifdef __cplusplus
extern "C" {
#endif
/* The most query heads per kv head the decoding attention serves (one block holds a group):
 * every Qwen3 model has 16 or fewer. A job with eval.prompts is refused at its start beyond. */
#define CUDA_DECODE_MAX_GROUP 16
/* Number of usable CUDA devices; 0 without driver or device. */
int cuda_device_count(void);
/* "NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)"; 0 on success. */
int cuda_device_name(int device, char *name, int len);
/* Total memory of the device in bytes; 0 when it cannot be read. For --plan's default limit. */
size_t cuda_device_memory(int device);
/* Bytes the CUDA backend allocates for itself in every process (scratch arena + cuBLASLt
 * workspace), as init(.., rows) will with the current environment; for --dry-run's estimate. */
size_t cuda_workspace_bytes(int rows);
/* Its scratch arena alone, for micro-batches of `rows` token rows (0: not known). */
size_t cuda_scratch_bytes(int rows);
/* The mode QWEN3_CUDA_PRECISION selects (bf16 when unset): the activation dtype and whether
 * GEMMs on fp32 operands may use TF32. Dies naming the variable on a value it does not know. */
void cuda_precision(enum dtype *act, int *tf32);
#ifdef __cplusplus
}
#endif
#endif
