#!/usr/bin/env python3
"""Sums an ncu --csv log (metrics gpu__time_duration.sum and dram__bytes_read.sum) per kernel:

    python3 bench/ncu_summary.py ncu.csv --layers 4

Steps are counted by the decode attention kernel (one launch per layer per step), so the table
is per decoding step: launches, microseconds, megabytes read from DRAM and the rate, largest
first. ncu runs each kernel alone, so these are the kernels' own times; the step's recorded time
less their sum is what the launches between them cost.
"""
import argparse
import collections
import csv
import re


def short(name):
    name = re.sub(r"\(.*", "", name)              # arguments
    name = re.sub(r"^void ", "", name)
    return name.replace("__nv_bfloat16", "bf16")[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args()
    lines = open(args.csv).read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print("ncu_summary: no kernels in", args.csv)
        raise SystemExit(2)
    per = collections.defaultdict(lambda: {"n": 0, "us": 0.0, "mb": 0.0})
    ids = set()
    for row in csv.DictReader(lines[start:]):
        k = per[short(row["Kernel Name"]) + " " + row["Grid Size"]]   # gemv: one per shape
        unit, value = row["Metric Unit"], float(row["Metric Value"].replace(",", ""))
        if row["Metric Name"] == "gpu__time_duration.sum":
            k["us"] += value * {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[unit]
            k["n"] += 1
            ids.add(row["ID"])
        else:
            k["mb"] += value * {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3, "B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]
    attn = sum(v["n"] for k, v in per.items() if "decode" in k and "attn" in k)
    steps = attn / args.layers if attn else 1
    print(f"{len(ids)} kernels profiled, {steps:.2f} decoding steps ({args.layers} layers)")
    print("| kernel grid | launches/step | us/step | MB/step | GB/s |")
    print("|---|---|---|---|---|")
    total_us = total_n = 0
    for name, k in sorted(per.items(), key=lambda kv: -kv[1]["us"]):
        rate = k["mb"] / k["us"] * 1e3 if k["us"] else 0   # MB/us = TB/s
        print(f"| {name} | {k['n'] / steps:.1f} | {k['us'] / steps:.1f} | {k['mb'] / steps:.2f} "
              f"| {rate:.0f} |")
        total_us += k["us"] / steps
        total_n += k["n"] / steps
    print(f"| all | {total_n:.1f} | {total_us:.1f} | | |")
    print(f"RESULT system=ncu-{args.layers}layers kernels_per_step={total_n:.1f} "
          f"kernel_us_per_step={total_us:.1f}")


if __name__ == "__main__":
    main()
