/*
 * run.c: `tern run`, one prompt through the engine, the text streamed to
 * stdout as it is generated.
 *
 *   tern run -m MODEL -p "The capital of France is" --temp 0 -n 32
 *   tern run -m MODEL --chat -p "Name three rivers."
 *   tern run -m MODEL -f long_prompt.txt     (or: ... | tern run -m M -p -)
 *
 * Same engine, prompt encoding, sampler and stop logic as `tern serve`:
 * a request with the same parameters gives the same text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_internal.h"

int tn_cli_run(int argc, char **argv) {
  tn_cli_gen_init();
  const char *prompt = NULL, *file = NULL, *system = NULL;
  bool chat = false;
  const struct tn_opt prompt_opts[] = {
      {"prompt", 'p', TN_OPT_STR, &prompt, 0, 0, "TEXT",
       "the prompt; '-' reads it from stdin", NULL, NULL, TN_OPT_EMPTY_OK},
      {"file", 'f', TN_OPT_STR, &file, 0, 0, "FILE",
       "read the prompt from FILE", NULL, NULL, 0},
      {"chat", 0, TN_OPT_FLAG, &chat, 0, 0, NULL,
       "format the prompt as a user message with the model's chat template",
       NULL, NULL, 0},
      {"system", 0, TN_OPT_STR, &system, 0, 0, "TEXT",
       "a system message (implies --chat)", NULL, NULL, 0},
      {0},
  };
  const struct tn_opt_group groups[] = {
      {"prompt", prompt_opts},
      {"model", tn_cli_model_opts},
      {"sampling", tn_cli_sampling_opts},
      {NULL, NULL},
  };
  static const struct tn_cli_cmd cmd = {
      "run", "tern run -m MODEL (-p TEXT | -p - | -f FILE) [options]",
      "Generates text from one prompt and streams it to stdout (timings go "
      "to stderr).\nCtrl-C stops the generation.",
      "examples:\n"
      "  tern run -m qwen2.5-coder-0.5b --chat -p \"Write a haiku about C.\"\n"
      "  tern run -m smollm2-135m -p \"The capital of France is\" --temp 0 -n 16\n"
      "  cat notes.txt | tern run -m qwen2.5-coder-0.5b --chat -p -",
      0};
  int rc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (rc) return rc;
  if (system) chat = true;
  char *text = NULL;
  size_t text_len = 0;
  if (tn_cli_read_prompt(prompt, file, &text, &text_len)) return 1;
  struct tn_engine *e = NULL;
  int32_t *ids = NULL;
  size_t n_ids = 0;
  struct tn_cli_stream_result res = {0};
  rc = 1;
  if (tn_cli_engine_open("run", chat, false, &e)) goto done;
  struct tn_error err = {0};
  enum tn_status st;
  if (chat) {
    struct tn_chat_msg msgs[2];
    size_t n = 0;
    if (system) msgs[n++] = (struct tn_chat_msg){
          .role = "system", .content = system, .content_len = strlen(system)};
    msgs[n++] = (struct tn_chat_msg){
        .role = "user", .content = text, .content_len = text_len};
    st = tn_engine_encode_chat(e, msgs, n, NULL, &ids, &n_ids, &err);
  } else {
    st = tn_engine_encode_text(e, text, text_len, &ids, &n_ids, &err);
  }
  if (st) {
    tn_cli_fail("prompt: %s", err.msg);
    goto done;
  }
  if (n_ids == 0) {
    tn_cli_fail("prompt: empty (0 tokens)");
    goto done;
  }
  if ((int64_t)n_ids >= tn_engine_n_ctx(e)) {
    tn_cli_fail("prompt: %zu tokens do not fit the context of %d (raise it "
                "with -c)",
                n_ids, tn_engine_n_ctx(e));
    goto done;
  }
  struct tn_gen_params gp;
  if (tn_cli_gen_params(&gp)) goto done;
  tn_cli_catch_sigint();
  if (tn_cli_stream(e, ids, n_ids, &gp, stdout, &res)) goto done;
  fputc('\n', stdout);
  fflush(stdout);
  if (tn_cli_gen.verbose || res.finish != TN_FINISH_CANCELLED)
    tn_cli_print_timings(&res);
  rc = res.finish == TN_FINISH_CANCELLED ? 130 : 0;
done:
  tn_buf_free(&res.text);
  free(ids);
  free(text);
  tn_engine_close(e);
  tn_cli_gen_done();
  return rc;
}
