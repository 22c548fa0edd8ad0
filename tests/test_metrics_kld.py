"""metrics.kld_statistics against llama-perplexity's arithmetic written out as a slow loop here
(running sums, as tools/perplexity/perplexity.cpp keeps them) and numpy's own statistics."""

import math

import numpy as np
import pytest

from zeropoint.metrics import DELTA_P_PERCENTILES, KLD_PERCENTILES, kld_statistics


def _per_token(n, seed=0):
    rng = np.random.default_rng(seed)
    nll_base = rng.gamma(2.0, 1.5, n)
    nll = nll_base + rng.normal(0.2, 0.5, n)
    kld = rng.gamma(0.6, 0.4, n)
    same = rng.random(n) < 0.7
    return kld, np.abs(nll), nll_base, same


def _loop_reference(kld, nll, nll_base, same):
    """llama-perplexity's kl_divergence(): sums over tokens, then its closing formulas."""
    sums = dict.fromkeys(["nll", "nll2", "base", "base2", "cross", "kld", "kld2", "dp", "dp2",
                          "dp4"], 0.0)
    same_count = 0
    for k, a, b, s in zip(kld, nll, nll_base, same):
        sums["nll"] += a
        sums["nll2"] += a * a
        sums["base"] += b
        sums["base2"] += b * b
        sums["cross"] += a * b
        sums["kld"] += k
        sums["kld2"] += k * k
        dp = math.exp(-a) - math.exp(-b)
        sums["dp"] += dp
        sums["dp2"] += dp * dp
        sums["dp4"] += dp**4
        same_count += bool(s)
    n = len(kld)

    def mean_unc(total, total2):
        f = total / n
        var = total2 / n - f * f
        return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)

    lp, lp_u = mean_unc(sums["nll"], sums["nll2"])
    lb, lb_u = mean_unc(sums["base"], sums["base2"])
    cov = (sums["cross"] / n - (sums["nll"] / n) * (sums["base"] / n)) / (n - 1)
    ratio_u = math.sqrt(lp_u**2 + lb_u**2 - 2 * cov)
    mse, mse_u = mean_unc(sums["dp2"], sums["dp4"])
    share = same_count / n
    return {
        "ppl": (math.exp(lp), math.exp(lp) * lp_u),
        "ppl_base": (math.exp(lb), math.exp(lb) * lb_u),
        "cor": cov / (lp_u * lb_u),
        "ratio": (math.exp(lp - lb), math.exp(lp - lb) * ratio_u),
        "diff": (math.exp(lp) - math.exp(lb),
                 math.sqrt((math.exp(lp) * lp_u) ** 2 + (math.exp(lb) * lb_u) ** 2
                           - 2 * math.exp(lp) * math.exp(lb) * cov)),
        "kld": mean_unc(sums["kld"], sums["kld2"]),
        "dp": mean_unc(sums["dp"], sums["dp2"]),
        "rms": (math.sqrt(mse), 0.5 / math.sqrt(mse) * mse_u),
        "same": (share, math.sqrt(share * (1 - share) / (n - 1))),
    }


@pytest.mark.parametrize("n", [101, 1020])
def test_statistics_match_llama_perplexity_arithmetic(n):
    kld, nll, nll_base, same = _per_token(n, seed=n)
    s = kld_statistics(kld, nll, nll_base, same)
    ref = _loop_reference(kld, nll, nll_base, same)
    pairs = {"ppl": s.perplexity, "ppl_base": s.perplexity_base, "ratio": s.perplexity_ratio,
             "diff": s.perplexity_difference, "kld": s.kld, "dp": s.delta_p, "rms": s.delta_p_rms,
             "same": s.same_top}
    for key, est in pairs.items():
        assert est.value == pytest.approx(ref[key][0], rel=1e-9, abs=1e-12), key
        assert est.uncertainty == pytest.approx(ref[key][1], rel=1e-7, abs=1e-12), key
    assert s.log_perplexity_correlation == pytest.approx(ref["cor"], rel=1e-7)
    assert s.tokens == n


def test_order_statistics_match_numpy():
    kld, nll, nll_base, same = _per_token(777, seed=3)
    s = kld_statistics(kld, nll, nll_base, same)
    dp = np.exp(-nll) - np.exp(-nll_base)
    assert s.kld_median == pytest.approx(np.median(kld))
    assert (s.kld_max, s.kld_min) == (pytest.approx(kld.max()), pytest.approx(kld.min()))
    # llama-perplexity interpolates at fraction * (n - 1): numpy's default "linear" method.
    for p in KLD_PERCENTILES:
        assert s.kld_percentiles[p] == pytest.approx(np.percentile(kld, p)), p
    for p in DELTA_P_PERCENTILES:
        assert s.delta_p_percentiles[p] == pytest.approx(np.percentile(dp, p)), p
    assert s.delta_p_median == pytest.approx(np.median(dp))
    # The mean's uncertainty is the standard error with the (n - 1) of a sample.
    assert s.kld.uncertainty == pytest.approx(np.std(kld) / math.sqrt(len(kld) - 1))
    assert s.same_top.value == pytest.approx(same.mean())


def test_identical_models_score_zero_and_full_agreement():
    kld, nll, _, _ = _per_token(200)
    s = kld_statistics(np.zeros(200), nll, nll, np.ones(200, bool))
    assert s.kld.value == 0 and s.kld.uncertainty == 0
    assert s.perplexity_ratio.value == pytest.approx(1.0) and s.perplexity_ratio.uncertainty == 0
    assert s.delta_p_rms.value == 0 and s.same_top.value == 1 and s.same_top.uncertainty == 0


def test_ten_tokens_or_fewer_claim_no_uncertainty():
    kld, nll, nll_base, same = _per_token(10)
    s = kld_statistics(kld, nll, nll_base, same)
    assert s.kld.uncertainty == 0 and s.perplexity.uncertainty == 0
    assert s.kld.value == pytest.approx(kld.mean())


def test_bad_input_is_named():
    kld, nll, nll_base, same = _per_token(50)
    with pytest.raises(ValueError, match="one value per token"):
        kld_statistics(kld[:-1], nll, nll_base, same)
    with pytest.raises(ValueError, match="at least 2 scored tokens"):
        kld_statistics(kld[:1], nll[:1], nll_base[:1], same[:1])
    bad = nll.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="nll holds a non-finite"):
        kld_statistics(kld, bad, nll_base, same)
