"""What transformers' GGUF reader leaves out of a model's config, put back from the file's metadata.

transformers maps only a few GGUF keys to its configs (integrations/ggml.py GGUF_CONFIG_MAPPING):
a Qwen3 file's head size, a Gemma file's query scale, layer pattern, local rope base and
soft-capping, fall back to the defaults of the largest models. Where those differ from the file,
transformers computes another model than llama.cpp does on the same bytes. The GGUF file is the
reference here: every value below is what llama.cpp's graph for the family uses
(src/models/{gemma2,gemma3,phi3}.cpp; llama-model.cpp's defaults).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..gguf.families import Family

_LLAMA_SWA_ROPE_BASE = 10000.0  # llama_hparams.rope_freq_base_train_swa's default
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's 27B type: another query scale


def gguf_config_overrides(metadata: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """transformers config attributes -> values, from a GGUF file's metadata (name -> value)."""
    arch = family.arch

    def get(key, default=None):
        return metadata.get(f"{arch}.{key}", default)

    out: dict[str, Any] = {}
    n_layer, hidden, n_head = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or (hidden // n_head if hidden and n_head else None)
    if head_dim:
        out["head_dim"] = int(head_dim)
    if arch in ("gemma2", "gemma3"):
        is_27b = n_layer == _GEMMA_27B_LAYERS[arch]
        out["query_pre_attn_scalar"] = hidden // n_head if is_27b else int(head_dim)
        pattern = get("attention.sliding_window_pattern")
        every = family.swa_pattern
        if arch == "gemma3" and not get("attention.sliding_window"):
            sliding = [False] * n_layer  # llama.cpp: no window key, no sliding layers
        elif isinstance(pattern, list):
            sliding = [bool(p) for p in pattern][:n_layer]
        elif isinstance(pattern, int):  # a period, as llama.cpp reads it
            sliding = [i % pattern < pattern - 1 for i in range(n_layer)]
        else:
            sliding = [i % every < every - 1 for i in range(n_layer)]
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        out["final_logit_softcapping"] = get("final_logit_softcapping")
        if arch == "gemma2":
            out["attn_logit_softcapping"] = get("attn_logit_softcapping")
        base = float(get("rope.freq_base", 10000.0))
        local = float(get("rope.freq_base_swa", base if arch == "gemma2" else _LLAMA_SWA_ROPE_BASE))
        if arch == "gemma3":
            full = {"rope_type": "default", "rope_theta": base}
            if get("rope.scaling.type") == "linear" and get("rope.scaling.factor"):
                full.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
            out["rope_parameters"] = {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            }
    if arch == "phi3":
        out["sliding_window"] = None  # llama.cpp turns Phi-3's window off (src/models/phi3.cpp)
    return out


def apply_overrides(config, overrides: Mapping[str, Any]) -> None:
    """Set each attribute on a transformers config, in place."""
    for key, value in overrides.items():
        setattr(config, key, value)
