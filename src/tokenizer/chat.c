/*
 * chat.c: chat formatting with the model's own template.
 *
 * tokenizer.chat_template is compiled once at load by our Jinja
 * interpreter (src/jinja/) and rendered per request with the variables
 * Hugging Face's apply_chat_template passes: messages, tools,
 * add_generation_prompt, bos_token, eos_token, plus any
 * chat_template_kwargs. tests/e2e/test_chat_templates.py checks renders
 * against jinja2 on 70 real templates.
 *
 * Input shaping, as vLLM does it: an assistant turn's tool call arguments
 * arrive from OpenAI clients as a JSON string; templates index them as a
 * dict (tool_call.arguments | tojson, .items()), so a string that parses
 * to a JSON object is passed as that object.
 *
 * Tools: a template with a tools section in the <tool_call> convention
 * gets tools, tool calls and tool turns as they are. A template without
 * one (SmolLM2's, Gemma's) gets the same convention written in by us: the
 * function signatures and the call format appended to the system turn
 * (one is added when there is none), an assistant's calls written out as
 * <tool_call> blocks after its text, and tool turns as user turns holding
 * <tool_response> blocks (consecutive ones merged, so templates that want
 * user and assistant to alternate still render). The server parses the
 * model's <tool_call> blocks back into OpenAI tool_calls.
 *
 * BOS: templates begin with {{ bos_token }}; when the tokenizer adds BOS
 * itself (add_bos_token) a leading BOS text is cut from the rendering, so
 * encode(text, add_special=true) yields exactly one BOS (llama.cpp's
 * server does the same).
 *
 * A GGUF without tokenizer.chat_template gets no format: such files are
 * base models (the Gemma 3 270M we ship is one). The user may choose a
 * built-in template by name or a Jinja file (--chat-template). The
 * template's family (chatml, gemma, llama3, jinja) is recognised from its
 * markers only to name it in logs and /v1/models.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_internal.h"

/* Built-in templates, written after the models' own. */
static const char k_chatml[] =
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}";

static const char k_gemma[] =
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first "
    "else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}";

static const char k_llama3[] =
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}";

static enum tn_chat_family family_of(const char *t, size_t n) {
#define HAS(s) (memmem(t, n, (s), strlen(s)) != NULL)
  if (HAS("<|im_start|>")) return TN_CHAT_FAMILY_CHATML;
  if (HAS("<start_of_turn>")) return TN_CHAT_FAMILY_GEMMA;
  if (HAS("<|start_header_id|>")) return TN_CHAT_FAMILY_LLAMA3;
#undef HAS
  return TN_CHAT_FAMILY_JINJA;
}

void tn_chat_detect(struct tn_tokenizer *tok, const struct tn_gguf *g) {
  tok->chat_family = TN_CHAT_FAMILY_NONE;
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, "tokenizer.chat_template");
  if (!kv || kv->type != TN_GGUF_TYPE_STRING) {
    tok->chat_absent = true;
    return;
  }
  const char *t = kv->val.str.data;
  size_t n = kv->val.str.len;
  struct tn_error err = {0};
  if (tn_jinja_compile(t, n, &tok->chat_tmpl, &err) != TN_OK) {
    tn_log_warn("tokenizer: the GGUF's chat template does not compile (%s); "
                "chat formatting unavailable (--chat-template overrides)",
                err.msg);
    tok->chat_error = strdup(err.msg);
    return;
  }
  tok->chat_family = family_of(t, n);
  tok->chat_tool_call_tags = memmem(t, n, "<tool_call>", 11) != NULL;
}

static enum tn_status use_source(struct tn_tokenizer *tok, const char *src,
                                 size_t n, struct tn_error *err) {
  struct tn_jinja *t = NULL;
  enum tn_status st = tn_jinja_compile(src, n, &t, err);
  if (st) return st;
  tn_jinja_free(tok->chat_tmpl);
  tok->chat_tmpl = t;
  tok->chat_family = family_of(src, n);
  tok->chat_tool_call_tags = memmem(src, n, "<tool_call>", 11) != NULL;
  free(tok->chat_error);
  tok->chat_error = NULL;
  return TN_OK;
}

enum tn_status tn_chat_set_template(struct tn_tokenizer *tok,
                                    const char *name, struct tn_error *err) {
  static const struct {
    const char *name;
    const char *src;
    size_t len;
    const char *marker; /* a token the format needs */
  } builtin[] = {
      {"chatml", k_chatml, sizeof(k_chatml) - 1, "<|im_start|>"},
      {"gemma", k_gemma, sizeof(k_gemma) - 1, "<start_of_turn>"},
      {"llama3", k_llama3, sizeof(k_llama3) - 1, "<|start_header_id|>"},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(builtin); i++) {
    if (strcmp(name, builtin[i].name) != 0) continue;
    if (tn_tok_lookup(tok, builtin[i].marker, strlen(builtin[i].marker)) < 0)
      return tn_error_set(err, TN_EINVAL,
                          "chat template '%s' needs the token %s, which this "
                          "model's vocabulary lacks",
                          name, builtin[i].marker);
    return use_source(tok, builtin[i].src, builtin[i].len, err);
  }
  if (!strchr(name, '/') && !strstr(name, ".jinja"))
    return tn_error_set(err, TN_EINVAL,
                        "unknown chat template '%s' (built in: chatml, gemma, "
                        "llama3; or the path of a Jinja file)",
                        name);
  char *src = NULL;
  size_t n = 0;
  struct tn_error ferr = {0};
  if (tn_file_read(name, &src, &n, &ferr) != TN_OK)
    return tn_error_set(err, TN_EINVAL, "--chat-template %s: %s", name,
                        ferr.msg);
  if (n > (1u << 20)) {
    free(src);
    return tn_error_set(err, TN_EINVAL,
                        "--chat-template %s: %zu bytes; a template may have "
                        "at most 1 MiB",
                        name, n);
  }
  enum tn_status st = use_source(tok, src, n, &ferr);
  free(src);
  if (st)
    return tn_error_set(err, st, "--chat-template %s: %s", name, ferr.msg);
  return TN_OK;
}

void tn_chat_set_clock(struct tn_tokenizer *tok, int64_t now) {
  tok->chat_now = now;
}

bool tn_chat_available(const struct tn_tokenizer *tok) {
  return tok->chat_tmpl != NULL;
}

enum tn_chat_tools tn_chat_tools_format(const struct tn_tokenizer *tok) {
  if (!tok->chat_tmpl || !tn_jinja_uses(tok->chat_tmpl, "tools"))
    return TN_CHAT_TOOLS_INJECTED;
  return tok->chat_tool_call_tags ? TN_CHAT_TOOLS_NATIVE : TN_CHAT_TOOLS_OTHER;
}

bool tn_chat_uses_var(const struct tn_tokenizer *tok, const char *name) {
  return tok->chat_tmpl && tn_jinja_uses(tok->chat_tmpl, name);
}

void tn_chat_deinit(struct tn_tokenizer *tok) {
  tn_jinja_free(tok->chat_tmpl);
  tok->chat_tmpl = NULL;
  free(tok->chat_error);
  tok->chat_error = NULL;
}

const char *tn_chat_template_name(const struct tn_tokenizer *tok) {
  if (!tok->chat_tmpl) return "none";
  switch (tok->chat_family) {
  case TN_CHAT_FAMILY_CHATML: return "chatml";
  case TN_CHAT_FAMILY_GEMMA: return "gemma";
  case TN_CHAT_FAMILY_LLAMA3: return "llama3";
  default: return "jinja";
  }
}

static struct tn_jinja_val *token_text(struct tn_jinja_ctx *c,
                                       const struct tn_tokenizer *tok,
                                       int32_t id) {
  if (id < 0) return tn_jinja_str(c, "", 0);
  size_t len;
  const char *t = tn_tok_text(tok, id, &len);
  return tn_jinja_str(c, t, len);
}

/* tool_calls[i].function.arguments: a JSON string that parses to an object
 * becomes that object. */
static void shape_tool_calls(struct tn_jinja_ctx *c, struct tn_jinja_val *tc) {
  for (size_t i = 0; i < tn_jinja_list_len(tc); i++) {
    struct tn_jinja_val *call = tn_jinja_list_get(tc, i);
    struct tn_jinja_val *fn = tn_jinja_dict_get(c, call, "function");
    if (!fn) continue;
    struct tn_jinja_val *args = tn_jinja_dict_get(c, fn, "arguments");
    size_t n;
    const char *s = args ? tn_jinja_str_bytes(args, &n) : NULL;
    if (!s) continue;
    struct tn_jinja_val *obj = NULL;
    struct tn_error err = {0};
    if (tn_jinja_json(c, s, n, &obj, &err) == TN_OK && tn_jinja_is_dict(obj))
      tn_jinja_dict_set(c, fn, "arguments", obj);
  }
}

static enum tn_status json_var(struct tn_jinja_ctx *c, const char *what,
                               const char *s, size_t n,
                               struct tn_jinja_val **out,
                               struct tn_error *err) {
  struct tn_error e = {0};
  if (tn_jinja_json(c, s, n, out, &e) != TN_OK)
    return tn_error_set(err, TN_EINVAL, "chat: %s: %s", what, e.msg);
  return TN_OK;
}

/* ---- tools written in for templates without a tools section */

struct sb {
  char *p;
  size_t n, cap;
  bool oom;
};

static void sb_add(struct sb *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}
static void sb_cat(struct sb *b, const char *s) { sb_add(b, s, strlen(s)); }

/* Renders a small built-in template over one JSON variable, appending
 * the text to b. */
static bool render_json(struct sb *b, const char *tmpl, size_t tmpl_len,
                        const char *var, const char *json, size_t n) {
  struct tn_jinja_ctx *c = tn_jinja_ctx_new(64u << 20);
  if (!c) return false;
  struct tn_jinja *t = NULL;
  struct tn_jinja_val *v = NULL;
  char *out = NULL;
  size_t out_n = 0;
  bool ok = tn_jinja_compile(tmpl, tmpl_len, &t, NULL) == TN_OK &&
            tn_jinja_json(c, json, n, &v, NULL) == TN_OK;
  if (ok) {
    tn_jinja_set(c, var, v);
    ok = tn_jinja_render(t, c, NULL, &out, &out_n, NULL) == TN_OK;
  }
  if (ok) sb_add(b, out, out_n);
  free(out);
  tn_jinja_free(t);
  tn_jinja_ctx_free(c);
  return ok;
}

/* Each function of the tools array as JSON on its own line. */
static bool tools_text(struct sb *b, const char *json, size_t n) {
  static const char tmpl[] =
      "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}";
  return render_json(b, tmpl, sizeof(tmpl) - 1, "tools", json, n);
}

static const char k_tools_head[] =
    "# Tools\n\n"
    "You can call functions to help answer the user. Their signatures, one "
    "JSON object per line, are inside <tools></tools>:\n<tools>";
static const char k_tools_tail[] =
    "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and "
    "arguments inside <tool_call></tool_call> tags, one block per call:\n"
    "<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>";

/* Each call of an OpenAI tool_calls array as a <tool_call> block. */
static bool calls_text(struct sb *b, const char *json, size_t n) {
  static const char tmpl[] =
      "{%- for tc in calls %}"
      "{%- set f = tc.function if tc.function is defined else tc %}"
      "{%- set a = f.arguments %}"
      "\n<tool_call>\n{\"name\": {{ f.name | tojson }}, \"arguments\": "
      "{{ a if a is string else a | tojson }}}\n</tool_call>"
      "{%- endfor %}";
  return render_json(b, tmpl, sizeof(tmpl) - 1, "calls", json, n);
}

static bool role_is(const struct tn_chat_msg *m, const char *r) {
  return strcmp(m->role, r) == 0;
}

/* The conversation with tools written in (see the top of the file):
 * *out_msgs and every content in it are malloc'd (free_injected). */
static enum tn_status inject_tools(const struct tn_chat_msg *msgs,
                                   size_t n_msgs,
                                   const struct tn_chat_opts *opts,
                                   struct tn_chat_msg **out_msgs,
                                   size_t *out_n, struct tn_error *err) {
  struct tn_chat_msg *m = calloc(n_msgs + 1, sizeof(*m));
  if (!m) return tn_error_set(err, TN_ENOMEM, "chat: out of memory");
  size_t k = 0, i = 0;
  bool ok = true;
  if (opts->tools_json) {
    struct sb b = {0};
    bool sys = n_msgs > 0 && role_is(&msgs[0], "system");
    if (sys) {
      sb_add(&b, msgs[0].content ? msgs[0].content : "", msgs[0].content_len);
      sb_cat(&b, "\n\n");
      i = 1;
    }
    sb_cat(&b, k_tools_head);
    ok = tools_text(&b, opts->tools_json, opts->tools_len);
    sb_cat(&b, k_tools_tail);
    ok = ok && !b.oom;
    m[k++] = (struct tn_chat_msg){.role = "system", .content = b.p,
                                  .content_len = b.n};
  }
  for (; ok && i < n_msgs; i++) {
    const struct tn_chat_msg *x = &msgs[i];
    struct sb b = {0};
    const char *role = x->role;
    if (role_is(x, "tool")) {
      role = "user";
      for (; i < n_msgs && role_is(&msgs[i], "tool"); i++) {
        if (b.n) sb_cat(&b, "\n");
        sb_cat(&b, "<tool_response>\n");
        sb_add(&b, msgs[i].content ? msgs[i].content : "",
               msgs[i].content_len);
        sb_cat(&b, "\n</tool_response>");
      }
      i--;
    } else {
      sb_add(&b, x->content ? x->content : "", x->content_len);
      if (x->tool_calls_json) {
        size_t before = b.n;
        ok = calls_text(&b, x->tool_calls_json, x->tool_calls_len);
        if (ok && before == 0 && b.n > 0) { /* no text: no leading newline */
          memmove(b.p, b.p + 1, b.n);
          b.n--;
        }
      }
      if (!b.p) sb_add(&b, "", 0);
    }
    ok = ok && !b.oom;
    m[k++] = (struct tn_chat_msg){.role = role, .content = b.p,
                                  .content_len = b.n};
  }
  *out_msgs = m;
  *out_n = k;
  if (!ok)
    return tn_error_set(err, TN_EINVAL,
                        "chat: tools or tool_calls could not be written into "
                        "the prompt (invalid JSON or out of memory)");
  return TN_OK;
}

static void free_injected(struct tn_chat_msg *m, size_t n) {
  if (!m) return;
  for (size_t i = 0; i < n; i++) free((char *)m[i].content);
  free(m);
}

enum tn_status tn_chat_render(const struct tn_tokenizer *tok,
                              const struct tn_chat_msg *msgs, size_t n_msgs,
                              const struct tn_chat_opts *opts, char **out,
                              size_t *out_len, struct tn_error *err) {
  *out = NULL;
  *out_len = 0;
  if (!tok->chat_tmpl) {
    if (tok->chat_error)
      return tn_error_set(err, TN_EUNSUPPORTED,
                          "this model's chat template cannot be used: %s",
                          tok->chat_error);
    if (tok->chat_absent)
      return tn_error_set(err, TN_EUNSUPPORTED,
                          "this model has no chat template (its GGUF has no "
                          "tokenizer.chat_template: a base model, trained to "
                          "continue text, not to chat)");
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "this model has no usable chat template");
  }
  for (size_t i = 0; i < n_msgs; i++)
    if (!msgs[i].role || (!msgs[i].content && msgs[i].content_len))
      return tn_error_set(err, TN_EINVAL, "chat: message %zu has no role", i);

  struct tn_chat_msg *inj = NULL;
  size_t n_inj = 0;
  struct tn_chat_opts o = *opts;
  if (tn_chat_tools_format(tok) == TN_CHAT_TOOLS_INJECTED) {
    bool any = o.tools_json != NULL;
    for (size_t i = 0; i < n_msgs && !any; i++)
      any = msgs[i].tool_calls_json || role_is(&msgs[i], "tool");
    if (any) {
      enum tn_status st = inject_tools(msgs, n_msgs, &o, &inj, &n_inj, err);
      if (st) {
        free_injected(inj, n_inj);
        return st;
      }
      msgs = inj;
      n_msgs = n_inj;
      o.tools_json = NULL;
    }
  }
  opts = &o;
  struct tn_jinja_limits lim;
  tn_jinja_limits_default(&lim);
  lim.now = tok->chat_now;
  struct tn_jinja_ctx *c = tn_jinja_ctx_new(lim.max_memory);
  if (!c) {
    free_injected(inj, n_inj);
    return tn_error_set(err, TN_ENOMEM, "chat: out of memory");
  }
  enum tn_status st = TN_OK;
  struct tn_jinja_val *v;
  if (opts->kwargs_json) {
    if ((st = json_var(c, "chat_template_kwargs", opts->kwargs_json,
                       opts->kwargs_len, &v, err)))
      goto done;
    tn_jinja_set_all(c, v);
  }
  struct tn_jinja_val *list = tn_jinja_list(c);
  for (size_t i = 0; i < n_msgs; i++) {
    const struct tn_chat_msg *m = &msgs[i];
    struct tn_jinja_val *d = tn_jinja_dict(c);
    tn_jinja_dict_set(c, d, "role", tn_jinja_str(c, m->role, strlen(m->role)));
    tn_jinja_dict_set(c, d, "content",
                      m->content ? tn_jinja_str(c, m->content, m->content_len)
                                 : tn_jinja_none(c));
    if (m->tool_calls_json) {
      if ((st = json_var(c, "tool_calls", m->tool_calls_json,
                         m->tool_calls_len, &v, err)))
        goto done;
      shape_tool_calls(c, v);
      tn_jinja_dict_set(c, d, "tool_calls", v);
    }
    if (m->tool_call_id)
      tn_jinja_dict_set(c, d, "tool_call_id",
                        tn_jinja_str(c, m->tool_call_id,
                                     strlen(m->tool_call_id)));
    if (m->name)
      tn_jinja_dict_set(c, d, "name", tn_jinja_str(c, m->name, strlen(m->name)));
    tn_jinja_list_append(c, list, d);
  }
  tn_jinja_set(c, "messages", list);
  if (opts->tools_json) {
    if ((st = json_var(c, "tools", opts->tools_json, opts->tools_len, &v,
                       err)))
      goto done;
    tn_jinja_set(c, "tools", v);
  }
  if (opts->documents_json) {
    if ((st = json_var(c, "documents", opts->documents_json,
                       opts->documents_len, &v, err)))
      goto done;
    tn_jinja_set(c, "documents", v);
  }
  tn_jinja_set(c, "add_generation_prompt",
               tn_jinja_bool(c, opts->add_generation_prompt));
  tn_jinja_set(c, "bos_token", token_text(c, tok, tok->bos));
  tn_jinja_set(c, "eos_token", token_text(c, tok, tok->eos));

  char *text = NULL;
  size_t len = 0;
  if ((st = tn_jinja_render(tok->chat_tmpl, c, &lim, &text, &len, err)))
    goto done;
  if (tok->add_bos && tok->bos >= 0) {
    size_t bl;
    const char *bt = tn_tok_text(tok, tok->bos, &bl);
    if (bl && len >= bl && memcmp(text, bt, bl) == 0) {
      memmove(text, text + bl, len - bl + 1);
      len -= bl;
    }
  }
  *out = text;
  *out_len = len;
done:
  tn_jinja_ctx_free(c);
  free_injected(inj, n_inj);
  return st;
}

enum tn_status tn_chat_format(const struct tn_tokenizer *tok,
                              const struct tn_chat_msg *msgs, size_t n_msgs,
                              bool add_generation_prompt, char **out,
                              size_t *out_len, struct tn_error *err) {
  struct tn_chat_opts o = {.add_generation_prompt = add_generation_prompt};
  return tn_chat_render(tok, msgs, n_msgs, &o, out, out_len, err);
}
