#!/usr/bin/env python3
"""Writes the reference ids that tests/unit/test_tokenizer.c compares the C tokenizer against.

    python3 tests/tokenizer_fixtures.py third_party/qwen3-tokenizer/tokenizer.json tests/fixtures/tokenizer/

Reads DIR/corpus.jsonl (one {"text": ...} per line, committed data) and writes
DIR/expected_ids.jsonl: line i is the JSON array of ids that Hugging Face `tokenizers` gives
document i, without special tokens added (the C tokenizer never adds any). Needs the Python
`tokenizers` package; run it where that is installed and commit the output."""
import hashlib
import json
import os
import sys
import unicodedata

SHA256_PREFIX, SHA256_SUFFIX = "aeb13307", "4492dae4"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tokenizer_path, fixture_dir = sys.argv[1], sys.argv[2]
    import tokenizers  # imported here so that the usage message works without it

    with open(tokenizer_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not (digest.startswith(SHA256_PREFIX) and digest.endswith(SHA256_SUFFIX)):
        sys.exit(f"{tokenizer_path}: sha256 {digest} is not the Qwen3 tokenizer "
                 f"({SHA256_PREFIX}…{SHA256_SUFFIX}); run scripts/fetch_tokenizer.sh")
    tok = tokenizers.Tokenizer.from_file(tokenizer_path)

    corpus = os.path.join(fixture_dir, "corpus.jsonl")
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]

    lines, bad_round_trips = [], 0
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        # the C test also checks decode(encode(x)) == NFC(x); a document where Hugging Face
        # itself does not round-trip would make that check meaningless, so say so here
        if tok.decode(ids, skip_special_tokens=False) != unicodedata.normalize("NFC", text):
            print(f"{corpus}:{i + 1}: Hugging Face decode(encode(x)) != NFC(x)", file=sys.stderr)
            bad_round_trips += 1
        lines.append(json.dumps(ids, separators=(",", ":")))

    out = os.path.join(fixture_dir, "expected_ids.jsonl")
    with open(out + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)
    total = sum(len(json.loads(line)) for line in lines)
    print(f"{out}: {len(lines)} documents, {total} tokens (tokenizers {tokenizers.__version__})")
    if bad_round_trips:
        sys.exit(f"{bad_round_trips} documents do not round-trip in Hugging Face itself")


if __name__ == "__main__":
    main()
