"""One matmul for the quantized Linears that read the same input (q/k/v, gate/up).

At batch 1 a small model makes hundreds of matmul calls a token, and each call costs a fixed
dispatch overhead besides reading its weights. Linears that read the same input can share one
call on their weights stacked along out_features: with per-output-row scales (per channel, or
per group along in_features) the stacked QTensor is the same quantization, and each output
column is computed as before, so every member's output is bit for bit the same
(tests/nn/test_fuse.py holds the kernels to that).

The fusion is invisible to the model code: each member stays a QLinear with its own QTensor (so
saving, loading and the state dict do not change; the QTensor becomes a view of its rows of the
stacked one, so the weights are held once); only its kernel is swapped for a view onto the
group's. The first member called computes the whole stacked output and keeps it; a sibling
called next on the SAME input tensor takes its columns from it instead of computing. A call on
any other tensor computes afresh, so results never depend on call order. The one assumption:
the input is not modified in place between sibling calls (inference tensors carry no version
counter to check it); transformers' attention and gated MLP blocks never do that.
"""

from __future__ import annotations

import torch
from torch import nn

from ..qtensor import QTensor
from ..spec import Granularity
from .qlinear import QLinear, select_kernel

# Sibling Linears that read the same input in Llama-style blocks (Llama, Mistral, Qwen2, ...).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedGroup:
    """The stacked weight's kernel, the stacked bias, and the last computed output."""

    def __init__(self, kernel, stacked: QTensor, bias: torch.Tensor | None,
                 bounds: list[tuple[int, int]]):
        self.kernel = kernel
        self.stacked = stacked
        self.bias = bias  # (sum of out_features,) or None
        self.bounds = bounds  # member i owns output columns bounds[i][0]:bounds[i][1]
        self._forget()

    def _forget(self) -> None:
        self._input = self._output = None
        self._version = None
        self._unserved: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input x: its columns of the stacked output."""
        if not (x is self._input and index in self._unserved and self._version == _version(x)):
            self._input, self._version = x, _version(x)
            self._output = self.kernel.linear(x, self.bias)  # (..., sum of out_features)
            self._unserved = set(range(len(self.bounds)))
        self._unserved.discard(index)
        start, stop = self.bounds[index]
        y = self._output[..., start:stop].contiguous()  # a no-op at batch 1 (leading dims of 1)
        if not self._unserved:  # every member had its share: hold no tensors between tokens
            self._forget()
        return y


def _version(x: torch.Tensor):
    # Inference tensors keep no version counter; other tensors let an in-place edit be seen.
    return None if x.is_inference() else x._version


class FusedSlice:
    """A member's kernel after fusion: its columns of the group's stacked matmul."""

    def __init__(self, group: _FusedGroup, index: int):
        self.group, self.index = group, index

    @property
    def backend(self) -> str:
        return self.group.kernel.backend  # the kernel that runs; QLinear's repr says "fused"

    @property
    def decode_backend(self) -> str:
        return _decode_backend(self.group.kernel)

    def linear(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        # The member's bias is part of the group's stacked bias, already added.
        return self.group.output(self.index, x)

    def kernel_nbytes(self) -> int:
        """This member's share (by output rows) of what the group kernel holds."""
        total = _all_tensor_bytes(self.group.kernel, self.group.stacked)
        rows = self.group.bounds[-1][1]
        start, stop = self.group.bounds[self.index]
        return total * stop // rows - total * start // rows


def _all_tensor_bytes(kernel, stacked: QTensor) -> int:
    own = getattr(kernel, "kernel_nbytes", None)  # a kernel that knows (gemv.GemvKernel)
    if own is not None:
        return own()
    # Every other tensor the stacked kernel holds is its own copy, unless it views the stacked
    # bytes that the members' QTensors view too (see _share_rows).
    shared = stacked.packed.untyped_storage().data_ptr()
    return sum(t.nbytes for t in vars(kernel).values()
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != shared)


def _decode_backend(kernel) -> str:
    return getattr(kernel, "decode_backend", kernel.backend)


def _rows_quantized(q: QTensor) -> bool:
    """True when every scale belongs to one output row, so rows can be stacked."""
    wanted_axis = {Granularity.PER_CHANNEL: 0, Granularity.PER_GROUP: 1}.get(q.spec.granularity)
    return len(q.shape) == 2 and wanted_axis is not None and q.spec.resolved_axis(2) == wanted_axis


def stack_rows(weights: list[QTensor]) -> QTensor:
    """The QTensors stacked along out_features: the same codes, scales and zero-points."""
    first = weights[0]
    for q in weights:
        if q.spec != first.spec or q.shape[1:] != first.shape[1:] or q.dtype != first.dtype:
            raise ValueError(
                "stacked weights need the same spec, in_features and dtype, got "
                f"{q.spec.describe()} {q.shape} {q.dtype} and "
                f"{first.spec.describe()} {first.shape} {first.dtype}"
            )
        if not _rows_quantized(q):
            raise ValueError(
                "only 2-D weights quantized per output channel or per group along in_features "
                f"can be stacked, got {q.spec.describe()} on shape {q.shape}"
            )
    codes = torch.cat([q.codes() for q in weights])  # (sum of out_features, in_features)
    scale = torch.cat([q.scale for q in weights])
    zero_point = None if first.zero_point is None else torch.cat([q.zero_point for q in weights])
    return QTensor.from_codes(codes, first.spec, scale, zero_point, first.dtype)


def _share_rows(members: list[QLinear], stacked: QTensor) -> None:
    """Point each member's QTensor at its rows of `stacked` (same bytes, so no second copy of
    the weights) when rows are whole bytes; otherwise members keep their own."""
    row_bytes = stacked.row_nbytes
    if row_bytes is None:
        return
    start = 0
    for m in members:
        stop = start + m.out_features
        rows = slice(start, stop)
        zp = None if stacked.zero_point is None else stacked.zero_point[rows]
        m.weight_q = QTensor(stacked.packed[start * row_bytes: stop * row_bytes],
                             stacked.scale[rows], zp, stacked.spec, m.weight_q.shape,
                             m.weight_q.dtype)
        start = stop


def _stacked_bias(members: list[QLinear]) -> torch.Tensor | None:
    if all(m.bias is None for m in members):
        return None
    return torch.cat([
        m.bias.detach() if m.bias is not None else torch.zeros(m.out_features) for m in members
    ])


def fuse_members(members: list[QLinear], backend: str = "auto") -> bool:
    """Give `members` (QLinears that read the same input) one stacked kernel. Returns False,
    changing nothing, when they cannot share one with bit-identical results: different specs,
    in_features or activation modes, or a stacked kernel other than the members' own."""
    if len(members) < 2 or any(isinstance(m.kernel, FusedSlice) for m in members):
        return False
    first = members[0]
    if any(m.activations != first.activations for m in members):
        return False
    try:
        stacked = stack_rows([m.weight_q for m in members])
    except ValueError:
        return False
    kernel = select_kernel(stacked, first.activations, backend)
    both = (kernel.backend, _decode_backend(kernel))
    if any((m.kernel.backend, _decode_backend(m.kernel)) != both for m in members):
        return False
    bounds, start = [], 0
    for m in members:
        bounds.append((start, start + m.out_features))
        start += m.out_features
    group = _FusedGroup(kernel, stacked, _stacked_bias(members), bounds)
    _share_rows(members, stacked)
    for i, m in enumerate(members):
        m.kernel = FusedSlice(group, i)
    return True


def fuse_shared_inputs(model: nn.Module, backend: str = "auto") -> int:
    """Fuse, in place, every group of sibling QLinears named in SHARED_INPUT_GROUPS.
    Returns how many groups were fused."""
    fused = 0
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, QLinear)]
            fused += fuse_members(members, backend)
    return fused
