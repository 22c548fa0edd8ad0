"""Sub-byte codes to bytes and back, for 1 to 8 bits.

The layout is one little-endian bit stream: code i occupies bits [i*b, (i+1)*b) of the stream
and byte j holds stream bits [8j, 8j+8). So 4-bit is two codes per byte (the first in the low
nibble), 2-bit four per byte, 6-bit four codes in three bytes, and 3, 5 and 7 bits are dense.
A run of n codes takes exactly ceil(n * b / 8) bytes.

Packing works on unsigned codes in [0, 2^b); signed codes are offset first (see QTensor).
The C loops of csrc/pack.c do the work where a compiler is at hand; the torch code below is
the portable path, and the tests hold both to the same bytes.
"""

from __future__ import annotations

from math import gcd

import torch

from . import ckernels


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def rows_per_whole_bytes(row_len: int, bits: int) -> int:
    """The fewest rows of `row_len` codes that fill whole bytes. A block of a multiple of this
    many rows starts on a byte, so blocks pack on their own and their bytes concatenate to the
    packed whole."""
    return 8 // gcd(row_len * bits, 8)


def row_nbytes(row_len: int, bits: int) -> int | None:
    """Packed bytes of one row of `row_len` codes, or None when a row ends inside a byte (rows
    can then not be packed, unpacked or sliced on their own)."""
    return packed_nbytes(row_len, bits) if rows_per_whole_bytes(row_len, bits) == 1 else None


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (any shape, values < 2^bits) -> uint8 bytes, 1-D."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    lib = ckernels.library()
    if lib is not None:
        flat = flat.contiguous()
        out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
        lib.zp_pack(flat.data_ptr(), n, bits, out.data_ptr())
        return out
    per_byte = 8 // bits if 8 % bits == 0 else None
    if per_byte:
        packed = _pack_aligned(flat, bits, per_byte)
    else:
        packed = _pack_dense(flat, bits)
    return packed[: packed_nbytes(n, bits)]


def unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 bytes -> the first n unsigned codes, uint8, 1-D."""
    _check_bits(bits)
    if data.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits take {packed_nbytes(n, bits)} bytes, got {data.numel()}"
        )
    if bits == 8:
        return data.reshape(-1).clone()
    lib = ckernels.library()
    if lib is not None:
        codes = torch.empty(n, dtype=torch.uint8)
        lib.zp_unpack(data.contiguous().data_ptr(), n, bits, codes.data_ptr())
        return codes
    if 8 % bits == 0:
        return _unpack_aligned(data, bits, 8 // bits)[:n]
    return _unpack_dense(data, bits)[:n]


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -flat.numel() % multiple
    return torch.nn.functional.pad(flat, (0, pad)) if pad else flat


def _pack_aligned(flat: torch.Tensor, bits: int, per_byte: int) -> torch.Tensor:
    groups = _pad_to(flat, per_byte).view(-1, per_byte)  # (n_bytes, codes per byte)
    out = groups[:, 0].clone()
    for i in range(1, per_byte):
        out |= groups[:, i] << (i * bits)
    return out


def _unpack_aligned(data: torch.Tensor, bits: int, per_byte: int) -> torch.Tensor:
    mask = (1 << bits) - 1
    byte = data.reshape(-1, 1)  # (n_bytes, 1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # (codes per byte,)
    return ((byte >> shifts) & mask).reshape(-1)


def _pack_dense(flat: torch.Tensor, bits: int) -> torch.Tensor:
    # 8 codes of b bits are exactly b bytes: gather each run of 8 into one int64 word.
    runs = _pad_to(flat, 8).view(-1, 8).to(torch.int64)  # (n_runs, 8)
    word = runs[:, 0].clone()
    for i in range(1, 8):
        word |= runs[:, i] << (i * bits)
    shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64)  # (bits,) one per output byte
    return ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_dense(data: torch.Tensor, bits: int) -> torch.Tensor:
    mask = (1 << bits) - 1
    runs = _pad_to(data.reshape(-1), bits).view(-1, bits).to(torch.int64)  # (n_runs, bits)
    word = runs[:, 0].clone()
    for j in range(1, bits):
        word |= runs[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)  # (8,) one per code
    return ((word.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)
