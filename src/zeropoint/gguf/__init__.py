"""ggml's types (one table), block formats in torch (bit-exact with gguf-py; the K-quants with
llama.cpp), and GGUF files."""
from zeropoint.gguf.blocks import dequantize_blocks, quantize_blocks
from zeropoint.gguf.types import TYPES, GGMLType, ggml_type

__all__ = ["TYPES", "GGMLType", "dequantize_blocks", "ggml_type", "quantize_blocks"]
