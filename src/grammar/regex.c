/*
 * regex.c: regular expressions to GBNF.
 *
 * The syntax is the ECMAScript subset that JSON schemas and structured
 * output APIs use: alternation, groups ((...), (?:...), (?<name>...)),
 * quantifiers * + ? {m} {m,} {m,n} (lazy and possessive forms match the
 * same strings), `.`, classes with ranges and negation, the escapes \d \w
 * \s \D \W \S \n \r \t \f \v \0 \xHH \uHHHH \u{H...} and escaped
 * punctuation. A leading ^ and a trailing $ are accepted. What a
 * context-free grammar cannot express or we do not support is refused by
 * name: backreferences, lookaround, word boundaries, anchors elsewhere.
 *
 * The translation is direct: a regex is already a grammar. Classes are
 * written as explicit code point ranges (negation computed here). In
 * JSON mode (a schema's "pattern") the regex constrains the string's
 * value while the grammar produces its JSON text: characters that JSON
 * must escape (", \ and controls) are written in their escaped form, and
 * an unanchored end gets any string characters, since a schema pattern
 * only has to match somewhere in the value.
 */
#include "grammar/grammar_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct range {
  uint32_t lo, hi;
};

struct rx {
  const char *s, *end, *start;
  bool json;
  bool failed;
  int depth;
  struct tn_error *err;
};

__attribute__((format(printf, 3, 4))) static void rfail(struct rx *r,
                                                        const char *at,
                                                        const char *fmt, ...) {
  if (r->failed) return;
  r->failed = true;
  char msg[300];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  tn_error_set(r->err, TN_EINVAL, "regex: %s at offset %d", msg,
               (int)(at - r->start));
}

/* ---- classes as range lists */

#define MAX_RANGES 256
struct cls {
  struct range r[MAX_RANGES];
  int n;
  bool overflow;
};

static void cls_add(struct cls *c, uint32_t lo, uint32_t hi) {
  if (c->n == MAX_RANGES) {
    c->overflow = true;
    return;
  }
  c->r[c->n++] = (struct range){lo, hi};
}

static int rcmp(const void *a, const void *b) {
  const struct range *x = a, *y = b;
  return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void cls_norm(struct cls *c) {
  qsort(c->r, (size_t)c->n, sizeof *c->r, rcmp);
  int m = 0;
  for (int i = 0; i < c->n; i++) {
    if (m && c->r[i].lo <= c->r[m - 1].hi + 1) {
      if (c->r[i].hi > c->r[m - 1].hi) c->r[m - 1].hi = c->r[i].hi;
    } else {
      c->r[m++] = c->r[i];
    }
  }
  c->n = m;
}

static void cls_negate(struct cls *c) {
  cls_norm(c);
  struct cls o = {.n = 0};
  uint32_t next = 0;
  for (int i = 0; i < c->n; i++) {
    if (c->r[i].lo > next) cls_add(&o, next, c->r[i].lo - 1);
    next = c->r[i].hi + 1;
  }
  if (next <= 0x10ffff) cls_add(&o, next, 0x10ffff);
  *c = o;
}

static void cls_perl(struct cls *c, char k) {
  switch (k) {
    case 'd':
    case 'D':
      cls_add(c, '0', '9');
      break;
    case 'w':
    case 'W':
      cls_add(c, '0', '9'), cls_add(c, 'A', 'Z'), cls_add(c, 'a', 'z');
      cls_add(c, '_', '_');
      break;
    default: /* s */
      cls_add(c, '\t', '\r'), cls_add(c, ' ', ' ');
      cls_add(c, 0xa0, 0xa0), cls_add(c, 0x2028, 0x2029);
      cls_add(c, 0xfeff, 0xfeff);
  }
}

/* A code point inside a GBNF class: printable ASCII as itself, the
 * class's own punctuation as \xHH, the rest as raw UTF-8 (which every
 * GBNF reader takes, where \u escapes differ). */
static void put_cp(struct tn_buf *b, uint32_t cp) {
  if (cp >= 0x20 && cp < 0x7f && !strchr("\\]^-[\"", (int)cp)) {
    tn_buf_printf(b, "%c", (char)cp);
  } else if (cp < 0x80) {
    tn_buf_printf(b, "\\x%02X", cp);
  } else {
    char u[4];
    int n = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    if (n == 2) {
      u[0] = (char)(0xc0 | (cp >> 6));
    } else if (n == 3) {
      u[0] = (char)(0xe0 | (cp >> 12));
      u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    } else {
      u[0] = (char)(0xf0 | (cp >> 18));
      u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
      u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    }
    u[n - 1] = (char)(0x80 | (cp & 0x3f));
    tn_buf_append(b, u, (size_t)n);
  }
}

/* The JSON escape of a character that must be escaped (", \, controls). */
static void json_escape(struct tn_buf *b, uint32_t c) {
  char e[8];
  switch (c) {
    case '"':
      snprintf(e, sizeof e, "\\\"");
      break;
    case '\\':
      snprintf(e, sizeof e, "\\\\");
      break;
    case '\b':
      snprintf(e, sizeof e, "\\b");
      break;
    case '\f':
      snprintf(e, sizeof e, "\\f");
      break;
    case '\n':
      snprintf(e, sizeof e, "\\n");
      break;
    case '\r':
      snprintf(e, sizeof e, "\\r");
      break;
    case '\t':
      snprintf(e, sizeof e, "\\t");
      break;
    default:
      snprintf(e, sizeof e, "\\u%04x", c);
  }
  gbnf_literal(b, e, strlen(e));
}

static bool json_special(uint32_t c) {
  return c < 0x20 || c == '"' || c == '\\';
}

/* Writes a class as a GBNF expression. */
static void emit_cls(struct rx *r, struct cls *c, struct tn_buf *b) {
  cls_norm(c);
  if (c->overflow) {
    rfail(r, r->s, "character class with over %d ranges", MAX_RANGES);
    return;
  }
  /* split off what JSON escapes */
  struct cls plain = {.n = 0};
  uint32_t specials[40];
  int n_spec = 0;
  for (int i = 0; i < c->n; i++) {
    uint32_t lo = c->r[i].lo, hi = c->r[i].hi;
    if (!r->json) {
      cls_add(&plain, lo, hi);
      continue;
    }
    uint32_t x = lo;
    while (x <= hi) {
      if (json_special(x)) {
        if (n_spec < 40) specials[n_spec++] = x;
        x++;
        continue;
      }
      uint32_t y = x;
      while (y < hi && !json_special(y + 1)) y++;
      cls_add(&plain, x, y);
      x = y + 1;
    }
  }
  int alts = (plain.n > 0) + n_spec;
  if (alts == 0) {
    rfail(r, r->s, "a character class that matches nothing");
    return;
  }
  if (alts > 1) tn_buf_append(b, "( ", 2);
  int k = 0;
  if (plain.n) {
    tn_buf_append(b, "[", 1);
    for (int i = 0; i < plain.n; i++) {
      /* surrogates are not characters: keep endpoints out of them */
      uint32_t lo = plain.r[i].lo, hi = plain.r[i].hi;
      if (lo >= 0xd800 && lo <= 0xdfff) lo = 0xe000;
      if (hi >= 0xd800 && hi <= 0xdfff) hi = 0xd7ff;
      if (lo > hi) continue;
      put_cp(b, lo);
      if (hi != lo) {
        tn_buf_append(b, "-", 1);
        put_cp(b, hi);
      }
    }
    tn_buf_append(b, "]", 1);
    k++;
  }
  for (int i = 0; i < n_spec; i++) {
    if (k++) tn_buf_append(b, " | ", 3);
    json_escape(b, specials[i]);
  }
  if (alts > 1) tn_buf_append(b, " )", 2);
}

static void emit_char(struct rx *r, uint32_t cp, struct tn_buf *b) {
  if (r->json && json_special(cp)) {
    json_escape(b, cp);
    return;
  }
  char u[4];
  int n;
  if (cp < 0x80)
    u[0] = (char)cp, n = 1;
  else if (cp < 0x800)
    u[0] = (char)(0xc0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3f)), n = 2;
  else if (cp < 0x10000)
    u[0] = (char)(0xe0 | (cp >> 12)), u[1] = (char)(0x80 | ((cp >> 6) & 0x3f)),
    u[2] = (char)(0x80 | (cp & 0x3f)), n = 3;
  else
    u[0] = (char)(0xf0 | (cp >> 18)), u[1] = (char)(0x80 | ((cp >> 12) & 0x3f)),
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), u[3] = (char)(0x80 | (cp & 0x3f)),
    n = 4;
  gbnf_literal(b, u, (size_t)n);
}

/* An escape after '\' (r->s at the letter). in_class: inside [...].
 * Either sets *cp, or fills cls (for \d and friends) and sets *is_cls. */
static bool read_escape(struct rx *r, bool in_class, uint32_t *cp,
                        struct cls *cls, bool *is_cls) {
  const char *at = r->s - 1;
  *is_cls = false;
  if (r->s >= r->end) {
    rfail(r, at, "trailing backslash");
    return false;
  }
  char c = *r->s++;
  if (simple_escape(c, cp)) return true;
  switch (c) {
    case 'd':
    case 'w':
    case 's':
      cls_perl(cls, c);
      *is_cls = true;
      return true;
    case 'D':
    case 'W':
    case 'S':
      cls_perl(cls, c);
      cls_negate(cls);
      *is_cls = true;
      return true;
    case 'b':
      if (in_class) {
        *cp = '\b';
        return true;
      }
      rfail(r, at, "word boundaries (\\b) are not supported");
      return false;
    case 'B':
      rfail(r, at, "\\B is not supported");
      return false;
    case 'x':
    case 'u': {
      uint32_t v = 0;
      int digits = c == 'x' ? 2 : 4;
      if (c == 'u' && r->s < r->end && *r->s == '{') {
        r->s++;
        int n = 0;
        while (r->s < r->end && hex_digit(*r->s) >= 0 && n < 8)
          v = v * 16 + (uint32_t)hex_digit(*r->s++), n++;
        if (n == 0 || r->s >= r->end || *r->s != '}') {
          rfail(r, at, "bad \\u{...} escape");
          return false;
        }
        r->s++;
      } else {
        for (int i = 0; i < digits; i++) {
          if (r->s >= r->end || hex_digit(*r->s) < 0) {
            rfail(r, at, "\\%c needs %d hex digits", c, digits);
            return false;
          }
          v = v * 16 + (uint32_t)hex_digit(*r->s++);
        }
      }
      if (v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) {
        rfail(r, at, "escape is not a Unicode scalar value");
        return false;
      }
      *cp = v;
      return true;
    }
    default:
      if (c >= '1' && c <= '9') {
        rfail(r, at, "backreferences are not supported");
        return false;
      }
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
        rfail(r, at, "unknown escape \\%c", c);
        return false;
      }
      {
        uint32_t v;
        size_t n = utf8_decode(r->s - 1, (size_t)(r->end - r->s + 1), &v);
        if (!n) {
          rfail(r, at, "invalid UTF-8");
          return false;
        }
        r->s += n - 1;
        *cp = v;
      }
      return true;
  }
}

static bool read_cp(struct rx *r, uint32_t *cp) {
  size_t n = utf8_decode(r->s, (size_t)(r->end - r->s), cp);
  if (!n) {
    rfail(r, r->s, "invalid UTF-8");
    return false;
  }
  r->s += n;
  return true;
}

static void parse_class(struct rx *r, struct tn_buf *b) {
  const char *at = r->s - 1;
  struct cls c = {.n = 0};
  bool neg = false;
  if (r->s < r->end && *r->s == '^') neg = true, r->s++;
  bool first = true;
  for (;;) {
    if (r->s >= r->end) {
      rfail(r, at, "unterminated character class");
      return;
    }
    if (*r->s == ']' && !first) {
      r->s++;
      break;
    }
    first = false;
    uint32_t lo, hi;
    bool is_cls = false;
    if (*r->s == '\\') {
      r->s++;
      if (!read_escape(r, true, &lo, &c, &is_cls)) return;
      if (is_cls) continue;
    } else if (*r->s == '[' && r->end - r->s > 1 && r->s[1] == ':') {
      rfail(r, r->s, "POSIX classes [:name:] are not supported");
      return;
    } else if (!read_cp(r, &lo)) {
      return;
    }
    hi = lo;
    if (r->end - r->s >= 2 && r->s[0] == '-' && r->s[1] != ']') {
      r->s++;
      if (*r->s == '\\') {
        r->s++;
        struct cls tmp = {.n = 0};
        if (!read_escape(r, true, &hi, &tmp, &is_cls)) return;
        if (is_cls) {
          rfail(r, at, "a class escape cannot end a range");
          return;
        }
      } else if (!read_cp(r, &hi)) {
        return;
      }
      if (hi < lo) {
        rfail(r, at, "range out of order");
        return;
      }
    }
    cls_add(&c, lo, hi);
  }
  if (neg) cls_negate(&c);
  emit_cls(r, &c, b);
}

static void parse_alt(struct rx *r, struct tn_buf *b);

static bool read_num(struct rx *r, uint32_t *v) {
  uint64_t x = 0;
  int n = 0;
  while (r->s < r->end && *r->s >= '0' && *r->s <= '9') {
    x = x * 10 + (uint64_t)(*r->s++ - '0');
    if (x > TN_GRAMMAR_MAX_REPEAT) return false;
    n++;
  }
  *v = (uint32_t)x;
  return n > 0;
}

/* A quantifier at r->s, if any, appended to b. */
static void parse_quant(struct rx *r, struct tn_buf *b) {
  for (int count = 0; r->s < r->end && !r->failed; count++) {
    char c = *r->s;
    const char *at = r->s;
    if (c == '*' || c == '+' || c == '?') {
      if (count) {
        rfail(r, at, "nothing to repeat");
        return;
      }
      r->s++;
      tn_buf_printf(b, "%c", c);
    } else if (c == '{') {
      const char *save = r->s;
      r->s++;
      uint32_t lo, hi;
      if (!read_num(r, &lo)) {
        /* a literal '{' in ECMAScript's annex B; we refuse it */
        r->s = save;
        rfail(r, at, "bad or too large repetition {m,n} (max %d)",
              TN_GRAMMAR_MAX_REPEAT);
        return;
      }
      hi = lo;
      bool open = false;
      if (r->s < r->end && *r->s == ',') {
        r->s++;
        if (r->s < r->end && *r->s == '}')
          open = true;
        else if (!read_num(r, &hi)) {
          rfail(r, at, "bad or too large repetition {m,n}");
          return;
        }
      }
      if (r->s >= r->end || *r->s != '}') {
        rfail(r, at, "bad repetition {m,n}");
        return;
      }
      r->s++;
      if (count) {
        rfail(r, at, "nothing to repeat");
        return;
      }
      if (!open && hi < lo) {
        rfail(r, at, "repetition {%u,%u} out of order", lo, hi);
        return;
      }
      if (open)
        tn_buf_printf(b, "{%u,}", lo);
      else
        tn_buf_printf(b, "{%u,%u}", lo, hi);
    } else {
      return;
    }
    /* lazy / possessive: same language */
    if (r->s < r->end && (*r->s == '?' || *r->s == '+')) r->s++;
  }
}

static void any_char(struct rx *r, struct tn_buf *b) {
  struct cls c = {.n = 0};
  cls_add(&c, '\n', '\n');
  cls_add(&c, '\r', '\r');
  cls_add(&c, 0x2028, 0x2029);
  cls_negate(&c);
  emit_cls(r, &c, b);
}

static void parse_seq(struct rx *r, struct tn_buf *b) {
  bool empty = true;
  while (r->s < r->end && !r->failed) {
    char c = *r->s;
    const char *at = r->s;
    if (c == '|' || c == ')') break;
    struct tn_buf atom = {0};
    if (c == '(') {
      r->s++;
      if (++r->depth > 100) {
        rfail(r, at, "groups nested over 100 deep");
        tn_buf_free(&atom);
        return;
      }
      if (r->s < r->end && *r->s == '?') {
        r->s++;
        if (r->s < r->end && *r->s == ':') {
          r->s++;
        } else if (r->s < r->end && (*r->s == '<' || *r->s == 'P') &&
                   r->s + 1 < r->end && r->s[1] != '=' && r->s[1] != '!') {
          /* named group */
          if (*r->s == 'P') r->s++;
          while (r->s < r->end && *r->s != '>') r->s++;
          if (r->s >= r->end) {
            rfail(r, at, "unterminated group name");
            tn_buf_free(&atom);
            return;
          }
          r->s++;
        } else {
          rfail(r, at, "lookaround and inline flags are not supported");
          tn_buf_free(&atom);
          return;
        }
      }
      tn_buf_append(&atom, "( ", 2);
      parse_alt(r, &atom);
      tn_buf_append(&atom, " )", 2);
      r->depth--;
      if (!r->failed && (r->s >= r->end || *r->s != ')')) {
        rfail(r, at, "unclosed '('");
        tn_buf_free(&atom);
        return;
      }
      r->s++;
    } else if (c == '[') {
      r->s++;
      parse_class(r, &atom);
    } else if (c == '.') {
      r->s++;
      any_char(r, &atom);
    } else if (c == '\\') {
      r->s++;
      uint32_t cp;
      struct cls cl = {.n = 0};
      bool is_cls;
      if (read_escape(r, false, &cp, &cl, &is_cls)) {
        if (is_cls)
          emit_cls(r, &cl, &atom);
        else
          emit_char(r, cp, &atom);
      }
    } else if (c == '^' || c == '$') {
      rfail(r, at, "anchors are only supported at the very start and end");
    } else if (c == '*' || c == '+' || c == '?') {
      rfail(r, at, "nothing to repeat");
    } else {
      uint32_t cp;
      if (read_cp(r, &cp)) emit_char(r, cp, &atom);
    }
    if (!r->failed) {
      parse_quant(r, &atom);
      if (!empty) tn_buf_append(b, " ", 1);
      tn_buf_append(b, atom.data ? atom.data : "", atom.len);
      empty = false;
    }
    tn_buf_free(&atom);
  }
  if (empty) tn_buf_append(b, "\"\"", 2);
}

static void parse_alt(struct rx *r, struct tn_buf *b) {
  parse_seq(r, b);
  while (!r->failed && r->s < r->end && *r->s == '|') {
    r->s++;
    tn_buf_append(b, " | ", 3);
    parse_seq(r, b);
  }
}

/* Rules `<prefix>-root ::= ...` (plus helpers) for the regex. */
enum tn_status tn_regex_gbnf(const char *re, size_t len, const char *prefix,
                             bool json, struct tn_buf *out,
                             struct tn_error *err) {
  struct rx r = {
      .s = re, .end = re + len, .start = re, .json = json, .err = err};
  bool anchored_start = false, anchored_end = false;
  if (r.s < r.end && *r.s == '^') r.s++, anchored_start = true;
  if (r.end > r.s && r.end[-1] == '$' &&
      !(r.end - r.s >= 2 && r.end[-2] == '\\'))
    r.end--, anchored_end = true;
  struct tn_buf body = {0};
  parse_alt(&r, &body);
  if (!r.failed && r.s < r.end) rfail(&r, r.s, "unmatched ')'");
  if (r.failed) {
    tn_buf_free(&body);
    return err->status;
  }
  struct tn_buf any = {0};
  if (json && (!anchored_start || !anchored_end)) {
    /* any JSON string character */
    struct cls c = {.n = 0};
    cls_add(&c, 0, 0x10ffff);
    emit_cls(&r, &c, &any);
  }
  tn_buf_printf(out, "%s-root ::= ", prefix);
  if (json && !anchored_start) tn_buf_printf(out, "%s* ", any.data);
  tn_buf_printf(out, "( %s )", body.data ? body.data : "\"\"");
  if (json && !anchored_end) tn_buf_printf(out, " %s*", any.data);
  tn_buf_append(out, "\n", 1);
  tn_buf_free(&any);
  tn_buf_free(&body);
  if (out->oom) return tn_error_set(err, TN_ENOMEM, "regex: out of memory");
  return TN_OK;
}

enum tn_status tn_regex_to_gbnf(const char *re, size_t len, char **out,
                                struct tn_error *err) {
  *out = NULL;
  struct tn_buf b = {0};
  enum tn_status st = tn_regex_gbnf(re, len, "re", false, &b, err);
  if (st != TN_OK) {
    tn_buf_free(&b);
    return st;
  }
  tn_buf_printf(&b, "root ::= re-root\n");
  if (b.oom) {
    tn_buf_free(&b);
    return tn_error_set(err, TN_ENOMEM, "regex: out of memory");
  }
  *out = b.data;
  return TN_OK;
}

enum tn_status tn_grammar_from_regex(const char *re, size_t len,
                                     struct tn_grammar **out,
                                     struct tn_error *err) {
  *out = NULL;
  char *g = NULL;
  enum tn_status st = tn_regex_to_gbnf(re, len, &g, err);
  if (st != TN_OK) return st;
  st = tn_grammar_from_gbnf(g, strlen(g), out, err);
  free(g);
  return st;
}
