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

static void fit_block(const fit_job *j, int64_t b) {
  const float *x = j->x + b * j->n;
  const int64_t n = j->n;
  float lo = x[0], hi = x[0];
  double sx = 0, sxx = 0;
  for (int64_t i = 0; i < n; i++) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    sx += x[i];
    sxx += (double)x[i] * x[i];
  }
  if (!(hi > lo)) return; /* a constant block: min/max is exact */
  const float top = j->qmax - j->qmin;
  double best_err = INFINITY;
  float best_s = 0, best_m = 0;
  for (int k = 0; k < j->nsteps; k++) {
    float inv = j->steps[k] / (hi - lo);
    double sl = 0, sll = 0, sxl = 0;
    for (int64_t i = 0; i < n; i++) {
      float l = nearbyintf((x[i] - lo) * inv);
      l = l < 0 ? 0 : l > top ? top : l;
      sl += l, sll += (double)l * l, sxl += (double)x[i] * l;
    }
    double det = n * sll - sl * sl;
    if (!(det > 0)) continue;
    double s = stored((n * sxl - sx * sl) / det, j->half);
    double m = stored((sll * sx - sl * sxl) / det, j->half);
    if (!(s > 0)) continue;
    /* The error of these codes under the stored (s, m), from the sums. */
    double err = s * s * sll + 2 * s * m * sl - 2 * s * sxl + n * m * m - 2 * m * sx + sxx;
    if (err < best_err) best_err = err, best_s = (float)s, best_m = (float)m;
  }
  if (!(best_err < INFINITY)) return;
  float z = j->qmin - best_m / best_s;
  double have = round_trip_error(x, n, j->scale[b], j->zero[b], j->qmin, j->qmax);
  if (round_trip_error(x, n, best_s, z, j->qmin, j->qmax) < have) {
    j->scale[b] = best_s;
    j->zero[b] = z;
  }
}

static void fit_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  for (int64_t b = begin; b < end; b++) fit_block((const fit_job *)ctx, b);
}

int zp_fit_float_min(const float *x, int64_t blocks, int64_t n, int qmin, int qmax,
                     const float *steps, int nsteps, int half, float *scale, float *zero,
                     int threads) {
  if (n < 1 || n > FIT_MAX_N || blocks < 0 || nsteps < 0) return -1;
  fit_job j = {x, n, (float)qmin, (float)qmax, steps, nsteps, half, scale, zero};
  zp_parallel(threads < 1 ? 1 : threads, blocks, 256, fit_range, &j);
  return 0;
}
