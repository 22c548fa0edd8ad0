"""What the compact decoder (compact_runtime.py) needs to know about a causal LM, read from its
Hugging Face config: one decoder runs every family it knows, and this is where they differ.

The facts come from transformers' modeling files of each family (models/<family>/modeling_*.py):
- Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3: RMSNorm times its weight, rotary embedding on q and k,
  SiLU-gated MLP; Qwen2 adds q/k/v biases (the modules carry them), Qwen3 per-head RMSNorms of q
  and k before the rotation, Phi-3 one fused qkv_proj and one gate_up_proj (gate first), Mistral
  and Phi-3 a sliding window on every layer when the config sets one.
- Gemma 2 and 3: RMSNorm times (1 + weight), the embedding times sqrt(hidden), a GELU-tanh MLP,
  norms on the attention and MLP outputs too ("sandwich"), attention scaled by
  query_pre_attn_scalar**-0.5, sliding-window layers as config.layer_types says. Gemma 2
  soft-caps attention scores and the final logits (tanh(x / cap) * cap); Gemma 3 adds per-head
  q/k norms and a rotary table per layer type (local and global bases).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FamilyTraits:
    """How a family's decoder layer departs from Llama's."""

    norm_offset: float = 0.0  # RMSNorm multiplies by weight + norm_offset (Gemma: 1)
    scaled_embedding: bool = False  # the embedding is multiplied by sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs as well (Gemma 2, 3)
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotation (Qwen3, Gemma 3)
    fused_projections: bool = False  # qkv_proj and gate_up_proj instead of q/k/v, gate/up (Phi-3)
    query_pre_attn_scalar: bool = False  # attention scale from config.query_pre_attn_scalar


_GEMMA2 = FamilyTraits(norm_offset=1.0, scaled_embedding=True, sandwich_norms=True,
                       query_pre_attn_scalar=True)
# Every family the decoder runs, by its config's model_type; each is held to the HF model's
# logits by tests/nn/test_compact_families.py.
FAMILIES = {
    "llama": FamilyTraits(),
    "mistral": FamilyTraits(),
    "qwen2": FamilyTraits(),
    "qwen3": FamilyTraits(qk_norm=True),
    "gemma2": _GEMMA2,
    "gemma3_text": replace(_GEMMA2, qk_norm=True),
    "phi3": FamilyTraits(fused_projections=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# transformers' activation names -> the decoder's two gates.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
# Rope types whose frequencies depend on every length seen before (the module's own state):
# a table built once cannot follow them. (longrope depends only on the block's last position,
# which the decoder follows with two tables.)
_STATEFUL_ROPE = ("dynamic",)
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's view of one model: sizes, and the family's variations as values."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    activation: str  # "silu" or "gelu_tanh"
    attention_scale: float
    traits: FamilyTraits
    attn_softcap: float | None  # attention scores -> tanh(s / cap) * cap, or None
    final_softcap: float | None  # the same on the logits
    windows: tuple[int | None, ...]  # per layer: keys within this many positions, or all
    rope_keys: tuple[str | None, ...]  # per layer: the rotary module's layer_type, or None
    # (rope key, original_max_position_embeddings) for each longrope table: positions of a block
    # that ends past it use the long factors (transformers' longrope_frequency_update).
    longrope: tuple[tuple[str | None, int], ...]

    @property
    def embed_scale(self) -> float | None:
        return self.hidden**0.5 if self.traits.scaled_embedding else None

    @classmethod
    def from_model(cls, model) -> DecoderConfig:
        """Read `model`'s config; ValueError naming what the decoder does not run."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(
                f"the compact decoder does not know this model family: got model type "
                f"{model_type!r}; accepted: {', '.join(SUPPORTED_MODEL_TYPES)}")
        inner = getattr(model, "model", None)
        if getattr(model, "lm_head", None) is None or not hasattr(inner, "layers"):
            raise ValueError(f"the compact decoder needs a causal LM with model.layers and "
                             f"lm_head, got {type(model).__name__}")
        traits = FAMILIES[model_type]
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{model_type} with use_bidirectional_attention is not causal; the "
                             "compact decoder runs causal attention only")
        act_name = getattr(config, "hidden_activation", None) or config.hidden_act
        if act_name not in ACTIVATIONS:
            raise ValueError(f"the compact decoder has no activation {act_name!r}; accepted: "
                             f"{', '.join(ACTIVATIONS)}")
        n_layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scale = (config.query_pre_attn_scalar**-0.5 if traits.query_pre_attn_scalar
                 else head_dim**-0.5)
        return cls(
            model_type=model_type, layers=n_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            rms_eps=config.rms_norm_eps, activation=ACTIVATIONS[act_name],
            attention_scale=scale, traits=traits,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            windows=_windows(config, n_layers), rope_keys=_rope_keys(config, n_layers),
            longrope=_longrope(config))


def _layer_types(config, n_layers: int):
    types = getattr(config, "layer_types", None)
    if types is None:
        return None
    types = tuple(types[:n_layers])
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"the compact decoder has no attention layer type {unknown[0]!r}; "
                         f"accepted: {', '.join(_LAYER_TYPES)}")
    return types


def _windows(config, n_layers: int) -> tuple[int | None, ...]:
    """Per layer the sliding window: config.layer_types says which layers slide (Qwen2/3, Gemma);
    without it (Mistral, Phi-3) every layer does when config.sliding_window is set."""
    window = getattr(config, "sliding_window", None)
    types = _layer_types(config, n_layers)
    if window is None:
        return (None,) * n_layers
    if types is None:
        return (window,) * n_layers
    return tuple(window if t == "sliding_attention" else None for t in types)


def _rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def _per_layer_type(params: dict) -> bool:
    """Gemma 3 keeps one rope dict per layer type; the others one flat dict."""
    return any(isinstance(v, dict) for v in params.values())


def _rope_keys(config, n_layers: int) -> tuple[str | None, ...]:
    params = _rope_parameters(config)
    if not _per_layer_type(params):
        kinds = {None: params}
        keys = (None,) * n_layers
    else:
        types = _layer_types(config, n_layers)
        if types is None:
            raise ValueError("rope parameters per layer type need config.layer_types")
        kinds, keys = params, types
    for key, p in kinds.items():
        rope_type = (p or {}).get("rope_type", "default")
        if rope_type in _STATEFUL_ROPE:
            raise ValueError(f"rope type {rope_type!r} depends on the decoded length; the "
                             "compact decoder precomputes cos/sin once")
    return keys


def _longrope(config) -> tuple[tuple[str | None, int], ...]:
    params = _rope_parameters(config)
    kinds = params.items() if _per_layer_type(params) else [(None, params)]
    return tuple((key, int(p.get("original_max_position_embeddings")
                           or config.original_max_position_embeddings))
                 for key, p in kinds if (p or {}).get("rope_type") == "longrope")
