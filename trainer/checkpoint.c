/* Placeholder until the checkpoint work lands: starts fresh, never saves. */
#include "trainer/checkpoint.h"
#include "common/util.h"
void checkpoint_save(const Job *job, struct comm *c, struct worker *w, const struct train_state *s) {}
int checkpoint_resume(const Job *job, struct comm *c, struct worker *w, struct train_state *s) { return 0; }
void checkpoint_load_weights(const char *dir, struct worker *w) { die("init.checkpoint: not yet"); }
void checkpoint_dir(const Job *job, char *out, size_t len) {}
