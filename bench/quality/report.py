#!/usr/bin/env python3
"""The quality comparison's report: BF16 against NVFP4 validation loss.

    python3 bench/quality/report.py --bf16 RUN_DIR --nvfp4 RUN_DIR --out-dir DIR
            [--name quality_0p6b] [--card h200] [--corpus corpus.json]

Reads each run's metrics.jsonl (val_loss lines) and summary.json (bench/quality/train_run.py)
and writes, in DIR, NAME_CARD_DATE.csv (step, tokens, bf16_val_loss, nvfp4_val_loss, rel_gap)
and NAME_CARD_DATE.png: the two validation curves and the relative gap (nvfp4 - bf16) / bf16
against tokens. The plot is drawn by matplotlib in a child process (a missing or broken
matplotlib, or its first font-cache build running long, cannot end the report); without it the
same plot is written as NAME_CARD_DATE.svg by hand and the PNG is said to be skipped. Prints a
table last: tokens per run, tokens/s, final validation losses and the relative gap (goal < 1.5%).
"""
import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ours_train_bench import metrics_lines  # noqa: E402

GOAL = 0.015


def read_run(d):
    vals, steps, summary = {}, {}, {}
    for o in metrics_lines(os.path.join(d, "metrics.jsonl")):
        if "val_loss" in o:
            vals[o["step"]] = o["val_loss"]
        elif "loss" in o:
            steps[o["step"]] = o
    if os.path.exists(os.path.join(d, "summary.json")):
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
    return vals, steps, summary


def plot_matplotlib(csv_path, png_path, title):
    """Runs in a child process: python3 report.py --plot CSV PNG TITLE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for key, label, color in (("bf16_val_loss", "BF16", "tab:blue"), ("nvfp4_val_loss", "NVFP4", "tab:red")):
        pts = [(float(r["tokens"]) / 1e6, float(r[key])) for r in rows if r[key]]
        if pts:
            a.plot(*zip(*pts), marker="o", ms=3, label=label, color=color)
    a.set_ylabel("validation loss")
    a.set_title(title)
    a.grid(alpha=0.3)
    a.legend()
    gap = [(float(r["tokens"]) / 1e6, 100 * float(r["rel_gap"])) for r in rows if r["rel_gap"]]
    if gap:
        b.plot(*zip(*gap), marker="o", ms=3, color="black")
    b.axhline(100 * GOAL, color="tab:red", ls="--", lw=1, label=f"goal {100 * GOAL:.1f}%")
    b.axhline(0, color="gray", lw=0.5)
    b.set_ylabel("(NVFP4 - BF16) / BF16, %")
    b.set_xlabel("training tokens (millions)")
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def plot_svg(rows, svg_path, title):
    """The same two panels as plain SVG, for a machine without matplotlib."""
    W, H, L, R = 780, 620, 80, 50
    panels = [(40, 400, [("bf16_val_loss", "BF16", "#1f77b4"), ("nvfp4_val_loss", "NVFP4", "#d62728")],
               "validation loss", 1.0),
              (450, 580, [("rel_gap", "(NVFP4 - BF16) / BF16, %", "#000000")], "gap, %", 100.0)]
    xs = [float(r["tokens"]) / 1e6 for r in rows]
    x0, x1 = min(xs + [0.0]), max(xs + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for top, bottom, series, ylabel, scale in panels:
        ys = [float(r[k]) * scale for r in rows for k, _, _ in series if r[k]]
        if scale == 100.0:
            ys += [0.0, 100 * GOAL]
        if not ys:
            continue
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.08 or 0.5
        y0, y1 = y0 - pad, y1 + pad
        px = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (W - L - R)
        py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
        out.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{bottom - top}" fill="none" stroke="#888"/>')
        for i in range(5):
            y = y0 + (y1 - y0) * i / 4
            out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
            x = x0 + (x1 - x0) * i / 4
            out.append(f'<text x="{px(x):.1f}" y="{bottom + 15}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="16" y="{(top + bottom) / 2}" transform="rotate(-90 16 {(top + bottom) / 2})" '
                   f'text-anchor="middle">{ylabel}</text>')
        if scale == 100.0:
            out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(100 * GOAL):.1f}" y2="{py(100 * GOAL):.1f}" '
                       f'stroke="#d62728" stroke-dasharray="5,4"/>')
            out.append(f'<text x="{W - R - 4}" y="{py(100 * GOAL) - 4:.1f}" text-anchor="end" fill="#d62728">'
                       f'goal {100 * GOAL:.1f}%</text>')
        for n, (key, label, color) in enumerate(series):
            pts = [(px(float(r["tokens"]) / 1e6), py(float(r[key]) * scale)) for r in rows if r[key]]
            if pts:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="' +
                           " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
                out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
            out.append(f'<text x="{L + 8}" y="{top + 18 + 16 * n}" fill="{color}">{label}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">training tokens (millions)</text>')
    out.append("</svg>")
    with open(svg_path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", required=True)
    ap.add_argument("--nvfp4", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--name", default="quality_0p6b")
    ap.add_argument("--card", default="gpu")
    ap.add_argument("--corpus", default="")
    ap.add_argument("--plot", nargs=3, metavar=("CSV", "PNG", "TITLE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot:
        plot_matplotlib(*args.plot)
        return 0

    runs = {"bf16": read_run(args.bf16), "nvfp4": read_run(args.nvfp4)}
    tokens_per_step = next((s["tokens_per_step"] for _, _, s in runs.values()
                            if s.get("tokens_per_step") == s.get("tokens_per_step") and s.get("tokens_per_step")), None)
    if tokens_per_step is None:   # no summary: the metrics' own count
        tokens_per_step = next((st["tokens"] for _, steps, _ in runs.values() for st in steps.values()), 0)
    all_steps = sorted(set(runs["bf16"][0]) | set(runs["nvfp4"][0]))
    rows = []
    for step in all_steps:
        b, n = runs["bf16"][0].get(step), runs["nvfp4"][0].get(step)
        rows.append(dict(step=step, tokens=int(step * tokens_per_step),
                         bf16_val_loss="" if b is None else f"{b:.6f}",
                         nvfp4_val_loss="" if n is None else f"{n:.6f}",
                         rel_gap="" if b is None or n is None else f"{(n - b) / b:.6f}"))
    os.makedirs(args.out_dir, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = os.path.join(args.out_dir, f"{args.name}_{args.card}_{date}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "tokens", "bf16_val_loss", "nvfp4_val_loss", "rel_gap"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.csv ({len(rows)} evaluations)")

    title = f"{args.name}: BF16 vs NVFP4 ({args.card}, {date})"
    plot_note = "no evaluation to plot"
    if rows:
        env = dict(os.environ, MPLCONFIGDIR=tempfile.mkdtemp(prefix="mpl_"))
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--bf16", "-", "--nvfp4", "-",
                                "--out-dir", "-", "--plot", stem + ".csv", stem + ".png", title],
                               env=env, capture_output=True, text=True, timeout=90)
            ok, why = p.returncode == 0 and os.path.exists(stem + ".png"), (p.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, "matplotlib took over 90 s"
        if ok:
            plot_note = f"wrote {stem}.png"
        else:
            plot_svg(rows, stem + ".svg", title)
            plot_note = f"PNG skipped (matplotlib: {why}); wrote {stem}.svg instead"
    print(plot_note)

    # ---- the table, last ---------------------------------------------------------------------
    lines = []
    if args.corpus and os.path.exists(args.corpus):
        with open(args.corpus) as f:
            c = json.load(f)
        lines.append(f"corpus: training {c['train']['tokens']} tokens ({c['train']['bytes'] / 1e6:.1f} MB of .py, "
                     f"{len(c['train']['packages'])} packages), validation {c['valid']['tokens']} tokens "
                     f"({c['valid']['bytes'] / 1e6:.2f} MB, packages: {', '.join(c['valid']['packages'][:8])}"
                     f"{', ...' if len(c['valid']['packages']) > 8 else ''})")
    lines += ["", "| run | ended | steps | tokens | tok/s (median step) | tok/s (tokens / whole run) | start-up s "
              "| evaluations s | final val loss (step) |", "|---|---|---|---|---|---|---|---|---|"]
    finals = {}
    for label, (vals, steps, s) in runs.items():
        done = s.get("steps_done") or (max(steps) if steps else 0)
        last = max(vals) if vals else None
        finals[label] = (last, vals.get(last) if last else None)
        ev_s = sum(e["seconds"] for e in s.get("evals", []))
        wall = s.get("wall_s", float("nan"))
        lines.append(f"| {label.upper()} | {s.get('ended', '?')} | {done} | {int(done * tokens_per_step)} "
                     f"| {s.get('tok_s', float('nan')):.0f} | {done * tokens_per_step / wall:.0f} "
                     f"| {s.get('startup_s', float('nan')):.1f} | {ev_s:.1f} "
                     f"| {'-' if last is None else f'{vals[last]:.4f} ({last})'} |")
    common = sorted(set(runs["bf16"][0]) & set(runs["nvfp4"][0]))
    lines.append("")
    if common:
        step = common[-1]
        b, n = runs["bf16"][0][step], runs["nvfp4"][0][step]
        gap = (n - b) / b
        same_end = finals["bf16"][0] == finals["nvfp4"][0] == step
        lines.append(f"relative gap (NVFP4 - BF16) / BF16 at step {step} ({int(step * tokens_per_step)} tokens"
                     f"{'' if same_end else ', the last step both runs evaluated'}): {100 * gap:+.2f}% "
                     f"(BF16 {b:.4f}, NVFP4 {n:.4f}); goal < {100 * GOAL:.1f}%: "
                     f"{'met' if gap < GOAL else 'NOT met'}")
        cut = [label.upper() for label, (_, _, s) in runs.items() if s.get("ended", "done") != "done"]
        if cut:
            lines.append(f"note: {' and '.join(cut)} did not finish the steps planned (see 'ended'): the learning-rate "
                         f"schedule had not decayed, so this is not yet the comparison asked for")
        result = os.environ.get("GPU_BENCH_RESULTS")
        if result:
            with open(result, "a") as f:
                f.write(f"RESULT system=quality name={args.name} step={step} tokens={int(step * tokens_per_step)} "
                        f"bf16_val={b:.5f} nvfp4_val={n:.5f} rel_gap={gap:.5f}\n")
    else:
        lines.append("relative gap: no step evaluated by both runs")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
