/*
 * gguf_writer.c: builds GGUF v3 files.
 *
 * Key/values are serialized when they are added: each holds its key and
 * one blob with the value type and the value as it goes into the file, so
 * writing is a copy. Tensors keep borrowed data pointers; their offsets are
 * laid out at write time, each at a multiple of the alignment, and every
 * tensor's data is padded with zeros to the alignment (the last one too).
 *
 * The general.alignment key/value and w->alignment are kept in step: adding
 * the key (add_u32, copy_kv) sets the alignment, set_alignment adds or
 * updates the key. Both are validated when the file is written, with the
 * reader's rules, so what we write we can read back.
 */
#include "gguf/gguf_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct wkv {
  char *key;
  size_t key_len;
  uint8_t *val; /* u32 type, then the value */
  size_t val_size;
};

struct wtensor {
  char *name;
  size_t name_len;
  uint32_t n_dims;
  int64_t ne[TN_GGUF_MAX_DIMS];
  enum tn_type type;
  const void *data; /* borrowed */
  size_t size;
  uint64_t offset; /* set by layout() */
};

struct tn_gguf_writer {
  struct wkv *kv;
  size_t n_kv, cap_kv;
  struct wtensor *tensors;
  size_t n_tensors, cap_tensors;
  size_t alignment;
};

static const char ALIGN_KEY[] = "general.alignment";

struct tn_gguf_writer *tn_gguf_writer_new(void) {
  struct tn_gguf_writer *w = calloc(1, sizeof *w);
  if (w) w->alignment = TN_GGUF_DEFAULT_ALIGNMENT;
  return w;
}

void tn_gguf_writer_free(struct tn_gguf_writer *w) {
  if (!w) return;
  for (size_t i = 0; i < w->n_kv; i++) {
    free(w->kv[i].key);
    free(w->kv[i].val);
  }
  for (size_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
  free(w->kv);
  free(w->tensors);
  free(w);
}

/* ---- key/values */

static struct wkv *find_kv(struct tn_gguf_writer *w, const char *key,
                           size_t len) {
  for (size_t i = 0; i < w->n_kv; i++)
    if (w->kv[i].key_len == len && memcmp(w->kv[i].key, key, len) == 0)
      return &w->kv[i];
  return NULL;
}

/* Takes ownership of val (a malloc'd blob starting with the u32 type). */
static enum tn_status add_blob(struct tn_gguf_writer *w, const char *key,
                               size_t key_len, uint8_t *val, size_t val_size) {
  enum tn_status st = TN_EINVAL;
  if (!w || !key || !val || key_len == 0 || key_len > TN_GGUF_MAX_NAME ||
      find_kv(w, key, key_len))
    goto fail;
  uint32_t type = (uint32_t)tn_gguf_load_le(val, 4);
  bool is_align = key_len == sizeof ALIGN_KEY - 1 &&
                  memcmp(key, ALIGN_KEY, key_len) == 0;
  if (is_align && type != TN_GGUF_TYPE_UINT32) goto fail;
  st = TN_ENOMEM;
  if (w->n_kv == w->cap_kv) {
    size_t cap = w->cap_kv ? 2 * w->cap_kv : 16;
    struct wkv *kv = realloc(w->kv, cap * sizeof *kv);
    if (!kv) goto fail;
    w->kv = kv;
    w->cap_kv = cap;
  }
  char *k = malloc(key_len + 1);
  if (!k) goto fail;
  memcpy(k, key, key_len);
  k[key_len] = '\0';
  w->kv[w->n_kv++] = (struct wkv){k, key_len, val, val_size};
  if (is_align) w->alignment = (size_t)tn_gguf_load_le(val + 4, 4);
  return TN_OK;
fail:
  free(val);
  return st;
}

static enum tn_status add_scalar(struct tn_gguf_writer *w, const char *key,
                                 enum tn_gguf_type type, uint64_t bits) {
  size_t n = tn_gguf_value_size(type);
  uint8_t *val = malloc(4 + n);
  if (!val) return TN_ENOMEM;
  tn_gguf_store_le(val, type, 4);
  tn_gguf_store_le(val + 4, bits, n);
  return add_blob(w, key, key ? strlen(key) : 0, val, 4 + n);
}

enum tn_status tn_gguf_writer_add_u8(struct tn_gguf_writer *w, const char *key,
                                     uint8_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_UINT8, v);
}
enum tn_status tn_gguf_writer_add_i8(struct tn_gguf_writer *w, const char *key,
                                     int8_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_INT8, (uint8_t)v);
}
enum tn_status tn_gguf_writer_add_u16(struct tn_gguf_writer *w,
                                      const char *key, uint16_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_UINT16, v);
}
enum tn_status tn_gguf_writer_add_i16(struct tn_gguf_writer *w,
                                      const char *key, int16_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_INT16, (uint16_t)v);
}
enum tn_status tn_gguf_writer_add_u32(struct tn_gguf_writer *w,
                                      const char *key, uint32_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_UINT32, v);
}
enum tn_status tn_gguf_writer_add_i32(struct tn_gguf_writer *w,
                                      const char *key, int32_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_INT32, (uint32_t)v);
}
enum tn_status tn_gguf_writer_add_u64(struct tn_gguf_writer *w,
                                      const char *key, uint64_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_UINT64, v);
}
enum tn_status tn_gguf_writer_add_i64(struct tn_gguf_writer *w,
                                      const char *key, int64_t v) {
  return add_scalar(w, key, TN_GGUF_TYPE_INT64, (uint64_t)v);
}
enum tn_status tn_gguf_writer_add_f32(struct tn_gguf_writer *w,
                                      const char *key, float v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return add_scalar(w, key, TN_GGUF_TYPE_FLOAT32, bits);
}
enum tn_status tn_gguf_writer_add_f64(struct tn_gguf_writer *w,
                                      const char *key, double v) {
  uint64_t bits;
  memcpy(&bits, &v, 8);
  return add_scalar(w, key, TN_GGUF_TYPE_FLOAT64, bits);
}
enum tn_status tn_gguf_writer_add_bool(struct tn_gguf_writer *w,
                                       const char *key, bool v) {
  return add_scalar(w, key, TN_GGUF_TYPE_BOOL, v ? 1 : 0);
}

enum tn_status tn_gguf_writer_add_str(struct tn_gguf_writer *w,
                                      const char *key, const char *data,
                                      size_t len) {
  size_t size;
  if (!data && len) return TN_EINVAL;
  if (tn_add_overflow(len, 12, &size)) return TN_EINVAL;
  uint8_t *val = malloc(size);
  if (!val) return TN_ENOMEM;
  tn_gguf_store_le(val, TN_GGUF_TYPE_STRING, 4);
  tn_gguf_store_le(val + 4, len, 8);
  if (len) memcpy(val + 12, data, len);
  return add_blob(w, key, key ? strlen(key) : 0, val, size);
}

/* Raw little-endian elements of a fixed-size type (host order = LE). */
static enum tn_status add_arr_raw(struct tn_gguf_writer *w, const char *key,
                                  size_t key_len, enum tn_gguf_type type,
                                  const void *data, uint64_t n) {
  size_t es = tn_gguf_value_size(type), bytes, size;
  if (!es || (!data && n)) return TN_EINVAL;
  if (tn_mul_overflow((size_t)n, es, &bytes) ||
      tn_add_overflow(bytes, 16, &size))
    return TN_EINVAL;
  if (type == TN_GGUF_TYPE_BOOL) /* the reader accepts only 0 and 1 */
    for (size_t i = 0; i < bytes; i++)
      if (((const uint8_t *)data)[i] > 1) return TN_EINVAL;
  uint8_t *val = malloc(size);
  if (!val) return TN_ENOMEM;
  tn_gguf_store_le(val, TN_GGUF_TYPE_ARRAY, 4);
  tn_gguf_store_le(val + 4, type, 4);
  tn_gguf_store_le(val + 8, n, 8);
  if (bytes) memcpy(val + 16, data, bytes);
  return add_blob(w, key, key_len, val, size);
}

enum tn_status tn_gguf_writer_add_arr(struct tn_gguf_writer *w,
                                      const char *key, enum tn_gguf_type type,
                                      const void *data, uint64_t n) {
  return add_arr_raw(w, key, key ? strlen(key) : 0, type, data, n);
}

static enum tn_status add_arr_str_n(struct tn_gguf_writer *w, const char *key,
                                    size_t key_len, const struct tn_str *strs,
                                    uint64_t n) {
  size_t size = 16;
  if (!strs && n) return TN_EINVAL;
  for (uint64_t i = 0; i < n; i++) {
    if (!strs[i].data && strs[i].len) return TN_EINVAL;
    if (tn_add_overflow(size, 8, &size) ||
        tn_add_overflow(size, strs[i].len, &size))
      return TN_EINVAL;
  }
  uint8_t *val = malloc(size);
  if (!val) return TN_ENOMEM;
  tn_gguf_store_le(val, TN_GGUF_TYPE_ARRAY, 4);
  tn_gguf_store_le(val + 4, TN_GGUF_TYPE_STRING, 4);
  tn_gguf_store_le(val + 8, n, 8);
  size_t o = 16;
  for (uint64_t i = 0; i < n; i++) {
    tn_gguf_store_le(val + o, strs[i].len, 8);
    o += 8;
    if (strs[i].len) memcpy(val + o, strs[i].data, strs[i].len);
    o += strs[i].len;
  }
  return add_blob(w, key, key_len, val, size);
}

enum tn_status tn_gguf_writer_add_arr_str(struct tn_gguf_writer *w,
                                          const char *key,
                                          const struct tn_str *strs,
                                          uint64_t n) {
  return add_arr_str_n(w, key, key ? strlen(key) : 0, strs, n);
}

static uint64_t scalar_bits(const struct tn_gguf_kv *kv) {
  if (kv->type == TN_GGUF_TYPE_FLOAT32) {
    float f = (float)kv->val.f64;
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
  }
  if (kv->type == TN_GGUF_TYPE_FLOAT64) {
    uint64_t b;
    memcpy(&b, &kv->val.f64, 8);
    return b;
  }
  return kv->val.u64; /* truncated to the type's size by the store */
}

enum tn_status tn_gguf_writer_copy_kv(struct tn_gguf_writer *w,
                                      const struct tn_gguf *g) {
  if (!w || !g) return TN_EINVAL;
  for (size_t i = 0; i < g->n_kv; i++) {
    const struct tn_gguf_kv *kv = &g->kv[i];
    enum tn_status st;
    uint8_t *val;
    size_t n;
    switch (kv->type) {
    case TN_GGUF_TYPE_STRING:
      if (tn_add_overflow(kv->val.str.len, 12, &n)) return TN_EINVAL;
      if (!(val = malloc(n))) return TN_ENOMEM;
      tn_gguf_store_le(val, TN_GGUF_TYPE_STRING, 4);
      tn_gguf_store_le(val + 4, kv->val.str.len, 8);
      if (kv->val.str.len) memcpy(val + 12, kv->val.str.data, kv->val.str.len);
      st = add_blob(w, kv->key.data, kv->key.len, val, n);
      break;
    case TN_GGUF_TYPE_ARRAY:
      if (kv->arr_type == TN_GGUF_TYPE_STRING)
        st = add_arr_str_n(w, kv->key.data, kv->key.len, kv->arr_strs,
                           kv->arr_n);
      else
        st = add_arr_raw(w, kv->key.data, kv->key.len, kv->arr_type,
                         kv->arr_data, kv->arr_n);
      break;
    default:
      n = tn_gguf_value_size(kv->type);
      if (!n) return TN_EINVAL;
      if (!(val = malloc(4 + n))) return TN_ENOMEM;
      tn_gguf_store_le(val, kv->type, 4);
      tn_gguf_store_le(val + 4, scalar_bits(kv), n);
      st = add_blob(w, kv->key.data, kv->key.len, val, 4 + n);
      break;
    }
    if (st) return st;
  }
  return TN_OK;
}

void tn_gguf_writer_set_alignment(struct tn_gguf_writer *w, size_t alignment) {
  if (!w) return;
  struct wkv *kv = find_kv(w, ALIGN_KEY, sizeof ALIGN_KEY - 1);
  uint32_t a32 = alignment > UINT32_MAX ? 0 : (uint32_t)alignment;
  w->alignment = alignment;
  if (kv) {
    tn_gguf_store_le(kv->val + 4, a32, 4); /* the blob is a UINT32 */
    return;
  }
  /* out of memory here shows up as a missing key: write() checks it */
  add_scalar(w, ALIGN_KEY, TN_GGUF_TYPE_UINT32, a32);
  w->alignment = alignment;
}

/* ---- tensors */

enum tn_status tn_gguf_writer_add_tensor(struct tn_gguf_writer *w,
                                         const char *name, enum tn_type type,
                                         uint32_t n_dims, const int64_t *ne,
                                         const void *data,
                                         struct tn_error *err) {
  if (!w || !name || !ne)
    return tn_error_set(err, TN_EINVAL, "gguf writer: NULL argument");
  size_t len = strlen(name);
  char esc[100], ctx[160];
  tn_gguf_escape(name, len, esc, sizeof esc);
  snprintf(ctx, sizeof ctx, "gguf writer: tensor '%s'", esc);
  if (len == 0 || len > TN_GGUF_MAX_NAME)
    return tn_error_set(err, TN_EINVAL, "%s: name length %zu not in 1..%d",
                        ctx, len, TN_GGUF_MAX_NAME);
  for (size_t i = 0; i < w->n_tensors; i++)
    if (w->tensors[i].name_len == len &&
        memcmp(w->tensors[i].name, name, len) == 0)
      return tn_error_set(err, TN_EINVAL, "%s: duplicate tensor name", ctx);
  size_t size;
  enum tn_status st = tn_gguf_tensor_check(ctx, n_dims, ne, (uint64_t)type,
                                           &size, err);
  if (st) { /* a caller's mistake here, not a malformed file */
    if (err) err->status = TN_EINVAL;
    return TN_EINVAL;
  }
  if (!data)
    return tn_error_set(err, TN_EINVAL, "%s: NULL data", ctx);
  if (w->n_tensors == w->cap_tensors) {
    size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 16;
    struct wtensor *t = realloc(w->tensors, cap * sizeof *t);
    if (!t) return tn_error_set(err, TN_ENOMEM, "%s: out of memory", ctx);
    w->tensors = t;
    w->cap_tensors = cap;
  }
  char *copy = malloc(len + 1);
  if (!copy) return tn_error_set(err, TN_ENOMEM, "%s: out of memory", ctx);
  memcpy(copy, name, len + 1);
  struct wtensor *t = &w->tensors[w->n_tensors++];
  *t = (struct wtensor){.name = copy, .name_len = len, .n_dims = n_dims,
                        .type = type, .data = data, .size = size};
  for (uint32_t j = 0; j < TN_GGUF_MAX_DIMS; j++)
    t->ne[j] = j < n_dims ? ne[j] : 1;
  return TN_OK;
}

/* ---- output */

static bool align_up(size_t x, size_t a, size_t *out) {
  if (tn_add_overflow(x, a - 1, out)) return false;
  *out -= *out % a;
  return true;
}

/* Validates the alignment, sets tensor offsets, and returns the file size
 * and the data section's offset. */
static enum tn_status layout(struct tn_gguf_writer *w, size_t *total,
                             size_t *data_offset, struct tn_error *err) {
  size_t a = w->alignment;
  if (a == 0 || (a & (a - 1)) || a > TN_GGUF_MAX_ALIGNMENT)
    return tn_error_set(err, TN_EINVAL,
                        "gguf writer: alignment %zu must be a power of two "
                        "in 1..%u",
                        a, TN_GGUF_MAX_ALIGNMENT);
  if (a != TN_GGUF_DEFAULT_ALIGNMENT &&
      !find_kv(w, ALIGN_KEY, sizeof ALIGN_KEY - 1))
    return tn_error_set(err, TN_ENOMEM,
                        "gguf writer: general.alignment key missing");
  size_t h = 24;
  bool over = false;
  for (size_t i = 0; i < w->n_kv; i++) {
    over |= tn_add_overflow(h, 8 + w->kv[i].key_len, &h);
    over |= tn_add_overflow(h, w->kv[i].val_size, &h);
  }
  for (size_t i = 0; i < w->n_tensors; i++)
    over |= tn_add_overflow(h, 8 + w->tensors[i].name_len + 4 +
                                   8 * (size_t)w->tensors[i].n_dims + 4 + 8,
                            &h);
  size_t off = 0;
  for (size_t i = 0; i < w->n_tensors; i++) {
    w->tensors[i].offset = off;
    over |= tn_add_overflow(off, w->tensors[i].size, &off);
    over |= !align_up(off, a, &off);
  }
  over |= !align_up(h, a, data_offset);
  over |= tn_add_overflow(*data_offset, off, total);
  if (over)
    return tn_error_set(err, TN_EINVAL, "gguf writer: file size overflows");
  return TN_OK;
}

/* Either a FILE or a buffer of the exact size. */
struct sink {
  FILE *f;
  uint8_t *buf;
  size_t len;
  bool failed;
};

static void put(struct sink *s, const void *p, size_t n) {
  if (s->failed || n == 0) return;
  if (s->f) {
    if (fwrite(p, 1, n, s->f) != n) s->failed = true;
  } else {
    memcpy(s->buf + s->len, p, n);
  }
  s->len += n;
}

static void put_le(struct sink *s, uint64_t v, size_t n) {
  uint8_t b[8];
  tn_gguf_store_le(b, v, n);
  put(s, b, n);
}

static void put_zeros(struct sink *s, size_t n) {
  static const uint8_t zeros[256];
  while (n) {
    size_t k = TN_MIN(n, sizeof zeros);
    put(s, zeros, k);
    n -= k;
  }
}

static void emit(struct tn_gguf_writer *w, struct sink *s, size_t data_offset) {
  put_le(s, TN_GGUF_MAGIC, 4);
  put_le(s, 3, 4);
  put_le(s, w->n_tensors, 8);
  put_le(s, w->n_kv, 8);
  for (size_t i = 0; i < w->n_kv; i++) {
    put_le(s, w->kv[i].key_len, 8);
    put(s, w->kv[i].key, w->kv[i].key_len);
    put(s, w->kv[i].val, w->kv[i].val_size);
  }
  for (size_t i = 0; i < w->n_tensors; i++) {
    const struct wtensor *t = &w->tensors[i];
    put_le(s, t->name_len, 8);
    put(s, t->name, t->name_len);
    put_le(s, t->n_dims, 4);
    for (uint32_t j = 0; j < t->n_dims; j++) put_le(s, (uint64_t)t->ne[j], 8);
    put_le(s, (uint32_t)t->type, 4);
    put_le(s, t->offset, 8);
  }
  put_zeros(s, data_offset - s->len);
  for (size_t i = 0; i < w->n_tensors; i++) {
    const struct wtensor *t = &w->tensors[i];
    size_t end = data_offset + (size_t)t->offset;
    TN_ASSERT(s->failed || s->len == end);
    put(s, t->data, t->size);
    size_t padded = t->size;
    align_up(padded, w->alignment, &padded);
    put_zeros(s, padded - t->size);
  }
}

enum tn_status tn_gguf_writer_write_mem(struct tn_gguf_writer *w, void **out,
                                        size_t *size, struct tn_error *err) {
  *out = NULL;
  *size = 0;
  if (!w) return tn_error_set(err, TN_EINVAL, "gguf writer: NULL writer");
  size_t total, data_offset;
  enum tn_status st = layout(w, &total, &data_offset, err);
  if (st) return st;
  struct sink s = {.buf = malloc(total)};
  if (!s.buf)
    return tn_error_set(err, TN_ENOMEM,
                        "gguf writer: out of memory for %zu bytes", total);
  emit(w, &s, data_offset);
  TN_ASSERT(s.len == total);
  *out = s.buf;
  *size = total;
  return TN_OK;
}

enum tn_status tn_gguf_writer_write(struct tn_gguf_writer *w, const char *path,
                                    struct tn_error *err) {
  if (!w || !path) return tn_error_set(err, TN_EINVAL, "gguf writer: NULL argument");
  size_t total, data_offset;
  enum tn_status st = layout(w, &total, &data_offset, err);
  if (st) return st;
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5);
  if (!tmp) return tn_error_set(err, TN_ENOMEM, "gguf writer: out of memory");
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", 5);
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    st = tn_error_set(err, TN_EIO, "gguf writer: cannot create '%s': %s", tmp,
                      strerror(errno));
    free(tmp);
    return st;
  }
  struct sink s = {.f = f};
  emit(w, &s, data_offset);
  int e = s.failed ? errno : 0;
  if (fflush(f) != 0 && !e) e = errno ? errno : EIO;
  if (fsync(fileno(f)) != 0 && !e) e = errno ? errno : EIO;
  if (fclose(f) != 0 && !e) e = errno ? errno : EIO;
  if (!e && s.len != total) e = EIO;
  if (!e && rename(tmp, path) != 0) e = errno ? errno : EIO;
  if (e) {
    unlink(tmp);
    st = tn_error_set(err, TN_EIO, "gguf writer: cannot write '%s': %s", path,
                      strerror(e));
  }
  free(tmp);
  return st;
}
