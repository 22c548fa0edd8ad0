"""ggml's K-quant block formats (Q2_K .. Q6_K) in torch, vectorized over super-blocks.

Bytes identical to llama.cpp's reference quantization (`quantize_row_q*_K_ref`, which
`llama_model_quantize` uses when no importance matrix is given) for the same float32 input;
dequantization equal bit for bit to gguf-py's `gguf.quants.dequantize`.

A super-block holds 256 values in sub-blocks of 16 or 32, each with its own small integer
scale; one or two fp16 super-scales turn those back into floats. Layouts (byte offset: field):

    Q2_K  84 B:   0 scales[16] (4-bit scale | 4-bit min << 4)   16 qs[64] (2-bit codes)
                 80 d:f16   82 dmin:f16                          x = d*sc*q - dmin*m
    Q3_K 110 B:   0 hmask[32] (bit 2 of codes)   32 qs[64] (low 2 bits)
                 96 scales[12] (6-bit, biased by 32)   108 d:f16    x = d*(sc-32)*(q-4)
    Q4_K 144 B:   0 d:f16   2 dmin:f16   4 scales[12] (6-bit scale and min, 8 of each)
                 16 qs[128] (4-bit codes)                        x = d*sc*q - dmin*m
    Q5_K 176 B:   as Q4_K, then 16 qh[32] (bit 4 of codes)   48 qs[128] (low 4 bits)
    Q6_K 210 B:   0 ql[128] (low 4 bits)   128 qh[64] (high 2 bits)
                192 scales[16] (int8)   208 d:f16                   x = d*sc*(q-32)

Codes are packed 32 apart: a byte's fields come from elements j, j+32, j+64, ... of a run.
The eager code here follows the C's float32 arithmetic step for step (kquants_search.py says
how); csrc/kquants.c computes the same bytes an order of magnitude faster and is used when it
compiles (zeropoint.ckernels). The tests hold both to llama.cpp.

The eager quantizer is three steps, each usable alone (kquant_grids.py builds GPTQ's and HQQ's
grids on them): `k_scales` chooses a batch's scales (the searches, then `encode_scales`, which
stores float sub-block scales as the type does), `k_requantize` puts values on that grid, and
`pack_k` writes codes and scales as the type's bytes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from zeropoint import ckernels
from zeropoint.gguf import codecs
from zeropoint.gguf.kquants_search import (
    GROUP_MAX_EPS,
    make_q3,
    make_qkx2,
    make_qx,
    nearest_int,
    rdiv,
    round_clamp,
    seq_sum,
    signed_absmax,
)
from zeropoint.gguf.types import QK_K, TYPES, GGMLType

# Super-blocks per eager chunk: of 256..4096 measured, 1024 is near the best for every type
# (larger chunks leave the cache, smaller ones pay torch's per-op overhead more often).
_CHUNK = 1024


# --- bit fields ---------------------------------------------------------------------------------


def _pack_fields(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(..., k, m) small ints -> (..., m) uint8: field i of each byte at bit width * i."""
    out = codes[..., 0, :].to(torch.int32)
    for i in range(1, codes.shape[-2]):
        out = out | (codes[..., i, :].to(torch.int32) << (width * i))
    return (out & 0xFF).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """(..., m) uint8 -> (..., k, m) uint8: the inverse of _pack_fields."""
    shifts = torch.arange(0, k * width, width, dtype=torch.uint8).view(k, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: (B, 8) 6-bit scales and mins -> (B, 12) bytes.
    Bytes 0-3: scale j | high 2 bits of scale j+4 at bit 6; bytes 4-7: the same for the mins;
    bytes 8-11: low nibble of scale j+4 | low nibble of min j+4 << 4."""
    hi_s, hi_m = ls[:, 4:], lm[:, 4:]
    return torch.cat([ls[:, :4] | (hi_s >> 4) << 6,
                      lm[:, :4] | (hi_m >> 4) << 6,
                      (hi_s & 0xF) | (hi_m & 0xF) << 4], 1).to(torch.uint8)


def _unpack_scales_k4(b: torch.Tensor):
    """(B, 12) bytes -> (B, 8) scales and (B, 8) mins, uint8 (ggml's get_scale_min_k4)."""
    lo, mid, top = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([lo & 63, (top & 0xF) | (lo >> 6) << 4], 1)
    m = torch.cat([mid & 63, (top >> 4) | (mid >> 6) << 4], 1)
    return sc, m


def _pack_scales_q3(l: torch.Tensor) -> torch.Tensor:
    """Q3_K: (B, 16) 6-bit biased scales -> (B, 12) bytes. Bytes 0-7: low nibble of scale j |
    low nibble of scale j+8 << 4; byte 8+c: high 2 bits of scales c, c+4, c+8, c+12."""
    low = _pack_fields((l & 0xF).view(-1, 2, 8), 4)  # (B, 8)
    high = _pack_fields((l >> 4).view(-1, 4, 4), 2)  # (B, 4)
    return torch.cat([low, high], 1)


def _unpack_scales_q3(b: torch.Tensor) -> torch.Tensor:
    """(B, 12) bytes -> (B, 16) int8 scales (the 6-bit value - 32)."""
    low = _unpack_fields(b[:, :8], 2, 4).reshape(-1, 16)  # (B, 2, 8) -> (B, 16)
    high = _unpack_fields(b[:, 8:], 4, 2).reshape(-1, 16)  # (B, 4, 4) -> (B, 16)
    return (low | high << 4).to(torch.int8) - 32


def _halves(*fields: torch.Tensor) -> list[torch.Tensor]:
    """(B,) float16 fields -> (B, 2) little-endian bytes each."""
    return [f.view(-1, 1).view(torch.uint8) for f in fields]


# --- quantize: scales, codes, bytes ------------------------------------------------------------


@dataclass(frozen=True)
class KScales:
    """A batch of super-blocks' scales as llama.cpp chooses them, apart from the final codes.

    A value v of sub-block k gets code nearest_int((v + sub_m[k]) / sub_d[k]) clipped to lo..hi,
    + offset (`grid_codes`), and dequantizes to sub_d[k] * (code - offset) - sub_m[k]."""

    qtype: str
    search_codes: torch.Tensor  # (B, 256) int32: the search's codes, kept where sub_d is 0
    sub_d: torch.Tensor  # (B, n_sub) float32: each sub-block's step as dequantization computes it
    sub_m: torch.Tensor | None  # (B, n_sub) float32 min (x = sub_d*q - sub_m), None: no min
    header: torch.Tensor  # (B, 12 or 16) uint8: the sub-block scales (and mins) as stored
    d: torch.Tensor  # (B,) float16 super-scale
    dmin: torch.Tensor | None  # (B,) float16 super-scale of the mins, None: no min

    @property
    def n(self) -> int:
        """Values per sub-block."""
        return K_FORMATS[self.qtype].sub_block

    @property
    def code_range(self) -> tuple[int, int, int]:
        """(lo, hi, offset): nearest_int's clip, and what is added to make the stored code."""
        gtype = TYPES[self.qtype]
        if gtype.has_min:
            return 0, (1 << gtype.bits) - 1, 0
        half = 1 << (gtype.bits - 1)
        return -half, half - 1, half


def _transposed(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 256) -> (n, S = B * 256 / n): column s is sub-block s, the searches' layout."""
    return x.reshape(-1, n).t().contiguous()


def _rms_plus_abs(xt):
    """Q4_K/Q5_K weights: sqrt(mean x^2) over the sub-block + |x|. The root goes through
    float64: torch's float32 sqrt is not correctly rounded; rounding the exact double is."""
    av = (seq_sum(xt * xt) / 32).double().sqrt().float()
    return av + xt.abs()


def k_scales(x: torch.Tensor, qtype: str) -> KScales:
    """(B, 256) float32 super-blocks -> their scales, quantize_row_{qtype}_ref's choice."""
    n = K_FORMATS[qtype].sub_block
    codes, *params = K_FORMATS[qtype].search(_transposed(x, n))
    search_codes = codes.t().reshape(-1, QK_K).to(torch.int32)  # (n, S) -> (B, 256)
    return encode_scales(qtype, search_codes, *(p.view(-1, QK_K // n) for p in params))


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    """(B, k) -> (B,): the largest entry above 0, else +0.0 (the C keeps strictly larger ones
    from 0 on, so a -0.0 never gets in)."""
    m = v.amax(1)
    return torch.where(m > 0, m, 0.0)


def _as_f32(half: torch.Tensor) -> torch.Tensor:
    return half.to(torch.float32).unsqueeze(1)  # (B,) fp16 -> (B, 1)


def _super_codes(v: torch.Tensor, levels: float):
    """(B, k) sub-block scales (or mins) -> their codes nearest_int(levels / top * v), int32
    (0 where top is 0), and d = fp16(top / levels); top = the largest positive entry."""
    top = _max_positive(v)
    inv = torch.where(top > 0, rdiv(levels, top), 0.0)
    return nearest_int(inv.unsqueeze(1) * v), (top / levels).to(torch.float16)


def encode_scales(qtype: str, search_codes: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None = None) -> KScales:
    """Float sub-block scales (B, n_sub) (and mins, for the types that have them: x ~ scale * q
    - min) -> KScales as `qtype` stores them: the super-scale(s) and small integer codes that
    quantize_row_{qtype}_ref derives from its searches' scales. search_codes (B, 256) int32."""
    f32 = torch.float32
    if TYPES[qtype].has_min:
        levels = 15.0 if qtype == "Q2_K" else 63.0
        (ls, d), (lm, dmin) = _super_codes(scales, levels), _super_codes(mins, levels)
        if qtype == "Q2_K":
            header = ((ls & 0xFF) | ((lm << 4) & 0xFF)).to(torch.uint8)  # the C's uint8 stores
            sc, m = header & 0xF, header >> 4
        else:
            header = _pack_scales_k4((ls & 0xFF).clamp_(max=63), (lm & 0xFF).clamp_(max=63))
            sc, m = _unpack_scales_k4(header)  # (B, 8) each
        return KScales(qtype, search_codes, _as_f32(d) * sc.to(f32), _as_f32(dmin) * m.to(f32),
                       header, d, dmin)
    # Q3_K/Q6_K: the sub-block scale of largest |scale| (signed) gets the most negative code.
    top = signed_absmax(scales.t())  # (B,)
    iscale = rdiv(-32.0 if qtype == "Q3_K" else -128.0, top)
    l = nearest_int(iscale.unsqueeze(1) * scales)  # (B, 16)
    if qtype == "Q3_K":
        zero = top == 0
        l = ((l + 128) & 0xFF) - 128  # the C keeps it in an int8 before clamping
        header = _pack_scales_q3(l.clamp_(-32, 31) + 32)  # (B, 12)
    else:
        # Every scale ~0: ggml writes an all-zero block (codes 0 included).
        zero = top.abs() < GROUP_MAX_EPS
        search_codes = search_codes.masked_fill(zero.unsqueeze(1), 0)
        header = l.clamp_(max=127).to(torch.int8).view(torch.uint8)  # nearest_int >= -128 here
    header = header.masked_fill(zero.unsqueeze(1), 0)
    d = torch.where(zero, 0.0, iscale.reciprocal()).to(torch.float16)
    sc = _unpack_scales_q3(header) if qtype == "Q3_K" else header.view(torch.int8)
    return KScales(qtype, search_codes, _as_f32(d) * sc.to(f32), None, header, d, None)


def grid_codes(v, sub_d, sub_m, search, code_range: tuple[int, int, int]) -> torch.Tensor:
    """Codes on a stored grid, all arguments broadcast alike: nearest_int((v + sub_m) / sub_d)
    clipped to lo..hi, + offset, as float32. Where sub_d is 0, the search's codes, as the C's
    `if (!d) continue` leaves them. sub_m None: no min."""
    lo, hi, offset = code_range
    new = round_clamp((v if sub_m is None else v + sub_m) / sub_d, lo, hi) + offset
    return torch.where(sub_d != 0, new, search.to(torch.float32))


def k_requantize(x: torch.Tensor, scales: KScales) -> torch.Tensor:
    """(B, 256) float32 -> (B, 256) int32 codes on `scales`' grid."""
    xs = x.view(-1, QK_K // scales.n, scales.n)  # (B, n_sub, n)
    m = None if scales.sub_m is None else scales.sub_m.unsqueeze(-1)
    codes = grid_codes(xs, scales.sub_d.unsqueeze(-1), m, scales.search_codes.view(xs.shape),
                       scales.code_range)
    return codes.to(torch.int32).view(-1, QK_K)


def pack_k(codes: torch.Tensor, scales: KScales) -> torch.Tensor:
    """(B, 256) int32 codes on `scales`' grid -> (B, type_size) bytes of scales.qtype."""
    qtype = scales.qtype
    halves = _halves(scales.d) if scales.dmin is None else _halves(scales.d, scales.dmin)
    if qtype == "Q6_K":
        codes = codes.view(-1, 2, 4, 32)  # (B, half h, run k, l): element 128h + 32k + l
        # ql byte 64h + 32b + l: low nibbles of runs k = b and b + 2; qh byte 32h + l: high 2
        # bits of runs 0..3.
        ql = _pack_fields((codes & 0xF).view(-1, 2, 2, 2, 32).transpose(2, 3), 4).reshape(-1, 128)
        qh = _pack_fields(codes >> 4, 2).view(-1, 64)
        return torch.cat([ql, qh, scales.header, *halves], 1)
    low = 2 if qtype in ("Q2_K", "Q3_K") else 4  # bits in qs; Q3_K/Q5_K keep one more apart
    per = 8 // low
    # (B, 256 / (32 per), per, 32): a qs byte holds `per` codes 32 apart.
    qs = _pack_fields((codes & ((1 << low) - 1)).view(-1, QK_K // (32 * per), per, 32), low)
    qs = qs.reshape(-1, QK_K // per)
    if qtype == "Q2_K":
        return torch.cat([scales.header, qs, *halves], 1)
    if qtype == "Q4_K":
        return torch.cat([*halves, scales.header, qs], 1)
    high = _pack_fields((codes >> low).view(-1, 8, 32), 1)  # bit b of byte j: code 32*b + j
    if qtype == "Q3_K":
        return torch.cat([high, qs, scales.header, *halves], 1)
    return torch.cat([*halves, scales.header, high, qs], 1)


def _quantize_k(x: torch.Tensor, qtype: str) -> torch.Tensor:
    scales = k_scales(x, qtype)
    return pack_k(k_requantize(x, scales), scales)


def quantize_kblocks(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, type_size) uint8 in ggml's layout.
    The C kernel when it is available, else the eager torch code (identical bytes)."""
    gtype = TYPES[qtype]
    out = torch.empty(x.shape[0], gtype.type_size, dtype=torch.uint8)
    lib = ckernels.library()
    problem = _quantize_c(lib, x, gtype, out) if lib is not None else _quantize_eager(x, gtype, out)
    if problem is not None:
        i, why = problem
        if why == _NOT_FINITE:
            raise ValueError(f"x must be finite; block {i} holds NaN or inf")
        # llama.cpp refuses such a block too (its row validation fails).
        raise ValueError(f"{qtype} block {i}: its scale or minimum overflows float16 "
                         f"(largest |x| {float(x[i].abs().max()):.4g}); ggml cannot store it")
    return out


_NOT_FINITE, _OVERFLOW = 1, 2  # the C kernel's codes for a block it cannot store


def _quantize_eager(x, gtype: GGMLType, out):
    """Fills out; returns (first super-block that cannot be stored, why) or None."""
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        return int(bad.nonzero()[0, 0]), _NOT_FINITE
    for start in range(0, x.shape[0], _CHUNK):
        out[start : start + _CHUNK] = _quantize_k(x[start : start + _CHUNK], gtype.name)
    for col in K_FORMATS[gtype.name].half_offsets:
        half = out[:, col : col + 2].contiguous().view(torch.float16).view(-1)
        if not torch.isfinite(half).all():
            return int((~torch.isfinite(half)).nonzero()[0, 0]), _OVERFLOW
    return None


def _quantize_c(lib, x, gtype: GGMLType, out):
    """As _quantize_eager, in C on torch's threads."""
    return ckernels.block_quantize(lib.zp_quantize_kquant, gtype.id, x, x.shape[0], out)


# --- dequantize: gguf-py's operation order, so every float32 rounding matches ------------------


def _f16_field(raw: torch.Tensor, col: int) -> torch.Tensor:
    """(B, size) bytes -> (B, 1) float32 from the fp16 at byte col."""
    return raw[:, col : col + 2].contiguous().view(torch.float16).to(torch.float32)


def _dequantize_q2_k(raw):
    sc = raw[:, :16]
    dl = (_f16_field(raw, 80) * (sc & 0xF).to(torch.float32)).unsqueeze(-1)  # (B, 16, 1)
    ml = (_f16_field(raw, 82) * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = _unpack_fields(raw[:, 16:80].reshape(-1, 2, 32), 4, 2).reshape(-1, 16, 16)
    return dl * q.to(torch.float32) - ml


def _dequantize_q3_k(raw):
    dl = (_f16_field(raw, 108) * _unpack_scales_q3(raw[:, 96:108]).to(torch.float32)).unsqueeze(-1)
    low = _unpack_fields(raw[:, 32:96].reshape(-1, 2, 32), 4, 2).reshape(-1, 16, 16)
    high = _unpack_fields(raw[:, :32], 8, 1).reshape(-1, 16, 16)
    q = low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)  # hmask bit 0 means -4
    return dl * q.to(torch.float32)


def _dequantize_q45_k(raw, bits: int):
    sc, m = _unpack_scales_k4(raw[:, 4:16])
    d = (_f16_field(raw, 0) * sc.to(torch.float32)).unsqueeze(-1)  # (B, 8, 1)
    dm = (_f16_field(raw, 2) * m.to(torch.float32)).unsqueeze(-1)
    q = _unpack_fields(raw[:, -128:].reshape(-1, 4, 32), 2, 4).reshape(-1, 8, 32)
    if bits == 5:
        q = q | _unpack_fields(raw[:, 16:48], 8, 1) << 4
    return d * q.to(torch.float32) - dm


def _dequantize_q6_k(raw):
    d = (_f16_field(raw, 208) * raw[:, 192:208].view(torch.int8).to(torch.float32)).unsqueeze(-1)
    ql = _unpack_fields(raw[:, :128].reshape(-1, 2, 64), 2, 4).reshape(-1, 8, 32)
    qh = _unpack_fields(raw[:, 128:192].reshape(-1, 2, 32), 4, 2).reshape(-1, 8, 32)
    q = (ql | qh << 4).to(torch.int8) - 32
    return d * q.reshape(-1, 16, 16).to(torch.float32)


def dequantize_kblocks(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n, type_size) uint8 -> (n, 256) float32: csrc/kdequant.c for a CPU tensor where the C
    kernels are built (the same bits), else the torch code above."""
    if raw.device.type == "cpu" and codecs.supported(qtype):
        out = ckernels.host_empty((raw.shape[0], QK_K), torch.float32)
        codecs.dequantize_blocks_c(raw.contiguous().numpy(), TYPES[qtype], out.numpy())
        return out
    return K_FORMATS[qtype].dequantize(raw).reshape(-1, QK_K)


# --- each K type's own code ---------------------------------------------------------------------


@dataclass(frozen=True)
class KQuantFormat:
    """What the K-quant code needs of a type beyond its gguf.types value: quantize_row_*_ref's
    sub-block length and scale search, where the fp16 super-scales sit, and the dequantizer."""

    sub_block: int  # values per sub-block
    search: Callable  # (n, S) sub-blocks -> codes (n, S), scales (S,)[, mins (S,)]
    half_offsets: tuple[int, ...]  # byte offsets of the fp16 super-scales (d, then dmin)
    dequantize: Callable  # (B, type_size) uint8 -> (B, ...) float32, 256 values a row


K_FORMATS = {
    "Q2_K": KQuantFormat(16, lambda xt: make_qkx2(xt, xt.abs(), 3, -0.5, 0.1, 15, True),
                         (80, 82), _dequantize_q2_k),
    "Q3_K": KQuantFormat(16, lambda xt: make_q3(xt, 4), (108,), _dequantize_q3_k),
    "Q4_K": KQuantFormat(32, lambda xt: make_qkx2(xt, _rms_plus_abs(xt), 15, -1.0, 0.1, 20, False),
                         (0, 2), partial(_dequantize_q45_k, bits=4)),
    "Q5_K": KQuantFormat(32, lambda xt: make_qkx2(xt, _rms_plus_abs(xt), 31, -0.5, 0.1, 15, False),
                         (0, 2), partial(_dequantize_q45_k, bits=5)),
    "Q6_K": KQuantFormat(16, lambda xt: make_qx(xt, 32), (208,), _dequantize_q6_k),
}
