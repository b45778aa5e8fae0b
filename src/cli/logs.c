/*
 * logs.c: tern logs, a reader for the request log (tern serve --log-db).
 *
 * Filters become bound parameters of one prepared query (never SQL built
 * from the user's text); the newest N matching rows print oldest first, as
 * a table or as JSON lines.
 */
#include <jansson.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"

static const char k_query[] =
    "SELECT ts, request_id, tenant, endpoint, model, status, finish_reason,"
    " error, prompt_tokens, cached_tokens, completion_tokens, queue_ms,"
    " ttft_ms, itl_mean_ms, itl_max_ms, e2e_ms, prompt, output"
    " FROM requests WHERE ts >= ?1"
    " AND (?2 IS NULL OR model = ?2)"
    " AND (?3 IS NULL OR endpoint = ?3)"
    " AND (?4 IS NULL OR tenant = ?4)"
    " AND (status BETWEEN ?5 AND ?6 OR (?5 = 0 AND status IS NULL))"
    " AND (?7 = 0 OR status IS NULL OR status >= 400 OR error IS NOT NULL)"
    " ORDER BY ts DESC, rowid DESC LIMIT ?8";

static const char *const k_cols[] = {
    "ts",           "request_id",    "tenant",        "endpoint",
    "model",        "status",        "finish_reason", "error",
    "prompt_tokens", "cached_tokens", "completion_tokens", "queue_ms",
    "ttft_ms",      "itl_mean_ms",   "itl_max_ms",    "e2e_ms",
    "prompt",       "output"};

/* "90s", "15m", "2h", "7d" (a bare number is seconds) -> seconds. */
static bool parse_duration(const char *s, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || v < 0) return false;
  double mul = 1;
  if (*end == 's') mul = 1, end++;
  else if (*end == 'm') mul = 60, end++;
  else if (*end == 'h') mul = 3600, end++;
  else if (*end == 'd') mul = 86400, end++;
  if (*end) return false;
  *out = v * mul;
  return true;
}

/* "200", "4xx", "error" -> a status range and the error flag. */
static bool parse_status(const char *s, int *lo, int *hi, bool *errors) {
  *errors = false;
  if (!strcmp(s, "error")) {
    *lo = 0, *hi = 999, *errors = true;
    return true;
  }
  if (strlen(s) == 3 && s[0] >= '1' && s[0] <= '5' && s[1] == 'x' &&
      s[2] == 'x') {
    *lo = (s[0] - '0') * 100, *hi = *lo + 99;
    return true;
  }
  char *end;
  long v = strtol(s, &end, 10);
  if (*end || v < 100 || v > 599) return false;
  *lo = *hi = (int)v;
  return true;
}

static void bind_opt(sqlite3_stmt *st, int i, const char *s) {
  if (s) sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
  else sqlite3_bind_null(st, i);
}

static void print_row_table(FILE *f, sqlite3_stmt *st) {
  time_t t = (time_t)(sqlite3_column_int64(st, 0) / 1000);
  struct tm tm;
  gmtime_r(&t, &tm);
  char when[32];
  strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  const char *ep = (const char *)sqlite3_column_text(st, 3);
  const char *model = (const char *)sqlite3_column_text(st, 4);
  const char *fin = (const char *)sqlite3_column_text(st, 6);
  const char *err = (const char *)sqlite3_column_text(st, 7);
  char status[8] = "-", pt[16] = "-", ct[16] = "-", ttft[16] = "-",
       e2e[16] = "-";
  if (sqlite3_column_type(st, 5) != SQLITE_NULL)
    snprintf(status, sizeof status, "%d", sqlite3_column_int(st, 5));
  if (sqlite3_column_type(st, 8) != SQLITE_NULL)
    snprintf(pt, sizeof pt, "%lld", (long long)sqlite3_column_int64(st, 8));
  if (sqlite3_column_type(st, 10) != SQLITE_NULL)
    snprintf(ct, sizeof ct, "%lld", (long long)sqlite3_column_int64(st, 10));
  if (sqlite3_column_type(st, 12) != SQLITE_NULL)
    snprintf(ttft, sizeof ttft, "%.1f", sqlite3_column_double(st, 12));
  if (sqlite3_column_type(st, 15) != SQLITE_NULL)
    snprintf(e2e, sizeof e2e, "%.1f", sqlite3_column_double(st, 15));
  fprintf(f, "%-19s %-6s %-22.22s %-24.24s %7s %7s %9s %9s %-9s %.60s\n",
          when, status, ep ? ep : "-", model ? model : "-", pt, ct, ttft, e2e,
          fin ? fin : "-", err ? err : "");
}

static void print_row_json(FILE *f, sqlite3_stmt *st) {
  json_t *o = json_object();
  for (int i = 0; i < (int)TN_ARRAY_LEN(k_cols); i++) {
    json_t *v;
    switch (sqlite3_column_type(st, i)) {
    case SQLITE_INTEGER: v = json_integer(sqlite3_column_int64(st, i)); break;
    case SQLITE_FLOAT: v = json_real(sqlite3_column_double(st, i)); break;
    case SQLITE_TEXT:
      v = json_stringn((const char *)sqlite3_column_text(st, i),
                       (size_t)sqlite3_column_bytes(st, i));
      break;
    default: v = json_null(); break;
    }
    json_object_set_new(o, k_cols[i], v ? v : json_null());
  }
  char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (s) fprintf(f, "%s\n", s);
  free(s);
  json_decref(o);
}

int tn_cli_logs(int argc, char **argv) {
  const char *db = NULL, *since = NULL, *model = NULL, *status = NULL;
  const char *endpoint = NULL, *tenant = NULL;
  long limit = 50;
  bool json = false;
  const struct tn_opt opts[] = {
      {"db", 0, TN_OPT_STR, &db, 0, 0, "PATH",
       "the request log (tern serve --log-db PATH)", NULL, NULL, 0},
      {"since", 0, TN_OPT_STR, &since, 0, 0, "DURATION",
       "only rows newer than this: 90s, 15m, 2h, 7d", "all", NULL, 0},
      {"model", 0, TN_OPT_STR, &model, 0, 0, "NAME", "only this model",
       "all", NULL, 0},
      {"status", 0, TN_OPT_STR, &status, 0, 0, "CODE",
       "200, 4xx, 5xx, ... or error (4xx, 5xx, failed or cut off)", "all",
       NULL, 0},
      {"endpoint", 0, TN_OPT_STR, &endpoint, 0, 0, "PATH",
       "only this endpoint, e.g. /v1/chat/completions", "all", NULL, 0},
      {"tenant", 0, TN_OPT_STR, &tenant, 0, 0, "NAME", "only this tenant",
       "all", NULL, 0},
      {"limit", 'n', TN_OPT_INT, &limit, 0, 1000000000, "N",
       "the newest N rows (0: all)", NULL, NULL, 0},
      {"json", 0, TN_OPT_FLAG, &json, 0, 0, NULL,
       "one JSON object per row (every column)", NULL, NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "logs", "tern logs --db PATH [filters] [--json]",
      "Prints rows of the request log that tern serve --log-db writes, oldest "
      "first: time (UTC), status, endpoint, model, prompt and completion "
      "tokens, time to first token and end-to-end time (ms), finish reason, "
      "error.",
      "examples:\n  tern logs --db requests.db --since 1h --status error\n"
      "  tern logs --db requests.db --model qwen2.5-coder-0.5b --json -n 0",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (!db) return tn_cli_fail("logs: --db PATH is required");
  double since_s = 0;
  if (since && !parse_duration(since, &since_s))
    return tn_cli_fail("--since: '%s' is not a duration (90s, 15m, 2h, 7d)",
                       since);
  int lo = 0, hi = 999;
  bool errors = false;
  if (status && !parse_status(status, &lo, &hi, &errors))
    return tn_cli_fail("--status: '%s' is not a status (200, 4xx, error)",
                       status);
  sqlite3 *h = NULL;
  if (sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    int rc = tn_cli_fail("logs: %s: %s", db,
                         h ? sqlite3_errmsg(h) : "cannot open");
    sqlite3_close(h);
    return rc;
  }
  sqlite3_busy_timeout(h, 2000);
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(h, k_query, -1, &st, NULL) != SQLITE_OK) {
    int rc = tn_cli_fail("logs: %s: %s (not a tern request log?)", db,
                         sqlite3_errmsg(h));
    sqlite3_close(h);
    return rc;
  }
  int64_t from = 0;
  if (since) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    from = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 -
           (int64_t)(since_s * 1000.0);
  }
  sqlite3_bind_int64(st, 1, from);
  bind_opt(st, 2, model);
  bind_opt(st, 3, endpoint);
  bind_opt(st, 4, tenant);
  sqlite3_bind_int(st, 5, lo);
  sqlite3_bind_int(st, 6, hi);
  sqlite3_bind_int(st, 7, errors);
  sqlite3_bind_int64(st, 8, limit > 0 ? limit : -1);
  /* newest first from SQLite; printed oldest first */
  char **rows = NULL;
  size_t n = 0, cap = 0;
  int rc;
  bool oom = false;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      char **v = realloc(rows, cap * sizeof(*v));
      if (!v) {
        oom = true;
        break;
      }
      rows = v;
    }
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
      oom = true;
      break;
    }
    if (json) print_row_json(f, st);
    else print_row_table(f, st);
    fclose(f);
    rows[n++] = text;
  }
  int ret = 0;
  if (oom) ret = tn_cli_fail("out of memory");
  else if (rc != SQLITE_DONE)
    ret = tn_cli_fail("logs: %s: %s", db, sqlite3_errmsg(h));
  if (!ret && !json && n)
    printf("%-19s %-6s %-22s %-24s %7s %7s %9s %9s %-9s %s\n", "time (UTC)",
           "status", "endpoint", "model", "prompt", "output", "ttft_ms",
           "e2e_ms", "finish", "error");
  for (size_t i = n; i-- > 0;) {
    if (!ret) fputs(rows[i], stdout);
    free(rows[i]);
  }
  free(rows);
  sqlite3_finalize(st);
  sqlite3_close(h);
  return ret;
}
