/*
 * quants_k.c: K-quants (Q4_K, Q5_K, Q6_K, Q8_K), scalar reference level.
 *
 * A K-quant row is a run of 256-element super-blocks. The super-block is cut
 * into sub-blocks that carry their own small integer scale (and, for Q4_K and
 * Q5_K, a small integer min); one or two fp16 numbers per super-block turn
 * those integers back into floats. The layouts are GGUF's and therefore
 * bit-exact with files written by other tools:
 *
 *   Q4_K / Q5_K  8 sub-blocks of 32.  x = d*sc[j]*q - dmin*m[j]
 *                q in 0..15 (Q4_K) or 0..31 (Q5_K); sc, m 6-bit, packed
 *                into scales[12] as (bytes 0..3: sc0..3 | sc4..7 hi 2 bits
 *                at bit 6; bytes 4..7: m0..3 | m4..7 hi 2 bits at bit 6;
 *                bytes 8..11: sc4..7 low nibble | m4..7 low nibble << 4).
 *                qs: each 64 elements use 32 bytes, elements 0..31 in the low
 *                nibbles, 32..63 in the high ones. Q5_K's fifth bit of
 *                element i lives in qh[i % 32], bit i / 32.
 *   Q6_K         16 sub-blocks of 16.  x = d*scales[i/16]*(q - 32), q 0..63
 *                Each 128 elements use 64 bytes of ql and 32 of qh: with
 *                l = i % 32 and g = (i % 128) / 32, the low nibble comes from
 *                ql[l + 32*(g&1)] (low nibble for g < 2, high for g >= 2) and
 *                the top two bits from qh[l], bits 2g..2g+1.
 *   Q8_K         one float d, 256 int8, and the sums of each 16 of them
 *                (bsums), so that dot products can apply a sub-block min
 *                without touching the weights' quants twice.
 *
 * The dot products accumulate integer products per sub-block in int32 (the
 * largest, Q6_K's, stays below 2^28) and fold in the float scales once per
 * super-block.
 *
 * Quantizing picks, per sub-block, the scale (and min) that minimise a
 * weighted squared error over a small grid of candidate scales, each refined
 * by a least-squares fit for the levels it produces; then the per-sub-block
 * scales are themselves quantized to 6 (Q4_K/Q5_K) or 8 (Q6_K) bits and the
 * levels recomputed against the scales actually stored.
 */
#include <math.h>
#include <string.h>

#include "base/base.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants_k_internal.h"

/* ---- small helpers */

/* Round to nearest, ties to even, for |f| < 2^22: adding 1.5*2^23 leaves the
 * integer in the low mantissa bits. */
static inline int round_int(float f) {
  float v = f + 12582912.f;
  int32_t i;
  memcpy(&i, &v, sizeof(i));
  return (i & 0x007fffff) - 0x00400000;
}

/* round_int(f) clamped to lo..hi, safe for any f (NaN gives lo). */
static inline int round_clamp(float f, int lo, int hi) {
  if (!(f > (float)lo)) return lo;
  if (f > (float)hi) return hi;
  return round_int(f);
}

/* ---- Q4_K / Q5_K: 6-bit scale and min packing */

void tn_k_scale_min_get(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

static void scale_min_set(uint8_t q[K_SCALE_SIZE], const uint8_t sc[8],
                          const uint8_t m[8]) {
  for (int j = 0; j < 4; j++) {
    q[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
    q[j + 8] = (uint8_t)((sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4));
  }
}

/* ---- dequantize */

void tn_dequant_q4_K_ref(const void *vx, float *y, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q4_K *x = vx;
  for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
    const float d = tn_k_fp16_to_fp32(x[b].d);
    const float dmin = tn_k_fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < QK_K / 32; j++) {
      uint8_t sc, m;
      tn_k_scale_min_get(j, x[b].scales, &sc, &m);
      const float dl = d * sc, ml = dmin * m;
      const uint8_t *q = x[b].qs + 32 * (j / 2);
      const int shift = 4 * (j & 1);
      for (int l = 0; l < 32; l++)
        y[32 * j + l] = dl * (float)((q[l] >> shift) & 0x0f) - ml;
    }
  }
}

void tn_dequant_q5_K_ref(const void *vx, float *y, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q5_K *x = vx;
  for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
    const float d = tn_k_fp16_to_fp32(x[b].d);
    const float dmin = tn_k_fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < QK_K / 32; j++) {
      uint8_t sc, m;
      tn_k_scale_min_get(j, x[b].scales, &sc, &m);
      const float dl = d * sc, ml = dmin * m;
      const uint8_t *q = x[b].qs + 32 * (j / 2);
      const int shift = 4 * (j & 1);
      for (int l = 0; l < 32; l++) {
        int v = ((q[l] >> shift) & 0x0f) | (((x[b].qh[l] >> j) & 1) << 4);
        y[32 * j + l] = dl * (float)v - ml;
      }
    }
  }
}

/* The 6-bit level of element i of a Q6_K block, 0..63. */
static inline int q6_level(const struct block_q6_K *x, int i) {
  const int h = i / 128, r = i % 128, g = r / 32, l = r % 32;
  const uint8_t lo = x->ql[64 * h + 32 * (g & 1) + l];
  const int low = (g < 2 ? lo : lo >> 4) & 0x0f;
  const int high = (x->qh[32 * h + l] >> (2 * g)) & 3;
  return low | (high << 4);
}

void tn_dequant_q6_K_ref(const void *vx, float *y, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q6_K *x = vx;
  for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
    const float d = tn_k_fp16_to_fp32(x[b].d);
    for (int i = 0; i < QK_K; i++)
      y[i] = d * (float)x[b].scales[i / 16] * (float)(q6_level(&x[b], i) - 32);
  }
}

void tn_dequant_q8_K_ref(const void *vx, float *y, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q8_K *x = vx;
  for (int64_t b = 0; b < n / QK_K; b++, y += QK_K)
    for (int i = 0; i < QK_K; i++) y[i] = x[b].d * (float)x[b].qs[i];
}

/* ---- quantize: per-sub-block fits */

/*
 * Fits x[0..n) ~= scale*L - m with integer L in 0..nmax, scale >= 0 and
 * m >= 0 (the min is never above zero, so that zero stays representable),
 * minimising sum w*(x - (scale*L - m))^2. Tries a grid of step sizes around
 * (max - min)/nmax; for each, rounds to levels and solves the 2x2 least
 * squares system for (scale, -m). Writes the best levels to L, returns scale
 * and stores m in *m_out.
 */
static float fit_affine(int n, int nmax, const float *x, const float *w,
                        uint8_t *L, float *m_out) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; i++) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  if (lo > 0) lo = 0;
  if (hi <= lo) {
    memset(L, 0, (size_t)n);
    *m_out = -lo;
    return 0.f;
  }
  float sw = 0, swx = 0;
  for (int i = 0; i < n; i++) {
    sw += w[i];
    swx += w[i] * x[i];
  }

  /* Baseline: plain min/max quantization. */
  float best_scale = (hi - lo) / nmax, best_min = lo; /* x ~ s*L + min */
  float best_err = 0;
  {
    const float is = 1.f / best_scale;
    for (int i = 0; i < n; i++) {
      int l = round_clamp(is * (x[i] - lo), 0, nmax);
      float e = best_scale * l + lo - x[i];
      best_err += w[i] * e * e;
    }
  }

  uint8_t Lt[32];
  for (int step = -8; step <= 12; step++) {
    const float is = ((float)nmax + 0.1f * (float)step) / (hi - lo);
    float sl = 0, sl2 = 0, sxl = 0;
    for (int i = 0; i < n; i++) {
      int l = round_clamp(is * (x[i] - lo), 0, nmax);
      Lt[i] = (uint8_t)l;
      sl += w[i] * l;
      sl2 += w[i] * l * l;
      sxl += w[i] * l * x[i];
    }
    const float det = sw * sl2 - sl * sl;
    if (det <= 0) continue;
    float s = (sw * sxl - swx * sl) / det;
    float mn = (sl2 * swx - sl * sxl) / det;
    if (mn > 0) {
      mn = 0;
      s = sxl / sl2;
    }
    if (s <= 0) continue;
    float err = 0;
    for (int i = 0; i < n; i++) {
      float e = s * Lt[i] + mn - x[i];
      err += w[i] * e * e;
    }
    if (err < best_err) {
      best_err = err;
      best_scale = s;
      best_min = mn;
    }
  }
  const float is = 1.f / best_scale;
  for (int i = 0; i < n; i++)
    L[i] = (uint8_t)round_clamp(is * (x[i] - best_min), 0, nmax);
  *m_out = -best_min;
  return best_scale;
}

/*
 * Fits x[0..n) ~= scale*L with integer L in -nlo..nlo-1 (asymmetric: the
 * value of largest magnitude may use the extra negative level). Returns the
 * scale, signed: the sign is whatever lets the largest magnitude land on
 * -nlo.
 */
static float fit_symmetric(int n, int nlo, const float *x, const float *w) {
  float amax = 0, vmax = 0;
  for (int i = 0; i < n; i++) {
    if (fabsf(x[i]) > amax) {
      amax = fabsf(x[i]);
      vmax = x[i];
    }
  }
  if (amax == 0) return 0.f;
  float best_scale = vmax / -(float)nlo, best_q = -1;
  for (int step = -9; step <= 9; step++) {
    const float is = (-(float)nlo + 0.1f * (float)step) / vmax;
    float sxl = 0, sl2 = 0;
    for (int i = 0; i < n; i++) {
      int l = round_clamp(is * x[i], -nlo, nlo - 1);
      sxl += w[i] * x[i] * l;
      sl2 += w[i] * l * l;
    }
    /* With the optimal scale s = sxl/sl2 the error is sum(w x^2) -
     * sxl^2/sl2: maximise sxl^2/sl2. */
    if (sl2 > 0 && sxl * sxl / sl2 > best_q) {
      best_q = sxl * sxl / sl2;
      best_scale = sxl / sl2;
    }
  }
  return best_scale;
}

/* Importance of each element of a super-block: its magnitude plus the rms. */
static void block_weights(const float *x, float *w) {
  float s2 = 0;
  for (int i = 0; i < QK_K; i++) s2 += x[i] * x[i];
  const float av = sqrtf(s2 / QK_K);
  for (int i = 0; i < QK_K; i++) w[i] = av + fabsf(x[i]);
}

/*
 * Shared by Q4_K and Q5_K: fits the eight sub-blocks, quantizes their scales
 * and mins to 6 bits against the super-block d/dmin and writes those, then
 * the final levels (0..nmax) to L.
 */
static void quant_q45_block(const float *x, int nmax, uint16_t *d_out,
                            uint16_t *dmin_out, uint8_t scales[K_SCALE_SIZE],
                            uint8_t L[QK_K]) {
  float w[QK_K], sc[8], mn[8];
  block_weights(x, w);
  float sc_max = 0, mn_max = 0;
  for (int j = 0; j < 8; j++) {
    sc[j] = fit_affine(32, nmax, x + 32 * j, w + 32 * j, L + 32 * j, &mn[j]);
    sc_max = sc[j] > sc_max ? sc[j] : sc_max;
    mn_max = mn[j] > mn_max ? mn[j] : mn_max;
  }
  const float isc = sc_max > 0 ? 63.f / sc_max : 0.f;
  const float imn = mn_max > 0 ? 63.f / mn_max : 0.f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; j++) {
    ls[j] = (uint8_t)round_clamp(isc * sc[j], 0, 63);
    lm[j] = (uint8_t)round_clamp(imn * mn[j], 0, 63);
  }
  scale_min_set(scales, ls, lm);
  *d_out = tn_k_fp32_to_fp16(sc_max / 63.f);
  *dmin_out = tn_k_fp32_to_fp16(mn_max / 63.f);

  /* Recompute levels against what a reader will see. */
  const float d = tn_k_fp16_to_fp32(*d_out);
  const float dmin = tn_k_fp16_to_fp32(*dmin_out);
  for (int j = 0; j < 8; j++) {
    const float dl = d * ls[j], ml = dmin * lm[j];
    for (int l = 0; l < 32; l++) {
      int q = 0;
      if (dl != 0) q = round_clamp((x[32 * j + l] + ml) / dl, 0, nmax);
      L[32 * j + l] = (uint8_t)q;
    }
  }
}

void tn_quant_q4_K_ref(const float *x, void *vy, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  struct block_q4_K *y = vy;
  uint8_t L[QK_K];
  for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
    quant_q45_block(x, 15, &y[b].d, &y[b].dmin, y[b].scales, L);
    for (int c = 0; c < QK_K / 64; c++)
      for (int l = 0; l < 32; l++)
        y[b].qs[32 * c + l] =
            (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
  }
}

void tn_quant_q5_K_ref(const float *x, void *vy, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  struct block_q5_K *y = vy;
  uint8_t L[QK_K];
  for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
    quant_q45_block(x, 31, &y[b].d, &y[b].dmin, y[b].scales, L);
    memset(y[b].qh, 0, sizeof(y[b].qh));
    for (int c = 0; c < QK_K / 64; c++)
      for (int l = 0; l < 32; l++) {
        const int a = L[64 * c + l], h = L[64 * c + 32 + l];
        y[b].qs[32 * c + l] = (uint8_t)((a & 0x0f) | ((h & 0x0f) << 4));
        y[b].qh[l] |= (uint8_t)(((a >> 4) << (2 * c)) | ((h >> 4) << (2 * c + 1)));
      }
  }
}

void tn_quant_q6_K_ref(const float *x, void *vy, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  struct block_q6_K *y = vy;
  float w[QK_K], sc[QK_K / 16];
  for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
    for (int i = 0; i < QK_K; i++) w[i] = x[i] * x[i];
    float amax = 0, vmax = 0;
    for (int j = 0; j < QK_K / 16; j++) {
      sc[j] = fit_symmetric(16, 32, x + 16 * j, w + 16 * j);
      if (fabsf(sc[j]) > amax) {
        amax = fabsf(sc[j]);
        vmax = sc[j];
      }
    }
    struct block_q6_K *o = &y[b];
    memset(o, 0, sizeof(*o));
    if (amax == 0) continue; /* all zero: d = 0 reads back as zeros */
    /* Scales are int8 of either sign: mapping the largest in magnitude to
     * -128 uses the whole range, and d carries the sign back. */
    const float iscale = -128.f / vmax;
    o->d = tn_k_fp32_to_fp16(1.f / iscale);
    for (int j = 0; j < QK_K / 16; j++)
      o->scales[j] = (int8_t)round_clamp(iscale * sc[j], -128, 127);
    const float d = tn_k_fp16_to_fp32(o->d);
    for (int i = 0; i < QK_K; i++) {
      const float dl = d * o->scales[i / 16];
      int q = 0;
      if (dl != 0) q = round_clamp(x[i] / dl, -32, 31);
      q += 32;
      const int h = i / 128, r = i % 128, g = r / 32, l = r % 32;
      uint8_t *lo = &o->ql[64 * h + 32 * (g & 1) + l];
      *lo |= (uint8_t)((q & 0x0f) << (g < 2 ? 0 : 4));
      o->qh[32 * h + l] |= (uint8_t)((q >> 4) << (2 * g));
    }
  }
}

void tn_quant_q8_K_ref(const float *x, void *vy, int64_t n) {
  TN_ASSERT(n % QK_K == 0);
  struct block_q8_K *y = vy;
  for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
    float amax = 0, vmax = 0;
    for (int i = 0; i < QK_K; i++) {
      if (fabsf(x[i]) > amax) {
        amax = fabsf(x[i]);
        vmax = x[i];
      }
    }
    if (amax == 0) {
      memset(&y[b], 0, sizeof(y[b]));
      continue;
    }
    /* The element of largest magnitude x_m maps to -127 (d takes the
     * sign): iscale = -127 / x_m, q = min(127, round-half-even(iscale * x)),
     * d = 1 / iscale, exactly as llama.cpp's CPU backend computes it (the
     * lower clamp never bites for finite input; it only tames NaN). Every
     * SIMD level must give the same bytes. */
    const float iscale = -127.f / vmax;
    for (int i = 0; i < QK_K; i++) {
      y[b].qs[i] = (int8_t)round_clamp(iscale * x[i], -127, 127);
    }
    for (int j = 0; j < QK_K / 16; j++) {
      int s = 0;
      for (int i = 0; i < 16; i++) s += y[b].qs[16 * j + i];
      y[b].bsums[j] = (int16_t)s;
    }
    y[b].d = 1.f / iscale;
  }
}

/* ---- dot products against Q8_K */

/* The float arithmetic of these dot products is llama.cpp's (x86 build),
 * so that matrix products give its bits (docs/DESIGN.md, "llama.cpp's
 * order of operations"); the integer sums are exact in any order:
 *  - Q4_K / Q5_K, as its repacked Q4_K kernel: per super-block the integer
 *    totals S = sum_j sc_j * (w . a over sub-block j) and M = sum_j mn_j *
 *    (a's sum over sub-block j); A += S * (d * a.d), Mn += M * (dmin * a.d),
 *    both fused, in block order; the result is A - Mn.
 *  - Q6_K, as its AVX2 kernel: eight int32 lanes per super-block, lane l
 *    holding the elements e with (e % 32) / 4 == l of sc * level * a minus
 *    32 * (sc * bsum) of 16-groups 2l and 2l + 1; each lane accumulated in
 *    float (fused, times d * a.d) over the blocks, then the eight lanes
 *    added as tn_hsum8 does. */

float tn_hsum8(const float *v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

static float dot_k45(int64_t n, const void *vx, size_t xsize, bool with_qh,
                     const struct block_q8_K *y) {
  float acc = 0.0f, accm = 0.0f;
  for (int64_t b = 0; b < n / QK_K; b++) {
    const uint8_t *xb = (const uint8_t *)vx + (size_t)b * xsize;
    const struct block_q4_K *x4 = (const struct block_q4_K *)xb;
    const uint8_t *qs = xb + xsize - QK_K / 2;
    const uint8_t *qh =
        with_qh ? ((const struct block_q5_K *)xb)->qh : NULL;
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < QK_K / 32; j++) {
      uint8_t sc, m;
      tn_k_scale_min_get(j, x4->scales, &sc, &m);
      const uint8_t *q = qs + 32 * (j / 2);
      const int8_t *a = y[b].qs + 32 * j;
      const int shift = 4 * (j & 1);
      int32_t dot = 0;
      for (int l = 0; l < 32; l++) {
        int v = (q[l] >> shift) & 0x0f;
        if (qh) v |= ((qh[l] >> j) & 1) << 4;
        dot += v * a[l];
      }
      sumi += sc * dot;
      summ += m * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
    }
    acc = fmaf((float)sumi, tn_k_fp16_to_fp32(x4->d) * y[b].d, acc);
    accm = fmaf((float)summ, tn_k_fp16_to_fp32(x4->dmin) * y[b].d, accm);
  }
  return acc - accm;
}

void tn_vec_dot_q4_K_q8_K_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  *s = dot_k45(n, vx, sizeof(struct block_q4_K), false, vy);
}

void tn_vec_dot_q5_K_q8_K_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  *s = dot_k45(n, vx, sizeof(struct block_q5_K), true, vy);
}

void tn_vec_dot_q6_K_q8_K_ref(int64_t n, float *s, const void *vx,
                              const void *vy) {
  TN_ASSERT(n % QK_K == 0);
  const struct block_q6_K *x = vx;
  const struct block_q8_K *y = vy;
  float acc[8] = {0};
  for (int64_t b = 0; b < n / QK_K; b++) {
    int32_t lane[8];
    for (int l = 0; l < 8; l++)
      lane[l] = -32 * (x[b].scales[2 * l] * y[b].bsums[2 * l] +
                       x[b].scales[2 * l + 1] * y[b].bsums[2 * l + 1]);
    for (int e = 0; e < QK_K; e++)
      lane[(e % 32) / 4] += x[b].scales[e / 16] * q6_level(&x[b], e) * y[b].qs[e];
    const float d = y[b].d * tn_k_fp16_to_fp32(x[b].d);
    for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lane[l], acc[l]);
  }
  *s = tn_hsum8(acc);
}
