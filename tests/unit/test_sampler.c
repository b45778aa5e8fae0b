/* test_sampler.c: greedy, seeds, filters, penalties, logprobs, stops. */
#include <math.h>

#include "engine/engine.h"
#include "tn_test.h"

#define V 1000

static void fill(float *l, uint32_t seed) {
  for (int i = 0; i < V; i++) {
    seed = seed * 1664525u + 1013904223u;
    l[i] = (float)(seed >> 8) / (float)(1 << 24) * 8.0f - 4.0f;
  }
}

static int32_t argmax(const float *l) {
  int32_t b = 0;
  for (int i = 1; i < V; i++)
    if (l[i] > l[b]) b = i;
  return b;
}

static int32_t sample_once(const struct tn_sampling *sp, const float *l0) {
  struct tn_sampler *s;
  struct tn_error err = {0};
  if (tn_sampler_new(sp, V, &s, &err)) return -1;
  float l[V];
  memcpy(l, l0, sizeof(l));
  struct tn_sample_out o;
  tn_sampler_sample(s, l, &o);
  tn_sampler_free(s);
  return o.id;
}

static void test_greedy(void) {
  float l[V];
  fill(l, 7);
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.temperature = 0.0f;
  ASSERT_EQ(sample_once(&sp, l), argmax(l));
  sp.temperature = 1.0f;
  sp.top_k = 1;
  ASSERT_EQ(sample_once(&sp, l), argmax(l));
  sp.top_k = 0;
  sp.top_p = 1e-6f;
  ASSERT_EQ(sample_once(&sp, l), argmax(l));
}

static void test_seed(void) {
  float l[V];
  fill(l, 11);
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.temperature = 1.5f;
  int diff = 0;
  for (uint64_t seed = 1; seed < 20; seed++) {
    sp.seed = seed;
    int32_t a = sample_once(&sp, l), b = sample_once(&sp, l);
    ASSERT_EQ(a, b);
    sp.seed = seed + 1000;
    diff += sample_once(&sp, l) != a;
  }
  ASSERT_GT(diff, 5); /* different seeds do differ */
}

static void test_bias_and_check(void) {
  float l[V];
  fill(l, 3);
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.temperature = 0.0f;
  struct tn_logit_bias b = {.id = 123, .bias = 100.0f};
  sp.bias = &b;
  sp.n_bias = 1;
  ASSERT_EQ(sample_once(&sp, l), 123);
  struct tn_error err = {0};
  b.id = V;
  ASSERT_EQ(tn_sampling_check(&sp, V, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "logit_bias");
  b.id = -1;
  ASSERT_EQ(tn_sampling_check(&sp, V, &err), TN_EINVAL);
  sp.n_bias = 0;
  sp.n_logprobs = 21;
  ASSERT_EQ(tn_sampling_check(&sp, V, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "top_logprobs");
  sp.n_logprobs = 0;
  sp.top_p = 0.0f;
  ASSERT_EQ(tn_sampling_check(&sp, V, &err), TN_EINVAL);
}

static void test_min_p_top_k_support(void) {
  float l[V];
  fill(l, 5);
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.top_k = 5;
  /* every draw is one of the 5 best */
  float sorted[V];
  memcpy(sorted, l, sizeof(l));
  float fifth;
  for (int k = 0; k < 5; k++) {
    int32_t b = argmax(sorted);
    fifth = sorted[b];
    sorted[b] = -INFINITY;
  }
  for (uint64_t seed = 0; seed < 50; seed++) {
    sp.seed = seed;
    int32_t id = sample_once(&sp, l);
    ASSERT(id >= 0 && l[id] >= fifth);
  }
  sp.top_k = 0;
  sp.min_p = 0.5f;
  float mx = l[argmax(l)];
  for (uint64_t seed = 0; seed < 50; seed++) {
    sp.seed = seed;
    int32_t id = sample_once(&sp, l);
    ASSERT(l[id] >= mx + logf(0.5f) - 1e-5f);
  }
}

static void test_penalties_and_logprobs(void) {
  float l[V];
  fill(l, 9);
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.temperature = 0.0f;
  sp.presence_penalty = 2.0f;
  sp.freq_penalty = 2.0f;
  sp.n_logprobs = 5;
  struct tn_sampler *s;
  struct tn_error err = {0};
  ASSERT_EQ(tn_sampler_new(&sp, V, &s, &err), TN_OK);
  float w[V];
  memcpy(w, l, sizeof(w));
  struct tn_sample_out o1, o2;
  tn_sampler_sample(s, w, &o1);
  ASSERT_EQ(o1.id, argmax(l));
  ASSERT_EQ(o1.n_top, 5);
  ASSERT_EQ(o1.top[0].id, o1.id);
  ASSERT_NEAR(o1.logprob, o1.top[0].logprob, 1e-6);
  for (int i = 1; i < 5; i++) ASSERT(o1.top[i].logprob <= o1.top[i - 1].logprob);
  double total = 0;
  float mx = l[argmax(l)];
  for (int i = 0; i < V; i++) total += exp(l[i] - mx);
  ASSERT_NEAR(o1.logprob, -log(total), 1e-4);
  memcpy(w, l, sizeof(w));
  tn_sampler_sample(s, w, &o2);
  ASSERT_NE(o2.id, o1.id); /* penalised out of first place (gap < 4) */
  tn_sampler_free(s);
}

static void test_stop_scan(void) {
  const char *stops[] = {"END", "\n\n"};
  struct tn_stop_match m = tn_stop_scan("hello E", 7, stops, 2);
  ASSERT(!m.hit);
  ASSERT_EQ(m.emit_len, 6); /* "E" could start END */
  m = tn_stop_scan("hello EN", 8, stops, 2);
  ASSERT_EQ(m.emit_len, 6);
  m = tn_stop_scan("hello END more", 14, stops, 2);
  ASSERT(m.hit);
  ASSERT_EQ(m.emit_len, 6);
  m = tn_stop_scan("a\n\nb END", 8, stops, 2);
  ASSERT(m.hit);
  ASSERT_EQ(m.emit_len, 1);
  m = tn_stop_scan("plain", 5, stops, 2);
  ASSERT(!m.hit);
  ASSERT_EQ(m.emit_len, 5);
}

/* ---- speculative verification keeps the target distribution */

#define RV 6 /* vocabulary of the rejection-sampling tests */

static uint64_t test_rng(uint64_t *x) { /* splitmix64 */
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double test_uniform(uint64_t *x) {
  return (double)(test_rng(x) >> 11) * (1.0 / 9007199254740992.0);
}

static double tv_distance(const double *a, const double *b, int n) {
  double d = 0.0;
  for (int i = 0; i < n; i++) d += fabs(a[i] - b[i]);
  return d / 2.0;
}

/* Frequencies of the tokens kept by tn_sampler_verify over n draws, the
 * draft drawn from q each time (q NULL: always `fixed`). */
static void verify_freqs(const struct tn_sampling *sp, const float *logits,
                         const float *q, int32_t fixed, int n,
                         double *freq) {
  struct tn_sampler *s = NULL;
  struct tn_error err = {0};
  if (tn_sampler_new(sp, RV, &s, &err)) return;
  uint64_t x = 77;
  int cnt[RV] = {0};
  for (int it = 0; it < n; it++) {
    int32_t d = fixed;
    if (q) {
      double u = test_uniform(&x), acc = 0.0;
      d = RV - 1;
      for (int i = 0; i < RV; i++) {
        acc += q[i];
        if (u < acc) {
          d = i;
          break;
        }
      }
    }
    float w[RV];
    memcpy(w, logits, sizeof(w));
    struct tn_sample_out out;
    tn_sampler_verify(s, w, d, q, &out);
    cnt[out.id]++;
  }
  for (int i = 0; i < RV; i++) freq[i] = (double)cnt[i] / n;
  tn_sampler_free(s);
}

/* Over a million draws the kept tokens follow the target's transformed
 * distribution (temperature; then top-k; then top-p and min-p, whose
 * reference is tn_sampler_sample's own frequencies) to a total-variation
 * distance under 0.005, for a point-mass drafter on a likely token, on an
 * unlikely one, on one outside the kept set, and for drafters with full
 * distributions near and far from the target's. */
static void test_rejection_sampling(void) {
  const int n = getenv("TN_TEST_QUICK") ? 200000 : 1000000;
  const float logits[RV] = {2.0f, 1.5f, 0.3f, -0.5f, 1.0f, -2.0f};
  const float q_near[RV] = {0.40f, 0.25f, 0.05f, 0.05f, 0.20f, 0.05f};
  const float q_far[RV] = {0.02f, 0.03f, 0.40f, 0.30f, 0.05f, 0.20f};
  struct tn_sampling sp;
  for (int cfg = 0; cfg < 3; cfg++) {
    tn_sampling_default(&sp);
    sp.temperature = 0.8f;
    sp.seed = 11 + (uint64_t)cfg;
    if (cfg >= 1) sp.top_k = 4;
    if (cfg == 2) {
      sp.top_p = 0.85f;
      sp.min_p = 0.1f;
    }
    /* the target distribution */
    double p[RV] = {0};
    if (cfg < 2) {
      int keep[RV] = {0};
      for (int i = 0; i < RV; i++) {
        int above = 0;
        for (int j = 0; j < RV; j++) above += logits[j] > logits[i];
        keep[i] = cfg == 0 || above < sp.top_k;
      }
      double z = 0.0;
      for (int i = 0; i < RV; i++)
        if (keep[i]) z += exp(logits[i] / sp.temperature);
      for (int i = 0; i < RV; i++)
        p[i] = keep[i] ? exp(logits[i] / sp.temperature) / z : 0.0;
    } else {
      struct tn_sampler *ref = NULL;
      struct tn_error err = {0};
      ASSERT_EQ(tn_sampler_new(&sp, RV, &ref, &err), TN_OK);
      int cnt[RV] = {0};
      for (int it = 0; it < n; it++) {
        float w[RV];
        memcpy(w, logits, sizeof(w));
        struct tn_sample_out out;
        tn_sampler_sample(ref, w, &out);
        cnt[out.id]++;
      }
      for (int i = 0; i < RV; i++) p[i] = (double)cnt[i] / n;
      tn_sampler_free(ref);
    }
    struct {
      const char *name;
      const float *q;
      int32_t fixed;
    } drafters[] = {{"point mass, likely", NULL, 0},
                    {"point mass, unlikely", NULL, 3},
                    {"point mass, outside the kept set", NULL, 5},
                    {"near distribution", q_near, -1},
                    {"far distribution", q_far, -1}};
    for (size_t k = 0; k < TN_ARRAY_LEN(drafters); k++) {
      double f[RV];
      verify_freqs(&sp, logits, drafters[k].q, drafters[k].fixed, n, f);
      double tv = tv_distance(f, p, RV);
      if (tv >= 0.005) {
        fprintf(stderr, "config %d, %s: tv %.4f\n  kept  ", cfg,
                drafters[k].name, tv);
        for (int i = 0; i < RV; i++) fprintf(stderr, " %.4f", f[i]);
        fprintf(stderr, "\n  target");
        for (int i = 0; i < RV; i++) fprintf(stderr, " %.4f", p[i]);
        fputc('\n', stderr);
      }
      ASSERT(tv < 0.005);
    }
  }
}

/* Greedy verification accepts exactly the argmax and keeps it otherwise;
 * a seeded verifier repeats itself. */
static void test_verify_greedy_and_seeded(void) {
  const float logits[RV] = {0.1f, 3.0f, 0.2f, -1.0f, 2.9f, 0.0f};
  struct tn_sampling sp;
  tn_sampling_default(&sp);
  sp.temperature = 0.0f;
  struct tn_sampler *s = NULL;
  struct tn_error err = {0};
  ASSERT_EQ(tn_sampler_new(&sp, RV, &s, &err), TN_OK);
  float w[RV];
  struct tn_sample_out out;
  memcpy(w, logits, sizeof(w));
  ASSERT(tn_sampler_verify(s, w, 1, NULL, &out));
  ASSERT_EQ(out.id, 1);
  memcpy(w, logits, sizeof(w));
  ASSERT(!tn_sampler_verify(s, w, 4, NULL, &out));
  ASSERT_EQ(out.id, 1);
  tn_sampler_free(s);
  /* seeded: the same decisions twice */
  sp.temperature = 1.0f;
  sp.seed = 99;
  int32_t a[64], b[64];
  for (int rep = 0; rep < 2; rep++) {
    ASSERT_EQ(tn_sampler_new(&sp, RV, &s, &err), TN_OK);
    for (int i = 0; i < 64; i++) {
      memcpy(w, logits, sizeof(w));
      tn_sampler_verify(s, w, i % RV, NULL, &out);
      (rep ? b : a)[i] = out.id;
    }
    tn_sampler_free(s);
  }
  ASSERT_EQ(memcmp(a, b, sizeof(a)), 0);
}

TN_TEST_MAIN(TN_TEST(test_greedy), TN_TEST(test_seed),
             TN_TEST(test_bias_and_check), TN_TEST(test_min_p_top_k_support),
             TN_TEST(test_penalties_and_logprobs), TN_TEST(test_stop_scan),
             TN_TEST(test_rejection_sampling),
             TN_TEST(test_verify_greedy_and_seeded))
