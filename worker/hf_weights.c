/* Loading a stage's parameters from a Hugging Face model directory, by tensor name. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/safetensors.h"
#include "worker/worker.h"

int worker_load_hf(struct worker *w, const char *dir, char *err, size_t errlen) {
  struct st_model *m = NULL;
  if (st_model_open(&m, dir, err, errlen) != 0) return -1;
  float *host = xmalloc(w->plan.param_floats * sizeof(float));
  int rc = 0;
  for (int i = 0; i < w->n_params && rc == 0; i++) {
    const struct param *p = &w->params[i];
    const struct st_tensor *t = st_model_find(m, p->name);
    int ok_shape = t && (p->cols == 1 ? (t->ndim == 1 && t->shape[0] == p->rows)
                                      : (t->ndim == 2 && t->shape[0] == p->rows &&
                                         t->shape[1] == p->cols));
    if (!t) {
      snprintf(err, errlen, "%s: the model has no tensor '%s'", dir, p->name);
      rc = -1;
    } else if (!ok_shape) {
      snprintf(err, errlen, "%s: tensor '%s' has shape [%lld%s%lld], the job's model needs "
               "[%d, %d] (is the model section right?)", t->path, p->name,
               (long long)t->shape[0], t->ndim > 1 ? ", " : "",
               t->ndim > 1 ? (long long)t->shape[1] : 0LL, p->rows, p->cols);
      rc = -1;
    } else {
      rc = st_read_f32(t, host + p->offset, (size_t)p->rows * p->cols, err, errlen);
    }
  }
  if (rc == 0) w->be->to_device(w->weights, host, w->plan.param_floats * sizeof(float));
  free(host);
  st_model_close(m);
  return rc;
}
