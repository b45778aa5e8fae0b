/*
 * chat.c: chat formatting for the template families our models ship.
 *
 * We do not run Jinja. The family is recognised from markers in
 * tokenizer.chat_template (as llama.cpp's llm_chat_detect_template does),
 * and each family is written out by hand so that the result is byte for
 * byte what the model's own template renders (tools/gen_tokenizer_fixtures.py
 * checks this against jinja2 for several conversations):
 *
 *  - chatml  ("<|im_start|>"): every message as
 *    "<|im_start|>{role}\n{content}<|im_end|>\n", content untouched. When the
 *    template carries a literal default system turn (SmolLM2: "You are a
 *    helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5:
 *    "You are Qwen, created by Alibaba Cloud. You are a helpful
 *    assistant.") it is emitted first unless the first message is a system
 *    message. Generation prompt "<|im_start|>assistant\n".
 *  - gemma   ("<start_of_turn>"): a leading system message becomes
 *    "{system}\n\n" in front of the first turn; roles must alternate
 *    user/assistant; assistant is spelled "model"; contents are trimmed
 *    (Python str.strip()). Generation prompt "<start_of_turn>model\n".
 *  - llama3  ("<|start_header_id|>"): "<|start_header_id|>{role}
 *    <|end_header_id|>\n\n{trimmed content}<|eot_id|>". Templates that
 *    mention "Cutting Knowledge Date" (3.1+) always open with a system turn
 *    carrying the knowledge date and "Today Date: " + the template's default
 *    date_string ("26 Jul 2024"; we never call strftime_now).
 *
 * A GGUF without tokenizer.chat_template gets no format: such files are
 * base models (the Gemma 3 270M we ship is one), and guessing a format
 * from the special tokens they still carry gives noise. The user may
 * choose a family by name (tn_chat_set_template; --chat-template).
 *
 * BOS: Gemma's and Llama 3's templates begin with bos_token. When the
 * tokenizer adds BOS itself (add_bos_token, true for both), we leave it out
 * of the text, so encode(text, add_special=true) yields exactly one BOS
 * (llama.cpp's server strips it the same way). When add_bos is false the
 * BOS text is written.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/tokenizer_internal.h"

/* Unescapes a Jinja string literal body (\n, \t, \\, \', \"). */
static char *unescape(const char *s, size_t n) {
  char *out = malloc(n + 1);
  if (!out) return NULL;
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '\\' && i + 1 < n) {
      char c = s[++i];
      switch (c) {
      case 'n': out[o++] = '\n'; break;
      case 't': out[o++] = '\t'; break;
      case 'r': out[o++] = '\r'; break;
      default: out[o++] = c; break;
      }
    } else {
      out[o++] = s[i];
    }
  }
  out[o] = '\0';
  return out;
}

/* A literal default system turn: "<|im_start|>system" + newline (real or
 * escaped) + text without quotes or braces + "<|im_end|>". */
static char *find_default_system(const char *t, size_t n) {
  static const char mark[] = "<|im_start|>system";
  const size_t ml = sizeof(mark) - 1;
  const char *end = t + n;
  for (const char *p = t; p < end;) {
    const char *q = memmem(p, (size_t)(end - p), mark, ml);
    if (!q) break;
    const char *s = q + ml;
    p = s;
    if (s < end && *s == '\n') s += 1;
    else if (end - s >= 2 && s[0] == '\\' && s[1] == 'n') s += 2;
    else continue;
    const char *e = memmem(s, (size_t)(end - s), "<|im_end|>", 10);
    if (!e || e == s) continue;
    bool literal = true;
    for (const char *c = s; c < e; c++)
      if (*c == '\'' || *c == '"' || *c == '{' || *c == '}') {
        literal = false;
        break;
      }
    if (literal) return unescape(s, (size_t)(e - s));
  }
  return NULL;
}

void tn_chat_detect(struct tn_tokenizer *tok, const struct tn_gguf *g) {
  tok->chat_family = TN_CHAT_FAMILY_NONE;
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, "tokenizer.chat_template");
  const char *t = NULL;
  size_t n = 0;
  if (kv && kv->type == TN_GGUF_TYPE_STRING) {
    t = kv->val.str.data;
    n = kv->val.str.len;
  }
#define HAS(s) (t && memmem(t, n, (s), strlen(s)) != NULL)
  if (t) {
    if (HAS("<|im_start|>")) {
      tok->chat_family = TN_CHAT_FAMILY_CHATML;
      tok->chat_default_system = find_default_system(t, n);
    } else if (HAS("<start_of_turn>")) {
      tok->chat_family = TN_CHAT_FAMILY_GEMMA;
    } else if (HAS("<|start_header_id|>")) {
      tok->chat_family = TN_CHAT_FAMILY_LLAMA3;
      tok->chat_llama3_dated = HAS("Cutting Knowledge Date");
      snprintf(tok->chat_date, sizeof(tok->chat_date), "26 Jul 2024");
      static const char ds[] = "set date_string = \"";
      const char *d = memmem(t, n, ds, sizeof(ds) - 1);
      if (d) {
        d += sizeof(ds) - 1;
        const char *e = memchr(d, '"', (size_t)(t + n - d));
        if (e && (size_t)(e - d) < sizeof(tok->chat_date)) {
          memcpy(tok->chat_date, d, (size_t)(e - d));
          tok->chat_date[e - d] = '\0';
        }
      }
    } else {
      tn_log_warn("tokenizer: chat template not recognised; "
                  "chat formatting unavailable");
    }
  } else {
    tok->chat_absent = true;
  }
#undef HAS
}

enum tn_status tn_chat_set_template(struct tn_tokenizer *tok,
                                    const char *name, struct tn_error *err) {
  static const struct {
    const char *name;
    enum tn_chat_family fam;
    const char *marker; /* a token the format needs */
  } fams[] = {
      {"chatml", TN_CHAT_FAMILY_CHATML, "<|im_start|>"},
      {"gemma", TN_CHAT_FAMILY_GEMMA, "<start_of_turn>"},
      {"llama3", TN_CHAT_FAMILY_LLAMA3, "<|start_header_id|>"},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(fams); i++) {
    if (strcmp(name, fams[i].name) != 0) continue;
    if (tn_tok_lookup(tok, fams[i].marker, strlen(fams[i].marker)) < 0)
      return tn_error_set(err, TN_EINVAL,
                          "chat template '%s' needs the token %s, which this "
                          "model's vocabulary lacks",
                          name, fams[i].marker);
    free(tok->chat_default_system);
    tok->chat_default_system = NULL;
    tok->chat_family = fams[i].fam;
    tok->chat_llama3_dated = false;
    return TN_OK;
  }
  return tn_error_set(err, TN_EINVAL,
                      "unknown chat template '%s' (known: chatml, gemma, "
                      "llama3)",
                      name);
}

bool tn_chat_available(const struct tn_tokenizer *tok) {
  return tok->chat_family != TN_CHAT_FAMILY_NONE;
}

void tn_chat_deinit(struct tn_tokenizer *tok) {
  free(tok->chat_default_system);
  tok->chat_default_system = NULL;
}

const char *tn_chat_template_name(const struct tn_tokenizer *tok) {
  switch (tok->chat_family) {
  case TN_CHAT_FAMILY_CHATML: return "chatml";
  case TN_CHAT_FAMILY_GEMMA: return "gemma";
  case TN_CHAT_FAMILY_LLAMA3: return "llama3";
  default: return "none";
  }
}

/* ---- output buffer */

struct sbuf {
  char *p;
  size_t n, cap;
  bool oom;
};

static void sb_put(struct sbuf *b, const char *s, size_t n) {
  if (b->oom || n == 0) return;
  size_t need;
  if (tn_add_overflow(b->n, n + 1, &need)) {
    b->oom = true;
    return;
  }
  if (need > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) {
      if (tn_mul_overflow(cap, 2, &cap)) {
        b->oom = true;
        return;
      }
    }
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}
static void sb_str(struct sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* Python str.isspace() for a codepoint. */
static bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

/* Jinja's trim: Python str.strip() on the UTF-8 text. */
static void trim(const char *s, size_t n, const char **os, size_t *on) {
  size_t a = 0, b = n;
  while (a < b) {
    uint32_t c;
    size_t l = tn_utf8_decode((const uint8_t *)s + a, b - a, &c);
    if (!l || !py_space(c)) break;
    a += l;
  }
  while (b > a) {
    /* find the start of the last character */
    size_t k = b - 1;
    while (k > a && ((uint8_t)s[k] & 0xC0) == 0x80 && b - k < 4) k--;
    uint32_t c;
    size_t l = tn_utf8_decode((const uint8_t *)s + k, b - k, &c);
    if (l != b - k || !py_space(c)) break;
    b = k;
  }
  *os = s + a;
  *on = b - a;
}

static bool role_is(const struct tn_chat_msg *m, const char *r) {
  return m->role && strcmp(m->role, r) == 0;
}

static void put_bos(const struct tn_tokenizer *tok, struct sbuf *b) {
  if (tok->add_bos || tok->bos < 0) return;
  size_t len;
  const char *t = tn_tok_text(tok, tok->bos, &len);
  sb_put(b, t, len);
}

enum tn_status tn_chat_format(const struct tn_tokenizer *tok,
                              const struct tn_chat_msg *msgs, size_t n_msgs,
                              bool add_generation_prompt, char **out,
                              size_t *out_len, struct tn_error *err) {
  struct sbuf b = {0};
  *out = NULL;
  *out_len = 0;
  for (size_t i = 0; i < n_msgs; i++)
    if (!msgs[i].role || (!msgs[i].content && msgs[i].content_len))
      return tn_error_set(err, TN_EINVAL, "chat: message %zu has no role", i);

  switch (tok->chat_family) {
  case TN_CHAT_FAMILY_CHATML:
    for (size_t i = 0; i < n_msgs; i++) {
      if (i == 0 && tok->chat_default_system && !role_is(&msgs[0], "system")) {
        sb_str(&b, "<|im_start|>system\n");
        sb_str(&b, tok->chat_default_system);
        sb_str(&b, "<|im_end|>\n");
      }
      sb_str(&b, "<|im_start|>");
      sb_str(&b, msgs[i].role);
      sb_str(&b, "\n");
      sb_put(&b, msgs[i].content, msgs[i].content_len);
      sb_str(&b, "<|im_end|>\n");
    }
    if (add_generation_prompt) sb_str(&b, "<|im_start|>assistant\n");
    break;

  case TN_CHAT_FAMILY_GEMMA: {
    put_bos(tok, &b);
    size_t first = 0;
    const struct tn_chat_msg *sys = NULL;
    if (n_msgs > 0 && role_is(&msgs[0], "system")) {
      sys = &msgs[0];
      first = 1;
    }
    for (size_t i = first; i < n_msgs; i++) {
      bool want_user = (i - first) % 2 == 0;
      if (role_is(&msgs[i], "user") != want_user ||
          (!want_user && !role_is(&msgs[i], "assistant"))) {
        free(b.p);
        return tn_error_set(err, TN_EINVAL,
                            "chat: message %zu has role '%s': conversation "
                            "roles must alternate user/assistant",
                            i, msgs[i].role);
      }
      sb_str(&b, "<start_of_turn>");
      sb_str(&b, want_user ? "user" : "model");
      sb_str(&b, "\n");
      if (i == first && sys) {
        sb_put(&b, sys->content, sys->content_len);
        sb_str(&b, "\n\n");
      }
      const char *c;
      size_t cl;
      trim(msgs[i].content ? msgs[i].content : "", msgs[i].content_len, &c,
           &cl);
      sb_put(&b, c, cl);
      sb_str(&b, "<end_of_turn>\n");
    }
    if (add_generation_prompt) sb_str(&b, "<start_of_turn>model\n");
    break;
  }

  case TN_CHAT_FAMILY_LLAMA3: {
    put_bos(tok, &b);
    size_t first = 0;
    if (tok->chat_llama3_dated) {
      const char *sc = "";
      size_t sl = 0;
      if (n_msgs > 0 && role_is(&msgs[0], "system")) {
        trim(msgs[0].content ? msgs[0].content : "", msgs[0].content_len, &sc,
             &sl);
        first = 1;
      }
      sb_str(&b, "<|start_header_id|>system<|end_header_id|>\n\n");
      sb_str(&b, "Cutting Knowledge Date: December 2023\n");
      sb_str(&b, "Today Date: ");
      sb_str(&b, tok->chat_date);
      sb_str(&b, "\n\n");
      sb_put(&b, sc, sl);
      sb_str(&b, "<|eot_id|>");
    }
    for (size_t i = first; i < n_msgs; i++) {
      const char *c;
      size_t cl;
      trim(msgs[i].content ? msgs[i].content : "", msgs[i].content_len, &c,
           &cl);
      sb_str(&b, "<|start_header_id|>");
      sb_str(&b, msgs[i].role);
      sb_str(&b, "<|end_header_id|>\n\n");
      sb_put(&b, c, cl);
      sb_str(&b, "<|eot_id|>");
    }
    if (add_generation_prompt)
      sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    break;
  }

  default:
    if (tok->chat_absent)
      return tn_error_set(err, TN_EUNSUPPORTED,
                          "this model has no chat template (its GGUF has no "
                          "tokenizer.chat_template: a base model, trained to "
                          "continue text, not to chat)");
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "this model's chat template is not one tern "
                        "recognises (ChatML, Gemma, Llama 3)");
  }
  /* An empty conversation without a generation prompt renders as "" (a
   * buffer, not NULL: sb_put skips empty writes). */
  if (!b.p && !b.oom) {
    b.p = malloc(1);
    if (b.p) b.p[0] = '\0';
    else b.oom = true;
  }
  if (b.oom) {
    free(b.p);
    return tn_error_set(err, TN_ENOMEM, "chat: out of memory");
  }
  *out = b.p;
  *out_len = b.n;
  return TN_OK;
}
