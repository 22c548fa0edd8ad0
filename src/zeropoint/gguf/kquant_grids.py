"""ggml's K-quants (Q2_K .. Q6_K) as GPTQ grids (algorithms/grids.py), with HQQ's parameter step.

A fit is one super-block (256 input columns) for every row: the scales llama.cpp's reference
quantizer chooses for those values (kquants.k_scales), so that GPTQ with no error to spread
writes the type's own bytes. A column is rounded with the type's own requantization onto the
stored grid, and its dequantized value is the one gguf-py computes from the packed bytes.

`KFit.refit(t, codes)` is HQQ's parameter step: each sub-block's float scale (and min) fitted to
t by least squares for the given codes, then stored as the type stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kquants import K_FORMATS, KScales, encode_scales, grid_codes, k_scales, pack_k
from .types import QK_K, TYPES
from .weighted import quantize_weighted


@dataclass(frozen=True)
class KFit:
    """One super-block of a K type for every row (B = out)."""

    scales: KScales

    def round(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column i of the super-block, w (out,) -> (codes (out,) float, w_hat (out,) float32)."""
        s, k = self.scales, i // self.scales.n
        m = None if s.sub_m is None else s.sub_m[:, k]
        return self._round(w.to(torch.float32), s.sub_d[:, k], m, s.search_codes[:, i])

    def round_cols(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All 256 columns at once: w (out, 256) -> (codes, w_hat), (out, 256) each."""
        s = self.scales
        shape = (w.shape[0], -1, s.n)  # (out, n_sub, n)
        m = None if s.sub_m is None else s.sub_m.unsqueeze(-1)
        q, w_hat = self._round(w.to(torch.float32).reshape(shape), s.sub_d.unsqueeze(-1), m,
                               s.search_codes.reshape(shape))
        return q.view(-1, QK_K), w_hat.view(-1, QK_K)

    def _round(self, v, sub_d, sub_m, search):
        q = grid_codes(v, sub_d, sub_m, search, self.scales.code_range)
        # Dequantization's float32 order: (d * sc) * (q - offset), then - dmin * m.
        w_hat = sub_d * (q - self.scales.code_range[2])
        return q, w_hat if sub_m is None else w_hat - sub_m

    def refit(self, t: torch.Tensor, codes: torch.Tensor) -> KFit:
        """HQQ's parameter step: for the codes (out, 256), each sub-block's least-squares scale
        (and min: t ~ a*q - b, a, b >= 0 as the types store them; else t ~ a*(q - offset)) for
        the target t (out, 256), encoded as the type encodes its own. A sub-block whose codes
        cannot determine them (all equal) keeps its current ones. Round again with the result."""
        s = self.scales
        shape = (t.shape[0], -1, s.n)  # (out, n_sub, n)
        tt = t.to(torch.float64).reshape(shape)
        q = (codes.to(torch.float64) - s.code_range[2]).reshape(shape)
        sq, sqq, st, sqt = q.sum(-1), (q * q).sum(-1), tt.sum(-1), (q * tt).sum(-1)  # (out, n_sub)
        search = codes.to(torch.int32).reshape(-1, QK_K)  # kept where a step comes out 0
        if s.sub_m is None:
            a = torch.where(sqq > 0, sqt / sqq, s.sub_d.double())
            return KFit(encode_scales(s.qtype, search, a.float()))
        n = s.n
        det = n * sqq - sq * sq
        a = (n * sqt - sq * st) / det
        b = (sq * sqt - sqq * st) / det
        # Outside a, b >= 0 the least-squares point of the quadrant lies on one of its edges,
        # at that edge's own 1-D optimum (clipped to the edge): keep the better of the two.
        a_edge = (sqt / sqq).clamp(min=0)  # b = 0
        b_edge = (-st / n).clamp(min=0)  # a = 0
        edge_a = a_edge * (a_edge * sqq - 2 * sqt) < b_edge * (n * b_edge + 2 * st)
        outside = (a < 0) | (b < 0)
        a = torch.where(outside, torch.where(edge_a, a_edge, 0.0), a)
        b = torch.where(outside, torch.where(edge_a, 0.0, b_edge), b)
        ok = det > 0
        a, b = torch.where(ok, a, s.sub_d.double()), torch.where(ok, b, s.sub_m.double())
        return KFit(encode_scales(s.qtype, search, a.float(), b.float()))


class KGrid:
    """Q2_K, Q3_K, Q4_K, Q5_K or Q6_K as a GPTQ grid: one fit per 256 input columns."""

    def __init__(self, qtype: str):
        if qtype not in K_FORMATS:
            raise ValueError(f"not a K-quant type: {qtype}; accepted: {', '.join(K_FORMATS)}")
        self.qtype = qtype

    def group_size(self, n_in: int) -> int:
        if n_in % QK_K:
            raise ValueError(f"{self.qtype} needs in_features a multiple of {QK_K}, got {n_in}")
        return QK_K

    def fit(self, cols: torch.Tensor, start: int) -> KFit:
        """cols (out, 256): each row a super-block, fitted on its own. ValueError where a
        super-scale overflows float16 (as quantize_blocks refuses such a block)."""
        scales = k_scales(cols.to(torch.float32).contiguous(), self.qtype)
        for half in (scales.d, scales.dmin):
            if half is not None and not torch.isfinite(half).all():
                row = int((~torch.isfinite(half)).nonzero()[0, 0])
                raise ValueError(f"{self.qtype}: row {row}, columns {start}..{start + QK_K - 1}: "
                                 "a scale or minimum overflows float16; ggml cannot store it")
        return KFit(scales)

    def pack(self, fits: list[KFit], codes: torch.Tensor) -> torch.Tensor:
        """codes (out, in), fits[k] for columns 256k.. -> (out, in / 256 * type_size) uint8."""
        per_block = [pack_k(codes[:, k * QK_K : (k + 1) * QK_K].to(torch.int32).contiguous(),
                            f.scales) for k, f in enumerate(fits)]  # (out, type_size) each
        return torch.stack(per_block, dim=1).reshape(codes.shape[0], -1)


# --- llama-quantize --imatrix's scales as a GPTQ grid ---------------------------------------------

# Byte offsets in a block: (header start, header end, d, dmin or None)
_FIELDS = {"Q2_K": (0, 16, 80, 82), "Q3_K": (96, 108, 108, None), "Q4_K": (4, 16, 0, 2),
           "Q5_K": (4, 16, 0, 2), "Q6_K": (192, 208, 208, None)}


def _sub_scales(qtype: str, header: np.ndarray):
    """(B, header bytes) -> the sub-block scale codes (B, n_sub) and min codes (or None), as
    the type's dequantizer reads them (ggml's get_scale_min_k4 and the Q3_K/Q6_K layouts)."""
    h = header.astype(np.int32)
    if qtype == "Q2_K":
        return h & 15, h >> 4
    if qtype == "Q6_K":
        return header.view(np.int8).astype(np.int32), None
    if qtype == "Q3_K":
        j = np.arange(16)
        low = np.where(j < 8, h[:, j % 8] & 15, h[:, j % 8] >> 4)
        high = (h[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        return (low | high << 4) - 32, None
    sc = np.concatenate([h[:, :4] & 63, (h[:, 8:] & 15) | (h[:, :4] >> 6) << 4], 1)
    m = np.concatenate([h[:, 4:8] & 63, (h[:, 8:] >> 4) | (h[:, 4:8] >> 6) << 4], 1)
    return sc, m


def scales_from_blocks(qtype: str, raw: np.ndarray) -> KScales:
    """(B, type_size) bytes of `qtype` blocks -> their KScales: the stored grid, as GPTQ rounds
    onto it. The search codes (kept only where a sub-block's step is 0, whose values all
    dequantize alike) are the grid's zero level."""
    start, end, d_at, dmin_at = _FIELDS[qtype]
    raw = np.ascontiguousarray(raw)
    header = raw[:, start:end].copy()
    d = torch.from_numpy(raw[:, d_at:d_at + 2].copy().view(np.float16).reshape(-1))
    dmin = None if dmin_at is None else torch.from_numpy(
        raw[:, dmin_at:dmin_at + 2].copy().view(np.float16).reshape(-1))
    sc, m = _sub_scales(qtype, header)
    f32 = torch.float32
    sub_d = d.to(f32).unsqueeze(1) * torch.from_numpy(sc).to(f32)  # dequantization's order
    sub_m = None if dmin is None else dmin.to(f32).unsqueeze(1) * torch.from_numpy(m).to(f32)
    zero = 0 if TYPES[qtype].has_min else 1 << (TYPES[qtype].bits - 1)
    search = torch.full((raw.shape[0], QK_K), zero, dtype=torch.int32)
    return KScales(qtype, search, sub_d, sub_m, torch.from_numpy(header), d, dmin)


class WeightedKGrid(KGrid):
    """A K type with an importance vector: every super-block's scales are the ones
    llama-quantize --imatrix stores for the original weights (gguf.weighted), chosen once for
    the whole tensor; GPTQ then rounds onto that stored grid. `fit` ignores the columns it is
    handed (the updated weights)."""

    def __init__(self, qtype: str, weights: torch.Tensor, importance: np.ndarray):
        super().__init__(qtype)
        rows, n = weights.shape
        raw = quantize_weighted(weights.detach().to(torch.float32).numpy(), qtype, importance)
        self._blocks = raw.reshape(rows, n // QK_K, -1)  # (rows, super-blocks, type_size)

    def fit(self, cols: torch.Tensor, start: int) -> KFit:
        return KFit(scales_from_blocks(self.qtype, self._blocks[:, start // QK_K]))
