"""GPTQ: round weights one input column at a time, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's output error
(Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323).

For a Linear y = x W^T with weight W (out, in) and calibration inputs X (n, in), the layer error
||X W^T - X W_hat^T||^2 has, row by row, the Hessian H = 2 X^T X / n (GPTQ Sec. 3, eq. 1, from
OBQ). Rows are independent given H, so all rows are rounded together, column by column.

The codes follow zeropoint's quantizer exactly: q = clamp(round(w / s) + zp, qmin, qmax) with
the float32 division and half-to-even rounding of core.quantize, so a QTensor of these codes
dequantizes to the very weights GPTQ worked with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import (
    check_float_tensor, choose_qparams, grid_shape, qparams_from_range, raise_if_not_finite,
)
from ..qtensor import QTensor
from ..spec import Granularity, QuantSpec

DEFAULT_BLOCK_SIZE = 128  # GPTQ Sec. 4 "lazy batch updates": 128 columns per block
DEFAULT_PERCDAMP = 0.01  # GPTQ Sec. 4 "Cholesky reformulation": 1% of the mean diagonal


class HessianAccumulator:
    """Running H = 2 X^T X / n over every calibration row seen by one Linear input (GPTQ Sec. 3).

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype)  # (in, in)
        self.rows = 0  # n: calibration rows (tokens) seen so far

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs x (..., in_features): every leading index is one row."""
        in_features = self.hessian.shape[0]
        if x.shape[-1] != in_features:
            raise ValueError(
                f"inputs have {x.shape[-1]} features, the Hessian is for {in_features}"
            )
        x = x.detach().reshape(-1, in_features).to(self.hessian.dtype)  # (m, in)
        m = x.shape[0]
        if m == 0:
            return
        total = self.rows + m
        # Running mean of 2 x x^T: H <- H n/(n+m) + 2/(n+m) X_new^T X_new.
        self.hessian.addmm_(x.t(), x, beta=self.rows / total, alpha=2.0 / total)
        self.rows = total


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # (out, in) spec.code_dtype
    scale: torch.Tensor  # grid shape, float32
    zero_point: torch.Tensor | None  # grid shape, int32; None for symmetric
    loss: float  # GPTQ's proxy loss, sum over columns of (w - w_hat)^2 / (2 [H^-1]_jj)

    def qtensor(self, spec: QuantSpec, dtype: torch.dtype) -> QTensor:
        return QTensor.from_codes(self.codes, spec, self.scale, self.zero_point, dtype)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  **kwargs) -> QTensor:
    """GPTQ codes of `weight` (out, in) as a QTensor; keyword arguments as for `gptq`."""
    return gptq(weight, hessian, spec, **kwargs).qtensor(spec, weight.dtype)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    act_order: bool = False,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize `weight` (out, in) with GPTQ against `hessian` (in, in).

    Scales: per-group along in_features (spec axis -1/1) fits each group's min/max scale when
    GPTQ reaches the group's first column, from the weights as updated by every column before
    it (the paper's group-wise variant, Sec. 5). Every other granularity, and every group when
    `act_order` is set, takes min/max scales from the original weights up front ("static
    groups": a QTensor stores groups by column position, so they must not follow the permuted
    order). Given `scale` (and `zero_point`, grid-shaped), those are used as they are.

    act_order: process columns by descending diag(H) (the GPTQ repository's `--act-order`),
    so that the columns with the largest input energy are rounded while most columns are still
    free to absorb their error.
    """
    _check_inputs(weight, hessian, spec, block_size, percdamp)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()  # (out, in), updated in place as columns are rounded
    H = hessian.detach().to(dtype).clone()  # (in, in)
    n_out, n_in = W.shape

    # A column no input ever drives (zero diagonal) cannot change the output: zero it and give it
    # a unit diagonal so that H stays invertible (GPTQ reference code, `dead`).
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    dynamic = scale is None and _groups_along_columns(spec) and not act_order
    group = spec.group_size if dynamic else None
    if scale is None and not dynamic:
        scale, zero_point = choose_qparams(W, spec)
    if scale is not None:
        scale, zero_point = _check_qparams(scale, zero_point, spec, W.shape)
        s_full, z_full = _expand(scale, zero_point, spec, W.shape, dtype)  # (out, in) each
    else:
        grid = grid_shape((n_out, n_in), spec)  # (out, ceil(in / g))
        scale = torch.ones(grid, dtype=torch.float32)
        zero_point = torch.zeros(grid, dtype=torch.int32)
        s_full = torch.ones(n_out, n_in, dtype=dtype)
        z_full = torch.zeros(n_out, n_in, dtype=dtype)

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        s_full, z_full = s_full[:, perm], z_full[:, perm]

    Hinv = _upper_cholesky_of_inverse(H, percdamp)  # (in, in) upper triangular
    del H
    codes = torch.empty(n_out, n_in, dtype=dtype)
    losses = torch.zeros(n_in, dtype=dtype)  # (in,) each column's share of the proxy loss
    # A group must lie inside one block, so that its scale is fitted from weights that carry every
    # earlier column's update (the lazy update reaches later blocks only at the block's end).
    if group is not None:
        block_size = max(group, block_size // group * group)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2]  # (out, b) view: in-block updates land in W directly
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        Err1 = torch.empty(n_out, i2 - i1, dtype=dtype)  # (out, b) scaled errors
        for i in range(i2 - i1):
            col = i1 + i
            if group is not None and col % group == 0:
                _fit_group(W[:, col : col + group], spec, col // group, scale, zero_point,
                           s_full[:, col : col + group], z_full[:, col : col + group])
            w = W1[:, i]  # (out,)
            s, z = s_full[:, col], z_full[:, col]
            q = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax)
            codes[:, col] = q
            w_hat = (q - z) * s  # core.dequantize's arithmetic
            d = Hinv1[i, i]
            diff = w - w_hat  # (out,)
            # GPTQ Sec. 3, eq. 2: (w_q - quant(w_q))^2 / [H^-1]_qq, halved as in the reference
            losses[col] = diff.dot(diff) / (2 * d * d)
            err = diff / d  # (out,)
            # OBS update of the block's remaining columns (GPTQ Alg. 1, inner loop).
            W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1.0)
            Err1[:, i] = err
        # Lazy batch update of every later block at once (GPTQ Sec. 4, Alg. 1 outer loop).
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes = codes.to(spec.code_dtype)
    return GPTQResult(codes, scale, None if spec.symmetric else zero_point, float(losses.sum()))


def _groups_along_columns(spec: QuantSpec) -> bool:
    return spec.granularity is Granularity.PER_GROUP and spec.resolved_axis(2) == 1


def _fit_group(Wg, spec, g, scale, zero_point, s_cols, z_cols) -> None:
    """Min/max qparams of one column group Wg (out, <=g) into grid column g and its columns."""
    lo, hi = torch.aminmax(Wg, dim=1)
    s, z = qparams_from_range(lo, hi, spec)  # (out,) float32, int32
    scale[:, g], zero_point[:, g] = s, z
    s_cols.copy_(s[:, None].expand_as(s_cols))
    z_cols.copy_(z[:, None].expand_as(z_cols))


def _expand(scale, zero_point, spec: QuantSpec, shape, dtype):
    """Grid-shaped qparams repeated to one entry per weight element: (out, in) each."""
    block = spec.block_size(tuple(shape))
    s = scale.to(dtype)
    z = (zero_point if zero_point is not None else torch.zeros_like(scale)).to(dtype)
    for dim, b in enumerate(block):
        s = s.repeat_interleave(b, dim=dim)
        z = z.repeat_interleave(b, dim=dim)
    crop = (slice(0, shape[0]), slice(0, shape[1]))  # a shorter last group was padded
    return s[crop].contiguous(), z[crop].contiguous()


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H) (GPTQ Sec. 4): the rows of U
    are the inverse Hessians of the remaining columns, each column's pivot on the diagonal."""
    damp = percdamp * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info == 0:
            return U
    raise ValueError(
        f"the damped Hessian is not positive definite (percdamp {percdamp}); use more calibration "
        "data or a larger percdamp (e.g. 0.1)"
    )


def _check_inputs(weight, hessian, spec, block_size, percdamp) -> None:
    check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"GPTQ needs a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    raise_if_not_finite(weight, "weight")
    n_in = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n_in, n_in):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(
            f"hessian must be ({n_in}, {n_in}) for a weight of shape {tuple(weight.shape)}, "
            f"got {got}"
        )
    raise_if_not_finite(hessian, "hessian")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")


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
    zero_point = None if spec.symmetric else zero_point.reshape(grid).to(torch.int32).clone()
    return scale, zero_point
