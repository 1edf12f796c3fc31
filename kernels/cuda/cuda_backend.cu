/* The CUDA backend table, its execution context and its memory ops. One process drives one GPU
 * (local_rank % device_count); several processes may share a GPU, which is how pipelines of
 * 2 or 4 stages are tested on one card. The compute ops live in the other cuda_*.cu files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_device.h"

extern "C" {
/* common/util.h is C11 (_Noreturn); these are the two functions this file needs from it. */
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
}

struct cuda_context cuda_ctx;

/* Bytes the backend holds, for the memory column of the log line and the dry-run estimate. */
static size_t bytes_in_use, bytes_peak;

extern "C" void cuda_fail(const char *what, const char *detail, const char *file, int line) {
  die("CUDA error at %s:%d: %s: %s", file, line, what, detail);
}

extern "C" void cuda_check_launch(const char *kernel, const char *file, int line) {
  cudaError_t e = cudaGetLastError();
  /* a recorded launch runs later: the debug check comes with the replay's */
  if (e == cudaSuccess && cuda_ctx.debug && !cuda_ctx.capturing)
    e = cudaStreamSynchronize(cuda_ctx.stream);
  if (e != cudaSuccess) cuda_fail(kernel, cudaGetErrorString(e), file, line);
}

static size_t env_size(const char *name, size_t fallback) {
  const char *v = getenv(name);
  if (!v || !*v) return fallback;
  char *end;
  unsigned long long x = strtoull(v, &end, 10);
  if (*end || x == 0) die("%s=%s: expected a positive whole number", name, v);
  return (size_t)x;
}

static int env_flag(const char *name, int fallback) {
  const char *v = getenv(name);
  if (!v || !*v) return fallback;
  if (!strcmp(v, "0")) return 0;
  if (!strcmp(v, "1")) return 1;
  die("%s=%s: expected 0 or 1", name, v);
}

/* cuBLASLt's recommended workspace on Hopper is 32 MiB */
#define LT_WORKSPACE_BYTES ((size_t)32 << 20)

/* The arena holds the LM head's chunk of logits (rows x vocab floats) and the reductions'
 * partial sums. At least 512 MiB: a 151936-word vocabulary then runs in chunks of ~590 rows in
 * the bf16 mode (fp32 logits and bf16 dlogits, 6 bytes a word) and ~880 in fp32, each GEMM still
 * near the GEMM rate. Larger micro-batches get 128 KiB per row of theirs, up to 2 GiB (about a
 * seventh of their rows a chunk at that vocabulary): every chunk adds its dlogitsᵀ·x into the fp32
 * dw with beta 1, a read and a write of the whole [vocab, dim] gradient (3.1 GB at Qwen3-4B,
 * ~0.7 ms), so the chunks' count, not their size, is what costs (bench/head_bench: 16384 rows
 * 91 ms in chunks of 589, 72 in chunks of 2356). Micro-batches of up to 4096 rows keep 512 MiB:
 * their activation memory stays small. QWEN3_CUDA_SCRATCH_MB sets the size outright. */
#define SCRATCH_MIN_BYTES ((size_t)512 << 20)
#define SCRATCH_MAX_BYTES ((size_t)2048 << 20)
#define SCRATCH_BYTES_PER_ROW ((size_t)128 << 10)

extern "C" size_t cuda_scratch_bytes(int rows) {
  size_t bytes = rows > 0 ? (size_t)rows * SCRATCH_BYTES_PER_ROW : 0;
  if (bytes < SCRATCH_MIN_BYTES) bytes = SCRATCH_MIN_BYTES;
  if (bytes > SCRATCH_MAX_BYTES) bytes = SCRATCH_MAX_BYTES;
  return env_size("QWEN3_CUDA_SCRATCH_MB", bytes >> 20) << 20;
}

/* The side stream's own arena: its ops (AdamW, the norm's sums) take only sum_into's partials. */
#define SIDE_SCRATCH_BYTES ((size_t)64 << 10)

extern "C" size_t cuda_workspace_bytes(int rows) {
  return LT_WORKSPACE_BYTES + cuda_scratch_bytes(rows) + SIDE_SCRATCH_BYTES;
}

static void cuda_init(int local_rank, int local_size, int rows) {
  cuda_precision(&cuda_ctx.act, &cuda_ctx.tf32);   /* first: a mistyped mode fails before any GPU work */
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0)
    die("backend CUDA: no usable GPU (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
  cuda_ctx.device = local_rank % count;
  CUDA_CHECK(cudaSetDevice(cuda_ctx.device));
  CUDA_CHECK(cudaDeviceGetAttribute(&cuda_ctx.sm_count, cudaDevAttrMultiProcessorCount,
                                    cuda_ctx.device));
  /* The main stream above the side stream: when an SM frees up, the step's kernels get it
   * before the optimizer's update of the last step (optim.c), which fills the SMs they leave
   * idle instead of holding the forward behind its blocks. comm's NCCL streams are above both
   * (comm_nccl.c). QWEN3_CUDA_OVERLAP_PRIORITY=0 gives the two streams the same priority. */
  int least = 0, greatest = 0;
  CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  const int main_priority =
      env_flag("QWEN3_CUDA_OVERLAP_PRIORITY", 1) && greatest < least ? greatest + 1 : least;
  CUDA_CHECK(cudaStreamCreateWithPriority(&cuda_ctx.main_stream, cudaStreamNonBlocking,
                                          main_priority));
  CUDA_CHECK(cudaStreamCreateWithPriority(&cuda_ctx.side_stream, cudaStreamNonBlocking, least));
  CUDA_CHECK(cudaEventCreateWithFlags(&cuda_ctx.side_tail, cudaEventDisableTiming));
  cuda_ctx.stream = cuda_ctx.main_stream;
  CUBLAS_CHECK(cublasLtCreate(&cuda_ctx.lt));
  cuda_ctx.debug = env_flag("QWEN3_CUDA_DEBUG", 0);
  int major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda_ctx.device));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cuda_ctx.device));
  cuda_ctx.pdl = major >= 9 && env_flag("QWEN3_CUDA_PDL", 1);
  /* the first call of each GEMM shape times cuBLASLt's candidates (cuda_gemm.cu);
   * QWEN3_CUDA_GEMM_TUNE=0 keeps the heuristic's first */
  cuda_ctx.gemm_tune = env_flag("QWEN3_CUDA_GEMM_TUNE", 1);
  /* wgmma exists on sm_90 only, in code built for sm_90a; QWEN3_CUDA_WGMMA=0 keeps attention on
   * the mma.sync kernels (to compare the two) */
#ifdef QWEN3_CUDA_SM90A
  cuda_ctx.wgmma = major == 9 && minor == 0 && env_flag("QWEN3_CUDA_WGMMA", 1);
#else
  cuda_ctx.wgmma = 0;
#endif
  cuda_ctx.lt_workspace_bytes = LT_WORKSPACE_BYTES;
  cuda_ctx.scratch_bytes = cuda_scratch_bytes(rows);
  CUDA_CHECK(cudaMalloc(&cuda_ctx.lt_workspace, cuda_ctx.lt_workspace_bytes));
  CUDA_CHECK(cudaMalloc((void **)&cuda_ctx.scratch, cuda_ctx.scratch_bytes));
  CUDA_CHECK(cudaMalloc((void **)&cuda_ctx.side_scratch, SIDE_SCRATCH_BYTES));
  CUDA_CHECK(cudaMallocHost((void **)&cuda_ctx.host_result, 4096));
  bytes_in_use = bytes_peak = cuda_workspace_bytes(rows);
  if (local_size > count && local_rank == 0)
    info("backend CUDA: %d processes share %d GPU(s) on this machine", local_size, count);
}

extern "C" int cuda_smem_optin(void) {
  static int bytes = -1;
  if (bytes < 0)
    CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                      cuda_ctx.device));
  return bytes;
}

extern "C" void *cuda_scratch(size_t bytes, const char *what) {
  /* the side stream has an arena of its own: with the main one it would race the main
   * stream's ops, which run at the same time */
  if (cuda_ctx.stream == cuda_ctx.side_stream) {
    if (bytes > SIDE_SCRATCH_BYTES)
      die("internal: %s takes %zu bytes of scratch memory on the side stream (%zu there)", what,
          bytes, SIDE_SCRATCH_BYTES);
    return cuda_ctx.side_scratch;
  }
  if (bytes > cuda_ctx.scratch_bytes)
    die("CUDA scratch arena too small: %s needs %.1f MiB of %.1f MiB (set QWEN3_CUDA_SCRATCH_MB)",
        what, bytes / 1048576.0, cuda_ctx.scratch_bytes / 1048576.0);
  return cuda_ctx.scratch;
}

extern "C" void cuda_scratch2(void **a, size_t a_bytes, void **b, size_t b_bytes,
                              const char *what) {
  size_t a_round = (a_bytes + 255) & ~(size_t)255;
  char *base = (char *)cuda_scratch(a_round + b_bytes, what);
  *a = base;
  *b = base + a_round;
}

extern "C" void *cuda_scratch_after(const void *in_use_end, size_t bytes) {
  const char *end = (const char *)in_use_end, *base = cuda_ctx.scratch;
  size_t used = end > base && end <= base + cuda_ctx.scratch_bytes ? (size_t)(end - base) : 0;
  used = (used + 255) & ~(size_t)255;
  return used + bytes <= cuda_ctx.scratch_bytes ? cuda_ctx.scratch + used : NULL;
}

/* ---- the side stream: the optimizer overlapping the next step (ops.h) ---------------------- */

#define MAX_MARKS 4096

static void cuda_side_stream(int on) {
  if (on == (cuda_ctx.stream == cuda_ctx.side_stream)) return;
  if (on) {   /* the side stream starts after everything issued so far */
    CUDA_CHECK(cudaEventRecord(cuda_ctx.side_tail, cuda_ctx.main_stream));
    CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx.side_stream, cuda_ctx.side_tail, 0));
    cuda_ctx.stream = cuda_ctx.side_stream;
  } else {
    CUDA_CHECK(cudaEventRecord(cuda_ctx.side_tail, cuda_ctx.side_stream));
    cuda_ctx.side_busy = 1;
    cuda_ctx.stream = cuda_ctx.main_stream;
  }
}

static void cuda_mark(int i) {
  if (i < 0 || i >= MAX_MARKS) die("internal: mark %d outside 0..%d", i, MAX_MARKS - 1);
  if (!cuda_ctx.marks) cuda_ctx.marks = (cudaEvent_t *)calloc(MAX_MARKS, sizeof(cudaEvent_t));
  if (!cuda_ctx.marks) die("out of host memory for %d CUDA events", MAX_MARKS);
  if (!cuda_ctx.marks[i])
    CUDA_CHECK(cudaEventCreateWithFlags(&cuda_ctx.marks[i], cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(cuda_ctx.marks[i], cuda_ctx.stream));
}

static void cuda_wait_mark(int i) {
  if (cuda_ctx.capturing) return;   /* capture_begin waited for every mark */
  if (cuda_ctx.marks && i >= 0 && i < MAX_MARKS && cuda_ctx.marks[i])
    CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx.stream, cuda_ctx.marks[i], 0));
}

/* ---- recording (ops.h capture_begin): a CUDA graph of the ops on the current stream ---------- */

/* A recording must not wait for work outside it, so the stream waits for every mark first
 * (the work they mark is then behind the replays too, which run later on the same stream). */
static void cuda_capture_begin(void) {
  if (cuda_ctx.capturing) die("internal: capture_begin while recording");
  for (int i = 0; cuda_ctx.marks && i < MAX_MARKS; i++)
    if (cuda_ctx.marks[i]) CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx.stream, cuda_ctx.marks[i], 0));
  CUDA_CHECK(cudaStreamBeginCapture(cuda_ctx.stream, cudaStreamCaptureModeThreadLocal));
  cuda_ctx.capturing = 1;
}

static void *cuda_capture_end(void) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cuda_ctx.capturing = 0;
  CUDA_CHECK(cudaStreamEndCapture(cuda_ctx.stream, &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_CHECK(cudaGraphDestroy(graph));
  return (void *)exec;
}

static void cuda_replay(void *recording) {
  CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)recording, cuda_ctx.stream));
  if (cuda_ctx.debug) CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
}

static void cuda_replay_free(void *recording) {
  if (recording) CUDA_CHECK(cudaGraphExecDestroy((cudaGraphExec_t)recording));
}

/* Before the host reads results or memory changes hands: the side stream's work is done. */
static void wait_side(void) {
  if (!cuda_ctx.side_busy) return;
  CUDA_CHECK(cudaEventSynchronize(cuda_ctx.side_tail));
  cuda_ctx.side_busy = 0;
}

/* Allocations carry their size in front, so free can keep the books without a table. */
#define ALLOC_HEADER 256

static void *cuda_alloc(size_t bytes) {
  wait_side();
  char *p;
  if (cudaMalloc((void **)&p, bytes + ALLOC_HEADER) != cudaSuccess) {
    cudaGetLastError();   /* clear the sticky error: the caller reports what ran out */
    return NULL;
  }
  CUDA_CHECK(cudaMemsetAsync(p + ALLOC_HEADER, 0, bytes, cuda_ctx.stream));
  size_t *size = (size_t *)cuda_ctx.host_result;
  *size = bytes;
  CUDA_CHECK(cudaMemcpyAsync(p, size, sizeof *size, cudaMemcpyHostToDevice, cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  bytes_in_use += bytes;
  if (bytes_in_use > bytes_peak) bytes_peak = bytes_in_use;
  return p + ALLOC_HEADER;
}

static void cuda_free(void *p) {
  if (!p) return;
  wait_side();   /* the optimizer may still be writing it */
  char *base = (char *)p - ALLOC_HEADER;
  size_t bytes;
  CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.host_result, base, sizeof bytes, cudaMemcpyDeviceToHost,
                             cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  memcpy(&bytes, cuda_ctx.host_result, sizeof bytes);
  bytes_in_use -= bytes;
  CUDA_CHECK(cudaFree(base));
}

/* The host buffer may be reused as soon as this returns: CUDA copies pageable memory out
 * before cudaMemcpyAsync returns. */
static void cuda_to_device(void *dst, const void *src, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda_ctx.stream));
}

static void cuda_to_host(void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  wait_side();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cuda_ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
}

static void cuda_copy(void *dst, const void *src, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_ctx.stream));
}

/* Pinned: a device-to-host copy into it is a DMA at the link's rate, without CUDA's staging.
 * The pages are faulted in by plain stores first and then registered: cudaMallocHost holds the
 * driver's lock while it zeroes and pins, which stalls every CUDA call of the process's other
 * threads for the whole allocation (measured on an H200 host: 44 s for 48 GiB), and
 * checkpoint.c allocates its staging buffer on a thread of its own while training runs;
 * registering pages already present stalls them 1.6 s for 32 GiB. That thread's current device
 * is 0 until set: without cudaSetDevice every process would pin it for (and open a context on)
 * GPU 0. */
static void *cuda_host_alloc(size_t bytes) {
  const size_t page = 4096;
  size_t size = (bytes + page - 1) / page * page;
  void *p = aligned_alloc(page, size ? size : page);
  if (!p) return NULL;
  memset(p, 0, size);
  if (cudaSetDevice(cuda_ctx.device) != cudaSuccess ||
      cudaHostRegister(p, size ? size : page, cudaHostRegisterDefault) != cudaSuccess) {
    cudaGetLastError();   /* clear the error: the caller reports what ran out */
    free(p);
    return NULL;
  }
  return p;
}

static void cuda_host_free(void *p) {
  if (!p) return;
  CUDA_CHECK(cudaHostUnregister(p));
  free(p);
}

static void cuda_zero(void *p, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda_ctx.stream));
}

static void cuda_synchronize(void) {
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream));
  wait_side();
}

static void cuda_memory(size_t *in_use, size_t *peak) {
  *in_use = bytes_in_use;
  *peak = bytes_peak;
}

static enum dtype cuda_act_dtype(void) { return cuda_ctx.act; }

/* For comm's NCCL transport (ops.h): the compute stream. */
static void *cuda_native_stream(void) { return (void *)cuda_ctx.main_stream; }

extern "C" const struct backend backend_cuda = {
  .name = "cuda",
  .device_memory = 1,
  .init = cuda_init,
  .alloc = cuda_alloc,
  .free = cuda_free,
  .to_device = cuda_to_device,
  .to_host = cuda_to_host,
  .copy = cuda_copy,
  .zero = cuda_zero,
  .synchronize = cuda_synchronize,
  .host_alloc = cuda_host_alloc,
  .host_free = cuda_host_free,
  .memory = cuda_memory,
  .act_dtype = cuda_act_dtype,
  .convert = cuda_convert,
  .embedding_forward = cuda_embedding_forward,
  .embedding_backward = cuda_embedding_backward,
  .rmsnorm_forward = cuda_rmsnorm_forward,
  .rmsnorm_backward = cuda_rmsnorm_backward,
  .qk_norm_rope_forward = cuda_qk_norm_rope_forward,
  .qk_norm_rope_backward = cuda_qk_norm_rope_backward,
  .attention_forward = cuda_attention_forward,
  .attention_backward = cuda_attention_backward,
  .swiglu_forward = cuda_swiglu_forward,
  .swiglu_backward = cuda_swiglu_backward,
  .linear_forward = cuda_linear_forward,
  .linear_backward = cuda_linear_backward,
  .add = cuda_add,
  .kv_append = cuda_kv_append,
  .scale = cuda_scale,
  .argmax_rows = cuda_argmax_rows,
  .lm_head_loss = cuda_lm_head_loss,
  .sum_into = cuda_sum_into,
  .nvfp4_quantize = cuda_nvfp4_quantize,
  .nvfp4_quantize_weight = cuda_nvfp4_quantize_weight,
  .nvfp4_quantize_rows_cols = cuda_nvfp4_quantize_rows_cols,
  .nvfp4_gemm = cuda_nvfp4_gemm,
  .nvfp4_pack = cuda_nvfp4_pack,
  .nvfp4_gemv_packed = cuda_nvfp4_gemv_packed,
  .adamw_update = cuda_adamw_update,
  .side_stream = cuda_side_stream,
  .mark = cuda_mark,
  .wait_mark = cuda_wait_mark,
  .native_stream = cuda_native_stream,
  .capture_begin = cuda_capture_begin,
  .capture_end = cuda_capture_end,
  .replay = cuda_replay,
  .replay_free = cuda_replay_free,
};
