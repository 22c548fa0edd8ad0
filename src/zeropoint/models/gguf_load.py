"""A GGUF file -> the float32 transformers model, config and tokenizer it describes, built from
zeropoint's own reader and C kernels.

transformers' GGUF path (`from_pretrained(gguf_file=...)`) reads the file with gguf-py's
GGUFReader three times (config, model, tokenizer) and dequantizes every tensor in numpy: 24 s for
SmolLM2-135M, a minute for Gemma 3 270M. Here the file is parsed once (gguf.reader), each tensor is
dequantized by gguf.convert.dequantize_tensor (bit-identical to gguf-py), renamed by the one
name table (gguf.export.hf_name, the reverse of the export's) and put into a model built without
initialising its weights. What transformers' GGUF loader undoes of llama.cpp's conversion is
undone here too: the Llama-family q/k row permutation and Gemma's +1 on norm weights.

transformers' own rules stay the reference for what a file means: the config keys come through
its GGUF_CONFIG_MAPPING table and the tokenizer through its GGUF tokenizer builders, fed from this
reader's metadata. tests/models/test_gguf_load.py holds every piece to transformers' GGUF loader.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..gguf.families import Family
from ..gguf.reader import GGUFFile

_GEMMA_TEXT = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}  # GGUF holds the text model


def gguf_config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The transformers config dict of a GGUF file, by transformers' own rules
    (modeling_gguf_pytorch_utils.load_gguf_checkpoint's config part) and tables, read through
    zeropoint's reader: large arrays (the vocabulary) are never decoded."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = gguf.get("general.architecture")
    # transformers reads a llama file named exactly "mistral" as Mistral (a list-membership test
    # on general.name); anything else keeps its architecture.
    updated = "mistral" if "llama" in arch and gguf.get("general.name") == "mistral" else arch
    config: dict[str, Any] = {
        "tie_word_embeddings": "output.weight" not in gguf,
    }
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(
            updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, value)
    for key, meta in gguf.metadata.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        renames = GGUF_CONFIG_MAPPING.get(prefix)
        if not renames or rest not in renames or renames[rest] in (None, -1):
            continue
        value = meta.value
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        config[renames[rest]] = value
    config["model_type"] = _GEMMA_TEXT.get(config.get("model_type"), config.get("model_type"))
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in gguf.metadata:
        config["vocab_size"] = len(gguf.get("tokenizer.ggml.tokens"))
    return config


def hf_config(config_dict: Mapping[str, Any]):
    """The transformers config (PretrainedConfig) of `gguf_config_dict`'s dict, as
    `AutoConfig.from_pretrained(gguf_file=...)` makes it."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))


def gguf_state_dict(gguf: GGUFFile, family: Family, config, *,
                    progress: bool = False) -> dict:
    """HF name -> float32 tensor for every tensor of the file that the family's checkpoints hold
    (rope_freqs.weight is not one: see load._apply_rope_factors). ValueError naming a tensor of
    the file that the family has no name for: dropping it would compute another model."""
    import torch

    from ..gguf.convert import dequantize_tensor
    from ..gguf.export import hf_name, unpermute_qk

    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    state: dict[str, torch.Tensor] = {}
    for info in _progress(gguf.tensors, progress, "dequantizing"):
        if info.name == "rope_freqs.weight":
            continue
        name = hf_name(info.name, family)
        if name is None:
            raise ValueError(f"{str(gguf.path)!r} holds tensor {info.name!r}, which a "
                             f"{family.name} model has no place for")
        raw = gguf.raw(info)
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else ""
        if family.permute_qk and kind in heads:
            # Rows dequantize independently: reorder the stored rows (a sixth of the float
            # bytes for a 4-bit type) rather than the float matrix.
            order = unpermute_qk(torch.arange(info.shape[0]), heads[kind]).numpy()
            raw = raw.reshape(info.shape[0], -1)[order].reshape(-1)
        w = dequantize_tensor(raw, info.type, info.shape)
        if info.type == "F32":
            w = w.clone()  # a view of the file's map otherwise
        if family.norm_offset and info.name.endswith("norm.weight"):
            w = w - family.norm_offset
        state[name] = w.contiguous()
    return state


def _progress(items, enabled: bool, what: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="tensor", leave=False)


def build_model(config, state: Mapping, *, attn_implementation: str | None = None):
    """A float32 eval-mode AutoModelForCausalLM of `config` holding `state` (tied output
    weights tied): built without initialising weights it would then overwrite."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    expected = set(model.state_dict())
    state = dict(state)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the GGUF tensors do not fit a {config.model_type} model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.float().eval()


def gguf_tokenizer(gguf: GGUFFile, config):
    """The tokenizer of a GGUF file, as `AutoTokenizer.from_pretrained(gguf_file=...)` makes it:
    the class AutoTokenizer picks for the config's type, its vocabulary built by transformers'
    GGUF tokenizer builders from the metadata this reader already holds (transformers' path
    reads the file twice more, once for a config it has)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    # transformers' get_gguf_tokenizer, over zeropoint's metadata
    groups = {group: {name: gguf.get(f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in gguf.metadata}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocabulary, init = groups["tokenizer"], groups["tokenizer_config"]
    kind = vocabulary.get("tokenizer_type")
    if kind == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to
        init.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        init["add_bos_token"] = False
    tokens = vocabulary.get("tokens") or []
    for name, key in _SPECIAL_TOKENS.items():
        token_id = gguf.get(f"tokenizer.ggml.{key}")
        init[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf.get("general.architecture"), vocabulary)

    cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend
    if cls.__name__ == "MistralCommonBackend":  # it needs Mistral's own files, which GGUF lacks
        cls = TokenizersBackend
    return cls(tokenizer_object=backend, name_or_path=str(gguf.path.parent), **init, **extra)
