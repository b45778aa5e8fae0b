/*
 * kernels_internal.h: block layouts and per-level kernel entry points,
 * shared by the files of src/kernels/ only.
 *
 * Layouts are GGUF's (they are the file format): little-endian, packed as
 * declared, sizes checked by static_assert. Naming:
 *   tn_dequant_<type>_<level>(const void *x, float *y, int64_t n)
 *   tn_quant_<type>_<level>(const float *x, void *y, int64_t n)
 *   tn_vec_dot_<wtype>_<atype>_<level>(int64_t n, float *s, const void *x,
 *                                      const void *y)
 * with <level> one of ref (scalar reference), avx2, avx512.
 */
#ifndef TN_KERNELS_INTERNAL_H
#define TN_KERNELS_INTERNAL_H

#include <assert.h>
#include <stdint.h>

#include "kernels/kernels.h"

typedef uint16_t tn_half; /* IEEE binary16 bits */

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K 256
#define K_SCALE_SIZE 12

struct block_q4_0 {
  tn_half d;
  uint8_t qs[QK4_0 / 2]; /* low nibble: elements 0..15, high: 16..31 */
};
static_assert(sizeof(struct block_q4_0) == 18, "block_q4_0 size");

struct block_q4_1 {
  tn_half d, m;
  uint8_t qs[QK4_1 / 2];
};
static_assert(sizeof(struct block_q4_1) == 20, "block_q4_1 size");

struct block_q5_0 {
  tn_half d;
  uint8_t qh[4]; /* fifth bits, one per element */
  uint8_t qs[QK5_0 / 2];
};
static_assert(sizeof(struct block_q5_0) == 22, "block_q5_0 size");

struct block_q5_1 {
  tn_half d, m;
  uint8_t qh[4];
  uint8_t qs[QK5_1 / 2];
};
static_assert(sizeof(struct block_q5_1) == 24, "block_q5_1 size");

struct block_q8_0 {
  tn_half d;
  int8_t qs[QK8_0];
};
static_assert(sizeof(struct block_q8_0) == 34, "block_q8_0 size");

struct block_q8_1 {
  tn_half d; /* delta */
  tn_half s; /* d * sum(qs) */
  int8_t qs[QK8_1];
};
static_assert(sizeof(struct block_q8_1) == 36, "block_q8_1 size");

/* K-quants: super-blocks of 256 elements. */
struct block_q4_K {
  tn_half d;    /* super-block scale for the quantized scales */
  tn_half dmin; /* super-block scale for the quantized mins */
  uint8_t scales[K_SCALE_SIZE]; /* 8 scales and 8 mins, 6 bits each */
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(struct block_q4_K) == 144, "block_q4_K size");

struct block_q5_K {
  tn_half d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(struct block_q5_K) == 176, "block_q5_K size");

struct block_q6_K {
  uint8_t ql[QK_K / 2]; /* lower 4 bits */
  uint8_t qh[QK_K / 4]; /* upper 2 bits */
  int8_t scales[QK_K / 16];
  tn_half d;
};
static_assert(sizeof(struct block_q6_K) == 210, "block_q6_K size");

struct block_q8_K {
  float d;
  int8_t qs[QK_K];
  int16_t bsums[QK_K / 16]; /* sums of groups of 16 */
};
static_assert(sizeof(struct block_q8_K) == 292, "block_q8_K size");

/* ---- K-quant kernels (quants_k.c, quants_k_avx2.c, quants_k_avx512.c) */

void tn_dequant_q4_K_ref(const void *x, float *y, int64_t n);
void tn_dequant_q5_K_ref(const void *x, float *y, int64_t n);
void tn_dequant_q6_K_ref(const void *x, float *y, int64_t n);
void tn_dequant_q8_K_ref(const void *x, float *y, int64_t n);
void tn_quant_q4_K_ref(const float *x, void *y, int64_t n);
void tn_quant_q5_K_ref(const float *x, void *y, int64_t n);
void tn_quant_q6_K_ref(const float *x, void *y, int64_t n);
void tn_quant_q8_K_ref(const float *x, void *y, int64_t n);
void tn_vec_dot_q4_K_q8_K_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_K_q8_K_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q6_K_q8_K_ref(int64_t n, float *s, const void *x, const void *y);

void tn_quant_q8_K_avx2(const float *x, void *y, int64_t n);
void tn_vec_dot_q4_K_q8_K_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_K_q8_K_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q6_K_q8_K_avx2(int64_t n, float *s, const void *x, const void *y);

/* Tiles for matmul.c (tn_gemm_tile_cb, declared below): mr = 2, mt = 4. */
void tn_gemm_q4_K_q8_K_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q5_K_q8_K_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q6_K_q8_K_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);

/* AVX-512 F/BW/VL + VNNI (quants_k_avx512.c); Q8_K quantization stays AVX2. */
void tn_vec_dot_q4_K_q8_K_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_K_q8_K_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q6_K_q8_K_avx512(int64_t n, float *s, const void *x, const void *y);
/* AVX-512 tiles, mr = 2, mt = 4; the dots above are their 1 x 1 case. */
void tn_gemm_q4_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q5_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q6_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);

/* 16 rows x up to 4 tokens (tn_gemv16_cb) */
void tn_gemv16_q4_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                                const void *q, size_t q_stride, float *y,
                                int64_t ldy, int nt);
void tn_gemv16_q5_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                                const void *q, size_t q_stride, float *y,
                                int64_t ldy, int nt);
void tn_gemv16_q6_K_q8_K_avx512(int64_t n, const void *w, size_t w_stride,
                                const void *q, size_t q_stride, float *y,
                                int64_t ldy, int nt);

/* ---- basic kernels: declared below by quants.c's author */

/* The scalar reference table (types.c); dispatch.c derives one per level. */
extern const struct tn_type_traits tn_type_traits_ref[TN_TYPE_COUNT];

/* quants.c: scalar references. F32/F16/BF16 "quantize" is conversion. */
void tn_dequant_f32_ref(const void *x, float *y, int64_t n);
void tn_dequant_f16_ref(const void *x, float *y, int64_t n);
void tn_dequant_bf16_ref(const void *x, float *y, int64_t n);
void tn_dequant_q4_0_ref(const void *x, float *y, int64_t n);
void tn_dequant_q4_1_ref(const void *x, float *y, int64_t n);
void tn_dequant_q5_0_ref(const void *x, float *y, int64_t n);
void tn_dequant_q5_1_ref(const void *x, float *y, int64_t n);
void tn_dequant_q8_0_ref(const void *x, float *y, int64_t n);
void tn_dequant_q8_1_ref(const void *x, float *y, int64_t n);
void tn_quant_f32_ref(const float *x, void *y, int64_t n);
void tn_quant_f16_ref(const float *x, void *y, int64_t n);
void tn_quant_bf16_ref(const float *x, void *y, int64_t n);
void tn_quant_q4_0_ref(const float *x, void *y, int64_t n);
void tn_quant_q4_1_ref(const float *x, void *y, int64_t n);
void tn_quant_q5_0_ref(const float *x, void *y, int64_t n);
void tn_quant_q5_1_ref(const float *x, void *y, int64_t n);
void tn_quant_q8_0_ref(const float *x, void *y, int64_t n);
void tn_quant_q8_1_ref(const float *x, void *y, int64_t n);
void tn_vec_dot_f32_f32_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_f16_f32_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_bf16_f32_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q4_0_q8_0_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q4_1_q8_1_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_0_q8_0_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_1_q8_1_ref(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q8_0_q8_0_ref(int64_t n, float *s, const void *x, const void *y);

/* quants_avx2.c (AVX2 + FMA + F16C) */
void tn_dequant_f16_avx2(const void *x, float *y, int64_t n);
void tn_quant_f16_avx2(const float *x, void *y, int64_t n);
void tn_quant_q8_0_avx2(const float *x, void *y, int64_t n);
void tn_quant_q8_1_avx2(const float *x, void *y, int64_t n);
void tn_vec_dot_f32_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_f16_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_bf16_f32_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q4_0_q8_0_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q4_1_q8_1_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_0_q8_0_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_1_q8_1_avx2(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q8_0_q8_0_avx2(int64_t n, float *s, const void *x, const void *y);

/* quants_avx512.c (AVX-512 F/BW/VL/DQ + VNNI; 256-bit vectors mostly) */
void tn_vec_dot_q4_0_q8_0_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q4_1_q8_1_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q8_0_q8_0_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_0_q8_0_avx512(int64_t n, float *s, const void *x, const void *y);
void tn_vec_dot_q5_1_q8_1_avx512(int64_t n, float *s, const void *x, const void *y);

/*
 * Tiled matmul micro-kernels (matmul.c drives them). One call computes an
 * nr x nt tile, nr <= mr weight rows times nt <= mt activation rows:
 *   y[t*ldy + r] = dot(n, w + r*w_stride, q + t*q_stride)
 * The weight rows stay in registers/L1 while the tile's tokens reuse them.
 *
 * Batch invariance (a contract, checked bit for bit by test_kernels): the
 * value written for (row, token) must not depend on nr, nt, the position
 * in the tile or the other rows and tokens, and must equal the vec_dot of
 * the same level. Tiles get there by giving every output its own
 * accumulators, updated by the same operations in the same order for any
 * shape, with the vec_dot as the 1 x 1 instance.
 */
typedef void (*tn_gemm_tile_cb)(int64_t n, const void *w, size_t w_stride,
                                const void *q, size_t q_stride, float *y,
                                int64_t ldy, int nr, int nt);
/* Decode and short batches (speculative verification): 16 weight rows x
 * nt <= 4 tokens, y[t*ldy + r] = dot(n, w + r*w_stride, q + t*q_stride),
 * the same bits as the tile's (the same contract). */
#define TN_GEMV16_MT 4
typedef void (*tn_gemv16_cb)(int64_t n, const void *w, size_t w_stride,
                             const void *q, size_t q_stride, float *y,
                             int64_t ldy, int nt);
struct tn_gemm_kernel {
  tn_gemm_tile_cb tile; /* NULL: matmul.c loops over vec_dot */
  int mr, mt;           /* largest tile it handles */
  int mr_narrow;        /* rows per tile when a chunk has at most mt / 2
                         * tokens (decode), if more than mr (0: mr) */
  tn_gemv16_cb gemv16;  /* NULL: one-token products use the tile */
};

void tn_gemm_q4_0_q8_0_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q4_1_q8_1_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q8_0_q8_0_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q5_0_q8_0_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q5_1_q8_1_avx2(int64_t n, const void *w, size_t w_stride,
                            const void *q, size_t q_stride, float *y,
                            int64_t ldy, int nr, int nt);
void tn_gemm_q4_0_q8_0_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q4_1_q8_1_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q8_0_q8_0_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q5_0_q8_0_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);
void tn_gemm_q5_1_q8_1_avx512(int64_t n, const void *w, size_t w_stride,
                              const void *q, size_t q_stride, float *y,
                              int64_t ldy, int nr, int nt);

/* dispatch.c: the tile kernel for weight type t at the level in force
 * (tile == NULL when there is none). */
const struct tn_gemm_kernel *tn_gemm_kernel_get(enum tn_type t);

/* ---- row ops (ops.c): scalar versions the SIMD files finish their tails
 * with, and the SIMD entry points ops.c dispatches to. Same bits at every
 * level (ops.c gives the order of operations). */

void tn_silu_mul_ref(float *gate, const float *up, int64_t n);
void tn_gelu_mul_ref(float *gate, const float *up, int64_t n,
                     const uint16_t *table);
/* dims [d0, n) of one lane of tn_attn_lanes (positions 64 apart: rows[64c],
 * w[64c] for c < cnt) and of tn_attn_reduce */
void tn_attn_lane_ref(float *dst, const uint16_t *const *rows, const float *w,
                      int64_t cnt, int64_t d0, int64_t n);
void tn_attn_reduce_ref(const float *acc, float *out, int64_t d0, int64_t n);

void tn_softmax_avx2(float *x, int64_t n, int64_t off);
float tn_logsumexp_avx2(const float *x, int64_t n);
void tn_silu_mul_avx2(float *gate, const float *up, int64_t n);
void tn_gelu_mul_avx2(float *gate, const float *up, int64_t n,
                      const uint16_t *table);
void tn_round_f16_avx2(float *x, int64_t n);
void tn_attn_dot_rows_avx2(const float *x, const float *y, int64_t y_stride,
                           int ny, float *const *out, int64_t n, float scale);
void tn_attn_dot_rows_f16_avx2(const uint16_t *x, const float *y,
                               int64_t y_stride, int ny, float *const *out,
                               int64_t n, float scale);
void tn_attn_dot_block_f16_avx2(const uint16_t *k, int64_t k_stride, int nk,
                                const float *y, float *out, int64_t n,
                                float scale);
void tn_attn_lane_avx2(float *dst, const uint16_t *const *rows, const float *w,
                       int64_t cnt, int64_t n);
void tn_attn_reduce_avx2(const float *acc, float *out, int64_t n);
/* n a multiple of 8 */
void tn_attn_values_avx2(float *out, const uint16_t *const *rows,
                         const float *w, int32_t p0, int32_t p1, int64_t n);
void tn_attn_dot_rows_avx512(const float *x, const float *y, int64_t y_stride,
                             int ny, float *const *out, int64_t n, float scale);
void tn_attn_dot_rows_f16_avx512(const uint16_t *x, const float *y,
                                 int64_t y_stride, int ny, float *const *out,
                                 int64_t n, float scale);
void tn_attn_dot_block_f16_avx512(const uint16_t *k, int64_t k_stride, int nk,
                                  const float *y, float *out, int64_t n,
                                  float scale);
void tn_attn_dot_block_f32_avx512(const float *k, int64_t k_stride, int nk,
                                  const float *y, float *out, int64_t n,
                                  float scale);
void tn_attn_lane_avx512(float *dst, const uint16_t *const *rows,
                         const float *w, int64_t cnt, int64_t n);
void tn_attn_reduce_avx512(const float *acc, float *out, int64_t n);
/* tn_attn_lanes of nq <= TN_ATTN_VALUES_GROUP tokens into acc + i * 64 * n
 * (n % 16 == 0), each value row converted once for all of them. */
void tn_attn_lanes_run_avx512(float *acc, const uint16_t *const *rows,
                              const float *const *w, const int32_t *p0,
                              const int32_t *p1, int nq, int64_t n);
void tn_attn_values_avx512(float *out, const uint16_t *const *rows,
                           const float *w, int32_t p0, int32_t p1, int64_t n);

#endif /* TN_KERNELS_INTERNAL_H */
