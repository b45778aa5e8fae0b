/*
 * bigram.c: the binary heap of candidate merges used by both tokenizers.
 */
#include <stdlib.h>

#include "tokenizer/tokenizer_internal.h"

static bool before(const struct tn_bigram *x, const struct tn_bigram *y) {
  return x->prio > y->prio || (x->prio == y->prio && x->left < y->left);
}

bool tn_bigram_heap_push(struct tn_bigram_heap *h, struct tn_bigram b) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : 64;
    struct tn_bigram *v = realloc(h->v, cap * sizeof(*v));
    if (!v) return false;
    h->v = v;
    h->cap = cap;
  }
  size_t i = h->n++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!before(&b, &h->v[p])) break;
    h->v[i] = h->v[p];
    i = p;
  }
  h->v[i] = b;
  return true;
}

struct tn_bigram tn_bigram_heap_pop(struct tn_bigram_heap *h) {
  struct tn_bigram top = h->v[0];
  struct tn_bigram last = h->v[--h->n];
  size_t i = 0;
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    const struct tn_bigram *best = &last;
    if (l < h->n && before(&h->v[l], best)) {
      m = l;
      best = &h->v[l];
    }
    if (r < h->n && before(&h->v[r], best)) m = r;
    if (m == i) break;
    h->v[i] = h->v[m];
    i = m;
  }
  if (h->n > 0) h->v[i] = last;
  return top;
}
