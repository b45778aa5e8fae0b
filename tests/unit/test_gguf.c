/*
 * test_gguf.c: the GGUF reader and writer.
 *
 *   round trip   every kv type, arrays of each, string arrays, tensors of
 *                several types, through memory and through a file; the
 *                copy_kv path rewrites a file byte for byte
 *   real models  facts about the committed GGUF models (skipped if absent)
 *   malformed    one crafted file per way a GGUF can be broken, each
 *                rejected with its own message
 *   chaos        truncation at every offset, random byte flips and
 *                interesting values over small valid files: never a crash
 *                (run under ASan/UBSan too), every success fully readable
 */
#include "gguf/gguf.h"
#include "gguf/gguf_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tn_test.h"

#ifndef TN_SOURCE_DIR
#define TN_SOURCE_DIR "."
#endif

/* ---- a byte builder for crafted files */

struct buf {
  uint8_t *p;
  size_t n, cap;
};

static void b_put(struct buf *b, const void *p, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) abort();
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->n, p, n);
  b->n += n;
}
static void b_le(struct buf *b, uint64_t v, size_t n) {
  uint8_t x[8];
  for (size_t i = 0; i < n; i++) x[i] = (uint8_t)(v >> (8 * i));
  b_put(b, x, n);
}
static void b_u8(struct buf *b, uint8_t v) { b_le(b, v, 1); }
static void b_u32(struct buf *b, uint32_t v) { b_le(b, v, 4); }
static void b_u64(struct buf *b, uint64_t v) { b_le(b, v, 8); }
static void b_f32(struct buf *b, float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  b_u32(b, u);
}
static void b_strn(struct buf *b, const char *s, size_t n) {
  b_u64(b, n);
  b_put(b, s, n);
}
static void b_str(struct buf *b, const char *s) { b_strn(b, s, strlen(s)); }
static void b_fill(struct buf *b, uint8_t c, size_t n) {
  while (n--) b_put(b, &c, 1);
}
static void b_pad(struct buf *b, size_t a) {
  while (b->n % a) b_u8(b, 0);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return rng_state = x;
}

/* Opens a private, exact-size copy so ASan sees any read past the end. */
static enum tn_status open_copy(const void *p, size_t n, struct tn_gguf **g,
                                struct tn_error *err, void **copy) {
  *copy = malloc(n ? n : 1);
  if (n) memcpy(*copy, p, n);
  return tn_gguf_open_mem(*copy, n, g, err);
}

static bool msg_printable(const char *m) {
  for (; *m; m++)
    if ((unsigned char)*m < 0x20 || (unsigned char)*m >= 0x7f) return false;
  return true;
}

/* Reads everything a successful open hands out; returns a checksum. */
static uint64_t touch_all(const struct tn_gguf *g) {
  uint64_t h = 0;
  for (uint64_t i = 0; i < g->n_kv; i++) {
    const struct tn_gguf_kv *kv = &g->kv[i];
    for (size_t j = 0; j < kv->key.len; j++) h += (uint8_t)kv->key.data[j];
    if (kv->type == TN_GGUF_TYPE_STRING && kv->val.str.len)
      h += (uint8_t)kv->val.str.data[kv->val.str.len - 1];
    if (kv->type == TN_GGUF_TYPE_ARRAY) {
      if (kv->arr_type == TN_GGUF_TYPE_STRING) {
        for (uint64_t j = 0; j < kv->arr_n; j++)
          if (kv->arr_strs[j].len)
            h += (uint8_t)kv->arr_strs[j].data[0] +
                 (uint8_t)kv->arr_strs[j].data[kv->arr_strs[j].len - 1];
      } else if (kv->arr_n) {
        h += (uint64_t)tn_gguf_arr_i64(kv, 0);
        h += (uint64_t)tn_gguf_arr_i64(kv, kv->arr_n - 1);
        double d = tn_gguf_arr_f64(kv, kv->arr_n - 1);
        h += d == d;
      }
    }
    char key[TN_GGUF_MAX_NAME + 1];
    memcpy(key, kv->key.data, kv->key.len);
    key[kv->key.len] = '\0';
    if (strlen(key) == kv->key.len && tn_gguf_find_kv(g, key) != kv) h += 1000;
  }
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const struct tn_gguf_tensor *t = &g->tensors[i];
    const uint8_t *d = t->data;
    h += d[0] + d[t->size - 1];
    char name[TN_GGUF_MAX_NAME + 1];
    memcpy(name, t->name.data, t->name.len);
    name[t->name.len] = '\0';
    if (strlen(name) == t->name.len && tn_gguf_find_tensor(g, name) != t)
      h += 1000;
  }
  return h;
}

/* ---- round trip */

static const enum tn_gguf_type fixed_types[] = {
    TN_GGUF_TYPE_UINT8,  TN_GGUF_TYPE_INT8,    TN_GGUF_TYPE_UINT16,
    TN_GGUF_TYPE_INT16,  TN_GGUF_TYPE_UINT32,  TN_GGUF_TYPE_INT32,
    TN_GGUF_TYPE_FLOAT32, TN_GGUF_TYPE_BOOL,   TN_GGUF_TYPE_UINT64,
    TN_GGUF_TYPE_INT64,  TN_GGUF_TYPE_FLOAT64,
};
static const size_t fixed_sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 8, 8};

struct rt_tensor {
  const char *name;
  enum tn_type type;
  uint32_t n_dims;
  int64_t ne[4];
  size_t size;
};

static const struct rt_tensor rt_tensors[] = {
    {"token_embd.weight", TN_TYPE_Q8_0, 2, {64, 3, 1, 1}, 2 * 34 * 3},
    {"blk.0.attn_norm.weight", TN_TYPE_F32, 1, {7, 1, 1, 1}, 28},
    {"blk.0.ffn_up.weight", TN_TYPE_Q4_K, 2, {256, 2, 1, 1}, 144 * 2},
    {"blk.0.ffn_down.weight", TN_TYPE_Q6_K, 2, {512, 1, 1, 1}, 210 * 2},
    {"blk.0.attn_q.weight", TN_TYPE_Q4_1, 3, {32, 2, 3, 1}, 20 * 6},
    {"blk.0.attn_k.weight", TN_TYPE_Q5_0, 4, {32, 1, 2, 2}, 22 * 4},
    {"x.f16", TN_TYPE_F16, 2, {5, 3, 1, 1}, 30},
    {"x.bf16", TN_TYPE_BF16, 1, {9, 1, 1, 1}, 18},
    {"x.i32", TN_TYPE_I32, 1, {3, 1, 1, 1}, 12},
    {"x.mxfp4", TN_TYPE_MXFP4, 1, {64, 1, 1, 1}, 34},
    {"x.iq2_xxs", TN_TYPE_IQ2_XXS, 1, {256, 1, 1, 1}, 66},
    {"x.tq1_0", TN_TYPE_TQ1_0, 1, {256, 1, 1, 1}, 54},
};
#define N_RT_TENSORS TN_ARRAY_LEN(rt_tensors)

static uint8_t *rt_data[N_RT_TENSORS];
static const char rt_str[] = "hello\0world \xe2\x9c\x93";
static const struct tn_str rt_strs[] = {
    {"alpha", 5}, {"", 0}, {"nul\0inside", 10}, {"\xff\xfe", 2}};

static struct tn_gguf_writer *rt_writer(size_t alignment) {
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  struct tn_error err;
  if (!w) return NULL;
  if (alignment) tn_gguf_writer_set_alignment(w, alignment);
  bool ok = !tn_gguf_writer_add_str(w, "general.architecture", "llama", 5) &&
            !tn_gguf_writer_add_u8(w, "v.u8", 200) &&
            !tn_gguf_writer_add_i8(w, "v.i8", -100) &&
            !tn_gguf_writer_add_u16(w, "v.u16", 60000) &&
            !tn_gguf_writer_add_i16(w, "v.i16", -30000) &&
            !tn_gguf_writer_add_u32(w, "v.u32", 4000000000u) &&
            !tn_gguf_writer_add_i32(w, "v.i32", -2000000000) &&
            !tn_gguf_writer_add_u64(w, "v.u64", 0xfedcba9876543210ull) &&
            !tn_gguf_writer_add_i64(w, "v.i64", INT64_MIN + 5) &&
            !tn_gguf_writer_add_f32(w, "v.f32", 1.5f) &&
            !tn_gguf_writer_add_f64(w, "v.f64", -2.25e300) &&
            !tn_gguf_writer_add_bool(w, "v.bool", true) &&
            !tn_gguf_writer_add_str(w, "v.str", rt_str, sizeof rt_str - 1) &&
            !tn_gguf_writer_add_str(w, "v.empty", "", 0) &&
            !tn_gguf_writer_add_arr_str(w, "a.str", rt_strs, 4) &&
            !tn_gguf_writer_add_arr_str(w, "a.str0", NULL, 0);
  for (size_t i = 0; ok && i < TN_ARRAY_LEN(fixed_types); i++) {
    uint8_t data[5 * 8];
    for (size_t j = 0; j < sizeof data; j++) data[j] = (uint8_t)(j * 37 + i);
    if (fixed_types[i] == TN_GGUF_TYPE_BOOL)
      for (size_t j = 0; j < 5; j++) data[j] = j & 1;
    if (fixed_types[i] == TN_GGUF_TYPE_FLOAT32) {
      float f[5] = {0.5f, -1.0f, 3e38f, 1e-40f, 42.0f};
      memcpy(data, f, sizeof f);
    }
    if (fixed_types[i] == TN_GGUF_TYPE_FLOAT64) {
      double d[5] = {0.5, -1.0, 1e300, -7.0, 42.0};
      memcpy(data, d, sizeof d);
    }
    char key[32];
    snprintf(key, sizeof key, "a.%s", tn_gguf_type_name(fixed_types[i]));
    ok = !tn_gguf_writer_add_arr(w, key, fixed_types[i], data, 5);
  }
  ok = ok && !tn_gguf_writer_add_arr(w, "a.empty", TN_GGUF_TYPE_INT32, NULL, 0);
  for (size_t i = 0; ok && i < N_RT_TENSORS; i++) {
    const struct rt_tensor *t = &rt_tensors[i];
    if (!rt_data[i]) {
      rt_data[i] = malloc(t->size);
      for (size_t j = 0; j < t->size; j++) rt_data[i][j] = (uint8_t)rng();
    }
    ok = !tn_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne,
                                    rt_data[i], &err);
    if (!ok) fprintf(stderr, "add_tensor: %s\n", err.msg);
  }
  if (!ok) {
    tn_gguf_writer_free(w);
    return NULL;
  }
  return w;
}

/* Checks everything rt_writer put in; returns false (after reporting) on
 * the first difference. */
static void rt_check(const struct tn_gguf *g, size_t alignment) {
  struct tn_error err;
  const struct tn_gguf_kv *kv;
  ASSERT_EQ(g->version, 3);
  ASSERT_EQ(g->alignment, alignment);
  ASSERT_EQ(g->n_kv, 17 + TN_ARRAY_LEN(fixed_types) + (alignment != 32));
  ASSERT_EQ(g->data_offset % alignment, 0);

  ASSERT((kv = tn_gguf_find_kv(g, "v.u8")) && kv->type == TN_GGUF_TYPE_UINT8);
  ASSERT_EQ(kv->val.u64, 200);
  ASSERT((kv = tn_gguf_find_kv(g, "v.i8")) && kv->type == TN_GGUF_TYPE_INT8);
  ASSERT_EQ(kv->val.i64, -100);
  ASSERT((kv = tn_gguf_find_kv(g, "v.u16")) && kv->type == TN_GGUF_TYPE_UINT16);
  ASSERT_EQ(kv->val.u64, 60000);
  ASSERT((kv = tn_gguf_find_kv(g, "v.i16")) && kv->type == TN_GGUF_TYPE_INT16);
  ASSERT_EQ(kv->val.i64, -30000);
  ASSERT((kv = tn_gguf_find_kv(g, "v.u32")) && kv->type == TN_GGUF_TYPE_UINT32);
  ASSERT_EQ(kv->val.u64, 4000000000u);
  ASSERT((kv = tn_gguf_find_kv(g, "v.i32")) && kv->type == TN_GGUF_TYPE_INT32);
  ASSERT_EQ(kv->val.i64, -2000000000);
  ASSERT((kv = tn_gguf_find_kv(g, "v.u64")) && kv->type == TN_GGUF_TYPE_UINT64);
  ASSERT(kv->val.u64 == 0xfedcba9876543210ull);
  ASSERT((kv = tn_gguf_find_kv(g, "v.i64")) && kv->type == TN_GGUF_TYPE_INT64);
  ASSERT_EQ(kv->val.i64, INT64_MIN + 5);
  ASSERT((kv = tn_gguf_find_kv(g, "v.f32")) && kv->type == TN_GGUF_TYPE_FLOAT32);
  ASSERT(kv->val.f64 == 1.5);
  ASSERT((kv = tn_gguf_find_kv(g, "v.f64")) && kv->type == TN_GGUF_TYPE_FLOAT64);
  ASSERT(kv->val.f64 == -2.25e300);
  ASSERT((kv = tn_gguf_find_kv(g, "v.bool")) && kv->type == TN_GGUF_TYPE_BOOL);
  ASSERT_EQ(kv->val.u64, 1);
  ASSERT((kv = tn_gguf_find_kv(g, "v.str")) && kv->type == TN_GGUF_TYPE_STRING);
  ASSERT_EQ(kv->val.str.len, sizeof rt_str - 1);
  ASSERT(memcmp(kv->val.str.data, rt_str, sizeof rt_str - 1) == 0);
  ASSERT((kv = tn_gguf_find_kv(g, "v.empty")) && kv->val.str.len == 0);

  ASSERT((kv = tn_gguf_find_kv(g, "a.str")) && kv->type == TN_GGUF_TYPE_ARRAY);
  ASSERT_EQ(kv->arr_type, TN_GGUF_TYPE_STRING);
  ASSERT_EQ(kv->arr_n, 4);
  for (size_t i = 0; i < 4; i++) {
    ASSERT_EQ(kv->arr_strs[i].len, rt_strs[i].len);
    ASSERT(memcmp(kv->arr_strs[i].data, rt_strs[i].data, rt_strs[i].len) == 0);
  }
  ASSERT((kv = tn_gguf_find_kv(g, "a.str0")) && kv->arr_n == 0);
  ASSERT_EQ(kv->arr_type, TN_GGUF_TYPE_STRING);
  ASSERT((kv = tn_gguf_find_kv(g, "a.empty")) && kv->arr_n == 0);
  ASSERT_EQ(kv->arr_type, TN_GGUF_TYPE_INT32);
  ASSERT_EQ(tn_gguf_arr_i64(kv, 0), 0); /* out of range: 0 */

  for (size_t i = 0; i < TN_ARRAY_LEN(fixed_types); i++) {
    char key[32];
    snprintf(key, sizeof key, "a.%s", tn_gguf_type_name(fixed_types[i]));
    kv = tn_gguf_find_kv(g, key);
    ASSERT(kv && kv->type == TN_GGUF_TYPE_ARRAY);
    ASSERT_EQ(kv->arr_type, fixed_types[i]);
    ASSERT_EQ(kv->arr_n, 5);
    uint8_t data[5 * 8];
    for (size_t j = 0; j < sizeof data; j++) data[j] = (uint8_t)(j * 37 + i);
    if (fixed_types[i] == TN_GGUF_TYPE_BOOL)
      for (size_t j = 0; j < 5; j++) data[j] = j & 1;
    if (fixed_types[i] == TN_GGUF_TYPE_FLOAT32) {
      float f[5] = {0.5f, -1.0f, 3e38f, 1e-40f, 42.0f};
      memcpy(data, f, sizeof f);
      ASSERT(tn_gguf_arr_f64(kv, 2) == (double)3e38f);
      ASSERT_EQ(tn_gguf_arr_i64(kv, 1), -1);
      ASSERT_EQ(tn_gguf_arr_i64(kv, 2), INT64_MAX);
    }
    if (fixed_types[i] == TN_GGUF_TYPE_FLOAT64) {
      double d[5] = {0.5, -1.0, 1e300, -7.0, 42.0};
      memcpy(data, d, sizeof d);
      ASSERT(tn_gguf_arr_f64(kv, 3) == -7.0);
      ASSERT_EQ(tn_gguf_arr_i64(kv, 4), 42);
    }
    ASSERT(memcmp(kv->arr_data, data, 5 * fixed_sizes[i]) == 0);
  }
  kv = tn_gguf_find_kv(g, "a.INT8");
  ASSERT_EQ(tn_gguf_arr_i64(kv, 4), (int8_t)(4 * 37 + 1));
  kv = tn_gguf_find_kv(g, "a.UINT16");
  ASSERT_EQ(tn_gguf_arr_i64(kv, 1), (uint16_t)((2 * 37 + 2) | (3 * 37 + 2) << 8));

  /* typed getters */
  uint32_t u32 = 0;
  int64_t i64 = 0;
  float f32 = 0;
  bool b = false;
  struct tn_str s;
  ASSERT_EQ(tn_gguf_get_u32(g, "v.u8", &u32, &err), TN_OK);
  ASSERT_EQ(u32, 200);
  ASSERT_EQ(tn_gguf_get_u32(g, "v.u32", &u32, &err), TN_OK);
  ASSERT_EQ(u32, 4000000000u);
  ASSERT_EQ(tn_gguf_get_u32(g, "v.i8", &u32, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "value -100 does not fit u32");
  ASSERT_EQ(tn_gguf_get_u32(g, "v.u64", &u32, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "v.u64");
  ASSERT_EQ(tn_gguf_get_u32(g, "v.str", &u32, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "'v.str' has type STRING");
  ASSERT_EQ(tn_gguf_get_u32(g, "no.such.key", &u32, &err), TN_ENOENT);
  ASSERT_EQ(tn_gguf_get_i64(g, "v.i64", &i64, &err), TN_OK);
  ASSERT_EQ(i64, INT64_MIN + 5);
  ASSERT_EQ(tn_gguf_get_i64(g, "v.i16", &i64, &err), TN_OK);
  ASSERT_EQ(i64, -30000);
  ASSERT_EQ(tn_gguf_get_i64(g, "v.u64", &i64, &err), TN_EFORMAT);
  ASSERT_EQ(tn_gguf_get_f32(g, "v.f32", &f32, &err), TN_OK);
  ASSERT(f32 == 1.5f);
  ASSERT_EQ(tn_gguf_get_f32(g, "v.i16", &f32, &err), TN_OK);
  ASSERT(f32 == -30000.0f);
  ASSERT_EQ(tn_gguf_get_f32(g, "v.bool", &f32, &err), TN_EFORMAT);
  ASSERT_EQ(tn_gguf_get_bool(g, "v.bool", &b, &err), TN_OK);
  ASSERT(b);
  ASSERT_EQ(tn_gguf_get_bool(g, "v.u8", &b, &err), TN_EFORMAT);
  ASSERT_EQ(tn_gguf_get_str(g, "general.architecture", &s, &err), TN_OK);
  ASSERT(tn_str_eq(s, "llama"));
  ASSERT_EQ(tn_gguf_get_str(g, "a.str", &s, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "has type ARRAY, expected STRING");

  /* tensors */
  ASSERT_EQ(g->n_tensors, N_RT_TENSORS);
  for (size_t i = 0; i < N_RT_TENSORS; i++) {
    const struct rt_tensor *w = &rt_tensors[i];
    const struct tn_gguf_tensor *t = &g->tensors[i];
    ASSERT(tn_str_eq(t->name, w->name));
    ASSERT(tn_gguf_find_tensor(g, w->name) == t);
    ASSERT_EQ(t->type, w->type);
    ASSERT_EQ(t->n_dims, w->n_dims);
    for (uint32_t j = 0; j < 4; j++) ASSERT_EQ(t->ne[j], w->ne[j]);
    ASSERT_EQ(t->size, w->size);
    ASSERT_EQ(t->offset % alignment, 0);
    ASSERT((const uint8_t *)t->data ==
           g->base + g->data_offset + t->offset);
    ASSERT(memcmp(t->data, rt_data[i], w->size) == 0);
  }
  ASSERT(tn_gguf_find_tensor(g, "nope") == NULL);
  ASSERT(tn_gguf_find_tensor(g, "") == NULL);
}

static void test_round_trip(void) {
  static const size_t aligns[] = {32, 64, 1, 4096};
  for (size_t ai = 0; ai < TN_ARRAY_LEN(aligns); ai++) {
    size_t a = aligns[ai];
    struct tn_error err = {0};
    struct tn_gguf_writer *w = rt_writer(a == 32 ? 0 : a);
    ASSERT(w);
    void *mem;
    size_t size;
    ASSERT_EQ(tn_gguf_writer_write_mem(w, &mem, &size, &err), TN_OK);

    struct tn_gguf *g = NULL;
    enum tn_status st = tn_gguf_open_mem(mem, size, &g, &err);
    if (st) fprintf(stderr, "open_mem: %s\n", err.msg);
    ASSERT_EQ(st, TN_OK);
    int before = tn_test_failures;
    rt_check(g, a);
    ASSERT_EQ(tn_test_failures, before);

    /* copy_kv + the same tensors gives the same bytes */
    struct tn_gguf_writer *w2 = tn_gguf_writer_new();
    ASSERT_EQ(tn_gguf_writer_copy_kv(w2, g), TN_OK);
    for (size_t i = 0; i < g->n_tensors; i++) {
      const struct tn_gguf_tensor *t = &g->tensors[i];
      char name[TN_GGUF_MAX_NAME + 1];
      memcpy(name, t->name.data, t->name.len);
      name[t->name.len] = '\0';
      ASSERT_EQ(tn_gguf_writer_add_tensor(w2, name, t->type, t->n_dims, t->ne,
                                          t->data, &err),
                TN_OK);
    }
    void *mem2;
    size_t size2;
    ASSERT_EQ(tn_gguf_writer_write_mem(w2, &mem2, &size2, &err), TN_OK);
    ASSERT_EQ(size2, size);
    ASSERT(memcmp(mem, mem2, size) == 0);
    free(mem2);
    tn_gguf_writer_free(w2);
    tn_gguf_close(g);

    /* through a file, mapped */
    char path[256];
    snprintf(path, sizeof path, "/tmp/tn_test_gguf_%d_%zu.gguf", (int)getpid(),
             a);
    ASSERT_EQ(tn_gguf_writer_write(w, path, &err), TN_OK);
    ASSERT_EQ(tn_gguf_open(path, &g, &err), TN_OK);
    ASSERT_EQ(g->size, size);
    ASSERT(memcmp(g->base, mem, size) == 0);
    before = tn_test_failures;
    rt_check(g, a);
    ASSERT_EQ(tn_test_failures, before);
    tn_gguf_close(g);
    unlink(path);
    free(mem);
    tn_gguf_writer_free(w);
  }
}

static void test_writer_rejects(void) {
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  struct tn_error err = {0};
  char long_key[TN_GGUF_MAX_NAME + 2];
  memset(long_key, 'k', sizeof long_key - 1);
  long_key[sizeof long_key - 1] = '\0';
  ASSERT_EQ(tn_gguf_writer_add_u32(w, "a", 1), TN_OK);
  ASSERT_EQ(tn_gguf_writer_add_u32(w, "a", 2), TN_EINVAL);
  ASSERT_EQ(tn_gguf_writer_add_str(w, "", "x", 1), TN_EINVAL);
  ASSERT_EQ(tn_gguf_writer_add_u32(w, long_key, 1), TN_EINVAL);
  long_key[TN_GGUF_MAX_NAME] = '\0';
  ASSERT_EQ(tn_gguf_writer_add_u32(w, long_key, 1), TN_OK);
  ASSERT_EQ(tn_gguf_writer_add_i32(w, "general.alignment", 32), TN_EINVAL);
  ASSERT_EQ(tn_gguf_writer_add_arr(w, "arr", TN_GGUF_TYPE_STRING, "x", 1),
            TN_EINVAL);
  ASSERT_EQ(tn_gguf_writer_add_arr(w, "arr", TN_GGUF_TYPE_ARRAY, "x", 1),
            TN_EINVAL);
  ASSERT_EQ(tn_gguf_writer_add_arr(w, "bools", TN_GGUF_TYPE_BOOL, "\x01\x02", 2),
            TN_EINVAL);
  float data[64] = {0};
  int64_t ne[4] = {33, 1, 1, 1};
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "t", TN_TYPE_Q8_0, 1, ne, data, &err),
            TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "not a multiple of the block size 32");
  ne[0] = 8;
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "t", TN_TYPE_F32, 5, ne, data, &err),
            TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "n_dims 5 > 4");
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "t", (enum tn_type)4, 1, ne, data,
                                      &err),
            TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "invalid tensor type 4");
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "t", TN_TYPE_F32, 1, ne, data, &err),
            TN_OK);
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "t", TN_TYPE_F32, 1, ne, data, &err),
            TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "duplicate");
  ASSERT_EQ(tn_gguf_writer_add_tensor(w, "", TN_TYPE_F32, 1, ne, data, &err),
            TN_EINVAL);
  tn_gguf_writer_set_alignment(w, 48);
  void *mem = NULL;
  size_t size;
  ASSERT_EQ(tn_gguf_writer_write_mem(w, &mem, &size, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "alignment 48");
  tn_gguf_writer_set_alignment(w, 16); /* updates the key in place */
  ASSERT_EQ(tn_gguf_writer_write_mem(w, &mem, &size, &err), TN_OK);
  struct tn_gguf *g = NULL;
  ASSERT_EQ(tn_gguf_open_mem(mem, size, &g, &err), TN_OK);
  ASSERT_EQ(g->alignment, 16);
  ASSERT_EQ(g->n_kv, 3);
  tn_gguf_close(g);
  free(mem);
  tn_gguf_writer_free(w);
  tn_gguf_writer_free(NULL);
  tn_gguf_close(NULL);
}

/* ---- real models */

static void test_smollm(void) {
  const char *path = TN_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (access(path, R_OK) != 0) TN_SKIP("%s not present", path);
  struct tn_gguf *g = NULL;
  struct tn_error err = {0};
  enum tn_status st = tn_gguf_open(path, &g, &err);
  if (st) fprintf(stderr, "open: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(g->version, 3);
  ASSERT_EQ(g->n_tensors, 272);
  ASSERT_EQ(g->n_kv, 33);
  ASSERT_EQ(g->data_offset, 1785664);
  struct tn_str s;
  ASSERT_EQ(tn_gguf_get_str(g, "general.architecture", &s, &err), TN_OK);
  ASSERT(tn_str_eq(s, "llama"));
  ASSERT_EQ(tn_gguf_get_str(g, "tokenizer.ggml.pre", &s, &err), TN_OK);
  ASSERT(tn_str_eq(s, "smollm"));
  uint32_t u;
  ASSERT_EQ(tn_gguf_get_u32(g, "llama.block_count", &u, &err), TN_OK);
  ASSERT_EQ(u, 30);
  ASSERT_EQ(tn_gguf_get_u32(g, "llama.embedding_length", &u, &err), TN_OK);
  ASSERT_EQ(u, 576);
  float f;
  ASSERT_EQ(tn_gguf_get_f32(g, "llama.rope.freq_base", &f, &err), TN_OK);
  ASSERT(f == 100000.0f);
  bool b = true;
  ASSERT_EQ(tn_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &err),
            TN_OK);
  ASSERT(!b);
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, "tokenizer.ggml.tokens");
  ASSERT(kv && kv->type == TN_GGUF_TYPE_ARRAY);
  ASSERT_EQ(kv->arr_type, TN_GGUF_TYPE_STRING);
  ASSERT_EQ(kv->arr_n, 49152);
  kv = tn_gguf_find_kv(g, "tokenizer.ggml.merges");
  ASSERT(kv && kv->arr_n == 48900);
  kv = tn_gguf_find_kv(g, "tokenizer.ggml.token_type");
  ASSERT(kv && kv->arr_type == TN_GGUF_TYPE_INT32 && kv->arr_n == 49152);

  const struct tn_gguf_tensor *t = tn_gguf_find_tensor(g, "token_embd.weight");
  ASSERT(t);
  ASSERT_EQ(t->type, TN_TYPE_Q8_0);
  ASSERT_EQ(t->n_dims, 2);
  ASSERT_EQ(t->ne[0], 576);
  ASSERT_EQ(t->ne[1], 49152);
  ASSERT_EQ(t->offset, 0);
  ASSERT_EQ(t->size, 30081024);
  t = tn_gguf_find_tensor(g, "blk.0.ffn_down.weight");
  ASSERT(t && t->type == TN_TYPE_Q4_1);
  ASSERT_EQ(t->ne[0], 1536);
  ASSERT_EQ(t->size, 552960);
  t = tn_gguf_find_tensor(g, "output_norm.weight");
  ASSERT(t && t->type == TN_TYPE_F32 && t->size == 2304);
  ASSERT_EQ(g->data_offset + t->offset + t->size, 98360128 + 2304);
  ASSERT(tn_gguf_find_tensor(g, "blk.30.attn_q.weight") == NULL);
  size_t n_q41 = 0;
  for (size_t i = 0; i < g->n_tensors; i++)
    n_q41 += g->tensors[i].type == TN_TYPE_Q4_1;
  ASSERT_EQ(n_q41, 210);
  (void)touch_all(g);
  tn_gguf_close(g);
}

static void test_gemma(void) {
  const char *path = TN_SOURCE_DIR "/models/gemma-3-270m-Q4_K_M.gguf";
  if (access(path, R_OK) != 0) TN_SKIP("%s not present", path);
  struct tn_gguf *g = NULL;
  struct tn_error err = {0};
  enum tn_status st = tn_gguf_open(path, &g, &err);
  if (st) fprintf(stderr, "open: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(g->n_tensors, 236);
  ASSERT_EQ(g->n_kv, 33);
  ASSERT_EQ(g->data_offset, 6525120);
  struct tn_str s;
  ASSERT_EQ(tn_gguf_get_str(g, "general.architecture", &s, &err), TN_OK);
  ASSERT(tn_str_eq(s, "gemma3"));
  uint32_t u;
  ASSERT_EQ(tn_gguf_get_u32(g, "gemma3.block_count", &u, &err), TN_OK);
  ASSERT_EQ(u, 18);
  const struct tn_gguf_kv *kv = tn_gguf_find_kv(g, "tokenizer.ggml.scores");
  ASSERT(kv && kv->arr_type == TN_GGUF_TYPE_FLOAT32 && kv->arr_n == 262144);
  const struct tn_gguf_tensor *t = tn_gguf_find_tensor(g, "token_embd.weight");
  ASSERT(t && t->type == TN_TYPE_Q8_0);
  ASSERT_EQ(t->ne[0], 640);
  ASSERT_EQ(t->ne[1], 262144);
  ASSERT_EQ(t->size, 178257920);
  size_t counts[TN_TYPE_COUNT] = {0};
  for (size_t i = 0; i < g->n_tensors; i++) counts[g->tensors[i].type]++;
  ASSERT_EQ(counts[TN_TYPE_F32], 109);
  ASSERT_EQ(counts[TN_TYPE_Q5_0], 81);
  ASSERT_EQ(counts[TN_TYPE_Q4_K], 27);
  ASSERT_EQ(counts[TN_TYPE_Q8_0], 10);
  ASSERT_EQ(counts[TN_TYPE_Q6_K], 9);
  tn_gguf_close(g);
}

/* The reader's own table of block layouts agrees with the kernels' traits
 * (the two are written independently, so each checks the other). */
static void test_type_table(void) {
  for (int64_t t = 0; t < TN_TYPE_COUNT + 3; t++) {
    int64_t blck = 0;
    size_t tsize = 0;
    const char *name = NULL;
    bool ours = tn_gguf_ggml_type((uint64_t)t, &blck, &tsize, &name);
    if (ours != tn_type_valid(t)) fprintf(stderr, "type %lld\n", (long long)t);
    ASSERT_EQ(ours, tn_type_valid(t));
    if (!ours) continue;
    const struct tn_type_traits *tr = tn_type_ref((enum tn_type)t);
    ASSERT(tr);
    ASSERT_STR_EQ(name, tr->name);
    ASSERT_EQ(blck, tr->blck_size);
    ASSERT_EQ(tsize, tr->type_size);
  }
}

static void test_edge_cases(void) {
  struct tn_error err = {0};
  struct tn_gguf *g = NULL;
  /* no tensors and no padding after the key/values: fine */
  struct buf b = {0};
  b_u32(&b, TN_GGUF_MAGIC);
  b_u32(&b, 3);
  b_u64(&b, 0);
  b_u64(&b, 1);
  b_str(&b, "k");
  b_u32(&b, TN_GGUF_TYPE_UINT8);
  b_u8(&b, 7);
  void *copy;
  ASSERT_EQ(open_copy(b.p, b.n, &g, &err, &copy), TN_OK);
  ASSERT_EQ(g->n_tensors, 0);
  ASSERT_EQ(g->data_offset, b.n);
  uint32_t u = 0;
  ASSERT_EQ(tn_gguf_get_u32(g, "k", &u, &err), TN_OK);
  ASSERT_EQ(u, 7);
  ASSERT(tn_gguf_find_tensor(g, "k") == NULL);
  tn_gguf_close(g);
  free(copy);
  /* no key/values, no tensors: the smallest valid file */
  b.n = 0;
  b_u32(&b, TN_GGUF_MAGIC);
  b_u32(&b, 2);
  b_u64(&b, 0);
  b_u64(&b, 0);
  ASSERT_EQ(open_copy(b.p, b.n, &g, &err, &copy), TN_OK);
  ASSERT(tn_gguf_find_kv(g, "k") == NULL);
  ASSERT_EQ(tn_gguf_get_u32(g, "k", &u, &err), TN_ENOENT);
  tn_gguf_close(g);
  free(copy);
  free(b.p);
  /* the writer reports a path it cannot create */
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  ASSERT_EQ(tn_gguf_writer_write(w, "/nonexistent-dir/x.gguf", &err), TN_EIO);
  ASSERT_SUBSTR(err.msg, "cannot create");
  tn_gguf_writer_free(w);
}

static void test_open_errors(void) {
  struct tn_gguf *g = (struct tn_gguf *)1;
  struct tn_error err = {0};
  ASSERT_EQ(tn_gguf_open("/nonexistent/x.gguf", &g, &err), TN_ENOENT);
  ASSERT(g == NULL);
  ASSERT(strstr(err.msg, "nonexistent") == NULL); /* no path in messages */
  ASSERT_EQ(tn_gguf_open("/tmp", &g, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "not a regular file");
  char path[64];
  snprintf(path, sizeof path, "/tmp/tn_test_gguf_empty_%d", (int)getpid());
  FILE *f = fopen(path, "wb");
  ASSERT(f);
  fclose(f);
  ASSERT_EQ(tn_gguf_open(path, &g, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "truncated reading magic");
  unlink(path);
  ASSERT_EQ(tn_gguf_open_mem(NULL, 0, &g, &err), TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "truncated");
}

/* ---- malformed files */

#define MALFORMED(X)                                                          \
  X(OK, NULL)                                                                 \
  X(OK_V2, NULL)                                                              \
  X(OK_OVERLAP, NULL) /* tensors may share bytes, inside the data section */  \
  X(EMPTY, "truncated reading magic (4 bytes at offset 0, 0 left)")          \
  X(TRUNC_MAGIC, "truncated reading magic (4 bytes at offset 0, 2 left)")     \
  X(BAD_MAGIC, "bad magic 'GGFF'")                                            \
  X(VERSION_0, "unsupported version 0")                                       \
  X(VERSION_1, "unsupported version 1")                                       \
  X(VERSION_4, "unsupported version 4")                                       \
  X(BIG_ENDIAN, "big-endian")                                                 \
  X(TRUNC_HEADER, "truncated reading n_tensors")                              \
  X(N_TENSORS_HUGE, "n_tensors 18446744073709551615 is too large")            \
  X(N_TENSORS_TOO_MANY, "n_tensors 1000 is too large")                        \
  X(N_KV_HUGE, "n_kv 18446744073709551615 is too large")                      \
  X(N_KV_TOO_MANY, "n_kv 100 is too large")                                   \
  X(N_KV_PLUS_TENSORS, "n_kv 5 and n_tensors 19 are too large")               \
  X(N_TENSORS_AFTER_KV, "n_tensors 17 is too large for the 415 bytes left after") \
  X(KEY_LEN_HUGE, "kv 0: key length 18446744073709551615 > 256")              \
  X(KEY_TOO_LONG, "kv 0: key length 257 > 256")                               \
  X(KEY_EMPTY, "kv 0: key length 0")                                          \
  X(TRUNC_IN_KEY, "kv 0: truncated reading key")                              \
  X(KV_TYPE_INVALID, "kv 4 ('x.flag'): invalid value type 13")                \
  X(KV_TYPE_NEG, "invalid value type 4294967295")                             \
  X(STR_LEN_HUGE, "string length 9223372036854775808 exceeds")                \
  X(ARR_NESTED, "kv 3 ('x.scores'): nested arrays")                           \
  X(ARR_ELEM_INVALID, "invalid array element type 13")                        \
  X(ARR_COUNT_HUGE, "array count 18446744073709551615 of FLOAT32")            \
  X(ARR_COUNT_PAST_END, "array count 1000 of FLOAT32 exceeds")                \
  X(ARR_STR_COUNT_HUGE, "array count 4611686018427387904 of STRING")          \
  X(ARR_STR_LEN_HUGE, "array string length 18446744073709551615 exceeds")     \
  X(BOOL_BAD, "bool value 2 is not 0 or 1")                                   \
  X(DUP_KEY, "duplicate key 'x.scores' (kv 3 and kv 4)")                      \
  X(ALIGN_ZERO, "('general.alignment'): alignment 0")                         \
  X(ALIGN_NOT_POW2, "alignment 48 is not a power of two")                     \
  X(ALIGN_HUGE, "alignment 2147483648 > 1048576")                             \
  X(ALIGN_WRONG_TYPE, "('general.alignment'): type INT32, expected UINT32")    \
  X(ALIGN_INCONSISTENT, "tensor 1 ('t1'): offset 256 is not aligned to 512")  \
  X(TRUNC_IN_KV, "kv 4 ('x.flag'): truncated reading value type")            \
  X(TRUNC_IN_ARRAY, "kv 3 ('x.scores'): array count 2 of FLOAT32 exceeds the 5 bytes left") \
  X(TENSOR_NAME_LEN_HUGE, "tensor 0: name length 18446744073709551615 > 256") \
  X(TENSOR_NAME_TOO_LONG, "tensor 0: name length 257 > 256")                  \
  X(TENSOR_NAME_EMPTY, "tensor 0: name length 0")                             \
  X(N_DIMS_0, "tensor 0 ('t0'): n_dims 0 < 1")                                \
  X(N_DIMS_5, "tensor 1 ('t1'): n_dims 5 > 4")                                \
  X(NE_ZERO, "tensor 0 ('t0'): ne[1] 0 <= 0")                                 \
  X(NE_NEG, "tensor 0 ('t0'): ne[0] -32 <= 0")                                \
  X(NE_NOT_BLOCK, "ne[0] 33 is not a multiple of the block size 32 of type Q8_0") \
  X(NE_OVERFLOW, "element count overflows")                                   \
  X(NBYTES_OVERFLOW, "byte size overflows")                                   \
  X(TYPE_REMOVED, "tensor 1 ('t1'): invalid tensor type 4")                   \
  X(TYPE_HUGE, "invalid tensor type 1000")                                    \
  X(TYPE_FUTURE, "invalid tensor type 40")                                    \
  X(OFFSET_MISALIGNED, "offset 264 is not aligned to 32")                     \
  X(OFFSET_PAST_END, "offset 1099511627776 size 34 is past the end")          \
  X(SIZE_PAST_END, "offset 256 size 3400 is past the end")                    \
  X(OFFSET_WRAP, "offset 18446744073709551584 size 34 is past the end")       \
  X(DUP_TENSOR, "duplicate tensor name 't0' (tensor 0 and tensor 1)")         \
  X(TRUNC_IN_TINFO, "tensor 1 ('t1'): truncated reading type")                  \
  X(TRUNC_DATA, "tensor 1 ('t1'): data at offset 256 size 34 is past the end") \
  X(NO_DATA_SECTION, "data section")                                          \
  X(ESCAPE_NAME, "tensor 1 ('t\\x01\\xff\\x27q\\x0a'): n_dims 7 > 4")         \
  X(ESCAPE_LONG_KEY, "\\xff\\xff...'): invalid value type 13")

enum mcase {
#define MC_ENUM(name, msg) M_##name,
  MALFORMED(MC_ENUM)
#undef MC_ENUM
  M_COUNT
};

static const struct {
  const char *name;
  const char *expect;
} mcases[] = {
#define MC_ROW(name, msg) {#name, msg},
    MALFORMED(MC_ROW)
#undef MC_ROW
};

/* The base file (case OK), with one field broken per case:
 *   kv0 general.architecture = "llama"      kv1 general.alignment = 32
 *   kv2 tokenizer.ggml.tokens = ["a","bc"]  kv3 x.scores = [1.0, 2.0]
 *   kv4 x.flag = true
 *   t0 F32 [32, 2] at 0 (256 bytes)         t1 Q8_0 [32] at 256 (34 bytes) */
static void build(enum mcase c, struct buf *b) {
  size_t cut = SIZE_MAX;
  b->n = 0;
  b_u32(b, c == M_BAD_MAGIC ? 0x46464747u : TN_GGUF_MAGIC);
  uint32_t version = c == M_VERSION_0   ? 0
                     : c == M_VERSION_1 ? 1
                     : c == M_VERSION_4 ? 4
                     : c == M_BIG_ENDIAN ? 0x03000000u
                     : c == M_OK_V2     ? 2
                                        : 3;
  b_u32(b, version);
  if (c == M_TRUNC_HEADER) cut = b->n + 4;
  uint64_t n_tensors = c == M_N_TENSORS_HUGE       ? UINT64_MAX
                       : c == M_N_TENSORS_TOO_MANY ? 1000
                       : c == M_N_KV_PLUS_TENSORS  ? 19
                       : c == M_N_TENSORS_AFTER_KV ? 17
                       : c == M_TRUNC_IN_KEY       ? 0
                                                   : 2;
  uint64_t n_kv = c == M_N_KV_HUGE       ? UINT64_MAX
                  : c == M_N_KV_TOO_MANY ? 100
                  : c == M_TRUNC_IN_KEY  ? 1 /* so the count check passes */
                                         : 5;
  b_u64(b, n_tensors);
  b_u64(b, n_kv);

  /* kv0 */
  if (c == M_TRUNC_IN_KEY) cut = b->n + 8 + 5;
  if (c == M_KEY_LEN_HUGE) b_u64(b, UINT64_MAX);
  else if (c == M_KEY_TOO_LONG) b_u64(b, 257), b_fill(b, 'a', 257);
  else if (c == M_KEY_EMPTY) b_u64(b, 0);
  else b_str(b, "general.architecture");
  b_u32(b, TN_GGUF_TYPE_STRING);
  if (c == M_STR_LEN_HUGE) b_u64(b, 1ull << 63);
  else b_str(b, "llama");
  /* kv1 */
  b_str(b, "general.alignment");
  b_u32(b, c == M_ALIGN_WRONG_TYPE ? TN_GGUF_TYPE_INT32 : TN_GGUF_TYPE_UINT32);
  b_u32(b, c == M_ALIGN_ZERO           ? 0
           : c == M_ALIGN_NOT_POW2     ? 48
           : c == M_ALIGN_HUGE         ? 1u << 31
           : c == M_ALIGN_INCONSISTENT ? 512
                                       : 32);
  /* kv2 */
  b_str(b, "tokenizer.ggml.tokens");
  b_u32(b, TN_GGUF_TYPE_ARRAY);
  b_u32(b, TN_GGUF_TYPE_STRING);
  b_u64(b, c == M_ARR_STR_COUNT_HUGE ? 1ull << 62 : 2);
  b_str(b, "a");
  if (c == M_ARR_STR_LEN_HUGE) b_u64(b, UINT64_MAX);
  else b_str(b, "bc");
  /* kv3 */
  b_str(b, "x.scores");
  b_u32(b, TN_GGUF_TYPE_ARRAY);
  b_u32(b, c == M_ARR_NESTED         ? TN_GGUF_TYPE_ARRAY
           : c == M_ARR_ELEM_INVALID ? 13
                                     : TN_GGUF_TYPE_FLOAT32);
  b_u64(b, c == M_ARR_COUNT_HUGE       ? UINT64_MAX
           : c == M_ARR_COUNT_PAST_END ? 1000
                                       : 2);
  if (c == M_TRUNC_IN_ARRAY) cut = b->n + 5;
  b_f32(b, 1.0f);
  b_f32(b, 2.0f);
  /* kv4 */
  if (c == M_TRUNC_IN_KV) cut = b->n + 8 + 6 + 2;
  if (c == M_ESCAPE_LONG_KEY) b_u64(b, 256), b_fill(b, 0xff, 256);
  else b_str(b, c == M_DUP_KEY ? "x.scores" : "x.flag");
  b_u32(b, c == M_KV_TYPE_INVALID || c == M_ESCAPE_LONG_KEY ? 13
           : c == M_KV_TYPE_NEG                             ? 0xffffffffu
                                                            : TN_GGUF_TYPE_BOOL);
  b_u8(b, c == M_BOOL_BAD ? 2 : 1);

  /* tensor 0 */
  if (c == M_TENSOR_NAME_LEN_HUGE) b_u64(b, UINT64_MAX);
  else if (c == M_TENSOR_NAME_TOO_LONG) b_u64(b, 257), b_fill(b, 't', 257);
  else if (c == M_TENSOR_NAME_EMPTY) b_u64(b, 0);
  else b_str(b, "t0");
  if (c == M_NE_OVERFLOW) {
    b_u32(b, 4);
    for (int j = 0; j < 4; j++) b_u64(b, 1ull << 31);
    b_u32(b, TN_TYPE_F32);
  } else if (c == M_NBYTES_OVERFLOW) {
    b_u32(b, 2);
    b_u64(b, 1ull << 31);
    b_u64(b, 1ull << 31);
    b_u32(b, TN_TYPE_F64);
  } else {
    b_u32(b, c == M_N_DIMS_0 ? 0 : 2);
    b_u64(b, c == M_NE_NEG ? (uint64_t)-32 : 32);
    b_u64(b, c == M_NE_ZERO ? 0 : 2);
    b_u32(b, TN_TYPE_F32);
  }
  b_u64(b, 0);
  /* tensor 1 */
  if (c == M_TRUNC_IN_TINFO) cut = b->n + 8 + 2 + 4 + 8 + 3; /* in type */
  if (c == M_ESCAPE_NAME) b_strn(b, "t\x01\xff'q\n", 6);
  else b_str(b, c == M_DUP_TENSOR ? "t0" : "t1");
  b_u32(b, c == M_N_DIMS_5 ? 5 : c == M_ESCAPE_NAME ? 7 : 1);
  b_u64(b, c == M_NE_NOT_BLOCK ? 33 : c == M_SIZE_PAST_END ? 3200 : 32);
  b_u32(b, c == M_TYPE_REMOVED  ? 4
           : c == M_TYPE_HUGE   ? 1000
           : c == M_TYPE_FUTURE ? 40
                                : TN_TYPE_Q8_0);
  b_u64(b, c == M_OFFSET_MISALIGNED ? 264
           : c == M_OFFSET_PAST_END ? 1ull << 40
           : c == M_OFFSET_WRAP     ? UINT64_MAX - 31
           : c == M_OK_OVERLAP      ? 0
                                    : 256);
  if (c == M_NO_DATA_SECTION) cut = b->n;
  size_t a = c == M_ALIGN_INCONSISTENT ? 512 : 32;
  b_pad(b, a);
  /* data */
  for (int i = 0; i < 256 + 34; i++) b_u8(b, (uint8_t)(i * 7));
  b_pad(b, a);
  if (c == M_TRUNC_DATA) cut = b->n - 40;
  if (c == M_EMPTY) cut = 0;
  if (c == M_TRUNC_MAGIC) cut = 2;
  if (cut < b->n) b->n = cut;
}

static void test_malformed(void) {
  ASSERT_GE(M_COUNT - 3, 30); /* at least 30 broken files */
  struct buf b = {0};
  char path[64];
  snprintf(path, sizeof path, "/tmp/tn_test_gguf_bad_%d", (int)getpid());
  for (int c = 0; c < M_COUNT; c++) {
    build((enum mcase)c, &b);
    for (int via_file = 0; via_file < 2; via_file++) {
      struct tn_gguf *g = NULL;
      struct tn_error err = {0};
      void *copy = NULL;
      enum tn_status st;
      if (via_file) {
        FILE *f = fopen(path, "wb");
        ASSERT(f);
        ASSERT_EQ(fwrite(b.p, 1, b.n, f), b.n);
        fclose(f);
        st = tn_gguf_open(path, &g, &err);
      } else {
        st = open_copy(b.p, b.n, &g, &err, &copy);
      }
      if (!mcases[c].expect) {
        if (st) fprintf(stderr, "case %s: %s\n", mcases[c].name, err.msg);
        ASSERT_EQ(st, TN_OK);
        ASSERT_EQ(g->n_tensors, 2);
        ASSERT_EQ(g->n_kv, 5);
        ASSERT_EQ(g->version, c == M_OK_V2 ? 2 : 3);
        ASSERT_EQ(g->data_offset, 320);
        ASSERT(tn_gguf_find_tensor(g, "t1") == &g->tensors[1]);
        ASSERT((const uint8_t *)g->tensors[1].data ==
               g->base + 320 + (c == M_OK_OVERLAP ? 0 : 256));
        ASSERT_EQ(((const uint8_t *)g->tensors[0].data)[5], 35);
        (void)touch_all(g);
      } else {
        if (st == TN_OK)
          fprintf(stderr, "case %s: accepted, expected \"%s\"\n",
                  mcases[c].name, mcases[c].expect);
        ASSERT_NE(st, TN_OK);
        ASSERT(g == NULL);
        ASSERT_EQ(err.status, st);
        if (!strstr(err.msg, mcases[c].expect))
          fprintf(stderr, "case %s:\n", mcases[c].name);
        ASSERT_SUBSTR(err.msg, mcases[c].expect);
        if (!msg_printable(err.msg))
          fprintf(stderr, "case %s: unprintable message\n", mcases[c].name);
        ASSERT(msg_printable(err.msg));
      }
      tn_gguf_close(g);
      free(copy);
    }
  }
  unlink(path);
  free(b.p);
}

/* ---- chaos: truncation, byte flips, interesting values */

static size_t data_end(const struct tn_gguf *g) {
  size_t end = 0;
  for (size_t i = 0; i < g->n_tensors; i++)
    end = TN_MAX(end, g->data_offset + g->tensors[i].offset + g->tensors[i].size);
  return end;
}

static void chaos_file(const uint8_t *file, size_t size, int n_iter) {
  struct tn_error err;
  struct tn_gguf *g = NULL;
  ASSERT_EQ(tn_gguf_open_mem(file, size, &g, &err), TN_OK);
  size_t need = data_end(g);
  tn_gguf_close(g);

  /* every prefix */
  for (size_t n = 0; n < size; n++) {
    void *copy;
    enum tn_status st = open_copy(file, n, &g, &err, &copy);
    if (n < need) {
      if (st == TN_OK) fprintf(stderr, "prefix %zu of %zu accepted\n", n, size);
      ASSERT_NE(st, TN_OK);
      ASSERT(msg_printable(err.msg));
    } else {
      ASSERT_EQ(st, TN_OK);
      (void)touch_all(g);
    }
    tn_gguf_close(g);
    free(copy);
  }

  /* random damage */
  static const uint64_t interesting[] = {
      0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 257, 0x7fffffff,
      0x80000000u, 0xffffffffu, 1ull << 32, 1ull << 62, 1ull << 63,
      INT64_MAX, UINT64_MAX, UINT64_MAX - 31, (uint64_t)-32};
  uint8_t *copy = malloc(size);
  size_t n_ok = 0;
  volatile uint64_t sink = 0;
  for (int it = 0; it < n_iter; it++) {
    memcpy(copy, file, size);
    int n_hits = 1 + (int)(rng() % 3);
    for (int k = 0; k < n_hits; k++) {
      size_t pos = rng() % size;
      switch (rng() % 3) {
      case 0: copy[pos] ^= (uint8_t)(1u << (rng() % 8)); break;
      case 1: copy[pos] = (uint8_t)rng(); break;
      default: {
        uint64_t v = interesting[rng() % TN_ARRAY_LEN(interesting)];
        size_t w = (rng() & 1) ? 8 : 4;
        for (size_t j = 0; j < w && pos + j < size; j++)
          copy[pos + j] = (uint8_t)(v >> (8 * j));
      }
      }
    }
    size_t n = size;
    if (rng() % 8 == 0) n = rng() % size;
    void *exact;
    enum tn_status st = open_copy(copy, n, &g, &err, &exact);
    if (st == TN_OK) {
      n_ok++;
      sink += touch_all(g);
    } else {
      ASSERT(msg_printable(err.msg));
      ASSERT(g == NULL);
    }
    tn_gguf_close(g);
    free(exact);
  }
  (void)sink;
  printf("  chaos: %zu bytes, %d mutations, %zu still valid\n", size, n_iter,
         n_ok);
  free(copy);
}

static void test_chaos(void) {
  struct buf b = {0};
  build(M_OK, &b);
  chaos_file(b.p, b.n, 30000);
  free(b.p);
  struct tn_gguf_writer *w = rt_writer(0);
  void *mem;
  size_t size;
  struct tn_error err;
  ASSERT_EQ(tn_gguf_writer_write_mem(w, &mem, &size, &err), TN_OK);
  chaos_file(mem, size, 30000);
  free(mem);
  tn_gguf_writer_free(w);
}

static void test_escape(void) {
  struct tn_gguf *g = NULL;
  struct tn_error err = {0};
  struct buf b = {0};
  build(M_ESCAPE_NAME, &b);
  ASSERT_NE(tn_gguf_open_mem(b.p, b.n, &g, &err), TN_OK);
  ASSERT(strchr(err.msg, '\n') == NULL);
  ASSERT(strchr(err.msg, '\x01') == NULL);
  build(M_ESCAPE_LONG_KEY, &b);
  ASSERT_NE(tn_gguf_open_mem(b.p, b.n, &g, &err), TN_OK);
  ASSERT_LT(strlen(err.msg), 300);
  free(b.p);
}

/* With TN_GGUF_WRITE_SEEDS=dir, writes small valid files there as a seed
 * corpus for tests/fuzz/fuzz_gguf.c. */
static void write_seeds(void) {
  const char *dir = getenv("TN_GGUF_WRITE_SEEDS");
  if (!dir) return;
  struct buf b = {0};
  char path[512];
  static const enum mcase seeds[] = {M_OK, M_OK_V2};
  for (size_t i = 0; i < TN_ARRAY_LEN(seeds); i++) {
    build(seeds[i], &b);
    snprintf(path, sizeof path, "%s/crafted_%s.gguf", dir, mcases[seeds[i]].name);
    FILE *f = fopen(path, "wb");
    ASSERT(f);
    fwrite(b.p, 1, b.n, f);
    fclose(f);
  }
  free(b.p);
  struct tn_error err;
  struct tn_gguf_writer *w = rt_writer(0);
  snprintf(path, sizeof path, "%s/writer_all_types.gguf", dir);
  ASSERT_EQ(tn_gguf_writer_write(w, path, &err), TN_OK);
  tn_gguf_writer_free(w);
  w = tn_gguf_writer_new();
  tn_gguf_writer_set_alignment(w, 8);
  tn_gguf_writer_add_str(w, "general.architecture", "llama", 5);
  snprintf(path, sizeof path, "%s/writer_no_tensors.gguf", dir);
  ASSERT_EQ(tn_gguf_writer_write(w, path, &err), TN_OK);
  tn_gguf_writer_free(w);
}

static void cleanup(void) {
  for (size_t i = 0; i < N_RT_TENSORS; i++) free(rt_data[i]);
}

TN_TEST_MAIN(TN_TEST(test_round_trip), TN_TEST(test_writer_rejects),
             TN_TEST(test_smollm), TN_TEST(test_gemma),
             TN_TEST(test_type_table), TN_TEST(test_edge_cases), TN_TEST(test_open_errors), TN_TEST(test_malformed),
             TN_TEST(test_escape), TN_TEST(test_chaos), TN_TEST(write_seeds),
             TN_TEST(cleanup))
