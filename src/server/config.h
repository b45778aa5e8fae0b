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
 *                          # off)
 *       spec_max_tokens: 8 # optional, 1..16: drafted tokens per step
 *       draft_model: qwen2.5-coder-0.5b  # spec: draft's smaller model
 *                          # (same vocabulary; implies spec: draft)
 *       price_prompt: 0.15 # optional: USD per million prompt tokens, for
 *       price_cached: 0.075 #  the cost in the request log and dashboard
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
  /* USD per million tokens (< 0: not set); cached prompt tokens cost
   * price_cached, or price_prompt when that is not set */
  double price_prompt, price_cached, price_completion;
  struct tn_serve_adapter_cfg {
    char *name;
    char *path;
    float scale;  /* 1 when not set */
  } *adapters;
  int n_adapters;
};

/* host and api_key are NULL and port 0 when not set. */
struct tn_serve_config {
  char *host;
  int port;
  char *api_key;
  int32_t threads; /* 0 when not set */
  struct tn_serve_model_cfg *models;
  int n_models;
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
