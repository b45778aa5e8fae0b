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

#endif /* TN_ENGINE_INTERNAL_H */
