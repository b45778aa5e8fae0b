/*
 * ops_avx2.c: AVX2/FMA/F16C versions of the attention sums, exp, softmax
 * and SiLU in ops.c. Each gives the bits of its scalar version: the same
 * operations per lane, in the same order (ops.c says which order and why).
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

/* tn_reduce16 of lo (lanes 0..7) and hi (lanes 8..15). */
static inline float reduce16(__m256 lo, __m256 hi) {
  __m256 t8 = _mm256_add_ps(lo, hi);
  __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

/* tn_exp_poly on 8 lanes. */
static inline __m256 exp8(__m256 x) {
  const __m256 shift = _mm256_set1_ps(0x1.8p23f);
  __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), shift);
  __m256 n = _mm256_sub_ps(z, shift);
  __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                              _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
  __m256 u = _mm256_mul_ps(b, b);
  __m256 j = _mm256_fmadd_ps(
      _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
                                      _mm256_set1_ps(0x1.573e2ep-5f)),
                      u,
                      _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
                                      _mm256_set1_ps(0x1.fffdb6p-2f))),
      u, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b, _mm256_set1_ps(1.0f)));
  /* j * 2^n is exact while the result stays normal: n in [-125, 126]. */
  __m256 lo = _mm256_cmp_ps(n, _mm256_set1_ps(-125.0f), _CMP_GE_OQ);
  __m256 hi = _mm256_cmp_ps(n, _mm256_set1_ps(126.0f), _CMP_LE_OQ);
  if (_mm256_movemask_ps(_mm256_and_ps(lo, hi)) == 0xff) {
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(j, _mm256_castsi256_ps(e));
  }
  float jj[8], nn[8], r[8];
  _mm256_storeu_ps(jj, j);
  _mm256_storeu_ps(nn, n);
  for (int l = 0; l < 8; l++) {
    if (!(fabsf(nn[l]) <= 192.0f)) /* out of range, or NaN */
      r[l] = nn[l] != nn[l] ? nn[l] : nn[l] <= 0.0f ? 0.0f : INFINITY;
    else
      r[l] = ldexpf(jj[l], (int)nn[l]);
  }
  return _mm256_loadu_ps(r);
}

float tn_logsumexp_avx2(const float *x, int64_t n) {
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(_mm256_loadu_ps(x + i), vmx);
  float m8[8], mx = -INFINITY;
  _mm256_storeu_ps(m8, vmx);
  for (int l = 0; l < 8; l++) mx = m8[l] > mx ? m8[l] : mx;
  for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  if (!(mx > -INFINITY) || isinf(mx)) return mx;
  const __m256 vm = _mm256_set1_ps(mx);
  double sum = 0.0;
  for (i = 0; i + 16 <= n; i += 16)
    sum += (double)reduce16(exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)),
                            exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm)));
  if (i < n) {
    float v[16];
    for (int l = 0; l < 16; l++) v[l] = i + l < n ? x[i + l] : -INFINITY;
    sum += (double)reduce16(exp8(_mm256_sub_ps(_mm256_loadu_ps(v), vm)),
                            exp8(_mm256_sub_ps(_mm256_loadu_ps(v + 8), vm)));
  }
  return mx + (float)log(sum);
}

void tn_softmax_avx2(float *x, int64_t n, int64_t off) {
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(x + i));
  float m8[8], mx = -INFINITY;
  _mm256_storeu_ps(m8, vmx);
  for (int l = 0; l < 8; l++) mx = m8[l] > mx ? m8[l] : mx;
  for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;

  __m256 vm = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
  if (i < n) {
    float t[8] = {0};
    memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
    _mm256_storeu_ps(t, exp8(_mm256_sub_ps(_mm256_loadu_ps(t), vm)));
    memcpy(x + i, t, (size_t)(n - i) * sizeof(float));
  }

  /* Chunks of 16 aligned to lane (i + off) % 16; lanes outside are 0. */
  double sum = 0.0;
  int64_t c0 = -off;
  if (c0 < 0) {
    float v[16] = {0};
    int64_t m = n < 16 + c0 ? n : 16 + c0;
    memcpy(v - c0, x, (size_t)m * sizeof(float));
    sum += (double)reduce16(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
    c0 += 16;
  }
  for (; c0 + 16 <= n; c0 += 16)
    sum += (double)reduce16(_mm256_loadu_ps(x + c0), _mm256_loadu_ps(x + c0 + 8));
  if (c0 < n) {
    float v[16] = {0};
    memcpy(v, x + c0, (size_t)(n - c0) * sizeof(float));
    sum += (double)reduce16(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  }

  __m256 inv = _mm256_set1_ps((float)(1.0 / sum));
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (; i < n; i++) x[i] *= _mm256_cvtss_f32(inv);
}

void tn_silu_mul_avx2(float *gate, const float *up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256 e = exp8(_mm256_sub_ps(zero, g));
    __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  tn_silu_mul_ref(gate + i, up + i, n - i);
}

/* tn_gelu_mul: the f16 table read by a gather (4 bytes at entry h: the
 * table has two spare entries at the end). */
void tn_gelu_mul_avx2(float *gate, const float *up, int64_t n,
                      const uint16_t *table) {
  const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256i h = _mm256_cvtepu16_epi32(
        _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i t = _mm256_and_si256(
        _mm256_i32gather_epi32((const int *)(const void *)table, h, 2), low16);
    t = _mm256_permute4x64_epi64(_mm256_packus_epi32(t, t), 0x08);
    __m256 y = _mm256_cvtph_ps(_mm256_castsi256_si128(t));
    y = _mm256_blendv_ps(y, g, _mm256_cmp_ps(g, hi, _CMP_GE_OQ));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(g, lo, _CMP_LE_OQ));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(y, _mm256_loadu_ps(up + i)));
  }
  tn_gelu_mul_ref(gate + i, up + i, n - i, table);
}

/* tn_attn_dot: 64 lanes as eight 8-lane accumulators. */
static inline __attribute__((always_inline)) float attn_dot(const float *x,
                                                             const float *y,
                                                             int64_t n) {
  __m256 a[8];
  for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
  int64_t np = n & ~(int64_t)63, i = 0;
  for (; i < np; i += 64)
    for (int k = 0; k < 8; k++)
      a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * k),
                             _mm256_loadu_ps(y + i + 8 * k), a[k]);
  /* quarters q0 = a0:a1, q1 = a2:a3, q2 = a4:a5, q3 = a6:a7 */
  __m256 lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
  __m256 hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
  double s = reduce16(lo, hi);
  for (; i < n; i++) s += (double)(x[i] * y[i]);
  return (float)s;
}

void tn_attn_dot_rows_avx2(const float *x, const float *y, int64_t y_stride,
                           int ny, float *const *out, int64_t n, float scale) {
  for (int i = 0; i < ny; i++)
    *out[i] = attn_dot(x, y + (int64_t)i * y_stride, n) * scale;
}

/* attn_dot with x an f16 row, converted in registers: the same products
 * in the same order (f16 to f32 is exact). */
static inline __attribute__((always_inline)) float attn_dot_h(const uint16_t *x,
                                                               const float *y,
                                                               int64_t n) {
  __m256 a[8];
  for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
  int64_t np = n & ~(int64_t)63, i = 0;
  for (; i < np; i += 64)
    for (int k = 0; k < 8; k++)
      a[k] = _mm256_fmadd_ps(
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8 * k))),
          _mm256_loadu_ps(y + i + 8 * k), a[k]);
  __m256 lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
  __m256 hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
  double s = reduce16(lo, hi);
  for (; i < n; i++) s += (double)(tn_fp16_to_fp32(x[i]) * y[i]);
  return (float)s;
}

void tn_attn_dot_rows_f16_avx2(const uint16_t *x, const float *y,
                               int64_t y_stride, int ny, float *const *out,
                               int64_t n, float scale) {
  for (int i = 0; i < ny; i++)
    *out[i] = attn_dot_h(x, y + (int64_t)i * y_stride, n) * scale;
}

void tn_attn_dot_block_f16_avx2(const uint16_t *k, int64_t k_stride, int nk,
                                const float *y, float *out, int64_t n,
                                float scale) {
  for (int r = 0; r < nk; r++)
    out[r] = attn_dot_h(k + (int64_t)r * k_stride, y, n) * scale;
}

/* one lane of tn_attn_lanes (positions 64 apart), 64 dims at a time in
 * eight registers */
void tn_attn_lane_avx2(float *dst, const uint16_t *const *rows, const float *w,
                       int64_t cnt, int64_t n) {
  const int64_t step = 64;
  int64_t d0 = 0;
  for (; d0 + 64 <= n; d0 += 64) {
    __m256 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < cnt; c++) {
      const uint16_t *r = rows[c * step] + d0;
      const __m256 wv = _mm256_set1_ps(w[c * step]);
      for (int k = 0; k < 8; k++)
        a[k] = _mm256_fmadd_ps(
            wv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + 8 * k))), a[k]);
    }
    for (int k = 0; k < 8; k++) _mm256_storeu_ps(dst + d0 + 8 * k, a[k]);
  }
  tn_attn_lane_ref(dst, rows, w, cnt, d0, n);
}

/* Lane k of tn_attn_lanes for dims [d, d + 8): its rows from first on,
 * every 64th, up to p1. */
static inline __attribute__((always_inline)) __m256 lane8(
    const uint16_t *const *rows, const float *w, int32_t p0, int32_t p1,
    int32_t first, int64_t d) {
  __m256 a = _mm256_setzero_ps();
  for (int32_t p = first; p <= p1; p += 64)
    a = _mm256_fmadd_ps(
        _mm256_set1_ps(w[p - p0]),
        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows[p] + d))), a);
  return a;
}

/* tn_attn_lanes then tn_attn_reduce, 8 dims at a time with no lane
 * buffer: each fold operand is its lane's sum, formed where the fold
 * needs it (the same operations per lane and the same fold). */
void tn_attn_values_avx2(float *out, const uint16_t *const *rows,
                         const float *w, int32_t p0, int32_t p1, int64_t n) {
  int32_t first[64];
  for (int32_t k = 0; k < 64; k++) first[k] = p0 + ((k - p0 % 64) + 64) % 64;
  for (int64_t d = 0; d + 8 <= n; d += 8) {
    __m256 t8[8];
    for (int l = 0; l < 8; l++) {
#define LN(k) lane8(rows, w, p0, p1, first[k], d)
      __m256 v0 = _mm256_add_ps(_mm256_add_ps(LN(l), LN(32 + l)),
                                _mm256_add_ps(LN(16 + l), LN(48 + l)));
      __m256 v1 = _mm256_add_ps(_mm256_add_ps(LN(8 + l), LN(40 + l)),
                                _mm256_add_ps(LN(24 + l), LN(56 + l)));
#undef LN
      t8[l] = _mm256_add_ps(v0, v1);
    }
    __m256 t4[4];
    for (int l = 0; l < 4; l++) t4[l] = _mm256_add_ps(t8[l], t8[l + 4]);
    _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_add_ps(t4[0], t4[2]),
                                            _mm256_add_ps(t4[1], t4[3])));
  }
}

void tn_attn_reduce_avx2(const float *acc, float *out, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    /* v[l] for 8 dims at once: lanes are rows of acc */
    __m256 v[16];
    for (int l = 0; l < 16; l++)
      v[l] = _mm256_add_ps(
          _mm256_add_ps(_mm256_loadu_ps(acc + l * n + d),
                        _mm256_loadu_ps(acc + (32 + l) * n + d)),
          _mm256_add_ps(_mm256_loadu_ps(acc + (16 + l) * n + d),
                        _mm256_loadu_ps(acc + (48 + l) * n + d)));
    __m256 t8[8], t4[4];
    for (int l = 0; l < 8; l++) t8[l] = _mm256_add_ps(v[l], v[l + 8]);
    for (int l = 0; l < 4; l++) t4[l] = _mm256_add_ps(t8[l], t8[l + 4]);
    _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_add_ps(t4[0], t4[2]),
                                            _mm256_add_ps(t4[1], t4[3])));
  }
  tn_attn_reduce_ref(acc, out, d, n);
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
