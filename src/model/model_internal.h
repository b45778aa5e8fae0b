/*
 * model_internal.h: the forward-pass context, shared by model.c and
 * forward.c.
 */
#ifndef TN_MODEL_INTERNAL_H
#define TN_MODEL_INTERNAL_H

#include "model/lora.h"
#include "model/model.h"

/* Attention takes up to this many consecutive tokens of one sequence at a
 * time, so each cached k/v row is converted once for all of them. */
#define TN_ATTN_RUN 8

struct tn_ctx {
  const struct tn_model *m;
  struct tn_pool *pool;
  int n_threads;  /* of the pool's, used by this context's runs */
  int32_t n_tokens_max, n_ctx, n_logits_max;
  /* scratch, T = n_tokens_max */
  float *x;      /* [T][n_embd] residual stream */
  float *xn;     /* [T][n_embd] normed input of a block */
  float *q;      /* [T][n_head*head_dim] */
  float *k, *v;  /* [T][n_head_kv*head_dim] */
  float *attn;   /* [T][n_head*head_dim] */
  float *tmp;    /* [T][n_embd] block output */
  float *gate, *up; /* [T][n_ff] */
  float *scores; /* [n_threads][TN_ATTN_RUN][n_ctx] attention weights */
  float *attn_acc; /* [n_threads][64][head_dim] value sums, one token's */
  const uint16_t **vrows; /* [n_threads][n_ctx] value rows of a sequence */
  int32_t *lora_idx; /* [n_threads][n_tokens_max] adapters' token lists */
  float *lora_x;     /* [n_threads][tn_lora_scratch] adapter scratch */
  int32_t *runs; /* [T]: first batch index of each attention run */
  int32_t n_runs;
  float *rope_cs; /* [T][2][n_rot]: (cos, sin) per pair, global/swa base */
  void *qbuf[TN_TYPE_COUNT]; /* quantized activations by vec_dot_type */
  /* output */
  float *out_x;     /* [n_logits_max][n_embd] */
  float *logits;    /* [n_logits_max][n_vocab] */
  int32_t *out_idx; /* [n_logits_max]: batch index of each logits row */
  float *hidden;    /* [n_tokens_max][n_embd]: final-norm hidden states of
                       the tokens tn_batch.hidden asks for */
  int32_t n_logits;
  /* the layers a pass runs, in order (NULL: all; tn_ctx_set_layers) */
  int32_t *layers;
  int32_t n_layers;
  bool kv_readonly; /* passes read the cache and write nothing to it */
};

#endif /* TN_MODEL_INTERNAL_H */
