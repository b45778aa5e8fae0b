/*
 * test_tokenizer.c: the tokenizer against llama.cpp's ids for a corpus of
 * 250 strings per model (tests/fixtures/tokenizer/<model>.jsonl, made by
 * tools/gen_tokenizer_fixtures.py with llama-tokenize), round trips through
 * pieces and the streaming detokenizer, chat formatting against jinja2
 * renderings of the real templates, and metadata validation on synthetic
 * GGUF files.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tn_test.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h" /* tn_utf8_decode */

#ifndef TN_SOURCE_DIR
#define TN_SOURCE_DIR "."
#endif

#define FIXDIR TN_SOURCE_DIR "/tests/fixtures/tokenizer/"
#define MODELDIR TN_SOURCE_DIR "/models/"

static struct tn_tokenizer *load_model(const char *file) {
  char path[1024];
  snprintf(path, sizeof(path), MODELDIR "%s", file);
  if (access(path, R_OK) != 0) {
    tn_test_skip("%s not present", path);
    return NULL;
  }
  struct tn_error err = {0};
  struct tn_gguf *g = NULL;
  if (tn_gguf_open(path, &g, &err) != TN_OK) { /* present but broken */
    TN_FAIL_NORETURN("open %s: %s", path, err.msg);
    return NULL;
  }
  struct tn_tokenizer *tok = NULL;
  enum tn_status st = tn_tokenizer_load(g, &tok, &err);
  tn_gguf_close(g); /* the tokenizer keeps copies */
  if (st != TN_OK) {
    TN_FAIL_NORETURN("load %s: %s", path, err.msg);
    return NULL;
  }
  tn_test_ran();
  return tok;
}

static bool utf8_valid(const char *s, size_t n) {
  uint32_t c;
  for (size_t i = 0, l; i < n; i += l)
    if (!(l = tn_utf8_decode((const uint8_t *)s + i, n - i, &c))) return false;
  return true;
}

static void print_escaped(const char *s, size_t n) {
  fputc('"', stderr);
  for (size_t i = 0; i < n && i < 120; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '\n') fputs("\\n", stderr);
    else if (c == '\t') fputs("\\t", stderr);
    else if (c < 0x20 || c == 0x7f) fprintf(stderr, "\\x%02x", c);
    else fputc(c, stderr);
  }
  if (n > 120) fputs("...", stderr);
  fputc('"', stderr);
}

static void print_ids(const char *label, const int32_t *v, size_t n) {
  fprintf(stderr, "  %s (%zu):", label, n);
  for (size_t i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", v[i]);
  if (n > 40) fputs(" ...", stderr);
  fputc('\n', stderr);
}

/* Reads one corpus line: text bytes (malloc'd) and the expected ids. */
static bool corpus_line(json_t *rec, char **text, size_t *len, int32_t **ids,
                        size_t *n_ids) {
  json_t *t = json_object_get(rec, "text");
  json_t *h = json_object_get(rec, "hex");
  json_t *a = json_object_get(rec, "ids");
  if (!t && !h) return false;
  if (t) {
    *len = json_string_length(t);
    *text = malloc(*len + 1);
    memcpy(*text, json_string_value(t), *len);
  } else {
    const char *x = json_string_value(h);
    *len = strlen(x) / 2;
    *text = malloc(*len + 1);
    for (size_t i = 0; i < *len; i++) {
      unsigned v;
      sscanf(x + 2 * i, "%2x", &v);
      (*text)[i] = (char)v;
    }
  }
  if (!json_is_array(a)) { /* llama.cpp failed on this input */
    *ids = NULL;
    *n_ids = 0;
    return true;
  }
  *n_ids = json_array_size(a);
  *ids = malloc((*n_ids + 1) * sizeof(int32_t));
  for (size_t i = 0; i < *n_ids; i++)
    (*ids)[i] = (int32_t)json_integer_value(json_array_get(a, i));
  return true;
}

/* The corpus against llama.cpp, plus round trips. */
static int check_corpus(const char *model_file, const char *fixture) {
  struct tn_tokenizer *tok = load_model(model_file);
  if (!tok) {
    char p[1024];
    snprintf(p, sizeof(p), MODELDIR "%s", model_file);
    return access(p, R_OK) == 0 ? 1 : 0; /* present but broken: fail */
  }
  FILE *f = fopen(fixture, "r");
  if (!f) {
    fprintf(stderr, "missing fixture %s\n", fixture);
    tn_tokenizer_free(tok);
    return 1;
  }
  bool spm = tn_tokenizer_find(tok, "<0x0A>", 6) >= 0;
  char *line = NULL;
  size_t cap = 0, n_lines = 0, n_bad = 0, n_rt = 0, n_rt_bad = 0,
         n_detok_bad = 0, n_noref = 0;
  ssize_t got;
  size_t dcap = tn_detok_cap(tok);
  char *dbuf = malloc(dcap);
  while ((got = getline(&line, &cap, f)) > 0) {
    json_error_t je;
    json_t *rec = json_loadb(line, (size_t)got, JSON_ALLOW_NUL, &je);
    char *text = NULL;
    size_t len = 0, n_want = 0, n_got = 0;
    int32_t *want = NULL, *ids = NULL;
    if (!rec || !corpus_line(rec, &text, &len, &want, &n_want)) {
      fprintf(stderr, "%s:%zu: bad fixture line\n", fixture, n_lines + 1);
      n_bad++;
      json_decref(rec);
      continue;
    }
    n_lines++;
    struct tn_error err = {0};
    if (tn_tokenizer_encode(tok, text, len, true, true, &ids, &n_got, &err) !=
        TN_OK) {
      fprintf(stderr, "encode failed: %s\n", err.msg);
      n_bad++;
    } else if (!want) {
      n_noref++;
    } else if (n_got != n_want ||
               memcmp(ids, want, n_got * sizeof(int32_t)) != 0) {
      if (n_bad < 10) {
        fprintf(stderr, "%s: mismatch for ", model_file);
        print_escaped(text, len);
        fputc('\n', stderr);
        print_ids("llama.cpp", want, n_want);
        print_ids("tern     ", ids, n_got);
      }
      n_bad++;
    }
    /* round trip: lossless for valid UTF-8 (and, for SentencePiece, text
     * without a literal U+2581, which decodes to a space) */
    bool lossless = utf8_valid(text, len) &&
                    !(spm && memmem(text, len, "\xE2\x96\x81", 3));
    if (ids) {
      size_t skip = (n_got > 0 && tn_tokenizer_add_bos(tok) &&
                     ids[0] == tn_tokenizer_bos(tok))
                        ? 1
                        : 0;
      size_t ocap = len * 4 + 64, on = 0, dn = 0;
      char *o = malloc(ocap), *d = malloc(ocap + dcap);
      for (size_t i = skip; i < n_got; i++) {
        char p[512];
        size_t pl = tn_tokenizer_piece(tok, ids[i], p, sizeof(p), true);
        if (on + pl <= ocap) memcpy(o + on, p, TN_MIN(pl, sizeof(p)));
        on += pl;
      }
      struct tn_detok dt;
      tn_detok_init(&dt, tok, true);
      for (size_t i = skip; i < n_got; i++) {
        size_t w = tn_detok_push(&dt, ids[i], dbuf, dcap);
        if (dn + w <= ocap) memcpy(d + dn, dbuf, w);
        dn += w;
      }
      size_t w = tn_detok_flush(&dt, dbuf, dcap);
      if (dn + w <= ocap) memcpy(d + dn, dbuf, w);
      dn += w;
      if (dn > ocap || !utf8_valid(d, dn)) {
        if (n_detok_bad < 5) {
          fprintf(stderr, "%s: detok emitted invalid UTF-8 for ", model_file);
          print_escaped(text, len);
          fputc('\n', stderr);
        }
        n_detok_bad++;
      }
      if (lossless) {
        n_rt++;
        if (on != len || memcmp(o, text, len) != 0 || dn != len ||
            memcmp(d, text, len) != 0) {
          if (n_rt_bad < 5) {
            fprintf(stderr, "%s: round trip differs for ", model_file);
            print_escaped(text, len);
            fputs(" -> ", stderr);
            print_escaped(o, TN_MIN(on, ocap));
            fputc('\n', stderr);
          }
          n_rt_bad++;
        }
      }
      free(o);
      free(d);
    }
    free(ids);
    free(want);
    free(text);
    json_decref(rec);
  }
  printf("%s: %zu strings (%zu without a llama.cpp reference), %zu differ "
         "from llama.cpp; %zu round trips, %zu differ; detok invalid %zu\n",
         model_file, n_lines, n_noref, n_bad, n_rt, n_rt_bad, n_detok_bad);
  free(line);
  free(dbuf);
  fclose(f);
  tn_tokenizer_free(tok);
  int fail = 0;
  if (n_lines < 200) {
    fprintf(stderr, "%s: only %zu corpus strings\n", fixture, n_lines);
    fail = 1;
  }
  return fail || n_bad || n_rt_bad || n_detok_bad;
}

static void test_corpus_smollm2(void) {
  ASSERT_EQ(check_corpus("SmolLM2-135M-Instruct.Q4_1.gguf",
                         FIXDIR "smollm2.jsonl"),
            0);
}

static void test_corpus_gemma3(void) {
  ASSERT_EQ(check_corpus("gemma-3-270m-Q4_K_M.gguf", FIXDIR "gemma3.jsonl"),
            0);
}

/* ---- chat */

static int check_chat_cases(const struct tn_tokenizer *tok, json_t *cases,
                            const char *what) {
  int bad = 0;
  for (size_t c = 0; c < json_array_size(cases); c++) {
    json_t *cs = json_array_get(cases, c);
    json_t *msgs = json_object_get(cs, "messages");
    size_t n = json_array_size(msgs);
    struct tn_chat_msg m[16] = {0};
    if (n > 16) return 1;
    for (size_t i = 0; i < n; i++) {
      json_t *o = json_array_get(msgs, i);
      json_t *ct = json_object_get(o, "content");
      m[i].role = json_string_value(json_object_get(o, "role"));
      m[i].content = json_string_value(ct);
      m[i].content_len = json_string_length(ct);
    }
    bool agp = json_is_true(json_object_get(cs, "add_generation_prompt"));
    json_t *want = json_object_get(cs, "text");
    char *out = NULL;
    size_t out_len = 0;
    struct tn_error err = {0};
    if (tn_chat_format(tok, m, n, agp, &out, &out_len, &err) != TN_OK) {
      fprintf(stderr, "%s case %zu: %s\n", what, c, err.msg);
      bad++;
      continue;
    }
    if (out_len != json_string_length(want) ||
        memcmp(out, json_string_value(want), out_len) != 0) {
      fprintf(stderr, "%s case %zu differs:\n  want ", what, c);
      print_escaped(json_string_value(want), json_string_length(want));
      fputs("\n  got  ", stderr);
      print_escaped(out, out_len);
      fputc('\n', stderr);
      bad++;
    }
    free(out);
  }
  return bad;
}

/* family: what the GGUF's template must be recognised as; override: a
 * family chosen by name for a model without a template (then the model
 * must refuse chat formatting until it is chosen). */
static int check_chat_file(const char *model_file, const char *fixture,
                           const char *family, const char *override) {
  struct tn_tokenizer *tok = load_model(model_file);
  if (!tok) return 0;
  int bad = 0;
  if (override) {
    struct tn_chat_msg m = {.role = "user", .content = "hi", .content_len = 2};
    char *out = NULL;
    size_t out_len = 0;
    struct tn_error err = {0};
    if (tn_chat_available(tok) ||
        tn_chat_format(tok, &m, 1, true, &out, &out_len, &err) == TN_OK ||
        !strstr(err.msg, "no chat template")) {
      fprintf(stderr, "%s: a model without a template formatted chat (%s)\n",
              model_file, err.msg);
      bad++;
    }
    free(out);
    if (tn_chat_set_template(tok, "llama3", &err) == TN_OK) bad++;
    if (tn_chat_set_template(tok, "nope", &err) == TN_OK) bad++;
    if (tn_chat_set_template(tok, override, &err) != TN_OK) {
      fprintf(stderr, "%s: %s\n", model_file, err.msg);
      bad++;
    }
  }
  if (strcmp(tn_chat_template_name(tok), family) != 0) {
    fprintf(stderr, "%s: family %s, want %s\n", model_file,
            tn_chat_template_name(tok), family);
    bad++;
  }
  FILE *f = fopen(fixture, "r");
  if (!f) {
    tn_tokenizer_free(tok);
    return 1;
  }
  json_t *cases = json_array();
  char *line = NULL;
  size_t cap = 0;
  ssize_t got;
  while ((got = getline(&line, &cap, f)) > 0) {
    json_t *rec = json_loadb(line, (size_t)got, 0, NULL);
    if (rec) json_array_append_new(cases, rec);
  }
  free(line);
  fclose(f);
  if (json_array_size(cases) < 5) bad++;
  bad += check_chat_cases(tok, cases, model_file);
  json_decref(cases);
  tn_tokenizer_free(tok);
  return bad;
}

static void test_chat_smollm2(void) {
  ASSERT_EQ(check_chat_file("SmolLM2-135M-Instruct.Q4_1.gguf",
                            FIXDIR "smollm2.chat.jsonl", "chatml", NULL),
            0);
}

static void test_chat_gemma3(void) {
  ASSERT_EQ(check_chat_file("gemma-3-270m-Q4_K_M.gguf",
                            FIXDIR "gemma3.chat.jsonl", "gemma", "gemma"),
            0);
}

/* ---- synthetic vocabularies */

struct synth {
  const char *model;       /* tokenizer.ggml.model */
  const char *const *toks; /* NULL-terminated */
  const int32_t *types;    /* or NULL */
  int n_types;             /* -1: as many as tokens */
  int n_scores;            /* -1: as many as tokens, -2: none */
  const char *pre;
  const char *const *merges;
  const char *template_;
  int64_t bos;             /* -2: absent */
  bool bos_signed;
  bool add_bos;
};

static enum tn_status synth_load(const struct synth *s,
                                 struct tn_tokenizer **out,
                                 struct tn_error *err) {
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  struct tn_str strs[64];
  int n = 0;
  while (s->toks[n]) {
    strs[n].data = s->toks[n];
    strs[n].len = strlen(s->toks[n]);
    n++;
  }
  tn_gguf_writer_add_str(w, "tokenizer.ggml.model", s->model,
                         strlen(s->model));
  tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", strs, (uint64_t)n);
  if (s->n_scores != -2) {
    float sc[64];
    int ns = s->n_scores < 0 ? n : s->n_scores;
    for (int i = 0; i < ns; i++) sc[i] = -(float)i;
    tn_gguf_writer_add_arr(w, "tokenizer.ggml.scores", TN_GGUF_TYPE_FLOAT32,
                           sc, (uint64_t)ns);
  }
  if (s->types) {
    int nt = s->n_types < 0 ? n : s->n_types;
    tn_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", TN_GGUF_TYPE_INT32,
                           s->types, (uint64_t)nt);
  }
  if (s->pre) tn_gguf_writer_add_str(w, "tokenizer.ggml.pre", s->pre,
                                     strlen(s->pre));
  if (s->merges) {
    struct tn_str ms[64];
    int nm = 0;
    while (s->merges[nm]) {
      ms[nm].data = s->merges[nm];
      ms[nm].len = strlen(s->merges[nm]);
      nm++;
    }
    tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", ms, (uint64_t)nm);
  }
  if (s->template_)
    tn_gguf_writer_add_str(w, "tokenizer.chat_template", s->template_,
                           strlen(s->template_));
  if (s->bos != -2) {
    if (s->bos_signed)
      tn_gguf_writer_add_i32(w, "tokenizer.ggml.bos_token_id",
                             (int32_t)s->bos);
    else
      tn_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id",
                             (uint32_t)s->bos);
  }
  tn_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", s->add_bos);
  char path[] = "/tmp/tn_tok_XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) {
    tn_gguf_writer_free(w);
    return TN_EIO;
  }
  close(fd);
  enum tn_status st = tn_gguf_writer_write(w, path, err);
  tn_gguf_writer_free(w);
  if (st == TN_OK) {
    struct tn_gguf *g = NULL;
    st = tn_gguf_open(path, &g, err);
    if (st == TN_OK) {
      st = tn_tokenizer_load(g, out, err);
      tn_gguf_close(g);
    }
  }
  unlink(path);
  return st;
}

static const char *const k_spm_toks[] = {
    "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "\xE2\x96\x81", "a", "b", "ab", "\xE2\x96\x81" "ab",
    "<0x41>", "<0x-1>", "<0xC3>", "<0xA9>", NULL};
static const int32_t k_spm_types[] = {2, 3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1,
                                      1, 1, 6, 6, 6, 6};

static void test_chat_templates(void) {
  char *buf = NULL;
  size_t size = 0;
  struct tn_error err = {0};
  ASSERT_EQ(tn_file_read(FIXDIR "templates.json", &buf, &size, &err), TN_OK);
  json_t *fams = json_loadb(buf, size, 0, NULL);
  free(buf);
  ASSERT(json_is_array(fams));
  int bad = 0;
  for (size_t k = 0; k < json_array_size(fams); k++) {
    json_t *fam = json_array_get(fams, k);
    struct synth s = {.model = "llama",
                      .toks = k_spm_toks,
                      .types = k_spm_types,
                      .n_types = -1,
                      .n_scores = -1,
                      .template_ =
                          json_string_value(json_object_get(fam, "template")),
                      .bos = 5, /* <|begin_of_text|> */
                      .add_bos = true};
    struct tn_tokenizer *tok = NULL;
    if (synth_load(&s, &tok, &err) != TN_OK) {
      fprintf(stderr, "synth: %s\n", err.msg);
      bad++;
      continue;
    }
    const char *name = json_string_value(json_object_get(fam, "name"));
    if (strcmp(tn_chat_template_name(tok),
               json_string_value(json_object_get(fam, "family"))) != 0) {
      fprintf(stderr, "%s: family %s\n", name, tn_chat_template_name(tok));
      bad++;
    }
    bad += check_chat_cases(tok, json_object_get(fam, "cases"), name);
    tn_tokenizer_free(tok);
  }
  json_decref(fams);
  ASSERT_EQ(bad, 0);
}

static void test_validation(void) {
  struct tn_error err = {0};
  struct tn_tokenizer *tok = NULL;
  struct synth s = {.model = "llama", .toks = k_spm_toks,
                    .types = k_spm_types, .n_types = -1, .n_scores = -1,
                    .bos = 1, .add_bos = true};

  /* a good one: <0x-1> is a broken byte token and must not hurt */
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_OK);
  ASSERT_EQ(tn_tokenizer_bos(tok), 1);
  char p[64];
  ASSERT_EQ(tn_tokenizer_piece(tok, 15, p, sizeof(p), true), 6); /* as text */
  ASSERT_EQ(tn_tokenizer_piece(tok, 14, p, sizeof(p), true), 1);
  ASSERT_EQ(p[0], 'A');
  ASSERT_EQ(tn_tokenizer_piece(tok, -1, p, sizeof(p), true), 0);
  ASSERT_EQ(tn_tokenizer_piece(tok, 1000, p, sizeof(p), true), 0);
  /* "ab" with no space prefix: SPM merges; unknown 'z' -> no byte token */
  int32_t *ids;
  size_t n;
  ASSERT_EQ(tn_tokenizer_encode(tok, "ab ab", 5, true, true, &ids, &n, &err),
            TN_OK);
  ASSERT_EQ(n, 3);
  ASSERT_EQ(ids[0], 1);
  ASSERT_EQ(ids[1], 13); /* space prefix + "ab" */
  ASSERT_EQ(ids[2], 13);
  free(ids);
  /* é as byte fallback: <0xC3><0xA9>; the detokenizer joins them */
  ASSERT_EQ(tn_tokenizer_encode(tok, "\xC3\xA9", 2, false, false, &ids, &n,
                                &err),
            TN_OK);
  ASSERT_EQ(n, 3);
  ASSERT_EQ(ids[1], 16);
  ASSERT_EQ(ids[2], 17);
  struct tn_detok d;
  tn_detok_init(&d, tok, false);
  char o[256];
  ASSERT_EQ(tn_detok_push(&d, ids[0], o, sizeof(o)), 1); /* U+2581 -> " " */
  ASSERT_EQ(tn_detok_push(&d, ids[1], o, sizeof(o)), 0);
  ASSERT_EQ(tn_detok_push(&d, ids[2], o, sizeof(o)), 2);
  ASSERT(memcmp(o, "\xC3\xA9", 2) == 0);
  /* a lone lead byte then ASCII: U+FFFD then the letter */
  ASSERT_EQ(tn_detok_push(&d, 16, o, sizeof(o)), 0);
  ASSERT_EQ(tn_detok_push(&d, 10, o, sizeof(o)), 4);
  ASSERT(memcmp(o, "\xEF\xBF\xBD" "a", 4) == 0);
  ASSERT_EQ(tn_detok_push(&d, 16, o, sizeof(o)), 0);
  ASSERT_EQ(tn_detok_flush(&d, o, sizeof(o)), 3);
  free(ids);
  /* parse_special: control text becomes the token, or stays text */
  ASSERT_EQ(tn_tokenizer_encode(tok, "<s>", 3, false, true, &ids, &n, &err),
            TN_OK);
  ASSERT_EQ(n, 1);
  ASSERT_EQ(ids[0], 1);
  free(ids);
  ASSERT_EQ(tn_tokenizer_encode(tok, "<s>", 3, false, false, &ids, &n, &err),
            TN_OK);
  ASSERT_GT(n, 1);
  for (size_t i = 0; i < n; i++) ASSERT_NE(ids[i], 1);
  free(ids);
  ASSERT(tn_tokenizer_is_eog(tok, 8));  /* <|eot_id|> */
  ASSERT(tn_tokenizer_is_eog(tok, 4));  /* <|im_end|> */
  ASSERT(!tn_tokenizer_is_eog(tok, 10));
  tn_tokenizer_free(tok);
  tok = NULL;

  /* bos out of range */
  s.bos = 999;
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "tokenizer.ggml.bos_token_id");
  ASSERT_SUBSTR(err.msg, "999");
  ASSERT(tok == NULL);
  /* negative bos */
  s.bos = -1;
  s.bos_signed = true;
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "-1");
  s.bos = 1;
  s.bos_signed = false;
  /* mismatched arrays */
  s.n_scores = 3;
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "tokenizer.ggml.scores");
  s.n_scores = -1;
  s.n_types = 5;
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "tokenizer.ggml.token_type");
  s.n_types = -1;
  /* unknown model */
  s.model = "bert";
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EUNSUPPORTED);
  /* BPE without merges */
  s.model = "gpt2";
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "merges");
}

static void test_bpe_synthetic(void) {
  /* a tiny byte-level BPE: "a", "b", "ab", "Ġ" (space), "Ġab" */
  static const char *const toks[] = {"a", "b", "ab", "\xC4\xA0", "\xC4\xA0" "ab",
                                     "<|endoftext|>", NULL};
  static const int32_t types[] = {1, 1, 1, 1, 1, 3};
  static const char *const merges[] = {"a b", "\xC4\xA0 ab", NULL};
  struct synth s = {.model = "gpt2", .toks = toks, .types = types,
                    .n_types = -1, .n_scores = -2, .pre = "no-such-pre",
                    .merges = merges, .bos = -2, .add_bos = false};
  struct tn_tokenizer *tok = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(synth_load(&s, &tok, &err), TN_OK); /* unknown pre: warning */
  int32_t *ids;
  size_t n;
  ASSERT_EQ(tn_tokenizer_encode(tok, "ab ab<|endoftext|>", 18, true, true,
                                &ids, &n, &err),
            TN_OK);
  ASSERT_EQ(n, 3);
  ASSERT_EQ(ids[0], 2);
  ASSERT_EQ(ids[1], 4);
  ASSERT_EQ(ids[2], 5);
  free(ids);
  ASSERT(tn_tokenizer_is_eog(tok, 5));
  char p[16];
  ASSERT_EQ(tn_tokenizer_piece(tok, 4, p, sizeof(p), false), 3);
  ASSERT(memcmp(p, " ab", 3) == 0);
  ASSERT_EQ(tn_tokenizer_piece(tok, 5, p, sizeof(p), false), 0);
  ASSERT_STR_EQ(tn_chat_template_name(tok), "none");
  tn_tokenizer_free(tok);
}

static void test_eog_models(void) {
  struct tn_tokenizer *tok = load_model("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (tok) {
    ASSERT(tn_tokenizer_is_eog(tok, 2)); /* <|im_end|> */
    ASSERT(tn_tokenizer_is_eog(tok, 0)); /* <|endoftext|> */
    ASSERT(!tn_tokenizer_is_eog(tok, 1));
    ASSERT(!tn_tokenizer_add_bos(tok));
    ASSERT(tn_tokenizer_is_special(tok, 1));
    tn_tokenizer_free(tok);
  }
  tok = load_model("gemma-3-270m-Q4_K_M.gguf");
  if (tok) {
    ASSERT(tn_tokenizer_is_eog(tok, 1));
    ASSERT_EQ(tn_tokenizer_find(tok, "<end_of_turn>", 13), 106);
    ASSERT(tn_tokenizer_is_eog(tok, 106));
    ASSERT_EQ(tn_tokenizer_eot(tok), 106);
    ASSERT(tn_tokenizer_add_bos(tok));
    ASSERT_EQ(tn_tokenizer_bos(tok), 2);
    tn_tokenizer_free(tok);
  }
}

TN_TEST_MAIN(TN_TEST(test_validation), TN_TEST(test_bpe_synthetic),
             TN_TEST(test_eog_models), TN_TEST(test_chat_templates),
             TN_TEST(test_chat_smollm2), TN_TEST(test_chat_gemma3),
             TN_TEST(test_corpus_smollm2), TN_TEST(test_corpus_gemma3))
