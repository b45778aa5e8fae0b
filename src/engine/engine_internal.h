/*
 * engine_internal.h: what the engine's own files share.
 */
#ifndef TN_ENGINE_INTERNAL_H
#define TN_ENGINE_INTERNAL_H

#include "engine/engine.h"
#include "kv/kv.h"

/* Token slots per KV block, for the target's pool and the draft's. */
#define BLOCK_SIZE 16

/* N-gram lookup: up to k tokens that followed the latest earlier
 * occurrence of the last n tokens of tokens[0..n_tokens), for n from
 * ngram_max down to ngram_min; returns how many were written to out. */
int32_t tn_spec_ngram(const int32_t *tokens, int32_t n_tokens,
                      int32_t ngram_min, int32_t ngram_max, int32_t k,
                      int32_t *out);

/* N-gram lookup that learns an edit's substitutions (renames): a
 * sequence's state across steps. After a draft copied from position i of
 * the history and the model wrote something else at output position o,
 * the divergence is held; when a later lookup lands again a little past
 * i, at j, the source tokens [i, j) were replaced by the output since o:
 * a substitution. Drafts copy with every learned substitution applied.
 * Positions index the sequence's tokens, which never change once
 * accepted. All of it is a guess the verification checks: a wrong
 * substitution costs rejected drafts, never a different output. */
#define TN_NGRAM_SUBS 16
struct tn_ngram_edit {
  struct { int32_t s0, sn, o0, on; } sub[TN_NGRAM_SUBS];
  int32_t n_sub, next_sub;
  int32_t div_src, div_out;  /* a pending divergence, or -1 */
  int32_t last_out, n_last;  /* the last draft: where it went, how long */
  int32_t last_tok[TN_SPEC_MAX_TOKENS];
  int32_t last_src[TN_SPEC_MAX_TOKENS]; /* copied from; -1: substituted */
  int32_t run;  /* output tokens the current copy has been followed for
                   (0 after a fresh lookup or a divergence) */
};
/* Tokens of a copy the model must have followed before its drafts count
 * as following it: the first few after a lookup are still often where an
 * edit goes on. */
#define TN_NGRAM_FOLLOW_RUN 4
/* Whether the last draft goes on with a copy the model has followed for
 * a while, rather than from a fresh lookup: its own acceptance class. */
static inline bool tn_spec_ngram_edit_follows(const struct tn_ngram_edit *st) {
  return st->run >= TN_NGRAM_FOLLOW_RUN;
}
void tn_spec_ngram_edit_init(struct tn_ngram_edit *st);
/* tn_spec_ngram with st's substitutions learned and applied. */
int32_t tn_spec_ngram_edit(struct tn_ngram_edit *st, const int32_t *tokens,
                           int32_t n_tokens, int32_t ngram_min,
                           int32_t ngram_max, int32_t k, int32_t *out);

/* ---- the cost model speculation is planned with
 *
 * A step's forward pass over n tokens is modelled as a + b * n seconds,
 * calibrated when the engine opens (passes of 1 and 1 + K tokens) and
 * refitted on every step (least squares with exponential forgetting; the
 * slope keeps its last value while the steps seen all have one size). A
 * drafted token is worth planning when the output it is expected to add
 * (the chance that it and every draft before it are accepted) buys more
 * than the time it adds: g > b * G / T, G being the output the step is
 * expected to give and T its time. */
struct tn_spec_cost {
  double a, b;                   /* seconds per step, per token */
  double w, sn, st, snn, snt;    /* decayed sums of the fit */
};
void tn_spec_cost_init(struct tn_spec_cost *c, int32_t n1, double t1,
                       int32_t n2, double t2);
void tn_spec_cost_observe(struct tn_spec_cost *c, int32_t n, double t);
static inline double tn_spec_cost_time(const struct tn_spec_cost *c,
                                       int32_t n) {
  return c->a + c->b * (double)n;
}

/* ---- the measured switch
 *
 * The cost model decides each draft token; this decides, from measured
 * steps, whether the engine speculates at all. A decode step (decodes
 * only, no prompt chunk) scores its output per sequence times the time
 * a plain step of as many decodes takes (the cost model's a + b * n) over
 * the time it took, drafting and sampling included: about 1 for plain
 * decoding, above 1 where speculation pays. Scores are averaged over
 * windows of TN_SPEC_SWITCH_WINDOW decode steps, and each state keeps a
 * decayed mean of its windows. Now and then a window runs the other way
 * (a probe): speculation goes off when its mean falls 3% below the
 * plain one, and back on when it rises 3% above (hysteresis: between the
 * two nothing changes). A probe that confirms the current state doubles
 * the windows to the next (up to TN_SPEC_SWITCH_EVERY_MAX), so probing
 * costs little in either state; a switch starts again at
 * TN_SPEC_SWITCH_EVERY_MIN. */
#define TN_SPEC_SWITCH_WINDOW 16
#define TN_SPEC_SWITCH_EVERY_MIN 4
#define TN_SPEC_SWITCH_EVERY_MAX 64
#define TN_SPEC_SWITCH_MARGIN 0.03
struct tn_spec_switch {
  bool off;        /* switched off by the rule */
  bool probe;      /* this window runs the other way */
  int32_t steps;   /* decode steps in this window */
  double sum;      /* their scores */
  double mean[2];  /* [0] plain, [1] speculating; < 0: not measured */
  int32_t since;   /* windows since the last probe */
  int32_t every;   /* windows between probes */
  uint64_t n_off;  /* times switched off */
};
void tn_spec_switch_init(struct tn_spec_switch *w);
/* Whether the next step speculates. */
static inline bool tn_spec_switch_on(const struct tn_spec_switch *w) {
  return w->off == w->probe;
}
/* Records one decode step's score; returns -1 when speculation was just
 * switched off, 1 when back on, else 0. */
int tn_spec_switch_observe(struct tn_spec_switch *w, double score);

/* ---- draft model (draft.c) */

struct tn_drafter;

/* A sequence's place in the draft model's KV pool: it has seen n_done
 * tokens, the first n_base of them the sequence's history when it last
 * proposed, then fed[] (drafts it fed itself). */
struct tn_draft_seq {
  struct tn_kv_seq kv;
  int32_t n_done, n_base;
  int32_t fed[TN_SPEC_MAX_TOKENS];
};

/* One sequence to draft for: its history tokens[0..n_tokens), at most k
 * drafts into out; got is how many came. */
struct tn_draft_req {
  struct tn_draft_seq *ds;
  const int32_t *tokens;
  int32_t n_tokens;
  int32_t k;
  int32_t n_masked; /* its first n_masked drafts may not end generation */
  int32_t *out;
  int32_t got;
  float cum;   /* the draft's probability of its whole draft */
  bool active; /* (draft.c's, between passes) */
  /* self-drafting: the target's cache of the sequence and its adapter */
  struct tn_kv_seq *tkv;
  const struct tn_lora *lora;
  float lora_scale;
  int32_t n_blocks0; /* (draft.c's: tkv's blocks before drafting) */
};

/* Loads the draft model at path and checks it shares target_tok's
 * vocabulary (same size, same BOS/EOS, every token's text): TN_EINVAL
 * naming the first difference. Its passes use the shared pool's threads;
 * its KV pool holds kv_tokens plus max_k per sequence. */
enum tn_status tn_drafter_open(const char *path,
                               const struct tn_tokenizer *target_tok,
                               struct tn_pool *pool, int n_threads,
                               int32_t max_seqs, int32_t max_k, float p_min,
                               int32_t n_ctx, int32_t kv_tokens,
                               struct tn_drafter **out,
                               struct tn_error *err);
/* The target drafting for itself with layers[0..n_layers) of its own
 * (rising ids), on its own KV cache kv: no second model, no second cache,
 * nothing to catch up; model, tok and kv are borrowed. */
enum tn_status tn_drafter_open_self(struct tn_model *model,
                                    const struct tn_tokenizer *tok,
                                    struct tn_kv_pool *kv,
                                    struct tn_pool *pool, int n_threads,
                                    int32_t max_seqs, int32_t max_k,
                                    float p_min, int32_t n_ctx,
                                    const int32_t *layers, int32_t n_layers,
                                    struct tn_drafter **out,
                                    struct tn_error *err);
bool tn_drafter_is_self(const struct tn_drafter *d);
/* Layers a drafting pass runs. */
int32_t tn_drafter_n_layers(const struct tn_drafter *d);
void tn_drafter_free(struct tn_drafter *d);
const char *tn_drafter_model_name(const struct tn_drafter *d);
/* Fewer than a quarter of the draft's KV blocks are free. */
bool tn_drafter_kv_low(const struct tn_drafter *d);
/* Decayed mean time of one drafting pass (one token per sequence). */
double tn_drafter_pass_seconds(const struct tn_drafter *d);
void tn_draft_seq_init(struct tn_draft_seq *ds);
/* Releases its draft blocks (d may be NULL: nothing held). */
void tn_draft_seq_drop(struct tn_drafter *d, struct tn_draft_seq *ds);
/* Drafts for n_reqs sequences at once (draft.c says how); ids are the
 * target's, below n_vocab. A draft also ends (after its first token)
 * where the draft's probability of the whole of it falls below cum_min:
 * the chance of acceptance that pays for one more draft pass and verify
 * slot (the engine's cost model). */
void tn_drafter_propose(struct tn_drafter *d, struct tn_draft_req *reqs,
                        int32_t n_reqs, int32_t n_vocab, float cum_min);

#endif /* TN_ENGINE_INTERNAL_H */
