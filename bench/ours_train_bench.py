#!/usr/bin/env python3
"""Our trainer's half of the GPU benchmark: Qwen3-4B-shaped training steps on one GPU.

    python3 bench/ours_train_bench.py shard [--out /tmp/qwen3_bench/random_2m.h5] [--tokens N]
    python3 bench/ours_train_bench.py train --mb 1 --accum 1 [--T 2048] [--budget 60]
            [--init-hf DIR] [--label ours] [--warmup 2] [--steps 3] [--np 1 --pp 1 --zero 0]

shard: ~2M random token ids in [0, 151936), written as text ids and turned into a plain token
shard by the project's own `build/qwen3-prep build --format ids --vocab-size 151936` (no
tokenizer; one token stream cut into windows of seq_len + 1).

train: runs `mpirun -np 1 build/qwen3-train build/jobs/bench_4b.pb --set ...` (the job is
jobs/bench_4b.txtpb: backend CUDA, the 4B shape, optimizer defaults), one optimizer step =
`accum` micro-batches (parallel.micro_batches) of `mb` sequences (data.micro_batch_size) of T
tokens. It reads output_dir/metrics.jsonl as the steps come (tokens_per_s and step_seconds
per step), skips the first `warmup` steps and reports the median of the next `steps`. GPU memory
is nvidia-smi's memory.used, sampled every 0.5 s while it runs (the CUDA context included).
With --np N (one process per GPU) the job runs as --pp stages x N/pp replicas (ZeRO-1 with
--zero 1); a step is then N/pp times as many sequences, and memory is GPU 0's (rank 0's).

The job never checkpoints (checkpoint.every -1), but SIGTERM would make it save (4B fp32 weights
and moments, ~48 GB). So the job is given more steps than are timed and is ended with SIGKILL,
by process id, once the timed steps are in the log (or the budget is spent).

With --init-hf DIR (a model.safetensors that torch_train_bench.py --save-hf wrote) the weights
come from there: the job's own random init draws 4B normals on one host thread, 1-2 minutes.

  tokens/s   = dp * mb * accum * T / median step seconds   (the trainer's tokens_per_s)
  per GPU    = tokens/s / np
  MFU        = tokens/s per GPU * (6 N + 6 L T heads head_dim) / 989e12, N = 4,022,468,096
  alloc      = the trainer's device_peak_mib (what it allocated: comparable with torch's
               max_memory_allocated, which leaves out the CUDA context and the cache)
  over-state = peak - 16 N bytes (fp32 weights, gradients and both AdamW moments), less 2 N more
               in the bf16 mode (QWEN3_CUDA_PRECISION unset or bf16: the weight copy)
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import PEAK_FLOPS, SHAPE, T0, make_log, result  # noqa: E402
from bench_common import flops_per_token as flops_of  # noqa: E402

log = make_log("ours ")


def n_params(s=SHAPE):
    h, hd = s["hidden"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * s["ffn"] + 2 * h + 2 * hd
    return s["layers"] * layer + s["vocab"] * h + h   # tied head; final norm


def flops_per_token(T, s=SHAPE):
    return flops_of(n_params(s), s["layers"], T, s["heads"], s["head_dim"])


# ---- the token shard -----------------------------------------------------------------------

def make_shard(out, tokens, build="build", seed=1, doc_len=32768):
    if os.path.exists(out):
        log(f"shard {out} already there")
        return
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    ids_path = out + ".ids.txt"
    rng = random.Random(seed)
    V = SHAPE["vocab"]
    with open(ids_path, "w") as f:
        left = tokens
        while left > 0:
            n = min(doc_len, left)
            f.write(" ".join(str(rng.randrange(V)) for _ in range(n)))
            f.write("\n")
            left -= n
    cmd = [os.path.join(ROOT, build, "qwen3-prep"), "build", "--format", "ids", "--vocab-size",
           str(V), "--quiet", "--out", out, ids_path]
    subprocess.run(cmd, check=True)
    os.remove(ids_path)
    log(f"shard {out}: {tokens} random tokens in [0, {V})")


# ---- one training run ----------------------------------------------------------------------

def gpu_used_mib():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                            "-i", "0"], capture_output=True, text=True, timeout=5)
        return float(r.stdout.split()[0])
    except Exception:
        return float("nan")


def descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_run(proc):
    """SIGKILL, never SIGTERM (that would make the trainer write a 48 GB checkpoint): the
    ranks first, by id, then mpirun and whatever is left of its process group."""
    if proc.poll() is not None:
        return
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # the session started for it: only its processes
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log("mpirun did not end after SIGKILL")


def metrics_lines(path):
    """The JSON objects of a run's metrics.jsonl: none while it is missing, a line being written
    (or cut short by a kill) skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def read_steps(path):
    return [o for o in metrics_lines(path) if "step_seconds" in o and "tokens_per_s" in o]


def watch(proc, metrics, want, warmup, deadline, base):
    """Samples GPU memory and the metrics every 0.5 s until `want` steps are logged, the run
    ends, or the deadline (or SIGTERM) comes. Returns (how it ended, peak MiB, when the first
    step appeared)."""
    peak, first_line_at = base, None   # NaN while nvidia-smi has answered nothing
    try:
        while True:
            used = gpu_used_mib()
            if used == used:
                peak = used if peak != peak else max(peak, used)
            steps = read_steps(metrics)
            if steps and first_line_at is None:
                first_line_at = time.perf_counter()
            if len(steps) >= want:
                return "done", peak, first_line_at
            if proc.poll() is not None:
                return f"exited rc={proc.returncode}", peak, first_line_at
            # stop when the next step would not end in time and a timed step is in
            if len(steps) > warmup and \
                    time.perf_counter() + max(s["step_seconds"] for s in steps) > deadline:
                return "budget", peak, first_line_at
            if time.perf_counter() > deadline:
                return "budget", peak, first_line_at
            time.sleep(0.5)
    except KeyboardInterrupt:
        return "terminated", peak, first_line_at


def train(args):
    mb, accum, T = args.mb, args.accum, args.T
    warmup = args.warmup if args.warmup is not None else (2 if accum == 1 else 1)
    timed = args.steps if args.steps is not None else (3 if accum == 1 else 2)
    if args.np % args.pp:
        sys.exit(f"--np {args.np} is not a multiple of --pp {args.pp}")
    dp = args.np // args.pp
    tag = dict(system=args.label, mb=mb, T=T, accum=accum)
    if args.np > 1:
        tag.update(np=args.np, pp=args.pp, dp=dp, zero=args.zero)
    layout = f"_np{args.np}pp{args.pp}z{args.zero}" if args.np > 1 else ""
    out_dir = os.path.join(args.work, f"out_{args.label}_mb{mb}_acc{accum}_T{T}{layout}")
    subprocess.run(["rm", "-rf", out_dir], check=False)
    os.makedirs(out_dir)
    sets = {
        "output_dir": out_dir,
        "data.train": args.shard,
        "data.seq_len": T,
        "data.micro_batch_size": mb,
        "parallel.micro_batches": accum,
        "train.steps": warmup + timed + 50,   # never reached: no final checkpoint
        "train.log_every": 1,
        "checkpoint.dir": os.path.join(out_dir, "ckpt"),
        "checkpoint.resume": "NEVER",
        "parallel.pipeline_stages": args.pp,
        "parallel.zero": args.zero,
    }
    init = "random (job init, host side)"
    if args.init_hf and os.path.exists(os.path.join(args.init_hf, "model.safetensors")):
        sets["init.hf_dir"] = args.init_hf
        init = args.init_hf
    job = args.job or os.path.join(args.build, "jobs/bench_4b.pb")
    # --bind-to none: Open MPI would pin a lone rank to one core, which its host-side work
    # (weight loading, data) and the sampling here would share
    cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-np", str(args.np),
           os.path.join(ROOT, args.build, "qwen3-train"), os.path.join(ROOT, job)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    cmd += args.extra
    log(f"{args.label} mb={mb} accum={accum} T={T}: {warmup} warm-up + {timed} timed steps, "
        f"budget {args.budget:.0f} s, init {init}")
    log("  " + " ".join(cmd))
    base = gpu_used_mib()
    log_path = os.path.join(out_dir, "trainer.log")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = T0 + args.budget
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT)
        launched = time.perf_counter()

        def on_term(signum, frame):   # the outer `timeout`: report what there is, then go
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        try:
            ended, peak, first_line_at = watch(proc, metrics, warmup + timed, warmup, deadline, base)
        finally:
            kill_run(proc)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    steps = read_steps(metrics)
    rc = report(tag, steps, warmup, timed, peak, launched, first_line_at, ended, log_path, dp,
                args.np)
    # the GPU memory must be given back before the next run measures its own
    for _ in range(20):
        used = gpu_used_mib()
        if used != used or used < base + 1024:   # NaN: no nvidia-smi
            break
        time.sleep(0.5)
    return rc


def report(tag, steps, warmup, timed, peak, launched, first_line_at, ended, log_path, dp=1, np=1):
    mb, accum, T = tag["mb"], tag["accum"], tag["T"]
    if not steps:
        log(f"  no step logged ({ended}); the trainer's last lines:")
        with open(log_path, errors="replace") as f:
            lines = [l.rstrip() for l in f]
        own = [l for l in lines if l.startswith("qwen3")]   # its own messages, not MPI's
        for line in (own or lines)[-15:]:
            print("    " + line, flush=True)
        result(**tag, status="failed" if ended.startswith("exited") else "timeout",
               startup_s=time.perf_counter() - launched)
        return 1
    for s in steps:
        log(f"  step {s['step']}: {s['step_seconds']:.3f} s, {s['tokens_per_s']:.0f} tok/s, "
            f"loss {s.get('loss', float('nan')):.4f}")
    timed_steps = [s for s in steps if s["step"] > warmup][:timed]
    partial = 0
    if not timed_steps:
        timed_steps, partial = steps[-1:], 1
    med = statistics.median(s["step_seconds"] for s in timed_steps)
    tok_s = dp * mb * accum * T / med
    n = n_params()
    bf16 = os.environ.get("QWEN3_CUDA_PRECISION", "bf16") in ("", "bf16")
    state = (18.0 if bf16 else 16.0) * n
    peak_b = peak * 2**20
    startup = (first_line_at - launched - steps[0]["step_seconds"]) if first_line_at else float("nan")
    # the trainer's own count of what it allocated: like torch.cuda.max_memory_allocated, no
    # CUDA context and no allocator cache
    alloc_b = max(s.get("device_peak_mib", float("nan")) for s in steps) * 2**20
    result(**tag, tok_s=tok_s, tok_s_gpu=tok_s / np, mfu=tok_s / np * flops_per_token(T) / PEAK_FLOPS,
           peak_gib=peak_b / 2**30, over_state_gib=(peak_b - state) / 2**30,
           alloc_peak_gib=alloc_b / 2**30, over_state_alloc_gib=(alloc_b - state) / 2**30,
           state_gib=state / 2**30, step_s=med, steps=len(timed_steps),
           warmup_s=sum(s["step_seconds"] for s in steps[:warmup]),
           first_step_s=steps[0]["step_seconds"], startup_s=startup, n_params=n,
           peak_source="nvidia-smi", partial=partial, ended=ended.replace(" ", "_"))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("shard")
    sh.add_argument("--out", default="/tmp/qwen3_bench/random_2m.h5")
    sh.add_argument("--tokens", type=int, default=2 * 1024 * 1024)
    tr = sub.add_parser("train")
    tr.add_argument("--mb", type=int, default=1)
    tr.add_argument("--accum", type=int, default=1)
    tr.add_argument("--T", type=int, default=2048)
    tr.add_argument("--budget", type=float, default=60, help="seconds from start to the kill")
    tr.add_argument("--warmup", type=int, default=None, help="default 2 (accum 1) or 1")
    tr.add_argument("--steps", type=int, default=None, help="timed steps, default 3 (accum 1) or 2")
    tr.add_argument("--shard", default="/tmp/qwen3_bench/random_2m.h5")
    tr.add_argument("--init-hf", default="", help="a folder with model.safetensors")
    tr.add_argument("--job", default="", help="default BUILD/jobs/bench_4b.pb")
    tr.add_argument("--work", default="/tmp/qwen3_bench")
    tr.add_argument("--label", default="ours")
    tr.add_argument("--np", type=int, default=1, help="processes, one per GPU")
    tr.add_argument("--pp", type=int, default=1, help="pipeline stages (np / pp replicas)")
    tr.add_argument("--zero", type=int, default=0, choices=[0, 1], help="ZeRO-1 across replicas")
    tr.add_argument("extra", nargs="*", help="more trainer arguments, after --")
    for p in (sh, tr):
        p.add_argument("--build", default="build", help="the build folder (repository-relative)")
    args = ap.parse_args()
    if args.cmd == "shard":
        make_shard(args.out, args.tokens, args.build)
        return 0
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
