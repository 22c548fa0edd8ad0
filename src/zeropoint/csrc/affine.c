/* Fused affine quantize / dequantize / block min-max for float32, one pass over memory.
 *
 * The data is viewed as (P, C, Q) with one scale per c: per-tensor is (1, 1, n), per-group
 * over the last axis (1, groups, group_size), per-channel over axis 0 (1, rows, cols) and over
 * the last axis (rows, cols, 1). The arithmetic is exactly the eager path's in core.py:
 * float32 division, round half to even (nearbyintf in the default rounding mode), integer
 * zero-point, clamp. No -ffast-math: the division must stay a correctly rounded division.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

/* Returns 1 if any element is NaN or Inf (x - x is NaN exactly for those), else 0. */
int zp_quantize_f32(const float *x, uint8_t *out, int64_t P, int64_t C, int64_t Q,
                    const float *scale, const float *zero_point, float qmin, float qmax) {
  int bad = 0;
  for (int64_t p = 0; p < P; p++) {
    const float *xp = x + p * C * Q;
    uint8_t *op = out + p * C * Q;
    if (Q == 1) { /* the scale changes every element: vectorize across c */
      for (int64_t c = 0; c < C; c++) {
        float v = xp[c];
        bad |= (v - v) != 0.0f;
        float q = nearbyintf(v / scale[c]) + (zero_point ? zero_point[c] : 0.0f);
        op[c] = (uint8_t)(int32_t)CLAMP(q, qmin, qmax);
      }
      continue;
    }
    for (int64_t c = 0; c < C; c++) {
      const float s = scale[c], z = zero_point ? zero_point[c] : 0.0f;
      const float *xc = xp + c * Q;
      uint8_t *oc = op + c * Q;
      for (int64_t i = 0; i < Q; i++) {
        float v = xc[i];
        bad |= (v - v) != 0.0f;
        float q = nearbyintf(v / s) + z;
        oc[i] = (uint8_t)(int32_t)CLAMP(q, qmin, qmax);
      }
    }
  }
  return bad;
}

/* Codes are bytes; is_signed says whether they are int8 (symmetric) or uint8 (asymmetric). */
#define CODE(b) (is_signed ? (float)(int8_t)(b) : (float)(b))
void zp_dequantize_f32(const uint8_t *codes, int is_signed, float *out, int64_t P, int64_t C,
                       int64_t Q, const float *scale, const float *zero_point) {
  for (int64_t p = 0; p < P; p++) {
    const uint8_t *cp = codes + p * C * Q;
    float *op = out + p * C * Q;
    if (Q == 1) {
      for (int64_t c = 0; c < C; c++)
        op[c] = (CODE(cp[c]) - (zero_point ? zero_point[c] : 0.0f)) * scale[c];
      continue;
    }
    for (int64_t c = 0; c < C; c++) {
      const float s = scale[c], z = zero_point ? zero_point[c] : 0.0f;
      for (int64_t i = 0; i < Q; i++) op[c * Q + i] = (CODE(cp[c * Q + i]) - z) * s;
    }
  }
}

/* lo[c], hi[c] = min and max over (P, Q) of x[:, c, :]. Returns 1 on NaN/Inf.
 *
 * A min reduction vectorizes only if the compiler may ignore NaN and the sign of zero, so these
 * functions are compiled with finite-math-only and no-signed-zeros. That is safe here: NaN/Inf
 * are caught by an integer test of the exponent bits (which those flags cannot fold away) and
 * the caller then raises, and min(-0, +0) either way gives the same scale and zero-point. */
#define FINITE_MATH __attribute__((optimize("finite-math-only", "no-signed-zeros")))
#define NOT_FINITE(v, u) (memcpy(&(u), &(v), 4), ((u) & 0x7f800000u) == 0x7f800000u)
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

FINITE_MATH int zp_minmax_f32(const float *x, int64_t P, int64_t C, int64_t Q, float *lo, float *hi) {
  uint32_t bad = 0, u;
  for (int64_t c = 0; c < C; c++) lo[c] = INFINITY, hi[c] = -INFINITY;
  for (int64_t p = 0; p < P; p++) {
    const float *xp = x + p * C * Q;
    if (Q == 1) { /* one element per block in this row: elementwise across c */
      for (int64_t c = 0; c < C; c++) {
        float v = xp[c];
        bad |= NOT_FINITE(v, u);
        lo[c] = v < lo[c] ? v : lo[c];
        hi[c] = v > hi[c] ? v : hi[c];
      }
      continue;
    }
    for (int64_t c = 0; c < C; c++) minmax_run(xp + c * Q, Q, lo + c, hi + c, &bad);
  }
  return bad != 0;
}
