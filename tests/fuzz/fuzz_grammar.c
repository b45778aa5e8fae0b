/*
 * fuzz_grammar.c: libFuzzer target for the grammar compilers (GBNF,
 * regular expressions, JSON schemas, choice lists) and the matcher.
 *
 * Input layout:
 *   byte 0   what the rest is: 0 GBNF, 1 regex, 2 JSON schema, 3 choices
 *            (separated by 0x1E), any other value: a JSON schema text
 *            with the JSON-object grammar (NULL schema) as well
 *   then     source 0x1F text-to-match
 *
 * Invariants, each a trap when broken:
 *  - compiling succeeds (a grammar) or fails (NULL, an error status and a
 *    message); it never takes unbounded time or memory;
 *  - the matcher starts; feeding the text in one call or byte by byte
 *    gives the same verdict, and a refused byte changes nothing (the next
 *    call still sees the same state: the verdict for the rest is the same
 *    as from a fresh matcher that took the accepted prefix);
 *  - forced() never writes past its cap, and its bytes are accepted;
 *  - done() implies can_end().
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_grammar
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "grammar/grammar.h"

#define CHECK(x)              \
  do {                        \
    if (!(x)) __builtin_trap(); \
  } while (0)

/* A failure says why (the message may quote the input's own bytes: the
 * API escapes it when it answers). */
static void printable(const struct tn_error *err) {
  CHECK(err->status != TN_OK);
  CHECK(err->msg[0] != 0);
  CHECK(memchr(err->msg, 0, sizeof err->msg) != NULL);
}

static void exercise(struct tn_grammar *g, const char *text, size_t n) {
  struct tn_error err = {0};
  struct tn_grammar_matcher *a = NULL, *b = NULL;
  if (tn_grammar_matcher_new(g, NULL, &a, &err) != TN_OK) {
    printable(&err);
    return;
  }
  CHECK(tn_grammar_matcher_new(g, NULL, &b, &err) == TN_OK);
  bool whole = tn_grammar_matcher_accept_bytes(a, text, n);
  size_t taken = 0;
  bool bytewise = true;
  for (size_t i = 0; i < n; i++) {
    if (!tn_grammar_matcher_accept_bytes(b, text + i, 1)) {
      bytewise = false;
      break;
    }
    taken++;
  }
  CHECK(whole == bytewise);
  if (whole) CHECK(tn_grammar_matcher_can_end(a) ==
                   tn_grammar_matcher_can_end(b));
  if (tn_grammar_matcher_done(b)) CHECK(tn_grammar_matcher_can_end(b));
  char buf[64 + 1];
  buf[64] = 0x5a;
  bool completes = false;
  size_t k = tn_grammar_matcher_forced(b, buf, 64, &completes);
  CHECK(k <= 64 && buf[64] == 0x5a);
  if (k > 0) CHECK(tn_grammar_matcher_accept_bytes(b, buf, k));
  if (completes) CHECK(tn_grammar_matcher_done(b));
  (void)taken;
  tn_grammar_matcher_free(a);
  tn_grammar_matcher_free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int mode = data[0];
  const char *src = (const char *)data + 1;
  size_t n = size - 1;
  const char *us = memchr(src, 0x1f, n);
  size_t src_n = us ? (size_t)(us - src) : n;
  const char *text = us ? us + 1 : src + n;
  size_t text_n = us ? n - src_n - 1 : 0;
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  enum tn_status st;
  if (mode == 0) {
    st = tn_grammar_from_gbnf(src, src_n, &g, &err);
  } else if (mode == 1) {
    st = tn_grammar_from_regex(src, src_n, &g, &err);
  } else if (mode == 3) {
    const char *items[64];
    size_t lens[64], k = 0;
    const char *p = src, *end = src + src_n;
    while (p <= end && k < 64) {
      const char *rs = memchr(p, 0x1e, (size_t)(end - p));
      const char *e = rs ? rs : end;
      items[k] = p;
      lens[k++] = (size_t)(e - p);
      if (!rs) break;
      p = rs + 1;
    }
    st = tn_grammar_from_choices(items, lens, k, &g, &err);
  } else {
    st = tn_grammar_from_json_schema(src, src_n, &g, &err);
    if (mode != 2) {
      struct tn_grammar *any = NULL;
      struct tn_error e2 = {0};
      CHECK(tn_grammar_from_json_schema(NULL, 0, &any, &e2) == TN_OK);
      exercise(any, text, text_n);
      tn_grammar_release(any);
    }
  }
  if (st != TN_OK) {
    CHECK(g == NULL);
    printable(&err);
    return 0;
  }
  CHECK(g != NULL);
  exercise(g, text, text_n);
  tn_grammar_release(g);
  return 0;
}
