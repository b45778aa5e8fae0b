/*
 * prompt.c: requests to prompt tokens, one way for every front end.
 *
 * The server's chat and completions endpoints and the CLI's run and chat
 * commands all build their prompts here, so the same request gives the
 * same tokens, and so the same text, whichever door it came in by. Special
 * tokens spelled in the text are parsed as special tokens (as llama.cpp's
 * and vLLM's servers do), and BOS is added as the vocabulary says.
 */
#include <stdlib.h>

#include "engine/engine.h"
#include "tokenizer/tokenizer.h"

/* A text of len bytes has at least len / longest-token tokens: refuse one
 * that cannot fit before spending time on encoding it. */
static enum tn_status too_long(const struct tn_engine *e, size_t len,
                               struct tn_error *err) {
  const struct tn_tokenizer *tok = tn_engine_tokenizer(e);
  size_t n_ctx = (size_t)tn_engine_n_ctx(e);
  size_t at_least = len / tn_tokenizer_max_token_len(tok);
  if (at_least < n_ctx) return TN_OK;
  return tn_error_set(err, TN_ERANGE,
                      "This model's maximum context length is %zu tokens, "
                      "but the prompt is at least %zu tokens (%zu bytes)",
                      n_ctx, at_least, len);
}

enum tn_status tn_engine_encode_text(const struct tn_engine *e,
                                     const char *text, size_t len,
                                     int32_t **ids, size_t *n_ids,
                                     struct tn_error *err) {
  *ids = NULL;
  *n_ids = 0;
  enum tn_status st = too_long(e, len, err);
  if (st) return st;
  return tn_tokenizer_encode(tn_engine_tokenizer(e), text, len, true, true,
                             ids, n_ids, err);
}

enum tn_status tn_engine_encode_chat(const struct tn_engine *e,
                                     const struct tn_chat_msg *msgs,
                                     size_t n_msgs,
                                     const struct tn_chat_opts *opts,
                                     int32_t **ids, size_t *n_ids,
                                     struct tn_error *err) {
  *ids = NULL;
  *n_ids = 0;
  struct tn_chat_opts dflt = {.add_generation_prompt = true};
  if (!opts) opts = &dflt;
  size_t total = opts->tools_len;
  for (size_t k = 0; k < n_msgs; k++)
    total += msgs[k].content_len + msgs[k].tool_calls_len;
  enum tn_status st = too_long(e, total, err);
  if (st) return st;
  char *text = NULL;
  size_t len = 0;
  const struct tn_tokenizer *tok = tn_engine_tokenizer(e);
  if ((st = tn_chat_render(tok, msgs, n_msgs, opts, &text, &len, err)))
    return st;
  st = tn_tokenizer_encode(tok, text, len, true, true, ids, n_ids, err);
  free(text);
  return st;
}
