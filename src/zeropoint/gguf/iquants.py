"""ggml's i-quants (IQ1_S .. IQ4_XS): float32 rows to ggml's bytes and back, numpy in and out.

The bytes are llama.cpp's own (quantize_iq* in ggml-quants.c) for the same rows and importance;
the work is csrc/iquants.c. An importance vector is what an imatrix file holds for the tensor:
one weight per column (n_per_row,), shared by every row, and llama.cpp's quantizers use it as
given. IQ2_XXS, IQ2_XS and IQ1_S need one (llama.cpp refuses them without); the others fall back
to weighting each value by its own square, as llama.cpp does.

The codebooks are format data and come from gguf-py (`gguf.quants`, installed with zeropoint),
which carries them for its own dequantizers: each grid's points as level numbers, and the value
of each level. They are handed to the C kernels once per process.
"""
from __future__ import annotations

import threading

import numpy as np

from .. import ckernels
from .layout import tensor_nbytes
from .types import TYPES

IQ_TYPES = tuple(name for name, t in TYPES.items() if t.family == "iq")
# llama.cpp's ggml_quantize_requires_imatrix (ggml.c): these three have no unweighted rounding.
NEEDS_IMPORTANCE = ("IQ2_XXS", "IQ2_XS", "IQ1_S")

_ready: set[str] = set()
_lock = threading.Lock()


def requires_importance(qtype: str) -> bool:
    """Whether llama.cpp refuses to make `qtype` without an importance matrix."""
    return qtype in NEEDS_IMPORTANCE


def _codebook(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's table for `qtype`: (points as level numbers (n_points, dim) uint8, the int8 value
    of each level); for IQ4_NL/IQ4_XS no points and the 16 levels."""
    import gguf.quants as gq

    if qtype in ("IQ4_NL", "IQ4_XS"):
        return np.zeros((0, 1), np.uint8), np.array(gq.IQ4_NL.kvalues, np.int8)
    cls = getattr(gq, qtype)
    cls.init_grid()
    values = np.array(cls.grid_map, np.float32)
    grid = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)  # (n_points, dim)
    levels = np.searchsorted(values, grid)  # grid_map is ascending
    if not np.array_equal(values[levels], grid):
        raise RuntimeError(f"gguf-py's {qtype} grid has values outside its grid_map")
    return levels.astype(np.uint8), values.astype(np.int8)


def _library(qtype: str):
    """The C library with `qtype`'s codebook set (once per process)."""
    lib = ckernels.library()
    if lib is None:
        raise RuntimeError(f"ggml type {qtype} needs zeropoint's C kernels, which are unavailable "
                           "here (no C compiler, or ZEROPOINT_NO_CKERNELS=1)")
    if qtype not in _ready:
        with _lock:
            if qtype not in _ready:
                levels, values = _codebook(qtype)
                levels = np.ascontiguousarray(levels)
                status = lib.zp_iq_set_grid(TYPES[qtype].id, levels.ctypes.data, len(levels),
                                            values.ctypes.data, len(values))
                if status:
                    raise RuntimeError(f"the C kernels refused the {qtype} codebook ({status})")
                _ready.add(qtype)
    return lib


def _block_values(qtype: str) -> int:
    return TYPES[qtype].block_size


def check_importance(importance, n_per_row: int, qtype: str, name: str = "tensor"):
    """float32 (n_per_row,) contiguous, or None; ValueError naming what is wrong."""
    if importance is None:
        if requires_importance(qtype):
            raise ValueError(f"{name}: ggml type {qtype} needs an importance matrix (llama.cpp "
                             f"refuses it without one: pass --imatrix FILE); the types that need "
                             f"one are {', '.join(NEEDS_IMPORTANCE)}")
        return None
    w = np.ascontiguousarray(importance, dtype=np.float32)
    if w.shape != (n_per_row,):
        raise ValueError(f"{name}: importance must have shape ({n_per_row},), one weight per "
                         f"column, got {tuple(np.shape(importance))}")
    if not np.isfinite(w).all():
        raise ValueError(f"{name}: importance has values that are not finite")
    return w


def quantize(x: np.ndarray, qtype: str, importance: np.ndarray | None = None,
             name: str = "tensor") -> np.ndarray:
    """float rows (..., n_per_row) -> (..., row bytes) uint8 of ggml type `qtype`, as llama.cpp's
    quantize_iq* makes them. n_per_row must be a multiple of the type's block (32 for IQ4_NL, 256
    for the rest); `importance` is one weight per column, or None."""
    if qtype not in IQ_TYPES:
        raise ValueError(f"not an i-quant: {qtype!r}; accepted: {', '.join(IQ_TYPES)}")
    x = np.asarray(x)
    if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a floating-point array of rows, got {x.dtype} of shape "
                        f"{x.shape}")
    n_per_row = x.shape[-1]
    block = _block_values(qtype)
    if n_per_row == 0 or n_per_row % block:
        raise ValueError(f"{name}: rows of {n_per_row} values do not tile into {qtype}'s blocks "
                         f"of {block}")
    rows = x.reshape(-1, n_per_row).astype(np.float32, copy=False)
    rows = np.ascontiguousarray(rows)
    if not np.isfinite(rows).all():
        bad = int(np.argmin(np.isfinite(rows).all(axis=1)))
        raise ValueError(f"{name}: row {bad} has values that are not finite; {qtype} needs "
                         f"finite floats")
    w = check_importance(importance, n_per_row, qtype, name)
    lib = _library(qtype)
    row_bytes = tensor_nbytes(qtype, (n_per_row,))
    out = np.empty((rows.shape[0], row_bytes), np.uint8)
    status = lib.zp_quantize_iquant(TYPES[qtype].id, rows.ctypes.data, rows.shape[0], n_per_row,
                                    None if w is None else w.ctypes.data, out.ctypes.data,
                                    ckernels.threads(rows.size))
    if status:
        raise RuntimeError(f"zp_quantize_iquant({qtype}) failed with status {status}")
    return out.reshape(*x.shape[:-1], row_bytes)


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Flat bytes of whole `qtype` blocks -> flat float32 values (ggml's dequantize_row_iq*)."""
    if qtype not in IQ_TYPES:
        raise ValueError(f"not an i-quant: {qtype!r}; accepted: {', '.join(IQ_TYPES)}")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    t = TYPES[qtype]
    if raw.size % t.type_size:
        raise ValueError(f"{qtype} data must be whole blocks of {t.type_size} bytes, got "
                         f"{raw.size} bytes")
    n_blocks = raw.size // t.type_size
    out = np.empty(n_blocks * t.block_size, np.float32)
    lib = _library(qtype)
    status = lib.zp_dequantize_iquant(t.id, raw.ctypes.data, n_blocks, out.ctypes.data,
                                      ckernels.threads(out.size))
    if status:
        raise RuntimeError(f"zp_dequantize_iquant({qtype}) failed with status {status}")
    return out


__all__ = ["IQ_TYPES", "NEEDS_IMPORTANCE", "requires_importance", "check_importance", "quantize",
           "dequantize"]
