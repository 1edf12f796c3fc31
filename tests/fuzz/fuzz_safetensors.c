/* safetensors files (data/safetensors.c) from arbitrary bytes: the header is untrusted; every
 * tensor st_open accepts lies inside the file, and st_read_f32 converts it or refuses. */
#include "tests/fuzz/fuzz_common.h"

#include "data/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  const char *path = fuzz_write("model.safetensors", data, size);
  struct st_file *f;
  char err[1024] = "";
  if (st_open(&f, path, err, sizeof err) == 0) {
    for (size_t i = 0; i < st_count(f); i++) {
      const struct st_tensor *t = st_tensor_at(f, i);
      if (st_find(f, t->name) != t) abort();
      if (t->nbytes != t->numel * st_dtype_size(t->dtype) || t->nbytes > size) abort();
      if (t->numel > (1u << 22)) continue;
      float *buf = malloc((t->numel ? t->numel : 1) * sizeof *buf);
      st_read_f32(t, buf, t->numel, err, sizeof err);
      free(buf);
    }
    st_metadata(f, "format");
    st_close(f);
  } else if (!err[0]) {
    abort();
  }
  /* the same file as a model directory */
  struct st_model *m;
  if (st_model_open(&m, fuzz_dir, err, sizeof err) == 0) st_model_close(m);
  return 0;
}
