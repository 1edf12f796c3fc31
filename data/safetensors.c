#define _POSIX_C_SOURCE 200809L
#include "data/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"

/* Tensor bytes are used in place and copied with memcpy: the format is little-endian. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

/* The reference implementation refuses headers over 100 MB; a 4B model's is about 40 KB. */
#define ST_MAX_HEADER (100u * 1000u * 1000u)

static const char *const DTYPE_NAMES[ST_NDTYPES] = {
  "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
static const unsigned char DTYPE_SIZES[ST_NDTYPES] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1, 1, 1};

const char *st_dtype_name(enum st_dtype d) { return d < ST_NDTYPES ? DTYPE_NAMES[d] : "?"; }
size_t st_dtype_size(enum st_dtype d) { return d < ST_NDTYPES ? DTYPE_SIZES[d] : 0; }

/* ---- scalar conversions ------------------------------------------------------------------ */

uint16_t st_f32_to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
  /* Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry into the exponent is
   * the correct rounding (up to the next binade, or to infinity past the largest bf16). */
  u += 0x7fffu + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

float st_bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

float st_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0 && man != 0) {  /* subnormal: man * 2^-24, exact in fp32 */
    float x = ldexpf((float)man, -24);
    return sign ? -x : x;
  }
  if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
  else if (exp == 0) u = sign;
  else u = sign | ((exp + 112) << 23) | (man << 13);
  float x;
  memcpy(&x, &u, 4);
  return x;
}

/* ---- reading one file -------------------------------------------------------------------- */

struct st_file {
  char *path;
  unsigned char *map;
  size_t map_len;
  json_t *header;              /* kept: tensor names point into its keys */
  json_t *metadata;            /* borrowed from header; NULL if absent */
  size_t n;
  struct st_tensor *tensors;   /* sorted by name */
};

static int cmp_tensor_name(const void *a, const void *b) {
  return strcmp(((const struct st_tensor *)a)->name, ((const struct st_tensor *)b)->name);
}

static int cmp_tensor_begin(const void *a, const void *b) {
  const struct st_tensor *x = *(const struct st_tensor *const *)a, *y = *(const struct st_tensor *const *)b;
  const unsigned char *p = x->data, *q = y->data;
  return p < q ? -1 : p > q;
}

static int parse_metadata(struct st_file *f, json_t *v, char *err, size_t errlen) {
  if (!json_is_object(v))
    return errorf(err, errlen, "%s: __metadata__ must be an object of strings", f->path);
  const char *key;
  json_t *val;
  json_object_foreach(v, key, val)
    if (!json_is_string(val))
      return errorf(err, errlen, "%s: __metadata__ value '%s' is not a string", f->path, key);
  f->metadata = v;
  return 0;
}

/* Fills t from one header entry; data_size is the number of bytes after the header. */
static int parse_entry(const struct st_file *f, const char *name, json_t *v, const unsigned char *data,
                       uint64_t data_size, struct st_tensor *t, char *err, size_t errlen) {
  const char *p = f->path;
  memset(t, 0, sizeof *t);
  t->name = name;
  t->path = f->path;
  if (!json_is_object(v)) return errorf(err, errlen, "%s: tensor '%s': entry is not an object", p, name);

  json_t *dt = json_object_get(v, "dtype");
  if (!json_is_string(dt)) return errorf(err, errlen, "%s: tensor '%s': dtype missing or not a string", p, name);
  int d = 0;
  while (d < ST_NDTYPES && strcmp(DTYPE_NAMES[d], json_string_value(dt)) != 0) d++;
  if (d == ST_NDTYPES)
    return errorf(err, errlen, "%s: tensor '%s': unknown dtype '%s'", p, name, json_string_value(dt));
  t->dtype = (enum st_dtype)d;

  json_t *shape = json_object_get(v, "shape");
  if (!json_is_array(shape)) return errorf(err, errlen, "%s: tensor '%s': shape missing or not an array", p, name);
  if (json_array_size(shape) > ST_MAX_DIMS)
    return errorf(err, errlen, "%s: tensor '%s': shape has %zu dimensions, at most %d supported", p, name,
                json_array_size(shape), ST_MAX_DIMS);
  t->ndim = (int)json_array_size(shape);
  t->numel = 1;
  for (int i = 0; i < t->ndim; i++) {
    json_t *e = json_array_get(shape, (size_t)i);
    if (!json_is_integer(e) || json_integer_value(e) < 0)
      return errorf(err, errlen, "%s: tensor '%s': shape[%d] is not a non-negative integer", p, name, i);
    uint64_t dim = (uint64_t)json_integer_value(e);
    if (dim && t->numel > UINT64_MAX / dim)
      return errorf(err, errlen, "%s: tensor '%s': shape product overflows", p, name);
    t->shape[i] = (int64_t)dim;
    t->numel *= dim;
  }
  if (t->numel > UINT64_MAX / DTYPE_SIZES[d])
    return errorf(err, errlen, "%s: tensor '%s': shape product overflows", p, name);
  t->nbytes = t->numel * DTYPE_SIZES[d];

  json_t *off = json_object_get(v, "data_offsets");
  if (!json_is_array(off) || json_array_size(off) != 2)
    return errorf(err, errlen, "%s: tensor '%s': data_offsets missing or not [begin, end]", p, name);
  json_t *jb = json_array_get(off, 0), *je = json_array_get(off, 1);
  if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 || json_integer_value(je) < 0)
    return errorf(err, errlen, "%s: tensor '%s': data_offsets are not non-negative integers", p, name);
  uint64_t begin = (uint64_t)json_integer_value(jb), end = (uint64_t)json_integer_value(je);
  if (begin > end || end > data_size)
    return errorf(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] out of range (data is %llu bytes)",
                p, name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size);
  if (end - begin != t->nbytes)
    return errorf(err, errlen, "%s: tensor '%s': data_offsets span %llu bytes but %s shape needs %llu", p,
                name, (unsigned long long)(end - begin), DTYPE_NAMES[d], (unsigned long long)t->nbytes);
  t->data = data + begin;
  return 0;
}

/* Tensors may leave gaps (nothing reads them) but must not share bytes. */
static int check_overlaps(const struct st_file *f, char *err, size_t errlen) {
  const struct st_tensor **by_begin = xmalloc(f->n * sizeof *by_begin);
  size_t m = 0;
  for (size_t i = 0; i < f->n; i++)
    if (f->tensors[i].nbytes) by_begin[m++] = &f->tensors[i];
  qsort(by_begin, m, sizeof *by_begin, cmp_tensor_begin);
  int rc = 0;
  for (size_t i = 1; i < m && rc == 0; i++) {
    const struct st_tensor *a = by_begin[i - 1], *b = by_begin[i];
    if ((const unsigned char *)b->data < (const unsigned char *)a->data + a->nbytes)
      rc = errorf(err, errlen, "%s: tensors '%s' and '%s' overlap", f->path, a->name, b->name);
  }
  free(by_begin);
  return rc;
}

static int parse_header(struct st_file *f, char *err, size_t errlen) {
  const char *p = f->path;
  if (f->map_len < 8) return errorf(err, errlen, "%s: %zu bytes, too short for a safetensors file", p, f->map_len);
  uint64_t hlen;
  memcpy(&hlen, f->map, 8);
  if (hlen > ST_MAX_HEADER)
    return errorf(err, errlen, "%s: header length %llu is over the %u-byte limit", p, (unsigned long long)hlen,
                ST_MAX_HEADER);
  if (hlen > f->map_len - 8)
    return errorf(err, errlen, "%s: header length %llu runs past the end of the %zu-byte file", p,
                (unsigned long long)hlen, f->map_len);
  json_error_t jerr;
  f->header = json_loadb((const char *)f->map + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
  if (!f->header) return errorf(err, errlen, "%s: header is not valid JSON: %s (byte %d)", p, jerr.text, jerr.position);
  if (!json_is_object(f->header)) return errorf(err, errlen, "%s: header is not a JSON object", p);

  const unsigned char *data = f->map + 8 + hlen;
  uint64_t data_size = f->map_len - 8 - hlen;
  f->tensors = xcalloc(json_object_size(f->header), sizeof *f->tensors);
  const char *key;
  json_t *v;
  json_object_foreach(f->header, key, v) {
    if (strcmp(key, "__metadata__") == 0) {
      if (parse_metadata(f, v, err, errlen)) return -1;
    } else {
      if (parse_entry(f, key, v, data, data_size, &f->tensors[f->n], err, errlen)) return -1;
      f->n++;
    }
  }
  qsort(f->tensors, f->n, sizeof *f->tensors, cmp_tensor_name);
  return check_overlaps(f, err, errlen);
}

int st_open(struct st_file **out, const char *path, char *err, size_t errlen) {
  *out = NULL;
  struct st_file *f = xcalloc(1, sizeof *f);
  f->path = xstrdup(path);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    errorf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    st_close(f);
    return -1;
  }
  struct stat sb;
  int rc = 0;
  if (fstat(fd, &sb) != 0) rc = errorf(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
  else if (!S_ISREG(sb.st_mode)) rc = errorf(err, errlen, "%s: not a regular file", path);
  else if (sb.st_size > 0) {
    f->map_len = (size_t)sb.st_size;
    f->map = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
      f->map = NULL;
      rc = errorf(err, errlen, "%s: cannot map: %s", path, strerror(errno));
    }
  }
  close(fd);
  if (rc == 0) rc = parse_header(f, err, errlen);
  if (rc) {
    st_close(f);
    return -1;
  }
  *out = f;
  return 0;
}

void st_close(struct st_file *f) {
  if (!f) return;
  if (f->map) munmap(f->map, f->map_len);
  json_decref(f->header);
  free(f->tensors);
  free(f->path);
  free(f);
}

size_t st_count(const struct st_file *f) { return f->n; }

const struct st_tensor *st_tensor_at(const struct st_file *f, size_t i) {
  return i < f->n ? &f->tensors[i] : NULL;
}

const struct st_tensor *st_find(const struct st_file *f, const char *name) {
  struct st_tensor key = {.name = name};
  return bsearch(&key, f->tensors, f->n, sizeof key, cmp_tensor_name);
}

const char *st_metadata(const struct st_file *f, const char *key) {
  return f->metadata ? json_string_value(json_object_get(f->metadata, key)) : NULL;
}

int st_read_f32(const struct st_tensor *t, float *dst, size_t n, char *err, size_t errlen) {
  if (n != t->numel)
    return errorf(err, errlen, "%s: tensor '%s': has %llu elements, caller expected %zu", t->path, t->name,
                (unsigned long long)t->numel, n);
  const unsigned char *src = t->data;
  switch (t->dtype) {
  case ST_F32:
    memcpy(dst, src, n * 4);
    return 0;
  case ST_BF16:
  case ST_F16:
    for (size_t i = 0; i < n; i++) {
      uint16_t h;
      memcpy(&h, src + 2 * i, 2);
      dst[i] = t->dtype == ST_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
    }
    return 0;
  case ST_F64:
    for (size_t i = 0; i < n; i++) {
      double x;
      memcpy(&x, src + 8 * i, 8);
      dst[i] = (float)x;
    }
    return 0;
  default:
    return errorf(err, errlen, "%s: tensor '%s': dtype %s cannot be read as floats (F32, BF16, F16, F64 can)",
                t->path, t->name, st_dtype_name(t->dtype));
  }
}

/* ---- a model directory ------------------------------------------------------------------- */

struct st_model {
  struct st_file **files;
  size_t nfiles;
  const struct st_tensor **tensors;   /* sorted by name */
  size_t n;
};

static int cmp_tensor_ptr_name(const void *a, const void *b) {
  return strcmp((*(const struct st_tensor *const *)a)->name, (*(const struct st_tensor *const *)b)->name);
}

static char *join_path(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *s = xmalloc(n);
  snprintf(s, n, "%s/%s", dir, name);
  return s;
}

/* Returns the open shard called file (opening it on first use), or NULL with err filled. */
static struct st_file *model_shard(struct st_model *m, const char *dir, const char *index, const char *file,
                                   char *err, size_t errlen) {
  char *path = join_path(dir, file);
  for (size_t i = 0; i < m->nfiles; i++)
    if (strcmp(m->files[i]->path, path) == 0) {
      free(path);
      return m->files[i];
    }
  struct st_file *f;
  char inner[1024];
  int rc = st_open(&f, path, inner, sizeof inner);
  free(path);
  if (rc) {
    errorf(err, errlen, "%s: shard '%s': %s", index, file, inner);
    return NULL;
  }
  m->files = xrealloc(m->files, (m->nfiles + 1) * sizeof *m->files);
  m->files[m->nfiles++] = f;
  return f;
}

static int open_index(struct st_model *m, const char *dir, const char *index, char *err, size_t errlen) {
  json_error_t jerr;
  json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) return errorf(err, errlen, "%s: not valid JSON: %s (line %d)", index, jerr.text, jerr.line);
  int rc = 0;
  json_t *map = json_object_get(root, "weight_map");
  if (!json_is_object(root)) rc = errorf(err, errlen, "%s: not a JSON object", index);
  else if (!json_is_object(map)) rc = errorf(err, errlen, "%s: weight_map missing or not an object", index);
  else if (json_object_get(root, "metadata") && !json_is_object(json_object_get(root, "metadata")))
    rc = errorf(err, errlen, "%s: metadata is not an object", index);
  m->tensors = xcalloc(rc ? 1 : json_object_size(map), sizeof *m->tensors);
  const char *name;
  json_t *v;
  if (rc == 0) json_object_foreach(map, name, v) {
    const char *file = json_string_value(v);
    /* Shards live beside the index; a name with a slash (or "..") could point anywhere. */
    if (!file || !file[0] || strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0) {
      rc = errorf(err, errlen, "%s: weight_map['%s'] must be a file name in the same directory", index, name);
      break;
    }
    struct st_file *f = model_shard(m, dir, index, file, err, errlen);
    if (!f) {
      rc = -1;
      break;
    }
    const struct st_tensor *t = st_find(f, name);
    if (!t) {
      rc = errorf(err, errlen, "%s: weight_map puts tensor '%s' in %s, which does not hold it", index, name,
                f->path);
      break;
    }
    m->tensors[m->n++] = t;
  }
  json_decref(root);
  qsort(m->tensors, m->n, sizeof *m->tensors, cmp_tensor_ptr_name);
  return rc;
}

int st_model_open(struct st_model **out, const char *dir, char *err, size_t errlen) {
  *out = NULL;
  struct st_model *m = xcalloc(1, sizeof *m);
  char *single = join_path(dir, "model.safetensors"), *index = join_path(dir, "model.safetensors.index.json");
  int rc;
  if (access(single, F_OK) == 0) {
    struct st_file *f;
    rc = st_open(&f, single, err, errlen);
    if (rc == 0) {
      m->files = xmalloc(sizeof *m->files);
      m->files[m->nfiles++] = f;
      m->tensors = xcalloc(st_count(f), sizeof *m->tensors);
      for (size_t i = 0; i < st_count(f); i++) m->tensors[m->n++] = st_tensor_at(f, i);
    }
  } else if (access(index, F_OK) == 0) {
    rc = open_index(m, dir, index, err, errlen);
  } else {
    rc = errorf(err, errlen, "%s: neither model.safetensors nor model.safetensors.index.json is there", dir);
  }
  free(single);
  free(index);
  if (rc) {
    st_model_close(m);
    return -1;
  }
  *out = m;
  return 0;
}

void st_model_close(struct st_model *m) {
  if (!m) return;
  for (size_t i = 0; i < m->nfiles; i++) st_close(m->files[i]);
  free(m->files);
  free(m->tensors);
  free(m);
}

size_t st_model_count(const struct st_model *m) { return m->n; }

const struct st_tensor *st_model_tensor_at(const struct st_model *m, size_t i) {
  return i < m->n ? m->tensors[i] : NULL;
}

const struct st_tensor *st_model_find(const struct st_model *m, const char *name) {
  struct st_tensor key = {.name = name};
  const struct st_tensor *kp = &key;
  const struct st_tensor **hit = bsearch(&kp, m->tensors, m->n, sizeof *m->tensors, cmp_tensor_ptr_name);
  return hit ? *hit : NULL;
}

/* ---- writing ----------------------------------------------------------------------------- */

struct write_item {
  const struct st_write_tensor *t;
  uint64_t numel;
};

static int cmp_write_item(const void *a, const void *b) {
  return strcmp(((const struct write_item *)a)->t->name, ((const struct write_item *)b)->t->name);
}

static int check_write_tensor(const char *path, struct write_item *it, char *err, size_t errlen) {
  const struct st_write_tensor *t = it->t;
  const char *name = t->name ? t->name : "(null)";
  if (!t->name || !t->name[0] || strcmp(t->name, "__metadata__") == 0)
    return errorf(err, errlen, "%s: tensor name '%s' is not allowed", path, name);
  if (!t->bytes && t->dtype != ST_F32 && t->dtype != ST_BF16)
    return errorf(err, errlen, "%s: tensor '%s': can only convert floats to F32 or BF16, not %s",
                  path, name, st_dtype_name(t->dtype));
  if (t->bytes && t->data)
    return errorf(err, errlen, "%s: tensor '%s': both floats and bytes given", path, name);
  if (t->ndim < 0 || t->ndim > ST_MAX_DIMS)
    return errorf(err, errlen, "%s: tensor '%s': %d dimensions", path, name, t->ndim);
  it->numel = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0 || (t->shape[i] && it->numel > (UINT64_MAX >> 3) / (uint64_t)t->shape[i]))
      return errorf(err, errlen, "%s: tensor '%s': bad shape[%d] = %lld", path, name, i, (long long)t->shape[i]);
    it->numel *= (uint64_t)t->shape[i];
  }
  if (it->numel && !t->data && !t->bytes)
    return errorf(err, errlen, "%s: tensor '%s': no data", path, name);
  return 0;
}

static json_t *header_json(const struct write_item *items, size_t n, int pt_metadata) {
  json_t *root = json_object();
  if (pt_metadata) json_object_set_new(root, "__metadata__", json_pack("{s:s}", "format", "pt"));
  uint64_t off = 0;
  for (size_t k = 0; k < n; k++) {
    const struct st_write_tensor *t = items[k].t;
    json_t *shape = json_array();
    for (int i = 0; i < t->ndim; i++) json_array_append_new(shape, json_integer(t->shape[i]));
    uint64_t end = off + items[k].numel * st_dtype_size(t->dtype);
    json_object_set_new(root, t->name, json_pack("{s:s,s:o,s:[I,I]}", "dtype", st_dtype_name(t->dtype), "shape",
                                                 shape, "data_offsets", (json_int_t)off, (json_int_t)end));
    off = end;
  }
  return root;
}

static int write_data(FILE *fp, const struct write_item *it) {
  const float *x = it->t->data;
  if (it->numel == 0) return 0;  /* an empty tensor may have no data pointer */
  if (it->t->bytes) {
    size_t bytes = it->numel * st_dtype_size(it->t->dtype);
    return fwrite(it->t->bytes, 1, bytes, fp) == bytes ? 0 : -1;
  }
  if (it->t->dtype == ST_F32) return fwrite(x, 4, it->numel, fp) == it->numel ? 0 : -1;
  uint16_t buf[8192];
  for (uint64_t i = 0; i < it->numel;) {
    size_t m = 0;
    for (; m < 8192 && i < it->numel; m++, i++) buf[m] = st_f32_to_bf16(x[i]);
    if (fwrite(buf, 2, m, fp) != m) return -1;
  }
  return 0;
}

/* Writes the whole file to tmp; 0 or -1 with errno set. */
static int write_file(const char *tmp, const char *header, const struct write_item *items, size_t n) {
  FILE *fp = fopen(tmp, "wb");
  if (!fp) return -1;
  /* Spaces pad the header so the data starts 8-byte aligned, as Hugging Face's writer does. */
  size_t len = strlen(header), padded = (len + 7) & ~(size_t)7;
  uint64_t hlen = padded;
  int bad = fwrite(&hlen, 8, 1, fp) != 1 || fwrite(header, 1, len, fp) != len;
  for (size_t i = len; i < padded && !bad; i++) bad = fputc(' ', fp) == EOF;
  for (size_t k = 0; k < n && !bad; k++) bad = write_data(fp, &items[k]) != 0;
  bad = bad || fflush(fp) != 0 || fsync(fileno(fp)) != 0;
  int saved = errno;
  bad = (fclose(fp) != 0) || bad;
  if (bad && saved) errno = saved;
  return bad ? -1 : 0;
}

int st_write(const char *path, const struct st_write_tensor *tensors, size_t n, int pt_metadata, char *err,
             size_t errlen) {
  struct write_item *items = xcalloc(n ? n : 1, sizeof *items);
  int rc = 0;
  for (size_t i = 0; i < n && rc == 0; i++) {
    items[i].t = &tensors[i];
    rc = check_write_tensor(path, &items[i], err, errlen);
  }
  if (rc == 0) qsort(items, n, sizeof *items, cmp_write_item);
  for (size_t k = 1; k < n && rc == 0; k++)
    if (strcmp(items[k].t->name, items[k - 1].t->name) == 0)
      rc = errorf(err, errlen, "%s: tensor '%s' given twice", path, items[k].t->name);
  char *header = NULL;
  if (rc == 0) {
    json_t *root = header_json(items, n, pt_metadata);
    header = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!header) rc = errorf(err, errlen, "%s: cannot encode the header", path);
  }
  if (rc == 0) {
    size_t tlen = strlen(path) + 32;
    char *tmp = xmalloc(tlen);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
    if (write_file(tmp, header, items, n) != 0)
      rc = errorf(err, errlen, "%s: cannot write: %s", tmp, strerror(errno));
    else if (rename(tmp, path) != 0)
      rc = errorf(err, errlen, "%s: cannot rename into place: %s", path, strerror(errno));
    if (rc) unlink(tmp);
    free(tmp);
  }
  free(header);
  free(items);
  return rc;
}
