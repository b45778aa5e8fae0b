/*
 * test_lora.c: LoRA adapters on the tiny model (tiny_engine.h).
 *
 * - A LoRA GGUF (llama.cpp's layout) and the same adapter as a PEFT
 *   directory (Hugging Face row order for q/k, safetensors written here)
 *   load to the same weights, bit for bit.
 * - The forward pass with an adapter equals a reference computed here:
 *   the base's logits with the adapter merged into f32 copies of the
 *   weights are within float rounding of the modular ones.
 * - Batch invariance: requests on two adapters and the base, run together
 *   (and with the prefix cache, and under preemption), give each the answer
 *   it gets alone; an adapter changes the answer.
 * - Bad files: each refused with a message naming the problem.
 */
#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <sys/stat.h>

#include "model/lora.h"
#include "tiny_engine.h"

#define RANK 4
#define Q_DIM (N_HEAD * HEAD_DIM)
#define KV_DIM (N_HEAD_KV * HEAD_DIM)

static const char *const k_gguf_t[7] = {"attn_q", "attn_k", "attn_v",
                                        "attn_output", "ffn_gate", "ffn_up",
                                        "ffn_down"};
static const char *const k_peft_t[7] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
    "mlp.down_proj"};

static void target_shape(int t, int64_t *in, int64_t *out) {
  static const int64_t ins[7] = {N_EMBD, N_EMBD, N_EMBD, Q_DIM,
                                 N_EMBD, N_EMBD, N_FF};
  static const int64_t outs[7] = {Q_DIM, KV_DIM, KV_DIM, N_EMBD,
                                  N_FF,  N_FF,   N_EMBD};
  *in = ins[t];
  *out = outs[t];
}

/* One adapter's weights, GGUF order: a[il][t] is [RANK][in], b [out][RANK]. */
struct adapter {
  float *a[N_LAYER][7], *b[N_LAYER][7];
  float alpha;
};

static void adapter_make(struct adapter *ad, uint64_t seed, float size) {
  ad->alpha = 8.0f;
  for (int il = 0; il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      int64_t in, out;
      target_shape(t, &in, &out);
      ad->a[il][t] = malloc((size_t)(RANK * in) * sizeof(float));
      ad->b[il][t] = malloc((size_t)(RANK * out) * sizeof(float));
      for (int64_t i = 0; i < RANK * in; i++)
        ad->a[il][t][i] = sqrtf(3.0f / (float)in) * rng_sym(&seed);
      for (int64_t i = 0; i < RANK * out; i++)
        ad->b[il][t][i] = size * rng_sym(&seed);
    }
}

static void adapter_free(struct adapter *ad) {
  for (int il = 0; il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      free(ad->a[il][t]);
      free(ad->b[il][t]);
    }
}

/* Options for writing a deliberately broken file. */
struct gguf_opts {
  const char *arch, *type, *adapter_type;
  bool drop_b;        /* blk.0.attn_q's lora_b missing */
  bool bad_shape;     /* blk.0.ffn_up's A one column short */
  bool nan;           /* a NaN in blk.1.attn_v's B */
  bool extra_norm;    /* a norm tensor */
  bool embd;          /* token_embd's pair */
  int rank;           /* 0: RANK */
};

static bool write_gguf(struct adapter *ad, const struct gguf_opts *o,
                       const char *path) {
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  bool ok = w != NULL;
  const char *arch = o->arch ? o->arch : "llama";
  const char *type = o->type ? o->type : "adapter";
  const char *at = o->adapter_type ? o->adapter_type : "lora";
  ok = ok && !tn_gguf_writer_add_str(w, "general.architecture", arch, strlen(arch));
  ok = ok && !tn_gguf_writer_add_str(w, "general.type", type, strlen(type));
  ok = ok && !tn_gguf_writer_add_str(w, "adapter.type", at, strlen(at));
  ok = ok && !tn_gguf_writer_add_f32(w, "adapter.lora.alpha", ad->alpha);
  struct tn_error err = {0};
  int rank = o->rank ? o->rank : RANK;
  float *bigs[N_LAYER * 7] = {0}, nan_saved = 0;
  int n_big = 0;
  for (int il = 0; ok && il < N_LAYER; il++)
    for (int t = 0; ok && t < 7; t++) {
      int64_t in, out;
      target_shape(t, &in, &out);
      char name[96];
      const float *a = ad->a[il][t], *b = ad->b[il][t];
      if (rank != RANK) { /* the same adapter, zero padded to rank (kept
                             until the write: the writer reads it then) */
        float *big = calloc((size_t)(rank * (in + out)), sizeof(float));
        if (!big) return false;
        bigs[n_big++] = big;
        memcpy(big, a, (size_t)(RANK * in) * sizeof(float));
        for (int64_t o2 = 0; o2 < out; o2++)
          memcpy(big + rank * in + o2 * rank, b + o2 * RANK, RANK * sizeof(float));
        a = big;
        b = big + rank * in;
      }
      int64_t ne_a[2] = {in - (o->bad_shape && il == 0 && t == 5), rank};
      int64_t ne_b[2] = {rank, out};
      if (o->nan && il == 1 && t == 2) {
        nan_saved = ad->b[il][t][3];
        ad->b[il][t][3] = NAN; /* (the writer reads it at write time) */
      }
      snprintf(name, sizeof(name), "blk.%d.%s.weight.lora_a", il, k_gguf_t[t]);
      ok = !tn_gguf_writer_add_tensor(w, name, TN_TYPE_F32, 2, ne_a, a, &err);
      snprintf(name, sizeof(name), "blk.%d.%s.weight.lora_b", il, k_gguf_t[t]);
      if (ok && !(o->drop_b && il == 0 && t == 0))
        ok = !tn_gguf_writer_add_tensor(w, name, TN_TYPE_F32, 2, ne_b, b, &err);
    }
  /* (static: the writer reads tensor data when it writes) */
  static const float zeros[RANK * N_EMBD];
  if (ok && o->extra_norm) {
    int64_t ne[2] = {N_EMBD, 1};
    ok = !tn_gguf_writer_add_tensor(w, "blk.0.attn_norm_norm.weight",
                                    TN_TYPE_F32, 1, ne, zeros, &err);
  }
  if (ok && o->embd) {
    int64_t ne[2] = {N_EMBD, RANK};
    ok = !tn_gguf_writer_add_tensor(w, "token_embd.weight.lora_a", TN_TYPE_F32,
                                    2, ne, zeros, &err) &&
         !tn_gguf_writer_add_tensor(w, "token_embd.weight.lora_b", TN_TYPE_F32,
                                    2, ne, zeros, &err);
  }
  ok = ok && !tn_gguf_writer_write(w, path, &err);
  if (o->nan) ad->b[1][2][3] = nan_saved;
  tn_gguf_writer_free(w);
  for (int i = 0; i < n_big; i++) free(bigs[i]);
  if (!ok) fprintf(stderr, "write_gguf: %s\n", err.msg);
  return ok;
}

/* HF row order of a llama q/k projection: HF row h*hd + j*hd/2 + i holds
 * GGUF row h*hd + 2i + j. */
static void to_hf_rows(const float *gguf_b, float *hf_b, int64_t out,
                       int n_head) {
  int64_t hd = out / n_head;
  for (int h = 0; h < n_head; h++)
    for (int64_t i = 0; i < hd / 2; i++)
      for (int j = 0; j < 2; j++)
        memcpy(hf_b + (h * hd + j * (hd / 2) + i) * RANK,
               gguf_b + (h * hd + 2 * i + j) * RANK, RANK * sizeof(float));
}

static bool write_file(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f) return false;
  bool ok = fwrite(data, 1, n, f) == n;
  return fclose(f) == 0 && ok;
}

/* A PEFT directory holding the same adapter; config_extra goes into
 * adapter_config.json, lie makes the first tensor's offsets overrun. */
static bool write_peft(const struct adapter *ad, const char *dir,
                       const char *config_extra, bool lie) {
  mkdir(dir, 0755);
  char path[512], cfg[1024];
  snprintf(cfg, sizeof(cfg),
           "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": %g, "
           "\"bias\": \"none\", \"target_modules\": [\"q_proj\"]%s}",
           RANK, (double)ad->alpha, config_extra ? config_extra : "");
  snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
  if (!write_file(path, cfg, strlen(cfg))) return false;
  /* header and data: every tensor F32 */
  size_t cap = 1 << 16, hn = 0, dn = 0;
  char *hdr = malloc(cap);
  size_t dcap = 0;
  for (int il = 0; il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      int64_t in, out;
      target_shape(t, &in, &out);
      dcap += (size_t)(RANK * (in + out)) * 4;
    }
  uint8_t *data = malloc(dcap);
  hn += (size_t)snprintf(hdr + hn, cap - hn, "{\"__metadata__\":{\"format\":\"pt\"}");
  float tmp[N_FF * RANK];
  for (int il = 0; il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      int64_t in, out;
      target_shape(t, &in, &out);
      for (int half = 0; half < 2; half++) {
        const float *src = half ? ad->b[il][t] : ad->a[il][t];
        int64_t rows = half ? out : RANK, cols = half ? RANK : in;
        if (half && t < 2) {
          to_hf_rows(src, tmp, out, t == 0 ? N_HEAD : N_HEAD_KV);
          src = tmp;
        }
        size_t nb = (size_t)(rows * cols) * 4;
        size_t end = dn + nb + (lie && hn < 40 ? 4096 : 0);
        hn += (size_t)snprintf(
            hdr + hn, cap - hn,
            ",\"base_model.model.model.layers.%d.%s.lora_%c.weight\":"
            "{\"dtype\":\"F32\",\"shape\":[%" PRId64 ",%" PRId64
            "],\"data_offsets\":[%zu,%zu]}",
            il, k_peft_t[t], half ? 'B' : 'A', rows, cols, dn, end);
        memcpy(data + dn, src, nb);
        dn += nb;
      }
    }
  hn += (size_t)snprintf(hdr + hn, cap - hn, "}");
  snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
  FILE *f = fopen(path, "wb");
  bool ok = f != NULL;
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)hn >> (8 * i));
  ok = ok && fwrite(len, 1, 8, f) == 8 && fwrite(hdr, 1, hn, f) == hn &&
       fwrite(data, 1, dn, f) == dn;
  if (f) ok = fclose(f) == 0 && ok;
  free(hdr);
  free(data);
  return ok;
}

static void rm_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char p[600];
  while ((e = readdir(d)))
    if (e->d_name[0] != '.') {
      snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
      unlink(p);
    }
  closedir(d);
  rmdir(dir);
}

static struct tn_model *tiny_model(void) {
  const char *path = model_path();
  struct tn_model *m = NULL;
  struct tn_error err = {0};
  if (!path || tn_model_load(path, &m, &err)) {
    fprintf(stderr, "tiny model: %s\n", err.msg);
    return NULL;
  }
  return m;
}

static void test_gguf_equals_peft(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter ad;
  adapter_make(&ad, 11, 0.3f);
  char gpath[] = "/tmp/tn_lora_XXXXXX";
  int fd = mkstemp(gpath);
  ASSERT(fd >= 0);
  close(fd);
  char dir[64];
  snprintf(dir, sizeof(dir), "%s.peft", gpath);
  struct gguf_opts go = {0};
  bool ok = write_gguf(&ad, &go, gpath) && write_peft(&ad, dir, NULL, false);
  struct tn_lora *lg = NULL, *lp = NULL;
  struct tn_error err = {0};
  if (ok && tn_lora_load(m, gpath, &lg, &err)) {
    fprintf(stderr, "gguf: %s\n", err.msg);
    ok = false;
  }
  if (ok && tn_lora_load(m, dir, &lp, &err)) {
    fprintf(stderr, "peft: %s\n", err.msg);
    ok = false;
  }
  bool same = ok;
  for (int i = 0; ok && i < N_LAYER * TN_LORA_N_TARGETS; i++) {
    const struct tn_lora_mat *a = &lg->mats[i], *b = &lp->mats[i];
    size_t na = (size_t)(a->rank * a->n_in), nb = (size_t)(a->rank * a->n_out);
    same = same && a->rank == RANK && b->rank == RANK &&
           a->scale == b->scale && a->scale == ad.alpha / RANK &&
           !memcmp(a->a, b->a, na * 4) && !memcmp(a->b, b->b, nb * 4);
    /* and the GGUF's values as written (B kept transposed) */
    int il = i / TN_LORA_N_TARGETS, t = i % TN_LORA_N_TARGETS;
    same = same && !memcmp(a->a, ad.a[il][t], na * 4);
    for (int64_t o = 0; same && o < a->n_out; o++)
      for (int k = 0; k < RANK; k++)
        same = a->b[k * a->n_out + o] == ad.b[il][t][o * RANK + k];
  }
  if (ok) {
    ASSERT_EQ(lg->n_mats, N_LAYER * 7);
    ASSERT_EQ(lg->max_rank, RANK);
    ASSERT(lg->id != lp->id);
    ASSERT(tn_lora_salt(lg, 1.0f) != tn_lora_salt(lp, 1.0f));
    ASSERT(tn_lora_salt(lg, 1.0f) != tn_lora_salt(lg, 0.5f));
    ASSERT_EQ(tn_lora_salt(NULL, 1.0f), 0);
  }
  tn_lora_release(lg);
  tn_lora_release(lp);
  unlink(gpath);
  rm_dir(dir);
  adapter_free(&ad);
  tn_model_free(m);
  ASSERT(ok);
  ASSERT(same);
}

/* Modular logits against the base with B A merged into f32 weights: the
 * tiny model's weights are F32, so the merged model is exact up to float
 * rounding. */
static void forward_matches_merged(int rank) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter ad;
  adapter_make(&ad, 23, 0.2f * (float)rank / RANK); /* same effect */
  char gpath[] = "/tmp/tn_lora_XXXXXX";
  int fd = mkstemp(gpath);
  ASSERT(fd >= 0);
  close(fd);
  struct gguf_opts go = {.rank = rank}; /* past RANK: zero padded */
  struct tn_lora *l = NULL;
  struct tn_error err = {0};
  bool ok = write_gguf(&ad, &go, gpath) && !tn_lora_load(m, gpath, &l, &err);
  unlink(gpath);
  if (!ok) fprintf(stderr, "load: %s\n", err.msg);
  /* merged weights: w + s * scale * B A, into private copies */
  const float s = 0.75f;
  float *merged[N_LAYER][7] = {{0}};
  struct tn_mat saved[N_LAYER][7];
  for (int il = 0; ok && il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + t];
      struct tn_layer *L = &m->layers[il];
      struct tn_mat *w = t == 0 ? &L->wq : t == 1 ? &L->wk : t == 2 ? &L->wv
                       : t == 3 ? &L->wo : t == 4 ? &L->w_gate
                       : t == 5 ? &L->w_up : &L->w_down;
      saved[il][t] = *w;
      float *nw = malloc((size_t)(w->n_rows * w->n_cols) * sizeof(float));
      for (int64_t r = 0; r < w->n_rows; r++)
        for (int64_t c = 0; c < w->n_cols; c++) {
          double d = 0;
          for (int k = 0; k < lm->rank; k++)
            d += (double)(lm->rank < 64 ? lm->b[k * lm->n_out + r]
                                        : lm->b[r * lm->rank + k]) *
                 lm->a[k * lm->n_in + c];
          nw[r * w->n_cols + c] =
              ((const float *)w->data)[r * w->n_cols + c] +
              (float)(s * lm->scale * d);
        }
      merged[il][t] = nw;
    }
  struct tn_pool *pool = tn_pool_new(1);
  struct tn_kv_pool *kv = NULL;
  struct tn_ctx *c = NULL;
  int32_t n = 12, toks[12], pos[12], sq[12];
  bool lg[12];
  float modular[N_VOCAB], base_l[N_VOCAB], merged_l[N_VOCAB];
  for (int i = 0; i < n; i++) {
    toks[i] = (i * 37 + 5) % N_TEXT_TOKENS;
    pos[i] = i;
    sq[i] = 0;
    lg[i] = i == n - 1;
  }
  ok = ok && pool &&
       !tn_kv_pool_new(N_LAYER, 8, BLOCK, KV_DIM, &kv, &err) &&
       !tn_ctx_new(m, pool, 32, 64, 4, &c, &err);
  for (int pass = 0; ok && pass < 3; pass++) {
    struct tn_kv_seq ks;
    tn_kv_seq_init(&ks);
    struct tn_kv_seq *seqs[1] = {&ks};
    const struct tn_lora *ls[1] = {pass == 0 ? l : NULL};
    float sc[1] = {s};
    if (pass == 2)
      for (int il = 0; il < N_LAYER; il++)
        for (int t = 0; t < 7; t++) {
          struct tn_layer *L = &m->layers[il];
          struct tn_mat *w = t == 0 ? &L->wq : t == 1 ? &L->wk : t == 2 ? &L->wv
                           : t == 3 ? &L->wo : t == 4 ? &L->w_gate
                           : t == 5 ? &L->w_up : &L->w_down;
          w->data = merged[il][t];
        }
    struct tn_batch b = {.n_tokens = n, .token = toks, .pos = pos, .seq = sq,
                         .logits = lg, .n_seqs = 1, .seqs = seqs,
                         .lora = ls, .lora_scale = sc};
    ok = !tn_kv_seq_reserve(kv, &ks, n) && !tn_model_forward(c, kv, &b, &err);
    if (ok)
      memcpy(pass == 0 ? modular : pass == 1 ? base_l : merged_l,
             tn_ctx_logits(c), sizeof(modular));
    tn_kv_seq_deinit(kv, &ks);
  }
  for (int il = 0; il < N_LAYER; il++)
    for (int t = 0; t < 7; t++) {
      if (merged[il][t]) {
        struct tn_layer *L = &m->layers[il];
        struct tn_mat *w = t == 0 ? &L->wq : t == 1 ? &L->wk : t == 2 ? &L->wv
                         : t == 3 ? &L->wo : t == 4 ? &L->w_gate
                         : t == 5 ? &L->w_up : &L->w_down;
        *w = saved[il][t];
      }
      free(merged[il][t]);
    }
  /* tn_lora_merge (merged mode) gives the reference merge's logits */
  double max_m = 0;
  struct tn_model *m2 = ok ? tiny_model() : NULL;
  struct tn_ctx *c2 = NULL;
  ok = ok && m2 && !tn_lora_merge(m2, l, s, TN_TYPE_COUNT, &err) &&
       !tn_ctx_new(m2, pool, 32, 64, 4, &c2, &err);
  if (ok) {
    struct tn_kv_seq ks;
    tn_kv_seq_init(&ks);
    struct tn_kv_seq *seqs[1] = {&ks};
    struct tn_batch b = {.n_tokens = n, .token = toks, .pos = pos, .seq = sq,
                         .logits = lg, .n_seqs = 1, .seqs = seqs};
    ok = !tn_kv_seq_reserve(kv, &ks, n) && !tn_model_forward(c2, kv, &b, &err);
    for (int v = 0; ok && v < N_VOCAB; v++)
      max_m = fmax(max_m, fabs((double)tn_ctx_logits(c2)[v] - merged_l[v]));
    tn_kv_seq_deinit(kv, &ks);
  }
  tn_ctx_free(c2);
  tn_model_free(m2);
  double max_d = 0, max_base = 0;
  for (int v = 0; ok && v < N_VOCAB; v++) {
    max_d = fmax(max_d, fabs((double)modular[v] - merged_l[v]));
    max_base = fmax(max_base, fabs((double)modular[v] - base_l[v]));
  }
  tn_ctx_free(c);
  tn_kv_pool_free(kv);
  tn_pool_free(pool);
  tn_lora_release(l);
  adapter_free(&ad);
  tn_model_free(m);
  if (!ok) fprintf(stderr, "forward: %s\n", err.msg);
  ASSERT(ok);
  /* the adapter moves logits by O(1); merged and modular agree to float
   * rounding (f16 activations in the KV cache bound it) */
  ASSERT(max_base > 0.5);
  ASSERT(max_d < 2e-2);
  ASSERT(max_m < 2e-2);
}

/* rank 4: short dots over B transposed; rank 64: tn_attn_dot rows */
static void test_forward_matches_merged(void) {
  forward_matches_merged(RANK);
  forward_matches_merged(64);
}

/* Requests on two adapters and the base, together, each = alone. */
/* An adapter unloaded while its request runs: the request finishes on it
 * (same answer), the name is gone at once. */
static void test_unload_while_running(void) {
  struct adapter ad;
  adapter_make(&ad, 9, 0.4f);
  char p[] = "/tmp/tn_lora_XXXXXX";
  close(mkstemp(p));
  struct gguf_opts go = {0};
  ASSERT(write_gguf(&ad, &go, p));
  int32_t prompt[20];
  make_prompt(77, prompt, 20);
  struct out ref, got;
  struct rec rc;
  rec_init(&rc);
  struct eng_opts o = {.no_prefix = true, .gate = false};
  struct tn_engine *e = eng_open(&rc, &o);
  struct tn_error err = {0};
  bool ok = e && !tn_adapters_load(tn_engine_adapters(e), "x", p, 1.0f, &err);
  struct tn_gen_params g = greedy(40);
  g.lora = ok ? tn_adapters_get(tn_engine_adapters(e), "x", NULL) : NULL;
  struct tn_req *r = ok ? submit(e, &rc, prompt, 20, &g) : NULL;
  ok = r && wait_done(&rc, &r, 1);
  if (ok) collect(r, 0, &ref);
  if (r) tn_req_release(r);
  r = ok ? submit(e, &rc, prompt, 20, &g) : NULL;
  tn_lora_release(g.lora); /* the request holds its own */
  ok = r && !tn_adapters_unload(tn_engine_adapters(e), "x", &err) &&
       !tn_adapters_get(tn_engine_adapters(e), "x", NULL);
  ok = ok && wait_done(&rc, &r, 1);
  if (ok) collect(r, 0, &got);
  if (r) tn_req_release(r);
  tn_engine_close(e);
  rec_deinit(&rc);
  unlink(p);
  adapter_free(&ad);
  ASSERT(ok);
  ASSERT(out_same("after unload", &got, &ref));
}

/* max_loras 1: no step mixes two adapters (the base may join any), the
 * requests held back run later, every answer is its answer alone. */
static void test_max_loras(void) {
  struct adapter a1, a2;
  adapter_make(&a1, 5, 0.4f);
  adapter_make(&a2, 6, 0.4f);
  char p1[] = "/tmp/tn_lora_XXXXXX", p2[] = "/tmp/tn_lora_XXXXXX";
  close(mkstemp(p1));
  close(mkstemp(p2));
  struct gguf_opts go = {0};
  bool ok = write_gguf(&a1, &go, p1) && write_gguf(&a2, &go, p2);
  enum { N = 8, PLEN = 24, GEN = 12 };
  int32_t prompts[N][PLEN];
  for (int i = 0; i < N; i++) make_prompt(300 + (uint64_t)i, prompts[i], PLEN);
  struct out ref[N], got[N];
  int which[N];
  struct tn_req *reqs[N] = {0};
  for (int pass = 0; ok && pass < 2; pass++) {
    struct rec rc;
    rec_init(&rc);
    struct eng_opts o = {.no_prefix = true, .max_seqs = 16,
                         .max_loras = pass == 1 ? 1 : 0, .gate = pass == 1};
    struct tn_engine *e = eng_open(&rc, &o);
    struct tn_error err = {0};
    ok = e && !tn_adapters_load(tn_engine_adapters(e), "one", p1, 1.0f, &err) &&
         !tn_adapters_load(tn_engine_adapters(e), "two", p2, 1.0f, &err);
    for (int i = 0; ok && i < N; i++) {
      which[i] = i % 3; /* 0 base, 1 one, 2 two */
      struct tn_gen_params g = greedy(GEN);
      g.lora = which[i] ? tn_adapters_get(tn_engine_adapters(e),
                                          which[i] == 1 ? "one" : "two", NULL)
                        : NULL;
      reqs[i] = submit(e, &rc, prompts[i], PLEN, &g);
      tn_lora_release(g.lora);
      ok = reqs[i] != NULL;
      if (ok && pass == 0) {
        ok = wait_done(&rc, &reqs[i], 1);
        if (ok) collect(reqs[i], 0, &ref[i]);
      }
    }
    if (ok && pass == 1) {
      if (rec_wait_parked(&rc)) rec_open(&rc);
      ok = wait_done(&rc, reqs, N);
      for (int i = 0; ok && i < N; i++) {
        collect(reqs[i], 0, &got[i]);
        if (!out_same("max_loras 1", &got[i], &ref[i])) ok = false;
      }
      /* no step holds both adapters; some step held one with the base */
      bool mixed_base = false;
      pthread_mutex_lock(&rc.mu);
      for (int32_t st = 0; ok && st < rc.n_steps; st++) {
        bool has[3] = {false, false, false};
        for (int32_t k = 0; k < rc.steps[st].n; k++) {
          const struct rec_entry *en = &rc.ents[rc.steps[st].first + k];
          for (int i = 0; i < N; i++)
            if (en->req == reqs[i]) has[which[i]] = true;
        }
        if (has[1] && has[2]) {
          fprintf(stderr, "step %d runs both adapters\n", st);
          ok = false;
        }
        mixed_base = mixed_base || (has[0] && (has[1] || has[2]));
      }
      pthread_mutex_unlock(&rc.mu);
      ok = ok && mixed_base;
    }
    for (int i = 0; i < N; i++)
      if (reqs[i]) tn_req_release(reqs[i]);
    memset(reqs, 0, sizeof(reqs));
    tn_engine_close(e);
    rec_deinit(&rc);
  }
  unlink(p1);
  unlink(p2);
  adapter_free(&a1);
  adapter_free(&a2);
  ASSERT(ok);
}

/* Each broken file is refused with a message naming its problem. */
static void test_bad_files(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter ad;
  adapter_make(&ad, 3, 0.1f);
  char p[] = "/tmp/tn_lora_XXXXXX";
  close(mkstemp(p));
  char dir[64];
  snprintf(dir, sizeof(dir), "%s.d", p);
  struct {
    struct gguf_opts o;
    const char *want;
  } cases[] = {
      {{.arch = "gemma3"}, "architecture 'gemma3'"},
      {{.type = "model"}, "not an adapter"},
      {{.adapter_type = "ia3"}, "adapter.type must be 'lora'"},
      {{.drop_b = true}, "no lora_b half"},
      {{.bad_shape = true}, "another base model"},
      {{.nan = true}, "non-finite"},
      {{.extra_norm = true}, "norm weights"},
      {{.embd = true}, "embeddings"},
      {{.rank = TN_LORA_RANK_MAX + 1}, "rank 257"},
  };
  int bad = 0;
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct tn_lora *l = NULL;
    struct tn_error err = {0};
    if (!write_gguf(&ad, &cases[i].o, p)) {
      bad++;
      continue;
    }
    enum tn_status st = tn_lora_load(m, p, &l, &err);
    if (st == TN_OK || !strstr(err.msg, cases[i].want)) {
      fprintf(stderr, "case %zu: got '%s', want '%s'\n", i, err.msg,
              cases[i].want);
      bad++;
    }
    tn_lora_release(l);
  }
  /* truncated copies of a good file, and an empty one */
  struct gguf_opts good = {0};
  if (write_gguf(&ad, &good, p)) {
    FILE *f = fopen(p, "rb");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) bad++;
    fclose(f);
    long cuts[] = {0, 5, 100, n / 2, n - 1};
    for (size_t i = 0; i < 5; i++) {
      write_file(p, buf, (size_t)cuts[i]);
      struct tn_lora *l = NULL;
      struct tn_error err = {0};
      if (tn_lora_load(m, p, &l, &err) == TN_OK || !err.msg[0]) {
        fprintf(stderr, "cut at %ld: loaded\n", cuts[i]);
        bad++;
      }
      tn_lora_release(l);
    }
    free(buf);
  }
  /* PEFT directories */
  struct {
    const char *extra;
    bool lie, no_config;
    const char *want;
  } pc[] = {
      {", \"use_dora\": true", false, false, "DoRA"},
      {", \"modules_to_save\": [\"lm_head\"]", false, false, "modules_to_save"},
      {", \"alpha_pattern\": {\"q_proj\": 4}", false, false, "alpha_pattern"},
      {NULL, true, false, "data_offsets"},
      {NULL, false, true, "without adapter_config.json"},
  };
  for (size_t i = 0; i < sizeof(pc) / sizeof(pc[0]); i++) {
    rm_dir(dir);
    if (!write_peft(&ad, dir, pc[i].extra, pc[i].lie)) {
      bad++;
      continue;
    }
    if (pc[i].no_config) {
      char cf[128];
      snprintf(cf, sizeof(cf), "%s/adapter_config.json", dir);
      unlink(cf);
    }
    struct tn_lora *l = NULL;
    struct tn_error err = {0};
    if (tn_lora_load(m, dir, &l, &err) == TN_OK ||
        !strstr(err.msg, pc[i].want)) {
      fprintf(stderr, "peft case %zu: got '%s', want '%s'\n", i, err.msg,
              pc[i].want);
      bad++;
    }
    tn_lora_release(l);
  }
  /* a safetensors header length past the file */
  rm_dir(dir);
  if (write_peft(&ad, dir, NULL, false)) {
    char sf[128];
    snprintf(sf, sizeof(sf), "%s/adapter_model.safetensors", dir);
    uint8_t huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, '{', '}'};
    write_file(sf, huge, sizeof(huge));
    struct tn_lora *l = NULL;
    struct tn_error err = {0};
    if (tn_lora_load(m, dir, &l, &err) == TN_OK ||
        !strstr(err.msg, "safetensors header")) {
      fprintf(stderr, "huge header: got '%s'\n", err.msg);
      bad++;
    }
    tn_lora_release(l);
  }
  rm_dir(dir);
  unlink(p);
  adapter_free(&ad);
  tn_model_free(m);
  ASSERT_EQ(bad, 0);
}

/* --adapter-mem: least recently used adapters that no request holds are
 * evicted and read again on use; in-use ones never are. */
static void test_budget(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter ad[3];
  char paths[3][32];
  bool ok = true;
  for (int i = 0; i < 3; i++) {
    adapter_make(&ad[i], 40 + (uint64_t)i, 0.2f);
    snprintf(paths[i], sizeof(paths[i]), "/tmp/tn_lora_XXXXXX");
    close(mkstemp(paths[i]));
    struct gguf_opts go = {0};
    ok = ok && write_gguf(&ad[i], &go, paths[i]);
  }
  struct tn_adapters *a = tn_adapters_new(m, NULL, "tiny");
  struct tn_error err = {0};
  ok = ok && a && !tn_adapters_load(a, "one", paths[0], 1.0f, &err);
  struct tn_adapter_info info[3];
  size_t one = 0;
  if (ok && tn_adapters_list(a, info, 3) == 1) one = info[0].bytes;
  ok = ok && one > 0;
  if (ok) tn_adapters_set_budget(a, one * 5 / 2);
  ok = ok && !tn_adapters_load(a, "two", paths[1], 1.0f, &err) &&
       !tn_adapters_load(a, "three", paths[2], 1.0f, &err);
  /* "one", the least recently used, went */
  ok = ok && tn_adapters_list(a, info, 3) == 3 && !info[0].resident &&
       info[1].resident && info[2].resident;
  /* asked for, it comes back with the same weights ("two" goes) */
  struct tn_lora *l1 = NULL, *l3 = NULL, *l2 = NULL;
  ok = ok && !tn_adapters_acquire(a, "one", &l1, NULL, &err);
  ok = ok && tn_adapters_list(a, info, 3) == 3 && info[0].resident &&
       !info[1].resident && info[2].resident;
  const struct tn_lora_mat *lm = ok ? &l1->mats[0] : NULL;
  ok = ok && !memcmp(lm->a, ad[0].a[0][0], (size_t)(RANK * N_EMBD) * 4);
  /* both residents in use: no room for "two" */
  ok = ok && !tn_adapters_acquire(a, "three", &l3, NULL, &err);
  ok = ok && tn_adapters_acquire(a, "two", &l2, NULL, &err) == TN_EFULL &&
       strstr(err.msg, "requests are using") && !l2;
  /* one request finishes: now "two" fits, in place of "one" */
  tn_lora_release(l1);
  ok = ok && !tn_adapters_acquire(a, "two", &l2, NULL, &err);
  ok = ok && tn_adapters_list(a, info, 3) == 3 && !info[0].resident &&
       info[1].resident && info[2].resident;
  tn_lora_release(l2);
  tn_lora_release(l3);
  /* an adapter larger than the whole budget, and unload while evicted */
  if (ok) tn_adapters_set_budget(a, one / 2);
  ok = ok && tn_adapters_load(a, "four", paths[0], 1.0f, &err) == TN_EFULL &&
       strstr(err.msg, "more than the whole");
  ok = ok && !tn_adapters_unload(a, "one", &err) &&
       tn_adapters_acquire(a, "one", &l1, NULL, &err) == TN_ENOENT;
  if (!ok) fprintf(stderr, "budget: %s\n", err.msg);
  tn_adapters_free(a);
  for (int i = 0; i < 3; i++) {
    unlink(paths[i]);
    adapter_free(&ad[i]);
  }
  tn_model_free(m);
  ASSERT(ok);
}

/* A PEFT (IA)3 directory: k and v's outputs and down's input scaled
 * (ff_extra: another feedforward module, to be refused). */
static bool write_ia3(const char *dir, uint64_t seed, const char *ff_extra,
                      bool bad_shape) {
  mkdir(dir, 0755);
  char path[512], cfg[512];
  snprintf(cfg, sizeof(cfg),
           "{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\", "
           "\"v_proj\", \"down_proj\"%s%s%s], \"feedforward_modules\": "
           "[\"down_proj\"%s%s%s]}",
           ff_extra ? ", \"" : "", ff_extra ? ff_extra : "", ff_extra ? "\"" : "",
           ff_extra ? ", \"" : "", ff_extra ? ff_extra : "", ff_extra ? "\"" : "");
  snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
  if (!write_file(path, cfg, strlen(cfg))) return false;
  char hdr[8192];
  size_t hn = 0, dn = 0;
  static float data[N_LAYER * (2 * KV_DIM + N_FF + N_EMBD)];
  hn += (size_t)snprintf(hdr + hn, sizeof(hdr) - hn, "{");
  for (int il = 0; il < N_LAYER; il++) {
    struct { const char *mod; int64_t rows, cols; } t[4] = {
        {"self_attn.k_proj", KV_DIM, 1}, {"self_attn.v_proj", KV_DIM, 1},
        {"mlp.down_proj", 1, N_FF}, {NULL, 0, 0}};
    if (ff_extra) t[3] = (typeof(t[3])){"self_attn.q_proj", 1, N_EMBD};
    for (int k = 0; k < 4 && t[k].mod; k++) {
      int64_t n = t[k].rows * t[k].cols - (bad_shape && k == 2);
      for (int64_t i = 0; i < n; i++)
        data[dn + (size_t)i] = 1.0f + 0.5f * rng_sym(&seed);
      hn += (size_t)snprintf(
          hdr + hn, sizeof(hdr) - hn,
          "%s\"base_model.model.model.layers.%d.%s.ia3_l\":{\"dtype\":"
          "\"F32\",\"shape\":[%" PRId64 ",%" PRId64 "],\"data_offsets\":"
          "[%zu,%zu]}",
          hn > 1 ? "," : "", il, t[k].mod, bad_shape && k == 2 ? (int64_t)1 : t[k].rows,
          bad_shape && k == 2 ? n : t[k].cols, dn * 4, (dn + (size_t)n) * 4);
      dn += (size_t)n;
    }
  }
  hn += (size_t)snprintf(hdr + hn, sizeof(hdr) - hn, "}");
  snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
  FILE *f = fopen(path, "wb");
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)hn >> (8 * i));
  bool ok = f && fwrite(len, 1, 8, f) == 8 && fwrite(hdr, 1, hn, f) == hn &&
            fwrite(data, 4, dn, f) == dn;
  if (f) ok = fclose(f) == 0 && ok;
  return ok;
}

/* Last-position logits of a fixed prompt under (l, scale) (l NULL: base). */
static bool logits_under(struct tn_model *m, const struct tn_lora *l, float scale,
                      float *out) {
  struct tn_pool *pool = tn_pool_new(1);
  struct tn_kv_pool *kv = NULL;
  struct tn_ctx *c = NULL;
  struct tn_error err = {0};
  bool ok = !tn_kv_pool_new(N_LAYER, 8, BLOCK, KV_DIM, &kv, &err) &&
            !tn_ctx_new(m, pool, 32, 64, 4, &c, &err);
  int32_t n = 10, toks[10], pos[10], sq[10];
  bool lg[10];
  for (int i = 0; i < n; i++) {
    toks[i] = (i * 53 + 7) % N_TEXT_TOKENS;
    pos[i] = i;
    sq[i] = 0;
    lg[i] = i == n - 1;
  }
  struct tn_kv_seq ks;
  tn_kv_seq_init(&ks);
  struct tn_kv_seq *seqs[1] = {&ks};
  const struct tn_lora *ls[1] = {l};
  float sc[1] = {scale};
  struct tn_batch b = {.n_tokens = n, .token = toks, .pos = pos, .seq = sq,
                       .logits = lg, .n_seqs = 1, .seqs = seqs,
                       .lora = l ? ls : NULL, .lora_scale = sc};
  ok = ok && !tn_kv_seq_reserve(kv, &ks, n) && !tn_model_forward(c, kv, &b, &err);
  if (ok) memcpy(out, tn_ctx_logits(c), N_VOCAB * sizeof(float));
  else fprintf(stderr, "logits_under: %s\n", err.msg);
  tn_kv_seq_deinit(kv, &ks);
  tn_ctx_free(c);
  tn_kv_pool_free(kv);
  tn_pool_free(pool);
  return ok;
}

static double max_diff(const float *a, const float *b) {
  double d = 0;
  for (int v = 0; v < N_VOCAB; v++) d = fmax(d, fabs((double)a[v] - b[v]));
  return d;
}

/* (IA)3: the scales change the answer, merged equals modular, scale 0 is
 * the base, and what cannot be done is refused. */
static void test_ia3(void) {
  struct tn_model *m = tiny_model(), *mm = tiny_model();
  ASSERT(m && mm);
  char dir[] = "/tmp/tn_ia3_XXXXXX";
  ASSERT(mkdtemp(dir));
  struct tn_lora *l = NULL;
  struct tn_error err = {0};
  bool ok = write_ia3(dir, 9, NULL, false) && !tn_lora_load(m, dir, &l, &err);
  ok = ok && l->kind == TN_ADAPTER_IA3 && l->n_mats == 3 * N_LAYER &&
       l->mats[TN_LORA_DOWN].ia3_in && !l->mats[TN_LORA_K].ia3_in;
  ok = ok && !tn_lora_merge(mm, l, 1.0f, TN_TYPE_COUNT, &err);
  static float out[4][N_VOCAB]; /* modular, base, scale 0, merged */
  ok = ok && logits_under(m, l, 1.0f, out[0]) &&
       logits_under(m, NULL, 1.0f, out[1]) &&
       logits_under(m, l, 0.0f, out[2]) && logits_under(mm, NULL, 1.0f, out[3]);
  double d_base = ok ? max_diff(out[0], out[1]) : 0,
         d_zero = ok ? max_diff(out[2], out[1]) : 1,
         d_merged = ok ? max_diff(out[0], out[3]) : 1;
  tn_lora_release(l);
  /* refused: input scaling of q_proj (its input is k and v's too), a
   * vector of the wrong length */
  char d2[] = "/tmp/tn_ia3_XXXXXX", d3[] = "/tmp/tn_ia3_XXXXXX";
  ASSERT(mkdtemp(d2) && mkdtemp(d3));
  struct tn_lora *bad = NULL;
  struct tn_error e2 = {0}, e3 = {0};
  bool refused = write_ia3(d2, 9, "q_proj", false) &&
                 tn_lora_load(m, d2, &bad, &e2) == TN_EUNSUPPORTED &&
                 strstr(e2.msg, "o_proj and down_proj only") &&
                 write_ia3(d3, 9, NULL, true) &&
                 tn_lora_load(m, d3, &bad, &e3) == TN_EFORMAT &&
                 strstr(e3.msg, "another base model");
  if (!refused) fprintf(stderr, "ia3 refusals: '%s' '%s'\n", e2.msg, e3.msg);
  rm_dir(dir);
  rm_dir(d2);
  rm_dir(d3);
  tn_model_free(m);
  tn_model_free(mm);
  if (!ok) fprintf(stderr, "ia3: %s\n", err.msg);
  ASSERT(ok);
  ASSERT(refused);
  ASSERT(d_base > 0.5);   /* the scales matter */
  ASSERT(d_zero == 0.0);  /* scale 0: exactly the base */
  ASSERT(d_merged < 2e-2); /* merged = modular up to rounding */
}

/* The registry: names, duplicates, scale bounds. */
static void test_registry(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter ad;
  adapter_make(&ad, 4, 0.1f);
  char p[] = "/tmp/tn_lora_XXXXXX";
  close(mkstemp(p));
  struct gguf_opts go = {0};
  bool ok = write_gguf(&ad, &go, p);
  struct tn_adapters *a = tn_adapters_new(m, NULL, "tiny");
  struct tn_error err = {0};
  ok = ok && a && !tn_adapters_load(a, "sql", p, 1.0f, &err);
  ok = ok && tn_adapters_load(a, "sql", p, 1.0f, &err) == TN_EEXIST;
  ok = ok && tn_adapters_load(a, "bad name", p, 1.0f, &err) == TN_EINVAL;
  ok = ok && tn_adapters_load(a, "a:b", p, 1.0f, &err) == TN_EINVAL;
  ok = ok && tn_adapters_load(a, "big", p, 17.0f, &err) == TN_EINVAL;
  ok = ok && tn_adapters_load(a, "nan", p, NAN, &err) == TN_EINVAL;
  ok = ok && tn_adapters_load(a, "gone", "/nonexistent/x", 1.0f, &err) ==
                 TN_ENOENT;
  struct tn_adapter_info info[4];
  ok = ok && tn_adapters_list(a, info, 4) == 1 && !strcmp(info[0].name, "sql") &&
       info[0].max_rank == RANK && info[0].bytes > 0 &&
       !strcmp(info[0].format, "gguf");
  struct tn_lora *l = a ? tn_adapters_get(a, "sql", NULL) : NULL;
  tn_adapters_free(a); /* l outlives the registry */
  ok = ok && l && l->n_mats == N_LAYER * 7;
  tn_lora_release(l);
  unlink(p);
  adapter_free(&ad);
  tn_model_free(m);
  ASSERT(ok);
}

/* ---- bottleneck modules */

/* Options for a bottleneck GGUF (all zero: modules at both sites of every
 * layer, width BN_DIM, silu, inputs output / sum). */
#define BN_DIM 6
struct bn_opts {
  const char *act, *in_attn, *in_ffn;
  bool ffn_only, drop_up_b, wide_embd, nan, lora_tensor, no_input_key;
  int dim;
};

/* the last file's values: [layer][site][part] (the writer reads them when
 * it writes, so they are static; test_bottleneck recomputes from them) */
static float bn_data[N_LAYER][2][5][2 * N_EMBD * N_EMBD];

static bool write_bn(const char *path, uint64_t seed, const struct bn_opts *o) {
  struct tn_gguf_writer *w = tn_gguf_writer_new();
  bool ok = w != NULL;
  const char *act = o->act ? o->act : "silu";
  const char *ins[2] = {o->in_attn ? o->in_attn : "output",
                        o->in_ffn ? o->in_ffn : "sum"};
  static const char *const sites[2] = {"attn", "ffn"};
  ok = ok && !tn_gguf_writer_add_str(w, "general.architecture", "llama", 5);
  ok = ok && !tn_gguf_writer_add_str(w, "general.type", "adapter", 7);
  ok = ok && !tn_gguf_writer_add_str(w, "adapter.type", "bottleneck", 10);
  ok = ok && !tn_gguf_writer_add_str(w, "adapter.bottleneck.non_linearity",
                                     act, strlen(act));
  for (int st = 0; st < 2 && !o->no_input_key; st++) {
    char key[64];
    snprintf(key, sizeof(key), "adapter.bottleneck.%s.input", sites[st]);
    ok = ok && !tn_gguf_writer_add_str(w, key, ins[st], strlen(ins[st]));
  }
  float(*data)[2][5][2 * N_EMBD * N_EMBD] = bn_data;
  const int64_t n = N_EMBD + (o->wide_embd ? 1 : 0), d = o->dim ? o->dim : BN_DIM;
  struct tn_error err = {0};
  for (int il = 0; ok && il < N_LAYER; il++)
    for (int st = o->ffn_only ? 1 : 0; ok && st < 2; st++) {
      static const char *const parts[5] = {"down.weight", "down.bias",
                                           "up.weight", "up.bias", "scale"};
      const int64_t ne[5][2] = {{n, d}, {d, 1}, {d, n}, {n, 1}, {n, 1}};
      for (int p = 0; ok && p < 5; p++) {
        if (o->drop_up_b && p == 3 && il == 1) continue;
        float *v = data[il][st][p];
        for (int64_t i = 0; i < ne[p][0] * ne[p][1]; i++)
          v[i] = p == 4 ? 1.0f + 0.5f * rng_sym(&seed)
                        : (p == 0 ? 1.0f : 0.6f) * rng_sym(&seed);
        if (o->nan && il == 1 && p == 2) v[3] = NAN;
        char name[96];
        snprintf(name, sizeof(name), "blk.%d.adapter_%s.%s", il, sites[st],
                 parts[p]);
        ok = !tn_gguf_writer_add_tensor(w, name, TN_TYPE_F32,
                                        ne[p][1] > 1 || p == 0 || p == 2 ? 2 : 1,
                                        ne[p], v, &err);
      }
    }
  if (ok && o->lora_tensor) {
    int64_t ne[2] = {N_EMBD, RANK};
    ok = !tn_gguf_writer_add_tensor(w, "blk.0.attn_q.weight.lora_a",
                                    TN_TYPE_F32, 2, ne, data[0][0][0], &err);
  }
  ok = ok && !tn_gguf_writer_write(w, path, &err);
  tn_gguf_writer_free(w);
  if (!ok) fprintf(stderr, "write_bn: %s\n", err.msg);
  return ok;
}

/* tn_bn_residual at (il, site) against the formula computed here from the
 * file's values (bn_data), with silu, for random x and o. */
static bool bn_formula(const struct tn_lora *l, int32_t il, int site,
                       enum tn_bn_input in_kind, float s) {
  enum { N = N_EMBD };
  const float *dw = bn_data[il][site][0], *db = bn_data[il][site][1],
              *uw = bn_data[il][site][2], *ub = bn_data[il][site][3],
              *sc = bn_data[il][site][4];
  uint64_t seed = 77 + (uint64_t)il;
  float x[N], o[N], got[N], scratch[4 * N];
  double in[N], h[BN_DIM];
  for (int i = 0; i < N; i++) x[i] = rng_sym(&seed), o[i] = rng_sym(&seed);
  for (int i = 0; i < N; i++)
    in[i] = in_kind == TN_BN_IN_OUTPUT ? o[i]
            : in_kind == TN_BN_IN_SUM  ? (double)x[i] + o[i]
                                       : x[i];
  for (int j = 0; j < BN_DIM; j++) {
    double a = db[j];
    for (int i = 0; i < N; i++) a += (double)dw[j * N + i] * in[i];
    h[j] = a / (1.0 + exp(-a)); /* silu */
  }
  memcpy(got, x, sizeof(x));
  tn_bn_residual(l, il, (enum tn_bn_site)site, s, got, o, scratch);
  for (int i = 0; i < N; i++) {
    double f = ub[i];
    for (int j = 0; j < BN_DIM; j++) f += (double)uw[i * BN_DIM + j] * h[j];
    double want = s * sc[i] * f + o[i] + x[i];
    if (fabs(want - got[i]) > 1e-4 * (1.0 + fabs(want))) {
      fprintf(stderr, "bottleneck layer %d site %d input %d: [%d] %g, want %g\n",
              il, site, (int)in_kind, i, (double)got[i], want);
      return false;
    }
  }
  return true;
}

/* Loading, what each input and the scale do, merge refusal, bad files. */
static void test_bottleneck(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  char p[] = "/tmp/tn_bn_XXXXXX";
  close(mkstemp(p));
  struct tn_error err = {0};
  struct tn_lora *l = NULL, *l2 = NULL, *l3 = NULL;
  static float base[N_VOCAB], full[N_VOCAB], zero[N_VOCAB], half[N_VOCAB],
      stream[N_VOCAB];
  struct bn_opts o = {0};
  bool ok = write_bn(p, 21, &o) && !tn_lora_load(m, p, &l, &err);
  if (!ok) fprintf(stderr, "bottleneck: %s\n", err.msg);
  ok = ok && l->kind == TN_ADAPTER_BOTTLENECK && l->n_mats == 2 * N_LAYER &&
       l->max_rank == BN_DIM && l->bn_act == TN_BN_SILU &&
       l->bn_input[TN_BN_ATTN] == TN_BN_IN_OUTPUT &&
       l->bn_input[TN_BN_FFN] == TN_BN_IN_SUM && l->bytes > 0;
  /* each input, against the formula */
  ok = ok && bn_formula(l, 0, TN_BN_ATTN, TN_BN_IN_OUTPUT, 1.0f) &&
       bn_formula(l, 1, TN_BN_FFN, TN_BN_IN_SUM, 0.5f);
  ok = ok && logits_under(m, NULL, 1.0f, base) && logits_under(m, l, 1.0f, full) &&
       logits_under(m, l, 0.0f, zero) && logits_under(m, l, 0.5f, half);
  /* the same weights fed the residual stream instead */
  struct bn_opts os = {.in_attn = "stream", .in_ffn = "stream"};
  ok = ok && write_bn(p, 21, &os) && !tn_lora_load(m, p, &l2, &err) &&
       bn_formula(l2, 1, TN_BN_ATTN, TN_BN_IN_STREAM, 1.0f) &&
       logits_under(m, l2, 1.0f, stream);
  /* an FFN-only module of width 1 with gelu_tanh loads */
  struct bn_opts of = {.ffn_only = true, .dim = 1, .act = "gelu_tanh"};
  ok = ok && write_bn(p, 22, &of) && !tn_lora_load(m, p, &l3, &err) &&
       l3->n_mats == N_LAYER && l3->bn[0].dim == 0 &&
       l3->bn[TN_BN_FFN].dim == 1;
  /* merging is refused: the nonlinearity sits between the matrices */
  struct tn_error em = {0};
  bool merge_refused = ok && tn_lora_merge(m, l, 1.0f, TN_TYPE_COUNT, &em) ==
                                 TN_EUNSUPPORTED &&
                       strstr(em.msg, "cannot be folded");
  double d_full = ok ? max_diff(full, base) : 0,
         d_zero = ok ? max_diff(zero, base) : 1,
         d_half = ok ? max_diff(half, full) : 0,
         d_stream = ok ? max_diff(stream, full) : 0;
  tn_lora_release(l);
  tn_lora_release(l2);
  tn_lora_release(l3);
  /* bad files, each refused naming the problem */
  struct {
    struct bn_opts o;
    enum tn_status st;
    const char *msg;
  } bad[] = {
      {{.act = "swishy"}, TN_EUNSUPPORTED, "non_linearity must be one of"},
      {{.act = ""}, TN_EUNSUPPORTED, "non_linearity must be one of"},
      {{.in_ffn = "after"}, TN_EFORMAT, "ffn.input must be"},
      {{.no_input_key = true}, TN_EFORMAT, "attn.input must be"},
      {{.drop_up_b = true}, TN_EFORMAT, "has no 'blk.1.adapter_attn.up.bias'"},
      {{.wide_embd = true}, TN_EFORMAT, "another model"},
      {{.nan = true}, TN_EFORMAT, "non-finite"},
      {{.lora_tensor = true}, TN_EUNSUPPORTED, "not part of a bottleneck"},
      {{.dim = N_EMBD + 1}, TN_EFORMAT, "width of 1 to"},
  };
  bool refused = true;
  for (size_t i = 0; i < TN_ARRAY_LEN(bad); i++) {
    struct tn_lora *x = NULL;
    struct tn_error e = {0};
    enum tn_status st = write_bn(p, 23, &bad[i].o) ? tn_lora_load(m, p, &x, &e)
                                                    : TN_EIO;
    if (st != bad[i].st || !strstr(e.msg, bad[i].msg) || x) {
      fprintf(stderr, "bad bottleneck %zu: status %d, '%s'\n", i, (int)st,
              e.msg);
      refused = false;
    }
    tn_lora_release(x);
  }
  unlink(p);
  tn_model_free(m);
  ASSERT(ok);
  ASSERT(merge_refused);
  ASSERT(refused);
  ASSERT(d_full > 0.1);    /* the modules matter */
  ASSERT(d_zero == 0.0);   /* scale 0: exactly the base */
  ASSERT(d_half > 0.01);   /* the scale is applied */
  ASSERT(d_stream > 0.01); /* the input is what the file says */
}

static void test_batch_invariance(void) {
  struct tn_model *m = tiny_model();
  ASSERT(m);
  struct adapter a1, a2;
  adapter_make(&a1, 5, 0.4f);
  adapter_make(&a2, 6, 0.4f);
  char p1[] = "/tmp/tn_lora_XXXXXX", p2[] = "/tmp/tn_lora_XXXXXX",
       p3[] = "/tmp/tn_lora_XXXXXX";
  int f1 = mkstemp(p1), f2 = mkstemp(p2), f3 = mkstemp(p3);
  close(f1);
  close(f2);
  close(f3);
  /* "two" zero-padded to rank 72: B's long-dot path (rank >= 64) */
  struct gguf_opts go = {0}, go72 = {.rank = 72};
  struct bn_opts bo = {0};
  bool ok = write_gguf(&a1, &go, p1) && write_gguf(&a2, &go72, p2) &&
            write_bn(p3, 31, &bo);
  tn_model_free(m);
  enum { N_REQ = 12, PLEN = 40, GEN = 24 };
  int32_t prompts[N_REQ][PLEN];
  for (int i = 0; i < N_REQ; i++) {
    /* requests 4k..4k+3 (base, one, two, three) have the same prompt;
     * groups 0 and 2 share all but its last token (prefix reuse under
     * one adapter, and refused across them) */
    make_prompt(100 + (uint64_t)(i / 4 % 2), prompts[i], PLEN);
    prompts[i][PLEN - 1] = (int32_t)(i / 4 % N_TEXT_TOKENS);
  }
  struct out alone[N_REQ], together[N_REQ];
  /* alone: a fresh engine each, prefix cache off */
  for (int pass = 0; ok && pass < 3; pass++) {
    struct rec rc;
    rec_init(&rc);
    struct eng_opts o = {.no_prefix = pass == 0, .max_seqs = 16,
                         .kv_blocks = pass == 2 ? 24 : 0};
    struct tn_engine *e = eng_open(&rc, &o);
    struct tn_error err = {0};
    ok = e && !tn_adapters_load(tn_engine_adapters(e), "one", p1, 1.0f, &err) &&
         !tn_adapters_load(tn_engine_adapters(e), "two", p2, 0.5f, &err) &&
         !tn_adapters_load(tn_engine_adapters(e), "three", p3, 0.8f, &err);
    if (!ok) fprintf(stderr, "adapters: %s\n", err.msg);
    struct tn_req *reqs[N_REQ] = {0};
    for (int i = 0; ok && i < N_REQ; i++) {
      struct tn_gen_params g = greedy(GEN);
      static const char *const names[4] = {NULL, "one", "two", "three"};
      const char *nm = names[i % 4];
      g.lora = nm ? tn_adapters_get(tn_engine_adapters(e), nm, &g.lora_scale)
                  : NULL;
      if (pass == 0) {
        reqs[i] = submit(e, &rc, prompts[i], PLEN, &g);
        ok = reqs[i] && wait_done(&rc, &reqs[i], 1);
        if (ok) collect(reqs[i], 0, &alone[i]);
      } else {
        reqs[i] = submit(e, &rc, prompts[i], PLEN, &g);
        ok = reqs[i] != NULL;
      }
      tn_lora_release(g.lora);
    }
    if (pass > 0 && ok) ok = wait_done(&rc, reqs, N_REQ);
    for (int i = 0; ok && pass > 0 && i < N_REQ; i++) {
      collect(reqs[i], 0, &together[i]);
      char what[64];
      snprintf(what, sizeof(what), "pass %d request %d", pass, i);
      if (!out_same(what, &together[i], &alone[i])) ok = false;
    }
    if (pass == 2 && ok) {
      struct tn_engine_stats st;
      tn_engine_stats(e, &st);
      if (st.preemptions == 0) fprintf(stderr, "no preemption in pass 2\n");
      ok = st.preemptions > 0;
    }
    /* unloading while nothing runs; a second unload is refused */
    if (ok) ok = !tn_adapters_unload(tn_engine_adapters(e), "one", &err) &&
                 tn_adapters_unload(tn_engine_adapters(e), "one", &err) ==
                     TN_ENOENT;
    for (int i = 0; i < N_REQ; i++)
      if (reqs[i]) tn_req_release(reqs[i]);
    tn_engine_close(e);
    rec_deinit(&rc);
  }
  /* the adapters change answers: the same prompt under base / one / two /
   * three (requests 0-3 share their prompt) */
  bool differs = ok && memcmp(alone[0].ids, alone[1].ids, sizeof(alone[0].ids)) &&
                 memcmp(alone[1].ids, alone[2].ids, sizeof(alone[0].ids)) &&
                 memcmp(alone[0].ids, alone[3].ids, sizeof(alone[0].ids));
  unlink(p1);
  unlink(p2);
  unlink(p3);
  adapter_free(&a1);
  adapter_free(&a2);
  ASSERT(ok);
  ASSERT(differs);
}

TN_TEST_MAIN(TN_TEST(test_gguf_equals_peft), TN_TEST(test_forward_matches_merged),
             TN_TEST(test_batch_invariance), TN_TEST(test_unload_while_running),
             TN_TEST(test_max_loras), TN_TEST(test_budget), TN_TEST(test_ia3),
             TN_TEST(test_bad_files), TN_TEST(test_bottleneck),
             TN_TEST(test_registry))
