/*
 * tools.c: tool calls in the <tool_call> JSON convention (Qwen 2.5/3,
 * Hermes, and every template tern writes tools into itself: see
 * src/tokenizer/chat.c):
 *
 *   <tool_call>
 *   {"name": "get_weather", "arguments": {"city": "Paris"}}
 *   </tool_call>
 *
 * Three jobs: the grammar that forces a call (tool_choice "required" or a
 * named function): each call's JSON must validate against a schema made of
 * the function's name and its parameters, so forced arguments always
 * parse and validate; parsing a finished text back into OpenAI tool_calls;
 * and, while streaming, how much text may go out as content before a call
 * might begin. A whole answer that is a call's bare JSON object (or one
 * in a ```json fence) counts as a call too.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"

static const char k_open[] = "<tool_call>";
static const char k_close[] = "</tool_call>";
#define OPEN_LEN (sizeof(k_open) - 1)
#define CLOSE_LEN (sizeof(k_close) - 1)

/* ---- the grammar of forced calls */

static bool ident_start(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
static bool ident_char(char c) {
  return ident_start(c) || (c >= '0' && c <= '9') || c == '-';
}

/* Appends gbnf with every rule name prefixed (names start with a letter;
 * literals, classes and comments are copied as they are). */
static void put_renamed(struct tn_buf *b, const char *g, size_t n,
                        const char *prefix) {
  size_t i = 0;
  while (i < n) {
    char c = g[i];
    if (c == '"' || c == '[') {
      char end = c == '"' ? '"' : ']';
      size_t j = i + 1;
      while (j < n && g[j] != end) j += g[j] == '\\' ? 2 : 1;
      if (j < n) j++;
      if (j > n) j = n;
      tn_buf_append(b, g + i, j - i);
      i = j;
    } else if (c == '#') {
      size_t j = i;
      while (j < n && g[j] != '\n') j++;
      tn_buf_append(b, g + i, j - i);
      i = j;
    } else if (ident_start(c)) {
      size_t j = i;
      while (j < n && ident_char(g[j])) j++;
      tn_buf_append(b, prefix, strlen(prefix));
      tn_buf_append(b, g + i, j - i);
      i = j;
    } else {
      tn_buf_append(b, &c, 1);
      i++;
    }
  }
}

int tn_tools_grammar(const char *tools_json, size_t tools_len,
                     const char *only, bool parallel,
                     struct tn_grammar **out, struct tn_api_error *err) {
  *out = NULL;
  json_t *tools = json_loadb(tools_json, tools_len, 0, NULL);
  if (!tools)
    return tn_api_error_set(err, 500, "server_error", NULL, NULL,
                            "tools: out of memory");
  struct tn_buf b = {0};
  tn_buf_printf(&b, "root ::= call%s\n", parallel ? " (\"\\n\" call)*" : "");
  tn_buf_printf(&b, "call ::= \"<tool_call>\\n\" body \"\\n</tool_call>\"\n");
  struct tn_buf alts = {0};
  int rc = 0;
  size_t i;
  json_t *t;
  json_array_foreach(tools, i, t) {
    json_t *fn = json_object_get(t, "function");
    const char *name = json_string_value(json_object_get(fn, "name"));
    if (only && strcmp(only, name) != 0) continue;
    json_t *params = json_object_get(fn, "parameters");
    json_t *args = params ? json_deep_copy(params)
                          : json_pack("{s:s}", "type", "object");
    if (args && !json_object_get(args, "type") &&
        !json_object_get(args, "$ref")) /* arguments are an object */
      json_object_set_new(args, "type", json_string("object"));
    json_t *schema = json_pack(
        "{s:s, s:{s:{s:s}, s:o}, s:[s,s], s:b}", "type", "object",
        "properties", "name", "const", name, "arguments", args, "required",
        "name", "arguments", "additionalProperties", 0);
    char *text = schema ? json_dumps(schema, JSON_COMPACT) : NULL;
    json_decref(schema);
    char *gbnf = NULL;
    struct tn_error e = {0};
    if (!text || tn_json_schema_to_gbnf(text, strlen(text), &gbnf, &e)) {
      rc = tn_api_error_set(err, 400, "invalid_request_error", "tools",
                            NULL, "tools[%zu].function.parameters: %s", i,
                            text ? e.msg : "out of memory");
      free(text);
      break;
    }
    free(text);
    char prefix[32];
    snprintf(prefix, sizeof(prefix), "t%zu-", i);
    put_renamed(&b, gbnf, strlen(gbnf), prefix);
    tn_buf_append(&b, "\n", 1);
    free(gbnf);
    tn_buf_printf(&alts, "%s%sroot", alts.len ? " | " : "", prefix);
  }
  json_decref(tools);
  if (!rc) {
    if (!alts.len)
      rc = tn_api_error_set(err, 400, "invalid_request_error", "tool_choice",
                            NULL, "tool_choice names no function in tools");
    else
      tn_buf_printf(&b, "body ::= %.*s\n", (int)alts.len, alts.data);
  }
  if (!rc && (b.oom || alts.oom))
    rc = tn_api_error_set(err, 500, "server_error", NULL, NULL,
                          "tools: out of memory");
  if (!rc) {
    struct tn_error e = {0};
    if (tn_grammar_from_gbnf(b.data, b.len, out, &e))
      rc = tn_api_error_set(err, 400, "invalid_request_error", "tools",
                            NULL, "tools: %s", e.msg);
  }
  tn_buf_free(&b);
  tn_buf_free(&alts);
  return rc;
}

/* ---- parsing a finished text */

void tn_tool_calls_free(struct tn_tool_calls *tc) {
  if (!tc) return;
  for (size_t i = 0; i < tc->n_calls; i++) {
    free(tc->calls[i].name);
    free(tc->calls[i].arguments);
  }
  free(tc->calls);
  memset(tc, 0, sizeof(*tc));
}

static bool ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* One block's JSON into a call. */
static bool parse_block(const char *s, size_t n, char *const *names,
                        size_t n_names, struct tn_tool_call *out) {
  while (n && ws(*s)) s++, n--;
  while (n && ws(s[n - 1])) n--;
  json_t *o = json_loadb(s, n, 0, NULL);
  if (!json_is_object(o)) {
    json_decref(o);
    return false;
  }
  json_t *name = json_object_get(o, "name");
  json_t *args = json_object_get(o, "arguments");
  if (!args) args = json_object_get(o, "parameters");
  bool ok = json_is_string(name) && (json_is_object(args) || json_is_string(args));
  bool known = false;
  for (size_t i = 0; ok && i < n_names; i++)
    known |= strcmp(names[i], json_string_value(name)) == 0;
  ok = ok && known;
  if (ok && json_is_string(args)) {
    /* arguments given as a JSON string: it must hold an object */
    json_t *inner = json_loadb(json_string_value(args),
                               json_string_length(args), 0, NULL);
    ok = json_is_object(inner);
    json_decref(inner);
  }
  if (ok) {
    out->name = strdup(json_string_value(name));
    out->arguments = json_is_string(args)
                         ? strdup(json_string_value(args))
                         : json_dumps(args, JSON_COMPACT);
    ok = out->name && out->arguments;
    if (!ok) {
      free(out->name);
      free(out->arguments);
    }
  }
  json_decref(o);
  return ok;
}

/* A whole answer that is one call's JSON object, bare or in a ```json
 * fence: small models asked to call a tool often answer that way instead
 * of using the tags. */
static bool parse_bare(const char *text, size_t len, char *const *names,
                       size_t n_names, struct tn_tool_calls *out) {
  const char *s = text, *e = text + len;
  while (s < e && ws(*s)) s++;
  while (e > s && ws(e[-1])) e--;
  if (e - s >= 6 && memcmp(s, "```", 3) == 0 && memcmp(e - 3, "```", 3) == 0) {
    s += 3;
    e -= 3;
    if (e - s >= 4 && memcmp(s, "json", 4) == 0) s += 4;
  }
  while (s < e && ws(*s)) s++;
  if (s == e || *s != '{') return false;
  struct tn_tool_call call = {0};
  if (!parse_block(s, (size_t)(e - s), names, n_names, &call)) return false;
  out->calls = malloc(sizeof(*out->calls));
  if (!out->calls) {
    free(call.name);
    free(call.arguments);
    return false;
  }
  out->calls[0] = call;
  out->n_calls = 1;
  out->content_len = 0;
  return true;
}

bool tn_tools_parse(const char *text, size_t len, char *const *names,
                    size_t n_names, struct tn_tool_calls *out) {
  memset(out, 0, sizeof(*out));
  const char *first = memmem(text, len, k_open, OPEN_LEN);
  if (!first) return parse_bare(text, len, names, n_names, out);
  size_t at = (size_t)(first - text);
  size_t content = at;
  while (content && ws(text[content - 1])) content--;
  for (;;) {
    size_t body = at + OPEN_LEN;
    const char *close = memmem(text + body, len - body, k_close, CLOSE_LEN);
    size_t end = close ? (size_t)(close - text) : len;
    struct tn_tool_call call = {0};
    if (!parse_block(text + body, end - body, names, n_names, &call)) {
      /* a last block cut short (max_tokens): keep the calls before it */
      if (!close && out->n_calls > 0) break;
      goto fail;
    }
    struct tn_tool_call *v =
        realloc(out->calls, (out->n_calls + 1) * sizeof(*v));
    if (!v) {
      free(call.name);
      free(call.arguments);
      goto fail;
    }
    out->calls = v;
    out->calls[out->n_calls++] = call;
    if (!close) break;
    at = end + CLOSE_LEN;
    while (at < len && ws(text[at])) at++;
    if (at == len) break;
    /* only further calls may follow the first */
    if (len - at < OPEN_LEN || memcmp(text + at, k_open, OPEN_LEN) != 0)
      goto fail;
  }
  out->content_len = content;
  return true;
fail:
  tn_tool_calls_free(out);
  return false;
}

size_t tn_tools_stream_safe(const char *text, size_t len) {
  const char *first = memmem(text, len, k_open, OPEN_LEN);
  if (first) return (size_t)(first - text);
  /* an answer that opens with '{' or a fence may be a bare call */
  size_t i = 0;
  while (i < len && ws(text[i])) i++;
  if (i < len && (text[i] == '{' || text[i] == '`')) return 0;
  /* hold back a tail that is a proper prefix of "<tool_call>" */
  for (size_t k = OPEN_LEN - 1; k > 0; k--)
    if (len >= k && memcmp(text + len - k, k_open, k) == 0) return len - k;
  return len;
}
