/* Walking a GGUF header's string arrays without decoding them (gguf/header.py's skip_strings):
 * a 262,144-token vocabulary is a chain of lengths, each saying where the next one starts, which
 * Python walked at 0.3 us a string. */
#include <stdint.h>
#include <string.h>

#include "zeropoint.h"

/* The offset just past `count` strings (a little-endian u64 length, then that many bytes)
 * starting at buf + pos, or -1 if one of them, or its length, runs past buf + size. */
int64_t zp_skip_strings(const uint8_t *buf, int64_t size, int64_t pos, int64_t count) {
  for (int64_t i = 0; i < count; i++) {
    if (pos > size - 8) return -1;
    uint64_t n;
    memcpy(&n, buf + pos, 8); /* GGUF is little-endian, as is every machine zeropoint runs on */
    pos += 8;
    if (n > (uint64_t)(size - pos)) return -1;
    pos += (int64_t)n;
  }
  return pos;
}
