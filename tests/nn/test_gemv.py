"""The batch-1 C path (nn/gemv.py, csrc/gemv.c) against float64 F.linear of the dequantized
weight, within the float32 dot-product error bound; and that layers really take it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_fuse import tiny_llama  # noqa: I001 - a sibling test module

from zeropoint import QTensor, QuantSpec, Recipe, Rule, ckernels, quantize_model
from zeropoint.nn.fuse import fuse_members
from zeropoint.nn.gemv import PATHS, GemvKernel, gemv_form, paths_available
from zeropoint.nn.qlinear import QLinear

needs_c = pytest.mark.skipif(ckernels.library() is None, reason="no C compiler here")
LOOPS = [p for p in PATHS if p != "best"]  # every loop csrc/gemv.c has


def compiled(path):
    """Skip where this build lacks the loops `path` names (a CPU without AVX2 or AVX-512)."""
    if path not in paths_available(ckernels.library()):
        pytest.skip(f"the {path} loops are not compiled in on this CPU")
U = 2.0**-24  # float32 unit roundoff


def reference(x, q: QTensor, bias=None):
    return F.linear(x.double(), q.dequantize().double(), None if bias is None else bias.double())


def bound(x, q: QTensor, bias=None):
    """gamma_(n+3) * (|x| @ |W|.T + |bias|): a float32 dot product of length n, plus one
    rounding each for the int8 path's multiply by the row scale, the reference weight's
    rounding to float32 and the bias add."""
    n = q.shape[1] + 3
    gamma = n * U / (1 - n * U)
    total = x.double().abs() @ q.dequantize().double().abs().T
    return gamma * (total if bias is None else total + bias.double().abs())


def assert_close(y, x, q, bias=None):
    err = (y.double() - reference(x, q, bias)).abs()
    assert y.dtype == torch.float32
    assert bool((err <= bound(x, q, bias)).all()), f"max error {err.max():.3g}"


def batch1_only(layer):
    """Make the layer's batch > 1 kernel refuse one-row inputs: proves the C path ran."""
    fallback = layer.kernel.fallback

    def guard(x, bias=None):
        assert x.numel() != layer.in_features, "a one-row input reached the fallback"
        return type(fallback).linear(fallback, x, bias)

    fallback.linear = guard
    return layer


INT8 = QuantSpec(8, "symmetric", "per_channel")
INT4_SPECS = [
    QuantSpec(4, "symmetric", "per_group", group_size=128),  # 576 = 4 x 128 + 64: ragged
    QuantSpec(4, "asymmetric", "per_group", group_size=128),
    QuantSpec(4, "symmetric", "per_group", group_size=32),
    QuantSpec(4, "asymmetric", "per_group", group_size=64),
    QuantSpec(4, "asymmetric", "per_group", group_size=48),  # not whole 32-code chunks
    QuantSpec(4, "symmetric", "per_group", group_size=17),  # groups start mid-byte
    QuantSpec(4, "asymmetric", "per_channel"),
    # float zero-points (the default's Q4_1 form): real offsets in the 16-entry table
    QuantSpec(4, "asymmetric", "per_group", group_size=32, scale_dtype="float16",
              zero_point="float"),
    QuantSpec(4, "asymmetric", "per_group", group_size=48, zero_point="float"),
]
SHAPES = [(64, 576), (37, 100), (19, 1100), (3, 2)]


def weights(gen, shape, spec):
    w = torch.randn(*shape, generator=gen) * 0.05
    return QTensor.quantize(w, spec)


@needs_c
@pytest.mark.parametrize("path", LOOPS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", [INT8, *INT4_SPECS], ids=lambda s: s.describe())
def test_one_row_matches_float64_within_the_float32_bound(gen, spec, shape, path):
    compiled(path)
    q = weights(gen, shape, spec)
    bias = torch.randn(shape[0], generator=gen)
    layer = batch1_only(QLinear(q, bias))
    assert layer.kernel.decode_backend == f"gemv-int{spec.bits}"
    layer.kernel = GemvKernel(q, layer.kernel.fallback, ckernels.library(), path=path)
    for x_shape in [(shape[1],), (1, shape[1]), (1, 1, shape[1])]:
        x = torch.randn(*x_shape, generator=gen) * 3
        y = layer(x)
        assert y.shape == x_shape[:-1] + (shape[0],)
        assert_close(y, x, q, bias)


@needs_c
def test_the_bound_catches_a_wrong_weight(gen):
    # The bound is tight enough to notice one code off by one in a 576-long row.
    q = weights(gen, (8, 576), INT4_SPECS[1])
    x = torch.randn(576, generator=gen)
    y = QLinear(q, None)(x)
    codes = q.codes().clone()
    codes[3, 100] = (codes[3, 100] + 1) % 16
    wrong = QTensor.from_codes(codes, q.spec, q.scale, q.zero_point, q.dtype)
    assert not bool(((y.double() - reference(x, wrong)).abs() <= bound(x, wrong)).all())


@needs_c
@pytest.mark.parametrize("spec", [INT8, INT4_SPECS[0]], ids=lambda s: s.describe())
def test_rows_split_across_threads_give_the_same_bits(gen, spec):
    q = weights(gen, (301, 576), spec)
    x = torch.randn(1, 576, generator=gen)
    one = GemvKernel(q, QLinear(q, None).kernel.fallback, ckernels.library(), threads=1)
    assert one.threads == 1
    split = GemvKernel(q, one.fallback, ckernels.library(), threads=2, split_rows=301)
    assert split.threads == 2
    for _ in range(50):  # the second thread joins late or early, takes few blocks or many
        assert torch.equal(split.linear(x), one.linear(x))


@needs_c
@pytest.mark.parametrize("spec", [INT8, INT4_SPECS[0], INT4_SPECS[-2]], ids=lambda s: s.describe())
def test_other_inputs_take_the_batch_kernel(gen, spec):
    q = weights(gen, (32, 64), spec)
    layer = QLinear(q, None)
    calls = []
    fallback = layer.kernel.fallback
    fallback.linear = lambda x, bias=None: calls.append(x.shape) or type(fallback).linear(
        fallback, x, bias)
    layer(torch.randn(2, 64, generator=gen))  # two rows
    layer(torch.randn(1, 64, generator=gen, dtype=torch.float64))  # not float32
    layer(torch.randn(64, 2, generator=gen)[:, 0])  # one row, not contiguous
    assert calls == [(2, 64), (1, 64), (64,)]
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(1, 63, generator=gen))


def test_specs_the_c_path_does_not_read(gen):
    assert gemv_form(weights(gen, (4, 7), INT4_SPECS[0])) is None  # rows are not whole bytes
    assert gemv_form(weights(gen, (4, 8), QuantSpec(2, "asymmetric", "per_channel"))) is None
    assert gemv_form(weights(gen, (4, 8), QuantSpec(8, "asymmetric", "per_channel"))) is None
    assert gemv_form(weights(gen, (4, 8), QuantSpec(8, "symmetric"))) is None  # per tensor
    q = weights(gen, (4, 8), QuantSpec(2, "asymmetric", "per_channel"))
    with pytest.raises(ValueError, match="gemv reads"):
        GemvKernel(q, None, ckernels.library())
    assert not hasattr(QLinear(q, None).kernel, "decode_backend")


@needs_c
def test_int8_keeps_no_second_copy_of_the_codes(gen):
    layer = QLinear(weights(gen, (64, 576), INT8), torch.zeros(64))
    assert layer.resident_bytes() == layer.weight_q.nbytes + layer.bias.nbytes


@needs_c
@pytest.mark.parametrize("spec", [INT8, INT4_SPECS[0]], ids=lambda s: s.describe())
def test_fused_siblings_take_the_c_path_and_share_the_stacked_bytes(gen, spec):
    separate = [QLinear(weights(gen, (n, 576), spec), None) for n in (576, 192, 192)]
    fused = copy.deepcopy(separate)
    assert fuse_members(fused)
    assert {m.kernel.decode_backend for m in fused} == {f"gemv-int{spec.bits}"}
    storage = {m.weight_q.packed.untyped_storage().data_ptr() for m in fused}
    assert len(storage) == 1  # the members' QTensors are views of the one stacked QTensor
    assert sum(m.resident_bytes() for m in fused) == sum(m.resident_bytes() for m in separate)
    group = fused[0].kernel.group
    batch1_only(type("L", (), {"kernel": group.kernel, "in_features": 576})())
    x = torch.randn(1, 1, 576, generator=gen)
    with torch.inference_mode():
        for s, f in zip(separate, fused):
            assert torch.equal(s(x), f(x))


@needs_c
def test_a_deep_copy_reads_its_own_weights(gen):
    layer = QLinear(weights(gen, (16, 64), INT8), None)
    twin = copy.deepcopy(layer)
    x = torch.randn(64, generator=gen)
    expected = layer(x)
    layer.weight_q.packed.zero_()  # the original's bytes change; the copy's must not
    assert torch.equal(twin(x), expected)
    assert not torch.equal(layer(x), expected)


@needs_c
@pytest.mark.parametrize("spec", [INT8, INT4_SPECS[1]], ids=lambda s: s.describe())
def test_every_layer_of_a_quantized_llama_decodes_through_c(spec):
    model = tiny_llama()
    quantize_model(model, Recipe(spec, (Rule("lm_head", spec),)))
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(layers) == 2 * 7 + 1
    assert {m.kernel.decode_backend for m in layers} == {f"gemv-int{spec.bits}"}
    assert "batch 1: gemv" in repr(layers[0])


@needs_c
@pytest.mark.parametrize("path", LOOPS)
@pytest.mark.parametrize("spec", [INT8, INT4_SPECS[0], INT4_SPECS[4], INT4_SPECS[-2]],
                         ids=lambda s: s.describe())
def test_a_row_gives_the_same_bits_alone_as_among_others(gen, spec, path):
    # The SIMD loops run several rows at once beside each other: a row's sum must not notice.
    compiled(path)
    q = weights(gen, (11, 1100), spec)
    x = torch.randn(1100, generator=gen)
    lib = ckernels.library()
    whole = GemvKernel(q, None, lib, threads=1, path=path).linear(x)
    for r in range(11):
        zero_point = None if q.zero_point is None else q.zero_point[r:r + 1]
        alone = QTensor.from_codes(q.codes()[r:r + 1], spec, q.scale[r:r + 1], zero_point,
                                   q.dtype)  # row r's codes, scales and zero-points alone
        assert torch.equal(alone.dequantize(), q.dequantize()[r:r + 1])
        assert torch.equal(GemvKernel(alone, None, lib, threads=1, path=path).linear(x),
                           whole[r:r + 1])


def test_a_path_not_compiled_in_is_refused(gen):
    q = weights(gen, (4, 8), INT8)
    with pytest.raises(ValueError, match="gemv path 'neon' is not compiled in here; have best"):
        GemvKernel(q, None, ckernels.library(), path="neon")


@needs_c
@pytest.mark.parametrize("path", LOOPS)
@pytest.mark.parametrize("spec, halves, shape", [
    (QuantSpec(4, "asymmetric", "per_group", group_size=32, scale_dtype="float16"), 2 * 2,
     (37, 1100)),
    (QuantSpec(4, "symmetric", "per_group", group_size=48, scale_dtype="float16"), 2, (37, 1100)),
    (QuantSpec(4, "asymmetric", "per_group", group_size=32, scale_dtype="float16",
               zero_point="float"), 2, (37, 1100)),  # the float zero-points stay float32
    (QuantSpec(4, "asymmetric", "per_group", group_size=32), 2, (37, 1100)),  # integer zps
    # 514 groups a row: a block of 4 rows' parameters overflow the loops' conversion buffer
    (QuantSpec(4, "symmetric", "per_group", group_size=16, scale_dtype="float16"), 2, (6, 8224)),
], ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
def test_float16_copies_of_exact_parameters_give_the_same_bits(gen, spec, halves, shape, path):
    # Where float16 holds a scale or zero-point exactly, the loops read a float16 copy: the
    # weights are the same, so the result is the float32 copies' bit for bit.
    compiled(path)
    rows, cols = shape
    q = weights(gen, shape, spec)
    x = torch.randn(cols, generator=gen)
    lib = ckernels.library()
    kernel = GemvKernel(q, None, lib, threads=1, path=path)
    groups = q.scale.shape[1]
    assert kernel.kernel_nbytes() == rows * groups * halves  # bytes of the float16 copies
    y32 = torch.empty(rows)
    zp = None if q.zero_point is None else q.zero_point.float().contiguous()
    lib.zp_gemv_q4(x.data_ptr(), q.packed.data_ptr(), q.scale.data_ptr(),
                   None if zp is None else zp.data_ptr(), y32.data_ptr(), cols,
                   spec.group_size, rows, 1, PATHS[path], 0)
    assert torch.equal(kernel.linear(x), y32)
    assert_close(y32, x, q)
