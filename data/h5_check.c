#define _POSIX_C_SOURCE 200809L
#include "data/h5_check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

void h5c_close(hid_t id) {
  if (id < 0) return;
  H5E_BEGIN_TRY {
    switch (H5Iget_type(id)) {
    case H5I_FILE: H5Fclose(id); break;
    case H5I_GROUP: H5Gclose(id); break;
    case H5I_DATASET: H5Dclose(id); break;
    case H5I_DATASPACE: H5Sclose(id); break;
    case H5I_DATATYPE: H5Tclose(id); break;
    case H5I_ATTR: H5Aclose(id); break;
    case H5I_GENPROP_LST: H5Pclose(id); break;
    default: break;
    }
  }
  H5E_END_TRY;
}

/* "uint32", "float64", "a string", "a compound type", ... */
static void type_text(hid_t t, char *out, size_t len) {
  H5T_class_t c = H5Tget_class(t);
  size_t size = H5Tget_size(t);
  switch (c) {
  case H5T_INTEGER:
    snprintf(out, len, "%s%zu", H5Tget_sign(t) == H5T_SGN_NONE ? "uint" : "int", 8 * size);
    break;
  case H5T_FLOAT: snprintf(out, len, "float%zu", 8 * size); break;
  case H5T_STRING:
    snprintf(out, len, "a %s string", H5Tis_variable_str(t) > 0 ? "variable-length" : "fixed-length");
    break;
  case H5T_COMPOUND: snprintf(out, len, "a compound type"); break;
  case H5T_ARRAY: snprintf(out, len, "an array type"); break;
  case H5T_ENUM: snprintf(out, len, "an enum type"); break;
  case H5T_VLEN: snprintf(out, len, "a variable-length sequence"); break;
  case H5T_OPAQUE: snprintf(out, len, "an opaque type"); break;
  case H5T_REFERENCE: snprintf(out, len, "a reference type"); break;
  case H5T_BITFIELD: snprintf(out, len, "a bitfield"); break;
  default: snprintf(out, len, "an unknown type"); break;
  }
}

/* "a scalar", "a 1-D array [3]", "an empty (null) dataspace" */
static void space_text(hid_t s, char *out, size_t len) {
  H5S_class_t c = H5Sget_simple_extent_type(s);
  if (c == H5S_SCALAR) {
    snprintf(out, len, "a scalar");
  } else if (c == H5S_NULL) {
    snprintf(out, len, "an empty (null) dataspace");
  } else if (c == H5S_SIMPLE) {
    hsize_t dims[H5S_MAX_RANK];
    int nd = H5Sget_simple_extent_ndims(s);
    if (nd < 0 || nd > H5S_MAX_RANK || H5Sget_simple_extent_dims(s, dims, NULL) < 0) {
      snprintf(out, len, "an unreadable dataspace");
      return;
    }
    int n = snprintf(out, len, "a %d-D array [", nd);
    for (int i = 0; i < nd && n > 0 && (size_t)n < len; i++)
      n += snprintf(out + n, len - (size_t)n, "%s%llu", i ? ", " : "", (unsigned long long)dims[i]);
    if (n > 0 && (size_t)n < len) snprintf(out + n, len - (size_t)n, "]");
  } else {
    snprintf(out, len, "an unreadable dataspace");
  }
}

static int plain_name(const char *file, const char *name, char *err, size_t errlen) {
  if (!name[0] || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
    return errorf(err, errlen, "%s: '%s' is not a plain object name", file, name);
  return 0;
}

int h5c_exists(hid_t loc, const char *file, const char *name, char *err, size_t errlen) {
  if (plain_name(file, name, err, errlen) != 0) return -1;
  htri_t there = H5Lexists(loc, name, H5P_DEFAULT);
  if (there < 0) return errorf(err, errlen, "%s: cannot look up '%s' (damaged file?)", file, name);
  return there > 0;
}

int h5c_require_hard(hid_t loc, const char *file, const char *name, char *err, size_t errlen) {
  int there = h5c_exists(loc, file, name, err, errlen);
  if (there < 0) return -1;
  if (!there) return errorf(err, errlen, "%s: no '%s'", file, name);
  H5L_info_t info;
  if (H5Lget_info(loc, name, &info, H5P_DEFAULT) < 0)
    return errorf(err, errlen, "%s: cannot read link '%s' (damaged file?)", file, name);
  if (info.type != H5L_TYPE_HARD)
    return errorf(err, errlen, "%s: '%s' is a%s link; only the tensor links of a checkpoint's "
                  "model.h5 may point elsewhere", file, name,
                  info.type == H5L_TYPE_SOFT ? " soft" : info.type == H5L_TYPE_EXTERNAL ? "n external" : " user-defined");
  return 0;
}

/* Opens attribute name of loc with its type and space, checking that it is a scalar. */
static int open_scalar_attr(hid_t loc, const char *file, const char *name, hid_t *attr,
                            hid_t *type, char *err, size_t errlen) {
  *attr = *type = -1;
  hid_t space = -1;
  char have[96];
  htri_t there = H5Aexists(loc, name);
  if (there < 0) return errorf(err, errlen, "%s: cannot look up attribute '%s' (damaged file?)", file, name);
  if (!there) return errorf(err, errlen, "%s: attribute '%s' is missing", file, name);
  if ((*attr = H5Aopen(loc, name, H5P_DEFAULT)) < 0 || (*type = H5Aget_type(*attr)) < 0 ||
      (space = H5Aget_space(*attr)) < 0) {
    errorf(err, errlen, "%s: attribute '%s' is unreadable (damaged file?)", file, name);
    goto fail;
  }
  if (H5Sget_simple_extent_type(space) != H5S_SCALAR) {
    space_text(space, have, sizeof have);
    errorf(err, errlen, "%s: attribute '%s' must be a scalar, not %s", file, name, have);
    goto fail;
  }
  h5c_close(space);
  return 0;
fail:
  h5c_close(space);
  h5c_close(*type);
  h5c_close(*attr);
  *attr = *type = -1;
  return -1;
}

/* An integer attribute as a sign and magnitude. */
static int attr_integer(hid_t loc, const char *file, const char *name, int *negative,
                        uint64_t *mag, char *err, size_t errlen) {
  hid_t attr, type;
  char have[96];
  if (open_scalar_attr(loc, file, name, &attr, &type, err, errlen) != 0) return -1;
  int rc = -1;
  if (H5Tget_class(type) != H5T_INTEGER || H5Tget_size(type) > 8 || H5Tget_size(type) < 1) {
    type_text(type, have, sizeof have);
    errorf(err, errlen, "%s: attribute '%s' must be an integer of at most 64 bits, not %s", file,
           name, have);
    goto out;
  }
  if (H5Tget_sign(type) == H5T_SGN_NONE) {
    uint64_t v;
    if (H5Aread(attr, H5T_NATIVE_UINT64, &v) < 0) goto unreadable;
    *negative = 0, *mag = v;
  } else {
    int64_t v;
    if (H5Aread(attr, H5T_NATIVE_INT64, &v) < 0) goto unreadable;
    *negative = v < 0;
    *mag = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
  }
  rc = 0;
  goto out;
unreadable:
  errorf(err, errlen, "%s: attribute '%s' is unreadable (damaged file?)", file, name);
out:
  h5c_close(type);
  h5c_close(attr);
  return rc;
}

int h5c_attr_int(hid_t loc, const char *file, const char *name, int64_t lo, int64_t hi,
                 int64_t *out, char *err, size_t errlen) {
  int neg;
  uint64_t mag;
  if (attr_integer(loc, file, name, &neg, &mag, err, errlen) != 0) return -1;
  int ok;
  int64_t v = 0;
  if (neg) {
    ok = mag <= (uint64_t)INT64_MAX + 1;
    if (ok) v = mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
  } else {
    ok = mag <= (uint64_t)INT64_MAX;
    if (ok) v = (int64_t)mag;
  }
  if (!ok || v < lo || v > hi) {
    if (neg) errorf(err, errlen, "%s: attribute '%s' is -%llu; allowed: %lld to %lld", file, name,
                    (unsigned long long)mag, (long long)lo, (long long)hi);
    else errorf(err, errlen, "%s: attribute '%s' is %llu; allowed: %lld to %lld", file, name,
                (unsigned long long)mag, (long long)lo, (long long)hi);
    return -1;
  }
  *out = v;
  return 0;
}

int h5c_attr_u64(hid_t loc, const char *file, const char *name, uint64_t *out, char *err,
                 size_t errlen) {
  int neg;
  uint64_t mag;
  if (attr_integer(loc, file, name, &neg, &mag, err, errlen) != 0) return -1;
  if (neg)
    return errorf(err, errlen, "%s: attribute '%s' is -%llu; it must not be negative", file, name,
                  (unsigned long long)mag);
  *out = mag;
  return 0;
}

int h5c_attr_f64(hid_t loc, const char *file, const char *name, double *out, char *err,
                 size_t errlen) {
  hid_t attr, type;
  char have[96];
  if (open_scalar_attr(loc, file, name, &attr, &type, err, errlen) != 0) return -1;
  int rc = -1;
  double v;
  if (H5Tget_class(type) != H5T_FLOAT || (H5Tget_size(type) != 4 && H5Tget_size(type) != 8)) {
    type_text(type, have, sizeof have);
    errorf(err, errlen, "%s: attribute '%s' must be a float32 or float64, not %s", file, name, have);
  } else if (H5Aread(attr, H5T_NATIVE_DOUBLE, &v) < 0) {
    errorf(err, errlen, "%s: attribute '%s' is unreadable (damaged file?)", file, name);
  } else if (!isfinite(v)) {
    errorf(err, errlen, "%s: attribute '%s' is %g; it must be a finite number", file, name, v);
  } else {
    *out = v;
    rc = 0;
  }
  h5c_close(type);
  h5c_close(attr);
  return rc;
}

int h5c_attr_str(hid_t loc, const char *file, const char *name, char *out, size_t cap,
                 char *err, size_t errlen) {
  hid_t attr, type, mem = -1;
  char have[96];
  if (open_scalar_attr(loc, file, name, &attr, &type, err, errlen) != 0) return -1;
  int rc = -1;
  size_t size = H5Tget_size(type);
  if (H5Tget_class(type) != H5T_STRING || H5Tis_variable_str(type) != 0) {
    type_text(type, have, sizeof have);
    errorf(err, errlen, "%s: attribute '%s' must be a fixed-length string, not %s", file, name, have);
  } else if (size < 1 || size > cap || (size == cap && H5Tget_strpad(type) != H5T_STR_NULLTERM)) {
    errorf(err, errlen, "%s: attribute '%s' is a string of %zu bytes; at most %zu are allowed",
           file, name, size, cap - 1);
  } else if ((mem = H5Tcopy(type)) < 0 || H5Aread(attr, mem, out) < 0) {
    errorf(err, errlen, "%s: attribute '%s' is unreadable (damaged file?)", file, name);
  } else {
    out[size < cap ? size : cap - 1] = 0;
    rc = 0;
  }
  h5c_close(mem);
  h5c_close(type);
  h5c_close(attr);
  return rc;
}

static const char *class_text(enum h5c_class cls) {
  return cls == H5C_UINT ? "uint" : cls == H5C_SINT ? "int" : "float";
}

/* 1 if t is exactly the type (cls, size) in either byte order. */
static int type_is(hid_t t, enum h5c_class cls, size_t size) {
  hid_t le = -1, be = -1;
  switch (cls) {
  case H5C_UINT:
    le = size == 1 ? H5T_STD_U8LE : size == 2 ? H5T_STD_U16LE : size == 4 ? H5T_STD_U32LE : size == 8 ? H5T_STD_U64LE : -1;
    be = size == 1 ? H5T_STD_U8BE : size == 2 ? H5T_STD_U16BE : size == 4 ? H5T_STD_U32BE : size == 8 ? H5T_STD_U64BE : -1;
    break;
  case H5C_SINT:
    le = size == 1 ? H5T_STD_I8LE : size == 2 ? H5T_STD_I16LE : size == 4 ? H5T_STD_I32LE : size == 8 ? H5T_STD_I64LE : -1;
    be = size == 1 ? H5T_STD_I8BE : size == 2 ? H5T_STD_I16BE : size == 4 ? H5T_STD_I32BE : size == 8 ? H5T_STD_I64BE : -1;
    break;
  case H5C_FLOAT:
    le = size == 4 ? H5T_IEEE_F32LE : size == 8 ? H5T_IEEE_F64LE : -1;
    be = size == 4 ? H5T_IEEE_F32BE : size == 8 ? H5T_IEEE_F64BE : -1;
    break;
  }
  if (le < 0) return 0;
  return H5Tequal(t, le) > 0 || H5Tequal(t, be) > 0;
}

static int check_storage(hid_t ds, const char *file, const char *name, const char *what,
                         size_t elem, char *err, size_t errlen) {
  hid_t dcpl = H5Dget_create_plist(ds);
  int rc = -1;
  if (dcpl < 0) {
    errorf(err, errlen, "%s: %s '%s': unreadable storage layout (damaged file?)", file, what, name);
    goto out;
  }
  H5D_layout_t layout = H5Pget_layout(dcpl);
  if (layout != H5D_CONTIGUOUS && layout != H5D_COMPACT && layout != H5D_CHUNKED) {
    errorf(err, errlen, "%s: %s '%s' is stored as a %s dataset; only contiguous, compact or "
           "chunked datasets are read", file, what, name,
           layout == H5D_VIRTUAL ? "virtual" : "strange");
    goto out;
  }
  int n_ext = H5Pget_external_count(dcpl);
  if (n_ext != 0) {
    errorf(err, errlen, "%s: %s '%s' keeps its data in %d external file%s; only data inside the "
           "file is read", file, what, name, n_ext, n_ext == 1 ? "" : "s");
    goto out;
  }
  if (layout == H5D_CHUNKED) {
    hsize_t chunk[H5S_MAX_RANK];
    int nd = H5Pget_chunk(dcpl, H5S_MAX_RANK, chunk);
    uint64_t bytes = elem;
    int over = nd < 1;
    for (int i = 0; i < nd && !over; i++)
      over = __builtin_mul_overflow(bytes, (uint64_t)chunk[i], &bytes) || bytes > H5C_MAX_CHUNK_BYTES;
    if (over) {
      errorf(err, errlen, "%s: %s '%s' has chunks larger than %u bytes (or unreadable ones)", file,
             what, name, H5C_MAX_CHUNK_BYTES);
      goto out;
    }
  }
  int nf = H5Pget_nfilters(dcpl);
  if (nf < 0) {
    errorf(err, errlen, "%s: %s '%s': unreadable filters (damaged file?)", file, what, name);
    goto out;
  }
  for (int i = 0; i < nf; i++) {
    unsigned flags, config;
    size_t nv = 0;
    char fname[64] = "";
    H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &nv, NULL, sizeof fname, fname, &config);
    if (id != H5Z_FILTER_FLETCHER32) {
      fname[sizeof fname - 1] = 0;
      errorf(err, errlen, "%s: %s '%s' uses HDF5 filter %d (%s); only Fletcher32 is allowed "
             "(files are written uncompressed)", file, what, name, (int)id, fname[0] ? fname : "?");
      goto out;
    }
  }
  rc = 0;
out:
  h5c_close(dcpl);
  return rc;
}

hid_t h5c_open_dataset(hid_t loc, const char *file, const char *name, const char *what,
                       enum h5c_class cls, size_t size, int min_rank, int max_rank,
                       int allow_empty, int *rank, hsize_t dims[2], char *err, size_t errlen) {
  hid_t ds = -1, type = -1, space = -1;
  char have[96];
  if (h5c_require_hard(loc, file, name, err, errlen) != 0) return -1;
  H5O_info_t oinfo;
  if (H5Oget_info_by_name(loc, name, &oinfo, H5P_DEFAULT) < 0 || oinfo.type != H5O_TYPE_DATASET) {
    errorf(err, errlen, "%s: '%s' is not a dataset", file, name);
    return -1;
  }
  if ((ds = H5Dopen2(loc, name, H5P_DEFAULT)) < 0 || (type = H5Dget_type(ds)) < 0 ||
      (space = H5Dget_space(ds)) < 0) {
    errorf(err, errlen, "%s: %s '%s' is unreadable (damaged file?)", file, what, name);
    goto fail;
  }
  if (!type_is(type, cls, size)) {
    type_text(type, have, sizeof have);
    errorf(err, errlen, "%s: %s '%s' is %s; it must be %s%zu (no conversion is made)", file, what,
           name, have, class_text(cls), 8 * size);
    goto fail;
  }
  int ndim = H5Sget_simple_extent_ndims(space);
  if (H5Sget_simple_extent_type(space) != H5S_SIMPLE || ndim < min_rank || ndim > max_rank ||
      ndim > 2) {
    space_text(space, have, sizeof have);
    if (min_rank == max_rank)
      errorf(err, errlen, "%s: %s '%s' is %s; it must be a %d-D array", file, what, name, have,
             min_rank);
    else
      errorf(err, errlen, "%s: %s '%s' is %s; it must be a %d-D to %d-D array", file, what, name,
             have, min_rank, max_rank);
    goto fail;
  }
  *rank = ndim;
  if (H5Sget_simple_extent_dims(space, dims, NULL) != ndim) {
    errorf(err, errlen, "%s: %s '%s': unreadable shape (damaged file?)", file, what, name);
    goto fail;
  }
  for (int i = 0; i < ndim; i++)
    if (dims[i] == 0 && !allow_empty) {
      space_text(space, have, sizeof have);
      errorf(err, errlen, "%s: %s '%s' is %s; no dimension may be 0", file, what, name, have);
      goto fail;
    }
  if (check_storage(ds, file, name, what, size, err, errlen) != 0) goto fail;
  h5c_close(type);
  h5c_close(space);
  return ds;
fail:
  h5c_close(type);
  h5c_close(space);
  h5c_close(ds);
  return -1;
}

int h5c_bytes(const char *file, const char *name, int ndim, const hsize_t *dims, size_t elem,
              uint64_t limit, const char *limit_what, uint64_t *bytes, char *err, size_t errlen) {
  uint64_t b = elem;
  for (int i = 0; i < ndim; i++)
    if (__builtin_mul_overflow(b, (uint64_t)dims[i], &b))
      return errorf(err, errlen, "%s: '%s' has a shape whose size overflows 64 bits", file, name);
  if (b > limit || b > (uint64_t)SIZE_MAX)
    return errorf(err, errlen, "%s: '%s' claims %llu bytes of data, more than %s", file, name,
                  (unsigned long long)b, limit_what);
  *bytes = b;
  return 0;
}

uint64_t h5c_file_size(hid_t file) {
  hsize_t size = 0;
  if (H5Fget_filesize(file, &size) < 0) return 0;
  return size;
}

void *h5c_alloc(uint64_t bytes, const char *file, const char *what, char *err, size_t errlen) {
  void *p = bytes <= SIZE_MAX ? malloc(bytes ? (size_t)bytes : 1) : NULL;
  if (!p)
    errorf(err, errlen, "%s: out of memory: cannot allocate %llu bytes for %s", file,
           (unsigned long long)bytes, what);
  return p;
}
