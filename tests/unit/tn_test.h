/*
 * tn_test.h: the few assertions our unit tests need (after libuv's
 * test/task.h). A failed check prints both values and the place, counts a
 * failure, and the test function returns; TN_TEST_MAIN runs every listed
 * test and exits non-zero if any failed.
 */
#ifndef TN_TEST_H
#define TN_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tn_test_failures;

#define TN_FAIL_(...)                                          \
  do {                                                         \
    fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);            \
    fprintf(stderr, __VA_ARGS__);                              \
    fputc('\n', stderr);                                       \
    tn_test_failures++;                                        \
    return;                                                    \
  } while (0)

#define ASSERT(x)                                              \
  do {                                                         \
    if (!(x)) TN_FAIL_("assertion failed: %s", #x);            \
  } while (0)

#define ASSERT_INT_OP_(a, op, b)                                          \
  do {                                                                    \
    int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                         \
    if (!(a_ op b_))                                                      \
      TN_FAIL_("%s %s %s: %" PRId64 " vs %" PRId64, #a, #op, #b, a_, b_); \
  } while (0)
#define ASSERT_EQ(a, b) ASSERT_INT_OP_(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_INT_OP_(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_INT_OP_(a, <, b)
#define ASSERT_LE(a, b) ASSERT_INT_OP_(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_INT_OP_(a, >, b)
#define ASSERT_GE(a, b) ASSERT_INT_OP_(a, >=, b)

#define ASSERT_NEAR(a, b, tol)                                       \
  do {                                                               \
    double a_ = (double)(a), b_ = (double)(b), t_ = (double)(tol);   \
    if (!(fabs(a_ - b_) <= t_))                                      \
      TN_FAIL_("%s ~= %s: %.9g vs %.9g (tol %.3g)", #a, #b, a_, b_, t_); \
  } while (0)

#define ASSERT_STR_EQ(a, b)                                          \
  do {                                                               \
    const char *a_ = (a), *b_ = (b);                                 \
    if (!a_ || !b_ || strcmp(a_, b_) != 0)                           \
      TN_FAIL_("%s == %s: \"%s\" vs \"%s\"", #a, #b, a_ ? a_ : "(null)", \
               b_ ? b_ : "(null)");                                  \
  } while (0)

#define ASSERT_SUBSTR(hay, needle)                                   \
  do {                                                               \
    const char *h_ = (hay), *n_ = (needle);                          \
    if (!h_ || !strstr(h_, n_))                                      \
      TN_FAIL_("\"%s\" does not contain \"%s\"", h_ ? h_ : "(null)", n_); \
  } while (0)

typedef void (*tn_test_fn)(void);
struct tn_test_case {
  const char *name;
  tn_test_fn fn;
};
#define TN_TEST(fn) {#fn, fn}

static inline int tn_test_run(const struct tn_test_case *cases, size_t n) {
  int failed = 0;
  for (size_t i = 0; i < n; i++) {
    int before = tn_test_failures;
    cases[i].fn();
    int ok = tn_test_failures == before;
    failed += !ok;
    printf("%s %s\n", ok ? "ok  " : "FAIL", cases[i].name);
  }
  printf("%zu passed, %d failed\n", n - (size_t)failed, failed);
  return failed ? 1 : 0;
}

#define TN_TEST_MAIN(...)                                                 \
  int main(void) {                                                        \
    static const struct tn_test_case cases_[] = {__VA_ARGS__};            \
    return tn_test_run(cases_, sizeof(cases_) / sizeof(cases_[0]));       \
  }

#endif /* TN_TEST_H */
