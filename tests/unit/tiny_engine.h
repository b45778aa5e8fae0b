/*
 * tiny_engine.h: an engine on a tiny model the test writes itself, with a
 * recorder of every planned step (see test_sched.c's opening comment for
 * what it holds and the invariants check_trace knows). Shared by the
 * scheduler and speculation tests; static functions, one copy per test.
 */
#ifndef TN_TINY_ENGINE_H
#define TN_TINY_ENGINE_H

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


#pragma GCC diagnostic ignored "-Wunused-function"

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

/* Writes a tiny model to a new file in /tmp named into path[cap]: its
 * weights drawn from seed; other_vocab renames one merged token (same
 * count, another vocabulary). false (and a message) on failure. */
static bool tiny_model_write(uint64_t seed, bool other_vocab, char *path_out,
                             size_t cap) {
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
  static const char *const merged2[N_MERGES] = {"th", "the", ("\xC4\xA0" "a"),
                                                "in", "on"};
  static const char *const merges2[N_MERGES] = {"t h", "th e", "\xC4\xA0 a",
                                                "i n", "o n"};
  struct tn_str ms[N_MERGES];
  for (int i = 0; i < N_MERGES; i++) {
    const char *mt = other_vocab ? merged2[i] : merged[i];
    const char *mm = other_vocab ? merges2[i] : merges[i];
    toks[256 + i] = (struct tn_str){mt, strlen(mt)};
    types[256 + i] = 1;
    ms[i] = (struct tn_str){mm, strlen(mm)};
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
    return false;
  }
  snprintf(path_out, cap, "%s", path);
  return true;
}

/* Writes the model once; returns its path or NULL. */
static const char *model_path(void) {
  if (g_model_path[0]) return g_model_path;
  if (g_model_failed) return NULL;
  g_model_failed = true;
  if (!tiny_model_write(0x7e57ab1e, false, g_model_path,
                        sizeof(g_model_path)))
    return NULL;
  atexit(model_unlink);
  g_model_failed = false;
  return g_model_path;
}

/* ---- the step recorder */

struct rec_entry {
  const struct tn_req *req;
  int32_t choice, pos, n_tokens;
  int32_t n_draft;  /* drafted tokens among n_tokens (speculation) */
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
                                .n_draft = e->n_draft,
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
  struct tn_spec_config spec; /* method TN_SPEC_OFF (0) unless set */
  bool gate; /* start with the gate closed: the first step parks */
  float decode_slowdown; /* tn_engine_config's (0: off) */
  int32_t prompt_spread; /* tn_engine_config's (0: off) */
  int32_t max_loras;     /* tn_engine_config's (0: no limit) */
  struct tn_pool *pool;  /* a compute pool shared with other engines */
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
  cfg.decode_slowdown = o->decode_slowdown;
  cfg.prompt_spread = o->prompt_spread;
  cfg.max_loras = o->max_loras;
  cfg.pool = o->pool;
  if (o->spec.method != TN_SPEC_OFF) {
    cfg.spec = o->spec;
    if (!cfg.spec.max_tokens) cfg.spec.max_tokens = 8;
    if (!cfg.spec.ngram_min) cfg.spec.ngram_min = 2;
    if (!cfg.spec.ngram_max) cfg.spec.ngram_max = 4;
  }
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
 * prefix cache, nothing else in flight); all its choices, and the
 * engine's stats at the end when st is not NULL. */
static bool run_alone_stats(const int32_t *prompt, int32_t n,
                            const struct tn_gen_params *p, struct out *outs,
                            struct tn_engine_stats *st) {
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.no_prefix = true, .max_seqs = 16};
  struct tn_engine *e = eng_open(&rc, &o);
  struct tn_req *r = e ? submit(e, &rc, prompt, n, p) : NULL;
  bool ok = r && wait_done(&rc, &r, 1);
  if (ok) {
    for (int32_t c = 0; c < p->n; c++) collect(r, c, &outs[c]);
    if (st) tn_engine_stats(e, st);
  }
  if (r) tn_req_release(r);
  tn_engine_close(e);
  rec_deinit(&rc);
  return ok;
}

static bool run_alone(const int32_t *prompt, int32_t n,
                      const struct tn_gen_params *p, struct out *outs) {
  return run_alone_stats(prompt, n, p, outs, NULL);
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
      if (e->n_draft > 0 && !e->decode)
        VIOLATION("entry %d carries %d drafts but is no decode", i,
                  e->n_draft);
      if (e->decode) {
        if (seen_prompt)
          VIOLATION("decode entry %d after a prompt chunk", i);
        if (e->n_tokens != 1 + e->n_draft || e->n_gen < 1 ||
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
      } else if (tr[k].next_pos >= 0 && e->pos != tr[k].next_pos) {
        if (e->pos > tr[k].next_pos || e->pos % BLOCK != 0 ||
            st->preemptions == tr[k].preemptions)
          VIOLATION("entry %d at pos %d, expected %d (preemptions %" PRIu64
                    " then %" PRIu64 ")", i, e->pos, tr[k].next_pos,
                    tr[k].preemptions, st->preemptions);
      }
      /* after a verify pass the next position depends on how many
       * drafts were accepted: the decode check above covers it */
      tr[k].next_pos = e->n_draft > 0 ? -1 : e->pos + e->n_tokens;
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

#endif /* TN_TINY_ENGINE_H */
