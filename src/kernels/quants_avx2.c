/*
 * quants_avx2.c: AVX2 + FMA + F16C versions of the kernels in quants.c,
 * and the tiled matmul micro-kernels for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0
 * weights.
 *
 * Integer dots use _mm256_maddubs_epi16 (u8 x s8 -> pairs summed to s16)
 * then _mm256_madd_epi16 with ones (-> s32). maddubs needs an unsigned left
 * operand, so:
 *   Q4_1/Q5_1 (unsigned quants):   maddubs(q, y)
 *   Q4_0:  sum((q - 8) * y) = maddubs(q, y) - maddubs(8, y)
 *   Q5_0:  sum((q - 16) * y) = maddubs(q, y) - maddubs(16, y)
 *   Q8_0 (signed quants):          maddubs(|q|, sign(y, q))
 * None of these saturate: |q| <= 128 and |y| <= 127 keep each s16 pair sum
 * below 32767.
 *
 * The tile kernels compute an nr x nt block of outputs (Q4_0, Q5_0, Q5_1,
 * Q8_0: nr <= 4 weight rows, nt <= 2 tokens, 8 accumulators plus operands
 * in the 16 ymm registers; Q4_1: 8 x 2, two rows per vector). Each weight block is
 * unpacked once and used for every token of the tile. The per-row vec_dot
 * of these types is the 1 x 1 tile, and every output is computed by the
 * same operations whatever the tile shape: results do not depend on the
 * batch (see kernels_internal.h).
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* A tile reads its NR weight rows side by side, which to the hardware
 * prefetchers looks like NR interleaved streams; with rows over ~512 bytes
 * they stop following it and a matvec from DRAM drops from ~20 to ~4 GB/s
 * (measured on Zen 4). So the tile prefetches for itself, in plain address
 * order: during block b it touches the bytes that are b/nb of the way
 * through the region two tiles ahead (rows are contiguous, ws = row size).
 * Prefetches past the matrix end are harmless: they never fault. */
#define PREFETCH_TILE(w, ws, b, NR, BS)                                       \
  do {                                                                        \
    const char *pf_ = (const char *)(w) + 2 * (NR) * (ws) + (b) * (NR) * (BS); \
    for (int k_ = 0; k_ < ((NR) * (BS) + 63) / 64; k_++)                      \
      _mm_prefetch(pf_ + 64 * k_, _MM_HINT_T0);                               \
  } while (0)

ALWAYS_INLINE float h2f(tn_half h) { return _cvtsh_ss(h); }

ALWAYS_INLINE float hsum_ps(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

ALWAYS_INLINE int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v),
                            _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

/* 16 bytes of nibbles -> 32 bytes 0..15: low nibbles (elements 0..15) in
 * the low lane, high nibbles (16..31) in the high lane. */
ALWAYS_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
  __m128i v = _mm_loadu_si128((const __m128i *)qs);
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* 32 bits -> 32 bytes, 0xff where the bit is set. */
ALWAYS_INLINE __m256i unpack_bits(const uint8_t qh[4]) {
  uint32_t bits;
  memcpy(&bits, qh, 4);
  __m256i v = _mm256_set1_epi32((int)bits);
  const __m256i spread = _mm256_setr_epi64x(
      0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
      0x0303030303030303);
  v = _mm256_shuffle_epi8(v, spread);
  const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
}

/* sum of u8 x s8 products, as 8 s32 lanes */
ALWAYS_INLINE __m256i dot_us8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* ---- float types */

void tn_dequant_f16_avx2(const void *vx, float *y, int64_t n) {
  const uint16_t *x = vx;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i,
                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
  for (; i < n; i++) y[i] = tn_fp16_to_fp32(x[i]);
}

void tn_quant_f16_avx2(const float *x, void *vy, int64_t n) {
  uint16_t *y = vy;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i *)(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                     _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; i++) y[i] = tn_fp32_to_fp16(x[i]);
}

void tn_vec_dot_f32_f32_avx2(int64_t n, float *s, const void *vx,
                             const void *vy) {
  const float *x = vx, *y = vy;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8),
                         _mm256_loadu_ps(y + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16),
                         _mm256_loadu_ps(y + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24),
                         _mm256_loadu_ps(y + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8)
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
  float r = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; i++) r += x[i] * y[i];
  *s = r;
}

void tn_vec_dot_f16_f32_avx2(int64_t n, float *s, const void *vx,
                             const void *vy) {
  const uint16_t *x = vx;
  const float *y = vy;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
    __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8)));
    a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(y + i), a0);
    a1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(y + i + 8), a1);
  }
  float r = hsum_ps(_mm256_add_ps(a0, a1));
  for (; i < n; i++) r += tn_fp16_to_fp32(x[i]) * y[i];
  *s = r;
}

ALWAYS_INLINE __m256 load_bf16(const uint16_t *x) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

void tn_vec_dot_bf16_f32_avx2(int64_t n, float *s, const void *vx,
                              const void *vy) {
  const uint16_t *x = vx;
  const float *y = vy;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(load_bf16(x + i), _mm256_loadu_ps(y + i), a0);
    a1 = _mm256_fmadd_ps(load_bf16(x + i + 8), _mm256_loadu_ps(y + i + 8), a1);
  }
  float r = hsum_ps(_mm256_add_ps(a0, a1));
  for (; i < n; i++) r += tn_bf16_to_fp32(x[i]) * y[i];
  *s = r;
}

/* ---- activation quantizers */

/* Quantizes 32 floats to 32 int8 with the Q8 rule; returns d, and the sum
 * of the quants in *sum. */
ALWAYS_INLINE float quant_block_q8(const float *x, int8_t *qs, int *sum) {
  __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(
      _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
      _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float amax = _mm_cvtss_f32(m4);
  /* The rule of quants.c: id = 127 / amax (not 1 / d), ties to even. */
  float d = amax / 127.0f;
  float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  __m256 vid = _mm256_set1_ps(id);
#define RNE(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
  __m256i i0 = _mm256_cvtps_epi32(RNE(_mm256_mul_ps(v0, vid)));
  __m256i i1 = _mm256_cvtps_epi32(RNE(_mm256_mul_ps(v1, vid)));
  __m256i i2 = _mm256_cvtps_epi32(RNE(_mm256_mul_ps(v2, vid)));
  __m256i i3 = _mm256_cvtps_epi32(RNE(_mm256_mul_ps(v3, vid)));
#undef RNE
  if (sum)
    *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1),
                                       _mm256_add_epi32(i2, i3)));
  /* packs work per 128-bit lane; the permute restores element order */
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1),
                                 _mm256_packs_epi32(i2, i3));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i *)qs, p);
  return d;
}

void tn_quant_q8_0_avx2(const float *x, void *vy, int64_t n) {
  struct block_q8_0 *y = vy;
  for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0)
    y[b].d = tn_fp32_to_fp16(quant_block_q8(x, y[b].qs, NULL));
}

void tn_quant_q8_1_avx2(const float *x, void *vy, int64_t n) {
  struct block_q8_1 *y = vy;
  for (int64_t b = 0; b < n / QK8_1; b++, x += QK8_1) {
    int sum;
    float d = quant_block_q8(x, y[b].qs, &sum);
    y[b].d = tn_fp32_to_fp16(d);
    y[b].s = tn_fp32_to_fp16(d * (float)sum);
  }
}

/* ---- tiles
 *
 * Each tile kernel is written once as an always-inline function of
 * compile-time (NR, NT) and instantiated by TILE_ENTRY for every shape up
 * to MR x MT, so the accumulator arrays live in registers. */

#define MR 4
#define MT 2

/* Q4_1 x Q8_1, two weight rows per vector: the layout and float arithmetic
 * of quants_avx512.c's tile_q4_1 (read the essay there), with the integer
 * dot as maddubs + madd instead of dpbusd (the same integers: a pair of
 * u4 x s8 products cannot saturate int16). MT is 2 here: 16 registers. */
#define DOT(u, s) dot_us8(u, s)

#define Q41_MR 8
#define Q41_MT 2

ALWAYS_INLINE float hsum4(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

ALWAYS_INLINE void tile_q4_1(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  enum { NP_MAX = Q41_MR / 2, NQ_MAX = Q41_MR / 4 };
  const int NP = (NR + 1) / 2; /* row pairs; an odd last row pairs itself */
  const int NQ = (NR + 3) / 4; /* quads: scales are converted 4 rows at once */
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  /* from [dA, mA, dB, mB, dC, mC, dD, mD]: pair 0's d, pair 1's d, and
   * the mins of pair 0 / pair 1 for two tokens' [sy0, sy0, sy1, sy1] */
  const __m256i pick_d[2] = {_mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
                             _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)};
  const __m256i pick_m[2] = {_mm256_setr_epi32(1, 3, 1, 3, 1, 3, 1, 3),
                             _mm256_setr_epi32(5, 7, 5, 7, 5, 7, 5, 7)};
  const uint8_t *wr[4 * NQ_MAX];
  for (int r = 0; r < 4 * NQ; r++) wr[r] = w + (r < NR ? r : NR - 1) * ws;
  /* One token: the min terms of a quad in lanes 2i + 1 of macc1[quad];
   * several: those of a pair, lane 2t (row A) and 2t + 1 (row B). */
  __m256 acc[NP_MAX][Q41_MT][2], macc[NP_MAX], macc1[NQ_MAX];
  for (int k = 0; k < NQ; k++) macc1[k] = _mm256_setzero_ps();
  for (int p = 0; p < NP; p++) {
    macc[p] = _mm256_setzero_ps();
    for (int t = 0; t < NT; t++)
      acc[p][t][0] = acc[p][t][1] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n / QK4_1; b++) {
    /* the first tile of a row group streams its rows from memory: fetch
     * ahead (also for 2-4 tokens: verify steps and small batches read
     * every row once, and without it ran DRAM-latency-bound at half
     * speed; the tiles after it find the rows in L1, where the prefetches
     * cost little, measured) */
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q4_1));
    __m256i ylo[Q41_MT], yhi[Q41_MT];
    __m256 dy[Q41_MT];
    float sy[Q41_MT] = {0};
    for (int t = 0; t < NT; t++) {
      const struct block_q8_1 *yb = (const struct block_q8_1 *)(q + t * qs) + b;
      ylo[t] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yb->qs));
      yhi[t] = _mm256_broadcastsi128_si256(
          _mm_loadu_si128((const __m128i *)(yb->qs + 16)));
      dy[t] = _mm256_set1_ps(h2f(yb->d));
      sy[t] = h2f(yb->s);
    }
    const __m256 sy2 = NT == 1 ? _mm256_setr_ps(0, sy[0], 0, sy[0], 0, sy[0], 0, sy[0])
                               : _mm256_setr_ps(sy[0], sy[0], sy[1], sy[1], 0, 0, 0, 0);
    for (int k = 0; k < NQ; k++) {
      uint32_t u[4];
      for (int i = 0; i < 4; i++) /* d and m of row 4k + i */
        memcpy(&u[i], &((const struct block_q4_1 *)wr[4 * k + i] + b)->d, 4);
      __m128i dm4 = _mm_cvtsi32_si128((int)u[0]);
      dm4 = _mm_insert_epi32(dm4, (int)u[1], 1);
      dm4 = _mm_insert_epi32(dm4, (int)u[2], 2);
      dm4 = _mm_insert_epi32(dm4, (int)u[3], 3);
      const __m256 dm8 = _mm256_cvtph_ps(dm4); /* [dA, mA, dB, mB, ...] */
      __m256 s8 = _mm256_setzero_ps();
      if (NT == 1) {
        macc1[k] = _mm256_fmadd_ps(dm8, sy2, macc1[k]);
        s8 = _mm256_mul_ps(dm8, dy[0]);
      }
      for (int h = 0; h < 2 && 2 * k + h < NP; h++) {
        const int p = 2 * k + h;
        const struct block_q4_1 *xa = (const struct block_q4_1 *)wr[2 * p] + b;
        const struct block_q4_1 *xb = (const struct block_q4_1 *)wr[2 * p + 1] + b;
        const __m256i raw = _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)xa->qs),
                                              _mm_loadu_si128((const __m128i *)xb->qs));
        const __m256i qlo = _mm256_and_si256(raw, low4);
        const __m256i qhi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        if (NT == 1) {
          const __m256 sc = _mm256_permutevar8x32_ps(s8, pick_d[h]);
          acc[p][0][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qlo, ylo[0])), sc,
                                         acc[p][0][0]);
          acc[p][0][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qhi, yhi[0])), sc,
                                         acc[p][0][1]);
        } else {
          const __m256 dx = _mm256_permutevar8x32_ps(dm8, pick_d[h]);
          macc[p] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dm8, pick_m[h]), sy2,
                                    macc[p]);
          for (int t = 0; t < NT; t++) {
            const __m256 sc = _mm256_mul_ps(dx, dy[t]);
            acc[p][t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qlo, ylo[t])), sc,
                                           acc[p][t][0]);
            acc[p][t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qhi, yhi[t])), sc,
                                           acc[p][t][1]);
          }
        }
      }
    }
  }
  float m1[NQ_MAX * 8];
  for (int k = 0; k < NQ; k++) _mm256_storeu_ps(m1 + 8 * k, macc1[k]);
  for (int p = 0; p < NP; p++) {
    float m[8];
    _mm256_storeu_ps(m, macc[p]);
    for (int t = 0; t < NT; t++) {
      for (int h = 0; h < 2 && 2 * p + h < NR; h++) {
        const int r = 2 * p + h;
        /* lanes i (elements 4i..4i+3) + lanes 4 + i (16 + 4i..): the
         * order of llama.cpp's hsum_float_8 */
        const __m256 lohi = _mm256_add_ps(acc[p][t][1], acc[p][t][0]);
        const __m128 a = h ? _mm256_extractf128_ps(lohi, 1)
                           : _mm256_castps256_ps128(lohi);
        const float mins = NT == 1 ? m1[8 * (r / 4) + 2 * (r % 4) + 1]
                                   : m[2 * t + h];
        y[t * ldy + r] = hsum4(a) + mins;
      }
    }
  }
}

ALWAYS_INLINE void tile_q4_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  __m256 acc[MR][MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < n / QK4_0; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q4_0));
    __m256i qy[MT], c8[MT];
    __m256 dy[MT]; /* dy broadcast: dx * dy is then one vector product */
    for (int t = 0; t < NT; t++) {
      const struct block_q8_0 *yb = (const struct block_q8_0 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      c8[t] = _mm256_maddubs_epi16(eight, qy[t]);
      dy[t] = _mm256_set1_ps(h2f(yb->d));
    }
    for (int r = 0; r < NR; r++) {
      const struct block_q4_0 *xb = (const struct block_q4_0 *)(w + r * ws) + b;
      __m256i qx = unpack_nibbles(xb->qs);
      float dx = h2f(xb->d);
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(qx, qy[t]), c8[t]);
        __m256 p = _mm256_cvtepi32_ps(
            _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

ALWAYS_INLINE void tile_q8_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  __m256 acc[MR][MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK8_0; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q8_0));
    __m256i qy[MT];
    __m256 dy[MT]; /* dy broadcast: dx * dy is then one vector product */
    for (int t = 0; t < NT; t++) {
      const struct block_q8_0 *yb = (const struct block_q8_0 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      dy[t] = _mm256_set1_ps(h2f(yb->d));
    }
    for (int r = 0; r < NR; r++) {
      const struct block_q8_0 *xb = (const struct block_q8_0 *)(w + r * ws) + b;
      __m256i qx = _mm256_loadu_si256((const __m256i *)xb->qs);
      __m256i ax = _mm256_sign_epi8(qx, qx);
      float dx = h2f(xb->d);
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256 p = _mm256_cvtepi32_ps(dot_us8(ax, _mm256_sign_epi8(qy[t], qx)));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

/* Q5_0 x Q8_0: the weights as unsigned q in 0..31 (nibble | fifth bit << 4)
 * and, as for Q4_0, sum((q - 16) y) = maddubs(q, y) - maddubs(16, y) with
 * maddubs(16, y) computed once per token and block. The s32 lanes are the
 * integer dots of elements 4i..4i+3 (low lane: 0..15, high: 16..31), then
 *   acc = fma(float(lanes), dx * dy, acc) per block, result = hsum(acc).
 * No saturation: a pair is at most 2 * 31 * 128 before the subtraction. */
ALWAYS_INLINE __m256i unpack_q5(const uint8_t qs[16], const uint8_t qh[4]) {
  return _mm256_or_si256(unpack_nibbles(qs),
                         _mm256_and_si256(unpack_bits(qh), _mm256_set1_epi8(0x10)));
}

/* Tiles of up to Q50_MR rows x Q50_MT tokens (2 x 4 is the shape used:
 * each unpacked row then serves four tokens). */
#define Q50_MR 4
#define Q50_MT 4
ALWAYS_INLINE void tile_q5_0(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  __m256 acc[Q50_MR][Q50_MT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
  const __m256i sixteen = _mm256_set1_epi8(16);
  for (int64_t b = 0; b < n / QK5_0; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q5_0));
    __m256i qy[Q50_MT], c16[Q50_MT];
    __m256 dy[Q50_MT]; /* dy broadcast: dx * dy is then one vector product */
    for (int t = 0; t < NT; t++) {
      const struct block_q8_0 *yb = (const struct block_q8_0 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      c16[t] = _mm256_maddubs_epi16(sixteen, qy[t]);
      dy[t] = _mm256_set1_ps(h2f(yb->d));
    }
    for (int r = 0; r < NR; r++) {
      const struct block_q5_0 *xb = (const struct block_q5_0 *)(w + r * ws) + b;
      const __m256i qx = unpack_q5(xb->qs, xb->qh);
      const float dx = h2f(xb->d);
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(qx, qy[t]), c16[t]);
        __m256 p = _mm256_cvtepi32_ps(
            _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) y[t * ldy + r] = hsum_ps(acc[r][t]);
}

/* Q5_1 x Q8_1: q in 0..31 unsigned, so maddubs(q, y) directly. Per
 * (row, token):
 *   acc  = fma(float(lanes), dx * dy, acc), mins = fma(mx, sy, mins)
 *   result = hsum(acc) + mins.
 * The mins of all rows for token t sit in lanes of one vector (lane r for
 * row r), so each is one fma lane whatever the tile shape. */
ALWAYS_INLINE void tile_q5_1(int64_t n, const uint8_t *w, size_t ws,
                             const uint8_t *q, size_t qs, float *y,
                             int64_t ldy, const int NR, const int NT) {
  __m256 acc[MR][MT];
  __m128 macc[MT];
  for (int t = 0; t < NT; t++) {
    macc[t] = _mm_setzero_ps();
    for (int r = 0; r < NR; r++) acc[r][t] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n / QK5_1; b++) {
    PREFETCH_TILE(w, ws, b, NR, (int64_t)sizeof(struct block_q5_1));
    __m256i qy[MT];
    __m256 dy[MT]; /* dy broadcast: dx * dy is then one vector product */
    uint16_t mh[4] = {0};
    for (int r = 0; r < NR; r++)
      mh[r] = ((const struct block_q5_1 *)(w + r * ws) + b)->m;
    const __m128 mx = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)mh));
    for (int t = 0; t < NT; t++) {
      const struct block_q8_1 *yb = (const struct block_q8_1 *)(q + t * qs) + b;
      qy[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
      dy[t] = _mm256_set1_ps(h2f(yb->d));
      macc[t] = _mm_fmadd_ps(mx, _mm_set1_ps(h2f(yb->s)), macc[t]);
    }
    for (int r = 0; r < NR; r++) {
      const struct block_q5_1 *xb = (const struct block_q5_1 *)(w + r * ws) + b;
      const __m256i qx = unpack_q5(xb->qs, xb->qh);
      const float dx = h2f(xb->d);
      const __m256 vdx = _mm256_set1_ps(dx);
      for (int t = 0; t < NT; t++) {
        __m256 p = _mm256_cvtepi32_ps(dot_us8(qx, qy[t]));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(vdx, dy[t]), acc[r][t]);
      }
    }
  }
  for (int t = 0; t < NT; t++) {
    float m[4];
    _mm_storeu_ps(m, macc[t]);
    for (int r = 0; r < NR; r++) y[t * ldy + r] = hsum_ps(acc[r][t]) + m[r];
  }
}

/* One entry point per type: switch on the tile shape so that every
 * instantiation has constant bounds. */
#define TILE_ENTRY(fn, body)                                                  \
  void fn(int64_t n, const void *w, size_t ws, const void *q, size_t qs,      \
          float *y, int64_t ldy, int nr, int nt) {                            \
    const uint8_t *w8 = w, *q8 = q;                                           \
    switch ((nr - 1) * MT + (nt - 1)) {                                       \
    case 0: body(n, w8, ws, q8, qs, y, ldy, 1, 1); break;                     \
    case 1: body(n, w8, ws, q8, qs, y, ldy, 1, 2); break;                     \
    case 2: body(n, w8, ws, q8, qs, y, ldy, 2, 1); break;                     \
    case 3: body(n, w8, ws, q8, qs, y, ldy, 2, 2); break;                     \
    case 4: body(n, w8, ws, q8, qs, y, ldy, 3, 1); break;                     \
    case 5: body(n, w8, ws, q8, qs, y, ldy, 3, 2); break;                     \
    case 6: body(n, w8, ws, q8, qs, y, ldy, 4, 1); break;                     \
    case 7: body(n, w8, ws, q8, qs, y, ldy, 4, 2); break;                     \
    default: break;                                                           \
    }                                                                         \
  }

TILE_ENTRY(tn_gemm_q4_0_q8_0_avx2, tile_q4_0)
#define CASE41(r, t)                                                          \
  case ((r) - 1) * Q41_MT + (t) - 1:                                          \
    tile_q4_1(n, w8, ws, q8, qs, y, ldy, r, t);                               \
    break;
#define CASE41_R(r) CASE41(r, 1) CASE41(r, 2)

void tn_gemm_q4_1_q8_1_avx2(int64_t n, const void *w, size_t ws,
                            const void *q, size_t qs, float *y, int64_t ldy,
                            int nr, int nt) {
  const uint8_t *w8 = w, *q8 = q;
  switch ((nr - 1) * Q41_MT + (nt - 1)) {
    CASE41_R(1) CASE41_R(2) CASE41_R(3) CASE41_R(4)
    CASE41_R(5) CASE41_R(6) CASE41_R(7) CASE41_R(8)
  default: break;
  }
}
TILE_ENTRY(tn_gemm_q8_0_q8_0_avx2, tile_q8_0)
#define CASE50(r, t)                                                          \
  case ((r) - 1) * Q50_MT + (t) - 1:                                          \
    tile_q5_0(n, w8, ws, q8, qs, y, ldy, r, t);                               \
    break;
#define CASE50_R(r) CASE50(r, 1) CASE50(r, 2) CASE50(r, 3) CASE50(r, 4)

void tn_gemm_q5_0_q8_0_avx2(int64_t n, const void *w, size_t ws,
                            const void *q, size_t qs, float *y, int64_t ldy,
                            int nr, int nt) {
  const uint8_t *w8 = w, *q8 = q;
  switch ((nr - 1) * Q50_MT + (nt - 1)) {
    CASE50_R(1) CASE50_R(2) CASE50_R(3) CASE50_R(4)
  default: break;
  }
}
TILE_ENTRY(tn_gemm_q5_1_q8_1_avx2, tile_q5_1)

void tn_vec_dot_q4_0_q8_0_avx2(int64_t n, float *s, const void *x,
                               const void *y) {
  tile_q4_0(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q4_1_q8_1_avx2(int64_t n, float *s, const void *x,
                               const void *y) {
  tile_q4_1(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q8_0_q8_0_avx2(int64_t n, float *s, const void *x,
                               const void *y) {
  tile_q8_0(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q5_0_q8_0_avx2(int64_t n, float *s, const void *x,
                               const void *y) {
  tile_q5_0(n, x, 0, y, 0, s, 0, 1, 1);
}

void tn_vec_dot_q5_1_q8_1_avx2(int64_t n, float *s, const void *x,
                               const void *y) {
  tile_q5_1(n, x, 0, y, 0, s, 0, 1, 1);
}
