#define _POSIX_C_SOURCE 200809L
#include "trainer/job.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/util.h"

/* ---- loading ------------------------------------------------------------------------------ */

/* Every sub-message of a job is made present, holding its proto defaults, so the engine reads
 * job->optim->lr without NULL checks and --print-job shows every default. */
static void fill_sections(ProtobufCMessage *msg) {
  const ProtobufCMessageDescriptor *d = msg->descriptor;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    if (f->type != PROTOBUF_C_TYPE_MESSAGE || f->label == PROTOBUF_C_LABEL_REPEATED) continue;
    ProtobufCMessage **slot = (ProtobufCMessage **)((char *)msg + f->offset);
    if (!*slot) {
      const ProtobufCMessageDescriptor *sd = f->descriptor;
      *slot = xmalloc(sd->sizeof_message);
      protobuf_c_message_init(sd, *slot);
    }
  }
}

Job *job_load(const char *path, char *err, size_t errlen) {
  size_t len = 0;
  struct stat st;
  /* a regular file of a sane size: /dev/zero or a FIFO would otherwise be read for ever */
  if (stat(path, &st) != 0) {
    errorf(err, errlen, "%s: cannot read the job file: %s", path, strerror(errno));
    return NULL;
  }
  if (!S_ISREG(st.st_mode) || st.st_size > JOB_MAX_BYTES) {
    errorf(err, errlen, "%s: not a job file: a job is a regular file of at most %d bytes", path,
           JOB_MAX_BYTES);
    return NULL;
  }
  char *bytes = read_file(path, &len);
  if (!bytes) {
    errorf(err, errlen, "%s: cannot read the job file: %s", path, strerror(errno));
    return NULL;
  }
  Job *job = qwen3__job__unpack(NULL, len, (const uint8_t *)bytes);
  free(bytes);
  if (!job) {
    errorf(err, errlen, "%s: not a valid binary qwen3.Job (truncated or garbage?). Job files are "
           "encoded from text with: protoc --encode=qwen3.Job -Iproto job.proto < job.txtpb > "
           "job.pb", path);
    return NULL;
  }
  fill_sections(&job->base);
  return job;
}

/* ---- --set ------------------------------------------------------------------------------- */

static const ProtobufCFieldDescriptor *find_field(const ProtobufCMessageDescriptor *d,
                                                  const char *name) {
  for (unsigned i = 0; i < d->n_fields; i++)
    if (strcmp(d->fields[i].name, name) == 0) return &d->fields[i];
  return NULL;
}

static void list_fields(const ProtobufCMessageDescriptor *d, char *out, size_t len) {
  size_t used = 0;
  out[0] = 0;
  for (unsigned i = 0; i < d->n_fields && used < len; i++)
    used += (size_t)snprintf(out + used, len - used, "%s%s", i ? ", " : "", d->fields[i].name);
}

/* Parses `text` as the scalar type of f into out (8 bytes are enough for every scalar). */
static int parse_scalar(const ProtobufCFieldDescriptor *f, const char *path, const char *text,
                        void *out, char *err, size_t errlen) {
  char *end = NULL;
  errno = 0;
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32: {
    long v = strtol(text, &end, 10);
    if (*text && !*end && !errno && v >= INT32_MIN && v <= INT32_MAX) {
      *(int32_t *)out = (int32_t)v;
      return 0;
    }
    return errorf(err, errlen, "--set %s=%s: expected a 32-bit integer", path, text);
  }
  case PROTOBUF_C_TYPE_UINT64: {
    unsigned long long v = strtoull(text, &end, 10);
    if (*text && *text != '-' && !*end && !errno) {
      *(uint64_t *)out = v;
      return 0;
    }
    return errorf(err, errlen, "--set %s=%s: expected an unsigned integer", path, text);
  }
  case PROTOBUF_C_TYPE_DOUBLE: {
    double v = strtod(text, &end);
    if (*text && !*end && !errno && isfinite(v)) {
      *(double *)out = v;
      return 0;
    }
    return errorf(err, errlen, "--set %s=%s: expected a finite number", path, text);
  }
  case PROTOBUF_C_TYPE_BOOL:
    if (!strcmp(text, "true") || !strcmp(text, "1")) *(protobuf_c_boolean *)out = 1;
    else if (!strcmp(text, "false") || !strcmp(text, "0")) *(protobuf_c_boolean *)out = 0;
    else return errorf(err, errlen, "--set %s=%s: expected true or false", path, text);
    return 0;
  case PROTOBUF_C_TYPE_ENUM: {
    const ProtobufCEnumDescriptor *ed = f->descriptor;
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value_by_name(ed, text);
    if (v) {
      *(int *)out = v->value;
      return 0;
    }
    char allowed[512];
    size_t used = 0;
    allowed[0] = 0;
    for (unsigned i = 0; i < ed->n_values; i++)
      used += (size_t)snprintf(allowed + used, sizeof allowed - used, "%s%s", i ? "|" : "",
                               ed->values[i].name);
    return errorf(err, errlen, "--set %s=%s: allowed values are %s", path, text, allowed);
  }
  case PROTOBUF_C_TYPE_STRING:
    *(char **)out = xstrdup(text);
    return 0;
  default:
    return errorf(err, errlen, "--set %s: this field's type cannot be set here", path);
  }
}

static size_t scalar_size(const ProtobufCFieldDescriptor *f) {
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32: return sizeof(int32_t);
  case PROTOBUF_C_TYPE_UINT64: return sizeof(uint64_t);
  case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
  case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
  case PROTOBUF_C_TYPE_ENUM: return sizeof(int);
  case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
  default: return 0;
  }
}

/* Repeated message fields already replaced by this process's --set assignments. */
static const void *replaced_lists[16];
static int n_replaced_lists;

static int was_replaced(const void *list) {
  for (int i = 0; i < n_replaced_lists; i++)
    if (replaced_lists[i] == list) return 1;
  return 0;
}

int job_set(Job *job, const char *assignment, char *err, size_t errlen) {
  const char *eq = strchr(assignment, '=');
  if (!eq || eq == assignment)
    return errorf(err, errlen, "--set %s: expected section.field=value", assignment);
  char path[256];
  size_t plen = (size_t)(eq - assignment);
  if (plen >= sizeof path) return errorf(err, errlen, "--set: field path too long");
  memcpy(path, assignment, plen);
  path[plen] = 0;
  const char *value = eq + 1;

  ProtobufCMessage *msg = &job->base;
  char walk[256];
  memcpy(walk, path, plen + 1);
  char *save = NULL;
  for (char *name = strtok_r(walk, ".", &save); name; name = strtok_r(NULL, ".", &save)) {
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    const ProtobufCFieldDescriptor *f = find_field(d, name);
    if (!f) {
      char fields[1024];
      list_fields(d, fields, sizeof fields);
      return errorf(err, errlen, "--set %s: '%s' has no field '%s' (fields: %s)", path,
                      d->name, name, fields);
    }
    char *base = (char *)msg + f->offset;
    int last = (save == NULL || *save == 0);
    if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
      if (last) return errorf(err, errlen, "--set %s: '%s' is a section; name a field in it", path, name);
      const ProtobufCMessageDescriptor *sd = f->descriptor;
      if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t *count = (size_t *)((char *)msg + f->quantifier_offset);
        ProtobufCMessage ***list = (ProtobufCMessage ***)base;
        /* a list this process replaced before may belong to an earlier job at the same
         * address: an empty one is replaced again */
        if (!was_replaced(list) || *count == 0) {
          if (!was_replaced(list)) {
            if (n_replaced_lists == (int)(sizeof replaced_lists / sizeof *replaced_lists))
              return errorf(err, errlen, "--set %s: too many repeated sections set", path);
            replaced_lists[n_replaced_lists++] = list;
          }
          /* the job file's entries go: protobuf-c frees what it finds there at the end */
          for (size_t i = 0; i < *count; i++) protobuf_c_message_free_unpacked((*list)[i], NULL);
          free(*list);
          ProtobufCMessage *elem = xmalloc(sd->sizeof_message);
          protobuf_c_message_init(sd, elem);
          *list = xmalloc(sizeof(ProtobufCMessage *));
          (*list)[0] = elem;
          *count = 1;
        }
        msg = (*list)[*count - 1];
      } else {
        ProtobufCMessage **slot = (ProtobufCMessage **)base;
        if (!*slot) {
          *slot = xmalloc(sd->sizeof_message);
          protobuf_c_message_init(sd, *slot);
        }
        msg = *slot;
      }
      continue;
    }
    if (!last) return errorf(err, errlen, "--set %s: '%s' is not a section", path, name);
    size_t size = scalar_size(f);
    unsigned char parsed[8];
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {   /* a,b,c replaces the whole list */
      char *items = xstrdup(value), *item_save = NULL;
      size_t n = 0;
      char *list = NULL;
      for (char *item = strtok_r(items, ",", &item_save); item;
           item = strtok_r(NULL, ",", &item_save)) {
        if (parse_scalar(f, path, item, parsed, err, errlen) != 0) {
          free(items);
          free(list);
          return -1;
        }
        list = xrealloc(list, (n + 1) * size);
        memcpy(list + n++ * size, parsed, size);
      }
      free(items);
      /* the list it replaces is ours to free, strings and all (protobuf-c's allocator is
       * malloc, and so is ours) */
      size_t *count = (size_t *)((char *)msg + f->quantifier_offset);
      if (f->type == PROTOBUF_C_TYPE_STRING)
        for (size_t i = 0; i < *count; i++) free((*(char ***)base)[i]);
      free(*(void **)base);
      *(void **)base = list;
      *count = n;
      return 0;
    }
    if (parse_scalar(f, path, value, parsed, err, errlen) != 0) return -1;
    {
      /* a string replaced is freed unless it is the schema's default, which is static */
      if (f->type == PROTOBUF_C_TYPE_STRING && *(char **)base &&
          *(char **)base != (const char *)f->default_value)
        free(*(char **)base);
      memcpy(base, parsed, size);
      if (f->quantifier_offset && f->type != PROTOBUF_C_TYPE_STRING)
        *(protobuf_c_boolean *)((char *)msg + f->quantifier_offset) = 1;
    }
    return 0;
  }
  return errorf(err, errlen, "--set %s: empty field path", path);
}

/* ---- printing ------------------------------------------------------------------------------ */

static void print_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c == '\n') fputs("\\n", f);
    else if (c == '\t') fputs("\\t", f);
    else if (c < 0x20) fprintf(f, "\\%03o", c);
    else fputc(c, f);
  }
  fputc('"', f);
}

static void print_double(FILE *f, double v) {
  char buf[64];
  snprintf(buf, sizeof buf, "%.15g", v);
  if (strtod(buf, NULL) != v) snprintf(buf, sizeof buf, "%.17g", v);
  fputs(buf, f);
}

static void print_message(FILE *f, const ProtobufCMessage *msg, int depth);

static void print_value(FILE *f, const ProtobufCFieldDescriptor *fd, const void *p, int depth) {
  switch (fd->type) {
  case PROTOBUF_C_TYPE_INT32: fprintf(f, "%d", *(const int32_t *)p); break;
  case PROTOBUF_C_TYPE_UINT64: fprintf(f, "%llu", (unsigned long long)*(const uint64_t *)p); break;
  case PROTOBUF_C_TYPE_DOUBLE: print_double(f, *(const double *)p); break;
  case PROTOBUF_C_TYPE_BOOL: fputs(*(const protobuf_c_boolean *)p ? "true" : "false", f); break;
  case PROTOBUF_C_TYPE_ENUM: {
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(fd->descriptor, *(const int *)p);
    if (v) fputs(v->name, f);
    else fprintf(f, "%d", *(const int *)p);
    break;
  }
  case PROTOBUF_C_TYPE_STRING: print_string(f, *(char *const *)p); break;
  case PROTOBUF_C_TYPE_MESSAGE:
    fputs("{\n", f);
    print_message(f, *(ProtobufCMessage *const *)p, depth + 1);
    fprintf(f, "%*s}", 2 * depth, "");
    break;
  default: fputs("?", f);
  }
}

static void print_message(FILE *f, const ProtobufCMessage *msg, int depth) {
  const ProtobufCMessageDescriptor *d = msg->descriptor;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *fd = &d->fields[i];
    const char *base = (const char *)msg + fd->offset;
    const char *sep = fd->type == PROTOBUF_C_TYPE_MESSAGE ? " " : ": ";
    if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n = *(const size_t *)((const char *)msg + fd->quantifier_offset);
      size_t size = fd->type == PROTOBUF_C_TYPE_MESSAGE ? sizeof(void *) : scalar_size(fd);
      const char *list = *(char *const *)base;
      for (size_t k = 0; k < n; k++) {
        fprintf(f, "%*s%s%s", 2 * depth, "", fd->name, sep);
        print_value(f, fd, list + k * size, depth);
        fputc('\n', f);
      }
      continue;
    }
    if ((fd->type == PROTOBUF_C_TYPE_STRING || fd->type == PROTOBUF_C_TYPE_MESSAGE) &&
        *(void *const *)base == NULL)
      continue;   /* unset, and no default */
    if (fd->quantifier_offset && fd->type != PROTOBUF_C_TYPE_STRING && !fd->default_value &&
        !*(const protobuf_c_boolean *)((const char *)msg + fd->quantifier_offset))
      continue;   /* unset scalar without a default: derived elsewhere (e.g. model.max_seq_len) */
    fprintf(f, "%*s%s%s", 2 * depth, "", fd->name, sep);
    print_value(f, fd, base, depth);
    fputc('\n', f);
  }
}

void job_print(FILE *f, const Job *job) { print_message(f, &job->base, 0); }
