/*
 * lora.h: LoRA adapters on a frozen base model, applied per sequence.
 *
 * An adapter adds scale * B (A x) to the output of some of the base's
 * linear layers (the attention's q, k, v, output projections and the
 * FFN's gate, up, down). A is [rank][n_in], B is [n_out][rank], both kept
 * in f32. The base's matrix products run once for the whole batch; each
 * token whose sequence has an adapter then adds its low-rank term, in the
 * same order of operations whatever else is in the batch (batch
 * invariance), so sequences on different adapters and on the base share a
 * step.
 *
 * Files (untrusted input: every shape, value and offset is checked):
 *  - llama.cpp's LoRA GGUF (general.type = adapter, adapter.type = lora,
 *    adapter.lora.alpha, tensors "<base tensor>.lora_a" / ".lora_b"), as
 *    llama.cpp's convert_lora_to_gguf.py writes it; the scale of a pair is
 *    alpha / rank (1 when alpha is 0 or absent), as llama.cpp applies it.
 *  - PEFT's directory (adapter_config.json + adapter_model.safetensors):
 *    module names mapped to the base's, llama's q/k rows permuted the way
 *    the GGUF converter permutes the base, scale lora_alpha / r, or
 *    lora_alpha / sqrt(r) with use_rslora.
 *  - PEFT's (IA)3 directory (peft_type IA3): learned scales of k, v (or
 *    any target's) outputs, and of the inputs of feedforward modules
 *    whose input no other matrix shares (down, attention output); scaled
 *    by the request's scale as s * (l - 1) + 1, so 0 is the base.
 * What is not supported is refused by name: DoRA, embedding or lm_head
 * targets, modules_to_save, alpha_pattern, biases, norm tensors, aLoRA.
 */
#ifndef TN_LORA_H
#define TN_LORA_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "model/model.h"

#define TN_LORA_RANK_MAX 256

enum tn_lora_target {
  TN_LORA_Q,
  TN_LORA_K,
  TN_LORA_V,
  TN_LORA_O,
  TN_LORA_GATE,
  TN_LORA_UP,
  TN_LORA_DOWN,
  TN_LORA_N_TARGETS
};

/* One adapted matrix: a LoRA pair (rank > 0) or an (IA)3 scale (ia3 not
 * NULL); neither: this layer's matrix is not adapted. */
struct tn_lora_mat {
  int32_t rank;
  float *ia3;   /* (IA)3: n_out scales of the output (after its bias), or
                   with ia3_in n_in scales of the input */
  bool ia3_in;
  int64_t n_in, n_out;
  float *a;    /* [rank][n_in] */
  float *b;    /* B: [rank][n_out] (transposed) when rank < 64, else
                  [n_out][rank] (see tn_lora_apply_seg) */
  float scale; /* alpha / rank (or its rsLoRA form) */
  /* the file's storage type, whose width the products' inputs are rounded
   * to, as ggml and PyTorch compute with F16 / BF16 weights: TN_TYPE_F32
   * (no rounding), TN_TYPE_F16 or TN_TYPE_BF16 */
  enum tn_type act_type;
};

enum tn_adapter_kind { TN_ADAPTER_LORA, TN_ADAPTER_IA3, TN_ADAPTER_BOTTLENECK };

/* Bottleneck adapter modules (Houlsby / Pfeiffer; bottleneck.c, and
 * docs/ADAPTERS.md for the file layout). A module sits where a layer's
 * sublayer output o (attention after its output projection, or the FFN
 * after its down projection; after Gemma's post-norm) joins the residual
 * stream x, and makes it
 *     x' = (s * scale * (W_up act(W_down in + b_down) + b_up) + o) + x
 * with `in` the module's input: o ("output", Houlsby), x + o ("sum",
 * Pfeiffer) or x ("stream", a parallel adapter). */
enum tn_bn_site { TN_BN_ATTN, TN_BN_FFN, TN_BN_N_SITES };
enum tn_bn_input { TN_BN_IN_OUTPUT, TN_BN_IN_SUM, TN_BN_IN_STREAM };
enum tn_bn_act {
  TN_BN_RELU, TN_BN_SILU, TN_BN_GELU, TN_BN_GELU_TANH, TN_BN_TANH,
  TN_BN_SIGMOID, TN_BN_LEAKY_RELU, TN_BN_IDENTITY
};

struct tn_bn_module {
  int32_t dim;    /* bottleneck width; 0: no module here */
  float *down_t;  /* [n_embd][dim]: W_down transposed */
  float *down_b;  /* [dim] */
  float *up_t;    /* [dim][n_embd]: W_up transposed */
  float *up_b;    /* [n_embd] */
  float *scale;   /* [n_embd] */
};

struct tn_lora {
  uint64_t id;          /* unique in the process: salts the prefix cache */
  enum tn_adapter_kind kind;
  char name[64];        /* set by the registry that holds it (metrics) */
  enum tn_arch arch;     /* the base it was checked against */
  int32_t n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim;
  struct tn_lora_mat *mats; /* [n_layer][TN_LORA_N_TARGETS] */
  int32_t max_rank;
  int32_t n_mats;       /* adapted matrices (bottleneck: modules) */
  /* bottleneck only: [n_layer][TN_BN_N_SITES] modules, their activation
   * and each site's input */
  struct tn_bn_module *bn;
  enum tn_bn_act bn_act;
  enum tn_bn_input bn_input[TN_BN_N_SITES];
  size_t bytes;         /* resident f32 weights */
  char format[16];      /* "gguf" or "peft" */
  atomic_int refs;
};

/* Loads the adapter at path (a LoRA GGUF file, or a PEFT directory) for
 * model m, checking it fits m (architecture, layer count, every shape);
 * refs = 1. */
enum tn_status tn_lora_load(const struct tn_model *m, const char *path,
                            struct tn_lora **out, struct tn_error *err);
void tn_lora_retain(struct tn_lora *l);
/* Frees it with the last reference (NULL: nothing). */
void tn_lora_release(struct tn_lora *l);

/* Tokens of one adapter whose products share a sweep over its weights. */
#define TN_LORA_SEG 8

/* For each of n (<= TN_LORA_SEG) tokens t: y[t][n_out] += s[t] *
 * mat.scale * B (A x[t]), x[t] and A x[t] rounded to act_type first.
 * Each dot is summed as tn_attn_dot sums it (ggml's F16 dot order):
 * below 64 terms that is a double sum in order, which for B runs over a
 * transposed copy, all outputs at once. A's and B's rows are read once
 * for all n tokens (a segment, as Punica's SGMV gathers an adapter's
 * rows); each token's arithmetic is the same whatever the segment holds,
 * so the result does not depend on the batch. scratch: tn_lora_scratch()
 * floats. */
void tn_lora_apply_seg(const struct tn_lora_mat *mat, int n, const float *s,
                       const float *const *x, float *const *y,
                       float *scratch);
/* The residual join at a bottleneck site: x[n_embd] becomes x + o, plus
 * the module's term when l has one at (il, site) (s: the request's scale).
 * scratch: tn_lora_scratch() floats. The same operations for a token
 * whatever the batch. */
void tn_bn_residual(const struct tn_lora *l, int32_t il, enum tn_bn_site site,
                    float s, float *x, const float *o, float *scratch);
/* Scratch floats tn_lora_apply_seg and tn_bn_residual need for model m. */
int64_t tn_lora_scratch(const struct tn_model *m);
/* (IA)3: x[n] *= s * (l - 1) + 1. */
void tn_lora_ia3_scale(const float *l, float s, float *x, int64_t n);

/* Merged mode: folds s * l into m's weights. Each adapted matrix becomes
 * a copy the model owns: every row dequantized to f32, plus s * scale *
 * (B A) of that row (summed in double), quantized to `type`
 * (TN_TYPE_COUNT: its own type when that has 8 bits per weight or more,
 * else Q8_0: a 4-bit type's rounding erases the update; lora.c says what
 * was measured). m must not be running. */
enum tn_status tn_lora_merge(struct tn_model *m, const struct tn_lora *l,
                             float s, enum tn_type type,
                             struct tn_error *err);
/* The base matrix an adapter target is applied to. */
struct tn_mat *tn_lora_base_mat(struct tn_model *m, int32_t il,
                                enum tn_lora_target t);
/* "blk.<il>.<target>.weight" (n bytes) -> il, t; false when the name is
 * none of m's adapted matrices. */
bool tn_lora_parse_tensor_name(const struct tn_model *m, const char *s,
                               size_t n, int32_t *il, enum tn_lora_target *t);
/* The base tensor name of a target: "blk.<il>.attn_q.weight", ... */
void tn_lora_tensor_name(int32_t il, enum tn_lora_target t, char *out,
                         size_t cap);

/* Internal to the model layer: lora.c's loader hands a GGUF whose
 * adapter.type is "bottleneck" to bottleneck.c, which fills l's kind, bn,
 * bn_act, bn_input, n_mats and bytes; tn_bn_free frees what it filled. */
struct tn_gguf;
enum tn_status tn_bn_load_gguf(const struct tn_gguf *g, const char *path,
                               struct tn_lora *l, struct tn_error *err);
void tn_bn_free(struct tn_lora *l);

/* "lora", "ia3" or "bottleneck" */
const char *tn_adapter_kind_name(enum tn_adapter_kind k);

/* Whether l was checked against a model of m's shape. */
bool tn_lora_fits(const struct tn_lora *l, const struct tn_model *m);

/* The chain-hash salt of KV computed under (l, scale): 0 for the base. */
uint64_t tn_lora_salt(const struct tn_lora *l, float scale);

#endif /* TN_LORA_H */
