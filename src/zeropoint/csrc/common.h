/* Helpers the block kernels (legacy.c, kquants.c) share, written once. Internal: static inline,
 * nothing here is exported. */
#ifndef ZP_COMMON_H
#define ZP_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "zeropoint.h"

/* Bytes per block of ggml type `type` (ZP_BLOCK_TYPES), 0 for a type the kernels do not know. */
static inline int64_t zp_type_bytes(int type) {
  switch (type) {
#define ZP_TYPE_CASE(name, id, values, bytes) \
  case id: return bytes;
    ZP_BLOCK_TYPES(ZP_TYPE_CASE)
#undef ZP_TYPE_CASE
    default: return 0;
  }
}

/* 1 if the float whose bits are u is inf or NaN (all exponent bits set): an integer test, which
 * no vectorization or finite-math flag can fold away. */
#define ZP_INF_OR_NAN(u) (((u) & 0x7f800000u) == 0x7f800000u)

/* 1 if any of the n floats is inf or NaN. Integer ops over a long run, so the loop vectorizes
 * with one horizontal reduction at the end, not one per block. */
static inline int non_finite(const float *x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; j++) {
    uint32_t bits;
    memcpy(&bits, x + j, 4);
    bad |= ZP_INF_OR_NAN(bits);
  }
  return (int)bad;
}

/* ---- IEEE half floats: float32 -> fp16 bits rounds to nearest even (numpy's astype, ggml's
 * GGML_FP32_TO_FP16); fp16 -> float32 is exact. ---- */

#if defined(__FLT16_MANT_DIG__)
/* The compiler has _Float16 (gcc >= 12, clang on x86-64 and arm64): a cast, one instruction
 * where the CPU converts halves (F16C, AVX-512, arm64). */
#define ZP_NATIVE_HALF 1
static inline uint16_t half_bits(float f) {
  _Float16 h = (_Float16)f;
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}

static inline float half_to_float(uint16_t b) {
  _Float16 h;
  memcpy(&h, &b, 2);
  return (float)h;
}
#else
/* The same conversions in integer arithmetic, bit for bit. */
#define ZP_NATIVE_HALF 0
static inline uint16_t half_bits(float f) {
  uint32_t b, a;
  memcpy(&b, &f, 4);
  uint32_t sign = (b >> 16) & 0x8000u;
  a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
  if (a >= 0x47800000u) return (uint16_t)(sign | 0x7c00u);              /* >= 2^16: inf */
  if (a < 0x38800000u) {                                                /* a subnormal half */
    float t = fabsf(f) + 0.5f; /* the ulp of 0.5 is 2^-24, the subnormal step: the add rounds */
    memcpy(&a, &t, 4);
    return (uint16_t)(sign | (a - 0x3f000000u));
  }
  a += 0xfffu + ((a >> 13) & 1u); /* ties to even; a carry into the exponent is correct */
  return (uint16_t)(sign | ((a >> 13) - (112u << 10)));
}

static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023, b;
  float f;
  if (e == 31) { /* inf, or a NaN made quiet, as the CPUs' conversion instructions do */
    b = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0);
  } else if (e == 0) {
    f = (float)m * 0x1p-24f;
    return sign ? -f : f;
  } else {
    b = sign | ((e + 112) << 23) | (m << 13);
  }
  memcpy(&f, &b, 4);
  return f;
}
#endif

static inline int half_finite(uint16_t b) { return (b & 0x7c00u) != 0x7c00u; }

/* The fp16 at p (little-endian, as ggml stores it) as a float, and v stored there as fp16. */
static inline float get_half(const uint8_t *p) {
  return half_to_float((uint16_t)(p[0] | (p[1] << 8)));
}

static inline void put_half(uint8_t *p, float v) {
  uint16_t h = half_bits(v);
  p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8);
}

#endif
