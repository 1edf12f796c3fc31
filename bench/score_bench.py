#!/usr/bin/env python3
"""Evaluation scoring at Qwen3-4B's shape, both systems on one GPU (issue "GPU speed", goal 4):

    python3 bench/score_bench.py torch --hf-dir DIR [--mbs 1,4] [--T 2048] [--batches 32]
    python3 bench/score_bench.py ours  --hf-dir DIR [--mbs 1,4] [--T 2048] [--batches 32]

torch: builds the random-init 4B model (torch_train_bench.build_model, seed 1), saves it in DIR
for ours, then scores `batches` micro-batches of mb random sequences of T tokens the way a
harness does: the forward and every token's NLL (cross-entropy, reduction none) in bf16 with
SDPA under torch.inference_mode. One micro-batch first as a warm-up, left out of the time.

ours: an evaluation run (train.steps 0) of build/jobs/bench_4b.pb from DIR's weights
(init.hf_dir) over the random token shard as data.valid, eval.valid_batches = batches of mb
windows of T + 1 tokens: the forward and scores.jsonl. tok/s is metrics.jsonl's
val_tokens_per_s (every position through the model, over the whole validation, its first
micro-batch included).

Each system's line: RESULT system=... mb=... tok_s=... fwd_mfu=..., where
fwd_mfu = tok/s x (2 N + 2 L T heads head_dim) / 989e12 is a third of the training MFU
convention's FLOPs per token, so it reads against a training run's MFU (bench/gpu_bench.sh):
scoring at training-forward speed is fwd_mfu at least the training step's MFU.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import PEAK_FLOPS, SHAPE, WORK, make_log, result  # noqa: E402

N_PARAMS = 4_022_468_096   # Qwen3-4B's shape with tied embeddings (ours_train_bench.py)


def fwd_mfu(tok_s, T):
    s = SHAPE
    flops = 2.0 * N_PARAMS + 2.0 * s["layers"] * T * s["heads"] * s["head_dim"]
    return tok_s * flops / PEAK_FLOPS


def torch_mode(args, log):
    import torch
    from torch_train_bench import build_model, save_safetensors
    model, config, _ = build_model(torch, SHAPE["layers"], args.T, seed=1)
    model.eval()
    save_safetensors(torch, model, config, args.hf_dir)
    log(f"weights in {args.hf_dir}")
    g = torch.Generator().manual_seed(2)
    for mb in args.mbs:
        ids = torch.randint(0, SHAPE["vocab"], (args.batches + 1, mb, args.T + 1), generator=g)
        ids = ids.cuda()
        with torch.inference_mode():
            for i in range(args.batches + 1):
                if i == 1:   # the first micro-batch warms up
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                logits = model(ids[i, :, :-1]).logits
                nll = torch.nn.functional.cross_entropy(
                    logits.float().view(-1, logits.shape[-1]), ids[i, :, 1:].reshape(-1),
                    reduction="none")
                del logits, nll
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        tok_s = args.batches * mb * args.T / seconds
        log(f"hf-eager mb {mb}: {args.batches} micro-batches in {seconds:.2f} s")
        result(system="hf-eager", mb=mb, T=args.T, tok_s=tok_s, fwd_mfu=fwd_mfu(tok_s, args.T),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()


def ours_mode(args, log):
    for mb in args.mbs:
        out = os.path.join(args.work, f"score_{mb}")
        cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-np", "1",
               os.path.join(ROOT, "build/qwen3-train"), os.path.join(ROOT, "build/jobs/bench_4b.pb"),
               "--set", "train.steps=0", "--set", f"output_dir={out}",
               "--set", f"init.hf_dir={args.hf_dir}", "--set", f"data.train={args.shard}",
               "--set", f"data.valid={args.shard}", "--set", f"eval.valid_batches={args.batches}",
               "--set", f"data.micro_batch_size={mb}", "--set", f"data.seq_len={args.T}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        log(f"ours mb {mb}: exit {p.returncode} in {time.perf_counter() - t0:.1f} s")
        lines = (p.stdout + p.stderr).splitlines()
        print("\n".join(l for l in lines if "validation" in l or "error" in l.lower())[-2000:])
        if p.returncode:
            print("\n".join(lines[-20:]))
            result(system="ours", mb=mb, T=args.T, status=f"exit_{p.returncode}")
            continue
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        tok_s = [r["val_tokens_per_s"] for r in rows if "val_tokens_per_s" in r][-1]
        result(system="ours", mb=mb, T=args.T, tok_s=tok_s, fwd_mfu=fwd_mfu(tok_s, args.T))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["torch", "ours"])
    ap.add_argument("--hf-dir", default=os.path.join(WORK, "hf4b_score"))
    ap.add_argument("--mbs", default="1,4")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--shard", default=os.path.join(WORK, "random_2m.h5"))
    args = ap.parse_args()
    args.mbs = [int(b) for b in args.mbs.split(",")]
    log = make_log(args.mode)
    (torch_mode if args.mode == "torch" else ours_mode)(args, log)


if __name__ == "__main__":
    main()
