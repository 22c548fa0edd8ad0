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
 *   which is the very weight core.dequantize makes. The AVX-512 path looks w up in a 16-entry
 *   table per group (vpermps on the nibble), so decoding a code costs no int->float conversion.
 *
 * Blocks of rows go to up to `threads` threads (csrc/parallel.h); a row's arithmetic never
 * depends on the split. `portable` forces the scalar loops (tests hold both
 * paths to the same oracle). Without AVX-512 the int8 loop uses AVX2 where compiled in, and the
 * int4 loop the portable one. */
#include <stdint.h>
#include <stdlib.h>

#include "parallel.h"
#include "zeropoint.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define CHUNK 32 /* codes per AVX-512 int4 step: 16 bytes, 16 low and 16 high nibbles */
#define STACK_FLOATS 16384
/* The hardware prefetchers of the machine this was tuned on do not keep these compute-heavy
 * loops fed from L3 (measured 3-4x slower than from L2 without this): each row asks for the
 * bytes PREFETCH_AHEAD further on, i.e. a few rows ahead. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096
#endif

static inline void prefetch_row(const void *row, int64_t nbytes) {
  const char *p = (const char *)row + PREFETCH_AHEAD;
  for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch(p + b, 0, 3);
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

#if defined(__AVX512F__)
/* Each row's sum in its own 16 lanes, then the tail: a row's arithmetic is the same in the
 * four-row loop as alone (so fused and separate layers agree bit for bit). Four rows give four
 * independent FMA chains and four memory streams: measured 1.2x faster than one at a time. */
#define Q8(r) \
  _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + (r) * n + i))))

static float q8_tail(const float *x, const int8_t *row, int64_t i, int64_t n, float total) {
  for (; i < n; i++) total = __builtin_fmaf(x[i], (float)row[i], total);
  return total;
}

static float dot1_q8_avx512(const float *x, const int8_t *q, int64_t n) {
  __m512 a0 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), Q8(0), a0);
  return q8_tail(x, q, i, n, _mm512_reduce_add_ps(a0));
}

static void dot4_q8_avx512(const float *x, const int8_t *q, int64_t n, float *out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(xv, Q8(0), a0);
    a1 = _mm512_fmadd_ps(xv, Q8(1), a1);
    a2 = _mm512_fmadd_ps(xv, Q8(2), a2);
    a3 = _mm512_fmadd_ps(xv, Q8(3), a3);
  }
  out[0] = q8_tail(x, q, i, n, _mm512_reduce_add_ps(a0));
  out[1] = q8_tail(x, q + n, i, n, _mm512_reduce_add_ps(a1));
  out[2] = q8_tail(x, q + 2 * n, i, n, _mm512_reduce_add_ps(a2));
  out[3] = q8_tail(x, q + 3 * n, i, n, _mm512_reduce_add_ps(a3));
}
#undef Q8
#elif defined(__AVX2__)
static float dot_q8_avx2(const float *x, const int8_t *q, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
#define Q8(k) \
  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i + k))))
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), Q8(0), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), Q8(8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), Q8(16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), Q8(24), a3);
  }
#undef Q8
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  float total = 0.0f;
  for (int j = 0; j < 8; j++) total += lanes[j];
  for (; i < n; i++) total += x[i] * (float)q[i];
  return total;
}
#endif

static void gemv_q8_rows(const float *x, const int8_t *q, const float *scale, float *y,
                         int64_t in, int64_t r0, int64_t r1, int portable) {
#if defined(__AVX512F__)
  if (!portable) {
    for (; r0 + 4 <= r1; r0 += 4) {
      float d[4];
      prefetch_row(q + r0 * in, 4 * in);
      dot4_q8_avx512(x, q + r0 * in, in, d);
      for (int r = 0; r < 4; r++) y[r0 + r] = scale[r0 + r] * d[r];
    }
    for (; r0 < r1; r0++) y[r0] = scale[r0] * dot1_q8_avx512(x, q + r0 * in, in);
    return;
  }
#endif
  for (int64_t o = r0; o < r1; o++) {
    const int8_t *row = q + o * in;
    float d;
    if (o + 1 < r1) prefetch_row(row, in);
#if defined(__AVX2__) && !defined(__AVX512F__)
    d = portable ? dot_q8_scalar(x, row, in) : dot_q8_avx2(x, row, in);
#else
    (void)portable;
    d = dot_q8_scalar(x, row, in);
#endif
    y[o] = scale[o] * d;
  }
}

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

static void gemv_q4_portable(const float *x, const uint8_t *packed, const float *scale,
                             const float *zp, float *y, int64_t in, int64_t gs, int64_t r0,
                             int64_t r1) {
  const int64_t groups = (in + gs - 1) / gs;
  float tab[16];
  for (int64_t o = r0; o < r1; o++) {
    const uint8_t *row = packed + o * (in / 2);
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
      const int64_t i0 = g * gs, n = (in - i0 < gs) ? in - i0 : gs;
      group_table(tab, scale[o * groups + g], zp ? zp[o * groups + g] : 8.0f);
      total += dot_q4_scalar(x, row, tab, i0, n);
    }
    y[o] = total;
  }
}

#if defined(__AVX512F__)
/* xd holds x rearranged per CHUNK: its 16 even-indexed values, then its 16 odd ones, so that
 * the low and high nibbles of 16 consecutive bytes meet their x in plain vector order. */
static void deinterleave(const float *x, float *xd, int64_t chunks) {
  for (int64_t c = 0; c < chunks; c++)
    for (int j = 0; j < 16; j++) {
      xd[c * CHUNK + j] = x[c * CHUNK + 2 * j];
      xd[c * CHUNK + 16 + j] = x[c * CHUNK + 2 * j + 1];
    }
}

static void gemv_q4_avx512(const float *x, const float *xd, const uint8_t *packed,
                           const float *scale, const float *zp, float *y, int64_t in, int64_t gs,
                           int64_t r0, int64_t r1) {
  const int64_t groups = (in + gs - 1) / gs;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float tab[16];
  for (int64_t o = r0; o < r1; o++) {
    const uint8_t *row = packed + o * (in / 2);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float tail = 0.0f;
    if (o + 1 < r1) prefetch_row(row, in / 2);
    for (int64_t g = 0; g < groups; g++) {
      const int64_t i0 = g * gs, n = (in - i0 < gs) ? in - i0 : gs;
      const float s = scale[o * groups + g], z = zp ? zp[o * groups + g] : 8.0f;
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
      const int64_t whole = n / CHUNK * CHUNK;
      int64_t i = i0;
#define STEP(acc_lo, acc_hi, k)                                                             \
  do {                                                                                      \
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k) / 2))); \
    acc_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t), _mm512_loadu_ps(xd + (k)), acc_lo); \
    acc_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t),             \
                             _mm512_loadu_ps(xd + (k) + 16), acc_hi);                       \
  } while (0)
      for (; i + 2 * CHUNK <= i0 + whole; i += 2 * CHUNK) {
        STEP(a0, a1, i);
        STEP(a2, a3, i + CHUNK);
      }
      if (i < i0 + whole) {
        STEP(a0, a1, i);
        i += CHUNK;
      }
#undef STEP
      if (i < i0 + n) { /* a ragged last group's last codes */
        _mm512_storeu_ps(tab, t);
        tail += dot_q4_scalar(x, row, tab, i, i0 + n - i);
      }
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + tail;
  }
}
#endif

/* --- one job, its rows split into blocks that threads claim in turn ----------------------- */

typedef struct {
  int bits, portable;
  const float *x, *xd; /* xd: x deinterleaved for the AVX-512 int4 loop, or NULL */
  const void *w;
  const float *scale;
  const float *zp;
  float *y;
  int64_t in, gs;
} job_t;

static void run_rows(void *ctx, int64_t r0, int64_t r1, int thread) {
  (void)thread;
  const job_t *j = ctx;
  if (j->bits == 8) {
    gemv_q8_rows(j->x, j->w, j->scale, j->y, j->in, r0, r1, j->portable);
    return;
  }
#if defined(__AVX512F__)
  if (j->xd) {
    gemv_q4_avx512(j->x, j->xd, j->w, j->scale, j->zp, j->y, j->in, j->gs, r0, r1);
    return;
  }
#endif
  gemv_q4_portable(j->x, j->w, j->scale, j->zp, j->y, j->in, j->gs, r0, r1);
}

#define BLOCK_ROWS 32 /* rows a thread claims at a time */

/* y = W x for all `rows` rows, on up to `threads` threads. */
void zp_gemv_q8(const float *x, const int8_t *q, const float *scale, float *y, int64_t in,
                int64_t rows, int threads, int portable) {
  job_t j = {8, portable, x, NULL, q, scale, NULL, y, in, in};
  zp_parallel(threads, rows, BLOCK_ROWS, run_rows, &j);
}

void zp_gemv_q4(const float *x, const uint8_t *packed, const float *scale, const float *zp,
                float *y, int64_t in, int64_t gs, int64_t rows, int threads, int portable) {
  job_t j = {4, portable, x, NULL, packed, scale, zp, y, in, gs};
#if defined(__AVX512F__)
  /* Chunks must not straddle groups: whole-chunk groups, or the portable loops. */
  float stack[STACK_FLOATS], *xd = NULL;
  if (!portable && gs % CHUNK == 0) {
    const int64_t chunks = in / CHUNK;
    xd = chunks * CHUNK <= STACK_FLOATS ? stack : malloc(sizeof(float) * chunks * CHUNK);
    if (xd) deinterleave(x, xd, chunks);
  }
  j.xd = xd;
  zp_parallel(threads, rows, BLOCK_ROWS, run_rows, &j);
  if (xd && xd != stack) free(xd);
#else
  zp_parallel(threads, rows, BLOCK_ROWS, run_rows, &j);
#endif
}
