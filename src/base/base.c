/*
 * base.c: status strings, errors, logging, clocks, hashing, files.
 */
#include "base/base.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *tn_status_str(enum tn_status st) {
  switch (st) {
#define TN_STATUS_CASE(name, val, str) \
  case TN_##name:                      \
    return str;
    TN_STATUS_MAP(TN_STATUS_CASE)
#undef TN_STATUS_CASE
  }
  return "unknown status";
}

enum tn_status tn_error_set(struct tn_error *err, enum tn_status st,
                            const char *fmt, ...) {
  if (!err) return st;
  err->status = st;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
  va_end(ap);
  return st;
}

void tn_error_clear(struct tn_error *err) {
  if (!err) return;
  err->status = TN_OK;
  err->msg[0] = '\0';
}

void tn_assert_fail(const char *expr, const char *file, int line) {
  fprintf(stderr, "tern: internal error: assertion '%s' failed at %s:%d\n",
          expr, file, line);
  abort();
}

/* ---- logging */

static enum tn_log_level log_level = TN_LOG_LEVEL_INFO;

void tn_log_set_level(enum tn_log_level level) { log_level = level; }

void tn_log(enum tn_log_level level, const char *fmt, ...) {
  static const char *names[TN_LOG_LEVEL_COUNT] = {"debug", "info", "warn",
                                                  "error"};
  if (level < log_level || level >= TN_LOG_LEVEL_COUNT) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  fprintf(stderr, "tern: %s: %s\n", names[level], buf);
}

/* ---- growable buffer */


static bool buf_reserve(struct tn_buf *b, size_t extra) {
  if (b->oom) return false;
  /* keep room for a terminating NUL */
  if (extra >= SIZE_MAX - b->len) {
    b->oom = true;
    return false;
  }
  size_t need = b->len + extra + 1;
  if (need <= b->cap) return true;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) {
    if (cap > SIZE_MAX / 2) {
      cap = need;
      break;
    }
    cap *= 2;
  }
  char *d = realloc(b->data, cap);
  if (!d) {
    b->oom = true;
    return false;
  }
  b->data = d;
  b->cap = cap;
  return true;
}

void tn_buf_append(struct tn_buf *b, const char *s, size_t n) {
  if (!buf_reserve(b, n)) return;
  if (n) memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void tn_buf_printf(struct tn_buf *b, const char *fmt, ...) {
  if (b->oom) return;
  va_list ap;
  va_start(ap, fmt);
  char small[128];
  int n = vsnprintf(small, sizeof(small), fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->oom = true;
    return;
  }
  if ((size_t)n < sizeof(small)) {
    tn_buf_append(b, small, (size_t)n);
    return;
  }
  if (!buf_reserve(b, (size_t)n)) return;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

void tn_buf_free(struct tn_buf *b) {
  if (!b) return;
  free(b->data);
  memset(b, 0, sizeof(*b));
}

/* ---- memory */

void *tn_aligned_alloc(size_t n) {
  if (n == 0) return NULL;
  void *p = NULL;
  if (posix_memalign(&p, 64, TN_ALIGN_UP(n, 64)) != 0) return NULL;
  return p;
}

void tn_aligned_free(void *p) { free(p); }

/* ---- clocks */

uint64_t tn_time_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double tn_time_s(void) { return (double)tn_time_ns() * 1e-9; }

/* ---- hashing: 64-bit FNV-1a folded through a murmur finaliser; good
 * enough for hash tables and prefix chains, not for adversaries. */

uint64_t tn_hash64(const void *data, size_t n, uint64_t seed) {
  const uint8_t *p = data;
  uint64_t h = 0xcbf29ce484222325ull ^ seed;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

/* ---- files */

enum tn_status tn_file_read(const char *path, char **out, size_t *size,
                            struct tn_error *err) {
  *out = NULL;
  *size = 0;
  FILE *f = fopen(path, "rb");
  if (!f)
    return tn_error_set(err, errno == ENOENT ? TN_ENOENT : TN_EIO,
                        "cannot open '%s': %s", path, strerror(errno));
  struct stat st;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    fclose(f);
    return tn_error_set(err, TN_EIO, "'%s' is not a regular file", path);
  }
  size_t n = (size_t)st.st_size;
  char *buf = malloc(n + 1);
  if (!buf) {
    fclose(f);
    return tn_error_set(err, TN_ENOMEM, "out of memory reading '%s'", path);
  }
  if (n && fread(buf, 1, n, f) != n) {
    free(buf);
    fclose(f);
    return tn_error_set(err, TN_EIO, "short read on '%s'", path);
  }
  fclose(f);
  buf[n] = '\0';
  *out = buf;
  *size = n;
  return TN_OK;
}

size_t tn_utf8_decode(const uint8_t *s, size_t n, uint32_t *cpt) {
  if (n == 0) return 0;
  uint8_t c = s[0];
  if (c < 0x80) {
    *cpt = c;
    return 1;
  }
  size_t need;
  uint32_t v;
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
    v = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    v = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    v = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (n < need) return 0;
  for (size_t i = 1; i < need; i++) {
    uint8_t b = s[i];
    if (i == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) return 0;
    v = (v << 6) | (b & 0x3F);
  }
  *cpt = v;
  return need;
}
