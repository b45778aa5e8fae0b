/*
 * match.c: the grammar matcher, the vocabulary trie and token masks.
 *
 * Parse state. A stack is a chain of nodes (pos, parent): pos is a code
 * index where matching continues, parent the node to return to when pos's
 * alternative ends (none: the grammar may end there). A state is the set
 * of stacks whose top sits on a byte set, plus `accept` (the grammar may
 * end). Taking a byte keeps the stacks whose top set holds it, steps past
 * it and expands: a rule reference pushes a return node (unless it is the
 * last element of its alternative: then the callee returns straight to
 * our parent, so loops written as right recursion keep the stack flat),
 * an alternative's end pops. gbnf.c refused grammars where expanding
 * could loop without consuming a byte, so expansion ends.
 *
 * Nodes live in a scratch arena and are hash-consed: the same (pos,
 * parent) is always the same node index, so equal stacks are equal
 * indices, and a state is canonical once its tops are sorted. The arena
 * is a stack: the trie walk below pops what a finished subtree made.
 * Popping removes those nodes from the hash table newest first, which
 * keeps linear probing correct (a node still there was inserted before
 * every node removed, so no probe run through a removed slot).
 *
 * Between tokens a matcher keeps its state serialized (each stack as its
 * list of positions, stacks sorted), which is also the mask cache's key.
 *
 * Masks. The tokens' bytes form a trie stored in preorder (node i's
 * subtree is i .. end[i]). Walking it with the state of each depth
 * computes every token's fate with one advance per trie node, and a dead
 * state skips its whole subtree. Most of a walk in free text (inside a
 * JSON string) is one state stepping to itself: states made only of the
 * nodes that existed before the walk began (the walk never pops those)
 * remember, per byte, the state they step to when it is also such a
 * state, or that they die; those steps are a table lookup.
 */
#include "grammar/grammar_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define NONE UINT32_MAX
/* Expansion steps one mask (or one token) may take: a hostile grammar
 * (thousands of live alternatives) ends in an error, not a stall. */
#define WORK_MAX (1ull << 26)

struct node {
  uint32_t pos, parent, depth;
};

/* A remembered state of the walk: the state each byte steps to. */
#define MEMO_MAX 8192
#define MEMO_UNKNOWN UINT16_MAX
#define MEMO_DEAD (UINT16_MAX - 1)
struct memo {
  uint32_t off, n; /* tops in scratch.memo_tops */
  bool accept;
  uint16_t next[256]; /* memo index, MEMO_DEAD or MEMO_UNKNOWN */
};
/* Nodes a walk keeps before it starts popping them again. */
#define WALK_KEEP_NODES (1u << 20)

struct scratch {
  const struct tn_grammar *g;
  struct node *nodes;
  uint32_t n_nodes, cap_nodes;
  uint32_t *ht; /* node index + 1 */
  uint32_t ht_cap;
  uint32_t *tops; /* states of the walk, one after another */
  uint32_t n_tops, cap_tops;
  uint32_t *work; /* expansion worklist: (pos, parent) pairs */
  uint32_t cap_work;
  uint32_t *seen; /* expansion's visited (pos, parent) pairs */
  uint32_t n_seen, cap_seen;
  bool overflow;             /* a bound was passed */
  uint64_t steps, steps_max; /* expansion steps this walk, and the budget */
  /* the walk's memo */
  uint32_t perm; /* nodes below this index are never popped */
  struct memo *memo;
  uint32_t n_memo, cap_memo;
  uint32_t *memo_ht; /* memo index + 1, by state */
  uint32_t memo_ht_cap;
  uint32_t *memo_tops;
  uint32_t n_memo_tops, cap_memo_tops;
};

/* A state in the scratch: tops[off .. off + n), or memo_tops[...] when
 * in_memo. */
struct state {
  uint32_t off, n;
  bool accept;
  bool in_memo;
  uint16_t memo; /* MEMO_UNKNOWN when not remembered */
};

struct tn_grammar_vocab {
  int32_t n_vocab;
  uint32_t n_trie;
  uint8_t *label;
  uint16_t *depth;
  uint32_t *end;
  uint32_t *tok_first; /* [n_trie + 1] into toks */
  int32_t *toks;
  uint32_t max_depth;
  int32_t *eog;
  int32_t n_eog;
  /* piece bytes of every token (accept) */
  uint32_t *piece_off; /* [n_vocab + 1] */
  char *pieces;
  bool *is_eog;
  struct scratch sc;
  /* mask cache */
  struct centry **buckets;
  uint32_t n_buckets;
  uint32_t n_entries;
  size_t cache_bytes, cache_max;
  uint64_t tick;
  struct tn_grammar_vocab_stats stats;
};

struct centry {
  struct centry *next;
  uint64_t h, fp0, fp1, last;
  uint32_t key_n;
  uint32_t *key;
  uint64_t *bits;
};

struct tn_grammar_matcher {
  struct tn_grammar *g;
  struct tn_grammar_vocab *v; /* NULL: bytes only */
  struct scratch own;         /* when v is NULL */
  uint32_t *key;              /* serialized state */
  uint32_t key_n, key_cap;
  bool accept;
};

/* ---- scratch arena */

static void scratch_free(struct scratch *s) {
  free(s->nodes);
  free(s->ht);
  free(s->tops);
  free(s->work);
  free(s->seen);
  free(s->memo_tops);
  free(s->memo);
  free(s->memo_ht);
  memset(s, 0, sizeof *s);
}

static inline uint32_t node_hash(uint32_t pos, uint32_t parent) {
  uint64_t h = ((uint64_t)pos << 32 | parent) * 0x9e3779b97f4a7c15ull;
  return (uint32_t)(h >> 32);
}

static bool ht_rebuild(struct scratch *s, uint32_t cap) {
  uint32_t *t = calloc(cap, sizeof *t);
  if (!t) return false;
  for (uint32_t i = 0; i < s->n_nodes; i++) {
    uint32_t j = node_hash(s->nodes[i].pos, s->nodes[i].parent) & (cap - 1);
    while (t[j]) j = (j + 1) & (cap - 1);
    t[j] = i + 1;
  }
  free(s->ht);
  s->ht = t;
  s->ht_cap = cap;
  return true;
}

/* The node (pos, parent), made if new; NONE when out of room. */
static uint32_t mk(struct scratch *s, uint32_t pos, uint32_t parent) {
  uint32_t h = node_hash(pos, parent);
  if (s->ht_cap) {
    for (uint32_t j = h & (s->ht_cap - 1); s->ht[j];
         j = (j + 1) & (s->ht_cap - 1)) {
      const struct node *n = &s->nodes[s->ht[j] - 1];
      if (n->pos == pos && n->parent == parent) return s->ht[j] - 1;
    }
  }
  uint32_t depth = parent == NONE ? 1 : s->nodes[parent].depth + 1;
  if (depth > TN_GRAMMAR_MAX_DEPTH || s->n_nodes >= (1u << 28)) {
    s->overflow = true;
    return NONE;
  }
  if ((s->n_nodes + 1) * 2 > s->ht_cap &&
      !ht_rebuild(s, s->ht_cap ? s->ht_cap * 2 : 1024)) {
    s->overflow = true;
    return NONE;
  }
  if (s->n_nodes == s->cap_nodes) {
    uint32_t nc = s->cap_nodes ? s->cap_nodes * 2 : 1024;
    struct node *nn = realloc(s->nodes, nc * sizeof *nn);
    if (!nn) {
      s->overflow = true;
      return NONE;
    }
    s->nodes = nn;
    s->cap_nodes = nc;
  }
  uint32_t id = s->n_nodes++;
  s->nodes[id] = (struct node){pos, parent, depth};
  uint32_t j = h & (s->ht_cap - 1);
  while (s->ht[j]) j = (j + 1) & (s->ht_cap - 1);
  s->ht[j] = id + 1;
  return id;
}

/* Pops nodes down to n (newest first). */
static void rollback(struct scratch *s, uint32_t n) {
  while (s->n_nodes > n) {
    uint32_t id = --s->n_nodes;
    const struct node *nd = &s->nodes[id];
    uint32_t j = node_hash(nd->pos, nd->parent) & (s->ht_cap - 1);
    while (s->ht[j] != id + 1) j = (j + 1) & (s->ht_cap - 1);
    s->ht[j] = 0;
  }
}

static void reset(struct scratch *s, const struct tn_grammar *g) {
  s->g = g;
  rollback(s, 0);
  s->n_tops = 0;
  s->overflow = false;
  s->n_memo = 0;
  s->n_memo_tops = 0;
  if (s->memo_ht) memset(s->memo_ht, 0, s->memo_ht_cap * sizeof *s->memo_ht);
  s->perm = 0;
  s->steps = 0;
  s->steps_max = WORK_MAX;
}

static bool tops_push(struct scratch *s, uint32_t id) {
  if (s->n_tops == s->cap_tops) {
    uint32_t nc = s->cap_tops ? s->cap_tops * 2 : 1024;
    uint32_t *t = realloc(s->tops, nc * sizeof *t);
    if (!t) {
      s->overflow = true;
      return false;
    }
    s->tops = t;
    s->cap_tops = nc;
  }
  s->tops[s->n_tops++] = id;
  return true;
}

static bool work_push(struct scratch *s, uint32_t *n_work, uint32_t pos,
                      uint32_t parent) {
  if (*n_work + 2 > s->cap_work) {
    uint32_t nc = s->cap_work ? s->cap_work * 2 : 256;
    if (nc > (1u << 22)) {
      s->overflow = true;
      return false;
    }
    uint32_t *t = realloc(s->work, nc * sizeof *t);
    if (!t) {
      s->overflow = true;
      return false;
    }
    s->work = t;
    s->cap_work = nc;
  }
  s->work[(*n_work)++] = pos;
  s->work[(*n_work)++] = parent;
  return true;
}

/* Each (pos, parent) is expanded once per expansion; false if seen. */
static bool first_visit(struct scratch *s, uint32_t pos, uint32_t parent) {
  for (uint32_t i = 0; i < s->n_seen; i += 2)
    if (s->seen[i] == pos && s->seen[i + 1] == parent) return false;
  if (s->n_seen + 2 > s->cap_seen) {
    uint32_t nc = s->cap_seen ? s->cap_seen * 2 : 64;
    if (nc > 16u * TN_GRAMMAR_MAX_STACKS) {
      s->overflow = true;
      return false;
    }
    uint32_t *t = realloc(s->seen, nc * sizeof *t);
    if (!t) {
      s->overflow = true;
      return false;
    }
    s->seen = t;
    s->cap_seen = nc;
  }
  s->seen[s->n_seen++] = pos;
  s->seen[s->n_seen++] = parent;
  return true;
}

/* Expands (pos, parent) to byte-set tops appended to the state being
 * built (it starts at st->off), setting st->accept where it may end. */
static void expand(struct scratch *s, struct state *st, uint32_t pos,
                   uint32_t parent) {
  const struct tn_grammar *g = s->g;
  uint32_t n_work = 0;
  s->n_seen = 0;
  work_push(s, &n_work, pos, parent);
  while (n_work && !s->overflow) {
    uint32_t par = s->work[--n_work];
    uint32_t p = s->work[--n_work];
    s->steps += 1 + s->n_seen / 8;
    if (s->steps > s->steps_max) {
      s->overflow = true;
      return;
    }
    if (!first_visit(s, p, par)) continue;
    uint32_t e = g->code[p];
    if (EL_KIND(e) == EL_SET) {
      uint32_t id = mk(s, p, par);
      if (id == NONE) return;
      bool have = false;
      for (uint32_t i = st->off; i < s->n_tops && !have; i++)
        have = s->tops[i] == id;
      if (have) continue;
      if (s->n_tops - st->off >= TN_GRAMMAR_MAX_STACKS) {
        s->overflow = true;
        return;
      }
      tops_push(s, id);
    } else if (EL_KIND(e) == EL_END) {
      if (par == NONE)
        st->accept = true;
      else
        work_push(s, &n_work, s->nodes[par].pos, s->nodes[par].parent);
    } else {
      uint32_t cont = par;
      if (EL_KIND(g->code[p + 1]) != EL_END) {
        cont = mk(s, p + 1, par);
        if (cont == NONE) return;
      }
      uint32_t r = EL_ARG(e);
      /* pushed in reverse so alternatives expand in order */
      for (uint32_t a = g->rule_alt[r + 1]; a > g->rule_alt[r]; a--)
        if (!work_push(s, &n_work, g->alt_start[a - 1], cont)) return;
    }
  }
}

/* st2 = st advanced by byte b (st2->off must be s->n_tops). */
static void advance(struct scratch *s, const struct state *st, unsigned b,
                    struct state *st2) {
  const struct tn_grammar *g = s->g;
  st2->off = s->n_tops;
  st2->accept = false;
  st2->memo = MEMO_UNKNOWN;
  st2->in_memo = false;
  for (uint32_t i = 0; i < st->n && !s->overflow; i++) {
    uint32_t top =
        st->in_memo ? s->memo_tops[st->off + i] : s->tops[st->off + i];
    const struct node *nd = &s->nodes[top];
    uint32_t e = g->code[nd->pos];
    if (!set_has(g->sets[EL_ARG(e)], b)) continue;
    uint32_t pos = nd->pos + 1, par = nd->parent;
    /* step past the byte: an alternative's end returns at once */
    if (EL_KIND(g->code[pos]) == EL_END) {
      if (par == NONE) {
        st2->accept = true;
        continue;
      }
      pos = s->nodes[par].pos;
      par = s->nodes[par].parent;
    }
    expand(s, st2, pos, par);
  }
  st2->n = s->n_tops - st2->off;
}

static int u32_cmp(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/* ---- serialized states: [accept, n_stacks, (depth, pos top..bottom)*],
 * stacks in sorted order */

struct rec {
  const uint32_t *p;
  uint32_t n;
};

static int rec_cmp(const void *a, const void *b) {
  const struct rec *x = a, *y = b;
  uint32_t n = x->n < y->n ? x->n : y->n;
  for (uint32_t i = 0; i < n; i++)
    if (x->p[i] != y->p[i]) return x->p[i] < y->p[i] ? -1 : 1;
  return x->n < y->n ? -1 : x->n > y->n;
}

static bool serialize(const struct scratch *s, const struct state *st,
                      uint32_t **key, uint32_t *key_n, uint32_t *key_cap) {
  size_t need = 2;
  for (uint32_t i = 0; i < st->n; i++)
    need += 1 + s->nodes[s->tops[st->off + i]].depth;
  uint32_t *tmp = malloc(need * sizeof *tmp);
  struct rec *recs = malloc((st->n + 1) * sizeof *recs);
  if (!tmp || !recs) {
    free(tmp);
    free(recs);
    return false;
  }
  size_t at = 0;
  for (uint32_t i = 0; i < st->n; i++) {
    uint32_t id = s->tops[st->off + i];
    recs[i].p = tmp + at;
    recs[i].n = s->nodes[id].depth + 1;
    tmp[at++] = s->nodes[id].depth;
    for (; id != NONE; id = s->nodes[id].parent) tmp[at++] = s->nodes[id].pos;
  }
  qsort(recs, st->n, sizeof *recs, rec_cmp);
  if (need > *key_cap) {
    uint32_t *k = realloc(*key, need * sizeof *k);
    if (!k) {
      free(tmp);
      free(recs);
      return false;
    }
    *key = k;
    *key_cap = (uint32_t)need;
  }
  uint32_t *k = *key;
  k[0] = st->accept;
  k[1] = st->n;
  at = 2;
  for (uint32_t i = 0; i < st->n; i++) {
    memcpy(k + at, recs[i].p, recs[i].n * sizeof *k);
    at += recs[i].n;
  }
  *key_n = (uint32_t)at;
  free(tmp);
  free(recs);
  return true;
}

/* Rebuilds a serialized state in the scratch (after reset). */
static bool deserialize(struct scratch *s, const uint32_t *k, uint32_t n,
                        struct state *st) {
  st->off = s->n_tops;
  st->accept = k[0];
  st->memo = MEMO_UNKNOWN;
  st->in_memo = false;
  uint32_t at = 2;
  for (uint32_t i = 0; i < k[1]; i++) {
    uint32_t depth = k[at];
    if (at + 1 + depth > n) return false;
    uint32_t id = NONE;
    for (uint32_t j = depth; j > 0; j--) {
      id = mk(s, k[at + j], id);
      if (id == NONE) return false;
    }
    if (!tops_push(s, id)) return false;
    at += 1 + depth;
  }
  st->n = s->n_tops - st->off;
  return true;
}

/* The start state: the root's alternatives expanded. */
static bool initial(struct scratch *s, struct state *st) {
  const struct tn_grammar *g = s->g;
  st->off = s->n_tops;
  st->accept = false;
  st->memo = MEMO_UNKNOWN;
  st->in_memo = false;
  for (uint32_t a = g->rule_alt[g->root]; a < g->rule_alt[g->root + 1]; a++)
    expand(s, st, g->alt_start[a], NONE);
  st->n = s->n_tops - st->off;
  return !s->overflow;
}

/* ---- the matcher */

static struct scratch *sc_of(struct tn_grammar_matcher *m) {
  return m->v ? &m->v->sc : &m->own;
}

static bool load(struct tn_grammar_matcher *m, struct state *st) {
  struct scratch *s = sc_of(m);
  reset(s, m->g);
  return deserialize(s, m->key, m->key_n, st);
}

static bool store(struct tn_grammar_matcher *m, const struct state *st) {
  struct scratch *s = sc_of(m);
  if (!serialize(s, st, &m->key, &m->key_n, &m->key_cap)) return false;
  m->accept = st->accept;
  return true;
}

enum tn_status tn_grammar_matcher_new(struct tn_grammar *g,
                                      struct tn_grammar_vocab *v,
                                      struct tn_grammar_matcher **out,
                                      struct tn_error *err) {
  *out = NULL;
  struct tn_grammar_matcher *m = calloc(1, sizeof *m);
  if (!m) return tn_error_set(err, TN_ENOMEM, "grammar: out of memory");
  tn_grammar_retain(g);
  m->g = g;
  m->v = v;
  struct scratch *s = sc_of(m);
  reset(s, g);
  struct state st;
  if (!initial(s, &st) || !store(m, &st)) {
    tn_grammar_matcher_free(m);
    return tn_error_set(err, TN_ERANGE,
                        "grammar: its start expands past %d parse stacks",
                        TN_GRAMMAR_MAX_STACKS);
  }
  *out = m;
  return TN_OK;
}

void tn_grammar_matcher_free(struct tn_grammar_matcher *m) {
  if (!m) return;
  tn_grammar_release(m->g);
  scratch_free(&m->own);
  free(m->key);
  free(m);
}

bool tn_grammar_matcher_accept_bytes(struct tn_grammar_matcher *m,
                                     const char *b, size_t n) {
  struct scratch *s = sc_of(m);
  struct state st;
  if (!load(m, &st)) return false;
  for (size_t i = 0; i < n; i++) {
    struct state nx;
    advance(s, &st, (unsigned char)b[i], &nx);
    if (s->overflow || (nx.n == 0 && !nx.accept)) return false;
    st = nx;
  }
  return store(m, &st);
}

bool tn_grammar_matcher_accept(struct tn_grammar_matcher *m, int32_t id) {
  struct tn_grammar_vocab *v = m->v;
  if (!v || id < 0 || id >= v->n_vocab) return false;
  if (v->is_eog[id]) return m->accept;
  uint32_t a = v->piece_off[id], b = v->piece_off[id + 1];
  if (a == b) return false; /* special tokens: never inside a grammar */
  return tn_grammar_matcher_accept_bytes(m, v->pieces + a, b - a);
}

bool tn_grammar_matcher_can_end(const struct tn_grammar_matcher *m) {
  return m->accept;
}

bool tn_grammar_matcher_done(const struct tn_grammar_matcher *m) {
  return m->accept && m->key_n >= 2 && m->key[1] == 0;
}

size_t tn_grammar_matcher_forced(const struct tn_grammar_matcher *m, char *buf,
                                 size_t cap, bool *completes) {
  struct tn_grammar_matcher *mm = (struct tn_grammar_matcher *)m;
  struct scratch *s = sc_of(mm);
  *completes = false;
  struct state st;
  if (!load(mm, &st)) return 0;
  const struct tn_grammar *g = m->g;
  size_t n = 0;
  for (;;) {
    if (st.n == 0) {
      *completes = st.accept;
      return n;
    }
    if (st.accept || n == cap) return n;
    uint64_t u[4] = {0};
    for (uint32_t i = 0; i < st.n; i++) {
      const uint64_t *set =
          g->sets[EL_ARG(g->code[s->nodes[s->tops[st.off + i]].pos])];
      for (int w = 0; w < 4; w++) u[w] |= set[w];
    }
    int count = 0, byte = -1;
    for (int w = 0; w < 4; w++) {
      count += __builtin_popcountll(u[w]);
      if (u[w] && byte < 0) byte = w * 64 + __builtin_ctzll(u[w]);
    }
    if (count != 1) return n;
    struct state nx;
    advance(s, &st, (unsigned)byte, &nx);
    if (s->overflow) return n;
    buf[n++] = (char)byte;
    st = nx;
  }
}

/* ---- vocabulary */

struct tok_sort {
  const char *p;
  uint32_t n;
  int32_t id;
};

static int tok_cmp(const void *a, const void *b) {
  const struct tok_sort *x = a, *y = b;
  uint32_t n = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->p, y->p, n);
  if (c) return c;
  if (x->n != y->n) return x->n < y->n ? -1 : 1;
  return x->id < y->id ? -1 : x->id > y->id;
}

void tn_grammar_vocab_free(struct tn_grammar_vocab *v) {
  if (!v) return;
  free(v->label);
  free(v->depth);
  free(v->end);
  free(v->tok_first);
  free(v->toks);
  free(v->eog);
  free(v->piece_off);
  free(v->pieces);
  free(v->is_eog);
  scratch_free(&v->sc);
  for (uint32_t i = 0; i < v->n_buckets; i++) {
    struct centry *e = v->buckets[i];
    while (e) {
      struct centry *nx = e->next;
      free(e->key);
      free(e->bits);
      free(e);
      e = nx;
    }
  }
  free(v->buckets);
  free(v);
}

int32_t tn_grammar_vocab_n(const struct tn_grammar_vocab *v) {
  return v->n_vocab;
}

void tn_grammar_vocab_stats(const struct tn_grammar_vocab *v,
                            struct tn_grammar_vocab_stats *out) {
  *out = v->stats;
  out->cache_bytes = v->cache_bytes;
}

enum tn_status tn_grammar_vocab_new(const struct tn_tokenizer *tok,
                                    size_t cache_bytes,
                                    struct tn_grammar_vocab **out,
                                    struct tn_error *err) {
  *out = NULL;
  int32_t nv = tn_tokenizer_n_vocab(tok);
  struct tn_grammar_vocab *v = calloc(1, sizeof *v);
  struct tok_sort *ts = NULL;
  if (!v) goto nomem;
  v->n_vocab = nv;
  v->cache_max = cache_bytes;
  v->piece_off = malloc(((size_t)nv + 1) * sizeof *v->piece_off);
  v->is_eog = calloc((size_t)nv, sizeof *v->is_eog);
  v->eog = malloc(((size_t)nv + 1) * sizeof *v->eog);
  ts = malloc(((size_t)nv + 1) * sizeof *ts);
  if (!v->piece_off || !v->is_eog || !v->eog || !ts) goto nomem;
  /* pieces */
  size_t cap = 1 << 20, used = 0;
  v->pieces = malloc(cap);
  if (!v->pieces) goto nomem;
  char buf[1024];
  for (int32_t id = 0; id < nv; id++) {
    v->piece_off[id] = (uint32_t)used;
    if (tn_tokenizer_is_eog(tok, id)) {
      v->is_eog[id] = true;
      v->eog[v->n_eog++] = id;
      continue;
    }
    if (tn_tokenizer_is_special(tok, id)) continue;
    size_t n = tn_tokenizer_piece(tok, id, buf, sizeof buf, false);
    if (n > sizeof buf) n = 0; /* absurdly long: never allowed */
    if (used + n > cap) {
      cap *= 2;
      char *p = realloc(v->pieces, cap);
      if (!p) goto nomem;
      v->pieces = p;
    }
    memcpy(v->pieces + used, buf, n);
    used += n;
  }
  v->piece_off[nv] = (uint32_t)used;
  /* sort non-empty pieces, build the preorder trie */
  size_t nt = 0;
  for (int32_t id = 0; id < nv; id++) {
    uint32_t a = v->piece_off[id], b = v->piece_off[id + 1];
    if (a == b) continue;
    ts[nt++] = (struct tok_sort){v->pieces + a, b - a, id};
  }
  qsort(ts, nt, sizeof *ts, tok_cmp);
  size_t n_nodes = 1;
  uint32_t max_len = 0;
  for (size_t i = 0; i < nt; i++) {
    uint32_t lcp = 0;
    if (i > 0) {
      uint32_t m = ts[i].n < ts[i - 1].n ? ts[i].n : ts[i - 1].n;
      while (lcp < m && ts[i].p[lcp] == ts[i - 1].p[lcp]) lcp++;
    }
    n_nodes += ts[i].n - lcp;
    if (ts[i].n > max_len) max_len = ts[i].n;
  }
  v->n_trie = (uint32_t)n_nodes;
  v->max_depth = max_len;
  v->label = malloc(n_nodes);
  v->depth = malloc(n_nodes * sizeof *v->depth);
  v->end = malloc(n_nodes * sizeof *v->end);
  v->tok_first = malloc((n_nodes + 1) * sizeof *v->tok_first);
  v->toks = malloc((nt + 1) * sizeof *v->toks);
  uint32_t *path = malloc(((size_t)max_len + 2) * sizeof *path);
  if (!v->label || !v->depth || !v->end || !v->tok_first || !v->toks || !path)
    goto nomem_path;
  v->label[0] = 0;
  v->depth[0] = 0;
  v->tok_first[0] = 0;
  uint32_t nn = 1, depth = 0; /* path[0..depth] open */
  path[0] = 0;
  size_t ntok = 0;
  for (size_t i = 0; i < nt; i++) {
    uint32_t lcp = 0;
    if (i > 0) {
      uint32_t m = ts[i].n < ts[i - 1].n ? ts[i].n : ts[i - 1].n;
      while (lcp < m && ts[i].p[lcp] == ts[i - 1].p[lcp]) lcp++;
    }
    while (depth > lcp) v->end[path[depth--]] = nn;
    for (uint32_t d = lcp; d < ts[i].n; d++) {
      v->label[nn] = (uint8_t)ts[i].p[d];
      v->depth[nn] = (uint16_t)(d + 1);
      v->tok_first[nn] = (uint32_t)ntok;
      path[++depth] = nn++;
    }
    v->toks[ntok++] = ts[i].id; /* belongs to path[depth] */
  }
  while (depth > 0) v->end[path[depth--]] = nn;
  v->end[0] = nn;
  v->tok_first[nn] = (uint32_t)ntok;
  free(path);
  free(ts);
  if (max_len > UINT16_MAX) {
    tn_grammar_vocab_free(v);
    return tn_error_set(err, TN_EFORMAT, "grammar: a token of %u bytes",
                        max_len);
  }
  *out = v;
  return TN_OK;
nomem_path:
  free(path);
nomem:
  free(ts);
  tn_grammar_vocab_free(v);
  return tn_error_set(err, TN_ENOMEM, "grammar: out of memory");
}

/* ---- the walk */

static void set_bit(uint64_t *bits, int32_t id) {
  bits[id >> 6] |= 1ull << (id & 63);
}

static uint32_t state_hash(const uint32_t *tops, uint32_t n, bool accept) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ accept;
  for (uint32_t i = 0; i < n; i++) h = (h ^ tops[i]) * 0x100000001b3ull;
  return (uint32_t)(h ^ (h >> 32));
}

/* The memo entry of st (made if new); MEMO_UNKNOWN when the memo is full
 * or st holds nodes that may be popped. */
static uint16_t memo_find(struct scratch *s, const struct state *st) {
  const uint32_t *tops = s->tops + st->off;
  for (uint32_t i = 0; i < st->n; i++)
    if (tops[i] >= s->perm) return MEMO_UNKNOWN;
  if (!s->memo_ht) {
    s->memo_ht = calloc(2 * MEMO_MAX, sizeof *s->memo_ht);
    if (!s->memo_ht) return MEMO_UNKNOWN;
    s->memo_ht_cap = 2 * MEMO_MAX;
  }
  uint32_t mask = s->memo_ht_cap - 1;
  uint32_t j = state_hash(tops, st->n, st->accept) & mask;
  for (; s->memo_ht[j]; j = (j + 1) & mask) {
    const struct memo *me = &s->memo[s->memo_ht[j] - 1];
    if (me->n == st->n && me->accept == st->accept &&
        (st->n == 0 ||
         memcmp(s->memo_tops + me->off, tops, st->n * sizeof *tops) == 0))
      return (uint16_t)(s->memo_ht[j] - 1);
  }
  if (s->n_memo == MEMO_MAX) return MEMO_UNKNOWN;
  if (s->n_memo == s->cap_memo) {
    uint32_t nc = s->cap_memo ? s->cap_memo * 2 : 64;
    struct memo *m = realloc(s->memo, nc * sizeof *m);
    if (!m) return MEMO_UNKNOWN;
    s->memo = m;
    s->cap_memo = nc;
  }
  if (s->n_memo_tops + st->n > s->cap_memo_tops) {
    uint32_t nc = (s->n_memo_tops + st->n) * 2 + 64;
    uint32_t *t = realloc(s->memo_tops, nc * sizeof *t);
    if (!t) return MEMO_UNKNOWN;
    s->memo_tops = t;
    s->cap_memo_tops = nc;
  }
  struct memo *me = &s->memo[s->n_memo];
  me->off = s->n_memo_tops;
  me->n = st->n;
  me->accept = st->accept;
  if (st->n) memcpy(s->memo_tops + me->off, tops, st->n * sizeof *tops);
  s->n_memo_tops += st->n;
  memset(me->next, 0xff, sizeof me->next);
  s->memo_ht[j] = s->n_memo + 1;
  return (uint16_t)s->n_memo++;
}

/* Sorts st's tops (canonical form) and finds its memo entry. */
static void canon(struct scratch *s, struct state *st) {
  if (st->n > 1) qsort(s->tops + st->off, st->n, sizeof(uint32_t), u32_cmp);
  st->memo = memo_find(s, st);
}

/* Walks the trie from the state root, setting the bit of every token the
 * state can take. Nodes are kept for the whole walk (hash-consing makes
 * the same stack the same node), so every state met can be remembered
 * with the states its bytes lead to: after the first few, most trie nodes
 * cost one table lookup. Past WALK_KEEP_NODES nodes the walk pops what
 * each finished subtree made instead, and stops remembering new states. */
static bool walk(struct tn_grammar_vocab *v, struct scratch *s,
                 struct state *root, uint64_t *bits) {
  uint32_t md = v->max_depth + 1;
  struct state *stk = malloc((size_t)md * sizeof *stk);
  uint32_t *mark = malloc((size_t)md * sizeof *mark);
  uint32_t *tmark = malloc((size_t)md * sizeof *tmark);
  if (!stk || !mark || !tmark) {
    free(stk);
    free(mark);
    free(tmark);
    return false;
  }
  s->perm = UINT32_MAX; /* nothing is popped until the nodes run high */
  canon(s, root);
  stk[0] = *root;
  mark[0] = s->n_nodes;
  tmark[0] = s->n_tops;
  uint64_t visited = 0;
  uint32_t i = 1;
  while (i < v->n_trie) {
    uint32_t d = v->depth[i];
    struct state *par = &stk[d - 1];
    unsigned b = v->label[i];
    visited++;
    struct state nx;
    uint16_t mn =
        par->memo != MEMO_UNKNOWN ? s->memo[par->memo].next[b] : MEMO_UNKNOWN;
    s->n_tops = tmark[d - 1];
    if (s->perm != UINT32_MAX)
      rollback(s, mark[d - 1] > s->perm ? mark[d - 1] : s->perm);
    if (mn == MEMO_DEAD) {
      i = v->end[i];
      continue;
    }
    if (mn != MEMO_UNKNOWN) {
      const struct memo *me = &s->memo[mn];
      nx.off = me->off;
      nx.n = me->n;
      nx.accept = me->accept;
      nx.in_memo = true;
      nx.memo = mn;
    } else {
      advance(s, par, b, &nx);
      if (s->overflow) break;
      canon(s, &nx);
      if (par->memo != MEMO_UNKNOWN) {
        if (nx.n == 0 && !nx.accept)
          s->memo[par->memo].next[b] = MEMO_DEAD;
        else if (nx.memo != MEMO_UNKNOWN)
          s->memo[par->memo].next[b] = nx.memo;
      }
      if (s->perm == UINT32_MAX && s->n_nodes > WALK_KEEP_NODES)
        s->perm = s->n_nodes;
    }
    if (nx.n == 0 && !nx.accept) {
      i = v->end[i];
      continue;
    }
    for (uint32_t t = v->tok_first[i]; t < v->tok_first[i + 1]; t++)
      set_bit(bits, v->toks[t]);
    stk[d] = nx;
    mark[d] = s->n_nodes;
    tmark[d] = s->n_tops;
    i++;
  }
  v->stats.trie_nodes += visited;
  bool ok = !s->overflow;
  free(stk);
  free(mark);
  free(tmark);
  return ok;
}

/* ---- the mask cache */

static uint64_t key_hash(const struct tn_grammar *g, const uint32_t *k,
                         uint32_t n) {
  uint64_t h = g->fp[0] ^ 0x9e3779b97f4a7c15ull;
  for (uint32_t i = 0; i < n; i++) h = (h ^ k[i]) * 0x100000001b3ull;
  return h ^ (h >> 29);
}

static size_t bits_words(const struct tn_grammar_vocab *v) {
  return ((size_t)v->n_vocab + 63) / 64;
}

static struct centry *cache_get(struct tn_grammar_vocab *v,
                                const struct tn_grammar *g, uint64_t h,
                                const uint32_t *k, uint32_t n) {
  if (!v->n_buckets) return NULL;
  for (struct centry *e = v->buckets[h & (v->n_buckets - 1)]; e; e = e->next)
    if (e->h == h && e->fp0 == g->fp[0] && e->fp1 == g->fp[1] &&
        e->key_n == n && memcmp(e->key, k, n * sizeof *k) == 0)
      return e;
  return NULL;
}

static void cache_evict(struct tn_grammar_vocab *v, size_t need) {
  while (v->n_entries && v->cache_bytes + need > v->cache_max) {
    struct centry **oldest = NULL;
    for (uint32_t b = 0; b < v->n_buckets; b++)
      for (struct centry **pe = &v->buckets[b]; *pe; pe = &(*pe)->next)
        if (!oldest || (*pe)->last < (*oldest)->last) oldest = pe;
    struct centry *e = *oldest;
    *oldest = e->next;
    v->cache_bytes -=
        sizeof *e + e->key_n * sizeof *e->key + bits_words(v) * sizeof *e->bits;
    v->n_entries--;
    free(e->key);
    free(e->bits);
    free(e);
  }
}

static void cache_put(struct tn_grammar_vocab *v, const struct tn_grammar *g,
                      uint64_t h, const uint32_t *k, uint32_t n,
                      const uint64_t *bits) {
  size_t words = bits_words(v);
  size_t size = sizeof(struct centry) + n * sizeof *k + words * 8;
  if (size > v->cache_max) return;
  cache_evict(v, size);
  if (!v->n_buckets) {
    v->buckets = calloc(1024, sizeof *v->buckets);
    if (!v->buckets) return;
    v->n_buckets = 1024;
  }
  struct centry *e = calloc(1, sizeof *e);
  if (!e) return;
  e->key = malloc(n * sizeof *k);
  e->bits = malloc(words * 8);
  if (!e->key || !e->bits) {
    free(e->key);
    free(e->bits);
    free(e);
    return;
  }
  memcpy(e->key, k, n * sizeof *k);
  memcpy(e->bits, bits, words * 8);
  e->key_n = n;
  e->h = h;
  e->fp0 = g->fp[0];
  e->fp1 = g->fp[1];
  e->last = ++v->tick;
  struct centry **b = &v->buckets[h & (v->n_buckets - 1)];
  e->next = *b;
  *b = e;
  v->n_entries++;
  v->cache_bytes += size;
}

enum tn_status tn_grammar_matcher_mask(struct tn_grammar_matcher *m,
                                       uint64_t *bits, struct tn_error *err) {
  struct tn_grammar_vocab *v = m->v;
  size_t words = bits_words(v);
  v->stats.masks++;
  uint64_t h = key_hash(m->g, m->key, m->key_n);
  struct centry *e = cache_get(v, m->g, h, m->key, m->key_n);
  if (e) {
    e->last = ++v->tick;
    v->stats.cache_hits++;
    memcpy(bits, e->bits, words * 8);
    return TN_OK;
  }
  memset(bits, 0, words * 8);
  double t0 = tn_time_s();
  struct state st;
  bool ok = load(m, &st) && walk(v, &v->sc, &st, bits);
  v->stats.walk_seconds += tn_time_s() - t0;
  if (!ok)
    return tn_error_set(err, TN_ERANGE,
                        "grammar: the parse grew past its bounds (%d open "
                        "stacks, %d deep)",
                        TN_GRAMMAR_MAX_STACKS, TN_GRAMMAR_MAX_DEPTH);
  if (m->accept)
    for (int32_t i = 0; i < v->n_eog; i++) set_bit(bits, v->eog[i]);
  cache_put(v, m->g, h, m->key, m->key_n, bits);
  return TN_OK;
}
