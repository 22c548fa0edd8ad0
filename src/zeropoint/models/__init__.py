"""Models to quantize and how to measure them: what MODEL names, offline loading, perplexity,
embedding cosine."""

_EXPORTS = {  # name -> the module that defines it
    "PerplexityResult": ".evaluate",
    "default_text": ".evaluate",
    "embedding_cosine": ".evaluate",
    "lee_text": ".evaluate",
    "perplexity": ".evaluate",
    "LoadedModel": ".load",
    "load_model": ".load",
    "strip_gguf_quantization": ".load",
    "DEFAULT_MODEL": ".source",
    "ModelLoadError": ".source",
    "ModelSource": ".source",
    "default_model_path": ".source",
    "resolve_model": ".source",
}

__all__ = [
    "LoadedModel", "ModelLoadError", "load_model", "default_model_path", "strip_gguf_quantization",
    "DEFAULT_MODEL", "ModelSource", "resolve_model",
    "PerplexityResult", "perplexity", "embedding_cosine", "default_text", "lee_text",
]


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
