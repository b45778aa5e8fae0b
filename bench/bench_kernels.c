/*
 * bench_kernels.c: throughput of the matrix products on SmolLM2-135M shapes.
 *
 *   bench_kernels [n_threads] [level]      (level: scalar|avx2|avx512)
 *
 * Reports, median of repeats after a warm-up, with min..max spread:
 *  - decode matvec (n_tok = 1) GB/s of weights streamed, for one hot
 *    576x1536 Q4_1 matrix (cache-resident) and the 576x49152 Q8_0 vocab
 *    projection (30 MB: from memory);
 *  - a whole-model sweep: 30 layers of Q4_1 q/k/v/o/gate/up/down plus the
 *    Q8_0 output, quantize + matmul per matrix with a barrier between, for
 *    one token (decode) and 128 tokens (prefill, output for 1 token): the
 *    tokens/s the matrix products alone allow.
 * Weights are random; only the timing matters.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/base.h"
#include "kernels/kernels.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* A plain streaming read of the buffer: the bandwidth the machine gives. */
static double read_bandwidth(const void *p, size_t size) {
  const uint64_t *u = p;
  size_t n = size / 8;
  double best = 1e30;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now_s();
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i + 4 <= n; i += 4) {
      a0 += u[i];
      a1 += u[i + 1];
      a2 += u[i + 2];
      a3 += u[i + 3];
    }
    sink += a0 + a1 + a2 + a3;
    double t = now_s() - t0;
    if (t < best) best = t;
  }
  (void)sink;
  return (double)size / best * 1e-9;
}

static struct tn_mat make_mat(enum tn_type t, int64_t n_cols, int64_t n_rows) {
  size_t rs = tn_type_row_size(t, n_cols);
  uint8_t *d = malloc(rs * (size_t)n_rows);
  float *x = malloc(sizeof(float) * (size_t)n_cols);
  for (int64_t r = 0; r < n_rows; r++) {
    for (int64_t c = 0; c < n_cols; c++)
      x[c] = (float)((rand() % 2001) - 1000) * 1e-4f;
    tn_type_get(t)->from_float(x, d + r * rs, n_cols);
  }
  free(x);
  return (struct tn_mat){t, n_cols, n_rows, rs, d};
}

struct job {
  struct tn_pool *pool;
  struct tn_mat *mats;
  int n_mats;
  int64_t n_tok;
  const float *x;
  void *q;
  float *y;
  int last_tok_only_for_last; /* the output projection sees one token */
};

static void run_cb(void *ctx, int ith, int nth) {
  struct job *j = ctx;
  for (int m = 0; m < j->n_mats; m++) {
    const struct tn_mat *w = &j->mats[m];
    int64_t n_tok = j->n_tok;
    const float *x = j->x;
    if (j->last_tok_only_for_last && m == j->n_mats - 1) {
      x += (n_tok - 1) * w->n_cols;
      n_tok = 1;
    }
    tn_matmul_quantize(w, x, n_tok, j->q, ith, nth);
    tn_pool_barrier(j->pool);
    tn_matmul(w, j->q, n_tok, j->y, w->n_rows, ith, nth);
    tn_pool_barrier(j->pool);
  }
}

/* Times reps runs of job; prints median and spread; returns median. */
static double time_job(struct job *j, int reps) {
  double t[64];
  if (reps > 64) reps = 64;
  tn_pool_run(j->pool, run_cb, j); /* warm-up */
  for (int i = 0; i < reps; i++) {
    double t0 = now_s();
    tn_pool_run(j->pool, run_cb, j);
    t[i] = now_s() - t0;
  }
  qsort(t, (size_t)reps, sizeof(double), cmp_d);
  return t[reps / 2];
}

static double spread(struct job *j, int reps, double *lo, double *hi) {
  double t[64];
  if (reps > 64) reps = 64;
  for (int i = 0; i < reps; i++) {
    double t0 = now_s();
    tn_pool_run(j->pool, run_cb, j);
    t[i] = now_s() - t0;
  }
  qsort(t, (size_t)reps, sizeof(double), cmp_d);
  *lo = t[0];
  *hi = t[reps - 1];
  return t[reps / 2];
}

static void bench_one(struct tn_pool *pool, const char *label, struct tn_mat *w,
                      int n_mats, int64_t n_tok, int reps, int last_only) {
  int64_t max_cols = 0, max_rows = 0;
  size_t bytes = 0, q_size = 0;
  for (int m = 0; m < n_mats; m++) {
    if (w[m].n_cols > max_cols) max_cols = w[m].n_cols;
    if (w[m].n_rows > max_rows) max_rows = w[m].n_rows;
    bytes += w[m].row_size * (size_t)w[m].n_rows;
    size_t qs = tn_matmul_q_size(&w[m], n_tok);
    if (qs > q_size) q_size = qs;
  }
  float *x = malloc(sizeof(float) * (size_t)(max_cols * n_tok));
  for (int64_t i = 0; i < max_cols * n_tok; i++)
    x[i] = (float)((rand() % 2001) - 1000) * 1e-3f;
  float *y = malloc(sizeof(float) * (size_t)(max_rows * n_tok));
  void *q = malloc(q_size);
  struct job j = {pool, w, n_mats, n_tok, x, q, y, last_only};
  time_job(&j, 3);
  double lo, hi, med = spread(&j, reps, &lo, &hi);
  printf("%-34s n_tok %4lld  %8.3f ms  [%.3f..%.3f]  %6.2f GB/s  %8.1f tok/s\n",
         label, (long long)n_tok, med * 1e3, lo * 1e3, hi * 1e3,
         (double)bytes / med * 1e-9, (double)n_tok / med);
  free(x);
  free(y);
  free(q);
}

int main(int argc, char **argv) {
  int n_threads = argc > 1 ? atoi(argv[1]) : 2;
  enum tn_cpu_level level = TN_CPU_LEVEL_COUNT - 1;
  for (int l = 0; argc > 2 && l < TN_CPU_LEVEL_COUNT; l++)
    if (strcmp(argv[2], tn_cpu_level_name((enum tn_cpu_level)l)) == 0)
      level = (enum tn_cpu_level)l;
  level = tn_kernels_init(level);
  struct tn_pool *pool = tn_pool_new(n_threads);
  printf("bench_kernels: %d threads, level %s\n", n_threads,
         tn_cpu_level_name(level));

  struct tn_mat up = make_mat(TN_TYPE_Q4_1, 576, 1536);
  struct tn_mat down = make_mat(TN_TYPE_Q4_1, 1536, 576);
  struct tn_mat out = make_mat(TN_TYPE_Q8_0, 576, 49152);
  bench_one(pool, "Q4_1 576x1536 (hot)", &up, 1, 1, 63, 0);
  bench_one(pool, "Q4_1 1536x576 (hot)", &down, 1, 1, 63, 0);
  struct tn_mat small8 = make_mat(TN_TYPE_Q8_0, 576, 1536);
  bench_one(pool, "Q8_0 576x1536 (hot)", &small8, 1, 1, 63, 0);
  bench_one(pool, "Q8_0 576x49152 vocab", &out, 1, 1, 31, 0);
  printf("%-34s %6.2f GB/s\n", "memory read bandwidth (1 thread)",
         read_bandwidth(out.data, out.row_size * (size_t)out.n_rows));
  bench_one(pool, "Q4_1 576x1536 (hot)", &up, 1, 64, 31, 0);
  /* Qwen2.5 0.5B's FFN: Q5_0 (896 is not a multiple of 256) and Q8_0 */
  struct tn_mat up5 = make_mat(TN_TYPE_Q5_0, 896, 4864);
  struct tn_mat up8 = make_mat(TN_TYPE_Q8_0, 896, 4864);
  bench_one(pool, "Q5_0 896x4864", &up5, 1, 64, 15, 0);
  bench_one(pool, "Q8_0 896x4864", &up8, 1, 64, 15, 0);

  /* the whole model: 30 layers + output */
  enum { N_LAYER = 30, PER = 7 };
  static struct tn_mat model[N_LAYER * PER + 1];
  int n = 0;
  for (int l = 0; l < N_LAYER; l++) {
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 576);  /* q */
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 192);  /* k */
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 192);  /* v */
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 576);  /* o */
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 1536); /* gate */
    model[n++] = make_mat(TN_TYPE_Q4_1, 576, 1536); /* up */
    model[n++] = make_mat(TN_TYPE_Q4_1, 1536, 576); /* down */
  }
  model[n++] = out;
  bench_one(pool, "model matmuls, decode", model, n, 1, 15, 1);
  bench_one(pool, "model matmuls, prefill", model, n, 128, 5, 1);
  tn_pool_free(pool);
  return 0;
}
