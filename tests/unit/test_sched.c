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
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "gguf/gguf.h"
#include "kv/kv.h"
#include "tokenizer/tokenizer.h"
#include "tn_test.h"

/* ---- the tiny model */

#define N_EMBD 64
#define N_LAYER 2
#define N_HEAD 4
#define N_HEAD_KV 2
#define HEAD_DIM 16
#define N_FF 128
#define N_CTX_TRAIN 512
#define N_MERGES 5
#define TOK_IM_START (256 + N_MERGES)
#define TOK_IM_END (TOK_IM_START + 1)
#define N_VOCAB (TOK_IM_END + 1)
#define N_TEXT_TOKENS TOK_IM_START /* ids below are ordinary text */
#define BLOCK 16                   /* the engine's KV block size */

static char g_model_path[64];
static bool g_model_failed;

static bool quick(void) {
  const char *q = getenv("TN_TEST_QUICK");
  return q && *q && strcmp(q, "0") != 0;
}

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static float rng_sym(uint64_t *s) { /* uniform in [-1, 1) */
  return (float)((double)(rng_next(s) >> 11) * 0x1.0p-52 - 1.0);
}

/* GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for
 * themselves, the others for U+0100 upwards in byte order. */
static int byte_cp(int b) {
  bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) ||
                   (b >= 0xae && b <= 0xff);
  if (printable) return b;
  int n = 0;
  for (int c = 0; c < b; c++)
    n += !((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) ||
           (c >= 0xae && c <= 0xff));
  return 256 + n;
}

static size_t utf8_put(char *o, int cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  o[0] = (char)(0xc0 | (cp >> 6));
  o[1] = (char)(0x80 | (cp & 0x3f));
  return 2;
}

struct wtensor {
  char name[48];
  int64_t ne[2];
  uint32_t n_dims;
  float *data;
};

static const char k_chatml[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}";

static void model_unlink(void) {
  if (g_model_path[0]) unlink(g_model_path);
}

/* Writes the model once; returns its path or NULL. */
static const char *model_path(void) {
  if (g_model_path[0]) return g_model_path;
  if (g_model_failed) return NULL;
  g_model_failed = true;
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  if (!w) return NULL;
  bool ok = true;
#define KV(call) ok = ok && (call) == TN_OK
  KV(tn_gguf_writer_add_str(w, "general.architecture", "llama", 5));
  KV(tn_gguf_writer_add_str(w, "general.name", "tiny-sched", 10));
  KV(tn_gguf_writer_add_u32(w, "llama.embedding_length", N_EMBD));
  KV(tn_gguf_writer_add_u32(w, "llama.block_count", N_LAYER));
  KV(tn_gguf_writer_add_u32(w, "llama.feed_forward_length", N_FF));
  KV(tn_gguf_writer_add_u32(w, "llama.attention.head_count", N_HEAD));
  KV(tn_gguf_writer_add_u32(w, "llama.attention.head_count_kv", N_HEAD_KV));
  KV(tn_gguf_writer_add_u32(w, "llama.context_length", N_CTX_TRAIN));
  KV(tn_gguf_writer_add_f32(w, "llama.rope.freq_base", 10000.0f));
  KV(tn_gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon",
                            1e-5f));

  /* vocabulary: bytes, merges, control tokens */
  static char tok_text[N_VOCAB][16];
  struct tn_str toks[N_VOCAB];
  int32_t types[N_VOCAB];
  for (int b = 0; b < 256; b++) {
    size_t n = utf8_put(tok_text[b], byte_cp(b));
    toks[b] = (struct tn_str){tok_text[b], n};
    types[b] = 1;
  }
  /* "Ġ" is the space byte's stand-in (U+0120) */
  static const char *const merged[N_MERGES] = {"th", "the", ("\xC4\xA0" "a"),
                                               "in", "er"};
  static const char *const merges[N_MERGES] = {"t h", "th e", "\xC4\xA0 a",
                                               "i n", "e r"};
  struct tn_str ms[N_MERGES];
  for (int i = 0; i < N_MERGES; i++) {
    toks[256 + i] = (struct tn_str){merged[i], strlen(merged[i])};
    types[256 + i] = 1;
    ms[i] = (struct tn_str){merges[i], strlen(merges[i])};
  }
  toks[TOK_IM_START] = (struct tn_str){"<|im_start|>", 12};
  toks[TOK_IM_END] = (struct tn_str){"<|im_end|>", 10};
  types[TOK_IM_START] = types[TOK_IM_END] = 3; /* control */
  KV(tn_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2", 4));
  KV(tn_gguf_writer_add_str(w, "tokenizer.ggml.pre", "gpt2", 4));
  KV(tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", toks, N_VOCAB));
  KV(tn_gguf_writer_add_arr(w, "tokenizer.ggml.token_type",
                            TN_GGUF_TYPE_INT32, types, N_VOCAB));
  KV(tn_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", ms, N_MERGES));
  KV(tn_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", TOK_IM_START));
  KV(tn_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", TOK_IM_END));
  KV(tn_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", false));
  KV(tn_gguf_writer_add_str(w, "tokenizer.chat_template", k_chatml,
                            strlen(k_chatml)));
#undef KV

  /* weights: ne = {columns (inputs), rows (outputs)}; scale ~ 1/sqrt(in) */
  enum { N_T = 3 + 9 * N_LAYER };
  struct wtensor t[N_T];
  int nt = 0;
#define MAT(nm, cols, rows) \
  t[nt++] = (struct wtensor){.ne = {cols, rows}, .n_dims = 2}; \
  snprintf(t[nt - 1].name, sizeof(t[0].name), "%s", nm)
#define VEC(nm, n) \
  t[nt++] = (struct wtensor){.ne = {n, 1}, .n_dims = 1}; \
  snprintf(t[nt - 1].name, sizeof(t[0].name), "%s", nm)
  MAT("token_embd.weight", N_EMBD, N_VOCAB);
  VEC("output_norm.weight", N_EMBD);
  MAT("output.weight", N_EMBD, N_VOCAB);
  for (int il = 0; il < N_LAYER; il++) {
    char n[48];
#define L(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    VEC(L("attn_norm.weight"), N_EMBD);
    MAT(L("attn_q.weight"), N_EMBD, N_HEAD * HEAD_DIM);
    MAT(L("attn_k.weight"), N_EMBD, N_HEAD_KV * HEAD_DIM);
    MAT(L("attn_v.weight"), N_EMBD, N_HEAD_KV * HEAD_DIM);
    MAT(L("attn_output.weight"), N_HEAD * HEAD_DIM, N_EMBD);
    VEC(L("ffn_norm.weight"), N_EMBD);
    MAT(L("ffn_gate.weight"), N_EMBD, N_FF);
    MAT(L("ffn_up.weight"), N_EMBD, N_FF);
    MAT(L("ffn_down.weight"), N_FF, N_EMBD);
#undef L
  }
#undef MAT
#undef VEC
  uint64_t seed = 0x7e57ab1e;
  struct tn_error err = {0};
  for (int i = 0; i < nt && ok; i++) {
    size_t n = (size_t)(t[i].ne[0] * t[i].ne[1]);
    t[i].data = malloc(n * sizeof(float));
    if (!t[i].data) {
      ok = false;
      break;
    }
    float scale = sqrtf(3.0f / (float)t[i].ne[0]);
    if (strstr(t[i].name, "token_embd")) scale = 1.0f;
    if (strstr(t[i].name, "output.weight")) scale *= 4.0f; /* few ties */
    if (strstr(t[i].name, "attn_q") || strstr(t[i].name, "attn_k"))
      scale *= 2.0f; /* attention that depends on content */
    for (size_t k = 0; k < n; k++)
      t[i].data[k] = t[i].n_dims == 1 ? 1.0f + 0.1f * rng_sym(&seed)
                                      : scale * rng_sym(&seed);
    ok = tn_gguf_writer_add_tensor(w, t[i].name, TN_TYPE_F32, t[i].n_dims,
                                   t[i].ne, t[i].data, &err) == TN_OK;
  }
  char path[] = "/tmp/tn_sched_XXXXXX";
  int fd = ok ? mkstemp(path) : -1;
  if (fd >= 0) {
    close(fd);
    ok = tn_gguf_writer_write(w, path, &err) == TN_OK;
    if (!ok) unlink(path);
  } else {
    ok = false;
  }
  for (int i = 0; i < nt; i++) free(t[i].data);
  tn_gguf_writer_free(w);
  if (!ok) {
    fprintf(stderr, "cannot write the test model: %s\n", err.msg);
    return NULL;
  }
  snprintf(g_model_path, sizeof(g_model_path), "%s", path);
  atexit(model_unlink);
  g_model_failed = false;
  return g_model_path;
}

/* ---- the step recorder */

struct rec_entry {
  const struct tn_req *req;
  int32_t choice, pos, n_tokens;
  int32_t n_gen;    /* tokens the choice had generated when planned */
  int32_t n_prompt;
  bool decode;
};

struct rec_step {
  int32_t first, n; /* entries [first, first + n) */
  int32_t n_tokens, n_waiting, kv_available;
  uint64_t step, preemptions;
};

struct rec;
/* Runs on the engine thread under rc->mu once a step is recorded; true
 * parks the engine at the gate until rec_open(). It may cancel requests. */
typedef bool (*rec_hook_fn)(struct rec *rc, const struct rec_step *st,
                            const struct rec_entry *ents);

struct rec {
  pthread_mutex_t mu; /* guards everything below */
  pthread_cond_t cv;
  struct rec_step *steps;
  int32_t n_steps, cap_steps;
  struct rec_entry *ents;
  int32_t n_ents, cap_ents;
  uint64_t n_notify; /* notify calls so far */
  bool gate;         /* closed: the engine waits in on_step */
  bool parked;       /* the engine is waiting at the gate */
  rec_hook_fn hook;
  void *hook_user;
  bool oom;
};

static void rec_init(struct rec *rc) {
  memset(rc, 0, sizeof(*rc));
  pthread_mutex_init(&rc->mu, NULL);
  pthread_cond_init(&rc->cv, NULL);
}

static void rec_deinit(struct rec *rc) {
  free(rc->steps);
  free(rc->ents);
  pthread_cond_destroy(&rc->cv);
  pthread_mutex_destroy(&rc->mu);
}

static void on_step(void *user, const struct tn_step_trace *t) {
  struct rec *rc = user;
  struct rec_entry *tmp = calloc((size_t)t->n_entries + 1, sizeof(*tmp));
  for (int32_t i = 0; tmp && i < t->n_entries; i++) {
    const struct tn_step_entry *e = &t->entries[i];
    struct tn_req *r = (struct tn_req *)e->req;
    tn_req_lock(r);
    int32_t n_gen = r->choices[e->choice].n_gen;
    tn_req_unlock(r);
    tmp[i] = (struct rec_entry){.req = e->req, .choice = e->choice,
                                .pos = e->pos, .n_tokens = e->n_tokens,
                                .n_gen = n_gen, .n_prompt = r->n_prompt,
                                .decode = e->decode};
  }
  pthread_mutex_lock(&rc->mu);
  if (!tmp || rc->oom) {
    rc->oom = true;
  } else {
    if (rc->n_steps == rc->cap_steps) {
      int32_t cap = rc->cap_steps ? 2 * rc->cap_steps : 256;
      void *p = realloc(rc->steps, (size_t)cap * sizeof(*rc->steps));
      if (p) rc->steps = p, rc->cap_steps = cap;
    }
    while (rc->n_ents + t->n_entries > rc->cap_ents) {
      int32_t cap = rc->cap_ents ? 2 * rc->cap_ents : 1024;
      void *p = realloc(rc->ents, (size_t)cap * sizeof(*rc->ents));
      if (!p) break;
      rc->ents = p;
      rc->cap_ents = cap;
    }
    if (rc->n_steps < rc->cap_steps &&
        rc->n_ents + t->n_entries <= rc->cap_ents) {
      memcpy(rc->ents + rc->n_ents, tmp, (size_t)t->n_entries * sizeof(*tmp));
      struct rec_step *st = &rc->steps[rc->n_steps++];
      *st = (struct rec_step){.first = rc->n_ents, .n = t->n_entries,
                              .n_tokens = t->n_tokens,
                              .n_waiting = t->n_waiting,
                              .kv_available = t->kv_blocks_available,
                              .step = t->step,
                              .preemptions = t->preemptions};
      rc->n_ents += t->n_entries;
      if (rc->hook && rc->hook(rc, st, rc->ents + st->first)) rc->gate = true;
    } else {
      rc->oom = true;
    }
  }
  free(tmp);
  while (rc->gate) {
    rc->parked = true;
    pthread_cond_broadcast(&rc->cv);
    pthread_cond_wait(&rc->cv, &rc->mu);
  }
  rc->parked = false;
  pthread_mutex_unlock(&rc->mu);
}

static void on_notify(void *user) {
  struct rec *rc = user;
  pthread_mutex_lock(&rc->mu);
  rc->n_notify++;
  pthread_cond_broadcast(&rc->cv);
  pthread_mutex_unlock(&rc->mu);
}

static struct timespec deadline_in(double s) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  double ns = (double)ts.tv_nsec + s * 1e9;
  ts.tv_sec += (time_t)(ns / 1e9);
  ts.tv_nsec = (long)(ns - (double)(time_t)(ns / 1e9) * 1e9);
  return ts;
}

#define WAIT_S 300.0 /* generous: sanitizer builds on a loaded machine */

/* Waits until the engine is parked at the gate. */
static bool rec_wait_parked(struct rec *rc) {
  struct timespec dl = deadline_in(WAIT_S);
  pthread_mutex_lock(&rc->mu);
  int w = 0;
  while (!rc->parked && w == 0)
    w = pthread_cond_timedwait(&rc->cv, &rc->mu, &dl);
  bool ok = rc->parked;
  pthread_mutex_unlock(&rc->mu);
  if (!ok) fprintf(stderr, "timed out waiting for the engine to park\n");
  return ok;
}

static void rec_open(struct rec *rc) {
  pthread_mutex_lock(&rc->mu);
  rc->gate = false;
  rc->parked = false; /* so that a later rec_wait_parked waits anew */
  pthread_cond_broadcast(&rc->cv);
  pthread_mutex_unlock(&rc->mu);
}

static bool req_done(struct tn_req *r) {
  tn_req_lock(r);
  bool d = r->done;
  tn_req_unlock(r);
  return d;
}

/* Waits for every request to be done (NULL entries are skipped). */
static bool wait_done(struct rec *rc, struct tn_req *const *reqs, int n) {
  struct timespec dl = deadline_in(WAIT_S);
  for (;;) {
    pthread_mutex_lock(&rc->mu);
    uint64_t seen = rc->n_notify;
    pthread_mutex_unlock(&rc->mu);
    bool all = true;
    for (int i = 0; i < n && all; i++) all = !reqs[i] || req_done(reqs[i]);
    if (all) return true;
    pthread_mutex_lock(&rc->mu);
    int w = 0;
    while (rc->n_notify == seen && w == 0)
      w = pthread_cond_timedwait(&rc->cv, &rc->mu, &dl);
    pthread_mutex_unlock(&rc->mu);
    if (w != 0) {
      fprintf(stderr, "timed out waiting for %d requests\n", n);
      return false;
    }
  }
}

/* ---- engines, requests, outputs */

struct eng_opts {
  int32_t max_seqs, step_tokens, kv_blocks, n_threads, queue_max;
  bool no_prefix;
  bool gate; /* start with the gate closed: the first step parks */
};

static struct tn_engine *eng_open(struct rec *rc, const struct eng_opts *o) {
  const char *path = model_path();
  if (!path) return NULL;
  struct tn_engine_config cfg;
  tn_engine_config_default(&cfg);
  cfg.name = "tiny";
  cfg.n_threads = o->n_threads > 0 ? o->n_threads : 1;
  if (o->max_seqs) cfg.max_seqs = o->max_seqs;
  if (o->step_tokens) cfg.step_tokens = o->step_tokens;
  if (o->queue_max) cfg.queue_max = o->queue_max;
  if (o->kv_blocks)
    cfg.kv_bytes = (size_t)o->kv_blocks *
                   tn_kv_block_bytes(N_LAYER, BLOCK, N_HEAD_KV * HEAD_DIM);
  cfg.prefix_cache = !o->no_prefix;
  cfg.on_step = on_step;
  cfg.on_step_user = rc;
  rc->gate = o->gate;
  struct tn_engine *e = NULL;
  struct tn_error err = {0};
  if (tn_engine_open(path, &cfg, NULL, &e, &err) != TN_OK) {
    fprintf(stderr, "tn_engine_open: %s\n", err.msg);
    return NULL;
  }
  return e;
}

static struct tn_gen_params greedy(int32_t max_tokens) {
  struct tn_gen_params p;
  tn_gen_params_default(&p);
  p.sampling.temperature = 0.0f;
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  p.logprobs = true; /* records the token ids */
  return p;
}

static struct tn_req *submit(struct tn_engine *e, struct rec *rc,
                             const int32_t *prompt, int32_t n,
                             const struct tn_gen_params *p) {
  struct tn_req *r = NULL;
  struct tn_error err = {0};
  enum tn_status st =
      tn_engine_submit(e, prompt, n, p, on_notify, rc, &r, &err);
  if (st != TN_OK) {
    fprintf(stderr, "tn_engine_submit: %s: %s\n", tn_status_str(st), err.msg);
    return NULL;
  }
  return r;
}

#define OUT_MAX 160

struct out {
  enum tn_finish finish;
  int32_t n_gen, n_ids;
  int32_t ids[OUT_MAX];
  char text[1024];
  size_t len;
};

static void collect(struct tn_req *r, int32_t choice, struct out *o) {
  memset(o, 0, sizeof(*o));
  tn_req_lock(r);
  const struct tn_choice *c = &r->choices[choice];
  o->finish = c->finish;
  o->n_gen = c->n_gen;
  o->n_ids = TN_MIN(c->n_toks, OUT_MAX);
  for (int32_t i = 0; i < o->n_ids; i++) o->ids[i] = c->toks[i].id;
  o->len = TN_MIN(c->len, sizeof(o->text) - 1);
  if (o->len) memcpy(o->text, c->text, o->len);
  tn_req_unlock(r);
}

static void print_ids(const char *label, const struct out *o) {
  fprintf(stderr, "  %s (%s, %d generated):", label, tn_finish_str(o->finish),
          o->n_gen);
  for (int32_t i = 0; i < o->n_ids; i++) fprintf(stderr, " %d", o->ids[i]);
  fputc('\n', stderr);
}

/* Same finish, tokens and text; prints both when not. */
static bool out_same(const char *what, const struct out *got,
                     const struct out *want) {
  if (got->finish == want->finish && got->n_gen == want->n_gen &&
      got->n_ids == want->n_ids &&
      memcmp(got->ids, want->ids, (size_t)got->n_ids * sizeof(int32_t)) == 0 &&
      got->len == want->len && memcmp(got->text, want->text, got->len) == 0)
    return true;
  int32_t k = 0;
  while (k < got->n_ids && k < want->n_ids && got->ids[k] == want->ids[k]) k++;
  fprintf(stderr, "%s: outputs differ (first at token %d):\n", what, k);
  print_ids("got ", got);
  print_ids("want", want);
  return false;
}

/* The request run alone on a fresh engine with default settings (no
 * prefix cache, nothing else in flight); all its choices. */
static bool run_alone(const int32_t *prompt, int32_t n,
                      const struct tn_gen_params *p, struct out *outs) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.no_prefix = true, .max_seqs = 16};
  struct tn_engine *e = eng_open(&rc, &o);
  struct tn_req *r = e ? submit(e, &rc, prompt, n, p) : NULL;
  bool ok = r && wait_done(&rc, &r, 1);
  if (ok)
    for (int32_t c = 0; c < p->n; c++) collect(r, c, &outs[c]);
  if (r) tn_req_release(r);
  tn_engine_close(e);
  rec_deinit(&rc);
  return ok;
}

static void make_prompt(uint64_t seed, int32_t *out, int32_t n) {
  for (int32_t i = 0; i < n; i++)
    out[i] = (int32_t)(rng_next(&seed) % N_TEXT_TOKENS);
}

/* ---- trace analysis */

/* Index of (req, choice) in step s, or -1. */
static int32_t step_find(const struct rec *rc, int32_t s,
                         const struct tn_req *r, int32_t choice) {
  const struct rec_step *st = &rc->steps[s];
  for (int32_t i = 0; i < st->n; i++) {
    const struct rec_entry *e = &rc->ents[st->first + i];
    if (e->req == r && e->choice == choice) return i;
  }
  return -1;
}

static const struct rec_entry *step_entry(const struct rec *rc, int32_t s,
                                          int32_t i) {
  return &rc->ents[rc->steps[s].first + i];
}

/* First and last step holding (r, choice); -1 when never scheduled. */
static void seq_span(const struct rec *rc, const struct tn_req *r,
                     int32_t choice, int32_t *first, int32_t *last) {
  *first = *last = -1;
  for (int32_t s = 0; s < rc->n_steps; s++)
    if (step_find(rc, s, r, choice) >= 0) {
      if (*first < 0) *first = s;
      *last = s;
    }
}

/* Prints the recorded plan: one line per step, "req/choice@pos+n" per
 * entry, "d" for a decode, "g" with the count generated when planned. */
static void dump_trace(const struct rec *rc) {
  for (int32_t s = 0; s < rc->n_steps; s++) {
    const struct rec_step *st = &rc->steps[s];
    fprintf(stderr, "  step %d: %d tokens, %d waiting, %d blocks free, %" PRIu64
            " preemptions:", s, st->n_tokens, st->n_waiting, st->kv_available,
            st->preemptions);
    for (int32_t i = 0; i < st->n; i++) {
      const struct rec_entry *e = &rc->ents[st->first + i];
      fprintf(stderr, " %03x/%d@%d+%d%s g%d",
              (unsigned)(((uintptr_t)e->req >> 4) & 0xfff), e->choice, e->pos,
              e->n_tokens, e->decode ? "d" : "", e->n_gen);
    }
    fputc('\n', stderr);
  }
}

#define VIOLATION(...)                                         \
  do {                                                         \
    if (bad++ < 20) {                                          \
      fprintf(stderr, "trace step %d: ", s);                   \
      fprintf(stderr, __VA_ARGS__);                            \
      fputc('\n', stderr);                                     \
    }                                                          \
  } while (0)

/* The invariants of every step plan; returns the number of violations. */
static int check_trace(const struct rec *rc, int32_t step_tokens,
                       int32_t max_seqs) {
  struct track {
    const struct tn_req *req;
    int32_t choice, next_pos;
    uint64_t preemptions;
  } *tr = calloc((size_t)rc->n_ents + 1, sizeof(*tr));
  int32_t n_tr = 0, bad = 0;
  if (!tr || rc->oom) {
    fprintf(stderr, "trace recorder ran out of memory\n");
    free(tr);
    return 1;
  }
  for (int32_t s = 0; s < rc->n_steps; s++) {
    const struct rec_step *st = &rc->steps[s];
    if ((int64_t)st->step != s)
      VIOLATION("numbered %" PRIu64, st->step);
    int32_t sum = 0;
    bool seen_prompt = false;
    if (st->n < 1 || st->n > max_seqs)
      VIOLATION("%d sequences (max_seqs %d)", st->n, max_seqs);
    for (int32_t i = 0; i < st->n; i++) {
      const struct rec_entry *e = step_entry(rc, s, i);
      sum += e->n_tokens;
      if (e->n_tokens < 1) VIOLATION("entry %d runs %d tokens", i, e->n_tokens);
      for (int32_t j = 0; j < i; j++) {
        const struct rec_entry *o = step_entry(rc, s, j);
        if (o->req == e->req && o->choice == e->choice)
          VIOLATION("entries %d and %d are one sequence", j, i);
      }
      if (e->decode) {
        if (seen_prompt)
          VIOLATION("decode entry %d after a prompt chunk", i);
        if (e->n_tokens != 1 || e->n_gen < 1 ||
            e->pos != e->n_prompt + e->n_gen - 1)
          VIOLATION("decode entry %d: pos %d, %d tokens, prompt %d, %d "
                    "generated", i, e->pos, e->n_tokens, e->n_prompt,
                    e->n_gen);
      } else {
        seen_prompt = true;
        if (e->pos + e->n_tokens > e->n_prompt + e->n_gen)
          VIOLATION("chunk entry %d: pos %d + %d tokens past prompt %d + "
                    "%d generated", i, e->pos, e->n_tokens, e->n_prompt,
                    e->n_gen);
      }
      /* positions: contiguous, or a restart at a block boundary after a
       * preemption */
      int32_t k = 0;
      while (k < n_tr && !(tr[k].req == e->req && tr[k].choice == e->choice))
        k++;
      if (k == n_tr) {
        tr[n_tr++] = (struct track){e->req, e->choice, 0, st->preemptions};
        if (e->pos % BLOCK != 0)
          VIOLATION("entry %d starts at pos %d, not a block boundary", i,
                    e->pos);
      } else if (e->pos != tr[k].next_pos) {
        if (e->pos > tr[k].next_pos || e->pos % BLOCK != 0 ||
            st->preemptions == tr[k].preemptions)
          VIOLATION("entry %d at pos %d, expected %d (preemptions %" PRIu64
                    " then %" PRIu64 ")", i, e->pos, tr[k].next_pos,
                    tr[k].preemptions, st->preemptions);
      }
      tr[k].next_pos = e->pos + e->n_tokens;
      tr[k].preemptions = st->preemptions;
    }
    if (sum != st->n_tokens)
      VIOLATION("n_tokens %d, entries sum to %d", st->n_tokens, sum);
    if (st->n_tokens > step_tokens)
      VIOLATION("%d tokens over the budget of %d", st->n_tokens, step_tokens);
    if (s > 0 && st->preemptions < rc->steps[s - 1].preemptions)
      VIOLATION("preemptions went down");
  }
  free(tr);
  const char *env = getenv("TN_TEST_TRACE");
  if (bad || (env && *env && strcmp(env, "0") != 0)) dump_trace(rc);
  return bad;
}

/* Without the prefix cache, and when every admitted sequence is in every
 * step, the blocks in use after planning are exactly those covering each
 * entry's positions: anything a finished, cancelled or preempted sequence
 * still held would show here. */
static int check_blocks(const struct rec *rc, int32_t n_blocks) {
  int bad = 0;
  for (int32_t s = 0; s < rc->n_steps; s++) {
    const struct rec_step *st = &rc->steps[s];
    int32_t held = 0;
    for (int32_t i = 0; i < st->n; i++) {
      const struct rec_entry *e = step_entry(rc, s, i);
      held += (e->pos + e->n_tokens + BLOCK - 1) / BLOCK;
    }
    if (st->kv_available != n_blocks - held)
      VIOLATION("%d blocks available, expected %d - %d", st->kv_available,
                n_blocks, held);
  }
  if (bad) dump_trace(rc);
  return bad;
}

static void stats_print(const struct tn_engine_stats *s) {
  fprintf(stderr, "  stats: running %d waiting %d kv used %d cached %d/%d\n",
          s->running, s->waiting, s->kv_blocks_used, s->kv_blocks_cached,
          s->kv_blocks_total);
}

/* Nothing held once every request is done. A request is marked done
 * during the step that finishes it, while the engine's stats are updated
 * at the end of that step: poll until they catch up. */
static bool engine_idle(struct tn_engine *e, bool no_cache) {
  struct tn_engine_stats s;
  double until = tn_time_s() + 30.0;
  for (;;) {
    tn_engine_stats(e, &s);
    if (s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 &&
        (!no_cache || s.kv_blocks_cached == 0))
      return true;
    if (tn_time_s() > until) break;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  fprintf(stderr, "engine still holds something:\n");
  stats_print(&s);
  return false;
}

/* ---- tests */

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
  struct tn_chat_msg msg = {"user", "hi", 2};
  ASSERT_EQ(tn_engine_encode_chat(e, &msg, 1, &ids, &n, &err), TN_OK);
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
static void test_decode_first(void) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.max_seqs = 4, .step_tokens = 32, .gate = true};
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
  ASSERT_EQ(check_trace(&rc, 32, 4), 0);

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
    /* the chunk takes what the two decodes leave */
    if (covered < 150) ASSERT_EQ(step_entry(&rc, s, ic)->n_tokens, 30);
  }
  ASSERT_EQ(covered, 150);
  ASSERT_EQ(n_chunk_steps, 5);
  const int32_t *pr[3] = {pa, pb, pc};
  for (int i = 0; i < 3; i++) {
    struct out want;
    ASSERT(run_alone(pr[i], r[i]->n_prompt, i < 2 ? &pd : &pl, &want));
    ASSERT(out_same("decode-first vs alone", &got[i], &want));
    tn_req_release(r[i]);
  }
  rec_deinit(&rc);
}

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

TN_TEST_MAIN(TN_TEST(test_model), TN_TEST(test_admission),
             TN_TEST(test_chunking), TN_TEST(test_decode_first),
             TN_TEST(test_preemption), TN_TEST(test_preemption_prefix),
             TN_TEST(test_prefix_reuse), TN_TEST(test_cancel),
             TN_TEST(test_close_inflight), TN_TEST(test_batch_invariance),
             TN_TEST(test_batch_shared_prefix), TN_TEST(test_n_choices))
