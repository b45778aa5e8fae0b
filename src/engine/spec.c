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
 * extraction, chat turns that restate.
 */
#include <string.h>

#include "engine/engine_internal.h"

const char *tn_spec_method_name(enum tn_spec_method m) {
  switch (m) {
  case TN_SPEC_OFF: return "off";
  case TN_SPEC_NGRAM: return "ngram";
  case TN_SPEC_CUSTOM: return "custom";
  case TN_SPEC_COUNT: break;
  }
  return "unknown";
}

int32_t tn_spec_ngram(const int32_t *tokens, int32_t n_tokens,
                      int32_t ngram_min, int32_t ngram_max, int32_t k,
                      int32_t *out) {
  if (k <= 0) return 0;
  for (int32_t n = ngram_max; n >= ngram_min; n--) {
    if (n_tokens < n + 1) continue;
    const int32_t *suffix = tokens + n_tokens - n;
    /* Latest earlier occurrence: start positions n_tokens - n - 1 down
     * to 0 (the suffix itself is at n_tokens - n). */
    for (int32_t at = n_tokens - n - 1; at >= 0; at--) {
      if (tokens[at] != suffix[0] ||
          memcmp(tokens + at, suffix, (size_t)n * sizeof(int32_t)) != 0)
        continue;
      /* What followed it; past the end of the sequence the draft goes on
       * from itself, so a repeating pattern is drafted k tokens ahead. */
      int32_t from = at + n;
      for (int32_t j = 0; j < k; j++) {
        int32_t q = from + j;
        out[j] = q < n_tokens ? tokens[q] : out[q - n_tokens];
      }
      return k;
    }
  }
  return 0;
}
