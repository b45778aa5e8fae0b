/*
 * engine.h: generation. Everything that turns a prompt into text goes
 * through here, for the server and the CLI alike (one scheduler, one
 * sampler, one stop logic):
 *
 *  - prompts: a chat conversation formatted with the model's template, or
 *    a text, encoded the one way every front end uses (tn_engine_encode_*);
 *  - the serving engine: one per loaded model, a thread running continuous
 *    batching over a paged, prefix-cached KV pool; requests in through a
 *    bounded queue, text out through the request object (sched.c);
 *  - sampling: logits to tokens (sampler.c), and stop strings.
 *
 * The sampler owns its random state and penalty history, so the same seed
 * and the same logits give the same tokens. Order of operations (as vLLM
 * and the OpenAI API define them): log-probabilities of the raw logits are
 * reported first; then logit bias, repetition / frequency / presence
 * penalties, temperature, top-k, then top-p and min-p (the kept set is
 * the top-p nucleus cut at min_p * p_max), and a draw. Temperature 0 (or
 * below 1e-4) is greedy (argmax after bias and penalties).
 */
#ifndef TN_ENGINE_H
#define TN_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "obs/obs.h"

#define TN_LOGPROBS_MAX 20

struct tn_logit_bias {
  int32_t id;
  float bias;
};

struct tn_sampling {
  float temperature;     /* <= 0: greedy */
  int32_t top_k;         /* <= 0: off */
  float top_p;           /* >= 1: off */
  float min_p;           /* <= 0: off */
  float repeat_penalty;  /* 1: off; divides positive logits of seen tokens */
  int32_t repeat_last_n; /* window of history for repeat_penalty; -1: all */
  float freq_penalty;    /* minus count * f over generated tokens */
  float presence_penalty; /* minus p once a token was generated */
  uint64_t seed;
  const struct tn_logit_bias *bias; /* borrowed */
  int32_t n_bias;
  int32_t n_logprobs;    /* alternatives to report, 0..TN_LOGPROBS_MAX */
};

void tn_sampling_default(struct tn_sampling *s);
/* Checks ranges (n_vocab for bias ids); err names the field. */
enum tn_status tn_sampling_check(const struct tn_sampling *s, int32_t n_vocab,
                                 struct tn_error *err);

struct tn_token_logprob {
  int32_t id;
  float logprob;
};

struct tn_sample_out {
  int32_t id;
  float logprob; /* of the chosen token under the raw distribution */
  int32_t n_top;
  struct tn_token_logprob top[TN_LOGPROBS_MAX];
};

struct tn_sampler;

/* Copies params (bias entries included). */
enum tn_status tn_sampler_new(const struct tn_sampling *params,
                              int32_t n_vocab, struct tn_sampler **out,
                              struct tn_error *err);
void tn_sampler_free(struct tn_sampler *s);
/* Records prompt tokens (they count for repeat_penalty, not for the
 * frequency/presence penalties, which apply to generated text). */
void tn_sampler_add_prompt(struct tn_sampler *s, const int32_t *ids, size_t n);
/* Picks the next token from logits[n_vocab] (modified in place) and
 * records it as generated. */
void tn_sampler_sample(struct tn_sampler *s, float *logits,
                       struct tn_sample_out *out);
/* Speculative verification: decides a drafted token at this position the
 * way tn_sampler_sample would sample it. q is the drafter's probability
 * of each token (its own transformed distribution), or NULL when the
 * drafter proposed `draft` deterministically (n-gram lookup: all its mass
 * on draft). Greedy: accepted iff draft is the argmax. Otherwise accepted
 * with probability min(1, p(draft) / q(draft)); when rejected, the token
 * is drawn from max(p - q, 0) normalised, so the token kept is distributed
 * exactly as p (Leviathan et al., Chen et al. 2023). Either way out holds
 * the token kept (draft or its replacement) with its logprobs, and it is
 * recorded as generated. Returns whether the draft was accepted. */
bool tn_sampler_verify(struct tn_sampler *s, float *logits, int32_t draft,
                       const float *q, struct tn_sample_out *out);

/* ---- stop strings
 *
 * Scans generated text for any of the stop strings. tn_stop_scan() says how
 * much of the text is safe to emit now (not a possible start of a stop
 * string) and whether a stop string was hit (the text before it is all
 * that may be emitted). */
struct tn_stop_match {
  bool hit;
  size_t emit_len; /* bytes of text that can be shown */
};
struct tn_stop_match tn_stop_scan(const char *text, size_t len,
                                  const char *const *stops, size_t n_stops);

/* ---- the serving engine
 *
 * One engine per loaded model. It owns the model, tokenizer, compute pool,
 * forward context and KV pool, and one thread that runs continuous
 * batching: every step is one batched forward over all running sequences
 * (decodes first, then chunks of waiting prompts under a token budget).
 * Requests come in through a bounded queue (tn_engine_submit never
 * blocks); results go out through the request object, which the engine
 * fills under its lock and announces with the notify callback. */

struct tn_grammar;
struct tn_lora;
struct tn_metrics;
struct tn_model;
struct tn_tokenizer;

#define TN_GEN_N_MAX 16   /* samples per request */
#define TN_GEN_OPTIONS_MAX 256 /* options whose probabilities are followed */
#define TN_GEN_STOPS_MAX 16

enum tn_finish {
  TN_FINISH_NONE,      /* still running */
  TN_FINISH_STOP,      /* end of generation token or a stop string */
  TN_FINISH_LENGTH,    /* max_tokens or the context */
  TN_FINISH_CANCELLED, /* client went away, or the server is stopping */
  TN_FINISH_ERROR,     /* see tn_req.error */
};
const char *tn_finish_str(enum tn_finish f); /* "stop", "length", ... */

struct tn_gen_params {
  struct tn_sampling sampling; /* bias borrowed; copied at submit */
  int32_t max_tokens;          /* capped by the context; <= 0: up to it */
  int32_t min_tokens;          /* EOS and stop strings ignored before */
  bool ignore_eos;
  bool logprobs;               /* record tokens with sampling.n_logprobs
                                  alternatives each */
  int32_t n;                   /* samples, 1..TN_GEN_N_MAX */
  const char *const *stops;    /* copied at submit */
  int32_t n_stops;
  bool speculative;            /* use the engine's speculation (default
                                  true; false: plain decoding) */
  struct tn_lora *lora;        /* LoRA adapter (tn_adapters_get; NULL: the
                                  base); the request keeps a reference */
  float lora_scale;            /* its scale (default 1) */
  struct tn_grammar *grammar;  /* the output must follow it (NULL: free);
                                  the request keeps a reference */
  /* A choice list (grammar must be tn_grammar_from_choices of it; copied
   * at submit): the engine estimates each option's probability (filled
   * into tn_choice.option_probs) and, with option_min_prob > 0, ends as
   * soon as one option's passes it, appending the rest of that option.
   * An option's probability is the mass of the tokens that lead to it
   * alone, times the probability of the text decoded before them, each
   * under the model's distribution restricted to the grammar (temperature
   * 1): exact when every option has one tokenization, a lower bound
   * otherwise. Such a request does not draft. */
  const char *const *options;
  const size_t *option_lens;
  int32_t n_options;
  float option_min_prob;
  /* An embedding instead of a completion: the prompt runs (no token is
   * generated, n must be 1) and tn_req.embedding gets the mean of its
   * tokens' final hidden states (after the output norm), or the last
   * token's. Mean pooling does not reuse cached prefix blocks (every
   * token's state is needed); last-token pooling does. */
  enum tn_embed { TN_EMBED_NONE, TN_EMBED_MEAN, TN_EMBED_LAST } embed;
  /* Background work (a shadow replay): it runs only in steps when no live
   * request is outstanding on any engine sharing this engine's compute
   * pool (tn_pool_live), in steps of at most TN_BACKGROUND_STEP_TOKENS,
   * and its sequences are the first preempted when a live one needs
   * blocks or a batch slot. A live request waits for it at most one such
   * step. The output is what the same request gives in the foreground. */
  bool background;
};
#define TN_BACKGROUND_STEP_TOKENS 16
void tn_gen_params_default(struct tn_gen_params *p);

struct tn_gen_token {
  int32_t id;
  float logprob;
  int32_t n_top;
  struct tn_token_logprob top[TN_LOGPROBS_MAX];
};

/* One sample of a request. Read under tn_req_lock(). */
struct tn_choice {
  char *text;                  /* released text (stop strings held back) */
  size_t len, cap;
  struct tn_gen_token *toks;   /* generated tokens, when params.logprobs */
  int32_t n_toks, cap_toks;
  int32_t n_gen;               /* tokens generated (usage) */
  int32_t n_drafted;           /* speculative tokens proposed */
  int32_t n_accepted;          /* of those, accepted by the model */
  float *option_probs;         /* [params.n_options], when it had them */
  enum tn_finish finish;
};

typedef void (*tn_req_notify_fn)(void *user);

/* A request, shared by the submitter and the engine (reference counted).
 * Fields below are written by the engine and read under tn_req_lock(). */
#define TN_REQ_CHUNKS_MAX 32

struct tn_req {
  int32_t n_prompt;            /* prompt tokens */
  int32_t n_cached;            /* of those, served from the prefix cache */
  int32_t n_choices;
  struct tn_choice *choices;
  float *embedding;            /* params.embed: [n_embd] once done */
  int32_t n_embd;
  bool done;                   /* every choice finished */
  char error[256];             /* when a choice finished with ERROR */
  double t_submit, t_first, t_done; /* tn_time_now() seconds */
  double t_start;              /* first scheduled (queue time: - t_submit) */
  double t_held;               /* params.background: seconds it was held
                                  back for live work (set when done) */
  double compute_s;            /* its share of the forward passes it rode
                                  (set when done; tn_engine_config says
                                  how steps are shared) */
  double itl_sum, itl_max;     /* gaps between tokens of one choice */
  int64_t itl_n;
  uint32_t itl_hist[TN_LAT_BUCKETS]; /* the gaps by tn_lat_bucket() */
  /* the prompt's chunks as they ran (first choice; traces): past
   * TN_REQ_CHUNKS_MAX the last entry grows to cover the rest */
  struct tn_req_chunk {
    double t0, t1;             /* the step's forward pass */
    int32_t n_tokens;
  } chunks[TN_REQ_CHUNKS_MAX];
  int32_t n_chunks;
  struct tn_req_priv *priv;    /* engine's own */
};

/* One step as planned, for tests and tracing (tn_engine_config.on_step):
 * every sequence in the batch with the tokens it runs. */
struct tn_step_entry {
  const struct tn_req *req;
  int32_t choice;
  int32_t pos;           /* position of its first token in this step */
  int32_t n_tokens;      /* tokens it runs (1 for a decode, 1 + n_draft
                            when speculating) */
  int32_t n_draft;       /* drafted tokens verified with its decode */
  bool decode;           /* its last sampled token, not prompt/recompute */
};
struct tn_step_trace {
  uint64_t step;         /* steps run before this one */
  int32_t n_entries;
  const struct tn_step_entry *entries; /* batch order */
  int32_t n_tokens;      /* sum of n_tokens */
  int32_t n_waiting;     /* sequences left waiting */
  uint64_t preemptions;  /* total so far */
  int32_t kv_blocks_available;
};
typedef void (*tn_engine_step_cb)(void *user, const struct tn_step_trace *t);

/* ---- speculative decoding
 *
 * A decoding sequence may carry drafted tokens into a step: the model
 * verifies them with its last token in one pass (logits for every row) and
 * keeps the longest accepted run plus one token of its own (sampled, or
 * the correction of the first rejected draft; tn_sampler_verify), so the
 * output is exactly what plain decoding gives (greedy: token for token;
 * sampling: the same distribution). Rejected drafts leave the KV cache by
 * moving the sequence's length back: nothing is copied. */
enum tn_spec_method {
  TN_SPEC_OFF,
  TN_SPEC_NGRAM,    /* prompt lookup: the continuation of the last n
                       tokens' latest earlier occurrence */
  TN_SPEC_DRAFT,    /* a smaller model with the same vocabulary
                       (tn_spec_config.draft_model) */
  TN_SPEC_SELF,     /* the model itself with a subset of its layers
                       (tn_spec_config.layers), on its own KV cache */
  TN_SPEC_CUSTOM,   /* tn_spec_config.propose (tests, embedders) */
  TN_SPEC_COUNT
};
const char *tn_spec_method_name(enum tn_spec_method m);

/* Parses a layer list ("0-11,14,20-23": ids and inclusive ranges, rising,
 * each below n_layer) into out[n_layer]; *n gets the count. err names the
 * first bad part. */
enum tn_status tn_spec_parse_layers(const char *text, int32_t n_layer,
                                    int32_t *out, int32_t *n,
                                    struct tn_error *err);
/* Formats layers[0..n) the way tn_spec_parse_layers reads them. */
void tn_spec_format_layers(const int32_t *layers, int32_t n, char *buf,
                           size_t cap);
/* The layers --spec self drafts with when none are given: the first half
 * and the last layer (a guess; tern calibrate-self measures better). */
int32_t tn_spec_default_layers(int32_t n_layer, int32_t *out);

/* A drafter: up to k tokens continuing tokens[0..n_tokens) (the prompt is
 * tokens[0..n_prompt)), written to out, which has room for exactly k;
 * returns how many (anything outside 0..k is clamped, ids outside the
 * vocabulary end the draft). Runs on the engine thread. */
typedef int32_t (*tn_spec_propose_cb)(void *user, const struct tn_req *req,
                                      int32_t choice, const int32_t *tokens,
                                      int32_t n_tokens, int32_t n_prompt,
                                      int32_t k, int32_t *out);

#define TN_SPEC_MAX_TOKENS 16
struct tn_spec_config {
  enum tn_spec_method method;
  int32_t max_tokens;       /* drafted tokens per step, 1..16 (default 8) */
  int32_t ngram_min;        /* shortest suffix to match (default 2) */
  int32_t ngram_max;        /* longest suffix tried first (default 4) */
  const char *draft_model;  /* TN_SPEC_DRAFT: path of its GGUF */
  float draft_p_min;        /* TN_SPEC_DRAFT: a draft ends at a token the
                               draft model gives less than this probability
                               (default 0.3; 0: never) */
  const char *layers;       /* TN_SPEC_SELF: the layers that draft, as
                               "0-11,14,20-23" (tern calibrate-self picks
                               them); NULL: tn_spec_default_layers */
  tn_spec_propose_cb propose; /* TN_SPEC_CUSTOM */
  void *propose_user;
  bool every_draft;         /* verify every proposed token, without the
                               cost model (tests; acceptance studies) */
};

struct tn_engine_config {
  const char *name;      /* model name for the API and metric labels */
  struct tn_pool *pool;  /* compute pool shared by every model of the
                            process (borrowed); NULL: the engine starts its
                            own with n_threads */
  int32_t n_threads;     /* threads of the pool its steps use (0: all) */
  int32_t n_ctx;         /* longest sequence (prompt + output); 0: model's
                            training context, capped at 4096 */
  int32_t max_seqs;      /* sequences in the running batch */
  int32_t step_tokens;   /* token budget per step (chunked prefill) */
  int32_t queue_max;     /* waiting requests before submit says TN_EFULL */
  size_t kv_bytes;       /* KV pool size; 0: room for max_seqs x n_ctx,
                            capped at 1 GiB */
  bool prefix_cache;     /* reuse full blocks across requests (default on) */
  const char *chat_template; /* family name overriding the GGUF's template
                                ("chatml", "gemma", "llama3"), or NULL */
  tn_engine_step_cb on_step; /* called on the engine thread after each
                                step is planned, before its forward pass */
  void *on_step_user;
  struct tn_spec_config spec;
  const char *merge_lora; /* merged mode: this adapter folded into the
                            weights at open (lora.h), or NULL */
  float merge_scale;     /* its scale (0 is taken as 1) */
  size_t adapter_mem;    /* bytes for resident adapters (0: no limit) */
  int32_t max_loras;     /* distinct LoRA adapters in the running batch
                            (0: no limit; 1..TN_ADAPTERS_PER_STEP_MAX) */
  float decode_slowdown; /* a step carrying decodes takes at most this many
                            times the decodes' own step: prompt chunks are
                            cut to fit (smooth streaming); 0: no limit, a
                            step is filled up to step_tokens (default) */
  int32_t prompt_spread; /* with decode_slowdown: a step carrying decodes
                            takes about 1/prompt_spread of the prompt
                            tokens waiting (at least a block, at most what
                            decode_slowdown allows), so steady traffic
                            gives steps of even length; 0: up to the cap */
};
void tn_engine_config_default(struct tn_engine_config *c);

struct tn_engine;

/* Loads the model at path and starts the engine thread. metrics may be
 * NULL; the engine registers its tern_* families in it. */
enum tn_status tn_engine_open(const char *path,
                              const struct tn_engine_config *cfg,
                              struct tn_metrics *metrics,
                              struct tn_engine **out, struct tn_error *err);
/* Cancels everything still running, stops the thread, frees all. */
void tn_engine_close(struct tn_engine *e);

const struct tn_tokenizer *tn_engine_tokenizer(const struct tn_engine *e);
/* The engine's named adapters (below). */
struct tn_adapters *tn_engine_adapters(struct tn_engine *e);
const char *tn_engine_name(const struct tn_engine *e);
int32_t tn_engine_n_ctx(const struct tn_engine *e);

/* What front ends show about a loaded model. */
struct tn_engine_info {
  const char *arch;          /* "llama", "qwen2", "gemma3" */
  const char *model_name;    /* general.name of the GGUF */
  const char *chat_template; /* family in use, or "none" */
  int32_t n_ctx;             /* longest sequence served */
  int32_t n_ctx_train;
  int32_t n_vocab;
  int32_t n_layer, n_embd;
  int32_t n_threads;         /* compute threads its steps use */
  size_t weight_bytes;       /* weights read per token */
  int32_t kv_blocks;         /* KV pool size in 16-token blocks */
  /* the step cost model as calibrated at open: a step of n tokens takes
   * step_s + token_s * n seconds (0, 0: not calibrated) */
  double step_s, token_s;
};
void tn_engine_info(const struct tn_engine *e, struct tn_engine_info *out);

/* ---- prompts (prompt.c): the same for the API and the CLI
 *
 * Both refuse, before encoding, a text so long that it has at least n_ctx
 * tokens whatever its tokenization (TN_ERANGE), and return the other
 * failures (bad template, roles, bytes) as TN_EINVAL or TN_EUNSUPPORTED
 * with a message. *ids is malloc'd. */
struct tn_chat_msg;
struct tn_chat_opts;
/* opts NULL: a generation prompt, no tools. */
enum tn_status tn_engine_encode_chat(const struct tn_engine *e,
                                     const struct tn_chat_msg *msgs,
                                     size_t n_msgs,
                                     const struct tn_chat_opts *opts,
                                     int32_t **ids, size_t *n_ids,
                                     struct tn_error *err);
enum tn_status tn_engine_encode_text(const struct tn_engine *e,
                                     const char *text, size_t len,
                                     int32_t **ids, size_t *n_ids,
                                     struct tn_error *err);

/* Queues a request for prompt[n_prompt] (copied). On success *out holds a
 * reference the caller drops with tn_req_release(); notify(user) runs on
 * the engine thread whenever the request gained text or finished, with
 * the request's lock held (it must not block nor call tn_req_*; typically
 * it wakes the connection). Errors: TN_EINVAL /
 * TN_ERANGE for a request that can never run (prompt longer than the
 * context, bad ids; err names it), TN_EFULL when the queue is full,
 * TN_ECANCELED when the engine is draining. */
enum tn_status tn_engine_submit(struct tn_engine *e, const int32_t *prompt,
                                int32_t n_prompt,
                                const struct tn_gen_params *params,
                                tn_req_notify_fn notify, void *user,
                                struct tn_req **out, struct tn_error *err);

/* Asks the engine to stop the request at its next step (idempotent). */
void tn_req_cancel(struct tn_req *r);
void tn_req_lock(struct tn_req *r);
void tn_req_unlock(struct tn_req *r);
/* Drops the caller's reference. After this notify is never called again
 * for this caller: release only once you no longer want callbacks. */
void tn_req_release(struct tn_req *r);

/* Stop taking new requests (submit says TN_ECANCELED). */
void tn_engine_drain(struct tn_engine *e);
/* Cancels every request still queued or running. */
void tn_engine_cancel_all(struct tn_engine *e);

struct tn_engine_stats {
  int32_t running, waiting;
  int32_t kv_blocks_total, kv_blocks_used, kv_blocks_cached;
  uint64_t steps, preemptions, prefix_queries, prefix_hits;
  /* speculation: drafts verified (one per sequence and step), drafted and
   * accepted tokens, accepted tokens by position in their draft */
  uint64_t spec_drafts, spec_drafted, spec_accepted;
  uint64_t spec_declined;  /* sequence-steps the cost model kept from
                              drafting (draft model) */
  /* the adaptive switch: steps run with speculation off by it (probes
   * included), times it switched off, whether it is off now */
  uint64_t spec_paused_steps, spec_switched_off;
  bool spec_paused;
  /* compute seconds a prompt token and a generated token have cost
   * lately (decayed means of their shares of steps; 0: none yet) */
  double s_per_prompt_token, s_per_gen_token;
  uint64_t spec_accepted_pos[TN_SPEC_MAX_TOKENS];
  /* constrained output: masks computed or looked up, their time, tokens
   * appended without a pass (early exit) */
  uint64_t grammar_masks, grammar_forced;
  double grammar_seconds;
};
void tn_engine_stats(struct tn_engine *e, struct tn_engine_stats *out);

/* ---- adapters (adapters.c)
 *
 * An engine's LoRA adapters by name, safe from any thread. Loading reads
 * and checks the file against the engine's model (lora.h) outside the
 * lock. Unloading takes the name away at once; requests already running
 * on the adapter finish on it and the last one frees it. */

#define TN_ADAPTER_NAME_MAX 63
#define TN_ADAPTERS_PER_STEP_MAX 256
#define TN_ADAPTER_SCALE_MAX 16.0f

struct tn_adapters;
struct tn_adapter_info {
  char name[TN_ADAPTER_NAME_MAX + 1];
  char path[1024];
  char format[16];   /* "gguf", "peft" */
  char kind[16];     /* "lora", "ia3", "bottleneck" */
  int32_t max_rank, n_mats; /* (bottleneck: widest module, modules) */
  size_t bytes;      /* resident weights */
  float scale;       /* default scale of its requests */
  double load_s;     /* seconds the (last) load took */
  bool resident;     /* its weights are in memory (else evicted) */
};

/* metrics (may be NULL) gets the registry's series, labelled model. */
struct tn_adapters *tn_adapters_new(const struct tn_model *m,
                                    struct tn_metrics *metrics,
                                    const char *model);
void tn_adapters_free(struct tn_adapters *a);
/* Letters, digits, '-', '_', '.', not starting with '.';
 * 1..TN_ADAPTER_NAME_MAX. */
bool tn_adapter_name_ok(const char *name);
/* TN_EEXIST when the name is taken; the loader's error otherwise. */
enum tn_status tn_adapters_load(struct tn_adapters *a, const char *name,
                                const char *path, float scale,
                                struct tn_error *err);
/* TN_ENOENT when no such adapter is loaded. */
enum tn_status tn_adapters_unload(struct tn_adapters *a, const char *name,
                                  struct tn_error *err);
/* Memory for resident adapters' weights (0: no limit); see adapters.c. */
void tn_adapters_set_budget(struct tn_adapters *a, size_t bytes);
/* The adapter with a reference for the caller (tn_lora_release), and its
 * default scale; an evicted one is read again first. TN_ENOENT: no such
 * name; TN_EFULL: no room (every resident adapter is in use); else the
 * loader's error. */
enum tn_status tn_adapters_acquire(struct tn_adapters *a, const char *name,
                                   struct tn_lora **out, float *scale,
                                   struct tn_error *err);
/* tn_adapters_acquire without the reason: NULL on any failure. */
struct tn_lora *tn_adapters_get(struct tn_adapters *a, const char *name,
                                float *scale);
/* Whether the name is registered (resident or not); never loads. */
bool tn_adapters_has(struct tn_adapters *a, const char *name);
/* Copies up to cap entries in load order; returns how many there are. */
int tn_adapters_list(struct tn_adapters *a, struct tn_adapter_info *out,
                     int cap);

#endif /* TN_ENGINE_H */
