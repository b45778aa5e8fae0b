/*
 * judge.c: an LLM judge's prompts and the reading of its verdicts
 * (judge.h), shared by `tern eval` and shadow deployments.
 */
#include "obs/judge.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"

const char tn_judge_system[] =
    "You are an impartial judge of answers to questions. Judge only what "
    "the answer says, not its length or style unless the rubric asks for "
    "it. Reply with a JSON object and nothing else.";

json_t *tn_judge_score_format(long scale) {
  return json_pack(
      "{s:s,s:{s:s,s:{s:s,s:{s:{s:s,s:i,s:i},s:{s:s,s:i}},s:[s,s],s:b}}}",
      "type", "json_schema", "json_schema", "name", "verdict", "schema",
      "type", "object", "properties", "score", "type", "integer", "minimum",
      1, "maximum", (int)scale, "reasoning", "type", "string", "maxLength",
      400, "required", "score", "reasoning", "additionalProperties", 0);
}

json_t *tn_judge_winner_format(void) {
  return json_pack(
      "{s:s,s:{s:s,s:{s:s,s:{s:{s:[s,s,s]},s:{s:s,s:i}},s:[s,s],s:b}}}",
      "type", "json_schema", "json_schema", "name", "verdict", "schema",
      "type", "object", "properties", "winner", "enum", "A", "B", "tie",
      "reasoning", "type", "string", "maxLength", 400, "required", "winner",
      "reasoning", "additionalProperties", 0);
}

char *tn_judge_pair_prompt(const char *question, const char *rubric,
                           const char *a, const char *b) {
  struct tn_buf p = {0};
  tn_buf_printf(&p,
                "Two answers to the same question follow. Which one is "
                "better? Answer \"tie\" when neither is better.\n\n");
  if (rubric) tn_buf_printf(&p, "Rubric:\n%s\n\n", rubric);
  tn_buf_printf(&p,
                "Question:\n%s\n\nAnswer A:\n%s\n\nAnswer B:\n%s\n\nReply as "
                "JSON: {\"winner\": \"A\" | \"B\" | \"tie\", "
                "\"reasoning\": \"<one sentence>\"}",
                question, a, b);
  if (p.oom) {
    tn_buf_free(&p);
    return NULL;
  }
  return p.data;
}

/* content: a string, or a list of parts whose text parts are joined */
static void put_content(struct tn_buf *b, const json_t *c) {
  if (json_is_string(c)) {
    tn_buf_printf(b, "%s", json_string_value(c));
    return;
  }
  size_t i;
  const json_t *part;
  json_array_foreach(c, i, part) {
    const char *t = json_string_value(json_object_get(part, "text"));
    if (t) tn_buf_printf(b, "%s", t);
  }
}

char *tn_judge_question(const json_t *request) {
  const char *p = json_string_value(json_object_get(request, "prompt"));
  if (p) return strdup(p);
  const json_t *m = json_object_get(request, "messages");
  struct tn_buf b = {0};
  size_t i;
  const json_t *x;
  json_array_foreach(m, i, x) {
    const char *role = json_string_value(json_object_get(x, "role"));
    tn_buf_printf(&b, "%s%s: ", i ? "\n" : "", role ? role : "?");
    put_content(&b, json_object_get(x, "content"));
  }
  if (b.oom) {
    tn_buf_free(&b);
    return NULL;
  }
  return b.data ? b.data : strdup("");
}

json_t *tn_answer_json(const char *text) {
  const char *s = text;
  size_t n = strlen(s);
  while (n && strchr(" \t\r\n", *s)) s++, n--;
  while (n && strchr(" \t\r\n", s[n - 1])) n--;
  if (n >= 6 && !strncmp(s, "```", 3)) {
    const char *nl = memchr(s, '\n', n);
    const char *end =
        n >= 3 && !strncmp(s + n - 3, "```", 3) ? s + n - 3 : NULL;
    if (nl && end && end > nl) {
      s = nl + 1;
      n = (size_t)(end - s);
    }
  }
  json_error_t je;
  return json_loadb(s, n, JSON_DECODE_ANY, &je);
}

json_t *tn_judge_verdict(const char *text) {
  json_t *v = tn_answer_json(text);
  if (json_is_object(v)) return v;
  json_decref(v);
  const char *open = strrchr(text, '{');
  while (open) {
    const char *close = strchr(open, '}');
    if (close) {
      json_error_t je;
      v = json_loadb(open, (size_t)(close - open + 1), 0, &je);
      if (json_is_object(v)) return v;
      json_decref(v);
    }
    if (open == text) break;
    const char *p = open - 1;
    while (p > text && *p != '{') p--;
    open = *p == '{' ? p : NULL;
  }
  return NULL;
}

char tn_judge_parse_winner(const char *text) {
  json_t *v = tn_judge_verdict(text);
  const char *w = json_string_value(json_object_get(v, "winner"));
  char out = 0;
  if (w && (!strcmp(w, "A") || !strcmp(w, "a"))) out = 'A';
  else if (w && (!strcmp(w, "B") || !strcmp(w, "b"))) out = 'B';
  else if (w && !strcasecmp(w, "tie")) out = 'T';
  json_decref(v);
  return out;
}

int tn_judge_parse_score(const char *text, long scale) {
  json_t *v = tn_judge_verdict(text);
  int s = 0;
  json_t *x = json_object_get(v, "score");
  if (json_is_integer(x)) s = (int)json_integer_value(x);
  else if (json_is_real(x)) s = (int)lround(json_real_value(x));
  else if (json_is_string(x)) s = atoi(json_string_value(x));
  json_decref(v);
  if (!s) {
    /* "Score: 4", "4/5" */
    const char *p = strstr(text, "core");
    if (p) {
      while (*p && !(*p >= '0' && *p <= '9')) p++;
      s = atoi(p);
    }
  }
  return s >= 1 && s <= scale ? s : 0;
}
