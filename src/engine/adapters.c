/*
 * adapters.c: an engine's named LoRA adapters (engine.h, "adapters").
 *
 * A mutex guards the table; loading a file happens outside it (it can take
 * a while), and the name is checked again before the adapter goes in.
 * The table holds one reference on each resident adapter and every request
 * using one holds another, so unloading takes the name away at once and
 * the weights go with the last request that runs on them.
 *
 * With a memory budget (tn_adapters_set_budget) the resident adapters are
 * an LRU: making room evicts the least recently used ones that no request
 * holds (the table's is their only reference, checked under the mutex,
 * which every new reference is taken under too); an evicted adapter keeps
 * its name and is read again from its path when a request asks for it.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "model/lora.h"
#include "obs/obs.h"

struct entry {
  char name[TN_ADAPTER_NAME_MAX + 1];
  char path[1024];
  struct tn_lora *lora;  /* NULL while evicted */
  float scale;
  double load_s;
  uint64_t last_used;    /* the registry's clock at its last acquire */
  /* what tn_adapters_list shows, kept while evicted */
  char format[16], kind[16];
  int32_t max_rank, n_mats;
  size_t bytes;
};

struct tn_adapters {
  const struct tn_model *model;
  struct tn_metric *loads, *unloads, *load_s, *loaded, *bytes, *evictions;
  pthread_mutex_t mu;
  struct entry *v;
  int n, cap;
  size_t budget;         /* 0: no limit */
  size_t resident;       /* bytes of resident adapters */
  uint64_t clock;
};

static struct tn_metric *series(struct tn_metrics *reg,
                                enum tn_metric_kind kind, const char *name,
                                const char *help, const char *model) {
  static const char *const labels[] = {"model"};
  static const double b[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1,
                             0.25,  0.5,   1.0,  2.5,   5.0,  10.0};
  struct tn_metric_family *f = tn_metrics_family(
      reg, kind, name, help, labels, 1, kind == TN_METRIC_HISTOGRAM ? b : NULL,
      kind == TN_METRIC_HISTOGRAM ? (int)TN_ARRAY_LEN(b) : 0);
  return f ? tn_metric_series(f, &model) : NULL;
}

struct tn_adapters *tn_adapters_new(const struct tn_model *m,
                                    struct tn_metrics *metrics,
                                    const char *model) {
  struct tn_adapters *a = calloc(1, sizeof(*a));
  if (!a) return NULL;
  a->model = m;
  if (metrics) {
    a->loads = series(metrics, TN_METRIC_COUNTER, "tern_adapter_loads_total",
                      "Adapters loaded (at start, by API or on demand).", model);
    a->unloads = series(metrics, TN_METRIC_COUNTER,
                        "tern_adapter_unloads_total", "Adapters unloaded.",
                        model);
    a->load_s = series(metrics, TN_METRIC_HISTOGRAM,
                       "tern_adapter_load_seconds",
                       "Time to read and check an adapter file.", model);
    a->loaded = series(metrics, TN_METRIC_GAUGE, "tern_adapters_loaded",
                       "Adapters loaded now.", model);
    a->bytes = series(metrics, TN_METRIC_GAUGE, "tern_adapter_memory_bytes",
                      "Memory of the resident adapters' weights.", model);
    a->evictions = series(metrics, TN_METRIC_COUNTER,
                          "tern_adapter_evictions_total",
                          "Adapters evicted to stay within --adapter-mem "
                          "(read again when asked for).",
                          model);
  }
  pthread_mutex_init(&a->mu, NULL);
  return a;
}

void tn_adapters_set_budget(struct tn_adapters *a, size_t bytes) {
  pthread_mutex_lock(&a->mu);
  a->budget = bytes;
  pthread_mutex_unlock(&a->mu);
}

void tn_adapters_free(struct tn_adapters *a) {
  if (!a) return;
  for (int i = 0; i < a->n; i++) tn_lora_release(a->v[i].lora);
  free(a->v);
  pthread_mutex_destroy(&a->mu);
  free(a);
}

bool tn_adapter_name_ok(const char *name) {
  size_t n = strlen(name);
  /* not "." or "..", nor hidden: a name may become a file name */
  if (n == 0 || n > TN_ADAPTER_NAME_MAX || name[0] == '.') return false;
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
      return false;
  }
  return true;
}

static int find(const struct tn_adapters *a, const char *name) {
  for (int i = 0; i < a->n; i++)
    if (!strcmp(a->v[i].name, name)) return i;
  return -1;
}

/* (locked) Evicts least recently used adapters no request holds until
 * `need` more bytes fit the budget; false when they cannot. */
static bool make_room(struct tn_adapters *a, size_t need) {
  if (!a->budget) return true;
  if (need > a->budget) return false; /* evict nothing for what never fits */
  size_t idle = 0;
  for (int i = 0; i < a->n; i++)
    if (a->v[i].lora && atomic_load(&a->v[i].lora->refs) == 1)
      idle += a->v[i].bytes;
  if (a->resident - idle + need > a->budget) return false;
  while (a->resident + need > a->budget) {
    int lru = -1;
    for (int i = 0; i < a->n; i++) {
      struct entry *e = &a->v[i];
      if (e->lora && atomic_load(&e->lora->refs) == 1 &&
          (lru < 0 || e->last_used < a->v[lru].last_used))
        lru = i;
    }
    if (lru < 0) return false;
    struct entry *e = &a->v[lru];
    a->resident -= e->bytes;
    if (a->bytes) tn_metric_add(a->bytes, -(double)e->bytes);
    if (a->evictions) tn_metric_add(a->evictions, 1);
    tn_log_info("adapter '%s' evicted (--adapter-mem); read again on use",
                e->name);
    tn_lora_release(e->lora);
    e->lora = NULL;
  }
  return true;
}

static enum tn_status no_room(const struct tn_adapters *a, const char *name,
                              size_t need, struct tn_error *err) {
  if (need > a->budget)
    return tn_error_set(err, TN_EFULL,
                        "adapter '%s' needs %.1f MiB, more than the whole "
                        "adapter memory (%.1f MiB)",
                        name, (double)need / 1048576.0,
                        (double)a->budget / 1048576.0);
  return tn_error_set(err, TN_EFULL,
                      "adapter memory (%.1f MiB) is held by adapters that "
                      "requests are using; retry when they finish",
                      (double)a->budget / 1048576.0);
}

/* (locked) l becomes entry e's resident weights. */
static void make_resident(struct tn_adapters *a, struct entry *e,
                          struct tn_lora *l, double load_s) {
  snprintf(l->name, sizeof(l->name), "%s", e->name);
  e->lora = l;
  e->load_s = load_s;
  snprintf(e->format, sizeof(e->format), "%s", l->format);
  snprintf(e->kind, sizeof(e->kind), "%s", tn_adapter_kind_name(l->kind));
  e->max_rank = l->max_rank;
  e->n_mats = l->n_mats;
  e->bytes = l->bytes;
  e->last_used = ++a->clock;
  a->resident += l->bytes;
  if (a->loads) tn_metric_add(a->loads, 1);
  if (a->load_s) tn_metric_observe(a->load_s, load_s);
  if (a->bytes) tn_metric_add(a->bytes, (double)l->bytes);
}

enum tn_status tn_adapters_load(struct tn_adapters *a, const char *name,
                                const char *path, float scale,
                                struct tn_error *err) {
  if (!tn_adapter_name_ok(name))
    return tn_error_set(err, TN_EINVAL,
                        "adapter name '%.80s': use 1..%d letters, digits, "
                        "'-', '_' or '.'",
                        name, TN_ADAPTER_NAME_MAX);
  if (!(scale >= -TN_ADAPTER_SCALE_MAX && scale <= TN_ADAPTER_SCALE_MAX))
    return tn_error_set(err, TN_EINVAL, "adapter '%s': scale must be in "
                        "[-%g, %g]", name, (double)TN_ADAPTER_SCALE_MAX,
                        (double)TN_ADAPTER_SCALE_MAX);
  if (strlen(path) >= sizeof(((struct entry *)0)->path))
    return tn_error_set(err, TN_EINVAL, "adapter '%s': the path is longer "
                        "than %zu bytes", name,
                        sizeof(((struct entry *)0)->path) - 1);
  pthread_mutex_lock(&a->mu);
  bool taken = find(a, name) >= 0;
  pthread_mutex_unlock(&a->mu);
  if (taken)
    return tn_error_set(err, TN_EEXIST, "adapter '%s' is already loaded", name);
  double t0 = tn_time_s();
  struct tn_lora *l = NULL;
  enum tn_status st = tn_lora_load(a->model, path, &l, err);
  if (st) return st;
  pthread_mutex_lock(&a->mu);
  if (find(a, name) >= 0) {
    st = tn_error_set(err, TN_EEXIST, "adapter '%s' is already loaded", name);
  } else if (a->n == a->cap) {
    int cap = a->cap ? a->cap * 2 : 8;
    struct entry *v = realloc(a->v, (size_t)cap * sizeof(*v));
    if (!v) st = tn_error_set(err, TN_ENOMEM, "out of memory");
    else a->v = v, a->cap = cap;
  }
  if (!st && !make_room(a, l->bytes)) st = no_room(a, name, l->bytes, err);
  if (!st) {
    struct entry *e = &a->v[a->n++];
    memset(e, 0, sizeof(*e));
    snprintf(e->name, sizeof(e->name), "%s", name);
    snprintf(e->path, sizeof(e->path), "%s", path);
    e->scale = scale;
    make_resident(a, e, l, tn_time_s() - t0);
    if (a->loaded) tn_metric_add(a->loaded, 1);
    l = NULL;
  }
  pthread_mutex_unlock(&a->mu);
  tn_lora_release(l);
  return st;
}

enum tn_status tn_adapters_unload(struct tn_adapters *a, const char *name,
                                  struct tn_error *err) {
  pthread_mutex_lock(&a->mu);
  int i = find(a, name);
  struct tn_lora *l = NULL;
  if (i >= 0) {
    l = a->v[i].lora;
    if (l) {
      a->resident -= a->v[i].bytes;
      if (a->bytes) tn_metric_add(a->bytes, -(double)a->v[i].bytes);
    }
    memmove(&a->v[i], &a->v[i + 1], (size_t)(a->n - i - 1) * sizeof(*a->v));
    a->n--;
    if (a->unloads) tn_metric_add(a->unloads, 1);
    if (a->loaded) tn_metric_add(a->loaded, -1);
  }
  pthread_mutex_unlock(&a->mu);
  if (i < 0)
    return tn_error_set(err, TN_ENOENT, "adapter '%.80s' is not loaded", name);
  tn_lora_release(l);
  return TN_OK;
}

/* (locked) A reference on e's resident adapter for a caller. */
static struct tn_lora *hand_out(struct tn_adapters *a, struct entry *e,
                                float *scale) {
  tn_lora_retain(e->lora);
  e->last_used = ++a->clock;
  if (scale) *scale = e->scale;
  return e->lora;
}

bool tn_adapters_has(struct tn_adapters *a, const char *name) {
  pthread_mutex_lock(&a->mu);
  bool has = find(a, name) >= 0;
  pthread_mutex_unlock(&a->mu);
  return has;
}

enum tn_status tn_adapters_acquire(struct tn_adapters *a, const char *name,
                                   struct tn_lora **out, float *scale,
                                   struct tn_error *err) {
  *out = NULL;
  char path[1024];
  pthread_mutex_lock(&a->mu);
  int i = find(a, name);
  if (i >= 0 && a->v[i].lora) {
    *out = hand_out(a, &a->v[i], scale);
  } else if (i >= 0) {
    snprintf(path, sizeof(path), "%s", a->v[i].path);
  }
  pthread_mutex_unlock(&a->mu);
  if (*out) return TN_OK;
  if (i < 0)
    return tn_error_set(err, TN_ENOENT, "adapter '%.80s' is not loaded", name);
  /* evicted: read it again, outside the lock */
  double t0 = tn_time_s();
  struct tn_lora *l = NULL;
  enum tn_status st = tn_lora_load(a->model, path, &l, err);
  if (st) return st;
  pthread_mutex_lock(&a->mu);
  i = find(a, name);
  /* (unloaded meanwhile, or the name reused for another file) */
  if (i < 0 || strcmp(a->v[i].path, path) != 0) {
    st = tn_error_set(err, TN_ENOENT, "adapter '%.80s' is not loaded", name);
  } else if (!a->v[i].lora) {
    if (!make_room(a, l->bytes)) {
      st = no_room(a, name, l->bytes, err);
    } else {
      make_resident(a, &a->v[i], l, tn_time_s() - t0);
      l = NULL;
    }
  }
  if (!st) /* ours, or one a request racing this one brought back */
    *out = hand_out(a, &a->v[i], scale);
  pthread_mutex_unlock(&a->mu);
  tn_lora_release(l);
  return st;
}

struct tn_lora *tn_adapters_get(struct tn_adapters *a, const char *name,
                                float *scale) {
  struct tn_lora *l = NULL;
  tn_adapters_acquire(a, name, &l, scale, NULL);
  return l;
}

int tn_adapters_list(struct tn_adapters *a, struct tn_adapter_info *out,
                     int cap) {
  pthread_mutex_lock(&a->mu);
  int n = a->n;
  for (int i = 0; i < n && i < cap; i++) {
    const struct entry *e = &a->v[i];
    struct tn_adapter_info *o = &out[i];
    memset(o, 0, sizeof(*o));
    snprintf(o->name, sizeof(o->name), "%s", e->name);
    snprintf(o->path, sizeof(o->path), "%s", e->path);
    snprintf(o->format, sizeof(o->format), "%s", e->format);
    snprintf(o->kind, sizeof(o->kind), "%s", e->kind);
    o->max_rank = e->max_rank;
    o->n_mats = e->n_mats;
    o->bytes = e->bytes;
    o->scale = e->scale;
    o->load_s = e->load_s;
    o->resident = e->lora != NULL;
  }
  pthread_mutex_unlock(&a->mu);
  return n;
}
