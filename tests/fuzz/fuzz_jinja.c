/*
 * fuzz_jinja.c: libFuzzer target for the Jinja interpreter (src/jinja/):
 * templates are untrusted input (a GGUF's tokenizer.chat_template, a
 * --chat-template file).
 *
 * Input: template text, a NUL byte, then a JSON object whose keys become
 * the variables (no NUL: the template alone, with an empty context).
 * Renders under small limits so each input ends fast.
 *
 * Invariants, each a trap when broken: compile and render either succeed
 * (a malloc'd buffer NUL-terminated after out_len bytes, within the output
 * limit) or fail with TN_EINVAL, TN_ERANGE or TN_ENOMEM and a message;
 * rendering the same template twice gives the same bytes.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_jinja
 *   ./build-fuzz/fuzz_jinja -max_len=8192 -dict=tests/fuzz/jinja.dict \
 *       /tmp/corpus tests/fuzz/seeds/jinja
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja/jinja.h"

#define CHECK(x)                                                    \
  do {                                                              \
    if (!(x)) {                                                     \
      fprintf(stderr, "fuzz_jinja: invariant failed: %s (%s:%d)\n", \
              #x, __FILE__, __LINE__);                              \
      abort();                                                      \
    }                                                               \
  } while (0)

static bool bad_status(enum tn_status st) {
  return st != TN_EINVAL && st != TN_ERANGE && st != TN_ENOMEM;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 16384) return 0;
  const char *p = (const char *)data;
  const char *nul = memchr(p, '\0', size);
  size_t tn = nul ? (size_t)(nul - p) : size;
  struct tn_error err = {0};
  struct tn_jinja *t = NULL;
  enum tn_status st = tn_jinja_compile(p, tn, &t, &err);
  if (st != TN_OK) {
    CHECK(t == NULL && !bad_status(st) && err.msg[0]);
    return 0;
  }
  struct tn_jinja_limits lim;
  tn_jinja_limits_default(&lim);
  lim.max_steps = 200000;
  lim.max_output = 1 << 16;
  lim.max_memory = 32 << 20;
  lim.max_depth = 24;
  lim.now = 1700000000;
  char *out[2] = {NULL, NULL};
  size_t n[2] = {0, 0};
  enum tn_status rs[2];
  for (int k = 0; k < 2; k++) {
    struct tn_jinja_ctx *c = tn_jinja_ctx_new(64 << 20);
    CHECK(c != NULL);
    if (nul) {
      struct tn_jinja_val *v = NULL;
      struct tn_error je = {0};
      if (tn_jinja_json(c, nul + 1, size - tn - 1, &v, &je) == TN_OK)
        tn_jinja_set_all(c, v);
    }
    struct tn_error re = {0};
    rs[k] = tn_jinja_render(t, c, &lim, &out[k], &n[k], &re);
    if (rs[k] == TN_OK) {
      CHECK(out[k] && out[k][n[k]] == '\0' && n[k] <= lim.max_output);
    } else {
      CHECK(out[k] == NULL && !bad_status(rs[k]) && re.msg[0]);
    }
    tn_jinja_ctx_free(c);
  }
  CHECK(rs[0] == rs[1]);
  if (rs[0] == TN_OK)
    CHECK(n[0] == n[1] && memcmp(out[0], out[1], n[0]) == 0);
  free(out[0]);
  free(out[1]);
  tn_jinja_free(t);
  return 0;
}
