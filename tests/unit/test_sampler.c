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

TN_TEST_MAIN(TN_TEST(test_greedy), TN_TEST(test_seed),
             TN_TEST(test_bias_and_check), TN_TEST(test_min_p_top_k_support),
             TN_TEST(test_penalties_and_logprobs), TN_TEST(test_stop_scan))
