/*
 * test_obs.c: the metrics registry (src/obs/metrics.c): name checks,
 * counter/gauge/histogram values, cumulative buckets, escaping, exact sums
 * under concurrent updates, and the exact text a scrape returns. When the
 * project's venv has prometheus_client, the rendered text also goes through
 * its parser. Then the request log (writes, retention, reading back with
 * filters and paging) and the dashboard's live statistics (quantiles
 * against known distributions, ring slots reused, the key cap).
 */
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <unistd.h>

#include "obs/obs.h"
#include "tn_test.h"

static const double k_buckets[] = {0.1, 1, 10};

static void test_names(void) {
  struct tn_metrics *reg = tn_metrics_new();
  ASSERT(reg);
  const char *model[] = {"model"};
  /* metric names */
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "", "h", NULL, 0, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, NULL, "h", NULL, 0, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "1abc", "h", NULL, 0, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "a-b", "h", NULL, 0, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "a b", "h", NULL, 0, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "a\xc3\xa9", "h", NULL, 0, NULL, 0));
  ASSERT(tn_metrics_family(reg, TN_METRIC_COUNTER, "a:b_c1", "h", NULL, 0, NULL, 0));
  ASSERT(tn_metrics_family(reg, TN_METRIC_COUNTER, ":x", "h", NULL, 0, NULL, 0));
  ASSERT(tn_metrics_family(reg, TN_METRIC_COUNTER, "_x9", NULL, NULL, 0, NULL, 0));
  /* bad kind */
  ASSERT(!tn_metrics_family(reg, (enum tn_metric_kind)7, "k", "h", NULL, 0, NULL, 0));
  /* label names */
  const char *colon[] = {"a:b"};
  const char *digit[] = {"1a"};
  const char *reserved[] = {"__name"};
  const char *le[] = {"le"};
  const char *dup[] = {"model", "model"};
  const char *five[] = {"a", "b", "c", "d", "e"};
  const char *nullname[] = {NULL};
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g1", "h", colon, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g2", "h", digit, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g3", "h", reserved, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g4", "h", dup, 2, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g5", "h", five, 5, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g6", "h", nullname, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g7", "h", NULL, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "g8", "h", model, -1, NULL, 0));
  ASSERT(tn_metrics_family(reg, TN_METRIC_GAUGE, "g9", "h", le, 1, NULL, 0));
  ASSERT(tn_metrics_family(reg, TN_METRIC_GAUGE, "g10", "h", five, 4, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h1", "h", le, 1, k_buckets, 3));
  /* buckets */
  const double desc[] = {1, 0.5};
  const double same[] = {1, 1};
  const double inf[] = {1, INFINITY};
  const double nan[] = {NAN};
  double many[TN_METRIC_BUCKETS_MAX + 1];
  for (int i = 0; i <= TN_METRIC_BUCKETS_MAX; i++) many[i] = i;
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h2", "h", NULL, 0, desc, 2));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h3", "h", NULL, 0, same, 2));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h4", "h", NULL, 0, inf, 2));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h5", "h", NULL, 0, nan, 1));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h6", "h", NULL, 0, many,
                            TN_METRIC_BUCKETS_MAX + 1));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h7", "h", NULL, 0, NULL, 2));
  ASSERT(tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h8", "h", NULL, 0, many,
                           TN_METRIC_BUCKETS_MAX));
  ASSERT(tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h9", "h", NULL, 0, NULL, 0));
  /* a failed registration left nothing behind: the name is still free */
  ASSERT(tn_metrics_family(reg, TN_METRIC_GAUGE, "g1", "h", model, 1, NULL, 0));
  tn_metrics_free(reg);
}

static void test_reregister(void) {
  struct tn_metrics *reg = tn_metrics_new();
  const char *model[] = {"model"};
  const char *other[] = {"other"};
  const char *two[] = {"model", "outcome"};
  const double b2[] = {0.1, 2};
  struct tn_metric_family *c =
      tn_metrics_family(reg, TN_METRIC_COUNTER, "reqs", "h", model, 1, NULL, 0);
  ASSERT(c);
  ASSERT(tn_metrics_family(reg, TN_METRIC_COUNTER, "reqs", "other help", model,
                           1, NULL, 0) == c);
  ASSERT(!tn_metrics_family(reg, TN_METRIC_GAUGE, "reqs", "h", model, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "reqs", "h", other, 1, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "reqs", "h", two, 2, NULL, 0));
  ASSERT(!tn_metrics_family(reg, TN_METRIC_COUNTER, "reqs", "h", NULL, 0, NULL, 0));
  struct tn_metric_family *h = tn_metrics_family(
      reg, TN_METRIC_HISTOGRAM, "lat", "h", model, 1, k_buckets, 3);
  ASSERT(h);
  ASSERT(tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "lat", "h", model, 1,
                           k_buckets, 3) == h);
  ASSERT(!tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "lat", "h", model, 1,
                            b2, 2));
  /* still registered once */
  size_t len;
  char *text = tn_metrics_render(reg, &len);
  ASSERT(text);
  const char *first = strstr(text, "# TYPE reqs counter");
  ASSERT(first);
  ASSERT(!strstr(first + 1, "# TYPE reqs counter"));
  free(text);
  tn_metrics_free(reg);
}

static void test_series(void) {
  struct tn_metrics *reg = tn_metrics_new();
  const char *two[] = {"model", "outcome"};
  struct tn_metric_family *f =
      tn_metrics_family(reg, TN_METRIC_COUNTER, "r", "h", two, 2, NULL, 0);
  const char *v1[] = {"a", "ok"};
  const char *v1b[] = {"a", "ok"};
  const char *v2[] = {"a", "error"};
  const char *split1[] = {"ab", "c"};
  const char *split2[] = {"a", "bc"};
  const char *vnull[] = {"a", NULL};
  struct tn_metric *m1 = tn_metric_series(f, v1);
  ASSERT(m1);
  ASSERT(tn_metric_series(f, v1b) == m1);
  struct tn_metric *m2 = tn_metric_series(f, v2);
  ASSERT(m2 && m2 != m1);
  ASSERT(tn_metric_series(f, split1) != tn_metric_series(f, split2));
  ASSERT(!tn_metric_series(f, vnull));
  ASSERT(!tn_metric_series(f, NULL));
  ASSERT(!tn_metric_series(NULL, v1));
  /* pointers stay valid while many more series are created */
  tn_metric_add(m1, 1);
  char buf[32];
  for (int i = 0; i < 200; i++) {
    snprintf(buf, sizeof buf, "m%d", i);
    const char *v[] = {buf, "ok"};
    struct tn_metric *m = tn_metric_series(f, v);
    ASSERT(m);
    tn_metric_add(m, i);
  }
  tn_metric_add(m1, 1);
  ASSERT_NEAR(tn_metric_value(m1), 2, 0);
  const char *v199[] = {"m199", "ok"};
  ASSERT_NEAR(tn_metric_value(tn_metric_series(f, v199)), 199, 0);
  /* an unlabelled family has its one series from the start */
  struct tn_metric_family *g =
      tn_metrics_family(reg, TN_METRIC_GAUGE, "g", "h", NULL, 0, NULL, 0);
  struct tn_metric *gm = tn_metric_series(g, NULL);
  ASSERT(gm);
  ASSERT(tn_metric_series(g, NULL) == gm);
  /* updates on NULL are harmless */
  tn_metric_add(NULL, 1);
  tn_metric_set(NULL, 1);
  tn_metric_observe(NULL, 1);
  ASSERT_NEAR(tn_metric_value(NULL), 0, 0);
  tn_metrics_free(reg);
  tn_metrics_free(NULL);
}

static void test_values(void) {
  struct tn_metrics *reg = tn_metrics_new();
  struct tn_metric *c = tn_metric_series(
      tn_metrics_family(reg, TN_METRIC_COUNTER, "c", "h", NULL, 0, NULL, 0),
      NULL);
  struct tn_metric *g = tn_metric_series(
      tn_metrics_family(reg, TN_METRIC_GAUGE, "g", "h", NULL, 0, NULL, 0),
      NULL);
  struct tn_metric *h = tn_metric_series(
      tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "h", "h", NULL, 0, k_buckets,
                        3),
      NULL);
  ASSERT(c && g && h);
  ASSERT_NEAR(tn_metric_value(c), 0, 0);
  tn_metric_add(c, 1);
  tn_metric_add(c, 2.5);
  tn_metric_add(c, -1);   /* ignored: counters only go up */
  tn_metric_add(c, NAN);  /* ignored */
  tn_metric_set(c, 100);  /* ignored: not a gauge */
  tn_metric_observe(c, 1);
  ASSERT_NEAR(tn_metric_value(c), 3.5, 0);

  tn_metric_add(g, 5);
  tn_metric_add(g, -7);
  ASSERT_NEAR(tn_metric_value(g), -2, 0);
  tn_metric_set(g, 42.25);
  ASSERT_NEAR(tn_metric_value(g), 42.25, 0);
  tn_metric_observe(g, 1); /* ignored */
  ASSERT_NEAR(tn_metric_value(g), 42.25, 0);

  tn_metric_observe(h, 0.05);
  tn_metric_observe(h, 0.1); /* on the bound: le="0.1" */
  tn_metric_observe(h, 0.5);
  tn_metric_observe(h, 10);
  tn_metric_observe(h, 1e9);
  tn_metric_observe(h, -3);
  tn_metric_add(h, 1); /* ignored */
  tn_metric_set(h, 1); /* ignored */
  ASSERT_NEAR(tn_metric_value(h), 6, 0);

  size_t len = 0;
  char *text = tn_metrics_render(reg, &len);
  ASSERT(text);
  ASSERT_EQ(len, strlen(text));
  ASSERT_SUBSTR(text, "\nc 3.5\n");
  ASSERT_SUBSTR(text, "\ng 42.25\n");
  ASSERT_SUBSTR(text,
                "h_bucket{le=\"0.1\"} 3\n"
                "h_bucket{le=\"1\"} 4\n"
                "h_bucket{le=\"10\"} 5\n"
                "h_bucket{le=\"+Inf\"} 6\n"
                "h_sum 1000000007.65\n"
                "h_count 6\n");
  free(text);

  /* special values */
  tn_metric_set(g, INFINITY);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng +Inf\n");
  free(text);
  tn_metric_set(g, -INFINITY);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng -Inf\n");
  free(text);
  tn_metric_set(g, NAN);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng NaN\n");
  free(text);
  tn_metric_set(g, 0.1);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng 0.1\n");
  free(text);
  tn_metric_set(g, 1e300);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng 1e+300\n");
  free(text);
  tn_metric_set(g, 1.0 / 3);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng 0.3333333333333333\n");
  free(text);
  tn_metric_set(g, 123456789012345678.0);
  text = tn_metrics_render(reg, NULL);
  ASSERT_SUBSTR(text, "\ng 1.2345678901234568e+17\n");
  free(text);
  tn_metrics_free(reg);
}

static void test_cumulative(void) {
  struct tn_metrics *reg = tn_metrics_new();
  const double b[] = {1, 2, 3, 4, 5, 6, 7, 8};
  const char *lab[] = {"model"};
  const char *val[] = {"m"};
  struct tn_metric *h = tn_metric_series(
      tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "x", "h", lab, 1, b, 8), val);
  ASSERT(h);
  /* i observations of value i - 0.5 for i = 1..9 */
  for (int i = 1; i <= 9; i++)
    for (int k = 0; k < i; k++) tn_metric_observe(h, i - 0.5);
  char *text = tn_metrics_render(reg, NULL);
  ASSERT(text);
  int expect = 0;
  char line[128];
  for (int i = 1; i <= 9; i++) {
    expect += i;
    if (i <= 8)
      snprintf(line, sizeof line, "x_bucket{model=\"m\",le=\"%d\"} %d\n", i,
               expect);
    else
      snprintf(line, sizeof line, "x_bucket{model=\"m\",le=\"+Inf\"} %d\n",
               expect);
    ASSERT_SUBSTR(text, line);
  }
  ASSERT_SUBSTR(text, "x_count{model=\"m\"} 45\n");
  ASSERT_SUBSTR(text, "x_sum{model=\"m\"} 262.5\n"); /* sum i*(i-0.5) */
  /* counts never decrease down the bucket list */
  const char *p = text;
  long prev = -1;
  while ((p = strstr(p, "x_bucket{")) != NULL) {
    const char *sp = strchr(p, ' ');
    ASSERT(sp);
    long v = strtol(sp + 1, NULL, 10);
    ASSERT_GE(v, prev);
    prev = v;
    p = sp;
  }
  ASSERT_EQ(prev, 45);
  free(text);
  tn_metrics_free(reg);
}

static void test_escaping(void) {
  struct tn_metrics *reg = tn_metrics_new();
  const char *lab[] = {"model", "path"};
  struct tn_metric_family *f = tn_metrics_family(
      reg, TN_METRIC_COUNTER, "esc_total", "Line one\nback\\slash \"quoted\"",
      lab, 2, NULL, 0);
  ASSERT(f);
  const char *val[] = {"a\"b\\c\nd", ""};
  tn_metric_add(tn_metric_series(f, val), 2);
  char *text = tn_metrics_render(reg, NULL);
  ASSERT(text);
  ASSERT_SUBSTR(text,
                "# HELP esc_total Line one\\nback\\\\slash \"quoted\"\n");
  ASSERT_SUBSTR(text, "esc_total{model=\"a\\\"b\\\\c\\nd\",path=\"\"} 2\n");
  free(text);
  tn_metrics_free(reg);
}

static void test_render_shape(void) {
  struct tn_metrics *reg = tn_metrics_new();
  size_t len = 99;
  char *text = tn_metrics_render(reg, &len);
  ASSERT(text);
  ASSERT_EQ(len, 0);
  ASSERT_STR_EQ(text, "");
  free(text);

  const char *model[] = {"model"};
  const char *outcome[] = {"model", "outcome"};
  const double b[] = {0.005, 0.5, 2.5};
  struct tn_metric_family *req = tn_metrics_family(
      reg, TN_METRIC_COUNTER, "tern_requests_total", "Requests by outcome.",
      outcome, 2, NULL, 0);
  struct tn_metric_family *run = tn_metrics_family(
      reg, TN_METRIC_GAUGE, "tern_requests_running", "Running requests.",
      model, 1, NULL, 0);
  struct tn_metric_family *ttft = tn_metrics_family(
      reg, TN_METRIC_HISTOGRAM, "tern_time_to_first_token_seconds",
      "Time to first token.", model, 1, b, 3);
  struct tn_metric_family *up =
      tn_metrics_family(reg, TN_METRIC_GAUGE, "tern_up", NULL, NULL, 0, NULL, 0);
  struct tn_metric_family *empty = tn_metrics_family(
      reg, TN_METRIC_COUNTER, "tern_unused_total", "Never used.", model, 1,
      NULL, 0);
  ASSERT(req && run && ttft && up && empty);
  const char *s_ok[] = {"smollm2", "stop"};
  const char *s_len[] = {"smollm2", "length"};
  const char *s_m[] = {"smollm2"};
  const char *g_m[] = {"gemma"};
  tn_metric_add(tn_metric_series(req, s_ok), 3);
  tn_metric_add(tn_metric_series(req, s_len), 1);
  tn_metric_set(tn_metric_series(run, s_m), 2);
  tn_metric_set(tn_metric_series(run, g_m), 0);
  tn_metric_observe(tn_metric_series(ttft, s_m), 0.25);
  tn_metric_observe(tn_metric_series(ttft, s_m), 4);
  tn_metric_set(tn_metric_series(up, NULL), 1);
  text = tn_metrics_render(reg, &len);
  ASSERT(text);
  ASSERT_STR_EQ(
      text,
      "# HELP tern_requests_total Requests by outcome.\n"
      "# TYPE tern_requests_total counter\n"
      "tern_requests_total{model=\"smollm2\",outcome=\"stop\"} 3\n"
      "tern_requests_total{model=\"smollm2\",outcome=\"length\"} 1\n"
      "# HELP tern_requests_running Running requests.\n"
      "# TYPE tern_requests_running gauge\n"
      "tern_requests_running{model=\"smollm2\"} 2\n"
      "tern_requests_running{model=\"gemma\"} 0\n"
      "# HELP tern_time_to_first_token_seconds Time to first token.\n"
      "# TYPE tern_time_to_first_token_seconds histogram\n"
      "tern_time_to_first_token_seconds_bucket{model=\"smollm2\",le=\"0.005\"} 0\n"
      "tern_time_to_first_token_seconds_bucket{model=\"smollm2\",le=\"0.5\"} 1\n"
      "tern_time_to_first_token_seconds_bucket{model=\"smollm2\",le=\"2.5\"} 1\n"
      "tern_time_to_first_token_seconds_bucket{model=\"smollm2\",le=\"+Inf\"} 2\n"
      "tern_time_to_first_token_seconds_sum{model=\"smollm2\"} 4.25\n"
      "tern_time_to_first_token_seconds_count{model=\"smollm2\"} 2\n"
      "# TYPE tern_up gauge\n"
      "tern_up 1\n"
      "# HELP tern_unused_total Never used.\n"
      "# TYPE tern_unused_total counter\n");
  ASSERT_EQ(len, strlen(text));
  free(text);
  tn_metrics_free(reg);
}

/* ---- concurrency: 4 writers, 1 reader, exact totals */

enum { N_THREADS = 4, N_ITERS = 100000 };

struct conc {
  struct tn_metrics *reg;
  struct tn_metric_family *c, *g, *h;
  int id;
};

static void *writer(void *arg) {
  struct conc *k = arg;
  const char *shared[] = {"shared"};
  char own_name[16];
  snprintf(own_name, sizeof own_name, "t%d", k->id);
  const char *own[] = {own_name};
  for (int i = 0; i < N_ITERS; i++) {
    /* look the series up each time too: creation races with lookups */
    tn_metric_add(tn_metric_series(k->c, shared), 1);
    tn_metric_add(tn_metric_series(k->c, own), 0.5);
    tn_metric_add(tn_metric_series(k->g, shared), (i & 1) ? -1 : 2);
    tn_metric_observe(tn_metric_series(k->h, shared), (double)(i % 4));
  }
  return NULL;
}

static void *reader(void *arg) {
  struct conc *k = arg;
  for (int i = 0; i < 50; i++) {
    char *text = tn_metrics_render(k->reg, NULL);
    if (!text) return (void *)1;
    /* within one scrape, _count equals the +Inf bucket */
    const char *inf = strstr(text, "lat_bucket{model=\"shared\",le=\"+Inf\"} ");
    const char *cnt = strstr(text, "lat_count{model=\"shared\"} ");
    if (inf && cnt) {
      long a = strtol(strchr(inf, '}') + 2, NULL, 10);
      long b = strtol(strchr(cnt, '}') + 2, NULL, 10);
      if (a != b) {
        free(text);
        return (void *)1;
      }
    }
    free(text);
  }
  return NULL;
}

static void test_concurrent(void) {
  struct tn_metrics *reg = tn_metrics_new();
  const char *model[] = {"model"};
  const double b[] = {0.5, 1.5, 2.5};
  struct conc base = {
      .reg = reg,
      .c = tn_metrics_family(reg, TN_METRIC_COUNTER, "n_total", "h", model, 1,
                             NULL, 0),
      .g = tn_metrics_family(reg, TN_METRIC_GAUGE, "level", "h", model, 1,
                             NULL, 0),
      .h = tn_metrics_family(reg, TN_METRIC_HISTOGRAM, "lat", "h", model, 1,
                             b, 3),
  };
  ASSERT(base.c && base.g && base.h);
  struct conc ks[N_THREADS + 1];
  pthread_t th[N_THREADS + 1];
  for (int i = 0; i <= N_THREADS; i++) {
    ks[i] = base;
    ks[i].id = i;
    ASSERT_EQ(pthread_create(&th[i], NULL, i < N_THREADS ? writer : reader,
                             &ks[i]),
              0);
  }
  void *rc[N_THREADS + 1];
  for (int i = 0; i <= N_THREADS; i++) pthread_join(th[i], &rc[i]);
  ASSERT(rc[N_THREADS] == NULL);

  const char *shared[] = {"shared"};
  ASSERT_NEAR(tn_metric_value(tn_metric_series(base.c, shared)),
              (double)N_THREADS * N_ITERS, 0);
  for (int i = 0; i < N_THREADS; i++) {
    char name[16];
    snprintf(name, sizeof name, "t%d", i);
    const char *own[] = {name};
    ASSERT_NEAR(tn_metric_value(tn_metric_series(base.c, own)),
                N_ITERS * 0.5, 0);
  }
  ASSERT_NEAR(tn_metric_value(tn_metric_series(base.g, shared)),
              (double)N_THREADS * N_ITERS / 2, 0);
  ASSERT_NEAR(tn_metric_value(tn_metric_series(base.h, shared)),
              (double)N_THREADS * N_ITERS, 0);
  char *text = tn_metrics_render(reg, NULL);
  ASSERT(text);
  char line[128];
  int q = N_THREADS * N_ITERS / 4; /* per value 0, 1, 2, 3 */
  snprintf(line, sizeof line, "lat_bucket{model=\"shared\",le=\"0.5\"} %d\n", q);
  ASSERT_SUBSTR(text, line);
  snprintf(line, sizeof line, "lat_bucket{model=\"shared\",le=\"2.5\"} %d\n",
           3 * q);
  ASSERT_SUBSTR(text, line);
  snprintf(line, sizeof line, "lat_sum{model=\"shared\"} %d\n", 6 * q);
  ASSERT_SUBSTR(text, line);
  snprintf(line, sizeof line, "lat_count{model=\"shared\"} %d\n", 4 * q);
  ASSERT_SUBSTR(text, line);
  free(text);
  tn_metrics_free(reg);
}

/* ---- the real parser, when the venv has it */

static const char k_parse_py[] =
    "import sys\n"
    "from prometheus_client.parser import text_string_to_metric_families\n"
    "fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}\n"
    "assert fams['tern_requests'].type == 'counter', fams.keys()\n"
    "s = [x for x in fams['tern_requests'].samples]\n"
    "assert s[0].labels == {'model': 'a\"b\\\\c\\nd', 'outcome': 'stop'}, s[0]\n"
    "assert s[0].value == 3\n"
    "h = fams['tern_ttft_seconds']\n"
    "assert h.type == 'histogram'\n"
    "b = [x for x in h.samples if x.name.endswith('_bucket')]\n"
    "assert [x.labels['le'] for x in b] == ['0.005', '0.5', '2.5', '+Inf'], b\n"
    "assert [x.value for x in b] == [0, 1, 1, 2], b\n"
    "g = fams['tern_gauge'].samples\n"
    "import math\n"
    "assert g[0].value == math.inf and g[1].value == -math.inf\n"
    "assert math.isnan(g[2].value) and g[3].value == 0.1\n"
    "print('parsed', len(fams), 'families')\n";

static void test_prometheus_parser(void) {
  char py[1024];
  snprintf(py, sizeof py, "%s/.venv/bin/python", TN_SOURCE_DIR);
  if (access(py, X_OK) != 0) TN_SKIP("no %s (make venv)", py);
  char cmd[2048];
  snprintf(cmd, sizeof cmd,
           "'%s' -c 'import prometheus_client' 2>/dev/null", py);
  if (system(cmd) != 0) TN_SKIP("the venv has no prometheus_client");
  char script[] = "/tmp/tn_obs_parse_XXXXXX";
  int fd = mkstemp(script);
  ASSERT(fd >= 0);
  ASSERT_EQ(write(fd, k_parse_py, sizeof k_parse_py - 1),
            (long)(sizeof k_parse_py - 1));
  close(fd);

  struct tn_metrics *reg = tn_metrics_new();
  const char *lab[] = {"model", "outcome"};
  const char *model[] = {"model"};
  const char *gl[] = {"i"};
  const double b[] = {0.005, 0.5, 2.5};
  struct tn_metric_family *req = tn_metrics_family(
      reg, TN_METRIC_COUNTER, "tern_requests_total", "Requests,\nby \\ outcome.",
      lab, 2, NULL, 0);
  struct tn_metric_family *ttft = tn_metrics_family(
      reg, TN_METRIC_HISTOGRAM, "tern_ttft_seconds", "TTFT.", model, 1, b, 3);
  struct tn_metric_family *g = tn_metrics_family(
      reg, TN_METRIC_GAUGE, "tern_gauge", "Specials.", gl, 1, NULL, 0);
  const char *v[] = {"a\"b\\c\nd", "stop"};
  const char *m[] = {"m"};
  tn_metric_add(tn_metric_series(req, v), 3);
  tn_metric_observe(tn_metric_series(ttft, m), 0.25);
  tn_metric_observe(tn_metric_series(ttft, m), 4);
  const char *g0[] = {"0"}, *g1[] = {"1"}, *g2[] = {"2"}, *g3[] = {"3"};
  tn_metric_set(tn_metric_series(g, g0), INFINITY);
  tn_metric_set(tn_metric_series(g, g1), -INFINITY);
  tn_metric_set(tn_metric_series(g, g2), NAN);
  tn_metric_set(tn_metric_series(g, g3), 0.1);
  size_t len;
  char *text = tn_metrics_render(reg, &len);
  tn_metrics_free(reg);
  if (!text) {
    unlink(script);
    ASSERT(text);
  }
  snprintf(cmd, sizeof cmd, "'%s' '%s'", py, script);
  FILE *p = popen(cmd, "w");
  if (!p) {
    free(text);
    unlink(script);
    ASSERT(p);
  }
  fwrite(text, 1, len, p);
  int st = pclose(p);
  free(text);
  unlink(script);
  ASSERT_EQ(st, 0);
}

/* ---- request log */

static int64_t count_rows(const char *path, const char *where) {
  sqlite3 *h = NULL;
  int64_t n = -1;
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT COUNT(*) FROM requests %s", where);
  if (sqlite3_open_v2(path, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
      n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
  }
  sqlite3_close(h);
  return n;
}

static void test_reqlog(void) {
  char dir[] = "/tmp/tern-reqlog-XXXXXX";
  ASSERT(mkdtemp(dir) != NULL);
  char path[128];
  snprintf(path, sizeof path, "%s/log.db", dir);
  struct tn_metrics *m = tn_metrics_new();
  struct tn_reqlog_config cfg = {.path = path, .content = true};
  struct tn_reqlog *l = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_reqlog_open(&cfg, m, &l, &err), TN_OK);
  /* strings with quotes, NULs cut at their length, missing values */
  const char prompt[] = "{\"q\": \"it's\"}";
  for (int i = 0; i < 100; i++) {
    struct tn_reqlog_row r = {
        .ts_ms = 1000 + i, .request_id = "chatcmpl-x", .endpoint = "/v1/x",
        .model = i % 2 ? "a" : "b'); DROP TABLE requests; --",
        .status = i % 10 ? 200 : 500, .finish = "stop",
        .error = i % 10 ? NULL : "boom", .prompt_tokens = i,
        .cached_tokens = 0, .completion_tokens = 2 * i, .queue_s = 0.001,
        .ttft_s = 0.01, .itl_mean_s = -1, .itl_max_s = -1, .e2e_s = 0.5,
        .prompt = prompt, .prompt_len = sizeof prompt - 1,
        .output = "out", .output_len = 3};
    tn_reqlog_add(l, &r);
  }
  tn_reqlog_flush(l);
  ASSERT_EQ(count_rows(path, ""), 100);
  ASSERT_EQ(count_rows(path, "WHERE status = 500 AND error = 'boom'"), 10);
  ASSERT_EQ(count_rows(path, "WHERE model = 'a' AND completion_tokens % 2 = 0"),
            50);
  ASSERT_EQ(count_rows(path, "WHERE itl_mean_ms IS NULL AND ttft_ms = 10.0"),
            100);
  ASSERT_EQ(count_rows(path, "WHERE prompt = '{\"q\": \"it''s\"}'"), 100);
  tn_reqlog_close(l);
  /* reopened with a row cap: the oldest go at once */
  cfg.max_rows = 30;
  cfg.content = false;
  ASSERT_EQ(tn_reqlog_open(&cfg, NULL, &l, &err), TN_OK);
  ASSERT_EQ(count_rows(path, ""), 30);
  ASSERT_EQ(count_rows(path, "WHERE ts >= 1070"), 30);
  /* without content: no text stored */
  struct tn_reqlog_row r = {.ts_ms = 5000, .prompt = "secret",
                            .prompt_len = 6, .prompt_tokens = -1,
                            .cached_tokens = -1, .completion_tokens = -1,
                            .queue_s = -1, .ttft_s = -1, .itl_mean_s = -1,
                            .itl_max_s = -1, .e2e_s = -1};
  tn_reqlog_add(l, &r);
  tn_reqlog_flush(l);
  ASSERT_EQ(count_rows(path, "WHERE ts = 5000 AND prompt IS NULL AND "
                             "prompt_tokens IS NULL"), 1);
  tn_reqlog_close(l);
  /* a path that cannot be a database: a clear error */
  cfg.path = dir;
  ASSERT_NE(tn_reqlog_open(&cfg, NULL, &l, &err), TN_OK);
  ASSERT(l == NULL);
  ASSERT_SUBSTR(err.msg, "--log-db");
  /* metrics counted the first 100 rows */
  size_t len = 0;
  char *text = tn_metrics_render(m, &len);
  ASSERT_SUBSTR(text, "tern_request_log_rows_total 100");
  free(text);
  tn_metrics_free(m);
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ASSERT_EQ(system(cmd), 0);
}


static char *stored_text(const char *path, const char *col) {
  sqlite3 *h = NULL;
  char *out = NULL;
  if (sqlite3_open(path, &h) == SQLITE_OK) {
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT %s FROM requests LIMIT 1", col);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
      out = strdup((const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
  }
  sqlite3_close(h);
  return out;
}

/* --log-redact: presets and patterns, on the writer, before storing */
static void test_reqlog_redact(void) {
  char dir[] = "/tmp/tern-reqlog-XXXXXX";
  ASSERT(mkdtemp(dir) != NULL);
  char path[128];
  snprintf(path, sizeof path, "%s/log.db", dir);
  const char *const pats[] = {"email", "secret", "card", "id-[0-9]{3}"};
  struct tn_reqlog_config cfg = {.path = path, .content = true,
                                 .redact = pats, .n_redact = 4};
  struct tn_reqlog *l = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_reqlog_open(&cfg, NULL, &l, &err), TN_OK);
  const char prompt[] =
      "mail bob.smith@example.co.uk, key sk-proj_abcdefghijklmnop1234, "
      "card 4111 1111 1111 1111, id-123 and id-12";
  const char output[] = "ok \xff\xfe bob@x.io"; /* invalid UTF-8 too */
  struct tn_reqlog_row r = {
      .ts_ms = 1, .prompt = prompt, .prompt_len = sizeof prompt - 1,
      .output = output, .output_len = sizeof output - 1,
      .prompt_tokens = -1, .cached_tokens = -1, .completion_tokens = -1,
      .queue_s = -1, .ttft_s = -1, .itl_mean_s = -1, .itl_max_s = -1,
      .e2e_s = -1, .cost = -1};
  tn_reqlog_add(l, &r);
  tn_reqlog_flush(l);
  tn_reqlog_close(l);
  char *p = stored_text(path, "prompt"), *o = stored_text(path, "output");
  ASSERT(p != NULL && o != NULL);
  ASSERT_STR_EQ(p, "mail [REDACTED], key [REDACTED], card [REDACTED], "
                   "[REDACTED] and id-12");
  ASSERT_SUBSTR(o, "[REDACTED]");
  ASSERT(strstr(o, "bob@") == NULL);
  free(p);
  free(o);
  /* a pattern that does not compile: an error naming it */
  const char *const bad[] = {"email", "(unclosed"};
  cfg.redact = bad;
  cfg.n_redact = 2;
  ASSERT_NE(tn_reqlog_open(&cfg, NULL, &l, &err), TN_OK);
  ASSERT_SUBSTR(err.msg, "--log-redact '(unclosed'");
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ASSERT_EQ(system(cmd), 0);
}

/* W3C traceparent: what is honoured and what is not */
static void test_traceparent(void) {
  struct tn_trace_ctx c;
  ASSERT(tn_traceparent_parse(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", &c));
  ASSERT(c.has_parent && c.sampled);
  ASSERT_EQ(c.trace_id[0], 0x4b);
  ASSERT_EQ(c.trace_id[15], 0x36);
  ASSERT_EQ(c.parent[7], 0xb7);
  ASSERT(tn_traceparent_parse(
      " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ", &c));
  ASSERT(!c.sampled);
  /* a later version may carry more fields after a dash */
  ASSERT(tn_traceparent_parse(
      "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ext", &c));
  static const char *const bad[] = {
      NULL, "", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
      "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
      "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01"};
  for (size_t i = 0; i < TN_ARRAY_LEN(bad); i++) {
    ASSERT(!tn_traceparent_parse(bad[i], &c));
    ASSERT(!c.has_parent);
  }
  /* fresh contexts: random, sampled by ratio */
  struct tn_trace_ctx a, b;
  tn_trace_ctx_new(&a, 1);
  tn_trace_ctx_new(&b, 1);
  ASSERT(a.sampled && !a.has_parent);
  ASSERT(memcmp(a.trace_id, b.trace_id, 16) != 0);
  int n = 0;
  for (int i = 0; i < 2000; i++) {
    tn_trace_ctx_new(&a, 0.25);
    n += a.sampled;
  }
  ASSERT(n > 350 && n < 650);
  tn_trace_ctx_new(&a, 0);
  ASSERT(!a.sampled);
}

static bool count_cb(void *user, json_t *o) {
  (void)o;
  (*(int *)user)++;
  return true;
}

struct last_row {
  int64_t ts, id;
  int n;
};

static bool last_cb(void *user, json_t *o) {
  struct last_row *l = user;
  l->ts = json_integer_value(json_object_get(o, "ts"));
  l->id = json_integer_value(json_object_get(o, "id"));
  l->n++;
  return true;
}

/* tn_reqlog_read: filters are bound values, paging walks every row once */
static void test_reqlog_read(void) {
  char dir[] = "/tmp/tern-reqlog-XXXXXX";
  ASSERT(mkdtemp(dir) != NULL);
  char path[128];
  snprintf(path, sizeof path, "%s/log.db", dir);
  struct tn_reqlog_config cfg = {.path = path, .content = true};
  struct tn_reqlog *l = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_reqlog_open(&cfg, NULL, &l, &err), TN_OK);
  for (int i = 0; i < 120; i++) {
    char id[32];
    snprintf(id, sizeof id, "req-%d", i);
    struct tn_reqlog_row r = {
        .ts_ms = 1000 + i / 3, /* ties: paging must order by id too */
        .request_id = id, .endpoint = "/v1/x",
        .model = i % 2 ? "a" : "b' OR 1=1 --", .status = i % 4 ? 200 : 404,
        .prompt_tokens = -1, .cached_tokens = -1, .completion_tokens = i,
        .queue_s = -1, .ttft_s = -1, .itl_mean_s = -1, .itl_max_s = -1,
        .e2e_s = -1, .cost = i % 2 ? 0.5 : -1, .prompt = "p",
        .prompt_len = 1};
    tn_reqlog_add(l, &r);
  }
  tn_reqlog_flush(l);
  ASSERT_STR_EQ(tn_reqlog_path(l), path);
  struct tn_reqlog_filter f;
  tn_reqlog_filter_init(&f);
  f.limit = 0;
  int n = 0;
  ASSERT_EQ(tn_reqlog_read(path, &f, count_cb, &n, &err), TN_OK);
  ASSERT_EQ(n, 120);
  f.model = "b' OR 1=1 --";
  n = 0;
  ASSERT_EQ(tn_reqlog_read(path, &f, count_cb, &n, &err), TN_OK);
  ASSERT_EQ(n, 60);
  f.model = "%";
  n = 0;
  ASSERT_EQ(tn_reqlog_read(path, &f, count_cb, &n, &err), TN_OK);
  ASSERT_EQ(n, 0);
  f.model = NULL;
  ASSERT(tn_reqlog_parse_status("4xx", &f));
  n = 0;
  ASSERT_EQ(tn_reqlog_read(path, &f, count_cb, &n, &err), TN_OK);
  ASSERT_EQ(n, 30);
  ASSERT(!tn_reqlog_parse_status("4x", &f));
  ASSERT(!tn_reqlog_parse_status("600", &f));
  ASSERT(tn_reqlog_parse_status("error", &f));
  ASSERT(f.errors);
  tn_reqlog_filter_init(&f);
  f.request_id = "req-7";
  f.limit = 0;
  n = 0;
  ASSERT_EQ(tn_reqlog_read(path, &f, count_cb, &n, &err), TN_OK);
  ASSERT_EQ(n, 1);
  /* pages of 7 over rows with equal timestamps: 120 rows, each once */
  tn_reqlog_filter_init(&f);
  f.limit = 7;
  int total = 0, pages = 0;
  for (;;) {
    struct last_row lr = {0};
    ASSERT_EQ(tn_reqlog_read(path, &f, last_cb, &lr, &err), TN_OK);
    total += lr.n;
    pages++;
    if (lr.n < 7) break;
    f.before_ts = lr.ts;
    f.before_id = lr.id;
  }
  ASSERT_EQ(total, 120);
  ASSERT_EQ(pages, 18);
  tn_reqlog_close(l);
  /* a missing database: an error naming it */
  char missing[160];
  snprintf(missing, sizeof missing, "%s/none.db", dir);
  ASSERT_NE(tn_reqlog_read(missing, &f, count_cb, &n, &err), TN_OK);
  ASSERT_SUBSTR(err.msg, "none.db");
  double d;
  ASSERT(tn_parse_duration("15m", &d) && d == 900);
  ASSERT(tn_parse_duration("2h", &d) && d == 7200);
  ASSERT(!tn_parse_duration("-1h", &d));
  ASSERT(!tn_parse_duration("1y", &d));
  ASSERT(!tn_parse_duration("", &d));
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ASSERT_EQ(system(cmd), 0);
}

static json_t *stats_at(struct tn_stats *s, double now, double window,
                        const char *by) {
  size_t len = 0;
  char *text = tn_stats_json(s, now, window, by, &len);
  json_error_t je;
  json_t *o = text && len == strlen(text) ? json_loads(text, 0, &je) : NULL;
  free(text);
  if (!o) {
    fprintf(stderr, "tn_stats_json: no valid JSON\n");
    abort();
  }
  return o;
}

static double total(json_t *o, const char *what) {
  json_t *v = json_object_get(json_object_get(json_object_get(o, "all"),
                                              "totals"),
                              what);
  return json_is_integer(v) ? (double)json_integer_value(v)
                            : json_real_value(v);
}

static struct tn_reqlog_row stats_row(const char *model, const char *tenant,
                                      int status, double ttft) {
  struct tn_reqlog_row r = {
      .model = model, .tenant = tenant, .status = status,
      .prompt_tokens = 10, .cached_tokens = 4, .completion_tokens = 5,
      .queue_s = -1, .ttft_s = ttft, .itl_mean_s = -1, .itl_max_s = -1,
      .e2e_s = ttft >= 0 ? 2 * ttft : -1, .cost = 0.001};
  return r;
}

static void test_stats(void) {
  /* buckets: monotonic, ratio 2^(1/3) */
  ASSERT_EQ(tn_lat_bucket(0), 0);
  ASSERT_EQ(tn_lat_bucket(NAN), 0);
  ASSERT_EQ(tn_lat_bucket(1e-4), 1);
  ASSERT_EQ(tn_lat_bucket(1e9), TN_LAT_BUCKETS - 1);
  for (double v = 1e-4; v < 1000; v *= 1.01)
    ASSERT(tn_lat_bucket(v) <= tn_lat_bucket(v * 1.01));
  ASSERT_EQ(tn_lat_bucket(0.8e-3), 10); /* 0.1 ms * 2^3 = 0.8 ms */

  struct tn_stats *s = tn_stats_new();
  ASSERT(s != NULL);
  const double t0 = 1.8e9;
  /* 1000 requests, TTFT uniform over 10..1000 ms, within one minute */
  for (int i = 0; i < 1000; i++) {
    struct tn_reqlog_row r = stats_row("m", NULL, 200, 0.010 + 0.99 * i / 999.0);
    tn_stats_add(s, t0 + (i % 50), &r, NULL);
  }
  json_t *o = stats_at(s, t0 + 60, 900, "model");
  ASSERT_EQ(total(o, "requests"), 1000);
  ASSERT_EQ(total(o, "prompt_tokens"), 10000);
  ASSERT_EQ(total(o, "cached_tokens"), 4000);
  ASSERT_EQ(total(o, "completion_tokens"), 5000);
  ASSERT(fabs(total(o, "cost") - 1.0) < 1e-9);
  ASSERT(fabs(total(o, "prefix_hit_rate") - 0.4) < 1e-9);
  double p50 = json_real_value(json_object_get(
      json_object_get(json_object_get(json_object_get(o, "all"), "totals"),
                      "ttft_ms"),
      "p50"));
  double p99 = json_real_value(json_object_get(
      json_object_get(json_object_get(json_object_get(o, "all"), "totals"),
                      "ttft_ms"),
      "p99"));
  ASSERT(fabs(p50 - 505) / 505 < 0.15);
  ASSERT(fabs(p99 - 990) / 990 < 0.15);
  /* 900 one-second slots: 300 points of 3 s; the rates add up */
  ASSERT_EQ(json_integer_value(json_object_get(o, "points")), 300);
  ASSERT_EQ(json_integer_value(json_object_get(o, "step_s")), 3);
  json_t *rps = json_object_get(json_object_get(o, "all"), "requests_per_s");
  double sum = 0;
  for (size_t i = 0; i < json_array_size(rps); i++)
    sum += json_real_value(json_array_get(rps, i)) * 3;
  ASSERT(fabs(sum - 1000) < 0.01); /* 6 significant digits */
  json_decref(o);
  /* 1000 s later the second ring has nothing, the minute ring all of it */
  o = stats_at(s, t0 + 1000, 900, "model");
  ASSERT_EQ(total(o, "requests"), 0);
  ASSERT(json_is_null(json_object_get(
      json_object_get(json_object_get(json_object_get(o, "all"), "totals"),
                      "ttft_ms"),
      "p50")));
  json_decref(o);
  o = stats_at(s, t0 + 1000, 3600, "none");
  ASSERT_EQ(total(o, "requests"), 1000);
  ASSERT_EQ(json_integer_value(json_object_get(o, "step_s")), 60);
  json_decref(o);
  /* a second-ring slot reused 900 s later holds only the new request */
  struct tn_reqlog_row late = stats_row("m", NULL, 200, 0.5);
  tn_stats_add(s, t0 + 925, &late, NULL); /* t0 + 25's slot: 20 there */
  o = stats_at(s, t0 + 926, 60, "model");
  ASSERT_EQ(total(o, "requests"), 1);
  json_decref(o);
  /* 24 hours later: gone from both rings */
  o = stats_at(s, t0 + 2 * 86400, 86400, "model");
  ASSERT_EQ(total(o, "requests"), 0);
  json_decref(o);
  tn_stats_free(s);

  /* errors by type; groups by tenant; at most TN_STATS_KEYS_MAX keys */
  s = tn_stats_new();
  static const int codes[] = {200, 400, 401, 404, 429, 500, 503, 0};
  for (int i = 0; i < 8; i++) {
    struct tn_reqlog_row r = stats_row("m", "t", codes[i], -1);
    tn_stats_add(s, t0, &r, NULL);
  }
  struct tn_reqlog_row cut = stats_row("m", "t", 200, 0.1);
  cut.finish = "cancelled";
  tn_stats_add(s, t0, &cut, NULL);
  for (int i = 0; i < 300; i++) {
    char tenant[16];
    snprintf(tenant, sizeof tenant, "t%d", i);
    struct tn_reqlog_row r = stats_row("m", tenant, 200, 0.1);
    uint32_t itl[TN_LAT_BUCKETS] = {0};
    itl[tn_lat_bucket(0.02)] = 10;
    tn_stats_add(s, t0, &r, itl);
  }
  o = stats_at(s, t0 + 1, 300, "tenant");
  ASSERT_EQ(total(o, "requests"), 309);
  ASSERT_EQ(total(o, "errors"), 8);
  json_t *eb = json_object_get(
      json_object_get(json_object_get(o, "all"), "totals"), "errors_by_type");
  ASSERT_EQ(json_integer_value(json_object_get(eb, "invalid_request")), 1);
  ASSERT_EQ(json_integer_value(json_object_get(eb, "auth")), 1);
  ASSERT_EQ(json_integer_value(json_object_get(eb, "not_found")), 1);
  ASSERT_EQ(json_integer_value(json_object_get(eb, "overloaded")), 2);
  ASSERT_EQ(json_integer_value(json_object_get(eb, "server")), 1);
  ASSERT_EQ(json_integer_value(json_object_get(eb, "cancelled")), 2);
  json_t *groups = json_object_get(o, "groups");
  ASSERT_EQ(json_array_size(groups), TN_STATS_KEYS_MAX);
  json_t *other = json_array_get(groups, TN_STATS_KEYS_MAX - 1);
  ASSERT_STR_EQ(json_string_value(json_object_get(other, "key")), "(other)");
  /* every ITL gap counted: 3000 gaps of 20 ms */
  double itl50 = json_real_value(json_object_get(
      json_object_get(json_object_get(json_object_get(o, "all"), "totals"),
                      "itl_ms"),
      "p50"));
  ASSERT(itl50 > 20 / 1.26 && itl50 < 20 * 1.26);
  json_decref(o);
  o = stats_at(s, t0 + 1, 300, "model");
  ASSERT_EQ(json_array_size(json_object_get(o, "groups")), 1);
  json_decref(o);
  /* gauges: the mean over a point */
  tn_stats_gauges(s, t0, "m", 2, 4, 0.5);
  tn_stats_gauges(s, t0 + 0.5, "m", 4, 0, 0.25);
  o = stats_at(s, t0 + 1, 60, "none");
  json_t *g = json_array_get(json_object_get(o, "gauges"), 0);
  json_t *run = json_object_get(g, "running");
  ASSERT_EQ(json_array_size(run), 60);
  ASSERT(fabs(json_real_value(json_array_get(run, 59)) - 3) < 1e-6);
  ASSERT(fabs(json_real_value(json_array_get(json_object_get(g, "kv_used"),
                                             59)) - 0.375) < 1e-6);
  ASSERT(json_is_null(json_array_get(run, 0)));
  json_decref(o);
  tn_stats_free(s);
}

TN_TEST_MAIN(TN_TEST(test_names), TN_TEST(test_reregister),
             TN_TEST(test_series), TN_TEST(test_values),
             TN_TEST(test_cumulative), TN_TEST(test_escaping),
             TN_TEST(test_render_shape), TN_TEST(test_concurrent),
             TN_TEST(test_prometheus_parser), TN_TEST(test_reqlog),
             TN_TEST(test_reqlog_read), TN_TEST(test_reqlog_redact),
             TN_TEST(test_stats), TN_TEST(test_traceparent))
