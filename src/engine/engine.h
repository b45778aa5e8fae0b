/*
 * engine.h: turning logits into tokens (sampling) and stop conditions.
 *
 * The sampler owns its random state and penalty history, so the same seed
 * and the same logits give the same tokens. Order of operations (as vLLM
 * and the OpenAI API define them): log-probabilities of the raw logits are
 * reported first; then logit bias, repetition / frequency / presence
 * penalties, temperature, top-k, then top-p and min-p (the kept set is
 * the top-p nucleus cut at min_p * p_max), and a draw. Temperature 0 (or
 * below 1e-4) is greedy (argmax after bias and penalties).
 */
#ifndef TN_ENGINE_H
#define TN_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define TN_LOGPROBS_MAX 20

struct tn_logit_bias {
  int32_t id;
  float bias;
};

struct tn_sampling {
  float temperature;     /* <= 0: greedy */
  int32_t top_k;         /* <= 0: off */
  float top_p;           /* >= 1: off */
  float min_p;           /* <= 0: off */
  float repeat_penalty;  /* 1: off; divides positive logits of seen tokens */
  int32_t repeat_last_n; /* window of history for repeat_penalty; -1: all */
  float freq_penalty;    /* minus count * f over generated tokens */
  float presence_penalty; /* minus p once a token was generated */
  uint64_t seed;
  const struct tn_logit_bias *bias; /* borrowed */
  int32_t n_bias;
  int32_t n_logprobs;    /* alternatives to report, 0..TN_LOGPROBS_MAX */
};

void tn_sampling_default(struct tn_sampling *s);
/* Checks ranges (n_vocab for bias ids); err names the field. */
enum tn_status tn_sampling_check(const struct tn_sampling *s, int32_t n_vocab,
                                 struct tn_error *err);

struct tn_token_logprob {
  int32_t id;
  float logprob;
};

struct tn_sample_out {
  int32_t id;
  float logprob; /* of the chosen token under the raw distribution */
  int32_t n_top;
  struct tn_token_logprob top[TN_LOGPROBS_MAX];
};

struct tn_sampler;

/* Copies params (bias entries included). */
enum tn_status tn_sampler_new(const struct tn_sampling *params,
                              int32_t n_vocab, struct tn_sampler **out,
                              struct tn_error *err);
void tn_sampler_free(struct tn_sampler *s);
/* Records prompt tokens (they count for repeat_penalty, not for the
 * frequency/presence penalties, which apply to generated text). */
void tn_sampler_add_prompt(struct tn_sampler *s, const int32_t *ids, size_t n);
/* Picks the next token from logits[n_vocab] (modified in place) and
 * records it as generated. */
void tn_sampler_sample(struct tn_sampler *s, float *logits,
                       struct tn_sample_out *out);

/* ---- stop strings
 *
 * Scans generated text for any of the stop strings. tn_stop_scan() says how
 * much of the text is safe to emit now (not a possible start of a stop
 * string) and whether a stop string was hit (the text before it is all
 * that may be emitted). */
struct tn_stop_match {
  bool hit;
  size_t emit_len; /* bytes of text that can be shown */
};
struct tn_stop_match tn_stop_scan(const char *text, size_t len,
                                  const char *const *stops, size_t n_stops);

#endif /* TN_ENGINE_H */
