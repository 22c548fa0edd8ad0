"""Quantized modules: QLinear and QEmbedding hold a packed QTensor and compute with it.

QLinear picks the fastest matmul the weight's spec allows (see kernels.py):
- up to 4 bits, per-group along in_features (or per-channel): the int4 kernel. Codes of 2 and 3
  bits, and symmetric codes, are exact in its asymmetric 4-bit form (q + 8 with zero-point 8).
- 5 to 8 bits, symmetric, per output channel: the int8 weight-only kernel (bfloat16 activations),
  or fbgemm's dynamic int8 linear when the recipe quantizes activations ("int8-dynamic").
- anything else: dequantize the weight and call F.linear; correct for every spec, but slow.
At batch 1 (one float32 row: decoding), 8-bit symmetric per-channel and 4-bit per-group weights
skip those kernels for csrc/gemv.c, which reads the QTensor's own bytes in float32 (gemv.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..qtensor import QTensor
from ..spec import Granularity, QuantSpec
from .gemv import with_gemv
from .kernels import INT4_GROUP_SIZES, Int4Weight, Int8Weight, Int8WeightOnly


def _int4_form(q: QTensor):
    """(codes 0..15, scale, zero_point, group_size) for the int4 kernel, or None.

    The kernel takes a few group sizes that must divide in_features; any of our groups (per
    channel, or per group, also with a shorter last group) is a run of whole kernel groups of
    size gcd(group, in_features) or a divisor of it, each repeating the group's scale."""
    spec = q.spec
    if spec.bits > 4 or len(q.shape) != 2:
        return None
    out_features, in_features = q.shape
    if spec.granularity is Granularity.PER_GROUP and spec.resolved_axis(2) == 1:
        group = spec.group_size
    elif spec.granularity is Granularity.PER_CHANNEL and spec.resolved_axis(2) == 0:
        group = in_features
    else:
        return None
    common = math.gcd(group, in_features)
    kernel_group = max((g for g in INT4_GROUP_SIZES if common % g == 0), default=None)
    if kernel_group is None:
        return None
    per_group = group // kernel_group  # kernel groups in one of ours
    n_kernel_groups = in_features // kernel_group
    scale = q.scale.repeat_interleave(per_group, dim=1)[:, :n_kernel_groups]
    codes = q.codes()
    if spec.symmetric:  # q in [-8, 7] is (q + 8) - 8: unsigned codes with zero-point 8
        codes = (codes.to(torch.int16) + 8).to(torch.uint8)
        zero_point = torch.full(scale.shape, 8, dtype=torch.uint8)
    else:
        zero_point = q.zero_point.repeat_interleave(per_group, dim=1)[:, :n_kernel_groups]
    return codes, scale.contiguous(), zero_point.contiguous(), kernel_group


def _is_int8_per_channel(spec: QuantSpec, shape) -> bool:
    return (
        spec.symmetric and spec.bits >= 5 and len(shape) == 2
        and spec.granularity is Granularity.PER_CHANNEL and spec.resolved_axis(2) == 0
    )


class _Dequantizing:
    """The portable path for any spec: dequantize, then F.linear in the activation dtype."""

    backend = "dequantize"

    def __init__(self, q: QTensor):
        self.q = q

    def linear(self, x, bias=None):
        return F.linear(x, self.q.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))


# _weight_int8pack_mm crashes on codes that do not start on a 16-byte boundary (seen with
# tensors loaded from a safetensors file at an odd offset); torch allocates on 64.
_ALIGN = 64


def _aligned(q: QTensor) -> QTensor:
    """q, or q with its bytes copied to an aligned buffer (which then replaces the old one)."""
    if q.packed.data_ptr() % _ALIGN == 0:
        return q
    return dataclasses.replace(q, packed=q.packed.clone())


def _int8_codes(q: QTensor) -> torch.Tensor:
    """(out, in) int8 codes; for 8 bits a view of the QTensor's own bytes, not a copy."""
    if q.spec.bits == 8 and q.packed.data_ptr() % _ALIGN == 0:
        # 8-bit symmetric codes are stored as their own two's-complement bytes.
        return q.packed.view(torch.int8).view(q.shape)
    return q.codes()


def select_kernel(q: QTensor, activations: str | None = None, backend: str = "auto"):
    """The matmul object for weight `q` (see the module docstring for the order); one-row
    inputs of the weight-only kernels take the C path of gemv.py where the spec allows."""
    if activations == "int8-dynamic":
        if not (_is_int8_per_channel(q.spec, q.shape) and q.spec.bits == 8):
            raise ValueError(
                f"int8-dynamic activations need 8-bit symmetric per-channel weights, got "
                f"{q.spec.describe()}"
            )
        return Int8Weight.prepare(q.codes(), q.scale.reshape(-1), backend=backend)
    if backend == "dequantize":
        return _Dequantizing(q)
    form = _int4_form(q)
    if form is not None:
        kernel = Int4Weight.prepare(*form, backend=backend)
    elif _is_int8_per_channel(q.spec, q.shape):
        kernel = Int8WeightOnly.prepare(_int8_codes(q), q.scale.reshape(-1), backend=backend)
    else:
        kernel = _Dequantizing(q)
    return with_gemv(q, kernel, backend)


def kernel_nbytes(kernel, q: QTensor | None = None) -> int:
    """Bytes a kernel packed for itself, beyond the stored QTensor `q` it was made from."""
    own = getattr(kernel, "kernel_nbytes", None)  # a fused member's share (see fuse.py)
    if own is not None:
        return own()
    # The kernels' unpacked codes are copies too (QTensor.codes() unpacks into a new tensor),
    # unless they are a view of q's own bytes.
    names = ("_packed", "_scales_and_zeros", "codes")
    held = [getattr(kernel, name, None) for name in names]
    shared = None if q is None else q.packed.untyped_storage().data_ptr()
    return sum(t.nbytes for t in held
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != shared)


class QLinear(nn.Module):
    """A Linear layer whose weight is a packed QTensor (out_features, in_features)."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, activations: str | None = None,
                 backend: str = "auto"):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QLinear needs a 2-D weight, got shape {weight.shape}")
        self.weight_q = weight = _aligned(weight)
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.activations = activations
        self.kernel = select_kernel(weight, activations, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, activations: str | None = None,
                    backend: str = "auto", weight: QTensor | None = None) -> "QLinear":
        q = weight if weight is not None else QTensor.quantize(linear.weight.detach(), spec)
        return cls(q, linear.bias, activations, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.bias)

    def resident_bytes(self) -> int:
        """Bytes this layer holds: the stored QTensor plus what its kernel packed for itself."""
        total = self.weight_q.nbytes + (self.bias.nbytes if self.bias is not None else 0)
        return total + kernel_nbytes(self.kernel, self.weight_q)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.weight_q.spec.describe()}, kernel={self.kernel.backend}"
                + (f", batch 1: {self.kernel.decode_backend}"
                   if hasattr(self.kernel, "decode_backend") else "")
                + (" (fused)" if hasattr(self.kernel, "group") else ""))


class QEmbedding(nn.Module):
    """An Embedding whose table is a QTensor quantized per row (per-channel on axis 0, or
    per-group along the embedding dimension). A lookup unpacks only the rows it needs."""

    def __init__(self, weight: QTensor, padding_idx=None):
        super().__init__()
        spec = weight.spec
        rows_ok = spec.granularity is Granularity.PER_CHANNEL and spec.resolved_axis(2) == 0
        groups_ok = spec.granularity is Granularity.PER_GROUP and spec.resolved_axis(2) == 1
        if len(weight.shape) != 2 or not (rows_ok or groups_ok):
            raise ValueError(
                f"QEmbedding needs a 2-D table quantized per row or per group along the "
                f"embedding dimension, got {spec.describe()} on shape {weight.shape}"
            )
        if weight.row_nbytes is None:
            raise ValueError(
                f"an embedding row of {weight.shape[1]} codes at {spec.bits} bits is not whole "
                "bytes, so rows cannot be unpacked on their own"
            )
        self.weight_q = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.embed_scale = None  # a factor on every looked-up row (Gemma's sqrt(hidden))

    @classmethod
    def replacing(cls, module: nn.Embedding, weight: QTensor) -> "QEmbedding":
        """A QEmbedding in place of `module`, keeping what its forward adds to a lookup: the
        padding index, and the scale of a scaled embedding (transformers' Gemma multiplies
        every row by embed_scale in its own forward, which a plain lookup would drop)."""
        new = cls(weight, module.padding_idx)
        scale = getattr(module, "embed_scale", None)
        if scale is not None:
            new.embed_scale = torch.as_tensor(scale).detach().clone()
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.lookup(ids)
        if self.embed_scale is not None:  # as transformers: the scale in the table's dtype
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows of `ids`, (*ids.shape, embedding_dim), without embed_scale."""
        q, dim = self.weight_q, self.embedding_dim
        flat = ids.reshape(-1)
        codes = q.row_codes(flat).float()  # (n, dim)
        groups = q.scale.shape[1]
        codes = codes.view(flat.numel(), groups, dim // groups)  # (n, groups, group_size)
        if q.zero_point is not None:
            codes = codes - q.zero_point[flat].float().unsqueeze(-1)
        rows = codes * q.scale[flat].unsqueeze(-1)
        return rows.reshape(*ids.shape, dim).to(q.dtype)

    def resident_bytes(self) -> int:
        return self.weight_q.nbytes
