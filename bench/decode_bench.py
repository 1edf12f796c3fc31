#!/usr/bin/env python3
"""Decode speed at Qwen3-4B's shape, ours beside Hugging Face, on the same weights and prompts.

    python3 bench/decode_bench.py torch --hf-dir DIR [--batches 1,8] [--compile] [--budget 300]
    python3 bench/decode_bench.py ours  --hf-dir DIR [--batches 1,8] [--timing]
    python3 bench/decode_bench.py ours  --layers N [--batches 1,8] [--timing]

torch: a random-init Qwen3ForCausalLM (torch_train_bench.build_model, seed 1) in bf16 with SDPA,
saved to DIR/model.safetensors for ours, and the prompts (PROMPT_LEN random ids each, seed 1) to
DIR/prompts.json. Then `generate` (greedy, exactly NEW tokens: min_new_tokens, no EOS) for each
batch size: transformers' dynamic KV cache in eager mode, and with --compile its static cache
with the forward under torch.compile(mode="reduce-overhead") (CUDA graphs: the strongest way to
run transformers' decode), compile time reported apart.
ours: an evaluation run (train.steps 0) of jobs/bench_4b.txtpb with init.hf_dir DIR and the
same prompts, greedy, NEW tokens, the KV cache on; tok/s from its eval.jsonl. With --layers N
instead: N decoder layers of that width from the job's own random init, and prompts of random
ids (seed 1): a quick profile (--timing) without PyTorch.

  prefill tok/s = B * PROMPT_LEN / prefill seconds (torch: one forward of the batch's prompts)
  decode tok/s  = B * (NEW - 1) / seconds after the first new token (aggregate over the batch)
Every result is one `RESULT system=... batch=B ...` line (bench_common.result).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHAPE, WORK, make_log, result  # noqa: E402

PROMPT_LEN, NEW = 64, 128


def torch_mode(args, log):
    import torch
    from torch_train_bench import build_model, save_safetensors
    model, config, _ = build_model(torch, SHAPE["layers"], 4096, seed=1)
    model.eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    save_safetensors(torch, model, config, args.hf_dir)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, SHAPE["vocab"], (max(args.batches), PROMPT_LEN), generator=g)
    with open(os.path.join(args.hf_dir, "prompts.json"), "w") as f:
        json.dump(prompts.tolist(), f)
    log(f"weights and prompts in {args.hf_dir}")

    def run(label, B, **kw):
        ids = prompts[:B].cuda()
        mask = torch.ones_like(ids)
        gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                   attention_mask=mask, **kw)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, **dict(gen, max_new_tokens=4, min_new_tokens=4))   # warm-up
            torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            model(ids, attention_mask=mask)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, **gen)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
        assert out.shape[1] == PROMPT_LEN + NEW, out.shape
        log(f"{label} batch {B}: warm-up {warm:.1f} s, prefill {prefill * 1e3:.1f} ms, "
            f"{NEW} tokens in {total:.2f} s")
        if total <= 2 * prefill:   # the lone forward compiled a new shape (session 18: 46.7 s)
            result(system=label, batch=B, status="prefill_not_warm")
            return
        decode = B * (NEW - 1) / (total - prefill)
        result(system=label, batch=B, prefill_tok_s=B * PROMPT_LEN / prefill,
               decode_tok_s=decode, ms_per_token=1e3 * B / decode,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)

    for B in args.batches:
        run("hf-eager", B)
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        for B in args.batches:
            if time.perf_counter() - START > args.budget:
                result(system="hf-static-compile", batch=B, status="skipped")
                continue
            run("hf-static-compile", B, cache_implementation="static")


def ours_mode(args, log):
    # the job must name a training shard that exists, though an evaluation of prompts reads none
    from ours_train_bench import make_shard
    make_shard(args.shard, 2 * 1024 * 1024)
    if args.layers:
        rng = random.Random(1)
        prompts = [[rng.randrange(SHAPE["vocab"]) for _ in range(PROMPT_LEN)]
                   for _ in range(max(args.batches))]
        weights = ["--set", f"model.num_layers={args.layers}"]
    else:
        with open(os.path.join(args.hf_dir, "prompts.json")) as f:
            prompts = json.load(f)
        weights = ["--set", f"init.hf_dir={args.hf_dir}"]
    work = os.path.join(args.work, "decode")
    os.makedirs(work, exist_ok=True)
    for B in args.batches:
        text = "eval { " + " ".join("prompts { ids: [%s] }" % ", ".join(map(str, p))
                                    for p in prompts[:B])
        text += f" max_new_tokens: {NEW} temperature: 0 kv_cache: true check_kv: false }}\n"
        part = os.path.join(work, f"eval_{B}.pb")
        with open(part, "wb") as f:
            f.write(subprocess.run(["protoc", "--encode=qwen3.Job", "-Iproto", "proto/job.proto"],
                                   input=text.encode(), capture_output=True, check=True,
                                   cwd=ROOT).stdout)
        job = os.path.join(work, f"job_{B}.pb")
        with open(job, "wb") as f, open(os.path.join(ROOT, "build/jobs/bench_4b.pb"), "rb") as a:
            f.write(a.read() + open(part, "rb").read())   # the second message's fields win
        out = os.path.join(work, f"out_{B}")
        cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-np", "1",
               os.path.join(ROOT, "build/qwen3-train"), job, "--set", "train.steps=0",
               "--set", f"output_dir={out}", "--set", f"data.train={args.shard}"] + weights + \
              [a for kv in args.set for a in ("--set", kv)] + (["--timing"] if args.timing else [])
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        log(f"batch {B}: exit {p.returncode} in {time.perf_counter() - t0:.1f} s")
        lines = (p.stdout + p.stderr).splitlines()
        if args.timing or p.returncode:
            print("\n".join(lines[-40:]))
        if p.returncode:
            result(system="ours", batch=B, status=f"exit_{p.returncode}")
            continue
        rows = [json.loads(x) for x in open(os.path.join(out, "eval.jsonl"))]
        rows = [r for r in rows if "decode_tokens_per_s" in r][-B:]
        # each prompt's decode window spans the others' (the prompts take turns): aggregate over
        # the longest window
        window = max((len(r["completion_ids"]) - 1) / r["decode_tokens_per_s"] for r in rows)
        tokens = sum(len(r["completion_ids"]) - 1 for r in rows)
        prefill = sum(r["prefill_tokens_per_s"] for r in rows) / len(rows)
        system = "ours" + (f"-{args.layers}layers" if args.layers else "") + \
            ("-timing" if args.timing else "") + args.tag
        result(system=system, batch=B, prefill_tok_s=prefill,
               decode_tok_s=tokens / window, ms_per_token=1e3 * window / tokens * B)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["torch", "ours"])
    ap.add_argument("--hf-dir", default=os.path.join(WORK, "hf4b"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--timing", action="store_true", help="ours: per-stage times (slower)")
    ap.add_argument("--layers", type=int, default=0, help="ours: this many layers, random init")
    ap.add_argument("--tag", default="", help="ours: appended to the system's name")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="ours: one more --set for the job (repeatable)")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--shard", default=os.path.join(WORK, "random_2m.h5"))
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    log = make_log("torch" if args.mode == "torch" else "ours ")
    (torch_mode if args.mode == "torch" else ours_mode)(args, log)


START = time.perf_counter()
if __name__ == "__main__":
    main()
