/* The Qwen3 tokenizer the tests use: $QWEN3_TOKENIZER, or the copy scripts/fetch_tokenizer.sh
 * puts in third_party/. A test without it fails, saying how to get it. */
#ifndef QWEN3_TEST_TOKENIZER_FILE_H
#define QWEN3_TEST_TOKENIZER_FILE_H

#include <stdio.h>
#include <stdlib.h>

#include "data/tokenizer.h"

static struct tokenizer *load_test_tokenizer(void) {
  const char *path = getenv("QWEN3_TOKENIZER");
  if (!path) path = "third_party/qwen3-tokenizer/tokenizer.json";
  char err[512];
  struct tokenizer *t = tokenizer_load(path, err, sizeof err);
  if (!t) {
    fprintf(stderr, "FAIL: %s (run scripts/fetch_tokenizer.sh, or set QWEN3_TOKENIZER)\n", err);
    printf("0 passed, 1 failed\n");
    exit(1);
  }
  return t;
}

#endif
