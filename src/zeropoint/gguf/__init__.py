"""ggml block formats in torch (bit-exact with gguf-py; the K-quants with llama.cpp), and GGUF
files through gguf-py."""
from zeropoint.gguf.blocks import (
    BLOCK_SIZE,
    FORMATS,
    TYPE_SIZE,
    BlockFormat,
    block_format,
    dequantize_blocks,
    quantize_blocks,
)
from zeropoint.gguf.kquants import K_FORMATS, KQuantFormat

__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "K_FORMATS",
    "TYPE_SIZE",
    "BlockFormat",
    "KQuantFormat",
    "block_format",
    "dequantize_blocks",
    "quantize_blocks",
]
