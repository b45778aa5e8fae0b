/*
 * router.c: plans for routes, outstanding counts and circuit breakers
 * (router.h).
 *
 * The config was checked when it was read (every target exists, routes
 * form no cycle, cascades are where they may be), so planning only walks
 * it: a rule route tries its rules in order, a list route flattens its
 * targets (a route among them adds its own plan's steps), a cascade's
 * stages are its steps. Patterns are compiled once here.
 */
#include "router/router.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#define BREAKER_FAILURES 5
#define BREAKER_OPEN_S 10.0
#define PLAN_DEPTH_MAX 16

struct target {
  enum tn_target_kind kind;
  const char *name;      /* config's */
  int upstream;          /* or -1 */
  atomic_int outstanding;
  /* an upstream's breaker, under the router's mu */
  int failures;          /* in a row */
  double open_until;     /* tn_time_s(); 0: closed */
  bool trial;            /* half-open: one call is testing it */
};

struct rule {
  const struct tn_serve_rule_cfg *cfg;
  pcre2_code *regex, *user, *header;
  pcre2_code *meta[TN_SERVE_META_MAX];
};

struct route {
  const struct tn_serve_route_cfg *cfg;
  struct rule *rules;
  atomic_uint turn;      /* balance: who wins a tie */
  /* classifier: the examples' unit vectors, once set */
  float *vecs;
  int d;
  atomic_bool ready;
};

struct tn_router {
  const struct tn_serve_config *cfg;
  struct target *targets;
  int n_targets;
  struct route *routes;
  int n_routes;
  pthread_mutex_t mu;
};

static pcre2_code *compile(const char *pat) {
  if (!pat) return NULL;
  int ec;
  PCRE2_SIZE off;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, &ec,
                                 &off, NULL);
  if (re) (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
  return re;
}

/* The target id for a model name (added on first sight). */
static int model_target(struct tn_router *r, const char *name) {
  for (int i = 0; i < r->n_targets; i++)
    if (r->targets[i].kind == TN_TARGET_MODEL &&
        !strcmp(r->targets[i].name, name))
      return i;
  struct target *t = &r->targets[r->n_targets];
  t->kind = TN_TARGET_MODEL;
  t->name = name;
  t->upstream = -1;
  return r->n_targets++;
}

enum tn_status tn_router_create(const struct tn_serve_config *cfg,
                                struct tn_router **out, struct tn_error *err) {
  struct tn_router *r = calloc(1, sizeof *r);
  if (!r) return tn_error_set(err, TN_ENOMEM, "out of memory");
  r->cfg = cfg;
  pthread_mutex_init(&r->mu, NULL);
  /* at most: every upstream, every name a route mentions */
  size_t cap = (size_t)cfg->n_upstreams + 1;
  for (int i = 0; i < cfg->n_routes; i++)
    cap += (size_t)cfg->routes[i].n_targets + (size_t)cfg->routes[i].n_rules +
           (size_t)cfg->routes[i].n_stages + (size_t)cfg->routes[i].n_labels;
  r->targets = calloc(cap, sizeof *r->targets);
  r->routes = calloc((size_t)cfg->n_routes + 1, sizeof *r->routes);
  if (!r->targets || !r->routes) goto oom;
  for (int i = 0; i < cfg->n_upstreams; i++) {
    struct target *t = &r->targets[r->n_targets++];
    t->kind = TN_TARGET_UPSTREAM;
    t->name = cfg->upstreams[i].name;
    t->upstream = i;
  }
  for (int i = 0; i < cfg->n_routes; i++) {
    const struct tn_serve_route_cfg *rc = &cfg->routes[i];
    struct route *rt = &r->routes[r->n_routes++];
    rt->cfg = rc;
    if (rc->n_rules) {
      rt->rules = calloc((size_t)rc->n_rules, sizeof *rt->rules);
      if (!rt->rules) goto oom;
      for (int k = 0; k < rc->n_rules; k++) {
        const struct tn_serve_rule_cfg *u = &rc->rules[k];
        struct rule *ru = &rt->rules[k];
        ru->cfg = u;
        ru->regex = compile(u->regex);
        ru->user = compile(u->user);
        ru->header = compile(u->header_regex);
        bool meta_ok = true;
        for (int m = 0; m < u->n_meta; m++)
          meta_ok = (ru->meta[m] = compile(u->meta_res[m])) && meta_ok;
        if ((u->regex && !ru->regex) || (u->user && !ru->user) ||
            (u->header_regex && !ru->header) || !meta_ok) {
          tn_router_free(r);
          return tn_error_set(err, TN_EINVAL,
                              "route '%s': rules[%d]: a pattern does not "
                              "compile",
                              rc->name, k);
        }
      }
    }
    /* every model a route names gets its target now (ids are stable) */
    for (int k = 0; k < rc->n_targets; k++)
      if (tn_serve_config_find_upstream(cfg, rc->targets[k]) < 0 &&
          tn_serve_config_find_route(cfg, rc->targets[k]) < 0)
        model_target(r, rc->targets[k]);
    for (int k = 0; k < rc->n_rules; k++)
      if (tn_serve_config_find_upstream(cfg, rc->rules[k].to) < 0 &&
          tn_serve_config_find_route(cfg, rc->rules[k].to) < 0)
        model_target(r, rc->rules[k].to);
    for (int k = 0; k < rc->n_stages; k++)
      if (tn_serve_config_find_upstream(cfg, rc->stages[k].model) < 0 &&
          tn_serve_config_find_route(cfg, rc->stages[k].model) < 0)
        model_target(r, rc->stages[k].model);
    for (int k = 0; k < rc->n_labels; k++)
      if (tn_serve_config_find_upstream(cfg, rc->labels[k]) < 0 &&
          tn_serve_config_find_route(cfg, rc->labels[k]) < 0)
        model_target(r, rc->labels[k]);
  }
  *out = r;
  return TN_OK;
oom:
  tn_router_free(r);
  return tn_error_set(err, TN_ENOMEM, "out of memory");
}

void tn_router_free(struct tn_router *r) {
  if (!r) return;
  for (int i = 0; i < r->n_routes; i++) {
    struct route *rt = &r->routes[i];
    for (int k = 0; rt->rules && k < rt->cfg->n_rules; k++) {
      pcre2_code_free(rt->rules[k].regex);
      pcre2_code_free(rt->rules[k].user);
      pcre2_code_free(rt->rules[k].header);
      for (int m = 0; m < rt->cfg->rules[k].n_meta; m++)
        pcre2_code_free(rt->rules[k].meta[m]);
    }
    free(rt->rules);
    free(rt->vecs);
  }
  free(r->routes);
  free(r->targets);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

int tn_router_find(const struct tn_router *r, const char *name) {
  return r ? tn_serve_config_find_route(r->cfg, name) : -1;
}
int tn_router_n_routes(const struct tn_router *r) { return r ? r->n_routes : 0; }
const char *tn_router_route_name(const struct tn_router *r, int route) {
  return r->routes[route].cfg->name;
}
const char *tn_router_route_strategy(const struct tn_router *r, int route) {
  static const char *const names[] = {"rules", "fallback", "balance",
                                      "cascade", "classifier"};
  return names[r->routes[route].cfg->strategy];
}
int tn_router_find_upstream(const struct tn_router *r, const char *name) {
  return r ? tn_serve_config_find_upstream(r->cfg, name) : -1;
}
int tn_router_n_upstreams(const struct tn_router *r) {
  return r ? r->cfg->n_upstreams : 0;
}
const struct tn_serve_upstream_cfg *tn_router_upstream(
    const struct tn_router *r, int i) {
  return &r->cfg->upstreams[i];
}
int tn_router_upstream_target(const struct tn_router *r, int i) {
  (void)r;
  return i; /* upstreams come first */
}

/* ---- rules */

static bool matches(pcre2_code *re, const char *s, size_t n) {
  if (!s) s = ""; /* no text: patterns like ^$ still hold */
  pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
  if (!md) return false;
  int rc = pcre2_match(re, (PCRE2_SPTR)s, n, 0, 0, md, NULL);
  pcre2_match_data_free(md);
  return rc >= 0;
}

/* needle in hay, ASCII case-insensitive */
static bool has_keyword(const char *hay, size_t n, const char *needle) {
  size_t k = strlen(needle);
  if (k == 0 || k > n) return false;
  for (size_t i = 0; i + k <= n; i++)
    if (!strncasecmp(hay + i, needle, k)) return true;
  return false;
}

static bool rule_holds(const struct rule *ru, const struct tn_route_input *in,
                       int64_t *n_tokens) {
  const struct tn_serve_rule_cfg *u = ru->cfg;
  if (u->tools >= 0 && (u->tools != 0) != in->tools) return false;
  if (u->response_format >= 0 &&
      (u->response_format != 0) != in->response_format)
    return false;
  if (ru->regex && !matches(ru->regex, in->last_user, in->last_user_len))
    return false;
  if (u->n_keywords) {
    bool any = false;
    for (int i = 0; i < u->n_keywords && !any; i++)
      any = in->last_user &&
            has_keyword(in->last_user, in->last_user_len, u->keywords[i]);
    if (!any) return false;
  }
  if (ru->user && !matches(ru->user, in->user, in->user ? strlen(in->user) : 0))
    return false;
  if (u->n_tenants) {
    bool any = false;
    for (int i = 0; i < u->n_tenants && !any; i++)
      any = in->tenant && !strcmp(in->tenant, u->tenants[i]);
    if (!any) return false;
  }
  if (ru->header) {
    const char *v = in->header ? in->header(in->ctx, u->header) : NULL;
    if (!v || !matches(ru->header, v, strlen(v))) return false;
  }
  for (int m = 0; m < u->n_meta; m++) {
    const char *v = in->metadata ? in->metadata(in->ctx, u->meta_keys[m])
                                 : NULL;
    if (!v || !matches(ru->meta[m], v, strlen(v))) return false;
  }
  if (u->min_tokens >= 0 || u->max_tokens >= 0) {
    if (*n_tokens == -2)
      *n_tokens = in->count_tokens ? in->count_tokens(in->ctx) : -1;
    if (*n_tokens < 0) return false;
    if (u->min_tokens >= 0 && *n_tokens < u->min_tokens) return false;
    if (u->max_tokens >= 0 && *n_tokens > u->max_tokens) return false;
  }
  return true;
}

/* ---- classifiers */

bool tn_router_classifier(const struct tn_router *r, int route,
                          const char **model, bool *last) {
  const struct tn_serve_route_cfg *rc = r->routes[route].cfg;
  if (rc->strategy != TN_ROUTE_CLASSIFIER) return false;
  *model = rc->embed_model;
  *last = rc->pooling_last;
  return true;
}

bool tn_router_ready(const struct tn_router *r) {
  for (int i = 0; r && i < r->n_routes; i++)
    if (r->routes[i].cfg->strategy == TN_ROUTE_CLASSIFIER &&
        !atomic_load(&r->routes[i].ready))
      return false;
  return true;
}

int tn_router_n_examples(const struct tn_router *r, int route) {
  return r->routes[route].cfg->n_examples;
}

const char *tn_router_example(const struct tn_router *r, int route, int i) {
  return r->routes[route].cfg->examples[i].text;
}

enum tn_status tn_router_set_vectors(struct tn_router *r, int route,
                                     const float *vecs, int n, int d,
                                     struct tn_error *err) {
  struct route *rt = &r->routes[route];
  if (n != rt->cfg->n_examples || d <= 0)
    return tn_error_set(err, TN_EINVAL, "route '%s': %d vectors for %d "
                        "examples", rt->cfg->name, n, rt->cfg->n_examples);
  float *v = malloc((size_t)n * (size_t)d * sizeof *v);
  if (!v) return tn_error_set(err, TN_ENOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    const float *src = vecs + (size_t)i * (size_t)d;
    double norm = 0;
    for (int j = 0; j < d; j++) norm += (double)src[j] * src[j];
    double k = norm > 0 ? 1.0 / sqrt(norm) : 0.0;
    for (int j = 0; j < d; j++) v[(size_t)i * (size_t)d + j] = (float)(src[j] * k);
  }
  free(rt->vecs);
  rt->vecs = v;
  rt->d = d;
  atomic_store(&rt->ready, true);
  return TN_OK;
}

/* The label the k nearest examples (cosine) vote for, each with its
 * similarity; *share: the winner's part of the votes. Ties go to the
 * label of the nearest example. Deterministic. */
static int knn(const struct route *rt, const float *q, double *share) {
  const struct tn_serve_route_cfg *rc = rt->cfg;
  int n = rc->n_examples, d = rt->d, k = TN_MIN(rc->k, n);
  double qn = 0;
  for (int j = 0; j < d; j++) qn += (double)q[j] * q[j];
  qn = qn > 0 ? 1.0 / sqrt(qn) : 0.0;
  int best_i[64];
  double best_s[64];
  int nb = 0;
  for (int i = 0; i < n; i++) {
    const float *v = rt->vecs + (size_t)i * (size_t)d;
    double sim = 0;
    for (int j = 0; j < d; j++) sim += (double)v[j] * q[j];
    sim *= qn;
    if (nb == k && sim <= best_s[nb - 1]) continue;
    int at = nb < k ? nb++ : nb - 1;
    while (at > 0 && best_s[at - 1] < sim) {
      best_s[at] = best_s[at - 1];
      best_i[at] = best_i[at - 1];
      at--;
    }
    best_s[at] = sim;
    best_i[at] = i;
  }
  double votes[TN_SERVE_LABELS_MAX] = {0}, total = 0;
  for (int i = 0; i < nb; i++) {
    double w = fmax(best_s[i], 0.0) + 1e-9;
    votes[rc->examples[best_i[i]].label] += w;
    total += w;
  }
  int win = nb ? rc->examples[best_i[0]].label : 0;
  for (int l = 0; l < rc->n_labels; l++)
    if (votes[l] > votes[win]) win = l;
  *share = total > 0 ? votes[win] / total : 0;
  return win;
}

/* ---- plans */

static void add_step(struct tn_router *r, struct tn_route_plan *p,
                     const char *name) {
  if (p->n_steps == TN_ROUTE_STEPS_MAX) return;
  struct tn_route_step *s = &p->steps[p->n_steps++];
  memset(s, 0, sizeof *s);
  int u = tn_serve_config_find_upstream(r->cfg, name);
  if (u >= 0) {
    s->kind = TN_TARGET_UPSTREAM;
    s->upstream = u;
    s->target = u;
    s->name = r->cfg->upstreams[u].name;
  } else {
    s->kind = TN_TARGET_MODEL;
    s->upstream = -1;
    s->target = model_target(r, name);
    s->name = r->targets[s->target].name;
  }
}

static enum tn_status plan_route(struct tn_router *r, int route,
                                 const struct tn_route_input *in,
                                 struct tn_route_plan *p, int64_t *n_tokens,
                                 int depth, struct tn_error *err);

/* Adds name's steps: a model or upstream, or a route's plan. */
static enum tn_status add_target(struct tn_router *r, const char *name,
                                 const struct tn_route_input *in,
                                 struct tn_route_plan *p, int64_t *n_tokens,
                                 int depth, struct tn_error *err) {
  if (p->n_steps >= TN_ROUTE_STEPS_MAX) return TN_OK; /* full: no deeper */
  int sub = tn_serve_config_find_route(r->cfg, name);
  if (sub < 0) {
    add_step(r, p, name);
    return TN_OK;
  }
  return plan_route(r, sub, in, p, n_tokens, depth + 1, err);
}

static enum tn_status plan_route(struct tn_router *r, int route,
                                 const struct tn_route_input *in,
                                 struct tn_route_plan *p, int64_t *n_tokens,
                                 int depth, struct tn_error *err) {
  if (depth > PLAN_DEPTH_MAX)
    return tn_error_set(err, TN_EINVAL, "routes nest too deeply");
  struct route *rt = &r->routes[route];
  const struct tn_serve_route_cfg *rc = rt->cfg;
  switch (rc->strategy) {
    case TN_ROUTE_RULES:
      for (int k = 0; k < rc->n_rules; k++) {
        if (!rule_holds(&rt->rules[k], in, n_tokens)) continue;
        if (depth == 0)
          snprintf(p->why, sizeof p->why, "rule %d -> %.100s", k,
                   rc->rules[k].to);
        return add_target(r, rc->rules[k].to, in, p, n_tokens, depth, err);
      }
      return tn_error_set(err, TN_ENOENT,
                          "no rule of route '%s' holds for this request",
                          rc->name);
    case TN_ROUTE_CLASSIFIER: {
      if (!atomic_load(&rt->ready))
        return tn_error_set(err, TN_EFULL,
                            "route '%s' is still embedding its examples",
                            rc->name);
      if (!in->embedding || in->embed_route != route || in->n_embd != rt->d) {
        p->need_embed = route;
        return TN_OK;
      }
      int label = knn(rt, in->embedding, &p->confidence);
      if (depth == 0 || p->why[0] == '\0')
        snprintf(p->why, sizeof p->why, "classifier -> %.100s (votes %.2f)",
                 rc->labels[label], p->confidence);
      return add_target(r, rc->labels[label], in, p, n_tokens, depth, err);
    }
    case TN_ROUTE_CASCADE:
      if (p->n_steps > 0)
        return tn_error_set(err, TN_EINVAL,
                            "route '%s' is a cascade inside a list",
                            rc->name);
      p->cascade = true;
      for (int k = 0; k < rc->n_stages; k++) {
        const struct tn_serve_stage_cfg *g = &rc->stages[k];
        add_step(r, p, g->model);
        struct tn_route_step *s = &p->steps[p->n_steps - 1];
        s->decides = k + 1 < rc->n_stages && g->has_signal;
        s->signal = g->signal;
        s->threshold = g->threshold;
        s->quantile = g->quantile;
        s->samples = g->samples;
        s->sample_tokens = g->sample_tokens;
        s->sample_temperature = g->sample_temperature;
      }
      if (depth == 0) snprintf(p->why, sizeof p->why, "cascade");
      return TN_OK;
    case TN_ROUTE_FALLBACK:
    case TN_ROUTE_BALANCE: {
      int first = p->n_steps;
      for (int k = 0; k < rc->n_targets; k++) {
        enum tn_status st =
            add_target(r, rc->targets[k], in, p, n_tokens, depth, err);
        if (st) return st;
        if (p->cascade)
          return tn_error_set(err, TN_EINVAL,
                              "route '%s' lists a cascade among its targets",
                              rc->name);
      }
      if (rc->strategy == TN_ROUTE_BALANCE && p->n_steps - first > 1) {
        /* least outstanding first; ties broken by a turn that rotates, so
         * an idle pool still spreads its calls */
        int n = p->n_steps - first;
        unsigned turn = atomic_fetch_add(&rt->turn, 1) % (unsigned)n;
        int best = -1, best_load = 0;
        for (int i = 0; i < n; i++) {
          int k = first + (int)((turn + (unsigned)i) % (unsigned)n);
          int load = atomic_load(&r->targets[p->steps[k].target].outstanding);
          if (best < 0 || load < best_load) best = k, best_load = load;
        }
        struct tn_route_step chosen = p->steps[best];
        memmove(&p->steps[first + 1], &p->steps[first],
                (size_t)(best - first) * sizeof chosen);
        p->steps[first] = chosen;
        if (depth == 0)
          snprintf(p->why, sizeof p->why, "balance -> %.100s (%d outstanding)",
                   chosen.name, best_load);
      } else if (depth == 0) {
        snprintf(p->why, sizeof p->why, "%s",
                 rc->strategy == TN_ROUTE_BALANCE ? "balance" : "fallback");
      }
      return TN_OK;
    }
  }
  return TN_OK;
}

enum tn_status tn_router_plan(struct tn_router *r, int route,
                              const struct tn_route_input *in,
                              struct tn_route_plan *plan,
                              struct tn_error *err) {
  memset(plan, 0, sizeof *plan);
  plan->need_embed = -1;
  plan->confidence = NAN;
  int64_t n_tokens = -2; /* not counted yet */
  return plan_route(r, route, in, plan, &n_tokens, 0, err);
}

/* ---- outstanding calls, breakers */

bool tn_router_begin(struct tn_router *r, int target) {
  struct target *t = &r->targets[target];
  if (t->kind == TN_TARGET_UPSTREAM) {
    const struct tn_serve_upstream_cfg *u = &r->cfg->upstreams[t->upstream];
    pthread_mutex_lock(&r->mu);
    bool ok = true;
    if (t->open_until > 0) {
      if (tn_time_s() < t->open_until || t->trial) ok = false;
      else t->trial = true; /* half-open: this call tests it */
    }
    if (ok && atomic_load(&t->outstanding) >= u->max_concurrent) {
      ok = false;
    }
    if (ok) atomic_fetch_add(&t->outstanding, 1);
    pthread_mutex_unlock(&r->mu);
    return ok;
  }
  atomic_fetch_add(&t->outstanding, 1);
  return true;
}

void tn_router_end(struct tn_router *r, int target, bool ok) {
  struct target *t = &r->targets[target];
  atomic_fetch_sub(&t->outstanding, 1);
  if (t->kind != TN_TARGET_UPSTREAM) return;
  pthread_mutex_lock(&r->mu);
  if (ok) {
    t->failures = 0;
    t->open_until = 0;
    t->trial = false;
  } else if (t->trial || ++t->failures >= BREAKER_FAILURES) {
    t->open_until = tn_time_s() + BREAKER_OPEN_S;
    t->trial = false;
  }
  pthread_mutex_unlock(&r->mu);
}

/* ---- cascade signals */

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

double tn_cascade_signal(enum tn_cascade_signal s, double quantile,
                         const float *logprob, const float *margin,
                         size_t n) {
  if (n == 0) return INFINITY;
  double v = 0;
  switch (s) {
    case TN_SIGNAL_MIN_PROB:
      v = INFINITY;
      for (size_t i = 0; i < n; i++) v = fmin(v, exp(logprob[i]));
      return v;
    case TN_SIGNAL_MEAN_LOGPROB:
      for (size_t i = 0; i < n; i++) v += logprob[i];
      return v / (double)n;
    case TN_SIGNAL_MARGIN:
      v = INFINITY;
      for (size_t i = 0; i < n; i++) v = fmin(v, margin[i]);
      return v;
    case TN_SIGNAL_QUANTILE: {
      float *p = malloc(n * sizeof *p);
      if (!p) return -INFINITY; /* escalate: the safe side */
      for (size_t i = 0; i < n; i++) p[i] = expf(logprob[i]);
      qsort(p, n, sizeof *p, cmp_float);
      /* the nearest-rank quantile */
      size_t k = (size_t)ceil(quantile * (double)n);
      k = k == 0 ? 0 : k - 1;
      if (k >= n) k = n - 1;
      v = p[k];
      free(p);
      return v;
    }
    case TN_SIGNAL_AGREEMENT: /* from samples: tn_cascade_agreement */
    case TN_SIGNAL_COUNT: break;
  }
  return -INFINITY;
}

/* Leading and trailing ASCII whitespace off. */
static void trim(const char **s, size_t *n) {
  while (*n > 0 && strchr(" \t\r\n", (*s)[0])) (*s)++, (*n)--;
  while (*n > 0 && strchr(" \t\r\n", (*s)[*n - 1])) (*n)--;
}

double tn_cascade_agreement(const char *answer, size_t answer_len,
                            const char *const *samples,
                            const size_t *sample_len, const bool *cut,
                            size_t k) {
  if (k == 0) return -INFINITY;
  const char *a = answer;
  size_t na = answer_len;
  trim(&a, &na);
  size_t agree = 0;
  for (size_t i = 0; i < k; i++) {
    const char *s = samples[i];
    size_t ns = sample_len[i];
    trim(&s, &ns);
    /* a sample cut at its length agrees with the answer's start; one that
     * ended on its own must be the whole answer */
    if (cut[i] ? ns <= na && memcmp(s, a, ns) == 0
               : ns == na && memcmp(s, a, ns) == 0)
      agree++;
  }
  return (double)agree / (double)k;
}

bool tn_cascade_accepts(double signal, double threshold) {
  if (isinf(threshold)) return threshold < 0;
  return signal >= threshold; /* NaN: false, escalate */
}
