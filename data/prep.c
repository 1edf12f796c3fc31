#define _POSIX_C_SOURCE 200809L
#include "data/prep.h"

#include "common/util.h"
#include "data/chat.h"
#include "data/shard.h"
#include "data/tokenizer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

/* Bad lines reported one by one under --skip-bad before only the count is kept. */
#define MAX_BAD_SHOWN 10

static const char *const FORMAT_NAMES[] = {"text", "jsonl", "chat", "tsv", "ids", "bytes"};

int prep_format_parse(const char *name) {
  for (int f = 0; f < (int)(sizeof FORMAT_NAMES / sizeof *FORMAT_NAMES); f++)
    if (!strcmp(name, FORMAT_NAMES[f])) return f;
  return -1;
}

int prep_format_needs_tokenizer(enum prep_format f) { return f != PREP_IDS && f != PREP_BYTES; }

int prep_format_has_mask(enum prep_format f) { return f == PREP_CHAT || f == PREP_TSV; }

/* ---- one record -> one document ------------------------------------------------------------ */

static void doc_push(struct prep_doc *d, uint32_t id, uint8_t mask) {
  if (d->n == d->cap) {
    d->cap = d->cap ? 2 * d->cap : 1024;
    d->ids = xrealloc(d->ids, d->cap * sizeof *d->ids);
    d->mask = xrealloc(d->mask, d->cap);
  }
  d->ids[d->n] = id;
  d->mask[d->n++] = mask;
}

void prep_doc_free(struct prep_doc *d) {
  free(d->ids);
  free(d->mask);
  memset(d, 0, sizeof *d);
}

/* Text followed by <|endoftext|>, the document end of text and jsonl. */
static int text_doc(const struct prep_config *c, const char *text, size_t len,
                    struct prep_doc *d, char *err, size_t errlen) {
  int32_t *ids;
  size_t n;
  if (tokenizer_encode(c->tok, text, len, &ids, &n, err, errlen)) return -1;
  for (size_t i = 0; i < n; i++) doc_push(d, (uint32_t)ids[i], 0);
  free(ids);
  doc_push(d, (uint32_t)tokenizer_token_id(c->tok, "<|endoftext|>"), 0);
  return 1;
}

static int chat_doc(const struct prep_config *c, const struct chat_message *m, size_t n,
                    struct prep_doc *d, char *err, size_t errlen) {
  int32_t *ids;
  uint8_t *mask;
  size_t n_ids;
  if (chat_encode(c->tok, m, n, 0, &ids, &mask, &n_ids, err, errlen)) return -1;
  int masked = 0;
  for (size_t i = 0; i < n_ids; i++) {
    doc_push(d, (uint32_t)ids[i], mask[i]);
    masked |= mask[i];
  }
  free(ids);
  free(mask);
  if (!masked) return errorf(err, errlen, "no assistant message: nothing to learn");
  return 1;
}

static int jsonl_record(const struct prep_config *c, const char *rec, size_t len,
                        struct prep_doc *d, char *err, size_t errlen) {
  json_error_t jerr;
  json_t *root = json_loadb(rec, len, JSON_ALLOW_NUL, &jerr);
  if (!root) return errorf(err, errlen, "not JSON (column %d): %s", jerr.column, jerr.text);
  int rc;
  if (c->format == PREP_JSONL) {
    const json_t *text = json_object_get(root, "text");
    rc = !json_is_string(text) ? errorf(err, errlen, "no string \"text\"")
         : json_string_length(text) == 0
             ? 0
             : text_doc(c, json_string_value(text), json_string_length(text), d, err, errlen);
  } else {
    const json_t *msgs = json_object_get(root, "messages");
    size_t n = json_array_size(msgs);
    struct chat_message *m = xcalloc(n, sizeof *m);
    rc = n ? 0 : errorf(err, errlen, "no non-empty array \"messages\"");
    for (size_t i = 0; i < n && rc == 0; i++) {
      const json_t *msg = json_array_get(msgs, i);
      const json_t *role = json_object_get(msg, "role"), *content = json_object_get(msg, "content");
      if (!json_is_string(role) || !json_is_string(content))
        rc = errorf(err, errlen, "messages[%zu]: needs string \"role\" and \"content\"", i);
      else if (strlen(json_string_value(role)) != json_string_length(role))
        rc = errorf(err, errlen, "messages[%zu]: \"role\" holds a NUL character", i);
      else
        m[i] = (struct chat_message){json_string_value(role), json_string_value(content),
                                     json_string_length(content)};
    }
    if (rc == 0) rc = chat_doc(c, m, n, d, err, errlen);
    free(m);
  }
  json_decref(root);
  return rc;
}

/* Decodes \n, \t and \\ in place; other backslashes stay as they are. Returns the new length. */
static size_t tsv_unescape(char *s, size_t n) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    char e = i + 1 < n && s[i] == '\\' ? s[i + 1] : 0;
    if (e == 'n' || e == 't' || e == '\\') {
      s[o++] = e == 'n' ? '\n' : e == 't' ? '\t' : '\\';
      i++;
    } else {
      s[o++] = s[i];
    }
  }
  return o;
}

static int tsv_record(const struct prep_config *c, const char *rec, size_t len,
                      struct prep_doc *d, char *err, size_t errlen) {
  const char *tab = memchr(rec, '\t', len);
  if (!tab || memchr(tab + 1, '\t', len - (size_t)(tab + 1 - rec)))
    return errorf(err, errlen, "not prompt<TAB>target (%s tab)", tab ? "more than one" : "no");
  char *copy = xmalloc(len + 1);
  memcpy(copy, rec, len);
  size_t cut = (size_t)(tab - rec);
  struct chat_message m[2] = {
    {"user", copy, tsv_unescape(copy, cut)},
    {"assistant", copy + cut + 1, tsv_unescape(copy + cut + 1, len - cut - 1)},
  };
  int rc = chat_doc(c, m, 2, d, err, errlen);
  free(copy);
  return rc;
}

static int ids_record(const struct prep_config *c, const char *rec, size_t len,
                      struct prep_doc *d, char *err, size_t errlen) {
  size_t i = 0;
  while (i < len) {
    if (rec[i] == ' ' || rec[i] == '\t') {
      i++;
      continue;
    }
    uint64_t v = 0;
    size_t start = i;
    while (i < len && rec[i] >= '0' && rec[i] <= '9' && v <= UINT32_MAX)
      v = v * 10 + (uint64_t)(rec[i++] - '0');
    if (i == start || (i < len && rec[i] != ' ' && rec[i] != '\t'))
      return errorf(err, errlen, "byte %zu: not a token id", i);
    if (v >= c->vocab_size)
      return errorf(err, errlen, "id %llu at byte %zu: not below the vocabulary size %u",
                  (unsigned long long)v, start, c->vocab_size);
    doc_push(d, (uint32_t)v, 0);
  }
  return d->n > 0;
}

int prep_record(const struct prep_config *c, const char *rec, size_t len, struct prep_doc *d,
                char *err, size_t errlen) {
  d->n = 0;
  if (len == 0) return 0;
  if (c->format == PREP_TEXT || c->format == PREP_TSV) {
    size_t bad = utf8_invalid_offset(rec, len);
    if (bad < len) return errorf(err, errlen, "invalid UTF-8 at byte offset %zu", bad);
  }
  int rc;
  switch (c->format) {
  case PREP_TEXT: rc = text_doc(c, rec, len, d, err, errlen); break;
  case PREP_JSONL:
  case PREP_CHAT: rc = jsonl_record(c, rec, len, d, err, errlen); break;
  case PREP_TSV: rc = tsv_record(c, rec, len, d, err, errlen); break;
  case PREP_IDS: rc = ids_record(c, rec, len, d, err, errlen); break;
  case PREP_BYTES:
    for (size_t i = 0; i < len; i++) doc_push(d, (uint8_t)rec[i], 0);
    rc = 1;
    break;
  default: return errorf(err, errlen, "unknown format %d", (int)c->format);
  }
  for (size_t i = 0; rc == 1 && i < d->n; i++)
    if (d->ids[i] >= c->vocab_size)
      rc = errorf(err, errlen, "token %u is not below --vocab-size %u", d->ids[i], c->vocab_size);
  return rc;
}

/* ---- reading inputs ------------------------------------------------------------------------ */

struct progress {
  int shown;
  uint64_t total, done;   /* input bytes; total 0: unknown */
  double start, last;
};

static void progress_draw(struct progress *p, const struct shard_writer *w, int final) {
  if (!p->shown) return;
  double now = now_seconds();
  if (!final && now - p->last < 0.2) return;
  p->last = now;
  char bar[80] = "";   /* no bar when stdin makes the total unknown */
  if (p->total) {
    double frac = final || p->done > p->total ? 1 : (double)p->done / (double)p->total;
    int full = (int)(frac * 30);
    snprintf(bar, sizeof bar, "[%.*s%.*s] %3.0f%% ", full, "##############################",
             30 - full, "..............................", 100 * frac);
  }
  fprintf(stderr, "\rqwen3-prep %s%.1f MB, %llu docs, %.2fM tokens, %.1f MB/s%s", bar,
          p->done / 1e6, (unsigned long long)shard_writer_docs(w), shard_writer_tokens(w) / 1e6,
          p->done / 1e6 / (now - p->start + 1e-9), final ? "\n" : "");
}

/* Adds one record to the shard or, failing, reports it; -1 stops the build. */
static int add_record(const struct prep_config *c, const char *rec, size_t len, const char *where,
                      struct prep_doc *d, struct shard_writer *w, struct prep_stats *st,
                      char *err, size_t errlen) {
  char why[512];
  int rc = prep_record(c, rec, len, d, why, sizeof why);
  if (rc < 0 && !c->skip_bad) return errorf(err, errlen, "%s: %s", where, why);
  if (rc < 0) {
    if (!c->quiet && st->bad < MAX_BAD_SHOWN) warn("%s: %s (skipped)", where, why);
    if (!c->quiet && st->bad == MAX_BAD_SHOWN) warn("more bad lines: only counting them now");
    st->bad++;
    return 0;
  }
  if (rc == 0) {
    st->blank++;
    return 0;
  }
  shard_writer_add(w, d->ids, prep_format_has_mask(c->format) ? d->mask : NULL, d->n);
  return 0;
}

/* getline without the line end ("\n" or "\r\n"); -1 at the end of input. */
static ssize_t read_line(FILE *f, char **line, size_t *cap) {
  ssize_t n = getline(line, cap, f);
  if (n > 0 && (*line)[n - 1] == '\n') n--;
  if (n > 0 && (*line)[n - 1] == '\r') n--;
  return n;
}

static int build_one(const struct prep_config *c, const char *path, struct shard_writer *w,
                     struct prep_stats *st, struct progress *p, char *err, size_t errlen) {
  int is_stdin = !strcmp(path, "-");
  const char *name = is_stdin ? "stdin" : path;
  struct prep_doc d = {0};
  int rc = 0;
  if (c->format == PREP_BYTES) {
    size_t len;
    char *data = read_file(is_stdin ? "/dev/stdin" : path, &len);
    if (!data) return errorf(err, errlen, "%s: %s", name, strerror(errno));
    rc = add_record(c, data, len, name, &d, w, st, err, errlen);
    p->done += len;
    free(data);
  } else {
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    if (!f) return errorf(err, errlen, "%s: %s", name, strerror(errno));
    char *line = NULL, where[4200];
    size_t cap = 0;
    ssize_t n;
    for (size_t lineno = 1; rc == 0 && (n = read_line(f, &line, &cap)) >= 0; lineno++) {
      snprintf(where, sizeof where, "%s:%zu", name, lineno);
      rc = add_record(c, line, (size_t)n, where, &d, w, st, err, errlen);
      p->done += (uint64_t)n + 1;
      progress_draw(p, w, 0);
    }
    if (rc == 0 && ferror(f)) rc = errorf(err, errlen, "%s: read error", name);
    free(line);
    if (!is_stdin) fclose(f);
  }
  prep_doc_free(&d);
  return rc;
}

int prep_build(const struct prep_config *c, char *const *inputs, size_t n_inputs,
               struct shard_writer *w, struct prep_stats *st, char *err, size_t errlen) {
  struct progress p = {.shown = !c->quiet && isatty(STDERR_FILENO), .start = now_seconds()};
  int total_known = 1;
  for (size_t i = 0; i < n_inputs; i++) {
    struct stat sb;
    if (!strcmp(inputs[i], "-")) {
      total_known = 0;
      continue;
    }
    if (stat(inputs[i], &sb) != 0) return errorf(err, errlen, "%s: %s", inputs[i], strerror(errno));
    p.total += (uint64_t)sb.st_size;
  }
  if (!total_known) p.total = 0;
  for (size_t i = 0; i < n_inputs; i++)
    if (build_one(c, inputs[i], w, st, &p, err, errlen)) {
      if (p.shown) fputc('\n', stderr);
      return -1;
    }
  progress_draw(&p, w, 1);
  return 0;
}

/* ---- tokenize / detokenize ----------------------------------------------------------------- */

int prep_tokenize(const struct tokenizer *t, FILE *in, const char *in_name, FILE *out, int jsonl,
                  char *err, size_t errlen) {
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  int rc = 0;
  for (size_t lineno = 1; rc == 0 && (n = read_line(in, &line, &cap)) >= 0; lineno++) {
    const char *text = line;
    size_t len = (size_t)n;
    json_t *root = NULL;
    char why[512];
    if (jsonl) {
      json_error_t jerr;
      root = json_loadb(line, len, JSON_ALLOW_NUL, &jerr);
      const json_t *v = json_object_get(root, "text");
      if (!json_is_string(v)) {
        rc = errorf(err, errlen, "%s:%zu: %s", in_name, lineno,
                  root ? "no string \"text\"" : jerr.text);
        json_decref(root);
        break;
      }
      text = json_string_value(v);
      len = json_string_length(v);
    }
    int32_t *ids;
    size_t n_ids;
    if (tokenizer_encode(t, text, len, &ids, &n_ids, why, sizeof why)) {
      rc = errorf(err, errlen, "%s:%zu: %s", in_name, lineno, why);
    } else {
      fputs(jsonl ? "{\"ids\":[" : "", out);
      for (size_t i = 0; i < n_ids; i++) fprintf(out, i ? (jsonl ? ",%d" : " %d") : "%d", ids[i]);
      fputs(jsonl ? "]}\n" : "\n", out);
      free(ids);
    }
    json_decref(root);
  }
  free(line);
  if (rc == 0 && ferror(in)) rc = errorf(err, errlen, "%s: read error", in_name);
  return rc;
}

int prep_detokenize(const struct tokenizer *t, FILE *in, const char *in_name, FILE *out,
                    char *err, size_t errlen) {
  struct prep_config c = {.format = PREP_IDS, .vocab_size = tokenizer_vocab_size(t)};
  struct prep_doc d = {0};
  char *line = NULL, why[512];
  size_t cap = 0;
  ssize_t n;
  int rc = 0;
  for (size_t lineno = 1; rc == 0 && (n = read_line(in, &line, &cap)) >= 0; lineno++) {
    if (prep_record(&c, line, (size_t)n, &d, why, sizeof why) < 0) {
      rc = errorf(err, errlen, "%s:%zu: %s", in_name, lineno, why);
      break;
    }
    size_t len;
    char *text = tokenizer_decode(t, (const int32_t *)d.ids, d.n, &len);
    if (!text) {
      rc = errorf(err, errlen, "%s:%zu: an id that names no token", in_name, lineno);
      break;
    }
    fwrite(text, 1, len, out);
    fputc('\n', out);
    free(text);
  }
  free(line);
  prep_doc_free(&d);
  if (rc == 0 && ferror(in)) rc = errorf(err, errlen, "%s: read error", in_name);
  return rc;
}
