"""What the two training benchmarks (torch_train_bench.py, ours_train_bench.py) share: the
Qwen3-4B shape, the MFU convention and the RESULT lines that bench/gpu_bench.sh tabulates."""
import os
import time

# the scripts' work folder (bench_lib.sh's WORK: BENCH_WORK for a second script beside another)
WORK = os.environ.get("BENCH_WORK", "/tmp/qwen3_bench")
PEAK_FLOPS = 989e12   # dense bf16, H100 and H200 alike (REFERENCE.md)
SHAPE = dict(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, ffn=9728, vocab=151936,
             theta=5e6, eps=1e-6)
T0 = time.perf_counter()


def make_log(who):
    """A log function whose lines start with `who` and the seconds since start."""
    def log(msg):
        print(f"[{who} {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)
    return log


def result(**kv):
    """Prints one `RESULT k=v ...` line and appends it to $GPU_BENCH_RESULTS when set."""
    parts = []
    for k, v in kv.items():
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        parts.append(f"{k}={v}")
    line = "RESULT " + " ".join(parts)
    print(line, flush=True)
    path = os.environ.get("GPU_BENCH_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def read_results(path):
    """The RESULT lines of a results file, each as a dict of its k=v fields."""
    with open(path) as f:
        return [dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                for line in f if line.startswith("RESULT ")]


def print_table(rows, cols, measured):
    """A markdown table of RESULT rows. cols are (title, key, fmt): fmt None prints the field as
    it is (the row's name), else fmt(float(field)). A row without the field `measured` (a part
    that did not run) shows its status in the first measured column, the rest blank."""
    print("\n| " + " | ".join(title for title, _, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        status = r.get("status", "?")
        cells = []
        for _, key, fmt in cols:
            if fmt is None:
                cells.append(r.get(key, ""))
            elif measured in r:
                cells.append(fmt(float(r[key])))
            else:
                cells.append(status)
                status = ""
        print("| " + " | ".join(cells) + " |")


def flops_per_token(n_params, layers, T, heads, head_dim):
    """6 N + 6 L T heads head_dim: the issue's convention (causal attention counted once)."""
    return 6.0 * n_params + 6.0 * layers * T * heads * head_dim
