/*
 * jinja_internal.h: values, the arena, the syntax tree and the render
 * state, shared by value.c (values and their text forms), parse.c (lexer
 * and parser) and eval.c (the interpreter, filters, tests and methods).
 *
 * Memory: everything a template compiles to lives in the template's arena;
 * everything a render makes lives in the context's arena. Nothing is freed
 * one by one, so values are plain structs copied by value, and lists and
 * dicts are shared by pointer (reference semantics, as in Python).
 *
 * Errors unwind with longjmp to the entry point (tn_jinja_compile or
 * tn_jinja_render): the only resources held across a jump are arena chunks
 * and the render's output buffers, all owned by the state that catches it.
 */
#ifndef TN_JINJA_INTERNAL_H
#define TN_JINJA_INTERNAL_H

#include <setjmp.h>

#include "jinja/jinja.h"

/* ---- arena: bump allocation in chunks, with a cap */

struct jchunk {
  struct jchunk *next;
  size_t size, used;
  max_align_t data[];
};

struct jarena {
  struct jchunk *head;
  size_t total; /* bytes taken from malloc */
  size_t cap;   /* 0: no cap */
};

/* NULL when the cap is reached or malloc fails. */
void *ja_alloc(struct jarena *a, size_t n);
void ja_free(struct jarena *a);

/* ---- values */

enum jk {
  JK_UNDEF, /* s holds the name, for messages */
  JK_NONE,
  JK_BOOL,
  JK_INT,
  JK_FLOAT,
  JK_STR,
  JK_LIST, /* tuple flag set for tuples (they print with parentheses) */
  JK_DICT,
  JK_NS,    /* namespace(): a dict whose attributes may be set */
  JK_MACRO,
  JK_FUNC,  /* a builtin function or a bound method */
  JK_LOOP,
  JK_COUNT
};

struct jlist {
  size_t n, cap;
  struct jv *v;
};

struct jdict {
  size_t n, cap;
  struct jv *k, *v;
};

struct jmacro;
struct jfunc;
struct jloop;

struct jv {
  uint8_t k;
  uint8_t tuple; /* JK_LIST: a tuple; JK_UNDEF: made by refusing an unsafe
                    attribute */
  uint8_t gen;   /* JK_LIST: a generator (what map, select, ... return in
                    jinja2: always true, no len(), no index, no JSON) */
  uint8_t safe;  /* JK_STR: Markup (|safe, |escape): '+' escapes the other
                    operand */
  union {
    bool b;
    int64_t i;
    double f;
    struct {
      const char *p;
      size_t n;
    } s;
    struct jlist *l;
    struct jdict *d;
    const struct jmacro *m;
    const struct jfunc *fn;
    struct jloop *loop;
  } u;
};

/* ---- syntax tree */

enum jn {
  /* expressions */
  N_LIT,     /* lit */
  N_NAME,    /* name */
  N_LIST,    /* kids: items; flag 1: tuple */
  N_DICT,    /* kids: key, value, key, value, ... */
  N_ATTR,    /* kids[0].name */
  N_ITEM,    /* kids[0][kids[1]] */
  N_SLICE,   /* kids[0][kids[1]:kids[2]:kids[3]], each but 0 may be NULL */
  N_CALL,    /* kids[0](kids[1..]); the last n_kw are keyword args */
  N_FILTER,  /* kids[0] | name(kids[1..]) */
  N_TEST,    /* kids[0] is [not] name(kids[1..]); flag 1: negated */
  N_NOT,     /* not kids[0] */
  N_NEG,     /* -kids[0] */
  N_POS,     /* +kids[0] */
  N_BIN,     /* kids[0] op kids[1] */
  N_AND,     /* kids[0] and kids[1] */
  N_OR,      /* kids[0] or kids[1] */
  N_COMPARE, /* kids[0] ops[0] kids[1] ops[1] kids[2] ... */
  N_COND,    /* kids[1] if kids[0] else kids[2] (kids[2] may be NULL) */
  N_CONCAT,  /* kids[0] ~ kids[1] ~ ... */
  /* statements */
  N_BODY,    /* kids: statements in order */
  N_TEXT,    /* lit: a string */
  N_OUT,     /* {{ kids[0] }} */
  N_IF,      /* if kids[0]: kids[1] else kids[2] (NULL: none) */
  N_FOR,     /* for names in kids[0] [if kids[3]]: kids[1] else kids[2] */
  N_SET,     /* name [. attr] = kids[0]; names: the targets (unpacking) */
  N_SETBLOCK,/* name = rendered kids[0] (kids[1]: filter on it or NULL) */
  N_MACRO,   /* macro name(names...) defaults kids[1..] (NULL: none);
                kids[0]: body */
  N_BREAK,
  N_CONTINUE,
  N_FILTERBLOCK, /* kids[0]: body; kids[1]: N_FILTER whose kids[0] is NULL */
  N_CALLBLOCK,   /* {% call f(...) %}: kids[0] the N_CALL, kids[1] an
                    N_MACRO "caller" whose body is the block */
  N_COUNT
};

enum jop {
  OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW,
  OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_IN, OP_NOTIN
};

struct jstr {
  const char *p;
  size_t n;
};

struct jnode {
  uint8_t kind;
  uint8_t op;
  uint8_t flag;
  int line;
  struct jstr name;
  struct jstr attr;   /* N_SET on a namespace: ns.attr */
  struct jv lit;
  struct jnode **kids;
  size_t n_kids;
  struct jstr *names; /* N_FOR / N_SET targets, N_MACRO parameters,
                         N_CALL / N_FILTER / N_TEST keyword names */
  size_t n_names;
  size_t n_kw;        /* keyword args: the last n_kw kids */
  uint8_t *ops;       /* N_COMPARE: n_kids - 1 operators */
};

struct jmacro {
  const struct jnode *node;
  struct jframe *closure;
};

/* ---- template */

struct tn_jinja {
  struct jarena arena;
  struct jnode *root;
  struct jstr *names; /* every variable name the template reads */
  size_t n_names;
};

/* parse.c: fills t->root; returns false with err set on a syntax error. */
bool jinja_parse(struct tn_jinja *t, const char *src, size_t n,
                 struct tn_error *err);

/* ---- render state */

struct sbuf {
  char *p;
  size_t n, cap;
};

struct jframe {
  struct jframe *parent;
  size_t n, cap;
  struct jstr *names;
  struct jv *vals;
};

struct tn_jinja_ctx {
  struct jarena arena;
  struct jframe globals;
  bool oom;
};

struct jstate {
  struct tn_jinja_ctx *c;
  const struct tn_jinja *t;
  struct tn_jinja_limits lim;
  jmp_buf jb;
  struct tn_error *err;
  enum tn_status status;
  struct sbuf *out;   /* where output goes now (captures swap it) */
  struct sbuf bufs[64]; /* output buffers: [0] the render, the rest captures */
  unsigned n_bufs;
  uint64_t steps;
  unsigned depth;     /* macro calls */
  unsigned nesting;   /* eval/exec recursion: bounds the C stack */
  int line; /* the line being evaluated, for messages */
  bool json_ascii; /* tojson(ensure_ascii=true) in progress */
  struct jmacro *caller; /* {% call %}: the body, for the macro called */
};

/* Fails the render: longjmps out. */
_Noreturn void jfail(struct jstate *s, enum tn_status st, const char *fmt,
                     ...) __attribute__((format(printf, 3, 4)));

/* value.c */
void *jalloc(struct jstate *s, size_t n);
struct jv jv_undef(const char *name, size_t n);
struct jv jv_none(void);
struct jv jv_bool(bool b);
struct jv jv_int(int64_t i);
struct jv jv_float(double f);
struct jv jv_str(const char *p, size_t n);
struct jv jv_strdup(struct jstate *s, const char *p, size_t n);
struct jv jv_list_new(struct jstate *s, size_t cap);
void jv_list_push(struct jstate *s, struct jv *list, struct jv v);
struct jv jv_dict_new(struct jstate *s, size_t cap);
void jv_dict_set(struct jstate *s, struct jv *dict, struct jv key, struct jv v);
/* NULL when absent. */
struct jv *jv_dict_find(const struct jv *dict, const char *key, size_t n);
struct jv *jv_dict_find_v(const struct jv *dict, struct jv key);
bool jv_truthy(struct jv v);
bool jv_eq(struct jv a, struct jv b);
/* <0, 0, >0; fails the render for types Python cannot order. */
int jv_cmp(struct jstate *s, struct jv a, struct jv b);
const char *jv_type_name(struct jv v);
/* Python's str() and repr() into b. */
void jv_put_str(struct jstate *s, struct sbuf *b, struct jv v);
void jv_put_repr(struct jstate *s, struct sbuf *b, struct jv v);
/* json.dumps(v, ensure_ascii=False, indent, separators, sort_keys). indent
 * < 0: none. */
void jv_put_json(struct jstate *s, struct sbuf *b, struct jv v, int indent,
                 const char *item_sep, const char *key_sep, bool sort_keys,
                 int depth);
/* str(v) as a string value (no copy when v is already a string). */
struct jv jv_to_str(struct jstate *s, struct jv v);

void sb_put(struct jstate *s, struct sbuf *b, const char *p, size_t n);
void sb_puts(struct jstate *s, struct sbuf *b, const char *p);
void sb_putc(struct jstate *s, struct sbuf *b, char ch);
/* The buffer's bytes as an arena string. */
struct jv sb_take(struct jstate *s, struct sbuf *b);

/* UTF-8 helpers: code point count, byte offset of code point i. */
size_t u8_len(const char *p, size_t n);
size_t u8_offset(const char *p, size_t n, size_t i);
size_t u8_next(const char *p, size_t n, size_t at);
bool py_isspace(uint32_t c);
uint32_t u8_decode(const char *p, size_t n, size_t at, size_t *len);

/* JSON text into a value (used by tn_jinja_json). */
bool jv_parse_json(struct jstate *s, const char *p, size_t n, struct jv *out,
                   size_t *err_at);

#endif /* TN_JINJA_INTERNAL_H */
