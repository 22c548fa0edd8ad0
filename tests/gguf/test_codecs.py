"""gguf/codecs.py, the torch-free row codecs: float casts against torch's own casts, block types
against gguf-py's quantizer and dequantizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from zeropoint import ckernels
from zeropoint.gguf import codecs

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16}


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_casts_are_torchs(qtype):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-30, 30, (64, 256)))).astype(np.float32)
    x = np.clip(x, -60000, 60000) if qtype == "F16" else x
    ours = codecs.quantize_rows(x, qtype)
    theirs = torch.from_numpy(x).to(TORCH[qtype]).view(torch.uint8).numpy().reshape(64, -1)
    assert np.array_equal(ours, theirs)
    back = codecs.dequantize_rows(ours, qtype, 256)
    assert np.array_equal(back, torch.from_numpy(theirs.copy()).view(TORCH[qtype]).float().numpy())


@pytest.mark.parametrize("qtype, limit", [("F16", codecs.F16_OVERFLOW),
                                          ("BF16", codecs.BF16_OVERFLOW)])
def test_values_that_round_to_inf_are_refused_exactly_where_torch_makes_inf(qtype, limit):
    below = np.nextafter(np.float32(limit), np.float32(0))
    for value in (below, np.float32(limit), -below, np.float32(np.nan)):
        x = np.full((1, 32), value, np.float32)
        finite = bool(torch.isfinite(torch.from_numpy(x).to(TORCH[qtype])).all())
        if finite:
            codecs.quantize_rows(x, qtype)
        else:
            with pytest.raises(ValueError, match=f"not finite in {qtype}"):
                codecs.quantize_rows(x, qtype)


@pytest.mark.skipif(ckernels.library() is None, reason="needs the C kernels")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_rows_are_gguf_pys(qtype):
    x = np.random.default_rng(4).standard_normal((48, 96)).astype(np.float32)
    ours = codecs.quantize_rows(x, qtype)
    gtype = GGMLQuantizationType[qtype]
    assert np.array_equal(ours, quantize(x, gtype))
    assert np.array_equal(codecs.dequantize_rows(ours, qtype, 96), dequantize(ours, gtype))


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="float32 rows"):
        codecs.quantize_rows(np.zeros(32, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        codecs.quantize_rows(np.zeros((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="not whole rows"):
        codecs.dequantize_rows(np.zeros(35, np.uint8), "Q8_0", 32)
