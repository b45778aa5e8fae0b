/*
 * sched.c: the serving engine: one thread per model running continuous
 * batching over a paged, prefix-cached KV pool (see engine.h).
 *
 * Each step:
 *   1. take new requests from the inbox, drop cancelled sequences;
 *   2. build one batch under the token budget: every admitted sequence in
 *      admission order gets its pending tokens (1 for a decode, a chunk of
 *      the prompt for a prefill), then waiting sequences are admitted while
 *      there is budget, room in the batch and KV blocks; a sequence short
 *      of blocks preempts the newest admitted one (which recomputes later);
 *   3. one forward over the batch;
 *   4. sample for every sequence whose pending tokens are all in the cache,
 *      release text, finish, register newly filled blocks in the prefix
 *      index, update metrics, notify the requests touched.
 *
 * A sequence's pending tokens are tokens[n_done .. n_tokens): a new or
 * preempted sequence holds its whole history there, a decoding one exactly
 * its last sampled token. Prefill, decode and recompute are one path.
 *
 * Speculation: when planning a decode, the engine may append up to k
 * drafted tokens after the last sampled one (spec.c proposes them) and run
 * all 1 + k in the step with logits for each. After the forward pass the
 * drafts are checked in order against the model's own choice at each
 * position (tn_sampler_verify); the accepted run and one token of the
 * model's stay, the rest are dropped from tokens[] and the KV cache keeps
 * only the positions before them (n_done moves back; the blocks stay with
 * the sequence for its next step, their stale rows are overwritten before
 * anything reads them, and only blocks wholly below n_done are ever
 * registered in the prefix index). Batch invariance makes a row's logits
 * the same whether it was computed in a verify pass or alone, so greedy
 * output is token for token that of plain decoding. Drafts never preempt
 * another sequence: they use only blocks that are free.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/engine_internal.h"
#include "grammar/grammar.h"
#include "kv/kv.h"
#include "model/lora.h"
#include "model/model.h"
#include "obs/obs.h"
#include "tokenizer/tokenizer.h"


const char *tn_finish_str(enum tn_finish f) {
  switch (f) {
  case TN_FINISH_NONE: return "none";
  case TN_FINISH_STOP: return "stop";
  case TN_FINISH_LENGTH: return "length";
  case TN_FINISH_CANCELLED: return "cancelled";
  case TN_FINISH_ERROR: return "error";
  }
  return "unknown";
}

void tn_gen_params_default(struct tn_gen_params *p) {
  memset(p, 0, sizeof(*p));
  tn_sampling_default(&p->sampling);
  p->max_tokens = 16;
  p->n = 1;
  p->speculative = true;
  p->lora_scale = 1.0f;
}

void tn_engine_config_default(struct tn_engine_config *c) {
  memset(c, 0, sizeof(*c));
  c->name = "default";
  c->n_threads = 1;
  c->max_seqs = 16;
  c->step_tokens = 256;
  c->queue_max = 256;
  c->prefix_cache = true;
  c->spec.method = TN_SPEC_OFF;
  c->spec.max_tokens = 8;
  c->spec.ngram_min = 2;
  c->spec.ngram_max = 4;
  c->spec.draft_p_min = 0.3f;
}

/* Token masks remembered per engine, by grammar and parse state. */
#define GRAMMAR_CACHE_BYTES (64u << 20)
/* Without speculation configured, forced grammar text is still drafted:
 * this many tokens per sequence, this many logits rows per step in all
 * (the logits buffer is sized for them). */
#define GRAMMAR_DRAFT_MAX 8
#define GRAMMAR_DRAFT_ROWS 32
/* Allowed tokens an option estimate follows in one step (a choice list
 * allows the prefixes of its options: far fewer). */
#define OPTION_TOKENS_MAX 4096

/* ---- requests and sequences */

struct seq;

struct tn_req_priv {
  pthread_mutex_t mu;
  atomic_int refs;
  atomic_bool cancel;
  tn_req_notify_fn notify;
  void *user;
  struct tn_gen_params params;
  struct tn_logit_bias *bias;
  char **stops;
  char **options;             /* params.options, owned */
  size_t *option_lens;
  int32_t *prompt;
  int32_t n_prompt;
  int32_t n_live;             /* sequences not finished */
  int32_t n_spawned;          /* choices given a sequence */
  bool touched;               /* gained output this step */
  bool queued;                /* counted in the waiting gauge */
  double held0;               /* background: the engine's held clock when
                                 it arrived (held_now) */
  struct tn_req *next_inbox;
};

struct seq {
  struct tn_req *req;
  int32_t choice;
  uint64_t order;             /* admission order: newest preempted first */
  struct tn_kv_seq kv;
  int32_t *tokens;            /* prompt and generated */
  int32_t n_tokens, cap_tokens;
  int32_t n_done;             /* tokens in the KV cache */
  int32_t n_blocks_hashed;    /* leading blocks registered in the index */
  uint64_t chain;             /* hash of the last registered block */
  int32_t n_gen;
  struct tn_sampler *sampler;
  struct tn_detok detok;
  char *held;                 /* text held back for stop strings */
  size_t n_held, cap_held;
  double t_last;              /* last token time (inter-token latency) */
  int32_t chunk;              /* tokens in the current batch */
  int32_t n_draft;            /* of those, drafted (verified this step) */
  int32_t prop[TN_SPEC_MAX_TOKENS]; /* the drafter's proposal this step */
  int32_t n_prop;
  bool prop_forced;           /* the proposal is text its grammar forces */
  double acc_a[2], acc_r[2];  /* decayed accepted drafts and rejections
                                 per class of proposal: its acceptance
                                 rate (a+1)/(a+r+2) */
  int32_t prop_class;         /* the proposal's class: 1 when the n-gram
                                 drafter follows a copy the model is
                                 making (nearly always right), else 0 */
  int32_t since_draft;        /* steps since it last drafted */
  bool stop_hit;              /* a stop string ended it: drop what's held */
  bool wants_logits;
  double *embd_acc;            /* params.embed: the hidden states' sum */
  bool decode;                /* planned as a decode this step */
  bool cached_reported;       /* its request's n_cached is set */
  struct tn_draft_seq draft;  /* its place in the draft model's cache */
  struct tn_ngram_edit ngram; /* --spec ngram: the edit it has learned */
  struct tn_grammar_matcher *gm; /* when its request has a grammar */
  char error[200];            /* why it finished with an error */
  /* a choice list: the text so far, its log-probability, and each
   * option's estimated probability (tn_gen_params.options) */
  char *otext;
  size_t n_otext, cap_otext;
  double path_logp;
  float *opt_est;
  double compute_s; /* its share of the passes so far (req->compute_s) */
  struct seq *next;
};

struct model_metrics {
  struct tn_metric *ttft, *itl, *e2e, *queue, *prompt_hist, *gen_hist;
  struct tn_metric *spec_drafts, *spec_draft_tokens, *spec_accepted;
  struct tn_metric *spec_skipped, *spec_verify_s, *spec_draft_s;
  struct tn_metric *spec_declined, *spec_paused_steps, *spec_paused;
  struct tn_metric *grammar_masks, *grammar_cached, *grammar_s,
      *grammar_forced;
  struct tn_metric *spec_per_pos[TN_SPEC_MAX_TOKENS];
  struct tn_metric *prompt_total, *gen_total, *prefix_queries, *prefix_hits,
      *preemptions, *running, *waiting, *kv_used, *kv_free;
  struct tn_metric_family *requests; /* by outcome */
  /* by (model, adapter), for requests on an adapter */
  struct tn_metric_family *ad_requests, *ad_prompt, *ad_gen, *ad_ttft,
      *ad_e2e;
};

struct tn_engine {
  struct tn_engine_config cfg;
  char name[128];
  struct tn_model *model;
  struct tn_tokenizer *tok;
  struct tn_adapters *adapters;
  struct tn_pool *pool;       /* compute threads (maybe shared) */
  struct tn_ctx *ctx;
  struct tn_kv_pool *kv;
  struct tn_pool *own_pool;   /* when no shared pool was given */
  int n_threads;              /* of the pool's, used by our steps */
  int32_t n_ctx;
  int32_t n_vocab;
  int32_t *eog;               /* end-of-generation ids, masked when needed */
  int32_t n_eog;
  struct tn_metrics *metrics;
  struct model_metrics mm;

  pthread_t thread;
  bool thread_started;
  pthread_mutex_t mu;         /* inbox, flags, stats */
  pthread_cond_t cv;
  struct tn_req *inbox_head, *inbox_tail;
  int32_t n_waiting_total;    /* inbox + engine's waiting list */
  bool stop, draining;
  atomic_bool cancel_all;     /* read by the engine thread without mu */
  struct tn_engine_stats stats;

  /* engine thread only */
  struct seq *admitted;       /* in admission order */
  struct seq *waiting;        /* FIFO; preempted ones go first */
  int32_t n_admitted;
  uint64_t next_order;
  uint64_t n_steps, n_preemptions, n_prefix_queries, n_prefix_hits;
  struct tn_batch batch;
  bool *batch_hidden;          /* [step_tokens]: batch.hidden when used */
  struct seq **batch_seqs;    /* per batch sequence index */
  const struct tn_lora **batch_lora; /* per batch sequence: its adapter */
  float *batch_lora_scale;
  struct tn_step_entry *trace; /* per batch sequence, when on_step is set */
  struct tn_spec_cost cost;   /* step time model for planning drafts */
  bool cost_ok;               /* calibrated (else prompts are not capped) */
  double cost0_a, cost0_b;    /* the model as calibrated (tn_engine_info) */
  double s_prompt_tok, s_gen_tok; /* decayed compute seconds per prompt and
                                     per generated token (share_step) */
  struct tn_drafter *drafter; /* TN_SPEC_DRAFT, TN_SPEC_SELF */
  struct tn_draft_req *dreqs; /* [max_seqs] */
  uint64_t n_spec_drafts, n_spec_drafted, n_spec_accepted, n_spec_skipped;
  uint64_t n_spec_declined, n_spec_paused_steps;
  double cls_a[2], cls_r[2];  /* every sequence's acceptance per proposal
                                 class, decayed: a new sequence's prior */
  struct tn_spec_switch sw;   /* the measured on/off rule (engine_internal.h) */
  bool sw_used;               /* cost policy with a calibrated cost model */
  bool spec_paused;           /* this step: speculation switched off */
  struct tn_grammar_vocab *gvocab; /* made at the first grammar request */
  uint64_t *gmask;            /* one mask, n_vocab bits */
  uint64_t n_grammar_masks, n_grammar_forced;
  double grammar_s;
  int32_t *opt_ids;           /* option estimates: allowed tokens, */
  float *opt_probs;           /* their probabilities */
  uint64_t n_spec_accepted_pos[TN_SPEC_MAX_TOKENS];
  char *text_buf;
  size_t text_cap;
  struct tn_req **touched;    /* requests with news this step (a ref each) */
  int32_t n_touched, cap_touched;
  /* background work held back for live work: the total so far and the
   * start of the current hold (0: not holding) */
  double held_total, hold_since;
  bool only_held;             /* the last step: everything here is background
                                 work held back */
};

/* ---- small helpers */

static bool seq_bg(const struct seq *s) {
  return s->req->priv->params.background;
}

/* The clock of time background work spent held back (engine thread). */
static double held_now(const struct tn_engine *e) {
  return e->held_total + (e->hold_since > 0 ? tn_time_s() - e->hold_since : 0);
}

/* r is finished (under its lock): stamped, and a live request no longer
 * holds background work back. */
static void req_mark_done(struct tn_engine *e, struct tn_req *r) {
  r->done = true;
  r->t_done = tn_time_s();
  if (r->priv->params.background)
    r->t_held = held_now(e) - r->priv->held0;
  else
    tn_pool_live_add(e->pool, -1);
}

/* The step cost model (tn_spec_cost) plans drafts and caps prompt chunks
 * next to decodes. */
static bool cost_model_used(const struct tn_engine *e) {
  return e->cfg.spec.method != TN_SPEC_OFF || e->cfg.decode_slowdown > 0.0f;
}


static bool seq_push_token(struct seq *s, int32_t id) {
  if (s->n_tokens == s->cap_tokens) {
    int32_t cap = s->cap_tokens ? s->cap_tokens * 2 : 64;
    int32_t *t = realloc(s->tokens, (size_t)cap * sizeof(int32_t));
    if (!t) return false;
    s->tokens = t;
    s->cap_tokens = cap;
  }
  s->tokens[s->n_tokens++] = id;
  return true;
}

static bool bytes_reserve(char **p, size_t *cap, size_t need) {
  if (need <= *cap) return true;
  size_t c = *cap ? *cap : 256;
  while (c < need) c *= 2;
  char *n = realloc(*p, c);
  if (!n) return false;
  *p = n;
  *cap = c;
  return true;
}

static void req_free(struct tn_req *r) {
  struct tn_req_priv *p = r->priv;
  for (int32_t i = 0; i < r->n_choices; i++) {
    free(r->choices[i].text);
    free(r->choices[i].toks);
    free(r->choices[i].option_probs);
  }
  for (int32_t i = 0; p->options && i < p->params.n_options; i++)
    free(p->options[i]);
  free(p->options);
  free(p->option_lens);
  free(r->choices);
  free(r->embedding);
  for (int32_t i = 0; i < p->params.n_stops; i++) free(p->stops[i]);
  free(p->stops);
  free(p->bias);
  free(p->prompt);
  tn_grammar_release(p->params.grammar);
  tn_lora_release(p->params.lora);
  pthread_mutex_destroy(&p->mu);
  free(p);
  free(r);
}

static void req_unref(struct tn_req *r) {
  if (atomic_fetch_sub(&r->priv->refs, 1) == 1) req_free(r);
}

void tn_req_lock(struct tn_req *r) { pthread_mutex_lock(&r->priv->mu); }
void tn_req_unlock(struct tn_req *r) { pthread_mutex_unlock(&r->priv->mu); }

void tn_req_cancel(struct tn_req *r) { atomic_store(&r->priv->cancel, true); }

void tn_req_release(struct tn_req *r) {
  pthread_mutex_lock(&r->priv->mu);
  r->priv->notify = NULL;
  pthread_mutex_unlock(&r->priv->mu);
  atomic_store(&r->priv->cancel, true); /* harmless once done */
  req_unref(r);
}

/* Calls the request's notify (under its lock, so a release that returns
 * has no callback in flight) when it gained output. */
static void req_notify(struct tn_req *r) {
  struct tn_req_priv *p = r->priv;
  tn_req_lock(r);
  if (p->touched && p->notify) p->notify(p->user);
  p->touched = false;
  tn_req_unlock(r);
}

/* Notifies right away (when the touched list cannot grow). */
static void req_notify_now(struct tn_req *r) {
  tn_req_lock(r);
  if (r->priv->notify) r->priv->notify(r->priv->user);
  tn_req_unlock(r);
}

/* Marks r as having news for its submitter; the engine notifies every
 * touched request once at the end of the step. */
static void req_touch(struct tn_engine *e, struct tn_req *r) {
  struct tn_req_priv *p = r->priv;
  if (p->touched) return;
  if (e->n_touched == e->cap_touched) {
    int32_t cap = e->cap_touched ? e->cap_touched * 2 : 64;
    struct tn_req **t = realloc(e->touched, (size_t)cap * sizeof(*t));
    if (!t) {
      req_notify_now(r);
      return;
    }
    e->touched = t;
    e->cap_touched = cap;
  }
  p->touched = true;
  atomic_fetch_add(&p->refs, 1);
  e->touched[e->n_touched++] = r;
}

static void flush_touched(struct tn_engine *e) {
  for (int32_t i = 0; i < e->n_touched; i++) {
    req_notify(e->touched[i]);
    req_unref(e->touched[i]);
  }
  e->n_touched = 0;
}

/* Appends released text to a choice (engine thread, under the req lock). */
static bool choice_append(struct tn_choice *c, const char *s, size_t n) {
  if (!n) return true;
  if (!bytes_reserve(&c->text, &c->cap, c->len + n + 1)) return false;
  memcpy(c->text + c->len, s, n);
  c->len += n;
  c->text[c->len] = '\0';
  return true;
}

/* ---- metrics */

static const double ttft_buckets[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06,
                                      0.08,  0.1,   0.25, 0.5,  0.75, 1.0,
                                      2.5,   5.0,   7.5,  10.0, 20.0, 40.0,
                                      80.0};
static const double itl_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02,
                                     0.025, 0.03,   0.04,  0.05, 0.075, 0.1,
                                     0.15,  0.2,    0.3,   0.4,  0.5,   0.75,
                                     1.0,   2.5,    5.0};
static const double e2e_buckets[] = {0.3,  0.5,  0.8,  1.0,  1.5,  2.0,
                                     2.5,  5.0,  10.0, 15.0, 20.0, 30.0,
                                     40.0, 50.0, 60.0, 120.0, 240.0};
static const double tok_buckets[] = {1,    2,    5,    10,   20,   50,
                                     100,  200,  500,  1000, 2000, 5000,
                                     10000, 20000, 50000, 100000};

static struct tn_metric *series1(struct tn_metrics *reg,
                                 enum tn_metric_kind kind, const char *name,
                                 const char *help, const double *b, int nb,
                                 const char *model) {
  static const char *const labels[] = {"model"};
  struct tn_metric_family *f =
      tn_metrics_family(reg, kind, name, help, labels, 1, b, nb);
  return f ? tn_metric_series(f, &model) : NULL;
}

static void metrics_init(struct tn_engine *e) {
  struct tn_metrics *r = e->metrics;
  struct model_metrics *m = &e->mm;
  const char *n = e->name;
  if (!r) return;
#define H(field, name, help, b) \
  m->field = series1(r, TN_METRIC_HISTOGRAM, name, help, b, \
                     (int)TN_ARRAY_LEN(b), n)
#define C(field, kind, name, help) m->field = series1(r, kind, name, help, NULL, 0, n)
  H(ttft, "tern_time_to_first_token_seconds",
    "Time from request arrival to its first generated token.", ttft_buckets);
  H(itl, "tern_inter_token_latency_seconds",
    "Time between consecutive tokens of one sequence.", itl_buckets);
  H(e2e, "tern_e2e_request_latency_seconds",
    "Time from request arrival to its last token.", e2e_buckets);
  H(queue, "tern_request_queue_time_seconds",
    "Time a request waited before it was first scheduled.", e2e_buckets);
  H(prompt_hist, "tern_request_prompt_tokens",
    "Prompt tokens per request.", tok_buckets);
  H(gen_hist, "tern_request_generation_tokens",
    "Generated tokens per request (all samples).", tok_buckets);
  C(prompt_total, TN_METRIC_COUNTER, "tern_prompt_tokens_total",
    "Prompt tokens of finished requests.");
  C(gen_total, TN_METRIC_COUNTER, "tern_generation_tokens_total",
    "Generated tokens.");
  C(prefix_queries, TN_METRIC_COUNTER, "tern_prefix_cache_queries_total",
    "Prompt tokens looked up in the prefix cache.");
  C(prefix_hits, TN_METRIC_COUNTER, "tern_prefix_cache_hits_total",
    "Prompt tokens served from the prefix cache.");
  C(preemptions, TN_METRIC_COUNTER, "tern_num_preemptions_total",
    "Sequences preempted for lack of KV blocks (recomputed later).");
  C(running, TN_METRIC_GAUGE, "tern_requests_running",
    "Requests with a sequence in the running batch.");
  C(waiting, TN_METRIC_GAUGE, "tern_requests_waiting",
    "Requests queued, not yet scheduled.");
  C(kv_used, TN_METRIC_GAUGE, "tern_kv_blocks_used",
    "KV cache blocks held by sequences.");
  C(kv_free, TN_METRIC_GAUGE, "tern_kv_blocks_free",
    "KV cache blocks free or cached for reuse.");
  C(grammar_masks, TN_METRIC_COUNTER, "tern_grammar_masks_total",
    "Token masks of constrained requests (grammar, JSON schema, regex, "
    "choice), computed or from the mask cache.");
  C(grammar_cached, TN_METRIC_COUNTER, "tern_grammar_mask_cache_hits_total",
    "Token masks taken from the mask cache.");
  C(grammar_s, TN_METRIC_COUNTER, "tern_grammar_mask_seconds_total",
    "Time spent computing token masks.");
  C(grammar_forced, TN_METRIC_COUNTER, "tern_grammar_forced_tokens_total",
    "Tokens appended without a forward pass because the grammar left only "
    "one way to finish (early exit).");
#undef H
#undef C
  static const char *const labels[] = {"model", "outcome"};
  m->requests = tn_metrics_family(r, TN_METRIC_COUNTER,
                                  "tern_request_success_total",
                                  "Finished requests by model and outcome.",
                                  labels, 2, NULL, 0);
  static const char *const al[] = {"model", "adapter"};
  m->ad_requests = tn_metrics_family(
      r, TN_METRIC_COUNTER, "tern_adapter_requests_total",
      "Finished requests on a LoRA adapter.", al, 2, NULL, 0);
  m->ad_prompt = tn_metrics_family(
      r, TN_METRIC_COUNTER, "tern_adapter_prompt_tokens_total",
      "Prompt tokens of finished requests on an adapter.", al, 2, NULL, 0);
  m->ad_gen = tn_metrics_family(
      r, TN_METRIC_COUNTER, "tern_adapter_generation_tokens_total",
      "Tokens generated on an adapter.", al, 2, NULL, 0);
  m->ad_ttft = tn_metrics_family(
      r, TN_METRIC_HISTOGRAM, "tern_adapter_time_to_first_token_seconds",
      "Time to first token of requests on an adapter.", al, 2, ttft_buckets,
      (int)TN_ARRAY_LEN(ttft_buckets));
  m->ad_e2e = tn_metrics_family(
      r, TN_METRIC_HISTOGRAM, "tern_adapter_e2e_request_latency_seconds",
      "Arrival to last token of requests on an adapter.", al, 2, e2e_buckets,
      (int)TN_ARRAY_LEN(e2e_buckets));
  if (e->cfg.spec.method == TN_SPEC_OFF) return;
  /* vLLM's spec-decode counter set, labelled by model and method */
  static const char *const sl[] = {"model", "method", "position"};
  const char *lv[3] = {n, tn_spec_method_name(e->cfg.spec.method), NULL};
  struct tn_metric_family *f;
#define S(field, name, help)                                             \
  f = tn_metrics_family(r, TN_METRIC_COUNTER, name, help, sl, 2, NULL, 0); \
  m->field = f ? tn_metric_series(f, lv) : NULL
  S(spec_drafts, "tern_spec_decode_num_drafts_total",
    "Drafts verified (one per sequence and step).");
  S(spec_draft_tokens, "tern_spec_decode_num_draft_tokens_total",
    "Drafted tokens verified.");
  S(spec_accepted, "tern_spec_decode_num_accepted_tokens_total",
    "Drafted tokens accepted.");
  S(spec_skipped, "tern_spec_decode_num_skipped_tokens_total",
    "Proposed draft tokens not verified: the cost model expected them to "
    "cost more than they add, or the step had no budget or free KV block "
    "left for them (counted again each step they are proposed).");
  S(spec_verify_s, "tern_spec_decode_verify_seconds_total",
    "Time of forward passes that verified drafts.");
  S(spec_draft_s, "tern_spec_decode_draft_seconds_total",
    "Time spent proposing drafts (draft model passes, n-gram lookups).");
  S(spec_declined, "tern_spec_decode_num_declined_total",
    "Decoding steps in which a sequence did not draft because the cost "
    "model expected drafting not to pay (draft model: passes, verify "
    "slots, catching up).");
  S(spec_paused_steps, "tern_spec_decode_num_paused_steps_total",
    "Steps run without speculation because measured steps showed it not "
    "paying (the adaptive switch; probes included).");
#undef S
  f = tn_metrics_family(r, TN_METRIC_GAUGE, "tern_spec_decode_paused",
                        "1 while the adaptive switch has speculation off.",
                        sl, 2, NULL, 0);
  m->spec_paused = f ? tn_metric_series(f, lv) : NULL;
  f = tn_metrics_family(r, TN_METRIC_COUNTER,
                        "tern_spec_decode_num_accepted_tokens_per_pos_total",
                        "Drafted tokens accepted, by position in the draft "
                        "(0: the first).",
                        sl, 3, NULL, 0);
  for (int32_t i = 0; f && i < e->cfg.spec.max_tokens; i++) {
    char pos[16];
    snprintf(pos, sizeof(pos), "%d", i);
    lv[2] = pos;
    m->spec_per_pos[i] = tn_metric_series(f, lv);
  }
}

/* A prompt chunk of the request's first choice ran in [t0, t1]. */
static void req_chunk(struct tn_req *r, double t0, double t1, int32_t n) {
  tn_req_lock(r);
  if (r->n_chunks < TN_REQ_CHUNKS_MAX) {
    r->chunks[r->n_chunks++] = (struct tn_req_chunk){t0, t1, n};
  } else {
    r->chunks[TN_REQ_CHUNKS_MAX - 1].t1 = t1;
    r->chunks[TN_REQ_CHUNKS_MAX - 1].n_tokens += n;
  }
  tn_req_unlock(r);
}

static void metric_observe(struct tn_metric *m, double v) {
  if (m) tn_metric_observe(m, v);
}
static void metric_add(struct tn_metric *m, double v) {
  if (m) tn_metric_add(m, v);
}
static void metric_set(struct tn_metric *m, double v) {
  if (m) tn_metric_set(m, v);
}

static void metrics_request_done(struct tn_engine *e, struct tn_req *r,
                                 const char *outcome) {
  if (!e->metrics) return;
  int32_t gen = 0;
  for (int32_t i = 0; i < r->n_choices; i++) gen += r->choices[i].n_gen;
  metric_observe(e->mm.e2e, r->t_done - r->t_submit);
  metric_observe(e->mm.prompt_hist, r->n_prompt);
  metric_observe(e->mm.gen_hist, gen);
  metric_add(e->mm.prompt_total, r->n_prompt);
  if (e->mm.requests) {
    const char *lv[2] = {e->name, outcome};
    metric_add(tn_metric_series(e->mm.requests, lv), 1);
  }
  const struct tn_lora *l = r->priv->params.lora;
  if (l && e->mm.ad_requests) {
    const char *lv[2] = {e->name, l->name};
    metric_add(tn_metric_series(e->mm.ad_requests, lv), 1);
    metric_add(tn_metric_series(e->mm.ad_prompt, lv), r->n_prompt);
    metric_add(tn_metric_series(e->mm.ad_gen, lv), gen);
    if (r->t_first > 0)
      metric_observe(tn_metric_series(e->mm.ad_ttft, lv),
                     r->t_first - r->t_submit);
    metric_observe(tn_metric_series(e->mm.ad_e2e, lv), r->t_done - r->t_submit);
  }
}

/* ---- sequences */

/* The weight, in accepted tokens and rejections, a new sequence gives
 * the engine's measured acceptance as its prior. */
#define SPEC_PRIOR_DRAFTS 8.0

/* The prefix cache's first parent hash: KV computed under an adapter (and
 * scale) is never reused under another, or under the base. */
static uint64_t seq_salt(const struct seq *s) {
  const struct tn_gen_params *p = &s->req->priv->params;
  return tn_lora_salt(p->lora, p->lora_scale);
}

static struct seq *seq_new(struct tn_engine *e, struct tn_req *r,
                           int32_t choice) {
  struct tn_req_priv *p = r->priv;
  struct seq *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  s->req = r;
  s->choice = choice;
  s->chain = seq_salt(s);
  tn_kv_seq_init(&s->kv);
  tn_draft_seq_init(&s->draft);
  tn_spec_ngram_edit_init(&s->ngram);
  /* its acceptance starts from what the engine's recent drafts of each
   * class measured, weighted as a few drafts of its own */
  for (int32_t c = 0; c < 2; c++) {
    double w = e->cls_a[c] + e->cls_r[c];
    double f = w > SPEC_PRIOR_DRAFTS ? SPEC_PRIOR_DRAFTS / w : 1.0;
    s->acc_a[c] = f * e->cls_a[c];
    s->acc_r[c] = f * e->cls_r[c];
  }
  s->tokens = malloc((size_t)(p->n_prompt + 16) * sizeof(int32_t));
  struct tn_sampling sp = p->params.sampling;
  sp.seed += (uint64_t)choice * 0x9e3779b97f4a7c15ull;
  struct tn_error err;
  if (!s->tokens || tn_sampler_new(&sp, e->n_vocab, &s->sampler, &err)) {
    free(s->tokens);
    free(s);
    return NULL;
  }
  memcpy(s->tokens, p->prompt, (size_t)p->n_prompt * sizeof(int32_t));
  s->n_tokens = p->n_prompt;

  s->cap_tokens = p->n_prompt + 16;
  tn_sampler_add_prompt(s->sampler, p->prompt, (size_t)p->n_prompt);
  tn_detok_init(&s->detok, e->tok, false);
  if (p->params.grammar) {
    if (!e->gvocab &&
        (tn_grammar_vocab_new(e->tok, GRAMMAR_CACHE_BYTES, &e->gvocab,
                              &err) != TN_OK ||
         !(e->gmask = calloc(((size_t)e->n_vocab + 63) / 64, 8)) ||
         !(e->opt_ids = malloc(OPTION_TOKENS_MAX * sizeof(int32_t))) ||
         !(e->opt_probs = malloc(OPTION_TOKENS_MAX * sizeof(float))))) {
      tn_grammar_vocab_free(e->gvocab);
      e->gvocab = NULL;
      tn_log_error("engine %s: grammar vocabulary: %s", e->name, err.msg);
    }
    if (!e->gvocab || tn_grammar_matcher_new(p->params.grammar, e->gvocab,
                                             &s->gm, &err) != TN_OK) {
      tn_sampler_free(s->sampler);
      free(s->tokens);
      free(s);
      return NULL;
    }
  }
  if (p->params.n_options > 0 && s->gm &&
      !(s->opt_est = calloc((size_t)p->params.n_options, sizeof(float)))) {
    tn_grammar_matcher_free(s->gm);
    tn_sampler_free(s->sampler);
    free(s->tokens);
    free(s);
    return NULL;
  }
  atomic_fetch_add(&p->refs, 1);
  return s;
}

static void seq_free(struct tn_engine *e, struct seq *s) {
  tn_kv_seq_deinit(e->kv, &s->kv);
  tn_draft_seq_drop(e->drafter, &s->draft);
  tn_sampler_free(s->sampler);
  tn_grammar_matcher_free(s->gm);
  free(s->otext);
  free(s->opt_est);
  free(s->embd_acc);
  free(s->tokens);
  free(s->held);
  req_unref(s->req);
  free(s);
}

/* Unlinks s from a singly linked list. */
static void list_remove(struct seq **head, struct seq *s) {
  for (struct seq **pp = head; *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      s->next = NULL;
      return;
    }
}

static void list_append(struct seq **head, struct seq *s) {
  struct seq **pp = head;
  while (*pp) pp = &(*pp)->next;
  s->next = NULL;
  *pp = s;
}

/* Finishes a sequence's choice; the caller frees the sequence. Runs under
 * no lock; takes the request's. */
static void seq_finish(struct tn_engine *e, struct seq *s, enum tn_finish f,
                       const char *error) {
  struct tn_req *r = s->req;
  struct tn_req_priv *p = r->priv;
  struct tn_choice *c = &r->choices[s->choice];
  char tail[64];
  size_t n_tail = 0;
  bool flush = (f == TN_FINISH_LENGTH || f == TN_FINISH_STOP) && !s->stop_hit;
  if (flush) n_tail = tn_detok_flush(&s->detok, tail, sizeof(tail));
  tn_req_lock(r);
  if (flush) {
    /* Held text was only a possible start of a stop string. */
    choice_append(c, s->held, s->n_held);
    choice_append(c, tail, n_tail);
  }
  s->n_held = 0;
  c->finish = f;
  if (s->opt_est && c->option_probs)
    memcpy(c->option_probs, s->opt_est,
           (size_t)p->params.n_options * sizeof(float));
  /* A failed or cancelled choice 0 takes the choices it never spawned
   * with it, or the request would never be done. */
  if (f == TN_FINISH_ERROR || f == TN_FINISH_CANCELLED)
    while (p->n_spawned < r->n_choices) r->choices[p->n_spawned++].finish = f;
  if (f == TN_FINISH_ERROR && error)
    snprintf(r->error, sizeof(r->error), "%s", error);
  r->compute_s += s->compute_s;
  s->compute_s = 0.0;
  bool done = --p->n_live == 0 && p->n_spawned == r->n_choices;
  if (done) req_mark_done(e, r);
  tn_req_unlock(r);
  req_touch(e, r);
  if (done) {
    const char *outcome = tn_finish_str(f);
    for (int32_t i = 0; i < r->n_choices; i++)
      if (r->choices[i].finish == TN_FINISH_CANCELLED ||
          r->choices[i].finish == TN_FINISH_ERROR)
        outcome = tn_finish_str(r->choices[i].finish);
    metrics_request_done(e, r, outcome);
  }
}

/* Registers the sequence's newly filled blocks in the prefix index. */
static void seq_index_blocks(struct tn_engine *e, struct seq *s) {
  if (!e->cfg.prefix_cache) return;
  while ((s->n_blocks_hashed + 1) * BLOCK_SIZE <= s->n_done) {
    int32_t b = s->n_blocks_hashed;
    s->chain = tn_kv_prefix_put(e->kv, s->kv.blocks[b], s->chain,
                                s->tokens + (size_t)b * BLOCK_SIZE);
    s->n_blocks_hashed++;
  }
}

/* Takes the cached blocks that match the start of s's tokens (at least one
 * token is left to compute: its logits are needed). */
static void seq_prefix_lookup(struct tn_engine *e, struct seq *s) {
  s->chain = seq_salt(s);
  s->n_blocks_hashed = 0;
  if (!e->cfg.prefix_cache || s->n_done != 0) return;
  if (s->req->priv->params.embed == TN_EMBED_MEAN) return;
  int32_t max_blocks = (s->n_tokens - 1) / BLOCK_SIZE;
  int32_t got = 0;
  for (; got < max_blocks; got++) {
    const int32_t *t = s->tokens + (size_t)got * BLOCK_SIZE;
    int32_t b = tn_kv_prefix_get(e->kv, s->chain, t);
    if (b < 0 || tn_kv_seq_push(e->kv, &s->kv, b) != TN_OK) break;
    s->chain = tn_kv_chain_hash(s->chain, t, BLOCK_SIZE);
  }
  s->n_blocks_hashed = got;
  s->n_done = got * BLOCK_SIZE;
  s->kv.n_tokens = s->n_done;
}

/* Sends s back to the front of the waiting list, dropping its blocks; its
 * whole history is recomputed when it is admitted again. */
static void seq_preempt(struct tn_engine *e, struct seq *s) {
  list_remove(&e->admitted, s);
  e->n_admitted--;
  s->n_draft = 0; /* (drafts are planned after every preemption) */
  tn_kv_seq_deinit(e->kv, &s->kv);
  tn_kv_seq_init(&s->kv);
  tn_draft_seq_drop(e->drafter, &s->draft);
  s->n_done = 0;
  s->n_blocks_hashed = 0;
  s->chain = seq_salt(s);
  s->chunk = 0;
  s->next = e->waiting;
  e->waiting = s;
  e->n_preemptions++;
  metric_add(e->mm.preemptions, 1);
  tn_log_debug("engine %s: preempted a sequence of %d tokens", e->name,
               s->n_tokens);
}

/* The newest admitted background sequence not planned in this step (the
 * first to go when live work needs room), or NULL. */
static struct seq *newest_bg(const struct tn_engine *e) {
  struct seq *victim = NULL;
  for (struct seq *v = e->admitted; v; v = v->next)
    if (seq_bg(v) && v->chunk == 0 && (!victim || v->order > victim->order))
      victim = v;
  return victim;
}

/* Makes room in s's block table for n more tokens, preempting background
 * sequences, then newer ones (planned for this step or not), if the pool
 * runs dry. false: nothing is left to preempt. */
static bool seq_reserve(struct tn_engine *e, struct seq *s, int32_t n,
                        int32_t *budget) {
  for (;;) {
    if (tn_kv_seq_reserve(e->kv, &s->kv, s->n_done + n) == TN_OK)
      return true;
    struct seq *victim = seq_bg(s) ? NULL : newest_bg(e);
    if (!victim)
      for (struct seq *v = e->admitted; v; v = v->next)
        if (v->order > s->order && (!victim || v->order > victim->order))
          victim = v;
    if (!victim) return false;
    *budget += victim->chunk;
    seq_preempt(e, victim);
  }
}

/* ---- the step */

/* Whether s may join the running batch under max_loras: its adapter is
 * already there, or fewer than max_loras distinct adapters are. The
 * waiting list stays FIFO (nobody overtakes a request held back), so a
 * request on a new adapter waits only until one adapter's sequences are
 * done. */
static bool lora_room(const struct tn_engine *e, const struct seq *s) {
  const struct tn_lora *l = s->req->priv->params.lora;
  if (!l || e->cfg.max_loras <= 0) return true;
  const struct tn_lora *seen[TN_ADAPTERS_PER_STEP_MAX];
  int n = 0;
  for (const struct seq *a = e->admitted; a; a = a->next) {
    const struct tn_lora *al = a->req->priv->params.lora;
    if (!al) continue;
    if (al == l) return true;
    bool dup = false;
    for (int i = 0; i < n && !dup; i++) dup = seen[i] == al;
    if (!dup && n < TN_ADAPTERS_PER_STEP_MAX) seen[n++] = al;
  }
  return n < e->cfg.max_loras;
}

static void batch_add(struct tn_engine *e, struct seq *s, int32_t n) {
  struct tn_batch *b = &e->batch;
  int32_t si = b->n_seqs++;
  b->seqs[si] = &s->kv;
  e->batch_seqs[si] = s;
  e->batch_lora[si] = s->req->priv->params.lora;
  e->batch_lora_scale[si] = s->req->priv->params.lora_scale;
  if (e->batch_lora[si]) b->lora = (const struct tn_lora *const *)e->batch_lora;
  for (int32_t i = 0; i < n; i++) {
    int32_t t = b->n_tokens++;
    b->token[t] = s->tokens[s->n_done + i];
    b->pos[t] = s->n_done + i;
    b->seq[t] = si;
    b->logits[t] = false;
    e->batch_hidden[t] = false;
  }
  s->chunk = n;
  enum tn_embed embed = s->req->priv->params.embed;
  if (embed != TN_EMBED_NONE) {
    /* an embedding: hidden states, never logits */
    s->wants_logits = false;
    b->hidden = e->batch_hidden;
    for (int32_t i = 0; i < n; i++)
      b->hidden[b->n_tokens - n + i] =
          embed == TN_EMBED_MEAN || s->n_done + i == s->n_tokens - 1;
    return;
  }
  s->wants_logits = s->n_done + n == s->n_tokens;
  /* the last token's logits, and each draft's row before it */
  if (s->wants_logits)
    for (int32_t i = 0; i <= s->n_draft; i++)
      b->logits[b->n_tokens - 1 - i] = true;
}

static void engine_take_inbox(struct tn_engine *e) {
  pthread_mutex_lock(&e->mu);
  struct tn_req *r = e->inbox_head;
  e->inbox_head = e->inbox_tail = NULL;
  pthread_mutex_unlock(&e->mu);
  while (r) {
    struct tn_req *next = r->priv->next_inbox;
    r->priv->next_inbox = NULL;
    r->priv->held0 = held_now(e);
    struct seq *s = seq_new(e, r, 0);
    if (!s) {
      tn_req_lock(r);
      snprintf(r->error, sizeof(r->error), "out of memory");
      for (int32_t i = 0; i < r->n_choices; i++)
        r->choices[i].finish = TN_FINISH_ERROR;
      req_mark_done(e, r);
      tn_req_unlock(r);
      req_touch(e, r);
      pthread_mutex_lock(&e->mu);
      e->n_waiting_total--;
      pthread_mutex_unlock(&e->mu);
    } else {
      r->priv->n_spawned = 1;
      r->priv->n_live = 1;
      list_append(&e->waiting, s);
    }
    /* The inbox held a reference for the engine; the sequence has its own. */
    req_unref(r);
    r = next;
  }
}

/* Children of an n > 1 request start once choice 0 has its prompt cached. */
static void spawn_children(struct tn_engine *e, struct tn_req *r) {
  struct tn_req_priv *p = r->priv;
  struct seq *first = NULL, **tailp = &first;
  while (p->n_spawned < r->n_choices) {
    struct seq *c = seq_new(e, r, p->n_spawned);
    tn_req_lock(r);
    p->n_spawned++;
    if (!c) {
      r->choices[p->n_spawned - 1].finish = TN_FINISH_ERROR;
      snprintf(r->error, sizeof(r->error), "out of memory");
      if (p->n_live == 0 && p->n_spawned == r->n_choices)
        req_mark_done(e, r);
      tn_req_unlock(r);
      req_touch(e, r);
      continue;
    }
    p->n_live++;
    tn_req_unlock(r);
    *tailp = c;
    tailp = &c->next;
  }
  /* Ahead of other waiting requests: they share the blocks just made. */
  *tailp = e->waiting;
  e->waiting = first;
}

static bool req_cancelled(const struct tn_engine *e, const struct seq *s) {
  return atomic_load(&e->cancel_all) || atomic_load(&s->req->priv->cancel);
}

static void drop_cancelled(struct tn_engine *e) {
  struct seq **lists[2] = {&e->admitted, &e->waiting};
  for (int l = 0; l < 2; l++) {
    struct seq **pp = lists[l];
    while (*pp) {
      struct seq *s = *pp;
      if (!req_cancelled(e, s)) {
        pp = &s->next;
        continue;
      }
      *pp = s->next;
      if (l == 0) e->n_admitted--;
      struct tn_req *r = s->req;
      struct tn_req_priv *p = r->priv;
      if (p->queued) {
        p->queued = false;
        pthread_mutex_lock(&e->mu);
        e->n_waiting_total--;
        pthread_mutex_unlock(&e->mu);
      }
      seq_finish(e, s, TN_FINISH_CANCELLED, NULL); /* and unspawned ones */
      seq_free(e, s);
    }
  }
}

/* Releases text the detokenizer made, holding back what might start a
 * stop string. Returns true when a stop string was hit. */
static bool seq_emit_text(struct tn_engine *e, struct seq *s, const char *t,
                          size_t n, bool stops_active) {
  struct tn_req *r = s->req;
  struct tn_req_priv *p = r->priv;
  struct tn_choice *c = &r->choices[s->choice];
  if (p->params.n_stops == 0) {
    tn_req_lock(r);
    choice_append(c, t, n);
    tn_req_unlock(r);
    return false;
  }
  if (!bytes_reserve(&s->held, &s->cap_held, s->n_held + n + 1)) return false;
  memcpy(s->held + s->n_held, t, n);
  s->n_held += n;
  /* Before min_tokens, stop strings don't count yet. */
  struct tn_stop_match m = {false, s->n_held};
  if (stops_active)
    m = tn_stop_scan(s->held, s->n_held, (const char *const *)p->stops,
                     (size_t)p->params.n_stops);
  tn_req_lock(r);
  choice_append(c, s->held, m.emit_len);
  tn_req_unlock(r);
  if (m.hit) {
    s->n_held = 0;
    s->stop_hit = true;
    return true;
  }
  memmove(s->held, s->held + m.emit_len, s->n_held - m.emit_len);
  s->n_held -= m.emit_len;
  return false;
}

enum mask_result {
  MASK_OK,
  MASK_END,   /* the grammar is complete and allows nothing more */
  MASK_ERROR, /* s->error says why */
};

/* Applies the grammar's token mask; MASK_END when no token is left and
 * the grammar may end there. */
static enum mask_result seq_grammar_mask(struct tn_engine *e, struct seq *s,
                                         float *logits) {
  struct tn_error err = {0};
  double t0 = tn_time_s();
  struct tn_grammar_vocab_stats before;
  tn_grammar_vocab_stats(e->gvocab, &before);
  if (tn_grammar_matcher_mask(s->gm, e->gmask, &err) != TN_OK) {
    snprintf(s->error, sizeof s->error, "%.199s", err.msg);
    return MASK_ERROR;
  }
  struct tn_grammar_vocab_stats after;
  tn_grammar_vocab_stats(e->gvocab, &after);
  double dt = tn_time_s() - t0;
  e->grammar_s += dt;
  e->n_grammar_masks++;
  metric_add(e->mm.grammar_masks, 1);
  metric_add(e->mm.grammar_s, dt);
  if (after.cache_hits > before.cache_hits) metric_add(e->mm.grammar_cached, 1);
  bool any = false;
  int32_t words = (e->n_vocab + 63) / 64;
  for (int32_t w = 0; w < words; w++) {
    uint64_t m = e->gmask[w];
    int32_t base = w * 64, n = TN_MIN(64, e->n_vocab - base);
    if (m == 0) { /* most words of a narrow mask */
      for (int32_t j = 0; j < n; j++) logits[base + j] = -INFINITY;
      continue;
    }
    for (uint64_t k = m; k && !any; k &= k - 1)
      any = logits[base + __builtin_ctzll(k)] > -INFINITY;
    if (m == UINT64_MAX) continue; /* most words of a wide one */
    for (uint64_t k = ~m; k; k &= k - 1) {
      int32_t j = __builtin_ctzll(k);
      if (j < n) logits[base + j] = -INFINITY;
    }
  }
  if (any) return MASK_OK;
  if (tn_grammar_matcher_can_end(s->gm)) return MASK_END;
  snprintf(s->error, sizeof s->error,
           "grammar: no token can continue the output here");
  return MASK_ERROR;
}

/* EOG tokens are masked under ignore_eos and before min_tokens; then the
 * grammar's mask, if any. */
static enum mask_result seq_mask(struct tn_engine *e, struct seq *s,
                                 float *logits) {
  const struct tn_gen_params *gp = &s->req->priv->params;
  if (gp->ignore_eos || s->n_gen < gp->min_tokens)
    for (int32_t i = 0; i < e->n_eog; i++) logits[e->eog[i]] = -INFINITY;
  return s->gm ? seq_grammar_mask(e, s, logits) : MASK_OK;
}

/* Appends a chosen token to s and its choice: logprobs, timing, text,
 * stop conditions. Returns the finish reason (NONE to go on). */
static enum tn_finish seq_take(struct tn_engine *e, struct seq *s,
                               const struct tn_sample_out *out, double now) {
  struct tn_req *r = s->req;
  struct tn_req_priv *p = r->priv;
  const struct tn_gen_params *gp = &p->params;
  bool early = s->n_gen < gp->min_tokens;
  if (s->gm && !tn_grammar_matcher_accept(s->gm, out->id)) {
    snprintf(s->error, sizeof s->error,
             "grammar: token %d does not continue the output", out->id);
    return TN_FINISH_ERROR;
  }
  if (!seq_push_token(s, out->id)) return TN_FINISH_ERROR;
  s->n_gen++;
  struct tn_choice *c = &r->choices[s->choice];
  tn_req_lock(r);
  c->n_gen = s->n_gen;
  if (gp->logprobs) {
    if (c->n_toks == c->cap_toks) {
      int32_t cap = c->cap_toks ? c->cap_toks * 2 : 16;
      struct tn_gen_token *nt =
          realloc(c->toks, (size_t)cap * sizeof(*nt));
      if (nt) {
        c->toks = nt;
        c->cap_toks = cap;
      }
    }
    if (c->n_toks < c->cap_toks) {
      struct tn_gen_token *g = &c->toks[c->n_toks++];
      g->id = out->id;
      g->logprob = out->logprob;
      g->n_top = out->n_top;
      memcpy(g->top, out->top, sizeof(g->top));
    }
  }
  bool first = r->t_first == 0;
  if (first) r->t_first = now;
  if (!first && s->t_last > 0) {
    double gap = now - s->t_last;
    r->itl_sum += gap;
    r->itl_n++;
    r->itl_hist[tn_lat_bucket(gap)]++;
    if (gap > r->itl_max) r->itl_max = gap;
  }
  tn_req_unlock(r);
  if (first) metric_observe(e->mm.ttft, now - r->t_submit);
  else if (s->t_last > 0) metric_observe(e->mm.itl, now - s->t_last);
  s->t_last = now;
  metric_add(e->mm.gen_total, 1);

  if (tn_tokenizer_is_eog(e->tok, out->id)) return TN_FINISH_STOP;
  if (s->opt_est) {
    char piece[256];
    size_t pn = tn_tokenizer_piece(e->tok, out->id, piece, sizeof piece,
                                   false);
    if (pn <= sizeof piece &&
        bytes_reserve(&s->otext, &s->cap_otext, s->n_otext + pn + 1)) {
      memcpy(s->otext + s->n_otext, piece, pn);
      s->n_otext += pn;
    }
  }
  size_t n = tn_detok_push(&s->detok, out->id, e->text_buf, e->text_cap);
  if (seq_emit_text(e, s, e->text_buf, n, !early)) return TN_FINISH_STOP;
  if (s->n_gen >= gp->max_tokens) return TN_FINISH_LENGTH;
  if (s->n_tokens >= e->n_ctx) return TN_FINISH_LENGTH;
  return TN_FINISH_NONE;
}

/* The tokens of text whose pieces spell text back exactly, or NULL: text
 * the grammar forces can start or end inside a UTF-8 character, which a
 * tokenizer may not encode byte for byte (it may write U+FFFD). */
static int32_t *encode_exact(const struct tn_engine *e, const char *text,
                             size_t n, size_t *n_ids) {
  int32_t *ids = NULL;
  struct tn_error err;
  *n_ids = 0;
  if (n == 0 || tn_tokenizer_encode(e->tok, text, n, false, false, &ids,
                                    n_ids, &err) != TN_OK)
    return NULL;
  size_t at = 0;
  char piece[256];
  for (size_t i = 0; i < *n_ids; i++) {
    size_t pn = tn_tokenizer_piece(e->tok, ids[i], piece, sizeof piece, false);
    if (pn > sizeof piece || at + pn > n || memcmp(text + at, piece, pn)) {
      free(ids);
      *n_ids = 0;
      return NULL;
    }
    at += pn;
  }
  if (at != n) {
    free(ids);
    *n_ids = 0;
    return NULL;
  }
  return ids;
}

/* Appends the tokens ids[0..n_ids) to s without forward passes (logprob
 * 0) and ends it: the rest a grammar forces, or of a decided option.
 * Takes ids. */
static enum tn_finish seq_take_text(struct tn_engine *e, struct seq *s,
                                    int32_t *ids, size_t n_ids, double now) {
  enum tn_finish f = TN_FINISH_NONE;
  for (size_t i = 0; i < n_ids && f == TN_FINISH_NONE; i++) {
    struct tn_sample_out out = {.id = ids[i]};
    f = seq_take(e, s, &out, now);
    e->n_grammar_forced++;
    metric_add(e->mm.grammar_forced, 1);
  }
  free(ids);
  return f == TN_FINISH_NONE ? TN_FINISH_STOP : f;
}

/* Early exit: once the grammar leaves one way to finish, the rest is
 * appended without forward passes (tokens the tokenizer gives for the
 * forced text, logprob 0) and the sequence ends; a grammar that allows
 * nothing more ends it at once, without a pass for the end token. Not
 * when logprobs were asked for (they would not be the model's) or when
 * the rest would pass max_tokens (the plain answer would be cut). */
static enum tn_finish seq_grammar_exit(struct tn_engine *e, struct seq *s,
                                       double now) {
  if (tn_grammar_matcher_done(s->gm)) return TN_FINISH_STOP;
  const struct tn_gen_params *gp = &s->req->priv->params;
  if (gp->logprobs) return TN_FINISH_NONE;
  char buf[512];
  bool completes = false;
  size_t n = tn_grammar_matcher_forced(s->gm, buf, sizeof buf, &completes);
  if (!completes || n == 0) return TN_FINISH_NONE;
  size_t n_ids = 0;
  int32_t *ids = encode_exact(e, buf, n, &n_ids);
  if (!ids) return TN_FINISH_NONE;
  if (s->n_gen + (int32_t)n_ids > gp->max_tokens ||
      s->n_tokens + (int32_t)n_ids > e->n_ctx) {
    free(ids);
    return TN_FINISH_NONE;
  }
  return seq_take_text(e, s, ids, n_ids, now);
}

/* seq_take, then the grammar's early exit. */
static enum tn_finish seq_take_token(struct tn_engine *e, struct seq *s,
                                     const struct tn_sample_out *out,
                                     double now) {
  enum tn_finish f = seq_take(e, s, out, now);
  if (f == TN_FINISH_NONE && s->gm) f = seq_grammar_exit(e, s, now);
  return f;
}

static enum tn_finish mask_finish(enum mask_result m) {
  return m == MASK_END ? TN_FINISH_STOP : TN_FINISH_ERROR;
}

/* Option probabilities (tn_gen_params.options) from this step's masked
 * logits: each allowed token's probability goes to the option it alone
 * leads to. Returns the option whose probability passed option_min_prob
 * (-1: none). *p_of receives the probability of each allowed token, for
 * the path's probability once one is sampled (ids[], probs[], *n). */
static int32_t seq_option_step(struct tn_engine *e, struct seq *s,
                               const float *logits, int32_t *ids,
                               float *probs, int32_t *n_out, int32_t cap) {
  const struct tn_gen_params *gp = &s->req->priv->params;
  int32_t words = (e->n_vocab + 63) / 64, n = 0;
  float mx = -INFINITY;
  for (int32_t w = 0; w < words; w++)
    for (uint64_t k = e->gmask[w]; k; k &= k - 1) {
      int32_t id = w * 64 + __builtin_ctzll(k);
      if (id < e->n_vocab && logits[id] > mx) mx = logits[id];
    }
  double sum = 0.0;
  for (int32_t w = 0; w < words; w++)
    for (uint64_t k = e->gmask[w]; k; k &= k - 1) {
      int32_t id = w * 64 + __builtin_ctzll(k);
      if (id >= e->n_vocab || !(logits[id] > -INFINITY)) continue;
      double p = exp((double)(logits[id] - mx));
      sum += p;
      if (n < cap) ids[n] = id, probs[n++] = (float)p;
    }
  *n_out = n;
  if (!(sum > 0.0) || n == cap) return -1; /* too many to follow */
  double dec[TN_GEN_OPTIONS_MAX] = {0};
  char piece[256];
  for (int32_t i = 0; i < n; i++) {
    probs[i] = (float)(probs[i] / sum);
    size_t pn = 0;
    bool eog = tn_tokenizer_is_eog(e->tok, ids[i]);
    if (!eog) pn = tn_tokenizer_piece(e->tok, ids[i], piece, sizeof piece,
                                      false);
    if (pn > sizeof piece) continue;
    int32_t hit = -1, hits = 0;
    for (int32_t o = 0; o < gp->n_options && hits < 2; o++) {
      size_t ol = gp->option_lens[o], tl = s->n_otext + pn;
      bool ok = eog ? ol == s->n_otext
                    : ol >= tl && memcmp(gp->options[o] + s->n_otext, piece,
                                         pn) == 0;
      if (ok && memcmp(gp->options[o], s->otext ? s->otext : "",
                       s->n_otext) == 0)
        hit = o, hits++;
    }
    if (hits == 1) dec[hit] += probs[i];
  }
  double path = exp(s->path_logp);
  int32_t best = -1;
  for (int32_t o = 0; o < gp->n_options; o++) {
    float p = (float)(path * dec[o]);
    if (p > s->opt_est[o]) s->opt_est[o] = p;
    if (gp->option_min_prob > 0.0f && p >= gp->option_min_prob &&
        (best < 0 || p > s->opt_est[best]))
      best = o;
  }
  return best;
}

/* Samples the next token of s from its logits row; returns the finish
 * reason (NONE to go on). */
static enum tn_finish seq_sample(struct tn_engine *e, struct seq *s,
                                 float *logits, double now) {
  enum mask_result m = seq_mask(e, s, logits);
  if (m != MASK_OK) return mask_finish(m);
  int32_t n_ids = 0;
  if (s->opt_est) {
    int32_t o = seq_option_step(e, s, logits, e->opt_ids, e->opt_probs,
                                &n_ids, OPTION_TOKENS_MAX);
    const struct tn_gen_params *gp = &s->req->priv->params;
    size_t rest = o >= 0 ? gp->option_lens[o] - s->n_otext : 0;
    size_t n_rest = 0;
    int32_t *ids = rest ? encode_exact(e, gp->options[o] + s->n_otext, rest,
                                       &n_rest)
                        : NULL;
    /* decided: its rest without passes (when it spells back exactly) */
    if (o >= 0 && (rest == 0 || ids))
      return seq_take_text(e, s, ids, n_rest, now);
    free(ids);
  }
  struct tn_sample_out out;
  tn_sampler_sample(s->sampler, logits, &out);
  for (int32_t i = 0; i < n_ids; i++)
    if (e->opt_ids[i] == out.id) {
      s->path_logp += log((double)TN_MAX(e->opt_probs[i], 1e-30f));
      break;
    }
  return seq_take_token(e, s, &out, now);
}

/* s's measured chance that a drafted token of its current proposal's
 * class is accepted, given the ones before it were: a copy the model is
 * following and a fresh lookup differ by far (on code edits ~0.95
 * against ~0.5), and one rate for both drafted too little of the first
 * and too much of the second. */
static double seq_alpha(const struct seq *s) {
  int32_t c = s->prop_class;
  return (s->acc_a[c] + 1.0) / (s->acc_a[c] + s->acc_r[c] + 2.0);
}

/* Verifies the k drafts that follow s's last token: rows[i] holds the
 * logits after drafts[0..i). Takes the accepted drafts and one token of
 * the model's (the correction of the first rejected draft, or a sample
 * after all k), stopping early if one of them ends the sequence. Sets
 * *accepted and returns the finish reason. */
static enum tn_finish seq_verify(struct tn_engine *e, struct seq *s,
                                 float *rows, int32_t k, double now,
                                 int32_t *accepted) {
  int32_t drafts[TN_SPEC_MAX_TOKENS];
  memcpy(drafts, s->tokens + s->n_tokens - k, (size_t)k * sizeof(int32_t));
  s->n_tokens -= k; /* the accepted ones come back through seq_take */
  *accepted = 0;
  enum tn_finish f = TN_FINISH_NONE;
  for (int32_t i = 0; i <= k; i++) {
    float *row = rows + (size_t)i * (size_t)e->n_vocab;
    enum mask_result m = seq_mask(e, s, row);
    if (m != MASK_OK) {
      f = mask_finish(m);
      break;
    }
    struct tn_sample_out out;
    bool ok = false;
    if (i < k)
      ok = tn_sampler_verify(s->sampler, row, drafts[i], NULL, &out);
    else
      tn_sampler_sample(s->sampler, row, &out);
    if (ok) (*accepted)++;
    f = seq_take_token(e, s, &out, now);
    if (f != TN_FINISH_NONE || !ok) break;
  }
  /* Accounting: per choice for usage, per position for the metrics. */
  struct tn_choice *c = &s->req->choices[s->choice];
  tn_req_lock(s->req);
  c->n_drafted += k;
  c->n_accepted += *accepted;
  tn_req_unlock(s->req);
  e->n_spec_drafts++;
  e->n_spec_drafted += (uint64_t)k;
  e->n_spec_accepted += (uint64_t)*accepted;
  metric_add(e->mm.spec_drafts, 1);
  metric_add(e->mm.spec_draft_tokens, k);
  metric_add(e->mm.spec_accepted, *accepted);
  for (int32_t i = 0; i < *accepted; i++) {
    metric_add(e->mm.spec_per_pos[i], 1);
    e->n_spec_accepted_pos[i]++;
  }
  /* Its acceptance rate, for planning its next drafts: each draft is a
   * run of accepted tokens ended by a rejection (or not). */
  int32_t cl = s->prop_class;
  s->acc_a[cl] = 0.9 * s->acc_a[cl] + *accepted;
  s->acc_r[cl] = 0.9 * s->acc_r[cl] + (*accepted < k ? 1.0 : 0.0);
  e->cls_a[cl] = 0.98 * e->cls_a[cl] + *accepted;
  e->cls_r[cl] = 0.98 * e->cls_r[cl] + (*accepted < k ? 1.0 : 0.0);
  return f;
}

/* The drafter's proposal for s, a decode holding its blocks for its next
 * token: up to max_tokens, within its max_tokens and the context. */
static int32_t seq_draft_room(const struct tn_engine *e, const struct seq *s) {
  const struct tn_gen_params *gp = &s->req->priv->params;
  if (!gp->speculative || s->opt_est) return 0;
  int32_t k = e->cfg.spec.method != TN_SPEC_OFF ? e->cfg.spec.max_tokens
                                                : GRAMMAR_DRAFT_MAX;
  k = TN_MIN(k, gp->max_tokens - s->n_gen - 1);
  k = TN_MIN(k, e->n_ctx - s->n_tokens - 1);
  return TN_MAX(k, 0);
}

/* Drafts from the grammar: the text every continuation starts with (the
 * next fixed key of a schema, the rest of a decided choice), as the
 * tokenizer spells it. Verified like any draft, so the output stays what
 * plain decoding gives; accepted, it skips the steps jump-forward would. */
static int32_t seq_propose_forced(struct tn_engine *e, struct seq *s,
                                  int32_t k) {
  char buf[256];
  bool completes;
  size_t n = tn_grammar_matcher_forced(s->gm, buf, sizeof buf, &completes);
  if (n == 0) return 0;
  size_t n_ids = 0;
  int32_t *ids = encode_exact(e, buf, n, &n_ids);
  if (!ids) return 0;
  /* the last token may merge with what follows the forced text (`"`
   * then `:` is one token `":`), so it is left to the model */
  if (!completes && n_ids > 0) n_ids--;
  int32_t got = (int32_t)TN_MIN(n_ids, (size_t)k);
  if (got > 0) memcpy(s->prop, ids, (size_t)got * sizeof(int32_t));
  free(ids);
  return got;
}

static void seq_propose(struct tn_engine *e, struct seq *s) {
  const struct tn_spec_config *sc = &e->cfg.spec;
  s->n_prop = 0;
  s->prop_forced = false;
  s->prop_class = 0;
  int32_t k = seq_draft_room(e, s);
  /* the n-gram drafter learns from every step, drafting or not */
  if (sc->method == TN_SPEC_NGRAM && (k <= 0 || e->spec_paused) && !s->gm)
    tn_spec_ngram_edit(&s->ngram, s->tokens, s->n_tokens, sc->ngram_min,
                       sc->ngram_max, 0, s->prop);
  if (k <= 0) return;
  int32_t got = 0;
  if (s->gm && (got = seq_propose_forced(e, s, k)) > 0) {
    s->prop_forced = true;
    s->n_prop = got;
    return;
  }
  if (e->spec_paused) return;
  if (sc->method == TN_SPEC_NGRAM)
    got = tn_spec_ngram_edit(&s->ngram, s->tokens, s->n_tokens,
                             sc->ngram_min, sc->ngram_max, k, s->prop);
  else if (sc->method == TN_SPEC_CUSTOM && sc->propose)
    got = sc->propose(sc->propose_user, s->req, s->choice, s->tokens,
                      s->n_tokens, s->req->priv->n_prompt, k, s->prop);
  got = TN_MAX(0, TN_MIN(got, k));
  for (int32_t i = 0; i < got; i++)
    if (s->prop[i] < 0 || s->prop[i] >= e->n_vocab) got = i;
  s->n_prop = got;
  s->prop_class =
      sc->method == TN_SPEC_NGRAM && tn_spec_ngram_edit_follows(&s->ngram);
}

/* Steps after which a sequence the cost rule kept from drafting may try
 * one token again, to learn whether its drafts got better. */
#define SPEC_PROBE_STEPS 32

/* A probe may spend on catching up what this many plain steps take. */
#define PROBE_STEPS_WORTH 4

/* Whether drafting cap tokens per step for s earns back the draft model's
 * catch-up on the history its cache lacks (a prompt it has never seen,
 * or what came since it last drafted): the saving per step (expected
 * accepted drafts times a plain step, less the draft passes and verify
 * slots they cost) times the steps left (up to max_tokens, counted to
 * 256 at most) must exceed the catch-up's time, estimated from the
 * target's per-token cost scaled by the draft's pass / the target's. */
static bool catchup_pays(const struct tn_engine *e, const struct seq *s,
                         double alpha, int32_t cap, bool probe) {
  /* self-drafting reads the target's own cache: nothing to catch up */
  if (tn_drafter_is_self(e->drafter)) return true;
  int32_t lag = s->n_tokens - s->draft.n_done;
  double tp = tn_drafter_pass_seconds(e->drafter);
  double t1 = tn_spec_cost_time(&e->cost, 1);
  if (lag <= 2 || tp <= 0.0 || t1 <= 0.0) return true;
  /* a probe only asks that its catch-up cost a few plain steps at most */
  if (probe) return lag * e->cost.b * tp / t1 <= PROBE_STEPS_WORTH * t1;
  double g = 1.0, gsum = 0.0;
  for (int32_t j = 0; j < cap; j++) gsum += (g *= alpha);
  double save = gsum * t1 - cap * (tp + e->cost.b);
  int32_t left = TN_MIN(s->req->priv->params.max_tokens - s->n_gen, 256);
  double steps = left / (1.0 + gsum);
  double catchup = lag * e->cost.b * tp / t1;
  return save * steps > catchup;
}

/* The draft model's proposals for every decoding sequence, in one batch
 * per draft position (draft.c). */
static void draft_all(struct tn_engine *e, int32_t n_out, double t_step) {
  /* One more draft token is worth a pass of the draft model (shared by
   * those drafting) and a verify slot when the chance it is accepted,
   * times the output per second the step gives (G / T), beats its time. */
  if (e->spec_paused) return;
  int32_t n_cand = 0;
  for (struct seq *s = e->admitted; s; s = s->next)
    if (s->decode && s->chunk == 1 && seq_draft_room(e, s) > 0) n_cand++;
  if (n_cand == 0) return;
  float cum_min = 0.0f;
  if (!e->cfg.spec.every_draft)
    cum_min = (float)((tn_drafter_pass_seconds(e->drafter) / n_cand +
                       e->cost.b) *
                      (double)n_out / TN_MAX(t_step, 1e-6));
  /* Probes share a step: a draft pass costs about the same for one
   * sequence as for all, so sequences that wait for a probe take it
   * together, every SPEC_PROBE_STEPS steps. */
  bool probe_step = e->n_steps % SPEC_PROBE_STEPS == 0;
  int32_t n = 0;
  for (struct seq *s = e->admitted; s; s = s->next) {
    if (!s->decode || s->chunk != 1 || s->prop_forced) continue;
    int32_t k = seq_draft_room(e, s);
    if (k <= 0) continue;
    if (cum_min > 0.0f) {
      /* as many as its acceptance so far says will pay (none: it waits
       * for a probe, and its draft cache catches up when it drafts) */
      double alpha = seq_alpha(s), g = 1.0;
      int32_t cap = 0;
      while (cap < k && (g *= alpha) >= cum_min) cap++;
      bool probe = false;
      if (cap == 0 && ++s->since_draft >= SPEC_PROBE_STEPS && probe_step) {
        cap = 1;
        probe = true;
      }
      if (cap == 0 || !catchup_pays(e, s, alpha, cap, probe)) {
        metric_add(e->mm.spec_declined, 1);
        e->n_spec_declined++;
        /* not drafting: its draft cache goes back when the pool runs
         * low (a long-idle cache is worth less than a fresh one) */
        if (tn_drafter_kv_low(e->drafter))
          tn_draft_seq_drop(e->drafter, &s->draft);
        continue;
      }
      k = cap;
    }
    const struct tn_gen_params *gp = &s->req->priv->params;
    /* draft i is token n_gen + i: masked while that is below min_tokens */
    int32_t masked = gp->ignore_eos ? k : gp->min_tokens - s->n_gen;
    e->dreqs[n++] = (struct tn_draft_req){.ds = &s->draft,
                                          .tokens = s->tokens,
                                          .n_tokens = s->n_tokens,
                                          .k = k,
                                          .n_masked = TN_MAX(masked, 0),
                                          .out = s->prop,
                                          .tkv = &s->kv,
                                          .lora = gp->lora,
                                          .lora_scale = gp->lora_scale};
  }
  if (n == 0) return;
  double t0 = tn_time_s();
  tn_drafter_propose(e->drafter, e->dreqs, n, e->n_vocab, cum_min);
  double dt = tn_time_s() - t0;
  metric_add(e->mm.spec_draft_s, dt);
  int32_t i = 0;
  for (struct seq *s = e->admitted; s && i < n; s = s->next)
    if (&s->draft == e->dreqs[i].ds) {
      s->n_prop = e->dreqs[i++].got;
      s->compute_s += dt / n; /* the draft passes, shared alike */
    }
}

/* Chooses which proposed tokens ride this step, best expected gain first
 * (a draft token's gain is the chance that it and those before it are all
 * accepted: alpha^j), as long as each buys more output than the time it
 * adds (see tn_spec_cost), within the budget and the free KV blocks; then
 * appends them to their sequences. */
/* The first chunk, of at most cap tokens, that the waiting request at the
 * head of the queue would take if admitted this step (0 when none can
 * be): drafts leave it its place. */
static int32_t waiting_chunk(const struct tn_engine *e, int32_t cap) {
  if (!e->waiting || e->n_admitted >= e->cfg.max_seqs || cap <= 0) return 0;
  return TN_MIN(cap, e->waiting->n_tokens - e->waiting->n_done);
}

/* room: the tokens drafts may add (the step's slowdown room left). */
static void plan_drafts(struct tn_engine *e, int32_t *budget, int32_t room) {
  int32_t n_tokens = 0, n_out = 0, n_dec = 0;

  double t_prop = tn_time_s();
  for (struct seq *s = e->admitted; s; s = s->next) {
    n_tokens += s->chunk;
    if (s->chunk > 0 && s->n_done + s->chunk == s->n_tokens) n_out++;
    if (s->decode && s->chunk == 1) n_dec++;
    s->n_draft = 0;
    s->n_prop = 0;
    s->prop_forced = false;
    if (s->decode && s->chunk == 1 && (!e->drafter || s->gm))
      seq_propose(e, s);
  }
  /* With a drafter (passes of a fixed cost), a drafted token is valued at
   * what it saves, a sequence's share of a decode-only step: a prompt
   * chunk riding this step made drafts look cheap, and at 16 users
   * self-drafting ran at 0.84x plain. Free proposals (n-gram) keep the
   * whole step's rate, which measured better for them. */
  if (e->drafter) {
    n_out = n_dec;
    n_tokens = n_dec;
    draft_all(e, n_out, tn_spec_cost_time(&e->cost, n_tokens));
  } else {
    metric_add(e->mm.spec_draft_s, tn_time_s() - t_prop);
  }
  double G = n_out, T = tn_spec_cost_time(&e->cost, n_tokens);
  double bc = e->cost.b;
  /* free blocks only: a cached prefix block is worth more than a draft */
  int32_t blocks = tn_kv_n_free(e->kv);
  /* a waiting request that could be admitted keeps its first chunk's
   * budget: drafts must not delay prompts */
  int32_t keep = waiting_chunk(e, *budget);
  int32_t draft_budget = TN_MIN(*budget - keep, room);
  int32_t proposed = 0, taken = 0;
  for (struct seq *s = e->admitted; s; s = s->next) proposed += s->n_prop;
  for (;;) {
    /* the best next token: the one whose gain is highest */
    struct seq *best = NULL;
    double best_g = 0.0;
    for (struct seq *s = e->admitted; s; s = s->next) {
      if (s->n_draft >= s->n_prop) continue;
      double g = pow(seq_alpha(s), s->n_draft + 1);
      /* a sequence kept from drafting for long gets one probe token;
       * forced text is as good as certain */
      if (s->n_draft == 0 && s->since_draft >= SPEC_PROBE_STEPS) g = 1.0;
      if (s->prop_forced) g = 1.0;
      if (g > best_g) {
        best_g = g;
        best = s;
      }
    }
    if (!best || draft_budget <= 0) break;
    if (e->cfg.spec.method == TN_SPEC_OFF && taken >= GRAMMAR_DRAFT_ROWS)
      break;
    bool probe = best->n_draft == 0 && best->since_draft >= SPEC_PROBE_STEPS;
    /* without a calibrated cost model forced text rides free */
    bool free_pass = best->prop_forced && !e->cost_ok;
    if (!e->cfg.spec.every_draft && !probe && !free_pass &&
        best_g * T <= bc * G)
      break;
    /* its KV: a new block when the token starts one */
    int32_t pos = best->n_done + 1 + best->n_draft;
    bool new_block = pos >= best->kv.n_blocks * BLOCK_SIZE;
    if (new_block && blocks == 0) {
      best->n_prop = best->n_draft; /* nothing more for it */
      continue;
    }
    if (new_block) {
      if (tn_kv_seq_reserve(e->kv, &best->kv, pos + 1) != TN_OK) {
        best->n_prop = best->n_draft;
        continue;
      }
      blocks--;
    }
    if (!seq_push_token(best, best->prop[best->n_draft])) {
      best->n_prop = best->n_draft;
      continue;
    }
    best->n_draft++;
    best->chunk++;
    (*budget)--;
    draft_budget--;
    taken++;
    G += best_g;
    T += bc;
  }
  /* steps a sequence proposed but was kept from drafting */
  for (struct seq *s = e->admitted; s; s = s->next)
    if (s->decode && s->n_prop > 0)
      s->since_draft = s->n_draft > 0 ? 0 : s->since_draft + 1;
  if (proposed > taken) {
    e->n_spec_skipped += (uint64_t)(proposed - taken);
    metric_add(e->mm.spec_skipped, proposed - taken);
  }
}

static void update_gauges(struct tn_engine *e) {
  int32_t n_blocks = tn_kv_n_blocks(e->kv);
  int32_t used = n_blocks - tn_kv_available(e->kv);
  int32_t running = 0;
  for (struct seq *s = e->admitted; s; s = s->next)
    if (s->choice == 0) running++;
  pthread_mutex_lock(&e->mu);
  e->stats.running = running;
  e->stats.waiting = e->n_waiting_total;
  e->stats.kv_blocks_total = n_blocks;
  e->stats.kv_blocks_used = used;
  e->stats.kv_blocks_cached = tn_kv_n_cached(e->kv);
  e->stats.steps = e->n_steps;
  e->stats.preemptions = e->n_preemptions;
  e->stats.prefix_queries = e->n_prefix_queries;
  e->stats.prefix_hits = e->n_prefix_hits;
  e->stats.spec_drafts = e->n_spec_drafts;
  e->stats.spec_drafted = e->n_spec_drafted;
  e->stats.spec_accepted = e->n_spec_accepted;
  e->stats.spec_declined = e->n_spec_declined;
  e->stats.s_per_prompt_token = e->s_prompt_tok;
  e->stats.s_per_gen_token = e->s_gen_tok;
  e->stats.spec_paused_steps = e->n_spec_paused_steps;
  e->stats.spec_switched_off = e->sw.n_off;
  e->stats.spec_paused = e->sw_used && e->sw.off;
  e->stats.grammar_masks = e->n_grammar_masks;
  e->stats.grammar_forced = e->n_grammar_forced;
  e->stats.grammar_seconds = e->grammar_s;
  memcpy(e->stats.spec_accepted_pos, e->n_spec_accepted_pos,
         sizeof(e->stats.spec_accepted_pos));
  metric_set(e->mm.waiting, e->n_waiting_total);
  pthread_mutex_unlock(&e->mu);
  metric_set(e->mm.running, running);
  metric_set(e->mm.kv_used, used);
  metric_set(e->mm.kv_free, n_blocks - used);
}

/* Tells the on_step observer what this step runs. */
static void step_trace(struct tn_engine *e) {
  const struct tn_batch *b = &e->batch;
  int32_t n_waiting = 0;
  for (struct seq *s = e->waiting; s; s = s->next) n_waiting++;
  for (int32_t si = 0; si < b->n_seqs; si++) {
    const struct seq *s = e->batch_seqs[si];
    e->trace[si] = (struct tn_step_entry){
        .req = s->req,
        .choice = s->choice,
        .pos = s->n_done,
        .n_tokens = s->chunk,
        .n_draft = s->n_draft,
        .decode = s->decode,
    };
  }
  struct tn_step_trace t = {
      .step = e->n_steps,
      .n_entries = b->n_seqs,
      .entries = e->trace,
      .n_tokens = b->n_tokens,
      .n_waiting = n_waiting,
      .preemptions = e->n_preemptions,
      .kv_blocks_available = tn_kv_available(e->kv),
  };
  e->cfg.on_step(e->cfg.on_step_user, &t);
}

/* Prompt tokens not yet run: admitted sequences still in their prompt
 * and the waiting ones (before any prefix hit). */
static int64_t prompt_backlog(const struct tn_engine *e) {
  int64_t n = 0;
  for (const struct seq *s = e->admitted; s; s = s->next)
    if (s->n_tokens - s->n_done > 1 || s->n_gen == 0)
      n += s->n_tokens - s->n_done;
  for (const struct seq *s = e->waiting; s; s = s->next)
    n += s->n_tokens - s->n_done;
  return n;
}

/* Tokens a step carrying n_dec decodes may add and stay within
 * decode_slowdown times the decodes' own step (cost model); INT32_MAX
 * when nothing limits it. */
static int32_t slowdown_room(const struct tn_engine *e, int32_t n_dec) {
  double f = e->cfg.decode_slowdown, b = e->cost.b;
  if (n_dec == 0 || f <= 0.0 || !e->cost_ok || !(b > 1e-9)) return INT32_MAX;
  double extra = (f - 1.0) * tn_spec_cost_time(&e->cost, n_dec) / b;
  return (int32_t)TN_MIN(extra, (double)e->cfg.step_tokens);
}

/* Prompt tokens a step carrying n_dec decodes may add: the slowdown room,
 * at least a block, so prompts still advance; no limit without decodes.
 * With prompt_spread, only the backlog's share for one step of that many
 * (at least a block): under steady traffic each step then carries about
 * what arrives per step, instead of every other step carrying the cap
 * and the steps between none (streams see the long steps as their tail
 * inter-token latency). */
static int32_t prompt_cap(const struct tn_engine *e, int32_t n_dec) {
  int32_t room = slowdown_room(e, n_dec);
  if (room == INT32_MAX) return INT32_MAX;
  double extra = room;
  if (e->cfg.prompt_spread > 0) {
    int64_t h = e->cfg.prompt_spread;
    extra = TN_MIN(extra, (double)((prompt_backlog(e) + h - 1) / h));
  }
  return (int32_t)TN_MAX(extra, (double)BLOCK_SIZE);
}

/* One scheduling step; false when there was nothing to do. */
/* An embedding's chunk ran: its tokens' hidden states (at the batch rows
 * of this sequence) join the sum; true when the prompt is done and
 * req->embedding is filled. */
static bool seq_embed(struct tn_engine *e, struct seq *s, int32_t n_done,
                      int32_t chunk, const float *hidden) {
  struct tn_batch *b = &e->batch;
  int32_t d = e->model->hp.n_embd;
  if (!s->embd_acc && !(s->embd_acc = calloc((size_t)d, sizeof(double)))) {
    snprintf(s->error, sizeof s->error, "out of memory");
    return true;
  }
  if (n_done == 0) memset(s->embd_acc, 0, (size_t)d * sizeof(double));
  /* this sequence's rows: batch_add put them together */
  int32_t first = -1;
  for (int32_t t = 0; t < b->n_tokens && first < 0; t++)
    if (b->seqs[b->seq[t]] == &s->kv) first = t;
  for (int32_t i = 0; i < chunk; i++) {
    int32_t t = first + i;
    if (!b->hidden || !b->hidden[t]) continue;
    const float *h = hidden + (size_t)t * (size_t)d;
    for (int32_t j = 0; j < d; j++) s->embd_acc[j] += h[j];
  }
  s->n_done = n_done + chunk;
  s->kv.n_tokens = s->n_done;
  seq_index_blocks(e, s);
  if (s->n_done < s->n_tokens) return false;
  struct tn_req *r = s->req;
  float *out = malloc((size_t)d * sizeof(float));
  double div = r->priv->params.embed == TN_EMBED_MEAN ? (double)s->n_tokens
                                                      : 1.0;
  if (out)
    for (int32_t j = 0; j < d; j++) out[j] = (float)(s->embd_acc[j] / div);
  tn_req_lock(r);
  r->embedding = out;
  r->n_embd = out ? d : 0;
  tn_req_unlock(r);
  if (!out) snprintf(s->error, sizeof s->error, "out of memory");
  return true;
}

/* Shares a forward pass's time among the sequences it ran, as the cost
 * model prices them: the fixed part a split evenly, b per token (by token
 * count alone while the model is not calibrated); the shares add up to
 * the measured time. */
static void share_step(struct tn_engine *e, double dt) {
  const struct tn_batch *b = &e->batch;
  bool model = e->cost_ok && e->cost.a > 0.0 && e->cost.b > 0.0;
  double fixed = model ? e->cost.a / b->n_seqs : 0.0;
  double per = model ? e->cost.b : 1.0, sum = 0.0;
  for (int32_t si = 0; si < b->n_seqs; si++)
    sum += fixed + per * e->batch_seqs[si]->chunk;
  if (!(sum > 0.0)) return;
  double ps = 0.0, gs = 0.0;
  int32_t pn = 0, gn = 0;
  for (int32_t si = 0; si < b->n_seqs; si++) {
    struct seq *s = e->batch_seqs[si];
    double share = dt * (fixed + per * s->chunk) / sum;
    s->compute_s += share;
    if (s->decode) {
      gs += share;
      gn += 1; /* drafts ride along: one step, one token at least */
    } else {
      ps += share;
      pn += s->chunk;
    }
  }
  /* what a token has cost lately, for budget estimates */
  if (pn > 0)
    e->s_prompt_tok = e->s_prompt_tok > 0.0
                          ? 0.9 * e->s_prompt_tok + 0.1 * ps / pn
                          : ps / pn;
  if (gn > 0)
    e->s_gen_tok = e->s_gen_tok > 0.0 ? 0.9 * e->s_gen_tok + 0.1 * gs / gn
                                      : gs / gn;
}

/* The adaptive switch's score of a step with decodes (see tn_spec_switch):
 * the work done (decode outputs and prompt tokens) per planned token,
 * times the modelled plain step for those tokens over the time taken. */
static void switch_observe(struct tn_engine *e, int32_t n_dec, int32_t n_out,
                           int32_t n_prompt, double t_step) {
  if (e->spec_paused) {
    metric_add(e->mm.spec_paused_steps, 1);
    e->n_spec_paused_steps++;
  }
  int32_t n = n_dec + n_prompt;
  double score = (double)(n_out + n_prompt) / n *
                 tn_spec_cost_time(&e->cost, n) / TN_MAX(t_step, 1e-6);
  int r = tn_spec_switch_observe(&e->sw, score);
  if (r == 0) return;
  tn_log_info("engine %s: speculation switched %s: measured steps give %.3f "
              "plain-step outputs per sequence with it, %.3f without",
              e->name, r < 0 ? "off" : "back on", e->sw.mean[1],
              e->sw.mean[0]);
  metric_set(e->mm.spec_paused, r < 0);
}

static bool engine_step(struct tn_engine *e) {
  double t_step = tn_time_s();
  e->spec_paused = e->sw_used && !tn_spec_switch_on(&e->sw);
  drop_cancelled(e);
  struct tn_batch *b = &e->batch;
  b->n_tokens = 0;
  b->n_seqs = 0;
  b->lora = NULL; /* (set by batch_add when a sequence has an adapter) */
  b->hidden = NULL; /* (set by batch_add for an embedding) */
  int32_t budget = e->cfg.step_tokens;

  /* Plan the step. Decodes first, oldest first; then prompt chunks of
   * admitted sequences; then new admissions. A sequence short of blocks
   * preempts background sequences, then the newest ones; when it is the
   * newest, it goes itself. Background sequences sit out every step while
   * any live request is outstanding on the pool (hold); a step of theirs
   * alone is kept short. */
  bool hold = tn_pool_live(e->pool) > 0, any_bg = false, any_live = false;
  for (struct seq *s = e->admitted; s; s = s->next) {
    s->chunk = 0;
    s->n_draft = 0;
    s->decode = false;
    any_bg |= seq_bg(s);
    any_live |= !seq_bg(s);
  }
  for (struct seq *s = e->waiting; s; s = s->next) {
    any_bg |= seq_bg(s);
    any_live |= !seq_bg(s);
  }
  e->only_held = hold && any_bg && !any_live;
  if (hold && any_bg) {
    if (e->hold_since <= 0) e->hold_since = tn_time_s();
  } else if (e->hold_since > 0) {
    e->held_total += tn_time_s() - e->hold_since;
    e->hold_since = 0;
  }
  if (any_bg && !hold) budget = TN_MIN(budget, TN_BACKGROUND_STEP_TOKENS);
  int32_t n_dec = 0, prompt_left = INT32_MAX, n_prompt = 0;
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 1) prompt_left = prompt_cap(e, n_dec);
    for (struct seq *s = e->admitted, *next; s; s = next) {
      int32_t pending = s->n_tokens - s->n_done;
      bool decode = pending == 1 && s->n_gen > 0;
      if (decode != (pass == 0) || budget <= 0 ||
          (!decode && prompt_left <= 0) || (hold && seq_bg(s))) {
        next = s->next;
        continue;
      }
      int32_t n = TN_MIN(pending, decode ? budget
                                         : TN_MIN(budget, prompt_left));
      if (!seq_reserve(e, s, n, &budget)) {
        next = s->next;
        seq_preempt(e, s);
        continue;
      }
      next = s->next; /* newer ones may have been preempted */
      s->chunk = n;
      s->decode = decode;
      budget -= n;
      n_dec += decode;
      if (!decode) prompt_left -= n, n_prompt += n;
    }
  }
  /* Drafts for the decodes, from what budget and free blocks are left
   * once every planned token has its place. */
  bool grammar = false;
  for (struct seq *s = e->admitted; s && !grammar; s = s->next)
    grammar = s->gm != NULL;
  if (e->cfg.spec.method != TN_SPEC_OFF || grammar) {
    /* With other streams in the step, drafts stay within the slowdown
     * room the prompt chunks (and a waiting request's first one) left:
     * one sequence's drafts must not lengthen everyone's step beyond
     * what a prompt chunk may (the streams' tail inter-token latency).
     * A lone decode drafts as far as the cost model says it pays, and
     * --spec-policy all verifies every proposal. */
    int32_t room = n_dec >= 2 && !e->cfg.spec.every_draft
                       ? slowdown_room(e, n_dec)
                       : INT32_MAX;
    if (room != INT32_MAX)
      room = TN_MAX(room - n_prompt - waiting_chunk(e, prompt_left), 0);
    plan_drafts(e, &budget, room);
  }
  for (struct seq *s = e->admitted; s; s = s->next)
    if (s->chunk > 0) batch_add(e, s, s->chunk);
  /* Admit waiting sequences while there is budget, room and blocks, in
   * order (held background ones stay where they are). A live one short
   * of a slot or of blocks takes them from background sequences. */
  for (;;) {
    struct seq **link = &e->waiting;
    while (*link && hold && seq_bg(*link)) link = &(*link)->next;
    struct seq *s = *link;
    if (!s || budget <= 0 || prompt_left <= 0 || !lora_room(e, s)) break;
    if (e->n_admitted >= e->cfg.max_seqs) {
      struct seq *v = seq_bg(s) ? NULL : newest_bg(e);
      if (!v) break;
      seq_preempt(e, v);
      continue; /* (v went to the front of the waiting list) */
    }
    seq_prefix_lookup(e, s);
    int32_t n = TN_MIN(s->n_tokens - s->n_done, TN_MIN(budget, prompt_left));
    /* Check first: a reserve that fails half-way would have evicted
     * cached prefix blocks for nothing. */
    int32_t need = (s->n_done + n + BLOCK_SIZE - 1) / BLOCK_SIZE - s->kv.n_blocks;
    if (need > tn_kv_available(e->kv) ||
        tn_kv_seq_reserve(e->kv, &s->kv, s->n_done + n) != TN_OK) {
      /* Not now: give back what it took (the cached prefix stays cached). */
      tn_kv_seq_deinit(e->kv, &s->kv);
      tn_kv_seq_init(&s->kv);
      s->n_done = 0;
      struct seq *v = seq_bg(s) ? NULL : newest_bg(e);
      if (!v) break;
      seq_preempt(e, v);
      continue;
    }
    *link = s->next;
    s->next = NULL;
    s->order = e->next_order++;
    list_append(&e->admitted, s);
    e->n_admitted++;
    struct tn_req_priv *p = s->req->priv;
    if (p->queued) {
      p->queued = false;
      double t = tn_time_s();
      tn_req_lock(s->req);
      s->req->t_start = t;
      tn_req_unlock(s->req);
      metric_observe(e->mm.queue, t - s->req->t_submit);
      pthread_mutex_lock(&e->mu);
      e->n_waiting_total--;
      pthread_mutex_unlock(&e->mu);
    }
    metric_add(e->mm.prefix_queries, s->n_tokens);
    metric_add(e->mm.prefix_hits, s->n_done);
    e->n_prefix_queries += (uint64_t)s->n_tokens;
    e->n_prefix_hits += (uint64_t)s->n_done;
    /* usage's cached_tokens: what the first admission found, not what a
     * recompute after preemption finds of its own blocks */
    if (s->choice == 0 && s->n_gen == 0 && !s->cached_reported) {
      s->cached_reported = true;
      tn_req_lock(s->req);
      s->req->n_cached = s->n_done;
      tn_req_unlock(s->req);
    }
    s->decode = false;
    batch_add(e, s, n);
    budget -= n;
    prompt_left -= n;
  }
  if (b->n_tokens == 0) {
    update_gauges(e);
    return false;
  }
  if (e->cfg.on_step) step_trace(e);

  struct tn_error err = {0};
  double t_fwd = tn_time_s();
  enum tn_status st = tn_model_forward(e->ctx, e->kv, b, &err);
  double now = tn_time_s();
  if (st == TN_OK && cost_model_used(e))
    tn_spec_cost_observe(&e->cost, b->n_tokens, now - t_fwd);
  if (e->cfg.spec.method != TN_SPEC_OFF && st == TN_OK) {
    bool verified = false;
    for (int32_t si = 0; si < b->n_seqs && !verified; si++)
      verified = e->batch_seqs[si]->n_draft > 0;
    if (verified) metric_add(e->mm.spec_verify_s, now - t_fwd);
  }
  if (st == TN_OK) share_step(e, now - t_fwd);
  const float *logits = tn_ctx_logits(e->ctx);
  int32_t row = 0, n_dec_out = 0, n_dec_seqs = 0, n_prompt_tok = 0;
  for (int32_t si = 0; si < b->n_seqs; si++) {
    struct seq *s = e->batch_seqs[si];
    if (st != TN_OK) {
      list_remove(&e->admitted, s);
      e->n_admitted--;
      seq_finish(e, s, TN_FINISH_ERROR, err.msg);
      seq_free(e, s);
      continue;
    }
    int32_t k = s->n_draft, n_done = s->n_done, chunk = s->chunk;
    s->n_draft = 0;
    s->chunk = 0;
    if (s->n_gen == 0 && s->choice == 0 && chunk > 0)
      req_chunk(s->req, t_fwd, now, chunk);
    if (s->req->priv->params.embed != TN_EMBED_NONE) {
      if (seq_embed(e, s, n_done, chunk, tn_ctx_hidden(e->ctx))) {
        list_remove(&e->admitted, s);
        e->n_admitted--;
        seq_finish(e, s, s->error[0] ? TN_FINISH_ERROR : TN_FINISH_STOP,
                   s->error[0] ? s->error : NULL);
        seq_free(e, s);
      }
      continue;
    }
    if (!s->wants_logits) {
      n_prompt_tok += chunk;
      s->n_done = n_done + chunk;
      s->kv.n_tokens = s->n_done;
      seq_index_blocks(e, s);
      continue;
    }
    float *row_logits = (float *)logits + (size_t)row * (size_t)e->n_vocab;
    row += 1 + k;
    struct tn_req *r = s->req;
    bool was_prompt = s->n_gen == 0;
    enum tn_finish f;
    int32_t accepted = 0;
    /* The cache holds what ran, but of the drafts only the accepted. */
    s->n_done = n_done + chunk - k;
    s->kv.n_tokens = s->n_done;
    if (k > 0) {
      f = seq_verify(e, s, row_logits, k, now, &accepted);
      s->n_done += accepted;
      s->kv.n_tokens = s->n_done;
      /* blocks that only rejected drafts used go back to the pool */
      if (f == TN_FINISH_NONE) tn_kv_seq_truncate(e->kv, &s->kv, s->n_tokens);
      s->kv.n_tokens = s->n_done;
    } else {
      f = seq_sample(e, s, row_logits, now);
    }
    if (was_prompt) n_prompt_tok += chunk;
    if (!was_prompt) {
      n_dec_seqs++;
      n_dec_out += 1 + accepted;
    }
    /* a running sequence has exactly its last token pending */
    TN_ASSERT(f != TN_FINISH_NONE || s->n_done + 1 == s->n_tokens);
    seq_index_blocks(e, s);
    req_touch(e, r);
    if (was_prompt && s->choice == 0 && r->n_choices > 1)
      spawn_children(e, r);
    if (f != TN_FINISH_NONE) {
      list_remove(&e->admitted, s);
      e->n_admitted--;
      seq_finish(e, s, f,
                 f != TN_FINISH_ERROR ? NULL
                 : s->error[0]        ? s->error
                                      : "out of memory");
      seq_free(e, s);
    }
  }
  if (st != TN_OK) tn_log_error("engine %s: forward: %s", e->name, err.msg);
  if (st == TN_OK && e->sw_used && n_dec_seqs > 0)
    switch_observe(e, n_dec_seqs, n_dec_out, n_prompt_tok,
                   tn_time_s() - t_step);
  e->n_steps++;
  update_gauges(e);
  return true;
}

static void *engine_main(void *arg) {
  struct tn_engine *e = arg;
  for (;;) {
    pthread_mutex_lock(&e->mu);
    while (!e->stop && !e->inbox_head && !e->admitted && !e->waiting &&
           !atomic_load(&e->cancel_all))
      pthread_cond_wait(&e->cv, &e->mu);
    bool stop = e->stop;
    pthread_mutex_unlock(&e->mu);
    if (stop) break;
    engine_take_inbox(e);
    bool worked = engine_step(e);
    flush_touched(e);
    pthread_mutex_lock(&e->mu);
    if (atomic_load(&e->cancel_all) && !e->admitted && !e->waiting &&
        !e->inbox_head)
      atomic_store(&e->cancel_all, false);
    pthread_mutex_unlock(&e->mu);
    if (!worked && e->only_held) {
      /* Background work only, held for live requests elsewhere: sleep
       * until their count changes (a live request of ours counts too). */
      int seen = tn_pool_live(e->pool);
      if (seen > 0) tn_pool_live_wait(e->pool, seen, 0.05);
    } else if (!worked && (e->admitted || e->waiting)) {
      /* Nothing could run (no blocks): wait briefly for changes. */
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
    }
  }
  /* Shutting down: everything still here is cancelled. */
  atomic_store(&e->cancel_all, true);
  engine_take_inbox(e);
  drop_cancelled(e);
  flush_touched(e);
  free(e->touched);
  e->touched = NULL;
  return NULL;
}

/* Times forward passes of 1 and 1 + K tokens of a scratch sequence to seed
 * the step cost model (drafts, prompt chunks next to decodes); the best
 * of three each. */
static void cost_calibrate(struct tn_engine *e) {
  /* speculating: 1 + K rows with logits, as a verify pass; else a prompt
   * chunk's 9 rows, logits for the last */
  bool spec = e->cfg.spec.method != TN_SPEC_OFF;
  int32_t n2 = TN_MIN(1 + (spec ? e->cfg.spec.max_tokens : 8),
                      e->cfg.step_tokens);
  struct tn_kv_seq ks;
  tn_kv_seq_init(&ks);
  double t[2] = {1e9, 1e9};
  struct tn_batch *b = &e->batch;
  struct tn_kv_seq *seqs[1] = {&ks};
  if (n2 >= 2 && tn_kv_seq_reserve(e->kv, &ks, n2) == TN_OK) {
    for (int rep = 0; rep < 3; rep++)
      for (int w = 0; w < 2; w++) {
        int32_t n = w ? n2 : 1;
        for (int32_t i = 0; i < n; i++) {
          b->token[i] = i % e->n_vocab;
          b->pos[i] = i;
          b->seq[i] = 0;
          b->logits[i] = spec || i == n - 1;
        }
        struct tn_batch cb = {.n_tokens = n, .token = b->token, .pos = b->pos,
                              .seq = b->seq, .logits = b->logits,
                              .n_seqs = 1, .seqs = seqs};
        struct tn_error err;
        double t0 = tn_time_s();
        if (tn_model_forward(e->ctx, e->kv, &cb, &err) == TN_OK)
          t[w] = TN_MIN(t[w], tn_time_s() - t0);
      }
  }
  tn_kv_seq_deinit(e->kv, &ks);
  if (t[0] < 1e9 && t[1] < 1e9) {
    tn_spec_cost_init(&e->cost, 1, t[0], n2, t[1]);
    e->cost_ok = true;
  } else {
    /* no model to plan with: draft only what costs nothing extra */
    e->cost.a = 0.0;
    e->cost.b = 1.0;
    tn_log_warn("engine %s: could not time a verify pass (step tokens %d, "
                "KV pool); speculation will draft very little and prompt "
                "chunks next to decodes are not capped",
                e->name, e->cfg.step_tokens);
  }
  tn_log_debug("engine %s: a step takes %.2f ms + %.3f ms per token "
               "(the step cost model)",
               e->name, e->cost.a * 1e3, e->cost.b * 1e3);
}

/* ---- public API */

enum tn_status tn_engine_open(const char *path,
                              const struct tn_engine_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_engine **out, struct tn_error *err) {
  *out = NULL;
  struct tn_engine *e = calloc(1, sizeof(*e));
  if (!e) return tn_error_set(err, TN_ENOMEM, "out of memory");
  e->cfg = *cfg;
  snprintf(e->name, sizeof(e->name), "%s", cfg->name ? cfg->name : "default");
  e->cfg.name = e->name;
  e->metrics = metrics;
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  enum tn_status st;
  if ((st = tn_model_load(path, &e->model, err))) goto fail;
  if (cfg->merge_lora) {
    struct tn_lora *ml = NULL;
    double t0 = tn_time_s();
    float ms = cfg->merge_scale != 0.0f ? cfg->merge_scale : 1.0f;
    st = tn_lora_load(e->model, cfg->merge_lora, &ml, err);
    if (!st) st = tn_lora_merge(e->model, ml, ms, TN_TYPE_COUNT, err);
    tn_lora_release(ml);
    if (st) goto fail;
    tn_log_info("engine %s: %s merged into the weights in %.2f s", e->name,
                cfg->merge_lora, tn_time_s() - t0);
  }
  if (!(e->adapters = tn_adapters_new(e->model, metrics, e->name))) {
    st = tn_error_set(err, TN_ENOMEM, "out of memory");
    goto fail;
  }
  tn_adapters_set_budget(e->adapters, cfg->adapter_mem);
  if ((st = tn_tokenizer_load(e->model->gguf, &e->tok, err))) goto fail;
  if (cfg->chat_template &&
      (st = tn_chat_set_template(e->tok, cfg->chat_template, err)))
    goto fail;
  const struct tn_hparams *hp = &e->model->hp;
  e->n_vocab = hp->n_vocab;
  if (tn_tokenizer_n_vocab(e->tok) != hp->n_vocab) {
    st = tn_error_set(err, TN_EFORMAT,
                      "tokenizer has %d tokens, the model %d",
                      tn_tokenizer_n_vocab(e->tok), hp->n_vocab);
    goto fail;
  }
  int32_t n_ctx = cfg->n_ctx > 0 ? cfg->n_ctx
                                 : TN_MIN(hp->n_ctx_train > 0 ? hp->n_ctx_train
                                                              : 4096,
                                          4096);
  if (e->cfg.max_seqs <= 0) e->cfg.max_seqs = 16;
  if (e->cfg.max_loras < 0 || e->cfg.max_loras > TN_ADAPTERS_PER_STEP_MAX) {
    st = tn_error_set(err, TN_EINVAL, "max_loras must be 0 (no limit) or "
                      "1..%d, got %d", TN_ADAPTERS_PER_STEP_MAX,
                      e->cfg.max_loras);
    goto fail;
  }
  if (e->cfg.step_tokens < e->cfg.max_seqs)
    e->cfg.step_tokens = e->cfg.max_seqs;
  if (e->cfg.queue_max <= 0) e->cfg.queue_max = 256;
  struct tn_spec_config *sc = &e->cfg.spec;
  if (sc->method < TN_SPEC_OFF || sc->method >= TN_SPEC_COUNT ||
      (sc->method == TN_SPEC_CUSTOM && !sc->propose) ||
      (sc->method == TN_SPEC_DRAFT && !sc->draft_model)) {
    st = tn_error_set(err, TN_EINVAL, "speculation: no such method (%d)",
                      (int)sc->method);
    goto fail;
  }
  if (sc->method != TN_SPEC_OFF &&
      (sc->max_tokens < 1 || sc->max_tokens > TN_SPEC_MAX_TOKENS)) {
    st = tn_error_set(err, TN_EINVAL,
                      "--spec-max-tokens %d must be in 1..%d",
                      sc->max_tokens, TN_SPEC_MAX_TOKENS);
    goto fail;
  }
  if (sc->method == TN_SPEC_NGRAM &&
      (sc->ngram_min < 1 || sc->ngram_max < sc->ngram_min ||
       sc->ngram_max > 64)) {
    st = tn_error_set(err, TN_EINVAL,
                      "speculation: n-gram sizes %d..%d must satisfy 1 <= "
                      "min <= max <= 64",
                      sc->ngram_min, sc->ngram_max);
    goto fail;
  }
  if (sc->method == TN_SPEC_OFF) sc->max_tokens = 0;
  if (e->cfg.prompt_spread < 0 || e->cfg.prompt_spread > 4096) {
    st = tn_error_set(err, TN_EINVAL, "--prompt-spread %d: 0 (off) or 1..4096",
                      (int)e->cfg.prompt_spread);
    goto fail;
  }
  if (!(e->cfg.decode_slowdown == 0.0f ||
        (e->cfg.decode_slowdown >= 1.0f && e->cfg.decode_slowdown <= 100.0f))) {
    st = tn_error_set(err, TN_EINVAL,
                      "--decode-slowdown %g: 0 (no limit) or 1..100",
                      (double)e->cfg.decode_slowdown);
    goto fail;
  }
  int32_t n_kv_dim = hp->n_head_kv * hp->head_dim;
  size_t block_bytes = tn_kv_block_bytes(hp->n_layer, BLOCK_SIZE, n_kv_dim);
  size_t kv_bytes = cfg->kv_bytes;
  if (kv_bytes == 0) {
    /* Room for max_seqs full contexts, at most 1 GiB, at least 2 blocks. */
    size_t per_seq = ((size_t)n_ctx + BLOCK_SIZE - 1) / BLOCK_SIZE;
    kv_bytes = (size_t)e->cfg.max_seqs * per_seq * block_bytes;
    kv_bytes = TN_MIN(kv_bytes, (size_t)1 << 30);
    kv_bytes = TN_MAX(kv_bytes, 2 * block_bytes);
  }
  size_t n_blocks = kv_bytes / block_bytes;
  if (n_blocks < 2) {
    st = tn_error_set(err, TN_EINVAL,
                      "--kv-mem %zu bytes holds fewer than 2 blocks of %d "
                      "tokens (%zu bytes each)",
                      kv_bytes, BLOCK_SIZE, block_bytes);
    goto fail;
  }
  if (n_blocks > INT32_MAX / BLOCK_SIZE) n_blocks = INT32_MAX / BLOCK_SIZE;
  if ((size_t)n_ctx > n_blocks * BLOCK_SIZE) {
    tn_log_warn("%s: the KV pool holds %zu tokens; context capped from %d",
                e->name, n_blocks * BLOCK_SIZE, n_ctx);
    n_ctx = (int32_t)(n_blocks * BLOCK_SIZE);
  }
  e->n_ctx = n_ctx;
  e->cfg.n_ctx = n_ctx;
  if ((st = tn_kv_pool_new(hp->n_layer, (int32_t)n_blocks, BLOCK_SIZE,
                           n_kv_dim, &e->kv, err)))
    goto fail;
  e->pool = cfg->pool;
  if (!e->pool) {
    e->pool = e->own_pool = tn_pool_new(cfg->n_threads > 0 ? cfg->n_threads : 1);
    if (!e->pool) {
      st = tn_error_set(err, TN_ENOMEM, "cannot start compute threads");
      goto fail;
    }
  }
  /* logits: one row per sequence, and one per draft when speculating
   * (without speculation, room for the grammar's forced drafts) */
  int32_t n_logits = TN_MIN(
      e->cfg.step_tokens,
      e->cfg.max_seqs * (1 + sc->max_tokens) +
          (sc->method == TN_SPEC_OFF ? GRAMMAR_DRAFT_ROWS : 0));
  if ((st = tn_ctx_new(e->model, e->pool, e->cfg.step_tokens, n_ctx,
                       n_logits, &e->ctx, err)))
    goto fail;
  tn_ctx_set_threads(e->ctx, cfg->n_threads);
  e->n_threads = cfg->n_threads > 0 && cfg->n_threads < tn_pool_size(e->pool)
                     ? cfg->n_threads
                     : tn_pool_size(e->pool);
  if (sc->method == TN_SPEC_DRAFT) {
    if (!(sc->draft_p_min >= 0.0f && sc->draft_p_min <= 1.0f)) {
      st = tn_error_set(err, TN_EINVAL,
                        "--draft-p-min %g must be in 0..1",
                        (double)sc->draft_p_min);
      goto fail;
    }
    if ((st = tn_drafter_open(sc->draft_model, e->tok, e->pool, cfg->n_threads,
                              e->cfg.max_seqs, sc->max_tokens,
                              sc->draft_p_min, n_ctx,
                              (int32_t)(n_blocks * BLOCK_SIZE), &e->drafter,
                              err)))
      goto fail;
  }
  if (sc->method == TN_SPEC_SELF) {
    int32_t *layers = malloc((size_t)hp->n_layer * sizeof(int32_t)), n = 0;
    if (!layers) {
      st = tn_error_set(err, TN_ENOMEM, "out of memory");
      goto fail;
    }
    if (sc->layers)
      st = tn_spec_parse_layers(sc->layers, hp->n_layer, layers, &n, err);
    else
      n = tn_spec_default_layers(hp->n_layer, layers);
    if (st == TN_OK)
      st = tn_drafter_open_self(e->model, e->tok, e->kv, e->pool,
                                cfg->n_threads, e->cfg.max_seqs,
                                sc->max_tokens, sc->draft_p_min, n_ctx,
                                layers, n, &e->drafter, err);
    char buf[256];
    tn_spec_format_layers(layers, n, buf, sizeof buf);
    free(layers);
    if (st) goto fail;
    tn_log_info("engine %s: drafts with %d of its %d layers (%s)%s", e->name,
                n, hp->n_layer, buf,
                sc->layers ? "" : ": a guess; tern calibrate-self picks "
                                  "layers that draft better");
  }
  sc->layers = NULL; /* (borrowed: not kept) */
  if (e->drafter) {
    e->dreqs = calloc((size_t)e->cfg.max_seqs, sizeof(*e->dreqs));
    if (!e->dreqs) {
      st = tn_error_set(err, TN_ENOMEM, "out of memory");
      goto fail;
    }
  }
  sc->draft_model = NULL; /* (borrowed: not kept) */
  int32_t nt = e->cfg.step_tokens, ns = e->cfg.max_seqs;
  e->batch.token = calloc((size_t)nt, sizeof(int32_t));
  e->batch.pos = calloc((size_t)nt, sizeof(int32_t));
  e->batch.seq = calloc((size_t)nt, sizeof(int32_t));
  e->batch.logits = calloc((size_t)nt, sizeof(bool));
  e->batch_hidden = calloc((size_t)nt, sizeof(bool));
  e->batch.seqs = calloc((size_t)ns, sizeof(*e->batch.seqs));
  e->batch_lora = calloc((size_t)ns, sizeof(*e->batch_lora));
  e->batch_lora_scale = calloc((size_t)ns, sizeof(float));
  e->batch.lora_scale = e->batch_lora_scale;
  e->batch_seqs = calloc((size_t)ns, sizeof(*e->batch_seqs));
  e->trace = calloc((size_t)ns, sizeof(*e->trace));
  e->text_cap = tn_detok_cap(e->tok);
  e->text_buf = malloc(e->text_cap);
  e->eog = malloc((size_t)hp->n_vocab * sizeof(int32_t));
  if (!e->batch.token || !e->batch.pos || !e->batch.seq || !e->batch.logits ||
      !e->batch_hidden ||
      !e->batch.seqs || !e->batch_lora || !e->batch_lora_scale ||
      !e->batch_seqs || !e->trace || !e->text_buf ||
      !e->eog) {
    st = tn_error_set(err, TN_ENOMEM, "out of memory");
    goto fail;
  }
  for (int32_t i = 0; i < hp->n_vocab; i++)
    if (tn_tokenizer_is_eog(e->tok, i)) e->eog[e->n_eog++] = i;
  if (cost_model_used(e)) cost_calibrate(e);
  if (e->cost_ok) {
    e->cost0_a = e->cost.a;
    e->cost0_b = e->cost.b;
  }
  tn_spec_switch_init(&e->sw);
  e->sw_used = sc->method != TN_SPEC_OFF && e->cost_ok &&
               !e->cfg.spec.every_draft;
  if (e->drafter && e->cost_ok && !e->cfg.spec.every_draft) {
    /* a draft pass against a plain step: what drafting can give here */
    double tp = tn_drafter_pass_seconds(e->drafter);
    double t1 = tn_spec_cost_time(&e->cost, 1);
    double r = t1 > 0.0 ? tp / t1 : 0.0;
    if (r > 0.3)
      tn_log_warn("engine %s: a pass of draft model %s takes %.2f ms, %.0f%% "
                  "of a step of the target (%.2f ms): drafts rarely pay "
                  "for themselves at that ratio, so the engine will draft "
                  "little (a draft about a tenth of its target's cost pays)",
                  e->name, tn_drafter_model_name(e->drafter), tp * 1e3,
                  r * 100.0, t1 * 1e3);
  }
  metrics_init(e);
  update_gauges(e);
  if (tn_thread_create(&e->thread, engine_main, e)) {
    st = tn_error_set(err, TN_ENOMEM, "cannot start the engine thread");
    goto fail;
  }
  e->thread_started = true;
  tn_log_debug("engine %s: %s, ctx %d, %zu KV blocks (%zu MiB), %d seqs, "
               "%d tokens per step, %d threads",
               e->name, tn_arch_name(hp->arch), n_ctx, n_blocks,
               n_blocks * block_bytes >> 20, e->cfg.max_seqs,
               e->cfg.step_tokens, e->n_threads);
  *out = e;
  return TN_OK;
fail:
  tn_engine_close(e);
  return st;
}

void tn_engine_close(struct tn_engine *e) {
  if (!e) return;
  if (e->thread_started) {
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
  }
  if (e->cost_ok)
    tn_log_debug("engine %s: the step cost model ended at %.2f ms + %.3f ms "
                 "per token", e->name, e->cost.a * 1e3, e->cost.b * 1e3);
  free(e->batch.token);
  free(e->batch.pos);
  free(e->batch.seq);
  free(e->batch.logits);
  free(e->batch_hidden);
  free(e->batch.seqs);
  free(e->batch_lora);
  free(e->batch_lora_scale);
  free(e->batch_seqs);
  free(e->trace);
  free(e->text_buf);
  free(e->eog);
  free(e->dreqs);
  tn_grammar_vocab_free(e->gvocab);
  free(e->gmask);
  free(e->opt_ids);
  free(e->opt_probs);
  tn_drafter_free(e->drafter);
  tn_ctx_free(e->ctx);
  tn_kv_pool_free(e->kv);
  tn_pool_free(e->own_pool);
  tn_tokenizer_free(e->tok);
  tn_adapters_free(e->adapters);
  tn_model_free(e->model);
  pthread_cond_destroy(&e->cv);
  pthread_mutex_destroy(&e->mu);
  free(e);
}

void tn_engine_info(const struct tn_engine *e, struct tn_engine_info *out) {
  const struct tn_hparams *hp = &e->model->hp;
  memset(out, 0, sizeof(*out));
  out->arch = tn_arch_name(hp->arch);
  out->model_name = e->model->name;
  out->chat_template = tn_chat_template_name(e->tok);
  out->n_ctx = e->n_ctx;
  out->n_ctx_train = hp->n_ctx_train;
  out->n_vocab = hp->n_vocab;
  out->n_layer = hp->n_layer;
  out->n_embd = hp->n_embd;
  out->n_threads = e->n_threads;
  out->weight_bytes = e->model->weight_bytes;
  out->kv_blocks = tn_kv_n_blocks(e->kv);
  out->step_s = e->cost0_a;
  out->token_s = e->cost0_b;
}
const struct tn_tokenizer *tn_engine_tokenizer(const struct tn_engine *e) {
  return e->tok;
}
const char *tn_engine_name(const struct tn_engine *e) { return e->name; }
struct tn_adapters *tn_engine_adapters(struct tn_engine *e) {
  return e->adapters;
}
int32_t tn_engine_n_ctx(const struct tn_engine *e) { return e->n_ctx; }

enum tn_status tn_engine_submit(struct tn_engine *e, const int32_t *prompt,
                                int32_t n_prompt,
                                const struct tn_gen_params *params,
                                tn_req_notify_fn notify, void *user,
                                struct tn_req **out, struct tn_error *err) {
  *out = NULL;
  if (n_prompt <= 0)
    return tn_error_set(err, TN_EINVAL, "the prompt is empty (0 tokens)");
  for (int32_t i = 0; i < n_prompt; i++)
    if (prompt[i] < 0 || prompt[i] >= e->n_vocab)
      return tn_error_set(err, TN_ERANGE,
                          "prompt token %d at index %d is outside the "
                          "vocabulary (0..%d)",
                          prompt[i], i, e->n_vocab - 1);
  if (n_prompt >= e->n_ctx)
    return tn_error_set(err, TN_ERANGE,
                        "the prompt is %d tokens; this model's context is "
                        "%d tokens, which must also hold at least one "
                        "generated token",
                        n_prompt, e->n_ctx);
  if (params->n < 1 || params->n > TN_GEN_N_MAX)
    return tn_error_set(err, TN_EINVAL, "n must be in 1..%d, got %d",
                        TN_GEN_N_MAX, params->n);
  if (params->n_stops < 0 || params->n_stops > TN_GEN_STOPS_MAX)
    return tn_error_set(err, TN_EINVAL, "at most %d stop strings",
                        TN_GEN_STOPS_MAX);
  enum tn_status st = tn_sampling_check(&params->sampling, e->n_vocab, err);
  if (st) return st;
  if (params->n_options < 0 || params->n_options > TN_GEN_OPTIONS_MAX ||
      (params->n_options > 0 && !params->grammar) ||
      !(params->option_min_prob >= 0.0f && params->option_min_prob <= 1.0f))
    return tn_error_set(err, TN_EINVAL,
                        "options: at most %d, with their grammar, and a "
                        "minimum probability in [0, 1]",
                        TN_GEN_OPTIONS_MAX);
  if (params->embed != TN_EMBED_NONE &&
      (params->n != 1 || params->grammar || params->n_options > 0))
    return tn_error_set(err, TN_EINVAL,
                        "an embedding takes one sequence, without a grammar "
                        "or options");
  if (params->lora) {
    if (!tn_lora_fits(params->lora, e->model))
      return tn_error_set(err, TN_EINVAL,
                          "the adapter was loaded for another model");
  }
  if (!(params->lora_scale >= -TN_ADAPTER_SCALE_MAX &&
        params->lora_scale <= TN_ADAPTER_SCALE_MAX))
    return tn_error_set(err, TN_EINVAL, "adapter scale must be in [-%g, %g]",
                        (double)TN_ADAPTER_SCALE_MAX,
                        (double)TN_ADAPTER_SCALE_MAX);
  if (params->grammar) { /* its start must expand within the bounds */
    struct tn_grammar_matcher *m = NULL;
    st = tn_grammar_matcher_new(params->grammar, NULL, &m, err);
    tn_grammar_matcher_free(m);
    if (st) return st;
  }

  struct tn_req *r = calloc(1, sizeof(*r));
  struct tn_req_priv *p = calloc(1, sizeof(*p));
  if (!r || !p) {
    free(r);
    free(p);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  r->priv = p;
  pthread_mutex_init(&p->mu, NULL);
  atomic_init(&p->refs, 2); /* the submitter and the inbox */
  atomic_init(&p->cancel, false);
  p->notify = notify;
  p->user = user;
  p->params = *params;
  if (p->params.grammar) tn_grammar_retain(p->params.grammar);
  tn_lora_retain(p->params.lora);
  int32_t room = e->n_ctx - n_prompt;
  if (p->params.max_tokens <= 0 || p->params.max_tokens > room)
    p->params.max_tokens = room;
  if (p->params.min_tokens > p->params.max_tokens)
    p->params.min_tokens = p->params.max_tokens;
  p->prompt = malloc((size_t)n_prompt * sizeof(int32_t));
  r->choices = calloc((size_t)params->n, sizeof(*r->choices));
  bool ok = p->prompt && r->choices;
  if (ok && params->sampling.n_bias > 0) {
    p->bias = malloc((size_t)params->sampling.n_bias * sizeof(*p->bias));
    ok = p->bias != NULL;
    if (ok)
      memcpy(p->bias, params->sampling.bias,
             (size_t)params->sampling.n_bias * sizeof(*p->bias));
  }
  p->params.sampling.bias = p->bias;
  if (ok && params->n_stops > 0) {
    p->stops = calloc((size_t)params->n_stops, sizeof(char *));
    ok = p->stops != NULL;
    for (int32_t i = 0; ok && i < params->n_stops; i++)
      ok = (p->stops[i] = strdup(params->stops[i])) != NULL;
  }
  p->params.stops = (const char *const *)p->stops;
  if (ok && params->n_options > 0) {
    p->options = calloc((size_t)params->n_options, sizeof(char *));
    p->option_lens = calloc((size_t)params->n_options, sizeof(size_t));
    ok = p->options && p->option_lens;
    for (int32_t i = 0; ok && i < params->n_options; i++) {
      size_t n = params->option_lens[i];
      ok = (p->options[i] = malloc(n + 1)) != NULL;
      if (ok) {
        memcpy(p->options[i], params->options[i], n);
        p->options[i][n] = 0;
        p->option_lens[i] = n;
      }
    }
    for (int32_t i = 0; ok && i < params->n; i++)
      ok = (r->choices[i].option_probs =
                calloc((size_t)params->n_options, sizeof(float))) != NULL;
  }
  p->params.options = (const char *const *)p->options;
  p->params.option_lens = p->option_lens;
  if (!p->options) p->params.n_options = 0;
  if (!ok) {
    p->params.n_stops = p->stops ? params->n_stops : 0;
    r->n_choices = r->choices ? params->n : 0;
    req_free(r);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  memcpy(p->prompt, prompt, (size_t)n_prompt * sizeof(int32_t));
  p->n_prompt = n_prompt;
  r->n_prompt = n_prompt;
  r->n_choices = params->n;
  r->t_submit = tn_time_s();
  p->queued = true;

  pthread_mutex_lock(&e->mu);
  if (e->draining || e->stop) {
    pthread_mutex_unlock(&e->mu);
    req_free(r);
    return tn_error_set(err, TN_ECANCELED,
                        "the server is shutting down; try another replica");
  }
  if (e->n_waiting_total >= e->cfg.queue_max) {
    pthread_mutex_unlock(&e->mu);
    req_free(r);
    return tn_error_set(err, TN_EFULL,
                        "the queue of model %s is full (%d waiting); retry "
                        "later",
                        e->name, e->cfg.queue_max);
  }
  if (e->inbox_tail) e->inbox_tail->priv->next_inbox = r;
  else e->inbox_head = r;
  e->inbox_tail = r;
  e->n_waiting_total++;
  if (!params->background) tn_pool_live_add(e->pool, 1);
  /* the gauge counts it now, not at the engine's next step (a scrape
   * right after a submit must not read a stale, emptier queue); set under
   * e->mu, as the engine sets it, so the last value written is the last
   * count */
  metric_set(e->mm.waiting, e->n_waiting_total);
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
  *out = r;
  return TN_OK;
}

void tn_engine_drain(struct tn_engine *e) {
  pthread_mutex_lock(&e->mu);
  e->draining = true;
  pthread_mutex_unlock(&e->mu);
}

void tn_engine_cancel_all(struct tn_engine *e) {
  pthread_mutex_lock(&e->mu);
  atomic_store(&e->cancel_all, true);
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

void tn_engine_stats(struct tn_engine *e, struct tn_engine_stats *out) {
  pthread_mutex_lock(&e->mu);
  *out = e->stats;
  out->waiting = e->n_waiting_total;
  pthread_mutex_unlock(&e->mu);
}
