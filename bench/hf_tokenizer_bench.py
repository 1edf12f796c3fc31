#!/usr/bin/env python3
"""Hugging Face tokenizers throughput on one thread, the twin of bench/tokenizer_bench.c:
every line of TEXT_FILE is one document, encoded with Tokenizer.encode (no special tokens).

    python3 bench/hf_tokenizer_bench.py TOKENIZER_JSON TEXT_FILE [REPEATS]"""
import os
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # encode() of one text is serial anyway; batch is not used
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    import tokenizers

    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    t0 = time.perf_counter()
    tok = tokenizers.Tokenizer.from_file(sys.argv[1])
    load_s = time.perf_counter() - t0
    with open(sys.argv[2], "rb") as f:
        data = f.read()
    lines = data.decode("utf-8").split("\n")
    if data.endswith(b"\n"):
        lines.pop()  # as in the C bench: a final newline ends the last document, it starts none
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = 0
        for line in lines:
            tokens += len(tok.encode(line, add_special_tokens=False).ids)
        best = min(best, time.perf_counter() - t0)
    mb = len(data) / 1e6
    print(f"HF tokenizers {tokenizers.__version__}: {mb:.2f} MB, {len(lines)} documents, "
          f"{tokens} tokens, best of {repeats}: {best:.3f} s, {mb / best:.2f} MB/s, "
          f"{tokens / best:.0f} tokens/s (load {load_s:.2f} s)")


if __name__ == "__main__":
    main()
