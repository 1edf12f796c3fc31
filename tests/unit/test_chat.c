/* The Qwen3-4B-Instruct-2507 chat template: rendered text, ids equal to encoding that text whole
 * (what Hugging Face does), and the loss mask on assistant replies and their <|im_end|>. */
#include "data/chat.h"
#include "data/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/check.h"
#include "tests/test_tokenizer_file.h"

static const struct tokenizer *tok;

#define MSG(role, text) {role, text, sizeof text - 1}

/* chat_encode must give exactly the ids of the whole rendered text; returns the mask. */
static uint8_t *encode_checked(const struct chat_message *m, size_t n, int gen, int32_t **ids,
                               size_t *n_ids, const char *what) {
  uint8_t *mask;
  char err[256];
  int rc = chat_encode(tok, m, n, gen, ids, &mask, n_ids, err, sizeof err);
  CHECK(rc == 0, "%s: %s", what, err);
  size_t len, n_whole;
  char *text = chat_render(m, n, gen, &len);
  int32_t *whole;
  CHECK(tokenizer_encode(tok, text, len, &whole, &n_whole, err, sizeof err) == 0, "%s", err);
  CHECK(n_whole == *n_ids && memcmp(whole, *ids, n_whole * sizeof *whole) == 0,
        "%s: ids differ from encoding the rendered text whole", what);
  free(whole);
  free(text);
  return mask;
}

static void test_hand_checked(void) {
  const struct chat_message m[] = {
    MSG("system", "You are a helpful assistant."),
    MSG("user", "Hi!"),
    MSG("assistant", "Hello! How can I help?"),
    MSG("user", "你是誰？"),
    MSG("assistant", "我是助手。"),
  };
  const char *text =
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\n你是誰？<|im_end|>\n"
    "<|im_start|>assistant\n我是助手。<|im_end|>\n";
  size_t len;
  char *rendered = chat_render(m, 5, 0, &len);
  CHECK(len == strlen(text) && strcmp(rendered, text) == 0, "render:\n%s", rendered);
  free(rendered);

  /* ids and tokens from Hugging Face tokenizers; the mask checked by hand against the tokens:
   * "Hello" "!" "ĠHow" "Ġcan" "ĠI" "Ġhelp" "?" <|im_end|> and 我是 助手 。 <|im_end|> */
  static const int32_t want[] = {
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
    151644, 872, 198, 13048, 0, 151645, 198,
    151644, 77091, 198, 9707, 0, 2585, 646, 358, 1492, 30, 151645, 198,
    151644, 872, 198, 105043, 108908, 11319, 151645, 198,
    151644, 77091, 198, 104198, 110498, 1773, 151645, 198};
  size_t n_want = sizeof want / sizeof *want;
  int32_t *ids;
  size_t n;
  uint8_t *mask = encode_checked(m, 5, 0, &ids, &n, "hand-checked");
  CHECK(n == n_want && memcmp(ids, want, sizeof want) == 0, "hand-checked ids");
  for (size_t i = 0; i < n && i < n_want; i++) {
    int masked = (i >= 21 && i <= 28) || (i >= 41 && i <= 44);
    CHECK(mask[i] == masked, "mask[%zu] = %d, want %d", i, mask[i], masked);
  }
  free(ids);
  free(mask);

  /* the generation prompt: "<|im_start|>assistant\n", never in the loss */
  mask = encode_checked(m, 4, 1, &ids, &n, "generation prompt");
  CHECK(n == 41 && memcmp(ids, want, 41 * sizeof *ids) == 0, "generation prompt ids");
  CHECK(n == 41 && !mask[38] && !mask[39] && !mask[40], "generation prompt masked");
  free(ids);
  free(mask);
}

static size_t count_masked(const uint8_t *mask, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++) k += mask[i];
  return k;
}

static void test_edges(void) {
  int32_t *ids;
  size_t n;
  uint8_t *mask;

  /* a reply that starts with newlines: "\n\n\n" is one token spanning the header's "\n" */
  const struct chat_message nl[] = {MSG("user", "x"), MSG("assistant", "\n\nYes")};
  mask = encode_checked(nl, 2, 0, &ids, &n, "reply starting with newlines");
  /* <|im_start|> user \n x <|im_end|> \n <|im_start|> assistant "\n\n\n" Yes <|im_end|> \n */
  CHECK(n == 12 && count_masked(mask, n) == 3 && mask[8] && mask[9] && mask[10] && !mask[11],
        "newline reply mask");
  free(ids);
  free(mask);

  /* an empty reply still teaches <|im_end|> */
  const struct chat_message empty[] = {MSG("user", "x"), MSG("assistant", "")};
  mask = encode_checked(empty, 2, 0, &ids, &n, "empty reply");
  CHECK(n == 11 && count_masked(mask, n) == 1 && ids[9] == 151645 && mask[9], "empty reply mask");
  free(ids);
  free(mask);

  /* special tokens inside a message are special, as in Hugging Face */
  const struct chat_message inj[] = {MSG("user", "a<|im_end|>b"), MSG("assistant", "c<think>d")};
  mask = encode_checked(inj, 2, 1, &ids, &n, "special tokens in content");
  free(ids);
  free(mask);

  /* no messages, only the prompt */
  mask = encode_checked(NULL, 0, 1, &ids, &n, "empty conversation");
  CHECK(n == 3 && count_masked(mask, n) == 0, "empty conversation");
  free(ids);
  free(mask);

  char err[256];
  const struct chat_message bad_role[] = {MSG("user", "x"), MSG("tool", "y")};
  CHECK(chat_encode(tok, bad_role, 2, 0, &ids, &mask, &n, err, sizeof err) == -1 && !ids &&
            strcmp(err, "messages[1].role: \"tool\" is none of system, user, assistant") == 0,
        "bad role: %s", err);
  const struct chat_message bad_utf8[] = {MSG("user", "ok\xc3")};
  CHECK(chat_encode(tok, bad_utf8, 1, 0, &ids, &mask, &n, err, sizeof err) == -1 &&
            strcmp(err, "messages[0].content: invalid UTF-8 at byte offset 2") == 0,
        "bad UTF-8: %s", err);
}

int main(void) {
  struct tokenizer *t = load_test_tokenizer();
  tok = t;
  test_hand_checked();
  test_edges();
  tokenizer_free(t);
  return checks_report();
}
