/*
 * model.c: loading a transformer from GGUF and checking its tensors.
 *
 * Every tensor an architecture needs is looked up by its GGUF name and
 * checked for presence, type (something we can compute with) and shape
 * before the model is handed out; a model that loads never fails later for
 * a missing or misshapen weight. The forward pass is in forward.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/model_internal.h"

static const char *arch_names[TN_ARCH_COUNT] = {
    [TN_ARCH_LLAMA] = "llama",
    [TN_ARCH_QWEN2] = "qwen2",
    [TN_ARCH_GEMMA3] = "gemma3",
};

const char *tn_arch_name(enum tn_arch arch) {
  return (arch >= 0 && arch < TN_ARCH_COUNT) ? arch_names[arch] : "?";
}

/* Prints s into buf with non-printable bytes escaped (names come from
 * untrusted files). */
static const char *escape(struct tn_str s, char *buf, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < s.len && o + 5 < cap; i++) {
    unsigned char ch = (unsigned char)s.data[i];
    if (ch >= 0x20 && ch < 0x7f && ch != '\\')
      buf[o++] = (char)ch;
    else
      o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
  }
  if (s.len && o + 5 >= cap && o + 4 < cap) {
    memcpy(buf + o, "...", 3);
    o += 3;
  }
  buf[o] = '\0';
  return buf;
}

struct loader {
  struct tn_model *m;
  struct tn_error *err;
  char arch[32];
};

static enum tn_status get_u32(struct loader *ld, const char *suffix,
                              bool required, uint32_t def, uint32_t *out) {
  char key[160];
  snprintf(key, sizeof(key), "%s.%s", ld->arch, suffix);
  enum tn_status st = tn_gguf_get_u32(ld->m->gguf, key, out, ld->err);
  if (st == TN_ENOENT) {
    if (required)
      return tn_error_set(ld->err, TN_EFORMAT, "model: missing key '%s'", key);
    *out = def;
    return TN_OK;
  }
  return st;
}

static enum tn_status get_f32(struct loader *ld, const char *suffix,
                              float def, float *out) {
  char key[160];
  snprintf(key, sizeof(key), "%s.%s", ld->arch, suffix);
  enum tn_status st = tn_gguf_get_f32(ld->m->gguf, key, out, ld->err);
  if (st == TN_ENOENT) {
    *out = def;
    return TN_OK;
  }
  return st;
}

/* A 2-D weight [n_rows][n_cols] (GGUF ne = {n_cols, n_rows}). */
static enum tn_status get_mat(struct loader *ld, const char *name,
                              int64_t n_cols, int64_t n_rows, bool optional,
                              struct tn_mat *out) {
  memset(out, 0, sizeof(*out));
  const struct tn_gguf_tensor *t = tn_gguf_find_tensor(ld->m->gguf, name);
  if (!t) {
    if (optional) return TN_OK;
    return tn_error_set(ld->err, TN_EFORMAT, "model: missing tensor '%s'",
                        name);
  }
  if (t->n_dims > 2 || t->ne[0] != n_cols || t->ne[1] != n_rows)
    return tn_error_set(ld->err, TN_EFORMAT,
                        "model: tensor '%s' has shape [%lld, %lld], expected "
                        "[%lld, %lld]",
                        name, (long long)t->ne[0], (long long)t->ne[1],
                        (long long)n_cols, (long long)n_rows);
  const struct tn_type_traits *tt = tn_type_get(t->type);
  if (!tt || !tt->vec_dot || !tt->to_float)
    return tn_error_set(ld->err, TN_EUNSUPPORTED,
                        "model: tensor '%s' has type %s, which tern cannot "
                        "compute with yet",
                        name, tn_type_name(t->type));
  size_t align = t->type == TN_TYPE_F32 ? 4 : 2;
  if (((uintptr_t)t->data % align) != 0)
    return tn_error_set(ld->err, TN_EFORMAT,
                        "model: tensor '%s' is not %zu-byte aligned", name,
                        align);
  out->type = t->type;
  out->n_cols = n_cols;
  out->n_rows = n_rows;
  out->row_size = tn_type_row_size(t->type, n_cols);
  out->data = t->data;
  return TN_OK;
}

/* A 1-D F32 vector of n elements. */
static enum tn_status get_vec(struct loader *ld, const char *name, int64_t n,
                              bool optional, const float **out) {
  *out = NULL;
  const struct tn_gguf_tensor *t = tn_gguf_find_tensor(ld->m->gguf, name);
  if (!t) {
    if (optional) return TN_OK;
    return tn_error_set(ld->err, TN_EFORMAT, "model: missing tensor '%s'",
                        name);
  }
  if (t->type != TN_TYPE_F32)
    return tn_error_set(ld->err, TN_EUNSUPPORTED,
                        "model: tensor '%s' has type %s, expected F32", name,
                        tn_type_name(t->type));
  if (t->n_dims != 1 || t->ne[0] != n)
    return tn_error_set(ld->err, TN_EFORMAT,
                        "model: tensor '%s' has %u dims, first %lld; expected "
                        "[%lld]",
                        name, t->n_dims, (long long)t->ne[0], (long long)n);
  if (((uintptr_t)t->data & 3u) != 0)
    return tn_error_set(ld->err, TN_EFORMAT,
                        "model: tensor '%s' is not 4-byte aligned", name);
  *out = t->data;
  return TN_OK;
}

static enum tn_status load_hparams(struct loader *ld) {
  struct tn_model *m = ld->m;
  struct tn_hparams *hp = &m->hp;
  struct tn_gguf *g = m->gguf;
  struct tn_error *err = ld->err;
  enum tn_status st;
  uint32_t v;

  struct tn_str arch;
  st = tn_gguf_get_str(g, "general.architecture", &arch, err);
  if (st == TN_ENOENT)
    return tn_error_set(err, TN_EFORMAT,
                        "model: missing key 'general.architecture'");
  if (st) return st;
  char ebuf[80];
  hp->arch = TN_ARCH_COUNT;
  for (int a = 0; a < TN_ARCH_COUNT; a++)
    if (tn_str_eq(arch, arch_names[a])) hp->arch = (enum tn_arch)a;
  if (hp->arch == TN_ARCH_COUNT)
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "model: unsupported architecture '%s' (tern runs "
                        "llama, qwen2, gemma3)",
                        escape(arch, ebuf, sizeof(ebuf)));
  snprintf(ld->arch, sizeof(ld->arch), "%s", arch_names[hp->arch]);

  struct tn_str name;
  if (tn_gguf_get_str(g, "general.name", &name, NULL) == TN_OK)
    escape(name, m->name, sizeof(m->name));
  else
    snprintf(m->name, sizeof(m->name), "%s", ld->arch);

  if ((st = get_u32(ld, "embedding_length", true, 0, &v))) return st;
  hp->n_embd = (int32_t)v;
  if ((st = get_u32(ld, "block_count", true, 0, &v))) return st;
  hp->n_layer = (int32_t)v;
  if ((st = get_u32(ld, "feed_forward_length", true, 0, &v))) return st;
  hp->n_ff = (int32_t)v;
  if ((st = get_u32(ld, "attention.head_count", true, 0, &v))) return st;
  hp->n_head = (int32_t)v;
  if ((st = get_u32(ld, "attention.head_count_kv", false, v, &v))) return st;
  hp->n_head_kv = (int32_t)v;
  if ((st = get_u32(ld, "context_length", false, 2048, &v))) return st;
  hp->n_ctx_train = (int32_t)v;

  /* Bounds that keep every later product far from overflow. */
  if (hp->n_embd <= 0 || hp->n_embd > 65536 || hp->n_layer <= 0 ||
      hp->n_layer > 1024 || hp->n_ff <= 0 || hp->n_ff > 1 << 20 ||
      hp->n_head <= 0 || hp->n_head > 1024 || hp->n_head_kv <= 0 ||
      hp->n_head % hp->n_head_kv != 0 || hp->n_ctx_train <= 0)
    return tn_error_set(err, TN_EFORMAT,
                        "model: implausible hyper-parameters (embd %d, layers "
                        "%d, ff %d, heads %d/%d, ctx %d)",
                        hp->n_embd, hp->n_layer, hp->n_ff, hp->n_head,
                        hp->n_head_kv, hp->n_ctx_train);

  uint32_t def_hd = (uint32_t)(hp->n_embd / hp->n_head);
  if ((st = get_u32(ld, "attention.key_length", false, def_hd, &v))) return st;
  hp->head_dim = (int32_t)v;
  uint32_t vlen;
  if ((st = get_u32(ld, "attention.value_length", false, v, &vlen))) return st;
  if (vlen != v || hp->head_dim <= 0 || hp->head_dim > TN_HEAD_DIM_MAX ||
      hp->head_dim % 2 != 0)
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "model: head sizes key %u / value %u not supported",
                        v, vlen);
  if ((st = get_u32(ld, "rope.dimension_count", false,
                    (uint32_t)hp->head_dim, &v)))
    return st;
  hp->n_rot = (int32_t)v;
  if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2)
    return tn_error_set(err, TN_EFORMAT, "model: rope.dimension_count %d "
                        "does not fit head size %d", hp->n_rot, hp->head_dim);

  if ((st = get_f32(ld, "rope.freq_base", 10000.0f, &hp->rope_base))) return st;
  float factor = 1.0f;
  struct tn_str stype;
  char key[160];
  snprintf(key, sizeof(key), "%s.rope.scaling.type", ld->arch);
  if (tn_gguf_get_str(g, key, &stype, NULL) == TN_OK &&
      !tn_str_eq(stype, "none")) {
    if (!tn_str_eq(stype, "linear"))
      return tn_error_set(err, TN_EUNSUPPORTED,
                          "model: rope scaling '%s' not supported",
                          escape(stype, ebuf, sizeof(ebuf)));
    if ((st = get_f32(ld, "rope.scaling.factor", 1.0f, &factor))) return st;
    if (!(factor > 0.0f)) factor = 1.0f;
  }
  hp->rope_scale = 1.0f / factor;
  if ((st = get_f32(ld, "attention.layer_norm_rms_epsilon", 1e-5f,
                    &hp->norm_eps)))
    return st;

  hp->rope_neox = hp->arch != TN_ARCH_LLAMA;
  hp->q_scale = 1.0f;
  hp->kq_scale = 1.0f / sqrtf((float)hp->head_dim);
  hp->embd_scale = 1.0f;
  hp->rope_base_swa = hp->rope_base;
  hp->rope_scale_swa = hp->rope_scale;
  if (hp->arch == TN_ARCH_GEMMA3) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    hp->q_scale = hp->kq_scale;
    hp->kq_scale = 1.0f;
    if ((st = get_u32(ld, "attention.sliding_window", false, 0, &v))) return st;
    hp->swa_window = (int32_t)v;
    hp->swa_period = 6;
    hp->rope_base_swa = 10000.0f;
    hp->rope_scale_swa = 1.0f;
  }
  return TN_OK;
}

static enum tn_status load_tensors(struct loader *ld) {
  struct tn_model *m = ld->m;
  struct tn_hparams *hp = &m->hp;
  enum tn_status st;
  int64_t d = hp->n_embd, q_dim = (int64_t)hp->n_head * hp->head_dim,
          kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;

  const struct tn_gguf_tensor *te = tn_gguf_find_tensor(m->gguf,
                                                        "token_embd.weight");
  if (!te)
    return tn_error_set(ld->err, TN_EFORMAT,
                        "model: missing tensor 'token_embd.weight'");
  if (te->ne[1] <= 0 || te->ne[1] > (1 << 24))
    return tn_error_set(ld->err, TN_EFORMAT, "model: vocabulary of %lld "
                        "tokens not supported", (long long)te->ne[1]);
  hp->n_vocab = (int32_t)te->ne[1];
  if ((st = get_mat(ld, "token_embd.weight", d, hp->n_vocab, false,
                    &m->tok_embd)))
    return st;
  if ((st = get_vec(ld, "output_norm.weight", d, false, &m->output_norm)))
    return st;
  if ((st = get_mat(ld, "output.weight", d, hp->n_vocab, true, &m->output)))
    return st;
  if ((st = get_vec(ld, "rope_freqs.weight", hp->n_rot / 2, true,
                    &m->rope_freqs)))
    return st;
  if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */

  m->layers = calloc((size_t)hp->n_layer, sizeof(*m->layers));
  if (!m->layers) return tn_error_set(ld->err, TN_ENOMEM, "model: out of memory");
  bool gemma = hp->arch == TN_ARCH_GEMMA3, qwen = hp->arch == TN_ARCH_QWEN2;
  size_t bytes = m->output.row_size * (size_t)hp->n_vocab;
  for (int32_t il = 0; il < hp->n_layer; il++) {
    struct tn_layer *L = &m->layers[il];
    char n[96];
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    if ((st = get_vec(ld, NAME("attn_norm.weight"), d, false, &L->attn_norm)) ||
        (st = get_mat(ld, NAME("attn_q.weight"), d, q_dim, false, &L->wq)) ||
        (st = get_mat(ld, NAME("attn_k.weight"), d, kv_dim, false, &L->wk)) ||
        (st = get_mat(ld, NAME("attn_v.weight"), d, kv_dim, false, &L->wv)) ||
        (st = get_mat(ld, NAME("attn_output.weight"), q_dim, d, false, &L->wo)) ||
        (st = get_vec(ld, NAME("ffn_norm.weight"), d, false, &L->ffn_norm)) ||
        (st = get_mat(ld, NAME("ffn_gate.weight"), d, hp->n_ff, false, &L->w_gate)) ||
        (st = get_mat(ld, NAME("ffn_up.weight"), d, hp->n_ff, false, &L->w_up)) ||
        (st = get_mat(ld, NAME("ffn_down.weight"), hp->n_ff, d, false, &L->w_down)))
      return st;
    if (qwen) {
      if ((st = get_vec(ld, NAME("attn_q.bias"), q_dim, false, &L->bq)) ||
          (st = get_vec(ld, NAME("attn_k.bias"), kv_dim, false, &L->bk)) ||
          (st = get_vec(ld, NAME("attn_v.bias"), kv_dim, false, &L->bv)))
        return st;
    }
    if (gemma) {
      if ((st = get_vec(ld, NAME("attn_q_norm.weight"), hp->head_dim, false, &L->q_norm)) ||
          (st = get_vec(ld, NAME("attn_k_norm.weight"), hp->head_dim, false, &L->k_norm)) ||
          (st = get_vec(ld, NAME("post_attention_norm.weight"), d, false, &L->post_attn_norm)) ||
          (st = get_vec(ld, NAME("post_ffw_norm.weight"), d, false, &L->post_ffn_norm)))
        return st;
      L->swa = hp->swa_window > 0 && (il + 1) % hp->swa_period != 0;
    }
#undef NAME
    bytes += L->wq.row_size * (size_t)L->wq.n_rows +
             L->wk.row_size * (size_t)L->wk.n_rows +
             L->wv.row_size * (size_t)L->wv.n_rows +
             L->wo.row_size * (size_t)L->wo.n_rows +
             L->w_gate.row_size * (size_t)L->w_gate.n_rows +
             L->w_up.row_size * (size_t)L->w_up.n_rows +
             L->w_down.row_size * (size_t)L->w_down.n_rows;
  }
  m->weight_bytes = bytes;
  return TN_OK;
}

enum tn_status tn_model_load(const char *path, struct tn_model **out,
                             struct tn_error *err) {
  *out = NULL;
  struct tn_model *m = calloc(1, sizeof(*m));
  if (!m) return tn_error_set(err, TN_ENOMEM, "model: out of memory");
  struct loader ld = {.m = m, .err = err};
  enum tn_status st = tn_gguf_open(path, &m->gguf, err);
  if (st) goto fail;
  if ((st = load_hparams(&ld))) goto fail;
  if ((st = load_tensors(&ld))) goto fail;
  *out = m;
  return TN_OK;
fail:
  tn_model_free(m);
  return st;
}

void tn_model_free(struct tn_model *m) {
  if (!m) return;
  for (int i = 0; i < m->n_owned; i++) tn_aligned_free(m->owned[i]);
  free(m->owned);
  free(m->layers);
  tn_gguf_close(m->gguf);
  free(m);
}
