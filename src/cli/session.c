/*
 * session.c: errors, thread counts, and the session bench and perplexity
 * use to time or score raw forward passes.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"

int tn_cli_fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("tern: error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return 1;
}

int tn_cli_read_stream(FILE *f, const char *what, char **out, size_t *len) {
  *out = NULL;
  *len = 0;
  struct tn_buf b = {0};
  char chunk[65536];
  size_t n;
  while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
    tn_buf_append(&b, chunk, n);
    if (b.oom) {
      tn_buf_free(&b);
      return tn_cli_fail("%s: out of memory", what);
    }
    if (b.len > TN_TOKENIZER_MAX_TEXT) {
      tn_buf_free(&b);
      return tn_cli_fail("%s: more than %d bytes", what,
                         TN_TOKENIZER_MAX_TEXT);
    }
  }
  if (ferror(f)) {
    tn_buf_free(&b);
    return tn_cli_fail("%s: %s", what, strerror(errno));
  }
  tn_buf_append(&b, "", 0); /* NUL-terminated even when empty */
  if (b.oom) {
    tn_buf_free(&b);
    return tn_cli_fail("out of memory");
  }
  *out = b.data;
  *len = b.len;
  return 0;
}

int tn_cli_threads(long requested) {
  int cores = tn_cpu_count();
  if (requested <= 0) return cores;
  if (requested > cores)
    tn_log_warn("%ld threads on %d physical core%s: threads beyond the "
                "cores wait on each other at every step (slower, not "
                "faster); the default is %d",
                requested, cores, cores == 1 ? "" : "s", cores);
  return (int)requested;
}

int tn_session_open(struct tn_session *s, const char *model_arg,
                    int n_threads, int32_t n_ctx, int32_t n_batch,
                    int32_t n_logits_max, bool need_tokenizer) {
  memset(s, 0, sizeof(*s));
  struct tn_error err = {0};
  char pbuf[1024];
  const char *path = tn_cli_model_path(model_arg, pbuf, sizeof(pbuf));
  if (!path) return 1;
  double t0 = tn_time_s();
  if (tn_model_load(path, &s->model, &err))
    return tn_cli_fail("%s: %s", path, err.msg);
  const struct tn_hparams *hp = &s->model->hp;
  if (need_tokenizer && tn_tokenizer_load(s->model->gguf, &s->tok, &err)) {
    tn_session_close(s);
    return tn_cli_fail("%s", err.msg);
  }
  n_threads = tn_cli_threads(n_threads);
  if (n_ctx <= 0) n_ctx = TN_MIN(hp->n_ctx_train, 4096);
  if (n_ctx < 8 || n_ctx > (1 << 20)) {
    tn_session_close(s);
    return tn_cli_fail("context size %d must be in [8, %d]", n_ctx, 1 << 20);
  }
  if (n_batch <= 0) n_batch = 512;
  n_batch = TN_MIN(n_batch, n_ctx);
  n_logits_max = TN_MIN(n_logits_max, n_batch);
  s->n_ctx = n_ctx;
  s->n_batch = n_batch;
  s->pool = tn_pool_new(n_threads);
  if (!s->pool) {
    tn_session_close(s);
    return tn_cli_fail("cannot start %d threads", n_threads);
  }
  if (tn_ctx_new(s->model, s->pool, n_batch, n_ctx, n_logits_max, &s->ctx,
                 &err)) {
    tn_session_close(s);
    return tn_cli_fail("%s", err.msg);
  }
  int32_t bs = 16;
  if (tn_kv_pool_new(hp->n_layer, (n_ctx + bs - 1) / bs, bs,
                     hp->n_head_kv * hp->head_dim, &s->kv, &err)) {
    tn_session_close(s);
    return tn_cli_fail("%s", err.msg);
  }
  tn_kv_seq_init(&s->seq);
  s->load_s = tn_time_s() - t0;
  tn_log_debug("loaded %s (%s, %d layers, %d embd, vocab %d) in %.2f s",
               s->model->name, tn_arch_name(hp->arch), hp->n_layer,
               hp->n_embd, hp->n_vocab, s->load_s);
  return 0;
}

void tn_session_close(struct tn_session *s) {
  tn_kv_seq_deinit(s->kv, &s->seq);
  tn_kv_pool_free(s->kv);
  tn_ctx_free(s->ctx);
  tn_pool_free(s->pool);
  tn_tokenizer_free(s->tok);
  tn_model_free(s->model);
  memset(s, 0, sizeof(*s));
}

static int eval(struct tn_session *s, const int32_t *ids, int32_t n,
                bool want_last, bool want_all);

int tn_session_eval(struct tn_session *s, const int32_t *ids, int32_t n,
                    bool want_last) {
  return eval(s, ids, n, want_last, false);
}

int tn_session_eval_all(struct tn_session *s, const int32_t *ids,
                        int32_t n) {
  if (n > s->n_batch)
    return tn_cli_fail("%d tokens with logits exceed a batch (%d)", n,
                       s->n_batch);
  return eval(s, ids, n, false, true);
}

static int eval(struct tn_session *s, const int32_t *ids, int32_t n,
                bool want_last, bool want_all) {
  struct tn_error err = {0};
  if (n <= 0) return 0;
  if (s->seq.n_tokens + n > s->n_ctx)
    return tn_cli_fail("context full: %d + %d tokens exceed %d",
                       s->seq.n_tokens, n, s->n_ctx);
  if (tn_kv_seq_reserve(s->kv, &s->seq, s->seq.n_tokens + n))
    return tn_cli_fail("kv cache exhausted");
  int32_t nb = s->n_batch;
  int32_t *tok = malloc((size_t)nb * sizeof(int32_t));
  int32_t *pos = malloc((size_t)nb * sizeof(int32_t));
  int32_t *seq = calloc((size_t)nb, sizeof(int32_t));
  bool *lg = calloc((size_t)nb, sizeof(bool));
  int rc = 0;
  if (!tok || !pos || !seq || !lg) {
    rc = tn_cli_fail("out of memory");
    goto done;
  }
  struct tn_kv_seq *seqs[1] = {&s->seq};
  for (int32_t i = 0; i < n; i += nb) {
    int32_t m = TN_MIN(nb, n - i);
    for (int32_t j = 0; j < m; j++) {
      tok[j] = ids[i + j];
      pos[j] = s->seq.n_tokens + j;
      lg[j] = want_all || (want_last && i + j == n - 1);
    }
    struct tn_batch b = {.n_tokens = m, .token = tok, .pos = pos, .seq = seq,
                         .logits = lg, .n_seqs = 1, .seqs = seqs};
    if (tn_model_forward(s->ctx, s->kv, &b, &err)) {
      rc = tn_cli_fail("%s", err.msg);
      goto done;
    }
    s->seq.n_tokens += m;
  }
done:
  free(tok);
  free(pos);
  free(seq);
  free(lg);
  return rc;
}
