/*
 * membw.c: the machine's read bandwidth, the ceiling for decode speed.
 *
 * Each of N threads sums its share of a buffer much larger than the caches
 * (AVX2 loads when built for them, else plain loads); the best of several
 * passes is reported in GB/s (1e9 bytes/s).
 *
 *   tern-membw [THREADS] [MIB]
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct job {
  const uint64_t *p;
  size_t n;
  uint64_t sum;
  pthread_barrier_t *bar;
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
  struct job *j = arg;
  pthread_barrier_wait(j->bar);
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= j->n; i += 4) {
    s0 += j->p[i];
    s1 += j->p[i + 1];
    s2 += j->p[i + 2];
    s3 += j->p[i + 3];
  }
  j->sum = s0 + s1 + s2 + s3;
  pthread_barrier_wait(j->bar);
  return NULL;
}

int main(int argc, char **argv) {
  int nth = argc > 1 ? atoi(argv[1]) : 2;
  size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
  if (nth < 1 || nth > 256 || mib < 64) {
    fprintf(stderr, "usage: tern-membw [THREADS 1..256] [MIB >= 64]\n");
    return 2;
  }
  size_t bytes = mib << 20, n = bytes / sizeof(uint64_t);
  uint64_t *buf = aligned_alloc(64, bytes);
  if (!buf) return 1;
  for (size_t i = 0; i < n; i++) buf[i] = i;
  double best = 0.0;
  uint64_t total = 0;
  for (int pass = 0; pass < 5; pass++) {
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nth + 1);
    pthread_t th[256];
    struct job jobs[256];
    size_t per = n / (size_t)nth;
    for (int t = 0; t < nth; t++) {
      jobs[t] = (struct job){buf + (size_t)t * per, per, 0, &bar};
      pthread_create(&th[t], NULL, reader, &jobs[t]);
    }
    pthread_barrier_wait(&bar);
    double t0 = now();
    pthread_barrier_wait(&bar);
    double dt = now() - t0;
    for (int t = 0; t < nth; t++) {
      pthread_join(th[t], NULL);
      total += jobs[t].sum;
    }
    pthread_barrier_destroy(&bar);
    double gbs = (double)(per * (size_t)nth * sizeof(uint64_t)) / dt / 1e9;
    if (gbs > best) best = gbs;
  }
  printf("{\"threads\": %d, \"mib\": %zu, \"read_gb_s\": %.2f, \"check\": %llu}\n",
         nth, mib, best, (unsigned long long)(total & 0xff));
  free(buf);
  return 0;
}
