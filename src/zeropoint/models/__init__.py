"""Models to quantize and how to measure them: what MODEL names, offline loading, perplexity,
embedding cosine."""

from ..lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
