"""The course chapter's Quantizer interface, done correctly.

A thin convenience over the functional API: it keeps the spec, and after quantize() the scale
and zero-point it chose, so dequantize() can undo it.
"""

from __future__ import annotations

import torch

from . import core
from .spec import QuantSpec


class Quantizer:
    """Quantizer(bits=8, scheme="asymmetric", granularity="per_tensor", axis=None,
    group_size=None, narrow_range=False).

    Unlike the chapter's listing, symmetric codes are signed (negatives survive) and 8-bit
    asymmetric codes are unsigned uint8 (no int8 overflow).
    """

    def __init__(
        self,
        bits: int = 8,
        scheme: str = "asymmetric",
        granularity: str = "per_tensor",
        axis: int | None = None,
        group_size: int | None = None,
        narrow_range: bool = False,
    ):
        self.spec = QuantSpec(bits, scheme, granularity, axis, group_size, narrow_range)
        self.scale: torch.Tensor | None = None  # grid-shaped: x.shape // block_size
        self.zero_point: torch.Tensor | None = None
        self._dtype = torch.float32

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def scheme(self) -> str:
        return self.spec.scheme.value

    def quantize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Codes of `tensor` under min/max qparams, which are kept on the quantizer."""
        self.scale, self.zero_point = core.choose_qparams(tensor, self.spec)
        self._dtype = tensor.dtype
        return core.quantize(tensor, self.spec, self.scale, self.zero_point)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("dequantize() needs the scale from a quantize() call first")
        return core.dequantize(codes, self.spec, self.scale, self.zero_point, self._dtype)

    def __repr__(self) -> str:
        return f"Quantizer({self.spec.describe()})"
