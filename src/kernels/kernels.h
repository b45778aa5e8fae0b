/*
 * kernels.h: tensor element types and the arithmetic over them.
 *
 * One table of type traits indexed by enum tn_type (ggml's numbering, so a
 * GGUF tensor's type field maps straight onto it). Each type knows its block
 * size and bytes per block; the types we compute with also carry
 * dequantize/quantize row functions and a dot product against the type that
 * activations are quantized to (vec_dot_type).
 *
 * Every kernel exists at three levels: a scalar reference (tn_type_ref), and
 * AVX2 / AVX-512 versions chosen once at start-up by CPU feature
 * (tn_type_get). Tests compare the two on random data.
 *
 * Threading: functions taking (ith, nth) do thread ith's share of the work;
 * the caller runs them on every thread of a tn_pool and meets at a barrier.
 */
#ifndef TN_KERNELS_H
#define TN_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum tn_type {
  TN_TYPE_F32 = 0,
  TN_TYPE_F16 = 1,
  TN_TYPE_Q4_0 = 2,
  TN_TYPE_Q4_1 = 3,
  TN_TYPE_Q5_0 = 6,
  TN_TYPE_Q5_1 = 7,
  TN_TYPE_Q8_0 = 8,
  TN_TYPE_Q8_1 = 9,
  TN_TYPE_Q2_K = 10,
  TN_TYPE_Q3_K = 11,
  TN_TYPE_Q4_K = 12,
  TN_TYPE_Q5_K = 13,
  TN_TYPE_Q6_K = 14,
  TN_TYPE_Q8_K = 15,
  TN_TYPE_IQ2_XXS = 16,
  TN_TYPE_IQ2_XS = 17,
  TN_TYPE_IQ3_XXS = 18,
  TN_TYPE_IQ1_S = 19,
  TN_TYPE_IQ4_NL = 20,
  TN_TYPE_IQ3_S = 21,
  TN_TYPE_IQ2_S = 22,
  TN_TYPE_IQ4_XS = 23,
  TN_TYPE_I8 = 24,
  TN_TYPE_I16 = 25,
  TN_TYPE_I32 = 26,
  TN_TYPE_I64 = 27,
  TN_TYPE_F64 = 28,
  TN_TYPE_IQ1_M = 29,
  TN_TYPE_BF16 = 30,
  TN_TYPE_TQ1_0 = 34,
  TN_TYPE_TQ2_0 = 35,
  TN_TYPE_MXFP4 = 39,
  TN_TYPE_COUNT = 40
};

/* Converts n values of one row. */
typedef void (*tn_to_float_cb)(const void *x, float *y, int64_t n);
typedef void (*tn_from_float_cb)(const float *x, void *y, int64_t n);
/* *s = dot(x[0..n), y[0..n)); x in the weight type, y in vec_dot_type. */
typedef void (*tn_vec_dot_cb)(int64_t n, float *s, const void *x,
                              const void *y);

struct tn_type_traits {
  const char *name;     /* "Q4_1"; NULL for ids GGUF does not define */
  int64_t blck_size;    /* elements per block (1 for plain types) */
  size_t type_size;     /* bytes per block */
  tn_to_float_cb to_float;     /* NULL: we cannot compute with this type */
  tn_from_float_cb from_float; /* NULL: we cannot produce this type */
  enum tn_type vec_dot_type;   /* type activations are quantized to */
  tn_vec_dot_cb vec_dot;       /* NULL: no dot product */
};

enum tn_cpu_level {
  TN_CPU_LEVEL_SCALAR,
  TN_CPU_LEVEL_AVX2, /* AVX2 + FMA + F16C */
  TN_CPU_LEVEL_AVX512, /* AVX-512 F/BW/VL (+VNNI where present) */
  TN_CPU_LEVEL_COUNT
};

/* Picks kernels by CPU feature; called by tn_type_get on first use, and
 * again by tests to force a lower level (never above what the CPU has).
 * Returns the level in force. */
enum tn_cpu_level tn_kernels_init(enum tn_cpu_level max_level);
enum tn_cpu_level tn_kernels_level(void);
const char *tn_cpu_level_name(enum tn_cpu_level level);

/* Dispatched (fastest) traits, or NULL when t is not a GGUF type id. */
const struct tn_type_traits *tn_type_get(enum tn_type t);
/* Scalar reference traits for the same type. */
const struct tn_type_traits *tn_type_ref(enum tn_type t);
/* True if t is a valid type id (name != NULL). */
bool tn_type_valid(int64_t t);
const char *tn_type_name(enum tn_type t);
/* Bytes of a row of n elements; n must be a multiple of blck_size. */
size_t tn_type_row_size(enum tn_type t, int64_t n);

/* ---- half floats */

float tn_fp16_to_fp32(uint16_t h);
uint16_t tn_fp32_to_fp16(float f);
float tn_bf16_to_fp32(uint16_t h);
uint16_t tn_fp32_to_bf16(float f);
void tn_fp16_to_fp32_row(const uint16_t *x, float *y, int64_t n);
void tn_fp32_to_fp16_row(const float *x, uint16_t *y, int64_t n);

/* ---- matrix products
 *
 * A weight matrix W has n_rows rows of n_cols elements of type `type`, row
 * i at data + i*row_size (GGUF's ne[0] = n_cols, ne[1] = n_rows).
 * Activations X are n_tok rows of n_cols floats.
 *
 *   Y[t][r] = sum_c W[r][c] * X[t][c]
 *
 * In two phases with a barrier between them:
 *   tn_matmul_quantize(w, x, n_tok, q, ith, nth)   X -> q (vec_dot_type)
 *   tn_matmul(w, q, n_tok, y, ldy, ith, nth)       q -> Y (row stride ldy)
 * q must hold tn_matmul_q_size(w, n_tok) bytes. Several matrices with the
 * same n_cols and vec_dot_type can share one quantized q.
 */
struct tn_mat {
  enum tn_type type;
  int64_t n_cols;
  int64_t n_rows;
  size_t row_size;
  const void *data;
};

size_t tn_matmul_q_size(const struct tn_mat *w, int64_t n_tok);
size_t tn_matmul_q_row_size(const struct tn_mat *w);
void tn_matmul_quantize(const struct tn_mat *w, const float *x, int64_t n_tok,
                        void *q, int ith, int nth);
void tn_matmul(const struct tn_mat *w, const void *q, int64_t n_tok, float *y,
               int64_t ldy, int ith, int nth);
/* Reference: the same product by plain dequantize + float dot, one thread. */
void tn_matmul_ref(const struct tn_mat *w, const float *x, int64_t n_tok,
                   float *y, int64_t ldy);

/* Dequantizes row r of w into y[n_cols]. */
void tn_mat_get_row(const struct tn_mat *w, int64_t r, float *y);

/* ---- element-wise and row ops (float32) */

void tn_rms_norm(const float *x, const float *w, float *y, int64_t n,
                 float eps);
/* Gemma stores norm weights as (w), applied as x*(1+w) when one_plus. */
void tn_rms_norm_ex(const float *x, const float *w, float *y, int64_t n,
                    float eps, bool one_plus);
/* gate = silu(gate) * up, silu(g) = g / (1 + exp(-g)) with tn_exp_poly */
void tn_silu_mul(float *gate, const float *up, int64_t n);
void tn_gelu_mul(float *gate, const float *up, int64_t n); /* tanh-approx GELU */
void tn_vec_add(float *y, const float *x, int64_t n);
void tn_vec_scale(float *y, float s, int64_t n);

/* exp(x) to about 1.5 ulp, with llama.cpp's CPU rounding (see ops.c). */
float tn_exp_poly(float x);
/* log(sum of exp(x[i])) over x[0..n): the max m plus the log of the sum of
 * tn_exp_poly(x[i] - m), taken in 16-wide chunks from 0 (tn_reduce16,
 * added in double). The same bits at every level; -inf for an empty or
 * all -inf row, m itself when m is +inf or NaN. */
float tn_logsumexp(const float *x, int64_t n);
/* The sum of v[0..16) in the order of an AVX-512 horizontal add. */
float tn_reduce16(const float *v);

/* ---- attention in llama.cpp's order of operations (ops.c)
 *
 * tn_attn_softmax: softmax of x[0..n) with tn_exp_poly, the sum taken in
 *   16-wide chunks aligned so that x[i] is lane (i + off) % 16 (off: the
 *   first position's cache index mod 16), then scaled by 1/sum.
 * tn_attn_dot: x.y in 64 lanes (see ops.c); *out[i] = tn_attn_dot(x, y +
 *   i * y_stride, n) * scale for i < ny, one call per cache row.
 * tn_attn_dot_rows_f16: tn_attn_dot_rows with x an f16 cache row, bit for
 *   bit as if x were first converted to f32 (no copy made).
 * tn_attn_dot_block_f16: out[r] = tn_attn_dot(f32(k + r * k_stride), y, n)
 *   * scale for r < nk: a run of cache rows against one query.
 * tn_attn_lanes: the weights.V sum of one token in 64 lanes: for k < 64,
 *   acc[k][0..n) = the fused sum, in position order from 0, of w[p - p0] *
 *   rows[p][0..n) (f16 value rows) over its visible positions p0 <= p <=
 *   p1 with p % 64 == k; tn_attn_reduce folds the lanes into out[n]. */
void tn_attn_softmax(float *x, int64_t n, int64_t off);
float tn_attn_dot(const float *x, const float *y, int64_t n);
void tn_attn_dot_rows(const float *x, const float *y, int64_t y_stride,
                      int ny, float *const *out, int64_t n, float scale);
void tn_attn_dot_rows_f16(const uint16_t *x, const float *y, int64_t y_stride,
                          int ny, float *const *out, int64_t n, float scale);
void tn_attn_dot_block_f16(const uint16_t *k, int64_t k_stride, int nk,
                           const float *y, float *out, int64_t n, float scale);
/* tn_attn_dot_block_f16 on rows already converted to f32 (the same bits):
 * a run of tokens converts a block of keys once and dots it with each. */
void tn_attn_dot_block_f32(const float *k, int64_t k_stride, int nk,
                           const float *y, float *out, int64_t n, float scale);
void tn_attn_lanes(float *acc, const uint16_t *const *rows, const float *w,
                   int32_t p0, int32_t p1, int64_t n);
void tn_attn_reduce(const float *acc, float *out, int64_t n);
/* tn_attn_lanes into acc ([64][n] scratch) then tn_attn_reduce into out,
 * or the same bits without the lane buffer where a kernel has that. */
void tn_attn_values(float *out, float *acc, const uint16_t *const *rows,
                    const float *w, int32_t p0, int32_t p1, int64_t n);
/* tn_attn_values for a run of nq tokens of one sequence and head, token i
 * writing out + i * out_stride from weights w + i * w_stride over its
 * window [p0[i], p1[i]]: each token's result the same bits as alone.
 * Where a kernel has it, windows of 256 positions and more are summed up
 * to TN_ATTN_VALUES_GROUP tokens at once, each value row read and
 * converted once for all of them; acc holds TN_ATTN_VALUES_GROUP lane
 * buffers ([64][n] each). */
#define TN_ATTN_VALUES_GROUP 4
void tn_attn_values_run(float *out, int64_t out_stride, float *acc,
                        const uint16_t *const *rows, const float *w,
                        int64_t w_stride, const int32_t *p0,
                        const int32_t *p1, int nq, int64_t n);
/* x[i] = f32(f16(x[i])), round to nearest even. */
void tn_round_f16(float *x, int64_t n);

/* RoPE on one head vector x[head_dim] at position pos, rotating the first
 * n_rot dims. neox: pairs (i, i + n_rot/2); otherwise (2i, 2i+1). */
void tn_rope(float *x, int64_t n_rot, int64_t pos, float freq_base,
             float freq_scale, bool neox);
/* The same in two steps, for many heads at one position: cs[n_rot] gets
 * (cos, sin) of each pair's angle once, then tn_rope_apply rotates.
 * freq_factors (n_rot/2 divisors of each pair's angle, llama 3 style
 * long-context scaling) may be NULL. */
void tn_rope_cache(float *cs, int64_t n_rot, int64_t pos, float freq_base,
                   float freq_scale, const float *freq_factors);
void tn_rope_apply(float *x, const float *cs, int64_t n_rot, bool neox);

#endif /* TN_KERNELS_H */
