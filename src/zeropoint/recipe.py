"""Recipe: which spec each layer of a model gets.

A default spec plus rules by module-name pattern (fnmatch: `lm_head`, `*.down_proj`,
`model.layers.0.*`). The last rule that matches a name wins, so a general rule can come first and
exceptions after it. A rule with spec None keeps the layer in float. Only Linear layers and
Embedding tables are ever quantized; a table takes the default spec when `quantize_embeddings`
says so, and a rule that names it either way (see `Recipe.spec_for`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

from .atomic import atomic_path
from .spec import QuantSpec

ACTIVATION_MODES = (None, "int8-dynamic")
# What a module is, as far as quantizing its weight goes (zeropoint.nn.layers.module_kind).
MODULE_KINDS = ("linear", "embedding")


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch pattern over the module's qualified name
    spec: QuantSpec | None  # None: keep this module in float


# The default, chosen by measurement (benchmarks/choose_default.py, README "The default, chosen
# by measurement"), which Recipe.chosen() puts together:
# linears in 4 bits, groups of 32, a float16 scale and float16 minimum per group (ggml's Q4_1
# grid, 5 bits per weight); the embedding and the output head (one tensor when tied) in 8 bits
# per row, which the compact decoder's int8 gemv reads in place.
DEFAULT_LINEAR_SPEC = QuantSpec(4, "asymmetric", "per_group", group_size=32,
                                scale_dtype="float16", zero_point="float")
DEFAULT_TABLE_SPEC = QuantSpec(8, "symmetric", "per_channel")
# Module names of token embeddings (Llama, Gemma, Qwen, Mistral, Phi: embed_tokens; GPT-2: wte).
EMBEDDING_PATTERNS = ("*embed_tokens", "*wte")


# The other arrangement of the same two forms (models/choose.py measures both): the linears in
# 8 bits per output channel, the embedding and head in the 4-bit float-minimum groups. On a model
# whose table holds most of the weights (Gemma 3's 262,144 x 640) it is the smaller of the two.
WIDE_LINEAR_SPEC = DEFAULT_TABLE_SPEC
WIDE_TABLE_SPEC = DEFAULT_LINEAR_SPEC


def _default_rules(table: QuantSpec | None = DEFAULT_TABLE_SPEC) -> tuple[Rule, ...]:
    tables = ("lm_head",) + EMBEDDING_PATTERNS
    return tuple(Rule(pattern, table) for pattern in tables)


@dataclass(frozen=True)
class Recipe:
    default: QuantSpec | None = DEFAULT_LINEAR_SPEC
    # The output head sees every token's full hidden state; it is the most sensitive layer.
    # (Recipe.chosen() quantizes it, and the embedding, in 8 bits per row instead.)
    rules: tuple[Rule, ...] = (Rule("lm_head", None),)
    # Embedding tables take the default spec too (else only a rule naming them quantizes them).
    quantize_embeddings: bool = False
    # "int8-dynamic": 8-bit weights with activations quantized to 8 bits at run time.
    activations: str | None = None

    def __post_init__(self):
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(
                f"unknown activation mode {self.activations!r}; accepted: None, 'int8-dynamic'"
            )
        object.__setattr__(self, "rules", tuple(self.rules))

    def spec_for(self, name: str, kind: str | None = "linear") -> QuantSpec | None:
        """The spec for the module called `name`, or None to keep it in float.

        kind: "linear" (the default spec, then the rules), "embedding" (the default spec only
        with `quantize_embeddings`; a rule that matches its name applies either way), or None
        for any other module, which always stays float."""
        if kind is not None and kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {kind!r}; accepted: 'linear', 'embedding', None")
        if kind is None:
            return None
        spec = self.default if kind == "linear" or self.quantize_embeddings else None
        for rule in self.rules:
            if fnmatchcase(name, rule.pattern):
                spec = rule.spec
        return spec

    @classmethod
    def chosen(cls) -> "Recipe":
        """The default of `zeropoint quantize` and `quantize_model`, chosen by measurement:
        DEFAULT_LINEAR_SPEC on every Linear; the embedding and the output head hold most of a
        small model's bytes, and 8 bits per row (DEFAULT_TABLE_SPEC) keeps them close to float."""
        return cls(DEFAULT_LINEAR_SPEC, _default_rules())

    @classmethod
    def linears_and_tables(cls, linear: QuantSpec | None, table: QuantSpec | None) -> "Recipe":
        """Every Linear in `linear`; the token embedding and the output head (one tensor when
        tied) in `table` (None: float)."""
        return cls(linear, _default_rules(table))

    def with_rules(self, rules: Iterable[Rule]) -> "Recipe":
        """This recipe with `rules` after its own, so that they win where they match."""
        return replace(self, rules=self.rules + tuple(rules))

    @classmethod
    def uniform(cls, spec: QuantSpec | None, keep_float=("lm_head",), **kw) -> "Recipe":
        return cls(spec, tuple(Rule(p, None) for p in keep_float), **kw)

    def to_dict(self) -> dict:
        return {
            "default": _spec_dict(self.default),
            "rules": [{"pattern": r.pattern, "spec": _spec_dict(r.spec)} for r in self.rules],
            "quantize_embeddings": self.quantize_embeddings,
            "activations": self.activations,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = set(d) - {"default", "rules", "quantize_embeddings", "activations"}
        if unknown:
            raise ValueError(
                f"unknown recipe keys {sorted(unknown)}; accepted: default, rules, "
                "quantize_embeddings, activations"
            )
        rules = tuple(Rule(r["pattern"], _spec_from(r.get("spec"))) for r in d.get("rules", ()))
        return cls(
            _spec_from(d.get("default")), rules, bool(d.get("quantize_embeddings", False)),
            d.get("activations"),
        )

    def save(self, path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "Recipe":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"recipe file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"recipe file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _spec_dict(spec: QuantSpec | None):
    return None if spec is None else spec.to_dict()


def _spec_from(d) -> QuantSpec | None:
    return None if d is None else QuantSpec.from_dict(d)
