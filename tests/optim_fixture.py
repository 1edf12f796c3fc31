#!/usr/bin/env python3
"""torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and a LambdaLR schedule on a small Qwen3's
parameter set, written as the fixture that tests/unit/test_optim.c checks trainer/optim.c against:

    apt-get install -y python3-torch python3-numpy       # Debian's torch 1.13, for /usr/bin/python3
    /usr/bin/python3 tests/optim_fixture.py    # rewrites tests/fixtures/optim/adamw.safetensors

Nothing here comes from the C code: the schedule is the one proto/job.proto documents (linear
warmup over warmup_steps, then decay to min_lr reached at the last step, or constant), weight
decay follows the policy "matrices only" (the embedding is a matrix; norm weights are not) as two
torch parameter groups, and clipping is torch's own clip_grad_norm_ over every parameter.

No model runs: every step gets fixed random gradients, stored in the fixture, scaled so that the
global norm is above grad_clip on some steps (clipped) and below it on others.

The file is safetensors. Every parameter set is one flat F32 vector holding the tensors one
after another, in the order and shapes that __metadata__["params"] lists as JSON
([[name, [shape]], ...], Hugging Face names), which keeps the header small:
  init                             initial parameters (AdamW state starts at zero)
  grad.S                           gradients fed at step S (1-based), before clipping
  SCHED.lr, SCHED.grad_norm        F64 [steps]: lr used at each step, global norm before clipping
  SCHED.S.{param,exp_avg,exp_avg_sq}
                                   state after step S: every step for cosine, the last step for
                                   linear and constant (they share cosine's gradients)
The other __metadata__ values are the model shape, the hyperparameters and steps.SCHED.
"""
import json
import math
import os
import struct

import numpy as np
import torch

CONFIG = dict(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
              intermediate_size=24, vocab_size=32, tie_embeddings=1)
OPTIM = dict(lr=1e-2, min_lr=1e-3, warmup_steps=2, beta1=0.9, beta2=0.95, eps=1e-8,
             weight_decay=0.1, grad_clip=1.0)
# schedule -> steps of the run; cosine keeps the state of every step
RUNS = {"cosine": 6, "linear": 6, "constant": 4}
# the global gradient norm wanted at each step: above grad_clip = 1 on steps 2, 4 and 6 only
GRAD_NORMS = [0.6, 2.5, 0.4, 1.8, 0.7, 3.0]


def parameters():
    """(name, shape, is_matrix) of a one-stage worker of CONFIG, nn.Linear layout [out, in]."""
    c = CONFIG
    d, q, kv = c["hidden_size"], c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    f, hd = c["intermediate_size"], c["head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], d), True)]
    for l in range(c["num_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (d,), False),
                (p + "self_attn.q_proj.weight", (q, d), True),
                (p + "self_attn.k_proj.weight", (kv, d), True),
                (p + "self_attn.v_proj.weight", (kv, d), True),
                (p + "self_attn.q_norm.weight", (hd,), False),
                (p + "self_attn.k_norm.weight", (hd,), False),
                (p + "self_attn.o_proj.weight", (d, q), True),
                (p + "post_attention_layernorm.weight", (d,), False),
                (p + "mlp.gate_proj.weight", (f, d), True),
                (p + "mlp.up_proj.weight", (f, d), True),
                (p + "mlp.down_proj.weight", (d, f), True)]
    out.append(("model.norm.weight", (d,), False))
    return out


def lr_factor(schedule, total):
    """LambdaLR's factor for step index i (0-based; the optimizer step is i + 1)."""
    o = OPTIM
    lr, min_lr, warmup = o["lr"], o["min_lr"], o["warmup_steps"]

    def factor(i):
        step = i + 1
        if step <= warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        decay = total - warmup
        progress = (step - warmup - 1) / (decay - 1) if decay > 1 else 1.0
        if schedule == "linear":
            return (lr + (min_lr - lr) * progress) / lr
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr
    return factor


def make_data():
    rng = np.random.default_rng(20261130)
    init, grads = {}, []
    for name, shape, matrix in parameters():
        if matrix:
            init[name] = rng.normal(0, 0.02, shape).astype(np.float32)
        else:   # norm weights near 1, as after some training
            init[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    for target in GRAD_NORMS:
        g = {}
        for name, shape, _ in parameters():   # tensors of different sizes of gradient
            g[name] = (rng.standard_normal(shape) * rng.uniform(0.1, 2.0)).astype(np.float64)
        norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        grads.append({k: (v * (target / norm)).astype(np.float32) for k, v in g.items()})
    return init, grads


def flat(tensors):
    """One vector of the tensors in parameters() order."""
    return np.concatenate([tensors[n].ravel() for n, _, _ in parameters()]).astype(np.float32)


def run(schedule, steps, init, grads, out):
    params = {n: torch.nn.Parameter(torch.from_numpy(init[n].copy())) for n in init}
    o = OPTIM
    decay = [params[n] for n, _, matrix in parameters() if matrix]
    no_decay = [params[n] for n, _, matrix in parameters() if not matrix]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, steps))
    lrs, norms, clipped = [], [], []
    for s in range(1, steps + 1):
        for n, p in params.items():
            p.grad = torch.from_numpy(grads[s - 1][n].copy())
        lrs.append(opt.param_groups[0]["lr"])
        norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), o["grad_clip"]))
        norms.append(norm)
        clipped.append(norm > o["grad_clip"])
        opt.step()
        sched.step()
        if schedule == "cosine" or s == steps:
            out[f"{schedule}.{s}.param"] = flat({n: p.detach().numpy() for n, p in params.items()})
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{schedule}.{s}.{key}"] = flat({n: opt.state[p][key].numpy()
                                                     for n, p in params.items()})
    out[f"{schedule}.lr"] = np.array(lrs, dtype=np.float64)
    out[f"{schedule}.grad_norm"] = np.array(norms, dtype=np.float64)
    print(f"{schedule}: lr {' '.join(f'{x:.6g}' for x in lrs)}; clipped on steps "
          f"{[s + 1 for s, c in enumerate(clipped) if c]}")


def write_safetensors(path, tensors, metadata):
    header, blobs, at = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dtype, code = {np.float32: ("F32", "<f4"), np.float64: ("F64", "<f8")}[a.dtype.type]
        blob = a.astype(code).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    torch.set_num_threads(1)
    init, grads = make_data()
    out = {"init": flat(init)}
    for s, g in enumerate(grads, 1):
        out[f"grad.{s}"] = flat(g)
    for schedule, steps in RUNS.items():
        run(schedule, steps, init, grads, out)
    meta = {k: repr(v) for k, v in {**CONFIG, **OPTIM}.items()}
    meta.update({f"steps.{k}": str(v) for k, v in RUNS.items()})
    meta["params"] = json.dumps([[n, list(shape)] for n, shape, _ in parameters()])
    meta["generator"] = f"tests/optim_fixture.py, torch {torch.__version__}"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "optim")
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "adamw.safetensors")
    write_safetensors(path, out, meta)
    print(f"wrote {len(out)} tensors to {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
