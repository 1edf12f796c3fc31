/* qwen3-prep's work (data/prep.c): every input format on hand-checked records, loss masks of
 * chat and tsv, shards written and read back, bad lines (file:line errors, --skip-bad), and the
 * tokenize/detokenize filters. */
#define _POSIX_C_SOURCE 200809L
#include "common/util.h"
#include "data/prep.h"
#include "data/shard.h"
#include "data/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/check.h"
#include "tests/test_tokenizer_file.h"

static const struct tokenizer *tok;
static char dir[] = "/tmp/test_prep_XXXXXX";

/* <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n, checked by hand
 * against Hugging Face's tokens: the loss covers "Hello" "!" <|im_end|> only. */
static const uint32_t HI_IDS[] = {151644, 872, 198, 13048, 0, 151645, 198,
                                  151644, 77091, 198, 9707, 0, 151645, 198};
static const uint8_t HI_MASK[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0};
#define HI_N (sizeof HI_IDS / sizeof *HI_IDS)

static struct prep_config config(enum prep_format f) {
  return (struct prep_config){.format = f,
                              .tok = prep_format_needs_tokenizer(f) ? tok : NULL,
                              .vocab_size = prep_format_needs_tokenizer(f)
                                                ? tokenizer_vocab_size(tok)
                                                : f == PREP_BYTES ? 256 : 1000,
                              .quiet = 1};
}

static int record(enum prep_format f, const char *rec, struct prep_doc *d, char *err) {
  struct prep_config c = config(f);
  return prep_record(&c, rec, strlen(rec), d, err, 256);
}

static int doc_is(const struct prep_doc *d, const uint32_t *ids, const uint8_t *mask, size_t n) {
  if (d->n != n || memcmp(d->ids, ids, n * sizeof *ids)) return 0;
  return !mask || memcmp(d->mask, mask, n) == 0;
}

static void test_records(void) {
  struct prep_doc d = {0};
  char err[256] = "";

  CHECK(record(PREP_CHAT,
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"},"
               " {\"role\": \"assistant\", \"content\": \"Hello!\"}]}",
               &d, err) == 1, "chat: %s", err);
  CHECK(doc_is(&d, HI_IDS, HI_MASK, HI_N), "chat ids and mask");
  CHECK(record(PREP_TSV, "Hi!\tHello!", &d, err) == 1, "tsv: %s", err);
  CHECK(doc_is(&d, HI_IDS, HI_MASK, HI_N), "tsv ids and mask equal chat's");

  /* escapes: the tsv turn equals the chat turn with real newlines and tabs */
  struct prep_doc chat = {0};
  CHECK(record(PREP_CHAT,
               "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\nb\\\\n\"},"
               " {\"role\": \"assistant\", \"content\": \"c\\td\"}]}",
               &chat, err) == 1, "chat: %s", err);
  CHECK(record(PREP_TSV, "a\\nb\\\\n\tc\\td", &d, err) == 1, "tsv escapes: %s", err);
  CHECK(doc_is(&d, chat.ids, chat.mask, chat.n), "tsv escapes");
  prep_doc_free(&chat);

  const uint32_t hello[] = {9707, 1879, 0, 151643};   /* Hello world! <|endoftext|> */
  CHECK(record(PREP_TEXT, "Hello world!", &d, err) == 1 && doc_is(&d, hello, NULL, 4), "text");
  CHECK(record(PREP_JSONL, "{\"text\": \"Hello world!\"}", &d, err) == 1 &&
            doc_is(&d, hello, NULL, 4), "jsonl");
  /* JSON may hold NUL characters (Hugging Face tokenizers accepts "\u0000"): byte 0 is token 188 */
  const uint32_t with_nul[] = {64, 188, 65, 151643};   /* a \0 b <|endoftext|> */
  CHECK(record(PREP_JSONL, "{\"text\": \"a\\u0000b\"}", &d, err) == 1 &&
            doc_is(&d, with_nul, NULL, 4), "jsonl with \\u0000: %s", err);
  CHECK(record(PREP_TEXT, "", &d, err) == 0, "blank text line");

  const uint32_t ids[] = {1, 22, 333};
  CHECK(record(PREP_IDS, " 1 22\t333 ", &d, err) == 1 && doc_is(&d, ids, NULL, 3), "ids");
  CHECK(record(PREP_IDS, "  ", &d, err) == 0, "blank ids line");
  const uint32_t bytes[] = {'a', 0xc3, 0xa9};
  CHECK(record(PREP_BYTES, "a\xc3\xa9", &d, err) == 1 && doc_is(&d, bytes, NULL, 3), "bytes");

  /* what is wrong with a bad record */
  struct { enum prep_format f; const char *rec, *why; } bad[] = {
    {PREP_IDS, "1 2 x", "byte 4: not a token id"},
    {PREP_IDS, "5 1000", "id 1000 at byte 2: not below the vocabulary size 1000"},
    {PREP_IDS, "99999999999999999999", "byte 10: not a token id"},
    {PREP_TEXT, "ok\xff", "invalid UTF-8 at byte offset 2"},
    {PREP_TSV, "no tab", "not prompt<TAB>target (no tab)"},
    {PREP_TSV, "a\tb\tc", "not prompt<TAB>target (more than one tab)"},
    {PREP_JSONL, "{\"txt\": \"x\"}", "no string \"text\""},
    {PREP_CHAT, "[1]", "no non-empty array \"messages\""},
    {PREP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
     "no assistant message: nothing to learn"},
    {PREP_CHAT, "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
     "messages[0].role: \"bot\" is none of system, user, assistant"},
    {PREP_CHAT, "{\"messages\": [{\"role\": \"user\"}]}",
     "messages[0]: needs string \"role\" and \"content\""},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    err[0] = 0;
    CHECK(record(bad[i].f, bad[i].rec, &d, err) == -1 && strcmp(err, bad[i].why) == 0,
          "bad record \"%s\": got \"%s\", want \"%s\"", bad[i].rec, err, bad[i].why);
  }
  CHECK(record(PREP_JSONL, "{not json", &d, err) == -1 && strncmp(err, "not JSON", 8) == 0,
        "not JSON: %s", err);
  prep_doc_free(&d);
}

static char *write_temp(const char *name, const char *text) {
  char *path = xmalloc(strlen(dir) + strlen(name) + 2);
  sprintf(path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) die("%s: cannot write", path);
  fputs(text, f);
  fclose(f);
  return path;
}

/* Builds a shard from inputs; returns prep_build's result and the shard read back. */
static int build(struct prep_config c, char **inputs, size_t n, struct shard *s,
                 struct prep_stats *st, char *err) {
  struct shard_writer *w = shard_writer_new(prep_format_has_mask(c.format));
  memset(st, 0, sizeof *st);
  if (prep_build(&c, inputs, n, w, st, err, 512)) {
    char ignored[512];   /* finishing is the only way to free a writer; this path cannot work */
    shard_writer_finish(w, "/nonexistent/dir/x.h5", c.vocab_size, "x", ignored, sizeof ignored);
    return -1;
  }
  char out[64];
  snprintf(out, sizeof out, "%s/out.h5", dir);
  const char *name = c.tok ? tokenizer_hash(c.tok) : "ids";
  if (shard_writer_finish(w, out, c.vocab_size, name, err, 512)) return -1;
  return shard_load(s, out, err, 512);
}

static void test_build(void) {
  char err[512] = "";
  struct prep_stats st;
  struct shard s;

  /* two chat files, a blank line in between: masks as checked by hand, doc boundaries */
  const char *hi = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"},"
                   " {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n";
  char *chat_a = write_temp("a.jsonl", hi);
  char text[512];   /* the first line ends in "\r\n", then a blank line */
  snprintf(text, sizeof text, "%.*s\r\n\n%s", (int)strlen(hi) - 1, hi, hi);
  char *chat_b = write_temp("b.jsonl", text);
  char *inputs[] = {chat_a, chat_b};
  CHECK(build(config(PREP_CHAT), inputs, 2, &s, &st, err) == 0, "chat build: %s", err);
  CHECK(s.n_docs == 3 && s.n_tokens == 3 * HI_N && s.loss_mask && st.blank == 1 && st.bad == 0,
        "chat shard: %llu docs, %llu tokens, %llu blank", (unsigned long long)s.n_docs,
        (unsigned long long)s.n_tokens, (unsigned long long)st.blank);
  for (size_t d = 0; s.loss_mask && d < s.n_docs && s.n_tokens == 3 * HI_N; d++) {
    CHECK(s.doc_offsets[d] == d * HI_N, "doc_offsets[%zu]", d);
    CHECK(memcmp(s.tokens + d * HI_N, HI_IDS, sizeof HI_IDS) == 0, "tokens of doc %zu", d);
    CHECK(memcmp(s.loss_mask + d * HI_N, HI_MASK, sizeof HI_MASK) == 0, "mask of doc %zu", d);
  }
  CHECK(s.vocab_size == 151669 && strcmp(s.tokenizer, tokenizer_hash(tok)) == 0, "attributes");
  shard_free(&s);

  /* a bad line stops the build, naming file:line; --skip-bad counts and skips it */
  char *ids = write_temp("ids.txt", "1 2 3\n4 x 6\n\n7 8\n1000\n");
  struct prep_config c = config(PREP_IDS);
  CHECK(build(c, &ids, 1, &s, &st, err) == -1, "bad line accepted");
  char want[256];
  snprintf(want, sizeof want, "%s:2: byte 2: not a token id", ids);
  CHECK(strcmp(err, want) == 0, "bad line error \"%s\", want \"%s\"", err, want);
  c.skip_bad = 1;
  CHECK(build(c, &ids, 1, &s, &st, err) == 0, "--skip-bad: %s", err);
  CHECK(st.bad == 2 && st.blank == 1 && s.n_docs == 2 && s.n_tokens == 5 && !s.loss_mask &&
            s.vocab_size == 1000 && strcmp(s.tokenizer, "ids") == 0,
        "--skip-bad: %llu bad, %llu docs", (unsigned long long)st.bad,
        (unsigned long long)s.n_docs);
  shard_free(&s);

  char *missing = "/nonexistent/input.txt";
  CHECK(build(config(PREP_TEXT), &missing, 1, &s, &st, err) == -1 &&
            strncmp(err, "/nonexistent/input.txt: ", 24) == 0,
        "missing input: %s", err);
  free(chat_a);
  free(chat_b);
  free(ids);
}

static void test_filters(void) {
  char err[512] = "";
  FILE *in = tmpfile(), *ids = tmpfile(), *back = tmpfile();
  const char *text = "Hello world!\n\n你好<|im_end|>\r\nlast line without newline";
  fputs(text, in);
  rewind(in);
  CHECK(prep_tokenize(tok, in, "in", ids, 0, err, sizeof err) == 0, "tokenize: %s", err);
  rewind(ids);
  char line[256];
  CHECK(fgets(line, sizeof line, ids) && strcmp(line, "9707 1879 0\n") == 0, "ids line: %s", line);
  rewind(ids);
  CHECK(prep_detokenize(tok, ids, "ids", back, err, sizeof err) == 0, "detokenize: %s", err);
  rewind(back);
  size_t n = fread(line, 1, sizeof line - 1, back);
  line[n] = 0;
  /* "\r\n" ends a line like "\n"; the last line gains its newline */
  CHECK(strcmp(line, "Hello world!\n\n你好<|im_end|>\nlast line without newline\n") == 0,
        "round trip: %s", line);
  fclose(in);
  fclose(ids);
  fclose(back);

  in = tmpfile();
  FILE *out = tmpfile();
  fputs("{\"text\": \"Hello world!\"}\n{\"text\": 5}\n", in);
  rewind(in);
  CHECK(prep_tokenize(tok, in, "in", out, 1, err, sizeof err) == -1 &&
            strcmp(err, "in:2: no string \"text\"") == 0,
        "tokenize --jsonl error: %s", err);
  rewind(out);
  CHECK(fgets(line, sizeof line, out) && strcmp(line, "{\"ids\":[9707,1879,0]}\n") == 0,
        "jsonl line: %s", line);
  fclose(in);
  fclose(out);

  in = tmpfile();
  out = tmpfile();
  fputs("9707\n151669\n", in);
  rewind(in);
  CHECK(prep_detokenize(tok, in, "in", out, err, sizeof err) == -1 &&
            strcmp(err, "in:2: id 151669 at byte 0: not below the vocabulary size 151669") == 0,
        "detokenize error: %s", err);
  fclose(in);
  fclose(out);
}

int main(void) {
  struct tokenizer *t = load_test_tokenizer();
  tok = t;
  if (!mkdtemp(dir)) die("mkdtemp %s failed", dir);
  test_records();
  test_build();
  test_filters();
  char cmd[64];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) warn("could not remove %s", dir);
  tokenizer_free(t);
  return checks_report();
}
