/*
 * bottleneck.c: bottleneck adapter modules (Houlsby / Pfeiffer / parallel)
 * in tern's GGUF layout, loaded against a base and applied per token at a
 * layer's residual joins (see lora.h, and docs/ADAPTERS.md for the file).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "kernels/kernels.h"
#include "model/lora.h"

static const char *const site_names[TN_BN_N_SITES] = {"attn", "ffn"};
static const char *const input_names[] = {"output", "sum", "stream"};
static const char *const act_names[] = {
    "relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid", "leaky_relu",
    "identity"};

/* The five tensors of one module, in the order of struct tn_bn_module's
 * arrays; 2-D ones list (ne0, ne1) as "e" (n_embd) or "d" (its width). */
enum part { P_DOWN_W, P_DOWN_B, P_UP_W, P_UP_B, P_SCALE, N_PARTS };
static const char *const part_names[N_PARTS] = {
    "down.weight", "down.bias", "up.weight", "up.bias", "scale"};

const char *tn_adapter_kind_name(enum tn_adapter_kind k) {
  switch (k) {
  case TN_ADAPTER_LORA: return "lora";
  case TN_ADAPTER_IA3: return "ia3";
  case TN_ADAPTER_BOTTLENECK: return "bottleneck";
  }
  return "?";
}

void tn_bn_free(struct tn_lora *l) {
  if (!l->bn) return;
  for (int32_t i = 0; i < l->n_layer * TN_BN_N_SITES; i++) {
    struct tn_bn_module *md = &l->bn[i];
    free(md->down_t);
    free(md->down_b);
    free(md->up_t);
    free(md->up_b);
    free(md->scale);
  }
  free(l->bn);
  l->bn = NULL;
}

static int find_name(const char *const *names, int n, struct tn_str s) {
  for (int i = 0; i < n; i++)
    if (tn_str_eq(s, names[i])) return i;
  return -1;
}

/* "blk.<il>.adapter_<site>.<part>" -> il, site, part. */
static bool parse_name(struct tn_str s, int32_t *il, int *site, int *part) {
  char name[128];
  if (s.len >= sizeof(name) || memchr(s.data, '\0', s.len)) return false;
  memcpy(name, s.data, s.len);
  name[s.len] = '\0';
  if (strncmp(name, "blk.", 4) != 0) return false;
  const char *p = name + 4;
  long v = 0;
  if (*p < '0' || *p > '9' || (*p == '0' && p[1] != '.')) return false;
  while (*p >= '0' && *p <= '9') {
    v = v * 10 + (*p++ - '0');
    if (v > INT32_MAX) return false;
  }
  if (strncmp(p, ".adapter_", 9) != 0) return false;
  p += 9;
  for (int st = 0; st < TN_BN_N_SITES; st++) {
    size_t n = strlen(site_names[st]);
    if (strncmp(p, site_names[st], n) != 0 || p[n] != '.') continue;
    for (int pt = 0; pt < N_PARTS; pt++)
      if (strcmp(p + n + 1, part_names[pt]) == 0) {
        *il = (int32_t)v;
        *site = st;
        *part = pt;
        return true;
      }
  }
  return false;
}

/* Tensor t as f32 into a new array, rows of ne0 values; transposed
 * (out[c][r] = t[r][c]) when asked. Every value must be finite. */
static enum tn_status read_tensor(const struct tn_gguf_tensor *t,
                                  bool transpose, const char *path,
                                  float **out, struct tn_error *err) {
  const struct tn_type_traits *tt = tn_type_get(t->type);
  int64_t cols = t->ne[0], rows = t->n_dims == 2 ? t->ne[1] : 1;
  struct tn_mat one = {.type = t->type, .n_cols = cols, .n_rows = 1,
                       .row_size = tn_type_row_size(t->type, cols)};
  float *y = malloc((size_t)(rows * cols) * sizeof(float));
  float *row = malloc((size_t)cols * sizeof(float));
  void *raw = malloc(one.row_size ? one.row_size : 1);
  enum tn_status st = TN_OK;
  if (!tt || !tt->to_float)
    st = tn_error_set(err, TN_EFORMAT,
                      "%s: tensor '%.*s' is of type %s, whose values tern "
                      "cannot read (F32, F16, BF16 or Q8_0 are usual)",
                      path, (int)t->name.len, t->name.data,
                      tn_type_name(t->type));
  else if (!y || !row || !raw)
    st = tn_error_set(err, TN_ENOMEM, "%s: out of memory", path);
  one.data = raw;
  for (int64_t r = 0; !st && r < rows; r++) {
    memcpy(raw, (const char *)t->data + (size_t)r * one.row_size, one.row_size);
    tn_mat_get_row(&one, 0, row);
    for (int64_t c = 0; c < cols; c++) {
      if (!isfinite(row[c])) {
        st = tn_error_set(err, TN_EFORMAT,
                          "%s: tensor '%.*s' has a non-finite value (%g) at "
                          "[%lld, %lld]",
                          path, (int)t->name.len, t->name.data, (double)row[c],
                          (long long)r, (long long)c);
        break;
      }
      y[transpose ? c * rows + r : r * cols + c] = row[c];
    }
  }
  free(row);
  free(raw);
  if (st) {
    free(y);
    return st;
  }
  *out = y;
  return TN_OK;
}

/* The module at (il, site) from its five tensors (all or none). */
static enum tn_status load_module(const struct tn_gguf *g, const char *path,
                                  struct tn_lora *l, int32_t il, int site,
                                  struct tn_error *err) {
  const struct tn_gguf_tensor *t[N_PARTS];
  char names[N_PARTS][96];
  int n_found = 0, missing = -1, found = -1;
  for (int p = 0; p < N_PARTS; p++) {
    snprintf(names[p], sizeof(names[p]), "blk.%d.adapter_%s.%s", il,
             site_names[site], part_names[p]);
    t[p] = tn_gguf_find_tensor(g, names[p]);
    if (t[p]) n_found++, found = p;
    else if (missing < 0) missing = p;
  }
  if (n_found == 0) return TN_OK;
  if (missing >= 0)
    return tn_error_set(err, TN_EFORMAT, "%s: '%s' has no '%s' beside it",
                        path, names[found], names[missing]);
  const int64_t n = l->n_embd;
  const int64_t dim = t[P_DOWN_W]->ne[1];
  /* expected (n_dims, ne0, ne1) of each part */
  const int64_t want[N_PARTS][3] = {
      {2, n, dim}, {1, dim, 1}, {2, dim, n}, {1, n, 1}, {1, n, 1}};
  if (t[P_DOWN_W]->n_dims != 2 || dim < 1 || dim > n)
    return tn_error_set(err, TN_EFORMAT,
                        "%s: '%s' must be 2-D [%lld, width] with a width of "
                        "1 to %lld; it has %u dimensions, [%lld, %lld]",
                        path, names[P_DOWN_W], (long long)n, (long long)n,
                        t[P_DOWN_W]->n_dims, (long long)t[P_DOWN_W]->ne[0],
                        (long long)dim);
  for (int p = 0; p < N_PARTS; p++)
    if (t[p]->n_dims != want[p][0] || t[p]->ne[0] != want[p][1] ||
        t[p]->ne[1] != want[p][2])
      return tn_error_set(
          err, TN_EFORMAT,
          "%s: '%s' is [%lld, %lld]; the base (n_embd %lld) and a width of "
          "%lld need [%lld, %lld]: is the adapter for another model?",
          path, names[p], (long long)t[p]->ne[0], (long long)t[p]->ne[1],
          (long long)n, (long long)dim, (long long)want[p][1],
          (long long)want[p][2]);
  struct tn_bn_module *md = &l->bn[il * TN_BN_N_SITES + site];
  enum tn_status st;
  if ((st = read_tensor(t[P_DOWN_W], true, path, &md->down_t, err)) ||
      (st = read_tensor(t[P_DOWN_B], false, path, &md->down_b, err)) ||
      (st = read_tensor(t[P_UP_W], true, path, &md->up_t, err)) ||
      (st = read_tensor(t[P_UP_B], false, path, &md->up_b, err)) ||
      (st = read_tensor(t[P_SCALE], false, path, &md->scale, err)))
    return st;
  md->dim = (int32_t)dim;
  l->n_mats++;
  l->max_rank = TN_MAX(l->max_rank, md->dim);
  l->bytes += (size_t)(2 * n * dim + dim + 2 * n) * sizeof(float);
  return TN_OK;
}

enum tn_status tn_bn_load_gguf(const struct tn_gguf *g, const char *path,
                               struct tn_lora *l, struct tn_error *err) {
  l->kind = TN_ADAPTER_BOTTLENECK;
  struct tn_str s;
  int a;
  if (tn_gguf_get_str(g, "adapter.bottleneck.non_linearity", &s, NULL))
    return tn_error_set(err, TN_EFORMAT,
                        "%s: adapter.bottleneck.non_linearity (a string) is "
                        "missing",
                        path);
  if ((a = find_name(act_names, (int)TN_ARRAY_LEN(act_names), s)) < 0)
    return tn_error_set(err, TN_EUNSUPPORTED,
                        "%s: adapter.bottleneck.non_linearity must be one of "
                        "relu, silu, gelu, gelu_tanh, tanh, sigmoid, "
                        "leaky_relu, identity",
                        path);
  l->bn_act = (enum tn_bn_act)a;
  /* every tensor must be a module's part: nothing is silently ignored */
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    int32_t il;
    int site, part;
    if (!parse_name(g->tensors[i].name, &il, &site, &part))
      return tn_error_set(err, TN_EUNSUPPORTED,
                          "%s: tensor '%.*s' is not part of a bottleneck "
                          "module (blk.0..%d.adapter_attn|ffn.down.weight, "
                          "down.bias, up.weight, up.bias, scale)",
                          path, (int)TN_MIN(g->tensors[i].name.len, 128),
                          g->tensors[i].name.data, l->n_layer - 1);
    if (il >= l->n_layer)
      return tn_error_set(err, TN_EFORMAT,
                          "%s: tensor '%.*s' is for layer %d; the base has %d "
                          "layers: is the adapter for another model?",
                          path, (int)TN_MIN(g->tensors[i].name.len, 128),
                          g->tensors[i].name.data, il, l->n_layer);
  }
  l->bn = calloc((size_t)l->n_layer * TN_BN_N_SITES, sizeof(*l->bn));
  if (!l->bn) return tn_error_set(err, TN_ENOMEM, "%s: out of memory", path);
  for (int site = 0; site < TN_BN_N_SITES; site++) {
    int32_t before = l->n_mats;
    for (int32_t il = 0; il < l->n_layer; il++) {
      enum tn_status st = load_module(g, path, l, il, site, err);
      if (st) return st;
    }
    if (l->n_mats == before) continue;
    char key[64];
    snprintf(key, sizeof(key), "adapter.bottleneck.%s.input", site_names[site]);
    int in = -1;
    if (tn_gguf_get_str(g, key, &s, NULL) ||
        (in = find_name(input_names, (int)TN_ARRAY_LEN(input_names), s)) < 0)
      return tn_error_set(err, TN_EFORMAT,
                          "%s: %s must be 'output', 'sum' or 'stream' (the "
                          "file has %s modules)",
                          path, key, site_names[site]);
    l->bn_input[site] = (enum tn_bn_input)in;
  }
  if (l->n_mats == 0)
    return tn_error_set(err, TN_EFORMAT, "%s: the adapter has no tensors",
                        path);
  return TN_OK;
}

static float act(enum tn_bn_act a, float v) {
  switch (a) {
  case TN_BN_RELU: return v > 0.0f ? v : 0.0f;
  case TN_BN_SILU: return v / (1.0f + expf(-v));
  case TN_BN_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678f));
  case TN_BN_GELU_TANH:
    return 0.5f * v *
           (1.0f + tanhf(0.79788456f * (v + 0.044715f * v * v * v)));
  case TN_BN_TANH: return tanhf(v);
  case TN_BN_SIGMOID: return 1.0f / (1.0f + expf(-v));
  case TN_BN_LEAKY_RELU: return v > 0.0f ? v : 0.01f * v;
  case TN_BN_IDENTITY: break;
  }
  return v;
}

/* y[m] = sum over k < K of v[k] * w[k][m] (w: [K][m] rows), summed four
 * rows a pass, left to right: the same order for any y. */
static void sweep(float *restrict y, const float *restrict w,
                  const float *restrict v, int32_t K, int64_t m) {
  for (int64_t j = 0; j < m; j++) y[j] = 0.0f;
  int32_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
    const float *w0 = w + (int64_t)k * m, *w1 = w0 + m, *w2 = w1 + m,
                *w3 = w2 + m;
    for (int64_t j = 0; j < m; j++)
      y[j] = y[j] + v0 * w0[j] + v1 * w1[j] + v2 * w2[j] + v3 * w3[j];
  }
  for (; k < K; k++) {
    const float vk = v[k], *wk = w + (int64_t)k * m;
    for (int64_t j = 0; j < m; j++) y[j] += vk * wk[j];
  }
}

void tn_bn_residual(const struct tn_lora *l, int32_t il, enum tn_bn_site site,
                    float s, float *x, const float *o, float *scratch) {
  const int64_t n = l->n_embd;
  const struct tn_bn_module *md = &l->bn[il * TN_BN_N_SITES + site];
  if (!md->dim) {
    for (int64_t i = 0; i < n; i++) x[i] += o[i];
    return;
  }
  const int32_t dim = md->dim;
  float *f = scratch, *h = scratch + n; /* scratch holds 2 * n floats */
  const float *in = o;
  if (l->bn_input[site] == TN_BN_IN_STREAM) {
    in = x;
  } else if (l->bn_input[site] == TN_BN_IN_SUM) {
    for (int64_t i = 0; i < n; i++) f[i] = x[i] + o[i];
    in = f;
  }
  /* h = act(W_down in + b): term by term over the input, four terms a
   * pass, all of h at once (each h[j] summed in the same order for every
   * token; the loop over j vectorises) */
  sweep(h, md->down_t, in, (int32_t)n, dim);
  for (int32_t j = 0; j < dim; j++) h[j] = act(l->bn_act, h[j] + md->down_b[j]);
  /* f = W_up h, likewise over h */
  sweep(f, md->up_t, h, dim, n);
  for (int64_t i = 0; i < n; i++)
    x[i] = (s * md->scale[i] * (f[i] + md->up_b[i]) + o[i]) + x[i];
}
