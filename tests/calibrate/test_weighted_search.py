"""The importance-weighted scale search of zeropoint's own formats (issue 14: `quantize --bits N
--imatrix FILE`): calibrate.mse_qparams with `importance`, held to a slow loop of the weighted
objective sum_i w_i (x_i - q_i)^2 written here, for every group; GPTQ's grid takes the same
search; and the command line checks the importance matrix against the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeropoint.algorithms.gptq import gptq
from zeropoint.calibrate.estimators import minmax_qparams, mse_qparams
from zeropoint.calibrate.search import MSESearch
from zeropoint.spec import QuantSpec

EXHAUSTIVE = MSESearch(grid=100, coarse_step=1)


def _heavy_tailed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp_min(0.05).sqrt()
    return t * 0.02


def _importance(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.gamma(0.3, size=n).astype(np.float32) * 50  # a few columns dominate, some ~0
    w[rng.integers(0, n, 3)] = 0
    return w


def _group_errors(x, w, scale, zero_point, spec, group):
    """Slow loop: sum_i w_i (x_i - dequant(quant(x_i)))^2 of every group, in float64, from the
    formulas (q = clamp(round(x / s) + z), x_hat = (q - z) s), one group at a time."""
    out, n = x.shape
    errors = np.zeros((out, n // group))
    x64, w64 = x.double().numpy(), np.asarray(w, np.float64)
    s64 = scale.double().reshape(out, -1).numpy()
    z64 = (np.zeros_like(s64) if zero_point is None
           else zero_point.double().reshape(out, -1).numpy())
    for r in range(out):
        for g in range(n // group):
            s, z = np.float32(s64[r, g]), z64[r, g]
            total = 0.0
            for i in range(g * group, (g + 1) * group):
                q = min(max(np.round(np.float32(x64[r, i]) / s) + z, spec.qmin), spec.qmax)
                total += w64[i] * (x64[r, i] - (q - z) * float(s)) ** 2
            errors[r, g] = total
    return errors


def _ratio_grid_minimum(x, w, spec, group):
    """Slow loop: per group, the least weighted error over every clip ratio k/100 of its
    min/max range (scale and zero-point from the clipped range by the spec's own rule)."""
    from zeropoint.core import qparams_from_range

    out, n = x.shape
    blocks = x.reshape(out, n // group, group)
    lo = blocks.amin(-1).double()
    hi = blocks.amax(-1).double()
    best = np.full((out, n // group), np.inf)
    for k in range(1, 101):
        s, z = qparams_from_range((lo * k / 100).reshape(-1), (hi * k / 100).reshape(-1), spec)
        e = _group_errors(x, w, s, None if spec.symmetric else z, spec, group)
        best = np.minimum(best, e)
    return best


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_weighted_search_reaches_the_least_weighted_error_of_its_grid(scheme):
    group = 32
    spec = QuantSpec(4, scheme, "per_group", group_size=group)
    x = _heavy_tailed((3, 128), 1)
    w = _importance(128, 2)
    scale, zp = mse_qparams(x, spec, EXHAUSTIVE, importance=w)
    got = _group_errors(x, w, scale, zp, spec, group)
    oracle = _ratio_grid_minimum(x, w, spec, group)
    np.testing.assert_allclose(got, oracle, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [3, 4])
def test_weighted_error_is_never_above_the_unweighted_searches(scheme, bits):
    group = 32
    spec = QuantSpec(bits, scheme, "per_group", group_size=group)
    x = _heavy_tailed((16, 256), bits)
    w = _importance(256, 10 + bits)

    def weighted_error(qparams):
        return _group_errors(x, w, *qparams, spec, group)

    weighted = weighted_error(mse_qparams(x, spec, importance=w))  # the default search
    minmax = weighted_error(minmax_qparams(x, spec))
    assert (weighted <= minmax * (1 + 1e-6) + 1e-12).all()
    # Over the same (whole) grid the weighted choice is at least as good as the unweighted one.
    exhaustive = weighted_error(mse_qparams(x, spec, EXHAUSTIVE, importance=w))
    unweighted = weighted_error(mse_qparams(x, spec, EXHAUSTIVE))
    assert (exhaustive <= unweighted * (1 + 1e-6) + 1e-12).all()
    assert exhaustive.sum() < unweighted.sum() * 0.99  # and the weighting matters here


@pytest.mark.parametrize("uniform", [1.0, 3.7])
def test_uniform_importance_is_the_unweighted_search(uniform):
    spec = QuantSpec(4, "asymmetric", "per_group", group_size=32)
    x = _heavy_tailed((8, 128), 5)
    s0, z0 = mse_qparams(x, spec)
    s1, z1 = mse_qparams(x, spec, importance=np.full(128, uniform, np.float32))
    assert torch.equal(s0, s1) and torch.equal(z0, z1)


@pytest.mark.parametrize("bad, message", [
    (np.ones(100, np.float32), "100 values for rows of 128"),
    (np.r_[np.ones(127), np.nan].astype(np.float32), "finite and >= 0"),
    (np.r_[np.ones(127), -1].astype(np.float32), "finite and >= 0"),
])
def test_bad_importance_is_named(bad, message):
    spec = QuantSpec(4, "symmetric", "per_group", group_size=32)
    with pytest.raises(ValueError, match=message):
        mse_qparams(torch.randn(4, 128), spec, importance=bad)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_gptq_groups_take_the_weighted_search(scheme):
    """With an identity Hessian no error is carried to later columns, so GPTQ is round to
    nearest on its grid: its group scales must be the weighted search's, group by group."""
    spec = QuantSpec(4, scheme, "per_group", group_size=32)
    x = _heavy_tailed((8, 128), 7)
    w = _importance(128, 8)
    r = gptq(x, torch.eye(128), spec, clip=MSESearch(), importance=w)
    scale, zp = mse_qparams(x, spec, MSESearch(), importance=w)
    torch.testing.assert_close(r.scale, scale.reshape(r.scale.shape), rtol=0, atol=0)
    if zp is not None and r.zero_point is not None:
        assert torch.equal(r.zero_point, zp.reshape(r.zero_point.shape))
    plain = gptq(x, torch.eye(128), spec, clip=MSESearch())
    assert not torch.equal(plain.scale, r.scale)  # the importance changed something


def test_a_short_last_group_is_searched_as_zero_padded():
    """576 columns in groups of 128 (SmolLM2's attention): the last group holds 64. It is
    searched as core quantizes it, padded with zeros of no weight."""
    group = 32
    spec = QuantSpec(4, "asymmetric", "per_group", group_size=group)
    x = _heavy_tailed((3, 80), 11)
    w = _importance(80, 12)
    scale, zp = mse_qparams(x, spec, EXHAUSTIVE, importance=w)
    assert scale.shape == (3, 3)
    padded_x = torch.nn.functional.pad(x, (0, 16))
    padded_w = np.r_[w, np.zeros(16, np.float32)]
    got = _group_errors(padded_x, padded_w, scale, zp, spec, group)
    np.testing.assert_allclose(got, _ratio_grid_minimum(padded_x, padded_w, spec, group),
                               rtol=1e-6, atol=1e-12)
