/*
 * test_spec.c: speculative decoding in the engine never changes the
 * output.
 *
 * On the tiny generated model of tiny_engine.h: for each drafter (n-gram
 * lookup; adversarial custom drafters: always wrong, random, and an oracle
 * that knows the plain-decoding output, so every draft must be accepted),
 * draft lengths 1..8, batches of 1..16 requests, with preemption and with
 * prefix reuse, every greedy output equals the same request decoded plainly
 * on a fresh engine, token for token; every recorded step keeps the
 * scheduler's invariants (a draft rides only with a decode, budget and
 * positions hold); acceptance per draft position sums to the accepted
 * total and never rises with position; seeded sampling gives the same
 * text with speculation on and off.
 */
#include "engine/engine_internal.h"
#include "grammar/grammar.h"
#include "tiny_engine.h"

/* ---- adversarial drafters (TN_SPEC_CUSTOM) */

enum drafter_kind { DRAFT_WRONG, DRAFT_RANDOM, DRAFT_ORACLE };

#define MAX_REQS 16

struct drafter {
  enum drafter_kind kind;
  uint64_t rng;
  /* oracle: the plain outputs of the requests, by prompt */
  int n;
  const int32_t *prompt[MAX_REQS];
  int32_t n_prompt[MAX_REQS];
  struct out want[MAX_REQS];
};

static int32_t propose(void *user, const struct tn_req *req, int32_t choice,
                       const int32_t *tokens, int32_t n_tokens,
                       int32_t n_prompt, int32_t k, int32_t *out) {
  struct drafter *d = user;
  (void)req, (void)choice;
  switch (d->kind) {
  case DRAFT_WRONG:
    /* never the model's choice: the model's next token is unknown here,
     * but a token equal to the last one shifted by one is a good bet to
     * differ; the random drafter covers the rest */
    for (int32_t i = 0; i < k; i++)
      out[i] = (tokens[n_tokens - 1] + 1 + i) % N_TEXT_TOKENS;
    return k;
  case DRAFT_RANDOM:
    for (int32_t i = 0; i < k; i++)
      out[i] = (int32_t)(rng_next(&d->rng) % N_VOCAB);
    return (int32_t)(rng_next(&d->rng) % (uint64_t)(k + 1));
  case DRAFT_ORACLE:
    for (int r = 0; r < d->n; r++) {
      if (d->n_prompt[r] != n_prompt ||
          memcmp(d->prompt[r], tokens, (size_t)n_prompt * sizeof(int32_t)))
        continue;
      /* tokens past the prompt are the output so far */
      int32_t at = n_tokens - n_prompt, got = 0;
      while (got < k && at + got < d->want[r].n_ids) {
        out[got] = d->want[r].ids[at + got];
        got++;
      }
      return got;
    }
    return 0;
  }
  return 0;
}

/* ---- one run: requests submitted together to a speculating engine */

struct run {
  struct eng_opts o;
  int n;
  int32_t prompts[MAX_REQS][96];
  int32_t np[MAX_REQS];
  struct tn_gen_params p;
  struct out got[MAX_REQS];
  int32_t drafted[MAX_REQS], accepted[MAX_REQS];
  struct tn_engine_stats stats;
  int trace_bad;
  int32_t busy_draft_steps; /* steps with 2+ decodes that carried drafts */
  bool ok;
};

static void run_spec(struct run *rn) {
  struct rec rc;
  rec_init(&rc);
  rn->o.gate = true;
  struct tn_engine *e = eng_open(&rc, &rn->o);
  rn->ok = e != NULL;
  struct tn_req *r[MAX_REQS] = {0};
  if (e) {
    r[0] = submit(e, &rc, rn->prompts[0], rn->np[0], &rn->p);
    rn->ok = r[0] && rec_wait_parked(&rc);
    for (int i = 1; rn->ok && i < rn->n; i++) {
      r[i] = submit(e, &rc, rn->prompts[i], rn->np[i], &rn->p);
      rn->ok = r[i] != NULL;
    }
    rec_open(&rc);
    rn->ok = rn->ok && wait_done(&rc, r, rn->n) &&
             engine_idle(e, rn->o.no_prefix);
    tn_engine_stats(e, &rn->stats);
    for (int i = 0; i < rn->n; i++) {
      if (!r[i]) continue;
      collect(r[i], 0, &rn->got[i]);
      tn_req_lock(r[i]);
      rn->drafted[i] = r[i]->choices[0].n_drafted;
      rn->accepted[i] = r[i]->choices[0].n_accepted;
      tn_req_unlock(r[i]);
    }
  }
  tn_engine_close(e);
  for (int i = 0; i < rn->n; i++)
    if (r[i]) tn_req_release(r[i]);
  rn->trace_bad = check_trace(&rc, rn->o.step_tokens ? rn->o.step_tokens : 256,
                              rn->o.max_seqs ? rn->o.max_seqs : 16);
  rn->busy_draft_steps = 0;
  for (int32_t s = 0; s < rc.n_steps; s++) {
    int32_t n_dec = 0, n_draft = 0;
    for (int32_t i = 0; i < rc.steps[s].n; i++) {
      n_dec += step_entry(&rc, s, i)->decode;
      n_draft += step_entry(&rc, s, i)->n_draft;
    }
    rn->busy_draft_steps += n_dec >= 2 && n_draft > 0;
  }
  rec_deinit(&rc);
}

/* Prompts that repeat themselves, so that n-gram lookup finds matches
 * (the model then often continues the pattern). */
static void make_repetitive(uint64_t seed, int32_t *out, int32_t n) {
  int32_t unit[12];
  make_prompt(seed, unit, 12);
  for (int32_t i = 0; i < n; i++) out[i] = unit[i % (5 + (int32_t)(seed % 7))];
}

/* Acceptance counted per position: sums to the total, never rises. */
static bool per_pos_ok(const struct tn_engine_stats *st, int32_t k_max) {
  uint64_t sum = 0;
  bool ok = true;
  for (int32_t i = 0; i < TN_SPEC_MAX_TOKENS; i++) {
    sum += st->spec_accepted_pos[i];
    if (i > 0 && st->spec_accepted_pos[i] > st->spec_accepted_pos[i - 1])
      ok = false;
    if (i >= k_max && st->spec_accepted_pos[i]) ok = false;
  }
  if (sum != st->spec_accepted || st->spec_accepted > st->spec_drafted)
    ok = false;
  if (!ok) {
    fprintf(stderr, "acceptance: drafted %" PRIu64 ", accepted %" PRIu64
            ", per position:", st->spec_drafted, st->spec_accepted);
    for (int32_t i = 0; i < TN_SPEC_MAX_TOKENS; i++)
      fprintf(stderr, " %" PRIu64, st->spec_accepted_pos[i]);
    fputc('\n', stderr);
  }
  return ok;
}

/* The requests of rn decoded plainly, each alone on a fresh engine. */
static bool plain_outputs(const struct run *rn, struct out *want) {
  struct tn_gen_params p = rn->p;
  for (int i = 0; i < rn->n; i++)
    if (!run_alone(rn->prompts[i], rn->np[i], &p, &want[i])) return false;
  return true;
}

static int32_t gen_len(void) { return quick() ? 16 : 40; }

/* Every drafter, draft lengths and batch sizes: outputs equal plain
 * decoding. */
static void test_greedy_identity(void) {
  static const int32_t ks[] = {1, 2, 3, 5, 8};
  static const int ns[] = {1, 4, 16};
  const enum tn_spec_method methods[] = {TN_SPEC_NGRAM, TN_SPEC_CUSTOM,
                                         TN_SPEC_CUSTOM, TN_SPEC_CUSTOM};
  const enum drafter_kind kinds[] = {0, DRAFT_WRONG, DRAFT_RANDOM,
                                     DRAFT_ORACLE};
  const char *names[] = {"ngram", "wrong", "random", "oracle"};
  static struct run rn;
  static struct out want[MAX_REQS];
  static struct drafter d;
  for (size_t ni = 0; ni < TN_ARRAY_LEN(ns); ni++) {
    if (quick() && ns[ni] == 16) continue;
    memset(&rn, 0, sizeof(rn));
    rn.n = ns[ni];
    rn.p = greedy(gen_len());
    for (int i = 0; i < rn.n; i++) {
      rn.np[i] = 9 + 5 * i;
      make_repetitive(100 + (uint64_t)i, rn.prompts[i], rn.np[i]);
    }
    ASSERT(plain_outputs(&rn, want));
    for (size_t m = 0; m < TN_ARRAY_LEN(methods); m++)
      for (size_t ki = 0; ki < TN_ARRAY_LEN(ks); ki++) {
        if (quick() && ki % 2) continue;
        memset(&d, 0, sizeof(d));
        d.kind = kinds[m];
        d.rng = 7 + ki;
        d.n = rn.n;
        for (int i = 0; i < rn.n; i++) {
          d.prompt[i] = rn.prompts[i];
          d.n_prompt[i] = rn.np[i];
          d.want[i] = want[i];
        }
        rn.o = (struct eng_opts){.max_seqs = 16, .n_threads = 2};
        rn.o.spec.method = methods[m];
        rn.o.spec.max_tokens = ks[ki];
        /* every proposed token verified: the tiny model's cost model would
         * refuse most (its fixed cost per step is small); the last size
         * keeps the cost model on */
        rn.o.spec.every_draft = ki + 1 < TN_ARRAY_LEN(ks);
        rn.o.spec.propose = propose;
        rn.o.spec.propose_user = &d;
        rn.o.spec.ngram_min = 1; /* the tiny model rarely repeats bigrams */
        rn.o.spec.ngram_max = 3;
        run_spec(&rn);
        char what[96];
        snprintf(what, sizeof(what), "%s, k=%d, %d requests", names[m],
                 ks[ki], rn.n);
        ASSERT(rn.ok);
        ASSERT_EQ(rn.trace_bad, 0);
        for (int i = 0; i < rn.n; i++) {
          if (!out_same(what, &rn.got[i], &want[i])) {
            ASSERT(false);
          }
          ASSERT_LE(rn.accepted[i], rn.drafted[i]);
        }
        ASSERT(per_pos_ok(&rn.stats, ks[ki]));
        if (kinds[m] == DRAFT_ORACLE && methods[m] == TN_SPEC_CUSTOM &&
            rn.o.spec.every_draft) {
          /* the target drafting for itself: everything accepted */
          ASSERT_GT(rn.stats.spec_drafted, 0);
          ASSERT_EQ(rn.stats.spec_accepted, rn.stats.spec_drafted);
        }

        if (rn.o.spec.every_draft) ASSERT_GT(rn.stats.spec_drafted, 0);
      }
  }
}

/* A pool too small for everyone: preemption and recompute with drafts in
 * flight; and prefix reuse between requests sharing a prefix. */
static void run_pressure(bool prefix) {
  static struct run rn;
  static struct out want[MAX_REQS];
  static struct drafter d;
  memset(&rn, 0, sizeof(rn));
  rn.n = 6;
  rn.p = greedy(40); /* long enough to run the pool dry, also when quick */
  for (int i = 0; i < rn.n; i++) {
    rn.np[i] = 40;
    make_repetitive(300 + (uint64_t)(prefix ? i % 2 : i), rn.prompts[i],
                    rn.np[i]);
    rn.prompts[i][39] = i; /* same first blocks, different last token */
  }
  ASSERT(plain_outputs(&rn, want));
  const enum drafter_kind kinds[] = {DRAFT_ORACLE, DRAFT_RANDOM};
  for (int m = 0; m < 3; m++) {
    memset(&d, 0, sizeof(d));
    d.kind = m < 2 ? kinds[m] : DRAFT_WRONG;
    d.rng = 99;
    d.n = rn.n;
    for (int i = 0; i < rn.n; i++) {
      d.prompt[i] = rn.prompts[i];
      d.n_prompt[i] = rn.np[i];
      d.want[i] = want[i];
    }
    rn.o = (struct eng_opts){.max_seqs = 6, .step_tokens = 64,
                             .kv_blocks = 14, .no_prefix = !prefix};
    rn.o.spec.method = m == 2 ? TN_SPEC_NGRAM : TN_SPEC_CUSTOM;
    rn.o.spec.max_tokens = 6;
    rn.o.spec.every_draft = true;
    rn.o.spec.propose = propose;
    rn.o.spec.propose_user = &d;
    run_spec(&rn);
    ASSERT(rn.ok);
    ASSERT_EQ(rn.trace_bad, 0);
    ASSERT_GT(rn.stats.preemptions, 0);
    ASSERT_GT(rn.stats.spec_drafted, 0);
    if (prefix) ASSERT_GT(rn.stats.prefix_hits, 0);
    for (int i = 0; i < rn.n; i++)
      ASSERT(out_same(prefix ? "speculation, prefix reuse, preemption"
                             : "speculation under preemption",
                      &rn.got[i], &want[i]));
    ASSERT(per_pos_ok(&rn.stats, 6));
  }
}

static void test_preemption(void) { run_pressure(false); }
static void test_prefix_reuse(void) { run_pressure(true); }

/* Sampling: the same seed gives the same text with speculation (the
 * distribution itself is test_sampler's); the per-request switch turns
 * speculation off. */
static void test_sampling_and_switch(void) {
  static struct run a, b, c;
  static struct drafter d;
  memset(&d, 0, sizeof(d));
  d.kind = DRAFT_RANDOM;
  struct run *rs[3] = {&a, &b, &c};
  for (int j = 0; j < 3; j++) {
    struct run *rn = rs[j];
    memset(rn, 0, sizeof(*rn));
    rn->n = 3;
    rn->p = greedy(gen_len());
    rn->p.sampling.temperature = 0.9f;
    rn->p.sampling.seed = 1234;
    rn->p.speculative = j != 2;
    for (int i = 0; i < rn->n; i++) {
      rn->np[i] = 20;
      make_repetitive(500 + (uint64_t)i, rn->prompts[i], 20);
    }
    d.rng = 5; /* the same drafts both times */
    rn->o = (struct eng_opts){.max_seqs = 4};
    rn->o.spec.method = TN_SPEC_CUSTOM;
    rn->o.spec.max_tokens = 4;
    rn->o.spec.every_draft = true;
    rn->o.spec.propose = propose;
    rn->o.spec.propose_user = &d;
    run_spec(rn);
    ASSERT(rn->ok);
    ASSERT_EQ(rn->trace_bad, 0);
  }
  /* Each generated token draws from its own seeded stream, and a draft
   * from a deterministic drafter is checked against the very token plain
   * sampling draws: sampled output is that of plain decoding too. */
  for (int i = 0; i < a.n; i++) {
    ASSERT(out_same("seeded sampling with speculation, twice", &a.got[i],
                    &b.got[i]));
    ASSERT(out_same("seeded sampling, speculation on vs off", &a.got[i],
                    &c.got[i]));
  }
  ASSERT_GT(a.stats.spec_drafted, 0);
  ASSERT_EQ(c.stats.spec_drafted, 0); /* "speculative": false */
  for (int i = 0; i < c.n; i++) ASSERT_EQ(c.drafted[i], 0);
}

/* Drafts that run past the end: a stop string, an end-of-text token the
 * model is pushed towards (not ignored; before and after min_tokens),
 * several choices; the oracle keeps drafting what plain decoding would
 * have said next, so accepted drafts cross the stop. Output, text and
 * finish reasons equal plain decoding. */
static void test_endings(void) {
  static struct run rn;
  static struct out want[MAX_REQS];
  static struct drafter d;
  struct tn_logit_bias eos_bias = {TOK_IM_END, 6.0f};
  for (int v = 0; v < 4; v++) {
    memset(&rn, 0, sizeof(rn));
    rn.n = 3;
    rn.p = greedy(gen_len());
    rn.p.logprobs = true;
    if (v > 0) { /* EOS reachable */
      rn.p.ignore_eos = false;
      rn.p.sampling.bias = &eos_bias;
      rn.p.sampling.n_bias = 1;
      rn.p.min_tokens = v == 2 ? 6 : 0;
      if (v == 3) { /* sampled, seeded */
        rn.p.sampling.temperature = 0.8f;
        rn.p.sampling.seed = 21;
      }
    }
    for (int i = 0; i < rn.n; i++) {
      rn.np[i] = 12 + i;
      make_repetitive(600 + (uint64_t)i, rn.prompts[i], rn.np[i]);
    }
    char stop[8] = "";
    const char *stops[1] = {stop};
    if (v == 0) {
      /* two characters from the middle of the first plain answer */
      ASSERT(plain_outputs(&rn, want));
      ASSERT_GT(want[0].len, 8);
      memcpy(stop, want[0].text + want[0].len / 2, 2);
      rn.p.stops = stops;
      rn.p.n_stops = 1;
    }
    ASSERT(plain_outputs(&rn, want));
    memset(&d, 0, sizeof(d));
    d.kind = DRAFT_ORACLE;
    d.n = rn.n;
    for (int i = 0; i < rn.n; i++) {
      d.prompt[i] = rn.prompts[i];
      d.n_prompt[i] = rn.np[i];
      d.want[i] = want[i];
    }
    rn.o = (struct eng_opts){.max_seqs = 8};
    rn.o.spec.method = TN_SPEC_CUSTOM;
    rn.o.spec.max_tokens = 8;
    rn.o.spec.every_draft = true;
    rn.o.spec.propose = propose;
    rn.o.spec.propose_user = &d;
    run_spec(&rn);
    ASSERT(rn.ok);
    ASSERT_EQ(rn.trace_bad, 0);
    ASSERT_GT(rn.stats.spec_drafted, 0);
    for (int i = 0; i < rn.n; i++)
      ASSERT(out_same("drafts past a stop or EOS", &rn.got[i], &want[i]));
  }
}

/* The n-gram drafter on its own. */
static void test_ngram_lookup(void) {
  int32_t out[8];
  const int32_t t1[] = {1, 2, 3, 4, 5, 9, 9, 1, 2, 3};
  /* "1 2 3" occurred at 0: continue with 4 5 9 */
  ASSERT_EQ(tn_spec_ngram(t1, 10, 2, 4, 3, out), 3);
  ASSERT_EQ(out[0], 4);
  ASSERT_EQ(out[1], 5);
  ASSERT_EQ(out[2], 9);
  /* the latest earlier occurrence wins */
  const int32_t t2[] = {7, 8, 1, 7, 8, 2, 5, 7, 8};
  ASSERT_EQ(tn_spec_ngram(t2, 9, 2, 2, 2, out), 2);
  ASSERT_EQ(out[0], 2);
  ASSERT_EQ(out[1], 5);
  /* no match, too short, k = 0 */
  const int32_t t3[] = {1, 2, 3, 4};
  ASSERT_EQ(tn_spec_ngram(t3, 4, 2, 4, 4, out), 0);
  ASSERT_EQ(tn_spec_ngram(t3, 1, 1, 1, 4, out), 0);
  ASSERT_EQ(tn_spec_ngram(t1, 10, 2, 4, 0, out), 0);
  /* a repeating pattern is drafted on past the end of the sequence */
  const int32_t t4[] = {5, 6, 5, 6, 5};
  ASSERT_EQ(tn_spec_ngram(t4, 5, 2, 2, 4, out), 4);
  ASSERT_EQ(out[0], 6);
  ASSERT_EQ(out[1], 5);
  ASSERT_EQ(out[2], 6);
  ASSERT_EQ(out[3], 5);
}

/* A verification loop over a known answer: each step drafts up to k
 * tokens, keeps the longest prefix that matches the answer and the
 * answer's next token after it (what greedy verification does). Returns
 * the steps taken; *sub_seen is set when a draft held the replacement
 * right after `after` (the token before the draft counts). */
#define SIM_MAX 128
static int sim_steps(bool edit, const int32_t *prompt, int32_t n_prompt,
                     const int32_t *answer, int32_t n_answer, int32_t k,
                     const int32_t *repl, int32_t n_repl, int32_t after,
                     bool *sub_seen) {
  int32_t seq[SIM_MAX], out[16];
  memcpy(seq, prompt, (size_t)n_prompt * sizeof(int32_t));
  int32_t n = n_prompt, done = 0, steps = 0;
  struct tn_ngram_edit st;
  tn_spec_ngram_edit_init(&st);
  *sub_seen = false;
  while (done < n_answer) {
    int32_t got = edit ? tn_spec_ngram_edit(&st, seq, n, 2, 4, k, out)
                       : tn_spec_ngram(seq, n, 2, 4, k, out);
    for (int32_t i = -1; i + 1 + n_repl <= got; i++)
      if ((i < 0 ? seq[n - 1] : out[i]) == after &&
          memcmp(out + i + 1, repl, (size_t)n_repl * sizeof(int32_t)) == 0)
        *sub_seen = true;
    int32_t a = 0;
    while (a < got && done + a < n_answer && out[a] == answer[done + a]) a++;
    int32_t take = TN_MIN(a + 1, n_answer - done);
    memcpy(seq + n, answer + done, (size_t)take * sizeof(int32_t));
    n += take;
    done += take;
    steps++;
  }
  return steps;
}

/* The n-gram drafter learns a rename: once the answer has shown that
 * source tokens 1 2 became 20 21 22, later copies draft the new name. */
static void test_ngram_learns_rename(void) {
  const int32_t src[] = {100, 1, 2, 101, 102, 103, 104, 1, 2, 105, 106,
                         107, 108, 109, 1, 2, 110, 111, 112, 113, 1, 2,
                         114, 115, 116};
  const int32_t n_src = (int32_t)(sizeof src / sizeof src[0]);
  int32_t prompt[64], answer[64], n_answer = 0;
  memcpy(prompt, src, sizeof src);
  prompt[n_src] = 999; /* the turn's end: the answer starts after it */
  for (int32_t i = 0; i < n_src; i++) {
    if (src[i] == 1 && src[i + 1] == 2) {
      answer[n_answer++] = 20;
      answer[n_answer++] = 21;
      answer[n_answer++] = 22;
      i++;
    } else {
      answer[n_answer++] = src[i];
    }
  }
  const int32_t repl[] = {20, 21, 22};
  bool seen_plain, seen_edit;
  int plain = sim_steps(false, prompt, n_src + 1, answer, n_answer, 8, repl,
                        3, 109, &seen_plain);
  int edit = sim_steps(true, prompt, n_src + 1, answer, n_answer, 8, repl, 3,
                       109, &seen_edit);
  ASSERT(!seen_plain);
  ASSERT(seen_edit); /* a later occurrence is drafted renamed */
  ASSERT_LT(edit, plain);
  /* with nothing to learn (the answer copies the prompt) both draft alike */
  memcpy(answer, src, sizeof src);
  plain = sim_steps(false, prompt, n_src + 1, answer, n_src, 8, repl, 3, 109,
                    &seen_plain);
  edit = sim_steps(true, prompt, n_src + 1, answer, n_src, 8, repl, 3, 109,
                   &seen_edit);
  ASSERT_EQ(edit, plain);
  /* k = 0 drafts nothing, and a state fed anything stays in bounds */
  struct tn_ngram_edit st;
  tn_spec_ngram_edit_init(&st);
  int32_t out[16];
  ASSERT_EQ(tn_spec_ngram_edit(&st, prompt, n_src + 1, 2, 4, 0, out), 0);
  uint64_t x = 7;
  int32_t noise[SIM_MAX];
  for (int32_t n = 0; n < SIM_MAX; n++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    noise[n] = (int32_t)(x >> 61); /* 8 symbols: many repeats */
    int32_t got = tn_spec_ngram_edit(&st, noise, n + 1, 2, 4, 16, out);
    ASSERT(got >= 0 && got <= 16);
    for (int32_t i = 0; i < got; i++) ASSERT(out[i] >= 0 && out[i] < 8);
  }
}

/* Drafts that go on with a copy the model has followed for a while are
 * their own acceptance class (tn_spec_ngram_edit_follows), also when the
 * scheduler verified only the first tokens of each proposal; a fresh
 * lookup, and the draft after the answer leaves the copy, are not. */
static void test_ngram_follow_class(void) {
  int32_t seq[64], out[16];
  int32_t n = 0;
  for (int32_t i = 0; i < 30; i++) seq[n++] = 100 + i; /* the source */
  seq[n++] = 999;
  seq[n++] = 100; /* the answer starts copying it */
  seq[n++] = 101;
  struct tn_ngram_edit st;
  tn_spec_ngram_edit_init(&st);
  ASSERT_EQ(tn_spec_ngram_edit(&st, seq, n, 2, 4, 8, out), 8);
  ASSERT_EQ(out[0], 102);
  ASSERT(!tn_spec_ngram_edit_follows(&st)); /* a fresh lookup */
  bool followed = false;
  for (int32_t step = 0; step < 6; step++) {
    /* two of the proposal verified and accepted, plus the model's next
     * token, which goes on with the copy */
    for (int32_t j = 0; j < 3; j++) seq[n++] = out[0] + j;
    ASSERT_EQ(tn_spec_ngram_edit(&st, seq, n, 2, 4, 8, out), 8);
    ASSERT_EQ(out[0], seq[n - 1] + 1); /* it follows the copy */
    followed = followed || tn_spec_ngram_edit_follows(&st);
  }
  ASSERT(followed);
  ASSERT(tn_spec_ngram_edit_follows(&st));
  /* the model leaves the copy: the next draft is a fresh lookup again */
  seq[n++] = 555;
  seq[n++] = 556;
  tn_spec_ngram_edit(&st, seq, n, 2, 4, 8, out);
  ASSERT(!tn_spec_ngram_edit_follows(&st));
}

/* Bad configurations are refused at open with a clear message. */
static void test_bad_config(void) {
  const char *path = model_path();
  ASSERT(path != NULL);
  struct tn_engine_config cfg;
  struct tn_engine *e = NULL;
  struct tn_error err = {0};
  tn_engine_config_default(&cfg);
  cfg.spec.method = TN_SPEC_NGRAM;
  cfg.spec.max_tokens = 0;
  ASSERT_EQ(tn_engine_open(path, &cfg, NULL, &e, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "spec-max-tokens");
  cfg.spec.max_tokens = 1000;
  ASSERT_EQ(tn_engine_open(path, &cfg, NULL, &e, &err), TN_EINVAL);
  cfg.spec.max_tokens = 4;
  cfg.spec.method = TN_SPEC_CUSTOM; /* without a propose callback */
  ASSERT_EQ(tn_engine_open(path, &cfg, NULL, &e, &err), TN_EINVAL);
  cfg.spec.method = TN_SPEC_NGRAM;
  cfg.spec.ngram_min = 3;
  cfg.spec.ngram_max = 2;
  ASSERT_EQ(tn_engine_open(path, &cfg, NULL, &e, &err), TN_EINVAL);
  tn_engine_config_default(&cfg);
  cfg.decode_slowdown = 0.5f; /* 0 (off) or at least 1 */
  ASSERT_EQ(tn_engine_open(path, &cfg, NULL, &e, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "decode-slowdown");
  ASSERT(e == NULL);
}

/* ---- a draft model (TN_SPEC_DRAFT) */

static char g_draft_other[64], g_draft_vocab[64];

static void drafts_unlink(void) {
  if (g_draft_other[0]) unlink(g_draft_other);
  if (g_draft_vocab[0]) unlink(g_draft_vocab);
}

/* Another tiny model with the same vocabulary (other weights: a real,
 * imperfect drafter) and one with another vocabulary. */
static bool drafts_write(void) {
  if (g_draft_other[0]) return true;
  atexit(drafts_unlink);
  return tiny_model_write(0x5eed0f, false, g_draft_other,
                          sizeof(g_draft_other)) &&
         tiny_model_write(0x5eed0f, true, g_draft_vocab,
                          sizeof(g_draft_vocab));
}

/* The draft model is the target itself (every draft accepted) or another
 * model (some rejected), for draft lengths 1..8 and batches of 1..16, and
 * under preemption: the output is plain decoding's. */
static void test_draft_model(void) {
  ASSERT(model_path() && drafts_write());
  static const int32_t ks[] = {1, 3, 8};
  static const int ns[] = {1, 5, 16};
  static struct run rn;
  static struct out want[MAX_REQS];
  for (size_t ni = 0; ni < TN_ARRAY_LEN(ns); ni++) {
    if (quick() && ns[ni] == 16) continue;
    memset(&rn, 0, sizeof(rn));
    rn.n = ns[ni];
    rn.p = greedy(gen_len());
    for (int i = 0; i < rn.n; i++) {
      rn.np[i] = 7 + 11 * i % 60;
      make_prompt(500 + (uint64_t)i, rn.prompts[i], rn.np[i]);
    }
    ASSERT(plain_outputs(&rn, want));
    for (int self = 0; self < 2; self++)
      for (size_t ki = 0; ki < TN_ARRAY_LEN(ks); ki++) {
        rn.o = (struct eng_opts){.max_seqs = 16, .n_threads = 2};
        rn.o.spec.method = TN_SPEC_DRAFT;
        rn.o.spec.draft_model = self ? model_path() : g_draft_other;
        rn.o.spec.max_tokens = ks[ki];
        rn.o.spec.every_draft = true;
        rn.o.spec.draft_p_min = ki == 1 ? 0.2f : 0.0f;
        run_spec(&rn);
        char what[96];
        snprintf(what, sizeof(what), "draft model (%s), k=%d, %d requests",
                 self ? "the target" : "another", ks[ki], rn.n);
        ASSERT(rn.ok);
        ASSERT_EQ(rn.trace_bad, 0);
        for (int i = 0; i < rn.n; i++) {
          ASSERT(out_same(what, &rn.got[i], &want[i]));
          ASSERT_LE(rn.accepted[i], rn.drafted[i]);
        }
        ASSERT(per_pos_ok(&rn.stats, ks[ki]));
        ASSERT_GT(rn.stats.spec_drafted, 0);
        if (self) /* the target drafting for itself */
          ASSERT_EQ(rn.stats.spec_accepted, rn.stats.spec_drafted);
        else if (ki == 2)
          ASSERT_LT(rn.stats.spec_accepted, rn.stats.spec_drafted);
      }
  }
  /* the cost model's choice: a draft as costly as its target (itself)
   * never pays, so it is declined, and the answer is the same */
  memset(&rn, 0, sizeof(rn));
  rn.n = 1;
  rn.p = greedy(gen_len());
  rn.np[0] = 20;
  make_prompt(600, rn.prompts[0], rn.np[0]);
  ASSERT(plain_outputs(&rn, want));
  rn.o = (struct eng_opts){.max_seqs = 4, .n_threads = 2};
  rn.o.spec.method = TN_SPEC_DRAFT;
  rn.o.spec.draft_model = model_path();
  rn.o.spec.max_tokens = 4;
  run_spec(&rn);
  ASSERT(rn.ok);
  ASSERT(out_same("draft model, cost policy", &rn.got[0], &want[0]));
  ASSERT_GT(rn.stats.spec_declined, 0);

  /* a pool too small for everyone: preemption drops draft caches too */
  memset(&rn, 0, sizeof(rn));
  rn.n = 6;
  rn.p = greedy(40);
  for (int i = 0; i < rn.n; i++) {
    rn.np[i] = 40;
    make_prompt(700 + (uint64_t)i, rn.prompts[i], rn.np[i]);
  }
  ASSERT(plain_outputs(&rn, want));
  rn.o = (struct eng_opts){.max_seqs = 6, .step_tokens = 64, .kv_blocks = 14};
  rn.o.spec.method = TN_SPEC_DRAFT;
  rn.o.spec.draft_model = g_draft_other;
  rn.o.spec.max_tokens = 6;
  rn.o.spec.every_draft = true;
  run_spec(&rn);
  ASSERT(rn.ok);
  ASSERT_EQ(rn.trace_bad, 0);
  ASSERT_GT(rn.stats.preemptions, 0);
  ASSERT_GT(rn.stats.spec_drafted, 0);
  for (int i = 0; i < rn.n; i++)
    ASSERT(out_same("draft model under preemption", &rn.got[i], &want[i]));
}

/* A draft model must share the target's vocabulary; one is required. */
static void test_draft_model_refused(void) {
  ASSERT(model_path() && drafts_write());
  struct tn_engine_config cfg;
  struct tn_engine *e = NULL;
  struct tn_error err = {0};
  tn_engine_config_default(&cfg);
  cfg.spec.method = TN_SPEC_DRAFT;
  ASSERT_EQ(tn_engine_open(model_path(), &cfg, NULL, &e, &err), TN_EINVAL);
  cfg.spec.draft_model = g_draft_vocab;
  ASSERT_EQ(tn_engine_open(model_path(), &cfg, NULL, &e, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "vocabulary");
  ASSERT_SUBSTR(err.msg, "token 260");
  cfg.spec.draft_model = "/nonexistent/draft.gguf";
  ASSERT(tn_engine_open(model_path(), &cfg, NULL, &e, &err) != TN_OK);
  ASSERT_SUBSTR(err.msg, "/nonexistent/draft.gguf");
  cfg.spec.draft_model = g_draft_other;
  cfg.spec.draft_p_min = 2.0f;
  ASSERT_EQ(tn_engine_open(model_path(), &cfg, NULL, &e, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "draft-p-min");
  ASSERT(e == NULL);
}

/* ---- the adaptive switch (tn_spec_switch) */

/* Runs the switch over n steps whose scores are on/off (plus noise of
 * +-noise); returns the share of steps that speculated; *flips counts
 * changes of state. */
static double switch_run(struct tn_spec_switch *w, int n, double on,
                         double off, double noise, int *flips) {
  uint64_t rng = 12345;
  int spec = 0;
  for (int i = 0; i < n; i++) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    double u = (double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
    bool sp = tn_spec_switch_on(w);
    spec += sp;
    if (tn_spec_switch_observe(w, (sp ? on : off) * (1.0 + noise * u)))
      (*flips)++;
  }
  return (double)spec / n;
}

/* Speculation that costs goes off and stays off, probing rarely (the
 * workload loses under 3%); when it pays again it comes back; noise
 * within the hysteresis band does not make it flap. */
static void test_spec_switch(void) {
  struct tn_spec_switch w;
  tn_spec_switch_init(&w);
  int flips = 0;
  /* 20% slower with speculation: off within a few windows */
  double share = switch_run(&w, 400, 0.8, 1.0, 0.0, &flips);
  ASSERT_EQ(flips, 1);
  ASSERT(w.off);
  ASSERT_EQ(w.n_off, 1);
  ASSERT(share < 0.5);
  /* over a long run the probes cost under 3% of the steps */
  share = switch_run(&w, 50000, 0.8, 1.0, 0.0, &flips);
  ASSERT_EQ(flips, 1);
  ASSERT(share * 0.2 < 0.03);
  /* it pays again (1.4x): back on at the next probe or so */
  share = switch_run(&w, 50000, 1.4, 1.0, 0.0, &flips);
  ASSERT_EQ(flips, 2);
  ASSERT(!w.off);
  ASSERT(share > 0.95);
  /* within the band (1% apart, 2% noise): no flapping */
  tn_spec_switch_init(&w);
  flips = 0;
  switch_run(&w, 50000, 0.99, 1.0, 0.02, &flips);
  ASSERT_LE(flips, 1);
  /* nonsense scores are ignored */
  tn_spec_switch_init(&w);
  ASSERT_EQ(tn_spec_switch_observe(&w, -1.0), 0);
  ASSERT_EQ(tn_spec_switch_observe(&w, 0.0 / 0.0), 0);
  ASSERT_EQ(w.steps, 0);
}

/* ---- the target drafting with its own layers (TN_SPEC_SELF) */

/* All layers (every draft accepted: the drafts' writes into the target's
 * cache are exactly what verification then writes) or one of the two
 * (some rejected), draft lengths 1..8, batches of 1..16, the cost policy
 * too; then under preemption with prefix reuse: plain decoding's output. */
static void test_self_draft(void) {
  ASSERT(model_path());
  static const int32_t ks[] = {1, 3, 8};
  static const int ns[] = {1, 5, 16};
  static const char *const layers[] = {"0-1", "0", "1"};
  static struct run rn;
  static struct out want[MAX_REQS];
  for (size_t ni = 0; ni < TN_ARRAY_LEN(ns); ni++) {
    if (quick() && ns[ni] == 16) continue;
    memset(&rn, 0, sizeof(rn));
    rn.n = ns[ni];
    rn.p = greedy(gen_len());
    for (int i = 0; i < rn.n; i++) {
      rn.np[i] = 7 + 11 * i % 60;
      make_prompt(800 + (uint64_t)i, rn.prompts[i], rn.np[i]);
    }
    ASSERT(plain_outputs(&rn, want));
    for (size_t li = 0; li < TN_ARRAY_LEN(layers); li++)
      for (size_t ki = 0; ki < TN_ARRAY_LEN(ks); ki++) {
        rn.o = (struct eng_opts){.max_seqs = 16, .n_threads = 2};
        rn.o.spec.method = TN_SPEC_SELF;
        rn.o.spec.layers = layers[li];
        rn.o.spec.max_tokens = ks[ki];
        rn.o.spec.every_draft = !(li == 1 && ki == 2);
        run_spec(&rn);
        char what[96];
        snprintf(what, sizeof(what), "self, layers %s, k=%d, %d requests",
                 layers[li], ks[ki], rn.n);
        ASSERT(rn.ok);
        ASSERT_EQ(rn.trace_bad, 0);
        for (int i = 0; i < rn.n; i++) {
          ASSERT(out_same(what, &rn.got[i], &want[i]));
          ASSERT_LE(rn.accepted[i], rn.drafted[i]);
        }
        ASSERT(per_pos_ok(&rn.stats, ks[ki]));
        if (!rn.o.spec.every_draft) continue;
        ASSERT_GT(rn.stats.spec_drafted, 0);
        if (li == 0) ASSERT_EQ(rn.stats.spec_accepted, rn.stats.spec_drafted);
      }
  }
  /* preemption and prefix reuse with drafts written into shared pools */
  memset(&rn, 0, sizeof(rn));
  rn.n = 6;
  rn.p = greedy(40);
  for (int i = 0; i < rn.n; i++) {
    rn.np[i] = 40;
    make_repetitive(900 + (uint64_t)(i % 2), rn.prompts[i], rn.np[i]);
    rn.prompts[i][39] = i;
  }
  ASSERT(plain_outputs(&rn, want));
  for (size_t li = 0; li < 2; li++) {
    rn.o = (struct eng_opts){.max_seqs = 6, .step_tokens = 64,
                             .kv_blocks = 14};
    rn.o.spec.method = TN_SPEC_SELF;
    rn.o.spec.layers = layers[li];
    rn.o.spec.max_tokens = 6;
    rn.o.spec.every_draft = true;
    run_spec(&rn);
    ASSERT(rn.ok);
    ASSERT_EQ(rn.trace_bad, 0);
    ASSERT_GT(rn.stats.preemptions, 0);
    ASSERT_GT(rn.stats.prefix_hits, 0);
    ASSERT_GT(rn.stats.spec_drafted, 0);
    if (li == 0) ASSERT_EQ(rn.stats.spec_accepted, rn.stats.spec_drafted);
    for (int i = 0; i < rn.n; i++)
      ASSERT(out_same("self-drafting, prefix reuse, preemption", &rn.got[i],
                      &want[i]));
  }
}

/* Layer lists: ids and ranges, rising, within the model; refused with the
 * part that is wrong. */
static void test_self_draft_layers(void) {
  int32_t out[8], n = 0;
  struct tn_error err = {0};
  char buf[64];
  ASSERT_EQ(tn_spec_parse_layers("0-2,4,6-7", 8, out, &n, &err), TN_OK);
  ASSERT_EQ(n, 6);
  ASSERT_EQ(out[3], 4);
  ASSERT_EQ(out[5], 7);
  tn_spec_format_layers(out, n, buf, sizeof buf);
  ASSERT_STR_EQ(buf, "0-2,4,6-7");
  static const char *const bad[] = {"", "8", "-1", "2,1", "0-2,2", "3-1",
                                    "0,,1", "a", "0 1", "1-", "0-99"};
  for (size_t i = 0; i < TN_ARRAY_LEN(bad); i++) {
    ASSERT_EQ(tn_spec_parse_layers(bad[i], 8, out, &n, &err), TN_EINVAL);
    ASSERT_SUBSTR(err.msg, "--spec-layers");
  }
  ASSERT_EQ(tn_spec_default_layers(8, out), 5); /* 0-3 and 7 */
  ASSERT_EQ(out[4], 7);
  ASSERT(model_path());
  struct tn_engine_config cfg;
  struct tn_engine *e = NULL;
  tn_engine_config_default(&cfg);
  cfg.spec.method = TN_SPEC_SELF;
  cfg.spec.layers = "0-5";
  ASSERT_EQ(tn_engine_open(model_path(), &cfg, NULL, &e, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "0-5");
  ASSERT(e == NULL);
}

/* ---- constrained output: masks and speculation together */

static struct tn_grammar *tiny_grammar(const char *text) {
  struct tn_grammar *g = NULL;
  struct tn_error err = {0};
  if (tn_grammar_from_gbnf(text, strlen(text), &g, &err) != TN_OK)
    fprintf(stderr, "grammar: %s\n", err.msg);
  return g;
}

/* Whether text (bytes) is a prefix of a sentence of g. */
static bool grammar_prefix(struct tn_grammar *g, const char *text,
                           size_t n) {
  struct tn_grammar_matcher *m = NULL;
  struct tn_error err = {0};
  if (tn_grammar_matcher_new(g, NULL, &m, &err) != TN_OK) return false;
  bool ok = tn_grammar_matcher_accept_bytes(m, text, n);
  tn_grammar_matcher_free(m);
  return ok;
}

/* Under a grammar every drafter still gives plain decoding's output (the
 * drafts are verified against the masked logits), and that output follows
 * the grammar. */
static void test_grammar_identity(void) {
  struct tn_grammar *g =
      tiny_grammar("root ::= ( \"the\" | [a-m] | \" \" [a-e] )+");
  ASSERT(g);
  static struct run rn;
  static struct out want[MAX_REQS];
  static struct drafter d;
  const enum drafter_kind kinds[] = {DRAFT_WRONG, DRAFT_RANDOM, DRAFT_ORACLE};
  memset(&rn, 0, sizeof(rn));
  rn.n = quick() ? 3 : 6;
  rn.p = greedy(gen_len());
  rn.p.grammar = g;
  for (int i = 0; i < rn.n; i++) {
    rn.np[i] = 9 + 5 * i;
    make_repetitive(300 + (uint64_t)i, rn.prompts[i], rn.np[i]);
  }
  ASSERT(plain_outputs(&rn, want));
  for (int i = 0; i < rn.n; i++) {
    ASSERT_EQ(want[i].n_gen, gen_len());
    ASSERT(grammar_prefix(g, want[i].text, want[i].len));
  }
  for (size_t m = 0; m < TN_ARRAY_LEN(kinds); m++) {
    memset(&d, 0, sizeof(d));
    d.kind = kinds[m];
    d.rng = 11 + m;
    d.n = rn.n;
    for (int i = 0; i < rn.n; i++) {
      d.prompt[i] = rn.prompts[i];
      d.n_prompt[i] = rn.np[i];
      d.want[i] = want[i];
    }
    rn.o = (struct eng_opts){.max_seqs = 16, .n_threads = 2};
    rn.o.spec.method = TN_SPEC_CUSTOM;
    rn.o.spec.max_tokens = 4;
    rn.o.spec.every_draft = true;
    rn.o.spec.propose = propose;
    rn.o.spec.propose_user = &d;
    run_spec(&rn);
    ASSERT(rn.ok);
    ASSERT_EQ(rn.trace_bad, 0);
    for (int i = 0; i < rn.n; i++)
      ASSERT(out_same("grammar + drafts", &rn.got[i], &want[i]));
    if (kinds[m] == DRAFT_ORACLE)
      ASSERT_EQ(rn.stats.spec_accepted, rn.stats.spec_drafted);
    ASSERT_GT(rn.stats.grammar_masks, 0);
  }
  tn_grammar_release(g);
}

/* Early exit: once one choice is left its rest is appended without
 * forward passes; the text equals token-by-token decoding's (logprobs on
 * turns the fill off), and the engine counts the forced tokens. */
static void test_grammar_early_exit(void) {
  struct tn_grammar *g = tiny_grammar(
      "root ::= \"abcdefghijklmnop\" | \"bcdefghijklmnopq\" | "
      "\"cdefghijklmnopqr\" | \"hello world\"");
  ASSERT(g);
  for (int i = 0; i < 4; i++) {
    int32_t prompt[12];
    make_prompt(500 + (uint64_t)i, prompt, 12);
    struct tn_gen_params p = greedy(64);
    p.grammar = g;
    p.ignore_eos = false;
    struct out slow, fast;
    ASSERT(run_alone(prompt, 12, &p, &slow));
    p.logprobs = false;
    struct tn_engine_stats st;
    ASSERT(run_alone_stats(prompt, 12, &p, &fast, &st));
    ASSERT_EQ(slow.finish, TN_FINISH_STOP);
    ASSERT_EQ(fast.finish, TN_FINISH_STOP);
    ASSERT_EQ(fast.len, slow.len);
    ASSERT(memcmp(fast.text, slow.text, fast.len) == 0);
    ASSERT_GT(st.grammar_forced, 0);
    /* the plain path decoded every token and then its end */
    ASSERT_LT(st.steps, (uint64_t)slow.n_gen + 1);
  }
  tn_grammar_release(g);
}

/* Without speculation configured, the text a grammar forces is drafted
 * and verified: the same output as with drafting off, in fewer steps. */
static void test_grammar_forced_drafts(void) {
  struct tn_grammar *g =
      tiny_grammar("root ::= ( \"the quick brown fox \" [a-e] \" \" )+");
  ASSERT(g);
  for (int i = 0; i < 3; i++) {
    int32_t prompt[12];
    make_prompt(700 + (uint64_t)i, prompt, 12);
    struct tn_gen_params p = greedy(gen_len());
    p.grammar = g;
    p.speculative = false;
    struct out plain, drafted;
    ASSERT(run_alone(prompt, 12, &p, &plain));
    p.speculative = true;
    struct tn_engine_stats st;
    ASSERT(run_alone_stats(prompt, 12, &p, &drafted, &st));
    ASSERT(out_same("forced drafts", &drafted, &plain));
    ASSERT_GT(st.spec_accepted, 0);
    ASSERT_LT(st.steps, (uint64_t)plain.n_gen);
  }
  tn_grammar_release(g);
}

/* Next to other streams, drafts stay within the step's slowdown room: at
 * decode_slowdown 1 (no room) a step with two or more decodes carries no
 * drafts. The drafts here are a grammar's forced text (speculation off),
 * which the engine takes whenever it may, so without the cap the same
 * requests do draft in such steps. Output is the same either way. */
static void test_drafts_within_room(void) {
  static struct run rn;
  static struct out want[4];
  struct tn_grammar *g =
      tiny_grammar("root ::= ( \"the quick brown fox \" [a-e] \" \" )+");
  ASSERT(g);
  memset(&rn, 0, sizeof(rn));
  rn.n = 4;
  rn.p = greedy(gen_len());
  rn.p.grammar = g;
  rn.p.speculative = true;
  for (int i = 0; i < rn.n; i++) {
    rn.np[i] = 12;
    make_prompt(720 + (uint64_t)i, rn.prompts[i], 12);
  }
  ASSERT(plain_outputs(&rn, want));
  for (int capped = 1; capped >= 0; capped--) {
    rn.o = (struct eng_opts){.max_seqs = 4,
                             .decode_slowdown = capped ? 1.0f : 0.0f};
    run_spec(&rn);
    ASSERT(rn.ok);
    ASSERT_EQ(rn.trace_bad, 0);
    if (capped)
      ASSERT_EQ(rn.busy_draft_steps, 0);
    else
      ASSERT_GT(rn.busy_draft_steps, 0);
    for (int i = 0; i < rn.n; i++)
      ASSERT(out_same("drafts within the slowdown room", &rn.got[i], &want[i]));
  }
  tn_grammar_release(g);
}

TN_TEST_MAIN(TN_TEST(test_ngram_lookup), TN_TEST(test_ngram_learns_rename),
             TN_TEST(test_ngram_follow_class), TN_TEST(test_bad_config),
             TN_TEST(test_draft_model_refused), TN_TEST(test_draft_model),
             TN_TEST(test_self_draft_layers), TN_TEST(test_self_draft),
             TN_TEST(test_spec_switch),
             TN_TEST(test_endings),
             TN_TEST(test_greedy_identity), TN_TEST(test_preemption),
             TN_TEST(test_prefix_reuse), TN_TEST(test_sampling_and_switch),
             TN_TEST(test_drafts_within_room),
             TN_TEST(test_grammar_identity), TN_TEST(test_grammar_early_exit),
             TN_TEST(test_grammar_forced_drafts))
