"""Optional C fast path: float32 quantize, dequantize and block min/max (csrc/affine.c), bit
packing (csrc/pack.c), ggml's K-quant super-blocks (csrc/kquants.c, used by gguf.kquants) and
legacy 32-value blocks (csrc/legacy.c, used by gguf.blocks).

Eager PyTorch needs one pass over memory per op (divide, round, shift, clamp, cast); the C
loop does them all in one pass, about 2-5x faster on a CPU. It compiles in well under a second
with the system C compiler on first use and is cached under ~/.cache/zeropoint (or
$ZEROPOINT_CACHE). Without a compiler, or with ZEROPOINT_NO_CKERNELS=1, core.py uses its
eager path, which computes identical codes: the tests hold the two to that.

Work is split along the first dimension of the block view into one piece per torch thread;
ctypes releases the GIL during the call, so the pieces run in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from math import prod
from pathlib import Path

import numpy as np
import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("affine.c", "pack.c", "kquants.c",
                                                                "legacy.c", "gemv.c", "decode.c")]
# -fno-math-errno lets nearbyintf become one vector instruction; no -ffast-math, which would
# turn the division into a multiply by a reciprocal and change codes at ties. Full-width vectors
# (512-bit where the CPU has them) measured 1.5x faster than gcc's default 256-bit choice.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-shared", "-fPIC"]
PARALLEL_MIN_ELEMENTS = 1 << 20  # below this, one thread finishes before a second would start

_enabled = os.environ.get("ZEROPOINT_NO_CKERNELS", "") in ("", "0")
_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def _cpu_signature() -> str:
    # -march=native code from one CPU may not run on another sharing the same home folder.
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build(cache: Path) -> Path:
    source = b"".join(p.read_bytes() for p in SOURCES)
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join([cc, *CFLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@functools.lru_cache(maxsize=None)
def _library():
    cache = Path(os.environ.get("ZEROPOINT_CACHE", Path.home() / ".cache" / "zeropoint"))
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except Exception as e:  # no compiler, read-only home, exotic platform: eager path it is
        warnings.warn(f"zeropoint: C kernels unavailable ({e}); using the slower eager path")
        return None
    lib.zp_quantize_f32.argtypes = [_p, _p, _i64, _i64, _i64, _p, _p, _f32, _f32]
    lib.zp_quantize_f32.restype = _int
    lib.zp_dequantize_f32.argtypes = [_p, _int, _p, _i64, _i64, _i64, _p, _p]
    lib.zp_dequantize_f32.restype = None
    lib.zp_minmax_f32.argtypes = [_p, _i64, _i64, _i64, _p, _p]
    lib.zp_minmax_f32.restype = _int
    lib.zp_pack.argtypes = lib.zp_unpack.argtypes = [_p, _i64, _int, _p]
    lib.zp_pack.restype = lib.zp_unpack.restype = None
    lib.zp_quantize_kquant.argtypes = [_int, _p, _i64, _p, _p]
    lib.zp_quantize_kquant.restype = _i64
    lib.zp_quantize_legacy.argtypes = [_int, _p, _i64, _p, _p]
    lib.zp_quantize_legacy.restype = _i64
    lib.zp_dequantize_legacy.argtypes = [_int, _p, _i64, _p]
    lib.zp_dequantize_legacy.restype = _int
    lib.zp_legacy_available.restype = _int
    lib.zp_requantize_legacy.argtypes = [_int, _p, _int, _i64, _p, _p]
    lib.zp_requantize_legacy.restype = _i64
    lib.zp_gemv_q8.argtypes = [_p, _p, _p, _p, _i64, _i64, _int, _int]  # see csrc/gemv.c
    lib.zp_gemv_q4.argtypes = [_p, _p, _p, _p, _p, _i64, _i64, _i64, _int, _int]
    lib.zp_gemv_q8.restype = lib.zp_gemv_q4.restype = None
    lib.zp_add_rmsnorm.argtypes = [_p, _p, _p, _f32, _i64, _p]  # see csrc/decode.c
    lib.zp_llama_attend.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _f32, _p, _p]
    lib.zp_silu_mul.argtypes = [_p, _p, _i64]
    lib.zp_add_rmsnorm.restype = lib.zp_llama_attend.restype = lib.zp_silu_mul.restype = None
    return lib


def library():
    """The loaded C library, or None when disabled or unavailable."""
    return _library() if _enabled else None


@contextmanager
def disabled():
    """Force the eager path inside the block (tests compare the two paths)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="zeropoint")


def pcq(shape: tuple[int, ...], is_block: tuple[bool, ...]):
    """(P, C, Q) for a block view with at most one scale dimension, else None (eager handles it)."""
    index = [d for d, blk in enumerate(is_block) if not blk]
    if len(index) > 1:
        return None
    if not index:
        return 1, 1, prod(shape)
    k = index[0]
    return prod(shape[:k]), shape[k], prod(shape[k + 1 :])


def _pieces(shape, is_block):
    """Split dimension 0 into one piece per thread: (first row, rows, (P, C, Q), scale offset)."""
    rows, per_row = shape[0], prod(shape[1:])
    n = min(torch.get_num_threads(), rows) if rows * per_row >= PARALLEL_MIN_ELEMENTS else 1
    bounds = [rows * i // n for i in range(n + 1)]
    for a, b in zip(bounds, bounds[1:]):
        P, C, Q = pcq((b - a,) + tuple(shape[1:]), is_block)
        # When dimension 0 carries the scale, each piece owns a slice of it; otherwise all
        # pieces share the whole scale.
        yield a, P, C, Q, (0 if is_block[0] else a)


def host_empty(shape: tuple[int, ...], dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in numpy's memory (dtype: numpy's or torch's). numpy asks the
    kernel for huge pages on large buffers and keeps freed ones for reuse; torch's fresh 4 KiB
    pages made the first write to a 17 MiB output cost 8 ms, half as long as quantizing 64 MiB
    into it."""
    if isinstance(dtype, torch.dtype):
        dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.empty(shape, dtype))


def run_pieces(calls) -> list:
    """Results of `calls` in order, run on torch's thread count of threads, the calling one
    included, each thread taking the next call when done. ctypes drops the GIL, so C pieces run
    in parallel. With as many calls as threads this is a plain split; with more (smaller)
    pieces a busy machine costs less: a worker that waits for a core holds up one piece, not a
    fixed half of the work (fixed halves made 2 threads slower than 1 at load 4 on 2 cores),
    and the caller never sits idle while a woken worker waits to be scheduled."""
    calls = list(calls)
    helpers = min(torch.get_num_threads(), len(calls)) - 1
    if helpers <= 0:
        return [c() for c in calls]
    results: list = [None] * len(calls)
    queue = iter(enumerate(calls))  # next() on it is atomic under the GIL

    def drain():
        for i, c in queue:
            results[i] = c()

    futures = [_pool(helpers).submit(drain) for _ in range(helpers)]
    try:
        drain()
    finally:  # the helpers write into the caller's buffers: wait for them, even on an error
        for f in futures:
            f.result()
    return results


def block_quantizer_piece(fn, type_id: int, src, out, a: int, b: int):
    """A call of a C block quantizer `fn(type, src, n, out, &why) -> first bad block or -1` on
    blocks a:b of src (rows) into out; run, it gives (first bad block, why) or None."""

    def run():
        why = ctypes.c_int(0)
        i = fn(type_id, src[a].data_ptr(), b - a, out[a].data_ptr(), ctypes.byref(why))
        return None if i < 0 else (a + i, why.value)

    return run


def first_failure(results):
    """The earliest (block, why) of the pieces' results, or None when every piece succeeded."""
    found = [r for r in results if r is not None]
    return min(found) if found else None


def _ptr(t, offset_elements=0):
    return t.data_ptr() + offset_elements * t.element_size() if t is not None else None


def _local(t, start: int, n: int):
    """A copy of t.flat[start:start + n] made by the calling worker thread. Scales and
    zero-points were just written by another core; read in place, interleaved with the data
    stream, they cost a cross-core cache transfer per block (measured 2x slower per-group).
    numpy copies: a torch copy this large runs an OpenMP region, and an OpenMP team started
    from a worker thread left the main thread's float matmuls 1.8x slower for the rest of the
    process (libgomp keeps one team per calling thread, and the two compete for the cores)."""
    if t is None:
        return None
    return torch.from_numpy(t.reshape(-1)[start : start + n].numpy().copy())


def _with_params(fn, scale, zero_point, C, s0):
    """Run fn(s, z) in the worker with its own copies of the C scale/zero-point entries that
    its piece (P, C, Q) uses, from entry s0 on."""

    def work():
        s, z = _local(scale, s0, C), _local(zero_point, s0, C)
        return fn(_ptr(s), _ptr(z))

    return work


def quantize(lib, xv, codes, view, scale, zero_point, qmin, qmax) -> bool:
    """Fill `codes` (view-shaped, 1-byte dtype) from float32 `xv`. Returns True on NaN/Inf."""
    per_row = prod(view.shape[1:])

    def call(a, P, C, Q, s0):
        def fn(s, z):
            return lib.zp_quantize_f32(_ptr(xv, a * per_row), _ptr(codes, a * per_row), P, C, Q, s, z,
                                       qmin, qmax)
        return _with_params(fn, scale, zero_point, C, s0)

    return any(run_pieces(call(*p) for p in _pieces(view.shape, view.is_block)))


def dequantize(lib, codes, out, view, scale, zero_point) -> None:
    per_row = prod(view.shape[1:])
    signed = int(codes.dtype == torch.int8)

    def call(a, P, C, Q, s0):
        def fn(s, z):
            lib.zp_dequantize_f32(_ptr(codes, a * per_row), signed, _ptr(out, a * per_row), P, C, Q, s, z)
        return _with_params(fn, scale, zero_point, C, s0)

    run_pieces(call(*p) for p in _pieces(view.shape, view.is_block))


def min_max(lib, xv, view):
    """Per-block (lo, hi) as flat float32 tensors, and whether a NaN/Inf was seen."""
    per_row = prod(view.shape[1:])
    pieces = list(_pieces(view.shape, view.is_block))
    outs = [(torch.empty(C), torch.empty(C)) for _, _, C, _, _ in pieces]

    def call(piece, lo_hi):
        a, P, C, Q, _ = piece
        return lambda: lib.zp_minmax_f32(_ptr(xv, a * per_row), P, C, Q, _ptr(lo_hi[0]), _ptr(lo_hi[1]))

    bad = any(run_pieces(call(p, o) for p, o in zip(pieces, outs)))
    if view.is_block[0] and len(outs) > 1:  # pieces saw the same blocks: combine the partials
        lo = torch.stack([o[0] for o in outs]).amin(0)
        hi = torch.stack([o[1] for o in outs]).amax(0)
    else:
        lo, hi = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return lo, hi, bad
