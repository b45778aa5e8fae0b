/*
 * test_jinja.c: the Jinja interpreter's own contract: values built by the
 * caller, JSON in, limits and errors. Rendering semantics are compared
 * with jinja2 itself in tests/e2e/test_chat_templates.py; here are the
 * parts jinja2 cannot judge: every limit ends in its own clear error, the
 * builders and the context behave, and nothing leaks (ASan runs this).
 */
#include "jinja/jinja.h"
#include "tn_test.h"

/* Renders src with JSON variables (NULL: none) and small limits. */
static enum tn_status render(const char *src, const char *json, char **out,
                             size_t *n, struct tn_error *err) {
  struct tn_jinja *t = NULL;
  *out = NULL;
  enum tn_status st = tn_jinja_compile(src, strlen(src), &t, err);
  if (st) return st;
  struct tn_jinja_ctx *c = tn_jinja_ctx_new(0);
  if (json) {
    struct tn_jinja_val *v = NULL;
    st = tn_jinja_json(c, json, strlen(json), &v, err);
    if (!st) tn_jinja_set_all(c, v);
  }
  if (!st) {
    struct tn_jinja_limits lim;
    tn_jinja_limits_default(&lim);
    lim.max_steps = 1000000;
    lim.max_output = 1 << 20;
    lim.max_memory = 64 << 20;
    lim.max_depth = 32;
    lim.now = 86400 * 365;
    st = tn_jinja_render(t, c, &lim, out, n, err);
  }
  tn_jinja_ctx_free(c);
  tn_jinja_free(t);
  return st;
}

static void expect(const char *src, const char *json, const char *want) {
  char *out = NULL;
  size_t n = 0;
  struct tn_error err = {0};
  enum tn_status st = render(src, json, &out, &n, &err);
  if (st) fprintf(stderr, "%s: %s\n", src, err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(n, strlen(want));
  ASSERT_STR_EQ(out, want);
  free(out);
}

static void expect_error(const char *src, const char *json,
                         enum tn_status want, const char *needle) {
  char *out = NULL;
  size_t n = 0;
  struct tn_error err = {0};
  enum tn_status st = render(src, json, &out, &n, &err);
  if (st != want) fprintf(stderr, "%s: status %d (%s)\n", src, st, err.msg);
  ASSERT_EQ(st, want);
  ASSERT(out == NULL);
  ASSERT_SUBSTR(err.msg, needle);
}

static void test_basics(void) {
  expect("{{ a }}-{{ b | tojson }}", "{\"a\": 1.5, \"b\": {\"x\": [1, null]}}",
         "1.5-{\"x\": [1, null]}");
  expect("{% for m in messages %}{{ loop.index }}:{{ m.role }} {% endfor %}",
         "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"bot\"}]}",
         "1:user 2:bot ");
  expect("{{ strftime_now('%Y-%m-%d') }}", NULL, "1971-01-01");
  expect("a\n{% if x %}\n  b\n{% endif %}\nc\n", "{\"x\": true}",
         "a\n  b\nc"); /* trim_blocks, one trailing newline dropped */
  expect("{{ '\\u00e9\\n' | length }}", NULL, "2"); /* code points */
}

static void test_errors(void) {
  /* syntax: the line is named */
  expect_error("x\n{% if %}", NULL, TN_EINVAL, "line 2");
  expect_error("{% for x in y %}", NULL, TN_EINVAL, "endfor");
  expect_error("{{ x | nosuchfilter }}", "{\"x\": 1}", TN_EINVAL,
               "no filter named 'nosuchfilter'");
  /* raise_exception carries the template's text */
  expect_error("{{ raise_exception('roles must alternate') }}", NULL,
               TN_EINVAL, "roles must alternate");
  /* undefined use, unsafe attributes, mutating methods */
  expect_error("{{ x.y.z }}", NULL, TN_EINVAL, "'x' is undefined");
  expect_error("{{ ''.__class__.__mro__ }}", NULL, TN_EINVAL, "unsafe");
  expect_error("{% set l = [1] %}{{ l.append(2) }}", NULL, TN_EINVAL,
               "unsafe");
  expect_error("{{ 1 // 0 }}", NULL, TN_EINVAL, "division");
  expect_error("{{ 9223372036854775807 + 1 }}", NULL, TN_EINVAL, "overflow");
  /* bad JSON input */
  char *out = NULL;
  size_t n = 0;
  struct tn_error err = {0};
  ASSERT_EQ(render("{{ a }}", "{\"a\": [1, }", &out, &n, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "invalid JSON");
}

static void test_limits(void) {
  /* each limit ends in its own error, fast */
  expect_error("{% for i in range(100000) %}{% for j in range(100000) %}"
               "{% endfor %}{% endfor %}",
               NULL, TN_ERANGE, "steps");
  expect_error("{% for i in range(10**12) %}{% endfor %}", NULL, TN_ERANGE,
               "range too big");
  expect_error("{% for i in range(99999) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}"
               "{% endfor %}",
               NULL, TN_ERANGE, "output exceeds");
  expect_error("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
               "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
               NULL, TN_ERANGE, "limit");
  expect_error("{{ 'x' * 10**12 }}", NULL, TN_ERANGE, "limit");
  expect_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL,
               TN_ERANGE, "nested more than 32");
  /* deep nesting inside deep recursion: bounded before the C stack is */
  {
    char src2[4096];
    size_t o = 0;
    o += (size_t)snprintf(src2 + o, sizeof src2 - o,
                          "{%% macro f(n) %%}{{ ");
    for (int k = 0; k < 60; k++) src2[o++] = '[';
    o += (size_t)snprintf(src2 + o, sizeof src2 - o, "f(n + 1)");
    for (int k = 0; k < 60; k++) src2[o++] = ']';
    snprintf(src2 + o, sizeof src2 - o, " }}{%% endmacro %%}{{ f(0) }}");
    expect_error(src2, NULL, TN_ERANGE, "nested more than");
  }
  /* 100000 nested parentheses: refused by the parser's depth bound */
  size_t depth = 100000;
  char *src = malloc(2 * depth + 8);
  ASSERT(src != NULL);
  memcpy(src, "{{ ", 3);
  memset(src + 3, '(', depth);
  src[3 + depth] = '1';
  memset(src + 4 + depth, ')', depth);
  memcpy(src + 4 + 2 * depth, " }}", 4);
  expect_error(src, NULL, TN_EINVAL, "nested more than");
  free(src);
}

static void test_builders(void) {
  struct tn_jinja_ctx *c = tn_jinja_ctx_new(0);
  ASSERT(c != NULL);
  struct tn_jinja_val *l = tn_jinja_list(c);
  struct tn_jinja_val *d = tn_jinja_dict(c);
  tn_jinja_dict_set(c, d, "role", tn_jinja_str(c, "user", 4));
  tn_jinja_dict_set(c, d, "content", tn_jinja_str(c, "a\0b", 3));
  tn_jinja_dict_set(c, d, "role", tn_jinja_str(c, "system", 6)); /* replace */
  tn_jinja_list_append(c, l, d);
  tn_jinja_list_append(c, l, tn_jinja_int(c, -7));
  tn_jinja_set(c, "xs", l);
  tn_jinja_set(c, "flag", tn_jinja_bool(c, true));
  ASSERT_EQ(tn_jinja_list_len(l), 2);
  ASSERT(tn_jinja_is_dict(tn_jinja_list_get(l, 0)));
  ASSERT(tn_jinja_list_get(l, 2) == NULL);
  size_t n = 0;
  const char *role = tn_jinja_str_bytes(tn_jinja_dict_get(c, d, "role"), &n);
  ASSERT(role && n == 6 && memcmp(role, "system", 6) == 0);
  static const char src[] =
      "{{ xs[0].role }}|{{ xs[0].content | length }}|{{ xs[1] }}|{{ flag }}"
      "|{{ none_set is none }}";
  struct tn_jinja *t = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_jinja_compile(src, sizeof(src) - 1, &t, &err), TN_OK);
  ASSERT(tn_jinja_uses(t, "xs") && tn_jinja_uses(t, "flag"));
  ASSERT(!tn_jinja_uses(t, "tools"));
  tn_jinja_set(c, "none_set", tn_jinja_none(c));
  char *out = NULL;
  ASSERT_EQ(tn_jinja_render(t, c, NULL, &out, &n, &err), TN_OK);
  ASSERT_STR_EQ(out, "system|3|-7|True|True");
  free(out);
  /* the same template, rendered again with the same context */
  ASSERT_EQ(tn_jinja_render(t, c, NULL, &out, &n, &err), TN_OK);
  ASSERT_STR_EQ(out, "system|3|-7|True|True");
  free(out);
  tn_jinja_free(t);
  tn_jinja_ctx_free(c);
  /* a context whose memory runs out fails its render with ENOMEM */
  c = tn_jinja_ctx_new(1024);
  for (int i = 0; i < 100; i++)
    tn_jinja_set(c, "big", tn_jinja_str(c, src, sizeof(src) - 1));
  ASSERT_EQ(tn_jinja_compile("x", 1, &t, &err), TN_OK);
  ASSERT_EQ(tn_jinja_render(t, c, NULL, &out, &n, &err), TN_ENOMEM);
  tn_jinja_free(t);
  tn_jinja_ctx_free(c);
}

TN_TEST_MAIN(TN_TEST(test_basics), TN_TEST(test_errors), TN_TEST(test_limits),
             TN_TEST(test_builders))
