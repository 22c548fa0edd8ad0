"""Float16 scales and float zero-points (QuantSpec scale_dtype / zero_point): ggml's own block
formats, computed by gguf-py, are the oracle: Q4_1 (x = d * q + m, float16 d and m, groups of
32) and Q8_0 (x = d * q, float16 d, groups of 32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from zeropoint import QTensor, QuantSpec
from zeropoint.core import dequantize, quantize

Q4_1_FORM = QuantSpec(4, "asymmetric", "per_group", group_size=32, scale_dtype="float16",
                      zero_point="float")
Q8_0_FORM = QuantSpec(8, "symmetric", "per_group", group_size=32, scale_dtype="float16")


def ggml_roundtrip(x: torch.Tensor, kind) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(quants.quantize(x.numpy(), kind), kind))


def test_float_zero_point_reproduces_a_q4_1_grid(gen):
    """Weights already on a Q4_1 grid (SmolLM2's linears) come back to float32 rounding: the
    integer zero-point cannot, which is what the float one is for."""
    x = torch.randn(96, 256, generator=gen) * 0.05 + 0.01
    on_grid = ggml_roundtrip(x, T.Q4_1)
    q = QTensor.quantize(on_grid, Q4_1_FORM)
    err = (q.dequantize() - on_grid).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float32).eps * on_grid.abs().max().item()
    integer = QTensor.quantize(on_grid, QuantSpec(4, "asymmetric", "per_group", group_size=32))
    assert (integer.dequantize() - on_grid).abs().max().item() > 100 * err
    assert q.nbytes == on_grid.numel() * 5 // 8  # Q4_1's 5 bits per weight, as ggml stores it
    assert q.nbytes == quants.quantize(x.numpy(), T.Q4_1).nbytes


def test_float_zero_point_on_any_data_is_as_close_as_q4_1(gen):
    """On arbitrary data: the same grid family as Q4_1 (ggml divides by its scale before
    rounding it to float16, we after, so a scale may differ by one float16 step): the same
    minimum per group, and an error as small."""
    x = torch.randn(64, 128, generator=gen)
    ours = QTensor.quantize(x, Q4_1_FORM)
    theirs = ggml_roundtrip(x, T.Q4_1)
    ggml_min = theirs.view(-1, 32).amin(1)
    our_min = ours.dequantize().view(-1, 32).amin(1)
    assert torch.allclose(our_min, ggml_min, atol=1e-6)
    mse_ours = (ours.dequantize() - x).pow(2).mean()
    mse_ggml = (theirs - x).pow(2).mean()
    assert mse_ours <= 1.02 * mse_ggml


def test_float16_scales_reproduce_q8_0_exactly(gen):
    on_grid = ggml_roundtrip(torch.randn(32, 320, generator=gen), T.Q8_0)
    q = QTensor.quantize(on_grid, Q8_0_FORM)
    assert torch.equal(q.dequantize(), on_grid)
    assert q.bits_per_weight == 8.5  # Q8_0's 34 bytes per 32 weights
    assert q.scale.dtype == torch.float32
    assert torch.equal(q.scale, q.scale.half().float())  # only float16 values


def test_saved_parts_have_the_stored_dtypes_and_load_back_identically(gen, tmp_path):
    from safetensors import safe_open

    q = QTensor.quantize(torch.randn(40, 96, generator=gen), Q4_1_FORM)
    path = tmp_path / "w.safetensors"
    q.save(path)
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["scale"].dtype == stored["zero_point"].dtype == torch.float16
    assert sum(t.nbytes for t in stored.values()) == q.nbytes
    # The stored zero-point is the block minimum: the smallest value of each group's grid.
    assert torch.allclose(stored["zero_point"].float(), q.dequantize().view(40, 3, 32).amin(-1)
                          .where(q.codes().view(40, 3, 32).amin(-1) == 0, stored["zero_point"].float()),
                          atol=1e-6)
    back = QTensor.load(path)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_float_zero_point_quantize_matches_a_slow_loop(gen):
    """codes = clamp(round((x - m) / s)), dequantized as q * s + m, group by group."""
    x = torch.randn(6, 64, generator=gen)
    from zeropoint.core import choose_qparams

    scale, zp = choose_qparams(x, Q4_1_FORM)
    codes = quantize(x, Q4_1_FORM, scale, zp)
    for r in range(6):
        for g in range(2):
            block = x[r, 32 * g:32 * g + 32].double()
            m = float(np.float16(block.min().item()))
            s = float(np.float16((block.max().item() - m) / 15))
            expect = torch.clamp(torch.round((block - m) / s), 0, 15)
            assert (codes[r, 32 * g:32 * g + 32].double() - expect).abs().max() <= 1
            assert (codes[r, 32 * g:32 * g + 32].double() != expect).sum() <= 1
    back = dequantize(codes, Q4_1_FORM, scale, zp)
    assert (back - x).abs().max() <= scale.max() * 0.51


@pytest.mark.parametrize("kw, message", [
    (dict(bits=4, scheme="symmetric", zero_point="float"), "asymmetric scheme only"),
    (dict(bits=4, zero_point="real"), "unknown zero_point 'real'; accepted: 'integer', 'float'"),
    (dict(bits=4, scale_dtype="bfloat16"), "unknown scale_dtype 'bfloat16'; accepted"),
])
def test_bad_storage_options_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kw)


def test_describe_and_dict_round_trip():
    assert Q4_1_FORM.describe() == "int4 asym g32 float-zp fp16-scales"
    assert QuantSpec.from_dict(Q4_1_FORM.to_dict()) == Q4_1_FORM
    old = {k: v for k, v in Q8_0_FORM.to_dict().items() if k not in ("scale_dtype", "zero_point")}
    assert QuantSpec.from_dict(old).scale_dtype == "float32"  # manifests written before


def test_hqq_and_gptq_name_float_zero_points_as_rtn_only():
    from zeropoint.algorithms.grids import SpecGrid
    from zeropoint.algorithms.hqq import hqq_quantize

    with pytest.raises(ValueError, match="HQQ fits integer zero-points"):
        hqq_quantize(torch.randn(4, 64), Q4_1_FORM)
    with pytest.raises(ValueError, match="GPTQ rounds onto integer zero-point grids"):
        SpecGrid(Q4_1_FORM, (4, 64), torch.float32)
