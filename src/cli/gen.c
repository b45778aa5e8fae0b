/*
 * gen.c: what `tern run` and `tern chat` share: the model and sampling
 * options, an engine opened for one user, and streaming one request's
 * text to the terminal.
 *
 * Generation goes through the serving engine (src/engine), the same
 * scheduler, sampler and stop logic as `tern serve`, so a prompt gives the
 * CLI exactly the text the API gives for the same request (tested). The
 * engine thread fills the request's text; this thread waits on a condition
 * variable that the engine's notify callback signals, prints what is new,
 * and cancels the request when SIGINT arrives (Ctrl-C stops the answer,
 * not the program: the caller decides what comes next).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli_internal.h"
#include "grammar/grammar.h"
#include "model/lora.h"
#include "server/config.h"

struct tn_cli_gen tn_cli_gen;

const struct tn_opt tn_cli_model_opts[] = {
    {"model", 'm', TN_OPT_STR, &tn_cli_gen.model, 0, 0, "NAME|PATH",
     "model: a short name (tern models) or a .gguf file", NULL, NULL, 0},
    {"threads", 't', TN_OPT_INT, &tn_cli_gen.threads, 1, TN_POOL_THREADS_MAX, "N",
     "compute threads", "physical cores", NULL, 0},
    {"ctx-size", 'c', TN_OPT_INT, &tn_cli_gen.n_ctx, 16, 1 << 20, "N",
     "context: prompt + output tokens", "the model's, at most 4096", NULL,
     0},
    {"spec", 0, TN_OPT_STR, &tn_cli_gen.spec, 0, 0, "METHOD",
     "speculative decoding: ngram (draft from earlier text), draft (a "
     "smaller model, --draft-model), self (some of the model's own layers, "
     "--spec-layers) or off",
     "off", NULL, 0},
    {"spec-layers", 0, TN_OPT_STR, &tn_cli_gen.spec_layers, 0, 0, "LIST",
     "the layers --spec self drafts with, as 0-11,14 (tern calibrate-self "
     "picks them)",
     "the first half and the last", NULL, 0},
    {"draft-model", 0, TN_OPT_STR, &tn_cli_gen.draft_model, 0, 0,
     "NAME|PATH", "draft model for --spec draft: same vocabulary, smaller",
     NULL, NULL, 0},
    {"draft-p-min", 0, TN_OPT_FLOAT, &tn_cli_gen.draft_p_min, 0, 1, "P",
     "a draft ends where the draft model's probability is below P", "0.3",
     NULL, 0},
    {"spec-max-tokens", 0, TN_OPT_INT, &tn_cli_gen.spec_max_tokens, 1,
     TN_SPEC_MAX_TOKENS, "K", "drafted tokens per step at most", NULL, NULL,
     0},
    {"spec-policy", 0, TN_OPT_STR, &tn_cli_gen.spec_policy, 0, 0, "cost|all",
     "which drafts to verify: those the cost model expects to pay, or all",
     "cost", NULL, 0},
    {"lora", 0, TN_OPT_STR, &tn_cli_gen.lora, 0, 0, "PATH",
     "a LoRA or (IA)3 adapter (PEFT directory or LoRA GGUF) on the model, "
     "as tern serve applies it", NULL, NULL, 0},
    {"lora-scale", 0, TN_OPT_FLOAT, &tn_cli_gen.lora_scale, -16, 16, "S",
     "the adapter's scale", "1", NULL, 0},
    {"chat-template", 0, TN_OPT_STR, &tn_cli_gen.chat_template, 0, 0,
     "NAME|FILE",
     "chat template instead of the model's own: chatml, gemma, llama3, or "
     "a Jinja file",
     "the model's", NULL, 0},
    {"verbose", 'v', TN_OPT_FLAG, &tn_cli_gen.verbose, 0, 0, NULL,
     "debug logging; print the seed and timings", NULL, NULL, 0},
    TN_CLI_OPT_HELP,
    {0},
};

const struct tn_opt tn_cli_sampling_opts[] = {
    {"n-predict", 'n', TN_OPT_INT, &tn_cli_gen.n_predict, -1, 1 << 24, "N",
     "tokens to generate at most (-1: until the end of text or context; "
     "0 is refused)",
     NULL, NULL, 0},
    {"temp", 0, TN_OPT_FLOAT, &tn_cli_gen.sampling.temperature, 0, 100, "T",
     "temperature (0: greedy)", NULL, NULL, 0},
    {"top-k", 0, TN_OPT_INT, &tn_cli_gen.top_k, 0, 1 << 24, "K",
     "keep the K most likely tokens (0: off)", NULL, NULL, 0},
    {"top-p", 0, TN_OPT_FLOAT, &tn_cli_gen.sampling.top_p, 1e-6, 1, "P",
     "nucleus sampling (1: off)", NULL, NULL, 0},
    {"min-p", 0, TN_OPT_FLOAT, &tn_cli_gen.sampling.min_p, 0, 1, "P",
     "drop tokens below P x the top probability (0: off)", NULL, NULL, 0},
    {"repeat-penalty", 0, TN_OPT_FLOAT, &tn_cli_gen.sampling.repeat_penalty,
     1e-3, 100, "R", "penalise recently seen tokens (1: off)", NULL, NULL,
     0},
    {"presence-penalty", 0, TN_OPT_FLOAT,
     &tn_cli_gen.sampling.presence_penalty, -2, 2, "P",
     "penalise tokens already generated", NULL, NULL, 0},
    {"frequency-penalty", 0, TN_OPT_FLOAT, &tn_cli_gen.sampling.freq_penalty,
     -2, 2, "F", "penalise tokens by how often they were generated", NULL,
     NULL, 0},
    {"seed", 's', TN_OPT_INT, &tn_cli_gen.seed, 0, 9007199254740991.0,
     "S", "random seed, for repeatable sampling", "random (shown with -v)",
     &tn_cli_gen.seed_given, 0},
    {"stop", 0, TN_OPT_LIST, &tn_cli_gen.stops, 0, TN_GEN_STOPS_MAX, "TEXT",
     "stop when the output contains TEXT (repeatable)", NULL, NULL, 0},
    {"ignore-eos", 0, TN_OPT_FLAG, &tn_cli_gen.ignore_eos, 0, 0, NULL,
     "never end at the end-of-text token", NULL, NULL, 0},
    {"json-schema", 0, TN_OPT_STR, &tn_cli_gen.json_schema, 0, 0, "FILE",
     "the output is JSON valid against this schema (docs/GRAMMAR.md)", NULL,
     NULL, 0},
    {"json", 0, TN_OPT_FLAG, &tn_cli_gen.json, 0, 0, NULL,
     "the output is a JSON object", NULL, NULL, 0},
    {"grammar", 0, TN_OPT_STR, &tn_cli_gen.grammar_file, 0, 0, "FILE",
     "the output follows this GBNF grammar", NULL, NULL, 0},
    {"regex", 0, TN_OPT_STR, &tn_cli_gen.regex, 0, 0, "RE",
     "the output matches this regular expression", NULL, NULL, 0},
    {"choice", 0, TN_OPT_LIST, &tn_cli_gen.choices, 0, TN_CLI_LIST_MAX,
     "TEXT", "the output is one of these (repeatable)", NULL, NULL, 0},
    {0},
};

void tn_cli_gen_init(void) {
  memset(&tn_cli_gen, 0, sizeof(tn_cli_gen));
  tn_sampling_default(&tn_cli_gen.sampling);
  /* llama.cpp's command-line defaults */
  tn_cli_gen.sampling.temperature = 0.8f;
  tn_cli_gen.sampling.top_p = 0.95f;
  tn_cli_gen.sampling.min_p = 0.05f;
  tn_cli_gen.top_k = 40;
  tn_cli_gen.n_predict = -1;
  tn_cli_gen.spec_max_tokens = 8;
  tn_cli_gen.draft_p_min = 0.3f;
  tn_cli_gen.lora_scale = 1.0f;
}

int tn_cli_spec_policy(const char *opt, const char *name, bool *all) {
  *all = false;
  if (!name || !strcmp(name, "cost")) return 0;
  if (!strcmp(name, "all")) {
    *all = true;
    return 0;
  }
  return tn_cli_fail("%s: '%s' is not a policy (cost or all)", opt, name);
}

int tn_cli_spec_method(const char *opt, const char *name,
                       enum tn_spec_method *out) {
  if (!name || !strcmp(name, "off")) {
    *out = TN_SPEC_OFF;
    return 0;
  }
  if (!strcmp(name, "ngram")) {
    *out = TN_SPEC_NGRAM;
    return 0;
  }
  if (!strcmp(name, "draft")) {
    *out = TN_SPEC_DRAFT;
    return 0;
  }
  if (!strcmp(name, "self")) {
    *out = TN_SPEC_SELF;
    return 0;
  }
  return tn_cli_fail("%s: unknown method '%s' (ngram, draft, self or off)",
                     opt, name);
}

int tn_cli_spec_setup(const char *opt, const char *spec, const char *draft,
                      const char *layers, struct tn_spec_config *sc,
                      char *pbuf, size_t cap) {
  if (tn_cli_spec_method(opt, spec, &sc->method)) return 1;
  if (draft && !spec) sc->method = TN_SPEC_DRAFT;
  if (layers && !spec) sc->method = TN_SPEC_SELF;
  if (layers && sc->method != TN_SPEC_SELF)
    return tn_cli_fail("spec layers '%s': only for self speculation, not "
                       "'%s'",
                       layers, spec);
  sc->layers = layers;
  if (sc->method != TN_SPEC_DRAFT) {
    if (draft)
      return tn_cli_fail("draft model '%s': only for draft speculation, not "
                         "'%s'",
                         draft, spec);
    return 0;
  }
  if (!draft)
    return tn_cli_fail("%s draft: name the draft model (--draft-model "
                       "NAME|PATH, or draft_model in --config)",
                       opt);
  sc->draft_model = tn_cli_model_path(draft, pbuf, cap);
  return sc->draft_model ? 0 : 1;
}

/* ---- SIGINT */

volatile sig_atomic_t tn_cli_interrupted;

static void on_sigint(int sig) {
  (void)sig;
  tn_cli_interrupted = 1;
}

void tn_cli_catch_sigint(void) {
  struct sigaction sa = {0};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0; /* no SA_RESTART: a blocked read returns EINTR */
  sigaction(SIGINT, &sa, NULL);
}

/* ---- the engine */

int tn_cli_engine_open(const char *cmd, bool chat, bool prefix_cache,
                       struct tn_engine **out) {
  struct tn_cli_gen *g = &tn_cli_gen;
  *out = NULL;
  if (g->verbose) tn_log_set_level(TN_LOG_LEVEL_DEBUG);
  if (!g->model)
    return tn_cli_fail("%s: -m MODEL is required (see 'tern models')", cmd);
  if (g->n_predict == 0)
    return tn_cli_fail("-n/--n-predict: 0 tokens would generate nothing; "
                       "give -1 (no limit) or a count");
  char pbuf[4096];
  const char *path = tn_cli_model_path(g->model, pbuf, sizeof(pbuf));
  if (!path) return 1;
  struct tn_engine_config cfg;
  tn_engine_config_default(&cfg);
  char name[128];
  const char *base = strrchr(g->model, '/');
  snprintf(name, sizeof(name), "%s", base ? base + 1 : g->model);
  cfg.name = name;
  cfg.n_threads = tn_cli_threads(g->threads);
  cfg.n_ctx = (int32_t)g->n_ctx;
  cfg.max_seqs = 1;
  cfg.step_tokens = 512;
  cfg.queue_max = 4;
  cfg.prefix_cache = prefix_cache;
  cfg.chat_template = g->chat_template;
  char dbuf[4096];
  if (tn_cli_spec_setup("--spec", g->spec, g->draft_model, g->spec_layers,
                        &cfg.spec, dbuf, sizeof(dbuf)))
    return 1;
  cfg.spec.max_tokens = (int32_t)g->spec_max_tokens;
  cfg.spec.draft_p_min = g->draft_p_min;
  if (tn_cli_spec_policy("--spec-policy", g->spec_policy,
                         &cfg.spec.every_draft))
    return 1;
  struct tn_error err = {0};
  double t0 = tn_time_s();
  if (tn_engine_open(path, &cfg, NULL, out, &err))
    return tn_cli_fail("%s: %s", path, err.msg);
  if (g->lora) {
    if (tn_adapters_load(tn_engine_adapters(*out), "cli", g->lora,
                         g->lora_scale, &err)) {
      tn_engine_close(*out);
      *out = NULL;
      return tn_cli_fail("--lora: %s", err.msg);
    }
    g->lora_handle = tn_adapters_get(tn_engine_adapters(*out), "cli", NULL);
  }
  struct tn_engine_info info;
  tn_engine_info(*out, &info);
  tn_log_debug("loaded %s (%s, %d layers, ctx %d, chat template %s) in %.2f "
               "s, %d threads",
               path, info.arch, info.n_layer, info.n_ctx, info.chat_template,
               tn_time_s() - t0, info.n_threads);
  if (chat && !tn_chat_available(tn_engine_tokenizer(*out))) {
    tn_engine_close(*out);
    *out = NULL;
    return tn_cli_fail(
        "%s has no chat template%s: it continues text rather than answering "
        "(%s), or choose one with --chat-template chatml|gemma|llama3|FILE",
        g->model, tn_cli_model_is_base(path) ? " (it is a base model)" : "",
        strcmp(cmd, "chat") == 0 ? "give it text with tern run"
                                 : "run it without --chat");
  }
  return 0;
}

void tn_cli_gen_done(void) {
  tn_grammar_release(tn_cli_gen.grammar);
  tn_cli_gen.grammar = NULL;
  tn_lora_release(tn_cli_gen.lora_handle);
  tn_cli_gen.lora_handle = NULL;
}

/* The grammar of --json-schema, --json, --grammar, --regex or --choice. */
static int gen_grammar(struct tn_cli_gen *g) {
  int n = (g->json_schema != NULL) + g->json + (g->grammar_file != NULL) +
          (g->regex != NULL) + (g->choices.n > 0);
  if (n == 0 || g->grammar) return 0;
  if (n > 1)
    return tn_cli_fail("--json-schema, --json, --grammar, --regex and "
                       "--choice: give one");
  struct tn_error err = {0};
  enum tn_status st;
  const char *opt;
  if (g->json) {
    opt = "--json";
    st = tn_grammar_from_json_schema(NULL, 0, &g->grammar, &err);
  } else if (g->regex) {
    opt = "--regex";
    st = tn_grammar_from_regex(g->regex, strlen(g->regex), &g->grammar, &err);
  } else if (g->choices.n) {
    opt = "--choice";
    size_t lens[TN_CLI_LIST_MAX];
    for (int i = 0; i < g->choices.n; i++) lens[i] = strlen(g->choices.v[i]);
    st = tn_grammar_from_choices(g->choices.v, lens, (size_t)g->choices.n,
                                 &g->grammar, &err);
  } else {
    opt = g->json_schema ? "--json-schema" : "--grammar";
    const char *path = g->json_schema ? g->json_schema : g->grammar_file;
    char *text = NULL;
    size_t len = 0;
    if (tn_file_read(path, &text, &len, &err) != TN_OK)
      return tn_cli_fail("%s %s: %s", opt, path, err.msg);
    st = g->json_schema
             ? tn_grammar_from_json_schema(text, len, &g->grammar, &err)
             : tn_grammar_from_gbnf(text, len, &g->grammar, &err);
    free(text);
  }
  return st == TN_OK ? 0 : tn_cli_fail("%s: %s", opt, err.msg);
}

int tn_cli_gen_params(struct tn_gen_params *gp) {
  struct tn_cli_gen *g = &tn_cli_gen;
  tn_gen_params_default(gp);
  gp->sampling = g->sampling;
  gp->sampling.top_k = (int32_t)g->top_k;
  if (!g->seed_given) {
    uint64_t s;
    if (getrandom(&s, sizeof(s), 0) != (ssize_t)sizeof(s)) s = tn_time_ns();
    g->seed = (long)(s >> 11); /* 53 bits: the range --seed takes */
    g->seed_given = true;
    tn_log_debug("seed %ld (repeat with --seed %ld)", g->seed, g->seed);
  }
  gp->sampling.seed = (uint64_t)g->seed;
  gp->max_tokens = g->n_predict < 0 ? 0 : (int32_t)g->n_predict;
  gp->ignore_eos = g->ignore_eos;
  gp->stops = g->stops.v;
  gp->n_stops = g->stops.n;
  if (gen_grammar(g)) return 1;
  gp->grammar = g->grammar;
  gp->lora = g->lora_handle;
  gp->lora_scale = g->lora_scale;
  return 0;
}

/* ---- streaming one request */

/* The engine's notify callback runs with the request's lock held and
 * takes mu: lock order request lock, then mu. This thread never holds mu
 * while taking the request's lock. */
struct waiter {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool news; /* guarded by mu */
};

static void on_news(void *user) {
  struct waiter *w = user;
  pthread_mutex_lock(&w->mu);
  w->news = true;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

int tn_cli_stream(struct tn_engine *e, const int32_t *ids, size_t n_ids,
                  const struct tn_gen_params *gp, FILE *out,
                  struct tn_cli_stream_result *res) {
  memset(res, 0, sizeof(*res));
  struct waiter w = {.news = false};
  pthread_mutex_init(&w.mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&w.cv, &ca);
  pthread_condattr_destroy(&ca);
  struct tn_error err = {0};
  struct tn_req *r = NULL;
  int rc = 1;
  if (n_ids > (size_t)INT32_MAX) n_ids = (size_t)INT32_MAX;
  if (tn_engine_submit(e, ids, (int32_t)n_ids, gp, on_news, &w, &r, &err)) {
    tn_cli_fail("%s", err.msg);
    goto done;
  }
  size_t shown = 0;
  bool cancelled = false;
  for (;;) {
    pthread_mutex_lock(&w.mu);
    while (!w.news && !(tn_cli_interrupted && !cancelled)) {
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      ts.tv_nsec += 100 * 1000 * 1000;
      if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&w.cv, &w.mu, &ts);
    }
    w.news = false;
    pthread_mutex_unlock(&w.mu);
    if (tn_cli_interrupted && !cancelled) {
      tn_req_cancel(r);
      cancelled = true;
    }
    tn_req_lock(r);
    const struct tn_choice *c = &r->choices[0];
    size_t len = c->len;
    bool done = r->done;
    /* The text buffer only grows; what is below len stays put while we
     * hold the lock, and we copy out under it. */
    if (len > shown) {
      tn_buf_append(&res->text, c->text + shown, len - shown);
      fwrite(c->text + shown, 1, len - shown, out);
      fflush(out);
      shown = len;
    }
    if (done) {
      res->finish = c->finish;
      res->n_prompt = r->n_prompt;
      res->n_cached = r->n_cached;
      res->n_gen = c->n_gen;
      res->n_drafted = c->n_drafted;
      res->n_accepted = c->n_accepted;
      res->t_submit = r->t_submit;
      res->t_first = r->t_first;
      res->t_done = r->t_done;
      if (c->finish == TN_FINISH_ERROR)
        snprintf(res->error, sizeof(res->error), "%s", r->error);
    }
    tn_req_unlock(r);
    if (done) break;
  }
  rc = res->finish == TN_FINISH_ERROR ? tn_cli_fail("%s", res->error) : 0;
done:
  if (r) tn_req_release(r);
  pthread_cond_destroy(&w.cv);
  pthread_mutex_destroy(&w.mu);
  return rc;
}

void tn_cli_print_timings(const struct tn_cli_stream_result *res) {
  double pp = res->t_first > res->t_submit ? res->t_first - res->t_submit : 0;
  double tg = res->t_done > res->t_first ? res->t_done - res->t_first : 0;
  int32_t n_pp = res->n_prompt - res->n_cached;
  char spec[96] = "";
  if (res->n_drafted > 0)
    snprintf(spec, sizeof(spec), "; drafted %d, accepted %d (%.0f%%)",
             res->n_drafted, res->n_accepted,
             100.0 * res->n_accepted / res->n_drafted);
  fprintf(stderr,
          "tern: prompt %d tokens (%d cached) in %.3f s (%.1f tok/s), "
          "generated %d tokens in %.3f s (%.1f tok/s)%s\n",
          res->n_prompt, res->n_cached, pp, pp > 0 ? n_pp / pp : 0.0,
          res->n_gen, tg, tg > 0 && res->n_gen > 1 ? (res->n_gen - 1) / tg : 0.0,
          spec);
}

/* ---- prompts from -p, -p - (stdin) or -f FILE */

int tn_cli_read_prompt(const char *p, const char *file, char **out,
                       size_t *len) {
  *out = NULL;
  *len = 0;
  if (p && file) return tn_cli_fail("give the prompt once: -p TEXT, -p - or -f FILE");
  if (file) {
    /* a stream, not only a regular file: -f /dev/stdin, a pipe, a fifo */
    FILE *f = fopen(file, "rb");
    if (!f) return tn_cli_fail("-f/--file: '%s': %s", file, strerror(errno));
    int rc = tn_cli_read_stream(f, "-f/--file", out, len);
    fclose(f);
    return rc;
  }
  if (!p) return tn_cli_fail("a prompt is required: -p TEXT, -p - (stdin) or -f FILE");
  if (strcmp(p, "-") != 0) {
    *len = strlen(p);
    *out = malloc(*len + 1);
    if (!*out) return tn_cli_fail("out of memory");
    memcpy(*out, p, *len + 1);
    return 0;
  }
  return tn_cli_read_stream(stdin, "-p - (stdin)", out, len);
}
