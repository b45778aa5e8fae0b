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
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "obs/obs.h"
#include "server/config.h"
#include "server/server.h"

static volatile sig_atomic_t g_signal;

static void on_signal(int sig) { g_signal = sig; }

static void serve_usage(FILE *f) {
  fprintf(f,
          "usage: tern serve -m MODEL [options]\n"
          "       tern serve --config FILE.yaml [options]\n"
          "\n"
          "  -m, --model PATH|NAME   GGUF file or short name (smollm2-135m)\n"
          "      --name NAME         model name clients send (default: the\n"
          "                          short name or file name)\n"
          "      --host ADDR         listen address (default 127.0.0.1)\n"
          "      --port N            port (default 8080; 0 picks a free one)\n"
          "  -t, --threads N         compute threads per model (default: all)\n"
          "  -c, --ctx N             longest sequence, prompt + output\n"
          "                          (default: the model's, at most 4096)\n"
          "      --max-seqs N        sequences in the running batch (16)\n"
          "      --kv-mem SIZE       KV cache size, e.g. 512MiB (default:\n"
          "                          max-seqs x ctx, at most 1 GiB)\n"
          "      --step-tokens N     tokens per batched step (256)\n"
          "      --queue N           waiting requests before 429 (256)\n"
          "      --max-body SIZE     largest request body (8MiB)\n"
          "      --api-key KEY       require 'Authorization: Bearer KEY'\n"
          "                          (or set TERN_API_KEY)\n"
          "      --drain-timeout S   seconds running requests get on\n"
          "                          SIGTERM (30)\n"
          "      --no-prefix-cache   don't reuse KV blocks across requests\n"
          "      --config FILE       YAML: several models with aliases\n"
          "  -v, --verbose           debug logging\n");
}

enum {
  OPT_HOST = 2000,
  OPT_PORT,
  OPT_MAX_SEQS,
  OPT_KV_MEM,
  OPT_API_KEY,
  OPT_CONFIG,
  OPT_STEP,
  OPT_QUEUE,
  OPT_MAX_BODY,
  OPT_DRAIN,
  OPT_NO_PREFIX,
  OPT_NAME,
};

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

static bool parse_size_opt(const char *opt, const char *s, int64_t *out) {
  struct tn_error err = {0};
  if (tn_parse_size(s, out, &err)) {
    tn_cli_fail("%s: %s", opt, err.msg);
    return false;
  }
  return true;
}

int tn_cli_serve(int argc, char **argv) {
  static const struct option opts[] = {
      {"model", required_argument, 0, 'm'},
      {"threads", required_argument, 0, 't'},
      {"ctx", required_argument, 0, 'c'},
      {"verbose", no_argument, 0, 'v'},
      {"help", no_argument, 0, 'h'},
      {"host", required_argument, 0, OPT_HOST},
      {"port", required_argument, 0, OPT_PORT},
      {"max-seqs", required_argument, 0, OPT_MAX_SEQS},
      {"kv-mem", required_argument, 0, OPT_KV_MEM},
      {"api-key", required_argument, 0, OPT_API_KEY},
      {"config", required_argument, 0, OPT_CONFIG},
      {"step-tokens", required_argument, 0, OPT_STEP},
      {"queue", required_argument, 0, OPT_QUEUE},
      {"max-body", required_argument, 0, OPT_MAX_BODY},
      {"drain-timeout", required_argument, 0, OPT_DRAIN},
      {"no-prefix-cache", no_argument, 0, OPT_NO_PREFIX},
      {"name", required_argument, 0, OPT_NAME},
      {0, 0, 0, 0},
  };
  const char *model = NULL, *config = NULL, *name = NULL;
  struct tn_server_config scfg;
  tn_server_config_default(&scfg);
  struct tn_engine_config ecfg;
  tn_engine_config_default(&ecfg);
  long threads = sysconf(_SC_NPROCESSORS_ONLN), v = 0, drain_s = 30;
  int64_t kv_mem = 0, max_body = 0;
  bool port_given = false, host_given = false;
  const char *api_key = getenv("TERN_API_KEY");
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:t:c:vh", opts, NULL)) != -1) {
    switch (c) {
    case 'm': model = optarg; break;
    case 't': if (!tn_cli_parse_int("--threads", optarg, 1, 256, &threads)) return 1; break;
    case 'c': if (!tn_cli_parse_int("--ctx", optarg, 16, 1 << 20, &v)) return 1; ecfg.n_ctx = (int32_t)v; break;
    case 'v': tn_log_set_level(TN_LOG_LEVEL_DEBUG); break;
    case 'h': serve_usage(stdout); return 0;
    case OPT_HOST: scfg.host = optarg; host_given = true; break;
    case OPT_PORT: if (!tn_cli_parse_int("--port", optarg, 0, 65535, &v)) return 1; scfg.port = (int)v; port_given = true; break;
    case OPT_MAX_SEQS: if (!tn_cli_parse_int("--max-seqs", optarg, 1, 1024, &v)) return 1; ecfg.max_seqs = (int32_t)v; break;
    case OPT_KV_MEM: if (!parse_size_opt("--kv-mem", optarg, &kv_mem)) return 1; break;
    case OPT_API_KEY: api_key = optarg; break;
    case OPT_CONFIG: config = optarg; break;
    case OPT_STEP: if (!tn_cli_parse_int("--step-tokens", optarg, 1, 65536, &v)) return 1; ecfg.step_tokens = (int32_t)v; break;
    case OPT_QUEUE: if (!tn_cli_parse_int("--queue", optarg, 1, 1 << 20, &v)) return 1; ecfg.queue_max = (int32_t)v; break;
    case OPT_MAX_BODY: if (!parse_size_opt("--max-body", optarg, &max_body)) return 1; break;
    case OPT_DRAIN: if (!tn_cli_parse_int("--drain-timeout", optarg, 0, 86400, &drain_s)) return 1; break;
    case OPT_NO_PREFIX: ecfg.prefix_cache = false; break;
    case OPT_NAME: name = optarg; break;
    default: serve_usage(stderr); return 2;
    }
  }
  if (optind < argc)
    return tn_cli_fail("serve: unexpected argument '%s'", argv[optind]);
  if (!model && !config)
    return tn_cli_fail("serve: give a model (-m MODEL) or --config FILE");
  if (max_body > 0) scfg.max_body = (size_t)max_body;
  ecfg.n_threads = (int32_t)threads;
  ecfg.kv_bytes = (size_t)kv_mem;

  struct tn_serve_config file = {0};
  struct tn_error err = {0};
  if (config) {
    if (tn_serve_config_load(config, &file, &err))
      return tn_cli_fail("%s: %s", config, err.msg);
    if (file.host && !host_given) scfg.host = file.host;
    if (file.port > 0 && !port_given) scfg.port = file.port;
    if (file.api_key && !api_key) api_key = file.api_key;
  }
  scfg.api_key = api_key;

  int n_models = config ? file.n_models : 1;
  struct tn_metrics *metrics = tn_metrics_new();
  struct tn_engine **engines = calloc((size_t)n_models, sizeof(*engines));
  struct tn_server_model *sm = calloc((size_t)n_models, sizeof(*sm));
  struct tn_server *srv = NULL;
  int rc = 1;
  if (!metrics || !engines || !sm) {
    tn_cli_fail("out of memory");
    goto done;
  }
  /* Names first: the server answers (503 "loading") while models load. */
  char single_name[128];
  if (!config) default_name(name ? name : model, single_name,
                            sizeof(single_name));
  for (int i = 0; i < n_models; i++) {
    sm[i].name = config ? file.models[i].name : name ? name : single_name;
    if (config) {
      sm[i].aliases = (const char *const *)file.models[i].aliases;
      sm[i].n_aliases = file.models[i].n_aliases;
    }
  }

  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  if (tn_server_start(&scfg, sm, n_models, metrics, &srv, &err)) {
    tn_cli_fail("serve: %s", err.msg);
    goto done;
  }
  for (int i = 0; i < n_models && !g_signal; i++) {
    struct tn_engine_config ec = ecfg;
    const char *arg = model;
    char pbuf[1024];
    ec.name = sm[i].name;
    if (config) {
      const struct tn_serve_model_cfg *mc = &file.models[i];
      arg = mc->path;
      if (mc->threads > 0) ec.n_threads = mc->threads;
      if (mc->ctx > 0) ec.n_ctx = mc->ctx;
      if (mc->max_seqs > 0) ec.max_seqs = mc->max_seqs;
      if (mc->kv_mem > 0) ec.kv_bytes = (size_t)mc->kv_mem;
    }
    const char *path = tn_cli_model_path(arg, pbuf, sizeof(pbuf));
    double t0 = tn_time_s();
    if (tn_engine_open(path, &ec, metrics, &engines[i], &err)) {
      tn_cli_fail("%s: %s", path, err.msg);
      goto done;
    }
    tn_server_set_engine(srv, i, engines[i]);
    tn_log_info("loaded %s as '%s' in %.2f s", path, ec.name,
                tn_time_s() - t0);
  }

  int port = tn_server_port(srv);
  if (strcmp(scfg.host, "127.0.0.1") != 0 && (!api_key || !*api_key))
    tn_log_warn("listening on %s without --api-key: anyone who can reach "
                "this address can use the models",
                scfg.host);
  if (!g_signal)
    fprintf(stderr,
          "tern: serving %s at http://%s:%d/v1 (Ctrl-C to stop)\n"
          "tern: try:\n"
          "  curl http://%s:%d/v1/chat/completions -H 'Content-Type: "
          "application/json'%s -d '{\"messages\":[{\"role\":\"user\","
          "\"content\":\"Hello! Who are you?\"}],\"max_tokens\":64}'\n",
          sm[0].name, scfg.host, port, scfg.host, port,
          api_key ? " -H 'Authorization: Bearer $TERN_API_KEY'" : "");
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
  for (int i = 0; i < n_models; i++) tn_engine_close(engines ? engines[i] : NULL);
  free(engines);
  free(sm);
  tn_metrics_free(metrics);
  tn_serve_config_free(&file);
  if (rc == 0) tn_log_info("stopped");
  return rc;
}
