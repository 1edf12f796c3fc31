/* What qwen3-prep does, as functions (data/prep_main.c only parses arguments):
 * input records -> token documents -> an HDF5 shard (data/shard.h), and the tokenize /
 * detokenize filters. Input formats of `build`:
 *
 *   text   one document per line; blank lines are skipped
 *   jsonl  one {"text": ...} object per line
 *   chat   one {"messages": [{"role", "content"}, ...]} per line, in the Qwen3 chat template,
 *          with a loss mask on assistant replies (data/chat.h); at least one reply per line
 *   tsv    prompt<TAB>target per line: one user turn and its reply, masked like chat; the
 *          escapes \n, \t and \\ stand for newline, tab and backslash in both fields
 *   ids    space-separated token ids per line, no tokenizer, each below the vocabulary size
 *   bytes  every byte of a file is one token (vocabulary 256), one document per file
 *
 * text and jsonl documents end with <|endoftext|>; chat and tsv end with the template's
 * "<|im_end|>\n"; ids and bytes are taken as they are. A line ends at "\n" or "\r\n". */
#ifndef QWEN3_PREP_H
#define QWEN3_PREP_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct tokenizer;
struct shard_writer;

enum prep_format { PREP_TEXT, PREP_JSONL, PREP_CHAT, PREP_TSV, PREP_IDS, PREP_BYTES };

/* "text", "jsonl", ... -> the format; -1 for another name. */
int prep_format_parse(const char *name);
/* 1 for the formats that need a tokenizer (all but ids and bytes). */
int prep_format_needs_tokenizer(enum prep_format f);
/* 1 for the formats with a loss mask (chat, tsv). */
int prep_format_has_mask(enum prep_format f);

struct prep_config {
  enum prep_format format;
  const struct tokenizer *tok;   /* NULL for ids and bytes */
  uint32_t vocab_size;           /* every id must be below it */
  int skip_bad;                  /* count and skip bad lines instead of failing */
  int quiet;                     /* no progress bar, no warnings */
};

/* One document: ids and, for chat and tsv, the loss mask (mask[i] = 1: learn ids[i]). */
struct prep_doc {
  uint32_t *ids;
  uint8_t *mask;
  size_t n, cap;
};

/* Turns one record (a line without its line end; for bytes, a whole file) into doc, replacing
 * what doc held. Returns 1 for a document, 0 for a blank line, -1 with err saying what is
 * wrong (the caller adds file:line). */
int prep_record(const struct prep_config *c, const char *rec, size_t len, struct prep_doc *doc,
                char *err, size_t errlen);
void prep_doc_free(struct prep_doc *doc);

/* Lines skipped; what went into the shard, the writer counts (shard_writer_docs, ...). */
struct prep_stats {
  uint64_t bad, blank;
};

/* Reads every input ("-" is stdin) into w, adding to st. Returns 0, or -1 with err naming
 * file:line (or the file). A progress bar goes to stderr when it is a terminal. */
int prep_build(const struct prep_config *c, char *const *inputs, size_t n_inputs,
               struct shard_writer *w, struct prep_stats *st, char *err, size_t errlen);

/* Filters: one document per line of in, its ids space-separated per line of out (or, with
 * jsonl, {"text": ...} in and {"ids": [...]} out); detokenize is the inverse of the plain form.
 * Return 0, or -1 with err naming in_name:line. */
int prep_tokenize(const struct tokenizer *t, FILE *in, const char *in_name, FILE *out, int jsonl,
                  char *err, size_t errlen);
int prep_detokenize(const struct tokenizer *t, FILE *in, const char *in_name, FILE *out,
                    char *err, size_t errlen);

#endif
