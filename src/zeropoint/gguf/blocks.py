"""ggml's legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in torch, vectorized over blocks,
and the one entry point (quantize_blocks / dequantize_blocks) for the K-quants too (kquants.py).

Bytes identical to gguf-py's ``gguf.quants.quantize`` for float32 input: every step is the same
float32 operation in the same order (no fused multiply-add), so every rounding matches.
csrc/legacy.c does the same arithmetic in one pass over memory, several times faster, and is used
when it compiles (zeropoint.ckernels); the torch code below is the fallback, and the tests hold
both to gguf-py. `transcode_blocks` (C only) turns one legacy type into another in one pass.
One block holds 32 values; all fields are little-endian:

    Q8_0: d:f16 | 32 x int8                       x = d * q
    Q4_0: d:f16 | 16 bytes of nibbles             x = d * (q - 8)
    Q5_0: d:f16 | qh:4 bytes | 16 bytes nibbles   x = d * (q - 16)
    Q4_1: d:f16 | m:f16 | 16 bytes of nibbles     x = d * q + m
    Q5_1: d:f16 | m:f16 | qh:4 bytes | 16 bytes   x = d * q + m

Nibble byte j holds element j (low nibble) and element j + 16 (high nibble); for the 5-bit types,
bit j of qh (as a little-endian uint32) is bit 4 of element j.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from zeropoint import ckernels
from zeropoint.gguf import codecs, iquants
from zeropoint.gguf.kquants import dequantize_kblocks, quantize_kblocks
from zeropoint.gguf.types import TYPES, GGMLType

if sys.byteorder != "little":  # ggml's fields are little-endian; the byte views below assume it
    raise ImportError("zeropoint.gguf.blocks needs a little-endian machine")

# 32768 blocks = 4 MiB of floats per chunk: the fastest of 4K..1M blocks measured at 2 threads
# (temporaries stay in cache), and few enough torch calls to cope with busy cores.
_CHUNK_BLOCKS = 32768
_JUST_BELOW_HALF = 0.5 - 2.0**-25  # nextafter(0.5, 0) in float32

# The types with zeropoint's own block kernels: the legacy ones here, the K types in kquants.py.
BLOCK_TYPES = tuple(name for name, t in TYPES.items() if t.writable and t.quantized)
LEGACY_TYPES = tuple(name for name in BLOCK_TYPES if TYPES[name].family == "legacy")


def block_type(qtype: str) -> GGMLType:
    """The ggml type named `qtype` when zeropoint has block kernels for it, else ValueError."""
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"zeropoint has no block kernels for ggml type {qtype!r}; accepted: "
                         f"{', '.join(BLOCK_TYPES)}")
    return TYPES[qtype]


# --- quantize ---------------------------------------------------------------------------------


def quantize_blocks(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """(..., n) floats, n a multiple of the block size (32; 256 for the K types)
    -> (..., n // block_size * type_size) uint8: ggml's bytes."""
    gtype = block_type(qtype)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] % gtype.block_size:
        raise ValueError(f"last dimension must be a multiple of {gtype.name}'s block size "
                         f"{gtype.block_size}, got {x.shape[-1] if x.dim() else 'a scalar'}")
    x = x.to(torch.float32).contiguous()  # gguf-py rounds to float32 first too
    row_bytes = x.shape[-1] // gtype.block_size * gtype.type_size
    if gtype.family == "iq":  # no importance here: requantize passes one to iquants itself
        return torch.from_numpy(iquants.quantize(x.cpu().numpy(), qtype))
    if gtype.family == "k":
        return quantize_kblocks(x.view(-1, gtype.block_size), qtype).view(*x.shape[:-1],
                                                                          row_bytes)
    blocks = x.view(-1, gtype.block_size)  # (n_blocks, 32)
    lib = _legacy_library()
    if lib is not None and x.device.type == "cpu":
        out = ckernels.host_empty((blocks.shape[0], gtype.type_size), np.uint8)
        problem = _quantize_c(lib, blocks, gtype, out)
        if problem is not None:
            _refuse(blocks, gtype, *problem)
    else:
        out = torch.empty(blocks.shape[0], gtype.type_size, dtype=torch.uint8, device=x.device)
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            stop = start + _CHUNK_BLOCKS
            _quantize_chunk(blocks[start:stop], gtype, out[start:stop], start)
    return out.view(*x.shape[:-1], row_bytes)


# --- the C kernels (csrc/legacy.c): the same bytes as the torch code below, in one pass -------

_NOT_FINITE, _OVERFLOW = 1, 2  # legacy.c's reasons for refusing a block


def _legacy_library():
    """The C library when it is enabled and its compiler had half floats, else None."""
    return codecs._library()


def can_transcode(src_type: str, dst_type: str) -> bool:
    """Whether transcode_blocks does src_type -> dst_type here (legacy types, C kernels built)."""
    return src_type in LEGACY_TYPES and dst_type in LEGACY_TYPES and codecs.can_transcode(
        src_type, dst_type)


def transcode_blocks(data: torch.Tensor, src_type: str, dst_type: str,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat uint8 bytes of legacy `src_type` blocks -> the same values as `dst_type` blocks,
    byte for byte what quantize_blocks(dequantize_blocks(data), dst_type) gives, in one pass
    in C: the floats never leave L1. `out`, if given, is a flat uint8 tensor of the result's size
    that is filled and returned (so a caller can reuse one buffer). Needs can_transcode."""
    if not can_transcode(src_type, dst_type):
        raise ValueError(f"transcode_blocks needs two legacy types ({', '.join(LEGACY_TYPES)}) "
                         f"and the C kernels; got {src_type} -> {dst_type}")
    src, dst = TYPES[src_type], TYPES[dst_type]
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % src.type_size:
        raise ValueError(f"data must be flat uint8 bytes of whole {src_type} blocks "
                         f"({src.type_size} bytes each), got {data.dtype} of shape "
                         f"{tuple(data.shape)}")
    data = data.contiguous()
    n_blocks = data.numel() // src.type_size
    if out is None:
        out = ckernels.host_empty((n_blocks * dst.type_size,), np.uint8)
    elif out.dtype != torch.uint8 or out.shape != (n_blocks * dst.type_size,) \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous flat uint8 tensor of "
                         f"{n_blocks * dst.type_size} bytes, got {out.dtype} {tuple(out.shape)}")
    codecs.transcode(data.numpy(), src_type, dst_type, out.numpy())
    return out


def _quantize_c(lib, blocks, gtype: GGMLType, out):
    """blocks (n, 32) float32 -> out (n, type_size); returns (first bad block, why) or None."""
    return ckernels.block_quantize(lib.zp_quantize_legacy, gtype.id, blocks, blocks.shape[0],
                                   out)


def _dequantize_c(lib, raw, gtype: GGMLType) -> torch.Tensor:
    """raw (n, type_size) bytes -> (n, 32) float32."""
    out = ckernels.host_empty((raw.shape[0], gtype.block_size), np.float32)
    codecs.dequantize_blocks_c(raw.numpy(), gtype, out.numpy())
    return out


def _refuse(blocks, gtype: GGMLType, i: int, why: int, first: int = 0):
    """Raise for blocks[i] (block first + i overall): it holds NaN or inf, or its d or m
    overflows fp16."""
    if why == _NOT_FINITE:
        raise ValueError(f"x must be finite; block {first + i} holds NaN or inf")
    raise ValueError(f"{gtype.name} block {first + i}: its scale or minimum overflows float16 "
                     f"(largest |x| {float(blocks[i].abs().max()):.4g}); ggml cannot store it")


# --- the torch code ---------------------------------------------------------------------------


def _quantize_chunk(blocks, gtype: GGMLType, out, first: int) -> None:
    """blocks (n, 32) float32 -> out (n, type_size) bytes; first = index of blocks[0] overall."""
    d, m = legacy_params(blocks, gtype)
    codes = legacy_codes(blocks, d, m, gtype)
    # NaN/inf input propagates into d, so this one check catches it as well as fp16 overflow.
    halves = torch.cat([d] if m is None else [d, m], dim=-1).to(torch.float16)  # (n, 1 or 2)
    if not torch.isfinite(halves).all():
        _raise_for_block(blocks, halves, gtype, first)
    pack_legacy(halves, codes, gtype, out)


def pack_legacy(halves: torch.Tensor, codes: torch.Tensor, gtype: GGMLType,
                out: torch.Tensor) -> None:
    """halves (n, 1 or 2) float16 d [, m] and codes (n, 32) int8 as stored (Q8_0 signed, the
    others 0..2^bits-1) -> out (n, type_size) bytes in ggml's layout."""
    col = 2 * halves.shape[-1]
    out[:, :col] = halves.view(torch.uint8)  # (n, k) fp16 -> (n, 2k) bytes
    if gtype.bits == 8:
        out[:, col:] = codes.view(torch.uint8)
        return
    if gtype.bits == 5:
        _pack_high_bits(codes, out[:, col : col + 4])
        col += 4
    _pack_nibbles(codes, out[:, col:])


def _raise_for_block(blocks, halves, gtype: GGMLType, first: int):  # says which and why
    i = int((~torch.isfinite(halves)).any(-1).nonzero()[0, 0])
    why = _OVERFLOW if torch.isfinite(blocks[i]).all() else _NOT_FINITE
    _refuse(blocks, gtype, i, why, first)


def legacy_params(blocks: torch.Tensor, gtype: GGMLType):
    """The type's own (d, m) for blocks (n, 32) float32, as float32 (n, 1) before their fp16
    rounding; m is None for the types without a minimum. NaN and inf propagate into d.

    Q4_0/Q5_0: d = (the x of largest |x|) / -o, o = 2^(bits-1): the signed max lands exactly on
    code 0, so its side gets the extra level. Q4_1/Q5_1: d = (max - min) / (2^bits - 1), m = min.
    Q8_0: d = max|x| / 127.
    """
    # Two reductions: aminmax is 3x slower on rows of 32.
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    if gtype.bits == 8:
        return torch.maximum(-lo, hi).abs_() / 127, None  # abs_: all -0.0 gives +0.0, as |x|
    if gtype.has_min:
        lo, hi = _first_zero_sign(blocks, lo), _first_zero_sign(blocks, hi)
        return (hi - lo) / ((1 << gtype.bits) - 1), lo
    return _signed_absmax(blocks, lo, hi) / -(1 << (gtype.bits - 1)), None


def legacy_codes(blocks: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                 gtype: GGMLType) -> torch.Tensor:
    """(n, 32) int8 codes as stored, for blocks (n, 32) float32 on the grid of unrounded d and m
    (n, 1), with the type's own rounding; values beyond the grid take its end codes.

    Q4_0/Q5_0: trunc(x / d + o + 0.5); Q4_1/Q5_1: trunc((x - m) / d + 0.5); Q8_0:
    round-half-away-from-zero(x / d), within -127..127 (ggml's int8 dot products negate codes).
    """
    inv = _inverse(d)
    if gtype.bits == 8:
        v = blocks * inv
        # Round half away from zero: add sign(v) * nextafter(0.5, 0), then truncate (the int
        # cast does). Adding 0.5 itself would round 0.5 - 2^-25 up (the sum rounds to 1.0);
        # with this constant every |v| < 2^22 rounds as gguf-py's floor-based np_roundf.
        # sign * constant is exact, so whether torch fuses the multiply-add changes nothing.
        v.add_(v.sign(), alpha=_JUST_BELOW_HALF)
        lo, hi = -127, 127
    else:
        if gtype.has_min:
            v = blocks - m
            v *= inv
            v += 0.5
        else:
            v = blocks * inv
            v += (1 << (gtype.bits - 1)) + 0.5  # a separate add, as numpy does: no FMA
        lo, hi = 0, (1 << gtype.bits) - 1
    # Clipping to the integer ends commutes with the truncation that the int8 cast does; int8
    # because torch casts float -> int8 3x faster than to uint8.
    return _zero_nonfinite(v, inv).clamp_(lo, hi).to(torch.int8)


def legacy_values(halves: torch.Tensor, codes: torch.Tensor, gtype: GGMLType) -> torch.Tensor:
    """What ggml (and gguf-py) dequantize: halves (n, 1 or 2) float16 d [, m], codes (n, 32)
    int8 as stored -> (n, 32) float32, d * (q - o) [+ m]."""
    f = halves.to(torch.float32)
    if not gtype.has_min and gtype.bits < 8:  # the _0 types store q + o: subtract in int8 (gguf-py)
        codes = codes - (1 << (gtype.bits - 1))
    x = f[:, :1] * codes.to(torch.float32)
    if gtype.has_min:
        x += f[:, 1:]  # a separate add after the multiply: no FMA, as numpy
    return x


def _signed_absmax(blocks, lo, hi):
    """(n, 32) -> (n, 1): the first element of largest |x|, as gguf-py's argmax(|x|) picks it."""
    total = lo + hi  # its sign is that of |hi| - |lo|, exactly; 0 only when |lo| == |hi|
    out = torch.maximum(-lo, hi).copysign_(total)  # lo or hi, without a (slow) where()
    # "First" matters only when +a and -a both occur, or in an all-zero block (the first zero's
    # sign becomes d's). Those rare blocks take the slow path.
    tie = (total == 0).view(-1).nonzero().view(-1)
    if tie.numel():
        sub = blocks[tie]  # (n_tie, 32)
        out[tie] = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))
    return out


def _first_zero_sign(blocks, extreme):
    """A zero min/max takes the sign of the block's first zero, as in ggml's C loop (`if (v <
    min) min = v`). numpy's SIMD min picks 0.0 or -0.0 by lane order: gguf-py is not stable."""
    rows = (extreme == 0).view(-1).nonzero().view(-1)
    if rows.numel():
        sub = blocks[rows]  # (n_zero, 32)
        extreme = extreme.clone()
        extreme[rows] = sub.gather(-1, (sub == 0).to(torch.uint8).argmax(-1, keepdim=True))
    return extreme


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (a constant block): every value then gets the middle/zero code."""
    return d.reciprocal().masked_fill_(d == 0, 0.0)


def _zero_nonfinite(v: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Where 1/d overflowed (|max| < ~1e-37), codes are 0: what gguf-py's cast of inf/NaN gives
    on x86, spelled out rather than left to an undefined cast. Such blocks' fp16 d is 0 anyway."""
    if torch.isinf(inv).any():
        v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    return v


# The packers view the codes as int32: 4 codes per word, so one shift or mask moves 4 at once
# (torch vectorizes int32 shifts, not uint8 or int64 ones). Codes < 32 keep the sign bit clear.
def _pack_nibbles(codes: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 32) codes -> out (n, 16): element j in the low nibble, element j + 16 in the high."""
    words = codes.view(torch.int32)  # (n, 8): words 0-3 hold elements 0..15, 4-7 hold 16..31
    low = words[:, :4] & 0x0F0F0F0F  # the mask drops bit 4 of 5-bit codes before it can spill
    high = words[:, 4:] & 0x0F0F0F0F
    high <<= 4
    high |= low
    out.copy_(high.view(torch.uint8))  # (n, 4) int32 -> (n, 16) bytes


def _pack_high_bits(codes: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 32) 5-bit codes -> out (n, 4): bit 4 of element j -> bit j % 8 of byte j // 8."""
    bits = codes.view(torch.int32) >> 4
    bits &= 0x01010101  # (n, 8): one 0/1 per byte
    # Fold each word's four one-bit bytes into its low nibble: >> 7 puts byte k+1's bit beside
    # byte k's, then >> 14 brings bytes k+2 and k+3 beside those two.
    bits |= bits >> 7
    bits |= bits >> 14
    bits &= 0x0F
    pairs = bits.view(-1, 4, 2)  # (n, 4, 2): the two words whose nibbles make one byte
    out.copy_(pairs[..., 0] | (pairs[..., 1] << 4))  # (n, 4) int32 -> (n, 4) bytes


# --- dequantize -------------------------------------------------------------------------------


def dequantize_blocks(data: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    """uint8 bytes of ggml blocks -> float32 tensor of `shape` (last dim a multiple of the block
    size)."""
    gtype = block_type(qtype)
    shape = tuple(int(s) for s in shape)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise TypeError(f"data must be a uint8 torch.Tensor, got {got}")
    if not shape or shape[-1] % gtype.block_size:
        raise ValueError(f"shape's last dimension must be a multiple of {gtype.name}'s block size "
                         f"{gtype.block_size}, got shape {shape}")
    n_blocks = math.prod(shape) // gtype.block_size
    if data.numel() != n_blocks * gtype.type_size:
        raise ValueError(f"{gtype.name} shape {shape} needs {n_blocks * gtype.type_size} bytes "
                         f"({n_blocks} blocks x {gtype.type_size}), got {data.numel()}")
    raw = data.contiguous().view(n_blocks, gtype.type_size)
    if gtype.family == "k":
        return dequantize_kblocks(raw, qtype).view(shape)
    if gtype.family == "iq":
        return torch.from_numpy(iquants.dequantize(raw.cpu().numpy(), qtype)).view(shape)

    lib = _legacy_library()
    if lib is not None and raw.device.type == "cpu":
        return _dequantize_c(lib, raw, gtype).view(shape)
    col = 4 if gtype.has_min else 2
    if gtype.bits == 8:
        q = raw[:, col:].contiguous().view(torch.int8)  # (n, 32)
    else:
        packed = raw[:, col + (4 if gtype.bits == 5 else 0) :]  # (n, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # (n, 32): low nibbles first
        if gtype.bits == 5:
            q |= _unpack_high_bits(raw[:, col : col + 4]) << 4
        q = q.to(torch.int8)
    halves = raw[:, :col].contiguous().view(torch.float16)  # (n, 1 or 2)
    return legacy_values(halves, q, gtype).view(shape)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes -> (n, 32) of 0/1: bit j % 8 of byte j // 8 is element j's bit 4."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).view(qh.shape[0], -1)  # (n, 4, 8) -> (n, 32)
