/*
 * stats.c: the live statistics behind the dashboard (obs.h).
 *
 * Shape. One key per (model, tenant) seen, each with two rings of slots:
 *
 *   key ── fine[900]    one slot a second   (windows up to 15 minutes)
 *       └─ coarse[1440] one slot a minute   (windows up to 24 hours)
 *
 * A slot belongs to the epoch floor(t / step) it was last written in; a
 * write into a slot of an older epoch clears it first, and a read skips a
 * slot whose epoch is not the one asked for. So nothing ever sweeps the
 * rings: stale slots are simply not theirs any more. Gauges sampled from
 * the engines live in the same two rings per model, as sums and counts
 * (the chart shows the mean over a point) and maxima.
 *
 * Windows up to 15 minutes read the second ring and end with the last
 * whole second; longer ones read the minute ring and end with the current
 * minute so far (its rates over the seconds it has had). A point is one or
 * more slots: at most 300 points per series.
 *
 * Histograms. Latencies are counted in TN_LAT_BUCKETS log-spaced buckets
 * (ratio 2^(1/3), from 0.1 ms). Counts merge by addition, so a point's
 * quantile comes from the sum of its slots' and groups' histograms, and is
 * interpolated geometrically inside the bucket it falls in (within about
 * 13% of the true value).
 *
 * Lock. s->mu guards everything: an add is a key lookup and two slot
 * updates; a query holds it while it aggregates (a few milliseconds for
 * 24 hours of a few keys).
 */
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "obs/obs.h"

#define LAT_MIN 1e-4
#define FINE_STEP 1
#define FINE_N 900
#define COARSE_STEP 60
#define COARSE_N 1440
#define MAX_POINTS 300

enum { H_TTFT, H_ITL, H_E2E, H_N };
static const char *const k_hist_names[H_N] = {"ttft_ms", "itl_ms", "e2e_ms"};

/* Error types the dashboard counts (status and finish reason -> type). */
enum {
  ERR_INVALID,   /* 400, 405, 413, 422: the request was wrong */
  ERR_AUTH,      /* 401, 403 */
  ERR_NOT_FOUND, /* 404: model or route */
  ERR_OVERLOAD,  /* 429, 503: queue full, loading, draining */
  ERR_SERVER,    /* other 5xx, or a 200 whose generation failed */
  ERR_CANCELLED, /* the client went away */
  ERR_N
};
static const char *const k_err_names[ERR_N] = {
    "invalid_request", "auth", "not_found", "overloaded", "server",
    "cancelled"};

struct slot {
  int64_t epoch;
  uint32_t requests, errors;
  uint32_t err_by[ERR_N];
  uint64_t prompt_tokens, cached_tokens, completion_tokens;
  double cost;
  uint32_t *hist; /* H_N * TN_LAT_BUCKETS, allocated on first use */
  /* shadow comparisons of the key's model (the name they shadow) */
  uint32_t sh_ok, sh_err, sh_exact, sh_judged, sh_wins, sh_losses;
  double sh_overlap;
};

struct gslot {
  int64_t epoch;
  uint32_t n;
  float running, waiting, kv; /* sums of samples */
  float running_max, waiting_max, kv_max;
};

struct key {
  char *model, *tenant;
  struct slot fine[FINE_N], coarse[COARSE_N];
};

struct gkey {
  char *model;
  struct gslot fine[FINE_N], coarse[COARSE_N];
};

struct tn_stats {
  pthread_mutex_t mu;
  struct key *keys[TN_STATS_KEYS_MAX];
  int n_keys;
  struct gkey *gkeys[TN_STATS_KEYS_MAX];
  int n_gkeys;
};

int tn_lat_bucket(double s) {
  if (!(s >= LAT_MIN)) return 0; /* NaN too */
  int b = 1 + (int)floor(3.0 * log2(s / LAT_MIN));
  return b < 1 ? 1 : b >= TN_LAT_BUCKETS ? TN_LAT_BUCKETS - 1 : b;
}

/* Bucket b >= 1 covers [lo(b), lo(b + 1)). */
static double bucket_lo(int b) {
  return b <= 0 ? 0 : LAT_MIN * exp2((double)(b - 1) / 3.0);
}

struct tn_stats *tn_stats_new(void) {
  struct tn_stats *s = calloc(1, sizeof(*s));
  if (s) pthread_mutex_init(&s->mu, NULL);
  return s;
}

static void key_free(struct key *k) {
  if (!k) return;
  for (int i = 0; i < FINE_N; i++) free(k->fine[i].hist);
  for (int i = 0; i < COARSE_N; i++) free(k->coarse[i].hist);
  free(k->model);
  free(k->tenant);
  free(k);
}

void tn_stats_free(struct tn_stats *s) {
  if (!s) return;
  for (int i = 0; i < s->n_keys; i++) key_free(s->keys[i]);
  for (int i = 0; i < s->n_gkeys; i++) {
    free(s->gkeys[i]->model);
    free(s->gkeys[i]);
  }
  pthread_mutex_destroy(&s->mu);
  free(s);
}

static bool same(const char *a, const char *b) {
  return a == b || (a && b && !strcmp(a, b));
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static struct key *find_key(struct tn_stats *s, const char *model,
                            const char *tenant) {
  for (int i = 0; i < s->n_keys; i++)
    if (same(s->keys[i]->model, model) && same(s->keys[i]->tenant, tenant))
      return s->keys[i];
  if (s->n_keys == TN_STATS_KEYS_MAX - 1 && tenant &&
      strcmp(tenant, "(other)") != 0)
    return find_key(s, model, "(other)");
  if (s->n_keys == TN_STATS_KEYS_MAX) return s->keys[s->n_keys - 1];
  struct key *k = calloc(1, sizeof(*k));
  if (!k) return NULL;
  k->model = dup_or_null(model);
  k->tenant = dup_or_null(tenant);
  if ((model && !k->model) || (tenant && !k->tenant)) {
    key_free(k);
    return NULL;
  }
  for (int i = 0; i < FINE_N; i++) k->fine[i].epoch = -1;
  for (int i = 0; i < COARSE_N; i++) k->coarse[i].epoch = -1;
  s->keys[s->n_keys++] = k;
  return k;
}

static int err_type(const struct tn_reqlog_row *r) {
  int st = r->status;
  if (st == 0 || (r->finish && !strcmp(r->finish, "cancelled")))
    return ERR_CANCELLED;
  if (st == 401 || st == 403) return ERR_AUTH;
  if (st == 404) return ERR_NOT_FOUND;
  if (st == 429 || st == 503) return ERR_OVERLOAD;
  if (st >= 500) return ERR_SERVER;
  if (st >= 400) return ERR_INVALID;
  if (r->error || (r->finish && !strcmp(r->finish, "error")))
    return ERR_SERVER;
  return -1;
}

/* The slot, cleared when it last held another epoch. */
static void slot_at(struct slot *sl, int64_t epoch) {
  if (sl->epoch == epoch) return;
  uint32_t *h = sl->hist;
  memset(sl, 0, sizeof(*sl));
  sl->epoch = epoch;
  sl->hist = h;
  if (h) memset(h, 0, sizeof(uint32_t) * H_N * TN_LAT_BUCKETS);
}

static void slot_add(struct slot *sl, int64_t epoch,
                     const struct tn_reqlog_row *r, int et,
                     const uint32_t *itl) {
  slot_at(sl, epoch);
  sl->requests++;
  if (et >= 0) {
    sl->errors++;
    sl->err_by[et]++;
  }
  if (r->prompt_tokens > 0) sl->prompt_tokens += (uint64_t)r->prompt_tokens;
  if (r->cached_tokens > 0) sl->cached_tokens += (uint64_t)r->cached_tokens;
  if (r->completion_tokens > 0)
    sl->completion_tokens += (uint64_t)r->completion_tokens;
  if (r->cost > 0) sl->cost += r->cost;
  bool any = r->ttft_s >= 0 || r->e2e_s >= 0 || itl;
  if (!any) return;
  if (!sl->hist) {
    sl->hist = calloc(H_N * TN_LAT_BUCKETS, sizeof(uint32_t));
    if (!sl->hist) return;
  }
  /* only answered requests time a first token and an end */
  if (r->ttft_s >= 0)
    sl->hist[H_TTFT * TN_LAT_BUCKETS + tn_lat_bucket(r->ttft_s)]++;
  if (r->e2e_s >= 0 && r->status == 200)
    sl->hist[H_E2E * TN_LAT_BUCKETS + tn_lat_bucket(r->e2e_s)]++;
  if (itl)
    for (int b = 0; b < TN_LAT_BUCKETS; b++)
      sl->hist[H_ITL * TN_LAT_BUCKETS + b] += itl[b];
}

void tn_stats_add(struct tn_stats *s, double now_s,
                  const struct tn_reqlog_row *r, const uint32_t *itl_hist) {
  if (!s || !(now_s > 0)) return;
  int64_t t = (int64_t)now_s;
  int et = err_type(r);
  pthread_mutex_lock(&s->mu);
  struct key *k = find_key(s, r->model, r->tenant);
  if (k) {
    int64_t ef = t / FINE_STEP, ec = t / COARSE_STEP;
    slot_add(&k->fine[ef % FINE_N], ef, r, et, itl_hist);
    slot_add(&k->coarse[ec % COARSE_N], ec, r, et, itl_hist);
  }
  pthread_mutex_unlock(&s->mu);
}

static void slot_shadow(struct slot *sl, int64_t epoch,
                        const struct tn_shadow_row *r) {
  slot_at(sl, epoch);
  if (strcmp(r->outcome, "ok") != 0) {
    sl->sh_err++;
    return;
  }
  sl->sh_ok++;
  sl->sh_exact += r->exact > 0;
  if (r->overlap >= 0) sl->sh_overlap += r->overlap;
  if (r->verdict) {
    sl->sh_judged++;
    sl->sh_wins += !strcmp(r->verdict, "shadow");
    sl->sh_losses += !strcmp(r->verdict, "live");
  }
}

void tn_stats_shadow(struct tn_stats *s, double now_s,
                     const struct tn_shadow_row *r) {
  if (!s || !(now_s > 0) || !r->outcome) return;
  int64_t t = (int64_t)now_s;
  pthread_mutex_lock(&s->mu);
  struct key *k = find_key(s, r->source, r->tenant);
  if (k) {
    int64_t ef = t / FINE_STEP, ec = t / COARSE_STEP;
    slot_shadow(&k->fine[ef % FINE_N], ef, r);
    slot_shadow(&k->coarse[ec % COARSE_N], ec, r);
  }
  pthread_mutex_unlock(&s->mu);
}

static void gslot_add(struct gslot *g, int64_t epoch, float run, float wait,
                      float kv) {
  if (g->epoch != epoch) {
    memset(g, 0, sizeof(*g));
    g->epoch = epoch;
  }
  g->n++;
  g->running += run;
  g->waiting += wait;
  g->kv += kv;
  if (run > g->running_max) g->running_max = run;
  if (wait > g->waiting_max) g->waiting_max = wait;
  if (kv > g->kv_max) g->kv_max = kv;
}

void tn_stats_gauges(struct tn_stats *s, double now_s, const char *model,
                     double running, double waiting, double kv_used) {
  if (!s || !model || !(now_s > 0)) return;
  int64_t t = (int64_t)now_s;
  pthread_mutex_lock(&s->mu);
  struct gkey *g = NULL;
  for (int i = 0; i < s->n_gkeys && !g; i++)
    if (!strcmp(s->gkeys[i]->model, model)) g = s->gkeys[i];
  if (!g && s->n_gkeys < TN_STATS_KEYS_MAX) {
    g = calloc(1, sizeof(*g));
    if (g && !(g->model = strdup(model))) {
      free(g);
      g = NULL;
    }
    if (g) {
      for (int i = 0; i < FINE_N; i++) g->fine[i].epoch = -1;
      for (int i = 0; i < COARSE_N; i++) g->coarse[i].epoch = -1;
      s->gkeys[s->n_gkeys++] = g;
    }
  }
  if (g) {
    int64_t ef = t / FINE_STEP, ec = t / COARSE_STEP;
    gslot_add(&g->fine[ef % FINE_N], ef, (float)running, (float)waiting,
              (float)kv_used);
    gslot_add(&g->coarse[ec % COARSE_N], ec, (float)running, (float)waiting,
              (float)kv_used);
  }
  pthread_mutex_unlock(&s->mu);
}

/* ---- queries */

/* One aggregate: a point of a group, or a group's whole window. */
struct agg {
  uint64_t requests, errors, err_by[ERR_N];
  uint64_t prompt_tokens, cached_tokens, completion_tokens;
  double cost;
  uint64_t hist[H_N][TN_LAT_BUCKETS];
  uint64_t hist_n[H_N];
  uint64_t sh_ok, sh_err, sh_exact, sh_judged, sh_wins, sh_losses;
  double sh_overlap;
};

#define SHADOW_FIELDS(X) \
  X(sh_ok) X(sh_err) X(sh_exact) X(sh_judged) X(sh_wins) X(sh_losses) \
  X(sh_overlap)
#define ADD_FIELD(f) a->f += b->f;

static void agg_slot(struct agg *a, const struct slot *sl) {
  a->requests += sl->requests;
  a->errors += sl->errors;
  for (int i = 0; i < ERR_N; i++) a->err_by[i] += sl->err_by[i];
  a->prompt_tokens += sl->prompt_tokens;
  a->cached_tokens += sl->cached_tokens;
  a->completion_tokens += sl->completion_tokens;
  a->cost += sl->cost;
  {
    const struct slot *b = sl;
    SHADOW_FIELDS(ADD_FIELD)
  }
  if (!sl->hist) return;
  for (int h = 0; h < H_N; h++)
    for (int b = 0; b < TN_LAT_BUCKETS; b++) {
      uint32_t c = sl->hist[h * TN_LAT_BUCKETS + b];
      a->hist[h][b] += c;
      a->hist_n[h] += c;
    }
}

static void agg_merge(struct agg *a, const struct agg *b) {
  a->requests += b->requests;
  a->errors += b->errors;
  for (int i = 0; i < ERR_N; i++) a->err_by[i] += b->err_by[i];
  a->prompt_tokens += b->prompt_tokens;
  a->cached_tokens += b->cached_tokens;
  a->completion_tokens += b->completion_tokens;
  a->cost += b->cost;
  SHADOW_FIELDS(ADD_FIELD)
  for (int h = 0; h < H_N; h++) {
    for (int i = 0; i < TN_LAT_BUCKETS; i++) a->hist[h][i] += b->hist[h][i];
    a->hist_n[h] += b->hist_n[h];
  }
}

/* The quantiles every latency reports, and their names. */
static const double k_qs[3] = {0.5, 0.95, 0.99};
static const char *const k_q_names[3] = {"p50", "p95", "p99"};

/* The q-quantile in milliseconds, or a negative number when empty. */
static double quantile_ms(const uint64_t *hist, uint64_t n, double q) {
  if (!n) return -1;
  double rank = q * (double)n;
  uint64_t seen = 0;
  for (int b = 0; b < TN_LAT_BUCKETS; b++) {
    if (!hist[b]) continue;
    if ((double)(seen + hist[b]) >= rank) {
      if (b == 0) return LAT_MIN * 1000.0;
      double lo = bucket_lo(b), hi = bucket_lo(b + 1);
      double f = (rank - (double)seen) / (double)hist[b];
      if (f < 0) f = 0;
      if (f > 1) f = 1;
      return lo * pow(hi / lo, f) * 1000.0;
    }
    seen += hist[b];
  }
  return bucket_lo(TN_LAT_BUCKETS - 1) * 1000.0;
}

static json_t *num_or_null(double v) {
  return v < 0 ? json_null() : json_real(round(v * 1000.0) / 1000.0);
}

static json_t *quantiles(const struct agg *a, int h) {
  json_t *o = json_object();
  for (int i = 0; i < 3; i++)
    json_object_set_new(
        o, k_q_names[i],
        num_or_null(quantile_ms(a->hist[h], a->hist_n[h], k_qs[i])));
  return o;
}

static json_t *totals_json(const struct agg *a) {
  json_t *o = json_object();
  json_object_set_new(o, "requests", json_integer((json_int_t)a->requests));
  json_object_set_new(o, "errors", json_integer((json_int_t)a->errors));
  json_t *eb = json_object();
  for (int i = 0; i < ERR_N; i++)
    json_object_set_new(eb, k_err_names[i],
                        json_integer((json_int_t)a->err_by[i]));
  json_object_set_new(o, "errors_by_type", eb);
  json_object_set_new(o, "prompt_tokens",
                      json_integer((json_int_t)a->prompt_tokens));
  json_object_set_new(o, "cached_tokens",
                      json_integer((json_int_t)a->cached_tokens));
  json_object_set_new(o, "completion_tokens",
                      json_integer((json_int_t)a->completion_tokens));
  json_object_set_new(o, "cost", json_real(a->cost));
  json_object_set_new(
      o, "prefix_hit_rate",
      a->prompt_tokens ? json_real((double)a->cached_tokens /
                                   (double)a->prompt_tokens)
                       : json_null());
  for (int h = 0; h < H_N; h++)
    json_object_set_new(o, k_hist_names[h], quantiles(a, h));
  if (a->sh_ok || a->sh_err) {
    double n = (double)a->sh_ok;
    json_object_set_new(
        o, "shadow",
        json_pack("{s:I,s:I,s:o,s:o,s:I,s:I,s:I}", "compared",
                  (json_int_t)a->sh_ok, "errors", (json_int_t)a->sh_err,
                  "exact_rate",
                  a->sh_ok ? json_real((double)a->sh_exact / n) : json_null(),
                  "overlap_mean",
                  a->sh_ok ? json_real(a->sh_overlap / n) : json_null(),
                  "judged", (json_int_t)a->sh_judged, "shadow_wins",
                  (json_int_t)a->sh_wins, "live_wins",
                  (json_int_t)a->sh_losses));
  }
  return o;
}

/* The series of one group: per-point rates and quantiles. */
struct series {
  json_t *req, *err, *ptok, *ctok, *cost, *hit, *sh_exact, *sh_overlap;
  json_t *q[H_N][3];
};

static void series_init(struct series *sr) {
  sr->req = json_array();
  sr->err = json_array();
  sr->ptok = json_array();
  sr->ctok = json_array();
  sr->cost = json_array();
  sr->hit = json_array();
  sr->sh_exact = json_array();
  sr->sh_overlap = json_array();
  for (int h = 0; h < H_N; h++)
    for (int i = 0; i < 3; i++) sr->q[h][i] = json_array();
}

static void series_point(struct series *sr, const struct agg *a,
                         double secs) {
  json_array_append_new(sr->req, json_real((double)a->requests / secs));
  json_array_append_new(sr->err, json_real((double)a->errors / secs));
  json_array_append_new(sr->ptok, json_real((double)a->prompt_tokens / secs));
  json_array_append_new(sr->ctok,
                        json_real((double)a->completion_tokens / secs));
  json_array_append_new(sr->cost, json_real(a->cost * 60.0 / secs));
  json_array_append_new(sr->hit,
                        a->prompt_tokens
                            ? json_real((double)a->cached_tokens /
                                        (double)a->prompt_tokens)
                            : json_null());
  double n = (double)a->sh_ok;
  json_array_append_new(sr->sh_exact,
                        n ? json_real((double)a->sh_exact / n) : json_null());
  json_array_append_new(sr->sh_overlap,
                        n ? json_real(a->sh_overlap / n) : json_null());
  for (int h = 0; h < H_N; h++)
    for (int i = 0; i < 3; i++)
      json_array_append_new(
          sr->q[h][i],
          num_or_null(quantile_ms(a->hist[h], a->hist_n[h], k_qs[i])));
}

static json_t *series_json(struct series *sr) {
  json_t *o = json_object();
  json_object_set_new(o, "requests_per_s", sr->req);
  json_object_set_new(o, "errors_per_s", sr->err);
  json_object_set_new(o, "prompt_tokens_per_s", sr->ptok);
  json_object_set_new(o, "completion_tokens_per_s", sr->ctok);
  json_object_set_new(o, "cost_per_min", sr->cost);
  json_object_set_new(o, "prefix_hit_rate", sr->hit);
  json_object_set_new(o, "shadow_exact_rate", sr->sh_exact);
  json_object_set_new(o, "shadow_overlap", sr->sh_overlap);
  for (int h = 0; h < H_N; h++) {
    json_t *q = json_object();
    for (int i = 0; i < 3; i++)
      json_object_set_new(q, k_q_names[i], sr->q[h][i]);
    json_object_set_new(o, k_hist_names[h], q);
  }
  return o;
}

/* Which group a key belongs to under by (NULL group name: "" shown). */
static const char *group_of(const struct key *k, int by) {
  const char *g = by == 0 ? k->model : by == 1 ? k->tenant : "all";
  return g ? g : "";
}

char *tn_stats_json(struct tn_stats *s, double now_s, double window_s,
                    const char *by, size_t *len) {
  int byi = !strcmp(by, "model") ? 0 : !strcmp(by, "tenant") ? 1 : 2;
  int64_t w = (int64_t)window_s;
  bool fine = w <= (int64_t)FINE_N * FINE_STEP;
  int64_t step = fine ? FINE_STEP : COARSE_STEP;
  int ring_n = fine ? FINE_N : COARSE_N;
  int64_t n_slots = w / step;
  if (n_slots < 1) n_slots = 1;
  if (n_slots > ring_n - 1) n_slots = ring_n - 1;
  int64_t per = (n_slots + MAX_POINTS - 1) / MAX_POINTS;
  int64_t points = (n_slots + per - 1) / per;
  /* Seconds: the series end with the last whole second. Minutes: with
   * the current minute, so far (its rates over the time it has had). */
  int64_t end_epoch = (int64_t)now_s / step + (fine ? 0 : 1);
  int64_t first = end_epoch - points * per;
  double pt_secs = (double)(per * step);
  double last_secs = pt_secs;
  if (!fine)
    last_secs -= (double)(end_epoch * step) - now_s;
  if (last_secs < 1) last_secs = 1;

  json_t *root = json_object();
  json_object_set_new(root, "window_s",
                      json_integer((json_int_t)(n_slots * step)));
  json_object_set_new(root, "step_s", json_integer((json_int_t)(per * step)));
  json_object_set_new(root, "start", json_integer((json_int_t)(first * step)));
  json_object_set_new(root, "end",
                      json_integer((json_int_t)(end_epoch * step)));
  json_object_set_new(root, "points", json_integer((json_int_t)points));
  json_object_set_new(root, "by", json_string(byi == 0 ? "model"
                                              : byi == 1 ? "tenant"
                                                         : "none"));
  json_t *groups = json_array();
  struct agg *pt = malloc(sizeof(*pt)), *tot = malloc(sizeof(*tot)),
             *all = calloc(1, sizeof(*all));
  struct series all_sr;
  series_init(&all_sr);
  struct agg *all_pts = calloc((size_t)points, sizeof(*all_pts));
  pthread_mutex_lock(&s->mu);
  /* groups in first-seen order; a key is taken by the first group whose
   * name it shares */
  bool *done = calloc((size_t)s->n_keys + 1, sizeof(bool));
  if (!pt || !tot || !all || !all_pts || !done) goto oom;
  for (int gi = 0; gi < s->n_keys; gi++) {
    if (done[gi]) continue;
    const char *gname = group_of(s->keys[gi], byi);
    memset(tot, 0, sizeof(*tot));
    struct series sr;
    series_init(&sr);
    for (int64_t p = 0; p < points; p++) {
      memset(pt, 0, sizeof(*pt));
      for (int ki = gi; ki < s->n_keys; ki++) {
        struct key *k = s->keys[ki];
        if (strcmp(group_of(k, byi), gname) != 0) continue;
        done[ki] = true;
        struct slot *ring = fine ? k->fine : k->coarse;
        for (int64_t e = first + p * per; e < first + (p + 1) * per; e++) {
          struct slot *sl = &ring[e % ring_n];
          if (sl->epoch == e) agg_slot(pt, sl);
        }
      }
      series_point(&sr, pt, p == points - 1 ? last_secs : pt_secs);
      agg_merge(tot, pt);
      agg_merge(&all_pts[p], pt);
    }
    agg_merge(all, tot);
    json_t *g = series_json(&sr);
    json_object_set_new(g, "key", json_string(gname));
    json_object_set_new(g, "totals", totals_json(tot));
    json_array_append_new(groups, g);
  }
  for (int64_t p = 0; p < points; p++)
    series_point(&all_sr, &all_pts[p], p == points - 1 ? last_secs : pt_secs);
  json_t *gauges = json_array();
  for (int gi = 0; gi < s->n_gkeys; gi++) {
    struct gkey *g = s->gkeys[gi];
    struct gslot *ring = fine ? g->fine : g->coarse;
    json_t *run = json_array(), *wait = json_array(), *kv = json_array(),
           *wmax = json_array();
    for (int64_t p = 0; p < points; p++) {
      double n = 0, sr = 0, sw = 0, sk = 0, mw = 0;
      for (int64_t e = first + p * per; e < first + (p + 1) * per; e++) {
        struct gslot *sl = &ring[e % ring_n];
        if (sl->epoch != e) continue;
        n += sl->n;
        sr += sl->running;
        sw += sl->waiting;
        sk += sl->kv;
        if (sl->waiting_max > mw) mw = sl->waiting_max;
      }
      json_array_append_new(run, n ? json_real(sr / n) : json_null());
      json_array_append_new(wait, n ? json_real(sw / n) : json_null());
      json_array_append_new(kv, n ? json_real(sk / n) : json_null());
      json_array_append_new(wmax, n ? json_real(mw) : json_null());
    }
    json_t *o = json_object();
    json_object_set_new(o, "model", json_string(g->model));
    json_object_set_new(o, "running", run);
    json_object_set_new(o, "waiting", wait);
    json_object_set_new(o, "waiting_max", wmax);
    json_object_set_new(o, "kv_used", kv);
    json_array_append_new(gauges, o);
  }
  pthread_mutex_unlock(&s->mu);
  json_t *a = series_json(&all_sr);
  json_object_set_new(a, "key", json_string("all"));
  json_object_set_new(a, "totals", totals_json(all));
  json_object_set_new(root, "all", a);
  json_object_set_new(root, "groups", groups);
  json_object_set_new(root, "gauges", gauges);
  char *out = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER |
                                   JSON_REAL_PRECISION(6));
  json_decref(root);
  free(pt);
  free(tot);
  free(all);
  free(all_pts);
  free(done);
  if (out && len) *len = strlen(out);
  return out;
oom:
  pthread_mutex_unlock(&s->mu);
  json_decref(root);
  json_decref(groups);
  json_decref(series_json(&all_sr)); /* frees its arrays */
  free(pt);
  free(tot);
  free(all);
  free(all_pts);
  free(done);
  return NULL;
}
