/*
 * forward.c: the batched forward pass.
 *
 * One call is one parallel region on the compute pool: every thread walks
 * the same layer loop and takes its slice of each op (rows of a weight
 * matrix, tokens of a row op, (token, head) pairs of attention), and the
 * threads meet at a barrier wherever an op reads what another thread
 * wrote. Per layer, with T tokens in the batch:
 *
 *   xn = norm(x)                      tokens   -> quantize xn   | barrier
 *   q,k,v = xn Wq, xn Wk, xn Wv       rows                      | barrier
 *   bias, qk-norm, rope, store k,v    tokens                    | barrier
 *   attn = softmax(q k^T) v           (token, head) pairs
 *                                     -> quantize attn          | barrier
 *   o = attn Wo                       rows                      | barrier
 *   x += post(o); xn = norm(x)        tokens   -> quantize xn   | barrier
 *   g,u = xn Wg, xn Wu                rows                      | barrier
 *   g = act(g) * u                    tokens   -> quantize g    | barrier
 *   f = g Wd                          rows                      | barrier
 *   x += post(f)                      tokens (next layer's norm follows)
 *
 * Buffers (T = n_tokens, d = n_embd, Q = n_head*head_dim, K = n_head_kv*
 * head_dim, F = n_ff) are reserved once in tn_ctx_new for the largest batch.
 * Activations are quantized once per distinct vec_dot_type in a group of
 * matrices that share an input (qbuf[type]).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/model_internal.h"

static void free_bufs(struct tn_ctx *c) {
  tn_aligned_free(c->x);
  tn_aligned_free(c->xn);
  tn_aligned_free(c->q);
  tn_aligned_free(c->k);
  tn_aligned_free(c->v);
  tn_aligned_free(c->attn);
  tn_aligned_free(c->tmp);
  tn_aligned_free(c->gate);
  tn_aligned_free(c->up);
  tn_aligned_free(c->scores);
  tn_aligned_free(c->attn_acc);
  free(c->vrows);
  free(c->lora_idx);
  free(c->lora_x);
  free(c->runs);
  tn_aligned_free(c->rope_cs);
  tn_aligned_free(c->logits);
  tn_aligned_free(c->out_x);
  tn_aligned_free(c->hidden);
  free(c->out_idx);
  free(c->layers);
  for (int t = 0; t < TN_TYPE_COUNT; t++) tn_aligned_free(c->qbuf[t]);
}

void tn_ctx_free(struct tn_ctx *c) {
  if (!c) return;
  free_bufs(c);
  free(c);
}

/* Notes the activation type a matrix needs and the widest input for it. */
static void want_q(size_t *need, const struct tn_mat *w, int64_t n_tok) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  size_t s = tn_matmul_q_size(w, n_tok);
  if (s > need[tt->vec_dot_type]) need[tt->vec_dot_type] = s;
}

enum tn_status tn_ctx_new(const struct tn_model *m, struct tn_pool *pool,
                          int32_t n_tokens_max, int32_t n_ctx,
                          int32_t n_logits_max, struct tn_ctx **out,
                          struct tn_error *err) {
  *out = NULL;
  const struct tn_hparams *hp = &m->hp;
  if (n_tokens_max <= 0 || n_tokens_max > 65536 || n_ctx <= 0 ||
      n_ctx > (1 << 24) || n_logits_max <= 0 || n_logits_max > n_tokens_max)
    return tn_error_set(err, TN_EINVAL,
                        "context: bad sizes (batch %d, ctx %d, logits %d)",
                        n_tokens_max, n_ctx, n_logits_max);
  struct tn_ctx *c = calloc(1, sizeof(*c));
  if (!c) return tn_error_set(err, TN_ENOMEM, "context: out of memory");
  c->m = m;
  c->pool = pool;
  c->n_threads = tn_pool_size(pool);
  c->n_tokens_max = n_tokens_max;
  c->n_ctx = n_ctx;
  c->n_logits_max = n_logits_max;
  size_t T = (size_t)n_tokens_max, d = (size_t)hp->n_embd,
         qd = (size_t)hp->n_head * (size_t)hp->head_dim,
         kd = (size_t)hp->n_head_kv * (size_t)hp->head_dim,
         F = (size_t)hp->n_ff, V = (size_t)hp->n_vocab;
  int nth = tn_pool_size(pool);
  c->x = tn_aligned_alloc(T * d * sizeof(float));
  c->xn = tn_aligned_alloc(T * d * sizeof(float));
  c->q = tn_aligned_alloc(T * qd * sizeof(float));
  c->k = tn_aligned_alloc(T * kd * sizeof(float));
  c->v = tn_aligned_alloc(T * kd * sizeof(float));
  c->attn = tn_aligned_alloc(T * qd * sizeof(float));
  c->tmp = tn_aligned_alloc(T * d * sizeof(float));
  c->gate = tn_aligned_alloc(T * F * sizeof(float));
  c->up = tn_aligned_alloc(T * F * sizeof(float));
  c->scores = tn_aligned_alloc((size_t)nth * TN_ATTN_RUN * (size_t)n_ctx *
                               sizeof(float));
  c->attn_acc = tn_aligned_alloc((size_t)nth * TN_ATTN_VALUES_GROUP * 64 *
                                 (size_t)hp->head_dim * sizeof(float));
  c->vrows = malloc((size_t)nth * (size_t)n_ctx * sizeof(*c->vrows));
  c->lora_idx = malloc((size_t)nth * (size_t)n_tokens_max * sizeof(int32_t));
  c->lora_x = malloc((size_t)nth * (size_t)tn_lora_scratch(m) * sizeof(float));
  c->runs = malloc((T + 1) * sizeof(int32_t));
  c->rope_cs = tn_aligned_alloc(T * 2 * (size_t)hp->n_rot * sizeof(float));
  c->logits = tn_aligned_alloc((size_t)n_logits_max * V * sizeof(float));
  c->out_x = tn_aligned_alloc((size_t)n_logits_max * d * sizeof(float));
  c->out_idx = malloc((size_t)n_logits_max * sizeof(int32_t));
  c->hidden = tn_aligned_alloc(T * d * sizeof(float));
  size_t need[TN_TYPE_COUNT] = {0};
  for (int32_t il = 0; il < hp->n_layer; il++) {
    const struct tn_layer *L = &m->layers[il];
    want_q(need, &L->wq, n_tokens_max);
    want_q(need, &L->wk, n_tokens_max);
    want_q(need, &L->wv, n_tokens_max);
    want_q(need, &L->wo, n_tokens_max);
    want_q(need, &L->w_gate, n_tokens_max);
    want_q(need, &L->w_up, n_tokens_max);
    want_q(need, &L->w_down, n_tokens_max);
  }
  want_q(need, &m->output, n_logits_max);
  bool ok = c->x && c->xn && c->q && c->k && c->v && c->attn && c->tmp &&
            c->gate && c->up && c->scores && c->attn_acc && c->vrows && c->lora_idx && c->lora_x && c->runs && c->rope_cs && c->logits && c->out_x &&
            c->out_idx && c->hidden;
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    if (!need[t]) continue;
    c->qbuf[t] = tn_aligned_alloc(need[t]);
    ok = ok && c->qbuf[t];
  }
  if (!ok) {
    tn_ctx_free(c);
    return tn_error_set(err, TN_ENOMEM,
                        "context: cannot allocate buffers for a batch of %d "
                        "tokens",
                        n_tokens_max);
  }
  *out = c;
  return TN_OK;
}

enum tn_status tn_ctx_set_layers(struct tn_ctx *c, const int32_t *layers,
                                 int32_t n, struct tn_error *err) {
  if (!layers) {
    free(c->layers);
    c->layers = NULL;
    c->n_layers = 0;
    return TN_OK;
  }
  const int32_t n_layer = c->m->hp.n_layer;
  if (n < 0 || n > n_layer)
    return tn_error_set(err, TN_EINVAL, "layers: %d of a %d-layer model", n,
                        n_layer);
  for (int32_t i = 0; i < n; i++)
    if (layers[i] < 0 || layers[i] >= n_layer ||
        (i > 0 && layers[i] <= layers[i - 1]))
      return tn_error_set(err, TN_EINVAL,
                          "layers: %d is not a layer after %d (0..%d, "
                          "rising)",
                          layers[i], i > 0 ? layers[i - 1] : -1,
                          n_layer - 1);
  int32_t *copy = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
  if (!copy) return tn_error_set(err, TN_ENOMEM, "layers: out of memory");
  if (n > 0) memcpy(copy, layers, (size_t)n * sizeof(int32_t));
  free(c->layers);
  c->layers = copy;
  c->n_layers = n;
  return TN_OK;
}

void tn_ctx_set_kv_readonly(struct tn_ctx *c, bool readonly) {
  c->kv_readonly = readonly;
}

void tn_ctx_set_threads(struct tn_ctx *c, int n_threads) {
  int size = tn_pool_size(c->pool);
  c->n_threads = n_threads < 1 || n_threads > size ? size : n_threads;
}

const float *tn_ctx_logits(const struct tn_ctx *c) { return c->logits; }
const float *tn_ctx_hidden(const struct tn_ctx *c) { return c->hidden; }
int32_t tn_ctx_n_logits(const struct tn_ctx *c) { return c->n_logits; }

/* ---- the parallel region */

/* Adds the adapters' terms of target t to this thread's tokens of y
 * ([T][ldy]) from their inputs x ([T][ldx]): each adapter's tokens
 * gathered into segments of TN_LORA_SEG that share one pass over its
 * weights (idx: this thread's n_tokens_max scratch). */
static void lora_add(const struct tn_batch *b, int32_t il,
                     enum tn_lora_target t, const float *x, int64_t ldx,
                     float *y, int64_t ldy, int64_t t0, int64_t t1,
                     int32_t *idx, float *scratch) {
  if (!b->lora) return;
  int64_t n = 0;
  for (int64_t i = t0; i < t1; i++) {
    int32_t s = b->seq[i];
    const struct tn_lora *l = b->lora[s];
    if (!l) continue;
    const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + t];
    if (lm->rank)
      idx[n++] = (int32_t)i;
    /* (IA)3 on an output without a bias (q/k/v: after theirs, ia3_at) */
    else if (lm->ia3 && !lm->ia3_in && t != TN_LORA_Q && t != TN_LORA_K &&
             t != TN_LORA_V)
      tn_lora_ia3_scale(lm->ia3, b->lora_scale ? b->lora_scale[s] : 1.0f,
                        y + i * ldy, lm->n_out);
  }
  for (int64_t p = 0; p < n; p++) {
    if (idx[p] < 0) continue;
    const struct tn_lora *l = b->lora[b->seq[idx[p]]];
    const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + t];
    const float *xs[TN_LORA_SEG];
    float *ys[TN_LORA_SEG], ss[TN_LORA_SEG];
    int k = 0;
    for (int64_t q = p; q < n; q++) {
      int32_t i = idx[q];
      if (i < 0 || b->lora[b->seq[i]] != l) continue;
      idx[q] = -1;
      xs[k] = x + i * ldx;
      ys[k] = y + i * ldy;
      ss[k] = b->lora_scale ? b->lora_scale[b->seq[i]] : 1.0f;
      if (++k == TN_LORA_SEG) {
        tn_lora_apply_seg(lm, k, ss, xs, ys, scratch);
        k = 0;
      }
    }
    if (k) tn_lora_apply_seg(lm, k, ss, xs, ys, scratch);
  }
}

/* (IA)3 of target t on token i's row y: its output scales (q/k/v, after
 * the bias) or, with in, its input scales (before the product). */
static void ia3_at(const struct tn_batch *b, int32_t il,
                   enum tn_lora_target t, int64_t i, float *y, bool in) {
  if (!b->lora) return;
  int32_t s = b->seq[i];
  const struct tn_lora *l = b->lora[s];
  if (!l || l->kind != TN_ADAPTER_IA3) return;
  const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + t];
  if (lm->ia3 && lm->ia3_in == in)
    tn_lora_ia3_scale(lm->ia3, b->lora_scale ? b->lora_scale[s] : 1.0f, y,
                      in ? lm->n_in : lm->n_out);
}

/* x += o at token i's residual join after a sublayer, through the
 * sequence's bottleneck module there when it has one. */
static void residual_add(const struct tn_batch *b, int32_t il,
                         enum tn_bn_site site, int64_t i, float *x,
                         const float *o, int64_t d, float *scratch) {
  const struct tn_lora *l = b->lora ? b->lora[b->seq[i]] : NULL;
  if (l && l->kind == TN_ADAPTER_BOTTLENECK)
    tn_bn_residual(l, il, site,
                   b->lora_scale ? b->lora_scale[b->seq[i]] : 1.0f, x, o,
                   scratch);
  else
    tn_vec_add(x, o, d);
}

struct fwd {
  struct tn_ctx *c;
  const struct tn_kv_layout *lay;
  const struct tn_batch *b;
};

/* Quantizes this thread's tokens of src [T][n_cols] for every distinct
 * activation type among mats. */
static void quantize_for(struct tn_ctx *c, const struct tn_mat *const *mats,
                         int n_mats, const float *src, int64_t T, int ith,
                         int nth) {
  bool done[TN_TYPE_COUNT] = {false};
  for (int i = 0; i < n_mats; i++) {
    const struct tn_mat *w = mats[i];
    enum tn_type vt = tn_type_get(w->type)->vec_dot_type;
    if (done[vt]) continue;
    done[vt] = true;
    /* Each thread quantizes the tokens it computed itself (tn_split), so
     * no barrier is needed between the row op and its quantization. */
    int64_t t0, t1;
    tn_split(T, ith, nth, &t0, &t1);
    if (t1 > t0)
      tn_matmul_quantize(w, src + t0 * w->n_cols, t1 - t0,
                         (char *)c->qbuf[vt] + (size_t)t0 * tn_matmul_q_row_size(w),
                         0, 1);
  }
}

static void mm(struct tn_ctx *c, const struct tn_mat *w, int64_t T, float *y,
               int ith, int nth) {
  enum tn_type vt = tn_type_get(w->type)->vec_dot_type;
  tn_matmul(w, c->qbuf[vt], T, y, w->n_rows, ith, nth);
}

/* Attention of one head for a run of consecutive tokens of one sequence
 * (batch indices r0..r1-1, positions rising by one). Each cached key
 * row is read once (converted to f32 in registers) and dotted with every
 * token of the run that can see it. Every token's result is computed with the same
 * operations whether it runs alone or in a run (batch invariance): one
 * dot per visible position, softmax, f16-rounded weights, then the value
 * rows summed in position order into 64 lanes (acc: up to
 * TN_ATTN_VALUES_GROUP x [64][hd]), one lane at a time straight from the
 * f16 cache, and folded: the order llama.cpp's one-token path uses
 * (kernels.h). Long windows share each value row among up to
 * TN_ATTN_VALUES_GROUP tokens of the run (tn_attn_values_run). */
static void attend_run(const struct fwd *f, int32_t il, int32_t r0, int32_t r1,
                       int32_t h, float *scores,
                       const uint16_t **vrows, float *acc) {
  struct tn_ctx *c = f->c;
  const struct tn_hparams *hp = &c->m->hp;
  const struct tn_layer *L = &c->m->layers[il];
  const struct tn_kv_layout *kv = f->lay;
  const int32_t hd = hp->head_dim, bs = kv->block_size, n_ctx = c->n_ctx;
  const int32_t kvh = h / (hp->n_head / hp->n_head_kv);
  const int64_t qd = (int64_t)hp->n_head * hd;
  const struct tn_kv_seq *s = f->b->seqs[f->b->seq[r0]];
  const int32_t nq = r1 - r0;
  int32_t start[TN_ATTN_RUN] = {0}, pos[TN_ATTN_RUN] = {0};
  for (int32_t i = 0; i < nq; i++) {
    pos[i] = f->b->pos[r0 + i];
    start[i] = L->swa && pos[i] - hp->swa_window + 1 > 0
                   ? pos[i] - hp->swa_window + 1
                   : 0;
  }
  const int32_t j0 = start[0], j1 = pos[nq - 1];

  /* Cache row j is seen by the tokens i in [lo, hi): positions rise and
   * window starts never fall along the run. */
  int32_t lo = 0, hi = 0;
  const float *q0 = c->q + (int64_t)r0 * qd + (int64_t)h * hd;
  float *o0 = c->attn + (int64_t)r0 * qd + (int64_t)h * hd;
  float *outs[TN_ATTN_RUN];

  /* scores[i][j - start[i]] = (k_j . q_i) * scale, straight from the f16
   * cache: one token (decode) a block's run of rows at a time, a run of
   * tokens row by row with each row dotted with every token that sees it */
  if (nq == 1) {
    for (int32_t j = j0; j <= j1;) {
      int32_t slot = j % bs, n = TN_MIN(bs - slot, j1 - j + 1);
      tn_attn_dot_block_f16(tn_kv_k(kv, il, s->blocks[j / bs], slot) +
                                (size_t)kvh * (size_t)hd,
                            kv->n_kv_dim, n, q0, scores + (j - j0), hd,
                            hp->kq_scale);
      j += n;
    }
  } else if (hd % 64 == 0) {
    /* a block's key rows converted once (into acc, which the value sums
     * use only later), then dotted with each token that sees them by the
     * block kernel, which shares the horizontal sums among 16 rows */
    float *kf = acc;
    for (int32_t j = j0; j <= j1;) {
      int32_t slot = j % bs, n = TN_MIN(bs - slot, j1 - j + 1);
      const uint16_t *kr = tn_kv_k(kv, il, s->blocks[j / bs], slot) +
                           (size_t)kvh * (size_t)hd;
      for (int32_t r = 0; r < n; r++)
        tn_fp16_to_fp32_row(kr + (size_t)r * kv->n_kv_dim, kf + (size_t)r * hd,
                            hd);
      for (int32_t i = 0; i < nq; i++) {
        int32_t a = TN_MAX(j, start[i]), z = TN_MIN(j + n - 1, pos[i]);
        if (a > z) continue;
        tn_attn_dot_block_f32(kf + (size_t)(a - j) * hd, hd, z - a + 1,
                              q0 + (int64_t)i * qd,
                              scores + (size_t)i * (size_t)n_ctx +
                                  (size_t)(a - start[i]),
                              hd, hp->kq_scale);
      }
      j += n;
    }
  } else {
    for (int32_t j = j0; j <= j1; j++) {
      while (lo < nq && pos[lo] < j) lo++;
      while (hi < nq && start[hi] <= j) hi++;
      if (lo >= hi) continue;
      for (int32_t i = lo; i < hi; i++)
        outs[i - lo] = scores + (size_t)i * (size_t)n_ctx + (size_t)(j - start[i]);
      tn_attn_dot_rows_f16(tn_kv_k(kv, il, s->blocks[j / bs], j % bs) +
                               (size_t)kvh * (size_t)hd,
                           q0 + (int64_t)lo * qd, qd, hi - lo, outs, hd,
                           hp->kq_scale);
    }
  }
  for (int32_t i = 0; i < nq; i++) {
    float *sc = scores + (size_t)i * (size_t)n_ctx;
    int32_t n = pos[i] - start[i] + 1;
    /* the cache index of position p is p, as in llama.cpp's cache */
    tn_attn_softmax(sc, n, start[i] % 16);
    /* rounded to f16 as llama.cpp does next to an F16 cache */
    tn_round_f16(sc, n);
  }
  /* vrows[j]: the value row of position j in the cache */
  for (int32_t j = j0; j <= j1; j++)
    vrows[j] = tn_kv_v(kv, il, s->blocks[j / bs], j % bs) + (size_t)kvh * (size_t)hd;
  tn_attn_values_run(o0, qd, acc, vrows, scores, n_ctx, start, pos, nq, hd);
}

static void forward_worker(void *arg, int ith, int nth) {
  const struct fwd *f = arg;
  struct tn_ctx *c = f->c;
  const struct tn_model *m = c->m;
  const struct tn_hparams *hp = &m->hp;
  const struct tn_batch *b = f->b;
  struct tn_pool *pool = c->pool;
  const int64_t T = b->n_tokens, d = hp->n_embd, hd = hp->head_dim;
  const int64_t qd = (int64_t)hp->n_head * hd, kd = (int64_t)hp->n_head_kv * hd;
  const int64_t F = hp->n_ff;
  const bool gemma = hp->arch == TN_ARCH_GEMMA3;
  float *scores = c->scores + (size_t)ith * TN_ATTN_RUN * (size_t)c->n_ctx;
  float *acc = c->attn_acc + (size_t)ith * TN_ATTN_VALUES_GROUP * 64 * (size_t)hd;
  const uint16_t **vrows = c->vrows + (size_t)ith * (size_t)c->n_ctx;
  int32_t *lidx = c->lora_idx + (size_t)ith * (size_t)c->n_tokens_max;
  float *lx = c->lora_x + (size_t)ith * (size_t)tn_lora_scratch(m);
  int64_t t0, t1;
  tn_split(T, ith, nth, &t0, &t1); /* this thread's tokens */

  /* x[T][d] = embedding rows (times embd_scale); RoPE angles per token for
   * the global base and the sliding-window base */
  for (int64_t t = t0; t < t1; t++) {
    float *cs = c->rope_cs + t * 2 * hp->n_rot;
    tn_rope_cache(cs, hp->n_rot, b->pos[t], hp->rope_base, hp->rope_scale,
                  m->rope_freqs);
    tn_rope_cache(cs + hp->n_rot, hp->n_rot, b->pos[t], hp->rope_base_swa,
                  hp->rope_scale_swa, NULL);
    tn_mat_get_row(&m->tok_embd, b->token[t], c->x + t * d);
    if (hp->embd_scale != 1.0f) tn_vec_scale(c->x + t * d, hp->embd_scale, d);
  }

  const int32_t n_run = c->layers ? c->n_layers : hp->n_layer;
  for (int32_t li = 0; li < n_run; li++) {
    const int32_t il = c->layers ? c->layers[li] : li;
    const struct tn_layer *L = &m->layers[il];

    /* xn[T][d] = norm(x), quantized for Wq/Wk/Wv */
    for (int64_t t = t0; t < t1; t++)
      tn_rms_norm(c->x + t * d, L->attn_norm, c->xn + t * d, d, hp->norm_eps);
    {
      const struct tn_mat *g[3] = {&L->wq, &L->wk, &L->wv};
      quantize_for(c, g, 3, c->xn, T, ith, nth);
    }
    tn_pool_barrier(pool);

    /* q[T][qd], k[T][kd], v[T][kd] */
    mm(c, &L->wq, T, c->q, ith, nth);
    mm(c, &L->wk, T, c->k, ith, nth);
    mm(c, &L->wv, T, c->v, ith, nth);
    tn_pool_barrier(pool);

    /* adapters, biases, per-head QK norm, RoPE; k and v into the cache */
    lora_add(b, il, TN_LORA_Q, c->xn, d, c->q, qd, t0, t1, lidx, lx);
    lora_add(b, il, TN_LORA_K, c->xn, d, c->k, kd, t0, t1, lidx, lx);
    lora_add(b, il, TN_LORA_V, c->xn, d, c->v, kd, t0, t1, lidx, lx);
    for (int64_t t = t0; t < t1; t++) {
      const float *cs = c->rope_cs + (t * 2 + (L->swa ? 1 : 0)) * hp->n_rot;
      float *qt = c->q + t * qd, *kt = c->k + t * kd, *vt = c->v + t * kd;
      if (L->bq) {
        tn_vec_add(qt, L->bq, qd);
        tn_vec_add(kt, L->bk, kd);
        tn_vec_add(vt, L->bv, kd);
      }
      ia3_at(b, il, TN_LORA_Q, t, qt, false);
      ia3_at(b, il, TN_LORA_K, t, kt, false);
      ia3_at(b, il, TN_LORA_V, t, vt, false);
      int32_t pos = b->pos[t];
      for (int32_t h = 0; h < hp->n_head; h++) {
        if (L->q_norm) tn_rms_norm(qt + h * hd, L->q_norm, qt + h * hd, hd, hp->norm_eps);
        tn_rope_apply(qt + h * hd, cs, hp->n_rot, hp->rope_neox);
      }
      /* q rounded to f16, as llama.cpp multiplies it with an F16 cache
       * (after its share of the attention scale) */
      if (hp->q_scale != 1.0f) tn_vec_scale(qt, hp->q_scale, qd);
      tn_round_f16(qt, qd);
      for (int32_t h = 0; h < hp->n_head_kv; h++) {
        if (L->k_norm) tn_rms_norm(kt + h * hd, L->k_norm, kt + h * hd, hd, hp->norm_eps);
        tn_rope_apply(kt + h * hd, cs, hp->n_rot, hp->rope_neox);
      }
      const struct tn_kv_seq *s = b->seqs[b->seq[t]];
      int32_t blk = s->blocks[pos / f->lay->block_size];
      int32_t slot = pos % f->lay->block_size;
      if (c->kv_readonly) continue;
      tn_fp32_to_fp16_row(kt, tn_kv_k(f->lay, il, blk, slot), kd);
      tn_fp32_to_fp16_row(vt, tn_kv_v(f->lay, il, blk, slot), kd);
    }
    tn_pool_barrier(pool);

    /* attn[T][qd]: (run, head) pairs dealt round-robin (later runs see
     * more positions, so contiguous slices would be unbalanced) */
    {
      int64_t n_items = (int64_t)c->n_runs * hp->n_head;
      for (int64_t p = ith; p < n_items; p += nth) {
        int32_t r = (int32_t)(p / hp->n_head);
        attend_run(f, il, c->runs[r], c->runs[r + 1], (int32_t)(p % hp->n_head),
                   scores, vrows, acc);
      }
    }
    tn_pool_barrier(pool);
    for (int64_t t = t0; t < t1; t++)
      ia3_at(b, il, TN_LORA_O, t, c->attn + t * qd, true);
    {
      const struct tn_mat *g[1] = {&L->wo};
      quantize_for(c, g, 1, c->attn, T, ith, nth);
    }
    tn_pool_barrier(pool);

    /* tmp[T][d] = attn Wo */
    mm(c, &L->wo, T, c->tmp, ith, nth);
    tn_pool_barrier(pool);

    /* x += post_norm(tmp); xn = ffn_norm(x) */
    lora_add(b, il, TN_LORA_O, c->attn, qd, c->tmp, d, t0, t1, lidx, lx);
    for (int64_t t = t0; t < t1; t++) {
      float *xt = c->x + t * d, *ot = c->tmp + t * d;
      if (L->post_attn_norm) tn_rms_norm(ot, L->post_attn_norm, ot, d, hp->norm_eps);
      residual_add(b, il, TN_BN_ATTN, t, xt, ot, d, lx);
      tn_rms_norm(xt, L->ffn_norm, c->xn + t * d, d, hp->norm_eps);
    }
    {
      const struct tn_mat *g[2] = {&L->w_gate, &L->w_up};
      quantize_for(c, g, 2, c->xn, T, ith, nth);
    }
    tn_pool_barrier(pool);

    /* gate[T][F], up[T][F] */
    mm(c, &L->w_gate, T, c->gate, ith, nth);
    mm(c, &L->w_up, T, c->up, ith, nth);
    tn_pool_barrier(pool);

    lora_add(b, il, TN_LORA_GATE, c->xn, d, c->gate, F, t0, t1, lidx, lx);
    lora_add(b, il, TN_LORA_UP, c->xn, d, c->up, F, t0, t1, lidx, lx);
    for (int64_t t = t0; t < t1; t++) {
      if (gemma)
        tn_gelu_mul(c->gate + t * F, c->up + t * F, F);
      else
        tn_silu_mul(c->gate + t * F, c->up + t * F, F);
      ia3_at(b, il, TN_LORA_DOWN, t, c->gate + t * F, true);
    }
    {
      const struct tn_mat *g[1] = {&L->w_down};
      quantize_for(c, g, 1, c->gate, T, ith, nth);
    }
    tn_pool_barrier(pool);

    /* tmp[T][d] = gate Wd */
    mm(c, &L->w_down, T, c->tmp, ith, nth);
    tn_pool_barrier(pool);

    lora_add(b, il, TN_LORA_DOWN, c->gate, F, c->tmp, d, t0, t1, lidx, lx);
    for (int64_t t = t0; t < t1; t++) {
      float *xt = c->x + t * d, *ot = c->tmp + t * d;
      if (L->post_ffn_norm) tn_rms_norm(ot, L->post_ffn_norm, ot, d, hp->norm_eps);
      residual_add(b, il, TN_BN_FFN, t, xt, ot, d, lx);
    }
    /* The next layer's first op reads only this thread's tokens of x. */
  }

  /* The rows asked for may have been finished by another thread. */
  tn_pool_barrier(pool);

  /* final hidden states for the tokens that asked (embeddings) */
  if (b->hidden) {
    int64_t h0, h1;
    tn_split(T, ith, nth, &h0, &h1);
    for (int64_t t = h0; t < h1; t++)
      if (b->hidden[t])
        tn_rms_norm(c->x + t * d, m->output_norm, c->hidden + t * d, d,
                    hp->norm_eps);
  }

  /* logits for the tokens that asked: out_x[n_out][d] = norm(x) */
  const int64_t n_out = c->n_logits;
  int64_t o0, o1;
  tn_split(n_out, ith, nth, &o0, &o1);
  for (int64_t i = o0; i < o1; i++)
    tn_rms_norm(c->x + (int64_t)c->out_idx[i] * d, m->output_norm,
                c->out_x + i * d, d, hp->norm_eps);
  {
    const struct tn_mat *g[1] = {&m->output};
    quantize_for(c, g, 1, c->out_x, n_out, ith, nth);
  }
  tn_pool_barrier(pool);
  if (n_out > 0) mm(c, &m->output, n_out, c->logits, ith, nth);
}

enum tn_status tn_model_forward(struct tn_ctx *c, struct tn_kv_pool *kv,
                                const struct tn_batch *b,
                                struct tn_error *err) {
  const struct tn_hparams *hp = &c->m->hp;
  if (b->n_tokens <= 0 || b->n_tokens > c->n_tokens_max)
    return tn_error_set(err, TN_EINVAL, "forward: batch of %d tokens (max %d)",
                        b->n_tokens, c->n_tokens_max);
  const struct tn_kv_layout *lay = tn_kv_pool_layout(kv);
  if (lay->n_layer != hp->n_layer ||
      lay->n_kv_dim != hp->n_head_kv * hp->head_dim)
    return tn_error_set(err, TN_EINVAL, "forward: kv cache shape mismatch");
  if (b->n_seqs <= 0 || b->n_seqs > b->n_tokens)
    return tn_error_set(err, TN_EINVAL, "forward: %d sequences for %d tokens",
                        b->n_seqs, b->n_tokens);
  /* Positions of each sequence must rise through the batch: two tokens on
   * one kv slot would be written by two threads at once. */
  int32_t *last = malloc((size_t)b->n_seqs * sizeof(int32_t));
  if (!last) return tn_error_set(err, TN_ENOMEM, "forward: out of memory");
  for (int32_t s = 0; s < b->n_seqs; s++) last[s] = -1;
  int32_t n_out = 0;
  enum tn_status st = TN_OK;
  for (int32_t t = 0; t < b->n_tokens && st == TN_OK; t++) {
    int32_t s = b->seq[t];
    if (s >= 0 && s < b->n_seqs) {
      if (b->pos[t] <= last[s])
        st = tn_error_set(err, TN_EINVAL,
                          "forward: sequence %d has position %d after %d", s,
                          b->pos[t], last[s]);
      last[s] = b->pos[t];
    }
  }
  free(last);
  if (st) return st;
  for (int32_t s = 0; b->lora && s < b->n_seqs; s++) {
    const struct tn_lora *l = b->lora[s];
    if (l && !tn_lora_fits(l, c->m))
      return tn_error_set(err, TN_EINVAL,
                          "forward: sequence %d has an adapter for another "
                          "model",
                          s);
  }
  for (int32_t t = 0; t < b->n_tokens; t++) {
    int32_t tok = b->token[t], pos = b->pos[t], s = b->seq[t];
    if (tok < 0 || tok >= hp->n_vocab)
      return tn_error_set(err, TN_ERANGE,
                          "forward: token id %d out of range [0, %d)", tok,
                          hp->n_vocab);
    if (s < 0 || s >= b->n_seqs)
      return tn_error_set(err, TN_EINVAL, "forward: bad sequence %d", s);
    if (pos < 0 || pos >= c->n_ctx)
      return tn_error_set(err, TN_ERANGE,
                          "forward: position %d outside context %d", pos,
                          c->n_ctx);
    if ((int64_t)pos / lay->block_size >= b->seqs[s]->n_blocks)
      return tn_error_set(err, TN_EINVAL,
                          "forward: position %d has no kv block reserved", pos);
    /* Writing into a block another sequence shares would corrupt it. */
    if (tn_kv_block_refs(kv, b->seqs[s]->blocks[pos / lay->block_size]) != 1)
      return tn_error_set(err, TN_EINVAL,
                          "forward: position %d of sequence %d is in a shared "
                          "kv block",
                          pos, s);
    if (b->logits[t]) {
      if (n_out == c->n_logits_max)
        return tn_error_set(err, TN_EINVAL, "forward: more than %d logits",
                            c->n_logits_max);
      c->out_idx[n_out++] = t;
    }
  }
  c->n_logits = n_out;
  /* Attention runs: consecutive tokens of one sequence at consecutive
   * positions, at most TN_ATTN_RUN long. */
  c->n_runs = 0;
  for (int32_t t = 0; t < b->n_tokens; t++) {
    int32_t r0 = c->n_runs ? c->runs[c->n_runs - 1] : -1;
    bool extend = r0 >= 0 && t - r0 < TN_ATTN_RUN && b->seq[t] == b->seq[t - 1] &&
                  b->pos[t] == b->pos[t - 1] + 1;
    if (!extend) c->runs[c->n_runs++] = t;
  }
  c->runs[c->n_runs] = b->n_tokens;
  struct fwd f = {.c = c, .lay = lay, .b = b};
  tn_pool_run_n(c->pool, c->n_threads, forward_worker, &f);
  return TN_OK;
}
