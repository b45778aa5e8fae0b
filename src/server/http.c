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
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "engine/engine.h"
#include "model/lora.h"
#include "obs/obs.h"
#include "server/api.h"
#include "server/dashboard.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

#define MAX_PROMPTS 64
#define MAX_SEQS_PER_REQUEST 128

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

  struct conn *live_prev, *live_next;
  bool in_live;
};

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
  pthread_mutex_destroy(&c->mu);
  free(c);
}

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double request_cost(const struct tn_server_model *m,
                           const struct tn_reqlog_row *r) {
  if (!m || (m->price_prompt < 0 && m->price_completion < 0)) return -1;
  double pp = TN_MAX(m->price_prompt, 0.0);
  double pc = m->price_cached >= 0 ? m->price_cached : pp;
  double po = TN_MAX(m->price_completion, 0.0);
  int64_t cached = TN_MAX(r->cached_tokens, 0);
  int64_t fresh = TN_MAX(r->prompt_tokens, 0) - cached;
  return ((double)fresh * pp + (double)cached * pc +
          (double)TN_MAX(r->completion_tokens, 0) * po) / 1e6;
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
      .adapter = c->adapter[0] ? c->adapter : NULL,
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
    double itl_sum = 0;
    int64_t itl_n = 0;
    for (size_t i = 0; i < c->n_reqs; i++) {
      struct tn_req *q = c->reqs[i];
      tn_req_lock(q);
      r.prompt_tokens += q->n_prompt;
      r.cached_tokens += q->n_cached;
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
  double now_wall = wall_s();
  tn_stats_add(c->srv->stats, now_wall, &r, c->n_reqs ? itl : NULL);
  tn_reqlog_add(lg, &r);
  if (c->srv->cfg.tracer && c->trace.sampled)
    trace_request(c, &r, now_wall);
  free(out);
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
  /* After release no notify runs for these requests (it runs under the
   * request's lock, which release takes). Unfinished ones are cancelled. */
  for (size_t i = 0; i < c->n_reqs; i++) tn_req_release(c->reqs[i]);
  c->n_reqs = 0;
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
  int ra = err->http_status == 429 ? 1 : err->http_status == 503 ? 5 : 0;
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
  return true;
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
    for (int a = -1; a < m->n_aliases; a++) {
      const char *name = a < 0 ? m->name : m->aliases[a];
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

static void cancel_reqs(struct conn *c) {
  for (size_t i = 0; i < c->n_reqs; i++) tn_req_release(c->reqs[i]);
  c->n_reqs = 0;
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
static enum MHD_Result completion_wait(struct conn *c) {
  for (;;) {
    conn_clear_wake(c);
    bool done = true;
    for (size_t i = 0; i < c->n_reqs && done; i++) {
      tn_req_lock(c->reqs[i]);
      done = c->reqs[i]->done;
      tn_req_unlock(c->reqs[i]);
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
  live_remove(c);
  struct tn_api_error aerr;
  lock_reqs(c);
  int fail = reqs_failure(c, &aerr);
  char *body = NULL;
  size_t len = 0;
  if (!fail) {
    struct tn_api_meta meta = conn_meta(c);
    body = tn_api_render_response(&c->q, &meta, c->reqs, c->n_reqs, &len);
  }
  unlock_reqs(c);
  if (fail) return send_error(c, &aerr);
  if (!body)
    return send_error_msg(c, 500, "server_error", NULL, NULL, "out of memory");
  return send_body(c, 200, "application/json", body, len, 0);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
  struct conn *c = cls;
  (void)pos;
  for (;;) {
    if (c->out_off < c->out.len) {
      size_t n = TN_MIN(max, c->out.len - c->out_off);
      memcpy(buf, c->out.data + c->out_off, n);
      c->out_off += n;
      if (c->out_off == c->out.len) c->out_off = c->out.len = 0;
      return (ssize_t)n;
    }
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

static enum MHD_Result route_completion(struct conn *c, enum tn_api_kind kind) {
  struct tn_server *s = c->srv;
  struct tn_api_error aerr = {0};
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
  struct tn_engine *e = c->engine = model_engine(s, c->model);
  if (!e) {
    tn_api_error_set(&aerr, 503, "server_error", "model", "model_loading",
                     "The model '%.100s' is still loading; retry shortly",
                     c->model->name);
    return send_error(c, &aerr);
  }
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  if (tn_api_check_vocab(&c->q, info.n_vocab, &aerr))
    return send_error(c, &aerr);
  size_t n_prompts = kind == TN_API_CHAT ? 1 : c->q.n_prompts;
  if (n_prompts > MAX_PROMPTS || n_prompts == 0) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "prompt", NULL,
                     "'prompt' must hold 1..%d prompts, got %zu", MAX_PROMPTS,
                     n_prompts);
    return send_error(c, &aerr);
  }
  if (n_prompts * (size_t)c->q.gen.n > MAX_SEQS_PER_REQUEST) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "n", NULL,
                     "%zu prompts x n=%d is %zu sequences; one request may "
                     "ask for at most %d",
                     n_prompts, c->q.gen.n, n_prompts * (size_t)c->q.gen.n,
                     MAX_SEQS_PER_REQUEST);
    return send_error(c, &aerr);
  }
  const char *pparam = kind == TN_API_CHAT ? "messages" : "prompt";
  int32_t n_ctx = tn_engine_n_ctx(e);
  struct tn_gen_params gen = c->q.gen;
  if (c->q.has_lora_scale && !c->lora) {
    tn_api_error_set(&aerr, 400, "invalid_request_error", "lora_scale", NULL,
                     "'lora_scale' needs a model that names an adapter; "
                     "'%.100s' is a base model",
                     c->model->name);
    return send_error(c, &aerr);
  }
  gen.lora = c->lora;
  gen.lora_scale = c->q.has_lora_scale ? c->q.lora_scale : c->lora_scale;
  /* Without max_tokens, completions stop at 16 tokens (OpenAI's default);
   * chat runs to the end of the context. */
  gen.max_tokens = c->q.max_tokens > 0 ? c->q.max_tokens
                   : kind == TN_API_COMPLETIONS ? 16
                                                : 0;
  if (!c->q.has_seed) gen.sampling.seed = random_seed();
  for (size_t i = 0; i < n_prompts; i++) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (build_prompt(c, i, &ids, &n_ids, &aerr)) {
      cancel_reqs(c);
      return send_error(c, &aerr);
    }
    if (n_ids >= (size_t)n_ctx) {
      free(ids);
      cancel_reqs(c);
      tn_api_error_set(&aerr, 400, "invalid_request_error", pparam,
                       "context_length_exceeded",
                       "This model's maximum context length is %d tokens, "
                       "but the prompt is %zu tokens",
                       n_ctx, n_ids);
      return send_error(c, &aerr);
    }
    if (c->q.max_tokens > 0 && n_ids + (size_t)c->q.max_tokens > (size_t)n_ctx) {
      free(ids);
      cancel_reqs(c);
      tn_api_error_set(&aerr, 400, "invalid_request_error", "max_tokens",
                       "context_length_exceeded",
                       "This model's maximum context length is %d tokens; "
                       "the prompt is %zu tokens and max_tokens is %d, "
                       "together %zu",
                       n_ctx, n_ids, c->q.max_tokens,
                       n_ids + (size_t)c->q.max_tokens);
      return send_error(c, &aerr);
    }
    struct tn_error err = {0};
    struct tn_req *r = NULL;
    enum tn_status st = tn_engine_submit(e, ids, (int32_t)n_ids, &gen,
                                         conn_wake, c, &r, &err);
    free(ids);
    if (st) {
      cancel_reqs(c);
      if (st == TN_EFULL)
        tn_api_error_set(&aerr, 429, "rate_limit_error", NULL,
                         "queue_full", "%s", err.msg);
      else if (st == TN_ECANCELED)
        tn_api_error_set(&aerr, 503, "server_error", NULL,
                         "server_shutting_down", "%s", err.msg);
      else if (st == TN_ENOMEM)
        tn_api_error_set(&aerr, 500, "server_error", NULL, NULL, "%s",
                         err.msg);
      else
        tn_api_error_set(&aerr, 400, "invalid_request_error", pparam, NULL,
                         "%s", err.msg);
      return send_error(c, &aerr);
    }
    c->reqs[c->n_reqs++] = r;
  }
  c->submitted = true;
  make_id(c->id, sizeof(c->id),
          kind == TN_API_CHAT ? "chatcmpl-" : "cmpl-");
  c->created = (long)time(NULL);
  live_add(c);
  if (!c->q.stream) return completion_wait(c);

  atomic_fetch_add(&c->refs, 1);
  struct MHD_Response *resp = MHD_create_response_from_callback(
      MHD_SIZE_UNKNOWN, 16384, stream_read, c, stream_free);
  if (!resp) {
    conn_unref(c);
    return MHD_NO;
  }
  MHD_add_response_header(resp, "Content-Type", "text/event-stream");
  MHD_add_response_header(resp, "Cache-Control", "no-cache");
  MHD_add_response_header(resp, "X-Accel-Buffering", "no");
  enum MHD_Result ret = MHD_queue_response(c->mhd, 200, resp);
  MHD_destroy_response(resp);
  count_status(c, 200);
  return ret;
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
  if (c->submitted) return completion_wait(c); /* resumed */

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
  if (v1 && !auth_ok(s, mc, false)) {
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
  *out = s;
  return TN_OK;
}

int tn_server_port(const struct tn_server *s) { return s->port; }

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
  if (s->mhd) resume_all(s);
  atomic_store(&s->stop, true);
  if (s->reaper_started) pthread_join(s->reaper, NULL);
  if (s->backfill_started) pthread_join(s->backfill, NULL);
  if (s->mhd) MHD_stop_daemon(s->mhd);
  pthread_mutex_destroy(&s->mu);
  pthread_mutex_destroy(&s->load_mu);
  tn_stats_free(s->stats);
  free(s->engines);
  free(s->models);
  free(s);
}
