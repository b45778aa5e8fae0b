/*
 * base.h: what every tern subsystem leans on.
 *
 * Status codes and error messages, logging to stderr, checked size
 * arithmetic for untrusted counts, clocks, a bump arena, and the compute
 * thread pool that runs one parallel region per forward pass.
 */
#ifndef TN_BASE_H
#define TN_BASE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- status codes: one X-macro list gives the enum and tn_status_str() */

#define TN_STATUS_MAP(X)                                  \
  X(OK, 0, "ok")                                          \
  X(EINVAL, -1, "invalid argument")                       \
  X(ENOMEM, -2, "out of memory")                          \
  X(EIO, -3, "i/o error")                                 \
  X(ENOENT, -4, "no such file")                           \
  X(EFORMAT, -5, "malformed input")                       \
  X(EUNSUPPORTED, -6, "unsupported")                      \
  X(ERANGE, -7, "out of range")                           \
  X(EFULL, -8, "capacity exhausted")                      \
  X(ECANCELED, -9, "canceled")                            \
  X(EINTERNAL, -10, "internal error")

enum tn_status {
#define TN_STATUS_ENUM(name, val, str) TN_##name = (val),
  TN_STATUS_MAP(TN_STATUS_ENUM)
#undef TN_STATUS_ENUM
};

const char *tn_status_str(enum tn_status st);

/* A caller-owned error: the status and a message naming the bad field and
 * value. Functions that fail on input fill it; the server hands msg to the
 * client as is. */
struct tn_error {
  enum tn_status status;
  char msg[512];
};

/* Sets err (which may be NULL) and returns st, so callers can write
 * `return tn_error_set(err, TN_EFORMAT, "bad %s", x);`. */
enum tn_status tn_error_set(struct tn_error *err, enum tn_status st,
                            const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void tn_error_clear(struct tn_error *err);

/* ---- assertions: for our own bugs only, on in release builds too. */

void tn_assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));
#define TN_ASSERT(x) \
  ((x) ? (void)0 : tn_assert_fail(#x, __FILE__, __LINE__))

/* ---- logging: everything goes to stderr; stdout belongs to the CLI. */

enum tn_log_level {
  TN_LOG_LEVEL_DEBUG,
  TN_LOG_LEVEL_INFO,
  TN_LOG_LEVEL_WARN,
  TN_LOG_LEVEL_ERROR,
  TN_LOG_LEVEL_COUNT
};

void tn_log_set_level(enum tn_log_level level);
void tn_log(enum tn_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
#define tn_log_debug(...) tn_log(TN_LOG_LEVEL_DEBUG, __VA_ARGS__)
#define tn_log_info(...) tn_log(TN_LOG_LEVEL_INFO, __VA_ARGS__)
#define tn_log_warn(...) tn_log(TN_LOG_LEVEL_WARN, __VA_ARGS__)
#define tn_log_error(...) tn_log(TN_LOG_LEVEL_ERROR, __VA_ARGS__)

/* ---- checked arithmetic: true on overflow, *out undefined then. */

static inline bool tn_mul_overflow(size_t a, size_t b, size_t *out) {
  return __builtin_mul_overflow(a, b, out);
}
static inline bool tn_add_overflow(size_t a, size_t b, size_t *out) {
  return __builtin_add_overflow(a, b, out);
}

#define TN_MIN(a, b) ((a) < (b) ? (a) : (b))
#define TN_MAX(a, b) ((a) > (b) ? (a) : (b))
#define TN_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TN_ALIGN_UP(x, a) (((x) + (a)-1) / (a) * (a))

/* ---- memory */

/* Aligned allocation (64 bytes) for buffers kernels stream through; the
 * result is freed with tn_aligned_free(). Returns NULL on failure or n == 0. */
void *tn_aligned_alloc(size_t n);
void tn_aligned_free(void *p);

/* ---- clocks */

uint64_t tn_time_ns(void); /* monotonic */
double tn_time_s(void);

/* ---- hashing */

uint64_t tn_hash64(const void *data, size_t n, uint64_t seed);

/* ---- files */

/* Reads a whole file into a malloc'd buffer (NUL-terminated, *size excludes
 * the NUL). Caller frees with free(). */
enum tn_status tn_file_read(const char *path, char **out, size_t *size,
                            struct tn_error *err);

/* ---- compute thread pool
 *
 * tn_pool_run() runs fn(ctx, ith, nth) on every thread at once (the caller
 * is thread 0) and returns when all have returned. Workers spin for a short
 * while between runs before sleeping, so a run per decode step costs no
 * syscall. Inside a run, tn_pool_barrier() makes all nth threads meet; it
 * spins (kernels between barriers are microseconds long).
 */
struct tn_pool;
typedef void (*tn_pool_fn_cb)(void *ctx, int ith, int nth);

struct tn_pool *tn_pool_new(int n_threads);
void tn_pool_free(struct tn_pool *pool);
int tn_pool_size(const struct tn_pool *pool);
void tn_pool_run(struct tn_pool *pool, tn_pool_fn_cb fn, void *ctx);
void tn_pool_barrier(struct tn_pool *pool);

/* Splits [0, n) into nth nearly equal ranges and gives thread ith's. */
static inline void tn_split(int64_t n, int ith, int nth, int64_t *lo,
                            int64_t *hi) {
  int64_t per = (n + nth - 1) / nth;
  *lo = TN_MIN((int64_t)ith * per, n);
  *hi = TN_MIN(*lo + per, n);
}

/* Number of CPU cores usable by this process. */
int tn_cpu_count(void);

#endif /* TN_BASE_H */
