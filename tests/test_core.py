"""The affine core against independent oracles: torch's own quantize kernels, a slow loop written
here, and properties that must hold for any input."""

import math


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeropoint import QuantSpec, choose_qparams, dequantize, fake_quantize, quantize
from zeropoint.core import grid_shape



SPECS = [
    QuantSpec(8, "symmetric"),
    QuantSpec(8, "asymmetric"),
    QuantSpec(4, "symmetric", "per_channel"),
    QuantSpec(4, "asymmetric", "per_channel", axis=1),
    QuantSpec(3, "symmetric", "per_group", group_size=16, narrow_range=True),
    QuantSpec(2, "asymmetric", "per_group", group_size=8, axis=0),
    QuantSpec(1, "asymmetric", "per_group", group_size=16),
    QuantSpec(5, "asymmetric"),
    QuantSpec(7, "symmetric", "per_channel", axis=-1),
    QuantSpec(4, "asymmetric", "per_group", group_size=20),  # 48 columns: a last group of 8
    QuantSpec(3, "symmetric", "per_group", group_size=10, axis=0),  # 32 rows: a last group of 2
]


def roundtrip(x, spec):
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, spec, scale, zp)
    return codes, scale, zp, dequantize(codes, spec, scale, zp, x.dtype)


# -- oracle 1: torch's own 8-bit kernels ---------------------------------------------------------


def assert_agree_except_ties(ours, theirs, x, scale):
    """Codes agree, except where x/scale lies within float rounding of a .5 tie: torch's kernels
    multiply by a float reciprocal of the scale, we divide; there they may differ by one code."""
    differ = ours.to(torch.int32) != theirs.to(torch.int32)
    if not differ.any():
        return
    assert int((ours.to(torch.int32) - theirs.to(torch.int32)).abs().max()) == 1
    ratio = (x.double() / scale.double())[differ]
    distance_to_tie = (ratio - ratio.floor() - 0.5).abs()
    assert float(distance_to_tie.max()) < 1e-4 * max(1.0, float(ratio.abs().max())), (
        f"{int(differ.sum())} codes differ and not all at ties"
    )
    assert int(differ.sum()) < 1e-4 * x.numel()


@pytest.mark.parametrize("scheme,qdtype", [("symmetric", torch.qint8), ("asymmetric", torch.quint8)])
def test_per_tensor_8bit_matches_torch_quantize_per_tensor(gen, scheme, qdtype):
    x = torch.randn(1000, 1000, generator=gen) * 3 + (0.7 if scheme == "asymmetric" else 0.0)
    spec = QuantSpec(8, scheme)
    scale, zp = choose_qparams(x, spec)
    ours = quantize(x, spec, scale, zp)
    theirs = torch.quantize_per_tensor(x, float(scale), int(zp), qdtype).int_repr()
    assert_agree_except_ties(ours, theirs, x, scale.reshape(()))
    assert ours.dtype == spec.code_dtype


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scheme,qdtype", [("symmetric", torch.qint8), ("asymmetric", torch.quint8)])
def test_per_channel_8bit_matches_torch_quantize_per_channel(gen, scheme, qdtype, axis):
    x = torch.randn(512, 768, generator=gen) * torch.rand(512, 1, generator=gen) * 4
    spec = QuantSpec(8, scheme, "per_channel", axis=axis)
    scale, zp = choose_qparams(x, spec)
    ours = quantize(x, spec, scale, zp)
    theirs = torch.quantize_per_channel(
        x, scale.reshape(-1).double(), zp.reshape(-1).long(), axis, qdtype
    ).int_repr()
    shape = [1, 1]
    shape[axis] = -1
    assert_agree_except_ties(ours, theirs, x, scale.reshape(shape))


def test_dequantize_matches_torch_dequantize(gen):
    x = torch.randn(300, 200, generator=gen)
    spec = QuantSpec(8, "asymmetric", "per_channel")
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, spec, scale, zp)
    q = torch._make_per_channel_quantized_tensor(codes, scale.reshape(-1).double(), zp.reshape(-1).long(), 0)
    assert torch.equal(dequantize(codes, spec, scale, zp), q.dequantize())


# -- oracle 2: a slow loop over blocks ------------------------------------------------------------


def slow_reference(x: np.ndarray, spec: QuantSpec):
    """One block at a time with numpy scalars: min/max, scale, zero-point, round, clamp."""
    x = x.astype(np.float32)
    block = spec.block_size(x.shape)
    codes = np.zeros(x.shape, dtype=np.int64)
    recon = np.zeros(x.shape, dtype=np.float32)
    grid = [-(-n // b) for n, b in zip(x.shape, block)]  # a shorter last block where b does not divide
    for idx in np.ndindex(*grid):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
        blk = x[sl]
        lo, hi = min(float(blk.min()), 0.0), max(float(blk.max()), 0.0)
        if spec.symmetric:
            s = np.float32(max(-lo, hi) / spec.qmax)
        else:
            s = np.float32((hi - lo) / (spec.qmax - spec.qmin))
        if s == 0:
            s = np.float32(1.0)
        z = 0 if spec.symmetric else int(min(max(np.rint(spec.qmin - lo / float(s)), spec.qmin), spec.qmax))
        for j in np.ndindex(*blk.shape):
            q = int(np.rint(np.float32(blk[j]) / s)) + z  # float32 division, ties to even
            q = min(max(q, spec.qmin), spec.qmax)
            pos = tuple(sl_.start + jj for sl_, jj in zip(sl, j))
            codes[pos] = q
            recon[pos] = np.float32((q - z) * s)
    return codes, recon


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_matches_slow_loop_reference(gen, spec):
    x = torch.randn(32, 48, generator=gen) * 2 + 0.3
    x[3, :] = 0.0  # an all-zero row: some blocks have nothing but zeros
    codes, _, _, recon = roundtrip(x, spec)
    ref_codes, ref_recon = slow_reference(x.numpy(), spec)
    assert np.array_equal(codes.to(torch.int64).numpy(), ref_codes)
    assert np.allclose(recon.numpy(), ref_recon, rtol=0, atol=1e-6)


def test_3d_per_channel_on_middle_axis_matches_reference(gen):
    x = torch.randn(4, 6, 10, generator=gen)
    spec = QuantSpec(4, "asymmetric", "per_channel", axis=1)
    codes, scale, _, _ = roundtrip(x, spec)
    assert scale.shape == (1, 6, 1)
    assert np.array_equal(codes.to(torch.int64).numpy(), slow_reference(x.numpy(), spec)[0])


# -- the spec's rules --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_codes_stay_in_range_and_dtype(gen, spec):
    x = torch.randn(64, 64, generator=gen) * 5
    codes, scale, zp, recon = roundtrip(x, spec)
    assert codes.dtype == spec.code_dtype
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert spec.qmin <= int(zp.min()) and int(zp.max()) <= spec.qmax
    if spec.symmetric:
        assert int(zp.abs().max()) == 0
    assert torch.isfinite(recon).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_zero_is_exact_for_one_signed_tensors(gen, sign, scheme):
    x = sign * (torch.rand(100, generator=gen) + 0.5)  # all positive or all negative, no zero
    spec = QuantSpec(4, scheme)
    scale, zp = choose_qparams(x, spec)
    zeros = torch.zeros(7)
    assert torch.equal(dequantize(quantize(zeros, spec, scale, zp), spec, scale, zp), zeros)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.25, 1e-30])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_constant_tensors(spec, value):
    x = torch.full((32, 64), value)
    codes, scale, zp, recon = roundtrip(x, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(recon).all()
    if value == 0.0:
        assert torch.equal(recon, x)
    else:
        assert float((recon - x).abs().max()) <= float(scale.max()) / 2 * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes_round_trip_in_their_own_dtype(gen, dtype):
    x = (torch.randn(64, 128, generator=gen) * 3).to(dtype)
    spec = QuantSpec(4, "asymmetric", "per_group", group_size=32)
    codes, scale, zp, recon = roundtrip(x, spec)
    assert recon.dtype == dtype
    # The codes of a half-precision tensor are those of the same values in float32.
    if dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(codes, quantize(x.float(), spec, scale, zp))
    err = (recon.double() - x.double()).abs()
    bound = scale.double().repeat_interleave(32, dim=1) / 2
    ulp = torch.finfo(dtype).eps * x.double().abs()
    assert bool((err <= bound * (1 + 1e-6) + ulp).all())


# -- properties ------------------------------------------------------------------------------


spec_strategy = st.builds(
    lambda bits, sym, gran, narrow: QuantSpec(
        max(bits, 2) if sym else bits,
        "symmetric" if sym else "asymmetric",
        gran,
        group_size=8 if gran == "per_group" else None,
        narrow_range=narrow and sym,
    ),
    st.integers(1, 8),
    st.booleans(),
    st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    st.booleans(),
)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(spec=spec_strategy, values=st.lists(finite, min_size=16, max_size=16 * 6))
def test_error_within_half_step_inside_the_range(spec, values):
    n = len(values) // 8 * 8
    x = torch.tensor(values[:n], dtype=torch.float32).view(-1, 8)  # (rows, 8)
    x[0, 0] = 0.0  # a zero is always there to check exactness
    codes, scale, zp, recon = roundtrip(x, spec)
    view_scale = _broadcast(scale, x, spec)
    view_zp = _broadcast(zp.double(), x, spec)
    lo = (spec.qmin - view_zp) * view_scale
    hi = (spec.qmax - view_zp) * view_scale
    xd = x.double()
    inside = (xd >= lo) & (xd <= hi)
    err = (xd - recon.double()).abs()
    tol = view_scale / 2 * (1 + 1e-5) + 1e-6 * xd.abs()
    assert bool((err[inside] <= tol[inside]).all())
    assert float(recon[0, 0]) == 0.0


def _broadcast(grid, x, spec):
    """Expand a grid-shaped qparam to x's shape (the test's own way: repeat per block)."""
    out = grid.double()
    for d, b in enumerate(spec.block_size(tuple(x.shape))):
        out = out.repeat_interleave(b, dim=d)
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dist=st.sampled_from(["normal", "uniform", "exp"]),
    scale=st.floats(1e-3, 1e3),
    scheme=st.sampled_from(["symmetric", "asymmetric"]),
)
def test_more_bits_never_raise_mse_on_continuous_data(seed, dist, scale, scheme):
    """On 4096 draws from a continuous distribution, each added bit lowers the MSE (by about 4x).
    Pointwise this can fail for hand-picked tiny inputs (grids of b and b+1 bits are not nested),
    which is why the property is stated for continuous data."""
    g = torch.Generator().manual_seed(seed)
    x = {"normal": torch.randn, "uniform": torch.rand}.get(dist, lambda n, generator: torch.empty(n).exponential_(generator=generator))(4096, generator=g) * scale
    errors = []
    for bits in range(2, 9):
        _, _, _, recon = roundtrip(x, QuantSpec(bits, scheme))
        errors.append(float(((recon.double() - x.double()) ** 2).mean()))
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors


# -- fake quantize ----------------------------------------------------------------------------


def test_fake_quantize_forward_and_straight_through_gradient():
    spec = QuantSpec(4, "symmetric")
    scale = torch.tensor([[0.1]])
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.33, 0.7, 0.76, 5.0]], requires_grad=True)
    y = fake_quantize(x, spec, scale, torch.zeros(1, 1, dtype=torch.int32))
    codes = quantize(x.detach(), spec, scale, None)
    assert torch.equal(y.detach(), dequantize(codes, spec, scale, None))
    y.sum().backward()
    # Codes in range [-8, 7]: -2.0 (code -20) and 0.76 (code 8) and 5.0 are clamped.
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


# -- bad input ---------------------------------------------------------------------------------


def test_nan_and_inf_report_count_and_first_position():
    x = torch.zeros(4, 5)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*nan at index \(1, 3\)"):
        choose_qparams(x, QuantSpec(8))
    with pytest.raises(ValueError, match=r"2 non-finite"):
        quantize(x, QuantSpec(8, "symmetric"), torch.ones(1, 1))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int8])
def test_integer_and_bool_tensors_are_type_errors(dtype):
    with pytest.raises(TypeError, match="accepted: float16, bfloat16, float32, float64"):
        choose_qparams(torch.zeros(4, dtype=dtype), QuantSpec(8))


def test_empty_tensor_and_bad_axis():
    with pytest.raises(ValueError, match="empty"):
        choose_qparams(torch.zeros(0, 3), QuantSpec(8))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        choose_qparams(torch.zeros(2, 3), QuantSpec(8, granularity="per_channel", axis=3))


def test_scale_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="needs one per block: grid \\(4, 1\\)"):
        quantize(torch.zeros(4, 8), QuantSpec(8, "symmetric", "per_channel"), torch.ones(3))


def test_scalar_and_one_element_tensors():
    for x in (torch.tensor(2.5), torch.tensor([-1.25])):
        _, scale, _, recon = roundtrip(x, QuantSpec(8, "symmetric"))
        assert recon.shape == x.shape
        assert math.isclose(float(recon.reshape(-1)[0]), float(x.reshape(-1)[0]), rel_tol=1e-6)


# -- the C fast path and the eager path compute the same codes ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_fast_path_and_eager_path_are_bit_identical(gen, spec, dtype):
    from zeropoint import ckernels

    if ckernels.library() is None:
        pytest.skip("no C compiler: only the eager path exists here")
    x = torch.randn(256, 1024 + 64, generator=gen) * 3
    # Near-ties: values that sit on or next to a .5 step of a fixed scale.
    x[:64] = (torch.randint(-60, 60, (64, 1088), generator=gen) + 0.5) * 0.0173
    x[64:128] = torch.nextafter(x[:64], torch.tensor(float("inf")))
    x = x.to(dtype)
    fast = roundtrip(x, spec)
    with ckernels.disabled():
        eager = roundtrip(x, spec)
    for a, b, what in zip(fast, eager, ("codes", "scale", "zero_point", "dequantized")):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("shape,spec", [
    ((1031, 1100), QuantSpec(8, "symmetric")),  # one block across every thread's ranges
    ((1031, 1100), QuantSpec(4, "asymmetric", "per_channel")),  # whole blocks in each range
    ((1031, 1100), QuantSpec(8, "asymmetric", "per_channel", axis=-1)),  # a scale per column
    ((1031, 1100), QuantSpec(4, "asymmetric", "per_group", group_size=100)),
    ((3, 400_003), QuantSpec(8, "asymmetric", "per_channel")),  # blocks longer than a range
    ((7, 211, 997), QuantSpec(4, "symmetric", "per_channel", axis=1)),  # blocks in every row
], ids=lambda v: v.describe() if isinstance(v, QuantSpec) else "x".join(map(str, v)))
def test_fast_path_splits_large_tensors_across_threads_exactly(gen, shape, spec):
    """Above a million elements the C kernels split the work into ranges that threads claim in
    turn; codes, qparams and reconstruction must still equal the eager path's. Three threads, so
    that ranges end inside blocks and blocks are shared; and again from a worker thread, where
    the kernels run on that thread alone."""
    from concurrent.futures import ThreadPoolExecutor

    from zeropoint import ckernels

    if ckernels.library() is None:
        pytest.skip("no C compiler: only the eager path exists here")
    x = torch.randn(shape, generator=gen) * 2 + 0.3
    with ckernels.disabled():
        eager = roundtrip(x, spec)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        fast = roundtrip(x, spec)
    finally:
        torch.set_num_threads(saved)
    with ThreadPoolExecutor(1) as pool:
        off_main = pool.submit(roundtrip, x, spec).result()
    for got in (fast, off_main):
        for a, b, what in zip(got, eager, ("codes", "scale", "zero_point", "dequantized")):
            assert torch.equal(a, b), what


def test_fast_path_reports_nan_like_the_eager_path():
    x = torch.randn(2048, 1024)
    x[1500, 7] = float("nan")
    spec = QuantSpec(4, "asymmetric", "per_group", group_size=64)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*index \(1500, 7\)"):
        quantize(x, spec, torch.ones(2048, 16), torch.zeros(2048, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*index \(1500, 7\)"):
        choose_qparams(x, spec)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel_last_axis", "per_group"])
def test_fast_path_keeps_division_codes_where_a_reciprocal_would_not(gen, granularity):
    """The C loop multiplies by 1/scale and redoes chunks near a .5 tie with the division. Inputs
    here sit on and a few ulps around ties, where the two disagree (the test checks that they do,
    so it would catch a fast path that skipped the redo), for per-tensor, per-element (Q = 1) and
    per-group scales."""
    from zeropoint import ckernels

    if ckernels.library() is None:
        pytest.skip("no C compiler: only the eager path exists here")
    spec = {"per_tensor": QuantSpec(8, "asymmetric"),
            "per_channel_last_axis": QuantSpec(8, "asymmetric", "per_channel", axis=-1),
            "per_group": QuantSpec(8, "asymmetric", "per_group", group_size=64)}[granularity]
    shape = (512, 1024)
    grid = grid_shape(shape, spec)
    scale = torch.rand(grid, generator=gen) * 0.05 + 0.001
    zero_point = torch.randint(0, 256, grid, generator=gen, dtype=torch.int32)
    s_full = scale.repeat_interleave(shape[0] // grid[0], 0).repeat_interleave(shape[1] // grid[1], 1)
    ties = (torch.randint(-120, 120, shape, generator=gen) + 0.5) * s_full  # (512, 1024)
    ulps = torch.randint(-4, 5, shape, generator=gen)
    x = ties
    for _ in range(4):  # walk |ulps| steps up or down from the tie
        step = torch.where(ulps > 0, float("inf"), float("-inf"))
        x = torch.where(ulps != 0, torch.nextafter(x, step), x)
        ulps = ulps - ulps.sign()
    by_division = torch.round(x / s_full)
    by_reciprocal = torch.round(x * (1.0 / s_full))
    assert int((by_division != by_reciprocal).sum()) > 10  # the input really tests the redo
    fast = quantize(x, spec, scale, zero_point)
    with ckernels.disabled():
        eager = quantize(x, spec, scale, zero_point)
    assert torch.equal(fast, eager)
