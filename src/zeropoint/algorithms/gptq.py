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

from ..calibrate.search import MSESearch
from ..core import check_float_tensor, raise_if_not_finite
from ..qtensor import QTensor
from ..spec import QuantSpec
from ..threads import torch_threads
from .grids import ColumnGrid, SpecGrid


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ's column loop runs, whatever grid it rounds onto."""

    block_size: int = 128  # GPTQ Sec. 4 "lazy batch updates": 128 columns per block
    percdamp: float = 0.01  # GPTQ Sec. 4 "Cholesky reformulation": 1% of the mean diagonal
    # Columns by descending diag(H) (the GPTQ repository's `--act-order`), so that the columns
    # with the largest input energy are rounded while most columns are still free to absorb
    # their error. Off as in the paper; on for whole models (sequential.MODEL_OPTIONS).
    act_order: bool = False
    # H <- (1 - s) H + s diag(H) before damping: the input correlations shrunk towards none.
    # At 1 GPTQ spreads no error and rounds every weight to its nearest level: the diagonal
    # weighting of an importance matrix (llama-quantize --imatrix) on the same grid. The
    # calibration text's correlations fit a held-out text's worse than its diagonal does (see
    # gguf/gptq.py IMATRIX_SHRINK), so shrinking trades fit on the one for fit on the other.
    diagonal_shrink: float = 0.0

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")
        if not 0.0 <= self.diagonal_shrink <= 1.0:
            raise ValueError(f"diagonal_shrink must be in [0, 1], got {self.diagonal_shrink!r}")


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
                  options: GPTQOptions = GPTQOptions(), **kwargs) -> QTensor:
    """GPTQ codes of `weight` (out, in) as a QTensor; arguments as for `gptq`."""
    return gptq(weight, hessian, spec, options, **kwargs).qtensor(spec, weight.dtype)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor | InverseHessian,
    spec: QuantSpec,
    options: GPTQOptions = GPTQOptions(),
    *,
    clip: MSESearch | None = None,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    importance=None,
) -> GPTQResult:
    """Quantize `weight` (out, in) with GPTQ against `hessian` (in, in) or its InverseHessian,
    onto `spec`'s grid.

    Scales: per-group along in_features (spec axis -1/1) fits each group's scale when GPTQ
    reaches the group's first column, from the weights as updated by every column before it (the
    paper's group-wise variant, Sec. 5): min/max, or with `clip` the clip ratio of least squared
    error (calibrate.mse_qparams). Every other granularity, and every group when
    `options.act_order` is set, is fitted up front from the original weights ("static groups": a
    QTensor stores groups by column position, so they must not follow the permuted order). Given
    `scale` (and `zero_point`, grid-shaped), those are used as they are. `importance` (in,):
    the clip search weighs each column's error by it (SpecGrid).
    """
    _check_inputs(weight, hessian, spec, options)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grid = SpecGrid(spec, tuple(weight.shape), dtype, clip=clip, scale=scale,
                    zero_point=zero_point, importance=importance)
    result = gptq_columns(weight, hessian, grid, options)
    scale, zero_point = grid.qparams(result.fits)
    return GPTQResult(result.codes.to(spec.code_dtype), scale, zero_point, result.loss)


@dataclass(frozen=True)
class ColumnsResult:
    codes: torch.Tensor  # (out, in) float, in input-column order
    fits: list  # one GroupFit per group of grid.group_size(in) columns, in column order
    loss: float  # GPTQ's proxy loss


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ's column loop needs of a Hessian, computed once for every weight that reads the
    same input (q/k/v; gate/up), whether they are solved here one after another or as tasks on
    other machines (algorithms/solvers.py): the upper Cholesky factor of the damped inverse, in
    the column order GPTQ rounds in."""

    upper: torch.Tensor  # (in, in) upper triangular, rows and columns in `order`
    perm: torch.Tensor | None  # (in,) column order (act-order), None for the natural order
    dead: torch.Tensor  # (in,) bool: columns no input drives, which GPTQ zeroes

    @property
    def nbytes(self) -> int:
        extra = 0 if self.perm is None else self.perm.numel() * self.perm.element_size()
        return self.upper.numel() * self.upper.element_size() + extra + self.dead.numel()


def inverse_hessian(hessian: torch.Tensor, options: GPTQOptions = GPTQOptions(),
                    dtype: torch.dtype = torch.float32) -> InverseHessian:
    """The InverseHessian of `hessian` (in, in) for GPTQ's loop in `dtype`.

    The Cholesky factorizations run on one thread: MKL's LAPACK gives other bits on other thread
    counts, and those bits reach the codes (Q6_K on SmolLM2-sized rows, 1 vs 2 threads). Pinned,
    every code is the same on any thread count, in this process or in a Ray task; the rest of
    the loop (outer products, matrix products of a fixed row count) does not depend on threads.
    """
    H = hessian.detach().to(dtype).clone()  # (in, in)
    # A column no input ever drives (zero diagonal) cannot change the output: GPTQ zeroes it and
    # gives it a unit diagonal so that H stays invertible (GPTQ reference code, `dead`).
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    if options.diagonal_shrink:
        diag = torch.diagonal(H).clone()
        H.mul_(1.0 - options.diagonal_shrink)
        H.diagonal().copy_(diag)
    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True)
            if options.act_order else None)
    if perm is not None:
        H = H[perm][:, perm]
    with torch_threads(1):
        upper = _upper_cholesky_of_inverse(H, options.percdamp)
    return InverseHessian(upper, perm, dead)


def gptq_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor | InverseHessian,
    grid: ColumnGrid,
    options: GPTQOptions = GPTQOptions(),
) -> ColumnsResult:
    """GPTQ's column loop onto any grid (grids.py): `weight` (out, in) float32/64, `hessian`
    (in, in) or its InverseHessian (shared by weights that read one input; made with the same
    options and dtype). Groups are fitted when reached (dynamic), or all up front from the
    original weights when `act_order` permutes the columns or one group spans them all (static).
    Each row is rounded on its own: rows solved apart give the codes they get stacked."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    inverse = hessian if isinstance(hessian, InverseHessian) else \
        inverse_hessian(hessian, options, dtype)
    W = weight.detach().to(dtype).clone()  # (out, in), updated in place as columns are rounded
    n_out, n_in = W.shape
    W[:, inverse.dead] = 0.0

    group = grid.group_size(n_in)
    fits: list = [None] * -(-n_in // group)
    static = options.act_order or group >= n_in
    block_size = options.block_size
    if static:
        for k in range(len(fits)):
            fits[k] = grid.fit(W[:, k * group : (k + 1) * group], k * group)
    else:
        # A group must lie inside one block, so that its fit sees weights that carry every
        # earlier column's update (the lazy update reaches later blocks only at the block's end).
        block_size = max(group, block_size // group * group)

    perm = inverse.perm
    order = perm.tolist() if perm is not None else range(n_in)  # original index of each column
    if perm is not None:
        W = W[:, perm]

    Hinv = inverse.upper.to(dtype)  # (in, in) upper triangular
    codes = torch.empty(n_out, n_in, dtype=dtype)
    losses = torch.zeros(n_in, dtype=dtype)  # (in,) each column's share of the proxy loss
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2]  # (out, b) view: in-block updates land in W directly
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        Err1 = torch.empty(n_out, i2 - i1, dtype=dtype)  # (out, b) scaled errors
        for i in range(i2 - i1):
            col = i1 + i
            orig = order[col]
            if not static and orig % group == 0:
                fits[orig // group] = grid.fit(W[:, col : col + group], col)
            w = W1[:, i]  # (out,)
            q, w_hat = fits[orig // group].round(orig % group, w)
            codes[:, col] = q
            d = Hinv1[i, i]
            diff = w - w_hat.to(dtype)  # (out,)
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
    return ColumnsResult(codes, fits, float(losses.sum()))


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


def _check_inputs(weight, hessian, spec, options) -> None:
    check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"GPTQ needs a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    raise_if_not_finite(weight, "weight")
    n_in = weight.shape[1]
    if isinstance(hessian, InverseHessian):
        if tuple(hessian.upper.shape) != (n_in, n_in):
            raise ValueError(f"the inverse Hessian is for {hessian.upper.shape[0]} inputs, the "
                             f"weight of shape {tuple(weight.shape)} has {n_in}")
        hessian = hessian.upper  # finite by construction; checked below all the same
    elif not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n_in, n_in):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(
            f"hessian must be ({n_in}, {n_in}) for a weight of shape {tuple(weight.shape)}, "
            f"got {got}"
        )
    raise_if_not_finite(hessian, "hessian")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(options, GPTQOptions):
        raise TypeError(f"options must be a GPTQOptions, got {type(options).__name__}")
