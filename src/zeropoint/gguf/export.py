"""A Hugging Face checkpoint of a supported family (gguf.families: Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3, Phi-3) -> a GGUF file llama.cpp runs.

What llama.cpp needs, and where it comes from (the facts are those of llama.cpp's
convert_hf_to_gguf.py and src/models/*.cpp; the code is zeropoint's):

- architecture metadata from config.json (`{arch}.block_count`, `{arch}.embedding_length`,
  heads, head size, rope base and scaling, RMS-norm epsilon, sliding window and its layer
  pattern, soft-capping), under the family's llama.cpp architecture name;
- the tokenizer from tokenizer.json (hf_tokenizer: byte-level BPE or BPE with byte fallback);
- tensors renamed by the family's table (`model.layers.3.self_attn.q_proj.weight` ->
  `blk.3.attn_q.weight`), with, where the family says so:
  - the query and key rows permuted (llama arch: transformers rotates the two halves of each
    head, ggml's normal rope adjacent pairs, so each head's rows go from [x0..x(d/2-1), y0..] to
    [x0, y0, x1, y1, ...]; `permute_qk`);
  - 1 added to every norm weight (Gemma: transformers computes x * (1 + w), llama.cpp x * w).

Refused with a ValueError that names the problem: a family zeropoint has no table for, rope
scalings or attention scales llama.cpp would compute differently, missing or unknown tensors.
The float tensors then go through the same planning and quantization as a GGUF requantize, so
exporting to Q8_0 gives the same file as exporting to F32 and running llama.cpp's quantizer on it.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter, RopeScalingType

from .convert import Encoder
from .families import GLOBAL_NAMES, LLAMA, Family, UnknownFamilyError, family_of
from .hf_tokenizer import LLAMA3_REGEX, TOKENIZER_PRE, add_tokenizer, detect_pre  # noqa: F401
from .metadata import Metadata, MetaValue
from .mixes import ModelParams, Target
from .requantize import Importance, QuantizeReport, SourceTensor, write_quantized

ARCH = LLAMA.arch  # the llama family's; every family's is in gguf.families
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by every runtime


def export_hf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    target: Target | str = "F32",
    *,
    tokenizer_pre: str | None = None,
    progress: bool = False,
    threads: int | None = None,
    encoder: Encoder | None = None,
    importance: Importance | None = None,
    extra_metadata: Mapping[str, MetaValue] | None = None,
) -> QuantizeReport:
    """Write the checkpoint in `model_dir` as a GGUF file in `target` (a mix such as F32, Q8_0,
    Q4_K_M, a single type, or a recipe; see mixes). `tokenizer_pre` names llama.cpp's
    pre-tokenizer when zeropoint cannot tell it from tokenizer.json. `encoder`: as for
    convert.convert (gguf.hqq.hqq_encode writes HQQ's blocks); `importance`: an importance
    matrix's lookup, and `extra_metadata`, as for requantize.write_quantized.

    Raises ValueError for a model family zeropoint does not support (naming it and listing
    those supported), a tokenizer it cannot write, missing or unexpected tensors.
    """
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "config.json")
    family = check_architecture(raw, model_dir)
    config = load_config(model_dir)
    hp = hparams(config, family)
    sources = _tensor_sources(model_dir, hp)
    metadata = export_metadata(model_dir, config, hp, tokenizer_pre)
    return write_quantized(sources, metadata, target, out, params=model_params(hp),
                           source_name=str(model_dir), progress=progress, threads=threads,
                           encoder=encoder, importance=importance,
                           extra_metadata=extra_metadata)


def check_architecture(config: Mapping | object, where: Path | str = "the checkpoint") -> Family:
    """The family of `config` (config.json, or a transformers config); ValueError naming the
    architecture and listing the supported families when zeropoint has no table for it."""
    try:
        return family_of(config, f"{str(where)!r}")
    except UnknownFamilyError as e:
        raise UnknownFamilyError(f"cannot export architecture {_named(config)} to GGUF: "
                                 f"{e}") from None


def _named(config) -> str:
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    return ", ".join(get("architectures") or []) or f"model_type {get('model_type')!r}"


def load_config(model_dir: Path):
    """config.json through transformers, which brings every version's rope keys into one form."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {str(model_dir / 'config.json')!r}: {e}") from None


def model_params(hp: dict) -> ModelParams:
    return ModelParams(hp["family"].arch, hp["n_layer"], hp["n_head"], hp["n_head_kv"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{str(path.parent)!r} is not a Hugging Face checkpoint: "
                         f"no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The rope parameters of one kind of layer (Gemma 3 keeps one set per layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(rope.get(layer_type), Mapping):
        rope = dict(rope[layer_type])
    legacy = getattr(config, "rope_scaling", None)  # transformers 4's configs
    if isinstance(legacy, Mapping) and layer_type == "full_attention":
        rope.update(legacy)
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def hparams(config, family: Family) -> dict:
    """What the export reads from a transformers config, checked against what llama.cpp can
    compute for the family."""
    try:
        n_head = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        hp = {
            "family": family,
            "n_layer": int(config.num_hidden_layers),
            "hidden": hidden,
            "ff": int(config.intermediate_size),
            "n_head": n_head,
            "n_head_kv": int(getattr(config, "num_key_value_heads", None) or n_head),
            "head_dim": int(getattr(config, "head_dim", None) or hidden // n_head),
            "eps": float(getattr(config, "rms_norm_eps", 1e-6)),
            "n_ctx": int(getattr(config, "max_position_embeddings", 2048)),
            "vocab": int(config.vocab_size),
            "tied": bool(getattr(config, "tie_word_embeddings", False)),
        }
    except (AttributeError, TypeError) as e:
        raise ValueError(f"the config lacks what a {family.name} model needs: {e}") from None
    rope = _rope(config)
    if rope["rope_type"] not in family.rope_scaling:
        raise ValueError(f"rope scaling {rope['rope_type']!r} is not supported by the GGUF export "
                         f"of {family.name}; supported: {', '.join(family.rope_scaling)}")
    hp["rope"], hp["rope_type"] = rope, rope["rope_type"]
    hp["rope_dim"] = int(hp["head_dim"] * float(rope.get("partial_rotary_factor", 1.0)))
    if family.sliding_window:
        hp["sliding_window"] = getattr(config, "sliding_window", None)
        hp["layer_types"] = list(getattr(config, "layer_types", None) or [])
        if "sliding_attention" in hp["layer_types"]:
            hp["swa_rope_theta"] = float(_rope(config, "sliding_attention")["rope_theta"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        hp[key] = getattr(config, key, None)
    if family.norm_offset:  # Gemma
        _check_gemma_attention_scale(config, family, hp)
    return hp


# llama.cpp's Gemma 2/3 graphs scale queries by 1/sqrt(head_dim), except for the 27B models
# (recognised by their layer count), which use hidden/heads: query_pre_attn_scalar must agree.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _check_gemma_attention_scale(config, family: Family, hp: dict) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is None:
        return
    is_27b = hp["n_layer"] == _GEMMA_27B_LAYERS.get(family.arch)
    expected = hp["hidden"] // hp["n_head"] if is_27b else hp["head_dim"]
    if int(scalar) != expected:
        raise ValueError(f"query_pre_attn_scalar {scalar} differs from the {expected} llama.cpp's "
                         f"{family.name} graph uses for {hp['n_layer']} layers of head_dim "
                         f"{hp['head_dim']}: llama.cpp would compute another model")


# --- tensors ----------------------------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * head_dim, ...) rows in transformers' rotate-half order -> ggml's interleaved
    order: within each head, row i of the first half and row i of the second half become
    neighbours (convert_hf_to_gguf's LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def gguf_name(hf_name: str, family: Family = LLAMA) -> str | None:
    """The GGUF name of a HF tensor of `family`; None if it is not stored; ValueError if the
    family has no such tensor."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        stem, kind = ".".join(parts[3:-1]), parts[-1]
        if stem in family.layer_names and kind in ("weight", "bias"):
            return f"blk.{parts[2]}.{family.layer_names[stem]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF name in the {family.arch} architecture "
                     f"({family.name})")


def hf_name(gguf: str, family: Family = LLAMA) -> str | None:
    """The HF name of a GGUF tensor of `family`, by the same table as `gguf_name` read backwards;
    None for a name the family's checkpoints do not hold (rope_freqs.weight, unknown names)."""
    for hf, name in GLOBAL_NAMES.items():
        if name == gguf:
            return hf
    parts = gguf.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight",
                                                                                     "bias"):
        for stem, name in family.layer_names.items():
            if name == parts[2]:
                return f"model.layers.{parts[1]}.{stem}.{parts[3]}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk`: ggml's interleaved rows back to transformers' rotate-half
    order, (n_head * head_dim, ...) -> same shape."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def tensor_transform(hf_name: str, gguf: str, hp: dict):
    """What the export does to a tensor's float values on the way out (None: nothing): q/k rows
    permuted (llama arch), norm offsets (Gemma)."""
    family: Family = hp["family"]
    kind = gguf.split(".")[2] if gguf.startswith("blk.") else ""
    n_head = {"attn_q": hp["n_head"], "attn_k": hp["n_head_kv"]}.get(kind, 0)
    permute = n_head if family.permute_qk else 0
    offset = family.norm_offset if hf_name.endswith("norm.weight") else 0.0
    if not permute and not offset:
        return None

    def apply(w: torch.Tensor) -> torch.Tensor:
        if permute:
            w = permute_qk(w, permute)
        return w + offset if offset else w

    return apply


def permuted_heads(gguf: str, hp: dict) -> int:
    """The heads whose rows `permute_qk` reorders for this tensor; 0 for none."""
    if not hp["family"].permute_qk or not gguf.startswith("blk."):
        return 0
    return {"attn_q": hp["n_head"], "attn_k": hp["n_head_kv"]}.get(gguf.split(".")[2], 0)


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(model_dir)!r} holds no *.safetensors weights (pytorch_model.bin "
                         "is not read: re-save the model with save_pretrained())")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def _tensor_sources(model_dir: Path, hp: dict) -> list[SourceTensor]:
    from safetensors import safe_open

    family = hp["family"]
    where = _checkpoint_files(model_dir)
    sources: list[SourceTensor] = []
    for hf_name, file in where.items():
        if hp["tied"] and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the output matrix from token_embd
        name = gguf_name(hf_name, family)
        if name is None:
            continue
        with safe_open(file, framework="pt") as st:
            shape = tuple(st.get_slice(hf_name).get_shape())

        def read(file=file, hf_name=hf_name, change=tensor_transform(hf_name, name, hp)):
            with safe_open(file, framework="pt") as st:
                w = st.get_tensor(hf_name).to(torch.float32)
            if change is not None:
                w = change(w)
            return w.contiguous().view(-1).view(torch.uint8).numpy()

        sources.append(SourceTensor(name, "F32", shape, read))
    sources += extra_sources(hp)
    check_complete({s.name for s in sources}, hp)
    return sources


def extra_sources(hp: dict) -> list[SourceTensor]:
    """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3.1's rope factors)."""
    if hp["rope_type"] != "llama3":
        return []
    factors = _llama3_rope_factors(hp)
    return [SourceTensor("rope_freqs.weight", "F32", tuple(factors.shape),
                         lambda: factors.view(np.uint8))]


def check_complete(names: set[str], hp: dict) -> None:
    family: Family = hp["family"]
    needed = {"token_embd.weight", "output_norm.weight"}
    if not hp["tied"]:
        needed.add("output.weight")
    for i in range(hp["n_layer"]):
        needed |= {f"blk.{i}.{n}.weight" for n in family.layer_names.values()}
        needed |= {f"blk.{i}.{family.layer_names[b]}.bias" for b in family.biases}
    missing = sorted(needed - names)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) a {family.name} model "
                         f"needs, e.g. {', '.join(missing[:3])}")


def _llama3_rope_factors(hp: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, as the per-dimension factors llama.cpp
    reads from rope_freqs.weight (convert_hf_to_gguf: LlamaModel.generate_extra_tensors)."""
    rope, dim = hp["rope"], hp["head_dim"]
    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --- metadata ---------------------------------------------------------------------------------


def export_metadata(model_dir: Path, config, hp: dict, tokenizer_pre: str | None) -> Metadata:
    """The GGUF metadata of the export: architecture keys from `hp`, the tokenizer from
    `model_dir`'s tokenizer.json."""
    family: Family = hp["family"]
    # gguf-py's writer knows every key's name and type; it is used here as a dict builder.
    w = GGUFWriter(None, family.arch)
    w.add_type("model")
    # config.json's own name when it has one (transformers' config holds the load path instead)
    raw = _read_json(model_dir / "config.json")
    w.add_name(str(raw.get("_name_or_path") or raw.get("_model_name_or_path") or model_dir.name))
    w.add_block_count(hp["n_layer"])
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["hidden"])
    w.add_feed_forward_length(hp["ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_freq_base(float(hp["rope"]["rope_theta"]))
    w.add_layer_norm_rms_eps(hp["eps"])
    if hp["head_dim"] != hp["hidden"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if hp["rope_type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    w.add_vocab_size(hp["vocab"])
    w.add_rope_dimension_count(hp["rope_dim"])
    _add_family_keys(w, config, hp)
    add_tokenizer(w, model_dir, hp["vocab"], tokenizer_pre, family.tokenizer_pre)
    return writer_metadata(w)


def _add_family_keys(w: GGUFWriter, config, hp: dict) -> None:
    """Sliding window, its layer pattern and rope base, soft-capping: the keys llama.cpp's
    graph for the family reads (src/models/{gemma2,gemma3,phi3}.cpp)."""
    family: Family = hp["family"]
    if family.arch == "phi3":  # convert_hf_to_gguf: 0 tells "no window" (Phi-4) apart
        w.add_sliding_window(int(hp.get("sliding_window") or 0))
        w.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings",
                                                    None) or hp["n_ctx"]))
    elif family.sliding_window and hp.get("sliding_window"):
        w.add_sliding_window(int(hp["sliding_window"]))
        if hp["layer_types"]:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])
        if "swa_rope_theta" in hp:
            w.add_rope_freq_base_swa(hp["swa_rope_theta"])
    if family.attn_softcap and hp["attn_logit_softcapping"]:
        w.add_attn_logit_softcapping(float(hp["attn_logit_softcapping"]))
    if family.final_softcap and hp["final_logit_softcapping"]:
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))


def writer_metadata(w: GGUFWriter) -> Metadata:
    out: Metadata = {}
    for key, v in w.kv_data[0].items():
        sub = v.sub_type
        if v.type == GGUFValueType.ARRAY and sub is None:
            sub = GGUFValueType.get_type(v.value[0])
        value = [int(x) for x in v.value] if sub == GGUFValueType.INT32 else v.value
        out[key] = MetaValue(value if v.type != GGUFValueType.ARRAY else list(value), v.type, sub)
    return out
