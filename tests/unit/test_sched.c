/*
 * test_sched.c: the serving scheduler on its own (src/engine/sched.c),
 * through the public engine API, on a tiny model this test writes itself.
 *
 * The model is a 2-layer llama (n_embd 64, 4 heads over 2 KV heads of 16,
 * n_ff 128) with random F32 weights from a fixed seed and a byte-level BPE
 * vocabulary of 263 tokens (the 256 GPT-2 byte tokens, five merges,
 * <|im_start|> and <|im_end|> as control tokens, a ChatML template). Its
 * logits are arbitrary but deterministic, and it loads in a millisecond.
 *
 * Every engine gets an on_step observer that records each step's plan
 * (entries in batch order, with the choice's generated count read under
 * the request's lock) and can park the engine thread at a gate, so a test
 * can submit or cancel at an exact step. Completion is awaited through the
 * notify callback (a counter and a condition variable). Requests use
 * greedy sampling with ignore_eos and a fixed max_tokens, so every output
 * has an exact length and "the same output" means the same token ids.
 *
 * Every recorded trace is checked for the invariants that hold in every
 * configuration (check_trace): budget and batch size respected, decodes
 * before prompt chunks, each sequence's positions contiguous unless a
 * preemption restarted it at a block boundary, a decode at the position of
 * its last sampled token. Without the prefix cache the blocks in use must
 * be exactly those covering the planned positions (check_blocks), which
 * shows blocks kept by finished, cancelled or preempted sequences. The
 * tests then check one behaviour each and that outputs equal those of the
 * same request run alone on a fresh engine.
 *
 * Lock order: a request's lock (held by the engine around notify) before
 * the recorder's mutex; nothing takes them the other way round.
 *
 * TN_TEST_QUICK=1 (the sanitizer builds) shortens the generations.
 */
#include "tiny_engine.h"

/* The model itself: loads, tokenizes, is deterministic, and its greedy
 * output depends on the whole prompt (so wrong KV would show). */
static void test_model(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  ASSERT_STR_EQ(info.arch, "llama");
  ASSERT_STR_EQ(info.chat_template, "chatml");
  ASSERT_EQ(info.n_vocab, N_VOCAB);
  ASSERT_EQ(info.n_layer, N_LAYER);
  ASSERT_EQ(info.n_ctx, N_CTX_TRAIN);
  ASSERT_EQ(info.kv_blocks, 4 * N_CTX_TRAIN / BLOCK);
  const struct tn_tokenizer *tok = tn_engine_tokenizer(e);
  ASSERT(tn_tokenizer_is_eog(tok, TOK_IM_END));
  int32_t *ids = NULL;
  size_t n = 0;
  struct tn_error err = {0};
  ASSERT_EQ(tn_engine_encode_text(e, "the a", 5, &ids, &n, &err), TN_OK);
  ASSERT_EQ(n, 2);
  ASSERT_EQ(ids[0], 257); /* "the" */
  ASSERT_EQ(ids[1], 258); /* "Ġa" */
  free(ids);
  struct tn_chat_msg msg = {.role = "user", .content = "hi", .content_len = 2};
  ASSERT_EQ(tn_engine_encode_chat(e, &msg, 1, NULL, &ids, &n, &err), TN_OK);
  ASSERT_GT(n, 4);
  ASSERT_EQ(ids[0], TOK_IM_START);
  int n_end = 0;
  for (size_t i = 0; i < n; i++) n_end += ids[i] == TOK_IM_END;
  ASSERT_EQ(n_end, 1);
  free(ids);

  /* finish reasons: a strong bias on <|im_end|> ends at once, unless
   * ignore_eos or min_tokens masks it */
  int32_t prompt[40];
  make_prompt(1, prompt, 40);
  struct tn_logit_bias bias = {TOK_IM_END, 100.0f};
  struct tn_gen_params p = greedy(8);
  p.sampling.bias = &bias;
  p.sampling.n_bias = 1;
  p.ignore_eos = false;
  struct tn_req *r[3] = {0};
  r[0] = submit(e, &rc, prompt, 40, &p);
  p.min_tokens = 3;
  r[1] = submit(e, &rc, prompt, 40, &p);
  p.min_tokens = 0;
  p.ignore_eos = true;
  r[2] = submit(e, &rc, prompt, 40, &p);
  ASSERT(r[0] && r[1] && r[2]);
  ASSERT(wait_done(&rc, r, 3));
  struct out a;
  collect(r[0], 0, &a);
  ASSERT_EQ(a.finish, TN_FINISH_STOP);
  ASSERT_EQ(a.n_gen, 1);
  ASSERT_EQ(a.ids[0], TOK_IM_END);
  ASSERT_EQ(a.len, 0);
  collect(r[1], 0, &a);
  ASSERT_EQ(a.finish, TN_FINISH_STOP);
  ASSERT_EQ(a.n_gen, 4);
  ASSERT_EQ(a.ids[3], TOK_IM_END);
  for (int i = 0; i < 3; i++) ASSERT_NE(a.ids[i], TOK_IM_END);
  collect(r[2], 0, &a);
  ASSERT_EQ(a.finish, TN_FINISH_LENGTH);
  ASSERT_EQ(a.n_gen, 8);
  for (int i = 0; i < 8; i++) ASSERT_NE(a.ids[i], TOK_IM_END);
  for (int i = 0; i < 3; i++) tn_req_release(r[i]);
  tn_engine_close(e);
  ASSERT_EQ(check_trace(&rc, 256, 4), 0);
  rec_deinit(&rc);

  /* determinism, and outputs that depend on the first prompt token */
  p = greedy(16);
  struct out o1, o2, o3;
  ASSERT(run_alone(prompt, 40, &p, &o1));
  ASSERT(run_alone(prompt, 40, &p, &o2));
  ASSERT(out_same("the same request twice", &o1, &o2));
  ASSERT_EQ(o1.finish, TN_FINISH_LENGTH);
  ASSERT_EQ(o1.n_ids, 16);
  prompt[0] = (prompt[0] + 1) % N_TEXT_TOKENS;
  ASSERT(run_alone(prompt, 40, &p, &o3));
  int32_t same = 0;
  while (same < 16 && o1.ids[same] == o3.ids[same]) same++;
  if (same == 16) print_ids("output", &o1);
  ASSERT_LT(same, 16);
  int distinct = 0; /* not one token over and over */
  for (int i = 0; i < 16; i++) {
    int j = 0;
    while (j < i && o1.ids[j] != o1.ids[i]) j++;
    distinct += j == i;
  }
  ASSERT_GE(distinct, 3);
}

/* max_seqs = 2 with 4 requests: two run, two wait, and they start in
 * submission order as the others finish. A full queue refuses. */
static void test_admission(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 2, .step_tokens = 64, .queue_max = 3,
                       .gate = true};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  enum { N = 4 };
  int32_t prompts[N][20];
  struct tn_gen_params p = greedy(8);
  struct tn_req *r[N] = {0};
  for (int i = 0; i < N; i++) make_prompt(100 + (uint64_t)i, prompts[i], 20);
  r[0] = submit(e, &rc, prompts[0], 20, &p);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc)); /* step 0 planned with r[0] alone */
  for (int i = 1; i < N; i++) r[i] = submit(e, &rc, prompts[i], 20, &p);
  /* r[1..3] are in the inbox: the queue (3) is full */
  struct tn_req *extra = NULL;
  struct tn_error err = {0};
  enum tn_status st = tn_engine_submit(e, prompts[0], 20, &p, on_notify, &rc,
                                       &extra, &err);
  ASSERT_EQ(st, TN_EFULL);
  ASSERT(extra == NULL);
  ASSERT_SUBSTR(err.msg, "full");
  struct tn_engine_stats stats;
  tn_engine_stats(e, &stats);
  ASSERT_EQ(stats.waiting, 3);
  rec_open(&rc);
  bool done = wait_done(&rc, r, N);
  bool idle = engine_idle(e, false);
  struct out got[N];
  for (int i = 0; i < N; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[1] && r[2] && r[3]);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 64, 2), 0);

  int32_t first[N], last[N];
  for (int i = 0; i < N; i++) seq_span(&rc, r[i], 0, &first[i], &last[i]);
  ASSERT_EQ(first[0], 0);
  ASSERT_EQ(rc.steps[0].n, 1);
  for (int i = 1; i < N; i++) ASSERT_LE(first[i - 1], first[i]); /* FIFO */
  ASSERT_EQ(first[1], 1);
  int32_t max_waiting = 0;
  for (int32_t s = 0; s < rc.n_steps; s++) {
    max_waiting = TN_MAX(max_waiting, rc.steps[s].n_waiting);
    int running = 0; /* requests started and not finished */
    for (int i = 0; i < N; i++) {
      running += first[i] <= s && s <= last[i];
      if (first[i] <= s && s <= last[i] && step_find(&rc, s, r[i], 0) < 0) {
        fprintf(stderr, "request %d skipped step %d\n", i, s);
        ASSERT(false);
      }
    }
    ASSERT_LE(running, 2);
  }
  ASSERT_EQ(max_waiting, 2);
  ASSERT_EQ(rc.steps[1].n_waiting, 2); /* r[2], r[3] */
  /* r[2] starts in the step after r[0] or r[1] finished; r[3] then waits
   * alone, and starts when the next one finishes */
  ASSERT_EQ(first[2], TN_MIN(last[0], last[1]) + 1);
  ASSERT_EQ(rc.steps[first[2]].n_waiting, 1);
  ASSERT_EQ(first[3], TN_MAX(last[0], last[1]) + 1);
  ASSERT_EQ(rc.steps[first[3]].n_waiting, 0);
  for (int i = 0; i < N; i++) {
    struct out want;
    ASSERT(run_alone(prompts[i], 20, &p, &want));
    ASSERT(out_same("admission vs alone", &got[i], &want));
    ASSERT_EQ(got[i].finish, TN_FINISH_LENGTH);
    ASSERT_EQ(got[i].n_gen, 8);
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

/* A prompt longer than the step budget is prefilled in contiguous chunks;
 * its first token comes after the last chunk. */
static void test_chunking(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4, .step_tokens = 32, .gate = true};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t pa[100], pb[70], pc[45];
  make_prompt(200, pa, 100);
  make_prompt(201, pb, 70);
  make_prompt(202, pc, 45);
  struct tn_gen_params p = greedy(5);
  struct tn_req *r[3] = {0};
  r[0] = submit(e, &rc, pa, 100, &p);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc));
  r[1] = submit(e, &rc, pb, 70, &p);
  r[2] = submit(e, &rc, pc, 45, &p);
  rec_open(&rc);
  bool done = wait_done(&rc, r, 3);
  bool idle = engine_idle(e, false);
  struct out got[3];
  for (int i = 0; i < 3; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[1] && r[2]);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 32, 4), 0);

  /* r[0] alone in step 0, then it has the budget first: 32, 32, 32, 4,
   * then 4 decodes at 100.. with 1..4 tokens generated */
  static const int32_t want_pos[] = {0, 32, 64, 96, 100, 101, 102, 103};
  static const int32_t want_n[] = {32, 32, 32, 4, 1, 1, 1, 1};
  int32_t k = 0;
  for (int32_t s = 0; s < rc.n_steps; s++) {
    int32_t i = step_find(&rc, s, r[0], 0);
    if (i < 0) continue;
    const struct rec_entry *en = step_entry(&rc, s, i);
    ASSERT_LT(k, 8);
    ASSERT_EQ(s, k); /* every step until it finished */
    ASSERT_EQ(en->pos, want_pos[k]);
    ASSERT_EQ(en->n_tokens, want_n[k]);
    ASSERT_EQ(en->decode, k >= 4);
    ASSERT_EQ(en->n_gen, k < 4 ? 0 : k - 3); /* no token before the end */
    k++;
  }
  ASSERT_EQ(k, 8);
  /* the other two: every prompt chunk planned before any token, chunks
   * fill the budget left by others, and the whole prompt is covered */
  for (int q = 1; q < 3; q++) {
    int32_t covered = 0, n_chunks = 0;
    for (int32_t s = 0; s < rc.n_steps; s++) {
      int32_t i = step_find(&rc, s, r[q], 0);
      if (i < 0) continue;
      const struct rec_entry *en = step_entry(&rc, s, i);
      if (en->decode) continue;
      ASSERT_EQ(en->n_gen, 0);
      ASSERT_EQ(en->pos, covered);
      covered += en->n_tokens;
      n_chunks++;
      /* a chunk that is not its last takes the whole budget left */
      if (covered < r[q]->n_prompt) ASSERT_EQ(rc.steps[s].n_tokens, 32);
    }
    ASSERT_EQ(covered, r[q]->n_prompt);
    ASSERT_GE(n_chunks, 2);
  }
  /* chunked prefill changes no token (alone: one 256-token step) */
  const int32_t *pr[3] = {pa, pb, pc};
  for (int i = 0; i < 3; i++) {
    struct out want;
    ASSERT(run_alone(pr[i], r[i]->n_prompt, &p, &want));
    ASSERT(out_same("chunked vs alone", &got[i], &want));
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

/* Parks the engine once two requests are both decoding. */
static bool hook_two_decoding(struct rec *rc, const struct rec_step *st,
                              const struct rec_entry *ents) {
  int n = 0;
  for (int32_t i = 0; i < st->n; i++) n += ents[i].decode && ents[i].n_gen >= 2;
  if (n < 2) return false;
  rc->hook = NULL;
  return true;
}

/* A long prompt admitted while others decode is chunked behind them: they
 * decode in every step, ahead of its chunks. */
/* FILL: no cap, the chunk takes what the decodes leave of the step.
 * CAPPED: decode_slowdown 1 lets a step carrying decodes add one block of
 * prompt (the least it ever adds). SPREAD: a slowdown that never binds
 * and prompt_spread 4: each step takes a quarter of the prompt tokens
 * still to run (rounded up), at least a block. */
enum chunking { FILL, CAPPED, SPREAD };
static void run_decode_first(enum chunking mode) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4,
                       .step_tokens = mode == SPREAD ? 64 : 32,
                       .gate = true,
                       .decode_slowdown = mode == CAPPED   ? 1.0f
                                          : mode == SPREAD ? 100.0f
                                                           : 0.0f,
                       .prompt_spread = mode == SPREAD ? 4 : 0};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t pa[10], pb[10], pc[150];
  make_prompt(300, pa, 10);
  make_prompt(301, pb, 10);
  make_prompt(302, pc, 150);
  struct tn_gen_params pd = greedy(quick() ? 20 : 40), pl = greedy(4);
  struct tn_req *r[3] = {0};
  /* A parks step 0, B joins at step 1; the hook parks the engine again
   * once both decode, and then C comes */
  r[0] = submit(e, &rc, pa, 10, &pd);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc));
  r[1] = submit(e, &rc, pb, 10, &pd);
  ASSERT(r[1] != NULL);
  pthread_mutex_lock(&rc.mu);
  rc.hook = hook_two_decoding;
  pthread_mutex_unlock(&rc.mu);
  rec_open(&rc);
  ASSERT(rec_wait_parked(&rc));
  r[2] = submit(e, &rc, pc, 150, &pl);
  rec_open(&rc);
  bool done = wait_done(&rc, r, 3);
  struct out got[3];
  for (int i = 0; i < 3; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[2] != NULL);
  ASSERT(done);
  ASSERT_EQ(check_trace(&rc, o.step_tokens, 4), 0);

  int32_t n_chunk_steps = 0, covered = 0;
  for (int32_t s = 0; s < rc.n_steps; s++) {
    int32_t ic = step_find(&rc, s, r[2], 0);
    if (ic < 0 || step_entry(&rc, s, ic)->decode) continue;
    n_chunk_steps++;
    covered += step_entry(&rc, s, ic)->n_tokens;
    for (int q = 0; q < 2; q++) {
      int32_t iq = step_find(&rc, s, r[q], 0);
      if (iq < 0) {
        fprintf(stderr, "step %d: request %d starved by the long prompt\n", s,
                q);
        ASSERT(false);
      }
      ASSERT(step_entry(&rc, s, iq)->decode);
      ASSERT_LT(iq, ic); /* batch order: decodes first */
    }
    /* the chunk takes what the two decodes leave, the cap, or the
     * backlog's share */
    int32_t n = step_entry(&rc, s, ic)->n_tokens, left = 150 - covered + n;
    int32_t want = mode == FILL ? 30 : mode == CAPPED ? 16
                                                      : TN_MAX((left + 3) / 4, 16);
    if (covered < 150) ASSERT_EQ(n, want);
  }
  ASSERT_EQ(covered, 150);
  /* SPREAD: 38, 28, 21, 16, 16, 16, then the last 15 */
  ASSERT_EQ(n_chunk_steps, mode == FILL ? 5 : mode == CAPPED ? 10 : 7);
  const int32_t *pr[3] = {pa, pb, pc};
  for (int i = 0; i < 3; i++) {
    struct out want;
    ASSERT(run_alone(pr[i], r[i]->n_prompt, i < 2 ? &pd : &pl, &want));
    ASSERT(out_same("decode-first vs alone", &got[i], &want));
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

static void test_decode_first(void) { run_decode_first(FILL); }
static void test_decode_first_capped(void) { run_decode_first(CAPPED); }
static void test_decode_first_spread(void) { run_decode_first(SPREAD); }

/* A KV pool too small for everyone: the newest sequence is preempted and
 * recomputed later; nothing changes in the outputs. */
static void run_preemption(bool prefix) {
  struct rec rc;
  rec_init(&rc);
  /* 12 blocks; each request needs 5 (40 + 40 tokens), 3 for its prompt */
  struct eng_opts o = {.max_seqs = 4, .step_tokens = 256, .kv_blocks = 12,
                       .no_prefix = !prefix, .gate = true, .n_threads = 2};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  ASSERT_EQ(tn_engine_n_ctx(e), 12 * BLOCK); /* capped to the pool */
  enum { N = 4, NP = 40 };
  int32_t prompts[N][NP];
  struct tn_gen_params p = greedy(40);
  struct tn_req *r[N] = {0};
  for (int i = 0; i < N; i++) make_prompt(400 + (uint64_t)i, prompts[i], NP);
  r[0] = submit(e, &rc, prompts[0], NP, &p);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc));
  for (int i = 1; i < N; i++) r[i] = submit(e, &rc, prompts[i], NP, &p);
  rec_open(&rc);
  bool done = wait_done(&rc, r, N);
  bool idle = engine_idle(e, !prefix);
  struct tn_engine_stats stats;
  tn_engine_stats(e, &stats);
  struct out got[N];
  for (int i = 0; i < N; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[1] && r[2] && r[3]);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 256, 4), 0);
  if (!prefix) ASSERT_EQ(check_blocks(&rc, 12), 0);
  uint64_t preempted = rc.steps[rc.n_steps - 1].preemptions;
  ASSERT_GT(preempted, 0);
  ASSERT_EQ(stats.preemptions, preempted);

  int recomputes = 0, from_cache = 0;
  for (int32_t k = 0; k < rc.n_ents; k++) {
    bool re = !rc.ents[k].decode && rc.ents[k].n_gen > 0;
    recomputes += re;
    from_cache += re && rc.ents[k].pos > 0;
  }
  ASSERT_GT(recomputes, 0);
  /* with the cache, blocks not yet evicted turn recompute into lookup */
  if (prefix) ASSERT_GT(from_cache, 0);
  else ASSERT_EQ(from_cache, 0);
  if (!prefix) {
    /* Every preemption takes the newest admitted sequences: of those in
     * the step before that go on (batch order is admission order here),
     * the ones missing from the step are its last ones, as many as the
     * preemptions counted, and they come back recomputing from 0. */
    for (int32_t s = 1; s < rc.n_steps; s++) {
      uint64_t delta = rc.steps[s].preemptions - rc.steps[s - 1].preemptions;
      const struct rec_step *prev = &rc.steps[s - 1];
      int32_t n_going = 0, n_victims = 0;
      bool suffix = true;
      for (int32_t i = 0; i < prev->n; i++) {
        const struct rec_entry *en = step_entry(&rc, s - 1, i);
        bool stays = step_find(&rc, s, en->req, en->choice) >= 0;
        int32_t back = -1, j = -1;
        for (int32_t t = s + 1; t < rc.n_steps && !stays && back < 0; t++)
          if ((j = step_find(&rc, t, en->req, en->choice)) >= 0) back = t;
        if (!stays && back < 0) continue; /* finished */
        n_going++;
        if (stays) {
          suffix = suffix && n_victims == 0;
          continue;
        }
        n_victims++;
        ASSERT_EQ(step_entry(&rc, back, j)->pos, 0);
        ASSERT(!step_entry(&rc, back, j)->decode);
      }
      if (n_victims != (int32_t)delta || !suffix)
        fprintf(stderr, "step %d: %d of %d preempted, %" PRIu64
                " counted, newest: %d\n", s, n_victims, n_going, delta,
                suffix);
      ASSERT_EQ(n_victims, delta);
      ASSERT(suffix);
    }
  }
  for (int i = 0; i < N; i++) {
    struct out want;
    ASSERT(run_alone(prompts[i], NP, &p, &want));
    ASSERT(out_same(prefix ? "preempted (prefix cache) vs alone"
                           : "preempted vs alone",
                    &got[i], &want));
    ASSERT_EQ(got[i].finish, TN_FINISH_LENGTH);
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

static void test_preemption(void) { run_preemption(false); }
static void test_preemption_prefix(void) { run_preemption(true); }

/* Requests that share a prefix reuse its full blocks; outputs are the
 * same as without the cache. */
static void run_prefix(bool prefix, struct out outs[5], int32_t n_cached[5],
                       int32_t first_pos[5], uint64_t *hits) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4, .no_prefix = !prefix};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t base[64 + 12], p1[74], p2[76], p5[82];
  make_prompt(500, base, 64 + 12);
  memcpy(p1, base, 74 * sizeof(int32_t));
  memcpy(p2, base, 64 * sizeof(int32_t));
  make_prompt(501, p2 + 64, 12); /* same 64-token prefix, other suffix */
  struct tn_gen_params p = greedy(8);
  /* 1: the prefix computed; 2: shares 4 blocks; 3: exactly the prefix (the
   * last block is recomputed for its logits); 4: 1 again; 5: 1 and its
   * output (the next turn: blocks of generated tokens are cached too) */
  const int32_t *pr[4] = {p1, p2, base, p1};
  const int32_t np[5] = {74, 76, 64, 74, 82};
  struct tn_req *r[5] = {0};
  for (int i = 0; i < 5; i++) {
    if (i == 4) {
      memcpy(p5, p1, 74 * sizeof(int32_t));
      for (int k = 0; k < 8; k++) p5[74 + k] = outs[0].ids[k];
    }
    r[i] = submit(e, &rc, i < 4 ? pr[i] : p5, np[i], &p);
    ASSERT(r[i] != NULL);
    ASSERT(wait_done(&rc, &r[i], 1));
    collect(r[i], 0, &outs[i]);
    tn_req_lock(r[i]);
    n_cached[i] = r[i]->n_cached;
    tn_req_unlock(r[i]);
  }
  bool idle = engine_idle(e, !prefix);
  struct tn_engine_stats stats;
  tn_engine_stats(e, &stats);
  *hits = stats.prefix_hits;
  tn_engine_close(e);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 256, 4), 0);
  for (int i = 0; i < 5; i++) {
    int32_t first, last;
    seq_span(&rc, r[i], 0, &first, &last);
    ASSERT_GE(first, 0);
    first_pos[i] = step_entry(&rc, first, step_find(&rc, first, r[i], 0))->pos;
    ASSERT_EQ(first_pos[i], n_cached[i]);
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

static void test_prefix_reuse(void) {
  struct out on[5] = {0}, off[5] = {0};
  int32_t cached_on[5] = {0}, cached_off[5] = {0}, pos_on[5] = {0},
          pos_off[5] = {0};
  uint64_t hits_on = 0, hits_off = 0;
  run_prefix(true, on, cached_on, pos_on, &hits_on);
  run_prefix(false, off, cached_off, pos_off, &hits_off);
  static const int32_t want_cached[5] = {0, 64, 48, 64, 80};
  for (int i = 0; i < 5; i++) {
    ASSERT_EQ(cached_on[i], want_cached[i]);
    ASSERT_EQ(pos_on[i], want_cached[i]);
    ASSERT_EQ(cached_off[i], 0);
    ASSERT_EQ(pos_off[i], 0);
    ASSERT(out_same("prefix cache on vs off", &on[i], &off[i]));
  }
  ASSERT_EQ(hits_on, 64 + 48 + 64 + 80);
  ASSERT_EQ(hits_off, 0);
  ASSERT(out_same("the same prompt again", &on[3], &on[0]));
}

/* Cancels C during its prefill (third chunk) and D once it decoded 3. */
struct cancel_plan {
  const struct tn_req *prefill, *decode;
  int32_t prefill_step, decode_step;
};

static bool hook_cancel(struct rec *rc, const struct rec_step *st,
                        const struct rec_entry *ents) {
  struct cancel_plan *cp = rc->hook_user;
  for (int32_t i = 0; i < st->n; i++) {
    const struct rec_entry *en = &ents[i];
    if (en->req == cp->prefill && cp->prefill_step < 0 && en->pos >= 62) {
      tn_req_cancel((struct tn_req *)en->req);
      cp->prefill_step = (int32_t)st->step;
    }
    if (en->req == cp->decode && cp->decode_step < 0 && en->decode &&
        en->n_gen >= 3) {
      tn_req_cancel((struct tn_req *)en->req);
      cp->decode_step = (int32_t)st->step;
    }
  }
  return false;
}

static void test_cancel(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 2, .step_tokens = 32, .no_prefix = true,
                       .gate = true, .n_threads = 2};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  /* A runs throughout; C is cancelled while prefilling, D while decoding,
   * Q while queued; E starts after D and finishes normally */
  enum { A, C, D, Q, E_, N };
  static const int32_t np[N] = {10, 200, 12, 9, 15};
  int32_t max_tok = quick() ? 30 : 60;
  const int32_t nt[N] = {max_tok, 8, max_tok, 8, 10};
  int32_t prompts[N][200];
  struct tn_gen_params params[N];
  for (int i = 0; i < N; i++) {
    make_prompt(600 + (uint64_t)i, prompts[i], np[i]);
    params[i] = greedy(nt[i]);
  }
  struct cancel_plan cp = {.prefill_step = -1, .decode_step = -1};
  struct tn_req *r[N] = {0};
  r[A] = submit(e, &rc, prompts[A], np[A], &params[A]);
  ASSERT(r[A] != NULL);
  ASSERT(rec_wait_parked(&rc));
  for (int i = C; i < N; i++)
    r[i] = submit(e, &rc, prompts[i], np[i], &params[i]);
  ASSERT(r[C] && r[D] && r[Q] && r[E_]);
  tn_req_cancel(r[Q]); /* still in the inbox */
  pthread_mutex_lock(&rc.mu);
  cp.prefill = r[C];
  cp.decode = r[D];
  rc.hook = hook_cancel;
  rc.hook_user = &cp;
  pthread_mutex_unlock(&rc.mu);
  rec_open(&rc);
  bool done = wait_done(&rc, r, N);
  bool idle = engine_idle(e, true);
  struct tn_engine_info info;
  tn_engine_info(e, &info);
  struct out got[N];
  for (int i = 0; i < N; i++) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 32, 2), 0);
  ASSERT_EQ(check_blocks(&rc, info.kv_blocks), 0); /* freed at once */
  int32_t first[N], last[N];
  for (int i = 0; i < N; i++) seq_span(&rc, r[i], 0, &first[i], &last[i]);

  /* queued: never scheduled */
  ASSERT_EQ(got[Q].finish, TN_FINISH_CANCELLED);
  ASSERT_EQ(got[Q].n_gen, 0);
  ASSERT_EQ(first[Q], -1);
  /* prefilling: gone after the step it was cancelled in, no token */
  ASSERT_GE(cp.prefill_step, 0);
  ASSERT_EQ(got[C].finish, TN_FINISH_CANCELLED);
  ASSERT_EQ(got[C].n_gen, 0);
  ASSERT_EQ(last[C], cp.prefill_step);
  /* its slot goes to D in the next step */
  ASSERT_EQ(first[D], cp.prefill_step + 1);
  /* decoding: the token of the cancel step was sampled, nothing after */
  ASSERT_GE(cp.decode_step, 0);
  ASSERT_EQ(got[D].finish, TN_FINISH_CANCELLED);
  ASSERT_EQ(got[D].n_gen, 4);
  ASSERT_EQ(last[D], cp.decode_step);
  ASSERT_EQ(first[E_], cp.decode_step + 1);
  /* the others: as alone; D's tokens are the start of its alone output */
  for (int i = 0; i < N; i++) {
    struct out want;
    if (i == C || i == Q) {
      tn_req_release(r[i]);
      continue;
    }
    ASSERT(run_alone(prompts[i], np[i], &params[i], &want));
    if (i == D) {
      ASSERT_EQ(got[D].n_ids, 4);
      ASSERT(memcmp(got[D].ids, want.ids, 4 * sizeof(int32_t)) == 0);
    } else {
      ASSERT(out_same("next to cancelled ones vs alone", &got[i], &want));
      ASSERT_EQ(got[i].finish, TN_FINISH_LENGTH);
    }
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

/* Parks the engine after its third step. */
static bool hook_park_3(struct rec *rc, const struct rec_step *st,
                        const struct rec_entry *ents) {
  if (st->step < 2) return false;
  rc->hook = NULL;
  return true;
}

static void *close_main(void *arg) {
  tn_engine_close(arg);
  return NULL;
}

/* Closing an engine with requests queued and running, and dropping
 * requests before they are done (clients going away). The engine is
 * parked in a step while another thread closes it; once the close has
 * begun (submit says TN_ECANCELED) the step goes on, and the engine stops
 * after it, cancelling everything. */
static void test_close_inflight(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 2, .step_tokens = 32, .n_threads = 2};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t prompt[50];
  make_prompt(700, prompt, 50);
  struct tn_gen_params p = greedy(100);
  /* released at once: the engine cancels and frees it */
  struct tn_req *gone = submit(e, &rc, prompt, 50, &p);
  ASSERT(gone != NULL);
  tn_req_release(gone);
  pthread_mutex_lock(&rc.mu);
  rc.hook = hook_park_3;
  pthread_mutex_unlock(&rc.mu);
  enum { N = 4, N_LATE = 16 };
  struct tn_req *r[N] = {0}, *late[N_LATE] = {0};
  for (int i = 0; i < N; i++) {
    prompt[0] = i;
    r[i] = submit(e, &rc, prompt, 50, &p);
  }
  ASSERT(r[0] && r[1] && r[2] && r[3]);
  ASSERT(rec_wait_parked(&rc));
  tn_req_release(r[3]); /* queued, then its client left */
  r[3] = NULL;
  pthread_t closer;
  ASSERT_EQ(pthread_create(&closer, NULL, close_main, e), 0);
  int n_late = 0;
  for (;;) {
    struct tn_req *x = NULL;
    struct tn_error err = {0};
    enum tn_status st =
        tn_engine_submit(e, prompt, 50, &p, on_notify, &rc, &x, &err);
    if (st == TN_ECANCELED) break;
    if (st == TN_OK && n_late < N_LATE) late[n_late++] = x;
    else if (st == TN_OK) tn_req_release(x);
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  rec_open(&rc);
  pthread_join(closer, NULL);
  for (int i = 0; i < 3; i++) {
    ASSERT(req_done(r[i]));
    struct out got;
    collect(r[i], 0, &got);
    ASSERT_EQ(got.finish, TN_FINISH_CANCELLED);
    ASSERT_LE(got.n_gen, 3);
    tn_req_release(r[i]);
  }
  for (int i = 0; i < n_late; i++) {
    ASSERT(req_done(late[i]));
    struct out got;
    collect(late[i], 0, &got);
    ASSERT_EQ(got.finish, TN_FINISH_CANCELLED);
    ASSERT_EQ(got.n_gen, 0);
    tn_req_release(late[i]);
  }
  ASSERT_EQ(rc.n_steps, 3);
  ASSERT_EQ(check_trace(&rc, 32, 2), 0);
  rec_deinit(&rc);
}

/* Many requests together, with chunking and a shared prefix, give exactly
 * what each gives alone. */
static void run_batch(bool shared_prefix) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 8, .step_tokens = 64, .gate = true,
                       .n_threads = 2};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  enum { N = 8 };
  int32_t prompts[N][64], np[N];
  struct tn_gen_params p = greedy(quick() ? 12 : 24);
  struct tn_req *r[N] = {0};
  for (int i = 0; i < N; i++) {
    np[i] = 5 + 8 * i;
    make_prompt(800 + (uint64_t)i, prompts[i], np[i]);
    if (shared_prefix && np[i] > 36) make_prompt(899, prompts[i], 33);
  }
  r[0] = submit(e, &rc, prompts[0], np[0], &p);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc));
  for (int i = 1; i < N; i++) r[i] = submit(e, &rc, prompts[i], np[i], &p);
  rec_open(&rc);
  bool done = wait_done(&rc, r, N);
  bool idle = engine_idle(e, false);
  struct tn_engine_stats stats;
  tn_engine_stats(e, &stats);
  struct out got[N];
  for (int i = 0; i < N; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 64, 8), 0);
  int32_t most = 0;
  for (int32_t s = 0; s < rc.n_steps; s++) most = TN_MAX(most, rc.steps[s].n);
  ASSERT_EQ(most, N); /* they did run together */
  if (shared_prefix) ASSERT_GT(stats.prefix_hits, 0);
  int distinct = 0;
  for (int i = 0; i < N; i++) {
    struct out want;
    ASSERT(run_alone(prompts[i], np[i], &p, &want));
    ASSERT(out_same("batched vs alone", &got[i], &want));
    int j = 0;
    while (j < i && memcmp(got[j].ids, got[i].ids, sizeof(got[i].ids)))
      j++;
    distinct += j == i;
    tn_req_release(r[i]);
  }
  ASSERT_GE(distinct, N / 2); /* the model is not degenerate */
  rec_deinit(&rc);
}

static void test_batch_invariance(void) { run_batch(false); }
static void test_batch_shared_prefix(void) { run_batch(true); }

/* n > 1: choices 1.. start once choice 0's prompt is cached, reuse its
 * full blocks, and go ahead of requests that were already waiting; greedy
 * choices all equal the n = 1 output; sampled ones differ from each other
 * but not between cache on and off. A one-token request parks step 0 so
 * that R (n = 3) and S arrive together; R's prompt fills step 1 and S
 * waits behind it. */
static void run_choices(bool prefix, float temperature, struct out outs[3],
                        struct out *other) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4, .step_tokens = 40, .gate = true,
                       .no_prefix = !prefix};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t prompt[40], ps[20], one = 7;
  make_prompt(900, prompt, 40);
  make_prompt(901, ps, 20);
  struct tn_gen_params p = greedy(12), p1 = greedy(1);
  p.n = 3;
  p.sampling.temperature = temperature;
  p.sampling.seed = 77;
  struct tn_req *r[3] = {0};
  r[2] = submit(e, &rc, &one, 1, &p1);
  ASSERT(r[2] != NULL);
  ASSERT(rec_wait_parked(&rc));
  r[0] = submit(e, &rc, prompt, 40, &p);
  r[1] = submit(e, &rc, ps, 20, &p1);
  rec_open(&rc);
  bool done = wait_done(&rc, r, 3);
  bool idle = engine_idle(e, !prefix);
  if (r[0])
    for (int c = 0; c < 3; c++) collect(r[0], c, &outs[c]);
  if (r[1]) collect(r[1], 0, other);
  tn_engine_close(e);
  ASSERT(r[0] && r[1]);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 40, 4), 0);
  int32_t first, last;
  seq_span(&rc, r[0], 0, &first, &last);
  ASSERT_EQ(first, 1);
  ASSERT_EQ(rc.steps[1].n, 1); /* the prompt takes the whole budget */
  ASSERT_EQ(step_entry(&rc, 1, 0)->n_tokens, 40);
  /* S is admitted after the children, which were queued later */
  int32_t first_s, first_c2;
  seq_span(&rc, r[1], 0, &first_s, &last);
  seq_span(&rc, r[0], 2, &first_c2, &last);
  ASSERT_GE(first_s, first_c2);
  ASSERT_GT(step_find(&rc, first_s, r[1], 0),
            step_find(&rc, first_s, r[0], 2));
  if (prefix) {
    /* step 2: choice 0 decodes, choices 1 and 2 compute the 8 tokens past
     * the cached blocks, then S */
    ASSERT_EQ(rc.steps[2].n, 4);
    ASSERT_EQ(step_find(&rc, 2, r[0], 0), 0);
    ASSERT_EQ(step_find(&rc, 2, r[0], 1), 1);
    ASSERT_EQ(step_find(&rc, 2, r[0], 2), 2);
    ASSERT_EQ(step_find(&rc, 2, r[1], 0), 3);
  }
  for (int c = 1; c < 3; c++) {
    seq_span(&rc, r[0], c, &first, &last);
    ASSERT_EQ(first, prefix || c == 1 ? 2 : 3); /* after choice 0's prompt */
    const struct rec_entry *en =
        step_entry(&rc, first, step_find(&rc, first, r[0], c));
    ASSERT_EQ(en->pos, prefix ? 32 : 0); /* its two full blocks reused */
    if (prefix) ASSERT_EQ(en->n_tokens, 8);
    ASSERT_EQ(outs[c].n_gen, 12);
  }
  for (int i = 0; i < 3; i++) tn_req_release(r[i]);
  rec_deinit(&rc);
}

static void test_n_choices(void) {
  struct out g_on[3] = {0}, g_off[3] = {0}, s_on[3] = {0}, s_off[3] = {0},
             alone = {0}, other[4] = {0}, other_alone = {0};
  run_choices(true, 0.0f, g_on, &other[0]);
  run_choices(false, 0.0f, g_off, &other[1]);
  int32_t prompt[40], ps[20];
  make_prompt(900, prompt, 40);
  make_prompt(901, ps, 20);
  struct tn_gen_params p = greedy(12), p1 = greedy(1);
  ASSERT(run_alone(prompt, 40, &p, &alone));
  ASSERT(run_alone(ps, 20, &p1, &other_alone));
  for (int c = 0; c < 3; c++) {
    ASSERT(out_same("greedy choice vs n = 1", &g_on[c], &alone));
    ASSERT(out_same("greedy choice, no prefix cache", &g_off[c], &alone));
  }
  run_choices(true, 0.9f, s_on, &other[2]);
  run_choices(false, 0.9f, s_off, &other[3]);
  for (int c = 0; c < 3; c++)
    ASSERT(out_same("sampled choice, cache on vs off", &s_on[c], &s_off[c]));
  ASSERT(memcmp(s_on[0].ids, s_on[1].ids, sizeof(s_on[0].ids)) != 0 ||
         memcmp(s_on[1].ids, s_on[2].ids, sizeof(s_on[0].ids)) != 0);
  for (int i = 0; i < 4; i++)
    ASSERT(out_same("the request behind n = 3 vs alone", &other[i],
                    &other_alone));
}

/* ---- background work (shadow replays)
 *
 * A background request runs only in steps when no live request is
 * outstanding on the pool: its steps never carry live entries and come
 * after the last live one, hold at most TN_BACKGROUND_STEP_TOKENS tokens,
 * it gives up its slot and blocks to a live arrival, and its output is
 * what it gives alone. */
static struct tn_req *g_bg[2];

static bool is_bg(const struct rec_entry *en) {
  return en->req == g_bg[0] || en->req == g_bg[1];
}

/* Over steps [from, n_steps): the last with a live entry and the first
 * with a background one (-1: none). */
static void bg_order(const struct rec *rc, int32_t from, int32_t *last_live,
                     int32_t *first_bg) {
  *last_live = *first_bg = -1;
  for (int32_t s = from; s < rc->n_steps; s++) {
    int n_bg = 0;
    for (int32_t i = 0; i < rc->steps[s].n; i++)
      n_bg += is_bg(step_entry(rc, s, i));
    if (n_bg && *first_bg < 0) *first_bg = s;
    if (n_bg < rc->steps[s].n) *last_live = s;
  }
}

static double held_of(struct tn_req *r) {
  tn_req_lock(r);
  double h = r->t_held;
  tn_req_unlock(r);
  return h;
}

static void test_background(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4, .step_tokens = 256, .gate = true,
                       .n_threads = 2};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t pl[2][30], pb[2][70];
  for (int i = 0; i < 2; i++) {
    make_prompt(1100 + (uint64_t)i, pl[i], 30);
    make_prompt(1200 + (uint64_t)i, pb[i], 70);
  }
  struct tn_gen_params live = greedy(24), bg = greedy(16);
  bg.background = true;
  struct tn_req *r[4] = {0};
  r[0] = submit(e, &rc, pl[0], 30, &live);
  ASSERT(r[0] != NULL);
  ASSERT(rec_wait_parked(&rc));
  g_bg[0] = r[1] = submit(e, &rc, pb[0], 70, &bg);
  g_bg[1] = r[2] = submit(e, &rc, pb[1], 70, &bg);
  r[3] = submit(e, &rc, pl[1], 30, &live);
  rec_open(&rc);
  bool done = wait_done(&rc, r, 4);
  bool idle = engine_idle(e, false);
  struct out got[4];
  for (int i = 0; i < 4; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[1] && r[2] && r[3]);
  ASSERT(done);
  ASSERT(idle);
  ASSERT_EQ(check_trace(&rc, 256, 4), 0);
  int32_t last_live, first_bg;
  bg_order(&rc, 0, &last_live, &first_bg);
  for (int32_t s = first_bg; s >= 0 && s < rc.n_steps; s++)
    ASSERT_LE(rc.steps[s].n_tokens, TN_BACKGROUND_STEP_TOKENS);
  ASSERT_GE(first_bg, 0);
  ASSERT_GT(first_bg, last_live);
  ASSERT(held_of(r[1]) > 0.0);
  ASSERT(held_of(r[0]) == 0.0);
  for (int i = 0; i < 4; i++) {
    struct out want;
    bool b = i == 1 || i == 2;
    ASSERT(run_alone(b ? pb[i - 1] : pl[i ? 1 : 0], b ? 70 : 30,
                     b ? &bg : &live, &want));
    ASSERT(out_same("background vs alone", &got[i], &want));
    tn_req_release(r[i]);
  }
  memset(g_bg, 0, sizeof(g_bg));
  rec_deinit(&rc);
}

/* Parks once both background sequences are decoding. */
static bool hook_bg_decoding(struct rec *rc, const struct rec_step *st,
                             const struct rec_entry *ents) {
  (void)rc;
  int n = 0;
  for (int32_t i = 0; i < st->n; i++)
    n += is_bg(&ents[i]) && ents[i].decode && ents[i].n_gen >= 4;
  return n == 2;
}

/* Two background requests fill the batch (max_seqs 2); a live one
 * arriving takes a slot from the newest and runs alone until done. */
static void test_background_yields(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 2, .step_tokens = 256, .n_threads = 2,
                       .no_prefix = true};
  struct tn_engine *e = eng_open(&rc, &o);
  ASSERT(e != NULL);
  int32_t pb[2][40], pl[40];
  for (int i = 0; i < 2; i++) make_prompt(1300 + (uint64_t)i, pb[i], 40);
  make_prompt(1310, pl, 40);
  struct tn_gen_params live = greedy(8), bg = greedy(40);
  bg.background = true;
  pthread_mutex_lock(&rc.mu);
  rc.hook = hook_bg_decoding;
  pthread_mutex_unlock(&rc.mu);
  struct tn_req *r[3] = {0};
  r[0] = submit(e, &rc, pb[0], 40, &bg);
  r[1] = submit(e, &rc, pb[1], 40, &bg);
  ASSERT(r[0] && r[1]);
  /* The hook reads g_bg on the engine thread under rc.mu; the engine may
   * already be stepping these requests. */
  pthread_mutex_lock(&rc.mu);
  g_bg[0] = r[0];
  g_bg[1] = r[1];
  pthread_mutex_unlock(&rc.mu);
  ASSERT(rec_wait_parked(&rc));
  pthread_mutex_lock(&rc.mu);
  rc.hook = NULL;
  int32_t parked_at = rc.n_steps;
  pthread_mutex_unlock(&rc.mu);
  r[2] = submit(e, &rc, pl, 40, &live);
  rec_open(&rc);
  bool done = wait_done(&rc, r, 3);
  struct out got[3];
  for (int i = 0; i < 3; i++)
    if (r[i]) collect(r[i], 0, &got[i]);
  tn_engine_close(e);
  ASSERT(r[2] != NULL);
  ASSERT(done);
  ASSERT_EQ(check_trace(&rc, 256, 2), 0);
  ASSERT_GT(rc.steps[rc.n_steps - 1].preemptions, 0);
  /* from the arrival on: live steps only, then background ones */
  int32_t last_live, first_bg;
  bg_order(&rc, parked_at, &last_live, &first_bg);
  ASSERT_GE(last_live, parked_at);
  ASSERT_GT(first_bg, last_live);
  for (int i = 0; i < 3; i++) {
    struct out want;
    ASSERT(run_alone(i < 2 ? pb[i] : pl, 40, i < 2 ? &bg : &live, &want));
    ASSERT(out_same("preempted background vs alone", &got[i], &want));
    tn_req_release(r[i]);
  }
  memset(g_bg, 0, sizeof(g_bg));
  rec_deinit(&rc);
}

/* Engines sharing a pool: background work on one waits while another
 * has a live request outstanding. */
static void test_background_other_engine(void) {
  struct tn_pool *pool = tn_pool_new(2);
  ASSERT(pool != NULL);
  struct rec ra, rb;
  rec_init(&ra);
  rec_init(&rb);
  struct eng_opts oa = {.max_seqs = 4, .step_tokens = 256, .gate = true,
                        .n_threads = 2, .pool = pool};
  struct eng_opts ob = {.max_seqs = 4, .step_tokens = 256, .n_threads = 2,
                        .pool = pool};
  struct tn_engine *a = eng_open(&ra, &oa), *b = eng_open(&rb, &ob);
  ASSERT(a && b);
  int32_t pl[20], pb[20];
  make_prompt(1400, pl, 20);
  make_prompt(1401, pb, 20);
  struct tn_gen_params live = greedy(8), bg = greedy(8);
  bg.background = true;
  struct tn_req *rl = submit(a, &ra, pl, 20, &live);
  ASSERT(rl != NULL);
  ASSERT(rec_wait_parked(&ra)); /* a's live request is outstanding */
  struct tn_req *rbg = submit(b, &rb, pb, 20, &bg);
  ASSERT(rbg != NULL);
  struct timespec ts = {0, 100 * 1000 * 1000};
  nanosleep(&ts, NULL);
  pthread_mutex_lock(&rb.mu);
  int32_t held_steps = rb.n_steps;
  pthread_mutex_unlock(&rb.mu);
  rec_open(&ra);
  bool done = wait_done(&ra, &rl, 1) && wait_done(&rb, &rbg, 1);
  struct out got;
  collect(rbg, 0, &got);
  double held = held_of(rbg);
  tn_req_release(rl);
  tn_req_release(rbg);
  tn_engine_close(a);
  tn_engine_close(b);
  tn_pool_free(pool);
  ASSERT(done);
  ASSERT_EQ(held_steps, 0);
  ASSERT(held >= 0.09);
  struct out want;
  ASSERT(run_alone(pb, 20, &bg, &want));
  ASSERT(out_same("background on another engine vs alone", &got, &want));
  rec_deinit(&ra);
  rec_deinit(&rb);
}

TN_TEST_MAIN(TN_TEST(test_model), TN_TEST(test_admission),
             TN_TEST(test_chunking), TN_TEST(test_decode_first), TN_TEST(test_decode_first_capped),
             TN_TEST(test_decode_first_spread),
             TN_TEST(test_preemption), TN_TEST(test_preemption_prefix),
             TN_TEST(test_prefix_reuse), TN_TEST(test_cancel),
             TN_TEST(test_close_inflight), TN_TEST(test_batch_invariance),
             TN_TEST(test_batch_shared_prefix), TN_TEST(test_n_choices),
             TN_TEST(test_background), TN_TEST(test_background_yields),
             TN_TEST(test_background_other_engine))
