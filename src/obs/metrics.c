/*
 * metrics.c: the Prometheus metrics registry behind obs.h.
 *
 * Shape. A registry owns an array of families in registration order; a
 * family owns an array of series in creation order. Every series is its own
 * allocation, so the pointer tn_metric_series() returns stays valid until
 * tn_metrics_free(), however many series are added later.
 *
 *   tn_metrics ── fams[] ──> tn_metric_family ── series[] ──> tn_metric
 *                            (name, kind, labels,            (label values,
 *                             buckets, mutex)                 atomic cells)
 *
 * Values. Every number a series holds lives in a _Atomic uint64_t cell:
 * counters and gauges keep the bits of one double; histograms keep the bits
 * of the sum plus one plain count per bucket (not cumulative: observation v
 * lands in the first bucket whose upper bound is >= v, the last cell being
 * +Inf). Updates are relaxed atomics (a compare-and-swap loop for doubles),
 * so the engine thread never takes a lock or allocates once it holds a
 * series. Rendering adds the bucket cells up as it goes, so within one
 * scrape the buckets are cumulative and _count equals the +Inf bucket even
 * while observations race in; _sum may be one observation ahead or behind,
 * which Prometheus tolerates.
 *
 * Locks. reg->mu guards reg->fams (registration, rendering); fam->mu guards
 * fam->series (lookup, creation, rendering). Order: reg->mu, then fam->mu.
 * Neither is held on the update path.
 */
#include "obs/obs.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tn_metric {
  struct tn_metric_family *fam;
  uint64_t hash;                           /* of the label values */
  char *values[TN_METRIC_LABELS_MAX];      /* point into this allocation */
  _Atomic uint64_t sum;                    /* double bits: value or sum */
  _Atomic uint64_t counts[];               /* histograms: n_buckets + 1 */
};

struct tn_metric_family {
  enum tn_metric_kind kind;
  char *name;
  char *help;                              /* may be NULL */
  char *labels[TN_METRIC_LABELS_MAX];
  int n_labels;
  double buckets[TN_METRIC_BUCKETS_MAX];
  int n_buckets;

  pthread_mutex_t mu;                      /* guards the fields below */
  struct tn_metric **series;
  size_t n_series, cap_series;
};

struct tn_metrics {
  pthread_mutex_t mu;                      /* guards the fields below */
  struct tn_metric_family **fams;
  size_t n_fams, cap_fams;
};

/* ---- atomic doubles */

static uint64_t dbl_bits(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
}

static double bits_dbl(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
}

static void cell_add(_Atomic uint64_t *cell, double v) {
  uint64_t old = atomic_load_explicit(cell, memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(
      cell, &old, dbl_bits(bits_dbl(old) + v), memory_order_relaxed,
      memory_order_relaxed)) {
  }
}

static double cell_load(const _Atomic uint64_t *cell) {
  return bits_dbl(
      atomic_load_explicit((_Atomic uint64_t *)cell, memory_order_relaxed));
}

/* ---- names */

static bool name_valid(const char *s, bool colon) {
  if (!s || !*s) return false;
  for (const char *p = s; *p; p++) {
    char c = *p;
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (colon && c == ':') || (p != s && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

static bool labels_valid(enum tn_metric_kind kind,
                         const char *const *names, int n) {
  if (n < 0 || n > TN_METRIC_LABELS_MAX) return false;
  if (n > 0 && !names) return false;
  for (int i = 0; i < n; i++) {
    if (!name_valid(names[i], false)) return false;
    if (strncmp(names[i], "__", 2) == 0) return false; /* reserved */
    if (kind == TN_METRIC_HISTOGRAM && strcmp(names[i], "le") == 0)
      return false;
    for (int j = 0; j < i; j++)
      if (strcmp(names[i], names[j]) == 0) return false;
  }
  return true;
}

static bool buckets_valid(const double *b, int n) {
  if (n < 0 || n > TN_METRIC_BUCKETS_MAX) return false;
  if (n > 0 && !b) return false;
  for (int i = 0; i < n; i++) {
    if (!isfinite(b[i])) return false;
    if (i > 0 && !(b[i] > b[i - 1])) return false;
  }
  return true;
}

/* ---- families */

static void family_free(struct tn_metric_family *fam) {
  if (!fam) return;
  for (size_t i = 0; i < fam->n_series; i++) free(fam->series[i]);
  free(fam->series);
  for (int i = 0; i < fam->n_labels; i++) free(fam->labels[i]);
  free(fam->name);
  free(fam->help);
  pthread_mutex_destroy(&fam->mu);
  free(fam);
}

static bool family_matches(const struct tn_metric_family *fam,
                           enum tn_metric_kind kind,
                           const char *const *label_names, int n_labels,
                           const double *buckets, int n_buckets) {
  if (fam->kind != kind || fam->n_labels != n_labels) return false;
  for (int i = 0; i < n_labels; i++)
    if (strcmp(fam->labels[i], label_names[i]) != 0) return false;
  if (kind == TN_METRIC_HISTOGRAM) {
    if (fam->n_buckets != n_buckets) return false;
    for (int i = 0; i < n_buckets; i++)
      if (fam->buckets[i] != buckets[i]) return false;
  }
  return true;
}

struct tn_metrics *tn_metrics_new(void) {
  struct tn_metrics *reg = calloc(1, sizeof *reg);
  if (!reg) return NULL;
  if (pthread_mutex_init(&reg->mu, NULL) != 0) {
    free(reg);
    return NULL;
  }
  return reg;
}

void tn_metrics_free(struct tn_metrics *reg) {
  if (!reg) return;
  for (size_t i = 0; i < reg->n_fams; i++) family_free(reg->fams[i]);
  free(reg->fams);
  pthread_mutex_destroy(&reg->mu);
  free(reg);
}

struct tn_metric_family *tn_metrics_family(struct tn_metrics *reg,
                                           enum tn_metric_kind kind,
                                           const char *name, const char *help,
                                           const char *const *label_names,
                                           int n_labels,
                                           const double *buckets,
                                           int n_buckets) {
  if (!reg || !name_valid(name, true)) return NULL;
  if (kind != TN_METRIC_COUNTER && kind != TN_METRIC_GAUGE &&
      kind != TN_METRIC_HISTOGRAM)
    return NULL;
  if (!labels_valid(kind, label_names, n_labels)) return NULL;
  if (kind != TN_METRIC_HISTOGRAM) n_buckets = 0;
  else if (!buckets_valid(buckets, n_buckets)) return NULL;

  struct tn_metric_family *fam = NULL;
  pthread_mutex_lock(&reg->mu);
  for (size_t i = 0; i < reg->n_fams; i++) {
    struct tn_metric_family *f = reg->fams[i];
    if (strcmp(f->name, name) == 0) {
      fam = family_matches(f, kind, label_names, n_labels, buckets, n_buckets)
                ? f
                : NULL;
      pthread_mutex_unlock(&reg->mu);
      return fam;
    }
  }

  if (reg->n_fams == reg->cap_fams) {
    size_t cap = reg->cap_fams ? reg->cap_fams * 2 : 16;
    void *p = realloc(reg->fams, cap * sizeof *reg->fams);
    if (!p) goto fail;
    reg->fams = p;
    reg->cap_fams = cap;
  }
  fam = calloc(1, sizeof *fam);
  if (!fam) goto fail;
  if (pthread_mutex_init(&fam->mu, NULL) != 0) {
    free(fam);
    fam = NULL;
    goto fail;
  }
  fam->kind = kind;
  fam->name = strdup(name);
  fam->help = help ? strdup(help) : NULL;
  if (!fam->name || (help && !fam->help)) goto fail;
  for (int i = 0; i < n_labels; i++) {
    fam->labels[i] = strdup(label_names[i]);
    if (!fam->labels[i]) goto fail;
    fam->n_labels = i + 1;
  }
  fam->n_buckets = n_buckets;
  if (n_buckets) memcpy(fam->buckets, buckets, n_buckets * sizeof *buckets);
  /* An unlabelled family has exactly one series: make it now, so a scrape
   * shows it at zero before its first update (as client libraries do). */
  if (n_labels == 0 && !tn_metric_series(fam, NULL)) goto fail;
  reg->fams[reg->n_fams++] = fam;
  pthread_mutex_unlock(&reg->mu);
  return fam;

fail:
  family_free(fam);
  pthread_mutex_unlock(&reg->mu);
  return NULL;
}

/* ---- series */

static uint64_t values_hash(const char *const *values, int n) {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < n; i++) {
    /* hash includes the terminating NUL so ("ab","c") != ("a","bc") */
    h = tn_hash64(values[i], strlen(values[i]) + 1, h);
  }
  return h;
}

static bool values_equal(const struct tn_metric *m, const char *const *values,
                         int n) {
  for (int i = 0; i < n; i++)
    if (strcmp(m->values[i], values[i]) != 0) return false;
  return true;
}

struct tn_metric *tn_metric_series(struct tn_metric_family *fam,
                                   const char *const *label_values) {
  if (!fam) return NULL;
  int n = fam->n_labels;
  if (n > 0 && !label_values) return NULL;
  for (int i = 0; i < n; i++)
    if (!label_values[i]) return NULL;
  uint64_t h = values_hash(label_values, n);

  pthread_mutex_lock(&fam->mu);
  for (size_t i = 0; i < fam->n_series; i++) {
    struct tn_metric *m = fam->series[i];
    if (m->hash == h && values_equal(m, label_values, n)) {
      pthread_mutex_unlock(&fam->mu);
      return m;
    }
  }

  struct tn_metric *m = NULL;
  if (fam->n_series == fam->cap_series) {
    size_t cap = fam->cap_series ? fam->cap_series * 2 : 8;
    void *p = realloc(fam->series, cap * sizeof *fam->series);
    if (!p) goto out;
    fam->series = p;
    fam->cap_series = cap;
  }
  size_t n_cells = fam->kind == TN_METRIC_HISTOGRAM
                       ? (size_t)fam->n_buckets + 1
                       : 0;
  size_t size = sizeof *m + n_cells * sizeof m->counts[0];
  size_t lens[TN_METRIC_LABELS_MAX];
  for (int i = 0; i < n; i++) {
    lens[i] = strlen(label_values[i]) + 1;
    if (tn_add_overflow(size, lens[i], &size)) goto out;
  }
  m = calloc(1, size);
  if (!m) goto out;
  m->fam = fam;
  m->hash = h;
  atomic_init(&m->sum, dbl_bits(0.0));
  for (size_t i = 0; i < n_cells; i++) atomic_init(&m->counts[i], 0);
  char *p = (char *)&m->counts[n_cells];
  for (int i = 0; i < n; i++) {
    memcpy(p, label_values[i], lens[i]);
    m->values[i] = p;
    p += lens[i];
  }
  fam->series[fam->n_series++] = m;

out:
  pthread_mutex_unlock(&fam->mu);
  return m;
}

/* ---- updates: no locks, no allocation */

void tn_metric_add(struct tn_metric *m, double v) {
  if (!m) return;
  switch (m->fam->kind) {
    case TN_METRIC_COUNTER:
      if (!(v >= 0)) return; /* counters only go up; NaN ignored */
      cell_add(&m->sum, v);
      return;
    case TN_METRIC_GAUGE:
      cell_add(&m->sum, v);
      return;
    case TN_METRIC_HISTOGRAM:
      return;
  }
}

void tn_metric_set(struct tn_metric *m, double v) {
  if (!m || m->fam->kind != TN_METRIC_GAUGE) return;
  atomic_store_explicit(&m->sum, dbl_bits(v), memory_order_relaxed);
}

void tn_metric_observe(struct tn_metric *m, double v) {
  if (!m || m->fam->kind != TN_METRIC_HISTOGRAM) return;
  const struct tn_metric_family *fam = m->fam;
  int lo = 0, hi = fam->n_buckets; /* first bound >= v, or n_buckets */
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (v <= fam->buckets[mid]) hi = mid;
    else lo = mid + 1;
  }
  if (isnan(v)) lo = fam->n_buckets;
  atomic_fetch_add_explicit(&m->counts[lo], 1, memory_order_relaxed);
  cell_add(&m->sum, v);
}

static uint64_t hist_count(const struct tn_metric *m) {
  uint64_t total = 0;
  for (int i = 0; i <= m->fam->n_buckets; i++)
    total += atomic_load_explicit((_Atomic uint64_t *)&m->counts[i],
                                  memory_order_relaxed);
  return total;
}

double tn_metric_value(const struct tn_metric *m) {
  if (!m) return 0;
  if (m->fam->kind == TN_METRIC_HISTOGRAM) return (double)hist_count(m);
  return cell_load(&m->sum);
}

/* ---- rendering */

struct out {
  char *data;
  size_t len, cap;
  bool oom;
};

static void out_put(struct out *o, const char *s, size_t n) {
  if (o->oom) return;
  size_t need;
  if (tn_add_overflow(o->len, n + 1, &need)) {
    o->oom = true;
    return;
  }
  if (need > o->cap) {
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < need) {
      if (tn_mul_overflow(cap, 2, &cap)) {
        o->oom = true;
        return;
      }
    }
    char *p = realloc(o->data, cap);
    if (!p) {
      o->oom = true;
      return;
    }
    o->data = p;
    o->cap = cap;
  }
  memcpy(o->data + o->len, s, n);
  o->len += n;
  o->data[o->len] = '\0';
}

static void out_str(struct out *o, const char *s) { out_put(o, s, strlen(s)); }

/* Escapes backslash and newline (HELP text), and double quote too (label
 * values). */
static void out_escaped(struct out *o, const char *s, bool quote) {
  const char *run = s;
  for (const char *p = s; *p; p++) {
    const char *rep = NULL;
    if (*p == '\\') rep = "\\\\";
    else if (*p == '\n') rep = "\\n";
    else if (*p == '"' && quote) rep = "\\\"";
    if (!rep) continue;
    out_put(o, run, (size_t)(p - run));
    out_str(o, rep);
    run = p + 1;
  }
  out_str(o, run);
}

/* The shortest decimal that reads back as the same double ("0.1", not
 * "0.10000000000000001"); infinities and NaN as Prometheus spells them. */
static void fmt_double(char buf[32], double v) {
  if (isnan(v)) {
    strcpy(buf, "NaN");
    return;
  }
  if (isinf(v)) {
    strcpy(buf, v > 0 ? "+Inf" : "-Inf");
    return;
  }
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, 32, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) return;
  }
}

static void out_double(struct out *o, double v) {
  char buf[32];
  fmt_double(buf, v);
  out_str(o, buf);
}

static void out_u64(struct out *o, uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "%" PRIu64, v);
  out_str(o, buf);
}

/* Writes `{a="x",b="y"` plus `,le="..."` when le is given, then `}`; writes
 * nothing when there are no labels at all. */
static void out_labels(struct out *o, const struct tn_metric *m,
                       const char *le) {
  const struct tn_metric_family *fam = m->fam;
  if (fam->n_labels == 0 && !le) return;
  out_str(o, "{");
  for (int i = 0; i < fam->n_labels; i++) {
    if (i) out_str(o, ",");
    out_str(o, fam->labels[i]);
    out_str(o, "=\"");
    out_escaped(o, m->values[i], true);
    out_str(o, "\"");
  }
  if (le) {
    if (fam->n_labels) out_str(o, ",");
    out_str(o, "le=\"");
    out_str(o, le);
    out_str(o, "\"");
  }
  out_str(o, "}");
}

static void out_sample(struct out *o, const struct tn_metric *m,
                       const char *suffix, const char *le) {
  out_str(o, m->fam->name);
  out_str(o, suffix);
  out_labels(o, m, le);
  out_str(o, " ");
}

static const char *kind_name(enum tn_metric_kind kind) {
  switch (kind) {
    case TN_METRIC_COUNTER: return "counter";
    case TN_METRIC_GAUGE: return "gauge";
    case TN_METRIC_HISTOGRAM: return "histogram";
  }
  return "untyped";
}

static void render_family(struct out *o, struct tn_metric_family *fam) {
  if (fam->help && fam->help[0]) {
    out_str(o, "# HELP ");
    out_str(o, fam->name);
    out_str(o, " ");
    out_escaped(o, fam->help, false);
    out_str(o, "\n");
  }
  out_str(o, "# TYPE ");
  out_str(o, fam->name);
  out_str(o, " ");
  out_str(o, kind_name(fam->kind));
  out_str(o, "\n");

  pthread_mutex_lock(&fam->mu);
  for (size_t s = 0; s < fam->n_series; s++) {
    const struct tn_metric *m = fam->series[s];
    if (fam->kind != TN_METRIC_HISTOGRAM) {
      out_sample(o, m, "", NULL);
      out_double(o, cell_load(&m->sum));
      out_str(o, "\n");
      continue;
    }
    uint64_t cum = 0;
    char le[32];
    for (int b = 0; b <= fam->n_buckets; b++) {
      cum += atomic_load_explicit((_Atomic uint64_t *)&m->counts[b],
                                  memory_order_relaxed);
      if (b < fam->n_buckets) fmt_double(le, fam->buckets[b]);
      else strcpy(le, "+Inf");
      out_sample(o, m, "_bucket", le);
      out_u64(o, cum);
      out_str(o, "\n");
    }
    out_sample(o, m, "_sum", NULL);
    out_double(o, cell_load(&m->sum));
    out_str(o, "\n");
    out_sample(o, m, "_count", NULL);
    out_u64(o, cum);
    out_str(o, "\n");
  }
  pthread_mutex_unlock(&fam->mu);
}

char *tn_metrics_render(struct tn_metrics *reg, size_t *len) {
  if (len) *len = 0;
  if (!reg) return NULL;
  struct out o = {0};
  out_put(&o, "", 0); /* an empty registry still renders "" */
  pthread_mutex_lock(&reg->mu);
  for (size_t i = 0; i < reg->n_fams; i++) render_family(&o, reg->fams[i]);
  pthread_mutex_unlock(&reg->mu);
  if (o.oom) {
    free(o.data);
    return NULL;
  }
  if (len) *len = o.len;
  return o.data;
}
