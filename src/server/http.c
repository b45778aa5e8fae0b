/*
 * http.c: the HTTP server (libmicrohttpd) in front of the engines.
 *
 * Every request is read whole (bounded by max_body), then handled on the
 * HTTP thread that read it: parse, tokenize, submit. A completion then
 * suspends its connection; the engine's notify callback resumes it when
 * there is output (a streamed chunk or the finished response). So HTTP
 * threads never wait on inference, and a slow client only slows itself.
 *
 * Lock order: a request's lock (held by the engine around notify), then a
 * connection's mu. The HTTP side never holds mu while taking a request's
 * lock.
 *
 * A reaper thread polls the sockets of connections waiting on the engine
 * for a hang-up (POLLRDHUP), because a suspended connection is not read:
 * a client that leaves while its request is queued or prefilling is
 * cancelled within ~100 ms.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <inttypes.h>
#include <jansson.h>
#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "engine/engine.h"
#include "model/lora.h"
#include "obs/obs.h"
#include "router/router.h"
#include "server/api.h"
#include "server/dashboard.h"
#include "server/server.h"
#include "server/shadow.h"
#include "tokenizer/tokenizer.h"

#define MAX_PROMPTS 64
#define MAX_SEQS_PER_REQUEST 128
#define RELAY_EVENT_MAX (4 << 20) /* one relayed SSE event, bytes */
#define ERROR_BODY_MAX (64 << 10) /* an upstream's error answer, bytes */

struct tn_server {
  struct tn_server_config cfg;
  struct tn_server_model *models;
  _Atomic(struct tn_engine *) *engines; /* [n_models]; NULL while loading */
  int n_models;
  struct tn_metrics *metrics;
  struct tn_metric_family *http_requests;
  struct tn_stats *stats;     /* the dashboard's series */
  struct MHD_Daemon *mhd;
  int port;
  atomic_bool draining;
  atomic_int in_flight;

  pthread_mutex_t mu;         /* the live list */
  struct conn *live;
  pthread_t reaper;
  bool reaper_started;
  pthread_t backfill;         /* the dashboard's last 24 h from the log */
  bool backfill_started;
  atomic_bool stop;
  atomic_bool stopping;       /* no connection may suspend any more */
  char adapter_root[PATH_MAX]; /* realpath of cfg.adapter_dir, or "" */
  pthread_mutex_t load_mu;    /* one run-time adapter load at a time */
  struct tn_upstream_pool *upstreams; /* with cfg.router's upstreams */
  struct tn_metric_family *route_decisions, *escalations, *upstream_calls,
      *upstream_latency;
  struct tn_metric_family *tenant_requests, *tenant_tokens, *tenant_cost,
      *tenant_rejections;
  double max_price_prompt, max_price_completion; /* budget estimates */
  /* cfg.shadows' workers, or NULL (set once listening: atomic) */
  _Atomic(struct tn_shadows *) shadows;
  char shadow_secret[40];     /* what marks a replay as ours */
};

struct conn {
  struct tn_server *srv;
  struct MHD_Connection *mhd;
  atomic_int refs;            /* MHD's connection, a streaming response */
  int fd;
  const char *route;          /* for metrics */
  char *body;
  size_t len, cap;
  bool too_large;
  bool submitted;
  bool counted;               /* in in_flight */
  atomic_bool client_gone;    /* the reaper saw the client hang up */

  pthread_mutex_t mu;
  bool suspended, wake;

  struct tn_api_request q;
  bool have_q;
  struct tn_server_model *model;
  struct tn_engine *engine;   /* model's engine, once looked up */
  struct tn_lora *lora;       /* the adapter "model" names (a reference),
                                 or NULL: the base */
  float lora_scale;
  char adapter[TN_ADAPTER_NAME_MAX + 1]; /* its name, for the log */
  struct tn_req *reqs[MAX_PROMPTS];
  size_t n_reqs;
  char *echo_text[MAX_PROMPTS];
  size_t echo_len[MAX_PROMPTS];
  struct tn_api_stream st;
  struct tn_buf out;
  size_t out_off;
  bool stream_done;
  char id[48];
  long created;

  /* the request log's row (tn_server_config.reqlog) */
  char log_endpoint[40];      /* "" when this request is not logged */
  unsigned status;            /* HTTP status sent */
  char err_msg[256];          /* the error sent, if any */
  bool dashboard;             /* the page or its API: a 401 asks for Basic
                                 auth (browsers), responses get the
                                 page's security headers */
  struct tn_trace_ctx trace;  /* with a tracer: this request's context */
  int64_t t_arrive_ms;        /* wall clock */
  double t_arrive;            /* tn_time_s() */

  /* routing (cfg.router): the plan for a route or an upstream called by
   * name, the step being tried, what answered */
  enum tn_api_kind kind;
  struct tn_route_plan *plan; /* NULL: a model called directly */
  int route_idx;              /* the route called, or -1 */
  int step;
  int target;                 /* the router target begun, or -1 */
  int escalations;
  double confidence;          /* the signal that decided (NAN: none) */
  double cost_before;         /* USD of a cascade's escalated stages */
  struct tn_req *agree;       /* an agreement stage's samples (reqs' lock
                                 rules: the server's mu) */
  struct tn_api_error last_err; /* the last target's failure */
  char answered[TN_SERVE_NAME_MAX + 1];
  /* a classifier's embedding of the request (for route embed_route) */
  bool classifying;
  float *embedding;
  int n_embd, embed_route, n_classified;
  /* relaying to an upstream */
  atomic_bool relaying;       /* mode: the answer comes from call (the
                                 reaper reads it too) */
  struct tn_upstream_call *call;
  int upstream;
  int tries;                  /* of this step's upstream */
  double t_call;              /* tn_time_s() the call started */
  struct tn_buf up;           /* bytes received, not yet handled */
  size_t up_scanned;          /* of them, searched for an event's end */
  struct tn_upstream_state ust;
  bool relay_stream;          /* the client asked for a stream */
  bool relay_end;             /* the relayed stream is finished */
  bool relay_ok_event;        /* a valid event came (commit point) */
  bool relay_bad;             /* the upstream's stream broke (breaker) */
  int64_t up_prompt, up_completion; /* usage the upstream reported */

  bool embeddings;            /* POST /v1/embeddings */
  enum tn_embed pooling;
  bool normalize, base64;
  /* the caller's tenant (cfg.tenants), or -1 */
  int tenant;
  struct tn_tenant_ticket ticket;
  int64_t used_tokens;        /* what the request used, for settling */
  double used_cost;

  /* shadow deployments: a replay from this server (background work, no
   * tenant, never shadowed), or a live request picked for a replay */
  bool shadow;
  char shadow_of[68];         /* a replay: the live request's id */
  int shadow_idx;             /* the live request's shadow, or -1 */
  struct tn_buf live_text;    /* a relayed answer's text, for its shadow */
  double row_cost;            /* the log row's cost (USD, < 0: none) */

  struct conn *live_prev, *live_next;
  bool in_live;
};

static enum MHD_Result try_steps(struct conn *c);
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max);
static enum MHD_Result queue_stream(struct conn *c,
                                    MHD_ContentReaderCallback reader);
static enum MHD_Result classify_start(struct conn *c, int route,
                                      const char *text, size_t len);
static enum MHD_Result classify_done(struct conn *c);
static bool deciding(const struct conn *c);
static void target_end(struct conn *c, bool ok);
static void metric_inc(struct tn_metric_family *f, const char *a,
                       const char *b, double v);
static double upstream_cost(const struct tn_serve_upstream_cfg *u,
                            int64_t prompt, int64_t completion);

void tn_server_config_default(struct tn_server_config *c) {
  memset(c, 0, sizeof(*c));
  c->host = "127.0.0.1";
  c->port = 8080;
  c->max_body = 8u << 20;
  c->http_threads = 4;
  c->conn_timeout_s = 60;
}

/* ---- connections */

static struct conn *conn_new(struct tn_server *s, struct MHD_Connection *mc) {
  struct conn *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->srv = s;
  c->mhd = mc;
  atomic_init(&c->refs, 1);
  c->fd = -1;
  pthread_mutex_init(&c->mu, NULL);
  tn_api_stream_init(&c->st);
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
  if (ci) c->fd = ci->connect_fd;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  c->t_arrive_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  c->t_arrive = tn_time_s();
  c->route_idx = -1;
  c->embed_route = -1;
  c->tenant = -1;
  c->ticket.tenant = -1;
  c->used_tokens = -1;
  c->used_cost = -1;
  c->target = -1;
  c->upstream = -1;
  c->confidence = NAN;
  c->shadow_idx = -1;
  c->row_cost = -1;
  return c;
}

static void live_remove(struct conn *c) {
  struct tn_server *s = c->srv;
  pthread_mutex_lock(&s->mu);
  if (c->in_live) {
    if (c->live_prev) c->live_prev->live_next = c->live_next;
    else s->live = c->live_next;
    if (c->live_next) c->live_next->live_prev = c->live_prev;
    c->in_live = false;
  }
  pthread_mutex_unlock(&s->mu);
}

static void live_add(struct conn *c) {
  struct tn_server *s = c->srv;
  pthread_mutex_lock(&s->mu);
  if (c->in_live) { /* a route's next step: already listed */
    pthread_mutex_unlock(&s->mu);
    return;
  }
  c->live_prev = NULL;
  c->live_next = s->live;
  if (s->live) s->live->live_prev = c;
  s->live = c;
  c->in_live = true;
  pthread_mutex_unlock(&s->mu);
}

static void conn_unref(struct conn *c) {
  if (atomic_fetch_sub(&c->refs, 1) != 1) return;
  free(c->body);
  for (size_t i = 0; i < MAX_PROMPTS; i++) free(c->echo_text[i]);
  if (c->have_q) tn_api_request_free(&c->q);
  tn_lora_release(c->lora);
  tn_api_stream_free(&c->st);
  tn_buf_free(&c->out);
  tn_buf_free(&c->up);
  tn_upstream_call_release(c->call);
  free(c->plan);
  free(c->embedding);
  tn_buf_free(&c->live_text);
  pthread_mutex_destroy(&c->mu);
  free(c);
}

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void price_bounds(struct tn_server *s, const char *name, double *pp,
                         double *pc);

/* Whether a model has any price. */
static bool model_priced(const struct tn_server_model *m) {
  return m && (m->price_prompt >= 0 || m->price_completion >= 0 ||
               m->price_compute >= 0);
}

/* USD of the compute seconds at the model's hourly price. */
static double compute_cost(const struct tn_server_model *m, double s) {
  return m->price_compute > 0 && s > 0 ? s * m->price_compute / 3600.0 : 0.0;
}

static double request_cost(const struct tn_server_model *m,
                           const struct tn_reqlog_row *r) {
  if (!model_priced(m)) return -1;
  double pp = TN_MAX(m->price_prompt, 0.0);
  double pc = m->price_cached >= 0 ? m->price_cached : pp;
  double po = TN_MAX(m->price_completion, 0.0);
  int64_t cached = TN_MAX(r->cached_tokens, 0);
  int64_t fresh = TN_MAX(r->prompt_tokens, 0) - cached;
  return ((double)fresh * pp + (double)cached * pc +
          (double)TN_MAX(r->completion_tokens, 0) * po) / 1e6 +
         compute_cost(m, r->compute_s);
}

/* The request's trace: the HTTP request as the root span (its parent the
 * client's traceparent, if any), and under it the phases, clocked by the
 * engine: receive (parse, template, tokenize, up to the submit), queue,
 * each prompt chunk's forward pass, decode (first to last token) and
 * response (last token to the connection's end). Several prompts or
 * choices: the first one's phases. */
static void trace_request(struct conn *c, const struct tn_reqlog_row *r,
                          double now_wall) {
  double off = now_wall - tn_time_s(); /* monotonic -> Unix */
  enum { MAX_SPANS = 8 + TN_REQ_CHUNKS_MAX };
  struct tn_span sp[MAX_SPANS];
  int n = 0;
  char root[64];
  snprintf(root, sizeof root, "%s %s", c->have_q || c->n_reqs ? "POST" : "HTTP",
           c->log_endpoint);
  struct tn_span_attr ra[12];
  int na = 0;
  ra[na++] = (struct tn_span_attr){.key = "http.request.method", .s = "POST"};
  ra[na++] = (struct tn_span_attr){.key = "url.path", .s = c->log_endpoint};
  ra[na++] = (struct tn_span_attr){.key = "http.response.status_code",
                                   .i = r->status, .is_int = true};
  if (r->model)
    ra[na++] = (struct tn_span_attr){.key = "gen_ai.request.model",
                                     .s = r->model};
  if (r->request_id)
    ra[na++] = (struct tn_span_attr){.key = "gen_ai.response.id",
                                     .s = r->request_id};
  if (r->prompt_tokens >= 0) {
    ra[na++] = (struct tn_span_attr){.key = "gen_ai.usage.input_tokens",
                                     .i = r->prompt_tokens, .is_int = true};
    ra[na++] = (struct tn_span_attr){.key = "gen_ai.usage.output_tokens",
                                     .i = r->completion_tokens,
                                     .is_int = true};
    ra[na++] = (struct tn_span_attr){.key = "tern.cached_tokens",
                                     .i = r->cached_tokens, .is_int = true};
  }
  if (r->finish)
    ra[na++] = (struct tn_span_attr){.key = "gen_ai.response.finish_reasons",
                                     .s = r->finish};
  if (r->cost >= 0)
    ra[na++] = (struct tn_span_attr){.key = "tern.cost_usd", .d = r->cost};
  ra[na++] = (struct tn_span_attr){.key = "gen_ai.system", .s = "tern"};
  double t_end = c->t_arrive + r->e2e_s;
  sp[n++] = (struct tn_span){.name = root, .kind = TN_SPAN_SERVER,
                             .parent = -1, .t0 = c->t_arrive + off,
                             .t1 = t_end + off, .error = r->error,
                             .attrs = ra, .n_attrs = na};
  struct tn_span_attr ca[TN_REQ_CHUNKS_MAX];
  if (c->n_reqs) {
    struct tn_req *q = c->reqs[0];
    tn_req_lock(q);
    double sub = q->t_submit, start = q->t_start, first = q->t_first;
    double done = q->t_done > 0 ? q->t_done : 0;
    sp[n++] = (struct tn_span){.name = "receive", .kind = TN_SPAN_INTERNAL,
                               .parent = 0, .t0 = c->t_arrive + off,
                               .t1 = sub + off};
    if (start > 0)
      sp[n++] = (struct tn_span){.name = "queue", .kind = TN_SPAN_INTERNAL,
                                 .parent = 0, .t0 = sub + off,
                                 .t1 = start + off};
    for (int32_t i = 0; i < q->n_chunks; i++) {
      ca[i] = (struct tn_span_attr){.key = "tern.prompt_tokens",
                                    .i = q->chunks[i].n_tokens,
                                    .is_int = true};
      sp[n++] = (struct tn_span){.name = "prefill chunk",
                                 .kind = TN_SPAN_INTERNAL, .parent = 0,
                                 .t0 = q->chunks[i].t0 + off,
                                 .t1 = q->chunks[i].t1 + off,
                                 .attrs = &ca[i], .n_attrs = 1};
    }
    double last = done > 0 ? done : t_end;
    if (first > 0)
      sp[n++] = (struct tn_span){.name = "decode", .kind = TN_SPAN_INTERNAL,
                                 .parent = 0, .t0 = first + off,
                                 .t1 = last + off};
    sp[n++] = (struct tn_span){.name = "response", .kind = TN_SPAN_INTERNAL,
                               .parent = 0,
                               .t0 = (first > 0 ? last : sub) + off,
                               .t1 = t_end + off};
    tn_req_unlock(q);
  }
  tn_tracer_add(c->srv->cfg.tracer, &c->trace, sp, n);
}

/* An API request is over: one row for the dashboard's series and, when
 * on, the request log. What was asked, who answered, the usage and the
 * timings of its engine requests (summed over prompts and choices; the
 * first choice's finish reason and text). */
static void record_request(struct conn *c, enum MHD_RequestTerminationCode toe) {
  struct tn_reqlog *lg = c->srv->cfg.reqlog;
  if (!c->log_endpoint[0]) return;
  bool content = tn_reqlog_content(lg);
  struct tn_reqlog_row r = {
      .ts_ms = c->t_arrive_ms,
      .request_id = c->id[0] ? c->id : NULL,
      .endpoint = c->log_endpoint,
      .model = c->model ? c->model->name : c->have_q ? c->q.model : NULL,
      .tenant = c->tenant >= 0 ? tn_tenants_name(c->srv->cfg.tenants, c->tenant)
                               : NULL,
      .adapter = c->adapter[0] ? c->adapter : NULL,
      .route = c->route_idx >= 0
                   ? tn_router_route_name(c->srv->cfg.router, c->route_idx)
                   : NULL,
      .upstream = c->upstream >= 0
                      ? tn_router_upstream(c->srv->cfg.router, c->upstream)
                            ->name
                      : NULL,
      .escalations = c->plan ? c->escalations : -1,
      .shadow_of = c->shadow ? c->shadow_of : NULL,
      .status = (int)c->status,
      .error = c->err_msg[0] ? c->err_msg : NULL,
      .prompt_tokens = -1,
      .cached_tokens = -1,
      .completion_tokens = -1,
      .queue_s = -1,
      .ttft_s = -1,
      .itl_mean_s = -1,
      .itl_max_s = -1,
      .e2e_s = tn_time_s() - c->t_arrive,
      .cost = -1,
      .compute_s = -1,
  };
  if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && !r.error)
    r.error = "the client closed the connection";
  if (content && c->body) {
    r.prompt = c->body; /* the request as received */
    r.prompt_len = c->len;
  }
  char *out = NULL;
  uint32_t itl[TN_LAT_BUCKETS] = {0};
  if (c->n_reqs) {
    r.prompt_tokens = r.cached_tokens = r.completion_tokens = 0;
    r.compute_s = 0;
    double itl_sum = 0;
    int64_t itl_n = 0;
    for (size_t i = 0; i < c->n_reqs; i++) {
      struct tn_req *q = c->reqs[i];
      tn_req_lock(q);
      r.prompt_tokens += q->n_prompt;
      r.cached_tokens += q->n_cached;
      r.compute_s += q->compute_s;
      for (int32_t j = 0; j < q->n_choices; j++)
        r.completion_tokens += q->choices[j].n_gen;
      if (i == 0) {
        if (q->t_start > 0) r.queue_s = q->t_start - q->t_submit;
        if (q->n_choices > 0) {
          r.finish = q->done ? tn_finish_str(q->choices[0].finish)
                             : "cancelled";
          if (content && q->choices[0].text) {
            out = malloc(q->choices[0].len + 1);
            if (out) {
              memcpy(out, q->choices[0].text, q->choices[0].len);
              r.output = out;
              r.output_len = q->choices[0].len;
            }
          }
        }
      }
      if (q->t_first > 0 && (r.ttft_s < 0 || q->t_first - q->t_submit < r.ttft_s))
        r.ttft_s = q->t_first - q->t_submit;
      itl_sum += q->itl_sum;
      itl_n += q->itl_n;
      if (q->itl_max > r.itl_max_s) r.itl_max_s = q->itl_max;
      for (int b = 0; b < TN_LAT_BUCKETS; b++) itl[b] += q->itl_hist[b];
      tn_req_unlock(q);
    }
    if (itl_n > 0) r.itl_mean_s = itl_sum / (double)itl_n;
    if (!r.error && c->reqs[0]->error[0]) r.error = c->reqs[0]->error;
    r.cost = request_cost(c->model, &r);
  }
  if (c->answered[0]) r.model = c->answered;
  if (c->n_reqs && c->cost_before > 0) r.cost = TN_MAX(r.cost, 0.0) + c->cost_before;
  if (!c->n_reqs && c->upstream >= 0 && c->up_prompt >= 0) {
    const struct tn_serve_upstream_cfg *u =
        tn_router_upstream(c->srv->cfg.router, c->upstream);
    r.prompt_tokens = c->up_prompt;
    r.completion_tokens = TN_MAX(c->up_completion, 0);
    r.cached_tokens = 0;
    r.cost = upstream_cost(u, c->up_prompt, c->up_completion);
    if (r.cost >= 0) r.cost += c->cost_before;
  }
  /* what it used, for the tenant's limits: nothing when nothing ran, the
   * estimate (-1) only when an upstream answered without usage */
  bool relayed = c->upstream >= 0 && c->status == 200;
  c->used_tokens = r.prompt_tokens >= 0
                       ? r.prompt_tokens + TN_MAX(r.completion_tokens, 0)
                   : relayed ? -1
                             : 0;
  c->used_cost = r.cost >= 0 ? r.cost
                 : relayed && r.prompt_tokens < 0 ? -1
                                                  : 0;
  if (r.tenant && c->srv->tenant_tokens && r.prompt_tokens >= 0) {
    metric_inc(c->srv->tenant_tokens, r.tenant, "prompt",
               (double)r.prompt_tokens);
    metric_inc(c->srv->tenant_tokens, r.tenant, "completion",
               (double)TN_MAX(r.completion_tokens, 0));
  }
  if (r.tenant && r.cost > 0) {
    const char *lv[1] = {r.tenant};
    struct tn_metric *m = c->srv->tenant_cost
                              ? tn_metric_series(c->srv->tenant_cost, lv)
                              : NULL;
    if (m) tn_metric_add(m, r.cost);
  }
  if (r.tenant) {
    char code[8];
    snprintf(code, sizeof code, "%d", r.status);
    metric_inc(c->srv->tenant_requests, r.tenant, code, 1);
  }
  c->row_cost = r.cost;
  double now_wall = wall_s();
  /* a replay is the shadow's traffic, not the live series' */
  if (!c->shadow) tn_stats_add(c->srv->stats, now_wall, &r, c->n_reqs ? itl : NULL);
  tn_reqlog_add(lg, &r);
  if (c->srv->cfg.tracer && c->trace.sampled)
    trace_request(c, &r, now_wall);
  free(out);
}

/* The live answer went out whole: its replay, for the shadow to answer. */
static void offer_shadow(struct conn *c) {
  char *text = NULL;
  size_t len = 0;
  bool failed = false;
  if (c->n_reqs) {
    struct tn_req *q = c->reqs[0];
    tn_req_lock(q);
    failed = q->error[0] || q->n_choices < 1;
    if (!failed && (text = malloc(q->choices[0].len + 1))) {
      memcpy(text, q->choices[0].text, q->choices[0].len);
      len = q->choices[0].len;
    }
    tn_req_unlock(q);
    if (failed || !text) {
      free(text);
      return;
    }
  }
  struct tn_shadow_live live = {
      .request_id = c->id,
      .endpoint = c->log_endpoint,
      .model = c->answered[0] ? c->answered
               : c->model     ? c->model->name
                              : NULL,
      .tenant = c->tenant >= 0
                    ? tn_tenants_name(c->srv->cfg.tenants, c->tenant)
                    : NULL,
      .body = c->body ? c->body : "",
      .body_len = c->len,
      .text = c->n_reqs ? text : c->live_text.data,
      .text_len = c->n_reqs ? len : c->live_text.len,
      .ts_ms = c->t_arrive_ms,
      .e2e_s = tn_time_s() - c->t_arrive,
      .cost = c->row_cost,
  };
  tn_shadows_offer(c->srv->shadows, c->shadow_idx, &live);
  free(text);
}

/* MHD is done with the connection's request (sent, failed or closed). */
static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  struct conn *c = *con_cls;
  (void)cls;
  (void)mc;
  if (!c) return;
  *con_cls = NULL;
  live_remove(c);
  record_request(c, toe);
  if (c->shadow_idx >= 0 && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK &&
      c->status == 200 && !c->err_msg[0])
    offer_shadow(c);
  /* After release no notify runs for these requests (it runs under the
   * request's lock, which release takes). Unfinished ones are cancelled. */
  for (size_t i = 0; i < c->n_reqs; i++) tn_req_release(c->reqs[i]);
  c->n_reqs = 0;
  if (c->agree) tn_req_release(c->agree);
  c->agree = NULL;
  if (c->call && c->upstream >= 0)
    metric_inc(c->srv->upstream_calls,
               tn_router_upstream(c->srv->cfg.router, c->upstream)->name,
               "cancelled", 1);
  tn_upstream_call_release(c->call);
  c->call = NULL;
  target_end(c, true);
  tn_tenants_settle(c->srv->cfg.tenants, &c->ticket, c->used_tokens,
                    c->used_cost, wall_s());
  if (c->counted) atomic_fetch_sub(&c->srv->in_flight, 1);
  c->counted = false;
  conn_unref(c);
}

/* The engine's notify: runs on the engine thread under the request lock. */
static void conn_wake(void *user) {
  struct conn *c = user;
  pthread_mutex_lock(&c->mu);
  c->wake = true;
  if (c->suspended) {
    c->suspended = false;
    MHD_resume_connection(c->mhd);
  }
  pthread_mutex_unlock(&c->mu);
}

/* Suspends unless a wake-up came since the caller last looked; false when
 * it did (look again) or when the server is stopping (the caller answers
 * now: libmicrohttpd must not be stopped with a suspended connection). */
static bool conn_suspend(struct conn *c) {
  pthread_mutex_lock(&c->mu);
  if (c->wake || atomic_load(&c->srv->stopping)) {
    c->wake = false;
    pthread_mutex_unlock(&c->mu);
    return false;
  }
  c->suspended = true;
  MHD_suspend_connection(c->mhd);
  pthread_mutex_unlock(&c->mu);
  return true;
}

static void conn_clear_wake(struct conn *c) {
  pthread_mutex_lock(&c->mu);
  c->wake = false;
  pthread_mutex_unlock(&c->mu);
}

/* ---- responses */

static void count_status(struct conn *c, unsigned status) {
  struct tn_server *s = c->srv;
  c->status = status;
  if (!s->http_requests) return;
  char code[8];
  snprintf(code, sizeof(code), "%u", status);
  const char *lv[2] = {c->route ? c->route : "other", code};
  struct tn_metric *m = tn_metric_series(s->http_requests, lv);
  if (m) tn_metric_add(m, 1);
}

static void add_route_headers(struct conn *c, struct MHD_Response *r);

static enum MHD_Result send_body(struct conn *c, unsigned status,
                                 const char *ctype, char *body, size_t len,
                                 int retry_after) {
  struct MHD_Response *r = MHD_create_response_from_buffer(
      len, body, MHD_RESPMEM_MUST_FREE);
  if (!r) {
    free(body);
    return MHD_NO;
  }
  MHD_add_response_header(r, "Content-Type", ctype);
  if (retry_after > 0) {
    char ra[16];
    snprintf(ra, sizeof(ra), "%d", retry_after);
    MHD_add_response_header(r, "Retry-After", ra);
  }
  add_route_headers(c, r);
  if (status == 401)
    MHD_add_response_header(r, "WWW-Authenticate",
                            c->dashboard ? "Basic realm=\"tern\", "
                                            "charset=\"UTF-8\""
                                          : "Bearer");
  /* the page and its API: never cached, never framed, no outside loads */
  if (c->dashboard) {
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "X-Frame-Options", "DENY");
    MHD_add_response_header(
        r, "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src "
        "'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
  }
  enum MHD_Result ret = MHD_queue_response(c->mhd, status, r);
  MHD_destroy_response(r);
  count_status(c, status);
  return ret;
}

static enum MHD_Result send_json(struct conn *c, unsigned status,
                                 const char *json) {
  char *b = strdup(json);
  if (!b) return MHD_NO;
  return send_body(c, status, "application/json", b, strlen(b), 0);
}

static enum MHD_Result send_error(struct conn *c,
                                  const struct tn_api_error *err) {
  size_t len = 0;
  char *b = tn_api_error_json(err, &len);
  if (!b) return MHD_NO;
  int ra = err->retry_after > 0      ? err->retry_after
           : err->http_status == 429 ? 1
           : err->http_status == 503 ? 5
                                     : 0;
  snprintf(c->err_msg, sizeof(c->err_msg), "%.255s", err->message);
  tn_log_debug("http: %d %s", err->http_status, err->message);
  return send_body(c, (unsigned)err->http_status, "application/json", b, len,
                   ra);
}

static enum MHD_Result send_error_msg(struct conn *c, int status,
                                      const char *type, const char *param,
                                      const char *code, const char *msg) {
  struct tn_api_error e;
  tn_api_error_set(&e, status, type, param, code, "%s", msg);
  return send_error(c, &e);
}

/* ---- small routes */

static struct tn_engine *model_engine(struct tn_server *s,
                                      const struct tn_server_model *m) {
  return atomic_load(&s->engines[m - s->models]);
}

static bool all_loaded(struct tn_server *s) {
  for (int i = 0; i < s->n_models; i++)
    if (!atomic_load(&s->engines[i])) return false;
  return tn_router_ready(s->cfg.router); /* classifiers' examples */
}

static enum MHD_Result route_models(struct conn *c) {
  struct tn_buf b = {0};
  long now = (long)time(NULL);
  tn_buf_printf(&b, "{\"object\":\"list\",\"data\":[");
  bool first = true;
  for (int i = 0; i < c->srv->n_models; i++) {
    const struct tn_server_model *m = &c->srv->models[i];
    struct tn_engine *e = model_engine(c->srv, m);
    if (!e) continue; /* still loading */
    struct tn_engine_info info;
    tn_engine_info(e, &info);
    struct tn_tenants *tns = c->srv->cfg.tenants;
    for (int a = -1; a < m->n_aliases; a++) {
      const char *name = a < 0 ? m->name : m->aliases[a];
      if (c->tenant >= 0 && !tn_tenants_allows(tns, c->tenant, name)) continue;
      tn_buf_printf(&b, "%s{\"id\":\"", first ? "" : ",");
      /* Names come from our own config: still escape quotes/backslashes. */
      for (const char *p = name; *p; p++) {
        if (*p == '"' || *p == '\\') tn_buf_append(&b, "\\", 1);
        if ((unsigned char)*p >= 0x20) tn_buf_append(&b, p, 1);
      }
      tn_buf_printf(&b,
                    "\",\"object\":\"model\",\"created\":%ld,\"owned_by\":"
                    "\"tern\",\"meta\":{\"arch\":\"%s\",\"n_ctx\":%d,"
                    "\"n_vocab\":%d,\"n_params_bytes\":%zu}}",
                    now, info.arch, info.n_ctx, info.n_vocab,
                    info.weight_bytes);
      first = false;
    }
    /* its adapters, vLLM's way: the base as parent, the file as root */
    struct tn_adapters *ads = tn_engine_adapters(e);
    int cap = tn_adapters_list(ads, NULL, 0) + 8; /* (loads may race) */
    struct tn_adapter_info *ai = calloc((size_t)cap, sizeof(*ai));
    int n = ai ? TN_MIN(tn_adapters_list(ads, ai, cap), cap) : 0;
    for (int k = 0; k < n; k++) {
      if (c->tenant >= 0 && !tn_tenants_allows(tns, c->tenant, ai[k].name) &&
          !tn_tenants_allows(tns, c->tenant, m->name))
        continue;
      json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s, s:{s:s, s:s, s:i, s:I, s:f, s:b}}",
                            "id", ai[k].name, "object", "model", "created",
                            (json_int_t)now, "owned_by", "tern", "parent",
                            m->name, "root", ai[k].path, "meta", "format",
                            ai[k].format, "kind", ai[k].kind, "rank", ai[k].max_rank, "bytes",
                            (json_int_t)ai[k].bytes, "scale",
                            (double)ai[k].scale, "resident", ai[k].resident);
      char *js = o ? json_dumps(o, JSON_COMPACT) : NULL;
      if (js) tn_buf_printf(&b, "%s%s", first ? "" : ",", js);
      first = first && !js;
      free(js);
      json_decref(o);
    }
    free(ai);
  }
  /* routes and upstreams: names clients call like models */
  struct tn_router *rt = c->srv->cfg.router;
  for (int i = 0; rt && i < tn_router_n_routes(rt) + tn_router_n_upstreams(rt);
       i++) {
    bool route = i < tn_router_n_routes(rt);
    int k = route ? i : i - tn_router_n_routes(rt);
    if (c->tenant >= 0 &&
        !tn_tenants_allows(c->srv->cfg.tenants, c->tenant,
                           route ? tn_router_route_name(rt, k)
                                 : tn_router_upstream(rt, k)->name))
      continue;
    json_t *o =
        route ? json_pack("{s:s, s:s, s:I, s:s, s:{s:s, s:s}}", "id",
                          tn_router_route_name(rt, k), "object", "model",
                          "created", (json_int_t)now, "owned_by", "tern",
                          "meta", "kind", "route", "strategy",
                          tn_router_route_strategy(rt, k))
              : json_pack("{s:s, s:s, s:I, s:s, s:{s:s}}", "id",
                          tn_router_upstream(rt, k)->name, "object", "model",
                          "created", (json_int_t)now, "owned_by", "tern",
                          "meta", "kind", "upstream");
    char *js = o ? json_dumps(o, JSON_COMPACT) : NULL;
    if (js) tn_buf_printf(&b, "%s%s", first ? "" : ",", js);
    first = first && !js;
    free(js);
    json_decref(o);
  }
  tn_buf_printf(&b, "]}");
  if (b.oom) {
    tn_buf_free(&b);
    return MHD_NO;
  }
  return send_body(c, 200, "application/json", b.data, b.len, 0);
}

static enum MHD_Result route_metrics(struct conn *c) {
  size_t len = 0;
  char *text = c->srv->metrics ? tn_metrics_render(c->srv->metrics, &len)
                               : strdup("");
  if (!text) return MHD_NO;
  if (!c->srv->metrics) len = 0;
  return send_body(c, 200, "text/plain; version=0.0.4; charset=utf-8", text,
                   len, 0);
}

/* ---- completions */

static struct tn_server_model *find_base(struct tn_server *s,
                                         const char *name, size_t len) {
  for (int i = 0; i < s->n_models; i++) {
    struct tn_server_model *m = &s->models[i];
    if (strlen(m->name) == len && !strncmp(m->name, name, len)) return m;
    for (int a = 0; a < m->n_aliases; a++)
      if (strlen(m->aliases[a]) == len && !strncmp(m->aliases[a], name, len))
        return m;
  }
  return NULL;
}

/* What "model" names: a model or alias (the base), "BASE:ADAPTER", or an
 * adapter of any loaded model (vLLM's convention). *lora gets a reference
 * on the adapter, NULL for a base; an evicted adapter is read again, and
 * when that fails aerr says why. */
static struct tn_server_model *find_model(struct tn_server *s,
                                          const char *name,
                                          struct tn_lora **lora,
                                          float *scale,
                                          struct tn_api_error *aerr) {
  *lora = NULL;
  if (!name) return &s->models[0];
  struct tn_server_model *m = find_base(s, name, strlen(name));
  if (m) return m;
  const char *colon = strchr(name, ':');
  for (int i = 0; i < s->n_models; i++) {
    struct tn_server_model *mi = &s->models[i];
    if (colon && mi != find_base(s, name, (size_t)(colon - name))) continue;
    struct tn_engine *e = model_engine(s, mi);
    if (!e) continue;
    struct tn_error err = {0};
    enum tn_status st = tn_adapters_acquire(
        tn_engine_adapters(e), colon ? colon + 1 : name, lora, scale, &err);
    if (st == TN_OK) return mi;
    if (st == TN_ENOENT) continue;
    if (st == TN_EFULL)
      tn_api_error_set(aerr, 503, "server_error", "model",
                       "adapter_memory_full", "%s", err.msg);
    else
      tn_api_error_set(aerr, 500, "server_error", "model",
                       "adapter_load_failed", "%s", err.msg);
    return NULL;
  }
  return NULL;
}

/* ---- adapters loaded while serving (tn_server_config.adapter_dir) */

/* The file path under the adapter directory for `path` (relative to it,
 * or absolute inside it), symlinks resolved: 0, or an HTTP status with
 * msg. */
/* Whether resolved path p is inside root (itself a resolved path). */
static bool under_root(const char *root, const char *p) {
  size_t n = strlen(root);
  if (n == 1) return p[0] == '/' && p[1] != '\0'; /* root "/" */
  return strncmp(p, root, n) == 0 && p[n] == '/';
}

static int adapter_file(struct tn_server *s, const char *path, char *out,
                        char *msg, size_t cap) {
  /* Refused as written first, so the answer says nothing about files
   * outside the directory: an absolute path elsewhere, or any ".." */
  bool dotdot = false;
  for (const char *p = path; p && !dotdot;) { /* each component */
    dotdot = p[0] == '.' && p[1] == '.' && (p[2] == '/' || p[2] == '\0');
    p = strchr(p, '/');
    if (p) p++;
  }
  char joined[PATH_MAX + 8];
  if (path[0] == '/')
    snprintf(joined, sizeof(joined), "%s", path);
  else
    snprintf(joined, sizeof(joined), "%s/%s", s->adapter_root, path);
  bool inside = !dotdot && (path[0] != '/' || under_root(s->adapter_root, path));
  /* then resolved (symlinks followed), and checked again */
  if (inside && !realpath(joined, out)) {
    snprintf(msg, cap, "adapter path '%.200s': %s", path, strerror(errno));
    return errno == ENOENT ? 404 : 400;
  }
  if (!inside || !under_root(s->adapter_root, out)) {
    snprintf(msg, cap,
             "adapter path '%.200s' is outside the adapter directory "
             "(--adapter-dir)",
             path);
    return 403;
  }
  return 0;
}

/* Whether name is taken by a model, an alias or a loaded adapter. */
static bool name_taken(struct tn_server *s, const char *name) {
  if (find_base(s, name, strlen(name))) return true;
  for (int i = 0; i < s->n_models; i++) {
    struct tn_engine *e = model_engine(s, &s->models[i]);
    if (e && tn_adapters_has(tn_engine_adapters(e), name)) return true;
  }
  return false;
}

/* Loads file as adapter `name` on model m: 0, or an HTTP status with
 * msg. */
static int adapter_load(struct tn_server *s, struct tn_server_model *m,
                        const char *name, const char *file, char *msg,
                        size_t cap) {
  struct tn_engine *e = model_engine(s, m);
  if (!e) {
    snprintf(msg, cap, "model '%.100s' is still loading", m->name);
    return 503;
  }
  pthread_mutex_lock(&s->load_mu);
  int rc = 0;
  if (name_taken(s, name)) {
    snprintf(msg, cap, "'%.80s' is already the name of a model or adapter",
             name);
    rc = 400;
  } else {
    struct tn_error err = {0};
    double t0 = tn_time_s();
    enum tn_status st =
        tn_adapters_load(tn_engine_adapters(e), name, file, 1.0f, &err);
    if (st) {
      snprintf(msg, cap, "%s", err.msg);
      rc = st == TN_ENOMEM || st == TN_EFULL ? 503 : 400;
    } else {
      tn_log_info("adapter '%s' on '%s': %s loaded in %.0f ms", name, m->name,
                  file, (tn_time_s() - t0) * 1e3);
    }
  }
  pthread_mutex_unlock(&s->load_mu);
  return rc;
}

/* A request naming an adapter that is not loaded: NAME (a directory) or
 * NAME.gguf in the adapter directory is loaded on demand, on the model
 * BASE names (BASE:NAME) or else the first one it fits. */
static struct tn_server_model *adapter_on_demand(struct tn_server *s,
                                                 const char *model,
                                                 struct tn_lora **lora,
                                                 float *scale,
                                                 struct tn_api_error *aerr) {
  *lora = NULL;
  /* not while models load: a model's own adapters come first */
  if (!s->adapter_root[0] || !model || !all_loaded(s)) return NULL;
  const char *colon = strchr(model, ':');
  const char *name = colon ? colon + 1 : model;
  struct tn_server_model *only =
      colon ? find_base(s, model, (size_t)(colon - model)) : NULL;
  if ((colon && !only) || !tn_adapter_name_ok(name)) return NULL;
  char rel[TN_ADAPTER_NAME_MAX + 8], file[PATH_MAX], msg[600];
  int rc = 404;
  for (int k = 0; k < 2 && rc == 404; k++) {
    snprintf(rel, sizeof(rel), k ? "%s.gguf" : "%s", name);
    rc = adapter_file(s, rel, file, msg, sizeof(msg));
  }
  if (rc == 404) return NULL;
  for (int i = 0; rc == 0 && i < s->n_models; i++) {
    struct tn_server_model *m = &s->models[i];
    if (only && m != only) continue;
    int lrc = adapter_load(s, m, name, file, msg, sizeof(msg));
    struct tn_engine *e = model_engine(s, m);
    /* loaded now, or by a request that raced this one */
    struct tn_error gerr = {0};
    enum tn_status gst =
        e ? tn_adapters_acquire(tn_engine_adapters(e), name, lora, scale, &gerr)
          : TN_ENOENT;
    if (*lora) return m;
    if (gst == TN_EFULL) {
      snprintf(msg, sizeof(msg), "%s", gerr.msg);
      lrc = 503;
    }
    if (lrc != 400 || only) rc = lrc;
  }
  tn_api_error_set(aerr, rc ? rc : 400, "invalid_request_error", "model",
                   "adapter_load_failed", "adapter '%.80s': %s", name, msg);
  return NULL;
}

static enum MHD_Result route_adapter(struct conn *c, bool load) {
  struct tn_server *s = c->srv;
  struct tn_api_error aerr = {0};
  json_error_t je;
  json_t *o = json_loadb(c->body ? c->body : "", c->len, 0, &je);
  const char *name = json_string_value(json_object_get(o, "lora_name"));
  const char *path = json_string_value(json_object_get(o, "lora_path"));
  const char *base = json_string_value(json_object_get(o, "model"));
  char file[PATH_MAX], msg[600];
  int rc = 0;
  if (!o) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", NULL, NULL,
                     "the body is not valid JSON: %s (line %d, column %d)",
                     je.text, je.line, je.column);
  } else if (!json_is_object(o)) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", NULL, NULL,
                     "the body must be a JSON object");
  } else if (!name || !tn_adapter_name_ok(name)) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "lora_name", NULL,
                     "'lora_name' must be 1..%d letters, digits, '-', '_' "
                     "or '.' (not first)",
                     TN_ADAPTER_NAME_MAX);
  } else if (load && !s->adapter_root[0]) {
    tn_api_error_set(&aerr, 403, "invalid_request_error", NULL,
                     "adapter_loading_disabled",
                     "loading adapters while serving is off: start tern "
                     "serve with --adapter-dir DIR");
  } else if (load && !path) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "lora_path", NULL,
                     "'lora_path' must be a string");
  } else if (load && (rc = adapter_file(s, path, file, msg, sizeof(msg)))) {
    tn_api_error_set(&aerr, rc == 404 ? 400 : rc, "invalid_request_error",
                     "lora_path", NULL, "%s", msg);
  } else if (base && !find_base(s, base, strlen(base))) {
    tn_api_error_set(&aerr, 404, "invalid_request_error", "model",
                     "model_not_found", "The model '%.100s' does not exist",
                     base);
  } else if (load) {
    struct tn_server_model *m = base ? find_base(s, base, strlen(base))
                                     : &s->models[0];
    if ((rc = adapter_load(s, m, name, file, msg, sizeof(msg))))
      tn_api_error_set(&aerr, rc, "invalid_request_error", "lora_path",
                       rc == 400 && name_taken(s, name) ? "adapter_exists"
                                                        : NULL,
                       "%s", msg);
  } else if (find_base(s, name, strlen(name))) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "lora_name", NULL,
                     "'%.80s' is a base model; only adapters can be "
                     "unloaded",
                     name);
  } else {
    rc = 404;
    for (int i = 0; i < s->n_models && rc; i++) {
      struct tn_engine *e = model_engine(s, &s->models[i]);
      if (e && !tn_adapters_unload(tn_engine_adapters(e), name, NULL)) rc = 0;
    }
    if (rc)
      tn_api_error_set(&aerr, 404, "invalid_request_error", "lora_name",
                       "adapter_not_found", "no adapter '%.80s' is loaded",
                       name);
    else
      tn_log_info("adapter '%s' unloaded (requests running on it finish "
                  "first)",
                  name);
  }
  char body[256];
  if (!aerr.http_status) /* (name is o's: before the decref) */
    snprintf(body, sizeof(body),
             "{\"object\":\"lora_adapter\",\"lora_name\":\"%s\",\"status\":"
             "\"%s\"}",
             name, load ? "loaded" : "unloaded");
  json_decref(o);
  if (aerr.http_status) return send_error(c, &aerr);
  return send_json(c, 200, body);
}

static void make_id(char *out, size_t cap, const char *prefix) {
  unsigned char r[12];
  if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
    uint64_t t = tn_time_ns();
    memcpy(r, &t, 8);
    memset(r + 8, 0x5a, 4);
  }
  size_t n = (size_t)snprintf(out, cap, "%s", prefix);
  for (size_t i = 0; i < sizeof(r) && n + 2 < cap; i++)
    n += (size_t)snprintf(out + n, cap - n, "%02x", r[i]);
}

static uint64_t random_seed(void) {
  uint64_t s;
  if (getrandom(&s, sizeof(s), 0) != (ssize_t)sizeof(s)) s = tn_time_ns();
  return s;
}

/* Tokens of prompt i (chat: the formatted conversation), as the CLI makes
 * them too (tn_engine_encode_*). */
static int prompt_error(struct conn *c, enum tn_status st, const char *param,
                        const struct tn_error *err,
                        struct tn_api_error *aerr) {
  if (st == TN_ERANGE)
    return tn_api_error_set(aerr, 400, "invalid_request_error", param,
                            "context_length_exceeded", "%s", err->msg);
  if (st == TN_ENOMEM)
    return tn_api_error_set(aerr, 500, "server_error", NULL, NULL,
                            "out of memory");
  if (st == TN_EUNSUPPORTED && c->q.kind == TN_API_CHAT)
    return tn_api_error_set(aerr, 400, "invalid_request_error", "messages",
                            "chat_template_missing",
                            "model '%s': %s; send a plain prompt to "
                            "/v1/completions, or serve it with "
                            "--chat-template chatml|gemma|llama3|FILE.jinja",
                            c->model->name, err->msg);
  return tn_api_error_set(aerr, 400, "invalid_request_error", param, NULL,
                          "%s", err->msg);
}

static int build_prompt(struct conn *c, size_t i, int32_t **ids,
                        size_t *n_ids, struct tn_api_error *aerr) {
  const struct tn_tokenizer *tok = tn_engine_tokenizer(c->engine);
  struct tn_error err = {0};
  enum tn_status st;
  *ids = NULL;
  *n_ids = 0;
  if (c->q.kind == TN_API_CHAT) {
    struct tn_chat_opts o = {.add_generation_prompt = true,
                             .kwargs_json = c->q.template_kwargs,
                             .kwargs_len = c->q.template_kwargs_len,
                             .documents_json = c->q.documents,
                             .documents_len = c->q.documents_len};
    if (c->q.documents && tn_chat_available(tok) &&
        !tn_chat_uses_var(tok, "documents"))
      return tn_api_error_set(
          aerr, 400, "invalid_request_error", "documents", "unsupported_value",
          "model '%s': its chat template has no documents section, so "
          "'documents' would be dropped; put them in a message instead",
          c->model->name);
    if (c->q.tool_choice != TN_API_TOOLS_NONE) {
      if (tn_chat_tools_format(tok) == TN_CHAT_TOOLS_OTHER)
        return tn_api_error_set(
            aerr, 400, "invalid_request_error", "tools", "unsupported_value",
            "model '%s': its chat template writes tool calls in a format "
            "tern does not parse yet (it understands the <tool_call> JSON "
            "convention of Qwen and Hermes templates, and writes it into "
            "templates without a tools section); serve it with "
            "--chat-template FILE to use another template",
            c->model->name);
      o.tools_json = c->q.tools_json;
      o.tools_len = c->q.tools_len;
    }
    if ((st = tn_engine_encode_chat(c->engine, c->q.msgs, c->q.n_msgs, &o,
                                    ids, n_ids, &err)))
      return prompt_error(c, st, "messages", &err, aerr);
    return 0;
  }
  const struct tn_api_prompt *p = &c->q.prompts[i];
  if (p->ids) {
    *ids = malloc((p->n_ids ? p->n_ids : 1) * sizeof(int32_t));
    if (!*ids)
      return tn_api_error_set(aerr, 500, "server_error", NULL, NULL,
                              "out of memory");
    memcpy(*ids, p->ids, p->n_ids * sizeof(int32_t));
    *n_ids = p->n_ids;
  } else if ((st = tn_engine_encode_text(c->engine, p->text, p->len, ids,
                                         n_ids, &err))) {
    return prompt_error(c, st, "prompt", &err, aerr);
  }
  if (c->q.echo) {
    free(c->echo_text[i]); /* a route's earlier step */
    c->echo_text[i] = NULL;
    if (p->text) {
      c->echo_text[i] = malloc(p->len + 1);
      if (c->echo_text[i]) {
        memcpy(c->echo_text[i], p->text, p->len);
        c->echo_len[i] = p->len;
      }
    } else {
      struct tn_buf b = {0};
      struct tn_detok d;
      char piece[512];
      tn_detok_init(&d, tok, false);
      for (size_t k = 0; k < p->n_ids; k++)
        tn_buf_append(&b, piece, tn_detok_push(&d, p->ids[k], piece,
                                               sizeof(piece)));
      tn_buf_append(&b, piece, tn_detok_flush(&d, piece, sizeof(piece)));
      c->echo_text[i] = b.data;
      c->echo_len[i] = b.len;
      if (!b.data) c->echo_text[i] = strdup("");
    }
  }
  return 0;
}

/* Releases the connection's requests. The reaper walks them under the
 * server's mu, so they leave the array under it first. */
static void cancel_reqs(struct conn *c) {
  struct tn_req *reqs[MAX_PROMPTS + 1];
  pthread_mutex_lock(&c->srv->mu);
  size_t n = c->n_reqs;
  memcpy(reqs, c->reqs, n * sizeof reqs[0]);
  c->n_reqs = 0;
  if (c->agree) reqs[n++] = c->agree;
  c->agree = NULL;
  pthread_mutex_unlock(&c->srv->mu);
  for (size_t i = 0; i < n; i++) tn_req_release(reqs[i]);
}

/* Adds a submitted request (under the server's mu: see cancel_reqs). */
static void add_req(struct conn *c, struct tn_req *r) {
  pthread_mutex_lock(&c->srv->mu);
  c->reqs[c->n_reqs++] = r;
  pthread_mutex_unlock(&c->srv->mu);
}

static struct tn_api_meta conn_meta(struct conn *c) {
  struct tn_api_meta m = {
      .id = c->id,
      .created = c->created,
      .model = c->q.model ? c->q.model : c->model->name,
      .tok = tn_engine_tokenizer(c->engine),
      .echo_text = c->q.echo ? (const char *const *)c->echo_text : NULL,
      .echo_len = c->q.echo ? c->echo_len : NULL,
  };
  const struct tn_server_model *md = c->model;
  if (model_priced(md)) {
    m.priced = true;
    m.price_prompt = TN_MAX(md->price_prompt, 0.0);
    m.price_cached = md->price_cached >= 0 ? md->price_cached : m.price_prompt;
    m.price_completion = TN_MAX(md->price_completion, 0.0);
    m.price_compute = TN_MAX(md->price_compute, 0.0);
    m.cost_extra = c->cost_before;
  } else if (c->cost_before > 0) {
    m.priced = true;
    m.cost_extra = c->cost_before;
  }
  return m;
}

static void lock_reqs(struct conn *c) {
  for (size_t i = 0; i < c->n_reqs; i++) tn_req_lock(c->reqs[i]);
}
static void unlock_reqs(struct conn *c) {
  for (size_t i = c->n_reqs; i-- > 0;) tn_req_unlock(c->reqs[i]);
}

/* Why a finished request produced no normal answer, or 0. */
static int reqs_failure(struct conn *c, struct tn_api_error *aerr) {
  for (size_t i = 0; i < c->n_reqs; i++) {
    struct tn_req *r = c->reqs[i];
    for (int32_t k = 0; k < r->n_choices; k++) {
      if (r->choices[k].finish == TN_FINISH_ERROR)
        return tn_api_error_set(aerr, 500, "server_error", NULL, NULL,
                                "generation failed: %s", r->error);
      if (r->choices[k].finish == TN_FINISH_CANCELLED &&
          atomic_load(&c->client_gone))
        return tn_api_error_set(aerr, 499, "invalid_request_error", NULL,
                                "client_closed_request",
                                "the client closed the connection (or its "
                                "sending side) before the answer was ready; "
                                "the request was cancelled");
      if (r->choices[k].finish == TN_FINISH_CANCELLED)
        return tn_api_error_set(aerr, 503, "server_error", NULL,
                                "server_shutting_down",
                                "the request was cancelled: the server is "
                                "shutting down");
    }
  }
  return 0;
}

/* Non-streaming: answer if every request is done, else wait. */

static double samples_agreement(struct conn *c);

/* A cascade stage's confidence: its signal over every chosen token of
 * every choice (under lock_reqs). */
static double stage_confidence(struct conn *c, const struct tn_route_step *st) {
  size_t n = 0;
  for (size_t i = 0; i < c->n_reqs; i++)
    for (int32_t k = 0; k < c->reqs[i]->n_choices; k++)
      n += (size_t)c->reqs[i]->choices[k].n_toks;
  float *lp = malloc((n + 1) * sizeof *lp), *mg = malloc((n + 1) * sizeof *mg);
  if (!lp || !mg) {
    free(lp);
    free(mg);
    return -INFINITY; /* escalate */
  }
  size_t j = 0;
  for (size_t i = 0; i < c->n_reqs; i++)
    for (int32_t k = 0; k < c->reqs[i]->n_choices; k++) {
      const struct tn_choice *ch = &c->reqs[i]->choices[k];
      for (int32_t t = 0; t < ch->n_toks; t++, j++) {
        const struct tn_gen_token *g = &ch->toks[t];
        lp[j] = g->logprob;
        float p1 = g->n_top > 0 ? expf(g->top[0].logprob) : expf(g->logprob);
        float p2 = g->n_top > 1 ? expf(g->top[1].logprob) : 0.0f;
        mg[j] = p1 - p2;
      }
    }
  double v = tn_cascade_signal(st->signal, st->quantile, lp, mg, n);
  free(lp);
  free(mg);
  return v;
}

static double local_cost(const struct tn_server_model *m,
                         struct tn_req *const *reqs, size_t n_reqs) {
  if (!model_priced(m)) return 0;
  struct tn_reqlog_row r = {0};
  for (size_t i = 0; i < n_reqs; i++) {
    r.prompt_tokens += reqs[i]->n_prompt;
    r.cached_tokens += reqs[i]->n_cached;
    r.compute_s += reqs[i]->compute_s;
    for (int32_t k = 0; k < reqs[i]->n_choices; k++)
      r.completion_tokens += reqs[i]->choices[k].n_gen;
  }
  return request_cost(m, &r);
}

/* Non-streaming (or a cascade stage): answer if every request is done,
 * else wait. A deciding cascade stage accepts its answer or escalates. */
static char *render_embeddings(struct conn *c, size_t *len);

static enum MHD_Result completion_wait(struct conn *c) {
  for (;;) {
    conn_clear_wake(c);
    bool done = true;
    for (size_t i = 0; i < c->n_reqs && done; i++) {
      tn_req_lock(c->reqs[i]);
      done = c->reqs[i]->done;
      tn_req_unlock(c->reqs[i]);
    }
    if (done && c->agree) {
      tn_req_lock(c->agree);
      done = c->agree->done;
      tn_req_unlock(c->agree);
    }
    if (done) break;
    if (atomic_load(&c->srv->stopping)) {
      live_remove(c);
      cancel_reqs(c);
      return send_error_msg(c, 503, "server_error", NULL,
                            "server_shutting_down",
                            "the server stopped before the answer was ready");
    }
    if (conn_suspend(c)) return MHD_YES;
  }
  if (c->classifying) {
    struct tn_api_error cerr;
    lock_reqs(c);
    int cfail = reqs_failure(c, &cerr);
    unlock_reqs(c);
    if (cfail) {
      live_remove(c);
      return send_error(c, &cerr);
    }
    return classify_done(c);
  }
  struct tn_api_error aerr;
  /* (every request is done: nothing writes them any more) */
  double agreement = c->agree ? samples_agreement(c) : -INFINITY;
  lock_reqs(c);
  int fail = reqs_failure(c, &aerr);
  if (!fail && deciding(c)) {
    const struct tn_route_step *st = &c->plan->steps[c->step];
    c->confidence = st->signal == TN_SIGNAL_AGREEMENT
                        ? agreement
                        : stage_confidence(c, st);
    if (!tn_cascade_accepts(c->confidence, st->threshold)) {
      /* not confident enough: the next stage answers */
      c->cost_before += local_cost(c->model, c->reqs, c->n_reqs);
      unlock_reqs(c);
      live_remove(c);
      cancel_reqs(c);
      target_end(c, true);
      c->escalations++;
      metric_inc(c->srv->escalations,
                 tn_router_route_name(c->srv->cfg.router, c->route_idx),
                 st->name, 1);
      c->step++;
      return try_steps(c);
    }
    if (c->q.stream) {
      unlock_reqs(c);
      return queue_stream(c, stream_read); /* the whole answer, streamed now */
    }
  }
  live_remove(c);
  char *body = NULL;
  size_t len = 0;
  if (!fail && c->embeddings) {
    body = render_embeddings(c, &len);
  } else if (!fail) {
    struct tn_api_meta meta = conn_meta(c);
    body = tn_api_render_response(&c->q, &meta, c->reqs, c->n_reqs, &len);
  }
  unlock_reqs(c);
  if (fail) return send_error(c, &aerr);
  if (!body)
    return send_error_msg(c, 500, "server_error", NULL, NULL, "out of memory");
  return send_body(c, 200, "application/json", body, len, 0);
}

/* Copies what waits in c->out (some of it) to an SSE reader's buf. */
static ssize_t take_out(struct conn *c, char *buf, size_t max) {
  size_t n = TN_MIN(max, c->out.len - c->out_off);
  memcpy(buf, c->out.data + c->out_off, n);
  c->out_off += n;
  if (c->out_off == c->out.len) c->out_off = c->out.len = 0;
  return (ssize_t)n;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
  struct conn *c = cls;
  (void)pos;
  for (;;) {
    if (c->out_off < c->out.len) return take_out(c, buf, max);
    if (c->stream_done) {
      live_remove(c);
      return MHD_CONTENT_READER_END_OF_STREAM;
    }
    conn_clear_wake(c);
    struct tn_api_meta meta = conn_meta(c);
    lock_reqs(c);
    c->stream_done =
        tn_api_render_stream(&c->q, &meta, c->reqs, c->n_reqs, &c->st, &c->out);
    unlock_reqs(c);
    if (c->out.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
    if (c->out.len > 0 || c->stream_done) continue;
    if (atomic_load(&c->srv->stopping)) {
      live_remove(c);
      return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (conn_suspend(c)) return 0;
  }
}

static void stream_free(void *cls) { conn_unref(cls); }

/* Queues the 200 SSE response whose body reader pulls (the engine's
 * stream_read or an upstream's relay_read). */
static enum MHD_Result queue_stream(struct conn *c,
                                    MHD_ContentReaderCallback reader) {
  atomic_fetch_add(&c->refs, 1);
  struct MHD_Response *resp = MHD_create_response_from_callback(
      MHD_SIZE_UNKNOWN, 16384, reader, c, stream_free);
  if (!resp) {
    conn_unref(c);
    return MHD_NO;
  }
  MHD_add_response_header(resp, "Content-Type", "text/event-stream");
  MHD_add_response_header(resp, "Cache-Control", "no-cache");
  MHD_add_response_header(resp, "X-Accel-Buffering", "no");
  add_route_headers(c, resp);
  enum MHD_Result ret = MHD_queue_response(c->mhd, 200, resp);
  MHD_destroy_response(resp);
  count_status(c, 200);
  return ret;
}

/* ---- routes and upstreams (cfg.router) */

static void metric_inc(struct tn_metric_family *f, const char *a,
                       const char *b, double v) {
  if (!f) return;
  const char *lv[2] = {a, b};
  struct tn_metric *m = tn_metric_series(f, lv);
  if (m) tn_metric_add(m, v);
}

static void target_end(struct conn *c, bool ok) {
  if (c->target >= 0) tn_router_end(c->srv->cfg.router, c->target, ok);
  c->target = -1;
}

/* Response headers that say what the router did. */
static void add_route_headers(struct conn *c, struct MHD_Response *r) {
  if (c->shadow && c->n_reqs) {
    /* how long its engine work waited for live requests */
    double held = 0;
    for (size_t i = 0; i < c->n_reqs; i++) {
      tn_req_lock(c->reqs[i]);
      held = TN_MAX(held, c->reqs[i]->t_held);
      tn_req_unlock(c->reqs[i]);
    }
    char v[32];
    snprintf(v, sizeof v, "%.3f", held * 1000.0);
    MHD_add_response_header(r, TN_SHADOW_WAIT_HEADER, v);
  }
  if (!c->plan) return;
  if (c->route_idx >= 0)
    MHD_add_response_header(
        r, "x-tern-route",
        tn_router_route_name(c->srv->cfg.router, c->route_idx));
  if (c->answered[0]) MHD_add_response_header(r, "x-tern-model", c->answered);
  char v[32];
  snprintf(v, sizeof v, "%d", c->escalations);
  MHD_add_response_header(r, "x-tern-escalations", v);
  if (!isnan(c->confidence)) {
    snprintf(v, sizeof v, "%.6g", c->confidence);
    MHD_add_response_header(r, "x-tern-confidence", v);
  }
}

/* The text rules look at: the last user message (chat; text parts
 * joined) or the first prompt (completions). Points into root. */
static void route_text(const json_t *root, enum tn_api_kind kind,
                       struct tn_buf *out) {
  if (kind == TN_API_COMPLETIONS) {
    const json_t *p = json_object_get(root, "prompt");
    if (json_is_array(p)) p = json_array_get(p, 0);
    if (json_is_string(p))
      tn_buf_append(out, json_string_value(p), json_string_length(p));
    return;
  }
  const json_t *msgs = json_object_get(root, "messages");
  if (!json_is_array(msgs)) return;
  for (size_t i = json_array_size(msgs); i-- > 0;) {
    const json_t *m = json_array_get(msgs, i);
    const json_t *role = json_object_get(m, "role");
    if (!json_is_string(role) || strcmp(json_string_value(role), "user"))
      continue;
    const json_t *ct = json_object_get(m, "content");
    if (json_is_string(ct)) {
      tn_buf_append(out, json_string_value(ct), json_string_length(ct));
    } else if (json_is_array(ct)) {
      for (size_t k = 0; k < json_array_size(ct); k++) {
        const json_t *t = json_object_get(json_array_get(ct, k), "text");
        if (!json_is_string(t)) continue;
        if (out->len) tn_buf_append(out, "\n", 1);
        tn_buf_append(out, json_string_value(t), json_string_length(t));
      }
    }
    return;
  }
}

struct route_ctx {
  struct conn *c;
  const json_t *root;
};

/* Every message's text (or the prompts) in the first model's tokens. */
static int64_t route_count_tokens(void *ctx) {
  struct route_ctx *rc = ctx;
  struct tn_server *s = rc->c->srv;
  struct tn_engine *e = model_engine(s, &s->models[0]);
  if (!e) return -1;
  struct tn_buf text = {0};
  const json_t *msgs = json_object_get(rc->root, "messages");
  const json_t *prompt = json_object_get(rc->root, "prompt");
  for (size_t i = 0; i < json_array_size(msgs); i++) {
    const json_t *ct = json_object_get(json_array_get(msgs, i), "content");
    if (json_is_string(ct))
      tn_buf_append(&text, json_string_value(ct), json_string_length(ct));
    for (size_t k = 0; json_is_array(ct) && k < json_array_size(ct); k++) {
      const json_t *t = json_object_get(json_array_get(ct, k), "text");
      if (json_is_string(t))
        tn_buf_append(&text, json_string_value(t), json_string_length(t));
    }
  }
  if (json_is_string(prompt))
    tn_buf_append(&text, json_string_value(prompt), json_string_length(prompt));
  for (size_t i = 0; json_is_array(prompt) && i < json_array_size(prompt); i++) {
    const json_t *t = json_array_get(prompt, i);
    if (json_is_string(t))
      tn_buf_append(&text, json_string_value(t), json_string_length(t));
  }
  int64_t n = -1;
  if (!text.oom) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    struct tn_error err;
    if (tn_tokenizer_encode(tn_engine_tokenizer(e), text.data ? text.data : "",
                            text.len, false, false, &ids, &n_ids,
                            &err) == TN_OK)
      n = (int64_t)n_ids;
    free(ids);
  }
  tn_buf_free(&text);
  return n;
}

static const char *route_metadata(void *ctx, const char *key) {
  struct route_ctx *rc = ctx;
  return json_string_value(
      json_object_get(json_object_get(rc->root, "metadata"), key));
}

static const char *route_header(void *ctx, const char *name) {
  struct route_ctx *rc = ctx;
  return MHD_lookup_connection_value(rc->c->mhd, MHD_HEADER_KIND, name);
}

/* Whether a target's failure lets the plan try the next one: overload,
 * unavailability and server errors do; the client's own errors do not. */
static bool failure_moves_on(const struct tn_api_error *e) {
  return e->http_status == 429 || e->http_status >= 500;
}

static enum MHD_Result try_steps(struct conn *c);
static int submit_local(struct conn *c, bool probs,
                        struct tn_api_error *aerr);
static enum MHD_Result respond_local(struct conn *c);
static enum MHD_Result relay_wait(struct conn *c);

/* The body for an upstream: the client's, "model" replaced by the name
 * the upstream knows. NULL when out of memory or not an object. */
static char *upstream_body(struct conn *c, const char *model, size_t *len) {
  json_t *root = json_loadb(c->body ? c->body : "", c->len, 0, NULL);
  if (!json_is_object(root)) {
    json_decref(root);
    return NULL;
  }
  json_object_set_new(root, "model", json_string(model));
  char *out = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  if (out) *len = strlen(out);
  return out;
}

static int start_call(struct conn *c, struct tn_api_error *aerr) {
  struct tn_server *s = c->srv;
  const struct tn_serve_upstream_cfg *u =
      tn_router_upstream(s->cfg.router, c->upstream);
  size_t len = 0;
  char *body = upstream_body(c, u->model, &len);
  if (!body)
    return tn_api_error_set(aerr, 400, "invalid_request_error", NULL, NULL,
                            "the request body is not a JSON object");
  char url[2200];
  snprintf(url, sizeof url, "%s/%s", u->base_url,
           c->kind == TN_API_CHAT ? "chat/completions" : "completions");
  struct tn_upstream_spec spec = {
      .url = url,
      .api_key = u->api_key,
      .body = body,
      .len = len,
      .connect_timeout_s = u->connect_timeout_s,
      .timeout_s = u->timeout_s,
      .stall_timeout_s = u->stall_timeout_s,
      .stream = c->relay_stream,
      .notify = conn_wake,
      .user = c,
  };
  spec.max_buffered = spec.stream ? (1u << 20) : (32u << 20);
  struct tn_error err = {0};
  enum tn_status st = tn_upstream_call_start(s->upstreams, &spec, &c->call,
                                             &err);
  free(body);
  if (st)
    return tn_api_error_set(aerr, st == TN_ECANCELED ? 503 : 500,
                            "server_error", NULL, NULL, "%s", err.msg);
  atomic_store(&c->relaying, true);
  c->relay_end = c->relay_ok_event = c->relay_bad = false;
  c->up.len = 0;
  c->up_scanned = 0;
  memset(&c->ust, 0, sizeof c->ust);
  c->up_prompt = c->up_completion = -1;
  c->t_call = tn_time_s();
  return 0;
}

/* The call failed (or answered an error): the next try, the next step, or
 * the error to the client. */
static enum MHD_Result call_failed(struct conn *c, struct tn_api_error *aerr,
                                   const char *outcome) {
  struct tn_server *s = c->srv;
  const struct tn_serve_upstream_cfg *u =
      tn_router_upstream(s->cfg.router, c->upstream);
  metric_inc(s->upstream_calls, u->name, outcome, 1);
  tn_upstream_call_release(c->call);
  c->call = NULL;
  atomic_store(&c->relaying, false);
  bool moves = failure_moves_on(aerr);
  if (moves && c->tries < u->retries && !atomic_load(&s->stopping)) {
    c->tries++;
    struct tn_api_error e2 = {0};
    if (start_call(c, &e2) == 0) return relay_wait(c);
  }
  target_end(c, !moves);
  if (moves && c->plan && c->step + 1 < c->plan->n_steps) {
    c->last_err = *aerr;
    c->step++;
    return try_steps(c);
  }
  return send_error(c, aerr);
}

/* Maps an upstream's error answer to ours: its own OpenAI error when it
 * sent one, else a message with its status. */
static void upstream_error(struct conn *c, int status, const char *body,
                           size_t len, struct tn_api_error *aerr) {
  const struct tn_serve_upstream_cfg *u =
      tn_router_upstream(c->srv->cfg.router, c->upstream);
  json_t *root = json_loadb(body ? body : "", len, 0, NULL);
  const json_t *e = json_object_get(root, "error");
  const char *msg = json_string_value(json_object_get(e, "message"));
  const char *type = json_string_value(json_object_get(e, "type"));
  const char *code = json_string_value(json_object_get(e, "code"));
  const char *param = json_string_value(json_object_get(e, "param"));
  int out = status >= 400 && status < 500 ? status : 502;
  if (status >= 400 && status < 500)
    tn_api_error_set(aerr, out,
                     type ? type : status == 429 ? "rate_limit_error"
                                                 : "invalid_request_error",
                     param, code, "upstream '%s' answered %d: %.300s",
                     u->name, status, msg ? msg : "(no message)");
  else
    tn_api_error_set(aerr, out, "server_error", NULL, "upstream_error",
                     "upstream '%s' answered %d: %.300s", u->name, status,
                     msg ? msg : "(no error message)");
  if (status == 429 && c->ust.retry_after > 0)
    aerr->retry_after = c->ust.retry_after;
  json_decref(root);
}

/* A failure of the transfer itself (no answer, cut, timeout). */
static void transfer_error(struct conn *c, struct tn_api_error *aerr) {
  const struct tn_serve_upstream_cfg *u =
      tn_router_upstream(c->srv->cfg.router, c->upstream);
  if (c->ust.timed_out)
    tn_api_error_set(aerr, 504, "server_error", NULL, "upstream_timeout",
                     "upstream '%s' timed out: %.200s", u->name,
                     c->ust.error);
  else
    tn_api_error_set(aerr, 502, "server_error", NULL,
                     c->ust.connect_failed ? "upstream_unreachable"
                                           : "upstream_error",
                     "upstream '%s' failed: %.200s", u->name, c->ust.error);
}

static double upstream_cost(const struct tn_serve_upstream_cfg *u,
                            int64_t prompt, int64_t completion) {
  if (u->price_prompt < 0 && u->price_completion < 0) return -1;
  return ((double)TN_MAX(prompt, 0) * TN_MAX(u->price_prompt, 0.0) +
          (double)TN_MAX(completion, 0) * TN_MAX(u->price_completion, 0.0)) /
         1e6;
}

/* usage from an upstream's answer (object o): counts, and cost set in it
 * when priced. */
static void take_usage(struct conn *c, json_t *o) {
  json_t *usage = json_object_get(o, "usage");
  if (!json_is_object(usage)) return;
  json_t *p = json_object_get(usage, "prompt_tokens");
  json_t *g = json_object_get(usage, "completion_tokens");
  /* an upstream's numbers are its word: bounded before they count */
  if (json_is_integer(p))
    c->up_prompt = TN_MIN(TN_MAX(json_integer_value(p), 0), 1000000000);
  if (json_is_integer(g))
    c->up_completion = TN_MIN(TN_MAX(json_integer_value(g), 0), 1000000000);
  const struct tn_serve_upstream_cfg *u =
      tn_router_upstream(c->srv->cfg.router, c->upstream);
  double cost = upstream_cost(u, c->up_prompt, c->up_completion);
  if (cost >= 0)
    json_object_set_new(usage, "cost", json_real(cost + c->cost_before));
}

static const char *status_outcome(int status) {
  return status == 429 ? "http_429" : status >= 500 ? "http_5xx" : "http_4xx";
}

/* A relayed answer (or stream event) adds its first choice's text to
 * what the shadow will compare with. */
static void keep_text(struct conn *c, json_t *o) {
  json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
  if (json_integer_value(json_object_get(ch, "index")) != 0) return;
  json_t *m = json_object_get(ch, "message");
  if (!m) m = json_object_get(ch, "delta");
  const char *t = json_string_value(m ? json_object_get(m, "content")
                                      : json_object_get(ch, "text"));
  if (t) tn_buf_append(&c->live_text, t, strlen(t));
}

/* Non-streaming relay: the whole answer, checked, then sent. */
static enum MHD_Result relay_whole(struct conn *c) {
  struct tn_server *s = c->srv;
  struct tn_api_error aerr = {0};
  if (c->ust.failed) {
    transfer_error(c, &aerr);
    return call_failed(c, &aerr,
                       c->ust.timed_out ? "timeout"
                       : c->ust.connect_failed ? "unreachable" : "error");
  }
  int status = c->ust.http_status;
  if (status < 200 || status >= 300) {
    upstream_error(c, status, c->up.data, c->up.len, &aerr);
    return call_failed(c, &aerr, status_outcome(status));
  }
  json_t *root = json_loadb(c->up.data ? c->up.data : "", c->up.len, 0, NULL);
  if (!json_is_object(root) || !json_is_array(json_object_get(root, "choices"))) {
    json_decref(root);
    const struct tn_serve_upstream_cfg *u =
        tn_router_upstream(s->cfg.router, c->upstream);
    tn_api_error_set(&aerr, 502, "server_error", NULL, "upstream_error",
                     "upstream '%s' sent an answer that is not a completion "
                     "(not JSON, or no choices)",
                     u->name);
    return call_failed(c, &aerr, "malformed");
  }
  take_usage(c, root);
  if (c->shadow_idx >= 0) keep_text(c, root);
  char *out = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  metric_inc(s->upstream_calls,
             tn_router_upstream(s->cfg.router, c->upstream)->name, "ok", 1);
  tn_upstream_call_release(c->call);
  c->call = NULL;
  target_end(c, true);
  live_remove(c);
  if (!out)
    return send_error_msg(c, 500, "server_error", NULL, NULL, "out of memory");
  return send_body(c, 200, "application/json", out, strlen(out), 0);
}

/* Streaming relay: the complete SSE events in c->up, checked one by one
 * and copied to c->out; the stream ends well-formed whatever the upstream
 * does (an error event, then [DONE]). Returns false once ended. */
static void relay_events(struct conn *c, bool final) {
  for (;;) {
    if (c->relay_end) return;
    char *d = c->up.data;
    size_t n = c->up.len, end = 0, skip = 0;
    /* from where the last look stopped (a boundary is at most 4 bytes) */
    size_t from = c->up_scanned > 3 ? c->up_scanned - 3 : 0;
    c->up_scanned = n;
    /* an event ends at a blank line: "\n\n", or "\n\r\n" (CRLF lines) */
    for (size_t i = from; i + 1 < n; i++) {
      if (d[i] != '\n') continue;
      if (d[i + 1] == '\n') { end = i; skip = 2; break; }
      if (i + 2 < n && d[i + 1] == '\r' && d[i + 2] == '\n') {
        end = i;
        skip = 3;
        break;
      }
    }
    if (!skip) {
      if (c->up.len > RELAY_EVENT_MAX) { /* no event boundary in sight */
        const struct tn_serve_upstream_cfg *u =
            tn_router_upstream(c->srv->cfg.router, c->upstream);
        tn_buf_printf(&c->out,
                      "data: {\"error\":{\"message\":\"upstream '%s' sent "
                      "an event longer than %d bytes; the stream stops "
                      "here\",\"type\":\"server_error\",\"param\":null,"
                      "\"code\":\"upstream_error\"}}\n\ndata: [DONE]\n\n",
                      u->name, RELAY_EVENT_MAX);
        c->up.len = c->up_scanned = 0;
        c->relay_end = c->relay_bad = true;
        return;
      }
      break;
    }
    /* one event: its data lines joined */
    struct tn_buf data = {0};
    size_t p = 0;
    while (p < end) {
      size_t q = p;
      while (q < end && d[q] != '\n') q++;
      size_t ll = q - p;
      if (ll && d[p + ll - 1] == '\r') ll--;
      if (ll >= 5 && !strncmp(d + p, "data:", 5)) {
        size_t o = p + 5 + (ll > 5 && d[p + 5] == ' ');
        if (data.len) tn_buf_append(&data, "\n", 1);
        tn_buf_append(&data, d + o, p + ll - o);
      }
      p = q + 1;
    }
    memmove(d, d + end + skip, n - end - skip);
    c->up.len = n - end - skip;
    c->up_scanned = 0;
    if (!data.len) { /* a comment or an empty event */
      tn_buf_free(&data);
      continue;
    }
    if (data.len == 6 && !memcmp(data.data, "[DONE]", 6)) {
      tn_buf_append(&c->out, "data: [DONE]\n\n", 14);
      c->relay_end = true;
      tn_buf_free(&data);
      return;
    }
    json_t *o = json_loadb(data.data, data.len, 0, NULL);
    tn_buf_free(&data);
    if (!json_is_object(o)) {
      json_decref(o);
      const struct tn_serve_upstream_cfg *u =
          tn_router_upstream(c->srv->cfg.router, c->upstream);
      tn_buf_printf(&c->out,
                    "data: {\"error\":{\"message\":\"upstream '%s' sent an "
                    "event that is not JSON; the stream stops here\","
                    "\"type\":\"server_error\",\"param\":null,\"code\":"
                    "\"upstream_error\"}}\n\ndata: [DONE]\n\n",
                    u->name);
      c->relay_end = c->relay_bad = true;
      return;
    }
    c->relay_ok_event = true;
    if (json_object_get(o, "usage") && !json_is_null(json_object_get(o, "usage")))
      take_usage(c, o);
    if (c->shadow_idx >= 0) keep_text(c, o);
    char *js = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (js) {
      tn_buf_printf(&c->out, "data: %s\n\n", js);
      free(js);
    }
  }
  if (final && !c->relay_end) {
    const struct tn_serve_upstream_cfg *u =
        tn_router_upstream(c->srv->cfg.router, c->upstream);
    tn_buf_printf(&c->out,
                  "data: {\"error\":{\"message\":\"upstream '%s' ended the "
                  "stream early: %s\",\"type\":\"server_error\",\"param\":"
                  "null,\"code\":\"upstream_error\"}}\n\ndata: [DONE]\n\n",
                  u->name,
                  c->ust.timed_out ? "timed out"
                  : c->ust.failed  ? "the connection failed"
                                   : "no [DONE]");
    c->relay_end = c->relay_bad = true;
  }
}

static ssize_t relay_read(void *cls, uint64_t pos, char *buf, size_t max) {
  struct conn *c = cls;
  (void)pos;
  for (;;) {
    if (c->out_off < c->out.len) return take_out(c, buf, max);
    if (c->relay_end) {
      if (c->call) {
        const struct tn_serve_upstream_cfg *u =
            tn_router_upstream(c->srv->cfg.router, c->upstream);
        bool ok = !c->ust.failed && !c->relay_bad;
        metric_inc(c->srv->upstream_calls, u->name,
                   c->ust.failed ? "cut" : c->relay_bad ? "malformed" : "ok",
                   1);
        tn_upstream_call_release(c->call);
        c->call = NULL;
        target_end(c, ok);
      }
      live_remove(c);
      return MHD_CONTENT_READER_END_OF_STREAM;
    }
    conn_clear_wake(c);
    tn_upstream_call_take(c->call, &c->ust, &c->up);
    if (c->up.oom || c->out.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
    relay_events(c, c->ust.done);
    if (c->out.len > 0 || c->relay_end) continue;
    if (atomic_load(&c->srv->stopping) || atomic_load(&c->client_gone)) {
      live_remove(c);
      return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (conn_suspend(c)) return 0;
  }
}


/* A relayed call's progress, on the HTTP thread: until the answer is
 * whole (non-streaming) or the stream's first valid event (the point
 * after which no fallback is possible), the connection waits. */
static enum MHD_Result relay_wait(struct conn *c) {
  for (;;) {
    conn_clear_wake(c);
    tn_upstream_call_take(c->call, &c->ust, &c->up);
    if (c->up.oom)
      return send_error_msg(c, 500, "server_error", NULL, NULL,
                            "out of memory");
    if (c->ust.headers_done && c->t_call > 0) {
      const char *lv[1] = {
          tn_router_upstream(c->srv->cfg.router, c->upstream)->name};
      struct tn_metric *m =
          c->srv->upstream_latency
              ? tn_metric_series(c->srv->upstream_latency, lv)
              : NULL;
      if (m) tn_metric_observe(m, tn_time_s() - c->t_call);
      c->t_call = 0;
    }
    if (atomic_load(&c->srv->stopping) || atomic_load(&c->client_gone)) {
      live_remove(c);
      target_end(c, true);
      return send_error_msg(c, 503, "server_error", NULL,
                            "server_shutting_down",
                            "the server stopped before the answer was ready");
    }
    if (!c->relay_stream) {
      if (c->ust.done) return relay_whole(c);
    } else if (c->ust.headers_done || c->ust.done) {
      int status = c->ust.http_status;
      struct tn_api_error aerr = {0};
      if (c->ust.failed && !c->ust.headers_done) {
        transfer_error(c, &aerr);
        return call_failed(c, &aerr,
                           c->ust.timed_out ? "timeout"
                           : c->ust.connect_failed ? "unreachable" : "error");
      }
      if (status < 200 || status >= 300) {
        /* an error's body: whole, or its first 64 KiB */
        if (c->ust.done || c->up.len > ERROR_BODY_MAX) {
          upstream_error(c, status, c->up.data,
                         TN_MIN(c->up.len, (size_t)ERROR_BODY_MAX), &aerr);
          return call_failed(c, &aerr, status_outcome(status));
        }
      } else if (strncasecmp(c->ust.content_type, "text/event-stream", 17)) {
        const struct tn_serve_upstream_cfg *u =
            tn_router_upstream(c->srv->cfg.router, c->upstream);
        tn_api_error_set(&aerr, 502, "server_error", NULL, "upstream_error",
                         "upstream '%s' answered a stream request with "
                         "'%.60s', not text/event-stream",
                         u->name, c->ust.content_type);
        return call_failed(c, &aerr, "malformed");
      } else {
        /* hold the first events until one is valid: before that a failure
         * may still fall back */
        relay_events(c, false);
        if (c->relay_ok_event || c->relay_end ||
            (c->ust.done && !c->ust.failed))
          return queue_stream(c, relay_read);
        if (c->ust.done) {
          c->out.len = 0;
          transfer_error(c, &aerr);
          if (!c->ust.failed)
            tn_api_error_set(&aerr, 502, "server_error", NULL,
                             "upstream_error",
                             "upstream '%s' ended the stream before any "
                             "event",
                             tn_router_upstream(c->srv->cfg.router,
                                                c->upstream)->name);
          return call_failed(c, &aerr, "error");
        }
      }
    }
    if (conn_suspend(c)) return MHD_YES;
  }
}

/* Starts plan step c->step and those after it until one takes the
 * request: a local model (submitted) or an upstream (called). */
static enum MHD_Result try_steps(struct conn *c) {
  struct tn_server *s = c->srv;
  struct tn_router *router = s->cfg.router;
  for (; c->step < c->plan->n_steps; c->step++) {
    const struct tn_route_step *st = &c->plan->steps[c->step];
    const char *rname =
        c->route_idx >= 0 ? tn_router_route_name(router, c->route_idx) : "-";
    if (!tn_router_begin(router, st->target)) {
      tn_api_error_set(&c->last_err, 503, "server_error", NULL,
                       "upstream_unavailable",
                       "upstream '%s' is unavailable (failing: its circuit "
                       "breaker is open, or at max_concurrent calls)",
                       st->name);
      if (st->kind == TN_TARGET_UPSTREAM)
        metric_inc(s->upstream_calls, st->name, "skipped", 1);
      continue;
    }
    c->target = st->target;
    snprintf(c->answered, sizeof c->answered, "%s", st->name);
    metric_inc(s->route_decisions, rname, st->name, 1);
    struct tn_api_error aerr = {0};
    if (st->kind == TN_TARGET_UPSTREAM) {
      c->upstream = st->upstream;
      c->tries = 0;
      if (start_call(c, &aerr) == 0) {
        live_add(c);
        c->submitted = true;
        return relay_wait(c);
      }
    } else {
      if (!c->have_q) {
        if (tn_api_parse(c->kind, c->body ? c->body : "", c->len, &c->q,
                         &aerr)) {
          target_end(c, true);
          return send_error(c, &aerr);
        }
        c->have_q = true;
      }
      tn_lora_release(c->lora);
      c->lora = NULL;
      c->adapter[0] = '\0';
      c->model = find_model(s, st->name, &c->lora, &c->lora_scale, &aerr);
      if (c->model && c->lora)
        snprintf(c->adapter, sizeof(c->adapter), "%s", c->lora->name);
      if (c->model && submit_local(c, st->decides, &aerr) == 0)
        return respond_local(c);
      if (!c->model && !aerr.http_status)
        tn_api_error_set(&aerr, 503, "server_error", "model", "model_loading",
                         "the model '%s' is not available", st->name);
    }
    target_end(c, true);
    if (!failure_moves_on(&aerr) || c->step + 1 == c->plan->n_steps)
      return send_error(c, &aerr);
    c->last_err = aerr;
  }
  if (!c->last_err.http_status)
    tn_api_error_set(&c->last_err, 503, "server_error", NULL, NULL,
                     "no target could take the request");
  return send_error(c, &c->last_err);
}

/* A request for a route or an upstream by name. */
/* Plans c->route_idx for the request in root (with c->embedding, when a
 * classifier asked for it) and starts it: the steps, or first the
 * embedding a classifier needs. */
static enum MHD_Result plan_and_go(struct conn *c, const json_t *root) {
  struct tn_server *s = c->srv;
  int route = c->route_idx;
  struct tn_buf text = {0};
  route_text(root, c->kind, &text);
  struct route_ctx rc = {.c = c, .root = root};
  const json_t *tools = json_object_get(root, "tools");
  const json_t *rf = json_object_get(root, "response_format");
  const json_t *rft = json_object_get(rf, "type");
  struct tn_route_input in = {
      .last_user = text.data,
      .last_user_len = text.len,
      .tools = json_is_array(tools) && json_array_size(tools) > 0,
      .response_format =
          json_is_object(rf) &&
          !(json_is_string(rft) && !strcmp(json_string_value(rft), "text")),
      .user = json_string_value(json_object_get(root, "user")),
      .tenant = c->tenant >= 0 ? tn_tenants_name(s->cfg.tenants, c->tenant)
                               : NULL,
      .count_tokens = route_count_tokens,
      .header = route_header,
      .metadata = route_metadata,
      .embedding = c->embedding,
      .n_embd = c->n_embd,
      .embed_route = c->embed_route,
      .ctx = &rc,
  };
  struct tn_error err = {0};
  enum tn_status st = tn_router_plan(s->cfg.router, route, &in, c->plan,
                                     &err);
  if (st) {
    tn_buf_free(&text);
    return send_error_msg(c, st == TN_ENOENT ? 400 : st == TN_EFULL ? 503
                                                                     : 500,
                          st == TN_ENOENT ? "invalid_request_error"
                                          : "server_error",
                          "model", st == TN_EFULL ? "model_loading" : "no_route",
                          err.msg);
  }
  if (c->plan->need_embed >= 0) {
    enum MHD_Result ret = classify_start(c, c->plan->need_embed, text.data,
                                         text.len);
    tn_buf_free(&text);
    return ret;
  }
  tn_buf_free(&text);
  if (!isnan(c->plan->confidence)) c->confidence = c->plan->confidence;
  c->step = 0;
  return try_steps(c);
}

/* A request for a route or an upstream by name. */
static enum MHD_Result route_routed(struct conn *c, const json_t *root,
                                    int route, int upstream) {
  struct tn_server *s = c->srv;
  if (!(c->plan = calloc(1, sizeof *c->plan)))
    return send_error_msg(c, 500, "server_error", NULL, NULL, "out of memory");
  c->route_idx = route;
  c->relay_stream = json_is_true(json_object_get(root, "stream"));
  if (route >= 0) return plan_and_go(c, root);
  struct tn_route_step *st = &c->plan->steps[0];
  c->plan->n_steps = 1;
  st->kind = TN_TARGET_UPSTREAM;
  st->upstream = upstream;
  st->target = tn_router_upstream_target(s->cfg.router, upstream);
  st->name = tn_router_upstream(s->cfg.router, upstream)->name;
  c->step = 0;
  return try_steps(c);
}

/* A classifier needs the request's text embedded by its model: submitted
 * like an /v1/embeddings request; classify_done plans on. */
static enum MHD_Result classify_start(struct conn *c, int route,
                                      const char *text, size_t len) {
  struct tn_server *s = c->srv;
  const char *mname = NULL;
  bool last = false;
  tn_router_classifier(s->cfg.router, route, &mname, &last);
  if (++c->n_classified > 4)
    return send_error_msg(c, 500, "server_error", NULL, NULL,
                          "too many classifiers on one route's way");
  struct tn_lora *lora = NULL;
  float scale = 1;
  struct tn_api_error aerr = {0};
  struct tn_server_model *m = mname ? find_model(s, mname, &lora, &scale,
                                                 &aerr)
                                    : &s->models[0];
  struct tn_engine *e = m ? model_engine(s, m) : NULL;
  if (!e) {
    tn_lora_release(lora);
    return send_error_msg(c, 503, "server_error", "model", "model_loading",
                          "the classifier's model is not loaded yet");
  }
  int32_t *ids = NULL;
  size_t n_ids = 0;
  struct tn_error err = {0};
  enum tn_status st =
      tn_engine_encode_text(e, len ? text : " ", len ? len : 1, &ids, &n_ids,
                            &err);
  if (!st && n_ids >= (size_t)tn_engine_n_ctx(e)) n_ids = (size_t)tn_engine_n_ctx(e) - 1;
  struct tn_gen_params gen;
  tn_gen_params_default(&gen);
  gen.embed = last ? TN_EMBED_LAST : TN_EMBED_MEAN;
  gen.lora = lora;
  gen.lora_scale = scale;
  gen.background = c->shadow;
  struct tn_req *r = NULL;
  if (!st)
    st = tn_engine_submit(e, ids, (int32_t)n_ids, &gen, conn_wake, c, &r,
                          &err);
  free(ids);
  tn_lora_release(lora);
  if (st)
    return send_error_msg(c, st == TN_EFULL ? 429 : 503, "server_error", NULL,
                          NULL, err.msg);
  add_req(c, r);
  c->embed_route = route;
  c->classifying = true;
  c->submitted = true;
  live_add(c);
  return completion_wait(c);
}

/* The classifier's embedding is in: plan again with it. */
static enum MHD_Result classify_done(struct conn *c) {
  struct tn_req *r = c->reqs[0];
  tn_req_lock(r);
  free(c->embedding);
  c->embedding = NULL;
  c->n_embd = 0;
  if (r->embedding && (c->embedding = malloc((size_t)r->n_embd * sizeof(float)))) {
    memcpy(c->embedding, r->embedding, (size_t)r->n_embd * sizeof(float));
    c->n_embd = r->n_embd;
  }
  tn_req_unlock(r);
  live_remove(c);
  cancel_reqs(c);
  c->classifying = false;
  c->submitted = false;
  if (!c->embedding)
    return send_error_msg(c, 500, "server_error", NULL, NULL,
                          "the classifier could not embed the request");
  json_t *root = json_loadb(c->body ? c->body : "", c->len, 0, NULL);
  enum MHD_Result ret = plan_and_go(c, root);
  json_decref(root);
  return ret;
}

static bool deciding(const struct conn *c);

/* A refused engine submission: what was submitted goes, and aerr says why
 * (param: the field a bad request names). */
static int submit_failed(struct conn *c, enum tn_status st,
                         const struct tn_error *err, const char *param,
                         struct tn_api_error *aerr) {
  cancel_reqs(c);
  if (st == TN_EFULL)
    return tn_api_error_set(aerr, 429, "rate_limit_error", NULL,
                            "queue_full", "%s", err->msg);
  if (st == TN_ECANCELED)
    return tn_api_error_set(aerr, 503, "server_error", NULL,
                            "server_shutting_down", "%s", err->msg);
  if (st == TN_ENOMEM)
    return tn_api_error_set(aerr, 500, "server_error", NULL, NULL, "%s",
                            err->msg);
  return tn_api_error_set(aerr, 400, "invalid_request_error", param, NULL,
                          "%s", err->msg);
}

/* An agreement stage's samples: the first prompt again, as one request of
 * k choices (they share its prefix in the cache), short, at the stage's
 * temperature and a fixed seed (a route's choice is deterministic for the
 * same input and config), never longer than the answer may be. */
static int submit_samples(struct conn *c, struct tn_engine *e,
                          const struct tn_gen_params *answer,
                          struct tn_api_error *aerr) {
  const struct tn_route_step *st = &c->plan->steps[c->step];
  struct tn_gen_params gen = *answer;
  gen.n = st->samples;
  gen.max_tokens = answer->max_tokens > 0
                       ? TN_MIN(answer->max_tokens, st->sample_tokens)
                       : st->sample_tokens;
  gen.min_tokens = 0;
  gen.sampling.temperature = (float)st->sample_temperature;
  gen.sampling.seed = 0x5a3e1ull + (uint64_t)c->step;
  gen.logprobs = false;
  gen.sampling.n_logprobs = 0;
  int32_t *ids = NULL;
  size_t n_ids = 0;
  if (build_prompt(c, 0, &ids, &n_ids, aerr)) {
    cancel_reqs(c);
    return aerr->http_status;
  }
  struct tn_error err = {0};
  struct tn_req *r = NULL;
  enum tn_status s = tn_engine_submit(e, ids, (int32_t)n_ids, &gen,
                                      conn_wake, c, &r, &err);
  free(ids);
  if (s) return submit_failed(c, s, &err, NULL, aerr);
  pthread_mutex_lock(&c->srv->mu);
  c->agree = r;
  pthread_mutex_unlock(&c->srv->mu);
  return 0;
}

/* The agreement of c->agree's samples with the first answer (both done);
 * their cost joins cost_before, and the samples are let go. */
static double samples_agreement(struct conn *c) {
  struct tn_req *a = c->agree;
  if (!a || c->n_reqs == 0) return -INFINITY;
  const char *texts[16];
  size_t lens[16];
  bool cut[16];
  size_t k = 0;
  tn_req_lock(a);
  for (int32_t i = 0; i < a->n_choices && k < 16; i++, k++) {
    texts[k] = a->choices[i].text ? a->choices[i].text : "";
    lens[k] = a->choices[i].len;
    cut[k] = a->choices[i].finish == TN_FINISH_LENGTH;
  }
  const struct tn_choice *ans = &c->reqs[0]->choices[0];
  double v = tn_cascade_agreement(ans->text ? ans->text : "", ans->len,
                                  texts, lens, cut, k);
  tn_req_unlock(a);
  c->cost_before += local_cost(c->model, &c->agree, 1);
  pthread_mutex_lock(&c->srv->mu);
  c->agree = NULL;
  pthread_mutex_unlock(&c->srv->mu);
  tn_req_release(a);
  return v;
}

/* Submits c->q to c->model's engine (c->lora set): 0, or the error in
 * aerr. probs: record token probabilities (a cascade stage decides on
 * them). */
static int submit_local(struct conn *c, bool probs,
                        struct tn_api_error *aerr) {
  struct tn_server *s = c->srv;
  enum tn_api_kind kind = c->kind;
  struct tn_engine *e = c->engine = model_engine(s, c->model);
  if (!e)
    return tn_api_error_set(aerr, 503, "server_error", "model",
                            "model_loading",
                            "The model '%.100s' is still loading; retry "
                            "shortly",
                            c->model->name);
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  if (tn_api_check_vocab(&c->q, info.n_vocab, aerr)) return aerr->http_status;
  size_t n_prompts = kind == TN_API_CHAT ? 1 : c->q.n_prompts;
  if (n_prompts > MAX_PROMPTS || n_prompts == 0)
    return tn_api_error_set(aerr, 400, "invalid_request_error", "prompt",
                            NULL, "'prompt' must hold 1..%d prompts, got %zu",
                            MAX_PROMPTS, n_prompts);
  if (n_prompts * (size_t)c->q.gen.n > MAX_SEQS_PER_REQUEST)
    return tn_api_error_set(aerr, 400, "invalid_request_error", "n", NULL,
                            "%zu prompts x n=%d is %zu sequences; one "
                            "request may ask for at most %d",
                            n_prompts, c->q.gen.n,
                            n_prompts * (size_t)c->q.gen.n,
                            MAX_SEQS_PER_REQUEST);
  const char *pparam = kind == TN_API_CHAT ? "messages" : "prompt";
  int32_t n_ctx = tn_engine_n_ctx(e);
  struct tn_gen_params gen = c->q.gen;
  if (c->q.has_lora_scale && !c->lora)
    return tn_api_error_set(aerr, 400, "invalid_request_error", "lora_scale",
                            NULL,
                            "'lora_scale' needs a model that names an "
                            "adapter; '%.100s' is a base model",
                            c->model->name);
  gen.lora = c->lora;
  gen.lora_scale = c->q.has_lora_scale ? c->q.lora_scale : c->lora_scale;
  gen.background = c->shadow;
  if (probs) {
    /* the chosen tokens' probabilities and the runner-up's (margin) */
    gen.logprobs = true;
    if (gen.sampling.n_logprobs < 2) gen.sampling.n_logprobs = 2;
  }
  /* Without max_tokens, completions stop at 16 tokens (OpenAI's default);
   * chat runs to the end of the context. */
  gen.max_tokens = c->q.max_tokens > 0 ? c->q.max_tokens
                   : kind == TN_API_COMPLETIONS ? 16
                                                : 0;
  if (!c->q.has_seed) gen.sampling.seed = random_seed();
  for (size_t i = 0; i < n_prompts; i++) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (build_prompt(c, i, &ids, &n_ids, aerr)) {
      cancel_reqs(c);
      return aerr->http_status;
    }
    if (n_ids >= (size_t)n_ctx) {
      free(ids);
      cancel_reqs(c);
      return tn_api_error_set(aerr, 400, "invalid_request_error", pparam,
                              "context_length_exceeded",
                              "This model's maximum context length is %d "
                              "tokens, but the prompt is %zu tokens",
                              n_ctx, n_ids);
    }
    if (c->q.max_tokens > 0 &&
        n_ids + (size_t)c->q.max_tokens > (size_t)n_ctx) {
      free(ids);
      cancel_reqs(c);
      return tn_api_error_set(aerr, 400, "invalid_request_error",
                              "max_tokens", "context_length_exceeded",
                              "This model's maximum context length is %d "
                              "tokens; the prompt is %zu tokens and "
                              "max_tokens is %d, together %zu",
                              n_ctx, n_ids, c->q.max_tokens,
                              n_ids + (size_t)c->q.max_tokens);
    }
    struct tn_error err = {0};
    struct tn_req *r = NULL;
    enum tn_status st = tn_engine_submit(e, ids, (int32_t)n_ids, &gen,
                                         conn_wake, c, &r, &err);
    free(ids);
    if (st) return submit_failed(c, st, &err, pparam, aerr);
    add_req(c, r);
  }
  if (probs && deciding(c) &&
      c->plan->steps[c->step].signal == TN_SIGNAL_AGREEMENT)
    return submit_samples(c, e, &gen, aerr);
  return 0;
}


/* Whether the step running now is a cascade stage that decides. */
static bool deciding(const struct conn *c) {
  return c->plan && c->plan->cascade && c->step < c->plan->n_steps &&
         c->plan->steps[c->step].decides;
}

/* The submitted requests wait for their answer: a stream starts now,
 * unless a cascade stage must finish (and decide) first. */
static enum MHD_Result respond_local(struct conn *c) {
  c->submitted = true;
  if (!c->id[0]) {
    make_id(c->id, sizeof(c->id),
            c->kind == TN_API_CHAT ? "chatcmpl-" : "cmpl-");
    c->created = (long)time(NULL);
  }
  live_add(c);
  if (!c->q.stream || deciding(c)) return completion_wait(c);
  return queue_stream(c, stream_read);
}

/* A tenant's request: the name it calls must be allowed, and its rates
 * and budget must have room (estimates: the body's bytes / 4 prompt
 * tokens, max_tokens x n completion tokens or 1024 when unset, at the
 * highest configured prices). False when it was answered (403, 429). */
static bool admit_tenant(struct conn *c, const json_t *root,
                         const char *name) {
  struct tn_server *s = c->srv;
  struct tn_tenants *ts = s->cfg.tenants;
  const char *tname = tn_tenants_name(ts, c->tenant);
  if (!tn_tenants_allows(ts, c->tenant, name)) {
    char msg[300];
    snprintf(msg, sizeof msg,
             "tenant '%.64s' may not call the model '%.100s'", tname,
             name ? name : "(default)");
    metric_inc(s->tenant_rejections, tname, "not_allowed", 1);
    send_error_msg(c, 403, "invalid_request_error", "model",
                   "model_not_allowed", msg);
    return false;
  }
  /* the client's numbers, bounded before any arithmetic */
  json_int_t mt = json_integer_value(json_object_get(root, "max_tokens"));
  if (mt <= 0)
    mt = json_integer_value(json_object_get(root, "max_completion_tokens"));
  double out = mt > 0 ? (double)TN_MIN(mt, (json_int_t)1 << 24) : 1024.0;
  json_int_t n = json_integer_value(json_object_get(root, "n"));
  if (n > 1) out *= (double)TN_MIN(n, (json_int_t)MAX_SEQS_PER_REQUEST);
  double prompt = (double)(c->len / 4) + 1;
  int64_t tokens = (int64_t)(prompt + out);
  double pp, pc;
  price_bounds(s, name, &pp, &pc);
  double cost = (prompt * pp + out * pc) / 1e6;
  int retry = 0;
  enum tn_admit a = tn_tenants_admit(ts, c->tenant, tokens, cost, wall_s(),
                                     &retry, &c->ticket);
  if (a == TN_ADMIT_OK) return true;
  static const char *const reason[] = {"", "rpm", "tpm", "budget"};
  metric_inc(s->tenant_rejections, tname, reason[a], 1);
  struct tn_api_error aerr = {0};
  if (a == TN_ADMIT_BUDGET)
    tn_api_error_set(&aerr, 429, "insufficient_quota", NULL,
                     "insufficient_quota",
                     "tenant '%.64s' has spent its budget for today (%.4g "
                     "USD); it renews at 00:00 UTC",
                     tname, tn_tenants_spent_today(ts, c->tenant, wall_s()));
  else
    tn_api_error_set(&aerr, 429, "rate_limit_error", NULL,
                     "rate_limit_exceeded",
                     "tenant '%.64s' is over its %s limit; retry in %d s",
                     tname,
                     a == TN_ADMIT_RPM ? "requests per minute"
                                       : "tokens per minute",
                     retry);
  aerr.retry_after = retry;
  send_error(c, &aerr);
  return false;
}

/* Whether the request called by name gets a shadow replay (drawn now,
 * so a relayed answer's text is kept as it passes). */
static void pick_shadow(struct conn *c, const char *name) {
  struct tn_shadows *sh = c->srv->shadows;
  if (c->shadow || !sh) return;
  int i = tn_shadows_find(sh, name);
  if (i >= 0 && tn_shadows_sample(sh, i)) c->shadow_idx = i;
}

static enum MHD_Result route_completion(struct conn *c, enum tn_api_kind kind) {
  struct tn_server *s = c->srv;
  struct tn_api_error aerr = {0};
  c->kind = kind;
  if (atomic_load(&s->draining))
    return send_error_msg(c, 503, "server_error", NULL,
                          "server_shutting_down",
                          "the server is shutting down; send the request to "
                          "another replica");
  if (c->too_large) {
    char msg[160];
    snprintf(msg, sizeof(msg),
             "the request body is larger than the limit of %zu bytes",
             s->cfg.max_body);
    return send_error_msg(c, 413, "invalid_request_error", NULL,
                          "request_too_large", msg);
  }
  if (s->cfg.router || c->tenant >= 0) {
    json_t *root = json_loadb(c->body ? c->body : "", c->len, 0, NULL);
    const char *name = json_string_value(json_object_get(root, "model"));
    if (c->tenant >= 0 && !admit_tenant(c, root, name)) {
      json_decref(root);
      return MHD_YES; /* answered */
    }
    /* a route or an upstream named as the model */
    int route = name && s->cfg.router ? tn_router_find(s->cfg.router, name)
                                      : -1;
    int up = name && s->cfg.router && route < 0
                 ? tn_router_find_upstream(s->cfg.router, name)
                 : -1;
    if (route >= 0 || up >= 0) {
      pick_shadow(c, route >= 0 ? tn_router_route_name(s->cfg.router, route)
                                : tn_router_upstream(s->cfg.router, up)->name);
      enum MHD_Result ret = route_routed(c, root, route, up);
      json_decref(root);
      return ret;
    }
    json_decref(root);
  }
  if (tn_api_parse(kind, c->body ? c->body : "", c->len, &c->q, &aerr))
    return send_error(c, &aerr);
  c->have_q = true;
  c->model = find_model(s, c->q.model, &c->lora, &c->lora_scale, &aerr);
  if (!c->model && !aerr.http_status)
    c->model = adapter_on_demand(s, c->q.model, &c->lora, &c->lora_scale,
                                 &aerr);
  if (aerr.http_status) return send_error(c, &aerr);
  if (c->lora) snprintf(c->adapter, sizeof(c->adapter), "%s", c->lora->name);
  if (!c->model) {
    tn_api_error_set(&aerr, 404, "invalid_request_error", "model",
                     "model_not_found", "The model '%.100s' does not exist",
                     c->q.model);
    return send_error(c, &aerr);
  }
  pick_shadow(c, c->lora ? c->adapter : c->model->name);
  if (submit_local(c, false, &aerr)) return send_error(c, &aerr);
  return respond_local(c);
}

/* ---- POST /v1/embeddings */

static void put_base64(struct tn_buf *b, const unsigned char *p, size_t n) {
  static const char tbl[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)p[i] << 16;
    if (i + 1 < n) v |= (uint32_t)p[i + 1] << 8;
    if (i + 2 < n) v |= p[i + 2];
    char q[4] = {tbl[(v >> 18) & 63], tbl[(v >> 12) & 63],
                 i + 1 < n ? tbl[(v >> 6) & 63] : '=',
                 i + 2 < n ? tbl[v & 63] : '='};
    tn_buf_append(b, q, 4);
  }
}

/* The answer (under lock_reqs; every request done). NULL: out of memory. */
static char *render_embeddings(struct conn *c, size_t *len) {
  struct tn_buf b = {0};
  tn_buf_printf(&b, "{\"object\":\"list\",\"data\":[");
  int64_t prompt = 0;
  for (size_t i = 0; i < c->n_reqs; i++) {
    struct tn_req *r = c->reqs[i];
    prompt += r->n_prompt;
    tn_buf_printf(&b, "%s{\"object\":\"embedding\",\"index\":%zu,"
                  "\"embedding\":", i ? "," : "", i);
    double norm = 0;
    for (int32_t j = 0; j < r->n_embd; j++)
      norm += (double)r->embedding[j] * r->embedding[j];
    double scale = c->normalize && norm > 0 ? 1.0 / sqrt(norm) : 1.0;
    if (c->base64) {
      float *v = malloc((size_t)r->n_embd * sizeof(float) + 1);
      if (!v) {
        tn_buf_free(&b);
        return NULL;
      }
      for (int32_t j = 0; j < r->n_embd; j++)
        v[j] = (float)(r->embedding[j] * scale);
      tn_buf_append(&b, "\"", 1);
      put_base64(&b, (const unsigned char *)v, (size_t)r->n_embd * 4);
      tn_buf_append(&b, "\"", 1);
      free(v);
    } else {
      tn_buf_append(&b, "[", 1);
      for (int32_t j = 0; j < r->n_embd; j++)
        tn_buf_printf(&b, "%s%.9g", j ? "," : "",
                      (double)(float)(r->embedding[j] * scale));
      tn_buf_append(&b, "]", 1);
    }
    tn_buf_append(&b, "}", 1);
  }
  tn_buf_printf(&b, "],\"model\":");
  json_t *name = json_string(c->q.model ? c->q.model : c->model->name);
  char *js = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
  tn_buf_printf(&b, "%s", js ? js : "\"\"");
  free(js);
  json_decref(name);
  tn_buf_printf(&b, ",\"usage\":{\"prompt_tokens\":%" PRId64
                ",\"total_tokens\":%" PRId64 "}}", prompt, prompt);
  if (b.oom) {
    tn_buf_free(&b);
    return NULL;
  }
  *len = b.len;
  return b.data;
}

static enum MHD_Result embed_error(struct conn *c, int status,
                                   const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static enum MHD_Result embed_error(struct conn *c, int status,
                                   const char *param, const char *fmt, ...) {
  char msg[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  cancel_reqs(c);
  return send_error_msg(c, status,
                        status >= 500 ? "server_error" : "invalid_request_error",
                        param, NULL, msg);
}

/* input: a string, a list of strings, a list of token ids or a list of
 * lists of them; each becomes one engine request whose prompt is that
 * text (the model's own BOS convention, no chat template). */
static enum MHD_Result route_embeddings(struct conn *c) {
  struct tn_server *s = c->srv;
  if (atomic_load(&s->draining))
    return send_error_msg(c, 503, "server_error", NULL,
                          "server_shutting_down", "the server is shutting down");
  if (c->too_large)
    return send_error_msg(c, 413, "invalid_request_error", NULL,
                          "request_too_large", "the body is too large");
  json_error_t jerr;
  json_t *root = json_loadb(c->body ? c->body : "", c->len, 0, &jerr);
  if (!json_is_object(root)) {
    json_decref(root);
    return send_error_msg(c, 400, "invalid_request_error", NULL, NULL,
                          "the body is not a JSON object");
  }
  static const char *const known[] = {"model", "input", "encoding_format",
                                      "dimensions", "user", "pooling",
                                      "normalize"};
  const char *k;
  json_t *v;
  json_object_foreach(root, k, v) {
    size_t i = 0;
    while (i < TN_ARRAY_LEN(known) && strcmp(k, known[i])) i++;
    if (i == TN_ARRAY_LEN(known)) {
      enum MHD_Result r = embed_error(c, 400, k,
                                      "unknown parameter '%.64s' for "
                                      "/v1/embeddings",
                                      k);
      json_decref(root);
      return r;
    }
  }
  const char *name = json_string_value(json_object_get(root, "model"));
  const char *fmt =
      json_string_value(json_object_get(root, "encoding_format"));
  const char *pool = json_string_value(json_object_get(root, "pooling"));
  json_t *norm = json_object_get(root, "normalize");
  json_t *input = json_object_get(root, "input");
  json_t *dims = json_object_get(root, "dimensions");
  enum MHD_Result ret;
  if (c->tenant >= 0 && !admit_tenant(c, root, name)) {
    json_decref(root);
    return MHD_YES;
  }
  if ((json_object_get(root, "encoding_format") &&
       (!fmt || (strcmp(fmt, "float") && strcmp(fmt, "base64")))) ||
      (json_object_get(root, "pooling") &&
       (!pool || (strcmp(pool, "mean") && strcmp(pool, "last")))) ||
      (norm && !json_is_boolean(norm))) {
    ret = embed_error(c, 400,
                      fmt && strcmp(fmt, "float") && strcmp(fmt, "base64")
                          ? "encoding_format"
                      : norm && !json_is_boolean(norm) ? "normalize"
                                                       : "pooling",
                      "'encoding_format' is float or base64, 'pooling' mean "
                      "or last, 'normalize' true or false");
    json_decref(root);
    return ret;
  }
  c->base64 = fmt && !strcmp(fmt, "base64");
  c->pooling = pool && !strcmp(pool, "last") ? TN_EMBED_LAST : TN_EMBED_MEAN;
  c->normalize = !norm || json_is_true(norm);
  c->embeddings = true;
  c->have_q = true; /* (q only names the model) */
  memset(&c->q, 0, sizeof c->q);
  struct tn_api_error aerr = {0};
  if (name && !(c->q.model = strdup(name))) {
    json_decref(root);
    return send_error_msg(c, 500, "server_error", NULL, NULL, "out of memory");
  }
  c->model = find_model(s, name, &c->lora, &c->lora_scale, &aerr);
  if (aerr.http_status) {
    json_decref(root);
    return send_error(c, &aerr);
  }
  if (!c->model) {
    json_decref(root);
    return send_error_msg(c, 404, "invalid_request_error", "model",
                          "model_not_found",
                          "the model does not exist (embeddings come from a "
                          "local model, not a route or an upstream)");
  }
  struct tn_engine *e = c->engine = model_engine(s, c->model);
  if (!e) {
    json_decref(root);
    return send_error_msg(c, 503, "server_error", "model", "model_loading",
                          "the model is still loading; retry shortly");
  }
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  if (dims && (!json_is_integer(dims) ||
               json_integer_value(dims) != info.n_embd)) {
    ret = embed_error(c, 400, "dimensions",
                      "'dimensions' must be this model's width, %d (it does "
                      "not shorten embeddings)",
                      info.n_embd);
    json_decref(root);
    return ret;
  }
  /* the inputs: n of them, each text or ids */
  size_t n = json_is_array(input) ? json_array_size(input) : 1;
  bool ids_one = json_is_array(input) && n > 0 &&
                 json_is_integer(json_array_get(input, 0));
  if (ids_one) n = 1;
  if (!input || (!json_is_string(input) && !json_is_array(input)) || n == 0 ||
      n > MAX_PROMPTS) {
    ret = embed_error(c, 400, "input",
                      "'input' must be a string, a list of 1..%d strings, a "
                      "list of token ids or a list of such lists",
                      MAX_PROMPTS);
    json_decref(root);
    return ret;
  }
  struct tn_gen_params gen;
  tn_gen_params_default(&gen);
  gen.embed = c->pooling;
  gen.lora = c->lora;
  gen.lora_scale = c->lora_scale;
  int32_t n_ctx = tn_engine_n_ctx(e);
  for (size_t i = 0; i < n; i++) {
    json_t *in = json_is_string(input) || ids_one ? input
                                                  : json_array_get(input, i);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    struct tn_error err = {0};
    if (json_is_string(in)) {
      if (json_string_length(in) == 0) {
        ret = embed_error(c, 400, "input", "input[%zu] is an empty string", i);
        json_decref(root);
        return ret;
      }
      if (tn_engine_encode_text(e, json_string_value(in),
                                json_string_length(in), &ids, &n_ids, &err)) {
        ret = embed_error(c, 400, "input", "input[%zu]: %s", i, err.msg);
        json_decref(root);
        return ret;
      }
    } else if (json_is_array(in) && json_array_size(in) > 0) {
      n_ids = json_array_size(in);
      ids = malloc(n_ids * sizeof(int32_t));
      for (size_t j = 0; ids && j < n_ids; j++) {
        json_t *t = json_array_get(in, j);
        json_int_t id = json_integer_value(t);
        if (!json_is_integer(t) || id < 0 || id >= info.n_vocab) {
          free(ids);
          ret = embed_error(c, 400, "input",
                            "input[%zu][%zu] is not a token id of this "
                            "model (0..%d)",
                            i, j, info.n_vocab - 1);
          json_decref(root);
          return ret;
        }
        ids[j] = (int32_t)id;
      }
    } else {
      ret = embed_error(c, 400, "input",
                        "input[%zu] is not a non-empty string or list of "
                        "token ids",
                        i);
      json_decref(root);
      return ret;
    }
    if (!ids) {
      json_decref(root);
      return embed_error(c, 500, NULL, "out of memory");
    }
    if (n_ids >= (size_t)n_ctx) {
      free(ids);
      ret = embed_error(c, 400, "input",
                        "input[%zu] is %zu tokens; this model's context is "
                        "%d",
                        i, n_ids, n_ctx);
      json_decref(root);
      return ret;
    }
    struct tn_req *r = NULL;
    enum tn_status st = tn_engine_submit(e, ids, (int32_t)n_ids, &gen,
                                         conn_wake, c, &r, &err);
    free(ids);
    if (st) {
      ret = embed_error(c, st == TN_EFULL ? 429 : st == TN_ECANCELED ? 503
                                                                      : 400,
                        NULL, "%s", err.msg);
      json_decref(root);
      return ret;
    }
    add_req(c, r);
  }
  json_decref(root);
  c->submitted = true;
  live_add(c);
  return completion_wait(c);
}

/* ---- auth */

/* k equals the key, in time that does not depend on where they differ */
static bool key_equal(const char *k, const char *want) {
  size_t nk = strlen(k), nw = strlen(want);
  unsigned char diff = nk != nw;
  for (size_t i = 0; i < nw; i++) diff |= (unsigned char)(want[i] ^ k[i < nk ? i : 0]);
  return diff == 0;
}

/* 'Authorization: Bearer KEY'; with basic, also HTTP Basic auth whose
 * password is the key (any user name): what a browser sends. */
static bool auth_ok(struct tn_server *s, struct MHD_Connection *mc,
                    bool basic) {
  if (!s->cfg.api_key || !*s->cfg.api_key) return true;
  const char *h =
      MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
  if (h && !strncmp(h, "Bearer ", 7)) return key_equal(h + 7, s->cfg.api_key);
  if (!basic || !h || strncmp(h, "Basic ", 6) != 0) return false;
  char *pass = NULL;
  char *user = MHD_basic_auth_get_username_password(mc, &pass);
  bool ok = pass && key_equal(pass, s->cfg.api_key);
  MHD_free(user);
  MHD_free(pass);
  return ok;
}

/* ---- the dashboard */

struct args {
  struct tn_dash_arg v[TN_DASH_ARGS_MAX];
  int n; /* counts past the array: too many */
};

static enum MHD_Result collect_arg(void *cls, enum MHD_ValueKind kind,
                                   const char *key, const char *value) {
  struct args *a = cls;
  (void)kind;
  if (a->n < TN_DASH_ARGS_MAX) a->v[a->n] = (struct tn_dash_arg){key, value};
  a->n++;
  return MHD_YES;
}

static enum MHD_Result route_dashboard(struct conn *c, const char *url,
                                       bool get) {
  struct tn_server *s = c->srv;
  bool page = !strcmp(url, "/dashboard");
  c->route = page ? "/dashboard" : "/api";
  c->dashboard = true;
  if (s->cfg.tenants && (!s->cfg.api_key || !*s->cfg.api_key))
    return send_error_msg(c, 403, "invalid_request_error", NULL,
                          "permission_denied",
                          "with tenants the dashboard needs the server's "
                          "api_key (set api_key in the config)");
  if (!auth_ok(s, c->mhd, true))
    return send_error_msg(c, 401, "invalid_request_error", NULL,
                          "invalid_api_key",
                          "Incorrect or missing API key: send "
                          "'Authorization: Bearer <key>', or the key as the "
                          "password of HTTP Basic auth");
  if (!get)
    return send_error_msg(c, 405, "invalid_request_error", NULL,
                          "method_not_allowed",
                          "this route does not accept that HTTP method");
  if (page) {
    char *b = malloc(tn_dashboard_html_len);
    if (!b) return MHD_NO;
    memcpy(b, tn_dashboard_html, tn_dashboard_html_len);
    return send_body(c, 200, "text/html; charset=utf-8", b,
                     tn_dashboard_html_len, 0);
  }
  struct args a = {0};
  MHD_get_connection_values(c->mhd, MHD_GET_ARGUMENT_KIND, collect_arg, &a);
  struct tn_dash_ctx ctx = {
      .stats = s->stats,
      .log_path = tn_reqlog_path(s->cfg.reqlog),
      .now_s = wall_s(),
      .args = a.v,
      .n_args = a.n,
  };
  struct tn_api_error err;
  size_t len = 0;
  char *body = tn_dash_api(&ctx, url, &len, &err);
  if (!body) return send_error(c, &err);
  return send_body(c, 200, "application/json", body, len, 0);
}

/* ---- the access handler */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc,
                                  const char *url, const char *method,
                                  const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  struct tn_server *s = cls;
  struct conn *c = *con_cls;
  (void)version;
  if (!c) {
    c = conn_new(s, mc);
    if (!c) return MHD_NO;
    *con_cls = c;
    const char *cl =
        MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
    if (cl) {
      char *end = NULL;
      errno = 0;
      unsigned long long v = strtoull(cl, &end, 10);
      if (errno || end == cl || v > s->cfg.max_body) c->too_large = true;
    }
    return MHD_YES;
  }
  if (*upload_size) {
    size_t n = *upload_size;
    *upload_size = 0;
    if (c->too_large) return MHD_YES; /* read and dropped */
    if (c->len + n > s->cfg.max_body) {
      c->too_large = true;
      free(c->body);
      c->body = NULL;
      c->len = c->cap = 0;
      return MHD_YES;
    }
    if (c->len + n + 1 > c->cap) {
      size_t cap = c->cap ? c->cap : 4096;
      while (cap < c->len + n + 1) cap *= 2;
      char *b = realloc(c->body, cap);
      if (!b) return MHD_NO;
      c->body = b;
      c->cap = cap;
    }
    memcpy(c->body + c->len, upload, n);
    c->len += n;
    c->body[c->len] = '\0';
    return MHD_YES;
  }
  if (c->submitted) /* resumed */
    return atomic_load(&c->relaying) ? relay_wait(c) : completion_wait(c);

  bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
  bool post = !strcmp(method, "POST");
  if (!strcmp(url, "/health")) {
    c->route = "/health";
    return send_json(c, 200, "{\"status\":\"ok\"}");
  }
  if (!strcmp(url, "/ready")) {
    c->route = "/ready";
    if (atomic_load(&s->draining))
      return send_error_msg(c, 503, "server_error", NULL,
                            "server_shutting_down",
                            "the server is shutting down");
    if (!all_loaded(s))
      return send_error_msg(c, 503, "server_error", NULL, "model_loading",
                            "models are still loading");
    return send_json(c, 200, "{\"status\":\"ready\"}");
  }
  if (!strcmp(url, "/metrics")) {
    c->route = "/metrics";
    return route_metrics(c);
  }
  bool v1 = !strncmp(url, "/v1/", 4);
  if (v1 && strcmp(url, "/v1/models") != 0) {
    snprintf(c->log_endpoint, sizeof(c->log_endpoint), "%s", url);
    if (s->cfg.tracer &&
        !tn_traceparent_parse(
            MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "traceparent"),
            &c->trace))
      tn_trace_ctx_new(&c->trace, tn_tracer_sample(s->cfg.tracer));
  }
  if (!strcmp(url, "/dashboard") || !strncmp(url, "/api/", 5))
    return route_dashboard(c, url, get);
  bool tenant_key = false;
  if (v1 && s->shadows) {
    /* a replay from our own shadow worker (the secret is per process) */
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND,
                                                TN_SHADOW_HEADER);
    if (h && key_equal(h, s->shadow_secret)) {
      c->shadow = true;
      const char *of = MHD_lookup_connection_value(mc, MHD_HEADER_KIND,
                                                   TN_SHADOW_OF_HEADER);
      snprintf(c->shadow_of, sizeof c->shadow_of, "%.64s", of ? of : "");
    }
  }
  if (v1 && s->cfg.tenants && !c->shadow) {
    const char *h =
        MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    if (h && !strncmp(h, "Bearer ", 7)) {
      c->tenant = tn_tenants_find_key(s->cfg.tenants, h + 7);
      tenant_key = c->tenant >= 0;
    }
  }
  bool admin = c->shadow ? true
               : s->cfg.api_key && *s->cfg.api_key ? auth_ok(s, mc, false)
                                                   : !s->cfg.tenants;
  if (v1 && !admin && !tenant_key) {
    c->route = "auth";
    return send_error_msg(c, 401, "invalid_request_error", NULL,
                          "invalid_api_key",
                          "Incorrect or missing API key: send "
                          "'Authorization: Bearer <key>'");
  }
  enum tn_api_kind kind;
  if (!strcmp(url, "/v1/load_lora_adapter") ||
      !strcmp(url, "/v1/unload_lora_adapter")) {
    bool load = url[4] == 'l';
    c->route = load ? "/v1/load_lora_adapter" : "/v1/unload_lora_adapter";
    if (!post) goto bad_method;
    if (!admin)
      return send_error_msg(c, 403, "invalid_request_error", NULL,
                            "permission_denied",
                            "loading adapters takes the server's api_key, "
                            "not a tenant's key");
    if (c->too_large)
      return send_error_msg(c, 413, "invalid_request_error", NULL,
                            "request_too_large", "the body is too large");
    return route_adapter(c, load);
  }
  if (!strcmp(url, "/v1/models")) {
    c->route = "/v1/models";
    if (!get) goto bad_method;
    return route_models(c);
  }
  if (!strcmp(url, "/v1/embeddings")) {
    c->route = "/v1/embeddings";
    if (!post) goto bad_method;
    atomic_fetch_add(&s->in_flight, 1);
    c->counted = true;
    return route_embeddings(c);
  }
  if (!strcmp(url, "/v1/chat/completions")) {
    c->route = "/v1/chat/completions";
    kind = TN_API_CHAT;
  } else if (!strcmp(url, "/v1/completions")) {
    c->route = "/v1/completions";
    kind = TN_API_COMPLETIONS;
  } else {
    c->route = "other";
    return send_error_msg(c, 404, "invalid_request_error", NULL,
                          "unknown_url",
                          "Unknown request URL: no such route on this "
                          "server (try /v1/chat/completions, "
                          "/v1/completions, /v1/models)");
  }
  if (!post) goto bad_method;
  atomic_fetch_add(&s->in_flight, 1);
  c->counted = true;
  return route_completion(c, kind);
bad_method:
  return send_error_msg(c, 405, "invalid_request_error", NULL,
                        "method_not_allowed",
                        "this route does not accept that HTTP method");
}

/* ---- the reaper: cancel requests whose client hung up */

/* The dashboard's gauges: each loaded model's engine, once a second. */
static void sample_gauges(struct tn_server *s) {
  double now = wall_s();
  for (int i = 0; i < s->n_models; i++) {
    struct tn_engine *e = atomic_load(&s->engines[i]);
    if (!e) continue;
    struct tn_engine_stats st;
    tn_engine_stats(e, &st);
    double kv = st.kv_blocks_total > 0
                    ? (double)st.kv_blocks_used / st.kv_blocks_total
                    : 0;
    tn_stats_gauges(s->stats, now, s->models[i].name, st.running, st.waiting,
                    kv);
  }
}

static void *reaper_main(void *arg) {
  struct tn_server *s = arg;
  int ticks = 0;
  while (!atomic_load(&s->stop)) {
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (++ticks % 10 == 0) sample_gauges(s);
    pthread_mutex_lock(&s->mu);
    for (struct conn *c = s->live; c; c = c->live_next) {
      if (c->fd < 0) continue;
      struct pollfd p = {.fd = c->fd, .events = POLLRDHUP};
      if (poll(&p, 1, 0) > 0 &&
          (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) {
        atomic_store(&c->client_gone, true);
        for (size_t i = 0; i < c->n_reqs; i++) tn_req_cancel(c->reqs[i]);
        if (atomic_load(&c->relaying))
          conn_wake(c); /* it releases (cancels) its call */
        c->fd = -1; /* once is enough */
      }
    }
    pthread_mutex_unlock(&s->mu);
  }
  return NULL;
}

/* ---- the dashboard's history: after a restart, the log's last 24 hours
 * fill the statistics (ITL as each request's mean gap: the log keeps no
 * gap histogram), on a thread of their own so serving starts at once. */

static double num_col(json_t *o, const char *k) {
  json_t *v = json_object_get(o, k);
  return json_is_number(v) ? json_number_value(v) : -1;
}

static bool backfill_row(void *user, json_t *o) {
  struct tn_server *s = user;
  if (atomic_load(&s->stop)) return false;
  struct tn_reqlog_row r = {
      .model = json_string_value(json_object_get(o, "model")),
      .tenant = json_string_value(json_object_get(o, "tenant")),
      .status = (int)TN_MAX(num_col(o, "status"), 0),
      .finish = json_string_value(json_object_get(o, "finish_reason")),
      .error = json_string_value(json_object_get(o, "error")),
      .prompt_tokens = (int64_t)num_col(o, "prompt_tokens"),
      .cached_tokens = (int64_t)num_col(o, "cached_tokens"),
      .completion_tokens = (int64_t)num_col(o, "completion_tokens"),
      .ttft_s = num_col(o, "ttft_ms") / 1000.0,
      .e2e_s = num_col(o, "e2e_ms") / 1000.0,
      .cost = num_col(o, "cost"),
  };
  double ts = num_col(o, "ts") / 1000.0;
  double end = ts + TN_MAX(r.e2e_s, 0.0);
  uint32_t itl[TN_LAT_BUCKETS] = {0};
  double gap = num_col(o, "itl_mean_ms") / 1000.0;
  bool have_itl = gap >= 0 && r.completion_tokens > 1;
  if (have_itl)
    itl[tn_lat_bucket(gap)] = (uint32_t)TN_MIN(r.completion_tokens - 1,
                                               (int64_t)UINT32_MAX);
  if (ts > 0) tn_stats_add(s->stats, end, &r, have_itl ? itl : NULL);
  /* a tenant's spend today counts toward its budget after a restart */
  if (s->cfg.tenants && r.tenant && r.cost > 0 && ts > 0 &&
      floor(ts / 86400.0) == floor(wall_s() / 86400.0))
    tn_tenants_add_spent(s->cfg.tenants, r.tenant, r.cost, ts);
  return true;
}

static void *backfill_main(void *arg) {
  struct tn_server *s = arg;
  struct tn_reqlog_filter f;
  tn_reqlog_filter_init(&f);
  f.limit = 0;
  /* rows that arrived up to now: later ones are counted live */
  double now = wall_s();
  f.since_ms = (int64_t)((now - 86400.0) * 1000.0);
  f.until_ms = (int64_t)(now * 1000.0);
  struct tn_error err = {0};
  double t0 = tn_time_s();
  if (tn_reqlog_read(tn_reqlog_path(s->cfg.reqlog), &f, backfill_row, s,
                     &err) != TN_OK)
    tn_log_warn("dashboard: cannot read the request log's history: %s",
                err.msg);
  else
    tn_log_debug("dashboard: the log's last 24 h read in %.2f s",
                  tn_time_s() - t0);
  return NULL;
}

/* ---- lifecycle */

static void log_mhd(void *cls, const char *fmt, va_list ap) {
  (void)cls;
  char msg[512];
  vsnprintf(msg, sizeof(msg), fmt, ap);
  size_t n = strlen(msg);
  while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
  tn_log_debug("http: %s", msg);
}

enum tn_status tn_server_start(const struct tn_server_config *cfg,
                               const struct tn_server_model *models,
                               int n_models, struct tn_metrics *metrics,
                               struct tn_server **out, struct tn_error *err) {
  *out = NULL;
  if (n_models <= 0)
    return tn_error_set(err, TN_EINVAL, "no models to serve");
  struct tn_server *s = calloc(1, sizeof(*s));
  if (!s) return tn_error_set(err, TN_ENOMEM, "out of memory");
  s->cfg = *cfg;
  s->metrics = metrics;
  s->models = calloc((size_t)n_models, sizeof(*s->models));
  if (!s->models) {
    free(s);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  memcpy(s->models, models, (size_t)n_models * sizeof(*models));
  s->n_models = n_models;
  s->engines = calloc((size_t)n_models, sizeof(*s->engines));
  if (!s->engines) {
    free(s->models);
    free(s);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  for (int i = 0; i < n_models; i++)
    atomic_init(&s->engines[i], models[i].engine);
  pthread_mutex_init(&s->mu, NULL);
  pthread_mutex_init(&s->load_mu, NULL);
  if (cfg->adapter_dir && !realpath(cfg->adapter_dir, s->adapter_root)) {
    int e = errno;
    free(s->engines);
    free(s->models);
    free(s);
    return tn_error_set(err, TN_ENOENT, "--adapter-dir %s: %s",
                        cfg->adapter_dir, strerror(e));
  }
  s->stats = tn_stats_new();
  if (!s->stats) {
    free(s->engines);
    free(s->models);
    free(s);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  if (metrics) {
    static const char *const labels[] = {"route", "status"};
    s->http_requests = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_http_requests_total",
        "HTTP responses by route and status code.", labels, 2, NULL, 0);
    static const char *const rl[] = {"route", "target"};
    s->route_decisions = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_route_decisions_total",
        "Requests a route sent to a target (a cascade counts each stage it "
        "ran).",
        rl, 2, NULL, 0);
    static const char *const el[] = {"route", "from"};
    s->escalations = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_route_escalations_total",
        "Cascade answers not confident enough, by the stage escalated from.",
        el, 2, NULL, 0);
    static const char *const ul[] = {"upstream", "outcome"};
    s->upstream_calls = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_upstream_requests_total",
        "Calls to remote upstreams by outcome (ok, http_4xx, http_429, "
        "http_5xx, timeout, unreachable, malformed, cut, error, skipped, "
        "cancelled).",
        ul, 2, NULL, 0);
    static const char *const tl[] = {"tenant", "status"};
    s->tenant_requests = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_tenant_requests_total",
        "API requests by tenant and HTTP status.", tl, 2, NULL, 0);
    static const char *const tk[] = {"tenant", "kind"};
    s->tenant_tokens = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_tenant_tokens_total",
        "Tokens by tenant (kind: prompt, completion).", tk, 2, NULL, 0);
    static const char *const tc[] = {"tenant"};
    s->tenant_cost = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_tenant_cost_usd_total",
        "Cost in USD by tenant, at the configured prices.", tc, 1, NULL, 0);
    static const char *const tr[] = {"tenant", "reason"};
    s->tenant_rejections = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_tenant_rejections_total",
        "Requests refused by tenant limits (rpm, tpm, budget, "
        "not_allowed).",
        tr, 2, NULL, 0);
    static const char *const ll[] = {"upstream"};
    static const double lb[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                1, 2.5, 5, 10, 30, 60};
    s->upstream_latency = tn_metrics_family(
        metrics, TN_METRIC_HISTOGRAM, "tern_upstream_first_byte_seconds",
        "Time from a call to an upstream to its answer's headers.", ll, 1,
        lb, (int)TN_ARRAY_LEN(lb));
  }

  for (int i = 0; i < n_models; i++) {
    s->max_price_prompt = TN_MAX(s->max_price_prompt, models[i].price_prompt);
    s->max_price_completion =
        TN_MAX(s->max_price_completion, models[i].price_completion);
  }
  for (int i = 0; cfg->router && i < tn_router_n_upstreams(cfg->router); i++) {
    const struct tn_serve_upstream_cfg *u = tn_router_upstream(cfg->router, i);
    s->max_price_prompt = TN_MAX(s->max_price_prompt, u->price_prompt);
    s->max_price_completion =
        TN_MAX(s->max_price_completion, u->price_completion);
  }

  if (cfg->router && tn_router_n_upstreams(cfg->router) > 0 &&
      tn_upstream_pool_start(&s->upstreams, err)) {
    tn_server_stop(s);
    return err->status;
  }

  struct sockaddr_in addr = {0};
  addr.sin_family = AF_INET;
  addr.sin_port = htons((uint16_t)cfg->port);
  if (inet_pton(AF_INET, cfg->host, &addr.sin_addr) != 1) {
    tn_server_stop(s);
    return tn_error_set(err, TN_EINVAL,
                        "--host '%.64s' is not an IPv4 address", cfg->host);
  }
  unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME |
                   MHD_USE_ERROR_LOG;
  s->mhd = MHD_start_daemon(
      flags, (uint16_t)cfg->port, NULL, NULL, on_request, s,
      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
      MHD_OPTION_THREAD_POOL_SIZE, (unsigned)TN_MAX(1, cfg->http_threads),
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->conn_timeout_s,
      MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
      MHD_OPTION_EXTERNAL_LOGGER, log_mhd, NULL,
      MHD_OPTION_END);
  if (!s->mhd) {
    tn_server_stop(s);
    return tn_error_set(err, TN_EIO,
                        "cannot listen on %.64s:%d (in use, or not "
                        "permitted)",
                        cfg->host, cfg->port);
  }
  const union MHD_DaemonInfo *di =
      MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
  s->port = di ? di->port : cfg->port;
  if (tn_thread_create(&s->reaper, reaper_main, s) == 0)
    s->reaper_started = true;
  if (cfg->reqlog && tn_thread_create(&s->backfill, backfill_main, s) == 0)
    s->backfill_started = true;
  if (cfg->n_shadows > 0) {
    unsigned char r[16];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
      tn_server_stop(s);
      return tn_error_set(err, TN_EIO, "shadows: no random bytes for a key");
    }
    for (int i = 0; i < 16; i++)
      snprintf(s->shadow_secret + 2 * i, 3, "%02x", r[i]);
    struct tn_shadows *sh = NULL;
    if (tn_shadows_start(cfg->shadows, cfg->n_shadows, cfg->host, s->port,
                         s->shadow_secret, cfg->reqlog, s->stats, metrics,
                         &sh, err)) {
      tn_server_stop(s);
      return err->status;
    }
    atomic_store(&s->shadows, sh);
  }
  *out = s;
  return TN_OK;
}

int tn_server_port(const struct tn_server *s) { return s->port; }

/* A model's price per million prompt and completion tokens for budget
 * reservations. Priced by compute time, a token counts at twice what one
 * has cost lately on its engine (before any traffic: the calibrated step
 * model, a prompt token at the per-token time and an output token at a
 * whole one-token step). */
static void model_price_bound(struct tn_server *s, int i, double *pp,
                              double *pc) {
  const struct tn_server_model *m = &s->models[i];
  *pp = TN_MAX(m->price_prompt, 0.0);
  *pc = TN_MAX(m->price_completion, 0.0);
  struct tn_engine *e = atomic_load(&s->engines[i]);
  if (m->price_compute <= 0 || !e) return;
  struct tn_engine_info info;
  struct tn_engine_stats st;
  tn_engine_info(e, &info);
  tn_engine_stats(e, &st);
  double tp = st.s_per_prompt_token > 0 ? st.s_per_prompt_token
                                        : info.token_s;
  double tg = st.s_per_gen_token > 0 ? st.s_per_gen_token
                                     : info.step_s + info.token_s;
  double usd_per_s_m = m->price_compute / 3600.0 * 1e6;
  *pp += 2.0 * tp * usd_per_s_m;
  *pc += 2.0 * tg * usd_per_s_m;
}

/* The prices a request calling name reserves at: the model's own when it
 * names one, else (a route, an upstream, an adapter) the highest of
 * anything it may reach. */
static void price_bounds(struct tn_server *s, const char *name, double *pp,
                         double *pc) {
  const struct tn_server_model *own =
      name ? find_base(s, name, strlen(name)) : &s->models[0];
  if (own) {
    model_price_bound(s, (int)(own - s->models), pp, pc);
    return;
  }
  *pp = s->max_price_prompt;
  *pc = s->max_price_completion;
  for (int i = 0; i < s->n_models; i++) {
    double a, b;
    model_price_bound(s, i, &a, &b);
    *pp = TN_MAX(*pp, a);
    *pc = TN_MAX(*pc, b);
  }
}

void tn_server_set_engine(struct tn_server *s, int i, struct tn_engine *e) {
  if (i >= 0 && i < s->n_models) atomic_store(&s->engines[i], e);
}

void tn_server_drain(struct tn_server *s) { atomic_store(&s->draining, true); }

int tn_server_in_flight(struct tn_server *s) {
  return atomic_load(&s->in_flight);
}

/* Resumes every suspended connection (they answer 503 or end their stream
 * now) and waits until none is suspended: MHD_stop_daemon() aborts the
 * process if one still is. */
static void resume_all(struct tn_server *s) {
  atomic_store(&s->stopping, true);
  for (int tries = 0; tries < 500; tries++) {
    int suspended = 0;
    pthread_mutex_lock(&s->mu);
    for (struct conn *c = s->live; c; c = c->live_next) {
      pthread_mutex_lock(&c->mu);
      if (c->suspended) {
        c->suspended = false;
        MHD_resume_connection(c->mhd);
        suspended++;
      }
      pthread_mutex_unlock(&c->mu);
    }
    bool any_live = s->live != NULL;
    pthread_mutex_unlock(&s->mu);
    if (!suspended && !any_live) return;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  tn_log_warn("http: connections still busy at shutdown");
}

void tn_server_stop(struct tn_server *s) {
  if (!s) return;
  /* first: their calls into this server end now (aborted); freed once no
   * connection can offer a replay any more */
  tn_shadows_stop(s->shadows);
  if (s->mhd) resume_all(s);
  atomic_store(&s->stop, true);
  if (s->reaper_started) pthread_join(s->reaper, NULL);
  if (s->backfill_started) pthread_join(s->backfill, NULL);
  if (s->mhd) MHD_stop_daemon(s->mhd);
  tn_shadows_free(s->shadows);
  s->shadows = NULL;
  /* after the connections: each released its call when it completed */
  tn_upstream_pool_stop(s->upstreams);
  s->upstreams = NULL;
  pthread_mutex_destroy(&s->mu);
  pthread_mutex_destroy(&s->load_mu);
  tn_stats_free(s->stats);
  free(s->engines);
  free(s->models);
  free(s);
}
