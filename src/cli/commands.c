/*
 * commands.c: tern run, tokenize, bench and perplexity.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/cli.h"

/* Parses a whole integer / float argument or fails naming the option. */
bool tn_cli_parse_int(const char *opt, const char *s, long lo, long hi,
                      long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) {
    tn_cli_fail("%s: '%s' is not an integer in [%ld, %ld]", opt, s, lo, hi);
    return false;
  }
  *out = v;
  return true;
}

static bool parse_float(const char *opt, const char *s, float *out) {
  char *end;
  errno = 0;
  float v = strtof(s, &end);
  if (errno || end == s || *end || !isfinite(v)) {
    tn_cli_fail("%s: '%s' is not a number", opt, s);
    return false;
  }
  *out = v;
  return true;
}

enum {
  OPT_TEMP = 1000,
  OPT_SEED,
  OPT_TOP_K,
  OPT_TOP_P,
  OPT_MIN_P,
  OPT_REPEAT,
  OPT_STOP,
  OPT_CHAT,
  OPT_SYSTEM,
  OPT_JSON,
  OPT_IGNORE_EOS,
};

/* ---- tern run */

int tn_cli_run(int argc, char **argv) {
  static const struct option opts[] = {
      {"model", required_argument, 0, 'm'},
      {"prompt", required_argument, 0, 'p'},
      {"n-predict", required_argument, 0, 'n'},
      {"threads", required_argument, 0, 't'},
      {"ctx-size", required_argument, 0, 'c'},
      {"verbose", no_argument, 0, 'v'},
      {"temp", required_argument, 0, OPT_TEMP},
      {"seed", required_argument, 0, OPT_SEED},
      {"top-k", required_argument, 0, OPT_TOP_K},
      {"top-p", required_argument, 0, OPT_TOP_P},
      {"min-p", required_argument, 0, OPT_MIN_P},
      {"repeat-penalty", required_argument, 0, OPT_REPEAT},
      {"stop", required_argument, 0, OPT_STOP},
      {"chat", no_argument, 0, OPT_CHAT},
      {"system", required_argument, 0, OPT_SYSTEM},
      {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
      {0, 0, 0, 0}};
  const char *model = NULL, *prompt = NULL, *system = NULL;
  const char *stops[16];
  size_t n_stops = 0;
  long n_predict = 128, threads = 0, n_ctx = 0, v;
  bool chat = false, ignore_eos = false;
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.repeat_penalty = 1.0f;
  sp.temperature = 0.8f;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:p:n:t:c:v", opts, NULL)) != -1) {
    switch (c) {
      case 'm': model = optarg; break;
      case 'p': prompt = optarg; break;
      case 'n': if (!tn_cli_parse_int("-n", optarg, -1, 1 << 20, &n_predict)) return 1; break;
      case 't': if (!tn_cli_parse_int("-t", optarg, 1, 256, &threads)) return 1; break;
      case 'c': if (!tn_cli_parse_int("-c", optarg, 8, 1 << 20, &n_ctx)) return 1; break;
      case 'v': tn_log_set_level(TN_LOG_LEVEL_DEBUG); break;
      case OPT_TEMP: if (!parse_float("--temp", optarg, &sp.temperature)) return 1; break;
      case OPT_SEED:
        if (!tn_cli_parse_int("--seed", optarg, 0, 0x7fffffffL, &v)) return 1;
        sp.seed = (uint64_t)v;
        break;
      case OPT_TOP_K:
        if (!tn_cli_parse_int("--top-k", optarg, 0, 1 << 24, &v)) return 1;
        sp.top_k = (int32_t)v;
        break;
      case OPT_TOP_P: if (!parse_float("--top-p", optarg, &sp.top_p)) return 1; break;
      case OPT_MIN_P: if (!parse_float("--min-p", optarg, &sp.min_p)) return 1; break;
      case OPT_REPEAT: if (!parse_float("--repeat-penalty", optarg, &sp.repeat_penalty)) return 1; break;
      case OPT_STOP:
        if (n_stops == TN_ARRAY_LEN(stops)) return tn_cli_fail("too many --stop strings (max 16)");
        stops[n_stops++] = optarg;
        break;
      case OPT_CHAT: chat = true; break;
      case OPT_SYSTEM: system = optarg; chat = true; break;
      case OPT_IGNORE_EOS: ignore_eos = true; break;
      default: return 2;
    }
  }
  if (!model) return tn_cli_fail("run: -m MODEL is required");
  if (!prompt) return tn_cli_fail("run: -p PROMPT is required");
  struct tn_error err = {0};
  struct tn_session s;
  if (tn_session_open(&s, model, (int)threads, (int32_t)n_ctx, 512, 1, true))
    return 1;
  int rc = 1;
  struct tn_sampler *smp = NULL;
  int32_t *ids = NULL;
  size_t n_ids = 0;
  char *text = NULL, *formatted = NULL;
  size_t text_len = 0, text_cap = 0, emitted = 0;

  const char *input = prompt;
  size_t input_len = strlen(prompt);
  if (chat) {
    struct tn_chat_msg msgs[2];
    size_t n_msgs = 0;
    if (system) msgs[n_msgs++] = (struct tn_chat_msg){"system", system, strlen(system)};
    msgs[n_msgs++] = (struct tn_chat_msg){"user", prompt, strlen(prompt)};
    if (tn_chat_format(s.tok, msgs, n_msgs, true, &formatted, &input_len, &err)) {
      tn_cli_fail("%s", err.msg);
      goto done;
    }
    input = formatted;
  }
  if (tn_tokenizer_encode(s.tok, input, input_len, true, chat, &ids, &n_ids, &err)) {
    tn_cli_fail("%s", err.msg);
    goto done;
  }
  if (n_ids == 0) {
    tn_cli_fail("run: the prompt is empty after tokenization");
    goto done;
  }
  if (n_predict < 0 || (long)n_ids + n_predict > s.n_ctx)
    n_predict = s.n_ctx - (long)n_ids;
  if (n_predict < 0) {
    tn_cli_fail("run: prompt of %zu tokens does not fit the context of %d",
                n_ids, s.n_ctx);
    goto done;
  }
  if (tn_sampler_new(&sp, s.model->hp.n_vocab, &smp, &err)) {
    tn_cli_fail("%s", err.msg);
    goto done;
  }
  tn_sampler_add_prompt(smp, ids, n_ids);
  double t0 = tn_time_s();
  if (tn_session_eval(&s, ids, (int32_t)n_ids, true)) goto done;
  double t1 = tn_time_s();
  struct tn_detok dt;
  tn_detok_init(&dt, s.tok, false);
  long n_gen = 0;
  bool stopped = false;
  size_t piece_cap = tn_detok_cap(s.tok);
  char *piece = malloc(piece_cap);
  if (!piece) {
    tn_cli_fail("out of memory");
    goto done;
  }
  for (; n_gen < n_predict && !stopped; n_gen++) {
    float *logits = (float *)tn_ctx_logits(s.ctx);
    struct tn_sample_out so;
    tn_sampler_sample(smp, logits, &so);
    if (!ignore_eos && tn_tokenizer_is_eog(s.tok, so.id)) break;
    size_t pn = tn_detok_push(&dt, so.id, piece, piece_cap);
    if (text_len + pn + 1 > text_cap) {
      text_cap = (text_len + pn + 1) * 2;
      char *nt = realloc(text, text_cap);
      if (!nt) {
        free(piece);
        tn_cli_fail("out of memory");
        goto done;
      }
      text = nt;
    }
    memcpy(text + text_len, piece, pn);
    text_len += pn;
    struct tn_stop_match sm = tn_stop_scan(text, text_len, stops, n_stops);
    if (sm.emit_len > emitted) {
      fwrite(text + emitted, 1, sm.emit_len - emitted, stdout);
      fflush(stdout);
      emitted = sm.emit_len;
    }
    if (sm.hit) {
      stopped = true;
      n_gen++;
      break;
    }
    if (n_gen + 1 < n_predict) {
      int32_t id = so.id;
      if (tn_session_eval(&s, &id, 1, true)) {
        free(piece);
        goto done;
      }
    }
  }
  free(piece);
  if (!stopped) {
    char tail[64];
    size_t tn = tn_detok_flush(&dt, tail, sizeof(tail));
    fwrite(text ? text + emitted : "", 1, text ? text_len - emitted : 0, stdout);
    fwrite(tail, 1, tn, stdout);
  }
  fputc('\n', stdout);
  fflush(stdout); /* the text before the timing line on stderr */
  double t2 = tn_time_s();
  tn_log_info("prompt %zu tokens in %.3f s (%.1f tok/s), generated %ld tokens "
              "in %.3f s (%.1f tok/s)",
              n_ids, t1 - t0, (double)n_ids / (t1 - t0), n_gen, t2 - t1,
              n_gen > 0 ? (double)n_gen / (t2 - t1) : 0.0);
  rc = 0;
done:
  tn_sampler_free(smp);
  free(ids);
  free(text);
  free(formatted);
  tn_session_close(&s);
  return rc;
}

/* ---- tern tokenize */

int tn_cli_tokenize(int argc, char **argv) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {0, 0, 0, 0}};
  const char *model = NULL;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:", opts, NULL)) != -1) {
    if (c == 'm')
      model = optarg;
    else
      return 2;
  }
  if (!model) return tn_cli_fail("tokenize: -m MODEL is required");
  /* Read all of stdin, any bytes. */
  size_t len = 0, cap = 1 << 16;
  char *buf = malloc(cap);
  if (!buf) return tn_cli_fail("out of memory");
  for (;;) {
    if (len == cap) {
      char *nb = cap < ((size_t)1 << 30) ? realloc(buf, cap * 2) : NULL;
      if (!nb) {
        free(buf);
        return tn_cli_fail("tokenize: input too large");
      }
      buf = nb;
      cap *= 2;
    }
    size_t r = fread(buf + len, 1, cap - len, stdin);
    if (r == 0) break;
    len += r;
  }
  struct tn_error err = {0};
  char pbuf[1024];
  struct tn_gguf *g = NULL;
  struct tn_tokenizer *tok = NULL;
  int rc = 1;
  int32_t *ids = NULL;
  size_t n = 0;
  const char *path = tn_cli_model_path(model, pbuf, sizeof(pbuf));
  if (tn_gguf_open(path, &g, &err)) {
    tn_cli_fail("%s: %s", path, err.msg);
    goto done;
  }
  if (tn_tokenizer_load(g, &tok, &err) ||
      tn_tokenizer_encode(tok, buf, len, true, true, &ids, &n, &err)) {
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
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"threads", required_argument, 0, 't'},
                                       {"n-prompt", required_argument, 0, 'p'},
                                       {"n-gen", required_argument, 0, 'n'},
                                       {"repetitions", required_argument, 0, 'r'},
                                       {"json", no_argument, 0, OPT_JSON},
                                       {0, 0, 0, 0}};
  const char *model = NULL;
  long threads = 0, n_prompt = 512, n_gen = 128, reps = 3;
  bool json = false;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:t:p:n:r:", opts, NULL)) != -1) {
    switch (c) {
      case 'm': model = optarg; break;
      case 't': if (!tn_cli_parse_int("-t", optarg, 1, 256, &threads)) return 1; break;
      case 'p': if (!tn_cli_parse_int("-p", optarg, 0, 1 << 16, &n_prompt)) return 1; break;
      case 'n': if (!tn_cli_parse_int("-n", optarg, 0, 1 << 16, &n_gen)) return 1; break;
      case 'r': if (!tn_cli_parse_int("-r", optarg, 1, 100, &reps)) return 1; break;
      case OPT_JSON: json = true; break;
      default: return 2;
    }
  }
  if (!model) return tn_cli_fail("bench: -m MODEL is required");
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
      tn_kv_seq_truncate(&s.kv, &s.seq, 0);
      double t0 = tn_time_s();
      if (tn_session_eval(&s, ids, (int32_t)n_prompt, true)) goto done;
      pp[r] = (double)n_prompt / (tn_time_s() - t0);
    }
    if (n_gen > 0) {
      tn_kv_seq_truncate(&s.kv, &s.seq, 0);
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
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"file", required_argument, 0, 'f'},
                                       {"ctx-size", required_argument, 0, 'c'},
                                       {"threads", required_argument, 0, 't'},
                                       {0, 0, 0, 0}};
  const char *model = NULL, *file = NULL;
  long n_ctx = 512, threads = 0;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:f:c:t:", opts, NULL)) != -1) {
    switch (c) {
      case 'm': model = optarg; break;
      case 'f': file = optarg; break;
      case 'c': if (!tn_cli_parse_int("-c", optarg, 16, 1 << 16, &n_ctx)) return 1; break;
      case 't': if (!tn_cli_parse_int("-t", optarg, 1, 256, &threads)) return 1; break;
      default: return 2;
    }
  }
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
    tn_kv_seq_truncate(&s.kv, &s.seq, 0);
    if (tn_kv_seq_reserve(&s.kv, &s.seq, (int32_t)n_ctx)) {
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
                         .seq = seq, .logits = lg, .n_seqs = 1, .seqs = seqs};
    if (tn_model_forward(s.ctx, &s.kv, &b, &err)) {
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
  tn_session_close(&s);
  return rc;
}
