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
};

struct tn_reqlog_row {
  int64_t ts_ms;           /* arrival, Unix milliseconds */
  const char *request_id;  /* strings may be NULL: stored as NULL */
  const char *tenant;
  const char *endpoint;
  const char *model;
  int status;              /* HTTP status sent (0: none, client gone) */
  const char *finish;      /* finish reason of the first choice */
  const char *error;
  int64_t prompt_tokens, cached_tokens, completion_tokens;
  double queue_s, ttft_s, itl_mean_s, itl_max_s, e2e_s; /* < 0: unknown */
  const char *prompt;      /* with content on */
  size_t prompt_len;
  const char *output;
  size_t output_len;
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
/* Waits until every row queued so far is written (tests, shutdown). */
void tn_reqlog_flush(struct tn_reqlog *l);
bool tn_reqlog_content(const struct tn_reqlog *l);

#endif /* TN_OBS_H */
