/*
 * api.h: the OpenAI schema, in and out (server-internal).
 *
 * tn_api_parse() turns a request body (JSON, untrusted) into a typed
 * request, checking every field's type and range; each rejection names the
 * parameter and the bad value in an OpenAI error object (HTTP 400).
 * tn_api_render_*() turn the engine's request objects (struct tn_req,
 * read under tn_req_lock) into response bodies and SSE chunks. Nothing
 * here knows about sockets.
 */
#ifndef TN_SERVER_API_H
#define TN_SERVER_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "grammar/grammar.h"
#include "tokenizer/tokenizer.h"


enum tn_api_kind {
  TN_API_CHAT,        /* POST /v1/chat/completions */
  TN_API_COMPLETIONS, /* POST /v1/completions */
};

/* One completions prompt: text, or token ids (exactly one is set). */
struct tn_api_prompt {
  char *text;
  size_t len;
  int32_t *ids;
  size_t n_ids;
};

struct tn_api_request {
  enum tn_api_kind kind;
  char *model;                /* NULL when absent */
  bool stream;
  bool include_usage;         /* stream_options.include_usage */
  /* chat: messages (role and content malloc'd; content may hold NULs) */
  struct tn_chat_msg *msgs;
  size_t n_msgs;
  /* completions: one or more prompts */
  struct tn_api_prompt *prompts;
  size_t n_prompts;
  bool echo;                  /* completions: prepend the prompt text */
  int32_t max_tokens;         /* -1 when absent (the engine fills to the
                                 context) */
  /* sampling etc.; gen.sampling.bias and gen.stops point into the arrays
   * below, owned by this struct */
  struct tn_gen_params gen;
  struct tn_logit_bias *bias;
  char **stops;
  char *user;
  bool has_seed;              /* seed given (else the server picks one) */
  bool has_lora_scale;        /* "lora_scale" given (an adapter's scale) */
  float lora_scale;
  struct tn_grammar *grammar; /* response_format / structured_outputs /
                                 guided_* / grammar: gen.grammar, owned */
  char **options;             /* a choice list (gen.options when its
                                 probabilities are followed), owned */
  size_t *option_lens;
  int32_t n_options;
  /* chat: tools (tools.c). tools_json is the "tools" array as JSON for
   * the template; tool_names the functions' names, in order */
  char *tools_json;
  size_t tools_len;
  char **tool_names;
  size_t n_tools;
  enum tn_api_tool_choice {
    TN_API_TOOLS_NONE,     /* no tools, or tool_choice "none" */
    TN_API_TOOLS_AUTO,     /* the model may call one */
    TN_API_TOOLS_REQUIRED, /* it must call at least one */
    TN_API_TOOLS_NAMED,    /* it must call tool_named */
  } tool_choice;
  size_t tool_named;
  bool parallel_tool_calls;   /* default true */
  char *template_kwargs;      /* chat_template_kwargs as JSON, or NULL */
  size_t template_kwargs_len;
  char *documents;            /* "documents" (RAG templates) as JSON */
  size_t documents_len;
};

struct tn_api_error {
  int http_status;            /* 400, 401, 404, 413, 429, 503, 500 */
  char type[40];              /* "invalid_request_error", ... */
  char param[64];             /* "" when none */
  char code[40];              /* "" when none */
  char message[512];
  int retry_after;            /* seconds for Retry-After (0: the default) */
};

/* Fills err (may be NULL) and returns http_status. */
int tn_api_error_set(struct tn_api_error *err, int http_status,
                     const char *type, const char *param, const char *code,
                     const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* {"error":{"message":...,"type":...,"param":...|null,"code":...|null}} */
char *tn_api_error_json(const struct tn_api_error *err, size_t *len);

/* Parses and checks body[len]. 0 on success (free *out with
 * tn_api_request_free); else err is filled (status 400) and *out is left
 * empty. Checks that need the model (vocabulary, context) are separate. */
int tn_api_parse(enum tn_api_kind kind, const char *body, size_t len,
                 struct tn_api_request *out, struct tn_api_error *err);
void tn_api_request_free(struct tn_api_request *q);
/* Checks against the model: logit_bias ids and token-id prompts within
 * n_vocab. 0 or 400. */
int tn_api_check_vocab(const struct tn_api_request *q, int32_t n_vocab,
                       struct tn_api_error *err);

/* What a response needs besides the requests. */
struct tn_api_meta {
  const char *id;             /* "chatcmpl-..." / "cmpl-..." */
  long created;               /* unix seconds */
  const char *model;          /* name to report */
  const struct tn_tokenizer *tok;
  /* completions with echo: the prompt text of each tn_req */
  const char *const *echo_text;
  const size_t *echo_len;
  /* usage.cost in USD, when priced: tokens at these prices (USD per
   * million; cached prompt tokens at price_cached) plus cost_extra (what a
   * cascade's earlier stages cost) */
  bool priced;
  double price_prompt, price_cached, price_completion, cost_extra;
  double price_compute; /* USD per hour of the requests' compute_s */
};

/* A whole non-streaming response for reqs[n_reqs] (completions: one per
 * prompt, choice index = prompt * n + sample). Every req must be done.
 * Returns malloc'd JSON, NULL when out of memory. */
char *tn_api_render_response(const struct tn_api_request *q,
                             const struct tn_api_meta *meta,
                             struct tn_req *const *reqs, size_t n_reqs,
                             size_t *len);

/* Streaming: what was already sent, per choice. */
struct tn_api_stream {
  size_t n_choices;
  struct {
    size_t text_sent;         /* bytes of choice text sent */
    int32_t toks_sent;        /* tokens whose logprobs were sent */
    bool role_sent;           /* chat: the first delta carries the role;
                                 completions: the echo text was sent */
    bool finish_sent;
    size_t offset_sent;       /* completions: text_offset (characters) of
                                 the next token */
  } *c;
  bool usage_sent;
  bool done_sent;             /* "data: [DONE]" */
};
void tn_api_stream_init(struct tn_api_stream *st);
void tn_api_stream_free(struct tn_api_stream *st);
/* Appends to out the SSE events ("data: {...}\n\n") for everything new in
 * reqs since the last call: text deltas (with logprobs when asked), a
 * chunk with finish_reason when a choice ends, then, once every req is
 * done, the usage chunk (when include_usage) and "data: [DONE]\n\n".
 * Returns true when the stream is complete. */
bool tn_api_render_stream(const struct tn_api_request *q,
                          const struct tn_api_meta *meta,
                          struct tn_req *const *reqs, size_t n_reqs,
                          struct tn_api_stream *st, struct tn_buf *out);

/* ---- tools (tools.c): calls in the <tool_call> JSON convention */

struct tn_tool_call {
  char *name;
  char *arguments; /* compact JSON text */
};

struct tn_tool_calls {
  size_t content_len; /* the text before the first call (the content) */
  struct tn_tool_call *calls;
  size_t n_calls;
};

/* Finds the calls in a model's text: <tool_call>{"name": ..., "arguments":
 * {...}}</tool_call> blocks (the last may lack its closing tag), or a whole
 * text that is one such object (bare or in a ```json fence). False when
 * there is none, a block does not parse, or it names a function not in
 * names[n_names]: then the whole text is content. */
bool tn_tools_parse(const char *text, size_t len, char *const *names,
                    size_t n_names, struct tn_tool_calls *out);
void tn_tool_calls_free(struct tn_tool_calls *tc);
/* How much of a partial text may stream as content: up to the first
 * "<tool_call>", short of a tail that could begin one, and nothing of a
 * text that opens like a bare call ('{' or a fence). */
size_t tn_tools_stream_safe(const char *text, size_t len);
/* The grammar a forced tool_choice decodes under: one call (or, with
 * parallel calls, one or more) to the named tool or any of them, each
 * call's arguments valid against the function's parameters. tools is the
 * request's "tools" array (checked by the parser). 0 or 400. */
int tn_tools_grammar(const char *tools_json, size_t tools_len,
                     const char *only, bool parallel,
                     struct tn_grammar **out, struct tn_api_error *err);

#endif /* TN_SERVER_API_H */
