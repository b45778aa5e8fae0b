/* test_base.c: status strings, errors, the thread pool and its barrier. */
#include <stdatomic.h>

#include "base/base.h"
#include "tn_test.h"

static void test_status(void) {
  ASSERT_STR_EQ(tn_status_str(TN_OK), "ok");
  ASSERT_STR_EQ(tn_status_str(TN_EFORMAT), "malformed input");
  struct tn_error e = {0};
  ASSERT_EQ(tn_error_set(&e, TN_EINVAL, "bad %s %d", "x", 3), TN_EINVAL);
  ASSERT_STR_EQ(e.msg, "bad x 3");
  ASSERT_EQ(tn_error_set(NULL, TN_ERANGE, "ignored"), TN_ERANGE);
  tn_error_clear(&e);
  ASSERT_EQ(e.status, TN_OK);
}

static void test_checked_math(void) {
  size_t r;
  ASSERT(tn_mul_overflow(SIZE_MAX / 2 + 1, 2, &r));
  ASSERT(!tn_mul_overflow(1000, 1000, &r));
  ASSERT_EQ(r, 1000000);
  ASSERT(tn_add_overflow(SIZE_MAX, 1, &r));
}

static void test_split(void) {
  for (int nth = 1; nth <= 7; nth++)
    for (int64_t n = 0; n < 40; n++) {
      int64_t covered = 0, prev_hi = 0;
      for (int ith = 0; ith < nth; ith++) {
        int64_t lo, hi;
        tn_split(n, ith, nth, &lo, &hi);
        ASSERT_EQ(lo, prev_hi);
        ASSERT_LE(lo, hi);
        covered += hi - lo;
        prev_hi = hi;
      }
      ASSERT_EQ(covered, n);
    }
}

/* Every thread adds its ith in phases; after each barrier all threads
 * must see the whole previous phase's sum. */
struct pool_ctx {
  struct tn_pool *pool;
  _Atomic int64_t sum[64];
  _Atomic int errors;
};

static void pool_fn(void *arg, int ith, int nth) {
  struct pool_ctx *c = arg;
  int64_t want = (int64_t)nth * (nth - 1) / 2 + nth;
  for (int phase = 0; phase < 64; phase++) {
    atomic_fetch_add(&c->sum[phase], ith + 1);
    tn_pool_barrier(c->pool);
    if (atomic_load(&c->sum[phase]) != want) atomic_fetch_add(&c->errors, 1);
  }
}

static void test_pool(void) {
  for (int n = 1; n <= 4; n++) {
    struct tn_pool *pool = tn_pool_new(n);
    ASSERT(pool != NULL);
    ASSERT_EQ(tn_pool_size(pool), n);
    for (int rep = 0; rep < 50; rep++) {
      struct pool_ctx c = {.pool = pool};
      tn_pool_run(pool, pool_fn, &c);
      ASSERT_EQ(atomic_load(&c.errors), 0);
      for (int p = 0; p < 64; p++)
        ASSERT_EQ(atomic_load(&c.sum[p]), (int64_t)n * (n + 1) / 2);
    }
    tn_pool_free(pool);
  }
  tn_pool_free(NULL);
}

static void test_hash(void) {
  ASSERT_EQ(tn_hash64("abc", 3, 0), tn_hash64("abc", 3, 0));
  ASSERT_NE(tn_hash64("abc", 3, 0), tn_hash64("abd", 3, 0));
  ASSERT_NE(tn_hash64("abc", 3, 0), tn_hash64("abc", 3, 1));
}

TN_TEST_MAIN(TN_TEST(test_status), TN_TEST(test_checked_math),
             TN_TEST(test_split), TN_TEST(test_pool), TN_TEST(test_hash))
