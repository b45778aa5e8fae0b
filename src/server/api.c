/*
 * api.c: the OpenAI schema, in and out.
 *
 * Parsing. The body is untrusted: jansson parses it (rejecting invalid
 * UTF-8, keeping NUL bytes inside strings with JSON_ALLOW_NUL, taking the
 * last of duplicate keys), then every known field is checked for its JSON
 * type and its range. Unknown fields are ignored (clients send extras),
 * except those that would change what the output means and that tern
 * does not do yet (tools, suffix, best_of above n, audio): those are
 * refused with a 400 naming them (unsupported()), never silently ignored.
 * Output constraints (response_format, structured_outputs, guided_*,
 * grammar, json_schema) compile to a grammar here, so a bad schema is a
 * 400 before anything runs. null means "absent" for every optional
 * field. Each rejection is a 400
 * whose `param` names the field (nested ones as "messages[2].content") and
 * whose message names the bad value, quoted the way JSON would write it.
 * String lengths always come from json_string_length(), never strlen(), so
 * content with NULs keeps its exact length.
 *
 * Rendering. Responses are written straight into a struct tn_buf with our
 * own JSON string escaper (faster than building jansson trees, and it lets
 * us repair what jansson would refuse): control bytes become \uXXXX, and
 * any byte that does not start a valid UTF-8 sequence becomes U+FFFD, so
 * the output is valid JSON whatever the model produced. Token strings in
 * logprobs come from tn_tokenizer_piece() without special tokens; a token
 * may be part of a UTF-8 character, so its "token" string is repaired while
 * "bytes" carries the raw bytes.
 *
 * The caller holds tn_req_lock() of every request across a render call;
 * nothing here locks.
 */
#include "server/api.h"

#include "grammar/grammar.h"

#include <jansson.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define API_MAX_TOKENS 1000000
#define API_PROMPTS_MAX 64
#define API_BIAS_MAX 1024

static void buf_puts(struct tn_buf *b, const char *s) {
  tn_buf_append(b, s, strlen(s));
}

static void buf_putc(struct tn_buf *b, char c) { tn_buf_append(b, &c, 1); }


/* ---- JSON writing */

/* Length of the valid UTF-8 sequence at s[0..n), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F; /* no surrogates */
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (n < need) return 0;
  if (s[1] < lo || s[1] > hi) return 0;
  for (size_t k = 2; k < need; k++)
    if (s[k] < 0x80 || s[k] > 0xBF) return 0;
  return need;
}

/* Characters in s[0..n) as a client decoding UTF-8 would count them. */
static size_t utf8_chars(const char *s, size_t n) {
  size_t c = 0;
  for (size_t i = 0; i < n; i++)
    if (((unsigned char)s[i] & 0xC0) != 0x80) c++;
  return c;
}

/* Writes s[0..n) escaped, without quotes. */
static void put_esc(struct tn_buf *b, const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  size_t i = 0, run = 0; /* run: start of bytes not yet written */
  while (i < n) {
    unsigned char c = u[i];
    if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
      i++;
      continue;
    }
    if (c >= 0x80) {
      size_t k = utf8_seq(u + i, n - i);
      if (k) {
        i += k;
        continue;
      }
    }
    tn_buf_append(b, s + run, i - run);
    switch (c) {
    case '"': buf_puts(b, "\\\""); break;
    case '\\': buf_puts(b, "\\\\"); break;
    case '\n': buf_puts(b, "\\n"); break;
    case '\r': buf_puts(b, "\\r"); break;
    case '\t': buf_puts(b, "\\t"); break;
    case '\b': buf_puts(b, "\\b"); break;
    case '\f': buf_puts(b, "\\f"); break;
    default:
      if (c < 0x20) tn_buf_printf(b, "\\u%04x", c);
      else buf_puts(b, "\xEF\xBF\xBD"); /* invalid UTF-8 byte: U+FFFD */
    }
    i++;
    run = i;
  }
  tn_buf_append(b, s + run, n - run);
}

static void put_str(struct tn_buf *b, const char *s, size_t n) {
  buf_putc(b, '"');
  put_esc(b, s, n);
  buf_putc(b, '"');
}

static void put_cstr(struct tn_buf *b, const char *s) {
  if (s) put_str(b, s, strlen(s));
  else buf_puts(b, "null");
}

static void put_float(struct tn_buf *b, float f) {
  if (!isfinite(f)) {
    buf_puts(b, "-9999.0"); /* what OpenAI reports for impossible tokens */
    return;
  }
  tn_buf_printf(b, "%.9g", (double)f);
}

/* ---- errors */

static int error_vset(struct tn_api_error *err, int http_status,
                      const char *type, const char *param, const char *code,
                      const char *fmt, va_list ap) {
  if (!err) return http_status;
  memset(err, 0, sizeof(*err));
  err->http_status = http_status;
  snprintf(err->type, sizeof(err->type), "%s",
           type ? type : "invalid_request_error");
  snprintf(err->param, sizeof(err->param), "%s", param ? param : "");
  snprintf(err->code, sizeof(err->code), "%s", code ? code : "");
  vsnprintf(err->message, sizeof(err->message), fmt, ap);
  return http_status;
}

int tn_api_error_set(struct tn_api_error *err, int http_status,
                     const char *type, const char *param, const char *code,
                     const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = error_vset(err, http_status, type, param, code, fmt, ap);
  va_end(ap);
  return r;
}

char *tn_api_error_json(const struct tn_api_error *err, size_t *len) {
  struct tn_buf b = {0};
  buf_puts(&b, "{\"error\":{\"message\":");
  put_cstr(&b, err->message);
  buf_puts(&b, ",\"type\":");
  put_cstr(&b, err->type[0] ? err->type : "invalid_request_error");
  buf_puts(&b, ",\"param\":");
  put_cstr(&b, err->param[0] ? err->param : NULL);
  buf_puts(&b, ",\"code\":");
  put_cstr(&b, err->code[0] ? err->code : NULL);
  buf_puts(&b, "}}");
  if (b.oom) {
    tn_buf_free(&b);
    return NULL;
  }
  if (len) *len = b.len;
  return b.data;
}

/* A 400 naming param. */
__attribute__((format(printf, 3, 4))) static int bad(
    struct tn_api_error *err, const char *param, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = error_vset(err, 400, "invalid_request_error", param, NULL, fmt, ap);
  va_end(ap);
  return r;
}

/* A short rendering of a JSON value for messages. */
struct shown {
  char s[112];
};

static struct shown show(const json_t *v) {
  struct shown o;
  o.s[0] = '\0';
  switch (json_typeof(v)) {
  case JSON_NULL: snprintf(o.s, sizeof(o.s), "null"); break;
  case JSON_TRUE: snprintf(o.s, sizeof(o.s), "true"); break;
  case JSON_FALSE: snprintf(o.s, sizeof(o.s), "false"); break;
  case JSON_INTEGER:
    snprintf(o.s, sizeof(o.s), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    break;
  case JSON_REAL: snprintf(o.s, sizeof(o.s), "%.10g", json_real_value(v)); break;
  case JSON_ARRAY:
    snprintf(o.s, sizeof(o.s), json_array_size(v) ? "an array" : "[]");
    break;
  case JSON_OBJECT:
    snprintf(o.s, sizeof(o.s), json_object_size(v) ? "an object" : "{}");
    break;
  case JSON_STRING: {
    const char *s = json_string_value(v);
    size_t n = json_string_length(v), cut = n;
    if (cut > 48) { /* cut at a character boundary */
      cut = 48;
      while (cut > 0 && ((unsigned char)s[cut] & 0xC0) == 0x80) cut--;
    }
    struct tn_buf b = {0};
    put_str(&b, s, cut);
    if (!b.oom)
      snprintf(o.s, sizeof(o.s), "%s%s", b.data, cut < n ? "..." : "");
    tn_buf_free(&b);
    break;
  }
  }
  return o;
}

/* ---- field readers: absent or null leave *out unchanged and return 0 */

static json_t *field(const json_t *o, const char *key) {
  json_t *v = json_object_get(o, key);
  return v && !json_is_null(v) ? v : NULL;
}

/* Integer value of v (a JSON integer, or a real with an integral value). */
static bool as_int(const json_t *v, int64_t *out) {
  if (json_is_integer(v)) {
    *out = json_integer_value(v);
    return true;
  }
  if (json_is_real(v)) {
    double d = json_real_value(v);
    if (d == trunc(d) && d >= -9223372036854775808.0 &&
        d < 9223372036854775808.0) {
      *out = (int64_t)d;
      return true;
    }
  }
  return false;
}

static int get_bool(const json_t *o, const char *key, bool *out, bool *set,
                    struct tn_api_error *err) {
  json_t *v = field(o, key);
  if (!v) return 0;
  if (!json_is_boolean(v))
    return bad(err, key, "'%s' must be a boolean, got %s", key, show(v).s);
  *out = json_is_true(v);
  if (set) *set = true;
  return 0;
}

/* range: text after "must be an integer", e.g. "between 1 and 16". */
static int get_int(const json_t *o, const char *key, int64_t lo, int64_t hi,
                   const char *range, int64_t *out, bool *set,
                   struct tn_api_error *err) {
  json_t *v = field(o, key);
  if (!v) return 0;
  int64_t x;
  if (!as_int(v, &x) || x < lo || x > hi)
    return bad(err, key, "'%s' must be an integer%s%s, got %s", key,
               range[0] ? " " : "", range, show(v).s);
  *out = x;
  if (set) *set = true;
  return 0;
}

/* lo_open: lo itself is excluded. */
static int get_num(const json_t *o, const char *key, double lo, bool lo_open,
                   double hi, const char *range, float *out,
                   struct tn_api_error *err) {
  json_t *v = field(o, key);
  if (!v) return 0;
  double d = json_is_number(v) ? json_number_value(v) : NAN;
  if (!json_is_number(v) || !(lo_open ? d > lo : d >= lo) || !(d <= hi))
    return bad(err, key, "'%s' must be a number %s, got %s", key, range,
               show(v).s);
  *out = (float)d;
  return 0;
}

static char *dup_bytes(const char *s, size_t n) {
  if (n == SIZE_MAX) return NULL;
  char *d = malloc(n + 1);
  if (!d) return NULL;
  if (n) memcpy(d, s, n);
  d[n] = '\0';
  return d;
}

static int oom(struct tn_api_error *err) {
  return tn_api_error_set(err, 503, "server_error", NULL, NULL,
                          "out of memory while parsing the request");
}

/* ---- chat messages */

static int parse_content(const json_t *m, size_t i, bool assistant,
                         struct tn_chat_msg *out, struct tn_api_error *err) {
  char param[64];
  snprintf(param, sizeof(param), "messages[%zu].content", i);
  json_t *c = field(m, "content");
  if (!c) {
    if (!assistant)
      return bad(err, param, "'%s' is required for this role", param);
    out->content = dup_bytes("", 0);
    if (!out->content) return oom(err);
    return 0;
  }
  if (json_is_string(c)) {
    out->content_len = json_string_length(c);
    out->content = dup_bytes(json_string_value(c), out->content_len);
    if (!out->content) return oom(err);
    return 0;
  }
  if (!json_is_array(c))
    return bad(err, param,
               "'%s' must be a string or an array of text parts, got %s",
               param, show(c).s);
  /* an array of {"type":"text","text":...}: concatenated */
  size_t total = 0, k;
  json_t *part;
  json_array_foreach(c, k, part) {
    char pp[64];
    snprintf(pp, sizeof(pp), "messages[%zu].content[%zu]", i, k);
    if (!json_is_object(part))
      return bad(err, pp, "'%s' must be an object, got %s", pp, show(part).s);
    json_t *type = json_object_get(part, "type");
    if (!json_is_string(type))
      return bad(err, pp, "'%s.type' must be a string, got %s", pp,
                 type ? show(type).s : "nothing");
    if (strcmp(json_string_value(type), "text") != 0 ||
        json_string_length(type) != 4)
      return bad(err, pp,
                 "'%s.type' %s is not supported; only \"text\" parts are", pp,
                 show(type).s);
    json_t *text = json_object_get(part, "text");
    if (!json_is_string(text))
      return bad(err, pp, "'%s.text' must be a string, got %s", pp,
                 text ? show(text).s : "nothing");
    size_t n = json_string_length(text);
    if (n > SIZE_MAX - 1 - total) return oom(err);
    total += n;
  }
  char *s = malloc(total + 1);
  if (!s) return oom(err);
  size_t at = 0;
  json_array_foreach(c, k, part) {
    json_t *text = json_object_get(part, "text");
    size_t n = json_string_length(text);
    if (n) memcpy(s + at, json_string_value(text), n);
    at += n;
  }
  s[at] = '\0';
  out->content = s;
  out->content_len = total;
  return 0;
}

/* An assistant turn's tool_calls; a tool turn's tool_call_id and name. */
static int parse_message_tools(const json_t *m, size_t i, bool assistant,
                               struct tn_chat_msg *out,
                               struct tn_api_error *err) {
  char param[80];
  json_t *v;
  bool tool = !strcmp(out->role, "tool");
  if ((v = field(m, "tool_calls"))) {
    snprintf(param, sizeof(param), "messages[%zu].tool_calls", i);
    if (!assistant)
      return bad(err, param, "'%s' is only allowed on assistant messages",
                 param);
    if (!json_is_array(v))
      return bad(err, param, "'%s' must be an array, got %s", param,
                 show(v).s);
    size_t k;
    json_t *tc;
    json_array_foreach(v, k, tc) {
      snprintf(param, sizeof(param), "messages[%zu].tool_calls[%zu]", i, k);
      json_t *fn = json_is_object(tc) ? json_object_get(tc, "function") : NULL;
      json_t *name = json_is_object(fn) ? json_object_get(fn, "name") : NULL;
      json_t *args = json_is_object(fn) ? json_object_get(fn, "arguments") : NULL;
      if (!json_is_string(name))
        return bad(err, param,
                   "'%s' must be an object with function.name (a string)",
                   param);
      if (args && !json_is_string(args) && !json_is_object(args))
        return bad(err, param,
                   "'%s.function.arguments' must be a string (JSON) or an "
                   "object, got %s",
                   param, show(args).s);
    }
    if (json_array_size(v)) {
      out->tool_calls_json = json_dumps(v, JSON_COMPACT);
      if (!out->tool_calls_json) return oom(err);
      out->tool_calls_len = strlen(out->tool_calls_json);
    }
  }
  const char *keys[2] = {"tool_call_id", "name"};
  for (int k = 0; k < 2; k++) {
    if (!(v = field(m, keys[k]))) continue;
    snprintf(param, sizeof(param), "messages[%zu].%s", i, keys[k]);
    if (!json_is_string(v) ||
        strlen(json_string_value(v)) != json_string_length(v))
      return bad(err, param, "'%s' must be a string, got %s", param,
                 show(v).s);
    /* on other turns: ids clients echo, participant names; not used */
    if (!tool) continue;
    char *d = dup_bytes(json_string_value(v), json_string_length(v));
    if (!d) return oom(err);
    if (k == 0) out->tool_call_id = d;
    else out->name = d;
  }
  return 0;
}

static int parse_messages(const json_t *o, struct tn_api_request *q,
                          struct tn_api_error *err) {
  json_t *a = field(o, "messages");
  if (!a) return bad(err, "messages", "'messages' is required");
  if (!json_is_array(a) || json_array_size(a) == 0)
    return bad(err, "messages",
               "'messages' must be a non-empty array of message objects, "
               "got %s",
               show(a).s);
  size_t n = json_array_size(a);
  q->msgs = calloc(n, sizeof(*q->msgs));
  if (!q->msgs) return oom(err);
  for (size_t i = 0; i < n; i++) {
    json_t *m = json_array_get(a, i);
    char param[64];
    snprintf(param, sizeof(param), "messages[%zu]", i);
    if (!json_is_object(m))
      return bad(err, param, "'%s' must be an object, got %s", param,
                 show(m).s);
    snprintf(param, sizeof(param), "messages[%zu].role", i);
    json_t *role = json_object_get(m, "role");
    if (!role || json_is_null(role))
      return bad(err, param, "'%s' is required", param);
    if (!json_is_string(role))
      return bad(err, param, "'%s' must be a string, got %s", param,
                 show(role).s);
    const char *r = json_string_value(role);
    size_t rl = json_string_length(role);
    const char *canon = NULL;
    if (rl == strlen(r)) {
      if (!strcmp(r, "system") || !strcmp(r, "developer")) canon = "system";
      else if (!strcmp(r, "user")) canon = "user";
      else if (!strcmp(r, "assistant")) canon = "assistant";
      else if (!strcmp(r, "tool")) canon = "tool";
      else if (!strcmp(r, "function"))
        return bad(err, param,
                   "'%s' \"function\" (the legacy function-calling role) is "
                   "not supported; send the result as role \"tool\" with "
                   "its tool_call_id",
                   param);
    }
    if (!canon)
      return bad(err, param,
                 "'%s' must be one of system, developer, user, assistant, "
                 "tool, got %s",
                 param, show(role).s);
    q->msgs[i].role = dup_bytes(canon, strlen(canon));
    q->n_msgs = i + 1; /* freed from here on */
    if (!q->msgs[i].role) return oom(err);
    bool assistant = canon[0] == 'a';
    int rc = parse_message_tools(m, i, assistant, &q->msgs[i], err);
    if (rc) return rc;
    json_t *ct = field(m, "content");
    if (assistant && q->msgs[i].tool_calls_json && !ct) {
      q->msgs[i].content = NULL; /* None in the template */
      continue;
    }
    rc = parse_content(m, i, assistant, &q->msgs[i], err);
    if (rc) return rc;
  }
  return 0;
}

/* ---- completions prompts */

static int parse_ids(const json_t *a, const char *param, int32_t **ids,
                     size_t *n_ids, struct tn_api_error *err) {
  size_t n = json_array_size(a);
  if (n == 0)
    return bad(err, param, "'%s' must not be an empty list of token ids",
               param);
  int32_t *d = malloc(n * sizeof(*d));
  if (!d) return oom(err);
  for (size_t k = 0; k < n; k++) {
    json_t *v = json_array_get(a, k);
    int64_t x;
    if (!as_int(v, &x) || x < 0 || x > INT32_MAX) {
      free(d);
      return bad(err, param,
                 "'%s' token ids must be integers >= 0, got %s at index %zu",
                 param, show(v).s, k);
    }
    d[k] = (int32_t)x;
  }
  *ids = d;
  *n_ids = n;
  return 0;
}

static int parse_prompt(const json_t *o, struct tn_api_request *q,
                        struct tn_api_error *err) {
  json_t *p = field(o, "prompt");
  if (!p) return bad(err, "prompt", "'prompt' is required");
  if (json_is_string(p)) {
    q->prompts = calloc(1, sizeof(*q->prompts));
    if (!q->prompts) return oom(err);
    q->n_prompts = 1;
    q->prompts[0].len = json_string_length(p);
    q->prompts[0].text = dup_bytes(json_string_value(p), q->prompts[0].len);
    return q->prompts[0].text ? 0 : oom(err);
  }
  static const char *kinds =
      "a string, an array of strings, an array of token ids or an array of "
      "arrays of token ids";
  if (!json_is_array(p))
    return bad(err, "prompt", "'prompt' must be %s, got %s", kinds,
               show(p).s);
  size_t n = json_array_size(p);
  if (n == 0) return bad(err, "prompt", "'prompt' must not be empty, got []");
  json_t *first = json_array_get(p, 0);
  if (json_is_integer(first) || json_is_real(first)) {
    /* one prompt of token ids */
    q->prompts = calloc(1, sizeof(*q->prompts));
    if (!q->prompts) return oom(err);
    q->n_prompts = 1;
    return parse_ids(p, "prompt", &q->prompts[0].ids, &q->prompts[0].n_ids,
                     err);
  }
  if (n > API_PROMPTS_MAX)
    return bad(err, "prompt", "'prompt' holds %zu prompts; at most %d allowed",
               n, API_PROMPTS_MAX);
  bool strings = json_is_string(first);
  if (!strings && !json_is_array(first))
    return bad(err, "prompt", "'prompt' must be %s, got an array holding %s",
               kinds, show(first).s);
  q->prompts = calloc(n, sizeof(*q->prompts));
  if (!q->prompts) return oom(err);
  for (size_t i = 0; i < n; i++) {
    json_t *v = json_array_get(p, i);
    char param[64];
    snprintf(param, sizeof(param), "prompt[%zu]", i);
    q->n_prompts = i + 1;
    if (strings) {
      if (!json_is_string(v))
        return bad(err, param,
                   "'%s' must be a string like the other prompts, got %s",
                   param, show(v).s);
      q->prompts[i].len = json_string_length(v);
      q->prompts[i].text = dup_bytes(json_string_value(v), q->prompts[i].len);
      if (!q->prompts[i].text) return oom(err);
    } else {
      if (!json_is_array(v))
        return bad(err, param,
                   "'%s' must be an array of token ids like the other "
                   "prompts, got %s",
                   param, show(v).s);
      int rc = parse_ids(v, param, &q->prompts[i].ids, &q->prompts[i].n_ids,
                         err);
      if (rc) return rc;
    }
  }
  return 0;
}

/* ---- stop, logit_bias */

static int parse_stop(const json_t *o, struct tn_api_request *q,
                      struct tn_api_error *err) {
  json_t *s = field(o, "stop");
  if (!s) return 0;
  size_t n;
  if (json_is_string(s)) {
    n = 1;
  } else if (json_is_array(s)) {
    n = json_array_size(s);
    if (n > TN_GEN_STOPS_MAX)
      return bad(err, "stop",
                 "'stop' holds %zu strings; at most %d are allowed", n,
                 TN_GEN_STOPS_MAX);
  } else {
    return bad(err, "stop",
               "'stop' must be a string or an array of strings, got %s",
               show(s).s);
  }
  if (n == 0) return 0;
  q->stops = calloc(n, sizeof(*q->stops));
  if (!q->stops) return oom(err);
  for (size_t i = 0; i < n; i++) {
    json_t *v = json_is_string(s) ? s : json_array_get(s, i);
    if (!json_is_string(v))
      return bad(err, "stop", "'stop' entries must be strings, got %s",
                 show(v).s);
    size_t len = json_string_length(v);
    if (len == 0)
      return bad(err, "stop", "'stop' strings must not be empty, got \"\"");
    if (memchr(json_string_value(v), '\0', len))
      return bad(err, "stop", "'stop' strings must not contain NUL, got %s",
                 show(v).s);
    q->stops[i] = dup_bytes(json_string_value(v), len);
    q->gen.n_stops = (int32_t)(i + 1); /* freed from here on */
    if (!q->stops[i]) return oom(err);
  }
  q->gen.stops = (const char *const *)q->stops;
  return 0;
}

static int parse_bias(const json_t *o, struct tn_api_request *q,
                      struct tn_api_error *err) {
  json_t *b = field(o, "logit_bias");
  if (!b) return 0;
  if (!json_is_object(b))
    return bad(err, "logit_bias",
               "'logit_bias' must be an object mapping token ids to numbers, "
               "got %s",
               show(b).s);
  size_t n = json_object_size(b);
  if (n > API_BIAS_MAX)
    return bad(err, "logit_bias",
               "'logit_bias' holds %zu entries; at most %d are allowed", n,
               API_BIAS_MAX);
  if (n == 0) return 0;
  q->bias = calloc(n, sizeof(*q->bias));
  if (!q->bias) return oom(err);
  size_t i = 0;
  const char *key;
  json_t *v;
  json_object_foreach(b, key, v) {
    /* keys: decimal token ids */
    size_t kl = strlen(key);
    int64_t id = 0;
    bool ok = kl > 0 && kl <= 10;
    for (size_t k = 0; ok && k < kl; k++) {
      if (key[k] < '0' || key[k] > '9') ok = false;
      else id = id * 10 + (key[k] - '0');
    }
    if (!ok || id > INT32_MAX) {
      struct tn_buf kb = {0};
      put_str(&kb, key, kl > 48 ? 48 : kl);
      int r = bad(err, "logit_bias",
                  "'logit_bias' keys must be token ids (non-negative "
                  "integers), got %s",
                  kb.data ? kb.data : "?");
      tn_buf_free(&kb);
      return r;
    }
    if (!json_is_number(v) || !(json_number_value(v) >= -100.0) ||
        !(json_number_value(v) <= 100.0))
      return bad(err, "logit_bias",
                 "'logit_bias' values must be numbers between -100 and 100, "
                 "got %s for token %s",
                 show(v).s, key);
    q->bias[i].id = (int32_t)id;
    q->bias[i].bias = (float)json_number_value(v);
    i++;
  }
  q->gen.sampling.bias = q->bias;
  q->gen.sampling.n_bias = (int32_t)i;
  return 0;
}

/* A 400 for a field tern does not support yet, code
 * "unsupported_parameter". */
__attribute__((format(printf, 3, 4))) static int unsupported_field(
    struct tn_api_error *err, const char *param, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = error_vset(err, 400, "invalid_request_error", param,
                     "unsupported_parameter", fmt, ap);
  va_end(ap);
  return r;
}

/* ---- constrained output
 *
 * Where a request asks for a shape of output, and the grammar that
 * makes it: OpenAI's response_format (json_object, json_schema), vLLM's
 * structured_outputs {json, regex, choice, grammar, json_object} and its
 * older guided_json / guided_regex / guided_choice / guided_grammar, and
 * llama.cpp's grammar / json_schema. One of them per request. */

static int compile_error(struct tn_api_error *err, const char *param,
                         const struct tn_error *e) {
  if (e->status == TN_ENOMEM) return oom(err);
  return bad(err, param, "%s: %s", param, e->msg);
}

/* A schema given as an object (or boolean) or as JSON text. */
static int schema_grammar(const json_t *v, const char *param,
                          struct tn_grammar **g, struct tn_api_error *err) {
  struct tn_error e = {0};
  char *text = NULL;
  size_t len;
  if (json_is_string(v)) {
    len = json_string_length(v);
    text = dup_bytes(json_string_value(v), len);
  } else if (json_is_object(v) || json_is_boolean(v)) {
    text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);
    len = text ? strlen(text) : 0;
  } else {
    return bad(err, param, "'%s' must be a JSON schema (an object), got %s",
               param, show(v).s);
  }
  if (!text) return oom(err);
  enum tn_status st = tn_grammar_from_json_schema(text, len, g, &e);
  free(text);
  return st == TN_OK ? 0 : compile_error(err, param, &e);
}

static int string_grammar(const json_t *v, const char *param, bool regex,
                          struct tn_grammar **g, struct tn_api_error *err) {
  if (!json_is_string(v))
    return bad(err, param, "'%s' must be a string, got %s", param, show(v).s);
  struct tn_error e = {0};
  enum tn_status st =
      regex ? tn_grammar_from_regex(json_string_value(v), json_string_length(v),
                                    g, &e)
            : tn_grammar_from_gbnf(json_string_value(v), json_string_length(v),
                                   g, &e);
  return st == TN_OK ? 0 : compile_error(err, param, &e);
}

#define API_CHOICES_MAX 10000

/* The list is also kept in q (option probabilities, early exit). */
static int choice_grammar(const json_t *v, const char *param,
                          struct tn_grammar **g, struct tn_api_request *q,
                          struct tn_api_error *err) {
  size_t n = json_is_array(v) ? json_array_size(v) : 0;
  if (n == 0 || n > API_CHOICES_MAX)
    return bad(err, param,
               "'%s' must be an array of 1 to %d strings, got %s", param,
               API_CHOICES_MAX, show(v).s);
  const char **c = malloc(n * sizeof *c);
  size_t *lens = malloc(n * sizeof *lens);
  if (!c || !lens) {
    free(c);
    free(lens);
    return oom(err);
  }
  int rc = 0;
  for (size_t i = 0; i < n && !rc; i++) {
    json_t *s = json_array_get(v, i);
    if (!json_is_string(s) || json_string_length(s) == 0)
      rc = bad(err, param, "'%s[%zu]' must be a non-empty string, got %s",
               param, i, show(s).s);
    else
      c[i] = json_string_value(s), lens[i] = json_string_length(s);
  }
  struct tn_error e = {0};
  if (!rc && tn_grammar_from_choices(c, lens, n, g, &e) != TN_OK)
    rc = compile_error(err, param, &e);
  if (!rc && n <= TN_GEN_OPTIONS_MAX) {
    q->options = calloc(n, sizeof(char *));
    q->option_lens = calloc(n, sizeof(size_t));
    if (!q->options || !q->option_lens) rc = oom(err);
    for (size_t i = 0; !rc && i < n; i++) {
      if (!(q->options[i] = dup_bytes(c[i], lens[i]))) rc = oom(err);
      q->option_lens[i] = lens[i];
      q->n_options = (int32_t)i + 1;
    }
  }
  free(c);
  free(lens);
  return rc;
}

/* vLLM's structured_outputs object (or the guided_* fields, prefix
 * "guided_"): exactly one of json, regex, choice, grammar, json_object. */
static int vllm_constraint(const json_t *o, const char *prefix,
                           const char *parent, struct tn_grammar **g,
                           struct tn_api_request *q, const char **which,
                           struct tn_api_error *err) {
  static const char *const kinds[] = {"json", "regex", "choice", "grammar",
                                      "json_object"};
  char name[64], param[96];
  int found = 0, rc = 0;
  for (size_t i = 0; i < sizeof kinds / sizeof *kinds && !rc; i++) {
    snprintf(name, sizeof name, "%s%s", prefix, kinds[i]);
    json_t *v = field(o, name);
    if (!v || (i == 4 && json_is_false(v))) continue;
    snprintf(param, sizeof param, "%s%s%s", parent, *parent ? "." : "", name);
    if (found++ || *g)
      return bad(err, param,
                 "only one output constraint may be given (response_format, "
                 "structured_outputs, guided_*, grammar or json_schema)");
    *which = kinds[i];
    if (i == 0) rc = schema_grammar(v, param, g, err);
    else if (i == 1) rc = string_grammar(v, param, true, g, err);
    else if (i == 2) rc = choice_grammar(v, param, g, q, err);
    else if (i == 3) rc = string_grammar(v, param, false, g, err);
    else if (!json_is_true(v))
      rc = bad(err, param, "'%s' must be a boolean, got %s", param, show(v).s);
    else {
      struct tn_error e = {0};
      if (tn_grammar_from_json_schema(NULL, 0, g, &e) != TN_OK)
        rc = compile_error(err, param, &e);
    }
  }
  return rc;
}

static int parse_constraint(const json_t *o, struct tn_api_request *q,
                            struct tn_api_error *err) {
  struct tn_grammar *g = NULL;
  const char *which = NULL;
  int rc = 0;
  json_t *v;
  if ((v = field(o, "response_format"))) {
    json_t *t = json_is_object(v) ? field(v, "type") : NULL;
    if (!t || !json_is_string(t))
      return bad(err, "response_format",
                 "'response_format' must be an object with a string 'type', "
                 "got %s",
                 show(v).s);
    const char *type = json_string_value(t);
    struct tn_error e = {0};
    if (strcmp(type, "json_object") == 0) {
      if (tn_grammar_from_json_schema(NULL, 0, &g, &e) != TN_OK)
        return compile_error(err, "response_format", &e);
    } else if (strcmp(type, "json_schema") == 0) {
      json_t *js = field(v, "json_schema");
      if (!js || !json_is_object(js))
        return bad(err, "response_format.json_schema",
                   "'response_format.json_schema' must be an object with a "
                   "'schema', got %s",
                   js ? show(js).s : "nothing");
      json_t *schema = field(js, "schema");
      rc = schema ? schema_grammar(schema, "response_format.json_schema.schema",
                                   &g, err)
                  : (tn_grammar_from_json_schema(NULL, 0, &g, &e) != TN_OK
                         ? compile_error(err, "response_format", &e)
                         : 0);
      if (rc) return rc;
    } else if (strcmp(type, "text") != 0) {
      return unsupported_field(err, "response_format",
                               "response_format type %s is not supported "
                               "('text', 'json_object' and 'json_schema' "
                               "are)",
                               show(t).s);
    }
  }
  if ((v = field(o, "structured_outputs"))) {
    if (!json_is_object(v))
      rc = bad(err, "structured_outputs",
               "'structured_outputs' must be an object, got %s", show(v).s);
    static const char *const refused[] = {"structural_tag",
                                          "whitespace_pattern"};
    for (size_t i = 0; !rc && i < sizeof refused / sizeof *refused; i++)
      if (field(v, refused[i]))
        rc = unsupported_field(err, "structured_outputs",
                               "'structured_outputs.%s' is not supported",
                               refused[i]);
    static const char *const flags[] = {"disable_any_whitespace",
                                        "disable_additional_properties"};
    for (size_t i = 0; !rc && i < sizeof flags / sizeof *flags; i++)
      if (field(v, flags[i]) && !json_is_false(field(v, flags[i])))
        rc = unsupported_field(err, "structured_outputs",
                               "'structured_outputs.%s' is not supported",
                               flags[i]);
    if (!rc)
      rc = vllm_constraint(v, "", "structured_outputs", &g, q, &which, err);
    if (!rc && !which)
      rc = bad(err, "structured_outputs",
               "'structured_outputs' needs one of json, regex, choice, "
               "grammar, json_object");
  }
  if (!rc) rc = vllm_constraint(o, "guided_", "", &g, q, &which, err);
  const char *llama[] = {"grammar", "json_schema"};
  for (size_t i = 0; !rc && i < 2; i++) {
    if (!(v = field(o, llama[i]))) continue;
    if (g) {
      rc = bad(err, llama[i],
               "only one output constraint may be given (response_format, "
               "structured_outputs, guided_*, grammar or json_schema)");
      break;
    }
    rc = i == 0 ? string_grammar(v, "grammar", false, &g, err)
                : schema_grammar(v, "json_schema", &g, err);
  }
  if (rc) {
    tn_grammar_release(g);
    return rc;
  }
  q->grammar = g;
  q->gen.grammar = g;
  /* extension: "early_exit": {"min_prob": p} for a choice list */
  if ((v = field(o, "early_exit"))) {
    json_t *mp = json_is_object(v) ? field(v, "min_prob") : NULL;
    double d = mp && json_is_number(mp) ? json_number_value(mp) : -1.0;
    if (!(d > 0.0 && d <= 1.0))
      return bad(err, "early_exit",
                 "'early_exit' must be {\"min_prob\": p} with p in (0, 1], "
                 "got %s",
                 show(v).s);
    if (q->n_options == 0)
      return bad(err, "early_exit",
                 "'early_exit' needs a choice list (structured_outputs.choice "
                 "or guided_choice) of at most %d options",
                 TN_GEN_OPTIONS_MAX);
    q->gen.option_min_prob = (float)d;
  }
  /* option probabilities when asked for (logprobs) or early exit is on */
  if (q->n_options > 0 && (q->gen.logprobs || q->gen.option_min_prob > 0)) {
    q->gen.options = (const char *const *)q->options;
    q->gen.option_lens = q->option_lens;
    q->gen.n_options = q->n_options;
  }
  return 0;
}

/* ---- the request */

/* Fields that change what the output means, which we cannot honour yet:
 * answering without them would hand the client something else than it
 * asked for (free text where it parses JSON, no tool call where it waits
 * for one). */
static int unsupported(enum tn_api_kind kind, const json_t *o,
                       const struct tn_api_request *q,
                       struct tn_api_error *err) {
  json_t *v;
  if (kind == TN_API_COMPLETIONS)
    for (int k = 0; k < 3; k++) {
      static const char *const chat_only[] = {"tools", "tool_choice",
                                              "parallel_tool_calls"};
      if (field(o, chat_only[k]))
        return unsupported_field(err, chat_only[k],
                                 "'%s' is only for /v1/chat/completions",
                                 chat_only[k]);
    }
  static const char *const never[] = {
      "functions", "function_call",               /* OpenAI, legacy */
      "guided_whitespace_pattern",                 /* vLLM */
      "audio",
  };
  for (size_t i = 0; i < sizeof(never) / sizeof(never[0]); i++)
    if (field(o, never[i]))
      return unsupported_field(err, never[i],
                               "'%s' is not supported by this server yet",
                               never[i]);
  if ((v = field(o, "modalities"))) {
    bool text_only = json_is_array(v);
    for (size_t i = 0; text_only && i < json_array_size(v); i++) {
      json_t *m = json_array_get(v, i);
      text_only = json_is_string(m) && !strcmp(json_string_value(m), "text");
    }
    if (!text_only)
      return unsupported_field(err, "modalities",
                               "'modalities' %s: this server produces text "
                               "only",
                               show(v).s);
  }
  if (kind == TN_API_COMPLETIONS) {
    if ((v = field(o, "suffix")) &&
        !(json_is_string(v) && json_string_length(v) == 0))
      return unsupported_field(err, "suffix",
                               "'suffix' (insert mode) is not supported by "
                               "this server");
    int64_t bo;
    if ((v = field(o, "best_of"))) {
      if (!as_int(v, &bo) || bo < 1)
        return bad(err, "best_of", "'best_of' must be an integer >= 1, got %s",
                   show(v).s);
      if (bo != q->gen.n && bo != 1)
        return unsupported_field(err, "best_of",
                                 "'best_of' %" PRId64 " above n (%d): "
                                 "choosing the best of several samples is "
                                 "not supported by this server",
                                 bo, q->gen.n);
    }
  }
  return 0;
}

/* ---- tools */

static bool tool_name_ok(const char *s, size_t n) {
  if (n == 0 || n > 64) return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '_' || c == '-'))
      return false;
  }
  return true;
}

static int parse_tools(const json_t *o, struct tn_api_request *q,
                       struct tn_api_error *err) {
  json_t *tools = field(o, "tools");
  json_t *choice = field(o, "tool_choice");
  int rc;
  q->parallel_tool_calls = true;
  if ((rc = get_bool(o, "parallel_tool_calls", &q->parallel_tool_calls, NULL,
                     err)))
    return rc;
  if (tools && !json_is_array(tools))
    return bad(err, "tools", "'tools' must be an array, got %s",
               show(tools).s);
  size_t n = tools ? json_array_size(tools) : 0;
  if (n > 512)
    return bad(err, "tools", "'tools' has %zu functions; at most 512", n);
  if (n) {
    q->tool_names = calloc(n, sizeof(*q->tool_names));
    if (!q->tool_names) return oom(err);
  }
  for (size_t i = 0; i < n; i++) {
    json_t *t = json_array_get(tools, i);
    char p[64];
    snprintf(p, sizeof(p), "tools[%zu]", i);
    if (!json_is_object(t))
      return bad(err, p, "'%s' must be an object, got %s", p, show(t).s);
    json_t *type = json_object_get(t, "type");
    if (!json_is_string(type) || strcmp(json_string_value(type), "function"))
      return bad(err, p, "'%s.type' must be \"function\", got %s", p,
                 type ? show(type).s : "nothing");
    json_t *fn = json_object_get(t, "function");
    if (!json_is_object(fn))
      return bad(err, p, "'%s.function' must be an object, got %s", p,
                 fn ? show(fn).s : "nothing");
    char pn[96], pp[128];
    snprintf(pn, sizeof(pn), "%s.function.name", p);
    snprintf(pp, sizeof(pp), "%s.function.parameters", p);
    json_t *name = json_object_get(fn, "name");
    if (!json_is_string(name) ||
        !tool_name_ok(json_string_value(name), json_string_length(name)))
      return bad(err, pn,
                 "'%s' must be 1 to 64 letters, digits, '_' or '-', got %s",
                 pn, name ? show(name).s : "nothing");
    for (size_t k = 0; k < i; k++)
      if (!strcmp(q->tool_names[k], json_string_value(name)))
        return bad(err, pn, "'%s' %s is declared twice", pn, show(name).s);
    json_t *d = json_object_get(fn, "description");
    if (d && !json_is_string(d) && !json_is_null(d))
      return bad(err, p, "'%s.function.description' must be a string", p);
    json_t *params = json_object_get(fn, "parameters");
    if (params && !json_is_object(params))
      return bad(err, pp, "'%s' must be a JSON schema object, got %s", pp,
                 show(params).s);
    json_t *ptype = params ? json_object_get(params, "type") : NULL;
    if (ptype && !(json_is_string(ptype) &&
                   !strcmp(json_string_value(ptype), "object")))
      return bad(err, pp,
                 "'%s' must describe an object (\"type\": \"object\"): "
                 "arguments are a JSON object of named parameters, got type "
                 "%s",
                 pp, show(ptype).s);
    if (params) {
      /* the same compiler forced calls decode under: what it refuses is
       * named now, whatever tool_choice says */
      char *text = json_dumps(params, JSON_COMPACT);
      if (!text) return oom(err);
      struct tn_grammar *g = NULL;
      struct tn_error e = {0};
      enum tn_status st = tn_grammar_from_json_schema(text, strlen(text), &g,
                                                      &e);
      free(text);
      tn_grammar_release(g);
      if (st) return bad(err, pp, "'%s': %s", pp, e.msg);
    }
    q->tool_names[i] = dup_bytes(json_string_value(name),
                                 json_string_length(name));
    if (!q->tool_names[i]) return oom(err);
    q->n_tools = i + 1;
  }
  /* tool_choice */
  q->tool_choice = n ? TN_API_TOOLS_AUTO : TN_API_TOOLS_NONE;
  if (choice) {
    const char *cs = json_is_string(choice) ? json_string_value(choice) : NULL;
    if (cs && !strcmp(cs, "none")) {
      q->tool_choice = TN_API_TOOLS_NONE;
    } else if (cs && !strcmp(cs, "auto")) {
      /* auto without tools: nothing to call */
    } else if (cs && !strcmp(cs, "required")) {
      if (!n)
        return bad(err, "tool_choice",
                   "'tool_choice' \"required\" needs a non-empty 'tools'");
      q->tool_choice = TN_API_TOOLS_REQUIRED;
    } else if (json_is_object(choice)) {
      json_t *ty = json_object_get(choice, "type");
      if (!json_is_string(ty) || strcmp(json_string_value(ty), "function"))
        return bad(err, "tool_choice",
                   "'tool_choice.type' must be \"function\", got %s",
                   ty ? show(ty).s : "nothing");
      json_t *fn = json_object_get(choice, "function");
      json_t *name = json_is_object(fn) ? json_object_get(fn, "name") : NULL;
      if (!json_is_string(name))
        return bad(err, "tool_choice",
                   "'tool_choice' must be \"none\", \"auto\", "
                   "\"required\" or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}, got %s",
                   show(choice).s);
      size_t k = 0;
      while (k < q->n_tools && strcmp(q->tool_names[k], json_string_value(name)))
        k++;
      if (k == q->n_tools)
        return bad(err, "tool_choice",
                   "'tool_choice' names function %s, which is not in 'tools'",
                   show(name).s);
      q->tool_choice = TN_API_TOOLS_NAMED;
      q->tool_named = k;
    } else {
      return bad(err, "tool_choice",
                 "'tool_choice' must be \"none\", \"auto\", \"required\" "
                 "or a named function, got %s",
                 show(choice).s);
    }
  }
  if (n && q->tool_choice != TN_API_TOOLS_NONE) {
    q->tools_json = json_dumps(tools, JSON_COMPACT);
    if (!q->tools_json) return oom(err);
    q->tools_len = strlen(q->tools_json);
  }
  if (q->tool_choice == TN_API_TOOLS_REQUIRED ||
      q->tool_choice == TN_API_TOOLS_NAMED) {
    if (q->grammar)
      return bad(err, "tool_choice",
                 "a forced 'tool_choice' cannot be combined with "
                 "response_format or another output constraint");
    rc = tn_tools_grammar(
        q->tools_json, q->tools_len,
        q->tool_choice == TN_API_TOOLS_NAMED ? q->tool_names[q->tool_named]
                                             : NULL,
        q->parallel_tool_calls, &q->grammar, err);
    if (rc) return rc;
    q->gen.grammar = q->grammar;
  }
  /* documents (vLLM, transformers): for templates with a RAG section */
  json_t *docs = field(o, "documents");
  if (docs) {
    if (!json_is_array(docs))
      return bad(err, "documents", "'documents' must be an array, got %s",
                 show(docs).s);
    for (size_t i = 0; i < json_array_size(docs); i++)
      if (!json_is_object(json_array_get(docs, i)))
        return bad(err, "documents",
                   "'documents[%zu]' must be an object (e.g. {\"title\": "
                   "..., \"text\": ...}), got %s",
                   i, show(json_array_get(docs, i)).s);
    if (json_array_size(docs)) {
      q->documents = json_dumps(docs, JSON_COMPACT);
      if (!q->documents) return oom(err);
      q->documents_len = strlen(q->documents);
    }
  }
  /* chat_template_kwargs (vLLM): extra template variables */
  json_t *kw = field(o, "chat_template_kwargs");
  if (kw) {
    if (!json_is_object(kw))
      return bad(err, "chat_template_kwargs",
                 "'chat_template_kwargs' must be an object, got %s",
                 show(kw).s);
    static const char *const reserved[] = {
        "messages", "tools", "documents", "add_generation_prompt",
        "bos_token", "eos_token"};
    for (size_t k = 0; k < sizeof(reserved) / sizeof(reserved[0]); k++)
      if (json_object_get(kw, reserved[k]))
        return bad(err, "chat_template_kwargs",
                   "'chat_template_kwargs.%s' is set by the server from the "
                   "request (use the request's own field)",
                   reserved[k]);
    q->template_kwargs = json_dumps(kw, JSON_COMPACT);
    if (!q->template_kwargs) return oom(err);
    q->template_kwargs_len = strlen(q->template_kwargs);
  }
  return 0;
}

static int parse_fields(enum tn_api_kind kind, const json_t *o,
                        struct tn_api_request *q, struct tn_api_error *err) {
  int rc;
  json_t *v;

  if ((v = field(o, "model"))) {
    if (!json_is_string(v))
      return bad(err, "model", "'model' must be a string, got %s", show(v).s);
    q->model = dup_bytes(json_string_value(v), json_string_length(v));
    if (!q->model) return oom(err);
  }
  if ((v = field(o, "user"))) {
    if (!json_is_string(v))
      return bad(err, "user", "'user' must be a string, got %s", show(v).s);
    q->user = dup_bytes(json_string_value(v), json_string_length(v));
    if (!q->user) return oom(err);
  }

  rc = kind == TN_API_CHAT ? parse_messages(o, q, err)
                           : parse_prompt(o, q, err);
  if (rc) return rc;

  if ((rc = get_bool(o, "stream", &q->stream, NULL, err))) return rc;
  if ((v = field(o, "stream_options"))) {
    if (!json_is_object(v))
      return bad(err, "stream_options",
                 "'stream_options' must be an object, got %s", show(v).s);
    if (!q->stream)
      return bad(err, "stream_options",
                 "'stream_options' is only allowed when 'stream' is true");
    json_t *iu = field(v, "include_usage");
    if (iu && !json_is_boolean(iu))
      return bad(err, "stream_options.include_usage",
                 "'stream_options.include_usage' must be a boolean, got %s",
                 show(iu).s);
    q->include_usage = iu && json_is_true(iu);
  }

  /* lengths */
  int64_t x;
  bool set = false;
  static const char *len_range = ">= 1 and <= 1000000";
  q->max_tokens = -1;
  if ((rc = get_int(o, "max_tokens", 1, API_MAX_TOKENS, len_range, &x, &set,
                    err)))
    return rc;
  if (set) q->max_tokens = (int32_t)x;
  if (kind == TN_API_CHAT) {
    set = false;
    if ((rc = get_int(o, "max_completion_tokens", 1, API_MAX_TOKENS,
                      len_range, &x, &set, err)))
      return rc;
    if (set) q->max_tokens = (int32_t)x;
  }
  if (q->max_tokens > 0) q->gen.max_tokens = q->max_tokens;
  set = false;
  if ((rc = get_int(o, "min_tokens", 0, API_MAX_TOKENS, ">= 0 and <= 1000000",
                    &x, &set, err)))
    return rc;
  if (set) {
    if (q->max_tokens > 0 && x > q->max_tokens)
      return bad(err, "min_tokens",
                 "'min_tokens' (%" PRId64 ") must not exceed 'max_tokens' "
                 "(%d)",
                 x, (int)q->max_tokens);
    q->gen.min_tokens = (int32_t)x;
  }
  /* extension: "speculative": false turns the model's speculation off */
  if ((rc = get_bool(o, "speculative", &q->gen.speculative, NULL, err)))
    return rc;
  if ((rc = get_bool(o, "ignore_eos", &q->gen.ignore_eos, NULL, err)))
    return rc;
  /* extension: "lora_scale" scales the adapter the model names */
  if (field(o, "lora_scale")) {
    if ((rc = get_num(o, "lora_scale", -TN_ADAPTER_SCALE_MAX, false,
                      TN_ADAPTER_SCALE_MAX, "in [-16, 16]", &q->lora_scale,
                      err)))
      return rc;
    q->has_lora_scale = true;
  }

  /* sampling */
  struct tn_sampling *s = &q->gen.sampling;
  if ((rc = get_num(o, "temperature", 0, false, 2, "between 0 and 2",
                    &s->temperature, err)))
    return rc;
  if ((rc = get_num(o, "top_p", 0, true, 1, "in (0, 1]", &s->top_p, err)))
    return rc;
  if ((rc = get_num(o, "min_p", 0, false, 1, "between 0 and 1", &s->min_p,
                    err)))
    return rc;
  if ((rc = get_num(o, "presence_penalty", -2, false, 2, "between -2 and 2",
                    &s->presence_penalty, err)))
    return rc;
  if ((rc = get_num(o, "frequency_penalty", -2, false, 2, "between -2 and 2",
                    &s->freq_penalty, err)))
    return rc;
  if ((rc = get_num(o, "repetition_penalty", 0, true, 10, "in (0, 10]",
                    &s->repeat_penalty, err)))
    return rc;
  set = false;
  if ((rc = get_int(o, "top_k", -1, INT32_MAX, ">= -1 (-1 or 0: off)", &x,
                    &set, err)))
    return rc;
  if (set) s->top_k = x <= 0 ? 0 : (int32_t)x;
  set = false;
  if ((rc = get_int(o, "seed", INT64_MIN, INT64_MAX, "", &x, &set, err)))
    return rc;
  if (set) {
    s->seed = (uint64_t)x;
    q->has_seed = true;
  }
  set = false;
  if ((rc = get_int(o, "n", 1, TN_GEN_N_MAX, "between 1 and 16", &x, &set,
                    err)))
    return rc;
  if (set) q->gen.n = (int32_t)x;

  /* logprobs */
  if (kind == TN_API_CHAT) {
    bool lp = false;
    if ((rc = get_bool(o, "logprobs", &lp, NULL, err))) return rc;
    set = false;
    if ((rc = get_int(o, "top_logprobs", 0, TN_LOGPROBS_MAX,
                      "between 0 and 20", &x, &set, err)))
      return rc;
    if (set && !lp)
      return bad(err, "top_logprobs",
                 "'top_logprobs' requires 'logprobs' to be true");
    q->gen.logprobs = lp;
    s->n_logprobs = set ? (int32_t)x : 0;
  } else {
    set = false;
    if ((rc = get_int(o, "logprobs", 0, TN_LOGPROBS_MAX, "between 0 and 20",
                      &x, &set, err)))
      return rc;
    q->gen.logprobs = set;
    s->n_logprobs = set ? (int32_t)x : 0;
    if ((rc = get_bool(o, "echo", &q->echo, NULL, err))) return rc;
  }

  if ((rc = parse_stop(o, q, err))) return rc;
  if ((rc = parse_bias(o, q, err))) return rc;
  if ((rc = unsupported(kind, o, q, err))) return rc;
  if ((rc = parse_constraint(o, q, err))) return rc;
  return kind == TN_API_CHAT ? parse_tools(o, q, err) : 0;
}

int tn_api_parse(enum tn_api_kind kind, const char *body, size_t len,
                 struct tn_api_request *out, struct tn_api_error *err) {
  memset(out, 0, sizeof(*out));
  out->kind = kind;
  out->max_tokens = -1;
  json_error_t je;
  json_t *root = json_loadb(body ? body : "", body ? len : 0,
                            JSON_ALLOW_NUL | JSON_DECODE_ANY, &je);
  if (!root)
    return bad(err, NULL,
               "request body is not valid JSON: %s at line %d column %d",
               je.text, je.line, je.column);
  int rc;
  if (!json_is_object(root)) {
    rc = bad(err, NULL, "request body must be a JSON object, got %s",
             show(root).s);
  } else {
    tn_gen_params_default(&out->gen);
    out->gen.stops = NULL;
    out->gen.n_stops = 0;
    out->gen.sampling.bias = NULL;
    out->gen.sampling.n_bias = 0;
    rc = parse_fields(kind, root, out, err);
  }
  json_decref(root);
  if (rc) {
    tn_api_request_free(out);
    out->kind = kind;
    out->max_tokens = -1;
  }
  return rc;
}

void tn_api_request_free(struct tn_api_request *q) {
  if (!q) return;
  free(q->model);
  for (size_t i = 0; i < q->n_msgs; i++) {
    free((char *)q->msgs[i].role);
    free((char *)q->msgs[i].content);
    free((char *)q->msgs[i].tool_calls_json);
    free((char *)q->msgs[i].tool_call_id);
    free((char *)q->msgs[i].name);
  }
  free(q->tools_json);
  for (size_t i = 0; i < q->n_tools; i++) free(q->tool_names[i]);
  free(q->tool_names);
  free(q->template_kwargs);
  free(q->documents);
  free(q->msgs);
  for (size_t i = 0; i < q->n_prompts; i++) {
    free(q->prompts[i].text);
    free(q->prompts[i].ids);
  }
  free(q->prompts);
  free(q->bias);
  if (q->stops)
    for (int32_t i = 0; i < q->gen.n_stops; i++) free(q->stops[i]);
  free(q->stops);
  free(q->user);
  tn_grammar_release(q->grammar);
  for (int32_t i = 0; i < q->n_options; i++) free(q->options[i]);
  free(q->options);
  free(q->option_lens);
  memset(q, 0, sizeof(*q));
}

int tn_api_check_vocab(const struct tn_api_request *q, int32_t n_vocab,
                       struct tn_api_error *err) {
  for (int32_t i = 0; i < q->gen.sampling.n_bias; i++)
    if (q->bias[i].id >= n_vocab)
      return bad(err, "logit_bias",
                 "'logit_bias' token id %d is out of range (vocabulary size "
                 "%d)",
                 (int)q->bias[i].id, (int)n_vocab);
  for (size_t p = 0; p < q->n_prompts; p++)
    for (size_t k = 0; k < q->prompts[p].n_ids; k++)
      if (q->prompts[p].ids[k] >= n_vocab)
        return bad(err, "prompt",
                   "'prompt' token id %d is out of range (vocabulary size "
                   "%d)",
                   (int)q->prompts[p].ids[k], (int)n_vocab);
  return 0;
}

/* ---- rendering helpers */

/* A token's bytes (the piece without special tokens). */
struct piece {
  char sbuf[256];
  char *p;
  size_t n;
  char *heap;
};

static void piece_get(struct piece *pc, const struct tn_tokenizer *tok,
                      int32_t id) {
  pc->heap = NULL;
  pc->p = pc->sbuf;
  pc->n = 0;
  if (!tok) return;
  size_t n = tn_tokenizer_piece(tok, id, pc->sbuf, sizeof(pc->sbuf), false);
  if (n > sizeof(pc->sbuf)) {
    pc->heap = malloc(n);
    if (pc->heap) {
      tn_tokenizer_piece(tok, id, pc->heap, n, false);
      pc->p = pc->heap;
    } else {
      n = sizeof(pc->sbuf);
    }
  }
  pc->n = n;
}

static void piece_done(struct piece *pc) { free(pc->heap); }

static void put_bytes_array(struct tn_buf *b, const char *s, size_t n) {
  buf_putc(b, '[');
  for (size_t i = 0; i < n; i++)
    tn_buf_printf(b, i ? ",%u" : "%u", (unsigned)(unsigned char)s[i]);
  buf_putc(b, ']');
}

/* chat: {"token":..,"logprob":..,"bytes":[..]} without the closing brace */
static void put_chat_tok(struct tn_buf *b, const struct tn_tokenizer *tok,
                         int32_t id, float lp) {
  struct piece pc;
  piece_get(&pc, tok, id);
  buf_puts(b, "{\"token\":");
  put_str(b, pc.p, pc.n);
  buf_puts(b, ",\"logprob\":");
  put_float(b, lp);
  buf_puts(b, ",\"bytes\":");
  put_bytes_array(b, pc.p, pc.n);
  piece_done(&pc);
}

/* chat logprobs for toks[a..e): {"content":[...]} */
static void put_chat_logprobs(struct tn_buf *b, const struct tn_tokenizer *tok,
                              const struct tn_choice *c, int32_t a,
                              int32_t e) {
  buf_puts(b, "{\"content\":[");
  for (int32_t t = a; t < e; t++) {
    const struct tn_gen_token *g = &c->toks[t];
    if (t > a) buf_putc(b, ',');
    put_chat_tok(b, tok, g->id, g->logprob);
    buf_puts(b, ",\"top_logprobs\":[");
    int32_t n_top = g->n_top < 0 ? 0
                    : g->n_top > TN_LOGPROBS_MAX ? TN_LOGPROBS_MAX
                                                 : g->n_top;
    for (int32_t k = 0; k < n_top; k++) {
      if (k) buf_putc(b, ',');
      put_chat_tok(b, tok, g->top[k].id, g->top[k].logprob);
      buf_putc(b, '}');
    }
    buf_puts(b, "]}");
  }
  buf_puts(b, "],\"refusal\":null}");
}

/* completions logprobs for toks[a..e): {"tokens":..,"token_logprobs":..,
 * "top_logprobs":..,"text_offset":..}; *offset: characters before toks[a],
 * advanced past toks[e-1]. */
static void put_cmpl_logprobs(struct tn_buf *b, const struct tn_tokenizer *tok,
                              const struct tn_choice *c, int32_t a, int32_t e,
                              size_t *offset) {
  buf_puts(b, "{\"tokens\":[");
  for (int32_t t = a; t < e; t++) {
    struct piece pc;
    piece_get(&pc, tok, c->toks[t].id);
    if (t > a) buf_putc(b, ',');
    put_str(b, pc.p, pc.n);
    piece_done(&pc);
  }
  buf_puts(b, "],\"token_logprobs\":[");
  for (int32_t t = a; t < e; t++) {
    if (t > a) buf_putc(b, ',');
    put_float(b, c->toks[t].logprob);
  }
  buf_puts(b, "],\"top_logprobs\":[");
  for (int32_t t = a; t < e; t++) {
    const struct tn_gen_token *g = &c->toks[t];
    if (t > a) buf_putc(b, ',');
    buf_putc(b, '{');
    int32_t n_top = g->n_top < 0 ? 0
                    : g->n_top > TN_LOGPROBS_MAX ? TN_LOGPROBS_MAX
                                                 : g->n_top;
    /* keys are token strings; two ids may spell the same: keep the first */
    struct tn_buf keys[TN_LOGPROBS_MAX];
    memset(keys, 0, sizeof(keys));
    int32_t n_keys = 0;
    for (int32_t k = 0; k < n_top; k++) {
      struct piece pc;
      piece_get(&pc, tok, g->top[k].id);
      struct tn_buf *kb = &keys[n_keys];
      put_str(kb, pc.p, pc.n);
      piece_done(&pc);
      bool dup = kb->oom;
      for (int32_t j = 0; j < n_keys && !dup; j++)
        dup = keys[j].len == kb->len && !memcmp(keys[j].data, kb->data,
                                                kb->len);
      if (dup) {
        tn_buf_free(kb);
        continue;
      }
      if (n_keys) buf_putc(b, ',');
      tn_buf_append(b, kb->data, kb->len);
      buf_putc(b, ':');
      put_float(b, g->top[k].logprob);
      n_keys++;
    }
    for (int32_t j = 0; j < n_keys; j++) tn_buf_free(&keys[j]);
    buf_putc(b, '}');
  }
  buf_puts(b, "],\"text_offset\":[");
  for (int32_t t = a; t < e; t++) {
    if (t > a) buf_putc(b, ',');
    tn_buf_printf(b, "%zu", *offset);
    struct piece pc;
    piece_get(&pc, tok, c->toks[t].id);
    *offset += utf8_chars(pc.p, pc.n);
    piece_done(&pc);
  }
  buf_puts(b, "]}");
}

static void put_finish(struct tn_buf *b, enum tn_finish f) {
  if (f == TN_FINISH_NONE) buf_puts(b, "null");
  else put_cstr(b, tn_finish_str(f));
}

static void put_usage(struct tn_buf *b, const struct tn_api_meta *meta,
                      struct tn_req *const *reqs, size_t n_reqs) {
  int64_t prompt = 0, gen = 0, cached = 0, drafted = 0, accepted = 0;
  double compute_s = 0.0;
  for (size_t i = 0; i < n_reqs; i++) {
    prompt += reqs[i]->n_prompt;
    cached += reqs[i]->n_cached;
    compute_s += reqs[i]->compute_s;
    for (int32_t j = 0; j < reqs[i]->n_choices; j++) {
      gen += reqs[i]->choices[j].n_gen;
      drafted += reqs[i]->choices[j].n_drafted;
      accepted += reqs[i]->choices[j].n_accepted;
    }
  }
  /* Speculation reports in OpenAI's predicted-output fields: drafted
   * tokens the model accepted, and those it rejected. */
  tn_buf_printf(b,
                "{\"prompt_tokens\":%" PRId64 ",\"completion_tokens\":%" PRId64
                ",\"total_tokens\":%" PRId64
                ",\"prompt_tokens_details\":{\"cached_tokens\":%" PRId64 "}"
                ",\"completion_tokens_details\":{"
                "\"accepted_prediction_tokens\":%" PRId64
                ",\"rejected_prediction_tokens\":%" PRId64 "}",
                prompt, gen, prompt + gen, cached, accepted,
                drafted - accepted);
  if (meta->priced) {
    double cost = ((double)(prompt - cached) * meta->price_prompt +
                   (double)cached * meta->price_cached +
                   (double)gen * meta->price_completion) / 1e6 +
                  compute_s * meta->price_compute / 3600.0 +
                  meta->cost_extra;
    tn_buf_printf(b, ",\"cost\":%.10g", cost);
  }
  buf_putc(b, '}');
}

static void put_head(struct tn_buf *b, const struct tn_api_meta *meta,
                     const char *object) {
  buf_puts(b, "{\"id\":");
  put_cstr(b, meta->id ? meta->id : "");
  buf_puts(b, ",\"object\":");
  put_cstr(b, object);
  tn_buf_printf(b, ",\"created\":%ld,\"model\":", meta->created);
  put_cstr(b, meta->model ? meta->model : "");
  buf_puts(b, ",\"system_fingerprint\":null");
}

static int64_t choice_index(const struct tn_api_request *q, size_t i,
                            int32_t j) {
  int64_t n = q->gen.n > 0 ? q->gen.n : 1;
  return (int64_t)i * n + j;
}

static bool has_echo(const struct tn_api_request *q,
                     const struct tn_api_meta *meta, size_t i) {
  return q->kind == TN_API_COMPLETIONS && q->echo && meta->echo_text &&
         meta->echo_len && meta->echo_text[i];
}

/* Extension: ,"option_probs":{"option":p,...} for a choice list whose
 * probabilities were followed (tn_gen_params.options). */
static void put_option_probs(struct tn_buf *b, const struct tn_api_request *q,
                             const struct tn_choice *c) {
  if (!c || !c->option_probs || q->gen.n_options == 0) return;
  buf_puts(b, ",\"option_probs\":{");
  for (int32_t i = 0; i < q->gen.n_options; i++) {
    if (i) buf_putc(b, ',');
    put_str(b, q->options[i], q->option_lens[i]);
    tn_buf_printf(b, ":%.6g", (double)c->option_probs[i]);
  }
  buf_putc(b, '}');
}

/* One OpenAI tool call: {"id","type","function":{"name","arguments"}}
 * (streaming: with its "index" first). The id is derived from the
 * response id, the choice and the call, so it is unique per response and
 * the same in both forms. */
static void put_tool_call(struct tn_buf *b, const struct tn_api_meta *meta,
                          int64_t choice, size_t k,
                          const struct tn_tool_call *call, bool stream) {
  uint64_t h = 1469598103934665603ull;
  const char *id = meta->id ? meta->id : "";
  for (const char *p = id; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
  h = (h ^ (uint64_t)choice) * 1099511628211ull;
  h = (h ^ (uint64_t)k) * 1099511628211ull;
  buf_putc(b, '{');
  if (stream) tn_buf_printf(b, "\"index\":%zu,", k);
  tn_buf_printf(b, "\"id\":\"call_%016" PRIx64 "\",\"type\":\"function\","
                "\"function\":{\"name\":", h);
  put_cstr(b, call->name);
  buf_puts(b, ",\"arguments\":");
  put_cstr(b, call->arguments);
  buf_puts(b, "}}");
}

char *tn_api_render_response(const struct tn_api_request *q,
                             const struct tn_api_meta *meta,
                             struct tn_req *const *reqs, size_t n_reqs,
                             size_t *len) {
  struct tn_buf b = {0};
  bool chat = q->kind == TN_API_CHAT;
  put_head(&b, meta, chat ? "chat.completion" : "text_completion");
  buf_puts(&b, ",\"choices\":[");
  bool first = true;
  for (size_t i = 0; i < n_reqs; i++) {
    const struct tn_req *r = reqs[i];
    for (int32_t j = 0; j < r->n_choices; j++) {
      const struct tn_choice *c = &r->choices[j];
      if (!first) buf_putc(&b, ',');
      first = false;
      tn_buf_printf(&b, "{\"index\":%" PRId64 ",", choice_index(q, i, j));
      bool lp = q->gen.logprobs && c->toks;
      struct tn_tool_calls tc = {0};
      bool calls = chat && q->tool_choice != TN_API_TOOLS_NONE && c->text &&
                   tn_tools_parse(c->text, c->len, q->tool_names, q->n_tools,
                                  &tc);
      if (chat) {
        buf_puts(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
        if (calls && tc.content_len == 0) buf_puts(&b, "null");
        else if (calls) put_str(&b, c->text, tc.content_len);
        else put_str(&b, c->text ? c->text : "", c->text ? c->len : 0);
        if (calls) {
          buf_puts(&b, ",\"tool_calls\":[");
          for (size_t k = 0; k < tc.n_calls; k++) {
            if (k) buf_putc(&b, ',');
            put_tool_call(&b, meta, choice_index(q, i, j), k, &tc.calls[k],
                          false);
          }
          buf_putc(&b, ']');
        }
        buf_puts(&b, ",\"refusal\":null},\"logprobs\":");
        if (lp) put_chat_logprobs(&b, meta->tok, c, 0, c->n_toks);
        else buf_puts(&b, "null");
      } else {
        size_t offset = 0;
        buf_puts(&b, "\"text\":\"");
        if (has_echo(q, meta, i)) {
          put_esc(&b, meta->echo_text[i], meta->echo_len[i]);
          offset = utf8_chars(meta->echo_text[i], meta->echo_len[i]);
        }
        if (c->text) put_esc(&b, c->text, c->len);
        buf_puts(&b, "\",\"logprobs\":");
        if (q->gen.logprobs)
          put_cmpl_logprobs(&b, meta->tok, c, 0, c->toks ? c->n_toks : 0,
                            &offset);
        else buf_puts(&b, "null");
      }
      put_option_probs(&b, q, c);
      buf_puts(&b, ",\"finish_reason\":");
      if (calls && c->finish != TN_FINISH_LENGTH)
        buf_puts(&b, "\"tool_calls\"");
      else put_finish(&b, c->finish);
      buf_putc(&b, '}');
      tn_tool_calls_free(&tc);
    }
  }
  buf_puts(&b, "],\"usage\":");
  put_usage(&b, meta, reqs, n_reqs);
  buf_putc(&b, '}');
  if (b.oom) {
    tn_buf_free(&b);
    return NULL;
  }
  if (len) *len = b.len;
  return b.data;
}

/* ---- streaming */

void tn_api_stream_init(struct tn_api_stream *st) {
  memset(st, 0, sizeof(*st));
}

void tn_api_stream_free(struct tn_api_stream *st) {
  if (!st) return;
  free(st->c);
  memset(st, 0, sizeof(*st));
}

static void chunk_begin(struct tn_buf *b, const struct tn_api_request *q,
                        const struct tn_api_meta *meta) {
  buf_puts(b, "data: ");
  put_head(b, meta,
           q->kind == TN_API_CHAT ? "chat.completion.chunk"
                                  : "text_completion");
  buf_puts(b, ",\"choices\":[");
}

static void chunk_end(struct tn_buf *b, const struct tn_api_request *q) {
  buf_putc(b, ']');
  if (q->include_usage) buf_puts(b, ",\"usage\":null");
  buf_puts(b, "}\n\n");
}

/* One chunk for choice idx: text (may be NULL: chat's empty delta),
 * logprobs for toks[a..e) when a < e, finish (NONE: null). */
static void put_chunk(struct tn_buf *b, const struct tn_api_request *q,
                      const struct tn_api_meta *meta, int64_t idx,
                      bool role, const char *text, size_t text_len,
                      const struct tn_choice *c, int32_t a, int32_t e,
                      size_t *offset, enum tn_finish finish) {
  chunk_begin(b, q, meta);
  tn_buf_printf(b, "{\"index\":%" PRId64 ",", idx);
  if (q->kind == TN_API_CHAT) {
    buf_puts(b, "\"delta\":{");
    if (role) buf_puts(b, "\"role\":\"assistant\",\"content\":\"\"");
    if (text) {
      buf_puts(b, role ? ",\"content\":" : "\"content\":");
      put_str(b, text, text_len);
    }
    buf_puts(b, "},\"logprobs\":");
    if (a < e) put_chat_logprobs(b, meta->tok, c, a, e);
    else buf_puts(b, "null");
  } else {
    buf_puts(b, "\"text\":");
    put_str(b, text ? text : "", text ? text_len : 0);
    buf_puts(b, ",\"logprobs\":");
    if (a < e) put_cmpl_logprobs(b, meta->tok, c, a, e, offset);
    else buf_puts(b, "null");
  }
  if (finish != TN_FINISH_NONE) put_option_probs(b, q, c);
  buf_puts(b, ",\"finish_reason\":");
  if (finish == TN_FINISH_NONE) buf_puts(b, "null");
  else put_finish(b, finish);
  buf_puts(b, "}");
  chunk_end(b, q);
}

bool tn_api_render_stream(const struct tn_api_request *q,
                          const struct tn_api_meta *meta,
                          struct tn_req *const *reqs, size_t n_reqs,
                          struct tn_api_stream *st, struct tn_buf *out) {
  if (st->done_sent) return true;
  if (!st->c) {
    size_t total = 0;
    for (size_t i = 0; i < n_reqs; i++)
      total += reqs[i]->n_choices > 0 ? (size_t)reqs[i]->n_choices : 0;
    st->c = calloc(total ? total : 1, sizeof(*st->c));
    if (!st->c) {
      out->oom = true;
      return false;
    }
    st->n_choices = total;
  }
  bool chat = q->kind == TN_API_CHAT;
  bool all_done = true;
  size_t k = 0;
  for (size_t i = 0; i < n_reqs; i++) {
    const struct tn_req *r = reqs[i];
    for (int32_t j = 0; j < r->n_choices && k < st->n_choices; j++, k++) {
      const struct tn_choice *c = &r->choices[j];
      int64_t idx = choice_index(q, i, j);
      typeof(&st->c[0]) s = &st->c[k];
      if (!s->role_sent) {
        if (chat) {
          put_chunk(out, q, meta, idx, true, NULL, 0, c, 0, 0, NULL,
                    TN_FINISH_NONE);
        } else if (has_echo(q, meta, i)) {
          if (meta->echo_len[i])
            put_chunk(out, q, meta, idx, false, meta->echo_text[i],
                      meta->echo_len[i], c, 0, 0, NULL, TN_FINISH_NONE);
          s->offset_sent = utf8_chars(meta->echo_text[i], meta->echo_len[i]);
        }
        s->role_sent = true;
      }
      if (s->finish_sent) continue;
      int32_t n_toks = q->gen.logprobs && c->toks ? c->n_toks : 0;
      if (s->toks_sent > n_toks) s->toks_sent = n_toks;
      bool finished = c->finish != TN_FINISH_NONE || r->done;
      bool tools = chat && q->tool_choice != TN_API_TOOLS_NONE;
      /* with tools, text that may be a call waits for the end */
      size_t avail = c->text ? c->len : 0;
      struct tn_tool_calls tc = {0};
      bool calls = false;
      if (tools && c->text) {
        if (!finished)
          avail = tn_tools_stream_safe(c->text, c->len);
        else if ((calls = tn_tools_parse(c->text, c->len, q->tool_names,
                                         q->n_tools, &tc)))
          avail = tc.content_len > s->text_sent ? tc.content_len
                                                : s->text_sent;
      }
      if (c->text && avail > s->text_sent) {
        put_chunk(out, q, meta, idx, false, c->text + s->text_sent,
                  avail - s->text_sent, c, s->toks_sent, n_toks,
                  &s->offset_sent, TN_FINISH_NONE);
        s->text_sent = avail;
        s->toks_sent = n_toks;
      }
      if (calls) {
        /* each call whole in one delta (OpenAI may split arguments over
         * several; clients concatenate them) */
        for (size_t m = 0; m < tc.n_calls; m++) {
          chunk_begin(out, q, meta);
          tn_buf_printf(out, "{\"index\":%" PRId64 ",\"delta\":{"
                        "\"tool_calls\":[", idx);
          put_tool_call(out, meta, idx, m, &tc.calls[m], true);
          buf_puts(out, "]},\"logprobs\":null,\"finish_reason\":null}");
          chunk_end(out, q);
        }
        tn_tool_calls_free(&tc);
        chunk_begin(out, q, meta);
        tn_buf_printf(out, "{\"index\":%" PRId64 ",\"delta\":{},"
                      "\"logprobs\":", idx);
        if (s->toks_sent < n_toks) put_chat_logprobs(out, meta->tok, c,
                                                     s->toks_sent, n_toks);
        else buf_puts(out, "null");
        buf_puts(out, c->finish == TN_FINISH_LENGTH
                          ? ",\"finish_reason\":\"length\"}"
                          : ",\"finish_reason\":\"tool_calls\"}");
        chunk_end(out, q);
        s->toks_sent = n_toks;
        s->finish_sent = true;
        continue;
      }
      if (finished) {
        /* logprobs of tokens whose text never showed (held back by a stop
         * string, or special) ride on the final chunk */
        put_chunk(out, q, meta, idx, false, chat ? NULL : "", 0, c,
                  s->toks_sent, n_toks, &s->offset_sent, c->finish);
        s->toks_sent = n_toks;
        s->finish_sent = true;
      } else {
        all_done = false;
      }
    }
    if (!r->done) all_done = false;
  }
  if (!all_done) return false;
  if (q->include_usage && !st->usage_sent) {
    buf_puts(out, "data: ");
    put_head(out, meta, chat ? "chat.completion.chunk" : "text_completion");
    buf_puts(out, ",\"choices\":[],\"usage\":");
    put_usage(out, meta, reqs, n_reqs);
    buf_puts(out, "}\n\n");
    st->usage_sent = true;
  }
  buf_puts(out, "data: [DONE]\n\n");
  st->done_sent = true;
  return true;
}
