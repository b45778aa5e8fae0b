/*
 * tokenizer.h: text <-> token ids from a GGUF vocabulary, and chat
 * formatting.
 *
 * Two vocabularies: byte-level BPE (tokenizer.ggml.model = "gpt2", with the
 * pre-tokenizer regexes named by tokenizer.ggml.pre, run through PCRE2) and
 * SentencePiece ("llama": score-driven merges with byte fallback). Special
 * and added tokens are found in text before the model tokenizer runs.
 * Every id read from metadata is validated against the vocabulary size.
 */
#ifndef TN_TOKENIZER_H
#define TN_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "gguf/gguf.h"

struct tn_tokenizer;

/* Longest text tn_tokenizer_encode accepts, in bytes. */
#define TN_TOKENIZER_MAX_TEXT (256 << 20)

/* Builds the tokenizer from g's metadata (copies what it keeps: g may be
 * closed afterwards). */
enum tn_status tn_tokenizer_load(const struct tn_gguf *g,
                                 struct tn_tokenizer **out,
                                 struct tn_error *err);
void tn_tokenizer_free(struct tn_tokenizer *tok);

int32_t tn_tokenizer_n_vocab(const struct tn_tokenizer *tok);
int32_t tn_tokenizer_bos(const struct tn_tokenizer *tok); /* -1 if none */
int32_t tn_tokenizer_eos(const struct tn_tokenizer *tok); /* -1 if none */
/* End of turn (<|im_end|>, <end_of_turn>, <|eot_id|>, ...); -1 if none. */
int32_t tn_tokenizer_eot(const struct tn_tokenizer *tok);
/* Whether encode(add_special=true) prepends BOS (tokenizer.ggml.add_bos_token
 * or the vocabulary's default). */
bool tn_tokenizer_add_bos(const struct tn_tokenizer *tok);
/* End of generation: EOS, EOT (<|im_end|>, <end_of_turn>, ...). */
bool tn_tokenizer_is_eog(const struct tn_tokenizer *tok, int32_t id);
/* Control/special token (not rendered in normal text output). */
bool tn_tokenizer_is_special(const struct tn_tokenizer *tok, int32_t id);
/* The longest token text in bytes: no token covers more input bytes, so
 * len / tn_tokenizer_max_token_len() bounds a text's token count from
 * below without encoding it. */
size_t tn_tokenizer_max_token_len(const struct tn_tokenizer *tok);
/* Looks up a token by its exact text; -1 if none. */
int32_t tn_tokenizer_find(const struct tn_tokenizer *tok, const char *text,
                          size_t len);

/* Encodes len bytes of text (any bytes, NUL included).
 * add_special: add BOS/EOS as the metadata says (add_bos_token, ...).
 * parse_special: text that spells a special/added token becomes that token.
 * *out is malloc'd (caller frees with free()); *n_out its length. */
enum tn_status tn_tokenizer_encode(const struct tn_tokenizer *tok,
                                   const char *text, size_t len,
                                   bool add_special, bool parse_special,
                                   int32_t **out, size_t *n_out,
                                   struct tn_error *err);

/* The raw bytes token id stands for (byte-level BPE and <0xNN> bytes
 * decoded, SentencePiece's U+2581 as a space). Special tokens give their
 * text only when render_special. Returns the byte count (may exceed cap:
 * then only cap bytes were written); 0 for an invalid id. */
size_t tn_tokenizer_piece(const struct tn_tokenizer *tok, int32_t id,
                          char *buf, size_t cap, bool render_special);

/* Streaming detokenizer: feeds pieces, emits only whole UTF-8 characters;
 * an invalid sequence becomes U+FFFD. */
struct tn_detok {
  const struct tn_tokenizer *tok;
  char pending[8];
  size_t n_pending;
  bool render_special;
};
void tn_detok_init(struct tn_detok *d, const struct tn_tokenizer *tok,
                   bool render_special);
/* Appends the text completed by token id to out (cap bytes); returns bytes
 * written. cap >= 256 suffices for one token whose piece is at most 80
 * bytes (every token of our models); tn_detok_cap() always suffices. Output
 * that does not fit is dropped, never overrun. */
size_t tn_detok_push(struct tn_detok *d, int32_t id, char *out, size_t cap);
size_t tn_detok_cap(const struct tn_tokenizer *tok);
/* Flushes what is pending (incomplete bytes become U+FFFD). */
size_t tn_detok_flush(struct tn_detok *d, char *out, size_t cap);

/* ---- chat formatting
 *
 * Runs the model's own tokenizer.chat_template (Jinja, src/jinja/) on the
 * conversation, so the prompt is what the model was trained on, byte for
 * byte as Hugging Face's apply_chat_template renders it. */
struct tn_chat_msg {
  const char *role;
  const char *content; /* NULL: no content (None in the template) */
  size_t content_len;
  /* optional, zero when unused: */
  const char *tool_calls_json; /* assistant: OpenAI "tool_calls" array */
  size_t tool_calls_len;
  const char *tool_call_id; /* role "tool": the call this answers */
  const char *name;         /* role "tool": the function's name */
};

struct tn_chat_opts {
  bool add_generation_prompt;
  const char *tools_json; /* OpenAI "tools" array as JSON, or NULL */
  size_t tools_len;
  const char *kwargs_json; /* "chat_template_kwargs" object, or NULL */
  size_t kwargs_len;
  const char *documents_json; /* "documents" array (RAG templates), or NULL */
  size_t documents_len;
};

/* On success *out is malloc'd (caller frees with free()), *out_len bytes
 * long (contents may hold NULs) and NUL-terminated after them, also when
 * empty; on failure *out is NULL and *out_len 0. Errors: TN_EUNSUPPORTED
 * when the model has no usable template; TN_EINVAL when the template
 * refuses the conversation (its raise_exception text) or fails; TN_ERANGE
 * for a sandbox limit. */
enum tn_status tn_chat_render(const struct tn_tokenizer *tok,
                              const struct tn_chat_msg *msgs, size_t n_msgs,
                              const struct tn_chat_opts *opts, char **out,
                              size_t *out_len, struct tn_error *err);
/* tn_chat_render with only add_generation_prompt. */
enum tn_status tn_chat_format(const struct tn_tokenizer *tok,
                              const struct tn_chat_msg *msgs, size_t n_msgs,
                              bool add_generation_prompt, char **out,
                              size_t *out_len, struct tn_error *err);
/* What the template is: "chatml", "gemma", "llama3" (recognised by their
 * markers), "jinja" (any other), or "none" (no usable template). */
const char *tn_chat_template_name(const struct tn_tokenizer *tok);
/* Whether tn_chat_format can format for this model. */
bool tn_chat_available(const struct tn_tokenizer *tok);
/* How tool calls look for this model.
 *  - NATIVE: the template has a tools section in the <tool_call> JSON
 *    convention (Qwen 2.5/3, Hermes, SmolLM3): tools go to the template.
 *  - INJECTED: the template knows nothing of tools: tern writes the same
 *    convention into the system turn, and tool turns into <tool_call> and
 *    <tool_response> text, before the template runs.
 *  - OTHER: a tools section in another format (Llama 3.1 JSON, Mistral,
 *    DeepSeek markers): not parsed yet. */
enum tn_chat_tools {
  TN_CHAT_TOOLS_NATIVE,
  TN_CHAT_TOOLS_INJECTED,
  TN_CHAT_TOOLS_OTHER,
  TN_CHAT_TOOLS_COUNT
};
enum tn_chat_tools tn_chat_tools_format(const struct tn_tokenizer *tok);
/* Whether the template reads the variable name ("documents", ...). */
bool tn_chat_uses_var(const struct tn_tokenizer *tok, const char *name);
/* Uses another template instead of the GGUF's: a built-in one by name
 * ("chatml", "gemma", "llama3"; the vocabulary must have its special
 * tokens) or a Jinja file's path. */
enum tn_status tn_chat_set_template(struct tn_tokenizer *tok,
                                    const char *name, struct tn_error *err);
/* Fixes strftime_now's clock (Unix seconds, UTC; 0: the real clock), for
 * reproducible renders. */
void tn_chat_set_clock(struct tn_tokenizer *tok, int64_t now);

#endif /* TN_TOKENIZER_H */
