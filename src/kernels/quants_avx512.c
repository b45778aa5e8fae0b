/*
 * quants_avx512.c: AVX-512 VL + VNNI tiles for Q4_0, Q4_1, Q5_0, Q5_1 and
 * Q8_0 weights.
 *
 * The vectors stay 256 bits wide (on Zen 4 a 512-bit op costs two 256-bit
 * ones, and our blocks are 32 bytes); what AVX-512 buys is
 *   - VNNI: _mm256_dpbusd_epi32 does u8 x s8 -> s32 accumulate in one
 *     instruction (AVX2 needs maddubs + madd), without s16 saturation;
 *   - 32 vector registers, so a 4 x 4 tile's 16 accumulators stay put.
 * dpbusd wants an unsigned left operand:
 *   Q4_1:  dpbusd(0, q, y)   (two rows per vector: see tile_q4_1)
 *   Q4_0:  sum((q - 8) y)   = dpbusd(-8 sum(y), q, y)
 *   Q5_0:  sum((q - 16) y)  = dpbusd(-16 sum(y), q, y), q = nibble | bit5 << 4
 *   Q5_1:  dpbusd(0, q, y), plus the min term
 *   Q8_0:  sum(q y)         = dpbusd(-128 sum(y), q + 128, y)
 * where the per-token corrections are computed once per block and token
 * and shared by every row of the tile (q + 128 is q ^ 0x80 as a byte).
 * The s32 lanes are the same integers as the AVX2 level's maddubs + madd
 * (lane i: elements 4i..4i+3), and the float steps are the same, so for
 * Q4_0, Q5_0, Q5_1 and Q8_0 the two levels agree bit for bit.
 *
 * Batch invariance: each (row, token) output is accumulated in lanes of its
 * own and reduced by the same sequence of operations whatever the tile
 * shape around it, and every vec_dot is the 1 x 1 tile, so a token's
 * result is the same bits alone (decode) or anywhere in a batch.
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

/* Q4_1 x Q8_1, two weight rows per vector.
 *
 * Per (row, token) the result is, in exactly this float arithmetic (that of
 * llama.cpp's CPU dot for Q4_1 x Q8_1, so that our logits follow its
 * rounding and not just its maths):
 *   acc[0..7] = fma(float(i[0..7]), dx*dy, acc) per block, where lane i < 4
 *               holds the integer dot of elements 4i..4i+3 and lane 4 + i
 *               that of elements 16+4i..16+4i+3;
 *   mins      = fma(mx, sy, mins) per block;
 *   result    = ((a0+a2) + (a1+a3)) + mins, a = acc[0..3] + acc[4..7].
 * (Fusing the two nibble planes' integers first would be cheaper, but moves
 * the roundings; measured, that drifts our logits measurably further from
 * llama.cpp's.)
 *
 * The integer work is shared by two rows: a ymm holds row A's 16 bytes of
 * nibbles in its low half and row B's in its high half. ANDed with 0x0f
 * they are elements 0..15 of both rows, shifted down by 4 elements 16..31;
 * the token's quants are broadcast to both halves (y[0..15] and y[16..31],
 * pure loads), so one dpbusd per plane gives both rows' lanes: row A's low
 * plane in lanes 0..3 of one vector, its high plane in lanes 0..3 of the
 * other, row B in lanes 4..7. The scale [dA*dy x 4, dB*dy x 4] is one
 * permute of the quad's converted scales. The min terms go to one vector
 * per quad of rows (one token) or per pair (lane 2t + h for token t).
 *
 * Batch invariance: every (row, token) output lives in its own lanes and
 * goes through the same lane-wise operations and the same final sum
 * whichever half, pair or tile shape it lands in, so the result does not
 * depend on the batch; the vec_dot is the 1 x 1 tile (row A paired with
 * itself). */
#define Q41_MR 8
#define Q41_MT 4
#define DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)

ALWAYS_INLINE float hsum4(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

ALWAYS_INLINE void tile_q4_1(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  enum { NP_MAX = Q41_MR / 2, NQ_MAX = Q41_MR / 4 };
  const int NP = (NR + 1) / 2; /* row pairs; an odd last row pairs itself */
  const int NQ = (NR + 3) / 4; /* quads: scales are converted 4 rows at once */
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  /* from [dA, mA, dB, mB, dC, mC, dD, mD]: pair 0's d, pair 1's d, and
   * the mins of pair 0 / pair 1 for two tokens' [sy0, sy0, sy1, sy1] */
  const __m256i pick_d[2] = {_mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
                             _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)};
  const __m256i pick_m[2] = {_mm256_setr_epi32(1, 3, 1, 3, 1, 3, 1, 3),
                             _mm256_setr_epi32(5, 7, 5, 7, 5, 7, 5, 7)};
  const uint8_t *wr[4 * NQ_MAX];
  for (int r = 0; r < 4 * NQ; r++) wr[r] = w + (r < NR ? r : NR - 1) * ws;
  /* One token: the min terms of a quad in lanes 2i + 1 of macc1[quad];
   * several: those of a pair, lane 2t (row A) and 2t + 1 (row B). */
  __m256 acc[NP_MAX][Q41_MT][2], macc[NP_MAX], macc1[NQ_MAX];
  for (int k = 0; k < NQ; k++) macc1[k] = _mm256_setzero_ps();
  for (int p = 0; p < NP; p++) {
    macc[p] = _mm256_setzero_ps();
    for (int t = 0; t < NT; t++)
      acc[p][t][0] = acc[p][t][1] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n / QK4_1; b++) {
    /* the first tile of a row group streams its rows from memory: fetch
     * ahead (also for 2-4 tokens: verify steps and small batches read
     * every row once, and without it ran DRAM-latency-bound at half
     * speed; the tiles after it find the rows in L1, where the prefetches
     * cost little, measured) */
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q4_1));
    __m256i ylo[Q41_MT], yhi[Q41_MT];
    __m256 dy[Q41_MT];
    float sy[Q41_MT] = {0};
    for (int t = 0; t < NT; t++) {
      const struct block_q8_1 *yb = (const struct block_q8_1 *)(q + t * qs) + b;
      ylo[t] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yb->qs));
      yhi[t] = _mm256_broadcastsi128_si256(
          _mm_loadu_si128((const __m128i *)(yb->qs + 16)));
      dy[t] = _mm256_set1_ps(h2f(yb->d));
      sy[t] = h2f(yb->s);
    }
    const __m256 sy2 = NT == 1 ? _mm256_setr_ps(0, sy[0], 0, sy[0], 0, sy[0], 0, sy[0])
                               : _mm256_setr_ps(sy[0], sy[0], sy[1], sy[1], sy[2],
                                                sy[2], sy[3], sy[3]);
    for (int k = 0; k < NQ; k++) {
      uint32_t u[4];
      for (int i = 0; i < 4; i++) /* d and m of row 4k + i */
        memcpy(&u[i], &((const struct block_q4_1 *)wr[4 * k + i] + b)->d, 4);
      __m128i dm4 = _mm_cvtsi32_si128((int)u[0]);
      dm4 = _mm_insert_epi32(dm4, (int)u[1], 1);
      dm4 = _mm_insert_epi32(dm4, (int)u[2], 2);
      dm4 = _mm_insert_epi32(dm4, (int)u[3], 3);
      const __m256 dm8 = _mm256_cvtph_ps(dm4); /* [dA, mA, dB, mB, ...] */
      __m256 s8 = _mm256_setzero_ps();
      if (NT == 1) {
        macc1[k] = _mm256_fmadd_ps(dm8, sy2, macc1[k]);
        s8 = _mm256_mul_ps(dm8, dy[0]);
      }
      for (int h = 0; h < 2 && 2 * k + h < NP; h++) {
        const int p = 2 * k + h;
        const struct block_q4_1 *xa = (const struct block_q4_1 *)wr[2 * p] + b;
        const struct block_q4_1 *xb = (const struct block_q4_1 *)wr[2 * p + 1] + b;
        const __m256i raw = _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)xa->qs),
                                              _mm_loadu_si128((const __m128i *)xb->qs));
        const __m256i qlo = _mm256_and_si256(raw, low4);
        const __m256i qhi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        if (NT == 1) {
          const __m256 sc = _mm256_permutevar8x32_ps(s8, pick_d[h]);
          acc[p][0][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qlo, ylo[0])), sc,
                                         acc[p][0][0]);
          acc[p][0][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qhi, yhi[0])), sc,
                                         acc[p][0][1]);
        } else {
          const __m256 dx = _mm256_permutevar8x32_ps(dm8, pick_d[h]);
          macc[p] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dm8, pick_m[h]), sy2,
                                    macc[p]);
          for (int t = 0; t < NT; t++) {
            const __m256 sc = _mm256_mul_ps(dx, dy[t]);
            acc[p][t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qlo, ylo[t])), sc,
                                           acc[p][t][0]);
            acc[p][t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qhi, yhi[t])), sc,
                                           acc[p][t][1]);
          }
        }
      }
    }
  }
  float m1[NQ_MAX * 8];
  for (int k = 0; k < NQ; k++) _mm256_storeu_ps(m1 + 8 * k, macc1[k]);
  for (int p = 0; p < NP; p++) {
    float m[8];
    _mm256_storeu_ps(m, macc[p]);
    for (int t = 0; t < NT; t++) {
      for (int h = 0; h < 2 && 2 * p + h < NR; h++) {
        const int r = 2 * p + h;
        /* lanes i (elements 4i..4i+3) + lanes 4 + i (16 + 4i..): the
         * order of llama.cpp's hsum_float_8 */
        const __m256 lohi = _mm256_add_ps(acc[p][t][1], acc[p][t][0]);
        const __m128 a = h ? _mm256_extractf128_ps(lohi, 1)
                           : _mm256_castps256_ps128(lohi);
        const float mins = NT == 1 ? m1[8 * (r / 4) + 2 * (r % 4) + 1]
                                   : m[2 * t + h];
        y[t * ldy + r] = hsum4(a) + mins;
      }
    }
  }
}

/* Q4_0 (off = 8, nibbles), Q5_0 (off = 16, nibble | fifth bit << 4) and
 * Q8_0 (off = 128, bytes ^ 0x80) share one shape: dpbusd(-off * sum(y), u, y). */
enum { OFF_Q4_0, OFF_Q5_0, OFF_Q8_0 };

/* element i's fifth bit is bit i of qh: 0x10 in the bytes whose bit is set */
ALWAYS_INLINE __m256i unpack_q5(const uint8_t qs[16], const uint8_t qh[4]) {
  uint32_t bits;
  memcpy(&bits, qh, 4);
  return _mm256_or_si256(unpack_nibbles(qs),
                         _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10)));
}

ALWAYS_INLINE void tile_offset(int64_t n, const uint8_t *w, size_t ws,
                               const uint8_t *q, size_t qs, float *y,
                               int64_t ldy, const int NR, const int NT,
                               const int kind) {
  const int is_q8 = kind == OFF_Q8_0;
  const int64_t xsize = kind == OFF_Q8_0   ? (int64_t)sizeof(struct block_q8_0)
                        : kind == OFF_Q5_0 ? (int64_t)sizeof(struct block_q5_0)
                                           : (int64_t)sizeof(struct block_q4_0);
  __m256 acc[MR][MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  const __m256i off = _mm256_set1_epi8(is_q8 ? (char)0x80
                                       : kind == OFF_Q5_0 ? 16 : 8);
  for (int64_t b = 0; b < n / QK8_0; b++) {
    PREFETCH_TILE(w, ws, b, NR, xsize);
    __m256i qy[MT], corr[MT];
    __m256 dy[MT];
    for (int t = 0; t < NT; t++) {
      const struct block_q8_0 *yb = (const struct block_q8_0 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      corr[t] = _mm256_sub_epi32(
          _mm256_setzero_si256(),
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), off, qy[t]));
      dy[t] = _mm256_set1_ps(h2f(yb->d));
    }
    for (int r = 0; r < NR; r++) {
      __m256i qx;
      float dx;
      if (is_q8) {
        const struct block_q8_0 *xb =
            (const struct block_q8_0 *)(w + r * ws) + b;
        qx = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb->qs), off);
        dx = h2f(xb->d);
      } else if (kind == OFF_Q5_0) {
        const struct block_q5_0 *xb =
            (const struct block_q5_0 *)(w + r * ws) + b;
        qx = unpack_q5(xb->qs, xb->qh);
        dx = h2f(xb->d);
      } else {
        const struct block_q4_0 *xb =
            (const struct block_q4_0 *)(w + r * ws) + b;
        qx = unpack_nibbles(xb->qs);
        dx = h2f(xb->d);
      }
      /* dx * dy as a vector product: the same IEEE product in every
       * lane as the scalar one, without a broadcast per (row, token) */
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256i p = _mm256_dpbusd_epi32(corr[t], qx, qy[t]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                    _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

ALWAYS_INLINE void tile_q4_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  tile_offset(n, w, ws, q, qs, y, ldy, NR, NT, OFF_Q4_0);
}

ALWAYS_INLINE void tile_q5_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  tile_offset(n, w, ws, q, qs, y, ldy, NR, NT, OFF_Q5_0);
}

/* Q5_1 x Q8_1: the arithmetic of quants_avx2.c's tile_q5_1. Per
 * (row, token): acc = fma(float(lanes), dx * dy, acc), mins = fma(mx, sy,
 * mins), result = hsum(acc) + mins; the mins of token t for all rows are
 * the lanes of one vector (lane r: row r). */
ALWAYS_INLINE void tile_q5_1(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  __m256 acc[MR][MT];
  __m128 macc[MT];
  for (int t = 0; t < NT; t++) {
    macc[t] = _mm_setzero_ps();
    for (int r = 0; r < NR; r++) acc[r][t] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n / QK5_1; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q5_1));
    __m256i qy[MT];
    __m256 dy[MT]; /* dy broadcast: dx * dy is then one vector product */
    uint16_t mh[4] = {0};
    for (int r = 0; r < NR; r++)
      mh[r] = ((const struct block_q5_1 *)(w + r * ws) + b)->m;
    const __m128 mx = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)mh));
    for (int t = 0; t < NT; t++) {
      const struct block_q8_1 *yb = (const struct block_q8_1 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      dy[t] = _mm256_set1_ps(h2f(yb->d));
      macc[t] = _mm_fmadd_ps(mx, _mm_set1_ps(h2f(yb->s)), macc[t]);
    }
    for (int r = 0; r < NR; r++) {
      const struct block_q5_1 *xb = (const struct block_q5_1 *)(w + r * ws) + b;
      const __m256i qx = unpack_q5(xb->qs, xb->qh);
      const float dx = h2f(xb->d);
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256 p = _mm256_cvtepi32_ps(DOT(qx, qy[t]));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int t = 0; t < NT; t++) {
    float m[4];
    _mm_storeu_ps(m, macc[t]);
    for (int r = 0; r < NR; r++) y[t * ldy + r] = hsum_ps(acc[r][t]) + m[r];
  }
}

ALWAYS_INLINE void tile_q8_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  tile_offset(n, w, ws, q, qs, y, ldy, NR, NT, OFF_Q8_0);
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
#define CASE41(r, t)                                                          \
  case ((r) - 1) * Q41_MT + (t) - 1:                                          \
    tile_q4_1(n, w8, ws, q8, qs, y, ldy, r, t);                               \
    break;
#define CASE41_R(r) CASE41(r, 1) CASE41(r, 2) CASE41(r, 3) CASE41(r, 4)

void tn_gemm_q4_1_q8_1_avx512(int64_t n, const void *w, size_t ws,
                              const void *q, size_t qs, float *y, int64_t ldy,
                              int nr, int nt) {
  const uint8_t *w8 = w, *q8 = q;
  switch ((nr - 1) * Q41_MT + (nt - 1)) {
    CASE41_R(1) CASE41_R(2) CASE41_R(3) CASE41_R(4)
    CASE41_R(5) CASE41_R(6) CASE41_R(7) CASE41_R(8)
  default: break;
  }
}
TILE_ENTRY(tn_gemm_q8_0_q8_0_avx512, tile_q8_0)
TILE_ENTRY(tn_gemm_q5_0_q8_0_avx512, tile_q5_0)
TILE_ENTRY(tn_gemm_q5_1_q8_1_avx512, tile_q5_1)

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

void tn_vec_dot_q5_0_q8_0_avx512(int64_t n, float *s, const void *x,
                                 const void *y) {
  tile_q5_0(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q5_1_q8_1_avx512(int64_t n, float *s, const void *x,
                                 const void *y) {
  tile_q5_1(n, x, 0, y, 0, s, 0, 1, 1);
}
