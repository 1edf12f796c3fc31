#ifndef QWEN3_CUDA_DEVICE_H
#define QWEN3_CUDA_DEVICE_H
#ifdef __cplusplus
extern "C" {
#endif
/* Number of usable CUDA devices; 0 without driver or device. */
int cuda_device_count(void);
/* "NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)"; 0 on success. */
int cuda_device_name(int device, char *name, int len);
#ifdef __cplusplus
}
#endif
#endif
