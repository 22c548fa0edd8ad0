"""The ggml types: one frozen value per type, holding everything zeropoint keys on a type's name.

Ids and sizes are ggml's own (`enum ggml_type` in ggml.h, the block structs of ggml-common.h),
written out here rather than read from gguf-py at run time; tests/gguf/test_types.py holds them
to gguf-py's `GGMLQuantizationType` and `GGML_QUANT_SIZES`. Adding a type that zeropoint writes
means marking its entry writable (with its code bits, fallback and grid) and adding its kernels.

The C kernels (csrc/) take a type as this same ggml number; csrc/zeropoint.h lists the numbers
and sizes of the types they know, and the tests compare that list with this table.
"""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # values per K-quant (and i-quant) super-block
QK_LEGACY = 32  # values per block of the legacy types Q4_0 .. Q8_1

# float: F32, F16, BF16, F64; int: I8 .. I64; legacy: one scale (and minimum) per small block;
# k: super-blocks of sub-blocks with their own small scales; iq: codebook (lattice) codes;
# ternary: TQ1_0, TQ2_0; fp4: 4-bit floats with a shared scale.
FAMILIES = ("float", "int", "legacy", "k", "iq", "ternary", "fp4")


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # ggml's type number: what a GGUF file stores, and what csrc's kernels switch on
    block_size: int  # values per block
    type_size: int  # bytes per block
    family: str  # one of FAMILIES
    writable: bool = False  # zeropoint writes it: the floats by a cast, block types by its kernels
    bits: int | None = None  # bits of each code (written types); None where codes are not ints
    has_min: bool = False  # ggml's "type-1": x = d * q + m (K types: - dmin * m), not d * q
    fallback: str | None = None  # llama.cpp's type for rows its block does not tile
    grid: str | None = None  # the kind of GPTQ grid it has (gptq_grids.block_grid), if any

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ggml type {self.name}: unknown family {self.family!r}; "
                             f"accepted: {', '.join(FAMILIES)}")

    @property
    def quantized(self) -> bool:
        """Whether its values are codes on a grid (not plain floats or integers)."""
        return self.family not in ("float", "int")


def _legacy(name, id, type_size, bits=None, **kw) -> GGMLType:
    return GGMLType(name, id, QK_LEGACY, type_size, "legacy", bits=bits, **kw)


def _k(name, id, type_size, bits=None, **kw) -> GGMLType:
    return GGMLType(name, id, QK_K, type_size, "k", bits=bits, **kw)


def _iq(name, id, type_size) -> GGMLType:
    return GGMLType(name, id, QK_K, type_size, "iq", writable=True, fallback="IQ4_NL")


# Table order is the order of the lists that error messages show: floats, then the legacy types
# as zeropoint has always listed them (Q8_0 first), then the K types.
_ALL = (
    GGMLType("F32", 0, 1, 4, "float", writable=True),
    GGMLType("F16", 1, 1, 2, "float", writable=True),
    GGMLType("BF16", 30, 1, 2, "float", writable=True),
    GGMLType("F64", 28, 1, 8, "float"),
    GGMLType("I8", 24, 1, 1, "int"),
    GGMLType("I16", 25, 1, 2, "int"),
    GGMLType("I32", 26, 1, 4, "int"),
    GGMLType("I64", 27, 1, 8, "int"),
    _legacy("Q8_0", 8, 34, 8, writable=True, grid="legacy"),
    _legacy("Q4_0", 2, 18, 4, writable=True, grid="legacy"),
    _legacy("Q4_1", 3, 20, 4, has_min=True, writable=True, grid="legacy"),
    _legacy("Q5_0", 6, 22, 5, writable=True, grid="legacy"),
    _legacy("Q5_1", 7, 24, 5, has_min=True, writable=True, grid="legacy"),
    _legacy("Q8_1", 9, 40),
    GGMLType("Q1_0", 41, 128, 18, "legacy"),
    _k("Q2_K", 10, 84, 2, has_min=True, writable=True, fallback="Q4_0", grid="k"),
    _k("Q3_K", 11, 110, 3, writable=True, fallback="Q4_0", grid="k"),
    _k("Q4_K", 12, 144, 4, has_min=True, writable=True, fallback="Q5_0", grid="k"),
    _k("Q5_K", 13, 176, 5, has_min=True, writable=True, fallback="Q5_1", grid="k"),
    _k("Q6_K", 14, 210, 6, writable=True, fallback="Q8_0", grid="k"),
    _k("Q8_K", 15, 292),
    # i-quants (gguf/iquants.py): codebook codes, no integer code width; the 256-value ones fall
    # back to IQ4_NL (llama-quant.cpp's tensor_type_fallback), which falls back to F16.
    _iq("IQ2_XXS", 16, 66),
    _iq("IQ2_XS", 17, 74),
    _iq("IQ2_S", 22, 82),
    _iq("IQ3_XXS", 18, 98),
    _iq("IQ3_S", 21, 110),
    _iq("IQ1_S", 19, 50),
    _iq("IQ1_M", 29, 56),
    GGMLType("IQ4_NL", 20, QK_LEGACY, 18, "iq", writable=True),
    _iq("IQ4_XS", 23, 136),
    GGMLType("TQ1_0", 34, QK_K, 54, "ternary"),
    GGMLType("TQ2_0", 35, QK_K, 66, "ternary"),
    GGMLType("MXFP4", 39, 32, 17, "fp4"),
    GGMLType("NVFP4", 40, 64, 36, "fp4"),
)
TYPES: dict[str, GGMLType] = {t.name: t for t in _ALL}
_BY_ID: dict[int, GGMLType] = {t.id: t for t in _ALL}
# Every type a tensor may be given (recipes included), in TYPES' order.
WRITABLE_TYPES = tuple(name for name, t in TYPES.items() if t.writable)


def ggml_type(key: str | int) -> GGMLType:
    """The type named `key` ('Q4_K'), or whose ggml number is `key` (12, as a GGUF file stores
    it). ValueError naming an unknown one and listing the accepted."""
    if isinstance(key, str):
        found = TYPES.get(key)
        if found is None:
            raise ValueError(f"unknown ggml type {key!r}; accepted: {', '.join(TYPES)}")
        return found
    if isinstance(key, int) and not isinstance(key, bool):
        found = _BY_ID.get(key)
        if found is None:
            ids = ", ".join(f"{t.id} ({t.name})" for t in sorted(_ALL, key=lambda t: t.id))
            raise ValueError(f"unknown ggml type id {key}; accepted: {ids}")
        return found
    raise TypeError(f"a ggml type is a name (str, e.g. 'Q4_K') or a ggml type id (int), "
                    f"got {type(key).__name__}")


def is_quantized(name: str) -> bool:
    """Whether ggml type `name` stores codes on a grid rather than plain floats or integers."""
    return ggml_type(name).quantized
