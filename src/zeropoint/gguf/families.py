"""The model families zeropoint knows, one frozen table each: what a Hugging Face checkpoint of the
family looks like and what llama.cpp expects of its GGUF file.

The facts are those of llama.cpp's convert_hf_to_gguf.py (conversion/llama.py, qwen.py, gemma.py,
phi.py) and src/models/*.cpp; the tables are zeropoint's. One home for them: the GGUF export and
GPTQ into GGUF (this layer) and the model loader (models/, above it) all read them here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# HF name inside a decoder layer (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.").
_LLAMA_LAYER = {
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
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma 2/3 wrap both the attention and the MLP in a norm before and after ("sandwich" norms);
# llama.cpp calls the one before the MLP ffn_norm, as in Llama.
_GEMMA_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Phi-3 computes q, k, v with one Linear (rows [q; k; v]) and gate, up with another (rows
# [gate; up]); llama.cpp reads them fused as they are (attn_qkv; ffn_up of 2 * n_ff rows, whose
# first half is the gate).
_PHI3_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = MappingProxyType({
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
})


@dataclass(frozen=True)
class Family:
    """One model family. Every field is a fact about the family, not an option."""

    name: str  # what users call it, in messages: "Qwen2/2.5"
    model_types: tuple[str, ...]  # config.json model_type values
    architectures: tuple[str, ...]  # config.json architectures (transformers classes)
    arch: str  # llama.cpp's architecture name (general.architecture, the metadata key prefix)
    layer_names: Mapping[str, str]  # HF module in a decoder layer -> GGUF tensor stem
    # llama.cpp's "normal" rope turns adjacent pairs, transformers turns the two halves of each
    # head: the q/k rows are permuted for those archs only (NEOX-rope archs need nothing).
    permute_qk: bool
    # Added to every norm weight on export: Gemma's RMSNorm computes x * (1 + w), llama.cpp's
    # x * w (convert_hf_to_gguf adds 1; transformers' GGUF loader takes it off again).
    norm_offset: float = 0.0
    # Both runtimes scale the embedding rows by sqrt(hidden) (Gemma) in the graph: nothing is
    # written, but the stored rows are not the vectors the first layer sees.
    embedding_scale: str | None = None
    biases: tuple[str, ...] = ()  # Linears with a bias (stored as blk.{i}.attn_q.bias, ...)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    fused: tuple[str, ...] = ()  # Linears that hold several projections (Phi-3)
    sliding_window: bool = False  # writes {arch}.attention.sliding_window
    attn_softcap: bool = False  # writes {arch}.attn_logit_softcapping
    final_softcap: bool = False  # writes {arch}.final_logit_softcapping
    # tokenizer.ggml.model for this family's usual tokenizer.json; both byte-level BPE ("gpt2")
    # and SentencePiece-style BPE with byte fallback ("llama") are told apart by the file itself.
    tokenizer_model: str = "gpt2"
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer when tokenizer.json can't tell
    # SWA layers in llama.cpp's default pattern: every n-th layer is global (0: all sliding)
    swa_pattern: int | None = None
    rope_scaling: tuple[str, ...] = ("default",)  # rope_type values the export writes
    notes: str = ""


def _frozen(d: dict) -> Mapping[str, str]:
    return MappingProxyType(dict(d))


LLAMA = Family(
    name="Llama", model_types=("llama",), architectures=("LlamaForCausalLM",), arch="llama",
    layer_names=_frozen(_LLAMA_LAYER), permute_qk=True,
    rope_scaling=("default", "linear", "llama3"),
    notes="Llama 2/3/3.x, SmolLM, TinyLlama; Llama 3.1's rope scaling as rope_freqs.weight",
)
MISTRAL = Family(
    name="Mistral", model_types=("mistral",), architectures=("MistralForCausalLM",),
    arch="llama",  # convert_hf_to_gguf writes Mistral 7B as a llama model
    layer_names=_frozen(_LLAMA_LAYER), permute_qk=True, tokenizer_model="llama",
    rope_scaling=("default", "linear"),
    notes="llama.cpp's llama arch has no sliding window: Mistral v0.1's 4096-token window is "
          "not applied there (as with convert_hf_to_gguf)",
)
QWEN2 = Family(
    name="Qwen2/2.5", model_types=("qwen2",), architectures=("Qwen2ForCausalLM",), arch="qwen2",
    layer_names=_frozen(_LLAMA_LAYER), permute_qk=False,
    biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), tokenizer_pre="qwen2",
)
QWEN3 = Family(
    name="Qwen3", model_types=("qwen3",), architectures=("Qwen3ForCausalLM",), arch="qwen3",
    layer_names=_frozen({**_LLAMA_LAYER, **_QK_NORM}), permute_qk=False, qk_norm=True,
    tokenizer_pre="qwen2",
)
GEMMA2 = Family(
    name="Gemma 2", model_types=("gemma2",), architectures=("Gemma2ForCausalLM",), arch="gemma2",
    layer_names=_frozen(_GEMMA_LAYER), permute_qk=False, norm_offset=1.0,
    embedding_scale="sqrt(hidden_size)", sliding_window=True, attn_softcap=True,
    final_softcap=True, tokenizer_model="llama", swa_pattern=2,
)
GEMMA3 = Family(
    name="Gemma 3", model_types=("gemma3_text", "gemma3"), architectures=("Gemma3ForCausalLM",),
    arch="gemma3", layer_names=_frozen({**_GEMMA_LAYER, **_QK_NORM}), permute_qk=False,
    norm_offset=1.0, embedding_scale="sqrt(hidden_size)", qk_norm=True, sliding_window=True,
    final_softcap=True, tokenizer_model="llama", swa_pattern=6,
    rope_scaling=("default", "linear"),
    notes="text-only checkpoints (Gemma3ForCausalLM: 270M, 1B); the multimodal "
          "Gemma3ForConditionalGeneration is not exported",
)
PHI3 = Family(
    name="Phi-3", model_types=("phi3",), architectures=("Phi3ForCausalLM",), arch="phi3",
    layer_names=_frozen(_PHI3_LAYER), permute_qk=False,
    fused=("self_attn.qkv_proj", "mlp.gate_up_proj"), sliding_window=True,
    tokenizer_model="llama",
    notes="llama.cpp ignores Phi-3's sliding window (src/models/phi3.cpp); the 128k models' "
          "longrope scaling is not exported",
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3)


def supported() -> str:
    """'Llama (LlamaForCausalLM), Mistral (MistralForCausalLM), ...': for messages."""
    return ", ".join(f"{f.name} ({f.architectures[0]})" for f in FAMILIES)


class UnknownFamilyError(ValueError):
    """A model whose family zeropoint has no table for."""


def family_of(config: Mapping | object, where: str = "the model") -> Family:
    """The family of a config (config.json as a dict, or a transformers PretrainedConfig).

    The architectures named decide, then the model_type. Raises UnknownFamilyError naming what
    the config says and listing the supported families.
    """
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    archs = list(get("architectures") or [])
    model_type = get("model_type")
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    if not any(a.endswith("ForConditionalGeneration") for a in archs):
        for fam in FAMILIES:
            if model_type in fam.model_types:
                return fam
    named = ", ".join(archs) or "no architectures"
    raise UnknownFamilyError(
        f"{where} is of an unsupported model family: {named} (model_type {model_type!r}); "
        f"supported: {supported()}")


def family_of_arch(arch: str, where: str = "the GGUF file") -> Family:
    """The family of a GGUF file's general.architecture (Mistral files say "llama": Llama's
    table serves both). Raises UnknownFamilyError listing those supported."""
    for fam in FAMILIES:
        if fam.arch == arch:
            return fam
    raise UnknownFamilyError(
        f"{where} has llama.cpp architecture {arch!r}, of no family zeropoint supports; "
        f"supported: {', '.join(sorted({f.arch for f in FAMILIES}))} "
        f"({', '.join(f.name for f in FAMILIES)})")
