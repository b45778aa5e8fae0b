/*
 * obs.h: metrics for Prometheus.
 *
 * A registry holds metric families (counter, gauge, histogram), each with a
 * fixed list of label names; a family hands out one series per distinct
 * tuple of label values, created on first use and kept for the process's
 * life. Updates are thread-safe and cheap (the engine thread updates
 * metrics every step; HTTP threads render them); rendering produces the
 * Prometheus text exposition format 0.0.4 (# HELP, # TYPE, samples;
 * histograms as _bucket{le=...} cumulative counts, _sum and _count; label
 * values escaped: backslash, double quote, newline).
 */
#ifndef TN_OBS_H
#define TN_OBS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define TN_METRIC_LABELS_MAX 4
#define TN_METRIC_BUCKETS_MAX 32

enum tn_metric_kind {
  TN_METRIC_COUNTER,
  TN_METRIC_GAUGE,
  TN_METRIC_HISTOGRAM,
};

struct tn_metrics;        /* the registry */
struct tn_metric_family;  /* one name, one kind, one label list */
struct tn_metric;         /* one series of a family */

struct tn_metrics *tn_metrics_new(void);
void tn_metrics_free(struct tn_metrics *reg);

/* Registers a family (name must match [a-zA-Z_:][a-zA-Z0-9_:]*, label
 * names [a-zA-Z_][a-zA-Z0-9_]*, at most TN_METRIC_LABELS_MAX of them).
 * Histograms take n_buckets ascending upper bounds (+Inf is implicit).
 * Registering the same name twice returns the existing family when kind
 * and labels agree, NULL otherwise; NULL also on bad names. */
struct tn_metric_family *tn_metrics_family(struct tn_metrics *reg,
                                           enum tn_metric_kind kind,
                                           const char *name, const char *help,
                                           const char *const *label_names,
                                           int n_labels,
                                           const double *buckets,
                                           int n_buckets);

/* The series for these label values (as many as the family has label
 * names), created on first use. Returns NULL only when out of memory. */
struct tn_metric *tn_metric_series(struct tn_metric_family *fam,
                                   const char *const *label_values);

/* Counter: adds v >= 0. Gauge: adds v (may be negative). */
void tn_metric_add(struct tn_metric *m, double v);
/* Gauge: sets the value. */
void tn_metric_set(struct tn_metric *m, double v);
/* Histogram: records one observation. */
void tn_metric_observe(struct tn_metric *m, double v);
/* Current value of a counter or gauge; the count of a histogram. */
double tn_metric_value(const struct tn_metric *m);

/* Renders every family in registration order, series in creation order.
 * Returns a malloc'd NUL-terminated string (length in *len), NULL when out
 * of memory. */
char *tn_metrics_render(struct tn_metrics *reg, size_t *len);

/* ---- request log (reqlog.c): one SQLite row per API request
 *
 * Rows are queued by the HTTP threads (copied, never blocking: a full
 * queue drops the row and counts it) and written by one writer thread in
 * batched transactions to a WAL database; retention by age and row count
 * runs on the writer. The table is documented in docs/MONITORING.md. */
struct tn_reqlog;

struct tn_reqlog_config {
  const char *path;
  bool content;       /* store prompt and output text */
  double max_age_s;   /* delete rows older than this (0: keep) */
  int64_t max_rows;   /* keep at most this many (0: no limit) */
  size_t queue_max;   /* rows waiting for the writer (0: 4096) */
  /* Redaction of the stored text (content on): each entry a preset
   * (email, phone, card, ipv4, secret) or a PCRE2 pattern; every match in
   * the prompt and output becomes "[REDACTED]" before it is written. */
  const char *const *redact;
  int n_redact;
};

struct tn_reqlog_row {
  int64_t ts_ms;           /* arrival, Unix milliseconds */
  const char *request_id;  /* strings may be NULL: stored as NULL */
  const char *tenant;      /* the API key's tenant name */
  const char *endpoint;
  const char *model;
  const char *adapter;     /* the LoRA adapter it ran on, or NULL */
  const char *route;       /* the route it was called through, or NULL */
  const char *upstream;    /* the upstream that answered, or NULL */
  int escalations;         /* cascade stages escalated from (< 0: none) */
  const char *shadow_of;   /* a shadow replay: the live request's id */
  int status;              /* HTTP status sent (0: none, client gone) */
  const char *finish;      /* finish reason of the first choice */
  const char *error;
  int64_t prompt_tokens, cached_tokens, completion_tokens;
  double queue_s, ttft_s, itl_mean_s, itl_max_s, e2e_s; /* < 0: unknown */
  double cost;             /* USD from the model's prices (< 0: none) */
  double compute_s;        /* its share of the engine's passes (< 0: not
                              run locally) */
  const char *prompt;      /* with content on */
  size_t prompt_len;
  const char *output;
  size_t output_len;
};

/* A shadow deployment's comparison of a live answer and its replay. */
struct tn_shadow_row {
  int64_t ts_ms;           /* the live request's arrival, Unix ms */
  const char *request_id;  /* the live request's id */
  const char *shadow_id;   /* the replay's id, or NULL */
  const char *source;      /* the name that carries the shadow */
  const char *model;       /* what answered live */
  const char *target;      /* the shadow target */
  const char *tenant;
  const char *outcome;     /* "ok", "error" or "timeout" */
  const char *error;
  int exact;               /* the texts are equal: 1/0 (< 0: not compared) */
  double overlap;          /* F1 of their word tokens, 0..1 (< 0: none) */
  double len_ratio;        /* shadow / live characters (< 0: none) */
  double live_s, shadow_s; /* end to end; the replay's without the time it
                              waited for live work (< 0: unknown) */
  double shadow_wait_s;    /* that wait */
  double live_cost, shadow_cost; /* USD (< 0: not priced) */
  const char *verdict;     /* a judge's, both orders: "shadow", "live",
                              "tie" (or orders that disagree), NULL */
  const char *live_text, *shadow_text; /* with content on */
  size_t live_len, shadow_len;
};

/* Opens (creating) the database; metrics (may be NULL) get
 * tern_request_log_rows_total and tern_request_log_dropped_total. */
enum tn_status tn_reqlog_open(const struct tn_reqlog_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_reqlog **out, struct tn_error *err);
/* Writes what is queued, stops the writer, closes. NULL ok. */
void tn_reqlog_close(struct tn_reqlog *l);
/* Queues a copy of r; never blocks. */
void tn_reqlog_add(struct tn_reqlog *l, const struct tn_reqlog_row *r);
/* The same for a shadow comparison (table shadows). */
void tn_reqlog_add_shadow(struct tn_reqlog *l, const struct tn_shadow_row *r);
/* Waits until every row queued so far is written (tests, shutdown). */
void tn_reqlog_flush(struct tn_reqlog *l);
bool tn_reqlog_content(const struct tn_reqlog *l);
const char *tn_reqlog_path(const struct tn_reqlog *l);

/* Reading the log back (tern logs, the dashboard's request table). Every
 * filter is a bound parameter of one fixed query: no SQL is ever built
 * from the caller's text. */
struct json_t;
struct tn_reqlog_filter {
  int64_t since_ms, until_ms;    /* arrival bounds, Unix ms (0: open) */
  const char *model, *endpoint, *tenant, *request_id; /* NULL: any */
  int status_lo, status_hi;      /* tn_reqlog_filter_init: 0..999 */
  bool errors;                   /* only 4xx, 5xx, failed or cut off */
  int64_t before_ts, before_id;  /* paging: rows older than (ts, id);
                                    before_ts 0: from the newest */
  int64_t limit;                 /* newest N (<= 0: all) */
  bool content;                  /* with the prompt and output columns */
};
void tn_reqlog_filter_init(struct tn_reqlog_filter *f);
/* "200", "4xx", "error" into f's status fields; false when s is none. */
bool tn_reqlog_parse_status(const char *s, struct tn_reqlog_filter *f);
/* Runs f on a read-only connection to the database at path and calls
 * row(user, obj) for each match, newest first; obj (borrowed) holds every
 * column by name plus "id" (the rowid, for paging). row returns false to
 * stop. TN_EIO (err names the database) when it cannot be read. */
enum tn_status tn_reqlog_read(const char *path,
                              const struct tn_reqlog_filter *f,
                              bool (*row)(void *user, struct json_t *obj),
                              void *user, struct tn_error *err);

/* Shadow comparisons, newest first: source NULL for all, rows with
 * ts >= since_ms, rowid < before_id (0: from the newest), at most limit;
 * obj holds every column by name plus "id". */
enum tn_status tn_reqlog_read_shadows(const char *path, const char *source,
                                      int64_t since_ms, int64_t before_id,
                                      int64_t limit, bool content,
                                      bool (*row)(void *user,
                                                  struct json_t *obj),
                                      void *user, struct tn_error *err);

/* "90s", "15m", "2h", "7d" or bare seconds -> seconds; false if not. */
bool tn_parse_duration(const char *s, double *out);

/* ---- traces (trace.c): one OpenTelemetry trace per request, exported
 * over OTLP/HTTP (JSON encoding) by a thread of its own
 *
 * A request's context comes from the client's W3C traceparent header
 * (its trace id, its span as the parent, its sampled flag) or is new.
 * Spans are handed over whole when the request is over: the exporter
 * batches them (at most a second or 256 traces) into one POST; a full
 * queue or a failed POST drops them and counts them, never delaying a
 * request. */
struct tn_trace_ctx {
  uint8_t trace_id[16];
  uint8_t parent[8];     /* the client's span (has_parent) */
  bool has_parent;
  bool sampled;
};
/* "00-<32 hex>-<16 hex>-<2 hex>" (W3C Trace Context, version 00; later
 * versions parsed by the same prefix). False for anything else, all-zero
 * ids included. */
bool tn_traceparent_parse(const char *h, struct tn_trace_ctx *out);
/* A fresh context: random trace id, no parent; sampled with probability
 * ratio. */
void tn_trace_ctx_new(struct tn_trace_ctx *out, double ratio);

enum tn_span_kind { TN_SPAN_INTERNAL = 1, TN_SPAN_SERVER = 2 };

struct tn_span_attr {
  const char *key;
  const char *s;   /* a string value, or NULL: */
  int64_t i;       /* an integer (is_int), or */
  double d;        /* a double */
  bool is_int;
};

struct tn_span {
  const char *name;
  enum tn_span_kind kind;
  int parent;                  /* index of the parent span; -1: the root
                                  (whose parent is the context's) */
  double t0, t1;               /* Unix seconds */
  const char *error;           /* status ERROR with this message, or NULL */
  const struct tn_span_attr *attrs;
  int n_attrs;
};

struct tn_tracer_config {
  const char *endpoint;        /* http(s)://host:port/v1/traces */
  const char *const *headers;  /* "Name: value" each, sent with every POST */
  int n_headers;
  const char *service;         /* resource service.name ("tern") */
  double sample;               /* share of requests without a parent */
  size_t queue_max;            /* traces waiting (0: 1024) */
};
struct tn_tracer;
/* Checks the endpoint's scheme; metrics (may be NULL) get
 * tern_otlp_spans_exported_total and tern_otlp_spans_dropped_total. */
enum tn_status tn_tracer_open(const struct tn_tracer_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_tracer **out, struct tn_error *err);
/* Sends what is queued (one last try), stops. NULL ok. */
void tn_tracer_close(struct tn_tracer *t);
double tn_tracer_sample(const struct tn_tracer *t);
/* Queues one trace: spans[0] must be the root. Copies what it needs. */
void tn_tracer_add(struct tn_tracer *t, const struct tn_trace_ctx *ctx,
                   const struct tn_span *spans, int n_spans);
/* Waits until everything queued so far was sent or dropped (tests). */
void tn_tracer_flush(struct tn_tracer *t);

/* ---- live statistics (stats.c): the dashboard's time series
 *
 * Every finished API request (its request log row, logged or not) lands
 * in the current slot of two rings kept per (model, tenant): one slot a
 * second for the last 15 minutes, one a minute for the last 24 hours. A
 * slot counts requests, errors by type and tokens, sums cost, and keeps
 * log-spaced histograms of time to first token, inter-token gaps (every
 * gap, from the request's own histogram) and end-to-end time, so
 * quantiles can be merged across slots and groups. Engine gauges (running,
 * waiting, KV use) are sampled into per-model rings. Memory is bounded:
 * at most TN_STATS_KEYS_MAX keys (later tenants fold into "(other)"), a
 * slot's histograms allocated when it is first used. */
#define TN_LAT_BUCKETS 80   /* ratio 2^(1/3) from 0.1 ms: 0.1 ms .. 1.9 h */
#define TN_STATS_KEYS_MAX 256

/* The histogram bucket of a latency in seconds (0: below 0.1 ms). */
int tn_lat_bucket(double seconds);

struct tn_stats;
struct tn_stats *tn_stats_new(void);
void tn_stats_free(struct tn_stats *s);
/* Records a finished request at Unix time now_s; itl_hist (may be NULL)
 * holds the request's inter-token gaps by tn_lat_bucket. */
void tn_stats_add(struct tn_stats *s, double now_s,
                  const struct tn_reqlog_row *r, const uint32_t *itl_hist);
/* A shadow comparison, under (r->source, r->tenant): the series
 * shadow_exact_rate and shadow_overlap, and the totals' "shadow". */
void tn_stats_shadow(struct tn_stats *s, double now_s,
                     const struct tn_shadow_row *r);
/* One sample of a model's engine gauges (kv_used: fraction 0..1). */
void tn_stats_gauges(struct tn_stats *s, double now_s, const char *model,
                     double running, double waiting, double kv_used);
/* The dashboard API's series as JSON (docs/MONITORING.md): window_s in
 * 60..86400 ending at now_s, grouped by "model", "tenant" or "none".
 * Returns malloc'd text, NULL when out of memory. */
char *tn_stats_json(struct tn_stats *s, double now_s, double window_s,
                    const char *by, size_t *len);

#endif /* TN_OBS_H */
