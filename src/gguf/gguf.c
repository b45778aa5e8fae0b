/*
 * gguf.c: the GGUF reader (versions 2 and 3).
 *
 * A GGUF file is, all little-endian:
 *
 *   "GGUF" u32 version  u64 n_tensors  u64 n_kv
 *   n_kv x      { str key, u32 type, value }
 *   n_tensors x { str name, u32 n_dims, n_dims x u64 ne, u32 ggml type,
 *                 u64 offset }
 *   zero padding up to a multiple of general.alignment (default 32)
 *   the data section: tensor i at data_offset + offset_i
 *
 * where str is { u64 len, len bytes } and an array value is { u32 element
 * type, u64 count, count values }.
 *
 * Every byte of the file is hostile. The reader walks it with a cursor that
 * knows how many bytes remain, and checks every length and count against
 * them before it reads or allocates: a key/value needs at least 13 bytes and
 * a tensor info at least 32, so n_kv and n_tensors are bounded by the file
 * size before the arrays that describe them are allocated; an array of n
 * strings needs at least 8n bytes before its n views are allocated. Products
 * (element counts, byte sizes) and sums (offset + size, padding) use checked
 * arithmetic. Every rejection names the item, the field and the value, with
 * names from the file escaped.
 *
 * The result points into the file: keys, string values, raw array elements
 * and tensor data are views, valid until tn_gguf_close(). What we allocate
 * is the kv and tensor arrays, one view array per string array, and two
 * sorted index arrays used for duplicate detection and binary-search lookup
 * (sorting, not hashing, so crafted names cannot make it quadratic).
 */
#include "gguf/gguf_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tern's GGUF code assumes a little-endian host"
#endif

/* Smallest encodings: a kv is a key length (8), a type (4) and a one-byte
 * value; a tensor info is a name length (8), n_dims (4), one ne (8), a type
 * (4) and an offset (8). (Empty keys and names are rejected anyway.) */
#define MIN_KV_SIZE 13
#define MIN_TENSOR_INFO_SIZE 32

/* ---- ggml types: our own table of block layouts, ids 0..TN_TYPE_COUNT-1.
 * Ids without a name were removed from ggml and are rejected. */

static const struct {
  const char *name;
  int64_t blck_size;
  size_t type_size;
} ggml_types[TN_TYPE_COUNT] = {
    [TN_TYPE_F32] = {"F32", 1, 4},
    [TN_TYPE_F16] = {"F16", 1, 2},
    [TN_TYPE_Q4_0] = {"Q4_0", 32, 18},
    [TN_TYPE_Q4_1] = {"Q4_1", 32, 20},
    [TN_TYPE_Q5_0] = {"Q5_0", 32, 22},
    [TN_TYPE_Q5_1] = {"Q5_1", 32, 24},
    [TN_TYPE_Q8_0] = {"Q8_0", 32, 34},
    [TN_TYPE_Q8_1] = {"Q8_1", 32, 36},
    [TN_TYPE_Q2_K] = {"Q2_K", 256, 84},
    [TN_TYPE_Q3_K] = {"Q3_K", 256, 110},
    [TN_TYPE_Q4_K] = {"Q4_K", 256, 144},
    [TN_TYPE_Q5_K] = {"Q5_K", 256, 176},
    [TN_TYPE_Q6_K] = {"Q6_K", 256, 210},
    [TN_TYPE_Q8_K] = {"Q8_K", 256, 292},
    [TN_TYPE_IQ2_XXS] = {"IQ2_XXS", 256, 66},
    [TN_TYPE_IQ2_XS] = {"IQ2_XS", 256, 74},
    [TN_TYPE_IQ3_XXS] = {"IQ3_XXS", 256, 98},
    [TN_TYPE_IQ1_S] = {"IQ1_S", 256, 50},
    [TN_TYPE_IQ4_NL] = {"IQ4_NL", 32, 18},
    [TN_TYPE_IQ3_S] = {"IQ3_S", 256, 110},
    [TN_TYPE_IQ2_S] = {"IQ2_S", 256, 82},
    [TN_TYPE_IQ4_XS] = {"IQ4_XS", 256, 136},
    [TN_TYPE_I8] = {"I8", 1, 1},
    [TN_TYPE_I16] = {"I16", 1, 2},
    [TN_TYPE_I32] = {"I32", 1, 4},
    [TN_TYPE_I64] = {"I64", 1, 8},
    [TN_TYPE_F64] = {"F64", 1, 8},
    [TN_TYPE_IQ1_M] = {"IQ1_M", 256, 56},
    [TN_TYPE_BF16] = {"BF16", 1, 2},
    [TN_TYPE_TQ1_0] = {"TQ1_0", 256, 54},
    [TN_TYPE_TQ2_0] = {"TQ2_0", 256, 66},
    [TN_TYPE_MXFP4] = {"MXFP4", 32, 17},
};

bool tn_gguf_ggml_type(uint64_t t, int64_t *blck_size, size_t *type_size,
                       const char **name) {
  if (t >= TN_TYPE_COUNT || !ggml_types[t].name) return false;
  if (blck_size) *blck_size = ggml_types[t].blck_size;
  if (type_size) *type_size = ggml_types[t].type_size;
  if (name) *name = ggml_types[t].name;
  return true;
}

/* ---- metadata value types */

static const char *const value_type_names[TN_GGUF_TYPE_COUNT] = {
    [TN_GGUF_TYPE_UINT8] = "UINT8",     [TN_GGUF_TYPE_INT8] = "INT8",
    [TN_GGUF_TYPE_UINT16] = "UINT16",   [TN_GGUF_TYPE_INT16] = "INT16",
    [TN_GGUF_TYPE_UINT32] = "UINT32",   [TN_GGUF_TYPE_INT32] = "INT32",
    [TN_GGUF_TYPE_FLOAT32] = "FLOAT32", [TN_GGUF_TYPE_BOOL] = "BOOL",
    [TN_GGUF_TYPE_STRING] = "STRING",   [TN_GGUF_TYPE_ARRAY] = "ARRAY",
    [TN_GGUF_TYPE_UINT64] = "UINT64",   [TN_GGUF_TYPE_INT64] = "INT64",
    [TN_GGUF_TYPE_FLOAT64] = "FLOAT64",
};

static const uint8_t value_sizes[TN_GGUF_TYPE_COUNT] = {
    [TN_GGUF_TYPE_UINT8] = 1,   [TN_GGUF_TYPE_INT8] = 1,
    [TN_GGUF_TYPE_UINT16] = 2,  [TN_GGUF_TYPE_INT16] = 2,
    [TN_GGUF_TYPE_UINT32] = 4,  [TN_GGUF_TYPE_INT32] = 4,
    [TN_GGUF_TYPE_FLOAT32] = 4, [TN_GGUF_TYPE_BOOL] = 1,
    [TN_GGUF_TYPE_UINT64] = 8,  [TN_GGUF_TYPE_INT64] = 8,
    [TN_GGUF_TYPE_FLOAT64] = 8,
};

const char *tn_gguf_type_name(enum tn_gguf_type t) {
  if ((unsigned)t >= TN_GGUF_TYPE_COUNT) return "invalid";
  return value_type_names[t];
}

size_t tn_gguf_value_size(enum tn_gguf_type t) {
  if ((unsigned)t >= TN_GGUF_TYPE_COUNT) return 0;
  return value_sizes[t];
}

static bool type_is_int(enum tn_gguf_type t) {
  switch (t) {
  case TN_GGUF_TYPE_UINT8: case TN_GGUF_TYPE_INT8:
  case TN_GGUF_TYPE_UINT16: case TN_GGUF_TYPE_INT16:
  case TN_GGUF_TYPE_UINT32: case TN_GGUF_TYPE_INT32:
  case TN_GGUF_TYPE_UINT64: case TN_GGUF_TYPE_INT64:
    return true;
  default:
    return false;
  }
}

static bool type_is_signed(enum tn_gguf_type t) {
  return t == TN_GGUF_TYPE_INT8 || t == TN_GGUF_TYPE_INT16 ||
         t == TN_GGUF_TYPE_INT32 || t == TN_GGUF_TYPE_INT64;
}

bool tn_str_eq(struct tn_str s, const char *cstr) {
  size_t n = strlen(cstr);
  return s.len == n && (n == 0 || memcmp(s.data, cstr, n) == 0);
}

/* ---- messages */

char *tn_gguf_escape(const char *s, size_t len, char *buf, size_t cap) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  if (cap < 8) {
    if (cap) buf[0] = '\0';
    return buf;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    bool plain = c >= 0x20 && c < 0x7f && c != '\'' && c != '\\' && c != '"';
    size_t need = plain ? 1 : 4;
    /* keep room for "..." and the NUL */
    if (o + need + 4 > cap) {
      memcpy(buf + o, "...", 3);
      o += 3;
      break;
    }
    if (plain) {
      buf[o++] = (char)c;
    } else {
      buf[o++] = '\\';
      buf[o++] = 'x';
      buf[o++] = hex[c >> 4];
      buf[o++] = hex[c & 15];
    }
  }
  buf[o] = '\0';
  return buf;
}

/* Room for an escaped name of up to 96 bytes plus the item prefix. */
#define CTX_SIZE 160
#define ESC_SIZE 100

static void ctx_item(char *ctx, const char *item, uint64_t i,
                     const struct tn_str *name) {
  if (!name) {
    snprintf(ctx, CTX_SIZE, "gguf: %s %llu", item, (unsigned long long)i);
    return;
  }
  char esc[ESC_SIZE];
  snprintf(ctx, CTX_SIZE, "gguf: %s %llu ('%s')", item, (unsigned long long)i,
           tn_gguf_escape(name->data, name->len, esc, sizeof esc));
}

/* ---- shape checks (shared with the writer) */

enum tn_status tn_gguf_tensor_check(const char *ctx, uint32_t n_dims,
                                    const int64_t *ne, uint64_t type,
                                    size_t *size, struct tn_error *err) {
  if (n_dims == 0 || n_dims > TN_GGUF_MAX_DIMS)
    return tn_error_set(err, TN_EFORMAT, "%s: n_dims %u %s", ctx, n_dims,
                        n_dims == 0 ? "< 1" : "> 4");
  for (uint32_t j = 0; j < n_dims; j++)
    if (ne[j] <= 0)
      return tn_error_set(err, TN_EFORMAT, "%s: ne[%u] %lld <= 0", ctx, j,
                          (long long)ne[j]);
  int64_t blck;
  size_t tsize;
  const char *tname;
  if (!tn_gguf_ggml_type(type, &blck, &tsize, &tname))
    return tn_error_set(err, TN_EFORMAT, "%s: invalid tensor type %llu", ctx,
                        (unsigned long long)type);
  if (ne[0] % blck != 0)
    return tn_error_set(err, TN_EFORMAT,
                        "%s: ne[0] %lld is not a multiple of the block size "
                        "%lld of type %s",
                        ctx, (long long)ne[0], (long long)blck, tname);
  int64_t n_el = 1;
  bool over = false;
  for (uint32_t j = 0; j < n_dims; j++)
    over |= __builtin_mul_overflow(n_el, ne[j], &n_el);
#define SHAPE_FMT "ne %lld x %lld x %lld x %lld, type %s"
#define SHAPE_ARGS                                                   \
  (long long)ne[0], (long long)(n_dims > 1 ? ne[1] : 1),             \
      (long long)(n_dims > 2 ? ne[2] : 1),                           \
      (long long)(n_dims > 3 ? ne[3] : 1), tname
  if (over)
    return tn_error_set(err, TN_EFORMAT,
                        "%s: element count overflows (" SHAPE_FMT ")", ctx,
                        SHAPE_ARGS);
  /* bytes = ne[0]/blck * tsize * ne[1] * ne[2] * ne[3] */
  size_t bytes = 0;
  over |= tn_mul_overflow((size_t)(ne[0] / blck), tsize, &bytes);
  for (uint32_t j = 1; j < n_dims; j++)
    over |= tn_mul_overflow(bytes, (size_t)ne[j], &bytes);
  if (over || bytes > (size_t)INT64_MAX)
    return tn_error_set(err, TN_EFORMAT,
                        "%s: byte size overflows (" SHAPE_FMT ")", ctx,
                        SHAPE_ARGS);
#undef SHAPE_FMT
#undef SHAPE_ARGS
  *size = bytes;
  return TN_OK;
}

/* ---- the cursor */

struct rd {
  const uint8_t *p;
  size_t size;
  size_t pos;
  struct tn_error *err;
};

static size_t rd_left(const struct rd *r) { return r->size - r->pos; }

static enum tn_status rd_trunc(struct rd *r, const char *ctx, const char *what,
                               size_t need) {
  return tn_error_set(r->err, TN_EFORMAT,
                      "%s: truncated reading %s (%zu bytes at offset %zu, "
                      "%zu left)",
                      ctx, what, need, r->pos, rd_left(r));
}

static enum tn_status rd_uint(struct rd *r, size_t n, uint64_t *v,
                              const char *ctx, const char *what) {
  *v = 0; /* callers need not track which branch set it */
  if (rd_left(r) < n) return rd_trunc(r, ctx, what, n);
  *v = tn_gguf_load_le(r->p + r->pos, n);
  r->pos += n;
  return TN_OK;
}

static enum tn_status rd_u32(struct rd *r, uint32_t *v, const char *ctx,
                             const char *what) {
  uint64_t x = 0;
  enum tn_status st = rd_uint(r, 4, &x, ctx, what);
  *v = (uint32_t)x;
  return st;
}

/* A string value: any length the file holds. */
static enum tn_status rd_str(struct rd *r, struct tn_str *out, const char *ctx,
                             const char *what) {
  uint64_t len;
  enum tn_status st = rd_uint(r, 8, &len, ctx, what);
  if (st) return st;
  if (len > rd_left(r))
    return tn_error_set(r->err, TN_EFORMAT,
                        "%s: %s length %llu exceeds the %zu bytes left", ctx,
                        what, (unsigned long long)len, rd_left(r));
  out->data = (const char *)r->p + r->pos;
  out->len = (size_t)len;
  r->pos += (size_t)len;
  return TN_OK;
}

/* A key or tensor name: 1..TN_GGUF_MAX_NAME bytes. */
static enum tn_status rd_name(struct rd *r, struct tn_str *out, const char *ctx,
                              const char *what) {
  uint64_t len;
  enum tn_status st = rd_uint(r, 8, &len, ctx, what);
  if (st) return st;
  if (len == 0)
    return tn_error_set(r->err, TN_EFORMAT, "%s: %s length 0", ctx, what);
  if (len > TN_GGUF_MAX_NAME)
    return tn_error_set(r->err, TN_EFORMAT, "%s: %s length %llu > %d", ctx,
                        what, (unsigned long long)len, TN_GGUF_MAX_NAME);
  if (len > rd_left(r)) return rd_trunc(r, ctx, what, (size_t)len);
  out->data = (const char *)r->p + r->pos;
  out->len = (size_t)len;
  r->pos += (size_t)len;
  return TN_OK;
}

/* ---- key/values */

static void scalar_set(struct tn_gguf_kv *kv, enum tn_gguf_type t,
                       uint64_t bits) {
  switch (t) {
  case TN_GGUF_TYPE_INT8: kv->val.i64 = (int8_t)(uint8_t)bits; break;
  case TN_GGUF_TYPE_INT16: kv->val.i64 = (int16_t)(uint16_t)bits; break;
  case TN_GGUF_TYPE_INT32: kv->val.i64 = (int32_t)(uint32_t)bits; break;
  case TN_GGUF_TYPE_INT64: kv->val.i64 = (int64_t)bits; break;
  case TN_GGUF_TYPE_FLOAT32: {
    uint32_t b32 = (uint32_t)bits;
    float f;
    memcpy(&f, &b32, 4);
    kv->val.f64 = f;
    break;
  }
  case TN_GGUF_TYPE_FLOAT64: memcpy(&kv->val.f64, &bits, 8); break;
  default: kv->val.u64 = bits; break; /* unsigned, BOOL */
  }
}

static enum tn_status rd_array(struct rd *r, struct tn_gguf_kv *kv,
                               const char *ctx) {
  uint32_t et;
  uint64_t n;
  enum tn_status st = rd_u32(r, &et, ctx, "array element type");
  if (st) return st;
  if (et == TN_GGUF_TYPE_ARRAY)
    return tn_error_set(r->err, TN_EFORMAT,
                        "%s: nested arrays are not supported", ctx);
  if (et >= TN_GGUF_TYPE_COUNT)
    return tn_error_set(r->err, TN_EFORMAT,
                        "%s: invalid array element type %u", ctx, et);
  if ((st = rd_uint(r, 8, &n, ctx, "array count"))) return st;
  kv->arr_type = (enum tn_gguf_type)et;
  kv->arr_data = r->p + r->pos;
  if (et == TN_GGUF_TYPE_STRING) {
    /* each string needs at least its 8-byte length */
    if (n > rd_left(r) / 8)
      return tn_error_set(r->err, TN_EFORMAT,
                          "%s: array count %llu of STRING exceeds the %zu "
                          "bytes left",
                          ctx, (unsigned long long)n, rd_left(r));
    if (n) {
      kv->arr_strs = calloc((size_t)n, sizeof *kv->arr_strs);
      if (!kv->arr_strs)
        return tn_error_set(r->err, TN_ENOMEM,
                            "%s: out of memory for %llu strings", ctx,
                            (unsigned long long)n);
    }
    kv->arr_n = n; /* arr_strs holds n zeroed views until filled */
    for (uint64_t i = 0; i < n; i++) {
      if ((st = rd_str(r, &kv->arr_strs[i], ctx, "array string"))) {
        size_t m = strlen(r->err ? r->err->msg : "");
        if (r->err && m + 40 < sizeof r->err->msg)
          snprintf(r->err->msg + m, sizeof r->err->msg - m,
                   " (element %llu)", (unsigned long long)i);
        return st;
      }
    }
    return TN_OK;
  }
  size_t esize = value_sizes[et], bytes;
  if (tn_mul_overflow((size_t)n, esize, &bytes) || bytes > rd_left(r))
    return tn_error_set(r->err, TN_EFORMAT,
                        "%s: array count %llu of %s exceeds the %zu bytes "
                        "left",
                        ctx, (unsigned long long)n, value_type_names[et],
                        rd_left(r));
  if (et == TN_GGUF_TYPE_BOOL) {
    for (uint64_t i = 0; i < n; i++) {
      uint8_t b = r->p[r->pos + i];
      if (b > 1)
        return tn_error_set(r->err, TN_EFORMAT,
                            "%s: bool element %llu is %u, not 0 or 1", ctx,
                            (unsigned long long)i, b);
    }
  }
  kv->arr_n = n;
  r->pos += bytes;
  return TN_OK;
}

static enum tn_status rd_value(struct rd *r, struct tn_gguf_kv *kv,
                               const char *ctx) {
  switch (kv->type) {
  case TN_GGUF_TYPE_STRING:
    return rd_str(r, &kv->val.str, ctx, "string");
  case TN_GGUF_TYPE_ARRAY:
    return rd_array(r, kv, ctx);
  default: {
    uint64_t bits;
    enum tn_status st = rd_uint(r, value_sizes[kv->type], &bits, ctx,
                                value_type_names[kv->type]);
    if (st) return st;
    if (kv->type == TN_GGUF_TYPE_BOOL && bits > 1)
      return tn_error_set(r->err, TN_EFORMAT,
                          "%s: bool value %llu is not 0 or 1", ctx,
                          (unsigned long long)bits);
    scalar_set(kv, kv->type, bits);
    return TN_OK;
  }
  }
}

static enum tn_status check_alignment(struct tn_gguf *g,
                                      const struct tn_gguf_kv *kv,
                                      const char *ctx, struct tn_error *err) {
  if (kv->type != TN_GGUF_TYPE_UINT32)
    return tn_error_set(err, TN_EFORMAT,
                        "%s: type %s, expected UINT32",
                        ctx, tn_gguf_type_name(kv->type));
  uint64_t a = kv->val.u64;
  if (a == 0)
    return tn_error_set(err, TN_EFORMAT, "%s: alignment 0", ctx);
  if (a & (a - 1))
    return tn_error_set(err, TN_EFORMAT,
                        "%s: alignment %llu is not a power of two", ctx,
                        (unsigned long long)a);
  if (a > TN_GGUF_MAX_ALIGNMENT)
    return tn_error_set(err, TN_EFORMAT, "%s: alignment %llu > %u", ctx,
                        (unsigned long long)a, TN_GGUF_MAX_ALIGNMENT);
  g->alignment = (size_t)a;
  return TN_OK;
}

/* ---- sorted indexes */

static int str_cmp(struct tn_str a, struct tn_str b) {
  size_t n = TN_MIN(a.len, b.len);
  int c = n ? memcmp(a.data, b.data, n) : 0;
  if (c) return c;
  return (a.len > b.len) - (a.len < b.len);
}

static int kv_ptr_cmp(const void *a, const void *b) {
  const struct tn_gguf_kv *x = *(const struct tn_gguf_kv *const *)a;
  const struct tn_gguf_kv *y = *(const struct tn_gguf_kv *const *)b;
  int c = str_cmp(x->key, y->key);
  return c ? c : (x > y) - (x < y);
}

static int tensor_ptr_cmp(const void *a, const void *b) {
  const struct tn_gguf_tensor *x = *(const struct tn_gguf_tensor *const *)a;
  const struct tn_gguf_tensor *y = *(const struct tn_gguf_tensor *const *)b;
  int c = str_cmp(x->name, y->name);
  return c ? c : (x > y) - (x < y);
}

static enum tn_status index_kv(struct tn_gguf *g, struct tn_error *err) {
  if (!g->n_kv) return TN_OK;
  g->kv_sorted = malloc((size_t)g->n_kv * sizeof *g->kv_sorted);
  if (!g->kv_sorted)
    return tn_error_set(err, TN_ENOMEM, "gguf: out of memory for %llu keys",
                        (unsigned long long)g->n_kv);
  for (size_t i = 0; i < g->n_kv; i++) g->kv_sorted[i] = &g->kv[i];
  qsort(g->kv_sorted, (size_t)g->n_kv, sizeof *g->kv_sorted, kv_ptr_cmp);
  for (size_t i = 1; i < g->n_kv; i++) {
    const struct tn_gguf_kv *a = g->kv_sorted[i - 1], *b = g->kv_sorted[i];
    if (str_cmp(a->key, b->key) == 0) {
      char esc[ESC_SIZE];
      return tn_error_set(err, TN_EFORMAT,
                          "gguf: duplicate key '%s' (kv %zu and kv %zu)",
                          tn_gguf_escape(a->key.data, a->key.len, esc,
                                         sizeof esc),
                          (size_t)(a - g->kv), (size_t)(b - g->kv));
    }
  }
  return TN_OK;
}

static enum tn_status index_tensors(struct tn_gguf *g, struct tn_error *err) {
  if (!g->n_tensors) return TN_OK;
  g->tensors_sorted = malloc((size_t)g->n_tensors * sizeof *g->tensors_sorted);
  if (!g->tensors_sorted)
    return tn_error_set(err, TN_ENOMEM,
                        "gguf: out of memory for %llu tensor names",
                        (unsigned long long)g->n_tensors);
  for (size_t i = 0; i < g->n_tensors; i++)
    g->tensors_sorted[i] = &g->tensors[i];
  qsort(g->tensors_sorted, (size_t)g->n_tensors, sizeof *g->tensors_sorted,
        tensor_ptr_cmp);
  for (size_t i = 1; i < g->n_tensors; i++) {
    const struct tn_gguf_tensor *a = g->tensors_sorted[i - 1];
    const struct tn_gguf_tensor *b = g->tensors_sorted[i];
    if (str_cmp(a->name, b->name) == 0) {
      char esc[ESC_SIZE];
      return tn_error_set(
          err, TN_EFORMAT,
          "gguf: duplicate tensor name '%s' (tensor %zu and tensor %zu)",
          tn_gguf_escape(a->name.data, a->name.len, esc, sizeof esc),
          (size_t)(a - g->tensors), (size_t)(b - g->tensors));
    }
  }
  return TN_OK;
}

/* ---- the parser */

static enum tn_status parse_header(struct rd *r, struct tn_gguf *g,
                                   uint64_t *n_kv, uint64_t *n_tensors) {
  const char *ctx = "gguf: header";
  uint32_t magic, version;
  enum tn_status st;
  if ((st = rd_u32(r, &magic, ctx, "magic"))) return st;
  if (magic != TN_GGUF_MAGIC) {
    char esc[24];
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: bad magic '%s' (0x%08x), expected 'GGUF'",
                        tn_gguf_escape((const char *)r->p, 4, esc, sizeof esc),
                        magic);
  }
  if ((st = rd_u32(r, &version, ctx, "version"))) return st;
  if (version == 0x02000000u || version == 0x03000000u)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: version 0x%08x: big-endian files are not "
                        "supported",
                        version);
  if (version < 2 || version > 3)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: unsupported version %u (expected 2 or 3)",
                        version);
  g->version = version;
  if ((st = rd_uint(r, 8, n_tensors, ctx, "n_tensors"))) return st;
  if ((st = rd_uint(r, 8, n_kv, ctx, "n_kv"))) return st;
  size_t left = rd_left(r);
  if (*n_kv > left / MIN_KV_SIZE)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: n_kv %llu is too large for the %zu bytes left",
                        (unsigned long long)*n_kv, left);
  if (*n_tensors > left / MIN_TENSOR_INFO_SIZE)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: n_tensors %llu is too large for the %zu bytes "
                        "left",
                        (unsigned long long)*n_tensors, left);
  /* both are now small enough that this cannot wrap */
  if (*n_kv * MIN_KV_SIZE + *n_tensors * MIN_TENSOR_INFO_SIZE > left)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: n_kv %llu and n_tensors %llu are too large for "
                        "the %zu bytes left",
                        (unsigned long long)*n_kv,
                        (unsigned long long)*n_tensors, left);
  return TN_OK;
}

static enum tn_status parse_kv(struct rd *r, struct tn_gguf *g,
                               uint64_t n_kv) {
  if (n_kv) {
    g->kv = calloc((size_t)n_kv, sizeof *g->kv);
    if (!g->kv)
      return tn_error_set(r->err, TN_ENOMEM,
                          "gguf: out of memory for %llu key/values",
                          (unsigned long long)n_kv);
  }
  g->n_kv = n_kv;
  for (uint64_t i = 0; i < n_kv; i++) {
    struct tn_gguf_kv *kv = &g->kv[i];
    char ctx[CTX_SIZE];
    uint32_t type;
    enum tn_status st;
    ctx_item(ctx, "kv", i, NULL);
    if ((st = rd_name(r, &kv->key, ctx, "key"))) return st;
    ctx_item(ctx, "kv", i, &kv->key);
    if ((st = rd_u32(r, &type, ctx, "value type"))) return st;
    if (type >= TN_GGUF_TYPE_COUNT)
      return tn_error_set(r->err, TN_EFORMAT, "%s: invalid value type %u",
                          ctx, type);
    kv->type = (enum tn_gguf_type)type;
    if ((st = rd_value(r, kv, ctx))) return st;
    if (tn_str_eq(kv->key, "general.alignment") &&
        (st = check_alignment(g, kv, ctx, r->err)))
      return st;
  }
  return index_kv(g, r->err);
}

static enum tn_status parse_tensors(struct rd *r, struct tn_gguf *g,
                                    uint64_t n_tensors) {
  size_t left = rd_left(r);
  if (n_tensors > left / MIN_TENSOR_INFO_SIZE)
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: n_tensors %llu is too large for the %zu bytes "
                        "left after the key/values",
                        (unsigned long long)n_tensors, left);
  if (n_tensors) {
    g->tensors = calloc((size_t)n_tensors, sizeof *g->tensors);
    if (!g->tensors)
      return tn_error_set(r->err, TN_ENOMEM,
                          "gguf: out of memory for %llu tensors",
                          (unsigned long long)n_tensors);
  }
  g->n_tensors = n_tensors;
  char ctx[CTX_SIZE];
  for (uint64_t i = 0; i < n_tensors; i++) {
    struct tn_gguf_tensor *t = &g->tensors[i];
    uint32_t n_dims, type;
    uint64_t v;
    enum tn_status st;
    ctx_item(ctx, "tensor", i, NULL);
    if ((st = rd_name(r, &t->name, ctx, "name"))) return st;
    ctx_item(ctx, "tensor", i, &t->name);
    if ((st = rd_u32(r, &n_dims, ctx, "n_dims"))) return st;
    if (n_dims == 0 || n_dims > TN_GGUF_MAX_DIMS)
      return tn_error_set(r->err, TN_EFORMAT, "%s: n_dims %u %s", ctx, n_dims,
                          n_dims == 0 ? "< 1" : "> 4");
    for (uint32_t j = 0; j < TN_GGUF_MAX_DIMS; j++) t->ne[j] = 1;
    for (uint32_t j = 0; j < n_dims; j++) {
      if ((st = rd_uint(r, 8, &v, ctx, "ne"))) return st;
      t->ne[j] = (int64_t)v;
    }
    if ((st = rd_u32(r, &type, ctx, "type"))) return st;
    if ((st = tn_gguf_tensor_check(ctx, n_dims, t->ne, type, &t->size,
                                   r->err)))
      return st;
    if ((st = rd_uint(r, 8, &t->offset, ctx, "offset"))) return st;
    if (t->offset % g->alignment)
      return tn_error_set(r->err, TN_EFORMAT,
                          "%s: offset %llu is not aligned to %zu", ctx,
                          (unsigned long long)t->offset, g->alignment);
    t->n_dims = n_dims;
    t->type = (enum tn_type)type;
  }

  /* the data section starts at the next multiple of the alignment */
  size_t data_offset;
  if (tn_add_overflow(r->pos, g->alignment - 1, &data_offset))
    return tn_error_set(r->err, TN_EFORMAT,
                        "gguf: data offset overflows (offset %zu)", r->pos);
  data_offset -= data_offset % g->alignment;
  if (data_offset > g->size) {
    if (n_tensors)
      return tn_error_set(r->err, TN_EFORMAT,
                          "gguf: truncated: data section at offset %zu is "
                          "past the end of the file (%zu bytes)",
                          data_offset, g->size);
    data_offset = g->size;
  }
  g->data_offset = data_offset;
  size_t data_size = g->size - data_offset;
  for (uint64_t i = 0; i < n_tensors; i++) {
    struct tn_gguf_tensor *t = &g->tensors[i];
    if (t->offset > data_size || t->size > data_size - t->offset) {
      ctx_item(ctx, "tensor", i, &t->name);
      return tn_error_set(r->err, TN_EFORMAT,
                          "%s: data at offset %llu size %zu is past the end "
                          "of the data section (%zu bytes)",
                          ctx, (unsigned long long)t->offset, t->size,
                          data_size);
    }
    t->data = g->base + data_offset + t->offset;
  }
  return index_tensors(g, r->err);
}

static enum tn_status parse(struct tn_gguf *g, struct tn_error *err) {
  struct rd r = {g->base, g->size, 0, err};
  uint64_t n_kv = 0, n_tensors = 0;
  enum tn_status st;
  g->alignment = TN_GGUF_DEFAULT_ALIGNMENT;
  if ((st = parse_header(&r, g, &n_kv, &n_tensors))) return st;
  if ((st = parse_kv(&r, g, n_kv))) return st;
  return parse_tensors(&r, g, n_tensors);
}

/* ---- open / close */

enum tn_status tn_gguf_open_mem(const void *buf, size_t size,
                                struct tn_gguf **out, struct tn_error *err) {
  *out = NULL;
  if (!buf && size)
    return tn_error_set(err, TN_EINVAL, "gguf: NULL buffer of %zu bytes",
                        size);
  struct tn_gguf *g = calloc(1, sizeof *g);
  if (!g) return tn_error_set(err, TN_ENOMEM, "gguf: out of memory");
  g->base = buf ? buf : (const uint8_t *)"";
  g->size = size;
  enum tn_status st = parse(g, err);
  if (st) {
    tn_gguf_close(g);
    return st;
  }
  *out = g;
  return TN_OK;
}

enum tn_status tn_gguf_open(const char *path, struct tn_gguf **out,
                            struct tn_error *err) {
  *out = NULL;
  /* O_NONBLOCK: opening a FIFO must not wait for a writer */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return tn_error_set(err, errno == ENOENT ? TN_ENOENT : TN_EIO,
                        "gguf: cannot open file: %s", strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return tn_error_set(err, TN_EIO, "gguf: cannot stat file: %s",
                        strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return tn_error_set(err, TN_EINVAL, "gguf: not a regular file");
  }
  if (st.st_size == 0) { /* mmap cannot map it: parse no bytes instead */
    close(fd);
    return tn_gguf_open_mem(NULL, 0, out, err);
  }
  if ((uint64_t)st.st_size > SIZE_MAX) {
    close(fd);
    return tn_error_set(err, TN_EFORMAT, "gguf: file too large");
  }
  size_t size = (size_t)st.st_size;
  void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (m == MAP_FAILED)
    return tn_error_set(err, TN_EIO, "gguf: cannot map file: %s",
                        strerror(e));
  struct tn_gguf *g = calloc(1, sizeof *g);
  if (!g) {
    munmap(m, size);
    return tn_error_set(err, TN_ENOMEM, "gguf: out of memory");
  }
  g->base = m;
  g->size = size;
  g->mapped = true;
  enum tn_status s = parse(g, err);
  if (s) {
    tn_gguf_close(g);
    return s;
  }
  *out = g;
  return TN_OK;
}

void tn_gguf_close(struct tn_gguf *g) {
  if (!g) return;
  if (g->kv)
    for (size_t i = 0; i < g->n_kv; i++) free(g->kv[i].arr_strs);
  free(g->kv);
  free(g->tensors);
  free(g->kv_sorted);
  free(g->tensors_sorted);
  if (g->mapped) munmap((void *)g->base, g->size);
  free(g->owned);
  free(g);
}

/* ---- lookups */

static int str_cmp_c(struct tn_str a, const char *b, size_t b_len) {
  struct tn_str s = {b, b_len};
  return str_cmp(a, s);
}

const struct tn_gguf_kv *tn_gguf_find_kv(const struct tn_gguf *g,
                                         const char *key) {
  if (!g || !key || !g->kv_sorted) return NULL;
  size_t n = strlen(key), lo = 0, hi = (size_t)g->n_kv;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = str_cmp_c(g->kv_sorted[mid]->key, key, n);
    if (c == 0) return g->kv_sorted[mid];
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}

const struct tn_gguf_tensor *tn_gguf_find_tensor(const struct tn_gguf *g,
                                                 const char *name) {
  if (!g || !name || !g->tensors_sorted) return NULL;
  size_t n = strlen(name), lo = 0, hi = (size_t)g->n_tensors;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = str_cmp_c(g->tensors_sorted[mid]->name, name, n);
    if (c == 0) return g->tensors_sorted[mid];
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}

/* ---- typed getters */

static enum tn_status wrong_type(const struct tn_gguf_kv *kv,
                                 const char *want, struct tn_error *err) {
  char esc[ESC_SIZE];
  return tn_error_set(err, TN_EFORMAT, "gguf: key '%s' has type %s, expected %s",
                      tn_gguf_escape(kv->key.data, kv->key.len, esc, sizeof esc),
                      tn_gguf_type_name(kv->type), want);
}

static enum tn_status get_int(const struct tn_gguf *g, const char *key,
                              int64_t lo, uint64_t hi, const char *want,
                              const struct tn_gguf_kv **out_kv,
                              struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  *out_kv = kv;
  if (!kv) return TN_ENOENT;
  if (!type_is_int(kv->type)) return wrong_type(kv, "an integer", err);
  bool fits = type_is_signed(kv->type)
                  ? kv->val.i64 >= lo &&
                        (kv->val.i64 < 0 || (uint64_t)kv->val.i64 <= hi)
                  : kv->val.u64 <= hi;
  if (!fits) {
    char esc[ESC_SIZE];
    tn_gguf_escape(kv->key.data, kv->key.len, esc, sizeof esc);
    if (type_is_signed(kv->type))
      return tn_error_set(err, TN_EFORMAT,
                          "gguf: key '%s': value %lld does not fit %s", esc,
                          (long long)kv->val.i64, want);
    return tn_error_set(err, TN_EFORMAT,
                        "gguf: key '%s': value %llu does not fit %s", esc,
                        (unsigned long long)kv->val.u64, want);
  }
  return TN_OK;
}

enum tn_status tn_gguf_get_u32(const struct tn_gguf *g, const char *key,
                               uint32_t *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv;
  enum tn_status st = get_int(g, key, 0, UINT32_MAX, "u32", &kv, err);
  if (st) return st;
  *out = (uint32_t)kv->val.u64; /* same bits for signed >= 0 */
  return TN_OK;
}

enum tn_status tn_gguf_get_i64(const struct tn_gguf *g, const char *key,
                               int64_t *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv;
  enum tn_status st = get_int(g, key, INT64_MIN, INT64_MAX, "i64", &kv, err);
  if (st) return st;
  *out = kv->val.i64;
  return TN_OK;
}

enum tn_status tn_gguf_get_f32(const struct tn_gguf *g, const char *key,
                               float *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  if (!kv) return TN_ENOENT;
  if (kv->type == TN_GGUF_TYPE_FLOAT32 || kv->type == TN_GGUF_TYPE_FLOAT64)
    *out = (float)kv->val.f64;
  else if (type_is_int(kv->type))
    *out = type_is_signed(kv->type) ? (float)kv->val.i64 : (float)kv->val.u64;
  else
    return wrong_type(kv, "a number", err);
  return TN_OK;
}

enum tn_status tn_gguf_get_bool(const struct tn_gguf *g, const char *key,
                                bool *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  if (!kv) return TN_ENOENT;
  if (kv->type != TN_GGUF_TYPE_BOOL) return wrong_type(kv, "BOOL", err);
  *out = kv->val.u64 != 0;
  return TN_OK;
}

enum tn_status tn_gguf_get_str(const struct tn_gguf *g, const char *key,
                               struct tn_str *out, struct tn_error *err) {
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, key);
  if (!kv) return TN_ENOENT;
  if (kv->type != TN_GGUF_TYPE_STRING) return wrong_type(kv, "STRING", err);
  *out = kv->val.str;
  return TN_OK;
}

/* ---- array elements */

static bool arr_elem(const struct tn_gguf_kv *kv, uint64_t i, uint64_t *bits) {
  if (!kv || kv->type != TN_GGUF_TYPE_ARRAY || i >= kv->arr_n) return false;
  size_t es = tn_gguf_value_size(kv->arr_type);
  if (!es) return false;
  *bits = tn_gguf_load_le((const uint8_t *)kv->arr_data + i * es, es);
  return true;
}

static double bits_to_f64(enum tn_gguf_type t, uint64_t bits) {
  struct tn_gguf_kv tmp = {0};
  scalar_set(&tmp, t, bits);
  if (t == TN_GGUF_TYPE_FLOAT32 || t == TN_GGUF_TYPE_FLOAT64) return tmp.val.f64;
  if (type_is_signed(t)) return (double)tmp.val.i64;
  return (double)tmp.val.u64;
}

int64_t tn_gguf_arr_i64(const struct tn_gguf_kv *kv, uint64_t i) {
  uint64_t bits;
  if (!arr_elem(kv, i, &bits)) return 0;
  enum tn_gguf_type t = kv->arr_type;
  if (t == TN_GGUF_TYPE_FLOAT32 || t == TN_GGUF_TYPE_FLOAT64) {
    double d = bits_to_f64(t, bits);
    if (isnan(d)) return 0;
    if (d >= 9223372036854775807.0) return INT64_MAX;
    if (d <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)d;
  }
  struct tn_gguf_kv tmp = {0};
  scalar_set(&tmp, t, bits);
  return tmp.val.i64; /* UINT64 above INT64_MAX wraps, as documented */
}

double tn_gguf_arr_f64(const struct tn_gguf_kv *kv, uint64_t i) {
  uint64_t bits;
  if (!arr_elem(kv, i, &bits)) return 0.0;
  return bits_to_f64(kv->arr_type, bits);
}
