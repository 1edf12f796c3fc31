#include "trainer/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "trainer/schedule.h"

/* Tags of the pipeline's messages: a prompt's activations use tag p, a decoding step's
 * STEP_TAG, the sampled tokens TOKEN_TAG (messages between two ranks arrive in order). */
#define STEP_TAG 16383
#define TOKEN_TAG 16384

struct sequence {
  int32_t *ids;          /* prompt then completion */
  int len, prompt_len;
  int done;
  double first_token;    /* when its first new token was appended */
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

/* One forward through this stage's chunks, moving activations between stages: n tokens of
 * sequence seq (INFER_EACH: one token of each cached sequence) with the caches kv, one per
 * chunk, or without (NULL: the n tokens are the whole sequence). On the last stage the logits
 * land in `logits`, or, with ids, only the greedy tokens the backend picked from them
 * (worker_infer). */
static void stage_forward(struct worker *chunks, int n_chunks, struct comm *c,
                          const int32_t *tokens, const int32_t *positions, int n,
                          struct kv_cache *kv, int seq, int tag, float *logits, int32_t *ids) {
  size_t bytes = (size_t)n * chunks[0].plan.cfg.hidden_size * dtype_bytes(chunks[0].plan.act);
  for (int k = 0; k < n_chunks; k++) {
    pipeline_recv_input(c, &chunks[k], k, bytes, tag);
    worker_infer(&chunks[k], tokens, positions, n, kv ? &kv[k] : NULL, seq, logits, ids);
    pipeline_send_output(c, &chunks[k], k, n_chunks, bytes, tag);
  }
}

/* Host memory the backend copies into fastest (pinned on a GPU). */
static void *host_buffer(const struct backend *be, size_t bytes, const char *what) {
  void *p = be->host_alloc(bytes);
  if (!p) die("generation: out of host memory for %s (%zu bytes)", what, bytes);
  return p;
}

/* Appends a token; returns whether the sequence is now finished. */
static int append(struct sequence *s, struct gen_result *r, const struct gen_config *g,
                  int32_t tok) {
  s->ids[s->len] = tok;
  s->len++;
  r->ids[r->n++] = tok;
  double now = now_seconds();
  if (r->n == 1) s->first_token = now;
  r->decode_s = now - s->first_token;
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
  /* room for the longest sequence, and for a decoding step's token of every sequence */
  for (int k = 0; k < n_chunks; k++)
    worker_reshape(&chunks[k], 1, max_len > n_prompts ? max_len : n_prompts, 1);

  int32_t *positions = xmalloc((size_t)max_len * sizeof(int32_t));   /* of every sequence */
  for (int t = 0; t < max_len; t++) positions[t] = t;
  struct sequence *seq = xcalloc((size_t)n_prompts, sizeof *seq);
  for (int p = 0; p < n_prompts; p++) {
    struct sequence *s = &seq[p];
    s->ids = xmalloc((size_t)max_len * sizeof(int32_t));
    memcpy(s->ids, prompts[p], (size_t)prompt_len[p] * sizeof(int32_t));
    s->len = s->prompt_len = prompt_len[p];
    out[p].ids = xmalloc((size_t)g->max_new_tokens * sizeof(int32_t));
    if (g->check_kv && last) out[p].step_diff = xcalloc((size_t)g->max_new_tokens, sizeof(float));
    out[p].first_mismatch = -1;
  }
  /* one cache per chunk for all the sequences, which then decode together */
  struct kv_cache *kv = NULL;
  if (g->use_kv) {
    kv = xcalloc((size_t)n_chunks, sizeof *kv);
    for (int k = 0; k < n_chunks; k++) kv_cache_init(&kv[k], &chunks[k], max_len, n_prompts);
  }
  /* Greedy decoding picks its tokens where the logits are (ops.h argmax_rows) and a round
   * copies back an id a sequence. Sampling, and the KV check, which compares the logits, copy
   * them all back instead: 19 MB a step at 32 sequences of Qwen3's vocabulary. */
  int device_pick = last && sampler_greedy(&g->sampler) && !g->check_kv;
  float *logits = last && !device_pick
                      ? host_buffer(w->be, (size_t)n_prompts * vocab * sizeof(float), "the logits")
                      : NULL;
  int32_t *picked = device_pick
                        ? host_buffer(w->be, (size_t)n_prompts * sizeof(int32_t), "the tokens")
                        : NULL;
  float *replay = last && g->check_kv ? xmalloc((size_t)vocab * sizeof(float)) : NULL;
  void *scratch = logits ? xmalloc(sampler_scratch_bytes(vocab)) : NULL;
  int32_t *tok = xmalloc((size_t)n_prompts * sizeof(int32_t));
  int32_t *pos = xmalloc((size_t)n_prompts * sizeof(int32_t));

  /* Every stage walks the rounds alike. Round 0 runs each prompt (the prefill); later rounds
   * one decoding step of every sequence at once, the finished ones included (their tokens are
   * dropped; their rows of the cache run on past them, never beyond max_len), or without a
   * cache each unfinished sequence in full. The last stage samples the round's tokens (or
   * takes the backend's greedy picks) and sends them to the other stages in one message. */
  long long prompt_tokens = 0;
  for (int p = 0; p < n_prompts; p++) prompt_tokens += prompt_len[p];
  double round0 = now_seconds(), shown = round0;
  for (int round = 0;; round++) {
    int busy = 0;
    for (int p = 0; p < n_prompts; p++) busy |= !seq[p].done;
    if (!busy) break;
    if (round == 0 || !g->use_kv) {
      for (int p = 0; p < n_prompts; p++) {
        struct sequence *s = &seq[p];
        if (s->done) continue;
        stage_forward(chunks, n_chunks, c, s->ids, positions, s->len, kv, g->use_kv ? p : 0,
                      p, logits ? logits + (size_t)p * vocab : NULL, picked ? picked + p : NULL);
      }
    } else {
      for (int p = 0; p < n_prompts; p++) {
        pos[p] = kv[0].len[p];
        tok[p] = seq[p].ids[seq[p].len - 1];
      }
      stage_forward(chunks, n_chunks, c, tok, pos, n_prompts, kv, INFER_EACH, STEP_TAG, logits,
                    picked);
    }
    for (int p = 0; p < n_prompts; p++) {
      struct sequence *s = &seq[p];
      if (s->done) continue;
      const float *row = logits ? logits + (size_t)p * vocab : NULL;
      if (g->check_kv) stage_forward(chunks, n_chunks, c, s->ids, positions, s->len, NULL, 0,
                                     p, replay, NULL);
      if (!last) continue;
      tok[p] = picked ? picked[p]
                      : sampler_next(&g->sampler, row, vocab, (uint32_t)p, (uint32_t)round,
                                     scratch);
      if (g->check_kv) {
        float *diff = &out[p].step_diff[out[p].n];
        for (int v = 0; v < vocab; v++) *diff = fmaxf(*diff, fabsf(row[v] - replay[v]));
        int32_t other =
            sampler_next(&g->sampler, replay, vocab, (uint32_t)p, (uint32_t)round, scratch);
        if (other != tok[p] && out[p].first_mismatch < 0) out[p].first_mismatch = round;
      }
    }
    size_t tok_bytes = (size_t)n_prompts * sizeof(int32_t);
    if (last)
      for (int to = 0; to < c->pp - 1; to++) comm_send(c, tok, tok_bytes, to, TOKEN_TAG);
    else
      comm_recv(c, tok, tok_bytes, c->pp - 1, TOKEN_TAG);
    for (int p = 0; p < n_prompts; p++) {
      /* the prefill round, until its tokens came back, shared by the prompts' lengths */
      if (round == 0)
        out[p].prefill_s = (now_seconds() - round0) * prompt_len[p] / (double)prompt_tokens;
      if (!seq[p].done) append(&seq[p], &out[p], g, tok[p]);
    }
    double now = now_seconds();
    if (c->rank == 0 && now - shown >= progress_seconds()) {   /* a long generation */
      int finished = 0;
      long long made = 0;
      for (int p = 0; p < n_prompts; p++) {
        finished += seq[p].done;
        made += out[p].n;
      }
      char eta[32];
      format_duration(eta, sizeof eta, (now - round0) / (round + 1) * (g->max_new_tokens - round - 1));
      info("generation: %lld tokens of %d sequences (%d finished), %.0f tok/s, at most %s left",
           made, n_prompts, finished, (double)made / (now - round0), eta);
      shown = now;
    }
  }
  comm_wait_sends(c);

  if (g->use_kv) {
    for (int k = 0; k < n_chunks; k++) kv_cache_free(&kv[k], &chunks[k]);
    free(kv);
  }
  for (int p = 0; p < n_prompts; p++) free(seq[p].ids);
  free(seq);
  free(positions);
  w->be->host_free(logits);
  w->be->host_free(picked);
  free(replay);
  free(scratch);
  free(tok);
  free(pos);
}
