/*
 * quants_k_avx512.c: AVX-512 (F/BW/VL + VNNI) dot products of Q4_K, Q5_K
 * and Q6_K against Q8_K. Same integer arithmetic as quants_k_avx2.c, a
 * whole 256-element super-block in four 64-byte registers:
 *
 *   _mm512_maddubs_epi16   weights' unsigned levels x Q8_K quants, adjacent
 *                          pairs summed to int16 (cannot saturate: <= 2*63*127)
 *   _mm512_dpwssd_epi32    (VNNI) times the per-sub-block scale, broadcast
 *                          to int16 lanes by _mm512_permutexvar_epi16, and
 *                          accumulated in int32 in one instruction.
 *
 * Q4_K/Q5_K's 64 bytes of qs hold four sub-blocks: the low nibbles are
 * sub-blocks 2c and 2c+2, the high nibbles 2c+1 and 2c+3. The weights are
 * put back in element order (_mm512_shuffle_i64x2 of the low and high
 * nibble vectors) so that the Q8_K quants are read straight from memory.
 * Q6_K's low nibbles of ql already come out in element order, 64 at a time.
 *
 * Batch invariance: every kernel here is one always-inline tile of NR
 * weight rows x NT tokens; the plain dot product is its 1 x 1 instance, and
 * each (row, token) output goes through its own accumulators with the same
 * operations whatever the tile shape. So a token's result never depends on
 * the batch it is computed in (tests/unit/test_kernels.c checks the bits).
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "base/base.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants_k_internal.h"

static inline float fp16(uint16_t h) {
  return _cvtsh_ss(h);
}

/* The four totals of a0..a3 (int32 lanes each), as one vector. */
static inline __m128i hsum4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* tn_hsum8's order */
static inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

/* Index vector for _mm512_permutexvar_epi16: int16 lanes 0..15 take source
 * lane a, lanes 16..31 take lane b. */
static inline __m512i pick2(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)a)),
                            _mm256_set1_epi16((short)b), 1);
}

/* Bytes 0..31 = a, bytes 32..63 = b. */
static inline __m512i halves8(char a, char b) {
  return _mm512_inserti64x4(_mm512_set1_epi8(a), _mm256_set1_epi8(b), 1);
}

/* Eight 6-bit scales (sc) and mins (mn) of a Q4_K/Q5_K block. */
static inline void unpack_scales(const uint8_t *q, uint8_t sc[8], uint8_t mn[8]) {
  uint32_t u[3], o[4];
  memcpy(u, q, sizeof(u));
  o[0] = u[0] & 0x3f3f3f3fu;
  o[1] = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
  o[2] = u[1] & 0x3f3f3f3fu;
  o[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
  memcpy(sc, o, 8);
  memcpy(mn, o + 2, 8);
}

/* mn[j] duplicated into int16 lanes 2j and 2j+1, for madd with bsums:
 * sum_j mn[j] * (bsums[2j] + bsums[2j+1]) as 8 int32 lanes. */
static inline __m256i mins16(const uint8_t mn[8]) {
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                    7, 7);
  __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
  return _mm256_cvtepu8_epi16(_mm_shuffle_epi8(m8, dup));
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Decode streams the weights from memory once per token; with 16 rows
 * read side by side the hardware prefetcher falls behind (4-5 GB/s of the
 * machine's ~25 on a 233 MB matrix). So each block read also asks for the
 * same block 16 rows on, the next group's, into L2: ~20 GB/s. Prefetches
 * past the matrix's end do not fault. */
ALWAYS_INLINE void prefetch_l2(const uint8_t *p, size_t bytes) {
  const uintptr_t first = (uintptr_t)p & ~(uintptr_t)63;
  const uintptr_t last = ((uintptr_t)p + bytes - 1) & ~(uintptr_t)63;
  for (uintptr_t a = first; a <= last; a += 64)
    _mm_prefetch((const char *)a, _MM_HINT_T1);
}
#define K_MR 2
#define K_MT 4

/* Q4_K (with_qh = 0) and Q5_K (1): an NR x NT tile.
 * y[t*ldy + r] = dot(row r, token t). */
ALWAYS_INLINE void tile_q45(int64_t n, const uint8_t *w, size_t ws,
                            const uint8_t *q, size_t qs, float *y, int64_t ldy,
                            const int NR, const int NT, const int with_qh) {
  const size_t xsize = with_qh ? sizeof(struct block_q5_K)
                               : sizeof(struct block_q4_K);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i bit5 = _mm512_set1_epi8(0x10);
  /* chunk c (elements 64c..64c+63) = sub-blocks 2c (int16 lanes 0..15 of
   * the scale vector) and 2c+1 (lanes 16..31) */
  const __m512i idx[4] = {pick2(0, 1), pick2(2, 3), pick2(4, 5), pick2(6, 7)};
  /* the fifth bit of element 32j + l is bit j of qh[l] */
  const __m512i hb[4] = {halves8(0x01, 0x02), halves8(0x04, 0x08),
                          halves8(0x10, 0x20), halves8(0x40, (char)0x80)};
  /* per row, one lane per token: the fused sums of the blocks' integer
   * totals (quants_k.c gives the order; each lane is that scalar fmaf) */
  __m128 acc[K_MR], accm[K_MR];
  for (int r = 0; r < NR; r++) acc[r] = accm[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const struct block_q8_K *yb[K_MT];
    float yd[K_MT] = {0};
    for (int t = 0; t < NT; t++) {
      yb[t] = (const struct block_q8_K *)(q + t * qs) + b;
      yd[t] = yb[t]->d;
    }
    const __m128 yd4 = _mm_loadu_ps(yd);
    for (int r = 0; r < NR; r++) {
      const uint8_t *xb = w + r * ws + (size_t)b * xsize;
      /* Q4_K and Q5_K share d, dmin, scales at the front; qs is at the end */
      const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
      const uint8_t *qsx = xb + xsize - QK_K / 2;
      uint8_t sc[8], mn[8];
      unpack_scales(x4->scales, sc, mn);
      const float d = fp16(x4->d), dmin = fp16(x4->dmin);
      const __m512i sc16 = _mm512_zextsi128_si512(
          _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
      const __m256i m16 = mins16(mn);

      const __m512i w0 = _mm512_loadu_si512(qsx);
      const __m512i w1 = _mm512_loadu_si512(qsx + 64);
      const __m512i l0 = _mm512_and_si512(w0, low4);
      const __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), low4);
      const __m512i l1 = _mm512_and_si512(w1, low4);
      const __m512i h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), low4);
      __m512i wv[4];
      wv[0] = _mm512_shuffle_i64x2(l0, h0, 0x44); /* sub-blocks 0, 1 */
      wv[1] = _mm512_shuffle_i64x2(l0, h0, 0xee); /* 2, 3 */
      wv[2] = _mm512_shuffle_i64x2(l1, h1, 0x44); /* 4, 5 */
      wv[3] = _mm512_shuffle_i64x2(l1, h1, 0xee); /* 6, 7 */
      if (with_qh) {
        const struct block_q5_K *x5 = (const struct block_q5_K *)xb;
        const __m512i qh = _mm512_broadcast_i64x4(
            _mm256_loadu_si256((const __m256i *)x5->qh));
        for (int c = 0; c < 4; c++)
          wv[c] = _mm512_mask_add_epi8(wv[c], _mm512_test_epi8_mask(qh, hb[c]),
                                       wv[c], bit5);
      }
      __m512i scv[4];
      for (int c = 0; c < 4; c++) scv[c] = _mm512_permutexvar_epi16(idx[c], sc16);
      __m256i s8[K_MT], m8[K_MT];
      for (int t = 0; t < K_MT; t++) s8[t] = m8[t] = _mm256_setzero_si256();
      for (int t = 0; t < NT; t++) {
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
          __m512i p = _mm512_maddubs_epi16(wv[c],
                                           _mm512_loadu_si512(yb[t]->qs + 64 * c));
          sumi = _mm512_dpwssd_epi32(sumi, p, scv[c]);
        }
        s8[t] = _mm256_add_epi32(_mm512_castsi512_si256(sumi),
                                 _mm512_extracti64x4_epi64(sumi, 1));
        m8[t] = _mm256_madd_epi16(m16, _mm256_loadu_si256((const __m256i *)yb[t]->bsums));
      }
      const __m128i s4 = hsum4_epi32(s8[0], s8[1], s8[2], s8[3]);
      const __m128i m4 = hsum4_epi32(m8[0], m8[1], m8[2], m8[3]);
      acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), _mm_mul_ps(_mm_set1_ps(d), yd4), acc[r]);
      accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(m4), _mm_mul_ps(_mm_set1_ps(dmin), yd4),
                             accm[r]);
    }
  }
  for (int r = 0; r < NR; r++) {
    float o[4];
    _mm_storeu_ps(o, _mm_sub_ps(acc[r], accm[r]));
    for (int t = 0; t < NT; t++) y[t * ldy + r] = o[t];
  }
}

ALWAYS_INLINE void tile_q4_K(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y, int64_t ldy,
                             const int NR, const int NT) {
  tile_q45(n, w, ws, q, qs, y, ldy, NR, NT, 0);
}

ALWAYS_INLINE void tile_q5_K(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y, int64_t ldy,
                             const int NR, const int NT) {
  tile_q45(n, w, ws, q, qs, y, ldy, NR, NT, 1);
}

ALWAYS_INLINE void tile_q6_K_pf(int64_t n, const uint8_t *w, size_t ws,
                                const uint8_t *q, size_t qs, float *y,
                                int64_t ldy, const int NR, const int NT,
                                size_t pf) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  /* For a half's ql = [l0 | l1] (32 bytes each): low nibbles are groups 0
   * and 1, whose top bits sit at qh bits 0-1 and 2-3; high nibbles groups 2
   * and 3, at bits 4-5 and 6-7. Mask, then shift to bits 4-5 per 256-bit
   * half. */
  const __m512i mlo = halves8(0x03, 0x0c);
  const __m512i mhi = halves8(0x30, (char)0xc0);
  const __m512i shl_lo = _mm512_inserti64x4(_mm512_set1_epi16(4),
                                            _mm256_set1_epi16(2), 1);
  const __m512i shr_hi = _mm512_inserti64x4(_mm512_set1_epi16(0),
                                            _mm256_set1_epi16(2), 1);
  /* Chunk c of 64 elements = int16 lanes of four sub-blocks 4c..4c+3,
   * eight lanes each. */
  __m512i idx[4];
  for (int c = 0; c < 4; c++) {
    __m128i v = _mm_set1_epi16((short)(4 * c));
    idx[c] = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(
            _mm_add_epi16(v, _mm_set1_epi16(1)), v)),
        _mm256_set_m128i(_mm_add_epi16(v, _mm_set1_epi16(3)),
                         _mm_add_epi16(v, _mm_set1_epi16(2))),
        1);
  }
  /* eight float lanes per (row, token), as quants_k.c orders them */
  __m256 acc[K_MR][K_MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const struct block_q8_K *yb[K_MT];
    for (int t = 0; t < NT; t++)
      yb[t] = (const struct block_q8_K *)(q + t * qs) + b;
    for (int r = 0; r < NR; r++) {
      const struct block_q6_K *x = (const struct block_q6_K *)(w + r * ws) + b;
      if (pf) prefetch_l2((const uint8_t *)x + pf, sizeof(*x));
      const float d = fp16(x->d);
      const __m256i sc16s = _mm256_cvtepi8_epi16(
          _mm_loadu_si128((const __m128i *)x->scales));
      const __m512i sc16 = _mm512_zextsi256_si512(sc16s);
      const __m512i qh2 = _mm512_loadu_si512(x->qh);
      __m512i qv[4], scv[4];
      for (int h = 0; h < 2; h++) {
        const __m512i ql = _mm512_loadu_si512(x->ql + 64 * h);
        const __m512i qh = h ? _mm512_shuffle_i64x2(qh2, qh2, 0xee)
                             : _mm512_shuffle_i64x2(qh2, qh2, 0x44);
        qv[2 * h] = _mm512_or_si512(
            _mm512_and_si512(ql, low4),
            _mm512_sllv_epi16(_mm512_and_si512(qh, mlo), shl_lo));
        qv[2 * h + 1] = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
            _mm512_srlv_epi16(_mm512_and_si512(qh, mhi), shr_hi));
      }
      for (int c = 0; c < 4; c++) scv[c] = _mm512_permutexvar_epi16(idx[c], sc16);
      for (int t = 0; t < NT; t++) {
        /* The offset of 32: 32 * sum_j scales[j] * bsums[j]. */
        const __m256i off = _mm256_madd_epi16(
            sc16s, _mm256_loadu_si256((const __m256i *)yb[t]->bsums));
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
          __m512i p = _mm512_maddubs_epi16(qv[c],
                                           _mm512_loadu_si512(yb[t]->qs + 64 * c));
          sumi = _mm512_dpwssd_epi32(sumi, p, scv[c]);
        }
        /* int32 lane m holds bytes 4m..4m+3 of each 64-byte chunk: lanes
         * m and m + 8 together are lane m of the 32-byte order; then the
         * offset. */
        const __m256i s8 = _mm256_sub_epi32(
            _mm256_add_epi32(_mm512_castsi512_si256(sumi),
                             _mm512_extracti64x4_epi64(sumi, 1)),
            _mm256_slli_epi32(off, 5));
        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(yb[t]->d * d),
                                    _mm256_cvtepi32_ps(s8), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum8(acc[r][t]);
}

ALWAYS_INLINE void tile_q6_K(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y, int64_t ldy,
                             const int NR, const int NT) {
  tile_q6_K_pf(n, w, ws, q, qs, y, ldy, NR, NT, 0);
}

/* ---- decode: 16 weight rows x 1 token, the rows in the lanes
 *
 * For one token the tile above spends most of its time reducing each
 * row's 16 int32 lanes to the block's two integer totals (s and m) and on
 * per-row scalar steps. Here 16 rows go together: their totals are exact
 * integers whatever the order they are summed in, so the 16 vectors are
 * reduced at once by a transpose-and-add tree into one vector with row r
 * in lane r, and the float steps then run on 16 rows in one instruction,
 * lane for lane the tile's: acc = fma(float(s), d * yd, acc), accm
 * likewise with dmin, y = acc - accm. Same bits as the tile (and so as
 * vec_dot), 2-3x faster. The token's Q8_K quants are loaded in the
 * weights' nibble order instead of shuffling the weights into element
 * order: once per block instead of once per row. */

/* 16 vectors of 16 int32 lanes -> one vector, lane r = total of v[r]. */
ALWAYS_INLINE __m512i reduce16_epi32(__m512i v[16]) {
  __m512i x[8], y[4];
  for (int k = 0; k < 8; k++) /* per 128-bit lane: rows 2k, 2k+1, 2k, 2k+1 */
    x[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]),
                            _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; k++) /* per 128-bit lane: rows 4k .. 4k+3 */
    y[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * k], x[2 * k + 1]),
                            _mm512_unpackhi_epi64(x[2 * k], x[2 * k + 1]));
  /* fold the four 128-bit lanes: [a.L0+a.L1, a.L2+a.L3, b.L0+b.L1, ...] */
  __m512i z0 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[0], y[1], 0x88),
                                _mm512_shuffle_i32x4(y[0], y[1], 0xdd));
  __m512i z1 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2], y[3], 0x88),
                                _mm512_shuffle_i32x4(y[2], y[3], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(z0, z1, 0x88),
                          _mm512_shuffle_i32x4(z0, z1, 0xdd));
}

#define G_MT 4 /* tokens per gemv16 call at most */

ALWAYS_INLINE void gemv16_q45(int64_t n, const uint8_t *w, size_t ws,
                              const uint8_t *q, size_t qs, float *y,
                              int64_t ldy, const int NT, const int with_qh) {
  const size_t xsize = with_qh ? sizeof(struct block_q5_K)
                               : sizeof(struct block_q4_K);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i bit5 = _mm512_set1_epi8(0x10);
  /* Weight vector c holds sub-blocks (0, 2), (1, 3), (4, 6), (5, 7): the
   * low or high nibbles of qs[0..63] or qs[64..127]. */
  const __m512i idx[4] = {pick2(0, 2), pick2(1, 3), pick2(4, 6), pick2(5, 7)};
  /* the fifth bit of element 32j + l is bit j of qh[l] */
  const __m512i hb[4] = {halves8(0x01, 0x04), halves8(0x02, 0x08),
                          halves8(0x10, 0x40), halves8(0x20, (char)0x80)};
  /* 16 rows' mins (8 bytes each, row-major) to four vectors of int16
   * pairs: vector i, int32 lane r = (mins[r][2i], mins[r][2i+1]) */
  const __m512i tr_lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0,
                                          0, 0, 0, 0, 0, 0);
  __m512 acc[G_MT], accm[G_MT];
  for (int t = 0; t < NT; t++) acc[t] = accm[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    /* each token's quants in the weights' nibble order, and its sums of
     * 32 quants (one per sub-block) as int16 pairs for the mins */
    __m512i yv[G_MT][4];
    __m512i bp[G_MT][4];
    for (int t = 0; t < NT; t++) {
      const struct block_q8_K *yb = (const struct block_q8_K *)(q + t * qs) + b;
      const __m256i *yq = (const __m256i *)yb->qs;
      for (int c = 0; c < 4; c++) {
        const int s0 = (c >> 1) * 4 + (c & 1); /* 32-byte pieces s0, s0 + 2 */
        yv[t][c] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(yq + s0)),
            _mm256_loadu_si256(yq + s0 + 2), 1);
      }
      /* bsums pairs -> 8 int16 sub-block sums; int32 word i = sub-blocks
       * 2i, 2i + 1 (each |sum| <= 32 * 128: fits) */
      const __m256i b16 = _mm256_loadu_si256((const __m256i *)yb->bsums);
      const __m128i s32 = _mm_packs_epi32(
          _mm256_castsi256_si128(_mm256_madd_epi16(b16, _mm256_set1_epi16(1))),
          _mm256_extracti128_si256(
              _mm256_madd_epi16(b16, _mm256_set1_epi16(1)), 1));
      bp[t][0] = _mm512_broadcastd_epi32(s32);
      bp[t][1] = _mm512_broadcastd_epi32(_mm_srli_si128(s32, 4));
      bp[t][2] = _mm512_broadcastd_epi32(_mm_srli_si128(s32, 8));
      bp[t][3] = _mm512_broadcastd_epi32(_mm_srli_si128(s32, 12));
    }
    uint32_t dd[16];
    uint8_t mins[16][8];
    __m512i sv[G_MT][16];
    for (int r = 0; r < 16; r++) {
      const uint8_t *xb = w + r * ws + (size_t)b * xsize;
      const uint8_t *qsx = xb + xsize - QK_K / 2;
      memcpy(&dd[r], xb, sizeof(dd[r])); /* d, dmin */
      prefetch_l2(xb + 16 * ws, xsize);
      uint8_t sc[8];
      unpack_scales(((const struct block_q4_K *)xb)->scales, sc, mins[r]);
      const __m512i sc16 = _mm512_zextsi128_si512(
          _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
      const __m512i w0 = _mm512_loadu_si512(qsx);
      const __m512i w1 = _mm512_loadu_si512(qsx + 64);
      __m512i wv[4], scv[4];
      wv[0] = _mm512_and_si512(w0, low4);
      wv[1] = _mm512_and_si512(_mm512_srli_epi16(w0, 4), low4);
      wv[2] = _mm512_and_si512(w1, low4);
      wv[3] = _mm512_and_si512(_mm512_srli_epi16(w1, 4), low4);
      if (with_qh) {
        const struct block_q5_K *x5 = (const struct block_q5_K *)xb;
        const __m512i qh = _mm512_broadcast_i64x4(
            _mm256_loadu_si256((const __m256i *)x5->qh));
        for (int c = 0; c < 4; c++)
          wv[c] = _mm512_mask_add_epi8(wv[c], _mm512_test_epi8_mask(qh, hb[c]),
                                       wv[c], bit5);
      }
      for (int c = 0; c < 4; c++) scv[c] = _mm512_permutexvar_epi16(idx[c], sc16);
      for (int t = 0; t < NT; t++) {
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++)
          sumi = _mm512_dpwssd_epi32(
              sumi, _mm512_maddubs_epi16(wv[c], yv[t][c]), scv[c]);
        sv[t][r] = sumi;
      }
    }
    /* the mins as int16 pairs, rows in the lanes */
    __m512i mp[4];
    {
      const __m512i z0 = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256((const __m256i *)mins[0]));  /* rows 0-3 */
      const __m512i z1 = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256((const __m256i *)mins[4]));  /* rows 4-7 */
      const __m512i z2 = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256((const __m256i *)mins[8]));
      const __m512i z3 = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256((const __m256i *)mins[12]));
      for (int i = 0; i < 4; i++) {
        const __m512i ix = _mm512_add_epi32(tr_lo, _mm512_set1_epi32(i));
        const __m512i a = _mm512_permutex2var_epi32(z0, ix, z1);
        const __m512i c = _mm512_permutex2var_epi32(z2, ix, z3);
        mp[i] = _mm512_inserti64x4(a, _mm512_castsi512_si256(c), 1);
      }
    }
    const __m512i ddv = _mm512_loadu_si512(dd);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(ddv));
    const __m512 dmin = _mm512_cvtph_ps(
        _mm512_cvtepi32_epi16(_mm512_srli_epi32(ddv, 16)));
    for (int t = 0; t < NT; t++) {
      const struct block_q8_K *yb = (const struct block_q8_K *)(q + t * qs) + b;
      const __m512 yd = _mm512_set1_ps(yb->d);
      const __m512i s16 = reduce16_epi32(sv[t]);
      __m512i m16 = _mm512_setzero_si512();
      for (int i = 0; i < 4; i++) m16 = _mm512_dpwssd_epi32(m16, mp[i], bp[t][i]);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s16), _mm512_mul_ps(d, yd),
                               acc[t]);
      accm[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m16),
                                _mm512_mul_ps(dmin, yd), accm[t]);
    }
  }
  for (int t = 0; t < NT; t++)
    _mm512_storeu_ps(y + t * ldy, _mm512_sub_ps(acc[t], accm[t]));
}

#define GEMV16_ENTRY(fn, call)                                                \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nt) {                                    \
    TN_ASSERT(n % QK_K == 0 && nt >= 1 && nt <= G_MT);                        \
    const uint8_t *w8 = w, *q8 = q;                                           \
    switch (nt) {                                                             \
    case 1: call(n, w8, ws, q8, qs, y, ldy, 1); break;                        \
    case 2: call(n, w8, ws, q8, qs, y, ldy, 2); break;                        \
    case 3: call(n, w8, ws, q8, qs, y, ldy, 3); break;                        \
    default: call(n, w8, ws, q8, qs, y, ldy, 4); break;                       \
    }                                                                         \
  }

ALWAYS_INLINE void gemv16_q4(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NT) {
  gemv16_q45(n, w, ws, q, qs, y, ldy, NT, 0);
}

ALWAYS_INLINE void gemv16_q5(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NT) {
  gemv16_q45(n, w, ws, q, qs, y, ldy, NT, 1);
}

/* Q6_K keeps eight float lanes per row (its order), so no lanes to share:
 * the 16 rows go one after another, each one sequential stream, and each
 * block read prefetches the same block 16 rows on. */
ALWAYS_INLINE void gemv16_q6(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NT) {
  for (int r = 0; r < 16; r++)
    tile_q6_K_pf(n, w + r * ws, ws, q, qs, y + r, ldy, 1, NT, 16 * ws);
}

GEMV16_ENTRY(tn_gemv16_q4_K_q8_K_avx512, gemv16_q4)
GEMV16_ENTRY(tn_gemv16_q5_K_q8_K_avx512, gemv16_q5)
GEMV16_ENTRY(tn_gemv16_q6_K_q8_K_avx512, gemv16_q6)

#define CASE(body, r, t)                                                      \
  case ((r) - 1) * K_MT + (t) - 1:                                            \
    body(n, w8, ws, q8, qs, y, ldy, r, t);                                    \
    break;
#define K_TILE_ENTRY(fn, body)                                                \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    TN_ASSERT(n % QK_K == 0 && nr >= 1 && nr <= K_MR && nt >= 1 &&            \
              nt <= K_MT);                                                    \
    const uint8_t *w8 = w, *q8 = q;                                           \
    switch ((nr - 1) * K_MT + (nt - 1)) {                                     \
      CASE(body, 1, 1) CASE(body, 1, 2) CASE(body, 1, 3) CASE(body, 1, 4)     \
      CASE(body, 2, 1) CASE(body, 2, 2) CASE(body, 2, 3) CASE(body, 2, 4)     \
    default: break;                                                           \
    }                                                                         \
  }

K_TILE_ENTRY(tn_gemm_q4_K_q8_K_avx512, tile_q4_K)
K_TILE_ENTRY(tn_gemm_q5_K_q8_K_avx512, tile_q5_K)
K_TILE_ENTRY(tn_gemm_q6_K_q8_K_avx512, tile_q6_K)

void tn_vec_dot_q4_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  tile_q4_K(n, vx, 0, vy, 0, s, 0, 1, 1);
}

void tn_vec_dot_q5_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  tile_q5_K(n, vx, 0, vy, 0, s, 0, 1, 1);
}

void tn_vec_dot_q6_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  tile_q6_K(n, vx, 0, vy, 0, s, 0, 1, 1);
}
