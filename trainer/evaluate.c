#define _POSIX_C_SOURCE 200809L
#include "trainer/evaluate.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "data/chat.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "trainer/generate.h"
#include "trainer/output.h"

#define SCORES_TAG 30000

static void write_json_line(struct output *f, json_t *o) { output_json_line(f, o, 10); }

/* ---- validation: loss, perplexity, per-document scores -------------------------------------- */

static void validate(const Job *job, struct comm *c, struct worker *chunks, int n, int step,
                     struct eval_summary *summary) {
  int mbs = job->data->micro_batch_size, seq = job->data->seq_len;
  int last = c->stage == c->pp - 1;
  struct worker *w = &chunks[0];
  struct loader l;
  loader_open(&l, job->data->valid, (int)job->data->n_valid, seq, 0, w->plan.cfg.vocab_size,
              "data.valid", 0);
  struct score_chunk *windows;
  uint64_t n_windows = loader_score_chunks(&l, &windows);
  if (job->eval->valid_batches > 0 && n_windows > (uint64_t)job->eval->valid_batches * mbs)
    n_windows = (uint64_t)job->eval->valid_batches * mbs;
  uint64_t *doc_base = xcalloc((size_t)l.n_shards + 1, sizeof *doc_base);
  for (int i = 0; i < l.n_shards; i++) doc_base[i + 1] = doc_base[i] + l.shards[i].n_docs;
  uint64_t n_docs = doc_base[l.n_shards];
  double *sums = xcalloc(2 * n_docs, sizeof(double));   /* [nll sum, tokens] per document */

  for (int k = 0; k < n; k++) worker_reshape(&chunks[k], mbs, seq, 1);
  size_t tokens = (size_t)mbs * seq;
  int32_t *tok = xmalloc(tokens * sizeof(int32_t)), *tgt = xmalloc(tokens * sizeof(int32_t));
  int32_t *pos = xmalloc(tokens * sizeof(int32_t));
  float *nll = xmalloc(tokens * sizeof(float));
  double start = now_seconds(), shown = start;
  for (uint64_t first = 0; first < n_windows; first += (uint64_t)mbs) {
    for (int i = 0; i < mbs; i++) {
      if (first + i < n_windows) {
        loader_score_sample(&l, &windows[first + i], tok + (size_t)i * seq, tgt + (size_t)i * seq,
                            pos + (size_t)i * seq);
      } else {   /* the last batch is short: padding rows score nothing */
        for (int t = 0; t < seq; t++) {
          tok[(size_t)i * seq + t] = 0;
          tgt[(size_t)i * seq + t] = -1;
          pos[(size_t)i * seq + t] = t;
        }
      }
    }
    struct micro_batch mb = {tok, tgt, pos, 0};
    for (int k = 0; k < n; k++) {
      size_t bytes = worker_boundary_bytes(&chunks[k]);
      pipeline_recv_input(c, &chunks[k], k, bytes, 0);
      worker_forward(&chunks[k], 0, &mb, 0.0f, last && k == n - 1 ? nll : NULL);
      pipeline_send_output(c, &chunks[k], k, n, bytes, 0);
    }
    double now = now_seconds();
    uint64_t done = first + (uint64_t)mbs < n_windows ? first + (uint64_t)mbs : n_windows;
    /* from the last stage, where a window is done (the first runs ahead, as far as its sends
     * are buffered) */
    if (last && now - shown >= progress_seconds() && done < n_windows) {
      char eta[32];
      format_duration(eta, sizeof eta, (now - start) / (double)done * (double)(n_windows - done));
      info("validation at step %d: %llu of %llu windows, %.0f tok/s, eta %s", step,
           (unsigned long long)done, (unsigned long long)n_windows,
           (double)done * seq / (now - start), eta);
      shown = now;
    }
    if (!last) continue;
    for (int i = 0; i < mbs && first + i < n_windows; i++) {
      const struct score_chunk *ch = &windows[first + i];
      double *d = sums + 2 * (doc_base[ch->shard] + ch->doc);
      for (int t = 0; t < seq; t++)
        if (tgt[(size_t)i * seq + t] >= 0) {
          d[0] += nll[(size_t)i * seq + t];
          d[1] += 1;
        }
    }
  }
  comm_wait_sends(c);
  if (c->pp > 1 && last) comm_send(c, sums, 2 * n_docs * sizeof(double), 0, SCORES_TAG);
  if (c->pp > 1 && c->stage == 0) comm_recv(c, sums, 2 * n_docs * sizeof(double), c->pp - 1, SCORES_TAG);
  comm_wait_sends(c);

  if (c->rank == 0) {
    struct output out, *f = &out;
    output_open(f, job->output_dir, "scores.jsonl", "w");
    double total = 0, count = 0;
    for (int i = 0; i < l.n_shards; i++)
      for (uint64_t d = 0; d < l.shards[i].n_docs; d++) {
        const double *s = sums + 2 * (doc_base[i] + d);
        total += s[0];
        count += s[1];
        write_json_line(f, json_pack("{s:i, s:s, s:I, s:I, s:f, s:f}", "step", step, "shard",
                                     l.shards[i].path, "doc", (json_int_t)d, "tokens",
                                     (json_int_t)s[1], "nll_sum", s[0],
                                     "nll_mean", s[1] > 0 ? s[0] / s[1] : 0.0));
      }
    output_close(f);
    /* the windows' every position went through the model, scored or not */
    double seconds = now_seconds() - start;
    summary->has_valid = 1;
    summary->valid_tokens = count;
    summary->valid_loss = count > 0 ? total / count : NAN;
    summary->valid_ppl = exp(summary->valid_loss);
    summary->valid_tokens_per_s = seconds > 0 ? (double)n_windows * seq / seconds : 0;
    info("validation at step %d: loss %.4f, perplexity %.3f over %.0f tokens of %llu documents "
         "in %.1f s, %.0f tok/s (scores in %s/scores.jsonl)", step, summary->valid_loss,
         summary->valid_ppl, count, (unsigned long long)n_docs, seconds,
         summary->valid_tokens_per_s, job->output_dir);
  }
  free(tok);
  free(tgt);
  free(pos);
  free(nll);
  free(sums);
  free(doc_base);
  free(windows);
  loader_close(&l);
}

/* ---- generation for eval.prompts ------------------------------------------------------------- */

int eval_prompt_ids(const Qwen3__Prompt *q, const struct tokenizer *tok, int32_t **ids,
                    size_t *n, char *err, size_t errlen) {
  if (q->n_ids) {
    *n = q->n_ids;
    *ids = xmalloc(q->n_ids * sizeof(int32_t));
    memcpy(*ids, q->ids, q->n_ids * sizeof(int32_t));
    return 0;
  }
  struct chat_message msgs[2];
  size_t m = 0;
  if (q->system) msgs[m++] = (struct chat_message){"system", q->system, strlen(q->system)};
  msgs[m++] = (struct chat_message){"user", q->user, strlen(q->user)};
  uint8_t *mask;
  if (chat_encode(tok, msgs, m, 1, ids, &mask, n, err, errlen) != 0) return -1;
  free(mask);
  return 0;
}

int eval_longest_prompt(const Job *job) {
  const Qwen3__Eval *e = job->eval;
  char err[1024];
  struct tokenizer *tok = NULL;
  if (job->tokenizer && !(tok = tokenizer_load(job->tokenizer, err, sizeof err)))
    die("tokenizer: %s", err);
  size_t longest = 0;
  for (size_t p = 0; p < e->n_prompts; p++) {
    int32_t *ids;
    size_t n;
    if (eval_prompt_ids(e->prompts[p], tok, &ids, &n, err, sizeof err) != 0)
      die("eval.prompts[%zu]: %s", p, err);
    free(ids);
    if (n > longest) longest = n;
  }
  tokenizer_free(tok);
  return (int)longest;
}

/* Rank 0 turns every prompt into ids (the chat template, or the ids given) and finds the stop
 * tokens; both go to every stage of the pipeline. */
static int prepare_prompts(const Job *job, struct comm *c, struct tokenizer **tok,
                           int32_t ***prompts, int **lens, int **stop, int *n_stop) {
  const Qwen3__Eval *e = job->eval;
  int n = (int)e->n_prompts;
  *prompts = xcalloc((size_t)n, sizeof **prompts);
  *lens = xcalloc((size_t)n, sizeof **lens);
  int32_t header[64];   /* [n_stop, stop ids..., prompt lengths follow separately] */
  *n_stop = 0;
  if (c->rank == 0) {
    char err[1024];
    if (job->tokenizer && !(*tok = tokenizer_load(job->tokenizer, err, sizeof err)))
      die("tokenizer: %s", err);
    const char *stops[] = {"<|im_end|>", "<|endoftext|>"};
    for (int i = 0; *tok && i < 2; i++) {
      int32_t id = tokenizer_token_id(*tok, stops[i]);
      if (id >= 0) header[1 + (*n_stop)++] = id;
    }
    for (size_t i = 0; i < e->n_stop_ids && *n_stop < 63; i++) header[1 + (*n_stop)++] = e->stop_ids[i];
    header[0] = *n_stop;
    for (int p = 0; p < n; p++) {
      size_t n_ids;
      if (eval_prompt_ids(e->prompts[p], *tok, &(*prompts)[p], &n_ids, err, sizeof err) != 0)
        die("eval.prompts[%d]: %s", p, err);
      (*lens)[p] = (int)n_ids;
    }
  }
  if (c->pp > 1) {
    comm_broadcast(c, GROUP_PIPE, header, sizeof header, 0);
    comm_broadcast(c, GROUP_PIPE, *lens, (size_t)n * sizeof(int), 0);
    for (int p = 0; p < n; p++) {
      if (c->rank != 0) (*prompts)[p] = xmalloc((size_t)(*lens)[p] * sizeof(int32_t));
      comm_broadcast(c, GROUP_PIPE, (*prompts)[p], (size_t)(*lens)[p] * sizeof(int32_t), 0);
    }
  }
  *n_stop = header[0];
  *stop = xmalloc(64 * sizeof(int));
  for (int i = 0; i < *n_stop; i++) (*stop)[i] = header[1 + i];
  return n;
}

static json_t *ids_json(const int32_t *ids, int n) {
  json_t *a = json_array();
  for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
  return a;
}

static void run_prompts(const Job *job, struct comm *c, struct worker *chunks, int n_chunks,
                        int step) {
  const Qwen3__Eval *e = job->eval;
  const struct worker *w = &chunks[0];
  int nvfp4 = 0;
  for (int k = 0; k < n_chunks; k++) nvfp4 |= chunks[k].plan.wq_bytes > 0;
  struct tokenizer *tok = NULL;
  int32_t **prompts;
  int *lens, *stop, n_stop;
  int n = prepare_prompts(job, c, &tok, &prompts, &lens, &stop, &n_stop);
  int limit = w->plan.cfg.max_seq_len;
  for (int p = 0; p < n; p++)
    if ((long long)lens[p] + e->max_new_tokens > limit)
      die("eval.prompts[%d]: %d prompt tokens + eval.max_new_tokens %d is longer than "
          "model.max_seq_len %d", p, lens[p], e->max_new_tokens, limit);
  struct gen_config g = {
    .max_new_tokens = e->max_new_tokens,
    .sampler = {(float)e->temperature, e->top_k, (float)e->top_p, e->seed},
    .stop = stop, .n_stop = n_stop, .use_kv = e->kv_cache, .check_kv = e->check_kv,
  };
  struct gen_result *res = xcalloc((size_t)n, sizeof *res);
  generate(chunks, n_chunks, c, &g, n, prompts, lens, res);

  /* the KV check lives on the last stage; rank 0 reports it: per prompt the first step whose
   * tokens differ, then the largest logit difference of every step */
  float **check = xcalloc((size_t)n, sizeof(float *));
  for (int p = 0; e->check_kv && p < n; p++) {
    size_t bytes = (size_t)(res[p].n + 1) * sizeof(float);
    check[p] = xmalloc(bytes);
    if (c->stage == c->pp - 1) {
      check[p][0] = (float)res[p].first_mismatch;
      memcpy(check[p] + 1, res[p].step_diff, bytes - sizeof(float));
      if (c->pp > 1) comm_send(c, check[p], bytes, 0, SCORES_TAG);
    } else if (c->stage == 0) {
      comm_recv(c, check[p], bytes, c->pp - 1, SCORES_TAG);
    }
  }
  comm_wait_sends(c);

  if (c->rank == 0) {
    struct output out, *f = &out;
    output_open(f, job->output_dir, "eval.jsonl", "a");
    int failed = 0;
    for (int p = 0; p < n; p++) {
      const Qwen3__Prompt *q = e->prompts[p];
      const struct gen_result *r = &res[p];
      size_t len = 0;
      char *text = tok ? tokenizer_decode(tok, r->ids, (size_t)(r->n - (r->stopped ? 1 : 0)), &len) : NULL;
      double prefill = r->prefill_s > 0 ? lens[p] / r->prefill_s : 0;
      double decode = r->n > 1 && r->decode_s > 0 ? (r->n - 1) / r->decode_s : 0;
      json_t *o = json_pack("{s:i, s:o, s:o, s:b, s:f, s:f, s:b}", "step", step, "prompt_ids",
                            ids_json(prompts[p], lens[p]), "completion_ids",
                            ids_json(r->ids, r->n), "stopped", r->stopped,
                            "prefill_tokens_per_s", prefill, "decode_tokens_per_s", decode,
                            "kv_cache", e->kv_cache);
      if (q->user) json_object_set_new(o, "user", json_string(q->user));
      if (q->system) json_object_set_new(o, "system", json_string(q->system));
      if (text) json_object_set_new(o, "completion", json_stringn(text, len));
      float max_diff = 0;
      if (e->check_kv) {
        json_t *steps = json_array();
        for (int i = 0; i < r->n; i++) {
          max_diff = fmaxf(max_diff, check[p][1 + i]);
          json_array_append_new(steps, json_real(check[p][1 + i]));
        }
        json_object_set_new(o, "kv_logit_diff_per_step", steps);
        json_object_set_new(o, "kv_max_logit_diff", json_real(max_diff));
        json_object_set_new(o, "kv_first_mismatch", json_integer((json_int_t)check[p][0]));
        failed |= max_diff > e->kv_tolerance || check[p][0] >= 0;
      }
      write_json_line(f, o);
      printf("\n[prompt %d] %s\n", p, q->user ? q->user : "(token ids)");
      if (text) printf("[answer] %.*s\n", (int)len, text);
      else {
        printf("[answer ids]");
        for (int i = 0; i < r->n; i++) printf(" %d", r->ids[i]);
        printf("\n");
      }
      printf("         %d tokens%s, prefill %.0f tok/s, decode %.1f tok/s%s", r->n,
             r->stopped ? " (stop token)" : "", prefill, decode, e->kv_cache ? "" : " (no KV cache)");
      if (e->check_kv)
        printf(", KV vs replay: max logit difference %.2e, %s", max_diff,
               check[p][0] >= 0 ? "tokens DIFFER" : "same tokens");
      printf("\n");
      free(text);
    }
    output_close(f);
    fflush(stdout);
    if (failed)
      die("eval.check_kv: the KV-cache path and the full replay disagree (tolerance "
          "eval.kv_tolerance = %g); see %s/eval.jsonl%s%s", e->kv_tolerance, job->output_dir,
          nvfp4 ? ". This model has NVFP4 layers: one tensor scale spans the "
                              "activations of a whole forward, so a cached decode and a replay "
                              "round differently; for such a model raise eval.kv_tolerance" : "",
          w->plan.act == DT_BF16 ? ". Activations are bf16 here (the GPU's default mode): a "
                                   "cached decode and a replay multiply matrices of other shapes "
                                   "and round differently; check with QWEN3_CUDA_PRECISION=fp32, "
                                   "or raise eval.kv_tolerance" : "");
  }
  for (int p = 0; p < n; p++) {
    free(prompts[p]);
    free(res[p].ids);
    free(res[p].step_diff);
    free(check[p]);
  }
  free(prompts);
  free(lens);
  free(stop);
  free(res);
  free(check);
  if (tok) tokenizer_free(tok);
}

void evaluate(const Job *job, struct comm *c, struct worker *chunks, int n, int step,
              struct eval_summary *summary) {
  memset(summary, 0, sizeof *summary);
  if (c->replica != 0) return;
  /* NVFP4 layers see the weights as they are now */
  for (int k = 0; k < n; k++) worker_prepare_step(&chunks[k], step);
  if (job->data->n_valid) validate(job, c, chunks, n, step, summary);
  if (job->eval->n_prompts && job->eval->max_new_tokens > 0) run_prompts(job, c, chunks, n, step);
}
