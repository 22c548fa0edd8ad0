"""The ggml type table (zeropoint.gguf.types) against gguf-py, the independent oracle, and
against the tables that hang off it: the block kernels, the GPTQ grids and csrc/zeropoint.h."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from zeropoint import ckernels
from zeropoint.gguf.blocks import BLOCK_TYPES, LEGACY_TYPES
from zeropoint.gguf.gptq_grids import GRID_TYPES, GRIDS, block_grid
from zeropoint.gguf.kquants import K_FORMATS
from zeropoint.gguf.mixes import fallback_type
from zeropoint.gguf.types import (
    FAMILIES,
    QK_K,
    TYPES,
    WRITABLE_TYPES,
    GGMLType,
    ggml_type,
    is_quantized,
)


@pytest.mark.parametrize("name", list(TYPES))
def test_ids_and_sizes_are_ggmls(name):
    if name not in GGMLQuantizationType.__members__:
        pytest.skip(f"the gguf-py installed here predates {name}")
    t, theirs = TYPES[name], GGMLQuantizationType[name]
    assert t.id == theirs.value
    assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[theirs]


def test_every_type_gguf_py_knows_is_in_the_table():
    missing = [t.name for t in GGMLQuantizationType if t.name not in TYPES]
    assert not missing, f"add these ggml types to zeropoint.gguf.types: {missing}"


def test_names_and_ids_are_unique():
    ids = [t.id for t in TYPES.values()]
    assert len(set(ids)) == len(ids)
    assert all(name == t.name for name, t in TYPES.items())


def test_lookup_by_name_or_id():
    assert ggml_type("Q4_K") is TYPES["Q4_K"]
    assert ggml_type(12) is TYPES["Q4_K"]
    assert ggml_type(0).name == "F32"


def test_unknown_types_are_named_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown ggml type 'q4_k'; accepted: F32, F16, .*Q4_K"):
        ggml_type("q4_k")
    with pytest.raises(ValueError, match=r"unknown ggml type id 4; accepted: 0 \(F32\), 1 \(F16\)"):
        ggml_type(4)
    with pytest.raises(TypeError, match="a name .* or a ggml type id .* got float"):
        ggml_type(2.0)
    with pytest.raises(TypeError, match="got bool"):
        ggml_type(True)
    with pytest.raises(ValueError, match="unknown family 'kk'; accepted: float, int, legacy, k"):
        GGMLType("X", 99, 32, 18, "kk")


IQ_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS")


def test_writable_types_are_the_floats_and_zeropoints_block_types():
    assert WRITABLE_TYPES == ("F32", "F16", "BF16", *BLOCK_TYPES)
    assert BLOCK_TYPES == LEGACY_TYPES + tuple(K_FORMATS) + IQ_TYPES
    assert all(TYPES[n].family == "iq" and TYPES[n].bits is None for n in IQ_TYPES)
    assert LEGACY_TYPES == ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
    assert tuple(K_FORMATS) == ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    assert all(TYPES[n].family == "k" and TYPES[n].block_size == QK_K for n in K_FORMATS)


def test_families_and_quantized():
    assert {t.family for t in TYPES.values()} <= set(FAMILIES)
    assert [n for n in TYPES if not is_quantized(n)] == ["F32", "F16", "BF16", "F64", "I8", "I16",
                                                         "I32", "I64"]
    assert is_quantized("IQ4_XS") and is_quantized("Q8_0")


@pytest.mark.parametrize("name", LEGACY_TYPES + tuple(K_FORMATS))
def test_code_bits_and_min_match_the_name(name):
    """Q<bits>_<0|1> and Q<bits>_K: the _1 types and Q2_K, Q4_K, Q5_K have a minimum."""
    t = TYPES[name]
    assert t.bits == int(name[1])
    assert t.has_min == (name.endswith("_1") or name in ("Q2_K", "Q4_K", "Q5_K"))


@pytest.mark.parametrize("name", LEGACY_TYPES)
def test_legacy_type_size_is_its_layout(name):
    """fp16 d (and m), the 5-bit types' 4 bytes of high bits, then bytes or nibbles of codes."""
    t = TYPES[name]
    fields = 4 if t.has_min else 2
    high_bits = t.block_size // 8 if t.bits == 5 else 0
    codes = t.block_size if t.bits == 8 else t.block_size // 2
    assert t.type_size == fields + high_bits + codes


def test_fallbacks_are_written_types_of_smaller_blocks():
    for t in TYPES.values():
        if t.fallback is None:
            continue
        to = TYPES[t.fallback]
        assert to.writable and t.block_size % to.block_size == 0 and to.block_size < t.block_size
        assert fallback_type(t.block_size + to.block_size, t.name) == to.name
    assert fallback_type(257, "Q4_K") == "F16"
    assert [n for n, t in TYPES.items() if t.fallback] == [*K_FORMATS, *IQ_TYPES[:-2], "IQ4_XS"]
    # llama-quant.cpp's tensor_type_fallback: every 256-value i-quant takes IQ4_NL
    assert {TYPES[n].fallback for n in IQ_TYPES if n != "IQ4_NL"} == {"IQ4_NL"}
    assert fallback_type(576, "IQ2_XXS") == "IQ4_NL" and fallback_type(48, "IQ4_NL") == "F16"


@pytest.mark.parametrize("name", GRID_TYPES)
def test_grid_kinds_have_a_grid(name):
    assert TYPES[name].grid in GRIDS
    assert block_grid(name).group_size(1024) == TYPES[name].block_size


def test_block_types_but_the_i_quants_have_grids():
    assert GRID_TYPES == tuple(n for n in BLOCK_TYPES if n not in IQ_TYPES)


# --- csrc/zeropoint.h: the C kernels' copy of the numbers ---------------------------------------


def header_block_types() -> dict[str, tuple[int, int, int]]:
    """ZP_BLOCK_TYPES of csrc/zeropoint.h: name -> (ggml id, values, bytes per block)."""
    text = (ckernels.CSRC / "zeropoint.h").read_text()
    macros = {m[1]: int(m[2]) for m in re.finditer(r"#define (ZP_QK_\w+) (\d+)", text)}
    rows = re.findall(r"X\((\w+), (\d+), (\w+), (\d+)\)", text)
    return {name: (int(i), macros.get(values) or int(values), int(size))
            for name, i, values, size in rows}


def test_c_header_lists_the_block_types_as_the_table_does():
    assert header_block_types() == {n: (TYPES[n].id, TYPES[n].block_size, TYPES[n].type_size)
                                    for n in BLOCK_TYPES}


def test_c_kernels_refuse_a_type_they_do_not_have():
    lib = ckernels.library()
    if lib is None:
        pytest.skip("no C kernels here")
    x, out = torch.zeros(QK_K), torch.zeros(TYPES["Q8_0"].type_size * 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no ggml type 8"):
        ckernels.block_quantize(lib.zp_quantize_kquant, TYPES["Q8_0"].id, x, 1, out)
    with pytest.raises(ValueError, match="no ggml type 12"):
        ckernels.block_quantize(lib.zp_quantize_legacy, TYPES["Q4_K"].id, x, 8, out)
    assert np.all(out.numpy() == 0)
