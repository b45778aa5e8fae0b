/*
 * sha256.c: SHA-256 (FIPS 180-4), for checking what `tern pull` downloads.
 *
 * Two levels, as for kernels: a portable compression function (about
 * 250 MB/s at -O3) and one on the x86 SHA extensions (SHA-NI, several
 * times faster), chosen once at run time by CPUID and checked against the
 * portable one in tests/unit/test_sha256.c. A model is hashed when
 * written and on every "already present" check, and its wheels as they
 * download, so the speed shows on gigabyte files.
 *
 * Input is buffered into 64-byte blocks; whole blocks are compressed
 * straight from the caller's buffer.
 */
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHANI 1
#endif

#include "base/base.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t ror(uint32_t x, int n) {
  return (x >> n) | (x << (32 - n));
}

static inline uint32_t load_be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
         (uint32_t)p[3];
}

static inline void store_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

/* Compresses n_blocks 64-byte blocks into h. */
static void compress_portable(uint32_t h[8], const uint8_t *p,
                              size_t n_blocks) {
  for (; n_blocks; n_blocks--, p += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) w[i] = load_be32(p + 4 * i);
    for (int i = 16; i < 64; i++) {
      uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    uint32_t e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
      uint32_t S1 = ror(e, 6) ^ ror(e, 11) ^ ror(e, 25);
      uint32_t ch = (e & f) ^ (~e & g);
      uint32_t t1 = hh + S1 + ch + K[i] + w[i];
      uint32_t S0 = ror(a, 2) ^ ror(a, 13) ^ ror(a, 22);
      uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      uint32_t t2 = S0 + maj;
      hh = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
  }
}

#ifdef HAVE_SHANI
/* The same with SHA-NI: 4 rounds per group, the state kept as ABEF/CDGH
 * as sha256rnds2 wants it, the message schedule in four registers that
 * rotate (after Intel's and Jeffrey Walton's public-domain versions). */
__attribute__((target("sha,sse4.1,ssse3"))) static void compress_shani(
    uint32_t h[8], const uint8_t *p, size_t n_blocks) {
  const __m128i bswap =
      _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  __m128i tmp = _mm_loadu_si128((const __m128i *)&h[0]);
  __m128i st1 = _mm_loadu_si128((const __m128i *)&h[4]);
  tmp = _mm_shuffle_epi32(tmp, 0xB1);        /* CDAB */
  st1 = _mm_shuffle_epi32(st1, 0x1B);        /* EFGH */
  __m128i st0 = _mm_alignr_epi8(tmp, st1, 8); /* ABEF */
  st1 = _mm_blend_epi16(st1, tmp, 0xF0);      /* CDGH */
  for (; n_blocks; n_blocks--, p += 64) {
    __m128i abef = st0, cdgh = st1;
    __m128i w[4];
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
      if (g < 4)
        w[g] = _mm_shuffle_epi8(
            _mm_loadu_si128((const __m128i *)(p + 16 * g)), bswap);
      __m128i msg =
          _mm_add_epi32(w[g % 4], _mm_loadu_si128((const __m128i *)&K[4 * g]));
      st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
      if (g >= 3 && g <= 14) { /* finish the next group's words */
        __m128i t = _mm_alignr_epi8(w[g % 4], w[(g + 3) % 4], 4);
        w[(g + 1) % 4] = _mm_add_epi32(w[(g + 1) % 4], t);
        w[(g + 1) % 4] = _mm_sha256msg2_epu32(w[(g + 1) % 4], w[g % 4]);
      }
      msg = _mm_shuffle_epi32(msg, 0x0E);
      st0 = _mm_sha256rnds2_epu32(st0, st1, msg);
      if (g >= 1 && g <= 12) /* start the words of group g + 3 */
        w[(g + 3) % 4] = _mm_sha256msg1_epu32(w[(g + 3) % 4], w[g % 4]);
    }
    st0 = _mm_add_epi32(st0, abef);
    st1 = _mm_add_epi32(st1, cdgh);
  }
  tmp = _mm_shuffle_epi32(st0, 0x1B);  /* FEBA */
  st1 = _mm_shuffle_epi32(st1, 0xB1);  /* DCHG */
  st0 = _mm_blend_epi16(tmp, st1, 0xF0); /* DCBA */
  st1 = _mm_alignr_epi8(st1, tmp, 8);    /* ABEF */
  _mm_storeu_si128((__m128i *)&h[0], st0);
  _mm_storeu_si128((__m128i *)&h[4], st1);
}

static bool cpu_has_shani(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  bool ssse3 = c & bit_SSSE3, sse41 = c & bit_SSE4_1;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ssse3 && sse41 && (b & (1u << 29)); /* CPUID.7.0:EBX.SHA */
}
#endif

typedef void (*compress_fn)(uint32_t h[8], const uint8_t *p, size_t n_blocks);

/* Chosen on first use; a race only stores the same pointer twice. */
static compress_fn compress_best(void) {
  static _Atomic(compress_fn) fn;
  compress_fn f = fn;
  if (f) return f;
  f = compress_portable;
#ifdef HAVE_SHANI
  if (cpu_has_shani()) f = compress_shani;
#endif
  fn = f;
  return f;
}

static void compress(uint32_t h[8], const uint8_t *p, size_t n_blocks) {
  if (n_blocks) compress_best()(h, p, n_blocks);
}

void tn_sha256_init(struct tn_sha256 *s) {
  static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372,
                                 0xa54ff53a, 0x510e527f, 0x9b05688c,
                                 0x1f83d9ab, 0x5be0cd19};
  memcpy(s->h, h0, sizeof(h0));
  s->n_bytes = 0;
  s->n_buf = 0;
}

void tn_sha256_update(struct tn_sha256 *s, const void *data, size_t n) {
  const uint8_t *p = data;
  s->n_bytes += n;
  if (s->n_buf) {
    size_t take = TN_MIN(n, 64 - s->n_buf);
    memcpy(s->buf + s->n_buf, p, take);
    s->n_buf += take;
    p += take;
    n -= take;
    if (s->n_buf < 64) return;
    compress(s->h, s->buf, 1);
    s->n_buf = 0;
  }
  compress(s->h, p, n / 64);
  p += n / 64 * 64;
  n %= 64;
  memcpy(s->buf, p, n);
  s->n_buf = n;
}

void tn_sha256_final(struct tn_sha256 *s, uint8_t out[TN_SHA256_SIZE]) {
  uint64_t n_bits = s->n_bytes * 8;
  /* 0x80, zeros up to 56 mod 64, then the 64-bit big-endian bit count. */
  s->buf[s->n_buf++] = 0x80;
  if (s->n_buf > 56) {
    memset(s->buf + s->n_buf, 0, 64 - s->n_buf);
    compress(s->h, s->buf, 1);
    s->n_buf = 0;
  }
  memset(s->buf + s->n_buf, 0, 56 - s->n_buf);
  store_be32(s->buf + 56, (uint32_t)(n_bits >> 32));
  store_be32(s->buf + 60, (uint32_t)n_bits);
  compress(s->h, s->buf, 1);
  for (int i = 0; i < 8; i++) store_be32(out + 4 * i, s->h[i]);
  memset(s, 0, sizeof(*s));
}

void tn_sha256_hex(const uint8_t digest[TN_SHA256_SIZE],
                   char out[2 * TN_SHA256_SIZE + 1]) {
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < TN_SHA256_SIZE; i++) {
    out[2 * i] = hex[digest[i] >> 4];
    out[2 * i + 1] = hex[digest[i] & 15];
  }
  out[2 * TN_SHA256_SIZE] = '\0';
}
