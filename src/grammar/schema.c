/*
 * schema.c: JSON schemas, choice lists and "any JSON object" to GBNF
 * (then gbnf.c compiles it).
 *
 * Every subschema becomes a rule; the JSON primitives (string, number,
 * integer, value, ...) are shared rules written once at the end. What
 * the output may look like, beyond validity (docs/GRAMMAR.md):
 *
 *  - properties come in the schema's order; required ones always,
 *    optional ones may be left out. Extra properties only where the
 *    schema allows them explicitly (additionalProperties true or a
 *    schema) or names no properties at all ({"type": "object"}): leaving
 *    them out is always valid, and a model that invents keys is the
 *    usual failure;
 *  - whitespace between tokens is limited to 20 characters ([ \t\n]), so
 *    a model cannot stall in an endless run of blanks; numbers to 16
 *    integer and 16 fraction digits and a 3-digit exponent;
 *  - a list of literals (enum, choices) is written as a trie, so the
 *    matcher follows one path instead of one stack per literal.
 *
 * Keywords that change validity and that the compiler cannot honour are
 * refused by name (400 upstream), never ignored; annotations (title,
 * description, examples, ...) are ignored.
 */
#include "grammar/grammar_internal.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- literal sets as tries */

struct lit {
  const char *s;
  size_t n;
};

static int lit_cmp(const void *a, const void *b) {
  const struct lit *x = a, *y = b;
  size_t n = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->s, y->s, n);
  if (c) return c;
  return x->n < y->n ? -1 : x->n > y->n;
}

static size_t char_len(const char *s, size_t n) {
  uint32_t cp;
  size_t k = utf8_decode(s, n, &cp);
  return k ? k : 1;
}

struct lits_ctx {
  struct tn_buf *rules;
  const char *prefix;
  uint32_t *counter;
};

/* Appends to `expr` an expression matching exactly the strings v[lo..hi)
 * minus their common first k bytes (sorted, k at a character boundary). */
static void lits_expr(struct lits_ctx *c, const struct lit *v, size_t lo,
                      size_t hi, size_t k, struct tn_buf *expr) {
  bool has_end = false;
  size_t i = lo;
  while (i < hi && v[i].n == k) has_end = true, i++;
  int n_alts = 0;
  struct tn_buf alts = {0};
  while (i < hi) {
    size_t cl = char_len(v[i].s + k, v[i].n - k);
    size_t j = i + 1;
    while (j < hi && v[j].n >= k + cl &&
           memcmp(v[j].s + k, v[i].s + k, cl) == 0)
      j++;
    /* the longest common run of [i, j) from k, whole characters */
    size_t L = cl;
    for (;;) {
      if (v[i].n <= k + L) break;
      size_t cl2 = char_len(v[i].s + k + L, v[i].n - k - L);
      bool all = true;
      for (size_t t = i + 1; t < j && all; t++)
        all = v[t].n >= k + L + cl2 &&
              memcmp(v[t].s + k + L, v[i].s + k + L, cl2) == 0;
      if (!all) break;
      L += cl2;
    }
    if (n_alts++) tn_buf_append(&alts, " | ", 3);
    gbnf_literal(&alts, v[i].s + k, L);
    bool more = false;
    for (size_t t = i; t < j && !more; t++) more = v[t].n > k + L;
    if (more) {
      char name[96];
      snprintf(name, sizeof name, "%s-lit%u", c->prefix, (*c->counter)++);
      struct tn_buf sub = {0};
      lits_expr(c, v, i, j, k + L, &sub);
      tn_buf_printf(c->rules, "%s ::= %s\n", name, sub.data ? sub.data : "");
      tn_buf_free(&sub);
      tn_buf_printf(&alts, " %s", name);
    }
    i = j;
  }
  if (n_alts == 0) {
    tn_buf_append(expr, "\"\"", 2);
  } else if (has_end) {
    tn_buf_printf(expr, "( %s )?", alts.data);
  } else if (n_alts > 1) {
    tn_buf_printf(expr, "( %s )", alts.data);
  } else {
    tn_buf_append(expr, alts.data, alts.len);
  }
  tn_buf_free(&alts);
}

/* An expression for exactly one of the n literals. */
static bool lits(struct tn_buf *rules, const char *prefix, uint32_t *counter,
                 struct lit *v, size_t n, struct tn_buf *expr) {
  qsort(v, n, sizeof *v, lit_cmp);
  struct lits_ctx c = {rules, prefix, counter};
  lits_expr(&c, v, 0, n, 0, expr);
  return !rules->oom && !expr->oom;
}

static enum tn_status compile_text(struct tn_buf *b, struct tn_grammar **out,
                                   struct tn_error *err) {
  if (b->oom) {
    tn_buf_free(b);
    return tn_error_set(err, TN_ENOMEM, "grammar: out of memory");
  }
  enum tn_status st =
      tn_grammar_from_gbnf(b->data ? b->data : "", b->len, out, err);
  tn_buf_free(b);
  return st;
}

enum tn_status tn_grammar_from_choices(const char *const *choices,
                                       const size_t *lens, size_t n,
                                       struct tn_grammar **out,
                                       struct tn_error *err) {
  *out = NULL;
  if (n == 0) return tn_error_set(err, TN_EINVAL, "choice: the list is empty");
  struct lit *v = malloc(n * sizeof *v);
  if (!v) return tn_error_set(err, TN_ENOMEM, "grammar: out of memory");
  for (size_t i = 0; i < n; i++) {
    v[i] = (struct lit){choices[i], lens[i]};
    if (lens[i] == 0) {
      free(v);
      return tn_error_set(err, TN_EINVAL, "choice: item %zu is empty", i);
    }
  }
  struct tn_buf rules = {0}, expr = {0};
  uint32_t counter = 0;
  lits(&rules, "choice", &counter, v, n, &expr);
  free(v);
  tn_buf_printf(&rules, "root ::= %s\n", expr.data ? expr.data : "\"\"");
  tn_buf_free(&expr);
  return compile_text(&rules, out, err);
}

/* ---- JSON schema */

#define MAX_SCHEMA_DEPTH 64

struct ref {
  char *path;
  char name[64];
};

struct sctx {
  json_t *root;
  struct tn_buf rules;
  uint32_t n_rules;
  uint32_t lit_counter;
  struct ref *refs;
  size_t n_refs, cap_refs;
  int depth;
  bool failed;
  struct tn_error *err;
  /* shared rules used */
  bool use_value, use_string, use_number, use_integer, use_boolean, use_null,
      use_object, use_array, use_char;
};

__attribute__((format(printf, 3, 4))) static bool sfail(struct sctx *c,
                                                        const char *path,
                                                        const char *fmt, ...) {
  if (c->failed) return false;
  c->failed = true;
  char msg[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  tn_error_set(c->err, TN_EINVAL, "json schema%s%s: %s",
               path && *path ? " at " : "", path && *path ? path : "", msg);
  return false;
}

static void new_rule(struct sctx *c, char name[64], const char *hint) {
  snprintf(name, 64, "%.40s-%u", hint, c->n_rules++);
}

static bool gen(struct sctx *c, json_t *s, const char *path, char out[64]);

/* Compact JSON text of a value (enum / const literals). */
static char *dump(const json_t *v) {
  return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);
}

static bool gen_literals(struct sctx *c, json_t **vals, size_t n,
                         const char *path, char out[64]) {
  struct lit *v = calloc(n ? n : 1, sizeof *v);
  char **texts = calloc(n ? n : 1, sizeof *texts);
  bool ok = v && texts;
  for (size_t i = 0; ok && i < n; i++) {
    texts[i] = dump(vals[i]);
    if (!texts[i])
      ok = false;
    else
      v[i] = (struct lit){texts[i], strlen(texts[i])};
  }
  if (!ok) {
    for (size_t i = 0; texts && i < n; i++) free(texts[i]);
    free(texts);
    free(v);
    return sfail(c, path, "out of memory");
  }
  struct tn_buf expr = {0};
  char prefix[64];
  new_rule(c, prefix, "enum");
  lits(&c->rules, prefix, &c->lit_counter, v, n, &expr);
  snprintf(out, 64, "%s", prefix);
  tn_buf_printf(&c->rules, "%s ::= %s\n", out, expr.data ? expr.data : "");
  tn_buf_free(&expr);
  for (size_t i = 0; i < n; i++) free(texts[i]);
  free(texts);
  free(v);
  return true;
}

/* ---- integers in a range */

/* Appends the digits pattern for same-length decimal strings lo..hi. */
static void digits_range(struct tn_buf *b, const char *lo, const char *hi,
                         size_t n) {
  if (n == 0) return;
  if (n == 1) {
    if (lo[0] == hi[0])
      tn_buf_printf(b, "\"%c\"", lo[0]);
    else
      tn_buf_printf(b, "[%c-%c]", lo[0], hi[0]);
    return;
  }
  bool full = true;
  for (size_t i = 1; i < n && full; i++) full = lo[i] == '0' && hi[i] == '9';
  if (full) {
    if (lo[0] == hi[0])
      tn_buf_printf(b, "\"%c\" [0-9]{%zu}", lo[0], n - 1);
    else
      tn_buf_printf(b, "[%c-%c] [0-9]{%zu}", lo[0], hi[0], n - 1);
    return;
  }
  if (lo[0] == hi[0]) {
    tn_buf_printf(b, "\"%c\" ", lo[0]);
    digits_range(b, lo + 1, hi + 1, n - 1);
    return;
  }
  char nines[24], zeros[24];
  memset(nines, '9', n - 1);
  memset(zeros, '0', n - 1);
  tn_buf_append(b, "( ", 2);
  /* lo[0] then lo[1..] .. 99.. */
  tn_buf_printf(b, "\"%c\" ", lo[0]);
  digits_range(b, lo + 1, nines, n - 1);
  if (hi[0] - lo[0] > 1) {
    tn_buf_printf(b, " | [%c-%c] [0-9]{%zu}", lo[0] + 1, hi[0] - 1, n - 1);
  }
  tn_buf_printf(b, " | \"%c\" ", hi[0]);
  digits_range(b, zeros, hi + 1, n - 1);
  tn_buf_append(b, " )", 2);
}

/* Non-negative integers in [a, b] (b < 0: unbounded, up to 16 digits),
 * no leading zeros. */
static void nonneg_range(struct tn_buf *e, uint64_t a, int64_t b) {
  char sa[24], sb[24];
  int la = snprintf(sa, sizeof sa, "%llu", (unsigned long long)a);
  int lb = b >= 0 ? snprintf(sb, sizeof sb, "%lld", (long long)b) : la;
  int n_alts = 0;
  tn_buf_append(e, "( ", 2);
  for (int L = la; L <= lb; L++) {
    char lo[24], hi[24];
    if (L == la)
      memcpy(lo, sa, (size_t)L);
    else
      memset(lo, '0', (size_t)L), lo[0] = '1';
    if (b >= 0 && L == lb)
      memcpy(hi, sb, (size_t)L);
    else
      memset(hi, '9', (size_t)L);
    if (n_alts++) tn_buf_append(e, " | ", 3);
    digits_range(e, lo, hi, (size_t)L);
  }
  if (b < 0 && la < 16) /* longer numbers */
    tn_buf_printf(e, " | [1-9] [0-9]{%d,15}", la);
  tn_buf_append(e, " )", 2);
}

/* Integers in [lo, hi] (has_lo / has_hi say whether bounded). */
static void int_range(struct tn_buf *e, bool has_lo, int64_t lo, bool has_hi,
                      int64_t hi) {
  int n_alts = 0;
  tn_buf_append(e, "( ", 2);
  /* negative part: -x with x in [max(1, -hi), -lo] */
  if (!has_lo || lo < 0) {
    uint64_t nlo = (has_hi && hi < 0) ? (uint64_t)(-(hi + 1)) + 1 : 1;
    int64_t nhi = has_lo ? (int64_t)((uint64_t)(-(lo + 1)) + 1) : -1;
    if (has_lo && lo == INT64_MIN) nhi = INT64_MAX;
    tn_buf_append(e, "\"-\" ", 4);
    nonneg_range(e, nlo, nhi);
    n_alts++;
  }
  /* non-negative part */
  if (!has_hi || hi >= 0) {
    uint64_t plo = has_lo && lo > 0 ? (uint64_t)lo : 0;
    if (n_alts++) tn_buf_append(e, " | ", 3);
    nonneg_range(e, plo, has_hi ? hi : -1);
  }
  tn_buf_append(e, " )", 2);
}

static bool num_of(const json_t *v, double *d) {
  if (json_is_integer(v))
    *d = (double)json_integer_value(v);
  else if (json_is_real(v))
    *d = json_real_value(v);
  else
    return false;
  return isfinite(*d);
}

static bool gen_integer(struct sctx *c, json_t *s, const char *path,
                        char out[64]) {
  bool has_lo = false, has_hi = false;
  double lo = 0, hi = 0, d;
  json_t *v;
  const char *kw[4] = {"minimum", "exclusiveMinimum", "maximum",
                       "exclusiveMaximum"};
  for (int i = 0; i < 4; i++) {
    if (!(v = json_object_get(s, kw[i]))) continue;
    if (json_is_boolean(v))
      return sfail(c, path, "'%s' as a boolean (draft 4) is not supported",
                   kw[i]);
    if (!num_of(v, &d)) return sfail(c, path, "'%s' must be a number", kw[i]);
    if (i < 2) {
      double b = i == 0 ? ceil(d) : floor(d) + 1;
      if (!has_lo || b > lo) lo = b;
      has_lo = true;
    } else {
      double b = i == 2 ? floor(d) : ceil(d) - 1;
      if (!has_hi || b < hi) hi = b;
      has_hi = true;
    }
  }
  if (!has_lo && !has_hi) {
    c->use_integer = true;
    snprintf(out, 64, "integer");
    return true;
  }
  if (has_lo && has_hi && lo > hi)
    return sfail(c, path, "no integer lies in [%g, %g]", lo, hi);
  if ((has_lo && fabs(lo) > 9e18) || (has_hi && fabs(hi) > 9e18))
    return sfail(c, path, "integer bounds beyond 64 bits");
  struct tn_buf e = {0};
  int_range(&e, has_lo, (int64_t)lo, has_hi, (int64_t)hi);
  new_rule(c, out, "int");
  tn_buf_printf(&c->rules, "%s ::= %s\n", out, e.data);
  tn_buf_free(&e);
  return true;
}

#define FRAC_ANY "( \".\" [0-9]{1,16} )?"

/* A bound's absolute value as written in decimal (the shortest text that
 * reads back as the double): integer part and fraction digits, without
 * trailing zeros. */
struct dec {
  uint64_t i;
  char f[24];
  size_t nf;
};

static bool to_dec(double d, struct dec *out) {
  char e[48];
  int prec;
  d = fabs(d);
  for (prec = 1; prec <= 17; prec++) {
    snprintf(e, sizeof e, "%.*e", prec - 1, d);
    if (strtod(e, NULL) == d) break;
  }
  char digits[24];
  size_t nd = 0;
  const char *q = e;
  for (; *q && *q != 'e'; q++)
    if (*q >= '0' && *q <= '9' && nd < sizeof digits) digits[nd++] = *q;
  int x = atoi(q + 1); /* value = d0.d1d2... * 10^x */
  memset(out, 0, sizeof *out);
  if (x > 15) return false;
  for (int k = 0; k <= x; k++)
    out->i = out->i * 10 + (uint64_t)((size_t)k < nd ? digits[k] - '0' : 0);
  for (int k = x + 1; k < 0; k++) { /* leading fraction zeros */
    if (out->nf >= 15) return false;
    out->f[out->nf++] = '0';
  }
  for (size_t k = (size_t)(x + 1 > 0 ? x + 1 : 0); k < nd; k++) {
    if (out->nf >= 15) return false;
    out->f[out->nf++] = digits[k];
  }
  while (out->nf && out->f[out->nf - 1] == '0') out->nf--;
  return true;
}

/* A bound on fraction digits: compared as digit strings padded with
 * zeros, which is how fractions compare. */
struct fbound {
  const char *d;
  size_t n;
  bool excl;
};

/* Fraction digit strings s (s empty: no fraction, i.e. zero) with lo <= s
 * <= hi from digit i on, lo / hi NULL where no longer tight. Appends the
 * non-empty strings' alternatives to e; *empty_ok says whether the empty
 * one is allowed, *nonempty whether anything was appended. */
static void frac_alts(struct tn_buf *e, const struct fbound *lo,
                      const struct fbound *hi, size_t i, bool *empty_ok,
                      bool *nonempty) {
  bool lo_end = lo && i >= lo->n, hi_end = hi && i >= hi->n;
  /* no trailing zeros in bounds: a bound not yet at its end has a
   * non-zero digit left, so zeros are below it */
  *empty_ok = (!lo || (lo_end && !lo->excl)) && (!hi || !hi_end || !hi->excl);
  *nonempty = true;
  if (!lo && !hi) {
    tn_buf_printf(e, "[0-9]{1,16}");
    return;
  }
  if (lo_end && hi_end) { /* both zero from here: only zeros, if allowed */
    if (!lo->excl && !hi->excl) tn_buf_printf(e, "\"0\"{1,16}");
    else *nonempty = false;
    return;
  }
  if (lo_end && !hi) { /* s >= 0 (s > 0) */
    tn_buf_printf(e, lo->excl ? "\"0\"{0,15} [1-9] [0-9]{0,15}"
                              : "[0-9]{1,16}");
    return;
  }
  if (hi_end && !lo) { /* s <= 0: zeros (s < 0: nothing) */
    if (!hi->excl) tn_buf_printf(e, "\"0\"{1,16}");
    else *nonempty = false;
    return;
  }
  char a = lo ? (i < lo->n ? lo->d[i] : '0') : '0';
  char b = hi ? (i < hi->n ? hi->d[i] : '0') : '9';
  int n = 0;
  if (a <= b) {
    /* the digit that keeps each bound tight, then the free ones between */
    for (int side = 0; side < 3; side++) {
      const struct fbound *l2 = NULL, *h2 = NULL;
      char c0, c1;
      if (side == 0) { /* c == a: lo stays tight (and hi if a == b) */
        if (!lo) continue;
        c0 = c1 = a;
        l2 = lo;
        if (hi && a == b) h2 = hi;
      } else if (side == 1) { /* strictly between: anything after */
        c0 = lo ? (char)(a + 1) : a;
        c1 = hi ? (char)(b - 1) : b;
        if (c0 > c1) continue;
        tn_buf_printf(e, "%s[%c-%c] [0-9]{0,15}", n++ ? " | " : "", c0, c1);
        continue;
      } else { /* c == b: hi stays tight */
        if (!hi || (lo && a == b)) continue;
        c0 = c1 = b;
        h2 = hi;
      }
      struct tn_buf sub = {0};
      bool eo, ne;
      frac_alts(&sub, l2, h2, i + 1, &eo, &ne);
      if (eo || ne) {
        tn_buf_printf(e, "%s\"%c\"", n++ ? " | " : "", c0);
        /* X{1,16} optional is X{0,16} (simpler, and what other GBNF
         * readers, llguidance's converter among them, take) */
        size_t sl = ne ? strlen(sub.data) : 0;
        if (ne && eo && sl > 6 && !strchr(sub.data, ' ') &&
            !strcmp(sub.data + sl - 6, "{1,16}"))
          tn_buf_printf(e, " %.*s{0,16}", (int)(sl - 6), sub.data);
        else if (ne)
          tn_buf_printf(e, eo ? " ( %s )?" : " ( %s )", sub.data);
      }
      tn_buf_free(&sub);
      (void)c1;
    }
  }
  *nonempty = n > 0;
}

/* One alternative: the integer part written out, then a fraction between
 * the bounds (NULL: free on that side); nothing when none fits. */
static int int_and_frac(struct tn_buf *e, int n, uint64_t i,
                        const struct fbound *lo, const struct fbound *hi) {
  struct tn_buf f = {0};
  bool eo, ne;
  frac_alts(&f, lo, hi, 0, &eo, &ne);
  if (eo || ne) {
    tn_buf_printf(e, "%s( \"%llu\"", n ? " | " : "", (unsigned long long)i);
    if (ne) tn_buf_printf(e, eo ? " ( \".\" ( %s ) )?" : " \".\" ( %s )",
                          f.data);
    tn_buf_append(e, " )", 2);
    n++;
  }
  tn_buf_free(&f);
  return n;
}

/* Numbers y >= 0 written without a sign, with L <= y (L < y when l_excl)
 * and, when H, y <= H (y < H when h_excl): an integer part and a
 * fraction. Appends alternatives to e (" | " between them); returns how
 * many. */
static int nonneg_number(struct tn_buf *e, const struct dec *L, bool l_excl,
                         const struct dec *H, bool h_excl) {
  int n = 0;
  struct fbound lo = {L->f, L->nf, l_excl};
  if (H && H->i < L->i) return 0;
  if (H && H->i == L->i) {
    struct fbound hi = {H->f, H->nf, h_excl};
    return int_and_frac(e, 0, L->i, &lo, &hi);
  }
  n = int_and_frac(e, n, L->i, &lo, NULL);
  uint64_t A = L->i + 1;
  if (!H || A + 1 <= H->i) { /* whole integers strictly between */
    tn_buf_printf(e, "%s( ", n++ ? " | " : "");
    nonneg_range(e, A, H ? (int64_t)(H->i - 1) : -1);
    tn_buf_printf(e, " %s )", FRAC_ANY);
  }
  if (H) {
    struct fbound hi = {H->f, H->nf, h_excl};
    n = int_and_frac(e, n, H->i, NULL, &hi);
  }
  return n;
}

/* Numbers with bounds, written without an exponent so the digits tell the
 * value; bounds as their shortest decimal text (0.1 is 0.1), up to 1e15
 * with at most 15 fraction digits. */
static bool gen_number(struct sctx *c, json_t *s, const char *path,
                       char out[64]) {
  const char *kw[4] = {"minimum", "exclusiveMinimum", "maximum",
                       "exclusiveMaximum"};
  bool has_lo = false, has_hi = false, lo_x = false, hi_x = false;
  double lo = 0, hi = 0, d;
  for (int i = 0; i < 4; i++) {
    json_t *v = json_object_get(s, kw[i]);
    if (!v) continue;
    if (json_is_boolean(v))
      return sfail(c, path, "'%s' as a boolean (draft 4) is not supported",
                   kw[i]);
    if (!num_of(v, &d)) return sfail(c, path, "'%s' must be a number", kw[i]);
    struct dec t;
    if (fabs(d) > 1e15 || !to_dec(d, &t))
      return sfail(c, path,
                   "'%s' %.17g on a number: bounds up to 1e15 with at most "
                   "15 fraction digits are supported",
                   kw[i], d);
    bool excl = i == 1 || i == 3;
    if (i < 2) {
      if (!has_lo || d > lo || (d == lo && excl)) lo = d, lo_x = excl;
      has_lo = true;
    } else {
      if (!has_hi || d < hi || (d == hi && excl)) hi = d, hi_x = excl;
      has_hi = true;
    }
  }
  if (!has_lo && !has_hi) {
    c->use_number = true;
    snprintf(out, 64, "number");
    return true;
  }
  struct dec zero = {0}, dlo = {0}, dhi = {0};
  if (has_lo) to_dec(lo, &dlo);
  if (has_hi) to_dec(hi, &dhi);
  struct tn_buf e = {0};
  int n = 0;
  tn_buf_append(&e, "( ", 2);
  /* negative values: "-" y with max(0, -hi) <= y <= -lo */
  if (!has_lo || lo < 0) {
    bool l_excl = false;
    const struct dec *L = &zero;
    if (has_hi && hi <= 0) L = &dhi, l_excl = hi_x;
    struct tn_buf neg = {0};
    int k = nonneg_number(&neg, L, l_excl, has_lo ? &dlo : NULL, lo_x);
    if (k) {
      tn_buf_printf(&e, "\"-\" ( %s )", neg.data);
      n++;
    }
    tn_buf_free(&neg);
  }
  /* values >= 0 */
  if (!has_hi || hi > 0 || (hi == 0 && !hi_x)) {
    const struct dec *L = has_lo && lo > 0 ? &dlo : &zero;
    bool l_excl = has_lo && lo >= 0 && lo_x;
    struct tn_buf pos = {0};
    int k = nonneg_number(&pos, L, l_excl, has_hi ? &dhi : NULL, hi_x);
    if (k) {
      tn_buf_printf(&e, "%s( %s )", n ? " | " : "", pos.data);
      n++;
    }
    tn_buf_free(&pos);
  }
  tn_buf_append(&e, " )", 2);
  if (n == 0) {
    tn_buf_free(&e);
    return sfail(c, path, "no number lies within the bounds");
  }
  new_rule(c, out, "num");
  tn_buf_printf(&c->rules, "%s ::= %s\n", out, e.data);
  tn_buf_free(&e);
  return !c->rules.oom;
}

/* ---- strings */

static bool gen_string(struct sctx *c, json_t *s, const char *path,
                       char out[64]) {
  json_t *v;
  const char *fmt = json_string_value(json_object_get(s, "format"));
  json_t *pat = json_object_get(s, "pattern");
  json_t *mn = json_object_get(s, "minLength"),
         *mx = json_object_get(s, "maxLength");
  if (fmt) {
    if (pat || mn || mx)
      return sfail(c, path,
                   "'format' together with pattern or lengths is "
                   "not supported");
    const char *body = NULL;
    if (strcmp(fmt, "date") == 0)
      body =
          "[0-9]{4} \"-\" ( \"0\" [1-9] | \"1\" [0-2] ) \"-\" "
          "( \"0\" [1-9] | [1-2] [0-9] | \"3\" [0-1] )";
    else if (strcmp(fmt, "time") == 0)
      body =
          "( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" [0-5] "
          "[0-9] ( \".\" [0-9]{1,6} )? ( \"Z\" | [+-] ( [01] [0-9] | "
          "\"2\" [0-3] ) \":\" [0-5] [0-9] )";
    else if (strcmp(fmt, "date-time") == 0)
      body =
          "[0-9]{4} \"-\" ( \"0\" [1-9] | \"1\" [0-2] ) \"-\" "
          "( \"0\" [1-9] | [1-2] [0-9] | \"3\" [0-1] ) \"T\" "
          "( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" [0-5] "
          "[0-9] ( \".\" [0-9]{1,6} )? ( \"Z\" | [+-] ( [01] [0-9] | "
          "\"2\" [0-3] ) \":\" [0-5] [0-9] )";
    else if (strcmp(fmt, "uuid") == 0)
      body =
          "[0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} "
          "\"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{12}";
    else
      return sfail(c, path,
                   "string format '%s' is not supported (date, "
                   "time, date-time, uuid are)",
                   fmt);
    new_rule(c, out, fmt);
    tn_buf_printf(&c->rules, "%s ::= \"\\\"\" %s \"\\\"\"\n", out, body);
    return true;
  }
  if (pat) {
    if (!json_is_string(pat))
      return sfail(c, path, "'pattern' must be a string");
    if (mn || mx)
      return sfail(c, path,
                   "'pattern' together with minLength/maxLength "
                   "is not supported");
    struct tn_error e2;
    new_rule(c, out, "pattern");
    if (tn_regex_gbnf(json_string_value(pat), json_string_length(pat), out,
                      true, &c->rules, &e2) != TN_OK)
      return sfail(c, path, "pattern: %s", e2.msg);
    tn_buf_printf(&c->rules, "%s ::= \"\\\"\" %s-root \"\\\"\"\n", out, out);
    return true;
  }
  double lo = 0, hi = -1, d;
  if (mn) {
    if (!num_of(mn, &d) || d < 0 || d != floor(d))
      return sfail(c, path, "'minLength' must be a non-negative integer");
    lo = d;
  }
  if (mx) {
    if (!num_of(mx, &d) || d < 0 || d != floor(d))
      return sfail(c, path, "'maxLength' must be a non-negative integer");
    hi = d;
  }
  if (hi >= 0 && hi < lo) return sfail(c, path, "maxLength is below minLength");
  if (lo > TN_GRAMMAR_MAX_REPEAT || hi > TN_GRAMMAR_MAX_REPEAT)
    return sfail(c, path, "string lengths over %d are not supported",
                 TN_GRAMMAR_MAX_REPEAT);
  (void)v;
  c->use_char = true;
  if (!mn && !mx) {
    c->use_string = true;
    snprintf(out, 64, "string");
    return true;
  }
  new_rule(c, out, "str");
  if (hi >= 0)
    tn_buf_printf(&c->rules, "%s ::= \"\\\"\" char{%.0f,%.0f} \"\\\"\"\n", out,
                  lo, hi);
  else
    tn_buf_printf(&c->rules, "%s ::= \"\\\"\" char{%.0f,} \"\\\"\"\n", out, lo);
  return true;
}

/* ---- arrays and objects */

static bool count_kw(struct sctx *c, json_t *s, const char *kw,
                     const char *path, double *out, bool *has) {
  json_t *v = json_object_get(s, kw);
  *has = v != NULL;
  if (!v) return true;
  double d;
  if (!num_of(v, &d) || d < 0 || d != floor(d))
    return sfail(c, path, "'%s' must be a non-negative integer", kw);
  if (d > TN_GRAMMAR_MAX_REPEAT)
    return sfail(c, path, "'%s' over %d is not supported", kw,
                 TN_GRAMMAR_MAX_REPEAT);
  *out = d;
  return true;
}

static bool gen_array(struct sctx *c, json_t *s, const char *path,
                      char out[64]) {
  double lo = 0, hi = 0;
  bool has_lo, has_hi;
  if (!count_kw(c, s, "minItems", path, &lo, &has_lo) ||
      !count_kw(c, s, "maxItems", path, &hi, &has_hi))
    return false;
  if (has_hi && hi < lo) return sfail(c, path, "maxItems is below minItems");
  json_t *u = json_object_get(s, "uniqueItems");
  if (u && json_is_true(u))
    return sfail(c, path, "'uniqueItems' is not supported");
  json_t *items = json_object_get(s, "items");
  json_t *prefix = json_object_get(s, "prefixItems");
  if (prefix && !json_is_array(prefix))
    return sfail(c, path, "'prefixItems' must be an array");
  char sub[512];
  /* the rule for items after the prefix ("" when none are allowed) */
  char item[64] = "value";
  bool more = true;
  if (items && json_is_false(items)) {
    more = false;
  } else if (items && !json_is_true(items)) {
    if (json_is_array(items))
      return sfail(c, path,
                   "'items' as an array (draft 4 tuples) is not "
                   "supported; use prefixItems");
    snprintf(sub, sizeof sub, "%s/items", path);
    if (!gen(c, items, sub, item)) return false;
  } else {
    c->use_value = true;
  }
  size_t n_pre = prefix ? json_array_size(prefix) : 0;
  char(*pre)[64] = n_pre ? calloc(n_pre, 64) : NULL;
  if (n_pre && !pre) return sfail(c, path, "out of memory");
  for (size_t i = 0; i < n_pre; i++) {
    snprintf(sub, sizeof sub, "%s/prefixItems/%zu", path, i);
    if (!gen(c, json_array_get(prefix, i), sub, pre[i])) {
      free(pre);
      return false;
    }
  }
  new_rule(c, out, "array");
  struct tn_buf e = {0};
  /* element k (0-based): prefix rule or item; the list is
   * "[" ws ( e0 ( "," ws e1 ( ... )? )? )? "]" with counts honoured */
  size_t min = (size_t)lo;
  size_t max = has_hi ? (size_t)hi : SIZE_MAX;
  if (!more && max > n_pre) max = n_pre;
  if (min > max) {
    free(pre);
    tn_buf_free(&e);
    return sfail(c, path, "minItems above what the array can hold");
  }
  tn_buf_printf(&e, "\"[\" ws ");
  /* the prefix elements, each possibly the last */
  size_t k = 0;
  int open = 0;
  for (; k < n_pre && k < max; k++) {
    if (k >= min) { /* optional from here on: this one and the rest */
      tn_buf_append(&e, "( ", 2);
      open++;
    }
    if (k) tn_buf_append(&e, "\",\" ws ", 7);
    tn_buf_printf(&e, "%s ws ", pre[k]);
  }
  if (k < max && more) {
    /* the rest: items, at least min - k, at most max - k */
    size_t need = min > k ? min - k : 0;
    bool first = k == 0;
    for (size_t i = 0; i < need; i++, k++) {
      if (!(first && i == 0)) tn_buf_append(&e, "\",\" ws ", 7);
      tn_buf_printf(&e, "%s ws ", item);
    }
    bool none_yet = first && need == 0;
    if (max == SIZE_MAX) {
      if (none_yet)
        tn_buf_printf(&e, "( %s ws ( \",\" ws %s ws )* )? ", item, item);
      else
        tn_buf_printf(&e, "( \",\" ws %s ws )* ", item);
    } else if (max > k) {
      size_t extra = max - k;
      if (none_yet && extra == 1) {
        tn_buf_printf(&e, "( %s ws )? ", item);
      } else if (none_yet) {
        tn_buf_printf(&e, "( %s ws ( \",\" ws %s ws ){0,%zu} )? ", item, item,
                      extra - 1);
      } else {
        tn_buf_printf(&e, "( \",\" ws %s ws ){0,%zu} ", item, extra);
      }
    }
  }
  for (int i = 0; i < open; i++) tn_buf_append(&e, ")? ", 3);
  tn_buf_append(&e, "\"]\"", 3);
  tn_buf_printf(&c->rules, "%s ::= %s\n", out, e.data);
  tn_buf_free(&e);
  free(pre);
  return !c->rules.oom;
}

/* ---- keys of extra properties: any but the declared ones
 *
 * An extra property must not repeat a declared name, or the document's
 * meaning changes (parsers keep the last value, which need not fit the
 * declared schema). Extra keys are spelled one way only (raw characters,
 * the short escapes \" \\ \b \f \n \r \t; no \u, no \/), so every key has
 * one spelling and a trie of the declared names' spellings can exclude
 * exactly them: at each node, end the string (unless a name ends there),
 * take a character no name continues with and then anything, or follow a
 * name's next character. */

struct ktrie {
  uint32_t unit; /* a code point, or 0x80000000 | escape letter */
  bool end;
  size_t first_child, next; /* indexes + 1; 0: none */
};

#define KT_ESC 0x80000000u

static size_t kt_child(struct ktrie **t, size_t *n, size_t *cap, size_t node,
                       uint32_t unit) {
  for (size_t k = (*t)[node].first_child; k; k = (*t)[k - 1].next)
    if ((*t)[k - 1].unit == unit) return k - 1;
  if (*n == *cap) {
    size_t nc = *cap * 2;
    struct ktrie *v = realloc(*t, nc * sizeof *v);
    if (!v) return SIZE_MAX;
    *t = v;
    *cap = nc;
  }
  size_t id = (*n)++;
  (*t)[id] = (struct ktrie){.unit = unit, .next = (*t)[node].first_child};
  (*t)[node].first_child = id + 1;
  return id;
}

static void put_unit(struct tn_buf *b, uint32_t u) {
  char t[8];
  size_t n = 0;
  if (u & KT_ESC) {
    t[n++] = '\\';
    t[n++] = (char)(u & 0xFF);
  } else if (u < 0x80) {
    t[n++] = (char)u;
  } else if (u < 0x800) {
    t[n++] = (char)(0xC0 | (u >> 6));
    t[n++] = (char)(0x80 | (u & 63));
  } else if (u < 0x10000) {
    t[n++] = (char)(0xE0 | (u >> 12));
    t[n++] = (char)(0x80 | ((u >> 6) & 63));
    t[n++] = (char)(0x80 | (u & 63));
  } else {
    t[n++] = (char)(0xF0 | (u >> 18));
    t[n++] = (char)(0x80 | ((u >> 12) & 63));
    t[n++] = (char)(0x80 | ((u >> 6) & 63));
    t[n++] = (char)(0x80 | (u & 63));
  }
  gbnf_literal(b, t, n);
}

static bool gen_extra_key(struct sctx *c, const char *obj,
                          const char *const *names, size_t n_names,
                          char out[64]) {
  size_t cap = 64, n = 1;
  struct ktrie *t = calloc(cap, sizeof *t);
  if (!t) return sfail(c, "", "out of memory");
  for (size_t i = 0; i < n_names; i++) {
    const uint8_t *p = (const uint8_t *)names[i];
    size_t len = strlen(names[i]), node = 0;
    bool spellable = true;
    for (size_t at = 0; at < len && spellable;) {
      uint32_t cp;
      size_t l = tn_utf8_decode(p + at, len - at, &cp);
      if (!l) {
        spellable = false;
        break;
      }
      at += l;
      uint32_t unit = cp;
      switch (cp) {
      case '"': unit = KT_ESC | '"'; break;
      case '\\': unit = KT_ESC | '\\'; break;
      case '\b': unit = KT_ESC | 'b'; break;
      case '\f': unit = KT_ESC | 'f'; break;
      case '\n': unit = KT_ESC | 'n'; break;
      case '\r': unit = KT_ESC | 'r'; break;
      case '\t': unit = KT_ESC | 't'; break;
      default:
        if (cp < 0x20) spellable = false; /* needs \u: never an extra key */
      }
      if (!spellable) break;
      node = kt_child(&t, &n, &cap, node, unit);
      if (node == SIZE_MAX) {
        free(t);
        return sfail(c, "", "out of memory");
      }
    }
    if (spellable) t[node].end = true;
  }
  snprintf(out, 64, "%s-xkey", obj);
  tn_buf_printf(&c->rules, "%s-xc ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" [\"\\\\bfnrt]\n",
                obj);
  for (size_t v = 0; v < n; v++) {
    tn_buf_printf(&c->rules, "%s-k%zu ::= ", obj, v);
    int alts = 0;
    if (!t[v].end) {
      tn_buf_append(&c->rules, "\"\\\"\"", 4);
      alts++;
    }
    /* a character no declared name continues with, then anything */
    tn_buf_printf(&c->rules, "%s( [^\"\\\\\\x00-\\x1F", alts++ ? " | " : "");
    char escs[8] = "\"\\bfnrt";
    for (size_t k = t[v].first_child; k; k = t[k - 1].next) {
      uint32_t u = t[k - 1].unit;
      if (u & KT_ESC) {
        char *e = strchr(escs, (int)(u & 0xFF));
        if (e) memmove(e, e + 1, strlen(e));
      } else if (u < 0x80) {
        tn_buf_printf(&c->rules, "\\x%02X", u);
      } else { /* the character itself, as UTF-8 */
        char b8[4];
        size_t l = u < 0x800 ? 2 : u < 0x10000 ? 3 : 4;
        for (size_t q = l; q-- > 1;) b8[q] = (char)(0x80 | (u & 63)), u >>= 6;
        b8[0] = (char)((l == 2 ? 0xC0 : l == 3 ? 0xE0 : 0xF0) | u);
        tn_buf_append(&c->rules, b8, l);
      }
    }
    tn_buf_append(&c->rules, "]", 1);
    if (*escs) {
      tn_buf_printf(&c->rules, " | \"\\\\\" [");
      for (const char *e = escs; *e; e++)
        tn_buf_printf(&c->rules, "%s%c", *e == '"' || *e == '\\' ? "\\" : "",
                      *e);
      tn_buf_append(&c->rules, "]", 1);
    }
    tn_buf_printf(&c->rules, " ) %s-xc* \"\\\"\"", obj);
    /* a declared name's next character */
    for (size_t k = t[v].first_child; k; k = t[k - 1].next) {
      tn_buf_append(&c->rules, " | ", 3);
      put_unit(&c->rules, t[k - 1].unit);
      tn_buf_printf(&c->rules, " %s-k%zu", obj, k - 1);
    }
    tn_buf_append(&c->rules, "\n", 1);
  }
  free(t);
  return !c->rules.oom;
}

static bool gen_object(struct sctx *c, json_t *s, const char *path,
                       char out[64]) {
  static const char *const refused[] = {
      "patternProperties", "propertyNames",        "minProperties",
      "maxProperties",     "dependentRequired",    "dependentSchemas",
      "dependencies",      "unevaluatedProperties"};
  for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
    if (json_object_get(s, refused[i]))
      return sfail(c, path, "'%s' is not supported", refused[i]);
  json_t *props = json_object_get(s, "properties");
  json_t *req = json_object_get(s, "required");
  json_t *addl = json_object_get(s, "additionalProperties");
  if (props && !json_is_object(props))
    return sfail(c, path, "'properties' must be an object");
  if (req && !json_is_array(req))
    return sfail(c, path, "'required' must be an array");
  size_t n = props ? json_object_size(props) : 0;
  /* extra properties: a rule for their values, or none */
  char extra[64] = "";
  char sub[512];
  if (addl && !json_is_boolean(addl)) {
    snprintf(sub, sizeof sub, "%s/additionalProperties", path);
    if (!gen(c, addl, sub, extra)) return false;
  } else if ((addl && json_is_true(addl)) || (!addl && !props)) {
    c->use_value = true;
    snprintf(extra, sizeof extra, "value");
  }
  if (*extra) c->use_string = c->use_char = true;
  /* required names must be declared properties (else the output could
   * not hold them with the values we generate) */
  for (size_t i = 0; req && i < json_array_size(req); i++) {
    const char *r = json_string_value(json_array_get(req, i));
    if (!r) return sfail(c, path, "'required' must list strings");
    if (!props || !json_object_get(props, r)) {
      if (!*extra)
        return sfail(c, path,
                     "required property '%s' is not in "
                     "'properties'",
                     r);
      return sfail(c, path,
                   "required property '%s' without a declared "
                   "schema is not supported",
                   r);
    }
  }
  const char **names = calloc(n + 1, sizeof *names);
  char(*vals)[64] = calloc(n + 1, 64);
  bool *required = calloc(n + 1, sizeof *required);
  if (!names || !vals || !required) {
    free(names);
    free(vals);
    free(required);
    return sfail(c, path, "out of memory");
  }
  size_t i = 0;
  const char *key;
  json_t *val;
  bool ok = true;
  json_object_foreach(props, key, val) {
    names[i] = key;
    for (size_t j = 0; req && j < json_array_size(req); j++)
      if (strcmp(json_string_value(json_array_get(req, j)), key) == 0)
        required[i] = true;
    snprintf(sub, sizeof sub, "%s/properties/%s", path, key);
    if (!gen(c, val, sub, vals[i])) {
      ok = false;
      break;
    }
    i++;
  }
  if (!ok) {
    free(names);
    free(vals);
    free(required);
    return false;
  }
  new_rule(c, out, "object");
  /* kv_i: "\"name\"" ws ":" ws value_i */
  char(*kv)[64] = calloc(n + 1, 64);
  if (!kv) {
    free(names);
    free(vals);
    free(required);
    return sfail(c, path, "out of memory");
  }
  for (i = 0; i < n; i++) {
    snprintf(kv[i], 64, "%s-kv%zu", out, i);
    json_t *ks = json_string(names[i]);
    char *kt = ks ? dump(ks) : NULL;
    json_decref(ks);
    if (!kt) {
      ok = false;
      break;
    }
    tn_buf_printf(&c->rules, "%s ::= ", kv[i]);
    gbnf_literal(&c->rules, kt, strlen(kt));
    tn_buf_printf(&c->rules, " ws \":\" ws %s\n", vals[i]);
    free(kt);
  }
  /* after_i: what may follow once something up to property i was
   * written; first_i: property i onwards when nothing was written yet.
   * Optional extras come last. */
  char ex[64] = "";
  if (ok && *extra) {
    snprintf(ex, sizeof ex, "%s-extra", out);
    char xkey[64] = "string";
    if (n > 0 && !gen_extra_key(c, out, names, n, xkey)) ok = false;
    if (ok && n > 0)
      tn_buf_printf(&c->rules, "%s ::= \"\\\"\" %s-k0 ws \":\" ws %s\n", ex,
                    out, extra);
    else if (ok)
      tn_buf_printf(&c->rules, "%s ::= string ws \":\" ws %s\n", ex, extra);
  }
  for (i = n + 1; ok && i-- > 0;) {
    /* after-i (i in 0..n): following properties i..n-1 */
    tn_buf_printf(&c->rules, "%s-after%zu ::= ", out, i);
    if (i == n) {
      if (*ex)
        tn_buf_printf(&c->rules, "( \",\" ws %s ws )*", ex);
      else
        tn_buf_append(&c->rules, "\"\"", 2);
    } else if (required[i]) {
      tn_buf_printf(&c->rules, "\",\" ws %s ws %s-after%zu", kv[i], out, i + 1);
    } else {
      tn_buf_printf(&c->rules, "( \",\" ws %s ws )? %s-after%zu", kv[i], out,
                    i + 1);
    }
    tn_buf_append(&c->rules, "\n", 1);
    /* first-i */
    tn_buf_printf(&c->rules, "%s-first%zu ::= ", out, i);
    if (i == n) {
      if (*ex)
        tn_buf_printf(&c->rules, "( %s ws %s-after%zu )?", ex, out, n);
      else
        tn_buf_append(&c->rules, "\"\"", 2);
    } else if (required[i]) {
      tn_buf_printf(&c->rules, "%s ws %s-after%zu", kv[i], out, i + 1);
    } else {
      tn_buf_printf(&c->rules, "%s ws %s-after%zu | %s-first%zu", kv[i], out,
                    i + 1, out, i + 1);
    }
    tn_buf_append(&c->rules, "\n", 1);
  }
  if (ok)
    tn_buf_printf(&c->rules, "%s ::= \"{\" ws %s-first0 \"}\"\n", out, out);
  free(kv);
  free(names);
  free(vals);
  free(required);
  return ok ? !c->rules.oom : sfail(c, path, "out of memory");
}

/* ---- $ref */

static json_t *resolve(struct sctx *c, const char *ref) {
  if (strcmp(ref, "#") == 0) return c->root;
  if (strncmp(ref, "#/", 2) != 0) return NULL;
  json_t *cur = c->root;
  const char *p = ref + 2;
  char seg[256];
  while (*p && cur) {
    size_t n = 0;
    while (*p && *p != '/') {
      if (n + 1 >= sizeof seg) return NULL;
      if (p[0] == '~' && p[1] == '1')
        seg[n++] = '/', p += 2;
      else if (p[0] == '~' && p[1] == '0')
        seg[n++] = '~', p += 2;
      else
        seg[n++] = *p++;
    }
    seg[n] = 0;
    if (*p == '/') p++;
    if (json_is_object(cur)) {
      cur = json_object_get(cur, seg);
    } else if (json_is_array(cur)) {
      char *end;
      unsigned long k = strtoul(seg, &end, 10);
      cur = *end ? NULL : json_array_get(cur, k);
    } else {
      cur = NULL;
    }
  }
  return cur;
}

static bool gen_ref(struct sctx *c, const char *ref, const char *path,
                    char out[64]) {
  for (size_t i = 0; i < c->n_refs; i++)
    if (strcmp(c->refs[i].path, ref) == 0) {
      snprintf(out, 64, "%s", c->refs[i].name);
      return true;
    }
  json_t *target = resolve(c, ref);
  if (!target)
    return sfail(c, path,
                 "$ref '%.200s' does not resolve (local refs "
                 "like #/$defs/Name only)",
                 ref);
  if (c->n_refs == c->cap_refs) {
    size_t nc = c->cap_refs ? c->cap_refs * 2 : 8;
    struct ref *r = realloc(c->refs, nc * sizeof *r);
    if (!r) return sfail(c, path, "out of memory");
    c->refs = r;
    c->cap_refs = nc;
  }
  struct ref *r = &c->refs[c->n_refs];
  r->path = strdup(ref);
  if (!r->path) return sfail(c, path, "out of memory");
  new_rule(c, r->name, "ref");
  c->n_refs++;
  snprintf(out, 64, "%s", r->name);
  char name[64];
  snprintf(name, sizeof name, "%s", r->name);
  char body[64];
  if (!gen(c, target, ref, body)) return false;
  tn_buf_printf(&c->rules, "%s ::= %s\n", name, body);
  return true;
}

/* ---- one schema */

static const char *const known_annotations[] = {
    "title", "description",      "default",         "examples", "$schema",
    "$id",   "$comment",         "deprecated",      "readOnly", "writeOnly",
    "$defs", "definitions",      "discriminator",   "example",  "strict",
    "name",  "contentMediaType", "contentEncoding", "$anchor"};

static const char *const handled[] = {"type",
                                      "enum",
                                      "const",
                                      "anyOf",
                                      "oneOf",
                                      "allOf",
                                      "$ref",
                                      "nullable",
                                      "properties",
                                      "required",
                                      "additionalProperties",
                                      "items",
                                      "prefixItems",
                                      "minItems",
                                      "maxItems",
                                      "uniqueItems",
                                      "minimum",
                                      "maximum",
                                      "exclusiveMinimum",
                                      "exclusiveMaximum",
                                      "minLength",
                                      "maxLength",
                                      "pattern",
                                      "format",
                                      "patternProperties",
                                      "propertyNames",
                                      "minProperties",
                                      "maxProperties",
                                      "dependentRequired",
                                      "dependentSchemas",
                                      "dependencies",
                                      "unevaluatedProperties"};

static bool known_keyword(const char *k) {
  for (size_t i = 0; i < sizeof handled / sizeof *handled; i++)
    if (strcmp(handled[i], k) == 0) return true;
  for (size_t i = 0; i < sizeof known_annotations / sizeof *known_annotations;
       i++)
    if (strcmp(known_annotations[i], k) == 0) return true;
  return false;
}

static bool gen_type(struct sctx *c, json_t *s, const char *t, const char *path,
                     char out[64]) {
  if (strcmp(t, "string") == 0) return gen_string(c, s, path, out);
  if (strcmp(t, "integer") == 0) return gen_integer(c, s, path, out);
  if (strcmp(t, "number") == 0) return gen_number(c, s, path, out);
  if (strcmp(t, "object") == 0) return gen_object(c, s, path, out);
  if (strcmp(t, "array") == 0) return gen_array(c, s, path, out);
  if (strcmp(t, "boolean") == 0) {
    c->use_boolean = true;
    snprintf(out, 64, "boolean");
    return true;
  }
  if (strcmp(t, "null") == 0) {
    c->use_null = true;
    snprintf(out, 64, "null");
    return true;
  }
  return sfail(c, path, "unknown type '%.60s'", t);
}

static bool gen_alts(struct sctx *c, json_t *list, const char *kw,
                     const char *path, char out[64]) {
  if (!json_is_array(list) || json_array_size(list) == 0)
    return sfail(c, path, "'%s' must be a non-empty array", kw);
  size_t n = json_array_size(list);
  char(*names)[64] = calloc(n, 64);
  if (!names) return sfail(c, path, "out of memory");
  char sub[512];
  for (size_t i = 0; i < n; i++) {
    snprintf(sub, sizeof sub, "%s/%s/%zu", path, kw, i);
    if (!gen(c, json_array_get(list, i), sub, names[i])) {
      free(names);
      return false;
    }
  }
  new_rule(c, out, kw);
  tn_buf_printf(&c->rules, "%s ::= ", out);
  for (size_t i = 0; i < n; i++)
    tn_buf_printf(&c->rules, "%s%s", i ? " | " : "", names[i]);
  tn_buf_append(&c->rules, "\n", 1);
  free(names);
  return true;
}

static bool gen(struct sctx *c, json_t *s, const char *path, char out[64]) {
  if (c->failed) return false;
  if (json_is_true(s) || (json_is_object(s) && json_object_size(s) == 0)) {
    c->use_value = true;
    snprintf(out, 64, "value");
    return true;
  }
  if (json_is_false(s)) return sfail(c, path, "schema 'false' allows nothing");
  if (!json_is_object(s)) return sfail(c, path, "a schema must be an object");
  if (++c->depth > MAX_SCHEMA_DEPTH) {
    c->depth--;
    return sfail(c, path, "nested over %d deep", MAX_SCHEMA_DEPTH);
  }
  bool ok = false;
  const char *k;
  json_t *v;
  json_object_foreach(s, k, v) {
    if (!known_keyword(k)) {
      c->depth--;
      return sfail(c, path, "keyword '%.60s' is not supported", k);
    }
  }
  json_t *nullable = json_object_get(s, "nullable");
  bool add_null = nullable && json_is_true(nullable);
  char body[64];
  json_t *ref = json_object_get(s, "$ref");
  json_t *en = json_object_get(s, "enum");
  json_t *cn = json_object_get(s, "const");
  json_t *any = json_object_get(s, "anyOf");
  json_t *one = json_object_get(s, "oneOf");
  json_t *all = json_object_get(s, "allOf");
  json_t *type = json_object_get(s, "type");
  if (ref) {
    if (!json_is_string(ref)) {
      ok = sfail(c, path, "'$ref' must be a string");
    } else {
      size_t others = 0;
      json_object_foreach(s, k, v) {
        bool annotation = strcmp(k, "$ref") == 0;
        for (size_t i = 0; !annotation && i < sizeof known_annotations /
                                                  sizeof *known_annotations;
             i++)
          annotation = strcmp(k, known_annotations[i]) == 0;
        if (!annotation) others++;
      }
      if (others)
        ok = sfail(c, path,
                   "'$ref' next to other keywords is not "
                   "supported");
      else
        ok = gen_ref(c, json_string_value(ref), path, body);
    }
  } else if (cn) {
    json_t *vals[1] = {cn};
    ok = gen_literals(c, vals, 1, path, body);
  } else if (en) {
    if (!json_is_array(en) || json_array_size(en) == 0) {
      ok = sfail(c, path, "'enum' must be a non-empty array");
    } else {
      size_t n = json_array_size(en);
      json_t **vals = malloc(n * sizeof *vals);
      if (!vals) {
        ok = sfail(c, path, "out of memory");
      } else {
        for (size_t i = 0; i < n; i++) vals[i] = json_array_get(en, i);
        ok = gen_literals(c, vals, n, path, body);
        free(vals);
      }
    }
  } else if (any || one) {
    if (type)
      ok = sfail(c, path,
                 "'%s' next to 'type' is not supported; put the "
                 "type inside each alternative",
                 any ? "anyOf" : "oneOf");
    else
      ok = gen_alts(c, any ? any : one, any ? "anyOf" : "oneOf", path, body);
  } else if (all) {
    if (!json_is_array(all) || json_array_size(all) != 1)
      ok = sfail(c, path,
                 "'allOf' with more than one schema is not "
                 "supported");
    else
      ok = gen(c, json_array_get(all, 0), path, body);
  } else if (json_is_string(type)) {
    ok = gen_type(c, s, json_string_value(type), path, body);
  } else if (json_is_array(type) && json_array_size(type) > 0) {
    size_t n = json_array_size(type);
    char(*names)[64] = calloc(n, 64);
    ok = names != NULL;
    for (size_t i = 0; ok && i < n; i++) {
      const char *t = json_string_value(json_array_get(type, i));
      ok = t ? gen_type(c, s, t, path, names[i])
             : sfail(c, path, "'type' must list strings");
    }
    if (ok) {
      new_rule(c, body, "types");
      tn_buf_printf(&c->rules, "%s ::= ", body);
      for (size_t i = 0; i < n; i++)
        tn_buf_printf(&c->rules, "%s%s", i ? " | " : "", names[i]);
      tn_buf_append(&c->rules, "\n", 1);
    }
    free(names);
  } else if (type) {
    ok = sfail(c, path, "'type' must be a string or an array of strings");
  } else if (json_object_get(s, "properties") ||
             json_object_get(s, "additionalProperties")) {
    ok = gen_object(c, s, path, body);
  } else if (json_object_get(s, "items") || json_object_get(s, "prefixItems")) {
    ok = gen_array(c, s, path, body);
  } else {
    c->use_value = true;
    snprintf(body, sizeof body, "value");
    ok = true;
  }
  c->depth--;
  if (!ok) return false;
  if (add_null) {
    c->use_null = true;
    new_rule(c, out, "nullable");
    tn_buf_printf(&c->rules, "%s ::= %s | null\n", out, body);
  } else {
    snprintf(out, 64, "%s", body);
  }
  return true;
}

static void shared_rules(struct sctx *c) {
  struct tn_buf *b = &c->rules;
  if (c->use_value)
    c->use_object = c->use_array = c->use_string = c->use_number =
        c->use_boolean = c->use_null = true;
  if (c->use_string) c->use_char = true;
  tn_buf_printf(b, "ws ::= [ \\t\\n]{0,20}\n");
  if (c->use_value)
    tn_buf_printf(b,
                  "value ::= object | array | string | number | "
                  "boolean | null\n");
  if (c->use_object)
    tn_buf_printf(b,
                  "object ::= \"{\" ws ( string ws \":\" ws value ws "
                  "( \",\" ws string ws \":\" ws value ws )* )? \"}\"\n");
  if (c->use_array)
    tn_buf_printf(b,
                  "array ::= \"[\" ws ( value ws ( \",\" ws value ws )* "
                  ")? \"]\"\n");
  if (c->use_string) tn_buf_printf(b, "string ::= \"\\\"\" char* \"\\\"\"\n");
  if (c->use_char)
    tn_buf_printf(b,
                  "char ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( "
                  "[\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4} )\n");
  if (c->use_number)
    tn_buf_printf(b,
                  "number ::= \"-\"? ( \"0\" | [1-9] [0-9]{0,15} ) "
                  "( \".\" [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?\n");
  if (c->use_integer)
    tn_buf_printf(b, "integer ::= \"-\"? ( \"0\" | [1-9] [0-9]{0,15} )\n");
  if (c->use_boolean) tn_buf_printf(b, "boolean ::= \"true\" | \"false\"\n");
  if (c->use_null) tn_buf_printf(b, "null ::= \"null\"\n");
}

enum tn_status tn_json_schema_to_gbnf(const char *schema, size_t len,
                                      char **out, struct tn_error *err) {
  *out = NULL;
  struct sctx c = {.err = err};
  char top[64];
  if (!schema) {
    c.use_value = true;
    snprintf(top, sizeof top, "object");
  } else {
    json_error_t je;
    c.root = json_loadb(schema, len, JSON_DECODE_ANY, &je);
    if (!c.root)
      return tn_error_set(err, TN_EINVAL, "json schema: not JSON: %s", je.text);
    gen(&c, c.root, "", top);
  }
  if (!c.failed) {
    tn_buf_printf(&c.rules, "root ::= %s\n", top);
    shared_rules(&c);
  }
  json_decref(c.root);
  for (size_t i = 0; i < c.n_refs; i++) free(c.refs[i].path);
  free(c.refs);
  if (c.failed) {
    tn_buf_free(&c.rules);
    return err->status;
  }
  if (c.rules.oom) {
    tn_buf_free(&c.rules);
    return tn_error_set(err, TN_ENOMEM, "json schema: out of memory");
  }
  *out = c.rules.data;
  return TN_OK;
}

enum tn_status tn_grammar_from_json_schema(const char *schema, size_t len,
                                           struct tn_grammar **out,
                                           struct tn_error *err) {
  *out = NULL;
  char *g = NULL;
  enum tn_status st = tn_json_schema_to_gbnf(schema, len, &g, err);
  if (st != TN_OK) return st;
  st = tn_grammar_from_gbnf(g, strlen(g), out, err);
  free(g);
  return st;
}
