"""Optional C fast path: float32 quantize, dequantize and block min/max (csrc/affine.c), the
float-minimum groups' least-squares search (csrc/fit.c, used by calibrate.fit), bit
packing (csrc/pack.c), ggml's K-quant super-blocks (csrc/kquants.c and, back to floats,
csrc/kdequant.c; used by gguf.kquants and gguf.codecs) and
legacy 32-value blocks (csrc/legacy.c, used by gguf.blocks), a GGUF header's string arrays
(csrc/gguf_scan.c, used by gguf.header), batch-1 matrix-vector products
(csrc/gemv.c) and the compact runtime's per-token steps (csrc/token_ops.c). csrc/zeropoint.h
declares every function the library exports; SIGNATURES binds each.

Eager PyTorch needs one pass over memory per op (divide, round, shift, clamp, cast); the C
loop does them all in one pass, about 2-5x faster on a CPU. It compiles in well under a second
with the system C compiler on first use and is cached under ~/.cache/zeropoint (or
$ZEROPOINT_CACHE). Without a compiler, or with ZEROPOINT_NO_CKERNELS=1, core.py uses its
eager path, which computes identical codes: the tests hold the two to that.

Each kernel splits its work itself, on torch's own OpenMP threads (csrc/parallel.h); ctypes
releases the GIL for the call. Nothing here imports torch: a process that never does (the GGUF
requantizer) gets the same library, on the same OpenMP runtime, loaded from torch's folder where
torch is installed. The wrappers take numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from math import prod
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builds go unlocked
    fcntl = None

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("parallel.c", "affine.c", "fit.c", "pack.c", "kquants.c",
                                    "kdequant.c", "legacy.c", "iquants.c", "gguf_scan.c", "gemv.c",
                                    "token_ops.c")]
HEADERS = [CSRC / name for name in ("zeropoint.h", "common.h", "parallel.h", "weighted.h")]
# -fno-math-errno lets nearbyintf become one vector instruction; no -ffast-math, which would
# turn the division into a multiply by a reciprocal and change codes at ties. Hidden visibility:
# the library exports csrc/zeropoint.h's functions and nothing else.
BASE_CFLAGS = ["-O3", "-fno-math-errno", "-shared", "-fPIC", "-fvisibility=hidden"]
PARALLEL_MIN_ELEMENTS = 1 << 20  # below this, one thread finishes before a second would start
_COMPILE_SECONDS = 120
_UNUSED_SECONDS = 7 * 24 * 3600  # a cached library of another key unused this long is pruned
_MESSAGE_LINES = 20  # of the compiler's output, in the warning of a failed build

_enabled = os.environ.get("ZEROPOINT_NO_CKERNELS", "") in ("", "0")
_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int

# Every function of csrc/zeropoint.h, in its order: name -> (restype, argtypes). One to one with
# the header: tests/test_ckernels.py reads it and compares.
SIGNATURES = {
    "zp_openmp": (_int, []),
    "zp_quantize_f32": (_int, [_p, _p, _i64, _i64, _i64, _p, _p, _f32, _f32, _int]),
    "zp_dequantize_f32": (None, [_p, _int, _p, _i64, _i64, _i64, _p, _p, _int]),
    "zp_minmax_f32": (_int, [_p, _i64, _i64, _i64, _p, _p, _int]),
    "zp_fit_float_min": (_int, [_p, _i64, _i64, _int, _int, _p, _int, _int, _p, _p, _int]),
    "zp_pack": (None, [_p, _i64, _int, _p]),
    "zp_unpack": (None, [_p, _i64, _int, _p]),
    "zp_quantize_kquant": (_i64, [_int, _p, _i64, _p, _p, _int]),
    "zp_quantize_kquant_weighted": (_i64, [_int, _p, _i64, _i64, _p, _p, _p, _int]),
    "zp_dequantize_kquant": (_int, [_int, _p, _i64, _p, _int]),
    "zp_legacy_available": (_int, []),
    "zp_quantize_legacy": (_i64, [_int, _p, _i64, _p, _p, _int]),
    "zp_dequantize_legacy": (_int, [_int, _p, _i64, _p, _int]),
    "zp_requantize_legacy": (_i64, [_int, _p, _int, _i64, _p, _p]),
    "zp_quantize_legacy_weighted": (_i64, [_int, _p, _i64, _i64, _p, _p, _p, _int]),
    "zp_iq_set_grid": (_int, [_int, _p, _int, _p, _int]),
    "zp_iq_needs_importance": (_int, [_int]),
    "zp_quantize_iquant": (_int, [_int, _p, _i64, _i64, _p, _p, _int]),
    "zp_dequantize_iquant": (_int, [_int, _p, _i64, _p, _int]),
    "zp_skip_strings": (_i64, [_p, _i64, _i64, _i64]),
    "zp_gemv_has_path": (_int, [_int]),
    "zp_gemv_q8": (None, [_p, _p, _p, _p, _i64, _i64, _int, _int]),
    "zp_gemv_q4": (None, [_p, _p, _p, _p, _p, _i64, _i64, _i64, _int, _int, _int]),
    "zp_add_rmsnorm": (None, [_p, _p, _p, _f32, _i64, _p]),
    "zp_silu_mul": (None, [_p, _p, _i64]),
    "zp_decoder_attend": (None, [_p, _p, _p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _f32,
                                 _f32, _f32, _i64, _p, _p]),
    "zp_gelu_tanh_mul": (None, [_p, _p, _i64]),
}


class CompileError(RuntimeError):
    """The C compiler failed; the message carries the start of what it said."""


def cflags() -> list[str]:
    """The flags for this machine: BASE_CFLAGS and its CPU's own instructions."""
    machine = _machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        # Full-width vectors (512-bit where the CPU has them) measured 1.5x faster than gcc's
        # default 256-bit choice; the flag exists on x86 only.
        return [*BASE_CFLAGS, "-march=native", "-mprefer-vector-width=512"]
    if machine in ("aarch64", "arm64") or machine.startswith(("arm", "ppc", "powerpc")):
        return [*BASE_CFLAGS, "-mcpu=native"]  # what gcc and clang take for the host CPU there
    return list(BASE_CFLAGS)  # elsewhere the compiler's baseline: -march=native is not portable


def _cpu_signature() -> str:
    # -march=native code from one CPU may not run on another sharing the same home folder.
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return _machine() + flags


def _machine() -> str:
    """platform.machine(), without importing platform (1 ms of a GGUF copy's 0.1 s)."""
    if hasattr(os, "uname"):
        return os.uname().machine
    import platform

    return platform.machine()


def _torch_root() -> Path | None:
    """torch's package folder, found without importing torch; None where it is not installed."""
    module = sys.modules.get("torch")
    if module is not None:
        return Path(module.__file__).resolve().parent
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]).resolve()


def _torch_folders(root: Path) -> tuple[Path, Path]:
    return root / "lib", root.parent / "torch.libs"  # a CPU wheel's, a manylinux wheel's


def _torch_openmp() -> list[str]:
    """Flags that build the kernels with OpenMP on the runtime torch itself uses (see
    csrc/parallel.h), or [] when that runtime cannot be told apart: a second runtime would keep
    a second team of threads spinning on the same cores. Other packages bring their own libgomp
    (sentencepiece does), so the one to use is the one in torch's own folders, else the only one
    loaded. The library is linked against that very file, and --as-needed drops the compiler's
    own libgomp, which it then does not need.

    Where torch is installed but not imported, its libgomp is loaded here, globally, as torch
    would load it: the library finds it by its soname, and a torch imported later finds it loaded
    and uses it too, so the process still has one runtime and the flags (the cache key) are
    those of a process that imported torch first. Without torch, the compiler's own OpenMP."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return []
    root = _torch_root()
    if root is not None and "torch" not in sys.modules:
        return _preload_torch_openmp(root)
    loaded = {Path(line.split()[-1]) for line in maps.splitlines() if "/libgomp" in line}
    if root is None:
        return ["-fopenmp"] if not loaded else []
    owned = [p for p in loaded if p.resolve().parent in _torch_folders(root)]
    found = owned if owned else list(loaded)
    return ["-fopenmp", str(found[0]), "-Wl,--as-needed"] if len(found) == 1 else []


def _preload_torch_openmp(root: Path) -> list[str]:
    # listdir, not glob: compiling glob's pattern took longer than the rest of loading.
    found = [d / name for d in _torch_folders(root) if d.is_dir() for name in sorted(os.listdir(d))
             if name.startswith("libgomp") and ".so" in name]
    if len(found) != 1:
        return []
    try:
        ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return []
    return ["-fopenmp", str(found[0]), "-Wl,--as-needed"]


@contextmanager
def _build_lock(cache: Path):
    """Hold the cache folder's lock: one process compiles, any other waits for its library."""
    if fcntl is None:
        yield
        return
    with open(cache / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(cache: Path, source: bytes, cc: str, extra: list[str]) -> Path:
    flags = cflags()
    build = " ".join([cc, *flags, *extra, _cpu_signature()]).encode()
    key = _cache_key(source + build)
    target = cache / f"kernels-{key}.so"
    if target.exists():
        _mark_used(target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache):
        if not target.exists():  # else another process built it while this one waited
            _run_compiler([cc, *flags], extra, cache, target)
            _prune(cache, keep=target)
    return target


def _cache_key(blob: bytes) -> str:
    """16 hex digits that change with `blob` (sources and build line): two 32-bit checksums.
    A cache key, not a defence against anyone: hashlib's OpenSSL took 2 ms to load, at every
    start of every process that uses the kernels."""
    return f"{zlib.crc32(blob):08x}{zlib.adler32(blob):08x}"


def _run_compiler(command: list[str], extra: list[str], cache: Path, target: Path) -> None:
    """Compile SOURCES into target (atomically: no process sees a half-written library)."""
    import subprocess  # only for a build: a process that loads the cached library never needs
    import tempfile  # these two (a GGUF copy imports little more than this module)

    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", tmp, *map(str, SOURCES), *extra],
                              capture_output=True, text=True, timeout=_COMPILE_SECONDS)
        if done.returncode:
            raise CompileError(f"{command[0]} exited with status {done.returncode}: "
                               f"{_first_lines(done.stderr or done.stdout)}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _first_lines(text: str) -> str:
    lines = text.strip().splitlines()
    shown = "\n".join(lines[:_MESSAGE_LINES])
    more = len(lines) - _MESSAGE_LINES
    return shown + (f"\n... ({more} more lines)" if more > 0 else "")


def _mark_used(library: Path) -> None:
    """Record a use in the library's mtime, which _prune reads."""
    try:
        os.utime(library)
    except OSError:  # a read-only cache: nothing is pruned there either
        pass


def _prune(cache: Path, keep: Path) -> None:
    """Remove the libraries of other keys (older sources, other flags or compilers) that no
    process has used for _UNUSED_SECONDS, and the temporary files of builds killed long ago. The
    grace keeps two checkouts or environments that share the cache from rebuilding each other's
    library at every switch. A process that loaded a removed library keeps it: the file's
    mapping lives until that process exits."""
    now = time.time()
    for pattern, unused in (("kernels-*.so", _UNUSED_SECONDS),
                            (".kernels-*.so", 5 * _COMPILE_SECONDS)):
        for path in cache.glob(pattern):
            try:
                if path != keep and path.stat().st_mtime < now - unused:
                    path.unlink()
            except FileNotFoundError:  # another process pruned it first
                pass


def _build(cache: Path) -> Path:
    """The compiled library: with OpenMP where torch has a runtime to share, else serial (also
    when the compiler cannot do OpenMP)."""
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    cc = os.environ.get("CC", "cc")
    openmp = _torch_openmp()
    if openmp:
        try:
            return _compile(cache, source, cc, openmp)
        except CompileError:
            pass
    return _compile(cache, source, cc, [])


def load_library(cache: Path):
    """The library built (once) in folder `cache`, its functions bound; None, with a warning
    that says why (a failed compile's own message), where it cannot be had."""
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except Exception as e:  # no compiler, read-only home, exotic platform: eager path it is
        warnings.warn(f"zeropoint: C kernels unavailable ({e}); using the slower eager path")
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.lru_cache(maxsize=None)
def _library():
    return load_library(Path(os.environ.get("ZEROPOINT_CACHE",
                                            Path.home() / ".cache" / "zeropoint")))


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


def pcq(shape: tuple[int, ...], is_block: tuple[bool, ...]):
    """(P, C, Q) for a block view with at most one scale dimension, else None (eager handles it)."""
    index = [d for d, blk in enumerate(is_block) if not blk]
    if len(index) > 1:
        return None
    if not index:
        return 1, 1, prod(shape)
    k = index[0]
    return prod(shape[:k]), shape[k], prod(shape[k + 1 :])


def host_empty(shape: tuple[int, ...], dtype):
    """An uninitialized CPU torch tensor in numpy's memory (dtype: numpy's or torch's). numpy asks
    the kernel for huge pages on large buffers and keeps freed ones for reuse; torch's fresh 4 KiB
    pages made the first write to a 17 MiB output cost 8 ms, half as long as quantizing 64 MiB
    into it."""
    import numpy as np
    import torch

    if isinstance(dtype, torch.dtype):
        dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.empty(shape, dtype))


def block_quantize(fn, type_id: int, src, n_blocks: int, out):
    """A C block quantizer `fn(type, src, n, out, &why, threads) -> first bad block, or < 0`
    on n_blocks blocks of src into out (contiguous numpy arrays or CPU tensors): (first bad
    block, why), or None when all went well. type_id is the ggml type number (gguf.types'
    GGMLType.id); ValueError for one `fn` lacks."""
    why = ctypes.c_int(0)
    i = fn(type_id, _ptr(src), n_blocks, _ptr(out), ctypes.byref(why), threads(_size(src)))
    if i == -2:
        raise ValueError(f"the C block quantizer has no ggml type {type_id}")
    return None if i < 0 else (i, why.value)


# numpy is not imported here (a GGUF copy loads these kernels without it): a numpy array is
# told from a tensor by what it has, a tensor's data_ptr() and numel().


def _ptr(a):
    """The address of a contiguous numpy array's or CPU tensor's data (None for None)."""
    if a is None:
        return None
    if hasattr(a, "data_ptr"):
        return a.data_ptr()
    return a.ctypes.data


def _size(a) -> int:
    """Elements of a numpy array or a tensor."""
    return a.numel() if hasattr(a, "numel") else a.size


def default_threads() -> int:
    """torch's thread count where torch is loaded; else OMP_NUM_THREADS, else the cores this
    process may run on (what torch would choose on a machine without SMT)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads(n: int) -> int:
    """Threads for a C kernel over n elements (see csrc/parallel.h): torch's own count, but one
    for small work, which one thread finishes before a second would start, and one off the main
    thread: libgomp keeps a team per thread that starts a region, and a second team spinning
    beside torch's left float matmuls 1.8x slower for the rest of the process."""
    if n < PARALLEL_MIN_ELEMENTS or threading.current_thread() is not threading.main_thread():
        return 1
    return default_threads()


def quantize(lib, xv, codes, view, scale, zero_point, qmin, qmax) -> bool:
    """Fill `codes` (view-shaped, 1-byte dtype) from float32 `xv`. Returns True on NaN/Inf."""
    P, C, Q = pcq(view.shape, view.is_block)
    return bool(lib.zp_quantize_f32(_ptr(xv), _ptr(codes), P, C, Q, _ptr(scale), _ptr(zero_point),
                                    qmin, qmax, threads(_size(xv))))


def dequantize(lib, codes, out, view, scale, zero_point) -> None:
    P, C, Q = pcq(view.shape, view.is_block)
    signed = int(str(codes.dtype) in ("int8", "torch.int8"))
    lib.zp_dequantize_f32(_ptr(codes), signed, _ptr(out), P, C, Q, _ptr(scale), _ptr(zero_point),
                          threads(_size(codes)))


def fit_float_min(lib, rows, qmin, qmax, steps, half, scale, zero) -> None:
    """calibrate/fit.py's search over float32 rows (blocks, n), in place on scale and zero."""
    import torch

    steps = torch.tensor(steps, dtype=torch.float32)
    blocks, n = rows.shape
    if lib.zp_fit_float_min(_ptr(rows), blocks, n, qmin, qmax, _ptr(steps), steps.numel(),
                            int(half), _ptr(scale), _ptr(zero), threads(_size(rows))):
        raise ValueError(f"the fit takes blocks of 1..256 values, got {n}")


def min_max(lib, xv, view):
    """Per-block (lo, hi) as flat float32 tensors, and whether a NaN/Inf was seen."""
    import torch

    P, C, Q = pcq(view.shape, view.is_block)
    lo, hi = torch.empty(C), torch.empty(C)
    bad = lib.zp_minmax_f32(_ptr(xv), P, C, Q, _ptr(lo), _ptr(hi), threads(_size(xv)))
    if bad < 0:
        raise MemoryError("zeropoint: no memory for the per-thread block minima")
    return lo, hi, bool(bad)
