/*
 * ops.c: float32 row operations of the forward pass (norms, activations,
 * softmax, RoPE) and the f16 dot/axpy used by attention over the KV cache.
 *
 * These are cheap next to the matrix products; the scalar loops are written
 * so the compiler vectorises them. The f16 attention helpers are the
 * exception: they run over the whole context every step, so they have AVX2
 * versions (ops_avx2.c) chosen by tn_kernels_level().
 */
#include <math.h>
#include <pthread.h>

#include "kernels/kernels.h"
#include "base/base.h"
#include "kernels/kernels_internal.h"

#define TN_ASSERT_ROPE(x) TN_ASSERT(x)

void tn_rms_norm_ex(const float *x, const float *w, float *y, int64_t n,
                    float eps, bool one_plus) {
  /* Squares summed in double, as llama.cpp does: the mean must not depend
   * on the summation order (batching, SIMD width). */
  double ss = 0.0;
  for (int64_t i = 0; i < n; i++) ss += (double)(x[i] * x[i]);
  float mean = (float)(ss / (double)n);
  float scale = 1.0f / sqrtf(mean + eps);
  if (!w) {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale;
  } else if (one_plus) {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * (1.0f + w[i]);
  } else {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
  }
}

void tn_rms_norm(const float *x, const float *w, float *y, int64_t n,
                 float eps) {
  tn_rms_norm_ex(x, w, y, n, eps, false);
}

void tn_softmax(float *x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    x[i] = expf(x[i] - mx);
    sum += x[i];
  }
  float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void tn_silu_mul(float *gate, const float *up, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

/* GELU (tanh approximation) as llama.cpp's CPU backend evaluates it: for
 * |x| < 10 the input is rounded to f16 and the result read from a table of
 * f16(gelu(h)) over all 65,536 halves; below -10 it is 0, above 10 it is x.
 * Matching this keeps tern's Gemma logits next to the reference's. */
static uint16_t gelu_table[1 << 16];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

static float gelu_f32(float x) {
  const float c = 0.79788456080286535587989211986876f; /* sqrt(2/pi) */
  return 0.5f * x * (1.0f + tanhf(c * x * (1.0f + 0.044715f * x * x)));
}

static void gelu_table_init(void) {
  for (uint32_t h = 0; h < (1u << 16); h++)
    gelu_table[h] = tn_fp32_to_fp16(gelu_f32(tn_fp16_to_fp32((uint16_t)h)));
}

void tn_gelu_mul(float *gate, const float *up, int64_t n) {
  pthread_once(&gelu_once, gelu_table_init);
  for (int64_t i = 0; i < n; i++) {
    float g = gate[i], y;
    if (g <= -10.0f)
      y = 0.0f;
    else if (g >= 10.0f)
      y = g;
    else
      y = tn_fp16_to_fp32(gelu_table[tn_fp32_to_fp16(g)]);
    gate[i] = y * up[i];
  }
}

void tn_vec_add(float *y, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

void tn_vec_scale(float *y, float s, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] *= s;
}

float tn_vec_dot_f32_avx2(const float *x, const float *y, int64_t n);
void tn_vec_axpy_avx2(float *y, float a, const float *x, int64_t n);
void tn_vec_dot_f32_rows_avx2(const float *x, const float *y, int64_t y_stride,
                              int ny, float *const *out, int64_t n,
                              float scale);
void tn_vec_axpy_rows_avx2(float *y, int64_t y_stride, const float *a, int ny,
                           const float *x, int64_t n);
void tn_round_f16_avx2(float *x, int64_t n);

/* Attention runs these over the whole context, so they are dispatched;
 * each level always uses the same one (batch invariance). */
void tn_vec_axpy(float *y, float a, const float *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_vec_axpy_avx2(y, a, x, n);
    return;
  }
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

float tn_vec_dot_f32(const float *x, const float *y, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) return tn_vec_dot_f32_avx2(x, y, n);
  float s[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) s[j] += x[i + j] * y[i + j];
  float r = 0.0f;
  for (; i < n; i++) r += x[i] * y[i];
  for (int j = 0; j < 8; j++) r += s[j];
  return r;
}

void tn_vec_dot_f32_rows(const float *x, const float *y, int64_t y_stride,
                         int ny, float *const *out, int64_t n, float scale) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_vec_dot_f32_rows_avx2(x, y, y_stride, ny, out, n, scale);
    return;
  }
  for (int i = 0; i < ny; i++)
    *out[i] = tn_vec_dot_f32(x, y + (int64_t)i * y_stride, n) * scale;
}

void tn_vec_axpy_rows(float *y, int64_t y_stride, const float *a, int ny,
                      const float *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_vec_axpy_rows_avx2(y, y_stride, a, ny, x, n);
    return;
  }
  for (int i = 0; i < ny; i++) tn_vec_axpy(y + (int64_t)i * y_stride, a[i], x, n);
}

void tn_round_f16(float *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_round_f16_avx2(x, n);
    return;
  }
  for (int64_t i = 0; i < n; i++) x[i] = tn_fp16_to_fp32(tn_fp32_to_fp16(x[i]));
}

/* ---- f16 helpers for attention: scalar here, AVX2 in ops_avx2.c */

float tn_vec_dot_f16_avx2(const uint16_t *x, const float *y, int64_t n);
void tn_vec_axpy_f16_avx2(float *y, float a, const uint16_t *x, int64_t n);

float tn_vec_dot_f16(const uint16_t *x, const float *y, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2)
    return tn_vec_dot_f16_avx2(x, y, n);
  float r = 0.0f;
  for (int64_t i = 0; i < n; i++) r += tn_fp16_to_fp32(x[i]) * y[i];
  return r;
}

void tn_vec_axpy_f16(float *y, float a, const uint16_t *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_vec_axpy_f16_avx2(y, a, x, n);
    return;
  }
  for (int64_t i = 0; i < n; i++) y[i] += a * tn_fp16_to_fp32(x[i]);
}

/* ---- RoPE
 *
 * Pair (a, b) at dims (i, i + n_rot/2) for NeoX style, (2i, 2i+1) for the
 * original; theta_i = pos * freq_scale * base^(-2i/n_rot). */
void tn_rope_cache(float *cs, int64_t n_rot, int64_t pos, float freq_base,
                   float freq_scale, const float *freq_factors) {
  /* The angle advances by a constant factor per pair, in float, the way
   * llama.cpp computes it (so positions rotate identically). */
  int64_t half = n_rot / 2;
  float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
  float theta = (float)pos;
  for (int64_t i = 0; i < half; i++) {
    float a = (freq_factors ? theta / freq_factors[i] : theta) * freq_scale;
    cs[2 * i] = cosf(a);
    cs[2 * i + 1] = sinf(a);
    theta *= theta_scale;
  }
}

void tn_rope_apply(float *x, const float *cs, int64_t n_rot, bool neox) {
  int64_t half = n_rot / 2;
  for (int64_t i = 0; i < half; i++) {
    float c = cs[2 * i], s = cs[2 * i + 1];
    int64_t ia = neox ? i : 2 * i;
    int64_t ib = neox ? i + half : 2 * i + 1;
    float a = x[ia], b = x[ib];
    x[ia] = a * c - b * s;
    x[ib] = a * s + b * c;
  }
}

void tn_rope(float *x, int64_t n_rot, int64_t pos, float freq_base,
             float freq_scale, bool neox) {
  float cs[2048];
  TN_ASSERT_ROPE(n_rot <= 2048);
  tn_rope_cache(cs, n_rot, pos, freq_base, freq_scale, NULL);
  tn_rope_apply(x, cs, n_rot, neox);
}
