/* Fused affine quantize / dequantize / block min-max for float32, one pass over memory.
 *
 * The data is viewed as (P, C, Q) with one scale per c: per-tensor is (1, 1, n), per-group
 * over the last axis (1, groups, group_size), per-channel over axis 0 (1, rows, cols) and over
 * the last axis (rows, cols, 1). The arithmetic is exactly the eager path's in core.py:
 * the codes of float32 division, round half to even (nearbyintf in the default rounding mode),
 * integer zero-point, clamp. No -ffast-math: the division must stay a correctly rounded division
 * (quantize_run multiplies where that provably gives the same codes).
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "parallel.h"
#include "zeropoint.h"

#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

/* Quantizing divides by the scale, and a division costs the CPU about ten times a multiply (the
 * division alone capped this loop at half of torch's multiply-by-reciprocal kernel). So each
 * chunk is first computed as y = x * (1/s). That product differs from the correctly rounded
 * x / s by at most 3 ulps of |x/s| (one rounding for 1/s, one for the product, one for the
 * quotient), so it rounds to the same integer unless it lies within that distance of a .5 tie.
 * Only |y| < ymax = max(qmax - z, z - qmin) + 1 matters: beyond it both roundings clamp to the
 * same end of the code range. So one threshold serves the whole run: a chunk with any
 * |y - round(y)| >= 0.5 - 8 ulps of ymax (about 1 element in 8,000 at 8 bits, 1 in 60,000 at 4)
 * is recomputed with the division, and the codes stay exactly those of core.py's eager path. */
#define CHUNK 256 /* floats: small enough that few chunks need the redo */
#define TIE_MARGIN 0x1p-21f /* 8 ulps relative: more than the 3 the argument above needs */

/* The threshold on |y - round(y)| below which y rounds like x / s, for zero-points in
 * [zlo, zhi]. */
static float tie_threshold(float zlo, float zhi, float qmin, float qmax) {
  float ymax = fmaxf(qmax - zlo, zhi - qmin) + 1.0f;
  return 0.5f - ymax * TIE_MARGIN;
}

#define PREFETCH_AHEAD 4096 /* floats */

/* n codes of x with scale s, reciprocal inv and zero-point z, read through AT(param, i): one
 * value for the whole run (SCALAR), or one per element (PER_ELEMENT). Two functions from one
 * body because the scalar one must hold its parameters in registers: a uint8_t store may alias
 * any float behind a pointer, which made the compiler reload them every element. Returns 1 on
 * NaN/Inf. */
#define SCALAR(param, i) (param)
#define PER_ELEMENT(param, i) ((param)[i])
#define DEFINE_QUANTIZE_RUN(name, PARAM, AT)                                                     \
  static int name(const float *restrict x, uint8_t *restrict out, int64_t n, PARAM s, PARAM inv, \
                  PARAM z, float qmin, float qmax, float tie) {                                  \
    int bad = 0;                                                                                 \
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                                  \
      const int64_t m = n - i0 < CHUNK ? n - i0 : CHUNK;                                         \
      for (int64_t k = 0; k < m; k += 16) __builtin_prefetch(x + i0 + k + PREFETCH_AHEAD);       \
      int near_tie = 0;                                                                          \
      for (int64_t i = i0; i < i0 + m; i++) {                                                    \
        float y = x[i] * AT(inv, i);                                                             \
        float r = nearbyintf(y);                                                                 \
        /* y - r is exact. A NaN/Inf y makes it NaN, and NaN fails the test, which flags the  */ \
        /* chunk: the exact loop below then checks x itself.                                 */ \
        near_tie |= !(fabsf(y - r) < tie);                                                       \
        float q = r + AT(z, i);                                                                  \
        q = q > qmax ? qmax : q; /* one compare-select each, not a nested select */              \
        q = q < qmin ? qmin : q;                                                                 \
        out[i] = (uint8_t)(int32_t)q;                                                            \
      }                                                                                          \
      if (near_tie)                                                                              \
        for (int64_t i = i0; i < i0 + m; i++) {                                                  \
          bad |= (x[i] - x[i]) != 0.0f; /* NaN exactly for NaN and Inf */                        \
          float q = nearbyintf(x[i] / AT(s, i)) + AT(z, i);                                      \
          out[i] = (uint8_t)(int32_t)CLAMP(q, qmin, qmax);                                       \
        }                                                                                        \
    }                                                                                            \
    return bad;                                                                                  \
  }
DEFINE_QUANTIZE_RUN(quantize_run, float, SCALAR)
DEFINE_QUANTIZE_RUN(quantize_run_per_element, const float *restrict, PER_ELEMENT)

/* The reciprocal is usable when it is a normal float: a subnormal 1/s (s > 2^126) would carry
 * less relative precision than the tie test assumes, and an infinite one (tiny s) none. */
static float reciprocal(float s) {
  float inv = 1.0f / s;
  return isnormal(inv) ? inv : NAN;
}

static int quantize_divide(const float *x, uint8_t *out, int64_t n, float s, float z, float qmin,
                           float qmax) {
  int bad = 0;
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    bad |= (v - v) != 0.0f;
    float q = nearbyintf(v / s) + z;
    out[i] = (uint8_t)(int32_t)CLAMP(q, qmin, qmax);
  }
  return bad;
}

/* --- the whole view, split by zp_parallel into flat element ranges [begin, end) ------------
 *
 * Element i of the (P, C, Q) view has scale index (i / Q) % C. A range is walked in segments
 * that share their scale layout: one block of Q elements when Q > 1, one row of C elements
 * (a scale per element) when Q == 1. */

#define GRAIN (1 << 18) /* elements a thread claims at a time: 1 MiB of float32 */

typedef struct {
  const float *x;
  uint8_t *out;
  int64_t C, Q;
  const float *scale, *zero_point; /* C entries; zero_point NULL for symmetric */
  const float *inv, *zero;          /* Q == 1 only: C reciprocals and C zero-points, or NULL */
  float qmin, qmax, tie;            /* tie: Q == 1 only, for every zero-point at once */
  int bad;                          /* atomic: a NaN/Inf was seen */
} quantize_job;

static void quantize_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  quantize_job *j = ctx;
  int bad = 0;
  for (int64_t i = begin; i < end;) {
    if (j->Q == 1) {
      const int64_t c = i % j->C, stop = i - c + j->C < end ? i - c + j->C : end;
      if (j->inv)
        bad |= quantize_run_per_element(j->x + i, j->out + i, stop - i, j->scale + c, j->inv + c,
                                        j->zero + c, j->qmin, j->qmax, j->tie);
      else
        for (int64_t k = i; k < stop; k++)
          bad |= quantize_divide(j->x + k, j->out + k, 1, j->scale[k - i + c],
                                 j->zero_point ? j->zero_point[k - i + c] : 0.0f, j->qmin, j->qmax);
      i = stop;
    } else {
      const int64_t block = i / j->Q, c = block % j->C;
      const int64_t stop = (block + 1) * j->Q < end ? (block + 1) * j->Q : end;
      const float s = j->scale[c], z = j->zero_point ? j->zero_point[c] : 0.0f, inv = reciprocal(s);
      bad |= isnan(inv) ? quantize_divide(j->x + i, j->out + i, stop - i, s, z, j->qmin, j->qmax)
                        : quantize_run(j->x + i, j->out + i, stop - i, s, inv, z, j->qmin, j->qmax,
                                       tie_threshold(z, z, j->qmin, j->qmax));
      i = stop;
    }
  }
  if (bad) __atomic_store_n(&j->bad, 1, __ATOMIC_RELAXED);
}

/* codes of the (P, C, Q) view of x, one scale per c. Returns 1 if any element is NaN or Inf
 * (x - x is NaN exactly for those), else 0. */
int zp_quantize_f32(const float *x, uint8_t *out, int64_t P, int64_t C, int64_t Q,
                    const float *scale, const float *zero_point, float qmin, float qmax,
                    int threads) {
  quantize_job j = {x, out, C, Q, scale, zero_point, NULL, NULL, qmin, qmax, 0.0f, 0};
  float *table = NULL;
  if (Q == 1) { /* the scale changes every element: reciprocals once, reused for every row */
    table = malloc(2 * C * sizeof(float)); /* C reciprocals, then C zero-points */
    int fast = table != NULL;
    float zlo = 0.0f, zhi = 0.0f;
    for (int64_t c = 0; fast && c < C; c++) {
      table[c] = reciprocal(scale[c]);
      table[C + c] = zero_point ? zero_point[c] : 0.0f;
      zlo = fminf(zlo, table[C + c]);
      zhi = fmaxf(zhi, table[C + c]);
      fast = !isnan(table[c]);
    }
    if (fast) {
      j.inv = table, j.zero = table + C;
      j.tie = tie_threshold(zlo, zhi, qmin, qmax);
    }
  }
  zp_parallel(threads, P * C * Q, GRAIN, quantize_range, &j);
  free(table);
  return j.bad;
}

typedef struct {
  const uint8_t *codes;
  int is_signed;
  float *out;
  int64_t C, Q;
  const float *scale, *zero_point;
} dequantize_job;

/* Codes are bytes; is_signed says whether they are int8 (symmetric) or uint8 (asymmetric). */
#define CODE(b) (is_signed ? (float)(int8_t)(b) : (float)(b))

static void dequantize_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const dequantize_job *j = ctx;
  const uint8_t *restrict codes = j->codes;
  float *restrict out = j->out;
  const float *zero_point = j->zero_point;
  const int is_signed = j->is_signed;
  for (int64_t i = begin; i < end;) {
    if (j->Q == 1) {
      const int64_t c = i % j->C, n = (i - c + j->C < end ? i - c + j->C : end) - i;
      const float *s = j->scale + c, *z = zero_point ? zero_point + c : NULL;
      for (int64_t k = 0; k < n; k++) out[i + k] = (CODE(codes[i + k]) - (z ? z[k] : 0.0f)) * s[k];
      i += n;
    } else {
      const int64_t block = i / j->Q, c = block % j->C;
      const int64_t stop = (block + 1) * j->Q < end ? (block + 1) * j->Q : end;
      const float s = j->scale[c], z = zero_point ? zero_point[c] : 0.0f;
      for (int64_t k = i; k < stop; k++) out[k] = (CODE(codes[k]) - z) * s;
      i = stop;
    }
  }
}

void zp_dequantize_f32(const uint8_t *codes, int is_signed, float *out, int64_t P, int64_t C,
                       int64_t Q, const float *scale, const float *zero_point, int threads) {
  dequantize_job j = {codes, is_signed, out, C, Q, scale, zero_point};
  zp_parallel(threads, P * C * Q, GRAIN, dequantize_range, &j);
}

/* Block minima and maxima.
 *
 * A min reduction vectorizes only if the compiler may ignore NaN and the sign of zero, so these
 * functions are compiled with finite-math-only and no-signed-zeros. That is safe here: NaN/Inf
 * are caught by an integer test of the exponent bits (which those flags cannot fold away) and
 * the caller then raises, and min(-0, +0) either way gives the same scale and zero-point. */
#define FINITE_MATH __attribute__((optimize("finite-math-only", "no-signed-zeros")))
#define NOT_FINITE(v, u) (memcpy(&(u), &(v), 4), ZP_INF_OR_NAN(u))
#define LANES 8

FINITE_MATH static void minmax_run(const float *x, int64_t n, float *lo, float *hi, uint32_t *bad) {
  float l[LANES], h[LANES];
  uint32_t b[LANES], u;
  for (int j = 0; j < LANES; j++) l[j] = INFINITY, h[j] = -INFINITY, b[j] = 0;
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; j++) { /* LANES independent minima: elementwise, vectorizable */
      float v = x[i + j];
      b[j] |= NOT_FINITE(v, u);
      l[j] = v < l[j] ? v : l[j];
      h[j] = v > h[j] ? v : h[j];
    }
  for (; i < n; i++) {
    float v = x[i];
    b[0] |= NOT_FINITE(v, u);
    l[0] = v < l[0] ? v : l[0];
    h[0] = v > h[0] ? v : h[0];
  }
  for (int j = 0; j < LANES; j++) {
    *lo = l[j] < *lo ? l[j] : *lo;
    *hi = h[j] > *hi ? h[j] : *hi;
    *bad |= b[j];
  }
}

typedef struct {
  const float *x;
  int64_t C, Q;
  float *lo, *hi; /* C entries each; with `fold`, one such pair per thread, side by side */
  int fold;       /* 1: blocks span ranges, so each range folds into its thread's partials */
  uint32_t bad;   /* atomic */
} minmax_job;

FINITE_MATH static void minmax_range(void *ctx, int64_t begin, int64_t end, int thread) {
  minmax_job *j = ctx;
  float *lo = j->lo + (j->fold ? thread * j->C : 0), *hi = j->hi + (j->fold ? thread * j->C : 0);
  uint32_t bad = 0, u;
  for (int64_t i = begin; i < end;) {
    if (j->Q == 1) { /* one element per block in this row: elementwise across c */
      const int64_t c = i % j->C, n = (i - c + j->C < end ? i - c + j->C : end) - i;
      const float *xi = j->x + i;
      float *l = lo + c, *h = hi + c;
      for (int64_t k = 0; k < n; k++) {
        float v = xi[k];
        bad |= NOT_FINITE(v, u);
        l[k] = !j->fold || v < l[k] ? v : l[k];
        h[k] = !j->fold || v > h[k] ? v : h[k];
      }
      i += n;
    } else {
      const int64_t block = i / j->Q, c = block % j->C;
      const int64_t stop = (block + 1) * j->Q < end ? (block + 1) * j->Q : end;
      float l = INFINITY, h = -INFINITY;
      minmax_run(j->x + i, stop - i, &l, &h, &bad);
      lo[c] = !j->fold || l < lo[c] ? l : lo[c];
      hi[c] = !j->fold || h > hi[c] ? h : hi[c];
      i = stop;
    }
  }
  if (bad) __atomic_store_n(&j->bad, 1, __ATOMIC_RELAXED);
}

/* lo[c], hi[c] = min and max over (P, Q) of the (P, C, Q) view x[:, c, :]. Returns 1 on
 * NaN/Inf, and -1 when out of memory. */
FINITE_MATH int zp_minmax_f32(const float *x, int64_t P, int64_t C, int64_t Q, float *lo, float *hi,
                              int threads) {
  /* Ranges are whole numbers of blocks when a block fits in one (Q <= GRAIN) and each block
   * holds one run of the data (P == 1): each block is then seen by one range, which writes its
   * result. Otherwise every thread folds into partials of its own, merged at the end. */
  const int64_t grain = Q > 1 && Q <= GRAIN ? GRAIN / Q * Q : GRAIN;
  const int fold = P > 1 || Q > grain;
  if (threads < 1) threads = 1;
  float *parts = NULL;
  if (fold) {
    parts = malloc(2 * threads * C * sizeof(float));
    if (!parts) return -1;
    for (int64_t k = 0; k < threads * C; k++) parts[k] = INFINITY, parts[threads * C + k] = -INFINITY;
  }
  minmax_job j = {x, C, Q, fold ? parts : lo, fold ? parts + threads * C : hi, fold, 0};
  zp_parallel(threads, P * C * Q, grain, minmax_range, &j);
  if (fold) {
    for (int64_t c = 0; c < C; c++) lo[c] = INFINITY, hi[c] = -INFINITY;
    for (int t = 0; t < threads; t++)
      for (int64_t c = 0; c < C; c++) {
        lo[c] = fminf(lo[c], j.lo[t * C + c]);
        hi[c] = fmaxf(hi[c], j.hi[t * C + c]);
      }
    free(parts);
  }
  return j.bad != 0;
}
