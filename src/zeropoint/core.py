"""The affine quantizer: choose_qparams, quantize, dequantize, fake_quantize.

    q = clamp(round(x / scale) + zero_point, qmin, qmax)        x_hat = (q - zero_point) * scale

Every granularity is one reshape: the tensor is viewed so that each block of `spec.block_size`
elements is a run of dimensions, the scale broadcasts over those runs, and the same few tensor
ops serve per-tensor, per-channel and per-group alike. The elementwise work walks the tensor in
chunks of about a megabyte so that its four passes (divide, round, shift, clamp) stay in cache:
eager PyTorch, no compiler, no Python loop over elements or groups.

Where a C compiler is at hand, float32 work takes the fused one-pass loops of ckernels.py
instead; they compute the same codes bit for bit, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from . import ckernels
from .spec import QuantSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per chunk of elementwise work: 256K float32 = 1 MiB, which sits in a 2-4 MiB L2 cache
# together with its output, yet is large enough for torch to split across threads.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class BlockView:
    """A tensor's shape regrouped so that blocks sharing a scale are whole dimensions.

    Dimension d of size n_d * b_d splits into (n_d blocks, b_d elements); adjacent dimensions
    of the same kind merge and size-1 dimensions drop, so per-group over the last axis of an
    (N, K) weight becomes (N * K // g, g) and per-channel over axis 0 becomes (N, K).
    """

    shape: tuple[int, ...]  # the merged view of the data
    is_block: tuple[bool, ...]  # True where a dimension runs inside one block
    grid: tuple[int, ...]  # scale storage shape: one entry per block, in the tensor's own dims

    @classmethod
    def of(cls, shape: tuple[int, ...], block_size: tuple[int, ...]) -> "BlockView":
        dims: list[list] = []  # [size, is_block] pairs after merging
        for n, b in zip(shape, block_size):
            for size, kind in ((n // b, False), (b, True)):
                if size == 1:
                    continue
                if dims and dims[-1][1] == kind:
                    dims[-1][0] *= size
                else:
                    dims.append([size, kind])
        if not dims:  # a single element
            dims = [[1, True]]
        grid = tuple(n // b for n, b in zip(shape, block_size))
        return cls(tuple(d[0] for d in dims), tuple(d[1] for d in dims), grid)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale in the merged view: 1 along block dimensions."""
        return tuple(1 if blk else n for n, blk in zip(self.shape, self.is_block))

    @property
    def block_dims(self) -> tuple[int, ...]:
        return tuple(d for d, blk in enumerate(self.is_block) if blk)

    def chunks(self):
        """Slices along dimension 0 of about CHUNK_ELEMENTS elements each."""
        rows = self.shape[0]
        per_row = prod(self.shape[1:])
        step = max(1, CHUNK_ELEMENTS // per_row)
        for start in range(0, rows, step):
            yield slice(start, min(start + step, rows))


def padded_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """`shape` rounded up to whole blocks. Only a group size that does not divide its axis
    changes anything: the last group of that axis is then shorter, and is computed as if padded
    with zeros, which is exact, since every block's range holds 0 anyway."""
    block = spec.block_size(tuple(shape))
    return tuple(-(-n // b) * b for n, b in zip(shape, block))


def grid_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """One entry per block: the shape of the scale and zero-point of a tensor of `shape`."""
    return tuple(n // b for n, b in zip(padded_shape(shape, spec), spec.block_size(tuple(shape))))


def _blocked(t: torch.Tensor, spec: QuantSpec):
    """(t zero-padded to whole blocks and viewed as the BlockView, the view, the padded shape)."""
    full = padded_shape(tuple(t.shape), spec)
    if full != tuple(t.shape):
        pads = []
        for have, want in zip(reversed(t.shape), reversed(full)):
            pads += [0, want - have]
        t = torch.nn.functional.pad(t, pads)
    view = BlockView.of(full, spec.block_size(tuple(t.shape)))
    return t.contiguous().view(view.shape), view, full


def _crop(t: torch.Tensor, full: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    if full == tuple(shape):
        return t.view(shape)
    return t.view(full)[tuple(slice(0, n) for n in shape)].contiguous()


def check_float_tensor(x: torch.Tensor, name: str = "tensor") -> None:
    """TypeError/ValueError for what the quantizer cannot take: not a float tensor, or empty."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; accepted: float16, bfloat16, float32, float64 "
            "(integer and bool tensors are already discrete)"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it needs at least one element")


def raise_if_not_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """ValueError naming how many NaN/Inf elements `x` has and where the first one is."""
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {count} non-finite value(s) (NaN or Inf); the first is "
            f"{x[first].item()} at index {first}. Quantization needs finite values."
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are divided in float32 so that the codes do not depend on the
    # storage format's coarse rounding; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale and zero-point that map [lo, hi], widened to hold 0, onto the spec's code range.

    lo, hi: tensors of any (equal) shape, one entry per block. Returns (scale float32,
    zero_point int32) of that shape. The range always holds 0, so 0.0 is a code and
    dequantizes to exactly 0.0. A block whose range is all zero gets scale 1: any positive
    scale reproduces it exactly, and none divides by zero.
    """
    if spec.float_zero_point:
        return _float_zero_point_qparams(lo.to(torch.float64), hi.to(torch.float64), spec)
    lo = torch.clamp(lo.to(torch.float64), max=0.0)
    hi = torch.clamp(hi.to(torch.float64), min=0.0)
    if spec.symmetric:
        # Largest magnitude onto qmax: the top code is hit exactly and nothing is clipped.
        scale = torch.maximum(-lo, hi) / spec.qmax
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = stored_scale(scale, spec)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    else:
        zero_point = torch.round(spec.qmin - lo / scale.to(torch.float64))
        zero_point = zero_point.clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def stored_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`scale` (or a block minimum) as float32 holding only values the spec's scale_dtype
    stores exactly, so that codes are computed with the very numbers that are saved."""
    if spec.scale_dtype == "float16":
        scale = scale.to(torch.float16)
    return scale.to(torch.float32)


def _float_zero_point_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """[lo, hi] onto [qmin, qmax] with no widening to hold 0: scale (hi - lo) / (qmax - qmin)
    and the minimum lo itself, both as stored (ggml's Q4_1: x = d * q + m). The zero-point is
    the real number -lo / scale, float32: (q - z) * s = q * s + lo up to float32 rounding. A
    constant block gets scale 1 and is exact."""
    minimum = stored_scale(lo, spec)
    scale = stored_scale((hi - minimum.to(torch.float64)) / (spec.qmax - spec.qmin), spec)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = spec.qmin - minimum / scale
    return scale, zero_point


def zero_point_from_minimum(minimum: torch.Tensor, scale: torch.Tensor, spec: QuantSpec):
    """The float zero-point of a stored block minimum (see _float_zero_point_qparams)."""
    return spec.qmin - minimum.to(torch.float32) / scale.to(torch.float32)


def minimum_from_zero_point(zero_point: torch.Tensor, scale: torch.Tensor, spec: QuantSpec):
    """The block minimum s * (qmin - z) that a float zero-point stands for, as stored."""
    return stored_scale((spec.qmin - zero_point.to(torch.float64)) * scale.to(torch.float64), spec)


def block_min_max(x: torch.Tensor, spec: QuantSpec):
    """Minimum and maximum of every block, in the grid shape. Raises on NaN/Inf."""
    check_float_tensor(x)
    xv, view, _ = _blocked(x, spec)
    lib = _fast_path(x.dtype, view)
    if lib is not None:
        lo, hi, bad = ckernels.min_max(lib, xv.float(), view)
        if bad:
            raise_if_not_finite(x)
        return lo.reshape(view.grid), hi.reshape(view.grid)
    if len(view.block_dims) == 1:
        lo, hi = torch.aminmax(xv, dim=view.block_dims[0], keepdim=True)
    else:
        lo, hi = xv.amin(dim=view.block_dims, keepdim=True), xv.amax(dim=view.block_dims, keepdim=True)
    # NaN propagates through min/max and Inf lands in them: the check costs no extra pass.
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise_if_not_finite(x)
    return lo.reshape(view.grid), hi.reshape(view.grid)


def choose_qparams(x: torch.Tensor, spec: QuantSpec):
    """Min/max scale and zero-point for `x`: (scale float32, zero_point int32), grid-shaped.

    The grid shape is x.shape // block_size: (1, 1) per-tensor for a matrix, (N, 1)
    per-channel on axis 0, (N, ceil(K / group_size)) per-group on the last axis.
    """
    lo, hi = block_min_max(x, spec)
    return qparams_from_range(lo, hi, spec)


def _prepare(view: BlockView, x_shape, spec: QuantSpec, scale: torch.Tensor, zero_point, compute_dtype):
    if scale.numel() != prod(view.grid):
        raise ValueError(
            f"scale has {scale.numel()} entries but {spec.describe()} on shape {tuple(x_shape)} "
            f"needs one per block: grid {view.grid}"
        )
    s = scale.to(compute_dtype).reshape(view.scale_shape)
    z = None
    if not spec.symmetric:
        if zero_point is None:
            raise ValueError("asymmetric quantization needs a zero_point")
        z = zero_point.to(compute_dtype).reshape(view.scale_shape)
    return s, z


def _fast_path(dtype: torch.dtype, view: BlockView):
    """The C library when it can take this work (float32 arithmetic, one scale axis), else None."""
    if dtype == torch.float64 or ckernels.pcq(view.shape, view.is_block) is None:
        return None
    return ckernels.library()


def _rows(t: torch.Tensor | None, view: BlockView, rows: slice):
    """The part of a broadcast scale/zero-point that lines up with rows `rows` of the data."""
    if t is None or view.is_block[0]:
        return t
    return t[rows]


def quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """Integer codes of `x` (dtype spec.code_dtype, shape x.shape) for the given qparams."""
    check_float_tensor(x)
    compute = _compute_dtype(x.dtype)
    xv, view, full = _blocked(x, spec)
    s, z = _prepare(view, x.shape, spec, scale, zero_point, compute)
    # The C loops add an integer zero-point after rounding; a float one is added before.
    lib = None if spec.float_zero_point else _fast_path(x.dtype, view)
    if lib is not None:
        codes = ckernels.host_empty(view.shape, spec.code_dtype)
        # Half inputs are divided in float32 on the eager path too: same values, same codes.
        z_flat = None if z is None else z.contiguous()
        if ckernels.quantize(lib, xv.float(), codes, view, s.contiguous(), z_flat, spec.qmin, spec.qmax):
            raise_if_not_finite(x)
        return _crop(codes, full, x.shape)
    codes = torch.empty(view.shape, dtype=spec.code_dtype)
    first = next(view.chunks())
    buf = torch.empty((first.stop,) + view.shape[1:], dtype=compute)
    sums = []
    for rows in view.chunks():
        y = torch.div(xv[rows], _rows(s, view, rows), out=buf[: rows.stop - rows.start])
        sums.append(y.sum())  # NaN/Inf show up here; checked once at the end, no sync per chunk
        if spec.float_zero_point:
            y.add_(_rows(z, view, rows))
        y.round_()  # half to even, as torch's own quantize kernels
        if z is not None and not spec.float_zero_point:
            y.add_(_rows(z, view, rows))
        y.clamp_(spec.qmin, spec.qmax)
        codes[rows].copy_(y)
    if not torch.isfinite(torch.stack(sums)).all():
        raise_if_not_finite(x)  # a large finite sum can overflow: only raise on real NaN/Inf
    return _crop(codes, full, x.shape)


def dequantize(
    codes: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero_point=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(codes - zero_point) * scale, in `dtype` (the dtype the codes were quantized from)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a float dtype, got {dtype}")
    cv, view, full = _blocked(codes, spec)
    s, z = _prepare(view, codes.shape, spec, scale, zero_point, _compute_dtype(dtype))
    lib = _fast_path(dtype, view)
    if lib is not None:
        out = ckernels.host_empty(view.shape, torch.float32)
        z_flat = None if z is None else z.contiguous()
        ckernels.dequantize(lib, cv, out, view, s.contiguous(), z_flat)
        # The eager path also rounds the float32 product once into a half dtype.
        return _crop(out.to(dtype), full, codes.shape)
    out = torch.empty(view.shape, dtype=dtype)
    for rows in view.chunks():
        o = out[rows]
        o.copy_(cv[rows])  # codes and code differences are small integers: exact in any float
        if z is not None:
            o.sub_(_rows(z, view, rows))
        o.mul_(_rows(s, view, rows))  # one rounding, to the output dtype
    return _crop(out, full, codes.shape)


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize with the straight-through estimator: the gradient passes unchanged
    where x lands inside the code range and is zero where it was clamped (Bengio et al., 2013)."""

    @staticmethod
    def forward(ctx, x, spec, scale, zero_point):
        codes = quantize(x.detach(), spec, scale, zero_point)
        ctx.save_for_backward(x, scale, zero_point if zero_point is not None else scale.new_zeros(()))
        ctx.spec = spec
        return dequantize(codes, spec, scale, zero_point, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        spec = ctx.spec
        xv, view, full = _blocked(x.detach(), spec)
        s = scale.reshape(view.scale_shape)
        z = zero_point.reshape(view.scale_shape) if zero_point.dim() else zero_point
        q = torch.round(xv / s + z) if spec.float_zero_point else torch.round(xv / s) + z
        inside = _crop((q >= spec.qmin) & (q <= spec.qmax), full, x.shape)
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale=None, zero_point=None) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, differentiable with a straight-through gradient.

    Without a scale, min/max qparams of x itself are used.
    """
    if scale is None:
        scale, zero_point = choose_qparams(x.detach(), spec)
    return _FakeQuantize.apply(x, spec, scale, zero_point)
