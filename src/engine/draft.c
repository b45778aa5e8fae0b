/*
 * draft.c: a smaller model with the target's vocabulary drafts for it.
 *
 * The draft model lives inside the target's engine: its forward passes run
 * on the engine thread, on the same compute pool, between the planning of
 * a step and its forward pass (one schedule, no second queue). It has its
 * own paged KV pool; each sequence has a block table in it and the number
 * of its tokens the draft has seen.
 *
 * Proposing for the step's decoding sequences, all at once:
 *  1. Each sequence's draft cache is checked against its history: what the
 *     draft fed of its last proposal and the target did not accept is cut
 *     off (the block table shrinks; nothing is copied).
 *  2. One pass feeds every sequence what its cache lacks (usually the
 *     target's correction token, or the whole prompt for a new sequence,
 *     a bounded chunk per step), logits for the last token.
 *  3. Then one pass per draft position, one token per sequence still
 *     drafting: the draft's greedy token, kept while the draft's own
 *     probability for it stays above a floor (a guess the draft itself
 *     doubts is rarely accepted and costs a verify slot).
 * Drafts are greedy (a point-mass proposal): the target's verification
 * (tn_sampler_verify) keeps the output exactly the target's at any
 * temperature.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

/* Tokens of catch-up (prompts the draft has not seen) per call, over all
 * sequences: the draft's prefill is spread over steps instead of stalling
 * one step for a whole prompt. */
#define CATCHUP_TOKENS 256
/* Catch-ups this short go first. */
#define SMALL_CATCHUP 4

struct tn_drafter {
  /* self-drafting (tn_drafter_open_self): model, tok and kv are the
   * target's, borrowed; passes run the layers set on ctx */
  bool self;
  int32_t n_layers;
  struct tn_model *model;
  struct tn_tokenizer *tok;
  struct tn_ctx *ctx;
  struct tn_kv_pool *kv;
  int32_t n_vocab;     /* the draft model's rows of logits */
  int32_t max_seqs, max_k, n_ctx;
  float p_min;         /* drafts end below this draft probability */
  int32_t *eog;        /* the target's end-of-generation ids */
  int32_t n_eog;
  struct tn_batch batch;
  int32_t *slot;       /* per batch sequence: index into the request array */
  const struct tn_lora **lora; /* self: per batch sequence, its adapter */
  float *lora_scale;
  double t_pass;       /* decayed mean seconds of a one-token-per-seq pass */
};

static enum tn_status check_vocab(const struct tn_tokenizer *a,
                                  const struct tn_tokenizer *b,
                                  const char *path, struct tn_error *err) {
  int32_t na = tn_tokenizer_n_vocab(a), nb = tn_tokenizer_n_vocab(b);
  if (na != nb)
    return tn_error_set(err, TN_EINVAL,
                        "--draft-model %s: its vocabulary has %d tokens, the "
                        "target's %d; a draft model must share the target's "
                        "vocabulary",
                        path, nb, na);
  if (tn_tokenizer_bos(a) != tn_tokenizer_bos(b) ||
      tn_tokenizer_eos(a) != tn_tokenizer_eos(b))
    return tn_error_set(err, TN_EINVAL,
                        "--draft-model %s: its BOS/EOS tokens (%d/%d) differ "
                        "from the target's (%d/%d)",
                        path, tn_tokenizer_bos(b), tn_tokenizer_eos(b),
                        tn_tokenizer_bos(a), tn_tokenizer_eos(a));
  char pa[256], pb[256];
  for (int32_t id = 0; id < na; id++) {
    size_t la = tn_tokenizer_piece(a, id, pa, sizeof(pa), true);
    size_t lb = tn_tokenizer_piece(b, id, pb, sizeof(pb), true);
    if (la != lb || memcmp(pa, pb, TN_MIN(la, sizeof(pa))) != 0 ||
        tn_tokenizer_is_special(a, id) != tn_tokenizer_is_special(b, id))
      return tn_error_set(err, TN_EINVAL,
                          "--draft-model %s: token %d differs from the "
                          "target's; a draft model must share the target's "
                          "vocabulary",
                          path, id);
  }
  return TN_OK;
}

/* The time of a one-token pass (best of three on a scratch sequence), so
 * that the engine's first drafting decisions know what a pass costs. */
static void calibrate(struct tn_drafter *d) {
  struct tn_kv_seq ks;
  tn_kv_seq_init(&ks);
  struct tn_kv_seq *seqs[1] = {&ks};
  int32_t token = 0, pos = 0, seq = 0;
  bool logits = true;
  struct tn_batch b = {.n_tokens = 1, .token = &token, .pos = &pos,
                       .seq = &seq, .logits = &logits, .n_seqs = 1,
                       .seqs = seqs};
  double best = 0.0;
  if (tn_kv_seq_reserve(d->kv, &ks, 1) == TN_OK)
    for (int rep = 0; rep < 3; rep++) {
      struct tn_error err;
      double t0 = tn_time_s();
      if (tn_model_forward(d->ctx, d->kv, &b, &err) != TN_OK) break;
      double dt = tn_time_s() - t0;
      if (best == 0.0 || dt < best) best = dt;
    }
  tn_kv_seq_deinit(d->kv, &ks);
  d->t_pass = best;
}

static bool alloc_batch(struct tn_drafter *d, int32_t nt, int32_t max_seqs) {
  d->batch.token = calloc((size_t)nt, sizeof(int32_t));
  d->batch.pos = calloc((size_t)nt, sizeof(int32_t));
  d->batch.seq = calloc((size_t)nt, sizeof(int32_t));
  d->batch.logits = calloc((size_t)nt, sizeof(bool));
  d->batch.seqs = calloc((size_t)max_seqs, sizeof(*d->batch.seqs));
  d->slot = calloc((size_t)max_seqs, sizeof(int32_t));
  return d->batch.token && d->batch.pos && d->batch.seq && d->batch.logits &&
         d->batch.seqs && d->slot;
}

/* The target's end-of-generation ids, which a draft never proposes past. */
static bool take_eog(struct tn_drafter *d, const struct tn_tokenizer *tok) {
  int32_t nv = tn_tokenizer_n_vocab(tok);
  d->eog = malloc((size_t)nv * sizeof(int32_t));
  if (!d->eog) return false;
  for (int32_t i = 0; i < nv; i++)
    if (tn_tokenizer_is_eog(tok, i)) d->eog[d->n_eog++] = i;
  return true;
}

enum tn_status tn_drafter_open_self(struct tn_model *model,
                                    const struct tn_tokenizer *tok,
                                    struct tn_kv_pool *kv,
                                    struct tn_pool *pool, int n_threads,
                                    int32_t max_seqs, int32_t max_k,
                                    float p_min, int32_t n_ctx,
                                    const int32_t *layers, int32_t n_layers,
                                    struct tn_drafter **out,
                                    struct tn_error *err) {
  *out = NULL;
  struct tn_drafter *d = calloc(1, sizeof(*d));
  if (!d) return tn_error_set(err, TN_ENOMEM, "out of memory");
  d->self = true;
  d->model = model;
  d->tok = (struct tn_tokenizer *)tok;
  d->kv = kv;
  d->n_vocab = model->hp.n_vocab;
  d->max_seqs = max_seqs;
  d->max_k = max_k;
  d->p_min = p_min;
  d->n_ctx = n_ctx;
  d->n_layers = n_layers;
  enum tn_status st;
  if (!take_eog(d, tok) || !alloc_batch(d, max_seqs, max_seqs) ||
      !(d->lora = calloc((size_t)max_seqs, sizeof(*d->lora))) ||
      !(d->lora_scale = calloc((size_t)max_seqs, sizeof(float)))) {
    st = tn_error_set(err, TN_ENOMEM, "out of memory");
    goto fail;
  }
  if ((st = tn_ctx_new(model, pool, max_seqs, n_ctx + max_k, max_seqs,
                       &d->ctx, err)))
    goto fail;
  tn_ctx_set_threads(d->ctx, n_threads);
  if ((st = tn_ctx_set_layers(d->ctx, layers, n_layers, err))) goto fail;
  calibrate(d);
  *out = d;
  return TN_OK;
fail:
  tn_drafter_free(d);
  return st;
}

int32_t tn_drafter_n_layers(const struct tn_drafter *d) {
  return d->self ? d->n_layers : d->model->hp.n_layer;
}

enum tn_status tn_drafter_open(const char *path,
                               const struct tn_tokenizer *target_tok,
                               struct tn_pool *pool, int n_threads,
                               int32_t max_seqs, int32_t max_k, float p_min,
                               int32_t n_ctx, int32_t kv_tokens,
                               struct tn_drafter **out,
                               struct tn_error *err) {
  *out = NULL;
  struct tn_drafter *d = calloc(1, sizeof(*d));
  if (!d) return tn_error_set(err, TN_ENOMEM, "out of memory");
  enum tn_status st;
  if ((st = tn_model_load(path, &d->model, err))) {
    char msg[sizeof(err->msg)];
    snprintf(msg, sizeof(msg), "%s", err->msg);
    tn_error_set(err, st, "--draft-model %s: %s", path, msg);
    goto fail;
  }
  if ((st = tn_tokenizer_load(d->model->gguf, &d->tok, err))) goto fail;
  if ((st = check_vocab(target_tok, d->tok, path, err))) goto fail;
  const struct tn_hparams *hp = &d->model->hp;
  d->n_vocab = hp->n_vocab;
  if (hp->n_vocab < tn_tokenizer_n_vocab(target_tok)) {
    st = tn_error_set(err, TN_EINVAL,
                      "--draft-model %s: %d rows of logits for %d tokens",
                      path, hp->n_vocab, tn_tokenizer_n_vocab(target_tok));
    goto fail;
  }
  d->max_seqs = max_seqs;
  d->max_k = max_k;
  if (!take_eog(d, target_tok)) {
    st = tn_error_set(err, TN_ENOMEM, "out of memory");
    goto fail;
  }
  d->p_min = p_min;
  d->n_ctx = n_ctx;
  int32_t n_blocks = (kv_tokens + BLOCK_SIZE - 1) / BLOCK_SIZE +
                     max_seqs * ((max_k + BLOCK_SIZE - 1) / BLOCK_SIZE + 1);
  if ((st = tn_kv_pool_new(hp->n_layer, n_blocks, BLOCK_SIZE,
                           hp->n_head_kv * hp->head_dim, &d->kv, err)))
    goto fail;
  int32_t nt = CATCHUP_TOKENS + max_seqs;
  if ((st = tn_ctx_new(d->model, pool, nt, n_ctx + max_k, max_seqs, &d->ctx,
                       err)))
    goto fail;
  tn_ctx_set_threads(d->ctx, n_threads);
  if (!alloc_batch(d, nt, max_seqs)) {
    st = tn_error_set(err, TN_ENOMEM, "out of memory");
    goto fail;
  }
  calibrate(d);
  tn_log_debug("draft model %s: %s, %d layers, KV for %d tokens, a pass "
               "%.2f ms",
               d->model->name, tn_arch_name(hp->arch), hp->n_layer,
               n_blocks * BLOCK_SIZE, d->t_pass * 1e3);
  *out = d;
  return TN_OK;
fail:
  tn_drafter_free(d);
  return st;
}

void tn_drafter_free(struct tn_drafter *d) {
  if (!d) return;
  free(d->batch.token);
  free(d->batch.pos);
  free(d->batch.seq);
  free(d->batch.logits);
  free(d->batch.seqs);
  free(d->slot);
  free(d->eog);
  free(d->lora);
  free(d->lora_scale);
  tn_ctx_free(d->ctx);
  if (!d->self) {
    tn_kv_pool_free(d->kv);
    tn_tokenizer_free(d->tok);
    tn_model_free(d->model);
  }
  free(d);
}

const char *tn_drafter_model_name(const struct tn_drafter *d) {
  return d->self ? "self" : d->model->name;
}

bool tn_drafter_is_self(const struct tn_drafter *d) { return d->self; }

double tn_drafter_pass_seconds(const struct tn_drafter *d) {
  return d->t_pass;
}

bool tn_drafter_kv_low(const struct tn_drafter *d) {
  if (d->self) return false; /* no cache of its own */
  return tn_kv_n_free(d->kv) < tn_kv_n_blocks(d->kv) / 4;
}

void tn_draft_seq_init(struct tn_draft_seq *ds) {
  memset(ds, 0, sizeof(*ds));
  tn_kv_seq_init(&ds->kv);
}

void tn_draft_seq_drop(struct tn_drafter *d, struct tn_draft_seq *ds) {
  if (d) tn_kv_seq_deinit(d->kv, &ds->kv);
  tn_draft_seq_init(ds);
}

/* How much of the draft cache is still s's history: what it fed of its
 * last proposal counts only as far as the history took the same tokens. */
static int32_t cache_valid(const struct tn_draft_seq *ds,
                           const int32_t *tokens,
                           int32_t n_tokens) {
  int32_t valid = TN_MIN(ds->n_done, ds->n_base);
  for (int32_t j = 0; ds->n_base + j < ds->n_done; j++) {
    int32_t p = ds->n_base + j;
    if (p >= n_tokens || tokens[p] != ds->fed[j]) break;
    valid = p + 1;
  }
  return TN_MIN(valid, n_tokens);
}

/* The greedy token of a row of logits over the target's n_vocab ids and
 * its probability under the draft (softmax over all of the draft's rows;
 * terms below e^-20 of the top are left out). */
static bool in_list(const int32_t *ids, int32_t n, int32_t id) {
  for (int32_t i = 0; i < n; i++)
    if (ids[i] == id) return true;
  return false;
}

/* ban: ids the target masks at this position (end of generation under
 * ignore_eos or min_tokens), never proposed. */
static int32_t greedy(const float *row, int32_t n_vocab, int32_t n_rows,
                      const int32_t *ban, int32_t n_ban, float *p) {
  int32_t best = 0;
  for (int32_t i = 1; i < n_vocab; i++)
    if (row[i] > row[best]) best = i;
  if (n_ban > 0 && in_list(ban, n_ban, best)) {
    best = -1;
    for (int32_t i = 0; i < n_vocab; i++)
      if (!in_list(ban, n_ban, i) && (best < 0 || row[i] > row[best]))
        best = i;
    if (best < 0) return -1;
  }
  if (!p) return best;
  float mx = row[best];
  for (int32_t i = n_vocab; i < n_rows; i++) mx = fmaxf(mx, row[i]);
  double sum = 0.0;
  for (int32_t i = 0; i < n_rows; i++) {
    float x = row[i] - mx;
    if (x > -20.0f) sum += expf(x);
  }
  *p = (float)(exp((double)(row[best] - mx)) / sum);
  return best;
}

/* Self-drafting's first pass: each sequence's last token (its decode this
 * step) through the draft layers, on the target's own cache. The blocks
 * its drafts need are taken from free ones only (never evicting cached
 * prefixes) and given back after; what the passes write at and past the
 * last token is rewritten by the verify pass before anything reads it. */
static void self_first(struct tn_drafter *d, struct tn_draft_req *reqs,
                       int32_t n_reqs) {
  struct tn_batch *b = &d->batch;
  const int32_t bs = tn_kv_pool_layout(d->kv)->block_size;
  bool any_lora = false;
  for (int32_t i = 0; i < n_reqs && b->n_seqs < d->max_seqs; i++) {
    struct tn_draft_req *r = &reqs[i];
    struct tn_kv_seq *kv = r->tkv;
    r->got = 0;
    r->cum = 1.0f;
    r->active = false;
    r->n_blocks0 = kv->n_blocks;
    /* positions n_tokens - 1 .. n_tokens + k - 2 are written */
    int32_t room = (kv->n_blocks + tn_kv_n_free(d->kv)) * bs -
                   (r->n_tokens - 1);
    r->k = TN_MIN(r->k, TN_MIN(room, d->n_ctx - r->n_tokens));
    if (r->k <= 0 || r->n_tokens < 1 ||
        tn_kv_seq_reserve(d->kv, kv, r->n_tokens + r->k - 1) != TN_OK) {
      tn_kv_seq_truncate(d->kv, kv, r->n_blocks0 * bs);
      r->k = 0;
      continue;
    }
    int32_t si = b->n_seqs++;
    b->seqs[si] = kv;
    d->slot[si] = i;
    d->lora[si] = r->lora;
    d->lora_scale[si] = r->lora_scale;
    any_lora = any_lora || r->lora;
    int32_t t = b->n_tokens++;
    b->token[t] = r->tokens[r->n_tokens - 1];
    b->pos[t] = r->n_tokens - 1;
    b->seq[t] = si;
    b->logits[t] = true;
    r->active = true;
  }
  b->lora = any_lora ? d->lora : NULL;
  b->lora_scale = any_lora ? d->lora_scale : NULL;
}

void tn_drafter_propose(struct tn_drafter *d, struct tn_draft_req *reqs,
                        int32_t n_reqs, int32_t n_vocab, float cum_min) {
  struct tn_batch *b = &d->batch;
  b->n_tokens = 0;
  b->n_seqs = 0;
  if (d->self) {
    self_first(d, reqs, n_reqs);
    goto draft;
  }
  /* 1. cut what the target rejected; 2. catch up and draft the first. */
  int32_t budget = CATCHUP_TOKENS;
  for (int32_t i = 0; i < n_reqs; i++) {
    struct tn_draft_req *r = &reqs[i];
    struct tn_draft_seq *ds = r->ds;
    r->got = 0;
    r->cum = 1.0f;
    r->active = false;
    if (r->n_tokens + r->k > d->n_ctx) r->k = 0; /* no room to draft */
    if (r->k <= 0) continue;
    /* the last token is fed again even when the cache has it (its draft
     * was accepted and then also sampled): its logits start the draft */
    int32_t valid = TN_MIN(cache_valid(ds, r->tokens, r->n_tokens),
                           r->n_tokens - 1);
    tn_kv_seq_truncate(d->kv, &ds->kv, valid);
    ds->n_done = valid;
    ds->kv.n_tokens = valid;
    ds->n_base = valid;
  }
  /* the small catch-ups (the usual one or two tokens) first, so one long
   * prompt cannot take every sequence's turn */
  for (int pass = 0; pass < 2; pass++) {
    for (int32_t i = 0; i < n_reqs && b->n_seqs < d->max_seqs; i++) {
      struct tn_draft_req *r = &reqs[i];
      struct tn_draft_seq *ds = r->ds;
      int32_t valid = ds->n_done;
      int32_t need = r->n_tokens - valid;
      int32_t n = TN_MIN(need, budget);
      if (r->k <= 0 || n <= 0 || (need <= SMALL_CATCHUP) != (pass == 0))
        continue;
      /* room for the catch-up and the drafts fed after it */
      if (tn_kv_seq_reserve(d->kv, &ds->kv, valid + n + r->k) != TN_OK) {
        tn_kv_seq_truncate(d->kv, &ds->kv, valid);
        continue;
      }
      int32_t si = b->n_seqs++;
      b->seqs[si] = &ds->kv;
      d->slot[si] = i;
      for (int32_t j = 0; j < n; j++) {
        int32_t t = b->n_tokens++;
        b->token[t] = r->tokens[valid + j];
        b->pos[t] = valid + j;
        b->seq[t] = si;
        b->logits[t] = false;
      }
      budget -= n;
      r->active = n == need; /* caught up: it drafts */
      b->logits[b->n_tokens - 1] = r->active;
      ds->n_done = ds->n_base = valid + n; /* drafts are fed from here */
    }
  }
draft:
  for (int32_t round = 0; b->n_tokens > 0; round++) {
    struct tn_error err;
    double t0 = tn_time_s();
    if (tn_model_forward(d->ctx, d->kv, b, &err) != TN_OK) {
      tn_log_warn("draft model: %s", err.msg);
      for (int32_t si = 0; si < b->n_seqs; si++) {
        struct tn_draft_req *r = &reqs[d->slot[si]];
        r->got = 0;
        if (!d->self) tn_draft_seq_drop(d, r->ds);
      }
      break;
    }
    double dt = tn_time_s() - t0;
    /* (a catch-up pass is not a drafting pass; self's first one is) */
    if (round > 0 || d->self)
      d->t_pass = d->t_pass > 0 ? 0.8 * d->t_pass + 0.2 * dt : dt;
    const float *logits = tn_ctx_logits(d->ctx);
    int32_t row = 0, n_seqs = b->n_seqs;
    b->n_tokens = 0;
    b->n_seqs = 0;
    for (int32_t si = 0; si < n_seqs; si++) {
      int32_t i = d->slot[si];
      struct tn_draft_req *r = &reqs[i];
      struct tn_draft_seq *ds = r->ds;
      if (!d->self) ds->kv.n_tokens = ds->n_done;
      if (!r->active) continue;
      float p = 1.0f;
      bool mask = r->got < r->n_masked;
      bool want_p = d->p_min > 0.0f || cum_min > 0.0f;
      int32_t tok = greedy(logits + (size_t)row * (size_t)d->n_vocab, n_vocab,
                           d->n_vocab, mask ? d->eog : NULL,
                           mask ? d->n_eog : 0, want_p ? &p : NULL);
      row++;
      r->cum *= p;
      if (tok < 0 || p < d->p_min || (r->got > 0 && r->cum < cum_min)) {
        r->active = false;
        continue;
      }
      r->out[r->got++] = tok;
      /* nothing follows the end of generation */
      if (r->got >= r->k || in_list(d->eog, d->n_eog, tok)) {
        r->active = false;
        continue;
      }
      /* feed it for the next position */
      int32_t sj = b->n_seqs++;
      int32_t t = b->n_tokens++;
      d->slot[sj] = i;
      b->token[t] = tok;
      b->seq[t] = sj;
      b->logits[t] = true;
      if (d->self) {
        b->seqs[sj] = r->tkv;
        b->pos[t] = r->n_tokens - 1 + r->got;
        d->lora[sj] = r->lora;
        d->lora_scale[sj] = r->lora_scale;
        continue;
      }
      ds->fed[ds->n_done - ds->n_base] = tok;
      b->seqs[sj] = &ds->kv;
      b->pos[t] = ds->n_done++;
    }
  }
  if (d->self) {
    /* the target's blocks as they were */
    const int32_t bs = tn_kv_pool_layout(d->kv)->block_size;
    for (int32_t i = 0; i < n_reqs; i++) {
      reqs[i].active = false;
      if (reqs[i].k > 0)
        tn_kv_seq_truncate(d->kv, reqs[i].tkv, reqs[i].n_blocks0 * bs);
    }
    return;
  }
  /* blocks reserved for drafts never fed go back */
  for (int32_t i = 0; i < n_reqs; i++) {
    struct tn_draft_seq *ds = reqs[i].ds;
    reqs[i].active = false;
    tn_kv_seq_truncate(d->kv, &ds->kv, ds->n_done);
    ds->kv.n_tokens = ds->n_done;
  }
}
