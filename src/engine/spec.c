/*
 * spec.c: drafters for speculative decoding (the verification is in
 * sched.c and tn_sampler_verify).
 *
 * N-gram lookup ("prompt lookup decoding"): the last n tokens of a
 * sequence are looked for earlier in the same sequence, prompt and output
 * alike, longest n first (ngram_max down to ngram_min); the tokens that
 * followed their latest earlier occurrence are the draft. It costs a scan
 * of the sequence per step and nothing when there is no match, and it pays
 * where the output repeats the input: code edits, summaries that quote,
 * extraction, chat turns that restate. The engine's drafter
 * (tn_spec_ngram_edit) also follows the copy it is making (after a draft
 * that was taken whole, the next one goes on from where it ended, not from
 * the latest occurrence of a common n-gram) and learns substitutions: a
 * rename the answer has shown once is applied to the next copies.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"

const char *tn_spec_method_name(enum tn_spec_method m) {
  switch (m) {
  case TN_SPEC_OFF: return "off";
  case TN_SPEC_NGRAM: return "ngram";
  case TN_SPEC_DRAFT: return "draft";
  case TN_SPEC_SELF: return "self";
  case TN_SPEC_CUSTOM: return "custom";
  case TN_SPEC_COUNT: break;
  }
  return "unknown";
}

enum tn_status tn_spec_parse_layers(const char *text, int32_t n_layer,
                                    int32_t *out, int32_t *n,
                                    struct tn_error *err) {
  *n = 0;
  const char *p = text;
  if (!p || !*p)
    return tn_error_set(err, TN_EINVAL, "--spec-layers: empty list");
  int32_t last = -1;
  for (;;) {
    char *end;
    errno = 0;
    long a = strtol(p, &end, 10), b;
    if (end == p || errno || a < 0 || a >= n_layer)
      return tn_error_set(err, TN_EINVAL,
                          "--spec-layers '%s': '%.16s' is not a layer of "
                          "0..%d",
                          text, p, n_layer - 1);
    b = a;
    p = end;
    if (*p == '-') {
      const char *q = p + 1;
      errno = 0;
      b = strtol(q, &end, 10);
      if (end == q || errno || b < a || b >= n_layer)
        return tn_error_set(err, TN_EINVAL,
                            "--spec-layers '%s': '%.16s' is not a range "
                            "of layers in 0..%d",
                            text, q - 1, n_layer - 1);
      p = end;
    }
    if (a <= last)
      return tn_error_set(err, TN_EINVAL,
                          "--spec-layers '%s': layer %ld after %d (the list "
                          "must rise)",
                          text, a, last);
    for (long l = a; l <= b; l++) out[(*n)++] = (int32_t)l;
    last = (int32_t)b;
    if (*p == 0) break;
    if (*p != ',')
      return tn_error_set(err, TN_EINVAL,
                          "--spec-layers '%s': unexpected '%c' (ids and "
                          "ranges like 0-11,14)",
                          text, *p);
    p++;
  }
  return TN_OK;
}

void tn_spec_format_layers(const int32_t *layers, int32_t n, char *buf,
                           size_t cap) {
  size_t len = 0;
  if (cap) buf[0] = 0;
  for (int32_t i = 0; i < n;) {
    int32_t j = i;
    while (j + 1 < n && layers[j + 1] == layers[j] + 1) j++;
    int w = j > i ? snprintf(buf + len, cap - len, "%s%d-%d", i ? "," : "",
                             layers[i], layers[j])
                  : snprintf(buf + len, cap - len, "%s%d", i ? "," : "",
                             layers[i]);
    if (w < 0 || (size_t)w >= cap - len) break;
    len += (size_t)w;
    i = j + 1;
  }
}

int32_t tn_spec_default_layers(int32_t n_layer, int32_t *out) {
  int32_t n = 0;
  for (int32_t l = 0; l < n_layer / 2; l++) out[n++] = l;
  if (n_layer > 2) out[n++] = n_layer - 1;
  return n;
}

void tn_spec_switch_init(struct tn_spec_switch *w) {
  memset(w, 0, sizeof(*w));
  w->mean[0] = w->mean[1] = -1.0;
  w->every = TN_SPEC_SWITCH_EVERY_MIN;
}

int tn_spec_switch_observe(struct tn_spec_switch *w, double score) {
  if (!(score >= 0.0) || !isfinite(score)) return 0;
  w->sum += score;
  if (++w->steps < TN_SPEC_SWITCH_WINDOW) return 0;
  double m = w->sum / w->steps;
  int on = tn_spec_switch_on(w);
  w->mean[on] = w->mean[on] < 0.0 ? m : 0.5 * w->mean[on] + 0.5 * m;
  w->sum = 0.0;
  w->steps = 0;
  if (!w->probe) {
    if (++w->since >= w->every) w->probe = true;
    return 0;
  }
  w->probe = false;
  w->since = 0;
  if (w->mean[0] < 0.0 || w->mean[1] < 0.0) return 0;
  if (!w->off && w->mean[1] < w->mean[0] * (1.0 - TN_SPEC_SWITCH_MARGIN)) {
    w->off = true;
    w->n_off++;
    w->every = TN_SPEC_SWITCH_EVERY_MIN;
    return -1;
  }
  if (w->off && w->mean[1] > w->mean[0] * (1.0 + TN_SPEC_SWITCH_MARGIN)) {
    w->off = false;
    w->every = TN_SPEC_SWITCH_EVERY_MIN;
    return 1;
  }
  w->every = TN_MIN(w->every * 2, TN_SPEC_SWITCH_EVERY_MAX);
  return 0;
}

/* The latest earlier occurrence of the last n tokens, longest n first:
 * its start, with *n_out = n; -1 when there is none. */
static int32_t ngram_find(const int32_t *tokens, int32_t n_tokens,
                          int32_t ngram_min, int32_t ngram_max,
                          int32_t *n_out) {
  for (int32_t n = ngram_max; n >= ngram_min; n--) {
    if (n_tokens < n + 1) continue;
    const int32_t *suffix = tokens + n_tokens - n;
    /* start positions n_tokens - n - 1 down to 0 (the suffix itself is
     * at n_tokens - n) */
    for (int32_t at = n_tokens - n - 1; at >= 0; at--) {
      if (tokens[at] != suffix[0] ||
          memcmp(tokens + at, suffix, (size_t)n * sizeof(int32_t)) != 0)
        continue;
      *n_out = n;
      return at;
    }
  }
  return -1;
}

int32_t tn_spec_ngram(const int32_t *tokens, int32_t n_tokens,
                      int32_t ngram_min, int32_t ngram_max, int32_t k,
                      int32_t *out) {
  if (k <= 0) return 0;
  int32_t n = 0;
  int32_t at = ngram_find(tokens, n_tokens, ngram_min, ngram_max, &n);
  if (at < 0) return 0;
  /* What followed it; past the end of the sequence the draft goes on
   * from itself, so a repeating pattern is drafted k tokens ahead. */
  int32_t from = at + n;
  for (int32_t j = 0; j < k; j++) {
    int32_t q = from + j;
    out[j] = q < n_tokens ? tokens[q] : out[q - n_tokens];
  }
  return k;
}

/* ---- n-gram lookup with learned substitutions */

/* How far a resynchronised lookup may land past the divergence's source
 * position (the replaced span), how long the replacement may be, and how
 * long a divergence waits for its resynchronisation. */
#define EDIT_SRC_MAX 12
#define EDIT_OUT_MAX 24
#define EDIT_WAIT 32

void tn_spec_ngram_edit_init(struct tn_ngram_edit *st) {
  memset(st, 0, sizeof(*st));
  st->div_src = st->div_out = -1;
}

static bool same_span(const int32_t *tokens, int32_t a, int32_t b,
                      int32_t n) {
  return memcmp(tokens + a, tokens + b, (size_t)n * sizeof(int32_t)) == 0;
}

static void edit_add(struct tn_ngram_edit *st, const int32_t *tokens,
                     int32_t s0, int32_t sn, int32_t o0, int32_t on) {
  if (sn == on && same_span(tokens, s0, o0, sn)) return;
  /* a rule for the same source text is replaced */
  int32_t slot = -1;
  for (int32_t i = 0; i < st->n_sub; i++)
    if (st->sub[i].sn == sn && same_span(tokens, st->sub[i].s0, s0, sn))
      slot = i;
  if (slot < 0) {
    if (st->n_sub < TN_NGRAM_SUBS) {
      slot = st->n_sub++;
    } else {
      slot = st->next_sub;
      st->next_sub = (st->next_sub + 1) % TN_NGRAM_SUBS;
    }
  }
  st->sub[slot].s0 = s0;
  st->sub[slot].sn = sn;
  st->sub[slot].o0 = o0;
  st->sub[slot].on = on;
}

/* Learns from what the model wrote since the last draft; returns where
 * the next draft should copy from when that is known better than by the
 * latest occurrence (a copy that goes on, or one that resynchronised
 * after a divergence), else -1. */
static int32_t edit_learn(struct tn_ngram_edit *st, const int32_t *tokens,
                          int32_t n_tokens, int32_t ngram_min,
                          int32_t ngram_max) {
  int32_t q = -1;
  if (st->n_last > 0) {
    int32_t a = 0;
    while (a < st->n_last && st->last_out + a < n_tokens &&
           tokens[st->last_out + a] == st->last_tok[a])
      a++;
    if (a < st->n_last && st->last_out + a < n_tokens) {
      /* where the draft and the model parted (a divergence still
       * waiting for its resynchronisation is kept: what comes before
       * that is usually the same edit seen again) */
      if (st->div_out < 0 && st->last_src[a] >= 0) {
        st->div_src = st->last_src[a];
        st->div_out = st->last_out + a;
      }
    } else if (a > 0 && st->last_src[a - 1] >= 0) {
      /* all of it came (or all that was verified of it: the scheduler
       * may take only the first few tokens of a proposal), and the copy
       * goes on while the model follows it */
      int32_t p = st->last_src[a - 1] + 1, o = st->last_out + a;
      while (o < n_tokens && p < o && tokens[o] == tokens[p]) o++, p++;
      if (o == n_tokens && p < n_tokens) q = p;
    }
    st->run = q >= 0 ? st->run + (n_tokens - st->last_out) : 0;
    st->n_last = 0;
  }
  if (st->div_out < 0) return q;
  if (n_tokens - st->div_out > EDIT_WAIT) {
    st->div_src = st->div_out = -1;
    return q;
  }
  /* back in the source at or a little past the divergence: source
   * [div_src, at) became output [div_out, n_tokens - n) */
  for (int32_t n = ngram_max; n >= ngram_min; n--) {
    int32_t on = n_tokens - n - st->div_out;
    if (on < 1 || on > EDIT_OUT_MAX) continue;
    const int32_t *suffix = tokens + n_tokens - n;
    for (int32_t at = st->div_src;
         at <= st->div_src + EDIT_SRC_MAX && at + n <= st->div_out; at++) {
      if (tokens[at] != suffix[0] ||
          memcmp(tokens + at, suffix, (size_t)n * sizeof(int32_t)) != 0)
        continue;
      /* at == div_src: text was inserted, nothing replaced */
      if (at > st->div_src)
        edit_add(st, tokens, st->div_src, at - st->div_src, st->div_out, on);
      st->div_src = st->div_out = -1;
      return at + n;
    }
  }
  return q;
}

int32_t tn_spec_ngram_edit(struct tn_ngram_edit *st, const int32_t *tokens,
                           int32_t n_tokens, int32_t ngram_min,
                           int32_t ngram_max, int32_t k, int32_t *out) {
  int32_t q = edit_learn(st, tokens, n_tokens, ngram_min, ngram_max);
  if (q < 0) st->run = 0;
  if (k <= 0) return 0;
  if (q < 0) {
    int32_t n = 0;
    int32_t at = ngram_find(tokens, n_tokens, ngram_min, ngram_max, &n);
    if (at < 0) return 0;
    q = at + n;
  }
  int32_t got = 0;
  bool subbed = false;
  while (got < k) {
    /* the longest rule whose source span starts here */
    int32_t best = -1;
    for (int32_t i = 0; i < st->n_sub; i++) {
      int32_t sn = st->sub[i].sn;
      if (q + sn <= n_tokens && tokens[q] == tokens[st->sub[i].s0] &&
          same_span(tokens, q, st->sub[i].s0, sn) &&
          (best < 0 || sn > st->sub[best].sn))
        best = i;
    }
    if (best >= 0) {
      for (int32_t j = 0; j < st->sub[best].on && got < k; j++) {
        st->last_src[got] = -1;
        out[got++] = tokens[st->sub[best].o0 + j];
      }
      q += st->sub[best].sn;
      subbed = true;
      continue;
    }
    if (q >= n_tokens) {
      /* past the end a repeating pattern drafts on from itself (as
       * tn_spec_ngram), when nothing was substituted */
      if (subbed || q - n_tokens >= got) break;
      st->last_src[got] = -1;
      out[got] = out[q - n_tokens];
    } else {
      st->last_src[got] = q;
      out[got] = tokens[q];
    }
    got++;
    q++;
  }
  st->last_out = n_tokens;
  st->n_last = got;
  memcpy(st->last_tok, out, (size_t)got * sizeof(int32_t));
  return got;
}

/* ---- cost model */

#define COST_DECAY 0.98
#define COST_PRIOR_WEIGHT 8.0

static void cost_fit(struct tn_spec_cost *c) {
  double den = c->w * c->snn - c->sn * c->sn;
  /* a slope needs steps of different sizes: variance of n above 1/4 */
  if (den > 0.25 * c->w * c->w) {
    double b = (c->w * c->snt - c->sn * c->st) / den;
    c->b = b > 0.0 ? b : 0.0;
  }
  double a = (c->st - c->b * c->sn) / c->w;
  c->a = a > 0.0 ? a : 0.0;
}

void tn_spec_cost_init(struct tn_spec_cost *c, int32_t n1, double t1,
                       int32_t n2, double t2) {
  memset(c, 0, sizeof(*c));
  double w = COST_PRIOR_WEIGHT;
  c->w = 2 * w;
  c->sn = w * (n1 + n2);
  c->st = w * (t1 + t2);
  c->snn = w * ((double)n1 * n1 + (double)n2 * n2);
  c->snt = w * (n1 * t1 + n2 * t2);
  c->b = n2 != n1 ? (t2 - t1) / (n2 - n1) : 0.0;
  if (c->b < 0.0) c->b = 0.0;
  cost_fit(c);
}

void tn_spec_cost_observe(struct tn_spec_cost *c, int32_t n, double t) {
  c->w = COST_DECAY * c->w + 1.0;
  c->sn = COST_DECAY * c->sn + n;
  c->st = COST_DECAY * c->st + t;
  c->snn = COST_DECAY * c->snn + (double)n * n;
  c->snt = COST_DECAY * c->snt + n * t;
  cost_fit(c);
}
