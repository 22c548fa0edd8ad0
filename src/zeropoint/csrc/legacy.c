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
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define QB 32
#define RUN 64 /* blocks checked for inf/NaN at once: 8 KiB, still in L1 when quantized */
enum { Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, N_TYPES };
static const int type_size[N_TYPES] = {34, 18, 20, 22, 24};
/* Round half away from zero = truncate after adding nextafter(0.5, 0) with v's sign (0.5 itself
 * would carry 0.5 - 2^-25 up to 1); gguf-py's floor-based np_roundf agrees for |v| < 2^22. */
#define JUST_BELOW_HALF 0.49999997f

/* 1 if the compiler has IEEE half floats (gcc >= 12, clang on x86-64 and arm64): the conversion
 * is then one instruction and rounds to nearest even, as numpy's astype(float16). Without it the
 * entry points report -2 and zeropoint uses its torch code. */
#if defined(__FLT16_MANT_DIG__)
#define HAVE_HALF 1
static inline uint16_t half_bits(float f) {
  _Float16 h = (_Float16)f;
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}
static inline float half_value(const uint8_t *p) {
  _Float16 h;
  memcpy(&h, p, 2);
  return (float)h;
}
static inline int half_finite(uint16_t b) { return (b & 0x7c00u) != 0x7c00u; }
#else
#define HAVE_HALF 0
#endif

int zp_legacy_available(void) { return HAVE_HALF; }

#if HAVE_HALF

/* 1 if any of n values is inf or NaN (exponent all ones). Integer ops over a long run, so the
 * loop vectorizes with one horizontal reduction at the end, not one per block. */
static int non_finite(const float *x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; j++) {
    uint32_t bits;
    memcpy(&bits, x + j, 4);
    bad |= (bits & 0x7f800000u) == 0x7f800000u;
  }
  return (int)bad;
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

/* One block -> y. Returns 0, or 2 when d or m overflows fp16 (the caller checked finiteness). */
static int quantize_block(int type, const float *x, uint8_t *y) {
  float lo, hi;
  block_min_max(x, &lo, &hi);
  if (type == Q8_0) {
    float amax = fabsf(-lo > hi ? lo : hi); /* fabsf: an all -0.0 block gives d = +0.0 */
    float d = amax / 127, inv = inverse(d);
    uint16_t hd = half_bits(d);
    if (!half_finite(hd)) return 2;
    memcpy(y, &hd, 2);
    if (isinf(inv)) {
      memset(y + 2, 0, QB);
      return 0;
    }
    int32_t c[QB];
    for (int j = 0; j < QB; j++) {
      float t = x[j] * inv;
      c[j] = (int32_t)(t + copysignf(JUST_BELOW_HALF, t));
    }
    v16b low = narrow(c), high = narrow(c + 16); /* int8 codes, two's complement bytes */
    memcpy(y + 2, &low, sizeof low);
    memcpy(y + 2 + sizeof low, &high, sizeof high);
    return 0;
  }
  int bits = (type == Q5_0 || type == Q5_1) ? 5 : 4, top = (1 << bits) - 1, col;
  int32_t c[QB];
  if (type == Q4_1 || type == Q5_1) {
    if (lo == 0) lo = first_zero(x);
    if (hi == 0) hi = first_zero(x);
    float d = (hi - lo) / (float)top;
    uint16_t hd = half_bits(d), hm = half_bits(lo);
    if (!half_finite(hd) || !half_finite(hm)) return 2;
    memcpy(y, &hd, 2);
    memcpy(y + 2, &hm, 2);
    codes(x, lo, inverse(d), 0.5f, top, c);
    col = 4;
  } else {
    float offset = (float)(1 << (bits - 1)); /* 8 or 16 */
    float d = signed_absmax(x, lo, hi) / -offset;
    uint16_t hd = half_bits(d);
    if (!half_finite(hd)) return 2;
    memcpy(y, &hd, 2);
    codes(x, 0.f, inverse(d), offset + 0.5f, top, c);
    col = 2;
  }
  if (bits == 5) {
    pack_high_bits(c, y + col);
    col += 4;
  }
  pack_nibbles(c, y + col);
  return 0;
}

/* x: n_blocks x 32 floats -> y: n_blocks x type_size bytes. Returns -1 when all went well, -2
 * for a type it does not know, else the first block that cannot be stored, with *why = 1 if it
 * holds NaN or inf and 2 if its d or m overflows fp16 (blocks after it are left unwritten). */
int64_t zp_quantize_legacy(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why) {
  if (type < 0 || type >= N_TYPES) return -2;
  for (int64_t start = 0; start < n_blocks; start += RUN) {
    int64_t stop = start + RUN < n_blocks ? start + RUN : n_blocks;
    int checked = !non_finite(x + QB * start, QB * (stop - start));
    for (int64_t b = start; b < stop; b++) {
      const float *xb = x + QB * b;
      if (!checked && non_finite(xb, QB)) return *why = 1, b;
      if (quantize_block(type, xb, y + type_size[type] * b)) return *why = 2, b;
    }
  }
  return -1;
}

/* 32 codes of one block as signed ints: nibbles (low first), bit 4 from qh, minus the offset. */
static void unpack_codes(const uint8_t *nibbles, const uint8_t *qh, int offset, int32_t *q) {
  uint32_t h = 0;
  if (qh) h = qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
  for (int j = 0; j < QB / 2; j++) {
    q[j] = nibbles[j] & 0x0F;
    q[j + QB / 2] = nibbles[j] >> 4;
  }
  if (qh)
    for (int j = 0; j < QB; j++) q[j] |= (int32_t)((h >> j) & 1) << 4;
  for (int j = 0; j < QB; j++) q[j] -= offset;
}

/* y: n_blocks x type_size bytes -> x: n_blocks x 32 floats, gguf-py's x = d * q (+ m, a separate
 * add). Returns 0, or -2 for a type it does not know. */
int zp_dequantize_legacy(int type, const uint8_t *y, int64_t n_blocks, float *x) {
  if (type < 0 || type >= N_TYPES) return -2;
  int has_min = type == Q4_1 || type == Q5_1, five = type == Q5_0 || type == Q5_1;
  int col = has_min ? 4 : 2, offset = has_min ? 0 : (five ? 16 : 8);
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t *yb = y + type_size[type] * b;
    float *xb = x + QB * b;
    float d = half_value(yb), m = has_min ? half_value(yb + 2) : 0.f;
    int32_t q[QB];
    if (type == Q8_0)
      for (int j = 0; j < QB; j++) q[j] = (int8_t)yb[2 + j];
    else
      unpack_codes(yb + col + (five ? 4 : 0), five ? yb + col : NULL, offset, q);
    for (int j = 0; j < QB; j++) xb[j] = d * (float)q[j];
    if (has_min)
      for (int j = 0; j < QB; j++) xb[j] = xb[j] + m;
  }
  return 0;
}

#else /* no half floats: the torch code does the work */

int64_t zp_quantize_legacy(int type, const float *x, int64_t n_blocks, uint8_t *y, int *why) {
  (void)type, (void)x, (void)n_blocks, (void)y, (void)why;
  return -2;
}
int zp_dequantize_legacy(int type, const uint8_t *y, int64_t n_blocks, float *x) {
  (void)type, (void)y, (void)n_blocks, (void)x;
  return -2;
}

#endif
