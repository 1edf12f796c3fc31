/* qwen3-convert h52hf --nvfp4: a checkpoint written as NVIDIA ModelOpt's unified Hugging Face
 * NVFP4 checkpoint (quant_algo "NVFP4": 4-bit weights and activations), which vLLM, SGLang and
 * TensorRT-LLM load. Sources followed (NVIDIA/Model-Optimizer, vllm-project/vllm):
 *   modelopt/torch/quantization/qtensor/nvfp4_tensor.py  packing, scales, weight_scale_2
 *   modelopt/torch/export/unified_export_hf.py           which tensors a quantized linear has
 *   modelopt/torch/export/quant_utils.py                 hf_quant_config.json, fused groups
 *   modelopt/torch/export/convert_hf_config.py           config.json's quantization_config
 *   vllm/model_executor/layers/quantization/modelopt.py  what a loader requires and computes
 *
 * Tensors of a quantized linear <m> (its fp32 weight [out, in], in a multiple of 16):
 *   <m>.weight          U8      [out, in/2]   two E2M1 codes per byte along the input dimension:
 *                                             element 2i in the low nibble, 2i+1 in the high one
 *                                             (ModelOpt packs (q[..., 1::2] << 4) | q[..., 0::2],
 *                                             vLLM unpacks alike); code = sign (bit 3) | index of
 *                                             0, .5, 1, 1.5, 2, 3, 4, 6: kernels/nvfp4.h's codes
 *   <m>.weight_scale    F8_E4M3 [out, in/16]  one scale per 16 consecutive inputs of a row
 *   <m>.weight_scale_2  F32     []            the per-tensor decode scale: S_dec of nvfp4.h
 *                                             (ModelOpt: amax / (6 * 448))
 *   <m>.input_scale     F32     []            the activations' per-tensor decode scale: 1.0, see
 *                                             below
 * and w[r][c] = e2m1(code) * e4m3(weight_scale[r][c / 16]) * weight_scale_2, exactly
 * nvfp4_dequantize's value. Every other tensor (embeddings, norms, lm_head, and the linears of
 * layers kept in high precision) is written as bf16 (round to nearest even), as h52hf --dtype bf16
 * does, and config.json says torch_dtype bfloat16: the NVFP4 kernels take bf16 activations.
 *
 * Which linears: q/k/v/o/gate/up/down of the decoder layers the checkpoint's job trained in
 * NVFP4 (precision.linear NVFP4: layers [bf16_first_layers, num_layers - bf16_last_layers)),
 * quantized with the job's weight blocks (precision.weight_2d: 16x16 tiles). A checkpoint
 * without that record (a converted model, or a run trained in bf16) gets every decoder linear
 * quantized with 1x16 blocks, ModelOpt's own.
 *
 * 16x16 tiles go out in the per-row layout, each of a tile's 16 rows carrying the tile's scale:
 * the codes are computed against that one scale, so code * scale * S_dec is the same value in
 * either layout and the served weights are the training forward's own values (subject to the
 * fused groups below).
 *
 * Fused groups: the loaders fuse q/k/v into one qkv_proj and gate/up into one gate_up_proj and
 * use a single weight_scale_2 for it (vLLM takes the members' max without rescaling their block
 * scales), so ModelOpt gives a group one shared amax (preprocess_linear_fusion). So do we: a
 * group is quantized as one matrix, its members' rows stacked (blocks never straddle two
 * members: their rows are multiples of 16), then split again. o_proj, down_proj and the group
 * member holding the group's amax keep the training forward's values bit for bit; the other
 * members are rounded once more, against the group's tensor scale.
 *
 * input_scale: the loaders' W4A4 kernels give activations dynamic 16-element block scales but a
 * static per-tensor scale, which ModelOpt derives from a calibrated activation amax (input_scale
 * = amax / 2688) and vLLM requires. Training used each forward's own activation amax; no
 * calibrated amax exists. We write 1.0 for every linear: the activations' per-tensor encode
 * scale is then 1 and each block's E4M3 scale is its own amax / 6, which assumes nothing about
 * the model: no block is clipped below an amax of 2688, blocks down to 6 * 2^-6 (0.094) get a
 * full-precision scale, smaller ones a subnormal (coarser) one, and blocks below 6 * 2^-10
 * (0.006) quantize to zero. Served activations are thus rounded per block like training's,
 * not bit for bit; a calibrated input_scale may replace these values later.
 *
 * exclude_modules (hf_quant_config.json) and ignore (config.json) name what stays in high
 * precision: lm_head (also when tied: vLLM would otherwise give the LM head an NVFP4 method),
 * model.embed_tokens, model.norm, the layers' norms (model.layers.*.input_layernorm, ...), and
 * "model.layers.N.*" for every decoder layer outside the range (ModelOpt's pattern; "N*" would
 * match layer N0 too, under fnmatch).
 *
 * Returns 0, or -1 with a message in err naming the tensor or file at fault. */
#ifndef QWEN3_NVFP4_EXPORT_H
#define QWEN3_NVFP4_EXPORT_H

#include <stddef.h>

struct nvfp4_export_report {
  int first_layer, end_layer;   /* decoder layers [first, end) went out in NVFP4 */
  int weight_2d;                /* with the 16x16 tile scales of training */
  int recorded;                 /* the range and blocks are the checkpoint job's */
  size_t n_tensors;             /* tensors written */
  int n_shards;
  double bytes;                 /* of tensor data */
};

/* Writes hf_dir/model.safetensors (or shards of at most max_shard bytes with their index),
 * hf_quant_config.json and, last, config.json. hf_dir must exist and hold no model. */
int nvfp4_export(const char *ckpt_path, const char *hf_dir, double max_shard,
                 struct nvfp4_export_report *report, char *err, size_t errlen);

#endif
