/*
 * gguf_internal.h: what the GGUF reader (gguf.c) and writer (gguf_writer.c)
 * share.
 *
 * The reader validates tensor types and sizes against its own table of ggml
 * block layouts (gguf.c), not against the kernels' traits: whether a file is
 * well formed must not depend on which types we can compute with.
 */
#ifndef TN_GGUF_INTERNAL_H
#define TN_GGUF_INTERNAL_H

#include "gguf/gguf.h"

/* Block layout of ggml type id t: false when t is not a type id GGUF
 * defines below TN_TYPE_COUNT. */
bool tn_gguf_ggml_type(uint64_t t, int64_t *blck_size, size_t *type_size,
                       const char **name);

/* Bytes of one value of a fixed-size metadata type; 0 for STRING, ARRAY and
 * invalid types. */
size_t tn_gguf_value_size(enum tn_gguf_type t);

/* Checks a tensor's n_dims (1..4), type id, and ne (each > 0, ne[0] a
 * multiple of the block size, element count and byte size without
 * overflow), and gives its byte size. Messages start with ctx, e.g.
 * "gguf: tensor 3 ('blk.0.attn_q.weight')". Unused ne entries are ignored. */
enum tn_status tn_gguf_tensor_check(const char *ctx, uint32_t n_dims,
                                    const int64_t *ne, uint64_t type,
                                    size_t *size, struct tn_error *err);

/* Writes s as printable ASCII (quotes, backslashes and other bytes escaped
 * as \xNN), cut to fit cap with "..." at the end. Returns buf. */
char *tn_gguf_escape(const char *s, size_t len, char *buf, size_t cap);

/* Little-endian stores/loads that do not care about alignment. */
static inline uint64_t tn_gguf_load_le(const uint8_t *p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}
static inline void tn_gguf_store_le(uint8_t *p, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

#endif /* TN_GGUF_INTERNAL_H */
