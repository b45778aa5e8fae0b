/*
 * grammar_internal.h: the compiled grammar, shared by the compilers
 * (gbnf.c, regex.c, schema.c) and the matcher (match.c).
 *
 * A grammar is a list of rules; a rule a list of alternatives; an
 * alternative a sequence of elements ended by EL_END. All alternatives sit
 * one after another in code[], so a position in a grammar is one uint32
 * index into code[]. An element is a byte set (matches one byte in it) or
 * a rule reference. Code points, strings, classes and repetitions have all
 * been lowered to these two by the time a grammar is built.
 */
#ifndef TN_GRAMMAR_INTERNAL_H
#define TN_GRAMMAR_INTERNAL_H

#include <stdarg.h>
#include <stdatomic.h>

#include "grammar/grammar.h"

enum { EL_END = 0, EL_SET = 1, EL_RULE = 2 };
#define EL(kind, arg) (((uint32_t)(kind) << 30) | (uint32_t)(arg))
#define EL_KIND(e) ((e) >> 30)
#define EL_ARG(e) ((e)&0x3fffffffu)

struct tn_grammar {
  atomic_int refs;
  uint32_t *code; /* alternatives, each ended by EL_END */
  uint32_t n_code;
  uint32_t *alt_start; /* code index of each alternative */
  uint32_t *rule_alt;  /* [n_rules + 1]: rule r's alternatives are
                          alt_start[rule_alt[r] .. rule_alt[r + 1]) */
  uint32_t n_rules;
  uint64_t (*sets)[4]; /* 256-bit byte sets */
  uint32_t n_sets;
  uint32_t root;
  uint64_t fp[2]; /* fingerprint: mask cache key */
};

static inline bool set_has(const uint64_t *set, unsigned b) {
  return (set[b >> 6] >> (b & 63)) & 1;
}

/* Appends a GBNF string literal holding bytes s[0..n) ("...", escaped;
 * bytes outside printable ASCII as \xHH). */
void gbnf_literal(struct tn_buf *b, const char *s, size_t n);

/* Appends rules `<prefix>-root ::= ...` matching the regex (regex.c). In
 * json mode it matches the JSON string text (without its quotes) of a
 * value that the regex matches somewhere (JSON schema "pattern"
 * semantics: unanchored unless ^ / $ say otherwise). */
enum tn_status tn_regex_gbnf(const char *re, size_t len, const char *prefix,
                             bool json, struct tn_buf *out,
                             struct tn_error *err);

/* A hex digit's value, -1 if c is none. */
static inline int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* The one-letter escapes GBNF and regexes share (\n \r \t \f \v \0):
 * true and *cp set, or false. */
static inline bool simple_escape(char c, uint32_t *cp) {
  static const char from[] = "nrtfv0", to[] = "\n\r\t\f\v";
  for (int i = 0; i < 6; i++)
    if (from[i] == c) {
      *cp = i < 5 ? (uint32_t)(unsigned char)to[i] : 0;
      return true;
    }
  return false;
}

/* tn_utf8_decode on chars */
static inline size_t utf8_decode(const char *s, size_t n, uint32_t *cp) {
  return tn_utf8_decode((const uint8_t *)s, n, cp);
}

#endif /* TN_GRAMMAR_INTERNAL_H */
