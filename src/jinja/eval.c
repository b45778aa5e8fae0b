/*
 * eval.c: the interpreter. Walks the syntax tree, writing text to the
 * current output buffer; expressions evaluate to values (value.c).
 *
 * Scopes follow jinja2: the globals (builtins and the caller's variables),
 * the template's own frame (top-level set), one frame per for loop (what
 * a loop sets stays in it, hence namespace()), one per macro call whose
 * parent is the frame the macro was defined in. Attribute access follows
 * the sandbox: methods of str, dict and list that do not mutate; names
 * starting with '_' and mutating methods are refused when used.
 *
 * Undefined values behave as jinja2's default Undefined: they print as
 * nothing, are false, iterate as empty and have length 0; any other use
 * (an attribute, an item, a call, arithmetic) is an error.
 *
 * Every expression evaluation and loop iteration costs one step; macro
 * calls are bounded in depth; buffers are bounded in size (value.c).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jinja/jinja_internal.h"

_Noreturn void jfail(struct jstate *s, enum tn_status st, const char *fmt,
                     ...) {
  char msg[480];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (s->err) tn_error_set(s->err, st, "%s", msg);
  s->status = st;
  longjmp(s->jb, 1);
}

#define FAIL(s, ...) \
  jfail((s), TN_EINVAL, "chat template: line %d: " FIRST(__VA_ARGS__), \
        (s)->line REST(__VA_ARGS__))
#define FIRST(a, ...) a
#define REST(a, ...) , ##__VA_ARGS__

struct jfunc {
  uint8_t kind; /* F_GLOBAL, F_METHOD, F_UNSAFE */
  struct jstr name;
  struct jv self;
};
enum { F_GLOBAL, F_METHOD, F_UNSAFE };

struct jloop {
  struct jlist *items;
  size_t i;
};

static void step(struct jstate *s) {
  if (++s->steps > s->lim.max_steps)
    jfail(s, TN_ERANGE,
          "chat template: line %d: the render took more than %llu steps "
          "(a loop that does not end?)",
          s->line, (unsigned long long)s->lim.max_steps);
}

static bool jeq(struct jstr a, const char *b) {
  size_t n = strlen(b);
  return a.n == n && memcmp(a.p, b, n) == 0;
}

static bool str_is(struct jv v, const char *b) {
  size_t n = strlen(b);
  return v.k == JK_STR && v.u.s.n == n && memcmp(v.u.s.p, b, n) == 0;
}

_Noreturn static void undef_fail(struct jstate *s, struct jv u) {
  if (u.tuple)
    FAIL(s, "access to attribute '%.*s' is unsafe", (int)u.u.s.n, u.u.s.p);
  FAIL(s, "'%.*s' is undefined", (int)u.u.s.n, u.u.s.p);
}

/* ---- frames */

static struct jv *frame_find(struct jframe *f, struct jstr name) {
  for (; f; f = f->parent)
    for (size_t i = f->n; i-- > 0;)
      if (f->names[i].n == name.n &&
          memcmp(f->names[i].p, name.p, name.n) == 0)
        return &f->vals[i];
  return NULL;
}

static void frame_set_a(struct jarena *a, bool *oom, struct jframe *f,
                        struct jstr name, struct jv v) {
  for (size_t i = 0; i < f->n; i++)
    if (f->names[i].n == name.n && memcmp(f->names[i].p, name.p, name.n) == 0) {
      f->vals[i] = v;
      return;
    }
  if (f->n == f->cap) {
    size_t cap = f->cap ? f->cap * 2 : 8;
    struct jstr *nn = ja_alloc(a, cap * sizeof(*nn));
    struct jv *vv = ja_alloc(a, cap * sizeof(*vv));
    if (!nn || !vv) {
      *oom = true;
      return;
    }
    if (f->n) {
      memcpy(nn, f->names, f->n * sizeof(*nn));
      memcpy(vv, f->vals, f->n * sizeof(*vv));
    }
    f->names = nn;
    f->vals = vv;
    f->cap = cap;
  }
  f->names[f->n] = name;
  f->vals[f->n] = v;
  f->n++;
}

static void frame_set(struct jstate *s, struct jframe *f, struct jstr name,
                      struct jv v) {
  bool oom = false;
  frame_set_a(&s->c->arena, &oom, f, name, v);
  if (oom) jfail(s, TN_ERANGE, "chat template: memory limit reached");
}

/* ---- helpers */

static struct jv func(struct jstate *s, uint8_t kind, const char *name,
                      size_t n, struct jv self) {
  struct jfunc *f = jalloc(s, sizeof(*f));
  f->kind = kind;
  f->name = (struct jstr){name, n};
  f->self = self;
  return (struct jv){.k = JK_FUNC, .u.fn = f};
}

static int64_t as_int(struct jstate *s, struct jv v, const char *what) {
  if (v.k == JK_INT) return v.u.i;
  if (v.k == JK_BOOL) return v.u.b;
  FAIL(s, "%s must be an integer, got %s", what, jv_type_name(v));
}

/* Items of an iterable as a list (dict: its keys; str: its characters). */
static struct jlist *iter_items(struct jstate *s, struct jv v) {
  switch (v.k) {
  case JK_LIST: return v.u.l;
  case JK_UNDEF: {
    static struct jlist empty;
    return &empty;
  }
  case JK_DICT:
  case JK_NS: {
    struct jv l = jv_list_new(s, v.u.d->n);
    for (size_t i = 0; i < v.u.d->n; i++) l.u.l->v[l.u.l->n++] = v.u.d->k[i];
    return l.u.l;
  }
  case JK_STR: {
    struct jv l = jv_list_new(s, v.u.s.n);
    for (size_t i = 0; i < v.u.s.n;) {
      size_t j = u8_next(v.u.s.p, v.u.s.n, i);
      l.u.l->v[l.u.l->n++] = jv_str(v.u.s.p + i, j - i);
      i = j;
    }
    return l.u.l;
  }
  default: FAIL(s, "'%s' object is not iterable", jv_type_name(v));
  }
}

static size_t length(struct jstate *s, struct jv v) {
  if (v.gen) FAIL(s, "object of type 'generator' has no len() (add '| list')");
  switch (v.k) {
  case JK_STR: return u8_len(v.u.s.p, v.u.s.n);
  case JK_LIST: return v.u.l->n;
  case JK_DICT: return v.u.d->n;
  case JK_UNDEF: return 0;
  default: FAIL(s, "object of type '%s' has no len()", jv_type_name(v));
  }
}

static struct jv make_tuple2(struct jstate *s, struct jv a, struct jv b) {
  struct jv t = jv_list_new(s, 2);
  t.tuple = 1;
  t.u.l->v[0] = a;
  t.u.l->v[1] = b;
  t.u.l->n = 2;
  return t;
}

/* ---- attribute and item access */

static const char *const str_methods[] = {
    "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines",
    "startswith", "endswith", "upper", "lower", "title", "capitalize",
    "swapcase", "replace", "format", "join", "find", "rfind", "index",
    "rindex", "count", "isdigit", "isalpha", "isalnum", "isspace", "islower",
    "isupper", "isnumeric", "isdecimal", "zfill", "center", "ljust", "rjust",
    "removeprefix", "removesuffix", "partition", "rpartition", "casefold",
    "encode", NULL};
static const char *const dict_methods[] = {"get", "items", "keys", "values",
                                           "copy", NULL};
static const char *const dict_unsafe[] = {"pop", "popitem", "setdefault",
                                          "update", "clear", NULL};
static const char *const list_methods[] = {"index", "count", "copy", NULL};
static const char *const list_unsafe[] = {"append", "extend", "insert", "pop",
                                          "remove", "reverse", "sort",
                                          "clear", NULL};

static bool in_table(const char *const *t, struct jstr name) {
  for (; *t; t++)
    if (jeq(name, *t)) return true;
  return false;
}

static struct jv loop_attr(struct jstate *s, struct jloop *l,
                           struct jstr name);

static struct jv getattr_v(struct jstate *s, struct jv obj, struct jstr name) {
  if (obj.k == JK_UNDEF) undef_fail(s, obj);
  if (name.n >= 2 && name.p[0] == '_' && name.p[1] == '_') {
    struct jv u = jv_undef(name.p, name.n);
    u.tuple = 1; /* unsafe */
    return u;
  }
  switch (obj.k) {
  case JK_DICT:
    if (in_table(dict_methods, name))
      return func(s, F_METHOD, name.p, name.n, obj);
    if (in_table(dict_unsafe, name))
      return func(s, F_UNSAFE, name.p, name.n, obj);
    {
      struct jv *v = jv_dict_find(&obj, name.p, name.n);
      if (v) return *v;
    }
    break;
  case JK_NS: {
    struct jv *v = jv_dict_find(&obj, name.p, name.n);
    if (v) return *v;
    break;
  }
  case JK_STR:
    if (in_table(str_methods, name))
      return func(s, F_METHOD, name.p, name.n, obj);
    break;
  case JK_LIST:
    if (in_table(list_methods, name))
      return func(s, F_METHOD, name.p, name.n, obj);
    if (in_table(list_unsafe, name))
      return func(s, F_UNSAFE, name.p, name.n, obj);
    break;
  case JK_LOOP: return loop_attr(s, obj.u.loop, name);
  default: break;
  }
  return jv_undef(name.p, name.n);
}

static struct jv getitem_v(struct jstate *s, struct jv obj, struct jv key) {
  if (obj.k == JK_UNDEF) undef_fail(s, obj);
  if (obj.gen) FAIL(s, "'generator' object is not subscriptable");
  switch (obj.k) {
  case JK_DICT:
  case JK_NS: {
    struct jv *v = jv_dict_find_v(&obj, key);
    if (v) return *v;
    break;
  }
  case JK_LIST:
    if (key.k == JK_INT || key.k == JK_BOOL) {
      int64_t i = key.k == JK_INT ? key.u.i : key.u.b;
      int64_t n = (int64_t)obj.u.l->n;
      if (i < 0) i += n;
      if (i >= 0 && i < n) return obj.u.l->v[i];
      return jv_undef("list index", 10);
    }
    break;
  case JK_STR:
    if (key.k == JK_INT) {
      int64_t i = key.u.i;
      int64_t n = (int64_t)u8_len(obj.u.s.p, obj.u.s.n);
      if (i < 0) i += n;
      if (i >= 0 && i < n) {
        size_t a = u8_offset(obj.u.s.p, obj.u.s.n, (size_t)i);
        size_t b = u8_next(obj.u.s.p, obj.u.s.n, a);
        return jv_str(obj.u.s.p + a, b - a);
      }
      return jv_undef("string index", 12);
    }
    break;
  case JK_LOOP:
    if (key.k == JK_STR)
      return loop_attr(s, obj.u.loop, (struct jstr){key.u.s.p, key.u.s.n});
    break;
  default: break;
  }
  if (key.k == JK_STR && obj.k != JK_DICT && obj.k != JK_NS)
    return getattr_v(s, obj, (struct jstr){key.u.s.p, key.u.s.n});
  if (key.k == JK_STR) {
    if (key.u.s.n >= 1 && key.u.s.p[0] == '_') return jv_undef(key.u.s.p, key.u.s.n);
    struct jstr nm = {key.u.s.p, key.u.s.n};
    if (obj.k == JK_DICT &&
        (in_table(dict_methods, nm) || in_table(dict_unsafe, nm)))
      return getattr_v(s, obj, nm);
    return jv_undef(key.u.s.p, key.u.s.n);
  }
  return jv_undef("item", 4);
}

/* Python slice indices. */
static void slice_idx(int64_t n, bool has_a, int64_t a, bool has_b,
                      int64_t b, int64_t st, int64_t *out_a, int64_t *out_b) {
  if (st > 0) {
    if (!has_a) a = 0;
    else if (a < 0) a = a + n < 0 ? 0 : a + n;
    else if (a > n) a = n;
    if (!has_b) b = n;
    else if (b < 0) b = b + n < 0 ? 0 : b + n;
    else if (b > n) b = n;
  } else {
    if (!has_a) a = n - 1;
    else if (a < 0) a = a + n < 0 ? -1 : a + n;
    else if (a >= n) a = n - 1;
    if (!has_b) b = -1;
    else if (b < 0) b = b + n < 0 ? -1 : b + n;
    else if (b >= n) b = n - 1;
  }
  *out_a = a;
  *out_b = b;
}

static struct jv slice_v(struct jstate *s, struct jv obj, struct jv *a,
                         struct jv *b, struct jv *c) {
  int64_t st = c && c->k != JK_NONE ? as_int(s, *c, "slice step") : 1;
  if (st == 0) FAIL(s, "slice step cannot be zero");
  if (obj.gen) FAIL(s, "'generator' object is not subscriptable");
  bool ha = a && a->k != JK_NONE, hb = b && b->k != JK_NONE;
  int64_t ia = ha ? as_int(s, *a, "slice index") : 0;
  int64_t ib = hb ? as_int(s, *b, "slice index") : 0;
  if (obj.k == JK_LIST) {
    int64_t n = (int64_t)obj.u.l->n, x, y;
    slice_idx(n, ha, ia, hb, ib, st, &x, &y);
    struct jv r = jv_list_new(s, 0);
    r.tuple = obj.tuple;
    for (int64_t i = x; st > 0 ? i < y : i > y; i += st)
      jv_list_push(s, &r, obj.u.l->v[i]);
    return r;
  }
  if (obj.k == JK_STR) {
    struct jlist *cs = iter_items(s, obj);
    int64_t n = (int64_t)cs->n, x, y;
    slice_idx(n, ha, ia, hb, ib, st, &x, &y);
    struct sbuf *bf = &s->bufs[s->n_bufs++];
    *bf = (struct sbuf){0};
    for (int64_t i = x; st > 0 ? i < y : i > y; i += st)
      sb_put(s, bf, cs->v[i].u.s.p, cs->v[i].u.s.n);
    struct jv r = sb_take(s, bf);
    free(bf->p);
    *bf = (struct sbuf){0};
    s->n_bufs--;
    return r;
  }
  if (obj.k == JK_UNDEF) undef_fail(s, obj);
  FAIL(s, "'%s' object is not subscriptable", jv_type_name(obj));
}

/* ---- loop object */

static struct jv loop_attr(struct jstate *s, struct jloop *l,
                           struct jstr name) {
  int64_t n = (int64_t)l->items->n, i = (int64_t)l->i;
  if (jeq(name, "index")) return jv_int(i + 1);
  if (jeq(name, "index0")) return jv_int(i);
  if (jeq(name, "revindex")) return jv_int(n - i);
  if (jeq(name, "revindex0")) return jv_int(n - i - 1);
  if (jeq(name, "first")) return jv_bool(i == 0);
  if (jeq(name, "last")) return jv_bool(i == n - 1);
  if (jeq(name, "length")) return jv_int(n);
  if (jeq(name, "depth")) return jv_int(1);
  if (jeq(name, "depth0")) return jv_int(0);
  if (jeq(name, "previtem"))
    return i > 0 ? l->items->v[i - 1] : jv_undef("previtem", 8);
  if (jeq(name, "nextitem"))
    return i + 1 < n ? l->items->v[i + 1] : jv_undef("nextitem", 8);
  if (jeq(name, "cycle"))
    return func(s, F_METHOD, "cycle", 5, (struct jv){.k = JK_LOOP, .u.loop = l});
  return jv_undef(name.p, name.n);
}

/* ---- arithmetic */

static bool numeric(struct jv v) {
  return v.k == JK_INT || v.k == JK_FLOAT || v.k == JK_BOOL;
}
static double fnum(struct jv v) {
  return v.k == JK_FLOAT ? v.u.f : v.k == JK_INT ? (double)v.u.i : v.u.b;
}
static int64_t inum(struct jv v) { return v.k == JK_INT ? v.u.i : v.u.b; }

static struct jv str_percent(struct jstate *s, struct jv fmt, struct jv args);
static struct jv html_escape(struct jstate *s, struct jv v);

static const char *op_name(uint8_t op) {
  static const char *const names[] = {"+", "-", "*", "/", "//", "%", "**"};
  return op <= OP_POW ? names[op] : "?";
}

static struct jv binop(struct jstate *s, uint8_t op, struct jv a, struct jv b) {
  if (a.k == JK_UNDEF) undef_fail(s, a);
  if (b.k == JK_UNDEF) undef_fail(s, b);
  if (numeric(a) && numeric(b)) {
    bool fl = a.k == JK_FLOAT || b.k == JK_FLOAT;
    int64_t x = fl ? 0 : inum(a), y = fl ? 0 : inum(b), r;
    double fx = fnum(a), fy = fnum(b);
    switch (op) {
    case OP_ADD:
      if (fl) return jv_float(fx + fy);
      if (__builtin_add_overflow(x, y, &r)) FAIL(s, "integer overflow");
      return jv_int(r);
    case OP_SUB:
      if (fl) return jv_float(fx - fy);
      if (__builtin_sub_overflow(x, y, &r)) FAIL(s, "integer overflow");
      return jv_int(r);
    case OP_MUL:
      if (fl) return jv_float(fx * fy);
      if (__builtin_mul_overflow(x, y, &r)) FAIL(s, "integer overflow");
      return jv_int(r);
    case OP_DIV:
      if (fy == 0) FAIL(s, "division by zero");
      return jv_float(fx / fy);
    case OP_FLOORDIV:
      if (fl) {
        if (fy == 0) FAIL(s, "float floor division by zero");
        return jv_float(floor(fx / fy));
      }
      if (y == 0) FAIL(s, "integer division or modulo by zero");
      if (x == INT64_MIN && y == -1) FAIL(s, "integer overflow");
      r = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) r--;
      return jv_int(r);
    case OP_MOD:
      if (fl) {
        if (fy == 0) FAIL(s, "float modulo");
        double m = fmod(fx, fy);
        if (m != 0 && ((m < 0) != (fy < 0))) m += fy;
        return jv_float(m);
      }
      if (y == 0) FAIL(s, "integer division or modulo by zero");
      if (y == -1) return jv_int(0);
      r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) r += y;
      return jv_int(r);
    case OP_POW:
      if (!fl && y >= 0) {
        int64_t acc = 1;
        for (int64_t k = 0; k < y; k++) {
          if (__builtin_mul_overflow(acc, x, &acc)) FAIL(s, "integer overflow");
          if (acc == 0 || acc == 1) break;
          step(s);
        }
        if (acc == 1 && x == -1) acc = (y % 2) ? -1 : 1;
        return jv_int(acc);
      }
      return jv_float(pow(fx, fy));
    default: break;
    }
  }
  if (op == OP_ADD && a.k == JK_STR && b.k == JK_STR && a.safe != b.safe) {
    /* Markup + str escapes the str (markupsafe) */
    struct jv x = a.safe ? a : html_escape(s, a);
    struct jv y = b.safe ? b : html_escape(s, b);
    x.safe = y.safe = 0;
    struct jv r = binop(s, OP_ADD, x, y);
    r.safe = 1;
    return r;
  }
  if (op == OP_ADD && a.k == JK_STR && b.k == JK_STR) {
    if (a.u.s.n + b.u.s.n > s->lim.max_output)
      jfail(s, TN_ERANGE, "chat template: a string exceeds the limit of %zu "
            "bytes", s->lim.max_output);
    char *p = jalloc(s, a.u.s.n + b.u.s.n + 1);
    memcpy(p, a.u.s.p, a.u.s.n);
    memcpy(p + a.u.s.n, b.u.s.p, b.u.s.n);
    p[a.u.s.n + b.u.s.n] = '\0';
    struct jv r = jv_str(p, a.u.s.n + b.u.s.n);
    r.safe = a.safe && b.safe;
    return r;
  }
  if (op == OP_ADD && a.k == JK_LIST && b.k == JK_LIST &&
      a.tuple == b.tuple && !a.gen && !b.gen) {
    struct jv r = jv_list_new(s, a.u.l->n + b.u.l->n);
    r.tuple = a.tuple;
    for (size_t i = 0; i < a.u.l->n; i++) jv_list_push(s, &r, a.u.l->v[i]);
    for (size_t i = 0; i < b.u.l->n; i++) jv_list_push(s, &r, b.u.l->v[i]);
    return r;
  }
  if (op == OP_MUL && (a.k == JK_STR || a.k == JK_LIST) &&
      (b.k == JK_INT || b.k == JK_BOOL)) {
    int64_t k = inum(b);
    if (k < 0) k = 0;
    if (a.k == JK_STR) {
      if (a.u.s.n && (uint64_t)k > s->lim.max_output / a.u.s.n)
        jfail(s, TN_ERANGE, "chat template: a string exceeds the limit of "
              "%zu bytes", s->lim.max_output);
      size_t n = a.u.s.n * (size_t)k;
      char *p = jalloc(s, n + 1);
      for (int64_t i = 0; i < k; i++)
        memcpy(p + (size_t)i * a.u.s.n, a.u.s.p, a.u.s.n);
      p[n] = '\0';
      return jv_str(p, n);
    }
    if (a.u.l->n && (uint64_t)k > s->lim.max_steps / a.u.l->n)
      jfail(s, TN_ERANGE, "chat template: list too long");
    struct jv r = jv_list_new(s, 0);
    r.tuple = a.tuple;
    for (int64_t i = 0; i < k; i++)
      for (size_t j = 0; j < a.u.l->n; j++) {
        step(s);
        jv_list_push(s, &r, a.u.l->v[j]);
      }
    return r;
  }
  if (op == OP_MUL && (b.k == JK_STR || b.k == JK_LIST) && numeric(a) &&
      a.k != JK_FLOAT)
    return binop(s, op, b, a);
  if (op == OP_MOD && a.k == JK_STR) return str_percent(s, a, b);
  FAIL(s, "unsupported operand type(s) for %s: '%s' and '%s'", op_name(op),
       jv_type_name(a), jv_type_name(b));
}

static bool contains(struct jstate *s, struct jv hay, struct jv needle) {
  switch (hay.k) {
  case JK_STR:
    if (needle.k != JK_STR)
      FAIL(s, "'in <string>' requires string as left operand, not %s",
           jv_type_name(needle));
    if (needle.u.s.n == 0) return true;
    return memmem(hay.u.s.p, hay.u.s.n, needle.u.s.p, needle.u.s.n) != NULL;
  case JK_LIST:
    for (size_t i = 0; i < hay.u.l->n; i++)
      if (jv_eq(hay.u.l->v[i], needle)) return true;
    return false;
  case JK_DICT:
  case JK_NS: return jv_dict_find_v(&hay, needle) != NULL;
  case JK_UNDEF: return false;
  default:
    FAIL(s, "argument of type '%s' is not iterable", jv_type_name(hay));
  }
}

static bool compare(struct jstate *s, uint8_t op, struct jv a, struct jv b) {
  switch (op) {
  case OP_EQ: return jv_eq(a, b);
  case OP_NE: return !jv_eq(a, b);
  case OP_IN: return contains(s, b, a);
  case OP_NOTIN: return !contains(s, b, a);
  default: break;
  }
  if (a.k == JK_UNDEF) undef_fail(s, a);
  if (b.k == JK_UNDEF) undef_fail(s, b);
  int c = jv_cmp(s, a, b);
  switch (op) {
  case OP_LT: return c < 0;
  case OP_LE: return c <= 0;
  case OP_GT: return c > 0;
  default: return c >= 0;
  }
}

/* ---- calls: arguments */

struct args {
  struct jv *pos;
  size_t n_pos;
  struct jv *kwv;
  const struct jstr *kwn;
  size_t n_kw;
};

/* The i-th positional argument or the keyword argument name; NULL. */
static struct jv *arg(struct args *a, size_t i, const char *name) {
  if (i < a->n_pos) return &a->pos[i];
  for (size_t k = 0; name && k < a->n_kw; k++)
    if (jeq(a->kwn[k], name)) return &a->kwv[k];
  return NULL;
}

static struct jv eval(struct jstate *s, struct jframe *f,
                      const struct jnode *n);
static int exec(struct jstate *s, struct jframe *f, const struct jnode *n);

static void eval_args(struct jstate *s, struct jframe *f,
                      const struct jnode *n, size_t first, struct args *a) {
  size_t total = n->n_kids - first;
  struct jv *v = total ? jalloc(s, total * sizeof(*v)) : NULL;
  for (size_t i = 0; i < total; i++) v[i] = eval(s, f, n->kids[first + i]);
  a->n_kw = n->n_kw;
  a->n_pos = total - n->n_kw;
  a->pos = v;
  a->kwv = v ? v + a->n_pos : NULL;
  a->kwn = n->names;
}

/* ---- strings */

static struct sbuf *tmpbuf(struct jstate *s) {
  if (s->n_bufs >= sizeof(s->bufs) / sizeof(s->bufs[0]))
    jfail(s, TN_ERANGE, "chat template: nesting too deep");
  struct sbuf *b = &s->bufs[s->n_bufs++];
  *b = (struct sbuf){0};
  return b;
}
static struct jv tmpdone(struct jstate *s, struct sbuf *b) {
  struct jv r = sb_take(s, b);
  free(b->p);
  *b = (struct sbuf){0};
  s->n_bufs--;
  return r;
}

static struct jv need_str(struct jstate *s, struct jv v, const char *what) {
  if (v.k != JK_STR)
    FAIL(s, "%s must be a string, got %s", what, jv_type_name(v));
  return v;
}

static uint32_t *codepoints(struct jstate *s, struct jv v, size_t *n) {
  uint32_t *cp = jalloc(s, (v.u.s.n + 1) * sizeof(*cp));
  size_t k = 0;
  for (size_t i = 0; i < v.u.s.n;) {
    size_t l;
    cp[k++] = u8_decode(v.u.s.p, v.u.s.n, i, &l);
    i += l;
  }
  *n = k;
  return cp;
}

/* Python str.strip family: which = 1 left, 2 right, 3 both. chars NULL:
 * whitespace. */
static struct jv strip(struct jstate *s, struct jv v, struct jv *chars,
                       int which) {
  size_t nc = 0;
  uint32_t *cs = NULL;
  if (chars && chars->k != JK_NONE) cs = codepoints(s, need_str(s, *chars, "strip's argument"), &nc);
  const char *p = v.u.s.p;
  size_t a = 0, b = v.u.s.n;
  if (which & 1)
    while (a < b) {
      size_t l;
      uint32_t c = u8_decode(p, b, a, &l);
      bool hit = false;
      if (cs) {
        for (size_t k = 0; k < nc; k++) hit |= cs[k] == c;
      } else {
        hit = py_isspace(c);
      }
      if (!hit) break;
      a += l;
    }
  if (which & 2)
    while (b > a) {
      size_t k = b - 1;
      while (k > a && ((uint8_t)p[k] & 0xC0) == 0x80) k--;
      size_t l;
      uint32_t c = u8_decode(p, b, k, &l);
      bool hit = false;
      if (cs) {
        for (size_t q = 0; q < nc; q++) hit |= cs[q] == c;
      } else {
        hit = py_isspace(c);
      }
      if (!hit) break;
      b = k;
    }
  return jv_str(p + a, b - a);
}

static bool ws_c(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' ||
         c == '\v';
}
static char up(char c) { return c >= 'a' && c <= 'z' ? (char)(c - 32) : c; }
static char low(char c) { return c >= 'A' && c <= 'Z' ? (char)(c + 32) : c; }
static bool alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

/* mode: 0 upper, 1 lower, 2 Python title, 3 capitalize, 4 swapcase. Case
 * maps ASCII only. */
static struct jv recase(struct jstate *s, struct jv v, int mode) {
  char *p = jalloc(s, v.u.s.n + 1);
  bool prev_cased = false;
  for (size_t i = 0; i < v.u.s.n; i++) {
    char c = v.u.s.p[i];
    switch (mode) {
    case 0: c = up(c); break;
    case 1: c = low(c); break;
    case 2:
      c = prev_cased ? low(c) : up(c);
      prev_cased = alpha(c) || ((uint8_t)c >= 0x80);
      break;
    case 3: c = i == 0 ? up(c) : low(c); break;
    default: c = alpha(c) ? (char)(c ^ 32) : c; break;
    }
    p[i] = c;
  }
  p[v.u.s.n] = '\0';
  return jv_str(p, v.u.s.n);
}

static struct jv replace(struct jstate *s, struct jv v, struct jv old,
                         struct jv neu, int64_t count) {
  need_str(s, old, "replace's first argument");
  need_str(s, neu, "replace's second argument");
  struct sbuf *b = tmpbuf(s);
  const char *p = v.u.s.p;
  size_t n = v.u.s.n, at = 0;
  int64_t done = 0;
  if (old.u.s.n == 0) {
    for (size_t i = 0; i <= n; i = u8_next(p, n, i)) {
      if (count < 0 || done < count) {
        sb_put(s, b, neu.u.s.p, neu.u.s.n);
        done++;
      }
      if (i < n) sb_put(s, b, p + i, u8_next(p, n, i) - i);
      if (i >= n) break;
    }
    return tmpdone(s, b);
  }
  while (at <= n) {
    const char *h = (count < 0 || done < count)
                        ? memmem(p + at, n - at, old.u.s.p, old.u.s.n)
                        : NULL;
    if (!h) {
      sb_put(s, b, p + at, n - at);
      break;
    }
    size_t k = (size_t)(h - p);
    sb_put(s, b, p + at, k - at);
    sb_put(s, b, neu.u.s.p, neu.u.s.n);
    at = k + old.u.s.n;
    done++;
    step(s);
  }
  return tmpdone(s, b);
}

static struct jv split(struct jstate *s, struct jv v, struct jv *sep,
                       int64_t maxsplit, bool from_right) {
  struct jv out = jv_list_new(s, 0);
  const char *p = v.u.s.p;
  size_t n = v.u.s.n;
  if (!sep || sep->k == JK_NONE) {
    /* runs of whitespace; no empty strings */
    struct jv parts = jv_list_new(s, 0);
    size_t i = 0;
    while (i < n) {
      size_t l;
      while (i < n && py_isspace(u8_decode(p, n, i, &l))) i += l;
      if (i >= n) break;
      size_t st = i;
      while (i < n && !py_isspace(u8_decode(p, n, i, &l))) i += l;
      jv_list_push(s, &parts, jv_str(p + st, i - st));
    }
    size_t np = parts.u.l->n;
    if (maxsplit < 0 || (size_t)maxsplit + 1 >= np) return parts;
    /* re-join the tail (or head) beyond maxsplit with the original text */
    if (!from_right) {
      for (int64_t k = 0; k < maxsplit; k++)
        jv_list_push(s, &out, parts.u.l->v[k]);
      const char *rest = parts.u.l->v[maxsplit].u.s.p;
      struct jv tail = strip(s, jv_str(rest, (size_t)(p + n - rest)), NULL, 2);
      jv_list_push(s, &out, tail);
    } else {
      size_t keep = np - (size_t)maxsplit;
      struct jv last = parts.u.l->v[keep - 1];
      struct jv head = strip(
          s, jv_str(p, (size_t)(last.u.s.p + last.u.s.n - p)), NULL, 1);
      jv_list_push(s, &out, head);
      for (size_t k = keep; k < np; k++) jv_list_push(s, &out, parts.u.l->v[k]);
    }
    return out;
  }
  need_str(s, *sep, "split's separator");
  if (sep->u.s.n == 0) FAIL(s, "empty separator");
  const char *q = sep->u.s.p;
  size_t m = sep->u.s.n;
  if (!from_right) {
    size_t at = 0;
    int64_t done = 0;
    for (;;) {
      const char *h = (maxsplit < 0 || done < maxsplit)
                          ? memmem(p + at, n - at, q, m)
                          : NULL;
      if (!h) {
        jv_list_push(s, &out, jv_str(p + at, n - at));
        break;
      }
      jv_list_push(s, &out, jv_str(p + at, (size_t)(h - p) - at));
      at = (size_t)(h - p) + m;
      done++;
      step(s);
    }
    return out;
  }
  /* rsplit with a separator: collect from the right, then reverse */
  struct jv rev = jv_list_new(s, 0);
  size_t end = n;
  int64_t done = 0;
  for (;;) {
    size_t found = SIZE_MAX;
    if ((maxsplit < 0 || done < maxsplit) && end >= m)
      for (size_t k = end - m + 1; k-- > 0;)
        if (memcmp(p + k, q, m) == 0) {
          found = k;
          break;
        }
    if (found == SIZE_MAX) {
      jv_list_push(s, &rev, jv_str(p, end));
      break;
    }
    jv_list_push(s, &rev, jv_str(p + found + m, end - found - m));
    end = found;
    done++;
    step(s);
  }
  for (size_t k = rev.u.l->n; k-- > 0;) jv_list_push(s, &out, rev.u.l->v[k]);
  return out;
}

/* Python str.splitlines() (keepends false). */
static struct jv splitlines(struct jstate *s, struct jv v) {
  struct jv out = jv_list_new(s, 0);
  const char *p = v.u.s.p;
  size_t n = v.u.s.n, st = 0, i = 0;
  while (i < n) {
    size_t l;
    uint32_t c = u8_decode(p, n, i, &l);
    bool br = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C ||
              c == 0x1D || c == 0x1E || c == 0x85 || c == 0x2028 ||
              c == 0x2029;
    if (!br) {
      i += l;
      continue;
    }
    jv_list_push(s, &out, jv_str(p + st, i - st));
    i += l;
    if (c == '\r' && i < n && p[i] == '\n') i++;
    st = i;
  }
  if (st < n) jv_list_push(s, &out, jv_str(p + st, n - st));
  return out;
}

static bool affix(struct jstate *s, struct jv v, struct jv what, bool end) {
  if (what.k == JK_LIST) {
    for (size_t i = 0; i < what.u.l->n; i++)
      if (affix(s, v, what.u.l->v[i], end)) return true;
    return false;
  }
  need_str(s, what, end ? "endswith's argument" : "startswith's argument");
  if (what.u.s.n > v.u.s.n) return false;
  const char *at = end ? v.u.s.p + v.u.s.n - what.u.s.n : v.u.s.p;
  return memcmp(at, what.u.s.p, what.u.s.n) == 0;
}

static int64_t find(struct jv v, struct jv sub, bool from_right) {
  if (sub.u.s.n > v.u.s.n) return -1;
  size_t hit = SIZE_MAX;
  if (!from_right) {
    const char *h = sub.u.s.n ? memmem(v.u.s.p, v.u.s.n, sub.u.s.p, sub.u.s.n)
                              : v.u.s.p;
    if (h) hit = (size_t)(h - v.u.s.p);
  } else {
    for (size_t k = v.u.s.n - sub.u.s.n + 1; k-- > 0;)
      if (memcmp(v.u.s.p + k, sub.u.s.p, sub.u.s.n) == 0) {
        hit = k;
        break;
      }
  }
  if (hit == SIZE_MAX) return -1;
  return (int64_t)u8_len(v.u.s.p, hit);
}

/* str.format: {} {0} {name} {0[key]} {name.attr}, {{ and }}; format specs
 * are refused. */
static struct jv str_format(struct jstate *s, struct jv v, struct args *a) {
  struct sbuf *b = tmpbuf(s);
  const char *p = v.u.s.p;
  size_t n = v.u.s.n, auto_i = 0;
  for (size_t i = 0; i < n; i++) {
    char c = p[i];
    if (c == '}' && i + 1 < n && p[i + 1] == '}') {
      sb_putc(s, b, '}');
      i++;
      continue;
    }
    if (c != '{') {
      sb_putc(s, b, c);
      continue;
    }
    if (i + 1 < n && p[i + 1] == '{') {
      sb_putc(s, b, '{');
      i++;
      continue;
    }
    const char *e = memchr(p + i, '}', n - i);
    if (!e) FAIL(s, "str.format: single '{' encountered in format string");
    size_t fl = (size_t)(e - p) - i - 1;
    const char *field = p + i + 1;
    if (memchr(field, ':', fl) || memchr(field, '!', fl))
      FAIL(s, "str.format: format specs are not supported");
    struct jv val;
    size_t nl = 0;
    while (nl < fl && field[nl] != '.' && field[nl] != '[') nl++;
    if (nl == 0) {
      if (auto_i >= a->n_pos)
        FAIL(s, "str.format: replacement index %zu out of range", auto_i);
      val = a->pos[auto_i++];
    } else if (field[0] >= '0' && field[0] <= '9') {
      size_t k = (size_t)strtoul(field, NULL, 10);
      if (k >= a->n_pos)
        FAIL(s, "str.format: replacement index %zu out of range", k);
      val = a->pos[k];
    } else {
      struct jv *kv = NULL;
      for (size_t k = 0; k < a->n_kw; k++)
        if (a->kwn[k].n == nl && memcmp(a->kwn[k].p, field, nl) == 0)
          kv = &a->kwv[k];
      if (!kv) FAIL(s, "str.format: no argument '%.*s'", (int)nl, field);
      val = *kv;
    }
    if (nl < fl) FAIL(s, "str.format: attribute fields are not supported");
    jv_put_str(s, b, val);
    i = (size_t)(e - p);
  }
  return tmpdone(s, b);
}

/* printf-style "%s" % args: %s %r %d %i %f %x %%. */
static struct jv str_percent(struct jstate *s, struct jv fmt, struct jv args) {
  struct sbuf *b = tmpbuf(s);
  size_t ai = 0;
  bool tuple = args.k == JK_LIST && args.tuple;
  const char *p = fmt.u.s.p;
  size_t n = fmt.u.s.n;
  for (size_t i = 0; i < n; i++) {
    if (p[i] != '%') {
      sb_putc(s, b, p[i]);
      continue;
    }
    if (++i >= n) FAIL(s, "incomplete format");
    char c = p[i];
    if (c == '%') {
      sb_putc(s, b, '%');
      continue;
    }
    struct jv v;
    if (tuple) {
      if (ai >= args.u.l->n) FAIL(s, "not enough arguments for format string");
      v = args.u.l->v[ai++];
    } else {
      if (ai++) FAIL(s, "not enough arguments for format string");
      v = args;
    }
    char t[64];
    switch (c) {
    case 's': jv_put_str(s, b, v); break;
    case 'r': jv_put_repr(s, b, v); break;
    case 'd':
    case 'i':
      if (!numeric(v)) FAIL(s, "%%d format: a number is required");
      snprintf(t, sizeof(t), "%lld",
               (long long)(v.k == JK_FLOAT ? (int64_t)v.u.f : inum(v)));
      sb_puts(s, b, t);
      break;
    case 'f':
      if (!numeric(v)) FAIL(s, "%%f format: a number is required");
      snprintf(t, sizeof(t), "%f", fnum(v));
      sb_puts(s, b, t);
      break;
    case 'x':
      snprintf(t, sizeof(t), "%llx", (long long)as_int(s, v, "%x argument"));
      sb_puts(s, b, t);
      break;
    default: FAIL(s, "unsupported format character '%c'", c);
    }
  }
  if (tuple ? ai < args.u.l->n : ai == 0)
    FAIL(s, "not all arguments converted during string formatting");
  return tmpdone(s, b);
}

static struct jv join_list(struct jstate *s, struct jlist *l, struct jv sep) {
  struct sbuf *b = tmpbuf(s);
  for (size_t i = 0; i < l->n; i++) {
    if (i) sb_put(s, b, sep.u.s.p, sep.u.s.n);
    jv_put_str(s, b, l->v[i]);
  }
  return tmpdone(s, b);
}

static struct jv pad(struct jstate *s, struct jv v, int64_t width, int mode,
                     char fill) {
  int64_t len = (int64_t)u8_len(v.u.s.p, v.u.s.n);
  if (width <= len) return v;
  if (width > (int64_t)s->lim.max_output)
    jfail(s, TN_ERANGE, "chat template: padding beyond the output limit");
  int64_t total = width - len, left = 0;
  if (mode == 0) left = total / 2 + (total & width & 1); /* center */
  else if (mode == 2) left = total;                      /* rjust */
  struct sbuf *b = tmpbuf(s);
  for (int64_t i = 0; i < left; i++) sb_putc(s, b, fill);
  sb_put(s, b, v.u.s.p, v.u.s.n);
  for (int64_t i = 0; i < total - left; i++) sb_putc(s, b, fill);
  return tmpdone(s, b);
}

static struct jv call_str_method(struct jstate *s, struct jv v,
                                 struct jstr m, struct args *a) {
  struct jv *a0 = arg(a, 0, NULL), *a1 = arg(a, 1, NULL);
  if (jeq(m, "strip")) return strip(s, v, a0, 3);
  if (jeq(m, "lstrip")) return strip(s, v, a0, 1);
  if (jeq(m, "rstrip")) return strip(s, v, a0, 2);
  if (jeq(m, "split") || jeq(m, "rsplit")) {
    struct jv *sep = arg(a, 0, "sep"), *mx = arg(a, 1, "maxsplit");
    return split(s, v, sep, mx ? as_int(s, *mx, "maxsplit") : -1,
                 jeq(m, "rsplit"));
  }
  if (jeq(m, "splitlines")) return splitlines(s, v);
  if (jeq(m, "startswith") || jeq(m, "endswith")) {
    if (!a0) FAIL(s, "%.*s() takes at least 1 argument", (int)m.n, m.p);
    struct jv t = v;
    if (a1) {
      int64_t st = as_int(s, *a1, "start");
      struct jv sl = jv_int(st);
      t = slice_v(s, v, &sl, NULL, NULL);
    }
    return jv_bool(affix(s, t, *a0, jeq(m, "endswith")));
  }
  if (jeq(m, "upper")) return recase(s, v, 0);
  if (jeq(m, "lower") || jeq(m, "casefold")) return recase(s, v, 1);
  if (jeq(m, "title")) return recase(s, v, 2);
  if (jeq(m, "capitalize")) return recase(s, v, 3);
  if (jeq(m, "swapcase")) return recase(s, v, 4);
  if (jeq(m, "replace")) {
    if (!a0 || !a1) FAIL(s, "replace() takes at least 2 arguments");
    struct jv *c = arg(a, 2, "count");
    return replace(s, v, *a0, *a1, c ? as_int(s, *c, "count") : -1);
  }
  if (jeq(m, "format")) return str_format(s, v, a);
  if (jeq(m, "join")) {
    if (!a0) FAIL(s, "join() takes exactly one argument");
    struct jlist *l = iter_items(s, *a0);
    for (size_t i = 0; i < l->n; i++)
      if (l->v[i].k != JK_STR)
        FAIL(s, "sequence item %zu: expected str instance, %s found", i,
             jv_type_name(l->v[i]));
    return join_list(s, l, v);
  }
  if (jeq(m, "find") || jeq(m, "rfind") || jeq(m, "index") ||
      jeq(m, "rindex")) {
    if (!a0) FAIL(s, "%.*s() takes at least 1 argument", (int)m.n, m.p);
    int64_t r = find(v, need_str(s, *a0, "the substring"),
                     m.p[0] == 'r');
    if (r < 0 && (jeq(m, "index") || jeq(m, "rindex")))
      FAIL(s, "substring not found");
    return jv_int(r);
  }
  if (jeq(m, "count")) {
    if (!a0) FAIL(s, "count() takes at least 1 argument");
    struct jv sub = need_str(s, *a0, "the substring");
    if (sub.u.s.n == 0) return jv_int((int64_t)u8_len(v.u.s.p, v.u.s.n) + 1);
    int64_t k = 0;
    for (size_t at = 0; at + sub.u.s.n <= v.u.s.n;) {
      const char *h = memmem(v.u.s.p + at, v.u.s.n - at, sub.u.s.p, sub.u.s.n);
      if (!h) break;
      k++;
      at = (size_t)(h - v.u.s.p) + sub.u.s.n;
    }
    return jv_int(k);
  }
  if (m.n > 2 && m.p[0] == 'i' && m.p[1] == 's') {
    if (v.u.s.n == 0) return jv_bool(false);
    bool all = true, any_cased = false;
    for (size_t i = 0; i < v.u.s.n; i++) {
      char c = v.u.s.p[i];
      bool ok;
      if (jeq(m, "isdigit") || jeq(m, "isnumeric") || jeq(m, "isdecimal"))
        ok = c >= '0' && c <= '9';
      else if (jeq(m, "isalpha")) ok = alpha(c);
      else if (jeq(m, "isalnum")) ok = alpha(c) || (c >= '0' && c <= '9');
      else if (jeq(m, "isspace")) ok = ws_c(c);
      else if (jeq(m, "islower")) {
        ok = !(c >= 'A' && c <= 'Z');
        any_cased |= c >= 'a' && c <= 'z';
      } else {
        ok = !(c >= 'a' && c <= 'z');
        any_cased |= c >= 'A' && c <= 'Z';
      }
      all &= ok;
    }
    if (jeq(m, "islower") || jeq(m, "isupper")) all &= any_cased;
    return jv_bool(all);
  }
  if (jeq(m, "zfill")) {
    if (!a0) FAIL(s, "zfill() takes exactly one argument");
    return pad(s, v, as_int(s, *a0, "width"), 2, '0');
  }
  if (jeq(m, "center") || jeq(m, "ljust") || jeq(m, "rjust")) {
    if (!a0) FAIL(s, "%.*s() takes at least 1 argument", (int)m.n, m.p);
    char fill = ' ';
    if (a1) {
      need_str(s, *a1, "the fill character");
      if (a1->u.s.n != 1) FAIL(s, "the fill character must be one character");
      fill = a1->u.s.p[0];
    }
    return pad(s, v, as_int(s, *a0, "width"),
               jeq(m, "center") ? 0 : jeq(m, "ljust") ? 1 : 2, fill);
  }
  if (jeq(m, "removeprefix") || jeq(m, "removesuffix")) {
    if (!a0) FAIL(s, "%.*s() takes exactly one argument", (int)m.n, m.p);
    bool end = jeq(m, "removesuffix");
    if (!affix(s, v, *a0, end)) return v;
    size_t k = a0->u.s.n;
    return end ? jv_str(v.u.s.p, v.u.s.n - k) : jv_str(v.u.s.p + k, v.u.s.n - k);
  }
  if (jeq(m, "partition") || jeq(m, "rpartition")) {
    if (!a0) FAIL(s, "%.*s() takes exactly one argument", (int)m.n, m.p);
    struct jv sep = need_str(s, *a0, "the separator");
    int64_t cp = find(v, sep, m.p[0] == 'r');
    struct jv r = jv_list_new(s, 3);
    r.tuple = 1;
    if (cp < 0) {
      struct jv e = jv_str("", 0);
      r.u.l->v[0] = m.p[0] == 'r' ? e : v;
      r.u.l->v[1] = e;
      r.u.l->v[2] = m.p[0] == 'r' ? v : e;
    } else {
      size_t at = u8_offset(v.u.s.p, v.u.s.n, (size_t)cp);
      r.u.l->v[0] = jv_str(v.u.s.p, at);
      r.u.l->v[1] = sep;
      r.u.l->v[2] = jv_str(v.u.s.p + at + sep.u.s.n, v.u.s.n - at - sep.u.s.n);
    }
    r.u.l->n = 3;
    return r;
  }
  FAIL(s, "str.%.*s() is not supported", (int)m.n, m.p);
}

/* ---- globals */

static struct jv call_global(struct jstate *s, struct jstr m, struct args *a) {
  if (jeq(m, "range")) {
    struct jv *x = arg(a, 0, NULL), *y = arg(a, 1, NULL), *z = arg(a, 2, NULL);
    if (!x) FAIL(s, "range expected at least 1 argument, got 0");
    int64_t st = 0, en, by = 1;
    if (y) {
      st = as_int(s, *x, "range start");
      en = as_int(s, *y, "range stop");
    } else {
      en = as_int(s, *x, "range stop");
    }
    if (z) by = as_int(s, *z, "range step");
    if (by == 0) FAIL(s, "range() arg 3 must not be zero");
    double cnt = by > 0 ? ceil(((double)en - (double)st) / (double)by)
                        : ceil(((double)st - (double)en) / (double)-by);
    if (cnt < 0) cnt = 0;
    if (cnt > 100000)
      jfail(s, TN_ERANGE, "chat template: line %d: range too big: the "
            "sandbox allows at most 100000 items, asked for %.0f", s->line,
            cnt);
    struct jv l = jv_list_new(s, (size_t)cnt);
    for (int64_t i = st; by > 0 ? i < en : i > en; i += by)
      l.u.l->v[l.u.l->n++] = jv_int(i);
    return l;
  }
  if (jeq(m, "namespace") || jeq(m, "dict")) {
    struct jv d = jv_dict_new(s, a->n_kw);
    if (a->n_pos > 1)
      FAIL(s, "%.*s() takes keyword arguments and at most one mapping or "
           "list of pairs", (int)m.n, m.p);
    if (a->n_pos && (a->pos[0].k == JK_DICT || a->pos[0].k == JK_NS)) {
      for (size_t i = 0; i < a->pos[0].u.d->n; i++)
        jv_dict_set(s, &d, a->pos[0].u.d->k[i], a->pos[0].u.d->v[i]);
    } else if (a->n_pos) {
      struct jlist *l = iter_items(s, a->pos[0]);
      for (size_t i = 0; i < l->n; i++) {
        struct jlist *kv = iter_items(s, l->v[i]);
        if (kv->n != 2)
          FAIL(s, "%.*s(): item %zu is not a pair", (int)m.n, m.p, i);
        jv_dict_set(s, &d, kv->v[0], kv->v[1]);
      }
    }
    for (size_t i = 0; i < a->n_kw; i++)
      jv_dict_set(s, &d, jv_str(a->kwn[i].p, a->kwn[i].n), a->kwv[i]);
    if (jeq(m, "namespace")) d.k = JK_NS;
    return d;
  }
  if (jeq(m, "raise_exception")) {
    struct jv *x = arg(a, 0, "message");
    struct jv t = x ? jv_to_str(s, *x) : jv_str("", 0);
    jfail(s, TN_EINVAL, "chat template: %.*s", (int)(t.u.s.n > 400 ? 400 : t.u.s.n),
          t.u.s.p);
  }
  if (jeq(m, "strftime_now")) {
    struct jv *x = arg(a, 0, "format");
    if (!x) FAIL(s, "strftime_now() takes a format");
    struct jv f = jv_strdup(s, need_str(s, *x, "strftime_now's format").u.s.p,
                            x->u.s.n);
    time_t now = s->lim.now ? (time_t)s->lim.now : time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char buf[512];
    size_t k = f.u.s.n ? strftime(buf, sizeof(buf), f.u.s.p, &tm) : 0;
    return jv_strdup(s, buf, k);
  }
  FAIL(s, "'%.*s' is not callable", (int)m.n, m.p);
}

/* ---- filters and tests */

static bool run_test(struct jstate *s, struct jstr name, struct jv v,
                     struct args *a);
static struct jv run_filter(struct jstate *s, struct jframe *f,
                            struct jstr name, struct jv v, struct args *a);

/* v.attr.path for filters' attribute= arguments ("a.b", "0"). */
static struct jv attr_path(struct jstate *s, struct jv v, struct jv path) {
  if (path.k == JK_INT) return getitem_v(s, v, path);
  need_str(s, path, "attribute");
  const char *p = path.u.s.p;
  size_t n = path.u.s.n, st = 0;
  for (size_t i = 0; i <= n; i++) {
    if (i < n && p[i] != '.') continue;
    struct jv key = jv_str(p + st, i - st);
    bool digits = i > st;
    for (size_t k = st; k < i; k++) digits &= p[k] >= '0' && p[k] <= '9';
    if (digits) key = jv_int(strtoll(p + st, NULL, 10));
    if (v.k == JK_UNDEF) return v;
    v = getitem_v(s, v, key);
    st = i + 1;
  }
  return v;
}

static struct jv lower_key(struct jstate *s, struct jv v, bool cs) {
  return (!cs && v.k == JK_STR) ? recase(s, v, 1) : v;
}

struct sort_item {
  struct jv key, val;
  size_t at;
};

static void sort_items(struct jstate *s, struct sort_item *it, size_t n,
                       bool reverse) {
  /* a stable merge sort (Python's sort is stable; qsort is not, and its
   * comparator could not reach the render state to fail cleanly) */
  if (n < 2) return;
  struct sort_item *tmp = jalloc(s, n * sizeof(*tmp));
  for (size_t w = 1; w < n; w *= 2) {
    for (size_t lo = 0; lo < n; lo += 2 * w) {
      size_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
      size_t i = lo, j = mid, k = lo;
      while (i < mid && j < hi) {
        step(s);
        int c = jv_cmp(s, it[i].key, it[j].key);
        if (reverse) c = -c;
        tmp[k++] = c <= 0 ? it[i++] : it[j++];
      }
      while (i < mid) tmp[k++] = it[i++];
      while (j < hi) tmp[k++] = it[j++];
    }
    memcpy(it, tmp, n * sizeof(*it));
  }
}

static struct jv html_escape(struct jstate *s, struct jv v) {
  struct sbuf *b = tmpbuf(s);
  for (size_t i = 0; i < v.u.s.n; i++) {
    char c = v.u.s.p[i];
    switch (c) {
    case '&': sb_puts(s, b, "&amp;"); break;
    case '<': sb_puts(s, b, "&lt;"); break;
    case '>': sb_puts(s, b, "&gt;"); break;
    case '"': sb_puts(s, b, "&#34;"); break;
    case '\'': sb_puts(s, b, "&#39;"); break;
    default: sb_putc(s, b, c);
    }
  }
  return tmpdone(s, b);
}

static struct jv to_json(struct jstate *s, struct jv v, struct args *a) {
  struct jv *ind = arg(a, 0, "indent"), *seps = arg(a, 99, "separators");
  struct jv *sk = arg(a, 99, "sort_keys");
  int indent = -1;
  if (ind && ind->k != JK_NONE) {
    int64_t k = as_int(s, *ind, "tojson's indent");
    if (k < 0 || k > 64) FAIL(s, "tojson's indent must be 0..64");
    indent = (int)k;
  }
  const char *item = indent >= 0 ? "," : ", ", *key = ": ";
  if (seps && seps->k != JK_NONE) {
    if (seps->k != JK_LIST || seps->u.l->n != 2 ||
        seps->u.l->v[0].k != JK_STR || seps->u.l->v[1].k != JK_STR)
      FAIL(s, "tojson's separators must be two strings");
    item = jv_strdup(s, seps->u.l->v[0].u.s.p, seps->u.l->v[0].u.s.n).u.s.p;
    key = jv_strdup(s, seps->u.l->v[1].u.s.p, seps->u.l->v[1].u.s.n).u.s.p;
  }
  if (v.k == JK_UNDEF) FAIL(s, "tojson: Object of type Undefined is not JSON serializable");
  struct sbuf *b = tmpbuf(s);
  struct jv *ea = arg(a, 99, "ensure_ascii");
  s->json_ascii = ea && jv_truthy(*ea);
  jv_put_json(s, b, v, indent, item, key, sk && jv_truthy(*sk), 0);
  s->json_ascii = false;
  return tmpdone(s, b);
}

static struct jv to_int(struct jstate *s, struct jv v, struct jv dflt) {
  if (v.k == JK_INT) return v;
  if (v.k == JK_BOOL) return jv_int(v.u.b);
  if (v.k == JK_FLOAT) {
    if (!isfinite(v.u.f) || fabs(v.u.f) >= 9.2e18) return dflt;
    return jv_int((int64_t)v.u.f);
  }
  if (v.k == JK_STR) {
    struct jv t = strip(s, v, NULL, 3);
    char buf[64];
    size_t k = 0;
    for (size_t i = 0; i < t.u.s.n && k < sizeof(buf) - 1; i++)
      if (t.u.s.p[i] != '_') buf[k++] = t.u.s.p[i];
    buf[k] = '\0';
    if (k == 0 || t.u.s.n >= sizeof(buf)) return dflt;
    char *end;
    long long i = strtoll(buf, &end, 10);
    if (*end == '\0') return jv_int(i);
    double d = strtod(buf, &end);
    if (*end == '\0' && isfinite(d) && fabs(d) < 9.2e18)
      return jv_int((int64_t)d);
  }
  return dflt;
}

static struct jv to_float(struct jstate *s, struct jv v, struct jv dflt) {
  if (v.k == JK_FLOAT) return v;
  if (v.k == JK_INT || v.k == JK_BOOL) return jv_float(fnum(v));
  if (v.k == JK_STR) {
    struct jv t = strip(s, v, NULL, 3);
    char buf[64];
    if (t.u.s.n == 0 || t.u.s.n >= sizeof(buf)) return dflt;
    memcpy(buf, t.u.s.p, t.u.s.n);
    buf[t.u.s.n] = '\0';
    char *end;
    double d = strtod(buf, &end);
    if (*end == '\0') return jv_float(d);
  }
  return dflt;
}

static struct jv list_of(struct jstate *s, struct jv v) {
  struct jlist *l = iter_items(s, v);
  struct jv r = jv_list_new(s, l->n);
  for (size_t i = 0; i < l->n; i++) r.u.l->v[r.u.l->n++] = l->v[i];
  return r;
}

/* select/reject/selectattr/rejectattr/map share the "test or filter by
 * name with extra arguments" convention. */
static struct args tail_args(struct args *a, size_t from) {
  struct args t = *a;
  if (from >= a->n_pos) {
    t.n_pos = 0;
    t.pos = NULL;
  } else {
    t.pos = a->pos + from;
    t.n_pos = a->n_pos - from;
  }
  return t;
}

static struct jv select_like(struct jstate *s, struct jv v, struct args *a,
                             bool attr, bool keep) {
  struct jv r = jv_list_new(s, 0);
  r.gen = 1;
  if (!jv_truthy(v)) return r; /* jinja2 checks "if seq" first */
  struct jlist *l = iter_items(s, v);
  size_t first = 0;
  struct jv path = {0};
  if (attr) {
    struct jv *p = arg(a, 0, NULL);
    if (!p) FAIL(s, "selectattr/rejectattr need an attribute");
    path = *p;
    first = 1;
  }
  struct jv *tn = arg(a, first, NULL);
  struct args rest = tail_args(a, first + 1);
  for (size_t i = 0; i < l->n; i++) {
    step(s);
    struct jv x = attr ? attr_path(s, l->v[i], path) : l->v[i];
    bool ok;
    if (tn) {
      need_str(s, *tn, "the test name");
      ok = run_test(s, (struct jstr){tn->u.s.p, tn->u.s.n}, x, &rest);
    } else {
      ok = jv_truthy(x);
    }
    if (ok == keep) jv_list_push(s, &r, l->v[i]);
  }
  return r;
}

static struct jv first_last(struct jstate *s, struct jv v, bool last) {
  if (last && v.gen) FAIL(s, "'generator' object is not reversible");
  struct jlist *l = iter_items(s, v);
  if (l->n == 0) return jv_undef("first item", 10);
  return l->v[last ? l->n - 1 : 0];
}

static struct jv minmax(struct jstate *s, struct jv v, struct args *a,
                        bool max) {
  struct jlist *l = iter_items(s, v);
  struct jv *cs = arg(a, 0, "case_sensitive"), *at = arg(a, 1, "attribute");
  bool sens = cs && jv_truthy(*cs);
  if (l->n == 0) return jv_undef("min/max of an empty sequence", 28);
  size_t best = 0;
  for (size_t i = 1; i < l->n; i++) {
    struct jv x = at ? attr_path(s, l->v[i], *at) : l->v[i];
    struct jv y = at ? attr_path(s, l->v[best], *at) : l->v[best];
    int c = jv_cmp(s, lower_key(s, x, sens), lower_key(s, y, sens));
    if (max ? c > 0 : c < 0) best = i;
  }
  return l->v[best];
}

static struct jv indent_filter(struct jstate *s, struct jv v, struct args *a) {
  struct jv *w = arg(a, 0, "width"), *first = arg(a, 1, "first"),
            *blank = arg(a, 2, "blank");
  struct jv ind;
  if (w && w->k == JK_STR) {
    ind = *w;
  } else {
    int64_t k = w ? as_int(s, *w, "indent width") : 4;
    if (k < 0) k = 0;
    if ((uint64_t)k > 1024) FAIL(s, "indent width too large");
    char *p = jalloc(s, (size_t)k + 1);
    memset(p, ' ', (size_t)k);
    ind = jv_str(p, (size_t)k);
  }
  struct jv text = jv_to_str(s, v);
  struct jv nl = jv_str("\n", 1);
  struct jv with_nl = binop(s, OP_ADD, text, nl);
  struct jv lines = splitlines(s, with_nl);
  struct sbuf *b = tmpbuf(s);
  if (first && jv_truthy(*first)) sb_put(s, b, ind.u.s.p, ind.u.s.n);
  struct jlist *l = lines.u.l;
  for (size_t i = 0; i < l->n; i++) {
    if (i) {
      sb_putc(s, b, '\n');
      if ((blank && jv_truthy(*blank)) || l->v[i].u.s.n)
        sb_put(s, b, ind.u.s.p, ind.u.s.n);
    }
    sb_put(s, b, l->v[i].u.s.p, l->v[i].u.s.n);
  }
  return tmpdone(s, b);
}

static struct jv title_filter(struct jstate *s, struct jv v) {
  /* jinja2: words begin after runs of - whitespace ( { [ < */
  char *p = jalloc(s, v.u.s.n + 1);
  bool start = true;
  for (size_t i = 0; i < v.u.s.n; i++) {
    char c = v.u.s.p[i];
    bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' ||
               ws_c(c);
    if (sep) {
      p[i] = c;
      start = true;
    } else {
      p[i] = start ? up(c) : low(c);
      start = false;
    }
  }
  p[v.u.s.n] = '\0';
  return jv_str(p, v.u.s.n);
}

static struct jv run_filter(struct jstate *s, struct jframe *f,
                            struct jstr name, struct jv v, struct args *a) {
  (void)f;
  struct jv *a0 = arg(a, 0, NULL);
#define IS(x) jeq(name, x)
  if (IS("safe")) {
    struct jv r = jv_to_str(s, v);
    r.safe = 1;
    return r;
  }
  if (IS("default") || IS("d")) {
    struct jv *dv = arg(a, 0, "default_value"), *bo = arg(a, 1, "boolean");
    bool use = v.k == JK_UNDEF || (bo && jv_truthy(*bo) && !jv_truthy(v));
    return use ? (dv ? *dv : jv_str("", 0)) : v;
  }
  if (IS("length") || IS("count")) return jv_int((int64_t)length(s, v));
  if (IS("tojson")) return to_json(s, v, a);
  if (IS("string")) return jv_to_str(s, v);
  if (IS("trim")) return strip(s, jv_to_str(s, v), arg(a, 0, "chars"), 3);
  if (IS("upper")) return recase(s, jv_to_str(s, v), 0);
  if (IS("lower")) return recase(s, jv_to_str(s, v), 1);
  if (IS("capitalize")) return recase(s, jv_to_str(s, v), 3);
  if (IS("title")) return title_filter(s, jv_to_str(s, v));
  if (IS("escape") || IS("e") || IS("forceescape")) {
    struct jv r = v.k == JK_STR && v.safe && !IS("forceescape")
                      ? v
                      : html_escape(s, jv_to_str(s, v));
    r.safe = 1;
    return r;
  }
  if (IS("replace")) {
    struct jv *o = arg(a, 0, "old"), *n = arg(a, 1, "new"),
              *c = arg(a, 2, "count");
    if (!o || !n) FAIL(s, "replace needs old and new");
    return replace(s, jv_to_str(s, v), *o, *n,
                   c && c->k != JK_NONE ? as_int(s, *c, "count") : -1);
  }
  if (IS("join")) {
    struct jv *d = arg(a, 0, "d"), *at = arg(a, 1, "attribute");
    struct jlist *l = iter_items(s, v);
    if (at) {
      struct jv m = jv_list_new(s, l->n);
      for (size_t i = 0; i < l->n; i++)
        m.u.l->v[m.u.l->n++] = attr_path(s, l->v[i], *at);
      l = m.u.l;
    }
    struct jv sep = d ? jv_to_str(s, *d) : jv_str("", 0);
    return join_list(s, l, sep);
  }
  if (IS("first")) return first_last(s, v, false);
  if (IS("last")) return first_last(s, v, true);
  if (IS("list")) return list_of(s, v);
  if (IS("int")) {
    struct jv *d = arg(a, 0, "default");
    return to_int(s, v, d ? *d : jv_int(0));
  }
  if (IS("float")) {
    struct jv *d = arg(a, 0, "default");
    return to_float(s, v, d ? *d : jv_float(0));
  }
  if (IS("abs")) {
    if (v.k == JK_INT) {
      if (v.u.i == INT64_MIN) FAIL(s, "integer overflow");
      return jv_int(v.u.i < 0 ? -v.u.i : v.u.i);
    }
    if (v.k == JK_FLOAT) return jv_float(fabs(v.u.f));
    if (v.k == JK_BOOL) return jv_int(v.u.b);
    FAIL(s, "bad operand type for abs(): '%s'", jv_type_name(v));
  }
  if (IS("round")) {
    struct jv *pr = arg(a, 0, "precision"), *me = arg(a, 1, "method");
    int64_t p = pr ? as_int(s, *pr, "precision") : 0;
    if (!numeric(v)) FAIL(s, "round needs a number, got %s", jv_type_name(v));
    double x = fnum(v), sc = pow(10, (double)p);
    if (me && str_is(*me, "floor")) return jv_float(floor(x * sc) / sc);
    if (me && str_is(*me, "ceil")) return jv_float(ceil(x * sc) / sc);
    if (v.k == JK_INT || v.k == JK_BOOL) return jv_int(inum(v)); /* Python */
    return jv_float(nearbyint(x * sc) / sc);
  }
  if (IS("items")) {
    if (v.k == JK_UNDEF) return jv_list_new(s, 0);
    if (v.k != JK_DICT && v.k != JK_NS)
      FAIL(s, "items filter: can only get item pairs from a mapping");
    struct jv r = jv_list_new(s, v.u.d->n);
    for (size_t i = 0; i < v.u.d->n; i++)
      r.u.l->v[r.u.l->n++] = make_tuple2(s, v.u.d->k[i], v.u.d->v[i]);
    return r;
  }
  if (IS("dictsort")) {
    if (v.k != JK_DICT) FAIL(s, "dictsort needs a dict, got %s", jv_type_name(v));
    struct jv *cs = arg(a, 0, "case_sensitive"), *by = arg(a, 1, "by"),
              *rv = arg(a, 2, "reverse");
    bool sens = cs && jv_truthy(*cs), byval = by && str_is(*by, "value");
    size_t n = v.u.d->n;
    struct sort_item *it = jalloc(s, (n ? n : 1) * sizeof(*it));
    for (size_t i = 0; i < n; i++) {
      it[i].val = make_tuple2(s, v.u.d->k[i], v.u.d->v[i]);
      it[i].key = lower_key(s, byval ? v.u.d->v[i] : v.u.d->k[i], sens);
      it[i].at = i;
    }
    sort_items(s, it, n, rv && jv_truthy(*rv));
    struct jv r = jv_list_new(s, n);
    for (size_t i = 0; i < n; i++) r.u.l->v[r.u.l->n++] = it[i].val;
    return r;
  }
  if (IS("sort")) {
    struct jv *rv = arg(a, 0, "reverse"), *cs = arg(a, 1, "case_sensitive"),
              *at = arg(a, 2, "attribute");
    struct jlist *l = iter_items(s, v);
    bool sens = cs && jv_truthy(*cs);
    struct sort_item *it = jalloc(s, (l->n ? l->n : 1) * sizeof(*it));
    for (size_t i = 0; i < l->n; i++) {
      it[i].val = l->v[i];
      it[i].key = lower_key(s, at ? attr_path(s, l->v[i], *at) : l->v[i], sens);
      it[i].at = i;
    }
    sort_items(s, it, l->n, rv && jv_truthy(*rv));
    struct jv r = jv_list_new(s, l->n);
    for (size_t i = 0; i < l->n; i++) r.u.l->v[r.u.l->n++] = it[i].val;
    return r;
  }
  if (IS("unique")) {
    struct jv *cs = arg(a, 0, "case_sensitive"), *at = arg(a, 1, "attribute");
    bool sens = cs && jv_truthy(*cs);
    struct jlist *l = iter_items(s, v);
    struct jv r = jv_list_new(s, 0), seen = jv_list_new(s, 0);
    r.gen = 1;
    for (size_t i = 0; i < l->n; i++) {
      struct jv k = lower_key(s, at ? attr_path(s, l->v[i], *at) : l->v[i], sens);
      bool dup = false;
      for (size_t j = 0; j < seen.u.l->n && !dup; j++) {
        step(s);
        dup = jv_eq(seen.u.l->v[j], k);
      }
      if (dup) continue;
      jv_list_push(s, &seen, k);
      jv_list_push(s, &r, l->v[i]);
    }
    return r;
  }
  if (IS("reverse")) {
    if (v.k == JK_STR) {
      struct jv m1 = jv_int(-1);
      return slice_v(s, v, NULL, NULL, &m1);
    }
    struct jlist *l = iter_items(s, v);
    struct jv r = jv_list_new(s, l->n);
    for (size_t i = l->n; i-- > 0;) r.u.l->v[r.u.l->n++] = l->v[i];
    return r;
  }
  if (IS("select") || IS("reject")) return select_like(s, v, a, false, IS("select"));
  if (IS("selectattr") || IS("rejectattr"))
    return select_like(s, v, a, true, IS("selectattr"));
  if (IS("map")) {
    struct jv r = jv_list_new(s, 0);
    r.gen = 1;
    if (!jv_truthy(v)) return r; /* jinja2 checks "if seq" first */
    struct jlist *l = iter_items(s, v);
    r = jv_list_new(s, l->n);
    r.gen = 1;
    struct jv *at = arg(a, 99, "attribute");
    if (at) {
      struct jv *d = arg(a, 99, "default");
      for (size_t i = 0; i < l->n; i++) {
        struct jv x = attr_path(s, l->v[i], *at);
        if (x.k == JK_UNDEF && d) x = *d;
        r.u.l->v[r.u.l->n++] = x;
      }
      return r;
    }
    if (!a0) FAIL(s, "map needs a filter name or attribute=");
    need_str(s, *a0, "map's filter name");
    struct args rest = tail_args(a, 1);
    for (size_t i = 0; i < l->n; i++) {
      step(s);
      r.u.l->v[r.u.l->n++] = run_filter(
          s, f, (struct jstr){a0->u.s.p, a0->u.s.n}, l->v[i], &rest);
    }
    return r;
  }
  if (IS("sum")) {
    struct jv *at = arg(a, 0, "attribute"), *st = arg(a, 1, "start");
    struct jv acc = st ? *st : jv_int(0);
    struct jlist *l = iter_items(s, v);
    for (size_t i = 0; i < l->n; i++)
      acc = binop(s, OP_ADD, acc, at ? attr_path(s, l->v[i], *at) : l->v[i]);
    return acc;
  }
  if (IS("min") || IS("max")) return minmax(s, v, a, IS("max"));
  if (IS("indent")) return indent_filter(s, v, a);
  if (IS("center")) {
    struct jv *w = arg(a, 0, "width");
    return pad(s, jv_to_str(s, v), w ? as_int(s, *w, "width") : 80, 0, ' ');
  }
  if (IS("format")) {
    struct jv fmt = need_str(s, v, "format's input");
    struct jv t = jv_list_new(s, a->n_pos);
    t.tuple = 1;
    for (size_t i = 0; i < a->n_pos; i++) t.u.l->v[t.u.l->n++] = a->pos[i];
    return str_percent(s, fmt, t);
  }
  if (IS("attr")) {
    if (!a0) FAIL(s, "attr needs a name");
    need_str(s, *a0, "attr's name");
    return getattr_v(s, v, (struct jstr){a0->u.s.p, a0->u.s.n});
  }
  if (IS("wordcount")) {
    struct jv t = jv_to_str(s, v);
    int64_t k = 0;
    bool in = false;
    for (size_t i = 0; i < t.u.s.n; i++) {
      char c = t.u.s.p[i];
      bool w = alpha(c) || (c >= '0' && c <= '9') || c == '_' ||
               (uint8_t)c >= 0x80;
      if (w && !in) k++;
      in = w;
    }
    return jv_int(k);
  }
#undef IS
  FAIL(s, "no filter named '%.*s'", (int)name.n, name.p);
}

static bool run_test(struct jstate *s, struct jstr name, struct jv v,
                     struct args *a) {
  struct jv *a0 = arg(a, 0, NULL);
#define IS(x) jeq(name, x)
  if (IS("defined")) return v.k != JK_UNDEF;
  if (IS("undefined")) return v.k == JK_UNDEF;
  if (IS("none")) return v.k == JK_NONE;
  if (IS("string")) return v.k == JK_STR;
  if (IS("number")) return numeric(v);
  if (IS("integer")) return v.k == JK_INT;
  if (IS("float")) return v.k == JK_FLOAT;
  if (IS("boolean")) return v.k == JK_BOOL;
  if (IS("true")) return v.k == JK_BOOL && v.u.b;
  if (IS("false")) return v.k == JK_BOOL && !v.u.b;
  if (IS("mapping")) return v.k == JK_DICT;
  if (IS("iterable"))
    return v.k == JK_STR || v.k == JK_LIST || v.k == JK_DICT ||
           v.k == JK_UNDEF;
  if (IS("sequence"))
    return v.k == JK_STR || v.k == JK_LIST || v.k == JK_DICT ||
           v.k == JK_UNDEF;
  if (IS("callable")) return v.k == JK_MACRO || v.k == JK_FUNC;
  if (IS("odd") || IS("even")) {
    int64_t i = as_int(s, v, "the tested value");
    return (i % 2 != 0) == IS("odd");
  }
  if (IS("divisibleby")) {
    if (!a0) FAIL(s, "divisibleby needs a number");
    int64_t d = as_int(s, *a0, "divisibleby's argument");
    if (d == 0) FAIL(s, "integer division or modulo by zero");
    return as_int(s, v, "the tested value") % d == 0;
  }
  if (IS("lower") || IS("upper")) {
    struct jv t = jv_to_str(s, v);
    struct jv c = recase(s, t, IS("lower") ? 1 : 0);
    return jv_eq(t, c);
  }
  if (!a0 && !IS("escaped"))
    FAIL(s, "test '%.*s' needs an argument", (int)name.n, name.p);
  if (IS("eq") || IS("equalto") || IS("==")) return jv_eq(v, *a0);
  if (IS("ne") || IS("!=")) return !jv_eq(v, *a0);
  if (IS("lt") || IS("lessthan") || IS("<")) return compare(s, OP_LT, v, *a0);
  if (IS("le") || IS("<=")) return compare(s, OP_LE, v, *a0);
  if (IS("gt") || IS("greaterthan") || IS(">")) return compare(s, OP_GT, v, *a0);
  if (IS("ge") || IS(">=")) return compare(s, OP_GE, v, *a0);
  if (IS("in")) return contains(s, *a0, v);
  if (IS("sameas")) {
    if (v.k != a0->k) return false;
    if (v.k == JK_NONE || v.k == JK_UNDEF) return true;
    if (v.k == JK_BOOL) return v.u.b == a0->u.b;
    return jv_eq(v, *a0) && (v.k == JK_INT || memcmp(&v.u, &a0->u, sizeof(v.u)) == 0);
  }
#undef IS
  FAIL(s, "no test named '%.*s'", (int)name.n, name.p);
}

/* ---- calls */

static struct jv call_macro(struct jstate *s, const struct jmacro *m,
                            struct args *a);

static struct jv call_value(struct jstate *s, struct jv fn, struct args *a) {
  if (fn.k == JK_MACRO) return call_macro(s, fn.u.m, a);
  if (fn.k == JK_UNDEF) undef_fail(s, fn);
  if (fn.k != JK_FUNC) FAIL(s, "'%s' object is not callable", jv_type_name(fn));
  const struct jfunc *f = fn.u.fn;
  if (f->kind == F_GLOBAL) return call_global(s, f->name, a);
  if (f->kind == F_UNSAFE)
    FAIL(s, "access to attribute '%.*s' of '%s' object is unsafe (templates "
         "may not modify their inputs)",
         (int)f->name.n, f->name.p, jv_type_name(f->self));
  struct jv self = f->self;
  struct jstr m = f->name;
  struct jv *a0 = arg(a, 0, NULL);
  switch (self.k) {
  case JK_STR: return call_str_method(s, self, m, a);
  case JK_DICT:
    if (jeq(m, "get")) {
      if (!a0) FAIL(s, "get expected at least 1 argument, got 0");
      struct jv *v = jv_dict_find_v(&self, *a0);
      if (v) return *v;
      struct jv *d = arg(a, 1, NULL);
      return d ? *d : jv_none();
    }
    if (jeq(m, "items")) {
      struct jv r = jv_list_new(s, self.u.d->n);
      for (size_t i = 0; i < self.u.d->n; i++)
        r.u.l->v[r.u.l->n++] = make_tuple2(s, self.u.d->k[i], self.u.d->v[i]);
      return r;
    }
    if (jeq(m, "keys") || jeq(m, "values")) {
      struct jv r = jv_list_new(s, self.u.d->n);
      for (size_t i = 0; i < self.u.d->n; i++)
        r.u.l->v[r.u.l->n++] = jeq(m, "keys") ? self.u.d->k[i] : self.u.d->v[i];
      return r;
    }
    if (jeq(m, "copy")) {
      struct jv r = jv_dict_new(s, self.u.d->n);
      for (size_t i = 0; i < self.u.d->n; i++)
        jv_dict_set(s, &r, self.u.d->k[i], self.u.d->v[i]);
      return r;
    }
    break;
  case JK_LIST:
    if (jeq(m, "index") || jeq(m, "count")) {
      if (!a0) FAIL(s, "%.*s() takes exactly one argument", (int)m.n, m.p);
      int64_t k = 0;
      for (size_t i = 0; i < self.u.l->n; i++)
        if (jv_eq(self.u.l->v[i], *a0)) {
          if (jeq(m, "index")) return jv_int((int64_t)i);
          k++;
        }
      if (jeq(m, "index")) FAIL(s, "list.index(x): x not in list");
      return jv_int(k);
    }
    if (jeq(m, "copy")) return list_of(s, self);
    break;
  case JK_LOOP:
    if (jeq(m, "cycle")) {
      if (a->n_pos == 0) FAIL(s, "no items for cycling given");
      return a->pos[self.u.loop->i % a->n_pos];
    }
    break;
  default: break;
  }
  FAIL(s, "'%s' has no method '%.*s'", jv_type_name(self), (int)m.n, m.p);
}

static struct jv call_macro(struct jstate *s, const struct jmacro *m,
                            struct args *a) {
  const struct jnode *n = m->node;
  if (s->depth >= s->lim.max_depth)
    jfail(s, TN_ERANGE, "chat template: line %d: macro calls nested more "
          "than %u deep (runaway recursion?)", s->line, s->lim.max_depth);
  if (a->n_pos > n->n_names)
    FAIL(s, "macro '%.*s' takes not more than %zu argument(s)", (int)n->name.n,
         n->name.p, n->n_names);
  struct jframe fr = {.parent = m->closure};
  if (s->caller) { /* {% call %}: the block is caller() inside */
    frame_set(s, &fr, (struct jstr){"caller", 6},
              (struct jv){.k = JK_MACRO, .u.m = s->caller});
    s->caller = NULL;
  }
  for (size_t i = 0; i < n->n_names; i++) {
    struct jv v;
    bool have = false;
    if (i < a->n_pos) {
      v = a->pos[i];
      have = true;
    }
    for (size_t k = 0; k < a->n_kw; k++)
      if (a->kwn[k].n == n->names[i].n &&
          memcmp(a->kwn[k].p, n->names[i].p, n->names[i].n) == 0) {
        if (have) FAIL(s, "macro '%.*s' got multiple values for '%.*s'",
                       (int)n->name.n, n->name.p, (int)n->names[i].n,
                       n->names[i].p);
        v = a->kwv[k];
        have = true;
      }
    if (!have) {
      const struct jnode *d = n->kids[1 + i];
      v = d ? eval(s, &fr, d) : jv_undef(n->names[i].p, n->names[i].n);
    }
    frame_set(s, &fr, n->names[i], v);
  }
  for (size_t k = 0; k < a->n_kw; k++) {
    bool known = false;
    for (size_t i = 0; i < n->n_names; i++)
      known |= a->kwn[k].n == n->names[i].n &&
               memcmp(a->kwn[k].p, n->names[i].p, n->names[i].n) == 0;
    if (!known)
      FAIL(s, "macro '%.*s' takes no keyword argument '%.*s'", (int)n->name.n,
           n->name.p, (int)a->kwn[k].n, a->kwn[k].p);
  }
  struct sbuf *b = tmpbuf(s);
  struct sbuf *saved = s->out;
  s->out = b;
  s->depth++;
  int line = s->line;
  exec(s, &fr, n->kids[0]);
  s->depth--;
  s->line = line;
  s->out = saved;
  return tmpdone(s, b);
}

/* ---- expressions */

/* Expression and statement nesting times macro depth: bounded so a
 * hostile template cannot run the C stack out (macro depth 64 x nesting
 * 200 would be 12,800 levels). 512 keeps an ASan build (frames several
 * times larger) well inside an 8 MiB stack; real templates nest a few
 * dozen levels. */
#define MAX_NESTING 512

static struct jv eval_node(struct jstate *s, struct jframe *f,
                           const struct jnode *n);

static struct jv eval(struct jstate *s, struct jframe *f,
                      const struct jnode *n) {
  if (++s->nesting > MAX_NESTING)
    jfail(s, TN_ERANGE,
          "chat template: line %d: expressions and calls nested more than "
          "%d deep",
          n->line, MAX_NESTING);
  struct jv v = eval_node(s, f, n);
  s->nesting--;
  return v;
}

static struct jv eval_node(struct jstate *s, struct jframe *f,
                           const struct jnode *n) {
  step(s);
  s->line = n->line;
  switch (n->kind) {
  case N_LIT: return n->lit;
  case N_NAME: {
    struct jv *v = frame_find(f, n->name);
    return v ? *v : jv_undef(n->name.p, n->name.n);
  }
  case N_LIST: {
    struct jv l = jv_list_new(s, n->n_kids);
    l.tuple = n->flag;
    for (size_t i = 0; i < n->n_kids; i++)
      l.u.l->v[l.u.l->n++] = eval(s, f, n->kids[i]);
    return l;
  }
  case N_DICT: {
    struct jv d = jv_dict_new(s, n->n_kids / 2);
    for (size_t i = 0; i + 1 < n->n_kids; i += 2) {
      struct jv k = eval(s, f, n->kids[i]);
      if (k.k == JK_LIST && !k.tuple) FAIL(s, "unhashable type: 'list'");
      if (k.k == JK_DICT) FAIL(s, "unhashable type: 'dict'");
      jv_dict_set(s, &d, k, eval(s, f, n->kids[i + 1]));
    }
    return d;
  }
  case N_ATTR: {
    struct jv o = eval(s, f, n->kids[0]);
    s->line = n->line;
    return getattr_v(s, o, n->name);
  }
  case N_ITEM: {
    struct jv o = eval(s, f, n->kids[0]);
    struct jv k = eval(s, f, n->kids[1]);
    s->line = n->line;
    return getitem_v(s, o, k);
  }
  case N_SLICE: {
    struct jv o = eval(s, f, n->kids[0]);
    struct jv x[3];
    struct jv *px[3] = {0};
    for (int i = 0; i < 3; i++)
      if (n->kids[1 + i]) {
        x[i] = eval(s, f, n->kids[1 + i]);
        px[i] = &x[i];
      }
    s->line = n->line;
    return slice_v(s, o, px[0], px[1], px[2]);
  }
  case N_CALL: {
    const struct jnode *callee = n->kids[0];
    struct jv fn;
    if (callee->kind == N_NAME && !frame_find(f, callee->name))
      FAIL(s, "'%.*s' is undefined", (int)callee->name.n, callee->name.p);
    fn = eval(s, f, callee);
    struct args a;
    eval_args(s, f, n, 1, &a);
    s->line = n->line;
    return call_value(s, fn, &a);
  }
  case N_FILTER: {
    struct jv v = eval(s, f, n->kids[0]);
    struct args a;
    eval_args(s, f, n, 1, &a);
    s->line = n->line;
    return run_filter(s, f, n->name, v, &a);
  }
  case N_TEST: {
    struct jv v = eval(s, f, n->kids[0]);
    struct args a;
    eval_args(s, f, n, 1, &a);
    s->line = n->line;
    bool r = run_test(s, n->name, v, &a);
    return jv_bool(n->flag ? !r : r);
  }
  case N_NOT: return jv_bool(!jv_truthy(eval(s, f, n->kids[0])));
  case N_NEG:
  case N_POS: {
    struct jv v = eval(s, f, n->kids[0]);
    s->line = n->line;
    if (v.k == JK_UNDEF) undef_fail(s, v);
    if (!numeric(v))
      FAIL(s, "bad operand type for unary %c: '%s'",
           n->kind == N_NEG ? '-' : '+', jv_type_name(v));
    if (n->kind == N_POS) return v.k == JK_BOOL ? jv_int(v.u.b) : v;
    if (v.k == JK_FLOAT) return jv_float(-v.u.f);
    if (inum(v) == INT64_MIN) FAIL(s, "integer overflow");
    return jv_int(-inum(v));
  }
  case N_BIN: {
    struct jv a = eval(s, f, n->kids[0]);
    struct jv b = eval(s, f, n->kids[1]);
    s->line = n->line;
    return binop(s, n->op, a, b);
  }
  case N_AND: {
    struct jv a = eval(s, f, n->kids[0]);
    return jv_truthy(a) ? eval(s, f, n->kids[1]) : a;
  }
  case N_OR: {
    struct jv a = eval(s, f, n->kids[0]);
    return jv_truthy(a) ? a : eval(s, f, n->kids[1]);
  }
  case N_COMPARE: {
    struct jv a = eval(s, f, n->kids[0]);
    for (size_t i = 1; i < n->n_kids; i++) {
      struct jv b = eval(s, f, n->kids[i]);
      s->line = n->line;
      if (!compare(s, n->ops[i - 1], a, b)) return jv_bool(false);
      a = b;
    }
    return jv_bool(true);
  }
  case N_COND:
    if (jv_truthy(eval(s, f, n->kids[0]))) return eval(s, f, n->kids[1]);
    return n->kids[2] ? eval(s, f, n->kids[2]) : jv_undef("if-expression", 13);
  case N_CONCAT: {
    struct sbuf *b = tmpbuf(s);
    for (size_t i = 0; i < n->n_kids; i++)
      jv_put_str(s, b, eval(s, f, n->kids[i]));
    return tmpdone(s, b);
  }
  default: FAIL(s, "internal error: bad expression node %d", n->kind);
  }
}

/* ---- statements */

enum { FLOW_NEXT, FLOW_BREAK, FLOW_CONTINUE };

static void unpack(struct jstate *s, struct jframe *f, const struct jstr *names,
                   size_t n_names, struct jv v) {
  if (n_names == 1) {
    frame_set(s, f, names[0], v);
    return;
  }
  struct jlist *l = iter_items(s, v);
  if (l->n != n_names)
    FAIL(s, "%s values to unpack (expected %zu, got %zu)",
         l->n > n_names ? "too many" : "not enough", n_names, l->n);
  for (size_t i = 0; i < n_names; i++) frame_set(s, f, names[i], l->v[i]);
}

static int exec_for(struct jstate *s, struct jframe *f, const struct jnode *n) {
  struct jv it = eval(s, f, n->kids[0]);
  s->line = n->line;
  struct jlist *items = iter_items(s, it);
  struct jframe fr = {.parent = f};
  if (n->kids[3]) { /* for x in xs if cond: filter first */
    struct jv kept = jv_list_new(s, 0);
    for (size_t i = 0; i < items->n; i++) {
      step(s);
      unpack(s, &fr, n->names, n->n_names, items->v[i]);
      if (jv_truthy(eval(s, &fr, n->kids[3])))
        jv_list_push(s, &kept, items->v[i]);
    }
    items = kept.u.l;
  }
  struct jloop *lp = jalloc(s, sizeof(*lp));
  lp->items = items;
  lp->i = 0;
  size_t n_items = items->n;
  for (size_t i = 0; i < n_items; i++) {
    step(s);
    lp->i = i;
    unpack(s, &fr, n->names, n->n_names, items->v[i]);
    frame_set(s, &fr, (struct jstr){"loop", 4},
              (struct jv){.k = JK_LOOP, .u.loop = lp});
    int fl = exec(s, &fr, n->kids[1]);
    if (fl == FLOW_BREAK) break;
  }
  if (n_items == 0 && n->kids[2]) return exec(s, f, n->kids[2]);
  return FLOW_NEXT;
}

/* Applies "| a | b" written after a block (the parser nests them with the
 * first filter innermost, its operand NULL). */
static struct jv filter_chain(struct jstate *s, struct jframe *f,
                              const struct jnode *last, struct jv v) {
  const struct jnode *chain[32];
  size_t k = 0;
  for (const struct jnode *q = last; q; q = q->kids[0]) {
    if (k == 32) FAIL(s, "too many filters on a block");
    chain[k++] = q;
  }
  while (k-- > 0) {
    struct args a;
    eval_args(s, f, chain[k], 1, &a);
    v = run_filter(s, f, chain[k]->name, v, &a);
  }
  return v;
}

static int exec_node(struct jstate *s, struct jframe *f,
                     const struct jnode *n);

static int exec(struct jstate *s, struct jframe *f, const struct jnode *n) {
  if (++s->nesting > MAX_NESTING)
    jfail(s, TN_ERANGE,
          "chat template: line %d: blocks and calls nested more than %d deep",
          n->line, MAX_NESTING);
  int r = exec_node(s, f, n);
  s->nesting--;
  return r;
}

static int exec_node(struct jstate *s, struct jframe *f,
                     const struct jnode *n) {
  s->line = n->line;
  switch (n->kind) {
  case N_BODY:
    for (size_t i = 0; i < n->n_kids; i++) {
      int fl = exec(s, f, n->kids[i]);
      if (fl != FLOW_NEXT) return fl;
    }
    return FLOW_NEXT;
  case N_TEXT: sb_put(s, s->out, n->lit.u.s.p, n->lit.u.s.n); return FLOW_NEXT;
  case N_OUT: {
    struct jv v = eval(s, f, n->kids[0]);
    jv_put_str(s, s->out, v);
    return FLOW_NEXT;
  }
  case N_IF:
    if (jv_truthy(eval(s, f, n->kids[0]))) return exec(s, f, n->kids[1]);
    if (n->kids[2]) return exec(s, f, n->kids[2]);
    return FLOW_NEXT;
  case N_FOR: return exec_for(s, f, n);
  case N_SET: {
    struct jv v = eval(s, f, n->kids[0]);
    s->line = n->line;
    if (n->attr.p) {
      if (n->attr.p[0] == '_')
        FAIL(s, "access to attribute '%.*s' of 'Namespace' object is unsafe",
             (int)n->attr.n, n->attr.p);
      struct jv *ns = frame_find(f, n->name);
      if (!ns || ns->k != JK_NS)
        FAIL(s, "cannot assign attribute on non-namespace object");
      jv_dict_set(s, ns, jv_str(n->attr.p, n->attr.n), v);
      return FLOW_NEXT;
    }
    unpack(s, f, n->names, n->n_names, v);
    return FLOW_NEXT;
  }
  case N_SETBLOCK: {
    struct sbuf *b = tmpbuf(s);
    struct sbuf *saved = s->out;
    s->out = b;
    exec(s, f, n->kids[0]);
    s->out = saved;
    struct jv v = tmpdone(s, b);
    v = filter_chain(s, f, n->kids[1], v);
    frame_set(s, f, n->name, v);
    return FLOW_NEXT;
  }
  case N_FILTERBLOCK: {
    struct sbuf *b = tmpbuf(s);
    struct sbuf *saved = s->out;
    s->out = b;
    exec(s, f, n->kids[0]);
    s->out = saved;
    struct jv v = filter_chain(s, f, n->kids[1], tmpdone(s, b));
    jv_put_str(s, s->out, v);
    return FLOW_NEXT;
  }
  case N_MACRO: {
    struct jmacro *m = jalloc(s, sizeof(*m));
    m->node = n;
    m->closure = f;
    frame_set(s, f, n->name, (struct jv){.k = JK_MACRO, .u.m = m});
    return FLOW_NEXT;
  }
  case N_CALLBLOCK: {
    const struct jnode *call = n->kids[0];
    struct jv fn = eval(s, f, call->kids[0]);
    struct args a;
    eval_args(s, f, call, 1, &a);
    if (fn.k != JK_MACRO) FAIL(s, "a call block must call a macro");
    struct jmacro *m = jalloc(s, sizeof(*m));
    m->node = n->kids[1];
    m->closure = f;
    s->caller = m;
    s->line = n->line;
    jv_put_str(s, s->out, call_macro(s, fn.u.m, &a));
    return FLOW_NEXT;
  }
  case N_BREAK: return FLOW_BREAK;
  case N_CONTINUE: return FLOW_CONTINUE;
  default: FAIL(s, "internal error: bad statement node %d", n->kind);
  }
}

/* ---- public API */

void tn_jinja_limits_default(struct tn_jinja_limits *lim) {
  *lim = (struct tn_jinja_limits){.max_output = 8u << 20,
                                  .max_memory = 256u << 20,
                                  .max_steps = 20000000,
                                  .max_depth = 64,
                                  .now = 0};
}

static const char *const global_names[] = {"range", "namespace", "dict",
                                           "raise_exception", "strftime_now"};

enum tn_status tn_jinja_render(const struct tn_jinja *t,
                               struct tn_jinja_ctx *c,
                               const struct tn_jinja_limits *lim, char **out,
                               size_t *out_len, struct tn_error *err) {
  *out = NULL;
  *out_len = 0;
  if (c->oom)
    return tn_error_set(err, TN_ENOMEM,
                        "chat template: out of memory building the input");
  struct jstate *s = calloc(1, sizeof(*s));
  if (!s) return tn_error_set(err, TN_ENOMEM, "chat template: out of memory");
  s->c = c;
  s->t = t;
  s->err = err;
  if (lim) s->lim = *lim;
  else tn_jinja_limits_default(&s->lim);
  size_t saved_cap = c->arena.cap;
  if (s->lim.max_memory) c->arena.cap = c->arena.total + s->lim.max_memory;
  if (setjmp(s->jb)) {
    enum tn_status st = s->status;
    for (unsigned i = 0; i < s->n_bufs; i++) free(s->bufs[i].p);
    c->arena.cap = saved_cap;
    free(s);
    return st;
  }
  s->n_bufs = 1;
  s->out = &s->bufs[0];
  for (size_t i = 0; i < sizeof(global_names) / sizeof(global_names[0]); i++) {
    struct jstr nm = {global_names[i], strlen(global_names[i])};
    if (!frame_find(&c->globals, nm))
      frame_set(s, &c->globals, nm,
                func(s, F_GLOBAL, nm.p, nm.n, jv_none()));
  }
  struct jframe top = {.parent = &c->globals};
  exec(s, &top, t->root);
  struct sbuf *b = &s->bufs[0];
  if (!b->p) {
    b->p = malloc(1);
    if (!b->p) jfail(s, TN_ENOMEM, "chat template: out of memory");
    b->p[0] = '\0';
  }
  *out = b->p;
  *out_len = b->n;
  c->arena.cap = saved_cap;
  free(s);
  return TN_OK;
}
