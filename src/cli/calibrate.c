/*
 * calibrate.c: tern calibrate-self, which picks the layers a model drafts
 * with under --spec self.
 *
 * A self-draft runs a subset S of the model's layers and its output head;
 * it pays when the chance alpha(S) that its greedy token is the full
 * model's is high and its pass is cheap. The command:
 *  1. has the full model answer a few prompts greedily (as chat when the
 *     model has a template): the text drafts will be judged on is the
 *     model's own output;
 *  2. times a one-token pass through all layers, through none (embedding
 *     and head), and a verify pass of K+1 tokens for each K, so a pass
 *     through S is estimated as none + |S|/L of the difference;
 *  3. searches S by greedy removal: starting from all layers, each round
 *     drops the layer whose absence keeps alpha highest (the first round
 *     tries every layer; later rounds the best few of the previous
 *     ranking, since a layer's cost changes little as others go), where
 *     alpha(S) is the share of answer positions where one pass of S over
 *     prompt and answer predicts the model's next token;
 *  4. predicts each S's speedup at its best K with the usual geometric
 *     model: (1 - alpha^(K+1)) / (1 - alpha) tokens per K draft passes and
 *     one verify pass, against one plain step, and prints the table and
 *     the best S as --spec-layers.
 *
 * alpha is measured as a draft in serving sees the text: a pass of S over
 * the answer positions reads the full model's cache of the text (written
 * when the model answered) and writes nothing, so each position sees the
 * full model's keys and values before it and, unlike a draft, at itself
 * too. Later draft positions see the draft's own earlier ones; tern run
 * -v prints the acceptance the engine measures.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "engine/engine.h"

static const char *const k_default_prompts[] = {
    "Rename the variable `total` to `sum` in this function and return the "
    "whole function:\n\ndef mean(values):\n    total = 0\n    for v in "
    "values:\n        total += v\n    return total / len(values)\n",
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
};

struct calib {
  struct tn_session s;
  int32_t n_texts;
  int32_t *ids[TN_CLI_LIST_MAX]; /* prompt + answer */
  int32_t n_ids[TN_CLI_LIST_MAX];
  int32_t n_prompt[TN_CLI_LIST_MAX];
  /* the full model's cache of each text, all but its last token */
  struct tn_kv_seq kv[TN_CLI_LIST_MAX];
  int32_t n_evals;
  /* a scoring batch: one text's answer positions */
  int32_t *tok, *pos, *seq;
  bool *logits;
};

static int32_t argmax(const float *row, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; i++)
    if (row[i] > row[best]) best = i;
  return best;
}


/* The model's greedy answer to one prompt (n_gen tokens at most). */
static int answer(struct calib *c, const char *prompt, int32_t n_gen,
                  int32_t i) {
  struct tn_session *s = &c->s;
  struct tn_error err = {0};
  char *text = NULL;
  size_t len = 0;
  if (tn_chat_available(s->tok)) {
    struct tn_chat_msg m = {.role = "user", .content = prompt,
                            .content_len = strlen(prompt)};
    if (tn_chat_format(s->tok, &m, 1, true, &text, &len, &err))
      return tn_cli_fail("chat template: %s", err.msg);
  } else if (!(text = strdup(prompt))) {
    return tn_cli_fail("out of memory");
  } else {
    len = strlen(text);
  }
  int32_t *ids = NULL;
  size_t n_ids = 0;
  enum tn_status st =
      tn_tokenizer_encode(s->tok, text, len, true, true, &ids, &n_ids, &err);
  free(text);
  if (st) return tn_cli_fail("%s", err.msg);
  int32_t cap = (int32_t)n_ids + n_gen;
  if (cap > s->n_ctx) {
    free(ids);
    return tn_cli_fail("prompt %d: %zu tokens and %d to answer exceed the "
                       "context (%d)",
                       i + 1, n_ids, n_gen, s->n_ctx);
  }
  int32_t *all = realloc(ids, (size_t)cap * sizeof(int32_t));
  if (!all) {
    free(ids);
    return tn_cli_fail("out of memory");
  }
  c->ids[i] = all;
  c->n_prompt[i] = c->n_ids[i] = (int32_t)n_ids;
  tn_kv_seq_truncate(s->kv, &s->seq, 0);
  s->seq.n_tokens = 0;
  const int32_t nv = s->model->hp.n_vocab;
  if (tn_session_eval(s, all, (int32_t)n_ids, true)) return 1;
  for (int32_t g = 0; g < n_gen; g++) {
    int32_t t = argmax(tn_ctx_logits(s->ctx), nv);
    all[c->n_ids[i]++] = t;
    if (tn_tokenizer_is_eog(s->tok, t) || g + 1 == n_gen) break;
    if (tn_session_eval(s, &t, 1, true)) return 1;
  }
  /* the cache is this text's now */
  c->kv[i] = s->seq;
  tn_kv_seq_init(&s->seq);
  return 0;
}

/* alpha of the layer subset set on the session's context: one pass over
 * the positions that predict answer tokens, reading (not writing) the
 * full model's cache of the text, as a draft in serving reads it. */
static int score(struct calib *c, double *alpha) {
  struct tn_session *s = &c->s;
  const int32_t nv = s->model->hp.n_vocab;
  int64_t hit = 0, total = 0;
  tn_ctx_set_kv_readonly(s->ctx, true);
  for (int32_t i = 0; i < c->n_texts; i++) {
    int32_t n_out = c->n_ids[i] - c->n_prompt[i];
    if (n_out <= 0) continue;
    for (int32_t j = 0; j < n_out; j++) {
      c->pos[j] = c->n_prompt[i] - 1 + j;
      c->tok[j] = c->ids[i][c->pos[j]];
      c->seq[j] = 0;
      c->logits[j] = true;
    }
    struct tn_kv_seq *seqs[1] = {&c->kv[i]};
    struct tn_batch b = {.n_tokens = n_out, .token = c->tok, .pos = c->pos,
                         .seq = c->seq, .logits = c->logits, .n_seqs = 1,
                         .seqs = seqs};
    struct tn_error err = {0};
    if (tn_model_forward(s->ctx, s->kv, &b, &err)) {
      tn_ctx_set_kv_readonly(s->ctx, false);
      return tn_cli_fail("%s", err.msg);
    }
    const float *lg = tn_ctx_logits(s->ctx);
    for (int32_t j = 0; j < n_out; j++)
      hit += argmax(lg + (size_t)j * (size_t)nv, nv) ==
             c->ids[i][c->n_prompt[i] + j];
    total += n_out;
  }
  tn_ctx_set_kv_readonly(s->ctx, false);
  c->n_evals++;
  *alpha = total ? (double)hit / (double)total : 0.0;
  return 0;
}

static int set_layers(struct calib *c, const int32_t *layers, int32_t n) {
  struct tn_error err = {0};
  if (tn_ctx_set_layers(c->s.ctx, layers, n, &err))
    return tn_cli_fail("%s", err.msg);
  return 0;
}

/* Best of five passes of n tokens at position 64 (a short history). */
static int time_pass(struct calib *c, int32_t n, double *out) {
  struct tn_session *s = &c->s;
  int32_t ids[TN_SPEC_MAX_TOKENS + 1 + 64] = {0};
  *out = DBL_MAX;
  for (int rep = 0; rep < 5; rep++) {
    tn_kv_seq_truncate(s->kv, &s->seq, 0);
    s->seq.n_tokens = 0;
    if (tn_session_eval(s, ids, 64, false)) return 1;
    double t0 = tn_time_s();
    if (tn_session_eval_all(s, ids + 64, n)) return 1;
    *out = fmin(*out, tn_time_s() - t0);
  }
  return 0;
}

struct costs {
  double t_all, t_none;
  double t_verify[TN_SPEC_MAX_TOKENS + 1]; /* [k]: a pass of k + 1 */
};

/* Predicted speedup (below 1: a slowdown) of drafting k tokens a step at
 * acceptance alpha with a pass of n_keep layers, at the best k (*best_k). */
static double predict(const struct costs *co, int32_t n_layer,
                      int32_t n_keep, double alpha, int32_t k_max,
                      int32_t *best_k) {
  double t_draft = co->t_none + (co->t_all - co->t_none) * n_keep / n_layer;
  double best = 0.0;
  *best_k = 1;
  for (int32_t k = 1; k <= k_max; k++) {
    double tokens = alpha >= 1.0 ? k + 1.0
                                 : (1.0 - pow(alpha, k + 1)) / (1.0 - alpha);
    double sp = tokens * co->t_all / (k * t_draft + co->t_verify[k]);
    if (sp > best) {
      best = sp;
      *best_k = k;
    }
  }
  return best;
}

/* Candidates re-tried in each round after the first. */
#define CALIB_TRIES 8

int tn_cli_calibrate_self(int argc, char **argv) {
  const char *model = NULL;
  struct tn_cli_list prompts = {0}, files = {0};
  long n_gen = 64, threads = 0, max_evals = 150, k_max = 8;
  float min_alpha = 0.3f;
  bool verbose = false;
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH",
       "model to calibrate", NULL, NULL, 0},
      {"prompt", 'p', TN_OPT_LIST, &prompts, 0, TN_CLI_LIST_MAX, "TEXT",
       "a prompt like those it will serve (repeatable)",
       "three built-in: a code edit, an explanation, a function", NULL, 0},
      {"file", 'f', TN_OPT_LIST, &files, 0, TN_CLI_LIST_MAX, "FILE",
       "a prompt from a file (repeatable)", NULL, NULL, 0},
      {"n-predict", 'n', TN_OPT_INT, &n_gen, 4, 1024, "N",
       "answer tokens per prompt to judge drafts on", "64", NULL, 0},
      {"spec-max-tokens", 0, TN_OPT_INT, &k_max, 1, TN_SPEC_MAX_TOKENS, "K",
       "longest draft to consider", "8", NULL, 0},
      {"max-evals", 0, TN_OPT_INT, &max_evals, 1, 100000, "N",
       "layer subsets to score at most (each one pass over the text)",
       "150", NULL, 0},
      {"min-acceptance", 0, TN_OPT_FLOAT, &min_alpha, 0, 1, "A",
       "stop dropping layers when acceptance falls below A", "0.3", NULL,
       0},
      {"threads", 't', TN_OPT_INT, &threads, 1, TN_POOL_THREADS_MAX, "N",
       "compute threads", "physical cores", NULL, 0},
      TN_CLI_OPT_VERBOSE(&verbose),
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "calibrate-self", "tern calibrate-self -m MODEL [options]",
      "Picks the layers a model drafts with under --spec self: it measures "
      "how often a subset of its layers predicts the model's own next "
      "token, and what a pass costs on this machine, and prints the "
      "subsets tried with their predicted speedup and the best as "
      "--spec-layers.",
      "example:\n  tern calibrate-self -m qwen2.5-coder-0.5b\n"
      "  tern serve -m qwen2.5-coder-0.5b --spec self --spec-layers LIST",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (verbose) tn_log_set_level(TN_LOG_LEVEL_DEBUG);
  if (!model) return tn_cli_fail("calibrate-self: -m MODEL is required");
  if (prompts.n + files.n > TN_CLI_LIST_MAX)
    return tn_cli_fail("calibrate-self: at most %d prompts",
                       TN_CLI_LIST_MAX);
  struct calib c = {0};
  char *texts[TN_CLI_LIST_MAX] = {0};
  int rc = 1;
  int32_t *keep = NULL, *trial = NULL, *order = NULL, *best_set = NULL;
  double *gain = NULL;
  for (int i = 0; i < files.n; i++) {
    struct tn_error err = {0};
    size_t len;
    if (tn_file_read(files.v[i], &texts[i], &len, &err)) {
      tn_cli_fail("-f %s: %s", files.v[i], err.msg);
      goto done;
    }
  }
  if (tn_session_open(&c.s, model, (int)threads, 4096, 2048,
                      (int32_t)TN_MAX(n_gen, TN_SPEC_MAX_TOKENS + 1), true))
    goto done;
  c.tok = malloc((size_t)n_gen * sizeof(int32_t));
  c.pos = malloc((size_t)n_gen * sizeof(int32_t));
  c.seq = malloc((size_t)n_gen * sizeof(int32_t));
  c.logits = malloc((size_t)n_gen * sizeof(bool));
  if (!c.tok || !c.pos || !c.seq || !c.logits) {
    tn_cli_fail("out of memory");
    goto done;
  }
  const int32_t L = c.s.model->hp.n_layer;
  /* 1. the model's own answers */
  double t0 = tn_time_s();
  const char *list[TN_CLI_LIST_MAX];
  int n_list = 0;
  for (int i = 0; i < prompts.n; i++) list[n_list++] = prompts.v[i];
  for (int i = 0; i < files.n; i++) list[n_list++] = texts[i];
  if (n_list == 0)
    for (size_t i = 0; i < TN_ARRAY_LEN(k_default_prompts); i++)
      list[n_list++] = k_default_prompts[i];
  for (int i = 0; i < n_list; i++, c.n_texts++)
    if (answer(&c, list[i], (int32_t)n_gen, i)) goto done;
  int32_t n_judged = 0;
  for (int i = 0; i < c.n_texts; i++) n_judged += c.n_ids[i] - c.n_prompt[i];
  fprintf(stderr, "tern: %d answers, %d tokens to judge drafts on (%.1f s)\n",
          c.n_texts, n_judged, tn_time_s() - t0);
  /* 2. costs */
  struct costs co = {0};
  int32_t none[1] = {0};
  if (time_pass(&c, 1, &co.t_all)) goto done;
  for (int32_t k = 1; k <= k_max; k++)
    if (time_pass(&c, k + 1, &co.t_verify[k])) goto done;
  if (set_layers(&c, none, 0) || time_pass(&c, 1, &co.t_none)) goto done;
  printf("model %s: %d layers; a pass of 1 token %.2f ms, of no layers "
         "(embedding and head) %.2f ms, a verify pass of %ld+1 tokens "
         "%.2f ms\n",
         c.s.model->name, L, co.t_all * 1e3, co.t_none * 1e3, k_max,
         co.t_verify[k_max] * 1e3);
  /* 3. greedy removal */
  keep = malloc((size_t)L * sizeof(int32_t));
  trial = malloc((size_t)L * sizeof(int32_t));
  order = malloc((size_t)L * sizeof(int32_t));
  best_set = malloc((size_t)L * sizeof(int32_t));
  gain = malloc((size_t)L * sizeof(double));
  if (!keep || !trial || !order || !best_set || !gain) {
    tn_cli_fail("out of memory");
    goto done;
  }
  for (int32_t l = 0; l < L; l++) keep[l] = order[l] = l;
  int32_t n_keep = L, n_order = L, best_n = 0, best_k = 0;
  double best_sp = 0.0, best_alpha = 0.0;
  printf("%6s  %10s  %9s  %s\n", "layers", "acceptance", "predicted",
         "dropped");
  char dropped[4096] = "";
  while (n_keep > 1 && c.n_evals < max_evals) {
    /* try dropping each candidate; the first round tries them all */
    int32_t tries = n_keep == L ? n_order : TN_MIN(n_order, CALIB_TRIES);
    int32_t pick = -1;
    double pick_alpha = -1.0;
    for (int32_t j = 0; j < tries && c.n_evals < max_evals; j++) {
      int32_t n = 0;
      for (int32_t i = 0; i < n_keep; i++)
        if (keep[i] != order[j]) trial[n++] = keep[i];
      double a = 0.0;
      if (set_layers(&c, trial, n) || score(&c, &a)) goto done;
      gain[j] = a;
      if (a > pick_alpha) {
        pick_alpha = a;
        pick = j;
      }
      tn_log_debug("without %d (of %d): acceptance %.3f", order[j], n_keep,
                   a);
    }
    if (pick < 0) break;
    /* rank the tried candidates by the acceptance left without them */
    for (int32_t a = 0; a < tries; a++)
      for (int32_t b = a + 1; b < tries; b++)
        if (gain[b] > gain[a]) {
          double g = gain[a];
          gain[a] = gain[b];
          gain[b] = g;
          int32_t o = order[a];
          order[a] = order[b];
          order[b] = o;
        }
    int32_t gone = order[0];
    memmove(order, order + 1, (size_t)(--n_order) * sizeof(int32_t));
    int32_t n = 0;
    for (int32_t i = 0; i < n_keep; i++)
      if (keep[i] != gone) keep[n++] = keep[i];
    n_keep = n;
    int32_t k;
    double sp = predict(&co, L, n_keep, pick_alpha, (int32_t)k_max, &k);
    size_t dl = strlen(dropped);
    snprintf(dropped + dl, sizeof dropped - dl, "%s%d", dl ? "," : "", gone);
    printf("%6d  %10.3f  %8.2fx  %s\n", n_keep, pick_alpha, sp, dropped);
    fflush(stdout);
    if (sp > best_sp) {
      best_sp = sp;
      best_alpha = pick_alpha;
      best_k = k;
      best_n = n_keep;
      memcpy(best_set, keep, (size_t)n_keep * sizeof(int32_t));
    }
    if (pick_alpha < min_alpha) break;
  }
  char buf[4096];
  if (best_n == 0 || best_sp <= 1.0) {
    printf("no subset tried is predicted to pay on this machine (%d "
           "scored; the best, %d layers at %.2fx); self-drafting would only "
           "cost here\n",
           c.n_evals, best_n, best_sp);
    rc = 0;
    goto done;
  }
  tn_spec_format_layers(best_set, best_n, buf, sizeof buf);
  printf("best: %d of %d layers, acceptance %.3f, %d-token drafts, "
         "predicted %.2fx (%d subsets scored)\n",
         best_n, L, best_alpha, best_k, best_sp, c.n_evals);
  printf("--spec self --spec-layers %s --spec-max-tokens %d\n", buf, best_k);
  rc = 0;
done:
  for (int i = 0; i < c.n_texts; i++) {
    free(c.ids[i]);
    tn_kv_seq_deinit(c.s.kv, &c.kv[i]);
  }
  free(c.tok);
  free(c.pos);
  free(c.seq);
  free(c.logits);
  for (int i = 0; i < files.n; i++) free(texts[i]);
  free(keep);
  free(trial);
  free(order);
  free(best_set);
  free(gain);
  if (c.s.model) tn_session_close(&c.s);
  return rc;
}
