"""Which ggml type each tensor gets: llama.cpp's named mixes, single types, and recipe files.

The rules are llama.cpp's (`src/llama-quant.cpp`: `tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`) for dense (non-MoE) models, ported rule for
rule, so that `plan_types` picks what `llama_model_quantize` picks. In short:

- Only 2-D weights change type; norms, biases and other 1-D tensors are kept as they are.
- The output matrix (and token_embd when it doubles as the output, i.e. tied embeddings) gets
  Q6_K, or Q8_0 when its rows do not tile into the mix's blocks or the mix is Q8_0.
- K mixes spend more bits on some attn_v / ffn_down / attn_output tensors (by layer position).
- Shape fallback: a row length that the chosen type's block (256 for K types) does not divide
  takes a 32-block type instead (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  every 256-value i-quant -> IQ4_NL), or F16 when not even 32 divides it. Every fallback is
  recorded in the plan.
- The i-quant mixes (IQ_MIXES) have rules of their own, some of which depend on whether an
  importance matrix is given; `needs_imatrix` says which tensors llama-quantize refuses without.

Targets: a mix name (`MIXES`: the llama.cpp ftypes zeropoint can write), a single ggml type that
is not a mix name (Q3_K, Q4_K, Q5_K: every quantizable tensor in that type, llama.cpp's --pure),
or a recipe JSON file:

    {"default": "Q4_K_M",                      # a mix name or a ggml type (required)
     "pure": false,                            # true: no mix rules, `default` everywhere
     "tensors": {"attn_v": "Q8_0",             # regex -> type; the first pattern found in a
                 "blk\\.(0|1)\\.": "Q6_K"}}    # tensor's name wins (llama-quantize --tensor-type)

A pattern replaces the mix's rule for the tensors it names; shape fallbacks still apply.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from .metadata import MetaValue
from .types import TYPES, WRITABLE_TYPES, ggml_type, is_quantized

# llama.cpp's llama_ftype number (general.file_type) and default tensor type of each mix.
MIXES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q8_0": (7, "Q8_0"),
    "Q2_K": (10, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    # the i-quant mixes (IQ3_XS and IQ3_M default to IQ3_S, IQ2_S to IQ2_XS, IQ2_M to IQ2_S)
    "IQ2_XXS": (19, "IQ2_XXS"), "IQ2_XS": (20, "IQ2_XS"), "IQ3_XS": (22, "IQ3_S"),
    "IQ3_XXS": (23, "IQ3_XXS"), "IQ1_S": (24, "IQ1_S"), "IQ4_NL": (25, "IQ4_NL"),
    "IQ3_S": (26, "IQ3_S"), "IQ3_M": (27, "IQ3_S"), "IQ2_S": (28, "IQ2_XS"),
    "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"), "IQ1_M": (31, "IQ1_M"),
}
IQ_MIXES = tuple(m for m in MIXES if m.startswith("IQ"))
# The i-quant mixes below 3 bits, which llama.cpp gives rules of their own.
_LOW_BIT_MIXES = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# Target types llama-quantize refuses to make without importance (tensor_requires_imatrix),
# except for token_embd and output.
NEED_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
# Single types that are no mix name, and the file type llama.cpp writes for them with --pure.
PURE_TYPES: dict[str, int] = {"Q3_K": 12, "Q4_K": 15, "Q5_K": 17}

# Name fragments of 2-D tensors that llama.cpp never quantizes (tensor_allows_quantization).
_KEEP_FRAGMENTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


# --- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the user asked for, resolved."""

    name: str  # as given: "Q4_K_M", "Q4_K", or a recipe's path
    default_type: str  # the type of tensors no rule or pattern names
    mix: str | None  # the llama.cpp mix whose rules apply; None for a pure type
    file_type: int  # llama_ftype, written as general.file_type
    overrides: tuple[tuple[str, str], ...] = ()  # (regex, type); the first found in a name wins

    def describe(self) -> str:
        kind = f"llama.cpp mix {self.mix}" if self.mix else f"{self.default_type} everywhere"
        extra = f", {len(self.overrides)} pattern(s)" if self.overrides else ""
        return f"{self.name} ({kind}{extra})"


def _accepted() -> str:
    return (f"accepted: a llama.cpp mix ({', '.join(MIXES)}), a single type "
            f"({', '.join(PURE_TYPES)}), or a recipe .json file")


def parse_target(spec: str) -> Target:
    """A mix name, a pure single type, or a recipe file path -> Target (ValueError otherwise)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"type must be a non-empty string; {_accepted()}")
    key = spec.upper()
    if key in MIXES:
        return Target(key, MIXES[key][1], key, MIXES[key][0])
    if key in PURE_TYPES:
        return Target(key, key, None, PURE_TYPES[key])
    path = Path(spec)
    if path.suffix.lower() == ".json" or path.is_file():
        return load_recipe(path)
    hint = ""
    if key in TYPES:
        hint = f" ({key} is a ggml type zeropoint cannot write or a mix llama.cpp has no name for)"
    raise ValueError(f"unknown type {spec!r}{hint}; {_accepted()}")


def load_recipe(path: str | Path) -> Target:
    """Read a recipe JSON file (format in the module docstring) -> Target."""
    import json  # only for a recipe: a named mix or type needs no JSON reader

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"recipe file {str(path)!r} does not exist; {_accepted()}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read recipe {str(path)!r}: {e}") from None
    return recipe_target(doc, name=str(path))


def recipe_target(doc: Mapping, name: str = "recipe") -> Target:
    """A recipe as a dict -> Target."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"recipe {name!r} must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"default", "pure", "tensors"}
    if unknown:
        raise ValueError(f"recipe {name!r}: unknown key(s) {sorted(unknown)}; "
                         "accepted: default, pure, tensors")
    if "default" not in doc:
        raise ValueError(f"recipe {name!r} needs a \"default\" type or mix")
    default = str(doc["default"]).upper()
    pure = doc.get("pure", False)
    if not isinstance(pure, bool):
        raise ValueError(f"recipe {name!r}: \"pure\" must be true or false, got {pure!r}")
    if default in MIXES:
        ftype, default_type = MIXES[default]
        mix = None if pure else default
    elif default in WRITABLE_TYPES:
        ftype, default_type, mix = PURE_TYPES[default], default, None  # Q3_K, Q4_K, Q5_K
    else:
        raise ValueError(f"recipe {name!r}: unknown default {doc['default']!r}; accepted: "
                         f"{', '.join(MIXES)} or a type {', '.join(WRITABLE_TYPES)}")
    tensors = doc.get("tensors", {})
    if not isinstance(tensors, Mapping):
        raise ValueError(f"recipe {name!r}: \"tensors\" must map name patterns to types")
    overrides = []
    for pattern, qtype in tensors.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"recipe {name!r}: bad pattern {pattern!r}: {e}") from None
        qtype = str(qtype).upper()
        if qtype not in WRITABLE_TYPES:
            raise ValueError(f"recipe {name!r}: pattern {pattern!r} names type {qtype!r}; "
                             f"accepted: {', '.join(WRITABLE_TYPES)}")
        overrides.append((pattern, qtype))
    return Target(name, default_type, mix, ftype, tuple(overrides))


# --- model facts the rules need -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelParams:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B: 8 query heads share each attn_v
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv

    @staticmethod
    def from_metadata(metadata: Mapping[str, MetaValue]) -> ModelParams:
        def get(key, default=None):
            m = metadata.get(key)
            if m is None:
                return default
            v = m.value
            return v[0] if isinstance(v, list) and v else v  # per-layer arrays: layer 0's

        arch = get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError("the GGUF metadata has no general.architecture")
        n_layer = get(f"{arch}.block_count")
        if not isinstance(n_layer, int):
            raise ValueError(f"the GGUF metadata has no {arch}.block_count")
        n_head = get(f"{arch}.attention.head_count", 0)
        return ModelParams(arch, n_layer, n_head, get(f"{arch}.attention.head_count_kv", n_head),
                           get(f"{arch}.expert_count", 0) or 0)


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorChoice:
    name: str
    shape: tuple[int, ...]  # torch order; shape[-1] is the row length
    source_type: str
    type: str  # what gets written
    wanted: str  # what the mix or pattern chose, before the shape fallback

    @property
    def fallback(self) -> bool:
        return self.wanted != self.type

    @property
    def copied(self) -> bool:  # llama.cpp copies a tensor already in its target type
        return self.type == self.source_type

    def describe_fallback(self) -> str:
        cols, block = self.shape[-1], ggml_type(self.wanted).block_size
        return (f"{self.name}: {self.wanted} -> {self.type} (rows of {cols} values are not a "
                f"multiple of {self.wanted}'s block of {block})")


@dataclass
class Plan:
    target: Target
    choices: list[TensorChoice] = field(default_factory=list)  # in llama.cpp's write order

    @property
    def fallbacks(self) -> list[TensorChoice]:
        return [c for c in self.choices if c.fallback]

    def types(self) -> dict[str, str]:
        return {c.name: c.type for c in self.choices}

    def counts(self) -> Counter:
        return Counter(c.type for c in self.choices)

    def weight_bytes(self) -> int:
        """Tensor bytes of the file this plan makes (no header, no vocabulary): what
        llama-quantize's output holds, known from the shapes before anything is quantized."""
        total = 0
        for c in self.choices:
            t = ggml_type(c.type)
            total += prod(c.shape) // t.block_size * t.type_size
        return total


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order (its weights_map comparer): by block number (none first), then
    by name. The K mixes count attn_v and ffn_down tensors in this order."""
    return sorted(names, key=lambda n: (_layer(n), n))


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization: 2-D+ weights that are not norms and the like."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(f in name for f in _KEEP_FRAGMENTS) and name not in _KEEP_NAMES


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for fragment, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_v"),
                          ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                          ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                          ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if fragment in name:
            return cat
    return "other"


def fallback_type(ncols: int, qtype: str) -> str:
    """tensor_type_fallback: the type a row of `ncols` values gets instead of `qtype`."""
    if ncols % ggml_type(qtype).block_size == 0:
        return qtype
    chosen = ggml_type(ggml_type(qtype).fallback or qtype)
    if chosen.block_size > 32:
        raise ValueError(f"no fallback is defined for {qtype}")
    return chosen.name if ncols % chosen.block_size == 0 else "F16"


def plan_types(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    target: Target | str,
    params: ModelParams,
    *,
    has_imatrix: bool = False,
) -> Plan:
    """(name, source type, shape) of every tensor -> the Plan: each tensor's type, in llama.cpp's
    order, with the fallbacks it takes. `has_imatrix`: an importance matrix is given, which
    changes some rules (llama.cpp's qs.has_imatrix)."""
    target = parse_target(target) if isinstance(target, str) else target
    if params.n_expert > 1:
        raise ValueError(f"mixture-of-experts models ({params.n_expert} experts) are not "
                         "supported: llama.cpp's expert rules are not ported")
    if params.arch == "falcon" and target.mix:
        raise ValueError("llama.cpp's mixes have falcon-specific rules that are not ported; "
                         "pass a single type with a recipe that sets \"pure\": true")
    by_name = {}
    for name, source_type, shape in tensors:
        by_name[name] = (source_type, tuple(int(s) for s in shape))
    names = llama_order(by_name)
    state = _Counters(
        n_attention_wv=sum(_category(n) in ("attn_v", "attn_qkv") for n in names),
        tied=("output.weight" not in by_name),
    )
    patterns = [(re.compile(p), t) for p, t in target.overrides]
    plan = Plan(target)
    for name in names:
        source_type, shape = by_name[name]
        if not allows_quantization(name, shape):
            plan.choices.append(TensorChoice(name, shape, source_type, source_type, source_type))
            continue
        new = target.default_type
        manual = next((t for p, t in patterns if p.search(name)), None)
        if manual is not None:
            new = manual
        elif target.mix is not None and is_quantized(new):
            new = _mix_rule(target.mix, new, name, shape, state, params, has_imatrix)
        wanted = new
        if is_quantized(new):
            new = fallback_type(shape[-1], new)
        plan.choices.append(TensorChoice(name, shape, source_type, new, wanted))
    return plan


@dataclass
class _Counters:
    n_attention_wv: int
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_rule(mix: str, new: str, name: str, shape, st: _Counters, hp: ModelParams,
              has_imatrix: bool = False) -> str:
    """llama_tensor_get_type_impl for the mixes in MIXES, dense models."""
    if mix in IQ_MIXES:
        return _iq_mix_rule(mix, new, name, shape, st, hp, has_imatrix)
    cat = _category(name)
    if cat == "output" or (st.tied and cat == "token_embd"):
        if shape[-1] % ggml_type(new).block_size:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return new
    if cat in ("attn_v", "attn_qkv"):  # category_is_attn_v; it also catches attn_qkv, so
        # llama.cpp's later attn_qkv branch is never reached and is not ported
        if mix == "Q2_K":
            new = "Q4_K" if hp.n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if st.i_attention_wv < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "Q6_K"
        elif mix == "Q4_K_S" and st.i_attention_wv < 4:
            new = "Q5_K"
        if hp.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        st.i_attention_wv += 1
    elif cat == "ffn_down":
        i, n = st.i_ffn_down, hp.n_layer
        if mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix == "Q4_K_M":
            if _use_more_bits(i, n):
                new = "Q6_K"
        elif mix == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif mix == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down layers of weighted Q4_0/Q5_0 with a min
            new = "Q4_1" if mix == "Q4_0" else "Q5_1"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, new)
    return new



def _iq_mix_rule(mix: str, new: str, name: str, shape, st: _Counters, hp: ModelParams,
                 has_imatrix: bool) -> str:
    """llama_tensor_get_type_impl for the i-quant mixes (IQ_MIXES), dense models."""
    cat, gqa4 = _category(name), hp.n_gqa >= 4
    if cat == "output" or (st.tied and cat == "token_embd"):
        if shape[-1] % ggml_type(new).block_size:
            return "Q8_0"
        if mix in _LOW_BIT_MIXES or mix == "IQ3_XXS":
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        return "IQ3_S" if mix in ("IQ2_S", "IQ2_M", "IQ3_XXS") else new
    a_iq3_s = mix in ("IQ2_S", "IQ2_M")  # these two spend IQ3_S where the others spend Q2_K
    if mix in _LOW_BIT_MIXES:
        if cat in ("attn_v", "attn_qkv"):
            new = "Q4_K" if gqa4 else "IQ3_S" if a_iq3_s else "Q2_K"
            st.i_attention_wv += 1
        elif cat == "ffn_down":
            if st.i_ffn_down < hp.n_layer // 8:
                new = "IQ3_S" if a_iq3_s else "Q2_K"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if mix in ("IQ1_S", "IQ1_M"):
                new = "IQ2_XXS"
            elif a_iq3_s:
                new = "IQ3_S"
        return new
    if cat in ("attn_v", "attn_qkv"):
        if mix == "IQ3_XXS":
            new = "Q4_K" if gqa4 else "IQ3_XXS" if has_imatrix else "IQ3_S"
        elif mix in ("IQ3_XS", "IQ3_S") and gqa4:
            new = "Q4_K"
        elif mix == "IQ3_M":
            new = "Q4_K"
        elif mix in ("IQ4_NL", "IQ4_XS") and gqa4:
            new = "Q5_K"
        if hp.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        st.i_attention_wv += 1
    elif cat in ("attn_k", "attn_q"):
        new = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(mix, new)
    elif cat == "ffn_down":
        i, n = st.i_ffn_down, hp.n_layer
        if mix == "IQ3_XXS" and not has_imatrix:
            new = "Q4_K" if i < n // 8 else "Q3_K"
        elif mix == "IQ3_M" and i < n // 8:
            new = "Q4_K"
        elif mix in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not has_imatrix:
            new = "Q5_K"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        new = {"IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}.get(mix, new)
    elif cat in ("ffn_gate", "ffn_up"):
        i = st.i_ffn_gate if cat == "ffn_gate" else st.i_ffn_up
        if mix == "IQ3_XS" and hp.n_layer // 8 <= i < 7 * hp.n_layer // 8:
            new = "IQ3_XXS"
        if cat == "ffn_gate":
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
    return new


def needs_imatrix(choice: TensorChoice) -> bool:
    """llama.cpp's tensor_requires_imatrix: whether llama-quantize refuses to write this tensor
    without an importance matrix (the i-quants below IQ3_S and IQ4; Q2_K_S is not a mix here)."""
    if choice.name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return choice.type in NEED_IMATRIX and allows_quantization(choice.name, choice.shape)
