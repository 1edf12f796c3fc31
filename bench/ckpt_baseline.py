#!/usr/bin/env python3
"""The baseline of bench/ckpt_bench.c: the same stage of a Qwen3-4B-shaped model (fp32 weights
and both AdamW moments, Hugging Face names) saved and loaded by safetensors and by torch.save,
each followed by an fsync, as a PyTorch trainer would checkpoint it. One `RESULT system=...` line
per library, as bench/ckpt_bench prints its own.

    python3 bench/ckpt_baseline.py DIR [STAGE [STAGES]]      (default: stage 0 of 8)
"""
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from bench_common import result

HIDDEN, LAYERS, HEADS, KV, HEAD_DIM, FFN, VOCAB = 2560, 36, 32, 8, 128, 9728, 151936


def stage_tensors(stage, stages):
    layers = int(os.environ.get("QWEN3_BENCH_LAYERS", LAYERS))
    first = [0]
    for s in range(stages):
        first.append(first[-1] + layers // stages + (1 if s < layers % stages else 0))
    shapes = {}
    if stage == 0 or stage == stages - 1:
        shapes["model.embed_tokens.weight"] = (VOCAB, HIDDEN)
    for l in range(first[stage], first[stage + 1]):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN)})
    if stage == stages - 1:
        shapes["model.norm.weight"] = (HIDDEN,)
    tensors = {}
    for name, shape in shapes.items():
        w = torch.randn(shape) * 0.02
        tensors[name] = w
        tensors[name + ".adam_m"] = w.clone()
        tensors[name + ".adam_v"] = w.clone()
    return tensors


def synced(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main():
    root = sys.argv[1]
    stage = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    stages = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    os.makedirs(root, exist_ok=True)
    tensors = stage_tensors(stage, stages)
    gib = sum(t.numel() * 4 for t in tensors.values()) / 2**30
    print(f"stage {stage} of {stages}: {len(tensors) // 3} tensors, {gib:.2f} GiB of weights + AdamW moments")
    for name, save, load in [
        ("safetensors", lambda p: save_file(tensors, p), load_file),
        ("torch.save", lambda p: torch.save(tensors, p), lambda p: torch.load(p, weights_only=True)),
    ]:
        path = os.path.join(root, "stage." + name)
        t0 = time.perf_counter()
        save(path)
        synced(path)
        t1 = time.perf_counter()
        back = load(path)
        # safetensors maps lazily: touch every byte, as a trainer copying to the GPU would
        total = sum(float(t.view(-1)[:: max(1, t.numel() // 1024)].sum()) for t in back.values())
        back = {k: v.clone() for k, v in back.items()}
        t2 = time.perf_counter()
        assert all(torch.equal(back[k], tensors[k]) for k in tensors), name
        print(f"{name}: save {t1 - t0:.2f} s = {gib / (t1 - t0):.2f} GiB/s, "
              f"load {t2 - t1:.2f} s = {gib / (t2 - t1):.2f} GiB/s (bit-exact)  [{total:.1f}]")
        result(system=name, stage=stage, stages=stages, gib=round(gib, 3), save_s=t1 - t0,
               save_gibps=gib / (t1 - t0), load_s=t2 - t1, load_gibps=gib / (t2 - t1))
        del back
        os.remove(path)


if __name__ == "__main__":
    main()
