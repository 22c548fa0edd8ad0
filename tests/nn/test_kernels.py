import pytest
import torch

from zeropoint.nn.kernels import (
    Int4Weight,
    Int8Weight,
    choose_activation_qparams,
    fbgemm_available,
    int4pack_available,
    quantize_activation,
)

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="no fbgemm in this torch build")
needs_int4pack = pytest.mark.skipif(not int4pack_available(), reason="no int4pack CPU kernel")

F32_EPS = torch.finfo(torch.float32).eps
BF16_U = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding error <= 2**-8 relative


def int8_weight(gen, out_features=96, in_features=1100):
    # in_features is not a multiple of the fallback's 512 block, to cover the ragged last block.
    codes = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_features, generator=gen) * 0.01 + 1e-4
    return codes, scale


def int4_weight(gen, out_features=64, in_features=1024, group_size=64):
    groups = (out_features, in_features // group_size)
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = torch.rand(groups, generator=gen) * 0.02 + 1e-3
    zero_point = torch.randint(0, 16, groups, generator=gen)
    return codes, scale, zero_point, group_size


def int4_reference(x, codes, scale, zero_point, group_size):
    """float64 (q - zp) * scale @ x, written out independently of the module."""
    q = codes.double().reshape(codes.shape[0], -1, group_size)
    w = ((q - zero_point.double()[..., None]) * scale.double()[..., None]).reshape(codes.shape)
    return x.double() @ w.T


def int4_bound(x, scale, group_size, ref):
    """Error bound of a bfloat16 int4 matmul against the float64 reference, elementwise.

    Per weight: the kernel's s and z are rounded to bfloat16 (each off by <= 2**-8 relative, and
    |q - 8| + |8 - zp| <= 16) and the dequantized weight may be rounded to bfloat16 too
    (|w| <= 15 * scale): <= 2**-8 * 31 * scale. The output is rounded to bfloat16: 2**-8 * |y|.
    """
    scale_per_weight = scale.double().repeat_interleave(group_size, dim=1)  # (out, in)
    return BF16_U * (x.double().abs() @ (32 * scale_per_weight).T) + BF16_U * ref.abs()


# --- int8 ----------------------------------------------------------------------------------------


@needs_fbgemm
@pytest.mark.parametrize("reduce_range", [True, False])
@pytest.mark.parametrize(
    "make_x",
    [
        lambda g: torch.randn(1, 1100, generator=g),  # batch 1
        lambda g: torch.randn(3, 5, 1100, generator=g) * 40,  # batch dims, wide range
        lambda g: torch.rand(2, 1100, generator=g),  # all positive: zero-point at qmin
        lambda g: -torch.rand(2, 1100, generator=g),  # all negative: zero-point at qmax
        lambda g: torch.randn(1, 1100, generator=g) * 1e-7,  # below fbgemm's smallest scale
        lambda g: torch.zeros(1, 1100),  # zero range
    ],
)
def test_int8_fallback_matches_fbgemm(gen, make_x, reduce_range):
    codes, scale = int8_weight(gen)
    bias = torch.randn(codes.shape[0], generator=gen)
    x = make_x(gen)
    fast = Int8Weight.prepare(codes, scale, reduce_range=reduce_range, backend="fast")
    slow = Int8Weight.prepare(codes, scale, reduce_range=reduce_range, backend="fallback")
    assert (fast.backend, slow.backend) == ("fbgemm", "fallback")
    y_fast, y_slow = fast.linear(x, bias), slow.linear(x, bias)
    # Same integers, same scales: only float32 rounding order may differ (fused multiply-add or
    # not in fbgemm's epilogue), so allow 4 ulps of the largest output. Bit-exact on AVX512.
    tol = 4 * F32_EPS * max(y_fast.abs().max().item(), 1.0)
    torch.testing.assert_close(y_slow, y_fast, rtol=0, atol=tol)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_fallback_is_within_activation_rounding_of_float(gen, reduce_range):
    # Independent of fbgemm: the only error is rounding x to the activation grid (<= scale_x / 2
    # per element) and the float32 epilogue.
    codes, scale = int8_weight(gen)
    x = torch.randn(4, codes.shape[1], generator=gen)
    y = Int8Weight.prepare(codes, scale, reduce_range=reduce_range, backend="fallback").linear(x)
    w = codes.double() * scale.double()[:, None]
    exact = x.double() @ w.T
    qp = choose_activation_qparams(x, reduce_range)
    bound = qp.scale / 2 * w.abs().sum(dim=1) + 1e-5 * exact.abs() + 1e-6
    assert ((y.double() - exact).abs() <= bound).all()


@needs_fbgemm
def test_activation_rounding_matches_fbgemm_on_near_ties(gen):
    # fbgemm rounds fma(x, 1/scale, zp) once; rounding x/scale first and adding zp after differs
    # for a few values a hair from a half-integer. Find some, then read fbgemm's activation codes
    # back through an identity weight: y = (xq - zp) * scale_x exactly.
    edges = torch.tensor([[-1.0, 3.0]])
    qp = choose_activation_qparams(edges, reduce_range=True)
    inv = float(torch.tensor(1.0) / torch.tensor(qp.scale))
    candidates = torch.rand(4_000_000, generator=gen) * 4 - 1
    once = torch.round((candidates.double() * inv + qp.zero_point).float())
    twice = torch.round(candidates * inv + qp.zero_point)
    near_ties = candidates[once != twice]
    assert near_ties.numel() > 0
    x = torch.cat([edges[0], near_ties, torch.rand(64, generator=gen) * 4 - 1])[None]
    identity = Int8Weight.prepare(torch.eye(x.shape[1], dtype=torch.int8), torch.ones(x.shape[1]),
                                  backend="fast")
    fbgemm_codes = torch.round(identity.linear(x) / qp.scale) + qp.zero_point
    assert torch.equal(quantize_activation(x, qp), fbgemm_codes)


def test_activation_qparams_cover_range_and_zero():
    x = torch.tensor([[-1.0, 0.5, 3.0]])
    qp = choose_activation_qparams(x, reduce_range=False)
    assert qp.scale == pytest.approx(4.0 / 255, rel=1e-7)
    assert qp.zero_point == round(1.0 / (4.0 / 255))  # real 0 sits at code 64
    qp7 = choose_activation_qparams(x, reduce_range=True)
    assert qp7.scale == pytest.approx(4.0 / 127, rel=1e-7)


def test_int8_output_dtype_shape_and_bias(gen):
    codes, scale = int8_weight(gen, 32, 64)
    w = Int8Weight.prepare(codes, scale)
    x = torch.randn(2, 3, 64, generator=gen).bfloat16()
    bias = torch.randn(32, generator=gen)
    y = w.linear(x, bias)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    expected = (w.linear(x) + bias.bfloat16()).float()
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02)


# --- int4 ----------------------------------------------------------------------------------------


@needs_int4pack
def test_int4_kernel_sees_our_weights(gen):
    # Multiplying by the identity reads the weights back as the kernel dequantizes them: this
    # checks the (scale, zero-point) -> (s, z) conversion weight by weight.
    codes, scale, zp, g = int4_weight(gen, out_features=32, in_features=256, group_size=32)
    fast = Int4Weight.prepare(codes, scale, zp, g, backend="fast")
    seen = fast.linear(torch.eye(256, dtype=torch.bfloat16)).T.double()  # (out, in)
    expected = int4_reference(torch.eye(256), codes, scale, zp, g).T
    # s, z and the output are each rounded to bfloat16 (see int4_bound).
    bound = BF16_U * (16 * scale.double().repeat_interleave(g, dim=1) + expected.abs())
    assert ((seen - expected).abs() <= bound).all()


@needs_int4pack
@pytest.mark.parametrize("group_size", [32, 128, 256])
@pytest.mark.parametrize("batch", [1, 7])
def test_int4_fast_fallback_and_reference_agree(gen, group_size, batch):
    codes, scale, zp, g = int4_weight(gen, out_features=48, in_features=512, group_size=group_size)
    x = torch.randn(batch, 512, generator=gen).bfloat16()
    ref = int4_reference(x, codes, scale, zp, g)
    fast = Int4Weight.prepare(codes, scale, zp, g, backend="fast")
    slow = Int4Weight.prepare(codes, scale, zp, g, backend="fallback")
    assert (fast.backend, slow.backend) == ("int4pack", "fallback")
    y_fast, y_slow = fast.linear(x).double(), slow.linear(x).double()
    bound = int4_bound(x, scale, g, ref)
    assert ((y_fast - ref).abs() <= bound).all()
    assert ((y_slow - ref).abs() <= bound).all()
    assert ((y_fast - y_slow).abs() <= 2 * bound).all()


def test_int4_fallback_float32_is_exact_dequantization(gen):
    codes, scale, zp, g = int4_weight(gen, out_features=24, in_features=128, group_size=32)
    x = torch.randn(3, 128, generator=gen)
    w = Int4Weight.prepare(codes, scale, zp, g)
    assert w.backend == "fallback"  # 24 output channels: not a multiple of 16
    torch.testing.assert_close(w.linear(x).double(), int4_reference(x, codes, scale, zp, g),
                               rtol=1e-5, atol=1e-5)


@needs_int4pack
def test_int4_float32_input_and_bias(gen):
    codes, scale, zp, g = int4_weight(gen)
    w = Int4Weight.prepare(codes, scale, zp, g)
    x = torch.randn(2, 2, 1024, generator=gen)
    bias = torch.randn(64, generator=gen)
    y = w.linear(x, bias)
    assert y.shape == (2, 2, 64) and y.dtype == torch.float32
    ref = int4_reference(x.reshape(4, -1), codes, scale, zp, g) + bias.double()
    # x is rounded to bfloat16 for the kernel: one more 2**-8 relative per input element.
    bound = int4_bound(x.reshape(4, -1), scale, g, ref) + BF16_U * (
        x.reshape(4, -1).double().abs()
        @ Int4Weight.prepare(codes, scale, zp, g, backend="fallback").dequantize(torch.float64).abs().T
    )
    assert ((y.reshape(4, -1).double() - ref).abs() <= bound).all()


# --- bad input -----------------------------------------------------------------------------------


def test_int4_fast_refused_for_unsupported_shape(gen):
    codes, scale, zp, _ = int4_weight(gen, out_features=64, in_features=160, group_size=40)
    with pytest.raises(ValueError, match="group_size in"):
        Int4Weight.prepare(codes, scale, zp, 40, backend="fast")
    assert Int4Weight.prepare(codes, scale, zp, 40).backend == "fallback"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(codes=torch.zeros(64, 128, dtype=torch.int8)), "codes must be a 2-D torch.uint8"),
        (dict(codes=torch.full((64, 128), 16, dtype=torch.uint8)), "0..15"),
        (dict(scale=torch.ones(64, 3)), r"scale must have shape .* \(64, 2\)"),
        (dict(scale=torch.zeros(64, 2)), "finite and positive"),
        (dict(zero_point=torch.full((64, 2), 16)), "zero_point must hold integers 0..15"),
        (dict(zero_point=torch.full((64, 2), float("nan"))), "float zero_point must be finite"),
        (dict(group_size=100), "positive divisor of in_features=128"),
        (dict(backend="gpu"), "backend must be one of auto, fast, fallback"),
    ],
)
def test_int4_prepare_rejects(change, message):
    args = dict(codes=torch.zeros(64, 128, dtype=torch.uint8), scale=torch.ones(64, 2),
                zero_point=torch.zeros(64, 2), group_size=64)
    args.update(change)
    backend = args.pop("backend", "auto")
    with pytest.raises(ValueError, match=message):
        Int4Weight.prepare(**args, backend=backend)


def test_int8_prepare_and_linear_reject():
    with pytest.raises(ValueError, match="codes must be a 2-D torch.int8"):
        Int8Weight.prepare(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match=r"scale must have shape \(out_features,\) = \(4,\)"):
        Int8Weight.prepare(torch.zeros(4, 8, dtype=torch.int8), torch.ones(8))
    w = Int8Weight.prepare(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=8\)"):
        w.linear(torch.zeros(1, 9))
