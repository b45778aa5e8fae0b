/*
 * test_grammar.c: GBNF, regex, choices and JSON schemas compiled and
 * matched byte by byte; refusals; token masks against a brute-force
 * check of every token on a real vocabulary.
 */
#include <unistd.h>

#include "gguf/gguf.h"
#include "grammar/grammar.h"
#include "tn_test.h"
#include "tokenizer/tokenizer.h"

#ifndef TN_SOURCE_DIR
#define TN_SOURCE_DIR "."
#endif

static struct tn_grammar *gbnf(const char *text) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  if (tn_grammar_from_gbnf(text, strlen(text), &g, &err) != TN_OK)
    fprintf(stderr, "  gbnf: %s\n", err.msg);
  return g;
}

/* Whether the whole of s is a sentence of g. */
static bool matches(struct tn_grammar *g, const char *s, size_t n) {
  struct tn_grammar_matcher *m = NULL;
  struct tn_error err = {0};
  if (tn_grammar_matcher_new(g, NULL, &m, &err) != TN_OK) return false;
  bool ok =
      tn_grammar_matcher_accept_bytes(m, s, n) && tn_grammar_matcher_can_end(m);
  tn_grammar_matcher_free(m);
  return ok;
}
#define MATCH(g, s) matches(g, s, strlen(s))

static void test_gbnf_basics(void) {
  struct tn_grammar *g = gbnf(
      "root ::= greeting (\" \" name)? \"!\"{1,3}\n"
      "greeting ::= \"hi\" | \"hello\"   # comment\n"
      "name ::= [A-Z] [a-z]*\n");
  ASSERT(g);
  ASSERT(MATCH(g, "hi!"));
  ASSERT(MATCH(g, "hello Bob!!!"));
  ASSERT(!MATCH(g, "hello Bob!!!!"));
  ASSERT(!MATCH(g, "hello bob!"));
  ASSERT(!MATCH(g, "hi"));
  ASSERT(!MATCH(g, "hey!"));
  tn_grammar_release(g);

  /* UTF-8 classes: negation, ranges beyond ASCII, any char */
  g = gbnf("root ::= [^a-c]+ \"|\" [α-ω] . \"é\"");
  ASSERT(g);
  ASSERT(MATCH(g, "xyz€|βxé"));
  ASSERT(MATCH(g, "日本|ω😀é"));
  ASSERT(!MATCH(g, "abc|βxé"));
  ASSERT(!MATCH(g, "x|Axé"));
  /* bytes that are not UTF-8 never match a class */
  ASSERT(!MATCH(g, "\xff|βxé"));
  tn_grammar_release(g);

  /* right recursion stays flat; nesting deepens */
  g = gbnf("root ::= item*\nitem ::= \"(\" item* \")\" | \"x\"");
  ASSERT(g);
  ASSERT(MATCH(g, ""));
  ASSERT(MATCH(g, "x(x(x))()"));
  ASSERT(!MATCH(g, "x(x(x)"));
  char deep[3000];
  for (int i = 0; i < 1000; i++) deep[i] = '(', deep[1000 + i] = ')';
  ASSERT(matches(g, deep, 2000));
  char long_flat[20000];
  memset(long_flat, 'x', sizeof long_flat);
  ASSERT(matches(g, long_flat, sizeof long_flat));
  tn_grammar_release(g);
}

static void expect_refused(const char *text, const char *needle) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  enum tn_status st = tn_grammar_from_gbnf(text, strlen(text), &g, &err);
  if (st == TN_OK) fprintf(stderr, "  compiled: %s\n", text);
  ASSERT_NE(st, TN_OK);
  ASSERT(g == NULL);
  ASSERT_SUBSTR(err.msg, needle);
}

static void test_gbnf_refusals(void) {
  expect_refused("root ::= a\na ::= a \"x\" | \"y\"", "recurse");
  expect_refused("root ::= (\"x\"?)*", "recurse");
  expect_refused("root ::= b c\nb ::= \"\"?\nc ::= root", "recurse");
  expect_refused("root ::= undefined-rule", "undefined rule 'undefined-rule'");
  expect_refused("start ::= \"x\"", "no 'root'");
  expect_refused("root ::= \"x\"\nroot ::= \"y\"", "defined twice");
  expect_refused("root ::= \"unterminated", "unterminated");
  expect_refused("root ::= [a-", "unterminated");
  expect_refused("root ::= [z-a]", "out of order");
  expect_refused("root ::= \"x\"{3,2}", "max below min");
  expect_refused("root ::= \"x\"{99999}", "over");
  expect_refused("root ::= (\"x\"", "unclosed");
  expect_refused("root ::= \"x\" )", "unmatched");
  expect_refused("root ::= \"\\q\"", "unknown escape");
  expect_refused("= nonsense", "expected a rule");
  /* nested repetition shares rules instead of copying: small, and fine */
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  const char *nested = "root ::= ((((\"ab\"{1000}){1000}){1000}){1000})";
  ASSERT_EQ(tn_grammar_from_gbnf(nested, strlen(nested), &g, &err), TN_OK);
  ASSERT(!MATCH(g, "abab"));
  tn_grammar_release(g);
}

static struct tn_grammar *from_schema(const char *schema) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  if (tn_grammar_from_json_schema(schema, schema ? strlen(schema) : 0, &g,
                                  &err) != TN_OK)
    fprintf(stderr, "  schema: %s\n", err.msg);
  return g;
}

static void test_json_object(void) {
  struct tn_grammar *g = from_schema(NULL);
  ASSERT(g);
  ASSERT(MATCH(g, "{}"));
  ASSERT(MATCH(
      g, "{\"a\": [1, 2.5e3, -0.5, true, null, {\"b\": \"\\u00e9\\n\"}]}"));
  ASSERT(MATCH(g, "{\n  \"k\": \"v\"\n}"));
  ASSERT(!MATCH(g, "[]"));
  ASSERT(!MATCH(g, "{\"a\": 01}"));
  ASSERT(!MATCH(g, "{\"a\": \"raw\nnewline\"}"));
  ASSERT(!MATCH(g, "{\"a\": \"bad \\x escape\"}"));
  ASSERT(!MATCH(g, "{'a': 1}"));
  ASSERT(!MATCH(g, "{\"a\": 1,}"));
  tn_grammar_release(g);
}

static void test_schema(void) {
  struct tn_grammar *g = from_schema(
      "{\"type\":\"object\",\"properties\":{"
      "\"name\":{\"type\":\"string\",\"minLength\":2,\"maxLength\":5},"
      "\"age\":{\"type\":\"integer\",\"minimum\":18,\"maximum\":130},"
      "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"ab\",\"b\",7]}"
      ","
      "\"minItems\":1,\"maxItems\":2},"
      "\"kind\":{\"const\":\"person\"},"
      "\"when\":{\"type\":\"string\",\"format\":\"date\"},"
      "\"nick\":{\"anyOf\":[{\"type\":\"null\"},{\"type\":\"boolean\"}]}},"
      "\"required\":[\"name\",\"age\"]}");
  ASSERT(g);
  ASSERT(MATCH(g, "{\"name\": \"Al\", \"age\": 18}"));
  ASSERT(MATCH(g,
               "{\"name\":\"Alice\",\"age\":130,\"tags\":[\"ab\",7],"
               "\"kind\":\"person\",\"when\":\"2024-02-29\",\"nick\":null}"));
  ASSERT(MATCH(g, "{\"name\": \"Bob\", \"age\": 99, \"nick\": false}"));
  ASSERT(!MATCH(g, "{\"name\": \"A\", \"age\": 20}"));         /* too short */
  ASSERT(!MATCH(g, "{\"name\": \"Alexandra\", \"age\": 20}")); /* too long */
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 17}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 131}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20.5}"));
  ASSERT(!MATCH(g, "{\"age\": 20}")); /* required */
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"tags\": []}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"tags\": [1,2,3]}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"tags\": [\"c\"]}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"kind\": \"dog\"}"));
  ASSERT(
      !MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"when\": \"2024-13-01\"}"));
  ASSERT(!MATCH(g, "{\"name\": \"Al\", \"age\": 20, \"extra\": 1}"));
  tn_grammar_release(g);

  /* integer ranges across signs and digit counts */
  g = from_schema(
      "{\"type\":\"integer\",\"minimum\":-1234,"
      "\"exclusiveMaximum\":57}");
  ASSERT(g);
  char num[32];
  for (int v = -1300; v <= 100; v++) {
    snprintf(num, sizeof num, "%d", v);
    bool want = v >= -1234 && v < 57;
    if (MATCH(g, num) != want) {
      TN_FAIL_NORETURN("integer %d: matched %d, want %d", v, !want, want);
      break;
    }
  }
  ASSERT(!MATCH(g, "-0"));
  ASSERT(!MATCH(g, "007"));
  tn_grammar_release(g);
  g = from_schema("{\"type\":\"integer\",\"minimum\":100}");
  ASSERT(g);
  ASSERT(MATCH(g, "100") && MATCH(g, "999") && MATCH(g, "123456789"));
  ASSERT(!MATCH(g, "99") && !MATCH(g, "-100"));
  tn_grammar_release(g);

  /* $ref with recursion, prefixItems, additionalProperties schema */
  g = from_schema(
      "{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{"
      "\"v\":{\"type\":\"integer\"},\"kids\":{\"type\":\"array\",\"items\":"
      "{\"$ref\":\"#/$defs/node\"}}},\"required\":[\"v\"]}},"
      "\"$ref\":\"#/$defs/node\"}");
  ASSERT(g);
  ASSERT(
      MATCH(g, "{\"v\": 1, \"kids\": [{\"v\": 2}, {\"v\": 3, \"kids\": []}]}"));
  ASSERT(!MATCH(g, "{\"v\": 1, \"kids\": [{}]}"));
  tn_grammar_release(g);
  g = from_schema(
      "{\"type\":\"array\",\"prefixItems\":[{\"type\":\"string\"},"
      "{\"type\":\"number\"}],\"items\":false,\"minItems\":1}");
  ASSERT(g);
  ASSERT(MATCH(g, "[\"a\"]") && MATCH(g, "[\"a\", 2.5]"));
  ASSERT(!MATCH(g, "[]") && !MATCH(g, "[\"a\", 2, 3]") && !MATCH(g, "[2]"));
  tn_grammar_release(g);
  g = from_schema(
      "{\"type\":\"object\",\"additionalProperties\":"
      "{\"type\":\"integer\"}}");
  ASSERT(g);
  ASSERT(MATCH(g, "{}") && MATCH(g, "{\"x\": 1, \"y\": -2}"));
  ASSERT(!MATCH(g, "{\"x\": \"s\"}"));
  tn_grammar_release(g);

  /* pattern: JSON-escaped text of a value matching the regex */
  g = from_schema(
      "{\"type\":\"string\",\"pattern\":\"^[a-z]+\\\"?\\\\d{2}$\"}");
  ASSERT(g);
  ASSERT(MATCH(g, "\"abc12\""));
  ASSERT(MATCH(g, "\"abc\\\"12\""));
  ASSERT(!MATCH(g, "\"abc\"12\""));
  ASSERT(!MATCH(g, "\"abc1\""));
  tn_grammar_release(g);
  g = from_schema("{\"type\":\"string\",\"pattern\":\"x\"}"); /* unanchored */
  ASSERT(g);
  ASSERT(MATCH(g, "\"x\"") && MATCH(g, "\"a x b\"") && !MATCH(g, "\"ab\""));
  tn_grammar_release(g);
}

/* Extra properties never repeat a declared name, however it is spelled. */
static void test_extra_keys(void) {
  struct tn_grammar *g = from_schema(
      "{\"type\":\"object\",\"properties\":{\"ab\":{\"type\":\"integer\"},"
      "\"a\\\"c\":{\"type\":\"string\"},\"\u00e9\":{\"type\":\"null\"}},"
      "\"additionalProperties\":{\"type\":\"boolean\"}}");
  ASSERT(g);
  static const struct {
    const char *doc;
    bool ok;
  } cases[] = {
      {"{\"ab\": 1, \"x\": true}", true},
      {"{\"ab\": 1, \"abc\": true, \"a\": false, \"\": true}", true},
      {"{\"x\": true}", true},
      {"{\"ab\": 1, \"ab\": true}", false},
      {"{\"ab\": true}", false},
      {"{\"a\\\"c\": \"s\", \"a\\\"c\": true}", false},
      {"{\"a\\\"c\": \"s\", \"a\\\"cd\": true}", true},
      {"{\"\xc3\xa9\": null, \"x\": false}", true},
      {"{\"\xc3\xa8\": true}", true},
      {"{\"\xc3\xa9\": null, \"\xc3\xa9\": false}", false},
      {"{\"ab\": 1, \"a\\u0062\": true}", false}, /* no \u in extra keys */
      {"{\"ab\": 1, \"a\\/\": true}", false},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    if (MATCH(g, cases[i].doc) != cases[i].ok)
      TN_FAIL_NORETURN("%s: matched %d", cases[i].doc, !cases[i].ok);
  }
  tn_grammar_release(g);
}

/* Number bounds: every short decimal matches iff its value is inside. */
static void check_number_bounds(const char *schema, double lo, bool lo_x,
                                double hi, bool hi_x) {
  struct tn_grammar *g = from_schema(schema);
  ASSERT(g);
  static const char *const fr[] = {
      "",     ".0",   ".5",   ".00",  ".25",  ".001", ".1",   ".2",
      ".3",   ".35",  ".4",   ".499", ".75",  ".05",  ".125", ".14",
      ".145", ".15",  ".151", ".9",   ".99",  ".999", ".0001", ".50",
      ".1000", ".01", ".049", ".051"};
  char num[64];
  for (int i = -12; i <= 12; i++)
    for (size_t f = 0; f < sizeof fr / sizeof *fr; f++)
      for (int neg = 0; neg < 2; neg++) {
        if (i < 0 && neg) continue;
        int a = i < 0 ? -i : i;
        snprintf(num, sizeof num, "%s%d%s", (i < 0 || neg) ? "-" : "", a,
                 fr[f]);
        double v = atof(num);
        if (v == 0 && num[0] == '-') continue; /* "-0": never written */
        bool want = (lo_x ? v > lo : v >= lo) && (hi_x ? v < hi : v <= hi);
        if (MATCH(g, num) != want) {
          TN_FAIL_NORETURN("%s: %s matched %d, want %d", schema, num, !want,
                           want);
          tn_grammar_release(g);
          return;
        }
      }
  ASSERT(!MATCH(g, "1e2"));
  tn_grammar_release(g);
}

static void test_number_bounds(void) {
  check_number_bounds("{\"type\":\"number\",\"minimum\":0,\"maximum\":1}",
                      0, false, 1, false);
  check_number_bounds(
      "{\"type\":\"number\",\"exclusiveMinimum\":-3,\"maximum\":7}", -3,
      true, 7, false);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":-10,\"exclusiveMaximum\":-2}",
      -10, false, -2, true);
  check_number_bounds("{\"type\":\"number\",\"exclusiveMaximum\":0}", -1e18,
                      false, 0, true);
  check_number_bounds("{\"type\":\"number\",\"minimum\":5}", 5, false, 1e18,
                      false);
  check_number_bounds(
      "{\"type\":\"number\",\"exclusiveMinimum\":2,\"maximum\":3}", 2,
      true, 3, false);
  /* bounds with fractions */
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":0.5,\"maximum\":1.5}", 0.5, false,
      1.5, false);
  check_number_bounds(
      "{\"type\":\"number\",\"exclusiveMinimum\":0.25,"
      "\"maximum\":2.75}",
      0.25, true, 2.75, false);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":-1.25,\"exclusiveMaximum\":"
      "-0.125}",
      -1.25, false, -0.125, true);
  check_number_bounds("{\"type\":\"number\",\"minimum\":0.001}", 0.001,
                      false, 1e18, false);
  check_number_bounds("{\"type\":\"number\",\"maximum\":0.35}", -1e18,
                      false, 0.35, false);
  check_number_bounds(
      "{\"type\":\"number\",\"exclusiveMinimum\":-0.5,"
      "\"exclusiveMaximum\":0.5}",
      -0.5, true, 0.5, true);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":3.14,\"maximum\":3.15}", 3.14,
      false, 3.15, false);
  check_number_bounds(
      "{\"type\":\"number\",\"exclusiveMinimum\":3.14,"
      "\"exclusiveMaximum\":3.15}",
      3.14, true, 3.15, true);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":-2.05,\"maximum\":-2.049}",
      -2.05, false, -2.049, false);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":0.1,\"maximum\":0.1}", 0.1,
      false, 0.1, false);
  check_number_bounds(
      "{\"type\":\"number\",\"minimum\":-7.5,\"maximum\":12.0001}",
      -7.5, false, 12.0001, false);
}

static void schema_refused(const char *schema, const char *needle) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  ASSERT_NE(tn_grammar_from_json_schema(schema, strlen(schema), &g, &err),
            TN_OK);
  ASSERT(g == NULL);
  ASSERT_SUBSTR(err.msg, needle);
}

static void test_schema_refusals(void) {
  schema_refused("{\"type\":\"string\",\"format\":\"email\"}", "email");
  schema_refused("{\"not\":{\"type\":\"string\"}}", "'not'");
  schema_refused("{\"type\":\"array\",\"uniqueItems\":true}", "uniqueItems");
  schema_refused("{\"type\":\"number\",\"minimum\":1e-20}",
                 "15 fraction digits");
  schema_refused("{\"type\":\"number\",\"maximum\":1e300}", "1e15");
  schema_refused("{\"type\":\"number\",\"exclusiveMinimum\":0,"
                 "\"exclusiveMaximum\":0.0e0}",
                 "no number");
  schema_refused("{\"$ref\":\"#/$defs/missing\"}", "does not resolve");
  schema_refused("{\"$ref\":\"http://example.com/s.json\"}",
                 "does not resolve");
  schema_refused("{\"type\":\"strng\"}", "unknown type");
  schema_refused(
      "{\"type\":\"object\",\"required\":[\"a\"],"
      "\"properties\":{\"b\":{}}}",
      "'a'");
  schema_refused("{\"type\":\"integer\",\"minimum\":5,\"maximum\":4}",
                 "no integer");
  schema_refused("{\"type\":\"string\",\"pattern\":\"(a\"}", "unclosed");
  schema_refused("{\"type\":\"string\",\"pattern\":\"(?=a)\"}", "lookaround");
  schema_refused("{\"type\":\"string\",\"pattern\":\"(a)\\\\1\"}",
                 "backreference");
  schema_refused("[1,2", "not JSON");
  schema_refused("false", "allows nothing");
  /* nesting past the bound */
  char deep[4096];
  size_t n = 0;
  for (int i = 0; i < 100; i++)
    n += (size_t)snprintf(deep + n, sizeof deep - n, "{\"items\":");
  n += (size_t)snprintf(deep + n, sizeof deep - n, "{}");
  for (int i = 0; i < 100; i++) deep[n++] = '}';
  deep[n] = 0;
  schema_refused(deep, "nested");
}

static void test_regex_and_choices(void) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  const char *re = "(\\+\\d{1,3} )?\\(?\\d{3}\\)?[-. ]?\\d{3}[-.]\\d{4}|N/A";
  ASSERT_EQ(tn_grammar_from_regex(re, strlen(re), &g, &err), TN_OK);
  ASSERT(MATCH(g, "(555) 123-4567") && MATCH(g, "+1 555.123.4567"));
  ASSERT(MATCH(g, "N/A") && !MATCH(g, "555-1234") && !MATCH(g, "n/a"));
  tn_grammar_release(g);
  re = "[^\\d\\s]{2}\\w*.";
  ASSERT_EQ(tn_grammar_from_regex(re, strlen(re), &g, &err), TN_OK);
  ASSERT(MATCH(g, "ab_9!") && MATCH(g, "éx😀"));
  ASSERT(!MATCH(g, "a1x!") && !MATCH(g, "ab\n"));
  tn_grammar_release(g);

  const char *ch[] = {"positive", "negative", "neutral", "neg", "日本"};
  size_t lens[5];
  for (int i = 0; i < 5; i++) lens[i] = strlen(ch[i]);
  ASSERT_EQ(tn_grammar_from_choices(ch, lens, 5, &g, &err), TN_OK);
  for (int i = 0; i < 5; i++) ASSERT(MATCH(g, ch[i]));
  ASSERT(!MATCH(g, "nega") && !MATCH(g, "neutrals") && !MATCH(g, ""));
  /* forced text: after "neu" the rest is decided */
  struct tn_grammar_matcher *m = NULL;
  ASSERT_EQ(tn_grammar_matcher_new(g, NULL, &m, &err), TN_OK);
  char buf[64];
  bool completes = false;
  ASSERT_EQ(tn_grammar_matcher_forced(m, buf, sizeof buf, &completes), 0);
  ASSERT(tn_grammar_matcher_accept_bytes(m, "neu", 3));
  size_t n = tn_grammar_matcher_forced(m, buf, sizeof buf, &completes);
  ASSERT_EQ(n, 4);
  ASSERT(completes);
  ASSERT(memcmp(buf, "tral", 4) == 0);
  ASSERT(!tn_grammar_matcher_done(m));
  ASSERT(tn_grammar_matcher_accept_bytes(m, buf, n));
  ASSERT(tn_grammar_matcher_done(m));
  /* a rejected byte changes nothing */
  ASSERT(!tn_grammar_matcher_accept_bytes(m, "x", 1));
  ASSERT(tn_grammar_matcher_done(m));
  tn_grammar_matcher_free(m);
  tn_grammar_release(g);

  /* a large enum stays one path (a trie), not a stack per literal */
  static char words[5000][12];
  const char *wp[5000];
  size_t wl[5000];
  for (int i = 0; i < 5000; i++) {
    snprintf(words[i], sizeof words[i], "w%d", i * 7);
    wp[i] = words[i];
    wl[i] = strlen(words[i]);
  }
  ASSERT_EQ(tn_grammar_from_choices(wp, wl, 5000, &g, &err), TN_OK);
  ASSERT(MATCH(g, "w34993") && MATCH(g, "w0") && !MATCH(g, "w1"));
  tn_grammar_release(g);

  const char *bad[] = {"a{2", "[b-a]", "x**", "(?<=a)b", "a\\b", "a^b", "\\k"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    g = NULL;
    enum tn_status st = tn_grammar_from_regex(bad[i], strlen(bad[i]), &g, &err);
    if (st == TN_OK) TN_FAIL_NORETURN("regex %s compiled", bad[i]);
    tn_grammar_release(g);
  }
}

/* ---- masks on a real vocabulary */

static struct tn_tokenizer *load_tok(const char *file) {
  char path[1024];
  snprintf(path, sizeof path, TN_SOURCE_DIR "/models/%s", file);
  if (access(path, R_OK) != 0) {
    tn_test_skip("%s not present", path);
    return NULL;
  }
  struct tn_error err = {0};
  struct tn_gguf *gg = NULL;
  if (tn_gguf_open(path, &gg, &err) != TN_OK) {
    TN_FAIL_NORETURN("open %s: %s", path, err.msg);
    return NULL;
  }
  struct tn_tokenizer *tok = NULL;
  if (tn_tokenizer_load(gg, &tok, &err) != TN_OK)
    TN_FAIL_NORETURN("tokenizer %s: %s", path, err.msg);
  tn_gguf_close(gg);
  if (tok) tn_test_ran();
  return tok;
}

/* Walks a pseudo-random path through g on vocabulary v, and at every
 * step checks the mask against feeding each token to a fresh matcher. */
static void check_masks(struct tn_grammar *g, struct tn_grammar_vocab *v,
                        const struct tn_tokenizer *tok, int steps,
                        uint32_t seed) {
  int32_t nv = tn_grammar_vocab_n(v);
  size_t words = ((size_t)nv + 63) / 64;
  uint64_t *bits = calloc(words, 8), *bits2 = calloc(words, 8);
  struct tn_grammar_matcher *m = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_grammar_matcher_new(g, v, &m, &err), TN_OK);
  char text[4096];
  size_t n_text = 0;
  for (int step = 0; step < steps; step++) {
    ASSERT_EQ(tn_grammar_matcher_mask(m, bits, &err), TN_OK);
    /* the cached mask is the same */
    ASSERT_EQ(tn_grammar_matcher_mask(m, bits2, &err), TN_OK);
    ASSERT(memcmp(bits, bits2, words * 8) == 0);
    int32_t allowed[4096];
    int n_allowed = 0;
    for (int32_t id = 0; id < nv; id++) {
      struct tn_grammar_matcher *f = NULL;
      ASSERT_EQ(tn_grammar_matcher_new(g, v, &f, &err), TN_OK);
      bool ok = tn_grammar_matcher_accept_bytes(f, text, n_text) &&
                tn_grammar_matcher_accept(f, id);
      tn_grammar_matcher_free(f);
      bool in = (bits[id >> 6] >> (id & 63)) & 1;
      if (ok != in) {
        char piece[256];
        size_t pn = tn_tokenizer_piece(tok, id, piece, sizeof piece, true);
        TN_FAIL_NORETURN("step %d token %d '%.*s': mask %d, brute force %d",
                         step, id, (int)(pn < 60 ? pn : 60), piece, in, ok);
        goto out;
      }
      if (ok && n_allowed < 4096 && !tn_tokenizer_is_eog(tok, id))
        allowed[n_allowed++] = id;
    }
    if (n_allowed == 0) break;
    seed = seed * 1664525u + 1013904223u;
    int32_t pick = allowed[(seed >> 8) % (uint32_t)n_allowed];
    char piece[256];
    size_t pn = tn_tokenizer_piece(tok, pick, piece, sizeof piece, false);
    ASSERT(tn_grammar_matcher_accept(m, pick));
    if (n_text + pn >= sizeof text) break;
    memcpy(text + n_text, piece, pn);
    n_text += pn;
  }
out:
  tn_grammar_matcher_free(m);
  free(bits);
  free(bits2);
}

static void test_masks_smollm2(void) {
  struct tn_tokenizer *tok = load_tok("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!tok) return;
  struct tn_grammar_vocab *v = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_grammar_vocab_new(tok, 64u << 20, &v, &err), TN_OK);
  struct tn_grammar *g = from_schema(
      "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},"
      "\"n\":{\"type\":\"integer\",\"minimum\":-5,\"maximum\":300},"
      "\"ok\":{\"type\":\"boolean\"},\"tags\":{\"type\":\"array\","
      "\"items\":{\"enum\":[\"red\",\"green\",\"re\"]}}},"
      "\"required\":[\"name\",\"n\",\"ok\",\"tags\"]}");
  ASSERT(g);
  int steps = getenv("TN_TEST_QUICK") ? 4 : 12;
  check_masks(g, v, tok, steps, 1);
  check_masks(g, v, tok, steps, 99);
  tn_grammar_release(g);
  const char *ch[] = {"yes", "no", "maybe not"};
  size_t lens[] = {3, 2, 9};
  ASSERT_EQ(tn_grammar_from_choices(ch, lens, 3, &g, &err), TN_OK);
  check_masks(g, v, tok, 6, 5);
  tn_grammar_release(g);
  struct tn_grammar_vocab_stats st;
  tn_grammar_vocab_stats(v, &st);
  ASSERT_GT(st.cache_hits, 0);
  tn_grammar_vocab_free(v);
  tn_tokenizer_free(tok);
}

TN_TEST_MAIN(TN_TEST(test_gbnf_basics), TN_TEST(test_gbnf_refusals),
             TN_TEST(test_json_object), TN_TEST(test_schema),
             TN_TEST(test_schema_refusals), TN_TEST(test_regex_and_choices),
             TN_TEST(test_number_bounds), TN_TEST(test_extra_keys),
             TN_TEST(test_masks_smollm2))
