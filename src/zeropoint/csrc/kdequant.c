/* ggml K-quant super-blocks (Q2_K .. Q6_K) back to float32, bit for bit what gguf-py's
 * gguf.quants.dequantize and zeropoint/gguf/kquants.py's torch code compute: each sub-block's
 * scale is d * (its integer scale), rounded to float32; a value is that scale times its code,
 * rounded, minus (dmin * its integer min), rounded, where the type has a min. kquants.py's module
 * docstring holds the byte layouts.
 *
 * The GGUF requantizer dequantizes a K tensor a few rows at a time before quantizing it again;
 * without this it would need torch or gguf-py's numpy code, 10x slower.
 */
/* The product is rounded before the min is subtracted, as numpy does: no fused multiply-add. */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "parallel.h"
#include "zeropoint.h"

#define QK ZP_QK_K
#define GRAIN_SUPER 256 /* super-blocks per claimed range: 256 KiB of floats */

/* x[e] = scale[e / sub] * q[e] (- min[e / sub]), for the 256 codes q of one super-block. */
static inline void scale_codes(const int8_t *q, const float *scale, const float *min, int sub,
                               float *restrict x) {
  for (int s = 0; s < QK / sub; s++) {
    const float d = scale[s];
    for (int j = 0; j < sub; j++) x[s * sub + j] = d * (float)q[s * sub + j];
  }
  if (min == NULL) return;
  /* A second pass: the subtraction reads the rounded product back from memory. */
  for (int s = 0; s < QK / sub; s++) {
    const float m = min[s];
    for (int j = 0; j < sub; j++) x[s * sub + j] = x[s * sub + j] - m;
  }
}

static void dequantize_q2_k(const uint8_t *y, float *x) {
  const float d = get_half(y + 80), dmin = get_half(y + 82);
  float scale[16], min[16];
  int8_t q[QK];
  for (int s = 0; s < 16; s++) {
    scale[s] = d * (float)(y[s] & 0xF);
    min[s] = dmin * (float)(y[s] >> 4);
  }
  /* Element 128h + 32i + l: bits 2i of byte 32h + l of qs. */
  const uint8_t *qs = y + 16;
  for (int h = 0; h < 2; h++)
    for (int i = 0; i < 4; i++)
      for (int l = 0; l < 32; l++) q[128 * h + 32 * i + l] = (int8_t)((qs[32 * h + l] >> (2 * i)) & 3);
  scale_codes(q, scale, min, 16, x);
}

static void dequantize_q3_k(const uint8_t *y, float *x) {
  const uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
  const float d = get_half(y + 108);
  float scale[16];
  int8_t q[QK];
  /* Scale s: low nibble from byte s % 8 (nibble s / 8), high 2 bits from byte 8 + s % 4
   * (field s / 4); stored biased by 32. */
  for (int s = 0; s < 16; s++) {
    const int low = (sc[s % 8] >> (4 * (s / 8))) & 0xF, high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
    scale[s] = d * (float)((int8_t)(low | high << 4) - 32);
  }
  /* Element 128h + 32i + l: low 2 bits as Q2_K's; bit 2 is bit (e / 32) of hmask[e % 32], and
   * a clear bit means -4. */
  for (int h = 0; h < 2; h++)
    for (int i = 0; i < 4; i++)
      for (int l = 0; l < 32; l++) {
        const int e = 128 * h + 32 * i + l;
        const int low = (qs[32 * h + l] >> (2 * i)) & 3, high = (hmask[l] >> (e / 32)) & 1;
        q[e] = (int8_t)(low - ((high ^ 1) << 2));
      }
  scale_codes(q, scale, NULL, 16, x);
}

/* Q4_K and Q5_K: the 6-bit scales and mins of get_scale_min_k4, codes of 4 (+1) bits. */
static void dequantize_q45_k(const uint8_t *y, float *x, int five) {
  const float d = get_half(y), dmin = get_half(y + 2);
  const uint8_t *b = y + 4, *qh = y + 16, *qs = five ? y + 48 : y + 16;
  float scale[8], min[8];
  int8_t q[QK];
  for (int s = 0; s < 4; s++) {
    scale[s] = d * (float)(b[s] & 63);
    min[s] = dmin * (float)(b[s + 4] & 63);
    scale[s + 4] = d * (float)((b[s + 8] & 0xF) | (b[s] >> 6) << 4);
    min[s + 4] = dmin * (float)((b[s + 8] >> 4) | (b[s + 4] >> 6) << 4);
  }
  /* Element 64r + 32i + l: nibble i of byte 32r + l of qs; bit 4 is bit (e / 32) of qh[l]. */
  for (int r = 0; r < 4; r++)
    for (int i = 0; i < 2; i++)
      for (int l = 0; l < 32; l++) {
        const int e = 64 * r + 32 * i + l;
        int v = (qs[32 * r + l] >> (4 * i)) & 0xF;
        if (five) v |= ((qh[l] >> (e / 32)) & 1) << 4;
        q[e] = (int8_t)v;
      }
  scale_codes(q, scale, min, 32, x);
}

static void dequantize_q6_k(const uint8_t *y, float *x) {
  const uint8_t *ql = y, *qh = y + 128;
  const int8_t *sc = (const int8_t *)(y + 192);
  const float d = get_half(y + 208);
  float scale[16];
  int8_t q[QK];
  for (int s = 0; s < 16; s++) scale[s] = d * (float)sc[s];
  /* Element 128h + 64i + p: nibble i of ql[64h + p]; element 128h + 32k + l: its high 2 bits
   * are field k of qh[32h + l]. Codes are stored + 32. */
  for (int h = 0; h < 2; h++) {
    for (int i = 0; i < 2; i++)
      for (int p = 0; p < 64; p++) q[128 * h + 64 * i + p] = (int8_t)((ql[64 * h + p] >> (4 * i)) & 0xF);
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < 32; l++) {
        const int e = 128 * h + 32 * k + l;
        q[e] = (int8_t)((q[e] | ((qh[32 * h + l] >> (2 * k)) & 3) << 4) - 32);
      }
  }
  scale_codes(q, scale, NULL, 16, x);
}

typedef struct {
  int type;
  const uint8_t *y;
  float *x;
} kdequantize_job;

static void kdequantize_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  const kdequantize_job *j = ctx;
  const int64_t size = zp_type_bytes(j->type);
  for (int64_t b = begin; b < end; b++) {
    const uint8_t *y = j->y + size * b;
    float *x = j->x + QK * b;
    switch (j->type) {
      case ZP_Q2_K: dequantize_q2_k(y, x); break;
      case ZP_Q3_K: dequantize_q3_k(y, x); break;
      case ZP_Q4_K: dequantize_q45_k(y, x, 0); break;
      case ZP_Q5_K: dequantize_q45_k(y, x, 1); break;
      default: dequantize_q6_k(y, x); break;
    }
  }
}

/* y: n_super super-blocks of K type `type` -> x: n_super x 256 floats, on up to `threads`
 * threads. Returns 0, or -2 for a type that is not a K type. */
int zp_dequantize_kquant(int type, const uint8_t *y, int64_t n_super, float *x, int threads) {
  if (type != ZP_Q2_K && type != ZP_Q3_K && type != ZP_Q4_K && type != ZP_Q5_K && type != ZP_Q6_K)
    return -2;
  kdequantize_job j = {type, y, x};
  zp_parallel(threads, n_super, GRAIN_SUPER, kdequantize_range, &j);
  return 0;
}
