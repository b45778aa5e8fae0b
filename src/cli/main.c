/*
 * main.c: the `tern` command and its subcommands.
 *
 *   tern run -m MODEL -p PROMPT [-n N] [--temp T] [--seed S] [--chat] ...
 *   tern tokenize -m MODEL            (text on stdin, JSON ids on stdout)
 *   tern bench -m MODEL [-t N] [-p 512] [-n 128] [-r 3] [--json]
 *   tern perplexity -m MODEL -f FILE [-c 512]
 *   tern serve -m MODEL [--port 8080] ...  (see serve.c)
 *
 * stdout carries only results (generated text, ids, numbers); logs and
 * errors go to stderr. Each failure prints one line and exits non-zero.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/cli.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: tern <command> [options]\n"
          "\n"
          "commands:\n"
          "  run         generate text from a prompt\n"
          "  tokenize    print the token ids of stdin as a JSON array\n"
          "  bench       prefill and decode speed (like llama-bench)\n"
          "  perplexity  perplexity of a text file (like llama-perplexity)\n"
          "  serve       OpenAI-compatible HTTP server (tern serve --help)\n"
          "\n"
          "common options:\n"
          "  -m, --model PATH|NAME   GGUF file, or a short name under models/\n"
          "  -t, --threads N         compute threads (default: all cores)\n"
          "  -v, --verbose           debug logging\n"
          "\n"
          "run: -p PROMPT [-n N] [--temp T] [--seed S] [--top-k K] [--top-p P]\n"
          "     [--min-p P] [--repeat-penalty R] [--stop STR]... [--chat]\n"
          "     [--system TEXT] [-c CTX]\n"
          "bench: [-p N_PROMPT] [-n N_GEN] [-r REPS] [--json]\n"
          "perplexity: -f FILE [-c CTX]\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "run")) return tn_cli_run(argc - 1, argv + 1);
  if (!strcmp(cmd, "tokenize")) return tn_cli_tokenize(argc - 1, argv + 1);
  if (!strcmp(cmd, "bench")) return tn_cli_bench(argc - 1, argv + 1);
  if (!strcmp(cmd, "perplexity")) return tn_cli_perplexity(argc - 1, argv + 1);
  if (!strcmp(cmd, "serve")) return tn_cli_serve(argc - 1, argv + 1);
  fprintf(stderr, "tern: unknown command '%s' (try 'tern --help')\n", cmd);
  return 2;
}
