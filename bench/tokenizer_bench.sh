#!/usr/bin/env bash
# Tokenizer throughput, C against Hugging Face tokenizers, one thread each, on the same text.
#
#   bench/tokenizer_bench.sh [BUILD_DIR] [TEXT_FILE]
#
# BUILD_DIR (default build/) must be configured; the bench is compiled against its qwen3core.
# Without TEXT_FILE, a ~8 MB mixed text is made from the repository: the tokenizer fixture
# corpus (CJK, emoji, code, many scripts) and the C sources, one document per line.
# The Hugging Face half runs where Python `tokenizers` is installed and is skipped elsewhere.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(cd "${1:-$root/build}" && pwd)"
tok="${QWEN3_TOKENIZER:-$root/third_party/qwen3-tokenizer/tokenizer.json}"
[ -f "$tok" ] || "$root/scripts/fetch_tokenizer.sh"

cmake --build "$build" --target tokenizer_bench -j "$(nproc)" >/dev/null

text="${2:-}"
if [ -z "$text" ]; then
  text="$build/tokenizer_bench_corpus.txt"
  python3 - "$root" "$text" <<'PY'
import glob, json, os, sys
root, out = sys.argv[1], sys.argv[2]
parts = [json.loads(l)["text"] for l in open(os.path.join(root, "tests/fixtures/tokenizer/corpus.jsonl"), encoding="utf-8")]
for pattern in ("data/*.[ch]", "common/*.[ch]", "trainer/*.[ch]", "worker/*.[ch]", "kernels/*/*.c"):
    for path in sorted(glob.glob(os.path.join(root, pattern))):
        parts.append(open(path, encoding="utf-8", errors="replace").read())
chunk = "\n".join(parts) + "\n"
with open(out, "w", encoding="utf-8", newline="\n") as f:
    f.write(chunk * max(1, 8_000_000 // len(chunk.encode("utf-8"))))
PY
fi

echo "text: $text ($(wc -c <"$text") bytes, sha256 $(sha256sum "$text" | cut -c1-16)…); $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
"$build/bench/tokenizer_bench" "$tok" "$text"
if python3 -c 'import tokenizers' 2>/dev/null; then
  python3 "$root/bench/hf_tokenizer_bench.py" "$tok" "$text"
else
  echo "HF tokenizers: not installed here, skipped"
fi
