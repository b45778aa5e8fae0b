/*
 * cli.h: subcommands of `tern`, their option parser, model lookup, and the
 * session helper that bench and perplexity share.
 */
#ifndef TN_CLI_H
#define TN_CLI_H

#include <stdio.h>

#include "base/base.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

int tn_cli_run(int argc, char **argv);
int tn_cli_chat(int argc, char **argv);
int tn_cli_tokenize(int argc, char **argv);
int tn_cli_bench(int argc, char **argv);
int tn_cli_calibrate_self(int argc, char **argv);
int tn_cli_perplexity(int argc, char **argv);
int tn_cli_serve(int argc, char **argv);
int tn_cli_models(int argc, char **argv);
int tn_cli_pull(int argc, char **argv);
int tn_cli_logs(int argc, char **argv);
int tn_cli_eval(int argc, char **argv);
int tn_cli_export_lora(int argc, char **argv);

/* Prints "tern: error: ..." and returns 1. */
int tn_cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- options (opts.c)
 *
 * A command lists its options in groups; tn_cli_parse() fills the
 * destinations, and its --help prints usage with each option's default
 * (.def, or the destination's value before parsing). */

enum tn_opt_kind {
  TN_OPT_END,   /* table terminator (all zero) */
  TN_OPT_FLAG,  /* bool *dst = true */
  TN_OPT_INT,   /* long *dst, in [lo, hi] */
  TN_OPT_FLOAT, /* float *dst, in [lo, hi] */
  TN_OPT_STR,   /* const char **dst (borrowed from argv) */
  TN_OPT_SIZE,  /* int64_t *dst, "512MiB", "2G", ... (tn_parse_size) */
  TN_OPT_LIST,  /* struct tn_cli_list *dst, repeatable (at most hi times,
                   when hi >= 1) */
  TN_OPT_HELP,  /* -h/--help: prints help, tn_cli_parse returns -1 */
  TN_OPT_COUNT
};

#define TN_OPT_EMPTY_OK 1u /* TN_OPT_STR: "" is a valid value */

struct tn_opt {
  const char *name;  /* long name without "--", or NULL */
  char short_name;   /* or 0 */
  enum tn_opt_kind kind;
  void *dst;
  double lo, hi;     /* TN_OPT_INT / TN_OPT_FLOAT range */
  const char *metavar;
  const char *help;
  const char *def;   /* default shown in help, instead of *dst */
  bool *seen;        /* set when the option was given */
  unsigned flags;
};

#define TN_CLI_LIST_MAX 64
struct tn_cli_list {
  const char *v[TN_CLI_LIST_MAX];
  int n;
};

/* Entries every command has. */
#define TN_CLI_OPT_HELP \
  {"help", 'h', TN_OPT_HELP, NULL, 0, 0, NULL, "show this help", NULL, NULL, 0}
#define TN_CLI_OPT_VERBOSE(dst) \
  {"verbose", 'v', TN_OPT_FLAG, (dst), 0, 0, NULL, "debug logging", NULL, \
   NULL, 0}

struct tn_opt_group {
  const char *title;
  const struct tn_opt *opts; /* ends with a zeroed entry */
};

struct tn_cli_cmd {
  const char *name;     /* "run" */
  const char *usage;    /* "tern run -m MODEL -p PROMPT [options]" */
  const char *about;    /* a paragraph under usage, or NULL */
  const char *epilog;   /* examples after the options, or NULL */
  int max_positional;   /* 0: every non-option argument is an error */
};

/* Parses argv[1..argc) (argv[0] is the command name). Returns 0 when
 * parsed, 1 after printing an error, -1 after printing --help (the command
 * then exits 0). groups ends with {NULL, NULL}. Positional arguments go to
 * *positional (may be NULL when max_positional is 0). */
int tn_cli_parse(const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups, int argc, char **argv,
                 struct tn_cli_list *positional);
void tn_cli_help(FILE *f, const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups);

/* ---- model files (models.c)
 *
 * A model argument is a path to a .gguf (anything with a '/' or an
 * existing file), or a short name of the catalog (`tern models`) or a file
 * name, looked up in $TERN_MODELS, then the per-user models directory
 * ($XDG_DATA_HOME/tern/models, else ~/.local/share/tern/models), then
 * ./models, then the models/ folder of the source tree the binary was
 * built in. Returns the path in buf, or NULL after printing an error with
 * a hint (`tern pull NAME`). */
const char *tn_cli_model_path(const char *arg, char *buf, size_t cap);

/* Whether the catalog marks a short name or file as a base model (no chat
 * training), for the error `--chat` gives on it. */
bool tn_cli_model_is_base(const char *path);

/* Reads all of f (any bytes, at most TN_TOKENIZER_MAX_TEXT) into a
 * malloc'd NUL-terminated buffer; what names the source in errors. */
int tn_cli_read_stream(FILE *f, const char *what, char **out, size_t *len);

/* ---- threads */

/* The default compute threads: physical cores available to the process
 * (affinity and cgroup quota respected). Warns when n asks for more. */
int tn_cli_threads(long requested);

/* ---- session: one model, its tokenizer, a compute pool, a forward
 * context and a KV cache with room for one sequence of n_ctx tokens.
 * For bench and perplexity, which time or score raw forward passes;
 * generation goes through the engine (run.c, chat.c). */
struct tn_session {
  struct tn_model *model;
  struct tn_tokenizer *tok;
  struct tn_pool *pool;
  struct tn_ctx *ctx;
  struct tn_kv_pool *kv;
  struct tn_kv_seq seq;
  int32_t n_ctx;
  int32_t n_batch;
  double load_s;
};

int tn_session_open(struct tn_session *s, const char *model_arg,
                    int n_threads, int32_t n_ctx, int32_t n_batch,
                    int32_t n_logits_max, bool need_tokenizer);
void tn_session_close(struct tn_session *s);
/* Evaluates tokens at positions seq.n_tokens.. in batches; logits of the
 * last token (when want_last) end up in tn_ctx_logits()[0]. */
int tn_session_eval(struct tn_session *s, const int32_t *ids, int32_t n,
                    bool want_last);
/* The same in one batch (n <= n_batch and n_logits_max), logits for every
 * token, in order. */
int tn_session_eval_all(struct tn_session *s, const int32_t *ids,
                        int32_t n);

#endif /* TN_CLI_H */
