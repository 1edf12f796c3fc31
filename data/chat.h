/* The chat template of Qwen3-4B-Instruct-2507 (REFERENCE.md "Tokenizer"), no thinking block:
 *
 *   <|im_start|>{role}\n{content}<|im_end|>\n        for every message, in order
 *   <|im_start|>assistant\n                          the generation prompt, when asked for
 *
 * Roles are "system", "user" and "assistant". For training, the loss mask covers each
 * assistant reply and its <|im_end|>: the tokens the model must learn to produce. It does not
 * cover the "<|im_start|>assistant\n" header (given to the model) nor the "\n" after
 * <|im_end|> (never generated: generation stops at <|im_end|>). */
#ifndef QWEN3_CHAT_H
#define QWEN3_CHAT_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;

struct chat_message {
  const char *role;
  const char *content;   /* len bytes, need not be NUL-terminated */
  size_t len;
};

/* The rendered text, malloc'd and NUL-terminated, *len bytes. Does not check roles. */
char *chat_render(const struct chat_message *msgs, size_t n, int add_generation_prompt,
                  size_t *len);

/* The ids of chat_render's text, exactly as tokenizer_encode gives them for the whole text,
 * and a loss mask (1 on assistant replies and their <|im_end|>) of the same length; both
 * malloc'd. Returns 0, or -1 with err naming the message (an unknown role, invalid UTF-8). */
int chat_encode(const struct tokenizer *t, const struct chat_message *msgs, size_t n,
                int add_generation_prompt, int32_t **ids, uint8_t **mask, size_t *n_ids,
                char *err, size_t errlen);

#endif
