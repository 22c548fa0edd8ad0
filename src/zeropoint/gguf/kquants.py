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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zeropoint import ckernels
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

QK_K = 256
# Super-blocks per eager chunk: of 256..4096 measured, 1024 is near the best for every type
# (larger chunks leave the cache, smaller ones pay torch's per-op overhead more often).
_CHUNK = 1024


@dataclass(frozen=True)
class KQuantFormat:
    name: str
    bits: int  # bits per code
    has_min: bool  # x = d*sc*q - dmin*m rather than d*sc*(q - offset)
    type_size: int  # bytes per super-block
    half_offsets: tuple[int, ...]  # byte offsets of the fp16 super-scales (d, then dmin)
    block_size: int = QK_K


K_FORMATS = {
    f.name: f
    for f in (
        KQuantFormat("Q2_K", 2, True, 84, (80, 82)),
        KQuantFormat("Q3_K", 3, False, 110, (108,)),
        KQuantFormat("Q4_K", 4, True, 144, (0, 2)),
        KQuantFormat("Q5_K", 5, True, 176, (0, 2)),
        KQuantFormat("Q6_K", 6, False, 210, (208,)),
    )
}


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


# --- quantize: shared steps ----------------------------------------------------------------------


def _transposed(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 256) -> (n, S = B * 256 / n): column s is sub-block s, the searches' layout."""
    return x.reshape(-1, n).t().contiguous()


def _requantize(x, codes_t, n: int, d, dm, lo: int, hi: int, offset: int) -> torch.Tensor:
    """Codes on the stored (fp16-rounded) grid: nearest_int((x + dm) / d) clipped, + offset.
    A sub-block whose d is 0 keeps its search codes, as the C's `if (!d) continue`.
    x (B, 256); codes_t (n, S) from a search; d, dm (B, 256 / n) float32, dm None if absent.
    Returns (B, 256) int32."""
    xs = x.view(-1, QK_K // n, n)  # (B, n_sub, n)
    v = xs if dm is None else xs + dm.unsqueeze(-1)
    d = d.unsqueeze(-1)
    new = round_clamp(v / d, lo, hi) + offset
    codes = codes_t.t().reshape(xs.shape)
    return torch.where(d != 0, new, codes).to(torch.int32).view(-1, QK_K)


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


def _with_min(x, n: int, nmax: int, weights, search, levels: float):
    """Q2_K/Q4_K/Q5_K: per sub-block scale and min (make_qkx2), then their codes against the
    super-block's largest. Returns search codes (n, S), (scale codes, d), (min codes, dmin)."""
    xt = _transposed(x, n)
    codes, scales, mins = make_qkx2(xt, weights(xt), nmax, *search)
    sub = (-1, QK_K // n)  # (B, n_sub)
    return codes, _super_codes(scales.view(sub), levels), _super_codes(mins.view(sub), levels)


def _rms_plus_abs(xt):
    """Q4_K/Q5_K weights: sqrt(mean x^2) over the sub-block + |x|. The root goes through
    float64: torch's float32 sqrt is not correctly rounded; rounding the exact double is."""
    av = (seq_sum(xt * xt) / 32).double().sqrt().float()
    return av + xt.abs()


def _with_sign(x, search, levels: float):
    """Q3_K/Q6_K: search codes (16, S) and per-sub-block scales; the super-block's signed
    largest |scale| (B,), iscale = -levels / it, d = fp16(1 / iscale), scale codes (B, 16)."""
    codes, scales = search(_transposed(x, 16))
    scales = scales.view(-1, 16)
    top = signed_absmax(scales.t())
    iscale = rdiv(-levels, top)
    d = iscale.reciprocal()
    return codes, top, d, nearest_int(iscale.unsqueeze(1) * scales)


# --- quantize: one function per type ---------------------------------------------------------


def _quantize_q2_k(x):
    codes, (ls, d), (lm, dmin) = _with_min(x, 16, 3, torch.abs, (-0.5, 0.1, 15, True), 15.0)
    packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)).to(torch.uint8)  # the C's uint8 stores
    sub_d = _as_f32(d) * (packed & 0xF).to(torch.float32)  # (B, 16)
    sub_m = _as_f32(dmin) * (packed >> 4).to(torch.float32)
    codes = _requantize(x, codes, 16, sub_d, sub_m, 0, 3, 0)
    qs = _pack_fields(codes.view(-1, 2, 4, 32), 2).view(-1, 64)  # 4 codes 32 apart per byte
    return torch.cat([packed, qs, *_halves(d, dmin)], 1)


def _quantize_q45_k(x, bits: int):
    search = (-1.0, 0.1, 20, False) if bits == 4 else (-0.5, 0.1, 15, False)
    nmax = (1 << bits) - 1
    codes, (ls, d), (lm, dmin) = _with_min(x, 32, nmax, _rms_plus_abs, search, 63.0)
    packed = _pack_scales_k4((ls & 0xFF).clamp_(max=63), (lm & 0xFF).clamp_(max=63))
    sc, m = _unpack_scales_k4(packed)  # (B, 8) each
    sub_d, sub_m = _as_f32(d) * sc.to(torch.float32), _as_f32(dmin) * m.to(torch.float32)
    codes = _requantize(x, codes, 32, sub_d, sub_m, 0, nmax, 0)
    qs = _pack_fields((codes & 0xF).view(-1, 4, 2, 32), 4).view(-1, 128)  # 2 codes 32 apart
    if bits == 4:
        return torch.cat([*_halves(d, dmin), packed, qs], 1)
    qh = _pack_fields((codes >> 4).view(-1, 8, 32), 1)  # bit b of byte j: code 32*b + j
    return torch.cat([*_halves(d, dmin), packed, qh, qs], 1)


@dataclass(frozen=True)
class Q3KScales:
    """Q3_K super-blocks' scales as llama.cpp chooses them, apart from the final codes."""

    search_codes: torch.Tensor  # (B, 256) int32 0..7: the search's codes, kept where sub_d is 0
    packed: torch.Tensor  # (B, 12) uint8: the 16 biased 6-bit sub-block scales, packed
    d: torch.Tensor  # (B,) float16 super-scale
    sub_d: torch.Tensor  # (B, 16) float32: each sub-block's step d * (scale - 32)


def q3_k_scales(x: torch.Tensor) -> Q3KScales:
    """(B, 256) float32 super-blocks -> their Q3_K scales (quantize_row_q3_K_ref's choice). A
    value v of sub-block k then gets code nearest_int(v / sub_d[k]) clipped to -4..3, + 4."""
    codes, top, d, l = _with_sign(x, lambda xt: make_q3(xt, 4), 32.0)
    l = ((l + 128) & 0xFF) - 128  # the C keeps it in an int8 before clamping
    nonzero = (top != 0).unsqueeze(1)
    packed = torch.where(nonzero, _pack_scales_q3(l.clamp_(-32, 31) + 32), 0)  # (B, 12)
    d = torch.where(top != 0, d, 0.0).to(torch.float16)
    sub_d = _as_f32(d) * _unpack_scales_q3(packed).to(torch.float32)  # (B, 16)
    search = codes.t().reshape(-1, QK_K).to(torch.int32)  # (16, S) -> (B, 256)
    return Q3KScales(search, packed, d, sub_d)


def pack_q3_k(codes: torch.Tensor, scales: Q3KScales) -> torch.Tensor:
    """(B, 256) int32 codes 0..7 on `scales`' grid -> (B, 110) Q3_K bytes."""
    hmask = _pack_fields((codes >> 2).view(-1, 8, 32), 1)  # bit b of byte j: code 32*b + j
    qs = _pack_fields((codes & 3).view(-1, 2, 4, 32), 2).view(-1, 64)
    return torch.cat([hmask, qs, scales.packed, *_halves(scales.d)], 1)


def _quantize_q3_k(x):
    scales = q3_k_scales(x)
    search_t = scales.search_codes.view(-1, 16).t()  # back to the searches' (16, S) layout
    codes = _requantize(x, search_t, 16, scales.sub_d, None, -4, 3, 4)
    return pack_q3_k(codes, scales)


def _quantize_q6_k(x):
    codes, top, d, sc = _with_sign(x, lambda xt: make_qx(xt, 32), 128.0)
    sc = sc.clamp_(max=127).to(torch.int8)  # (B, 16); nearest_int >= -128 here
    d = d.to(torch.float16)
    codes = _requantize(x, codes, 16, _as_f32(d) * sc.to(torch.float32), None, -32, 31, 32)
    codes = codes.view(-1, 2, 4, 32)  # (B, half h, run k, l): element 128h + 32k + l
    # ql byte 64h + 32b + l: low nibbles of runs k = b and b + 2; qh byte 32h + l: high 2 bits
    # of runs 0..3.
    ql = _pack_fields((codes & 0xF).view(-1, 2, 2, 2, 32).transpose(2, 3), 4).reshape(-1, 128)
    qh = _pack_fields(codes >> 4, 2).view(-1, 64)
    out = torch.cat([ql, qh, sc.view(torch.uint8), *_halves(d)], 1)
    zero = top.abs() < GROUP_MAX_EPS  # every scale ~0: ggml writes an all-zero block
    return out.masked_fill_(zero.unsqueeze(1), 0)


_QUANTIZE = {"Q2_K": _quantize_q2_k, "Q3_K": _quantize_q3_k,
             "Q4_K": lambda x: _quantize_q45_k(x, 4), "Q5_K": lambda x: _quantize_q45_k(x, 5),
             "Q6_K": _quantize_q6_k}


def quantize_kblocks(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, type_size) uint8 in ggml's layout.
    The C kernel when it is available, else the eager torch code (identical bytes)."""
    fmt = K_FORMATS[qtype]
    out = torch.empty(x.shape[0], fmt.type_size, dtype=torch.uint8)
    lib = ckernels.library()
    problem = _quantize_c(lib, x, fmt, out) if lib is not None else _quantize_eager(x, fmt, out)
    if problem is not None:
        i, why = problem
        if why == _NOT_FINITE:
            raise ValueError(f"x must be finite; block {i} holds NaN or inf")
        # llama.cpp refuses such a block too (its row validation fails).
        raise ValueError(f"{qtype} block {i}: its scale or minimum overflows float16 "
                         f"(largest |x| {float(x[i].abs().max()):.4g}); ggml cannot store it")
    return out


_NOT_FINITE, _OVERFLOW = 1, 2  # the C kernel's codes for a block it cannot store


def _quantize_eager(x, fmt: KQuantFormat, out):
    """Fills out; returns (first super-block that cannot be stored, why) or None."""
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        return int(bad.nonzero()[0, 0]), _NOT_FINITE
    for start in range(0, x.shape[0], _CHUNK):
        out[start : start + _CHUNK] = _QUANTIZE[fmt.name](x[start : start + _CHUNK])
    for col in fmt.half_offsets:
        half = out[:, col : col + 2].contiguous().view(torch.float16).view(-1)
        if not torch.isfinite(half).all():
            return int((~torch.isfinite(half)).nonzero()[0, 0]), _OVERFLOW
    return None


def _quantize_c(lib, x, fmt: KQuantFormat, out):
    """As _quantize_eager. The super-blocks go in one piece per torch thread (even-sized:
    Q4_K/Q5_K search two at a time); ctypes drops the GIL, so the pieces run in parallel."""
    n = x.shape[0]
    parts = min(torch.get_num_threads(), max(1, n * QK_K // ckernels.PARALLEL_MIN_ELEMENTS))
    bounds = [n * i // parts // 2 * 2 for i in range(parts)] + [n]
    type_id = int(fmt.name[1])
    return ckernels.first_failure(ckernels._run(
        ckernels.block_quantizer_piece(lib.zp_quantize_kquant, type_id, x, out, a, b)
        for a, b in zip(bounds, bounds[1:]) if b > a))


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


_DEQUANTIZE = {"Q2_K": _dequantize_q2_k, "Q3_K": _dequantize_q3_k,
               "Q4_K": lambda raw: _dequantize_q45_k(raw, 4),
               "Q5_K": lambda raw: _dequantize_q45_k(raw, 5), "Q6_K": _dequantize_q6_k}


def dequantize_kblocks(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n, type_size) uint8 -> (n, 256) float32."""
    return _DEQUANTIZE[qtype](raw).reshape(-1, QK_K)
