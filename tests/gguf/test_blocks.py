"""zeropoint.gguf.blocks against gguf-py's gguf.quants, byte for byte and bit for bit."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zeropoint import ckernels
from zeropoint.gguf import blocks, dequantize_blocks, ggml_type, quantize_blocks

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
WITH_MIN = {"Q4_1", "Q5_1"}
FP16_MAX = 65504.0

# gguf-py warns on blocks whose 1/d overflows (and then 0 * inf); those are expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


@pytest.fixture(autouse=True, params=["c", "torch"])
def kernel(request):
    """Every test here runs twice: on the C kernels (csrc/legacy.c) and on the torch code."""
    if request.param == "torch":
        with ckernels.disabled():
            yield request.param
        return
    if blocks._legacy_library() is None:
        pytest.skip("the C kernels did not build here (no compiler, or no _Float16)")
    yield request.param


def gguf_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def assert_same_blocks(ours: np.ndarray, ref: np.ndarray, qtype: str) -> None:
    """Equal bytes, or a message naming the first differing block and both byte strings."""
    assert ours.shape == ref.shape, f"shape {ours.shape} != gguf-py's {ref.shape}"
    ours_b = ours.reshape(-1, ggml_type(qtype).type_size)
    ref_b = ref.reshape(-1, ggml_type(qtype).type_size)
    differing = np.flatnonzero((ours_b != ref_b).any(axis=1))
    if differing.size:
        i = int(differing[0])
        pytest.fail(
            f"{qtype}: {differing.size} of {len(ref_b)} blocks differ; first is block {i}\n"
            f"  zeropoint: {ours_b[i].tobytes().hex(' ')}\n"
            f"  gguf-py:   {ref_b[i].tobytes().hex(' ')}"
        )


def check_quantize(x: np.ndarray, qtype: str) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    ours = quantize_blocks(torch.from_numpy(x), qtype).numpy()
    assert_same_blocks(ours, gguf_quantize(x, gguf_type(qtype)), qtype)


def assert_bitwise_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """float32 arrays equal bit for bit (so -0.0 != 0.0); names the first differing index."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    if diff.size:
        i = int(diff[0])
        pytest.fail(f"{diff.size} values differ; first at flat index {i}: {ours.flat[i]!r} "
                    f"(zeropoint) vs {ref.flat[i]!r} (gguf-py)")


# --- the table ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_sizes_match_ggml(qtype):
    ours = ggml_type(qtype)
    assert (ours.block_size, ours.type_size) == GGML_QUANT_SIZES[gguf_type(qtype)]


# --- quantize: bytes equal to gguf-py ----------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_random_normal(qtype):
    rng = np.random.default_rng(0)
    check_quantize(rng.standard_normal((256, 4096)), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_heavy_tailed(qtype):
    rng = np.random.default_rng(1)
    check_quantize(rng.standard_t(df=1.5, size=(64, 4096)).clip(-6e4, 6e4), qtype)


# x / d spans [-L, L] for the _0 types (Q8_0: +-127) and [0, L] above m for the _1 types.
GRID_SPAN = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16, "Q4_1": 15, "Q5_1": 31}


def exact_tie_blocks(qtype: str, scale: float, n_blocks: int, rng) -> np.ndarray:
    """Blocks whose step d is exactly +-`scale` and whose values sit on a code or half-way
    between two (x / d = n + 0.5), so every rounding tie-break is exercised."""
    span = GRID_SPAN[qtype]
    if qtype in WITH_MIN:
        halves = rng.integers(0, 2 * span + 1, size=(n_blocks, 32)) / 2  # 0, 0.5, ..., span
        halves[:, 0], halves[:, 1] = 0, span  # min and max pin d = span * scale / span
        offset = rng.integers(-40, 40, size=(n_blocks, 1))  # the minimum m: any integer
        return (halves + offset) * scale
    halves = rng.integers(-2 * span, 2 * span + 1, size=(n_blocks, 32)) / 2  # -span..span
    halves[:, 0] = rng.choice([-span, span], size=n_blocks)  # largest |x|, either sign
    return halves * scale


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("scale", [2.0**-4, 1.0, 2.0**5])
def test_many_exact_ties(qtype, scale):
    # Also +a and -a in one block (the first one must win) and x / d on every .5 in between.
    rng = np.random.default_rng(2)
    check_quantize(exact_tie_blocks(qtype, scale, 4096, rng), qtype)
    check_quantize(rng.integers(-8, 9, size=(128, 1024)) * scale, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_round_half_away_boundaries(qtype):
    # With d = 1 (Q8_0: max 127), x / d is x itself: 0.5 - 2^-25 must round down, 0.5 up.
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    x = np.zeros((2, 32), dtype=np.float32)
    x[:, 0] = 127.0
    x[0, 1:7] = [below_half, -below_half, 0.5, -0.5, 1.5, -2.5]
    x[1, 1:5] = [np.nextafter(np.float32(1.5), np.float32(0)), 126.5, -126.5, 2.0**-24]
    check_quantize(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_and_constant_rows(qtype):
    rows = [np.zeros(256), np.full(256, 3.0), np.full(256, -0.75), np.full(256, 1e-3)]
    check_quantize(np.stack(rows), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_single_nonzero_and_negative_max(qtype):
    x = np.zeros((6, 32 * 8))
    x[0, ::32] = 1.5  # one positive value per block, first position
    x[1, 31::32] = -2.5  # one negative value per block, last position
    rng = np.random.default_rng(3)
    x[2:] = rng.uniform(-1, 1, (4, 256))
    x[2:, 7::32] = -4.0  # the largest magnitude is negative: d = max / -8 flips sign
    x[3, 9::32] = 4.0  # and +4 after -4: the first one (-4) must win
    x[4, 5::32] = 4.0  # +4 before -4: +4 wins
    check_quantize(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("scale", [1e4, 1.0, 1e-5, 1e-20, 1e-36, 1e-38, 1e-40, 1e-45])
def test_large_and_tiny_magnitudes(qtype, scale):
    # Below ~1e-37, 1/d overflows float32 to inf; gguf-py's cast then makes every code 0.
    rng = np.random.default_rng(4)
    check_quantize(rng.standard_normal((8, 256)) * scale, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_signed_zeros_of_one_sign(qtype):
    x = np.zeros((4, 64), dtype=np.float32)
    x[0] = -0.0  # all -0.0
    x[1, 32:] = -0.0
    x[1, 0] = -0.0  # +0.0 and -0.0 mixed, -0.0 first (gguf-py: argmax picks it, d = +0.0)
    x[2] = np.abs(np.random.default_rng(5).standard_normal(64))
    x[2, 3] = -0.0  # min is -0.0
    x[3] = -np.abs(np.random.default_rng(6).standard_normal(64))
    x[3, 3] = -0.0  # max is -0.0
    if qtype in WITH_MIN:
        x[1] = -0.0  # mixed zeros have no stable answer in gguf-py for the _1 types
    check_quantize(x, qtype)


@pytest.mark.parametrize("qtype", sorted(WITH_MIN))
def test_mixed_signed_zero_min_follows_ggml_c(qtype):
    # numpy's SIMD min picks between 0.0 and -0.0 by lane order; ggml's C loop keeps the first.
    x = np.abs(np.random.default_rng(7).standard_normal((2, 32))).astype(np.float32)
    x[0, 4], x[0, 9] = -0.0, 0.0
    x[1, 4], x[1, 9] = 0.0, -0.0
    out = quantize_blocks(torch.from_numpy(x), qtype).numpy()
    assert out[0, 2:4].tobytes() == bytes([0x00, 0x80])  # m = -0.0
    assert out[1, 2:4].tobytes() == bytes([0x00, 0x00])  # m = +0.0
    # Apart from that sign the block is gguf-py's: same d, same codes.
    ref = gguf_quantize(x, gguf_type(qtype))
    assert np.array_equal(np.delete(out, [2, 3], axis=1), np.delete(ref, [2, 3], axis=1))


@pytest.mark.parametrize("qtype", TYPES)
def test_shapes_dtypes_and_layout(qtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32)
    ref = gguf_quantize(x, gguf_type(qtype))
    ours = quantize_blocks(torch.from_numpy(x), qtype)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    assert_same_blocks(ours.numpy(), ref, qtype)
    # float64 input is rounded to float32 first, as gguf-py does; non-contiguous input is fine.
    assert_same_blocks(quantize_blocks(torch.from_numpy(x.astype(np.float64)), qtype).numpy(),
                       ref, qtype)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 1, 0))).transpose(0, 2)
    assert not xt.is_contiguous()
    assert_same_blocks(quantize_blocks(xt, qtype).numpy(), ref, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_more_blocks_than_one_chunk(qtype):
    # 3 chunks and a ragged tail, with ties and an all-zero block past the first chunk.
    import zeropoint.gguf.blocks as blocks_module

    n = blocks_module._CHUNK_BLOCKS * 2 + 17
    rng = np.random.default_rng(9)
    x = rng.integers(-4, 5, size=(n, 32)).astype(np.float32)
    x[-3] = 0.0
    check_quantize(x, qtype)


finite32 = st.floats(-FP16_MAX, FP16_MAX, width=32, allow_nan=False, allow_infinity=False)
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, 1e-45, -1e-38, 2.0**-14])
blocks_strategy = st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
    lambda rb: hnp.arrays(np.float32, (rb[0], 32 * rb[1]), elements=st.one_of(finite32, special))
)


@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=150, deadline=None)
@given(x=blocks_strategy)
def test_property_matches_gguf(qtype, x):
    if qtype in WITH_MIN:
        x = x + np.float32(0.0)  # -0.0 -> +0.0: gguf-py's sign of a mixed-zero min is unstable
    check_quantize(x, qtype)


# --- dequantize: bit for bit -------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    x[0] = 0.0
    data = gguf_quantize(x, gguf_type(qtype))
    ours = dequantize_blocks(torch.from_numpy(data), qtype, x.shape).numpy()
    assert_bitwise_equal(ours, gguf_dequantize(data, gguf_type(qtype)))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_arbitrary_bytes(qtype):
    # Every code pattern, with random finite fp16 scales (NaN payloads are not compared).
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, size=(512, ggml_type(qtype).type_size), dtype=np.uint8)
    n_fields = 2 if qtype in WITH_MIN else 1
    fields = rng.uniform(-100, 100, size=(512, n_fields)).astype(np.float16)
    data[:, : 2 * n_fields] = fields.view(np.uint8)
    shape = (16, 32 * 32)
    ours = dequantize_blocks(torch.from_numpy(data), qtype, shape).numpy()
    assert_bitwise_equal(ours, gguf_dequantize(data.reshape(16, -1), gguf_type(qtype)))


# --- errors ------------------------------------------------------------------------------


def test_unknown_type_lists_accepted_names():
    with pytest.raises(ValueError, match="Q8_0, Q4_0, Q4_1, Q5_0, Q5_1"):
        quantize_blocks(torch.zeros(32), "TQ1_0")
    with pytest.raises(ValueError, match="accepted"):
        dequantize_blocks(torch.zeros(18, dtype=torch.uint8), "q4_0", (32,))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of Q4_0's block size 32, got 48"):
        quantize_blocks(torch.zeros(2, 48), "Q4_0")
    with pytest.raises(ValueError, match="got a scalar"):
        quantize_blocks(torch.tensor(1.0), "Q4_0")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_blocks(torch.zeros(32, dtype=torch.int32), "Q8_0")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_blocks(np.zeros(32, dtype=np.float32), "Q8_0")


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_the_block(qtype, bad):
    x = torch.zeros(3, 64)
    x[1, 40] = bad  # block 3
    with pytest.raises(ValueError, match="finite; block 3"):
        quantize_blocks(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_fp16_overflow_of_scale_is_refused(qtype):
    x = torch.zeros(2, 32)
    x[1, 0] = 1e7 if qtype != "Q8_0" else 1e8
    with pytest.raises(ValueError, match="block 1: its scale or minimum overflows float16"):
        quantize_blocks(x, qtype)


def test_dequantize_checks_bytes_and_shape():
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blocks(torch.zeros(18), "Q4_0", (32,))
    with pytest.raises(ValueError, match="needs 36 bytes"):
        dequantize_blocks(torch.zeros(18, dtype=torch.uint8), "Q4_0", (2, 32))
    with pytest.raises(ValueError, match="multiple of Q4_0's block size"):
        dequantize_blocks(torch.zeros(18, dtype=torch.uint8), "Q4_0", (30,))
