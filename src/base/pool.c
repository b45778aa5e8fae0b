/*
 * pool.c: the compute thread pool.
 *
 * A forward pass is one parallel region: tn_pool_run() hands fn to the
 * run's threads, each runs the whole layer loop on its slice (ith/nth) and
 * they meet at tn_pool_barrier() between dependent ops. Small models take
 * tens of barriers per token, so the barrier spins (a sense-reversing
 * counter), and idle workers spin for a while on the run generation before
 * falling asleep on a condition variable. A decode loop therefore costs no
 * syscalls per step.
 *
 * One pool serves every model of a process: each engine thread calls
 * tn_pool_run() for its own forward passes, and runs are taken in arrival
 * order (a ticket lock), so two models never have two spinning pools
 * fighting over the same cores, and neither starves the other. A run may
 * use fewer threads than the pool has (a model configured with fewer
 * threads); the others still see the run's generation and acknowledge it
 * (that is what keeps a worker from ever mixing one run's fn with the
 * next run's thread count), then go back to waiting.
 *
 * When the pool has more threads than the process has cores, a spinning
 * thread would hold a core the thread it waits for needs: then barriers
 * and idle workers yield at once instead of spinning.
 *
 * Invariants:
 *  - run_mu + ticket/serving serialise runs; inside a run only the caller
 *    (thread 0) and the workers touch fn/ctx/run_nth.
 *  - gen is bumped (release) after fn/ctx/run_nth are published; a worker
 *    that sees the new gen (acquire) sees them.
 *  - n_active counts workers still inside the current run; the caller
 *    returns only when it is 0, so fn/ctx may be reused afterwards.
 * Locks: run_mu guards ticket/serving; mu guards only the workers'
 * sleep/wake handshake (n_sleeping, cond); live_mu only the sleep of
 * engines whose background work waits for live requests to end. Never
 * two at once.
 */
#include "base/base.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* Spin iterations before an idle worker sleeps (~a millisecond or two). */
#define POOL_SPIN_ITERS 200000
/* Spins at a barrier before yielding the core each round: when the
 * machine is oversubscribed, the thread we wait for may need our core. */
#define BARRIER_SPIN_ITERS 20000

static inline void spin_wait(int *spins, int limit) {
  if (*spins < limit && ++*spins < limit)
    cpu_relax();
  else
    sched_yield();
}

struct tn_pool {
  int n_threads;
  pthread_t *threads;
  int barrier_spins;    /* BARRIER_SPIN_ITERS, or 0 when oversubscribed */
  int idle_spins;       /* POOL_SPIN_ITERS, or a few when oversubscribed */

  /* runs, one at a time in ticket order: guarded by run_mu */
  pthread_mutex_t run_mu;
  pthread_cond_t run_cv;
  uint64_t ticket, serving;

  tn_pool_fn_cb fn;
  void *ctx;
  int run_nth;          /* threads taking part in the current run */
  _Atomic uint64_t gen;
  _Atomic int n_active;
  _Atomic bool stop;

  /* barrier */
  _Atomic int bar_count;
  _Atomic int bar_phase;

  /* sleep/wake: guarded by mu */
  pthread_mutex_t mu;
  pthread_cond_t cond;
  _Atomic int n_sleeping;

  _Atomic int live;     /* live requests of every engine (tn_pool_live) */
  _Atomic int live_waiters;
  pthread_mutex_t live_mu; /* only the live waiters' sleep and wake */
  pthread_cond_t live_cv;
};

struct worker_arg {
  struct tn_pool *pool;
  int ith;
};

static void *worker_main(void *p) {
  struct worker_arg *wa = p;
  struct tn_pool *pool = wa->pool;
  int ith = wa->ith;
  free(wa);
  uint64_t seen = 0;
  for (;;) {
    uint64_t g;
    int spins = 0;
    while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) ==
               seen &&
           !atomic_load_explicit(&pool->stop, memory_order_acquire)) {
      if (++spins < pool->idle_spins) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&pool->mu);
      atomic_fetch_add(&pool->n_sleeping, 1);
      while (atomic_load(&pool->gen) == seen && !atomic_load(&pool->stop))
        pthread_cond_wait(&pool->cond, &pool->mu);
      atomic_fetch_sub(&pool->n_sleeping, 1);
      pthread_mutex_unlock(&pool->mu);
      spins = 0;
    }
    if (atomic_load_explicit(&pool->stop, memory_order_acquire)) break;
    seen = g;
    if (ith < pool->run_nth) pool->fn(pool->ctx, ith, pool->run_nth);
    atomic_fetch_sub_explicit(&pool->n_active, 1, memory_order_release);
  }
  return NULL;
}

struct tn_pool *tn_pool_new(int n_threads) {
  if (n_threads < 1) n_threads = 1;
  if (n_threads > TN_POOL_THREADS_MAX) n_threads = TN_POOL_THREADS_MAX;
  struct tn_pool *pool = calloc(1, sizeof(*pool));
  if (!pool) return NULL;
  pool->threads = calloc((size_t)n_threads, sizeof(pthread_t));
  if (!pool->threads) {
    free(pool);
    return NULL;
  }
  bool over = n_threads > tn_cpu_count_logical();
  pool->barrier_spins = over ? 0 : BARRIER_SPIN_ITERS;
  pool->idle_spins = over ? 64 : POOL_SPIN_ITERS;
  pthread_mutex_init(&pool->mu, NULL);
  pthread_cond_init(&pool->cond, NULL);
  pthread_mutex_init(&pool->live_mu, NULL);
  pthread_cond_init(&pool->live_cv, NULL);
  pthread_mutex_init(&pool->run_mu, NULL);
  pthread_cond_init(&pool->run_cv, NULL);
  /* n_threads counts the threads started; tn_pool_free joins those. */
  pool->n_threads = 1;
  for (int i = 1; i < n_threads; i++) {
    struct worker_arg *wa = malloc(sizeof(*wa));
    if (!wa) goto fail;
    wa->pool = pool;
    wa->ith = i;
    if (tn_thread_create(&pool->threads[i], worker_main, wa) != 0) {
      free(wa);
      goto fail;
    }
    pool->n_threads = i + 1;
  }
  return pool;
fail:
  tn_pool_free(pool);
  return NULL;
}

int tn_thread_create(pthread_t *t, void *(*fn)(void *), void *arg) {
  sigset_t all, old;
  sigfillset(&all);
  /* faults stay deliverable (and the sanitizers' own signals) */
  static const int sync_sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
                                  SIGABRT, SIGSYS};
  for (size_t i = 0; i < TN_ARRAY_LEN(sync_sigs); i++)
    sigdelset(&all, sync_sigs[i]);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  int rc = pthread_create(t, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

void tn_pool_free(struct tn_pool *pool) {
  if (!pool) return;
  pthread_mutex_lock(&pool->mu);
  atomic_store(&pool->stop, true);
  pthread_cond_broadcast(&pool->cond);
  pthread_mutex_unlock(&pool->mu);
  for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
  pthread_mutex_destroy(&pool->mu);
  pthread_cond_destroy(&pool->cond);
  pthread_mutex_destroy(&pool->live_mu);
  pthread_cond_destroy(&pool->live_cv);
  pthread_mutex_destroy(&pool->run_mu);
  pthread_cond_destroy(&pool->run_cv);
  free(pool->threads);
  free(pool);
}

int tn_pool_size(const struct tn_pool *pool) { return pool->n_threads; }

void tn_pool_live_add(struct tn_pool *pool, int d) {
  atomic_fetch_add(&pool->live, d);
  if (atomic_load(&pool->live_waiters) > 0) {
    pthread_mutex_lock(&pool->live_mu);
    pthread_cond_broadcast(&pool->live_cv);
    pthread_mutex_unlock(&pool->live_mu);
  }
}

int tn_pool_live_wait(struct tn_pool *pool, int seen, double timeout_s) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  double ns = (double)ts.tv_nsec + timeout_s * 1e9;
  ts.tv_sec += (time_t)(ns / 1e9);
  ts.tv_nsec = (long)(ns - (double)(time_t)(ns / 1e9) * 1e9);
  pthread_mutex_lock(&pool->live_mu);
  atomic_fetch_add(&pool->live_waiters, 1);
  int rc = 0;
  while (atomic_load(&pool->live) == seen && rc == 0)
    rc = pthread_cond_timedwait(&pool->live_cv, &pool->live_mu, &ts);
  atomic_fetch_sub(&pool->live_waiters, 1);
  pthread_mutex_unlock(&pool->live_mu);
  return atomic_load(&pool->live);
}

int tn_pool_live(const struct tn_pool *pool) {
  return atomic_load_explicit(&pool->live, memory_order_acquire);
}

/* Waits for this caller's turn (FIFO across engine threads). */
static void run_begin(struct tn_pool *pool) {
  pthread_mutex_lock(&pool->run_mu);
  uint64_t me = pool->ticket++;
  while (pool->serving != me) pthread_cond_wait(&pool->run_cv, &pool->run_mu);
  pthread_mutex_unlock(&pool->run_mu);
}

static void run_end(struct tn_pool *pool) {
  pthread_mutex_lock(&pool->run_mu);
  pool->serving++;
  if (pool->ticket != pool->serving) pthread_cond_broadcast(&pool->run_cv);
  pthread_mutex_unlock(&pool->run_mu);
}

void tn_pool_run_n(struct tn_pool *pool, int nth, tn_pool_fn_cb fn,
                   void *ctx) {
  if (nth < 1 || nth > pool->n_threads) nth = pool->n_threads;
  run_begin(pool);
  pool->run_nth = nth;
  if (nth == 1) {
    fn(ctx, 0, 1);
    run_end(pool);
    return;
  }
  pool->fn = fn;
  pool->ctx = ctx;
  atomic_store_explicit(&pool->n_active, pool->n_threads - 1,
                        memory_order_relaxed);
  /* seq_cst: the store to gen and the load of n_sleeping must not be
   * reordered against the worker's n_sleeping++ / gen load (a lost
   * wake-up otherwise). */
  atomic_fetch_add(&pool->gen, 1);
  if (atomic_load(&pool->n_sleeping) > 0) {
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->cond);
    pthread_mutex_unlock(&pool->mu);
  }
  fn(ctx, 0, nth);
  int spins = 0;
  while (atomic_load_explicit(&pool->n_active, memory_order_acquire) > 0)
    spin_wait(&spins, pool->barrier_spins);
  run_end(pool);
}

void tn_pool_run(struct tn_pool *pool, tn_pool_fn_cb fn, void *ctx) {
  tn_pool_run_n(pool, pool->n_threads, fn, ctx);
}

void tn_pool_barrier(struct tn_pool *pool) {
  int n = pool->run_nth;
  if (n <= 1) return;
  int phase = atomic_load_explicit(&pool->bar_phase, memory_order_relaxed);
  if (atomic_fetch_add_explicit(&pool->bar_count, 1, memory_order_acq_rel) ==
      n - 1) {
    atomic_store_explicit(&pool->bar_count, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->bar_phase, 1, memory_order_release);
    return;
  }
  int spins = 0;
  while (atomic_load_explicit(&pool->bar_phase, memory_order_acquire) == phase)
    spin_wait(&spins, pool->barrier_spins);
}
