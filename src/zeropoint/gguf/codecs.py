"""ggml types' rows as numpy arrays, without torch: what the GGUF requantizer runs on.

Each type zeropoint writes has a Codec here: `quantize` takes float32 rows (n_rows, n_per_row),
C-contiguous, and returns the type's bytes (n_rows, row_bytes) uint8; `dequantize` takes those
bytes and returns the float32 rows. The float types are numpy casts; the block types call the C
kernels (csrc/legacy.c, csrc/kquants.c, csrc/kdequant.c) on the arrays' memory, with the same
bytes as gguf.blocks' torch code, which delegates to these functions for CPU tensors; the
i-quants call gguf.iquants (csrc/iquants.c). A type
whose kernels are missing (no compiler, ZEROPOINT_NO_CKERNELS=1) is not `supported`, and callers
take the torch path instead.

A new type registers one Codec in CODECS (`register`). A block its type cannot store (NaN or
inf, or a scale that overflows fp16) is a ValueError naming the block's index in the array.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import ckernels
from . import iquants
from .types import TYPES, GGMLType

_NOT_FINITE, _OVERFLOW = 1, 2  # the C kernels' reasons for refusing a block


@dataclass(frozen=True)
class Codec:
    """A type's rows to bytes and back (module docstring); `kernels`: it needs the C library."""

    quantize: Callable[[np.ndarray], np.ndarray]  # (n_rows, n_per_row) float32 -> (n_rows, B) u8
    dequantize: Callable[[np.ndarray, int], np.ndarray]  # (n_rows, B) u8, n_per_row -> float32
    kernels: bool = True


CODECS: dict[str, Codec] = {}


def register(qtype: str, codec: Codec) -> None:
    """Make `qtype` (a gguf.types name) readable and writable by the requantizer."""
    if qtype not in TYPES:
        raise ValueError(f"unknown ggml type {qtype!r}")
    CODECS[qtype] = codec


def _library():
    """The C library when it is enabled and its compiler had half floats, else None."""
    lib = ckernels.library()
    return lib if lib is not None and lib.zp_legacy_available() else None


def supported(qtype: str) -> bool:
    """Whether this module quantizes and dequantizes `qtype` here and now."""
    codec = CODECS.get(qtype)
    return codec is not None and (not codec.kernels or _library() is not None)


def row_bytes(qtype: str, n_per_row: int) -> int:
    t = TYPES[qtype]
    if n_per_row % t.block_size:
        raise ValueError(f"rows of {qtype} must be a multiple of {t.block_size} values, got "
                         f"{n_per_row}")
    return n_per_row // t.block_size * t.type_size


def quantize_rows(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 rows (n_rows, n_per_row) -> (n_rows, row_bytes) uint8 bytes of `qtype`."""
    if x.ndim != 2 or x.dtype != np.float32:
        raise TypeError(f"x must be float32 rows (n_rows, n_per_row), got {x.dtype} "
                        f"{tuple(x.shape)}")
    row_bytes(qtype, x.shape[1])  # checks that rows tile into blocks
    return _codec(qtype).quantize(np.ascontiguousarray(x))


def dequantize_rows(data: np.ndarray, qtype: str, n_per_row: int) -> np.ndarray:
    """Bytes of `qtype` rows of n_per_row values (any shape, uint8) -> float32 (n_rows,
    n_per_row)."""
    size = row_bytes(qtype, n_per_row)
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if data.size % size:
        raise ValueError(f"{data.size} bytes are not whole rows of {n_per_row} {qtype} values "
                         f"({size} bytes each)")
    return _codec(qtype).dequantize(data.reshape(-1, size), n_per_row)


def _codec(qtype: str) -> Codec:
    if not supported(qtype):
        raise ValueError(f"no numpy codec for ggml type {qtype!r} here; accepted: "
                         f"{', '.join(t for t in CODECS if supported(t))}")
    return CODECS[qtype]


# --- float types ------------------------------------------------------------------------------


# The smallest |x| that rounds to inf: halfway past each type's largest finite value, where
# round-to-nearest-even goes up (the largest finite value has an odd significand in both).
F16_OVERFLOW = 65520.0
BF16_OVERFLOW = float(np.array(0x7F7F8000, np.uint32).view(np.float32))


def _check_narrow(x: np.ndarray, qtype: str, overflow: float) -> None:
    """ValueError unless every x is finite in `qtype`; a NaN makes max() NaN, which fails too.
    Two reductions over float32: converting back and testing each value took longer than
    the conversion."""
    big = max(float(x.max()), -float(x.min())) if x.size else 0.0
    if not big < overflow:
        big = float(np.abs(x).max())
        raise ValueError(f"values up to {big:.4g} are not finite in {qtype}")


def _f32_to_f16(x: np.ndarray) -> np.ndarray:
    _check_narrow(x, "F16", F16_OVERFLOW)
    return x.astype(np.float16).view(np.uint8)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even in the top 16 bits, as torch casts. Finite input only (checked),
    so the uint32 sum cannot wrap."""
    _check_narrow(x, "BF16", BF16_OVERFLOW)
    bits = x.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += bits
    rounded += 0x7FFF
    rounded >>= 16
    return rounded.astype(np.uint16).view(np.uint8)


def _bf16_to_f32(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


register("F32", Codec(lambda x: x.view(np.uint8),
                      lambda b, n: b.view(np.float32).reshape(-1, n), kernels=False))
register("F16", Codec(_f32_to_f16, lambda b, n: b.view(np.float16).astype(np.float32).reshape(-1, n),
                      kernels=False))
register("BF16", Codec(_f32_to_bf16, lambda b, n: _bf16_to_f32(b.view(np.uint16)).reshape(-1, n),
                       kernels=False))


# --- block types, in C --------------------------------------------------------------------------


def quantize_blocks_c(x: np.ndarray, gtype: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """float32 x (any shape, whole blocks, C-contiguous) -> (n_blocks, type_size) uint8, into
    `out` if given; ValueError for the first block the type cannot store."""
    lib = _library()
    n_blocks = x.size // gtype.block_size
    if out is None:
        out = np.empty((n_blocks, gtype.type_size), np.uint8)
    fn = lib.zp_quantize_kquant if gtype.family == "k" else lib.zp_quantize_legacy
    problem = ckernels.block_quantize(fn, gtype.id, x, n_blocks, out)
    if problem is not None:
        refuse(x.reshape(n_blocks, gtype.block_size), gtype, *problem)
    return out


def dequantize_blocks_c(raw: np.ndarray, gtype: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 bytes of whole blocks (C-contiguous) -> (n_blocks, block_size) float32, into `out`
    if given."""
    lib = _library()
    n_blocks = raw.size // gtype.type_size
    if out is None:
        out = np.empty((n_blocks, gtype.block_size), np.float32)
    fn = lib.zp_dequantize_kquant if gtype.family == "k" else lib.zp_dequantize_legacy
    fn(gtype.id, raw.ctypes.data, n_blocks, out.ctypes.data, ckernels.threads(out.size))
    return out


def refuse(blocks: np.ndarray, gtype: GGMLType, i: int, why: int, first: int = 0):
    """Raise for blocks[i] (block first + i overall): it holds NaN or inf, or its scale or
    minimum overflows fp16 (llama.cpp refuses such a block too: its row validation fails)."""
    if why == _NOT_FINITE:
        raise ValueError(f"x must be finite; block {first + i} holds NaN or inf")
    raise ValueError(f"{gtype.name} block {first + i}: its scale or minimum overflows float16 "
                     f"(largest |x| {float(np.abs(blocks[i]).max()):.4g}); ggml cannot store it")


def can_transcode(src_type: str, dst_type: str) -> bool:
    """Whether `transcode` does src_type -> dst_type here (two legacy types, C kernels built)."""
    return (TYPES[src_type].family == "legacy" and TYPES[dst_type].family == "legacy"
            and src_type in CODECS and dst_type in CODECS and _library() is not None)


def transcode(data: np.ndarray, src_type: str, dst_type: str,
              out: np.ndarray | None = None) -> np.ndarray:
    """Flat uint8 bytes of legacy `src_type` blocks -> the same values as `dst_type` blocks,
    byte for byte what quantizing the dequantized floats gives, in one pass in C whose floats
    never leave L1; into `out` (flat uint8 of the result's size) if given. Needs can_transcode."""
    if not can_transcode(src_type, dst_type):
        raise ValueError(f"transcode needs two legacy types and the C kernels; got {src_type} "
                         f"-> {dst_type}")
    src, dst = TYPES[src_type], TYPES[dst_type]
    if data.dtype != np.uint8 or data.ndim != 1 or data.size % src.type_size:
        raise ValueError(f"data must be flat uint8 bytes of whole {src_type} blocks "
                         f"({src.type_size} bytes each), got {data.dtype} of shape "
                         f"{tuple(data.shape)}")
    data = np.ascontiguousarray(data)
    n_blocks = data.size // src.type_size
    if out is None:
        out = np.empty(n_blocks * dst.type_size, np.uint8)
    elif out.dtype != np.uint8 or out.shape != (n_blocks * dst.type_size,) \
            or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous flat uint8 array of "
                         f"{n_blocks * dst.type_size} bytes, got {out.dtype} {tuple(out.shape)}")
    why = ctypes.c_int(0)
    i = _library().zp_requantize_legacy(src.id, data.ctypes.data, dst.id, n_blocks,
                                        out.ctypes.data, ctypes.byref(why))
    if i >= 0:
        bad = dequantize_blocks_c(data[i * src.type_size : (i + 1) * src.type_size], src)
        refuse(bad, dst, 0, why.value, first=i)
    return out


def _block_codec(gtype: GGMLType) -> Codec:
    def quantize(x: np.ndarray) -> np.ndarray:
        return quantize_blocks_c(x, gtype).reshape(x.shape[0], -1)

    def dequantize(raw: np.ndarray, n_per_row: int) -> np.ndarray:
        return dequantize_blocks_c(raw, gtype).reshape(-1, n_per_row)

    return Codec(quantize, dequantize)


for _name, _t in TYPES.items():
    if _t.writable and _t.quantized and _t.family in ("legacy", "k"):
        register(_name, _block_codec(_t))


def _iquant_codec(qtype: str) -> Codec:
    def quantize(x: np.ndarray) -> np.ndarray:
        return iquants.quantize(x, qtype).reshape(x.shape[0], -1)

    def dequantize(raw: np.ndarray, n_per_row: int) -> np.ndarray:
        return iquants.dequantize(raw, qtype).reshape(-1, n_per_row)

    return Codec(quantize, dequantize)


for _name, _t in TYPES.items():
    if _t.writable and _t.family == "iq":
        register(_name, _iquant_codec(_name))
