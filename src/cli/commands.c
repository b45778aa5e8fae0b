/*
 * commands.c: tern tokenize, bench and perplexity (tools that look at the
 * model itself rather than generate; generation is run.c and chat.c).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/cli_internal.h"
#include "model/lora.h"

/* ---- tern tokenize */

int tn_cli_tokenize(int argc, char **argv) {
  const char *model = NULL;
  bool no_special = false;
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH",
       "model whose vocabulary to use", NULL, NULL, 0},
      {"no-special", 0, TN_OPT_FLAG, &no_special, 0, 0, NULL,
       "no BOS, and special-token text stays plain text", NULL, NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "tokenize", "tern tokenize -m MODEL < TEXT",
      "Prints the token ids of stdin (any bytes) as a JSON array, as the "
      "server encodes prompts: BOS as the vocabulary says, special tokens "
      "spelled in the text parsed as such.",
      "example:\n  echo -n \"Hello, world\" | tern tokenize -m smollm2-135m",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (!model) return tn_cli_fail("tokenize: -m MODEL is required");
  size_t len = 0;
  char *buf = NULL;
  if (tn_cli_read_stream(stdin, "tokenize: stdin", &buf, &len)) return 1;
  struct tn_error err = {0};
  char pbuf[1024];
  struct tn_gguf *g = NULL;
  struct tn_tokenizer *tok = NULL;
  int rc = 1;
  int32_t *ids = NULL;
  size_t n = 0;
  const char *path = tn_cli_model_path(model, pbuf, sizeof(pbuf));
  if (!path) goto done;
  if (tn_gguf_open(path, &g, &err)) {
    tn_cli_fail("%s: %s", path, err.msg);
    goto done;
  }
  if (tn_tokenizer_load(g, &tok, &err) ||
      tn_tokenizer_encode(tok, buf, len, !no_special, !no_special, &ids, &n,
                          &err)) {
    tn_cli_fail("%s", err.msg);
    goto done;
  }
  fputc('[', stdout);
  for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
  fputs("]\n", stdout);
  rc = 0;
done:
  free(ids);
  free(buf);
  tn_tokenizer_free(tok);
  tn_gguf_close(g);
  return rc;
}

/* ---- tern bench */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static long peak_rss_kib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

int tn_cli_bench(int argc, char **argv) {
  const char *model = NULL;
  long threads = 0, n_prompt = 512, n_gen = 128, reps = 3;
  bool json = false, verbose = false;
  struct tn_cli_bench_spec bs = {.spec_max_tokens = 8, .draft_p_min = -1};
  const struct tn_opt spec_opts[] = {
      {"spec", 0, TN_OPT_STR, &bs.spec, 0, 0, "METHOD",
       "time decoding with this speculation against none on real text "
       "(ngram, draft or self; the same flags as tern run)",
       NULL, NULL, 0},
      {"draft-model", 0, TN_OPT_STR, &bs.draft_model, 0, 0, "NAME|PATH",
       "draft model for --spec draft", NULL, NULL, 0},
      {"draft-p-min", 0, TN_OPT_FLOAT, &bs.draft_p_min, 0, 1, "P",
       "a draft ends where the draft model's probability is below P", "0.3",
       NULL, 0},
      {"spec-layers", 0, TN_OPT_STR, &bs.spec_layers, 0, 0, "LIST",
       "the layers --spec self drafts with", NULL, NULL, 0},
      {"spec-max-tokens", 0, TN_OPT_INT, &bs.spec_max_tokens, 1,
       TN_SPEC_MAX_TOKENS, "K", "drafted tokens per step at most", "8", NULL,
       0},
      {"spec-policy", 0, TN_OPT_STR, &bs.spec_policy, 0, 0, "cost|all",
       "which drafts to verify", "cost", NULL, 0},
      {"file", 'f', TN_OPT_STR, &bs.file, 0, 0, "FILE",
       "the prompt to generate from (chat-formatted when the model has a "
       "template)",
       "a built-in code edit", NULL, 0},
      {0},
  };
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH", "model to time",
       NULL, NULL, 0},
      {"threads", 't', TN_OPT_INT, &threads, 1, TN_POOL_THREADS_MAX, "N", "compute threads",
       "physical cores", NULL, 0},
      {"n-prompt", 'p', TN_OPT_INT, &n_prompt, 0, 1 << 16, "N",
       "prompt tokens per prefill run (0: skip)", NULL, NULL, 0},
      {"n-gen", 'n', TN_OPT_INT, &n_gen, 0, 1 << 16, "N",
       "tokens per decode run (0: skip)", NULL, NULL, 0},
      {"repetitions", 'r', TN_OPT_INT, &reps, 1, 100, "N",
       "runs of each; the median is reported", NULL, NULL, 0},
      {"json", 0, TN_OPT_FLAG, &json, 0, 0, NULL, "one JSON object on stdout",
       NULL, NULL, 0},
      TN_CLI_OPT_VERBOSE(&verbose),
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {
      {"options", opts}, {"speculation", spec_opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "bench", "tern bench -m MODEL [options]",
      "Prefill (pp) and decode (tg) speed of one sequence with random "
      "tokens, like llama-bench. With --spec (or --draft-model, "
      "--spec-layers): decode speed with that speculation and without, "
      "generating from a real prompt through the engine, greedy.",
      "examples:\n  tern bench -m smollm2-135m -t 2 -p 512 -n 128 --json\n"
      "  tern bench -m qwen2.5-coder-1.5b --spec ngram -n 256",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (verbose) tn_log_set_level(TN_LOG_LEVEL_DEBUG);
  if (!model) return tn_cli_fail("bench: -m MODEL is required");
  if (bs.spec || bs.draft_model || bs.spec_layers) {
    if (n_gen <= 1)
      return tn_cli_fail("bench: -n %ld: speculation needs at least 2 "
                         "tokens to time",
                         n_gen);
    bs.model = model;
    bs.threads = threads;
    bs.n_gen = n_gen;
    bs.reps = reps;
    bs.json = json;
    bs.verbose = verbose;
    return tn_cli_bench_spec(&bs);
  }
  if (bs.file || bs.spec_policy || bs.draft_p_min >= 0)
    return tn_cli_fail("bench: -f, --spec-policy and --draft-p-min go with "
                       "--spec");
  struct tn_session s;
  int32_t n_ctx = (int32_t)TN_MAX(n_prompt, n_gen) + 16;
  if (tn_session_open(&s, model, (int)threads, n_ctx, 512, 1, false)) return 1;
  int32_t n_vocab = s.model->hp.n_vocab;
  int32_t *ids = malloc((size_t)TN_MAX(n_prompt, 1) * sizeof(int32_t));
  double pp[100], tg[100];
  uint64_t x = 1;
  int rc = 1;
  if (!ids) goto done;
  for (long i = 0; i < TN_MAX(n_prompt, 1); i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    ids[i] = (int32_t)((x >> 33) % (uint64_t)n_vocab);
  }
  /* warm-up: one short prefill and a decode step */
  if (tn_session_eval(&s, ids, TN_MIN((int32_t)n_prompt, 16), true)) goto done;
  for (long r = 0; r < reps; r++) {
    pp[r] = tg[r] = 0.0;
    if (n_prompt > 0) {
      tn_kv_seq_truncate(s.kv, &s.seq, 0);
      double t0 = tn_time_s();
      if (tn_session_eval(&s, ids, (int32_t)n_prompt, true)) goto done;
      pp[r] = (double)n_prompt / (tn_time_s() - t0);
    }
    if (n_gen > 0) {
      tn_kv_seq_truncate(s.kv, &s.seq, 0);
      int32_t tok = ids[0];
      double t0 = tn_time_s();
      for (long i = 0; i < n_gen; i++) {
        if (tn_session_eval(&s, &tok, 1, true)) goto done;
        tok = (tok + 1) % n_vocab;
      }
      tg[r] = (double)n_gen / (tn_time_s() - t0);
    }
  }
  qsort(pp, (size_t)reps, sizeof(double), cmp_double);
  qsort(tg, (size_t)reps, sizeof(double), cmp_double);
  double pp_med = pp[reps / 2], tg_med = tg[reps / 2];
  long rss = peak_rss_kib();
  char name[128];
  size_t o = 0;
  for (const char *p = s.model->name; *p && o + 2 < sizeof(name); p++)
    if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) name[o++] = *p;
  name[o] = '\0';
  if (json) {
    printf("{\"model\": \"%s\", \"threads\": %d, \"n_prompt\": %ld, "
           "\"n_gen\": %ld, \"pp_tok_s\": %.2f, \"tg_tok_s\": %.2f, "
           "\"pp_min\": %.2f, \"pp_max\": %.2f, \"tg_min\": %.2f, "
           "\"tg_max\": %.2f, \"load_s\": %.3f, \"peak_rss_mib\": %.1f, "
           "\"weight_bytes\": %zu, \"cpu\": \"%s\"}\n",
           name, tn_pool_size(s.pool), n_prompt, n_gen, pp_med,
           tg_med, pp[0], pp[reps - 1], tg[0], tg[reps - 1], s.load_s,
           (double)rss / 1024.0, s.model->weight_bytes,
           tn_cpu_level_name(tn_kernels_level()));
  } else {
    printf("model: %s, threads %d, kernels %s, load %.3f s, peak RSS %.1f MiB\n",
           s.model->name, tn_pool_size(s.pool),
           tn_cpu_level_name(tn_kernels_level()), s.load_s, (double)rss / 1024.0);
    if (n_prompt > 0)
      printf("pp%ld: %.2f tok/s (min %.2f, max %.2f)\n", n_prompt, pp_med,
             pp[0], pp[reps - 1]);
    if (n_gen > 0)
      printf("tg%ld: %.2f tok/s (min %.2f, max %.2f)\n", n_gen, tg_med, tg[0],
             tg[reps - 1]);
  }
  rc = 0;
done:
  free(ids);
  tn_session_close(&s);
  return rc;
}

/* ---- tern perplexity
 *
 * As llama-perplexity computes it: the text is split into chunks of n_ctx
 * tokens, the first token of each chunk replaced by BOS when the model adds
 * one, and only the second half of each chunk is scored (each position
 * then has at least n_ctx/2 tokens of context). */

int tn_cli_perplexity(int argc, char **argv) {
  const char *model = NULL, *file = NULL, *lora_path = NULL;
  float lora_scale = 1.0f;
  long n_ctx = 512, threads = 0;
  bool verbose = false;
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH", "model to score",
       NULL, NULL, 0},
      {"file", 'f', TN_OPT_STR, &file, 0, 0, "FILE", "text to score", NULL,
       NULL, 0},
      {"ctx-size", 'c', TN_OPT_INT, &n_ctx, 16, 1 << 16, "N",
       "tokens per chunk (the second half of each is scored)", NULL, NULL, 0},
      {"threads", 't', TN_OPT_INT, &threads, 1, TN_POOL_THREADS_MAX, "N", "compute threads",
       "physical cores", NULL, 0},
      {"lora", 0, TN_OPT_STR, &lora_path, 0, 0, "PATH",
       "score with this LoRA adapter applied (modular, as tern serve runs "
       "it)", NULL, NULL, 0},
      {"lora-scale", 0, TN_OPT_FLOAT, &lora_scale, -16, 16, "S",
       "the adapter's scale", "1", NULL, 0},
      TN_CLI_OPT_VERBOSE(&verbose),
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "perplexity", "tern perplexity -m MODEL -f FILE [options]",
      "Perplexity of a text as llama-perplexity computes it (chunks of -c "
      "tokens, BOS first, second halves scored).",
      "example:\n  tern perplexity -m smollm2-135m -f tests/fixtures/ref/ppl.txt -c 128",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (verbose) tn_log_set_level(TN_LOG_LEVEL_DEBUG);
  if (!model || !file) return tn_cli_fail("perplexity: -m MODEL and -f FILE are required");
  struct tn_error err = {0};
  char *text = NULL;
  size_t text_len = 0;
  if (tn_file_read(file, &text, &text_len, &err)) return tn_cli_fail("%s", err.msg);
  struct tn_session s;
  int32_t first = (int32_t)n_ctx / 2;
  if (tn_session_open(&s, model, (int)threads, (int32_t)n_ctx, (int32_t)n_ctx,
                      (int32_t)n_ctx, true)) {
    free(text);
    return 1;
  }
  int rc = 1;
  int32_t *ids = NULL, *tok = NULL, *pos = NULL, *seq = NULL;
  bool *lg = NULL;
  size_t n_ids = 0;
  struct tn_lora *lora = NULL;
  if (lora_path && tn_lora_load(s.model, lora_path, &lora, &err)) {
    tn_cli_fail("--lora: %s", err.msg);
    goto done;
  }
  const struct tn_lora *loras[1] = {lora};
  if (tn_tokenizer_encode(s.tok, text, text_len, true, false, &ids, &n_ids, &err)) {
    tn_cli_fail("%s", err.msg);
    goto done;
  }
  size_t n_chunks = n_ids / (size_t)n_ctx;
  if (n_chunks == 0) {
    tn_cli_fail("perplexity: %zu tokens are fewer than one chunk of %ld", n_ids, n_ctx);
    goto done;
  }
  int32_t bos = tn_tokenizer_bos(s.tok);
  bool add_bos = n_ids > 0 && bos >= 0 && ids[0] == bos;
  tok = malloc((size_t)n_ctx * sizeof(int32_t));
  pos = malloc((size_t)n_ctx * sizeof(int32_t));
  seq = calloc((size_t)n_ctx, sizeof(int32_t));
  lg = calloc((size_t)n_ctx, sizeof(bool));
  if (!tok || !pos || !seq || !lg) {
    tn_cli_fail("out of memory");
    goto done;
  }
  int32_t V = s.model->hp.n_vocab;
  double nll = 0.0, nll2 = 0.0;
  size_t count = 0;
  struct tn_kv_seq *seqs[1] = {&s.seq};
  for (size_t ch = 0; ch < n_chunks; ch++) {
    tn_kv_seq_truncate(s.kv, &s.seq, 0);
    if (tn_kv_seq_reserve(s.kv, &s.seq, (int32_t)n_ctx)) {
      tn_cli_fail("kv cache exhausted");
      goto done;
    }
    const int32_t *src = ids + ch * (size_t)n_ctx;
    for (int32_t j = 0; j < n_ctx; j++) {
      tok[j] = src[j];
      pos[j] = j;
      lg[j] = j >= first && j < n_ctx - 1;
    }
    if (add_bos) tok[0] = bos;
    struct tn_batch b = {.n_tokens = (int32_t)n_ctx, .token = tok, .pos = pos,
                         .seq = seq, .logits = lg, .n_seqs = 1, .seqs = seqs,
                         .lora = lora ? loras : NULL,
                         .lora_scale = &lora_scale};
    if (tn_model_forward(s.ctx, s.kv, &b, &err)) {
      tn_cli_fail("%s", err.msg);
      goto done;
    }
    const float *L = tn_ctx_logits(s.ctx);
    for (int32_t j = first; j < n_ctx - 1; j++) {
      const float *row = L + (size_t)(j - first) * (size_t)V;
      float mx = row[0];
      for (int32_t i = 1; i < V; i++) mx = row[i] > mx ? row[i] : mx;
      double sum = 0.0;
      for (int32_t i = 0; i < V; i++) sum += exp((double)(row[i] - mx));
      double lp = (double)(row[src[j + 1]] - mx) - log(sum);
      nll -= lp;
      nll2 += lp * lp;
      count++;
    }
    fprintf(stderr, "[%zu]%.4f%s", ch + 1, exp(nll / (double)count),
            ch + 1 == n_chunks ? "\n" : ",");
  }
  double mean = nll / (double)count;
  double var = nll2 / (double)count - mean * mean;
  double ppl = exp(mean);
  double err_ppl = count > 1 ? ppl * sqrt(var / (double)(count - 1)) : 0.0;
  printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl, err_ppl);
  rc = 0;
done:
  free(ids);
  free(tok);
  free(pos);
  free(seq);
  free(lg);
  free(text);
  tn_lora_release(lora);
  tn_session_close(&s);
  return rc;
}
