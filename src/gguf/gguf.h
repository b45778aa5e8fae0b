/*
 * gguf.h: read and write GGUF files (versions 2 and 3).
 *
 * The reader maps the file read-only and treats every byte as hostile: each
 * count, length, offset and product is checked against the bytes that remain
 * and SIZE_MAX before anything is allocated, and each rejection fills a
 * struct tn_error naming the field and the value. Strings and tensor data
 * are views into the mapping, borrowed until tn_gguf_close().
 *
 * Error messages never contain the file's path (the server hands them to
 * clients; callers that want it prefix it themselves) and print names from
 * the file with non-printable bytes escaped as \xNN.
 *
 * Besides the checks in the format itself, the reader rejects: keys and
 * tensor names that are empty or longer than TN_GGUF_MAX_NAME, duplicate
 * keys or tensor names, nested arrays, bools other than 0/1, tensor types
 * that are not ggml type ids below TN_TYPE_COUNT (whether or not we have
 * kernels for them), and tensors that do not lie inside the data section.
 * A mapped file that is truncated on disk while open can still raise
 * SIGBUS; that is the price of mmap.
 */
#ifndef TN_GGUF_H
#define TN_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "kernels/kernels.h"

#define TN_GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define TN_GGUF_DEFAULT_ALIGNMENT 32
#define TN_GGUF_MAX_DIMS 4
#define TN_GGUF_MAX_NAME 256 /* tensor names and keys: bytes, excl. NUL */
#define TN_GGUF_MAX_ALIGNMENT (1u << 20) /* largest general.alignment read */

enum tn_gguf_type {
  TN_GGUF_TYPE_UINT8 = 0,
  TN_GGUF_TYPE_INT8 = 1,
  TN_GGUF_TYPE_UINT16 = 2,
  TN_GGUF_TYPE_INT16 = 3,
  TN_GGUF_TYPE_UINT32 = 4,
  TN_GGUF_TYPE_INT32 = 5,
  TN_GGUF_TYPE_FLOAT32 = 6,
  TN_GGUF_TYPE_BOOL = 7,
  TN_GGUF_TYPE_STRING = 8,
  TN_GGUF_TYPE_ARRAY = 9,
  TN_GGUF_TYPE_UINT64 = 10,
  TN_GGUF_TYPE_INT64 = 11,
  TN_GGUF_TYPE_FLOAT64 = 12,
  TN_GGUF_TYPE_COUNT
};

const char *tn_gguf_type_name(enum tn_gguf_type t);

/* A string view: not NUL-terminated, may contain NUL bytes. */
struct tn_str {
  const char *data;
  size_t len;
};

bool tn_str_eq(struct tn_str s, const char *cstr);

struct tn_gguf_kv {
  struct tn_str key;
  enum tn_gguf_type type;
  /* Scalars (type != ARRAY): the value, widened. */
  union {
    uint64_t u64; /* UINT8..UINT64, BOOL */
    int64_t i64;  /* INT8..INT64 */
    double f64;   /* FLOAT32, FLOAT64 */
    struct tn_str str;
  } val;
  /* Arrays (type == ARRAY): element type, count, and the raw
   * little-endian elements in the mapping (for non-string types), or one
   * view per element for string arrays (strs, owned by the tn_gguf). */
  enum tn_gguf_type arr_type;
  uint64_t arr_n;
  const void *arr_data;
  struct tn_str *arr_strs;
};

struct tn_gguf_tensor {
  struct tn_str name;
  uint32_t n_dims;
  int64_t ne[TN_GGUF_MAX_DIMS]; /* unused dims are 1 */
  enum tn_type type;
  uint64_t offset; /* relative to the data section */
  size_t size;     /* bytes */
  const void *data; /* into the mapping */
};

struct tn_gguf {
  uint32_t version;
  uint64_t n_kv;
  struct tn_gguf_kv *kv;
  uint64_t n_tensors;
  struct tn_gguf_tensor *tensors;
  size_t alignment;
  size_t data_offset; /* file offset of the data section */
  const uint8_t *base; /* the whole file */
  size_t size;
  /* private */
  bool mapped;
  void *owned; /* heap copy for tn_gguf_open_mem(..., copy=true) */
  /* kv and tensors sorted by key / name, for binary search */
  const struct tn_gguf_kv **kv_sorted;
  const struct tn_gguf_tensor **tensors_sorted;
};

/* Opens and validates path (mapped read-only, MAP_PRIVATE). On failure *out
 * is NULL and err says why. Caller frees with tn_gguf_close(). */
enum tn_status tn_gguf_open(const char *path, struct tn_gguf **out,
                            struct tn_error *err);
/* Parses a buffer in memory (borrowed: it must outlive the result). */
enum tn_status tn_gguf_open_mem(const void *buf, size_t size,
                                struct tn_gguf **out, struct tn_error *err);
void tn_gguf_close(struct tn_gguf *g);

/* Lookups. NULL / -1 when absent. */
const struct tn_gguf_kv *tn_gguf_find_kv(const struct tn_gguf *g,
                                         const char *key);
const struct tn_gguf_tensor *tn_gguf_find_tensor(const struct tn_gguf *g,
                                                 const char *name);

/* Typed getters. TN_ENOENT when absent (err untouched, so callers can use
 * defaults), TN_EFORMAT naming the key when present with a type that does
 * not convert (integers convert among themselves when the value fits;
 * floats accept integer values). */
enum tn_status tn_gguf_get_u32(const struct tn_gguf *g, const char *key,
                               uint32_t *out, struct tn_error *err);
enum tn_status tn_gguf_get_i64(const struct tn_gguf *g, const char *key,
                               int64_t *out, struct tn_error *err);
enum tn_status tn_gguf_get_f32(const struct tn_gguf *g, const char *key,
                               float *out, struct tn_error *err);
enum tn_status tn_gguf_get_bool(const struct tn_gguf *g, const char *key,
                                bool *out, struct tn_error *err);
enum tn_status tn_gguf_get_str(const struct tn_gguf *g, const char *key,
                               struct tn_str *out, struct tn_error *err);
/* Array element accessors for arrays of numbers and bools. An index at or
 * past arr_n, a kv that is not such an array, gives 0. arr_i64 truncates
 * floats toward zero (saturating, NaN gives 0); UINT64 values above
 * INT64_MAX come back wrapped. */
int64_t tn_gguf_arr_i64(const struct tn_gguf_kv *kv, uint64_t i);
double tn_gguf_arr_f64(const struct tn_gguf_kv *kv, uint64_t i);

/* ---- writer
 *
 * Collects key/values and tensors in memory order, then writes a v3 file.
 * Data pointers passed to add_tensor are borrowed until tn_gguf_writer_write.
 */
struct tn_gguf_writer;

struct tn_gguf_writer *tn_gguf_writer_new(void);
void tn_gguf_writer_free(struct tn_gguf_writer *w);
/* Sets the data alignment (default 32) and adds or updates the
 * general.alignment key/value. A value that is 0, not a power of two or
 * above TN_GGUF_MAX_ALIGNMENT makes tn_gguf_writer_write* fail. */
void tn_gguf_writer_set_alignment(struct tn_gguf_writer *w, size_t alignment);
/* The add functions return TN_EINVAL for a key that is empty, longer than
 * TN_GGUF_MAX_NAME or already added, and for general.alignment with a type
 * other than UINT32 (add_u32 of general.alignment also sets the alignment);
 * TN_ENOMEM when out of memory. They copy what they are given. */
enum tn_status tn_gguf_writer_add_u8(struct tn_gguf_writer *w, const char *key, uint8_t v);
enum tn_status tn_gguf_writer_add_i8(struct tn_gguf_writer *w, const char *key, int8_t v);
enum tn_status tn_gguf_writer_add_u16(struct tn_gguf_writer *w, const char *key, uint16_t v);
enum tn_status tn_gguf_writer_add_i16(struct tn_gguf_writer *w, const char *key, int16_t v);
enum tn_status tn_gguf_writer_add_i64(struct tn_gguf_writer *w, const char *key, int64_t v);
enum tn_status tn_gguf_writer_add_f64(struct tn_gguf_writer *w, const char *key, double v);
enum tn_status tn_gguf_writer_add_u32(struct tn_gguf_writer *w, const char *key, uint32_t v);
enum tn_status tn_gguf_writer_add_i32(struct tn_gguf_writer *w, const char *key, int32_t v);
enum tn_status tn_gguf_writer_add_u64(struct tn_gguf_writer *w, const char *key, uint64_t v);
enum tn_status tn_gguf_writer_add_f32(struct tn_gguf_writer *w, const char *key, float v);
enum tn_status tn_gguf_writer_add_bool(struct tn_gguf_writer *w, const char *key, bool v);
enum tn_status tn_gguf_writer_add_str(struct tn_gguf_writer *w, const char *key,
                                      const char *data, size_t len);
/* An array of fixed-size elements (any type but STRING/ARRAY). */
enum tn_status tn_gguf_writer_add_arr(struct tn_gguf_writer *w, const char *key,
                                      enum tn_gguf_type type, const void *data,
                                      uint64_t n);
enum tn_status tn_gguf_writer_add_arr_str(struct tn_gguf_writer *w, const char *key,
                                          const struct tn_str *strs, uint64_t n);
/* Copies every key/value of g (e.g. to re-quantize a model). */
enum tn_status tn_gguf_writer_copy_kv(struct tn_gguf_writer *w,
                                      const struct tn_gguf *g);
enum tn_status tn_gguf_writer_add_tensor(struct tn_gguf_writer *w, const char *name,
                                         enum tn_type type, uint32_t n_dims,
                                         const int64_t *ne, const void *data,
                                         struct tn_error *err);
/* Writes path + ".tmp" and renames it over path when complete. */
enum tn_status tn_gguf_writer_write(struct tn_gguf_writer *w, const char *path,
                                    struct tn_error *err);
/* The same file into a malloc'd buffer (caller frees with free()). */
enum tn_status tn_gguf_writer_write_mem(struct tn_gguf_writer *w, void **out,
                                        size_t *size, struct tn_error *err);

#endif /* TN_GGUF_H */
