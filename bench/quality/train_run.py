#!/usr/bin/env python3
"""One training run of the quality comparison, watched, with a hard deadline; and the plan.

    python3 bench/quality/train_run.py run --label bf16 --job JOB.pb --out DIR --budget S
            [--build build] [--ranks N] [--echo-every N] -- --set field=value ...
    python3 bench/quality/train_run.py plan --calib DIR1/summary.json --calib DIR2/summary.json
            --corpus CORPUS/corpus.json --seconds S [--per-run S] --evals E
            --calib-valid-batches B --mb M --accum A --seq T [--ranks N]

run: `mpirun -np N BUILD/qwen3-train JOB.pb --set output_dir=DIR ...` (N 1 by default; with one
pipeline stage, N ranks are N data-parallel replicas, one a GPU), the trainer's output in
DIR/trainer.log; its step lines (every --echo-every steps), validation lines and errors are
printed as they come, with the seconds since the start. Past --budget seconds the run is ended
with SIGKILL, by process id (SIGTERM would make every rank save a checkpoint first), and what it
logged is kept. DIR/summary.json: how it ended, the seconds of start-up (launch to the first
step's start: mpirun, the random init, the CUDA context), of each evaluation (its validation line
less the step line before it) and of the whole run, the steps done, the median step time and
tokens/s (the first 2 logged steps left out: kernel loading, GEMM algorithm choice).

plan: from short calibration runs (`run` with a few steps, log_every 1, and the end-of-run
evaluation cut to --calib-valid-batches batches), one per precision, the largest step count for
which both runs together fit --seconds (and each alone --per-run, when given):
  seconds >= sum over runs of (start-up + steps x step time + evals x evaluation time)
with the evaluation time scaled to the whole validation shard and 8% kept back; steps = evals x
eval_every, so that the last evaluation is at the last step. Prints `steps warmup eval_every
log_every label=predicted_seconds...`.
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from bench_common import T0, make_log  # noqa: E402
from ours_train_bench import kill_run, metrics_lines  # noqa: E402  (kill: SIGKILL of the ranks, then mpirun)

STEP = re.compile(r"\] step +(\d+)/(\d+) \|")
VALID = re.compile(r"\] validation at step (\d+): loss ([0-9.naif]+)")


def run(args):
    log = make_log(args.label)
    os.makedirs(args.out, exist_ok=True)
    metrics = os.path.join(args.out, "metrics.jsonl")
    for name in ("metrics.jsonl", "summary.json", "scores.jsonl"):   # an earlier run's
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-np", str(args.ranks),
           os.path.join(ROOT, args.build, "qwen3-train"), args.job, "--set", f"output_dir={args.out}"]
    cmd += [a for a in args.extra if a != "--"]
    log(" ".join(cmd))
    evals, last_step_line = [], None
    first_step_at = None
    deadline = T0 + args.budget
    ended = "done"
    launched = time.perf_counter()
    with open(os.path.join(args.out, "trainer.log"), "w") as lf:
        # a session of its own: kill_run ends its process group and nothing else
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=ROOT)
        # the deadline fires even while the trainer prints nothing (a hang, a long evaluation)
        def on_alarm(signum, frame):
            raise TimeoutError
        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(signal.SIGTERM, on_alarm)   # the outer `timeout`: keep what there is
        signal.setitimer(signal.ITIMER_REAL, max(0.1, deadline - time.perf_counter()))
        try:
            for line in proc.stdout:
                now = time.perf_counter()
                lf.write(line)
                lf.flush()
                m = STEP.search(line)
                if m:
                    step = int(m.group(1))
                    last_step_line = now
                    if first_step_at is None:
                        first_step_at = now
                    if step == 1 or step % args.echo_every == 0 or step == int(m.group(2)):
                        log(line.split("] ", 1)[-1].rstrip())
                    continue
                m = VALID.search(line)
                if m:
                    seconds = now - (last_step_line or now)
                    evals.append(dict(step=int(m.group(1)), seconds=seconds))
                    log(line.split("] ", 1)[-1].split(" (scores")[0].rstrip() +
                        f" [{seconds:.1f} s]")
                    continue
                if "error" in line.lower() or "invalid" in line.lower() or "warn" in line.lower():
                    log(line.rstrip())
            proc.wait()
            signal.setitimer(signal.ITIMER_REAL, 0)
            if proc.returncode != 0:
                ended = f"exit {proc.returncode}"
        except TimeoutError:
            ended = "deadline"
            log(f"past its budget of {args.budget:.0f} s: ending it (SIGKILL)")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            kill_run(proc)
    wall = time.perf_counter() - launched
    steps = [o for o in metrics_lines(metrics) if "step_seconds" in o]
    timed = steps[2:] or steps[-1:]
    first = steps[0]["step_seconds"] if steps else float("nan")
    summary = dict(
        label=args.label, ended=ended, wall_s=wall,
        startup_s=(first_step_at - launched - first) if first_step_at and steps else float("nan"),
        steps_done=steps[-1]["step"] if steps else 0,
        tokens_per_step=steps[0]["tokens"] if steps else float("nan"),
        step_s=statistics.median(s["step_seconds"] for s in timed) if timed else float("nan"),
        tok_s=statistics.median(s["tokens_per_s"] for s in timed) if timed else float("nan"),
        evals=evals)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not steps:
        log(f"no step logged ({ended}); the trainer's last lines:")
        with open(os.path.join(args.out, "trainer.log"), errors="replace") as f:
            for line in f.readlines()[-15:]:
                print("    " + line.rstrip(), flush=True)
        return 1
    log(f"{ended}: {summary['steps_done']} steps in {wall:.0f} s (start-up "
        f"{summary['startup_s']:.1f} s, {len(evals)} evaluations {sum(e['seconds'] for e in evals):.1f} s), "
        f"median step {summary['step_s']:.3f} s = {summary['tok_s']:.0f} tok/s")
    return 0 if ended == "done" else 1


def plan(args):
    with open(args.corpus) as f:
        corpus = json.load(f)
    # the evaluation scores windows of seq tokens of one document, mb at a time (the first
    # replica alone: the others wait)
    full_batches = math.ceil(math.ceil((corpus["valid"]["tokens"] - 1) / args.seq) / args.mb)
    runs = []   # (label, start-up s, step s, one whole evaluation s)
    for path in args.calib:
        with open(path) as f:
            cal = json.load(f)
        if not cal.get("steps_done") or not cal.get("evals") or not math.isfinite(cal["step_s"]):
            sys.exit(f"plan: the calibration run {path} logged no step or no evaluation")
        eval_s = cal["evals"][-1]["seconds"] * full_batches / min(args.calib_valid_batches, full_batches)
        runs.append((cal["label"], cal["startup_s"], cal["step_s"], eval_s))
    # steps for which every run fits --per-run, and all of them together fit --seconds
    fixed = lambda rs: sum(st + args.evals * ev for _, st, _, ev in rs)
    per_step = lambda rs: sum(s for _, _, s, _ in rs)
    most = int((args.seconds * 0.92 - fixed(runs)) / per_step(runs))
    if args.per_run:
        most = min([most] + [int((args.per_run * 0.92 - fixed([r])) / per_step([r])) for r in runs])
    log_every = 5 if most >= 20 * args.evals else 1
    every = (most // args.evals) // log_every * log_every
    described = "; ".join(f"{l}: start-up {st:.1f} s, step {s:.3f} s, evaluation {ev:.1f} s"
                          for l, st, s, ev in runs)
    if every < 1:
        sys.exit(f"plan: {args.seconds:.0f} s hold no run of {args.evals} evaluations ({described}; "
                 f"{full_batches} batches per evaluation): give more time or fewer evaluations")
    steps = every * args.evals
    warmup = max(1, round(steps * args.warmup_frac))
    tokens = steps * args.mb * args.accum * args.ranks * args.seq
    predicted = {l: st + steps * s + args.evals * ev for l, st, s, ev in runs}
    print(f"plan: {steps} steps ({tokens} tokens, {tokens / corpus['train']['tokens']:.2f} epochs of "
          f"the training shards), an evaluation every {every} steps ({full_batches} batches), warm-up "
          f"{warmup}; from {described}; predicted " +
          ", ".join(f"{l} {t:.0f} s" for l, t in predicted.items()) + f" of {args.seconds:.0f} s",
          file=sys.stderr)
    print(steps, warmup, every, log_every, " ".join(f"{l}={math.ceil(t)}" for l, t in predicted.items()))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--job", required=True, help="the encoded job (.pb)")
    r.add_argument("--out", required=True, help="output_dir of the run")
    r.add_argument("--budget", type=float, required=True, help="seconds from now to the kill")
    r.add_argument("--build", default="build")
    r.add_argument("--ranks", type=int, default=1, help="mpirun -np: data-parallel replicas")
    r.add_argument("--echo-every", type=int, default=10, help="print every Nth step line")
    r.add_argument("extra", nargs=argparse.REMAINDER, help="-- then the trainer's --set arguments")
    p = sub.add_parser("plan")
    p.add_argument("--calib", required=True, action="append",
                   help="a calibration run's summary.json (repeatable: one per precision)")
    p.add_argument("--corpus", required=True, help="prepare_corpus.py's corpus.json")
    p.add_argument("--seconds", type=float, required=True, help="for all the runs together")
    p.add_argument("--per-run", type=float, default=0, help="and for each run alone (0: no limit)")
    p.add_argument("--evals", type=int, default=8)
    p.add_argument("--calib-valid-batches", type=int, required=True)
    p.add_argument("--mb", type=int, required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--ranks", type=int, default=1, help="as the runs had")
    p.add_argument("--warmup-frac", type=float, default=0.1)
    args = ap.parse_args()
    return run(args) if args.cmd == "run" else plan(args)


if __name__ == "__main__":
    sys.exit(main())
