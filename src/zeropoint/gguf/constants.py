"""The numbers of the GGUF format that reading and writing a file needs, held here so that doing
so never imports gguf-py: its import loads every table it has, yaml and sentencepiece, and cost
a requantization 0.07 s of CPU, a fifth of its start-up. The same names and values as gguf-py's
(tests/gguf/test_constants.py compares them), and GGUFValueType is an IntEnum like gguf-py's, so
members of either compare and hash alike."""
from __future__ import annotations

from enum import IntEnum

GGUF_MAGIC = 0x46554747  # b"GGUF" as a little-endian u32
GGUF_VERSION = 3  # the version zeropoint writes
GGUF_DEFAULT_ALIGNMENT = 32
GGML_QUANT_VERSION = 2  # general.quantization_version of the block layouts zeropoint writes


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12
