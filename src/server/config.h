/*
 * config.h: `tern serve --config FILE.yaml`, several models with aliases.
 *
 * The file (YAML, one document):
 *
 *   host: 127.0.0.1        # optional
 *   port: 8080             # optional, 1..65535
 *   api_key: secret        # optional
 *   threads: 4             # optional, 1..256: the compute pool every
 *                          # model shares (default: physical cores)
 *   models:                # required, 1..TN_SERVE_MODELS_MAX entries
 *     - name: smollm2      # required: what clients send as "model"
 *       path: models/SmolLM2-135M-Instruct.Q4_1.gguf
 *                          # required: a GGUF path or a short name
 *                          # (smollm2-135m); kept as written, the CLI
 *                          # resolves it
 *       aliases: [default, small]   # optional extra names
 *       threads: 2         # optional, 1..256: of the shared pool's
 *                          # threads, how many this model's steps use
 *       ctx: 2048          # optional, 1..16777216
 *       max_seqs: 16       # optional, 1..4096
 *       kv_mem: 256MiB     # optional, a size (tn_parse_size), > 0
 *       chat_template: chatml  # optional: chatml, gemma or llama3 instead
 *                          # of the model's own (checked when it loads)
 *       spec: ngram        # optional: speculative decoding (ngram, draft,
 *                          # self, off)
 *       spec_max_tokens: 8 # optional, 1..16: drafted tokens per step
 *       draft_model: qwen2.5-coder-0.5b  # spec: draft's smaller model
 *                          # (same vocabulary; implies spec: draft)
 *       spec_layers: 0-11,23 # spec: self's drafting layers (implies
 *                          # spec: self; tern calibrate-self picks them)
 *       price_prompt: 0.15 # optional: USD per million prompt tokens, for
 *       price_cached: 0.075 #  the cost in the request log and dashboard
 *       price_compute: 0.9 # optional: USD per hour of this machine; a
 *                          # request costs its share of the engine's
 *                          # passes at this rate (with the token prices
 *                          # or instead of them)
 *       price_completion: 0.6 # (cached: prompt tokens served from the
 *                          # prefix cache; default price_prompt)
 *       max_loras: 4       # optional, 1..256: distinct adapters in the
 *                          # running batch
 *       adapter_mem: 512MiB # optional, a size: resident adapters (LRU)
 *       adapters:          # optional LoRA adapters on this model, chosen
 *         - name: pirate   # by clients as "model": "pirate" or
 *           path: a/dir    # "smollm2:pirate"; a PEFT directory or a
 *           scale: 1.0     # LoRA GGUF; scale optional, -16..16
 *
 *   upstreams:             # optional: remote OpenAI-compatible servers,
 *     - name: big-remote   # called by clients like a model (name unique
 *                          # among models, upstreams and routes)
 *       base_url: http://10.0.0.5:8080/v1  # required: http(s) URL up to
 *                          # and including /v1; tern posts to
 *                          # BASE/chat/completions and BASE/completions
 *       model: qwen2.5-7b  # optional: the name the upstream knows
 *                          # (default: name)
 *       api_key_env: OPENAI_API_KEY  # optional: the key, read from this
 *                          # environment variable at start (unset: error)
 *       timeout_s: 120     # optional: a whole request (default 600)
 *       connect_timeout_s: 5  # optional (default 5)
 *       stall_timeout_s: 30   # optional: no byte for this long ends the
 *                          # call (default 60)
 *       retries: 1         # optional, 0..5: tries again on a refused
 *                          # connection, 429 or 5xx before any byte went
 *                          # to the client (default 0)
 *       max_concurrent: 64 # optional, 1..4096 calls at once; past it the
 *                          # target counts as failing (fallback) or 429
 *       price_prompt: 0.5  # optional: USD per million tokens
 *       price_completion: 1.5
 *   routes:                # optional: virtual models
 *     - name: auto         # what clients send as "model"
 *       strategy: rules    # rules, fallback, balance or cascade
 *       rules:             # rules: the first whose conditions all hold
 *         - regex: "(?i)python|code"  # PCRE2, on the last user message
 *           keywords: [sql, regex]    # any of them, case-insensitive
 *           min_tokens: 10            # prompt length (the default model's
 *           max_tokens: 4000          #  tokenizer, every message's text)
 *           tools: true               # the request has tools
 *           response_format: true     # it asks for structured output
 *           user: "^team-a"           # PCRE2 on the request's "user"
 *           header: X-Tier            # with header_regex: a header's
 *           header_regex: "^gold$"    #  value (missing header: no match)
 *           metadata: {tier: "^gold$"}  # PCRE2 on the request's
 *                                     #  "metadata" values (all must hold)
 *           to: coder                 # required: a model, upstream, route
 *         - to: smollm2               # no condition: always holds
 *     - name: safe
 *       strategy: fallback # the targets in order; the next on an error,
 *       targets: [big-remote, smollm2]  # timeout, 429 or 5xx
 *     - name: pool
 *       strategy: balance  # the target with fewest outstanding requests,
 *       targets: [a, b]    # then the others as fallbacks
 *     - name: topic
 *       strategy: classifier  # nearest neighbours among labelled examples
 *       model: smollm2     # optional: the local model that embeds them
 *                          # and the request (default: the first model)
 *       pooling: mean      # optional: mean or last
 *       k: 5               # optional, 1..64: neighbours that vote
 *       examples:          # labelled prompts; "to" is the target
 *         - {text: "write a python function", to: coder}
 *         - {text: "what is the capital of France", to: smollm2}
 *       examples_file: ex.jsonl  # and/or lines {"text": .., "to": ..}
 *                          # (relative to this file's directory)
 *     - name: cascade
 *       strategy: cascade  # each stage answers; its confidence accepts
 *       stages:            # the answer or escalates to the next stage
 *         - model: smollm2 # a local model (every stage but the last)
 *           signal: min_prob  # min_prob, quantile (with quantile: 0.1),
 *           threshold: 0.2    #  mean_logprob or margin; accepted when
 *                             #  the signal >= threshold (inf, -inf too)
 *         - model: big-remote # the last stage: any target, no signal
 *   tenants:               # optional: API keys with names, limits, budgets
 *     - name: team-a       # shown in the request log, metrics, dashboard
 *       key_env: TEAM_A_KEY  # the key, from this environment variable
 *                          # (or key: the key itself)
 *       allow: [auto, smollm2]  # optional: the models, routes and
 *                          # upstreams it may call (default: all)
 *       rpm: 60            # optional: requests per minute
 *       tpm: 100000        # optional: tokens (prompt + completion) per
 *                          # minute
 *       budget_per_day: 5  # optional: USD per UTC day (the cost of its
 *                          # requests at the configured prices)
 *   With tenants, the OpenAI routes take a tenant's key (or api_key, which
 *   has no limits); rules may test the tenant (tenant: [team-a]).
 *
 *   Any model, upstream or route may carry a shadow deployment:
 *     - name: smollm2
 *       path: smollm2-135m
 *       shadow:
 *         target: candidate  # required: a model, upstream or route that
 *                            # gets a copy of the requests
 *         share: 0.1         # optional, 0..1: of the requests (default 1)
 *         judge: judge-model # optional: compares the two answers
 *         max_concurrent: 1  # optional, 1..64 replays at once
 *         queue: 64          # optional, 1..100000 waiting; more dropped
 *         timeout_s: 300     # optional: one replay with its judging
 *   A replay starts after the live answer went out, runs in the background
 *   (local engines run it only while no live request is outstanding) and
 *   never changes or delays the live answer; see docs/MONITORING.md.
 *
 * Rules: keys are exactly those above (an unknown or repeated key is an
 * error); a scalar key takes a scalar, aliases a list of scalars, models a
 * list of mappings. Names and aliases are 1..128 bytes without whitespace or
 * control characters, and unique across all models (a name and an alias may
 * not coincide either). YAML aliases (*ref) are refused outright, so no
 * "billion laughs"; only the first document is read and a second one is an
 * error. The file is at most 1 MiB.
 *
 * Every failure fills err with "FILE:LINE: KEY: problem", KEY being the
 * path of the offending key ("port", "models[1].aliases[0]"): TN_EFORMAT
 * for YAML syntax errors (the line libyaml reports), TN_EINVAL for a valid
 * YAML document that is not a valid config, TN_ENOENT/TN_EIO when the file
 * cannot be read.
 */
#ifndef TN_SERVER_CONFIG_H
#define TN_SERVER_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define TN_SERVE_MODELS_MAX 64
#define TN_SERVE_ALIASES_MAX 64
#define TN_SERVE_NAME_MAX 128
#define TN_SERVE_ADAPTERS_MAX 256

/* A shadow deployment (shadow: on a model, upstream or route): a share of
 * the requests answered under that name are replayed to target after the
 * live answer went out, in the background, and the two answers compared.
 * target NULL: none. */
struct tn_serve_shadow_cfg {
  char *target;           /* a model, upstream or route */
  double share;           /* of the requests, 0..1 (default 1) */
  char *judge;            /* a model, upstream or route that judges the
                             pair (both orders), or NULL */
  int32_t max_concurrent; /* replays at once (default 1) */
  int32_t queue;          /* replays waiting; past it they are dropped
                             (default 64) */
  double timeout_s;       /* one replay, judge calls included (default
                             300) */
  int line;
};

/* One model. Numbers are 0 when the file leaves them out (the command-line
 * values apply then). Strings are malloc'd, owned by the config. */
struct tn_serve_model_cfg {
  char *name;
  char *path;
  char **aliases;
  int n_aliases;
  int32_t threads;
  int32_t ctx;
  int32_t max_seqs;
  int64_t kv_mem; /* bytes */
  int32_t max_loras; /* distinct adapters per batch; 0 when not set */
  int64_t adapter_mem; /* bytes for resident adapters; 0 when not set */
  char *chat_template; /* or NULL */
  char *spec;          /* speculation method, or NULL */
  int32_t spec_max_tokens;
  char *draft_model;   /* spec: draft's model, as written, or NULL */
  char *spec_layers;   /* spec: self's layers ("0-11,14"), or NULL */
  /* USD per million tokens (< 0: not set); cached prompt tokens cost
   * price_cached, or price_prompt when that is not set */
  double price_prompt, price_cached, price_completion;
  double price_compute; /* USD per hour of compute (< 0: not set) */
  struct tn_serve_adapter_cfg {
    char *name;
    char *path;
    float scale;  /* 1 when not set */
  } *adapters;
  int n_adapters;
  struct tn_serve_shadow_cfg shadow;
};

#define TN_SERVE_UPSTREAMS_MAX 64
#define TN_SERVE_ROUTES_MAX 64
#define TN_SERVE_TARGETS_MAX 16
#define TN_SERVE_RULES_MAX 64
#define TN_SERVE_KEYWORDS_MAX 64
#define TN_SERVE_LABELS_MAX 64
#define TN_SERVE_META_MAX 16
#define TN_SERVE_EXAMPLES_MAX 100000

struct tn_serve_upstream_cfg {
  char *name;
  char *base_url;         /* without a trailing '/' */
  char *model;            /* the upstream's name for it (default: name) */
  char *api_key_env;      /* or NULL */
  char *api_key;          /* read from api_key_env at load, or NULL */
  double timeout_s, connect_timeout_s, stall_timeout_s;
  int32_t retries;
  int32_t max_concurrent;
  double price_prompt, price_completion; /* < 0: not set */
  struct tn_serve_shadow_cfg shadow;
  int line;               /* where it starts, for the checks after parsing */
};

enum tn_route_strategy {
  TN_ROUTE_RULES,
  TN_ROUTE_FALLBACK,
  TN_ROUTE_BALANCE,
  TN_ROUTE_CASCADE,
  TN_ROUTE_CLASSIFIER,
};

enum tn_cascade_signal {
  TN_SIGNAL_MIN_PROB,     /* the lowest chosen-token probability */
  TN_SIGNAL_QUANTILE,     /* a low quantile of them */
  TN_SIGNAL_MEAN_LOGPROB, /* their mean log-probability */
  TN_SIGNAL_MARGIN,       /* the lowest top-1 minus top-2 probability */
  TN_SIGNAL_AGREEMENT,    /* the share of k short samples that agree with
                             the answer */
  TN_SIGNAL_COUNT
};
const char *tn_cascade_signal_name(enum tn_cascade_signal s);

/* One rule: every condition set must hold (unset: -1, NULL). */
struct tn_serve_rule_cfg {
  char *regex;            /* PCRE2 on the last user message */
  char **keywords;        /* any, case-insensitive substring */
  int n_keywords;
  int64_t min_tokens, max_tokens;
  int tools, response_format; /* -1 unset, 0 or 1 */
  char *user;             /* PCRE2 on "user" */
  char *header, *header_regex;
  char **tenants;         /* any of these tenants */
  int n_tenants;
  char **meta_keys;       /* "metadata" values: meta_res[i] (PCRE2) on */
  char **meta_res;        /* the request's metadata[meta_keys[i]] */
  int n_meta;
  char *to;
};

struct tn_serve_stage_cfg {
  char *model;
  enum tn_cascade_signal signal;
  bool has_signal;
  double threshold;       /* accepted when signal >= threshold */
  double quantile;        /* TN_SIGNAL_QUANTILE: 0..1 (default 0.1) */
  /* TN_SIGNAL_AGREEMENT: samples drawn (2..16, default 4), their length
   * in tokens (1..256, default 16) and temperature (0..2, default 0.7) */
  int32_t samples, sample_tokens;
  double sample_temperature;
};

struct tn_serve_route_cfg {
  char *name;
  enum tn_route_strategy strategy;
  char **targets;         /* fallback, balance */
  int n_targets;
  struct tn_serve_rule_cfg *rules;
  int n_rules;
  struct tn_serve_stage_cfg *stages;
  int n_stages;
  /* classifier: labelled example prompts (inline and/or from a JSONL
   * file), embedded by embed_model; labels are the distinct targets */
  struct tn_serve_example_cfg {
    char *text;
    int label;            /* index into labels */
  } *examples;
  int n_examples, cap_examples;
  char **labels;
  int n_labels;
  char *embed_model;      /* NULL: the first model */
  bool pooling_last;      /* last-token embeddings (default: mean) */
  int32_t k;              /* neighbours that vote (default 5) */
  struct tn_serve_shadow_cfg shadow;
  int line;               /* where it starts, for the checks after parsing */
};

#define TN_SERVE_TENANTS_MAX 1024

struct tn_serve_tenant_cfg {
  char *name;
  char *key;              /* from key, or read from key_env */
  char *key_env;
  char **allow;           /* NULL: everything */
  int n_allow;
  int64_t rpm, tpm;       /* 0: no limit */
  double budget_per_day;  /* USD; < 0: no budget */
  int line;
};

/* host and api_key are NULL and port 0 when not set. */
struct tn_serve_config {
  char *host;
  int port;
  char *api_key;
  int32_t threads; /* 0 when not set */
  struct tn_serve_model_cfg *models;
  int n_models;
  struct tn_serve_upstream_cfg *upstreams;
  int n_upstreams;
  struct tn_serve_route_cfg *routes;
  int n_routes;
  struct tn_serve_tenant_cfg *tenants;
  int n_tenants;
};

/* Reads and checks the file at path. On success the caller owns *out and
 * frees it with tn_serve_config_free(); on failure *out is zeroed and
 * holds nothing. */
enum tn_status tn_serve_config_load(const char *path,
                                    struct tn_serve_config *out,
                                    struct tn_error *err);

/* The same from text in memory (len bytes); file_name only labels errors. */
enum tn_status tn_serve_config_parse(const char *text, size_t len,
                                     const char *file_name,
                                     struct tn_serve_config *out,
                                     struct tn_error *err);

/* Frees everything *cfg holds and zeroes it; accepts NULL and a zeroed
 * config. */
void tn_serve_config_free(struct tn_serve_config *cfg);

/* The index of the upstream / route named name, or -1. */
int tn_serve_config_find_upstream(const struct tn_serve_config *cfg,
                                  const char *name);
int tn_serve_config_find_route(const struct tn_serve_config *cfg,
                               const char *name);

/* The index of the model whose name or one of whose aliases is name, or -1. */
int tn_serve_config_find(const struct tn_serve_config *cfg, const char *name);

/* Parses a byte size: decimal digits, then optionally a unit: B; K, KiB
 * (1024); KB (1000); M, MiB (1024^2); MB (1000^2); G, GiB (1024^3); GB
 * (1000^3); T, TiB (1024^4); TB (1000^4); letters in any case, no spaces.
 * Rejects empty strings, signs, fractions, other text and values over
 * INT64_MAX with TN_EINVAL and a message quoting s. */
enum tn_status tn_parse_size(const char *s, int64_t *out,
                             struct tn_error *err);

/* Parses a price: digits with at most one '.', 0..1e6; false otherwise. */
bool tn_parse_price(const char *s, double *out);

#endif /* TN_SERVER_CONFIG_H */
