"""ggml block types as GPTQ grids (algorithms/grids.py): GPTQ works inside the type's own scale
layout, so that what it writes is a valid tensor of that type.

When GPTQ reaches a block of input columns (32 for the legacy types, 256 for the K-quants), the
block's scales are fitted from the already-updated weights with the type's own choice, bit for
bit as zeropoint.gguf.blocks / kquants (and llama.cpp) make it; each column is then rounded onto
that block's grid with the type's own rounding, and GPTQ spreads the error over the columns left.
With no error to spread (an identity Hessian), the bytes are the type's own quantization.

`block_grid(qtype)` gives the grid; `grid.pack(fits, codes)` the tensor's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kquants
from .blocks import BLOCK_SIZE
from .kquants_search import round_clamp, signed_absmax

GPTQ_TYPES = ("Q4_0", "Q5_0", "Q3_K")


@dataclass(frozen=True)
class SignedMaxFit:
    """One block of Q4_0/Q5_0 (x = d * (q - offset)) for every row."""

    inv: torch.Tensor  # (out,) float32 1/d, 0 where d is 0: the reference rounds with it
    d16: torch.Tensor  # (out,) float16 d as stored
    offset: int

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # blocks._quantize_signed_max: trunc(x / d + offset + 0.5) as two float32 roundings, then
        # clipped; floor equals the trunc wherever the clip keeps the value.
        v = w.to(torch.float32) * self.inv
        v += self.offset + 0.5
        # Where 1/d overflowed (a block of |x| < ~1e-37) the reference writes code 0.
        q = torch.where(torch.isfinite(v), v.floor_(), 0.0).clamp_(0, 2 * self.offset - 1)
        return q, self.d16.to(torch.float32) * (q - self.offset)  # blocks.dequantize_blocks


class SignedMaxGrid:
    """Q4_0 and Q5_0: d = (the x of largest |x|) / -offset per block of 32."""

    def __init__(self, qtype: str):
        self.qtype, self.bits = qtype, {"Q4_0": 4, "Q5_0": 5}[qtype]

    def group_size(self, n_in: int) -> int:
        return BLOCK_SIZE[self.qtype]

    def fit(self, cols: torch.Tensor, start: int) -> SignedMaxFit:
        offset = 1 << (self.bits - 1)
        d = signed_absmax(cols.to(torch.float32).t()) / -offset  # (out,)
        inv = d.reciprocal().masked_fill_(d == 0, 0.0)
        return SignedMaxFit(inv, d.to(torch.float16), offset)

    def pack(self, fits: list[SignedMaxFit], codes: torch.Tensor) -> torch.Tensor:
        """codes (out, in) 0..2^bits-1 -> (out, in / 32 * type_size) uint8."""
        n_out = codes.shape[0]
        q = codes.to(torch.uint8).view(n_out, len(fits), 32)  # (out, blocks, 32)
        d = torch.stack([f.d16 for f in fits], dim=1)  # (out, blocks) float16
        fields = [d.unsqueeze(-1).view(torch.uint8)]  # (out, blocks, 2)
        if self.bits == 5:  # qh: bit 4 of element j at bit j % 8 of byte j // 8
            high = (q >> 4).view(n_out, len(fits), 4, 8).to(torch.int32)
            fields.append((high << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8))
        low = q & 0x0F
        fields.append(low[..., :16] | (low[..., 16:] << 4))  # element j low, j + 16 high
        return torch.cat(fields, dim=-1).reshape(n_out, -1)


@dataclass(frozen=True)
class Q3KFit:
    """One Q3_K super-block (256 columns) for every row."""

    scales: kquants.Q3KScales  # B = out rows

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub_d = self.scales.sub_d[:, i // 16]  # (out,)
        # kquants._requantize: nearest_int(x / sub_d) in -4..3; a sub-block whose step is 0
        # keeps its search codes (and dequantizes to 0 whatever they are).
        q = round_clamp(w.to(torch.float32) / sub_d, -4, 3) + 4
        q = torch.where(sub_d != 0, q, self.scales.search_codes[:, i].to(torch.float32))
        return q, sub_d * (q - 4)  # kquants._dequantize_q3_k: d * scale * (q - 4)


class Q3KGrid:
    qtype = "Q3_K"

    def group_size(self, n_in: int) -> int:
        return kquants.QK_K

    def fit(self, cols: torch.Tensor, start: int) -> Q3KFit:
        return Q3KFit(kquants.q3_k_scales(cols.to(torch.float32).contiguous()))

    def pack(self, fits: list[Q3KFit], codes: torch.Tensor) -> torch.Tensor:
        n_out = codes.shape[0]
        per_block = [kquants.pack_q3_k(codes[:, k * 256 : (k + 1) * 256].to(torch.int32), f.scales)
                     for k, f in enumerate(fits)]  # (out, 110) each
        return torch.stack(per_block, dim=1).reshape(n_out, -1)


def block_grid(qtype: str):
    """The GPTQ grid of ggml type `qtype` (one of GPTQ_TYPES)."""
    if qtype in ("Q4_0", "Q5_0"):
        return SignedMaxGrid(qtype)
    if qtype == "Q3_K":
        return Q3KGrid()
    raise ValueError(f"GPTQ cannot write ggml type {qtype} yet; accepted: {', '.join(GPTQ_TYPES)}")
