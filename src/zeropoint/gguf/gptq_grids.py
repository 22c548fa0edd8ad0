"""ggml block types as GPTQ grids (algorithms/grids.py): GPTQ works inside the type's own scale
layout, so that what it writes is a valid tensor of that type.

When GPTQ reaches a block of input columns (32 for the legacy types, 256 for the K-quants), the
block's scales are fitted from the already-updated weights with the type's own choice, bit for
bit as zeropoint.gguf.blocks / kquants (and llama.cpp) make it; each column is then rounded onto
that block's grid with the type's own rounding, and GPTQ spreads the error over the columns left.
With no error to spread (an identity Hessian), the bytes are the type's own quantization.

`block_grid(qtype)` gives the grid (the K types' live in kquant_grids); `grid.pack(fits, codes)`
the tensor's bytes. Every fit also rounds a whole block at once (`round_cols`) and has HQQ's
parameter step (`refit`: gguf/hqq.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .blocks import legacy_codes, legacy_params, legacy_values, pack_legacy
from .iq4_grids import IQ4_TYPES, IQ4Grid
from .kquant_grids import KGrid, WeightedKGrid
from .types import TYPES, GGMLType
from .weighted import K_WEIGHTED, LEGACY_WEIGHTED, quantize_weighted

GRID_TYPES = tuple(name for name, t in TYPES.items() if t.grid)  # each with HQQ's refit too
# What GPTQ writes: the grids above, and the 16-level i-quants, whose steps are llama.cpp's
# quantizer's for the original weights (iq4_grids).
GPTQ_TYPES = GRID_TYPES + IQ4_TYPES


@dataclass(frozen=True)
class LegacyFit:
    """One block of 32 columns of a legacy type for every row: x = d * (q - o) [+ m]."""

    d: torch.Tensor  # (rows, 1) float32: the step the codes are rounded with
    m: torch.Tensor | None  # (rows, 1) float32 minimum (Q4_1/Q5_1), else None
    halves: torch.Tensor  # (rows, 1 or 2) float16 d [, m] as stored
    gtype: GGMLType

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, w_hat = self.round_cols(w.unsqueeze(1))  # (rows, 1) each
        return q[:, 0], w_hat[:, 0]

    def round_cols(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (rows, k <= 32) -> (codes as stored, float; what ggml dequantizes them to)."""
        q = legacy_codes(w.to(torch.float32), self.d, self.m, self.gtype)
        return q.to(torch.float32), legacy_values(self.halves, q, self.gtype)

    def refit(self, t: torch.Tensor, codes: torch.Tensor) -> LegacyFit:
        """HQQ's parameter step: the least-squares d [and m] of target t (rows, 32) given the
        codes, stored as fp16; rows where that is degenerate (all codes equal), flips d's sign
        or overflows fp16 keep their parameters."""
        q = codes.to(torch.float32)
        if self.gtype.bits < 8 and self.m is None:
            q -= 1 << (self.gtype.bits - 1)  # t ~ d (q - o)
        stq = (t * q).sum(1)  # (rows,); 3x faster than vecdot on rows of 32
        sqq = (q * q).sum(1)  # small integers: exact in float32
        if self.m is None:
            den = sqq
            fitted = (stq / den).unsqueeze(1)  # (rows, 1)
        else:  # t ~ d q + m: the normal equations of a line fit, n = 32
            n, sq, st = q.shape[1], q.sum(1), t.sum(1)
            den = n * sqq - sq * sq
            d = (n * stq - sq * st) / den
            fitted = torch.stack([d, (st - d * sq) / n], 1)  # (rows, 2)
        halves = fitted.to(torch.float16)
        f = halves.to(torch.float32)
        ok = (den > 0) & (f[:, 0] * self.d[:, 0] > 0) & (f.abs() < float("inf")).all(1)
        halves = torch.where(ok.unsqueeze(1), halves, self.halves)
        f = torch.where(ok.unsqueeze(1), f, self.halves.to(torch.float32))
        return LegacyFit(f[:, :1], None if self.m is None else f[:, 1:], halves, self.gtype)


class LegacyGrid:
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: each block's d (and m) from its 32 values, the type's own
    choice (blocks.legacy_params); the codes rounded with it as the type rounds them."""

    def __init__(self, qtype: str):
        self.qtype, self.gtype = qtype, TYPES[qtype]

    def group_size(self, n_in: int) -> int:
        return self.gtype.block_size

    def fit(self, cols: torch.Tensor, start: int) -> LegacyFit:
        d, m = legacy_params(cols.to(torch.float32), self.gtype)
        halves = torch.cat([d] if m is None else [d, m], 1).to(torch.float16)
        if not torch.isfinite(halves).all():
            row = int((~torch.isfinite(halves)).any(1).nonzero()[0, 0])
            raise ValueError(f"{self.qtype}: row {row}, columns {start}..{start + 31}: the scale "
                             "or minimum is not finite in float16; ggml cannot store it")
        return LegacyFit(d, m, halves, self.gtype)

    def pack(self, fits: list[LegacyFit], codes: torch.Tensor) -> torch.Tensor:
        """codes (rows, in) as stored -> (rows, in / 32 * type_size) uint8."""
        n_rows = codes.shape[0]
        halves = torch.stack([f.halves for f in fits], 1).view(-1, fits[0].halves.shape[1])
        q = codes.to(torch.int8).reshape(-1, 32)  # (rows * blocks, 32), row-major like halves
        out = torch.empty(q.shape[0], self.gtype.type_size, dtype=torch.uint8)
        pack_legacy(halves, q, self.gtype, out)
        return out.view(n_rows, -1)


class WeightedLegacyGrid(LegacyGrid):
    """Q4_0, Q4_1, Q5_0, Q5_1 with an importance vector: every block's d (and m) is the one
    llama-quantize --imatrix stores for the original weights (gguf.weighted: the scale searched
    under importance * sqrt(sigma2 + x^2), not the type's plain max-based one), chosen once up
    front for the whole tensor, since the search needs each row's sigma2; GPTQ then rounds onto
    that stored grid. `fit` ignores the columns it is handed (the updated weights)."""

    def __init__(self, qtype: str, weights: torch.Tensor, importance: np.ndarray):
        super().__init__(qtype)
        rows, n = weights.shape
        raw = quantize_weighted(weights.detach().to(torch.float32).numpy(), qtype, importance)
        n_halves = 2 if self.gtype.has_min else 1
        blocks = raw.reshape(rows, n // 32, self.gtype.type_size)[:, :, : 2 * n_halves]
        # (rows, blocks, 2 * n_halves) bytes -> (rows, blocks, n_halves) fp16 d [, m]
        self._halves = torch.from_numpy(np.ascontiguousarray(blocks).view(np.float16))

    def fit(self, cols: torch.Tensor, start: int) -> LegacyFit:
        halves = self._halves[:, start // 32]  # (rows, 1 or 2)
        f = halves.to(torch.float32)
        return LegacyFit(f[:, :1], f[:, 1:] if self.gtype.has_min else None, halves, self.gtype)


# A type's `grid` kind -> the grid class that fits it.
GRIDS = {"legacy": LegacyGrid, "k": KGrid}


def block_grid(qtype: str, weights: torch.Tensor | None = None,
               importance: np.ndarray | None = None):
    """The GPTQ grid of ggml type `qtype` (one of GPTQ_TYPES). With the tensor's original
    `weights` (out, in) and an `importance` (in,), the types that read an importance get
    llama-quantize --imatrix's block scales (WeightedLegacyGrid, WeightedKGrid); Q8_0 its plain
    grid. IQ4_NL and IQ4_XS need `weights` (their steps are llama.cpp's quantizer's for them,
    with `importance` when given)."""
    if qtype not in GPTQ_TYPES:
        raise ValueError(f"GPTQ cannot write ggml type {qtype} yet; accepted: "
                         f"{', '.join(GPTQ_TYPES)}")
    if qtype in IQ4_TYPES:
        if weights is None:
            raise ValueError(f"{qtype}'s GPTQ grid is fitted to the tensor: pass its weights")
        return IQ4Grid(qtype, weights, importance)
    if importance is not None and weights is not None and qtype in LEGACY_WEIGHTED:
        return WeightedLegacyGrid(qtype, weights, importance)
    if importance is not None and weights is not None and qtype in K_WEIGHTED:
        return WeightedKGrid(qtype, weights, importance)
    return GRIDS[TYPES[qtype].grid](qtype)
