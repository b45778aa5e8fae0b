/*
 * cli_internal.h: what run.c and chat.c share through gen.c.
 */
#ifndef TN_CLI_INTERNAL_H
#define TN_CLI_INTERNAL_H

#include <signal.h>

#include "cli/cli.h"

/* Model and sampling options of run and chat (one command per process). */
struct tn_cli_gen {
  const char *model;
  long threads;         /* 0: physical cores */
  long n_ctx;           /* 0: the model's, at most 4096 */
  const char *chat_template;
  bool verbose;
  struct tn_sampling sampling;
  long top_k;
  long n_predict;       /* -1: until end of text or context */
  long seed;
  bool seed_given;
  struct tn_cli_list stops;
  bool ignore_eos;
  const char *spec;     /* speculation method, or NULL (off) */
  const char *draft_model; /* --draft-model, or NULL */
  const char *spec_layers; /* --spec-layers, or NULL */
  float draft_p_min;
  long spec_max_tokens;
  const char *spec_policy; /* "cost" (NULL) or "all" */
  const char *lora;     /* --lora PATH, or NULL */
  float lora_scale;
  struct tn_lora *lora_handle; /* loaded on the engine (a reference) */
  /* output constraints (one at most) and the grammar they compile to */
  const char *json_schema;  /* --json-schema FILE */
  bool json;                /* --json: any JSON object */
  const char *grammar_file; /* --grammar FILE (GBNF) */
  const char *regex;        /* --regex RE */
  struct tn_cli_list choices; /* --choice TEXT ... */
  struct tn_grammar *grammar;
};
extern struct tn_cli_gen tn_cli_gen;
extern const struct tn_opt tn_cli_model_opts[];
extern const struct tn_opt tn_cli_sampling_opts[];

/* Defaults (llama.cpp's CLI sampling: temp 0.8, top-k 40, top-p 0.95,
 * min-p 0.05); call before parsing. tn_cli_gen_done() releases what
 * tn_cli_gen_params() made. */
void tn_cli_gen_init(void);
void tn_cli_gen_done(void);

/* Set by SIGINT once tn_cli_catch_sigint() ran; the caller clears it. */
extern volatile sig_atomic_t tn_cli_interrupted;
void tn_cli_catch_sigint(void);

/* Opens the engine for one user (one sequence; prefix cache on request).
 * chat: refuse a model without a chat template. cmd names the command in
 * messages. Prints errors. */
int tn_cli_engine_open(const char *cmd, bool chat, bool prefix_cache,
                       struct tn_engine **out);
/* "ngram", "off", ...; 0, or 1 after saying what is wrong with opt. */
int tn_cli_spec_method(const char *opt, const char *name,
                       enum tn_spec_method *out);
/* The method (spec, as tn_cli_spec_method; a draft model alone implies
 * draft, a layer list self), the draft model's path (resolved into pbuf)
 * and the self-drafting layers (borrowed) in sc. */
int tn_cli_spec_setup(const char *opt, const char *spec, const char *draft,
                      const char *layers, struct tn_spec_config *sc,
                      char *pbuf, size_t cap);
/* "cost" or "all" (every_draft). */
int tn_cli_spec_policy(const char *opt, const char *name, bool *all);
/* Generation parameters from the options (draws the seed once, compiles
 * an output constraint once); 0, or 1 after saying what is wrong. */
int tn_cli_gen_params(struct tn_gen_params *gp);

struct tn_cli_stream_result {
  struct tn_buf text;          /* everything printed; caller frees */
  enum tn_finish finish;
  int32_t n_prompt, n_cached, n_gen, n_drafted, n_accepted;
  double t_submit, t_first, t_done;
  char error[256];
};
/* Submits ids and prints the text to out as it comes; SIGINT cancels the
 * request (finish CANCELLED, text so far kept). 0, or 1 after an error. */
int tn_cli_stream(struct tn_engine *e, const int32_t *ids, size_t n_ids,
                  const struct tn_gen_params *gp, FILE *out,
                  struct tn_cli_stream_result *res);
void tn_cli_print_timings(const struct tn_cli_stream_result *res);

/* The prompt from -p TEXT, -p - (all of stdin) or -f FILE; *out is
 * malloc'd and NUL-terminated. */
int tn_cli_read_prompt(const char *p, const char *file, char **out,
                       size_t *len);

/* tern bench with speculation flags (bench_spec.c): one prompt (file, or
 * a built-in code edit) generated greedily through the engine, reps times
 * with speculation off and reps times on; prints both decode rates. */
struct tn_cli_bench_spec {
  const char *model;
  long threads, n_gen, reps;
  const char *spec, *draft_model, *spec_layers, *spec_policy, *file;
  long spec_max_tokens;
  float draft_p_min; /* < 0: the default */
  bool json, verbose;
};
int tn_cli_bench_spec(const struct tn_cli_bench_spec *b);

#endif /* TN_CLI_INTERNAL_H */
