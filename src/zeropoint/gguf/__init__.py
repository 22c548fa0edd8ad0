"""ggml block formats in torch (bit-exact with gguf-py), and GGUF files through gguf-py."""
from zeropoint.gguf.blocks import (
    BLOCK_SIZE,
    FORMATS,
    TYPE_SIZE,
    BlockFormat,
    block_format,
    dequantize_blocks,
    quantize_blocks,
)

__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "TYPE_SIZE",
    "BlockFormat",
    "block_format",
    "dequantize_blocks",
    "quantize_blocks",
]
