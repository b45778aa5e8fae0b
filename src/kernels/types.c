/*
 * types.c: the type traits table and half-float conversions.
 *
 * ref_traits[] is indexed by enum tn_type (ggml's numbering) and lists every
 * id GGUF defines, including the ones we cannot compute with (IQ*, TQ*,
 * MXFP4, the integer types, F64, Q2_K/Q3_K): those carry name and sizes only,
 * so a GGUF reader can size their tensors and reject them politely. Ids that
 * GGUF retired (4, 5, 31..33, 36..38) have name == NULL.
 *
 * These are the scalar reference kernels. dispatch.c copies this table once
 * per CPU level and overrides the entries that have SIMD versions.
 *
 * Activation types (vec_dot_type): Q4_0/Q5_0/Q8_0 weights dot against Q8_0,
 * Q4_1/Q5_1 against Q8_1, K-quants against Q8_K, and the float weight types
 * (F32, F16, BF16) against plain F32 activations: converting activations to
 * f16 would save nothing (the weights dominate the traffic) and lose
 * precision.
 *
 * Q8_1 is 36 bytes (two f16: d and s = d*sum(qs)), as ggml lays it out
 * today; gguf-py's table still says 40 (the old float d/s layout). No GGUF
 * file stores Q8_1 tensors, so only our own activations ever use it.
 */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

/* ---- half floats: scalar, round-to-nearest-even, inf/nan/subnormals */

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

float tn_fp16_to_fp32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  if (exp == 0) {
    /* zero or subnormal: mant * 2^-24, exact in f32 */
    float v = (float)mant * 0x1p-24f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t tn_fp32_to_fp16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) /* nan: keep it quiet and non-zero */
    return (uint16_t)(sign | 0x7e00 | ((u >> 13) & 0x3ff));
  if (u >= 0x477ff000u) /* >= 65520 rounds to infinity (or is inf) */
    return (uint16_t)(sign | 0x7c00);
  if (u < 0x38800000u) {
    /* below 2^-14: a half subnormal. Adding 0.5 makes the FPU round the
     * value to a multiple of 2^-24 (the ulp of 0.5), nearest-even. */
    float v = bits_f32(u) + 0.5f;
    return (uint16_t)(sign | (f32_bits(v) - 0x3f000000u));
  }
  uint32_t odd = (u >> 13) & 1;
  u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
  return (uint16_t)(sign | (u >> 13));
}

float tn_bf16_to_fp32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t tn_fp32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

void tn_fp16_to_fp32_row(const uint16_t *x, float *y, int64_t n) {
  tn_type_get(TN_TYPE_F16)->to_float(x, y, n);
}

void tn_fp32_to_fp16_row(const float *x, uint16_t *y, int64_t n) {
  tn_type_get(TN_TYPE_F16)->from_float(x, y, n);
}

/* ---- the table */

#define PLAIN(nm, size) {.name = nm, .blck_size = 1, .type_size = size}
#define BLOCK(nm, blck, size) {.name = nm, .blck_size = blck, .type_size = size}

const struct tn_type_traits tn_type_traits_ref[TN_TYPE_COUNT] = {
    [TN_TYPE_F32] = {.name = "F32", .blck_size = 1, .type_size = 4,
                     .to_float = tn_dequant_f32_ref,
                     .from_float = tn_quant_f32_ref,
                     .vec_dot_type = TN_TYPE_F32,
                     .vec_dot = tn_vec_dot_f32_f32_ref},
    [TN_TYPE_F16] = {.name = "F16", .blck_size = 1, .type_size = 2,
                     .to_float = tn_dequant_f16_ref,
                     .from_float = tn_quant_f16_ref,
                     .vec_dot_type = TN_TYPE_F32,
                     .vec_dot = tn_vec_dot_f16_f32_ref},
    [TN_TYPE_BF16] = {.name = "BF16", .blck_size = 1, .type_size = 2,
                      .to_float = tn_dequant_bf16_ref,
                      .from_float = tn_quant_bf16_ref,
                      .vec_dot_type = TN_TYPE_F32,
                      .vec_dot = tn_vec_dot_bf16_f32_ref},
    [TN_TYPE_Q4_0] = {.name = "Q4_0", .blck_size = QK4_0,
                      .type_size = sizeof(struct block_q4_0),
                      .to_float = tn_dequant_q4_0_ref,
                      .from_float = tn_quant_q4_0_ref,
                      .vec_dot_type = TN_TYPE_Q8_0,
                      .vec_dot = tn_vec_dot_q4_0_q8_0_ref},
    [TN_TYPE_Q4_1] = {.name = "Q4_1", .blck_size = QK4_1,
                      .type_size = sizeof(struct block_q4_1),
                      .to_float = tn_dequant_q4_1_ref,
                      .from_float = tn_quant_q4_1_ref,
                      .vec_dot_type = TN_TYPE_Q8_1,
                      .vec_dot = tn_vec_dot_q4_1_q8_1_ref},
    [TN_TYPE_Q5_0] = {.name = "Q5_0", .blck_size = QK5_0,
                      .type_size = sizeof(struct block_q5_0),
                      .to_float = tn_dequant_q5_0_ref,
                      .from_float = tn_quant_q5_0_ref,
                      .vec_dot_type = TN_TYPE_Q8_0,
                      .vec_dot = tn_vec_dot_q5_0_q8_0_ref},
    [TN_TYPE_Q5_1] = {.name = "Q5_1", .blck_size = QK5_1,
                      .type_size = sizeof(struct block_q5_1),
                      .to_float = tn_dequant_q5_1_ref,
                      .from_float = tn_quant_q5_1_ref,
                      .vec_dot_type = TN_TYPE_Q8_1,
                      .vec_dot = tn_vec_dot_q5_1_q8_1_ref},
    [TN_TYPE_Q8_0] = {.name = "Q8_0", .blck_size = QK8_0,
                      .type_size = sizeof(struct block_q8_0),
                      .to_float = tn_dequant_q8_0_ref,
                      .from_float = tn_quant_q8_0_ref,
                      .vec_dot_type = TN_TYPE_Q8_0,
                      .vec_dot = tn_vec_dot_q8_0_q8_0_ref},
    [TN_TYPE_Q8_1] = {.name = "Q8_1", .blck_size = QK8_1,
                      .type_size = sizeof(struct block_q8_1),
                      .to_float = tn_dequant_q8_1_ref,
                      .from_float = tn_quant_q8_1_ref,
                      .vec_dot_type = TN_TYPE_Q8_1},
    [TN_TYPE_Q2_K] = BLOCK("Q2_K", QK_K, 84),
    [TN_TYPE_Q3_K] = BLOCK("Q3_K", QK_K, 110),
    [TN_TYPE_Q4_K] = {.name = "Q4_K", .blck_size = QK_K,
                      .type_size = sizeof(struct block_q4_K),
                      .to_float = tn_dequant_q4_K_ref,
                      .from_float = tn_quant_q4_K_ref,
                      .vec_dot_type = TN_TYPE_Q8_K,
                      .vec_dot = tn_vec_dot_q4_K_q8_K_ref},
    [TN_TYPE_Q5_K] = {.name = "Q5_K", .blck_size = QK_K,
                      .type_size = sizeof(struct block_q5_K),
                      .to_float = tn_dequant_q5_K_ref,
                      .from_float = tn_quant_q5_K_ref,
                      .vec_dot_type = TN_TYPE_Q8_K,
                      .vec_dot = tn_vec_dot_q5_K_q8_K_ref},
    [TN_TYPE_Q6_K] = {.name = "Q6_K", .blck_size = QK_K,
                      .type_size = sizeof(struct block_q6_K),
                      .to_float = tn_dequant_q6_K_ref,
                      .from_float = tn_quant_q6_K_ref,
                      .vec_dot_type = TN_TYPE_Q8_K,
                      .vec_dot = tn_vec_dot_q6_K_q8_K_ref},
    [TN_TYPE_Q8_K] = {.name = "Q8_K", .blck_size = QK_K,
                      .type_size = sizeof(struct block_q8_K),
                      .to_float = tn_dequant_q8_K_ref,
                      .from_float = tn_quant_q8_K_ref,
                      .vec_dot_type = TN_TYPE_Q8_K},
    [TN_TYPE_IQ2_XXS] = BLOCK("IQ2_XXS", QK_K, 66),
    [TN_TYPE_IQ2_XS] = BLOCK("IQ2_XS", QK_K, 74),
    [TN_TYPE_IQ3_XXS] = BLOCK("IQ3_XXS", QK_K, 98),
    [TN_TYPE_IQ1_S] = BLOCK("IQ1_S", QK_K, 50),
    [TN_TYPE_IQ4_NL] = BLOCK("IQ4_NL", 32, 18),
    [TN_TYPE_IQ3_S] = BLOCK("IQ3_S", QK_K, 110),
    [TN_TYPE_IQ2_S] = BLOCK("IQ2_S", QK_K, 82),
    [TN_TYPE_IQ4_XS] = BLOCK("IQ4_XS", QK_K, 136),
    [TN_TYPE_I8] = PLAIN("I8", 1),
    [TN_TYPE_I16] = PLAIN("I16", 2),
    [TN_TYPE_I32] = PLAIN("I32", 4),
    [TN_TYPE_I64] = PLAIN("I64", 8),
    [TN_TYPE_F64] = PLAIN("F64", 8),
    [TN_TYPE_IQ1_M] = BLOCK("IQ1_M", QK_K, 56),
    [TN_TYPE_TQ1_0] = BLOCK("TQ1_0", QK_K, 54),
    [TN_TYPE_TQ2_0] = BLOCK("TQ2_0", QK_K, 66),
    [TN_TYPE_MXFP4] = BLOCK("MXFP4", 32, 17),
};

bool tn_type_valid(int64_t t) {
  return t >= 0 && t < TN_TYPE_COUNT && tn_type_traits_ref[t].name != NULL;
}

const struct tn_type_traits *tn_type_ref(enum tn_type t) {
  return tn_type_valid(t) ? &tn_type_traits_ref[t] : NULL;
}

const char *tn_type_name(enum tn_type t) {
  return tn_type_valid(t) ? tn_type_traits_ref[t].name : "(invalid)";
}

size_t tn_type_row_size(enum tn_type t, int64_t n) {
  if (!tn_type_valid(t) || n < 0) return 0;
  const struct tn_type_traits *tt = &tn_type_traits_ref[t];
  return tt->type_size * (size_t)(n / tt->blck_size);
}
