/* test_base.c: status strings, errors, the thread pool and its barrier. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

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

/* One pool shared by several callers (every model of a server): runs take
 * turns, each with its own thread count; every run sees exactly its nth
 * threads, each once, and its barriers. */
struct shared_run {
  struct tn_pool *pool;
  int nth;
  _Atomic int hits[8];
  _Atomic int64_t sum[8];
  _Atomic int errors;
};

static void shared_fn(void *arg, int ith, int nth) {
  struct shared_run *r = arg;
  if (nth != r->nth || ith >= nth) atomic_fetch_add(&r->errors, 1);
  atomic_fetch_add(&r->hits[ith & 7], 1);
  int64_t want = (int64_t)nth * (nth + 1) / 2;
  for (int phase = 0; phase < 8; phase++) {
    atomic_fetch_add(&r->sum[phase], ith + 1);
    tn_pool_barrier(r->pool);
    if (atomic_load(&r->sum[phase]) != want) atomic_fetch_add(&r->errors, 1);
  }
}

struct caller {
  struct tn_pool *pool;
  unsigned seed;
  int iters;
  _Atomic int *bad;
};

static void *caller_main(void *arg) {
  struct caller *c = arg;
  int size = tn_pool_size(c->pool);
  for (int it = 0; it < c->iters; it++) {
    struct shared_run r = {.pool = c->pool};
    r.nth = 1 + (int)(rand_r(&c->seed) % (unsigned)size);
    tn_pool_run_n(c->pool, r.nth, shared_fn, &r);
    int bad = atomic_load(&r.errors);
    for (int k = 0; k < 8; k++)
      bad += atomic_load(&r.hits[k]) != (k < r.nth ? 1 : 0);
    if (bad) atomic_fetch_add(c->bad, 1);
  }
  return NULL;
}

static void test_pool_shared(void) {
  int iters = getenv("TN_TEST_QUICK") ? 200 : 1000;
  for (int size = 2; size <= 4; size++) {
    struct tn_pool *pool = tn_pool_new(size);
    ASSERT(pool != NULL);
    _Atomic int bad = 0;
    pthread_t th[3];
    struct caller cs[3];
    for (int i = 0; i < 3; i++) {
      cs[i] = (struct caller){pool, (unsigned)(i * 7919 + size), iters, &bad};
      ASSERT_EQ(pthread_create(&th[i], NULL, caller_main, &cs[i]), 0);
    }
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    tn_pool_free(pool);
    ASSERT_EQ(atomic_load(&bad), 0);
  }
}

/* More threads than CPUs: the pool yields instead of spinning, and still
 * computes right (a pool of 3x the CPUs, like -t 64 on a small machine). */
static void test_pool_oversubscribed(void) {
  int n = TN_MIN(3 * tn_cpu_count_logical(), 16);
  struct tn_pool *pool = tn_pool_new(n);
  ASSERT(pool != NULL);
  for (int rep = 0; rep < 20; rep++) {
    struct pool_ctx c = {.pool = pool};
    tn_pool_run(pool, pool_fn, &c);
    ASSERT_EQ(atomic_load(&c.errors), 0);
  }
  tn_pool_free(pool);
}

static void test_cpu_count(void) {
  int phys = tn_cpu_count(), logical = tn_cpu_count_logical();
  ASSERT_GE(phys, 1);
  ASSERT_LE(phys, logical);
}

static void test_hash(void) {
  ASSERT_EQ(tn_hash64("abc", 3, 0), tn_hash64("abc", 3, 0));
  ASSERT_NE(tn_hash64("abc", 3, 0), tn_hash64("abd", 3, 0));
  ASSERT_NE(tn_hash64("abc", 3, 0), tn_hash64("abc", 3, 1));
}

TN_TEST_MAIN(TN_TEST(test_status), TN_TEST(test_checked_math),
             TN_TEST(test_split), TN_TEST(test_pool), TN_TEST(test_pool_shared),
             TN_TEST(test_pool_oversubscribed), TN_TEST(test_cpu_count),
             TN_TEST(test_hash))
