/* Bit packing of unsigned codes, the layout of packing.py: code i occupies bits
 * [i*b, (i+1)*b) of a little-endian bit stream. Every 8 codes of b bits are exactly b bytes,
 * so the stream is built a run of 8 codes at a time in one 64-bit word. */
#include <stdint.h>

#include "zeropoint.h"

void zp_pack(const uint8_t *codes, int64_t n, int bits, uint8_t *out) {
  const int64_t runs = n / 8;
  for (int64_t r = 0; r < runs; r++) {
    const uint8_t *c = codes + 8 * r;
    uint64_t w = 0;
    for (int i = 0; i < 8; i++) w |= (uint64_t)c[i] << (i * bits);
    for (int j = 0; j < bits; j++) out[r * bits + j] = (uint8_t)(w >> (8 * j));
  }
  const int64_t rest = n - 8 * runs;
  if (rest) { /* a partial run: only the bytes that hold its bits are written */
    uint64_t w = 0;
    for (int64_t i = 0; i < rest; i++) w |= (uint64_t)codes[8 * runs + i] << (i * bits);
    for (int64_t j = 0; j < (rest * bits + 7) / 8; j++) out[runs * bits + j] = (uint8_t)(w >> (8 * j));
  }
}

void zp_unpack(const uint8_t *data, int64_t n, int bits, uint8_t *codes) {
  const uint64_t mask = (1u << bits) - 1;
  const int64_t runs = n / 8;
  for (int64_t r = 0; r < runs; r++) {
    uint64_t w = 0;
    for (int j = 0; j < bits; j++) w |= (uint64_t)data[r * bits + j] << (8 * j);
    for (int i = 0; i < 8; i++) codes[8 * r + i] = (uint8_t)((w >> (i * bits)) & mask);
  }
  const int64_t rest = n - 8 * runs;
  if (rest) {
    uint64_t w = 0;
    for (int64_t j = 0; j < (rest * bits + 7) / 8; j++) w |= (uint64_t)data[runs * bits + j] << (8 * j);
    for (int64_t i = 0; i < rest; i++) codes[8 * runs + i] = (uint8_t)((w >> (i * bits)) & mask);
  }
}
