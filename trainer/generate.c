#include "trainer/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "trainer/schedule.h"

/* Tags of the pipeline's messages: activations of prompt p use tag p, its tokens TOKEN_TAG + p. */
#define TOKEN_TAG 16384

struct sequence {
  int32_t *ids;          /* prompt then completion */
  int32_t *positions;
  int len, prompt_len;
  int done;
  struct kv_cache *kv;   /* one per chunk */
  double started;
};

void pipeline_recv_input(struct comm *c, struct worker *chunk, int k, size_t bytes, int tag) {
  int peer_chunk, from = chunk_source(c->pp, c->stage, k, &peer_chunk);
  if (from >= 0) comm_recv_tensor(c, worker_input(chunk, 0), bytes, from, tag);
}

void pipeline_send_output(struct comm *c, struct worker *chunk, int k, int n, size_t bytes,
                          int tag) {
  int peer_chunk, to = chunk_dest(c->pp, n, c->stage, k, &peer_chunk);
  if (to >= 0) comm_send_tensor(c, worker_output(chunk, 0), bytes, to, tag);
}

/* One forward of a sequence's new tokens through this stage's chunks, moving activations
 * between stages; on the last stage the logits of the last token land in `logits`. kv: the
 * sequence's caches, one per chunk, or NULL (a full replay). */
static void stage_forward(struct worker *chunks, int n_chunks, struct comm *c,
                          struct sequence *s, int p, int from, struct kv_cache *kv,
                          float *logits) {
  int n = s->len - from;
  size_t bytes = (size_t)n * chunks[0].plan.cfg.hidden_size * dtype_bytes(chunks[0].plan.act);
  for (int k = 0; k < n_chunks; k++) {
    pipeline_recv_input(c, &chunks[k], k, bytes, p);
    worker_infer(&chunks[k], s->ids + from, s->positions + from, n, kv ? &kv[k] : NULL, logits);
    pipeline_send_output(c, &chunks[k], k, n_chunks, bytes, p);
  }
}

/* Appends a token; returns whether the sequence is now finished. */
static int append(struct sequence *s, struct gen_result *r, const struct gen_config *g,
                  int32_t tok) {
  s->ids[s->len] = tok;
  s->positions[s->len] = s->len;
  s->len++;
  r->ids[r->n++] = tok;
  if (r->n == 1) r->prefill_s = now_seconds() - s->started;
  r->decode_s = now_seconds() - s->started - r->prefill_s;
  r->stopped = sampler_is_stop(tok, g->stop, g->n_stop);
  s->done = r->stopped || r->n >= g->max_new_tokens;
  return s->done;
}

void generate(struct worker *chunks, int n_chunks, struct comm *c, const struct gen_config *g,
              int n_prompts, int32_t *const *prompts, const int *prompt_len,
              struct gen_result *out) {
  struct worker *w = &chunks[0];
  int last = c->stage == c->pp - 1, vocab = w->plan.cfg.vocab_size;
  /* in 64 bits: the sum must not wrap (job_validate bounds both by model.max_seq_len) */
  long long longest = 0;
  for (int p = 0; p < n_prompts; p++)
    if ((long long)prompt_len[p] + g->max_new_tokens > longest)
      longest = (long long)prompt_len[p] + g->max_new_tokens;
  if (g->max_new_tokens < 0 || longest > w->plan.cfg.max_seq_len)
    die("generation: %lld prompt + new tokens are more than model.max_seq_len %d", longest,
        w->plan.cfg.max_seq_len);
  int max_len = (int)longest;
  memset(out, 0, (size_t)n_prompts * sizeof *out);
  if (g->max_new_tokens <= 0 || n_prompts == 0) return;
  for (int k = 0; k < n_chunks; k++) worker_reshape(&chunks[k], 1, max_len, 1);

  struct sequence *seq = xcalloc((size_t)n_prompts, sizeof *seq);
  for (int p = 0; p < n_prompts; p++) {
    struct sequence *s = &seq[p];
    s->ids = xmalloc((size_t)max_len * sizeof(int32_t));
    s->positions = xmalloc((size_t)max_len * sizeof(int32_t));
    memcpy(s->ids, prompts[p], (size_t)prompt_len[p] * sizeof(int32_t));
    for (int t = 0; t < max_len; t++) s->positions[t] = t;
    s->len = s->prompt_len = prompt_len[p];
    if (g->use_kv) {
      s->kv = xcalloc((size_t)n_chunks, sizeof *s->kv);
      for (int k = 0; k < n_chunks; k++) kv_cache_init(&s->kv[k], &chunks[k], max_len);
    }
    out[p].ids = xmalloc((size_t)g->max_new_tokens * sizeof(int32_t));
    if (g->check_kv && last) out[p].step_diff = xcalloc((size_t)g->max_new_tokens, sizeof(float));
    out[p].first_mismatch = -1;
  }
  float *logits = last ? xmalloc((size_t)vocab * sizeof(float)) : NULL;
  float *replay = last && g->check_kv ? xmalloc((size_t)vocab * sizeof(float)) : NULL;
  void *scratch = last ? xmalloc(sampler_scratch_bytes(vocab)) : NULL;

  /* Every stage walks (round, prompt) in the same order, so the pipeline fills with the
   * prompts: while the last stage samples prompt p, stage 0 already runs prompt p + 1. A stage
   * other than the last learns a token (and whether its sequence ended) just before it needs
   * it, at the start of the next round. */
  for (int round = 0;; round++) {
    int busy = 0;
    for (int p = 0; p < n_prompts; p++) {
      struct sequence *s = &seq[p];
      if (s->done) continue;
      if (round == 0) s->started = now_seconds();
      if (round > 0 && !last) {
        int32_t tok;
        comm_recv(c, &tok, sizeof tok, c->pp - 1, TOKEN_TAG + p);
        if (append(s, &out[p], g, tok)) continue;
      }
      int from = g->use_kv && round > 0 ? s->len - 1 : 0;
      stage_forward(chunks, n_chunks, c, s, p, from, g->use_kv ? s->kv : NULL, logits);
      if (g->check_kv) stage_forward(chunks, n_chunks, c, s, p, 0, NULL, replay);
      busy = 1;
      if (!last) continue;
      int32_t tok = sampler_next(&g->sampler, logits, vocab, (uint32_t)p, (uint32_t)round, scratch);
      if (g->check_kv) {
        float *diff = &out[p].step_diff[out[p].n];
        for (int v = 0; v < vocab; v++) *diff = fmaxf(*diff, fabsf(logits[v] - replay[v]));
        int32_t other = sampler_next(&g->sampler, replay, vocab, (uint32_t)p, (uint32_t)round, scratch);
        if (other != tok && out[p].first_mismatch < 0) out[p].first_mismatch = round;
      }
      for (int to = 0; to < c->pp - 1; to++) comm_send(c, &tok, sizeof tok, to, TOKEN_TAG + p);
      append(s, &out[p], g, tok);
    }
    if (!busy) break;
  }
  comm_wait_sends(c);

  for (int p = 0; p < n_prompts; p++) {
    if (g->use_kv) {
      for (int k = 0; k < n_chunks; k++) kv_cache_free(&seq[p].kv[k], &chunks[k]);
      free(seq[p].kv);
    }
    free(seq[p].ids);
    free(seq[p].positions);
  }
  free(seq);
  free(logits);
  free(replay);
  free(scratch);
}
