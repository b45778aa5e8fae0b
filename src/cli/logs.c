/*
 * logs.c: tern logs, a reader for the request log (tern serve --log-db).
 *
 * Filters become bound parameters of the log's one prepared query
 * (tn_reqlog_read: never SQL built from the user's text); the newest N
 * matching rows print oldest first, as a table or as JSON lines.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "obs/obs.h"

static const char *str_of(json_t *o, const char *k) {
  return json_string_value(json_object_get(o, k));
}

static void num_of(json_t *o, const char *k, const char *fmt, char *out,
                   size_t cap) {
  json_t *v = json_object_get(o, k);
  if (json_is_integer(v)) snprintf(out, cap, "%lld", (long long)json_integer_value(v));
  else if (json_is_real(v)) snprintf(out, cap, fmt, json_real_value(v));
}

static void print_row_table(FILE *f, json_t *o) {
  time_t t = (time_t)(json_integer_value(json_object_get(o, "ts")) / 1000);
  struct tm tm;
  gmtime_r(&t, &tm);
  char when[32];
  strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  const char *ep = str_of(o, "endpoint"), *model = str_of(o, "model");
  const char *fin = str_of(o, "finish_reason"), *err = str_of(o, "error");
  char status[16] = "-", pt[24] = "-", ct[24] = "-", ttft[24] = "-",
       e2e[24] = "-";
  num_of(o, "status", "%.0f", status, sizeof status);
  num_of(o, "prompt_tokens", "%.0f", pt, sizeof pt);
  num_of(o, "completion_tokens", "%.0f", ct, sizeof ct);
  num_of(o, "ttft_ms", "%.1f", ttft, sizeof ttft);
  num_of(o, "e2e_ms", "%.1f", e2e, sizeof e2e);
  /* a request on an adapter shows as MODEL:ADAPTER */
  const char *ad = str_of(o, "adapter");
  char mbuf[200];
  snprintf(mbuf, sizeof mbuf, "%s%s%s", model ? model : "-", ad ? ":" : "",
           ad ? ad : "");
  fprintf(f, "%-19s %-6s %-22.22s %-24.24s %7s %7s %9s %9s %-9s %.60s\n",
          when, status, ep ? ep : "-", mbuf, pt, ct, ttft, e2e,
          fin ? fin : "-", err ? err : "");
}

/* Rows arrive newest first and print oldest first: kept as text. */
struct collect {
  bool json;
  char **rows;
  size_t n, cap;
  bool oom;
};

static bool collect_row(void *user, json_t *o) {
  struct collect *c = user;
  if (c->n == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 64;
    char **v = realloc(c->rows, cap * sizeof(*v));
    if (!v) {
      c->oom = true;
      return false;
    }
    c->rows = v;
    c->cap = cap;
  }
  char *text = NULL;
  if (c->json) {
    json_object_del(o, "id");
    text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
  } else {
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f) {
      print_row_table(f, o);
      fclose(f);
    }
  }
  if (!text) {
    c->oom = true;
    return false;
  }
  c->rows[c->n++] = text;
  return true;
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
  struct tn_reqlog_filter f;
  tn_reqlog_filter_init(&f);
  double since_s = 0;
  if (since && !tn_parse_duration(since, &since_s))
    return tn_cli_fail("--since: '%s' is not a duration (90s, 15m, 2h, 7d)",
                       since);
  if (status && !tn_reqlog_parse_status(status, &f))
    return tn_cli_fail("--status: '%s' is not a status (200, 4xx, error)",
                       status);
  if (since) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    f.since_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 -
                 (int64_t)(since_s * 1000.0);
  }
  f.model = model;
  f.endpoint = endpoint;
  f.tenant = tenant;
  f.limit = limit;
  f.content = true;
  struct collect c = {.json = json};
  struct tn_error err = {0};
  int ret = 0;
  if (tn_reqlog_read(db, &f, collect_row, &c, &err) != TN_OK)
    ret = tn_cli_fail("logs: %s", err.msg);
  else if (c.oom)
    ret = tn_cli_fail("out of memory");
  if (!ret && !json && c.n)
    printf("%-19s %-6s %-22s %-24s %7s %7s %9s %9s %-9s %s\n", "time (UTC)",
           "status", "endpoint", "model", "prompt", "output", "ttft_ms",
           "e2e_ms", "finish", "error");
  for (size_t i = c.n; i-- > 0;) {
    if (!ret) {
      fputs(c.rows[i], stdout);
      if (json) fputc('\n', stdout);
    }
    free(c.rows[i]);
  }
  free(c.rows);
  return ret;
}
