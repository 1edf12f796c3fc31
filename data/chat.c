/* Tokenizing the whole rendered conversation at once is what Hugging Face does; the loss mask
 * needs to know where each reply starts. Added tokens (<|im_start|>, <|im_end|>) always cut
 * the text before pre-tokenization, so encoding the conversation message by message gives the
 * same ids as encoding it whole. Inside a message, "assistant\n" and the reply are one stretch
 * of text: they are encoded together, and the reply's tokens are those after the longest
 * prefix shared with the header's own encoding. That is exact when the reply starts the usual
 * way; a reply starting with a newline merges with the header's "\n" into one token, which
 * then counts as the reply's (it holds reply text). */
#include "data/chat.h"

#include "common/util.h"
#include "data/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IM_START "<|im_start|>"
#define IM_END "<|im_end|>"
#define GENERATION_PROMPT IM_START "assistant\n"

/* "<|im_start|>{role}\n{content}<|im_end|>" into a new buffer; the "\n" after it is separate
 * because it is not part of a reply's loss. */
static char *render_turn(const struct chat_message *m, size_t *len) {
  size_t role = strlen(m->role);
  *len = strlen(IM_START) + role + 1 + m->len + strlen(IM_END);
  char *s = xmalloc(*len + 1), *p = s;
  p += sprintf(p, "%s%s\n", IM_START, m->role);
  memcpy(p, m->content, m->len);
  p += m->len;
  strcpy(p, IM_END);
  return s;
}

static void put(char **out, size_t *len, size_t *cap, const char *s, size_t n) {
  while (*len + n + 1 > *cap) *out = xrealloc(*out, *cap = *cap ? 2 * *cap : 256);
  memcpy(*out + *len, s, n);
  *len += n;
  (*out)[*len] = 0;
}

char *chat_render(const struct chat_message *msgs, size_t n, int add_generation_prompt,
                  size_t *len) {
  char *out = NULL;
  size_t total = 0, cap = 0;
  put(&out, &total, &cap, "", 0);
  for (size_t i = 0; i < n; i++) {
    size_t k;
    char *turn = render_turn(&msgs[i], &k);
    put(&out, &total, &cap, turn, k);
    put(&out, &total, &cap, "\n", 1);
    free(turn);
  }
  if (add_generation_prompt) put(&out, &total, &cap, GENERATION_PROMPT, strlen(GENERATION_PROMPT));
  if (len) *len = total;
  return out;
}

struct builder {
  int32_t *ids;
  uint8_t *mask;
  size_t n, cap;
};

/* Appends ids[0..n), the first `unmasked` with mask 0, the rest with mask 1. */
static void append(struct builder *b, const int32_t *ids, size_t n, size_t unmasked) {
  if (b->n + n > b->cap) {
    while (b->n + n > b->cap) b->cap = b->cap ? 2 * b->cap : 256;
    b->ids = xrealloc(b->ids, b->cap * sizeof *b->ids);
    b->mask = xrealloc(b->mask, b->cap);
  }
  memcpy(b->ids + b->n, ids, n * sizeof *ids);
  for (size_t i = 0; i < n; i++) b->mask[b->n + i] = i >= unmasked;
  b->n += n;
}

/* Encodes text that is valid UTF-8 by construction, so cannot fail. */
static int32_t *encode_known(const struct tokenizer *t, const char *text, size_t len, size_t *n) {
  int32_t *ids;
  char err[128];
  if (tokenizer_encode(t, text, len, &ids, n, err, sizeof err)) die("chat: %s", err);
  return ids;
}

int chat_encode(const struct tokenizer *t, const struct chat_message *msgs, size_t n,
                int add_generation_prompt, int32_t **ids, uint8_t **mask, size_t *n_ids,
                char *err, size_t errlen) {
  *ids = NULL;
  *mask = NULL;
  *n_ids = 0;
  for (size_t i = 0; i < n; i++) {
    const char *role = msgs[i].role;
    if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant")) {
      snprintf(err, errlen, "messages[%zu].role: \"%s\" is none of system, user, assistant", i,
               role);
      return -1;
    }
    size_t bad = utf8_invalid_offset(msgs[i].content, msgs[i].len);
    if (bad < msgs[i].len) {
      snprintf(err, errlen, "messages[%zu].content: invalid UTF-8 at byte offset %zu", i, bad);
      return -1;
    }
  }

  size_t n_header, n_newline;
  int32_t *header = encode_known(t, GENERATION_PROMPT, strlen(GENERATION_PROMPT), &n_header);
  int32_t *newline = encode_known(t, "\n", 1, &n_newline);
  struct builder b = {0};
  for (size_t i = 0; i < n; i++) {
    size_t len, n_turn;
    char *turn = render_turn(&msgs[i], &len);
    int32_t *turn_ids = encode_known(t, turn, len, &n_turn);
    size_t unmasked = n_turn;
    if (!strcmp(msgs[i].role, "assistant"))
      for (unmasked = 0; unmasked < n_header && unmasked < n_turn; unmasked++)
        if (turn_ids[unmasked] != header[unmasked]) break;
    append(&b, turn_ids, n_turn, unmasked);
    append(&b, newline, n_newline, n_newline);
    free(turn_ids);
    free(turn);
  }
  if (add_generation_prompt) append(&b, header, n_header, n_header);
  free(header);
  free(newline);
  *ids = b.ids ? b.ids : xmalloc(sizeof **ids);
  *mask = b.mask ? b.mask : xmalloc(1);
  *n_ids = b.n;
  return 0;
}
