/*
 * eval.c: tern eval, a dataset through a model, scored (docs/EVAL.md).
 *
 * Targets. A model (--model, --judge, --pairwise) is a URL of an
 * OpenAI-compatible server ("http://host:port/v1", "#NAME" picks the
 * model name sent) or a local model, which this process serves on a
 * loopback port with the same server `tern serve` runs (one compute pool
 * for all of them). Everything then goes over HTTP, so local and remote
 * targets behave the same, and a tern judge gets its verdict's JSON
 * schema as response_format: constrained, it always parses.
 *
 * Items. One JSON object per line: "prompt" or "messages", optional
 * "answer" (used instead of asking the model: judge validation sets),
 * reference checks ("exact", "contains", "regex", "number" with
 * "tolerance", "json_schema"), "reference" (shown to the judge), the
 * judge's known verdict ("expected_score", "expected_winner") and "id".
 * A line that does not parse, a model that does not answer, a judge that
 * answers garbage: that item's error, stored and counted; the run goes on.
 *
 * Workers (--concurrency) take items in order; results go to SQLite (the
 * same file as the request log, if you like) as each item ends, so an
 * interrupted run resumes (--resume) with the items it has not finished.
 * The summary gives pass rates and judge agreement with Wilson 95%
 * intervals and the mean score with a t interval.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <pcre2.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "grammar/grammar.h"
#include "obs/judge.h"
#include "obs/obs.h"
#include "server/server.h"

/* ---- targets */

struct target {
  const char *spec;       /* as given */
  char base[512];         /* http://host:port/v1, no trailing slash */
  char model[256];        /* "model" sent ("": none) */
  bool local;
  struct tn_engine *engine;
  struct tn_server *srv;
  struct tn_server_model sm;
};

struct eval {
  struct target model, judge, other;
  bool have_judge, have_other;
  const char *api_key;
  struct tn_pool *pool;
  struct tn_metrics *metrics;
  double temperature;
  long max_tokens, judge_max_tokens, scale, timeout_s;
  char *rubric;
  /* results */
  sqlite3 *db;
  pthread_mutex_t db_mu;
  int64_t run_id;
  /* progress */
  atomic_int next, done, failed;
  int n_items;
  bool tty;
  double t0;
  pthread_mutex_t print_mu;
  struct item *items;
};

static bool is_url(const char *s) {
  return !strncmp(s, "http://", 7) || !strncmp(s, "https://", 8);
}

static int target_open(struct eval *ev, struct target *t, const char *spec,
                       long threads, long ctx, long seqs) {
  memset(t, 0, sizeof(*t));
  t->spec = spec;
  if (is_url(spec)) {
    const char *hash = strchr(spec, '#');
    size_t n = hash ? (size_t)(hash - spec) : strlen(spec);
    while (n && spec[n - 1] == '/') n--;
    if (n >= sizeof(t->base)) return tn_cli_fail("eval: URL too long");
    memcpy(t->base, spec, n);
    t->base[n] = '\0';
    if (hash) snprintf(t->model, sizeof(t->model), "%s", hash + 1);
    return 0;
  }
  t->local = true;
  char pbuf[4096];
  const char *path = tn_cli_model_path(spec, pbuf, sizeof(pbuf));
  if (!path) return 1;
  if (!ev->pool) {
    ev->pool = tn_pool_new(tn_cli_threads(threads));
    ev->metrics = tn_metrics_new();
    if (!ev->pool || !ev->metrics) return tn_cli_fail("out of memory");
  }
  struct tn_engine_config ec;
  tn_engine_config_default(&ec);
  ec.pool = ev->pool;
  ec.name = spec;
  ec.n_ctx = (int32_t)ctx;
  ec.max_seqs = (int32_t)seqs;
  struct tn_error err = {0};
  if (tn_engine_open(path, &ec, ev->metrics, &t->engine, &err))
    return tn_cli_fail("%s: %s", path, err.msg);
  struct tn_server_config sc;
  tn_server_config_default(&sc);
  sc.port = 0;
  sc.http_threads = 2;
  sc.conn_timeout_s = (int)ev->timeout_s + 10;
  t->sm = (struct tn_server_model){.name = spec,
                                   .engine = t->engine,
                                   .price_prompt = -1,
                                   .price_cached = -1,
                                   .price_completion = -1};
  if (tn_server_start(&sc, &t->sm, 1, ev->metrics, &t->srv, &err))
    return tn_cli_fail("eval: %s", err.msg);
  snprintf(t->base, sizeof(t->base), "http://127.0.0.1:%d/v1",
           tn_server_port(t->srv));
  snprintf(t->model, sizeof(t->model), "%s", spec);
  return 0;
}

static void target_close(struct target *t) {
  tn_server_stop(t->srv);
  tn_engine_close(t->engine);
  t->srv = NULL;
  t->engine = NULL;
}

/* ---- HTTP */

struct membuf {
  char *p;
  size_t n;
};

static size_t on_body(char *d, size_t size, size_t n, void *user) {
  struct membuf *b = user;
  size_t add = size * n;
  if (b->n + add > (64u << 20)) return 0;
  char *p = realloc(b->p, b->n + add + 1);
  if (!p) return 0;
  memcpy(p + b->n, d, add);
  b->p = p;
  b->n += add;
  p[b->n] = '\0';
  return add;
}

/* One HTTP exchange: method to url with headers hd and body[len] (none
 * when body is NULL); the answer's body goes to *resp, its status to
 * *code. False, with err naming what, when no answer came at all. */
static bool http_call(const char *what, const char *method, const char *url,
                      struct curl_slist *hd, const char *body, size_t len,
                      long timeout_s, struct membuf *resp, long *code,
                      char *err, size_t cap) {
  *code = 0;
  CURL *h = curl_easy_init();
  if (!h) {
    snprintf(err, cap, "out of memory");
    return false;
  }
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  if (body) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)len);
  }
  curl_easy_setopt(h, CURLOPT_TIMEOUT, timeout_s);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, resp);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  CURLcode rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, code);
  curl_easy_cleanup(h);
  if (rc != CURLE_OK) {
    snprintf(err, cap, "%.200s: %s", what, curl_easy_strerror(rc));
    return false;
  }
  return true;
}

struct answer {
  char *text;                 /* malloc'd */
  int64_t prompt_tokens, completion_tokens;
  double latency_s;
};

/* POSTs a chat completion; on failure err says why (the server's own
 * message when it sent one). */
static bool ask(struct eval *ev, const struct target *t, json_t *messages,
                long max_tokens, json_t *response_format, struct answer *out,
                char *err, size_t cap) {
  memset(out, 0, sizeof(*out));
  json_t *body = json_object();
  if (t->model[0]) json_object_set_new(body, "model", json_string(t->model));
  json_object_set(body, "messages", messages);
  json_object_set_new(body, "max_tokens", json_integer(max_tokens));
  json_object_set_new(body, "temperature", json_real(ev->temperature));
  json_object_set_new(body, "seed", json_integer(1234));
  if (response_format)
    json_object_set(body, "response_format", response_format);
  char *text = json_dumps(body, JSON_COMPACT);
  json_decref(body);
  if (!text) {
    snprintf(err, cap, "out of memory");
    return false;
  }
  char url[600];
  snprintf(url, sizeof(url), "%s/chat/completions", t->base);
  struct curl_slist *hd = curl_slist_append(NULL,
                                            "Content-Type: application/json");
  char auth[4200];
  if (ev->api_key && !t->local) {
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", ev->api_key);
    hd = curl_slist_append(hd, auth);
  }
  struct membuf b = {0};
  bool ok = false;
  long code;
  if (!hd) {
    snprintf(err, cap, "out of memory");
    goto out;
  }
  double t0 = tn_time_s();
  bool answered = http_call(t->spec, "POST", url, hd, text, strlen(text),
                            ev->timeout_s, &b, &code, err, cap);
  out->latency_s = tn_time_s() - t0;
  if (!answered) goto out;
  json_error_t je;
  json_t *r = b.p ? json_loads(b.p, 0, &je) : NULL;
  if (code != 200) {
    const char *m = json_string_value(
        json_object_get(json_object_get(r, "error"), "message"));
    snprintf(err, cap, "%s: HTTP %ld: %.300s", t->spec, code,
             m ? m : b.p ? b.p : "");
    json_decref(r);
    goto out;
  }
  json_t *msg = json_object_get(
      json_object_get(json_array_get(json_object_get(r, "choices"), 0),
                      "message"),
      "content");
  if (!json_is_string(msg)) {
    snprintf(err, cap, "%s: the answer has no choices[0].message.content",
             t->spec);
    json_decref(r);
    goto out;
  }
  out->text = strdup(json_string_value(msg));
  json_t *u = json_object_get(r, "usage");
  out->prompt_tokens = json_integer_value(json_object_get(u, "prompt_tokens"));
  out->completion_tokens =
      json_integer_value(json_object_get(u, "completion_tokens"));
  json_decref(r);
  ok = out->text != NULL;
  if (!ok) snprintf(err, cap, "out of memory");
out:
  curl_slist_free_all(hd);
  free(b.p);
  free(text);
  return ok;
}

/* ---- items */

struct item {
  int line;                  /* 1-based in the data file */
  char id[128];
  json_t *obj;               /* NULL: the line did not parse */
  char err[512];             /* why it failed ("" ok) */
  /* results */
  bool skip;                 /* done in the run resumed */
  char *output, *other_output;
  double latency_s;
  int64_t prompt_tokens, completion_tokens;
  int n_checks, n_pass;
  char checks[512];          /* "exact:pass contains:fail" */
  int score;                 /* judge, 0: none */
  char *judge_raw;
  char winner[8];            /* pairwise: "model", "other", "tie", "" */
  int orders_agree;          /* pairwise: both orders gave one verdict */
  char orders[8];            /* pairwise: the judge's letters, "A,B" */
};

/* The item's messages: "messages" as given, or "prompt" as one user turn. */
static json_t *item_messages(json_t *o) {
  json_t *m = json_object_get(o, "messages");
  if (json_is_array(m)) return json_incref(m);
  const char *p = json_string_value(json_object_get(o, "prompt"));
  return json_pack("[{s:s,s:s}]", "role", "user", "content", p ? p : "");
}

static const char *const k_item_keys[] = {
    "id", "prompt", "messages", "answer", "answer_b", "reference", "exact",
    "contains", "regex", "number", "tolerance", "json_schema",
    "expected_score", "expected_winner", "max_tokens", "metadata", NULL};

/* Checks an item's shape; false with it->err set. */
static bool item_validate(struct item *it) {
  json_t *o = it->obj;
  const char *k;
  json_t *v;
  json_object_foreach(o, k, v) {
    bool known = false;
    for (const char *const *p = k_item_keys; *p && !known; p++)
      known = !strcmp(*p, k);
    if (!known) {
      snprintf(it->err, sizeof(it->err), "line %d: unknown key '%.64s'",
               it->line, k);
      return false;
    }
  }
  json_t *p = json_object_get(o, "prompt"), *m = json_object_get(o, "messages");
  if (!json_is_string(p) == !json_is_array(m) ||
      (m && !json_array_size(m))) {
    snprintf(it->err, sizeof(it->err),
             "line %d: give \"prompt\" (a string) or \"messages\" (a "
             "non-empty list), one of them",
             it->line);
    return false;
  }
  static const char *const strs[] = {"answer", "answer_b", "reference",
                                     "exact", "regex", "expected_winner"};
  for (size_t i = 0; i < TN_ARRAY_LEN(strs); i++) {
    json_t *x = json_object_get(o, strs[i]);
    if (x && !json_is_string(x)) {
      snprintf(it->err, sizeof(it->err), "line %d: \"%s\" must be a string",
               it->line, strs[i]);
      return false;
    }
  }
  json_t *c = json_object_get(o, "contains");
  if (c && !json_is_string(c) && !json_is_array(c)) {
    snprintf(it->err, sizeof(it->err),
             "line %d: \"contains\" must be a string or a list of strings",
             it->line);
    return false;
  }
  json_t *num = json_object_get(o, "number");
  if (num && !json_is_number(num)) {
    snprintf(it->err, sizeof(it->err), "line %d: \"number\" must be a number",
             it->line);
    return false;
  }
  json_t *es = json_object_get(o, "expected_score");
  if (es && !json_is_integer(es)) {
    snprintf(it->err, sizeof(it->err),
             "line %d: \"expected_score\" must be an integer", it->line);
    return false;
  }
  const char *ew = json_string_value(json_object_get(o, "expected_winner"));
  if (ew && strcmp(ew, "a") && strcmp(ew, "b") && strcmp(ew, "tie")) {
    snprintf(it->err, sizeof(it->err),
             "line %d: \"expected_winner\" is \"a\", \"b\" or \"tie\"",
             it->line);
    return false;
  }
  return true;
}

static void trim(const char **s, size_t *n) {
  while (*n && strchr(" \t\r\n", **s)) (*s)++, (*n)--;
  while (*n && strchr(" \t\r\n", (*s)[*n - 1])) (*n)--;
}

static void add_check(struct item *it, const char *name, bool pass) {
  it->n_checks++;
  it->n_pass += pass;
  size_t l = strlen(it->checks);
  snprintf(it->checks + l, sizeof(it->checks) - l, "%s%s:%s", l ? " " : "",
           name, pass ? "pass" : "fail");
}

/* The first number in s (a '-' sign and a decimal point count; thousands
 * separators ',' are skipped between digits). */
static bool first_number(const char *s, double *out) {
  for (const char *p = s; *p; p++) {
    if ((*p >= '0' && *p <= '9') ||
        ((*p == '-' || *p == '.') && p[1] >= '0' && p[1] <= '9')) {
      char buf[64];
      size_t n = 0;
      for (const char *q = p; *q && n < sizeof(buf) - 1; q++) {
        if (*q == ',' && q > p && q[1] >= '0' && q[1] <= '9') continue;
        if (!((*q >= '0' && *q <= '9') || *q == '.' ||
              (q == p && *q == '-') || *q == 'e' || *q == 'E'))
          break;
        buf[n++] = *q;
      }
      buf[n] = '\0';
      char *end;
      double v = strtod(buf, &end);
      if (end != buf) {
        *out = v;
        return true;
      }
    }
  }
  return false;
}

static bool schema_ok(json_t *schema, const char *text) {
  json_t *v = tn_answer_json(text);
  if (!v) return false;
  char *compact = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER |
                                    JSON_ENCODE_ANY);
  json_decref(v);
  char *st = json_dumps(schema, JSON_COMPACT);
  struct tn_grammar *g = NULL;
  struct tn_grammar_matcher *m = NULL;
  struct tn_error err = {0};
  bool ok = compact && st &&
            tn_grammar_from_json_schema(st, strlen(st), &g, &err) == TN_OK &&
            tn_grammar_matcher_new(g, NULL, &m, &err) == TN_OK &&
            tn_grammar_matcher_accept_bytes(m, compact, strlen(compact)) &&
            tn_grammar_matcher_can_end(m);
  tn_grammar_matcher_free(m);
  tn_grammar_release(g);
  free(compact);
  free(st);
  return ok;
}

static void run_checks(struct item *it) {
  json_t *o = it->obj;
  const char *out = it->output;
  const char *x;
  if ((x = json_string_value(json_object_get(o, "exact")))) {
    const char *a = out, *b = x;
    size_t na = strlen(a), nb = strlen(b);
    trim(&a, &na);
    trim(&b, &nb);
    add_check(it, "exact", na == nb && !memcmp(a, b, na));
  }
  json_t *c = json_object_get(o, "contains");
  if (c) {
    bool all = true;
    if (json_is_string(c)) all = strstr(out, json_string_value(c)) != NULL;
    size_t i;
    json_t *e;
    json_array_foreach(c, i, e) all &= json_is_string(e) &&
                                       strstr(out, json_string_value(e));
    add_check(it, "contains", all);
  }
  if ((x = json_string_value(json_object_get(o, "regex")))) {
    int ec;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)x, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, &ec,
                                   &off, NULL);
    bool pass = false;
    if (re) {
      pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
      pass = md && pcre2_match(re, (PCRE2_SPTR)out, strlen(out), 0, 0, md,
                               NULL) >= 0;
      pcre2_match_data_free(md);
      pcre2_code_free(re);
    }
    add_check(it, "regex", pass);
  }
  json_t *num = json_object_get(o, "number");
  if (num) {
    double want = json_number_value(num), got;
    double tol = json_number_value(json_object_get(o, "tolerance"));
    bool pass =
        first_number(out, &got) &&
        fabs(got - want) <= (tol > 0 ? tol : 1e-9 * fmax(1, fabs(want)));
    add_check(it, "number", pass);
  }
  json_t *sch = json_object_get(o, "json_schema");
  if (sch) add_check(it, "json_schema", schema_ok(sch, out));
}

/* ---- the judge */

/* Asks the judge; a server that refuses response_format gets the same
 * prompt without it. */
static bool ask_judge(struct eval *ev, const char *prompt, json_t *schema,
                      struct answer *a, char *err, size_t cap) {
  json_t *msgs = json_pack("[{s:s,s:s},{s:s,s:s}]", "role", "system",
                           "content", tn_judge_system, "role", "user",
                           "content", prompt);
  bool ok = ask(ev, &ev->judge, msgs, ev->judge_max_tokens, schema, a, err,
                cap);
  if (!ok && strstr(err, "response_format"))
    ok = ask(ev, &ev->judge, msgs, ev->judge_max_tokens, NULL, a, err, cap);
  json_decref(msgs);
  return ok;
}

static void judge_score(struct eval *ev, struct item *it) {
  char *q = tn_judge_question(it->obj);
  const char *ref = json_string_value(json_object_get(it->obj, "reference"));
  struct tn_buf b = {0};
  tn_buf_printf(&b,
                "Rate the answer to the question on a scale from 1 (worst) "
                "to %ld (best).\n\n",
                ev->scale);
  if (ev->rubric) tn_buf_printf(&b, "Rubric:\n%s\n\n", ev->rubric);
  tn_buf_printf(&b, "Question:\n%s\n\n", q ? q : "");
  if (ref) tn_buf_printf(&b, "Reference answer:\n%s\n\n", ref);
  tn_buf_printf(&b, "Answer to rate:\n%s\n\n", it->output);
  tn_buf_printf(&b, "Reply as JSON: {\"score\": <an integer from 1 to "
                    "%ld>, \"reasoning\": \"<one sentence>\"}",
                ev->scale);
  free(q);
  json_t *schema = tn_judge_score_format(ev->scale);
  struct answer a;
  char err[400];
  if (b.oom || !ask_judge(ev, b.data, schema, &a, err, sizeof(err))) {
    snprintf(it->err, sizeof(it->err), "judge: %s",
             b.oom ? "out of memory" : err);
  } else {
    it->judge_raw = a.text;
    it->score = tn_judge_parse_score(a.text, ev->scale);
    if (!it->score)
      snprintf(it->err, sizeof(it->err),
               "judge: no score from 1 to %ld in its answer: %.200s",
               ev->scale, a.text);
  }
  json_decref(schema);
  tn_buf_free(&b);
}

/* One order: A and B as given. */
static char judge_pair(struct eval *ev, struct item *it, const char *a,
                       const char *b, char *err, size_t cap) {
  char *q = tn_judge_question(it->obj);
  char *p = q ? tn_judge_pair_prompt(q, ev->rubric, a, b) : NULL;
  free(q);
  json_t *schema = tn_judge_winner_format();
  struct answer ans;
  char w = 0;
  if (!p) {
    snprintf(err, cap, "out of memory");
  } else if (ask_judge(ev, p, schema, &ans, err, cap)) {
    w = tn_judge_parse_winner(ans.text);
    if (!w) snprintf(err, cap, "judge: no winner in its answer: %.200s",
                     ans.text);
    free(ans.text);
  }
  json_decref(schema);
  free(p);
  return w;
}

/* Both orders, so the judge's preference for a position cancels: the
 * model wins only when it wins as A and as B. */
static void judge_pairwise(struct eval *ev, struct item *it) {
  char err[400] = "";
  char w1 = judge_pair(ev, it, it->output, it->other_output, err, sizeof(err));
  char w2 = w1 ? judge_pair(ev, it, it->other_output, it->output, err,
                            sizeof(err))
               : 0;
  if (!w1 || !w2) {
    snprintf(it->err, sizeof(it->err), "%s", err);
    return;
  }
  /* in model terms: first order A = model, second order B = model */
  char m1 = w1 == 'A' ? 'M' : w1 == 'B' ? 'O' : 'T';
  char m2 = w2 == 'B' ? 'M' : w2 == 'A' ? 'O' : 'T';
  it->orders_agree = m1 == m2;
  snprintf(it->orders, sizeof(it->orders), "%c,%c", w1 == 'T' ? 'T' : w1,
           w2 == 'T' ? 'T' : w2);
  snprintf(it->winner, sizeof(it->winner), "%s",
           m1 == m2 ? (m1 == 'M' ? "model" : m1 == 'O' ? "other" : "tie")
                    : "tie");
}

/* ---- results (SQLite) */

static const char k_eval_schema[] =
    "CREATE TABLE IF NOT EXISTS eval_runs ("
    " id INTEGER PRIMARY KEY, started INTEGER, finished INTEGER,"
    " config_key TEXT, model TEXT, judge TEXT, other TEXT, data TEXT,"
    " params TEXT, summary TEXT);"
    "CREATE TABLE IF NOT EXISTS eval_items ("
    " run_id INTEGER, line INTEGER, item_id TEXT, status TEXT, error TEXT,"
    " output TEXT, other_output TEXT, latency_ms REAL, prompt_tokens INTEGER,"
    " completion_tokens INTEGER, checks TEXT, checks_passed INTEGER,"
    " checks_total INTEGER, score INTEGER, judge_raw TEXT, winner TEXT,"
    " orders_agree INTEGER, pair_orders TEXT, PRIMARY KEY (run_id, line));";

static void store_item(struct eval *ev, const struct item *it) {
  static const char sql[] =
      "INSERT OR REPLACE INTO eval_items VALUES "
      "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";
  pthread_mutex_lock(&ev->db_mu);
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(ev->db, sql, -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, ev->run_id);
    sqlite3_bind_int(st, 2, it->line);
    sqlite3_bind_text(st, 3, it->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, it->err[0] ? "error" : "ok", -1, SQLITE_STATIC);
    if (it->err[0]) sqlite3_bind_text(st, 5, it->err, -1, SQLITE_STATIC);
    if (it->output) sqlite3_bind_text(st, 6, it->output, -1, SQLITE_STATIC);
    if (it->other_output)
      sqlite3_bind_text(st, 7, it->other_output, -1, SQLITE_STATIC);
    if (it->latency_s > 0) sqlite3_bind_double(st, 8, it->latency_s * 1000);
    if (it->output) {
      sqlite3_bind_int64(st, 9, it->prompt_tokens);
      sqlite3_bind_int64(st, 10, it->completion_tokens);
    }
    if (it->n_checks) {
      sqlite3_bind_text(st, 11, it->checks, -1, SQLITE_STATIC);
      sqlite3_bind_int(st, 12, it->n_pass);
      sqlite3_bind_int(st, 13, it->n_checks);
    }
    if (it->score) sqlite3_bind_int(st, 14, it->score);
    if (it->judge_raw)
      sqlite3_bind_text(st, 15, it->judge_raw, -1, SQLITE_STATIC);
    if (it->winner[0]) {
      sqlite3_bind_text(st, 16, it->winner, -1, SQLITE_STATIC);
      sqlite3_bind_int(st, 17, it->orders_agree);
      sqlite3_bind_text(st, 18, it->orders, -1, SQLITE_STATIC);
    }
    if (sqlite3_step(st) != SQLITE_DONE)
      tn_log_warn("eval: cannot store line %d: %s", it->line,
                  sqlite3_errmsg(ev->db));
  }
  sqlite3_finalize(st);
  pthread_mutex_unlock(&ev->db_mu);
}

/* ---- workers */

static void progress(struct eval *ev, bool final) {
  int done = atomic_load(&ev->done), failed = atomic_load(&ev->failed);
  int n = ev->n_items;
  double el = tn_time_s() - ev->t0;
  pthread_mutex_lock(&ev->print_mu);
  if (ev->tty) {
    int w = 30, fill = n ? done * w / n : w;
    char bar[40];
    for (int i = 0; i < w; i++) bar[i] = i < fill ? '#' : '.';
    bar[w] = '\0';
    double eta = done ? el / done * (n - done) : 0;
    fprintf(stderr, "\r[%s] %d/%d  failed %d  %.0fs  eta %.0fs   ", bar, done,
            n, failed, el, eta);
    if (final) fputc('\n', stderr);
  } else if (final || (n >= 10 && done % (n / 10) == 0)) {
    fprintf(stderr, "eval: %d/%d done, %d failed, %.0f s\n", done, n, failed,
            el);
  }
  fflush(stderr);
  pthread_mutex_unlock(&ev->print_mu);
}

static void process(struct eval *ev, struct item *it) {
  if (!it->obj) return; /* the parse error is the result */
  const char *given = json_string_value(json_object_get(it->obj, "answer"));
  char err[400];
  if (given) {
    it->output = strdup(given);
  } else {
    json_t *msgs = item_messages(it->obj);
    json_t *mt = json_object_get(it->obj, "max_tokens");
    long max = json_is_integer(mt) ? (long)json_integer_value(mt)
                                   : ev->max_tokens;
    struct answer a;
    bool ok = ask(ev, &ev->model, msgs, max, NULL, &a, err, sizeof(err));
    json_decref(msgs);
    if (!ok) {
      snprintf(it->err, sizeof(it->err), "model: %s", err);
      return;
    }
    it->output = a.text;
    it->latency_s = a.latency_s;
    it->prompt_tokens = a.prompt_tokens;
    it->completion_tokens = a.completion_tokens;
  }
  run_checks(it);
  if (ev->have_judge) judge_score(ev, it);
  if (ev->have_other && ev->have_judge && !it->err[0]) {
    const char *gb = json_string_value(json_object_get(it->obj, "answer_b"));
    if (gb) {
      it->other_output = strdup(gb);
    } else {
      json_t *msgs = item_messages(it->obj);
      struct answer a;
      bool ok = ask(ev, &ev->other, msgs, ev->max_tokens, NULL, &a, err,
                    sizeof(err));
      json_decref(msgs);
      if (!ok) {
        snprintf(it->err, sizeof(it->err), "pairwise model: %s", err);
        return;
      }
      it->other_output = a.text;
    }
    judge_pairwise(ev, it);
  }
}

static void *worker(void *arg) {
  struct eval *ev = arg;
  for (;;) {
    int i = atomic_fetch_add(&ev->next, 1);
    if (i >= ev->n_items) return NULL;
    struct item *it = &ev->items[i];
    if (it->skip) continue;
    process(ev, it);
    store_item(ev, it);
    if (it->err[0]) atomic_fetch_add(&ev->failed, 1);
    atomic_fetch_add(&ev->done, 1);
    progress(ev, false);
  }
}

/* ---- summary */

/* Wilson score interval, 95%. */
static void wilson(int k, int n, double *lo, double *hi) {
  if (n <= 0) {
    *lo = *hi = 0;
    return;
  }
  const double z = 1.959964;
  double p = (double)k / n, z2 = z * z / n;
  double c = (p + z2 / 2) / (1 + z2);
  double h = z * sqrt(p * (1 - p) / n + z2 / (4.0 * n)) / (1 + z2);
  *lo = fmax(0, c - h);
  *hi = fmin(1, c + h);
}

/* Two-sided 95% t quantile for df degrees of freedom. */
static double t95(int df) {
  static const double t[] = {0,     12.706, 4.303, 3.182, 2.776, 2.571,
                             2.447, 2.365,  2.306, 2.262, 2.228, 2.201,
                             2.179, 2.160,  2.145, 2.131, 2.120, 2.110,
                             2.101, 2.093,  2.086};
  if (df < 1) return 0;
  if (df <= 20) return t[df];
  if (df <= 30) return 2.042;
  if (df <= 60) return 2.000;
  if (df <= 120) return 1.980;
  return 1.960;
}

static int cmp_dbl(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static json_t *summarize(struct eval *ev, double wall) {
  int n = ev->n_items, failed = 0, bad_lines = 0, with_checks = 0, passed = 0;
  int n_score = 0, agree_n = 0, agree_exact = 0, agree_1 = 0;
  int win = 0, tie = 0, loss = 0, pairs = 0, orders = 0;
  int wagree_n = 0, wagree = 0;
  double sum = 0, sum2 = 0;
  int64_t tin = 0, tout = 0;
  double *lat = calloc((size_t)n + 1, sizeof(double));
  int n_lat = 0;
  for (int i = 0; i < n; i++) {
    struct item *it = &ev->items[i];
    if (it->skip) continue;
    if (it->err[0]) failed++;
    if (!it->obj) bad_lines++;
    if (it->n_checks) {
      with_checks++;
      passed += it->n_pass == it->n_checks;
    }
    if (it->score) {
      n_score++;
      sum += it->score;
      sum2 += (double)it->score * it->score;
      json_t *es = json_object_get(it->obj, "expected_score");
      if (json_is_integer(es)) {
        int d = abs(it->score - (int)json_integer_value(es));
        agree_n++;
        agree_exact += d == 0;
        agree_1 += d <= 1;
      }
    }
    if (it->winner[0]) {
      pairs++;
      orders += it->orders_agree;
      win += !strcmp(it->winner, "model");
      loss += !strcmp(it->winner, "other");
      tie += !strcmp(it->winner, "tie");
      const char *ew = json_string_value(
          json_object_get(it->obj, "expected_winner"));
      if (ew) {
        const char *mine = !strcmp(it->winner, "model")   ? "a"
                           : !strcmp(it->winner, "other") ? "b"
                                                          : "tie";
        wagree_n++;
        wagree += !strcmp(ew, mine);
      }
    }
    if (it->latency_s > 0 && lat) lat[n_lat++] = it->latency_s;
    tin += it->prompt_tokens;
    tout += it->completion_tokens;
  }
  json_t *s = json_object();
  int ran = 0;
  for (int i = 0; i < n; i++) ran += !ev->items[i].skip;
  json_object_set_new(s, "items", json_integer(n));
  json_object_set_new(s, "run_items", json_integer(ran));
  json_object_set_new(s, "failed", json_integer(failed));
  json_object_set_new(s, "bad_lines", json_integer(bad_lines));
  json_object_set_new(s, "wall_s", json_real(wall));
  double lo, hi;
  if (with_checks) {
    wilson(passed, with_checks, &lo, &hi);
    json_object_set_new(s, "checks",
                        json_pack("{s:i,s:i,s:f,s:[f,f]}", "passed", passed,
                                  "total", with_checks, "rate",
                                  (double)passed / with_checks, "ci95", lo,
                                  hi));
  }
  if (n_score) {
    double mean = sum / n_score;
    double var = n_score > 1 ? (sum2 - sum * mean) / (n_score - 1) : 0;
    double h =
        n_score > 1 ? t95(n_score - 1) * sqrt(fmax(var, 0) / n_score) : 0;
    json_object_set_new(s, "judge_score",
                        json_pack("{s:i,s:f,s:f,s:[f,f],s:i}", "n", n_score,
                                  "mean", mean, "sd", sqrt(fmax(var, 0)),
                                  "ci95", mean - h, mean + h, "scale",
                                  (int)ev->scale));
  }
  if (agree_n) {
    wilson(agree_exact, agree_n, &lo, &hi);
    json_object_set_new(
        s, "judge_agreement",
        json_pack("{s:i,s:f,s:[f,f],s:f}", "n", agree_n, "exact",
                  (double)agree_exact / agree_n, "ci95", lo, hi, "within_1",
                  (double)agree_1 / agree_n));
  }
  if (pairs) {
    wilson(win, pairs, &lo, &hi);
    json_object_set_new(
        s, "pairwise",
        json_pack("{s:i,s:i,s:i,s:i,s:f,s:[f,f],s:f}", "n", pairs, "win",
                  win, "tie", tie, "loss", loss, "win_rate",
                  (double)win / pairs, "ci95", lo, hi, "orders_agree",
                  (double)orders / pairs));
  }
  if (wagree_n) {
    wilson(wagree, wagree_n, &lo, &hi);
    json_object_set_new(s, "pairwise_agreement",
                        json_pack("{s:i,s:f,s:[f,f]}", "n", wagree_n, "rate",
                                  (double)wagree / wagree_n, "ci95", lo, hi));
  }
  if (n_lat) {
    qsort(lat, (size_t)n_lat, sizeof(double), cmp_dbl);
    json_object_set_new(
        s, "latency_s",
        json_pack("{s:f,s:f}", "p50", lat[(n_lat - 1) / 2], "p95",
                  lat[(int)((n_lat - 1) * 0.95)]));
  }
  json_object_set_new(s, "prompt_tokens", json_integer(tin));
  json_object_set_new(s, "completion_tokens", json_integer(tout));
  free(lat);
  return s;
}

/* Numbers of the summary object: a field, an interval's end (95% CI,
 * scaled), an integer field. */
static double num(json_t *o, const char *k) {
  return json_number_value(json_object_get(o, k));
}
static double ci(json_t *o, int end, double scale) {
  return scale *
         json_number_value(json_array_get(json_object_get(o, "ci95"), end));
}
static long long cnt(json_t *o, const char *k) {
  return (long long)json_integer_value(json_object_get(o, k));
}

static void print_summary(FILE *f, struct eval *ev, json_t *s) {
  fprintf(f,
          "tern eval: run %lld, %lld items (%lld failed, %lld bad "
          "lines), %.1f s\n",
          (long long)ev->run_id, cnt(s, "run_items"), cnt(s, "failed"),
          cnt(s, "bad_lines"), num(s, "wall_s"));
  json_t *x;
  if ((x = json_object_get(s, "checks")))
    fprintf(f,
            "  checks          %lld/%lld passed  %.1f%%  95%% CI [%.1f, "
            "%.1f]\n",
            cnt(x, "passed"), cnt(x, "total"), 100 * num(x, "rate"),
            ci(x, 0, 100), ci(x, 1, 100));
  if ((x = json_object_get(s, "judge_score")))
    fprintf(f,
            "  judge score     %.2f of %lld  95%% CI [%.2f, %.2f]  (n "
            "%lld, sd %.2f)\n",
            num(x, "mean"), cnt(x, "scale"), ci(x, 0, 1), ci(x, 1, 1),
            cnt(x, "n"), num(x, "sd"));
  if ((x = json_object_get(s, "judge_agreement")))
    fprintf(f,
            "  judge agreement %.1f%% exact  95%% CI [%.1f, %.1f], %.1f%% "
            "within 1  (n %lld known verdicts)\n",
            100 * num(x, "exact"), ci(x, 0, 100), ci(x, 1, 100),
            100 * num(x, "within_1"), cnt(x, "n"));
  if ((x = json_object_get(s, "pairwise")))
    fprintf(f,
            "  pairwise        win %lld  tie %lld  loss %lld  win rate "
            "%.1f%%  95%% CI [%.1f, %.1f]  (orders agree %.0f%%)\n",
            cnt(x, "win"), cnt(x, "tie"), cnt(x, "loss"),
            100 * num(x, "win_rate"), ci(x, 0, 100), ci(x, 1, 100),
            100 * num(x, "orders_agree"));
  if ((x = json_object_get(s, "pairwise_agreement")))
    fprintf(f,
            "  pairwise agreement %.1f%%  95%% CI [%.1f, %.1f]  (n %lld "
            "known verdicts)\n",
            100 * num(x, "rate"), ci(x, 0, 100), ci(x, 1, 100), cnt(x, "n"));
  if ((x = json_object_get(s, "latency_s")))
    fprintf(f, "  latency         p50 %.2f s  p95 %.2f s\n", num(x, "p50"),
            num(x, "p95"));
  fprintf(f, "  tokens          %lld in, %lld out\n", cnt(s, "prompt_tokens"),
          cnt(s, "completion_tokens"));
}

/* ---- MLflow (its REST API) */

static json_t *mlflow_call(const char *base, const char *method,
                           const char *path, json_t *body, const char *data,
                           size_t data_len, char *err, size_t cap) {
  char url[1024];
  snprintf(url, sizeof(url), "%s%s", base, path);
  struct curl_slist *hd = curl_slist_append(
      NULL, data ? "Content-Type: application/octet-stream"
                 : "Content-Type: application/json");
  struct membuf b = {0};
  char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
  const char *send = data ? data : text;
  size_t len = data ? data_len : text ? strlen(text) : 0;
  json_t *out = NULL;
  long code;
  if (hd && http_call(base, method, url, hd, send, len, 60, &b, &code, err,
                      cap)) {
    if (code != 200) {
      snprintf(err, cap, "%.200s: HTTP %ld %.200s", path, code,
               b.p ? b.p : "");
    } else {
      json_error_t je;
      out = b.p ? json_loads(b.p, 0, &je) : NULL;
      if (!out) out = json_object();
    }
  }
  free(text);
  free(b.p);
  curl_slist_free_all(hd);
  return out;
}

static int to_mlflow(struct eval *ev, const char *base, const char *exp_name,
                     json_t *summary, const char *params_json) {
  char err[512] = "";
  char path[600];
  char *enc = curl_easy_escape(NULL, exp_name, 0);
  snprintf(path, sizeof(path),
           "/api/2.0/mlflow/experiments/get-by-name?experiment_name=%s",
           enc ? enc : "");
  curl_free(enc);
  json_t *r = mlflow_call(base, "GET", path, NULL, NULL, 0, err, sizeof(err));
  const char *exp_id = json_string_value(json_object_get(
      json_object_get(r, "experiment"), "experiment_id"));
  json_t *created = NULL;
  if (!exp_id) {
    json_t *body = json_pack("{s:s}", "name", exp_name);
    created = mlflow_call(base, "POST", "/api/2.0/mlflow/experiments/create",
                          body, NULL, 0, err, sizeof(err));
    json_decref(body);
    exp_id = json_string_value(json_object_get(created, "experiment_id"));
  }
  if (!exp_id) {
    json_decref(r);
    json_decref(created);
    return tn_cli_fail("--mlflow: no experiment: %s", err);
  }
  char run_name[64];
  snprintf(run_name, sizeof(run_name), "tern-eval-%lld", (long long)ev->run_id);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  int64_t now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  json_t *body = json_pack("{s:s,s:s,s:I}", "experiment_id", exp_id,
                           "run_name", run_name, "start_time",
                           (json_int_t)(now_ms - (int64_t)(json_real_value(
                                json_object_get(summary, "wall_s")) * 1000)));
  json_t *run = mlflow_call(base, "POST", "/api/2.0/mlflow/runs/create", body,
                            NULL, 0, err, sizeof(err));
  json_decref(body);
  json_decref(r);
  json_decref(created);
  json_t *info = json_object_get(json_object_get(run, "run"), "info");
  const char *run_id = json_string_value(json_object_get(info, "run_id"));
  const char *art = json_string_value(json_object_get(info, "artifact_uri"));
  if (!run_id) {
    json_decref(run);
    return tn_cli_fail("--mlflow: cannot create a run: %s", err);
  }
  /* params and metrics */
  json_t *params = json_array(), *metrics = json_array();
  json_error_t je;
  json_t *pj = json_loads(params_json, 0, &je);
  const char *k;
  json_t *v;
  json_object_foreach(pj, k, v) {
    char val[500];
    if (json_is_string(v))
      snprintf(val, sizeof(val), "%s", json_string_value(v));
    else {
      char *d = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
      snprintf(val, sizeof(val), "%s", d ? d : "");
      free(d);
    }
    json_array_append_new(params,
                          json_pack("{s:s,s:s}", "key", k, "value", val));
  }
  json_decref(pj);
  struct {
    const char *name, *obj, *field;
  } ms[] = {{"items", NULL, "run_items"},
            {"failed", NULL, "failed"},
            {"checks_pass_rate", "checks", "rate"},
            {"judge_score_mean", "judge_score", "mean"},
            {"judge_agreement_exact", "judge_agreement", "exact"},
            {"pairwise_win_rate", "pairwise", "win_rate"},
            {"latency_p50_s", "latency_s", "p50"},
            {"completion_tokens", NULL, "completion_tokens"}};
  for (size_t i = 0; i < TN_ARRAY_LEN(ms); i++) {
    json_t *o = ms[i].obj ? json_object_get(summary, ms[i].obj) : summary;
    json_t *x = json_object_get(o, ms[i].field);
    if (!json_is_number(x)) continue;
    json_array_append_new(metrics,
                          json_pack("{s:s,s:f,s:I,s:i}", "key", ms[i].name,
                                    "value", json_number_value(x),
                                    "timestamp", (json_int_t)now_ms, "step",
                                    0));
  }
  body = json_pack("{s:s,s:o,s:o}", "run_id", run_id, "params", params,
                   "metrics", metrics);
  json_t *x = mlflow_call(base, "POST", "/api/2.0/mlflow/runs/log-batch", body,
                          NULL, 0, err, sizeof(err));
  json_decref(body);
  int rc = 0;
  if (!x) rc = tn_cli_fail("--mlflow: log-batch: %s", err);
  json_decref(x);
  /* the per-item table, as JSON lines, through the artifact proxy */
  if (!rc && art && !strncmp(art, "mlflow-artifacts:/", 18)) {
    struct tn_buf b = {0};
    for (int i = 0; i < ev->n_items; i++) {
      struct item *it = &ev->items[i];
      json_t *o = json_pack("{s:i,s:s,s:s}", "line", it->line, "id", it->id,
                            "status", it->err[0] ? "error" : "ok");
      if (it->err[0]) json_object_set_new(o, "error", json_string(it->err));
      if (it->output) json_object_set_new(o, "output", json_string(it->output));
      if (it->n_checks) {
        json_object_set_new(o, "checks", json_string(it->checks));
        json_object_set_new(o, "passed",
                            json_boolean(it->n_pass == it->n_checks));
      }
      if (it->score) json_object_set_new(o, "score", json_integer(it->score));
      if (it->winner[0])
        json_object_set_new(o, "winner", json_string(it->winner));
      char *line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
      if (line) tn_buf_printf(&b, "%s\n", line);
      free(line);
      json_decref(o);
    }
    snprintf(path, sizeof(path),
             "/api/2.0/mlflow-artifacts/artifacts/%s/items.jsonl",
             art + 18 + (art[18] == '/'));
    x = mlflow_call(base, "PUT", path, NULL, b.data ? b.data : "", b.len, err,
                    sizeof(err));
    if (!x) rc = tn_cli_fail("--mlflow: artifact upload: %s", err);
    json_decref(x);
    tn_buf_free(&b);
  }
  body = json_pack("{s:s,s:s,s:I}", "run_id", run_id, "status",
                   rc ? "FAILED" : "FINISHED", "end_time", (json_int_t)now_ms);
  x = mlflow_call(base, "POST", "/api/2.0/mlflow/runs/update", body, NULL, 0,
                  err, sizeof(err));
  json_decref(body);
  json_decref(x);
  if (!rc) fprintf(stderr, "tern eval: MLflow run %s (experiment %s)\n", run_id,
                   exp_name);
  json_decref(run);
  return rc;
}

/* ---- the command */

static int load_items(struct eval *ev, const char *path) {
  FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
  if (!f) return tn_cli_fail("--data %s: cannot open", path);
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  int ln = 0, cap_items = 0;
  while ((n = getline(&line, &cap, f)) >= 0) {
    ln++;
    const char *s = line;
    size_t len = (size_t)n;
    trim(&s, &len);
    if (!len) continue;
    if (ev->n_items == cap_items) {
      cap_items = cap_items ? cap_items * 2 : 64;
      struct item *v = realloc(ev->items, (size_t)cap_items * sizeof(*v));
      if (!v) {
        free(line);
        return tn_cli_fail("out of memory");
      }
      ev->items = v;
    }
    struct item *it = &ev->items[ev->n_items++];
    memset(it, 0, sizeof(*it));
    it->line = ln;
    json_error_t je;
    it->obj = json_loadb(s, len, 0, &je);
    /* the item's name, even when its shape is refused below */
    json_t *id = json_object_get(it->obj, "id");
    if (json_is_string(id))
      snprintf(it->id, sizeof(it->id), "%s", json_string_value(id));
    else if (json_is_integer(id))
      snprintf(it->id, sizeof(it->id), "%lld",
               (long long)json_integer_value(id));
    else
      snprintf(it->id, sizeof(it->id), "line-%d", ln);
    if (!it->obj || !json_is_object(it->obj)) {
      snprintf(it->err, sizeof(it->err), "line %d: not a JSON object%s%.200s",
               ln, it->obj ? "" : ": ", it->obj ? "" : je.text);
      json_decref(it->obj);
      it->obj = NULL;
    } else if (!item_validate(it)) {
      json_decref(it->obj);
      it->obj = NULL;
    }
  }
  free(line);
  if (f != stdin) fclose(f);
  if (!ev->n_items) return tn_cli_fail("--data %s: no items", path);
  return 0;
}

int tn_cli_eval(int argc, char **argv) {
  const char *model = NULL, *data = NULL, *judge = NULL, *rubric = NULL;
  const char *pairwise = NULL, *db_path = "eval.db", *mlflow = NULL;
  const char *mlflow_exp = "tern-eval";
  const char *api_key = getenv("TERN_API_KEY");
  long concurrency = 4, max_tokens = 256, judge_max = 256, scale = 5;
  long timeout = 300, threads = 0, ctx = 4096;
  float temp = 0;
  bool resume = false, json_out = false;
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|URL",
       "the model under test: a local model, or an OpenAI-compatible URL "
       "(http://host:8080/v1, #NAME picks the model)",
       NULL, NULL, 0},
      {"data", 'd', TN_OPT_STR, &data, 0, 0, "FILE.jsonl",
       "one item per line (docs/EVAL.md); - reads stdin", NULL, NULL, 0},
      {"judge", 0, TN_OPT_STR, &judge, 0, 0, "NAME|URL",
       "an LLM judge: rates each answer (and compares, with --pairwise)",
       "none", NULL, 0},
      {"rubric", 0, TN_OPT_STR, &rubric, 0, 0, "FILE",
       "what the judge should look for (text)", "none", NULL, 0},
      {"scale", 0, TN_OPT_INT, &scale, 2, 10, "N", "judge scores 1..N", NULL,
       NULL, 0},
      {"pairwise", 0, TN_OPT_STR, &pairwise, 0, 0, "NAME|URL",
       "another model: the judge compares the two answers, in both orders",
       "none", NULL, 0},
      {"concurrency", 'j', TN_OPT_INT, &concurrency, 1, 256, "N",
       "items in flight", NULL, NULL, 0},
      {"max-tokens", 'n', TN_OPT_INT, &max_tokens, 1, 1 << 20, "N",
       "answer length (an item's max_tokens wins)", NULL, NULL, 0},
      {"judge-max-tokens", 0, TN_OPT_INT, &judge_max, 16, 1 << 20, "N",
       "verdict length", NULL, NULL, 0},
      {"temp", 0, TN_OPT_FLOAT, &temp, 0, 2, "T", "sampling temperature",
       NULL, NULL, 0},
      {"timeout", 0, TN_OPT_INT, &timeout, 1, 86400, "S", "per request",
       NULL, NULL, 0},
      {"api-key", 0, TN_OPT_STR, &api_key, 0, 0, "KEY",
       "sent to URL targets (or set TERN_API_KEY)", "none", NULL, 0},
      {"db", 0, TN_OPT_STR, &db_path, 0, 0, "PATH",
       "results (SQLite; may be the request log's file)", NULL, NULL, 0},
      {"resume", 0, TN_OPT_FLAG, &resume, 0, 0, NULL,
       "continue the last unfinished run with the same data and options",
       NULL, NULL, 0},
      {"mlflow", 0, TN_OPT_STR, &mlflow, 0, 0, "URL",
       "also log the run to an MLflow tracking server", "off", NULL, 0},
      {"mlflow-experiment", 0, TN_OPT_STR, &mlflow_exp, 0, 0, "NAME",
       "its experiment", NULL, NULL, 0},
      {"json", 0, TN_OPT_FLAG, &json_out, 0, 0, NULL,
       "print the summary as JSON", NULL, NULL, 0},
      {"threads", 't', TN_OPT_INT, &threads, 1, TN_POOL_THREADS_MAX, "N",
       "compute threads for local models", "physical cores", NULL, 0},
      {"ctx", 'c', TN_OPT_INT, &ctx, 64, 1 << 20, "N",
       "context of local models", NULL, NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "eval", "tern eval --model NAME|URL --data FILE.jsonl [--judge NAME|URL]",
      "Runs a dataset through a model and scores the answers: reference "
      "checks (exact, contains, regex, number, json_schema), an LLM judge's "
      "rubric score, and a pairwise comparison in both orders. Results go "
      "to SQLite as items finish (--resume continues), the summary has 95% "
      "confidence intervals.",
      "examples:\n"
      "  tern eval -m qwen2.5-coder-0.5b -d qa.jsonl\n"
      "  tern eval -m http://localhost:8080/v1 -d qa.jsonl --judge "
      "qwen2.5-coder-1.5b --rubric rubric.txt\n"
      "  tern eval -m smollm2-135m --pairwise qwen2.5-coder-0.5b --judge "
      "qwen2.5-coder-1.5b -d qa.jsonl --mlflow http://localhost:5000",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (!data) return tn_cli_fail("eval: --data FILE.jsonl is required");
  if (pairwise && !judge)
    return tn_cli_fail("--pairwise: the comparison needs a --judge");
  if (rubric && !judge) return tn_cli_fail("--rubric: give a --judge too");

  struct eval ev = {0};
  ev.api_key = api_key;
  ev.temperature = temp;
  ev.max_tokens = max_tokens;
  ev.judge_max_tokens = judge_max;
  ev.scale = scale;
  ev.timeout_s = timeout;
  ev.tty = isatty(2);
  pthread_mutex_init(&ev.db_mu, NULL);
  pthread_mutex_init(&ev.print_mu, NULL);
  int rc = 1;
  json_t *summary = NULL;
  char *params_json = NULL;
  if (rubric) {
    size_t n;
    if (tn_file_read(rubric, &ev.rubric, &n, NULL) != TN_OK) {
      tn_cli_fail("--rubric %s: cannot read", rubric);
      goto done;
    }
  }
  if (load_items(&ev, data)) goto done;
  bool need_model = false;
  for (int i = 0; i < ev.n_items; i++)
    need_model |= ev.items[i].obj &&
                  !json_object_get(ev.items[i].obj, "answer");
  if (need_model && !model) {
    tn_cli_fail("eval: --model is required (items without an \"answer\")");
    goto done;
  }
  if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
    tn_cli_fail("eval: libcurl does not start");
    goto done;
  }
  long seqs = TN_MAX(4, concurrency * (pairwise ? 2 : 1));
  if (model && target_open(&ev, &ev.model, model, threads, ctx, seqs))
    goto done;
  if (judge) {
    if (model && !strcmp(judge, model))
      ev.judge = ev.model, ev.judge.srv = NULL, ev.judge.engine = NULL;
    else if (target_open(&ev, &ev.judge, judge, threads, ctx, seqs))
      goto done;
    ev.have_judge = true;
  }
  if (pairwise) {
    /* items with their own "answer_b" never ask it */
    bool need_other = false;
    for (int i = 0; i < ev.n_items; i++)
      need_other |= ev.items[i].obj &&
                    !json_object_get(ev.items[i].obj, "answer_b");
    if (need_other &&
        target_open(&ev, &ev.other, pairwise, threads, ctx, seqs))
      goto done;
    ev.have_other = true;
  }

  /* results: the run and its config key (what --resume matches) */
  params_json = NULL;
  {
    json_t *p = json_pack("{s:s?,s:s,s:s?,s:s?,s:s?,s:i,s:i,s:f,s:i}",
                          "model", model, "data", data, "judge", judge,
                          "pairwise", pairwise, "rubric", rubric,
                          "max_tokens", (int)max_tokens, "scale", (int)scale,
                          "temperature", (double)temp, "items", ev.n_items);
    params_json = json_dumps(p, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(p);
  }
  struct tn_sha256 sh;
  tn_sha256_init(&sh);
  tn_sha256_update(&sh, params_json, strlen(params_json));
  for (int i = 0; i < ev.n_items; i++) {
    char *d = ev.items[i].obj ? json_dumps(ev.items[i].obj,
                                           JSON_COMPACT | JSON_SORT_KEYS)
                              : NULL;
    if (d) tn_sha256_update(&sh, d, strlen(d));
    free(d);
  }
  if (ev.rubric) tn_sha256_update(&sh, ev.rubric, strlen(ev.rubric));
  uint8_t dig[TN_SHA256_SIZE];
  char key[2 * TN_SHA256_SIZE + 1];
  tn_sha256_final(&sh, dig);
  tn_sha256_hex(dig, key);
  if (sqlite3_open(db_path, &ev.db) != SQLITE_OK ||
      sqlite3_exec(ev.db, "PRAGMA journal_mode=WAL;", NULL, NULL, NULL) !=
          SQLITE_OK ||
      sqlite3_exec(ev.db, k_eval_schema, NULL, NULL, NULL) != SQLITE_OK) {
    tn_cli_fail("--db %s: %s", db_path, sqlite3_errmsg(ev.db));
    goto done;
  }
  sqlite3_busy_timeout(ev.db, 5000);
  sqlite3_stmt *st = NULL;
  if (resume &&
      sqlite3_prepare_v2(ev.db,
                         "SELECT id FROM eval_runs WHERE config_key = ?1 AND "
                         "finished IS NULL ORDER BY id DESC LIMIT 1",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) ev.run_id = sqlite3_column_int64(st, 0);
  }
  sqlite3_finalize(st);
  st = NULL;
  int resumed = 0;
  if (ev.run_id) {
    /* items done (ok or failed for good) are not run again; model
     * errors are: they may have been the interruption */
    if (sqlite3_prepare_v2(ev.db,
                           "SELECT line, status, error FROM eval_items WHERE "
                           "run_id = ?1",
                           -1, &st, NULL) == SQLITE_OK) {
      sqlite3_bind_int64(st, 1, ev.run_id);
      while (sqlite3_step(st) == SQLITE_ROW) {
        int line = sqlite3_column_int(st, 0);
        const char *err = (const char *)sqlite3_column_text(st, 2);
        if (err && !strncmp(err, "model:", 6)) continue;
        for (int i = 0; i < ev.n_items; i++)
          if (ev.items[i].line == line) {
            ev.items[i].skip = true;
            resumed++;
          }
      }
    }
    sqlite3_finalize(st);
    fprintf(stderr, "tern eval: resuming run %lld: %d of %d items done\n",
            (long long)ev.run_id, resumed, ev.n_items);
  } else {
    if (resume)
      fprintf(stderr, "tern eval: no unfinished run with these data and "
                      "options: starting one\n");
    if (sqlite3_prepare_v2(ev.db,
                           "INSERT INTO eval_runs (started, config_key, model,"
                           " judge, other, data, params) VALUES "
                           "(?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK) {
      tn_cli_fail("--db %s: %s", db_path, sqlite3_errmsg(ev.db));
      goto done;
    }
    sqlite3_bind_int64(st, 1, (int64_t)time(NULL));
    sqlite3_bind_text(st, 2, key, -1, SQLITE_STATIC);
    if (model) sqlite3_bind_text(st, 3, model, -1, SQLITE_STATIC);
    if (judge) sqlite3_bind_text(st, 4, judge, -1, SQLITE_STATIC);
    if (pairwise) sqlite3_bind_text(st, 5, pairwise, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, data, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, params_json, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_finalize(st);
    ev.run_id = sqlite3_last_insert_rowid(ev.db);
  }

  /* run */
  ev.t0 = tn_time_s();
  int n_workers = (int)TN_MIN(concurrency, ev.n_items);
  pthread_t *ws = calloc((size_t)n_workers, sizeof(*ws));
  int started = 0;
  for (int i = 0; ws && i < n_workers; i++)
    started += tn_thread_create(&ws[i], worker, &ev) == 0;
  if (!started) worker(&ev);
  for (int i = 0; i < started; i++) pthread_join(ws[i], NULL);
  free(ws);
  progress(&ev, true);

  summary = summarize(&ev, tn_time_s() - ev.t0);
  char *sj = json_dumps(summary, JSON_COMPACT);
  if (sqlite3_prepare_v2(ev.db,
                         "UPDATE eval_runs SET finished = ?1, summary = ?2 "
                         "WHERE id = ?3",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, (int64_t)time(NULL));
    if (sj) sqlite3_bind_text(st, 2, sj, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, ev.run_id);
    sqlite3_step(st);
  }
  sqlite3_finalize(st);
  free(sj);
  json_object_set_new(summary, "run_id", json_integer(ev.run_id));
  json_object_set_new(summary, "resumed_items", json_integer(resumed));
  if (json_out) {
    char *out = json_dumps(summary, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (out) puts(out);
    free(out);
  } else {
    print_summary(stdout, &ev, summary);
    printf("  results         %s (tables eval_runs, eval_items; run %lld)\n",
           db_path, (long long)ev.run_id);
  }
  rc = 0;
  if (mlflow) rc = to_mlflow(&ev, mlflow, mlflow_exp, summary, params_json);
done:
  json_decref(summary);
  free(params_json);
  for (int i = 0; i < ev.n_items; i++) {
    struct item *it = &ev.items[i];
    json_decref(it->obj);
    free(it->output);
    free(it->other_output);
    free(it->judge_raw);
  }
  free(ev.items);
  free(ev.rubric);
  sqlite3_close(ev.db);
  target_close(&ev.other);
  target_close(&ev.judge);
  target_close(&ev.model);
  tn_pool_free(ev.pool);
  tn_metrics_free(ev.metrics);
  pthread_mutex_destroy(&ev.db_mu);
  pthread_mutex_destroy(&ev.print_mu);
  return rc;
}
