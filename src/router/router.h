/*
 * router.h: routes, upstreams and the calls to them.
 *
 * Two parts, one face:
 *
 * The router (router.c) turns the config's routes into plans. A route is a
 * virtual model name; tn_router_plan() looks at one request (the last user
 * message, its length, tools, response_format, user, headers) and answers
 * the targets to try, in order: one for a rule, several for fallback and
 * balance (the least outstanding first), the stages of a cascade. A target
 * is a local model (by name, as the server knows it) or an upstream. The
 * router also keeps each target's outstanding calls (balance) and each
 * upstream's circuit breaker: tn_router_begin()/tn_router_end() bracket
 * every call.
 *
 * The upstream pool (upstream.c) is one thread that runs libcurl's multi
 * interface: every call to a remote OpenAI-compatible server goes through
 * it, so connections are reused (keep-alive) and no HTTP thread ever
 * waits on the network. A call's bytes arrive in its buffer; notify tells
 * the owner to look (it runs on the pool's thread, under the call's lock,
 * and never after tn_upstream_call_release() returns).
 *
 * Nothing here knows about libmicrohttpd or the OpenAI schema.
 */
#ifndef TN_ROUTER_H
#define TN_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "server/config.h"

/* ---- the router */

enum tn_target_kind { TN_TARGET_MODEL, TN_TARGET_UPSTREAM };

struct tn_route_step {
  enum tn_target_kind kind;
  const char *name;     /* the model's name as configured, or the upstream's */
  int target;           /* the router's target id (begin/end) */
  int upstream;         /* TN_TARGET_UPSTREAM: its index in the config */
  /* a cascade stage that may escalate (all but the last) */
  bool decides;
  enum tn_cascade_signal signal;
  double threshold, quantile;
  int32_t samples, sample_tokens; /* TN_SIGNAL_AGREEMENT */
  double sample_temperature;
};

#define TN_ROUTE_STEPS_MAX 64

struct tn_route_plan {
  bool cascade;         /* steps are stages; else alternatives in order */
  int n_steps;
  struct tn_route_step steps[TN_ROUTE_STEPS_MAX];
  char why[160];        /* which rule or choice, for logs and headers */
  double confidence;    /* a classifier's: the vote share (else NAN) */
  /* A classifier on the way needs the request's embedding first: its
   * route (>= 0, and no steps); embed the input text with that route's
   * model and pooling (tn_router_classifier) and plan again. -1: none. */
  int need_embed;
};

/* What rules may look at. last_user may hold NULs (len counts). */
struct tn_route_input {
  const char *last_user;
  size_t last_user_len;
  bool tools, response_format;
  const char *user;                     /* or NULL */
  const char *tenant;                   /* the caller's tenant, or NULL */
  /* the prompt's length in tokens, asked only when a rule needs it (-1:
   * unknown, so min/max_tokens do not hold) */
  int64_t (*count_tokens)(void *ctx);
  /* the text's embedding for classifier route embed_route, or NULL */
  const float *embedding;
  int n_embd;
  int embed_route;
  /* the request's metadata[key] when a string, or NULL */
  const char *(*metadata)(void *ctx, const char *key);
  /* a request header's value, or NULL */
  const char *(*header)(void *ctx, const char *name);
  void *ctx;
};

struct tn_router;

/* Builds the router from a checked config (tn_serve_config_load: every
 * target exists, no cycles); cfg must outlive it. */
enum tn_status tn_router_create(const struct tn_serve_config *cfg,
                                struct tn_router **out, struct tn_error *err);
void tn_router_free(struct tn_router *r);

/* The route named name, or -1. */
int tn_router_find(const struct tn_router *r, const char *name);
int tn_router_n_routes(const struct tn_router *r);
const char *tn_router_route_name(const struct tn_router *r, int route);
const char *tn_router_route_strategy(const struct tn_router *r, int route);
/* The upstream named name, or -1 (a client may call one directly). */
int tn_router_find_upstream(const struct tn_router *r, const char *name);
int tn_router_n_upstreams(const struct tn_router *r);
const struct tn_serve_upstream_cfg *tn_router_upstream(
    const struct tn_router *r, int i);
/* The target id of upstream i (begin/end). */
int tn_router_upstream_target(const struct tn_router *r, int i);

/* A classifier route's embedding model (its configured name, NULL: the
 * first model) and pooling; false for other routes. */
bool tn_router_classifier(const struct tn_router *r, int route,
                          const char **model, bool *last);
/* Its examples (texts to embed at start). */
int tn_router_n_examples(const struct tn_router *r, int route);
const char *tn_router_example(const struct tn_router *r, int route, int i);
/* Hands it the examples' embeddings, n x d in example order (copied and
 * normalised); until then its plans fail with TN_EFULL. */
enum tn_status tn_router_set_vectors(struct tn_router *r, int route,
                                     const float *vecs, int n, int d,
                                     struct tn_error *err);

/* Whether every classifier route has its vectors (/ready waits on it). */
bool tn_router_ready(const struct tn_router *r);

/* Plans route for one request. Deterministic for the same input, config
 * and outstanding counts (balance). Fails (TN_ENOENT, err says why) when
 * no rule holds. */
enum tn_status tn_router_plan(struct tn_router *r, int route,
                              const struct tn_route_input *in,
                              struct tn_route_plan *plan,
                              struct tn_error *err);

/* A call to target starts: false (and nothing counted) when the target is
 * an upstream whose breaker is open or that is at max_concurrent. */
bool tn_router_begin(struct tn_router *r, int target);
/* It ended; ok false counts a failure toward the breaker (upstreams: 5
 * failures in a row open it for 10 s, then one trial call may close it). */
void tn_router_end(struct tn_router *r, int target, bool ok);

/* The cascade signal over one answer's chosen-token probabilities:
 * logprob[i] of each token, margin[i] top-1 minus top-2 probability. An
 * empty answer is confident (+inf). */
double tn_cascade_signal(enum tn_cascade_signal s, double quantile,
                         const float *logprob, const float *margin,
                         size_t n);

/* The agreement signal: the share of k short samples (texts, and whether
 * each was cut at its token limit rather than ending) that agree with the
 * answer, whitespace at the ends ignored: a cut sample agrees when the
 * answer starts with it, one that ended when it is the whole answer. */
double tn_cascade_agreement(const char *answer, size_t answer_len,
                            const char *const *samples,
                            const size_t *sample_len, const bool *cut,
                            size_t k);

/* Whether a stage with this threshold accepts an answer with this
 * signal: signal >= threshold, except that -inf accepts everything and
 * +inf nothing (so they give the small-only and large-only answers). */
bool tn_cascade_accepts(double signal, double threshold);

/* ---- tenants: keys, what they may call, rate limits, daily budgets
 *
 * Rates are token buckets refilled continuously (rpm/60 requests and
 * tpm/60 tokens a second, holding at most a minute's worth). A request is
 * admitted when its estimate fits what is left after the tenant's
 * requests in flight have reserved theirs, or, when it has none in
 * flight, when anything is left at all: so a tenant overshoots a limit by
 * at most one request (its actual use past its estimate; the estimate
 * covers max_tokens when given). Actual use replaces the estimate when
 * the request ends. Budgets are USD per UTC day, the same way. */

struct tn_tenants;

enum tn_admit {
  TN_ADMIT_OK,
  TN_ADMIT_RPM,      /* requests per minute */
  TN_ADMIT_TPM,      /* tokens per minute */
  TN_ADMIT_BUDGET,   /* the day's budget is spent */
};

/* What an admitted request reserved, handed back to settle. */
struct tn_tenant_ticket {
  int tenant;        /* -1: none */
  int64_t tokens;
  double cost;
};

enum tn_status tn_tenants_create(const struct tn_serve_config *cfg,
                                 struct tn_tenants **out,
                                 struct tn_error *err);
void tn_tenants_free(struct tn_tenants *t);
int tn_tenants_count(const struct tn_tenants *t);
/* The tenant whose key is key (compared in constant time), or -1. */
int tn_tenants_find_key(const struct tn_tenants *t, const char *key);
const char *tn_tenants_name(const struct tn_tenants *t, int i);
/* Whether tenant i may call name (a model, alias, route or upstream as
 * the client wrote it; "base:adapter" is checked by its base too). */
bool tn_tenants_allows(const struct tn_tenants *t, int i, const char *name);
/* Admits one request (estimates: tokens, USD) at time now_s (Unix
 * seconds), filling *tk; otherwise says which limit and in how many
 * seconds to retry. */
enum tn_admit tn_tenants_admit(struct tn_tenants *t, int i, int64_t tokens,
                               double cost, double now_s, int *retry_after,
                               struct tn_tenant_ticket *tk);
/* The request ended having used tokens and cost (< 0: unknown, the
 * estimate stands). */
void tn_tenants_settle(struct tn_tenants *t, struct tn_tenant_ticket *tk,
                       int64_t tokens, double cost, double now_s);
/* Spend so far today (tests, dashboard). */
double tn_tenants_spent_today(struct tn_tenants *t, int i, double now_s);
/* Adds spend already made today (from the request log at start). */
void tn_tenants_add_spent(struct tn_tenants *t, const char *name, double cost,
                          double now_s);

/* ---- the upstream pool */

struct tn_upstream_pool;
struct tn_upstream_call;

enum tn_status tn_upstream_pool_start(struct tn_upstream_pool **out,
                                      struct tn_error *err);
/* Cancels every call and joins the thread. */
void tn_upstream_pool_stop(struct tn_upstream_pool *p);

struct tn_upstream_spec {
  const char *url;            /* the full URL */
  const char *api_key;        /* sent as Bearer, or NULL */
  const char *body;           /* JSON, copied */
  size_t len;
  double connect_timeout_s, timeout_s, stall_timeout_s;
  size_t max_buffered;        /* bytes waiting in the call's buffer before
                                 the transfer pauses (stream) or fails
                                 (!stream) */
  bool stream;
  void (*notify)(void *user);
  void *user;
};

/* What a call has seen, read by tn_upstream_call_take(). */
struct tn_upstream_state {
  int http_status;            /* 0 until the headers are in */
  bool headers_done;
  bool done;                  /* the transfer ended (ok or not) */
  bool failed;                /* ended without a whole answer: error says */
  bool connect_failed;        /* never reached the server */
  bool timed_out;
  char error[256];
  char content_type[96];
  int retry_after;            /* seconds, 0 when not sent */
};

enum tn_status tn_upstream_call_start(struct tn_upstream_pool *p,
                                      const struct tn_upstream_spec *spec,
                                      struct tn_upstream_call **out,
                                      struct tn_error *err);
/* Copies the state and moves the bytes received so far to out (appended). */
void tn_upstream_call_take(struct tn_upstream_call *c,
                           struct tn_upstream_state *st, struct tn_buf *out);
/* Cancels the call if it still runs and lets go of it; notify does not
 * run after this returns. */
void tn_upstream_call_release(struct tn_upstream_call *c);

#endif /* TN_ROUTER_H */
