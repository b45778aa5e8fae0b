/*
 * tenants.c: API keys, allowed names, rate limits and budgets (router.h).
 *
 * One mutex guards every tenant's counters: admission and settling are a
 * few arithmetic operations, far cheaper than the request they gate, and
 * one lock makes "check, then reserve" atomic, which is what keeps
 * concurrent requests from all slipping past a limit together.
 */
#include "router/router.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct bucket {
  double level;      /* what is left; may go below 0 after settling */
  double reserved;   /* held by requests in flight */
  double t;          /* when level was last refilled (Unix s) */
};

struct tenant {
  const struct tn_serve_tenant_cfg *cfg;
  struct bucket req, tok;
  double spent, reserved_cost;  /* USD today */
  int64_t day;                  /* the UTC day spent counts */
  int in_flight;
};

struct tn_tenants {
  struct tenant *t;
  int n;
  pthread_mutex_t mu;
};

enum tn_status tn_tenants_create(const struct tn_serve_config *cfg,
                                 struct tn_tenants **out,
                                 struct tn_error *err) {
  struct tn_tenants *ts = calloc(1, sizeof *ts);
  if (!ts) return tn_error_set(err, TN_ENOMEM, "out of memory");
  ts->t = calloc((size_t)cfg->n_tenants + 1, sizeof *ts->t);
  if (!ts->t) {
    free(ts);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  ts->n = cfg->n_tenants;
  for (int i = 0; i < ts->n; i++) {
    struct tenant *t = &ts->t[i];
    t->cfg = &cfg->tenants[i];
    t->req.level = (double)t->cfg->rpm;
    t->tok.level = (double)t->cfg->tpm;
    t->day = -1;
  }
  pthread_mutex_init(&ts->mu, NULL);
  *out = ts;
  return TN_OK;
}

void tn_tenants_free(struct tn_tenants *ts) {
  if (!ts) return;
  pthread_mutex_destroy(&ts->mu);
  free(ts->t);
  free(ts);
}

int tn_tenants_count(const struct tn_tenants *ts) { return ts ? ts->n : 0; }

static bool same_key(const char *k, const char *want) {
  size_t nk = strlen(k), nw = strlen(want);
  unsigned char diff = nk != nw;
  for (size_t i = 0; i < nw; i++)
    diff |= (unsigned char)(want[i] ^ k[i < nk ? i : 0]);
  return diff == 0;
}

int tn_tenants_find_key(const struct tn_tenants *ts, const char *key) {
  if (!ts || !key) return -1;
  int found = -1;
  for (int i = 0; i < ts->n; i++) /* every key compared: no early exit */
    if (same_key(key, ts->t[i].cfg->key) && found < 0) found = i;
  return found;
}

const char *tn_tenants_name(const struct tn_tenants *ts, int i) {
  return ts->t[i].cfg->name;
}

bool tn_tenants_allows(const struct tn_tenants *ts, int i, const char *name) {
  const struct tn_serve_tenant_cfg *c = ts->t[i].cfg;
  if (!c->allow) return true;
  if (!name) return false; /* the default model: only when listed */
  const char *colon = strchr(name, ':');
  for (int k = 0; k < c->n_allow; k++) {
    if (!strcmp(c->allow[k], name)) return true;
    if (colon && strlen(c->allow[k]) == (size_t)(colon - name) &&
        !strncmp(c->allow[k], name, (size_t)(colon - name)))
      return true;
  }
  return false;
}

static void refill(struct bucket *b, double per_min, double now) {
  if (b->t > 0 && now > b->t)
    b->level = fmin(per_min, b->level + (now - b->t) * per_min / 60.0);
  b->t = now;
}

static void new_day(struct tenant *t, double now) {
  int64_t day = (int64_t)floor(now / 86400.0);
  if (day != t->day) {
    t->day = day;
    t->spent = 0;
  }
}

/* Seconds until the bucket holds need beyond what is reserved. */
static int wait_s(const struct bucket *b, double need, double per_min) {
  double deficit = need + b->reserved - b->level;
  double s = deficit / (per_min / 60.0);
  return (int)fmax(1.0, ceil(s));
}

enum tn_admit tn_tenants_admit(struct tn_tenants *ts, int i, int64_t tokens,
                               double cost, double now_s, int *retry_after,
                               struct tn_tenant_ticket *tk) {
  struct tenant *t = &ts->t[i];
  const struct tn_serve_tenant_cfg *c = t->cfg;
  tk->tenant = -1;
  if (tokens < 0) tokens = 0; /* an estimate never gives back */
  if (!(cost >= 0)) cost = 0;
  pthread_mutex_lock(&ts->mu);
  enum tn_admit res = TN_ADMIT_OK;
  bool alone = t->in_flight == 0;
  if (c->rpm) {
    refill(&t->req, (double)c->rpm, now_s);
    /* a request is one unit: no estimate, so no "alone" allowance */
    if (t->req.level < 1.0) {
      res = TN_ADMIT_RPM;
      *retry_after = wait_s(&t->req, 1.0, (double)c->rpm);
    }
  }
  if (!res && c->tpm) {
    refill(&t->tok, (double)c->tpm, now_s);
    double left = t->tok.level - t->tok.reserved;
    if (!(left >= (double)tokens || (alone && t->tok.level > 0))) {
      res = TN_ADMIT_TPM;
      *retry_after = wait_s(&t->tok, alone ? 1.0 : (double)tokens,
                            (double)c->tpm);
    }
  }
  if (!res && c->budget_per_day >= 0) {
    new_day(t, now_s);
    double left = c->budget_per_day - t->spent - t->reserved_cost;
    if (!(left >= cost ||
          (alone && t->spent < c->budget_per_day))) {
      res = TN_ADMIT_BUDGET;
      double next_day = (floor(now_s / 86400.0) + 1) * 86400.0;
      *retry_after = (int)fmax(1.0, ceil(next_day - now_s));
    }
  }
  if (!res) {
    if (c->rpm) t->req.level -= 1.0;
    if (c->tpm) t->tok.reserved += (double)tokens;
    if (c->budget_per_day >= 0) t->reserved_cost += cost;
    t->in_flight++;
    tk->tenant = i;
    tk->tokens = tokens;
    tk->cost = cost;
  }
  pthread_mutex_unlock(&ts->mu);
  return res;
}

void tn_tenants_settle(struct tn_tenants *ts, struct tn_tenant_ticket *tk,
                       int64_t tokens, double cost, double now_s) {
  if (!ts || tk->tenant < 0) return;
  struct tenant *t = &ts->t[tk->tenant];
  const struct tn_serve_tenant_cfg *c = t->cfg;
  pthread_mutex_lock(&ts->mu);
  t->in_flight--;
  if (c->tpm) {
    refill(&t->tok, (double)c->tpm, now_s);
    t->tok.reserved -= (double)tk->tokens;
    t->tok.level -= (double)(tokens >= 0 ? tokens : tk->tokens);
  }
  if (c->budget_per_day >= 0) {
    new_day(t, now_s);
    t->reserved_cost -= tk->cost;
    t->spent += cost >= 0 ? cost : tk->cost;
  }
  pthread_mutex_unlock(&ts->mu);
  tk->tenant = -1;
}

double tn_tenants_spent_today(struct tn_tenants *ts, int i, double now_s) {
  pthread_mutex_lock(&ts->mu);
  new_day(&ts->t[i], now_s);
  double v = ts->t[i].spent;
  pthread_mutex_unlock(&ts->mu);
  return v;
}

void tn_tenants_add_spent(struct tn_tenants *ts, const char *name, double cost,
                          double now_s) {
  if (!ts || !name || !(cost > 0)) return;
  pthread_mutex_lock(&ts->mu);
  for (int i = 0; i < ts->n; i++)
    if (!strcmp(ts->t[i].cfg->name, name)) {
      new_day(&ts->t[i], now_s);
      ts->t[i].spent += cost;
    }
  pthread_mutex_unlock(&ts->mu);
}
