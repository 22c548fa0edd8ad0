"""The legacy blocks' C kernels (csrc/legacy.c) against the torch code and gguf-py: the same bytes,
the same floats and the same errors on awkward input, split over threads or not."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from zeropoint import ckernels
from zeropoint.gguf import ggml_type, blocks, dequantize_blocks, quantize_blocks

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
WITH_MIN = {"Q4_1", "Q5_1"}
GRID_SPAN = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16, "Q4_1": 15, "Q5_1": 31}  # |x| / d at the max
FP16_MAX = 65504.0

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.skipif(blocks._legacy_library() is None,
                       reason="the C kernels did not build here (no compiler, or no _Float16)"),
]


@pytest.fixture
def threads():
    """Set torch's thread count (the C kernels split blocks into one piece per thread)."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def both_paths(fn):
    """(result on the C kernels, result on the torch code); an exception counts as a result."""
    def attempt():
        try:
            return fn()
        except ValueError as e:
            return f"ValueError: {e}"
    c = attempt()
    with ckernels.disabled():
        eager = attempt()
    return c, eager


def first_differing_block(a: np.ndarray, b: np.ndarray, qtype: str) -> str:
    a, b = a.reshape(-1, ggml_type(qtype).type_size), b.reshape(-1, ggml_type(qtype).type_size)
    i = int(np.flatnonzero((a != b).any(axis=1))[0])
    return f"block {i}: C {a[i].tobytes().hex(' ')} vs torch {b[i].tobytes().hex(' ')}"


def awkward_blocks(qtype: str, rng) -> np.ndarray:
    """(n, 32) float32 blocks at every edge the kernels treat specially."""
    span = GRID_SPAN[qtype]
    zeros = np.zeros((4, 32), np.float32)
    zeros[1] = -0.0  # all -0.0
    zeros[2, 5:] = -0.0  # +0.0 first, then -0.0
    zeros[3, 0] = -0.0  # -0.0 first, then +0.0
    ties = rng.integers(-2 * span, 2 * span + 1, (64, 32)) / 2  # x / d on every .5
    ties[:, 0] = span
    ties[::2, 3] = -span  # +max and -max in one block: the first wins
    ties[1::4, 0] = -span  # -max first
    negative = -np.abs(rng.standard_normal((8, 32)))  # all negative: max is the closest to 0
    negative[:4, 7] = -0.0  # ... or -0.0
    positive = np.abs(rng.standard_normal((8, 32)))
    positive[:4, 9] = 0.0  # min is 0.0
    # 1/d overflows float32 below ~1e-37: every code is 0; d and m are fp16 subnormals or 0.
    tiny = rng.standard_normal((16, 32)) * np.repeat([1e-36, 1e-38, 1e-40, 1e-45], 4)[:, None]
    # d on fp16's subnormal steps and at its smallest normal, where rounding to fp16 is coarse.
    fp16_edges = rng.integers(-span, span + 1, (16, 32)) * np.repeat(
        [2.0**-24, 2.0**-20, 2.0**-14, 3 * 2.0**-25], 4)[:, None]
    # The largest values whose d (and m) still fit fp16, and 2^-1 ulp below overflow.
    top = FP16_MAX * span
    if qtype in WITH_MIN:  # d = (max - min) / span and m = min must both fit
        large = rng.uniform(-FP16_MAX, top - FP16_MAX, (4, 32))
        large[:, 0] = -FP16_MAX
        large[:, 1] = top - FP16_MAX - np.array([0, 1, 2, 16])
    else:
        large = rng.uniform(-1, 1, (4, 32)) * top
        large[:, 0] = [top, -top, np.nextafter(np.float32(top), 0), -FP16_MAX]
    constant = np.repeat([[3.0], [-0.75], [1e-3], [-7.0]], 32, axis=1)
    return np.concatenate([zeros, ties, negative, positive, tiny, fp16_edges, large,
                           constant]).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_awkward_blocks_same_bytes_on_both_paths_and_in_gguf(qtype, n_threads, threads):
    threads(n_threads)
    rng = np.random.default_rng(20)
    # Repeated past PARALLEL_MIN_ELEMENTS, so the C kernels split the blocks over threads.
    one = awkward_blocks(qtype, rng)
    reps = -(-ckernels.PARALLEL_MIN_ELEMENTS // one.size) + 1
    x = np.concatenate([one] * reps + [rng.standard_normal((5, 32))]).astype(np.float32)
    c, eager = both_paths(lambda: quantize_blocks(torch.from_numpy(x), qtype).numpy())
    assert not isinstance(c, str), c
    assert np.array_equal(c, eager), first_differing_block(c, eager, qtype)
    # gguf-py agrees wherever its answer is stable (a _1 type's mixed-zero min is not).
    stable = x + np.float32(0.0) if qtype in WITH_MIN else x
    ref = gguf_quantize(stable, gguf.GGMLQuantizationType[qtype])
    ours = quantize_blocks(torch.from_numpy(stable), qtype).numpy()
    assert np.array_equal(ours, ref), first_differing_block(ours, ref, qtype)


def refused_input(qtype: str, kind: str, block: int, n_blocks: int) -> torch.Tensor:
    x = torch.randn(n_blocks, 32, generator=torch.Generator().manual_seed(21))
    if kind == "overflow":  # d (or m) one fp16 step past the largest finite half
        x[block, 3] = 65520.0 * GRID_SPAN[qtype] * 1.001
    else:
        x[block, 31] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "overflow"])
@pytest.mark.parametrize("where", ["first", "second piece", "last"])
def test_refusals_are_the_same_on_both_paths(qtype, kind, where, threads):
    threads(2)
    n = 2 * ckernels.PARALLEL_MIN_ELEMENTS // 32 + 7  # three ranges in C, two chunks in torch
    block = {"first": 0, "second piece": n // 2 + 3, "last": n - 1}[where]
    x = refused_input(qtype, kind, block, n)
    if block + 5 < n:
        x[block + 5, 0] = float("nan")  # a later bad block too: the first one is reported
    c, eager = both_paths(lambda: quantize_blocks(x, qtype))
    assert isinstance(c, str) and c == eager, (c, eager)
    assert f"block {block}:" in c or f"block {block} " in c
    assert ("overflows float16" in c) == (kind == "overflow")


@pytest.mark.parametrize("qtype", TYPES)
def test_overflow_threshold_is_the_same_on_both_paths(qtype):
    # d = max / span rounds to fp16 65504 below 65520 and to inf from it: walk across that edge.
    base = np.float32(65520.0 * GRID_SPAN[qtype])
    edge = [base * np.float32(1 + k * 1e-7) for k in range(-8, 9)]
    for v in edge:
        x = torch.zeros(1, 32)
        x[0, 2] = float(v)  # d = v / span (min and m are 0)
        c, eager = both_paths(lambda: quantize_blocks(x, qtype).numpy())
        if isinstance(c, str) or isinstance(eager, str):
            assert c == eager, (v, c, eager)
        else:
            assert np.array_equal(c, eager), (v, c, eager)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_special_halves_same_on_both_paths(qtype, threads):
    threads(2)
    rng = np.random.default_rng(22)
    n = ckernels.PARALLEL_MIN_ELEMENTS // 32 * 2 + 3  # split over two threads
    data = rng.integers(0, 256, size=(n, ggml_type(qtype).type_size), dtype=np.uint8)
    halves = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), np.inf, -np.inf,
                       np.nan], np.float16)
    n_fields = 2 if qtype in WITH_MIN else 1
    data[:, : 2 * n_fields] = rng.choice(halves, (n, n_fields)).view(np.uint8)
    c, eager = both_paths(lambda: dequantize_blocks(torch.from_numpy(data), qtype,
                                                    (n, 32)).numpy())
    assert np.array_equal(np.isnan(c), np.isnan(eager))
    finite = ~np.isnan(c)
    diff = np.flatnonzero(c[finite].view(np.uint32) != eager[finite].view(np.uint32))
    assert not diff.size, f"{diff.size} values differ, first {c[finite][diff[0]]!r}"


# --- transcode_blocks: legacy -> legacy in one pass ---------------------------------------------


def gguf_py_transcode(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """The oracle: gguf-py's numpy dequantize to float32, then its quantize. A _1 type's m is
    the block min, and when that is a zero numpy's SIMD min gives it the sign of whichever zero
    its lanes met last; ggml's C loop keeps the block's first zero. Giving every zero of a block
    the first zero's sign makes gguf-py's answer stable, and ggml's."""
    x = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[src]).astype(np.float32)
    x = x.reshape(-1, 32)
    if dst in WITH_MIN:
        zero = x == 0
        first = x[np.arange(len(x)), zero.argmax(axis=1)]  # the first zero where there is one
        x = np.where(zero, first[:, None], x)
    return gguf_quantize(x, gguf.GGMLQuantizationType[dst]).reshape(-1)


@pytest.mark.parametrize("src", TYPES)
@pytest.mark.parametrize("dst", TYPES)
def test_transcode_matches_gguf_py(src, dst):
    rng = np.random.default_rng(23)
    # Random bytes for src make blocks of every sign, zero and tie pattern; the fp16 fields are
    # set to finite values (of every magnitude) so that the floats are finite. 16-block groups
    # and a tail: 16 * 9 + 7 blocks.
    n = 16 * 9 + 7
    raw = rng.integers(0, 256, size=(n, ggml_type(src).type_size), dtype=np.uint8)
    n_fields = 2 if src in WITH_MIN else 1
    halves = (rng.standard_normal((n, n_fields)) * 10.0 ** rng.integers(-6, 2, (n, 1)))
    halves[:5] = 0.0  # d = 0 (and m = 0): constant blocks
    raw[:, : 2 * n_fields] = halves.astype(np.float16).view(np.uint8)
    # Blocks quantized from awkward floats, as a model file holds them, after the random ones.
    # (Only those every type can store: |x| near src's fp16 limit overflows a narrower dst.)
    floats = awkward_blocks(src, rng)
    floats = floats[np.abs(floats).max(axis=1) < FP16_MAX]
    awkward = quantize_blocks(torch.from_numpy(floats), src).numpy()
    raw = np.concatenate([raw, awkward.reshape(-1, ggml_type(src).type_size)]).reshape(-1)
    ours = blocks.transcode_blocks(torch.from_numpy(raw), src, dst).numpy()
    ref = gguf_py_transcode(raw, src, dst)
    assert np.array_equal(ours, ref), first_differing_block(ours, ref, dst)


def test_transcode_into_a_buffer_and_refusals():
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(24))
    raw = quantize_blocks(x, "Q4_1").view(-1)
    buf = torch.full((40 * ggml_type("Q8_0").type_size,), 7, dtype=torch.uint8)
    assert blocks.transcode_blocks(raw, "Q4_1", "Q8_0", out=buf) is buf
    assert np.array_equal(buf.numpy(), gguf_py_transcode(raw.numpy(), "Q4_1", "Q8_0"))
    with pytest.raises(ValueError, match="out must be a contiguous flat uint8 tensor of 1360"):
        blocks.transcode_blocks(raw, "Q4_1", "Q8_0", out=buf[:-1])
    with pytest.raises(ValueError, match="whole Q4_1 blocks"):
        blocks.transcode_blocks(raw[:-1], "Q4_1", "Q8_0")
    with pytest.raises(ValueError, match="two legacy types .* got Q4_1 -> Q4_K"):
        blocks.transcode_blocks(raw, "Q4_1", "Q4_K")
    # Q8_0 stores |x| up to 127 * 65504; Q4_0's d = max / 8 overflows fp16 long before that.
    x[21, 5] = 127 * 60000.0
    with pytest.raises(ValueError, match=r"Q4_0 block 21: its scale .* overflows float16"):
        blocks.transcode_blocks(quantize_blocks(x, "Q8_0").view(-1), "Q8_0", "Q4_0")


# --- the portable build: what CPUs without AVX-512 run ------------------------------------------


@pytest.fixture(scope="module", params=[["-mno-avx512f"], ["-march=x86-64", "-mtune=generic"]],
                ids=["no-avx512", "x86-64"])
def portable_library(tmp_path_factory, request):
    """legacy.c built as ckernels builds it, but without AVX-512 (AVX2 and F16C stay), or for
    plain x86-64 (SSE2 only): the explicit vector code (the 16-block min/max tree, the fp16
    conversions) is replaced by plain loops there, which this machine's own build never runs."""
    import ctypes
    import shutil
    import subprocess

    if "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("no AVX-512 here: the main build already is the portable one")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler {cc!r}")
    so = tmp_path_factory.mktemp("portable") / f"legacy{len(request.param)}.so"
    sources = [str(p) for p in ckernels.SOURCES if p.name in ("legacy.c", "parallel.c")]
    subprocess.run([cc, *ckernels.cflags(), *request.param, "-o", str(so), *sources],
                   check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(so))
    if not lib.zp_legacy_available():
        pytest.skip("this compiler has no _Float16")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.zp_quantize_legacy.argtypes = [i32, p, i64, p, p, i32]
    lib.zp_requantize_legacy.argtypes = [i32, p, i32, i64, p, p]
    lib.zp_quantize_legacy.restype = lib.zp_requantize_legacy.restype = i64
    return lib


@pytest.mark.parametrize("qtype", TYPES)
def test_portable_build_matches_gguf_py(portable_library, qtype):
    import ctypes

    rng = np.random.default_rng(25)
    floats = awkward_blocks(qtype, rng)
    x = np.concatenate([floats, rng.standard_normal((16 * 8 + 3, 32))]).astype(np.float32)
    x = x + np.float32(0.0) if qtype in WITH_MIN else x  # gguf-py's unstable zero min, as above
    n, type_id, why = len(x), ggml_type(qtype).id, ctypes.c_int(0)
    out = np.zeros(n * ggml_type(qtype).type_size, np.uint8)
    assert portable_library.zp_quantize_legacy(type_id, x.ctypes.data, n, out.ctypes.data,
                                               ctypes.byref(why), 1) == -1
    ref = gguf_quantize(x, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    assert np.array_equal(out, ref), first_differing_block(out, ref, qtype)
    # And legacy -> legacy in one pass, from Q4_1 blocks.
    raw = gguf_quantize(rng.standard_normal((16 * 8 + 3, 32)).astype(np.float32),
                        gguf.GGMLQuantizationType.Q4_1).reshape(-1)
    n = raw.size // ggml_type("Q4_1").type_size
    out = np.zeros(n * ggml_type(qtype).type_size, np.uint8)
    assert portable_library.zp_requantize_legacy(ggml_type("Q4_1").id, raw.ctypes.data, type_id,
                                                 n, out.ctypes.data, ctypes.byref(why)) == -1
    ref = gguf_py_transcode(raw, "Q4_1", qtype)
    assert np.array_equal(out, ref), first_differing_block(out, ref, qtype)
