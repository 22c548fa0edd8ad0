"""A compact spec syntax for the command line, and the menu that bit allocation chooses from.

    BITS[:GRANULARITY][:SCHEME][:narrow]

    BITS         1..8
    GRANULARITY  gN (per-group, N elements along the input features), channel (per output
                 channel), tensor (one scale for the whole weight). Default: g128.
    SCHEME       sym or asym. Default: sym.
    narrow       symmetric only: drop the lowest code so the grid mirrors around 0.

The parts after BITS may come in any order. Examples: `4:g128:sym` (the usual 4-bit LLM setting,
also plain `4`), `8:channel:sym`, `4:tensor:asym`, `3:g64`. `float` (or `none`) keeps every layer
in float: the reference itself, which reports infinite SQNR everywhere.
"""

from __future__ import annotations

from ..spec import Granularity, QuantSpec

SYNTAX = "BITS[:gN|channel|tensor][:sym|asym][:narrow], e.g. 4:g128:sym, 8:channel:sym, 4:tensor:asym"
FLOAT_WORDS = ("float", "none", "fp32")


def parse_spec(text: str) -> QuantSpec | None:
    """`4:g128:sym` -> QuantSpec(4, 'symmetric', 'per_group', group_size=128); 'float' -> None."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty spec; accepted: {SYNTAX}")
    words = [w.strip().lower() for w in text.strip().split(":")]
    if len(words) == 1 and words[0] in FLOAT_WORDS:
        return None
    try:
        bits = int(words[0])
    except ValueError:
        raise ValueError(
            f"spec {text!r} must start with the bit width (1..8); accepted: {SYNTAX}") from None
    granularity, group, scheme, narrow = "per_group", 128, "symmetric", False
    for w in words[1:]:
        if w in ("sym", "symmetric"):
            scheme = "symmetric"
        elif w in ("asym", "asymmetric"):
            scheme = "asymmetric"
        elif w in ("channel", "per-channel", "per_channel", "pc"):
            granularity, group = "per_channel", None
        elif w in ("tensor", "per-tensor", "per_tensor", "pt"):
            granularity, group = "per_tensor", None
        elif w.startswith("g") and w[1:].isdigit():
            granularity, group = "per_group", int(w[1:])
        elif w == "narrow":
            narrow = True
        else:
            raise ValueError(f"unknown part {w!r} in spec {text!r}; accepted: {SYNTAX}")
    try:
        return QuantSpec(bits, scheme, granularity, group_size=group, narrow_range=narrow)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {text!r}: {e}") from None


def parse_specs(text: str) -> list[QuantSpec | None]:
    """A comma-separated list of specs: '4:g128:sym,4:channel:sym,4:tensor:sym'."""
    parts = [p for p in (t.strip() for t in text.split(",")) if p]
    if not parts:
        raise ValueError(f"no spec given; accepted: a comma list of {SYNTAX}")
    return [parse_spec(p) for p in parts]


def format_spec(spec: QuantSpec | None) -> str:
    """The inverse of parse_spec: QuantSpec -> '4:g128:sym'; None -> 'float'."""
    if spec is None:
        return "float"
    if spec.granularity is Granularity.PER_GROUP:
        where = f"g{spec.group_size}"
    elif spec.granularity is Granularity.PER_CHANNEL:
        where = "channel"
    else:
        where = "tensor"
    parts = [str(spec.bits), where, "sym" if spec.symmetric else "asym"]
    if spec.narrow_range:
        parts.append("narrow")
    return ":".join(parts)


def label(spec: QuantSpec | None) -> str:
    """Human label for reports: 'int4 sym g128', or 'float'."""
    return "float" if spec is None else spec.describe()


# The allocation menu: every width the issue names (2..8 bits), three group sizes and one scale
# per output channel, both schemes. Per-tensor is left out: at any width it loses to per-channel
# by far for a few bytes (one scale per row), so it would never be chosen.
MENU_BITS = (2, 3, 4, 5, 6, 7, 8)
MENU_GROUPS = (32, 64, 128, None)  # None: per output channel
MENU_SCHEMES = ("symmetric", "asymmetric")


def menu(bits=MENU_BITS, groups=MENU_GROUPS, schemes=MENU_SCHEMES) -> list[QuantSpec]:
    """The specs bit allocation chooses from, one per (bits, group, scheme)."""
    out = []
    for b in bits:
        for g in groups:
            for s in schemes:
                if g is None:
                    out.append(QuantSpec(b, s, "per_channel"))
                else:
                    out.append(QuantSpec(b, s, "per_group", group_size=g))
    if not out:
        raise ValueError("the allocation menu is empty; give at least one bit width and group size")
    return out
