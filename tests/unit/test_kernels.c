/*
 * test_kernels.c: the type table, half floats, the block quants and the
 * matrix product, at every CPU level this machine supports.
 *
 * Every SIMD kernel is compared with the scalar reference on random data
 * with a normalized error bound: the dot products on identical quantized
 * inputs may differ only by float summation order; the full matmul against
 * tn_matmul_ref (float weights x float activations) may differ by the
 * activation quantization error, which we bound per block.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"
#include "tn_test.h"

/* ---- helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng_u32(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 16);
}

static float rng_unit(void) { return (float)rng_u32() / 4294967296.0f; }

/* roughly normal, with an occasional outlier like real activations */
static void fill_random(float *x, int64_t n, float scale) {
  for (int64_t i = 0; i < n; i++) {
    float v = (rng_unit() + rng_unit() + rng_unit() - 1.5f) * 2.0f * scale;
    if (rng_u32() % 97 == 0) v *= 8.0f;
    x[i] = v;
  }
}

static int levels_supported(enum tn_cpu_level *out) {
  int n = 0;
  for (int l = 0; l < TN_CPU_LEVEL_COUNT; l++)
    if (tn_kernels_init((enum tn_cpu_level)l) == (enum tn_cpu_level)l)
      out[n++] = (enum tn_cpu_level)l;
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  return n;
}

/* types we compute with: those with a reference vec_dot */
static bool computable(int t) {
  const struct tn_type_traits *tt = tn_type_ref((enum tn_type)t);
  return tt && tt->vec_dot && tt->to_float && tt->from_float;
}

/* ---- the table */

static void test_type_table(void) {
  static const struct {
    int t;
    const char *name;
    int64_t blck;
    size_t size;
  } want[] = {
      {0, "F32", 1, 4},          {1, "F16", 1, 2},
      {2, "Q4_0", 32, 18},       {3, "Q4_1", 32, 20},
      {6, "Q5_0", 32, 22},       {7, "Q5_1", 32, 24},
      {8, "Q8_0", 32, 34},       {9, "Q8_1", 32, 36},
      {10, "Q2_K", 256, 84},     {11, "Q3_K", 256, 110},
      {12, "Q4_K", 256, 144},    {13, "Q5_K", 256, 176},
      {14, "Q6_K", 256, 210},    {15, "Q8_K", 256, 292},
      {16, "IQ2_XXS", 256, 66},  {17, "IQ2_XS", 256, 74},
      {18, "IQ3_XXS", 256, 98},  {19, "IQ1_S", 256, 50},
      {20, "IQ4_NL", 32, 18},    {21, "IQ3_S", 256, 110},
      {22, "IQ2_S", 256, 82},    {23, "IQ4_XS", 256, 136},
      {24, "I8", 1, 1},          {25, "I16", 1, 2},
      {26, "I32", 1, 4},         {27, "I64", 1, 8},
      {28, "F64", 1, 8},         {29, "IQ1_M", 256, 56},
      {30, "BF16", 1, 2},        {34, "TQ1_0", 256, 54},
      {35, "TQ2_0", 256, 66},    {39, "MXFP4", 32, 17},
  };
  int n_valid = 0;
  for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
    const struct tn_type_traits *tt = tn_type_ref((enum tn_type)want[i].t);
    ASSERT(tt != NULL);
    ASSERT(tn_type_valid(want[i].t));
    ASSERT_STR_EQ(tt->name, want[i].name);
    ASSERT_STR_EQ(tn_type_name((enum tn_type)want[i].t), want[i].name);
    ASSERT_EQ(tt->blck_size, want[i].blck);
    ASSERT_EQ(tt->type_size, want[i].size);
    const struct tn_type_traits *fast = tn_type_get((enum tn_type)want[i].t);
    ASSERT(fast != NULL);
    ASSERT_EQ(fast->type_size, want[i].size);
    ASSERT_EQ(fast->vec_dot_type, tt->vec_dot_type);
    ASSERT_EQ(tn_type_row_size((enum tn_type)want[i].t, want[i].blck * 3),
              want[i].size * 3);
  }
  for (int t = -2; t < TN_TYPE_COUNT + 3; t++) n_valid += tn_type_valid(t);
  ASSERT_EQ(n_valid, (int)(sizeof(want) / sizeof(want[0])));
  static const int invalid[] = {-1, 4, 5, 31, 32, 33, 36, 37, 38, 40, 1000};
  for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++) {
    ASSERT(!tn_type_valid(invalid[i]));
    ASSERT(tn_type_ref((enum tn_type)invalid[i]) == NULL);
    ASSERT(tn_type_get((enum tn_type)invalid[i]) == NULL);
  }
  /* what we can compute, and against what */
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q4_1)->vec_dot_type, TN_TYPE_Q8_1);
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q5_1)->vec_dot_type, TN_TYPE_Q8_1);
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q4_0)->vec_dot_type, TN_TYPE_Q8_0);
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q8_0)->vec_dot_type, TN_TYPE_Q8_0);
  ASSERT_EQ(tn_type_ref(TN_TYPE_F16)->vec_dot_type, TN_TYPE_F32);
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q4_K)->vec_dot_type, TN_TYPE_Q8_K);
  ASSERT_EQ(tn_type_ref(TN_TYPE_Q6_K)->vec_dot_type, TN_TYPE_Q8_K);
  ASSERT(tn_type_ref(TN_TYPE_IQ2_XXS)->to_float == NULL);
  ASSERT(tn_type_ref(TN_TYPE_IQ2_XXS)->vec_dot == NULL);
  ASSERT(tn_type_ref(TN_TYPE_Q2_K)->vec_dot == NULL);
}

static void test_cpu_levels(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n = levels_supported(lv);
  ASSERT_GE(n, 1);
  ASSERT_EQ(lv[0], TN_CPU_LEVEL_SCALAR);
  ASSERT_EQ(tn_kernels_init(TN_CPU_LEVEL_SCALAR), TN_CPU_LEVEL_SCALAR);
  ASSERT_EQ(tn_kernels_level(), TN_CPU_LEVEL_SCALAR);
  ASSERT(tn_type_get(TN_TYPE_Q4_1)->vec_dot ==
         tn_type_ref(TN_TYPE_Q4_1)->vec_dot);
  enum tn_cpu_level top = tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  ASSERT_EQ(top, lv[n - 1]);
  ASSERT_STR_EQ(tn_cpu_level_name(TN_CPU_LEVEL_AVX2), "avx2");
  printf("     cpu levels: ");
  for (int i = 0; i < n; i++) printf("%s ", tn_cpu_level_name(lv[i]));
  printf("(in force: %s)\n", tn_cpu_level_name(tn_kernels_level()));
}

/* ---- half floats */

static float f_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void test_fp16(void) {
  ASSERT_EQ(tn_fp32_to_fp16(1.0f), 0x3c00);
  ASSERT_EQ(tn_fp32_to_fp16(-2.0f), 0xc000);
  ASSERT_EQ(tn_fp32_to_fp16(0.0f), 0x0000);
  ASSERT_EQ(tn_fp32_to_fp16(-0.0f), 0x8000);
  ASSERT_EQ(tn_fp32_to_fp16(65504.0f), 0x7bff);
  ASSERT_EQ(tn_fp32_to_fp16(65519.99f), 0x7bff);
  ASSERT_EQ(tn_fp32_to_fp16(65520.0f), 0x7c00); /* tie to even: inf */
  ASSERT_EQ(tn_fp32_to_fp16(1e10f), 0x7c00);
  ASSERT_EQ(tn_fp32_to_fp16(-INFINITY), 0xfc00);
  ASSERT_EQ(tn_fp32_to_fp16(0x1p-24f), 0x0001);   /* smallest subnormal */
  ASSERT_EQ(tn_fp32_to_fp16(0x1p-25f), 0x0000);   /* tie to even: 0 */
  ASSERT_EQ(tn_fp32_to_fp16(0x1.8p-24f), 0x0002); /* tie to even: 2 */
  ASSERT_EQ(tn_fp32_to_fp16(0x1.0p-14f), 0x0400); /* smallest normal */
  ASSERT_EQ(tn_fp32_to_fp16(0x1.ff8p-15f), 0x03ff); /* largest subnormal */
  ASSERT_EQ(tn_fp32_to_fp16(0x1.ffcp-15f), 0x0400); /* tie: even, normal */
  ASSERT_EQ(tn_fp32_to_fp16(1.0f + 0x1p-11f), 0x3c00); /* tie: even */
  ASSERT_EQ(tn_fp32_to_fp16(1.0f + 0x1.8p-10f), 0x3c02); /* tie: even */
  uint16_t hn = tn_fp32_to_fp16(NAN);
  ASSERT_EQ(hn & 0x7c00, 0x7c00);
  ASSERT_NE(hn & 0x3ff, 0);
  ASSERT(isnan(tn_fp16_to_fp32(0x7e00)));
  ASSERT(isinf(tn_fp16_to_fp32(0x7c00)));
  ASSERT_NEAR(tn_fp16_to_fp32(0x0001), 0x1p-24, 0);
  ASSERT_NEAR(tn_fp16_to_fp32(0x8001), -0x1p-24, 0);
  /* every half survives the round trip */
  for (uint32_t h = 0; h < 0x10000; h++) {
    float f = tn_fp16_to_fp32((uint16_t)h);
    if (isnan(f)) {
      ASSERT(isnan(tn_fp16_to_fp32(tn_fp32_to_fp16(f))));
      continue;
    }
    ASSERT_EQ(tn_fp32_to_fp16(f), h);
  }
  /* random floats: the result is the nearest half (ties aside) */
  for (int i = 0; i < 100000; i++) {
    float f = f_from_bits(rng_u32() % 0x47800000u); /* [0, 65536) */
    uint16_t h = tn_fp32_to_fp16(f);
    if (h >= 0x7c00) {
      ASSERT_GE(f, 65520.0f);
      continue;
    }
    float v = tn_fp16_to_fp32(h);
    float lo = h > 0 ? tn_fp16_to_fp32((uint16_t)(h - 1)) : -1.0f;
    float hi = tn_fp16_to_fp32((uint16_t)(h + 1));
    ASSERT(fabsf(f - v) <= fabsf(f - lo));
    ASSERT(fabsf(f - v) <= fabsf(f - hi) || h + 1 == 0x7c00);
  }
}

static void test_bf16(void) {
  ASSERT_EQ(tn_fp32_to_bf16(1.0f), 0x3f80);
  ASSERT_EQ(tn_fp32_to_bf16(1.0f + 0x1p-8f), 0x3f80);     /* tie: even */
  ASSERT_EQ(tn_fp32_to_bf16(1.0f + 0x1.8p-7f), 0x3f82);   /* tie: even */
  ASSERT_EQ(tn_fp32_to_bf16(1.0f + 0x1.01p-8f), 0x3f81);
  ASSERT_EQ(tn_fp32_to_bf16(-INFINITY), 0xff80);
  ASSERT_EQ(tn_fp32_to_bf16(3.4e38f), 0x7f80); /* rounds up to inf */
  uint16_t bn = tn_fp32_to_bf16(NAN);
  ASSERT(isnan(tn_bf16_to_fp32(bn)));
  ASSERT(isnan(tn_bf16_to_fp32(tn_fp32_to_bf16(f_from_bits(0x7f800001u)))));
  for (uint32_t h = 0; h < 0x10000; h++) {
    float f = tn_bf16_to_fp32((uint16_t)h);
    if (!isnan(f)) ASSERT_EQ(tn_fp32_to_bf16(f), h);
  }
}

/* the dispatched f16 row conversions agree with the scalar ones */
static void test_fp16_rows(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  enum { N = 1003 };
  float x[N], y[N];
  uint16_t h[N], h_ref[N];
  fill_random(x, N, 100.0f);
  x[0] = 0x1p-20f; /* subnormal half */
  x[1] = 70000.0f; /* inf */
  x[2] = -0.0f;
  x[3] = 0x1.8p-24f;
  for (int i = 0; i < N; i++) h_ref[i] = tn_fp32_to_fp16(x[i]);
  for (int l = 0; l < n_lv; l++) {
    tn_kernels_init(lv[l]);
    tn_fp32_to_fp16_row(x, h, N);
    for (int i = 0; i < N; i++) ASSERT_EQ(h[i], h_ref[i]);
    tn_fp16_to_fp32_row(h, y, N);
    for (int i = 0; i < N; i++) {
      float want = tn_fp16_to_fp32(h[i]);
      ASSERT(memcmp(&y[i], &want, 4) == 0);
    }
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
}

/* ---- quantize / dequantize */

static double rel_rmse_bound(int t) {
  switch (t) {
  case TN_TYPE_F32: return 0.0;
  case TN_TYPE_F16: return 1e-3;
  case TN_TYPE_BF16: return 8e-3;
  case TN_TYPE_Q8_0: case TN_TYPE_Q8_1: return 0.01;
  case TN_TYPE_Q8_K: return 0.03; /* 256-element blocks: outliers cost more */
  case TN_TYPE_Q6_K: return 0.03;
  case TN_TYPE_Q5_0: case TN_TYPE_Q5_1: case TN_TYPE_Q5_K: return 0.08;
  default: return 0.15; /* 4-bit (our data has outliers) */
  }
}

static void test_quant_roundtrip(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  enum { N = 1024 + 512 };
  static float x[N], y[N];
  static uint8_t q[N * 8], q_ref[N * 8];
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    const struct tn_type_traits *rt = tn_type_ref((enum tn_type)t);
    if (!rt || !rt->to_float || !rt->from_float) continue;
    fill_random(x, N, 1.0f);
    double ss = 0.0;
    for (int i = 0; i < N; i++) ss += (double)x[i] * x[i];
    rt->from_float(x, q_ref, N);
    rt->to_float(q_ref, y, N);
    double se = 0.0;
    for (int i = 0; i < N; i++) se += (double)(x[i] - y[i]) * (x[i] - y[i]);
    double rel = sqrt(se / ss);
    if (!(rel <= rel_rmse_bound(t)))
      fprintf(stderr, "type %s: relative rmse %g\n", rt->name, rel);
    ASSERT(rel <= rel_rmse_bound(t));
    /* each level's quantizer: same bytes up to ties in rounding */
    size_t size = tn_type_row_size((enum tn_type)t, N);
    for (int l = 0; l < n_lv; l++) {
      tn_kernels_init(lv[l]);
      const struct tn_type_traits *ft = tn_type_get((enum tn_type)t);
      memset(q, 0, size);
      ft->from_float(x, q, N);
      rt->to_float(q, y, N);
      double se2 = 0.0;
      for (int i = 0; i < N; i++) se2 += (double)(x[i] - y[i]) * (x[i] - y[i]);
      ASSERT(sqrt(se2 / ss) <= rel_rmse_bound(t));
      size_t n_diff = 0;
      for (size_t i = 0; i < size; i++) n_diff += q[i] != q_ref[i];
      if (n_diff > size / 100)
        fprintf(stderr, "type %s level %s: %zu of %zu bytes differ\n",
                rt->name, tn_cpu_level_name(lv[l]), n_diff, size);
      ASSERT_LE(n_diff, size / 100);
      /* the dispatched dequantizer matches the reference bit for bit */
      float y2[N];
      ft->to_float(q, y2, N);
      ASSERT(memcmp(y, y2, sizeof(y2)) == 0);
    }
    tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  }
  /* a block of zeros quantizes to zeros, with no NaN from 0/0 */
  memset(x, 0, sizeof(x));
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    const struct tn_type_traits *ft = tn_type_get((enum tn_type)t);
    if (!ft || !ft->to_float || !ft->from_float) continue;
    ft->from_float(x, q, N);
    ft->to_float(q, y, N);
    for (int i = 0; i < N; i++) ASSERT_EQ(y[i] == 0.0f, 1);
  }
}

/* ---- activation quantizers: every level gives the reference's bytes
 *
 * Q8_0, Q8_1 and Q8_K are what activations become before every matmul;
 * their rounding is specified exactly (quants.c, quants_k.c), so the levels
 * must agree byte for byte, ties included. Blocks whose largest magnitude
 * is 127 (or 254, or -127) make the multiplier exactly 1 (or 1/2, or -1),
 * so that half-integers in them are exact ties. */

static void fill_ties(float *x, int64_t n, int64_t blck, int variant) {
  for (int64_t b = 0; b < n / blck; b++) {
    float *xb = x + b * blck;
    float top = variant == 0 ? 127.0f : variant == 1 ? 254.0f : -127.0f;
    for (int64_t j = 0; j < blck; j++) {
      int k = (int)(rng_u32() % 253) - 126; /* -126..126 */
      float v = (float)k + ((rng_u32() & 1) ? 0.5f : 0.0f);
      if (variant == 1) v *= 2.0f; /* x * (1/2) lands on k + 0.5 */
      xb[j] = v;
    }
    xb[rng_u32() % blck] = top;
  }
}

static void test_quant_activations_exact(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  static const enum tn_type types[] = {TN_TYPE_Q8_0, TN_TYPE_Q8_1,
                                       TN_TYPE_Q8_K};
  enum { N = 256 * 24 };
  static float x[N];
  static uint8_t q[N * 2], q_ref[N * 2];
  int n_checked = 0;
  for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
    enum tn_type t = types[ti];
    const struct tn_type_traits *rt = tn_type_ref(t);
    size_t size = tn_type_row_size(t, N);
    for (int variant = 0; variant < 6; variant++) {
      if (variant < 3) {
        fill_ties(x, N, rt->blck_size, variant);
      } else {
        fill_random(x, N, variant == 3 ? 1.0f : variant == 4 ? 1e-3f : 50.0f);
        /* some all-zero and single-value blocks */
        memset(x, 0, sizeof(float) * (size_t)rt->blck_size);
        for (int64_t j = 0; j < rt->blck_size; j++)
          x[rt->blck_size + j] = -0.75f;
      }
      rt->from_float(x, q_ref, N);
      /* the rule itself, on the reference: id = 127 / amax, ties to even */
      if (t == TN_TYPE_Q8_0 && variant == 0) {
        const struct block_q8_0 *b = (const struct block_q8_0 *)q_ref;
        for (int j = 0; j < QK8_0; j++)
          ASSERT_EQ(b[0].qs[j], (int)nearbyintf(x[j]));
      }
      for (int l = 0; l < n_lv; l++) {
        tn_kernels_init(lv[l]);
        memset(q, 0xa5, size);
        tn_type_get(t)->from_float(x, q, N);
        size_t first = size;
        for (size_t i = 0; i < size && first == size; i++)
          if (q[i] != q_ref[i]) first = i;
        if (first != size)
          fprintf(stderr, "%s level %s variant %d: byte %zu differs (%d vs %d)\n",
                  rt->name, tn_cpu_level_name(lv[l]), variant, first,
                  q[first], q_ref[first]);
        ASSERT(first == size);
        n_checked++;
      }
      tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
    }
  }
  printf("     activation quantizers: %d exact checks\n", n_checked);
}

/* ---- vec_dot: every level against the reference, identical inputs */

static void test_vec_dot(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  static const int mults[] = {1, 2, 3, 5, 7, 18, 19, 33, 48};
  enum { NMAX = 256 * 48 };
  static float x[NMAX], a[NMAX], wd[NMAX], ad[NMAX];
  static uint8_t wq[NMAX * 8], aq[NMAX * 8];
  int n_checked = 0;
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    if (!computable(t)) continue;
    const struct tn_type_traits *rt = tn_type_ref((enum tn_type)t);
    const struct tn_type_traits *at = tn_type_ref(rt->vec_dot_type);
    int64_t blck = rt->blck_size > at->blck_size ? rt->blck_size : at->blck_size;
    if (blck < 32) blck = 32;
    for (size_t m = 0; m < sizeof(mults) / sizeof(mults[0]); m++) {
      int64_t n = blck * mults[m] + (rt->blck_size == 1 ? 5 : 0);
      if (n > NMAX) continue;
      fill_random(x, n, 0.5f);
      fill_random(a, n, 2.0f);
      rt->from_float(x, wq, n);
      at->from_float(a, aq, n);
      rt->to_float(wq, wd, n);
      at->to_float(aq, ad, n);
      double norm = 0.0;
      for (int64_t i = 0; i < n; i++) norm += fabs((double)wd[i] * ad[i]);
      float s_ref;
      rt->vec_dot(n, &s_ref, wq, aq);
      /* the reference dot is the dequantized float dot */
      double s_deq = 0.0;
      for (int64_t i = 0; i < n; i++) s_deq += (double)wd[i] * ad[i];
      if (!(fabs(s_ref - s_deq) <= 1e-3 * norm + 1e-6))
        fprintf(stderr, "%s ref dot n=%" PRId64 ": %g vs dequant %g\n",
                rt->name, n, s_ref, s_deq);
      ASSERT(fabs(s_ref - s_deq) <= 1e-3 * norm + 1e-6);
      for (int l = 0; l < n_lv; l++) {
        tn_kernels_init(lv[l]);
        float s;
        tn_type_get((enum tn_type)t)->vec_dot(n, &s, wq, aq);
        if (!(fabs(s - s_ref) <= 2e-5 * norm + 1e-6))
          fprintf(stderr, "%s level %s n=%" PRId64 ": %.7g vs ref %.7g\n",
                  rt->name, tn_cpu_level_name(lv[l]), n, s, s_ref);
        ASSERT(fabs(s - s_ref) <= 2e-5 * norm + 1e-6);
        n_checked++;
      }
      tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
    }
  }
  printf("     vec_dot: %d checks\n", n_checked);
}

/* ---- matmul */

struct mm_case {
  int64_t n_cols, n_rows;
};

/* Makes W by quantizing random floats. */
static uint8_t *make_weights(enum tn_type t, int64_t n_cols, int64_t n_rows,
                             struct tn_mat *w) {
  const struct tn_type_traits *rt = tn_type_ref(t);
  size_t row_size = tn_type_row_size(t, n_cols);
  uint8_t *data = malloc(row_size * (size_t)n_rows);
  float *x = malloc((size_t)n_cols * sizeof(float));
  for (int64_t r = 0; r < n_rows; r++) {
    fill_random(x, n_cols, 0.05f);
    rt->from_float(x, data + r * row_size, n_cols);
  }
  free(x);
  *w = (struct tn_mat){.type = t, .n_cols = n_cols, .n_rows = n_rows,
                       .row_size = row_size, .data = data};
  return data;
}

static void run_matmul(const struct tn_mat *w, const float *x, int64_t n_tok,
                       void *q, float *y, int64_t ldy, int nth) {
  for (int ith = 0; ith < nth; ith++)
    tn_matmul_quantize(w, x, n_tok, q, ith, nth);
  for (int ith = 0; ith < nth; ith++)
    tn_matmul(w, q, n_tok, y, ldy, ith, nth);
}

static void check_matmul_type(enum tn_type t, const struct mm_case *c,
                              int *n_checked) {
  const struct tn_type_traits *rt = tn_type_ref(t);
  const struct tn_type_traits *at = tn_type_ref(rt->vec_dot_type);
  static const int toks[] = {1, 3, 4, 7, 17};
  enum { TMAX = 17 };
  struct tn_mat w;
  uint8_t *data = make_weights(t, c->n_cols, c->n_rows, &w);
  float *x = malloc(sizeof(float) * (size_t)(c->n_cols * TMAX));
  float *wrow = malloc(sizeof(float) * (size_t)c->n_cols);
  int64_t ldy = c->n_rows + 3;
  float *y = malloc(sizeof(float) * (size_t)(ldy * TMAX));
  float *y_ref = malloc(sizeof(float) * (size_t)(ldy * TMAX));
  fill_random(x, c->n_cols * TMAX, 1.0f);

  /* per-(row, token) bound on the activation quantization error */
  int64_t ab = at->blck_size > 1 ? at->blck_size : 0;
  double *bound = malloc(sizeof(double) * (size_t)(c->n_rows * TMAX));
  double *norm = malloc(sizeof(double) * (size_t)(c->n_rows * TMAX));
  for (int64_t r = 0; r < c->n_rows; r++) {
    tn_mat_get_row(&w, r, wrow);
    for (int64_t tk = 0; tk < TMAX; tk++) {
      const float *xt = x + tk * c->n_cols;
      double b = 0.0, nm = 0.0;
      for (int64_t c0 = 0; c0 < c->n_cols; c0 += (ab ? ab : c->n_cols)) {
        int64_t len = ab ? ab : c->n_cols;
        double amax = 0.0, sx = 0.0, wmax = 0.0, sw = 0.0;
        for (int64_t i = c0; i < c0 + len; i++) {
          amax = fmax(amax, fabs(xt[i]));
          sx += fabs(xt[i]);
          wmax = fmax(wmax, fabs(wrow[i]));
          sw += fabs(wrow[i]);
          nm += fabs((double)wrow[i] * xt[i]);
        }
        if (ab) b += sw * amax / 254.0 * 1.01 + 2e-3 * wmax * sx;
      }
      bound[r * TMAX + tk] = b + 1e-5 * nm + 1e-6;
      norm[r * TMAX + tk] = nm;
    }
  }

  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
    int64_t n_tok = toks[ti];
    tn_matmul_ref(&w, x, n_tok, y_ref, ldy);
    for (int l = 0; l < n_lv; l++) {
      tn_kernels_init(lv[l]);
      void *q = malloc(tn_matmul_q_size(&w, n_tok));
      ASSERT_EQ(tn_matmul_q_size(&w, n_tok),
                tn_matmul_q_row_size(&w) * (size_t)n_tok);
      for (int nth = 1; nth <= 3; nth++) {
        for (int64_t i = 0; i < ldy * TMAX; i++) y[i] = -12345.0f;
        run_matmul(&w, x, n_tok, q, y, ldy, nth);
        for (int64_t tk = 0; tk < n_tok; tk++) {
          for (int64_t r = 0; r < c->n_rows; r++) {
            /* exact check: the reference vec_dot on the same q */
            float s;
            rt->vec_dot(c->n_cols, &s, data + r * w.row_size,
                        (uint8_t *)q + tk * tn_matmul_q_row_size(&w));
            float got = y[tk * ldy + r];
            double nm = norm[r * TMAX + tk];
            if (!(fabs(got - s) <= 2e-4 * nm + 1e-6) ||
                !(fabs(got - y_ref[tk * ldy + r]) <= bound[r * TMAX + tk])) {
              fprintf(stderr,
                      "%s %" PRId64 "x%" PRId64 " level %s n_tok %" PRId64
                      " nth %d: y[%" PRId64 "][%" PRId64
                      "] = %.7g, vec_dot %.7g, float ref %.7g (bound %.3g)\n",
                      rt->name, c->n_rows, c->n_cols, tn_cpu_level_name(lv[l]),
                      n_tok, nth, tk, r, got, s, y_ref[tk * ldy + r],
                      bound[r * TMAX + tk]);
              free(q);
              goto out;
            }
          }
          for (int64_t r = c->n_rows; r < ldy; r++)
            if (y[tk * ldy + r] != -12345.0f) {
              fprintf(stderr, "%s: wrote past the row end\n", rt->name);
              free(q);
              goto out;
            }
        }
        ++*n_checked;
      }
      free(q);
    }
  }
out:
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  free(bound);
  free(norm);
  free(data);
  free(x);
  free(wrow);
  free(y);
  free(y_ref);
}

static void test_matmul(void) {
  static const struct mm_case cases32[] = {
      {32, 1}, {96, 7}, {160, 13}, {608, 33}, {576, 64}, {1536, 10}};
  static const struct mm_case cases256[] = {
      {256, 1}, {512, 9}, {768, 13}, {1536, 21}};
  int n_checked = 0;
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    if (!computable(t)) continue;
    const struct tn_type_traits *rt = tn_type_ref((enum tn_type)t);
    int before = tn_test_failures;
    const struct mm_case *cs = rt->blck_size == QK_K ? cases256 : cases32;
    size_t nc = rt->blck_size == QK_K ? sizeof(cases256) / sizeof(cases256[0])
                                      : sizeof(cases32) / sizeof(cases32[0]);
    int checked_before = n_checked;
    for (size_t i = 0; i < nc; i++)
      check_matmul_type((enum tn_type)t, &cs[i], &n_checked);
    printf("     matmul %-5s %d runs\n", rt->name, n_checked - checked_before);
    ASSERT_EQ(tn_test_failures, before);
  }
  /* runs that failed jumped out early and counted no run */
  ASSERT_GT(n_checked, 0);
}

/* ---- batch invariance
 *
 * The product of one weight row with one token must not depend on the
 * batch around the token: decoding it alone (n_tok = 1) and computing it
 * at any position of a batch of 2..64 tokens, with any thread split, must
 * give the same bits at every level. (Levels may differ from each other.)
 * Activations are quantized as the forward pass does: each thread its own
 * token slice, with (ith = 0, nth = 1), at that slice's offset in q. */

static void quantize_slices(const struct tn_mat *w, const float *x,
                            int64_t n_tok, void *q, int nth) {
  size_t qrs = tn_matmul_q_row_size(w);
  for (int ith = 0; ith < nth; ith++) {
    int64_t t0, t1;
    tn_split(n_tok, ith, nth, &t0, &t1);
    if (t0 < t1)
      tn_matmul_quantize(w, x + t0 * w->n_cols, t1 - t0,
                         (uint8_t *)q + (size_t)t0 * qrs, 0, 1);
  }
}

static void check_batch_invariance(enum tn_type t, int64_t n_cols,
                                   int64_t n_rows, int *n_checked) {
  enum { NTOK = 64 };
  static const int batches[] = {2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 33, 64};
  struct tn_mat w;
  uint8_t *data = make_weights(t, n_cols, n_rows, &w);
  float *x = malloc(sizeof(float) * (size_t)(n_cols * NTOK));
  float *xb = malloc(sizeof(float) * (size_t)(n_cols * NTOK));
  float *y1 = malloc(sizeof(float) * (size_t)(n_rows * NTOK));
  float *y = malloc(sizeof(float) * (size_t)(n_rows * NTOK));
  fill_random(x, n_cols * NTOK, 1.0f);
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  for (int l = 0; l < n_lv; l++) {
    tn_kernels_init(lv[l]);
    void *q = malloc(tn_matmul_q_size(&w, NTOK));
    /* each token alone, one thread */
    for (int64_t tk = 0; tk < NTOK; tk++) {
      quantize_slices(&w, x + tk * n_cols, 1, q, 1);
      tn_matmul(&w, q, 1, y1 + tk * n_rows, n_rows, 0, 1);
    }
    for (size_t bi = 0; bi < sizeof(batches) / sizeof(batches[0]); bi++) {
      int64_t n_tok = batches[bi];
      for (int nth = 1; nth <= 3; nth++) {
        /* token i of the batch is token (i*7 + off) % NTOK: every token
         * lands at several positions across the runs */
        int64_t off = (int64_t)(bi * 5 + (size_t)nth * 11) % NTOK;
        for (int64_t i = 0; i < n_tok; i++)
          memcpy(xb + i * n_cols, x + ((i * 7 + off) % NTOK) * n_cols,
                 sizeof(float) * (size_t)n_cols);
        quantize_slices(&w, xb, n_tok, q, nth);
        for (int ith = 0; ith < nth; ith++)
          tn_matmul(&w, q, n_tok, y, n_rows, ith, nth);
        for (int64_t i = 0; i < n_tok; i++) {
          int64_t tk = (i * 7 + off) % NTOK;
          if (memcmp(y + i * n_rows, y1 + tk * n_rows,
                     sizeof(float) * (size_t)n_rows) != 0) {
            int64_t r = 0;
            while (y[i * n_rows + r] == y1[tk * n_rows + r]) r++;
            fprintf(stderr,
                    "%s %" PRId64 "x%" PRId64 " level %s: batch of %" PRId64
                    " (nth %d), position %" PRId64 ", row %" PRId64
                    ": %.9g, alone %.9g\n",
                    tn_type_name(t), n_rows, n_cols, tn_cpu_level_name(lv[l]),
                    n_tok, nth, i, r, y[i * n_rows + r], y1[tk * n_rows + r]);
            tn_test_failures++;
            free(q);
            goto out;
          }
        }
        ++*n_checked;
      }
    }
    free(q);
  }
out:
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  free(data);
  free(x);
  free(xb);
  free(y1);
  free(y);
}

static void test_matmul_batch_invariance(void) {
  int n_checked = 0;
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    if (!computable(t)) continue;
    const struct tn_type_traits *rt = tn_type_ref((enum tn_type)t);
    int before = tn_test_failures;
    /* odd row counts exercise the partial tiles; 37 rows the decode
     * kernels of 16 rows (gemv16) and their tails, on one and two threads */
    check_batch_invariance((enum tn_type)t, rt->blck_size == QK_K ? 768 : 608,
                           37, &n_checked);
    check_batch_invariance((enum tn_type)t, rt->blck_size == QK_K ? 256 : 64,
                           6, &n_checked);
    ASSERT_EQ(tn_test_failures, before);
  }
  printf("     batch invariance: %d runs\n", n_checked);
}

/* Every quantized weight type the models use has a tile kernel at the SIMD
 * levels, so prefill (n_tok > 1) shares weight loads across tokens instead
 * of falling back to one vec_dot per (row, token); and the tile's 1 x 1
 * case is the level's vec_dot. */
static void test_gemm_tiles_present(void) {
  static const enum tn_type tiled[] = {TN_TYPE_Q4_0, TN_TYPE_Q4_1,
                                       TN_TYPE_Q5_0, TN_TYPE_Q5_1,
                                       TN_TYPE_Q8_0, TN_TYPE_Q4_K,
                                       TN_TYPE_Q5_K, TN_TYPE_Q6_K};
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  int n_checked = 0;
  for (int l = 0; l < n_lv; l++) {
    if (lv[l] == TN_CPU_LEVEL_SCALAR) continue;
    tn_kernels_init(lv[l]);
    for (size_t i = 0; i < sizeof(tiled) / sizeof(tiled[0]); i++) {
      enum tn_type t = tiled[i];
      const struct tn_gemm_kernel *g = tn_gemm_kernel_get(t);
      if (!g || !g->tile)
        fprintf(stderr, "%s: no tile at level %s\n", tn_type_name(t),
                tn_cpu_level_name(lv[l]));
      ASSERT(g && g->tile);
      ASSERT(g->mr >= 1 && g->mt >= 2);
      /* the 1 x 1 tile is the vec_dot, bit for bit */
      const struct tn_type_traits *tt = tn_type_get(t);
      const struct tn_type_traits *at = tn_type_get(tt->vec_dot_type);
      enum { N = 1024 };
      static float x[N];
      static uint8_t wq[N * 2], aq[N * 2];
      fill_random(x, N, 0.5f);
      tt->from_float(x, wq, N);
      fill_random(x, N, 2.0f);
      at->from_float(x, aq, N);
      float s_dot, s_tile;
      tt->vec_dot(N, &s_dot, wq, aq);
      g->tile(N, wq, 0, aq, 0, &s_tile, 1, 1, 1);
      ASSERT(memcmp(&s_dot, &s_tile, sizeof(float)) == 0);
      n_checked++;
    }
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  printf("     tiles: %d type x level checks\n", n_checked);
}

/* Q4_0, Q5_0, Q5_1 and Q8_0 compute the same integer lanes and the same
 * float steps at AVX2 and AVX-512 (quants_avx512.c): the two levels give
 * the same bits, tiled or not. */
static void test_matmul_levels_agree(void) {
  /* Every quantized type sums in llama.cpp's x86 order at the SIMD levels;
   * the K-quants at the scalar level too. */
  static const enum tn_type same[] = {TN_TYPE_Q4_0, TN_TYPE_Q4_1,
                                      TN_TYPE_Q5_0, TN_TYPE_Q5_1,
                                      TN_TYPE_Q8_0, TN_TYPE_Q4_K,
                                      TN_TYPE_Q5_K, TN_TYPE_Q6_K};
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int n_lv = levels_supported(lv);
  enum { NCMAX = 768, NR = 13, NT = 9 };
  static float x[NCMAX * NT], y[TN_CPU_LEVEL_COUNT][NR * NT];
  int n_cmp = 0;
  for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++) {
    const bool k_quant = tn_type_get(same[i])->blck_size == 256;
    const int NC = k_quant ? 768 : 608;
    struct tn_mat w;
    uint8_t *data = make_weights(same[i], NC, NR, &w);
    fill_random(x, NC * NT, 1.0f);
    void *q = malloc(tn_matmul_q_size(&w, NT));
    int first = -1;
    for (int l = 0; l < n_lv; l++) {
      if (lv[l] == TN_CPU_LEVEL_SCALAR && !k_quant) continue;
      tn_kernels_init(lv[l]);
      run_matmul(&w, x, NT, q, y[l], NR, 2);
      if (first < 0) {
        first = l;
        continue;
      }
      n_cmp++;
      if (memcmp(y[first], y[l], sizeof(y[l])) != 0)
        fprintf(stderr, "%s: %s and %s differ\n", tn_type_name(same[i]),
                tn_cpu_level_name(lv[first]), tn_cpu_level_name(lv[l]));
      ASSERT(memcmp(y[first], y[l], sizeof(y[l])) == 0);
    }
    free(q);
    free(data);
  }
  printf("     %d level pairs compared bit for bit\n", n_cmp);
  ASSERT_GT(n_cmp, 0);
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
}

static void test_get_row(void) {
  struct tn_mat w;
  uint8_t *data = make_weights(TN_TYPE_Q4_1, 576, 5, &w);
  float y[576], y_ref[576];
  tn_mat_get_row(&w, 3, y);
  tn_type_ref(TN_TYPE_Q4_1)->to_float(data + 3 * w.row_size, y_ref, 576);
  free(data);
  ASSERT(memcmp(y, y_ref, sizeof(y)) == 0);
}


/* ---- attention and activation arithmetic (ops.c): every level must give
 * the scalar version's bits, since the order of operations is what makes
 * greedy output match llama.cpp's. */

static float ulp_diff(float a, float b) {
  if (a == b) return 0.0f;
  return fabsf(a - b) / fabsf(nextafterf(b, INFINITY) - b);
}

static void test_exp_poly(void) {
  /* accuracy against libm over the range softmax and SiLU use */
  float worst = 0.0f;
  for (int i = 0; i <= 200000; i++) {
    float x = -87.0f + 175.0f * (float)i / 200000.0f;
    float u = ulp_diff(tn_exp_poly(x), expf(x));
    if (u > worst) worst = u;
  }
  printf("  tn_exp_poly worst error vs expf on [-87, 88]: %.2f ulp\n", worst);
  ASSERT(worst < 3.0f);
  ASSERT(tn_exp_poly(0.0f) == 1.0f);
  ASSERT(tn_exp_poly(-INFINITY) == 0.0f);
  ASSERT(tn_exp_poly(-200.0f) == 0.0f);
  ASSERT(isinf(tn_exp_poly(200.0f)));
  ASSERT(isnan(tn_exp_poly(NAN))); /* and no NaN-to-int cast (UBSan) */
  /* a denormal result, rounded once: exp(-100) = 3.72e-44 */
  ASSERT_NEAR(tn_exp_poly(-100.0f) * 0x1p100f, 3.72008e-44 * 0x1p100, 2e-45 * 0x1p100);
  float v[16];
  for (int l = 0; l < 16; l++) v[l] = (float)(1 << l) * 1e-3f;
  ASSERT_NEAR(tn_reduce16(v), 65.535f, 1e-3f);
}

/* A run of tokens' key dots (tn_attn_dot_block_f32) and value sums
 * (tn_attn_values_run) give each token the
 * bits it gets alone: long windows grouped (value rows read
 * once for up to TN_ATTN_VALUES_GROUP tokens), short ones alone, windows
 * that start late (sliding) and end at rising positions, at every level
 * and for head sizes with a 16-dim tail and none. */
static void test_attention_values_run(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int nl = levels_supported(lv);
  enum { HD = 144, NPOS = 700, NQ = 7 };
  static uint16_t vh[NPOS][HD];
  static float w[NQ][NPOS], got[NQ][HD], want[HD];
  static float acc[TN_ATTN_VALUES_GROUP * 64 * HD];
  const uint16_t *rows[NPOS];
  float tmp[HD];
  for (int j = 0; j < NPOS; j++) {
    fill_random(tmp, HD, 1.0f);
    for (int e = 0; e < HD; e++) vh[j][e] = tn_fp32_to_fp16(tmp[e]);
    rows[j] = vh[j];
  }
  for (int i = 0; i < NQ; i++) fill_random(w[i], NPOS, 0.01f);
  /* the key dots of a run: rows converted once, then the block kernel on
   * f32 rows, the bits of the f16 block kernel (and of the decode path) */
  {
    static float kf[40][128], q[128], a[40], b[40];
    fill_random(q, 128, 1.0f);
    for (int li = 0; li < nl; li++) {
      tn_kernels_init(lv[li]);
      for (int64_t hd = 64; hd <= 128; hd += 64)
        for (int nk = 1; nk <= 40; nk += 13) {
          for (int r = 0; r < nk; r++) tn_fp16_to_fp32_row(vh[r], kf[r], hd);
          tn_attn_dot_block_f16(vh[0], HD, nk, q, a, hd, 0.125f);
          tn_attn_dot_block_f32(kf[0], 128, nk, q, b, hd, 0.125f);
          ASSERT(memcmp(a, b, (size_t)nk * sizeof(float)) == 0);
        }
    }
  }
  /* token i: positions p0[i] .. p1[i]; 0 and 3 short, 5 and 6 windowed */
  const int32_t p0[NQ] = {0, 0, 0, 100, 0, 129, 200};
  const int32_t p1[NQ] = {90, 300, 301, 302, 600, 601, 699};
  for (int li = 0; li < nl; li++) {
    tn_kernels_init(lv[li]);
    for (int64_t hd = HD; hd >= HD - 80; hd -= 80) { /* 144, 64 */
      for (int nq = 1; nq <= NQ; nq += 3) {
        memset(got, 0, sizeof(got));
        tn_attn_values_run(&got[0][0], HD, acc, rows, &w[0][0], NPOS, p0, p1,
                           nq, hd);
        for (int i = 0; i < nq; i++) {
          tn_attn_values(want, acc, rows, w[i], p0[i], p1[i], hd);
          ASSERT(memcmp(got[i], want, (size_t)hd * sizeof(float)) == 0);
        }
      }
    }
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
}

static void test_attention_ops_levels_agree(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int nl = levels_supported(lv);
  /* HD = 128 + 16 + 8 takes every vector width and a scalar tail */
  enum { HD = 152, NPOS = 203, NQ = 3 };
  static float k[NPOS][HD], q[NQ][HD], sc[TN_CPU_LEVEL_COUNT][NQ][NPOS];
  static uint16_t vh[NPOS][HD];
  static float short_sm[TN_CPU_LEVEL_COUNT][40][16][40];
  const uint16_t *rows[NPOS];
  static float acc[TN_CPU_LEVEL_COUNT][NQ][64 * HD], out[TN_CPU_LEVEL_COUNT][NQ][HD];
  static float g[TN_CPU_LEVEL_COUNT][999], ge[TN_CPU_LEVEL_COUNT][999];
  static float up[999], g0[999];
  for (int j = 0; j < NPOS; j++) fill_random(k[j], HD, 1.0f);
  for (int j = 0; j < NPOS; j++) {
    for (int e = 0; e < HD; e++) vh[j][e] = tn_fp32_to_fp16(k[NPOS - 1 - j][e]);
    rows[j] = vh[j];
  }
  for (int i = 0; i < NQ; i++) fill_random(q[i], HD, 1.0f);
  fill_random(g0, 999, 6.0f);
  fill_random(up, 999, 1.0f);
  g0[0] = -95.0f; /* exp(-x) far out of range, both sides */
  g0[1] = 95.0f;
  g0[2] = -130.0f;
  g0[3] = 10.0f; /* GELU's table edges */
  g0[4] = -10.0f;
  g0[5] = 9.999f;
  for (int li = 0; li < nl; li++) {
    tn_kernels_init(lv[li]);
    for (int j = 0; j < NPOS; j++) {
      float *outs[NQ];
      for (int i = 0; i < NQ; i++) outs[i] = &sc[li][i][j];
      tn_attn_dot_rows(k[j], q[0], HD, NQ, outs, HD, 0.125f);
    }
    /* one weight far below the others: exp of a large negative number */
    sc[li][0][5] = -150.0f;
    for (int i = 0; i < NQ; i++) tn_attn_softmax(sc[li][i], NPOS - i, (i * 7) % 16);
    /* short rows at every chunk offset, one weight in exp's subnormal
     * range (x - max near -95) */
    for (int n = 1; n <= 40; n++)
      for (int off = 0; off < 16; off++) {
        float *r = short_sm[li][n - 1][off];
        for (int e = 0; e < n; e++) r[e] = (float)((e * 37 + off * 11) % 23) * 0.3f;
        if (n > 3) r[2] = r[0] - 95.0f;
        tn_attn_softmax(r, n, off);
      }
    /* token i sees positions 5i .. NPOS-1-i (a window start, a shorter
     * run), weights from its softmax */
    for (int i = 0; i < NQ; i++) {
      tn_attn_lanes(acc[li][i], rows, sc[li][i], 5 * i, NPOS - 1 - i, HD);
      tn_attn_reduce(acc[li][i], out[li][i], HD);
      /* the fused form: the same bits, for a head size with a kernel (a
       * multiple of 8) and one without */
      static float fused[HD], facc[64 * HD];
      for (int64_t hd = HD - 8; hd <= HD - 5; hd += 3) {
        static float want[HD];
        tn_attn_lanes(facc, rows, sc[li][i], 5 * i, NPOS - 1 - i, hd);
        tn_attn_reduce(facc, want, hd);
        tn_attn_values(fused, facc, rows, sc[li][i], 5 * i, NPOS - 1 - i, hd);
        ASSERT(memcmp(fused, want, (size_t)hd * sizeof(float)) == 0);
      }
      /* and windows of every length and offset in 1..130 positions */
      for (int32_t p0 = 0; p0 < 70; p0 += 23)
        for (int32_t len = 1; len <= 130; len += 43) {
          static float want[HD];
          tn_attn_lanes(facc, rows, sc[li][i], p0, p0 + len - 1, 64);
          tn_attn_reduce(facc, want, 64);
          tn_attn_values(fused, facc, rows, sc[li][i], p0, p0 + len - 1, 64);
          ASSERT(memcmp(fused, want, 64 * sizeof(float)) == 0);
        }
    }
    memcpy(g[li], g0, sizeof(g0));
    tn_silu_mul(g[li], up, 999);
    memcpy(ge[li], g0, sizeof(g0));
    tn_gelu_mul(ge[li], up, 999);
    /* NaN propagates through SiLU and GELU, vector lanes and tail alike */
    float nan_g[9], nan_e[9];
    for (int e = 0; e < 9; e++) nan_g[e] = nan_e[e] = NAN;
    tn_silu_mul(nan_g, up, 9);
    tn_gelu_mul(nan_e, up, 9);
    for (int e = 0; e < 9; e++) ASSERT(isnan(nan_g[e]) && isnan(nan_e[e]));
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  for (int i = 0; i < NQ; i++) {
    double s = 0.0;
    for (int j = 0; j < NPOS - i; j++) s += sc[0][i][j];
    ASSERT_NEAR(s, 1.0, 1e-5);
  }
  ASSERT(g[0][2] == 0.0f); /* silu(-130) = -130 / inf */
  ASSERT_NEAR(g[0][1], 95.0f * up[1], 1e-3f);
  for (int li = 1; li < nl; li++) {
    ASSERT(memcmp(sc[li], sc[0], sizeof(sc[0])) == 0);
    ASSERT(memcmp(out[li], out[0], sizeof(out[0])) == 0);
    ASSERT(memcmp(g[li], g[0], sizeof(g[0])) == 0);
    ASSERT(memcmp(ge[li], ge[0], sizeof(ge[0])) == 0);
    ASSERT(memcmp(short_sm[li], short_sm[0], sizeof(short_sm[0])) == 0);
  }
  /* the value sum is the weighted sum (to rounding) */
  for (int e = 0; e < HD; e += 37) {
    double ref = 0.0;
    for (int p = 5; p <= NPOS - 2; p++)
      ref += (double)sc[0][1][p - 5] * (double)tn_fp16_to_fp32(vh[p][e]);
    ASSERT_NEAR(out[0][1][e], ref, 1e-4);
  }
  /* the dot is a dot product (its order is checked against the levels
   * above and against llama.cpp's logits in test_model) */
  float d = tn_attn_dot(k[0], q[0], HD);
  double ref = 0.0;
  for (int e = 0; e < HD; e++) ref += (double)k[0][e] * (double)q[0][e];
  ASSERT_NEAR(d, ref, 1e-4 * (fabs(ref) + 1.0));
}

/* The f16 cache-row dots give the bits of converting the row first and
 * taking tn_attn_dot_rows, at every level, one token or several, for row
 * lengths with and without a tail. */
static void test_attention_f16_dots(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int nl = levels_supported(lv);
  enum { NPOS = 37, NQ = 3, HDMAX = 152 };
  static const int64_t hds[] = {64, 128, 152, 40};
  static uint16_t kh[NPOS][HDMAX];
  static float kf[NPOS][HDMAX], q[NQ][HDMAX];
  for (int j = 0; j < NPOS; j++) {
    float t[HDMAX];
    fill_random(t, HDMAX, 2.0f);
    for (int e = 0; e < HDMAX; e++) {
      kh[j][e] = tn_fp32_to_fp16(t[e]);
      kf[j][e] = tn_fp16_to_fp32(kh[j][e]);
    }
  }
  for (int i = 0; i < NQ; i++) fill_random(q[i], HDMAX, 1.0f);
  for (size_t h = 0; h < TN_ARRAY_LEN(hds); h++) {
    int64_t hd = hds[h];
    for (int li = 0; li < nl; li++) {
      tn_kernels_init(lv[li]);
      float want[NQ][NPOS], got[NQ][NPOS], blk[NPOS];
      for (int j = 0; j < NPOS; j++) {
        float *ow[NQ], *og[NQ];
        for (int i = 0; i < NQ; i++) ow[i] = &want[i][j], og[i] = &got[i][j];
        tn_attn_dot_rows(kf[j], q[0], HDMAX, NQ, ow, hd, 0.125f);
        tn_attn_dot_rows_f16(kh[j], q[0], HDMAX, NQ, og, hd, 0.125f);
      }
      /* rows at a stride (a block of the cache), in two runs */
      tn_attn_dot_block_f16(kh[0], HDMAX, 20, q[1], blk, hd, 0.125f);
      tn_attn_dot_block_f16(kh[20], HDMAX, NPOS - 20, q[1], blk + 20, hd,
                            0.125f);
      ASSERT(memcmp(got, want, sizeof(want)) == 0);
      ASSERT(memcmp(blk, want[1], sizeof(blk)) == 0);
    }
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
}

/* tn_logsumexp: the same bits at every level, close to the double sum,
 * lengths around the 16-wide chunks, and the rows without a finite max. */
static void test_logsumexp(void) {
  enum tn_cpu_level lv[TN_CPU_LEVEL_COUNT];
  int nl = levels_supported(lv);
  static float x[49157];
  fill_random(x, 49157, 8.0f);
  x[100] = -INFINITY;
  static const int64_t ns[] = {1, 7, 15, 16, 17, 33, 1000, 49152, 49157};
  float got[TN_CPU_LEVEL_COUNT][TN_ARRAY_LEN(ns)];
  for (int li = 0; li < nl; li++) {
    tn_kernels_init(lv[li]);
    for (size_t k = 0; k < TN_ARRAY_LEN(ns); k++)
      got[li][k] = tn_logsumexp(x, ns[k]);
    float ninf[20];
    for (int i = 0; i < 20; i++) ninf[i] = -INFINITY;
    ASSERT(tn_logsumexp(ninf, 20) == -INFINITY);
    ASSERT(tn_logsumexp(x, 0) == -INFINITY);
    ninf[3] = INFINITY;
    ASSERT(tn_logsumexp(ninf, 20) == INFINITY);
    ninf[3] = 2.5f; /* one finite value: log(exp(0)) + 2.5 */
    ASSERT(tn_logsumexp(ninf, 20) == 2.5f);
  }
  tn_kernels_init(TN_CPU_LEVEL_COUNT - 1);
  for (int li = 1; li < nl; li++)
    ASSERT(memcmp(got[li], got[0], sizeof(got[0])) == 0);
  for (size_t k = 0; k < TN_ARRAY_LEN(ns); k++) {
    double mx = -INFINITY, sum = 0.0;
    for (int64_t i = 0; i < ns[k]; i++) mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < ns[k]; i++) sum += exp((double)x[i] - mx);
    ASSERT_NEAR(got[0][k], mx + log(sum), 1e-5 * (fabs(mx) + 1.0));
  }
}

TN_TEST_MAIN(TN_TEST(test_type_table), TN_TEST(test_cpu_levels),
             TN_TEST(test_fp16), TN_TEST(test_bf16), TN_TEST(test_fp16_rows),
             TN_TEST(test_quant_roundtrip),
             TN_TEST(test_quant_activations_exact), TN_TEST(test_vec_dot),
             TN_TEST(test_matmul), TN_TEST(test_matmul_batch_invariance),
             TN_TEST(test_gemm_tiles_present),
             TN_TEST(test_matmul_levels_agree), TN_TEST(test_get_row),
             TN_TEST(test_exp_poly), TN_TEST(test_attention_ops_levels_agree), TN_TEST(test_attention_values_run),
             TN_TEST(test_attention_f16_dots), TN_TEST(test_logsumexp))
