"""Least-squares scale and minimum for float-zero-point grids (x = s * q + m, ggml's Q4_1 form).

Min/max puts the extremes on the first and last codes; every other value then lands wherever the
even grid between them falls. The search here (the idea of ggml's make_qkx2_quants, written for
unweighted squared error and a minimum that may be positive) lays a few denser grids over each
block, takes the codes each gives, refits the scale and the minimum to those codes by least
squares, and keeps whichever grid's refit has the least squared error once the scale and minimum
are rounded to how they are stored. The min/max grid is always a candidate and the final choice is
checked on the exact quantize-dequantize round trip, so no block ends worse than min/max.

The C kernel (csrc/fit.c) searches eight blocks per vector; without a compiler the eager path
below searches all blocks at once, in tiles of rows that stay in cache, looping over grids. The
two may pick different grids for a few blocks (their sums round differently); both keep the
round-trip guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ckernels
from ..core import qparams_from_range, stored_scale
from ..spec import QuantSpec
from .estimators import _zero_padded, blocked

# Rows of blocks per tile: 256K float32 elements = 1 MiB, with the work buffers in L2.
_TILE_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class FitSearch:
    """Grids of (qmax - qmin) + first + step * k steps over each block's range, k = 0..count-1.

    More steps than codes narrow the grid: the extremes round inwards and saturate a little,
    which the refit then weighs against finer steps for the bulk of the block."""

    # From 1 step fewer to 1 more than the codes (Q4_K's make_qkx2 range): on Gemma 3's
    # K-quant tensors this finds their sub-block grids (squared error 0.0002 of min/max's on a
    # Q4_K ffn_down, against 0.014 with the 12 grids from -0.5); 0.75-0.80 on Q5_0/Q8_0 ones.
    first: float = -1.0
    step: float = 0.1
    count: int = 21

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"FitSearch.count must be a positive int, got {self.count!r}")

    def steps(self, spec: QuantSpec) -> list[float]:
        return [spec.qmax - spec.qmin + self.first + self.step * k for k in range(self.count)]


def _check_spec(spec: QuantSpec) -> None:
    if not spec.float_zero_point:
        raise ValueError(
            f"the least-squares fit needs a float zero-point (x = s * q + m); got "
            f"{spec.describe()}; accepted: asymmetric specs with zero_point='float'"
        )


def round_trip_errors(xb: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      spec: QuantSpec) -> torch.Tensor:
    """Sum of squared errors of every block after quantize-dequantize, in the order of ops that
    core.quantize and core.dequantize use: q = clamp(round(x / s + z)), x' = (q - z) * s.

    xb (B, n) float32; scale, zero_point (B,) float32. Returns (B,) float64."""
    s, z = scale[:, None], zero_point[:, None]
    q = torch.div(xb, s).add_(z).round_().clamp_(spec.qmin, spec.qmax)
    diff = q.sub_(z).mul_(s).sub_(xb)
    return torch.linalg.vector_norm(diff, dim=1).to(torch.float64).square_()


def _refit(shifted, sums, width, steps: float, spec: QuantSpec):
    """Codes of the grid of `steps` steps over each block's range and the sums a least-squares
    fit to them needs: (sum l, sum l^2, sum (x - lo) l, det > 0, det or 1), each (B,) float64.

    shifted (B, n) float32: x - lo per block; sums: n, sum(x), sum(x^2) of the unshifted blocks."""
    n = sums[0]
    q = torch.mul(shifted, (steps / width).to(torch.float32)[:, None])
    q.round_().clamp_(0, spec.qmax - spec.qmin)
    # Codes are small integers: their sums are exact in float32 (n * qmax^2 << 2^24).
    sum_l = q.sum(1).to(torch.float64)
    sum_ll = torch.linalg.vector_norm(q, dim=1).to(torch.float64).square_()
    # sum(x l) = sum((x - lo) l) + lo sum(l): the shifted data is at hand.
    sum_xl = q.mul_(shifted).sum(1).to(torch.float64)
    det = n * sum_ll - sum_l * sum_l
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    return sum_l, sum_ll, sum_xl, ok, safe


def _stored_fit(sum_l, sum_ll, sum_xl, ok, det, lo, sums, spec: QuantSpec):
    """The least-squares scale and minimum for _refit's codes, rounded as stored, and the squared
    error of those codes under them, from the sums: (minimum, scale, error), each (B,) float64.
    The nearest codes that quantize then assigns can only do better."""
    n, sum_x, sum_xx = sums
    sum_xl = sum_xl + lo * sum_l  # back from x - lo to x
    scale = (n * sum_xl - sum_x * sum_l) / det  # codes counted from qmin: x = s * l + m
    minimum = (sum_ll * sum_x - sum_l * sum_xl) / det
    minimum = stored_scale(minimum, spec).to(torch.float64)
    scale = stored_scale(scale, spec).to(torch.float64)
    err = (scale * scale * sum_ll + 2 * scale * minimum * sum_l - 2 * scale * sum_xl
           + n * minimum * minimum - 2 * minimum * sum_x + sum_xx)
    err = torch.where(ok & (scale > 0), err, torch.full_like(err, torch.inf))
    return minimum, scale, err


def fitted_block_qparams(xb: torch.Tensor, lo, hi, spec: QuantSpec,
                         search: FitSearch = FitSearch()):
    """Per block of xb (B, n) float32 with lo, hi (B,) float64 its min and max: the scale and
    float zero-point (both (B,) float32, as core.qparams_from_range returns them) whose
    quantize-dequantize error is least among min/max and the searched grids' refits."""
    _check_spec(spec)
    scale, zero = qparams_from_range(lo, hi, spec)
    scale, zero = scale.reshape(-1).clone(), zero.reshape(-1).clone()
    lib = ckernels.library()
    if lib is not None and xb.shape[1] <= 256:
        # The same search in C (csrc/fit.c): about 10x the eager loop below.
        ckernels.fit_float_min(lib, xb.contiguous(), spec.qmin, spec.qmax, search.steps(spec),
                               spec.scale_dtype == "float16", scale, zero)
        return scale, zero
    rows = max(1, _TILE_ELEMENTS // max(1, xb.shape[1]))
    for r0 in range(0, xb.shape[0], rows):
        r = slice(r0, min(r0 + rows, xb.shape[0]))
        x, tlo, thi = xb[r], lo[r], hi[r]
        width = thi - tlo
        flat = width <= 0
        width = torch.where(flat, torch.ones_like(width), width)
        base = round_trip_errors(x, scale[r], zero[r], spec)
        shifted = x - tlo.to(torch.float32)[:, None]
        sums = (x.shape[1], x.sum(1).to(torch.float64),
                torch.linalg.vector_norm(x, dim=1).to(torch.float64).square_())
        best_err = torch.full_like(base, torch.inf)
        best_min = torch.zeros_like(base)
        best_scale = torch.ones_like(base)
        for steps in search.steps(spec):
            fit = _refit(shifted, sums, width, steps, spec)
            minimum, s, err = _stored_fit(*fit, tlo, sums, spec)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_min = torch.where(better, minimum, best_min)
            best_scale = torch.where(better, s, best_scale)
        cand_scale = best_scale.to(torch.float32)
        cand_zero = spec.qmin - best_min.to(torch.float32) / cand_scale
        # The estimate assumed the grid's codes; the round trip is what is stored: compare that.
        take = torch.isfinite(best_err) & ~flat
        take &= round_trip_errors(x, cand_scale, cand_zero, spec) < base
        scale[r] = torch.where(take, cand_scale, scale[r])
        zero[r] = torch.where(take, cand_zero, zero[r])
    return scale, zero


def fitted_qparams(x: torch.Tensor, spec: QuantSpec, search: FitSearch = FitSearch()):
    """Grid-shaped (scale, zero_point) of `x` for a float-zero-point spec, each block's scale and
    minimum searched for least squared error (see fitted_block_qparams)."""
    _check_spec(spec)
    x = _zero_padded(x, spec)
    view, rows, lo, hi = blocked(x, spec)
    scale, zero = fitted_block_qparams(rows.to(torch.float32), lo, hi, spec, search)
    return scale.reshape(view.grid), zero.reshape(view.grid)
