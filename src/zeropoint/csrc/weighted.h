/* The scale searches of importance-weighted quantization (llama-quantize --imatrix), shared by
 * the weighted legacy blocks (legacy.c), K-quant super-blocks (kquants.c) and the i-quants
 * (iquants.c). Internal: static inline, nothing here is exported.
 *
 * Each search is one of ggml-quants.c's, with the weights it is handed (importance times a
 * magnitude term the caller forms), for one run of n values. Their float32 arithmetic is the
 * reference's, operation for operation: every product rounded on its own (the including file
 * turns fp contraction off), sums in element order, int codes converted to float where the
 * reference converts them, and uint8 codes wrapping where the reference stores a negative int
 * into a uint8. What each one chooses:
 *
 *   weighted_signed_search (make_qx_quants, rmse_type 1, given weights): levels
 *       -nmax..nmax-1 and one scale: the grid with the largest |x| on level -nmax and 18 grids
 *       around it, keeping the largest weighted least-squares gain sum(wxl)^2 / sum(wll).
 *   weighted_min_search (make_qkx3_quants, rmin -0.9, rdelta 0.05, 37 steps, squared error):
 *       codes 0..nmax with a scale and a min, refit by weighted least squares per grid.
 *   weighted_positive_search (make_qp_quants): codes 0..nmax of non-negative values (sub-block
 *       scales or mins) with one scale: 9 grids by weighted squared error, then greedy
 *       one-value moves, up to 5 passes.
 */
#ifndef ZP_WEIGHTED_H
#define ZP_WEIGHTED_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ZP_GROUP_MAX_EPS 1e-15f /* ggml's "all zero" threshold on max |x| */

/* ggml's nearest_int: round half to even by the magic add (low mantissa bits out of range). */
static inline int32_t zp_nearest_int(float v) {
  float t = v + 12582912.f;
  int32_t i;
  memcpy(&i, &t, 4);
  return (i & 0x7fffff) - 0x400000;
}

static inline int32_t zp_clamp(int32_t v, int32_t lo, int32_t hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

/* Levels of x * iscale on -nmax..nmax-1 (stored + nmax in L when L is given), and the sums
 * sum(w x l), sum(w l l) in element order. */
static inline void weighted_signed_trial(int n, int nmax, const float *x, const float *w,
                                         float iscale, int8_t *L, float *sumlx, float *suml2) {
  float a = 0, b = 0;
  for (int i = 0; i < n; i++) {
    int32_t l = zp_clamp(zp_nearest_int(iscale * x[i]), -nmax, nmax - 1);
    if (L) L[i] = (int8_t)(l + nmax);
    a += w[i] * x[i] * (float)l;
    b += w[i] * (float)l * (float)l;
  }
  *sumlx = a, *suml2 = b;
}

/* make_qx_quants with weights: L gets level + nmax (0..2*nmax-1); returns the scale. An
 * all-zero run gets codes 0 and scale 0. */
static inline float weighted_signed_search(int n, int nmax, const float *x, const float *w,
                                           int8_t *L) {
  float amax = 0, max = 0;
  for (int i = 0; i < n; i++)
    if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
  if (amax < ZP_GROUP_MAX_EPS) {
    memset(L, 0, (size_t)n);
    return 0.f;
  }
  float sumlx, suml2;
  weighted_signed_trial(n, nmax, x, w, (float)-nmax / max, L, &sumlx, &suml2);
  float scale = suml2 != 0 ? sumlx / suml2 : 0.f, best = scale * sumlx;
  for (int s = -9; s <= 9; s++) {
    if (s == 0) continue;
    float iscale = -((float)nmax + 0.1f * (float)s) / max;
    weighted_signed_trial(n, nmax, x, w, iscale, NULL, &sumlx, &suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      weighted_signed_trial(n, nmax, x, w, iscale, L, &sumlx, &suml2); /* same sums again */
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

/* sum_i w_i (scale * L_i + min - x_i)^2 in element order. */
static inline float weighted_min_error(int n, const float *x, const float *w, const uint8_t *L,
                              float scale, float min) {
  float err = 0;
  for (int i = 0; i < n; i++) {
    float diff = scale * (float)L[i] + min - x[i];
    err += w[i] * (diff * diff);
  }
  return err;
}

/* make_qkx3_quants with weights, as every weighted caller runs it (rmin -0.9, rdelta 0.05,
 * 36 steps, squared error): L gets codes 0..nmax; returns the scale, *neg_min the min negated
 * (x ~ scale * L - *neg_min). */
static inline float weighted_min_search(int n, int nmax, const float *x, const float *w, uint8_t *L,
                               float *neg_min) {
  float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; i++) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max <= min) {
    memset(L, 0, (size_t)n);
    *neg_min = -min;
    return 0.f;
  }
  float iscale = (float)nmax / (max - min), scale = 1 / iscale;
  for (int i = 0; i < n; i++)
    L[i] = (uint8_t)zp_clamp(zp_nearest_int(iscale * (x[i] - min)), 0, nmax);
  float best = weighted_min_error(n, x, w, L, scale, min);
  uint8_t trial[32];
  for (int s = 0; s <= 36; s++) {
    iscale = (-0.9f + 0.05f * (float)s + (float)nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; i++) {
      int32_t l = zp_clamp(zp_nearest_int(iscale * (x[i] - min)), 0, nmax);
      trial[i] = (uint8_t)l;
      sum_l += w[i] * (float)l;
      sum_l2 += w[i] * (float)l * (float)l;
      sum_xl += w[i] * (float)l * x[i];
    }
    float det = sum_w * sum_l2 - sum_l * sum_l;
    if (!(det > 0)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (this_min > 0) {
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    float err = weighted_min_error(n, x, w, trial, this_scale, this_min);
    if (err < best) {
      memcpy(L, trial, (size_t)n);
      best = err, scale = this_scale, min = this_min;
    }
  }
  *neg_min = -min;
  return scale;
}

/* make_qp_quants: codes L (0..nmax, or a negative int wrapped into the uint8 as the reference
 * stores it) of n non-negative values x under weights w; returns the scale. */
static inline float weighted_positive_search(int n, int nmax, const float *x, const float *w,
                                    uint8_t *L) {
  float max = 0;
  for (int i = 0; i < n; i++) max = max > x[i] ? max : x[i];
  if (max < ZP_GROUP_MAX_EPS) {
    memset(L, 0, (size_t)n);
    return 0.f;
  }
  float iscale = (float)nmax / max, scale = 1 / iscale, best = 0;
  for (int i = 0; i < n; i++) {
    L[i] = (uint8_t)zp_nearest_int(iscale * x[i]);
    float diff = x[i] - scale * (float)L[i];
    best += w[i] * diff * diff;
  }
  for (int s = -4; s <= 4; s++) {
    if (s == 0) continue;
    float is = (0.1f * (float)s + (float)nmax) / max, sc = 1 / is, err = 0;
    for (int i = 0; i < n; i++) {
      int32_t l = zp_nearest_int(is * x[i]);
      l = l < nmax ? l : nmax;
      float diff = x[i] - sc * (float)l;
      err += w[i] * diff * diff;
    }
    if (err < best) best = err, iscale = is;
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; i++) {
    int32_t l = zp_nearest_int(iscale * x[i]);
    l = l < nmax ? l : nmax;
    L[i] = (uint8_t)l;
    sumlx += w[i] * x[i] * (float)l; /* the int, before the uint8 store wraps it */
    suml2 += w[i] * (float)l * (float)l;
  }
  for (int pass = 0; pass < 5; pass++) {
    int changed = 0;
    for (int i = 0; i < n; i++) {
      float old = (float)L[i];
      float slx = sumlx - w[i] * x[i] * old, sl2 = suml2 - w[i] * old * old;
      if (!(slx > 0 && sl2 > 0)) continue;
      int32_t l = zp_nearest_int(x[i] * sl2 / slx);
      l = l < nmax ? l : nmax;
      if (l == (int32_t)L[i]) continue;
      slx += w[i] * x[i] * (float)l;
      sl2 += w[i] * (float)l * (float)l;
      if (slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = (uint8_t)l, sumlx = slx, suml2 = sl2;
        changed++;
      }
    }
    if (!changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* The work of one weighted quantize call, split by rows over the threads (parallel.h). */
typedef struct {
  int type;
  const float *x, *importance; /* x: rows of n_per_row; importance: n_per_row */
  int64_t n_per_row;
  uint8_t *y;
} weighted_job;

#endif
