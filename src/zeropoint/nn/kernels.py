"""Matmul kernels for quantized Linear weights on the CPU, fast at batch 1.

Dequantizing a whole weight matrix and calling F.linear reads the int codes, writes a float
matrix 4-8x larger and reads it again: at batch 1 a matmul is bound by memory traffic, so that
costs far more than the float32 layer it replaces (the issue measured 17x slower for a
4096x4096 layer; benchmarks/bench_kernels.py shows it on this machine). These wrappers keep
the weights packed and call torch's own integer kernels instead:

- `Int8Weight`: symmetric per-output-channel int8 weights through fbgemm's dynamic int8 linear
  (`quantized::linear_dynamic`); activations are quantized on the fly to uint8.
- `Int4Weight`: asymmetric group-wise 4-bit weights through `_weight_int4pack_mm_for_cpu`
  (bfloat16 activations, weights dequantized group by group inside the kernel).

Each has a portable fallback in plain torch for builds without the kernel; the int8 fallback
reproduces fbgemm's arithmetic, so both paths give the same numbers.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Backend = Literal["auto", "fast", "fallback"]
_BACKENDS = ("auto", "fast", "fallback")

# Activation range of fbgemm's dynamic linear: uint8, or 0..127 with reduce_range (see Int8Weight).
_QMIN, _QMAX = 0, 255
# fbgemm never uses an activation scale below this (the smallest normal float16).
_SMALL_SCALE = float(np.float32(6.1e-5))
# Blocks of the int8 fallback matmul: |xq - zp| <= 255 and |w| <= 128 so a product is < 2**15
# and a sum of 512 of them is < 2**24: every partial sum is an integer float32 holds exactly.
_EXACT_BLOCK = 512

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu accepts
_INT4_OUT_MULTIPLE = 16  # it packs output channels in blocks of 16
_INT4_KERNEL_MID = 8  # it dequantizes a code q as (q - 8) * scale + zero


# --- availability ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def fbgemm_available() -> bool:
    """True when this torch build has fbgemm and its dynamic int8 linear."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


@lru_cache(maxsize=None)
def int4pack_available() -> bool:
    """True when `_weight_int4pack_mm_for_cpu` runs here (tried once on a tiny matrix)."""
    try:
        codes = torch.zeros(_INT4_OUT_MULTIPLE, 32, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.zeros(1, _INT4_OUT_MULTIPLE, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.zeros(1, 32, dtype=torch.bfloat16), packed, 32, sz
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _resolve(backend: str, fast_ok: bool, why_not: str) -> bool:
    """Whether to use the fast path for `backend` ("auto", "fast" or "fallback")."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "fast" and not fast_ok:
        raise ValueError(f"backend='fast' is not available: {why_not}")
    return fast_ok and backend != "fallback"


# --- int8 --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationQParams:
    """Per-tensor affine uint8 parameters of one activation tensor, as fbgemm chooses them."""

    scale: float  # a float32 value
    zero_point: int


def choose_activation_qparams(x: torch.Tensor, reduce_range: bool = True) -> ActivationQParams:
    """fbgemm's dynamic choice of activation scale and zero-point (quant_utils::
    ChooseQuantizationParams, called by PackedLinearWeight::apply_dynamic): the range
    [min(x), max(x)] over the WHOLE tensor (every row of the batch), widened to include 0, is
    mapped onto 0..255 (0..127 with reduce_range). The scale is computed in double and used as
    float32; the zero-point comes from whichever end (qmin or qmax) loses less precision and is
    rounded half to even.
    """
    qmin, qmax = (_QMIN // 2, _QMAX // 2) if reduce_range else (_QMIN, _QMAX)
    lo = np.float32(min(x.min().item(), 0.0)) if x.numel() else np.float32(0.0)
    hi = np.float32(max(x.max().item(), 0.0)) if x.numel() else np.float32(0.0)
    scale = (float(hi) - float(lo)) / (qmax - qmin)
    with np.errstate(over="ignore", divide="ignore"):
        unusable = np.float32(scale) == 0.0 or np.isinf(np.float32(1.0) / np.float32(scale))
    if unusable:  # fbgemm's fixed choice when the range is empty or its reciprocal overflows
        scale = 0.1
    if scale < _SMALL_SCALE:
        # fbgemm stretches the range so that the scale is exactly the cutoff.
        amplifier = np.float32(np.float32(_SMALL_SCALE) / np.float32(scale))
        scale = _SMALL_SCALE
        if lo == 0.0:
            hi = np.float32(np.float32(_SMALL_SCALE) * np.float32(qmax - qmin))
        elif hi == 0.0:
            lo = np.float32(-np.float32(_SMALL_SCALE) * np.float32(qmax - qmin))
        else:
            lo, hi = np.float32(lo * amplifier), np.float32(hi * amplifier)
    from_min, from_max = qmin - float(lo) / scale, qmax - float(hi) / scale
    err_min = abs(qmin) - abs(float(lo) / scale)
    err_max = abs(qmax) - abs(float(hi) / scale)
    zp = from_min if err_min < err_max else from_max
    zero_point = qmin if zp < qmin else qmax if zp > qmax else int(round(zp))
    return ActivationQParams(float(np.float32(scale)), zero_point)


def quantize_activation(x: torch.Tensor, qp: ActivationQParams) -> torch.Tensor:
    """uint8 codes of `x` as fbgemm's QuantizeAvx2 makes them: round(fma(x, 1/scale, zp)) in
    float32, ties to even, clamped to 0..255. Returned as float32 integers, (..., in_features)."""
    inv_scale = float(np.float32(1.0) / np.float32(qp.scale))
    # x * inv_scale is exact in float64 (two 24-bit mantissas); rounding the sum once to float32
    # is the fused multiply-add.
    t = (x.double() * inv_scale + qp.zero_point).float()
    return torch.round(t).clamp_(_QMIN, _QMAX)


class Int8Weight:
    """A symmetric per-output-channel int8 weight, ready for fast `linear` at any batch size.

    Weight: w[o, i] = codes[o, i] * scale[o].
    Activations are quantized dynamically, as fbgemm does: one uint8 scale and zero-point for
    the whole input tensor, chosen from its min and max (`choose_activation_qparams`), with
    `reduce_range=True` mapping onto 0..127 (the default, as in torch's dynamic quantized Linear:
    fbgemm's AVX2 kernel sums pairs of uint8*int8 products in int16, which 7-bit activations
    cannot overflow; AVX512-VNNI kernels never saturate, but the numbers should not depend on the
    CPU). The integer products are summed exactly in int32, then
    y = float32(acc - zp * sum_i codes[o, i]) * (scale_x * scale[o]), + bias afterwards.

    The fast path is fbgemm (`quantized::linear_dynamic`); the fallback computes the same
    numbers in plain torch. Tested: the two agree to within 4 float32 ulps of the largest output
    (bit for bit on the AVX512 machine they were written on).
    """

    def __init__(self, shape, codes, scale: torch.Tensor, reduce_range: bool, packed):
        self._shape = shape  # (out_features, in_features)
        self.codes = codes  # (out_features, in_features) int8; kept for the fallback only
        self.scale = scale  # (out_features,) float32
        self.reduce_range = reduce_range
        self._packed = packed  # fbgemm's packed weight, or None for the fallback

    @property
    def backend(self) -> str:
        return "fbgemm" if self._packed is not None else "fallback"

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @classmethod
    def prepare(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        *,
        reduce_range: bool = True,
        backend: Backend = "auto",
    ) -> Int8Weight:
        """Pack `codes` (out_features, in_features) int8 and `scale` (out_features,) float32.

        backend: "auto" (fbgemm when available), "fast" (fbgemm or an error), "fallback".
        """
        _check_2d(codes, "codes", torch.int8)
        out_features = codes.shape[0]
        if scale.shape != (out_features,):
            raise ValueError(
                f"scale must have shape (out_features,) = ({out_features},), "
                f"got {tuple(scale.shape)}"
            )
        scale = _check_scale(scale)
        codes = codes.contiguous()
        fast = _resolve(backend, fbgemm_available(), "this torch build has no fbgemm engine")
        packed = _fbgemm_prepack(codes, scale) if fast else None
        return cls(tuple(codes.shape), None if fast else codes, scale, reduce_range, packed)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ w.T + bias for x (..., in_features); y has x's dtype."""
        x2 = _as_rows(x, self.shape[1]).float()  # (batch, in_features)
        if self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, self.reduce_range)
        else:
            y = self._fallback(x2)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """(out_features, in_features) float32 weight. Only the fallback keeps the codes."""
        if self.codes is None:
            raise RuntimeError("the fbgemm weight keeps no plain codes; prepare a fallback one")
        return self.codes.float() * self.scale[:, None]

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        qp = choose_activation_qparams(x, self.reduce_range)
        xq = quantize_activation(x, qp) - qp.zero_point  # (batch, in_features), exact integers
        acc = torch.zeros(x.shape[0], self.codes.shape[0], dtype=torch.float64)
        for start in range(0, x.shape[1], _EXACT_BLOCK):
            block = slice(start, start + _EXACT_BLOCK)
            acc += (xq[:, block] @ self.codes[:, block].float().T).double()
        # fbgemm multiplies by the float32 product scale_x * scale[o], after one int->float
        # rounding of the exact sum.
        multiplier = torch.tensor(qp.scale, dtype=torch.float32) * self.scale
        return acc.float() * multiplier


@contextmanager
def _quantized_engine(name: str):
    """The packing routine follows the global engine; pin fbgemm and put the old one back."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _fbgemm_prepack(codes: torch.Tensor, scale: torch.Tensor):
    zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
    with warnings.catch_warnings(), _quantized_engine("fbgemm"):
        # torch 2.13 deprecates quantized tensors, but this is still the only way into fbgemm.
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(codes, scale.double(), zero_points, 0)
        # Bias is added after the kernel, so one packed weight serves any bias (and the fallback
        # adds it the same way, in the same rounding order).
        return torch.ops.quantized.linear_prepack(qweight, None)


class Int8WeightOnly:
    """A symmetric per-output-channel int8 weight, activations left alone (weight-only int8).

    Fast path: `aten._weight_int8pack_mm` with bfloat16 activations, which multiplies the int8
    codes in place (no dequantized copy) and applies the bfloat16 scale per output channel. The
    fallback computes the same thing in plain torch: (x_bf16 @ codes.T) * scale_bf16, rounded to
    bfloat16. Both round x to bfloat16, which is what makes the kernel fast on a CPU.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, fast: bool):
        self.codes = codes  # (out_features, in_features) int8, unpacked from the QTensor
        self.scale = scale.to(torch.bfloat16)  # (out_features,)
        self.fast = fast

    @property
    def backend(self) -> str:
        return "int8pack" if self.fast else "fallback"

    @classmethod
    def prepare(cls, codes: torch.Tensor, scale: torch.Tensor, *, backend: Backend = "auto"):
        _check_2d(codes, "codes", torch.int8)
        if scale.shape != (codes.shape[0],):
            raise ValueError(f"scale must have shape ({codes.shape[0]},), got {tuple(scale.shape)}")
        available = hasattr(torch.ops.aten, "_weight_int8pack_mm")
        fast = _resolve(backend, available, "this torch build has no _weight_int8pack_mm")
        return cls(codes.contiguous(), _check_scale(scale), fast)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = _as_rows(x, self.codes.shape[1]).to(torch.bfloat16).contiguous()  # (batch, in)
        if self.fast:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scale)
        else:
            y = ((x2.float() @ self.codes.float().T) * self.scale.float()).to(torch.bfloat16)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# --- int4 --------------------------------------------------------------------------------------


class Int4Weight:
    """An asymmetric group-wise 4-bit weight, ready for fast `linear`.

    Weight: w[o, i] = (codes[o, i] - zero_point[o, g]) * scale[o, g], g = i // group_size.

    Fast path: `_weight_int4pack_mm_for_cpu`, which computes in bfloat16 activations and
    dequantizes a code as (q - 8) * s + z with a bfloat16 (s, z) per group and output channel.
    Matching (q - zp) * scale needs s = scale and z = (8 - zp) * scale:
    (q - 8) * scale + (8 - zp) * scale = (q - zp) * scale. Exact in real arithmetic; both s and
    z are rounded to bfloat16 (8 significant bits), so each weight is off by up to
    2**-8 * 16 * scale, before the kernel's own bfloat16 roundings.
    The kernel needs out_features % 16 == 0 and group_size in 32, 64, 128, 256; other shapes
    use the fallback: dequantize to the activation dtype, then F.linear.
    Activations of another dtype are cast to bfloat16 for the kernel and the result cast back.
    """

    def __init__(self, shape, codes, scale, zero_point, group_size, packed, scales_and_zeros):
        self._shape = shape  # (out_features, in_features)
        # (out_features, in_features) uint8, 0..15: kept for the fallback only, so that the fast
        # path holds nothing but the kernel's packed half-byte weight.
        self.codes = codes
        self.scale = scale  # (out_features, in_features // group_size) float32
        # (out_features, in_features // group_size) uint8 0..15, or float32 real offsets
        self.zero_point = zero_point
        self.group_size = group_size
        self._packed = packed  # (out_features, in_features // 2) uint8, kernel's layout; or None
        self._scales_and_zeros = scales_and_zeros  # (in // group, out, 2) bfloat16; or None

    @property
    def backend(self) -> str:
        return "int4pack" if self._packed is not None else "fallback"

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @classmethod
    def prepare(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        group_size: int,
        *,
        backend: Backend = "auto",
    ) -> Int4Weight:
        """Pack `codes` (out, in) uint8 in 0..15 with per-group `scale` and integer `zero_point`
        (both (out, in // group_size); zero-points 0..15, any integer or float dtype holding
        integers). backend: "auto", "fast" (the int4 kernel or an error), "fallback".
        """
        _check_2d(codes, "codes", torch.uint8)
        out_features, in_features = codes.shape
        if group_size < 1 or in_features % group_size:
            raise ValueError(
                f"group_size must be a positive divisor of in_features={in_features}, "
                f"got {group_size}"
            )
        groups = (out_features, in_features // group_size)
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            if tuple(t.shape) != groups:
                raise ValueError(
                    f"{name} must have shape (out_features, in_features // group_size) = {groups}, "
                    f"got {tuple(t.shape)}"
                )
        if codes.numel() and int(codes.max()) > 15:
            raise ValueError(
                f"codes must be 4-bit values 0..15, got a maximum of {int(codes.max())}"
            )
        scale = _check_scale(scale)
        zero_point = _check_zero_point(zero_point)

        shape_ok = out_features % _INT4_OUT_MULTIPLE == 0 and group_size in INT4_GROUP_SIZES
        why_not = (
            "_weight_int4pack_mm_for_cpu is missing from this torch build"
            if not int4pack_available()
            else f"the int4 kernel needs out_features % {_INT4_OUT_MULTIPLE} == 0 and group_size "
            f"in {INT4_GROUP_SIZES}, got out_features={out_features}, group_size={group_size}"
        )
        fast = _resolve(backend, int4pack_available() and shape_ok, why_not)
        packed = sz = None
        if fast:
            # The packed layout is the kernel's own (blocked, not plain nibble pairs); we never
            # read it, only hand it back to the kernel.
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).contiguous(), 1  # inner_k_tiles: ignored on CPU
            )
            sz = _int4_scales_and_zeros(scale, zero_point)
        kept_codes = None if fast else codes.contiguous()
        return cls(tuple(codes.shape), kept_codes, scale, zero_point, group_size, packed, sz)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ w.T + bias for x (..., in_features); y has x's dtype."""
        x2 = _as_rows(x, self.shape[1])  # (batch, in_features)
        if self._packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self._packed, self.group_size,
                self._scales_and_zeros,
            )
        else:
            y = F.linear(x2, self.dequantize(x2.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) weight (codes - zero_point) * scale, as `dtype`.
        Only the fallback keeps the codes to do this."""
        if self.codes is None:
            raise RuntimeError("the int4pack weight keeps no plain codes; prepare a fallback one")
        out_features, in_features = self.shape
        codes = self.codes.view(out_features, -1, self.group_size).float()  # (out, groups, size)
        w = (codes - self.zero_point.float()[..., None]).mul_(self.scale[..., None])
        return w.view(out_features, in_features).to(dtype)


def _int4_scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(in // group, out, 2) bfloat16 [s, z] with (q - 8) * s + z == (q - zp) * scale."""
    zero = (_INT4_KERNEL_MID - zero_point.float()) * scale  # (out, in // group)
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


# --- checks ------------------------------------------------------------------------------------


def _check_2d(codes: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if codes.dtype != dtype or codes.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D {dtype} tensor (out_features, in_features), "
            f"got {codes.dim()}-D {codes.dtype}"
        )


def _check_scale(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(torch.float32).contiguous()
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError("scale must be finite and positive everywhere")
    return scale


def _check_zero_point(zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 for integer zero-points 0..15; a float32 tensor that holds other (finite) reals
    stays float32: a float zero-point (QuantSpec zero_point 'float') is any real offset."""
    zp = zero_point.to(torch.float64)
    if zero_point.is_floating_point() and not torch.equal(zp, zp.round()):
        if not torch.isfinite(zp).all():
            raise ValueError("a float zero_point must be finite everywhere")
        return zero_point.to(torch.float32).contiguous()
    if not torch.equal(zp, zp.round()) or (zp < 0).any() or (zp > 15).any():
        raise ValueError("zero_point must hold integers 0..15 (the 4-bit code of real zero), "
                         "or be a float tensor of real offsets")
    return zero_point.to(torch.uint8).contiguous()


def _as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """(..., in_features) -> (rows, in_features)."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape (..., in_features={in_features}), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    return x.reshape(-1, in_features)
