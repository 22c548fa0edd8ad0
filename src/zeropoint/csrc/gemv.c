/* Batch-1 matrix-vector products y = W x straight from zeropoint's packed codes, float32
 * activations and float32 accumulation (nn/gemv.py is the Python side).
 *
 * int8: codes are int8 bytes (row-major, one float32 scale per output row):
 *   y[o] = s[o] * sum_i x[i] * q[o,i].
 * int4: codes are two per byte, low nibble first, each row its own in/2 bytes (even in); one
 *   float32 scale and one float32 zero-point per group of `gs` codes along the row (an integer
 *   one converted, or a real one), the last group possibly shorter (zp NULL: zero-point 8, the
 *   symmetric scheme, whose codes are stored +8):
 *   y[o] = sum_i x[i] * w[o,i], w[o,i] = (u[o,i] - z[o,g]) * s[o,g] rounded once to float32,
 *   which is the very weight core.dequantize makes. `half` bit 1: scale points to float16
 *   values instead, bit 2: zp does (exact copies where the spec keeps float16 scales: fewer
 *   bytes to read per token). The SIMD paths look w up in a 16-entry
 *   table per group (AVX-512: one vpermps on the nibble; AVX2: two vpermps on its low three
 *   bits and a blend on bit 3), so decoding a code costs no int->float conversion.
 *
 * `path` picks the loops: ZP_GEMV_BEST (the widest compiled in: AVX-512, else AVX2, else
 * portable), ZP_GEMV_PORTABLE (scalar C) or ZP_GEMV_AVX2 (where compiled in: so that an
 * AVX-512 machine tests the AVX2 loops too); zp_gemv_has_path says which exist. Every path
 * keeps one fixed order of float32 operations per row, whatever the rows beside it: blocks of
 * rows go to up to `threads` threads (csrc/parallel.h) and several rows share each x load, yet
 * a row's result never depends on the split (fused and separate layers agree bit for bit). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "zeropoint.h"
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { ZP_GEMV_BEST = 0, ZP_GEMV_PORTABLE = 1, ZP_GEMV_AVX2 = 2, ZP_GEMV_AVX512 = 3 };

#if defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2 1
#endif
#if defined(__AVX512F__)
#define HAVE_AVX512 1
#endif

#define ROWS 4 /* rows that share each x load (their sums are independent chains) */
#define STACK_FLOATS 16384
#define INLINE static inline __attribute__((always_inline))
/* Hardware prefetchers do not keep these compute-heavy loops fed from L3 and memory (measured
 * 3-4x slower from L3 than from L2 without this): each block of rows asks for the bytes
 * PREFETCH_AHEAD further on, i.e. a few blocks ahead. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096
#endif

int zp_gemv_has_path(int path) {
  switch (path) {
  case ZP_GEMV_BEST:
  case ZP_GEMV_PORTABLE:
    return 1;
#ifdef HAVE_AVX2
  case ZP_GEMV_AVX2:
    return 1;
#endif
#ifdef HAVE_AVX512
  case ZP_GEMV_AVX512:
    return 1;
#endif
  default:
    return 0;
  }
}

/* The path `path` asks for, resolved to one compiled in. */
static int resolve(int path) {
  if (path == ZP_GEMV_BEST) {
#if defined(HAVE_AVX512)
    return ZP_GEMV_AVX512;
#elif defined(HAVE_AVX2)
    return ZP_GEMV_AVX2;
#else
    return ZP_GEMV_PORTABLE;
#endif
  }
  return zp_gemv_has_path(path) ? path : ZP_GEMV_PORTABLE;
}

static inline void prefetch_bytes(const void *start, int64_t nbytes) {
  const char *p = (const char *)start + PREFETCH_AHEAD;
  for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

/* ---- int8 ------------------------------------------------------------------------------ */

static float q8_tail(const float *x, const int8_t *row, int64_t i, int64_t n, float total) {
  for (; i < n; i++) total = __builtin_fmaf(x[i], (float)row[i], total);
  return total;
}

static float dot_q8_scalar(const float *x, const int8_t *q, int64_t n) {
  /* Eight partial sums: gcc vectorizes this (no reassociation of one float sum needed). */
  float acc[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += x[i + j] * (float)q[i + j];
  float total = 0.0f;
  for (; i < n; i++) total += x[i] * (float)q[i];
  for (int j = 0; j < 8; j++) total += acc[j];
  return total;
}

#ifdef HAVE_AVX512
/* R rows (R constant where inlined): each row's sum in its own 16 lanes, then the tail. */
INLINE void dot_q8_avx512(const float *x, const int8_t *q, int64_t n, int R, float *out) {
  __m512 acc[ROWS];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < R; r++) {
      const __m128i b = _mm_loadu_si128((const __m128i *)(q + r * n + i));
      acc[r] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = q8_tail(x, q + r * n, i, n, _mm512_reduce_add_ps(acc[r]));
}
#endif

#ifdef HAVE_AVX2
/* The 8 lanes' sum in a fixed order. */
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* R rows: each row's sum in two 8-lane chains (codes 0-7 and 8-15 of every 16), then the tail. */
INLINE void dot_q8_avx2(const float *x, const int8_t *q, int64_t n, int R, float *out) {
  __m256 lo[ROWS], hi[ROWS];
  for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int r = 0; r < R; r++) {
      const __m128i b = _mm_loadu_si128((const __m128i *)(q + r * n + i));
      lo[r] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), lo[r]);
      hi[r] = _mm256_fmadd_ps(
          x1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b))), hi[r]);
    }
  }
  for (int r = 0; r < R; r++)
    out[r] = q8_tail(x, q + r * n, i, n, hsum8(_mm256_add_ps(lo[r], hi[r])));
}
#endif

static void gemv_q8_rows(const float *x, const int8_t *q, const float *scale, float *y,
                         int64_t in, int64_t r0, int64_t r1, int path) {
  float d[ROWS];
  (void)d, (void)path; /* unused without SIMD */
#define BLOCKS(dot)                                                                      \
  do {                                                                                   \
    for (; r0 + ROWS <= r1; r0 += ROWS) {                                                \
      prefetch_bytes(q + r0 * in, ROWS * in);                                            \
      dot(x, q + r0 * in, in, ROWS, d);                                                  \
      for (int r = 0; r < ROWS; r++) y[r0 + r] = scale[r0 + r] * d[r];                   \
    }                                                                                    \
    for (; r0 < r1; r0++) {                                                              \
      dot(x, q + r0 * in, in, 1, d);                                                     \
      y[r0] = scale[r0] * d[0];                                                          \
    }                                                                                    \
  } while (0)
#ifdef HAVE_AVX512
  if (path == ZP_GEMV_AVX512) {
    BLOCKS(dot_q8_avx512);
    return;
  }
#endif
#ifdef HAVE_AVX2
  if (path == ZP_GEMV_AVX2) {
    BLOCKS(dot_q8_avx2);
    return;
  }
#endif
#undef BLOCKS
  for (int64_t o = r0; o < r1; o++) {
    const int8_t *row = q + o * in;
    if (o + 1 < r1) prefetch_bytes(row, in);
    y[o] = scale[o] * dot_q8_scalar(x, row, in);
  }
}

/* ---- int4 ------------------------------------------------------------------------------ */

/* An IEEE float16 (its bits) as float32: exact. */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  if (exp == 31) bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (!man) bits = sign;
  else { /* subnormal: man * 2^-24, exact in float32 */
    float f = (float)man * 5.9604644775390625e-08f;
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

/* Group parameter k of a float32 (half 0) or float16 (half nonzero) array. */
static inline float param(const void *p, int64_t k, int half) {
  return half ? half_to_float(((const uint16_t *)p)[k]) : ((const float *)p)[k];
}

#define PARAM_BUF 2048 /* floats: the float16 parameters of a block of rows, converted */
/* count parameters from k0 on as float32: p's own when float32, else converted into buf 8 at a
 * time (one conversion per group and row cost more than reading 2 more bytes saved); NULL
 * when p is NULL or they do not fit buf (then param() per group). */
static inline const float *block_params(const void *p, int half, int64_t k0, int64_t count,
                                        float *buf) {
  if (!p) return NULL;
  if (!half) return (const float *)p + k0;
  if (count > PARAM_BUF) return NULL;
  const uint16_t *h = (const uint16_t *)p + k0;
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= count; j += 8)
    _mm256_storeu_ps(buf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
#endif
  for (; j < count; j++) buf[j] = half_to_float(h[j]);
  return buf;
}

/* Row r's (of a block) scale and zero-point of group g, from block_params or param(). */
#define GROUP_SCALE(r, g) \
  (sb ? sb[(r) * groups + (g)] : param(scale, (o + (r)) * groups + (g), half & 1))
#define GROUP_ZERO(r, g)                                                                 \
  (!zp ? 8.0f : zb ? zb[(r) * groups + (g)] : param(zp, (o + (r)) * groups + (g), half & 2))

/* The 16 weights a group's codes stand for: (u - z) * s, one rounding, as core.dequantize. */
static void group_table(float *tab, float s, float z) {
  for (int u = 0; u < 16; u++) tab[u] = ((float)u - z) * s;
}

/* sum over codes [i0, i0 + n) of one row of x[i] * tab[code i]; any i0 and n (a group may
 * start inside a byte when gs is odd). */
static float dot_q4_scalar(const float *x, const uint8_t *row, const float *tab, int64_t i0,
                           int64_t n) {
  float acc[8] = {0};
  int64_t i = i0;
  const int64_t end = i0 + n;
  for (; i + 8 <= end; i += 8)
    for (int j = 0; j < 8; j++)
      acc[j] += x[i + j] * tab[(row[(i + j) >> 1] >> (((i + j) & 1) * 4)) & 15];
  float total = 0.0f;
  for (; i < end; i++) total += x[i] * tab[(row[i >> 1] >> ((i & 1) * 4)) & 15];
  for (int j = 0; j < 8; j++) total += acc[j];
  return total;
}

static void gemv_q4_portable(const float *x, const uint8_t *packed, const void *scale,
                             const void *zp, int half, float *y, int64_t in, int64_t gs,
                             int64_t r0, int64_t r1) {
  const int64_t groups = (in + gs - 1) / gs;
  float tab[16];
  for (int64_t o = r0; o < r1; o++) {
    const uint8_t *row = packed + o * (in / 2);
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
      const int64_t i0 = g * gs, n = (in - i0 < gs) ? in - i0 : gs;
      const int64_t k = o * groups + g;
      group_table(tab, param(scale, k, half & 1), zp ? param(zp, k, half & 2) : 8.0f);
      total += dot_q4_scalar(x, row, tab, i0, n);
    }
    y[o] = total;
  }
}

/* xd holds x rearranged per chunk of `chunk` codes: its chunk/2 even-indexed values, then its
 * odd ones, so that the low and high nibbles of chunk/2 consecutive bytes meet their x in plain
 * vector order. */
static void deinterleave(const float *x, float *xd, int64_t chunks, int chunk) {
  const int half = chunk / 2;
  for (int64_t c = 0; c < chunks; c++)
    for (int j = 0; j < half; j++) {
      xd[c * chunk + j] = x[c * chunk + 2 * j];
      xd[c * chunk + half + j] = x[c * chunk + 2 * j + 1];
    }
}

/* R rows (R constant where inlined) of the int4 product, whole chunks of CHUNK codes per
 * group (gs % CHUNK == 0): per row and group a 16-entry table, one chain for the low nibbles
 * and one for the high ones; a ragged last group's last codes go through the scalar loop. */
#ifdef HAVE_AVX512
#define CHUNK512 32 /* codes per AVX-512 step: 16 bytes, 16 low and 16 high nibbles */
INLINE void rows_q4_avx512(const float *x, const float *xd, const uint8_t *packed, int half,
                           const void *scale, const void *zp, float *y, int64_t in,
                           int64_t gs, int64_t o, int R) {
  const int64_t groups = (in + gs - 1) / gs, nb = in / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 lo[ROWS], hi[ROWS];
  float tail[ROWS];
  for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps(), tail[r] = 0.0f;
  const uint8_t *row = packed + o * nb;
  float sbuf[PARAM_BUF], zbuf[PARAM_BUF];
  const float *sb = block_params(scale, half & 1, o * groups, R * groups, sbuf);
  const float *zb = block_params(zp, half & 2, o * groups, R * groups, zbuf);
  for (int64_t g = 0; g < groups; g++) {
    const int64_t i0 = g * gs, n = (in - i0 < gs) ? in - i0 : gs, end = i0 + n / CHUNK512 * CHUNK512;
    __m512 t[ROWS];
    for (int r = 0; r < R; r++)
      t[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(GROUP_ZERO(r, g))),
                           _mm512_set1_ps(GROUP_SCALE(r, g)));
    for (int64_t i = i0; i < end; i += CHUNK512) {
      const __m512 xe = _mm512_loadu_ps(xd + i), xo = _mm512_loadu_ps(xd + i + 16);
      for (int r = 0; r < R; r++) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + r * nb + i / 2)));
        lo[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t[r]), xe, lo[r]);
        hi[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t[r]), xo, hi[r]);
      }
    }
    if (end < i0 + n) { /* a ragged last group's last codes */
      float tab[16];
      for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(tab, t[r]);
        tail[r] += dot_q4_scalar(x, row + r * nb, tab, end, i0 + n - end);
      }
    }
  }
  for (int r = 0; r < R; r++) y[o + r] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r])) + tail[r];
}
#endif

#ifdef HAVE_AVX2
#define CHUNK256 16 /* codes per AVX2 step: 8 bytes, 8 low and 8 high nibbles */
/* tab[u] for 8 lanes of codes u: vpermps reads the low three bits of idx (higher ones are
 * ignored), the blend takes entries 8-15 where `select`'s sign bit (the code's bit 3) is set. */
INLINE __m256 lookup16(__m256 t_lo, __m256 t_hi, __m256i idx, __m256i select) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx),
                          _mm256_permutevar8x32_ps(t_hi, idx), _mm256_castsi256_ps(select));
}

INLINE void rows_q4_avx2(const float *x, const float *xd, const uint8_t *packed, int half,
                         const void *scale, const void *zp, float *y, int64_t in, int64_t gs,
                         int64_t o, int R) {
  const int64_t groups = (in + gs - 1) / gs, nb = in / 2;
  const __m256 iota_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 iota_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  __m256 lo[ROWS], hi[ROWS];
  float tail[ROWS];
  for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps(), tail[r] = 0.0f;
  const uint8_t *row = packed + o * nb;
  float sbuf[PARAM_BUF], zbuf[PARAM_BUF];
  const float *sb = block_params(scale, half & 1, o * groups, R * groups, sbuf);
  const float *zb = block_params(zp, half & 2, o * groups, R * groups, zbuf);
  for (int64_t g = 0; g < groups; g++) {
    const int64_t i0 = g * gs, n = (in - i0 < gs) ? in - i0 : gs, end = i0 + n / CHUNK256 * CHUNK256;
    __m256 t0[ROWS], t1[ROWS]; /* the table's entries 0-7 and 8-15 */
    for (int r = 0; r < R; r++) {
      const __m256 z = _mm256_set1_ps(GROUP_ZERO(r, g)), s = _mm256_set1_ps(GROUP_SCALE(r, g));
      t0[r] = _mm256_mul_ps(_mm256_sub_ps(iota_lo, z), s);
      t1[r] = _mm256_mul_ps(_mm256_sub_ps(iota_hi, z), s);
    }
    for (int64_t i = i0; i < end; i += CHUNK256) {
      const __m256 xe = _mm256_loadu_ps(xd + i), xo = _mm256_loadu_ps(xd + i + 8);
      for (int r = 0; r < R; r++) {
        /* 8 bytes, one per 32-bit lane: the low nibble's bit 3 is the lane's bit 3, moved to
         * the sign by << 28; the high nibble's (bit 7) by << 24. */
        const __m256i b =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + r * nb + i / 2)));
        const __m256 wl = lookup16(t0[r], t1[r], b, _mm256_slli_epi32(b, 28));
        const __m256 wh = lookup16(t0[r], t1[r], _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
        lo[r] = _mm256_fmadd_ps(wl, xe, lo[r]);
        hi[r] = _mm256_fmadd_ps(wh, xo, hi[r]);
      }
    }
    if (end < i0 + n) {
      float tab[16];
      for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(tab, t0[r]);
        _mm256_storeu_ps(tab + 8, t1[r]);
        tail[r] += dot_q4_scalar(x, row + r * nb, tab, end, i0 + n - end);
      }
    }
  }
  for (int r = 0; r < R; r++) y[o + r] = hsum8(_mm256_add_ps(lo[r], hi[r])) + tail[r];
}
#endif

/* ---- one job, its rows split into blocks that threads claim in turn ----------------------- */

typedef struct {
  int bits, path;
  const float *x, *xd; /* xd: x deinterleaved for the SIMD int4 loops, or NULL (portable) */
  const void *w;
  const void *scale, *zp; /* float32, or for int4 float16 where half says (zp_gemv_q4) */
  int half;
  float *y;
  int64_t in, gs;
} job_t;

static void run_rows(void *ctx, int64_t r0, int64_t r1, int thread) {
  (void)thread;
  const job_t *j = ctx;
  if (j->bits == 8) {
    gemv_q8_rows(j->x, j->w, j->scale, j->y, j->in, r0, r1, j->path);
    return;
  }
  const uint8_t *w = j->w;
  const int64_t nb = j->in / 2;
  (void)nb; /* unused without SIMD */
#define BLOCKS(rows_fn)                                                                    \
  do {                                                                                     \
    for (; r0 + ROWS <= r1; r0 += ROWS) {                                                  \
      prefetch_bytes(w + r0 * nb, ROWS * nb);                                              \
      rows_fn(j->x, j->xd, w, j->half, j->scale, j->zp, j->y, j->in, j->gs, r0, ROWS);              \
    }                                                                                      \
    for (; r0 < r1; r0++)                                                                 \
      rows_fn(j->x, j->xd, w, j->half, j->scale, j->zp, j->y, j->in, j->gs, r0, 1);         \
  } while (0)
#ifdef HAVE_AVX512
  if (j->xd && j->path == ZP_GEMV_AVX512) {
    BLOCKS(rows_q4_avx512);
    return;
  }
#endif
#ifdef HAVE_AVX2
  if (j->xd && j->path == ZP_GEMV_AVX2) {
    BLOCKS(rows_q4_avx2);
    return;
  }
#endif
#undef BLOCKS
  gemv_q4_portable(j->x, w, j->scale, j->zp, j->half, j->y, j->in, j->gs, r0, r1);
}

#define BLOCK_ROWS 32 /* rows a thread claims at a time */

/* y = W x for all `rows` rows, on up to `threads` threads. */
void zp_gemv_q8(const float *x, const int8_t *q, const float *scale, float *y, int64_t in,
                int64_t rows, int threads, int path) {
  job_t j = {8, resolve(path), x, NULL, q, scale, NULL, 0, y, in, in};
  zp_parallel(threads, rows, BLOCK_ROWS, run_rows, &j);
}

void zp_gemv_q4(const float *x, const uint8_t *packed, const void *scale, const void *zp,
                float *y, int64_t in, int64_t gs, int64_t rows, int threads, int path, int half) {
  job_t j = {4, resolve(path), x, NULL, packed, scale, zp, half, y, in, gs};
  /* Chunks must not straddle groups: whole-chunk groups, or the portable loop. */
  const int chunk = j.path == ZP_GEMV_AVX512 ? 32 : j.path == ZP_GEMV_AVX2 ? 16 : 0;
  float stack[STACK_FLOATS], *xd = NULL;
  if (chunk && gs % chunk == 0) {
    const int64_t chunks = in / chunk;
    xd = chunks * chunk <= STACK_FLOATS ? stack : malloc(sizeof(float) * chunks * chunk);
    if (xd) deinterleave(x, xd, chunks, chunk);
  }
  j.xd = xd;
  zp_parallel(threads, rows, BLOCK_ROWS, run_rows, &j);
  if (xd && xd != stack) free(xd);
}
