#!/usr/bin/env python3
"""The quality runs' corpus: the Python sources of this machine's installed packages.

    python3 bench/quality/prepare_corpus.py --out DIR [--train-mb 80] [--valid-mb 1]
        [--valid-fraction 0.02] [--jobs N] [--tokenizer T.json] [--prep build/qwen3-prep]
        [--src DIR ...]

A real corpus that is on every machine with Python (the GPU host has torch and transformers:
hundreds of MB of .py), read with nothing downloaded.

Split: by top-level package (a directory or a module of site-packages), so that validation is
code of packages the model never trained on. A package is in validation when the first 64 bits
of sha256(name), as a fraction, are below --valid-fraction (~2% of packages, the same on every
machine that has the package); when those hold less than --valid-mb of files, packages follow in
order of that hash until they do. A file whose exact text is in validation is never trained on
(vendored copies: pip/_vendor/... beside the package itself).

Caps: each side takes its files in the order of sha256("package/relative/path") (a mix of every
package, the same on every run) until --train-mb / --valid-mb of text. Files under 64 bytes,
over --max-file-kb (generated tables), not UTF-8 or holding NUL are skipped; duplicates are
taken once.

Output in DIR:
  train_NN.h5   --jobs shards, `qwen3-prep build --format jsonl` (one document per file, each
                ending with <|endoftext|>), built in parallel; training cuts their token streams
                into windows of data.seq_len
  valid.jsonl   the validation files as text (what valid.h5 holds, readable)
  valid.h5      one document: every validation file's tokens and <|endoftext|>, one after the
                other (`qwen3-prep tokenize`, then `build --format ids`), so that evaluation
                scores dense windows of data.seq_len, like the training windows, instead of one
                mostly padded sequence per file
  corpus.json   the packages of each side, files, bytes, tokens, the settings
"""
import argparse
import hashlib
import json
import os
import re
import site
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_SUFFIXES = (".dist-info", ".egg-info", ".data", ".libs", ".pth")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_common import make_log  # noqa: E402

log = make_log("prep")


def unit_hash(text):
    """A deterministic number in [0, 1) for a name (Python's hash() is salted per process)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2.0**64


def default_sources():
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str):
        dirs.append(user)
    return dirs


def find_packages(sources, max_bytes):
    """{package: [(key, path, size)]}: the .py files under each top-level entry of each source
    directory; key = "package/relative/path" (the same on any machine, whatever the prefix)."""
    packages, seen_dirs = {}, set()
    for src in sources:
        real = os.path.realpath(src)
        if not os.path.isdir(real) or real in seen_dirs:
            continue
        seen_dirs.add(real)
        for entry in sorted(os.listdir(real)):
            path = os.path.join(real, entry)
            if entry.startswith((".", "__pycache__")) or entry.endswith(SKIP_SUFFIXES):
                continue
            if os.path.isfile(path) and entry.endswith(".py"):
                name, files = entry[:-3], [(path, entry)]
            elif os.path.isdir(path) and not os.path.islink(path):
                name, files = entry, []
                for d, subdirs, names in os.walk(path):
                    subdirs[:] = sorted(s for s in subdirs if s != "__pycache__")
                    for n in sorted(names):
                        if n.endswith(".py"):
                            full = os.path.join(d, n)
                            files.append((full, os.path.join(entry, os.path.relpath(full, path))))
            else:
                continue
            for full, rel in files:
                try:
                    size = os.path.getsize(full)
                except OSError:
                    continue
                if 64 <= size <= max_bytes:
                    packages.setdefault(name, []).append((rel, full, size))
    return packages


def split_packages(packages, fraction, valid_bytes):
    """(validation package names, training package names), as the docstring says."""
    order = sorted(packages, key=unit_hash)
    valid, total = [], 0
    for name in order:
        if unit_hash(name) < fraction or total < valid_bytes:
            valid.append(name)
            total += sum(size for _, _, size in packages[name])
        else:
            break
    if len(valid) == len(order) and len(order) > 1:   # a tiny installation: keep one to train on
        valid.pop()
    chosen = set(valid)
    return valid, [n for n in order if n not in chosen]


def take_files(packages, names, cap, exclude):
    """Files of these packages in sha256(key) order, read until `cap` bytes of text (a file that
    would pass it is left for smaller ones after it): [(key, text)], the set of their contents'
    sha1, their bytes, files skipped. Skips duplicates and what `exclude` holds."""
    files = sorted(((k, p, s) for n in names for k, p, s in packages[n]), key=lambda f: unit_hash(f[0]))
    out, digests, total, skipped = [], set(), 0, 0
    for key, path, size in files:
        if total >= 0.98 * cap:
            break
        if total + size > cap and total > 0:   # one that would overshoot: look for a smaller one
            continue
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        digest = hashlib.sha1(raw).digest()
        if "\x00" in text or digest in digests or digest in exclude:
            skipped += 1
            continue
        digests.add(digest)
        out.append((key, text))
        total += len(raw)
    return out, digests, total, skipped


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for _, text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def tokenizer_facts(path):
    """(vocabulary size as qwen3-prep counts it: the largest id + 1, id of <|endoftext|>)"""
    with open(path, encoding="utf-8") as f:
        t = json.load(f)
    ids = list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]
    eot = [a["id"] for a in t.get("added_tokens", []) if a["content"] == "<|endoftext|>"]
    if not eot:
        sys.exit(f"prepare_corpus: {path} has no <|endoftext|> token")
    return max(ids) + 1, eot[0]


def wrote_tokens(output):
    """The token count of qwen3-prep build's summary line."""
    m = re.search(r"wrote .*?: (\d+) documents, (\d+) tokens", output)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the folder for the shards (made; emptied of old shards)")
    ap.add_argument("--train-mb", type=float, default=80, help="MB of .py text to train on (cap)")
    ap.add_argument("--valid-mb", type=float, default=1, help="MB of .py text to validate on (cap)")
    ap.add_argument("--valid-fraction", type=float, default=0.02, help="share of packages held out")
    ap.add_argument("--max-file-kb", type=float, default=512, help="larger files are skipped")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="training shards, tokenized in parallel (default: the cores)")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "third_party/qwen3-tokenizer/tokenizer.json"))
    ap.add_argument("--prep", default=os.path.join(ROOT, "build/qwen3-prep"))
    ap.add_argument("--src", action="append", default=None,
                    help="a directory of packages (repeatable; default: site.getsitepackages() and the user's)")
    args = ap.parse_args()
    for what, path in (("--tokenizer", args.tokenizer), ("--prep", args.prep)):
        if not os.path.isfile(path):
            hint = (" (scripts/fetch_tokenizer.sh puts it there; on the device machine carry "
                    "\"third_party\")") if what == "--tokenizer" else " (build it first)"
            sys.exit(f"prepare_corpus: {what} {path}: no such file{hint}")
    vocab, eot = tokenizer_facts(args.tokenizer)

    sources = args.src or default_sources()
    packages = find_packages(sources, int(args.max_file_kb * 1024))
    n_files = sum(len(v) for v in packages.values())
    all_bytes = sum(s for v in packages.values() for _, _, s in v)
    log(f"{len(packages)} packages, {n_files} .py files, {all_bytes / 1e6:.1f} MB under "
        f"{', '.join(sources)}")
    if len(packages) < 2:
        sys.exit("prepare_corpus: fewer than 2 packages with .py files: nothing to split "
                 "(name directories with --src)")

    valid_cap, train_cap = int(args.valid_mb * 1e6), int(args.train_mb * 1e6)
    valid_names, train_names = split_packages(packages, args.valid_fraction, valid_cap)
    valid_docs, valid_digests, valid_bytes, vskip = take_files(packages, valid_names, valid_cap, set())
    train_docs, _, train_bytes, tskip = take_files(packages, train_names, train_cap, valid_digests)
    log(f"validation: {len(valid_names)} packages ({', '.join(valid_names[:12])}"
        f"{', ...' if len(valid_names) > 12 else ''}), {len(valid_docs)} files, {valid_bytes / 1e6:.2f} MB")
    log(f"training: {len(train_names)} packages, {len(train_docs)} files, {train_bytes / 1e6:.2f} MB"
        f"{' (all there is: under --train-mb)' if train_bytes < 0.98 * train_cap else ''}; "
        f"skipped {vskip + tskip} duplicates, non-UTF-8 or NUL files")
    if not valid_docs or not train_docs:
        sys.exit("prepare_corpus: a side has no files")

    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):   # shards of an earlier run with more --jobs
        if re.fullmatch(r"(train_\d+|valid)\.(h5|jsonl)|valid\.ids\.(jsonl|txt)|corpus\.json", name):
            os.remove(os.path.join(args.out, name))
    # training parts of about equal bytes, files in the hashed order above
    jobs = max(1, min(args.jobs, len(train_docs)))
    parts, sizes = [[] for _ in range(jobs)], [0] * jobs
    for doc in train_docs:
        i = sizes.index(min(sizes))
        parts[i].append(doc)
        sizes[i] += len(doc[1])
    train_paths = []
    for i, part in enumerate(parts):
        path = os.path.join(args.out, f"train_{i:02d}")
        write_jsonl(path + ".jsonl", part)
        train_paths.append(path)
    write_jsonl(os.path.join(args.out, "valid.jsonl"), valid_docs)
    log(f"wrote {jobs} training parts and the validation text; tokenizing on {jobs} processes")

    # every training part and the validation text at once: qwen3-prep is one thread each
    procs = []
    for path in train_paths:
        procs.append(subprocess.Popen(
            [args.prep, "build", "--format", "jsonl", "--tokenizer", args.tokenizer, "--skip-bad",
             "--out", path + ".h5", path + ".jsonl"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    vjsonl, vids = os.path.join(args.out, "valid.jsonl"), os.path.join(args.out, "valid.ids.jsonl")
    with open(vjsonl, "rb") as fin, open(vids, "wb") as fout:
        rc = subprocess.run([args.prep, "tokenize", "--tokenizer", args.tokenizer, "--jsonl"],
                            stdin=fin, stdout=fout).returncode
    if rc:
        sys.exit(f"prepare_corpus: qwen3-prep tokenize of {vjsonl} failed (exit {rc})")
    stream = []
    with open(vids) as f:
        for line in f:
            stream.extend(json.loads(line)["ids"])
            stream.append(eot)
    vtxt = os.path.join(args.out, "valid.ids.txt")
    with open(vtxt, "w") as f:
        f.write(" ".join(map(str, stream)) + "\n")
    out = subprocess.run([args.prep, "build", "--format", "ids", "--vocab-size", str(vocab), "--out",
                          os.path.join(args.out, "valid.h5"), vtxt],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode:
        sys.exit(f"prepare_corpus: building valid.h5 failed:\n{out.stdout}")
    valid_tokens = len(stream)
    train_tokens, bad = 0, 0
    for path, p in zip(train_paths, procs):
        text, _ = p.communicate()
        if p.returncode:
            sys.exit(f"prepare_corpus: qwen3-prep build {path}.jsonl failed (exit {p.returncode}):\n{text}")
        train_tokens += wrote_tokens(text)[1]
        m = re.search(r"(\d+) bad lines skipped", text)
        bad += int(m.group(1)) if m else 0
    for path in train_paths:
        os.remove(path + ".jsonl")
    for path in (vids, vtxt):
        os.remove(path)
    log(f"tokens: training {train_tokens} in {jobs} shards ({train_bytes / max(train_tokens, 1):.2f} "
        f"bytes/token), validation {valid_tokens} in one document"
        f"{f'; {bad} files the tokenizer refused were skipped' if bad else ''}")

    manifest = dict(
        sources=sources, tokenizer=args.tokenizer, vocab_size=vocab, settings=vars(args),
        train=dict(shards=[p + ".h5" for p in train_paths], tokens=train_tokens, bytes=train_bytes,
                   files=len(train_docs), packages=train_names),
        valid=dict(shard=os.path.join(args.out, "valid.h5"), tokens=valid_tokens, bytes=valid_bytes,
                   files=len(valid_docs), packages=valid_names,
                   file_keys=[k for k, _ in valid_docs]))
    with open(os.path.join(args.out, "corpus.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"done: {args.out}/corpus.json")


if __name__ == "__main__":
    main()
