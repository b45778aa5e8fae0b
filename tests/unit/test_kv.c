/* test_kv.c: the KV block pool and sequence block tables. */
#include "kv/kv.h"
#include "tn_test.h"

static void test_pool_refs(void) {
  struct tn_kv_pool p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_init(&p, 2, 4, 16, 8, &err), TN_OK);
  int32_t b[4];
  for (int i = 0; i < 4; i++) {
    b[i] = tn_kv_block_acquire(&p);
    ASSERT_GE(b[i], 0);
  }
  ASSERT_EQ(tn_kv_block_acquire(&p), -1);
  tn_kv_block_retain(&p, b[1]);
  tn_kv_block_release(&p, b[1]);
  ASSERT_EQ(p.n_free, 0); /* still referenced once */
  tn_kv_block_release(&p, b[1]);
  ASSERT_EQ(p.n_free, 1);
  ASSERT_EQ(tn_kv_block_acquire(&p), b[1]);
  /* addresses of different layers/blocks/slots never overlap */
  ASSERT(tn_kv_k(&p, 1, 0, 0) == tn_kv_k(&p, 0, 0, 0) + 4 * 16 * 8);
  ASSERT(tn_kv_k(&p, 0, 1, 3) == tn_kv_k(&p, 0, 0, 0) + (16 + 3) * 8);
  tn_kv_pool_deinit(&p);
}

static void test_bad_shape(void) {
  struct tn_kv_pool p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_init(&p, 0, 4, 16, 8, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "bad shape");
  ASSERT_EQ(tn_kv_pool_init(&p, 1 << 30, 1 << 30, 1 << 30, 1 << 30, &err),
            TN_EINVAL);
}

static void test_seq(void) {
  struct tn_kv_pool p;
  struct tn_error err = {0};
  ASSERT_EQ(tn_kv_pool_init(&p, 1, 5, 4, 2, &err), TN_OK);
  struct tn_kv_seq a, b;
  tn_kv_seq_init(&a);
  tn_kv_seq_init(&b);
  ASSERT_EQ(tn_kv_seq_reserve(&p, &a, 9), TN_OK); /* 3 blocks */
  ASSERT_EQ(a.n_blocks, 3);
  ASSERT_EQ(tn_kv_seq_reserve(&p, &b, 8), TN_OK);
  ASSERT_EQ(b.n_blocks, 2);
  ASSERT_EQ(tn_kv_seq_reserve(&p, &b, 9), TN_EFULL);
  tn_kv_seq_truncate(&p, &a, 4);
  ASSERT_EQ(a.n_blocks, 1);
  ASSERT_EQ(p.n_free, 2);
  ASSERT_EQ(tn_kv_seq_reserve(&p, &b, 12), TN_OK);
  tn_kv_seq_deinit(&p, &a);
  tn_kv_seq_deinit(&p, &b);
  ASSERT_EQ(p.n_free, 5);
  tn_kv_pool_deinit(&p);
}

TN_TEST_MAIN(TN_TEST(test_pool_refs), TN_TEST(test_bad_shape), TN_TEST(test_seq))
