/*
 * trace.c: OpenTelemetry traces over OTLP/HTTP (obs.h).
 *
 * The HTTP thread that ends a request turns its spans into OTLP's JSON
 * form at once (ids as hex, times as decimal nanosecond strings,
 * attributes as typed values) and queues that one JSON array; nothing of
 * the request is kept. One exporter thread wraps what is queued into an
 * ExportTraceServiceRequest (one resource, service.name, one scope) and
 * POSTs it with libcurl, at most once a second or per 256 traces. A
 * refused or failed POST (5 s timeout) drops the batch and counts its
 * spans: tracing never slows serving and never retries into a backlog.
 *
 * Lock: t->mu guards the queue, the counters flush waits on and t->stop;
 * the exporter holds none while it talks to the network.
 */
#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "obs/obs.h"

#define BATCH_MAX 256

struct qtrace {
  struct qtrace *next;
  json_t *spans; /* an array of OTLP span objects */
  int n_spans;
};

struct tn_tracer {
  struct tn_tracer_config cfg;
  char *endpoint, *service;
  struct curl_slist *headers;
  pthread_t thread;
  bool started;

  pthread_mutex_t mu;
  pthread_cond_t more, done_cv;
  struct qtrace *head, *tail;
  size_t n_queued;
  uint64_t n_added, n_done;
  bool stop;

  struct tn_metric *exported, *dropped;
};

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1; /* W3C: lowercase only */
}

static bool parse_hex(const char *s, uint8_t *out, size_t n) {
  bool nonzero = false;
  for (size_t i = 0; i < n; i++) {
    int a = hexval(s[2 * i]), b = hexval(s[2 * i + 1]);
    if (a < 0 || b < 0) return false;
    out[i] = (uint8_t)(a << 4 | b);
    nonzero |= out[i] != 0;
  }
  return nonzero;
}

bool tn_traceparent_parse(const char *h, struct tn_trace_ctx *out) {
  memset(out, 0, sizeof(*out));
  if (!h) return false;
  while (*h == ' ' || *h == '\t') h++;
  size_t n = strlen(h);
  while (n && (h[n - 1] == ' ' || h[n - 1] == '\t')) n--;
  /* version 00 is exactly 55 bytes; later versions may append fields */
  if (n < 55 || h[2] != '-' || h[35] != '-' || h[52] != '-') return false;
  if (hexval(h[0]) < 0 || hexval(h[1]) < 0) return false;
  int ver = hexval(h[0]) << 4 | hexval(h[1]);
  if (ver == 0xff || (ver == 0 && n != 55) || (n > 55 && h[55] != '-'))
    return false;
  if (!parse_hex(h + 3, out->trace_id, 16)) return false;
  if (!parse_hex(h + 36, out->parent, 8)) return false;
  if (hexval(h[53]) < 0 || hexval(h[54]) < 0) return false;
  int flags = hexval(h[53]) << 4 | hexval(h[54]);
  out->has_parent = true;
  out->sampled = flags & 1;
  return true;
}

static void random_bytes(uint8_t *p, size_t n) {
  if (getrandom(p, n, 0) == (ssize_t)n) return;
  uint64_t x = tn_time_ns() ^ (uint64_t)(uintptr_t)p;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    p[i] = (uint8_t)x;
  }
}

void tn_trace_ctx_new(struct tn_trace_ctx *out, double ratio) {
  memset(out, 0, sizeof(*out));
  do random_bytes(out->trace_id, 16);
  while (!out->trace_id[0] && !out->trace_id[15]);
  uint32_t r;
  random_bytes((uint8_t *)&r, sizeof r);
  out->sampled = ratio >= 1 || (double)r / 4294967296.0 < ratio;
}

static void hex(char *dst, const uint8_t *src, size_t n) {
  static const char d[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    dst[2 * i] = d[src[i] >> 4];
    dst[2 * i + 1] = d[src[i] & 15];
  }
  dst[2 * n] = '\0';
}

static json_t *nanos(double unix_s) {
  char b[32];
  snprintf(b, sizeof b, "%llu",
           (unsigned long long)(unix_s > 0 ? unix_s * 1e9 : 0));
  return json_string(b);
}

static json_t *attr(const struct tn_span_attr *a) {
  json_t *v = json_object();
  if (a->s) {
    json_object_set_new(v, "stringValue", json_string(a->s));
  } else if (a->is_int) {
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)a->i);
    json_object_set_new(v, "intValue", json_string(b));
  } else {
    json_object_set_new(v, "doubleValue", json_real(a->d));
  }
  json_t *o = json_object();
  json_object_set_new(o, "key", json_string(a->key));
  json_object_set_new(o, "value", v);
  return o;
}

/* ---- queueing */

void tn_tracer_add(struct tn_tracer *t, const struct tn_trace_ctx *ctx,
                   const struct tn_span *spans, int n_spans) {
  if (!t || !ctx->sampled || n_spans <= 0) return;
  char trace_hex[33], parent_hex[17];
  hex(trace_hex, ctx->trace_id, 16);
  hex(parent_hex, ctx->parent, 8);
  uint8_t ids[64][8];
  if (n_spans > 64) n_spans = 64;
  random_bytes(&ids[0][0], sizeof(ids[0]) * (size_t)n_spans);
  json_t *arr = json_array();
  for (int i = 0; i < n_spans && arr; i++) {
    const struct tn_span *sp = &spans[i];
    char id[17], par[17];
    hex(id, ids[i], 8);
    json_t *o = json_object();
    json_object_set_new(o, "traceId", json_string(trace_hex));
    json_object_set_new(o, "spanId", json_string(id));
    if (sp->parent >= 0 && sp->parent < i) {
      hex(par, ids[sp->parent], 8);
      json_object_set_new(o, "parentSpanId", json_string(par));
    } else if (ctx->has_parent) {
      json_object_set_new(o, "parentSpanId", json_string(parent_hex));
    }
    json_object_set_new(o, "name", json_string(sp->name ? sp->name : "span"));
    json_object_set_new(o, "kind", json_integer(sp->kind));
    json_object_set_new(o, "startTimeUnixNano", nanos(sp->t0));
    json_object_set_new(o, "endTimeUnixNano",
                        nanos(sp->t1 >= sp->t0 ? sp->t1 : sp->t0));
    json_t *attrs = json_array();
    for (int a = 0; a < sp->n_attrs; a++)
      json_array_append_new(attrs, attr(&sp->attrs[a]));
    json_object_set_new(o, "attributes", attrs);
    json_t *status = json_object();
    if (sp->error) {
      json_object_set_new(status, "code", json_integer(2));
      json_object_set_new(status, "message", json_string(sp->error));
    } else {
      json_object_set_new(status, "code", json_integer(1));
    }
    json_object_set_new(o, "status", status);
    json_array_append_new(arr, o);
  }
  struct qtrace *q = arr ? malloc(sizeof(*q)) : NULL;
  if (!q) {
    json_decref(arr);
    if (t->dropped) tn_metric_add(t->dropped, n_spans);
    return;
  }
  q->next = NULL;
  q->spans = arr;
  q->n_spans = n_spans;
  pthread_mutex_lock(&t->mu);
  t->n_added++;
  if (t->stop || t->n_queued >= t->cfg.queue_max) {
    t->n_done++;
    pthread_mutex_unlock(&t->mu);
    json_decref(arr);
    free(q);
    if (t->dropped) tn_metric_add(t->dropped, n_spans);
    return;
  }
  if (t->tail) t->tail->next = q;
  else t->head = q;
  t->tail = q;
  t->n_queued++;
  if (t->n_queued >= BATCH_MAX) pthread_cond_signal(&t->more);
  pthread_mutex_unlock(&t->mu);
}

void tn_tracer_flush(struct tn_tracer *t) {
  if (!t) return;
  pthread_mutex_lock(&t->mu);
  uint64_t target = t->n_added;
  pthread_cond_signal(&t->more);
  while (t->n_done < target) pthread_cond_wait(&t->done_cv, &t->mu);
  pthread_mutex_unlock(&t->mu);
}

double tn_tracer_sample(const struct tn_tracer *t) {
  return t ? t->cfg.sample : 0;
}

/* ---- the exporter */

static size_t discard(char *p, size_t size, size_t n, void *user) {
  (void)p;
  (void)user;
  return size * n;
}

static bool post(struct tn_tracer *t, CURL *h, json_t *spans) {
  json_t *kv = json_object();
  json_object_set_new(kv, "stringValue", json_string(t->service));
  json_t *svc = json_object();
  json_object_set_new(svc, "key", json_string("service.name"));
  json_object_set_new(svc, "value", kv);
  json_t *res = json_object();
  json_object_set_new(res, "attributes", json_pack("[o]", svc));
  json_t *scope = json_object();
  json_object_set_new(scope, "name", json_string("tern"));
  json_t *ss = json_object();
  json_object_set_new(ss, "scope", scope);
  json_object_set(ss, "spans", spans);
  json_t *rs = json_object();
  json_object_set_new(rs, "resource", res);
  json_object_set_new(rs, "scopeSpans", json_pack("[o]", ss));
  json_t *root = json_object();
  json_object_set_new(root, "resourceSpans", json_pack("[o]", rs));
  char *body = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  if (!body) return false;
  curl_easy_reset(h);
  curl_easy_setopt(h, CURLOPT_URL, t->endpoint);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, t->headers);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  CURLcode rc = curl_easy_perform(h);
  long code = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  free(body);
  if (rc != CURLE_OK || code < 200 || code >= 300) {
    tn_log_debug("otlp: export to %s failed: %s (HTTP %ld)", t->endpoint,
                 rc != CURLE_OK ? curl_easy_strerror(rc) : "refused", code);
    return false;
  }
  return true;
}

static void *exporter_main(void *arg) {
  struct tn_tracer *t = arg;
  CURL *h = curl_easy_init();
  bool warned = false;
  pthread_mutex_lock(&t->mu);
  for (;;) {
    if (!t->stop && t->n_queued < BATCH_MAX) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait(&t->more, &t->mu, &ts);
    }
    struct qtrace *batch = t->head;
    size_t n = 0;
    struct qtrace *q = batch, *last = NULL;
    while (q && n < BATCH_MAX) last = q, q = q->next, n++;
    t->head = q;
    if (!q) t->tail = NULL;
    if (last) last->next = NULL;
    t->n_queued -= n;
    bool stop = t->stop;
    pthread_mutex_unlock(&t->mu);

    if (batch) {
      json_t *spans = json_array();
      int n_spans = 0;
      for (q = batch; q; q = q->next) {
        json_array_extend(spans, q->spans);
        n_spans += q->n_spans;
      }
      bool ok = h && post(t, h, spans);
      if (!ok && !warned) {
        tn_log_warn("otlp: cannot export traces to %s (dropped; later "
                    "failures are counted in tern_otlp_spans_dropped_total)",
                    t->endpoint);
        warned = true;
      }
      struct tn_metric *m = ok ? t->exported : t->dropped;
      if (m) tn_metric_add(m, n_spans);
      json_decref(spans);
      while (batch) {
        struct qtrace *nx = batch->next;
        json_decref(batch->spans);
        free(batch);
        batch = nx;
      }
    }
    pthread_mutex_lock(&t->mu);
    t->n_done += n;
    pthread_cond_broadcast(&t->done_cv);
    if (stop && !t->head) break;
  }
  pthread_mutex_unlock(&t->mu);
  curl_easy_cleanup(h);
  return NULL;
}

/* ---- open / close */

enum tn_status tn_tracer_open(const struct tn_tracer_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_tracer **out, struct tn_error *err) {
  *out = NULL;
  const char *ep = cfg->endpoint;
  if (!ep || (strncmp(ep, "http://", 7) && strncmp(ep, "https://", 8)))
    return tn_error_set(err, TN_EINVAL,
                        "--otlp-endpoint '%.200s': give an http:// or "
                        "https:// URL (e.g. http://localhost:4318/v1/traces)",
                        ep ? ep : "");
  if (!(cfg->sample >= 0 && cfg->sample <= 1))
    return tn_error_set(err, TN_EINVAL, "--otlp-sample: a share from 0 to 1");
  if (curl_global_init(CURL_GLOBAL_DEFAULT))
    return tn_error_set(err, TN_EIO, "traces: libcurl does not start");
  struct tn_tracer *t = calloc(1, sizeof(*t));
  if (!t) return tn_error_set(err, TN_ENOMEM, "out of memory");
  t->cfg = *cfg;
  if (!t->cfg.queue_max) t->cfg.queue_max = 1024;
  t->endpoint = strdup(ep);
  t->service = strdup(cfg->service ? cfg->service : "tern");
  t->headers = curl_slist_append(NULL, "Content-Type: application/json");
  for (int i = 0; i < cfg->n_headers && t->headers; i++) {
    const char *hd = cfg->headers[i];
    const char *colon = strchr(hd, ':');
    if (!colon || colon == hd || strpbrk(hd, "\r\n")) {
      tn_tracer_close(t);
      return tn_error_set(err, TN_EINVAL,
                          "--otlp-header '%.200s': give 'Name: value'", hd);
    }
    struct curl_slist *l = curl_slist_append(t->headers, hd);
    if (!l) break;
    t->headers = l;
  }
  pthread_mutex_init(&t->mu, NULL);
  pthread_cond_init(&t->more, NULL);
  pthread_cond_init(&t->done_cv, NULL);
  if (!t->endpoint || !t->service || !t->headers) {
    tn_tracer_close(t);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  if (metrics) {
    struct tn_metric_family *f = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_otlp_spans_exported_total",
        "Trace spans sent to the OTLP endpoint.", NULL, 0, NULL, 0);
    t->exported = f ? tn_metric_series(f, NULL) : NULL;
    f = tn_metrics_family(metrics, TN_METRIC_COUNTER,
                          "tern_otlp_spans_dropped_total",
                          "Trace spans dropped (queue full, or the endpoint "
                          "refused or did not answer).",
                          NULL, 0, NULL, 0);
    t->dropped = f ? tn_metric_series(f, NULL) : NULL;
  }
  if (tn_thread_create(&t->thread, exporter_main, t) != 0) {
    tn_tracer_close(t);
    return tn_error_set(err, TN_EIO, "traces: cannot start the exporter");
  }
  t->started = true;
  *out = t;
  return TN_OK;
}

void tn_tracer_close(struct tn_tracer *t) {
  if (!t) return;
  if (t->started) {
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_cond_signal(&t->more);
    pthread_mutex_unlock(&t->mu);
    pthread_join(t->thread, NULL);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->more);
    pthread_cond_destroy(&t->done_cv);
  }
  while (t->head) {
    struct qtrace *nx = t->head->next;
    json_decref(t->head->spans);
    free(t->head);
    t->head = nx;
  }
  curl_slist_free_all(t->headers);
  free(t->endpoint);
  free(t->service);
  free(t);
}
