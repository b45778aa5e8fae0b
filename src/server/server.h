/*
 * server.h: the HTTP front of tern (libmicrohttpd), OpenAI-compatible.
 *
 * Routes: POST /v1/chat/completions, POST /v1/completions, POST
 * /v1/embeddings, GET /v1/models,
 * GET /health (alive), GET /ready (models loaded, not draining), GET
 * /metrics (Prometheus), GET /dashboard and its JSON API under /api/
 * (dashboard.h; the API key also as HTTP Basic auth's password, so a
 * browser can open it). The HTTP threads parse, tokenize and submit to
 * the model's engine, then suspend the connection; the engine's notify
 * resumes it when there is output. They never wait on inference.
 */
#ifndef TN_SERVER_H
#define TN_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

struct tn_engine;
struct tn_metrics;
struct tn_reqlog;
struct tn_tracer;
struct tn_router;
struct tn_tenants;
struct tn_shadow_spec;

struct tn_server_model {
  const char *name;           /* what clients send as "model" */
  struct tn_engine *engine;   /* borrowed; NULL while loading (503) */
  const char *const *aliases; /* other names clients may send */
  int n_aliases;
  /* USD per million tokens for the cost the log and dashboard show (< 0:
   * not priced; cached prompt tokens at price_cached, or price_prompt
   * when that is < 0) */
  double price_prompt, price_cached, price_completion;
  /* USD per hour of the machine: a request also costs its share of the
   * engine's forward passes (tn_req.compute_s) at this rate (< 0: not
   * set) */
  double price_compute;
};

struct tn_server_config {
  const char *host;           /* "127.0.0.1" */
  int port;                   /* 0: any free port (see tn_server_port) */
  const char *api_key;        /* NULL: no auth */
  size_t max_body;            /* bytes; larger bodies get 413 */
  int http_threads;
  int conn_timeout_s;         /* idle connection timeout */
  struct tn_reqlog *reqlog;   /* borrowed; NULL: no request log */
  struct tn_tracer *tracer;   /* borrowed; NULL: no traces */
  /* Adapters may be loaded while serving (POST /v1/load_lora_adapter, or a
   * request naming an adapter found here) only from inside this directory
   * (NULL: run-time loading is off). */
  const char *adapter_dir;
  /* Routes and upstreams (router.h), borrowed; NULL: none. A request
   * whose "model" names a route is planned by it; one naming an upstream
   * is relayed there (libcurl, on the server's own upstream thread). */
  struct tn_router *router;
  /* Tenants (router.h), borrowed; NULL: none. With tenants the OpenAI
   * routes need a tenant's key or api_key; each tenant's allowed names,
   * rates and budget are enforced, and its name goes to the log and
   * metrics. */
  struct tn_tenants *tenants;
  /* Shadow deployments (shadow.h), borrowed; n_shadows 0: none. */
  const struct tn_shadow_spec *shadows;
  int n_shadows;
};
void tn_server_config_default(struct tn_server_config *c);

struct tn_server;

/* Starts listening (names, aliases and pointers are borrowed: they must
 * outlive the server). models[0] serves requests that name no model.
 * Models may still be loading: their requests get 503 until
 * tn_server_set_engine(). */
enum tn_status tn_server_start(const struct tn_server_config *cfg,
                               const struct tn_server_model *models,
                               int n_models, struct tn_metrics *metrics,
                               struct tn_server **out, struct tn_error *err);
int tn_server_port(const struct tn_server *s);
/* Hands model i its engine once loaded; /ready is 200 when every model
 * has one (and the server is not draining). */
void tn_server_set_engine(struct tn_server *s, int i, struct tn_engine *e);
/* /ready turns 503 and new completions get 503; running ones go on. */
void tn_server_drain(struct tn_server *s);
/* Requests with an open connection. */
int tn_server_in_flight(struct tn_server *s);
/* Stops listening and closes every connection. */
void tn_server_stop(struct tn_server *s);

#endif /* TN_SERVER_H */
