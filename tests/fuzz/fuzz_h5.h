/* Structure-aware HDF5 inputs. HDF5 1.10's own parser is not safe on arbitrary bytes (a byte
 * flipped in an object header gives heap overflows inside libhdf5, which we cannot fix), so the
 * shard and checkpoint targets do not hand raw bytes to H5Fopen. Instead the fuzz input is a
 * recipe: each byte picks how an object of the file is written through HDF5's API (present or
 * not, datatype, dataspace rank and dims, layout and filters, soft/external link instead of
 * the object, values). HDF5 then writes a well-formed file, and our readers must refuse or
 * accept every such file without fault. A byte of 0 (or the end of the input) always picks what
 * a valid file has, so the empty input is a valid file. */
#ifndef QWEN3_FUZZ_H5_H
#define QWEN3_FUZZ_H5_H

#include <hdf5.h>
#include <stdint.h>
#include <string.h>

struct recipe {
  const uint8_t *p;
  size_t n;
};

static inline unsigned take(struct recipe *r) {
  if (!r->n) return 0;
  r->n--;
  return *r->p++;
}

static inline uint64_t take_u64(struct recipe *r, uint64_t dflt) {
  if (!take(r)) return dflt;
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | take(r);
  return v;
}

/* The datatypes a writer may pick; index 0 is replaced by the valid one. */
static inline hid_t pick_type(struct recipe *r, hid_t valid, hid_t *owned) {
  *owned = -1;
  switch (take(r) % 14) {
  case 0: return valid;
  case 1: return H5T_STD_U8LE;
  case 2: return H5T_STD_U16BE;
  case 3: return H5T_STD_U32LE;
  case 4: return H5T_STD_U64BE;
  case 5: return H5T_STD_I32LE;
  case 6: return H5T_STD_I64LE;
  case 7: return H5T_IEEE_F32LE;
  case 8: return H5T_IEEE_F64BE;
  case 9: {
    hsize_t d = 1 + take(r) % 4;
    return *owned = H5Tarray_create2(H5T_STD_U32LE, 1, &d);
  }
  case 10: {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, take(r) % 2 ? H5T_VARIABLE : 1 + take(r) % 100);
    return *owned = t;
  }
  case 11: {
    hid_t t = H5Tcreate(H5T_COMPOUND, 8);
    H5Tinsert(t, "a", 0, H5T_STD_U32LE);
    H5Tinsert(t, "b", 4, H5T_STD_U32LE);
    return *owned = t;
  }
  case 12: return *owned = H5Tvlen_create(H5T_STD_U8LE);
  default: {
    hid_t t = H5Tcopy(H5T_STD_U32LE);
    H5Tset_precision(t, 1 + take(r) % 32);
    return *owned = t;
  }
  }
}

/* A dataspace: scalar (rank 0) by default for attributes, or rank 1..3 with small or huge dims. */
static inline hid_t pick_space(struct recipe *r, int valid_rank, const hsize_t *valid_dims,
                               hsize_t *npoints) {
  unsigned k = take(r) % 6;
  hsize_t dims[3] = {1, 1, 1};
  int rank = valid_rank;
  if (k == 0) {
    for (int i = 0; i < rank; i++) dims[i] = valid_dims[i];
  } else if (k == 1) {
    rank = 0;
  } else if (k == 2) {
    *npoints = 0;
    return H5Screate(H5S_NULL);
  } else {
    rank = 1 + (int)(take(r) % 3);
    for (int i = 0; i < rank; i++)
      dims[i] = k == 5 ? (hsize_t)take_u64(r, 1) % ((hsize_t)1 << 40) : take(r) % 9;
  }
  *npoints = 1;
  for (int i = 0; i < rank; i++) *npoints *= dims[i];
  return rank == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(rank, dims, NULL);
}

/* Bytes for n elements of type t: the valid values when given and the type is the valid one,
 * else bytes from the recipe. NULL when too big to write (the dataset then holds fill values). */
static inline void *pick_values(struct recipe *r, hid_t t, hsize_t n, const void *valid,
                                size_t valid_bytes) {
  size_t size = H5Tget_size(t);
  if (n > 4096 || size > 64 || H5Tis_variable_str(t) > 0 || H5Tget_class(t) == H5T_VLEN)
    return NULL;
  size_t bytes = (size_t)n * size;
  uint8_t *buf = calloc(bytes ? bytes : 1, 1);
  if (valid && bytes == valid_bytes && !take(r)) {
    memcpy(buf, valid, bytes);
  } else {
    for (size_t i = 0; i < bytes; i++) buf[i] = (uint8_t)take(r);
  }
  return buf;
}

/* Attribute `name` on loc: absent, or of a picked type and space, holding `valid` (a scalar of
 * valid_type) unless the recipe says otherwise. */
static inline void fz_attr(struct recipe *r, hid_t loc, const char *name, hid_t valid_type,
                           const void *valid, size_t valid_bytes) {
  if (take(r) % 8 == 7) return;   /* absent */
  hid_t owned, t = pick_type(r, valid_type, &owned);
  hsize_t n;
  hid_t s = pick_space(r, 0, NULL, &n);
  H5E_BEGIN_TRY {
    hid_t a = H5Acreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
    if (a >= 0) {
      void *v = pick_values(r, t, n, t == valid_type ? valid : NULL, valid_bytes);
      if (v) H5Awrite(a, t, v);
      free(v);
      H5Aclose(a);
    }
  }
  H5E_END_TRY;
  H5Sclose(s);
  if (owned >= 0) H5Tclose(owned);
}

/* Dataset `name` on loc: absent, a soft or external link, or a dataset of a picked type,
 * space, layout and filters, holding the valid values unless the recipe says otherwise. */
static inline void fz_dataset(struct recipe *r, hid_t loc, const char *name, hid_t valid_type,
                              int valid_rank, const hsize_t *valid_dims, const void *valid,
                              size_t valid_bytes) {
  unsigned how = take(r) % 16;
  if (how == 15) return;
  H5E_BEGIN_TRY {
    if (how == 14) {
      H5Lcreate_soft(take(r) % 2 ? "/" : "/elsewhere", loc, name, H5P_DEFAULT, H5P_DEFAULT);
    } else if (how == 13) {
      const char *files[] = {"/etc/passwd", "other.h5", "../x.h5", "stage_000_of_001.h5"};
      H5Lcreate_external(files[take(r) % 4], name, loc, name, H5P_DEFAULT, H5P_DEFAULT);
    } else {
      hid_t owned, t = pick_type(r, valid_type, &owned);
      hsize_t n;
      hid_t s = pick_space(r, valid_rank, valid_dims, &n);
      hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
      int rank = H5Sget_simple_extent_ndims(s);
      unsigned layout = take(r) % 4;
      if (layout >= 2 && rank > 0) {
        hsize_t chunk[3];
        for (int i = 0; i < rank; i++) chunk[i] = layout == 3 ? 1 + take(r) % 200000 : 4;
        H5Pset_chunk(dcpl, rank, chunk);
        unsigned f = take(r);
        if (f & 1) H5Pset_fletcher32(dcpl);
        if (f & 2) H5Pset_deflate(dcpl, 1);
        if (f & 4) H5Pset_shuffle(dcpl);
      } else if (layout == 1 && n < 1000) {
        H5Pset_layout(dcpl, H5D_COMPACT);
      }
      hid_t ds = H5Dcreate2(loc, name, t, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
      if (ds >= 0) {
        void *v = pick_values(r, t, n, t == valid_type ? valid : NULL, valid_bytes);
        if (v && n) H5Dwrite(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
        free(v);
        H5Dclose(ds);
      }
      H5Pclose(dcpl);
      H5Sclose(s);
      if (owned >= 0) H5Tclose(owned);
    }
  }
  H5E_END_TRY;
}

#endif
