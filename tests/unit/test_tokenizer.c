/* The C tokenizer against Hugging Face tokenizers: exact ids on every document of
 * tests/fixtures/tokenizer/corpus.jsonl (reference ids from tests/tokenizer_fixtures.py), and
 * decode(encode(x)) == NFC(x) on all of them; plus invalid UTF-8, added tokens and long pieces.
 * The tokenizer is $QWEN3_TOKENIZER or third_party/qwen3-tokenizer/tokenizer.json
 * (scripts/fetch_tokenizer.sh). */
#include "common/util.h"
#include "data/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <utf8proc.h>

#define FIXTURES "tests/fixtures/tokenizer/"

#include "tests/check.h"
#include "tests/test_tokenizer_file.h"

static const struct tokenizer *tok;

static int ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
  return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void check_ids(const char *text, size_t len, const int32_t *want, size_t n_want,
                      const char *what) {
  int32_t *ids;
  size_t n;
  char err[256];
  int rc = tokenizer_encode(tok, text, len, &ids, &n, err, sizeof err);
  CHECK(rc == 0, "%s: %s", what, err);
  CHECK(rc == 0 && ids_equal(ids, n, want, n_want), "%s: ids differ", what);
  free(ids);
}

static void check_bad_utf8(const char *text, size_t len, size_t offset) {
  int32_t *ids = (int32_t *)&checks_passed;
  size_t n = 7;
  char err[256] = "", want[64];
  int rc = tokenizer_encode(tok, text, len, &ids, &n, err, sizeof err);
  snprintf(want, sizeof want, "invalid UTF-8 at byte offset %zu", offset);
  CHECK(rc == -1 && ids == NULL && n == 0, "invalid UTF-8 accepted (want offset %zu)", offset);
  CHECK(strcmp(err, want) == 0, "error \"%s\", want \"%s\"", err, want);
}

static void test_basics(void) {
  CHECK(tokenizer_vocab_size(tok) == 151669, "vocab size %u", tokenizer_vocab_size(tok));
  CHECK(strncmp(tokenizer_hash(tok), "aeb13307", 8) == 0 &&
            strcmp(tokenizer_hash(tok) + 56, "4492dae4") == 0,
        "hash %s", tokenizer_hash(tok));
  CHECK(tokenizer_token_id(tok, "<|endoftext|>") == 151643, "<|endoftext|>");
  CHECK(tokenizer_token_id(tok, "<|im_start|>") == 151644, "<|im_start|>");
  CHECK(tokenizer_token_id(tok, "<|im_end|>") == 151645, "<|im_end|>");
  CHECK(tokenizer_token_id(tok, "<think>") == 151667, "<think>");
  CHECK(tokenizer_token_id(tok, "</think>") == 151668, "</think>");
  CHECK(tokenizer_token_id(tok, "Ġthe") == 279, "Ġthe");
  CHECK(tokenizer_token_id(tok, "no such token") == -1, "missing token");
  CHECK(tokenizer_is_token(tok, 0) && !tokenizer_is_token(tok, -1) &&
            !tokenizer_is_token(tok, 151669),
        "is_token");

  /* hand-checked against Hugging Face tokenizers */
  const char *hello = "Hello world! 你好<|im_end|>\n I'M ok";
  const int32_t hello_ids[] = {9707, 1879, 0, 220, 108386, 151645, 198, 358, 27603, 5394};
  check_ids(hello, strlen(hello), hello_ids, 10, "hello");
  check_ids("", 0, NULL, 0, "empty");
  const int32_t specials[] = {151645, 151645, 151643};
  check_ids("<|im_end|><|im_end|><|endoftext|>", 33, specials, 3, "adjacent specials");

  int32_t ids[] = {9707, 151645, 198};
  size_t len;
  char *text = tokenizer_decode(tok, ids, 3, &len);
  CHECK(text && len == 16 && memcmp(text, "Hello<|im_end|>\n", 16) == 0, "decode");
  free(text);
  int32_t bad[] = {9707, 151669};
  CHECK(tokenizer_decode(tok, bad, 2, &len) == NULL, "decode of an id that is no token");

  /* a NUL byte is text like any other */
  int32_t *nul_ids;
  size_t n;
  char err[256];
  CHECK(tokenizer_encode(tok, "a\0b", 3, &nul_ids, &n, err, sizeof err) == 0 && n >= 2, "NUL");
  text = tokenizer_decode(tok, nul_ids, n, &len);
  CHECK(text && len == 3 && memcmp(text, "a\0b", 3) == 0, "NUL round trip");
  free(text);
  free(nul_ids);
}

static void test_invalid_utf8(void) {
  check_bad_utf8("\xff", 1, 0);
  check_bad_utf8("abc\x80", 4, 3);            /* lone continuation byte */
  check_bad_utf8("ab\xc3", 3, 2);             /* truncated at the end */
  check_bad_utf8("ab\xc3(", 4, 2);            /* truncated before ASCII */
  check_bad_utf8("\xc0\xaf", 2, 0);           /* overlong '/' */
  check_bad_utf8("\xe0\x80\xaf", 3, 0);       /* overlong, 3 bytes */
  check_bad_utf8("x\xed\xa0\x80", 4, 1);      /* UTF-16 surrogate */
  check_bad_utf8("\xf4\x90\x80\x80", 4, 0);   /* above U+10FFFF */
  check_bad_utf8("<|im_end|>\xfe", 11, 10);   /* after an added token */
  check_bad_utf8("你好\xe4\xbd", 8, 6);
}

/* BPE and the regex on pieces far longer than any word: quadratic work would not finish. */
static void test_long_pieces(void) {
  size_t n = 200000;
  char *text = xmalloc(n);
  memset(text, 'a', n);
  int32_t *ids;
  size_t n_ids;
  char err[256];
  double t0 = now_seconds();
  CHECK(tokenizer_encode(tok, text, n, &ids, &n_ids, err, sizeof err) == 0, "long: %s", err);
  size_t len;
  char *back = tokenizer_decode(tok, ids, n_ids, &len);
  CHECK(back && len == n && memcmp(back, text, n) == 0, "long round trip");
  CHECK(n_ids < n / 4, "200000 x 'a' gave %zu tokens", n_ids);
  CHECK(now_seconds() - t0 < 5, "200000 x 'a' took %.1f s", now_seconds() - t0);
  free(back);
  free(ids);
  free(text);
}

/* Reads a JSON-lines file into an array of values; NULL if the file does not exist. */
static json_t *read_jsonl(const char *path) {
  size_t len;
  char *text = read_file(path, &len);
  if (!text) return NULL;
  json_t *all = json_array();
  int line = 1;
  for (char *p = text, *end; *p; p = end + 1, line++) {
    end = strchr(p, '\n');
    if (!end) end = p + strlen(p);
    json_error_t jerr;
    json_t *v = json_loadb(p, (size_t)(end - p), JSON_ALLOW_NUL, &jerr);
    if (!v) die("%s:%d: %s", path, line, jerr.text);
    json_array_append_new(all, v);
    if (!*end) break;
  }
  free(text);
  return all;
}

static void test_corpus(void) {
  json_t *corpus = read_jsonl(FIXTURES "corpus.jsonl");
  json_t *expected = read_jsonl(FIXTURES "expected_ids.jsonl");
  CHECK(corpus && json_array_size(corpus) >= 200, "%s: missing or short", FIXTURES "corpus.jsonl");
  CHECK(expected != NULL,
        "%s is missing: generate it where Python tokenizers is installed with\n"
        "  python3 tests/tokenizer_fixtures.py third_party/qwen3-tokenizer/tokenizer.json "
        "tests/fixtures/tokenizer/",
        FIXTURES "expected_ids.jsonl");
  CHECK(!expected || json_array_size(expected) == json_array_size(corpus),
        "expected_ids.jsonl has %zu lines, corpus.jsonl %zu", json_array_size(expected),
        json_array_size(corpus));
  size_t mismatches = 0, tokens = 0;
  for (size_t i = 0; i < json_array_size(corpus); i++) {
    const json_t *doc = json_object_get(json_array_get(corpus, i), "text");
    const char *text = json_string_value(doc);
    size_t len = json_string_length(doc);
    int32_t *ids;
    size_t n;
    char err[256];
    CHECK(tokenizer_encode(tok, text, len, &ids, &n, err, sizeof err) == 0, "doc %zu: %s", i + 1,
          err);
    tokens += n;
    const json_t *want = json_array_get(expected, i);
    if (want) {
      int same = json_array_size(want) == n;
      for (size_t k = 0; same && k < n; k++)
        same = json_integer_value(json_array_get(want, k)) == ids[k];
      CHECK(same, "corpus.jsonl:%zu: ids differ from Hugging Face (%zu vs %zu tokens)", i + 1, n,
            json_array_size(want));
      mismatches += !same;
    }
    size_t back_len;
    char *back = tokenizer_decode(tok, ids, n, &back_len);
    utf8proc_uint8_t *nfc = NULL;
    utf8proc_ssize_t nfc_len = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)len,
                                            &nfc, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    CHECK(back && nfc_len >= 0 && (size_t)nfc_len == back_len &&
              memcmp(back, nfc, back_len) == 0,
          "corpus.jsonl:%zu: decode(encode(x)) != NFC(x)", i + 1);
    free(nfc);
    free(back);
    free(ids);
  }
  printf("corpus: %zu documents, %zu tokens, %zu differ from Hugging Face\n",
         json_array_size(corpus), tokens, mismatches);
  json_decref(corpus);
  json_decref(expected);
}

int main(void) {
  struct tokenizer *t = load_test_tokenizer();
  tok = t;
  test_basics();
  test_invalid_utf8();
  test_long_pieces();
  test_corpus();
  tokenizer_free(t);
  return checks_report();
}
