/*
 * grammar_masks.c: tern's token masks for the reference comparison in
 * tests/e2e/test_grammar_reference.py (not a test itself).
 *
 *   tern-grammar-masks vocab MODEL.gguf      the vocabulary as JSON
 *   tern-grammar-masks gbnf SCHEMA.json      the GBNF a schema compiles to
 *   tern-grammar-masks masks MODEL.gguf G.gbnf
 *       prints the allowed tokens as a hex bitmask line (bit i = token i,
 *       most significant digit first), reads a token id per line, takes
 *       it ("reject" if the grammar refuses it) and prints the next mask;
 *       ends at end of input.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "grammar/grammar.h"
#include "tokenizer/tokenizer.h"

static struct tn_tokenizer *load(const char *path) {
  struct tn_error err = {0};
  struct tn_gguf *g = NULL;
  struct tn_tokenizer *tok = NULL;
  if (tn_gguf_open(path, &g, &err) != TN_OK ||
      tn_tokenizer_load(g, &tok, &err) != TN_OK) {
    fprintf(stderr, "%s: %s\n", path, err.msg);
    exit(1);
  }
  tn_gguf_close(g);
  return tok;
}

static char *slurp(const char *path, size_t *n) {
  char *d = NULL;
  struct tn_error err = {0};
  if (tn_file_read(path, &d, n, &err) != TN_OK) {
    fprintf(stderr, "%s: %s\n", path, err.msg);
    exit(1);
  }
  return d;
}

static void vocab(const char *model) {
  struct tn_tokenizer *tok = load(model);
  int32_t n = tn_tokenizer_n_vocab(tok);
  printf("{\"n_vocab\": %d, \"bos\": %d, \"eog\": [", n, tn_tokenizer_bos(tok));
  int k = 0;
  for (int32_t i = 0; i < n; i++)
    if (tn_tokenizer_is_eog(tok, i)) printf("%s%d", k++ ? ", " : "", i);
  printf("], \"special\": [");
  k = 0;
  for (int32_t i = 0; i < n; i++)
    if (tn_tokenizer_is_special(tok, i)) printf("%s%d", k++ ? ", " : "", i);
  printf("], \"tokens\": [");
  char buf[1024];
  for (int32_t i = 0; i < n; i++) {
    size_t m = tn_tokenizer_piece(tok, i, buf, sizeof buf, true);
    if (m > sizeof buf) m = 0;
    printf("%s\"", i ? ", " : "");
    for (size_t j = 0; j < m; j++) printf("%02x", (unsigned char)buf[j]);
    printf("\"");
  }
  printf("]}\n");
  tn_tokenizer_free(tok);
}

static void print_mask(const uint64_t *bits, int32_t n) {
  int32_t words = (n + 63) / 64;
  for (int32_t w = words; w-- > 0;)
    printf("%016llx", (unsigned long long)bits[w]);
  printf("\n");
  fflush(stdout);
}

static void masks(const char *model, const char *gpath) {
  struct tn_tokenizer *tok = load(model);
  size_t len;
  char *text = slurp(gpath, &len);
  struct tn_error err = {0};
  struct tn_grammar *g = NULL;
  struct tn_grammar_vocab *v = NULL;
  struct tn_grammar_matcher *m = NULL;
  if (tn_grammar_from_gbnf(text, len, &g, &err) != TN_OK ||
      tn_grammar_vocab_new(tok, 64u << 20, &v, &err) != TN_OK ||
      tn_grammar_matcher_new(g, v, &m, &err) != TN_OK) {
    fprintf(stderr, "error: %s\n", err.msg);
    exit(1);
  }
  int32_t n = tn_grammar_vocab_n(v);
  uint64_t *bits = calloc(((size_t)n + 63) / 64, 8);
  char line[64];
  for (;;) {
    if (tn_grammar_matcher_mask(m, bits, &err) != TN_OK) {
      printf("error %s\n", err.msg);
      fflush(stdout);
      break;
    }
    print_mask(bits, n);
    if (!fgets(line, sizeof line, stdin)) break;
    int32_t id = atoi(line);
    if (!tn_grammar_matcher_accept(m, id)) {
      printf("reject\n");
      fflush(stdout);
    }
  }
  free(bits);
  free(text);
  tn_grammar_matcher_free(m);
  tn_grammar_vocab_free(v);
  tn_grammar_release(g);
  tn_tokenizer_free(tok);
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "vocab") == 0) {
    vocab(argv[2]);
  } else if (argc == 3 && strcmp(argv[1], "gbnf") == 0) {
    size_t len;
    char *s = slurp(argv[2], &len), *out = NULL;
    struct tn_error err = {0};
    if (tn_json_schema_to_gbnf(s, len, &out, &err) != TN_OK) {
      printf("error %s\n", err.msg);
      return 2;
    }
    fputs(out, stdout);
    free(out);
    free(s);
  } else if (argc == 4 && strcmp(argv[1], "masks") == 0) {
    masks(argv[2], argv[3]);
  } else {
    fprintf(stderr,
            "usage: tern-grammar-masks vocab MODEL | gbnf SCHEMA | "
            "masks MODEL GBNF\n");
    return 2;
  }
  return 0;
}
