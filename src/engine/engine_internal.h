/*
 * engine_internal.h: what the engine's own files share.
 */
#ifndef TN_ENGINE_INTERNAL_H
#define TN_ENGINE_INTERNAL_H

#include "engine/engine.h"

/* N-gram lookup: up to k tokens that followed the latest earlier
 * occurrence of the last n tokens of tokens[0..n_tokens), for n from
 * ngram_max down to ngram_min; returns how many were written to out. */
int32_t tn_spec_ngram(const int32_t *tokens, int32_t n_tokens,
                      int32_t ngram_min, int32_t ngram_max, int32_t k,
                      int32_t *out);

/* ---- the cost model speculation is planned with
 *
 * A step's forward pass over n tokens is modelled as a + b * n seconds,
 * calibrated when the engine opens (passes of 1 and 1 + K tokens) and
 * refitted on every step (least squares with exponential forgetting; the
 * slope keeps its last value while the steps seen all have one size). A
 * drafted token is worth planning when the output it is expected to add
 * (the chance that it and every draft before it are accepted) buys more
 * than the time it adds: g > b * G / T, G being the output the step is
 * expected to give and T its time. */
struct tn_spec_cost {
  double a, b;                   /* seconds per step, per token */
  double w, sn, st, snn, snt;    /* decayed sums of the fit */
};
void tn_spec_cost_init(struct tn_spec_cost *c, int32_t n1, double t1,
                       int32_t n2, double t2);
void tn_spec_cost_observe(struct tn_spec_cost *c, int32_t n, double t);
static inline double tn_spec_cost_time(const struct tn_spec_cost *c,
                                       int32_t n) {
  return c->a + c->b * (double)n;
}

#endif /* TN_ENGINE_INTERNAL_H */
