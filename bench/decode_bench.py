#!/usr/bin/env python3
"""Decode speed at Qwen3-4B's shape, ours beside Hugging Face, on the same weights and prompts.

    python3 bench/decode_bench.py torch --hf-dir DIR [--batches 1,8] [--compile] [--budget 300]
    python3 bench/decode_bench.py ours  --hf-dir DIR [--batches 1,8] [--timing]
    python3 bench/decode_bench.py ours  --layers N [--batches 1,8] [--timing] [--new 1024]

torch: a random-init Qwen3ForCausalLM (torch_train_bench.build_model, seed 1) in bf16 with SDPA,
saved to DIR/model.safetensors for ours, and the prompts (PROMPT_LEN random ids each, seed 1) to
DIR/prompts.json. Then `generate` (greedy, exactly n new tokens: min_new_tokens, no EOS) for each
batch size: transformers' dynamic KV cache in eager mode (hf-eager), and with --compile
(hf-static-compile) its static cache, generation_config.cache_implementation "static", with the
decoding steps under torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs: the
strongest way to run transformers' decode; transformers' "Optimizing inference" guide, llm_optims):
generate's own compilation through generation_config.compile_config (a CompileConfig; the prefill
stays eager) where transformers has CompileConfig, else model.forward compiled. Warm-ups before
the timed calls: NEW then 4 new tokens, once eager, twice compiled (every shape compiled, its CUDA
graphs recorded); compile_s is the compiled warm-up's seconds.
ours: an evaluation run (train.steps 0) of jobs/bench_4b.txtpb with init.hf_dir DIR and the
same prompts, greedy, NEW tokens (--new: another count, up to the job's 2048 positions less the
prompt: a long generation, whose KV cache has room for all of it from the first step), the KV
cache on; tok/s from its eval.jsonl. With --layers N instead: N decoder layers of that width
from the job's own random init, and prompts of random ids (seed 1): a quick profile (--timing)
without PyTorch.

  torch: t_n = one timed generate of n new tokens (the prefill, n - 1 decoding steps, setup)
  decode tok/s  = B * (NEW - 4) / (t_NEW - t_4): the prefill and generate's setup cancel
  prefill tok/s = B * PROMPT_LEN / (t_4 - 3 steps): an approximation (generate's setup inside)
  ours:
  prefill tok/s = B * PROMPT_LEN / prefill seconds
  decode tok/s  = B * (NEW - 1) / seconds after the first new token (aggregate over the batch)
A torch row without a rate has status=: timed_not_warm (a timed call 1.5x its last warm-up: a
shape compiled inside it), lengths_not_apart (t_NEW <= t_4 or t_4 > t_NEW / 2), not_compiled
(--compile, yet dynamo has made no graph), out_of_memory, compile_failed (it
raised; the first line is logged), skipped (--budget seconds spent before the batch's compiled
run).
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
    import transformers
    from torch_train_bench import build_model, save_safetensors
    model, config, _ = build_model(torch, SHAPE["layers"], 4096, seed=1)
    model.eval()
    # build_model's config is a training one (use_cache=False) and generation_config copied it when
    # the model was made: generate then kept no KV cache at all and called cache_implementation
    # "not valid" (session 18)
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.generation_config.pad_token_id = 0
    save_safetensors(torch, model, config, args.hf_dir)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, SHAPE["vocab"], (max(args.batches), PROMPT_LEN), generator=g)
    with open(os.path.join(args.hf_dir, "prompts.json"), "w") as f:
        json.dump(prompts.tolist(), f)
    log(f"weights and prompts in {args.hf_dir}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}")

    def generate(B, new):
        ids = prompts[:B].cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=None)
        torch.cuda.synchronize()
        assert out.shape[1] == PROMPT_LEN + new, out.shape
        return time.perf_counter() - t0

    def dynamo_graphs():
        try:
            from torch._dynamo.utils import counters
        except ImportError:   # a private module: None where this torch lacks it
            return None
        return counters["stats"]["unique_graphs"]   # a Counter: 0 before any graph

    def run(label, B, rounds):
        torch.cuda.reset_peak_memory_stats()
        # NEW first: a static cache made for NEW tokens serves the 4-token calls too, where a longer
        # call after a shorter one would make a new cache and compile again
        t0 = time.perf_counter()
        warm = {}
        for _ in range(rounds):
            for new in (NEW, 4):
                warm[new] = generate(B, new)
        warm_s = time.perf_counter() - t0
        t4, tn = generate(B, 4), generate(B, NEW)
        log(f"{label} batch {B}: warm-up {warm_s:.1f} s (last: 4 tokens {warm[4]:.2f} s, {NEW} "
            f"{warm[NEW]:.2f} s), timed: 4 tokens {t4:.2f} s, {NEW} {tn:.2f} s")
        extra = {"compile_s": warm_s} if rounds > 1 else {}
        status = None
        if t4 > 1.5 * warm[4] or tn > 1.5 * warm[NEW]:   # a shape compiled inside a timed call
            status = "timed_not_warm"
        elif tn <= t4 or t4 > 0.5 * tn:   # the lengths' difference is not decoding
            status = "lengths_not_apart"
        elif rounds > 1 and dynamo_graphs() == 0:   # no graph yet (a later batch may reuse
            status = "not_compiled"                  # one): generate ran the static cache eager
        if status:
            result(system=label, batch=B, status=status, **extra)
            return
        step = (tn - t4) / (NEW - 4)
        prefill = t4 - 3 * step   # the 4-token call less its 3 decoding steps
        if prefill > 0:
            extra["prefill_tok_s"] = B * PROMPT_LEN / prefill
        result(system=label, batch=B, decode_tok_s=B / step, ms_per_token=1e3 * step,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, **extra)

    for B in args.batches:
        run("hf-eager", B, rounds=1)
    if not args.compile:
        return
    model.generation_config.cache_implementation = "static"
    try:
        # generate compiles the decoding steps itself when the cache is static (the prefill stays
        # eager); wrapping model.forward too would compile it twice
        from transformers import CompileConfig
        model.generation_config.compile_config = CompileConfig(fullgraph=True,
                                                               mode="reduce-overhead")
        log("compile: generate's own, generation_config.compile_config "
            "(fullgraph, reduce-overhead)")
    except ImportError:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        log("compile: model.forward under torch.compile (fullgraph, reduce-overhead); "
            "this transformers has no CompileConfig")
    for B in args.batches:
        if time.perf_counter() - START > args.budget:
            result(system="hf-static-compile", batch=B, status="skipped")
            continue
        try:
            run("hf-static-compile", B, rounds=2)
        except torch.cuda.OutOfMemoryError:
            log(f"hf-static-compile batch {B}: out of GPU memory")
            result(system="hf-static-compile", batch=B, status="out_of_memory")
        except Exception as e:   # the eager rows stand; so does the next batch size
            first = (str(e).strip().splitlines() or [""])[0]
            log(f"hf-static-compile batch {B}: {type(e).__name__}: {first}")
            result(system="hf-static-compile", batch=B, status="compile_failed")
        log(f"dynamo graphs so far: {dynamo_graphs()}")


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
        text += f" max_new_tokens: {args.new} temperature: 0 kv_cache: true check_kv: false }}\n"
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
        system = "ours" + (f"-{args.layers}layers" if args.layers else "") + \
            ("-timing" if args.timing else "") + (f"-new{args.new}" if args.new != NEW else "") + \
            args.tag
        if p.returncode:
            result(system=system, batch=B, status=f"exit_{p.returncode}")
            continue
        rows = [json.loads(x) for x in open(os.path.join(out, "eval.jsonl"))]
        rows = [r for r in rows if "decode_tokens_per_s" in r][-B:]
        # each prompt's decode window spans the others' (the prompts take turns): aggregate over
        # the longest window
        window = max((len(r["completion_ids"]) - 1) / r["decode_tokens_per_s"] for r in rows)
        tokens = sum(len(r["completion_ids"]) - 1 for r in rows)
        prefill = sum(r["prefill_tokens_per_s"] for r in rows) / len(rows)
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
    ap.add_argument("--new", type=int, default=NEW,
                    help=f"ours: new tokens a prompt (default {NEW}; not the default: -newN in "
                    "the system's name)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="ours: one more --set for the job (repeatable)")
    ap.add_argument("--budget", type=float, default=300,
                    help="torch --compile: seconds after which a batch's compiled run is skipped")
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--shard", default=os.path.join(WORK, "random_2m.h5"))
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.mode == "torch" and args.new != NEW:
        ap.error("--new is for ours (torch's generate takes NEW and 4 new tokens)")
    if not 2 <= args.new <= 2048 - PROMPT_LEN:   # 2048: bench_4b's positions (data.seq_len)
        ap.error(f"--new {args.new}: 2 .. {2048 - PROMPT_LEN} new tokens (a rate needs two; "
                 "bench_4b's 2048 positions less the prompt)")
    log = make_log("torch" if args.mode == "torch" else "ours ")
    (torch_mode if args.mode == "torch" else ours_mode)(args, log)


START = time.perf_counter()
if __name__ == "__main__":
    main()
