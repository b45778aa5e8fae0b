/*
 * tokenizer.c: the vocabulary (loaded and validated from GGUF metadata),
 * special-token splitting, encode dispatch, pieces and the streaming
 * detokenizer.
 *
 * Behaviour follows llama.cpp's llama-vocab.cpp, which is what GGUF files
 * are made for and what our fixtures are generated with:
 *
 *  - text -> id: the last token with a given text wins; empty token texts
 *    become "[EMPTY_<id>]".
 *  - special splitting: tokens typed control, user-defined or unknown are
 *    found in the text before the model tokenizer runs. Tokens are taken in
 *    priority order (longer text first, then lower id); each claims all of
 *    its non-overlapping occurrences, left to right, in the text no earlier
 *    token has claimed. Without parse_special only user-defined tokens are
 *    split out.
 *  - add_bos/add_eos from metadata with llama.cpp's defaults (BPE: no BOS
 *    except the llama3 pre-tokenizer; SPM: BOS). SPM adds a space prefix to
 *    a text fragment that starts the input or follows a special token when
 *    add_space_prefix (default true; Gemma 3 says false).
 *  - EOG: eos, eot, eom and every token whose text is a known end-of-turn
 *    marker (<|im_end|>, <|endoftext|>, <end_of_turn>, <|eot_id|>, ...);
 *    such tokens become control tokens if the file typed them otherwise.
 *
 * Unlike llama.cpp, a special-token id in metadata that is negative or not
 * below n_vocab is an error naming the key (llama.cpp warns and keeps its
 * default), and arrays whose lengths disagree with the token list are
 * errors.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "tokenizer/tokenizer_internal.h"

/* ---- hashing */

/* The seed is drawn once per process, so a vocabulary crafted to collide
 * in our tables (and make loading quadratic) cannot be prepared offline. */
static uint64_t hash_seed = 0x746f6b656e73ull;
static pthread_once_t hash_seed_once = PTHREAD_ONCE_INIT;

static void hash_seed_init(void) {
  uint64_t r;
  if (getrandom(&r, sizeof(r), GRND_NONBLOCK) == (ssize_t)sizeof(r))
    hash_seed ^= r;
  else
    hash_seed ^= tn_time_ns();
}

uint64_t tn_tok_hash(const void *data, size_t n) {
  pthread_once(&hash_seed_once, hash_seed_init);
  return tn_hash64(data, n, hash_seed);
}

static uint32_t ht_size_for(size_t n) {
  uint32_t sz = 16;
  while (sz < n * 2 && sz < (1u << 30)) sz <<= 1;
  return sz;
}

int32_t tn_tok_lookup(const struct tn_tokenizer *tok, const char *text,
                      size_t len) {
  if (!tok->ht) return -1;
  uint32_t i = (uint32_t)tn_tok_hash(text, len) & tok->ht_mask;
  for (;;) {
    int32_t id = tok->ht[i];
    if (id < 0) return -1;
    if (tok->toks[id].len == len &&
        memcmp(tok->pool + tok->toks[id].off, text, len) == 0)
      return id;
    i = (i + 1) & tok->ht_mask;
  }
}

enum tn_status tn_ids_push(struct tn_ids *ids, int32_t id) {
  if (ids->n == ids->cap) {
    size_t cap = ids->cap ? ids->cap * 2 : 64;
    int32_t *v = realloc(ids->v, cap * sizeof(*v));
    if (!v) return TN_ENOMEM;
    ids->v = v;
    ids->cap = cap;
  }
  ids->v[ids->n++] = id;
  return TN_OK;
}

/* ---- UTF-8 */

size_t tn_utf8_encode(uint32_t cpt, char *out) {
  if (cpt < 0x80) {
    out[0] = (char)cpt;
    return 1;
  }
  if (cpt < 0x800) {
    out[0] = (char)(0xC0 | (cpt >> 6));
    out[1] = (char)(0x80 | (cpt & 0x3F));
    return 2;
  }
  if (cpt < 0x10000) {
    out[0] = (char)(0xE0 | (cpt >> 12));
    out[1] = (char)(0x80 | ((cpt >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cpt & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | ((cpt >> 18) & 0x07));
  out[1] = (char)(0x80 | ((cpt >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cpt >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cpt & 0x3F));
  return 4;
}

/* ---- loading */

static const char *const k_eog_texts[] = {
    "<|eot_id|>",    "<|im_end|>",       "<|end|>",
    "<end_of_turn>", "<|endoftext|>",    "<|eom_id|>",
    "<EOT>",         "_<EOT>",           "<|end_of_text|>",
    "<end_of_utterance>",
};
/* Checked in this order for the EOT id when metadata has none. */
static const char *const k_eot_texts[] = {
    "<|eot_id|>", "<|im_end|>",     "<|end|>",        "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>",      "_<EOT>",
    "<end_of_utterance>",
};

/* Reads an optional token id key into *id; an absent key keeps the
 * default. Out-of-range values are errors naming the key. */
static enum tn_status load_id(const struct tn_gguf *g, const char *key,
                              int32_t n_vocab, int32_t *id,
                              struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  if (!kv) {
    if (*id >= n_vocab) *id = -1; /* a default that does not fit */
    return TN_OK;
  }
  int64_t v;
  switch (kv->type) {
  case TN_GGUF_TYPE_UINT8:
  case TN_GGUF_TYPE_UINT16:
  case TN_GGUF_TYPE_UINT32:
  case TN_GGUF_TYPE_UINT64:
    if (kv->val.u64 > (uint64_t)INT64_MAX)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: %s = %llu is out of range (n_vocab %d)",
                          key, (unsigned long long)kv->val.u64, n_vocab);
    v = (int64_t)kv->val.u64;
    break;
  case TN_GGUF_TYPE_INT8:
  case TN_GGUF_TYPE_INT16:
  case TN_GGUF_TYPE_INT32:
  case TN_GGUF_TYPE_INT64:
    v = kv->val.i64;
    break;
  default:
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: %s has type %s, expected an integer", key,
                        tn_gguf_type_name(kv->type));
  }
  if (v < 0 || v >= n_vocab)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: %s = %lld is out of range (n_vocab %d)",
                        key, (long long)v, n_vocab);
  *id = (int32_t)v;
  return TN_OK;
}

static enum tn_status load_bool(const struct tn_gguf *g, const char *key,
                                bool *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  if (!kv) return TN_OK;
  if (kv->type != TN_GGUF_TYPE_BOOL)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: %s has type %s, expected bool", key,
                        tn_gguf_type_name(kv->type));
  *out = kv->val.u64 != 0;
  return TN_OK;
}

/* "<0xHH>" -> HH, or -1. */
static int parse_byte_token(const char *t, size_t len) {
  if (len != 6 || memcmp(t, "<0x", 3) != 0 || t[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; i++) {
    char c = t[i];
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return -1;
    v = v * 16 + d;
  }
  return v;
}

static int cmp_i32(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

/* (length, id) keys: longer first, then lower id */
static int cmp_special(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}
static int cmp_u32_desc(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x < y) - (x > y);
}

static enum tn_status build_special(struct tn_tokenizer *tok) {
  size_t n = 0;
  for (int32_t i = 0; i < tok->n_vocab; i++)
    if (tok->toks[i].attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_USER_DEFINED |
                             TN_TOK_ATTR_UNKNOWN))
      n++;
  tok->n_special = n;
  if (n == 0) return TN_OK;
  tok->special = malloc(n * sizeof(int32_t));
  tok->special_lens = malloc(n * sizeof(uint32_t));
  uint32_t sz = ht_size_for(n);
  tok->sht = malloc(sz * sizeof(int32_t));
  if (!tok->special || !tok->special_lens || !tok->sht) return TN_ENOMEM;
  uint64_t *keys = malloc(n * sizeof(uint64_t));
  if (!keys) return TN_ENOMEM;
  n = 0;
  for (int32_t i = 0; i < tok->n_vocab; i++)
    if (tok->toks[i].attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_USER_DEFINED |
                             TN_TOK_ATTR_UNKNOWN))
      keys[n++] = ((uint64_t)(UINT32_MAX - tok->toks[i].len) << 32) |
                  (uint32_t)i;
  qsort(keys, n, sizeof(uint64_t), cmp_special);
  for (size_t k = 0; k < n; k++) tok->special[k] = (int32_t)(uint32_t)keys[k];
  free(keys);

  tok->sht_mask = sz - 1;
  memset(tok->sht, 0xff, sz * sizeof(int32_t));
  for (size_t k = 0; k < n; k++) {
    size_t len;
    const char *t = tn_tok_text(tok, tok->special[k], &len);
    uint32_t h = (uint32_t)tn_tok_hash(t, len) & tok->sht_mask;
    bool dup = false;
    while (tok->sht[h] >= 0) {
      int32_t o = tok->special[tok->sht[h]];
      if (tok->toks[o].len == len &&
          memcmp(tok->pool + tok->toks[o].off, t, len) == 0) {
        dup = true; /* same text twice: the first (higher priority) wins */
        break;
      }
      h = (h + 1) & tok->sht_mask;
    }
    if (!dup) tok->sht[h] = (int32_t)k;
  }
  /* distinct lengths, descending */
  size_t nl = 0;
  for (size_t k = 0; k < n; k++) {
    uint32_t l = tok->toks[tok->special[k]].len;
    if (nl == 0 || tok->special_lens[nl - 1] != l) tok->special_lens[nl++] = l;
  }
  qsort(tok->special_lens, nl, sizeof(uint32_t), cmp_u32_desc);
  tok->n_special_lens = nl;
  return TN_OK;
}

static enum tn_status build_eog(struct tn_tokenizer *tok) {
  size_t cap = 16, n = 0;
  int32_t *v = malloc(cap * sizeof(int32_t));
  if (!v) return TN_ENOMEM;
  for (size_t k = 0; k < TN_ARRAY_LEN(k_eog_texts); k++) {
    int32_t id = tn_tok_lookup(tok, k_eog_texts[k], strlen(k_eog_texts[k]));
    if (id >= 0) v[n++] = id;
  }
  int32_t extra[3] = {tok->eos, tok->eot, tok->eom};
  for (int k = 0; k < 3; k++)
    if (extra[k] >= 0) v[n++] = extra[k];
  qsort(v, n, sizeof(int32_t), cmp_i32);
  size_t m = 0;
  for (size_t k = 0; k < n; k++)
    if (m == 0 || v[m - 1] != v[k]) v[m++] = v[k];
  tok->eog = v;
  tok->n_eog = m;
  for (size_t k = 0; k < m; k++) {
    struct tn_tok_entry *e = &tok->toks[v[k]];
    if (!(e->attr & TN_TOK_ATTR_CONTROL)) {
      size_t len;
      const char *t = tn_tok_text(tok, v[k], &len);
      /* eos itself keeps its type (llama.cpp only retypes by text) */
      bool by_text = false;
      for (size_t j = 0; j < TN_ARRAY_LEN(k_eog_texts); j++)
        if (strlen(k_eog_texts[j]) == len &&
            memcmp(k_eog_texts[j], t, len) == 0)
          by_text = true;
      if (by_text) e->attr |= TN_TOK_ATTR_CONTROL;
    }
  }
  return TN_OK;
}

static enum tn_status load_vocab(struct tn_tokenizer *tok,
                                 const struct tn_gguf *g,
                                 struct tn_error *err) {
  const struct tn_gguf_kv *kt = tn_gguf_find_kv(g, "tokenizer.ggml.tokens");
  if (!kt)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: missing key tokenizer.ggml.tokens");
  if (kt->type != TN_GGUF_TYPE_ARRAY || kt->arr_type != TN_GGUF_TYPE_STRING ||
      !kt->arr_strs)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: tokenizer.ggml.tokens is not an array of "
                        "strings");
  if (kt->arr_n == 0 || kt->arr_n > (uint64_t)INT32_MAX / 2)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: tokenizer.ggml.tokens has %llu entries",
                        (unsigned long long)kt->arr_n);
  int32_t n = (int32_t)kt->arr_n;
  tok->n_vocab = n;

  const struct tn_gguf_kv *ks = tn_gguf_find_kv(g, "tokenizer.ggml.scores");
  if (ks) {
    if (ks->type != TN_GGUF_TYPE_ARRAY ||
        (ks->arr_type != TN_GGUF_TYPE_FLOAT32 &&
         ks->arr_type != TN_GGUF_TYPE_INT32))
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: tokenizer.ggml.scores is not an array "
                          "of float32/int32");
    if (ks->arr_n != kt->arr_n)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: tokenizer.ggml.scores has %llu entries "
                          "but tokenizer.ggml.tokens has %d",
                          (unsigned long long)ks->arr_n, n);
  }
  const struct tn_gguf_kv *ky =
      tn_gguf_find_kv(g, "tokenizer.ggml.token_type");
  if (ky) {
    if (ky->type != TN_GGUF_TYPE_ARRAY ||
        (ky->arr_type != TN_GGUF_TYPE_INT32 &&
         ky->arr_type != TN_GGUF_TYPE_UINT32 &&
         ky->arr_type != TN_GGUF_TYPE_INT8 &&
         ky->arr_type != TN_GGUF_TYPE_UINT8))
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: tokenizer.ggml.token_type is not an "
                          "array of integers");
    if (ky->arr_n != kt->arr_n)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: tokenizer.ggml.token_type has %llu "
                          "entries but tokenizer.ggml.tokens has %d",
                          (unsigned long long)ky->arr_n, n);
  }

  /* pool size: every text, empty ones as "[EMPTY_<id>]" */
  size_t pool = 0;
  for (int32_t i = 0; i < n; i++) {
    size_t l = kt->arr_strs[i].len;
    if (l == 0) l = 24;
    if (l > UINT32_MAX / 2 || tn_add_overflow(pool, l, &pool) ||
        pool > UINT32_MAX / 2)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: token texts too large (token %d)", i);
  }
  tok->toks = calloc((size_t)n, sizeof(*tok->toks));
  tok->pool = malloc(pool ? pool : 1);
  uint32_t hsz = ht_size_for((size_t)n);
  tok->ht = malloc(hsz * sizeof(int32_t));
  if (!tok->toks || !tok->pool || !tok->ht)
    return tn_error_set(err, TN_ENOMEM, "tokenizer: out of memory");
  tok->ht_mask = hsz - 1;
  memset(tok->ht, 0xff, hsz * sizeof(int32_t));

  size_t off = 0;
  for (int32_t i = 0; i < n; i++) {
    struct tn_tok_entry *e = &tok->toks[i];
    struct tn_str s = kt->arr_strs[i];
    e->off = (uint32_t)off;
    if (s.len == 0) {
      int w = snprintf(tok->pool + off, 24, "[EMPTY_%d]", (int)i);
      e->len = (uint32_t)w;
      tn_log_warn("tokenizer: empty token at index %d", (int)i);
    } else {
      memcpy(tok->pool + off, s.data, s.len);
      e->len = (uint32_t)s.len;
    }
    off += e->len;
    if (e->len > tok->max_tok_len) tok->max_tok_len = e->len;
    e->score = ks ? (float)tn_gguf_arr_f64(ks, (uint64_t)i) : 0.0f;
    int64_t ty = ky ? tn_gguf_arr_i64(ky, (uint64_t)i) : TN_TOK_TYPE_NORMAL;
    switch (ty) {
    case TN_TOK_TYPE_NORMAL: e->attr = TN_TOK_ATTR_NORMAL; break;
    case TN_TOK_TYPE_UNKNOWN: e->attr = TN_TOK_ATTR_UNKNOWN; break;
    case TN_TOK_TYPE_CONTROL: e->attr = TN_TOK_ATTR_CONTROL; break;
    case TN_TOK_TYPE_USER_DEFINED: e->attr = TN_TOK_ATTR_USER_DEFINED; break;
    case TN_TOK_TYPE_UNUSED: e->attr = TN_TOK_ATTR_UNUSED; break;
    case TN_TOK_TYPE_BYTE: e->attr = TN_TOK_ATTR_BYTE; break;
    default: e->attr = TN_TOK_ATTR_UNDEFINED; break;
    }
    e->byte = -1;
    if (e->attr & TN_TOK_ATTR_BYTE) {
      int b = parse_byte_token(tok->pool + e->off, e->len);
      if (b < 0) {
        char esc[32];
        size_t k = 0;
        for (size_t j = 0; j < e->len && k + 5 < sizeof(esc); j++) {
          unsigned char c = (unsigned char)tok->pool[e->off + j];
          k += (size_t)snprintf(esc + k, sizeof(esc) - k,
                                c >= 0x20 && c < 0x7f ? "%c" : "\\x%02x", c);
        }
        tn_log_warn("tokenizer: token %d '%s' has type byte but is not "
                    "<0xHH>; treated as a normal token",
                    (int)i, esc);
        e->attr = TN_TOK_ATTR_NORMAL;
      } else {
        e->byte = (int16_t)b;
      }
    }
    /* insert, the last id with a text wins */
    uint32_t h = (uint32_t)tn_tok_hash(tok->pool + e->off, e->len) &
                 tok->ht_mask;
    for (;;) {
      int32_t o = tok->ht[h];
      if (o < 0) {
        tok->ht[h] = i;
        break;
      }
      if (tok->toks[o].len == e->len &&
          memcmp(tok->pool + tok->toks[o].off, tok->pool + e->off, e->len) ==
              0) {
        tok->ht[h] = i;
        break;
      }
      h = (h + 1) & tok->ht_mask;
    }
  }
  tok->pool_size = off;
  return TN_OK;
}

enum tn_status tn_tokenizer_load(const struct tn_gguf *g,
                                 struct tn_tokenizer **out,
                                 struct tn_error *err) {
  enum tn_status st;
  *out = NULL;
  struct tn_tokenizer *tok = calloc(1, sizeof(*tok));
  if (!tok) return tn_error_set(err, TN_ENOMEM, "tokenizer: out of memory");
  tok->bos = tok->eos = tok->eot = tok->eom = tok->unk = tok->sep = tok->pad =
      -1;

  struct tn_str model;
  st = tn_gguf_get_str(g, "tokenizer.ggml.model", &model, err);
  if (st == TN_ENOENT) {
    st = tn_error_set(err, TN_EFORMAT,
                      "tokenizer: missing key tokenizer.ggml.model");
    goto fail;
  }
  if (st != TN_OK) goto fail;
  if (tn_str_eq(model, "gpt2")) {
    tok->kind = TN_VOCAB_KIND_BPE;
  } else if (tn_str_eq(model, "llama")) {
    tok->kind = TN_VOCAB_KIND_SPM;
  } else {
    char shown[65];
    size_t k = 0;
    for (; k < model.len && k < 64; k++) {
      unsigned char ch = (unsigned char)model.data[k];
      shown[k] = ch >= 0x20 && ch <= 0x7e ? (char)ch : '?';
    }
    shown[k] = '\0';
    st = tn_error_set(err, TN_EUNSUPPORTED,
                      "tokenizer: tokenizer.ggml.model = '%s' is not "
                      "supported (gpt2, llama)",
                      shown);
    goto fail;
  }

  st = load_vocab(tok, g, err);
  if (st != TN_OK) goto fail;

  /* defaults as llama.cpp */
  if (tok->kind == TN_VOCAB_KIND_SPM) {
    tok->bos = 1;
    tok->eos = 2;
    tok->unk = 0;
    tok->add_bos = true;
    tok->add_space_prefix = true;
  } else {
    tok->bos = 11;
    tok->eos = 11;
    tok->add_bos = false;
    tok->add_space_prefix = false;
  }
  tok->add_eos = false;

  if (tok->kind == TN_VOCAB_KIND_BPE) {
    st = tn_bpe_init(tok, g, err); /* may set add_bos for llama3 */
    if (st != TN_OK) goto fail;
  }

  static const struct {
    const char *key;
    size_t field;
  } id_keys[] = {
      {"tokenizer.ggml.bos_token_id", offsetof(struct tn_tokenizer, bos)},
      {"tokenizer.ggml.eos_token_id", offsetof(struct tn_tokenizer, eos)},
      {"tokenizer.ggml.eot_token_id", offsetof(struct tn_tokenizer, eot)},
      {"tokenizer.ggml.eom_token_id", offsetof(struct tn_tokenizer, eom)},
      {"tokenizer.ggml.unknown_token_id", offsetof(struct tn_tokenizer, unk)},
      {"tokenizer.ggml.seperator_token_id",
       offsetof(struct tn_tokenizer, sep)},
      {"tokenizer.ggml.padding_token_id", offsetof(struct tn_tokenizer, pad)},
  };
  for (size_t k = 0; k < TN_ARRAY_LEN(id_keys); k++) {
    int32_t *p = (int32_t *)((char *)tok + id_keys[k].field);
    st = load_id(g, id_keys[k].key, tok->n_vocab, p, err);
    if (st != TN_OK) goto fail;
  }
  if ((st = load_bool(g, "tokenizer.ggml.add_bos_token", &tok->add_bos,
                      err)) != TN_OK ||
      (st = load_bool(g, "tokenizer.ggml.add_eos_token", &tok->add_eos,
                      err)) != TN_OK ||
      (st = load_bool(g, "tokenizer.ggml.add_space_prefix",
                      &tok->add_space_prefix, err)) != TN_OK)
    goto fail;
  if (tok->add_bos && tok->bos < 0) {
    tn_log_warn("tokenizer: add_bos_token set but there is no BOS token");
    tok->add_bos = false;
  }
  if (tok->add_eos && tok->eos < 0) {
    tn_log_warn("tokenizer: add_eos_token set but there is no EOS token");
    tok->add_eos = false;
  }

  if (tok->eot < 0) {
    for (size_t k = 0; k < TN_ARRAY_LEN(k_eot_texts) && tok->eot < 0; k++)
      tok->eot = tn_tok_lookup(tok, k_eot_texts[k], strlen(k_eot_texts[k]));
  }
  if (tok->eom < 0) tok->eom = tn_tok_lookup(tok, "<|eom_id|>", 10);

  st = build_eog(tok);
  if (st != TN_OK) {
    st = tn_error_set(err, st, "tokenizer: out of memory");
    goto fail;
  }
  st = build_special(tok);
  if (st != TN_OK) {
    st = tn_error_set(err, st, "tokenizer: out of memory");
    goto fail;
  }

  for (int b = 0; b < 256; b++) tok->byte_tok[b] = -1;
  if (tok->kind == TN_VOCAB_KIND_SPM) {
    for (int b = 0; b < 256; b++) {
      char buf[8];
      snprintf(buf, sizeof(buf), "<0x%02X>", b);
      int32_t id = tn_tok_lookup(tok, buf, 6);
      if (id < 0) {
        char c = (char)b;
        id = tn_tok_lookup(tok, &c, 1);
      }
      tok->byte_tok[b] = id;
    }
  }

  tn_chat_detect(tok, g);
  *out = tok;
  return TN_OK;
fail:
  tn_tokenizer_free(tok);
  return st;
}

void tn_tokenizer_free(struct tn_tokenizer *tok) {
  if (!tok) return;
  tn_bpe_deinit(tok);
  tn_chat_deinit(tok);
  free(tok->toks);
  free(tok->pool);
  free(tok->ht);
  free(tok->eog);
  free(tok->special);
  free(tok->special_lens);
  free(tok->sht);
  free(tok);
}

/* ---- queries */

int32_t tn_tokenizer_n_vocab(const struct tn_tokenizer *tok) {
  return tok->n_vocab;
}
int32_t tn_tokenizer_bos(const struct tn_tokenizer *tok) { return tok->bos; }
int32_t tn_tokenizer_eos(const struct tn_tokenizer *tok) { return tok->eos; }
int32_t tn_tokenizer_eot(const struct tn_tokenizer *tok) { return tok->eot; }
bool tn_tokenizer_add_bos(const struct tn_tokenizer *tok) {
  return tok->add_bos;
}

bool tn_tokenizer_is_eog(const struct tn_tokenizer *tok, int32_t id) {
  size_t lo = 0, hi = tok->n_eog;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (tok->eog[mid] == id) return true;
    if (tok->eog[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

bool tn_tokenizer_is_special(const struct tn_tokenizer *tok, int32_t id) {
  if (id < 0 || id >= tok->n_vocab) return false;
  return (tok->toks[id].attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_UNKNOWN)) !=
         0;
}

int32_t tn_tokenizer_find(const struct tn_tokenizer *tok, const char *text,
                          size_t len) {
  return tn_tok_lookup(tok, text, len);
}

/* ---- special-token splitting */

struct frag {
  int32_t id; /* >= 0: a token; -1: raw text [off, off+len) */
  size_t off, len;
};

struct cand {
  uint32_t prio;
  uint32_t len;
  size_t pos;
};

static int cmp_cand(const void *a, const void *b) {
  const struct cand *x = a, *y = b;
  if (x->prio != y->prio) return x->prio < y->prio ? -1 : 1;
  return (x->pos > y->pos) - (x->pos < y->pos);
}

static int cmp_cand_pos(const void *a, const void *b) {
  const struct cand *x = a, *y = b;
  return (x->pos > y->pos) - (x->pos < y->pos);
}

static int32_t special_lookup(const struct tn_tokenizer *tok, const char *t,
                              size_t len) {
  uint32_t h = (uint32_t)tn_tok_hash(t, len) & tok->sht_mask;
  for (;;) {
    int32_t k = tok->sht[h];
    if (k < 0) return -1;
    int32_t id = tok->special[k];
    if (tok->toks[id].len == len &&
        memcmp(tok->pool + tok->toks[id].off, t, len) == 0)
      return k;
    h = (h + 1) & tok->sht_mask;
  }
}

/* Splits text into fragments: *out (malloc'd), *n_out. */
static enum tn_status partition(const struct tn_tokenizer *tok,
                                const char *text, size_t len,
                                bool parse_special, struct frag **out,
                                size_t *n_out) {
  struct cand *cands = NULL;
  size_t n_cands = 0, cap_cands = 0;
  uint8_t *claimed = NULL;
  struct frag *frags = NULL;
  enum tn_status st = TN_ENOMEM;

  if (tok->n_special > 0 && len > 0) {
    uint8_t first[256] = {0};
    for (size_t k = 0; k < tok->n_special; k++) {
      int32_t id = tok->special[k];
      if (!parse_special &&
          (tok->toks[id].attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_UNKNOWN)))
        continue;
      first[(uint8_t)tok->pool[tok->toks[id].off]] = 1;
    }
    for (size_t p = 0; p < len; p++) {
      if (!first[(uint8_t)text[p]]) continue;
      for (size_t li = 0; li < tok->n_special_lens; li++) {
        size_t l = tok->special_lens[li];
        if (l > len - p) continue;
        int32_t k = special_lookup(tok, text + p, l);
        if (k < 0) continue;
        int32_t id = tok->special[k];
        if (!parse_special &&
            (tok->toks[id].attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_UNKNOWN)))
          continue;
        if (n_cands == cap_cands) {
          size_t nc = cap_cands ? cap_cands * 2 : 16;
          struct cand *c = realloc(cands, nc * sizeof(*c));
          if (!c) goto out;
          cands = c;
          cap_cands = nc;
        }
        cands[n_cands++] = (struct cand){(uint32_t)k, (uint32_t)l, p};
      }
    }
  }

  size_t n_frags = 0;
  if (n_cands > 0) {
    qsort(cands, n_cands, sizeof(*cands), cmp_cand);
    claimed = calloc(len, 1); /* 0 free, 1 claimed, 2 claimed start */
    if (!claimed) goto out;
    size_t n_tok = 0;
    for (size_t c = 0; c < n_cands; c++) {
      size_t p = cands[c].pos, l = cands[c].len;
      bool free_span = true;
      for (size_t j = 0; j < l; j++)
        if (claimed[p + j]) {
          free_span = false;
          break;
        }
      if (!free_span) continue;
      memset(claimed + p, 1, l);
      claimed[p] = 2;
      cands[n_tok++] = cands[c];
    }
    /* order accepted tokens by position */
    qsort(cands, n_tok, sizeof(*cands), cmp_cand_pos);
    frags = malloc((2 * n_tok + 1) * sizeof(*frags));
    if (!frags) goto out;
    size_t at = 0;
    for (size_t c = 0; c < n_tok; c++) {
      if (cands[c].pos > at)
        frags[n_frags++] = (struct frag){-1, at, cands[c].pos - at};
      frags[n_frags++] = (struct frag){tok->special[cands[c].prio],
                                       cands[c].pos, cands[c].len};
      at = cands[c].pos + cands[c].len;
    }
    if (at < len) frags[n_frags++] = (struct frag){-1, at, len - at};
  } else {
    frags = malloc(sizeof(*frags));
    if (!frags) goto out;
    if (len > 0) frags[n_frags++] = (struct frag){-1, 0, len};
  }
  *out = frags;
  *n_out = n_frags;
  frags = NULL;
  st = TN_OK;
out:
  free(cands);
  free(claimed);
  free(frags);
  return st;
}

/* ---- encode */

enum tn_status tn_tokenizer_encode(const struct tn_tokenizer *tok,
                                   const char *text, size_t len,
                                   bool add_special, bool parse_special,
                                   int32_t **out, size_t *n_out,
                                   struct tn_error *err) {
  struct tn_ids ids = {0};
  struct frag *frags = NULL;
  size_t n_frags = 0;
  char *buf = NULL;
  enum tn_status st;
  *out = NULL;
  *n_out = 0;
  if (!text && len > 0)
    return tn_error_set(err, TN_EINVAL, "tokenizer: NULL text");
  /* Symbol indices inside the tokenizers are 32-bit. */
  if (len > TN_TOKENIZER_MAX_TEXT)
    return tn_error_set(err, TN_ERANGE,
                        "tokenizer: text of %zu bytes exceeds the limit of %d "
                        "MiB",
                        len, TN_TOKENIZER_MAX_TEXT >> 20);

  st = partition(tok, text, len, parse_special, &frags, &n_frags);
  if (st != TN_OK) goto fail;

  if (add_special && tok->add_bos && (st = tn_ids_push(&ids, tok->bos)))
    goto fail;

  if (tok->kind == TN_VOCAB_KIND_SPM) {
    bool prev_special = true;
    for (size_t f = 0; f < n_frags; f++) {
      if (frags[f].id >= 0) {
        if ((st = tn_ids_push(&ids, frags[f].id))) goto fail;
        prev_special = true;
        continue;
      }
      /* space prefix, spaces -> U+2581 */
      const char *s = text + frags[f].off;
      size_t n = frags[f].len, need;
      if (tn_mul_overflow(n + 1, 3, &need)) {
        st = TN_ENOMEM;
        goto fail;
      }
      char *nb = realloc(buf, need);
      if (!nb) {
        st = TN_ENOMEM;
        goto fail;
      }
      buf = nb;
      size_t m = 0;
      if (tok->add_space_prefix && prev_special) {
        memcpy(buf + m, "\xE2\x96\x81", 3);
        m += 3;
      }
      for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') {
          memcpy(buf + m, "\xE2\x96\x81", 3);
          m += 3;
        } else {
          buf[m++] = s[i];
        }
      }
      if ((st = tn_spm_encode(tok, buf, m, &ids))) goto fail;
      prev_special = false;
    }
  } else {
    for (size_t f = 0; f < n_frags; f++) {
      if (frags[f].id >= 0) {
        if ((st = tn_ids_push(&ids, frags[f].id))) goto fail;
        continue;
      }
      if ((st = tn_bpe_encode(tok, text + frags[f].off, frags[f].len, &ids)))
        goto fail;
    }
  }
  if (add_special && tok->add_eos && (st = tn_ids_push(&ids, tok->eos)))
    goto fail;

  free(frags);
  free(buf);
  if (!ids.v) {
    ids.v = malloc(sizeof(int32_t));
    if (!ids.v) return tn_error_set(err, TN_ENOMEM, "tokenizer: out of memory");
  }
  *out = ids.v;
  *n_out = ids.n;
  return TN_OK;
fail:
  free(frags);
  free(buf);
  free(ids.v);
  return tn_error_set(err, st, "tokenizer: encode failed: %s",
                      tn_status_str(st));
}

/* ---- pieces */

static size_t put(char *buf, size_t cap, size_t at, const char *s, size_t n) {
  if (at < cap) memcpy(buf + at, s, TN_MIN(n, cap - at));
  return at + n;
}

size_t tn_tokenizer_piece(const struct tn_tokenizer *tok, int32_t id,
                          char *buf, size_t cap, bool render_special) {
  if (id < 0 || id >= tok->n_vocab) return 0;
  const struct tn_tok_entry *e = &tok->toks[id];
  const char *t = tok->pool + e->off;
  size_t len = e->len;
  if (e->attr & (TN_TOK_ATTR_CONTROL | TN_TOK_ATTR_UNKNOWN)) {
    if (!render_special) return 0;
    return put(buf, cap, 0, t, len);
  }
  if (e->attr & TN_TOK_ATTR_USER_DEFINED) return put(buf, cap, 0, t, len);
  if (e->attr & TN_TOK_ATTR_BYTE) {
    char c = (char)e->byte;
    return put(buf, cap, 0, &c, 1);
  }
  if (!(e->attr & TN_TOK_ATTR_NORMAL)) return 0; /* unused, undefined */
  size_t at = 0;
  if (tok->kind == TN_VOCAB_KIND_SPM) {
    for (size_t i = 0; i < len;) {
      if (len - i >= 3 && memcmp(t + i, "\xE2\x96\x81", 3) == 0) {
        at = put(buf, cap, at, " ", 1);
        i += 3;
      } else {
        at = put(buf, cap, at, t + i, 1);
        i++;
      }
    }
    return at;
  }
  /* byte-level BPE: each codepoint stands for one byte */
  for (size_t i = 0; i < len;) {
    uint32_t cpt;
    size_t n = tn_utf8_decode((const uint8_t *)t + i, len - i, &cpt);
    int b = n ? tn_bpe_cpt_to_byte(cpt) : -1;
    if (b < 0) {
      /* not a byte-level character: keep it as is */
      size_t k = n ? n : 1;
      at = put(buf, cap, at, t + i, k);
      i += k;
    } else {
      char c = (char)b;
      at = put(buf, cap, at, &c, 1);
      i += n;
    }
  }
  return at;
}

/* ---- streaming detokenizer */

void tn_detok_init(struct tn_detok *d, const struct tn_tokenizer *tok,
                   bool render_special) {
  memset(d, 0, sizeof(*d));
  d->tok = tok;
  d->render_special = render_special;
}

static const char k_fffd[3] = {'\xEF', '\xBF', '\xBD'};

static size_t utf8_need(uint8_t c) {
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}

/* Feeds one byte; appends completed output at out[*at] (bounded by cap). */
static void detok_byte(struct tn_detok *d, uint8_t c, char *out, size_t cap,
                       size_t *at) {
  for (;;) {
    if (d->n_pending == 0) {
      if (c < 0x80) {
        if (*at < cap) out[(*at)++] = (char)c;
        return;
      }
      if (utf8_need(c) == 0) {
        if (*at + 3 <= cap) {
          memcpy(out + *at, k_fffd, 3);
          *at += 3;
        }
        return;
      }
      d->pending[d->n_pending++] = (char)c;
      return;
    }
    uint8_t lead = (uint8_t)d->pending[0];
    uint8_t lo = 0x80, hi = 0xBF;
    if (d->n_pending == 1) {
      if (lead == 0xE0) lo = 0xA0;
      if (lead == 0xED) hi = 0x9F;
      if (lead == 0xF0) lo = 0x90;
      if (lead == 0xF4) hi = 0x8F;
    }
    if (c >= lo && c <= hi) {
      d->pending[d->n_pending++] = (char)c;
      if (d->n_pending == utf8_need(lead)) {
        if (*at + d->n_pending <= cap) {
          memcpy(out + *at, d->pending, d->n_pending);
          *at += d->n_pending;
        }
        d->n_pending = 0;
      }
      return;
    }
    /* the pending sequence is broken: one U+FFFD, then retry c */
    if (*at + 3 <= cap) {
      memcpy(out + *at, k_fffd, 3);
      *at += 3;
    }
    d->n_pending = 0;
  }
}

size_t tn_detok_push(struct tn_detok *d, int32_t id, char *out, size_t cap) {
  char piece[256];
  size_t n = tn_tokenizer_piece(d->tok, id, piece, sizeof(piece),
                                d->render_special);
  const char *src = piece;
  char *heap = NULL;
  if (n > sizeof(piece)) {
    heap = malloc(n);
    if (!heap) return 0;
    tn_tokenizer_piece(d->tok, id, heap, n, d->render_special);
    src = heap;
  }
  size_t at = 0;
  for (size_t i = 0; i < n; i++) detok_byte(d, (uint8_t)src[i], out, cap, &at);
  free(heap);
  return at;
}

size_t tn_tokenizer_max_token_len(const struct tn_tokenizer *tok) {
  return tok->max_tok_len ? tok->max_tok_len : 1;
}

size_t tn_detok_cap(const struct tn_tokenizer *tok) {
  /* each input byte gives at most 3 output bytes (U+FFFD), plus what a
   * broken pending sequence flushes */
  return 3 * (tok->max_tok_len + 8);
}

size_t tn_detok_flush(struct tn_detok *d, char *out, size_t cap) {
  size_t at = 0;
  if (d->n_pending > 0) {
    if (cap >= 3) {
      memcpy(out, k_fffd, 3);
      at = 3;
    }
    d->n_pending = 0;
  }
  return at;
}
