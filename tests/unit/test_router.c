/*
 * test_router.c: routes and upstreams in the config (src/server/config.c)
 * and the router's plans, balance, breakers and cascade signals
 * (src/router/router.c). The upstream relay itself is tested end to end
 * (tests/e2e/test_routing.py), against a real faulty server.
 */
#include <math.h>
#include <stdlib.h>

#include "router/router.h"
#include "server/config.h"
#include "tn_test.h"

static enum tn_status parse(const char *text, struct tn_serve_config *cfg,
                            struct tn_error *err) {
  return tn_serve_config_parse(text, strlen(text), "r.yaml", cfg, err);
}

/* A config that must be refused: head plus text, failing with msg. */
struct bad_case {
  const char *text, *msg;
};

static void expect_bad(const struct bad_case *bad, size_t n) {
  for (size_t i = 0; i < n; i++) {
    char text[1024];
    snprintf(text, sizeof text, "models:\n  - {name: m, path: m.gguf}\n%s",
             bad[i].text);
    struct tn_serve_config cfg;
    struct tn_error err = {0};
    enum tn_status st = parse(text, &cfg, &err);
    if (st != TN_EINVAL || !strstr(err.msg, bad[i].msg))
      fprintf(stderr, "case %zu: status %d, message: %s\n", i, st, err.msg);
    ASSERT_EQ(st, TN_EINVAL);
    ASSERT_SUBSTR(err.msg, bad[i].msg);
    ASSERT_SUBSTR(err.msg, "r.yaml:");
    ASSERT(cfg.routes == NULL && cfg.upstreams == NULL);
  }
}

static const char k_cfg[] =
    "models:\n"
    "  - {name: small, path: s.gguf, aliases: [tiny]}\n"
    "  - {name: big, path: b.gguf}\n"
    "upstreams:\n"
    "  - name: remote\n"
    "    base_url: http://127.0.0.1:9/v1/\n"
    "    model: gpt-x\n"
    "    api_key_env: TN_TEST_ROUTER_KEY\n"
    "    timeout_s: 30\n"
    "    connect_timeout_s: 2.5\n"
    "    stall_timeout_s: 4\n"
    "    retries: 2\n"
    "    max_concurrent: 2\n"
    "    price_prompt: 0.5\n"
    "    price_completion: 1.5\n"
    "  - {name: remote2, base_url: 'https://api.example.com/v1'}\n"
    "routes:\n"
    "  - name: auto\n"
    "    strategy: rules\n"
    "    rules:\n"
    "      - {regex: '(?i)\\bpython\\b', to: big}\n"
    "      - {keywords: [SQL, regex], to: remote}\n"
    "      - {tools: true, to: safe}\n"
    "      - {header: X-Tier, header_regex: '^gold$', to: big}\n"
    "      - {user: '^team-a', to: pool}\n"
    "      - {min_tokens: 100, to: big}\n"
    "      - {max_tokens: 3, response_format: true, to: remote2}\n"
    "      - {to: tiny}\n"
    "  - {name: safe, strategy: fallback, targets: [remote, remote2, small]}\n"
    "  - {name: pool, strategy: balance, targets: [small, big, remote]}\n"
    "  - name: casc\n"
    "    strategy: cascade\n"
    "    stages:\n"
    "      - {model: small, signal: quantile, quantile: 0.25, threshold: 0.5}\n"
    "      - {model: big, signal: margin, threshold: -.inf}\n"
    "      - {model: remote}\n"
    "  - {name: strict, strategy: rules, rules: [{regex: '^x$', to: small}]}\n";

static void test_config_routes(void) {
  setenv("TN_TEST_ROUTER_KEY", "sk-test", 1);
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = parse(k_cfg, &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(cfg.n_upstreams, 2);
  const struct tn_serve_upstream_cfg *u = &cfg.upstreams[0];
  ASSERT_STR_EQ(u->base_url, "http://127.0.0.1:9/v1"); /* '/' trimmed */
  ASSERT_STR_EQ(u->model, "gpt-x");
  ASSERT_STR_EQ(u->api_key, "sk-test");
  ASSERT(u->timeout_s == 30 && u->connect_timeout_s == 2.5 &&
         u->stall_timeout_s == 4);
  ASSERT_EQ(u->retries, 2);
  ASSERT_EQ(u->max_concurrent, 2);
  ASSERT(u->price_prompt == 0.5 && u->price_completion == 1.5);
  u = &cfg.upstreams[1];
  ASSERT_STR_EQ(u->model, "remote2"); /* defaults to the name */
  ASSERT(u->api_key == NULL && u->retries == 0 && u->max_concurrent == 64);
  ASSERT(u->timeout_s == 600 && u->price_prompt < 0);
  ASSERT_EQ(cfg.n_routes, 5);
  ASSERT_EQ(cfg.routes[0].strategy, TN_ROUTE_RULES);
  ASSERT_EQ(cfg.routes[0].n_rules, 8);
  ASSERT_EQ(cfg.routes[0].rules[1].n_keywords, 2);
  ASSERT_EQ(cfg.routes[0].rules[5].min_tokens, 100);
  ASSERT_EQ(cfg.routes[0].rules[6].response_format, 1);
  ASSERT_EQ(cfg.routes[0].rules[0].tools, -1);
  ASSERT_EQ(cfg.routes[3].strategy, TN_ROUTE_CASCADE);
  ASSERT_EQ(cfg.routes[3].n_stages, 3);
  ASSERT(cfg.routes[3].stages[0].quantile == 0.25);
  ASSERT(isinf(cfg.routes[3].stages[1].threshold) &&
         cfg.routes[3].stages[1].threshold < 0);
  ASSERT(!cfg.routes[3].stages[2].has_signal);
  ASSERT_EQ(tn_serve_config_find_route(&cfg, "pool"), 2);
  ASSERT_EQ(tn_serve_config_find_upstream(&cfg, "remote2"), 1);
  ASSERT_EQ(tn_serve_config_find_upstream(&cfg, "pool"), -1);
  tn_serve_config_free(&cfg);
  unsetenv("TN_TEST_ROUTER_KEY");
}

static void test_config_bad(void) {
  static const struct bad_case bad[] = {
      {"routes:\n  - {name: r, strategy: fallback, targets: [nope]}\n",
       "unknown target 'nope'"},
      {"routes:\n  - {name: a, strategy: fallback, targets: [b]}\n"
       "  - {name: b, strategy: rules, rules: [{to: a}]}\n",
       "the routes form a cycle: a -> b -> a"},
      {"routes:\n  - {name: a, strategy: fallback, targets: [a]}\n",
       "cycle: a -> a"},
      {"upstreams:\n  - {name: u, base_url: 'ftp://x/v1'}\n",
       "is not an http:// or https:// URL"},
      {"upstreams:\n  - {name: u, base_url: 'http://user:pw@x/v1'}\n",
       "is not an http:// or https:// URL"},
      {"upstreams:\n  - {name: u, base_url: 'http://x:99999/v1'}\n",
       "is not an http:// or https:// URL"},
      {"upstreams:\n  - {name: u, base_url: 'http://x/v1', price_prompt: -1}\n",
       "'-1' is not a price"},
      {"upstreams:\n  - {name: u, base_url: 'http://x/v1', "
       "api_key_env: TN_TEST_UNSET_VAR_X}\n",
       "environment variable TN_TEST_UNSET_VAR_X is not set"},
      {"upstreams:\n  - {name: u}\n", "missing key 'base_url'"},
      {"routes:\n  - {name: m, strategy: fallback, targets: [m]}\n",
       "'m' is already the name of a model"},
      {"upstreams:\n  - {name: r, base_url: 'http://x'}\n"
       "routes:\n  - {name: r, strategy: fallback, targets: [m]}\n",
       "'r' is already the name of a"},
      {"routes:\n  - {name: r, strategy: magic, targets: [m]}\n",
       "unknown strategy 'magic'"},
      {"routes:\n  - {name: r, strategy: rules, targets: [m]}\n",
       "a rules route takes 'rules'"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{regex: '(', to: m}]}\n",
       "is not a valid regular expression"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{regex: x}]}\n",
       "missing key 'to'"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{header: X, to: m}]}\n",
       "'header' and 'header_regex' go together"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{metadata: {a: '('}, "
       "to: m}]}\n",
       "is not a valid regular expression"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{metadata: [a], "
       "to: m}]}\n",
       "expected a mapping of metadata keys"},
      {"routes:\n  - {name: r, strategy: cascade, stages: [{model: m}]}\n",
       "a cascade needs at least two stages"},
      {"routes:\n  - {name: r, strategy: cascade, stages: [{model: m}, "
       "{model: m}]}\n",
       "stages[0] needs 'signal' and 'threshold'"},
      {"upstreams:\n  - {name: u, base_url: 'http://x'}\n"
       "routes:\n  - {name: r, strategy: cascade, stages: [{model: u, "
       "signal: min_prob, threshold: 0.5}, {model: m}]}\n",
       "must be a local model"},
      {"routes:\n  - {name: r, strategy: cascade, stages: [{model: m, "
       "signal: vibes, threshold: 1}, {model: m}]}\n",
       "unknown signal 'vibes'"},
      {"routes:\n  - {name: r, strategy: cascade, stages: [{model: m, "
       "signal: min_prob, threshold: lots}, {model: m}]}\n",
       "'lots' is not a number"},
      {"routes:\n  - {name: c, strategy: cascade, stages: [{model: m, "
       "signal: min_prob, threshold: 1}, {model: m}]}\n"
       "  - {name: f, strategy: fallback, targets: [c]}\n",
       "is a cascade"},
      {"routes:\n  - {name: r, strategy: fallback, targets: []}\n",
       "the list is empty"},
      {"upstreams:\n  - {name: u, base_url: 'http://x', retries: 9}\n",
       "out of range 0..5"},
      {"upstreams:\n  - {name: u, base_url: 'http://x', timeout_s: 0}\n",
       "not a number of seconds"},
  };
  expect_bad(bad, TN_ARRAY_LEN(bad));

}

/* ---- plans */

struct fake {
  const char *headers[2][2];
};
static const char *fake_header(void *ctx, const char *name) {
  struct fake *f = ctx;
  for (int i = 0; i < 2; i++)
    if (f->headers[i][0] && !strcasecmp(f->headers[i][0], name))
      return f->headers[i][1];
  return NULL;
}
static int64_t g_tokens;
static int g_counted;
static int64_t fake_count(void *ctx) {
  (void)ctx;
  g_counted++;
  return g_tokens;
}

static const char *plan_first(struct tn_router *r, const char *route,
                              const char *text, const char *user, bool tools,
                              bool rf, const char *tier,
                              struct tn_route_plan *p) {
  struct fake f = {{{tier ? "X-Tier" : NULL, tier}, {NULL, NULL}}};
  struct tn_route_input in = {
      .last_user = text, .last_user_len = text ? strlen(text) : 0,
      .tools = tools, .response_format = rf, .user = user,
      .count_tokens = fake_count, .header = fake_header, .ctx = &f};
  struct tn_error err = {0};
  if (tn_router_plan(r, tn_router_find(r, route), &in, p, &err)) return NULL;
  return p->steps[0].name;
}

static void test_plans(void) {
  setenv("TN_TEST_ROUTER_KEY", "k", 1);
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  ASSERT_EQ(parse(k_cfg, &cfg, &err), TN_OK);
  struct tn_router *r = NULL;
  ASSERT_EQ(tn_router_create(&cfg, &r, &err), TN_OK);
  struct tn_route_plan p;
  g_tokens = 10;
  ASSERT_STR_EQ(plan_first(r, "auto", "write Python code", NULL, false, false,
                           NULL, &p), "big");
  ASSERT_EQ(p.n_steps, 1);
  ASSERT_EQ(p.steps[0].kind, TN_TARGET_MODEL);
  ASSERT_SUBSTR(p.why, "rule 0");
  /* \b: "pythonic" does not match; keywords are case-insensitive */
  ASSERT_STR_EQ(plan_first(r, "auto", "pythonic sql", NULL, false, false,
                           NULL, &p), "remote");
  ASSERT_EQ(p.steps[0].kind, TN_TARGET_UPSTREAM);
  ASSERT_EQ(p.steps[0].upstream, 0);
  /* a rule to a route: that route's plan (fallback: three steps) */
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, true, false, NULL, &p),
                "remote");
  ASSERT_EQ(p.n_steps, 3);
  ASSERT_STR_EQ(p.steps[1].name, "remote2");
  ASSERT_STR_EQ(p.steps[2].name, "small");
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, false, "gold", &p),
                "big");
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, false, "golden",
                           &p), "tiny");
  /* token counts are asked only when a rule needs them */
  g_counted = 0;
  ASSERT_STR_EQ(plan_first(r, "auto", "write python", NULL, false, false,
                           NULL, &p), "big");
  ASSERT_EQ(g_counted, 0);
  g_tokens = 150;
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, false, NULL, &p),
                "big");
  ASSERT_EQ(g_counted, 1);
  g_tokens = 3;
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, true, NULL, &p),
                "remote2");
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, false, NULL, &p),
                "tiny");
  g_tokens = -1; /* unknown length: no length rule holds */
  ASSERT_STR_EQ(plan_first(r, "auto", "hi", NULL, false, true, NULL, &p),
                "tiny");
  /* no rule holds */
  ASSERT(plan_first(r, "strict", "y", NULL, false, false, NULL, &p) == NULL);
  ASSERT_STR_EQ(plan_first(r, "strict", "x", NULL, false, false, NULL, &p),
                "small");
  /* determinism: the same input, the same plan */
  for (int i = 0; i < 20; i++)
    ASSERT_STR_EQ(plan_first(r, "auto", "sql please", NULL, false, false,
                             NULL, &p), "remote");
  /* cascade: stages with their rules; the last decides nothing */
  ASSERT_STR_EQ(plan_first(r, "casc", "x", NULL, false, false, NULL, &p),
                "small");
  ASSERT(p.cascade);
  ASSERT_EQ(p.n_steps, 3);
  ASSERT(p.steps[0].decides && p.steps[0].signal == TN_SIGNAL_QUANTILE &&
         p.steps[0].threshold == 0.5 && p.steps[0].quantile == 0.25);
  ASSERT(p.steps[1].decides && p.steps[1].signal == TN_SIGNAL_MARGIN);
  ASSERT(!p.steps[2].decides);
  ASSERT_EQ(p.steps[2].kind, TN_TARGET_UPSTREAM);
  tn_router_free(r);
  tn_serve_config_free(&cfg);
  unsetenv("TN_TEST_ROUTER_KEY");
}

static void test_balance_and_breaker(void) {
  setenv("TN_TEST_ROUTER_KEY", "k", 1);
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  ASSERT_EQ(parse(k_cfg, &cfg, &err), TN_OK);
  struct tn_router *r = NULL;
  ASSERT_EQ(tn_router_create(&cfg, &r, &err), TN_OK);
  struct tn_route_plan p;
  /* idle: ties rotate, so consecutive calls spread over all three */
  int seen[3] = {0};
  for (int i = 0; i < 6; i++) {
    const char *n = plan_first(r, "pool", "x", NULL, false, false, NULL, &p);
    ASSERT_EQ(p.n_steps, 3);
    seen[!strcmp(n, "small") ? 0 : !strcmp(n, "big") ? 1 : 2]++;
  }
  ASSERT(seen[0] == 2 && seen[1] == 2 && seen[2] == 2);
  /* least outstanding wins */
  plan_first(r, "pool", "x", NULL, false, false, NULL, &p);
  int small = -1, big = -1, remote = -1;
  for (int i = 0; i < 3; i++) {
    if (!strcmp(p.steps[i].name, "small")) small = p.steps[i].target;
    if (!strcmp(p.steps[i].name, "big")) big = p.steps[i].target;
    if (!strcmp(p.steps[i].name, "remote")) remote = p.steps[i].target;
  }
  ASSERT(small >= 0 && big >= 0 && remote >= 0);
  ASSERT(tn_router_begin(r, small));
  ASSERT(tn_router_begin(r, remote));
  for (int i = 0; i < 5; i++)
    ASSERT_STR_EQ(plan_first(r, "pool", "x", NULL, false, false, NULL, &p),
                  "big");
  ASSERT_SUBSTR(p.why, "balance -> big");
  /* max_concurrent: 2 for remote */
  ASSERT(tn_router_begin(r, remote));
  ASSERT(!tn_router_begin(r, remote));
  tn_router_end(r, remote, true);
  tn_router_end(r, remote, true);
  tn_router_end(r, small, true);
  /* the breaker: five failures in a row open it */
  for (int i = 0; i < 5; i++) {
    ASSERT(tn_router_begin(r, remote));
    tn_router_end(r, remote, false);
  }
  ASSERT(!tn_router_begin(r, remote));
  /* local models have no breaker */
  for (int i = 0; i < 6; i++) {
    ASSERT(tn_router_begin(r, small));
    tn_router_end(r, small, false);
  }
  ASSERT(tn_router_begin(r, small));
  tn_router_end(r, small, true);
  tn_router_free(r);
  tn_serve_config_free(&cfg);
  unsetenv("TN_TEST_ROUTER_KEY");
}

static void test_signals(void) {
  const float lp[4] = {logf(0.9f), logf(0.5f), logf(0.99f), logf(0.2f)};
  const float mg[4] = {0.8f, 0.1f, 0.98f, 0.05f};
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_MIN_PROB, 0, lp, mg, 4), 0.2, 1e-6);
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_MEAN_LOGPROB, 0, lp, mg, 4),
              (lp[0] + lp[1] + lp[2] + lp[3]) / 4, 1e-6);
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_MARGIN, 0, lp, mg, 4), 0.05, 1e-6);
  /* nearest rank: sorted 0.2 0.5 0.9 0.99 */
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_QUANTILE, 0.25, lp, mg, 4), 0.2,
              1e-6);
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_QUANTILE, 0.5, lp, mg, 4), 0.5,
              1e-6);
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_QUANTILE, 1.0, lp, mg, 4), 0.99,
              1e-6);
  ASSERT_NEAR(tn_cascade_signal(TN_SIGNAL_QUANTILE, 0.0, lp, mg, 4), 0.2,
              1e-6);
  /* an empty answer is confident: accepted at any finite threshold */
  ASSERT(isinf(tn_cascade_signal(TN_SIGNAL_MIN_PROB, 0, lp, mg, 0)));
  ASSERT_STR_EQ(tn_cascade_signal_name(TN_SIGNAL_MARGIN), "margin");
  /* -inf accepts all, +inf nothing, even an empty answer's +inf */
  ASSERT(tn_cascade_accepts(-INFINITY, -INFINITY));
  ASSERT(tn_cascade_accepts(NAN, -INFINITY));
  ASSERT(!tn_cascade_accepts(INFINITY, INFINITY));
  ASSERT(tn_cascade_accepts(0.5, 0.5));
  ASSERT(!tn_cascade_accepts(0.49, 0.5));
  ASSERT(!tn_cascade_accepts(NAN, 0.5));
}

static const char k_tenants[] =
    "api_key: admin-key-123\n"
    "models:\n  - {name: small, path: s.gguf}\n"
    "routes:\n  - {name: auto, strategy: rules, rules: [{tenant: [b], to: "
    "small}, {to: small}]}\n"
    "tenants:\n"
    "  - {name: a, key: key-aaaaaaaa, rpm: 3, allow: [auto]}\n"
    "  - {name: b, key_env: TN_TEST_TENANT_B, tpm: 1000}\n"
    "  - {name: c, key: key-cccccccc, budget_per_day: 1.5}\n";

static void test_tenants(void) {
  setenv("TN_TEST_TENANT_B", "key-bbbbbbbb", 1);
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = parse(k_tenants, &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(cfg.n_tenants, 3);
  ASSERT_STR_EQ(cfg.tenants[1].key, "key-bbbbbbbb");
  ASSERT_EQ(cfg.routes[0].rules[0].n_tenants, 1);
  struct tn_tenants *t = NULL;
  ASSERT_EQ(tn_tenants_create(&cfg, &t, &err), TN_OK);
  ASSERT_EQ(tn_tenants_find_key(t, "key-bbbbbbbb"), 1);
  ASSERT_EQ(tn_tenants_find_key(t, "key-bbbbbbb"), -1);
  ASSERT_EQ(tn_tenants_find_key(t, "admin-key-123"), -1);
  ASSERT_EQ(tn_tenants_find_key(t, ""), -1);
  ASSERT(tn_tenants_allows(t, 0, "auto"));
  ASSERT(!tn_tenants_allows(t, 0, "small"));
  ASSERT(!tn_tenants_allows(t, 0, NULL));
  ASSERT(tn_tenants_allows(t, 1, "small"));
  ASSERT(tn_tenants_allows(t, 1, NULL));

  /* rpm 3: three at once, the fourth waits ~20 s; a minute refills */
  double now = 1e9;
  struct tn_tenant_ticket tk[8];
  int retry = 0;
  for (int i = 0; i < 3; i++)
    ASSERT_EQ(tn_tenants_admit(t, 0, 10, 0, now, &retry, &tk[i]),
              TN_ADMIT_OK);
  ASSERT_EQ(tn_tenants_admit(t, 0, 10, 0, now, &retry, &tk[3]), TN_ADMIT_RPM);
  ASSERT(retry >= 19 && retry <= 21);
  ASSERT_EQ(tk[3].tenant, -1);
  for (int i = 0; i < 3; i++) tn_tenants_settle(t, &tk[i], 10, 0, now);
  ASSERT_EQ(tn_tenants_admit(t, 0, 10, 0, now + 20.5, &retry, &tk[0]),
            TN_ADMIT_OK);
  tn_tenants_settle(t, &tk[0], 10, 0, now + 20.5);

  /* tpm 1000: reservations of in-flight requests count */
  ASSERT_EQ(tn_tenants_admit(t, 1, 600, 0, now, &retry, &tk[0]), TN_ADMIT_OK);
  ASSERT_EQ(tn_tenants_admit(t, 1, 300, 0, now, &retry, &tk[1]), TN_ADMIT_OK);
  ASSERT_EQ(tn_tenants_admit(t, 1, 200, 0, now, &retry, &tk[2]), TN_ADMIT_TPM);
  tn_tenants_settle(t, &tk[0], 100, 0, now); /* used less than reserved */
  ASSERT_EQ(tn_tenants_admit(t, 1, 200, 0, now, &retry, &tk[2]), TN_ADMIT_OK);
  tn_tenants_settle(t, &tk[1], 300, 0, now);
  tn_tenants_settle(t, &tk[2], 200, 0, now);
  /* 400 left: alone, a bigger request still goes (one request's worth) */
  ASSERT_EQ(tn_tenants_admit(t, 1, 5000, 0, now, &retry, &tk[0]),
            TN_ADMIT_OK);
  ASSERT_EQ(tn_tenants_admit(t, 1, 1, 0, now, &retry, &tk[1]), TN_ADMIT_TPM);
  tn_tenants_settle(t, &tk[0], 5000, 0, now);
  ASSERT_EQ(tn_tenants_admit(t, 1, 1, 0, now, &retry, &tk[1]), TN_ADMIT_TPM);
  /* -4600 left: refilled at 1000/min, positive again after ~277 s */
  ASSERT(retry >= 270 && retry <= 290);
  ASSERT_EQ(tn_tenants_admit(t, 1, 1, 0, now + 280, &retry, &tk[1]),
            TN_ADMIT_OK);
  tn_tenants_settle(t, &tk[1], 1, 0, now + 280);

  /* budget 1.5 USD a day, renewed at 00:00 UTC */
  double day0 = 86400.0 * 20000 + 3600; /* 01:00 UTC */
  ASSERT_EQ(tn_tenants_admit(t, 2, 0, 1.0, day0, &retry, &tk[0]), TN_ADMIT_OK);
  ASSERT_EQ(tn_tenants_admit(t, 2, 0, 1.0, day0, &retry, &tk[1]),
            TN_ADMIT_BUDGET);
  ASSERT(retry == 23 * 3600);
  tn_tenants_settle(t, &tk[0], 0, 0.25, day0);
  ASSERT_NEAR(tn_tenants_spent_today(t, 2, day0), 0.25, 1e-12);
  ASSERT_EQ(tn_tenants_admit(t, 2, 0, 1.0, day0, &retry, &tk[1]), TN_ADMIT_OK);
  tn_tenants_settle(t, &tk[1], 0, 2.0, day0); /* over: by one request */
  ASSERT_EQ(tn_tenants_admit(t, 2, 0, 0.01, day0 + 60, &retry, &tk[2]),
            TN_ADMIT_BUDGET);
  ASSERT_EQ(tn_tenants_admit(t, 2, 0, 0.01, day0 + 23 * 3600, &retry, &tk[2]),
            TN_ADMIT_OK);
  tn_tenants_settle(t, &tk[2], 0, -1, day0 + 23 * 3600); /* unknown: 0.01 */
  ASSERT_NEAR(tn_tenants_spent_today(t, 2, day0 + 23 * 3600), 0.01, 1e-12);
  tn_tenants_add_spent(t, "c", 1.0, day0 + 23 * 3600);
  ASSERT_NEAR(tn_tenants_spent_today(t, 2, day0 + 23 * 3600), 1.01, 1e-12);
  tn_tenants_free(t);
  tn_serve_config_free(&cfg);

  /* bad tenants */
  static const struct bad_case bad[] = {
      {"tenants:\n  - {name: a}\n", "missing key 'key_env' (or 'key')"},
      {"tenants:\n  - {name: a, key: short}\n", "shorter than 8"},
      {"tenants:\n  - {name: a, key_env: TN_TEST_UNSET_VAR_Y}\n",
       "TN_TEST_UNSET_VAR_Y is not set"},
      {"tenants:\n  - {name: a, key: key-12345678}\n"
       "  - {name: b, key: key-12345678}\n",
       "have the same key"},
      {"tenants:\n  - {name: a, key: key-12345678}\n"
       "  - {name: a, key: key-87654321}\n",
       "listed twice"},
      {"tenants:\n  - {name: a, key: key-12345678, allow: [nope]}\n",
       "unknown target 'nope'"},
      {"tenants:\n  - {name: a, key: key-12345678, rpm: 0}\n",
       "out of range"},
      {"tenants:\n  - {name: a, key: key-12345678, budget_per_day: -2}\n",
       "is not a price"},
      {"routes:\n  - {name: r, strategy: rules, rules: [{tenant: [zz], to: "
       "m}]}\n",
       "unknown tenant 'zz'"},
  };
  expect_bad(bad, TN_ARRAY_LEN(bad));
  unsetenv("TN_TEST_TENANT_B");
}

static void test_classifier(void) {
  static const char text[] =
      "models:\n  - {name: m, path: m.gguf, aliases: [a, b]}\n"
      "routes:\n"
      "  - name: cls\n"
      "    strategy: classifier\n"
      "    k: 3\n"
      "    examples:\n"
      "      - {text: one, to: a}\n"
      "      - {text: two, to: a}\n"
      "      - {text: three, to: b}\n"
      "      - {text: four, to: b}\n"
      "      - {text: five, to: pick}\n"
      "  - {name: pick, strategy: fallback, targets: [b, a]}\n";
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = parse(text, &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(cfg.routes[0].strategy, TN_ROUTE_CLASSIFIER);
  ASSERT_EQ(cfg.routes[0].n_examples, 5);
  ASSERT_EQ(cfg.routes[0].n_labels, 3);
  ASSERT_EQ(cfg.routes[0].k, 3);
  struct tn_router *r = NULL;
  ASSERT_EQ(tn_router_create(&cfg, &r, &err), TN_OK);
  const char *model = "x";
  bool last = true;
  ASSERT(tn_router_classifier(r, 0, &model, &last));
  ASSERT(model == NULL && !last);
  ASSERT(!tn_router_classifier(r, 1, &model, &last));
  ASSERT_STR_EQ(tn_router_example(r, 0, 2), "three");
  struct tn_route_input in = {0};
  struct tn_route_plan p;
  /* not ready until its vectors are in */
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_EFULL);
  /* examples on the axes: a near e0, b near e1, pick near e2 */
  const float vecs[5 * 3] = {1, 0, 0, 0.9f, 0.1f, 0, 0, 1, 0,
                             0.1f, 0.9f, 0, 0, 0, 1};
  ASSERT_EQ(tn_router_set_vectors(r, 0, vecs, 5, 3, &err), TN_OK);
  ASSERT_EQ(tn_router_set_vectors(r, 0, vecs, 4, 3, &err), TN_EINVAL);
  /* without the embedding: the plan asks for it */
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
  ASSERT_EQ(p.need_embed, 0);
  ASSERT_EQ(p.n_steps, 0);
  const float q1[3] = {2, 0.1f, 0};
  in.embedding = q1;
  in.n_embd = 3;
  in.embed_route = 0;
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
  ASSERT_EQ(p.need_embed, -1);
  ASSERT_STR_EQ(p.steps[0].name, "a");
  ASSERT(p.confidence > 0.6 && p.confidence <= 1);
  ASSERT_SUBSTR(p.why, "classifier -> a");
  const float q2[3] = {0.05f, 1, 0.02f};
  in.embedding = q2;
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
  ASSERT_STR_EQ(p.steps[0].name, "b");
  /* a label that is a route: its plan (b, then a) */
  const float q3[3] = {0, 0.05f, 1};
  in.embedding = q3;
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
  ASSERT_EQ(p.n_steps, 2);
  ASSERT_STR_EQ(p.steps[0].name, "b");
  ASSERT_STR_EQ(p.steps[1].name, "a");
  /* the same input, the same answer */
  for (int i = 0; i < 10; i++) {
    in.embedding = q1;
    ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
    ASSERT_STR_EQ(p.steps[0].name, "a");
  }
  /* an embedding of another width asks again */
  in.n_embd = 2;
  ASSERT_EQ(tn_router_plan(r, 0, &in, &p, &err), TN_OK);
  ASSERT_EQ(p.need_embed, 0);
  tn_router_free(r);
  tn_serve_config_free(&cfg);

  static const struct bad_case bad[] = {
      {"routes:\n  - {name: c, strategy: classifier}\n",
       "a classifier route takes 'examples' (missing)"},
      {"routes:\n  - {name: c, strategy: classifier, examples: [{text: x}]}\n",
       "needs 'text' and 'to'"},
      {"routes:\n  - {name: c, strategy: classifier, examples: [{text: x, "
       "to: zz}]}\n",
       "unknown target 'zz'"},
      {"routes:\n  - {name: c, strategy: classifier, k: 0, examples: "
       "[{text: x, to: m}]}\n",
       "out of range 1..64"},
      {"routes:\n  - {name: c, strategy: fallback, k: 3, targets: [m]}\n",
       "belong to a classifier route"},
      {"routes:\n  - {name: c, strategy: classifier, examples_file: "
       "/nonexistent/x.jsonl}\n",
       "x.jsonl"},
      {"upstreams:\n  - {name: u, base_url: 'http://x'}\n"
       "routes:\n  - {name: c, strategy: classifier, model: u, examples: "
       "[{text: x, to: m}]}\n",
       "must be a local model"},
      {"routes:\n  - {name: c, strategy: classifier, examples: [{text: x, "
       "to: m}]}\n  - {name: f, strategy: balance, targets: [c, m]}\n",
       "'c' is a classifier"},
  };
  expect_bad(bad, TN_ARRAY_LEN(bad));
}

TN_TEST_MAIN(TN_TEST(test_config_routes), TN_TEST(test_config_bad),
             TN_TEST(test_plans), TN_TEST(test_balance_and_breaker),
             TN_TEST(test_signals), TN_TEST(test_tenants),
             TN_TEST(test_classifier))
