"""HQQ: never worse than round-to-nearest on any block, and a valid zeropoint quantizer."""

import pytest
import torch

from zeropoint import QTensor, QuantSpec
from zeropoint.algorithms.hqq import hqq_qparams, hqq_quantize

SPECS = [
    QuantSpec(4, "asymmetric", "per_group", group_size=32),
    QuantSpec(3, "asymmetric", "per_group", group_size=64),
    QuantSpec(4, "symmetric", "per_group", group_size=64),
    QuantSpec(2, "asymmetric", "per_group", group_size=48),  # a shorter last group
    QuantSpec(4, "asymmetric", "per_channel"),
    QuantSpec(3, "symmetric", "per_channel", axis=1),  # one scale per column
    QuantSpec(4, "asymmetric", "per_tensor"),
]


def weights(kind: str, gen) -> torch.Tensor:
    w = torch.randn(48, 192, generator=gen)
    if kind == "heavy":  # student-t-like tails: what real weights look like
        w = w / torch.rand(48, 192, generator=gen).clamp(min=0.05).sqrt()
    elif kind == "skewed":
        w = w.abs() * 0.02 - 0.005
    elif kind == "outliers":
        w[torch.rand(48, 192, generator=gen) < 0.01] *= 25
    return w


def block_errors(w: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Squared reconstruction error summed over each scale block, in the scale's grid shape,
    computed independently of the code under test (float64, per element, then block sums)."""
    err = (w.double() - q.dequantize().double()) ** 2
    spec = q.spec
    block = spec.block_size(tuple(w.shape))
    grid = q.scale.shape
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64)
    padded[: w.shape[0], : w.shape[1]] = err
    return padded.view(grid[0], block[0], grid[1], block[1]).sum(dim=(1, 3))


@pytest.mark.parametrize("kind", ["normal", "heavy", "skewed", "outliers"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_every_block_is_no_worse_than_rtn(spec, kind, gen):
    w = weights(kind, gen)
    rtn = block_errors(w, QTensor.quantize(w, spec))
    hqq = block_errors(w, hqq_quantize(w, spec))
    assert torch.all(hqq <= rtn), f"{int((hqq > rtn).sum())} blocks worse than RTN"


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_improves_on_rtn_overall(spec, gen):
    w = weights("heavy", gen)
    rtn = float(block_errors(w, QTensor.quantize(w, spec)).sum())
    hqq = float(block_errors(w, hqq_quantize(w, spec)).sum())
    assert hqq < 0.95 * rtn


def test_qparams_are_valid_for_the_spec(gen):
    w = weights("outliers", gen)
    for spec in SPECS:
        scale, zp = hqq_qparams(w, spec)
        assert scale.dtype == torch.float32 and torch.all(scale > 0)
        assert zp.dtype == torch.int32
        assert torch.all((zp >= spec.qmin) & (zp <= spec.qmax))
        if spec.symmetric:
            assert torch.all(zp == 0)
        assert scale.shape == QTensor.quantize(w, spec).scale.shape


def test_zero_iterations_is_round_to_nearest(gen):
    w = weights("normal", gen)
    spec = SPECS[0]
    q = hqq_quantize(w, spec, iters=0)
    rtn = QTensor.quantize(w, spec)
    assert torch.equal(q.codes(), rtn.codes()) and torch.equal(q.scale, rtn.scale)


def test_bad_arguments_raise(gen):
    w = weights("normal", gen)
    with pytest.raises(ValueError, match="lp_norm"):
        hqq_qparams(w, SPECS[0], lp_norm=1.5)
    with pytest.raises(ValueError, match="iters"):
        hqq_qparams(w, SPECS[0], iters=-1)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        hqq_qparams(w, SPECS[0])
