/*
 * base.h: what every tern subsystem leans on.
 *
 * Status codes and error messages, logging to stderr, checked size
 * arithmetic for untrusted counts, aligned allocation, clocks, hashing,
 * whole-file reads, CPU counts, and the compute thread pool that runs one
 * parallel region per forward pass.
 */
#ifndef TN_BASE_H
#define TN_BASE_H

#include <pthread.h>
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
  X(EINTERNAL, -10, "internal error")                    \
  X(EEXIST, -11, "already exists")

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

/* A growable byte buffer; oom is sticky (appends after a failure do
 * nothing), so a render can check once at the end. */
struct tn_buf {
  char *data;
  size_t len, cap;
  bool oom;
};
void tn_buf_append(struct tn_buf *b, const char *s, size_t n);
void tn_buf_printf(struct tn_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void tn_buf_free(struct tn_buf *b);

/* ---- UTF-8 */

/* Strict decode of one character at s (n bytes left): returns its length
 * and sets *cpt, or 0 if invalid (overlong, surrogate, past U+10FFFF) or
 * incomplete. */
size_t tn_utf8_decode(const uint8_t *s, size_t n, uint32_t *cpt);

/* ---- clocks */

uint64_t tn_time_ns(void); /* monotonic */
double tn_time_s(void);

/* ---- hashing */

uint64_t tn_hash64(const void *data, size_t n, uint64_t seed);

/* SHA-256 (FIPS 180-4, sha256.c), for checking downloads: init, update any
 * number of times, final (which wipes the state). tn_sha256_hex writes 64
 * lowercase hex digits and a NUL. */
#define TN_SHA256_SIZE 32
struct tn_sha256 {
  uint32_t h[8];
  uint64_t n_bytes;
  uint8_t buf[64];
  size_t n_buf;
};
void tn_sha256_init(struct tn_sha256 *s);
void tn_sha256_update(struct tn_sha256 *s, const void *data, size_t n);
void tn_sha256_final(struct tn_sha256 *s, uint8_t out[TN_SHA256_SIZE]);
void tn_sha256_hex(const uint8_t digest[TN_SHA256_SIZE],
                   char out[2 * TN_SHA256_SIZE + 1]);

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
 *
 * Any number of threads may call tn_pool_run()/tn_pool_run_n() on one pool
 * (every model of a server shares one): runs take turns in arrival order.
 * A pool with more threads than the process has CPUs yields at barriers
 * instead of spinning.
 */
#define TN_POOL_THREADS_MAX 256
struct tn_pool;
typedef void (*tn_pool_fn_cb)(void *ctx, int ith, int nth);

/* 1..TN_POOL_THREADS_MAX threads (clamped); NULL when they cannot start. */
struct tn_pool *tn_pool_new(int n_threads);
void tn_pool_free(struct tn_pool *pool);
int tn_pool_size(const struct tn_pool *pool);
void tn_pool_run(struct tn_pool *pool, tn_pool_fn_cb fn, void *ctx);
/* The same with nth threads (1..size; others sit the run out). */
void tn_pool_run_n(struct tn_pool *pool, int nth, tn_pool_fn_cb fn,
                   void *ctx);
void tn_pool_barrier(struct tn_pool *pool);
/* Live (foreground) requests outstanding on any engine of the pool: an
 * engine adds one per live request submitted and takes it back when the
 * request is done. Background work (shadow replays) runs only while this
 * is 0, so it never takes the cores from a live request for longer than
 * one of its own steps. */
void tn_pool_live_add(struct tn_pool *pool, int d);
int tn_pool_live(const struct tn_pool *pool);
/* Sleeps until the live count is no longer seen, or timeout_s passed;
 * returns the count. (An engine holding only background work waits here
 * instead of polling: a thread waking every millisecond would take turns
 * on the cores the live steps' spinning workers need.) */
int tn_pool_live_wait(struct tn_pool *pool, int seen, double timeout_s);

/* Splits [0, n) into nth nearly equal ranges and gives thread ith's. */
static inline void tn_split(int64_t n, int ith, int nth, int64_t *lo,
                            int64_t *hi) {
  int64_t per = (n + nth - 1) / nth;
  *lo = TN_MIN((int64_t)ith * per, n);
  *hi = TN_MIN(*lo + per, n);
}

/* ---- threads */

/* pthread_create with the asynchronous signals (SIGINT, SIGTERM, ...)
 * blocked in the new thread, so they reach the thread that waits for them
 * (a CLI blocked in read(), a server's main loop), never a worker. */
int tn_thread_create(pthread_t *t, void *(*fn)(void *), void *arg);

/* ---- CPUs */

/* Physical cores this process may use: the CPUs of its affinity mask
 * counted once per core (hyper-threads share one), capped by a cgroup CPU
 * quota (cgroup v2 cpu.max or v1 cfs_quota_us). At least 1. Compute
 * threads beyond it wait on each other. */
int tn_cpu_count(void);
/* Logical CPUs of the affinity mask, capped by the cgroup quota. */
int tn_cpu_count_logical(void);

#endif /* TN_BASE_H */
