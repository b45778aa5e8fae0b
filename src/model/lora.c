/*
 * lora.c: loading LoRA adapters (llama.cpp GGUF, PEFT directories) and
 * applying one to a token (see lora.h).
 */
#include "model/lora.h"

#include <jansson.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf/gguf.h"
#include "kernels/kernels.h"

static atomic_uint_fast64_t next_id = 1;

static const char *const gguf_names[TN_LORA_N_TARGETS] = {
    [TN_LORA_Q] = "attn_q",        [TN_LORA_K] = "attn_k",
    [TN_LORA_V] = "attn_v",        [TN_LORA_O] = "attn_output",
    [TN_LORA_GATE] = "ffn_gate",   [TN_LORA_UP] = "ffn_up",
    [TN_LORA_DOWN] = "ffn_down",
};
static const char *const peft_names[TN_LORA_N_TARGETS] = {
    [TN_LORA_Q] = "self_attn.q_proj", [TN_LORA_K] = "self_attn.k_proj",
    [TN_LORA_V] = "self_attn.v_proj", [TN_LORA_O] = "self_attn.o_proj",
    [TN_LORA_GATE] = "mlp.gate_proj", [TN_LORA_UP] = "mlp.up_proj",
    [TN_LORA_DOWN] = "mlp.down_proj",
};

static const struct tn_mat *base_mat(const struct tn_model *m, int32_t il,
                                     enum tn_lora_target t) {
  const struct tn_layer *L = &m->layers[il];
  switch (t) {
  case TN_LORA_Q: return &L->wq;
  case TN_LORA_K: return &L->wk;
  case TN_LORA_V: return &L->wv;
  case TN_LORA_O: return &L->wo;
  case TN_LORA_GATE: return &L->w_gate;
  case TN_LORA_UP: return &L->w_up;
  case TN_LORA_DOWN: return &L->w_down;
  case TN_LORA_N_TARGETS: break;
  }
  return NULL;
}

/* ---- building an adapter */

struct build {
  unsigned ia3_ff; /* (IA)3 targets that scale their input, by bit */
  const struct tn_model *m;
  struct tn_lora *l;
  const char *path;
  struct tn_error *err;
  void *row;      /* one source row, copied aligned */
  size_t row_cap;
};

static struct tn_lora *lora_new(const struct tn_model *m) {
  struct tn_lora *l = calloc(1, sizeof(*l));
  if (!l) return NULL;
  l->arch = m->hp.arch;
  l->n_layer = m->hp.n_layer;
  l->n_embd = m->hp.n_embd;
  l->n_ff = m->hp.n_ff;
  l->n_head = m->hp.n_head;
  l->n_head_kv = m->hp.n_head_kv;
  l->head_dim = m->hp.head_dim;
  l->mats = calloc((size_t)m->hp.n_layer * TN_LORA_N_TARGETS,
                   sizeof(*l->mats));
  if (!l->mats) {
    free(l);
    return NULL;
  }
  l->id = atomic_fetch_add(&next_id, 1);
  atomic_init(&l->refs, 1);
  return l;
}

static void lora_free(struct tn_lora *l) {
  if (!l) return;
  for (int32_t i = 0; i < l->n_layer * TN_LORA_N_TARGETS; i++) {
    free(l->mats[i].a);
    free(l->mats[i].b);
    free(l->mats[i].ia3);
  }
  free(l->mats);
  tn_bn_free(l);
  free(l);
}

void tn_lora_retain(struct tn_lora *l) {
  if (l) atomic_fetch_add(&l->refs, 1);
}

void tn_lora_release(struct tn_lora *l) {
  if (l && atomic_fetch_sub(&l->refs, 1) == 1) lora_free(l);
}

/* Copies src (rows of n_cols values of its type) into dst as f32, row r of
 * dst taking row perm[r] of src (perm NULL: the same row); every value
 * must be finite. */
static enum tn_status copy_rows(struct build *bd, const char *what,
                                const struct tn_mat *src, float *dst,
                                const int32_t *perm) {
  if (src->row_size > bd->row_cap) {
    void *p = realloc(bd->row, src->row_size);
    if (!p) return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
    bd->row = p;
    bd->row_cap = src->row_size;
  }
  struct tn_mat one = *src;
  one.n_rows = 1;
  one.data = bd->row;
  for (int64_t r = 0; r < src->n_rows; r++) {
    int64_t from = perm ? perm[r] : r;
    memcpy(bd->row, (const char *)src->data + (size_t)from * src->row_size,
           src->row_size);
    float *y = dst + r * src->n_cols;
    tn_mat_get_row(&one, 0, y);
    for (int64_t c = 0; c < src->n_cols; c++)
      if (!isfinite(y[c]))
        return tn_error_set(bd->err, TN_EFORMAT,
                            "%s: %s has a non-finite value (%g) at [%lld, %lld]",
                            bd->path, what, (double)y[c], (long long)r,
                            (long long)c);
  }
  return TN_OK;
}

/* Row order of a llama q or k projection in GGUF from Hugging Face's: the
 * converter interleaves each head's two rotary halves (HF's rotate_half
 * layout to GGUF's pairs), so GGUF row h*hd + 2i + j is HF row
 * h*hd + j*hd/2 + i. */
static int32_t *llama_qk_perm(int64_t n_out, int32_t n_head) {
  int64_t hd = n_out / n_head;
  int32_t *p = malloc((size_t)n_out * sizeof(int32_t));
  if (!p) return NULL;
  for (int32_t h = 0; h < n_head; h++)
    for (int64_t i = 0; i < hd / 2; i++)
      for (int64_t j = 0; j < 2; j++)
        p[h * hd + 2 * i + j] = (int32_t)(h * hd + j * (hd / 2) + i);
  return p;
}

/* Sets layer il's target t from A [rank][n_in] and B [n_out][rank]. */
static enum tn_status set_pair(struct build *bd, int32_t il,
                               enum tn_lora_target t, const char *name,
                               const struct tn_mat *a, const struct tn_mat *b,
                               float alpha, bool rslora, bool permute) {
  const struct tn_mat *w = base_mat(bd->m, il, t);
  struct tn_lora_mat *lm = &bd->l->mats[il * TN_LORA_N_TARGETS + t];
  if (lm->rank || lm->ia3)
    return tn_error_set(bd->err, TN_EFORMAT, "%s: '%s' appears twice",
                        bd->path, name);
  int64_t rank = a->n_rows;
  if (rank < 1 || rank > TN_LORA_RANK_MAX)
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: '%s' has rank %lld (tern takes 1..%d)", bd->path,
                        name, (long long)rank, TN_LORA_RANK_MAX);
  if (a->n_cols != w->n_cols || b->n_rows != w->n_rows || b->n_cols != rank)
    return tn_error_set(
        bd->err, TN_EFORMAT,
        "%s: '%s' has A [%lld x %lld] and B [%lld x %lld], the base's matrix "
        "is [%lld x %lld] (an adapter for another base model?)",
        bd->path, name, (long long)a->n_rows, (long long)a->n_cols,
        (long long)b->n_rows, (long long)b->n_cols, (long long)w->n_rows,
        (long long)w->n_cols);
  lm->rank = (int32_t)rank;
  lm->n_in = w->n_cols;
  lm->n_out = w->n_rows;
  /* F16 or BF16 pairs compute at that width; anything else (F32, Q8_0) in
   * f32 */
  lm->act_type = a->type == b->type &&
                         (a->type == TN_TYPE_F16 || a->type == TN_TYPE_BF16)
                     ? a->type
                     : TN_TYPE_F32;
  lm->scale = alpha != 0.0f
                  ? (rslora ? alpha / sqrtf((float)rank) : alpha / (float)rank)
                  : 1.0f;
  lm->a = malloc((size_t)rank * (size_t)lm->n_in * sizeof(float));
  lm->b = malloc((size_t)rank * (size_t)lm->n_out * sizeof(float));
  if (!lm->a || !lm->b)
    return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
  int32_t *perm = NULL;
  if (permute && (t == TN_LORA_Q || t == TN_LORA_K)) {
    perm = llama_qk_perm(lm->n_out, t == TN_LORA_Q ? bd->m->hp.n_head
                                                   : bd->m->hp.n_head_kv);
    if (!perm) return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
  }
  char what[200];
  snprintf(what, sizeof(what), "'%s' A", name);
  enum tn_status st = copy_rows(bd, what, a, lm->a, NULL);
  snprintf(what, sizeof(what), "'%s' B", name);
  if (!st) st = copy_rows(bd, what, b, lm->b, perm);
  free(perm);
  if (!st && rank < 64) { /* B transposed: tn_lora_apply_seg's short dots */
    float *bt = malloc((size_t)rank * (size_t)lm->n_out * sizeof(float));
    if (!bt) return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
    for (int64_t o = 0; o < lm->n_out; o++)
      for (int64_t i = 0; i < rank; i++) bt[i * lm->n_out + o] = lm->b[o * rank + i];
    free(lm->b);
    lm->b = bt;
  }
  if (st) return st;
  bd->l->n_mats++;
  bd->l->bytes += (size_t)rank * (size_t)(lm->n_in + lm->n_out) * sizeof(float);
  if (lm->rank > bd->l->max_rank) bd->l->max_rank = lm->rank;
  return TN_OK;
}

static bool ends_with(const char *s, size_t n, const char *suffix) {
  size_t k = strlen(suffix);
  return n >= k && !memcmp(s + n - k, suffix, k);
}

bool tn_lora_parse_tensor_name(const struct tn_model *m, const char *s,
                               size_t n, int32_t *il, enum tn_lora_target *t) {
  char buf[128];
  if (n >= sizeof(buf)) return false;
  memcpy(buf, s, n);
  buf[n] = 0;
  int layer = -1, used = 0;
  char mid[64];
  if (sscanf(buf, "blk.%d.%63[a-z_].weight%n", &layer, mid, &used) != 2 ||
      (size_t)used != n || layer < 0 || layer >= m->hp.n_layer)
    return false;
  for (int k = 0; k < TN_LORA_N_TARGETS; k++)
    if (!strcmp(mid, gguf_names[k])) {
      *il = layer;
      *t = (enum tn_lora_target)k;
      return true;
    }
  return false;
}

static enum tn_status gguf_mat(struct build *bd, const struct tn_gguf_tensor *g,
                               struct tn_mat *out) {
  const struct tn_type_traits *tt = tn_type_get(g->type);
  if (!tt || !tt->to_float || g->n_dims != 2)
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: tensor '%.*s' is %s with %u dimensions (tern "
                        "takes 2-D F32, F16, BF16 or Q8_0)",
                        bd->path, (int)g->name.len, g->name.data,
                        tn_type_name(g->type), g->n_dims);
  out->type = g->type;
  out->n_cols = g->ne[0];
  out->n_rows = g->ne[1];
  out->row_size = tn_type_row_size(g->type, g->ne[0]);
  out->data = g->data;
  return TN_OK;
}

static enum tn_status load_gguf(struct build *bd) {
  struct tn_gguf *g = NULL;
  enum tn_status st = tn_gguf_open(bd->path, &g, bd->err);
  if (st) {
    char m[sizeof(bd->err->msg)];
    if (!bd->err) return st;
    snprintf(m, sizeof(m), "%s", bd->err->msg);
    return tn_error_set(bd->err, st, "%s: %.400s", bd->path, m);
  }
  struct tn_str s;
  const char *arch = tn_arch_name(bd->m->hp.arch);
  if (tn_gguf_get_str(g, "general.type", &s, NULL) != TN_OK ||
      !tn_str_eq(s, "adapter")) {
    st = tn_error_set(bd->err, TN_EFORMAT,
                      "%s: not an adapter (general.type is not 'adapter')",
                      bd->path);
  } else if (tn_gguf_get_str(g, "general.architecture", &s, NULL) != TN_OK ||
             !tn_str_eq(s, arch)) {
    st = tn_error_set(bd->err, TN_EFORMAT,
                      "%s: the adapter is for architecture '%.*s', the base "
                      "model is '%s'",
                      bd->path, (int)(s.data ? s.len : 0), s.data ? s.data : "",
                      arch);
  } else if (tn_gguf_get_str(g, "adapter.type", &s, NULL) == TN_OK &&
             tn_str_eq(s, "bottleneck")) {
    st = tn_bn_load_gguf(g, bd->path, bd->l, bd->err);
    tn_gguf_close(g);
    return st;
  } else if (tn_gguf_get_str(g, "adapter.type", &s, NULL) != TN_OK ||
             !tn_str_eq(s, "lora")) {
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: adapter.type must be 'lora' or 'bottleneck'",
                      bd->path);
  } else if (tn_gguf_find_kv(g, "adapter.alora.invocation_tokens")) {
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: activated LoRA (aLoRA) adapters are not supported",
                      bd->path);
  }
  float alpha = 0.0f;
  if (!st) {
    enum tn_status a = tn_gguf_get_f32(g, "adapter.lora.alpha", &alpha, bd->err);
    if (a && a != TN_ENOENT) st = a;
    else if (!isfinite(alpha) || alpha < 0.0f)
      st = tn_error_set(bd->err, TN_EFORMAT, "%s: adapter.lora.alpha is %g",
                        bd->path, (double)alpha);
  }
  for (uint64_t i = 0; !st && i < g->n_tensors; i++) {
    const struct tn_gguf_tensor *ta = &g->tensors[i];
    const char *nm = ta->name.data;
    size_t n = ta->name.len;
    if (ends_with(nm, n, ".lora_b")) {
      char other[160];
      snprintf(other, sizeof(other), "%.*s.lora_a", (int)(n - 7), nm);
      if (!tn_gguf_find_tensor(g, other))
        st = tn_error_set(bd->err, TN_EFORMAT,
                          "%s: '%.*s' has no lora_a half", bd->path, (int)n, nm);
      continue;
    }
    if (!ends_with(nm, n, ".lora_a")) {
      st = tn_error_set(
          bd->err, TN_EUNSUPPORTED,
          ends_with(nm, n, "_norm.weight")
              ? "%s: tensor '%.*s': norm weights in adapters are not supported"
              : "%s: tensor '%.*s' is not a LoRA half (.lora_a / .lora_b)",
          bd->path, (int)n, nm);
      break;
    }
    size_t bn = n - 7;
    int32_t il;
    enum tn_lora_target t;
    if (!tn_lora_parse_tensor_name(bd->m, nm, bn, &il, &t)) {
      st = tn_error_set(
          bd->err, TN_EUNSUPPORTED,
          "%s: '%.*s' is not a matrix tern adapts (attn_q/k/v/output, "
          "ffn_gate/up/down of blk.0..%d; embeddings and the output head "
          "are not supported)",
          bd->path, (int)bn, nm, bd->m->hp.n_layer - 1);
      break;
    }
    char other[160];
    snprintf(other, sizeof(other), "%.*s.lora_b", (int)bn, nm);
    const struct tn_gguf_tensor *tb = tn_gguf_find_tensor(g, other);
    if (!tb) {
      st = tn_error_set(bd->err, TN_EFORMAT, "%s: '%.*s' has no lora_b half",
                        bd->path, (int)n, nm);
      break;
    }
    struct tn_mat a, b;
    char base[160];
    snprintf(base, sizeof(base), "%.*s", (int)bn, nm);
    if (!(st = gguf_mat(bd, ta, &a)) && !(st = gguf_mat(bd, tb, &b)))
      st = set_pair(bd, il, t, base, &a, &b, alpha, false, false);
  }
  if (!st && bd->l->n_mats == 0)
    st = tn_error_set(bd->err, TN_EFORMAT, "%s: the adapter has no tensors",
                      bd->path);
  tn_gguf_close(g);
  return st;
}

/* ---- PEFT directories */

struct safet;
static enum tn_status safet_mat(struct build *bd, const struct safet *f,
                                const char *key, json_t *v, struct tn_mat *out);

/* An (IA)3 vector: [n_out, 1] scales a target's output, [1, n_in] a
 * feedforward module's input. */
static enum tn_status set_ia3(struct build *bd, const struct safet *f,
                              const char *key, json_t *v, int32_t il,
                              enum tn_lora_target t) {
  struct tn_mat src;
  enum tn_status st = safet_mat(bd, f, key, v, &src);
  if (st) return st;
  const struct tn_mat *w = base_mat(bd->m, il, t);
  struct tn_lora_mat *lm = &bd->l->mats[il * TN_LORA_N_TARGETS + t];
  bool in = (bd->ia3_ff >> t) & 1u;
  int64_t n = in ? w->n_cols : w->n_rows;
  if (lm->ia3 || lm->rank)
    return tn_error_set(bd->err, TN_EFORMAT, "%s: '%s' appears twice",
                        bd->path, key);
  if (src.n_rows * src.n_cols != n || (src.n_rows != 1 && src.n_cols != 1))
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: '%s' has shape [%lld, %lld], the base's %s has "
                        "%lld (an adapter for another base model?)",
                        bd->path, key, (long long)src.n_rows,
                        (long long)src.n_cols, in ? "input" : "output",
                        (long long)n);
  /* the input of q/k/v (or gate/up) is shared with the others: scaling it
   * for one alone is not done in the batched step */
  if (in && t != TN_LORA_O && t != TN_LORA_DOWN)
    return tn_error_set(bd->err, TN_EUNSUPPORTED,
                        "%s: '%s': (IA)3 input scaling is supported on "
                        "o_proj and down_proj only",
                        bd->path, key);
  if (!(lm->ia3 = malloc((size_t)n * sizeof(float))))
    return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
  struct tn_mat row = src;
  row.n_rows = 1;
  row.n_cols = n;
  row.row_size = src.row_size * (size_t)(src.n_rows == 1 ? 1 : src.n_rows);
  char what[200];
  snprintf(what, sizeof(what), "'%s'", key);
  if ((st = copy_rows(bd, what, &row, lm->ia3, NULL))) return st;
  /* llama's q and k rows are permuted in GGUF: their output scales too */
  if (!in && bd->m->hp.arch == TN_ARCH_LLAMA &&
      (t == TN_LORA_Q || t == TN_LORA_K)) {
    int32_t *perm = llama_qk_perm(n, t == TN_LORA_Q ? bd->m->hp.n_head
                                                    : bd->m->hp.n_head_kv);
    float *hf = malloc((size_t)n * sizeof(float));
    if (!perm || !hf) {
      free(perm);
      free(hf);
      return tn_error_set(bd->err, TN_ENOMEM, "%s: out of memory", bd->path);
    }
    memcpy(hf, lm->ia3, (size_t)n * sizeof(float));
    for (int64_t g = 0; g < n; g++) lm->ia3[g] = hf[perm[g]];
    free(perm);
    free(hf);
  }
  lm->ia3_in = in;
  lm->n_in = w->n_cols;
  lm->n_out = w->n_rows;
  lm->act_type = TN_TYPE_F32;
  bd->l->n_mats++;
  bd->l->bytes += (size_t)n * sizeof(float);
  return TN_OK;
}

struct safet {
  void *map;
  size_t size;
  json_t *header;
  const uint8_t *data;
  size_t data_size;
};

static void safet_close(struct safet *f) {
  json_decref(f->header);
  if (f->map && f->map != MAP_FAILED) munmap(f->map, f->size);
}

static enum tn_status safet_open(struct build *bd, const char *file,
                                 struct safet *f) {
  memset(f, 0, sizeof(*f));
  int fd = open(file, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* (a FIFO) */
  if (fd < 0)
    return tn_error_set(bd->err, TN_EIO, "%s: %s", file, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size < 8) {
    close(fd);
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: not a safetensors file (%lld bytes)", file,
                        (long long)sb.st_size);
  }
  f->size = (size_t)sb.st_size;
  f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (f->map == MAP_FAILED) {
    f->map = NULL;
    return tn_error_set(bd->err, TN_EIO, "%s: mmap: %s", file, strerror(errno));
  }
  const uint8_t *p = f->map;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | p[i];
  if (n > f->size - 8 || n > (64u << 20))
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: safetensors header of %llu bytes in a file of %zu",
                        file, (unsigned long long)n, f->size);
  json_error_t je;
  f->header = json_loadb((const char *)p + 8, (size_t)n, 0, &je);
  if (!json_is_object(f->header))
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: safetensors header is not a JSON object (%s)",
                        file, f->header ? "" : je.text);
  f->data = p + 8 + n;
  f->data_size = f->size - 8 - (size_t)n;
  return TN_OK;
}

/* Tensor `key` of f as a 2-D matrix, its offsets and size checked. */
static enum tn_status safet_mat(struct build *bd, const struct safet *f,
                                const char *key, json_t *v, struct tn_mat *out) {
  json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape"),
         *offs = json_object_get(v, "data_offsets");
  const char *d = json_string_value(dt);
  enum tn_type type;
  size_t esize;
  if (d && !strcmp(d, "F32")) type = TN_TYPE_F32, esize = 4;
  else if (d && !strcmp(d, "F16")) type = TN_TYPE_F16, esize = 2;
  else if (d && !strcmp(d, "BF16")) type = TN_TYPE_BF16, esize = 2;
  else
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: tensor '%s' has dtype %s (tern takes F32, F16, "
                        "BF16)",
                        bd->path, key, d ? d : "(none)");
  if (!json_is_array(shape) || json_array_size(shape) != 2 ||
      !json_is_array(offs) || json_array_size(offs) != 2)
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: tensor '%s' is not a 2-D tensor with data_offsets",
                        bd->path, key);
  json_int_t rows = json_integer_value(json_array_get(shape, 0));
  json_int_t cols = json_integer_value(json_array_get(shape, 1));
  json_int_t s0 = json_integer_value(json_array_get(offs, 0));
  json_int_t s1 = json_integer_value(json_array_get(offs, 1));
  if (!json_is_integer(json_array_get(shape, 0)) ||
      !json_is_integer(json_array_get(shape, 1)) ||
      !json_is_integer(json_array_get(offs, 0)) ||
      !json_is_integer(json_array_get(offs, 1)) || rows < 1 || cols < 1 ||
      rows > (1 << 24) || cols > (1 << 24) || s0 < 0 || s1 < s0 ||
      (uint64_t)s1 > f->data_size ||
      (uint64_t)(s1 - s0) != (uint64_t)rows * (uint64_t)cols * esize)
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: tensor '%s': shape or data_offsets do not fit "
                        "the file (%zu data bytes)",
                        bd->path, key, f->data_size);
  out->type = type;
  out->n_rows = rows;
  out->n_cols = cols;
  out->row_size = (size_t)cols * esize;
  out->data = f->data + s0;
  return TN_OK;
}

/* PEFT tensor name -> layer and target; "lora_A" or "lora_B" in *half. */
static bool parse_peft_name(const struct tn_model *m, const char *key,
                            int32_t *il, enum tn_lora_target *t, char *half) {
  const char *p = strstr(key, "layers.");
  if (!p) return false;
  char *end;
  long layer = strtol(p + 7, &end, 10);
  if (end == p + 7 || *end != '.' || layer < 0 || layer >= m->hp.n_layer)
    return false;
  const char *mod = end + 1;
  for (int k = 0; k < TN_LORA_N_TARGETS; k++) {
    size_t ln = strlen(peft_names[k]);
    if (strncmp(mod, peft_names[k], ln) || mod[ln] != '.') continue;
    const char *rest = mod + ln + 1;
    if (!strcmp(rest, "ia3_l")) {
      *half = 'I';
    } else if (!strcmp(rest, "lora_A.weight") || !strcmp(rest, "lora_B.weight")) {
      *half = rest[5];
    } else {
      return false;
    }
    *il = (int32_t)layer;
    *t = (enum tn_lora_target)k;
    return true;
  }
  return false;
}

/* PEFT options that change what the adapter computes and that tern does
 * not implement: refused when set (not null, false, empty or 0). */
static const char *const k_unsupported[] = {
    "alora_invocation_tokens", "trainable_token_indices", "target_parameters",
    "layer_replication", "use_qalora", "use_bdlora", "lora_ga_config",
    "use_dora", NULL};

static const char *set_key(json_t *c, const char *const *keys) {
  for (int i = 0; keys[i]; i++) {
    json_t *v = json_object_get(c, keys[i]);
    if (!v || json_is_null(v) || json_is_false(v)) continue;
    if ((json_is_array(v) && json_array_size(v) == 0) ||
        (json_is_object(v) && json_object_size(v) == 0) ||
        (json_is_integer(v) && json_integer_value(v) == 0))
      continue;
    return keys[i];
  }
  return NULL;
}

static enum tn_status peft_config(struct build *bd, const char *dir,
                                  float *alpha, bool *rslora) {
  char file[4096];
  snprintf(file, sizeof(file), "%s/adapter_config.json", dir);
  /* a regular file of at most 1 MiB (not a FIFO, which would block) */
  int fd = open(file, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return errno == ENOENT
               ? tn_error_set(bd->err, TN_ENOENT,
                              "%s: a directory without adapter_config.json "
                              "(not a PEFT adapter)",
                              dir)
               : tn_error_set(bd->err, TN_EIO, "%s: %s", file, strerror(errno));
  struct stat sb;
  char *text = NULL;
  ssize_t got = -1;
  if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size <= (1 << 20) &&
      (text = malloc((size_t)sb.st_size + 1)))
    got = read(fd, text, (size_t)sb.st_size);
  close(fd);
  if (got != (ssize_t)sb.st_size) {
    free(text);
    return tn_error_set(bd->err, TN_EFORMAT,
                        "%s: not a regular file of at most 1 MiB", file);
  }
  json_error_t je;
  json_t *c = json_loadb(text, (size_t)got, 0, &je);
  free(text);
  if (!c)
    return tn_error_set(bd->err, TN_EFORMAT, "%s: line %d: %s", file, je.line,
                        je.text);
  enum tn_status st = TN_OK;
  const char *bad_key = NULL;
  const char *type = json_string_value(json_object_get(c, "peft_type"));
  json_t *ms = json_object_get(c, "modules_to_save");
  json_t *ap = json_object_get(c, "alpha_pattern");
  const char *bias = json_string_value(json_object_get(c, "bias"));
  json_t *jr = json_object_get(c, "r"), *ja = json_object_get(c, "lora_alpha");
  if (!json_is_object(c))
    st = tn_error_set(bd->err, TN_EFORMAT, "%s: not a JSON object", file);
  else if (!type && json_is_object(json_object_get(c, "config")))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: saved by the `adapters` library, not PEFT: tern "
                      "reads that library's bottleneck adapters once "
                      "tools/convert_bottleneck.py has converted them to "
                      "tern's GGUF",
                      file);
  else if (!type || (strcmp(type, "LORA") && strcmp(type, "IA3")))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: peft_type %s is not supported (LORA, IA3)", file,
                      type ? type : "(missing)");
  else if (json_is_true(json_object_get(c, "use_dora")))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: DoRA adapters (use_dora) are not supported", file);
  else if (json_is_true(json_object_get(c, "fan_in_fan_out")))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: fan_in_fan_out adapters are not supported", file);
  else if (json_is_true(json_object_get(c, "lora_bias")) ||
           (bias && strcmp(bias, "none")))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: adapters with biases are not supported", file);
  else if ((json_is_array(ms) && json_array_size(ms) > 0) ||
           (ms && !json_is_null(ms) && !json_is_array(ms)))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: modules_to_save (full copies of base modules) is "
                      "not supported",
                      file);
  else if ((bad_key = set_key(c, k_unsupported)))
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: %s is set: that kind of adapter is not supported",
                      file, bad_key);
  else if (json_is_object(ap) && json_object_size(ap) > 0)
    st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                      "%s: alpha_pattern is not supported", file);
  else if (!strcmp(type, "IA3"))
    ; /* no rank or alpha */
  else if (!json_is_integer(jr) || json_integer_value(jr) < 1 ||
           json_integer_value(jr) > TN_LORA_RANK_MAX || !json_is_number(ja) ||
           !isfinite(json_number_value(ja)) || json_number_value(ja) <= 0)
    st = tn_error_set(bd->err, TN_EFORMAT,
                      "%s: r must be an integer 1..%d and lora_alpha a "
                      "positive number",
                      file, TN_LORA_RANK_MAX);
  if (!st && !strcmp(type, "IA3")) {
    bd->l->kind = TN_ADAPTER_IA3;
    /* feedforward_modules: which targets scale their input */
    json_t *ff = json_object_get(c, "feedforward_modules");
    size_t k;
    json_t *v;
    if (json_is_array(ff))
      json_array_foreach(ff, k, v) {
        const char *nm = json_string_value(v);
        for (int t = 0; nm && t < TN_LORA_N_TARGETS; t++) {
          const char *dot = strrchr(peft_names[t], '.');
          if (!strcmp(nm, dot ? dot + 1 : peft_names[t])) bd->ia3_ff |= 1u << t;
        }
      }
    else if (json_is_string(ff))
      st = tn_error_set(bd->err, TN_EUNSUPPORTED,
                        "%s: feedforward_modules as a pattern is not "
                        "supported (give a list)",
                        file);
  } else if (!st) { /* r is checked; each pair's rank is its tensors'
                      (rank_pattern may vary it) */
    *alpha = (float)json_number_value(ja);
    *rslora = json_is_true(json_object_get(c, "use_rslora"));
  }
  json_decref(c);
  return st;
}

static enum tn_status load_peft(struct build *bd) {
  float alpha = 0.0f;
  bool rslora = false;
  enum tn_status st = peft_config(bd, bd->path, &alpha, &rslora);
  if (st) return st;
  char file[4096];
  snprintf(file, sizeof(file), "%s/adapter_model.safetensors", bd->path);
  if (access(file, F_OK) != 0) {
    char bin[4096];
    snprintf(bin, sizeof(bin), "%s/adapter_model.bin", bd->path);
    return tn_error_set(bd->err, TN_ENOENT,
                        access(bin, F_OK) == 0
                            ? "%s: adapter_model.bin (pickle) is not read; save "
                              "the adapter with safe_serialization"
                            : "%s: no adapter_model.safetensors",
                        bd->path);
  }
  struct safet f;
  st = safet_open(bd, file, &f);
  const char *key;
  json_t *v;
  bool permute = bd->m->hp.arch == TN_ARCH_LLAMA;
  if (!st) json_object_foreach(f.header, key, v) {
    if (!strcmp(key, "__metadata__")) continue;
    int32_t il;
    enum tn_lora_target t;
    char half;
    if (!parse_peft_name(bd->m, key, &il, &t, &half)) {
      st = tn_error_set(
          bd->err, TN_EUNSUPPORTED,
          strstr(key, "lora_magnitude") ? "%s: '%s': DoRA is not supported"
          : strstr(key, "embed") || strstr(key, "lm_head")
              ? "%s: '%s': embedding and lm_head adapters are not supported"
              : "%s: '%s' is not a LoRA half of a matrix tern adapts "
                "(q/k/v/o_proj, gate/up/down_proj of layers 0..%d)",
          bd->path, key, bd->m->hp.n_layer - 1);
      break;
    }
    if ((half == 'I') != (bd->l->kind == TN_ADAPTER_IA3)) {
      st = tn_error_set(bd->err, TN_EFORMAT,
                        "%s: '%s' does not belong in a %s adapter", bd->path,
                        key, bd->l->kind == TN_ADAPTER_IA3 ? "IA3" : "LORA");
      break;
    }
    if (half == 'I') {
      if ((st = set_ia3(bd, &f, key, v, il, t))) break;
      continue;
    }
    if (half == 'B') {
      /* its A finds it; an A-less B is an error */
      char other[1024];
      snprintf(other, sizeof(other), "%.*s", (int)(strlen(key) - 13), key);
      strncat(other, "lora_A.weight", sizeof(other) - strlen(other) - 1);
      if (!json_object_get(f.header, other)) {
        st = tn_error_set(bd->err, TN_EFORMAT, "%s: '%s' has no lora_A half",
                          bd->path, key);
        break;
      }
      continue;
    }
    char other[1024];
    snprintf(other, sizeof(other), "%.*s", (int)(strlen(key) - 13), key);
    strncat(other, "lora_B.weight", sizeof(other) - strlen(other) - 1);
    json_t *vb = json_object_get(f.header, other);
    if (!vb) {
      st = tn_error_set(bd->err, TN_EFORMAT, "%s: '%s' has no lora_B half",
                        bd->path, key);
      break;
    }
    struct tn_mat a, b;
    if ((st = safet_mat(bd, &f, key, v, &a)) ||
        (st = safet_mat(bd, &f, other, vb, &b)))
      break;
    char name[160];
    snprintf(name, sizeof(name), "blk.%d.%s.weight", il, gguf_names[t]);
    st = set_pair(bd, il, t, name, &a, &b, alpha, rslora, permute);
    if (st) break;
  }
  if (!st && bd->l->n_mats == 0)
    st = tn_error_set(bd->err, TN_EFORMAT, "%s: the adapter has no tensors",
                      bd->path);
  safet_close(&f);
  return st;
}

enum tn_status tn_lora_load(const struct tn_model *m, const char *path,
                            struct tn_lora **out, struct tn_error *err) {
  *out = NULL;
  struct stat sb;
  if (stat(path, &sb) != 0)
    return tn_error_set(err, TN_ENOENT, "%s: %s", path, strerror(errno));
  struct build bd = {.m = m, .path = path, .err = err};
  bd.l = lora_new(m);
  if (!bd.l) return tn_error_set(err, TN_ENOMEM, "%s: out of memory", path);
  bool dir = S_ISDIR(sb.st_mode);
  snprintf(bd.l->format, sizeof(bd.l->format), "%s", dir ? "peft" : "gguf");
  enum tn_status st = dir ? load_peft(&bd) : load_gguf(&bd);
  free(bd.row);
  if (st) {
    lora_free(bd.l);
    return st;
  }
  *out = bd.l;
  return TN_OK;
}

static void round_bf16(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    if ((u & 0x7f800000u) != 0x7f800000u) /* finite: nearest, ties even */
      u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x[i], &u, 4);
  }
}

static void round_to(enum tn_type t, float *x, int64_t n) {
  if (t == TN_TYPE_F16) tn_round_f16(x, n);
  else if (t == TN_TYPE_BF16) round_bf16(x, n);
}

int64_t tn_lora_scratch(const struct tn_model *m) {
  int64_t q = (int64_t)m->hp.n_head * m->hp.head_dim;
  int64_t w = TN_MAX(TN_MAX((int64_t)m->hp.n_embd, (int64_t)m->hp.n_ff), q);
  /* per token of a segment: its rounded input (floats), A x (floats) and
   * the outputs' sums (doubles) */
  return TN_LORA_SEG * (3 * w + TN_LORA_RANK_MAX) + 2; /* (+2: alignment) */
}

void tn_lora_ia3_scale(const float *l, float s, float *x, int64_t n) {
  if (s == 1.0f) {
    for (int64_t i = 0; i < n; i++) x[i] *= l[i];
  } else {
    for (int64_t i = 0; i < n; i++) x[i] *= s * (l[i] - 1.0f) + 1.0f;
  }
}

void tn_lora_apply_seg(const struct tn_lora_mat *mat, int n, const float *s,
                       const float *const *x, float *const *y,
                       float *scratch) {
  const int32_t r = mat->rank;
  const int64_t n_in = mat->n_in, n_out = mat->n_out;
  float *xr = scratch;                          /* [n][n_in] */
  float *u = xr + (int64_t)n * n_in;            /* [n][r] */
  int64_t used = (int64_t)n * (n_in + TN_LORA_RANK_MAX);
  double *acc = (double *)(xr + used + (used & 1)); /* [n][n_out], 8-aligned */
  const float *xs[TN_LORA_SEG];
  for (int t = 0; t < n; t++) {
    xs[t] = x[t];
    if (mat->act_type != TN_TYPE_F32) {
      memcpy(xr + t * n_in, x[t], (size_t)n_in * sizeof(float));
      round_to(mat->act_type, xr + t * n_in, n_in);
      xs[t] = xr + t * n_in;
    }
  }
  /* u[t] = A x[t]: A a chunk of rows at a time, for every token (each
   * row's dot is tn_attn_dot of that row, whatever the chunk) */
  enum { A_ROWS = 8, CHUNK = 64 };
  float *outs[TN_LORA_RANK_MAX];
  for (int32_t r0 = 0; r0 < r; r0 += A_ROWS) {
    int nr = (int)TN_MIN((int32_t)A_ROWS, r - r0);
    for (int t = 0; t < n; t++) {
      for (int c = 0; c < nr; c++) outs[c] = &u[t * TN_LORA_RANK_MAX + r0 + c];
      tn_attn_dot_rows(xs[t], mat->a + (int64_t)r0 * n_in, n_in, nr, outs,
                       n_in, 1.0f);
    }
  }
  for (int t = 0; t < n; t++)
    round_to(mat->act_type, u + t * TN_LORA_RANK_MAX, r);
  if (r < 64) {
    /* tn_attn_dot of r < 64 terms is their double sum in order: kept per
     * output, the rank's terms added one at a time over all outputs */
    for (int t = 0; t < n; t++)
      for (int64_t o = 0; o < n_out; o++) acc[t * n_out + o] = 0.0;
    for (int32_t i = 0; i < r; i++) {
      const float *bt = mat->b + (int64_t)i * n_out;
      for (int t = 0; t < n; t++) {
        const float ui = u[t * TN_LORA_RANK_MAX + i];
        double *at = acc + t * n_out;
        for (int64_t o = 0; o < n_out; o++) at[o] += (double)(bt[o] * ui);
      }
    }
    for (int t = 0; t < n; t++) {
      const float k = s[t] * mat->scale;
      for (int64_t o = 0; o < n_out; o++)
        y[t][o] += (float)acc[t * n_out + o] * k;
    }
    return;
  }
  float d[CHUNK], *dp[CHUNK];
  for (int c = 0; c < CHUNK; c++) dp[c] = &d[c];
  for (int64_t o0 = 0; o0 < n_out; o0 += CHUNK) {
    int nc = (int)TN_MIN((int64_t)CHUNK, n_out - o0);
    for (int t = 0; t < n; t++) {
      const float k = s[t] * mat->scale;
      tn_attn_dot_rows(u + t * TN_LORA_RANK_MAX, mat->b + o0 * r, r, nc, dp,
                       r, 1.0f);
      for (int c = 0; c < nc; c++) y[t][o0 + c] += d[c] * k;
    }
  }
}

struct tn_mat *tn_lora_base_mat(struct tn_model *m, int32_t il,
                                enum tn_lora_target t) {
  return (struct tn_mat *)base_mat(m, il, t);
}

void tn_lora_tensor_name(int32_t il, enum tn_lora_target t, char *out,
                         size_t cap) {
  snprintf(out, cap, "blk.%d.%s.weight", il, gguf_names[t]);
}

/* The type a merged matrix is written in by default. An adapter's update
 * is far below a 4- or 5-bit type's rounding step (SmolLM2's pirate
 * adapter merged back into Q4_1 loses its behaviour: perplexity 24.7,
 * the base's 24.3, against 33.8 modular), so matrices under 8 bits per
 * weight go to Q8_0 (33.97: within 1%), or F16 when their rows are not
 * whole Q8_0 blocks; wider types keep their own. */
static enum tn_type merge_type(const struct tn_mat *w) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  double bits = 8.0 * (double)tt->type_size / (double)tt->blck_size;
  if (bits >= 8.0) return w->type;
  return w->n_cols % tn_type_get(TN_TYPE_Q8_0)->blck_size == 0 ? TN_TYPE_Q8_0
                                                               : TN_TYPE_F16;
}

enum tn_status tn_lora_merge(struct tn_model *m, const struct tn_lora *l,
                             float s, enum tn_type type,
                             struct tn_error *err) {
  if (!tn_lora_fits(l, m))
    return tn_error_set(err, TN_EINVAL,
                        "merge: the adapter was loaded for another model");
  if (l->kind == TN_ADAPTER_BOTTLENECK)
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "merge: a bottleneck adapter has a nonlinearity "
                        "between its matrices, so it cannot be folded into "
                        "the base's; serve it modular (without --merge)");
  int n_new = m->n_owned + 2 * l->n_mats; /* matrices, and scaled biases */
  void **owned = realloc(m->owned, (size_t)n_new * sizeof(void *));
  if (!owned) return tn_error_set(err, TN_ENOMEM, "merge: out of memory");
  m->owned = owned;
  float *row = NULL;
  double *acc = NULL;
  enum tn_status st = TN_OK;
  for (int32_t il = 0; il < l->n_layer && !st; il++)
    for (int t = 0; t < TN_LORA_N_TARGETS && !st; t++) {
      const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + t];
      if (!lm->rank && !lm->ia3) continue;
      struct tn_mat *w = tn_lora_base_mat(m, il, (enum tn_lora_target)t);
      enum tn_type to = type == TN_TYPE_COUNT ? merge_type(w) : type;
      const struct tn_type_traits *tt = tn_type_get(to);
      char name[96];
      tn_lora_tensor_name(il, (enum tn_lora_target)t, name, sizeof(name));
      if (!tt || !tt->from_float || !tt->vec_dot || w->n_cols % tt->blck_size) {
        st = tn_error_set(err, TN_EUNSUPPORTED,
                          "merge: cannot write '%s' (%lld columns) as %s",
                          name, (long long)w->n_cols, tn_type_name(to));
        break;
      }
      size_t rs = tn_type_row_size(to, w->n_cols);
      void *nw = tn_aligned_alloc(rs * (size_t)w->n_rows);
      free(row);
      free(acc);
      row = malloc((size_t)w->n_cols * sizeof(float));
      acc = malloc((size_t)w->n_cols * sizeof(double));
      if (!nw || !row || !acc) {
        tn_aligned_free(nw);
        st = tn_error_set(err, TN_ENOMEM, "merge: out of memory");
        break;
      }
      const int32_t r = lm->rank;
      const double k = (double)s * (double)lm->scale;
      for (int64_t o = 0; o < w->n_rows; o++) {
        tn_mat_get_row(w, o, row);
        if (lm->ia3) { /* (IA)3: rows (output) or columns (input) scaled */
          for (int64_t c = 0; c < w->n_cols; c++) {
            float f = lm->ia3[lm->ia3_in ? c : o];
            row[c] *= s * (f - 1.0f) + 1.0f;
          }
          tt->from_float(row, (char *)nw + (size_t)o * rs, w->n_cols);
          continue;
        }
        for (int64_t c = 0; c < w->n_cols; c++) acc[c] = 0.0;
        for (int32_t i = 0; i < r; i++) {
          double bo = r < 64 ? lm->b[(int64_t)i * lm->n_out + o]
                             : lm->b[o * r + i];
          const float *ai = lm->a + (int64_t)i * lm->n_in;
          for (int64_t c = 0; c < w->n_cols; c++) acc[c] += bo * ai[c];
        }
        for (int64_t c = 0; c < w->n_cols; c++)
          row[c] = (float)((double)row[c] + k * acc[c]);
        tt->from_float(row, (char *)nw + (size_t)o * rs, w->n_cols);
      }
      m->owned[m->n_owned++] = nw;
      /* (IA)3 scales a q/k/v output after its bias: the bias too */
      struct tn_layer *L = &m->layers[il];
      const float **bias = t == TN_LORA_Q ? &L->bq : t == TN_LORA_K ? &L->bk
                           : t == TN_LORA_V ? &L->bv : NULL;
      if (lm->ia3 && !lm->ia3_in && bias && *bias) {
        float *nb = tn_aligned_alloc((size_t)w->n_rows * sizeof(float));
        if (!nb) {
          st = tn_error_set(err, TN_ENOMEM, "merge: out of memory");
          break;
        }
        for (int64_t o = 0; o < w->n_rows; o++)
          nb[o] = (*bias)[o] * (s * (lm->ia3[o] - 1.0f) + 1.0f);
        m->owned[m->n_owned++] = nb;
        *bias = nb;
      }
      m->weight_bytes -= w->row_size * (size_t)w->n_rows;
      w->type = to;
      w->row_size = rs;
      w->data = nw;
      m->weight_bytes += rs * (size_t)w->n_rows;
    }
  free(row);
  free(acc);
  return st;
}

bool tn_lora_fits(const struct tn_lora *l, const struct tn_model *m) {
  const struct tn_hparams *hp = &m->hp;
  return l->arch == hp->arch && l->n_layer == hp->n_layer &&
         l->n_embd == hp->n_embd && l->n_ff == hp->n_ff &&
         l->n_head == hp->n_head && l->n_head_kv == hp->n_head_kv &&
         l->head_dim == hp->head_dim;
}

uint64_t tn_lora_salt(const struct tn_lora *l, float scale) {
  if (!l) return 0;
  uint32_t bits;
  memcpy(&bits, &scale, sizeof(bits));
  uint64_t h = l->id * 0x9e3779b97f4a7c15ull ^ ((uint64_t)bits << 17);
  h ^= h >> 29;
  return h ? h : 1;
}
