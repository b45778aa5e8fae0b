/*
 * cli.h: subcommands of `tern` and the session helper they share.
 */
#ifndef TN_CLI_H
#define TN_CLI_H

#include "base/base.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

int tn_cli_run(int argc, char **argv);
int tn_cli_tokenize(int argc, char **argv);
int tn_cli_bench(int argc, char **argv);
int tn_cli_perplexity(int argc, char **argv);
int tn_cli_serve(int argc, char **argv);

/* Parses a whole integer option in [lo, hi] or prints why not. */
bool tn_cli_parse_int(const char *opt, const char *s, long lo, long hi,
                      long *out);

/* One model, its tokenizer, a compute pool, a forward context and a KV
 * cache with room for one sequence of n_ctx tokens. */
struct tn_session {
  struct tn_model *model;
  struct tn_tokenizer *tok;
  struct tn_pool *pool;
  struct tn_ctx *ctx;
  struct tn_kv_pool kv;
  struct tn_kv_seq seq;
  int32_t n_ctx;
  int32_t n_batch;
  double load_s;
};

/* Resolves a model argument: an existing path, or a short name / file
 * name under models/ (next to the binary's source tree or the cwd). */
const char *tn_cli_model_path(const char *arg, char *buf, size_t cap);

int tn_session_open(struct tn_session *s, const char *model_arg,
                    int n_threads, int32_t n_ctx, int32_t n_batch,
                    int32_t n_logits_max, bool need_tokenizer);
void tn_session_close(struct tn_session *s);
/* Evaluates tokens at positions seq.n_tokens.. in batches; logits of the
 * last token (when want_last) end up in tn_ctx_logits()[0]. */
int tn_session_eval(struct tn_session *s, const int32_t *ids, int32_t n,
                    bool want_last);

/* Prints "tern: error: ..." and returns 1. */
int tn_cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif /* TN_CLI_H */
