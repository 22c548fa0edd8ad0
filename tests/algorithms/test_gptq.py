"""GPTQ against round-to-nearest and against a slow reference written here from the paper."""

import pytest
import torch

from zeropoint import QTensor, QuantSpec, choose_qparams, qparams_from_range, quantize
from zeropoint.algorithms.gptq import GPTQOptions, HessianAccumulator, gptq, gptq_quantize

SPECS = [
    QuantSpec(4, "symmetric", "per_group", group_size=32),
    QuantSpec(3, "asymmetric", "per_group", group_size=64),
    QuantSpec(4, "asymmetric", "per_group", group_size=48),  # a shorter last group
    QuantSpec(4, "symmetric", "per_channel"),
    QuantSpec(2, "asymmetric", "per_channel"),
    QuantSpec(8, "symmetric", "per_tensor"),
]


def correlated_inputs(gen, n=512, k=128, dtype=torch.float32):
    """(n, k) inputs whose features are strongly correlated, with uneven variances."""
    mix = torch.eye(k, dtype=torch.float64) + 0.4 * torch.randn(k, k, generator=gen, dtype=torch.float64)
    x = torch.randn(n, k, generator=gen, dtype=torch.float64) @ mix
    return (x * torch.linspace(0.3, 3.0, k, dtype=torch.float64)).to(dtype)


def output_error(x, w, w_hat) -> float:
    x, w, w_hat = x.double(), w.double(), w_hat.double()
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


def reference_gptq(w, H, spec, percdamp=0.01):
    """GPTQ one column at a time, straight from the paper: an explicit inverse Hessian, updated
    by Gaussian elimination after each column (OBS, GPTQ Sec. 3 eq. 3), no blocks, no lazy
    updates, no Cholesky. Group scales are fitted when a group's first column is reached.
    Returns (codes, dequantized weight), float64 (out, in) each."""
    W = w.double().clone()
    n_out, n_in = W.shape
    H = H.double() + percdamp * torch.diagonal(H.double()).mean() * torch.eye(n_in, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    groups = spec.granularity.value == "per_group"
    if not groups:  # per-channel (axis 0) or per-tensor: fixed up front, broadcast to (out, in)
        scale, zp = choose_qparams(W, spec)
        s_all = scale.double().expand(n_out, n_in)
        z_all = (torch.zeros_like(scale) if zp is None else zp).double().expand(n_out, n_in)
    codes = torch.zeros(n_out, n_in, dtype=torch.float64)
    w_hat = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_in):
        if groups and j % spec.group_size == 0:
            lo, hi = torch.aminmax(W[:, j : j + spec.group_size], dim=1)
            s, z = (t.double() for t in qparams_from_range(lo, hi, spec))
        elif not groups:
            s, z = s_all[:, j], z_all[:, j]
        q = torch.clamp(torch.round(W[:, j] / s) + z, spec.qmin, spec.qmax)
        codes[:, j], w_hat[:, j] = q, (q - z) * s
        err = (W[:, j] - w_hat[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # remove column j
    return codes, w_hat


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_identity_hessian_gives_round_to_nearest_codes(spec, gen):
    w = torch.randn(40, 144, generator=gen)
    rtn = QTensor.quantize(w, spec)
    got = gptq(w, torch.eye(144), spec)
    assert torch.equal(got.codes, rtn.codes())
    assert torch.equal(got.scale, rtn.scale)
    # With given scales (here ones that clip: the range of 0.7 w), the same holds against
    # core.quantize.
    scale, zp = choose_qparams(0.7 * w, spec)
    got = gptq(w, torch.eye(144), spec, scale=scale, zero_point=zp)
    assert torch.equal(got.codes, quantize(w, spec, scale, zp))


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_correlated_inputs_beat_rtn_and_match_the_slow_reference(spec, gen):
    x = correlated_inputs(gen)
    w = torch.randn(24, 128, generator=gen)
    H = 2 * x.double().T @ x.double() / x.shape[0]
    q = gptq_quantize(w, H.float(), spec)
    rtn = QTensor.quantize(w, spec)
    assert output_error(x, w, q.dequantize()) < 0.8 * output_error(x, w, rtn.dequantize())

    # In float64 the blocked, lazy, Cholesky form must reproduce the column-by-column reference.
    ref_codes, ref_w = reference_gptq(w.double(), H, spec)
    for block in (1, 7, 128):
        got = gptq(w.double(), H, spec, GPTQOptions(block_size=block))
        assert torch.equal(got.codes.double(), ref_codes), f"block_size {block}"
    # In float32, the same within float rounding: the layer error agrees to a small tolerance.
    assert output_error(x, w, q.dequantize()) == pytest.approx(output_error(x, w, ref_w), rel=1e-3)


def test_act_order_helps_where_large_inputs_come_last(gen):
    # Input energy grows along the columns: without act-order the dominant columns are rounded
    # last, when nothing is left to absorb their error.
    k = 96
    x = correlated_inputs(gen, n=1024, k=k) * torch.logspace(-1, 1, k)
    w = torch.randn(32, k, generator=gen)
    H = 2 * x.T @ x / x.shape[0]
    for spec in (QuantSpec(3, "symmetric", "per_channel"), QuantSpec(3, "asymmetric", "per_group", group_size=32)):
        plain = output_error(x, w, gptq_quantize(w, H, spec).dequantize())
        ordered_q = gptq_quantize(w, H, spec, GPTQOptions(act_order=True))
        ordered = output_error(x, w, ordered_q.dequantize())
        assert ordered < 0.9 * plain, spec.describe()
        # Static groups: the scales are the original weights' min/max, by column position.
        assert torch.equal(ordered_q.scale, choose_qparams(w, spec)[0])


def test_dead_columns_are_zero_and_finite(gen):
    x = torch.randn(256, 64, generator=gen)
    x[:, [3, 40]] = 0.0  # inputs that never fire
    w = torch.randn(16, 64, generator=gen)
    H = 2 * x.T @ x / 256
    for act_order in (False, True):
        q = gptq_quantize(w, H, QuantSpec(4, "symmetric", "per_group", group_size=16),
                          GPTQOptions(act_order=act_order))
        w_hat = q.dequantize()
        assert torch.isfinite(w_hat).all()
        assert torch.all(w_hat[:, [3, 40]] == 0)


def test_hessian_accumulator_is_the_mean_over_batches(gen):
    x = torch.randn(3, 50, 32, generator=gen, dtype=torch.float64)
    acc = HessianAccumulator(32, dtype=torch.float64)
    acc.add(x[0])
    acc.add(x[1:])  # (2, 50, 32): leading dims are rows
    acc.add(x[:0])  # an empty batch changes nothing
    flat = x.reshape(-1, 32)
    assert acc.rows == 150
    torch.testing.assert_close(acc.hessian, 2 * flat.T @ flat / 150)


def test_bad_inputs_raise(gen):
    spec = QuantSpec(4, "symmetric", "per_group", group_size=16)
    w = torch.randn(8, 32, generator=gen)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq(w, torch.eye(16), spec)
    with pytest.raises(ValueError, match="2-D"):
        gptq(w[None], torch.eye(32), spec)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq(bad, torch.eye(32), spec)
    with pytest.raises(ValueError, match="block_size"):
        GPTQOptions(block_size=0)
    with pytest.raises(ValueError, match="percdamp"):
        GPTQOptions(percdamp=-1.0)
    with pytest.raises(TypeError, match="GPTQOptions"):
        gptq(w, torch.eye(32), spec, {"act_order": True})
    with pytest.raises(ValueError, match="positive definite"):
        gptq(w, -torch.eye(32), spec, GPTQOptions(percdamp=0.0))
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(0)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_with_clip_search_rounds_on_the_mse_scales(act_order, gen):
    # The clip search fits each group's scale as calibrate.mse_qparams does on the same weights;
    # with nothing to propagate, the codes are core.quantize's on those scales (a shorter last
    # group included: 144 = 2 x 64 + 16).
    from zeropoint.calibrate.estimators import mse_qparams
    from zeropoint.calibrate.search import MSESearch

    spec = QuantSpec(3, "asymmetric", "per_group", group_size=64)
    w = torch.randn(40, 144, generator=gen)
    got = gptq(w, torch.eye(144), spec, GPTQOptions(act_order=act_order), clip=MSESearch())
    whole = [mse_qparams(w[:, :128], spec), mse_qparams(w[:, 128:], QuantSpec(
        3, "asymmetric", "per_group", group_size=16))]
    scale = torch.cat([s for s, _ in whole], dim=1)
    zp = torch.cat([z for _, z in whole], dim=1)
    assert torch.equal(got.scale, scale) and torch.equal(got.zero_point, zp)
    assert torch.equal(got.codes, quantize(w, spec, scale, zp))
    assert not torch.equal(scale, choose_qparams(w, spec)[0])  # the search did clip somewhere
