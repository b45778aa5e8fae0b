/*
 * ops_avx2.c: AVX2/F16C versions of the attention helpers in ops.c.
 */
#include <immintrin.h>

#include "kernels/kernels.h"

static inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

float tn_vec_dot_f16_avx2(const uint16_t *x, const float *y, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
    __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8)));
    acc0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(y + i + 8), acc1);
  }
  float r = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) r += tn_fp16_to_fp32(x[i]) * y[i];
  return r;
}

void tn_vec_axpy_f16_avx2(float *y, float a, const uint16_t *x, int64_t n) {
  __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, xv, _mm256_loadu_ps(y + i)));
  }
  for (; i < n; i++) y[i] += a * tn_fp16_to_fp32(x[i]);
}

static inline __attribute__((always_inline)) float dot_f32(const float *x,
                                                            const float *y,
                                                            int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
  float r = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) r += x[i] * y[i];
  return r;
}

float tn_vec_dot_f32_avx2(const float *x, const float *y, int64_t n) {
  return dot_f32(x, y, n);
}

/* out[i] = dot(x, y + i * y_stride) * scale, each dot exactly as above. */
void tn_vec_dot_f32_rows_avx2(const float *x, const float *y, int64_t y_stride,
                              int ny, float *const *out, int64_t n,
                              float scale) {
  for (int i = 0; i < ny; i++)
    *out[i] = dot_f32(x, y + (int64_t)i * y_stride, n) * scale;
}

static inline __attribute__((always_inline)) void axpy_f32(float *y, float a,
                                                            const float *x,
                                                            int64_t n) {
  __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                            _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

void tn_vec_axpy_avx2(float *y, float a, const float *x, int64_t n) {
  axpy_f32(y, a, x, n);
}

/* y + i * y_stride += a[i] * x for i < ny, each exactly as above. */
void tn_vec_axpy_rows_avx2(float *y, int64_t y_stride, const float *a, int ny,
                           const float *x, int64_t n) {
  for (int i = 0; i < ny; i++) axpy_f32(y + (int64_t)i * y_stride, a[i], x, n);
}

/* x = f32(f16(x)), rounding to nearest even (F16C does IEEE rounding, as
 * tn_fp32_to_fp16 does). */
void tn_round_f16_avx2(float *x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(x + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; i++) x[i] = tn_fp16_to_fp32(tn_fp32_to_fp16(x[i]));
}
