/* ggml K-quant super-blocks (Q2_K .. Q6_K), bytes identical to llama.cpp's quantize_row_q*_K_ref.
 *
 * Same float32 arithmetic as the eager torch code in zeropoint/gguf/kquants*.py (which documents
 * each step): every product and quotient rounded on its own, sums in element order. The speed
 * comes from layout, not from different math: the scale searches run on one vector register of
 * sub-blocks at once, stored transposed (lane k of xt[i] = element i of sub-block k), so each
 * element-order sum is independent float32 chains side by side, nothing reassociated. The
 * reference walks one sub-block at a time, a chain of dependent adds.
 */
/* No a*b+c fusion into one fma: the reference rounds the product first (its x86-64 build has no
 * fma at all). gcc contracts across statements by default once -march allows fma. */
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

#define QK ZP_QK_K /* values per super-block */
#define LANES 16 /* sub-blocks per group: one super-block of 16s, two of 32s */
#define MAXN 32  /* largest sub-block */
/* Lanes per vector: the CPU's register width. gcc lowers wider vector types badly (spills). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#define NV (LANES / VW) /* vectors per group */
#define GROUP_MAX_EPS 1e-15f

/* Two selects, which the vectorizer if-converts (a nested ?: macro it would not). */
static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

/* ggml's nearest_int: round half to even by the magic add, low mantissa bits when out of range. */
static inline int32_t nearest(float v) {
  float t = v + 12582912.f;
  int32_t i;
  memcpy(&i, &t, 4);
  return (i & 0x7fffff) - 0x400000;
}

/* ---- searches over VW sub-blocks at once (see kquants_search.py for the maths) ----
 * One vf holds element i of VW sub-blocks (gcc/clang vector extensions), every lane an IEEE
 * float32 operation, so nothing about the rounding changes. */
#pragma GCC diagnostic ignored "-Wpsabi" /* static functions: no ABI to keep */

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));

static inline vf splat(float a) { return (vf){0} + a; }
static inline vi seli(vi m, vi a, vi b) { return (a & m) | (b & ~m); } /* m: -1 or 0 lanes */
static inline vf sel(vi m, vf a, vf b) { return (vf)seli(m, (vi)a, (vi)b); }
static inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
static inline int any(vi m) {
  int r = 0;
  for (int k = 0; k < VW; k++) r |= m[k];
  return r;
}

/* nearest() in every lane, clipped to lo..hi, back as float (the reference sums float(l)). */
static inline vf round_clamp(vf v, int32_t lo, int32_t hi) {
  vi i = ((vi)(v + 12582912.f) & 0x7fffff) - 0x400000;
  i = seli(i < lo, (vi){0} + lo, i);
  i = seli(i > hi, (vi){0} + hi, i);
  return __builtin_convertvector(i, vf);
}

/* sum_i w_i * f(scale * l_i + lo - x_i), f = |.| (mad) or square, in element order. */
static vf weighted_error(int n, int mad, const vf *x, const vf *w, const vf *l, vf scale, vf lo) {
  vf err = splat(0);
  for (int i = 0; i < n; i++) {
    vf diff = scale * l[i] + lo - x[i];
    err += w[i] * (mad ? vabs(diff) : diff * diff);
  }
  return err;
}

/* make_qkx2_quants: codes 0..nmax (as floats), scale, and the min (returned negated). */
static void search_min(int n, int nmax, const vf *x, const vf *w, float rmin, float rdelta,
                       int nstep, int mad, vf *codes, vf *scale_out, vf *min_out) {
  vf lo = x[0], hi = x[0], sw = w[0], sx = w[0] * x[0], trial[MAXN];
  for (int i = 1; i < n; i++) {
    lo = sel(x[i] < lo, x[i], lo);
    hi = sel(x[i] > hi, x[i], hi);
    sw += w[i];
    sx += w[i] * x[i];
  }
  lo = sel(lo > 0, splat(0), lo);
  vf lo0 = lo, isc = splat((float)nmax) / (hi - lo), scale = splat(1) / isc;
  for (int i = 0; i < n; i++) codes[i] = round_clamp(isc * (x[i] - lo), 0, nmax);
  vf best = weighted_error(n, mad, x, w, codes, scale, lo);

  for (int s = 0; s <= nstep; s++) {
    isc = splat(rmin + rdelta * (float)s + (float)nmax) / (hi - lo);
    vf sl = splat(0), sl2 = splat(0), sxl = splat(0);
    for (int i = 0; i < n; i++) {
      vf q = round_clamp(isc * (x[i] - lo), 0, nmax), wl = w[i] * q;
      trial[i] = q;
      sl += wl, sl2 += wl * q, sxl += wl * x[i];
    }
    vf det = sw * sl2 - sl * sl;
    vf ts = (sw * sxl - sx * sl) / det, tm = (sl2 * sx - sl * sxl) / det;
    vi positive = tm > 0;
    ts = sel(positive, sxl / sl2, ts);
    tm = sel(positive, splat(0), tm);
    vf err = weighted_error(n, mad, x, w, trial, ts, tm);
    vi better = (det > 0) & (err < best);
    if (!any(better)) continue;
    best = sel(better, err, best);
    scale = sel(better, ts, scale);
    lo = sel(better, tm, lo);
    for (int i = 0; i < n; i++) codes[i] = sel(better, trial[i], codes[i]);
  }
  vi flat = hi == lo0;
  for (int i = 0; i < n; i++) codes[i] = sel(flat, splat(0), codes[i]);
  *scale_out = sel(flat, splat(0), scale);
  *min_out = -sel(flat, lo0, lo);
}

/* The first x of largest |x| in each lane, as the reference's `if (ax > amax)` picks it. */
static vf signed_absmax(int n, const vf *x) {
  vf amax = splat(0), mx = splat(0);
  for (int i = 0; i < n; i++) {
    vi more = vabs(x[i]) > amax;
    amax = sel(more, vabs(x[i]), amax);
    mx = sel(more, x[i], mx);
  }
  return mx;
}

/* Signed levels -nmax..nmax-1 of x * isc, and the x^2-weighted sums of w x l and w l l. */
static void signed_trial(int n, int nmax, const vf *x, vf isc, vf *l, vf *slx, vf *sl2) {
  vf a = splat(0), b = splat(0);
  for (int i = 0; i < n; i++) {
    vf q = round_clamp(isc * x[i], -nmax, nmax - 1), w = x[i] * x[i];
    l[i] = q;
    a += w * x[i] * q;
    b += w * q * q;
  }
  *slx = a, *sl2 = b;
}

/* Levels -> stored codes (level + nmax); an all-zero sub-block gets codes 0, as the reference. */
static void signed_codes(int n, int nmax, vf mx, vf *l) {
  vi zero = vabs(mx) < GROUP_MAX_EPS;
  for (int i = 0; i < n; i++) l[i] = sel(zero, splat(0), l[i] + (float)nmax);
}

/* make_qx_quants, rmse_type 1, no importance: codes 0..2*nmax-1 and the scale. */
static void search_signed(int n, int nmax, const vf *x, vf *codes, vf *scale_out) {
  vf mx = signed_absmax(n, x), slx, sl2, t[MAXN];
  signed_trial(n, nmax, x, splat((float)-nmax) / mx, codes, &slx, &sl2);
  vf scale = sel(sl2 != 0, slx / sl2, splat(0)), best = scale * slx;
  for (int s = -9; s <= 9; s++) {
    if (s == 0) continue;
    signed_trial(n, nmax, x, splat(-((float)nmax + 0.1f * (float)s)) / mx, t, &slx, &sl2);
    vi better = (sl2 > 0) & (slx * slx > best * sl2);
    if (!any(better)) continue;
    scale = sel(better, slx / sl2, scale);
    best = sel(better, scale * slx, best);
    for (int i = 0; i < n; i++) codes[i] = sel(better, t[i], codes[i]);
  }
  *scale_out = sel(vabs(mx) < GROUP_MAX_EPS, splat(0), scale);
  signed_codes(n, nmax, mx, codes);
}

/* make_q3_quants with do_rmse: greedy one-value-at-a-time moves, up to 5 passes. */
static void search_greedy(int n, int nmax, const vf *x, vf *codes, vf *scale_out) {
  vf mx = signed_absmax(n, x), slx, sl2;
  signed_trial(n, nmax, x, splat((float)-nmax) / mx, codes, &slx, &sl2);
  for (int pass = 0; pass < 5; pass++) {
    vi changed = (vi){0}; /* a pass that moves nothing leaves every later pass the same: stop */
    for (int i = 0; i < n; i++) {
      vf xi = x[i], w = xi * xi, old = codes[i];
      vf s1 = slx - w * xi * old, s2 = sl2 - w * old * old;
      vf q = round_clamp(xi * s2 / s1, -nmax, nmax - 1);
      vf n1 = s1 + w * xi * q, n2 = s2 + w * q * q;
      vi take = (s1 > 0) & (q != old) & (n2 > 0) & (n1 * n1 * sl2 > slx * slx * n2);
      changed |= take;
      codes[i] = sel(take, q, old);
      slx = sel(take, n1, slx);
      sl2 = sel(take, n2, sl2);
    }
    if (!any(changed)) break;
  }
  *scale_out = sel((vabs(mx) < GROUP_MAX_EPS) | ~(sl2 > 0), splat(0), slx / sl2);
  signed_codes(n, nmax, mx, codes);
}

/* ---- super-blocks ---- */

/* Final codes of one sub-block on the stored grid; a zero d keeps the search codes. The signed
 * types pass dm = 0, and x + 0 rounds exactly as the reference's plain x / d. */
static void requantize(const float *x, int n, float d, float dm, int lo, int hi, int offset,
                       uint8_t *codes) {
  if (d == 0) return;
  for (int i = 0; i < n; i++)
    codes[i] = (uint8_t)(clampi(nearest((x[i] + dm) / d), lo, hi) + offset);
}

/* Bit field packing: byte j of out gets field f of each of k codes 32 apart (codes[32*f + j])
 * at bit width*f; the qs/qh/hmask layouts of every K type are this on some slice of codes. */
static void pack(const uint8_t *codes, int k, int width, int stride, int shift, int mask,
                 uint8_t *out) {
  for (int j = 0; j < 32; j++) {
    int b = 0;
    for (int f = 0; f < k; f++) b |= ((codes[stride * f + j] >> shift) & mask) << (width * f);
    out[j] = (uint8_t)b;
  }
}

/* The searches want the sub-blocks transposed: xt[c][i] lane k = element i of sub-block
 * VW*c + k, which is x[n * (VW*c + k) + i]. */
static void transpose_in(const float *x, int n, vf (*xt)[MAXN]) {
  for (int c = 0; c < NV; c++)
    for (int i = 0; i < n; i++)
      for (int k = 0; k < VW; k++) xt[c][i][k] = x[n * (VW * c + k) + i];
}

static void transpose_out(vf (*ct)[MAXN], int n, uint8_t *codes) {
  for (int c = 0; c < NV; c++)
    for (int i = 0; i < n; i++)
      for (int k = 0; k < VW; k++) codes[n * (VW * c + k) + i] = (uint8_t)(int32_t)ct[c][i][k];
}

static float max_positive(const float *v, int n) {
  float m = 0;
  for (int j = 0; j < n; j++) m = v[j] > m ? v[j] : m;
  return m;
}

static float first_absmax(const float *v, int n) {
  float a = 0, m = 0;
  for (int j = 0; j < n; j++)
    if (fabsf(v[j]) > a) a = fabsf(v[j]), m = v[j];
  return m;
}

/* Q2_K (84 B): 0 scales[16] (scale | min << 4), 16 qs[64], 80 d, 82 dmin. */
static void finish_q2(const float *x, const float *sc, const float *mn, uint8_t *codes,
                      uint8_t *y) {
  float ms = max_positive(sc, 16), mm = max_positive(mn, 16);
  float is = ms > 0 ? 15.f / ms : 0.f, im = mm > 0 ? 15.f / mm : 0.f;
  for (int j = 0; j < 16; j++) y[j] = ms > 0 ? (uint8_t)nearest(is * sc[j]) : 0;
  for (int j = 0; j < 16; j++) y[j] |= mm > 0 ? (uint8_t)((uint32_t)nearest(im * mn[j]) << 4) : 0;
  put_half(y + 80, ms / 15.f);
  put_half(y + 82, mm / 15.f);
  float d = get_half(y + 80), dmin = get_half(y + 82);
  for (int j = 0; j < 16; j++)
    requantize(x + 16 * j, 16, d * (float)(y[j] & 15), dmin * (float)(y[j] >> 4), 0, 3, 0,
               codes + 16 * j);
  for (int h = 0; h < 2; h++) pack(codes + 128 * h, 4, 2, 32, 0, 3, y + 16 + 32 * h);
}

/* Q4_K (144 B): 0 d, 2 dmin, 4 scales[12], 16 qs[128]. Q5_K (176 B): ..., 16 qh[32], 48 qs[128]. */
static void finish_q45(const float *x, const float *sc, const float *mn, uint8_t *codes,
                       int bits, uint8_t *y) {
  float ms = max_positive(sc, 8), mm = max_positive(mn, 8);
  float is = ms > 0 ? 63.f / ms : 0.f, im = mm > 0 ? 63.f / mm : 0.f;
  uint8_t ls[8], lm[8], *s = y + 4;
  for (int j = 0; j < 8; j++) {
    ls[j] = (uint8_t)nearest(is * sc[j]), lm[j] = (uint8_t)nearest(im * mn[j]);
    ls[j] = ls[j] > 63 ? 63 : ls[j], lm[j] = lm[j] > 63 ? 63 : lm[j];
  }
  for (int j = 0; j < 4; j++) {
    s[j] = (uint8_t)(ls[j] | (ls[j + 4] >> 4) << 6);
    s[j + 4] = (uint8_t)(lm[j] | (lm[j + 4] >> 4) << 6);
    s[j + 8] = (uint8_t)((ls[j + 4] & 15) | (lm[j + 4] & 15) << 4);
  }
  put_half(y, ms / 63.f);
  put_half(y + 2, mm / 63.f);
  float d = get_half(y), dmin = get_half(y + 2);
  int nmax = (1 << bits) - 1;
  for (int j = 0; j < 8; j++)
    requantize(x + 32 * j, 32, d * (float)ls[j], dmin * (float)lm[j], 0, nmax, 0, codes + 32 * j);
  uint8_t *qs = y + (bits == 5 ? 48 : 16);
  if (bits == 5) pack(codes, 8, 1, 32, 4, 1, y + 16);
  for (int c = 0; c < 4; c++) pack(codes + 64 * c, 2, 4, 32, 0, 15, qs + 32 * c);
}

/* Q3_K (110 B): 0 hmask[32] (bit 2 of codes), 32 qs[64], 96 scales[12], 108 d. */
static void finish_q3(const float *x, const float *sc, uint8_t *codes, uint8_t *y) {
  float top = first_absmax(sc, 16), iscale = -32.f / top;
  uint8_t *s = y + 96;
  int8_t l[16];
  memset(s, 0, 12);
  for (int j = 0; j < 16 && top != 0; j++) {
    int8_t v = (int8_t)nearest(iscale * sc[j]);
    l[j] = (int8_t)(clampi(v, -32, 31) + 32);
    s[j % 8] |= (uint8_t)((l[j] & 15) << (j < 8 ? 0 : 4));
    s[8 + j % 4] |= (uint8_t)((l[j] >> 4) << (2 * (j / 4)));
  }
  put_half(y + 108, top != 0 ? 1 / iscale : 0.f);
  float d = get_half(y + 108);
  for (int j = 0; j < 16; j++)
    requantize(x + 16 * j, 16, d * (float)(top != 0 ? l[j] - 32 : -32), 0.f, -4, 3, 4,
               codes + 16 * j);
  pack(codes, 8, 1, 32, 2, 1, y);
  for (int h = 0; h < 2; h++) pack(codes + 128 * h, 4, 2, 32, 0, 3, y + 32 + 32 * h);
}

/* Q6_K (210 B): 0 ql[128] (low 4 bits), 128 qh[64] (high 2 bits), 192 scales[16] int8, 208 d. */
static void finish_q6(const float *x, const float *sc, uint8_t *codes, uint8_t *y) {
  float top = first_absmax(sc, 16);
  memset(y, 0, ZP_Q6_K_BYTES);
  if (fabsf(top) < GROUP_MAX_EPS) return; /* the reference writes an all-zero block */
  float iscale = -128.f / top;
  put_half(y + 208, 1 / iscale);
  float d = get_half(y + 208);
  for (int j = 0; j < 16; j++) {
    int32_t v = nearest(iscale * sc[j]);
    int8_t q = (int8_t)(v > 127 ? 127 : v);
    y[192 + j] = (uint8_t)q;
    requantize(x + 16 * j, 16, d * (float)q, 0.f, -32, 31, 32, codes + 16 * j);
  }
  for (int h = 0; h < 2; h++) {
    const uint8_t *c = codes + 128 * h;
    for (int b = 0; b < 2; b++) pack(c + 32 * b, 2, 4, 64, 0, 15, y + 64 * h + 32 * b);
    pack(c, 4, 2, 32, 4, 3, y + 128 + 32 * h);
  }
}

/* 1 if an fp16 super-scale of block y overflowed: llama.cpp refuses such a block. */
static int half_overflow(int type, const uint8_t *y) {
  int d = 0, dmin = 2; /* Q4_K, Q5_K: d and dmin lead the block */
  if (type == ZP_Q2_K) d = 80, dmin = 82;
  if (type == ZP_Q3_K) d = dmin = 108;
  if (type == ZP_Q6_K) d = dmin = 208;
  return (y[d + 1] & 0x7c) == 0x7c || (y[dmin + 1] & 0x7c) == 0x7c;
}

/* Q4_K and Q5_K search sub-blocks of 32, the others of 16. */
static int sub_block(int type) { return type == ZP_Q4_K || type == ZP_Q5_K ? 32 : 16; }

/* The search of `type` on VW sub-blocks of n values: codes, scales and (Q2/4/5_K) mins. */
static void search(int type, int n, const vf *x, vf *codes, vf *sc, vf *mn) {
  vf w[MAXN], av = splat(0);
  *mn = splat(0); /* the signed types have none */
  switch (type) {
    case ZP_Q2_K:
      for (int i = 0; i < n; i++) w[i] = vabs(x[i]);
      search_min(n, 3, x, w, -0.5f, 0.1f, 15, 1, codes, sc, mn);
      break;
    case ZP_Q4_K:
    case ZP_Q5_K: /* weights sqrt(mean x^2) + |x|; sqrtf is correctly rounded */
      for (int i = 0; i < n; i++) av += x[i] * x[i];
      av = av / 32;
      for (int k = 0; k < VW; k++) av[k] = sqrtf(av[k]);
      for (int i = 0; i < n; i++) w[i] = av + vabs(x[i]);
      if (type == ZP_Q4_K) search_min(n, 15, x, w, -1.f, 0.1f, 20, 0, codes, sc, mn);
      else search_min(n, 31, x, w, -0.5f, 0.1f, 15, 0, codes, sc, mn);
      break;
    case ZP_Q3_K: search_greedy(n, 4, x, codes, sc); break;
    default: search_signed(n, 32, x, codes, sc); break; /* Q6_K */
  }
}

/* LANES sub-blocks = `per` super-blocks of x, quantized into `per` blocks of y. Returns the
 * first of them whose super-scale overflows fp16, or -1. */
static int quantize_group(int type, const float *x, uint8_t *y) {
  int n = sub_block(type), per = n / 16;
  vf xt[NV][MAXN], ct[NV][MAXN], sc[NV], mn[NV];
  uint8_t codes[2 * QK];
  transpose_in(x, n, xt);
  for (int c = 0; c < NV; c++) search(type, n, xt[c], ct[c], &sc[c], &mn[c]);
  transpose_out(ct, n, codes);
  float scales[LANES], mins[LANES];
  memcpy(scales, sc, sizeof scales);
  memcpy(mins, mn, sizeof mins);
  int overflow = -1;
  for (int b = 0; b < per; b++) {
    const float *xb = x + QK * b, *sb = scales + (LANES / per) * b, *mb = mins + (LANES / per) * b;
    uint8_t *cb = codes + QK * b;
    switch (type) {
      case ZP_Q2_K: finish_q2(xb, sb, mb, cb, y); break;
      case ZP_Q3_K: finish_q3(xb, sb, cb, y); break;
      case ZP_Q4_K: finish_q45(xb, sb, mb, cb, 4, y); break;
      case ZP_Q5_K: finish_q45(xb, sb, mb, cb, 5, y); break;
      default: finish_q6(xb, sb, cb, y); break;
    }
    if (overflow < 0 && half_overflow(type, y)) overflow = b;
    y += zp_type_bytes(type);
  }
  return overflow;
}

static int64_t quantize_serial(int type, const float *x, int64_t n_super, uint8_t *y, int *why) {
  const int per = sub_block(type) / 16;
  const int64_t size = zp_type_bytes(type);
  for (int64_t b = 0; b < n_super; b += per) {
    float pad[2 * QK] = {0};
    uint8_t out[2 * ZP_Q5_K_BYTES]; /* a pair of the largest type searched in pairs */
    const float *xb = x + QK * b;
    uint8_t *yb = y + size * b;
    if (b + per > n_super) { /* an odd last super-block of Q4_K/Q5_K: search it beside zeros */
      memcpy(pad, xb, QK * sizeof(float));
      xb = pad, yb = out;
    }
    for (int i = 0; i < per; i++)
      if (non_finite(xb + QK * i, QK)) return *why = 1, b + i;
    int overflow = quantize_group(type, xb, yb);
    if (overflow >= 0) return *why = 2, b + overflow;
    if (yb == out) memcpy(y + size * b, out, (size_t)size);
  }
  return -1;
}

/* Super-blocks a thread claims at a time (256 KiB of input): even, so that Q4_K/Q5_K's pairs
 * never straddle two ranges and only the very last super-block can be odd. */
#define GRAIN_SUPER 256

/* type: ZP_Q2_K .. ZP_Q6_K; x holds n_super * 256 floats, y gets n_super blocks of that type,
 * on up to `threads` threads. Returns -1, -2 for a type it does not know, or the first
 * super-block that cannot be stored (y is then incomplete) with *why = 1 if it holds NaN or
 * inf, 2 if its fp16 super-scale overflows. */
int64_t zp_quantize_kquant(int type, const float *x, int64_t n_super, uint8_t *y, int *why,
                           int threads) {
  if (type < ZP_Q2_K || type > ZP_Q6_K) return -2;
  return zp_parallel_blocks(threads, GRAIN_SUPER, quantize_serial, type, x, QK, y,
                            zp_type_bytes(type), n_super, why);
}

/* ---- weighted (llama-quantize --imatrix): quantize_row_q*_K_impl given importance ----
 * Sub-block searches run under weights importance * sqrt(sigma2 + x^2) (Q6_K: the importance
 * alone), sigma2 = mean x^2 of the super-block (Q3_K/Q4_K/Q5_K: twice that); the sub-block
 * scales are then encoded by a weighted search of their own (weighted.h), each sub-block
 * weighted by the sum of its weights. Scalar, one super-block at a time, as the reference. */

/* x^2 summed over a super-block in element order. */
static float sum_squares(const float *x) {
  float s = 0;
  for (int j = 0; j < QK; j++) s += x[j] * x[j];
  return s;
}

/* Weights qw * sqrt(sigma2 + x^2) of n values, and their sum in element order. */
static float magnitude_weights(int n, const float *x, const float *qw, float sigma2, float *w) {
  float sum = 0;
  for (int l = 0; l < n; l++) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
  for (int l = 0; l < n; l++) sum += w[l];
  return sum;
}

static void weighted_q2(const float *x, const float *qw, uint8_t *y) {
  float w[16], sw[16], sc[16], mn[16], sigma2 = sum_squares(x) / QK;
  uint8_t codes[QK], ls[16], lm[16];
  for (int j = 0; j < 16; j++) {
    sw[j] = magnitude_weights(16, x + 16 * j, qw + 16 * j, sigma2, w);
    sc[j] = weighted_min_search(16, 3, x + 16 * j, w, codes + 16 * j, &mn[j]);
  }
  float dm = weighted_positive_search(16, 15, sc, sw, ls);
  float mm = weighted_positive_search(16, 15, mn, sw, lm);
  put_half(y + 80, dm);
  put_half(y + 82, mm);
  dm = get_half(y + 80), mm = get_half(y + 82);
  for (int j = 0; j < 16; j++) y[j] = (uint8_t)(ls[j] | lm[j] << 4);
  for (int j = 0; j < 16; j++)
    requantize(x + 16 * j, 16, dm * (float)(y[j] & 15), mm * (float)(y[j] >> 4), 0, 3, 0,
               codes + 16 * j);
  for (int h = 0; h < 2; h++) pack(codes + 128 * h, 4, 2, 32, 0, 3, y + 16 + 32 * h);
}

static void weighted_q3(const float *x, const float *qw, uint8_t *y) {
  float w[16], sw[16], sc[16], sigma2 = 2 * sum_squares(x) / QK;
  int8_t levels[QK], ls[16];
  uint8_t codes[QK], *s = y + 96;
  for (int j = 0; j < 16; j++) {
    sw[j] = magnitude_weights(16, x + 16 * j, qw + 16 * j, sigma2, w);
    sc[j] = weighted_signed_search(16, 4, x + 16 * j, w, levels + 16 * j);
  }
  float d_block = weighted_signed_search(16, 32, sc, sw, ls); /* ls: 6-bit, biased by 32 */
  memset(s, 0, 12);
  for (int j = 0; j < 16; j++) {
    s[j % 8] |= (uint8_t)((ls[j] & 15) << (j < 8 ? 0 : 4));
    s[8 + j % 4] |= (uint8_t)((ls[j] >> 4) << (2 * (j / 4)));
  }
  put_half(y + 108, d_block);
  float d = get_half(y + 108);
  for (int j = 0; j < QK; j++) codes[j] = (uint8_t)levels[j];
  for (int j = 0; j < 16; j++)
    requantize(x + 16 * j, 16, d * (float)(ls[j] - 32), 0.f, -4, 3, 4, codes + 16 * j);
  pack(codes, 8, 1, 32, 2, 1, y);
  for (int h = 0; h < 2; h++) pack(codes + 128 * h, 4, 2, 32, 0, 3, y + 32 + 32 * h);
}

/* Q4_K (bits 4) and Q5_K (bits 5). Q4_K stores the scale searches' codes unclamped, Q5_K clips
 * them to 63, as the two reference functions differ. */
static void weighted_q45(const float *x, const float *qw, int bits, uint8_t *y) {
  float w[32], sw[8], sc[8], mn[8], sigma2 = 2 * sum_squares(x) / QK;
  uint8_t codes[QK], ls[8], lm[8], *s = y + 4;
  const int nmax = (1 << bits) - 1;
  for (int j = 0; j < 8; j++) {
    sw[j] = magnitude_weights(32, x + 32 * j, qw + 32 * j, sigma2, w);
    sc[j] = weighted_min_search(32, nmax, x + 32 * j, w, codes + 32 * j, &mn[j]);
  }
  float d_block = weighted_positive_search(8, 63, sc, sw, ls);
  float m_block = weighted_positive_search(8, 63, mn, sw, lm);
  if (bits == 5)
    for (int j = 0; j < 8; j++) ls[j] = ls[j] < 63 ? ls[j] : 63, lm[j] = lm[j] < 63 ? lm[j] : 63;
  for (int j = 0; j < 4; j++) s[j] = ls[j], s[j + 4] = lm[j];
  for (int j = 4; j < 8; j++) {
    s[j + 4] = (uint8_t)((ls[j] & 15) | (lm[j] & 15) << 4);
    s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
    s[j] |= (uint8_t)((lm[j] >> 4) << 6);
  }
  put_half(y, d_block);
  put_half(y + 2, m_block);
  float d = get_half(y), dmin = get_half(y + 2);
  for (int j = 0; j < 8; j++) { /* the 6-bit scale and min as stored (get_scale_min_k4) */
    int sj = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
    int mj = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    requantize(x + 32 * j, 32, d * (float)sj, dmin * (float)mj, 0, nmax, 0, codes + 32 * j);
  }
  uint8_t *qs = y + (bits == 5 ? 48 : 16);
  if (bits == 5) pack(codes, 8, 1, 32, 4, 1, y + 16);
  for (int c = 0; c < 4; c++) pack(codes + 64 * c, 2, 4, 32, 0, 15, qs + 32 * c);
}

static void weighted_q6(const float *x, const float *qw, uint8_t *y) {
  float sc[16];
  int8_t levels[QK];
  uint8_t codes[QK];
  for (int j = 0; j < 16; j++)
    sc[j] = weighted_signed_search(16, 32, x + 16 * j, qw + 16 * j, levels + 16 * j);
  for (int j = 0; j < QK; j++) codes[j] = (uint8_t)levels[j];
  finish_q6(x, sc, codes, y); /* from here on the same steps as the unweighted Q6_K */
}

static int64_t weighted_rows(void *ctx, int64_t begin, int64_t end, int *why) {
  const weighted_job *j = ctx;
  const int64_t nb = j->n_per_row / QK, size = zp_type_bytes(j->type);
  for (int64_t b = begin * nb; b < end * nb; b++) { /* super-blocks, row after row */
    const float *xb = j->x + QK * b, *qw = j->importance + QK * (b % nb);
    uint8_t *yb = j->y + size * b;
    if (non_finite(xb, QK)) return *why = 1, b;
    switch (j->type) {
      case ZP_Q2_K: weighted_q2(xb, qw, yb); break;
      case ZP_Q3_K: weighted_q3(xb, qw, yb); break;
      case ZP_Q4_K: weighted_q45(xb, qw, 4, yb); break;
      case ZP_Q5_K: weighted_q45(xb, qw, 5, yb); break;
      default: weighted_q6(xb, qw, yb); break;
    }
    if (half_overflow(j->type, yb)) return *why = 2, b;
  }
  return -1;
}

/* As zp_quantize_kquant, for n_rows rows of n_per_row values (a multiple of 256) weighted by
 * importance (n_per_row floats, the same for every row): quantize_q*_K with quant_weights. */
int64_t zp_quantize_kquant_weighted(int type, const float *x, int64_t n_rows, int64_t n_per_row,
                                    const float *importance, uint8_t *y, int *why, int threads) {
  if (type < ZP_Q2_K || type > ZP_Q6_K || n_per_row % QK) return -2;
  weighted_job j = {type, x, importance, n_per_row, y};
  int64_t grain = 1 + GRAIN_SUPER / 4 / (n_per_row / QK); /* the searches cost ~4x the plain ones */
  return zp_parallel_spans(threads, n_rows, grain, weighted_rows, &j, why);
}
