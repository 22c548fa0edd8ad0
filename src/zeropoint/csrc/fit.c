/* Least-squares scale and minimum for float-zero-point blocks (x = s * l + m, ggml's Q4_1 form);
 * calibrate/fit.py describes the search and holds its parameters.
 *
 * Per block of n values: a few grids of steps[k] steps laid over [lo, hi] give codes l; the
 * scale and minimum that fit those codes best in least squares are rounded as stored (float16
 * or float32) and scored by their squared error with those codes. The best refit then replaces
 * the caller's min/max scale and zero-point only if its quantize-dequantize round trip, computed
 * exactly as core.quantize and core.dequantize do it (q = clamp(round(x / s + z)),
 * x' = (q - z) * s, float32, z = qmin - m / s), has the smaller squared error. No fast-math: the
 * round trip must be the eager path's operation for operation.
 */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stdint.h>

#include "common.h"
#include "parallel.h"
#include "zeropoint.h"

#define FIT_MAX_N 256 /* values per block this kernel takes (a group) */

typedef struct {
  const float *x;
  int64_t n;
  float qmin, qmax;
  const float *steps;
  int nsteps, half;
  float *scale, *zero;
} fit_job;

static float stored(double v, int half) {
  float f = (float)v;
  return half ? half_to_float(half_bits(f)) : f;
}

/* Squared error of the round trip of n values under (s, z), in double. */
static double round_trip_error(const float *x, int64_t n, float s, float z, float qmin,
                               float qmax) {
  double err = 0;
  for (int64_t i = 0; i < n; i++) {
    float q = nearbyintf(x[i] / s + z);
    q = q < qmin ? qmin : q > qmax ? qmax : q;
    float d = (q - z) * s - x[i];
    err += (double)d * d;
  }
  return err;
}

#define LANES 8 /* blocks searched side by side: the inner loops run over them, and vectorize */
#define MAGIC 12582912.f /* 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 to even */
#pragma GCC diagnostic ignored "-Wpsabi" /* static functions: no ABI to keep */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

/* Blocks b0 .. b0 + LANES - 1 (the last real one repeated past `blocks`). */
static void fit_lanes(const fit_job *j, int64_t b0, int64_t blocks) {
  const int64_t n = j->n;
  const float top = j->qmax - j->qmin;
  vf xt[FIT_MAX_N]; /* element i of each lane's block: one vector per element */
  float lo[LANES], width[LANES];
  double sx[LANES], sxx[LANES], best_err[LANES];
  float best_s[LANES], best_m[LANES];
  for (int k = 0; k < LANES; k++) {
    const int64_t b = b0 + k < blocks ? b0 + k : blocks - 1;
    const float *x = j->x + b * n;
    float mn = x[0], mx = x[0];
    double a = 0, q = 0;
    for (int64_t i = 0; i < n; i++) {
      xt[i][k] = x[i];
      mn = x[i] < mn ? x[i] : mn;
      mx = x[i] > mx ? x[i] : mx;
      a += x[i];
      q += (double)x[i] * x[i];
    }
    lo[k] = mn, width[k] = mx - mn, sx[k] = a, sxx[k] = q;
    best_err[k] = INFINITY, best_s[k] = 0, best_m[k] = 0;
  }
  vf vlo, vtop = (vf){0} + top;
  for (int k = 0; k < LANES; k++) vlo[k] = lo[k];
  for (int t = 0; t < j->nsteps; t++) {
    /* Codes count from 0 here (l = code - qmin), so x = s * l + m. The sums of l and l^2 are
     * small integers, exact in float32; sum(x l) is the one rounded sum. */
    vf vinv, sl = {0}, sll = {0}, sxl = {0};
    for (int k = 0; k < LANES; k++) vinv[k] = width[k] > 0 ? j->steps[t] / width[k] : 0;
    for (int64_t i = 0; i < n; i++) {
      vf l = ((xt[i] - vlo) * vinv + MAGIC) - MAGIC;
      l = (vf)((vi)l & (vi)(l > 0)); /* below 0 (or -0): 0 */
      vi over = l > vtop;
      l = (vf)(((vi)vtop & over) | ((vi)l & ~over));
      sl += l, sll += l * l, sxl += xt[i] * l;
    }
    for (int k = 0; k < LANES; k++) {
      double det = n * (double)sll[k] - (double)sl[k] * sl[k];
      if (!(det > 0)) continue;
      double s = stored((n * (double)sxl[k] - sx[k] * sl[k]) / det, j->half);
      double m = stored(((double)sll[k] * sx[k] - sl[k] * (double)sxl[k]) / det, j->half);
      if (!(s > 0)) continue;
      /* The error of these codes under the stored (s, m), from the sums. */
      double err = s * s * sll[k] + 2 * s * m * sl[k] - 2 * s * sxl[k] + n * m * m
                   - 2 * m * sx[k] + sxx[k];
      if (err < best_err[k]) best_err[k] = err, best_s[k] = (float)s, best_m[k] = (float)m;
    }
  }
  for (int k = 0; k < LANES && b0 + k < blocks; k++) {
    const int64_t b = b0 + k;
    if (!(width[k] > 0) || !(best_err[k] < INFINITY)) continue; /* constant: min/max is exact */
    const float *x = j->x + b * n;
    float z = j->qmin - best_m[k] / best_s[k];
    double have = round_trip_error(x, n, j->scale[b], j->zero[b], j->qmin, j->qmax);
    if (round_trip_error(x, n, best_s[k], z, j->qmin, j->qmax) < have) {
      j->scale[b] = best_s[k];
      j->zero[b] = z;
    }
  }
}

typedef struct {
  const fit_job *job;
  int64_t blocks;
} lanes_job;

static void fit_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const lanes_job *l = ctx;
  for (int64_t g = begin; g < end; g++) fit_lanes(l->job, g * LANES, l->blocks);
}

int zp_fit_float_min(const float *x, int64_t blocks, int64_t n, int qmin, int qmax,
                     const float *steps, int nsteps, int half, float *scale, float *zero,
                     int threads) {
  if (n < 1 || n > FIT_MAX_N || blocks < 0 || nsteps < 0) return -1;
  fit_job j = {x, n, (float)qmin, (float)qmax, steps, nsteps, half, scale, zero};
  lanes_job l = {&j, blocks};
  zp_parallel(threads < 1 ? 1 : threads, (blocks + LANES - 1) / LANES, 64, fit_range, &l);
  return 0;
}
