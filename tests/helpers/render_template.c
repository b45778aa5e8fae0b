/*
 * render_template.c: renders a chat template with tern's Jinja interpreter
 * for the comparison with jinja2 in tests/e2e/test_chat_templates.py (not
 * a test itself).
 *
 *   tern-render-template TEMPLATE_FILE [--now EPOCH] [--repeat N] < context.json
 *
 * --repeat N renders N more times and prints the mean time per render to
 * stderr (the cost a chat request pays).
 * The JSON object's keys become the template's variables. Prints the
 * rendering and exits 0, or prints "tern-render-template: error: ..." and
 * exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja/jinja.h"

static char *read_all(FILE *f, size_t *n) {
  size_t cap = 1 << 16, len = 0;
  char *p = malloc(cap);
  for (;;) {
    if (!p) return NULL;
    size_t k = fread(p + len, 1, cap - len, f);
    len += k;
    if (k == 0) break;
    if (len == cap) {
      cap *= 2;
      char *q = realloc(p, cap);
      if (!q) {
        free(p);
        return NULL;
      }
      p = q;
    }
  }
  *n = len;
  return p;
}

static int fail(const char *msg) {
  fprintf(stderr, "tern-render-template: error: %s\n", msg);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) return fail("usage: tern-render-template FILE [--now EPOCH]");
  struct tn_jinja_limits lim;
  tn_jinja_limits_default(&lim);
  long repeat = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--now")) lim.now = strtoll(argv[i + 1], NULL, 10);
    if (!strcmp(argv[i], "--repeat")) repeat = strtol(argv[i + 1], NULL, 10);
  }
  struct tn_error err = {0};
  char *src = NULL;
  size_t n = 0;
  if (tn_file_read(argv[1], &src, &n, &err) != TN_OK) return fail(err.msg);
  struct tn_jinja *t = NULL;
  if (tn_jinja_compile(src, n, &t, &err) != TN_OK) {
    free(src);
    return fail(err.msg);
  }
  free(src);
  size_t jn = 0;
  char *json = read_all(stdin, &jn);
  if (!json) return fail("out of memory reading stdin");
  struct tn_jinja_ctx *c = tn_jinja_ctx_new(0);
  struct tn_jinja_val *v = NULL;
  if (!c || tn_jinja_json(c, json, jn, &v, &err) != TN_OK) {
    free(json);
    return fail(c ? err.msg : "out of memory");
  }
  free(json);
  if (!tn_jinja_is_dict(v)) return fail("the context must be a JSON object");
  tn_jinja_set_all(c, v); /* every key becomes a variable */
  char *out = NULL;
  size_t out_n = 0;
  if (tn_jinja_render(t, c, &lim, &out, &out_n, &err) != TN_OK) {
    tn_jinja_ctx_free(c);
    tn_jinja_free(t);
    return fail(err.msg);
  }
  fwrite(out, 1, out_n, stdout);
  free(out);
  if (repeat > 0) {
    double t0 = tn_time_s();
    for (long k = 0; k < repeat; k++) {
      char *o = NULL;
      size_t on = 0;
      if (tn_jinja_render(t, c, &lim, &o, &on, &err) == TN_OK) free(o);
    }
    fprintf(stderr, "%.1f us per render (%zu bytes)\n",
            (tn_time_s() - t0) / (double)repeat * 1e6, out_n);
  }
  tn_jinja_ctx_free(c);
  tn_jinja_free(t);
  return 0;
}
