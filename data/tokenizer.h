/* A byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json, producing the same ids as
 * Hugging Face `tokenizers` for Qwen3 (REFERENCE.md "Tokenizer"):
 *
 *   1. added tokens (<|im_end|>, <think>, ...) are cut out of the raw text first, leftmost match
 *      first and the longest one where several start at the same byte;
 *   2. every stretch of text between them is NFC-normalized (utf8proc);
 *   3. the Split pre-tokenizer's regex (PCRE2, UTF + UCP) cuts it into pieces; matches and the
 *      gaps between them are both pieces ("Isolated");
 *   4. each piece's bytes become byte tokens (GPT-2 ByteLevel), merged by BPE merge rank.
 *
 * Only the features Qwen3's tokenizer.json uses are implemented; a file that asks for another
 * (another model type, normalizer, pre-tokenizer, byte fallback, added tokens with lstrip/rstrip,
 * ...) is refused at load with a message that names the field, never tokenized differently.
 *
 * Differences from Hugging Face that remain: code points assigned in a Unicode version newer
 * than PCRE2's or utf8proc's tables (e.g. CJK Extension I, Unicode 15.1) may split or normalize
 * differently. tests/unit/test_tokenizer.c checks exact ids on a fixture corpus.
 *
 * Invalid UTF-8 input is an error that names the byte offset of the first bad sequence. No
 * special token is ever added by encode (no BOS/EOS): callers add <|endoftext|> or the chat
 * template's tokens themselves. A loaded tokenizer is read-only, so threads may share it. */
#ifndef QWEN3_TOKENIZER_H
#define QWEN3_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* Token ids run from 0 to TOKENIZER_MAX_IDS - 1 (Qwen3: 151668); a file naming a larger id is
 * refused before anything the size of the vocabulary is allocated. */
#define TOKENIZER_MAX_IDS (1 << 24)

/* Loads and validates the whole file (JSON syntax, every pipeline setting, every vocabulary id,
 * merge and added token, the Split regex): NULL with a message naming the file, the field and
 * what is allowed in err. Callers that take a tokenizer path from a job call it before any
 * work. */
struct tokenizer *tokenizer_load(const char *path, char *err, size_t errlen);
/* tokenizer_load and free: 0, or -1 with err filled. For validating a path early. */
int tokenizer_validate(const char *path, char *err, size_t errlen);
void tokenizer_free(struct tokenizer *t);

/* Encodes text[0..len) (may contain NUL bytes) into a new malloc'd array *ids of *n ids.
 * Returns 0, or -1 with err filled ("invalid UTF-8 at byte offset N") and *ids NULL. */
int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, int32_t **ids,
                     size_t *n, char *err, size_t errlen);

/* The bytes of ids[0..n): byte-level tokens as their bytes, added tokens as their content.
 * A malloc'd NUL-terminated buffer of *len bytes, which need not be valid UTF-8 when ids cut a
 * character in two (so that decoding consecutive slices and concatenating is exact).
 * NULL if an id is not a token (see tokenizer_is_token). */
char *tokenizer_decode(const struct tokenizer *t, const int32_t *ids, size_t n, size_t *len);

/* The id of a token given as written in tokenizer.json (added tokens by content, e.g.
 * "<|im_end|>"; vocabulary entries in their byte-level form, e.g. "Ġthe"); -1 if none. */
int32_t tokenizer_token_id(const struct tokenizer *t, const char *token);
/* 1 if id names a token (vocabulary or added), else 0. */
int tokenizer_is_token(const struct tokenizer *t, int32_t id);
/* Largest id + 1 (151669 for Qwen3; the model's embedding may be larger). */
uint32_t tokenizer_vocab_size(const struct tokenizer *t);
/* sha256 of the tokenizer.json bytes, 64 hex digits: names the tokenizer in shard attributes. */
const char *tokenizer_hash(const struct tokenizer *t);

/* Offset of the first byte of s[0..len) that does not start a well-formed UTF-8 sequence
 * (RFC 3629: no overlong forms, surrogates or code points above U+10FFFF); len if all is valid.
 * tokenizer_encode checks its input with it; callers use it to name the field at fault. */
size_t utf8_invalid_offset(const char *s, size_t len);

#endif
