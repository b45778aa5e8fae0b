/*
 * bpe.c: byte-level BPE ("gpt2" vocabularies).
 *
 * Encoding a raw-text fragment (special tokens are already split out):
 *
 *  1. Decode UTF-8 the way llama.cpp does (lenient about overlongs, each
 *     byte of a broken sequence becomes U+FFFD), giving codepoints.
 *  2. Pre-tokenize: the regexes named by tokenizer.ggml.pre run one after
 *     another through PCRE2 (UTF + UCP). Each regex splits every piece the
 *     previous one left into its matches and the gaps between them; a
 *     regex sees only its piece, so lookaheads stop at piece ends. `\s`
 *     is spelled out as Unicode White_Space (what llama.cpp uses), since
 *     PCRE2's \s also takes U+180E.
 *  3. Each piece's UTF-8 bytes are mapped to GPT-2's printable codepoints
 *     (bytes 0x21-0x7E, 0xA1-0xAC, 0xAE-0xFF stand for themselves, the
 *     rest for 256 + n in order) and merged: repeatedly the adjacent pair
 *     with the lowest merge rank (leftmost on ties) becomes one symbol.
 *     Symbols that are not tokens fall back to their single bytes.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_internal.h"

/* ---- GPT-2 byte <-> codepoint */

static bool byte_is_printable(int b) {
  return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) ||
         (b >= 0xAE && b <= 0xFF);
}

uint32_t tn_bpe_byte_to_cpt(uint8_t b) {
  if (byte_is_printable(b)) return b;
  uint32_t n = 0;
  for (int c = 0; c < b; c++)
    if (!byte_is_printable(c)) n++;
  return 256 + n;
}

int tn_bpe_cpt_to_byte(uint32_t cpt) {
  if (cpt < 256) return byte_is_printable((int)cpt) ? (int)cpt : -1;
  if (cpt >= 256 + 68) return -1;
  uint32_t n = cpt - 256;
  for (int c = 0; c < 256; c++)
    if (!byte_is_printable(c) && n-- == 0) return c;
  return -1;
}

/* byte -> its UTF-8 GPT-2 character, precomputed */
static char g_byte_utf8[256][2];
static uint8_t g_byte_utf8_len[256];
static pthread_once_t g_byte_once = PTHREAD_ONCE_INIT;
static void byte_table_fill(void) {
  for (int b = 0; b < 256; b++) {
    char buf[4];
    size_t n = tn_utf8_encode(tn_bpe_byte_to_cpt((uint8_t)b), buf);
    memcpy(g_byte_utf8[b], buf, n);
    g_byte_utf8_len[b] = (uint8_t)n;
  }
}
static void byte_table_init(void) { pthread_once(&g_byte_once, byte_table_fill); }

/* ---- pre-tokenizer regexes (llama.cpp's, per tokenizer.ggml.pre) */

#define RE_GPT2 \
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define RE_LLAMA3                                                           \
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}" \
  "\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|" \
  "\\s+(?!\\S)|\\s+"
#define RE_QWEN2                                                            \
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}" \
  "\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"      \
  "\\s+(?!\\S)|\\s+"
#define RE_PORO                                                             \
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}" \
  "\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"     \
  "\\s+(?!\\S)|\\s+"

struct pre_def {
  const char *names; /* '|'-separated */
  bool ignore_merges;
  bool add_bos;
  const char *re[TN_PRE_MAX_REGEX];
};

static const struct pre_def k_pre[] = {
    {"default", false, false,
     {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}},
    {"llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|midm-2.0|lfm2",
     true, true, {RE_LLAMA3}},
    {"dbrx|smaug-bpe", false, false, {RE_LLAMA3}},
    {"qwen2|deepseek-r1-qwen|stablelm2", false, false, {RE_QWEN2}},
    {"smollm|starcoder|refact|command-r|codeshell|exaone", false, false,
     {"\\p{N}", RE_GPT2}},
    {"gpt2|gpt-2|phi-2|mpt|olmo|jais|jina-es|jina-de|roberta-bpe", false,
     false, {RE_GPT2}},
    {"poro-chat|bloom|gpt3-finnish", false, false, {RE_PORO}},
};

static bool name_in(const char *names, const char *name, size_t len) {
  const char *p = names;
  while (*p) {
    const char *e = strchr(p, '|');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n == len && memcmp(p, name, len) == 0) return true;
    if (!e) break;
    p = e + 1;
  }
  return false;
}

/* Unicode White_Space, llama.cpp's unicode_set_whitespace */
#define WS_CLASS                                                        \
  "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}" \
  "\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

/* Rewrites \s and \S as explicit White_Space classes. */
static char *rewrite_ws(const char *re) {
  size_t n = strlen(re), cap = n * 8 + 1 + 128;
  for (const char *p = re; *p; p++)
    if (p[0] == '\\' && (p[1] == 's' || p[1] == 'S')) cap += sizeof(WS_CLASS) + 4;
  char *out = malloc(cap);
  if (!out) return NULL;
  size_t o = 0;
  bool in_class = false;
  for (size_t i = 0; i < n; i++) {
    char c = re[i];
    if (c == '\\' && i + 1 < n) {
      char d = re[i + 1];
      if (d == 's' || d == 'S') {
        const char *rep;
        if (in_class) {
          rep = WS_CLASS; /* \S inside a class does not occur in ours */
        } else if (d == 's') {
          rep = "[" WS_CLASS "]";
        } else {
          rep = "[^" WS_CLASS "]";
        }
        size_t rl = strlen(rep);
        memcpy(out + o, rep, rl);
        o += rl;
        i++;
        continue;
      }
      out[o++] = c;
      out[o++] = d;
      i++;
      continue;
    }
    if (c == '[' && !in_class) in_class = true;
    else if (c == ']' && in_class) in_class = false;
    out[o++] = c;
  }
  out[o] = '\0';
  return out;
}

static enum tn_status compile_pre(struct tn_tokenizer *tok,
                                  const struct pre_def *def,
                                  struct tn_error *err) {
  for (int k = 0; k < TN_PRE_MAX_REGEX && def->re[k]; k++) {
    char *re = rewrite_ws(def->re[k]);
    if (!re) return tn_error_set(err, TN_ENOMEM, "tokenizer: out of memory");
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED,
                                     PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!code) {
      PCRE2_UCHAR msg[128];
      pcre2_get_error_message(ec, msg, sizeof(msg));
      enum tn_status st = tn_error_set(
          err, TN_EINTERNAL, "tokenizer: regex %d for pre '%s': %s at %zu", k,
          tok->pre_name, (const char *)msg, (size_t)eo);
      free(re);
      return st;
    }
    free(re);
    (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE); /* optional */
    tok->pre_re[tok->n_pre_re++] = code;
  }
  return TN_OK;
}

/* ---- merges */

static uint64_t merge_hash(const char *a, size_t na, const char *b,
                           size_t nb) {
  return tn_tok_hash(a, na) * 0x9E3779B97F4A7C15ull ^ tn_tok_hash(b, nb);
}

static int32_t merge_rank(const struct tn_tokenizer *tok, const char *a,
                          size_t na, const char *b, size_t nb) {
  if (!tok->mht) return -1;
  uint32_t h = (uint32_t)merge_hash(a, na, b, nb) & tok->mht_mask;
  for (;;) {
    int32_t k = tok->mht[h];
    if (k < 0) return -1;
    const struct tn_merge *m = &tok->merges[k];
    const char *t = tok->merge_pool + m->off;
    if (m->len_first == na && m->len_second == nb && memcmp(t, a, na) == 0 &&
        memcmp(t + na + 1, b, nb) == 0)
      return m->rank;
    h = (h + 1) & tok->mht_mask;
  }
}

enum tn_status tn_bpe_init(struct tn_tokenizer *tok, const struct tn_gguf *g,
                           struct tn_error *err) {
  byte_table_init();

  /* pre-tokenizer */
  struct tn_str pre = {"default", 7};
  const struct tn_gguf_kv *kp = tn_gguf_find_kv(g, "tokenizer.ggml.pre");
  if (kp) {
    if (kp->type != TN_GGUF_TYPE_STRING)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: tokenizer.ggml.pre has type %s, "
                          "expected string",
                          tn_gguf_type_name(kp->type));
    pre = kp->val.str;
  }
  size_t pl = TN_MIN(pre.len, sizeof(tok->pre_name) - 1);
  memcpy(tok->pre_name, pre.data, pl);
  tok->pre_name[pl] = '\0';
  for (size_t k = 0; k < pl; k++) /* file bytes never reach a log raw */
    if ((unsigned char)tok->pre_name[k] < 0x20 || (unsigned char)tok->pre_name[k] > 0x7e)
      tok->pre_name[k] = '?';
  const struct pre_def *def = NULL;
  for (size_t k = 0; k < TN_ARRAY_LEN(k_pre) && !def; k++)
    if (name_in(k_pre[k].names, pre.data, pre.len)) def = &k_pre[k];
  if (!def) {
    tn_log_warn("tokenizer: unknown pre-tokenizer '%s', using gpt2's regex",
                tok->pre_name);
    for (size_t k = 0; k < TN_ARRAY_LEN(k_pre); k++)
      if (name_in(k_pre[k].names, "gpt2", 4)) def = &k_pre[k];
  }
  tok->ignore_merges = def->ignore_merges;
  tok->add_bos = def->add_bos;
  enum tn_status st = compile_pre(tok, def, err);
  if (st != TN_OK) return st;

  /* merges */
  const struct tn_gguf_kv *km = tn_gguf_find_kv(g, "tokenizer.ggml.merges");
  if (!km)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: missing key tokenizer.ggml.merges");
  if (km->type != TN_GGUF_TYPE_ARRAY || km->arr_type != TN_GGUF_TYPE_STRING ||
      !km->arr_strs)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: tokenizer.ggml.merges is not an array of "
                        "strings");
  if (km->arr_n > (uint64_t)INT32_MAX / 2)
    return tn_error_set(err, TN_EFORMAT,
                        "tokenizer: tokenizer.ggml.merges has %llu entries",
                        (unsigned long long)km->arr_n);
  size_t n = (size_t)km->arr_n, pool = 0;
  for (size_t i = 0; i < n; i++)
    if (tn_add_overflow(pool, km->arr_strs[i].len + 1, &pool) ||
        pool > UINT32_MAX / 2)
      return tn_error_set(err, TN_EFORMAT,
                          "tokenizer: merges too large (merge %zu)", i);
  tok->merges = calloc(n ? n : 1, sizeof(*tok->merges));
  tok->merge_pool = malloc(pool ? pool : 1);
  uint32_t sz = 16;
  while (sz < n * 2 && sz < (1u << 30)) sz <<= 1;
  tok->mht = malloc(sz * sizeof(int32_t));
  if (!tok->merges || !tok->merge_pool || !tok->mht)
    return tn_error_set(err, TN_ENOMEM, "tokenizer: out of memory");
  tok->mht_mask = sz - 1;
  memset(tok->mht, 0xff, sz * sizeof(int32_t));
  size_t off = 0, m = 0;
  for (size_t i = 0; i < n; i++) {
    struct tn_str s = km->arr_strs[i];
    /* split at the first space after the first byte (llama.cpp); none:
     * both halves empty */
    const char *sp = s.len > 1 ? memchr(s.data + 1, ' ', s.len - 1) : NULL;
    size_t na = 0, nb = 0;
    const char *a = s.data, *b = s.data;
    if (sp) {
      na = (size_t)(sp - s.data);
      b = sp + 1;
      nb = s.len - na - 1;
    }
    uint32_t h = (uint32_t)merge_hash(a, na, b, nb) & tok->mht_mask;
    bool dup = false;
    for (;;) {
      int32_t k = tok->mht[h];
      if (k < 0) break;
      const struct tn_merge *o = &tok->merges[k];
      const char *t = tok->merge_pool + o->off;
      if (o->len_first == na && o->len_second == nb &&
          memcmp(t, a, na) == 0 && memcmp(t + na + 1, b, nb) == 0) {
        dup = true;
        break;
      }
      h = (h + 1) & tok->mht_mask;
    }
    if (dup) continue; /* first rank wins */
    struct tn_merge *me = &tok->merges[m];
    me->off = (uint32_t)off;
    me->len_first = (uint32_t)na;
    me->len_second = (uint32_t)nb;
    me->rank = (int32_t)i;
    memcpy(tok->merge_pool + off, a, na);
    tok->merge_pool[off + na] = ' ';
    memcpy(tok->merge_pool + off + na + 1, b, nb);
    off += na + nb + 1;
    tok->mht[h] = (int32_t)m++;
  }
  tok->n_merges = m;
  return TN_OK;
}

void tn_bpe_deinit(struct tn_tokenizer *tok) {
  for (int k = 0; k < tok->n_pre_re; k++) pcre2_code_free(tok->pre_re[k]);
  tok->n_pre_re = 0;
  free(tok->merges);
  free(tok->merge_pool);
  free(tok->mht);
  tok->merges = NULL;
  tok->merge_pool = NULL;
  tok->mht = NULL;
}

/* ---- encoding */

/* llama.cpp's unicode_cpt_from_utf8: returns the length consumed (>= 1)
 * and the codepoint, U+FFFD for a byte that does not start a sequence it
 * accepts. */
static size_t decode_lenient(const uint8_t *s, size_t n, uint32_t *cpt) {
  uint8_t c = s[0];
  if (!(c & 0x80)) {
    *cpt = c;
    return 1;
  }
  if (!(c & 0x40)) goto bad;
  if (!(c & 0x20)) {
    if (n < 2 || (s[1] & 0xC0) != 0x80) goto bad;
    *cpt = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    return 2;
  }
  if (!(c & 0x10)) {
    if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) goto bad;
    *cpt = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) |
           (s[2] & 0x3F);
    return 3;
  }
  if (!(c & 0x08)) {
    if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 ||
        (s[3] & 0xC0) != 0x80)
      goto bad;
    *cpt = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
           ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    return 4;
  }
bad:
  *cpt = 0xFFFD;
  return 1;
}

struct range {
  size_t a, b; /* codepoint indices [a, b) */
};

struct ranges {
  struct range *v;
  size_t n, cap;
};

static bool ranges_push(struct ranges *r, size_t a, size_t b) {
  if (r->n == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 64;
    struct range *v = realloc(r->v, cap * sizeof(*v));
    if (!v) return false;
    r->v = v;
    r->cap = cap;
  }
  r->v[r->n++] = (struct range){a, b};
  return true;
}


struct sym {
  int32_t prev, next;
  uint32_t off, n; /* into the word */
};

struct bpe_ws {
  struct sym *syms;
  size_t cap_syms;
  struct tn_bigram_heap heap;
};

static bool add_bigram(const struct tn_tokenizer *tok, struct bpe_ws *ws,
                       const char *word, int32_t l, int32_t r) {
  if (l < 0 || r < 0) return true;
  const struct sym *a = &ws->syms[l], *b = &ws->syms[r];
  int32_t rank = merge_rank(tok, word + a->off, a->n, word + b->off, b->n);
  if (rank < 0) return true;
  return tn_bigram_heap_push(&ws->heap, (struct tn_bigram){-(float)rank, l, r, a->n + b->n});
}

static enum tn_status merge_word(const struct tn_tokenizer *tok,
                                 struct bpe_ws *ws, const char *word,
                                 size_t len, struct tn_ids *out) {
  if (tok->ignore_merges) {
    int32_t id = tn_tok_lookup(tok, word, len);
    if (id >= 0) return tn_ids_push(out, id);
  }
  if (len > ws->cap_syms) {
    struct sym *s = realloc(ws->syms, len * sizeof(*s));
    if (!s) return TN_ENOMEM;
    ws->syms = s;
    ws->cap_syms = len;
  }
  int32_t n = 0;
  for (size_t off = 0; off < len;) {
    size_t cl = TN_MIN(len - off, tn_utf8_len_lead((uint8_t)word[off]));
    ws->syms[n] = (struct sym){n - 1, off + cl == len ? -1 : n + 1,
                               (uint32_t)off, (uint32_t)cl};
    off += cl;
    n++;
  }
  ws->heap.n = 0;
  for (int32_t i = 1; i < n; i++)
    if (!add_bigram(tok, ws, word, i - 1, i)) return TN_ENOMEM;
  while (ws->heap.n > 0) {
    struct tn_bigram bg = tn_bigram_heap_pop(&ws->heap);
    struct sym *l = &ws->syms[bg.left], *r = &ws->syms[bg.right];
    if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size) continue;
    l->n += r->n;
    r->n = 0;
    l->next = r->next;
    if (r->next >= 0) ws->syms[r->next].prev = bg.left;
    if (!add_bigram(tok, ws, word, l->prev, bg.left) ||
        !add_bigram(tok, ws, word, bg.left, l->next))
      return TN_ENOMEM;
  }
  for (int32_t i = 0; i < n; i++) {
    const struct sym *s = &ws->syms[i];
    if (s->n == 0) continue;
    int32_t id = tn_tok_lookup(tok, word + s->off, s->n);
    enum tn_status st;
    if (id >= 0) {
      if ((st = tn_ids_push(out, id))) return st;
      continue;
    }
    for (uint32_t j = 0; j < s->n; j++) {
      int32_t b = tn_tok_lookup(tok, word + s->off + j, 1);
      if (b >= 0 && (st = tn_ids_push(out, b))) return st;
    }
  }
  return TN_OK;
}

enum tn_status tn_bpe_encode(const struct tn_tokenizer *tok, const char *text,
                             size_t len, struct tn_ids *out) {
  enum tn_status st = TN_ENOMEM;
  uint32_t *cpts = NULL;
  size_t *roff = NULL;
  uint32_t *byte_cpt = NULL;
  char *rtext = NULL, *word = NULL;
  struct ranges cur = {0}, next = {0};
  pcre2_match_data *md = NULL;
  struct bpe_ws ws = {0};
  if (len == 0) return TN_OK;

  /* 1. codepoints, and the UTF-8 PCRE2 sees */
  size_t rcap;
  if (tn_mul_overflow(len, 4, &rcap)) return TN_ENOMEM;
  cpts = malloc(len * sizeof(*cpts));
  roff = malloc((len + 1) * sizeof(*roff));
  rtext = malloc(rcap + 1);
  if (!cpts || !roff || !rtext) goto out;
  size_t nc = 0, rl = 0;
  for (size_t i = 0; i < len;) {
    uint32_t c;
    i += decode_lenient((const uint8_t *)text + i, len - i, &c);
    cpts[nc] = c;
    roff[nc] = rl;
    if ((c >= 0xD800 && c <= 0xDFFF) || c > 0x10FFFF) c = 0xFFFD;
    rl += tn_utf8_encode(c, rtext + rl);
    nc++;
  }
  roff[nc] = rl;
  byte_cpt = malloc((rl + 1) * sizeof(*byte_cpt));
  if (!byte_cpt) goto out;
  for (size_t k = 0; k < nc; k++)
    for (size_t j = roff[k]; j < roff[k + 1]; j++) byte_cpt[j] = (uint32_t)k;
  byte_cpt[rl] = (uint32_t)nc;

  /* 2. pre-tokenize */
  if (!ranges_push(&cur, 0, nc)) goto out;
  md = pcre2_match_data_create(1, NULL);
  if (!md) goto out;
  for (int k = 0; k < tok->n_pre_re; k++) {
    next.n = 0;
    for (size_t p = 0; p < cur.n; p++) {
      size_t a = cur.v[p].a, b = cur.v[p].b;
      const char *subj = rtext + roff[a];
      size_t sl = roff[b] - roff[a];
      size_t at = 0, prev = 0;
      while (at < sl) {
        int rc = pcre2_match(tok->pre_re[k], (PCRE2_SPTR)subj, sl, at,
                             PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { /* empty match: step one character */
          at = me + 1;
          while (at < sl && ((uint8_t)subj[at] & 0xC0) == 0x80) at++;
          continue;
        }
        if (ms > prev &&
            !ranges_push(&next, byte_cpt[roff[a] + prev], byte_cpt[roff[a] + ms]))
          goto out;
        if (!ranges_push(&next, byte_cpt[roff[a] + ms], byte_cpt[roff[a] + me]))
          goto out;
        prev = at = me;
      }
      if (prev < sl &&
          !ranges_push(&next, byte_cpt[roff[a] + prev], b))
        goto out;
    }
    struct ranges t = cur;
    cur = next;
    next = t;
  }

  /* 3. byte-map and merge each piece */
  for (size_t p = 0; p < cur.n; p++) {
    size_t a = cur.v[p].a, b = cur.v[p].b;
    size_t wl = 0, wcap;
    if (tn_mul_overflow(b - a, 8, &wcap)) goto out;
    char *w = realloc(word, wcap ? wcap : 1);
    if (!w) goto out;
    word = w;
    for (size_t k = a; k < b; k++) {
      char u[4];
      uint32_t c = cpts[k];
      if (c > 0x10FFFF) c = 0xFFFD;
      size_t ul = tn_utf8_encode(c, u);
      for (size_t j = 0; j < ul; j++) {
        uint8_t by = (uint8_t)u[j];
        memcpy(word + wl, g_byte_utf8[by], g_byte_utf8_len[by]);
        wl += g_byte_utf8_len[by];
      }
    }
    st = merge_word(tok, &ws, word, wl, out);
    if (st != TN_OK) goto out;
  }
  st = TN_OK;
out:
  free(cpts);
  free(roff);
  free(rtext);
  free(byte_cpt);
  free(word);
  free(cur.v);
  free(next.v);
  free(ws.syms);
  free(ws.heap.v);
  if (md) pcre2_match_data_free(md);
  return st;
}
