"""QTensor: a quantized tensor that really occupies the memory it claims.

It holds the codes packed into bytes (see packing.py), one scale per block, one uint8
zero-point per block for the asymmetric scheme (none for symmetric, whose zero-point is 0),
and the spec, shape and float dtype needed to rebuild the tensor.

In memory scales are float32 (holding only values of the spec's scale_dtype) and a float
zero-point is float32; stored, scales take the spec's scale_dtype and a float zero-point is
stored as the block minimum in that dtype (ggml's Q4_1 form), which is what `nbytes` counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from math import prod

import torch
from safetensors.torch import load_file, save_file

from . import core, packing
from .atomic import atomic_path
from .spec import QuantSpec

FORMAT = "zeropoint.qtensor"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QTensor:
    packed: torch.Tensor  # (ceil(numel * bits / 8),) uint8
    scale: torch.Tensor  # grid shape, float32: ceil(shape / spec.block_size(shape))
    zero_point: torch.Tensor | None  # grid shape, uint8 (float32 if float); None for symmetric
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype  # the float dtype it was quantized from and dequantizes to

    @classmethod
    def quantize(cls, x: torch.Tensor, spec: QuantSpec, scale=None, zero_point=None) -> "QTensor":
        """Quantize `x` with min/max qparams, or with the given ones (e.g. from calibration)."""
        if scale is None:
            scale, zero_point = core.choose_qparams(x, spec)
        codes = core.quantize(x, spec, scale, zero_point)
        return cls.from_codes(codes, spec, scale, zero_point, x.dtype)

    @classmethod
    def from_codes(cls, codes, spec: QuantSpec, scale, zero_point, dtype) -> "QTensor":
        grid = core.grid_shape(tuple(codes.shape), spec)
        unsigned = _to_unsigned(codes, spec)
        zp = None if spec.symmetric else zero_point.reshape(grid).to(_zero_point_dtype(spec))
        return cls(
            packing.pack(unsigned, spec.bits),
            core.stored_scale(scale.reshape(grid), spec).contiguous(),
            zp,
            spec,
            tuple(codes.shape),
            dtype,
        )

    def codes(self) -> torch.Tensor:
        """The integer codes, shape `self.shape`, dtype spec.code_dtype."""
        unsigned = packing.unpack(self.packed, self.spec.bits, self.numel)
        return _from_unsigned(unsigned, self.spec).view(self.shape)

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Codes of the given rows of a 2-D tensor, (len(rows), shape[1]), unpacking only them.
        Needs whole bytes per row, so that each row starts a fresh run of the bit stream."""
        n_rows, n_cols = self.shape
        row_bytes = self.row_nbytes
        if row_bytes is None:
            raise ValueError(f"a row of {n_cols} codes at {self.spec.bits} bits is not whole bytes")
        packed = self.packed.view(n_rows, row_bytes)[rows]  # (len(rows), row_bytes)
        unsigned = packing.unpack(packed.reshape(-1), self.spec.bits, rows.numel() * n_cols)
        return _from_unsigned(unsigned, self.spec).view(rows.numel(), n_cols)

    def dequantize(self) -> torch.Tensor:
        return core.dequantize(self.codes(), self.spec, self.scale, self.zero_point, self.dtype)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales plus zero-points: what storing this tensor costs."""
        return sum(t.nbytes for t in self.state_dict().values())

    @property
    def row_nbytes(self) -> int | None:
        """Packed bytes of one row (one index along the first dimension), or None when a row
        ends inside a byte."""
        return packing.row_nbytes(prod(self.shape[1:]), self.spec.bits)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # -- safetensors --------------------------------------------------------------------------

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The stored tensors: scales in the spec's scale_dtype, a float zero-point as the block
        minimum in that dtype (from_state_dict turns them back)."""
        spec = self.spec
        tensors = {prefix + "packed": self.packed,
                   prefix + "scale": self.scale.to(getattr(torch, spec.scale_dtype))}
        if self.zero_point is not None:
            zp = self.zero_point
            if spec.float_zero_point:
                zp = core.minimum_from_zero_point(zp, self.scale, spec).to(tensors[prefix + "scale"].dtype)
            tensors[prefix + "zero_point"] = zp
        return tensors

    def metadata(self) -> dict:
        return {"spec": self.spec.to_dict(), "shape": list(self.shape), "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_state_dict(cls, tensors: dict, meta: dict, prefix: str = "") -> "QTensor":
        spec = QuantSpec.from_dict(meta["spec"])
        scale = tensors[prefix + "scale"].to(torch.float32)
        zero_point = tensors.get(prefix + "zero_point")
        if zero_point is not None and spec.float_zero_point:
            zero_point = core.zero_point_from_minimum(zero_point, scale, spec)
        return cls(
            tensors[prefix + "packed"],
            scale,
            zero_point,
            spec,
            tuple(meta["shape"]),
            getattr(torch, meta["dtype"]),
        )

    def save(self, path) -> None:
        """Write a .safetensors file atomically: codes, scales, zero-points and the spec."""
        header = {"format": FORMAT, "version": str(FORMAT_VERSION), "qtensor": json.dumps(self.metadata())}
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata=header)

    @classmethod
    def load(cls, path) -> "QTensor":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a zeropoint QTensor file (format {header.get('format')!r})")
        if int(header.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has QTensor format version {header['version']}; this zeropoint reads "
                f"up to {FORMAT_VERSION}"
            )
        return cls.from_state_dict(load_file(str(path)), json.loads(header["qtensor"]))


@lru_cache(maxsize=None)
def qtensor_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes QTensor.quantize stores for a weight of `shape` at `spec` (they depend on nothing
    else): codes, scales and zero-points."""
    return QTensor.quantize(torch.zeros(shape), spec).nbytes


def _zero_point_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.float32 if spec.float_zero_point else torch.uint8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sign_offset(spec: QuantSpec) -> int:
    # Signed sub-byte codes are stored biased by 2^(b-1) so that they fit the unsigned b-bit
    # packer; 8-bit codes are their own two's-complement bytes, which int8 kernels read in place.
    return 0 if spec.bits == 8 else 1 << (spec.bits - 1)


def _to_unsigned(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if not spec.symmetric:
        return codes.to(torch.uint8)
    # In uint8 arithmetic modulo 256, q + offset is exact for q in [-2^(b-1), 2^(b-1)).
    return codes.to(torch.int8).view(torch.uint8) + _sign_offset(spec)


def _from_unsigned(unsigned: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if not spec.symmetric:
        return unsigned
    return (unsigned - _sign_offset(spec)).view(torch.int8)
