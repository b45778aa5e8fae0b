/*
 * value.c: the arena, values, and their text forms as Python writes them:
 * str(), repr() and json.dumps(). Templates print Python objects (None,
 * True, 1.0, ['a'], {'k': 1}) and serialise tool schemas with tojson, so
 * these forms decide whether a rendered prompt equals jinja2's byte for
 * byte.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja/jinja_internal.h"

/* ---- arena */

void *ja_alloc(struct jarena *a, size_t n) {
  n = (n + 15) & ~(size_t)15;
  if (n == 0) n = 16;
  struct jchunk *h = a->head;
  if (!h || h->size - h->used < n) {
    size_t size = 64 * 1024;
    if (h && h->size < (4u << 20)) size = h->size * 2;
    if (size < n) size = n;
    if (size > SIZE_MAX - sizeof(struct jchunk)) return NULL;
    if (a->cap && (a->total > a->cap || size + sizeof(*h) > a->cap - a->total))
      return NULL;
    h = malloc(sizeof(*h) + size);
    if (!h) return NULL;
    h->size = size;
    h->used = 0;
    h->next = a->head;
    a->head = h;
    a->total += sizeof(*h) + size;
  }
  void *p = (char *)h->data + h->used;
  h->used += n;
  return p;
}

void ja_free(struct jarena *a) {
  struct jchunk *h = a->head;
  while (h) {
    struct jchunk *n = h->next;
    free(h);
    h = n;
  }
  a->head = NULL;
  a->total = 0;
}

void *jalloc(struct jstate *s, size_t n) {
  void *p = ja_alloc(&s->c->arena, n);
  if (!p)
    jfail(s, TN_ERANGE,
          "chat template: memory limit reached (%zu bytes)",
          s->c->arena.cap);
  return p;
}

/* ---- constructors */

struct jv jv_undef(const char *name, size_t n) {
  struct jv v = {.k = JK_UNDEF};
  v.u.s.p = name;
  v.u.s.n = n;
  return v;
}
struct jv jv_none(void) { return (struct jv){.k = JK_NONE}; }
struct jv jv_bool(bool b) { return (struct jv){.k = JK_BOOL, .u.b = b}; }
struct jv jv_int(int64_t i) { return (struct jv){.k = JK_INT, .u.i = i}; }
struct jv jv_float(double f) { return (struct jv){.k = JK_FLOAT, .u.f = f}; }
struct jv jv_str(const char *p, size_t n) {
  struct jv v = {.k = JK_STR};
  v.u.s.p = p;
  v.u.s.n = n;
  return v;
}

struct jv jv_strdup(struct jstate *s, const char *p, size_t n) {
  if (n > s->lim.max_output)
    jfail(s, TN_ERANGE, "chat template: a string of %zu bytes exceeds the "
          "limit of %zu", n, s->lim.max_output);
  char *d = jalloc(s, n + 1);
  if (n) memcpy(d, p, n);
  d[n] = '\0';
  return jv_str(d, n);
}

struct jv jv_list_new(struct jstate *s, size_t cap) {
  struct jlist *l = jalloc(s, sizeof(*l));
  l->n = 0;
  l->cap = cap;
  l->v = cap ? jalloc(s, cap * sizeof(struct jv)) : NULL;
  return (struct jv){.k = JK_LIST, .u.l = l};
}

void jv_list_push(struct jstate *s, struct jv *list, struct jv v) {
  struct jlist *l = list->u.l;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 4;
    if (cap > (SIZE_MAX / sizeof(struct jv)) / 2)
      jfail(s, TN_ERANGE, "chat template: list too long");
    struct jv *v2 = jalloc(s, cap * sizeof(*v2));
    if (l->n) memcpy(v2, l->v, l->n * sizeof(*v2));
    l->v = v2;
    l->cap = cap;
  }
  l->v[l->n++] = v;
}

struct jv jv_dict_new(struct jstate *s, size_t cap) {
  struct jdict *d = jalloc(s, sizeof(*d));
  d->n = 0;
  d->cap = cap;
  d->k = cap ? jalloc(s, cap * sizeof(struct jv)) : NULL;
  d->v = cap ? jalloc(s, cap * sizeof(struct jv)) : NULL;
  return (struct jv){.k = JK_DICT, .u.d = d};
}

struct jv *jv_dict_find_v(const struct jv *dict, struct jv key) {
  const struct jdict *d = dict->u.d;
  for (size_t i = 0; i < d->n; i++)
    if (jv_eq(d->k[i], key)) return &d->v[i];
  return NULL;
}

struct jv *jv_dict_find(const struct jv *dict, const char *key, size_t n) {
  const struct jdict *d = dict->u.d;
  for (size_t i = 0; i < d->n; i++)
    if (d->k[i].k == JK_STR && d->k[i].u.s.n == n &&
        memcmp(d->k[i].u.s.p, key, n) == 0)
      return &d->v[i];
  return NULL;
}

void jv_dict_set(struct jstate *s, struct jv *dict, struct jv key,
                 struct jv v) {
  struct jv *have = jv_dict_find_v(dict, key);
  if (have) {
    *have = v;
    return;
  }
  struct jdict *d = dict->u.d;
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 4;
    if (cap > (SIZE_MAX / sizeof(struct jv)) / 2)
      jfail(s, TN_ERANGE, "chat template: dict too large");
    struct jv *k2 = jalloc(s, cap * sizeof(*k2));
    struct jv *v2 = jalloc(s, cap * sizeof(*v2));
    if (d->n) {
      memcpy(k2, d->k, d->n * sizeof(*k2));
      memcpy(v2, d->v, d->n * sizeof(*v2));
    }
    d->k = k2;
    d->v = v2;
    d->cap = cap;
  }
  d->k[d->n] = key;
  d->v[d->n] = v;
  d->n++;
}

/* ---- truth, equality, order */

bool jv_truthy(struct jv v) {
  switch (v.k) {
  case JK_UNDEF:
  case JK_NONE: return false;
  case JK_BOOL: return v.u.b;
  case JK_INT: return v.u.i != 0;
  case JK_FLOAT: return v.u.f != 0;
  case JK_STR: return v.u.s.n != 0;
  case JK_LIST: return v.gen || v.u.l->n != 0;
  case JK_DICT: return v.u.d->n != 0;
  default: return true;
  }
}

static bool is_num(struct jv v) {
  return v.k == JK_BOOL || v.k == JK_INT || v.k == JK_FLOAT;
}
static double num(struct jv v) {
  return v.k == JK_FLOAT ? v.u.f : v.k == JK_INT ? (double)v.u.i : v.u.b;
}
static int64_t inum(struct jv v) { return v.k == JK_INT ? v.u.i : v.u.b; }

bool jv_eq(struct jv a, struct jv b) {
  if (is_num(a) && is_num(b)) {
    if (a.k != JK_FLOAT && b.k != JK_FLOAT) return inum(a) == inum(b);
    return num(a) == num(b);
  }
  if (a.k != b.k) return false;
  switch (a.k) {
  case JK_UNDEF:
  case JK_NONE: return true;
  case JK_STR:
    return a.u.s.n == b.u.s.n && memcmp(a.u.s.p, b.u.s.p, a.u.s.n) == 0;
  case JK_LIST:
    if (a.gen || b.gen) return a.u.l == b.u.l;
    if (a.u.l->n != b.u.l->n || a.tuple != b.tuple) return false;
    for (size_t i = 0; i < a.u.l->n; i++)
      if (!jv_eq(a.u.l->v[i], b.u.l->v[i])) return false;
    return true;
  case JK_DICT:
    if (a.u.d->n != b.u.d->n) return false;
    for (size_t i = 0; i < a.u.d->n; i++) {
      struct jv *o = jv_dict_find_v(&b, a.u.d->k[i]);
      if (!o || !jv_eq(a.u.d->v[i], *o)) return false;
    }
    return true;
  case JK_NS: return a.u.d == b.u.d;
  case JK_MACRO: return a.u.m == b.u.m;
  case JK_FUNC: return a.u.fn == b.u.fn;
  case JK_LOOP: return a.u.loop == b.u.loop;
  default: return false;
  }
}

const char *jv_type_name(struct jv v) {
  switch (v.k) {
  case JK_UNDEF: return "Undefined";
  case JK_NONE: return "NoneType";
  case JK_BOOL: return "bool";
  case JK_INT: return "int";
  case JK_FLOAT: return "float";
  case JK_STR: return "str";
  case JK_LIST: return v.gen ? "generator" : v.tuple ? "tuple" : "list";
  case JK_DICT: return "dict";
  case JK_NS: return "Namespace";
  case JK_MACRO: return "Macro";
  case JK_FUNC: return "function";
  case JK_LOOP: return "LoopContext";
  default: return "object";
  }
}

int jv_cmp(struct jstate *s, struct jv a, struct jv b) {
  if (is_num(a) && is_num(b)) {
    if (a.k != JK_FLOAT && b.k != JK_FLOAT)
      return inum(a) < inum(b) ? -1 : inum(a) > inum(b);
    double x = num(a), y = num(b);
    return x < y ? -1 : x > y;
  }
  if (a.k == JK_STR && b.k == JK_STR) {
    /* UTF-8 byte order is code point order */
    size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
    int c = n ? memcmp(a.u.s.p, b.u.s.p, n) : 0;
    if (c) return c < 0 ? -1 : 1;
    return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n;
  }
  if (a.k == JK_LIST && b.k == JK_LIST) {
    size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
    for (size_t i = 0; i < n; i++) {
      if (jv_eq(a.u.l->v[i], b.u.l->v[i])) continue;
      return jv_cmp(s, a.u.l->v[i], b.u.l->v[i]);
    }
    return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
  }
  jfail(s, TN_EINVAL,
        "chat template: line %d: '<' not supported between instances of "
        "'%s' and '%s'",
        s->line, jv_type_name(a), jv_type_name(b));
}

/* ---- output buffers */

void sb_put(struct jstate *s, struct sbuf *b, const char *p, size_t n) {
  if (n == 0) return;
  if (n > s->lim.max_output || b->n > s->lim.max_output - n)
    jfail(s, TN_ERANGE,
          "chat template: output exceeds the limit of %zu bytes",
          s->lim.max_output);
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q) jfail(s, TN_ENOMEM, "chat template: out of memory");
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->n, p, n);
  b->n += n;
  b->p[b->n] = '\0';
}
void sb_puts(struct jstate *s, struct sbuf *b, const char *p) {
  sb_put(s, b, p, strlen(p));
}
void sb_putc(struct jstate *s, struct sbuf *b, char ch) {
  sb_put(s, b, &ch, 1);
}
struct jv sb_take(struct jstate *s, struct sbuf *b) {
  struct jv v = jv_strdup(s, b->p ? b->p : "", b->n);
  b->n = 0;
  return v;
}

/* ---- UTF-8 */

uint32_t u8_decode(const char *p, size_t n, size_t at, size_t *len) {
  const uint8_t *u = (const uint8_t *)p + at;
  size_t left = n - at;
  uint32_t c = u[0];
  size_t l = 1;
  if (c >= 0xF0 && left >= 4) {
    c = ((c & 7u) << 18) | ((u[1] & 63u) << 12) | ((u[2] & 63u) << 6) |
        (u[3] & 63u);
    l = 4;
  } else if (c >= 0xE0 && left >= 3) {
    c = ((c & 15u) << 12) | ((u[1] & 63u) << 6) | (u[2] & 63u);
    l = 3;
  } else if (c >= 0xC0 && left >= 2) {
    c = ((c & 31u) << 6) | (u[1] & 63u);
    l = 2;
  }
  *len = l;
  return c;
}

size_t u8_next(const char *p, size_t n, size_t at) {
  at++;
  while (at < n && ((uint8_t)p[at] & 0xC0) == 0x80) at++;
  return at;
}

size_t u8_len(const char *p, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++) k += ((uint8_t)p[i] & 0xC0) != 0x80;
  return k;
}

size_t u8_offset(const char *p, size_t n, size_t i) {
  size_t at = 0;
  while (i > 0 && at < n) {
    at = u8_next(p, n, at);
    i--;
  }
  return at;
}

bool py_isspace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

/* ---- text forms */

/* Python's repr(float): the shortest digits that read back, fixed
 * notation for exponents -4..15, else d.ddde+XX. */
static void jv_put_float_raw(char *out, size_t cap, double f) {
  if (isnan(f)) {
    snprintf(out, cap, "nan");
    return;
  }
  if (isinf(f)) {
    snprintf(out, cap, f < 0 ? "-inf" : "inf");
    return;
  }
  char e[40];
  int prec;
  for (prec = 1; prec <= 17; prec++) {
    snprintf(e, sizeof(e), "%.*e", prec - 1, f);
    if (strtod(e, NULL) == f) break;
  }
  /* e: [-]d[.ddd]e[+-]XX */
  bool neg = e[0] == '-';
  const char *m = e + neg;
  char digits[24];
  size_t nd = 0;
  const char *q = m;
  for (; *q && *q != 'e'; q++)
    if (*q != '.') digits[nd++] = *q;
  digits[nd] = '\0';
  int exp10 = atoi(q + 1);
  while (nd > 1 && digits[nd - 1] == '0') digits[--nd] = '\0';
  char *o = out;
  size_t left = cap;
#define PUT(...)                                  \
  do {                                            \
    int w_ = snprintf(o, left, __VA_ARGS__);      \
    if (w_ < 0 || (size_t)w_ >= left) return;     \
    o += w_;                                      \
    left -= (size_t)w_;                           \
  } while (0)
  if (neg) PUT("-");
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 >= 0) {
      for (int i = 0; i <= exp10; i++)
        PUT("%c", (size_t)i < nd ? digits[i] : '0');
      PUT(".");
      if ((size_t)exp10 + 1 < nd) PUT("%s", digits + exp10 + 1);
      else PUT("0");
    } else {
      PUT("0.");
      for (int i = 0; i < -exp10 - 1; i++) PUT("0");
      PUT("%s", digits);
    }
  } else {
    PUT("%c", digits[0]);
    if (nd > 1) PUT(".%s", digits + 1);
    PUT("e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
  }
#undef PUT
}

static void put_float(struct jstate *s, struct sbuf *b, double f) {
  char t[64];
  jv_put_float_raw(t, sizeof(t), f);
  sb_puts(s, b, t);
}

static void put_int(struct jstate *s, struct sbuf *b, int64_t i) {
  char t[32];
  snprintf(t, sizeof(t), "%lld", (long long)i);
  sb_puts(s, b, t);
}

/* Python's repr of a str: single quotes unless the text has ' and no ". */
static void put_str_repr(struct jstate *s, struct sbuf *b, const char *p,
                         size_t n) {
  bool sq = memchr(p, '\'', n) != NULL, dq = memchr(p, '"', n) != NULL;
  char q = sq && !dq ? '"' : '\'';
  sb_putc(s, b, q);
  for (size_t i = 0; i < n; i++) {
    uint8_t c = (uint8_t)p[i];
    char t[8];
    if (c == (uint8_t)q || c == '\\') {
      t[0] = '\\';
      t[1] = (char)c;
      sb_put(s, b, t, 2);
    } else if (c == '\n') sb_puts(s, b, "\\n");
    else if (c == '\r') sb_puts(s, b, "\\r");
    else if (c == '\t') sb_puts(s, b, "\\t");
    else if (c < 0x20 || c == 0x7f) {
      snprintf(t, sizeof(t), "\\x%02x", c);
      sb_puts(s, b, t);
    } else {
      sb_putc(s, b, (char)c);
    }
  }
  sb_putc(s, b, q);
}

void jv_put_repr(struct jstate *s, struct sbuf *b, struct jv v) {
  switch (v.k) {
  case JK_STR: put_str_repr(s, b, v.u.s.p, v.u.s.n); return;
  case JK_LIST: {
    sb_putc(s, b, v.tuple ? '(' : '[');
    for (size_t i = 0; i < v.u.l->n; i++) {
      if (i) sb_puts(s, b, ", ");
      jv_put_repr(s, b, v.u.l->v[i]);
    }
    if (v.tuple && v.u.l->n == 1) sb_putc(s, b, ',');
    sb_putc(s, b, v.tuple ? ')' : ']');
    return;
  }
  case JK_DICT: {
    sb_putc(s, b, '{');
    for (size_t i = 0; i < v.u.d->n; i++) {
      if (i) sb_puts(s, b, ", ");
      jv_put_repr(s, b, v.u.d->k[i]);
      sb_puts(s, b, ": ");
      jv_put_repr(s, b, v.u.d->v[i]);
    }
    sb_putc(s, b, '}');
    return;
  }
  default: jv_put_str(s, b, v); return;
  }
}

void jv_put_str(struct jstate *s, struct sbuf *b, struct jv v) {
  switch (v.k) {
  case JK_UNDEF: return;
  case JK_NONE: sb_puts(s, b, "None"); return;
  case JK_BOOL: sb_puts(s, b, v.u.b ? "True" : "False"); return;
  case JK_INT: put_int(s, b, v.u.i); return;
  case JK_FLOAT: put_float(s, b, v.u.f); return;
  case JK_STR: sb_put(s, b, v.u.s.p, v.u.s.n); return;
  case JK_LIST:
    if (v.gen) {
      sb_puts(s, b, "<generator object>");
      return;
    }
    jv_put_repr(s, b, v);
    return;
  case JK_DICT: jv_put_repr(s, b, v); return;
  case JK_NS: sb_puts(s, b, "<Namespace>"); return;
  case JK_MACRO: sb_puts(s, b, "<Macro>"); return;
  case JK_FUNC: sb_puts(s, b, "<function>"); return;
  case JK_LOOP: sb_puts(s, b, "<LoopContext>"); return;
  default: return;
  }
}

struct jv jv_to_str(struct jstate *s, struct jv v) {
  if (v.k == JK_STR) return v;
  struct sbuf t = {0};
  /* a private buffer: freed here, its bytes copied to the arena */
  if (s->n_bufs >= sizeof(s->bufs) / sizeof(s->bufs[0]))
    jfail(s, TN_ERANGE, "chat template: nesting too deep");
  unsigned slot = s->n_bufs++;
  s->bufs[slot] = t;
  jv_put_str(s, &s->bufs[slot], v);
  struct jv r = sb_take(s, &s->bufs[slot]);
  free(s->bufs[slot].p);
  s->bufs[slot] = (struct sbuf){0};
  s->n_bufs--;
  return r;
}

/* ---- JSON out: json.dumps(ensure_ascii=False) */

static void json_str(struct jstate *s, struct sbuf *b, const char *p,
                     size_t n) {
  sb_putc(s, b, '"');
  size_t run = 0;
  for (size_t i = 0; i < n; i++) {
    uint8_t c = (uint8_t)p[i];
    const char *esc = NULL;
    char t[8];
    switch (c) {
    case '"': esc = "\\\""; break;
    case '\\': esc = "\\\\"; break;
    case '\n': esc = "\\n"; break;
    case '\r': esc = "\\r"; break;
    case '\t': esc = "\\t"; break;
    case '\b': esc = "\\b"; break;
    case '\f': esc = "\\f"; break;
    default:
      if (c < 0x20) {
        snprintf(t, sizeof(t), "\\u%04x", c);
        esc = t;
      }
    }
    if (!esc && c >= 0x80 && s->json_ascii) {
      /* ensure_ascii: \uXXXX, surrogate pairs above the BMP */
      size_t l;
      uint32_t u = u8_decode(p, n, i, &l);
      char w[16];
      if (u >= 0x10000) {
        u -= 0x10000;
        snprintf(w, sizeof(w), "\\u%04x\\u%04x", 0xD800 + (u >> 10),
                 0xDC00 + (u & 0x3FF));
      } else {
        snprintf(w, sizeof(w), "\\u%04x", u);
      }
      sb_put(s, b, p + run, i - run);
      sb_puts(s, b, w);
      i += l - 1;
      run = i + 1;
      continue;
    }
    if (esc) {
      sb_put(s, b, p + run, i - run);
      sb_puts(s, b, esc);
      run = i + 1;
    }
  }
  sb_put(s, b, p + run, n - run);
  sb_putc(s, b, '"');
}

static void json_nl(struct jstate *s, struct sbuf *b, int indent, int depth) {
  sb_putc(s, b, '\n');
  for (int i = 0; i < indent * depth; i++) sb_putc(s, b, ' ');
}

static int key_order(const void *a, const void *b) {
  const struct jv *x = *(const struct jv *const *)a;
  const struct jv *y = *(const struct jv *const *)b;
  if (x->k == JK_STR && y->k == JK_STR) {
    size_t n = x->u.s.n < y->u.s.n ? x->u.s.n : y->u.s.n;
    int c = n ? memcmp(x->u.s.p, y->u.s.p, n) : 0;
    if (c) return c;
    return x->u.s.n < y->u.s.n ? -1 : x->u.s.n > y->u.s.n;
  }
  return 0;
}

void jv_put_json(struct jstate *s, struct sbuf *b, struct jv v, int indent,
                 const char *item_sep, const char *key_sep, bool sort_keys,
                 int depth) {
  if (depth > 512)
    jfail(s, TN_ERANGE, "chat template: tojson: value nested too deeply");
  switch (v.k) {
  case JK_NONE: sb_puts(s, b, "null"); return;
  case JK_BOOL: sb_puts(s, b, v.u.b ? "true" : "false"); return;
  case JK_INT: put_int(s, b, v.u.i); return;
  case JK_FLOAT:
    if (isnan(v.u.f)) sb_puts(s, b, "NaN");
    else if (isinf(v.u.f)) sb_puts(s, b, v.u.f < 0 ? "-Infinity" : "Infinity");
    else put_float(s, b, v.u.f);
    return;
  case JK_STR: json_str(s, b, v.u.s.p, v.u.s.n); return;
  case JK_LIST: {
    if (v.gen)
      jfail(s, TN_EINVAL, "chat template: line %d: tojson: Object of type "
            "generator is not JSON serializable (add '| list')", s->line);
    if (v.u.l->n == 0) {
      sb_puts(s, b, "[]");
      return;
    }
    sb_putc(s, b, '[');
    for (size_t i = 0; i < v.u.l->n; i++) {
      if (i) sb_puts(s, b, item_sep);
      if (indent >= 0) json_nl(s, b, indent, depth + 1);
      jv_put_json(s, b, v.u.l->v[i], indent, item_sep, key_sep, sort_keys,
                  depth + 1);
    }
    if (indent >= 0) json_nl(s, b, indent, depth);
    sb_putc(s, b, ']');
    return;
  }
  case JK_DICT:
  case JK_NS: {
    const struct jdict *d = v.u.d;
    if (d->n == 0) {
      sb_puts(s, b, "{}");
      return;
    }
    if (v.k == JK_NS)
      jfail(s, TN_EINVAL, "chat template: line %d: tojson: Object of type "
            "Namespace is not JSON serializable", s->line);
    const struct jv **order = jalloc(s, d->n * sizeof(*order));
    for (size_t i = 0; i < d->n; i++) {
      if (d->k[i].k != JK_STR && d->k[i].k != JK_INT &&
          d->k[i].k != JK_BOOL && d->k[i].k != JK_NONE &&
          d->k[i].k != JK_FLOAT)
        jfail(s, TN_EINVAL, "chat template: line %d: tojson: keys must be "
              "str, int, float, bool or None, not %s", s->line,
              jv_type_name(d->k[i]));
      order[i] = &d->k[i];
    }
    if (sort_keys) qsort(order, d->n, sizeof(*order), key_order);
    sb_putc(s, b, '{');
    for (size_t i = 0; i < d->n; i++) {
      if (i) sb_puts(s, b, item_sep);
      if (indent >= 0) json_nl(s, b, indent, depth + 1);
      struct jv k = *order[i];
      size_t at = (size_t)(order[i] - d->k);
      if (k.k == JK_STR) {
        json_str(s, b, k.u.s.p, k.u.s.n);
      } else {
        sb_putc(s, b, '"');
        if (k.k == JK_NONE) sb_puts(s, b, "null");
        else if (k.k == JK_BOOL) sb_puts(s, b, k.u.b ? "true" : "false");
        else jv_put_json(s, b, k, -1, item_sep, key_sep, false, depth + 1);
        sb_putc(s, b, '"');
      }
      sb_puts(s, b, key_sep);
      jv_put_json(s, b, d->v[at], indent, item_sep, key_sep, sort_keys,
                  depth + 1);
    }
    if (indent >= 0) json_nl(s, b, indent, depth);
    sb_putc(s, b, '}');
    return;
  }
  default:
    jfail(s, TN_EINVAL,
          "chat template: line %d: tojson: Object of type %s is not JSON "
          "serializable",
          s->line, jv_type_name(v));
  }
}

/* ---- JSON in */

struct jp {
  struct jstate *s;
  const char *p;
  size_t n, at;
  int depth;
};

static void jp_ws(struct jp *j) {
  while (j->at < j->n && (j->p[j->at] == ' ' || j->p[j->at] == '\t' ||
                          j->p[j->at] == '\n' || j->p[j->at] == '\r'))
    j->at++;
}

static bool jp_hex4(struct jp *j, uint32_t *out) {
  if (j->n - j->at < 4) return false;
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    char c = j->p[j->at++];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
    else return false;
  }
  *out = v;
  return true;
}

static void put_utf8(struct jstate *s, struct sbuf *b, uint32_t c) {
  char t[4];
  size_t n;
  if (c < 0x80) {
    t[0] = (char)c;
    n = 1;
  } else if (c < 0x800) {
    t[0] = (char)(0xC0 | (c >> 6));
    t[1] = (char)(0x80 | (c & 63));
    n = 2;
  } else if (c < 0x10000) {
    t[0] = (char)(0xE0 | (c >> 12));
    t[1] = (char)(0x80 | ((c >> 6) & 63));
    t[2] = (char)(0x80 | (c & 63));
    n = 3;
  } else {
    t[0] = (char)(0xF0 | (c >> 18));
    t[1] = (char)(0x80 | ((c >> 12) & 63));
    t[2] = (char)(0x80 | ((c >> 6) & 63));
    t[3] = (char)(0x80 | (c & 63));
    n = 4;
  }
  sb_put(s, b, t, n);
}

static bool jp_string(struct jp *j, struct jv *out) {
  j->at++; /* opening quote */
  size_t start = j->at;
  /* fast path: no escapes */
  while (j->at < j->n && j->p[j->at] != '"' && j->p[j->at] != '\\' &&
         (uint8_t)j->p[j->at] >= 0x20)
    j->at++;
  if (j->at < j->n && j->p[j->at] == '"') {
    *out = jv_strdup(j->s, j->p + start, j->at - start);
    j->at++;
    return true;
  }
  struct sbuf b = {0};
  struct jstate *s = j->s;
  if (s->n_bufs >= sizeof(s->bufs) / sizeof(s->bufs[0])) return false;
  unsigned slot = s->n_bufs++;
  s->bufs[slot] = b;
  struct sbuf *sb = &s->bufs[slot];
  sb_put(s, sb, j->p + start, j->at - start);
  bool ok = false;
  while (j->at < j->n) {
    char c = j->p[j->at];
    if (c == '"') {
      j->at++;
      ok = true;
      break;
    }
    if ((uint8_t)c < 0x20) break;
    if (c != '\\') {
      sb_putc(s, sb, c);
      j->at++;
      continue;
    }
    if (++j->at >= j->n) break;
    c = j->p[j->at++];
    uint32_t u;
    switch (c) {
    case '"': sb_putc(s, sb, '"'); continue;
    case '\\': sb_putc(s, sb, '\\'); continue;
    case '/': sb_putc(s, sb, '/'); continue;
    case 'b': sb_putc(s, sb, '\b'); continue;
    case 'f': sb_putc(s, sb, '\f'); continue;
    case 'n': sb_putc(s, sb, '\n'); continue;
    case 'r': sb_putc(s, sb, '\r'); continue;
    case 't': sb_putc(s, sb, '\t'); continue;
    case 'u':
      if (!jp_hex4(j, &u)) goto done;
      if (u >= 0xD800 && u < 0xDC00 && j->n - j->at >= 6 &&
          j->p[j->at] == '\\' && j->p[j->at + 1] == 'u') {
        size_t save = j->at;
        j->at += 2;
        uint32_t lo;
        if (jp_hex4(j, &lo) && lo >= 0xDC00 && lo < 0xE000)
          u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
        else
          j->at = save;
      }
      put_utf8(s, sb, u);
      continue;
    default: goto done;
    }
  }
done:
  if (ok) *out = sb_take(s, sb);
  free(sb->p);
  *sb = (struct sbuf){0};
  s->n_bufs--;
  return ok;
}

static bool jp_value(struct jp *j, struct jv *out);

static bool jp_lit(struct jp *j, const char *w, struct jv v, struct jv *out) {
  size_t n = strlen(w);
  if (j->n - j->at < n || memcmp(j->p + j->at, w, n) != 0) return false;
  j->at += n;
  *out = v;
  return true;
}

static bool jp_number(struct jp *j, struct jv *out) {
  size_t start = j->at;
  bool is_float = false;
  if (j->p[j->at] == '-') j->at++;
  if (j->at >= j->n || j->p[j->at] < '0' || j->p[j->at] > '9') return false;
  while (j->at < j->n && j->p[j->at] >= '0' && j->p[j->at] <= '9') j->at++;
  if (j->at < j->n && j->p[j->at] == '.') {
    is_float = true;
    j->at++;
    while (j->at < j->n && j->p[j->at] >= '0' && j->p[j->at] <= '9') j->at++;
  }
  if (j->at < j->n && (j->p[j->at] == 'e' || j->p[j->at] == 'E')) {
    is_float = true;
    j->at++;
    if (j->at < j->n && (j->p[j->at] == '+' || j->p[j->at] == '-')) j->at++;
    while (j->at < j->n && j->p[j->at] >= '0' && j->p[j->at] <= '9') j->at++;
  }
  char t[64];
  size_t len = j->at - start;
  if (len >= sizeof(t)) {
    /* a very long literal: as a float, as Python would for big ints only
     * if it had a fraction; good enough for prompts */
    char *d = jalloc(j->s, len + 1);
    memcpy(d, j->p + start, len);
    d[len] = '\0';
    *out = jv_float(strtod(d, NULL));
    return true;
  }
  memcpy(t, j->p + start, len);
  t[len] = '\0';
  if (!is_float) {
    char *end;
    errno = 0;
    long long v = strtoll(t, &end, 10);
    if (errno == 0) {
      *out = jv_int(v);
      return true;
    }
  }
  *out = jv_float(strtod(t, NULL));
  return true;
}

static bool jp_value(struct jp *j, struct jv *out) {
  jp_ws(j);
  if (j->at >= j->n) return false;
  if (++j->depth > 512) return false;
  bool ok = false;
  char c = j->p[j->at];
  if (c == '{') {
    j->at++;
    *out = jv_dict_new(j->s, 0);
    jp_ws(j);
    if (j->at < j->n && j->p[j->at] == '}') {
      j->at++;
      ok = true;
    } else {
      for (;;) {
        jp_ws(j);
        struct jv k, v;
        if (j->at >= j->n || j->p[j->at] != '"' || !jp_string(j, &k)) break;
        jp_ws(j);
        if (j->at >= j->n || j->p[j->at] != ':') break;
        j->at++;
        if (!jp_value(j, &v)) break;
        jv_dict_set(j->s, out, k, v);
        jp_ws(j);
        if (j->at < j->n && j->p[j->at] == ',') {
          j->at++;
          continue;
        }
        if (j->at < j->n && j->p[j->at] == '}') {
          j->at++;
          ok = true;
        }
        break;
      }
    }
  } else if (c == '[') {
    j->at++;
    *out = jv_list_new(j->s, 0);
    jp_ws(j);
    if (j->at < j->n && j->p[j->at] == ']') {
      j->at++;
      ok = true;
    } else {
      for (;;) {
        struct jv v;
        if (!jp_value(j, &v)) break;
        jv_list_push(j->s, out, v);
        jp_ws(j);
        if (j->at < j->n && j->p[j->at] == ',') {
          j->at++;
          continue;
        }
        if (j->at < j->n && j->p[j->at] == ']') {
          j->at++;
          ok = true;
        }
        break;
      }
    }
  } else if (c == '"') {
    ok = jp_string(j, out);
  } else if (c == 't') {
    ok = jp_lit(j, "true", jv_bool(true), out);
  } else if (c == 'f') {
    ok = jp_lit(j, "false", jv_bool(false), out);
  } else if (c == 'n') {
    ok = jp_lit(j, "null", jv_none(), out);
  } else {
    ok = jp_number(j, out);
  }
  j->depth--;
  return ok;
}

bool jv_parse_json(struct jstate *s, const char *p, size_t n, struct jv *out,
                   size_t *err_at) {
  struct jp j = {.s = s, .p = p, .n = n};
  bool ok = jp_value(&j, out);
  if (ok) {
    jp_ws(&j);
    ok = j.at == n;
  }
  if (!ok) *err_at = j.at;
  return ok;
}
