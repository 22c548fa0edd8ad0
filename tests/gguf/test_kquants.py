"""zeropoint's K-quants (Q2_K .. Q6_K) against llama.cpp itself, byte for byte, and against
gguf-py's dequantize, bit for bit.

Oracles: llama_model_quantize on a float32 GGUF (what users run), and for many small cases the
same library's quantize_row_q*_K_ref, which that call reaches for these types without an
importance matrix. Both the C fast path and the eager torch path are held to them.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import zeropoint.gguf.kquants as kquants
from zeropoint import ckernels
from zeropoint.gguf import dequantize_blocks, ggml_type, quantize_blocks
from zeropoint.gguf.kquants_search import nearest_int

llama_cpp = pytest.importorskip("llama_cpp")

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# llama_ftype for each: Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K. With `pure` set, every quantizable
# tensor gets the mix's base type (no per-tensor upgrades); the test still checks each type.
FTYPE = {"Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}


def gguf_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def assert_same_blocks(ours: np.ndarray, ref: np.ndarray, qtype: str, what: str) -> None:
    """Equal bytes, or a message naming how many blocks differ, the first, and both in hex."""
    size = ggml_type(qtype).type_size
    ours_b, ref_b = ours.reshape(-1, size), ref.reshape(-1, size)
    assert ours_b.shape == ref_b.shape
    differing = np.flatnonzero((ours_b != ref_b).any(axis=1))
    if differing.size:
        i = int(differing[0])
        pytest.fail(
            f"{qtype} {what}: {differing.size} of {len(ref_b)} blocks differ; first is block {i}\n"
            f"  zeropoint: {ours_b[i].tobytes().hex(' ')}\n"
            f"  llama.cpp: {ref_b[i].tobytes().hex(' ')}"
        )


def quantize_np(x: np.ndarray, qtype: str) -> np.ndarray:
    return quantize_blocks(torch.from_numpy(np.ascontiguousarray(x, np.float32)), qtype).numpy()


def quantize_eager(x: np.ndarray, qtype: str) -> np.ndarray:
    with ckernels.disabled():
        return quantize_np(x, qtype)


# --- test matrices -----------------------------------------------------------------------------


def make_matrices() -> dict[str, np.ndarray]:
    """Rows of 256 multiples; each distribution stresses another part of the searches."""
    rng = np.random.default_rng(0)
    sparse = rng.standard_normal((64, 1536)) * (rng.random((64, 1536)) < 0.1)
    const = np.repeat(rng.standard_normal((32, 1)), 1024, 1)
    const[:4] = 0.0
    tiny = rng.standard_normal((64, 1536)) * 10.0 ** rng.integers(-44, -3, (64, 1))  # to subnormal
    outliers = rng.standard_normal((64, 1536))
    outliers[rng.random(outliers.shape) < 0.005] *= 80
    sub_const = np.repeat(rng.standard_normal((64 * 96, 1)), 16, 1).reshape(64, 1536)
    half_grid = rng.integers(-64, 64, (64, 1024)) / 2
    half_grid.reshape(-1, 16)[:, 0] = -32  # the same largest |x| everywhere: exact .5 ties
    return {
        "normal": rng.standard_normal((64, 1536)),
        "heavy_tails": rng.standard_t(1.5, (128, 4096)).clip(-3e4, 3e4),
        "many_zeros": sparse,
        "constant_rows": const,
        "tiny": tiny,
        "integers": rng.integers(-8, 9, (64, 1024)).astype(np.float64),  # ties everywhere
        "halves": rng.integers(-20, 21, (64, 1024)) / 2,
        "shifted": rng.laplace(size=(64, 1536)) + 3 * rng.standard_normal((64, 1)),
        "outliers": outliers,
        "few_values": rng.choice([-1.0, 0.0, 0.5, 2.0], (64, 1024)),
        "constant_sub_blocks": sub_const,
        "half_grid": half_grid,
    }


MATRICES = {name: x.astype(np.float32) for name, x in make_matrices().items()}


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal llama-architecture GGUF that llama_model_quantize accepts."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(len(tensors))
    w.add_context_length(256)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all float32
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory):
    """{qtype: {matrix name: (type name, bytes)}}: llama.cpp's quantization of MATRICES."""
    tmp = tmp_path_factory.mktemp("kquants")
    names = {f"blk.{i}.ffn_down.weight": name for i, name in enumerate(MATRICES)}
    write_f32_gguf(tmp / "f32.gguf", {t: MATRICES[n] for t, n in names.items()})
    log = logging.getLogger("llama-cpp-python")
    saved, results = log.level, {}
    log.setLevel(logging.ERROR)  # llama.cpp logs every tensor otherwise
    try:
        for qtype in TYPES:
            params = llama_cpp.llama_model_quantize_default_params()
            params.nthread, params.ftype, params.pure = 2, FTYPE[qtype], True
            dst = tmp / f"{qtype}.gguf"
            assert llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(),
                                                  str(dst).encode(), params) == 0
            reader = gguf.GGUFReader(dst)
            results[qtype] = {names[t.name]: (t.tensor_type.name, np.array(t.data))
                              for t in reader.tensors}
    finally:
        log.setLevel(saved)
    return results


# --- llama.cpp's own library, called directly, for many small cases --------------------------


def _ggml_base():
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("libggml-base.*")):
        try:
            lib = ctypes.CDLL(str(path))
            lib.quantize_row_q4_K_ref  # noqa: B018 -- present in this build?
            return lib
        except (OSError, AttributeError):
            continue
    return None


GGML_BASE = _ggml_base()
needs_ref = pytest.mark.skipif(GGML_BASE is None, reason="libggml-base with *_K_ref not found")


def reference(x: np.ndarray, qtype: str) -> np.ndarray:
    """quantize_row_q*_K_ref of llama.cpp's own build: (rows, n) -> (rows, n/256*size) bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // 256 * ggml_type(qtype).type_size, np.uint8)
    fn = getattr(GGML_BASE, f"quantize_row_{qtype[:2].lower()}_K_ref")
    fn(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(x.size))
    return out.reshape(*x.shape[:-1], -1)


# --- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_sizes_match_ggml(qtype):
    ours = ggml_type(qtype)
    assert (ours.block_size, ours.type_size) == GGML_QUANT_SIZES[gguf_type(qtype)]


# --- quantize: bytes equal to llama_model_quantize -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
def test_same_bytes_as_llama_model_quantize(qtype, llama_quantized):
    for name, x in MATRICES.items():
        got_type, ref = llama_quantized[qtype][name]
        assert got_type == qtype, f"llama.cpp wrote {name} as {got_type}, not {qtype}"
        assert_same_blocks(quantize_np(x, qtype), ref, qtype, name)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
def test_eager_path_same_bytes_as_llama_model_quantize(qtype, llama_quantized):
    # The first rows of each matrix: the eager path is the slow reference implementation.
    for name, x in MATRICES.items():
        rows = max(1, 1024 // x.shape[1])
        ref = llama_quantized[qtype][name][1][:rows]
        assert_same_blocks(quantize_eager(x[:rows], qtype), ref, qtype, f"{name} (eager)")


def test_nearest_int_rounds_half_to_even_and_wraps_like_ggml():
    # In range: round half to even (np.rint). Beyond 2^22: ggml's low-mantissa-bits result.
    v = np.concatenate([np.arange(-300, 300) / 2, [2.5, -2.5, 4194303.0, -4194303.5]])
    ours = nearest_int(torch.from_numpy(v.astype(np.float32))).numpy()
    assert np.array_equal(ours, np.rint(v).astype(np.int32))
    big = np.float32(3e7)  # 3e7 + 1.5 * 2^23 is exact: mantissa bits of the sum, less 2^22
    wrapped = ((big + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    assert int(nearest_int(torch.tensor([big]))[0]) == wrapped


# --- quantize: many small cases against the library's *_K_ref --------------------------------

finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, 1e-45, -1e-38, 2.0**-14, 7.5])
superblocks = st.integers(1, 3).flatmap(
    lambda n: hnp.arrays(np.float32, (n, 256), elements=st.one_of(finite32, special)))


@needs_ref
@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=25, deadline=None)
@given(x=superblocks, scale=st.sampled_from([1.0, 1e-3, 1e-30, 3.0]))
def test_property_matches_llama_cpp_and_gguf_dequantize(qtype, x, scale):
    x = x * np.float32(scale)
    ref = reference(x, qtype)
    ours = quantize_np(x, qtype)
    assert_same_blocks(ours, ref, qtype, "C path")
    assert_same_blocks(quantize_eager(x, qtype), ref, qtype, "eager path")
    # Each stored code dequantizes to gguf-py's value, bit for bit.
    values = dequantize_blocks(torch.from_numpy(ours), qtype, x.shape).numpy()
    assert np.array_equal(values.view(np.uint32),
                          gguf_dequantize(ours, gguf_type(qtype)).view(np.uint32))


@needs_ref
@pytest.mark.parametrize("qtype", TYPES)
def test_c_and_eager_paths_agree_past_chunks_and_threads(qtype, monkeypatch):
    # Chunks of 3 super-blocks (eager), and three ranges of the C kernel's 256 super-blocks on
    # two threads: every seam, and an odd count, which the two-at-a-time search of Q4_K/Q5_K
    # pads.
    monkeypatch.setattr(kquants, "_CHUNK", 3)
    monkeypatch.setattr(ckernels, "PARALLEL_MIN_ELEMENTS", 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    rng = np.random.default_rng(3)
    n = 2 * 256 + 19
    x = (rng.standard_normal((n, 256)) * rng.choice([1e-3, 1.0, 50.0], (n, 1))).astype(np.float32)
    x[4] = 0.0
    ref = reference(x, qtype)
    assert_same_blocks(quantize_np(x, qtype), ref, qtype, "C path")
    assert_same_blocks(quantize_eager(x, qtype), ref, qtype, "eager path")


@pytest.mark.parametrize("qtype", TYPES)
def test_shapes_dtypes_and_layout(qtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 2, 512)).astype(np.float32)
    ours = quantize_blocks(torch.from_numpy(x), qtype)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (3, 2, 2 * ggml_type(qtype).type_size)
    flat = quantize_np(x.reshape(-1, 256), qtype).reshape(3, 2, -1)
    assert np.array_equal(ours.numpy(), flat)  # super-blocks are independent of the shape
    # float64 is rounded to float32 first; a non-contiguous view is fine.
    assert np.array_equal(quantize_np(x.astype(np.float64), qtype), ours.numpy())
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 1, 0))).transpose(0, 2)
    assert not xt.is_contiguous()
    assert np.array_equal(quantize_blocks(xt, qtype).numpy(), ours.numpy())


# --- dequantize: bit for bit with gguf-py ------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_arbitrary_bytes(qtype, either_path):
    # Every code and scale pattern, with random finite fp16 super-scales; csrc/kdequant.c and
    # the torch code.
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, size=(256, ggml_type(qtype).type_size), dtype=np.uint8)
    for col in kquants.K_FORMATS[qtype].half_offsets:
        data[:, col : col + 2] = rng.uniform(-100, 100, (256, 1)).astype(np.float16).view(np.uint8)
    ours = dequantize_blocks(torch.from_numpy(data), qtype, (16, 16 * 256)).numpy()
    ref = gguf_dequantize(data.reshape(16, -1), gguf_type(qtype))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error_is_small(qtype):
    # Sanity on top of the byte equality: more bits, less error; 6 bits is close.
    x = np.random.default_rng(12).standard_normal((16, 1024)).astype(np.float32)
    back = dequantize_blocks(torch.from_numpy(quantize_np(x, qtype)), qtype, x.shape).numpy()
    rmse = float(np.sqrt(np.mean((back - x) ** 2)))
    assert rmse < {"Q2_K": 0.45, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]


# --- errors ------------------------------------------------------------------------------------


def test_unknown_type_lists_k_types():
    with pytest.raises(ValueError, match="accepted: .*Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"):
        quantize_blocks(torch.zeros(256), "Q4_K_M")


@pytest.mark.parametrize("qtype", TYPES)
def test_row_length_must_be_a_multiple_of_256(qtype):
    with pytest.raises(ValueError, match=f"multiple of {qtype}'s block size 256, got 576"):
        quantize_blocks(torch.zeros(2, 576), qtype)
    one_block = torch.zeros(ggml_type(qtype).type_size, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block size 256"):
        dequantize_blocks(one_block, qtype, (128, 2))


@pytest.fixture(params=["C", "eager"])
def either_path(request):
    """Runs the test once with the C kernel (where it compiles) and once with the eager path."""
    if request.param == "C":
        yield
    else:
        with ckernels.disabled():
            yield


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_block(qtype, bad, either_path):
    x = torch.zeros(2, 768)
    x[1, 300] = bad  # super-block 4: past an odd count of Q4_K/Q5_K's pairs
    with pytest.raises(ValueError, match="finite; block 4"):
        quantize_blocks(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_first_bad_super_block_is_named_when_threads_split_the_work(qtype, monkeypatch):
    # Ranges of 256 super-blocks on two threads, bad ones in the second and third range (the
    # third's may well finish first): the error names the earliest.
    monkeypatch.setattr(ckernels, "PARALLEL_MIN_ELEMENTS", 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(3 * 256 + 5, 256, generator=torch.Generator().manual_seed(4))
    x[600, 9] = float("nan")
    x[301, 0] = 1e12  # overflows the fp16 super-scale
    x[300, 7] = float("inf")
    with pytest.raises(ValueError, match="finite; block 300"):
        quantize_blocks(x, qtype)
    x[300, 7] = 0.0
    with pytest.raises(ValueError, match=f"{qtype} block 301: its scale or minimum overflows"):
        quantize_blocks(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_fp16_overflow_of_super_scale_is_refused(qtype, either_path):
    x = torch.zeros(3, 256)
    x[1, :128] = 1e12
    with pytest.raises(ValueError, match=f"{qtype} block 1: its scale or minimum overflows"):
        quantize_blocks(x, qtype)
