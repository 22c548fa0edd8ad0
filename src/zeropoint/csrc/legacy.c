/* ggml's legacy 32-value blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): quantize and dequantize, bytes
 * and floats identical to gguf-py's gguf.quants (numpy) and to the torch code in
 * zeropoint/gguf/blocks.py, which documents each formula and layout.
 *
 * Same float32 operations in the same order: every product and sum rounded on its own (no fma),
 * and min/max/argmax picked as numpy picks them. Min and max are exact in any order, so they
 * are taken as a tree the compiler vectorizes; only the sign of a zero depends on order, and
 * zero results are fixed up afterwards (the first zero of the block, as the C reference does).
 */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "parallel.h"
#include "weighted.h"
#include "zeropoint.h"
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QB ZP_QK_LEGACY /* values per block */
#define GROUP 16 /* blocks quantized together: 2 KiB, read from memory once, then from L1 */
/* Round half away from zero = truncate after adding nextafter(0.5, 0) with v's sign (0.5 itself
 * would carry 0.5 - 2^-25 up to 1); gguf-py's floor-based np_roundf agrees for |v| < 2^22. */
#define JUST_BELOW_HALF 0.49999997f

/* Built only where the compiler has IEEE half floats (common.h's ZP_NATIVE_HALF), which make
 * each fp16 conversion one instruction. Without them the entry points report -2 and zeropoint
 * uses its torch code. */
int zp_legacy_available(void) { return ZP_NATIVE_HALF; }

#if ZP_NATIVE_HALF

static int is_legacy(int type) {
  return type == ZP_Q8_0 || type == ZP_Q4_0 || type == ZP_Q4_1 || type == ZP_Q5_0 ||
         type == ZP_Q5_1;
}

/* lo and hi of 32 finite values. Exact in any order; explicit vectors where the CPU has them,
 * since gcc turns the narrowing steps of a plain halving tree into scalar code. */
static inline void block_min_max(const float *x, float *lo, float *hi) {
#if defined(__AVX512F__)
  __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  *lo = _mm512_reduce_min_ps(_mm512_min_ps(a, b));
  *hi = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
#elif defined(__AVX__)
  __m256 mn = _mm256_min_ps(_mm256_min_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                            _mm256_min_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
  __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                            _mm256_max_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
  __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
  __m128 x4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
  x4 = _mm_max_ps(x4, _mm_movehl_ps(x4, x4));
  *lo = _mm_cvtss_f32(_mm_min_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
  *hi = _mm_cvtss_f32(_mm_max_ss(x4, _mm_shuffle_ps(x4, x4, 1)));
#else
  float mn = x[0], mx = x[0];
  for (int j = 1; j < QB; j++) {
    mn = x[j] < mn ? x[j] : mn;
    mx = x[j] > mx ? x[j] : mx;
  }
  *lo = mn, *hi = mx;
#endif
}

/* The block's first zero (0.0 or -0.0): what a zero min or max is, sign included. */
static inline float first_zero(const float *x) {
  for (int j = 0; j < QB; j++)
    if (x[j] == 0) return x[j];
  return 0.f; /* not reached: called only when a zero is the min or max */
}

/* The first value of largest |x| (numpy's argmax of abs). Unique unless |lo| == |hi|. */
static inline float signed_absmax(const float *x, float lo, float hi) {
  float total = lo + hi; /* 0 exactly when |lo| == |hi| */
  if (total > 0) return hi;
  if (total < 0) return lo;
  for (int j = 0; j < QB; j++)
    if (fabsf(x[j]) == hi) return x[j];
  return x[0];
}

static inline float inverse(float d) { return d == 0 ? 0.f : 1.f / d; }

/* Byte vectors for the packing: written as plain loops, gcc moves bytes one at a time. */
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

static inline v16b narrow(const int32_t *c) { /* 16 codes -> their low bytes */
  v16i v;
  memcpy(&v, c, sizeof v);
  return __builtin_convertvector(v, v16b);
}

/* Element j in the low nibble of byte j, element j + 16 in the high nibble. */
static inline void pack_nibbles(const int32_t *c, uint8_t *out) {
  v16b packed = (narrow(c) & 0x0F) | (narrow(c + 16) << 4);
  memcpy(out, &packed, sizeof packed);
}

/* Bit 4 of element j -> bit j of a little-endian uint32. */
static inline void pack_high_bits(const int32_t *c, uint8_t *out) {
  uint32_t h = 0;
  for (int j = 0; j < QB; j++) h |= (uint32_t)((c[j] >> 4) & 1) << j;
  for (int k = 0; k < 4; k++) out[k] = (uint8_t)(h >> (8 * k));
}

/* Codes trunc((x - sub) * inv + add) clipped to 0..top (the value is > -1 here): the float32
 * steps of gguf-py's Q4_0/Q5_0 (sub = 0) and Q4_1/Q5_1 (add = 0.5). All 0 when 1/d overflowed
 * (|d| < 2^-128): x * inf is inf or NaN, which the torch code and gguf-py's x86 cast make 0. */
static inline void codes(const float *x, float sub, float inv, float add, int top, int32_t *c) {
  if (isinf(inv)) {
    memset(c, 0, QB * sizeof *c);
    return;
  }
  for (int j = 0; j < QB; j++) {
    float t = (x[j] - sub) * inv; /* x - 0 is exact, so one loop serves both families */
    int32_t q = (int32_t)(t + add);
    c[j] = q > top ? top : q;
  }
}

/* The codes of one Q8_0 block: round half away from zero of x * inv, as int8 bytes. */
static inline void q8_codes(const float *x, float inv, uint8_t *out) {
  int32_t c[QB];
  for (int j = 0; j < QB; j++) {
    float t = x[j] * inv;
    c[j] = (int32_t)(t + copysignf(JUST_BELOW_HALF, t));
  }
  v16b low = narrow(c), high = narrow(c + 16); /* int8 codes, two's complement bytes */
  memcpy(out, &low, sizeof low);
  memcpy(out + sizeof low, &high, sizeof high);
}

/* The fields and codes of one block once d (and m) are known: hd, hm are their fp16 bits, inv
 * is 1/d, and sub, add are the code arithmetic of `codes`. */
static inline void store_block(int type, const float *x, uint16_t hd, uint16_t hm, float inv,
                               float sub, float add, uint8_t *y) {
  memcpy(y, &hd, 2);
  if (type == ZP_Q8_0) {
    if (isinf(inv))
      memset(y + 2, 0, QB);
    else
      q8_codes(x, inv, y + 2);
    return;
  }
  int has_min = type == ZP_Q4_1 || type == ZP_Q5_1, five = type == ZP_Q5_0 || type == ZP_Q5_1;
  int col = 2, top = five ? 31 : 15;
  if (has_min) memcpy(y + 2, &hm, 2), col = 4;
  int32_t c[QB];
  codes(x, sub, inv, add, top, c);
  if (five) pack_high_bits(c, y + col), col += 4;
  pack_nibbles(c, y + col);
}

/* One block -> y, everything decided on its own: the path for a batch's tail and for finding
 * which block of a batch is refused. Returns 0, or 2 when d or m overflows fp16 (the caller
 * checked finiteness). */
static int quantize_block(int type, const float *x, uint8_t *y) {
  float lo, hi;
  block_min_max(x, &lo, &hi);
  if (type == ZP_Q8_0) {
    float amax = fabsf(-lo > hi ? lo : hi); /* fabsf: an all -0.0 block gives d = +0.0 */
    float d = amax / 127;
    uint16_t hd = half_bits(d);
    if (!half_finite(hd)) return 2;
    store_block(type, x, hd, 0, inverse(d), 0.f, 0.f, y);
    return 0;
  }
  int five = type == ZP_Q5_0 || type == ZP_Q5_1;
  if (type == ZP_Q4_1 || type == ZP_Q5_1) {
    if (lo == 0) lo = first_zero(x);
    if (hi == 0) hi = first_zero(x);
    float d = (hi - lo) / (float)(five ? 31 : 15);
    uint16_t hd = half_bits(d), hm = half_bits(lo);
    if (!half_finite(hd) || !half_finite(hm)) return 2;
    store_block(type, x, hd, hm, inverse(d), lo, 0.5f, y);
    return 0;
  }
  float offset = five ? 16.f : 8.f;
  float d = signed_absmax(x, lo, hi) / -offset;
  uint16_t hd = half_bits(d);
  if (!half_finite(hd)) return 2;
  store_block(type, x, hd, 0, inverse(d), 0.f, offset + 0.5f, y);
  return 0;
}

/* fp16 bits of GROUP floats, rounded to nearest even: one instruction with F16C or AVX-512
 * (gcc 12 does not vectorize the _Float16 casts of a plain loop). */
static inline void halves(const float *f, uint16_t *h) {
#if defined(__AVX512F__)
  __m256i v = _mm512_cvtps_ph(_mm512_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256((__m256i *)h, v);
#elif defined(__F16C__)
  for (int k = 0; k < GROUP; k += 8)
    _mm_storeu_si128((__m128i *)(h + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(f + k), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int k = 0; k < GROUP; k++) h[k] = half_bits(f[k]);
#endif
}

#if defined(__AVX512F__)
static inline __m512 min_or_max(__m512 a, __m512 b, int is_max) {
  return is_max ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
}

/* v[k] (16 vectors) -> one vector whose lane k is the min (or max) of v[k]'s 16 lanes. A tree
 * that halves the vectors and the lanes together: 15 steps of two shuffles and a min, against
 * 16 separate horizontal reductions of 8 dependent steps each. */
static inline __m512 transpose_reduce(const __m512 *v, int is_max) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++) /* 128-bit lanes 0-1: v[2i]'s 8 partials, 2-3: v[2i+1]'s */
    a[i] = min_or_max(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                      _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE), is_max);
  for (int i = 0; i < 4; i++) /* 128-bit lane j: v[4i + j]'s 4 partials */
    b[i] = min_or_max(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                      _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD), is_max);
  for (int i = 0; i < 2; i++) /* lane j: 2 partials of v[8i + j], then 2 of v[8i + 4 + j] */
    c[i] = min_or_max(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                      _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE), is_max);
  __m512 r = min_or_max(_mm512_shuffle_ps(c[0], c[1], 0x88),  /* element 4j + t: v[j + 4t] */
                        _mm512_shuffle_ps(c[0], c[1], 0xDD), is_max);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}
#endif

/* lo[k], hi[k] of the GROUP blocks at x; returns 1 if any value is NaN or inf (lo and hi are
 * then meaningless). The values are read once, for both. */
static inline int group_min_max(const float *x, float *lo, float *hi) {
#if defined(__AVX512F__)
  _Static_assert(GROUP == 16, "one block per lane of a 512-bit vector");
  __m512 mn[GROUP], mx[GROUP];
  __mmask16 nan = 0;
  for (int k = 0; k < GROUP; k++) {
    __m512 a = _mm512_loadu_ps(x + QB * k), b = _mm512_loadu_ps(x + QB * k + 16);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); /* lane i: a[i] or b[i] is NaN */
    mn[k] = _mm512_min_ps(a, b);
    mx[k] = _mm512_max_ps(a, b);
  }
  __m512 l = transpose_reduce(mn, 0), h = transpose_reduce(mx, 1);
  _mm512_storeu_ps(lo, l);
  _mm512_storeu_ps(hi, h);
  /* Without NaN the min and max are exact, so an inf is one of them. */
  __mmask16 inf = _mm512_cmp_ps_mask(l, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ) |
                  _mm512_cmp_ps_mask(h, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
  return (nan | inf) != 0;
#else
  if (non_finite(x, QB * GROUP)) return 1;
  for (int k = 0; k < GROUP; k++) block_min_max(x + QB * k, lo + k, hi + k);
  return 0;
#endif
}

/* GROUP blocks at once, in three steps: each block's min and max; then d, m, 1/d and their fp16
 * bits for all of them in loops across blocks, which the compiler vectorizes (one vector
 * division and one conversion for 16 blocks, instead of a chain of scalar ones per block that
 * the next block waits behind); then the codes, from L1: memory is read once. Returns 0, or 1
 * when a block is non-finite or overflows fp16: the caller then redoes the group block by
 * block to say which and why. */
static int quantize_group(int type, const float *x, uint8_t *y) {
  float lo[GROUP], hi[GROUP], d[GROUP], m[GROUP], inv[GROUP];
  uint16_t hd[GROUP], hm[GROUP] = {0};
  if (group_min_max(x, lo, hi)) return 1;
  int five = type == ZP_Q5_0 || type == ZP_Q5_1, has_min = type == ZP_Q4_1 || type == ZP_Q5_1;
  float offset = five ? 16.f : 8.f, add = 0.f;
  if (type == ZP_Q8_0) {
    for (int k = 0; k < GROUP; k++) {
      float amax = -lo[k] > hi[k] ? -lo[k] : hi[k]; /* max |x|, exactly */
      d[k] = fabsf(amax) / 127;
    }
  } else if (has_min) {
    for (int k = 0; k < GROUP; k++) { /* rare: a zero extreme takes the first zero's sign */
      if (lo[k] == 0) lo[k] = first_zero(x + QB * k);
      if (hi[k] == 0) hi[k] = first_zero(x + QB * k);
    }
    for (int k = 0; k < GROUP; k++) d[k] = (hi[k] - lo[k]) / (float)(five ? 31 : 15);
    add = 0.5f;
  } else {
    uint32_t tie = 0;
    for (int k = 0; k < GROUP; k++) {
      float total = lo[k] + hi[k]; /* its sign says which of lo, hi has the larger |x| */
      m[k] = total < 0 ? lo[k] : hi[k];
      tie |= (uint32_t)(total == 0) << k;
    }
    for (int k = 0; k < GROUP; k++) /* rare: +a and -a both, or all zeros: the first wins */
      if (tie >> k & 1) m[k] = signed_absmax(x + QB * k, lo[k], hi[k]);
    for (int k = 0; k < GROUP; k++) d[k] = m[k] / -offset;
    add = offset + 0.5f;
  }
  for (int k = 0; k < GROUP; k++) inv[k] = d[k] == 0 ? 0.f : 1.f / d[k];
  halves(d, hd);
  if (has_min) halves(lo, hm);
  uint16_t bad = 0;
  for (int k = 0; k < GROUP; k++)
    bad |= (uint16_t)(!half_finite(hd[k]) | (has_min && !half_finite(hm[k])));
  if (bad) return 1;
  const int64_t size = zp_type_bytes(type);
  for (int k = 0; k < GROUP; k++)
    store_block(type, x + QB * k, hd[k], hm[k], inv[k], has_min ? lo[k] : 0.f, add,
                y + size * k);
  return 0;
}

/* Blocks one at a time (tails, and groups that hold a refused block); same returns as below. */
static int64_t quantize_blocks_singly(int type, const float *x, int64_t n_blocks, uint8_t *y,
                                      int *why) {
  for (int64_t b = 0; b < n_blocks; b++) {
    const float *xb = x + QB * b;
    if (non_finite(xb, QB)) return *why = 1, b;
    if (quantize_block(type, xb, y + zp_type_bytes(type) * b)) return *why = 2, b;
  }
  return -1;
}

static int64_t quantize_serial(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why) {
  int64_t b = 0, size = zp_type_bytes(type);
  for (; b + GROUP <= n_blocks; b += GROUP) {
    if (!quantize_group(type, x + QB * b, y + size * b)) continue;
    int64_t i = quantize_blocks_singly(type, x + QB * b, GROUP, y + size * b, why);
    if (i >= 0) return b + i;
  }
  int64_t i = quantize_blocks_singly(type, x + QB * b, n_blocks - b, y + size * b, why);
  return i < 0 ? -1 : b + i;
}

#define GRAIN_BLOCKS 32768 /* 4 MiB of float32 input per range; a multiple of GROUP */

/* x: n_blocks x 32 floats -> y: n_blocks x type_size bytes, on up to `threads` threads.
 * Returns -1 when all went well, -2 for a type it does not know, else the first block that
 * cannot be stored, with *why = 1 if it holds NaN or inf and 2 if its d or m overflows fp16
 * (other blocks may be left unwritten). */
int64_t zp_quantize_legacy(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why,
                           int threads) {
  if (!is_legacy(type)) return -2;
  return zp_parallel_blocks(threads, GRAIN_BLOCKS, quantize_serial, type, x, QB, y,
                            zp_type_bytes(type), n_blocks, why);
}

/* One block's bytes -> its 32 floats, gguf-py's x = d * (q - offset) (+ m, a separate add).
 * Straight loops over bytes that the compiler vectorizes (a loop per step through an int32
 * array of codes took 0.4 ns per value). */
static inline void dequantize_block(int type, const uint8_t *restrict yb, float *restrict xb) {
  int has_min = type == ZP_Q4_1 || type == ZP_Q5_1, five = type == ZP_Q5_0 || type == ZP_Q5_1;
  int col = has_min ? 4 : 2, offset = has_min ? 0 : (five ? 16 : 8);
  float d = get_half(yb), m = has_min ? get_half(yb + 2) : 0.f;
  if (type == ZP_Q8_0) {
    const int8_t *q = (const int8_t *)(yb + 2);
    for (int j = 0; j < QB; j++) xb[j] = d * (float)q[j];
    return;
  }
  const uint8_t *nibbles = yb + col + (five ? 4 : 0);
  uint32_t h = 0; /* bit j: bit 4 of element j (the 5-bit types) */
  if (five) h = yb[col] | (uint32_t)yb[col + 1] << 8 | (uint32_t)yb[col + 2] << 16 |
                (uint32_t)yb[col + 3] << 24;
  /* Byte j: element j low, element j + 16 high. One loop per half: each is one 16-lane
   * vector, where one loop storing both halves was not. */
  for (int j = 0; j < QB / 2; j++)
    xb[j] = d * (float)((int)((nibbles[j] & 0x0F) | ((h >> j) & 1) << 4) - offset);
  for (int j = 0; j < QB / 2; j++)
    xb[j + QB / 2] = d * (float)((int)((nibbles[j] >> 4) | ((h >> (j + 16)) & 1) << 4) - offset);
  if (has_min)
    for (int j = 0; j < QB; j++) xb[j] = xb[j] + m;
}

typedef struct {
  int type;
  const uint8_t *y;
  float *x;
} dequantize_job;

static void dequantize_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const dequantize_job *j = ctx;
  const int64_t size = zp_type_bytes(j->type);
  for (int64_t b = begin; b < end; b++) dequantize_block(j->type, j->y + size * b, j->x + QB * b);
}

/* y: n_blocks x type_size bytes -> x: n_blocks x 32 floats, on up to `threads` threads.
 * Returns 0, or -2 for a type it does not know. */
int zp_dequantize_legacy(int type, const uint8_t *y, int64_t n_blocks, float *x, int threads) {
  if (!is_legacy(type)) return -2;
  dequantize_job j = {type, y, x};
  zp_parallel(threads, n_blocks, GRAIN_BLOCKS, dequantize_range, &j);
  return 0;
}

/* src: n_blocks of type src_type -> y: the same values in dst_type, with the bytes that
 * dequantizing to float32 and quantizing would give; the floats only ever sit in an L1 buffer
 * of GROUP blocks. Returns as zp_quantize_legacy. */
int64_t zp_requantize_legacy(int src_type, const uint8_t *src, int dst_type, int64_t n_blocks,
                             uint8_t *y, int *why) {
  if (!is_legacy(src_type) || !is_legacy(dst_type)) return -2;
  float x[QB * GROUP];
  int64_t in = zp_type_bytes(src_type), out = zp_type_bytes(dst_type);
  for (int64_t b = 0; b < n_blocks; b += GROUP) {
    int n = n_blocks - b < GROUP ? (int)(n_blocks - b) : GROUP;
    for (int k = 0; k < n; k++) dequantize_block(src_type, src + in * (b + k), x + QB * k);
    if (n == GROUP && !quantize_group(dst_type, x, y + out * b)) continue;
    int64_t i = quantize_blocks_singly(dst_type, x, n, y + out * b, why);
    if (i >= 0) return b + i;
  }
  return -1;
}

/* ---- weighted (llama-quantize --imatrix): quantize_q4_0 .. quantize_q5_1 given importance ----
 * Each block's scale is searched under weights importance * sqrt(sigma2 + x^2), sigma2 the mean
 * x^2 of the whole row: the _0 types by weighted_signed_search, the _1 types by
 * weighted_min_search (weighted.h).
 * Q8_0 ignores the importance, as ggml's quantize_q8_0 does. */

/* One row -> its blocks; returns -1, or the first block of the row it cannot store (*why 1:
 * NaN or inf, 2: d or m overflows fp16). */
static int64_t weighted_row(int type, const float *x, int64_t n_per_row, const float *qw,
                            uint8_t *y, int *why) {
  const int64_t nb = n_per_row / QB, size = zp_type_bytes(type);
  for (int64_t b = 0; b < nb; b++)
    if (non_finite(x + QB * b, QB)) return *why = 1, b;
  float sum_x2 = 0;
  for (int64_t j = 0; j < n_per_row; j++) sum_x2 += x[j] * x[j];
  const float sigma2 = sum_x2 / (float)n_per_row;
  const int has_min = type == ZP_Q4_1 || type == ZP_Q5_1, five = type == ZP_Q5_0 || type == ZP_Q5_1;
  for (int64_t b = 0; b < nb; b++) {
    const float *xb = x + QB * b, *wb = qw + QB * b;
    uint8_t *yb = y + size * b;
    float w[QB], scale, neg_min = 0;
    int32_t c[QB];
    for (int j = 0; j < QB; j++) w[j] = wb[j] * sqrtf(sigma2 + xb[j] * xb[j]);
    if (has_min) {
      uint8_t L[QB];
      scale = weighted_min_search(QB, five ? 31 : 15, xb, w, L, &neg_min);
      for (int j = 0; j < QB; j++) c[j] = L[j];
    } else {
      int8_t L[QB];
      scale = weighted_signed_search(QB, five ? 16 : 8, xb, w, L);
      for (int j = 0; j < QB; j++) c[j] = L[j];
    }
    uint16_t hd = half_bits(scale), hm = half_bits(-neg_min);
    if (!half_finite(hd) || (has_min && !half_finite(hm))) return *why = 2, b;
    int col = 2;
    memcpy(yb, &hd, 2);
    if (has_min) memcpy(yb + 2, &hm, 2), col = 4;
    if (five) pack_high_bits(c, yb + col), col += 4;
    pack_nibbles(c, yb + col);
  }
  return -1;
}

static int64_t weighted_rows(void *ctx, int64_t begin, int64_t end, int *why) {
  const weighted_job *j = ctx;
  const int64_t nb = j->n_per_row / QB, size = zp_type_bytes(j->type);
  for (int64_t r = begin; r < end; r++) {
    int64_t b = weighted_row(j->type, j->x + j->n_per_row * r, j->n_per_row, j->importance,
                             j->y + size * nb * r, why);
    if (b >= 0) return nb * r + b;
  }
  return -1;
}

int64_t zp_quantize_legacy_weighted(int type, const float *x, int64_t n_rows, int64_t n_per_row,
                                    const float *importance, uint8_t *y, int *why, int threads) {
  if (!is_legacy(type) || n_per_row % QB) return -2;
  if (type == ZP_Q8_0) return zp_quantize_legacy(type, x, n_rows * (n_per_row / QB), y, why,
                                                 threads);
  weighted_job j = {type, x, importance, n_per_row, y};
  /* rows per range: the searches cost ~8x a plain block */
  int64_t grain = 1 + (GRAIN_BLOCKS * QB) / (8 * n_per_row);
  return zp_parallel_spans(threads, n_rows, grain, weighted_rows, &j, why);
}

#else /* no half floats: the torch code does the work */

int64_t zp_quantize_legacy(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why,
                           int threads) {
  (void)type, (void)x, (void)n_blocks, (void)y, (void)why, (void)threads;
  return -2;
}
int zp_dequantize_legacy(int type, const uint8_t *y, int64_t n_blocks, float *x, int threads) {
  (void)type, (void)y, (void)n_blocks, (void)x, (void)threads;
  return -2;
}
int64_t zp_requantize_legacy(int src_type, const uint8_t *src, int dst_type, int64_t n_blocks,
                             uint8_t *y, int *why) {
  (void)src_type, (void)src, (void)dst_type, (void)n_blocks, (void)y, (void)why;
  return -2;
}
int64_t zp_quantize_legacy_weighted(int type, const float *x, int64_t n_rows, int64_t n_per_row,
                                    const float *importance, uint8_t *y, int *why, int threads) {
  (void)type, (void)x, (void)n_rows, (void)n_per_row, (void)importance, (void)y, (void)why;
  (void)threads;
  return -2;
}

#endif
