/*
 * fuzz_gguf.c: libFuzzer target for the GGUF reader.
 *
 * Parses the input with tn_gguf_open_mem; when it is accepted, reads every
 * key/value (keys, strings, every string-array element's ends, numeric
 * array ends, the typed getters) and the first and last byte of every
 * tensor, and looks each name up again. ASan turns any read outside the
 * input into a crash.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_gguf
 *   ./build-fuzz/fuzz_gguf -max_total_time=60 -max_len=4096 \
 *       /tmp/corpus tests/fuzz/seeds/gguf
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* With TN_FUZZ the whole tern_core library is built with
 * -fsanitize=fuzzer-no-link, so coverage reaches inside the reader. */
#include "gguf/gguf.h"

static volatile uint64_t sink;

static void touch_kv(const struct tn_gguf *g, const struct tn_gguf_kv *kv) {
  uint64_t h = 0;
  char key[TN_GGUF_MAX_NAME + 1];
  for (size_t j = 0; j < kv->key.len; j++) h += (uint8_t)kv->key.data[j];
  memcpy(key, kv->key.data, kv->key.len);
  key[kv->key.len] = '\0';
  if (strlen(key) == kv->key.len) {
    /* keys with NUL bytes cannot be looked up by C string */
    if (tn_gguf_find_kv(g, key) != kv) abort();
    struct tn_error err;
    uint32_t u;
    int64_t i;
    float f;
    bool b;
    struct tn_str s;
    if (!tn_gguf_get_u32(g, key, &u, &err)) h += u;
    if (!tn_gguf_get_i64(g, key, &i, &err)) h += (uint64_t)i;
    if (!tn_gguf_get_f32(g, key, &f, &err)) h += (uint64_t)(f == f);
    if (!tn_gguf_get_bool(g, key, &b, &err)) h += b;
    if (!tn_gguf_get_str(g, key, &s, &err) && s.len)
      h += (uint8_t)s.data[0] + (uint8_t)s.data[s.len - 1];
  }
  if (kv->type == TN_GGUF_TYPE_ARRAY) {
    if (kv->arr_type == TN_GGUF_TYPE_STRING) {
      for (uint64_t j = 0; j < kv->arr_n; j++) {
        const struct tn_str *s = &kv->arr_strs[j];
        if (s->len) h += (uint8_t)s->data[0] + (uint8_t)s->data[s->len - 1];
      }
    } else if (kv->arr_n) {
      h += (uint64_t)tn_gguf_arr_i64(kv, 0);
      h += (uint64_t)tn_gguf_arr_i64(kv, kv->arr_n - 1);
      double d = tn_gguf_arr_f64(kv, kv->arr_n - 1);
      h += d == d;
    }
  }
  sink += h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct tn_gguf *g = NULL;
  struct tn_error err;
  if (tn_gguf_open_mem(data, size, &g, &err) != TN_OK) {
    /* messages never carry raw bytes from the file */
    for (const char *m = err.msg; *m; m++)
      if ((unsigned char)*m < 0x20 || (unsigned char)*m >= 0x7f) abort();
    if (g) abort();
    return 0;
  }
  for (uint64_t i = 0; i < g->n_kv; i++) touch_kv(g, &g->kv[i]);
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const struct tn_gguf_tensor *t = &g->tensors[i];
    const uint8_t *d = t->data;
    if (t->size == 0 || d < data || d + t->size > data + size) abort();
    sink += d[0] + d[t->size - 1];
    char name[TN_GGUF_MAX_NAME + 1];
    memcpy(name, t->name.data, t->name.len);
    name[t->name.len] = '\0';
    if (strlen(name) == t->name.len && tn_gguf_find_tensor(g, name) != t)
      abort();
  }
  tn_gguf_close(g);
  return 0;
}
