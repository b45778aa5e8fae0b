/*
 * matmul.c: Y = X W^T with quantized weights, in two phases.
 *
 * Phase 1 (tn_matmul_quantize) turns the float activations X [n_tok][n_cols]
 * into W's vec_dot_type. X and q are both dense, row after row, so the whole
 * of X is one long run of blocks: threads split that run by blocks, which
 * keeps both threads busy even for a single token.
 *
 * Phase 2 (tn_matmul) gives each thread a range of weight rows (in groups of
 * 4; a tile of up to mr rows may end early at the range's end, which changes
 * nothing in the results: tiles are batch and shape invariant, see
 * kernels_internal.h). With a tile kernel for the type
 * (tn_gemm_kernel_get), the range is walked as mr x mt tiles: mr weight rows
 * are unpacked once per block and dotted with mt tokens. Tokens go in chunks
 * of TOK_CHUNK so the quantized activations of a chunk (about 40 KB for
 * n_cols = 576) stay in L1/L2 while the thread's weight rows stream past.
 * Decode (n_tok = 1) is the same loop with 1-token tiles: mr rows share the
 * activation block loads, and mr independent accumulator chains keep the
 * FMA units fed. Types without a tile kernel fall back to one vec_dot per
 * (row, token).
 *
 * y[t * ldy + r] receives the product of token t and weight row r; each
 * thread writes only its own rows, so no two threads touch one element.
 */
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

#define TOK_CHUNK 64
/* Batches up to this many tokens go through the 16-row kernels where the
 * type has them: all of them (decode, verification and prefill alike, in
 * fours; measured faster than the tiles at every size); lower it to
 * compare. */
#ifndef GEMV_TOK_MAX
#define GEMV_TOK_MAX (1 << 30)
#endif
#define ROW_GROUP 4

size_t tn_matmul_q_row_size(const struct tn_mat *w) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  TN_ASSERT(tt && tt->vec_dot);
  return tn_type_row_size(tt->vec_dot_type, w->n_cols);
}

size_t tn_matmul_q_size(const struct tn_mat *w, int64_t n_tok) {
  return tn_matmul_q_row_size(w) * (size_t)n_tok;
}

void tn_matmul_quantize(const struct tn_mat *w, const float *x, int64_t n_tok,
                        void *q, int ith, int nth) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  TN_ASSERT(tt && tt->vec_dot);
  const struct tn_type_traits *qt = tn_type_get(tt->vec_dot_type);
  TN_ASSERT(w->n_cols % qt->blck_size == 0);
  /* Split the run of blocks; for plain float activations split in chunks
   * of 16 elements so threads never share a cache line of q. */
  int64_t unit = qt->blck_size > 1 ? qt->blck_size : 16;
  int64_t n_all = w->n_cols * n_tok;
  int64_t n_units = (n_all + unit - 1) / unit;
  int64_t lo, hi;
  tn_split(n_units, ith, nth, &lo, &hi);
  int64_t e0 = lo * unit, e1 = TN_MIN(hi * unit, n_all);
  if (e0 >= e1) return;
  size_t off = tn_type_row_size(tt->vec_dot_type, e0);
  qt->from_float(x + e0, (uint8_t *)q + off, e1 - e0);
}

void tn_matmul(const struct tn_mat *w, const void *q, int64_t n_tok, float *y,
               int64_t ldy, int ith, int nth) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  TN_ASSERT(tt && tt->vec_dot);
  const struct tn_gemm_kernel *g = tn_gemm_kernel_get(w->type);
  const int64_t n = w->n_cols;
  const size_t ws = w->row_size;
  const size_t qs = tn_type_row_size(tt->vec_dot_type, n);
  const uint8_t *wd = w->data;
  const uint8_t *qd = q;

  int64_t lo, hi;
  tn_split((w->n_rows + ROW_GROUP - 1) / ROW_GROUP, ith, nth, &lo, &hi);
  const int64_t r0 = lo * ROW_GROUP, r1 = TN_MIN(hi * ROW_GROUP, w->n_rows);
  if (r0 >= r1) return;

  for (int64_t t0 = 0; t0 < n_tok; t0 += TOK_CHUNK) {
    const int64_t t1 = TN_MIN(t0 + TOK_CHUNK, n_tok);
    if (g && g->gemv16 && n_tok <= GEMV_TOK_MAX) {
      int64_t r = r0;
      for (; r + 16 <= r1; r += 16)
        for (int64_t t = t0; t < t1; t += TN_GEMV16_MT)
          g->gemv16(n, wd + r * ws, ws, qd + t * qs, qs, y + t * ldy + r, ldy,
                    (int)TN_MIN((int64_t)TN_GEMV16_MT, t1 - t));
      for (; r < r1; r += g->mr) {
        const int nr = (int)TN_MIN((int64_t)g->mr, r1 - r);
        for (int64_t t = t0; t < t1; t += g->mt) {
          const int nt = (int)TN_MIN((int64_t)g->mt, t1 - t);
          g->tile(n, wd + r * ws, ws, qd + t * qs, qs, y + t * ldy + r, ldy,
                  nr, nt);
        }
      }
    } else if (g && g->tile) {
      const int mr = g->mr_narrow && 2 * (t1 - t0) <= g->mt ? g->mr_narrow : g->mr;
      for (int64_t r = r0; r < r1; r += mr) {
        const int nr = (int)TN_MIN((int64_t)mr, r1 - r);
        for (int64_t t = t0; t < t1; t += g->mt) {
          const int nt = (int)TN_MIN((int64_t)g->mt, t1 - t);
          g->tile(n, wd + r * ws, ws, qd + t * qs, qs, y + t * ldy + r, ldy,
                  nr, nt);
        }
      }
    } else {
      for (int64_t r = r0; r < r1; r++)
        for (int64_t t = t0; t < t1; t++)
          tt->vec_dot(n, y + t * ldy + r, wd + r * ws, qd + t * qs);
    }
  }
}

void tn_matmul_ref(const struct tn_mat *w, const float *x, int64_t n_tok,
                   float *y, int64_t ldy) {
  const struct tn_type_traits *tt = tn_type_ref(w->type);
  TN_ASSERT(tt && tt->to_float);
  float *row = malloc((size_t)w->n_cols * sizeof(float));
  TN_ASSERT(row);
  for (int64_t r = 0; r < w->n_rows; r++) {
    tt->to_float((const uint8_t *)w->data + r * w->row_size, row, w->n_cols);
    for (int64_t t = 0; t < n_tok; t++) {
      const float *xt = x + t * w->n_cols;
      double sum = 0.0;
      for (int64_t c = 0; c < w->n_cols; c++) sum += (double)row[c] * xt[c];
      y[t * ldy + r] = (float)sum;
    }
  }
  free(row);
}

void tn_mat_get_row(const struct tn_mat *w, int64_t r, float *y) {
  const struct tn_type_traits *tt = tn_type_get(w->type);
  TN_ASSERT(tt && tt->to_float && r >= 0 && r < w->n_rows);
  tt->to_float((const uint8_t *)w->data + r * w->row_size, y, w->n_cols);
}
