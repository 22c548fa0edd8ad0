"""calibrate/fit.py: each float-minimum group's searched scale and minimum.

Oracle: the squared error of every group recomputed by a slow Python loop from what is stored
(float16 scale and minimum, integer codes), x' = scale * (code - qmin) + minimum."""

from __future__ import annotations

import pytest
import torch

from zeropoint import QuantSpec, ckernels
from zeropoint.calibrate.fit import fitted_qparams
from zeropoint.core import choose_qparams, minimum_from_zero_point
from zeropoint.qtensor import QTensor

Q4_1 = QuantSpec(4, "asymmetric", "per_group", group_size=32, scale_dtype="float16",
                 zero_point="float")


def weights(rows=48, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[::7] += 0.03  # groups all on one side of zero: a positive minimum
    w[3, 5] = 0.6  # an outlier
    w[4].zero_()  # a constant group
    # Where float16 is coarse against the data: scales among float16's subnormals, and groups
    # far from zero whose minimum rounds by more than a step. There the refit's error estimate
    # (before the round trip) can be wrong, and only the round-trip check keeps min/max.
    w[8:16] *= 1e-4
    w[16:24] = 3.0 + w[16:24] * 0.02
    return w


def slow_group_errors(q: QTensor, w: torch.Tensor, spec: QuantSpec) -> list[float]:
    """Per group (row-major), sum of (scale * (code - qmin) + minimum - x)^2, element by element
    in float64 from the stored float16 numbers."""
    codes = q.codes()
    scale = q.scale.reshape(w.shape[0], -1)
    minimum = minimum_from_zero_point(q.zero_point, q.scale, spec).reshape(w.shape[0], -1)
    n = spec.group_size
    out = []
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // n):
            s, m = float(scale[r, g]), float(minimum[r, g])
            err = 0.0
            for i in range(g * n, (g + 1) * n):
                x_hat = s * (int(codes[r, i]) - spec.qmin) + m
                err += (x_hat - float(w[r, i])) ** 2
            out.append(err)
    return out


@pytest.mark.parametrize("c_kernels", [True, False], ids=["C", "eager"])
def test_searched_groups_never_worse_than_min_max_and_better_overall(c_kernels):
    w = weights()
    if c_kernels:
        assert ckernels.library() is not None
        searched = QTensor.quantize(w, Q4_1, *fitted_qparams(w, Q4_1))
    else:
        with ckernels.disabled():
            searched = QTensor.quantize(w, Q4_1, *fitted_qparams(w, Q4_1))
    plain = QTensor.quantize(w, Q4_1, *choose_qparams(w, Q4_1))
    fit_err = slow_group_errors(searched, w, Q4_1)
    mm_err = slow_group_errors(plain, w, Q4_1)
    # Per group: never worse (float16-stored numbers, so only the float64 loop's own rounding).
    for a, b in zip(fit_err, mm_err):
        assert a <= b * (1 + 1e-9) + 1e-18
    # And the search does something: min/max is far from least squares on Gaussian groups.
    assert sum(fit_err) < 0.9 * sum(mm_err)
    assert sum(a < b * (1 - 1e-3) for a, b in zip(fit_err, mm_err)) > len(fit_err) // 2


def test_codes_in_range_and_float16_storage_round_trips(tmp_path):
    w = weights(seed=1)
    q = QTensor.quantize(w, Q4_1, *fitted_qparams(w, Q4_1))
    codes = q.codes()
    assert int(codes.min()) >= Q4_1.qmin and int(codes.max()) <= Q4_1.qmax
    minimum = minimum_from_zero_point(q.zero_point, q.scale, Q4_1)
    # Scale and minimum are float16 numbers: storing them as float16 loses nothing.
    assert torch.equal(q.scale.half().float(), q.scale)
    assert torch.equal(minimum.half().float(), minimum)
    q.save(tmp_path / "q.safetensors")
    back = QTensor.load(tmp_path / "q.safetensors")
    assert torch.equal(back.codes(), codes)
    assert torch.equal(back.dequantize(), q.dequantize())
    # The constant row is exact.
    assert torch.equal(q.dequantize()[4], w[4])


def test_a_grid_already_on_q4_1_stays_exact():
    """Weights that lie on a Q4_1 grid (SmolLM2's): min/max reproduces them, and the search
    keeps that (nothing beats zero error)."""
    w = weights(seed=2)[24:]  # groups near zero: far from it float32 re-rounds the grid itself
    grid = QTensor.quantize(w, Q4_1).dequantize()
    q = QTensor.quantize(grid, Q4_1, *fitted_qparams(grid, Q4_1))
    assert torch.allclose(q.dequantize(), grid, rtol=0, atol=1e-7)


def test_integer_zero_point_refused():
    spec = QuantSpec(4, "asymmetric", "per_group", group_size=32)
    with pytest.raises(ValueError, match="float zero-point"):
        fitted_qparams(torch.randn(4, 32), spec)
