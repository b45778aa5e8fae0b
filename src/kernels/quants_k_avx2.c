/*
 * quants_k_avx2.c: AVX2 versions of the K-quant hot paths (quantize Q8_K,
 * and the Q4_K / Q5_K / Q6_K dot products against Q8_K). Bit-identical to
 * the scalar reference in quants_k.c (same integer lanes, same float
 * order); Q8_K quantization too, for finite input.
 *
 * The dot products all have one shape: rebuild the weights' unsigned levels
 * 32 bytes at a time, multiply them with the signed Q8_K quants by
 * _mm256_maddubs_epi16 (u8 x s8, adjacent pairs summed to int16; the largest
 * pair, 2*63*127, cannot saturate), then _mm256_madd_epi16 by the sub-block
 * scale into int32. The part of the value that does not depend on the
 * element (Q4_K/Q5_K's min, Q6_K's offset of 32) is applied through the
 * activations' bsums instead.
 */
#include <immintrin.h>
#include <math.h>

#include "base/base.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants_k_internal.h"

/* tn_hsum8's order */
static inline float hsum_ps(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v),
                            _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

/* The four totals of a0..a3 (int32 lanes each), as one vector. */
static inline __m128i hsum4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static inline float fp16(uint16_t h) {
  return _cvtsh_ss(h);
}

/* ---- Q8_K quantization */

void tn_quant_q8_K_avx2(const float *x, void *vy, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  struct block_q8_K *y = vy;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < QK_K; i += 8)
      m = _mm256_max_ps(m, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    if (!(amax > 0)) {
      memset(&y[b], 0, sizeof(y[b]));
      continue;
    }
    /* The first element of largest magnitude, with its sign (as the
     * reference picks it). */
    float vmax = amax;
    for (int i = 0; i < QK_K; i++) {
      if (__builtin_fabsf(x[i]) == amax) {
        vmax = x[i];
        break;
      }
    }
    const float iscale = -127.f / vmax;
    const __m256 vis = _mm256_set1_ps(iscale);
    const __m256 lim = _mm256_set1_ps(127.f);
    const __m256 nlim = _mm256_set1_ps(-127.f);
    for (int i = 0; i < QK_K; i += 32) {
      __m256i q[4];
      for (int k = 0; k < 4; k++) {
        __m256 v = _mm256_mul_ps(vis, _mm256_loadu_ps(x + i + 8 * k));
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, nlim), lim);
        q[k] = _mm256_cvtps_epi32(v);
      }
      y[b].bsums[i / 16] = (int16_t)hsum_epi32(_mm256_add_epi32(q[0], q[1]));
      y[b].bsums[i / 16 + 1] = (int16_t)hsum_epi32(_mm256_add_epi32(q[2], q[3]));
      /* packs work per 128-bit lane: a0 b0 a1 b1 / then the permute
       * restores element order. */
      __m256i w01 = _mm256_packs_epi32(q[0], q[1]);
      __m256i w23 = _mm256_packs_epi32(q[2], q[3]);
      __m256i bytes = _mm256_packs_epi16(w01, w23);
      bytes = _mm256_permutevar8x32_epi32(bytes, perm);
      _mm256_storeu_si256((__m256i *)(y[b].qs + i), bytes);
    }
    y[b].d = 1.f / iscale;
  }
}

/* ---- Q4_K / Q5_K */

/* Unpacks the 6-bit scales and mins, four at a time in 32-bit words:
 * sc[j] and mn[j] for j < 4 are the low six bits of bytes 0..3 and 4..7;
 * for j >= 4 the low four bits come from bytes 8..11 (scales in the low
 * nibble, mins in the high one) and the top two from bits 6..7 of bytes
 * 0..3 / 4..7. */
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

/* sum_j mn[j] * (bsums[2j] + bsums[2j+1]) as 8 int32 lanes. */
static inline __m256i mins_dot(const uint8_t mn[8], const int16_t *bsums) {
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                    7, 7);
  __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
  __m256i m16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(m8, dup));
  __m256i bs = _mm256_loadu_si256((const __m256i *)bsums);
  return _mm256_madd_epi16(m16, bs);
}

/* ---- tiles: nr <= 2 weight rows x nt <= 4 tokens (matmul.c drives them)
 *
 * Each weight row's block is unpacked once and dotted with every token of
 * the tile; y[t*ldy + r] = dot(row r, token t). The bodies take nr/nt as
 * constants (the entry points switch over the shapes) so that the
 * accumulator arrays live in registers.
 *
 * The dot products are the 1 x 1 tiles: each (row, token) output has its
 * own accumulators and goes through the same operations whatever the tile
 * shape, so a token's result does not depend on the batch around it.
 */
#define K_MR 2
#define K_MT 4

#define K_ALWAYS_INLINE static inline __attribute__((always_inline))

K_ALWAYS_INLINE void tile_store(__m256 acc[K_MR][K_MT], float *y, int64_t ldy,
                                int nr, int nt) {
  for (int r = 0; r < nr; r++)
    for (int t = 0; t < nt; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

K_ALWAYS_INLINE void tile_q45_K(int64_t n, const uint8_t *w, size_t ws,
                                const uint8_t *q, size_t qs, float *y,
                                int64_t ldy, int nr, int nt, int with_qh) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i bit5 = _mm256_set1_epi8(0x10);
  const size_t xsize = with_qh ? sizeof(struct block_q5_K)
                               : sizeof(struct block_q4_K);
  /* per row, one lane per token: the fused sums of the blocks' integer
   * totals (quants_k.c gives the order; each lane is that scalar fmaf) */
  __m128 acc[K_MR], accm[K_MR];
  for (int r = 0; r < nr; r++) acc[r] = accm[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const struct block_q8_K *yb[K_MT];
    float yd[K_MT] = {0};
    for (int t = 0; t < nt; t++) {
      yb[t] = (const struct block_q8_K *)(q + t * qs) + b;
      yd[t] = yb[t]->d;
    }
    const __m128 yd4 = _mm_loadu_ps(yd);
    for (int r = 0; r < nr; r++) {
      const uint8_t *xb = w + r * ws + (size_t)b * xsize;
      const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
      const uint8_t *qsx = xb + xsize - QK_K / 2;
      uint8_t sc[8], mn[8];
      unpack_scales(x4->scales, sc, mn);
      const float d = fp16(x4->d), dmin = fp16(x4->dmin);
      __m256i qh = with_qh ? _mm256_loadu_si256(
                                 (const __m256i *)((const struct block_q5_K *)xb)->qh)
                           : _mm256_setzero_si256();
      __m256i sumi[K_MT], summ[K_MT];
      for (int t = 0; t < K_MT; t++) sumi[t] = summ[t] = _mm256_setzero_si256();
      for (int j = 0; j < QK_K / 64; j++) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)(qsx + 32 * j));
        __m256i lo = _mm256_and_si256(bits, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
        if (with_qh) {
          /* qh's bits 2j and 2j+1 belong to the 64 elements of step j;
           * shifting qh right by 2 per step keeps them at bits 0 and 1 of
           * each byte (the 16-bit shifts drag neighbours' bits in above,
           * which the masks drop). */
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit5));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit5));
          qh = _mm256_srli_epi16(qh, 2);
        }
        const __m256i slo = _mm256_set1_epi16(sc[2 * j]);
        const __m256i shi = _mm256_set1_epi16(sc[2 * j + 1]);
        for (int t = 0; t < nt; t++) {
          const int8_t *q8 = yb[t]->qs + 64 * j;
          __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q8));
          __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
          sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(plo, slo),
                                                               _mm256_madd_epi16(phi, shi)));
        }
      }
      for (int t = 0; t < nt; t++) summ[t] = mins_dot(mn, yb[t]->bsums);
      const __m128i s4 = hsum4_epi32(sumi[0], sumi[1], sumi[2], sumi[3]);
      const __m128i m4 = hsum4_epi32(summ[0], summ[1], summ[2], summ[3]);
      acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), _mm_mul_ps(_mm_set1_ps(d), yd4), acc[r]);
      accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(m4), _mm_mul_ps(_mm_set1_ps(dmin), yd4),
                             accm[r]);
    }
  }
  for (int r = 0; r < nr; r++) {
    float o[4];
    _mm_storeu_ps(o, _mm_sub_ps(acc[r], accm[r]));
    for (int t = 0; t < nt; t++) y[t * ldy + r] = o[t];
  }
}

/* tile_q45_K with up to K_MTW tokens in the lanes of one vector per row
 * (prefill: an unpacked block serves eight tokens). */
#define K_MTW 8
K_ALWAYS_INLINE void tile_q45_K_wide(int64_t n, const uint8_t *w, size_t ws,
                                const uint8_t *q, size_t qs, float *y,
                                int64_t ldy, int nr, int nt, int with_qh) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i bit5 = _mm256_set1_epi8(0x10);
  const size_t xsize = with_qh ? sizeof(struct block_q5_K)
                               : sizeof(struct block_q4_K);
  /* per row, one lane per token: the fused sums of the blocks' integer
   * totals (quants_k.c gives the order; each lane is that scalar fmaf) */
  __m256 acc[K_MR], accm[K_MR];
  for (int r = 0; r < nr; r++) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const struct block_q8_K *yb[K_MTW];
    float yd[K_MTW] = {0};
    for (int t = 0; t < nt; t++) {
      yb[t] = (const struct block_q8_K *)(q + t * qs) + b;
      yd[t] = yb[t]->d;
    }
    const __m256 yd8 = _mm256_loadu_ps(yd);
    for (int r = 0; r < nr; r++) {
      const uint8_t *xb = w + r * ws + (size_t)b * xsize;
      const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
      const uint8_t *qsx = xb + xsize - QK_K / 2;
      uint8_t sc[8], mn[8];
      unpack_scales(x4->scales, sc, mn);
      const float d = fp16(x4->d), dmin = fp16(x4->dmin);
      __m256i qh = with_qh ? _mm256_loadu_si256(
                                 (const __m256i *)((const struct block_q5_K *)xb)->qh)
                           : _mm256_setzero_si256();
      __m256i sumi[K_MTW], summ[K_MTW];
      for (int t = 0; t < K_MTW; t++) sumi[t] = summ[t] = _mm256_setzero_si256();
      for (int j = 0; j < QK_K / 64; j++) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)(qsx + 32 * j));
        __m256i lo = _mm256_and_si256(bits, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
        if (with_qh) {
          /* qh's bits 2j and 2j+1 belong to the 64 elements of step j;
           * shifting qh right by 2 per step keeps them at bits 0 and 1 of
           * each byte (the 16-bit shifts drag neighbours' bits in above,
           * which the masks drop). */
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit5));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit5));
          qh = _mm256_srli_epi16(qh, 2);
        }
        const __m256i slo = _mm256_set1_epi16(sc[2 * j]);
        const __m256i shi = _mm256_set1_epi16(sc[2 * j + 1]);
        for (int t = 0; t < nt; t++) {
          const int8_t *q8 = yb[t]->qs + 64 * j;
          __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q8));
          __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
          sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(plo, slo),
                                                               _mm256_madd_epi16(phi, shi)));
        }
      }
      for (int t = 0; t < nt; t++) summ[t] = mins_dot(mn, yb[t]->bsums);
      const __m256i s8 = _mm256_setr_m128i(hsum4_epi32(sumi[0], sumi[1], sumi[2], sumi[3]),
                                           hsum4_epi32(sumi[4], sumi[5], sumi[6], sumi[7]));
      const __m256i m8 = _mm256_setr_m128i(hsum4_epi32(summ[0], summ[1], summ[2], summ[3]),
                                           hsum4_epi32(summ[4], summ[5], summ[6], summ[7]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8),
                               _mm256_mul_ps(_mm256_set1_ps(d), yd8), acc[r]);
      accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m8),
                                _mm256_mul_ps(_mm256_set1_ps(dmin), yd8), accm[r]);
    }
  }
  for (int r = 0; r < nr; r++) {
    float o[8];
    _mm256_storeu_ps(o, _mm256_sub_ps(acc[r], accm[r]));
    for (int t = 0; t < nt; t++) y[t * ldy + r] = o[t];
  }
}

/* One token against up to K_RR rows, the rows in the lanes: per block each
 * row's integer totals (the same as the tile's, exact in int32) are summed
 * across into one vector of rows, and each lane then takes the tile's
 * fused step for its (row, token): the same bits, with the horizontal sums
 * and the float steps shared by eight rows instead of made per row. */
#define K_RR 8
K_ALWAYS_INLINE void rows_q45_K(int64_t n, const uint8_t *w, size_t ws,
                                const uint8_t *q, float *y, int nr,
                                int with_qh) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i bit5 = _mm256_set1_epi8(0x10);
  const size_t xsize = with_qh ? sizeof(struct block_q5_K)
                               : sizeof(struct block_q4_K);
  __m256i pick[8];
  for (int k = 0; k < 8; k++)
    pick[k] = _mm256_set1_epi16((short)(((2 * k + 1) << 8) | (2 * k)));
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const struct block_q8_K *yb = (const struct block_q8_K *)q + b;
    /* The rows are contiguous and short (a 1536-wide row is six blocks), so
     * each block step prefetches its share of the region two row groups
     * ahead rather than further along its own rows. */
    {
      const char *pf = (const char *)w + 2 * K_RR * ws + (size_t)b * K_RR * xsize;
      for (size_t k = 0; k < (K_RR * xsize + 63) / 64; k++)
        _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
    }
    __m256i si[K_RR], sm[K_RR];
    float dd[K_RR] = {0}, dm[K_RR] = {0};
    for (int r = 0; r < K_RR; r++) {
      if (r >= nr) {
        si[r] = sm[r] = _mm256_setzero_si256();
        continue;
      }
      const uint8_t *xb = w + r * ws + (size_t)b * xsize;
      const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
      const uint8_t *qsx = xb + xsize - QK_K / 2;
      uint8_t sc[8], mn[8];
      unpack_scales(x4->scales, sc, mn);
      dd[r] = fp16(x4->d);
      dm[r] = fp16(x4->dmin);
      __m256i qh = with_qh ? _mm256_loadu_si256(
                                 (const __m256i *)((const struct block_q5_K *)xb)->qh)
                           : _mm256_setzero_si256();
      /* the eight scales as int16 in both halves; pick[k] spreads the
       * k-th over all lanes */
      const __m256i sc16 = _mm256_broadcastsi128_si256(
          _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
      __m256i sumi = _mm256_setzero_si256();
      for (int j = 0; j < QK_K / 64; j++) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)(qsx + 32 * j));
        __m256i lo = _mm256_and_si256(bits, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
        if (with_qh) {
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit5));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit5));
          qh = _mm256_srli_epi16(qh, 2);
        }
        const int8_t *q8 = yb->qs + 64 * j;
        __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q8));
        __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
        sumi = _mm256_add_epi32(
            sumi, _mm256_add_epi32(_mm256_madd_epi16(plo, _mm256_shuffle_epi8(sc16, pick[2 * j])),
                                   _mm256_madd_epi16(phi, _mm256_shuffle_epi8(sc16, pick[2 * j + 1]))));
      }
      si[r] = sumi;
      sm[r] = mins_dot(mn, yb->bsums);
    }
    const __m256i s8 = _mm256_setr_m128i(hsum4_epi32(si[0], si[1], si[2], si[3]),
                                         hsum4_epi32(si[4], si[5], si[6], si[7]));
    const __m256i m8 = _mm256_setr_m128i(hsum4_epi32(sm[0], sm[1], sm[2], sm[3]),
                                         hsum4_epi32(sm[4], sm[5], sm[6], sm[7]));
    const __m256 yd = _mm256_set1_ps(yb->d);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8),
                          _mm256_mul_ps(_mm256_loadu_ps(dd), yd), acc);
    accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m8),
                           _mm256_mul_ps(_mm256_loadu_ps(dm), yd), accm);
  }
  float o[K_RR];
  _mm256_storeu_ps(o, _mm256_sub_ps(acc, accm));
  for (int r = 0; r < nr; r++) y[r] = o[r];
}

K_ALWAYS_INLINE void tile_q4_K(int64_t n, const uint8_t *w, size_t ws,
                               const uint8_t *q, size_t qs, float *y,
                               int64_t ldy, int nr, int nt) {
  tile_q45_K(n, w, ws, q, qs, y, ldy, nr, nt, 0);
}

K_ALWAYS_INLINE void tile_q5_K(int64_t n, const uint8_t *w, size_t ws,
                               const uint8_t *q, size_t qs, float *y,
                               int64_t ldy, int nr, int nt) {
  tile_q45_K(n, w, ws, q, qs, y, ldy, nr, nt, 1);
}

K_ALWAYS_INLINE void tile_q6_K(int64_t n, const uint8_t *w, size_t ws,
                               const uint8_t *q, size_t qs, float *y,
                               int64_t ldy, int nr, int nt) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256i pick[4];
  for (int g = 0; g < 4; g++) {
    const char a = (char)(4 * g), c = (char)(4 * g + 2);
    pick[g] = _mm256_setr_epi8(a, a + 1, a, a + 1, a, a + 1, a, a + 1, a,
                               a + 1, a, a + 1, a, a + 1, a, a + 1, c, c + 1,
                               c, c + 1, c, c + 1, c, c + 1, c, c + 1, c,
                               c + 1, c, c + 1, c, c + 1);
  }
  __m256 acc[K_MR][K_MT];
  for (int r = 0; r < nr; r++)
    for (int t = 0; t < nt; t++) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    if (nt == 1) { /* decode: the region two tiles ahead (see rows_q45_K) */
      const char *pf = (const char *)w + 2 * nr * ws +
                       (size_t)b * nr * sizeof(struct block_q6_K);
      for (size_t k = 0; k < (nr * sizeof(struct block_q6_K) + 63) / 64; k++)
        _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
    }
    const struct block_q8_K *yb[K_MT];
    for (int t = 0; t < nt; t++)
      yb[t] = (const struct block_q8_K *)(q + t * qs) + b;
    for (int r = 0; r < nr; r++) {
      const struct block_q6_K *x = (const struct block_q6_K *)(w + r * ws) + b;
      const float d = fp16(x->d);
      const __m256i sc16 = _mm256_cvtepi8_epi16(
          _mm_loadu_si128((const __m128i *)x->scales));
      __m256i sumi[K_MT];
      for (int t = 0; t < nt; t++)
        sumi[t] = _mm256_slli_epi32(
            _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)yb[t]->bsums)), 5);
      for (int h = 0; h < 2; h++) {
        const uint8_t *ql = x->ql + 64 * h;
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(x->qh + 32 * h));
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i qv[4];
        qv[0] = _mm256_or_si256(_mm256_and_si256(l0, low4),
                                _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
        qv[1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0c)), 2));
        qv[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
        qv[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8((char)0xc0)), 2));
        const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                              : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        for (int g = 0; g < 4; g++) {
          const __m256i s16 = _mm256_shuffle_epi8(sch, pick[g]);
          for (int t = 0; t < nt; t++) {
            const int8_t *q8 = yb[t]->qs + 128 * h + 32 * g;
            __m256i p = _mm256_maddubs_epi16(qv[g], _mm256_loadu_si256((const __m256i *)q8));
            /* sumi starts at +32*offset and subtracts products: negated
             * below. */
            sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_madd_epi16(p, s16));
          }
        }
      }
      for (int t = 0; t < nt; t++)
        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(-d * yb[t]->d),
                                    _mm256_cvtepi32_ps(sumi[t]), acc[r][t]);
    }
  }
  tile_store(acc, y, ldy, nr, nt);
}

#define K_TILE_ENTRY(fn, body, vec_dot)                                       \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    TN_ASSERT(n % QK_K == 0 && nr >= 1 && nr <= K_MR && nt >= 1 &&            \
              nt <= K_MT);                                                    \
    const uint8_t *w8 = w, *q8 = q;                                           \
    switch ((nr - 1) * K_MT + (nt - 1)) {                                     \
    case 0: body(n, w8, ws, q8, qs, y, ldy, 1, 1); break;                     \
    case 1: body(n, w8, ws, q8, qs, y, ldy, 1, 2); break;                     \
    case 2: body(n, w8, ws, q8, qs, y, ldy, 1, 3); break;                     \
    case 3: body(n, w8, ws, q8, qs, y, ldy, 1, 4); break;                     \
    case 4: body(n, w8, ws, q8, qs, y, ldy, 2, 1); break;                     \
    case 5: body(n, w8, ws, q8, qs, y, ldy, 2, 2); break;                     \
    case 6: body(n, w8, ws, q8, qs, y, ldy, 2, 3); break;                     \
    default: body(n, w8, ws, q8, qs, y, ldy, 2, 4); break;                    \
    }                                                                         \
  }                                                                           \
  void vec_dot(int64_t n, float *s, const void *x, const void *y) {           \
    TN_ASSERT(n % QK_K == 0);                                                 \
    body(n, x, 0, y, 0, s, 0, 1, 1);                                          \
  }

static K_TILE_ENTRY(tile_entry_q4_K, tile_q4_K, tn_vec_dot_q4_K_q8_K_avx2)
static K_TILE_ENTRY(tile_entry_q5_K, tile_q5_K, tn_vec_dot_q5_K_q8_K_avx2)

/* Up to K_RR rows: one token takes the rows-in-lanes kernel, more tokens
 * go in tiles of K_MR rows. */
#define K_ROWS_ENTRY(fn, tile_fn, with_qh)                                    \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    TN_ASSERT(nr >= 1 && nr <= K_RR && nt >= 1 && nt <= K_MTW);               \
    TN_ASSERT(n % QK_K == 0);                                                 \
    if (nt == 1 && nr > 1) {                                                  \
      rows_q45_K(n, w, ws, q, y, nr, with_qh);                                \
      return;                                                                 \
    }                                                                         \
    if (nt > K_MT) {                                                          \
      TN_ASSERT(nr <= K_MR);                                                  \
      switch (nr * 16 + nt) {                                                 \
      case 16 + 5: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 1, 5, with_qh); break; \
      case 16 + 6: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 1, 6, with_qh); break; \
      case 16 + 7: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 1, 7, with_qh); break; \
      case 16 + 8: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 1, 8, with_qh); break; \
      case 32 + 5: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 2, 5, with_qh); break; \
      case 32 + 6: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 2, 6, with_qh); break; \
      case 32 + 7: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 2, 7, with_qh); break; \
      default: tile_q45_K_wide(n, w, ws, q, qs, y, ldy, 2, 8, with_qh); break; \
      }                                                                       \
      return;                                                                 \
    }                                                                         \
    for (int r = 0; r < nr; r += K_MR)                                        \
      tile_fn(n, (const uint8_t *)w + r * ws, ws, q, qs, y + r, ldy,          \
              TN_MIN(K_MR, nr - r), nt);                                      \
  }
K_ROWS_ENTRY(tn_gemm_q4_K_q8_K_avx2, tile_entry_q4_K, 0)
K_ROWS_ENTRY(tn_gemm_q5_K_q8_K_avx2, tile_entry_q5_K, 1)
K_TILE_ENTRY(tn_gemm_q6_K_q8_K_avx2, tile_q6_K, tn_vec_dot_q6_K_q8_K_avx2)
