/*
 * reqlog.c: the request log, one SQLite row per API request.
 *
 * HTTP threads must never wait on the disk, so tn_reqlog_add copies the
 * row into one malloc'd block and appends it to a bounded queue under a
 * mutex (a few hundred nanoseconds); when the queue is full the row is
 * dropped and counted. One writer thread takes everything queued, writes
 * it in one transaction with a prepared INSERT, and sleeps until more
 * arrives or a second passes. The database runs in WAL mode with
 * synchronous=NORMAL: a crash (even SIGKILL) loses at most the rows not
 * yet committed and never corrupts the file. A write that fails (full
 * disk, read-only file) counts the batch as dropped; serving goes on.
 *
 * Retention runs on the writer every 1000 rows and every minute: rows
 * older than max_age and, beyond max_rows, the oldest.
 *
 * Redaction (--log-redact) runs on the writer too, so the serving threads
 * never pay for it: each pattern replaces its matches in the prompt and
 * output with "[REDACTED]" before the row is bound.
 *
 * Shadow comparisons (tn_reqlog_add_shadow) travel the same queue into a
 * second table, shadows, with the same retention and redaction.
 *
 * Lock: l->mu guards the queue, the counters the flush waits on, and
 * l->stop. The writer holds no lock while it talks to SQLite.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "obs/obs.h"

static const char k_schema[] =
    "CREATE TABLE IF NOT EXISTS requests ("
    " ts INTEGER NOT NULL,"        /* arrival, Unix ms */
    " request_id TEXT,"
    " tenant TEXT,"
    " endpoint TEXT,"
    " model TEXT,"
    " status INTEGER,"
    " finish_reason TEXT,"
    " error TEXT,"
    " prompt_tokens INTEGER,"
    " cached_tokens INTEGER,"
    " completion_tokens INTEGER,"
    " queue_ms REAL,"
    " ttft_ms REAL,"
    " itl_mean_ms REAL,"
    " itl_max_ms REAL,"
    " e2e_ms REAL,"
    " cost REAL,"                  /* USD */
    " adapter TEXT,"               /* the LoRA adapter the model named */
    " prompt TEXT,"
    " output TEXT,"
    " route TEXT,"                 /* the route called */
    " upstream TEXT,"              /* the upstream that answered */
    " escalations INTEGER,"        /* cascade stages escalated from */
    " shadow_of TEXT,"             /* a shadow replay of this request id */
    " compute_ms REAL);"           /* its share of the engine's passes */
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);"
    "CREATE INDEX IF NOT EXISTS requests_model_ts ON requests(model, ts);"
    "CREATE INDEX IF NOT EXISTS requests_id ON requests(request_id);"
    "CREATE TABLE IF NOT EXISTS shadows ("
    " ts INTEGER NOT NULL,"        /* the live request's arrival, Unix ms */
    " request_id TEXT, shadow_id TEXT, source TEXT, model TEXT,"
    " target TEXT, tenant TEXT, outcome TEXT, error TEXT,"
    " exact INTEGER, overlap REAL, len_ratio REAL,"
    " live_ms REAL, shadow_ms REAL, shadow_wait_ms REAL,"
    " live_cost REAL, shadow_cost REAL, verdict TEXT,"
    " live_output TEXT, shadow_output TEXT);"
    "CREATE INDEX IF NOT EXISTS shadows_ts ON shadows(ts);";

/* Columns added after the first release of the table: an older database
 * gains them when opened. */
static const char *const k_added[][2] = {
    {"cost", "REAL"},  {"adapter", "TEXT"},         {"route", "TEXT"},
    {"upstream", "TEXT"}, {"escalations", "INTEGER"}, {"shadow_of", "TEXT"},
    {"compute_ms", "REAL"}};

static const char k_insert[] =
    "INSERT INTO requests (ts, request_id, tenant, endpoint, model, status,"
    " finish_reason, error, prompt_tokens, cached_tokens, completion_tokens,"
    " queue_ms, ttft_ms, itl_mean_ms, itl_max_ms, e2e_ms, prompt, output,"
    " cost, adapter, route, upstream, escalations, shadow_of, compute_ms)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";

static const char k_insert_shadow[] =
    "INSERT INTO shadows (ts, request_id, shadow_id, source, model, target,"
    " tenant, outcome, error, exact, overlap, len_ratio, live_ms, shadow_ms,"
    " shadow_wait_ms, live_cost, shadow_cost, verdict, live_output,"
    " shadow_output) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";

/* A queued row: the struct, its strings copied after it. */
struct qrow {
  struct qrow *next;
  bool shadow;             /* sh, else r */
  struct tn_reqlog_row r;
  struct tn_shadow_row sh;
};

#define REDACT_MAX 16

struct tn_reqlog {
  struct tn_reqlog_config cfg;
  pcre2_code *redact[REDACT_MAX];
  int n_redact;
  pcre2_match_data *md;
  sqlite3 *db;
  sqlite3_stmt *ins, *ins_shadow;
  pthread_t writer;
  bool started;

  pthread_mutex_t mu;
  pthread_cond_t more, written;
  struct qrow *head, *tail;
  size_t n_queued;
  uint64_t n_added, n_done; /* rows queued / written or dropped */
  bool stop;

  struct tn_metric *rows, *dropped;
  int64_t since_retention;
  double last_retention;
};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

bool tn_reqlog_content(const struct tn_reqlog *l) {
  return l && l->cfg.content;
}

const char *tn_reqlog_path(const struct tn_reqlog *l) {
  return l ? l->cfg.path : NULL;
}

/* ---- queueing */

static size_t slen(const char *s) { return s ? strlen(s) + 1 : 0; }

static char *put(char **at, const char *s, size_t n, bool nul) {
  if (!s) return NULL;
  char *d = *at;
  memcpy(d, s, n);
  if (nul) d[n] = '\0';
  *at += n + (nul ? 1 : 0);
  return d;
}

/* The string fields of both row kinds, copied the same way. */
#define REQ_STRS(X, r) \
  X(r, request_id) X(r, tenant) X(r, endpoint) X(r, model) X(r, adapter) \
  X(r, finish) X(r, error) X(r, route) X(r, upstream) X(r, shadow_of)
#define SHADOW_STRS(X, r) \
  X(r, request_id) X(r, shadow_id) X(r, source) X(r, model) X(r, target) \
  X(r, tenant) X(r, outcome) X(r, error) X(r, verdict)
#define STR_SIZE(r, f) +slen((r)->f)
#define STR_COPY(r, f) q_->f = put(&at, (r)->f, slen((r)->f) - !!(r)->f, true);

static void enqueue(struct tn_reqlog *l, struct qrow *q);

void tn_reqlog_add(struct tn_reqlog *l, const struct tn_reqlog_row *r) {
  if (!l) return;
  bool content = l->cfg.content;
  size_t pn = content && r->prompt ? r->prompt_len : 0;
  size_t on = content && r->output ? r->output_len : 0;
  size_t size = sizeof(struct qrow) REQ_STRS(STR_SIZE, r) + pn + 1 + on + 1;
  struct qrow *q = malloc(size);
  if (!q) {
    if (l->dropped) tn_metric_add(l->dropped, 1);
    return;
  }
  q->next = NULL;
  q->shadow = false;
  q->r = *r;
  char *at = (char *)(q + 1);
  struct tn_reqlog_row *q_ = &q->r;
  REQ_STRS(STR_COPY, r)
  q->r.prompt = content && r->prompt ? put(&at, r->prompt, pn, true) : NULL;
  q->r.prompt_len = pn;
  q->r.output = content && r->output ? put(&at, r->output, on, true) : NULL;
  q->r.output_len = on;
  enqueue(l, q);
}

void tn_reqlog_add_shadow(struct tn_reqlog *l, const struct tn_shadow_row *r) {
  if (!l) return;
  bool content = l->cfg.content;
  size_t ln = content && r->live_text ? r->live_len : 0;
  size_t sn = content && r->shadow_text ? r->shadow_len : 0;
  size_t size = sizeof(struct qrow) SHADOW_STRS(STR_SIZE, r) + ln + 1 + sn + 1;
  struct qrow *q = malloc(size);
  if (!q) {
    if (l->dropped) tn_metric_add(l->dropped, 1);
    return;
  }
  q->next = NULL;
  q->shadow = true;
  q->sh = *r;
  char *at = (char *)(q + 1);
  struct tn_shadow_row *q_ = &q->sh;
  SHADOW_STRS(STR_COPY, r)
  q->sh.live_text = content && r->live_text ? put(&at, r->live_text, ln, true)
                                            : NULL;
  q->sh.live_len = ln;
  q->sh.shadow_text =
      content && r->shadow_text ? put(&at, r->shadow_text, sn, true) : NULL;
  q->sh.shadow_len = sn;
  enqueue(l, q);
}

static void enqueue(struct tn_reqlog *l, struct qrow *q) {
  pthread_mutex_lock(&l->mu);
  l->n_added++;
  if (l->stop || l->n_queued >= l->cfg.queue_max) {
    l->n_done++;
    pthread_mutex_unlock(&l->mu);
    free(q);
    if (l->dropped) tn_metric_add(l->dropped, 1);
    return;
  }
  if (l->tail) l->tail->next = q;
  else l->head = q;
  l->tail = q;
  l->n_queued++;
  pthread_cond_signal(&l->more);
  pthread_mutex_unlock(&l->mu);
}

void tn_reqlog_flush(struct tn_reqlog *l) {
  if (!l) return;
  pthread_mutex_lock(&l->mu);
  uint64_t target = l->n_added;
  pthread_cond_signal(&l->more);
  while (l->n_done < target) pthread_cond_wait(&l->written, &l->mu);
  pthread_mutex_unlock(&l->mu);
}

/* ---- the writer */

static void bind_text(sqlite3_stmt *st, int i, const char *s, size_t n) {
  if (s) sqlite3_bind_text(st, i, s, (int)n, SQLITE_STATIC);
  else sqlite3_bind_null(st, i);
}
static void bind_str(sqlite3_stmt *st, int i, const char *s) {
  bind_text(st, i, s, s ? strlen(s) : 0);
}
static void bind_ms(sqlite3_stmt *st, int i, double s) {
  if (s >= 0) sqlite3_bind_double(st, i, s * 1000.0);
  else sqlite3_bind_null(st, i);
}

/* Presets: what operators most often must keep out of logs. */
static const char *const k_presets[][2] = {
    {"email", "[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}"},
    {"phone", "\\+?\\d[\\d ()-]{7,}\\d"},
    {"card", "\\b(?:\\d[ -]?){12,18}\\d\\b"},
    {"ipv4", "\\b(?:\\d{1,3}\\.){3}\\d{1,3}\\b"},
    {"secret", "\\b(?:sk|pk|rk|ghp|gho|xox[bp])[-_][A-Za-z0-9_-]{16,}"},
};

/* text[len] with every pattern's matches replaced: a malloc'd copy in
 * *out (NULL: unchanged, or out of memory, and then the text is dropped
 * rather than stored unredacted: *drop). */
static char *redact(struct tn_reqlog *l, const char *text, size_t len,
                    size_t *out_len, bool *drop) {
  *drop = false;
  if (!l->n_redact || !text) return NULL;
  static const PCRE2_SPTR rep = (PCRE2_SPTR) "[REDACTED]";
  char *cur = NULL;
  size_t cur_len = len;
  for (int i = 0; i < l->n_redact; i++) {
    const char *src = cur ? cur : text;
    size_t cap = cur_len + 64;
    for (int tries = 0; tries < 4; tries++) {
      char *dst = malloc(cap + 1);
      if (!dst) break;
      PCRE2_SIZE n = cap + 1;
      int rc = pcre2_substitute(
          l->redact[i], (PCRE2_SPTR)src, cur_len, 0,
          PCRE2_SUBSTITUTE_GLOBAL | PCRE2_SUBSTITUTE_OVERFLOW_LENGTH, l->md,
          NULL, rep, PCRE2_ZERO_TERMINATED, (PCRE2_UCHAR *)dst, &n);
      if (rc >= 0) {
        free(cur);
        cur = dst;
        cur_len = n;
        goto next;
      }
      free(dst);
      if (rc != PCRE2_ERROR_NOMEMORY) break; /* bad UTF-8, match limit */
      cap = n;
    }
    free(cur);
    *drop = true;
    return NULL;
  next:;
  }
  *out_len = cur_len;
  return cur;
}

static void bind_redacted(struct tn_reqlog *l, sqlite3_stmt *st, int i,
                          const char *text, size_t len);

static bool write_row(struct tn_reqlog *l, const struct tn_reqlog_row *r) {
  sqlite3_stmt *st = l->ins;
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  sqlite3_bind_int64(st, 1, r->ts_ms);
  bind_text(st, 2, r->request_id, r->request_id ? strlen(r->request_id) : 0);
  bind_text(st, 3, r->tenant, r->tenant ? strlen(r->tenant) : 0);
  bind_text(st, 4, r->endpoint, r->endpoint ? strlen(r->endpoint) : 0);
  bind_text(st, 5, r->model, r->model ? strlen(r->model) : 0);
  if (r->status) sqlite3_bind_int(st, 6, r->status);
  bind_text(st, 7, r->finish, r->finish ? strlen(r->finish) : 0);
  bind_text(st, 8, r->error, r->error ? strlen(r->error) : 0);
  if (r->prompt_tokens >= 0) sqlite3_bind_int64(st, 9, r->prompt_tokens);
  if (r->cached_tokens >= 0) sqlite3_bind_int64(st, 10, r->cached_tokens);
  if (r->completion_tokens >= 0)
    sqlite3_bind_int64(st, 11, r->completion_tokens);
  bind_ms(st, 12, r->queue_s);
  bind_ms(st, 13, r->ttft_s);
  bind_ms(st, 14, r->itl_mean_s);
  bind_ms(st, 15, r->itl_max_s);
  bind_ms(st, 16, r->e2e_s);
  bind_redacted(l, st, 17, r->prompt, r->prompt_len);
  bind_redacted(l, st, 18, r->output, r->output_len);
  if (r->cost >= 0) sqlite3_bind_double(st, 19, r->cost);
  bind_str(st, 20, r->adapter);
  bind_str(st, 21, r->route);
  bind_str(st, 22, r->upstream);
  if (r->escalations >= 0) sqlite3_bind_int(st, 23, r->escalations);
  bind_str(st, 24, r->shadow_of);
  bind_ms(st, 25, r->compute_s);
  return sqlite3_step(st) == SQLITE_DONE;
}

/* text bound at column i, redacted (or dropped when that failed) */
static void bind_redacted(struct tn_reqlog *l, sqlite3_stmt *st, int i,
                          const char *text, size_t len) {
  size_t n = 0;
  bool drop;
  char *r = redact(l, text, len, &n, &drop);
  if (drop) sqlite3_bind_text(st, i, "[REDACTED]", -1, SQLITE_STATIC);
  else if (r) sqlite3_bind_text(st, i, r, (int)n, free);
  else bind_text(st, i, text, len);
}

static void bind_num(sqlite3_stmt *st, int i, double v) {
  if (v >= 0) sqlite3_bind_double(st, i, v);
}

static bool write_shadow(struct tn_reqlog *l, const struct tn_shadow_row *r) {
  sqlite3_stmt *st = l->ins_shadow;
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  sqlite3_bind_int64(st, 1, r->ts_ms);
  bind_str(st, 2, r->request_id);
  bind_str(st, 3, r->shadow_id);
  bind_str(st, 4, r->source);
  bind_str(st, 5, r->model);
  bind_str(st, 6, r->target);
  bind_str(st, 7, r->tenant);
  bind_str(st, 8, r->outcome);
  bind_str(st, 9, r->error);
  if (r->exact >= 0) sqlite3_bind_int(st, 10, r->exact);
  bind_num(st, 11, r->overlap);
  bind_num(st, 12, r->len_ratio);
  bind_ms(st, 13, r->live_s);
  bind_ms(st, 14, r->shadow_s);
  bind_ms(st, 15, r->shadow_wait_s);
  bind_num(st, 16, r->live_cost);
  bind_num(st, 17, r->shadow_cost);
  bind_str(st, 18, r->verdict);
  bind_redacted(l, st, 19, r->live_text, r->live_len);
  bind_redacted(l, st, 20, r->shadow_text, r->shadow_len);
  return sqlite3_step(st) == SQLITE_DONE;
}

static void retention(struct tn_reqlog *l) {
  char sql[400];
  if (l->cfg.max_age_s > 0) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t cut = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 -
                  (int64_t)(l->cfg.max_age_s * 1000.0);
    snprintf(sql, sizeof sql, "DELETE FROM requests WHERE ts < %lld;"
             "DELETE FROM shadows WHERE ts < %lld",
             (long long)cut, (long long)cut);
    sqlite3_exec(l->db, sql, NULL, NULL, NULL);
  }
  if (l->cfg.max_rows > 0) {
    snprintf(sql, sizeof sql,
             "DELETE FROM requests WHERE rowid <= "
             "(SELECT MAX(rowid) FROM requests) - %lld;"
             "DELETE FROM shadows WHERE rowid <= "
             "(SELECT MAX(rowid) FROM shadows) - %lld",
             (long long)l->cfg.max_rows, (long long)l->cfg.max_rows);
    sqlite3_exec(l->db, sql, NULL, NULL, NULL);
  }
  l->since_retention = 0;
  l->last_retention = now_s();
}

static void *writer_main(void *arg) {
  struct tn_reqlog *l = arg;
  pthread_mutex_lock(&l->mu);
  for (;;) {
    while (!l->head && !l->stop) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait(&l->more, &l->mu, &ts);
      if (!l->head && now_s() - l->last_retention > 60) break;
    }
    struct qrow *batch = l->head;
    size_t n = l->n_queued;
    l->head = l->tail = NULL;
    l->n_queued = 0;
    bool stop = l->stop;
    pthread_mutex_unlock(&l->mu);

    size_t ok = 0;
    if (batch) {
      bool tx = sqlite3_exec(l->db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK;
      for (struct qrow *q = batch; q; q = q->next)
        ok += q->shadow ? write_shadow(l, &q->sh) : write_row(l, &q->r);
      if (tx && sqlite3_exec(l->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        sqlite3_exec(l->db, "ROLLBACK", NULL, NULL, NULL);
        ok = 0;
      }
      while (batch) {
        struct qrow *nx = batch->next;
        free(batch);
        batch = nx;
      }
      if (l->rows) tn_metric_add(l->rows, (double)ok);
      if (l->dropped && ok < n) tn_metric_add(l->dropped, (double)(n - ok));
      l->since_retention += (int64_t)n;
    }
    if (l->since_retention >= 1000 || now_s() - l->last_retention > 60)
      retention(l);

    pthread_mutex_lock(&l->mu);
    l->n_done += n;
    pthread_cond_broadcast(&l->written);
    if (stop && !l->head) break;
  }
  pthread_mutex_unlock(&l->mu);
  return NULL;
}

/* ---- open / close */

static bool has_column(sqlite3 *db, const char *name) {
  sqlite3_stmt *st = NULL;
  bool found = false;
  if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info('requests')"
                             " WHERE name = ?1", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    found = sqlite3_step(st) == SQLITE_ROW;
  }
  sqlite3_finalize(st);
  return found;
}

enum tn_status tn_reqlog_open(const struct tn_reqlog_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_reqlog **out, struct tn_error *err) {
  *out = NULL;
  struct tn_reqlog *l = calloc(1, sizeof(*l));
  if (!l) return tn_error_set(err, TN_ENOMEM, "request log: out of memory");
  l->cfg = *cfg;
  if (!l->cfg.queue_max) l->cfg.queue_max = 4096;
  l->cfg.redact = NULL; /* borrowed only while opening */
  if (cfg->n_redact > REDACT_MAX) {
    free(l);
    return tn_error_set(err, TN_EINVAL, "--log-redact: at most %d patterns",
                        REDACT_MAX);
  }
  for (int i = 0; i < cfg->n_redact; i++) {
    const char *pat = cfg->redact[i];
    for (size_t k = 0; k < TN_ARRAY_LEN(k_presets); k++)
      if (!strcmp(pat, k_presets[k][0])) pat = k_presets[k][1];
    int ec;
    PCRE2_SIZE off;
    l->redact[i] = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, &ec,
                                 &off, NULL);
    if (!l->redact[i]) {
      PCRE2_UCHAR msg[160];
      pcre2_get_error_message(ec, msg, sizeof msg);
      for (int j = 0; j < i; j++) pcre2_code_free(l->redact[j]);
      free(l);
      return tn_error_set(err, TN_EINVAL,
                          "--log-redact '%.80s': %s at offset %zu "
                          "(a PCRE2 pattern, or email, phone, card, ipv4, "
                          "secret)",
                          cfg->redact[i], (const char *)msg, (size_t)off);
    }
    l->n_redact++;
  }
  if (l->n_redact && !(l->md = pcre2_match_data_create(8, NULL))) {
    for (int j = 0; j < l->n_redact; j++) pcre2_code_free(l->redact[j]);
    free(l);
    return tn_error_set(err, TN_ENOMEM, "request log: out of memory");
  }
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->more, NULL);
  pthread_cond_init(&l->written, NULL);
  enum tn_status st = TN_OK;
  int rc = sqlite3_open_v2(cfg->path, &l->db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                               SQLITE_OPEN_NOMUTEX,
                           NULL);
  if (rc != SQLITE_OK) {
    st = tn_error_set(err, TN_EIO, "--log-db %s: %s", cfg->path,
                      l->db ? sqlite3_errmsg(l->db) : sqlite3_errstr(rc));
    goto fail;
  }
  sqlite3_busy_timeout(l->db, 2000);
  char *msg = NULL;
  if (sqlite3_exec(l->db,
                   "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                   NULL, NULL, &msg) != SQLITE_OK ||
      sqlite3_exec(l->db, k_schema, NULL, NULL, &msg) != SQLITE_OK) {
    st = tn_error_set(err, TN_EIO, "--log-db %s: %s", cfg->path,
                      msg ? msg : sqlite3_errmsg(l->db));
    sqlite3_free(msg);
    goto fail;
  }
  for (size_t i = 0; i < TN_ARRAY_LEN(k_added); i++) {
    if (has_column(l->db, k_added[i][0])) continue;
    char sql[128];
    snprintf(sql, sizeof sql, "ALTER TABLE requests ADD COLUMN %s %s",
             k_added[i][0], k_added[i][1]);
    sqlite3_exec(l->db, sql, NULL, NULL, NULL);
  }
  if (sqlite3_prepare_v2(l->db, k_insert, -1, &l->ins, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(l->db, k_insert_shadow, -1, &l->ins_shadow, NULL) !=
          SQLITE_OK) {
    st = tn_error_set(err, TN_EIO, "--log-db %s: %s (an older table?)",
                      cfg->path, sqlite3_errmsg(l->db));
    goto fail;
  }
  if (metrics) {
    struct tn_metric_family *f = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_request_log_rows_total",
        "Rows written to the request log.", NULL, 0, NULL, 0);
    l->rows = f ? tn_metric_series(f, NULL) : NULL;
    f = tn_metrics_family(metrics, TN_METRIC_COUNTER,
                          "tern_request_log_dropped_total",
                          "Request log rows dropped (queue full or a failed "
                          "write).",
                          NULL, 0, NULL, 0);
    l->dropped = f ? tn_metric_series(f, NULL) : NULL;
  }
  l->last_retention = now_s();
  retention(l);
  if (pthread_create(&l->writer, NULL, writer_main, l) != 0) {
    st = tn_error_set(err, TN_EIO, "request log: cannot start its writer");
    goto fail;
  }
  l->started = true;
  *out = l;
  return TN_OK;
fail:
  tn_reqlog_close(l);
  return st;
}

void tn_reqlog_close(struct tn_reqlog *l) {
  if (!l) return;
  if (l->started) {
    pthread_mutex_lock(&l->mu);
    l->stop = true;
    pthread_cond_signal(&l->more);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->writer, NULL);
  }
  while (l->head) {
    struct qrow *nx = l->head->next;
    free(l->head);
    l->head = nx;
  }
  sqlite3_finalize(l->ins);
  sqlite3_finalize(l->ins_shadow);
  sqlite3_close(l->db);
  for (int i = 0; i < l->n_redact; i++) pcre2_code_free(l->redact[i]);
  pcre2_match_data_free(l->md);
  pthread_cond_destroy(&l->more);
  pthread_cond_destroy(&l->written);
  pthread_mutex_destroy(&l->mu);
  free(l);
}

/* ---- reading it back */

static const char k_query[] =
    "SELECT rowid, ts, request_id, tenant, endpoint, model, status,"
    " finish_reason, error, prompt_tokens, cached_tokens, completion_tokens,"
    " queue_ms, ttft_ms, itl_mean_ms, itl_max_ms, e2e_ms, cost, adapter,"
    " route, upstream, escalations, shadow_of, compute_ms,"
    " CASE WHEN ?12 THEN prompt END, CASE WHEN ?12 THEN output END"
    " FROM requests WHERE ts >= ?1 AND (?2 = 0 OR ts < ?2)"
    " AND (?3 IS NULL OR model = ?3)"
    " AND (?4 IS NULL OR endpoint = ?4)"
    " AND (?5 IS NULL OR tenant = ?5)"
    " AND (?6 IS NULL OR request_id = ?6)"
    " AND (status BETWEEN ?7 AND ?8 OR (?7 = 0 AND status IS NULL))"
    " AND (?9 = 0 OR status IS NULL OR status >= 400 OR error IS NOT NULL)"
    " AND (?10 = 0 OR ts < ?10 OR (ts = ?10 AND rowid < ?11))"
    " ORDER BY ts DESC, rowid DESC LIMIT ?13";

static const char *const k_cols[] = {
    "id",           "ts",            "request_id",        "tenant",
    "endpoint",     "model",         "status",            "finish_reason",
    "error",        "prompt_tokens", "cached_tokens",     "completion_tokens",
    "queue_ms",     "ttft_ms",       "itl_mean_ms",       "itl_max_ms",
    "e2e_ms",       "cost",          "adapter",           "route",
    "upstream",     "escalations",   "shadow_of",         "compute_ms",
    "prompt",       "output"};
#define N_COLS_PLAIN 24 /* the columns before prompt and output */

void tn_reqlog_filter_init(struct tn_reqlog_filter *f) {
  memset(f, 0, sizeof(*f));
  f->status_hi = 999;
  f->limit = 50;
}

bool tn_reqlog_parse_status(const char *s, struct tn_reqlog_filter *f) {
  f->errors = false;
  if (!strcmp(s, "error")) {
    f->status_lo = 0, f->status_hi = 999, f->errors = true;
    return true;
  }
  if (strlen(s) == 3 && s[0] >= '1' && s[0] <= '5' && s[1] == 'x' &&
      s[2] == 'x') {
    f->status_lo = (s[0] - '0') * 100, f->status_hi = f->status_lo + 99;
    return true;
  }
  char *end;
  long v = strtol(s, &end, 10);
  if (end == s || *end || v < 100 || v > 599) return false;
  f->status_lo = f->status_hi = (int)v;
  return true;
}

bool tn_parse_duration(const char *s, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || !(v >= 0) || v > 1e12) return false;
  double mul = 1;
  if (*end == 's') mul = 1, end++;
  else if (*end == 'm') mul = 60, end++;
  else if (*end == 'h') mul = 3600, end++;
  else if (*end == 'd') mul = 86400, end++;
  if (*end) return false;
  *out = v * mul;
  return true;
}

static void bind_opt(sqlite3_stmt *st, int i, const char *s) {
  bind_text(st, i, s, s ? strlen(s) : 0);
}

/* A read-only connection to the database at path and sql prepared on it;
 * on failure err names the database and both are closed. */
static enum tn_status open_query(const char *path, const char *sql,
                                 sqlite3 **h, sqlite3_stmt **st,
                                 struct tn_error *err) {
  *h = NULL;
  *st = NULL;
  enum tn_status ret = TN_OK;
  if (sqlite3_open_v2(path, h, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX,
                      NULL) != SQLITE_OK) {
    ret = tn_error_set(err, TN_EIO, "%s: %s", path,
                       *h ? sqlite3_errmsg(*h) : "cannot open");
    sqlite3_close(*h);
    *h = NULL;
    return ret;
  }
  sqlite3_busy_timeout(*h, 2000);
  if (sqlite3_prepare_v2(*h, sql, -1, st, NULL) != SQLITE_OK) {
    ret = tn_error_set(err, TN_EIO, "%s: %s (not a tern request log?)", path,
                       sqlite3_errmsg(*h));
    sqlite3_close(*h);
    *h = NULL;
    *st = NULL;
  }
  return ret;
}

/* Steps st, handing each row's first n_cols columns (named cols) to row
 * as one object; closes st and h. */
static enum tn_status run_query(const char *path, sqlite3 *h,
                                sqlite3_stmt *st, const char *const *cols,
                                int n_cols,
                                bool (*row)(void *user, json_t *obj),
                                void *user, struct tn_error *err) {
  enum tn_status ret = TN_OK;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    json_t *o = json_object();
    if (!o) {
      ret = tn_error_set(err, TN_ENOMEM, "out of memory");
      break;
    }
    for (int i = 0; i < n_cols; i++) {
      json_t *v;
      switch (sqlite3_column_type(st, i)) {
      case SQLITE_INTEGER: v = json_integer(sqlite3_column_int64(st, i)); break;
      case SQLITE_FLOAT: v = json_real(sqlite3_column_double(st, i)); break;
      case SQLITE_TEXT:
        /* invalid UTF-8 (a cut-off multi-byte answer) becomes null */
        v = json_stringn((const char *)sqlite3_column_text(st, i),
                         (size_t)sqlite3_column_bytes(st, i));
        break;
      default: v = json_null(); break;
      }
      json_object_set_new(o, cols[i], v ? v : json_null());
    }
    bool go = row(user, o);
    json_decref(o);
    if (!go) break;
  }
  if (ret == TN_OK && rc != SQLITE_ROW && rc != SQLITE_DONE)
    ret = tn_error_set(err, TN_EIO, "%s: %s", path, sqlite3_errmsg(h));
  sqlite3_finalize(st);
  sqlite3_close(h);
  return ret;
}

enum tn_status tn_reqlog_read(const char *path,
                              const struct tn_reqlog_filter *f,
                              bool (*row)(void *user, json_t *obj),
                              void *user, struct tn_error *err) {
  sqlite3 *h;
  sqlite3_stmt *st;
  enum tn_status ret = open_query(path, k_query, &h, &st, err);
  if (ret) return ret;
  sqlite3_bind_int64(st, 1, f->since_ms);
  sqlite3_bind_int64(st, 2, f->until_ms);
  bind_opt(st, 3, f->model);
  bind_opt(st, 4, f->endpoint);
  bind_opt(st, 5, f->tenant);
  bind_opt(st, 6, f->request_id);
  sqlite3_bind_int(st, 7, f->status_lo);
  sqlite3_bind_int(st, 8, f->status_hi);
  sqlite3_bind_int(st, 9, f->errors);
  sqlite3_bind_int64(st, 10, f->before_ts);
  sqlite3_bind_int64(st, 11, f->before_id);
  sqlite3_bind_int(st, 12, f->content);
  sqlite3_bind_int64(st, 13, f->limit > 0 ? f->limit : -1);
  return run_query(path, h, st, k_cols,
                   f->content ? (int)TN_ARRAY_LEN(k_cols) : N_COLS_PLAIN, row,
                   user, err);
}

static const char k_shadow_query[] =
    "SELECT rowid, ts, request_id, shadow_id, source, model, target, tenant,"
    " outcome, error, exact, overlap, len_ratio, live_ms, shadow_ms,"
    " shadow_wait_ms, live_cost, shadow_cost, verdict,"
    " CASE WHEN ?5 THEN live_output END, CASE WHEN ?5 THEN shadow_output END"
    " FROM shadows WHERE ts >= ?1 AND (?2 IS NULL OR source = ?2)"
    " AND (?3 = 0 OR rowid < ?3) ORDER BY rowid DESC LIMIT ?4";

static const char *const k_shadow_cols[] = {
    "id",          "ts",        "request_id",     "shadow_id", "source",
    "model",       "target",    "tenant",         "outcome",   "error",
    "exact",       "overlap",   "len_ratio",      "live_ms",   "shadow_ms",
    "shadow_wait_ms", "live_cost", "shadow_cost", "verdict",   "live_output",
    "shadow_output"};

enum tn_status tn_reqlog_read_shadows(const char *path, const char *source,
                                      int64_t since_ms, int64_t before_id,
                                      int64_t limit, bool content,
                                      bool (*row)(void *user, json_t *obj),
                                      void *user, struct tn_error *err) {
  sqlite3 *h;
  sqlite3_stmt *st;
  enum tn_status ret = open_query(path, k_shadow_query, &h, &st, err);
  if (ret) return ret;
  sqlite3_bind_int64(st, 1, since_ms);
  bind_opt(st, 2, source);
  sqlite3_bind_int64(st, 3, before_id);
  sqlite3_bind_int64(st, 4, limit > 0 ? limit : -1);
  sqlite3_bind_int(st, 5, content);
  int n = (int)TN_ARRAY_LEN(k_shadow_cols);
  return run_query(path, h, st, k_shadow_cols, content ? n : n - 2, row,
                   user, err);
}
