/*
 * bench_spec.c: tern bench with speculation flags. Speculation needs
 * real text (drafts are judged on what the model writes), so this part of
 * bench generates through the engine, as tern run does: one prompt (a
 * code edit by default, as chat when the model has a template), greedy,
 * with speculation off and then on, each repeated; it reports the decode
 * rate of each (tokens after the first over the time after the first),
 * the speedup, drafted and accepted tokens, and whether the two texts are
 * the same (they must be).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_internal.h"

static const char k_bench_prompt[] =
    "Rename the variables of this Python function to clearer names and "
    "return the whole function:\n\n"
    "def f(a, t, v):\n"
    "    r = []\n"
    "    c = 0\n"
    "    for i in a:\n"
    "        if i.value > t:\n"
    "            r.append(i.name.upper())\n"
    "            c = c + 1\n"
    "            if v:\n"
    "                print(\"kept\", i.name, i.value)\n"
    "        else:\n"
    "            if v:\n"
    "                print(\"dropped\", i.name, i.value)\n"
    "    s = 0\n"
    "    for i in a:\n"
    "        s = s + i.value\n"
    "    m = s / len(a) if a else 0\n"
    "    return r, c, m\n";

struct spec_run {
  double tg[100];
  int32_t n_gen, drafted, accepted;
  struct tn_buf text;
};

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* reps generations of the prompt on an engine opened from tn_cli_gen. */
static int run_reps(const char *text, size_t len, long reps, FILE *sink,
                    struct spec_run *out) {
  struct tn_engine *e = NULL;
  int32_t *ids = NULL;
  size_t n_ids = 0;
  int rc = 1;
  if (tn_cli_engine_open("bench", false, false, &e)) return 1;
  struct tn_error err = {0};
  enum tn_status st;
  if (tn_chat_available(tn_engine_tokenizer(e))) {
    struct tn_chat_msg m = {.role = "user", .content = text,
                            .content_len = len};
    st = tn_engine_encode_chat(e, &m, 1, NULL, &ids, &n_ids, &err);
  } else {
    st = tn_engine_encode_text(e, text, len, &ids, &n_ids, &err);
  }
  if (st || n_ids == 0 || (int64_t)n_ids >= tn_engine_n_ctx(e)) {
    tn_cli_fail("bench prompt: %s", st ? err.msg : "empty or too long");
    goto done;
  }
  for (long r = 0; r < reps; r++) {
    struct tn_gen_params gp;
    struct tn_cli_stream_result res = {0};
    if (tn_cli_gen_params(&gp)) goto done;
    if (tn_cli_stream(e, ids, n_ids, &gp, sink, &res)) {
      tn_buf_free(&res.text);
      goto done;
    }
    double tg = res.t_done - res.t_first;
    out->tg[r] = tg > 0 && res.n_gen > 1 ? (res.n_gen - 1) / tg : 0.0;
    out->n_gen = res.n_gen;
    out->drafted += res.n_drafted;
    out->accepted += res.n_accepted;
    if (r == 0) {
      out->text = res.text;
    } else {
      tn_buf_free(&res.text);
    }
  }
  qsort(out->tg, (size_t)reps, sizeof(double), cmp_d);
  rc = 0;
done:
  free(ids);
  tn_engine_close(e);
  return rc;
}

int tn_cli_bench_spec(const struct tn_cli_bench_spec *b) {
  tn_cli_gen_init();
  struct tn_cli_gen *g = &tn_cli_gen;
  g->model = b->model;
  g->threads = b->threads;
  g->n_predict = b->n_gen;
  g->sampling.temperature = 0.0f;
  g->seed = 1;
  g->seed_given = true;
  g->spec_max_tokens = b->spec_max_tokens;
  if (b->draft_p_min >= 0) g->draft_p_min = (float)b->draft_p_min;
  g->spec_policy = b->spec_policy;
  g->verbose = b->verbose;
  char *text = NULL;
  size_t len = 0;
  struct spec_run off = {0}, on = {0};
  int rc = 1;
  FILE *sink = fopen("/dev/null", "w");
  if (!sink) return tn_cli_fail("bench: cannot open /dev/null");
  if (b->file) {
    if (tn_cli_read_prompt(NULL, b->file, &text, &len)) goto done;
  } else if (!(text = strdup(k_bench_prompt))) {
    tn_cli_fail("out of memory");
    goto done;
  } else {
    len = strlen(text);
  }
  /* the flags are checked before the first (plain) run */
  struct tn_spec_config sc = {0};
  char pbuf[4096];
  if (tn_cli_spec_setup("--spec", b->spec, b->draft_model, b->spec_layers,
                        &sc, pbuf, sizeof pbuf))
    goto done;
  if (sc.method == TN_SPEC_OFF) {
    tn_cli_fail("bench: --spec off leaves nothing to compare; give ngram, "
                "draft or self");
    goto done;
  }
  if (run_reps(text, len, b->reps, sink, &off)) goto done;
  g->spec = b->spec;
  g->draft_model = b->draft_model;
  g->spec_layers = b->spec_layers;
  if (run_reps(text, len, b->reps, sink, &on)) goto done;
  double tg_off = off.tg[b->reps / 2], tg_on = on.tg[b->reps / 2];
  double ratio = tg_off > 0 ? tg_on / tg_off : 0.0;
  bool same = off.text.len == on.text.len &&
              memcmp(off.text.data, on.text.data, off.text.len) == 0;
  double acc = on.drafted ? (double)on.accepted / on.drafted : 0.0;
  const char *method = tn_spec_method_name(sc.method);
  if (b->json) {
    printf("{\"spec\": \"%s\", \"n_gen\": %d, \"tg_off_tok_s\": %.2f, "
           "\"tg_on_tok_s\": %.2f, \"speedup\": %.3f, \"drafted\": %d, "
           "\"accepted\": %d, \"acceptance\": %.3f, \"same_text\": %s}\n",
           method, on.n_gen, tg_off, tg_on, ratio, on.drafted, on.accepted,
           acc, same ? "true" : "false");
  } else {
    printf("spec %s, %d tokens, median of %ld: decode %.2f tok/s off, "
           "%.2f tok/s on (%.2fx); drafted %d, accepted %d (%.0f%%); same "
           "text: %s\n",
           method, on.n_gen, b->reps, tg_off, tg_on, ratio, on.drafted,
           on.accepted, acc * 100.0, same ? "yes" : "NO");
  }
  if (!same)
    tn_cli_fail("bench: the text with speculation differs from plain "
                "decoding's (a bug: please report it)");
  rc = same ? 0 : 1;
done:
  tn_buf_free(&off.text);
  tn_buf_free(&on.text);
  free(text);
  fclose(sink);
  tn_cli_gen_done();
  return rc;
}
