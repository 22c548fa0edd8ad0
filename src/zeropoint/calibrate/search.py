"""The two searches behind the MSE and entropy estimators, on data already laid out as blocks.

Both take a (blocks, n) tensor, one row per block of elements that share a scale, and answer for
every block at once: the loops in here run over clip ratios or chunks of rows, never over blocks.
The estimators (raw data) and the histogram observer (bin centres weighted by counts) share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import qparams_from_range
from ..spec import QuantSpec

# Elements per tile of the MSE search: 1 MiB of float32, which stays in a 2-4 MiB L2 cache with
# the two work buffers while every clip ratio runs over it.
TILE_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class MSESearch:
    """Grid of clip ratios for the MSE search: ratio k / grid of the min/max range, k = 1..grid.

    The search first tries every `coarse_step`-th ratio (always including 1.0, plain min/max),
    then, per block, the ratios within one coarse step of the best one. coarse_step = 1 tries the
    whole grid: exact on the grid, 3-5x slower (benchmarks/bench_calibrate.py).
    """

    grid: int = 100  # 1% steps: within 2% of the MSE of 0.1% steps (tests/calibrate)
    coarse_step: int = 5  # 20 coarse + 8 fine ratios: under 1 s for a 4096x4096 per-group-128

    def __post_init__(self):
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"MSESearch.grid must be a positive int, got {self.grid!r}")
        if not isinstance(self.coarse_step, int) or not 1 <= self.coarse_step <= self.grid:
            raise ValueError(
                f"MSESearch.coarse_step must be an int in 1..grid ({self.grid}), "
                f"got {self.coarse_step!r}"
            )


def _block_errors(xb, weights, lo, hi, ratios, spec: QuantSpec) -> torch.Tensor:
    """Sum of squared quantization errors of every block at every candidate ratio.

    xb (B, n) data; weights (B, n) or None; lo, hi (B,) float64; ratios (B, R) float64.
    Returns (B, R) float64. The error is measured in units of the step, e = q - y with
    y = x / scale + zero_point and q = clamp(round(y)), then scaled by scale^2: one fewer pass
    than dequantizing, and equal to it up to float rounding.
    """
    B, n = xb.shape
    R = ratios.shape[1]
    scale, zp = qparams_from_range(lo[:, None] * ratios, hi[:, None] * ratios, spec)  # (B, R)
    compute = torch.float64 if xb.dtype == torch.float64 else torch.float32
    inv = (1.0 / scale.to(torch.float64)).to(compute)
    zpf = zp.to(compute)
    out = torch.zeros(B, R, dtype=torch.float64)
    # A tile stays in cache while every ratio runs over it: each ratio is then ~5 in-cache
    # passes instead of ~5 trips through main memory.
    rows = max(1, TILE_ELEMENTS // n)
    cols = min(n, TILE_ELEMENTS)
    y = torch.empty(min(rows, B), cols, dtype=compute)
    q = torch.empty_like(y)
    for r0 in range(0, B, rows):
        r1 = min(r0 + rows, B)
        for c0 in range(0, n, cols):
            c1 = min(c0 + cols, n)
            xt = xb[r0:r1, c0:c1].to(compute)
            wt = None if weights is None else weights[r0:r1, c0:c1].to(compute)
            yt, qt = y[: r1 - r0, : c1 - c0], q[: r1 - r0, : c1 - c0]
            for j in range(R):
                torch.mul(xt, inv[r0:r1, j : j + 1], out=yt)
                if not spec.symmetric:
                    yt.add_(zpf[r0:r1, j : j + 1])  # addcmul would be one op, but slower here
                torch.round(yt, out=qt)
                qt.clamp_(spec.qmin, spec.qmax)
                qt.sub_(yt)
                if wt is None:
                    # Norm in the compute dtype: a float64 norm of float32 data costs a copy.
                    err = torch.linalg.vector_norm(qt, dim=1).to(torch.float64).square_()
                else:
                    err = torch.einsum("ij,ij,ij->i", qt, qt, wt).to(torch.float64)
                out[r0:r1, j] += err
    return out * scale.to(torch.float64).square()


def mse_best_ratio(xb, lo, hi, spec: QuantSpec, search: MSESearch = MSESearch(), weights=None):
    """Per block, the clip ratio of the grid (k / search.grid) with the least quantization MSE.

    xb (B, n): the blocks (or histogram bin centres, with counts in `weights`); lo, hi (B,)
    float64: each block's min and max. Returns ratios (B,) float64. Ties go to the larger ratio,
    so a block that no clipping helps keeps plain min/max.
    """
    g, step = search.grid, search.coarse_step
    B = xb.shape[0]
    # Descending from k = grid, so argmin's first minimum is the largest ratio among equals.
    coarse_k = torch.arange(g, 0, -step, dtype=torch.float64)
    k = coarse_k.expand(B, -1)
    err = _block_errors(xb, weights, lo, hi, k / g, spec)
    best = err.argmin(dim=1, keepdim=True)
    best_k, best_err = k.gather(1, best), err.gather(1, best)  # (B, 1)
    if step > 1:
        # Neighbours within one coarse step; out-of-grid ones are clamped onto the grid's ends,
        # which only re-evaluates a ratio already tried.
        offsets = torch.tensor([d for d in range(step - 1, -step, -1) if d], dtype=torch.float64)
        fine_k = (best_k + offsets).clamp(1, g)  # (B, 2 * (step - 1)), descending per row
        fine_err = _block_errors(xb, weights, lo, hi, fine_k / g, spec)
        # The coarse best goes between its upper and lower neighbours: still descending.
        up, down = slice(0, step - 1), slice(step - 1, None)
        k = torch.cat([fine_k[:, up], best_k, fine_k[:, down]], dim=1)
        err = torch.cat([fine_err[:, up], best_err, fine_err[:, down]], dim=1)
        best = err.argmin(dim=1, keepdim=True)
        best_k = k.gather(1, best)
    return best_k.squeeze(1) / g


@dataclass(frozen=True)
class EntropySearch:
    """The KL-divergence threshold search of TensorRT (Migacz 2017, "8-bit Inference with
    TensorRT", GTC slides "Calibration"): a histogram of |x|, thresholds from `levels` bins up.

    Like TensorRT, the search scores every threshold. stride > 1 first scores every stride-th
    one (always including the full range), then, per block, every one within a stride of the
    best: ~12x less work at stride 16, but the KL curve of real data is ragged at the scale of
    a few bins, so it can settle in another local minimum (seen: a KL 0.5% above the best).
    """

    bins: int = 2048  # TensorRT's histogram size: fine enough that a bin is < 0.05% of the range
    stride: int = 1  # every candidate, as TensorRT; 16 trades exactness for speed on many blocks

    def __post_init__(self):
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"EntropySearch.bins must be an int >= 2, got {self.bins!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"EntropySearch.stride must be a positive int, got {self.stride!r}")


def entropy_levels(spec: QuantSpec) -> int:
    """Levels the |x| histogram is quantized into: 2^(b-1), the codes of one sign (128 for int8)."""
    return 2 ** (spec.bits - 1)


# Elements of the (blocks, candidates, levels) work tensors per chunk of blocks: 32 MiB float64.
_KL_CHUNK = 1 << 22


def _kl_divergences(h, Cs, NZ, HL, cand, L: int) -> torch.Tensor:
    """KL(P || Q) of every candidate: h (b, nb) counts, Cs / NZ / HL (b, nb+1) prefix sums of
    h, of (h > 0) and of h log h; cand (b, K) int64 bins kept. Returns (b, K) float64."""
    b, K = cand.shape
    j = torch.arange(L + 1)
    bounds = (j * cand[:, :, None] + L - 1) // L  # (b, K, L+1): first bin of group j, ceil(j*i/L)
    flat = bounds.view(b, -1)
    S = Cs.gather(1, flat).view(b, K, L + 1).diff(dim=-1)  # (b, K, L) group counts
    n = NZ.gather(1, flat).view(b, K, L + 1).diff(dim=-1)  # non-zero bins per group
    # sum_j S_j log(S_j / n_j); an empty group (S = n = 0) adds 0.
    group = torch.xlogy(S, S / n.clamp_min(1)).sum(-1)  # (b, K)
    T = Cs[:, -1:]  # (b, 1) total count
    zq = Cs.gather(1, cand)  # (b, K): count in the first i bins
    outliers = T - zq
    last = h.gather(1, cand - 1)  # bin i-1
    last_p = last + outliers  # bin i-1 of P
    # The last group of P also holds the outliers; if bin i-1 holds only outliers it is one more
    # non-zero bin for Q to spread over. Redo that group's term with both.
    S_l, n_l = S[:, :, -1], n[:, :, -1] + ((last == 0) & (outliers > 0)).to(torch.float64)
    group -= torch.xlogy(S_l, S_l / n[:, :, -1].clamp_min(1))
    group += torch.xlogy(S_l + outliers, S_l / n_l.clamp_min(1))
    plogp = HL.gather(1, cand - 1) + torch.xlogy(last_p, last_p)  # sum_k h'_k log h'_k
    kl = (plogp - group) / T - torch.log(T) + torch.log(zq)
    # Outliers in a last group with no count of its own: P has mass that Q cannot represent.
    unrepresentable = ((S_l == 0) & (outliers > 0)) | (zq == 0)
    return torch.where(unrepresentable, torch.full_like(kl, torch.inf), kl)


def _argmin_largest(values: torch.Tensor, cand: torch.Tensor):
    """Per row, the candidate with the least value; among equals the largest candidate."""
    at_min = values == values.amin(dim=1, keepdim=True)
    best = torch.where(at_min, cand, -1).amax(dim=1, keepdim=True)
    return best, values.gather(1, (cand == best).int().argmax(dim=1, keepdim=True))


def kl_best_bins(hist: torch.Tensor, levels: int, search: EntropySearch = EntropySearch()):
    """Per block, the number of leading |x| bins whose threshold minimises KL(P || Q).

    hist (B, nbins): counts of |x| over [0, A] in equal bins. For a candidate i in levels..nbins
    (the threshold is the upper edge of bin i - 1):
      P: the first i bins, with the count of all later bins (the clipped outliers) added to bin i-1;
      Q: the first i bins (without outliers) merged into `levels` groups (bin k joins group
         k * levels // i), each group's count spread evenly over the bins where P is non-zero;
      KL(P || Q) after normalising both; +inf where P has mass that Q cannot represent.
    Returns (B,) int64 in levels..nbins; ties go to the larger i.

    Every sum over bins comes from prefix sums, so a candidate costs O(levels), not O(i):
      KL = (sum_k h'_k log h'_k - sum_j H'_j (log S_j - log n_j)) / T - log T + log Z_Q
    with h' the bins of P (unnormalised), S_j / n_j a group's count / non-zero bins, H'_j the
    same group in P (outliers included), T the total count and Z_Q the count in the first i bins.
    """
    h = hist.to(torch.float64)
    B, nb = h.shape
    L = levels
    if L > nb:
        raise ValueError(f"the histogram needs at least {L} bins for {L} levels, has {nb}")
    stride = min(search.stride, nb - L + 1)
    coarse = torch.arange(nb, L - 1, -stride)  # descending, always holding nb (no clipping)
    offsets = torch.tensor([d for d in range(stride - 1, -stride, -1) if d], dtype=torch.int64)
    out = torch.empty(B, dtype=torch.int64)
    step = max(1, _KL_CHUNK // ((len(coarse) + len(offsets)) * (L + 1)))
    for b0 in range(0, B, step):
        hb = h[b0 : b0 + step]
        zero = hb.new_zeros(hb.shape[0], 1)
        Cs = torch.cat([zero, hb.cumsum(1)], 1)  # counts before bin k
        NZ = torch.cat([zero, (hb > 0).to(torch.float64).cumsum(1)], 1)
        HL = torch.cat([zero, torch.xlogy(hb, hb).cumsum(1)], 1)
        cand = coarse.expand(hb.shape[0], -1)
        best, best_kl = _argmin_largest(_kl_divergences(hb, Cs, NZ, HL, cand, L), cand)
        if len(offsets):
            cand = torch.cat([best, (best + offsets).clamp(L, nb)], 1)
            kl = torch.cat([best_kl, _kl_divergences(hb, Cs, NZ, HL, cand[:, 1:], L)], 1)
            best, _ = _argmin_largest(kl, cand)
        out[b0 : b0 + step] = best.squeeze(1)
    return out
