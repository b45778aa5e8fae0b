/*
 * ops_avx512.c: AVX-512 versions of the attention sums in ops.c, 16 floats
 * per operation. Same operations per element, in the same order, as the
 * scalar and AVX2 versions (ops.c explains the order), so the same bits.
 */
#include <immintrin.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

/* tn_reduce16 of the 16 lanes of v */
static inline float reduce16(__m512 v) {
  __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

static inline __attribute__((always_inline)) float attn_dot(const float *x,
                                                             const float *y,
                                                             int64_t n) {
  __m512 a[4];
  for (int k = 0; k < 4; k++) a[k] = _mm512_setzero_ps();
  int64_t np = n & ~(int64_t)63, i = 0;
  for (; i < np; i += 64)
    for (int k = 0; k < 4; k++)
      a[k] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * k),
                             _mm512_loadu_ps(y + i + 16 * k), a[k]);
  double s = reduce16(_mm512_add_ps(_mm512_add_ps(a[0], a[2]),
                                    _mm512_add_ps(a[1], a[3])));
  for (; i < n; i++) s += (double)(x[i] * y[i]);
  return (float)s;
}

void tn_attn_dot_rows_avx512(const float *x, const float *y, int64_t y_stride,
                             int ny, float *const *out, int64_t n, float scale) {
  for (int i = 0; i < ny; i++)
    *out[i] = attn_dot(x, y + (int64_t)i * y_stride, n) * scale;
}

/* attn_dot with x an f16 row, converted in registers (exact). */
static inline __attribute__((always_inline)) float attn_dot_h(const uint16_t *x,
                                                               const float *y,
                                                               int64_t n) {
  __m512 a[4];
  for (int k = 0; k < 4; k++) a[k] = _mm512_setzero_ps();
  int64_t np = n & ~(int64_t)63, i = 0;
  for (; i < np; i += 64)
    for (int k = 0; k < 4; k++)
      a[k] = _mm512_fmadd_ps(
          _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i + 16 * k))),
          _mm512_loadu_ps(y + i + 16 * k), a[k]);
  double s = reduce16(_mm512_add_ps(_mm512_add_ps(a[0], a[2]),
                                    _mm512_add_ps(a[1], a[3])));
  for (; i < n; i++) s += (double)(tn_fp16_to_fp32(x[i]) * y[i]);
  return (float)s;
}

void tn_attn_dot_rows_f16_avx512(const uint16_t *x, const float *y,
                                 int64_t y_stride, int ny, float *const *out,
                                 int64_t n, float scale) {
  for (int i = 0; i < ny; i++)
    *out[i] = attn_dot_h(x, y + (int64_t)i * y_stride, n) * scale;
}

/* attn_dot_h (half) or attn_dot of 16 rows at a stride against y,
 * n % 64 == 0 (no double
 * tail: the float -> double -> float trip is exact). Each row's
 * (a0 + a2) + (a1 + a3) is formed as in attn_dot_h; then reduce16's
 * halvings (lanes j + j+8, j + j+4, j + j+2, j + j+1) run across rows:
 * shuffles pair every row's operands side by side, so each row meets the
 * same additions of the same pairs, 16 rows per instruction. The sums come
 * out with row 4l + b in lane 4b + l. */
static inline __attribute__((always_inline)) __m512 attn_dot16(
    const void *k, int64_t k_stride, const float *y, int64_t n,
    const bool half) {
  __m512 v[16];
  for (int r = 0; r < 16; r++) {
    const uint16_t *xh = (const uint16_t *)k + (int64_t)r * k_stride;
    const float *xf = (const float *)k + (int64_t)r * k_stride;
    __m512 a[4];
    for (int j = 0; j < 4; j++) a[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 64)
      for (int j = 0; j < 4; j++)
        a[j] = _mm512_fmadd_ps(
            half ? _mm512_cvtph_ps(_mm256_loadu_si256(
                       (const __m256i *)(xh + i + 16 * j)))
                 : _mm512_loadu_ps(xf + i + 16 * j),
            _mm512_loadu_ps(y + i + 16 * j), a[j]);
    v[r] = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
  }
  /* j + j+8: rows 2i, 2i+1 -> s[i] = [2i: 0-3, 4-7 | 2i+1: 0-3, 4-7] */
  __m512 s[8];
  for (int i = 0; i < 8; i++)
    s[i] = _mm512_add_ps(
        _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
        _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  /* j + j+4: u[m] holds rows 4m..4m+3, one per 128-bit block */
  __m512 u[4];
  for (int m = 0; m < 4; m++)
    u[m] = _mm512_add_ps(
        _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
        _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  /* j + j+2: block b of w[q] = [row 8q+b: 0, 1 | row 8q+4+b: 0, 1] */
  __m512 w[2];
  for (int q = 0; q < 2; q++)
    w[q] = _mm512_add_ps(
        _mm512_shuffle_ps(u[2 * q], u[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
        _mm512_shuffle_ps(u[2 * q], u[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  /* j + j+1: block b = rows b, 4+b, 8+b, 12+b */
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The block kernel on f16 cache rows (half) or rows already converted to
 * f32: the same additions either way, so the same bits. */
static inline __attribute__((always_inline)) void dot_block(
    const void *k, int64_t k_stride, int nk, const float *y, float *out,
    int64_t n, float scale, const bool half) {
  const size_t es = half ? sizeof(uint16_t) : sizeof(float);
  const char *kb = k;
  int r = 0;
  if (n % 64 == 0 && n > 0) {
    /* lane 4b + l holds row 4l + b: lane i of the result takes lane
     * 4 (i % 4) + i / 4 */
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9,
                                           5, 1, 12, 8, 4, 0);
    const __m512 sc = _mm512_set1_ps(scale);
    for (; r + 16 <= nk; r += 16) {
      __m512 d = attn_dot16(kb + (size_t)r * (size_t)k_stride * es, k_stride,
                            y, n, half);
      _mm512_storeu_ps(out + r,
                       _mm512_mul_ps(_mm512_permutexvar_ps(order, d), sc));
    }
  }
  for (; r < nk; r++) {
    const void *row = kb + (size_t)r * (size_t)k_stride * es;
    out[r] = (half ? attn_dot_h(row, y, n) : attn_dot(row, y, n)) * scale;
  }
}

void tn_attn_dot_block_f16_avx512(const uint16_t *k, int64_t k_stride, int nk,
                                  const float *y, float *out, int64_t n,
                                  float scale) {
  dot_block(k, k_stride, nk, y, out, n, scale, true);
}

void tn_attn_dot_block_f32_avx512(const float *k, int64_t k_stride, int nk,
                                  const float *y, float *out, int64_t n,
                                  float scale) {
  dot_block(k, k_stride, nk, y, out, n, scale, false);
}

/* one lane of tn_attn_lanes (positions 64 apart), 128 dims at a time in
 * eight registers */
void tn_attn_lane_avx512(float *dst, const uint16_t *const *rows,
                         const float *w, int64_t cnt, int64_t n) {
  const int64_t step = 64;
  int64_t d0 = 0;
  for (; d0 + 128 <= n; d0 += 128) {
    __m512 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cnt; c++) {
      const uint16_t *r = rows[c * step] + d0;
      const __m512 wv = _mm512_set1_ps(w[c * step]);
      for (int k = 0; k < 8; k++)
        a[k] = _mm512_fmadd_ps(
            wv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + 16 * k))), a[k]);
    }
    for (int k = 0; k < 8; k++) _mm512_storeu_ps(dst + d0 + 16 * k, a[k]);
  }
  for (; d0 + 16 <= n; d0 += 16) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < cnt; c++)
      a = _mm512_fmadd_ps(_mm512_set1_ps(w[c * step]),
                          _mm512_cvtph_ps(_mm256_loadu_si256(
                              (const __m256i *)(rows[c * step] + d0))),
                          a);
    _mm512_storeu_ps(dst + d0, a);
  }
  tn_attn_lane_ref(dst, rows, w, cnt, d0, n);
}

/* Lane k of tn_attn_lanes for dims [d, d + 16): its rows from first on,
 * every 64th, up to p1. */
static inline __attribute__((always_inline)) __m512 lane16(
    const uint16_t *const *rows, const float *w, int32_t p0, int32_t p1,
    int32_t first, int64_t d) {
  __m512 a = _mm512_setzero_ps();
  for (int32_t p = first; p <= p1; p += 64)
    a = _mm512_fmadd_ps(
        _mm512_set1_ps(w[p - p0]),
        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rows[p] + d))), a);
  return a;
}

/* tn_attn_lanes then tn_attn_reduce, 16 dims at a time with no lane
 * buffer (n % 16 == 0): each fold operand is its lane's sum, formed where
 * the fold of tn_attn_reduce_avx512 needs it. */
void tn_attn_values_avx512(float *out, const uint16_t *const *rows,
                           const float *w, int32_t p0, int32_t p1, int64_t n) {
  int32_t first[64];
  for (int32_t k = 0; k < 64; k++) first[k] = p0 + ((k - p0 % 64) + 64) % 64;
  for (int64_t d = 0; d + 16 <= n; d += 16) {
    __m512 v[16];
    for (int l = 0; l < 16; l++) {
#define LN(k) lane16(rows, w, p0, p1, first[k], d)
      v[l] = _mm512_add_ps(_mm512_add_ps(LN(l), LN(32 + l)),
                           _mm512_add_ps(LN(16 + l), LN(48 + l)));
#undef LN
    }
    __m512 t8[8], t4[4];
    for (int l = 0; l < 8; l++) t8[l] = _mm512_add_ps(v[l], v[l + 8]);
    for (int l = 0; l < 4; l++) t4[l] = _mm512_add_ps(t8[l], t8[l + 4]);
    _mm512_storeu_ps(out + d, _mm512_add_ps(_mm512_add_ps(t4[0], t4[2]),
                                            _mm512_add_ps(t4[1], t4[3])));
  }
}

/* Lane k of every token's sum, 64 dims at a time: a row of the lane is
 * loaded and converted once, then added into each token that sees it, in
 * position order from zero, as tn_attn_lane_avx512 adds it for one token
 * (the same fused multiply-add per element, so the same bits). */
void tn_attn_lanes_run_avx512(float *acc, const uint16_t *const *rows,
                              const float *const *w, const int32_t *p0,
                              const int32_t *p1, int nq, int64_t n) {
  enum { G = TN_ATTN_VALUES_GROUP };
  int32_t lo = p0[0], hi = p1[0];
  for (int i = 1; i < nq; i++) {
    if (p0[i] < lo) lo = p0[i];
    if (p1[i] > hi) hi = p1[i];
  }
  for (int32_t k = 0; k < 64; k++) {
    const int32_t first = lo + ((k - lo % 64) + 64) % 64;
    for (int64_t d = 0; d < n; d += 64) {
      const int nv = n - d >= 64 ? 4 : (int)((n - d) / 16);
      __m512 a[G][4];
      for (int i = 0; i < G; i++)
        for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
      for (int32_t p = first; p <= hi; p += 64) {
        const uint16_t *r = rows[p] + d;
        __m512 x[4];
        for (int j = 0; j < nv; j++)
          x[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + 16 * j)));
        for (int i = 0; i < nq; i++) {
          if (p < p0[i] || p > p1[i]) continue;
          const __m512 wv = _mm512_set1_ps(w[i][p - p0[i]]);
          for (int j = 0; j < nv; j++) a[i][j] = _mm512_fmadd_ps(wv, x[j], a[i][j]);
        }
      }
      for (int i = 0; i < nq; i++)
        for (int j = 0; j < nv; j++)
          _mm512_storeu_ps(acc + (int64_t)i * 64 * n + (int64_t)k * n + d + 16 * j,
                           a[i][j]);
    }
  }
}

void tn_attn_reduce_avx512(const float *acc, float *out, int64_t n) {
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    __m512 v[16];
    for (int l = 0; l < 16; l++)
      v[l] = _mm512_add_ps(
          _mm512_add_ps(_mm512_loadu_ps(acc + l * n + d),
                        _mm512_loadu_ps(acc + (32 + l) * n + d)),
          _mm512_add_ps(_mm512_loadu_ps(acc + (16 + l) * n + d),
                        _mm512_loadu_ps(acc + (48 + l) * n + d)));
    __m512 t8[8], t4[4];
    for (int l = 0; l < 8; l++) t8[l] = _mm512_add_ps(v[l], v[l + 8]);
    for (int l = 0; l < 4; l++) t4[l] = _mm512_add_ps(t8[l], t8[l + 4]);
    _mm512_storeu_ps(out + d, _mm512_add_ps(_mm512_add_ps(t4[0], t4[2]),
                                            _mm512_add_ps(t4[1], t4[3])));
  }
  tn_attn_reduce_ref(acc, out, d, n);
}
