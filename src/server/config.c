/*
 * config.c: the `tern serve --config` loader (format in config.h).
 *
 * The file is untrusted, so we read it as a stream of libyaml events and
 * walk the one shape we accept with a small recursive descent: the top
 * mapping, the models list, each model's mapping, each aliases list. Any
 * event that does not fit stops the walk with a message naming the key
 * path and the line; nothing is skipped, so no input can make us descend
 * further than those four levels, and alias events (*ref) are refused the
 * moment they appear, which rules out expansion bombs.
 */
#include "server/config.h"
#include "engine/engine.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <jansson.h>
#include <yaml.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#define CONFIG_FILE_MAX (1u << 20)

/* ---- sizes */

bool tn_parse_price(const char *s, double *out) {
  const char *p = s;
  bool digits = false, dot = false;
  for (; *p; p++) {
    if (*p >= '0' && *p <= '9') digits = true;
    else if (*p == '.' && !dot) dot = true;
    else return false;
  }
  if (!digits) return false;
  double v = strtod(s, NULL);
  if (!(v >= 0 && v <= 1e6)) return false;
  *out = v;
  return true;
}

enum tn_status tn_parse_size(const char *s, int64_t *out,
                             struct tn_error *err) {
  static const struct {
    const char *suffix;
    int64_t mult;
  } units[] = {
      {"", 1},
      {"b", 1},
      {"k", 1ll << 10},   {"kib", 1ll << 10}, {"kb", 1000ll},
      {"m", 1ll << 20},   {"mib", 1ll << 20}, {"mb", 1000000ll},
      {"g", 1ll << 30},   {"gib", 1ll << 30}, {"gb", 1000000000ll},
      {"t", 1ll << 40},   {"tib", 1ll << 40}, {"tb", 1000000000000ll},
  };
  if (out) *out = 0;
  if (!s || !*s)
    return tn_error_set(err, TN_EINVAL, "size is empty");
  const char *p = s;
  int64_t v = 0;
  while (*p >= '0' && *p <= '9') {
    if (__builtin_mul_overflow(v, 10, &v) ||
        __builtin_add_overflow(v, *p - '0', &v))
      return tn_error_set(err, TN_EINVAL, "size '%.64s' is too large", s);
    p++;
  }
  if (p == s)
    return tn_error_set(err, TN_EINVAL,
                        "size '%.64s' is not a number of bytes (like 512MiB)",
                        s);
  for (size_t i = 0; i < TN_ARRAY_LEN(units); i++) {
    if (strcasecmp(p, units[i].suffix) != 0) continue;
    int64_t r;
    if (__builtin_mul_overflow(v, units[i].mult, &r))
      return tn_error_set(err, TN_EINVAL, "size '%.64s' is too large", s);
    if (out) *out = r;
    return TN_OK;
  }
  return tn_error_set(err, TN_EINVAL,
                      "size '%.64s' has an unknown unit '%.16s' (use B, K, "
                      "KiB, KB, M, MiB, MB, G, GiB, GB, T, TiB or TB)",
                      s, p);
}

/* ---- the event walker */

struct loader {
  yaml_parser_t parser;
  yaml_event_t ev;       /* the current event, valid when have_ev */
  bool have_ev;
  const char *file;
  struct tn_error *err;
  struct tn_serve_config *cfg;
};

static int ev_line(const struct loader *ld) {
  return (int)ld->ev.start_mark.line + 1;
}

/* Fails with "FILE:LINE: KEY: message". */
static enum tn_status fail(struct loader *ld, enum tn_status st, int line,
                           const char *key, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static enum tn_status fail(struct loader *ld, enum tn_status st, int line,
                           const char *key, const char *fmt, ...) {
  char msg[384];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (key && *key)
    return tn_error_set(ld->err, st, "%.96s:%d: %.64s: %s", ld->file, line,
                        key, msg);
  return tn_error_set(ld->err, st, "%.96s:%d: %s", ld->file, line, msg);
}

/* Advances to the next event; refuses YAML aliases. key labels errors. */
static enum tn_status next(struct loader *ld, const char *key) {
  if (ld->have_ev) {
    yaml_event_delete(&ld->ev);
    ld->have_ev = false;
  }
  if (!yaml_parser_parse(&ld->parser, &ld->ev)) {
    yaml_parser_t *p = &ld->parser;
    if (p->error == YAML_MEMORY_ERROR)
      return tn_error_set(ld->err, TN_ENOMEM, "%.96s: out of memory",
                          ld->file);
    if (p->error == YAML_READER_ERROR)
      return tn_error_set(ld->err, TN_EFORMAT,
                          "%.96s: invalid YAML text at byte %zu: %.128s",
                          ld->file, p->problem_offset,
                          p->problem ? p->problem : "unreadable");
    int line = (int)p->problem_mark.line + 1;
    if (p->context)
      return tn_error_set(ld->err, TN_EFORMAT,
                          "%.96s:%d: YAML syntax error: %.128s %.128s",
                          ld->file, line, p->context,
                          p->problem ? p->problem : "");
    return tn_error_set(ld->err, TN_EFORMAT,
                        "%.96s:%d: YAML syntax error: %.128s", ld->file, line,
                        p->problem ? p->problem : "unknown error");
  }
  ld->have_ev = true;
  if (ld->ev.type == YAML_ALIAS_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "YAML aliases (*%.64s) are not allowed in a config",
                (const char *)ld->ev.data.alias.anchor);
  return TN_OK;
}

static const char *ev_kind(const yaml_event_t *ev) {
  switch (ev->type) {
    case YAML_SCALAR_EVENT: return "a scalar";
    case YAML_SEQUENCE_START_EVENT: return "a list";
    case YAML_MAPPING_START_EVENT: return "a mapping";
    default: return "nothing";
  }
}

static const char *scalar_text(const struct loader *ld) {
  return (const char *)ld->ev.data.scalar.value;
}

static bool scalar_is_null(const struct loader *ld) {
  if (ld->ev.data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return false;
  const char *s = scalar_text(ld);
  return !*s || !strcmp(s, "~") || !strcmp(s, "null") ||
         !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* Reads the value of key: a non-null scalar. */
static enum tn_status expect_scalar(struct loader *ld, const char *key) {
  enum tn_status st = next(ld, key);
  if (st) return st;
  if (ld->ev.type != YAML_SCALAR_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), key, "expected a value, got %s",
                ev_kind(&ld->ev));
  if (scalar_is_null(ld))
    return fail(ld, TN_EINVAL, ev_line(ld), key, "expected a value, got null");
  if (ld->ev.data.scalar.length != strlen(scalar_text(ld)))
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "value contains a NUL character");
  return TN_OK;
}

/* Copies the value of key (read now, or already current when !read). */
static enum tn_status take_string(struct loader *ld, const char *key,
                                  size_t max_len, char **dst, bool read) {
  if (read) {
    enum tn_status st = expect_scalar(ld, key);
    if (st) return st;
  }
  size_t n = ld->ev.data.scalar.length;
  if (n == 0)
    return fail(ld, TN_EINVAL, ev_line(ld), key, "value is empty");
  if (n > max_len)
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "value is %zu bytes long (at most %zu)", n, max_len);
  char *s = strdup(scalar_text(ld));
  if (!s) return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  free(*dst);
  *dst = s;
  return TN_OK;
}

/* A model name or alias: 1..TN_SERVE_NAME_MAX bytes, no whitespace or
 * control characters. Checks the current scalar event. */
static enum tn_status check_name(struct loader *ld, const char *key) {
  const char *s = scalar_text(ld);
  size_t n = ld->ev.data.scalar.length;
  if (n > TN_SERVE_NAME_MAX)
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "name is %zu bytes long (at most %d)", n, TN_SERVE_NAME_MAX);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++)
    if (*p <= 0x20 || *p == 0x7f)
      return fail(ld, TN_EINVAL, ev_line(ld), key,
                  "'%.64s' contains whitespace or a control character", s);
  return TN_OK;
}

/* Names and aliases are unique across all models: the current scalar
 * against every name and alias read so far (the model being read
 * included). */
static enum tn_status check_unique(struct loader *ld, const char *key) {
  const struct tn_serve_config *cfg = ld->cfg;
  const char *s = scalar_text(ld);
  for (int j = 0; j < cfg->n_models; j++) {
    const struct tn_serve_model_cfg *o = &cfg->models[j];
    for (int b = -1; b < o->n_aliases; b++) {
      const char *t = b < 0 ? o->name : o->aliases[b];
      if (!t || strcmp(s, t) != 0) continue;
      char owner[160];
      if (o->name) snprintf(owner, sizeof owner, "model '%s'", o->name);
      else snprintf(owner, sizeof owner, "models[%d]", j);
      return fail(ld, TN_EINVAL, ev_line(ld), key,
                  "'%s' is already the %s of %s", s,
                  b < 0 ? "name" : "alias", owner);
    }
    for (int a = 0; a < o->n_adapters; a++)
      if (o->adapters[a].name && !strcmp(s, o->adapters[a].name))
        return fail(ld, TN_EINVAL, ev_line(ld), key,
                    "'%s' is already an adapter of model '%s'", s,
                    o->name ? o->name : "?");
  }
  return TN_OK;
}

static enum tn_status take_name(struct loader *ld, const char *key,
                                char **dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st || (st = check_name(ld, key)) || (st = check_unique(ld, key)))
    return st;
  return take_string(ld, key, TN_SERVE_NAME_MAX, dst, false);
}

static enum tn_status take_int(struct loader *ld, const char *key,
                               int64_t lo, int64_t hi, int64_t *dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st) return st;
  const char *s = scalar_text(ld);
  const char *p = s;
  if (*p == '-' || *p == '+') p++;
  bool digits = *p >= '0' && *p <= '9';
  for (; *p >= '0' && *p <= '9'; p++) {
  }
  if (!digits || *p)
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "'%.64s' is not an integer", s);
  errno = 0;
  long long v = strtoll(s, NULL, 10);
  if (errno == ERANGE || v < lo || v > hi)
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "%.64s is out of range %lld..%lld", s, (long long)lo,
                (long long)hi);
  *dst = v;
  return TN_OK;
}

static enum tn_status take_i32(struct loader *ld, const char *key, int32_t lo,
                               int32_t hi, int32_t *dst) {
  int64_t v;
  enum tn_status st = take_int(ld, key, lo, hi, &v);
  if (!st) *dst = (int32_t)v;
  return st;
}

static enum tn_status take_size(struct loader *ld, const char *key,
                                int64_t *dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st) return st;
  struct tn_error e;
  int64_t v;
  if (tn_parse_size(scalar_text(ld), &v, &e) != TN_OK)
    return fail(ld, TN_EINVAL, ev_line(ld), key, "%s", e.msg);
  if (v <= 0)
    return fail(ld, TN_EINVAL, ev_line(ld), key, "size must be positive");
  *dst = v;
  return TN_OK;
}

/* A price in USD per million tokens: a plain decimal number >= 0. */
static enum tn_status take_price(struct loader *ld, const char *key,
                                 double *dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st) return st;
  const char *s = scalar_text(ld);
  double v;
  if (!tn_parse_price(s, &v))
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "'%.64s' is not a price (USD per million tokens, e.g. 0.15)",
                s);
  *dst = v;
  return TN_OK;
}

/* The next event is a mapping key (a scalar) or the mapping's end. Sets
 * *done at the end; otherwise leaves the key's text in the current event.
 * seen/names/n_names catch unknown and repeated keys. */
static enum tn_status next_key(struct loader *ld, const char *where,
                               const char *const *names, int n_names,
                               unsigned *seen, int *which, bool *done) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  *done = ld->ev.type == YAML_MAPPING_END_EVENT;
  if (*done) return TN_OK;
  if (ld->ev.type != YAML_SCALAR_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a key, got %s", ev_kind(&ld->ev));
  const char *k = scalar_text(ld);
  for (int i = 0; i < n_names; i++) {
    if (strcmp(k, names[i]) != 0) continue;
    if (*seen & (1u << i))
      return fail(ld, TN_EINVAL, ev_line(ld), where, "duplicate key '%s'",
                  names[i]);
    *seen |= 1u << i;
    *which = i;
    return TN_OK;
  }
  char expected[256] = "";
  for (int i = 0; i < n_names; i++) {
    size_t n = strlen(expected);
    snprintf(expected + n, sizeof expected - n, "%s%s",
             i == 0 ? "" : i == n_names - 1 ? " or " : ", ", names[i]);
  }
  return fail(ld, TN_EINVAL, ev_line(ld), where,
              "unknown key '%.64s' (expected %s)", k, expected);
}

static enum tn_status parse_aliases(struct loader *ld, const char *where,
                                    struct tn_serve_model_cfg *m) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a list of names, got %s", ev_kind(&ld->ev));
  for (;;) {
    char key[128];
    snprintf(key, sizeof key, "%s[%d]", where, m->n_aliases);
    st = next(ld, key);
    if (st) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) return TN_OK;
    if (m->n_aliases == TN_SERVE_ALIASES_MAX)
      return fail(ld, TN_EINVAL, ev_line(ld), where,
                  "more than %d aliases", TN_SERVE_ALIASES_MAX);
    if (ld->ev.type != YAML_SCALAR_EVENT)
      return fail(ld, TN_EINVAL, ev_line(ld), key, "expected a name, got %s",
                  ev_kind(&ld->ev));
    if (!m->aliases) {
      m->aliases = calloc(TN_SERVE_ALIASES_MAX, sizeof *m->aliases);
      if (!m->aliases) return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
    }
    if (scalar_is_null(ld))
      return fail(ld, TN_EINVAL, ev_line(ld), key,
                  "expected a name, got null");
    if (ld->ev.data.scalar.length != strlen(scalar_text(ld)))
      return fail(ld, TN_EINVAL, ev_line(ld), key,
                  "value contains a NUL character");
    char *name = NULL;
    if ((st = check_name(ld, key)) || (st = check_unique(ld, key)) ||
        (st = take_string(ld, key, TN_SERVE_NAME_MAX, &name, false)))
      return st;
    m->aliases[m->n_aliases++] = name;
  }
}

/* adapters: a list of {name, path, scale}; names follow the adapter rule
 * (tn_adapter_name_ok) and are unique among every name and alias. */
static enum tn_status parse_adapters(struct loader *ld, const char *where,
                                     struct tn_serve_model_cfg *m) {
  static const char *const keys[3] = {"name", "path", "scale"};
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a list of {name, path, scale}, got %s",
                ev_kind(&ld->ev));
  for (;;) {
    char at[160], key[200];
    snprintf(at, sizeof at, "%s[%d]", where, m->n_adapters);
    if ((st = next(ld, at))) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) return TN_OK;
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
      return fail(ld, TN_EINVAL, ev_line(ld), at,
                  "expected a mapping {name, path, scale}, got %s",
                  ev_kind(&ld->ev));
    if (m->n_adapters == TN_SERVE_ADAPTERS_MAX)
      return fail(ld, TN_EINVAL, ev_line(ld), where, "more than %d adapters",
                  TN_SERVE_ADAPTERS_MAX);
    if (!m->adapters &&
        !(m->adapters = calloc(TN_SERVE_ADAPTERS_MAX, sizeof(*m->adapters))))
      return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
    struct tn_serve_adapter_cfg *a = &m->adapters[m->n_adapters++];
    a->scale = 1.0f;
    int line = ev_line(ld);
    unsigned seen = 0;
    for (;;) {
      int which = -1;
      bool done;
      if ((st = next_key(ld, at, keys, 3, &seen, &which, &done))) return st;
      if (done) break;
      TN_ASSERT(which >= 0 && which < 3);
      snprintf(key, sizeof key, "%s.%s", at, keys[which]);
      if (which == 0) {
        if ((st = expect_scalar(ld, key)) || (st = check_unique(ld, key)))
          return st;
        if (!tn_adapter_name_ok(scalar_text(ld)))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s': an adapter name is 1..%d letters, digits, "
                      "'-', '_' or '.'",
                      scalar_text(ld), TN_ADAPTER_NAME_MAX);
        st = take_string(ld, key, TN_ADAPTER_NAME_MAX, &a->name, false);
      } else if (which == 1) {
        st = take_string(ld, key, 4096, &a->path, true);
      } else {
        if ((st = expect_scalar(ld, key))) return st;
        char *end;
        const char *t = scalar_text(ld);
        double v = strtod(t, &end);
        if (end == t || *end || !(v >= -TN_ADAPTER_SCALE_MAX &&
                                  v <= TN_ADAPTER_SCALE_MAX))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not a number in [-16, 16]", t);
        a->scale = (float)v;
      }
      if (st) return st;
    }
    if (!a->name || !a->path)
      return fail(ld, TN_EINVAL, line, at, "an adapter needs 'name' and 'path'");
  }
}

static enum tn_status parse_shadow(struct loader *ld, const char *key,
                                   struct tn_serve_shadow_cfg *sh);

enum { MK_NAME, MK_PATH, MK_ALIASES, MK_THREADS, MK_CTX, MK_MAX_SEQS,
       MK_KV_MEM, MK_CHAT_TEMPLATE, MK_SPEC, MK_SPEC_MAX_TOKENS,
       MK_DRAFT_MODEL, MK_SPEC_LAYERS, MK_PRICE_PROMPT, MK_PRICE_COMPUTE, MK_PRICE_CACHED, MK_PRICE_COMPLETION,
       MK_ADAPTERS, MK_MAX_LORAS, MK_ADAPTER_MEM, MK_SHADOW, MK_COUNT };
static const char *const k_model_keys[MK_COUNT] = {
    "name", "path", "aliases", "threads", "ctx", "max_seqs", "kv_mem",
    "chat_template", "spec", "spec_max_tokens", "draft_model",
    "spec_layers", "price_prompt", "price_compute", "price_cached",
    "price_completion", "adapters",
    "max_loras", "adapter_mem", "shadow"};

static enum tn_status parse_model(struct loader *ld, int idx,
                                  struct tn_serve_model_cfg *m) {
  char where[48], key[96];
  snprintf(where, sizeof where, "models[%d]", idx);
  int start_line = ev_line(ld);
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    enum tn_status st =
        next_key(ld, where, k_model_keys, MK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < MK_COUNT);
    snprintf(key, sizeof key, "%s.%s", where, k_model_keys[which]);
    switch (which) {
      case MK_NAME: st = take_name(ld, key, &m->name); break;
      case MK_PATH: st = take_string(ld, key, 4096, &m->path, true); break;
      case MK_ALIASES: st = parse_aliases(ld, key, m); break;
      case MK_THREADS: st = take_i32(ld, key, 1, TN_POOL_THREADS_MAX, &m->threads); break;
      case MK_CTX: st = take_i32(ld, key, 1, 1 << 24, &m->ctx); break;
      case MK_MAX_SEQS: st = take_i32(ld, key, 1, 4096, &m->max_seqs); break;
      case MK_KV_MEM: st = take_size(ld, key, &m->kv_mem); break;
      case MK_CHAT_TEMPLATE:
        st = take_string(ld, key, 64, &m->chat_template, true);
        break;
      case MK_SPEC: st = take_string(ld, key, 32, &m->spec, true); break;
      case MK_SPEC_MAX_TOKENS:
        st = take_i32(ld, key, 1, TN_SPEC_MAX_TOKENS, &m->spec_max_tokens);
        break;
      case MK_SPEC_LAYERS:
        st = take_string(ld, key, 1024, &m->spec_layers, true);
        break;
      case MK_DRAFT_MODEL:
        st = take_string(ld, key, 4096, &m->draft_model, true);
        break;
      case MK_PRICE_PROMPT: st = take_price(ld, key, &m->price_prompt); break;
      case MK_PRICE_COMPUTE:
        st = take_price(ld, key, &m->price_compute);
        break;
      case MK_PRICE_CACHED: st = take_price(ld, key, &m->price_cached); break;
      case MK_PRICE_COMPLETION:
        st = take_price(ld, key, &m->price_completion);
        break;
      case MK_ADAPTERS: st = parse_adapters(ld, key, m); break;
      case MK_ADAPTER_MEM: st = take_size(ld, key, &m->adapter_mem); break;
      case MK_MAX_LORAS:
        st = take_i32(ld, key, 1, TN_ADAPTERS_PER_STEP_MAX, &m->max_loras);
        break;
      case MK_SHADOW: st = parse_shadow(ld, key, &m->shadow); break;
    }
    if (st) return st;
  }
  if (!m->name)
    return fail(ld, TN_EINVAL, start_line, where, "missing key 'name'");
  if (!m->path)
    return fail(ld, TN_EINVAL, start_line, where,
                "missing key 'path' (model '%s')", m->name);
  return TN_OK;
}

static enum tn_status parse_models(struct loader *ld) {
  struct tn_serve_config *cfg = ld->cfg;
  enum tn_status st = next(ld, "models");
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), "models",
                "expected a list of models, got %s", ev_kind(&ld->ev));
  int list_line = ev_line(ld);
  cfg->models = calloc(TN_SERVE_MODELS_MAX, sizeof *cfg->models);
  if (!cfg->models) return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  for (;;) {
    char where[48];
    snprintf(where, sizeof where, "models[%d]", cfg->n_models);
    st = next(ld, where);
    if (st) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) break;
    if (cfg->n_models == TN_SERVE_MODELS_MAX)
      return fail(ld, TN_EINVAL, ev_line(ld), "models",
                  "more than %d models", TN_SERVE_MODELS_MAX);
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
      return fail(ld, TN_EINVAL, ev_line(ld), where,
                  "expected a mapping with name and path, got %s",
                  ev_kind(&ld->ev));
    /* counted first, so a partial model is freed with the rest */
    struct tn_serve_model_cfg *m = &cfg->models[cfg->n_models++];
    m->price_prompt = m->price_cached = m->price_completion = -1;
    m->price_compute = -1;
    st = parse_model(ld, cfg->n_models - 1, m);
    if (st) return st;
  }
  if (cfg->n_models == 0)
    return fail(ld, TN_EINVAL, list_line, "models",
                "the list is empty (at least one model is needed)");
  return TN_OK;
}


/* ---- upstreams and routes */

/* A list of scalars (names, keywords): at most max, each 1..max_len bytes. */
static enum tn_status parse_str_list(struct loader *ld, const char *where,
                                     int max, size_t max_len, char ***out,
                                     int *n) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where, "expected a list, got %s",
                ev_kind(&ld->ev));
  if (!*out && !(*out = calloc((size_t)max, sizeof **out)))
    return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  for (;;) {
    char key[200];
    snprintf(key, sizeof key, "%s[%d]", where, *n);
    if ((st = next(ld, key))) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) break;
    if (*n == max)
      return fail(ld, TN_EINVAL, ev_line(ld), where, "more than %d entries",
                  max);
    if (ld->ev.type != YAML_SCALAR_EVENT || scalar_is_null(ld))
      return fail(ld, TN_EINVAL, ev_line(ld), key, "expected a value, got %s",
                  ld->ev.type == YAML_SCALAR_EVENT ? "null"
                                                   : ev_kind(&ld->ev));
    if (ld->ev.data.scalar.length != strlen(scalar_text(ld)))
      return fail(ld, TN_EINVAL, ev_line(ld), key,
                  "value contains a NUL character");
    if ((st = take_string(ld, key, max_len, &(*out)[*n], false))) return st;
    (*n)++;
  }
  if (*n == 0)
    return fail(ld, TN_EINVAL, ev_line(ld), where, "the list is empty");
  return TN_OK;
}

/* A name of an upstream or route: the model-name rule; uniqueness across
 * every kind of name is checked once the whole file is read. */
static enum tn_status take_plain_name(struct loader *ld, const char *key,
                                      char **dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st || (st = check_name(ld, key))) return st;
  return take_string(ld, key, TN_SERVE_NAME_MAX, dst, false);
}

static enum tn_status take_seconds(struct loader *ld, const char *key,
                                   double *dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st) return st;
  const char *s = scalar_text(ld);
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end || !(v > 0 && v <= 86400))
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "'%.64s' is not a number of seconds in (0, 86400]", s);
  *dst = v;
  return TN_OK;
}

static enum tn_status take_bool(struct loader *ld, const char *key, int *dst) {
  enum tn_status st = expect_scalar(ld, key);
  if (st) return st;
  const char *s = scalar_text(ld);
  if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "yes")) *dst = 1;
  else if (!strcmp(s, "false") || !strcmp(s, "False") || !strcmp(s, "no"))
    *dst = 0;
  else
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "'%.64s' is not true or false", s);
  return TN_OK;
}

/* A PCRE2 pattern: compiled once here so a bad one fails at start. */
static enum tn_status take_regex(struct loader *ld, const char *key,
                                 char **dst) {
  enum tn_status st = take_string(ld, key, 4096, dst, true);
  if (st) return st;
  int ec;
  PCRE2_SIZE off;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)*dst, PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF, &ec, &off, NULL);
  if (!re) {
    PCRE2_UCHAR msg[160];
    pcre2_get_error_message(ec, msg, sizeof msg);
    return fail(ld, TN_EINVAL, ev_line(ld), key,
                "'%.64s' is not a valid regular expression: %s at offset %zu",
                *dst, (const char *)msg, (size_t)off);
  }
  pcre2_code_free(re);
  return TN_OK;
}

enum { UK_NAME, UK_BASE_URL, UK_MODEL, UK_API_KEY_ENV, UK_TIMEOUT,
       UK_CONNECT_TIMEOUT, UK_STALL_TIMEOUT, UK_RETRIES, UK_MAX_CONCURRENT,
       UK_PRICE_PROMPT, UK_PRICE_COMPLETION, UK_SHADOW, UK_COUNT };
static const char *const k_upstream_keys[UK_COUNT] = {
    "name", "base_url", "model", "api_key_env", "timeout_s",
    "connect_timeout_s", "stall_timeout_s", "retries", "max_concurrent",
    "price_prompt", "price_completion", "shadow"};

/* http://HOST[:PORT][/PATH] or https://...; no query, fragment, spaces or
 * user info (a key belongs in api_key_env, not in a URL). */
static bool url_ok(const char *u) {
  const char *p;
  if (!strncmp(u, "http://", 7)) p = u + 7;
  else if (!strncmp(u, "https://", 8)) p = u + 8;
  else return false;
  if (!*p || *p == '/' || *p == ':') return false;
  for (const char *q = p; *q; q++)
    if ((unsigned char)*q <= 0x20 || *q == 0x7f || *q == '?' || *q == '#' ||
        *q == '@' || *q == '\\')
      return false;
  const char *colon = strchr(p, ':');
  const char *slash = strchr(p, '/');
  if (colon && (!slash || colon < slash)) {
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || port < 1 || port > 65535 || (*end && *end != '/'))
      return false;
  }
  return true;
}

static enum tn_status parse_upstream(struct loader *ld, int idx,
                                     struct tn_serve_upstream_cfg *u) {
  char where[48], key[96];
  snprintf(where, sizeof where, "upstreams[%d]", idx);
  int start_line = ev_line(ld);
  unsigned seen = 0;
  int64_t v;
  for (;;) {
    int which = -1;
    bool done;
    enum tn_status st =
        next_key(ld, where, k_upstream_keys, UK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < UK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_upstream_keys[which]);
    switch (which) {
      case UK_NAME: st = take_plain_name(ld, key, &u->name); break;
      case UK_BASE_URL:
        st = take_string(ld, key, 2048, &u->base_url, true);
        if (!st && !url_ok(u->base_url))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.128s' is not an http:// or https:// URL (like "
                      "http://10.0.0.5:8080/v1)",
                      u->base_url);
        if (!st) {
          size_t n = strlen(u->base_url);
          while (n > 0 && u->base_url[n - 1] == '/') u->base_url[--n] = '\0';
        }
        break;
      case UK_MODEL: st = take_string(ld, key, 256, &u->model, true); break;
      case UK_API_KEY_ENV:
        st = take_string(ld, key, 256, &u->api_key_env, true);
        if (!st) {
          const char *k = getenv(u->api_key_env);
          if (!k || !*k)
            return fail(ld, TN_EINVAL, ev_line(ld), key,
                        "the environment variable %.64s is not set (it "
                        "should hold the upstream's API key)",
                        u->api_key_env);
          if (!(u->api_key = strdup(k)))
            return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
        }
        break;
      case UK_TIMEOUT: st = take_seconds(ld, key, &u->timeout_s); break;
      case UK_CONNECT_TIMEOUT:
        st = take_seconds(ld, key, &u->connect_timeout_s);
        break;
      case UK_STALL_TIMEOUT:
        st = take_seconds(ld, key, &u->stall_timeout_s);
        break;
      case UK_RETRIES:
        st = take_int(ld, key, 0, 5, &v);
        u->retries = (int32_t)v;
        break;
      case UK_MAX_CONCURRENT:
        st = take_int(ld, key, 1, 4096, &v);
        u->max_concurrent = (int32_t)v;
        break;
      case UK_PRICE_PROMPT: st = take_price(ld, key, &u->price_prompt); break;
      case UK_PRICE_COMPLETION:
        st = take_price(ld, key, &u->price_completion);
        break;
      case UK_SHADOW: st = parse_shadow(ld, key, &u->shadow); break;
    }
    if (st) return st;
  }
  if (!u->name)
    return fail(ld, TN_EINVAL, start_line, where, "missing key 'name'");
  if (!u->base_url)
    return fail(ld, TN_EINVAL, start_line, where,
                "missing key 'base_url' (upstream '%s')", u->name);
  if (!u->model && !(u->model = strdup(u->name)))
    return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  return TN_OK;
}

/* Reads a list of mappings, calling one(ld, index, element) for each. */
typedef enum tn_status (*elem_fn)(struct loader *ld, const char *where,
                                  int idx, void *elem);
static enum tn_status parse_list(struct loader *ld, const char *where,
                                 int max, size_t elem_size, void **arr,
                                 int *n, elem_fn one) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a list of mappings, got %s", ev_kind(&ld->ev));
  int list_line = ev_line(ld);
  if (!*arr && !(*arr = calloc((size_t)max, elem_size)))
    return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  for (;;) {
    char at[200];
    snprintf(at, sizeof at, "%.150s[%d]", where, *n);
    if ((st = next(ld, at))) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) break;
    if (*n == max)
      return fail(ld, TN_EINVAL, ev_line(ld), where, "more than %d entries",
                  max);
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
      return fail(ld, TN_EINVAL, ev_line(ld), at,
                  "expected a mapping, got %s", ev_kind(&ld->ev));
    void *e = (char *)*arr + (size_t)*n * elem_size;
    (*n)++; /* counted first, so a partial entry is freed with the rest */
    if ((st = one(ld, at, *n - 1, e))) return st;
  }
  if (*n == 0)
    return fail(ld, TN_EINVAL, list_line, where, "the list is empty");
  return TN_OK;
}

static enum tn_status upstream_elem(struct loader *ld, const char *where,
                                    int idx, void *elem) {
  (void)where;
  struct tn_serve_upstream_cfg *u = elem;
  u->price_prompt = u->price_completion = -1;
  u->timeout_s = 600;
  u->connect_timeout_s = 5;
  u->stall_timeout_s = 60;
  u->max_concurrent = 64;
  u->line = ev_line(ld);
  return parse_upstream(ld, idx, u);
}

enum { RK_REGEX, RK_KEYWORDS, RK_MIN_TOKENS, RK_MAX_TOKENS, RK_TOOLS,
       RK_RESPONSE_FORMAT, RK_USER, RK_HEADER, RK_HEADER_REGEX, RK_TENANT,
       RK_METADATA, RK_TO, RK_COUNT };
static const char *const k_rule_keys[RK_COUNT] = {
    "regex", "keywords", "min_tokens", "max_tokens", "tools",
    "response_format", "user", "header", "header_regex", "tenant",
    "metadata", "to"};

/* metadata: a mapping of key -> PCRE2 pattern */
static enum tn_status parse_meta(struct loader *ld, const char *where,
                                 struct tn_serve_rule_cfg *r) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_MAPPING_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a mapping of metadata keys to patterns, got %s",
                ev_kind(&ld->ev));
  if (!r->meta_keys &&
      (!(r->meta_keys = calloc(TN_SERVE_META_MAX, sizeof *r->meta_keys)) ||
       !(r->meta_res = calloc(TN_SERVE_META_MAX, sizeof *r->meta_res))))
    return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  for (;;) {
    if ((st = next(ld, where))) return st;
    if (ld->ev.type == YAML_MAPPING_END_EVENT) break;
    if (ld->ev.type != YAML_SCALAR_EVENT || scalar_is_null(ld))
      return fail(ld, TN_EINVAL, ev_line(ld), where,
                  "expected a metadata key, got %s", ev_kind(&ld->ev));
    if (r->n_meta == TN_SERVE_META_MAX)
      return fail(ld, TN_EINVAL, ev_line(ld), where, "more than %d keys",
                  TN_SERVE_META_MAX);
    char key[320];
    snprintf(key, sizeof key, "%.200s.%.64s", where, scalar_text(ld));
    if ((st = take_string(ld, key, 64, &r->meta_keys[r->n_meta], false)))
      return st;
    r->n_meta++; /* counted: freed with the rule even if its pattern fails */
    if ((st = take_regex(ld, key, &r->meta_res[r->n_meta - 1]))) return st;
  }
  if (r->n_meta == 0)
    return fail(ld, TN_EINVAL, ev_line(ld), where, "the mapping is empty");
  return TN_OK;
}

static enum tn_status rule_elem(struct loader *ld, const char *where, int idx,
                                void *elem) {
  (void)idx;
  struct tn_serve_rule_cfg *r = elem;
  r->min_tokens = r->max_tokens = -1;
  r->tools = r->response_format = -1;
  int start_line = ev_line(ld);
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    char key[256];
    enum tn_status st =
        next_key(ld, where, k_rule_keys, RK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < RK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_rule_keys[which]);
    switch (which) {
      case RK_REGEX: st = take_regex(ld, key, &r->regex); break;
      case RK_KEYWORDS:
        st = parse_str_list(ld, key, TN_SERVE_KEYWORDS_MAX, 256, &r->keywords,
                            &r->n_keywords);
        break;
      case RK_MIN_TOKENS: st = take_int(ld, key, 0, 1 << 24, &r->min_tokens);
        break;
      case RK_MAX_TOKENS: st = take_int(ld, key, 0, 1 << 24, &r->max_tokens);
        break;
      case RK_TOOLS: st = take_bool(ld, key, &r->tools); break;
      case RK_RESPONSE_FORMAT: st = take_bool(ld, key, &r->response_format);
        break;
      case RK_USER: st = take_regex(ld, key, &r->user); break;
      case RK_HEADER: st = take_string(ld, key, 128, &r->header, true); break;
      case RK_HEADER_REGEX: st = take_regex(ld, key, &r->header_regex); break;
      case RK_TENANT:
        st = parse_str_list(ld, key, TN_SERVE_TENANTS_MAX, TN_SERVE_NAME_MAX,
                            &r->tenants, &r->n_tenants);
        break;
      case RK_METADATA: st = parse_meta(ld, key, r); break;
      case RK_TO: st = take_plain_name(ld, key, &r->to); break;
    }
    if (st) return st;
  }
  if (!r->to)
    return fail(ld, TN_EINVAL, start_line, where,
                "missing key 'to' (the target when the rule holds)");
  if (!r->header != !r->header_regex)
    return fail(ld, TN_EINVAL, start_line, where,
                "'header' and 'header_regex' go together");
  return TN_OK;
}

enum { SK_MODEL, SK_SIGNAL, SK_THRESHOLD, SK_QUANTILE, SK_SAMPLES,
       SK_SAMPLE_TOKENS, SK_SAMPLE_TEMPERATURE, SK_COUNT };
static const char *const k_stage_keys[SK_COUNT] = {
    "model", "signal", "threshold", "quantile", "samples", "sample_tokens",
    "sample_temperature"};
static const char *const k_signal_names[TN_SIGNAL_COUNT] = {
    "min_prob", "quantile", "mean_logprob", "margin", "agreement"};

const char *tn_cascade_signal_name(enum tn_cascade_signal s) {
  return (unsigned)s < TN_SIGNAL_COUNT ? k_signal_names[s] : "?";
}

static enum tn_status stage_elem(struct loader *ld, const char *where,
                                 int idx, void *elem) {
  (void)idx;
  struct tn_serve_stage_cfg *g = elem;
  g->quantile = 0.1;
  g->samples = 4;
  g->sample_tokens = 16;
  g->sample_temperature = 0.7;
  int start_line = ev_line(ld);
  unsigned seen = 0;
  bool has_threshold = false;
  for (;;) {
    int which = -1;
    bool done;
    char key[256];
    enum tn_status st =
        next_key(ld, where, k_stage_keys, SK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < SK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_stage_keys[which]);
    if (which == SK_MODEL) {
      st = take_plain_name(ld, key, &g->model);
    } else if (which == SK_SIGNAL) {
      if ((st = expect_scalar(ld, key))) return st;
      int k = 0;
      while (k < TN_SIGNAL_COUNT && strcmp(scalar_text(ld), k_signal_names[k]))
        k++;
      if (k == TN_SIGNAL_COUNT)
        return fail(ld, TN_EINVAL, ev_line(ld), key,
                    "unknown signal '%.64s' (expected min_prob, quantile, "
                    "mean_logprob, margin or agreement)",
                    scalar_text(ld));
      g->signal = (enum tn_cascade_signal)k;
      g->has_signal = true;
    } else if (which == SK_SAMPLES) {
      st = take_i32(ld, key, 2, 16, &g->samples);
    } else if (which == SK_SAMPLE_TOKENS) {
      st = take_i32(ld, key, 1, 256, &g->sample_tokens);
    } else {
      if ((st = expect_scalar(ld, key))) return st;
      const char *s = scalar_text(ld);
      double v;
      if (!strcmp(s, ".inf") || !strcmp(s, "inf") || !strcmp(s, "+.inf"))
        v = INFINITY;
      else if (!strcmp(s, "-.inf") || !strcmp(s, "-inf"))
        v = -INFINITY;
      else {
        char *end;
        v = strtod(s, &end);
        if (end == s || *end || !isfinite(v))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not a number (or inf, -inf)", s);
      }
      if (which == SK_THRESHOLD) {
        g->threshold = v;
        has_threshold = true;
      } else if (which == SK_SAMPLE_TEMPERATURE) {
        if (!(v > 0 && v <= 2))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not a temperature in (0, 2]", s);
        g->sample_temperature = v;
      } else {
        if (!(v >= 0 && v <= 1))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not a quantile in [0, 1]", s);
        g->quantile = v;
      }
    }
    if (st) return st;
  }
  if (!g->model)
    return fail(ld, TN_EINVAL, start_line, where, "missing key 'model'");
  if (g->has_signal != has_threshold)
    return fail(ld, TN_EINVAL, start_line, where,
                "'signal' and 'threshold' go together");
  return TN_OK;
}

enum { SHK_TARGET, SHK_SHARE, SHK_JUDGE, SHK_MAX_CONCURRENT, SHK_QUEUE,
       SHK_TIMEOUT, SHK_COUNT };
static const char *const k_shadow_keys[SHK_COUNT] = {
    "target", "share", "judge", "max_concurrent", "queue", "timeout_s"};

static enum tn_status parse_shadow(struct loader *ld, const char *where,
                                   struct tn_serve_shadow_cfg *sh) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_MAPPING_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a mapping with target (and share, judge, ...), "
                "got %s",
                ev_kind(&ld->ev));
  sh->line = ev_line(ld);
  sh->share = 1;
  sh->max_concurrent = 1;
  sh->queue = 64;
  sh->timeout_s = 300;
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    char key[256];
    if ((st = next_key(ld, where, k_shadow_keys, SHK_COUNT, &seen, &which,
                       &done)))
      return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < SHK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_shadow_keys[which]);
    int64_t v = 0;
    switch (which) {
      case SHK_TARGET: st = take_plain_name(ld, key, &sh->target); break;
      case SHK_JUDGE: st = take_plain_name(ld, key, &sh->judge); break;
      case SHK_SHARE: {
        if ((st = expect_scalar(ld, key))) return st;
        const char *s = scalar_text(ld);
        char *end;
        double x = strtod(s, &end);
        if (end == s || *end || !(x >= 0 && x <= 1))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not a share in [0, 1]", s);
        sh->share = x;
        break;
      }
      case SHK_MAX_CONCURRENT:
        st = take_int(ld, key, 1, 64, &v);
        sh->max_concurrent = (int32_t)v;
        break;
      case SHK_QUEUE:
        st = take_int(ld, key, 1, 100000, &v);
        sh->queue = (int32_t)v;
        break;
      case SHK_TIMEOUT: st = take_seconds(ld, key, &sh->timeout_s); break;
    }
    if (st) return st;
  }
  if (!sh->target)
    return fail(ld, TN_EINVAL, sh->line, where, "missing key 'target'");
  return TN_OK;
}

enum { RTK_NAME, RTK_STRATEGY, RTK_TARGETS, RTK_RULES, RTK_STAGES,
       RTK_EXAMPLES, RTK_EXAMPLES_FILE, RTK_MODEL, RTK_POOLING, RTK_K,
       RTK_SHADOW, RTK_COUNT };
static const char *const k_route_keys[RTK_COUNT] = {
    "name", "strategy", "targets", "rules", "stages", "examples",
    "examples_file", "model", "pooling", "k", "shadow"};
static const char *const k_strategy_names[] = {"rules", "fallback", "balance",
                                               "cascade", "classifier"};

/* Adds one labelled example to r (the label by name). */
static enum tn_status add_example(struct loader *ld, int line,
                                  const char *where,
                                  struct tn_serve_route_cfg *r,
                                  const char *text, size_t len,
                                  const char *to) {
  if (len == 0 || len > 65536 || memchr(text, 0, len))
    return fail(ld, TN_EINVAL, line, where,
                "an example's text must be 1..65536 bytes without NUL");
  if (!*to || strlen(to) > TN_SERVE_NAME_MAX)
    return fail(ld, TN_EINVAL, line, where, "an example needs a target 'to'");
  if (r->n_examples == TN_SERVE_EXAMPLES_MAX)
    return fail(ld, TN_EINVAL, line, where, "more than %d examples",
                TN_SERVE_EXAMPLES_MAX);
  int label = 0;
  while (label < r->n_labels && strcmp(r->labels[label], to)) label++;
  if (label == r->n_labels) {
    if (r->n_labels == TN_SERVE_LABELS_MAX)
      return fail(ld, TN_EINVAL, line, where, "more than %d distinct targets",
                  TN_SERVE_LABELS_MAX);
    if (!r->labels &&
        !(r->labels = calloc(TN_SERVE_LABELS_MAX, sizeof *r->labels)))
      return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
    if (!(r->labels[r->n_labels] = strdup(to)))
      return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
    r->n_labels++;
  }
  if (r->n_examples == r->cap_examples) {
    int cap = r->cap_examples ? 2 * r->cap_examples : 16;
    void *p = realloc(r->examples, (size_t)cap * sizeof *r->examples);
    if (!p) return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
    r->examples = p;
    r->cap_examples = cap;
  }
  struct tn_serve_example_cfg *e = &r->examples[r->n_examples];
  if (!(e->text = malloc(len + 1)))
    return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
  memcpy(e->text, text, len);
  e->text[len] = '\0';
  e->label = label;
  r->n_examples++;
  return TN_OK;
}

/* examples: a list of {text, to} */
static enum tn_status parse_examples(struct loader *ld, const char *where,
                                     struct tn_serve_route_cfg *r) {
  enum tn_status st = next(ld, where);
  if (st) return st;
  if (ld->ev.type != YAML_SEQUENCE_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), where,
                "expected a list of {text, to}, got %s", ev_kind(&ld->ev));
  for (int i = 0;; i++) {
    char at[240];
    snprintf(at, sizeof at, "%.200s[%d]", where, i);
    if ((st = next(ld, at))) return st;
    if (ld->ev.type == YAML_SEQUENCE_END_EVENT) return TN_OK;
    if (ld->ev.type != YAML_MAPPING_START_EVENT)
      return fail(ld, TN_EINVAL, ev_line(ld), at,
                  "expected a mapping {text, to}, got %s", ev_kind(&ld->ev));
    static const char *const keys[2] = {"text", "to"};
    char *text = NULL, *to = NULL;
    int line = ev_line(ld);
    unsigned seen = 0;
    for (;;) {
      int which = -1;
      bool done;
      char key[256];
      if ((st = next_key(ld, at, keys, 2, &seen, &which, &done))) break;
      if (done) break;
      snprintf(key, sizeof key, "%.200s.%s", at, which ? "to" : "text");
      st = take_string(ld, key, which ? TN_SERVE_NAME_MAX : 65536,
                       which ? &to : &text, true);
      if (st) break;
    }
    if (!st && (!text || !to))
      st = fail(ld, TN_EINVAL, line, at, "an example needs 'text' and 'to'");
    if (!st) st = add_example(ld, line, at, r, text, strlen(text), to);
    free(text);
    free(to);
    if (st) return st;
  }
}

/* examples_file: JSON lines {"text": .., "to": ..}, next to the config */
static enum tn_status load_examples(struct loader *ld, const char *key,
                                    struct tn_serve_route_cfg *r) {
  char *path = NULL;
  enum tn_status st = take_string(ld, key, 4096, &path, true);
  if (st) return st;
  int line = ev_line(ld);
  char full[8192];
  const char *slash = strrchr(ld->file, '/');
  if (path[0] != '/' && slash)
    snprintf(full, sizeof full, "%.*s/%s", (int)(slash - ld->file), ld->file,
             path);
  else
    snprintf(full, sizeof full, "%s", path);
  free(path);
  char *text;
  size_t len;
  struct tn_error e2;
  if (tn_file_read(full, &text, &len, &e2))
    return fail(ld, TN_EINVAL, line, key, "%s", e2.msg);
  size_t off = 0;
  int lineno = 0;
  while (off < len && !st) {
    size_t end = off;
    while (end < len && text[end] != '\n') end++;
    lineno++;
    if (end > off) {
      json_error_t je;
      json_t *o = json_loadb(text + off, end - off, 0, &je);
      const char *t = json_string_value(json_object_get(o, "text"));
      const char *to = json_string_value(json_object_get(o, "to"));
      if (!t || !to)
        st = fail(ld, TN_EINVAL, line, key,
                  "%.200s:%d: expected {\"text\": ..., \"to\": ...}", full,
                  lineno);
      else
        st = add_example(ld, line, key, r, t,
                         json_string_length(json_object_get(o, "text")), to);
      json_decref(o);
    }
    off = end + 1;
  }
  free(text);
  return st;
}

static enum tn_status route_elem(struct loader *ld, const char *where,
                                 int idx, void *elem) {
  (void)idx;
  struct tn_serve_route_cfg *r = elem;
  int start_line = r->line = ev_line(ld);
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    char key[256];
    enum tn_status st =
        next_key(ld, where, k_route_keys, RTK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < RTK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_route_keys[which]);
    switch (which) {
      case RTK_NAME: st = take_plain_name(ld, key, &r->name); break;
      case RTK_STRATEGY: {
        if ((st = expect_scalar(ld, key))) return st;
        int k = 0;
        while (k < 5 && strcmp(scalar_text(ld), k_strategy_names[k])) k++;
        if (k == 5)
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "unknown strategy '%.64s' (expected rules, fallback, "
                      "balance, cascade or classifier)",
                      scalar_text(ld));
        r->strategy = (enum tn_route_strategy)k;
        break;
      }
      case RTK_TARGETS:
        st = parse_str_list(ld, key, TN_SERVE_TARGETS_MAX, TN_SERVE_NAME_MAX,
                            &r->targets, &r->n_targets);
        break;
      case RTK_RULES:
        st = parse_list(ld, key, TN_SERVE_RULES_MAX, sizeof *r->rules,
                        (void **)&r->rules, &r->n_rules, rule_elem);
        break;
      case RTK_STAGES:
        st = parse_list(ld, key, TN_SERVE_TARGETS_MAX, sizeof *r->stages,
                        (void **)&r->stages, &r->n_stages, stage_elem);
        break;
      case RTK_EXAMPLES: st = parse_examples(ld, key, r); break;
      case RTK_EXAMPLES_FILE: st = load_examples(ld, key, r); break;
      case RTK_MODEL: st = take_plain_name(ld, key, &r->embed_model); break;
      case RTK_POOLING:
        if ((st = expect_scalar(ld, key))) return st;
        if (strcmp(scalar_text(ld), "mean") && strcmp(scalar_text(ld), "last"))
          return fail(ld, TN_EINVAL, ev_line(ld), key,
                      "'%.64s' is not mean or last", scalar_text(ld));
        r->pooling_last = !strcmp(scalar_text(ld), "last");
        break;
      case RTK_K: {
        int64_t v = 0;
        st = take_int(ld, key, 1, 64, &v);
        r->k = (int32_t)v;
        break;
      }
      case RTK_SHADOW: st = parse_shadow(ld, key, &r->shadow); break;
    }
    if (st) return st;
  }
  if (!r->name)
    return fail(ld, TN_EINVAL, start_line, where, "missing key 'name'");
  if (!(seen & (1u << RTK_STRATEGY)))
    return fail(ld, TN_EINVAL, start_line, where,
                "missing key 'strategy' (route '%s')", r->name);
  const char *need = r->strategy == TN_ROUTE_RULES        ? "rules"
                     : r->strategy == TN_ROUTE_CASCADE    ? "stages"
                     : r->strategy == TN_ROUTE_CLASSIFIER ? "examples"
                                                          : "targets";
  bool has[4] = {r->n_rules > 0, r->n_stages > 0, r->n_targets > 0,
                 r->n_examples > 0};
  int want = r->strategy == TN_ROUTE_RULES        ? 0
             : r->strategy == TN_ROUTE_CASCADE    ? 1
             : r->strategy == TN_ROUTE_CLASSIFIER ? 3
                                                  : 2;
  bool cls_keys = (seen & ((1u << RTK_MODEL) | (1u << RTK_POOLING) |
                           (1u << RTK_K))) != 0;
  if (cls_keys && r->strategy != TN_ROUTE_CLASSIFIER)
    return fail(ld, TN_EINVAL, start_line, where,
                "'model', 'pooling' and 'k' belong to a classifier route");
  if (r->k == 0) r->k = 5;
  for (int k = 0; k < 4; k++)
    if (has[k] != (k == want))
      return fail(ld, TN_EINVAL, start_line, where,
                  "a %s route takes '%s' %s", k_strategy_names[r->strategy],
                  need, has[k] ? "only" : "(missing)");
  if (r->strategy == TN_ROUTE_CASCADE) {
    if (r->n_stages < 2)
      return fail(ld, TN_EINVAL, start_line, where,
                  "a cascade needs at least two stages");
    for (int s = 0; s < r->n_stages - 1; s++)
      if (!r->stages[s].has_signal)
        return fail(ld, TN_EINVAL, start_line, where,
                    "stages[%d] needs 'signal' and 'threshold' (every stage "
                    "but the last decides whether to escalate)",
                    s);
  }
  return TN_OK;
}

enum { TNK_NAME, TNK_KEY, TNK_KEY_ENV, TNK_ALLOW, TNK_RPM, TNK_TPM,
       TNK_BUDGET, TNK_COUNT };
static const char *const k_tenant_keys[TNK_COUNT] = {
    "name", "key", "key_env", "allow", "rpm", "tpm", "budget_per_day"};

static enum tn_status tenant_elem(struct loader *ld, const char *where,
                                  int idx, void *elem) {
  (void)idx;
  struct tn_serve_tenant_cfg *t = elem;
  t->budget_per_day = -1;
  int start_line = t->line = ev_line(ld);
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    char key[256];
    enum tn_status st =
        next_key(ld, where, k_tenant_keys, TNK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    TN_ASSERT(which >= 0 && which < TNK_COUNT);
    snprintf(key, sizeof key, "%.200s.%s", where, k_tenant_keys[which]);
    switch (which) {
      case TNK_NAME: st = take_plain_name(ld, key, &t->name); break;
      case TNK_KEY: st = take_string(ld, key, 4096, &t->key, true); break;
      case TNK_KEY_ENV:
        st = take_string(ld, key, 256, &t->key_env, true);
        if (!st) {
          const char *k = getenv(t->key_env);
          if (!k || !*k)
            return fail(ld, TN_EINVAL, ev_line(ld), key,
                        "the environment variable %.64s is not set (it "
                        "should hold the tenant's API key)",
                        t->key_env);
          free(t->key);
          if (!(t->key = strdup(k)))
            return tn_error_set(ld->err, TN_ENOMEM, "out of memory");
        }
        break;
      case TNK_ALLOW:
        st = parse_str_list(ld, key, TN_SERVE_ROUTES_MAX + TN_SERVE_MODELS_MAX +
                                         TN_SERVE_UPSTREAMS_MAX,
                            TN_SERVE_NAME_MAX, &t->allow, &t->n_allow);
        break;
      case TNK_RPM: st = take_int(ld, key, 1, 1000000000, &t->rpm); break;
      case TNK_TPM: st = take_int(ld, key, 1, 1000000000000ll, &t->tpm); break;
      case TNK_BUDGET: st = take_price(ld, key, &t->budget_per_day); break;
    }
    if (st) return st;
  }
  if (!t->name)
    return fail(ld, TN_EINVAL, start_line, where, "missing key 'name'");
  if ((seen & (1u << TNK_KEY)) && (seen & (1u << TNK_KEY_ENV)))
    return fail(ld, TN_EINVAL, start_line, where,
                "give 'key' or 'key_env', not both");
  if (!t->key)
    return fail(ld, TN_EINVAL, start_line, where,
                "missing key 'key_env' (or 'key') for tenant '%s'", t->name);
  if (strlen(t->key) < 8)
    return fail(ld, TN_EINVAL, start_line, where,
                "tenant '%s': its key is shorter than 8 characters",
                t->name);
  return TN_OK;
}

/* ---- checks across the whole file */

enum name_kind { NK_NONE, NK_MODEL, NK_UPSTREAM, NK_ROUTE };

/* What name is: a model (name, alias or adapter), an upstream or a route;
 * *idx its index. */
static enum name_kind lookup(const struct tn_serve_config *cfg,
                             const char *name, int *idx) {
  int i = tn_serve_config_find(cfg, name);
  if (i < 0)
    for (int m = 0; m < cfg->n_models && i < 0; m++)
      for (int a = 0; a < cfg->models[m].n_adapters; a++)
        if (!strcmp(cfg->models[m].adapters[a].name, name)) i = m;
  if (i >= 0) {
    *idx = i;
    return NK_MODEL;
  }
  if ((i = tn_serve_config_find_upstream(cfg, name)) >= 0) {
    *idx = i;
    return NK_UPSTREAM;
  }
  if ((i = tn_serve_config_find_route(cfg, name)) >= 0) {
    *idx = i;
    return NK_ROUTE;
  }
  return NK_NONE;
}

static enum tn_status check_target(struct loader *ld, int line,
                                   const char *where, const char *t) {
  int idx;
  if (lookup(ld->cfg, t, &idx) == NK_NONE)
    return fail(ld, TN_EINVAL, line, where,
                "unknown target '%.64s' (not a model, alias, adapter, "
                "upstream or route in this file)",
                t);
  return TN_OK;
}

/* Route r's direct targets, for the cycle walk. */
static int route_targets(const struct tn_serve_route_cfg *r, const char **out) {
  int n = 0;
  for (int i = 0; i < r->n_targets; i++) out[n++] = r->targets[i];
  for (int i = 0; i < r->n_rules; i++) out[n++] = r->rules[i].to;
  for (int i = 0; i < r->n_stages; i++) out[n++] = r->stages[i].model;
  for (int i = 0; i < r->n_labels; i++) out[n++] = r->labels[i];
  return n;
}

/* Depth-first: state 0 unseen, 1 on the path, 2 done. */
static int find_cycle(const struct tn_serve_config *cfg, int r, int *state,
                      int *path, int depth) {
  state[r] = 1;
  path[depth] = r;
  const char *t[TN_SERVE_RULES_MAX + 2 * TN_SERVE_TARGETS_MAX +
                TN_SERVE_LABELS_MAX];
  int n = route_targets(&cfg->routes[r], t);
  for (int i = 0; i < n; i++) {
    int j;
    if (lookup(cfg, t[i], &j) != NK_ROUTE) continue;
    if (state[j] == 1) {
      path[depth + 1] = j;
      return depth + 2;
    }
    if (state[j] == 0) {
      int len = find_cycle(cfg, j, state, path, depth + 1);
      if (len) return len;
    }
  }
  state[r] = 2;
  return 0;
}

static enum tn_status check_routes(struct loader *ld) {
  struct tn_serve_config *cfg = ld->cfg;
  /* names: unique across models, aliases, adapters, upstreams, routes */
  for (int k = 0; k < cfg->n_upstreams + cfg->n_routes; k++) {
    bool up = k < cfg->n_upstreams;
    const char *name =
        up ? cfg->upstreams[k].name : cfg->routes[k - cfg->n_upstreams].name;
    char where[48];
    if (up) snprintf(where, sizeof where, "upstreams[%d].name", k);
    else snprintf(where, sizeof where, "routes[%d].name", k - cfg->n_upstreams);
    int idx;
    enum name_kind nk = lookup(cfg, name, &idx);
    bool clash = nk == NK_MODEL ||
                 (nk == NK_UPSTREAM && (!up || idx != k)) ||
                 (nk == NK_ROUTE && (up || idx != k - cfg->n_upstreams));
    if (clash)
      return fail(ld, TN_EINVAL,
                  up ? cfg->upstreams[k].line
                     : cfg->routes[k - cfg->n_upstreams].line,
                  where, "'%s' is already the name of a %s", name,
                  nk == NK_MODEL ? "model (or its alias or adapter)"
                  : nk == NK_UPSTREAM ? "upstream" : "route");
  }
  for (int r = 0; r < cfg->n_routes; r++) {
    const struct tn_serve_route_cfg *rt = &cfg->routes[r];
    char where[48];
    snprintf(where, sizeof where, "routes[%d]", r);
    const char *t[TN_SERVE_RULES_MAX + 2 * TN_SERVE_TARGETS_MAX +
                TN_SERVE_LABELS_MAX];
    int n = route_targets(rt, t);
    for (int i = 0; i < n; i++) {
      enum tn_status st = check_target(ld, rt->line, where, t[i]);
      if (st) return st;
    }
    if (rt->n_stages) {
      int idx;
      if (lookup(cfg, rt->stages[rt->n_stages - 1].model, &idx) == NK_ROUTE)
        return fail(ld, TN_EINVAL, rt->line, where,
                    "the last stage '%.64s' is a route: a cascade's stages "
                    "are models or upstreams",
                    rt->stages[rt->n_stages - 1].model);
    }
    if (rt->embed_model) {
      int idx;
      if (lookup(cfg, rt->embed_model, &idx) != NK_MODEL ||
          tn_serve_config_find(cfg, rt->embed_model) < 0)
        return fail(ld, TN_EINVAL, rt->line, where,
                    "model '%.64s' must be a local model's name or alias, "
                    "not an adapter or upstream (it embeds the examples and "
                    "the requests)",
                    rt->embed_model);
    }
    for (int k = 0; k < rt->n_labels; k++) {
      int idx;
      if (lookup(cfg, rt->labels[k], &idx) == NK_ROUTE &&
          cfg->routes[idx].strategy == TN_ROUTE_CASCADE)
        return fail(ld, TN_EINVAL, rt->line, where,
                    "an example's target '%.64s' is a cascade: a classifier "
                    "picks models, upstreams or non-cascade routes",
                    rt->labels[k]);
    }
    for (int k = 0; k < rt->n_targets; k++) {
      int idx;
      if (lookup(cfg, rt->targets[k], &idx) == NK_ROUTE &&
          (cfg->routes[idx].strategy == TN_ROUTE_CASCADE ||
           cfg->routes[idx].strategy == TN_ROUTE_CLASSIFIER))
        return fail(ld, TN_EINVAL, rt->line, where,
                    "targets[%d] '%.64s' is a %s: it may be called directly "
                    "or be a rule's target, not one of a list's",
                    k, rt->targets[k],
                    cfg->routes[idx].strategy == TN_ROUTE_CASCADE
                        ? "cascade"
                        : "classifier");
    }
    for (int s = 0; s + 1 < rt->n_stages; s++) {
      int idx;
      if (lookup(cfg, rt->stages[s].model, &idx) != NK_MODEL)
        return fail(ld, TN_EINVAL, rt->line, where,
                    "stages[%d].model '%.64s' must be a local model: a "
                    "stage's confidence comes from the engine's token "
                    "probabilities (only the last stage may be an upstream "
                    "or a route)",
                    s, rt->stages[s].model);
    }
  }
  for (int i = 0; i < cfg->n_tenants; i++) {
    const struct tn_serve_tenant_cfg *t = &cfg->tenants[i];
    char where[48];
    snprintf(where, sizeof where, "tenants[%d]", i);
    for (int j = 0; j < i; j++) {
      if (!strcmp(cfg->tenants[j].name, t->name))
        return fail(ld, TN_EINVAL, t->line, where,
                    "tenant '%s' is listed twice", t->name);
      if (!strcmp(cfg->tenants[j].key, t->key))
        return fail(ld, TN_EINVAL, t->line, where,
                    "tenants '%s' and '%s' have the same key",
                    cfg->tenants[j].name, t->name);
    }
    if (cfg->api_key && !strcmp(cfg->api_key, t->key))
      return fail(ld, TN_EINVAL, t->line, where,
                  "tenant '%s' has the same key as api_key", t->name);
    for (int k = 0; k < t->n_allow; k++) {
      enum tn_status st = check_target(ld, t->line, where, t->allow[k]);
      if (st) return st;
    }
  }
  for (int r = 0; r < cfg->n_routes; r++)
    for (int k = 0; k < cfg->routes[r].n_rules; k++)
      for (int n = 0; n < cfg->routes[r].rules[k].n_tenants; n++) {
        const char *tn = cfg->routes[r].rules[k].tenants[n];
        bool found = false;
        for (int i = 0; i < cfg->n_tenants && !found; i++)
          found = !strcmp(cfg->tenants[i].name, tn);
        if (!found) {
          char where[64];
          snprintf(where, sizeof where, "routes[%d].rules[%d].tenant", r, k);
          return fail(ld, TN_EINVAL, cfg->routes[r].line, where,
                      "unknown tenant '%.64s'", tn);
        }
      }
  int state[TN_SERVE_ROUTES_MAX] = {0}, path[TN_SERVE_ROUTES_MAX + 1];
  for (int r = 0; r < cfg->n_routes; r++) {
    if (state[r]) continue;
    int len = find_cycle(cfg, r, state, path, 0);
    if (!len) continue;
    char chain[512] = "";
    int start = 0;
    while (path[start] != path[len - 1]) start++;
    for (int i = start; i < len; i++) {
      size_t o = strlen(chain);
      snprintf(chain + o, sizeof chain - o, "%s%s", i > start ? " -> " : "",
               cfg->routes[path[i]].name);
    }
    return fail(ld, TN_EINVAL, cfg->routes[path[start]].line, "routes",
                "the routes form a cycle: %s", chain);
  }
  return TN_OK;
}

/* Shadows name known targets (and judges), never the name they shadow. */
static enum tn_status check_shadow(struct loader *ld, const char *where,
                                   const char *source,
                                   const struct tn_serve_shadow_cfg *sh) {
  if (!sh->target) return TN_OK;
  char key[256];
  snprintf(key, sizeof key, "%.200s.shadow.target", where);
  int idx;
  enum name_kind src = lookup(ld->cfg, source, &idx);
  int src_idx = idx;
  enum name_kind nk = lookup(ld->cfg, sh->target, &idx);
  /* (an adapter of the same model is another model; an alias is not) */
  bool self = nk != NK_NONE && nk == src && idx == src_idx &&
              (nk != NK_MODEL || tn_serve_config_find(ld->cfg, sh->target) >= 0);
  if (nk == NK_NONE || self)
    return fail(ld, TN_EINVAL, sh->line, key,
                nk == NK_NONE ? "unknown target '%.64s' (not a model, alias, "
                                "adapter, upstream or route in this file)"
                              : "'%.64s' is the name it shadows",
                sh->target);
  snprintf(key, sizeof key, "%.200s.shadow.judge", where);
  if (sh->judge) return check_target(ld, sh->line, key, sh->judge);
  return TN_OK;
}

static enum tn_status check_shadows(struct loader *ld) {
  struct tn_serve_config *cfg = ld->cfg;
  char where[48];
  enum tn_status st = TN_OK;
  for (int i = 0; i < cfg->n_models && !st; i++) {
    snprintf(where, sizeof where, "models[%d]", i);
    st = check_shadow(ld, where, cfg->models[i].name, &cfg->models[i].shadow);
  }
  for (int i = 0; i < cfg->n_upstreams && !st; i++) {
    snprintf(where, sizeof where, "upstreams[%d]", i);
    st = check_shadow(ld, where, cfg->upstreams[i].name,
                      &cfg->upstreams[i].shadow);
  }
  for (int i = 0; i < cfg->n_routes && !st; i++) {
    snprintf(where, sizeof where, "routes[%d]", i);
    st = check_shadow(ld, where, cfg->routes[i].name, &cfg->routes[i].shadow);
  }
  return st;
}

enum { TK_HOST, TK_PORT, TK_API_KEY, TK_THREADS, TK_MODELS, TK_UPSTREAMS,
       TK_ROUTES, TK_TENANTS, TK_COUNT };
static const char *const k_top_keys[TK_COUNT] = {
    "host", "port", "api_key", "threads", "models", "upstreams", "routes",
    "tenants"};

static enum tn_status parse_document(struct loader *ld) {
  struct tn_serve_config *cfg = ld->cfg;
  enum tn_status st = next(ld, NULL);
  if (st) return st;
  TN_ASSERT(ld->ev.type == YAML_STREAM_START_EVENT);
  if ((st = next(ld, NULL))) return st;
  if (ld->ev.type == YAML_STREAM_END_EVENT)
    return fail(ld, TN_EINVAL, 1, NULL, "the config is empty");
  TN_ASSERT(ld->ev.type == YAML_DOCUMENT_START_EVENT);
  if ((st = next(ld, NULL))) return st;
  if (ld->ev.type == YAML_SCALAR_EVENT && scalar_is_null(ld))
    return fail(ld, TN_EINVAL, ev_line(ld), NULL, "the config is empty");
  if (ld->ev.type != YAML_MAPPING_START_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), NULL,
                "the config must be a mapping (host, port, api_key, threads, "
                "models, upstreams, routes, tenants), "
                "not %s",
                ev_kind(&ld->ev));
  int top_line = ev_line(ld);
  unsigned seen = 0;
  for (;;) {
    int which = -1;
    bool done;
    st = next_key(ld, NULL, k_top_keys, TK_COUNT, &seen, &which, &done);
    if (st) return st;
    if (done) break;
    int64_t port;
    switch (which) {
      case TK_HOST: st = take_string(ld, "host", 255, &cfg->host, true); break;
      case TK_PORT:
        st = take_int(ld, "port", 1, 65535, &port);
        if (!st) cfg->port = (int)port;
        break;
      case TK_API_KEY: st = take_string(ld, "api_key", 4096, &cfg->api_key, true);
        break;
      case TK_THREADS: st = take_i32(ld, "threads", 1, TN_POOL_THREADS_MAX,
                                   &cfg->threads);
        break;
      case TK_MODELS: st = parse_models(ld); break;
      case TK_UPSTREAMS:
        st = parse_list(ld, "upstreams", TN_SERVE_UPSTREAMS_MAX,
                        sizeof *cfg->upstreams, (void **)&cfg->upstreams,
                        &cfg->n_upstreams, upstream_elem);
        break;
      case TK_ROUTES:
        st = parse_list(ld, "routes", TN_SERVE_ROUTES_MAX, sizeof *cfg->routes,
                        (void **)&cfg->routes, &cfg->n_routes, route_elem);
        break;
      case TK_TENANTS:
        st = parse_list(ld, "tenants", TN_SERVE_TENANTS_MAX,
                        sizeof *cfg->tenants, (void **)&cfg->tenants,
                        &cfg->n_tenants, tenant_elem);
        break;
    }
    if (st) return st;
  }
  if (!cfg->models)
    return fail(ld, TN_EINVAL, top_line, NULL, "missing key 'models'");
  if ((st = check_routes(ld))) return st;
  if ((st = check_shadows(ld))) return st;
  if ((st = next(ld, NULL))) return st;
  TN_ASSERT(ld->ev.type == YAML_DOCUMENT_END_EVENT);
  if ((st = next(ld, NULL))) return st;
  if (ld->ev.type != YAML_STREAM_END_EVENT)
    return fail(ld, TN_EINVAL, ev_line(ld), NULL,
                "more than one YAML document (only one config per file)");
  return TN_OK;
}

enum tn_status tn_serve_config_parse(const char *text, size_t len,
                                     const char *file_name,
                                     struct tn_serve_config *out,
                                     struct tn_error *err) {
  memset(out, 0, sizeof *out);
  struct loader ld = {.file = file_name ? file_name : "config",
                      .err = err, .cfg = out};
  if (len > CONFIG_FILE_MAX)
    return tn_error_set(err, TN_EINVAL, "%.96s: %zu bytes is too large for a "
                        "config (at most %u)", ld.file, len, CONFIG_FILE_MAX);
  if (!yaml_parser_initialize(&ld.parser))
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  yaml_parser_set_input_string(&ld.parser, (const unsigned char *)text, len);
  enum tn_status st = parse_document(&ld);
  if (ld.have_ev) yaml_event_delete(&ld.ev);
  yaml_parser_delete(&ld.parser);
  if (st) tn_serve_config_free(out);
  return st;
}

enum tn_status tn_serve_config_load(const char *path,
                                    struct tn_serve_config *out,
                                    struct tn_error *err) {
  memset(out, 0, sizeof *out);
  char *text;
  size_t len;
  enum tn_status st = tn_file_read(path, &text, &len, err);
  if (st) return st;
  st = tn_serve_config_parse(text, len, path, out, err);
  free(text);
  return st;
}

void tn_serve_config_free(struct tn_serve_config *cfg) {
  if (!cfg) return;
  for (int i = 0; i < cfg->n_models; i++) {
    struct tn_serve_model_cfg *m = &cfg->models[i];
    free(m->name);
    free(m->path);
    free(m->chat_template);
    free(m->spec);
    free(m->spec_layers);
    free(m->draft_model);
    for (int a = 0; a < m->n_adapters; a++) {
      free(m->adapters[a].name);
      free(m->adapters[a].path);
    }
    free(m->adapters);
    free(m->shadow.target);
    free(m->shadow.judge);
    for (int a = 0; a < m->n_aliases; a++) free(m->aliases[a]);
    free(m->aliases);
  }
  free(cfg->models);
  for (int i = 0; i < cfg->n_upstreams; i++) {
    struct tn_serve_upstream_cfg *u = &cfg->upstreams[i];
    free(u->name);
    free(u->base_url);
    free(u->model);
    free(u->api_key_env);
    free(u->api_key);
    free(u->shadow.target);
    free(u->shadow.judge);
  }
  free(cfg->upstreams);
  for (int i = 0; i < cfg->n_routes; i++) {
    struct tn_serve_route_cfg *r = &cfg->routes[i];
    free(r->name);
    for (int t = 0; t < r->n_targets; t++) free(r->targets[t]);
    free(r->targets);
    for (int k = 0; k < r->n_rules; k++) {
      struct tn_serve_rule_cfg *u = &r->rules[k];
      free(u->regex);
      for (int w = 0; w < u->n_keywords; w++) free(u->keywords[w]);
      free(u->keywords);
      free(u->user);
      free(u->header);
      free(u->header_regex);
      for (int w = 0; w < u->n_tenants; w++) free(u->tenants[w]);
      free(u->tenants);
      for (int w = 0; w < u->n_meta; w++) {
        free(u->meta_keys[w]);
        free(u->meta_res[w]);
      }
      free(u->meta_keys);
      free(u->meta_res);
      free(u->to);
    }
    free(r->rules);
    for (int k = 0; k < r->n_stages; k++) free(r->stages[k].model);
    free(r->stages);
    for (int k = 0; k < r->n_examples; k++) free(r->examples[k].text);
    free(r->examples);
    for (int k = 0; k < r->n_labels; k++) free(r->labels[k]);
    free(r->labels);
    free(r->embed_model);
    free(r->shadow.target);
    free(r->shadow.judge);
  }
  free(cfg->routes);
  for (int i = 0; i < cfg->n_tenants; i++) {
    struct tn_serve_tenant_cfg *t = &cfg->tenants[i];
    free(t->name);
    free(t->key);
    free(t->key_env);
    for (int k = 0; k < t->n_allow; k++) free(t->allow[k]);
    free(t->allow);
  }
  free(cfg->tenants);
  free(cfg->host);
  free(cfg->api_key);
  memset(cfg, 0, sizeof *cfg);
}

int tn_serve_config_find(const struct tn_serve_config *cfg, const char *name) {
  if (!cfg || !name) return -1;
  for (int i = 0; i < cfg->n_models; i++) {
    const struct tn_serve_model_cfg *m = &cfg->models[i];
    if (m->name && !strcmp(m->name, name)) return i;
    for (int a = 0; a < m->n_aliases; a++)
      if (!strcmp(m->aliases[a], name)) return i;
  }
  return -1;
}

int tn_serve_config_find_upstream(const struct tn_serve_config *cfg,
                                  const char *name) {
  if (!cfg || !name) return -1;
  for (int i = 0; i < cfg->n_upstreams; i++)
    if (cfg->upstreams[i].name && !strcmp(cfg->upstreams[i].name, name))
      return i;
  return -1;
}

int tn_serve_config_find_route(const struct tn_serve_config *cfg,
                               const char *name) {
  if (!cfg || !name) return -1;
  for (int i = 0; i < cfg->n_routes; i++)
    if (cfg->routes[i].name && !strcmp(cfg->routes[i].name, name)) return i;
  return -1;
}
