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
 * Q4_K/Q5_K's 64 bytes of qs hold sub-blocks (2c, 2c+1) of two 64-element
 * chunks c; their low nibbles are sub-blocks 2c and 2c+2 and their high
 * nibbles 2c+1 and 2c+3, so the Q8_K quants are regrouped the same way with
 * _mm512_shuffle_i64x2. Q6_K's low nibbles of ql already come out in element
 * order, 64 at a time.
 */
#include <immintrin.h>

#include "base/base.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants_k_internal.h"

static inline float fp16(uint16_t h) {
  return _cvtsh_ss(h);
}

/* Index vector for _mm512_permutexvar_epi16: int16 lanes 0..15 take source
 * lane a, lanes 16..31 take lane b. */
static inline __m512i pick2(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)a)),
                            _mm256_set1_epi16((short)b), 1);
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

/* sum_j mn[j] * (bsums[2j] + bsums[2j+1]), as 8 int32 lanes. */
static inline __m256i mins_dot(const uint8_t mn[8], const int16_t *bsums) {
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                    7, 7);
  __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
  __m256i m16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(m8, dup));
  return _mm256_madd_epi16(m16, _mm256_loadu_si256((const __m256i *)bsums));
}

/* Shared by Q4_K and Q5_K: with_qh selects the fifth bit. */
static inline float dot_q45(int64_t nb, const uint8_t *xb, size_t xsize,
                            const struct block_q8_K *y, int with_qh) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i bit5 = _mm512_set1_epi8(0x10);
  /* Scale lanes for (lo0, hi0, lo1, hi1): sub-blocks (0,2) (1,3) (4,6) (5,7). */
  const __m512i idx[4] = {pick2(0, 2), pick2(1, 3), pick2(4, 6), pick2(5, 7)};
  /* qh bit masks for the same pairs: bit j of qh[l] is element 32j + l. */
  const __m512i hb[4] = {
      _mm512_inserti64x4(_mm512_set1_epi8(0x01), _mm256_set1_epi8(0x04), 1),
      _mm512_inserti64x4(_mm512_set1_epi8(0x02), _mm256_set1_epi8(0x08), 1),
      _mm512_inserti64x4(_mm512_set1_epi8(0x10), _mm256_set1_epi8(0x40), 1),
      _mm512_inserti64x4(_mm512_set1_epi8(0x20), _mm256_set1_epi8((char)0x80), 1)};
  __m512 acc = _mm512_setzero_ps();
  __m256 accm = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++, xb += xsize) {
    /* Q4_K and Q5_K share d, dmin, scales at the front; qs is at the end. */
    const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
    const uint8_t *qs = xb + xsize - QK_K / 2;
    uint8_t sc[8], mn[8];
    unpack_scales(x4->scales, sc, mn);
    const float d = y[b].d * fp16(x4->d);
    const float dmin = y[b].d * fp16(x4->dmin);
    const __m512i sc16 = _mm512_zextsi128_si512(
        _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));

    const __m512i z0 = _mm512_loadu_si512(y[b].qs);
    const __m512i z1 = _mm512_loadu_si512(y[b].qs + 64);
    const __m512i z2 = _mm512_loadu_si512(y[b].qs + 128);
    const __m512i z3 = _mm512_loadu_si512(y[b].qs + 192);
    __m512i a[4];
    a[0] = _mm512_shuffle_i64x2(z0, z1, 0x44); /* sub-blocks 0, 2 */
    a[1] = _mm512_shuffle_i64x2(z0, z1, 0xee); /* 1, 3 */
    a[2] = _mm512_shuffle_i64x2(z2, z3, 0x44); /* 4, 6 */
    a[3] = _mm512_shuffle_i64x2(z2, z3, 0xee); /* 5, 7 */

    const __m512i w0 = _mm512_loadu_si512(qs);
    const __m512i w1 = _mm512_loadu_si512(qs + 64);
    __m512i w[4];
    w[0] = _mm512_and_si512(w0, low4);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(w0, 4), low4);
    w[2] = _mm512_and_si512(w1, low4);
    w[3] = _mm512_and_si512(_mm512_srli_epi16(w1, 4), low4);
    if (with_qh) {
      const struct block_q5_K *x5 = (const struct block_q5_K *)xb;
      const __m512i qh = _mm512_broadcast_i64x4(
          _mm256_loadu_si256((const __m256i *)x5->qh));
      for (int k = 0; k < 4; k++)
        w[k] = _mm512_mask_add_epi8(w[k], _mm512_test_epi8_mask(qh, hb[k]),
                                    w[k], bit5);
    }
    __m512i sumi = _mm512_setzero_si512();
    for (int k = 0; k < 4; k++) {
      __m512i p = _mm512_maddubs_epi16(w[k], a[k]);
      sumi = _mm512_dpwssd_epi32(sumi, p, _mm512_permutexvar_epi16(idx[k], sc16));
    }
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    accm = _mm256_fmadd_ps(_mm256_set1_ps(-dmin),
                           _mm256_cvtepi32_ps(mins_dot(mn, y[b].bsums)), accm);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc, _mm512_zextps256_ps512(accm)));
}

void tn_vec_dot_q4_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  *s = dot_q45(n / QK_K, vx, sizeof(struct block_q4_K), vy, 0);
}

void tn_vec_dot_q5_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  *s = dot_q45(n / QK_K, vx, sizeof(struct block_q5_K), vy, 1);
}

void tn_vec_dot_q6_K_q8_K_avx512(int64_t n, float *s, const void *vx,
                                 const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q6_K *x = vx;
  const struct block_q8_K *y = vy;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  /* For a half's ql = [l0 | l1] (32 bytes each): low nibbles are groups 0
   * and 1, whose top bits sit at qh bits 0-1 and 2-3; high nibbles groups 2
   * and 3, at bits 4-5 and 6-7. Mask, then shift to bits 4-5 per 256-bit
   * half. */
  const __m512i mlo = _mm512_inserti64x4(_mm512_set1_epi8(0x03),
                                         _mm256_set1_epi8(0x0c), 1);
  const __m512i mhi = _mm512_inserti64x4(_mm512_set1_epi8(0x30),
                                         _mm256_set1_epi8((char)0xc0), 1);
  const __m512i shl_lo = _mm512_inserti64x4(_mm512_set1_epi16(4),
                                            _mm256_set1_epi16(2), 1);
  const __m512i shr_hi = _mm512_inserti64x4(_mm512_set1_epi16(0),
                                            _mm256_set1_epi16(2), 1);
  /* Chunk c of 64 elements = int16 lanes of four sub-blocks 4c..4c+3,
   * eight lanes each. */
  __m512i idx[4];
  for (int c = 0; c < 4; c++) {
    __m128i q = _mm_set1_epi16((short)(4 * c));
    idx[c] = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(
            _mm_add_epi16(q, _mm_set1_epi16(1)), q)),
        _mm256_set_m128i(_mm_add_epi16(q, _mm_set1_epi16(3)),
                         _mm_add_epi16(q, _mm_set1_epi16(2))),
        1);
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    const float d = y[b].d * fp16(x[b].d);
    const __m256i sc16s = _mm256_cvtepi8_epi16(
        _mm_loadu_si128((const __m128i *)x[b].scales));
    const __m512i sc16 = _mm512_zextsi256_si512(sc16s);
    /* The offset of 32: 32 * sum_j scales[j] * bsums[j]. */
    const __m256i off = _mm256_madd_epi16(
        sc16s, _mm256_loadu_si256((const __m256i *)y[b].bsums));

    const __m512i qh2 = _mm512_loadu_si512(x[b].qh);
    __m512i sumi = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
      const __m512i ql = _mm512_loadu_si512(x[b].ql + 64 * h);
      const __m512i qh = h ? _mm512_shuffle_i64x2(qh2, qh2, 0xee)
                           : _mm512_shuffle_i64x2(qh2, qh2, 0x44);
      __m512i q0 = _mm512_or_si512(
          _mm512_and_si512(ql, low4),
          _mm512_sllv_epi16(_mm512_and_si512(qh, mlo), shl_lo));
      __m512i q1 = _mm512_or_si512(
          _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
          _mm512_srlv_epi16(_mm512_and_si512(qh, mhi), shr_hi));
      const int8_t *q8 = y[b].qs + 128 * h;
      __m512i p0 = _mm512_maddubs_epi16(q0, _mm512_loadu_si512(q8));
      __m512i p1 = _mm512_maddubs_epi16(q1, _mm512_loadu_si512(q8 + 64));
      sumi = _mm512_dpwssd_epi32(sumi, p0,
                                 _mm512_permutexvar_epi16(idx[2 * h], sc16));
      sumi = _mm512_dpwssd_epi32(sumi, p1,
                                 _mm512_permutexvar_epi16(idx[2 * h + 1], sc16));
    }
    /* Fold the offset (8 lanes) into the low half of sumi. */
    sumi = _mm512_sub_epi32(
        sumi, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
  }
  *s = _mm512_reduce_add_ps(acc);
}

/* ---- tiles (mr = 2, mt = 4, as the AVX2 ones): one token goes through the
 * AVX-512 dot per row; several tokens through the AVX2 tiles, whose shared
 * unpacking gains more than the wider vectors would. */
#define K_TILE_ENTRY_512(fn, vec_dot, tile_avx2)                              \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    if (nt == 1) {                                                            \
      for (int r = 0; r < nr; r++)                                            \
        vec_dot(n, y + r, (const uint8_t *)w + r * ws, q);                    \
      return;                                                                 \
    }                                                                         \
    tile_avx2(n, w, ws, q, qs, y, ldy, nr, nt);                               \
  }

K_TILE_ENTRY_512(tn_gemm_q4_K_q8_K_avx512, tn_vec_dot_q4_K_q8_K_avx512,
                 tn_gemm_q4_K_q8_K_avx2)
K_TILE_ENTRY_512(tn_gemm_q5_K_q8_K_avx512, tn_vec_dot_q5_K_q8_K_avx512,
                 tn_gemm_q5_K_q8_K_avx2)
K_TILE_ENTRY_512(tn_gemm_q6_K_q8_K_avx512, tn_vec_dot_q6_K_q8_K_avx512,
                 tn_gemm_q6_K_q8_K_avx2)
