/* tokenizer.json (data/tokenizer.c) from arbitrary bytes: tokenizer_load loads it or says what
 * is wrong; a loaded tokenizer encodes and decodes a few texts without fault. */
#include "tests/fuzz/fuzz_common.h"

#include "data/tokenizer.h"

static const char *const TEXTS[] = {
  "Hello world! 123 don't  \n\n  tabs\tand spaces ",
  "<|im_start|>user\n你好，世界<|im_end|>\n",
  "caf\xc3\xa9 \xf0\x9f\x98\x80 na\xc3\xafve",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  const char *path = fuzz_write("tokenizer.json", data, size);
  char err[1024] = "";
  struct tokenizer *t = tokenizer_load(path, err, sizeof err);
  if (!t) {
    if (!err[0]) abort();
    return 0;
  }
  for (size_t k = 0; k < sizeof TEXTS / sizeof *TEXTS; k++) {
    int32_t *ids;
    size_t n, len;
    if (tokenizer_encode(t, TEXTS[k], strlen(TEXTS[k]), &ids, &n, err, sizeof err) != 0) abort();
    for (size_t i = 0; i < n; i++)
      if (!tokenizer_is_token(t, ids[i])) abort();
    char *back = tokenizer_decode(t, ids, n, &len);
    if (!back) abort();
    free(back);
    free(ids);
  }
  tokenizer_token_id(t, "<|im_end|>");
  tokenizer_free(t);
  return 0;
}
