/*
 * tn_test.h: the few assertions our unit tests need (after libuv's
 * test/task.h). A failed check prints both values and the place, counts a
 * failure, and the test function returns; TN_TEST_MAIN runs every listed
 * test and exits non-zero if any failed.
 *
 * Skips: a case that cannot run here (a model or fixture file that is not
 * present, a CPU feature this machine lacks, a tool not installed) calls
 * TN_SKIP("why", ...) and returns; its line reads "skip <name>: why". A
 * helper that does one part of a case (one model of several) calls
 * tn_test_skip("why", ...) when its part cannot run and tn_test_ran() when
 * it can: a case that skipped something is reported skipped only if no
 * part of it ran; otherwise it passes, its line saying what it skipped. A
 * failure always wins. TN_TEST_MAIN prints "N passed, N failed, N
 * skipped" and exits 1 if any case failed, 77 (TN_TEST_SKIP_CODE) if every
 * case skipped, else 0: ctest, told SKIP_RETURN_CODE 77, then shows an
 * executable that could test nothing here as skipped, not passed.
 */
#ifndef TN_TEST_H
#define TN_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tn_test_failures;
static int tn_test_skips;           /* tn_test_skip calls in this case */
static int tn_test_parts_ran;       /* tn_test_ran calls in this case */
static char tn_test_skip_why[256];  /* the first skip's reason */

/* Exit status of an executable whose every case skipped. */
#define TN_TEST_SKIP_CODE 77

/* Records that the running case (or the part of it a helper does) cannot
 * run here, and why; the helper then returns something its caller turns
 * into an early return. */
static inline __attribute__((format(printf, 1, 2))) void tn_test_skip(
    const char *fmt, ...) {
  if (tn_test_skips++ == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tn_test_skip_why, sizeof(tn_test_skip_why), fmt, ap);
    va_end(ap);
  }
}

/* A part of the running case could run (see tn_test_skip). */
static inline void tn_test_ran(void) { tn_test_parts_ran++; }

/* Skips the rest of the test function. */
#define TN_SKIP(...)           \
  do {                         \
    tn_test_skip(__VA_ARGS__); \
    return;                    \
  } while (0)

/* Counts a failure without returning: for helpers that return a value. */
#define TN_FAIL_NORETURN(...)                                  \
  do {                                                         \
    fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);            \
    fprintf(stderr, __VA_ARGS__);                              \
    fputc('\n', stderr);                                       \
    tn_test_failures++;                                        \
  } while (0)

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
  int failed = 0, skipped = 0;
  for (size_t i = 0; i < n; i++) {
    int before = tn_test_failures;
    tn_test_skips = 0;
    tn_test_parts_ran = 0;
    tn_test_skip_why[0] = '\0';
    cases[i].fn();
    char more[32] = "";
    if (tn_test_skips > 1)
      snprintf(more, sizeof(more), " (and %d more)", tn_test_skips - 1);
    if (tn_test_failures != before) {
      failed++;
      printf("FAIL %s\n", cases[i].name);
    } else if (tn_test_skips > 0 && tn_test_parts_ran == 0) {
      skipped++;
      printf("skip %s: %s%s\n", cases[i].name, tn_test_skip_why, more);
    } else if (tn_test_skips > 0) {
      printf("ok   %s (skipped part: %s%s)\n", cases[i].name,
             tn_test_skip_why, more);
    } else {
      printf("ok   %s\n", cases[i].name);
    }
  }
  int passed = (int)n - failed - skipped;
  printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  if (failed) return 1;
  if (skipped > 0 && passed == 0) return TN_TEST_SKIP_CODE;
  return 0;
}

#define TN_TEST_MAIN(...)                                                 \
  int main(void) {                                                        \
    static const struct tn_test_case cases_[] = {__VA_ARGS__};            \
    return tn_test_run(cases_, sizeof(cases_) / sizeof(cases_[0]));       \
  }

#endif /* TN_TEST_H */
