/*
 * ops.c: float32 row operations of the forward pass (norms, activations,
 * softmax, RoPE) and the f16 dot/axpy used by attention over the KV cache.
 *
 * These are cheap next to the matrix products; the scalar loops are written
 * so the compiler vectorises them. Attention sums, exp and SiLU are the
 * exception: they run over the whole context or n_ff every step, so they
 * have AVX2 and AVX-512 versions (ops_avx2.c, ops_avx512.c, bit for bit
 * the same) chosen by tn_kernels_level().
 */
#include <math.h>
#include <pthread.h>
#include <string.h>

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

/* ---- exp, softmax and SiLU in llama.cpp's arithmetic
 *
 * Greedy decoding agrees with llama.cpp token for token only if every op
 * rounds the way its CPU backend (x86, AVX-512 build) does: one bit of
 * difference in an attention weight can flip the f16 rounding of that
 * weight or the 8-bit rounding of an activation, and from there the two
 * drift apart. So exp is the same polynomial it uses (ARM's
 * optimized-routines expf: range reduction by ln 2 in two parts, degree-5
 * polynomial, scaling by 2^n; about 1.5 ulp), and sums are formed in the
 * same order (see tn_attn_dot). This is the arithmetic only; the code is
 * ours, and every level (scalar, AVX2) gives the same bits. */

float tn_exp_poly(float x) {
  const float shift = 0x1.8p23f;
  float z = fmaf(x, 0x1.715476p+0f, shift);
  float n = z - shift; /* round(x / ln 2) */
  float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
  float u = b * b;
  float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
                      fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                 u, fmaf(0x1.ffffecp-1f, b, 1.0f));
  if (!(fabsf(n) <= 192.0f)) /* out of range, or NaN (no int cast) */
    return n != n ? x + x : n <= 0.0f ? 0.0f : INFINITY;
  return ldexpf(j, (int)n); /* j * 2^n, one rounding */
}

/* The sum of 16 lanes in the tree an AVX-512 horizontal add uses. */
float tn_reduce16(const float *v) {
  float t8[8], t4[4];
  for (int l = 0; l < 8; l++) t8[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; l++) t4[l] = t8[l] + t8[l + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

float tn_logsumexp(const float *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) return tn_logsumexp_avx2(x, n);
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  if (!(mx > -INFINITY) || isinf(mx)) return mx;
  double sum = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    float v[16];
    for (int l = 0; l < 16; l++)
      v[l] = c0 + l < n ? tn_exp_poly(x[c0 + l] - mx) : 0.0f;
    sum += (double)tn_reduce16(v);
  }
  return mx + (float)log(sum);
}

void tn_attn_softmax(float *x, int64_t n, int64_t off) {
  if (n <= 0) return;
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_softmax_avx2(x, n, off);
    return;
  }
  float mx = x[0];
  for (int64_t i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  for (int64_t i = 0; i < n; i++) x[i] = tn_exp_poly(x[i] - mx);
  /* x[i] sits in lane (i + off) % 16 of a 16-wide chunk; lanes outside
   * [0, n) are the masked positions, exactly 0. */
  double sum = 0.0;
  for (int64_t c0 = -off; c0 < n; c0 += 16) {
    float v[16];
    for (int l = 0; l < 16; l++) {
      int64_t i = c0 + l;
      v[l] = i >= 0 && i < n ? x[i] : 0.0f;
    }
    sum += (double)tn_reduce16(v);
  }
  float inv = (float)(1.0 / sum);
  for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void tn_silu_mul_ref(float *gate, const float *up, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float g = gate[i];
    gate[i] = g / (1.0f + tn_exp_poly(0.0f - g)) * up[i];
  }
}

void tn_silu_mul(float *gate, const float *up, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2)
    tn_silu_mul_avx2(gate, up, n);
  else
    tn_silu_mul_ref(gate, up, n);
}

/* GELU (tanh approximation) as llama.cpp's CPU backend evaluates it: for
 * |x| < 10 the input is rounded to f16 and the result read from a table of
 * f16(gelu(h)) over all 65,536 halves; below -10 it is 0, above 10 it is x.
 * Matching this keeps tern's Gemma logits next to the reference's. */
/* two spare entries: the AVX2 version gathers 4 bytes per index */
static uint16_t gelu_table[(1 << 16) + 2];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

static float gelu_f32(float x) {
  const float c = 0.79788456080286535587989211986876f; /* sqrt(2/pi) */
  /* 1 + 0.044715 x^2 fused, as llama.cpp's build computes its table */
  return 0.5f * x * (1.0f + tanhf(c * x * fmaf(0.044715f * x, x, 1.0f)));
}

static void gelu_table_init(void) {
  for (uint32_t h = 0; h < (1u << 16); h++)
    gelu_table[h] = tn_fp32_to_fp16(gelu_f32(tn_fp16_to_fp32((uint16_t)h)));
}

void tn_gelu_mul_ref(float *gate, const float *up, int64_t n,
                     const uint16_t *table) {
  for (int64_t i = 0; i < n; i++) {
    float g = gate[i], y;
    if (g <= -10.0f)
      y = 0.0f;
    else if (g >= 10.0f)
      y = g;
    else
      y = tn_fp16_to_fp32(table[tn_fp32_to_fp16(g)]);
    gate[i] = y * up[i];
  }
}

void tn_gelu_mul(float *gate, const float *up, int64_t n) {
  pthread_once(&gelu_once, gelu_table_init);
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2)
    tn_gelu_mul_avx2(gate, up, n, gelu_table);
  else
    tn_gelu_mul_ref(gate, up, n, gelu_table);
}

void tn_vec_add(float *y, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

void tn_vec_scale(float *y, float s, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] *= s;
}

/* ---- attention sums over the F16 cache
 *
 * llama.cpp forms Q.K and weights.V as f16 dot products (its one-token
 * path, which is what every generated token takes): products accumulate
 * into 64 lanes, position p into lane p % 64, in position order; then the
 * four 16-lane quarters are added (0+2, 1+3, then the two), the 16 lanes
 * reduced by tn_reduce16, and any tail past a multiple of 64 added in
 * double. tern uses that order for every token, batched or not. */

float tn_attn_dot(const float *x, const float *y, int64_t n) {
  float acc[64] = {0};
  int64_t np = n & ~(int64_t)63;
  for (int64_t i = 0; i < np; i += 64)
    for (int k = 0; k < 64; k++) acc[k] = fmaf(x[i + k], y[i + k], acc[k]);
  float v[16];
  for (int l = 0; l < 16; l++)
    v[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
  double s = tn_reduce16(v);
  for (int64_t i = np; i < n; i++) s += (double)(x[i] * y[i]);
  return (float)s;
}

void tn_attn_dot_rows(const float *x, const float *y, int64_t y_stride,
                      int ny, float *const *out, int64_t n, float scale) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512) {
    tn_attn_dot_rows_avx512(x, y, y_stride, ny, out, n, scale);
    return;
  }
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_attn_dot_rows_avx2(x, y, y_stride, ny, out, n, scale);
    return;
  }
  for (int i = 0; i < ny; i++)
    *out[i] = tn_attn_dot(x, y + (int64_t)i * y_stride, n) * scale;
}

/* tn_attn_dot with x an f16 row (converting each element is exact). */
static float attn_dot_h_ref(const uint16_t *x, const float *y, int64_t n) {
  float acc[64] = {0};
  int64_t np = n & ~(int64_t)63;
  for (int64_t i = 0; i < np; i += 64)
    for (int k = 0; k < 64; k++)
      acc[k] = fmaf(tn_fp16_to_fp32(x[i + k]), y[i + k], acc[k]);
  float v[16];
  for (int l = 0; l < 16; l++)
    v[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
  double s = tn_reduce16(v);
  for (int64_t i = np; i < n; i++) s += (double)(tn_fp16_to_fp32(x[i]) * y[i]);
  return (float)s;
}

void tn_attn_dot_rows_f16(const uint16_t *x, const float *y, int64_t y_stride,
                          int ny, float *const *out, int64_t n, float scale) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512) {
    tn_attn_dot_rows_f16_avx512(x, y, y_stride, ny, out, n, scale);
    return;
  }
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_attn_dot_rows_f16_avx2(x, y, y_stride, ny, out, n, scale);
    return;
  }
  for (int i = 0; i < ny; i++)
    *out[i] = attn_dot_h_ref(x, y + (int64_t)i * y_stride, n) * scale;
}

void tn_attn_dot_block_f16(const uint16_t *k, int64_t k_stride, int nk,
                           const float *y, float *out, int64_t n, float scale) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512) {
    tn_attn_dot_block_f16_avx512(k, k_stride, nk, y, out, n, scale);
    return;
  }
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_attn_dot_block_f16_avx2(k, k_stride, nk, y, out, n, scale);
    return;
  }
  for (int r = 0; r < nk; r++)
    out[r] = attn_dot_h_ref(k + (int64_t)r * k_stride, y, n) * scale;
}

void tn_attn_dot_block_f32(const float *k, int64_t k_stride, int nk,
                           const float *y, float *out, int64_t n, float scale) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512) {
    tn_attn_dot_block_f32_avx512(k, k_stride, nk, y, out, n, scale);
    return;
  }
  for (int r = 0; r < nk; r++) {
    float *o = out + r;
    tn_attn_dot_rows(k + (int64_t)r * k_stride, y, 0, 1, &o, n, scale);
  }
}

void tn_attn_lane_ref(float *dst, const uint16_t *const *rows, const float *w,
                      int64_t cnt, int64_t d0, int64_t n) {
  for (int64_t d = d0; d < n; d++) {
    float acc = 0.0f;
    for (int64_t c = 0; c < cnt; c++)
      acc = fmaf(w[64 * c], tn_fp16_to_fp32(rows[64 * c][d]), acc);
    dst[d] = acc;
  }
}

static void attn_lane_scalar(float *dst, const uint16_t *const *rows,
                             const float *w, int64_t cnt, int64_t n) {
  tn_attn_lane_ref(dst, rows, w, cnt, 0, n);
}

void tn_attn_lanes(float *acc, const uint16_t *const *rows, const float *w,
                   int32_t p0, int32_t p1, int64_t n) {
  void (*lane)(float *, const uint16_t *const *, const float *, int64_t,
               int64_t) = tn_kernels_level() >= TN_CPU_LEVEL_AVX512 ? tn_attn_lane_avx512
                          : tn_kernels_level() >= TN_CPU_LEVEL_AVX2 ? tn_attn_lane_avx2
                                                                    : attn_lane_scalar;
  for (int32_t k = 0; k < 64; k++) {
    /* the first visible position of lane k, then every 64th */
    int32_t p = p0 + ((k - p0 % 64) + 64) % 64;
    if (p > p1) /* no visible position in this lane */
      memset(acc + (int64_t)k * n, 0, (size_t)n * sizeof(float));
    else
      lane(acc + (int64_t)k * n, rows + p, w + (p - p0), (p1 - p) / 64 + 1, n);
  }
}

void tn_attn_reduce_ref(const float *acc, float *out, int64_t d0, int64_t n) {
  for (int64_t d = d0; d < n; d++) {
    float v[16];
    for (int l = 0; l < 16; l++)
      v[l] = (acc[l * n + d] + acc[(32 + l) * n + d]) +
             (acc[(16 + l) * n + d] + acc[(48 + l) * n + d]);
    out[d] = tn_reduce16(v);
  }
}

void tn_attn_reduce(const float *acc, float *out, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512) {
    tn_attn_reduce_avx512(acc, out, n);
    return;
  }
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_attn_reduce_avx2(acc, out, n);
    return;
  }
  tn_attn_reduce_ref(acc, out, 0, n);
}

void tn_attn_values(float *out, float *acc, const uint16_t *const *rows,
                    const float *w, int32_t p0, int32_t p1, int64_t n) {
  /* The fused kernels re-read each row's weight once per 8 (16) dims, the lane
   * buffer costs a fixed write and read of [64][n]: fused pays below a
   * few hundred positions. */
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX512 && n % 16 == 0 &&
      p1 - p0 < 256) {
    tn_attn_values_avx512(out, rows, w, p0, p1, n);
    return;
  }
  if (tn_kernels_level() == TN_CPU_LEVEL_AVX2 && n % 8 == 0 && p1 - p0 < 256) {
    tn_attn_values_avx2(out, rows, w, p0, p1, n);
    return;
  }
  tn_attn_lanes(acc, rows, w, p0, p1, n);
  tn_attn_reduce(acc, out, n);
}

/* Sums tokens idx[0..ng) of a run together (tn_attn_values_run). */
static void values_group(float *out, int64_t out_stride, float *acc,
                         const uint16_t *const *rows, const float *w,
                         int64_t w_stride, const int32_t *p0,
                         const int32_t *p1, const int *idx, int ng,
                         int64_t n) {
  const float *ws[TN_ATTN_VALUES_GROUP];
  int32_t q0[TN_ATTN_VALUES_GROUP], q1[TN_ATTN_VALUES_GROUP];
  for (int j = 0; j < ng; j++) {
    ws[j] = w + idx[j] * w_stride;
    q0[j] = p0[idx[j]];
    q1[j] = p1[idx[j]];
  }
  tn_attn_lanes_run_avx512(acc, rows, ws, q0, q1, ng, n);
  for (int j = 0; j < ng; j++)
    tn_attn_reduce(acc + (int64_t)j * 64 * n, out + idx[j] * out_stride, n);
}

void tn_attn_values_run(float *out, int64_t out_stride, float *acc,
                        const uint16_t *const *rows, const float *w,
                        int64_t w_stride, const int32_t *p0,
                        const int32_t *p1, int nq, int64_t n) {
  const bool group = tn_kernels_level() >= TN_CPU_LEVEL_AVX512 && n % 16 == 0;
  int idx[TN_ATTN_VALUES_GROUP];
  int ng = 0;
  for (int i = 0; i < nq; i++) {
    /* short windows go through the fused kernel one token at a time */
    if (!group || p1[i] - p0[i] < 256) {
      tn_attn_values(out + i * out_stride, acc, rows, w + i * w_stride, p0[i],
                     p1[i], n);
      continue;
    }
    idx[ng++] = i;
    if (ng == TN_ATTN_VALUES_GROUP) {
      values_group(out, out_stride, acc, rows, w, w_stride, p0, p1, idx, ng, n);
      ng = 0;
    }
  }
  if (ng > 0)
    values_group(out, out_stride, acc, rows, w, w_stride, p0, p1, idx, ng, n);
}

void tn_round_f16(float *x, int64_t n) {
  if (tn_kernels_level() >= TN_CPU_LEVEL_AVX2) {
    tn_round_f16_avx2(x, n);
    return;
  }
  for (int64_t i = 0; i < n; i++) x[i] = tn_fp16_to_fp32(tn_fp32_to_fp16(x[i]));
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
    /* Fused as llama.cpp's build fuses them, so positions rotate to the
     * same bits (a plain a*c - b*s parts in the last bit). */
    x[ia] = fmaf(a, c, -(b * s));
    x[ib] = fmaf(a, s, b * c);
  }
}

void tn_rope(float *x, int64_t n_rot, int64_t pos, float freq_base,
             float freq_scale, bool neox) {
  float cs[2048];
  TN_ASSERT_ROPE(n_rot <= 2048);
  tn_rope_cache(cs, n_rot, pos, freq_base, freq_scale, NULL);
  tn_rope_apply(x, cs, n_rot, neox);
}
