/*
 * jinja.c: the public face of the interpreter: compiling a template,
 * contexts and the values a caller builds in them.
 */
#include <stdlib.h>
#include <string.h>

#include "jinja/jinja_internal.h"

enum tn_status tn_jinja_compile(const char *src, size_t n,
                                struct tn_jinja **out, struct tn_error *err) {
  *out = NULL;
  struct tn_jinja *t = calloc(1, sizeof(*t));
  if (!t) return tn_error_set(err, TN_ENOMEM, "chat template: out of memory");
  /* the tree points into the source: keep a copy with the tree */
  char *copy = ja_alloc(&t->arena, n + 1);
  if (!copy) {
    free(t);
    return tn_error_set(err, TN_ENOMEM, "chat template: out of memory");
  }
  /* as jinja2: newlines normalised to "\n", one trailing newline dropped */
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    if (src[i] == '\r') {
      copy[k++] = '\n';
      if (i + 1 < n && src[i + 1] == '\n') i++;
    } else {
      copy[k++] = src[i];
    }
  }
  if (k > 0 && copy[k - 1] == '\n') k--;
  copy[k] = '\0';
  n = k;
  if (!jinja_parse(t, copy, n, err)) {
    tn_jinja_free(t);
    return err ? err->status : TN_EINVAL;
  }
  *out = t;
  return TN_OK;
}

void tn_jinja_free(struct tn_jinja *t) {
  if (!t) return;
  ja_free(&t->arena);
  free(t);
}

bool tn_jinja_uses(const struct tn_jinja *t, const char *name) {
  size_t n = strlen(name);
  for (size_t i = 0; i < t->n_names; i++)
    if (t->names[i].n == n && memcmp(t->names[i].p, name, n) == 0)
      return true;
  return false;
}

struct tn_jinja_ctx *tn_jinja_ctx_new(size_t max_memory) {
  struct tn_jinja_ctx *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->arena.cap = max_memory;
  return c;
}

void tn_jinja_ctx_free(struct tn_jinja_ctx *c) {
  if (!c) return;
  ja_free(&c->arena);
  free(c);
}

/* Builders run outside a render: a small state whose failures (the arena's
 * cap) mark the context instead of unwinding a render. */
#define BUILD(c, fallback)                            \
  struct jstate *s = calloc(1, sizeof(*s));           \
  if (!s) {                                           \
    (c)->oom = true;                                  \
    return fallback;                                  \
  }                                                   \
  s->c = (c);                                         \
  tn_jinja_limits_default(&s->lim);                   \
  s->lim.max_output = SIZE_MAX / 2;                   \
  if (setjmp(s->jb)) {                                \
    for (unsigned i_ = 0; i_ < s->n_bufs; i_++)       \
      free(s->bufs[i_].p);                            \
    free(s);                                          \
    (c)->oom = true;                                  \
    return fallback;                                  \
  }

static struct jv placeholder_v = {.k = JK_NONE};

static struct tn_jinja_val *box(struct tn_jinja_ctx *c, struct jv v) {
  struct jv *b = ja_alloc(&c->arena, sizeof(*b));
  if (!b) {
    c->oom = true;
    return (struct tn_jinja_val *)&placeholder_v;
  }
  *b = v;
  return (struct tn_jinja_val *)b;
}

struct tn_jinja_val *tn_jinja_none(struct tn_jinja_ctx *c) {
  return box(c, jv_none());
}
struct tn_jinja_val *tn_jinja_bool(struct tn_jinja_ctx *c, bool b) {
  return box(c, jv_bool(b));
}
struct tn_jinja_val *tn_jinja_int(struct tn_jinja_ctx *c, int64_t i) {
  return box(c, jv_int(i));
}

struct tn_jinja_val *tn_jinja_str(struct tn_jinja_ctx *c, const char *p,
                                  size_t n) {
  char *d = ja_alloc(&c->arena, n + 1);
  if (!d) {
    c->oom = true;
    return (struct tn_jinja_val *)&placeholder_v;
  }
  if (n) memcpy(d, p, n);
  d[n] = '\0';
  return box(c, jv_str(d, n));
}

struct tn_jinja_val *tn_jinja_list(struct tn_jinja_ctx *c) {
  struct jlist *l = ja_alloc(&c->arena, sizeof(*l));
  if (!l) {
    c->oom = true;
    return (struct tn_jinja_val *)&placeholder_v;
  }
  *l = (struct jlist){0};
  return box(c, (struct jv){.k = JK_LIST, .u.l = l});
}

struct tn_jinja_val *tn_jinja_dict(struct tn_jinja_ctx *c) {
  struct jdict *d = ja_alloc(&c->arena, sizeof(*d));
  if (!d) {
    c->oom = true;
    return (struct tn_jinja_val *)&placeholder_v;
  }
  *d = (struct jdict){0};
  return box(c, (struct jv){.k = JK_DICT, .u.d = d});
}

void tn_jinja_list_append(struct tn_jinja_ctx *c, struct tn_jinja_val *list,
                          const struct tn_jinja_val *v) {
  struct jv *l = (struct jv *)list;
  if (l->k != JK_LIST || c->oom) return;
  BUILD(c, (void)0);
  jv_list_push(s, l, *(const struct jv *)v);
  free(s);
}

void tn_jinja_dict_set(struct tn_jinja_ctx *c, struct tn_jinja_val *dict,
                       const char *key, const struct tn_jinja_val *v) {
  struct jv *d = (struct jv *)dict;
  if (d->k != JK_DICT || c->oom) return;
  struct tn_jinja_val *k = tn_jinja_str(c, key, strlen(key));
  if (c->oom) return;
  BUILD(c, (void)0);
  jv_dict_set(s, d, *(struct jv *)k, *(const struct jv *)v);
  free(s);
}

enum tn_status tn_jinja_json(struct tn_jinja_ctx *c, const char *text,
                             size_t n, struct tn_jinja_val **out,
                             struct tn_error *err) {
  *out = (struct tn_jinja_val *)&placeholder_v;
  struct jstate *s = calloc(1, sizeof(*s));
  if (!s) return tn_error_set(err, TN_ENOMEM, "out of memory");
  s->c = c;
  tn_jinja_limits_default(&s->lim);
  s->lim.max_output = SIZE_MAX / 2;
  if (setjmp(s->jb)) {
    for (unsigned i = 0; i < s->n_bufs; i++) free(s->bufs[i].p);
    free(s);
    c->oom = true;
    return tn_error_set(err, TN_ENOMEM, "out of memory reading JSON");
  }
  struct jv v;
  size_t at = 0;
  bool ok = jv_parse_json(s, text, n, &v, &at);
  free(s);
  if (!ok)
    return tn_error_set(err, TN_EFORMAT, "invalid JSON at byte %zu", at);
  *out = box(c, v);
  return c->oom ? tn_error_set(err, TN_ENOMEM, "out of memory") : TN_OK;
}

bool tn_jinja_is_dict(const struct tn_jinja_val *v) {
  return ((const struct jv *)v)->k == JK_DICT;
}
bool tn_jinja_is_str(const struct tn_jinja_val *v) {
  return ((const struct jv *)v)->k == JK_STR;
}

struct tn_jinja_val *tn_jinja_dict_get(struct tn_jinja_ctx *c,
                                       const struct tn_jinja_val *v,
                                       const char *key) {
  (void)c;
  const struct jv *d = (const struct jv *)v;
  if (d->k != JK_DICT) return NULL;
  return (struct tn_jinja_val *)jv_dict_find(d, key, strlen(key));
}

void tn_jinja_set(struct tn_jinja_ctx *c, const char *name,
                  const struct tn_jinja_val *v) {
  if (c->oom) return;
  size_t n = strlen(name);
  char *d = ja_alloc(&c->arena, n + 1);
  if (!d) {
    c->oom = true;
    return;
  }
  memcpy(d, name, n + 1);
  struct jframe *g = &c->globals;
  for (size_t i = 0; i < g->n; i++)
    if (g->names[i].n == n && memcmp(g->names[i].p, name, n) == 0) {
      g->vals[i] = *(const struct jv *)v;
      return;
    }
  if (g->n == g->cap) {
    size_t cap = g->cap ? g->cap * 2 : 16;
    struct jstr *nn = ja_alloc(&c->arena, cap * sizeof(*nn));
    struct jv *vv = ja_alloc(&c->arena, cap * sizeof(*vv));
    if (!nn || !vv) {
      c->oom = true;
      return;
    }
    if (g->n) {
      memcpy(nn, g->names, g->n * sizeof(*nn));
      memcpy(vv, g->vals, g->n * sizeof(*vv));
    }
    g->names = nn;
    g->vals = vv;
    g->cap = cap;
  }
  g->names[g->n] = (struct jstr){d, n};
  g->vals[g->n] = *(const struct jv *)v;
  g->n++;
}

void tn_jinja_set_all(struct tn_jinja_ctx *c, const struct tn_jinja_val *dict) {
  const struct jv *d = (const struct jv *)dict;
  if (d->k != JK_DICT) return;
  for (size_t i = 0; i < d->u.d->n; i++) {
    const struct jv *k = &d->u.d->k[i];
    if (k->k != JK_STR || memchr(k->u.s.p, '\0', k->u.s.n)) continue;
    tn_jinja_set(c, k->u.s.p, (const struct tn_jinja_val *)&d->u.d->v[i]);
  }
}

size_t tn_jinja_list_len(const struct tn_jinja_val *v) {
  const struct jv *l = (const struct jv *)v;
  return l->k == JK_LIST ? l->u.l->n : 0;
}

struct tn_jinja_val *tn_jinja_list_get(const struct tn_jinja_val *v,
                                       size_t i) {
  const struct jv *l = (const struct jv *)v;
  if (l->k != JK_LIST || i >= l->u.l->n) return NULL;
  return (struct tn_jinja_val *)&l->u.l->v[i];
}

const char *tn_jinja_str_bytes(const struct tn_jinja_val *v, size_t *n) {
  const struct jv *x = (const struct jv *)v;
  if (x->k != JK_STR) return NULL;
  *n = x->u.s.n;
  return x->u.s.p;
}
