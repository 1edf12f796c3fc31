/* Shard names and the shard index of a Hugging Face model directory (hf_shards.h). */
#define _POSIX_C_SOURCE 200809L
#include "data/hf_shards.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

void hf_shard_file(char *out, size_t len, int shard, int n_shards) {
  snprintf(out, len, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
}

int hf_write_index(const char *hf_dir, const char *const *names, const int *shard, size_t n,
                   int n_shards, double total_bytes, char *err, size_t errlen) {
  char path[4300], tmp[4400], file[64];
  json_t *map = json_object(), *root = json_object();
  for (size_t i = 0; i < n; i++) {
    hf_shard_file(file, sizeof file, shard[i], n_shards);
    json_object_set_new(map, names[i], json_string(file));
  }
  json_object_set_new(root, "metadata",
                      json_pack("{s:I}", "total_size", (json_int_t)total_bytes));
  json_object_set_new(root, "weight_map", map);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", hf_dir);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int rc = json_dump_file(root, tmp, JSON_INDENT(2) | JSON_SORT_KEYS) != 0 || rename(tmp, path) != 0
               ? errorf(err, errlen, "%s: cannot write", path)
               : 0;
  json_decref(root);
  return rc;
}
