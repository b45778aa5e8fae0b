/*
 * dispatch.c: picks kernels by CPU feature.
 *
 * At first use we build one traits table per CPU level (scalar, AVX2,
 * AVX-512), each a copy of the scalar reference with the entries that have
 * SIMD versions replaced, and remember the best level this CPU and OS
 * support. tn_kernels_init() may lower the level in force (tests do, and
 * TN_CPU_LEVEL=scalar|avx2|avx512 in the environment caps it); the level is
 * an atomic index into the tables, so switching never exposes a half-written
 * table to a thread that is reading it.
 *
 * Levels:
 *   AVX2    AVX2 + FMA + F16C, and the OS saving YMM state (XCR0 bits 1-2).
 *   AVX512  AVX-512 F/DQ/BW/VL + VNNI, and the OS saving ZMM/opmask state
 *           (XCR0 bits 5-7). Our AVX-512 file is compiled with VNNI, so a
 *           CPU without it (Skylake-X) runs the AVX2 level instead.
 */
#include <cpuid.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/base.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

static struct tn_type_traits level_traits[TN_CPU_LEVEL_COUNT][TN_TYPE_COUNT];
static struct tn_gemm_kernel level_gemm[TN_CPU_LEVEL_COUNT][TN_TYPE_COUNT];
static enum tn_cpu_level cpu_level; /* best the machine supports */
static enum tn_cpu_level env_level; /* cap from TN_CPU_LEVEL */
static _Atomic int cur_level = -1;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static uint64_t xgetbv0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t)hi << 32 | lo;
}

static enum tn_cpu_level detect(void) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return TN_CPU_LEVEL_SCALAR;
  bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
       f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return TN_CPU_LEVEL_SCALAR;
  uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return TN_CPU_LEVEL_SCALAR;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return TN_CPU_LEVEL_SCALAR;
  bool avx2 = b & (1u << 5);
  if (!avx2) return TN_CPU_LEVEL_SCALAR;
  bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30),
       vl = b & (1u << 31), vnni = c & (1u << 11);
  if (f512 && dq && bw && vl && vnni && (xcr0 & 0xe0) == 0xe0)
    return TN_CPU_LEVEL_AVX512;
  return TN_CPU_LEVEL_AVX2;
#else
  return TN_CPU_LEVEL_SCALAR;
#endif
}

static void build_tables(void) {
  for (int l = 0; l < TN_CPU_LEVEL_COUNT; l++)
    memcpy(level_traits[l], tn_type_traits_ref, sizeof(tn_type_traits_ref));

  /* AVX2 */
  struct tn_type_traits *t = level_traits[TN_CPU_LEVEL_AVX2];
  t[TN_TYPE_F32].vec_dot = tn_vec_dot_f32_f32_avx2;
  t[TN_TYPE_F16].to_float = tn_dequant_f16_avx2;
  t[TN_TYPE_F16].from_float = tn_quant_f16_avx2;
  t[TN_TYPE_F16].vec_dot = tn_vec_dot_f16_f32_avx2;
  t[TN_TYPE_BF16].vec_dot = tn_vec_dot_bf16_f32_avx2;
  t[TN_TYPE_Q4_0].vec_dot = tn_vec_dot_q4_0_q8_0_avx2;
  t[TN_TYPE_Q4_1].vec_dot = tn_vec_dot_q4_1_q8_1_avx2;
  t[TN_TYPE_Q5_0].vec_dot = tn_vec_dot_q5_0_q8_0_avx2;
  t[TN_TYPE_Q5_1].vec_dot = tn_vec_dot_q5_1_q8_1_avx2;
  t[TN_TYPE_Q8_0].vec_dot = tn_vec_dot_q8_0_q8_0_avx2;
  t[TN_TYPE_Q8_0].from_float = tn_quant_q8_0_avx2;
  t[TN_TYPE_Q8_1].from_float = tn_quant_q8_1_avx2;
  t[TN_TYPE_Q8_K].from_float = tn_quant_q8_K_avx2;
  t[TN_TYPE_Q4_K].vec_dot = tn_vec_dot_q4_K_q8_K_avx2;
  t[TN_TYPE_Q5_K].vec_dot = tn_vec_dot_q5_K_q8_K_avx2;
  t[TN_TYPE_Q6_K].vec_dot = tn_vec_dot_q6_K_q8_K_avx2;
  struct tn_gemm_kernel *g = level_gemm[TN_CPU_LEVEL_AVX2];
  g[TN_TYPE_Q4_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q4_0_q8_0_avx2, .mr = 4, .mt = 2};
  g[TN_TYPE_Q4_1] = (struct tn_gemm_kernel){.tile = tn_gemm_q4_1_q8_1_avx2, .mr = 4, .mt = 2};
  g[TN_TYPE_Q8_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q8_0_q8_0_avx2, .mr = 4, .mt = 2};
  g[TN_TYPE_Q5_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q5_0_q8_0_avx2, .mr = 2, .mt = 4, .mr_narrow = 4};
  g[TN_TYPE_Q5_1] = (struct tn_gemm_kernel){.tile = tn_gemm_q5_1_q8_1_avx2, .mr = 4, .mt = 2};
  g[TN_TYPE_Q4_K] = (struct tn_gemm_kernel){.tile = tn_gemm_q4_K_q8_K_avx2, .mr = 2, .mt = 8, .mr_narrow = 8};
  g[TN_TYPE_Q5_K] = (struct tn_gemm_kernel){.tile = tn_gemm_q5_K_q8_K_avx2, .mr = 2, .mt = 8, .mr_narrow = 8};
  g[TN_TYPE_Q6_K] = (struct tn_gemm_kernel){.tile = tn_gemm_q6_K_q8_K_avx2, .mr = 2, .mt = 4};

  /* AVX-512: the AVX2 set, with VNNI where it pays. */
  memcpy(level_traits[TN_CPU_LEVEL_AVX512], level_traits[TN_CPU_LEVEL_AVX2],
         sizeof(level_traits[0]));
  memcpy(level_gemm[TN_CPU_LEVEL_AVX512], level_gemm[TN_CPU_LEVEL_AVX2],
         sizeof(level_gemm[0]));
  t = level_traits[TN_CPU_LEVEL_AVX512];
  t[TN_TYPE_Q4_0].vec_dot = tn_vec_dot_q4_0_q8_0_avx512;
  t[TN_TYPE_Q4_1].vec_dot = tn_vec_dot_q4_1_q8_1_avx512;
  t[TN_TYPE_Q8_0].vec_dot = tn_vec_dot_q8_0_q8_0_avx512;
  t[TN_TYPE_Q5_0].vec_dot = tn_vec_dot_q5_0_q8_0_avx512;
  t[TN_TYPE_Q5_1].vec_dot = tn_vec_dot_q5_1_q8_1_avx512;
  t[TN_TYPE_Q4_K].vec_dot = tn_vec_dot_q4_K_q8_K_avx512;
  t[TN_TYPE_Q5_K].vec_dot = tn_vec_dot_q5_K_q8_K_avx512;
  t[TN_TYPE_Q6_K].vec_dot = tn_vec_dot_q6_K_q8_K_avx512;
  g = level_gemm[TN_CPU_LEVEL_AVX512];
  g[TN_TYPE_Q4_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q4_0_q8_0_avx512, .mr = 4, .mt = 4};
  g[TN_TYPE_Q4_1] = (struct tn_gemm_kernel){.tile = tn_gemm_q4_1_q8_1_avx512, .mr = 8, .mt = 4};
  g[TN_TYPE_Q8_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q8_0_q8_0_avx512, .mr = 4, .mt = 4};
  g[TN_TYPE_Q5_0] = (struct tn_gemm_kernel){.tile = tn_gemm_q5_0_q8_0_avx512, .mr = 4, .mt = 4};
  g[TN_TYPE_Q5_1] = (struct tn_gemm_kernel){.tile = tn_gemm_q5_1_q8_1_avx512, .mr = 4, .mt = 4};
  g[TN_TYPE_Q4_K] = (struct tn_gemm_kernel){
      .tile = tn_gemm_q4_K_q8_K_avx512, .mr = 2, .mt = 4,
      .gemv16 = tn_gemv16_q4_K_q8_K_avx512};
  g[TN_TYPE_Q5_K] = (struct tn_gemm_kernel){
      .tile = tn_gemm_q5_K_q8_K_avx512, .mr = 2, .mt = 4,
      .gemv16 = tn_gemv16_q5_K_q8_K_avx512};
  g[TN_TYPE_Q6_K] = (struct tn_gemm_kernel){
      .tile = tn_gemm_q6_K_q8_K_avx512, .mr = 2, .mt = 4,
      .gemv16 = tn_gemv16_q6_K_q8_K_avx512};
}

static enum tn_cpu_level parse_level(const char *s) {
  if (!s || !*s) return TN_CPU_LEVEL_COUNT - 1;
  for (int l = 0; l < TN_CPU_LEVEL_COUNT; l++)
    if (strcasecmp(s, tn_cpu_level_name((enum tn_cpu_level)l)) == 0)
      return (enum tn_cpu_level)l;
  tn_log_warn("TN_CPU_LEVEL=%s: want scalar, avx2 or avx512; ignored", s);
  return TN_CPU_LEVEL_COUNT - 1;
}

static void init_once(void) {
  build_tables();
  cpu_level = detect();
  env_level = parse_level(getenv("TN_CPU_LEVEL"));
  enum tn_cpu_level l = cpu_level < env_level ? cpu_level : env_level;
  atomic_store(&cur_level, (int)l);
}

enum tn_cpu_level tn_kernels_init(enum tn_cpu_level max_level) {
  pthread_once(&once, init_once);
  enum tn_cpu_level l = cpu_level < env_level ? cpu_level : env_level;
  if ((int)max_level >= 0 && max_level < l) l = max_level;
  atomic_store(&cur_level, (int)l);
  return l;
}

static inline int level_now(void) {
  int l = atomic_load_explicit(&cur_level, memory_order_acquire);
  if (l < 0) {
    pthread_once(&once, init_once);
    l = atomic_load(&cur_level);
  }
  return l;
}

enum tn_cpu_level tn_kernels_level(void) {
  return (enum tn_cpu_level)level_now();
}

const char *tn_cpu_level_name(enum tn_cpu_level level) {
  switch (level) {
  case TN_CPU_LEVEL_SCALAR: return "scalar";
  case TN_CPU_LEVEL_AVX2: return "avx2";
  case TN_CPU_LEVEL_AVX512: return "avx512";
  default: return "(invalid)";
  }
}

const struct tn_type_traits *tn_type_get(enum tn_type t) {
  if (!tn_type_valid(t)) return NULL;
  return &level_traits[level_now()][t];
}

const struct tn_gemm_kernel *tn_gemm_kernel_get(enum tn_type t) {
  if (!tn_type_valid(t)) return NULL;
  return &level_gemm[level_now()][t];
}
