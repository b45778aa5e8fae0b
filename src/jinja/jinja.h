/*
 * jinja.h: a sandboxed interpreter for the Jinja subset that chat templates
 * use, so a model's own tokenizer.chat_template renders as written.
 *
 * The dialect is Jinja2's as Hugging Face transformers configures it for
 * chat templates (what model authors test against): trim_blocks and
 * lstrip_blocks on, loop controls (break/continue), the {% generation %}
 * tag, an immutable sandbox (no list.append, no dict.update, no access to
 * attributes that start with '_'), tojson as json.dumps(ensure_ascii=False),
 * and the globals raise_exception(msg), strftime_now(fmt), range,
 * namespace and dict. Output is compared byte for byte with jinja2 on a
 * corpus of real templates (tests/e2e/test_chat_templates.py).
 *
 * Templates are untrusted: every render runs under limits on output size,
 * memory, steps (expression evaluations and loop iterations) and call
 * depth, and ends with a clear error, never a crash or a hang.
 *
 * A compiled template (tn_jinja) is immutable and may be rendered from
 * several threads at once, each with its own tn_jinja_ctx. A context holds
 * the variables of one render and every value made during it, in one arena
 * freed by tn_jinja_ctx_free.
 */
#ifndef TN_JINJA_H
#define TN_JINJA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

struct tn_jinja;      /* a compiled template */
struct tn_jinja_ctx;  /* variables and values of one render */
struct tn_jinja_val;  /* a value in a context (borrowed from it) */

/* Compiles template source (UTF-8, n bytes). On error *out is NULL and err
 * names the line and the problem. */
enum tn_status tn_jinja_compile(const char *src, size_t n,
                                struct tn_jinja **out, struct tn_error *err);
void tn_jinja_free(struct tn_jinja *t);
/* Whether the template's text mentions name as a variable anywhere (a cheap
 * scan of the compiled names: "tools", "documents", ...). */
bool tn_jinja_uses(const struct tn_jinja *t, const char *name);

struct tn_jinja_limits {
  size_t max_output;    /* bytes of any rendered string, output included */
  size_t max_memory;    /* bytes the render may allocate */
  uint64_t max_steps;   /* expression evaluations + loop iterations */
  unsigned max_depth;   /* macro call depth */
  int64_t now;          /* strftime_now's clock (Unix seconds, UTC); 0: now */
};
/* 8 MiB output, 256 MiB memory, 20M steps, depth 64, the real clock. */
void tn_jinja_limits_default(struct tn_jinja_limits *lim);

/* Context: returns NULL when out of memory. */
struct tn_jinja_ctx *tn_jinja_ctx_new(size_t max_memory);
void tn_jinja_ctx_free(struct tn_jinja_ctx *c);

/* Value constructors. Values live until tn_jinja_ctx_free. When the
 * context's memory runs out they return a placeholder and the context
 * remembers it: the next render or set fails with TN_ENOMEM. */
struct tn_jinja_val *tn_jinja_none(struct tn_jinja_ctx *c);
struct tn_jinja_val *tn_jinja_bool(struct tn_jinja_ctx *c, bool b);
struct tn_jinja_val *tn_jinja_int(struct tn_jinja_ctx *c, int64_t i);
struct tn_jinja_val *tn_jinja_str(struct tn_jinja_ctx *c, const char *s,
                                  size_t n);
struct tn_jinja_val *tn_jinja_list(struct tn_jinja_ctx *c);
struct tn_jinja_val *tn_jinja_dict(struct tn_jinja_ctx *c);
/* Appends v to list (a list made by tn_jinja_list). */
void tn_jinja_list_append(struct tn_jinja_ctx *c, struct tn_jinja_val *list,
                          const struct tn_jinja_val *v);
/* Sets key (a UTF-8 string) to v in dict, keeping insertion order. */
void tn_jinja_dict_set(struct tn_jinja_ctx *c, struct tn_jinja_val *dict,
                       const char *key, const struct tn_jinja_val *v);
/* Parses JSON text (RFC 8259; integers stay integers as Python's json
 * does) into a value; err names the offset of a syntax error. */
enum tn_status tn_jinja_json(struct tn_jinja_ctx *c, const char *text,
                             size_t n, struct tn_jinja_val **out,
                             struct tn_error *err);
/* Whether v is a dict / a string (for callers shaping input). */
bool tn_jinja_is_dict(const struct tn_jinja_val *v);
bool tn_jinja_is_str(const struct tn_jinja_val *v);
/* Looks key up in dict v; NULL when absent or v is not a dict. */
struct tn_jinja_val *tn_jinja_dict_get(struct tn_jinja_ctx *c,
                                       const struct tn_jinja_val *v,
                                       const char *key);

/* A list's length and its i-th item (NULL when out of range or v is not a
 * list). */
size_t tn_jinja_list_len(const struct tn_jinja_val *v);
struct tn_jinja_val *tn_jinja_list_get(const struct tn_jinja_val *v,
                                       size_t i);
/* The bytes of a string value (NULL when v is not a string). */
const char *tn_jinja_str_bytes(const struct tn_jinja_val *v, size_t *n);

/* Sets a template variable (a copy of v: lists and dicts are shared). */
void tn_jinja_set(struct tn_jinja_ctx *c, const char *name,
                  const struct tn_jinja_val *v);

/* Sets every key of dict as a template variable. */
void tn_jinja_set_all(struct tn_jinja_ctx *c, const struct tn_jinja_val *dict);

/* Renders t with the variables of c. lim may be NULL (defaults). On
 * success *out is malloc'd (caller frees with free()), NUL-terminated after
 * *out_len bytes. Errors: TN_EINVAL for a template error (the message has
 * the line and, for raise_exception, the template's own text), TN_ERANGE
 * for a sandbox limit, TN_ENOMEM. */
enum tn_status tn_jinja_render(const struct tn_jinja *t,
                               struct tn_jinja_ctx *c,
                               const struct tn_jinja_limits *lim, char **out,
                               size_t *out_len, struct tn_error *err);

#endif /* TN_JINJA_H */
