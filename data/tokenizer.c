/* Byte-level BPE as Hugging Face tokenizers runs it for Qwen3; see tokenizer.h for the steps.
 * Tokens are kept by id in two arenas: the name as tokenizer.json writes it (byte-level
 * characters such as "Ġthe") for look-ups, and the bytes it decodes to. Merges are a hash map
 * from (left id, right id) to (rank, merged id), so BPE never touches strings. */
#include "data/tokenizer.h"

#include "common/util.h"
#include "data/sha256.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

struct added_token {
  const char *text;   /* points into the names arena */
  size_t len;
  int32_t id;
};

/* One probe of the merge table reads one cache line: BPE spends most of its time here. */
struct merge_slot {
  uint64_t key;                   /* left << 32 | right; UINT64_MAX: empty */
  int32_t rank, id;
};

struct tokenizer {
  uint32_t n_ids;                 /* largest id + 1 */
  char *names;                    /* token i's name is names[name_off[i] .. name_off[i+1]) */
  size_t *name_off;
  uint8_t *bytes;                 /* token i decodes to bytes[byte_off[i] .. byte_off[i+1]) */
  size_t *byte_off;
  uint8_t *is_token;              /* ids may have holes */
  int32_t *name_slots;            /* open addressing: name -> id, -1 empty */
  size_t name_mask;
  struct merge_slot *merges;      /* open addressing on (left, right) */
  size_t merge_mask;
  int32_t byte_token[256];        /* the token of each single byte */
  struct added_token *added;      /* longest first, so the first that matches is the longest */
  size_t n_added;
  uint8_t added_first[256];       /* 1 for bytes that start some added token */
  pcre2_code *split;
  char hash[65];
};

/* ---- GPT-2 ByteLevel alphabet ------------------------------------------------------------- */

/* Printable bytes stand for themselves; the other 68 bytes map in order to U+0100.. so that
 * every token name is printable text. */
static uint32_t byte_to_char(int b) {
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
  int n = 0;
  for (int c = 0; c < b; c++)
    if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) n++;
  return 256 + n;
}

/* ---- UTF-8 ------------------------------------------------------------------------------- */

size_t utf8_invalid_offset(const char *text, size_t n) {
  const uint8_t *s = (const uint8_t *)text;
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t k;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) k = 1, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) k = 2, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) k = 3, cp = c & 0x07, min = 0x10000;
    else return i;
    if (i + k >= n) return i;
    for (size_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xC0) != 0x80) return i;
      cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += k + 1;
  }
  return n;
}

/* Code points below U+0300 are all in NFC and none combines with its neighbour, and their
 * UTF-8 bytes are all below 0xCC; text made only of them skips utf8proc. */
static int may_need_nfc(const uint8_t *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] >= 0xCC) return 1;
  return 0;
}

/* ---- hash maps ----------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {   /* FNV-1a */
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
  return h;
}

static uint64_t hash_u64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  return x ^ (x >> 33);
}

static size_t table_size(size_t n) {   /* a power of two at most 3/4 full */
  size_t cap = 16;
  while (3 * cap < 4 * n) cap *= 2;
  return cap;
}

static int32_t name_find(const struct tokenizer *t, const char *s, size_t n) {
  for (size_t i = hash_bytes(s, n) & t->name_mask;; i = (i + 1) & t->name_mask) {
    int32_t id = t->name_slots[i];
    if (id < 0) return -1;
    size_t off = t->name_off[id];
    if (t->name_off[id + 1] - off == n && memcmp(t->names + off, s, n) == 0) return id;
  }
}

static void name_insert(struct tokenizer *t, int32_t id) {
  const char *s = t->names + t->name_off[id];
  size_t n = t->name_off[id + 1] - t->name_off[id];
  size_t i = hash_bytes(s, n) & t->name_mask;
  while (t->name_slots[i] >= 0) i = (i + 1) & t->name_mask;
  t->name_slots[i] = id;
}

static int merge_find(const struct tokenizer *t, int32_t left, int32_t right, int32_t *rank,
                      int32_t *id) {
  uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
  for (size_t i = hash_u64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
    const struct merge_slot *m = &t->merges[i];
    if (m->key == key) {
      *rank = m->rank;
      *id = m->id;
      return 1;
    }
    if (m->key == UINT64_MAX) return 0;
  }
}

/* A pair listed twice keeps its last rank, as in Hugging Face's merge map. */
static void merge_insert(struct tokenizer *t, int32_t left, int32_t right, int32_t rank,
                         int32_t id) {
  uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
  size_t i = hash_u64(key) & t->merge_mask;
  while (t->merges[i].key != UINT64_MAX && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
  t->merges[i] = (struct merge_slot){key, rank, id};
}

/* ---- loading ------------------------------------------------------------------------------- */

static const char *jstr(const json_t *o, const char *key) {
  return json_string_value(json_object_get(o, key));
}

static int jempty_or_null(const json_t *o, const char *key) {
  const json_t *v = json_object_get(o, key);
  return !v || json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0);
}

/* Refuses every setting whose effect this file does not implement. */
static int check_pipeline(const json_t *root, char *err, size_t errlen, const char **regex) {
  const json_t *norm = json_object_get(root, "normalizer");
  if (norm && !json_is_null(norm) && !(jstr(norm, "type") && !strcmp(jstr(norm, "type"), "NFC")))
    return errorf(err, errlen, "normalizer: only NFC or none is supported");

  const json_t *pre = json_object_get(root, "pre_tokenizer");
  const json_t *steps = json_object_get(pre, "pretokenizers");
  const json_t *split = json_array_get(steps, 0), *bytelevel = json_array_get(steps, 1);
  *regex = jstr(json_object_get(split, "pattern"), "Regex");
  if (!jstr(pre, "type") || strcmp(jstr(pre, "type"), "Sequence") || json_array_size(steps) != 2 ||
      !jstr(split, "type") || strcmp(jstr(split, "type"), "Split") || !*regex ||
      !jstr(split, "behavior") || strcmp(jstr(split, "behavior"), "Isolated") ||
      json_is_true(json_object_get(split, "invert")) || !jstr(bytelevel, "type") ||
      strcmp(jstr(bytelevel, "type"), "ByteLevel") ||
      json_is_true(json_object_get(bytelevel, "add_prefix_space")) ||
      json_is_true(json_object_get(bytelevel, "use_regex")))
    return errorf(err, errlen,
                "pre_tokenizer: only Sequence[Split(Regex, Isolated), ByteLevel(add_prefix_space "
                "false, use_regex false)] is supported");

  const json_t *model = json_object_get(root, "model");
  if (!json_is_object(model) || (jstr(model, "type") && strcmp(jstr(model, "type"), "BPE")))
    return errorf(err, errlen, "model: only type BPE is supported");
  if (json_is_true(json_object_get(model, "byte_fallback")))
    return errorf(err, errlen, "model.byte_fallback: not supported");
  if (json_is_true(json_object_get(model, "ignore_merges")))
    return errorf(err, errlen, "model.ignore_merges: not supported");
  const json_t *dropout = json_object_get(model, "dropout");
  if (dropout && !json_is_null(dropout)) return errorf(err, errlen, "model.dropout: not supported");
  if (!jempty_or_null(model, "continuing_subword_prefix") ||
      !jempty_or_null(model, "end_of_word_suffix"))
    return errorf(err, errlen, "model: continuing_subword_prefix/end_of_word_suffix not supported");

  const json_t *dec = json_object_get(root, "decoder");
  if (dec && !json_is_null(dec) && !(jstr(dec, "type") && !strcmp(jstr(dec, "type"), "ByteLevel")))
    return errorf(err, errlen, "decoder: only ByteLevel is supported");
  return 0;
}

/* Fills names[id] from the vocabulary and the added tokens. */
static int collect_names(const json_t *vocab, const json_t *added, const char ***names,
                         size_t **lens, uint32_t *n_ids, char *err, size_t errlen) {
  int64_t max_id = -1;
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)vocab, key, v) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= TOKENIZER_MAX_IDS)
      return errorf(err, errlen, "model.vocab[\"%s\"]: not an id from 0 to %d", key,
                    TOKENIZER_MAX_IDS - 1);
    if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
  }
  size_t i;
  json_array_foreach(added, i, v) {
    const json_t *idv = json_object_get(v, "id"), *content = json_object_get(v, "content");
    json_int_t id = json_integer_value(idv);
    if (!json_is_integer(idv) || id < 0 || id >= TOKENIZER_MAX_IDS || !json_is_string(content) ||
        !json_string_length(content))
      return errorf(err, errlen, "added_tokens[%zu]: needs an id from 0 to %d and a non-empty "
                    "string content", i, TOKENIZER_MAX_IDS - 1);
    if (json_is_true(json_object_get(v, "lstrip")) || json_is_true(json_object_get(v, "rstrip")) ||
        json_is_true(json_object_get(v, "single_word")) ||
        json_is_true(json_object_get(v, "normalized")))
      return errorf(err, errlen,
                  "added_tokens[%zu]: lstrip, rstrip, single_word, normalized not supported", i);
    if (id > max_id) max_id = id;
  }
  if (max_id < 0) return errorf(err, errlen, "model.vocab: empty");
  *n_ids = (uint32_t)max_id + 1;
  *names = xcalloc(*n_ids, sizeof **names);
  *lens = xcalloc(*n_ids, sizeof **lens);
  json_object_foreach((json_t *)vocab, key, v) {
    json_int_t id = json_integer_value(v);
    if ((*names)[id]) return errorf(err, errlen, "model.vocab: id %lld given twice", (long long)id);
    (*names)[id] = key;
    (*lens)[id] = strlen(key);
  }
  json_array_foreach(added, i, v) {
    json_int_t id = json_integer_value(json_object_get(v, "id"));
    const json_t *content = json_object_get(v, "content");
    if ((*names)[id] && ((*lens)[id] != json_string_length(content) ||
                         memcmp((*names)[id], json_string_value(content), (*lens)[id])))
      return errorf(err, errlen, "added_tokens[%zu]: id %lld is already another token", i,
                  (long long)id);
    (*names)[id] = json_string_value(content);
    (*lens)[id] = json_string_length(content);
  }
  return 0;
}

/* Copies names into the arena and decodes vocabulary names through the byte-level alphabet. */
static int build_tokens(struct tokenizer *t, const char **names, const size_t *lens,
                        const uint8_t *is_added, char *err, size_t errlen) {
  int char_to_byte[324];
  for (int c = 0; c < 324; c++) char_to_byte[c] = -1;
  for (int b = 0; b < 256; b++) char_to_byte[byte_to_char(b)] = b;

  size_t total = 0;
  for (uint32_t id = 0; id < t->n_ids; id++) total += lens[id];
  t->names = xmalloc(total + 1);
  t->bytes = xmalloc(total + 1);   /* a byte-level character is 1 or 2 bytes of name, 1 of data */
  t->name_off = xmalloc((t->n_ids + 1) * sizeof *t->name_off);
  t->byte_off = xmalloc((t->n_ids + 1) * sizeof *t->byte_off);
  t->is_token = xcalloc(t->n_ids, 1);
  size_t nn = 0, nb = 0;
  for (uint32_t id = 0; id < t->n_ids; id++) {
    t->name_off[id] = nn;
    t->byte_off[id] = nb;
    if (!names[id]) continue;
    t->is_token[id] = 1;
    memcpy(t->names + nn, names[id], lens[id]);
    nn += lens[id];
    if (is_added[id]) {
      memcpy(t->bytes + nb, names[id], lens[id]);
      nb += lens[id];
      continue;
    }
    const uint8_t *s = (const uint8_t *)names[id];
    for (size_t k = 0; k < lens[id];) {
      utf8proc_int32_t c;
      utf8proc_ssize_t step = utf8proc_iterate(s + k, (utf8proc_ssize_t)(lens[id] - k), &c);
      if (step <= 0 || c >= 324 || char_to_byte[c] < 0)
        return errorf(err, errlen, "model.vocab[\"%s\"]: character outside the ByteLevel alphabet",
                    names[id]);
      t->bytes[nb++] = (uint8_t)char_to_byte[c];
      k += (size_t)step;
    }
  }
  t->name_off[t->n_ids] = nn;
  t->byte_off[t->n_ids] = nb;

  t->name_mask = table_size(t->n_ids) - 1;
  t->name_slots = xmalloc((t->name_mask + 1) * sizeof *t->name_slots);
  memset(t->name_slots, 0xff, (t->name_mask + 1) * sizeof *t->name_slots);
  for (uint32_t id = 0; id < t->n_ids; id++)
    if (t->is_token[id]) name_insert(t, (int32_t)id);

  for (int b = 0; b < 256; b++) {
    char s[4];
    utf8proc_ssize_t n =
      utf8proc_encode_char((utf8proc_int32_t)byte_to_char(b), (utf8proc_uint8_t *)s);
    t->byte_token[b] = name_find(t, s, (size_t)n);
    if (t->byte_token[b] < 0)
      return errorf(err, errlen, "model.vocab: no token for byte 0x%02x", b);
  }
  return 0;
}

static int build_merges(struct tokenizer *t, const json_t *merges, char *err, size_t errlen) {
  size_t n = json_array_size(merges);
  t->merge_mask = table_size(n) - 1;
  t->merges = xmalloc((t->merge_mask + 1) * sizeof *t->merges);
  for (size_t i = 0; i <= t->merge_mask; i++) t->merges[i].key = UINT64_MAX;
  char joined[1024];
  for (size_t r = 0; r < n; r++) {
    /* either "left right" or ["left", "right"] */
    const json_t *m = json_array_get(merges, r);
    const char *l, *rt;
    size_t ln, rn;
    if (json_is_string(m)) {
      l = json_string_value(m);
      const char *sp = strchr(l, ' ');
      if (!sp || strchr(sp + 1, ' ')) return errorf(err, errlen, "model.merges[%zu]: not \"a b\"", r);
      ln = (size_t)(sp - l), rt = sp + 1, rn = strlen(rt);
    } else if (json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
               json_is_string(json_array_get(m, 1))) {
      l = json_string_value(json_array_get(m, 0)), ln = json_string_length(json_array_get(m, 0));
      rt = json_string_value(json_array_get(m, 1)), rn = json_string_length(json_array_get(m, 1));
    } else {
      return errorf(err, errlen, "model.merges[%zu]: neither \"a b\" nor [\"a\", \"b\"]", r);
    }
    if (ln + rn > sizeof joined) return errorf(err, errlen, "model.merges[%zu]: too long", r);
    memcpy(joined, l, ln);
    memcpy(joined + ln, rt, rn);
    int32_t a = name_find(t, l, ln), b = name_find(t, rt, rn), ab = name_find(t, joined, ln + rn);
    if (a < 0 || b < 0 || ab < 0)
      return errorf(err, errlen, "model.merges[%zu]: \"%.*s\" + \"%.*s\" is not in model.vocab", r,
                  (int)ln, l, (int)rn, rt);
    merge_insert(t, a, b, (int32_t)r, ab);
  }
  return 0;
}

static int build_added(struct tokenizer *t, const json_t *added) {
  t->n_added = json_array_size(added);
  t->added = xcalloc(t->n_added, sizeof *t->added);
  for (size_t i = 0; i < t->n_added; i++) {
    int32_t id = (int32_t)json_integer_value(json_object_get(json_array_get(added, i), "id"));
    struct added_token a = {t->names + t->name_off[id], t->name_off[id + 1] - t->name_off[id], id};
    size_t j = i;   /* insertion sort, longest first */
    while (j > 0 && t->added[j - 1].len < a.len) {
      t->added[j] = t->added[j - 1];
      j--;
    }
    t->added[j] = a;
    t->added_first[(uint8_t)a.text[0]] = 1;
  }
  return 0;
}

/* Hugging Face runs the regex in Oniguruma, whose \s is Unicode White_Space. PCRE2's \s (with
 * UCP) also matches U+180E MONGOLIAN VOWEL SEPARATOR, a format character since Unicode 6.3, so
 * \s and \S are spelled out as White_Space before compiling. Returns NULL for a \S inside a
 * character class, which has no such spelling. */
#define WHITE_SPACE "\\t-\\r\\x{85}\\p{Z}"

static char *oniguruma_spaces(const char *re) {
  size_t n = strlen(re);
  char *out = xmalloc(n * (sizeof WHITE_SPACE + 3) + 1), *o = out;
  int in_class = 0;
  for (size_t i = 0; i < n; i++) {
    if (re[i] == '\\' && (re[i + 1] == 's' || re[i + 1] == 'S')) {
      if (re[i + 1] == 'S' && in_class) {
        free(out);
        return NULL;
      }
      o += sprintf(o, in_class ? "%s" : re[i + 1] == 's' ? "[%s]" : "[^%s]", WHITE_SPACE);
      i++;
    } else if (re[i] == '\\' && i + 1 < n) {
      *o++ = re[i++];
      *o++ = re[i];
    } else if (re[i] == '[' && !in_class) {
      in_class = 1;
      *o++ = re[i];
      if (re[i + 1] == '^') *o++ = re[++i];
      if (re[i + 1] == ']') *o++ = re[++i];   /* a ']' first in a class is literal */
    } else if (re[i] == '[' && re[i + 1] == ':') {   /* [:alpha:] inside a class */
      const char *end = strstr(re + i, ":]");
      size_t k = end ? (size_t)(end - (re + i)) + 2 : 1;
      memcpy(o, re + i, k);
      o += k;
      i += k - 1;
    } else {
      if (re[i] == ']') in_class = 0;
      *o++ = re[i];
    }
  }
  *o = 0;
  return out;
}

static int compile_split(struct tokenizer *t, const char *regex, char *err, size_t errlen) {
  char *re = oniguruma_spaces(regex);
  if (!re) return errorf(err, errlen, "pre_tokenizer Split regex: \\S inside [...] is not supported");
  int code;
  PCRE2_SIZE at;
  t->split = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &code,
                           &at, NULL);
  free(re);
  if (!t->split) {
    char msg[256];
    pcre2_get_error_message(code, (PCRE2_UCHAR *)msg, sizeof msg);
    return errorf(err, errlen,
                "pre_tokenizer Split regex: %s (at offset %zu of it, with \\s spelled out)", msg,
                (size_t)at);
  }
  /* JIT is only speed; without it (a platform PCRE2 lacks it for) matching still works */
  pcre2_jit_compile(t->split, PCRE2_JIT_COMPLETE);
  return 0;
}

static int load_json(struct tokenizer *t, const json_t *root, char *err, size_t errlen) {
  const char *regex = NULL;
  if (check_pipeline(root, err, errlen, &regex)) return -1;
  const json_t *model = json_object_get(root, "model");
  const json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
  const json_t *added = json_object_get(root, "added_tokens");
  if (!json_is_object(vocab)) return errorf(err, errlen, "model.vocab: missing");
  if (!json_is_array(merges)) return errorf(err, errlen, "model.merges: missing");
  if (added && !json_is_array(added)) return errorf(err, errlen, "added_tokens: not an array");

  const char **names = NULL;
  size_t *lens = NULL;
  uint8_t *is_added = NULL;
  int rc = collect_names(vocab, added, &names, &lens, &t->n_ids, err, errlen);
  if (rc == 0) {
    is_added = xcalloc(t->n_ids, 1);
    size_t i;
    const json_t *v;
    json_array_foreach(added, i, v) is_added[json_integer_value(json_object_get(v, "id"))] = 1;
    rc = build_tokens(t, names, lens, is_added, err, errlen);
  }
  if (rc == 0) rc = build_merges(t, merges, err, errlen);
  if (rc == 0) rc = build_added(t, added);
  if (rc == 0) rc = compile_split(t, regex, err, errlen);
  free(names);
  free(lens);
  free(is_added);
  return rc;
}

int tokenizer_validate(const char *path, char *err, size_t errlen) {
  struct tokenizer *t = tokenizer_load(path, err, errlen);
  if (!t) return -1;
  tokenizer_free(t);
  return 0;
}

struct tokenizer *tokenizer_load(const char *path, char *err, size_t errlen) {
  size_t len;
  char *text = read_file(path, &len);
  if (!text) {
    errorf(err, errlen, "%s: %s", path, strerror(errno));
    return NULL;
  }
  struct tokenizer *t = xcalloc(1, sizeof *t);
  sha256_hex(text, len, t->hash);
  json_error_t jerr;
  json_t *root = json_loadb(text, len, 0, &jerr);
  free(text);
  char why[512];
  int rc = root ? load_json(t, root, why, sizeof why)
                : errorf(why, sizeof why, "line %d column %d: %s", jerr.line, jerr.column, jerr.text);
  json_decref(root);
  if (rc) {
    errorf(err, errlen, "%s: %s", path, why);
    tokenizer_free(t);
    return NULL;
  }
  return t;
}

void tokenizer_free(struct tokenizer *t) {
  if (!t) return;
  free(t->names);
  free(t->name_off);
  free(t->bytes);
  free(t->byte_off);
  free(t->is_token);
  free(t->name_slots);
  free(t->merges);
  free(t->added);
  pcre2_code_free(t->split);
  free(t);
}

/* ---- encoding ------------------------------------------------------------------------------ */

struct symbol {
  int32_t id, prev, next;   /* id -1: merged into its left neighbour */
};

struct merge {
  int32_t rank, pos, id;
};

/* The scratch of one encode call, grown as needed and reused for every piece. */
struct encoder {
  const struct tokenizer *t;
  pcre2_match_data *match;
  int32_t *out;
  size_t n, cap;
  struct symbol *sym;
  struct merge *heap;
  size_t sym_cap, heap_n;
};

static void emit(struct encoder *e, int32_t id) {
  if (e->n == e->cap) {
    e->cap = e->cap ? 2 * e->cap : 256;
    e->out = xrealloc(e->out, e->cap * sizeof *e->out);
  }
  e->out[e->n++] = id;
}

/* The heap orders merges by rank, then leftmost first, as Hugging Face does. */
static int merge_before(const struct merge *a, const struct merge *b) {
  return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct encoder *e, struct merge m) {
  size_t i = e->heap_n++;
  while (i > 0 && merge_before(&m, &e->heap[(i - 1) / 2])) {
    e->heap[i] = e->heap[(i - 1) / 2];
    i = (i - 1) / 2;
  }
  e->heap[i] = m;
}

static struct merge heap_pop(struct encoder *e) {
  struct merge top = e->heap[0], last = e->heap[--e->heap_n];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= e->heap_n) break;
    if (c + 1 < e->heap_n && merge_before(&e->heap[c + 1], &e->heap[c])) c++;
    if (!merge_before(&e->heap[c], &last)) break;
    e->heap[i] = e->heap[c];
    i = c;
  }
  if (e->heap_n) e->heap[i] = last;
  return top;
}

static void push_pair(struct encoder *e, int32_t pos) {
  struct symbol *s = e->sym;
  int32_t rank, id;
  if (s[pos].next >= 0 && merge_find(e->t, s[pos].id, s[s[pos].next].id, &rank, &id))
    heap_push(e, (struct merge){rank, pos, id});
}

/* BPE over one piece's bytes: a doubly linked list of symbols and a heap of candidate merges,
 * so a long piece costs n log n, not n^2. An entry is stale when its pair has changed since it
 * was pushed; like Hugging Face, it is recognised by the merged id no longer matching. */
static void encode_piece(struct encoder *e, const uint8_t *p, size_t n) {
  if (n == 1) {
    emit(e, e->t->byte_token[p[0]]);
    return;
  }
  if (n > e->sym_cap) {
    e->sym_cap = 2 * n;
    e->sym = xrealloc(e->sym, e->sym_cap * sizeof *e->sym);
    /* n - 1 first pairs, then each of at most n - 1 merges pushes at most 2 more */
    e->heap = xrealloc(e->heap, 3 * e->sym_cap * sizeof *e->heap);
  }
  struct symbol *s = e->sym;
  for (size_t i = 0; i < n; i++)
    s[i] = (struct symbol){e->t->byte_token[p[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
  e->heap_n = 0;
  for (size_t i = 0; i + 1 < n; i++) push_pair(e, (int32_t)i);
  while (e->heap_n) {
    struct merge m = heap_pop(e);
    int32_t next = s[m.pos].next, rank, id;
    if (s[m.pos].id < 0 || next < 0) continue;
    if (!merge_find(e->t, s[m.pos].id, s[next].id, &rank, &id) || id != m.id) continue;
    s[m.pos].id = m.id;
    s[next].id = -1;
    s[m.pos].next = s[next].next;
    if (s[next].next >= 0) s[s[next].next].prev = m.pos;
    if (s[m.pos].prev >= 0) push_pair(e, s[m.pos].prev);
    push_pair(e, m.pos);
  }
  for (int32_t i = 0; i >= 0; i = s[i].next) emit(e, s[i].id);
}

/* Normalizes a stretch between added tokens and encodes every regex piece of it. */
static void encode_text(struct encoder *e, const uint8_t *text, size_t len) {
  if (!len) return;
  utf8proc_uint8_t *nfc = NULL;
  if (may_need_nfc(text, len)) {
    utf8proc_ssize_t m = utf8proc_map(text, (utf8proc_ssize_t)len, &nfc,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (m < 0) die("utf8proc: %s", utf8proc_errmsg(m));   /* input was validated already */
    text = nfc;
    len = (size_t)m;
  }
  size_t gap = 0, at = 0;
  while (at < len) {
    int rc = pcre2_match(e->t->split, text, len, at, PCRE2_NO_UTF_CHECK, e->match, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      char msg[256];
      pcre2_get_error_message(rc, (PCRE2_UCHAR *)msg, sizeof msg);
      die("tokenizer Split regex: %s", msg);
    }
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->match);
    if (ov[0] > gap) encode_piece(e, text + gap, ov[0] - gap);
    if (ov[1] > ov[0]) {
      encode_piece(e, text + ov[0], ov[1] - ov[0]);
      at = ov[1];
    } else {   /* an empty match: step over one character */
      at = ov[0] + 1;
      while (at < len && (text[at] & 0xC0) == 0x80) at++;
    }
    gap = ov[1];
  }
  if (gap < len) encode_piece(e, text + gap, len - gap);
  free(nfc);
}

static const struct added_token *added_at(const struct tokenizer *t, const char *s, size_t n) {
  for (size_t i = 0; i < t->n_added; i++)
    if (t->added[i].len <= n && memcmp(t->added[i].text, s, t->added[i].len) == 0)
      return &t->added[i];
  return NULL;
}

int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, int32_t **ids,
                     size_t *n, char *err, size_t errlen) {
  *ids = NULL;
  *n = 0;
  size_t bad = utf8_invalid_offset(text, len);
  if (bad < len) return errorf(err, errlen, "invalid UTF-8 at byte offset %zu", bad);
  struct encoder e = {.t = t, .match = pcre2_match_data_create_from_pattern(t->split, NULL)};
  if (!e.match) die("out of memory creating PCRE2 match data");
  size_t start = 0;
  for (size_t i = 0; i < len; i++) {
    if (!t->added_first[(uint8_t)text[i]]) continue;
    const struct added_token *a = added_at(t, text + i, len - i);
    if (!a) continue;
    encode_text(&e, (const uint8_t *)text + start, i - start);
    emit(&e, a->id);
    start = i + a->len;
    i = start - 1;
  }
  encode_text(&e, (const uint8_t *)text + start, len - start);
  pcre2_match_data_free(e.match);
  free(e.sym);
  free(e.heap);
  *ids = e.out ? e.out : xmalloc(sizeof **ids);
  *n = e.n;
  return 0;
}

/* ---- the rest ------------------------------------------------------------------------------ */

int tokenizer_is_token(const struct tokenizer *t, int32_t id) {
  return id >= 0 && (uint32_t)id < t->n_ids && t->is_token[id];
}

char *tokenizer_decode(const struct tokenizer *t, const int32_t *ids, size_t n, size_t *len) {
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    if (!tokenizer_is_token(t, ids[i])) return NULL;
    total += t->byte_off[ids[i] + 1] - t->byte_off[ids[i]];
  }
  char *out = xmalloc(total + 1), *p = out;
  for (size_t i = 0; i < n; i++) {
    size_t k = t->byte_off[ids[i] + 1] - t->byte_off[ids[i]];
    memcpy(p, t->bytes + t->byte_off[ids[i]], k);
    p += k;
  }
  *p = 0;
  if (len) *len = total;
  return out;
}

int32_t tokenizer_token_id(const struct tokenizer *t, const char *token) {
  return name_find(t, token, strlen(token));
}

uint32_t tokenizer_vocab_size(const struct tokenizer *t) { return t->n_ids; }

const char *tokenizer_hash(const struct tokenizer *t) { return t->hash; }
