/* ggml's i-quants (IQ1_S .. IQ4_XS): quantize and dequantize, bytes identical to llama.cpp's
 * quantize_iq* / dequantize_row_iq* (ggml-quants.c) with and without an importance matrix.
 *
 * Three kinds of code:
 * - IQ4_NL / IQ4_XS: each value is one of 16 non-uniform levels times a block scale; the scale is
 *   searched around the block's extreme value, weighted.
 * - IQ2_* / IQ3_*: groups of 8 (IQ2) or 4 (IQ3) magnitudes are one point of a codebook (a subset
 *   of a small lattice), signs stored apart. A value rounded off the codebook goes to the nearest
 *   codebook point among its precomputed neighbours (the lattice's map below).
 * - IQ1_S / IQ1_M: groups of 8 values in {-1, 0, 1} + a shift of +-1/8, a codebook of 2048 such
 *   points; each block's split into three levels is found exactly from sorted prefix sums.
 *
 * The codebooks are format data: zeropoint/gguf/iquants.py reads them from gguf-py and hands
 * them over once with zp_iq_set_grid, which builds each lattice's map and neighbour lists the
 * way ggml's iq2xs_init_impl / iq3xs_init_impl order them (ties by point number).
 *
 * The arithmetic is the reference's, operation for operation: float32, each product rounded on
 * its own, sums in element order (bit-exact results depend on it).
 */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "parallel.h"
#include "weighted.h"
#include "zeropoint.h"

#define QK ZP_QK_K
/* Inlined where dim is a constant, so that the loops over a group's coordinates unroll. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define MAX_LEVELS 8

static inline float maxf(float a, float b) { return a > b ? a : b; } /* ggml's MAX(a, b) */

static inline void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline void put_u32(uint8_t *p, uint32_t v) {
  for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> 8 * k);
}
static inline uint32_t get_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- the codebooks ---------------------------------------------------------------------- */

/* A codebook of points of `dim` coordinates, each one of a few levels l, searched as the odd
 * integers 2l+1. key(l_0..l_dim-1) = sum l_i << bits*i over the levels a rounding can give
 * (0..2 for IQ2/IQ1, 0..7 for IQ3): map[key] is the point's number when it is in the codebook,
 * else -(start + 1) of its neighbour list: a count, then the points at the `nwant` smallest
 * squared distances, nearest first, ties by point number. */
typedef struct {
  int dim, bits, n_points, nwant, n_keys, n_levels;
  int8_t level_value[MAX_LEVELS]; /* what dequantization multiplies: the codebook's own bytes */
  int8_t *coord;                  /* (n_points, dim): 2l+1 */
  uint8_t *level;                 /* (n_points, dim): l */
  uint16_t *point_key;            /* (n_points,): each point's key, its levels packed */
  int32_t *map;                   /* (n_keys,) */
  uint16_t *neighbours;
} lattice;

enum { L_IQ2_XXS, L_IQ2_XS, L_IQ2_S, L_IQ3_XXS, L_IQ3_S, L_IQ1_S, L_COUNT };
static lattice lattices[L_COUNT];
static int8_t iq4_values[16]; /* IQ4_NL / IQ4_XS levels, ascending */
static int iq4_ready;

static int lattice_index(int type) {
  switch (type) {
    case ZP_IQ2_XXS: return L_IQ2_XXS;
    case ZP_IQ2_XS: return L_IQ2_XS;
    case ZP_IQ2_S: return L_IQ2_S;
    case ZP_IQ3_XXS: return L_IQ3_XXS;
    case ZP_IQ3_S: return L_IQ3_S;
    case ZP_IQ1_S:
    case ZP_IQ1_M: return L_IQ1_S;
    default: return -1;
  }
}

/* Neighbours kept per key: every point at one of the nwant nearest distances (ggml's choice:
 * IQ2_S keeps one, IQ2_XXS/XS and IQ3_XXS two, IQ3_S and IQ1 three). */
static int lattice_nwant(int index) {
  return index == L_IQ2_S ? 1 : index == L_IQ3_S || index == L_IQ1_S ? 3 : 2;
}

static void lattice_free(lattice *g) {
  free(g->coord), free(g->level), free(g->point_key), free(g->map), free(g->neighbours);
  g->coord = NULL, g->level = NULL, g->point_key = NULL, g->map = NULL, g->neighbours = NULL;
}

static int point_key(const lattice *g, const int8_t *coord) {
  int key = 0;
  for (int i = 0; i < g->dim; i++) key |= ((coord[i] - 1) / 2) << g->bits * i;
  return key;
}

/* The neighbour lists of every key not in the codebook. */
static int build_neighbours(lattice *g) {
  int64_t cap = 1 << 16, used = 0;
  uint16_t *list = malloc(cap * sizeof(uint16_t));
  int *d2 = malloc(g->n_points * sizeof(int));
  if (!list || !d2) goto fail;
  int8_t pos[8];
  const int mask = (1 << g->bits) - 1;
  for (int key = 0; key < g->n_keys; key++) {
    if (g->map[key] >= 0) continue;
    for (int i = 0; i < g->dim; i++) pos[i] = (int8_t)(2 * ((key >> g->bits * i) & mask) + 1);
    int nearest_d2[3], n_have = 0; /* the nwant smallest distinct distances, ascending */
    for (int j = 0; j < g->n_points; j++) {
      int d = 0;
      for (int i = 0; i < g->dim; i++) {
        const int diff = g->coord[j * g->dim + i] - pos[i];
        d += diff * diff;
      }
      d2[j] = d;
      int at = n_have;
      while (at > 0 && nearest_d2[at - 1] > d) at--;
      if ((at > 0 && nearest_d2[at - 1] == d) || at >= g->nwant) continue;
      if (n_have < g->nwant) n_have++;
      for (int m = n_have - 1; m > at; m--) nearest_d2[m] = nearest_d2[m - 1];
      nearest_d2[at] = d;
    }
    if (used + 1 + g->n_points > cap) {
      cap = 2 * cap + g->n_points;
      uint16_t *grown = realloc(list, cap * sizeof(uint16_t));
      if (!grown) goto fail;
      list = grown;
    }
    const int64_t start = used++;
    for (int m = 0; m < n_have; m++)
      for (int j = 0; j < g->n_points; j++)
        if (d2[j] == nearest_d2[m]) list[used++] = (uint16_t)j;
    list[start] = (uint16_t)(used - start - 1);
    g->map[key] = (int32_t)(-(start + 1));
  }
  free(d2);
  g->neighbours = list;
  return 0;
fail:
  free(list), free(d2);
  return -1;
}

int zp_iq_set_grid(int type, const uint8_t *levels, int n_points, const int8_t *level_values,
                   int n_levels) {
  if (type == ZP_IQ4_NL || type == ZP_IQ4_XS) {
    if (n_levels != 16) return -1;
    memcpy(iq4_values, level_values, 16);
    iq4_ready = 1;
    return 0;
  }
  const int index = lattice_index(type);
  if (index < 0) return -2;
  lattice *g = &lattices[index];
  if (g->neighbours) return 0; /* set before (IQ1_M shares IQ1_S's) */
  const int dim = index == L_IQ3_XXS || index == L_IQ3_S ? 4 : 8;
  if (n_levels < 2 || n_levels > MAX_LEVELS || n_points < 1 || n_points > 65535) return -1;
  g->dim = dim, g->bits = dim == 4 ? 3 : 2, g->n_points = n_points, g->n_levels = n_levels;
  g->nwant = lattice_nwant(index);
  /* Roundings give levels 0..2 on a 2-bit lattice (ggml's 43692 keys), 0..7 on a 3-bit one. */
  g->n_keys = dim == 4 ? 1 << 12 : 0xAAAA + 1;
  memcpy(g->level_value, level_values, n_levels);
  g->coord = malloc((size_t)n_points * dim);
  g->level = malloc((size_t)n_points * dim);
  g->point_key = malloc(n_points * sizeof(uint16_t));
  g->map = malloc(g->n_keys * sizeof(int32_t));
  if (!g->coord || !g->level || !g->point_key || !g->map) goto fail;
  for (int k = 0; k < g->n_keys; k++) g->map[k] = -1;
  for (int j = 0; j < n_points; j++) {
    for (int i = 0; i < dim; i++) {
      const int l = levels[j * dim + i];
      if (l >= n_levels || l >= (1 << g->bits)) goto bad;
      g->coord[j * dim + i] = (int8_t)(2 * l + 1);
      g->level[j * dim + i] = (uint8_t)l;
    }
    const int key = point_key(g, g->coord + j * dim);
    if (key >= g->n_keys) goto bad;
    g->map[key] = j;
    g->point_key[j] = (uint16_t)key;
  }
  if (build_neighbours(g)) goto fail;
  return 0;
bad:
  lattice_free(g);
  return -1;
fail:
  lattice_free(g);
  return -3;
}

/* The index of the smallest of a neighbour list's weighted distances, sum_i term[i][level_i]
 * in coordinate order; ties keep the first listed. Each term is the float the reference
 * computes inside its loop, w_i * (scale q - x_i)^2, made once per (coordinate, level) instead
 * of once per neighbour: the same values summed in the same order, so the same sums. */
ALWAYS_INLINE int nearest_listed(const lattice *g, const uint16_t *list, const float *term,
                                int dim) {
  const int bits = dim == 8 ? 2 : 3, mask = (1 << bits) - 1;
  float best_d2 = FLT_MAX;
  int best = -1;
  for (int n = 1; n <= list[0]; n++) {
    const unsigned key = g->point_key[list[n]]; /* one load for all its levels */
    float d2 = 0;
    for (int i = 0; i < dim; i++) d2 += term[i * MAX_LEVELS + ((key >> bits * i) & mask)];
    if (d2 < best_d2) best_d2 = d2, best = list[n];
  }
  return best;
}

/* The codebook point among key's neighbours nearest to scale * point (weighted), its levels
 * written to L. */
ALWAYS_INLINE int best_neighbour(const lattice *g, int key, const float *xval,
                                const float *weight, float scale, int8_t *L, int dim) {
  const uint16_t *list = g->neighbours - g->map[key] - 1;
  int best = -1;
  if (list[0] <= g->n_levels) { /* a short list: the terms are cheaper made where used */
    float best_d2 = FLT_MAX;
    for (int n = 1; n <= list[0]; n++) {
      const int8_t *pg = g->coord + list[n] * dim;
      float d2 = 0;
      for (int i = 0; i < dim; i++) {
        const float diff = scale * (float)pg[i] - xval[i];
        d2 += weight[i] * diff * diff;
      }
      if (d2 < best_d2) best_d2 = d2, best = list[n];
    }
  } else {
    float term[8 * MAX_LEVELS];
    for (int i = 0; i < dim; i++) {
      for (int l = 0; l < g->n_levels; l++) {
        const float diff = scale * (float)(2 * l + 1) - xval[i];
        term[i * MAX_LEVELS + l] = weight[i] * diff * diff;
      }
    }
    best = nearest_listed(g, list, term, dim);
  }
  if (best < 0) best = list[1]; /* every distance overflowed: the reference's first */
  const uint8_t *lv = g->level + best * dim;
  for (int i = 0; i < dim; i++) L[i] = (int8_t)lv[i];
  return best;
}

/* Round xval / scale to levels 0..kmax-1 in each group of L's block, then onto the codebook
 * (exact when the rounding is a codebook point; else its best neighbour). Returns a bit per group
 * that was on the codebook, for the groups in `which` (a bit mask). */
ALWAYS_INLINE uint32_t round_groups(const lattice *g, int dim, int n, int kmax, float id,
                                   float scale, const float *xval, const float *waux, int8_t *L,
                                   uint32_t which) {
  const int bits = dim == 8 ? 2 : 3;
  uint32_t on_grid = 0;
  for (int k = 0; k < n / dim; k++) {
    if (!(which >> k & 1)) continue;
    int key = 0;
    for (int i = 0; i < dim; i++) {
      const int l = zp_clamp(zp_nearest_int(0.5f * (id * xval[dim * k + i] - 1)), 0, kmax - 1);
      L[dim * k + i] = (int8_t)l;
      key |= l << bits * i;
    }
    if (g->map[key] >= 0) {
      on_grid |= 1u << k;
    } else {
      best_neighbour(g, key, xval + dim * k, waux + dim * k, scale, L + dim * k, dim);
    }
  }
  return on_grid;
}

/* sum w x q and sum w q q over the block, q = 2L+1. */
static void odd_sums(int n, const float *weight, const float *xval, const int8_t *L,
                     float *sumqx, float *sumq2) {
  float qx = 0, q2 = 0;
  for (int i = 0; i < n; i++) {
    const float w = weight[i], q = (float)(2 * L[i] + 1);
    qx += w * xval[i] * q;
    q2 += w * q * q;
  }
  *sumqx = qx, *sumq2 = q2;
}

/* ---- IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: one search, five packings ---- */

typedef struct {
  int block;         /* values per scale: 16 or 32 */
  int kmax;          /* levels per coordinate: 3 (IQ2) or 8 (IQ3) */
  int steps;         /* the scale search tries (2 kmax - 1 + is * step) / max, |is| <= steps */
  float step;
  float sigma_factor; /* sigma2 = factor * sum x^2 / 256 */
  float eps;          /* a block whose largest magnitude is below eps (or 0) is zero */
  int even_signs;     /* 7 sign bits per 8 values: an odd count of negatives gives up the least
                         important one */
  int plain_weight_sigma; /* without importance: weight = sigma2/4 + x^2 (IQ2_S), else x^2 */
  int start_on_grid;      /* the search's initial "every group on the codebook" (not IQ3_S) */
  int refine_all;         /* the final rounding redoes every group, not only those off it */
  int qp_start;           /* IQ2_XXS: the search is centred on make_qp_quants' scale */
  float d_fudge;          /* the super-block scale is stored times this */
} lattice_params;

static const lattice_params P_IQ2_XXS = {
    .block = 32, .kmax = 3, .steps = 6, .step = 0.1f, .sigma_factor = 1, .eps = 1e-15f,
    .even_signs = 1, .start_on_grid = 1, .refine_all = 1, .qp_start = 1, .d_fudge = 1.0f};
static const lattice_params P_IQ2_XS = {
    .block = 16, .kmax = 3, .steps = 9, .step = 0.1f, .sigma_factor = 1, .eps = 1e-15f,
    .even_signs = 1, .start_on_grid = 1, .d_fudge = 1.0f};
static const lattice_params P_IQ2_S = {
    .block = 16, .kmax = 3, .steps = 9, .step = 0.1f, .sigma_factor = 2, .eps = 1e-8f,
    .plain_weight_sigma = 1, .start_on_grid = 1, .d_fudge = 0.9875f};
static const lattice_params P_IQ3_XXS = {
    .block = 32, .kmax = 8, .steps = 15, .step = 0.2f, .sigma_factor = 2, .eps = 1e-8f,
    .even_signs = 1, .start_on_grid = 1, .d_fudge = 1.0125f};
static const lattice_params P_IQ3_S = {
    .block = 32, .kmax = 8, .steps = 9, .step = 0.2f, .sigma_factor = 2, .eps = 0.0f,
    .refine_all = 1, .d_fudge = 1.033f};

/* One block: its scale (>= 0), its codebook points (`index`, one per group) and its signs (a
 * byte per 8 values). */
ALWAYS_INLINE float lattice_block(const lattice *g, int dim, const lattice_params *p,
                                  const float *xb, const float *qw, float sigma2,
                                  uint16_t *index, uint8_t *signs) {
  const int n = p->block, groups = n / dim, bits = dim == 8 ? 2 : 3;
  float weight[32], waux[32], xval[32];
  int8_t L[32], Laux[32];
  for (int i = 0; i < n; i++) {
    weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i])
                   : p->plain_weight_sigma ? 0.25f * sigma2 + xb[i] * xb[i] : xb[i] * xb[i];
  }
  for (int i = 0; i < n; i++) waux[i] = sqrtf(weight[i]);
  for (int k = 0; k < n / 8; k++) {
    int flips = 0;
    uint8_t s = 0;
    for (int i = 0; i < 8; i++) {
      const float v = xb[8 * k + i];
      if (v >= 0) {
        xval[8 * k + i] = v;
      } else {
        xval[8 * k + i] = -v, flips++, s |= (uint8_t)(1 << i);
      }
    }
    if (p->even_signs) {
      if (flips % 2) { /* the sign nobody will miss: smallest weight * x^2 */
        int imin = 0;
        float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
        for (int i = 1; i < 8; i++) {
          const float a = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
          if (a < min) min = a, imin = i;
        }
        xval[8 * k + imin] = -xval[8 * k + imin];
        s ^= (uint8_t)(1 << imin);
      }
      s &= 127;
    }
    signs[k] = s;
  }
  memset(index, 0, groups * sizeof(uint16_t));
  float max = xval[0];
  for (int i = 1; i < n; i++) max = maxf(max, xval[i]);
  if (max < p->eps || max == 0) {
    memset(signs, 0, n / 8);
    return 0;
  }
  const int kmax = p->kmax;
  const uint32_t all = (1u << groups) - 1;
  float scale, centre, best = 0;
  memset(L, 0, n);
  if (p->qp_start) {
    /* levels 0..3: ggml's kMaxQ+1 */
    scale = weighted_positive_search(n, kmax + 1, xval, weight, (uint8_t *)L);
    centre = scale * (float)kmax;
    if (centre <= 0) {
      memset(signs, 0, n / 8);
      return 0;
    }
  } else {
    scale = max / (float)(2 * kmax - 1);
    centre = max;
  }
  uint32_t on_grid = p->start_on_grid ? all : 0;
  for (int is = -p->steps; is <= p->steps; is++) {
    const float id = ((float)(2 * kmax - 1) + (float)is * p->step) / centre;
    const uint32_t aux_on = round_groups(g, dim, n, kmax, id, 1 / id, xval, waux, Laux, all);
    float sumqx, sumq2;
    odd_sums(n, weight, xval, Laux, &sumqx, &sumq2);
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      scale = sumqx / sumq2, best = scale * sumqx;
      memcpy(L, Laux, n);
      on_grid = aux_on;
    }
  }
  if ((p->qp_start || on_grid != all) && scale > 0) {
    round_groups(g, dim, n, kmax, 1 / scale, scale, xval, waux, L,
        p->refine_all ? all : ~on_grid & all);
    float sumqx, sumq2;
    odd_sums(n, weight, xval, L, &sumqx, &sumq2);
    if (sumq2 > 0) scale = sumqx / sumq2;
  }
  if (scale < 0) { /* never seen; the reference flips the signs to keep the scale unsigned */
    scale = -scale;
    for (int k = 0; k < n / 8; k++) {
      signs[k] = (uint8_t)(p->even_signs ? ~signs[k] & 127 : ~signs[k]);
    }
  }
  for (int k = 0; k < groups; k++) {
    int key = 0;
    for (int i = 0; i < dim; i++) key |= L[dim * k + i] << bits * i;
    index[k] = (uint16_t)g->map[key]; /* every L above is a codebook point */
  }
  return scale;
}

/* One super-block of 256 values into y. */
static void lattice_super(int type, const float *x, const float *qw, uint8_t *y) {
  const lattice *g = &lattices[lattice_index(type)];
  const lattice_params *p = type == ZP_IQ2_XXS ? &P_IQ2_XXS : type == ZP_IQ2_XS ? &P_IQ2_XS
                            : type == ZP_IQ2_S ? &P_IQ2_S : type == ZP_IQ3_XXS ? &P_IQ3_XXS
                                               : &P_IQ3_S;
  const int bytes = (int)zp_type_bytes(type), n_blocks = QK / p->block;
  memset(y, 0, bytes);
  float sumx2 = 0;
  for (int i = 0; i < QK; i++) sumx2 += x[i] * x[i];
  const float sigma2 = p->sigma_factor * sumx2 / QK;
  float scales[QK / 16], max_scale = 0;
  uint16_t index[8];
  uint8_t signs[4];
  for (int ib = 0; ib < n_blocks; ib++) {
    const int at = ib * p->block;
    const float *w = qw ? qw + at : NULL; /* dim as a constant: loops unroll */
    const float s = g->dim == 8 ? lattice_block(g, 8, p, x + at, w, sigma2, index, signs)
                                : lattice_block(g, 4, p, x + at, w, sigma2, index, signs);
    scales[ib] = s;
    max_scale = maxf(max_scale, s);
    uint8_t *q = y + 2;
    switch (type) {
      case ZP_IQ2_XXS:
        put_u32(q + 8 * ib,
            index[0] | index[1] << 8 | (uint32_t)index[2] << 16 | (uint32_t)index[3] << 24);
        put_u32(q + 8 * ib + 4,
            signs[0] | signs[1] << 7 | signs[2] << 14 | (uint32_t)signs[3] << 21);
        break;
      case ZP_IQ2_XS:
        for (int k = 0; k < 2; k++) put_u16(q + 4 * ib + 2 * k,
            (uint16_t)(index[k] | signs[k] << 9));
        break;
      case ZP_IQ2_S:
        for (int k = 0; k < 2; k++) {
          const int i8 = 2 * ib + k;
          q[i8] = (uint8_t)index[k];
          q[64 + i8 / 4] |= (uint8_t)((index[k] >> 8) << 2 * (i8 % 4));
          q[QK / 8 + i8] = signs[k];
        }
        break;
      case ZP_IQ3_XXS:
        for (int k = 0; k < 8; k++) q[8 * ib + k] = (uint8_t)index[k];
        put_u32(q + 64 + 4 * ib,
            signs[0] | signs[1] << 7 | signs[2] << 14 | (uint32_t)signs[3] << 21);
        break;
      default: /* IQ3_S: qs[64], qh[8], signs[32], scales[4] */
        for (int k = 0; k < 8; k++) {
          q[8 * ib + k] = (uint8_t)index[k];
          q[64 + ib] |= (uint8_t)((index[k] >> 8) << k);
        }
        memcpy(q + 72 + 4 * ib, signs, 4);
        break;
    }
  }
  if (!max_scale) {
    memset(y, 0, bytes);
    return;
  }
  const float d = max_scale / 31, id = 1 / d;
  put_half(y, d * p->d_fudge);
  for (int ib = 0; ib < n_blocks; ib++) {
    const uint32_t l = (uint32_t)zp_clamp(zp_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
    uint8_t *q = y + 2;
    switch (type) {
      case ZP_IQ2_XXS: put_u32(q + 8 * ib + 4, get_u32(q + 8 * ib + 4) | l << 28); break;
      case ZP_IQ3_XXS: put_u32(q + 64 + 4 * ib, get_u32(q + 64 + 4 * ib) | l << 28); break;
      case ZP_IQ2_XS: q[64 + ib / 2] |= (uint8_t)(l << 4 * (ib % 2)); break;
      case ZP_IQ2_S: q[72 + ib / 2] |= (uint8_t)(l << 4 * (ib % 2)); break;
      default: q[104 + ib / 2] |= (uint8_t)(l << 4 * (ib % 2)); break;
    }
  }
}

/* ---- IQ1_S, IQ1_M ---- */

#define IQ1_DELTA 0.125f

typedef struct {
  float x;
  int32_t i;
} ranked; /* the reference sorts these (value, position) pairs with libc's qsort */

static int by_value(const void *a, const void *b) {
  const float l = *(const float *)a, r = *(const float *)b;
  return l < r ? -1 : l > r ? 1 : 0;
}

/* The codebook point among key's neighbours nearest to scale * xx[level] (weighted). None is
 * found only when every distance overflows; then the whole codebook is searched. */
static int iq1_neighbour(const lattice *g, int key, const float *xval, const float *weight,
                         float scale, const float *xx, int8_t *L) {
  float term[8 * MAX_LEVELS];
  for (int i = 0; i < 8; i++) {
    for (int l = 0; l < 3; l++) {
      const float diff = scale * xx[l] - xval[i];
      term[i * MAX_LEVELS + l] = weight[i] * diff * diff;
    }
  }
  float best_d2 = FLT_MAX;
  int best = nearest_listed(g, g->neighbours - g->map[key] - 1, term, 8);
  if (best < 0) {
    for (int j = 0; j < g->n_points; j++) {
      const int8_t *pg = g->coord + j * 8;
      float d2 = 0;
      for (int i = 0; i < 8; i++) {
        const float diff = scale * xx[(pg[i] - 1) / 2] - xval[i];
        d2 += weight[i] * diff * diff;
      }
      if (d2 < best_d2) best_d2 = d2, best = j;
    }
    if (best < 0) best = 0;
  }
  for (int i = 0; i < 8; i++) L[i] = (int8_t)((g->coord[best * 8 + i] - 1) / 2);
  return best;
}

/* Each group of 8 codes L onto the codebook: its own point when the lattice has it, else the
 * nearest neighbour (L rewritten). Groups take their levels from xx[k]. Returns the scale, refit
 * by weighted least squares when a group moved, as the reference does. */
static float iq1_snap(const lattice *g, int groups, const float *const *xx, const float *xb,
                      const float *weight, float scale, int8_t *L, int *index) {
  int all_on = 1;
  for (int k = 0; k < groups; k++) {
    int key = 0;
    for (int j = 0; j < 8; j++) key |= L[8 * k + j] << 2 * j;
    index[k] = g->map[key];
    if (index[k] < 0) {
      all_on = 0;
      index[k] = iq1_neighbour(g, key, xb + 8 * k, weight + 8 * k, scale, xx[k], L + 8 * k);
    }
  }
  if (all_on) return scale;
  float sumqx = 0, sumq2 = 0;
  for (int k = 0; k < groups; k++) {
    const int8_t *pg = g->coord + index[k] * 8;
    for (int j = 0; j < 8; j++) {
      const float wj = weight[8 * k + j], q = xx[k][(pg[j] - 1) / 2];
      sumqx += wj * q * xb[8 * k + j];
      sumq2 += wj * q * q;
    }
  }
  return sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* Sort the block's values; `order[j]` is the position of the j-th smallest. */
static void rank_values(const float *xb, int n, int *order) {
  ranked pairs[32];
  for (int j = 0; j < n; j++) pairs[j].x = xb[j], pairs[j].i = j;
  qsort(pairs, n, sizeof(ranked), by_value);
  for (int j = 0; j < n; j++) order[j] = pairs[j].i;
}

static void iq1s_super(const lattice *g, const float *x, const float *qw, uint8_t *y) {
  enum { B = 32 };
  const float x_p[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};
  const float x_m[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA};
  memset(y, 0, 50);
  uint8_t *qs = y + 2, *qh = y + 34; /* qh: 8 little-endian uint16 */
  float sumx2 = 0;
  for (int i = 0; i < QK; i++) sumx2 += x[i] * x[i];
  const float sigma2 = 2 * sumx2 / QK;
  float scales[QK / B], max_scale = 0, weight[B], sumx[B + 1], sumw[B + 1];
  int8_t shifts[QK / B], L[B];
  int order[B];
  for (int ib = 0; ib < QK / B; ib++) {
    const float *xb = x + B * ib, *w = qw + B * ib;
    for (int i = 0; i < B; i++) weight[i] = w[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    float max = fabsf(xb[0]);
    for (int i = 1; i < B; i++) max = maxf(max, fabsf(xb[i]));
    scales[ib] = 0, shifts[ib] = 1;
    if (max < 1e-12f) continue;
    rank_values(xb, B, order);
    sumx[0] = sumw[0] = 0;
    for (int j = 0; j < B; j++) {
      const int i = order[j];
      sumx[j + 1] = sumx[j] + weight[i] * xb[i];
      sumw[j + 1] = sumw[j] + weight[i];
    }
    float best_score = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_shift = 0;
    for (int i1 = 0; i1 <= B; i1++) {
      for (int i2 = i1; i2 <= B; i2++) {
        for (int m = 0; m < 2; m++) {
          const float *v = m ? x_m : x_p;
          const float sumqx = (sumx[i1] - sumx[0]) * v[0] + (sumx[i2] - sumx[i1]) * v[1] +
                              (sumx[B] - sumx[i2]) * v[2];
          const float sumq2 = (sumw[i1] - sumw[0]) * v[0] * v[0] +
                              (sumw[i2] - sumw[i1]) * v[1] * v[1] +
                              (sumw[B] - sumw[i2]) * v[2] * v[2];
          if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
            scale = sumqx / sumq2, best_score = scale * sumqx;
            best1 = i1, best2 = i2, best_shift = m ? -1 : 1;
          }
        }
      }
    }
    if (best1 < 0 || best2 < 0 || best_shift == 0) continue;
    for (int j = 0; j < B; j++) L[order[j]] = (int8_t)(j < best1 ? 0 : j < best2 ? 1 : 2);
    if (scale < 0) {
      for (int j = 0; j < B; j++) L[j] = (int8_t)(2 - L[j]);
      scale = -scale, best_shift = -best_shift;
    }
    const float *xx = best_shift == 1 ? x_p : x_m;
    const float *levels[B / 8];
    for (int k = 0; k < B / 8; k++) levels[k] = xx;
    int index[B / 8];
    scale = iq1_snap(g, B / 8, levels, xb, weight, scale, L, index);
    uint16_t h = 0;
    for (int k = 0; k < B / 8; k++) {
      qs[(B / 8) * ib + k] = (uint8_t)index[k];
      h |= (uint16_t)((index[k] >> 8) << 3 * k);
    }
    put_u16(qh + 2 * ib, h);
    scales[ib] = scale, shifts[ib] = (int8_t)best_shift;
    max_scale = maxf(max_scale, scale);
  }
  if (!max_scale) return;
  const float d = max_scale / 15, id = 1 / d;
  put_half(y, d * 1.125f);
  for (int ib = 0; ib < QK / B; ib++) {
    int l = zp_clamp(zp_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
    if (shifts[ib] == -1) l |= 8;
    put_u16(qh + 2 * ib, (uint16_t)(get_u16(qh + 2 * ib) | l << 12));
  }
}

static void iq1m_weights(const float *xb, const float *qw, float sigma2, float *weight, int n) {
  for (int i = 0; i < n; i++)
    weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
}

static void iq1m_super(const lattice *g, const float *x, const float *qw, uint8_t *y) {
  enum { B = 16 };
  const float x_p[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};
  const float x_m[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA};
  const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
  memset(y, 0, 56);
  uint8_t *qs = y, *qh = y + 32, *sc = y + 48; /* sc: 4 little-endian uint16 */
  float sumx2 = 0;
  for (int i = 0; i < QK; i++) sumx2 += x[i] * x[i];
  const float sigma2 = 2 * sumx2 / QK;
  float scales[QK / B], max_scale = 0, weight[B];
  int8_t shifts[QK / B], L[B];
  int order[B];
  for (int ib = 0; ib < QK / B; ib++) {
    const float *xb = x + B * ib;
    iq1m_weights(xb, qw ? qw + B * ib : NULL, sigma2, weight, B);
    float max = fabsf(xb[0]);
    for (int i = 1; i < B; i++) max = maxf(max, fabsf(xb[i]));
    scales[ib] = 0, shifts[ib] = 0;
    if (max < 1e-7f) continue;
    rank_values(xb, B, order);
    /* Prefix sums per half: each half of 8 has its own shift. */
    float px[2][B + 1], pw[2][B + 1];
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
    for (int j = 0; j < B; j++) {
      const int i = order[j], h = i < B / 2 ? 0 : 1;
      px[h][j + 1] = px[h][j] + weight[i] * xb[i];
      px[1 - h][j + 1] = px[1 - h][j];
      pw[h][j + 1] = pw[h][j] + weight[i];
      pw[1 - h][j + 1] = pw[1 - h][j];
    }
    const float txs[2] = {px[0][B], px[1][B]}, tws[2] = {pw[0][B], pw[1][B]};
    const float p2 = x_p[2], m2 = x_m[2];
    const float cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1], cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
    const float cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1], cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
    float best_score = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_k = -1;
    for (int i1 = 0; i1 <= B; i1++) {
      for (int i2 = i1; i2 <= B; i2++) {
        float qx_p[2], qx_m[2], q2_p[2], q2_m[2];
        for (int h = 0; h < 2; h++) {
          const float sx = px[h][i1] + px[h][i2];
          qx_p[h] = txs[h] * p2 - sx;
          qx_m[h] = txs[h] * m2 - sx;
          q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
          q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
        }
        /* k: the shifts of the two halves, 0 (+,+) 1 (+,-) 2 (-,+) 3 (-,-) */
        const float sumqx[4] = {qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1],
            qx_m[0] + qx_m[1]};
        const float sumq2[4] = {q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1],
            q2_m[0] + q2_m[1]};
        for (int k = 0; k < 4; k++) {
          if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best_score * sumq2[k]) {
            scale = sumqx[k] / sumq2[k], best_score = scale * sumqx[k];
            best1 = i1, best2 = i2, best_k = k;
          }
        }
      }
    }
    if (best1 < 0 || best2 < 0 || best_k < 0) continue;
    for (int j = 0; j < B; j++) L[order[j]] = (int8_t)(j < best1 ? 0 : j < best2 ? 1 : 2);
    if (scale < 0) {
      for (int j = 0; j < B; j++) L[j] = (int8_t)(2 - L[j]);
      scale = -scale, best_k = 3 - best_k;
    }
    const float *levels[2] = {best_k < 2 ? x_p : x_m, best_k % 2 == 0 ? x_p : x_m};
    int index[2];
    scale = iq1_snap(g, 2, levels, xb, weight, scale, L, index);
    qs[2 * ib] = (uint8_t)index[0], qs[2 * ib + 1] = (uint8_t)index[1];
    qh[ib] = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
    scales[ib] = scale, shifts[ib] = (int8_t)best_k;
    max_scale = maxf(max_scale, scale);
  }
  if (!max_scale) return;
  float d = max_scale / 15;
  const float id = 1 / d;
  float sumqx = 0, sumq2 = 0;
  for (int ib = 0; ib < QK / B; ib++) {
    const int l = zp_clamp(zp_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
    put_u16(sc + 2 * (ib / 4), (uint16_t)(get_u16(sc + 2 * (ib / 4)) | l << 3 * (ib % 4)));
    qh[ib] |= masks[shifts[ib]];
    const float *xb = x + B * ib;
    iq1m_weights(xb, qw ? qw + B * ib : NULL, sigma2, weight, B);
    for (int k = 0; k < 2; k++) {
      const float *xx = (k == 0 ? shifts[ib] < 2 : shifts[ib] % 2 == 0) ? x_p : x_m;
      const int point = qs[2 * ib + k] + ((qh[ib] << (8 - 4 * k)) & 0x700);
      const int8_t *pg = g->coord + point * 8;
      for (int j = 0; j < 8; j++) {
        const float wj = weight[8 * k + j], q = xx[(pg[j] - 1) / 2] * (float)(2 * l + 1);
        sumqx += wj * q * xb[8 * k + j];
        sumq2 += wj * q * q;
      }
    }
  }
  if (sumq2 > 0) d = sumqx / sumq2;
  const uint16_t s = half_bits(d * 1.1125f);
  /* the fp16 super-scale's four nibbles sit in the top of the four scale words */
  for (int k = 0; k < 4; k++) {
    const uint16_t nib = (uint16_t)((s >> 4 * k) & 0xf);
    put_u16(sc + 2 * k, (uint16_t)(get_u16(sc + 2 * k) | nib << 12));
  }
}

/* ---- IQ4_NL, IQ4_XS ---- */

/* ggml's best_index_int8: the nearest of the 16 ascending levels (the lower one on a tie).
 * Its binary search stops at the last level <= x, which is how many of levels 1..14 are <= x;
 * counted without branches, the loop over a block's values vectorizes. Below level 0 or above
 * level 15 the final comparison picks the end, as the reference's early returns do. */
static inline int nearest_level(const int8_t *v, float x) {
  int lo = 0;
  for (int k = 1; k < 15; k++) lo += x >= (float)v[k];
  return x - (float)v[lo] < (float)v[lo + 1] - x ? lo : lo + 1;
}

/* nearest_level of s * x[j] for a block of 32. */
static void nearest_levels(const int8_t *v, float s, const float *x, uint8_t *L) {
  for (int j = 0; j < 32; j++) L[j] = (uint8_t)nearest_level(v, s * x[j]);
}

/* Scale of one block of 32 (its codes in L): the best weighted fit among scales that map the
 * block's extreme value to levels near the end of the table. */
static float iq4_block(const float *xb, const float *weight, uint8_t *L) {
  const int8_t *v = iq4_values;
  float amax = 0, max = 0;
  for (int j = 0; j < 32; j++) {
    const float ax = fabsf(xb[j]);
    if (ax > amax) amax = ax, max = xb[j];
  }
  if (amax < 1e-15f) return 0;
  float d = -max / (float)v[0], id = 1 / d, sumqx = 0, sumq2 = 0;
  uint8_t Lt[32];
  nearest_levels(v, id, xb, L);
  for (int j = 0; j < 32; j++) {
    const float q = (float)v[L[j]], w = weight[j];
    sumqx += w * q * xb[j];
    sumq2 += w * q * q;
  }
  d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
  float best = d * sumqx;
  for (int itry = -7; itry <= 7; itry++) {
    id = ((float)itry + (float)v[0]) / max;
    sumqx = sumq2 = 0;
    nearest_levels(v, id, xb, Lt);
    for (int j = 0; j < 32; j++) {
      const float q = (float)v[Lt[j]], w = weight[j];
      sumqx += w * q * xb[j];
      sumq2 += w * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) d = sumqx / sumq2, best = d * sumqx;
  }
  return d;
}

static void iq4_weights(const float *xb, const float *qw, float sigma2, float *weight) {
  for (int j = 0; j < 32; j++) {
    weight[j] = qw ? qw[j] * sqrtf(sigma2 + xb[j] * xb[j]) : xb[j] * xb[j];
  }
}

static void pack_nibbles(const uint8_t *L, int n, uint8_t *q) {
  for (int i = 0; i < n / 32; i++)
    for (int j = 0; j < 16; j++) q[16 * i + j] = (uint8_t)(L[32 * i + j] | L[32 * i + 16 + j] << 4);
}

static void iq4nl_block(const float *x, const float *qw, uint8_t *y) {
  float sigma2 = 0, weight[32];
  uint8_t L[32];
  for (int j = 0; j < 32; j++) sigma2 += x[j] * x[j];
  sigma2 *= 2.f / 32;
  iq4_weights(x, qw, sigma2, weight);
  memset(L, 0, 32);
  const float d = iq4_block(x, weight, L);
  put_half(y, d);
  /* Codes again from the stored scale; a zero block gets the level nearest 0 throughout. */
  const float id = d ? 1 / d : 0;
  nearest_levels(iq4_values, id, x, L);
  pack_nibbles(L, 32, y + 2);
}

static void iq4xs_super(const float *x, const float *qw, uint8_t *y) {
  float sigma2 = 0, weight[32], scales[8];
  uint8_t L[QK];
  for (int j = 0; j < QK; j++) sigma2 += x[j] * x[j];
  sigma2 *= 2.f / QK;
  memset(y, 0, 136);
  memset(L, 0, QK);
  float max_scale = 0, amax_scale = 0;
  for (int ib = 0; ib < 8; ib++) {
    iq4_weights(x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, weight);
    scales[ib] = iq4_block(x + 32 * ib, weight, L + 32 * ib);
    const float a = fabsf(scales[ib]);
    if (a > amax_scale) amax_scale = a, max_scale = scales[ib];
  }
  const float d = -max_scale / 32, id = d ? 1 / d : 0.f;
  put_half(y, d);
  uint16_t scales_h = 0;
  for (int ib = 0; ib < 8; ib++) {
    int l = zp_clamp(zp_nearest_int(id * scales[ib]), -32, 31);
    const float dl = d * (float)l, idl = dl ? 1 / dl : 0.f;
    nearest_levels(iq4_values, idl, x + 32 * ib, L + 32 * ib);
    l += 32;
    y[4 + ib / 2] |= (uint8_t)((l & 0xf) << 4 * (ib % 2));
    scales_h |= (uint16_t)((l >> 4) << 2 * ib);
  }
  put_u16(y + 2, scales_h);
  pack_nibbles(L, QK, y + 8);
}

/* ---- the exported quantizer ---- */

typedef struct {
  int type;
  const float *x, *importance;
  uint8_t *y;
  int64_t n_per_row, blocks_per_row, block_values, block_bytes;
} iq_job;

static void iq_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const iq_job *j = ctx;
  const lattice *g = lattice_index(j->type) >= 0 ? &lattices[lattice_index(j->type)] : NULL;
  for (int64_t b = begin; b < end; b++) {
    const int64_t row = b / j->blocks_per_row, col = (b % j->blocks_per_row) * j->block_values;
    const float *x = j->x + row * j->n_per_row + col;
    const float *qw = j->importance ? j->importance + col : NULL;
    uint8_t *y = j->y + b * j->block_bytes;
    switch (j->type) {
      case ZP_IQ4_NL: iq4nl_block(x, qw, y); break;
      case ZP_IQ4_XS: iq4xs_super(x, qw, y); break;
      case ZP_IQ1_S: iq1s_super(g, x, qw, y); break;
      case ZP_IQ1_M: iq1m_super(g, x, qw, y); break;
      default: lattice_super(j->type, x, qw, y); break;
    }
  }
}

int zp_iq_needs_importance(int type) {
  return type == ZP_IQ2_XXS || type == ZP_IQ2_XS || type == ZP_IQ1_S;
}

int zp_quantize_iquant(int type, const float *x, int64_t rows, int64_t n_per_row,
                       const float *importance, uint8_t *y, int threads) {
  const int64_t values = type == ZP_IQ4_NL ? ZP_QK_LEGACY : QK;
  const int64_t bytes = zp_type_bytes(type);
  if (!bytes || (lattice_index(type) < 0 && type != ZP_IQ4_NL && type != ZP_IQ4_XS)) return -2;
  if (lattice_index(type) >= 0 ? !lattices[lattice_index(type)].neighbours : !iq4_ready) return -3;
  if (!importance && zp_iq_needs_importance(type)) return -4;
  if (n_per_row <= 0 || n_per_row % values || rows < 0) return -1;
  iq_job j = {type, x, importance, y, n_per_row, n_per_row / values, values, bytes};
  const int64_t grain = type == ZP_IQ4_NL ? 256 : 16;
  zp_parallel(threads, rows * j.blocks_per_row, grain, iq_range, &j);
  return 0;
}

/* ---- dequantization (ggml's dequantize_row_iq*, the same float products) ---- */

static inline float signed_one(uint8_t signs, int j) { return signs >> j & 1 ? -1.f : 1.f; }

/* The 8 sign bits of a stored 7: the eighth makes the count of negatives even. */
static inline uint8_t even_signs(uint32_t s7) {
  s7 &= 127;
  return (uint8_t)(s7 | (__builtin_popcount(s7) & 1) << 7);
}

static inline const int8_t *point(const lattice *g, int index) { return g->coord + index * g->dim; }
static inline float level(const lattice *g, const int8_t *pg, int j) {
  return (float)(uint8_t)g->level_value[(pg[j] - 1) / 2];
}

static void dequantize_super(int type, const uint8_t *b, float *y) {
  const lattice *g = lattice_index(type) >= 0 ? &lattices[lattice_index(type)] : NULL;
  switch (type) {
    case ZP_IQ2_XXS: {
      const float d = get_half(b);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t *q = b + 2 + 8 * ib;
        const uint32_t aux = get_u32(q + 4);
        const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
        for (int l = 0; l < 4; l++) {
          const int8_t *pg = point(g, q[l]);
          const uint8_t s = even_signs(aux >> 7 * l);
          for (int j = 0; j < 8; j++) y[8 * l + j] = db * level(g, pg, j) * signed_one(s, j);
        }
      }
      break;
    }
    case ZP_IQ2_XS: {
      const float d = get_half(b);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t sc = b[66 + ib];
        const float db[2] = {d * (0.5f + (float)(sc & 0xf)) * 0.25f,
            d * (0.5f + (float)(sc >> 4)) * 0.25f};
        for (int l = 0; l < 4; l++) {
          const uint16_t q = get_u16(b + 2 + 8 * ib + 2 * l);
          const int8_t *pg = point(g, q & 511);
          const uint8_t s = even_signs(q >> 9);
          for (int j = 0; j < 8; j++) y[8 * l + j] = db[l / 2] * level(g, pg, j) * signed_one(s, j);
        }
      }
      break;
    }
    case ZP_IQ2_S: {
      const float d = get_half(b);
      const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 34;
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t sc = b[74 + ib];
        const float db[2] = {d * (0.5f + (float)(sc & 0xf)) * 0.25f,
            d * (0.5f + (float)(sc >> 4)) * 0.25f};
        for (int l = 0; l < 4; l++) {
          const int8_t *pg = point(g, qs[4 * ib + l] | ((qh[ib] << (8 - 2 * l)) & 0x300));
          const uint8_t s = signs[4 * ib + l];
          for (int j = 0; j < 8; j++) y[8 * l + j] = db[l / 2] * level(g, pg, j) * signed_one(s, j);
        }
      }
      break;
    }
    case ZP_IQ3_XXS: {
      const float d = get_half(b);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t *qs = b + 2 + 8 * ib;
        const uint32_t aux = get_u32(b + 66 + 4 * ib);
        const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
        for (int l = 0; l < 4; l++) {
          const uint8_t s = even_signs(aux >> 7 * l);
          const int8_t *p1 = point(g, qs[2 * l]), *p2 = point(g, qs[2 * l + 1]);
          for (int j = 0; j < 4; j++) {
            y[8 * l + j] = db * level(g, p1, j) * signed_one(s, j);
            y[8 * l + j + 4] = db * level(g, p2, j) * signed_one(s, j + 4);
          }
        }
      }
      break;
    }
    case ZP_IQ3_S: {
      const float d = get_half(b);
      const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 74, *scales = b + 106;
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const float db = d * (float)(1 + 2 * ((scales[ib / 2] >> 4 * (ib % 2)) & 0xf));
        for (int l = 0; l < 4; l++) {
          const int8_t *p1 = point(g, qs[8 * ib + 2 * l] | ((qh[ib] << (8 - 2 * l)) & 256));
          const int8_t *p2 = point(g, qs[8 * ib + 2 * l + 1] | ((qh[ib] << (7 - 2 * l)) & 256));
          const uint8_t s = signs[4 * ib + l];
          for (int j = 0; j < 4; j++) {
            y[8 * l + j] = db * level(g, p1, j) * signed_one(s, j);
            y[8 * l + j + 4] = db * level(g, p2, j) * signed_one(s, j + 4);
          }
        }
      }
      break;
    }
    case ZP_IQ1_S: {
      const float d = get_half(b);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint16_t h = get_u16(b + 34 + 2 * ib);
        const float dl = d * (float)(2 * ((h >> 12) & 7) + 1);
        const float delta = h & 0x8000 ? -IQ1_DELTA : IQ1_DELTA;
        for (int l = 0; l < 4; l++) {
          const int8_t *pg = point(g, b[2 + 4 * ib + l] | (((h >> 3 * l) & 7) << 8));
          for (int j = 0; j < 8; j++) {
            y[8 * l + j] = dl * ((float)g->level_value[(pg[j] - 1) / 2] + delta);
          }
        }
      }
      break;
    }
    case ZP_IQ1_M: {
      const uint8_t *qs = b, *qh = b + 32, *sc = b + 48;
      uint16_t s16[4];
      for (int k = 0; k < 4; k++) s16[k] = get_u16(sc + 2 * k);
      const uint16_t bits = (uint16_t)((s16[0] >> 12) | ((s16[1] >> 8) & 0x00f0) |
                                       ((s16[2] >> 4) & 0x0f00) | (s16[3] & 0xf000));
      const float d = half_to_float(bits);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const float dl[2] = {d * (float)(2 * ((s16[ib / 2] >> (6 * (ib % 2))) & 7) + 1),
                             d * (float)(2 * ((s16[ib / 2] >> (6 * (ib % 2) + 3)) & 7) + 1)};
        const uint8_t h0 = qh[2 * ib], h1 = qh[2 * ib + 1];
        const int idx[4] = {qs[4 * ib] | ((h0 << 8) & 0x700), qs[4 * ib + 1] | ((h0 << 4) & 0x700),
                            qs[4 * ib + 2] | ((h1 << 8) & 0x700),
                                qs[4 * ib + 3] | ((h1 << 4) & 0x700)};
        const float delta[4] = {h0 & 0x08 ? -IQ1_DELTA : IQ1_DELTA,
            h0 & 0x80 ? -IQ1_DELTA : IQ1_DELTA,
                                h1 & 0x08 ? -IQ1_DELTA : IQ1_DELTA,
                                    h1 & 0x80 ? -IQ1_DELTA : IQ1_DELTA};
        for (int l = 0; l < 4; l++) {
          const int8_t *pg = point(g, idx[l]);
          for (int j = 0; j < 8; j++) {
            y[8 * l + j] = dl[l / 2] * ((float)g->level_value[(pg[j] - 1) / 2] + delta[l]);
          }
        }
      }
      break;
    }
    case ZP_IQ4_NL: {
      const float d = get_half(b);
      for (int j = 0; j < 16; j++) {
        y[j] = d * (float)iq4_values[b[2 + j] & 0xf];
        y[j + 16] = d * (float)iq4_values[b[2 + j] >> 4];
      }
      break;
    }
    default: { /* IQ4_XS */
      const float d = get_half(b);
      const uint16_t scales_h = get_u16(b + 2);
      for (int ib = 0; ib < 8; ib++, y += 32) {
        const int ls = ((b[4 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
        const float dl = d * (float)(ls - 32);
        const uint8_t *q = b + 8 + 16 * ib;
        for (int j = 0; j < 16; j++) {
          y[j] = dl * (float)iq4_values[q[j] & 0xf];
          y[j + 16] = dl * (float)iq4_values[q[j] >> 4];
        }
      }
      break;
    }
  }
}

typedef struct {
  int type;
  const uint8_t *y;
  float *x;
  int64_t block_values, block_bytes;
} deq_job;

static void deq_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const deq_job *j = ctx;
  for (int64_t b = begin; b < end; b++)
    dequantize_super(j->type, j->y + b * j->block_bytes, j->x + b * j->block_values);
}

int zp_dequantize_iquant(int type, const uint8_t *y, int64_t n_blocks, float *x, int threads) {
  const int64_t bytes = zp_type_bytes(type);
  if (!bytes || (lattice_index(type) < 0 && type != ZP_IQ4_NL && type != ZP_IQ4_XS)) return -2;
  if (lattice_index(type) >= 0 ? !lattices[lattice_index(type)].neighbours : !iq4_ready) return -3;
  deq_job j = {type, y, x, type == ZP_IQ4_NL ? ZP_QK_LEGACY : QK, bytes};
  zp_parallel(threads, n_blocks, 1024, deq_range, &j);
  return 0;
}
