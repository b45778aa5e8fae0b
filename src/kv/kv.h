/*
 * kv.h: the paged KV cache.
 *
 * One pool of fixed-size blocks (block_size token slots each) holds keys and
 * values for every layer, in F16:
 *
 *   k[layer][block][slot][n_kv_dim]   (same for v)
 *
 * A sequence owns an ordered list of blocks (its block table); position p
 * of the sequence lives in block table[p / block_size], slot p % block_size.
 * Blocks are reference-counted (several sequences may share a prefix block)
 * and handed out from a free list. The engine thread alone touches a pool.
 */
#ifndef TN_KV_H
#define TN_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* The pool is opaque: its free list, reference counts and prefix index
 * are kv.c's. What the forward pass needs to address the storage is the
 * layout below. */
struct tn_kv_pool;

struct tn_kv_layout {
  uint16_t *k;        /* f16, [n_layer][n_blocks][block_size][n_kv_dim] */
  uint16_t *v;
  int32_t n_layer;
  int32_t n_blocks;
  int32_t block_size; /* token slots per block */
  int32_t n_kv_dim;   /* n_head_kv * head_dim (keys and values alike) */
};

/* Bytes one block takes across all layers, K and V. */
size_t tn_kv_block_bytes(int32_t n_layer, int32_t block_size, int32_t n_kv_dim);

enum tn_status tn_kv_pool_new(int32_t n_layer, int32_t n_blocks,
                              int32_t block_size, int32_t n_kv_dim,
                              struct tn_kv_pool **out, struct tn_error *err);
void tn_kv_pool_free(struct tn_kv_pool *pool);
/* Borrowed until tn_kv_pool_free. */
const struct tn_kv_layout *tn_kv_pool_layout(const struct tn_kv_pool *pool);

/* Takes a free block (refcount 1), else evicts the least recently used
 * cached block; -1 when every block is in use. */
int32_t tn_kv_block_acquire(struct tn_kv_pool *pool);
/* Takes another reference on a block in use. */
void tn_kv_block_retain(struct tn_kv_pool *pool, int32_t block);
/* Drops one reference; the block returns to the free list at zero. */
void tn_kv_block_release(struct tn_kv_pool *pool, int32_t block);

/* Blocks a new acquire can get: free plus cached-but-unused. */
int32_t tn_kv_available(const struct tn_kv_pool *pool);
int32_t tn_kv_n_blocks(const struct tn_kv_pool *pool);
int32_t tn_kv_n_free(const struct tn_kv_pool *pool);
/* Cached blocks nobody holds (on the LRU list). */
int32_t tn_kv_n_cached(const struct tn_kv_pool *pool);
/* References on a block (0: free or cached). */
int32_t tn_kv_block_refs(const struct tn_kv_pool *pool, int32_t block);

/* ---- prefix cache
 *
 * A full block is identified by the chain hash of every token up to its
 * end: hash = H(parent hash, its block_size tokens, salt). The first
 * block's parent is the salt (adapter id, ...). Lookups compare parent and
 * tokens too, so a hash collision can never hand out the wrong block. */
uint64_t tn_kv_chain_hash(uint64_t parent, const int32_t *tokens, int32_t n);
/* The cached block for (parent, tokens[block_size]); retains it (taking it
 * off the LRU list) and returns its id, or -1. */
int32_t tn_kv_prefix_get(struct tn_kv_pool *pool, uint64_t parent,
                         const int32_t *tokens);
/* Registers a full block the caller holds under (parent, tokens); returns
 * its chain hash. A block already registered, or a chain already cached
 * under another block, is left as it is. */
uint64_t tn_kv_prefix_put(struct tn_kv_pool *pool, int32_t block,
                          uint64_t parent, const int32_t *tokens);

/* Address of layer il's key (or value) vector for a slot of a block. */
static inline uint16_t *tn_kv_k(const struct tn_kv_layout *p, int32_t il,
                                int32_t block, int32_t slot) {
  return p->k + (((size_t)il * (size_t)p->n_blocks + (size_t)block) *
                     (size_t)p->block_size +
                 (size_t)slot) *
                    (size_t)p->n_kv_dim;
}
static inline uint16_t *tn_kv_v(const struct tn_kv_layout *p, int32_t il,
                                int32_t block, int32_t slot) {
  return p->v + (((size_t)il * (size_t)p->n_blocks + (size_t)block) *
                     (size_t)p->block_size +
                 (size_t)slot) *
                    (size_t)p->n_kv_dim;
}

/* A sequence's block table, growing as it does. */
struct tn_kv_seq {
  int32_t *blocks;
  int32_t n_blocks;
  int32_t cap;
  int32_t n_tokens; /* positions filled */
};

void tn_kv_seq_init(struct tn_kv_seq *s);
/* Ensures room for n_tokens positions, acquiring blocks; TN_EFULL if the
 * pool ran dry (what was acquired stays acquired). */
enum tn_status tn_kv_seq_reserve(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                                 int32_t n_tokens);
/* Appends a block the caller holds a reference on (tn_kv_prefix_get) to the
 * table; the table now owns that reference. TN_ENOMEM (the reference is
 * dropped) when the table cannot grow. */
enum tn_status tn_kv_seq_push(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                              int32_t block);
/* Forgets positions >= n_tokens, releasing blocks no longer needed. */
void tn_kv_seq_truncate(struct tn_kv_pool *pool, struct tn_kv_seq *s,
                        int32_t n_tokens);
/* Releases every block. */
void tn_kv_seq_deinit(struct tn_kv_pool *pool, struct tn_kv_seq *s);

#endif /* TN_KV_H */
