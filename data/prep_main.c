/* qwen3-prep: tokenize text and build HDF5 token shards. The work is in data/prep.c. */
#include "common/util.h"
#include "data/loader.h"
#include "data/prep.h"
#include "data/shard.h"
#include "data/tokenizer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
  "usage: qwen3-prep tokenize --tokenizer TOKENIZER.json [--jsonl]   < text > ids\n"
  "       qwen3-prep detokenize --tokenizer TOKENIZER.json           < ids > text\n"
  "       qwen3-prep build --format FORMAT --out SHARD.h5 [options] INPUT...\n"
  "       qwen3-prep stats --seq-len N SHARD.h5...\n"
  "\n"
  "tokenize: each line of stdin is one document; each output line its ids, space-separated.\n"
  "  --jsonl   input lines are {\"text\": ...}, output lines {\"ids\": [...]}\n"
  "  No special token is added. detokenize turns id lines back into text lines.\n"
  "\n"
  "build: token shard for training (tokens, doc_offsets, loss_mask for chat and tsv).\n"
  "  --format text    one document per line (blank lines skipped); ends with <|endoftext|>\n"
  "           jsonl   one {\"text\": ...} per line; ends with <|endoftext|>\n"
  "           chat    one {\"messages\": [{\"role\": ..., \"content\": ...}, ...]} per line,\n"
  "                   Qwen3 chat template, loss on the assistant replies only\n"
  "           tsv     prompt<TAB>target per line (\\n \\t \\\\ escapes), masked like chat\n"
  "           ids     space-separated token ids per line (no tokenizer; needs --vocab-size)\n"
  "           bytes   each byte of a file is one token, vocabulary 256, one document per file\n"
  "  --out FILE         the shard to write (written under a temporary name, then renamed)\n"
  "  --tokenizer FILE   tokenizer.json (all formats but ids and bytes)\n"
  "  --vocab-size N     vocabulary size attribute; every id must be below it\n"
  "                     (default: the tokenizer's, or 256 for bytes)\n"
  "  --skip-bad         count and skip bad lines instead of stopping at the first\n"
  "  --quiet            no progress bar, warnings or summary\n"
  "  INPUT \"-\" is stdin. A line ends at \\n or \\r\\n.\n"
  "\n"
  "stats: the training sequences of N tokens (data.seq_len) the shards give, and the share of\n"
  "  their tokens that is padding, one document per sequence and packed (data.pack: true).\n";

_Noreturn static void usage_error(const char *fmt, ...) PRINTF_LIKE(1, 2);
_Noreturn static void usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "qwen3-prep: ");
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n(qwen3-prep --help shows the usage)\n");
  exit(2);
}

struct args {
  const char *command, *tokenizer, *format, *out, *vocab_size, *seq_len;
  int jsonl, skip_bad, quiet;
  char **inputs;
  size_t n_inputs;
};

static struct args parse_args(int argc, char **argv) {
  struct args a = {0};
  if (argc < 2) {
    fputs(USAGE, stderr);
    exit(2);
  }
  a.command = argv[1];
  if (!strcmp(a.command, "-h") || !strcmp(a.command, "--help")) {
    fputs(USAGE, stdout);
    exit(0);
  }
  if (strcmp(a.command, "tokenize") && strcmp(a.command, "detokenize") &&
      strcmp(a.command, "build") && strcmp(a.command, "stats"))
    usage_error("unknown command \"%s\"", a.command);
  a.inputs = xcalloc((size_t)argc, sizeof *a.inputs);
  for (int i = 2; i < argc; i++) {
    const char *arg = argv[i];
    const char **value = !strcmp(arg, "--tokenizer")    ? &a.tokenizer
                         : !strcmp(arg, "--format")     ? &a.format
                         : !strcmp(arg, "--out")        ? &a.out
                         : !strcmp(arg, "--vocab-size") ? &a.vocab_size
                         : !strcmp(arg, "--seq-len")    ? &a.seq_len
                                                        : NULL;
    if (value) {
      if (i + 1 >= argc) usage_error("%s needs a value", arg);
      *value = argv[++i];
    } else if (!strcmp(arg, "--jsonl")) {
      a.jsonl = 1;
    } else if (!strcmp(arg, "--skip-bad")) {
      a.skip_bad = 1;
    } else if (!strcmp(arg, "--quiet")) {
      a.quiet = 1;
    } else if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
      fputs(USAGE, stdout);
      exit(0);
    } else if (arg[0] == '-' && arg[1]) {
      usage_error("unknown option %s", arg);
    } else {
      a.inputs[a.n_inputs++] = argv[i];
    }
  }
  return a;
}

static struct tokenizer *load_tokenizer(const char *path) {
  char err[1024];
  struct tokenizer *t = tokenizer_load(path, err, sizeof err);
  if (!t) die("--tokenizer %s", err);
  return t;
}

static int filter(const struct args *a) {
  if (!a->tokenizer) usage_error("%s needs --tokenizer", a->command);
  if (a->n_inputs)
    usage_error("%s reads stdin: unexpected argument \"%s\"", a->command, a->inputs[0]);
  struct tokenizer *t = load_tokenizer(a->tokenizer);
  char err[1024];
  int rc = !strcmp(a->command, "tokenize")
               ? prep_tokenize(t, stdin, "stdin", stdout, a->jsonl, err, sizeof err)
               : prep_detokenize(t, stdin, "stdin", stdout, err, sizeof err);
  tokenizer_free(t);
  if (fflush(stdout) != 0) die("stdout: %s", strerror(errno));
  if (rc) die("%s", err);
  return 0;
}

static int build(const struct args *a) {
  if (!a->format) usage_error("build needs --format");
  int format = prep_format_parse(a->format);
  if (format < 0) usage_error("--format %s: not one of text jsonl chat tsv ids bytes", a->format);
  if (!a->out) usage_error("build needs --out");
  if (!a->n_inputs) usage_error("build needs at least one INPUT");
  if (prep_format_needs_tokenizer(format) && !a->tokenizer)
    usage_error("--format %s needs --tokenizer", a->format);
  if (!prep_format_needs_tokenizer(format) && a->tokenizer)
    usage_error("--format %s uses no tokenizer: drop --tokenizer", a->format);
  if (format == PREP_IDS && !a->vocab_size) usage_error("--format ids needs --vocab-size");

  struct prep_config c = {.format = format, .skip_bad = a->skip_bad, .quiet = a->quiet};
  struct tokenizer *t = a->tokenizer ? load_tokenizer(a->tokenizer) : NULL;
  c.tok = t;
  c.vocab_size = t ? tokenizer_vocab_size(t) : 256;
  if (a->vocab_size) {
    char *end;
    unsigned long v = strtoul(a->vocab_size, &end, 10);
    if (*end || !*a->vocab_size || v == 0 || v > UINT32_MAX)
      usage_error("--vocab-size %s: not a positive 32-bit number", a->vocab_size);
    c.vocab_size = (uint32_t)v;
  }
  const char *name = t ? tokenizer_hash(t) : format == PREP_BYTES ? "bytes" : "ids";

  struct shard_writer *w = shard_writer_new(prep_format_has_mask(format));
  struct prep_stats st = {0};
  char err[1024];
  if (prep_build(&c, a->inputs, a->n_inputs, w, &st, err, sizeof err)) die("%s", err);
  uint64_t docs = shard_writer_docs(w), tokens = shard_writer_tokens(w);
  uint64_t masked = shard_writer_masked(w);
  if (docs == 0) die("%s: no documents in the input", a->out);
  if (shard_writer_finish(w, a->out, c.vocab_size, name, err, sizeof err)) die("--out %s", err);
  if (!a->quiet) {
    printf("qwen3-prep: wrote %s: %llu documents, %llu tokens", a->out, (unsigned long long)docs,
           (unsigned long long)tokens);
    if (prep_format_has_mask(format)) printf(", %llu loss-masked", (unsigned long long)masked);
    printf(" (vocab %u, tokenizer %.16s)", c.vocab_size, name);
    if (st.blank) printf(", %llu blank lines skipped", (unsigned long long)st.blank);
    if (st.bad) printf(", %llu bad lines skipped", (unsigned long long)st.bad);
    printf("\n");
  }
  tokenizer_free(t);
  return 0;
}

/* What packing saves on these shards: sequences and padding, with and without it. */
static int stats(const struct args *a) {
  if (!a->seq_len) usage_error("stats needs --seq-len");
  char *end;
  long seq = strtol(a->seq_len, &end, 10);
  if (*end || !*a->seq_len || seq < 1 || seq > INT32_MAX / 2)
    usage_error("--seq-len %s: not a positive number", a->seq_len);
  if (!a->n_inputs) usage_error("stats needs at least one SHARD");
  struct loader plain, packed;
  loader_open(&plain, a->inputs, (int)a->n_inputs, (int)seq, 0, INT32_MAX, "SHARD", 0);
  loader_open(&packed, a->inputs, (int)a->n_inputs, (int)seq, 0, INT32_MAX, "SHARD", LOADER_PACK);
  uint64_t docs = 0, tokens = 0;
  for (int i = 0; i < plain.n_shards; i++) {
    docs += plain.shards[i].n_docs;
    tokens += plain.shards[i].n_tokens;
  }
  printf("%zu shard%s: %llu documents, %llu tokens%s\n", a->n_inputs, a->n_inputs > 1 ? "s" : "",
         (unsigned long long)docs, (unsigned long long)tokens,
         plain.documents ? ", loss mask" : "");
  printf("sequences of %ld tokens, %-22s %8llu, padding %5.1f%%\n", seq,
         plain.documents ? "one document each:" : "windows of the stream:",
         (unsigned long long)plain.n_samples, 100 * loader_padding(&plain));
  printf("sequences of %ld tokens, %-22s %8llu, padding %5.1f%%\n", seq, "packed (data.pack):",
         (unsigned long long)packed.n_samples, 100 * loader_padding(&packed));
  loader_close(&plain);
  loader_close(&packed);
  return 0;
}

int main(int argc, char **argv) {
  struct args a = parse_args(argc, argv);
  int rc = !strcmp(a.command, "build")   ? build(&a)
           : !strcmp(a.command, "stats") ? stats(&a)
                                         : filter(&a);
  free(a.inputs);
  return rc;
}
