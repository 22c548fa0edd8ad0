"""Observers against one pass over the concatenated data, numpy's histogram, a moving average
written out here, and save/resume."""

import io

import numpy as np
import pytest
import torch

from zeropoint import QuantSpec, choose_qparams, qparams_from_range
from zeropoint.calibrate import (
    EntropySearch,
    HistogramConfig,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSESearch,
    entropy_qparams,
    mse_qparams,
)
from zeropoint.calibrate.observers import batch_min_max


def batches(gen, n=5, shape=(7, 33, 48), spread=True):
    """Activation-like batches: (batch, tokens, channels), each with its own range."""
    out = []
    for i in range(n):
        x = torch.randn(*shape, generator=gen) * (1 + i if spread else 1)
        x[..., 5] += 3.0 * i  # a channel that drifts
        out.append(x)
    return out


def save_and_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


ACT_SPECS = [
    QuantSpec(8, "asymmetric"),
    QuantSpec(8, "symmetric", "per_channel", axis=-1),
    QuantSpec(4, "asymmetric", "per_channel", axis=-1),
]


@pytest.mark.parametrize("spec", ACT_SPECS, ids=lambda s: s.describe())
def test_minmax_over_batches_is_one_pass_over_the_concatenation(gen, spec):
    xs = batches(gen)
    obs = MinMaxObserver(spec)
    for x in xs:
        obs.update(x)
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # (tokens, channels)
    scale, zp = obs.qparams()
    ref_scale, ref_zp = choose_qparams(flat, spec)
    assert torch.equal(scale.reshape(-1), ref_scale.reshape(-1))
    assert torch.equal(zp.reshape(-1), ref_zp.reshape(-1))


MORE_SPECS = [QuantSpec(4, "asymmetric", "per_group", group_size=8),
              QuantSpec(4, "asymmetric", "per_channel", axis=1)]


@pytest.mark.parametrize("spec", ACT_SPECS + MORE_SPECS, ids=lambda s: s.describe())
def test_batch_min_max_is_numpys_per_block(gen, spec):
    # 20,000 tokens: more than one cache-sized chunk of rows for the per-channel path.
    x = torch.randn(20_000, 40, generator=gen) * torch.linspace(0.1, 10, 40)
    lo, hi = batch_min_max(x, spec)
    bs = spec.block_size(x.shape)
    blocks = x.numpy().reshape(x.shape[0] // bs[0], bs[0], x.shape[1] // bs[1], bs[1])
    assert np.array_equal(lo.numpy(), blocks.min(axis=(1, 3)))
    assert np.array_equal(hi.numpy(), blocks.max(axis=(1, 3)))


def test_minmax_takes_batches_whose_token_count_changes(gen):
    spec = QuantSpec(8, "asymmetric", "per_channel", axis=-1)
    xs = [torch.randn(3, 10, 16, generator=gen), torch.randn(7, 16, generator=gen) * 4,
          torch.randn(2, 2, 5, 16, generator=gen)]
    obs = MinMaxObserver(spec)
    for x in xs:
        obs.update(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    for a, b in zip(obs.qparams(), choose_qparams(flat, spec)):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


def test_per_group_weights_merge_exactly(gen):
    spec = QuantSpec(4, "symmetric", "per_group", group_size=16)
    xs = [torch.randn(32, 64, generator=gen) * (i + 1) for i in range(4)]
    obs = MinMaxObserver(spec)
    for x in xs:
        obs.update(x)
    ref = torch.stack(xs)  # elementwise extremes over batches: min/max of each block's union
    lo = ref.view(4, 32, 4, 16).amin(dim=(0, 3))
    hi = ref.view(4, 32, 4, 16).amax(dim=(0, 3))
    for a, b in zip(obs.qparams(), qparams_from_range(lo, hi, spec)):
        assert torch.equal(a, b)


def test_moving_average_follows_its_formula(gen):
    spec = QuantSpec(8, "asymmetric", "per_channel", axis=-1)
    c = 0.25
    xs = batches(gen)
    obs = MovingAverageMinMaxObserver(spec, averaging_constant=c)
    lo = hi = None
    for x in xs:
        obs.update(x)
        flat = x.reshape(-1, x.shape[-1]).double()
        blo, bhi = flat.min(0).values, flat.max(0).values
        if lo is None:
            lo, hi = blo, bhi  # the first batch initialises
        else:
            lo, hi = lo + c * (blo - lo), hi + c * (bhi - hi)
    scale, zp = obs.qparams()
    ref_scale, ref_zp = qparams_from_range(lo, hi, spec)
    torch.testing.assert_close(scale.reshape(-1), ref_scale, rtol=1e-6, atol=0)
    assert int((zp.reshape(-1) - ref_zp).abs().max()) <= 1  # a tie may round either way


def test_moving_average_with_constant_1_is_the_last_batch(gen):
    spec = QuantSpec(8, "symmetric")
    obs = MovingAverageMinMaxObserver(spec, averaging_constant=1.0)
    xs = batches(gen)
    for x in xs:
        obs.update(x)
    for a, b in zip(obs.qparams(), choose_qparams(xs[-1], spec)):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


# -- histogram ---------------------------------------------------------------------------------


def test_histogram_merges_exactly_when_the_range_doubles(gen):
    spec = QuantSpec(4, "symmetric")
    bins = 64
    obs = HistogramObserver(spec, HistogramConfig(entropy=EntropySearch(bins=bins)))
    xs = [torch.randn(5000, generator=gen) * s for s in (1.0, 1.5, 5.0, 0.5, 40.0)]
    for x in xs:
        obs.update(x)
    A = float(obs.amax[0])
    allx = torch.cat(xs).double().numpy()
    first = float(xs[0].abs().max())
    # A only ever doubles from the first batch's max, and covers everything seen.
    k = np.log2(A / first)
    assert k == round(k) and A >= np.abs(allx).max() and A < 2 * np.abs(allx).max()
    want = np.histogram(allx, bins=2 * bins, range=(-A, A))[0]
    got = obs.hist[0].numpy()
    assert got.sum() == len(allx)
    # Merged bins are unions of old ones: equal counts, but for values within float rounding
    # of a bin edge, which numpy and we may put on different sides.
    assert np.abs(got - want).sum() <= 4


def test_histogram_over_batches_is_one_pass_when_the_first_batch_holds_the_extremes(gen):
    spec = QuantSpec(8, "asymmetric", "per_channel", axis=-1)
    xs = batches(gen, spread=False)
    xs[0][0, 0, :] = 50.0  # the first batch sets the range for every channel
    xs[0][0, 1, :] = -50.0
    obs, one = HistogramObserver(spec), HistogramObserver(spec)
    for x in xs:
        obs.update(x)
    one.update(torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]))
    assert torch.equal(obs.hist, one.hist)
    for a, b in zip(obs.qparams(), one.qparams()):
        assert torch.equal(a.reshape(-1), b.reshape(-1))  # grids (1, 1, C) and (1, C)


def test_histogram_entropy_matches_the_estimator_on_one_batch(gen):
    # One batch: the histogram spans [-max|x|, max|x|], so its folded |x| bins are the
    # estimator's bins (up to values exactly on an edge) and the threshold is the same bin.
    spec = QuantSpec(8, "symmetric")
    x = torch.randn(200_000, generator=gen)
    obs = HistogramObserver(spec)
    obs.update(x)
    s_obs, _ = obs.qparams()
    s_est, _ = entropy_qparams(x, spec)
    bin_width = float(x.abs().max()) / 2048
    assert abs(float(s_obs) - float(s_est)) * spec.qmax <= 1.01 * bin_width


def test_histogram_mse_is_close_to_the_mse_search_on_the_data(gen):
    spec = QuantSpec(4, "asymmetric", "per_channel", axis=-1)
    xs = batches(gen, n=3, spread=False)
    obs = HistogramObserver(spec, HistogramConfig("mse"))
    for x in xs:
        obs.update(x)
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    s_obs, _ = obs.qparams()
    s_est, _ = mse_qparams(flat, spec, MSESearch(coarse_step=1))
    # Bin centres stand in for the values: the chosen ratio may move by a grid step or two.
    ratio = s_obs.reshape(-1) / s_est.reshape(-1)
    assert float((ratio - 1).abs().max()) < 0.05


# -- errors and resuming -----------------------------------------------------------------------


OBSERVERS = [
    lambda s: MinMaxObserver(s),
    lambda s: MovingAverageMinMaxObserver(s, 0.1),
    lambda s: HistogramObserver(s),
    lambda s: HistogramObserver(s, HistogramConfig("mse")),
]
OBS_IDS = ["minmax", "moving", "hist-entropy", "hist-mse"]


@pytest.mark.parametrize("make", OBSERVERS, ids=OBS_IDS)
def test_qparams_before_any_data_is_a_clear_error(make):
    obs = make(QuantSpec(8))
    with pytest.raises(RuntimeError, match="has seen no data: call update"):
        obs.qparams()


@pytest.mark.parametrize("make", OBSERVERS, ids=OBS_IDS)
def test_non_finite_batch_is_rejected_with_count_and_position(make):
    obs = make(QuantSpec(8, "asymmetric", "per_channel", axis=-1))
    x = torch.randn(4, 6, 8)
    x[2, 1, 7] = float("inf")
    x[3, 0, 0] = float("nan")
    x[3, 5, 2] = float("-inf")
    message = r"calibration batch has 3 non-finite value\(s\).*index \(2, 1, 7\)"
    with pytest.raises(ValueError, match=message):
        obs.update(x)
    assert obs.batches == 0  # nothing half-recorded


@pytest.mark.parametrize("make", OBSERVERS, ids=OBS_IDS)
def test_resumed_calibration_equals_an_uninterrupted_one(gen, make):
    spec = QuantSpec(8, "asymmetric", "per_channel", axis=-1)
    xs = batches(gen)
    whole, first = make(spec), make(spec)
    for x in xs:
        whole.update(x)
    for x in xs[:2]:
        first.update(x)
    resumed = make(spec)
    resumed.load_state_dict(save_and_load(first.state_dict()))
    for x in xs[2:]:
        resumed.update(x)
    for a, b in zip(resumed.qparams(), whole.qparams()):
        assert torch.equal(a, b)
    assert resumed.batches == len(xs)


def test_state_from_another_observer_or_spec_is_refused(gen):
    obs = MinMaxObserver(QuantSpec(8))
    obs.update(torch.randn(10, generator=gen))
    message = "state is from 'MinMaxObserver'; this observer is 'HistogramObserver'"
    with pytest.raises(ValueError, match=message):
        HistogramObserver(QuantSpec(8)).load_state_dict(obs.state_dict())
    with pytest.raises(ValueError, match="for int8 asym per-tensor; this observer is int4"):
        MinMaxObserver(QuantSpec(4)).load_state_dict(obs.state_dict())


def test_batches_with_other_blocks_are_refused(gen):
    obs = MinMaxObserver(QuantSpec(8, "asymmetric", "per_channel", axis=-1))
    obs.update(torch.randn(5, 16, generator=gen))
    with pytest.raises(ValueError, match=r"grid of \(1, 12\) but earlier batches had \(1, 16\)"):
        obs.update(torch.randn(5, 12, generator=gen))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"averaging_constant must be in \(0, 1\]"):
        MovingAverageMinMaxObserver(QuantSpec(8), 0.0)
    with pytest.raises(ValueError, match="method must be 'entropy' or 'mse', got 'percentile'"):
        HistogramConfig("percentile")
    with pytest.raises(ValueError, match="needs bins >= 128"):
        HistogramObserver(QuantSpec(8), HistogramConfig(entropy=EntropySearch(bins=64)))
    with pytest.raises(TypeError, match="an observer needs a QuantSpec"):
        MinMaxObserver({"bits": 8})


def test_histogram_block_that_saw_only_zeros_takes_the_next_range(gen):
    obs = HistogramObserver(QuantSpec(8, "symmetric", "per_channel", axis=-1))
    first = torch.zeros(100, 2)
    first[:, 1] = torch.randn(100, generator=gen)
    obs.update(first)
    second = torch.randn(100, 2, generator=gen) * 1e-3
    obs.update(second)
    # Channel 0 saw zeros, then values ~1e-3: its range follows them instead of staying at 1.
    assert float(obs.amax[0]) == pytest.approx(float(second[:, 0].abs().max()))
    assert obs.hist[0].sum() == 200 and obs.hist[0, 2048] >= 100  # the zeros, still at 0
