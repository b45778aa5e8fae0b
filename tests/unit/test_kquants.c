/*
 * test_kquants.c: K-quant kernels (src/kernels/quants_k*.c).
 *
 *  - half-float helpers: exhaustive round trip, agreement with kernels.h's;
 *  - dequantize against gguf-py on real Gemma 3 blocks (Q4_K, Q6_K) and on
 *    random Q5_K blocks (tests/fixtures/kquants/, made by
 *    tools/make_kquant_fixtures.py);
 *  - dequant(quant(x)) close to x, on random data and on the real weights;
 *  - the reference dot products against a float dot of dequantized rows;
 *  - every SIMD kernel against its scalar reference, on quantized random
 *    data and on random block bytes, with a normalized error bound.
 */
#include <stdbool.h>
#include <stddef.h>

#include "base/base.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants_k_internal.h"
#include "tn_test.h"

#ifndef TN_SOURCE_DIR
#define TN_SOURCE_DIR "."
#endif

/* ---- helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng_u32(void) {
  /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}

static float rng_uniform(void) { /* [0, 1) */
  return (float)(rng_u32() >> 8) * (1.f / 16777216.f);
}

static float rng_normal(void) {
  float u = rng_uniform() + 1e-7f, v = rng_uniform();
  return sqrtf(-2.f * logf(u)) * cosf(6.2831853f * v);
}

/* Gaussian values with a few outliers and an occasional offset, so that the
 * min part of Q4_K/Q5_K and the scale search both get exercised. */
static void fill_random(float *x, int64_t n, float scale) {
  for (int64_t i = 0; i < n; i++) {
    x[i] = scale * rng_normal();
    if (rng_u32() % 97 == 0) x[i] *= 6.f;
  }
  for (int64_t b = 0; b < n / 32; b++) {
    if (rng_u32() % 5 != 0) continue;
    float off = scale * (rng_uniform() * 4.f - 2.f);
    for (int i = 0; i < 32; i++) x[32 * b + i] += off;
  }
}

static double rel_rmse(const float *a, const float *b, int64_t n) {
  double e = 0, s = 0;
  for (int64_t i = 0; i < n; i++) {
    e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    s += (double)a[i] * a[i];
  }
  return s > 0 ? sqrt(e / s) : sqrt(e);
}

static size_t read_file(const char *name, void *buf, size_t cap) {
  char path[512];
  snprintf(path, sizeof(path), "%s/tests/fixtures/kquants/%s", TN_SOURCE_DIR,
           name);
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    return 0;
  }
  size_t n = fread(buf, 1, cap, f);
  fclose(f);
  return n;
}

struct kq_type {
  const char *name;
  size_t block_size;
  tn_to_float_cb dequant;
  tn_from_float_cb quant;
  tn_vec_dot_cb dot_ref;
  double max_rel_rmse; /* bound for dequant(quant(x)) on fill_random data */
};

static const struct kq_type kq_types[] = {
    {"q4_K", sizeof(struct block_q4_K), tn_dequant_q4_K_ref, tn_quant_q4_K_ref,
     tn_vec_dot_q4_K_q8_K_ref, 0.095},
    {"q5_K", sizeof(struct block_q5_K), tn_dequant_q5_K_ref, tn_quant_q5_K_ref,
     tn_vec_dot_q5_K_q8_K_ref, 0.05},
    {"q6_K", sizeof(struct block_q6_K), tn_dequant_q6_K_ref, tn_quant_q6_K_ref,
     tn_vec_dot_q6_K_q8_K_ref, 0.028},
    {"q8_K", sizeof(struct block_q8_K), tn_dequant_q8_K_ref, tn_quant_q8_K_ref,
     NULL, 0.02},
};

enum { N_MAX = 4096, NB_MAX = N_MAX / QK_K };

/* ---- half floats */

static void test_fp16_round_trip(void) {
  for (uint32_t h = 0; h < 0x10000; h++) {
    const uint32_t exp = (h >> 10) & 0x1f;
    float f = tn_k_fp16_to_fp32((uint16_t)h);
    if (exp == 0x1f && (h & 0x3ff)) {
      ASSERT(isnan(f));
      continue;
    }
    ASSERT_EQ(tn_k_fp32_to_fp16(f), h);
    ASSERT(f == tn_fp16_to_fp32((uint16_t)h));
  }
  /* Rounding: halfway cases go to even, overflow goes to inf. */
  ASSERT_EQ(tn_k_fp32_to_fp16(1.f + 1.f / 2048.f), 0x3c00);
  ASSERT_EQ(tn_k_fp32_to_fp16(1.f + 3.f / 2048.f), 0x3c02);
  ASSERT_EQ(tn_k_fp32_to_fp16(65504.f), 0x7bff);
  ASSERT_EQ(tn_k_fp32_to_fp16(65519.f), 0x7bff);
  ASSERT_EQ(tn_k_fp32_to_fp16(65520.f), 0x7c00);
  ASSERT_EQ(tn_k_fp32_to_fp16(-1e-8f), 0x8000);
  ASSERT_EQ(tn_k_fp32_to_fp16(3e-8f), 0x0001); /* above half of 2^-24 */
  ASSERT_EQ(tn_k_fp32_to_fp16(2.98023224e-8f), 0x0000); /* exactly half */
}

/* ---- golden: gguf-py's dequantization of real / random blocks */

static void check_golden(const char *name, tn_to_float_cb dequant,
                         size_t block_size) {
  static uint8_t raw[8 * 256];
  static float want[8 * QK_K], got[8 * QK_K];
  char fname[64];
  snprintf(fname, sizeof(fname), "%s.bin", name);
  size_t n_raw = read_file(fname, raw, sizeof(raw));
  snprintf(fname, sizeof(fname), "%s.f32", name);
  size_t n_f = read_file(fname, want, sizeof(want));
  ASSERT_GT(n_raw, 0);
  ASSERT_EQ(n_raw % block_size, 0);
  const int64_t nb = (int64_t)(n_raw / block_size);
  ASSERT_EQ(n_f, (size_t)nb * QK_K * sizeof(float));
  dequant(raw, got, nb * QK_K);
  for (int64_t i = 0; i < nb * QK_K; i++) {
    float tol = 1e-6f * fabsf(want[i]);
    if (!(fabsf(got[i] - want[i]) <= tol))
      TN_FAIL_("%s element %" PRId64 ": got %.9g, gguf-py %.9g", name, i,
               got[i], want[i]);
  }
}

static void test_golden_dequant_q4_K(void) {
  check_golden("q4_K", tn_dequant_q4_K_ref, sizeof(struct block_q4_K));
}
static void test_golden_dequant_q5_K(void) {
  check_golden("q5_K", tn_dequant_q5_K_ref, sizeof(struct block_q5_K));
}
static void test_golden_dequant_q6_K(void) {
  check_golden("q6_K", tn_dequant_q6_K_ref, sizeof(struct block_q6_K));
}

/* Re-quantizing llama.cpp's own output: the values sit on a grid the format
 * can express, so our quantizer must find it again (today it does, exactly,
 * for Q4_K and Q6_K) or come close (Q5_K's random scales). */
static void check_golden_requant(const char *name, const struct kq_type *t,
                                 double bound) {
  static float want[8 * QK_K], got[8 * QK_K];
  static uint8_t q[8 * 256];
  char fname[64];
  snprintf(fname, sizeof(fname), "%s.f32", name);
  size_t n_f = read_file(fname, want, sizeof(want));
  ASSERT_GT(n_f, 0);
  const int64_t n = (int64_t)(n_f / sizeof(float));
  t->quant(want, q, n);
  t->dequant(q, got, n);
  double e = rel_rmse(want, got, n);
  if (!(e <= bound))
    TN_FAIL_("%s requant of %s: rel rmse %.4g > %.4g", t->name, name, e,
             bound);
}

static void test_golden_requant(void) {
  check_golden_requant("q4_K", &kq_types[0], 1e-3);
  check_golden_requant("q5_K", &kq_types[1], 0.015);
  check_golden_requant("q6_K", &kq_types[2], 1e-3);
  check_golden_requant("q4_K", &kq_types[2], 0.025); /* Q6_K on Q4_K data */
  check_golden_requant("q6_K", &kq_types[0], 0.09);  /* Q4_K on Q6_K data */
}

/* ---- round trips */

static void test_round_trip(void) {
  static float x[N_MAX], y[N_MAX];
  static uint8_t q[NB_MAX * sizeof(struct block_q8_K)];
  for (size_t t = 0; t < TN_ARRAY_LEN(kq_types); t++) {
    const struct kq_type *kt = &kq_types[t];
    for (int rep = 0; rep < 4; rep++) {
      float scale = rep == 3 ? 1e-3f : (float)(1 + rep * 10);
      fill_random(x, N_MAX, scale);
      kt->quant(x, q, N_MAX);
      kt->dequant(q, y, N_MAX);
      double e = rel_rmse(x, y, N_MAX);
      if (!(e <= kt->max_rel_rmse))
        TN_FAIL_("%s rep %d: rel rmse %.4g > %.4g", kt->name, rep, e,
                 kt->max_rel_rmse);
    }
  }
}

/* Degenerate inputs: zeros, constants, one spike, all negative. Nothing may
 * blow up, and the exact cases must come back (nearly) exact. */
static void test_special_blocks(void) {
  static float x[QK_K], y[QK_K];
  static uint8_t q[sizeof(struct block_q8_K)];
  for (size_t t = 0; t < TN_ARRAY_LEN(kq_types); t++) {
    const struct kq_type *kt = &kq_types[t];
    for (int kind = 0; kind < 5; kind++) {
      for (int i = 0; i < QK_K; i++) {
        switch (kind) {
        case 0: x[i] = 0; break;
        case 1: x[i] = 0.5f; break;
        case 2: x[i] = i == 77 ? -3.f : 0.f; break;
        case 3: x[i] = -1.f - (float)(i % 7) * 0.25f; break;
        default: x[i] = (float)(i % 16) - 8.f; break; /* exact grid */
        }
      }
      kt->quant(x, q, QK_K);
      kt->dequant(q, y, QK_K);
      double e = rel_rmse(x, y, QK_K);
      for (int i = 0; i < QK_K; i++)
        if (!isfinite(y[i]))
          TN_FAIL_("%s kind %d: y[%d] = %g", kt->name, kind, i, y[i]);
      double bound = kt->max_rel_rmse;
      if (!(e <= bound))
        TN_FAIL_("%s kind %d: rel rmse %.4g > %.4g", kt->name, kind, e, bound);
    }
  }
}

static void test_q8_K_format(void) {
  static float x[2 * QK_K];
  struct block_q8_K q[2];
  fill_random(x, 2 * QK_K, 1.f);
  x[5] = 90.f;         /* largest magnitude in block 0: positive */
  x[QK_K + 9] = -110.f; /* block 1: negative */
  tn_quant_q8_K_ref(x, q, 2 * QK_K);
  ASSERT_EQ(q[0].qs[5], -127);
  ASSERT_NEAR(q[0].d, -90.f / 127.f, 1e-6);
  ASSERT_EQ(q[1].qs[9], -127);
  ASSERT_NEAR(q[1].d, 110.f / 127.f, 1e-6);
  for (int b = 0; b < 2; b++)
    for (int j = 0; j < QK_K / 16; j++) {
      int s = 0;
      for (int i = 0; i < 16; i++) s += q[b].qs[16 * j + i];
      ASSERT_EQ(q[b].bsums[j], s);
    }
}

/* ---- dot products */

static double dot_f(const float *a, const float *b, int64_t n, double *mag) {
  double s = 0, m = 0;
  for (int64_t i = 0; i < n; i++) {
    s += (double)a[i] * b[i];
    m += fabs((double)a[i] * b[i]);
  }
  *mag = m;
  return s;
}

static const int64_t dot_sizes[] = {256, 512, 1280, 2048, 4096};

/* The reference dot equals the float dot of the dequantized rows. */
static void test_vec_dot_ref(void) {
  static float x[N_MAX], a[N_MAX], xd[N_MAX], ad[N_MAX];
  static uint8_t qx[NB_MAX * sizeof(struct block_q8_K)];
  static struct block_q8_K qa[NB_MAX];
  for (size_t t = 0; t < 3; t++) {
    const struct kq_type *kt = &kq_types[t];
    for (size_t k = 0; k < TN_ARRAY_LEN(dot_sizes); k++) {
      const int64_t n = dot_sizes[k];
      fill_random(x, n, 0.05f);
      fill_random(a, n, 2.f);
      kt->quant(x, qx, n);
      tn_quant_q8_K_ref(a, qa, n);
      kt->dequant(qx, xd, n);
      tn_dequant_q8_K_ref(qa, ad, n);
      double mag;
      double want = dot_f(xd, ad, n, &mag);
      float got;
      kt->dot_ref(n, &got, qx, qa);
      if (!(fabs(got - want) <= 1e-5 * mag + 1e-30))
        TN_FAIL_("%s n=%" PRId64 ": ref dot %.9g, float dot %.9g (mag %.3g)",
                 kt->name, n, got, want, mag);
    }
  }
}

struct dot_impl {
  const char *name;
  tn_vec_dot_cb ref, fast;
  size_t block_size;
  tn_from_float_cb quant;
  tn_to_float_cb dequant;
};

/* Random bytes make valid K-quant blocks once the fp16 scales are sane; they
 * reach corners (scales 63, Q6_K scale -128) quantizing never does. */
static void randomize_blocks(const char *name, uint8_t *q, size_t block_size,
                             int64_t nb) {
  for (size_t i = 0; i < block_size * (size_t)nb; i++)
    q[i] = (uint8_t)rng_u32();
  for (int64_t b = 0; b < nb; b++) {
    uint8_t *blk = q + block_size * (size_t)b;
    uint16_t d = tn_k_fp32_to_fp16(1e-3f * (0.1f + rng_uniform()));
    uint16_t m = tn_k_fp32_to_fp16(1e-3f * (0.1f + rng_uniform()));
    if (name[1] == '6') {
      memcpy(blk + offsetof(struct block_q6_K, d), &d, 2);
    } else {
      memcpy(blk, &d, 2);
      memcpy(blk + 2, &m, 2);
    }
  }
}

static void check_fast_dot(const struct dot_impl *im) {
  static float x[N_MAX], a[N_MAX], xd[N_MAX], ad[N_MAX];
  static uint8_t qx[NB_MAX * sizeof(struct block_q6_K)];
  static struct block_q8_K qa[NB_MAX];
  for (int mode = 0; mode < 2; mode++) {
    for (size_t k = 0; k < TN_ARRAY_LEN(dot_sizes); k++) {
      const int64_t n = dot_sizes[k];
      if (mode == 0) {
        fill_random(x, n, 0.05f);
        im->quant(x, qx, n);
      } else {
        randomize_blocks(im->name, qx, im->block_size, n / QK_K);
      }
      fill_random(a, n, 2.f);
      if (mode == 1) a[rng_u32() % n] = 40.f; /* force a +-127 */
      tn_quant_q8_K_ref(a, qa, n);
      float want, got;
      im->ref(n, &want, qx, qa);
      im->fast(n, &got, qx, qa);
      /* Normalization: sum |x_i y_i| of the dequantized rows. */
      double mag;
      im->dequant(qx, xd, n);
      tn_dequant_q8_K_ref(qa, ad, n);
      dot_f(xd, ad, n, &mag);
      if (!(fabs((double)got - want) <= 2e-6 * mag + 1e-30))
        TN_FAIL_("%s mode %d n=%" PRId64 ": fast %.9g, ref %.9g (mag %.3g)",
                 im->name, mode, n, got, want, mag);
    }
  }
}

static bool have_avx2(void) {
  __builtin_cpu_init();
  /* F16C comes with every AVX2 CPU (and clang 14 cannot ask for it) */
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static void test_vec_dot_avx2(void) {
  if (!have_avx2()) TN_SKIP("this CPU has no AVX2");
  const struct dot_impl ims[] = {
      {"q4_K", tn_vec_dot_q4_K_q8_K_ref, tn_vec_dot_q4_K_q8_K_avx2,
       sizeof(struct block_q4_K), tn_quant_q4_K_ref, tn_dequant_q4_K_ref},
      {"q5_K", tn_vec_dot_q5_K_q8_K_ref, tn_vec_dot_q5_K_q8_K_avx2,
       sizeof(struct block_q5_K), tn_quant_q5_K_ref, tn_dequant_q5_K_ref},
      {"q6_K", tn_vec_dot_q6_K_q8_K_ref, tn_vec_dot_q6_K_q8_K_avx2,
       sizeof(struct block_q6_K), tn_quant_q6_K_ref, tn_dequant_q6_K_ref},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(ims); i++) {
    int before = tn_test_failures;
    check_fast_dot(&ims[i]);
    if (tn_test_failures != before) return;
  }
}

static bool have_avx512(void) {
  __builtin_cpu_init();
  return have_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

static void test_vec_dot_avx512(void) {
  if (!have_avx512()) TN_SKIP("this CPU has no AVX-512 VNNI");
  const struct dot_impl ims[] = {
      {"q4_K", tn_vec_dot_q4_K_q8_K_ref, tn_vec_dot_q4_K_q8_K_avx512,
       sizeof(struct block_q4_K), tn_quant_q4_K_ref, tn_dequant_q4_K_ref},
      {"q5_K", tn_vec_dot_q5_K_q8_K_ref, tn_vec_dot_q5_K_q8_K_avx512,
       sizeof(struct block_q5_K), tn_quant_q5_K_ref, tn_dequant_q5_K_ref},
      {"q6_K", tn_vec_dot_q6_K_q8_K_ref, tn_vec_dot_q6_K_q8_K_avx512,
       sizeof(struct block_q6_K), tn_quant_q6_K_ref, tn_dequant_q6_K_ref},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(ims); i++) {
    int before = tn_test_failures;
    check_fast_dot(&ims[i]);
    if (tn_test_failures != before) return;
  }
}

/* Tiles: every (nr, nt) shape against the reference dot of each pair. */
static void check_tile(const char *name, tn_vec_dot_cb ref,
                       void (*tile)(int64_t, const void *, size_t,
                                    const void *, size_t, float *, int64_t,
                                    int, int),
                       size_t block_size, tn_from_float_cb quant) {
  enum { MR = 2, MT = 4, LDY = 7 };
  static float x[MT * N_MAX];
  static uint8_t w[MR * NB_MAX * sizeof(struct block_q6_K)];
  static struct block_q8_K qa[MT * NB_MAX];
  const int64_t sizes[] = {256, 1280, 2048};
  for (size_t k = 0; k < TN_ARRAY_LEN(sizes); k++) {
    const int64_t n = sizes[k], nb = n / QK_K;
    const size_t ws = block_size * (size_t)nb, qs = sizeof(struct block_q8_K) * (size_t)nb;
    fill_random(x, MR * n, 0.05f);
    quant(x, w, MR * n);
    fill_random(x, MT * n, 2.f);
    tn_quant_q8_K_ref(x, qa, MT * n);
    for (int nr = 1; nr <= MR; nr++)
      for (int nt = 1; nt <= MT; nt++) {
        float y[MT * LDY];
        for (int i = 0; i < MT * LDY; i++) y[i] = -12345.f;
        tile(n, w, ws, qa, qs, y, LDY, nr, nt);
        for (int t = 0; t < MT; t++)
          for (int r = 0; r < LDY; r++) {
            float got = y[t * LDY + r];
            if (t >= nt || r >= nr) {
              if (got != -12345.f)
                TN_FAIL_("%s tile %dx%d wrote y[%d][%d]", name, nr, nt, t, r);
              continue;
            }
            float want;
            ref(n, &want, w + (size_t)r * ws, (const uint8_t *)qa + (size_t)t * qs);
            if (!(fabsf(got - want) <= 1e-5f * (fabsf(want) + 1.f)))
              TN_FAIL_("%s n=%" PRId64 " tile %dx%d [%d][%d]: %.9g vs ref %.9g",
                       name, n, nr, nt, t, r, got, want);
          }
      }
  }
}

static void test_gemm_tiles_avx2(void) {
  if (!have_avx2()) TN_SKIP("this CPU has no AVX2");
  check_tile("q4_K", tn_vec_dot_q4_K_q8_K_ref, tn_gemm_q4_K_q8_K_avx2,
             sizeof(struct block_q4_K), tn_quant_q4_K_ref);
  check_tile("q5_K", tn_vec_dot_q5_K_q8_K_ref, tn_gemm_q5_K_q8_K_avx2,
             sizeof(struct block_q5_K), tn_quant_q5_K_ref);
  check_tile("q6_K", tn_vec_dot_q6_K_q8_K_ref, tn_gemm_q6_K_q8_K_avx2,
             sizeof(struct block_q6_K), tn_quant_q6_K_ref);
}

static void test_gemm_tiles_avx512(void) {
  if (!have_avx512()) TN_SKIP("this CPU has no AVX-512 VNNI");
  check_tile("q4_K", tn_vec_dot_q4_K_q8_K_ref, tn_gemm_q4_K_q8_K_avx512,
             sizeof(struct block_q4_K), tn_quant_q4_K_ref);
  check_tile("q5_K", tn_vec_dot_q5_K_q8_K_ref, tn_gemm_q5_K_q8_K_avx512,
             sizeof(struct block_q5_K), tn_quant_q5_K_ref);
  check_tile("q6_K", tn_vec_dot_q6_K_q8_K_ref, tn_gemm_q6_K_q8_K_avx512,
             sizeof(struct block_q6_K), tn_quant_q6_K_ref);
}

/* AVX2 Q8_K quantization is bit-identical to the reference. */
static void test_quant_q8_K_avx2(void) {
  if (!have_avx2()) TN_SKIP("this CPU has no AVX2");
  static float x[N_MAX];
  static struct block_q8_K want[NB_MAX], got[NB_MAX];
  for (int rep = 0; rep < 8; rep++) {
    fill_random(x, N_MAX, rep + 0.5f);
    for (int i = 0; i < QK_K; i++) x[i] = 0; /* block 0 all zero */
    x[QK_K + 3] = 20.f;                      /* block 1: tie of magnitudes */
    x[QK_K + 8] = -20.f;
    for (int i = 0; i < QK_K; i++) /* block 2: lots of .5 ties */
      x[2 * QK_K + i] = (float)(i - 128) * 0.5f;
    tn_quant_q8_K_ref(x, want, N_MAX);
    tn_quant_q8_K_avx2(x, got, N_MAX);
    for (int b = 0; b < NB_MAX; b++)
      if (memcmp(&want[b], &got[b], sizeof(want[b])) != 0)
        TN_FAIL_("rep %d block %d differs (d %g vs %g)", rep, b, want[b].d,
                 got[b].d);
  }
}

TN_TEST_MAIN(TN_TEST(test_fp16_round_trip), TN_TEST(test_golden_dequant_q4_K),
             TN_TEST(test_golden_dequant_q5_K),
             TN_TEST(test_golden_dequant_q6_K), TN_TEST(test_golden_requant),
             TN_TEST(test_round_trip), TN_TEST(test_special_blocks),
             TN_TEST(test_q8_K_format), TN_TEST(test_vec_dot_ref),
             TN_TEST(test_quant_q8_K_avx2), TN_TEST(test_vec_dot_avx2),
             TN_TEST(test_gemm_tiles_avx2), TN_TEST(test_vec_dot_avx512),
             TN_TEST(test_gemm_tiles_avx512))
