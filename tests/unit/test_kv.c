/* test_kv.c: the KV block pool and sequence block tables. */
#include "kv/kv.h"
#include "tn_test.h"

static void test_pool_refs(void) {
  struct tn_kv_pool *p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_new(2, 4, 16, 8, &p, &err), TN_OK);
  int32_t b[4];
  for (int i = 0; i < 4; i++) {
    b[i] = tn_kv_block_acquire(p);
    ASSERT_GE(b[i], 0);
  }
  ASSERT_EQ(tn_kv_block_acquire(p), -1);
  tn_kv_block_retain(p, b[1]);
  tn_kv_block_release(p, b[1]);
  ASSERT_EQ(tn_kv_n_free(p), 0); /* still referenced once */
  tn_kv_block_release(p, b[1]);
  ASSERT_EQ(tn_kv_n_free(p), 1);
  ASSERT_EQ(tn_kv_block_acquire(p), b[1]);
  /* addresses of different layers/blocks/slots never overlap */
  const struct tn_kv_layout *l = tn_kv_pool_layout(p);
  ASSERT(tn_kv_k(l, 1, 0, 0) == tn_kv_k(l, 0, 0, 0) + 4 * 16 * 8);
  ASSERT(tn_kv_k(l, 0, 1, 3) == tn_kv_k(l, 0, 0, 0) + (16 + 3) * 8);
  tn_kv_pool_free(p);
}

static void test_bad_shape(void) {
  struct tn_kv_pool *p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_new(0, 4, 16, 8, &p, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "bad shape");
  ASSERT_EQ(tn_kv_pool_new(1 << 30, 1 << 30, 1 << 30, 1 << 30, &p, &err),
            TN_EINVAL);
}

static void test_seq(void) {
  struct tn_kv_pool *p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_new(1, 5, 4, 2, &p, &err), TN_OK);
  struct tn_kv_seq a, b;
  tn_kv_seq_init(&a);
  tn_kv_seq_init(&b);
  ASSERT_EQ(tn_kv_seq_reserve(p, &a, 9), TN_OK); /* 3 blocks */
  ASSERT_EQ(a.n_blocks, 3);
  ASSERT_EQ(tn_kv_seq_reserve(p, &b, 8), TN_OK);
  ASSERT_EQ(b.n_blocks, 2);
  ASSERT_EQ(tn_kv_seq_reserve(p, &b, 9), TN_EFULL);
  tn_kv_seq_truncate(p, &a, 4);
  ASSERT_EQ(a.n_blocks, 1);
  ASSERT_EQ(tn_kv_n_free(p), 2);
  ASSERT_EQ(tn_kv_seq_reserve(p, &b, 12), TN_OK);
  tn_kv_seq_deinit(p, &a);
  tn_kv_seq_deinit(p, &b);
  ASSERT_EQ(tn_kv_n_free(p), 5);
  tn_kv_pool_free(p);
}

/* Full blocks registered under a chain hash are found again by the same
 * prefix, survive their last release on the LRU list, and are evicted
 * oldest first when acquire runs out of free blocks. */
static void test_prefix_cache(void) {
  struct tn_kv_pool *p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_new(1, 4, 4, 2, &p, &err), TN_OK);
  int32_t t0[4] = {1, 2, 3, 4}, t1[4] = {5, 6, 7, 8}, t2[4] = {1, 2, 3, 5};
  int32_t a = tn_kv_block_acquire(p), b = tn_kv_block_acquire(p);
  uint64_t ha = tn_kv_prefix_put(p, a, 0, t0);
  uint64_t hb = tn_kv_prefix_put(p, b, ha, t1);
  ASSERT(ha != hb);
  ASSERT_EQ(ha, tn_kv_chain_hash(0, t0, 4));
  /* Same chain: found (and retained); other tokens or parent: not. */
  ASSERT_EQ(tn_kv_prefix_get(p, 0, t0), a);
  ASSERT_EQ(tn_kv_block_refs(p, a), 2);
  ASSERT_EQ(tn_kv_prefix_get(p, 0, t2), -1);
  ASSERT_EQ(tn_kv_prefix_get(p, 0, t1), -1); /* t1 only after t0 */
  ASSERT_EQ(tn_kv_prefix_get(p, ha, t1), b);
  /* Released to zero: cached, not free; still found. */
  tn_kv_block_release(p, a);
  tn_kv_block_release(p, a);
  tn_kv_block_release(p, b);
  tn_kv_block_release(p, b);
  ASSERT_EQ(tn_kv_n_free(p), 2);
  ASSERT_EQ(tn_kv_n_cached(p), 2);
  ASSERT_EQ(tn_kv_available(p), 4);
  ASSERT_EQ(tn_kv_prefix_get(p, ha, t1), b);
  ASSERT_EQ(tn_kv_n_cached(p), 1);
  tn_kv_block_release(p, b); /* b is now the most recently used */
  /* Two free blocks go first, then a (least recently used), then b. */
  int32_t c = tn_kv_block_acquire(p), d = tn_kv_block_acquire(p);
  ASSERT(c != a && c != b && d != a && d != b);
  ASSERT_EQ(tn_kv_block_acquire(p), a);
  ASSERT_EQ(tn_kv_prefix_get(p, 0, t0), -1); /* evicted: forgotten */
  ASSERT_EQ(tn_kv_prefix_get(p, ha, t1), b);
  ASSERT_EQ(tn_kv_block_acquire(p), -1);   /* all four held */
  tn_kv_pool_free(p);
}

/* Many blocks through the index: inserts, lookups and evictions keep it
 * consistent (backward-shift deletion). */
static void test_prefix_churn(void) {
  struct tn_kv_pool *p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_new(1, 64, 2, 1, &p, &err), TN_OK);
  for (int32_t round = 0; round < 2000; round++) {
    int32_t b = tn_kv_block_acquire(p);
    ASSERT_GE(b, 0);
    int32_t t[2] = {round, round * 7};
    tn_kv_prefix_put(p, b, (uint64_t)round % 5, t);
    tn_kv_block_release(p, b);
    /* The last 64 are cached; the one before them is gone. */
    ASSERT_EQ(tn_kv_prefix_get(p, (uint64_t)round % 5, t), b);
    tn_kv_block_release(p, b);
    if (round >= 64) {
      int32_t o[2] = {round - 64, (round - 64) * 7};
      ASSERT_EQ(tn_kv_prefix_get(p, (uint64_t)(round - 64) % 5, o), -1);
    }
  }
  /* The last 64 are all still there. */
  for (int32_t round = 2000 - 64; round < 2000; round++) {
    int32_t o[2] = {round, round * 7};
    ASSERT_GE(tn_kv_prefix_get(p, (uint64_t)round % 5, o), 0);
  }
  tn_kv_pool_free(p);
}

TN_TEST_MAIN(TN_TEST(test_pool_refs), TN_TEST(test_bad_shape), TN_TEST(test_seq),
             TN_TEST(test_prefix_cache), TN_TEST(test_prefix_churn))
