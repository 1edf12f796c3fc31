#!/usr/bin/env python3
"""How far PyTorch's own bf16 is from the fp32 truth on our Hugging Face fixtures.

Usage: python3 bench/hf_fixture_bf16.py [FIXTURES_DIR]      (default tests/fixtures/hf; a GPU)

For each tiny model of tests/fixtures/hf (tests/hf_fixtures.py wrote them with transformers in
fp32 on the CPU), runs transformers' Qwen3ForCausalLM in bf16 on the GPU (weights cast to bf16,
SDPA attention, the loss of the bf16 logits in fp32) on the same input_ids, and prints what
`test_hf_fixtures cuda-bf16` measures for our bf16 mode: the largest per-position NLL difference
from the fp32 reference, and the largest relative L2 error of a parameter gradient. Our bf16
mode's tolerances are set from these numbers (tests/unit/test_hf_fixtures.c).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM


def one(case_dir):
    with open(os.path.join(case_dir, "config.json")) as f:
        cfg = Qwen3Config(**json.load(f))
    model = Qwen3ForCausalLM(cfg)
    state = load_file(os.path.join(case_dir, "model.safetensors"))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(device="cuda", dtype=torch.bfloat16)
    exp = load_file(os.path.join(case_dir, "expected.safetensors"))
    ids = exp["input_ids"].long().cuda()
    logits = model(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)
    nll.mean().backward()
    nll_err = (nll.detach().cpu() - exp["nll"]).abs().max().item()
    grad_err, worst = 0.0, ""
    for name, p in model.named_parameters():
        ref = exp.get("grad." + name)
        if ref is None or p.grad is None:
            continue
        g = p.grad.float().cpu()
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if rel > grad_err:
            grad_err, worst = rel, name
    return nll_err, grad_err, worst


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf"
    torch.manual_seed(0)
    worst_nll = worst_grad = 0.0
    for case in sorted(os.listdir(root)):
        d = os.path.join(root, case)
        if not os.path.isdir(d):
            continue
        nll_err, grad_err, name = one(d)
        worst_nll, worst_grad = max(worst_nll, nll_err), max(worst_grad, grad_err)
        print(f"RESULT system=torch-bf16-fixture case={case} max_nll_diff={nll_err:.4g} "
              f"max_grad_rel={grad_err:.4g} worst_grad={name}", flush=True)
    print(f"torch bf16 on the fixtures: NLL within {worst_nll:.4g}, gradients within "
          f"{worst_grad:.4g} relative of the fp32 reference")


if __name__ == "__main__":
    main()
