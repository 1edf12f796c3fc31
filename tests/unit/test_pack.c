/* Packed samples (data.pack): the loader puts several documents into one sequence, positions
 * restarting at 0 with each and no target crossing one, and the engine masks attention between
 * them, so that every document gets the loss it gets alone.
 *
 * The loader: small chat shards (documents shorter than a sequence, one truncated, one without
 * any loss-masked token, one of a single token) and a plain shard (one document three sequences
 * long): each packed document equals its unpacked sample (tokens, targets, positions), each
 * document with a target is in exactly one packed sample, nothing else is, no target is lost,
 * and the packing is the same when done again. The engine (CPU backend, a small random Qwen3):
 * every packed micro-batch against each of its documents alone, per position NLL and per
 * document summed NLL within 1e-5 relative (they differ only in summation order), and the
 * parameter gradients of all packed micro-batches against those of all documents alone. */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/loader.h"
#include "data/shard.h"
#include "tests/check.h"
#include "worker/worker.h"

#define SEQ 24
#define VOCAB 61
#define BATCH 2   /* sequences per micro-batch: doc_start is indexed across them */
#define TOL 1e-5

static char dir[] = "/tmp/test_pack_XXXXXX";
static uint64_t rng = 99;

/* A shard of documents of the given lengths, random tokens; with a loss mask, the first third
 * of each document (its "prompt") is 0, except in document `unmasked`, which is 0 throughout. */
static void write_shard(const char *name, const int *lens, int n, int masked, int unmasked,
                        char *path, size_t pathlen) {
  snprintf(path, pathlen, "%s/%s.h5", dir, name);
  struct shard_writer *w = shard_writer_new(masked);
  for (int d = 0; d < n; d++) {
    uint32_t ids[128];
    uint8_t mask[128];
    for (int t = 0; t < lens[d]; t++) {
      ids[t] = 1 + (uint32_t)(splitmix64(&rng) % (VOCAB - 1));
      mask[t] = d != unmasked && t >= lens[d] / 3;
    }
    shard_writer_add(w, ids, masked ? mask : NULL, (size_t)lens[d]);
  }
  char err[512];
  if (shard_writer_finish(w, path, VOCAB, "ids", err, sizeof err) != 0) die("%s", err);
}

/* Piece c as a score chunk: its document, and where in it c starts. */
static struct score_chunk locate(const struct loader *l, const struct loader_piece *c) {
  const struct shard *s = &l->shards[c->shard];
  uint64_t d = 0;
  while (s->doc_offsets[d + 1] <= c->begin) d++;
  return (struct score_chunk){(int)c->shard, d, c->begin - s->doc_offsets[d]};
}

static int count_targets(const int32_t *targets, int n) {
  int k = 0;
  for (int i = 0; i < n; i++) k += targets[i] >= 0;
  return k;
}

/* ---- the loader ----------------------------------------------------------------------------- */

/* Chat shards: every packed document against its unpacked sample. */
static void check_chat_packing(char *const *paths, int n_paths) {
  struct loader plain, packed, again;
  loader_open(&plain, paths, n_paths, SEQ, 1, VOCAB, "chat", LOADER_TRAINING);
  loader_open(&packed, paths, n_paths, SEQ, 1, VOCAB, "chat", LOADER_TRAINING | LOADER_PACK);
  int32_t tok[SEQ], tgt[SEQ], pos[SEQ], ut[SEQ], ug[SEQ], up[SEQ];
  int *seen = xcalloc(plain.n_samples, sizeof(int));
  long plain_targets = 0, packed_targets = 0, pad = 0;
  int bad_doc = 0, bad_pad = 0, overfull = 0;
  for (uint64_t k = 0; k < packed.n_samples; k++) {
    loader_sample(&packed, k, tok, tgt, pos);
    packed_targets += count_targets(tgt, SEQ);
    int at = 0;
    for (uint64_t p = packed.pack_first[k]; p < packed.pack_first[k + 1]; p++) {
      const struct loader_piece *c = &packed.pieces[p];
      struct score_chunk where = locate(&packed, c);
      uint64_t doc = plain.first_sample[where.shard] + where.doc;
      seen[doc]++;
      loader_sample(&plain, doc, ut, ug, up);
      int n = (int)c->len - 1;
      overfull |= at + n > SEQ;
      if (at + n > SEQ) break;
      bad_doc |= where.start != 0;
      for (int j = 0; j < n; j++)
        bad_doc |= tok[at + j] != ut[j] || tgt[at + j] != ug[j] || pos[at + j] != j;
      /* the unpacked sample has no target past the packed slots: nothing is lost */
      bad_doc |= count_targets(ug + n, SEQ - n) != 0;
      at += n;
    }
    pad += SEQ - at;
    for (int t = at; t < SEQ; t++)
      bad_pad |= tok[t] != 0 || tgt[t] >= 0 || pos[t] != pos[t - 1] + 1;
  }
  int twice = 0, missing = 0, extra = 0;
  for (uint64_t d = 0; d < plain.n_samples; d++) {
    loader_sample(&plain, d, ut, ug, up);
    int targets = count_targets(ug, SEQ);
    plain_targets += targets;
    twice += seen[d] > 1;
    missing += targets > 0 && !seen[d];
    extra += targets == 0 && seen[d];
  }
  CHECK(!overfull, "chat: a packed sample holds more than %d slots", SEQ);
  CHECK(!bad_doc, "chat: a packed document differs from its unpacked sample");
  CHECK(!bad_pad, "chat: padding of a packed sample has a token, a target or a position restart");
  CHECK(!twice && !missing && !extra, "chat: documents packed twice %d, missing %d, packed "
        "without a target %d", twice, missing, extra);
  CHECK(plain_targets == packed_targets, "chat: %ld targets unpacked, %ld packed", plain_targets,
        packed_targets);
  CHECK(packed.truncated == 1, "chat: %llu truncated documents drawn, expected 1",
        (unsigned long long)packed.truncated);
  CHECK(packed.n_samples < plain.n_samples, "chat: %llu packed samples, %llu unpacked",
        (unsigned long long)packed.n_samples, (unsigned long long)plain.n_samples);
  double want = (double)pad / ((double)packed.n_samples * SEQ);
  CHECK(fabs(loader_padding(&packed) - want) < 1e-12, "chat: loader_padding %.6f, counted %.6f",
        loader_padding(&packed), want);
  CHECK(loader_padding(&plain) > loader_padding(&packed), "chat: padding %.3f unpacked, %.3f "
        "packed", loader_padding(&plain), loader_padding(&packed));
  printf("chat: %llu sequences of one document (padding %.1f%%), %llu packed (%.1f%%)\n",
         (unsigned long long)plain.n_samples, 100 * loader_padding(&plain),
         (unsigned long long)packed.n_samples, 100 * loader_padding(&packed));

  loader_open(&again, paths, n_paths, SEQ, 1, VOCAB, "chat", LOADER_TRAINING | LOADER_PACK);
  int n_pieces = (int)packed.pack_first[packed.n_samples];
  CHECK(again.n_samples == packed.n_samples &&
        !memcmp(again.pieces, packed.pieces, (size_t)n_pieces * sizeof *packed.pieces),
        "chat: packing again gives other samples");
  free(seen);
  loader_close(&again);
  loader_close(&packed);
  loader_close(&plain);
}

/* A plain shard: a long document in pieces that overlap by one token; every token after a
 * document's first is a target exactly once. */
static void check_plain_packing(const char *path, const int *lens, int n_docs) {
  struct loader packed;
  char *paths[] = {(char *)path};
  loader_open(&packed, paths, 1, SEQ, 1, VOCAB, "plain", LOADER_TRAINING | LOADER_PACK);
  const struct shard *s = &packed.shards[0];
  int32_t tok[SEQ], tgt[SEQ], pos[SEQ];
  long targets = 0, want = 0;
  int bad = 0;
  for (uint64_t k = 0; k < packed.n_samples; k++) {
    loader_sample(&packed, k, tok, tgt, pos);
    targets += count_targets(tgt, SEQ);
    int at = 0;
    for (uint64_t p = packed.pack_first[k]; p < packed.pack_first[k + 1]; p++) {
      const struct loader_piece *c = &packed.pieces[p];
      for (int j = 0; j + 1 < (int)c->len; j++, at++)
        bad |= tok[at] != (int32_t)s->tokens[c->begin + j] ||
               tgt[at] != (int32_t)s->tokens[c->begin + j + 1] || pos[at] != j;
    }
  }
  for (int d = 0; d < n_docs; d++) want += lens[d] - 1;
  CHECK(!bad, "plain: a packed piece differs from its tokens");
  CHECK(targets == want, "plain: %ld targets packed, the documents have %ld", targets, want);
  CHECK(packed.truncated == 0, "plain: a plain document counted as truncated");
  loader_close(&packed);
}

/* A shard whose documents give no target: refused for training, packed or not as it says. */
static void check_refusal(void) {
  char path[512], err[256];
  int lens[] = {1, 1};
  write_shard("empty", lens, 2, 0, -1, path, sizeof path);
  struct shard s;
  if (shard_load(&s, path, err, sizeof err) != 0) die("%s", err);
  CHECK(loader_shard_check(&s, SEQ, 1, err, sizeof err) != 0 && strstr(err, "data.pack"),
        "packed: a shard of 1-token documents is refused naming data.pack (%s)", err);
  CHECK(loader_shard_check(&s, SEQ, 0, err, sizeof err) != 0 && strstr(err, "no sample"),
        "unpacked: a shard of 2 tokens is refused (%s)", err);
  shard_free(&s);
}

/* ---- the engine ----------------------------------------------------------------------------- */

/* Forward and backward of one micro-batch of BATCH sequences; nll gets the per-position loss. */
static void step(struct worker *w, const int32_t *tok, const int32_t *tgt, const int32_t *pos,
                 float *nll) {
  struct micro_batch mb = {tok, tgt, pos, 0};
  worker_forward(w, 0, &mb, 1.0f, nll);
  worker_take_loss(w);
  worker_backward(w, 0, NULL);
}

static void grads_of(struct worker *w, float *out) {
  worker_gather_tied_grads(w);
  w->be->to_host(out, w->grads, w->plan.param_floats * sizeof(float));
}

/* Every packed sample of `packed` through the model, then every piece alone, in the order of the
 * pieces; per position and per document NLL, and the summed gradients. */
static void check_losses(const char *label, struct worker *w, struct loader *packed) {
  int32_t tok[BATCH * SEQ], tgt[BATCH * SEQ], pos[BATCH * SEQ];
  float nll[BATCH * SEQ];
  uint64_t n_pieces = packed->pack_first[packed->n_samples];
  double *doc_packed = xcalloc(n_pieces, sizeof(double));
  float *pos_packed = xcalloc(n_pieces * SEQ, sizeof(float));   /* [piece][j] */
  size_t floats = w->plan.param_floats;
  float *g_packed = xmalloc(floats * sizeof(float)), *g_alone = xmalloc(floats * sizeof(float));

  worker_zero_grads(w);
  for (uint64_t k = 0; k < packed->n_samples; k += BATCH) {
    for (int b = 0; b < BATCH; b++) {
      if (k + b < packed->n_samples) {
        loader_sample(packed, k + b, tok + b * SEQ, tgt + b * SEQ, pos + b * SEQ);
      } else {   /* an odd number of samples: an empty row trains nothing */
        for (int t = 0; t < SEQ; t++) tok[b * SEQ + t] = 0, tgt[b * SEQ + t] = -1,
                                      pos[b * SEQ + t] = t;
      }
    }
    step(w, tok, tgt, pos, nll);
    for (int b = 0; b < BATCH && k + b < packed->n_samples; b++) {
      int at = b * SEQ;
      for (uint64_t p = packed->pack_first[k + b]; p < packed->pack_first[k + b + 1]; p++)
        for (int j = 0; j + 1 < (int)packed->pieces[p].len; j++, at++) {
          pos_packed[p * SEQ + j] = nll[at];
          doc_packed[p] += nll[at];
        }
    }
  }
  grads_of(w, g_packed);

  double worst_pos = 0, worst_doc = 0;
  worker_zero_grads(w);
  for (uint64_t p0 = 0; p0 < n_pieces; p0 += BATCH) {
    for (int b = 0; b < BATCH; b++) {
      if (p0 + b < n_pieces) {
        struct score_chunk ch = locate(packed, &packed->pieces[p0 + b]);
        loader_score_sample(packed, &ch, tok + b * SEQ, tgt + b * SEQ, pos + b * SEQ);
      } else {
        for (int t = 0; t < SEQ; t++) tok[b * SEQ + t] = 0, tgt[b * SEQ + t] = -1,
                                      pos[b * SEQ + t] = t;
      }
    }
    step(w, tok, tgt, pos, nll);
    for (int b = 0; b < BATCH && p0 + b < n_pieces; b++) {
      uint64_t p = p0 + b;
      double alone = 0;
      for (int j = 0; j < SEQ; j++) {
        alone += nll[b * SEQ + j];
        if (j + 1 < (int)packed->pieces[p].len) {
          double ref = fabs(nll[b * SEQ + j]) > 1e-3 ? fabs(nll[b * SEQ + j]) : 1e-3;
          worst_pos = fmax(worst_pos, fabs(pos_packed[p * SEQ + j] - nll[b * SEQ + j]) / ref);
        }
      }
      worst_doc = fmax(worst_doc, fabs(doc_packed[p] - alone) / fmax(fabs(alone), 1e-3));
    }
  }
  grads_of(w, g_alone);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < floats; i++) {
    diff += ((double)g_packed[i] - g_alone[i]) * ((double)g_packed[i] - g_alone[i]);
    norm += (double)g_alone[i] * g_alone[i];
  }
  double grad_err = sqrt(diff) / sqrt(norm);
  printf("%s: %llu documents in %llu packed sequences: NLL per position %.2e, per document "
         "%.2e, gradients %.2e relative\n", label, (unsigned long long)n_pieces,
         (unsigned long long)packed->n_samples, worst_pos, worst_doc, grad_err);
  CHECK(worst_pos <= TOL, "%s: a packed position's NLL is %.3g off its document alone", label,
        worst_pos);
  CHECK(worst_doc <= TOL, "%s: a packed document's NLL is %.3g off its NLL alone", label,
        worst_doc);
  CHECK(grad_err <= TOL, "%s: packed gradients are %.3g off those of the documents alone", label,
        grad_err);
  free(doc_packed), free(pos_packed), free(g_packed), free(g_alone);
}

int main(void) {
  if (!mkdtemp(dir)) die("mkdtemp %s failed", dir);
  /* seq + 1 = 25 tokens fit a sample: 30 is truncated, 25 fills one, 1 and the unmasked 8 give
   * no target */
  static const int chat_a[] = {5, 12, 1, 30, 7, 17, 2, 9, 25, 24, 3, 11, 6, 8};
  static const int chat_b[] = {13, 4, 19, 8, 10};
  static const int text[] = {60, 5, 1, 26, 2, 14};
  char paths[3][512];
  write_shard("chat_a", chat_a, 14, 1, 13, paths[0], sizeof paths[0]);
  write_shard("chat_b", chat_b, 5, 1, -1, paths[1], sizeof paths[1]);
  write_shard("text", text, 6, 0, -1, paths[2], sizeof paths[2]);
  char *chat[] = {paths[0], paths[1]};
  check_chat_packing(chat, 2);
  check_plain_packing(paths[2], text, 6);
  check_refusal();

  struct qwen3_config cfg = {.hidden_size = 32, .num_layers = 2, .num_heads = 4,
                             .num_kv_heads = 2, .head_dim = 8, .intermediate_size = 48,
                             .vocab_size = VOCAB, .rope_theta = 10000, .rms_norm_eps = 1e-6,
                             .tie_embeddings = 1, .max_seq_len = SEQ};
  struct worker_plan plan;
  worker_plan_make(&plan, &cfg, 0, cfg.num_layers, 1, 1, BATCH, SEQ, 1, 0, DT_F32);
  struct worker w;
  worker_init(&w, &backend_cpu, &plan);
  worker_init_weights(&w, 7, 0.2f);   /* large enough that attention is far from uniform */
  worker_prepare_step(&w, 1);
  struct loader l;
  loader_open(&l, chat, 2, SEQ, 1, VOCAB, "chat", LOADER_TRAINING | LOADER_PACK);
  check_losses("chat", &w, &l);
  loader_close(&l);
  char *plain[] = {paths[2]};
  loader_open(&l, plain, 1, SEQ, 1, VOCAB, "plain", LOADER_TRAINING | LOADER_PACK);
  check_losses("plain", &w, &l);
  loader_close(&l);
  worker_free(&w);

  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) warn("could not remove %s", dir);
  return checks_report();
}
