/*
 * serve.c: `tern serve`, the OpenAI-compatible server.
 *
 *   tern serve -m MODEL [--host 127.0.0.1] [--port 8080] [--threads N]
 *              [--ctx N] [--max-seqs N] [--kv-mem SIZE] [--api-key KEY]
 *              [--config FILE.yaml] ...
 *
 * Loads each model into its own engine, starts the HTTP server, and waits
 * for SIGTERM/SIGINT. Then /ready turns 503 and new requests get 503;
 * running ones get --drain-timeout seconds to finish, the rest are
 * cancelled, and tern exits 0.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli_internal.h"
#include "obs/obs.h"
#include "router/router.h"
#include "server/config.h"
#include "server/server.h"
#include "server/shadow.h"

static volatile sig_atomic_t g_signal;

static void on_signal(int sig) { g_signal = sig; }

/* The name clients use for a model given as a path or short name. */
static void default_name(const char *arg, char *out, size_t cap) {
  const char *base = strrchr(arg, '/');
  base = base ? base + 1 : arg;
  size_t n = strlen(base);
  if (n > 5 && !strcmp(base + n - 5, ".gguf")) n -= 5;
  if (n >= cap) n = cap - 1;
  memcpy(out, base, n);
  out[n] = '\0';
}

/* The adapters --lora or the config gives a model, loaded before the
 * model takes requests. */
static int load_adapters(struct tn_engine *e, const char *model,
                         const struct tn_serve_model_cfg *mc,
                         const struct tn_cli_list *loras) {
  struct tn_adapters *a = tn_engine_adapters(e);
  struct tn_error err = {0};
  int n = mc ? mc->n_adapters : loras->n;
  for (int i = 0; i < n; i++) {
    char name[TN_ADAPTER_NAME_MAX + 2];
    const char *path;
    float scale = 1.0f;
    if (mc) {
      snprintf(name, sizeof(name), "%s", mc->adapters[i].name);
      path = mc->adapters[i].path;
      scale = mc->adapters[i].scale;
    } else {
      const char *eq = strchr(loras->v[i], '=');
      snprintf(name, sizeof(name), "%.*s",
               (int)TN_MIN((size_t)(eq - loras->v[i]), sizeof(name) - 1),
               loras->v[i]);
      path = eq + 1;
      if (!strcmp(name, model))
        return tn_cli_fail("--lora %s: the adapter is named like its model",
                           name);
    }
    double t0 = tn_time_s();
    if (tn_adapters_load(a, name, path, scale, &err))
      return tn_cli_fail("adapter '%s': %s", name, err.msg);
    tn_log_info("adapter '%s' on '%s': %s in %.0f ms", name, model, path,
                (tn_time_s() - t0) * 1e3);
  }
  return 0;
}

/* ---- classifier routes: their examples embedded once at start */

/* The engine's notify (under a request's lock) bumps gen; the waiter
 * never holds mu while it takes a request's lock, so the two orders
 * never meet. */
struct embed_wait {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  unsigned gen;
};

static void embed_notify(void *user) {
  struct embed_wait *w = user;
  pthread_mutex_lock(&w->mu);
  w->gen++;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

/* Embeds route's examples with its model, a window of requests at a time
 * (the engine batches them), and hands the vectors to the router. */
static int embed_examples(struct tn_router *router, int route,
                          const struct tn_serve_config *file,
                          struct tn_engine **engines) {
  const char *mname = NULL;
  bool last = false;
  tn_router_classifier(router, route, &mname, &last);
  int mi = mname ? tn_serve_config_find(file, mname) : 0;
  if (mi < 0) mi = 0;
  struct tn_engine *e = engines[mi];
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  int n = tn_router_n_examples(router, route), d = info.n_embd;
  float *vecs = malloc((size_t)n * (size_t)d * sizeof(float));
  if (!vecs) return tn_cli_fail("out of memory");
  struct embed_wait w = {.gen = 0};
  pthread_mutex_init(&w.mu, NULL);
  pthread_cond_init(&w.cv, NULL);
  struct tn_gen_params gen;
  tn_gen_params_default(&gen);
  gen.embed = last ? TN_EMBED_LAST : TN_EMBED_MEAN;
  int rc = 0;
  double t0 = tn_time_s();
  enum { WINDOW = 32 };
  for (int at = 0; at < n && !rc; at += WINDOW) {
    struct tn_req *reqs[WINDOW] = {0};
    int m = TN_MIN(WINDOW, n - at);
    for (int i = 0; i < m && !rc; i++) {
      const char *text = tn_router_example(router, route, at + i);
      int32_t *ids = NULL;
      size_t n_ids = 0;
      struct tn_error err = {0};
      if (tn_engine_encode_text(e, text, strlen(text), &ids, &n_ids, &err) ==
          TN_OK) {
        if (n_ids >= (size_t)info.n_ctx) n_ids = (size_t)info.n_ctx - 1;
        if (tn_engine_submit(e, ids, (int32_t)n_ids, &gen, embed_notify, &w,
                             &reqs[i], &err) != TN_OK)
          reqs[i] = NULL;
      }
      if (!reqs[i])
        rc = tn_cli_fail("route '%s': example %d: %s",
                         tn_router_route_name(router, route), at + i, err.msg);
      free(ids);
    }
    for (int i = 0; i < m; i++) {
      if (!reqs[i]) continue;
      for (;;) {
        pthread_mutex_lock(&w.mu);
        unsigned seen = w.gen;
        pthread_mutex_unlock(&w.mu);
        tn_req_lock(reqs[i]);
        bool done = reqs[i]->done;
        tn_req_unlock(reqs[i]);
        if (done || g_signal) break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) {
          ts.tv_sec++;
          ts.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&w.mu);
        while (w.gen == seen &&
               pthread_cond_timedwait(&w.cv, &w.mu, &ts) == 0) {
        }
        pthread_mutex_unlock(&w.mu);
      }
      tn_req_lock(reqs[i]);
      if (reqs[i]->embedding && reqs[i]->n_embd == d)
        memcpy(vecs + (size_t)(at + i) * (size_t)d, reqs[i]->embedding,
               (size_t)d * sizeof(float));
      else if (!rc)
        rc = tn_cli_fail("route '%s': example %d could not be embedded",
                         tn_router_route_name(router, route), at + i);
      tn_req_unlock(reqs[i]);
      tn_req_release(reqs[i]);
    }
  }
  struct tn_error err = {0};
  if (!rc && tn_router_set_vectors(router, route, vecs, n, d, &err))
    rc = tn_cli_fail("%s", err.msg);
  if (!rc)
    tn_log_info("route '%s': %d examples embedded in %.2f s",
                tn_router_route_name(router, route), n, tn_time_s() - t0);
  free(vecs);
  pthread_cond_destroy(&w.cv);
  pthread_mutex_destroy(&w.mu);
  return rc;
}

int tn_cli_serve(int argc, char **argv) {
  const char *model = NULL, *config = NULL, *name = NULL, *host = NULL;
  const char *chat_template = NULL, *spec = NULL, *spec_policy = NULL;
  const char *spec_layers = NULL;
  const char *draft_model = NULL, *adapter_dir = NULL;
  const char *api_key = getenv("TERN_API_KEY");
  struct tn_server_config scfg;
  tn_server_config_default(&scfg);
  struct tn_engine_config ecfg;
  tn_engine_config_default(&ecfg);
  ecfg.decode_slowdown = 2.0f;
  long threads = 0, port = scfg.port, n_ctx = 0, max_seqs = ecfg.max_seqs;
  long step = ecfg.step_tokens, queue = ecfg.queue_max, drain_s = 30;
  long spread = 8;
  long spec_k = 8, max_loras = 0;
  int64_t kv_mem = 0, max_body = (int64_t)scfg.max_body, adapter_mem = 0;
  bool port_given = false, host_given = false, threads_given = false;
  bool no_prefix = false, verbose = false, log_content = false;
  bool merge = false;
  const char *log_db = NULL;
  double log_days = 30;
  float price_prompt = -1, price_cached = -1, price_completion = -1;
  float price_compute = -1;
  struct tn_cli_list redact = {0}, otlp_headers = {0}, loras = {0};
  const char *otlp = NULL, *otlp_service = "tern";
  float otlp_sample = 1;
  long log_rows = 10000000;
  const struct tn_opt model_opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH",
       "model: a short name (tern models) or a .gguf file", NULL, NULL, 0},
      {"name", 0, TN_OPT_STR, &name, 0, 0, "NAME",
       "the model name clients send", "the short name or file name", NULL,
       0},
      {"config", 0, TN_OPT_STR, &config, 0, 0, "FILE",
       "YAML file: several models with aliases (README)", NULL, NULL, 0},
      {"chat-template", 0, TN_OPT_STR, &chat_template, 0, 0, "NAME|FILE",
       "chat template instead of the model's own: chatml, gemma, llama3, "
       "or a Jinja file",
       "the model's", NULL, 0},
      {"lora", 0, TN_OPT_LIST, &loras, 0, 256, "NAME=PATH",
       "a LoRA adapter on the model (a PEFT directory or a LoRA GGUF), "
       "chosen per request by \"model\": \"NAME\" (repeatable; --config: "
       "adapters per model)",
       NULL, NULL, 0},
      {"merge", 0, TN_OPT_FLAG, &merge, 0, 0, NULL,
       "fold the one --lora adapter into the weights at load (no per-token "
       "cost; the model answers to the adapter's name too)",
       NULL, NULL, 0},
      {"max-loras", 0, TN_OPT_INT, &max_loras, 0, TN_ADAPTERS_PER_STEP_MAX,
       "N", "distinct adapters in a model's running batch; a request on "
       "another waits its turn (0: no limit; --config: max_loras)",
       NULL, NULL, 0},
      {"adapter-mem", 0, TN_OPT_SIZE, &adapter_mem, 0, 0, "SIZE",
       "memory for resident adapters per model: past it the least recently "
       "used one no request holds is evicted, and read again when asked "
       "for (--config: adapter_mem)",
       "no limit", NULL, 0},
      {"adapter-dir", 0, TN_OPT_STR, &adapter_dir, 0, 0, "DIR",
       "adapters may be loaded while serving from inside DIR only: POST "
       "/v1/load_lora_adapter, or a request naming DIR/NAME or "
       "DIR/NAME.gguf",
       "off", NULL, 0},
      {0},
  };
  const struct tn_opt http_opts[] = {
      {"host", 0, TN_OPT_STR, &host, 0, 0, "ADDR", "listen address",
       "127.0.0.1", &host_given, 0},
      {"port", 0, TN_OPT_INT, &port, 0, 65535, "N",
       "port (0 picks a free one)", NULL, &port_given, 0},
      {"api-key", 0, TN_OPT_STR, &api_key, 0, 0, "KEY",
       "require 'Authorization: Bearer KEY' (or set TERN_API_KEY)", "none",
       NULL, 0},
      {"max-body", 0, TN_OPT_SIZE, &max_body, 0, 0, "SIZE",
       "largest request body", "8MiB", NULL, 0},
      {"queue", 0, TN_OPT_INT, &queue, 1, 1 << 20, "N",
       "waiting requests per model before 429", NULL, NULL, 0},
      {"drain-timeout", 0, TN_OPT_INT, &drain_s, 0, 86400, "S",
       "seconds running requests get on SIGTERM", NULL, NULL, 0},
      {0},
  };
  const struct tn_opt log_opts[] = {
      {"log-db", 0, TN_OPT_STR, &log_db, 0, 0, "PATH",
       "request log: one SQLite row per API request (tern logs reads it)",
       "off", NULL, 0},
      {"log-content", 0, TN_OPT_FLAG, &log_content, 0, 0, NULL,
       "also store each request body and its first answer in the log", NULL,
       NULL, 0},
      {"log-redact", 0, TN_OPT_LIST, &redact, 0, 16, "PATTERN",
       "with --log-content, replace matches in the stored text with "
       "[REDACTED]: email, phone, card, ipv4, secret, or a PCRE2 pattern "
       "(repeatable)",
       NULL, NULL, 0},
      {"log-max-age", 0, TN_OPT_FLOAT, &log_days, 0, 36500, "DAYS",
       "delete log rows older than this (0: keep)", NULL, NULL, 0},
      {"log-max-rows", 0, TN_OPT_INT, &log_rows, 0, (long)1e12, "N",
       "keep at most N rows, the newest (0: no limit)", NULL, NULL, 0},
      {"otlp-endpoint", 0, TN_OPT_STR, &otlp, 0, 0, "URL",
       "export one trace per request over OTLP/HTTP (JSON) to URL, e.g. "
       "http://localhost:4318/v1/traces; a client's traceparent is honoured",
       "off", NULL, 0},
      {"otlp-header", 0, TN_OPT_LIST, &otlp_headers, 0, 16, "'NAME: VALUE'",
       "a header for every export, e.g. 'x-mlflow-experiment-id: 0' "
       "(repeatable)",
       NULL, NULL, 0},
      {"otlp-service", 0, TN_OPT_STR, &otlp_service, 0, 0, "NAME",
       "the traces' service.name", NULL, NULL, 0},
      {"otlp-sample", 0, TN_OPT_FLOAT, &otlp_sample, 0, 1, "SHARE",
       "share of requests traced when the client sent no traceparent", NULL,
       NULL, 0},
      {"price-prompt", 0, TN_OPT_FLOAT, &price_prompt, 0, 1e6, "USD",
       "per million prompt tokens: the cost in the log and dashboard "
       "(--config: price_prompt per model)",
       "none", NULL, 0},
      {"price-compute", 0, TN_OPT_FLOAT, &price_compute, 0, 1e6, "USD",
       "per hour of this machine: a request also costs its share of the "
       "engine's compute time at this rate (--config: price_compute)",
       "none", NULL, 0},
      {"price-cached", 0, TN_OPT_FLOAT, &price_cached, 0, 1e6, "USD",
       "per million prompt tokens served from the prefix cache",
       "--price-prompt", NULL, 0},
      {"price-completion", 0, TN_OPT_FLOAT, &price_completion, 0, 1e6, "USD",
       "per million generated tokens", "none", NULL, 0},
      {0},
  };
  const struct tn_opt engine_opts[] = {
      {"threads", 't', TN_OPT_INT, &threads, 1, TN_POOL_THREADS_MAX, "N",
       "compute threads, shared by all models", "physical cores",
       &threads_given, 0},
      {"ctx", 'c', TN_OPT_INT, &n_ctx, 16, 1 << 20, "N",
       "longest sequence, prompt + output", "the model's, at most 4096",
       NULL, 0},
      {"max-seqs", 0, TN_OPT_INT, &max_seqs, 1, 1024, "N",
       "sequences in the running batch", NULL, NULL, 0},
      {"kv-mem", 0, TN_OPT_SIZE, &kv_mem, 0, 0, "SIZE",
       "KV cache size, e.g. 512MiB", "max-seqs x ctx, at most 1 GiB", NULL,
       0},
      {"step-tokens", 0, TN_OPT_INT, &step, 1, 65536, "N",
       "tokens per batched step (prompt chunks)", NULL, NULL, 0},
      {"no-prefix-cache", 0, TN_OPT_FLAG, &no_prefix, 0, 0, NULL,
       "don't reuse KV blocks across requests", NULL, NULL, 0},
      {"decode-slowdown", 0, TN_OPT_FLOAT, &ecfg.decode_slowdown, 0, 100,
       "X",
       "a step carrying decodes may take X times the decodes alone: prompt "
       "chunks are cut to fit, so streams stay smooth (0: fill every step "
       "up to --step-tokens)",
       NULL, NULL, 0},
      {"prompt-spread", 0, TN_OPT_INT, &spread, 0, 4096, "N",
       "a step carrying decodes takes 1/N of the waiting prompt tokens "
       "(at least a block, at most what --decode-slowdown allows), so "
       "steady traffic gives even steps (0: up to that cap)",
       NULL, NULL, 0},
      {"spec", 0, TN_OPT_STR, &spec, 0, 0, "METHOD",
       "speculative decoding: ngram (draft from earlier text), draft (a "
       "smaller model, --draft-model), self (some of the model's own "
       "layers, --spec-layers) or off; a request can opt out with "
       "\"speculative\": false",
       "off", NULL, 0},
      {"spec-layers", 0, TN_OPT_STR, &spec_layers, 0, 0, "LIST",
       "the layers --spec self drafts with, as 0-11,14 (tern calibrate-self "
       "picks them)",
       "the first half and the last", NULL, 0},
      {"draft-model", 0, TN_OPT_STR, &draft_model, 0, 0, "NAME|PATH",
       "draft model for --spec draft: same vocabulary, smaller", NULL, NULL,
       0},
      {"draft-p-min", 0, TN_OPT_FLOAT, &ecfg.spec.draft_p_min, 0, 1, "P",
       "a draft ends where the draft model's probability is below P", NULL,
       NULL, 0},
      {"spec-max-tokens", 0, TN_OPT_INT, &spec_k, 1, TN_SPEC_MAX_TOKENS, "K",
       "drafted tokens per step at most", NULL, NULL, 0},
      {"spec-policy", 0, TN_OPT_STR, &spec_policy, 0, 0, "cost|all",
       "which drafts to verify: those the cost model expects to pay, or "
       "all (to measure acceptance)",
       "cost", NULL, 0},
      TN_CLI_OPT_VERBOSE(&verbose),
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {
      {"model", model_opts},
      {"http", http_opts},
      {"request log", log_opts},
      {"engine", engine_opts},
      {NULL, NULL},
  };
  static const struct tn_cli_cmd cmd = {
      "serve",
      "tern serve -m MODEL [options]\n       tern serve --config FILE.yaml "
      "[options]",
      "An OpenAI-compatible server: /v1/chat/completions, /v1/completions, "
      "/v1/models,\n/health, /ready, /metrics. SIGTERM drains and exits.",
      "example:\n  tern serve -m qwen2.5-coder-0.5b --port 8080", 0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (verbose) tn_log_set_level(TN_LOG_LEVEL_DEBUG);
  if (host) scfg.host = host;
  scfg.port = (int)port;
  if (!model && !config)
    return tn_cli_fail("serve: give a model (-m MODEL) or --config FILE");
  if (model && config)
    return tn_cli_fail("serve: give -m MODEL or --config FILE, not both");
  if (max_body <= 0) return tn_cli_fail("--max-body: must be above 0");
  if (log_content && !log_db)
    return tn_cli_fail("--log-content: give the log with --log-db PATH");
  if (redact.n && !log_content)
    return tn_cli_fail("--log-redact: only stored text is redacted: add "
                       "--log-content");
  scfg.max_body = (size_t)max_body;
  ecfg.n_ctx = (int32_t)n_ctx;
  ecfg.max_seqs = (int32_t)max_seqs;
  ecfg.step_tokens = (int32_t)step;
  ecfg.prompt_spread = (int32_t)spread;
  ecfg.queue_max = (int32_t)queue;
  ecfg.prefix_cache = !no_prefix;
  ecfg.kv_bytes = (size_t)kv_mem;
  ecfg.max_loras = (int32_t)max_loras;
  ecfg.adapter_mem = (size_t)adapter_mem;
  ecfg.n_threads = 0; /* per model: all of the shared pool unless set */
  char dbuf[4096];
  if (tn_cli_spec_setup("--spec", spec, draft_model, spec_layers, &ecfg.spec,
                        dbuf, sizeof(dbuf)))
    return 1;
  ecfg.spec.max_tokens = (int32_t)spec_k;
  if (tn_cli_spec_policy("--spec-policy", spec_policy, &ecfg.spec.every_draft))
    return 1;

  struct tn_serve_config file = {0};
  struct tn_error err = {0};
  if (config && loras.n)
    return tn_cli_fail("--lora: with --config, list adapters under each "
                       "model's 'adapters:'");
  for (int i = 0; i < loras.n; i++) {
    const char *eq = strchr(loras.v[i], '=');
    if (!eq || eq == loras.v[i] || !eq[1])
      return tn_cli_fail("--lora '%s': expected NAME=PATH", loras.v[i]);
  }
  char merge_name[TN_ADAPTER_NAME_MAX + 1] = "";
  const char *merge_alias[1] = {merge_name};
  if (merge) {
    if (loras.n != 1)
      return tn_cli_fail("--merge: give exactly one --lora NAME=PATH (got %d)",
                         loras.n);
    const char *eq = strchr(loras.v[0], '=');
    snprintf(merge_name, sizeof(merge_name), "%.*s",
             (int)TN_MIN((size_t)(eq - loras.v[0]), sizeof(merge_name) - 1),
             loras.v[0]);
    ecfg.merge_lora = eq + 1;
    loras.n = 0; /* merged, not served as an adapter */
  }
  if (config) {
    if (tn_serve_config_load(config, &file, &err))
      return tn_cli_fail("%s", err.msg); /* it names the file */
    if (file.host && !host_given) scfg.host = file.host;
    if (file.port > 0 && !port_given) scfg.port = file.port;
    if (file.api_key && !api_key) api_key = file.api_key;
    if (file.threads > 0 && !threads_given) threads = file.threads;
  }
  scfg.api_key = api_key;
  scfg.adapter_dir = adapter_dir;
  /* One compute pool for every model: two models never oversubscribe the
   * cores, and their steps take turns on the same threads. */
  int n_threads = tn_cli_threads(threads);
  struct tn_pool *pool = tn_pool_new(n_threads);
  if (!pool) return tn_cli_fail("cannot start %d compute threads", n_threads);

  int n_models = config ? file.n_models : 1;
  struct tn_metrics *metrics = tn_metrics_new();
  struct tn_engine **engines = calloc((size_t)n_models, sizeof(*engines));
  struct tn_server_model *sm = calloc((size_t)n_models, sizeof(*sm));
  struct tn_server *srv = NULL;
  struct tn_router *router = NULL;
  struct tn_tenants *tenants = NULL;
  struct tn_reqlog *reqlog = NULL;
  struct tn_tracer *tracer = NULL;
  int rc = 1;
  if (!metrics || !engines || !sm) {
    tn_cli_fail("out of memory");
    goto done;
  }
  if (log_db) {
    struct tn_reqlog_config lc = {.path = log_db,
                                  .content = log_content,
                                  .max_age_s = log_days * 86400.0,
                                  .max_rows = log_rows,
                                  .redact = redact.v,
                                  .n_redact = redact.n};
    if (tn_reqlog_open(&lc, metrics, &reqlog, &err)) {
      tn_cli_fail("%s", err.msg);
      goto done;
    }
    scfg.reqlog = reqlog;
  }
  if (otlp) {
    struct tn_tracer_config tc = {.endpoint = otlp,
                                  .headers = otlp_headers.v,
                                  .n_headers = otlp_headers.n,
                                  .service = otlp_service,
                                  .sample = otlp_sample};
    if (tn_tracer_open(&tc, metrics, &tracer, &err)) {
      tn_cli_fail("%s", err.msg);
      goto done;
    }
    scfg.tracer = tracer;
  } else if (otlp_headers.n) {
    tn_cli_fail("--otlp-header: give the endpoint with --otlp-endpoint URL");
    goto done;
  }
  /* Names first: the server answers (503 "loading") while models load. */
  char single_name[128];
  if (!config) default_name(name ? name : model, single_name,
                            sizeof(single_name));
  for (int i = 0; i < n_models; i++) {
    sm[i].name = config ? file.models[i].name : name ? name : single_name;
    sm[i].price_prompt = price_prompt;
    sm[i].price_cached = price_cached;
    sm[i].price_completion = price_completion;
    sm[i].price_compute = price_compute;
    if (merge_name[0] && strcmp(merge_name, sm[i].name)) {
      sm[i].aliases = merge_alias;
      sm[i].n_aliases = 1;
    }
    if (config) {
      const struct tn_serve_model_cfg *mc = &file.models[i];
      sm[i].aliases = (const char *const *)mc->aliases;
      sm[i].n_aliases = mc->n_aliases;
      if (mc->price_prompt >= 0) sm[i].price_prompt = mc->price_prompt;
      if (mc->price_cached >= 0) sm[i].price_cached = mc->price_cached;
      if (mc->price_completion >= 0)
        sm[i].price_completion = mc->price_completion;
      if (mc->price_compute >= 0) sm[i].price_compute = mc->price_compute;
    }
  }

  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  if (config && (file.n_routes || file.n_upstreams)) {
    if (tn_router_create(&file, &router, &err)) {
      tn_cli_fail("%s: %s", config, err.msg);
      goto done;
    }
    scfg.router = router;
  }
  if (config && file.n_tenants) {
    if (tn_tenants_create(&file, &tenants, &err)) {
      tn_cli_fail("%s: %s", config, err.msg);
      goto done;
    }
    scfg.tenants = tenants;
  }
  /* shadow deployments: every model, upstream and route with a shadow */
  struct tn_shadow_spec shadows[TN_SERVE_MODELS_MAX + TN_SERVE_UPSTREAMS_MAX +
                                TN_SERVE_ROUTES_MAX];
  int n_shadows = 0;
  for (int i = 0; config && i < file.n_models; i++)
    if (file.models[i].shadow.target)
      shadows[n_shadows++] = (struct tn_shadow_spec){
          file.models[i].name, &file.models[i].shadow};
  for (int i = 0; config && i < file.n_upstreams; i++)
    if (file.upstreams[i].shadow.target)
      shadows[n_shadows++] = (struct tn_shadow_spec){
          file.upstreams[i].name, &file.upstreams[i].shadow};
  for (int i = 0; config && i < file.n_routes; i++)
    if (file.routes[i].shadow.target)
      shadows[n_shadows++] = (struct tn_shadow_spec){
          file.routes[i].name, &file.routes[i].shadow};
  scfg.shadows = shadows;
  scfg.n_shadows = n_shadows;
  if (tn_server_start(&scfg, sm, n_models, metrics, &srv, &err)) {
    tn_cli_fail("serve: %s", err.msg);
    goto done;
  }
  for (int i = 0; i < n_models && !g_signal; i++) {
    struct tn_engine_config ec = ecfg;
    const char *arg = model;
    char pbuf[4096], mdbuf[4096];
    ec.name = sm[i].name;
    ec.pool = pool;
    ec.chat_template = chat_template;
    if (config) {
      const struct tn_serve_model_cfg *mc = &file.models[i];
      arg = mc->path;
      if (mc->threads > 0) {
        if (mc->threads > n_threads)
          tn_log_warn("%s: threads %d, but the shared pool has %d; using %d",
                      mc->name, mc->threads, n_threads, n_threads);
        ec.n_threads = TN_MIN(mc->threads, n_threads);
      }
      if (mc->chat_template) ec.chat_template = mc->chat_template;
      /* a model's spec: draft without its own draft_model takes
       * --draft-model's */
      const char *dm = mc->draft_model;
      if (!dm && mc->spec && !strcmp(mc->spec, "draft")) dm = draft_model;
      if ((mc->spec || mc->draft_model || mc->spec_layers) &&
          tn_cli_spec_setup("spec", mc->spec, dm, mc->spec_layers, &ec.spec,
                            mdbuf, sizeof(mdbuf)))
        goto done;
      if (mc->spec_max_tokens > 0) ec.spec.max_tokens = mc->spec_max_tokens;
      if (mc->ctx > 0) ec.n_ctx = mc->ctx;
      if (mc->max_seqs > 0) ec.max_seqs = mc->max_seqs;
      if (mc->kv_mem > 0) ec.kv_bytes = (size_t)mc->kv_mem;
      if (mc->max_loras > 0) ec.max_loras = mc->max_loras;
      if (mc->adapter_mem > 0) ec.adapter_mem = (size_t)mc->adapter_mem;
    }
    const char *path = tn_cli_model_path(arg, pbuf, sizeof(pbuf));
    if (!path) goto done;
    double t0 = tn_time_s();
    if (tn_engine_open(path, &ec, metrics, &engines[i], &err)) {
      tn_cli_fail("%s: %s", path, err.msg);
      goto done;
    }
    if (load_adapters(engines[i], sm[i].name,
                      config ? &file.models[i] : NULL, &loras))
      goto done;
    tn_server_set_engine(srv, i, engines[i]);
    struct tn_engine_info info;
    tn_engine_info(engines[i], &info);
    tn_log_info("loaded %s as '%s' in %.2f s: %s, context %d, %d threads, "
                "chat template %s",
                path, ec.name, tn_time_s() - t0, info.arch, info.n_ctx,
                info.n_threads, info.chat_template);
  }

  for (int r = 0; router && !g_signal && r < tn_router_n_routes(router); r++) {
    const char *mname;
    bool last;
    if (tn_router_classifier(router, r, &mname, &last) &&
        embed_examples(router, r, &file, engines))
      goto done;
  }

  int bound = tn_server_port(srv);
  if (strcmp(scfg.host, "127.0.0.1") != 0 && (!api_key || !*api_key) &&
      !tenants)
    tn_log_warn("listening on %s without --api-key: anyone who can reach "
                "this address can use the models",
                scfg.host);
  if (!g_signal) {
    for (int i = 0; i < n_models; i++) {
      struct tn_engine_info info;
      tn_engine_info(engines[i], &info);
      fprintf(stderr, "tern: serving '%s': %s (%s, context %d, chat template "
                      "%s)\n",
              sm[i].name, info.model_name, info.arch, info.n_ctx,
              info.chat_template);
    }
    struct tn_engine_info first;
    tn_engine_info(engines[0], &first);
    bool chat = strcmp(first.chat_template, "none") != 0;
    const char *auth =
        api_key ? " -H \"Authorization: Bearer $TERN_API_KEY\"" : "";
    fprintf(stderr, "tern: listening on http://%s:%d/v1 (Ctrl-C to stop); "
                    "try:\n",
            scfg.host, bound);
    if (chat)
      fprintf(stderr,
              "  curl http://%s:%d/v1/chat/completions -H 'Content-Type: "
              "application/json'%s -d '{\"messages\":[{\"role\":\"user\","
              "\"content\":\"What is the capital of France?\"}],"
              "\"max_tokens\":64}'\n",
              scfg.host, bound, auth);
    else
      fprintf(stderr,
              "  curl http://%s:%d/v1/completions -H 'Content-Type: "
              "application/json'%s -d '{\"prompt\":\"The capital of France "
              "is\",\"max_tokens\":16}'\n",
              scfg.host, bound, auth);
  }
  fflush(stderr);

  while (!g_signal) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  tn_log_info("signal %d: draining (up to %ld s)", (int)g_signal, drain_s);
  tn_server_drain(srv);
  for (int i = 0; i < n_models; i++)
    if (engines[i]) tn_engine_drain(engines[i]);
  double deadline = tn_time_s() + (double)drain_s;
  while (tn_server_in_flight(srv) > 0 && tn_time_s() < deadline) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  if (tn_server_in_flight(srv) > 0) {
    tn_log_warn("drain deadline passed: cancelling %d requests",
                tn_server_in_flight(srv));
    for (int i = 0; i < n_models; i++)
      if (engines[i]) tn_engine_cancel_all(engines[i]);
    deadline = tn_time_s() + 5.0;
    while (tn_server_in_flight(srv) > 0 && tn_time_s() < deadline) {
      struct timespec ts = {0, 20 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
  }
  rc = 0;
done:
  tn_server_stop(srv);
  tn_router_free(router);
  tn_tenants_free(tenants);
  tn_reqlog_close(reqlog); /* writes what is queued */
  tn_tracer_close(tracer);  /* sends what is queued */
  for (int i = 0; i < n_models; i++) tn_engine_close(engines ? engines[i] : NULL);
  free(engines);
  free(sm);
  tn_metrics_free(metrics);
  tn_pool_free(pool);
  tn_serve_config_free(&file);
  if (rc == 0) tn_log_info("stopped");
  return rc;
}
