"""Range estimators: which [lo, hi] each block of a tensor is quantized over.

Min/max keeps every value and spends the code range on the extremes; on heavy-tailed data a few
outliers then leave most values on a handful of codes. The other estimators clip: they give up
the outliers (which saturate) for finer steps everywhere else.

Every estimator takes (x, spec, ...) and returns (scale float32, zero_point int32) in the grid
shape of core.choose_qparams, made by core.qparams_from_range, so the spec's rules hold: the
range holds 0, the zero-point is an integer code, a symmetric zero-point is 0. All of them work
on the (blocks, block_len) view of the data and handle every channel or group in the same ops.
"""

from __future__ import annotations

from enum import Enum
from math import prod

import torch

from ..core import (
    BlockView,
    check_float_tensor,
    padded_shape,
    qparams_from_range,
    raise_if_not_finite,
)
from ..spec import QuantSpec, parse_enum
from .search import EntropySearch, MSESearch, entropy_levels, kl_best_bins, mse_best_ratio


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


DEFAULT_PERCENTILE = 99.99  # keeps all but 1 in 10,000 values: clips only true outliers


def blocked(x: torch.Tensor, spec: QuantSpec, name: str = "calibration data"):
    """x as (blocks, block_len), one row per scale block in the grid's row-major order.

    Returns (BlockView, rows, lo, hi) with lo, hi (blocks,) float64 each block's min and max.
    Raises TypeError/ValueError for a non-float or empty tensor, ValueError for NaN/Inf.
    """
    check_float_tensor(x, name)
    view = BlockView.of(tuple(x.shape), spec.block_size(tuple(x.shape)))
    xv = x.detach().contiguous().view(view.shape)  # ranges are data, never part of a graph
    outer = [d for d, blk in enumerate(view.is_block) if not blk]
    # Moving the block dimensions last copies only when they are not last already; the copy
    # pays for itself, as every later pass then reads contiguous rows.
    rows = xv.permute(outer + list(view.block_dims)).reshape(prod(view.grid), -1).contiguous()
    # One block: the whole-tensor aminmax, a faster kernel than a reduction along dim 1.
    lo, hi = torch.aminmax(rows) if rows.shape[0] == 1 else torch.aminmax(rows, dim=1)
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    # NaN propagates through min/max and Inf lands in them: the check costs no extra pass.
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise_if_not_finite(x, name)
    return view, rows, lo.to(torch.float64), hi.to(torch.float64)


def _grid_qparams(lo, hi, spec: QuantSpec, view: BlockView):
    scale, zp = qparams_from_range(lo, hi, spec)
    return scale.reshape(view.grid), zp.reshape(view.grid)


def minmax_qparams(x: torch.Tensor, spec: QuantSpec):
    """Scale and zero-point from each block's min and max: nothing clipped."""
    view, _, lo, hi = blocked(x, spec)
    return _grid_qparams(lo, hi, spec, view)


def check_percentile(percentile) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100] (e.g. 99.9 or 99.99), got {percentile}")
    return float(percentile)


def _upper_quantile(rows: torch.Tensor, q: float, largest: bool = True) -> torch.Tensor:
    """The q-quantile of every row (with largest=False the (1-q)-quantile), float64.

    Linear interpolation between order statistics, as numpy.percentile's default: position
    q * (n - 1). Only the top n - floor(pos) values are needed: for q near 1, topk of a few
    values instead of a sort of the whole row.
    """
    n = rows.shape[1]
    pos = q * (n - 1)
    below = int(pos)  # floor: pos >= 0
    frac = pos - below
    k = n - below  # order statistics `below` .. n-1 counted from the top
    top = torch.topk(rows, min(k, n), dim=1, largest=largest, sorted=True).values.to(torch.float64)
    at = top[:, k - 1]  # order statistic `below` (from the top's view)
    if frac == 0.0 or k < 2:
        return at
    nxt = top[:, k - 2]  # order statistic `below` + 1
    return at + frac * (nxt - at)


def percentile_qparams(x: torch.Tensor, spec: QuantSpec, percentile: float = DEFAULT_PERCENTILE):
    """Clip each block at a percentile of its values: of |x| for a symmetric spec, of x on
    both tails (percentile and 100 - percentile) for an asymmetric one. 100 is min/max."""
    p = check_percentile(percentile)
    view, rows, lo, hi = blocked(x, spec)
    if p == 100.0:
        return _grid_qparams(lo, hi, spec, view)
    q = p / 100.0
    if spec.symmetric:
        t = _upper_quantile(rows.abs(), q)
        return _grid_qparams(-t, t, spec, view)
    lo_q, hi_q = _upper_quantile(rows, q, largest=False), _upper_quantile(rows, q)
    return _grid_qparams(lo_q, hi_q, spec, view)


def mse_qparams(x: torch.Tensor, spec: QuantSpec, search: MSESearch = MSESearch(),
                importance=None):
    """Clip each block's min/max range by the ratio (on a grid in (0, 1]) that minimises the
    block's quantization MSE; both ends shrink by the same ratio. Ratio 1.0 is on the grid, so
    no block does worse than min/max (up to float rounding of the error sums).

    `importance` (x.shape[-1],), one weight per input column (an importance matrix's mean x^2,
    gguf.imatrix): each block's error is then sum_i w_i (x_i - q_i)^2, which for a weight matrix
    is the expected squared error of its output under inputs of those second moments (the
    diagonal of the Hessian GPTQ uses in full). Scale and zero-point follow from the clipped
    range. A uniform importance carries no information: the unweighted search, bit for bit."""
    weights = check_importance(importance, x)
    # A group size that does not divide its axis: the last group is searched as if padded with
    # zeros (as core quantizes it), which add no error at any ratio, since 0 is always exact.
    x = _zero_padded(x, spec)
    view, rows, lo, hi = blocked(x, spec)
    if weights is not None:
        # The columns' weights laid out as the blocks are: (blocks, block_len), like rows.
        w = torch.nn.functional.pad(weights, (0, x.shape[-1] - weights.numel()))
        _, weights, _, _ = blocked(w.expand(x.shape), spec, "importance")
    r = mse_best_ratio(rows, lo, hi, spec, search, weights=weights)
    return _grid_qparams(lo * r, hi * r, spec, view)


def _zero_padded(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    full = padded_shape(tuple(x.shape), spec)
    if full == tuple(x.shape):
        return x
    pads = []
    for have, want in zip(reversed(x.shape), reversed(full)):
        pads += [0, want - have]
    return torch.nn.functional.pad(x, pads)


def check_importance(importance, x: torch.Tensor) -> torch.Tensor | None:
    """`importance` as a float32 tensor (x.shape[-1],) of finite values >= 0, or None where it
    is None or uniform (every block's weighted search is then the unweighted one); ValueError
    naming what is wrong otherwise."""
    if importance is None:
        return None
    w = torch.as_tensor(importance).detach().to(torch.float32).reshape(-1)
    n = x.shape[-1]
    if w.numel() != n:
        raise ValueError(f"the importance has {w.numel()} values for rows of {n}; it needs one "
                         "per input column")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("the importance must be finite and >= 0 (a mean of x^2 per column)")
    if bool((w == w[0]).all()):
        return None
    return w.to(x.dtype if x.dtype == torch.float64 else torch.float32)


def abs_histogram(rows: torch.Tensor, amax: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of |x| in `bins` equal bins over [0, amax] for every row: (B, bins) float64.

    All rows in one bincount: row b's bins are offset by b * bins.
    """
    B, n = rows.shape
    width = (amax / bins).clamp_min(torch.finfo(torch.float64).tiny)  # an all-zero row: bin 0
    idx = (rows.abs().to(torch.float64) / width[:, None]).floor_().clamp_(max=bins - 1).long()
    idx += torch.arange(B)[:, None] * bins
    return torch.bincount(idx.view(-1), minlength=B * bins).view(B, bins).to(torch.float64)


def entropy_threshold(hist, amax, spec: QuantSpec, search: EntropySearch = EntropySearch()):
    """Per block, the KL-optimal clip threshold from an |x| histogram over [0, amax]: (B,)."""
    i = kl_best_bins(hist, entropy_levels(spec), search)
    return amax * i.to(torch.float64) / hist.shape[1]


def entropy_qparams(x: torch.Tensor, spec: QuantSpec, search: EntropySearch = EntropySearch()):
    """Clip at the threshold whose quantized |x| distribution is closest (in KL divergence) to
    the unclipped one: TensorRT's int8 calibration (Migacz 2017, "8-bit Inference with TensorRT").

    The threshold T is the upper edge of the last kept bin (TensorRT's slides put it half a bin
    higher); a block's range is [max(lo, -T), min(hi, T)]. Levels are 2^(bits-1), the codes of
    one sign, for both schemes: TensorRT's rule for int8.

    Per-tensor first: a histogram needs more values than bins to say anything (on a 2048-bin
    histogram of 128 values the KL minimum is noise, and often a threshold that clips nearly
    everything). So blocks of at least `search.bins` values get their own histogram, all of
    them in one (blocks, bins) tensor searched at once; smaller blocks (per-group, short
    channels) share the threshold of the whole tensor, which then clips only their outliers.
    """
    levels = entropy_levels(spec)
    if levels > search.bins:
        raise ValueError(
            f"entropy calibration at {spec.bits} bits needs at least {levels} histogram bins, "
            f"got EntropySearch(bins={search.bins})"
        )
    view, rows, lo, hi = blocked(x, spec)
    amax = torch.maximum(-lo, hi)
    if rows.shape[1] < search.bins:
        top = amax.max().reshape(1)
        hist = abs_histogram(rows.reshape(1, -1), top, search.bins)
        t = entropy_threshold(hist, top, spec, search).expand_as(amax)
    else:
        t = torch.empty_like(amax)
        step = max(1, (1 << 22) // search.bins)  # blocks per histogram chunk: 32 MiB of counts
        for b0 in range(0, rows.shape[0], step):
            sl = slice(b0, b0 + step)
            hist = abs_histogram(rows[sl], amax[sl], search.bins)
            t[sl] = entropy_threshold(hist, amax[sl], spec, search)
    return _grid_qparams(torch.maximum(lo, -t), torch.minimum(hi, t), spec, view)


def estimate_qparams(
    x: torch.Tensor,
    spec: QuantSpec,
    method: RangeMethod | str = RangeMethod.MINMAX,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    mse: MSESearch = MSESearch(),
    entropy: EntropySearch = EntropySearch(),
):
    """(scale, zero_point) of `x` by the named range method: minmax, percentile, mse, entropy."""
    method = parse_enum(RangeMethod, method, "range method")
    if method is RangeMethod.MINMAX:
        return minmax_qparams(x, spec)
    if method is RangeMethod.PERCENTILE:
        return percentile_qparams(x, spec, percentile)
    if method is RangeMethod.MSE:
        return mse_qparams(x, spec, mse)
    return entropy_qparams(x, spec, entropy)
