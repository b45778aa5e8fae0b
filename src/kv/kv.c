/*
 * kv.c: block pool and per-sequence block tables (see kv.h).
 */
#include "kv/kv.h"

#include <stdlib.h>
#include <string.h>

struct tn_kv_meta {
  uint64_t hash;           /* chain hash; valid when cached */
  uint64_t parent;         /* hash of the block before (0 for the first) */
  int32_t lru_prev, lru_next;
  bool cached;             /* in the index */
};

struct tn_kv_pool {
  struct tn_kv_layout lay; /* storage, what forward addresses */
  int32_t n_layer;
  int32_t n_blocks;
  int32_t block_size;
  int32_t n_kv_dim;
  int32_t *refs;      /* [n_blocks] */
  int32_t *free_list; /* stack of free block ids */
  int32_t n_free;
  /* Prefix cache: full blocks registered under a hash chain stay cached
   * when their last reference goes, on an LRU list, until acquire needs
   * them. */
  struct tn_kv_meta *meta; /* [n_blocks] */
  int32_t *index;          /* open addressing: block id or -1 */
  uint32_t index_mask;
  int32_t lru_head, lru_tail; /* oldest first; -1 when empty */
  int32_t n_lru;
  int32_t *tokens;         /* [n_blocks][block_size] of cached blocks */
};

size_t tn_kv_block_bytes(int32_t n_layer, int32_t block_size,
                         int32_t n_kv_dim) {
  return 2u * (size_t)n_layer * (size_t)block_size * (size_t)n_kv_dim *
         sizeof(uint16_t);
}

enum tn_status tn_kv_pool_new(int32_t n_layer, int32_t n_blocks,
                              int32_t block_size, int32_t n_kv_dim,
                              struct tn_kv_pool **out, struct tn_error *err) {
  *out = NULL;
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
  struct tn_kv_pool *pool = calloc(1, sizeof(*pool));
  if (!pool) return tn_error_set(err, TN_ENOMEM, "kv cache: out of memory");
  pool->n_layer = n_layer;
  pool->n_blocks = n_blocks;
  pool->block_size = block_size;
  pool->n_kv_dim = n_kv_dim;
  pool->lay.k = tn_aligned_alloc(n);
  pool->lay.v = tn_aligned_alloc(n);
  pool->lay.n_layer = n_layer;
  pool->lay.n_blocks = n_blocks;
  pool->lay.block_size = block_size;
  pool->lay.n_kv_dim = n_kv_dim;
  pool->refs = calloc((size_t)n_blocks, sizeof(int32_t));
  pool->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
  uint32_t slots = 16;
  while (slots < 2u * (uint32_t)n_blocks) slots *= 2;
  pool->index = malloc((size_t)slots * sizeof(int32_t));
  pool->index_mask = slots - 1;
  pool->meta = calloc((size_t)n_blocks, sizeof(*pool->meta));
  pool->tokens = malloc((size_t)n_blocks * (size_t)block_size * sizeof(int32_t));
  if (!pool->lay.k || !pool->lay.v || !pool->refs || !pool->free_list ||
      !pool->index || !pool->meta || !pool->tokens) {
    tn_kv_pool_free(pool);
    return tn_error_set(err, TN_ENOMEM,
                        "kv cache: cannot allocate %zu MiB for %d blocks",
                        2 * n >> 20, n_blocks);
  }
  /* Hand out low block ids first. */
  for (int32_t i = 0; i < n_blocks; i++) pool->free_list[i] = n_blocks - 1 - i;
  pool->n_free = n_blocks;
  for (uint32_t i = 0; i < slots; i++) pool->index[i] = -1;
  pool->lru_head = pool->lru_tail = -1;
  *out = pool;
  return TN_OK;
}

void tn_kv_pool_free(struct tn_kv_pool *pool) {
  if (!pool) return;
  tn_aligned_free(pool->lay.k);
  tn_aligned_free(pool->lay.v);
  free(pool->refs);
  free(pool->free_list);
  free(pool->index);
  free(pool->meta);
  free(pool->tokens);
  free(pool);
}

const struct tn_kv_layout *tn_kv_pool_layout(const struct tn_kv_pool *pool) {
  return &pool->lay;
}

int32_t tn_kv_available(const struct tn_kv_pool *p) {
  return p->n_free + p->n_lru;
}
int32_t tn_kv_n_blocks(const struct tn_kv_pool *p) { return p->n_blocks; }
int32_t tn_kv_n_free(const struct tn_kv_pool *p) { return p->n_free; }
int32_t tn_kv_n_cached(const struct tn_kv_pool *p) { return p->n_lru; }
int32_t tn_kv_block_refs(const struct tn_kv_pool *p, int32_t block) {
  TN_ASSERT(block >= 0 && block < p->n_blocks);
  return p->refs[block];
}

/* ---- LRU list of cached blocks nobody holds */

static void lru_unlink(struct tn_kv_pool *p, int32_t b) {
  struct tn_kv_meta *m = &p->meta[b];
  if (m->lru_prev >= 0) p->meta[m->lru_prev].lru_next = m->lru_next;
  else p->lru_head = m->lru_next;
  if (m->lru_next >= 0) p->meta[m->lru_next].lru_prev = m->lru_prev;
  else p->lru_tail = m->lru_prev;
  m->lru_prev = m->lru_next = -1;
  p->n_lru--;
}

static void lru_push(struct tn_kv_pool *p, int32_t b) {
  struct tn_kv_meta *m = &p->meta[b];
  m->lru_prev = p->lru_tail;
  m->lru_next = -1;
  if (p->lru_tail >= 0) p->meta[p->lru_tail].lru_next = b;
  else p->lru_head = b;
  p->lru_tail = b;
  p->n_lru++;
}

/* ---- the index: linear probing, backward-shift deletion */

static uint32_t index_home(const struct tn_kv_pool *p, uint64_t h) {
  return (uint32_t)(h ^ (h >> 29)) & p->index_mask;
}

static void index_remove(struct tn_kv_pool *p, int32_t b) {
  uint32_t i = index_home(p, p->meta[b].hash);
  while (p->index[i] != b) {
    TN_ASSERT(p->index[i] >= 0);
    i = (i + 1) & p->index_mask;
  }
  /* Shift later members of the cluster back into the hole. */
  uint32_t hole = i;
  for (uint32_t j = (i + 1) & p->index_mask; p->index[j] >= 0;
       j = (j + 1) & p->index_mask) {
    uint32_t home = index_home(p, p->meta[p->index[j]].hash);
    /* j's entry may move to hole if home is not in (hole, j]. */
    bool stays = hole <= j ? (home > hole && home <= j)
                           : (home > hole || home <= j);
    if (!stays) {
      p->index[hole] = p->index[j];
      hole = j;
    }
  }
  p->index[hole] = -1;
  p->meta[b].cached = false;
}

static void block_uncache(struct tn_kv_pool *p, int32_t b) {
  if (p->meta[b].cached) index_remove(p, b);
}

uint64_t tn_kv_chain_hash(uint64_t parent, const int32_t *tokens, int32_t n) {
  uint64_t h = parent ^ 0x9e3779b97f4a7c15ull;
  for (int32_t i = 0; i < n; i++) {
    h ^= (uint32_t)tokens[i];
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
  }
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 31;
  return h ? h : 1;
}

static int32_t index_find(const struct tn_kv_pool *p, uint64_t parent,
                          uint64_t h, const int32_t *tokens) {
  size_t bs = (size_t)p->block_size;
  for (uint32_t i = index_home(p, h); p->index[i] >= 0;
       i = (i + 1) & p->index_mask) {
    int32_t b = p->index[i];
    const struct tn_kv_meta *m = &p->meta[b];
    if (m->hash == h && m->parent == parent &&
        memcmp(p->tokens + (size_t)b * bs, tokens, bs * sizeof(int32_t)) == 0)
      return b;
  }
  return -1;
}

int32_t tn_kv_prefix_get(struct tn_kv_pool *pool, uint64_t parent,
                         const int32_t *tokens) {
  uint64_t h = tn_kv_chain_hash(parent, tokens, pool->block_size);
  int32_t b = index_find(pool, parent, h, tokens);
  if (b < 0) return -1;
  if (pool->refs[b] == 0) lru_unlink(pool, b);
  pool->refs[b]++;
  return b;
}

uint64_t tn_kv_prefix_put(struct tn_kv_pool *pool, int32_t block,
                          uint64_t parent, const int32_t *tokens) {
  TN_ASSERT(block >= 0 && block < pool->n_blocks && pool->refs[block] > 0);
  uint64_t h = tn_kv_chain_hash(parent, tokens, pool->block_size);
  struct tn_kv_meta *m = &pool->meta[block];
  if (m->cached || index_find(pool, parent, h, tokens) >= 0) return h;
  size_t bs = (size_t)pool->block_size;
  memcpy(pool->tokens + (size_t)block * bs, tokens, bs * sizeof(int32_t));
  m->hash = h;
  m->parent = parent;
  m->cached = true;
  uint32_t i = index_home(pool, h);
  while (pool->index[i] >= 0) i = (i + 1) & pool->index_mask;
  pool->index[i] = block;
  return h;
}

int32_t tn_kv_block_acquire(struct tn_kv_pool *pool) {
  int32_t b;
  if (pool->n_free > 0) {
    b = pool->free_list[--pool->n_free];
  } else if (pool->lru_head >= 0) {
    b = pool->lru_head;
    lru_unlink(pool, b);
    block_uncache(pool, b);
  } else {
    return -1;
  }
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
  if (--pool->refs[block] > 0) return;
  if (pool->meta[block].cached) lru_push(pool, block);
  else pool->free_list[pool->n_free++] = block;
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

enum tn_status tn_kv_seq_push(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                              int32_t block) {
  if (s->n_blocks == s->cap) {
    int32_t cap = s->cap ? s->cap * 2 : 8;
    int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof(int32_t));
    if (!nb) {
      tn_kv_block_release(pool, block);
      return TN_ENOMEM;
    }
    s->blocks = nb;
    s->cap = cap;
  }
  s->blocks[s->n_blocks++] = block;
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
