/*
 * parse.c: Jinja source to a syntax tree.
 *
 * The lexer cuts the source into text and tags the way jinja2's does with
 * trim_blocks and lstrip_blocks on (Hugging Face's chat template settings):
 *
 *  - "{%-", "{{-", "{#-" strip all whitespace before the tag; "-%}", "-}}",
 *    "-#}" all whitespace after it.
 *  - trim_blocks: a block or comment tag ("%}", "#}") eats one "\n" right
 *    after it ("+%}" keeps it).
 *  - lstrip_blocks: spaces and tabs between the start of a line and a block
 *    or comment tag are dropped ("{%+" keeps them). The start of the
 *    template, and the point after a tag that ate a newline, count as the
 *    start of a line.
 *
 * Inside tags it makes names, strings (Python's escapes), numbers and
 * operators; the parser is recursive descent with jinja2's precedence:
 * inline if < or < and < not < comparisons < + - < ~ < * / // % < ** <
 * unary - + < primary with .attr, [item], (call), | filter and is test.
 * Nesting is bounded so hostile templates fail cleanly.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja/jinja_internal.h"

#define MAX_NEST 200

enum tt {
  T_TEXT,
  T_VAR_BEGIN,
  T_VAR_END,
  T_BLOCK_BEGIN,
  T_BLOCK_END,
  T_NAME,
  T_STRING,
  T_INT,
  T_FLOAT,
  T_OP,
  T_EOF
};

struct tok {
  uint8_t type;
  int line;
  const char *p; /* source bytes (T_STRING: the decoded value) */
  size_t n;
  int64_t i;
  double f;
};

struct parser {
  struct tn_jinja *t;
  const char *src;
  size_t n;
  struct tok *toks;
  size_t n_toks, cap_toks, at;
  struct tn_error *err;
  jmp_buf jb;
  int depth;
};

_Noreturn static void pfail(struct parser *ps, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
_Noreturn static void pfail(struct parser *ps, int line, const char *fmt,
                            ...) {
  char msg[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  tn_error_set(ps->err, TN_EINVAL, "chat template: line %d: %s", line, msg);
  longjmp(ps->jb, 1);
}

static void *palloc(struct parser *ps, size_t n) {
  void *p = ja_alloc(&ps->t->arena, n);
  if (!p) {
    tn_error_set(ps->err, TN_ENOMEM, "chat template: out of memory");
    longjmp(ps->jb, 1);
  }
  memset(p, 0, n);
  return p;
}

/* ---- lexer */

static int line_at(const char *src, size_t at) {
  int line = 1;
  for (size_t i = 0; i < at; i++) line += src[i] == '\n';
  return line;
}

static struct tok *push(struct parser *ps, uint8_t type, int line,
                        const char *p, size_t n) {
  if (ps->n_toks == ps->cap_toks) {
    size_t cap = ps->cap_toks ? ps->cap_toks * 2 : 256;
    struct tok *t = palloc(ps, cap * sizeof(*t));
    if (ps->n_toks) memcpy(t, ps->toks, ps->n_toks * sizeof(*t));
    ps->toks = t;
    ps->cap_toks = cap;
  }
  struct tok *t = &ps->toks[ps->n_toks++];
  *t = (struct tok){.type = type, .line = line, .p = p, .n = n};
  return t;
}

static bool ws_byte(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' ||
         c == '\v';
}

/* Python str.rstrip() length of s[0..n). */
static size_t rstrip_len(const char *s, size_t n) {
  while (n > 0) {
    size_t k = n - 1;
    while (k > 0 && ((uint8_t)s[k] & 0xC0) == 0x80 && n - k < 4) k--;
    size_t l;
    uint32_t c = u8_decode(s, n, k, &l);
    if (k + l != n || !py_isspace(c)) break;
    n = k;
  }
  return n;
}

static bool all_space(const char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    size_t l;
    uint32_t c = u8_decode(s, n, i, &l);
    if (!py_isspace(c)) return false;
    i += l;
  }
  return true;
}

/* Python string literal escapes (jinja2 decodes literals with
 * unicode-escape). */
static void lex_string(struct parser *ps, size_t *pos, int line) {
  const char *s = ps->src;
  char q = s[*pos];
  size_t i = *pos + 1, start = i;
  bool esc = false;
  while (i < ps->n && s[i] != q) {
    if (s[i] == '\\') {
      esc = true;
      i++;
    }
    i++;
  }
  if (i >= ps->n) pfail(ps, line, "unterminated string literal");
  size_t end = i;
  *pos = i + 1;
  struct tok *t = push(ps, T_STRING, line, s + start, end - start);
  if (!esc) return;
  char *o = palloc(ps, (end - start) * 4 + 1);
  size_t n = 0;
  for (size_t k = start; k < end; k++) {
    char c = s[k];
    if (c != '\\' || k + 1 >= end) {
      o[n++] = c;
      continue;
    }
    c = s[++k];
    uint32_t u = 0;
    int digits = 0;
    switch (c) {
    case 'n': o[n++] = '\n'; continue;
    case 't': o[n++] = '\t'; continue;
    case 'r': o[n++] = '\r'; continue;
    case '\\': o[n++] = '\\'; continue;
    case '\'': o[n++] = '\''; continue;
    case '"': o[n++] = '"'; continue;
    case 'a': o[n++] = '\a'; continue;
    case 'b': o[n++] = '\b'; continue;
    case 'f': o[n++] = '\f'; continue;
    case 'v': o[n++] = '\v'; continue;
    case '\n': continue;
    case 'x': digits = 2; break;
    case 'u': digits = 4; break;
    case 'U': digits = 8; break;
    default:
      if (c >= '0' && c <= '7') {
        int d = 0;
        while (d < 3 && k < end && s[k] >= '0' && s[k] <= '7') {
          u = u * 8 + (uint32_t)(s[k] - '0');
          k++;
          d++;
        }
        k--;
        goto put;
      }
      o[n++] = '\\';
      o[n++] = c;
      continue;
    }
    for (int d = 0; d < digits; d++) {
      if (k + 1 >= end) pfail(ps, line, "truncated \\%c escape", c);
      char h = s[++k];
      u <<= 4;
      if (h >= '0' && h <= '9') u |= (uint32_t)(h - '0');
      else if (h >= 'a' && h <= 'f') u |= (uint32_t)(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') u |= (uint32_t)(h - 'A' + 10);
      else pfail(ps, line, "bad \\%c escape", c);
    }
  put:
    if (u > 0x10FFFF) pfail(ps, line, "escape out of the Unicode range");
    if (u < 0x80) {
      o[n++] = (char)u;
    } else if (u < 0x800) {
      o[n++] = (char)(0xC0 | (u >> 6));
      o[n++] = (char)(0x80 | (u & 63));
    } else if (u < 0x10000) {
      o[n++] = (char)(0xE0 | (u >> 12));
      o[n++] = (char)(0x80 | ((u >> 6) & 63));
      o[n++] = (char)(0x80 | (u & 63));
    } else {
      o[n++] = (char)(0xF0 | (u >> 18));
      o[n++] = (char)(0x80 | ((u >> 12) & 63));
      o[n++] = (char)(0x80 | ((u >> 6) & 63));
      o[n++] = (char)(0x80 | (u & 63));
    }
  }
  o[n] = '\0';
  t->p = o;
  t->n = n;
}

/* Lexes the inside of a tag from *pos up to its end marker; returns the
 * position after the marker (and after the whitespace it strips). */
static size_t lex_tag(struct parser *ps, size_t pos, bool block, int *line,
                      bool *ate_newline) {
  const char *s = ps->src;
  size_t n = ps->n;
  const char close = block ? '%' : '}';
  *ate_newline = false;
  for (;;) {
    while (pos < n && ws_byte(s[pos])) {
      if (s[pos] == '\n') (*line)++;
      pos++;
    }
    if (pos >= n) pfail(ps, *line, "unexpected end of template inside a tag");
    /* end markers */
    if ((s[pos] == '-' || s[pos] == '+') && pos + 2 < n &&
        s[pos + 1] == close && s[pos + 2] == '}') {
      bool minus = s[pos] == '-';
      push(ps, block ? T_BLOCK_END : T_VAR_END, *line, NULL, 0);
      pos += 3;
      if (minus) {
        while (pos < n && ws_byte(s[pos])) {
          if (s[pos] == '\n') {
            (*line)++;
            *ate_newline = true;
          } else {
            *ate_newline = false;
          }
          pos++;
        }
      }
      return pos;
    }
    if (s[pos] == close && pos + 1 < n && s[pos + 1] == '}') {
      push(ps, block ? T_BLOCK_END : T_VAR_END, *line, NULL, 0);
      pos += 2;
      if (block && pos < n && s[pos] == '\n') {
        pos++;
        (*line)++;
        *ate_newline = true;
      }
      return pos;
    }
    char c = s[pos];
    if (c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
      size_t st = pos;
      while (pos < n && (s[pos] == '_' || (s[pos] >= 'a' && s[pos] <= 'z') ||
                         (s[pos] >= 'A' && s[pos] <= 'Z') ||
                         (s[pos] >= '0' && s[pos] <= '9')))
        pos++;
      push(ps, T_NAME, *line, s + st, pos - st);
      continue;
    }
    if (c >= '0' && c <= '9') {
      size_t st = pos;
      bool flt = false;
      while (pos < n && ((s[pos] >= '0' && s[pos] <= '9') || s[pos] == '_'))
        pos++;
      if (pos + 1 < n && s[pos] == '.' && s[pos + 1] >= '0' &&
          s[pos + 1] <= '9') {
        flt = true;
        pos++;
        while (pos < n && ((s[pos] >= '0' && s[pos] <= '9') || s[pos] == '_'))
          pos++;
      }
      if (pos < n && (s[pos] == 'e' || s[pos] == 'E')) {
        size_t e = pos + 1;
        if (e < n && (s[e] == '+' || s[e] == '-')) e++;
        if (e < n && s[e] >= '0' && s[e] <= '9') {
          flt = true;
          pos = e;
          while (pos < n && s[pos] >= '0' && s[pos] <= '9') pos++;
        }
      }
      char buf[64];
      size_t k = 0;
      for (size_t i = st; i < pos && k < sizeof(buf) - 1; i++)
        if (s[i] != '_') buf[k++] = s[i];
      buf[k] = '\0';
      struct tok *t = push(ps, flt ? T_FLOAT : T_INT, *line, s + st, pos - st);
      if (flt) {
        t->f = strtod(buf, NULL);
      } else {
        errno = 0;
        long long v = strtoll(buf, NULL, 10);
        if (errno) pfail(ps, *line, "integer literal %s is too large", buf);
        t->i = v;
      }
      continue;
    }
    if (c == '\'' || c == '"') {
      lex_string(ps, &pos, *line);
      continue;
    }
    static const char *const ops2[] = {"//", "**", "==", "!=", "<=", ">="};
    size_t len = 0;
    for (size_t k = 0; k < sizeof(ops2) / sizeof(ops2[0]); k++)
      if (pos + 1 < n && s[pos] == ops2[k][0] && s[pos + 1] == ops2[k][1])
        len = 2;
    if (!len && strchr("+-*/%~<>=.,:|()[]{}", c)) len = 1;
    if (!len)
      pfail(ps, *line, "unexpected character '%c' in a tag", c);
    push(ps, T_OP, *line, s + pos, len);
    pos += len;
  }
}

static void lex(struct parser *ps) {
  const char *s = ps->src;
  size_t n = ps->n, pos = 0;
  int line = 1;
  bool line_starting = true;
  while (pos < n) {
    /* the next tag start */
    size_t tag = pos;
    const char *hit = NULL;
    while (tag + 1 < n) {
      hit = memchr(s + tag, '{', n - tag - 1);
      if (!hit) break;
      tag = (size_t)(hit - s);
      char c = s[tag + 1];
      if (c == '{' || c == '%' || c == '#') break;
      tag++;
      hit = NULL;
    }
    if (!hit) {
      push(ps, T_TEXT, line, s + pos, n - pos);
      return;
    }
    char kind = s[tag + 1];
    char sign = tag + 2 < n ? s[tag + 2] : 0;
    if (sign != '-' && sign != '+') sign = 0;
    size_t text_n = tag - pos;
    if (sign == '-') {
      text_n = rstrip_len(s + pos, text_n);
    } else if (sign != '+' && kind != '{') {
      size_t l = text_n;
      while (l > 0 && s[pos + l - 1] != '\n') l--;
      if ((l > 0 || line_starting) && all_space(s + pos + l, text_n - l))
        text_n = l;
    }
    if (text_n) push(ps, T_TEXT, line, s + pos, text_n);
    line += line_at(s + pos, tag - pos) - 1;
    size_t body = tag + 2 + (sign != 0);
    if (kind == '#') {
      size_t e = body;
      const char *end = NULL;
      while (e + 1 < n) {
        end = memchr(s + e, '#', n - e - 1);
        if (!end) break;
        e = (size_t)(end - s);
        if (s[e + 1] == '}') break;
        e++;
        end = NULL;
      }
      if (!end) pfail(ps, line, "unterminated comment");
      line += line_at(s + tag, e - tag) - 1;
      bool minus = e > body && s[e - 1] == '-';
      bool plus = e > body && s[e - 1] == '+';
      pos = e + 2;
      line_starting = false;
      if (minus) {
        while (pos < n && ws_byte(s[pos])) {
          line_starting = s[pos] == '\n';
          line += s[pos] == '\n';
          pos++;
        }
      } else if (!plus && pos < n && s[pos] == '\n') {
        pos++;
        line++;
        line_starting = true;
      }
      continue;
    }
    if (kind == '%') {
      /* {% raw %} ... {% endraw %}: text as is */
      size_t k = body;
      while (k < n && ws_byte(s[k])) k++;
      if (n - k >= 3 && memcmp(s + k, "raw", 3) == 0 &&
          (k + 3 >= n || !(s[k + 3] == '_' || (s[k + 3] >= 'a' && s[k + 3] <= 'z') ||
                           (s[k + 3] >= '0' && s[k + 3] <= '9')))) {
        k += 3;
        while (k < n && ws_byte(s[k])) k++;
        bool minus = k < n && s[k] == '-';
        if (minus) k++;
        if (n - k < 2 || s[k] != '%' || s[k + 1] != '}')
          pfail(ps, line, "bad raw tag");
        k += 2;
        if (minus)
          while (k < n && ws_byte(s[k])) k++;
        /* find {% endraw %} */
        size_t q = k;
        for (;;) {
          const char *h = q < n ? memmem(s + q, n - q, "{%", 2) : NULL;
          if (!h) pfail(ps, line, "unterminated raw block");
          size_t at = (size_t)(h - s);
          size_t r = at + 2;
          char rsign = r < n && (s[r] == '-' || s[r] == '+') ? s[r] : 0;
          if (rsign) r++;
          while (r < n && ws_byte(s[r])) r++;
          if (n - r >= 6 && memcmp(s + r, "endraw", 6) == 0) {
            r += 6;
            while (r < n && ws_byte(s[r])) r++;
            bool rminus = r < n && s[r] == '-';
            if (rminus) r++;
            if (n - r < 2 || s[r] != '%' || s[r + 1] != '}')
              pfail(ps, line, "bad endraw tag");
            size_t tn = at - k;
            if (rsign == '-') {
              tn = rstrip_len(s + k, tn);
            } else if (rsign != '+') {
              size_t l = tn;
              while (l > 0 && s[k + l - 1] != '\n') l--;
              if (l > 0 && all_space(s + k + l, tn - l)) tn = l;
            }
            if (tn) push(ps, T_TEXT, line, s + k, tn);
            line += line_at(s + tag, r - tag) - 1;
            pos = r + 2;
            line_starting = false;
            if (rminus) {
              while (pos < n && ws_byte(s[pos])) {
                line_starting = s[pos] == '\n';
                line += s[pos] == '\n';
                pos++;
              }
            } else if (pos < n && s[pos] == '\n') {
              pos++;
              line++;
              line_starting = true;
            }
            break;
          }
          q = at + 2;
        }
        continue;
      }
    }
    bool block = kind == '%';
    push(ps, block ? T_BLOCK_BEGIN : T_VAR_BEGIN, line, NULL, 0);
    bool ate;
    pos = lex_tag(ps, body, block, &line, &ate);
    line_starting = ate;
  }
}

/* ---- parser */

static struct tok *cur(struct parser *ps) {
  static struct tok eof = {.type = T_EOF};
  return ps->at < ps->n_toks ? &ps->toks[ps->at] : &eof;
}
static struct tok *peek(struct parser *ps, size_t k) {
  static struct tok eof = {.type = T_EOF};
  return ps->at + k < ps->n_toks ? &ps->toks[ps->at + k] : &eof;
}
static bool is_op(const struct tok *t, const char *op) {
  return t->type == T_OP && t->n == strlen(op) && memcmp(t->p, op, t->n) == 0;
}
static bool is_name(const struct tok *t, const char *w) {
  return t->type == T_NAME && t->n == strlen(w) && memcmp(t->p, w, t->n) == 0;
}
static int line_of(struct parser *ps) {
  struct tok *t = cur(ps);
  if (t->type != T_EOF) return t->line;
  return ps->n_toks ? ps->toks[ps->n_toks - 1].line : 1;
}
static const char *tok_desc(struct tok *t, char *buf, size_t cap) {
  switch (t->type) {
  case T_EOF: return "end of template";
  case T_VAR_END: return "end of print statement";
  case T_BLOCK_END: return "end of statement block";
  case T_TEXT: return "template text";
  default:
    snprintf(buf, cap, "'%.*s'", (int)(t->n > 40 ? 40 : t->n), t->p);
    return buf;
  }
}
static void expect_op(struct parser *ps, const char *op) {
  if (!is_op(cur(ps), op)) {
    char b[64];
    pfail(ps, line_of(ps), "expected '%s', got %s", op,
          tok_desc(cur(ps), b, sizeof(b)));
  }
  ps->at++;
}
static struct jstr expect_name(struct parser *ps) {
  struct tok *t = cur(ps);
  if (t->type != T_NAME) {
    char b[64];
    pfail(ps, line_of(ps), "expected a name, got %s",
          tok_desc(t, b, sizeof(b)));
  }
  ps->at++;
  return (struct jstr){t->p, t->n};
}
static void expect_type(struct parser *ps, uint8_t type, const char *what) {
  if (cur(ps)->type != type) {
    char b[64];
    pfail(ps, line_of(ps), "expected %s, got %s", what,
          tok_desc(cur(ps), b, sizeof(b)));
  }
  ps->at++;
}

static struct jnode *node(struct parser *ps, uint8_t kind, int line) {
  struct jnode *n = palloc(ps, sizeof(*n));
  n->kind = kind;
  n->line = line;
  return n;
}

/* A growable list of kids while parsing. */
struct kids {
  struct jnode **v;
  size_t n, cap;
};
static void kids_push(struct parser *ps, struct kids *k, struct jnode *n) {
  if (k->n == k->cap) {
    size_t cap = k->cap ? k->cap * 2 : 4;
    struct jnode **v = palloc(ps, cap * sizeof(*v));
    if (k->n) memcpy(v, k->v, k->n * sizeof(*v));
    k->v = v;
    k->cap = cap;
  }
  k->v[k->n++] = n;
}
struct names {
  struct jstr *v;
  size_t n, cap;
};
static void names_push(struct parser *ps, struct names *k, struct jstr s) {
  if (k->n == k->cap) {
    size_t cap = k->cap ? k->cap * 2 : 4;
    struct jstr *v = palloc(ps, cap * sizeof(*v));
    if (k->n) memcpy(v, k->v, k->n * sizeof(*v));
    k->v = v;
    k->cap = cap;
  }
  k->v[k->n++] = s;
}

static void note_name(struct parser *ps, struct jstr s) {
  struct tn_jinja *t = ps->t;
  for (size_t i = 0; i < t->n_names; i++)
    if (t->names[i].n == s.n && memcmp(t->names[i].p, s.p, s.n) == 0) return;
  if ((t->n_names & (t->n_names + 1)) == 0 || t->n_names == 0) {
    size_t cap = t->n_names ? (t->n_names + 1) * 2 : 8;
    struct jstr *v = palloc(ps, cap * sizeof(*v));
    if (t->n_names) memcpy(v, t->names, t->n_names * sizeof(*v));
    t->names = v;
  }
  t->names[t->n_names++] = s;
}

static struct jnode *parse_expr(struct parser *ps);
static struct jnode *parse_or(struct parser *ps);
static struct jnode *parse_unary(struct parser *ps, bool with_filter);
static struct jnode *parse_primary(struct parser *ps);
static struct jnode *parse_postfix(struct parser *ps, struct jnode *n);

static void enter(struct parser *ps) {
  if (++ps->depth > MAX_NEST)
    pfail(ps, line_of(ps), "expression nested more than %d levels deep",
          MAX_NEST);
}
static void leave(struct parser *ps) { ps->depth--; }

/* Arguments of a call, filter or test: "(" already eaten. */
static void parse_args(struct parser *ps, struct kids *k, struct names *kw) {
  while (!is_op(cur(ps), ")")) {
    if (k->n > 1 || kw->n) expect_op(ps, ",");
    if (is_op(cur(ps), ")")) break;
    if (is_op(cur(ps), "*") || is_op(cur(ps), "**"))
      pfail(ps, line_of(ps), "*args and **kwargs in calls are not supported");
    if (cur(ps)->type == T_NAME && is_op(peek(ps, 1), "=")) {
      names_push(ps, kw, expect_name(ps));
      ps->at++;
      kids_push(ps, k, parse_expr(ps));
    } else {
      if (kw->n)
        pfail(ps, line_of(ps), "positional argument after keyword argument");
      kids_push(ps, k, parse_expr(ps));
    }
  }
  ps->at++;
}

static void finish_call(struct jnode *n, struct kids *k, struct names *kw) {
  n->kids = k->v;
  n->n_kids = k->n;
  n->names = kw->v;
  n->n_names = kw->n;
  n->n_kw = kw->n;
}

static struct jnode *parse_filter(struct parser *ps, struct jnode *operand) {
  int line = line_of(ps);
  struct jnode *f = node(ps, N_FILTER, line);
  f->name = expect_name(ps);
  while (is_op(cur(ps), ".")) { /* dotted filter names */
    ps->at++;
    struct jstr more = expect_name(ps);
    f->name.n = (size_t)(more.p + more.n - f->name.p);
  }
  struct kids k = {0};
  struct names kw = {0};
  kids_push(ps, &k, operand);
  if (is_op(cur(ps), "(")) {
    ps->at++;
    parse_args(ps, &k, &kw);
  }
  finish_call(f, &k, &kw);
  return f;
}

static struct jnode *parse_filter_expr(struct parser *ps, struct jnode *n) {
  for (;;) {
    struct tok *t = cur(ps);
    if (is_op(t, "|")) {
      ps->at++;
      n = parse_filter(ps, n);
    } else if (is_name(t, "is")) {
      ps->at++;
      int line = line_of(ps);
      struct jnode *te = node(ps, N_TEST, line);
      if (is_name(cur(ps), "not")) {
        ps->at++;
        te->flag = 1;
      }
      te->name = expect_name(ps);
      struct kids k = {0};
      struct names kw = {0};
      kids_push(ps, &k, n);
      struct tok *a = cur(ps);
      if (is_op(a, "(")) {
        ps->at++;
        parse_args(ps, &k, &kw);
      } else if ((a->type == T_NAME || a->type == T_STRING ||
                  a->type == T_INT || a->type == T_FLOAT || is_op(a, "[") ||
                  is_op(a, "{")) &&
                 !is_name(a, "else") && !is_name(a, "or") &&
                 !is_name(a, "and")) {
        if (is_name(a, "is"))
          pfail(ps, line, "you cannot chain multiple tests with is");
        enter(ps);
        struct jnode *arg = parse_postfix(ps, parse_primary(ps));
        leave(ps);
        kids_push(ps, &k, arg);
      }
      finish_call(te, &k, &kw);
      n = te;
    } else if (is_op(t, "(")) {
      n = parse_postfix(ps, n);
    } else {
      return n;
    }
  }
}

static struct jnode *parse_postfix(struct parser *ps, struct jnode *n) {
  for (;;) {
    struct tok *t = cur(ps);
    int line = t->line;
    if (is_op(t, ".")) {
      ps->at++;
      struct tok *a = cur(ps);
      if (a->type == T_INT) {
        ps->at++;
        struct jnode *it = node(ps, N_ITEM, line);
        struct jnode *lit = node(ps, N_LIT, line);
        lit->lit = jv_int(a->i);
        it->kids = palloc(ps, 2 * sizeof(*it->kids));
        it->kids[0] = n;
        it->kids[1] = lit;
        it->n_kids = 2;
        n = it;
        continue;
      }
      struct jnode *at = node(ps, N_ATTR, line);
      at->name = expect_name(ps);
      at->kids = palloc(ps, sizeof(*at->kids));
      at->kids[0] = n;
      at->n_kids = 1;
      n = at;
    } else if (is_op(t, "[")) {
      ps->at++;
      struct jnode *parts[3] = {0};
      int n_parts = 1;
      bool slice = false;
      for (;;) {
        if (is_op(cur(ps), ":")) {
          ps->at++;
          slice = true;
          if (n_parts == 3) pfail(ps, line, "bad slice");
          n_parts++;
          continue;
        }
        if (is_op(cur(ps), "]")) break;
        if (parts[n_parts - 1]) pfail(ps, line, "expected ']' or ':'");
        parts[n_parts - 1] = parse_expr(ps);
        if (!slice && is_op(cur(ps), ",")) { /* a[1, 2]: tuple key */
          struct kids k = {0};
          kids_push(ps, &k, parts[0]);
          while (is_op(cur(ps), ",")) {
            ps->at++;
            if (is_op(cur(ps), "]")) break;
            kids_push(ps, &k, parse_expr(ps));
          }
          struct jnode *tu = node(ps, N_LIST, line);
          tu->flag = 1;
          tu->kids = k.v;
          tu->n_kids = k.n;
          parts[0] = tu;
        }
      }
      ps->at++;
      struct jnode *it = node(ps, slice ? N_SLICE : N_ITEM, line);
      it->n_kids = slice ? 4 : 2;
      it->kids = palloc(ps, it->n_kids * sizeof(*it->kids));
      it->kids[0] = n;
      if (!slice && !parts[0]) pfail(ps, line, "empty subscript");
      for (int i = 0; i < (slice ? 3 : 1); i++) it->kids[1 + i] = parts[i];
      n = it;
    } else if (is_op(t, "(")) {
      ps->at++;
      struct jnode *c = node(ps, N_CALL, line);
      struct kids k = {0};
      struct names kw = {0};
      kids_push(ps, &k, n);
      parse_args(ps, &k, &kw);
      finish_call(c, &k, &kw);
      n = c;
    } else {
      return n;
    }
  }
}

static struct jnode *seq_node(struct parser *ps, uint8_t kind, int line,
                              const char *close, bool is_dict, bool *comma) {
  struct kids k = {0};
  *comma = false;
  while (!is_op(cur(ps), close)) {
    if (k.n) {
      expect_op(ps, ",");
      *comma = true;
      if (is_op(cur(ps), close)) break;
    }
    kids_push(ps, &k, parse_expr(ps));
    if (is_dict) {
      expect_op(ps, ":");
      kids_push(ps, &k, parse_expr(ps));
    }
  }
  ps->at++;
  struct jnode *n = node(ps, kind, line);
  n->kids = k.v;
  n->n_kids = k.n;
  return n;
}

static struct jnode *parse_primary(struct parser *ps) {
  struct tok *t = cur(ps);
  int line = line_of(ps);
  if (t->type == T_NAME) {
    ps->at++;
    struct jnode *n = node(ps, N_LIT, line);
    if (is_name(t, "true") || is_name(t, "True")) n->lit = jv_bool(true);
    else if (is_name(t, "false") || is_name(t, "False")) n->lit = jv_bool(false);
    else if (is_name(t, "none") || is_name(t, "None")) n->lit = jv_none();
    else {
      n->kind = N_NAME;
      n->name = (struct jstr){t->p, t->n};
      note_name(ps, n->name);
    }
    return n;
  }
  if (t->type == T_STRING) {
    /* adjacent literals concatenate */
    size_t total = 0, k = ps->at;
    while (k < ps->n_toks && ps->toks[k].type == T_STRING)
      total += ps->toks[k++].n;
    struct jnode *n = node(ps, N_LIT, line);
    if (k == ps->at + 1) {
      n->lit = jv_str(t->p, t->n);
    } else {
      char *p = palloc(ps, total + 1);
      size_t o = 0;
      for (size_t i = ps->at; i < k; i++) {
        memcpy(p + o, ps->toks[i].p, ps->toks[i].n);
        o += ps->toks[i].n;
      }
      n->lit = jv_str(p, total);
    }
    ps->at = k;
    return n;
  }
  if (t->type == T_INT || t->type == T_FLOAT) {
    ps->at++;
    struct jnode *n = node(ps, N_LIT, line);
    n->lit = t->type == T_INT ? jv_int(t->i) : jv_float(t->f);
    return n;
  }
  if (is_op(t, "(")) {
    ps->at++;
    enter(ps);
    if (is_op(cur(ps), ")")) {
      ps->at++;
      leave(ps);
      struct jnode *n = node(ps, N_LIST, line);
      n->flag = 1;
      return n;
    }
    struct jnode *first = parse_expr(ps);
    if (is_op(cur(ps), ")")) {
      ps->at++;
      leave(ps);
      return first;
    }
    struct kids k = {0};
    kids_push(ps, &k, first);
    while (is_op(cur(ps), ",")) {
      ps->at++;
      if (is_op(cur(ps), ")")) break;
      kids_push(ps, &k, parse_expr(ps));
    }
    expect_op(ps, ")");
    leave(ps);
    struct jnode *n = node(ps, N_LIST, line);
    n->flag = 1;
    n->kids = k.v;
    n->n_kids = k.n;
    return n;
  }
  if (is_op(t, "[") || is_op(t, "{")) {
    ps->at++;
    enter(ps);
    bool comma;
    struct jnode *n = is_op(t, "[")
                          ? seq_node(ps, N_LIST, line, "]", false, &comma)
                          : seq_node(ps, N_DICT, line, "}", true, &comma);
    leave(ps);
    return n;
  }
  char b[64];
  pfail(ps, line, "unexpected %s", tok_desc(t, b, sizeof(b)));
}

static struct jnode *bin(struct parser *ps, uint8_t kind, uint8_t op, int line,
                         struct jnode *a, struct jnode *b) {
  struct jnode *n = node(ps, kind, line);
  n->op = op;
  n->kids = palloc(ps, 2 * sizeof(*n->kids));
  n->kids[0] = a;
  n->kids[1] = b;
  n->n_kids = 2;
  return n;
}

static struct jnode *parse_unary(struct parser *ps, bool with_filter) {
  struct tok *t = cur(ps);
  int line = line_of(ps);
  enter(ps);
  struct jnode *n;
  if (is_op(t, "-") || is_op(t, "+")) {
    ps->at++;
    n = node(ps, is_op(t, "-") ? N_NEG : N_POS, line);
    n->kids = palloc(ps, sizeof(*n->kids));
    n->kids[0] = parse_unary(ps, false);
    n->n_kids = 1;
  } else {
    n = parse_postfix(ps, parse_primary(ps));
  }
  if (with_filter) n = parse_filter_expr(ps, n);
  leave(ps);
  return n;
}

static struct jnode *parse_pow(struct parser *ps) {
  struct jnode *a = parse_unary(ps, true);
  while (is_op(cur(ps), "**")) {
    int line = line_of(ps);
    ps->at++;
    a = bin(ps, N_BIN, OP_POW, line, a, parse_unary(ps, true));
  }
  return a;
}

static struct jnode *parse_math2(struct parser *ps) {
  struct jnode *a = parse_pow(ps);
  for (;;) {
    struct tok *t = cur(ps);
    uint8_t op;
    if (is_op(t, "*")) op = OP_MUL;
    else if (is_op(t, "/")) op = OP_DIV;
    else if (is_op(t, "//")) op = OP_FLOORDIV;
    else if (is_op(t, "%")) op = OP_MOD;
    else return a;
    int line = line_of(ps);
    ps->at++;
    a = bin(ps, N_BIN, op, line, a, parse_pow(ps));
  }
}

static struct jnode *parse_concat(struct parser *ps) {
  struct jnode *a = parse_math2(ps);
  if (!is_op(cur(ps), "~")) return a;
  struct kids k = {0};
  kids_push(ps, &k, a);
  int line = line_of(ps);
  while (is_op(cur(ps), "~")) {
    ps->at++;
    kids_push(ps, &k, parse_math2(ps));
  }
  struct jnode *n = node(ps, N_CONCAT, line);
  n->kids = k.v;
  n->n_kids = k.n;
  return n;
}

static struct jnode *parse_math1(struct parser *ps) {
  struct jnode *a = parse_concat(ps);
  for (;;) {
    struct tok *t = cur(ps);
    uint8_t op;
    if (is_op(t, "+")) op = OP_ADD;
    else if (is_op(t, "-")) op = OP_SUB;
    else return a;
    int line = line_of(ps);
    ps->at++;
    a = bin(ps, N_BIN, op, line, a, parse_concat(ps));
  }
}

static struct jnode *parse_compare(struct parser *ps) {
  int line = line_of(ps);
  struct jnode *a = parse_math1(ps);
  struct kids k = {0};
  uint8_t ops[64];
  size_t n_ops = 0;
  kids_push(ps, &k, a);
  for (;;) {
    struct tok *t = cur(ps);
    uint8_t op;
    if (is_op(t, "==")) op = OP_EQ;
    else if (is_op(t, "!=")) op = OP_NE;
    else if (is_op(t, "<")) op = OP_LT;
    else if (is_op(t, "<=")) op = OP_LE;
    else if (is_op(t, ">")) op = OP_GT;
    else if (is_op(t, ">=")) op = OP_GE;
    else if (is_name(t, "in")) op = OP_IN;
    else if (is_name(t, "not") && is_name(peek(ps, 1), "in")) {
      op = OP_NOTIN;
      ps->at++;
    } else break;
    ps->at++;
    if (n_ops == sizeof(ops)) pfail(ps, line, "comparison chain too long");
    ops[n_ops++] = op;
    kids_push(ps, &k, parse_math1(ps));
  }
  if (!n_ops) return a;
  struct jnode *n = node(ps, N_COMPARE, line);
  n->kids = k.v;
  n->n_kids = k.n;
  n->ops = palloc(ps, n_ops);
  memcpy(n->ops, ops, n_ops);
  return n;
}

static struct jnode *parse_not(struct parser *ps) {
  if (is_name(cur(ps), "not")) {
    int line = line_of(ps);
    ps->at++;
    enter(ps);
    struct jnode *n = node(ps, N_NOT, line);
    n->kids = palloc(ps, sizeof(*n->kids));
    n->kids[0] = parse_not(ps);
    n->n_kids = 1;
    leave(ps);
    return n;
  }
  return parse_compare(ps);
}

static struct jnode *parse_and(struct parser *ps) {
  struct jnode *a = parse_not(ps);
  while (is_name(cur(ps), "and")) {
    int line = line_of(ps);
    ps->at++;
    a = bin(ps, N_AND, 0, line, a, parse_not(ps));
  }
  return a;
}

static struct jnode *parse_or(struct parser *ps) {
  struct jnode *a = parse_and(ps);
  while (is_name(cur(ps), "or")) {
    int line = line_of(ps);
    ps->at++;
    a = bin(ps, N_OR, 0, line, a, parse_and(ps));
  }
  return a;
}

static struct jnode *parse_expr(struct parser *ps) {
  enter(ps);
  struct jnode *a = parse_or(ps);
  while (is_name(cur(ps), "if")) {
    int line = line_of(ps);
    ps->at++;
    struct jnode *n = node(ps, N_COND, line);
    n->kids = palloc(ps, 3 * sizeof(*n->kids));
    n->n_kids = 3;
    n->kids[0] = parse_or(ps);
    n->kids[1] = a;
    if (is_name(cur(ps), "else")) {
      ps->at++;
      n->kids[2] = parse_expr(ps);
    }
    a = n;
  }
  leave(ps);
  return a;
}

/* expr or expr, expr, ... (a tuple) */
static struct jnode *parse_tuple(struct parser *ps, bool condexpr) {
  int line = line_of(ps);
  struct jnode *a = condexpr ? parse_expr(ps) : parse_or(ps);
  if (!is_op(cur(ps), ",")) return a;
  struct kids k = {0};
  kids_push(ps, &k, a);
  while (is_op(cur(ps), ",")) {
    ps->at++;
    if (cur(ps)->type == T_VAR_END || cur(ps)->type == T_BLOCK_END) break;
    kids_push(ps, &k, condexpr ? parse_expr(ps) : parse_or(ps));
  }
  struct jnode *n = node(ps, N_LIST, line);
  n->flag = 1;
  n->kids = k.v;
  n->n_kids = k.n;
  return n;
}

/* ---- statements */

static struct jnode *parse_body(struct parser *ps, const char *const *ends,
                                size_t n_ends, size_t *which);

static void end_block(struct parser *ps) {
  expect_type(ps, T_BLOCK_END, "end of statement block ('%}')");
}

static struct jnode *kid1(struct parser *ps, uint8_t kind, int line,
                          struct jnode *k) {
  struct jnode *n = node(ps, kind, line);
  n->kids = palloc(ps, sizeof(*n->kids));
  n->kids[0] = k;
  n->n_kids = 1;
  return n;
}

static struct jnode *parse_if(struct parser *ps, int line) {
  struct jnode *n = node(ps, N_IF, line);
  n->kids = palloc(ps, 3 * sizeof(*n->kids));
  n->n_kids = 3;
  n->kids[0] = parse_tuple(ps, true);
  end_block(ps);
  static const char *const ends[] = {"elif", "else", "endif"};
  size_t w;
  n->kids[1] = parse_body(ps, ends, 3, &w);
  if (w == 0) {
    int l2 = line_of(ps);
    ps->at++;
    enter(ps);
    n->kids[2] = parse_if(ps, l2);
    leave(ps);
    return n;
  }
  if (w == 1) {
    ps->at++;
    end_block(ps);
    static const char *const ends2[] = {"endif"};
    n->kids[2] = parse_body(ps, ends2, 1, &w);
  }
  ps->at++; /* endif */
  end_block(ps);
  return n;
}

static struct jnode *parse_for(struct parser *ps, int line) {
  struct jnode *n = node(ps, N_FOR, line);
  struct names nm = {0};
  bool paren = is_op(cur(ps), "(");
  if (paren) ps->at++;
  names_push(ps, &nm, expect_name(ps));
  while (is_op(cur(ps), ",")) {
    ps->at++;
    if (is_name(cur(ps), "in")) break;
    names_push(ps, &nm, expect_name(ps));
  }
  if (paren) expect_op(ps, ")");
  n->names = nm.v;
  n->n_names = nm.n;
  if (!is_name(cur(ps), "in")) pfail(ps, line_of(ps), "expected 'in'");
  ps->at++;
  n->kids = palloc(ps, 4 * sizeof(*n->kids));
  n->n_kids = 4;
  n->kids[0] = parse_tuple(ps, false);
  if (is_name(cur(ps), "if")) {
    ps->at++;
    n->kids[3] = parse_expr(ps);
  }
  if (is_name(cur(ps), "recursive"))
    pfail(ps, line_of(ps), "recursive loops are not supported");
  end_block(ps);
  static const char *const ends[] = {"else", "endfor"};
  size_t w;
  n->kids[1] = parse_body(ps, ends, 2, &w);
  if (w == 0) {
    ps->at++;
    end_block(ps);
    static const char *const ends2[] = {"endfor"};
    n->kids[2] = parse_body(ps, ends2, 1, &w);
  }
  ps->at++;
  end_block(ps);
  return n;
}

static struct jnode *parse_set(struct parser *ps, int line) {
  struct jnode *n = node(ps, N_SET, line);
  struct names nm = {0};
  n->name = expect_name(ps);
  names_push(ps, &nm, n->name);
  if (is_op(cur(ps), ".")) {
    ps->at++;
    n->attr = expect_name(ps);
  } else {
    while (is_op(cur(ps), ",")) {
      ps->at++;
      names_push(ps, &nm, expect_name(ps));
    }
  }
  n->names = nm.v;
  n->n_names = nm.n;
  if (is_op(cur(ps), "=")) {
    ps->at++;
    n->kids = palloc(ps, sizeof(*n->kids));
    n->kids[0] = parse_tuple(ps, true);
    n->n_kids = 1;
    end_block(ps);
    return n;
  }
  if (n->attr.p || nm.n > 1) pfail(ps, line, "expected '='");
  /* {% set name [| filters] %} ... {% endset %} */
  n->kind = N_SETBLOCK;
  n->kids = palloc(ps, 2 * sizeof(*n->kids));
  n->n_kids = 2;
  struct jnode *f = NULL;
  while (is_op(cur(ps), "|")) {
    ps->at++;
    f = parse_filter(ps, f);
  }
  n->kids[1] = f;
  end_block(ps);
  static const char *const ends[] = {"endset"};
  size_t w;
  n->kids[0] = parse_body(ps, ends, 1, &w);
  ps->at++;
  end_block(ps);
  return n;
}

static struct jnode *parse_macro(struct parser *ps, int line) {
  struct jnode *n = node(ps, N_MACRO, line);
  n->name = expect_name(ps);
  expect_op(ps, "(");
  struct names nm = {0};
  struct kids k = {0};
  kids_push(ps, &k, NULL); /* body */
  bool any_default = false;
  while (!is_op(cur(ps), ")")) {
    if (nm.n) expect_op(ps, ",");
    if (is_op(cur(ps), ")")) break;
    names_push(ps, &nm, expect_name(ps));
    if (is_op(cur(ps), "=")) {
      ps->at++;
      kids_push(ps, &k, parse_expr(ps));
      any_default = true;
    } else {
      if (any_default)
        pfail(ps, line_of(ps), "non-default argument follows default argument");
      kids_push(ps, &k, NULL);
    }
  }
  ps->at++;
  end_block(ps);
  static const char *const ends[] = {"endmacro"};
  size_t w;
  k.v[0] = parse_body(ps, ends, 1, &w);
  ps->at++;
  if (cur(ps)->type == T_NAME) ps->at++; /* {% endmacro name %} */
  end_block(ps);
  n->names = nm.v;
  n->n_names = nm.n;
  n->kids = k.v;
  n->n_kids = k.n;
  return n;
}

static struct jnode *parse_statement(struct parser *ps) {
  int line = line_of(ps);
  struct tok *t = cur(ps);
  if (t->type != T_NAME) pfail(ps, line, "expected a statement name");
  ps->at++;
  enter(ps);
  struct jnode *n;
  if (is_name(t, "if")) {
    n = parse_if(ps, line);
  } else if (is_name(t, "for")) {
    n = parse_for(ps, line);
  } else if (is_name(t, "set")) {
    n = parse_set(ps, line);
  } else if (is_name(t, "macro")) {
    n = parse_macro(ps, line);
  } else if (is_name(t, "break") || is_name(t, "continue")) {
    n = node(ps, is_name(t, "break") ? N_BREAK : N_CONTINUE, line);
    end_block(ps);
  } else if (is_name(t, "generation")) {
    end_block(ps);
    static const char *const ends[] = {"endgeneration"};
    size_t w;
    n = parse_body(ps, ends, 1, &w);
    ps->at++;
    end_block(ps);
  } else if (is_name(t, "call")) {
    if (is_op(cur(ps), "("))
      pfail(ps, line, "call blocks with caller arguments are not supported");
    n = node(ps, N_CALLBLOCK, line);
    n->kids = palloc(ps, 2 * sizeof(*n->kids));
    n->n_kids = 2;
    n->kids[0] = parse_expr(ps);
    if (n->kids[0]->kind != N_CALL)
      pfail(ps, line, "a call block needs a call expression");
    end_block(ps);
    static const char *const ends[] = {"endcall"};
    size_t w;
    struct jnode *m = node(ps, N_MACRO, line);
    m->name = (struct jstr){"caller", 6};
    m->kids = palloc(ps, sizeof(*m->kids));
    m->n_kids = 1;
    m->kids[0] = parse_body(ps, ends, 1, &w);
    n->kids[1] = m;
    ps->at++;
    end_block(ps);
  } else if (is_name(t, "filter")) {
    n = node(ps, N_FILTERBLOCK, line);
    n->kids = palloc(ps, 2 * sizeof(*n->kids));
    n->n_kids = 2;
    struct jnode *f = parse_filter(ps, NULL);
    while (is_op(cur(ps), "|")) {
      ps->at++;
      f = parse_filter(ps, f);
    }
    n->kids[1] = f;
    end_block(ps);
    static const char *const ends[] = {"endfilter"};
    size_t w;
    n->kids[0] = parse_body(ps, ends, 1, &w);
    ps->at++;
    end_block(ps);
  } else {
    pfail(ps, line, "unknown tag '%.*s'", (int)(t->n > 40 ? 40 : t->n),
          t->p);
  }
  leave(ps);
  return n;
}

/* Statements up to one of ends (a block tag whose name is in ends; ps->at
 * is left on that name) or the end of the template (ends == NULL). */
static struct jnode *parse_body(struct parser *ps, const char *const *ends,
                                size_t n_ends, size_t *which) {
  struct kids k = {0};
  int line = line_of(ps);
  for (;;) {
    struct tok *t = cur(ps);
    if (t->type == T_EOF) {
      if (ends) {
        pfail(ps, line_of(ps), "unexpected end of template: a block opened "
              "on line %d needs '%s'", line, ends[n_ends - 1]);
      }
      break;
    }
    if (t->type == T_TEXT) {
      struct jnode *n = node(ps, N_TEXT, t->line);
      n->lit = jv_str(t->p, t->n);
      kids_push(ps, &k, n);
      ps->at++;
      continue;
    }
    if (t->type == T_VAR_BEGIN) {
      ps->at++;
      struct jnode *e = parse_tuple(ps, true);
      expect_type(ps, T_VAR_END, "end of print statement ('}}')");
      kids_push(ps, &k, kid1(ps, N_OUT, t->line, e));
      continue;
    }
    if (t->type == T_BLOCK_BEGIN) {
      struct tok *name = peek(ps, 1);
      for (size_t i = 0; ends && i < n_ends; i++)
        if (is_name(name, ends[i])) {
          ps->at++;
          *which = i;
          goto done;
        }
      if (name->type == T_NAME &&
          (is_name(name, "endif") || is_name(name, "endfor") ||
           is_name(name, "endmacro") || is_name(name, "endset") ||
           is_name(name, "else") || is_name(name, "elif") ||
           is_name(name, "endfilter") || is_name(name, "endgeneration") ||
           is_name(name, "endcall")))
        pfail(ps, name->line, "unexpected '%.*s'", (int)name->n, name->p);
      ps->at++;
      kids_push(ps, &k, parse_statement(ps));
      continue;
    }
    char b[64];
    pfail(ps, t->line, "unexpected %s", tok_desc(t, b, sizeof(b)));
  }
done:;
  struct jnode *n = node(ps, N_BODY, line);
  n->kids = k.v;
  n->n_kids = k.n;
  return n;
}

bool jinja_parse(struct tn_jinja *t, const char *src, size_t n,
                 struct tn_error *err) {
  struct parser ps = {.t = t, .src = src, .n = n, .err = err};
  if (setjmp(ps.jb)) return false;
  lex(&ps);
  size_t w;
  t->root = parse_body(&ps, NULL, 0, &w);
  return true;
}
