/*
 * fuzz_chat.c: libFuzzer target for the chat formatter (tn_chat_format,
 * tn_chat_template_name) and the template detection behind it.
 *
 * The family is detected from the GGUF's tokenizer.chat_template (or, with
 * none, from the special tokens present), so each input builds a small
 * vocabulary GGUF in memory (tn_gguf_writer_write_mem, tn_gguf_open_mem)
 * whose metadata carries the fuzzed template, loads a tokenizer from it the
 * way a model load does, and formats a fuzzed conversation with it. The
 * last tokenizer is kept and reused when the next input asks for the same
 * vocabulary and template (libFuzzer often mutates only the messages).
 *
 * Input layout:
 *   byte 0   flags: bit 0 the template key is present (without it, the
 *            template text is instead a family name handed to
 *            tn_chat_set_template, as --chat-template does); bit 1
 *            tokenizer.ggml.add_bos_token; bit 2 a bos_token_id key, bit 3
 *            which (<bos> or <|begin_of_text|>); bits 4-5 leave out the
 *            ChatML (1), Gemma (2) or Llama 3 (3) special tokens; bit 6 a
 *            SentencePiece vocabulary instead of a byte-level BPE one;
 *            bit 7 encode the result with add_special (as the engine does)
 *   then     template RS message RS message ...   (RS = 0x1E)
 *   message  role US content                      (US = 0x1F; role is a C
 *            string, so it ends at a NUL; no US: no content, NULL pointer)
 *
 * The template is Jinja run by src/jinja/ (fuzz_jinja fuzzes the
 * interpreter on its own); here the point is the path a model load and a
 * chat request take through it.
 *
 * Invariants, each a trap when broken:
 *  - tn_chat_template_name names a known family (or "jinja"), "none"
 *    exactly when tn_chat_available is false; a GGUF without a template has
 *    none until tn_chat_set_template chooses a built-in one by name, which
 *    either succeeds and names that family or fails and changes nothing;
 *  - success gives a malloc'd buffer, NUL-terminated after out_len bytes
 *    (ASan checks every byte is inside it); failure gives NULL, an error
 *    status and a message; with a built-in template both generation-prompt
 *    settings succeed or fail together, the text without the prompt is a
 *    prefix of the one with it, and ChatML keeps every content byte for
 *    byte;
 *  - the formatted text encodes (parse_special, as the engine does) into
 *    ids inside the vocabulary.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_chat
 *   ./build-fuzz/fuzz_chat -max_len=8192 -dict=tests/fuzz/chat.dict \
 *       /tmp/corpus tests/fuzz/corpus/fuzz_chat tests/fuzz/seeds/chat
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define MAX_INPUT 8192
#define MAX_MSGS 64
#define RS 0x1E
#define US 0x1F

#define CHECK(x)                                                    \
  do {                                                              \
    if (!(x)) {                                                     \
      fprintf(stderr, "fuzz_chat: invariant failed: %s (%s:%d)\n",  \
              #x, __FILE__, __LINE__);                              \
      __builtin_trap();                                             \
    }                                                               \
  } while (0)

/* Special tokens, grouped by family (the group a flag may leave out). */
enum { GRP_ANY, GRP_CHATML, GRP_GEMMA, GRP_LLAMA3 };
static const struct {
  const char *text;
  int group;
} k_specials[] = {
    {"<|endoftext|>", GRP_ANY},         {"<bos>", GRP_ANY},
    {"<eos>", GRP_ANY},                 {"<|begin_of_text|>", GRP_LLAMA3},
    {"<|im_start|>", GRP_CHATML},       {"<|im_end|>", GRP_CHATML},
    {"<start_of_turn>", GRP_GEMMA},     {"<end_of_turn>", GRP_GEMMA},
    {"<|start_header_id|>", GRP_LLAMA3}, {"<|end_header_id|>", GRP_LLAMA3},
    {"<|eot_id|>", GRP_LLAMA3},
};
#define N_SPECIALS (sizeof(k_specials) / sizeof(k_specials[0]))

/* A few merges for the byte-level vocabulary, so BPE merging runs. */
static const char *const k_merges[] = {
    "u s", "us e", "a s", "as s", "ass i", "assi s", "assis t", "assist a",
    "assista n", "assistan t", "s y", "sy s", "sys t", "syst e", "syste m",
    "\xC4\xA0 t", "h e", "o d", "m od", "mod e", "mode l",
};
#define N_MERGES (sizeof(k_merges) / sizeof(k_merges[0]))
/* ... and the tokens those merges make. */
static const char *const k_merged[] = {
    "us", "use", "as", "ass", "assi", "assis", "assist", "assista",
    "assistan", "assistant", "sy", "sys", "syst", "syste", "system",
    "\xC4\xA0t", "he", "od", "mod", "mode", "model",
};

/* Token texts: the vocabulary's base (256 byte-level characters, or
 * SentencePiece's <unk> <s> </s> U+2581 and 256 <0xNN>) then the merged
 * tokens, then the specials; built once. */
static char g_bpe_bytes[256][3];
static char g_spm_bytes[256][7];

struct vocab {
  struct tn_str toks[600];
  int32_t types[600];
  size_t n;
};

static void vocab_add(struct vocab *v, const char *t, size_t len,
                      int32_t type) {
  v->toks[v->n].data = t;
  v->toks[v->n].len = len;
  v->types[v->n] = type;
  v->n++;
}

/* GPT-2's byte -> codepoint table (bytes_to_unicode()). */
static uint32_t gpt2_cpt(int b) {
#define PRINTABLE(k) \
  (((k) >= 0x21 && (k) <= 0x7E) || ((k) >= 0xA1 && (k) <= 0xAC) || \
   ((k) >= 0xAE && (k) <= 0xFF))
  if (PRINTABLE(b)) return (uint32_t)b;
  int n = 0;
  for (int k = 0; k < b; k++) n += !PRINTABLE(k);
  return 0x100u + (uint32_t)n;
#undef PRINTABLE
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  tn_log_set_level(TN_LOG_LEVEL_ERROR); /* unrecognised templates warn */
  for (int b = 0; b < 256; b++) {
    uint32_t c = gpt2_cpt(b);
    if (c < 0x80) {
      g_bpe_bytes[b][0] = (char)c;
    } else {
      g_bpe_bytes[b][0] = (char)(0xC0 | (c >> 6));
      g_bpe_bytes[b][1] = (char)(0x80 | (c & 0x3F));
    }
    snprintf(g_spm_bytes[b], sizeof(g_spm_bytes[b]), "<0x%02X>", b);
  }
  return 0;
}

/* The tokenizer for flags and template, from an in-memory GGUF. */
static struct tn_tokenizer *build(uint8_t flags, const char *tmpl,
                                  size_t tmpl_len) {
  bool spm = flags & 64;
  int leave_out = (flags >> 4) & 3; /* 0: none, else GRP_* */
  static struct vocab v;
  v.n = 0;
  if (spm) {
    vocab_add(&v, "<unk>", 5, 2);
    vocab_add(&v, "<s>", 3, 3);
    vocab_add(&v, "</s>", 4, 3);
    vocab_add(&v, "\xE2\x96\x81", 3, 1);
    for (int b = 0; b < 256; b++) vocab_add(&v, g_spm_bytes[b], 6, 6);
  } else {
    for (int b = 0; b < 256; b++)
      vocab_add(&v, g_bpe_bytes[b], strlen(g_bpe_bytes[b]), 1);
  }
  for (size_t k = 0; k < N_MERGES; k++)
    vocab_add(&v, k_merged[k], strlen(k_merged[k]), 1);
  int32_t bos_id = -1;
  const char *bos_text = (flags & 8) ? "<|begin_of_text|>" : "<bos>";
  for (size_t k = 0; k < N_SPECIALS; k++) {
    if (leave_out && k_specials[k].group == leave_out) continue;
    if (strcmp(k_specials[k].text, bos_text) == 0) bos_id = (int32_t)v.n;
    vocab_add(&v, k_specials[k].text, strlen(k_specials[k].text), 3);
  }

  struct tn_gguf_writer *w = tn_gguf_writer_new();
  CHECK(w != NULL);
  const char *model = spm ? "llama" : "gpt2";
  bool ok = tn_gguf_writer_add_str(w, "tokenizer.ggml.model", model,
                                   strlen(model)) == TN_OK &&
            tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", v.toks,
                                       v.n) == TN_OK &&
            tn_gguf_writer_add_arr(w, "tokenizer.ggml.token_type",
                                   TN_GGUF_TYPE_INT32, v.types,
                                   v.n) == TN_OK &&
            tn_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token",
                                    flags & 2) == TN_OK;
  if (ok && !spm) {
    struct tn_str m[N_MERGES];
    for (size_t k = 0; k < N_MERGES; k++)
      m[k] = (struct tn_str){k_merges[k], strlen(k_merges[k])};
    ok = tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", m,
                                    N_MERGES) == TN_OK &&
         tn_gguf_writer_add_str(w, "tokenizer.ggml.pre", "smollm", 6) ==
             TN_OK;
  }
  if (ok && (flags & 4) && bos_id >= 0)
    ok = tn_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id",
                                (uint32_t)bos_id) == TN_OK;
  if (ok && (flags & 1))
    ok = tn_gguf_writer_add_str(w, "tokenizer.chat_template", tmpl,
                                tmpl_len) == TN_OK;
  CHECK(ok);
  void *buf = NULL;
  size_t buf_size = 0;
  struct tn_error err = {0};
  CHECK(tn_gguf_writer_write_mem(w, &buf, &buf_size, &err) == TN_OK);
  tn_gguf_writer_free(w);
  struct tn_gguf *g = NULL;
  if (tn_gguf_open_mem(buf, buf_size, &g, &err) != TN_OK) {
    fprintf(stderr, "fuzz_chat: our own GGUF does not open: %s\n", err.msg);
    CHECK(0);
  }
  struct tn_tokenizer *tok = NULL;
  enum tn_status st = tn_tokenizer_load(g, &tok, &err);
  tn_gguf_close(g);
  free(buf);
  if (st != TN_OK) fprintf(stderr, "fuzz_chat: load: %s\n", err.msg);
  CHECK(st == TN_OK); /* whatever the template, the vocabulary loads */
  if (!(flags & 1)) {
    /* no template key: the text names a family to choose instead, as
     * --chat-template does (it may be refused) */
    char name[64];
    size_t n = TN_MIN(tmpl_len, sizeof(name) - 1);
    memcpy(name, tmpl, n);
    name[n] = '\0';
    const char *before = tn_chat_template_name(tok);
    CHECK(strcmp(before, "none") == 0 && !tn_chat_available(tok));
    if (strchr(name, '/') || strstr(name, ".jinja")) return tok; /* a file */
    st = tn_chat_set_template(tok, name, &err);
    if (st == TN_OK) CHECK(strcmp(tn_chat_template_name(tok), name) == 0);
    else CHECK(st < 0 && strcmp(tn_chat_template_name(tok), before) == 0);
  }
  return tok;
}

/* One cached tokenizer: the flags that shape it and the template. */
static struct {
  struct tn_tokenizer *tok;
  uint8_t flags;
  char *tmpl;
  size_t tmpl_len;
} g_cache;

static const struct tn_tokenizer *tokenizer_for(uint8_t flags,
                                                const char *tmpl,
                                                size_t tmpl_len) {
  uint8_t key = flags & 0x7F;
  if (g_cache.tok && g_cache.flags == key && g_cache.tmpl_len == tmpl_len &&
      memcmp(g_cache.tmpl, tmpl, tmpl_len) == 0)
    return g_cache.tok;
  tn_tokenizer_free(g_cache.tok);
  free(g_cache.tmpl);
  g_cache.tok = build(flags, tmpl, tmpl_len);
  g_cache.flags = key;
  g_cache.tmpl = malloc(tmpl_len ? tmpl_len : 1);
  CHECK(g_cache.tmpl != NULL);
  memcpy(g_cache.tmpl, tmpl, tmpl_len);
  g_cache.tmpl_len = tmpl_len;
  return g_cache.tok;
}

static volatile uint64_t sink;

static void touch(const char *p, size_t n) {
  uint64_t h = 0;
  for (size_t i = 0; i < n; i++) h = h * 31 + (uint8_t)p[i];
  sink += h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if (size > MAX_INPUT) size = MAX_INPUT;
  uint8_t flags = data[0];
  const char *p = (const char *)data + 1, *end = (const char *)data + size;

  /* split: template, then messages */
  const char *rs = memchr(p, RS, (size_t)(end - p));
  const char *tmpl = p;
  size_t tmpl_len = (size_t)((rs ? rs : end) - p);
  /* roles need NUL-terminated copies; contents stay views (with NULs) */
  char *roles = malloc(size + 1);
  CHECK(roles != NULL);
  struct tn_chat_msg msgs[MAX_MSGS] = {0};
  size_t n_msgs = 0, r_at = 0;
  for (const char *m = rs; m && n_msgs < MAX_MSGS;) {
    m++; /* past RS */
    const char *next = memchr(m, RS, (size_t)(end - m));
    const char *me = next ? next : end;
    const char *us = memchr(m, US, (size_t)(me - m));
    const char *re = us ? us : me;
    size_t rl = (size_t)(re - m);
    memcpy(roles + r_at, m, rl);
    roles[r_at + rl] = '\0';
    msgs[n_msgs].role = roles + r_at;
    r_at += rl + 1;
    if (us) {
      msgs[n_msgs].content = us + 1;
      msgs[n_msgs].content_len = (size_t)(me - us - 1);
    } else {
      msgs[n_msgs].content = NULL;
      msgs[n_msgs].content_len = 0;
    }
    n_msgs++;
    m = next;
  }

  const struct tn_tokenizer *tok = tokenizer_for(flags, tmpl, tmpl_len);
  const char *fam = tn_chat_template_name(tok);
  CHECK(strcmp(fam, "chatml") == 0 || strcmp(fam, "gemma") == 0 ||
        strcmp(fam, "llama3") == 0 || strcmp(fam, "jinja") == 0 ||
        strcmp(fam, "none") == 0);
  bool builtin = !(flags & 1) && tn_chat_available(tok);
  CHECK(tn_chat_available(tok) == (strcmp(fam, "none") != 0));

  char *out[2] = {NULL, NULL};
  size_t out_len[2] = {0, 0};
  enum tn_status st[2];
  for (int agp = 0; agp < 2; agp++) {
    struct tn_error err = {0};
    st[agp] = tn_chat_format(tok, msgs, n_msgs, agp, &out[agp],
                             &out_len[agp], &err);
    if (st[agp] == TN_OK) {
      CHECK(out[agp] != NULL);
      CHECK(out[agp][out_len[agp]] == '\0');
      touch(out[agp], out_len[agp]);
    } else {
      CHECK(st[agp] < 0);
      CHECK(out[agp] == NULL && out_len[agp] == 0);
      CHECK(err.msg[0] != '\0');
      CHECK(tn_chat_available(tok) || st[agp] == TN_EUNSUPPORTED);
    }
  }
  if (builtin) CHECK((st[0] == TN_OK) == (st[1] == TN_OK));
  if (builtin && st[0] == TN_OK) {
    CHECK(out_len[0] <= out_len[1]);
    CHECK(memcmp(out[0], out[1], out_len[0]) == 0);
    if (strcmp(fam, "chatml") == 0)
      for (size_t i = 0; i < n_msgs; i++)
        CHECK(msgs[i].content_len == 0 ||
              memmem(out[0], out_len[0], msgs[i].content,
                     msgs[i].content_len) != NULL);
  }
  if (st[1] == TN_OK) {
    /* what the engine does next */
    int32_t *ids = NULL;
    size_t n_ids = 0;
    struct tn_error err = {0};
    enum tn_status es = tn_tokenizer_encode(tok, out[1], out_len[1],
                                            flags & 128, true, &ids, &n_ids,
                                            &err);
    CHECK(es == TN_OK || es == TN_ENOMEM);
    int32_t n_vocab = tn_tokenizer_n_vocab(tok);
    for (size_t i = 0; i < n_ids; i++) CHECK(ids[i] >= 0 && ids[i] < n_vocab);
    free(ids);
  }
  free(out[0]);
  free(out[1]);
  free(roles);
  return 0;
}
