"""ggml's types (one table), block formats in torch (bit-exact with gguf-py; the K-quants with
llama.cpp), and GGUF files."""

from ..lazy import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "dequantize_blocks": ".blocks",
    "quantize_blocks": ".blocks",
    "TYPES": ".types",
    "GGMLType": ".types",
    "ggml_type": ".types",
}

__all__ = ["TYPES", "GGMLType", "dequantize_blocks", "ggml_type", "quantize_blocks"]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
