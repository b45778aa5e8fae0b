/*
 * quants.c: scalar reference kernels for the float types and the 32-element
 * block quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1).
 *
 * These define the arithmetic; the SIMD versions must agree with them up to
 * float summation order. Block formats (kernels_internal.h):
 *
 *   Q4_0  x = d * (q - 8),  q in 0..15,  d = max / -8 (max: largest |x|,
 *         sign kept, so that value lands exactly on q = 0)
 *   Q4_1  x = d * q + m,    q in 0..15,  d = (max - min) / 15, m = min
 *   Q5_0  x = d * (q - 16), q in 0..31,  d = max / -16
 *   Q5_1  x = d * q + m,    q in 0..31,  d = (max - min) / 31
 *   Q8_0  x = d * q,        q in -127..127, d = amax / 127
 *   Q8_1  as Q8_0, plus s = d * sum(q) so that a Q4_1/Q5_1 dot can add its
 *         min term as m * s without touching the quants.
 *
 * In the 4- and 5-bit types element j of a block sits in the low nibble of
 * qs[j] and element j + 16 in the high nibble; the fifth bit of element j is
 * bit j of qh (read as a little-endian uint32).
 *
 * Rounding follows the format definitions: Q4/Q5 add 0.5 (after the offset)
 * and truncate. n is always a multiple of the block size; callers check that.
 *
 * Q8_0 / Q8_1 are the activation types, and their quantizer is specified
 * exactly, because every SIMD level must produce the same bytes (and the
 * same bytes as llama.cpp's CPU backend, whose logits we compare against:
 * a one-step difference in an activation quant is amplified by the layers
 * that follow). Per block of 32:
 *   amax = max |x|;  d = amax / 127 (stored as f16);
 *   id = 127 / amax (0 when amax == 0) -- NOT 1 / d, which rounds twice;
 *   q = x * id rounded half to EVEN (nearbyintf in the default rounding
 *       mode; _mm256_round_ps(.., _MM_FROUND_TO_NEAREST_INT) in SIMD);
 *   Q8_1 only: s = f16(d * (float)sum(q)).
 */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

#define FP16(h) tn_fp16_to_fp32(h)

/* ---- float types */

void tn_dequant_f32_ref(const void *x, float *y, int64_t n) {
  memcpy(y, x, (size_t)n * sizeof(float));
}

void tn_quant_f32_ref(const float *x, void *y, int64_t n) {
  memcpy(y, x, (size_t)n * sizeof(float));
}

void tn_dequant_f16_ref(const void *vx, float *y, int64_t n) {
  const uint16_t *x = vx;
  for (int64_t i = 0; i < n; i++) y[i] = tn_fp16_to_fp32(x[i]);
}

void tn_quant_f16_ref(const float *x, void *vy, int64_t n) {
  uint16_t *y = vy;
  for (int64_t i = 0; i < n; i++) y[i] = tn_fp32_to_fp16(x[i]);
}

void tn_dequant_bf16_ref(const void *vx, float *y, int64_t n) {
  const uint16_t *x = vx;
  for (int64_t i = 0; i < n; i++) y[i] = tn_bf16_to_fp32(x[i]);
}

void tn_quant_bf16_ref(const float *x, void *vy, int64_t n) {
  uint16_t *y = vy;
  for (int64_t i = 0; i < n; i++) y[i] = tn_fp32_to_bf16(x[i]);
}

/* Float dots accumulate in double: the reference should not be the thing
 * whose rounding we argue about. */
void tn_vec_dot_f32_f32_ref(int64_t n, float *s, const void *vx,
                            const void *vy) {
  const float *x = vx, *y = vy;
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++) sum += (double)x[i] * y[i];
  *s = (float)sum;
}

void tn_vec_dot_f16_f32_ref(int64_t n, float *s, const void *vx,
                            const void *vy) {
  const uint16_t *x = vx;
  const float *y = vy;
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++) sum += (double)tn_fp16_to_fp32(x[i]) * y[i];
  *s = (float)sum;
}

void tn_vec_dot_bf16_f32_ref(int64_t n, float *s, const void *vx,
                             const void *vy) {
  const uint16_t *x = vx;
  const float *y = vy;
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++) sum += (double)tn_bf16_to_fp32(x[i]) * y[i];
  *s = (float)sum;
}

/* ---- helpers */

static void block_minmax(const float *x, int n, float *mn, float *mx) {
  float lo = x[0], hi = x[0];
  for (int j = 1; j < n; j++) {
    lo = x[j] < lo ? x[j] : lo;
    hi = x[j] > hi ? x[j] : hi;
  }
  *mn = lo;
  *mx = hi;
}

/* The element with the largest magnitude, sign kept. */
static float block_signed_max(const float *x, int n) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; j++) {
    if (fabsf(x[j]) > amax) {
      amax = fabsf(x[j]);
      max = x[j];
    }
  }
  return max;
}

static inline uint32_t load_qh(const uint8_t qh[4]) {
  return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 |
         (uint32_t)qh[3] << 24;
}

static inline void store_qh(uint8_t qh[4], uint32_t v) {
  qh[0] = (uint8_t)v;
  qh[1] = (uint8_t)(v >> 8);
  qh[2] = (uint8_t)(v >> 16);
  qh[3] = (uint8_t)(v >> 24);
}

static inline int clampi(int v, int lo, int hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

/* ---- Q4_0 */

void tn_quant_q4_0_ref(const float *x, void *vy, int64_t n) {
  struct block_q4_0 *y = vy;
  for (int64_t b = 0; b < n / QK4_0; b++, x += QK4_0) {
    float max = block_signed_max(x, QK4_0);
    float d = max / -8.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = tn_fp32_to_fp16(d);
    for (int j = 0; j < QK4_0 / 2; j++) {
      int q0 = clampi((int)(x[j] * id + 8.5f), 0, 15);
      int q1 = clampi((int)(x[j + QK4_0 / 2] * id + 8.5f), 0, 15);
      y[b].qs[j] = (uint8_t)(q0 | q1 << 4);
    }
  }
}

void tn_dequant_q4_0_ref(const void *vx, float *y, int64_t n) {
  const struct block_q4_0 *x = vx;
  for (int64_t b = 0; b < n / QK4_0; b++, y += QK4_0) {
    float d = FP16(x[b].d);
    for (int j = 0; j < QK4_0 / 2; j++) {
      y[j] = d * (float)((x[b].qs[j] & 0xf) - 8);
      y[j + QK4_0 / 2] = d * (float)((x[b].qs[j] >> 4) - 8);
    }
  }
}

void tn_vec_dot_q4_0_q8_0_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const struct block_q4_0 *x = vx;
  const struct block_q8_0 *y = vy;
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK4_0; b++) {
    int acc = 0;
    for (int j = 0; j < QK4_0 / 2; j++) {
      acc += ((x[b].qs[j] & 0xf) - 8) * y[b].qs[j];
      acc += ((x[b].qs[j] >> 4) - 8) * y[b].qs[j + QK4_0 / 2];
    }
    sum += FP16(x[b].d) * FP16(y[b].d) * (float)acc;
  }
  *s = sum;
}

/* ---- Q4_1 */

void tn_quant_q4_1_ref(const float *x, void *vy, int64_t n) {
  struct block_q4_1 *y = vy;
  for (int64_t b = 0; b < n / QK4_1; b++, x += QK4_1) {
    float mn, mx;
    block_minmax(x, QK4_1, &mn, &mx);
    float d = (mx - mn) / 15.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = tn_fp32_to_fp16(d);
    y[b].m = tn_fp32_to_fp16(mn);
    for (int j = 0; j < QK4_1 / 2; j++) {
      int q0 = clampi((int)((x[j] - mn) * id + 0.5f), 0, 15);
      int q1 = clampi((int)((x[j + QK4_1 / 2] - mn) * id + 0.5f), 0, 15);
      y[b].qs[j] = (uint8_t)(q0 | q1 << 4);
    }
  }
}

void tn_dequant_q4_1_ref(const void *vx, float *y, int64_t n) {
  const struct block_q4_1 *x = vx;
  for (int64_t b = 0; b < n / QK4_1; b++, y += QK4_1) {
    float d = FP16(x[b].d), m = FP16(x[b].m);
    for (int j = 0; j < QK4_1 / 2; j++) {
      y[j] = d * (float)(x[b].qs[j] & 0xf) + m;
      y[j + QK4_1 / 2] = d * (float)(x[b].qs[j] >> 4) + m;
    }
  }
}

void tn_vec_dot_q4_1_q8_1_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const struct block_q4_1 *x = vx;
  const struct block_q8_1 *y = vy;
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK4_1; b++) {
    int acc = 0;
    for (int j = 0; j < QK4_1 / 2; j++) {
      acc += (x[b].qs[j] & 0xf) * y[b].qs[j];
      acc += (x[b].qs[j] >> 4) * y[b].qs[j + QK4_1 / 2];
    }
    sum += FP16(x[b].d) * FP16(y[b].d) * (float)acc +
           FP16(x[b].m) * FP16(y[b].s);
  }
  *s = sum;
}

/* ---- Q5_0 */

void tn_quant_q5_0_ref(const float *x, void *vy, int64_t n) {
  struct block_q5_0 *y = vy;
  for (int64_t b = 0; b < n / QK5_0; b++, x += QK5_0) {
    float max = block_signed_max(x, QK5_0);
    float d = max / -16.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = tn_fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_0 / 2; j++) {
      int q0 = clampi((int)(x[j] * id + 16.5f), 0, 31);
      int q1 = clampi((int)(x[j + QK5_0 / 2] * id + 16.5f), 0, 31);
      y[b].qs[j] = (uint8_t)((q0 & 0xf) | (q1 & 0xf) << 4);
      qh |= (uint32_t)(q0 >> 4) << j;
      qh |= (uint32_t)(q1 >> 4) << (j + QK5_0 / 2);
    }
    store_qh(y[b].qh, qh);
  }
}

void tn_dequant_q5_0_ref(const void *vx, float *y, int64_t n) {
  const struct block_q5_0 *x = vx;
  for (int64_t b = 0; b < n / QK5_0; b++, y += QK5_0) {
    float d = FP16(x[b].d);
    uint32_t qh = load_qh(x[b].qh);
    for (int j = 0; j < QK5_0 / 2; j++) {
      int q0 = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
      int q1 = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
      y[j] = d * (float)(q0 - 16);
      y[j + QK5_0 / 2] = d * (float)(q1 - 16);
    }
  }
}

void tn_vec_dot_q5_0_q8_0_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const struct block_q5_0 *x = vx;
  const struct block_q8_0 *y = vy;
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK5_0; b++) {
    uint32_t qh = load_qh(x[b].qh);
    int acc = 0;
    for (int j = 0; j < QK5_0 / 2; j++) {
      int q0 = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
      int q1 = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
      acc += (q0 - 16) * y[b].qs[j] + (q1 - 16) * y[b].qs[j + QK5_0 / 2];
    }
    sum += FP16(x[b].d) * FP16(y[b].d) * (float)acc;
  }
  *s = sum;
}

/* ---- Q5_1 */

void tn_quant_q5_1_ref(const float *x, void *vy, int64_t n) {
  struct block_q5_1 *y = vy;
  for (int64_t b = 0; b < n / QK5_1; b++, x += QK5_1) {
    float mn, mx;
    block_minmax(x, QK5_1, &mn, &mx);
    float d = (mx - mn) / 31.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = tn_fp32_to_fp16(d);
    y[b].m = tn_fp32_to_fp16(mn);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_1 / 2; j++) {
      int q0 = clampi((int)((x[j] - mn) * id + 0.5f), 0, 31);
      int q1 = clampi((int)((x[j + QK5_1 / 2] - mn) * id + 0.5f), 0, 31);
      y[b].qs[j] = (uint8_t)((q0 & 0xf) | (q1 & 0xf) << 4);
      qh |= (uint32_t)(q0 >> 4) << j;
      qh |= (uint32_t)(q1 >> 4) << (j + QK5_1 / 2);
    }
    store_qh(y[b].qh, qh);
  }
}

void tn_dequant_q5_1_ref(const void *vx, float *y, int64_t n) {
  const struct block_q5_1 *x = vx;
  for (int64_t b = 0; b < n / QK5_1; b++, y += QK5_1) {
    float d = FP16(x[b].d), m = FP16(x[b].m);
    uint32_t qh = load_qh(x[b].qh);
    for (int j = 0; j < QK5_1 / 2; j++) {
      int q0 = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
      int q1 = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
      y[j] = d * (float)q0 + m;
      y[j + QK5_1 / 2] = d * (float)q1 + m;
    }
  }
}

void tn_vec_dot_q5_1_q8_1_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const struct block_q5_1 *x = vx;
  const struct block_q8_1 *y = vy;
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK5_1; b++) {
    uint32_t qh = load_qh(x[b].qh);
    int acc = 0;
    for (int j = 0; j < QK5_1 / 2; j++) {
      int q0 = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
      int q1 = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
      acc += q0 * y[b].qs[j] + q1 * y[b].qs[j + QK5_1 / 2];
    }
    sum += FP16(x[b].d) * FP16(y[b].d) * (float)acc +
           FP16(x[b].m) * FP16(y[b].s);
  }
  *s = sum;
}

/* ---- Q8_0 / Q8_1 */

void tn_quant_q8_0_ref(const float *x, void *vy, int64_t n) {
  struct block_q8_0 *y = vy;
  for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    y[b].d = tn_fp32_to_fp16(d);
    for (int j = 0; j < QK8_0; j++) y[b].qs[j] = (int8_t)nearbyintf(x[j] * id);
  }
}

void tn_dequant_q8_0_ref(const void *vx, float *y, int64_t n) {
  const struct block_q8_0 *x = vx;
  for (int64_t b = 0; b < n / QK8_0; b++, y += QK8_0) {
    float d = FP16(x[b].d);
    for (int j = 0; j < QK8_0; j++) y[j] = d * (float)x[b].qs[j];
  }
}

void tn_vec_dot_q8_0_q8_0_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const struct block_q8_0 *x = vx;
  const struct block_q8_0 *y = vy;
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK8_0; b++) {
    int acc = 0;
    for (int j = 0; j < QK8_0; j++) acc += x[b].qs[j] * y[b].qs[j];
    sum += FP16(x[b].d) * FP16(y[b].d) * (float)acc;
  }
  *s = sum;
}

void tn_quant_q8_1_ref(const float *x, void *vy, int64_t n) {
  struct block_q8_1 *y = vy;
  for (int64_t b = 0; b < n / QK8_1; b++, x += QK8_1) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_1; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK8_1; j++) {
      y[b].qs[j] = (int8_t)nearbyintf(x[j] * id);
      sum += y[b].qs[j];
    }
    y[b].d = tn_fp32_to_fp16(d);
    y[b].s = tn_fp32_to_fp16(d * (float)sum);
  }
}

void tn_dequant_q8_1_ref(const void *vx, float *y, int64_t n) {
  const struct block_q8_1 *x = vx;
  for (int64_t b = 0; b < n / QK8_1; b++, y += QK8_1) {
    float d = FP16(x[b].d);
    for (int j = 0; j < QK8_1; j++) y[j] = d * (float)x[b].qs[j];
  }
}
