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

void tn_attn_dot_block_f16_avx512(const uint16_t *k, int64_t k_stride, int nk,
                                  const float *y, float *out, int64_t n,
                                  float scale) {
  for (int r = 0; r < nk; r++)
    out[r] = attn_dot_h(k + (int64_t)r * k_stride, y, n) * scale;
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
