/*
 * quants_k_internal.h: helpers shared by the K-quant kernel files
 * (quants_k.c, quants_k_avx2.c, quants_k_avx512.c) and their unit test.
 *
 * The half-float converters are inline here so that the kernels do not
 * depend on a function call per block; they agree bit for bit with IEEE
 * binary16 (round to nearest even on the way down).
 */
#ifndef TN_QUANTS_K_INTERNAL_H
#define TN_QUANTS_K_INTERNAL_H

#include <stdint.h>
#include <string.h>

static inline float tn_k_bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

static inline uint32_t tn_k_f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float tn_k_fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) /* inf / nan */
    return tn_k_bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) { /* zero / subnormal: man * 2^-24 */
    float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return tn_k_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t tn_k_fp32_to_fp16(float f) {
  const uint32_t u = tn_k_f32_to_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) /* inf / nan (keep nan quiet) */
    return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0));
  if (a >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
    return (uint16_t)(sign | 0x7c00);
  if (a < 0x38800000u) { /* below 2^-14: subnormal half (or zero) */
    /* Adding 0.5 puts the half's subnormal units in the low mantissa bits
     * and lets the FPU round to nearest even. */
    float v = tn_k_bits_to_f32(a) + 0.5f;
    return (uint16_t)(sign | (tn_k_f32_to_bits(v) - 0x3f000000u));
  }
  /* Normal: rebias the exponent, round the 13 dropped bits to even. */
  uint32_t r = a + ((uint32_t)(15 - 127) << 23) + 0xfff + ((a >> 13) & 1);
  return (uint16_t)(sign | (r >> 13));
}

/* Sub-block j's 6-bit scale and min from a Q4_K / Q5_K scales[12]. */
void tn_k_scale_min_get(int j, const uint8_t *q, uint8_t *sc, uint8_t *m);
/* ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)): an AVX2 horizontal
 * add, the order the K-quant dot products end with (quants_k.c). */
float tn_hsum8(const float *v);

#endif /* TN_QUANTS_K_INTERNAL_H */
