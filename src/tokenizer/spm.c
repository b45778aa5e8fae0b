/*
 * spm.c: SentencePiece ("llama" vocabularies), the way llama.cpp runs it.
 *
 * The fragment arrives with spaces already turned into U+2581. It is cut
 * into characters (the length taken from each lead byte alone, so broken
 * UTF-8 still makes progress), then every adjacent pair whose concatenation
 * is a token goes into a priority queue keyed by that token's score
 * (highest first, leftmost on ties). Popping a pair merges it unless one
 * side changed since it was queued; the merged symbol then proposes pairs
 * with its new neighbours. Each final symbol is its token, or, when the
 * text is not in the vocabulary, one <0xNN> byte token per byte.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_internal.h"

struct sym {
  int32_t prev, next;
  uint32_t off, n;
};


static bool try_bigram(const struct tn_tokenizer *tok, const char *text,
                       const struct sym *syms, struct tn_bigram_heap *h, int32_t l,
                       int32_t r) {
  if (l < 0 || r < 0) return true;
  uint32_t n = syms[l].n + syms[r].n;
  int32_t id = tn_tok_lookup(tok, text + syms[l].off, n);
  if (id < 0) return true;
  return tn_bigram_heap_push(h, (struct tn_bigram){tok->toks[id].score, l, r, n});
}

enum tn_status tn_spm_encode(const struct tn_tokenizer *tok, const char *text,
                             size_t len, struct tn_ids *out) {
  if (len == 0) return TN_OK;
  enum tn_status st = TN_ENOMEM;
  struct tn_bigram_heap h = {0};
  struct sym *syms = malloc(len * sizeof(*syms));
  if (!syms) return TN_ENOMEM;
  int32_t n = 0;
  for (size_t off = 0; off < len;) {
    size_t cl = TN_MIN(len - off, tn_utf8_len_lead((uint8_t)text[off]));
    syms[n] = (struct sym){n - 1, off + cl == len ? -1 : n + 1, (uint32_t)off,
                           (uint32_t)cl};
    off += cl;
    n++;
  }
  for (int32_t i = 1; i < n; i++)
    if (!try_bigram(tok, text, syms, &h, i - 1, i)) goto out;
  while (h.n > 0) {
    struct tn_bigram bg = tn_bigram_heap_pop(&h);
    struct sym *l = &syms[bg.left], *r = &syms[bg.right];
    if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size) continue;
    l->n += r->n;
    r->n = 0;
    l->next = r->next;
    if (r->next >= 0) syms[r->next].prev = bg.left;
    if (!try_bigram(tok, text, syms, &h, l->prev, bg.left) ||
        !try_bigram(tok, text, syms, &h, bg.left, l->next))
      goto out;
  }
  for (int32_t i = 0; i != -1; i = syms[i].next) {
    const struct sym *s = &syms[i];
    int32_t id = tn_tok_lookup(tok, text + s->off, s->n);
    if (id >= 0) {
      if ((st = tn_ids_push(out, id))) goto out;
      continue;
    }
    for (uint32_t j = 0; j < s->n; j++) {
      int32_t b = tok->byte_tok[(uint8_t)text[s->off + j]];
      if (b < 0) b = tok->unk;
      if (b >= 0 && (st = tn_ids_push(out, b))) goto out;
    }
  }
  st = TN_OK;
out:
  free(syms);
  free(h.v);
  return st;
}
