/*
 * kv.c: block pool and per-sequence block tables (see kv.h).
 */
#include "kv/kv.h"

#include <stdlib.h>
#include <string.h>

size_t tn_kv_block_bytes(int32_t n_layer, int32_t block_size,
                         int32_t n_kv_dim) {
  return 2u * (size_t)n_layer * (size_t)block_size * (size_t)n_kv_dim *
         sizeof(uint16_t);
}

enum tn_status tn_kv_pool_init(struct tn_kv_pool *pool, int32_t n_layer,
                               int32_t n_blocks, int32_t block_size,
                               int32_t n_kv_dim, struct tn_error *err) {
  memset(pool, 0, sizeof(*pool));
  if (n_layer <= 0 || n_blocks <= 0 || block_size <= 0 || n_kv_dim <= 0)
    return tn_error_set(err, TN_EINVAL,
                        "kv cache: bad shape (layers %d, blocks %d, block "
                        "size %d, kv dim %d)",
                        n_layer, n_blocks, block_size, n_kv_dim);
  size_t n;
  if (tn_mul_overflow((size_t)n_layer, (size_t)n_blocks, &n) ||
      tn_mul_overflow(n, (size_t)block_size, &n) ||
      tn_mul_overflow(n, (size_t)n_kv_dim, &n) ||
      tn_mul_overflow(n, sizeof(uint16_t), &n))
    return tn_error_set(err, TN_EINVAL, "kv cache: size overflows");
  pool->n_layer = n_layer;
  pool->n_blocks = n_blocks;
  pool->block_size = block_size;
  pool->n_kv_dim = n_kv_dim;
  pool->k = tn_aligned_alloc(n);
  pool->v = tn_aligned_alloc(n);
  pool->refs = calloc((size_t)n_blocks, sizeof(int32_t));
  pool->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
  if (!pool->k || !pool->v || !pool->refs || !pool->free_list) {
    tn_kv_pool_deinit(pool);
    return tn_error_set(err, TN_ENOMEM,
                        "kv cache: cannot allocate %zu MiB for %d blocks",
                        2 * n >> 20, n_blocks);
  }
  /* Hand out low block ids first. */
  for (int32_t i = 0; i < n_blocks; i++) pool->free_list[i] = n_blocks - 1 - i;
  pool->n_free = n_blocks;
  return TN_OK;
}

void tn_kv_pool_deinit(struct tn_kv_pool *pool) {
  if (!pool) return;
  tn_aligned_free(pool->k);
  tn_aligned_free(pool->v);
  free(pool->refs);
  free(pool->free_list);
  memset(pool, 0, sizeof(*pool));
}

int32_t tn_kv_block_acquire(struct tn_kv_pool *pool) {
  if (pool->n_free == 0) return -1;
  int32_t b = pool->free_list[--pool->n_free];
  TN_ASSERT(pool->refs[b] == 0);
  pool->refs[b] = 1;
  return b;
}

void tn_kv_block_retain(struct tn_kv_pool *pool, int32_t block) {
  TN_ASSERT(block >= 0 && block < pool->n_blocks && pool->refs[block] > 0);
  pool->refs[block]++;
}

void tn_kv_block_release(struct tn_kv_pool *pool, int32_t block) {
  TN_ASSERT(block >= 0 && block < pool->n_blocks && pool->refs[block] > 0);
  if (--pool->refs[block] == 0) pool->free_list[pool->n_free++] = block;
}

void tn_kv_seq_init(struct tn_kv_seq *s) { memset(s, 0, sizeof(*s)); }

enum tn_status tn_kv_seq_reserve(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                                 int32_t n_tokens) {
  int32_t need = (n_tokens + pool->block_size - 1) / pool->block_size;
  if (need > s->cap) {
    int32_t cap = TN_MAX(need, s->cap * 2);
    int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof(int32_t));
    if (!nb) return TN_ENOMEM;
    s->blocks = nb;
    s->cap = cap;
  }
  while (s->n_blocks < need) {
    int32_t b = tn_kv_block_acquire(pool);
    if (b < 0) return TN_EFULL;
    s->blocks[s->n_blocks++] = b;
  }
  return TN_OK;
}

void tn_kv_seq_truncate(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                        int32_t n_tokens) {
  if (n_tokens < 0) n_tokens = 0;
  int32_t keep = (n_tokens + pool->block_size - 1) / pool->block_size;
  while (s->n_blocks > keep) tn_kv_block_release(pool, s->blocks[--s->n_blocks]);
  if (s->n_tokens > n_tokens) s->n_tokens = n_tokens;
}

void tn_kv_seq_deinit(struct tn_kv_pool *pool, struct tn_kv_seq *s) {
  if (!s) return;
  if (pool) tn_kv_seq_truncate(pool, s, 0);
  free(s->blocks);
  memset(s, 0, sizeof(*s));
}
