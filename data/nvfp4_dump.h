/* NVFP4 dumps: what the training recipe's quantizer (kernels/nvfp4.h, nvfp4_quantize with round
 * to nearest) makes of a model's weights, written to HDF5 so that people and tests can look at
 * the exact bytes. `qwen3-nvfp4 quantize` writes one, `qwen3-nvfp4 show` prints an excerpt.
 *
 * Which tensors: every 2-D tensor of a float dtype (F32, BF16, F16, F64) whose shape the blocks
 * divide (columns a multiple of 16, rows too for 16x16 blocks). Embeddings, the LM head and
 * norms stay high precision in the recipe, so names containing "embed_tokens", "lm_head" or
 * "norm" are skipped unless `all` is set; `match` (a POSIX extended regex, found anywhere in the
 * name, so a plain substring works) narrows the set. Every skipped tensor is reported with its
 * reason; tensors that `match` leaves out are not.
 *
 * File layout (all datasets chunked, with HDF5's Fletcher32 checksum):
 *   /                      attributes: format_version (int32) = NVFP4_DUMP_VERSION,
 *                          source (string: the input's absolute path)
 *   /<tensor name>/        one group per tensor, named as in the safetensors file
 *                          (model.layers.0.mlp.up_proj.weight), for a [rows, cols] tensor:
 *     codes                uint8 [rows, cols/2]: two E2M1 codes per byte, element 2i in the low
 *                          nibble, 2i+1 in the high one; code = sign (bit 3) | magnitude index
 *                          0..7 of 0, 0.5, 1, 1.5, 2, 3, 4, 6
 *     scales               uint8 E4M3 bytes, [rows/16, cols/16] for 16x16 blocks, [rows, cols/16]
 *                          for 1x16 blocks (16 consecutive elements of a row)
 *     dequantized          float32 [rows, cols], only when asked for: code * scale * S_dec
 *     attributes           tensor_scale_dec (float32 S_dec), tensor_scale_enc (float32 S_enc),
 *                          amax (float32), block ("16x16" or "1x16"), shape (int64 [2]),
 *                          dtype (string: the source dtype, "BF16")
 * An element dequantizes as nvfp4_e2m1_decode(code) * nvfp4_e4m3_decode(scale) * S_dec.
 *
 * Functions that can fail return 0, or -1 with a message in err that names the file and the
 * tensor at fault. */
#ifndef QWEN3_NVFP4_DUMP_H
#define QWEN3_NVFP4_DUMP_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/nvfp4.h"

#define NVFP4_DUMP_VERSION 1

struct nvfp4_dump_options {
  enum nvfp4_block block;   /* NVFP4_BLOCK_16X16 is the recipe's for weights */
  const char *match;        /* NULL: every tensor */
  int all;                  /* also embed_tokens, lm_head and *norm* tensors */
  int dequantized;          /* also write `dequantized` */
  FILE *log;                /* a line per tensor (progress, and every skip with its reason); NULL: silent */
};

struct nvfp4_dump_summary {
  int quantized, skipped;
};

/* Quantizes input (a .safetensors file, a Hugging Face model directory, or a checkpoint's fp32
 * weights: a step directory or a checkpoint root) into the dump `out`,
 * written under a temporary name and renamed into place. summary may be NULL. */
int nvfp4_dump_quantize(const char *input, const char *out, const struct nvfp4_dump_options *o,
                        struct nvfp4_dump_summary *summary, char *err, size_t errlen);

/* One tensor read back from a dump. */
struct nvfp4_dump_tensor {
  int rows, cols;
  enum nvfp4_block block;
  struct nvfp4_tensor_scale scale;   /* amax, enc, dec */
  char dtype[16];                    /* of the source */
  uint8_t *codes;                    /* rows*cols/2 */
  uint8_t *scales;                   /* nvfp4_num_scales(rows, cols, block) */
  float *dequantized;                /* rows*cols, NULL when the dump has none */
};

int nvfp4_dump_read(const char *path, const char *name, struct nvfp4_dump_tensor *t, char *err,
                    size_t errlen);
void nvfp4_dump_tensor_free(struct nvfp4_dump_tensor *t);
/* The original values of tensor name (n = rows*cols floats into dst), read from the dump's
 * source, which must still be where it was. */
int nvfp4_dump_original(const char *path, const char *name, float *dst, size_t n, char *err,
                        size_t errlen);

#endif
