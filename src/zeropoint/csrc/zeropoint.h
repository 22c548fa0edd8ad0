/* Everything the kernels library exports: one prototype per function, nothing else is visible
 * (ckernels.py builds with -fvisibility=hidden). zeropoint/ckernels.py binds exactly these
 * functions with the same signatures; tests/test_ckernels.py reads this file and holds the two
 * together. Every .c file includes it, so a definition that drifts from its prototype does not
 * compile. */
#ifndef ZEROPOINT_H
#define ZEROPOINT_H
#include <stdint.h>

#define ZP_API __attribute__((visibility("default")))

/* ---- ggml block types ----
 * The block kernels take a type as ggml's own number (enum ggml_type), the number
 * zeropoint/gguf/types.py holds as GGMLType.id. Each type they know: its name, that number,
 * values per block and bytes per block; tests/gguf/test_types.py compares the lines with
 * types.py. */
#define ZP_QK_LEGACY 32
#define ZP_QK_K 256
#define ZP_BLOCK_TYPES(X)               \
  X(Q8_0, 8, ZP_QK_LEGACY, 34)          \
  X(Q4_0, 2, ZP_QK_LEGACY, 18)          \
  X(Q4_1, 3, ZP_QK_LEGACY, 20)          \
  X(Q5_0, 6, ZP_QK_LEGACY, 22)          \
  X(Q5_1, 7, ZP_QK_LEGACY, 24)          \
  X(Q2_K, 10, ZP_QK_K, 84)              \
  X(Q3_K, 11, ZP_QK_K, 110)             \
  X(Q4_K, 12, ZP_QK_K, 144)             \
  X(Q5_K, 13, ZP_QK_K, 176)             \
  X(Q6_K, 14, ZP_QK_K, 210)             \
  X(IQ2_XXS, 16, ZP_QK_K, 66)           \
  X(IQ2_XS, 17, ZP_QK_K, 74)            \
  X(IQ2_S, 22, ZP_QK_K, 82)             \
  X(IQ3_XXS, 18, ZP_QK_K, 98)           \
  X(IQ3_S, 21, ZP_QK_K, 110)            \
  X(IQ1_S, 19, ZP_QK_K, 50)             \
  X(IQ1_M, 29, ZP_QK_K, 56)             \
  X(IQ4_NL, 20, ZP_QK_LEGACY, 18)       \
  X(IQ4_XS, 23, ZP_QK_K, 136)

/* ZP_Q4_0 (the type number), ZP_Q4_0_VALUES and ZP_Q4_0_BYTES for each type above. */
#define ZP_TYPE_CONSTANTS(name, id, values, bytes) \
  ZP_##name = id, ZP_##name##_VALUES = values, ZP_##name##_BYTES = bytes,
enum { ZP_BLOCK_TYPES(ZP_TYPE_CONSTANTS) };
#undef ZP_TYPE_CONSTANTS

/* ---- parallel.c ---- */

/* 1 when built with OpenMP: ckernels.py reports which parallel path the library took. */
ZP_API int zp_openmp(void);

/* ---- affine.c: float32 quantize, dequantize and block min/max over a (P, C, Q) view ---- */

ZP_API int zp_quantize_f32(const float *x, uint8_t *out, int64_t P, int64_t C, int64_t Q,
                           const float *scale, const float *zero_point, float qmin, float qmax,
                           int threads);
ZP_API void zp_dequantize_f32(const uint8_t *codes, int is_signed, float *out, int64_t P,
                              int64_t C, int64_t Q, const float *scale, const float *zero_point,
                              int threads);
ZP_API int zp_minmax_f32(const float *x, int64_t P, int64_t C, int64_t Q, float *lo, float *hi,
                         int threads);
/* fit.c: each of `blocks` runs of n floats (n <= 256) gets the least-squares scale and float
 * zero-point of calibrate/fit.py where its round trip beats the given (min/max) ones, which
 * scale[] and zero[] hold on entry. half: scales and minima stored as float16. 0, or -1 bad
 * sizes. */
ZP_API int zp_fit_float_min(const float *x, int64_t blocks, int64_t n, int qmin, int qmax,
                            const float *steps, int nsteps, int half, float *scale, float *zero,
                            int threads);

/* ---- pack.c: sub-byte codes to bytes and back ---- */

ZP_API void zp_pack(const uint8_t *codes, int64_t n, int bits, uint8_t *out);
ZP_API void zp_unpack(const uint8_t *data, int64_t n, int bits, uint8_t *codes);

/* ---- kquants.c: ggml's K-quant super-blocks ---- */

ZP_API int64_t zp_quantize_kquant(int type, const float *x, int64_t n_super, uint8_t *y, int *why,
                                  int threads);
/* llama-quantize --imatrix: n_rows rows of n_per_row values, importance[n_per_row] per column. */
ZP_API int64_t zp_quantize_kquant_weighted(int type, const float *x, int64_t n_rows,
                                           int64_t n_per_row, const float *importance, uint8_t *y,
                                           int *why, int threads);

/* ---- kdequant.c: K-quant super-blocks back to float32 ---- */

ZP_API int zp_dequantize_kquant(int type, const uint8_t *y, int64_t n_super, float *x, int threads);

/* ---- legacy.c: ggml's legacy 32-value blocks ---- */

ZP_API int zp_legacy_available(void);
ZP_API int64_t zp_quantize_legacy(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why,
                                  int threads);
ZP_API int zp_dequantize_legacy(int type, const uint8_t *y, int64_t n_blocks, float *x,
                                int threads);
ZP_API int64_t zp_requantize_legacy(int src_type, const uint8_t *src, int dst_type,
                                    int64_t n_blocks, uint8_t *y, int *why);
/* llama-quantize --imatrix: n_rows rows of n_per_row values, importance[n_per_row] per column
 * (Q8_0 ignores it, as ggml does). */
ZP_API int64_t zp_quantize_legacy_weighted(int type, const float *x, int64_t n_rows,
                                           int64_t n_per_row, const float *importance, uint8_t *y,
                                           int *why, int threads);

/* ---- iquants.c: ggml's i-quants (IQ1_S .. IQ4_XS) ---- */

/* The codebook of a type, once before its first use: for the lattice types n_points points of
 * 8 (IQ2, IQ1) or 4 (IQ3) level numbers, and the value of each level; for IQ4_NL / IQ4_XS the
 * 16 levels alone (n_points 0). 0, or -1 bad table, -2 not an i-quant, -3 out of memory. */
ZP_API int zp_iq_set_grid(int type, const uint8_t *levels, int n_points, const int8_t *level_values,
                          int n_levels);
/* 1 for the types llama.cpp will not quantize without an importance matrix. */
ZP_API int zp_iq_needs_importance(int type);
/* rows x n_per_row floats into rows of blocks; importance: n_per_row weights or NULL. 0, or -1
 * bad sizes, -2 not an i-quant, -3 no codebook set, -4 importance required. */
ZP_API int zp_quantize_iquant(int type, const float *x, int64_t rows, int64_t n_per_row,
                              const float *importance, uint8_t *y, int threads);
ZP_API int zp_dequantize_iquant(int type, const uint8_t *y, int64_t n_blocks, float *x,
                                int threads);

/* ---- gguf_scan.c: GGUF header walking ---- */

ZP_API int64_t zp_skip_strings(const uint8_t *buf, int64_t size, int64_t pos, int64_t count);

/* ---- gemv.c: batch-1 matrix-vector products from packed codes ---- */

/* path: 0 the widest SIMD compiled in, 1 portable C, 2 AVX2, 3 AVX-512 (zp_gemv_has_path). */
ZP_API int zp_gemv_has_path(int path);
ZP_API void zp_gemv_q8(const float *x, const int8_t *q, const float *scale, float *y, int64_t in,
                       int64_t rows, int threads, int path);
/* half: bit 1 set, scale holds float16 values, bit 2 zp does (else float32). */
ZP_API void zp_gemv_q4(const float *x, const uint8_t *packed, const void *scale,
                       const void *zp, float *y, int64_t in, int64_t gs, int64_t rows,
                       int threads, int path, int half);

/* ---- token_ops.c: the compact runtime's per-token steps of a decoder layer ---- */

ZP_API void zp_add_rmsnorm(float *h, const float *delta, const float *w, float eps, int64_t n,
                           float *x);
ZP_API void zp_silu_mul(float *g, const float *u, int64_t n);
ZP_API void zp_decoder_attend(float *qkv, float *k_cache, float *v_cache, int64_t pos,
                              int64_t n_heads, int64_t n_kv, int64_t d, int64_t rot,
                              const float *cos, const float *sin_signed, const float *q_norm,
                              const float *k_norm, float eps, float scale, float softcap,
                              int64_t window, float *scores, float *out);
ZP_API void zp_gelu_tanh_mul(float *g, const float *u, int64_t n);

#endif
