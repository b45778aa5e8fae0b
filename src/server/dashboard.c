/*
 * dashboard.c: the dashboard's JSON API (dashboard.h).
 *
 * Every argument is checked against a fixed list for its route: an
 * unknown name, a repeated one, a value that does not parse or is too
 * long gets a 400 naming it. Values reach SQLite only as bound parameters
 * of the request log's fixed query (tn_reqlog_read), and reach the page
 * only as JSON strings, which its script puts into text nodes.
 */
#include "server/dashboard.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "obs/obs.h"

#define VALUE_MAX 256
#define LIMIT_MAX 500

static int bad_arg(struct tn_api_error *err, const char *name,
                   const char *why) {
  return tn_api_error_set(err, 400, "invalid_request_error", name,
                          "invalid_value", "%s: %s", name, why);
}

/* Checks ctx's arguments: every name in allowed (NULL-terminated), none
 * repeated, every value present and at most VALUE_MAX bytes. False with
 * err filled (400 naming the argument) otherwise. */
static bool check_args(const struct tn_dash_ctx *ctx,
                       const char *const *allowed, struct tn_api_error *err) {
  if (ctx->n_args > TN_DASH_ARGS_MAX) {
    bad_arg(err, "query", "too many arguments");
    return false;
  }
  for (int i = 0; i < ctx->n_args; i++) {
    const char *k = ctx->args[i].key;
    bool known = false;
    for (const char *const *a = allowed; *a && !known; a++)
      known = !strcmp(*a, k);
    if (!known) {
      char name[72];
      snprintf(name, sizeof name, "%.64s", k);
      tn_api_error_set(err, 400, "invalid_request_error", name,
                       "unknown_parameter",
                       "unknown query parameter '%s' for this route", name);
      return false;
    }
    for (int j = 0; j < i; j++)
      if (!strcmp(ctx->args[j].key, k)) {
        bad_arg(err, k, "given more than once");
        return false;
      }
    const char *v = ctx->args[i].value;
    if (!v || !*v) {
      bad_arg(err, k, "needs a value");
      return false;
    }
    if (strlen(v) > VALUE_MAX) {
      bad_arg(err, k, "value longer than 256 bytes");
      return false;
    }
  }
  return true;
}

static const char *arg(const struct tn_dash_ctx *ctx, const char *name) {
  for (int i = 0; i < ctx->n_args; i++)
    if (!strcmp(ctx->args[i].key, name)) return ctx->args[i].value;
  return NULL;
}

static char *api_stats(const struct tn_dash_ctx *ctx, size_t *len,
                       struct tn_api_error *err) {
  static const char *const allowed[] = {"window", "by", NULL};
  if (!check_args(ctx, allowed, err)) return NULL;
  double window = 900;
  const char *w = arg(ctx, "window"), *by = arg(ctx, "by");
  if (w && (!tn_parse_duration(w, &window) || window < 60 ||
            window > 86400)) {
    bad_arg(err, "window", "a duration from 60s to 24h (5m, 15m, 1h, 6h, 24h)");
    return NULL;
  }
  if (!by) by = "model";
  if (strcmp(by, "model") && strcmp(by, "tenant") && strcmp(by, "none")) {
    bad_arg(err, "by", "one of model, tenant, none");
    return NULL;
  }
  char *out = tn_stats_json(ctx->stats, ctx->now_s, window, by, len);
  if (!out)
    tn_api_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
  return out;
}

static bool need_log(const struct tn_dash_ctx *ctx, struct tn_api_error *err) {
  if (ctx->log_path) return true;
  tn_api_error_set(err, 404, "invalid_request_error", NULL,
                   "request_log_disabled",
                   "the request log is off: start tern serve with --log-db "
                   "PATH");
  return false;
}

static bool append_row(void *user, json_t *obj) {
  return json_array_append(user, obj) == 0;
}

/* The rows f selects, newest first; NULL with err filled (500). */
static json_t *read_rows(const struct tn_dash_ctx *ctx,
                         const struct tn_reqlog_filter *f,
                         struct tn_api_error *err) {
  json_t *rows = json_array();
  struct tn_error e = {0};
  if (!rows || tn_reqlog_read(ctx->log_path, f, append_row, rows, &e)) {
    json_decref(rows);
    tn_api_error_set(err, 500, "server_error", NULL, "request_log_unreadable",
                     "the request log cannot be read: %s",
                     rows ? e.msg : "out of memory");
    return NULL;
  }
  return rows;
}

/* "TS-ID" (a row's ts and id, the list's "next") */
static bool parse_cursor(const char *s, int64_t *ts, int64_t *id) {
  char *end;
  long long a = strtoll(s, &end, 10);
  if (end == s || *end != '-' || a <= 0) return false;
  const char *p = end + 1;
  long long b = strtoll(p, &end, 10);
  if (end == p || *end || b <= 0) return false;
  *ts = a;
  *id = b;
  return true;
}

static char *dump(json_t *o, size_t *len, struct tn_api_error *err) {
  char *out = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(o);
  if (!out) {
    tn_api_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  *len = strlen(out);
  return out;
}

/* limit=N (1..LIMIT_MAX) into *out, which keeps its default without. */
static bool parse_limit(const struct tn_dash_ctx *ctx, int64_t *out,
                        struct tn_api_error *err) {
  const char *v = arg(ctx, "limit");
  if (!v) return true;
  char *end;
  long n = strtol(v, &end, 10);
  if (end == v || *end || n < 1 || n > LIMIT_MAX) {
    bad_arg(err, "limit", "an integer from 1 to 500");
    return false;
  }
  *out = n;
  return true;
}

/* since=DURATION: *ms_out the Unix ms that far back (kept without). */
static bool parse_since(const struct tn_dash_ctx *ctx, int64_t *ms_out,
                        struct tn_api_error *err) {
  const char *v = arg(ctx, "since");
  if (!v) return true;
  double s;
  if (!tn_parse_duration(v, &s) || s > 3650.0 * 86400) {
    bad_arg(err, "since", "a duration: 90s, 15m, 2h, 7d");
    return false;
  }
  *ms_out = (int64_t)((ctx->now_s - s) * 1000.0);
  return true;
}

static char *api_requests(const struct tn_dash_ctx *ctx, size_t *len,
                          struct tn_api_error *err) {
  static const char *const allowed[] = {
      "limit", "before", "model", "endpoint", "tenant", "status", "since",
      "request_id", NULL};
  if (!check_args(ctx, allowed, err) || !need_log(ctx, err)) return NULL;
  struct tn_reqlog_filter f;
  tn_reqlog_filter_init(&f);
  const char *v;
  if (!parse_limit(ctx, &f.limit, err)) return NULL;
  if ((v = arg(ctx, "before")) &&
      !parse_cursor(v, &f.before_ts, &f.before_id)) {
    bad_arg(err, "before", "a cursor from a list's \"next\"");
    return NULL;
  }
  if ((v = arg(ctx, "status")) && !tn_reqlog_parse_status(v, &f)) {
    bad_arg(err, "status", "200, 4xx, 5xx, ... or error");
    return NULL;
  }
  if (!parse_since(ctx, &f.since_ms, err)) return NULL;
  f.model = arg(ctx, "model");
  f.endpoint = arg(ctx, "endpoint");
  f.tenant = arg(ctx, "tenant");
  f.request_id = arg(ctx, "request_id");
  json_t *rows = read_rows(ctx, &f, err);
  if (!rows) return NULL;
  json_t *o = json_object();
  json_object_set_new(o, "object", json_string("list"));
  size_t n = json_array_size(rows);
  json_t *next = json_null();
  if (n > 0 && (int64_t)n == f.limit) {
    json_t *last = json_array_get(rows, n - 1);
    char cur[48];
    snprintf(cur, sizeof cur, "%lld-%lld",
             (long long)json_integer_value(json_object_get(last, "ts")),
             (long long)json_integer_value(json_object_get(last, "id")));
    json_decref(next);
    next = json_string(cur);
  }
  json_object_set_new(o, "data", rows);
  json_object_set_new(o, "next", next);
  return dump(o, len, err);
}

static char *api_request(const struct tn_dash_ctx *ctx, const char *id,
                         size_t *len, struct tn_api_error *err) {
  static const char *const allowed[] = {NULL};
  if (!check_args(ctx, allowed, err) || !need_log(ctx, err)) return NULL;
  if (!*id || strlen(id) > 128) {
    bad_arg(err, "request_id", "1 to 128 bytes");
    return NULL;
  }
  struct tn_reqlog_filter f;
  tn_reqlog_filter_init(&f);
  f.request_id = id;
  f.limit = 1;
  f.content = true;
  json_t *rows = read_rows(ctx, &f, err);
  if (!rows) return NULL;
  if (json_array_size(rows) == 0) {
    json_decref(rows);
    tn_api_error_set(err, 404, "invalid_request_error", "request_id",
                     "request_not_found",
                     "no request with this id in the request log");
    return NULL;
  }
  json_t *row = json_incref(json_array_get(rows, 0));
  json_decref(rows);
  return dump(row, len, err);
}

/* Shadow comparisons, newest first; "next" is the last row's id. */
static char *api_shadows(const struct tn_dash_ctx *ctx, size_t *len,
                         struct tn_api_error *err) {
  static const char *const allowed[] = {"limit", "before", "source", "since",
                                        NULL};
  if (!check_args(ctx, allowed, err) || !need_log(ctx, err)) return NULL;
  int64_t limit = 50, since_ms = 0, before = 0;
  const char *v;
  if (!parse_limit(ctx, &limit, err) || !parse_since(ctx, &since_ms, err))
    return NULL;
  if ((v = arg(ctx, "before"))) {
    char *end;
    long long b = strtoll(v, &end, 10);
    if (end == v || *end || b <= 0) {
      bad_arg(err, "before", "a row id from a list's \"next\"");
      return NULL;
    }
    before = b;
  }
  json_t *rows = json_array();
  struct tn_error e = {0};
  if (!rows || tn_reqlog_read_shadows(ctx->log_path, arg(ctx, "source"),
                                      since_ms, before, limit, true,
                                      append_row, rows, &e)) {
    json_decref(rows);
    tn_api_error_set(err, 500, "server_error", NULL, "request_log_unreadable",
                     "the request log cannot be read: %s",
                     rows ? e.msg : "out of memory");
    return NULL;
  }
  size_t n = json_array_size(rows);
  json_t *next =
      n > 0 && (int64_t)n == limit
          ? json_integer(json_integer_value(
                json_object_get(json_array_get(rows, n - 1), "id")))
          : json_null();
  return dump(json_pack("{s:s,s:o,s:o}", "object", "list", "data", rows,
                        "next", next),
              len, err);
}

char *tn_dash_api(const struct tn_dash_ctx *ctx, const char *path,
                  size_t *len, struct tn_api_error *err) {
  if (!strcmp(path, "/api/stats")) return api_stats(ctx, len, err);
  if (!strcmp(path, "/api/shadows")) return api_shadows(ctx, len, err);
  if (!strcmp(path, "/api/requests")) return api_requests(ctx, len, err);
  if (!strncmp(path, "/api/requests/", 14))
    return api_request(ctx, path + 14, len, err);
  tn_api_error_set(err, 404, "invalid_request_error", NULL, "unknown_url",
                   "Unknown dashboard API route (try /api/stats, "
                   "/api/requests, /api/shadows)");
  return NULL;
}
