/*
 * shadow.c: shadow deployments (shadow.h).
 *
 * Each shadowed name has a deployment: a bounded FIFO of replays and
 * max_concurrent worker threads. A worker takes a replay, posts the live
 * request's body (model swapped for the target, stream off) to the
 * server's own port with the secret header, reads the answer, compares
 * it with the live one, asks the judge (both orders) when there is one,
 * and records the comparison. Every call is a blocking libcurl exchange
 * bounded by the shadow's timeout_s; stopping aborts running exchanges
 * through the progress callback.
 *
 * The shadow's latency is what its call took minus the time its engine
 * work waited for live requests (the X-Tern-Background-Wait-Ms answer
 * header), so a replay that waited for idle cores is not called slow.
 *
 * Lock: s->mu guards every deployment's queue and counters and s->stop;
 * a worker holds it only to take a replay and to count it done.
 */
#include "server/shadow.h"

#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "obs/judge.h"
#include "obs/obs.h"
#include "server/config.h"

#define ANSWER_MAX (32u << 20) /* a replay's answer, bytes */
#define QUEUED_BYTES_MAX ((size_t)64 << 20) /* copies waiting, per shadow */
#define JUDGE_MAX_TOKENS 256

struct job {
  struct job *next;
  char *request_id, *endpoint, *model, *tenant, *body, *text;
  size_t body_len, text_len;
  int64_t ts_ms;
  double e2e_s, cost;
};

struct deploy {
  struct tn_shadows *owner;
  const char *source;                    /* borrowed (the config) */
  const struct tn_serve_shadow_cfg *cfg; /* borrowed */
  pthread_t *threads;
  int n_threads;
  struct job *head, *tail;               /* s->mu */
  int n_queued, n_running;               /* s->mu */
  size_t queued_bytes;                   /* s->mu */
  _Atomic uint64_t rng;
  struct tn_metric *ok, *error, *timeout, *dropped;
  struct tn_metric *exact, *verdict[3];  /* shadow, live, tie */
  struct tn_metric *latency_delta;
};

struct tn_shadows {
  struct deploy *d;
  int n;
  char url[96];                          /* http://HOST:PORT */
  char secret[80];
  struct tn_reqlog *log;
  struct tn_stats *stats;
  pthread_mutex_t mu;
  pthread_cond_t more, idle;
  atomic_bool stop;
};

struct worker_arg {
  struct deploy *d;
};

/* ---- small helpers */

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *dupn(const char *s, size_t n) {
  if (!s) return NULL;
  char *d = malloc(n + 1);
  if (d) {
    memcpy(d, s, n);
    d[n] = '\0';
  }
  return d;
}

static void job_free(struct job *j) {
  if (!j) return;
  free(j->request_id);
  free(j->endpoint);
  free(j->model);
  free(j->tenant);
  free(j->body);
  free(j->text);
  free(j);
}

/* ---- the overlap */

struct tok {
  const char *p;
  size_t n;
};

static int tok_cmp(const void *a, const void *b) {
  const struct tok *x = a, *y = b;
  size_t n = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->p, y->p, n);
  return c ? c : (x->n > y->n) - (x->n < y->n);
}

static bool word_byte(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
         (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

#define TOKENS_MAX 200000

/* a's tokens, sorted; NULL (n = 0) for none or out of memory. */
static struct tok *tokens(const char *a, size_t na, size_t *n) {
  *n = 0;
  struct tok *t = NULL;
  size_t cap = 0;
  for (size_t i = 0; i < na && *n < TOKENS_MAX;) {
    unsigned char c = (unsigned char)a[i];
    if (c <= ' ' || c == 0x7f) {
      i++;
      continue;
    }
    size_t j = i + 1;
    if (word_byte(c))
      while (j < na && word_byte((unsigned char)a[j])) j++;
    if (*n == cap) {
      size_t nc = cap ? 2 * cap : 64;
      struct tok *g = realloc(t, nc * sizeof(*t));
      if (!g) break;
      t = g;
      cap = nc;
    }
    t[(*n)++] = (struct tok){a + i, j - i};
    i = j;
  }
  if (*n > 1) qsort(t, *n, sizeof(*t), tok_cmp);
  return t;
}

double tn_shadow_overlap(const char *a, size_t na, const char *b, size_t nb) {
  size_t n1, n2;
  struct tok *t1 = tokens(a, na, &n1), *t2 = tokens(b, nb, &n2);
  double f1;
  if (n1 + n2 == 0) {
    f1 = 1.0;
  } else {
    size_t i = 0, j = 0, common = 0;
    while (i < n1 && j < n2) {
      int c = tok_cmp(&t1[i], &t2[j]);
      if (c == 0) common++, i++, j++;
      else if (c < 0) i++;
      else j++;
    }
    f1 = 2.0 * (double)common / (double)(n1 + n2);
  }
  free(t1);
  free(t2);
  return f1;
}

/* ---- one HTTP exchange with the server */

struct body {
  char *p;
  size_t n;
  bool too_big;
};

static size_t on_data(char *d, size_t size, size_t n, void *user) {
  struct body *b = user;
  size_t add = size * n;
  if (b->n + add > ANSWER_MAX) {
    b->too_big = true;
    return 0;
  }
  char *p = realloc(b->p, b->n + add + 1);
  if (!p) return 0;
  memcpy(p + b->n, d, add);
  b->p = p;
  b->n += add;
  p[b->n] = '\0';
  return add;
}

struct reply {
  struct body body;
  long status;
  double wait_s;      /* the wait header, seconds (0: none) */
  bool timed_out;
  char err[256];      /* no answer at all: why */
};

static size_t on_header(char *d, size_t size, size_t n, void *user) {
  struct reply *r = user;
  size_t len = size * n, k = strlen(TN_SHADOW_WAIT_HEADER);
  if (len > k + 1 && !strncasecmp(d, TN_SHADOW_WAIT_HEADER, k) && d[k] == ':') {
    char v[32];
    size_t m = len - k - 1 < sizeof v - 1 ? len - k - 1 : sizeof v - 1;
    memcpy(v, d + k + 1, m);
    v[m] = '\0';
    double ms = strtod(v, NULL);
    if (ms > 0 && ms < 1e9) r->wait_s = ms / 1000.0;
  }
  return len;
}

static int on_progress(void *user, curl_off_t a, curl_off_t b, curl_off_t c,
                       curl_off_t d) {
  (void)a, (void)b, (void)c, (void)d;
  struct tn_shadows *s = user;
  return atomic_load(&s->stop) ? 1 : 0; /* non-zero aborts */
}

/* POSTs body to the server's endpoint as shadow traffic for live_id. */
static bool post(struct tn_shadows *s, const char *endpoint, const char *body,
                 const char *live_id, double timeout_s, struct reply *r) {
  memset(r, 0, sizeof(*r));
  CURL *h = curl_easy_init();
  if (!h) {
    snprintf(r->err, sizeof r->err, "out of memory");
    return false;
  }
  char url[160], sec[128], of[128];
  snprintf(url, sizeof url, "%s%s", s->url, endpoint);
  snprintf(sec, sizeof sec, "%s: %s", TN_SHADOW_HEADER, s->secret);
  snprintf(of, sizeof of, "%s: %.64s", TN_SHADOW_OF_HEADER,
           live_id ? live_id : "");
  struct curl_slist *hd = curl_slist_append(NULL, "Content-Type: application/json");
  struct curl_slist *h2 = hd ? curl_slist_append(hd, sec) : NULL;
  struct curl_slist *h3 = h2 ? curl_slist_append(h2, of) : NULL;
  if (!h3) {
    curl_slist_free_all(h2 ? h2 : hd);
    curl_easy_cleanup(h);
    snprintf(r->err, sizeof r->err, "out of memory");
    return false;
  }
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, h3);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000.0));
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &r->body);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, s);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http");
  CURLcode rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
  curl_easy_cleanup(h);
  curl_slist_free_all(h3);
  if (rc == CURLE_OK) return true;
  r->timed_out = rc == CURLE_OPERATION_TIMEDOUT;
  snprintf(r->err, sizeof r->err, "%s",
           r->body.too_big ? "the answer is larger than 32 MiB"
           : rc == CURLE_ABORTED_BY_CALLBACK ? "the server is stopping"
                                             : curl_easy_strerror(rc));
  return false;
}

/* An answer's first choice as text: content (chat) or text (completions),
 * then each tool call as <tool_call>{"name", "arguments"}</tool_call> (the
 * form tern's templates write). NULL when it is not a completion. */
static char *answer_text(json_t *root, double *cost) {
  json_t *ch = json_array_get(json_object_get(root, "choices"), 0);
  if (!json_is_object(ch)) return NULL;
  json_t *u = json_object_get(json_object_get(root, "usage"), "cost");
  *cost = json_is_number(u) ? json_number_value(u) : -1;
  json_t *msg = json_object_get(ch, "message");
  const char *t = json_string_value(
      json_is_object(msg) ? json_object_get(msg, "content")
                          : json_object_get(ch, "text"));
  struct tn_buf b = {0};
  tn_buf_append(&b, "", 0);
  if (t) tn_buf_append(&b, t, strlen(t));
  size_t i;
  json_t *tc;
  json_array_foreach(json_object_get(msg, "tool_calls"), i, tc) {
    json_t *f = json_object_get(tc, "function");
    const char *args = json_string_value(json_object_get(f, "arguments"));
    json_t *a = args ? json_loads(args, 0, NULL) : NULL;
    json_t *call = json_pack("{s:O?,s:O?}", "name", json_object_get(f, "name"),
                             "arguments", a);
    char *js = call ? json_dumps(call, JSON_COMPACT) : NULL;
    tn_buf_printf(&b, "%s<tool_call>\n%s\n</tool_call>", b.len ? "\n" : "",
                  js ? js : "");
    free(js);
    json_decref(call);
    json_decref(a);
  }
  if (b.oom) {
    tn_buf_free(&b);
    return NULL;
  }
  return b.data;
}

/* The server's error message in an answer, or the body's start. */
static void error_of(const struct reply *r, char *out, size_t cap) {
  json_t *root = r->body.p ? json_loads(r->body.p, 0, NULL) : NULL;
  const char *m = json_string_value(
      json_object_get(json_object_get(root, "error"), "message"));
  snprintf(out, cap, "HTTP %ld: %.200s", r->status,
           m ? m : r->body.p ? r->body.p : "");
  json_decref(root);
}

/* ---- the judge */

/* One order; 'A', 'B', 'T' or 0 (err says why). */
static char judge_once(struct tn_shadows *s, const struct deploy *d,
                       const char *question, const char *a, const char *b,
                       const char *live_id, double timeout_s, char *err,
                       size_t cap) {
  char *prompt = tn_judge_pair_prompt(question, NULL, a, b);
  json_t *fmt = tn_judge_winner_format();
  json_t *req = prompt && fmt
                    ? json_pack("{s:s,s:[{s:s,s:s},{s:s,s:s}],s:i,s:f,s:O}",
                                "model", d->cfg->judge, "messages", "role",
                                "system", "content", tn_judge_system, "role",
                                "user", "content", prompt, "max_tokens",
                                JUDGE_MAX_TOKENS, "temperature", 0.0,
                                "response_format", fmt)
                    : NULL;
  char w = 0;
  for (int attempt = 0; req && attempt < 2 && !w; attempt++) {
    char *body = json_dumps(req, JSON_COMPACT);
    struct reply r;
    bool got = body && post(s, "/v1/chat/completions", body, live_id,
                            timeout_s, &r);
    free(body);
    if (!got) {
      snprintf(err, cap, "judge: %s", body ? r.err : "out of memory");
      free(r.body.p);
      break;
    }
    json_t *root = r.status == 200 ? json_loads(r.body.p, 0, NULL) : NULL;
    double c;
    char *text = root ? answer_text(root, &c) : NULL;
    if (text) {
      w = tn_judge_parse_winner(text);
      if (!w) snprintf(err, cap, "judge: no winner in its answer: %.120s", text);
    } else if (r.status == 400 && r.body.p &&
               strstr(r.body.p, "response_format") && attempt == 0) {
      /* a judge that cannot be constrained gets the same prompt without */
      json_object_del(req, "response_format");
    } else {
      char e[240];
      error_of(&r, e, sizeof e);
      snprintf(err, cap, "judge: %s", e);
      attempt = 2;
    }
    free(text);
    json_decref(root);
    free(r.body.p);
  }
  json_decref(req);
  json_decref(fmt);
  free(prompt);
  return w;
}

/* Both orders; the verdict in shadow terms, or NULL (err says why). */
static const char *judge(struct tn_shadows *s, const struct deploy *d,
                         json_t *request, const char *live, const char *shadow,
                         const char *live_id, double timeout_s, char *err,
                         size_t cap) {
  char *q = tn_judge_question(request);
  if (!q) {
    snprintf(err, cap, "judge: out of memory");
    return NULL;
  }
  char w1 = judge_once(s, d, q, live, shadow, live_id, timeout_s, err, cap);
  char w2 = w1 ? judge_once(s, d, q, shadow, live, live_id, timeout_s, err, cap)
               : 0;
  free(q);
  if (!w1 || !w2) return NULL;
  /* first order: A = live; second order: A = shadow */
  char m1 = w1 == 'A' ? 'L' : w1 == 'B' ? 'S' : 'T';
  char m2 = w2 == 'A' ? 'S' : w2 == 'B' ? 'L' : 'T';
  if (m1 != m2 || m1 == 'T') return "tie";
  return m1 == 'S' ? "shadow" : "live";
}

/* ---- a replay */

static double remaining(double t_end) {
  double r = t_end - wall_s();
  return r > 0.001 ? r : 0.001;
}

static void replay(struct deploy *d, const struct job *j) {
  struct tn_shadows *s = d->owner;
  const struct tn_serve_shadow_cfg *cfg = d->cfg;
  double t_end = wall_s() + cfg->timeout_s;
  struct tn_shadow_row row = {
      .ts_ms = j->ts_ms,
      .request_id = j->request_id,
      .source = d->source,
      .model = j->model,
      .target = cfg->target,
      .tenant = j->tenant,
      .outcome = "error",
      .exact = -1,
      .overlap = -1,
      .len_ratio = -1,
      .live_s = j->e2e_s,
      .shadow_s = -1,
      .shadow_wait_s = -1,
      .live_cost = j->cost,
      .shadow_cost = -1,
      .live_text = j->text,
      .live_len = j->text_len,
  };
  char err[400] = "";
  char *shadow_text = NULL, *id = NULL, *body = NULL;
  struct reply r = {0};
  json_t *req = json_loadb(j->body, j->body_len, 0, NULL), *ans = NULL;
  if (!json_is_object(req)) {
    snprintf(err, sizeof err, "the live request is not a JSON object");
    goto record;
  }
  /* the first choice is compared, as text without the prompt echoed */
  json_object_set_new(req, "model", json_string(cfg->target));
  json_object_del(req, "stream");
  json_object_del(req, "stream_options");
  json_object_del(req, "echo");
  json_object_del(req, "n");
  body = json_dumps(req, JSON_COMPACT);
  if (!body) {
    snprintf(err, sizeof err, "out of memory");
    goto record;
  }
  double t0 = wall_s();
  bool got = post(s, j->endpoint, body, j->request_id, remaining(t_end), &r);
  double took = wall_s() - t0;
  if (!got) {
    snprintf(err, sizeof err, "%s", r.err);
    if (r.timed_out) row.outcome = "timeout";
    goto record;
  }
  if (r.status != 200) {
    error_of(&r, err, sizeof err);
    goto record;
  }
  ans = json_loads(r.body.p, 0, NULL);
  shadow_text = ans ? answer_text(ans, &row.shadow_cost) : NULL;
  if (!shadow_text) {
    snprintf(err, sizeof err, "the answer is not a completion");
    goto record;
  }
  id = dupn(json_string_value(json_object_get(ans, "id")),
            json_string_length(json_object_get(ans, "id")));
  row.shadow_id = id;
  row.outcome = "ok";
  row.shadow_text = shadow_text;
  row.shadow_len = strlen(shadow_text);
  row.shadow_wait_s = r.wait_s;
  row.shadow_s = took - r.wait_s > 0 ? took - r.wait_s : 0;
  row.exact = row.shadow_len == j->text_len &&
              !memcmp(shadow_text, j->text ? j->text : "", j->text_len);
  row.overlap =
      tn_shadow_overlap(j->text ? j->text : "", j->text_len, shadow_text,
                        row.shadow_len);
  row.len_ratio = j->text_len ? (double)row.shadow_len / (double)j->text_len
                  : row.shadow_len ? -1
                                   : 1;
  if (cfg->judge && !atomic_load(&s->stop))
    row.verdict = judge(s, d, req, j->text ? j->text : "", shadow_text,
                        j->request_id, remaining(t_end), err, sizeof err);
record:
  if (err[0]) row.error = err;
  if (!strcmp(row.outcome, "ok")) {
    if (d->ok) tn_metric_add(d->ok, 1);
    if (row.exact > 0 && d->exact) tn_metric_add(d->exact, 1);
    int v = !row.verdict ? -1
            : !strcmp(row.verdict, "shadow") ? 0
            : !strcmp(row.verdict, "live")   ? 1
                                             : 2;
    if (v >= 0 && d->verdict[v]) tn_metric_add(d->verdict[v], 1);
  } else {
    struct tn_metric *m = !strcmp(row.outcome, "timeout") ? d->timeout : d->error;
    if (m) tn_metric_add(m, 1);
  }
  if (!atomic_load(&s->stop) || !strcmp(row.outcome, "ok")) {
    tn_stats_shadow(s->stats, wall_s(), &row);
    tn_reqlog_add_shadow(s->log, &row);
  }
  free(id);
  free(shadow_text);
  free(body);
  free(r.body.p);
  json_decref(ans);
  json_decref(req);
}

static void *worker_main(void *arg) {
  struct worker_arg *wa = arg;
  struct deploy *d = wa->d;
  free(wa);
  struct tn_shadows *s = d->owner;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!d->head && !atomic_load(&s->stop))
      pthread_cond_wait(&s->more, &s->mu);
    if (atomic_load(&s->stop)) break;
    struct job *j = d->head;
    d->head = j->next;
    if (!d->head) d->tail = NULL;
    d->n_queued--;
    d->queued_bytes -= j->body_len + j->text_len;
    d->n_running++;
    pthread_mutex_unlock(&s->mu);
    replay(d, j);
    job_free(j);
    pthread_mutex_lock(&s->mu);
    d->n_running--;
    pthread_cond_broadcast(&s->idle);
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- the set */

int tn_shadows_find(const struct tn_shadows *s, const char *source) {
  for (int i = 0; s && source && i < s->n; i++)
    if (!strcmp(s->d[i].source, source)) return i;
  return -1;
}

bool tn_shadows_sample(struct tn_shadows *s, int i) {
  if (!s || i < 0 || i >= s->n) return false;
  double share = s->d[i].cfg->share;
  if (share >= 1) return true;
  if (share <= 0) return false;
  /* splitmix64 on an atomic counter: cheap, lock-free, good enough */
  uint64_t z = atomic_fetch_add(&s->d[i].rng, 0x9e3779b97f4a7c15ull) +
               0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-53 < share;
}

void tn_shadows_offer(struct tn_shadows *s, int i,
                      const struct tn_shadow_live *live) {
  if (!s || i < 0 || i >= s->n) return;
  struct deploy *d = &s->d[i];
  struct job *j = calloc(1, sizeof(*j));
  if (j) {
    j->request_id = dupn(live->request_id,
                         live->request_id ? strlen(live->request_id) : 0);
    j->endpoint = dupn(live->endpoint, strlen(live->endpoint));
    j->model = dupn(live->model, live->model ? strlen(live->model) : 0);
    j->tenant = dupn(live->tenant, live->tenant ? strlen(live->tenant) : 0);
    j->body = dupn(live->body, live->body_len);
    j->body_len = live->body_len;
    j->text = dupn(live->text ? live->text : "", live->text_len);
    j->text_len = live->text_len;
    j->ts_ms = live->ts_ms;
    j->e2e_s = live->e2e_s;
    j->cost = live->cost;
    if (!j->endpoint || !j->body || !j->text) {
      job_free(j);
      j = NULL;
    }
  }
  pthread_mutex_lock(&s->mu);
  bool take = j && !atomic_load(&s->stop) && d->n_queued < d->cfg->queue &&
              d->queued_bytes + j->body_len + j->text_len <= QUEUED_BYTES_MAX;
  if (take) {
    d->queued_bytes += j->body_len + j->text_len;
    if (d->tail) d->tail->next = j;
    else d->head = j;
    d->tail = j;
    d->n_queued++;
    pthread_cond_broadcast(&s->more);
  }
  pthread_mutex_unlock(&s->mu);
  if (!take) {
    job_free(j);
    if (d->dropped) tn_metric_add(d->dropped, 1);
  }
}

void tn_shadows_flush(struct tn_shadows *s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    bool busy = false;
    for (int i = 0; i < s->n && !busy; i++)
      busy = s->d[i].n_queued > 0 || s->d[i].n_running > 0;
    if (!busy || atomic_load(&s->stop)) break;
    pthread_cond_wait(&s->idle, &s->mu);
  }
  pthread_mutex_unlock(&s->mu);
}

void tn_shadows_stop(struct tn_shadows *s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  bool was = atomic_exchange(&s->stop, true);
  pthread_cond_broadcast(&s->more);
  pthread_cond_broadcast(&s->idle);
  pthread_mutex_unlock(&s->mu);
  if (was) return;
  for (int i = 0; i < s->n; i++) {
    struct deploy *d = &s->d[i];
    for (int t = 0; t < d->n_threads; t++) pthread_join(d->threads[t], NULL);
    d->n_threads = 0;
    pthread_mutex_lock(&s->mu);
    while (d->head) {
      struct job *nx = d->head->next;
      job_free(d->head);
      d->head = nx;
    }
    d->tail = NULL;
    d->n_queued = 0;
    d->queued_bytes = 0;
    pthread_mutex_unlock(&s->mu);
  }
}

void tn_shadows_free(struct tn_shadows *s) {
  if (!s) return;
  tn_shadows_stop(s);
  for (int i = 0; i < s->n; i++) free(s->d[i].threads);
  free(s->d);
  pthread_cond_destroy(&s->more);
  pthread_cond_destroy(&s->idle);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

static struct tn_metric *series(struct tn_metric_family *f, const char *a,
                                const char *b, const char *c) {
  const char *lv[3] = {a, b, c};
  return f ? tn_metric_series(f, lv) : NULL;
}

enum tn_status tn_shadows_start(const struct tn_shadow_spec *specs, int n,
                                const char *host, int port,
                                const char *secret,
                                struct tn_reqlog *log, struct tn_stats *stats,
                                struct tn_metrics *metrics,
                                struct tn_shadows **out,
                                struct tn_error *err) {
  *out = NULL;
  struct tn_shadows *s = calloc(1, sizeof(*s));
  if (!s || !(s->d = calloc((size_t)(n > 0 ? n : 1), sizeof(*s->d)))) {
    free(s);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  /* the address the server listens on; any address: the loopback one */
  bool any = !host || !*host || !strcmp(host, "0.0.0.0");
  snprintf(s->url, sizeof s->url, "http://%.64s:%d", any ? "127.0.0.1" : host,
           port);
  snprintf(s->secret, sizeof s->secret, "%s", secret);
  s->log = log;
  s->stats = stats;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->more, NULL);
  pthread_cond_init(&s->idle, NULL);
  struct tn_metric_family *rf = NULL, *ef = NULL, *vf = NULL;
  if (metrics) {
    static const char *const rl[] = {"source", "target", "outcome"};
    rf = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_shadow_replays_total",
        "Shadow replays by outcome (ok, error, timeout, dropped: the queue "
        "was full).",
        rl, 3, NULL, 0);
    static const char *const el[] = {"source", "target"};
    ef = tn_metrics_family(metrics, TN_METRIC_COUNTER,
                           "tern_shadow_exact_matches_total",
                           "Shadow replays whose answer equals the live one.",
                           el, 2, NULL, 0);
    static const char *const vl[] = {"source", "target", "verdict"};
    vf = tn_metrics_family(
        metrics, TN_METRIC_COUNTER, "tern_shadow_judge_verdicts_total",
        "The judge's verdicts on shadow replays (shadow, live: the better "
        "answer; tie, or orders that disagree).",
        vl, 3, NULL, 0);
  }
  s->n = n;
  for (int i = 0; i < n; i++) {
    struct deploy *d = &s->d[i];
    d->owner = s;
    d->source = specs[i].source;
    d->cfg = specs[i].cfg;
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
      seed = (uint64_t)(wall_s() * 1e9) + (uint64_t)i;
    atomic_init(&d->rng, seed);
    const char *src = d->source, *tg = d->cfg->target;
    d->ok = series(rf, src, tg, "ok");
    d->error = series(rf, src, tg, "error");
    d->timeout = series(rf, src, tg, "timeout");
    d->dropped = series(rf, src, tg, "dropped");
    d->exact = series(ef, src, tg, NULL);
    d->verdict[0] = series(vf, src, tg, "shadow");
    d->verdict[1] = series(vf, src, tg, "live");
    d->verdict[2] = series(vf, src, tg, "tie");
    d->threads = calloc((size_t)d->cfg->max_concurrent, sizeof(pthread_t));
    if (!d->threads) {
      tn_shadows_free(s);
      return tn_error_set(err, TN_ENOMEM, "out of memory");
    }
    for (int t = 0; t < d->cfg->max_concurrent; t++) {
      struct worker_arg *wa = malloc(sizeof(*wa));
      if (wa) wa->d = d;
      if (!wa || tn_thread_create(&d->threads[t], worker_main, wa) != 0) {
        free(wa);
        tn_shadows_free(s);
        return tn_error_set(err, TN_EIO, "cannot start a shadow worker");
      }
      d->n_threads++;
    }
  }
  *out = s;
  return TN_OK;
}
