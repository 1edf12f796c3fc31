/* Token shards (data/shard.c): the input is a recipe (fuzz_h5.h) for every dataset and attribute
 * of a shard (tokens, doc_offsets, loss_mask, vocab_size, format_version, tokenizer). shard_load
 * either loads a shard whose every token is below its vocab_size and whose doc_offsets cover the
 * tokens, or returns an error that says what is wrong. */
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/fuzz_h5.h"

#include "data/shard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_init();
  struct recipe r = {data, size};
  char path[256];
  snprintf(path, sizeof path, "%s/shard.h5", fuzz_dir);
  hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) abort();
  const uint32_t tokens[7] = {1, 2, 3, 4, 5, 7, 8};
  const uint64_t offsets[3] = {0, 5, 7};
  const uint8_t mask[7] = {0, 0, 1, 1, 1, 1, 0};
  const uint32_t vocab = 10;
  const int32_t version = 1;
  const char tok[6] = "bytes";
  hsize_t n_tok = 7, n_off = 3;
  fz_dataset(&r, f, "tokens", H5T_STD_U32LE, 1, &n_tok, tokens, sizeof tokens);
  fz_dataset(&r, f, "doc_offsets", H5T_STD_U64LE, 1, &n_off, offsets, sizeof offsets);
  if (take(&r) % 2) fz_dataset(&r, f, "loss_mask", H5T_STD_U8LE, 1, &n_tok, mask, sizeof mask);
  fz_attr(&r, f, "vocab_size", H5T_STD_U32LE, &vocab, sizeof vocab);
  fz_attr(&r, f, "format_version", H5T_STD_I32LE, &version, sizeof version);
  hid_t st = H5Tcopy(H5T_C_S1);
  H5Tset_size(st, sizeof tok);
  fz_attr(&r, f, "tokenizer", st, tok, sizeof tok);
  H5Tclose(st);
  if (H5Fclose(f) < 0) abort();
  fuzz_check_hdf5_closed("the recipe writer");

  struct shard s;
  char err[1024] = "";
  if (shard_load(&s, path, err, sizeof err) == 0) {
    if (s.doc_offsets[0] != 0 || s.doc_offsets[s.n_docs] != s.n_tokens) abort();
    for (uint64_t i = 0; i < s.n_tokens; i++)
      if (s.tokens[i] >= s.vocab_size) abort();
    shard_free(&s);
  } else if (!err[0]) {
    abort();   /* an error must say what is wrong */
  }
  fuzz_check_hdf5_closed("shard_load");
  return 0;
}
