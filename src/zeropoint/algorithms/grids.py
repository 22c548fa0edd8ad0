"""The grids GPTQ rounds onto: what scales a group of input columns shares, and how one column is
rounded once they are fitted.

GPTQ itself (gptq.py) only needs two things from a quantization format:

- `group_size(n_in)`: how many consecutive input columns share one fit (their scales);
- `fit(cols, start)`: fit the scales of the group of columns `cols` (out, <= group) that starts at
  column `start`, from the weights as GPTQ has updated them so far. The fit then rounds any one of
  its columns: `fit.round(i, w)` -> (codes, dequantized values) for column i of the group.

`SpecGrid` is zeropoint's own QuantSpec grid (core.quantize's arithmetic); the ggml block types
have theirs in zeropoint.gguf.gptq_grids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..calibrate.search import MSESearch
from ..core import choose_qparams, grid_shape
from ..spec import Granularity, QuantSpec


class GroupFit(Protocol):
    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column i of the group, w (out,) -> (codes (out,), dequantized w_hat (out,))."""


class ColumnGrid(Protocol):
    def group_size(self, n_in: int) -> int:
        """Consecutive input columns that share one fit (n_in: they all do)."""

    def fit(self, cols: torch.Tensor, start: int) -> GroupFit:
        """Scales for the columns cols (out, <= group_size) starting at input column `start`."""


@dataclass(frozen=True)
class SpecFit:
    scale: torch.Tensor  # grid-shaped for the fitted columns, float32
    zero_point: torch.Tensor  # grid-shaped, int32 (zeros for symmetric)
    s: torch.Tensor  # (out, cols) one scale per element, in the GPTQ working dtype
    z: torch.Tensor  # (out, cols) zero-points as floats
    qmin: int
    qmax: int

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.s[:, i], self.z[:, i]
        q = torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)  # core.quantize
        return q, (q - z) * s  # core.dequantize's arithmetic


class SpecGrid:
    """A QuantSpec as a GPTQ grid.

    Per-group along in_features: each group is fitted on its own (min/max, or the clip ratio of
    least squared error when `clip` is given: calibrate.mse_qparams). Every other granularity
    spans all columns, so it is fitted once, from the whole weight. Given `scale` (and
    `zero_point`, grid-shaped for `shape`), those are used as they are, whatever the weights.
    `importance` (in,), one weight per input column: the clip search (`clip`, or the default
    MSESearch if none is given) minimises the importance-weighted squared error.
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype, *,
                 clip: MSESearch | None = None, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None, importance=None):
        if clip is not None and not isinstance(clip, MSESearch):
            raise TypeError(f"clip must be an MSESearch or None, got {type(clip).__name__}")
        if spec.float_zero_point:
            raise ValueError("GPTQ rounds onto integer zero-point grids here; zero_point "
                             "'float' is for round-to-nearest (method rtn)")
        if importance is not None:
            importance = torch.as_tensor(importance).to(torch.float32).reshape(-1)
            if importance.numel() != shape[1]:
                raise ValueError(f"the importance has {importance.numel()} values for "
                                 f"{shape[1]} input columns")
            clip = clip or MSESearch()
        self.spec, self.shape, self.dtype, self.clip = spec, tuple(shape), dtype, clip
        self.importance = importance
        self.given = None
        if scale is not None:
            scale, zero_point = _check_qparams(scale, zero_point, spec, self.shape)
            self.given = self._fit_from(scale, zero_point, self.shape)

    def group_size(self, n_in: int) -> int:
        along_columns = (self.spec.granularity is Granularity.PER_GROUP
                         and self.spec.resolved_axis(2) == 1)
        return self.spec.group_size if along_columns and self.given is None else n_in

    def fit(self, cols: torch.Tensor, start: int) -> SpecFit:
        if self.given is not None:
            return self.given
        if self.clip is None:
            scale, zero_point = choose_qparams(cols, self.spec)
        else:
            from ..calibrate.estimators import mse_qparams

            spec = self.spec
            if self.group_size(self.shape[1]) > cols.shape[1]:  # a shorter last group: the
                spec = replace(spec, group_size=cols.shape[1])  # search takes whole groups only
            imp = None
            if self.importance is not None:
                imp = self.importance[start : start + cols.shape[1]]
            scale, zero_point = mse_qparams(cols, spec, self.clip, importance=imp)
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return self._fit_from(scale, zero_point, tuple(cols.shape))

    def _fit_from(self, scale, zero_point, shape) -> SpecFit:
        s, z = _expand(scale, zero_point, self.spec, shape, self.dtype)
        return SpecFit(scale, zero_point, s, z, self.spec.qmin, self.spec.qmax)

    def qparams(self, fits: list[SpecFit]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole weight's grid-shaped (scale, zero_point or None) from its groups' fits."""
        scale = torch.cat([f.scale for f in fits], dim=1)  # (out, groups) or the one fit's grid
        zp = torch.cat([f.zero_point for f in fits], dim=1)
        return scale, None if self.spec.symmetric else zp


def _expand(scale, zero_point, spec: QuantSpec, shape, dtype):
    """Grid-shaped qparams repeated to one entry per weight element: (out, in) each."""
    block = spec.block_size(tuple(shape))
    s, z = scale.to(dtype), zero_point.to(dtype)
    for dim, b in enumerate(block):
        s = s.repeat_interleave(b, dim=dim)
        z = z.repeat_interleave(b, dim=dim)
    crop = (slice(0, shape[0]), slice(0, shape[1]))  # a shorter last group was padded
    return s[crop].contiguous(), z[crop].contiguous()


def _check_qparams(scale, zero_point, spec: QuantSpec, shape):
    grid = grid_shape(tuple(shape), spec)
    if scale.numel() != torch.Size(grid).numel():
        raise ValueError(
            f"scale has {scale.numel()} entries; {spec.describe()} on {tuple(shape)} needs "
            f"grid {grid}"
        )
    if not spec.symmetric and zero_point is None:
        raise ValueError("asymmetric quantization needs a zero_point with the scale")
    scale = scale.reshape(grid).to(torch.float32).clone()
    if spec.symmetric or zero_point is None:
        return scale, torch.zeros(grid, dtype=torch.int32)
    return scale, zero_point.reshape(grid).to(torch.int32).clone()
