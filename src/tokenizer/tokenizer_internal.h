/*
 * tokenizer_internal.h: what the tokenizer's own files share.
 *
 * The vocabulary is one pool of token texts (copied out of the GGUF) with a
 * per-token record, an open-addressing hash from text to id, and, for
 * byte-level BPE, a second hash from merge pair to rank. Everything here is
 * read-only after tn_tokenizer_load(), so one tokenizer may be used by many
 * threads at once.
 */
#ifndef TN_TOKENIZER_INTERNAL_H
#define TN_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "jinja/jinja.h"
#include "tokenizer/tokenizer.h"

/* Token attributes (llama.cpp's llama_token_attr bits, so behaviour that
 * depends on them reads the same). */
enum {
  TN_TOK_ATTR_UNDEFINED = 0,
  TN_TOK_ATTR_UNKNOWN = 1 << 0,
  TN_TOK_ATTR_UNUSED = 1 << 1,
  TN_TOK_ATTR_NORMAL = 1 << 2,
  TN_TOK_ATTR_CONTROL = 1 << 3,
  TN_TOK_ATTR_USER_DEFINED = 1 << 4,
  TN_TOK_ATTR_BYTE = 1 << 5,
};

/* GGUF tokenizer.ggml.token_type values. */
enum tn_tok_type {
  TN_TOK_TYPE_UNDEFINED = 0,
  TN_TOK_TYPE_NORMAL = 1,
  TN_TOK_TYPE_UNKNOWN = 2,
  TN_TOK_TYPE_CONTROL = 3,
  TN_TOK_TYPE_USER_DEFINED = 4,
  TN_TOK_TYPE_UNUSED = 5,
  TN_TOK_TYPE_BYTE = 6,
};

enum tn_vocab_kind {
  TN_VOCAB_KIND_BPE, /* "gpt2": byte-level BPE */
  TN_VOCAB_KIND_SPM, /* "llama": SentencePiece */
  TN_VOCAB_KIND_COUNT
};

enum tn_chat_family {
  TN_CHAT_FAMILY_NONE,
  TN_CHAT_FAMILY_CHATML,      /* <|im_start|>role\n...<|im_end|>\n */
  TN_CHAT_FAMILY_GEMMA,       /* <start_of_turn>user\n...<end_of_turn>\n */
  TN_CHAT_FAMILY_LLAMA3,      /* <|start_header_id|>role<|end_header_id|>\n\n */
  TN_CHAT_FAMILY_JINJA,       /* any other template */
  TN_CHAT_FAMILY_COUNT
};

struct tn_tok_entry {
  uint32_t off; /* into text pool */
  uint32_t len;
  float score;
  uint16_t attr;
  int16_t byte; /* the byte a BYTE token stands for, -1 otherwise */
};

struct tn_merge {
  uint32_t off; /* "first second" in the merge pool */
  uint32_t len_first;
  uint32_t len_second;
  int32_t rank;
};

#define TN_PRE_MAX_REGEX 4

struct tn_tokenizer {
  enum tn_vocab_kind kind;
  int32_t n_vocab;
  struct tn_tok_entry *toks;
  char *pool; /* token texts, back to back */
  size_t pool_size;
  size_t max_tok_len;

  /* text -> id (the last id with a text wins, as in llama.cpp) */
  int32_t *ht;
  uint32_t ht_mask;

  /* BPE merges: (first, second) -> rank, first occurrence wins */
  struct tn_merge *merges;
  size_t n_merges;
  char *merge_pool;
  int32_t *mht;
  uint32_t mht_mask;

  /* BPE pre-tokenizer: regexes applied one after another, each splitting
   * the pieces the previous one left. */
  char pre_name[64];
  pcre2_code *pre_re[TN_PRE_MAX_REGEX];
  int n_pre_re;
  bool ignore_merges;

  /* special ids, -1 when absent */
  int32_t bos, eos, eot, eom, unk, sep, pad;
  bool add_bos, add_eos, add_space_prefix;
  int32_t byte_tok[256]; /* SPM byte fallback: <0xNN> id, or -1 */

  /* EOG ids, sorted */
  int32_t *eog;
  size_t n_eog;

  /* Tokens split out of text before the model tokenizer runs (control,
   * user-defined, unknown), in priority order: longer first. */
  int32_t *special;
  size_t n_special;
  /* hash of special texts -> index in special[], and the distinct lengths */
  int32_t *sht;
  uint32_t sht_mask;
  uint32_t *special_lens; /* descending */
  size_t n_special_lens;

  /* chat (chat.c) */
  enum tn_chat_family chat_family; /* what the template looks like, for
                                      display: chatml, gemma, llama3, jinja */
  struct tn_jinja *chat_tmpl;      /* compiled template, or NULL */
  bool chat_absent;                /* no tokenizer.chat_template at all */
  bool chat_tool_call_tags;        /* the template writes <tool_call> */
  char *chat_error;                /* why the GGUF's template did not compile */
  int64_t chat_now;                /* strftime_now's clock; 0: the real one */
};

static inline const char *tn_tok_text(const struct tn_tokenizer *tok,
                                      int32_t id, size_t *len) {
  *len = tok->toks[id].len;
  return tok->pool + tok->toks[id].off;
}

uint64_t tn_tok_hash(const void *data, size_t n);
int32_t tn_tok_lookup(const struct tn_tokenizer *tok, const char *text,
                      size_t len);

/* A growable id vector. */
struct tn_ids {
  int32_t *v;
  size_t n, cap;
};
enum tn_status tn_ids_push(struct tn_ids *ids, int32_t id);

/* Model tokenizers: append the ids for one raw-text fragment. */
enum tn_status tn_bpe_encode(const struct tn_tokenizer *tok, const char *text,
                             size_t len, struct tn_ids *out);
enum tn_status tn_spm_encode(const struct tn_tokenizer *tok, const char *text,
                             size_t len, struct tn_ids *out);

/* BPE setup: merges and the pre-tokenizer. */
enum tn_status tn_bpe_init(struct tn_tokenizer *tok, const struct tn_gguf *g,
                           struct tn_error *err);
void tn_bpe_deinit(struct tn_tokenizer *tok);

/* GPT-2 byte <-> unicode mapping. */
uint32_t tn_bpe_byte_to_cpt(uint8_t b);
int tn_bpe_cpt_to_byte(uint32_t cpt); /* -1 if not a mapped codepoint */

/* UTF-8 helpers. */
size_t tn_utf8_encode(uint32_t cpt, char *out); /* llama.cpp-lenient, 1..4 */
/* llama.cpp's unicode_len_utf8: sequence length from the lead byte's high
 * nibble alone (0-B: 1, C-D: 2, E: 3, F: 4). */
static inline size_t tn_utf8_len_lead(uint8_t c) {
  static const uint8_t k[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return k[c >> 4];
}

/* chat */
void tn_chat_detect(struct tn_tokenizer *tok, const struct tn_gguf *g);
void tn_chat_deinit(struct tn_tokenizer *tok);

/* ---- bigram priority queue shared by BPE and SentencePiece merging
 * (bigram.c). The best bigram comes first: highest prio, then leftmost.
 * BPE uses prio = -rank (ranks stay below 2^24, exact in a float);
 * SentencePiece uses the merged token's score. */
struct tn_bigram {
  float prio;
  int32_t left, right;
  uint32_t size;
};

struct tn_bigram_heap {
  struct tn_bigram *v;
  size_t n, cap;
};

bool tn_bigram_heap_push(struct tn_bigram_heap *h, struct tn_bigram b);
struct tn_bigram tn_bigram_heap_pop(struct tn_bigram_heap *h);

#endif /* TN_TOKENIZER_INTERNAL_H */
