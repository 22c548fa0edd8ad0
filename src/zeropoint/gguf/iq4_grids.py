"""IQ4_NL and IQ4_XS as GPTQ grids (algorithms/grids.py): the 16-level non-linear grid.

Both store, per block of 32 values, one step dl and 32 4-bit indices into the type's 16 int8
levels (gguf-py's IQ4_NL.kvalues); a value is dl * level. IQ4_NL keeps dl as its block's fp16
d; IQ4_XS derives it, per sub-block of 32 inside a super-block of 256, as d * (ls - 32) from
its fp16 d and a 6-bit scale ls. Under fixed steps, rounding one column is picking each row's
nearest level: the protocol's column step.

The steps are the ones llama.cpp's quantizer stores for the original weights (gguf.iquants,
with the importance vector when there is one), chosen once up front for the whole tensor; GPTQ
then rounds onto that grid, and `pack` writes the quantizer's headers (d, the sub-block
scales) with GPTQ's indices in place of its own. With no error to spread (an identity Hessian)
each value goes to its nearest level under the stored step.

    iq4 block (IQ4_NL, 18 bytes):   d f16 | qs[16]
    iq4 block (IQ4_XS, 136 bytes):  d f16 | scales_h u16 | scales_l[4] | qs[128]
    qs of a block of 32: byte j holds index j in its low nibble and index j + 16 in its high one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .iquants import quantize as quantize_iquant
from .types import QK_K, TYPES

IQ4_TYPES = ("IQ4_NL", "IQ4_XS")
BLOCK = 32  # values per step (an IQ4_NL block, an IQ4_XS sub-block)
_QS_AT = {"IQ4_NL": 2, "IQ4_XS": 8}  # byte offset of qs in a block


def iq4_levels() -> torch.Tensor:
    """The 16 int8 levels as float32 (16,), ascending (gguf-py's table: it is the format)."""
    import gguf.quants as gq

    return torch.tensor(np.asarray(gq.IQ4_NL.kvalues, np.float32))


@dataclass(frozen=True)
class IQ4Fit:
    """One block of 32 input columns for every row: x = dl * levels[index]."""

    dl: torch.Tensor  # (rows, 1) float32, as ggml's dequantizer computes it
    levels: torch.Tensor  # (16,) float32

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, w_hat = self.round_cols(w.unsqueeze(1))  # (rows, 1) each
        return q[:, 0], w_hat[:, 0]

    def round_cols(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (rows, k <= 32) -> (indices as float, the values ggml dequantizes them to)."""
        values = self.dl.unsqueeze(-1) * self.levels  # (rows, 1, 16)
        q = (w.to(torch.float32).unsqueeze(-1) - values).abs().argmin(-1)  # (rows, k)
        w_hat = torch.gather(values.expand(-1, w.shape[1], -1), 2, q.unsqueeze(-1))[..., 0]
        return q.to(torch.float32), w_hat


class IQ4Grid:
    """IQ4_NL or IQ4_XS: llama.cpp's steps for `weights` (out, in) under `importance` (in,) or
    none, fixed up front; `fit` ignores the columns it is handed (the updated weights)."""

    def __init__(self, qtype: str, weights: torch.Tensor, importance: np.ndarray | None = None):
        if qtype not in IQ4_TYPES:
            raise ValueError(f"not a 16-level i-quant: {qtype}; accepted: {', '.join(IQ4_TYPES)}")
        self.qtype, self.gtype = qtype, TYPES[qtype]
        rows, n = weights.shape
        if n % self.gtype.block_size:
            raise ValueError(f"{qtype} needs in_features a multiple of "
                             f"{self.gtype.block_size}, got {n}")
        raw = quantize_iquant(weights.detach().to(torch.float32).numpy(), qtype, importance)
        self._blocks = raw.reshape(rows, n // self.gtype.block_size, self.gtype.type_size)
        self._dl = _steps(qtype, self._blocks)  # (rows, in / 32) float32
        self._levels = iq4_levels()

    def group_size(self, n_in: int) -> int:
        return BLOCK

    def fit(self, cols: torch.Tensor, start: int) -> IQ4Fit:
        return IQ4Fit(self._dl[:, start // BLOCK : start // BLOCK + 1], self._levels)

    def pack(self, fits: list[IQ4Fit], codes: torch.Tensor) -> torch.Tensor:
        """codes (rows, in) level indices -> (rows, in / block * type_size) uint8: the
        quantizer's headers with these indices."""
        rows = codes.shape[0]
        idx = codes.to(torch.uint8).numpy().reshape(rows, -1, BLOCK)  # (rows, in / 32, 32)
        qs = idx[..., :16] | (idx[..., 16:] << 4)  # (rows, in / 32, 16)
        out = self._blocks.copy()  # (rows, blocks, type_size)
        per_block = self.gtype.block_size // BLOCK
        at = _QS_AT[self.qtype]
        out[..., at:] = qs.reshape(rows, out.shape[1], per_block * 16)
        return torch.from_numpy(out.reshape(rows, -1))


def _steps(qtype: str, blocks: np.ndarray) -> torch.Tensor:
    """(rows, blocks, type_size) bytes -> each 32 values' step dl (rows, in / 32) float32, in
    ggml's order (IQ4_XS: float(d) * (ls - 32), ls the 6-bit scale)."""
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0])
    d = d.to(torch.float32)  # (rows, blocks)
    if qtype == "IQ4_NL":
        return d
    h = blocks.astype(np.int32)
    scales_h = h[..., 2] | (h[..., 3] << 8)  # (rows, blocks) 2 high bits per sub-block
    ib = np.arange(QK_K // BLOCK)
    low = (h[..., 4 + ib // 2] >> (4 * (ib % 2))) & 15  # (rows, blocks, 8)
    high = (scales_h[..., None] >> (2 * ib)) & 3
    ls = torch.from_numpy((low | (high << 4)) - 32).to(torch.float32)
    return (d.unsqueeze(-1) * ls).reshape(d.shape[0], -1)  # (rows, blocks * 8)
