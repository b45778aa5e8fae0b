/*
 * dashboard.h: GET /dashboard (a page built into the binary) and the JSON
 * API it draws from (docs/MONITORING.md):
 *
 *   GET /api/stats?window=15m&by=model     live series (tn_stats_json)
 *   GET /api/requests?limit=50&model=...   the request log, newest first
 *   GET /api/requests/{request_id}         one row, with its text if stored
 *   GET /api/shadows?limit=50&source=...   shadow comparisons, newest first
 *
 * The handlers are plain functions of the query arguments so they can be
 * tested without a server; http.c routes to them and adds auth.
 */
#ifndef TN_SERVER_DASHBOARD_H
#define TN_SERVER_DASHBOARD_H

#include <stddef.h>

#include "server/api.h"

struct tn_stats;
struct tn_reqlog;

#define TN_DASH_ARGS_MAX 16

struct tn_dash_arg {
  const char *key, *value; /* value may be NULL (?flag) */
};

struct tn_dash_ctx {
  struct tn_stats *stats;
  const char *log_path;   /* NULL: no request log */
  double now_s;           /* Unix time */
  const struct tn_dash_arg *args;
  int n_args;             /* > TN_DASH_ARGS_MAX: refused */
};

/* The page: static HTML with its script and styles inline. */
extern const char tn_dashboard_html[];
extern const size_t tn_dashboard_html_len;

/* Answers an API path (it starts with "/api/"). Returns a malloc'd JSON
 * body on 200; NULL with *err filled (4xx, OpenAI's error shape) on bad
 * arguments, an unknown path or no request log; NULL with err->http_status
 * 500 when out of memory or the log cannot be read. */
char *tn_dash_api(const struct tn_dash_ctx *ctx, const char *path,
                  size_t *len, struct tn_api_error *err);

#endif /* TN_SERVER_DASHBOARD_H */
