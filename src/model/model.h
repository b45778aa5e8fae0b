/*
 * model.h: a transformer loaded from GGUF, and its batched forward pass.
 *
 * Architectures: llama (SmolLM2, Llama family), qwen2 (attention biases),
 * gemma3 (sliding-window layers, QK norm, GeGLU, post-norms, embedding
 * scale). Weights stay in their GGUF types as views into the file mapping,
 * owned by the model.
 *
 * tn_model_forward() takes one batch of tokens from any number of
 * sequences. Each token names its sequence (an index into batch.seqs), its
 * position, and whether it wants logits. Every linear layer runs as one
 * matrix product over all tokens, so weights are read once per step. Keys
 * and values go into the sequences' KV blocks; attention for a token reads
 * its own sequence's positions 0..pos (or the sliding window) through the
 * block table. All tokens of a sequence in the batch must have their
 * blocks reserved (tn_kv_seq_reserve) before the call.
 */
#ifndef TN_MODEL_H
#define TN_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "gguf/gguf.h"
#include "kernels/kernels.h"
#include "kv/kv.h"

#define TN_HEAD_DIM_MAX 1024

enum tn_arch {
  TN_ARCH_LLAMA,
  TN_ARCH_QWEN2,
  TN_ARCH_GEMMA3,
  TN_ARCH_COUNT
};

struct tn_hparams {
  enum tn_arch arch;
  int32_t n_vocab;
  int32_t n_ctx_train;
  int32_t n_embd;
  int32_t n_layer;
  int32_t n_head;
  int32_t n_head_kv;
  int32_t head_dim;   /* key and value head size */
  int32_t n_ff;
  int32_t n_rot;      /* dims rotated by RoPE */
  bool rope_neox;
  float rope_base;
  float rope_base_swa; /* for sliding-window layers */
  float rope_scale;    /* freq_scale = 1/factor for linear scaling */
  float rope_scale_swa; /* sliding-window layers are never scaled */
  float norm_eps;
  /* attention scale 1/sqrt(d), split as llama.cpp applies it: q_scale
   * multiplies q before its f16 rounding (Gemma 3: small entries become f16
   * subnormals), kq_scale multiplies q.k (llama, qwen2); the other is 1 */
  float q_scale, kq_scale;
  float embd_scale;    /* multiplies the token embedding (gemma: sqrt(d)) */
  int32_t swa_window;  /* 0: none */
  int32_t swa_period;  /* every swa_period-th layer is global (gemma3: 6) */
};

struct tn_layer {
  const float *attn_norm;      /* [n_embd] */
  struct tn_mat wq, wk, wv, wo;
  const float *bq, *bk, *bv;   /* qwen2 biases, else NULL */
  const float *q_norm, *k_norm; /* gemma3 [head_dim], else NULL */
  const float *post_attn_norm; /* gemma3 */
  const float *ffn_norm;
  struct tn_mat w_gate, w_up, w_down;
  const float *post_ffn_norm;  /* gemma3 */
  bool swa;                    /* sliding-window layer */
};

struct tn_model {
  struct tn_gguf *gguf; /* owned */
  struct tn_hparams hp;
  struct tn_mat tok_embd; /* [n_vocab][n_embd] */
  const float *output_norm;
  const float *rope_freqs; /* [n_rot/2] per-pair divisors (llama 3), or NULL */
  struct tn_mat output;   /* [n_vocab][n_embd]; tok_embd when tied */
  struct tn_layer *layers;
  char name[128];
  size_t weight_bytes;    /* bytes of weight data read per token */
  void **owned;           /* weights rewritten in memory (a merged
                             adapter), freed with the model */
  int n_owned;
};

/* Loads path (GGUF) and checks every tensor the architecture needs:
 * present, right type, right shape. Unsupported architectures or types
 * fail with a message naming them. */
enum tn_status tn_model_load(const char *path, struct tn_model **out,
                             struct tn_error *err);
void tn_model_free(struct tn_model *m);
const char *tn_arch_name(enum tn_arch arch);

/* ---- batches */

struct tn_batch {
  int32_t n_tokens;
  int32_t *token; /* [n_tokens] */
  int32_t *pos;   /* [n_tokens] */
  int32_t *seq;   /* [n_tokens]: index into seqs */
  bool *logits;   /* [n_tokens]: wants logits */
  bool *hidden;   /* [n_tokens] or NULL: wants its final hidden state (after
                     the output norm; tn_ctx_hidden), for embeddings */
  int32_t n_seqs;
  struct tn_kv_seq **seqs; /* borrowed block tables */
  /* per sequence, or NULL when no sequence has one: its LoRA adapter
   * (NULL: the base) and that adapter's scale (lora.h) */
  const struct tn_lora *const *lora;
  const float *lora_scale;
};

/* Forward-pass scratch and output, sized once for the largest batch. */
struct tn_ctx;
struct tn_lora;

/* n_tokens_max: the largest batch; n_ctx: the longest sequence;
 * n_logits_max: most tokens asking for logits in one batch. */
enum tn_status tn_ctx_new(const struct tn_model *m, struct tn_pool *pool,
                          int32_t n_tokens_max, int32_t n_ctx,
                          int32_t n_logits_max, struct tn_ctx **out,
                          struct tn_error *err);
void tn_ctx_free(struct tn_ctx *c);
/* Runs use n_threads of the pool's threads (default and upper bound: all
 * of them; the results do not depend on it). */
void tn_ctx_set_threads(struct tn_ctx *c, int n_threads);
/* Passes run only these layers (rising ids, n of them; NULL: all), then
 * the output norm and head: the target drafting for itself with a subset
 * of its layers. The KV cache stays the whole model's: a subset pass
 * writes the rows of its own layers only. */
enum tn_status tn_ctx_set_layers(struct tn_ctx *c, const int32_t *layers,
                                 int32_t n, struct tn_error *err);
/* Passes attend to what the cache holds, their own positions included,
 * and write nothing to it (calibrate-self scores a layer subset against
 * the full model's cache this way: a draft in serving reads that cache
 * for the text before it). */
void tn_ctx_set_kv_readonly(struct tn_ctx *c, bool readonly);

/* Runs the batch. Logits of the tokens that asked for them, in batch
 * order, are at tn_ctx_logits(c)[i * n_vocab]. */
enum tn_status tn_model_forward(struct tn_ctx *c, struct tn_kv_pool *kv,
                                const struct tn_batch *b,
                                struct tn_error *err);
const float *tn_ctx_logits(const struct tn_ctx *c);
/* The final hidden state (output norm applied) of batch token t, when
 * tn_batch.hidden[t] asked for it: n_embd floats at [t * n_embd]. */
const float *tn_ctx_hidden(const struct tn_ctx *c);
int32_t tn_ctx_n_logits(const struct tn_ctx *c);

#endif /* TN_MODEL_H */
