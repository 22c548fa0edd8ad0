"""Observers: statistics gathered batch by batch, without keeping the batches, that turn into
quantization parameters at the end.

Every observer is built with a QuantSpec, which fixes the blocks it keeps statistics for:
per-tensor, per-channel (for activations the channel axis is usually the last, axis=-1) or
per-group. update(x) folds in one batch; qparams() gives (scale, zero_point) in the grid shape of
core.choose_qparams; state_dict()/load_state_dict() save and resume a calibration.

Batches may differ in their leading dimensions as long as the blocks stay the same: a per-channel
(axis=-1) observer takes (batch, tokens, C) and (tokens, C) alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import (
    BlockView,
    check_float_tensor,
    qparams_from_range,
    raise_if_not_finite,
)
from ..spec import QuantSpec, parse_enum
from .estimators import RangeMethod, blocked, entropy_threshold
from .search import TILE_ELEMENTS, EntropySearch, MSESearch, entropy_levels, mse_best_ratio


def batch_min_max(x: torch.Tensor, spec: QuantSpec, name: str = "calibration batch"):
    """Each block's (min, max) of one batch, grid-shaped, reading x once where torch allows.

    torch.aminmax is one pass over the whole tensor (per-tensor) or along the innermost
    dimension (per-group, per-token). Reducing over rows (per-channel on the last axis, the
    usual activation case) it is many times slower than amin + amax, and those are two trips
    through memory; so rows go in cache-sized chunks, each read by amin and then amax from cache.
    """
    check_float_tensor(x, name)
    view = BlockView.of(tuple(x.shape), spec.block_size(tuple(x.shape)))
    xv = x.detach().contiguous().view(view.shape)
    dims = view.block_dims
    if dims == tuple(range(len(view.shape))):
        lo, hi = torch.aminmax(xv)
    elif dims == (len(view.shape) - 1,):
        lo, hi = torch.aminmax(xv, dim=-1)
    elif view.is_block == (True, False):
        lo, hi = _min_max_over_rows(xv)
    else:
        lo, hi = xv.amin(dim=dims), xv.amax(dim=dims)
    # NaN propagates through min/max and Inf lands in them: the check costs no extra pass.
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise_if_not_finite(x, name)
    return lo.reshape(view.grid), hi.reshape(view.grid)


def _min_max_over_rows(xv: torch.Tensor):
    """Column min and max of a (rows, cols) tensor, a cache-sized block of rows at a time."""
    rows, cols = xv.shape
    step = max(1, TILE_ELEMENTS // cols)
    lo, hi = xv[:step].amin(0), xv[:step].amax(0)
    for r0 in range(step, rows, step):
        chunk = xv[r0 : r0 + step]
        torch.minimum(lo, chunk.amin(0), out=lo)
        torch.maximum(hi, chunk.amax(0), out=hi)
    return lo, hi


class Observer:
    """Base class: the spec, the block grid of the first batch, and the save/load plumbing."""

    def __init__(self, spec: QuantSpec):
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"an observer needs a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.grid: tuple[int, ...] | None = None  # scale shape, fixed by the first batch
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def qparams(self):
        raise NotImplementedError

    def _fit_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The stored grid shape; ValueError when this batch has other blocks than earlier ones."""
        if self.grid is None:
            self.grid = tuple(grid)
        elif [d for d in grid if d != 1] != [d for d in self.grid if d != 1]:
            raise ValueError(
                f"{type(self).__name__}: this batch has a block grid of {tuple(grid)} but earlier "
                f"batches had {self.grid} ({self.spec.describe()}); every batch must give the same "
                "blocks (only leading size-1 dimensions may differ): per-tensor, or per-channel on "
                "a fixed channel axis, for activations whose token count varies"
            )
        return self.grid

    def _require_data(self) -> None:
        if self.batches == 0:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: call update(x) with at least one "
                "calibration batch before qparams()"
            )

    def _state(self) -> dict:
        raise NotImplementedError

    def _load(self, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to resume: plain values and tensors (torch.save-able)."""
        state = {
            "observer": type(self).__name__,
            "spec": self.spec.to_dict(),
            "grid": None if self.grid is None else list(self.grid),
            "batches": self.batches,
        }
        for k, v in self._state().items():
            state[k] = v.clone() if isinstance(v, torch.Tensor) else v
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("observer") != type(self).__name__:
            raise ValueError(
                f"state is from {state.get('observer')!r}; this observer is {type(self).__name__!r}"
            )
        if QuantSpec.from_dict(state["spec"]) != self.spec:
            raise ValueError(
                f"state was calibrated for {QuantSpec.from_dict(state['spec']).describe()}; "
                f"this observer is {self.spec.describe()}"
            )
        self.grid = None if state["grid"] is None else tuple(state["grid"])
        self.batches = int(state["batches"])
        self._load(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.describe()}, batches={self.batches})"


class MinMaxObserver(Observer):
    """Running min and max of every block: exactly the min/max of all the data seen."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.lo: torch.Tensor | None = None  # grid-shaped, float64 (exact for every input dtype)
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = batch_min_max(x, self.spec)
        grid = self._fit_grid(lo.shape)
        lo, hi = lo.reshape(grid).to(torch.float64), hi.reshape(grid).to(torch.float64)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            torch.minimum(self.lo, lo, out=self.lo)
            torch.maximum(self.hi, hi, out=self.hi)
        self.batches += 1

    def qparams(self):
        self._require_data()
        return qparams_from_range(self.lo, self.hi, self.spec)

    def _state(self) -> dict:
        return {"lo": self.lo, "hi": self.hi}

    def _load(self, state: dict) -> None:
        self.lo, self.hi = state["lo"], state["hi"]


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of every block's per-batch min and max.

    lo <- lo + c * (batch_lo - lo), as torch.ao's MovingAverageMinMaxObserver; the first batch
    sets lo and hi. A rare extreme batch moves the range by only c of its excess.
    """

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01):
        super().__init__(spec)
        # 0.01: torch.ao's default; the range reflects roughly the last 100 batches.
        if not isinstance(averaging_constant, (int, float)) or not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)

    def update(self, x: torch.Tensor) -> None:
        lo, hi = batch_min_max(x, self.spec)
        grid = self._fit_grid(lo.shape)
        lo, hi = lo.reshape(grid).to(torch.float64), hi.reshape(grid).to(torch.float64)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo.add_(lo - self.lo, alpha=c)
            self.hi.add_(hi - self.hi, alpha=c)
        self.batches += 1

    def _state(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "averaging_constant": self.averaging_constant}

    def _load(self, state: dict) -> None:
        super()._load(state)
        self.averaging_constant = float(state["averaging_constant"])


@dataclass(frozen=True)
class HistogramConfig:
    method: RangeMethod = RangeMethod.ENTROPY  # the classic use: int8 activations
    # entropy.bins is the number of bins per sign: the |x| histogram has TensorRT's 2048.
    entropy: EntropySearch = field(default_factory=EntropySearch)
    mse: MSESearch = field(default_factory=MSESearch)  # the ratio grid when method is "mse"

    def __post_init__(self):
        object.__setattr__(self, "method", parse_enum(RangeMethod, self.method, "histogram method"))
        if self.method not in (RangeMethod.ENTROPY, RangeMethod.MSE):
            raise ValueError(
                f"HistogramObserver method must be 'entropy' or 'mse', got {self.method.value!r}"
            )

    @property
    def bins(self) -> int:
        return self.entropy.bins


class HistogramObserver(Observer):
    """A histogram of every block over [-A, A], 2 * bins equal bins, that merges as the range grows.

    A starts at the first batch's largest magnitude and only ever doubles: a range 2^k times wider
    has bin edges on old edges, so 2^k old bins add up to one new bin exactly, with no spreading
    of counts by guesswork. A stays below twice the largest magnitude seen. The exact running
    min/max is kept too. qparams() runs the entropy (KL) or MSE search on the histogram.
    """

    def __init__(self, spec: QuantSpec, config: HistogramConfig = HistogramConfig()):
        super().__init__(spec)
        if config.method is RangeMethod.ENTROPY and entropy_levels(spec) > config.bins:
            raise ValueError(
                f"entropy calibration at {spec.bits} bits needs bins >= {entropy_levels(spec)}, "
                f"got {config.bins}"
            )
        self.config = config
        self.hist: torch.Tensor | None = None  # (blocks, 2 * bins) float64 counts over [-A, A]
        self.amax: torch.Tensor | None = None  # (blocks,) float64: A, a power-of-two multiple
        self.lo: torch.Tensor | None = None  # (blocks,) float64 exact running min
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        view, rows, lo, hi = blocked(x, self.spec, "calibration batch")
        self._fit_grid(view.grid)
        n = self.config.bins
        amax = torch.maximum(-lo, hi)
        if self.hist is None:
            self.amax = torch.where(amax > 0, amax, torch.ones_like(amax))
            self.hist = torch.zeros(rows.shape[0], 2 * n, dtype=torch.float64)
            self.lo, self.hi = lo, hi
        else:
            self._grow(amax)
            torch.minimum(self.lo, lo, out=self.lo)
            torch.maximum(self.hi, hi, out=self.hi)
        self.hist += self._counts(rows)
        self.batches += 1

    def _counts(self, rows: torch.Tensor) -> torch.Tensor:
        """This batch's counts in the current bins: (blocks, 2 * bins) float64."""
        n, B = self.config.bins, rows.shape[0]
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        if B == 1:  # one block: torch's histogram kernel, a single pass
            a = float(self.amax[0])
            return torch.histc(rows.to(dtype), bins=2 * n, min=-a, max=a).to(torch.float64)[None]
        # bin = floor((x / A + 1) * n): x * (n / A) + n, floored and clamped, for every block at
        # once; each block's bins then offset by its index into one bincount.
        per_bin = (n / self.amax).to(dtype)[:, None]
        idx = torch.mul(rows.to(dtype), per_bin).add_(n).floor_().clamp_(0, 2 * n - 1).long()
        idx += torch.arange(B)[:, None] * (2 * n)
        return torch.bincount(idx.view(-1), minlength=B * 2 * n).view(B, 2 * n).to(torch.float64)

    def _grow(self, amax: torch.Tensor) -> None:
        """Double A per block until it covers `amax`, merging old bins into the wider ones."""
        # A block that has seen only zeros took A = 1; its counts all sit in the bin at 0, which
        # stays put for any A, so it simply takes the new magnitude.
        only_zeros = (self.lo == 0) & (self.hi == 0) & (amax > 0)
        self.amax = torch.where(only_zeros, amax, self.amax)
        if not bool((amax > self.amax).any()):
            return
        k = torch.ceil(torch.log2(amax / self.amax)).clamp_min(0)
        k = torch.where(self.amax * torch.exp2(k) < amax, k + 1, k)  # log2 may round down
        n = self.config.bins
        # Old bin i lands in new bin floor((i + n (2^k - 1)) / 2^k); past k ~ log2(2n) every old
        # bin lands in the two central ones, so capping k keeps the integers small.
        kk = k.clamp(max=40).long()[:, None]
        old = torch.arange(2 * n)[None, :]
        new = (old + n * ((1 << kk) - 1)) >> kk
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, new, self.hist)
        self.amax = self.amax * torch.exp2(k)

    def abs_histogram(self) -> torch.Tensor:
        """Counts of |x| over [0, A] in `bins` bins, (blocks, bins): the two signs folded."""
        n = self.config.bins
        return self.hist[:, n:] + self.hist[:, :n].flip(1)

    def qparams(self):
        self._require_data()
        if self.config.method is RangeMethod.ENTROPY:
            t = entropy_threshold(self.abs_histogram(), self.amax, self.spec, self.config.entropy)
            lo, hi = torch.maximum(self.lo, -t), torch.minimum(self.hi, t)
        else:
            n = self.config.bins
            width = self.amax / n
            k = torch.arange(2 * n, dtype=torch.float64) + 0.5
            centres = -self.amax[:, None] + k * width[:, None]  # (blocks, 2 * bins)
            r = mse_best_ratio(centres, self.lo, self.hi, self.spec, self.config.mse, self.hist)
            lo, hi = self.lo * r, self.hi * r
        scale, zp = qparams_from_range(lo, hi, self.spec)
        return scale.reshape(self.grid), zp.reshape(self.grid)

    def _state(self) -> dict:
        return {"hist": self.hist, "amax": self.amax, "lo": self.lo, "hi": self.hi,
                "bins": self.config.bins, "method": self.config.method.value}

    def _load(self, state: dict) -> None:
        if state["bins"] != self.config.bins:
            raise ValueError(
                f"state has {state['bins']} bins per sign; this observer has {self.config.bins}"
            )
        self.hist, self.amax = state["hist"], state["amax"]
        self.lo, self.hi = state["lo"], state["hi"]
