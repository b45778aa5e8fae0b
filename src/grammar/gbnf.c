/*
 * gbnf.c: GBNF text to a compiled grammar (grammar_internal.h).
 *
 * The dialect (docs/GRAMMAR.md) is llama.cpp's GBNF as users write it:
 *
 *   root   ::= object
 *   object ::= "{" ws ( pair ( "," ws pair )* )? "}"
 *   digit  ::= [0-9]     # a comment
 *   word   ::= [^ \t\n]+ | "x"{2,5} | .
 *
 * A rule's body runs until the next `name ::=`; newlines are spaces.
 * Literals and classes take \n \r \t \\ \" \' \] \- \xHH \uHHHH
 * \UHHHHHHHH escapes; `.` is any code point. Everything is lowered here:
 *
 *  - a literal becomes its UTF-8 bytes, one byte-set element each;
 *  - a class becomes one byte set when all its code points are ASCII,
 *    else a helper rule whose alternatives are the UTF-8 byte-range
 *    sequences of its code point ranges (the usual split at continuation
 *    byte boundaries);
 *  - a group becomes a helper rule; x? a helper `h ::= x | ()`, x* a
 *    right-recursive helper `h ::= x h | ()` (the matcher makes a call
 *    in tail position replace its caller, so a loop never deepens the
 *    stack), x{m,n} m copies then nested optionals.
 *
 * Then the checks that keep the matcher finite: every referenced rule is
 * defined, `root` exists, and no rule can reach itself without consuming
 * a byte (left recursion, or a repetition of something that can be
 * empty).
 */
#include "grammar/grammar_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void gbnf_literal(struct tn_buf *b, const char *s, size_t n) {
  tn_buf_append(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      tn_buf_append(b, e, 2);
    } else if (c >= 0x80) {
      uint32_t cp;
      size_t k = utf8_decode(s + i, n - i, &cp);
      if (k == 0) {
        tn_buf_printf(b, "\\x%02X", c); /* a raw byte (our dialect) */
      } else {
        tn_buf_append(b, s + i, k);
        i += k - 1;
      }
    } else if (c < 0x20 || c == 0x7f) {
      tn_buf_printf(b, "\\x%02X", c);
    } else {
      tn_buf_append(b, (const char *)&c, 1);
    }
  }
  tn_buf_append(b, "\"", 1);
}

/* ---- the parser's rules */

struct alt {
  uint32_t *el;
  uint32_t n, cap;
};

struct rule {
  char *name;
  struct alt *alts;
  uint32_t n_alts, cap_alts;
  bool defined;
  const char *first_use; /* where it was first referenced (errors) */
};

struct parser {
  const char *text, *s, *end;
  struct rule *rules;
  uint32_t n_rules, cap_rules;
  uint32_t *ht; /* name -> rule id + 1, open addressing */
  uint32_t ht_cap;
  uint64_t (*sets)[4];
  uint32_t n_sets, cap_sets;
  uint32_t *set_ht; /* set contents -> id + 1 */
  uint32_t set_ht_cap;
  size_t n_elems;
  uint32_t n_helpers;
  int depth;
  bool failed;
  struct tn_error *err;
};

#define MAX_NEST 200

__attribute__((format(printf, 3, 4))) static void fail_at(struct parser *p,
                                                          const char *at,
                                                          const char *fmt,
                                                          ...) {
  if (p->failed) return;
  p->failed = true;
  char msg[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!at) {
    tn_error_set(p->err, TN_EINVAL, "grammar: %s", msg);
    return;
  }
  int line = 1, col = 1;
  for (const char *c = p->text; c < at && c < p->end; c++) {
    if (*c == '\n')
      line++, col = 1;
    else
      col++;
  }
  tn_error_set(p->err, TN_EINVAL, "grammar: %s at line %d column %d", msg, line,
               col);
}

static void oom(struct parser *p) {
  if (p->failed) return;
  p->failed = true;
  tn_error_set(p->err, TN_ENOMEM, "grammar: out of memory");
}

static uint64_t hash_bytes(const void *data, size_t n, uint64_t h) {
  const unsigned char *c = data;
  for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
  return h;
}

static bool ht_grow(uint32_t **ht, uint32_t *cap, uint32_t n,
                    uint64_t (*key)(struct parser *, uint32_t),
                    struct parser *p) {
  if ((n + 1) * 2 <= *cap) return true;
  uint32_t nc = *cap ? *cap * 2 : 64;
  uint32_t *t = calloc(nc, sizeof *t);
  if (!t) return false;
  for (uint32_t i = 0; i < *cap; i++) {
    uint32_t v = (*ht)[i];
    if (!v) continue;
    uint32_t j = (uint32_t)key(p, v - 1) & (nc - 1);
    while (t[j]) j = (j + 1) & (nc - 1);
    t[j] = v;
  }
  free(*ht);
  *ht = t;
  *cap = nc;
  return true;
}

static uint64_t rule_key(struct parser *p, uint32_t id) {
  const char *n = p->rules[id].name;
  return hash_bytes(n, strlen(n), 0xcbf29ce484222325ull);
}

static uint64_t set_key(struct parser *p, uint32_t id) {
  return hash_bytes(p->sets[id], 32, 0xcbf29ce484222325ull);
}

/* The id of rule `name` (n bytes), created undefined if new. */
static uint32_t rule_id(struct parser *p, const char *name, size_t n) {
  uint64_t h = hash_bytes(name, n, 0xcbf29ce484222325ull);
  if (p->ht_cap) {
    for (uint32_t j = (uint32_t)h & (p->ht_cap - 1); p->ht[j];
         j = (j + 1) & (p->ht_cap - 1)) {
      const char *rn = p->rules[p->ht[j] - 1].name;
      if (strlen(rn) == n && memcmp(rn, name, n) == 0) return p->ht[j] - 1;
    }
  }
  if (p->n_rules >= (1u << 24)) {
    fail_at(p, NULL, "too many rules");
    return 0;
  }
  if (!ht_grow(&p->ht, &p->ht_cap, p->n_rules, rule_key, p)) {
    oom(p);
    return 0;
  }
  if (p->n_rules == p->cap_rules) {
    uint32_t nc = p->cap_rules ? p->cap_rules * 2 : 32;
    struct rule *r = realloc(p->rules, nc * sizeof *r);
    if (!r) {
      oom(p);
      return 0;
    }
    p->rules = r;
    p->cap_rules = nc;
  }
  struct rule *r = &p->rules[p->n_rules];
  memset(r, 0, sizeof *r);
  r->name = malloc(n + 1);
  if (!r->name) {
    oom(p);
    return 0;
  }
  memcpy(r->name, name, n);
  r->name[n] = 0;
  uint32_t j = (uint32_t)h & (p->ht_cap - 1);
  while (p->ht[j]) j = (j + 1) & (p->ht_cap - 1);
  p->ht[j] = p->n_rules + 1;
  return p->n_rules++;
}

static uint32_t helper_rule(struct parser *p, const char *base) {
  char name[96];
  int n = snprintf(name, sizeof name, "%.60s~%u", base ? base : "g",
                   p->n_helpers++);
  uint32_t id = rule_id(p, name, (size_t)n);
  if (!p->failed) p->rules[id].defined = true;
  return id;
}

static uint32_t set_id(struct parser *p, const uint64_t set[4]) {
  uint64_t h = hash_bytes(set, 32, 0xcbf29ce484222325ull);
  if (p->set_ht_cap) {
    for (uint32_t j = (uint32_t)h & (p->set_ht_cap - 1); p->set_ht[j];
         j = (j + 1) & (p->set_ht_cap - 1))
      if (memcmp(p->sets[p->set_ht[j] - 1], set, 32) == 0)
        return p->set_ht[j] - 1;
  }
  if (!ht_grow(&p->set_ht, &p->set_ht_cap, p->n_sets, set_key, p)) {
    oom(p);
    return 0;
  }
  if (p->n_sets == p->cap_sets) {
    uint32_t nc = p->cap_sets ? p->cap_sets * 2 : 32;
    uint64_t(*s)[4] = realloc(p->sets, nc * sizeof *s);
    if (!s) {
      oom(p);
      return 0;
    }
    p->sets = s;
    p->cap_sets = nc;
  }
  memcpy(p->sets[p->n_sets], set, 32);
  uint32_t j = (uint32_t)h & (p->set_ht_cap - 1);
  while (p->set_ht[j]) j = (j + 1) & (p->set_ht_cap - 1);
  p->set_ht[j] = p->n_sets + 1;
  return p->n_sets++;
}

static void alt_push(struct parser *p, struct alt *a, uint32_t el) {
  if (p->failed) return;
  if (++p->n_elems > TN_GRAMMAR_MAX_CODE) {
    fail_at(p, NULL,
            "grammar too large (over %u elements after expanding "
            "repetitions)",
            TN_GRAMMAR_MAX_CODE);
    return;
  }
  if (a->n == a->cap) {
    uint32_t nc = a->cap ? a->cap * 2 : 8;
    uint32_t *e = realloc(a->el, nc * sizeof *e);
    if (!e) {
      oom(p);
      return;
    }
    a->el = e;
    a->cap = nc;
  }
  a->el[a->n++] = el;
}

static void alt_append(struct parser *p, struct alt *a, const struct alt *b) {
  for (uint32_t i = 0; i < b->n && !p->failed; i++) alt_push(p, a, b->el[i]);
}

/* Adds an alternative (a copy of a) to rule r. */
static void rule_add_alt(struct parser *p, uint32_t r, const struct alt *a) {
  if (p->failed) return;
  struct rule *ru = &p->rules[r];
  if (ru->n_alts == ru->cap_alts) {
    uint32_t nc = ru->cap_alts ? ru->cap_alts * 2 : 4;
    struct alt *na = realloc(ru->alts, nc * sizeof *na);
    if (!na) {
      oom(p);
      return;
    }
    ru->alts = na;
    ru->cap_alts = nc;
  }
  struct alt *dst = &ru->alts[ru->n_alts++];
  memset(dst, 0, sizeof *dst);
  alt_append(p, dst, a);
}

/* ---- lexing */

static void skip_space(struct parser *p) {
  while (p->s < p->end) {
    char c = *p->s;
    if (c == '#') {
      while (p->s < p->end && *p->s != '\n') p->s++;
    } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      p->s++;
    } else {
      break;
    }
  }
}

static bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
}

static size_t name_len(const struct parser *p, const char *s) {
  size_t n = 0;
  while (s + n < p->end && is_name_char(s[n]) && !(s[n] == '.' && n == 0)) n++;
  return n;
}

/* At `name ::=`? */
static bool at_rule_start(const struct parser *p) {
  size_t n = name_len(p, p->s);
  if (n == 0) return false;
  const char *c = p->s + n;
  while (c < p->end && (*c == ' ' || *c == '\t' || *c == '\n' || *c == '\r'))
    c++;
  return p->end - c >= 3 && memcmp(c, "::=", 3) == 0;
}

/* One character of a literal or class at p->s: a code point, or with
 * *is_byte a raw byte (\xHH). Returns false at a malformed one. */
static bool read_char(struct parser *p, uint32_t *cp, bool *is_byte) {
  *is_byte = false;
  const char *at = p->s;
  if (p->s >= p->end) {
    fail_at(p, at, "unexpected end of grammar");
    return false;
  }
  if (*p->s != '\\') {
    size_t n = utf8_decode(p->s, (size_t)(p->end - p->s), cp);
    if (n == 0) {
      fail_at(p, at, "invalid UTF-8");
      return false;
    }
    p->s += n;
    return true;
  }
  if (p->end - p->s < 2) {
    fail_at(p, at, "unfinished escape");
    return false;
  }
  char c = p->s[1];
  p->s += 2;
  int digits = 0;
  if (simple_escape(c, cp)) return true;
  switch (c) {
    case '\\':
    case '"':
    case '\'':
    case ']':
    case '[':
    case '-':
    case '^':
    case '/':
      *cp = (uint32_t)c;
      return true;
    case 'x':
      digits = 2;
      *is_byte = true;
      break;
    case 'u':
      digits = 4;
      break;
    case 'U':
      digits = 8;
      break;
    default:
      fail_at(p, at, "unknown escape '\\%c'", c);
      return false;
  }
  uint32_t v = 0;
  for (int i = 0; i < digits; i++) {
    int h = p->s < p->end ? hex_digit(*p->s) : -1;
    if (h < 0) {
      fail_at(p, at, "escape needs %d hex digits", digits);
      return false;
    }
    v = v * 16 + (uint32_t)h;
    p->s++;
  }
  if (!*is_byte && (v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))) {
    fail_at(p, at, "escape \\%c%X is not a Unicode scalar value", c, v);
    return false;
  }
  *cp = v;
  return true;
}

/* ---- code point ranges to UTF-8 byte sequences */

struct range {
  uint32_t lo, hi;
};

static int enc_len(uint32_t c) {
  return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
}

static void enc(uint32_t c, unsigned char *o) {
  switch (enc_len(c)) {
    case 1:
      o[0] = (unsigned char)c;
      break;
    case 2:
      o[0] = (unsigned char)(0xc0 | (c >> 6));
      o[1] = (unsigned char)(0x80 | (c & 0x3f));
      break;
    case 3:
      o[0] = (unsigned char)(0xe0 | (c >> 12));
      o[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3f));
      o[2] = (unsigned char)(0x80 | (c & 0x3f));
      break;
    default:
      o[0] = (unsigned char)(0xf0 | (c >> 18));
      o[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3f));
      o[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3f));
      o[3] = (unsigned char)(0x80 | (c & 0x3f));
  }
}

static void set_range(uint64_t set[4], unsigned lo, unsigned hi) {
  for (unsigned b = lo; b <= hi; b++) set[b >> 6] |= 1ull << (b & 63);
}

/* Appends to rule r the byte sequences of [lo, hi] (same encoded length,
 * no surrogates), splitting where the continuation bytes wrap. */
static void utf8_ranges(struct parser *p, uint32_t r, uint32_t lo, uint32_t hi,
                        uint64_t ascii[4]) {
  if (p->failed || lo > hi) return;
  if (enc_len(lo) != enc_len(hi)) {
    static const uint32_t lim[] = {0x7f, 0x7ff, 0xffff};
    uint32_t m = lim[enc_len(lo) - 1];
    utf8_ranges(p, r, lo, m, ascii);
    utf8_ranges(p, r, m + 1, hi, ascii);
    return;
  }
  if (hi < 0x80) {
    set_range(ascii, lo, hi);
    return;
  }
  for (int i = 1; i < enc_len(lo); i++) {
    uint32_t m = (1u << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        utf8_ranges(p, r, lo, lo | m, ascii);
        utf8_ranges(p, r, (lo | m) + 1, hi, ascii);
        return;
      }
      if ((hi & m) != m) {
        utf8_ranges(p, r, lo, (hi & ~m) - 1, ascii);
        utf8_ranges(p, r, hi & ~m, hi, ascii);
        return;
      }
    }
  }
  unsigned char a[4], b[4];
  enc(lo, a);
  enc(hi, b);
  struct alt seq = {0};
  for (int i = 0; i < enc_len(lo); i++) {
    uint64_t set[4] = {0};
    set_range(set, a[i], b[i]);
    alt_push(p, &seq, EL(EL_SET, set_id(p, set)));
  }
  rule_add_alt(p, r, &seq);
  free(seq.el);
}

static int range_cmp(const void *a, const void *b) {
  const struct range *x = a, *y = b;
  return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Lowers a set of code point ranges (and raw bytes) into out: one set
 * element when everything is a single byte, else a helper rule. */
static void emit_class(struct parser *p, struct range *rs, size_t n,
                       bool negate, const uint64_t raw[4], struct alt *out) {
  qsort(rs, n, sizeof *rs, range_cmp);
  /* merge, then complement if negated */
  size_t m = 0;
  for (size_t i = 0; i < n; i++) {
    if (m && rs[i].lo <= rs[m - 1].hi + 1) {
      if (rs[i].hi > rs[m - 1].hi) rs[m - 1].hi = rs[i].hi;
    } else {
      rs[m++] = rs[i];
    }
  }
  struct range comp[520]; /* at most m + 1 pieces, m <= 512 */
  if (negate) {
    size_t k = 0;
    uint32_t next = 0;
    for (size_t i = 0; i < m; i++) {
      if (rs[i].lo > next) comp[k++] = (struct range){next, rs[i].lo - 1};
      next = rs[i].hi + 1;
    }
    if (next <= 0x10ffff) comp[k++] = (struct range){next, 0x10ffff};
    rs = comp;
    m = k;
  }
  uint64_t ascii[4] = {0};
  if (raw) memcpy(ascii, raw, sizeof ascii);
  uint32_t r = UINT32_MAX;
  for (size_t i = 0; i < m && !p->failed; i++) {
    /* surrogates are not code points */
    struct range parts[2] = {rs[i], {1, 0}};
    if (rs[i].lo <= 0xdfff && rs[i].hi >= 0xd800) {
      parts[0] = (struct range){rs[i].lo, 0xd7ff};
      parts[1] = (struct range){0xe000, rs[i].hi};
      if (rs[i].lo >= 0xd800) parts[0] = (struct range){1, 0};
      if (rs[i].hi <= 0xdfff) parts[1] = (struct range){1, 0};
    }
    for (int j = 0; j < 2; j++) {
      if (parts[j].lo > parts[j].hi) continue;
      if (parts[j].hi >= 0x80 && r == UINT32_MAX) r = helper_rule(p, "class");
      utf8_ranges(p, r, parts[j].lo, parts[j].hi, ascii);
    }
  }
  if (p->failed) return;
  bool any_ascii = ascii[0] | ascii[1] | ascii[2] | ascii[3];
  if (r == UINT32_MAX) {
    if (!any_ascii) {
      fail_at(p, NULL, "a character class matches nothing");
      return;
    }
    alt_push(p, out, EL(EL_SET, set_id(p, ascii)));
    return;
  }
  if (any_ascii) {
    struct alt one = {0};
    alt_push(p, &one, EL(EL_SET, set_id(p, ascii)));
    rule_add_alt(p, r, &one);
    free(one.el);
  }
  alt_push(p, out, EL(EL_RULE, r));
}

/* [ ... ] at p->s (after the '['). */
static void parse_class(struct parser *p, struct alt *out) {
  const char *at = p->s - 1;
  bool negate = false;
  if (p->s < p->end && *p->s == '^') {
    negate = true;
    p->s++;
  }
  struct range rs[512];
  size_t n = 0;
  uint64_t raw[4] = {0};
  bool any_raw = false;
  while (!p->failed) {
    if (p->s >= p->end) {
      fail_at(p, at, "unterminated character class");
      return;
    }
    if (*p->s == ']') {
      p->s++;
      break;
    }
    uint32_t lo, hi;
    bool lo_byte, hi_byte;
    if (!read_char(p, &lo, &lo_byte)) return;
    hi = lo;
    hi_byte = lo_byte;
    if (p->end - p->s >= 2 && p->s[0] == '-' && p->s[1] != ']') {
      p->s++;
      if (!read_char(p, &hi, &hi_byte)) return;
      if (hi < lo) {
        fail_at(p, at, "range out of order in character class");
        return;
      }
    }
    if ((lo_byte && lo >= 0x80) || (hi_byte && hi >= 0x80)) {
      /* \x80-\xFF are bytes: only in a plain class of bytes */
      if (negate || lo_byte != hi_byte) {
        fail_at(p, at,
                "raw bytes (\\x80-\\xFF) in a negated or mixed "
                "class; use \\u escapes for code points");
        return;
      }
      set_range(raw, lo, hi);
      any_raw = true;
      continue;
    }
    if (n == sizeof rs / sizeof rs[0]) {
      fail_at(p, at, "character class with over 512 ranges");
      return;
    }
    rs[n++] = (struct range){lo, hi};
  }
  if (negate && n == 0) {
    fail_at(p, at, "empty negated class");
    return;
  }
  emit_class(p, rs, n, negate, any_raw ? raw : NULL, out);
}

static void parse_literal(struct parser *p, struct alt *out, char quote) {
  const char *at = p->s - 1;
  while (!p->failed) {
    if (p->s >= p->end) {
      fail_at(p, at, "unterminated string literal");
      return;
    }
    if (*p->s == quote) {
      p->s++;
      return;
    }
    uint32_t cp;
    bool is_byte;
    if (!read_char(p, &cp, &is_byte)) return;
    unsigned char b[4];
    int n = 1;
    if (is_byte)
      b[0] = (unsigned char)cp;
    else
      n = enc_len(cp), enc(cp, b);
    for (int i = 0; i < n; i++) {
      uint64_t set[4] = {0};
      set_range(set, b[i], b[i]);
      alt_push(p, out, EL(EL_SET, set_id(p, set)));
    }
  }
}

static void parse_alternatives(struct parser *p, uint32_t r);

/* Wraps a fragment as one element: itself when it is one element. */
static uint32_t as_unit(struct parser *p, const struct alt *frag) {
  if (frag->n == 1) return frag->el[0];
  uint32_t h = helper_rule(p, "seq");
  rule_add_alt(p, h, frag);
  return EL(EL_RULE, h);
}

/* frag{min,max} (max UINT32_MAX: unbounded) appended to out. */
static void repeat(struct parser *p, const struct alt *frag, uint32_t min,
                   uint32_t max, struct alt *out) {
  if (p->failed) return;
  if (frag->n == 0) return; /* repeating nothing is nothing */
  uint32_t u = as_unit(p, frag);
  struct alt one = {0};
  alt_push(p, &one, u);
  for (uint32_t i = 0; i < min && !p->failed; i++) alt_push(p, out, u);
  struct alt empty = {0};
  if (max == UINT32_MAX) {
    uint32_t h = helper_rule(p, "star");
    struct alt loop = {0};
    alt_push(p, &loop, u);
    alt_push(p, &loop, EL(EL_RULE, h));
    rule_add_alt(p, h, &loop);
    rule_add_alt(p, h, &empty);
    free(loop.el);
    alt_push(p, out, EL(EL_RULE, h));
  } else if (max > min) {
    /* nested optionals: x (x (x)?)? ... */
    uint32_t inner = UINT32_MAX;
    for (uint32_t i = 0; i < max - min && !p->failed; i++) {
      uint32_t h = helper_rule(p, "opt");
      struct alt a = {0};
      alt_push(p, &a, u);
      if (inner != UINT32_MAX) alt_push(p, &a, EL(EL_RULE, inner));
      rule_add_alt(p, h, &a);
      rule_add_alt(p, h, &empty);
      free(a.el);
      inner = h;
    }
    alt_push(p, out, EL(EL_RULE, inner));
  }
  free(one.el);
}

static bool read_uint(struct parser *p, uint32_t *v) {
  const char *at = p->s;
  uint64_t x = 0;
  int n = 0;
  while (p->s < p->end && *p->s >= '0' && *p->s <= '9') {
    x = x * 10 + (uint64_t)(*p->s - '0');
    if (x > TN_GRAMMAR_MAX_REPEAT) {
      fail_at(p, at, "repetition bound over %d", TN_GRAMMAR_MAX_REPEAT);
      return false;
    }
    p->s++, n++;
  }
  *v = (uint32_t)x;
  return n > 0;
}

/* One sequence of items into a (stops at '|', ')', the end or the next
 * rule). */
static void parse_sequence(struct parser *p, struct alt *a,
                           const char *rule_name) {
  for (;;) {
    skip_space(p);
    if (p->failed || p->s >= p->end) return;
    char c = *p->s;
    if (c == '|' || c == ')') return;
    if (at_rule_start(p)) return;
    const char *at = p->s;
    struct alt frag = {0};
    if (c == '"' || c == '\'') {
      p->s++;
      parse_literal(p, &frag, c);
    } else if (c == '[') {
      p->s++;
      parse_class(p, &frag);
    } else if (c == '.') {
      p->s++;
      struct range any = {0, 0x10ffff};
      emit_class(p, &any, 1, false, NULL, &frag);
    } else if (c == '(') {
      p->s++;
      if (++p->depth > MAX_NEST) {
        fail_at(p, at, "groups nested over %d deep", MAX_NEST);
        return;
      }
      uint32_t h = helper_rule(p, rule_name);
      parse_alternatives(p, h);
      p->depth--;
      skip_space(p);
      if (!p->failed && (p->s >= p->end || *p->s != ')')) {
        fail_at(p, at, "unclosed '('");
        free(frag.el);
        return;
      }
      p->s++;
      /* a group of one alternative is inlined */
      if (!p->failed && p->rules[h].n_alts == 1)
        alt_append(p, &frag, &p->rules[h].alts[0]);
      else
        alt_push(p, &frag, EL(EL_RULE, h));
    } else if (is_name_char(c) && c != '.') {
      size_t n = name_len(p, p->s);
      uint32_t id = rule_id(p, p->s, n);
      if (!p->failed && !p->rules[id].first_use) p->rules[id].first_use = at;
      p->s += n;
      alt_push(p, &frag, EL(EL_RULE, id));
    } else {
      fail_at(p, at, "unexpected character '%c'", c);
      return;
    }
    /* postfix operators */
    for (;;) {
      if (p->failed || p->s >= p->end) break;
      char o = *p->s;
      uint32_t min, max;
      if (o == '*')
        min = 0, max = UINT32_MAX, p->s++;
      else if (o == '+')
        min = 1, max = UINT32_MAX, p->s++;
      else if (o == '?')
        min = 0, max = 1, p->s++;
      else if (o == '{') {
        const char *bat = p->s;
        p->s++;
        skip_space(p);
        if (!read_uint(p, &min)) {
          fail_at(p, bat, "bad repetition {m,n}");
          break;
        }
        skip_space(p);
        max = min;
        if (p->s < p->end && *p->s == ',') {
          p->s++;
          skip_space(p);
          max = UINT32_MAX;
          if (p->s < p->end && *p->s != '}' && !read_uint(p, &max)) {
            fail_at(p, bat, "bad repetition {m,n}");
            break;
          }
          skip_space(p);
        }
        if (p->s >= p->end || *p->s != '}') {
          fail_at(p, bat, "bad repetition {m,n}");
          break;
        }
        p->s++;
        if (max < min) {
          fail_at(p, bat, "repetition {%u,%u} has max below min", min, max);
          break;
        }
      } else {
        break;
      }
      struct alt rep = {0};
      repeat(p, &frag, min, max, &rep);
      free(frag.el);
      frag = rep;
    }
    alt_append(p, a, &frag);
    free(frag.el);
  }
}

static void parse_alternatives(struct parser *p, uint32_t r) {
  for (;;) {
    struct alt a = {0};
    parse_sequence(p, &a, p->failed ? "g" : p->rules[r].name);
    rule_add_alt(p, r, &a);
    free(a.el);
    if (p->failed) return;
    skip_space(p);
    if (p->s < p->end && *p->s == '|') {
      p->s++;
      continue;
    }
    return;
  }
}

/* ---- checks */

/* nullable[r]: rule r can match the empty string. */
static void compute_nullable(const struct parser *p, bool *nullable) {
  bool changed = true;
  while (changed) {
    changed = false;
    for (uint32_t r = 0; r < p->n_rules; r++) {
      if (nullable[r]) continue;
      for (uint32_t a = 0; a < p->rules[r].n_alts && !nullable[r]; a++) {
        const struct alt *al = &p->rules[r].alts[a];
        bool all = true;
        for (uint32_t i = 0; i < al->n && all; i++)
          all = EL_KIND(al->el[i]) == EL_RULE && nullable[EL_ARG(al->el[i])];
        if (all) nullable[r] = changed = true;
      }
    }
  }
}

/* Finds a rule that can reach itself without consuming input (iterative
 * DFS over "starts with" edges). Returns its id or UINT32_MAX. */
static uint32_t find_left_cycle(const struct parser *p, const bool *nullable) {
  uint32_t n = p->n_rules;
  uint8_t *color = calloc(n, 1);
  uint32_t *stk = malloc((size_t)n * 3 * sizeof *stk + 1);
  uint32_t found = UINT32_MAX;
  if (!color || !stk) {
    free(color);
    free(stk);
    return UINT32_MAX - 1;
  }
  for (uint32_t s = 0; s < n && found == UINT32_MAX; s++) {
    if (color[s]) continue;
    /* frame: rule, alt, elem */
    size_t sp = 0;
    stk[sp++] = s, stk[sp++] = 0, stk[sp++] = 0;
    color[s] = 1;
    while (sp && found == UINT32_MAX) {
      uint32_t r = stk[sp - 3], a = stk[sp - 2], i = stk[sp - 1];
      const struct rule *ru = &p->rules[r];
      if (a >= ru->n_alts) {
        color[r] = 2;
        sp -= 3;
        continue;
      }
      const struct alt *al = &ru->alts[a];
      if (i >= al->n) {
        stk[sp - 2]++, stk[sp - 1] = 0;
        continue;
      }
      uint32_t el = al->el[i];
      if (EL_KIND(el) != EL_RULE) {
        stk[sp - 2]++, stk[sp - 1] = 0; /* a byte ends the prefix */
        continue;
      }
      uint32_t t = EL_ARG(el);
      /* next time: the element after, if this one can be empty */
      if (nullable[t])
        stk[sp - 1]++;
      else
        stk[sp - 2]++, stk[sp - 1] = 0;
      if (color[t] == 1) {
        found = t;
      } else if (color[t] == 0) {
        color[t] = 1;
        stk[sp++] = t, stk[sp++] = 0, stk[sp++] = 0;
      }
    }
  }
  free(color);
  free(stk);
  return found;
}

/* ---- building the grammar */

static void parser_free(struct parser *p) {
  for (uint32_t r = 0; r < p->n_rules; r++) {
    for (uint32_t a = 0; a < p->rules[r].n_alts; a++)
      free(p->rules[r].alts[a].el);
    free(p->rules[r].alts);
    free(p->rules[r].name);
  }
  free(p->rules);
  free(p->ht);
  free(p->sets);
  free(p->set_ht);
}

static enum tn_status build(struct parser *p, struct tn_grammar **out) {
  uint32_t root = UINT32_MAX;
  for (uint32_t r = 0; r < p->n_rules; r++) {
    if (!p->rules[r].defined) {
      fail_at(p, p->rules[r].first_use, "undefined rule '%s'",
              p->rules[r].name);
      return p->err->status;
    }
    if (strcmp(p->rules[r].name, "root") == 0) root = r;
  }
  if (root == UINT32_MAX) {
    fail_at(p, NULL, "no 'root' rule");
    return p->err->status;
  }
  bool *nullable = calloc(p->n_rules + 1, sizeof *nullable);
  if (!nullable) return oom(p), p->err->status;
  compute_nullable(p, nullable);
  uint32_t cyc = find_left_cycle(p, nullable);
  free(nullable);
  if (cyc == UINT32_MAX - 1) return oom(p), p->err->status;
  if (cyc != UINT32_MAX) {
    const char *nm = p->rules[cyc].name;
    const char *tilde = strchr(nm, '~');
    fail_at(p, NULL,
            "rule '%.*s' can recurse without consuming input (left "
            "recursion, or a repetition of something that can be empty)",
            tilde ? (int)(tilde - nm) : (int)strlen(nm), nm);
    return p->err->status;
  }
  struct tn_grammar *g = calloc(1, sizeof *g);
  if (!g) return oom(p), p->err->status;
  atomic_init(&g->refs, 1);
  uint32_t n_alts = 0;
  size_t n_code = 0;
  for (uint32_t r = 0; r < p->n_rules; r++) {
    n_alts += p->rules[r].n_alts;
    for (uint32_t a = 0; a < p->rules[r].n_alts; a++)
      n_code += p->rules[r].alts[a].n + 1;
  }
  g->code = malloc(n_code * sizeof *g->code + 4);
  g->alt_start = malloc((size_t)n_alts * sizeof *g->alt_start + 4);
  g->rule_alt = malloc(((size_t)p->n_rules + 1) * sizeof *g->rule_alt);
  g->sets = malloc((size_t)p->n_sets * sizeof *g->sets + 32);
  if (!g->code || !g->alt_start || !g->rule_alt || !g->sets) {
    tn_grammar_release(g);
    return oom(p), p->err->status;
  }
  uint32_t c = 0, ai = 0;
  for (uint32_t r = 0; r < p->n_rules; r++) {
    g->rule_alt[r] = ai;
    for (uint32_t a = 0; a < p->rules[r].n_alts; a++) {
      const struct alt *al = &p->rules[r].alts[a];
      g->alt_start[ai++] = c;
      if (al->n) memcpy(g->code + c, al->el, al->n * sizeof *al->el);
      c += al->n;
      g->code[c++] = EL(EL_END, 0);
    }
  }
  g->rule_alt[p->n_rules] = ai;
  g->n_code = c;
  g->n_rules = p->n_rules;
  if (p->n_sets) memcpy(g->sets, p->sets, (size_t)p->n_sets * sizeof *g->sets);
  g->n_sets = p->n_sets;
  g->root = root;
  uint64_t h0 = 0xcbf29ce484222325ull, h1 = 0x84222325cbf29ce4ull;
  h0 = hash_bytes(g->code, c * sizeof *g->code, h0);
  h0 = hash_bytes(g->rule_alt, (p->n_rules + 1) * sizeof *g->rule_alt, h0);
  h0 = hash_bytes(g->sets, g->n_sets * sizeof *g->sets, h0);
  h0 = hash_bytes(&root, sizeof root, h0);
  h1 = hash_bytes(&h0, sizeof h0, h1);
  h1 = hash_bytes(g->code, c * sizeof *g->code, h1);
  h1 = hash_bytes(g->sets, g->n_sets * sizeof *g->sets, h1);
  h1 = hash_bytes(g->alt_start, n_alts * sizeof *g->alt_start, h1);
  g->fp[0] = h0;
  g->fp[1] = h1;
  *out = g;
  return TN_OK;
}

enum tn_status tn_grammar_from_gbnf(const char *text, size_t len,
                                    struct tn_grammar **out,
                                    struct tn_error *err) {
  *out = NULL;
  struct tn_error local;
  if (!err) err = &local;
  struct parser p = {.text = text, .s = text, .end = text + len, .err = err};
  for (;;) {
    skip_space(&p);
    if (p.failed || p.s >= p.end) break;
    const char *at = p.s;
    size_t n = name_len(&p, p.s);
    if (n == 0 || !at_rule_start(&p)) {
      fail_at(&p, at, "expected a rule 'name ::= ...'");
      break;
    }
    uint32_t r = rule_id(&p, p.s, n);
    if (p.failed) break;
    if (p.rules[r].defined) {
      fail_at(&p, at, "rule '%s' defined twice", p.rules[r].name);
      break;
    }
    p.rules[r].defined = true;
    p.s += n;
    skip_space(&p);
    p.s += 3; /* ::= */
    parse_alternatives(&p, r);
    skip_space(&p);
    if (!p.failed && p.s < p.end && *p.s == ')')
      fail_at(&p, p.s, "unmatched ')'");
  }
  enum tn_status st = p.failed ? err->status : build(&p, out);
  parser_free(&p);
  return st;
}

void tn_grammar_retain(struct tn_grammar *g) {
  atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
}

void tn_grammar_release(struct tn_grammar *g) {
  if (!g) return;
  if (atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) != 1) return;
  free(g->code);
  free(g->alt_start);
  free(g->rule_alt);
  free(g->sets);
  free(g);
}
