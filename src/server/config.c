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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

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

enum { MK_NAME, MK_PATH, MK_ALIASES, MK_THREADS, MK_CTX, MK_MAX_SEQS,
       MK_KV_MEM, MK_CHAT_TEMPLATE, MK_SPEC, MK_SPEC_MAX_TOKENS,
       MK_DRAFT_MODEL, MK_PRICE_PROMPT, MK_PRICE_CACHED, MK_PRICE_COMPLETION,
       MK_ADAPTERS, MK_MAX_LORAS, MK_ADAPTER_MEM, MK_COUNT };
static const char *const k_model_keys[MK_COUNT] = {
    "name", "path", "aliases", "threads", "ctx", "max_seqs", "kv_mem",
    "chat_template", "spec", "spec_max_tokens", "draft_model",
    "price_prompt", "price_cached", "price_completion", "adapters",
    "max_loras", "adapter_mem"};

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
      case MK_DRAFT_MODEL:
        st = take_string(ld, key, 4096, &m->draft_model, true);
        break;
      case MK_PRICE_PROMPT: st = take_price(ld, key, &m->price_prompt); break;
      case MK_PRICE_CACHED: st = take_price(ld, key, &m->price_cached); break;
      case MK_PRICE_COMPLETION:
        st = take_price(ld, key, &m->price_completion);
        break;
      case MK_ADAPTERS: st = parse_adapters(ld, key, m); break;
      case MK_ADAPTER_MEM: st = take_size(ld, key, &m->adapter_mem); break;
      case MK_MAX_LORAS:
        st = take_i32(ld, key, 1, TN_ADAPTERS_PER_STEP_MAX, &m->max_loras);
        break;
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
    st = parse_model(ld, cfg->n_models - 1, m);
    if (st) return st;
  }
  if (cfg->n_models == 0)
    return fail(ld, TN_EINVAL, list_line, "models",
                "the list is empty (at least one model is needed)");
  return TN_OK;
}

enum { TK_HOST, TK_PORT, TK_API_KEY, TK_THREADS, TK_MODELS, TK_COUNT };
static const char *const k_top_keys[TK_COUNT] = {"host", "port", "api_key",
                                                 "threads", "models"};

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
                "models), "
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
    }
    if (st) return st;
  }
  if (!cfg->models)
    return fail(ld, TN_EINVAL, top_line, NULL, "missing key 'models'");
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
    free(m->draft_model);
    for (int a = 0; a < m->n_adapters; a++) {
      free(m->adapters[a].name);
      free(m->adapters[a].path);
    }
    free(m->adapters);
    for (int a = 0; a < m->n_aliases; a++) free(m->aliases[a]);
    free(m->aliases);
  }
  free(cfg->models);
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
