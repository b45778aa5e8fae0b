/*
 * test_api.c: the OpenAI schema layer. Parsing: a table of bad bodies, each
 * with the `param` and a message fragment it must produce, and good bodies
 * whose parsed values are checked. Rendering: responses and SSE streams for
 * chat and completions built from hand-made tn_req objects (logprobs, a
 * partial-UTF-8 token, NUL and invalid bytes in text, usage sums), every
 * output parsed back with jansson.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server/api.h"
#include "tn_test.h"

#ifndef TN_SOURCE_DIR
#define TN_SOURCE_DIR "."
#endif

/* ---- parse: bad inputs */

struct bad_case {
  enum tn_api_kind kind;
  const char *body;
  size_t len; /* 0: strlen(body) */
  const char *param;
  const char *frag;
};

#define CH TN_API_CHAT
#define CM TN_API_COMPLETIONS
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
#define PR "\"prompt\":\"hi\""

static const struct bad_case bad_cases[] = {
    /* body */
    {CH, "", 0, "", "request body is not valid JSON"},
    {CH, "{", 0, "", "request body is not valid JSON"},
    {CH, "{} x", 0, "", "request body is not valid JSON"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", 0, "",
     "not valid JSON"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\"}]}", 0, "",
     "at line 1 column"},
    {CH, "{\"messages\":\"a\0b\"}", 18, "", "not valid JSON"},
    {CH, "[1,2]", 0, "", "request body must be a JSON object, got an array"},
    {CH, "\"x\"", 0, "", "must be a JSON object, got \"x\""},
    /* messages */
    {CH, "{}", 0, "messages", "'messages' is required"},
    {CH, "{\"messages\":null}", 0, "messages", "'messages' is required"},
    {CH, "{\"messages\":[]}", 0, "messages", "non-empty array"},
    {CH, "{\"messages\":\"hi\"}", 0, "messages", "got \"hi\""},
    {CH, "{\"messages\":[5]}", 0, "messages[0]", "must be an object, got 5"},
    {CH, "{\"messages\":[{\"content\":\"x\"}]}", 0, "messages[0].role",
     "'messages[0].role' is required"},
    {CH, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 0,
     "messages[0].role", "got \"wizard\""},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"tool\","
         "\"content\":5}]}",
     0, "messages[1].content", "must be a string"},
    {CH, "{\"messages\":[{\"role\":\"function\",\"content\":\"x\"}]}", 0,
     "messages[0].role", "not supported"},
    {CH, "{\"messages\":[{\"role\":5,\"content\":\"x\"}]}", 0,
     "messages[0].role", "must be a string, got 5"},
    {CH, "{\"messages\":[{\"role\":\"user\"}]}", 0, "messages[0].content",
     "is required"},
    {CH, "{\"messages\":[{\"role\":\"system\",\"content\":null}]}", 0,
     "messages[0].content", "is required"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 0,
     "messages[0].content", "must be a string or an array of text parts"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
         "\"image_url\":{}}]}]}",
     0, "messages[0].content[0]", "\"image_url\" is not supported"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
     0, "messages[0].content[0]", "'messages[0].content[0].text' must be a string"},
    {CH, "{\"messages\":[{\"role\":\"user\",\"content\":[\"x\"]}]}", 0,
     "messages[0].content[0]", "must be an object"},
    /* lengths */
    {CH, "{" MSG ",\"max_tokens\":-5}", 0, "max_tokens",
     "'max_tokens' must be an integer >= 1 and <= 1000000, got -5"},
    {CH, "{" MSG ",\"max_tokens\":0}", 0, "max_tokens", "got 0"},
    {CH, "{" MSG ",\"max_tokens\":2000000}", 0, "max_tokens", "got 2000000"},
    {CH, "{" MSG ",\"max_tokens\":\"10\"}", 0, "max_tokens", "got \"10\""},
    {CH, "{" MSG ",\"max_tokens\":1.5}", 0, "max_tokens", "got 1.5"},
    {CH, "{" MSG ",\"max_tokens\":1e300}", 0, "max_tokens", "got 1e+300"},
    {CH, "{" MSG ",\"max_completion_tokens\":0}", 0, "max_completion_tokens",
     "'max_completion_tokens' must be an integer"},
    {CH, "{" MSG ",\"min_tokens\":-1}", 0, "min_tokens", "got -1"},
    {CH, "{" MSG ",\"max_tokens\":5,\"min_tokens\":10}", 0, "min_tokens",
     "must not exceed 'max_tokens'"},
    /* sampling */
    {CH, "{" MSG ",\"temperature\":\"hot\"}", 0, "temperature",
     "'temperature' must be a number between 0 and 2, got \"hot\""},
    {CH, "{" MSG ",\"temperature\":2.5}", 0, "temperature", "got 2.5"},
    {CH, "{" MSG ",\"temperature\":-0.1}", 0, "temperature", "got -0.1"},
    {CH, "{" MSG ",\"top_p\":0}", 0, "top_p", "'top_p' must be a number in (0, 1], got 0"},
    {CH, "{" MSG ",\"top_p\":1.5}", 0, "top_p", "got 1.5"},
    {CH, "{" MSG ",\"top_p\":true}", 0, "top_p", "got true"},
    {CH, "{" MSG ",\"top_k\":-2}", 0, "top_k", "got -2"},
    {CH, "{" MSG ",\"top_k\":2.5}", 0, "top_k", "'top_k' must be an integer"},
    {CH, "{" MSG ",\"min_p\":1.1}", 0, "min_p", "between 0 and 1, got 1.1"},
    {CH, "{" MSG ",\"seed\":\"abc\"}", 0, "seed",
     "'seed' must be an integer, got \"abc\""},
    {CH, "{" MSG ",\"seed\":1.5}", 0, "seed", "got 1.5"},
    {CH, "{" MSG ",\"presence_penalty\":3}", 0, "presence_penalty",
     "between -2 and 2, got 3"},
    {CH, "{" MSG ",\"frequency_penalty\":-2.5}", 0, "frequency_penalty",
     "got -2.5"},
    {CH, "{" MSG ",\"frequency_penalty\":[1]}", 0, "frequency_penalty",
     "got an array"},
    {CH, "{" MSG ",\"repetition_penalty\":0}", 0, "repetition_penalty",
     "in (0, 10], got 0"},
    {CH, "{" MSG ",\"repetition_penalty\":11}", 0, "repetition_penalty",
     "got 11"},
    {CH, "{" MSG ",\"n\":0}", 0, "n", "'n' must be an integer between 1 and 16, got 0"},
    {CH, "{" MSG ",\"n\":1000}", 0, "n", "got 1000"},
    {CH, "{" MSG ",\"n\":\"2\"}", 0, "n", "got \"2\""},
    /* stop */
    {CH, "{" MSG ",\"stop\":5}", 0, "stop", "'stop' must be a string or an array"},
    {CH, "{" MSG ",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\","
         "\"10\",\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
     0, "stop", "holds 17 strings; at most 16"},
    {CH, "{" MSG ",\"stop\":[\"\"]}", 0, "stop", "must not be empty"},
    {CH, "{" MSG ",\"stop\":\"\"}", 0, "stop", "must not be empty"},
    {CH, "{" MSG ",\"stop\":[\"a\",3]}", 0, "stop", "entries must be strings, got 3"},
    {CH, "{" MSG ",\"stop\":\"a\\u0000b\"}", 0, "stop", "must not contain NUL"},
    /* logit_bias */
    {CH, "{" MSG ",\"logit_bias\":[]}", 0, "logit_bias", "must be an object"},
    {CH, "{" MSG ",\"logit_bias\":{\"abc\":1}}", 0, "logit_bias",
     "keys must be token ids (non-negative integers), got \"abc\""},
    {CH, "{" MSG ",\"logit_bias\":{\"-1\":1}}", 0, "logit_bias", "got \"-1\""},
    {CH, "{" MSG ",\"logit_bias\":{\"99999999999\":1}}", 0, "logit_bias",
     "keys must be token ids"},
    {CH, "{" MSG ",\"logit_bias\":{\"5\":200}}", 0, "logit_bias",
     "between -100 and 100, got 200 for token 5"},
    {CH, "{" MSG ",\"logit_bias\":{\"5\":\"x\"}}", 0, "logit_bias", "got \"x\""},
    /* logprobs */
    {CH, "{" MSG ",\"logprobs\":\"yes\"}", 0, "logprobs",
     "'logprobs' must be a boolean, got \"yes\""},
    {CH, "{" MSG ",\"logprobs\":true,\"top_logprobs\":50}", 0, "top_logprobs",
     "'top_logprobs' must be an integer between 0 and 20, got 50"},
    {CH, "{" MSG ",\"logprobs\":true,\"top_logprobs\":-1}", 0, "top_logprobs",
     "got -1"},
    {CH, "{" MSG ",\"top_logprobs\":5}", 0, "top_logprobs",
     "requires 'logprobs' to be true"},
    /* stream, misc */
    {CH, "{" MSG ",\"stream\":\"true\"}", 0, "stream", "must be a boolean"},
    {CH, "{" MSG ",\"stream\":1}", 0, "stream", "must be a boolean, got 1"},
    {CH, "{" MSG ",\"stream_options\":{\"include_usage\":true}}", 0,
     "stream_options", "only allowed when 'stream' is true"},
    {CH, "{" MSG ",\"stream\":true,\"stream_options\":{\"include_usage\":1}}", 0,
     "stream_options.include_usage", "must be a boolean, got 1"},
    {CH, "{" MSG ",\"stream\":true,\"stream_options\":true}", 0,
     "stream_options", "must be an object"},
    {CH, "{" MSG ",\"model\":5}", 0, "model", "'model' must be a string, got 5"},
    {CH, "{" MSG ",\"user\":{}}", 0, "user", "got {}"},
    {CH, "{" MSG ",\"ignore_eos\":\"yes\"}", 0, "ignore_eos", "must be a boolean"},
    /* completions */
    {CM, "{}", 0, "prompt", "'prompt' is required"},
    {CM, "{\"prompt\":[]}", 0, "prompt", "'prompt' must not be empty"},
    {CM, "{\"prompt\":5}", 0, "prompt", "got 5"},
    {CM, "{\"prompt\":{\"a\":1}}", 0, "prompt", "got an object"},
    {CM, "{\"prompt\":[[]]}", 0, "prompt[0]", "must not be an empty list"},
    {CM, "{\"prompt\":[-1]}", 0, "prompt",
     "token ids must be integers >= 0, got -1 at index 0"},
    {CM, "{\"prompt\":[1,2,3000000000]}", 0, "prompt", "got 3000000000 at index 2"},
    {CM, "{\"prompt\":[1,\"a\"]}", 0, "prompt", "got \"a\" at index 1"},
    {CM, "{\"prompt\":[\"a\",1]}", 0, "prompt[1]", "must be a string"},
    {CM, "{\"prompt\":[[1],\"a\"]}", 0, "prompt[1]", "must be an array of token ids"},
    {CM, "{\"prompt\":[[1],[2,-3]]}", 0, "prompt[1]", "got -3 at index 1"},
    {CM, "{\"prompt\":[null]}", 0, "prompt", "got an array holding null"},
    {CM, "{\"prompt\":[1.5]}", 0, "prompt", "got 1.5"},
    {CM, "{" PR ",\"logprobs\":true}", 0, "logprobs",
     "'logprobs' must be an integer between 0 and 20, got true"},
    {CM, "{" PR ",\"logprobs\":21}", 0, "logprobs", "got 21"},
    {CM, "{" PR ",\"echo\":\"x\"}", 0, "echo", "must be a boolean"},
    {CM, "{" PR ",\"max_tokens\":0}", 0, "max_tokens", "got 0"},
    {CM, "{" PR ",\"n\":17}", 0, "n", "got 17"},
};

static int check_bad(const struct bad_case *c, size_t i) {
  struct tn_api_request q;
  struct tn_api_error err;
  memset(&err, 0x55, sizeof(err));
  size_t len = c->len ? c->len : strlen(c->body);
  int rc = tn_api_parse(c->kind, c->body, len, &q, &err);
  int fails = 0;
  if (rc != 400 || err.http_status != 400) {
    fprintf(stderr, "case %zu (%s): status %d, want 400\n", i, c->body, rc);
    fails++;
  } else {
    if (strcmp(err.param, c->param) != 0) {
      fprintf(stderr, "case %zu (%s): param \"%s\", want \"%s\" (%s)\n", i,
              c->body, err.param, c->param, err.message);
      fails++;
    }
    if (!strstr(err.message, c->frag)) {
      fprintf(stderr, "case %zu (%s): message \"%s\" lacks \"%s\"\n", i,
              c->body, err.message, c->frag);
      fails++;
    }
    if (strcmp(err.type, "invalid_request_error") != 0) {
      fprintf(stderr, "case %zu: type %s\n", i, err.type);
      fails++;
    }
  }
  /* *out is left empty */
  if (q.msgs || q.prompts || q.bias || q.stops || q.model || q.user) {
    fprintf(stderr, "case %zu: out not empty after an error\n", i);
    fails++;
  }
  tn_api_request_free(&q);
  return fails;
}

static void test_parse_bad(void) {
  size_t n = sizeof(bad_cases) / sizeof(bad_cases[0]);
  int fails = 0;
  for (size_t i = 0; i < n; i++) fails += check_bad(&bad_cases[i], i);
  printf("  %zu bad-input cases\n", n);
  ASSERT_GE(n, 40);
  ASSERT_EQ(fails, 0);
}

/* Too many prompts and too many logit_bias entries (built, not literal). */
static void test_parse_caps(void) {
  struct tn_buf b = {0};
  tn_buf_printf(&b, "{\"prompt\":[");
  for (int i = 0; i < 65; i++) tn_buf_printf(&b, "%s\"p%d\"", i ? "," : "", i);
  tn_buf_printf(&b, "]}");
  ASSERT(!b.oom);
  struct tn_api_request q;
  struct tn_api_error err;
  ASSERT_EQ(tn_api_parse(CM, b.data, b.len, &q, &err), 400);
  ASSERT_STR_EQ(err.param, "prompt");
  ASSERT_SUBSTR(err.message, "holds 65 prompts; at most 64");
  tn_buf_free(&b);

  /* 64 is fine */
  tn_buf_printf(&b, "{\"prompt\":[");
  for (int i = 0; i < 64; i++) tn_buf_printf(&b, "%s[%d]", i ? "," : "", i);
  tn_buf_printf(&b, "]}");
  ASSERT_EQ(tn_api_parse(CM, b.data, b.len, &q, &err), 0);
  ASSERT_EQ(q.n_prompts, 64);
  ASSERT_EQ(q.prompts[63].n_ids, 1);
  ASSERT_EQ(q.prompts[63].ids[0], 63);
  tn_api_request_free(&q);
  tn_buf_free(&b);

  tn_buf_printf(&b, "{" MSG ",\"logit_bias\":{");
  for (int i = 0; i < 1025; i++) tn_buf_printf(&b, "%s\"%d\":1", i ? "," : "", i);
  tn_buf_printf(&b, "}}");
  ASSERT_EQ(tn_api_parse(CH, b.data, b.len, &q, &err), 400);
  ASSERT_STR_EQ(err.param, "logit_bias");
  ASSERT_SUBSTR(err.message, "1025 entries; at most 1024");
  tn_buf_free(&b);
}

/* Every prefix and many one-byte mutations of a full body: each parses or
 * fails with a 400 naming something, and never leaks or crashes (run under
 * ASan). */
static void test_parse_mutations(void) {
  const char *body =
      "{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":"
      "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\\u0000\"}]}],"
      "\"max_tokens\":7,\"temperature\":0.5,\"top_k\":3,\"n\":2,"
      "\"stop\":[\"x\",\"yy\"],\"logit_bias\":{\"12\":1.5},\"logprobs\":true,"
      "\"top_logprobs\":3,\"stream\":true,\"stream_options\":"
      "{\"include_usage\":true},\"seed\":9,\"prompt\":[[1,2],[3]]}";
  size_t n = strlen(body);
  char *m = malloc(n);
  ASSERT(m != NULL);
  static const char subst[] = {'"', '1', '[', ']', '{', '}', ',', ':', '-',
                               'n', '\\', (char)0xff, '\0', ' '};
  int ok = 0, bad400 = 0, other = 0;
  for (int kind = 0; kind < 2; kind++) {
    enum tn_api_kind k = kind ? CM : CH;
    for (size_t len = 0; len <= n; len++) {
      struct tn_api_request q;
      struct tn_api_error err;
      int rc = tn_api_parse(k, body, len, &q, &err);
      ok += rc == 0, bad400 += rc == 400, other += rc != 0 && rc != 400;
      tn_api_request_free(&q);
    }
    for (size_t i = 0; i < n; i++)
      for (size_t c = 0; c < sizeof(subst); c++) {
        memcpy(m, body, n);
        m[i] = subst[c];
        struct tn_api_request q;
        struct tn_api_error err;
        int rc = tn_api_parse(k, m, n, &q, &err);
        ok += rc == 0, bad400 += rc == 400, other += rc != 0 && rc != 400;
        if (rc == 0) {
          /* what parsed is consistent */
          if (q.gen.n_stops > 0 && q.gen.stops != (const char *const *)q.stops)
            other++;
          if (q.gen.sampling.n_bias > 0 && q.gen.sampling.bias != q.bias)
            other++;
        }
        tn_api_request_free(&q);
      }
  }
  free(m);
  printf("  mutations: %d ok, %d rejected\n", ok, bad400);
  ASSERT_EQ(other, 0);
  ASSERT_GT(ok, 0);
  ASSERT_GT(bad400, 0);
}

/* ---- parse: good inputs */

static void test_parse_chat_full(void) {
  const char *body =
      "{\"model\":\"smollm2\",\"messages\":["
      "{\"role\":\"developer\",\"content\":\"be brief\"},"
      "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"ab\"},"
      "{\"type\":\"text\",\"text\":\"cd\"}],\"name\":\"bob\"},"
      "{\"role\":\"assistant\",\"content\":null},"
      "{\"role\":\"user\",\"content\":\"\"}],"
      "\"max_tokens\":7,\"max_completion_tokens\":9.0,\"temperature\":0.5,"
      "\"top_p\":0.9,\"top_k\":-1,\"min_p\":0.05,\"seed\":-1,"
      "\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,"
      "\"repetition_penalty\":1.1,\"n\":3,\"stop\":[\"\\n\",\"END\"],"
      "\"logit_bias\":{\"42\":-100,\"7\":2.5},\"logprobs\":true,"
      "\"top_logprobs\":5,\"stream\":true,\"stream_options\":"
      "{\"include_usage\":true},\"user\":\"u1\",\"ignore_eos\":true,"
      "\"min_tokens\":2,\"tools\":[],\"response_format\":{\"type\":\"text\"},"
      "\"echo\":\"ignored for chat\",\"unknown\":{\"x\":[1,2]}}";
  struct tn_api_request q;
  struct tn_api_error err = {0};
  int rc = tn_api_parse(CH, body, strlen(body), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s (%s)", rc, err.message, err.param);
  ASSERT_EQ(q.kind, CH);
  ASSERT_STR_EQ(q.model, "smollm2");
  ASSERT_EQ(q.n_msgs, 4);
  ASSERT_STR_EQ(q.msgs[0].role, "system");
  ASSERT_STR_EQ(q.msgs[0].content, "be brief");
  ASSERT_EQ(q.msgs[0].content_len, 8);
  ASSERT_STR_EQ(q.msgs[1].role, "user");
  ASSERT_STR_EQ(q.msgs[1].content, "abcd");
  ASSERT_EQ(q.msgs[1].content_len, 4);
  ASSERT_STR_EQ(q.msgs[2].role, "assistant");
  ASSERT_EQ(q.msgs[2].content_len, 0);
  ASSERT(q.msgs[2].content != NULL);
  ASSERT_EQ(q.msgs[3].content_len, 0);
  ASSERT_EQ(q.max_tokens, 9);
  ASSERT_EQ(q.gen.max_tokens, 9);
  ASSERT_NEAR(q.gen.sampling.temperature, 0.5, 1e-6);
  ASSERT_NEAR(q.gen.sampling.top_p, 0.9, 1e-6);
  ASSERT_EQ(q.gen.sampling.top_k, 0);
  ASSERT_NEAR(q.gen.sampling.min_p, 0.05, 1e-6);
  ASSERT(q.has_seed);
  ASSERT(q.gen.sampling.seed == UINT64_MAX);
  ASSERT_NEAR(q.gen.sampling.presence_penalty, 0.5, 1e-6);
  ASSERT_NEAR(q.gen.sampling.freq_penalty, -0.5, 1e-6);
  ASSERT_NEAR(q.gen.sampling.repeat_penalty, 1.1, 1e-6);
  ASSERT_EQ(q.gen.n, 3);
  ASSERT_EQ(q.gen.n_stops, 2);
  ASSERT(q.gen.stops == (const char *const *)q.stops);
  ASSERT_STR_EQ(q.gen.stops[0], "\n");
  ASSERT_STR_EQ(q.gen.stops[1], "END");
  ASSERT_EQ(q.gen.sampling.n_bias, 2);
  ASSERT(q.gen.sampling.bias == q.bias);
  /* jansson keeps insertion order */
  ASSERT_EQ(q.bias[0].id, 42);
  ASSERT_NEAR(q.bias[0].bias, -100, 0);
  ASSERT_EQ(q.bias[1].id, 7);
  ASSERT_NEAR(q.bias[1].bias, 2.5, 0);
  ASSERT(q.gen.logprobs);
  ASSERT_EQ(q.gen.sampling.n_logprobs, 5);
  ASSERT(q.stream);
  ASSERT(q.include_usage);
  ASSERT_STR_EQ(q.user, "u1");
  ASSERT(q.gen.ignore_eos);
  ASSERT_EQ(q.gen.min_tokens, 2);
  ASSERT(!q.echo);

  ASSERT_EQ(tn_api_check_vocab(&q, 100, &err), 0);
  ASSERT_EQ(tn_api_check_vocab(&q, 42, &err), 400);
  ASSERT_STR_EQ(err.param, "logit_bias");
  ASSERT_SUBSTR(err.message, "token id 42 is out of range (vocabulary size 42)");
  tn_api_request_free(&q);
  tn_api_request_free(&q); /* idempotent on an emptied struct */
}

static void test_parse_chat_defaults(void) {
  const char *body =
      "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
      "\"max_tokens\":null,\"temperature\":null,\"stop\":null,"
      "\"logit_bias\":null,\"stream\":false,\"stream_options\":null,"
      "\"n\":null,\"seed\":null,\"logprobs\":false}";
  struct tn_api_request q;
  struct tn_api_error err = {0};
  int rc = tn_api_parse(CH, body, strlen(body), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  struct tn_gen_params d;
  tn_gen_params_default(&d);
  ASSERT_EQ(q.max_tokens, -1);
  ASSERT_EQ(q.gen.max_tokens, d.max_tokens);
  ASSERT_EQ(q.gen.n, d.n);
  ASSERT_NEAR(q.gen.sampling.temperature, d.sampling.temperature, 0);
  ASSERT(!q.has_seed);
  ASSERT(q.gen.sampling.seed == d.sampling.seed);
  ASSERT_EQ(q.gen.n_stops, 0);
  ASSERT(q.gen.stops == NULL);
  ASSERT_EQ(q.gen.sampling.n_bias, 0);
  ASSERT(!q.gen.logprobs);
  ASSERT(!q.stream);
  ASSERT(!q.include_usage);
  ASSERT(q.model == NULL);
  tn_api_request_free(&q);

  /* a stop string alone; duplicate keys: the last wins */
  const char *b2 =
      "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stop\":\"###\","
      "\"n\":2,\"n\":4}";
  rc = tn_api_parse(CH, b2, strlen(b2), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.gen.n_stops, 1);
  ASSERT_STR_EQ(q.gen.stops[0], "###");
  ASSERT_EQ(q.gen.n, 4);
  tn_api_request_free(&q);
}

static void test_parse_nul_content(void) {
  /* escaped NULs are kept, with the exact length */
  const char *body =
      "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\\u0000\"},"
      "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":"
      "\"x\\u0000\"},{\"type\":\"text\",\"text\":\"y\"}]}]}";
  struct tn_api_request q;
  struct tn_api_error err = {0};
  int rc = tn_api_parse(CH, body, strlen(body), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.msgs[0].content_len, 4);
  ASSERT(memcmp(q.msgs[0].content, "a\0b\0", 5) == 0);
  ASSERT_EQ(q.msgs[1].content_len, 3);
  ASSERT(memcmp(q.msgs[1].content, "x\0y", 4) == 0);
  tn_api_request_free(&q);

  /* and in completions prompts; UTF-8 passes through */
  const char *b2 = "{\"prompt\":[\"\\u0000z\",\"h\xc3\xa9\"]}";
  rc = tn_api_parse(CM, b2, strlen(b2), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.n_prompts, 2);
  ASSERT_EQ(q.prompts[0].len, 2);
  ASSERT(memcmp(q.prompts[0].text, "\0z", 3) == 0);
  ASSERT_EQ(q.prompts[1].len, 3);
  ASSERT_STR_EQ(q.prompts[1].text, "h\xc3\xa9");
  tn_api_request_free(&q);
}

static void test_parse_prompts(void) {
  struct tn_api_request q;
  struct tn_api_error err = {0};
  int rc;

  const char *b1 = "{\"prompt\":\"\",\"logprobs\":0,\"echo\":true}";
  rc = tn_api_parse(CM, b1, strlen(b1), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.n_prompts, 1);
  ASSERT_EQ(q.prompts[0].len, 0);
  ASSERT_STR_EQ(q.prompts[0].text, "");
  ASSERT(q.prompts[0].ids == NULL);
  ASSERT(q.gen.logprobs);
  ASSERT_EQ(q.gen.sampling.n_logprobs, 0);
  ASSERT(q.echo);
  tn_api_request_free(&q);

  const char *b2 = "{\"prompt\":[1,2.0,49151],\"logprobs\":null,"
                   "\"max_completion_tokens\":0}"; /* ignored here */
  rc = tn_api_parse(CM, b2, strlen(b2), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.n_prompts, 1);
  ASSERT(q.prompts[0].text == NULL);
  ASSERT_EQ(q.prompts[0].n_ids, 3);
  ASSERT_EQ(q.prompts[0].ids[1], 2);
  ASSERT_EQ(q.prompts[0].ids[2], 49151);
  ASSERT(!q.gen.logprobs);
  ASSERT_EQ(q.max_tokens, -1);
  ASSERT_EQ(tn_api_check_vocab(&q, 49152, &err), 0);
  ASSERT_EQ(tn_api_check_vocab(&q, 49151, &err), 400);
  ASSERT_STR_EQ(err.param, "prompt");
  ASSERT_SUBSTR(err.message, "token id 49151 is out of range");
  tn_api_request_free(&q);

  const char *b3 = "{\"prompt\":[[5,6],[7]],\"max_tokens\":3}";
  rc = tn_api_parse(CM, b3, strlen(b3), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.n_prompts, 2);
  ASSERT_EQ(q.prompts[0].n_ids, 2);
  ASSERT_EQ(q.prompts[1].n_ids, 1);
  ASSERT_EQ(q.prompts[1].ids[0], 7);
  ASSERT_EQ(q.max_tokens, 3);
  tn_api_request_free(&q);

  const char *b4 = "{\"prompt\":[\"a\",\"bc\"],\"n\":2}";
  rc = tn_api_parse(CM, b4, strlen(b4), &q, &err);
  if (rc) TN_FAIL_("parse: %d %s", rc, err.message);
  ASSERT_EQ(q.n_prompts, 2);
  ASSERT_STR_EQ(q.prompts[1].text, "bc");
  ASSERT_EQ(q.gen.n, 2);
  tn_api_request_free(&q);
}

static void test_error_json(void) {
  struct tn_api_error err;
  ASSERT_EQ(tn_api_error_set(&err, 429, "rate_limit_error", NULL, "queue_full",
                             "queue is full (%d waiting)", 256),
            429);
  size_t len = 0;
  char *s = tn_api_error_json(&err, &len);
  ASSERT(s != NULL);
  json_error_t je;
  json_t *j = json_loadb(s, len, 0, &je);
  free(s);
  ASSERT(j != NULL);
  json_t *e = json_object_get(j, "error");
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "message")),
                "queue is full (256 waiting)");
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "type")),
                "rate_limit_error");
  ASSERT(json_is_null(json_object_get(e, "param")));
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "code")), "queue_full");
  json_decref(j);

  /* a parse error round-trips, the bad value's quotes escaped */
  struct tn_api_request q;
  const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                     "\"temperature\":\"h\\\"o\\u0001t\"}";
  ASSERT_EQ(tn_api_parse(CH, body, strlen(body), &q, &err), 400);
  s = tn_api_error_json(&err, &len);
  ASSERT(s != NULL);
  j = json_loadb(s, len, 0, &je);
  free(s);
  ASSERT(j != NULL);
  e = json_object_get(j, "error");
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "param")), "temperature");
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "message")),
                "'temperature' must be a number between 0 and 2, got "
                "\"h\\\"o\\u0001t\"");
  ASSERT_STR_EQ(json_string_value(json_object_get(e, "type")),
                "invalid_request_error");
  ASSERT(json_is_null(json_object_get(e, "code")));
  json_decref(j);
}

static void test_buf(void) {
  struct tn_buf b = {0};
  for (int i = 0; i < 1000; i++) tn_buf_printf(&b, "%d,", i);
  tn_buf_append(&b, "x\0y", 3);
  ASSERT(!b.oom);
  ASSERT_EQ(b.len, 3893);
  ASSERT(memcmp(b.data, "0,1,2,", 6) == 0);
  ASSERT(memcmp(b.data + b.len - 3, "x\0y", 3) == 0);
  tn_buf_printf(&b, "%s", "a long string that does not fit in the small "
                          "buffer used by the first vsnprintf pass, surely "
                          "not, because it keeps going and going on");
  ASSERT(!b.oom);
  ASSERT_SUBSTR(b.data + 3893, "keeps going and going on");
  tn_buf_free(&b);
  ASSERT(b.data == NULL);
  tn_buf_free(NULL);
}

/* ---- rendering */

static struct tn_tokenizer *load_tok(void) {
  const char *path = TN_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (access(path, R_OK) != 0) {
    tn_test_skip("%s not present", path);
    return NULL;
  }
  struct tn_error e = {0};
  struct tn_gguf *g = NULL;
  if (tn_gguf_open(path, &g, &e) != TN_OK) {
    TN_FAIL_NORETURN("open %s: %s", path, e.msg); /* present but broken */
    return NULL;
  }
  struct tn_tokenizer *tok = NULL;
  enum tn_status st = tn_tokenizer_load(g, &tok, &e);
  tn_gguf_close(g);
  if (st != TN_OK) {
    TN_FAIL_NORETURN("load %s: %s", path, e.msg);
    return NULL;
  }
  tn_test_ran();
  return tok;
}

/* A token whose piece is one byte that is not a whole character. */
static int32_t find_partial_token(const struct tn_tokenizer *tok,
                                  unsigned char *byte) {
  int32_t nv = tn_tokenizer_n_vocab(tok);
  for (int32_t id = 0; id < nv; id++) {
    char buf[16];
    size_t n = tn_tokenizer_piece(tok, id, buf, sizeof(buf), false);
    if (n == 1 && (unsigned char)buf[0] >= 0xC2 &&
        (unsigned char)buf[0] <= 0xF4) {
      *byte = (unsigned char)buf[0];
      return id;
    }
  }
  return -1;
}

static int32_t encode1(const struct tn_tokenizer *tok, const char *s) {
  int32_t *ids = NULL;
  size_t n = 0;
  struct tn_error e = {0};
  if (tn_tokenizer_encode(tok, s, strlen(s), false, false, &ids, &n, &e) !=
          TN_OK || n != 1) {
    free(ids);
    return -1;
  }
  int32_t id = ids[0];
  free(ids);
  return id;
}

struct fixture {
  struct tn_tokenizer *tok;
  int32_t hello, world, partial;
  unsigned char partial_byte;
  struct tn_gen_token toks[3];
};

/* false: the case skips (model absent) or has failed (model broken);
 * either is recorded, the caller just returns. */
static bool fixture_init(struct fixture *f) {
  memset(f, 0, sizeof(*f));
  f->tok = load_tok();
  if (!f->tok) return false;
  f->hello = encode1(f->tok, "Hello");
  f->world = encode1(f->tok, " world");
  f->partial = find_partial_token(f->tok, &f->partial_byte);
  if (f->hello < 0 || f->world < 0 || f->partial < 0) {
    TN_FAIL_NORETURN("fixture tokens: %d %d %d", f->hello, f->world,
                     f->partial);
    tn_tokenizer_free(f->tok);
    f->tok = NULL;
    return false;
  }
  int32_t ids[3] = {f->hello, f->world, f->partial};
  for (int t = 0; t < 3; t++) {
    f->toks[t].id = ids[t];
    f->toks[t].logprob = -0.25f * (float)(t + 1);
    f->toks[t].n_top = 2;
    f->toks[t].top[0].id = ids[t];
    f->toks[t].top[0].logprob = f->toks[t].logprob;
    f->toks[t].top[1].id = ids[(t + 1) % 3];
    f->toks[t].top[1].logprob = -3.0f;
  }
  return true;
}

static void set_choice(struct tn_choice *c, char *text, size_t len,
                       struct tn_gen_token *toks, int32_t n_toks,
                       int32_t n_gen, enum tn_finish f) {
  memset(c, 0, sizeof(*c));
  c->text = text;
  c->len = c->cap = len;
  c->toks = toks;
  c->n_toks = c->cap_toks = n_toks;
  c->n_gen = n_gen;
  c->finish = f;
}

static json_t *parse_json(const char *s, size_t len) {
  json_error_t je;
  json_t *j = json_loadb(s, len, JSON_ALLOW_NUL, &je);
  if (!j) fprintf(stderr, "bad JSON (%s): %.*s\n", je.text, (int)len, s);
  return j;
}

#define JS(o, k) json_string_value(json_object_get((o), (k)))
#define JI(o, k) json_integer_value(json_object_get((o), (k)))

static void test_render_chat(void) {
  struct fixture f;
  if (!fixture_init(&f)) return;
  const char *body =
      "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"n\":2,"
      "\"logprobs\":true,\"top_logprobs\":2}";
  struct tn_api_request q;
  struct tn_api_error err;
  ASSERT_EQ(tn_api_parse(CH, body, strlen(body), &q, &err), 0);

  char t0[] = "Hello world\xe2";  /* the partial byte as released text */
  t0[11] = (char)f.partial_byte;
  char t1[] = "a\0b\xff\"\\\n"; /* NUL, invalid byte, escapes */
  struct tn_choice ch[2];
  set_choice(&ch[0], t0, 12, f.toks, 3, 3, TN_FINISH_LENGTH);
  set_choice(&ch[1], t1, 7, f.toks, 1, 5, TN_FINISH_STOP);
  struct tn_req r = {.n_prompt = 9, .n_cached = 4, .n_choices = 2,
                     .choices = ch, .done = true};
  struct tn_req *reqs[1] = {&r};
  struct tn_api_meta meta = {.id = "chatcmpl-1", .created = 1700000000,
                             .model = "smollm2", .tok = f.tok};
  size_t len = 0;
  char *s = tn_api_render_response(&q, &meta, reqs, 1, &len);
  ASSERT(s != NULL);
  ASSERT_EQ(strlen(s), len);
  json_t *j = parse_json(s, len);
  free(s);
  ASSERT(j != NULL);
  ASSERT_STR_EQ(JS(j, "object"), "chat.completion");
  ASSERT_STR_EQ(JS(j, "id"), "chatcmpl-1");
  ASSERT_STR_EQ(JS(j, "model"), "smollm2");
  ASSERT_EQ(JI(j, "created"), 1700000000);
  json_t *choices = json_object_get(j, "choices");
  ASSERT_EQ(json_array_size(choices), 2);
  json_t *c0 = json_array_get(choices, 0), *c1 = json_array_get(choices, 1);
  ASSERT_EQ(JI(c0, "index"), 0);
  ASSERT_EQ(JI(c1, "index"), 1);
  ASSERT_STR_EQ(JS(c0, "finish_reason"), "length");
  ASSERT_STR_EQ(JS(c1, "finish_reason"), "stop");
  json_t *m0 = json_object_get(c0, "message");
  ASSERT_STR_EQ(JS(m0, "role"), "assistant");
  ASSERT_STR_EQ(JS(m0, "content"), "Hello world\xef\xbf\xbd");
  json_t *m1 = json_object_get(c1, "message");
  json_t *content1 = json_object_get(m1, "content");
  ASSERT_EQ(json_string_length(content1), 9);
  ASSERT(memcmp(json_string_value(content1), "a\0b\xef\xbf\xbd\"\\\n", 9) == 0);

  json_t *lp = json_object_get(json_object_get(c0, "logprobs"), "content");
  ASSERT_EQ(json_array_size(lp), 3);
  json_t *e0 = json_array_get(lp, 0), *e2 = json_array_get(lp, 2);
  ASSERT_STR_EQ(JS(e0, "token"), "Hello");
  ASSERT_NEAR(json_real_value(json_object_get(e0, "logprob")), -0.25, 1e-6);
  json_t *bytes0 = json_object_get(e0, "bytes");
  ASSERT_EQ(json_array_size(bytes0), 5);
  ASSERT_EQ(json_integer_value(json_array_get(bytes0, 0)), 'H');
  json_t *top0 = json_object_get(e0, "top_logprobs");
  ASSERT_EQ(json_array_size(top0), 2);
  ASSERT_STR_EQ(JS(json_array_get(top0, 1), "token"), " world");
  ASSERT_NEAR(json_number_value(json_object_get(json_array_get(top0, 1),
                                                "logprob")),
              -3.0, 1e-6);
  /* the partial token: repaired string, raw bytes */
  ASSERT_STR_EQ(JS(e2, "token"), "\xef\xbf\xbd");
  json_t *bytes2 = json_object_get(e2, "bytes");
  ASSERT_EQ(json_array_size(bytes2), 1);
  ASSERT_EQ(json_integer_value(json_array_get(bytes2, 0)), f.partial_byte);
  ASSERT_EQ(json_array_size(json_object_get(
                json_object_get(c1, "logprobs"), "content")),
            1);

  json_t *u = json_object_get(j, "usage");
  ASSERT_EQ(JI(u, "prompt_tokens"), 9);
  ASSERT_EQ(JI(u, "completion_tokens"), 8);
  ASSERT_EQ(JI(u, "total_tokens"), 17);
  ASSERT_EQ(JI(json_object_get(u, "prompt_tokens_details"), "cached_tokens"),
            4);
  json_decref(j);
  tn_api_request_free(&q);

  /* without logprobs: null; a still-running choice: finish_reason null */
  const char *b2 = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
  ASSERT_EQ(tn_api_parse(CH, b2, strlen(b2), &q, &err), 0);
  set_choice(&ch[0], t0, 5, NULL, 0, 1, TN_FINISH_NONE);
  r.n_choices = 1;
  s = tn_api_render_response(&q, &meta, reqs, 1, &len);
  j = parse_json(s, len);
  free(s);
  ASSERT(j != NULL);
  c0 = json_array_get(json_object_get(j, "choices"), 0);
  ASSERT(json_is_null(json_object_get(c0, "logprobs")));
  ASSERT(json_is_null(json_object_get(c0, "finish_reason")));
  ASSERT_STR_EQ(JS(json_object_get(c0, "message"), "content"), "Hello");
  json_decref(j);
  tn_api_request_free(&q);
  tn_tokenizer_free(f.tok);
}

static void test_render_completions(void) {
  struct fixture f;
  if (!fixture_init(&f)) return;
  const char *body =
      "{\"prompt\":[\"p0\",\"p1\"],\"n\":2,\"logprobs\":2,\"echo\":true}";
  struct tn_api_request q;
  struct tn_api_error err;
  ASSERT_EQ(tn_api_parse(CM, body, strlen(body), &q, &err), 0);
  char text[] = "Hello world";
  struct tn_choice ch0[2], ch1[2];
  set_choice(&ch0[0], text, 11, f.toks, 2, 2, TN_FINISH_LENGTH);
  set_choice(&ch0[1], text, 5, f.toks, 1, 1, TN_FINISH_STOP);
  set_choice(&ch1[0], text, 0, f.toks, 0, 0, TN_FINISH_STOP);
  set_choice(&ch1[1], text, 11, f.toks, 3, 3, TN_FINISH_CANCELLED);
  struct tn_req r0 = {.n_prompt = 3, .n_choices = 2, .choices = ch0,
                      .done = true};
  struct tn_req r1 = {.n_prompt = 4, .n_cached = 2, .n_choices = 2,
                      .choices = ch1, .done = true};
  struct tn_req *reqs[2] = {&r0, &r1};
  const char *echo[2] = {"p\xc3\xa9: ", "p1"};
  size_t echo_len[2] = {5, 2};
  struct tn_api_meta meta = {.id = "cmpl-9", .created = 5, .model = "m",
                             .tok = f.tok, .echo_text = echo,
                             .echo_len = echo_len};
  size_t len;
  char *s = tn_api_render_response(&q, &meta, reqs, 2, &len);
  ASSERT(s != NULL);
  json_t *j = parse_json(s, len);
  free(s);
  ASSERT(j != NULL);
  ASSERT_STR_EQ(JS(j, "object"), "text_completion");
  json_t *choices = json_object_get(j, "choices");
  ASSERT_EQ(json_array_size(choices), 4);
  for (int k = 0; k < 4; k++)
    ASSERT_EQ(JI(json_array_get(choices, k), "index"), k);
  json_t *c0 = json_array_get(choices, 0);
  ASSERT_STR_EQ(JS(c0, "text"), "p\xc3\xa9: Hello world");
  ASSERT_STR_EQ(JS(c0, "finish_reason"), "length");
  json_t *lp = json_object_get(c0, "logprobs");
  json_t *tokens = json_object_get(lp, "tokens");
  ASSERT_EQ(json_array_size(tokens), 2);
  ASSERT_STR_EQ(json_string_value(json_array_get(tokens, 1)), " world");
  ASSERT_NEAR(json_number_value(
                  json_array_get(json_object_get(lp, "token_logprobs"), 1)),
              -0.5, 1e-6);
  json_t *offs = json_object_get(lp, "text_offset");
  /* "pé: " is 4 characters */
  ASSERT_EQ(json_integer_value(json_array_get(offs, 0)), 4);
  ASSERT_EQ(json_integer_value(json_array_get(offs, 1)), 9);
  json_t *top = json_array_get(json_object_get(lp, "top_logprobs"), 0);
  ASSERT_EQ(json_object_size(top), 2);
  ASSERT_NEAR(json_number_value(json_object_get(top, "Hello")), -0.25, 1e-6);
  ASSERT_NEAR(json_number_value(json_object_get(top, " world")), -3.0, 1e-6);
  json_t *c2 = json_array_get(choices, 2);
  ASSERT_STR_EQ(JS(c2, "text"), "p1");
  ASSERT_EQ(json_array_size(json_object_get(json_object_get(c2, "logprobs"),
                                            "tokens")),
            0);
  json_t *c3 = json_array_get(choices, 3);
  ASSERT_STR_EQ(JS(c3, "finish_reason"), "cancelled");
  json_t *tokens3 = json_object_get(json_object_get(c3, "logprobs"), "tokens");
  ASSERT_STR_EQ(json_string_value(json_array_get(tokens3, 2)), "\xef\xbf\xbd");
  json_t *u = json_object_get(j, "usage");
  ASSERT_EQ(JI(u, "prompt_tokens"), 7); /* once per prompt, not per sample */
  ASSERT_EQ(JI(u, "completion_tokens"), 6);
  ASSERT_EQ(JI(u, "total_tokens"), 13);
  json_decref(j);
  tn_api_request_free(&q);
  tn_tokenizer_free(f.tok);
}

/* Splits SSE output into parsed events; true when it ended with [DONE]. */
static size_t sse_events(const char *s, size_t n, json_t **ev, size_t cap,
                         bool *done, int *bad_frames) {
  size_t k = 0, i = 0;
  *done = false;
  while (i < n) {
    if (n - i < 6 || memcmp(s + i, "data: ", 6) != 0) {
      (*bad_frames)++;
      return k;
    }
    i += 6;
    const char *end = memmem(s + i, n - i, "\n\n", 2);
    if (!end) {
      (*bad_frames)++;
      return k;
    }
    size_t len = (size_t)(end - (s + i));
    if (*done) (*bad_frames)++; /* nothing after [DONE] */
    if (len == 6 && !memcmp(s + i, "[DONE]", 6)) {
      *done = true;
    } else if (k < cap) {
      ev[k] = parse_json(s + i, len);
      if (!ev[k]) (*bad_frames)++;
      else k++;
    }
    i = (size_t)(end - s) + 2;
  }
  return k;
}

static void test_stream_chat(void) {
  struct fixture f;
  if (!fixture_init(&f)) return;
  const char *body =
      "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"n\":2,"
      "\"logprobs\":true,\"top_logprobs\":1,\"stream\":true,"
      "\"stream_options\":{\"include_usage\":true}}";
  struct tn_api_request q;
  struct tn_api_error err;
  ASSERT_EQ(tn_api_parse(CH, body, strlen(body), &q, &err), 0);
  char text0[] = "Hello world!";
  char text1[] = "Hello";
  struct tn_choice ch[2];
  set_choice(&ch[0], text0, 0, f.toks, 0, 0, TN_FINISH_NONE);
  set_choice(&ch[1], text1, 0, f.toks, 0, 0, TN_FINISH_NONE);
  struct tn_req r = {.n_prompt = 6, .n_choices = 2, .choices = ch};
  struct tn_req *reqs[1] = {&r};
  struct tn_api_meta meta = {.id = "chatcmpl-s", .created = 1, .model = "m",
                             .tok = f.tok};
  struct tn_api_stream st;
  tn_api_stream_init(&st);
  struct tn_buf out = {0};

  /* step 0: nothing generated: only the role chunks */
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  /* step 1: choice 0 "Hello", choice 1 token without text yet */
  ch[0].len = 5, ch[0].n_toks = 1, ch[0].n_gen = 1;
  ch[1].n_toks = 1, ch[1].n_gen = 1;
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  /* step 1 again: nothing new, nothing emitted */
  size_t before = out.len;
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  ASSERT_EQ(out.len, before);
  /* step 2: choice 0 " world!" (3 tokens in all); choice 1 its text */
  ch[0].len = 12, ch[0].n_toks = 3, ch[0].n_gen = 3;
  ch[1].len = 5;
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  /* step 3: both end; choice 1 with a token whose text was held back (its
   * logprobs ride on the finish chunk) */
  ch[0].finish = TN_FINISH_LENGTH;
  ch[1].n_toks = 2, ch[1].n_gen = 2;
  ch[1].finish = TN_FINISH_STOP;
  r.done = true;
  ASSERT(tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  ASSERT(tn_api_render_stream(&q, &meta, reqs, 1, &st, &out));
  ASSERT(!out.oom);

  json_t *ev[32];
  bool done;
  int bad_frames = 0;
  size_t n = sse_events(out.data, out.len, ev, 32, &done, &bad_frames);
  ASSERT_EQ(bad_frames, 0);
  ASSERT(done);
  /* role x2, text c0, text c0, text c1, finish c0, finish c1, usage */
  char content[2][64] = {{0}};
  int n_lp[2] = {0}, n_role[2] = {0}, n_finish[2] = {0};
  const char *finish[2] = {NULL, NULL};
  int fails = 0;
  for (size_t e = 0; e < n; e++) {
    json_t *o = ev[e];
    if (strcmp(JS(o, "object"), "chat.completion.chunk") != 0) fails++;
    if (strcmp(JS(o, "id"), "chatcmpl-s") != 0) fails++;
    json_t *choices = json_object_get(o, "choices");
    if (e == n - 1) { /* the usage chunk */
      if (json_array_size(choices) != 0) fails++;
      json_t *u = json_object_get(o, "usage");
      if (JI(u, "prompt_tokens") != 6 || JI(u, "completion_tokens") != 5 ||
          JI(u, "total_tokens") != 11)
        fails++;
      continue;
    }
    if (!json_is_null(json_object_get(o, "usage"))) fails++;
    if (json_array_size(choices) != 1) {
      fails++;
      continue;
    }
    json_t *c = json_array_get(choices, 0);
    json_int_t idx = JI(c, "index");
    if (idx < 0 || idx > 1) {
      fails++;
      continue;
    }
    json_t *delta = json_object_get(c, "delta");
    if (JS(delta, "role")) {
      n_role[idx]++;
      if (strcmp(JS(delta, "content"), "") != 0) fails++;
    } else if (JS(delta, "content")) {
      if (strlen(JS(delta, "content")) == 0) fails++; /* no empty chunks */
      strcat(content[idx], JS(delta, "content"));
    }
    json_t *lp = json_object_get(c, "logprobs");
    if (!json_is_null(lp)) {
      json_t *arr = json_object_get(lp, "content");
      n_lp[idx] += (int)json_array_size(arr);
      for (size_t t = 0; t < json_array_size(arr); t++)
        if (json_array_size(json_object_get(json_array_get(arr, t),
                                            "top_logprobs")) != 2)
          fails++;
    }
    json_t *fr = json_object_get(c, "finish_reason");
    if (!json_is_null(fr)) {
      n_finish[idx]++;
      finish[idx] = json_string_value(fr);
      if (json_object_size(delta) != 0) fails++; /* delta {} */
    }
  }
  ASSERT_EQ(fails, 0);
  ASSERT_EQ(n, 8);
  ASSERT_STR_EQ(content[0], "Hello world!");
  ASSERT_STR_EQ(content[1], "Hello");
  ASSERT_EQ(n_role[0], 1);
  ASSERT_EQ(n_role[1], 1);
  ASSERT_EQ(n_lp[0], 3);
  ASSERT_EQ(n_lp[1], 2);
  ASSERT_EQ(n_finish[0], 1);
  ASSERT_EQ(n_finish[1], 1);
  ASSERT_STR_EQ(finish[0], "length");
  ASSERT_STR_EQ(finish[1], "stop");
  /* the first event is the role chunk of choice 0 */
  ASSERT_EQ(JI(json_array_get(json_object_get(ev[0], "choices"), 0), "index"),
            0);
  for (size_t e = 0; e < n; e++) json_decref(ev[e]);
  tn_buf_free(&out);
  tn_api_stream_free(&st);
  tn_api_request_free(&q);
  tn_tokenizer_free(f.tok);
}

static void test_stream_completions(void) {
  struct fixture f;
  if (!fixture_init(&f)) return;
  const char *body =
      "{\"prompt\":[[1,2],[3]],\"logprobs\":1,\"stream\":true,\"echo\":true}";
  struct tn_api_request q;
  struct tn_api_error err;
  ASSERT_EQ(tn_api_parse(CM, body, strlen(body), &q, &err), 0);
  char text[] = "Hello world";
  struct tn_choice c0, c1;
  set_choice(&c0, text, 5, f.toks, 1, 1, TN_FINISH_NONE);
  set_choice(&c1, text, 0, f.toks, 0, 0, TN_FINISH_NONE);
  struct tn_req r0 = {.n_prompt = 2, .n_choices = 1, .choices = &c0};
  struct tn_req r1 = {.n_prompt = 1, .n_choices = 1, .choices = &c1};
  struct tn_req *reqs[2] = {&r0, &r1};
  const char *echo[2] = {"AB", ""};
  size_t echo_len[2] = {2, 0};
  struct tn_api_meta meta = {.id = "cmpl-s", .created = 1, .model = "m",
                             .tok = f.tok, .echo_text = echo,
                             .echo_len = echo_len};
  struct tn_api_stream st;
  tn_api_stream_init(&st);
  struct tn_buf out = {0};
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 2, &st, &out));
  c0.len = 11, c0.n_toks = 2, c0.n_gen = 2, c0.finish = TN_FINISH_STOP;
  r0.done = true;
  ASSERT(!tn_api_render_stream(&q, &meta, reqs, 2, &st, &out));
  c1.finish = TN_FINISH_LENGTH; /* no tokens at all */
  r1.done = true;
  ASSERT(tn_api_render_stream(&q, &meta, reqs, 2, &st, &out));

  json_t *ev[16];
  bool done;
  int bad_frames = 0;
  size_t n = sse_events(out.data, out.len, ev, 16, &done, &bad_frames);
  ASSERT_EQ(bad_frames, 0);
  ASSERT(done);
  /* echo c0, "Hello" c0, " world" c0, finish c0, finish c1 */
  ASSERT_EQ(n, 5);
  char texts[2][64] = {{0}};
  int fails = 0;
  json_int_t offsets[8];
  int n_off = 0;
  for (size_t e = 0; e < n; e++) {
    if (strcmp(JS(ev[e], "object"), "text_completion") != 0) fails++;
    if (json_object_get(ev[e], "usage")) fails++; /* not asked for */
    json_t *c = json_array_get(json_object_get(ev[e], "choices"), 0);
    json_int_t idx = JI(c, "index");
    if (idx < 0 || idx > 1 || !JS(c, "text")) {
      fails++;
      continue;
    }
    strcat(texts[idx], JS(c, "text"));
    json_t *lp = json_object_get(c, "logprobs");
    json_t *offs = json_object_get(lp, "text_offset");
    for (size_t t = 0; t < json_array_size(offs) && n_off < 8; t++)
      offsets[n_off++] = json_integer_value(json_array_get(offs, t));
  }
  ASSERT_EQ(fails, 0);
  ASSERT_STR_EQ(texts[0], "ABHello world");
  ASSERT_STR_EQ(texts[1], "");
  ASSERT_EQ(n_off, 2);
  ASSERT_EQ(offsets[0], 2);
  ASSERT_EQ(offsets[1], 7);
  json_t *last = json_array_get(json_object_get(ev[4], "choices"), 0);
  ASSERT_EQ(JI(last, "index"), 1);
  ASSERT_STR_EQ(JS(last, "finish_reason"), "length");
  for (size_t e = 0; e < n; e++) json_decref(ev[e]);
  tn_buf_free(&out);
  tn_api_stream_free(&st);
  tn_api_request_free(&q);
  tn_tokenizer_free(f.tok);
}

/* ---- tools (tools.c) */

static void test_tools_parse(void) {
  char *names[] = {"get_weather", "add"};
  struct tn_tool_calls tc;
  /* two tagged calls after some text; arguments re-serialised compactly */
  const char *t1 = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", "
                   "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
                   "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, "
                   "\"b\": [2, 3]}}\n</tool_call>";
  ASSERT(tn_tools_parse(t1, strlen(t1), names, 2, &tc));
  ASSERT_EQ(tc.n_calls, 2);
  ASSERT_EQ(tc.content_len, strlen("Let me check."));
  ASSERT_STR_EQ(tc.calls[0].name, "get_weather");
  ASSERT_STR_EQ(tc.calls[0].arguments, "{\"city\":\"Paris\"}");
  ASSERT_STR_EQ(tc.calls[1].arguments, "{\"a\":1,\"b\":[2,3]}");
  tn_tool_calls_free(&tc);
  /* the last block may lack its closing tag; arguments as a JSON string */
  const char *t2 = "<tool_call>{\"name\":\"add\",\"arguments\":\"{\\\"a\\\":1}\"}";
  ASSERT(tn_tools_parse(t2, strlen(t2), names, 2, &tc));
  ASSERT_EQ(tc.n_calls, 1);
  ASSERT_EQ(tc.content_len, 0);
  ASSERT_STR_EQ(tc.calls[0].arguments, "{\"a\":1}");
  tn_tool_calls_free(&tc);
  /* a bare object, in a fence */
  const char *t3 = "```json\n{\"name\": \"add\", \"arguments\": {}}\n```";
  ASSERT(tn_tools_parse(t3, strlen(t3), names, 2, &tc));
  ASSERT_EQ(tc.n_calls, 1);
  tn_tool_calls_free(&tc);
  /* not calls: plain text, an unknown function, broken JSON, text after a
   * call, arguments that are not an object */
  const char *no[] = {
      "The weather is fine.",
      "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
      "<tool_call>{\"name\": \"add\", \"arguments\": {</tool_call>",
      "<tool_call>{\"name\":\"add\",\"arguments\":{}}</tool_call> and more",
      "<tool_call>{\"name\":\"add\",\"arguments\":[1]}</tool_call>",
      "{\"name\": \"add\"}",
      "",
  };
  for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
    if (tn_tools_parse(no[i], strlen(no[i]), names, 2, &tc)) {
      fprintf(stderr, "parsed as calls: %s\n", no[i]);
      ASSERT(0);
    }
    ASSERT_EQ(tc.n_calls, 0);
  }
}

static void test_tools_stream_safe(void) {
  static const struct {
    const char *text;
    size_t safe;
  } cases[] = {
      {"Hello there", 11},        {"Hello <tool", 6},
      {"Hello <", 6},             {"Hi <tool_call>{\"name\"", 3},
      {"Hi <tool_call", 3},       {"Hi <tool_cal>", 13},
      {"{\"name\":", 0},          {"  ```json", 0},
      {"", 0},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
    ASSERT_EQ(tn_tools_stream_safe(cases[i].text, strlen(cases[i].text)),
              cases[i].safe);
}

static void test_tools_grammar(void) {
  const char *tools =
      "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
      "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{"
      "\"type\":\"string\"},\"days\":{\"type\":\"integer\",\"minimum\":1,"
      "\"maximum\":7}},\"required\":[\"city\",\"days\"]}}},"
      "{\"type\":\"function\",\"function\":{\"name\":\"ping\"}}]";
  struct tn_api_error err = {0};
  struct tn_grammar *g = NULL;
  ASSERT_EQ(tn_tools_grammar(tools, strlen(tools), NULL, true, &g, &err), 0);
  static const struct {
    const char *text;
    bool ok;
  } cases[] = {
      {"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
       "\"Oslo\", \"days\": 3}}\n</tool_call>", true},
      {"<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>\n"
       "<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>", true},
      /* days out of range, a missing required key, an unknown function */
      {"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
       "\"Oslo\", \"days\": 9}}\n</tool_call>", false},
      {"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
       "\"Oslo\"}}\n</tool_call>", false},
      {"<tool_call>\n{\"name\": \"pong\", \"arguments\": {}}\n</tool_call>",
       false},
      {"Sure! <tool_call>", false},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct tn_grammar_matcher *m = NULL;
    struct tn_error e = {0};
    ASSERT_EQ(tn_grammar_matcher_new(g, NULL, &m, &e), TN_OK);
    bool ok = tn_grammar_matcher_accept_bytes(m, cases[i].text,
                                              strlen(cases[i].text)) &&
              tn_grammar_matcher_can_end(m);
    if (ok != cases[i].ok) fprintf(stderr, "grammar case %zu\n", i);
    ASSERT_EQ(ok, cases[i].ok);
    tn_grammar_matcher_free(m);
  }
  tn_grammar_release(g);
  /* one named function only, one call */
  ASSERT_EQ(tn_tools_grammar(tools, strlen(tools), "ping", false, &g, &err),
            0);
  struct tn_grammar_matcher *m = NULL;
  struct tn_error e = {0};
  ASSERT_EQ(tn_grammar_matcher_new(g, NULL, &m, &e), TN_OK);
  const char *two = "<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n"
                    "</tool_call>\n<tool_call>";
  ASSERT(!tn_grammar_matcher_accept_bytes(m, two, strlen(two)));
  tn_grammar_matcher_free(m);
  tn_grammar_release(g);
}

TN_TEST_MAIN(TN_TEST(test_parse_bad), TN_TEST(test_parse_caps),
             TN_TEST(test_parse_mutations),
             TN_TEST(test_parse_chat_full), TN_TEST(test_parse_chat_defaults),
             TN_TEST(test_parse_nul_content), TN_TEST(test_parse_prompts),
             TN_TEST(test_error_json), TN_TEST(test_buf),
             TN_TEST(test_render_chat), TN_TEST(test_render_completions),
             TN_TEST(test_stream_chat), TN_TEST(test_stream_completions),
             TN_TEST(test_tools_parse), TN_TEST(test_tools_stream_safe),
             TN_TEST(test_tools_grammar))
