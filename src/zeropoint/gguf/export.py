"""A Hugging Face llama-architecture checkpoint (SmolLM2, Llama, ...) -> a GGUF file llama.cpp runs.

What llama.cpp needs, and where it comes from (the facts are those of llama.cpp's
convert_hf_to_gguf.py for LlamaForCausalLM; the code is zeropoint's):

- architecture metadata from config.json (`llama.block_count`, `llama.embedding_length`, heads,
  rope base and scaling, RMS-norm epsilon, ...);
- the tokenizer from tokenizer.json: byte-level BPE only (`tokenizer.ggml.model` "gpt2"): tokens
  and their types, merges, special-token ids, add-BOS flag, chat template; the pre-tokenizer
  ("pre") is read off the tokenizer's structure (`TOKENIZER_PRE`), or given;
- tensors renamed (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), with the
  query and key projections' rows permuted: transformers rotates the two halves of each head
  (rotate_half), ggml rotates adjacent pairs, so each head's rows go from [x0..x(d/2-1), y0..]
  to [x0, y0, x1, y1, ...] (`permute_qk`).

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
from gguf import GGUFValueType, GGUFWriter, RopeScalingType, SpecialVocab, TokenType

from .metadata import Metadata, MetaValue
from .mixes import ModelParams, Target
from .requantize import Encoder, Importance, QuantizeReport, SourceTensor, write_quantized

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
ARCH = "llama"

# HF name (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by every runtime

# Pre-tokenizers llama.cpp knows by name, told apart by tokenizer.json's structure.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_PRE = {
    "gpt-2": "ByteLevel with its GPT-2 regex",
    "smollm": "each digit split off, then ByteLevel with the GPT-2 regex (SmolLM, SmolLM2)",
    "llama-bpe": "Split on Llama 3's regex, then ByteLevel without a regex (Llama 3)",
}


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
    requantize.convert (gguf.hqq.hqq_encode writes HQQ's blocks); `importance`: an importance
    matrix's lookup, and `extra_metadata`, as for requantize.write_quantized.

    Raises ValueError for an architecture other than LlamaForCausalLM (naming it), a tokenizer
    that is not byte-level BPE, missing or unexpected tensors.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    check_architecture(config, model_dir)
    hp = _hparams(config)
    sources = _tensor_sources(model_dir, config, hp)
    metadata = export_metadata(model_dir, config, hp, tokenizer_pre)
    params = ModelParams(ARCH, hp["n_layer"], hp["n_head"], hp["n_head_kv"])
    return write_quantized(sources, metadata, target, out, params=params,
                           source_name=str(model_dir), progress=progress, threads=threads,
                           encoder=encoder, importance=importance,
                           extra_metadata=extra_metadata)


def check_architecture(config: Mapping, where: Path | str = "the checkpoint") -> None:
    archs = list(config.get("architectures") or [])
    if any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return
    if not archs and config.get("model_type") == ARCH:
        return
    named = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise ValueError(f"cannot export architecture {named} from {str(where)!r} to GGUF; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (the llama architecture: "
                     "SmolLM2, Llama, TinyLlama, ...)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{str(path.parent)!r} is not a Hugging Face checkpoint: "
                         f"no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None


def _hparams(config: Mapping) -> dict:
    try:
        n_head = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        hp = {
            "n_layer": int(config["num_hidden_layers"]),
            "hidden": hidden,
            "ff": int(config["intermediate_size"]),
            "n_head": n_head,
            "n_head_kv": int(config.get("num_key_value_heads") or n_head),
            "head_dim": int(config.get("head_dim") or hidden // n_head),
            "eps": float(config.get("rms_norm_eps", 1e-6)),
            "n_ctx": int(config.get("max_position_embeddings", 2048)),
            "vocab": int(config["vocab_size"]),
            "tied": bool(config.get("tie_word_embeddings", False)),
        }
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}, which a llama model needs") from None
    # transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta/scaling.
    rope = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling {rope_type!r} is not supported by the GGUF export; "
                         "supported: none, linear, llama3")
    hp["rope"], hp["rope_type"] = rope, rope_type
    return hp


# --- tensors ----------------------------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * head_dim, ...) rows in transformers' rotate-half order -> ggml's interleaved
    order: within each head, row i of the first half and row i of the second half become
    neighbours (convert_hf_to_gguf's LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a HF llama tensor; None if it is not stored; ValueError if unknown."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        stem, kind = ".".join(parts[3:-1]), parts[-1]
        if stem in _LAYER_NAMES and kind in ("weight", "bias"):
            return f"blk.{parts[2]}.{_LAYER_NAMES[stem]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF name in the llama architecture")


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


def _tensor_sources(model_dir: Path, config: Mapping, hp: dict) -> list[SourceTensor]:
    from safetensors import safe_open

    where = _checkpoint_files(model_dir)
    sources: list[SourceTensor] = []
    for hf_name, file in where.items():
        if hp["tied"] and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the output matrix from token_embd
        name = gguf_name(hf_name)
        if name is None:
            continue
        with safe_open(file, framework="pt") as st:
            shape = tuple(st.get_slice(hf_name).get_shape())
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        n_head = {"attn_q": hp["n_head"], "attn_k": hp["n_head_kv"]}.get(kind, 0)  # and biases

        def read(file=file, hf_name=hf_name, n_head=n_head):
            with safe_open(file, framework="pt") as st:
                w = st.get_tensor(hf_name).to(torch.float32)
            if n_head:
                w = permute_qk(w, n_head)
            return w.contiguous().view(-1).view(torch.uint8).numpy()

        sources.append(SourceTensor(name, "F32", shape, read))
    if hp["rope_type"] == "llama3":
        factors = _llama3_rope_factors(hp)
        sources.append(SourceTensor("rope_freqs.weight", "F32", tuple(factors.shape),
                                    lambda: factors.view(np.uint8)))
    _check_complete({s.name for s in sources}, hp)
    return sources


def _check_complete(names: set[str], hp: dict) -> None:
    needed = {"token_embd.weight", "output_norm.weight"}
    if not hp["tied"]:
        needed.add("output.weight")
    for i in range(hp["n_layer"]):
        needed |= {f"blk.{i}.{n}.weight" for n in _LAYER_NAMES.values()}
    missing = sorted(needed - names)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) a llama model needs, "
                         f"e.g. {', '.join(missing[:3])}")


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


def export_metadata(model_dir: Path, config: Mapping, hp: dict,
                    tokenizer_pre: str | None) -> Metadata:
    # gguf-py's writer knows every key's name and type; it is used here as a dict builder.
    w = GGUFWriter(None, ARCH)
    w.add_type("model")
    name = config.get("_name_or_path") or config.get("_model_name_or_path") or model_dir.name
    w.add_name(str(name))
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
    w.add_rope_dimension_count(hp["head_dim"])
    _add_tokenizer(w, model_dir, hp["vocab"], tokenizer_pre)

    out: Metadata = {}
    for key, v in w.kv_data[0].items():
        sub = v.sub_type
        if v.type == GGUFValueType.ARRAY and sub is None:
            sub = GGUFValueType.get_type(v.value[0])
        value = [int(x) for x in v.value] if sub == GGUFValueType.INT32 else v.value
        out[key] = MetaValue(value if v.type != GGUFValueType.ARRAY else list(value), v.type, sub)
    return out


def _add_tokenizer(w: GGUFWriter, model_dir: Path, n_vocab: int, pre: str | None) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{str(model_dir)!r} has no tokenizer.json; the GGUF export needs the "
                         "fast (byte-level BPE) tokenizer saved with it")
    tok = _read_json(path)
    model = tok.get("model") or {}
    decoder = tok.get("decoder") or {}
    if (model.get("type") != "BPE" or model.get("byte_fallback")
            or decoder.get("type") != "ByteLevel"):
        raise ValueError(f"tokenizer {model.get('type')!r} with decoder {decoder.get('type')!r} in "
                         f"{str(path)!r} is not supported; the GGUF export handles byte-level BPE "
                         "tokenizers (GPT-2 style: SmolLM2, Llama 3)")
    pre = pre or detect_pre(tok)
    if pre is None:
        raise ValueError(f"cannot tell llama.cpp's pre-tokenizer from {str(path)!r} "
                         f"({json.dumps(tok.get('pre_tokenizer'))[:200]}); pass tokenizer_pre, one "
                         f"of: {', '.join(TOKENIZER_PRE)} (or another name llama.cpp knows)")

    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in model.get("vocab", {}).items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond config.json's "
                         f"vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):  # convert_hf_to_gguf's get_vocab_base
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)
    # llama.cpp adds a BOS unless told not to; say what the HF tokenizer does.
    for kind in ("bos", "eos"):
        if kind not in special.add_special_token:
            getattr(w, f"add_add_{kind}_token")(False)


def detect_pre(tok: Mapping) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its pre_tokenizer's structure."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
    return None
