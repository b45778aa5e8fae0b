/*
 * export.c: tern export-lora, a base model with one LoRA adapter merged
 * into its weights, written as a new GGUF (tn_lora_merge does the
 * arithmetic; every other tensor and key is copied as it is).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "gguf/gguf.h"
#include "model/lora.h"
#include "model/model.h"

static bool type_by_name(const char *s, enum tn_type *out) {
  for (int t = 0; t < TN_TYPE_COUNT; t++) {
    const char *n = tn_type_name((enum tn_type)t);
    if (n && !strcasecmp(n, s)) {
      *out = (enum tn_type)t;
      return true;
    }
  }
  return false;
}

int tn_cli_export_lora(int argc, char **argv) {
  const char *model = NULL, *lora = NULL, *out = NULL, *type_s = NULL;
  float scale = 1.0f;
  const struct tn_opt opts[] = {
      {"model", 'm', TN_OPT_STR, &model, 0, 0, "NAME|PATH", "the base model",
       NULL, NULL, 0},
      {"lora", 0, TN_OPT_STR, &lora, 0, 0, "PATH",
       "the adapter: a LoRA GGUF or a PEFT directory", NULL, NULL, 0},
      {"scale", 0, TN_OPT_FLOAT, &scale, -16, 16, "S",
       "the adapter's scale", "1", NULL, 0},
      {"output", 'o', TN_OPT_STR, &out, 0, 0, "FILE", "the merged GGUF",
       NULL, NULL, 0},
      {"type", 0, TN_OPT_STR, &type_s, 0, 0, "TYPE",
       "type of the merged matrices (F32, F16, BF16, Q8_0, Q4_K, ...)",
       "Q8_0 for matrices under 8 bits, else their own", NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  static const struct tn_cli_cmd cmd = {
      "export-lora",
      "tern export-lora -m BASE --lora PATH -o OUT.gguf [--type TYPE]",
      "Writes BASE with the adapter merged into its weights: each adapted "
      "matrix is dequantized, gets scale * B A added in f32, and is "
      "quantized again: to Q8_0 where it was under 8 bits (4-bit rounding "
      "would erase the update), else to its own type, or to --type; "
      "everything else is copied. The result serves with no per-token "
      "adapter cost.",
      "example:\n  tern export-lora -m smollm2-135m --lora "
      "tests/fixtures/adapters/smollm2-pirate -o pirate.gguf --type Q8_0",
      0};
  int prc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (prc) return prc;
  if (!model || !lora || !out)
    return tn_cli_fail("export-lora: -m BASE, --lora PATH and -o FILE are "
                       "required");
  enum tn_type type = TN_TYPE_COUNT;
  if (type_s && !type_by_name(type_s, &type))
    return tn_cli_fail("export-lora: --type %s is not a GGUF type name", type_s);
  char pbuf[1024];
  const char *path = tn_cli_model_path(model, pbuf, sizeof(pbuf));
  if (!path) return 1;
  struct tn_error err = {0};
  struct tn_model *m = NULL;
  struct tn_lora *l = NULL;
  struct tn_gguf_writer *w = NULL;
  int rc = 1;
  if (tn_model_load(path, &m, &err) || tn_lora_load(m, lora, &l, &err) ||
      tn_lora_merge(m, l, scale, type, &err)) {
    tn_cli_fail("export-lora: %s", err.msg);
    goto done;
  }
  const struct tn_gguf *g = m->gguf;
  if (tn_gguf_find_kv(g, "tern.merged_lora")) {
    tn_cli_fail("export-lora: %s already has an adapter merged in "
                "(tern.merged_lora); merge both into the original base",
                path);
    goto done;
  }
  w = tn_gguf_writer_new();
  if (!w || tn_gguf_writer_copy_kv(w, g) ||
      tn_gguf_writer_add_str(w, "tern.merged_lora", lora, strlen(lora)) ||
      tn_gguf_writer_add_f32(w, "tern.merged_lora_scale", scale)) {
    tn_cli_fail("export-lora: out of memory");
    goto done;
  }
  tn_gguf_writer_set_alignment(w, g->alignment);
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const struct tn_gguf_tensor *t = &g->tensors[i];
    char name[256];
    snprintf(name, sizeof(name), "%.*s", (int)t->name.len, t->name.data);
    enum tn_type ty = t->type;
    const void *data = t->data;
    /* an adapted matrix: the merged copy; q/k/v biases: the model's
     * (an (IA)3 output scale scaled them) */
    int32_t il;
    enum tn_lora_target k;
    size_t nl = strlen(name);
    if (tn_lora_parse_tensor_name(m, name, nl, &il, &k)) {
      const struct tn_lora_mat *lm = &l->mats[il * TN_LORA_N_TARGETS + k];
      if (lm->rank || lm->ia3) {
        const struct tn_mat *mm = tn_lora_base_mat(m, il, k);
        ty = mm->type;
        data = mm->data;
      }
    } else if (nl > 5 && !strcmp(name + nl - 5, ".bias")) {
      char wname[256];
      snprintf(wname, sizeof(wname), "%.*s.weight", (int)(nl - 5), name);
      if (tn_lora_parse_tensor_name(m, wname, strlen(wname), &il, &k) &&
          k <= TN_LORA_V) {
        const struct tn_layer *L = &m->layers[il];
        const float *bias = k == TN_LORA_Q ? L->bq : k == TN_LORA_K ? L->bk : L->bv;
        if (bias) data = bias;
      }
    }
    if (tn_gguf_writer_add_tensor(w, name, ty, t->n_dims, t->ne, data, &err)) {
      tn_cli_fail("export-lora: %s", err.msg);
      goto done;
    }
  }
  if (tn_gguf_writer_write(w, out, &err)) {
    tn_cli_fail("export-lora: %s", err.msg);
    goto done;
  }
  fprintf(stderr, "tern: wrote %s: %s with %s merged (%d matrices%s%s)\n", out,
          path, lora, l->n_mats, type_s ? " as " : "", type_s ? type_s : "");
  rc = 0;
done:
  tn_gguf_writer_free(w);
  tn_lora_release(l);
  tn_model_free(m);
  return rc;
}
