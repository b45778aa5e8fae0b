/*
 * fuzz_tokenizer.c: libFuzzer target for the tokenizers and the streaming
 * detokenizer, on the real vocabularies of our models.
 *
 * LLVMFuzzerInitialize loads, once, the vocabularies it finds under
 * $TERN_FUZZ_MODELS (default "models"):
 *
 *   slot 0  SmolLM2-135M-Instruct.Q4_1.gguf       byte-level BPE ("smollm")
 *   slot 1  gemma-3-270m-Q4_K_M.gguf              SentencePiece, byte fallback
 *   slot 2  qwen2.5-coder-0.5b-instruct-q4_k_m.gguf  byte-level BPE ("qwen2")
 *
 * A missing file skips its slot with a message on stderr; with none at all
 * the target aborts at start-up, saying so.
 *
 * Input: byte 0 chooses (bits 0-1) the slot (3 means slot 0; a slot that
 * did not load falls through to the next one that did), add_special (bit
 * 2), parse_special (bit 3), render_special for the arbitrary-id pass (bit
 * 4) and the detokenizer's output cap for that pass (bits 5-7: 0 is
 * tn_detok_cap(), k gives 3k-2 bytes). The rest (at most 4 KiB) is the text.
 *
 * Invariants, each a trap when broken:
 *  - encode succeeds for any bytes (only running out of memory may fail);
 *  - every id is in [0, n_vocab); with add_special and add_bos the first is
 *    BOS;
 *  - tn_tokenizer_piece never writes past the cap it is given and returns
 *    the same length whatever the cap;
 *  - for valid UTF-8 text made of bytes the vocabulary can spell (see
 *    g_byte_ok; for SentencePiece also without a literal U+2581, which
 *    decodes to a space), the pieces rendered with specials, and the
 *    streaming detokenizer's output, are exactly the input bytes;
 *  - the detokenizer, fed the encoded ids and then arbitrary ids (three
 *    input bytes each, some out of range) at any cap, returns at most the
 *    cap, writes only inside it (the buffers are malloc'd to that size, so
 *    ASan sees one byte more) and emits valid UTF-8 only.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_tokenizer
 *   ./build-fuzz/fuzz_tokenizer -max_len=4097 -dict=tests/fuzz/tokenizer.dict \
 *       /tmp/corpus tests/fuzz/corpus/fuzz_tokenizer tests/fuzz/seeds/tokenizer
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h" /* tn_utf8_decode */

#define MAX_TEXT 4096
#define MAX_RANDOM_IDS 256
#define N_SLOTS 3

static const char *const k_files[N_SLOTS] = {
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m-Q4_K_M.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
};

static struct tn_tokenizer *g_tok[N_SLOTS];
static bool g_spm[N_SLOTS];
/* Bytes the vocabulary can spell on its own (byte-level BPE: the byte's
 * GPT-2 character is a token; SentencePiece: <0xNN> exists). A byte
 * without one is dropped by encode, as llama.cpp drops it: SmolLM2 has no
 * token for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2 and the bytes
 * that never occur in UTF-8. Round trips are only checked on text made of
 * spellable bytes. */
static bool g_byte_ok[N_SLOTS][256];
static volatile uint64_t sink;

#define CHECK(x)                                                       \
  do {                                                                 \
    if (!(x)) {                                                        \
      fprintf(stderr, "fuzz_tokenizer: invariant failed: %s (%s:%d)\n", \
              #x, __FILE__, __LINE__);                                 \
      __builtin_trap();                                                \
    }                                                                  \
  } while (0)

/* Strict UTF-8 (no overlongs, no surrogates, nothing past U+10FFFF). */
static bool utf8_valid(const char *s, size_t n) {
  uint32_t c;
  for (size_t i = 0, l; i < n; i += l)
    if (!(l = tn_utf8_decode((const uint8_t *)s + i, n - i, &c))) return false;
  return true;
}

/* GPT-2's byte -> codepoint table (bytes_to_unicode() in its encoder.py):
 * printable Latin-1 bytes stand for themselves, the other 68 take
 * U+0100.. in byte order. */
static uint32_t gpt2_cpt(int b) {
  if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) ||
      (b >= 0xAE && b <= 0xFF))
    return (uint32_t)b;
  int n = 0;
  for (int k = 0; k < b; k++)
    if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) ||
          (k >= 0xAE && k <= 0xFF)))
      n++;
  return 0x100u + (uint32_t)n;
}

static void find_spellable(int s) {
  for (int b = 0; b < 256; b++) {
    char t[8];
    size_t n;
    if (g_spm[s]) {
      n = (size_t)snprintf(t, sizeof(t), "<0x%02X>", b);
    } else {
      uint32_t c = gpt2_cpt(b);
      if (c < 0x80) {
        t[0] = (char)c;
        n = 1;
      } else { /* all below U+0800 */
        t[0] = (char)(0xC0 | (c >> 6));
        t[1] = (char)(0x80 | (c & 0x3F));
        n = 2;
      }
    }
    g_byte_ok[s][b] = tn_tokenizer_find(g_tok[s], t, n) >= 0;
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  tn_log_set_level(TN_LOG_LEVEL_ERROR);
  const char *dir = getenv("TERN_FUZZ_MODELS");
  if (!dir || !*dir) dir = "models";
  int n_loaded = 0;
  for (int s = 0; s < N_SLOTS; s++) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, k_files[s]);
    struct tn_error err = {0};
    struct tn_gguf *g = NULL;
    if (tn_gguf_open(path, &g, &err) != TN_OK) {
      fprintf(stderr, "fuzz_tokenizer: skipping vocabulary %s: %s\n", path,
              err.msg);
      continue;
    }
    enum tn_status st = tn_tokenizer_load(g, &g_tok[s], &err);
    tn_gguf_close(g);
    if (st != TN_OK) {
      /* a model we ship that does not load is a bug, not a skip */
      fprintf(stderr, "fuzz_tokenizer: %s: %s\n", path, err.msg);
      abort();
    }
    g_spm[s] = tn_tokenizer_find(g_tok[s], "<0x0A>", 6) >= 0;
    find_spellable(s);
    n_loaded++;
  }
  if (n_loaded == 0) {
    fprintf(stderr,
            "fuzz_tokenizer: no vocabulary found under %s (set "
            "TERN_FUZZ_MODELS to the folder holding %s or %s)\n",
            dir, k_files[0], k_files[1]);
    abort();
  }
  return 0;
}

/* The piece of id, into a buffer malloc'd to exactly cap bytes (so ASan
 * catches a write past it); checks the length does not depend on cap. */
static size_t checked_piece(const struct tn_tokenizer *tok, int32_t id,
                            size_t cap, bool render) {
  size_t full = tn_tokenizer_piece(tok, id, NULL, 0, render);
  char *b = malloc(cap ? cap : 1);
  CHECK(b != NULL);
  size_t n = tn_tokenizer_piece(tok, id, b, cap, render);
  CHECK(n == full);
  free(b);
  return n;
}

/* Pushes ids through a detokenizer whose output buffer is malloc'd to cap
 * bytes; appends what it emits to acc (acc_cap bytes; the total is returned
 * even past acc_cap) and checks every chunk. */
static size_t detok_run(const struct tn_tokenizer *tok, const int32_t *ids,
                        size_t n, bool render, size_t cap, char *acc,
                        size_t acc_cap) {
  char *out = malloc(cap);
  CHECK(out != NULL);
  struct tn_detok d;
  tn_detok_init(&d, tok, render);
  size_t total = 0;
  for (size_t i = 0; i <= n; i++) {
    size_t w = i < n ? tn_detok_push(&d, ids[i], out, cap)
                     : tn_detok_flush(&d, out, cap);
    CHECK(w <= cap);
    CHECK(utf8_valid(out, w));
    CHECK(d.n_pending < sizeof(d.pending));
    if (acc && total + w <= acc_cap) memcpy(acc + total, out, w);
    total += w;
  }
  CHECK(d.n_pending == 0);
  free(out);
  return total;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  uint8_t flags = data[0];
  const char *text = (const char *)data + 1;
  size_t len = TN_MIN(size - 1, (size_t)MAX_TEXT);

  int slot = flags & 3;
  if (slot == N_SLOTS) slot = 0;
  while (!g_tok[slot]) slot = (slot + 1) % N_SLOTS;
  const struct tn_tokenizer *tok = g_tok[slot];
  bool spm = g_spm[slot];
  bool add_special = flags & 4, parse_special = flags & 8;
  bool render = flags & 16;
  int cap_mode = flags >> 5;
  int32_t n_vocab = tn_tokenizer_n_vocab(tok);
  CHECK(n_vocab > 0);

  int32_t *ids = NULL;
  size_t n_ids = 0;
  struct tn_error err = {0};
  enum tn_status st = tn_tokenizer_encode(tok, text, len, add_special,
                                          parse_special, &ids, &n_ids, &err);
  if (st == TN_ENOMEM) return 0;
  if (st != TN_OK) fprintf(stderr, "encode: %s\n", err.msg);
  CHECK(st == TN_OK);
  CHECK(ids != NULL);
  CHECK(n_ids <= 2 * len + 2); /* no more than a token per byte, plus BOS/EOS */
  for (size_t i = 0; i < n_ids; i++) CHECK(ids[i] >= 0 && ids[i] < n_vocab);
  size_t skip = 0;
  if (add_special && tn_tokenizer_add_bos(tok)) {
    CHECK(n_ids > 0 && ids[0] == tn_tokenizer_bos(tok));
    skip = 1;
  }
  for (size_t i = 0; i < n_ids; i++) {
    sink += tn_tokenizer_is_eog(tok, ids[i]);
    sink += tn_tokenizer_is_special(tok, ids[i]);
  }

  /* Round trip through pieces and the detokenizer. */
  bool lossless =
      utf8_valid(text, len) && !(spm && memmem(text, len, "\xE2\x96\x81", 3));
  for (size_t i = 0; i < len && lossless; i++)
    lossless = g_byte_ok[slot][(uint8_t)text[i]];
  size_t ocap = len * 3 + 64;
  char *o = malloc(ocap), *dt = malloc(ocap);
  CHECK(o && dt);
  size_t on = 0;
  for (size_t i = skip; i < n_ids; i++) {
    /* into exact, short and empty buffers, then appended to o */
    size_t full = tn_tokenizer_piece(tok, ids[i], NULL, 0, true);
    size_t cap = (i % 3 == 0) ? full : (i % 3 == 1) ? full / 2 : 0;
    CHECK(checked_piece(tok, ids[i], cap, true) == full);
    size_t w = tn_tokenizer_piece(tok, ids[i], on < ocap ? o + on : NULL,
                                  on < ocap ? ocap - on : 0, true);
    CHECK(w == full);
    on += w;
  }
  size_t dn = detok_run(tok, ids + skip, n_ids - skip, true,
                        tn_detok_cap(tok), dt, ocap);
  if (lossless) {
    if (on != len || memcmp(o, text, len) != 0 || dn != len ||
        memcmp(dt, text, len) != 0)
      fprintf(stderr, "round trip: %zu input bytes, pieces %zu, detok %zu\n",
              len, on, dn);
    CHECK(on == len && memcmp(o, text, len) == 0);
    CHECK(dn == len && memcmp(dt, text, len) == 0);
  }
  free(o);
  free(dt);

  /* The encoded ids again at the chosen cap and render mode, then
   * arbitrary ids. */
  size_t cap = cap_mode ? (size_t)(3 * cap_mode - 2) : tn_detok_cap(tok);
  sink += detok_run(tok, ids, n_ids, render, cap, NULL, 0);
  free(ids);

  size_t n_rand = TN_MIN(len / 3, (size_t)MAX_RANDOM_IDS);
  int32_t rnd[MAX_RANDOM_IDS];
  for (size_t i = 0; i < n_rand; i++) {
    const uint8_t *b = (const uint8_t *)text + 3 * i;
    uint32_t v = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
    rnd[i] = (int32_t)(v % ((uint32_t)n_vocab + 8)) - 4;
  }
  sink += detok_run(tok, rnd, n_rand, render, cap, NULL, 0);
  for (size_t i = 0; i < n_rand && i < 16; i++)
    sink += checked_piece(tok, rnd[i], (size_t)(flags & 7), render);
  return 0;
}
