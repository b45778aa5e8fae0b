/*
 * quants_avx512.c: AVX-512 VL + VNNI tiles for Q4_0, Q4_1 and Q8_0 weights.
 *
 * The vectors stay 256 bits wide (on Zen 4 a 512-bit op costs two 256-bit
 * ones, and our blocks are 32 bytes); what AVX-512 buys is
 *   - VNNI: _mm256_dpbusd_epi32 does u8 x s8 -> s32 accumulate in one
 *     instruction (AVX2 needs maddubs + madd), without s16 saturation;
 *   - 32 vector registers, so a 4 x 4 tile's 16 accumulators stay put.
 * dpbusd wants an unsigned left operand:
 *   Q4_1:  dpbusd(0, q, y)
 *   Q4_0:  sum((q - 8) y)   = dpbusd(-8 sum(y), q, y)
 *   Q8_0:  sum(q y)         = dpbusd(-128 sum(y), q + 128, y)
 * where the per-token corrections are computed once per block and token
 * and shared by every row of the tile (q + 128 is q ^ 0x80 as a byte).
 */
#include <immintrin.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* A tile reads its NR weight rows side by side, which to the hardware
 * prefetchers looks like NR interleaved streams; with rows over ~512 bytes
 * they stop following it and a matvec from DRAM drops from ~20 to ~4 GB/s
 * (measured on Zen 4). So the tile prefetches for itself, in plain address
 * order: during block b it touches the bytes that are b/nb of the way
 * through the region two tiles ahead (rows are contiguous, ws = row size).
 * Prefetches past the matrix end are harmless: they never fault. */
#define PREFETCH_TILE(w, ws, b, NR, BS)                                       \
  do {                                                                        \
    const char *pf_ = (const char *)(w) + 2 * (NR) * (ws) + (b) * (NR) * (BS); \
    for (int k_ = 0; k_ < ((NR) * (BS) + 63) / 64; k_++)                      \
      _mm_prefetch(pf_ + 64 * k_, _MM_HINT_T0);                               \
  } while (0)
#define MR 4
#define MT 4

ALWAYS_INLINE float h2f(tn_half h) { return _cvtsh_ss(h); }

ALWAYS_INLINE float hsum_ps(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

ALWAYS_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
  __m128i v = _mm_loadu_si128((const __m128i *)qs);
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

#define DOT_Q4_1(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)

ALWAYS_INLINE void tile_q4_1(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  /* Scales ride in vectors: ys = [dy0, sy0, dy1, sy1, ...] for the tile's
   * tokens, dm = [dx, mx] per row broadcast to [dx, mx, dx, mx, ...], so
   * one multiply gives every token's d-product (even lanes, picked out with
   * a permute) and min term (odd lanes, summed into macc[r]). */
  __m256 acc[MR][MT], macc[MR];
  for (int r = 0; r < NR; r++) {
    macc[r] = _mm256_setzero_ps();
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n / QK4_1; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q4_1));
    __m256i qy[MT];
    uint32_t ds[4] = {0, 0, 0, 0};
    for (int t = 0; t < NT; t++) {
      const struct block_q8_1 *yb = (const struct block_q8_1 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      memcpy(&ds[t], &yb->d, 4); /* d and s, adjacent halves */
    }
    __m256 ys = _mm256_cvtph_ps(_mm_setr_epi32((int)ds[0], (int)ds[1],
                                               (int)ds[2], (int)ds[3]));
    for (int r = 0; r < NR; r++) {
      const struct block_q4_1 *xb = (const struct block_q4_1 *)(w + r * ws) + b;
      __m256i qx = unpack_nibbles(xb->qs);
      uint32_t dm32;
      memcpy(&dm32, &xb->d, 4); /* d and m */
      __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm32));
      __m256 prod = _mm256_mul_ps(
          _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(dm))), ys);
      macc[r] = _mm256_add_ps(macc[r], prod);
      for (int t = 0; t < NT; t++) {
        __m256 scale =
            t == 0 ? _mm256_broadcastss_ps(_mm256_castps256_ps128(prod))
                   : _mm256_permutevar8x32_ps(prod, _mm256_set1_epi32(2 * t));
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT_Q4_1(qx, qy[t])),
                                    scale, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++) {
    float m[8];
    _mm256_storeu_ps(m, macc[r]);
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]) + m[2 * t + 1];
  }
}

/* Q4_0 (off = 8, nibbles) and Q8_0 (off = 128, bytes ^ 0x80) share one
 * shape: dpbusd(-off * sum(y), u, y). */
ALWAYS_INLINE void tile_offset(int64_t n, const uint8_t *w, size_t ws,
                               const uint8_t *q, size_t qs, float *y,
                               int64_t ldy, const int NR, const int NT,
                               const int is_q8) {
  __m256 acc[MR][MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  const __m256i off = _mm256_set1_epi8(is_q8 ? (char)0x80 : 8);
  for (int64_t b = 0; b < n / QK8_0; b++) {
    PREFETCH_TILE(w, ws, b, NR,
                  is_q8 ? (int64_t)sizeof(struct block_q8_0)
                        : (int64_t)sizeof(struct block_q4_0));
    __m256i qy[MT], corr[MT];
    float dy[MT];
    for (int t = 0; t < NT; t++) {
      const struct block_q8_0 *yb = (const struct block_q8_0 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      corr[t] = _mm256_sub_epi32(
          _mm256_setzero_si256(),
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), off, qy[t]));
      dy[t] = h2f(yb->d);
    }
    for (int r = 0; r < NR; r++) {
      __m256i qx;
      float dx;
      if (is_q8) {
        const struct block_q8_0 *xb =
            (const struct block_q8_0 *)(w + r * ws) + b;
          qx = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb->qs), off);
        dx = h2f(xb->d);
      } else {
        const struct block_q4_0 *xb =
            (const struct block_q4_0 *)(w + r * ws) + b;
          qx = unpack_nibbles(xb->qs);
        dx = h2f(xb->d);
      }
      for (int t = 0; t < NT; t++) {
        __m256i p = _mm256_dpbusd_epi32(corr[t], qx, qy[t]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                    _mm256_set1_ps(dx * dy[t]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

ALWAYS_INLINE void tile_q4_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  tile_offset(n, w, ws, q, qs, y, ldy, NR, NT, 0);
}

ALWAYS_INLINE void tile_q8_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  tile_offset(n, w, ws, q, qs, y, ldy, NR, NT, 1);
}

#define CASE(body, r, t)                                                      \
  case ((r) - 1) * MT + (t) - 1:                                              \
    body(n, w8, ws, q8, qs, y, ldy, r, t);                                    \
    break;
#define TILE_ENTRY(fn, body)                                                  \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    const uint8_t *w8 = w, *q8 = q;                                           \
    switch ((nr - 1) * MT + (nt - 1)) {                                       \
      CASE(body, 1, 1) CASE(body, 1, 2) CASE(body, 1, 3) CASE(body, 1, 4)     \
      CASE(body, 2, 1) CASE(body, 2, 2) CASE(body, 2, 3) CASE(body, 2, 4)     \
      CASE(body, 3, 1) CASE(body, 3, 2) CASE(body, 3, 3) CASE(body, 3, 4)     \
      CASE(body, 4, 1) CASE(body, 4, 2) CASE(body, 4, 3) CASE(body, 4, 4)     \
    default: break;                                                           \
    }                                                                         \
  }

TILE_ENTRY(tn_gemm_q4_0_q8_0_avx512, tile_q4_0)
TILE_ENTRY(tn_gemm_q4_1_q8_1_avx512, tile_q4_1)
TILE_ENTRY(tn_gemm_q8_0_q8_0_avx512, tile_q8_0)

void tn_vec_dot_q4_0_q8_0_avx512(int64_t n, float *s, const void *x,
                                 const void *y) {
  tile_q4_0(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q4_1_q8_1_avx512(int64_t n, float *s, const void *x,
                                 const void *y) {
  tile_q4_1(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q8_0_q8_0_avx512(int64_t n, float *s, const void *x,
                                 const void *y) {
  tile_q8_0(n, x, 0, y, 0, s, 0, 1, 1);
}
