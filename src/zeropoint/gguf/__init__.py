"""ggml's types (one table), block formats in torch (bit-exact with gguf-py; the K-quants with
llama.cpp), and GGUF files."""

_EXPORTS = {  # name -> the module that defines it
    "dequantize_blocks": ".blocks",
    "quantize_blocks": ".blocks",
    "TYPES": ".types",
    "GGMLType": ".types",
    "ggml_type": ".types",
}

__all__ = ["TYPES", "GGMLType", "dequantize_blocks", "ggml_type", "quantize_blocks"]


def __getattr__(name: str):
    # Imported on first use: `zeropoint --help` and the GGUF requantizer load this package
    # without torch, which its modules import (see cli/__init__.py).
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
