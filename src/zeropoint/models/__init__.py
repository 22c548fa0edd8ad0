"""Models to quantize and how to measure them: offline loading, perplexity, embedding cosine."""

from .evaluate import (
    PerplexityResult,
    default_text,
    embedding_cosine,
    lee_text,
    perplexity,
)
from .load import (
    LoadedModel,
    ModelLoadError,
    default_model_path,
    load_model,
    strip_gguf_quantization,
)

__all__ = [
    "LoadedModel", "ModelLoadError", "load_model", "default_model_path", "strip_gguf_quantization",
    "PerplexityResult", "perplexity", "embedding_cosine", "default_text", "lee_text",
]
