/*
 * sampler.c: logits to tokens (see engine.h for the order of operations).
 *
 * Large vocabularies (Gemma: 262,144) make a full sort per token too slow,
 * so candidates are narrowed by quickselect first: top-k directly, and for
 * top-p / min-p the best CAND_FAST tokens, falling back to the whole
 * vocabulary only when those do not hold enough probability mass.
 *
 * Randomness: the n-th generated token draws from its own stream, seeded
 * from (seed, n), not from one stream running through the whole output.
 * So a token's draw does not depend on how many random numbers the tokens
 * before it used, and a speculated token checked against a deterministic
 * draft (tn_sampler_verify with q = NULL) is the very token plain decoding
 * samples at that position: speculation leaves seeded output unchanged.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "kernels/kernels.h"

#define CAND_FAST 512

struct cand {
  int32_t id;
  float logit;
};

struct tn_sampler {
  struct tn_sampling p;
  struct tn_logit_bias *bias;
  int32_t n_vocab;
  int32_t *gen_count; /* [n_vocab]: times generated */
  int32_t *history;   /* every token seen, prompt included */
  size_t n_history, cap_history;
  struct cand *cand;  /* [n_vocab] scratch */
  float *raw;         /* [n_vocab] logits as the model gave them */
  uint64_t rng[4];     /* the stream of the token being chosen */
  uint64_t n_taken;    /* tokens generated: the position's index */
};

void tn_sampling_default(struct tn_sampling *s) {
  memset(s, 0, sizeof(*s));
  s->temperature = 1.0f;
  s->top_p = 1.0f;
  s->repeat_penalty = 1.0f;
  s->repeat_last_n = 64;
  s->seed = 0x5eed;
}

enum tn_status tn_sampling_check(const struct tn_sampling *s, int32_t n_vocab,
                                 struct tn_error *err) {
  if (!(s->temperature >= 0.0f && s->temperature <= 100.0f))
    return tn_error_set(err, TN_EINVAL, "temperature %g must be in [0, 100]",
                        (double)s->temperature);
  if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
    return tn_error_set(err, TN_EINVAL, "top_p %g must be in (0, 1]",
                        (double)s->top_p);
  if (!(s->min_p >= 0.0f && s->min_p <= 1.0f))
    return tn_error_set(err, TN_EINVAL, "min_p %g must be in [0, 1]",
                        (double)s->min_p);
  if (s->top_k < 0)
    return tn_error_set(err, TN_EINVAL, "top_k %d must be >= 0", s->top_k);
  if (!(s->repeat_penalty > 0.0f && s->repeat_penalty <= 10.0f))
    return tn_error_set(err, TN_EINVAL, "repeat_penalty %g must be in (0, 10]",
                        (double)s->repeat_penalty);
  if (!(s->freq_penalty >= -2.0f && s->freq_penalty <= 2.0f))
    return tn_error_set(err, TN_EINVAL,
                        "frequency_penalty %g must be in [-2, 2]",
                        (double)s->freq_penalty);
  if (!(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f))
    return tn_error_set(err, TN_EINVAL,
                        "presence_penalty %g must be in [-2, 2]",
                        (double)s->presence_penalty);
  if (s->n_logprobs < 0 || s->n_logprobs > TN_LOGPROBS_MAX)
    return tn_error_set(err, TN_EINVAL, "top_logprobs %d must be in [0, %d]",
                        s->n_logprobs, TN_LOGPROBS_MAX);
  if (s->n_logprobs > n_vocab)
    return tn_error_set(err, TN_EINVAL,
                        "top_logprobs %d exceeds the vocabulary of %d",
                        s->n_logprobs, n_vocab);
  if (s->n_bias < 0 || (s->n_bias > 0 && !s->bias))
    return tn_error_set(err, TN_EINVAL, "logit_bias: bad list");
  for (int32_t i = 0; i < s->n_bias; i++) {
    if (s->bias[i].id < 0 || s->bias[i].id >= n_vocab)
      return tn_error_set(err, TN_EINVAL,
                          "logit_bias: token id %d is outside the vocabulary "
                          "[0, %d)",
                          s->bias[i].id, n_vocab);
    if (!(s->bias[i].bias >= -100.0f && s->bias[i].bias <= 100.0f))
      return tn_error_set(err, TN_EINVAL,
                          "logit_bias: bias %g for token %d must be in "
                          "[-100, 100]",
                          (double)s->bias[i].bias, s->bias[i].id);
  }
  return TN_OK;
}

/* ---- xoshiro256** seeded through splitmix64 */

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t *s) {
  uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return r;
}

static double rng_uniform(uint64_t *s) {
  return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

enum tn_status tn_sampler_new(const struct tn_sampling *params,
                              int32_t n_vocab, struct tn_sampler **out,
                              struct tn_error *err) {
  *out = NULL;
  enum tn_status st = tn_sampling_check(params, n_vocab, err);
  if (st) return st;
  struct tn_sampler *s = calloc(1, sizeof(*s));
  if (!s) return tn_error_set(err, TN_ENOMEM, "sampler: out of memory");
  s->p = *params;
  s->n_vocab = n_vocab;
  s->gen_count = calloc((size_t)n_vocab, sizeof(int32_t));
  s->cand = malloc((size_t)n_vocab * sizeof(struct cand));
  s->raw = malloc((size_t)n_vocab * sizeof(float));
  if (params->n_bias > 0) {
    s->bias = malloc((size_t)params->n_bias * sizeof(*s->bias));
    if (s->bias)
      memcpy(s->bias, params->bias, (size_t)params->n_bias * sizeof(*s->bias));
  }
  if (!s->gen_count || !s->cand || !s->raw || (params->n_bias > 0 && !s->bias)) {
    tn_sampler_free(s);
    return tn_error_set(err, TN_ENOMEM, "sampler: out of memory");
  }
  s->p.bias = s->bias;
  *out = s;
  return TN_OK;
}

void tn_sampler_free(struct tn_sampler *s) {
  if (!s) return;
  free(s->bias);
  free(s->gen_count);
  free(s->history);
  free(s->cand);
  free(s->raw);
  free(s);
}

static void history_push(struct tn_sampler *s, int32_t id) {
  if (s->n_history == s->cap_history) {
    size_t cap = s->cap_history ? s->cap_history * 2 : 256;
    int32_t *h = realloc(s->history, cap * sizeof(int32_t));
    if (!h) return; /* penalties degrade; sampling goes on */
    s->history = h;
    s->cap_history = cap;
  }
  s->history[s->n_history++] = id;
}

void tn_sampler_add_prompt(struct tn_sampler *s, const int32_t *ids,
                           size_t n) {
  for (size_t i = 0; i < n; i++)
    if (ids[i] >= 0 && ids[i] < s->n_vocab) history_push(s, ids[i]);
}

static int cand_cmp_desc(const void *a, const void *b) {
  float x = ((const struct cand *)a)->logit, y = ((const struct cand *)b)->logit;
  if (x != y) return x > y ? -1 : 1;
  int32_t i = ((const struct cand *)a)->id, j = ((const struct cand *)b)->id;
  return (i > j) - (i < j);
}

/* Moves the k largest (by logit) of c[0..n) to the front, unordered. */
static void select_top(struct cand *c, int32_t n, int32_t k) {
  int32_t lo = 0, hi = n - 1;
  while (lo < hi) {
    float pivot = c[lo + (hi - lo) / 2].logit;
    int32_t i = lo, j = hi;
    while (i <= j) {
      while (c[i].logit > pivot) i++;
      while (c[j].logit < pivot) j--;
      if (i <= j) {
        struct cand t = c[i];
        c[i] = c[j];
        c[j] = t;
        i++;
        j--;
      }
    }
    if (k - 1 <= j)
      hi = j;
    else if (k - 1 >= i)
      lo = i;
    else
      break;
  }
}

/* Reports the raw distribution's log-probabilities. */
static void report_logprobs(struct tn_sampler *s, const float *logits,
                            struct tn_sample_out *out) {
  int32_t n = s->n_vocab;
  float lse = tn_logsumexp(logits, n);
  out->logprob = 0.0f; /* filled once the token is known */
  out->n_top = 0;
  int32_t k = TN_MIN(s->p.n_logprobs, n);
  if (k > 0) {
    for (int32_t i = 0; i < n; i++) s->cand[i] = (struct cand){i, logits[i]};
    select_top(s->cand, n, k);
    qsort(s->cand, (size_t)k, sizeof(struct cand), cand_cmp_desc);
    for (int32_t i = 0; i < k; i++)
      out->top[i] = (struct tn_token_logprob){s->cand[i].id,
                                              s->cand[i].logit - lse};
    out->n_top = k;
  }
  /* Stash the normaliser in logprob for the caller below. */
  out->logprob = lse;
}

/* Bias and penalties, in place; reports the raw distribution's
 * logprobs into out and returns its log-normaliser. */
static float prepare(struct tn_sampler *s, float *logits,
                     struct tn_sample_out *out) {
  const struct tn_sampling *p = &s->p;
  int32_t n = s->n_vocab;
  /* this position's random stream */
  uint64_t x = p->seed ^ (s->n_taken * 0xd1b54a32d192ed03ull);
  for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
  memset(out, 0, sizeof(*out));
  report_logprobs(s, logits, out);
  float lse = out->logprob;
  memcpy(s->raw, logits, (size_t)n * sizeof(float));

  for (int32_t i = 0; i < p->n_bias; i++) logits[p->bias[i].id] += p->bias[i].bias;
  if (p->repeat_penalty != 1.0f && s->n_history > 0) {
    size_t from = 0;
    if (p->repeat_last_n >= 0 && s->n_history > (size_t)p->repeat_last_n)
      from = s->n_history - (size_t)p->repeat_last_n;
    /* Each distinct token once: mark with the sign of a count trick. */
    for (size_t i = from; i < s->n_history; i++) {
      int32_t id = s->history[i];
      if (s->gen_count[id] < 0) continue;
      s->gen_count[id] = -s->gen_count[id] - 1; /* mark */
      logits[id] = logits[id] > 0 ? logits[id] / p->repeat_penalty
                                  : logits[id] * p->repeat_penalty;
    }
    for (size_t i = from; i < s->n_history; i++) {
      int32_t id = s->history[i];
      if (s->gen_count[id] < 0) s->gen_count[id] = -s->gen_count[id] - 1;
    }
  }
  if (p->freq_penalty != 0.0f || p->presence_penalty != 0.0f) {
    for (int32_t id = 0; id < n; id++) {
      int32_t cnt = s->gen_count[id];
      if (cnt > 0)
        logits[id] -= (float)cnt * p->freq_penalty + p->presence_penalty;
    }
  }
  return lse;
}

/* Temperatures this small are greedy (1/t would overflow). */
static bool is_greedy(const struct tn_sampler *s) {
  return s->p.temperature < 1e-4f;
}

static int32_t argmax(const float *logits, int32_t n) {
  int32_t pick = 0;
  float best = logits[0];
  for (int32_t i = 1; i < n; i++)
    if (logits[i] > best) {
      best = logits[i];
      pick = i;
    }
  return pick;
}

/* The kept candidates after temperature, top-k, min-p and top-p:
 * s->cand[0..*m), each with weight exp(logit - *mx); returns the sum. */
static double candidates(struct tn_sampler *s, const float *logits,
                         int32_t *m_out, float *mx_out) {
  const struct tn_sampling *p = &s->p;
  int32_t n = s->n_vocab;
  struct cand *c = s->cand;
  float inv_t = 1.0f / p->temperature;
  for (int32_t i = 0; i < n; i++) c[i] = (struct cand){i, logits[i] * inv_t};
  int32_t m = n;
  if (p->top_k > 0 && p->top_k < m) {
    select_top(c, m, p->top_k);
    m = p->top_k;
  }
  bool need_order = p->top_p < 1.0f;
  float mx = c[0].logit;
  for (int32_t i = 1; i < m; i++) mx = c[i].logit > mx ? c[i].logit : mx;
  if (!need_order && p->min_p > 0.0f) {
    /* min-p alone needs no order: keep what clears the cut, in place */
    float cut = mx + logf(p->min_p);
    int32_t k = 0;
    for (int32_t i = 0; i < m; i++)
      if (c[i].logit >= cut) c[k++] = c[i];
    m = k;
  }
  double total = 0.0;
  for (int32_t i = 0; i < m; i++) total += exp((double)(c[i].logit - mx));
  if (need_order) {
    int32_t k = m;
    if (m > CAND_FAST) {
      select_top(c, m, CAND_FAST);
      double mass = 0.0;
      for (int32_t i = 0; i < CAND_FAST; i++)
        mass += exp((double)(c[i].logit - mx));
      if (mass >= (double)p->top_p * total) k = CAND_FAST;
    }
    qsort(c, (size_t)k, sizeof(struct cand), cand_cmp_desc);
    int32_t keep = k;
    if (p->min_p > 0.0f) {
      float cut = mx + logf(p->min_p);
      for (int32_t i = 1; i < keep; i++)
        if (c[i].logit < cut) {
          keep = i;
          break;
        }
    }
    if (p->top_p < 1.0f) {
      double cum = 0.0, target = (double)p->top_p * total;
      for (int32_t i = 0; i < keep; i++) {
        cum += exp((double)(c[i].logit - mx));
        if (cum >= target) {
          keep = i + 1;
          break;
        }
      }
    }
    m = keep;
  }
  double sum = 0.0;
  for (int32_t i = 0; i < m; i++) sum += exp((double)(c[i].logit - mx));
  *m_out = m;
  *mx_out = mx;
  return sum;
}

/* Draws from the candidates, with weight exp(logit - mx), skipping the
 * token skip (-1: none); sum is the total weight of those drawn from. */
static int32_t draw(struct tn_sampler *s, int32_t m, float mx, double sum,
                    int32_t skip) {
  const struct cand *c = s->cand;
  double r = rng_uniform(s->rng) * sum, acc = 0.0;
  int32_t pick = -1;
  for (int32_t i = 0; i < m; i++) {
    if (c[i].id == skip) continue;
    pick = c[i].id;
    acc += exp((double)(c[i].logit - mx));
    if (r < acc) break;
  }
  return pick;
}

/* Records the token as generated and fills out's logprob. */
static void take(struct tn_sampler *s, int32_t id, float lse,
                 struct tn_sample_out *out) {
  out->id = id;
  out->logprob = s->raw[id] - lse;
  s->gen_count[id]++;
  s->n_taken++;
  history_push(s, id);
}

void tn_sampler_sample(struct tn_sampler *s, float *logits,
                       struct tn_sample_out *out) {
  float lse = prepare(s, logits, out);
  int32_t pick;
  if (is_greedy(s)) {
    pick = argmax(logits, s->n_vocab);
  } else {
    int32_t m;
    float mx;
    double sum = candidates(s, logits, &m, &mx);
    pick = draw(s, m, mx, sum, -1);
  }
  take(s, pick, lse, out);
}

bool tn_sampler_verify(struct tn_sampler *s, float *logits, int32_t draft,
                       const float *q, struct tn_sample_out *out) {
  float lse = prepare(s, logits, out);
  if (is_greedy(s)) {
    int32_t pick = argmax(logits, s->n_vocab);
    take(s, pick, lse, out);
    return pick == draft;
  }
  int32_t m;
  float mx;
  double sum = candidates(s, logits, &m, &mx);
  int32_t pick;
  if (!q) {
    /* A deterministic draft: the token plain sampling draws here is kept,
     * and the draft is accepted when they agree. That is rejection
     * sampling for a drafter whose mass is all on the draft (accepted with
     * probability p(draft); otherwise a draw from p without it), with the
     * same draw as plain decoding. */
    pick = draw(s, m, mx, sum, -1);
    take(s, pick, lse, out);
    return pick == draft;
  }
  const struct cand *c = s->cand;
  double p_d = 0.0;
  for (int32_t i = 0; i < m; i++)
    if (c[i].id == draft) {
      p_d = exp((double)(c[i].logit - mx)) / sum;
      break;
    }
  double q_d = (double)q[draft];
  /* accept with probability min(1, p(d) / q(d)) */
  if (q_d > 0.0 && rng_uniform(s->rng) * q_d < p_d) {
    take(s, draft, lse, out);
    return true;
  }
  /* residual max(p - q, 0), over the kept candidates (p is 0 elsewhere) */
  double total = 0.0;
  for (int32_t i = 0; i < m; i++) {
    double pi = exp((double)(c[i].logit - mx)) / sum - (double)q[c[i].id];
    if (pi > 0.0) total += pi;
  }
  pick = -1;
  if (total > 0.0) {
    double r = rng_uniform(s->rng) * total, acc = 0.0;
    for (int32_t i = 0; i < m; i++) {
      double pi = exp((double)(c[i].logit - mx)) / sum - (double)q[c[i].id];
      if (pi <= 0.0) continue;
      pick = c[i].id;
      acc += pi;
      if (r < acc) break;
    }
  }
  if (pick < 0) pick = draw(s, m, mx, sum, -1); /* p == q: cannot reach */
  take(s, pick, lse, out);
  return false;
}

/* ---- stop strings */

struct tn_stop_match tn_stop_scan(const char *text, size_t len,
                                  const char *const *stops, size_t n_stops) {
  struct tn_stop_match r = {.hit = false, .emit_len = len};
  size_t first_hit = len;
  for (size_t i = 0; i < n_stops; i++) {
    size_t sl = strlen(stops[i]);
    if (sl == 0 || sl > len) continue;
    for (size_t at = 0; at + sl <= len; at++)
      if (memcmp(text + at, stops[i], sl) == 0) {
        if (at < first_hit) first_hit = at;
        r.hit = true;
        break;
      }
  }
  if (r.hit) {
    r.emit_len = first_hit;
    return r;
  }
  /* Hold back a tail that could still become a stop string. */
  for (size_t i = 0; i < n_stops; i++) {
    size_t sl = strlen(stops[i]);
    for (size_t k = sl > 1 ? sl - 1 : 0; k > 0; k--) {
      if (k > len) continue;
      if (memcmp(text + len - k, stops[i], k) == 0) {
        if (len - k < r.emit_len) r.emit_len = len - k;
        break;
      }
    }
  }
  return r;
}
