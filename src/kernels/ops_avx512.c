/*
 * ops_avx512.c: AVX-512 versions of the attention sums in ops.c, 16 floats
 * per operation. Same operations per element, in the same order, as the
 * scalar and AVX2 versions (ops.c explains the order), so the same bits.
 */
#include <immintrin.h>
#include <math.h>

#include "kernels/kernels.h"

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

void tn_attn_accum_rows_avx512(float *acc, int64_t acc_stride, const float *a,
                               int ny, const float *x, int64_t n) {
  for (int i = 0; i < ny; i++) {
    float *r = acc + (int64_t)i * acc_stride;
    __m512 va = _mm512_set1_ps(a[i]);
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
      _mm512_storeu_ps(r + d, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + d),
                                              _mm512_loadu_ps(r + d)));
    for (; d < n; d++) r[d] = fmaf(a[i], x[d], r[d]);
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
  for (; d < n; d++) {
    float v[16];
    for (int l = 0; l < 16; l++)
      v[l] = (acc[l * n + d] + acc[(32 + l) * n + d]) +
             (acc[(16 + l) * n + d] + acc[(48 + l) * n + d]);
    out[d] = tn_reduce16(v);
  }
}
