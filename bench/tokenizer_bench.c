/* Tokenizer throughput, one thread: every line of a text file is one document, encoded with
 * tokenizer_encode (the way `qwen3-prep tokenize` and `build --format text` use it).
 * bench/hf_tokenizer_bench.py does the same with Hugging Face tokenizers, on the same file;
 * both print the token count, which must agree.
 *
 *   tokenizer_bench TOKENIZER_JSON TEXT_FILE [REPEATS] */
#include "common/util.h"
#include "data/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  if (argc < 3) die("usage: %s TOKENIZER_JSON TEXT_FILE [REPEATS]", argv[0]);
  int repeats = argc > 3 ? atoi(argv[3]) : 3;
  char err[512];
  double t0 = now_seconds();
  struct tokenizer *tok = tokenizer_load(argv[1], err, sizeof err);
  if (!tok) die("%s", err);
  double load_s = now_seconds() - t0;
  size_t len;
  char *text = read_file(argv[2], &len);
  if (!text) die("%s: cannot read", argv[2]);

  double best = 1e30;
  size_t tokens = 0, docs = 0;
  for (int r = 0; r < repeats; r++) {
    tokens = docs = 0;
    t0 = now_seconds();
    for (char *p = text, *end = text; p < text + len; p = end + 1) {
      end = memchr(p, '\n', (size_t)(text + len - p));
      if (!end) end = text + len;
      int32_t *ids;
      size_t n;
      if (tokenizer_encode(tok, p, (size_t)(end - p), &ids, &n, err, sizeof err))
        die("%s line %zu: %s", argv[2], docs + 1, err);
      tokens += n;
      docs++;
      free(ids);
    }
    double s = now_seconds() - t0;
    if (s < best) best = s;
  }
  printf("qwen3 C tokenizer: %.2f MB, %zu documents, %zu tokens, best of %d: %.3f s, %.2f MB/s, "
         "%.0f tokens/s (load %.2f s)\n",
         len / 1e6, docs, tokens, repeats, best, len / 1e6 / best, tokens / best, load_s);
  free(text);
  tokenizer_free(tok);
  return 0;
}
