"""Models to quantize and how to measure them: what MODEL names, offline loading, perplexity,
embedding cosine."""

from .evaluate import (
    PerplexityResult,
    default_text,
    embedding_cosine,
    lee_text,
    perplexity,
)
from .load import LoadedModel, load_model, strip_gguf_quantization
from .source import (
    DEFAULT_MODEL,
    ModelLoadError,
    ModelSource,
    default_model_path,
    resolve_model,
)

__all__ = [
    "LoadedModel", "ModelLoadError", "load_model", "default_model_path", "strip_gguf_quantization",
    "DEFAULT_MODEL", "ModelSource", "resolve_model",
    "PerplexityResult", "perplexity", "embedding_cosine", "default_text", "lee_text",
]
