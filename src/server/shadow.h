/*
 * shadow.h: shadow deployments (a shadow: block in the config).
 *
 * A share of the requests answered under a name (a model, upstream or
 * route) is replayed to another target of the same server after the live
 * answer went out, and the two answers are compared: exact match, the F1
 * overlap of their word tokens, the length ratio, the latency and cost
 * difference, and a judge's verdict (both orders) when one is configured.
 * The comparison goes to the request log's shadows table, the dashboard's
 * series and the tern_shadow_* metrics.
 *
 * Replays never touch the live request: the live answer is complete
 * before its replay is even queued; the queue is bounded (a full one
 * drops and counts); replays go through the server's own HTTP port with
 * a per-process secret header that marks them as shadow traffic, so they
 * run as background engine work (tn_gen_params.background), skip tenant
 * limits and are never shadowed again. A shadow that fails, stalls or is
 * gone costs its own worker thread a timeout, nothing else.
 */
#ifndef TN_SHADOW_H
#define TN_SHADOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

struct tn_metrics;
struct tn_reqlog;
struct tn_serve_shadow_cfg;
struct tn_stats;

/* The header a replay carries (its value the secret), and the one that
 * names the live request's id. */
#define TN_SHADOW_HEADER "X-Tern-Shadow"
#define TN_SHADOW_OF_HEADER "X-Tern-Shadow-Of"
/* The answer to a replay says how long it waited for live work. */
#define TN_SHADOW_WAIT_HEADER "X-Tern-Background-Wait-Ms"

struct tn_shadow_spec {
  const char *source;                    /* the name that is shadowed */
  const struct tn_serve_shadow_cfg *cfg; /* borrowed */
};

/* A live answer, offered for a replay (everything is copied). */
struct tn_shadow_live {
  const char *request_id;
  const char *endpoint;     /* "/v1/chat/completions" or "/v1/completions" */
  const char *model;        /* what answered */
  const char *tenant;       /* or NULL */
  const char *body;         /* the request as received */
  size_t body_len;
  const char *text;         /* the first choice's text */
  size_t text_len;
  int64_t ts_ms;            /* arrival */
  double e2e_s;             /* live end to end */
  double cost;              /* USD, < 0: not priced */
};

struct tn_shadows;

/* Starts max_concurrent workers per spec; replays go to
 * http://HOST:port (the server's IPv4 address; 0.0.0.0: 127.0.0.1). log,
 * stats and metrics may be NULL. */
enum tn_status tn_shadows_start(const struct tn_shadow_spec *specs, int n,
                                const char *host, int port,
                                const char *secret,
                                struct tn_reqlog *log, struct tn_stats *stats,
                                struct tn_metrics *metrics,
                                struct tn_shadows **out, struct tn_error *err);
/* The shadow of source, or -1. */
int tn_shadows_find(const struct tn_shadows *s, const char *source);
/* Draws whether a request of shadow i is replayed (its share). */
bool tn_shadows_sample(struct tn_shadows *s, int i);
/* Queues a replay of live (copied); never blocks: a full queue (its
 * length, or 64 MiB of copies) drops it
 * (tern_shadow_replays_total{outcome="dropped"}). */
void tn_shadows_offer(struct tn_shadows *s, int i,
                      const struct tn_shadow_live *live);
/* Waits until no replay is queued or running (tests, benchmarks). */
void tn_shadows_flush(struct tn_shadows *s);
/* Aborts running replays, drops queued ones, joins the workers; later
 * offers are dropped. NULL ok. */
void tn_shadows_stop(struct tn_shadows *s);
/* Stops (if not yet) and frees: once nothing can offer any more. */
void tn_shadows_free(struct tn_shadows *s);

/* The F1 overlap of a's and b's word tokens (runs of letters and digits,
 * and each other visible character), 0..1; 1 when both have none. */
double tn_shadow_overlap(const char *a, size_t na, const char *b, size_t nb);

#endif /* TN_SHADOW_H */
