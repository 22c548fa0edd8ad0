"""Error metrics between a reference tensor and its reconstruction.

All reductions run in float64 so that the metric of a float16 tensor is not itself rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _pair(ref: torch.Tensor, approx: torch.Tensor):
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(approx.shape)}")
    return ref.detach().to(torch.float64), approx.detach().to(torch.float64)


def mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    r, a = _pair(ref, approx)
    return float(torch.mean((r - a) ** 2))


def max_abs_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    r, a = _pair(ref, approx)
    return float(torch.max(torch.abs(r - a)))


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(E[x^2] / E[(x - x_hat)^2]).

    +inf when the reconstruction is exact; -inf when the signal is all zero but the error is not.
    """
    r, a = _pair(ref, approx)
    return power_ratio_db(float(torch.mean(r**2)), float(torch.mean((r - a) ** 2)))


def power_ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors; 1.0 for two all-zero tensors."""
    r, a = _pair(ref, approx)
    r, a = r.reshape(-1), a.reshape(-1)
    nr, na = float(r.norm()), float(a.norm())
    if nr == 0.0 or na == 0.0:
        return 1.0 if nr == na else 0.0
    return float(r @ a) / (nr * na)


def uniform_noise_mse(scale: torch.Tensor) -> float:
    """Theoretical MSE of a uniform quantizer with step `scale`: scale^2 / 12.

    Rounding error is uniform on [-scale/2, scale/2] when the signal varies much more than
    one step (Widrow's quantization theorem). With one scale per block of equal size, the
    expected MSE over the tensor is the mean of scale^2 / 12 over blocks. It ignores clipping.
    """
    s = scale.detach().to(torch.float64)
    return float(torch.mean(s**2) / 12.0)


# --- KL-divergence statistics (the figures `llama-perplexity --kl-divergence` reports) ----------

# The percentiles llama-perplexity prints for the per-token KL-divergence and for Δp.
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass(frozen=True)
class Estimate:
    value: float
    uncertainty: float  # one standard error


@dataclass(frozen=True)
class KLDStatistics:
    """A quantized model's next-token distributions against a base model's, over `tokens`
    scored tokens. Probabilities (Δp, same-top) are fractions, not percent."""

    tokens: int
    perplexity: Estimate  # the quantized model's
    perplexity_base: Estimate
    log_perplexity_correlation: float  # Cor(ln PPL(Q), ln PPL(base))
    log_perplexity_ratio: Estimate  # mean ln(PPL(Q) / PPL(base))
    perplexity_ratio: Estimate  # PPL(Q) / PPL(base)
    perplexity_difference: Estimate  # PPL(Q) - PPL(base)
    kld: Estimate  # mean KL(base || quantized) per token, nats
    kld_median: float
    kld_max: float
    kld_min: float
    kld_percentiles: dict[float, float]  # percent -> value
    delta_p: Estimate  # mean of p_Q(right token) - p_base(right token)
    delta_p_median: float
    delta_p_max: float
    delta_p_min: float
    delta_p_percentiles: dict[float, float]
    delta_p_rms: Estimate
    same_top: Estimate  # share of tokens whose most likely next token is the same


def kld_statistics(kld, nll, nll_base, same_top) -> KLDStatistics:
    """The statistics of `llama-perplexity --kl-divergence` from per-token values, computed the
    way it computes them (tools/perplexity/perplexity.cpp, kl_divergence()):

    - `kld`: (tokens,) KL(base || quantized) of each scored token's next-token distribution;
    - `nll`, `nll_base`: (tokens,) -ln p(right next token) under the quantized and base models;
    - `same_top`: (tokens,) whether both models' most likely next token is the same.

    A mean's uncertainty is the standard error sqrt(var / (n - 1)) (0 for 10 tokens or fewer),
    perplexities and their ratio carry theirs through exp() to first order, the ratio's uses the
    covariance of the two log-likelihoods, RMS Δp's comes from the mean of Δp^4, and same-top's
    is the binomial sqrt(p (1 - p) / (n - 1)). Percentiles interpolate linearly between sorted
    values at fraction * (n - 1).
    """
    kld, nll, nll_base = (torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                          for v in (kld, nll, nll_base))
    same = torch.as_tensor(same_top).reshape(-1).to(torch.bool)
    n = kld.numel()
    if not (nll.numel() == nll_base.numel() == same.numel() == n):
        raise ValueError("kld, nll, nll_base and same_top must hold one value per token, got "
                         f"{n}, {nll.numel()}, {nll_base.numel()} and {same.numel()}")
    if n < 2:
        raise ValueError(f"KL-divergence statistics need at least 2 scored tokens, got {n}")
    for name, v in (("kld", kld), ("nll", nll), ("nll_base", nll_base)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} holds a non-finite value")

    log_ppl, log_ppl_base = _mean_estimate(nll), _mean_estimate(nll_base)
    cov = _covariance(nll, nll_base)
    ppl = Estimate(math.exp(log_ppl.value), math.exp(log_ppl.value) * log_ppl.uncertainty)
    ppl_base = Estimate(math.exp(log_ppl_base.value),
                        math.exp(log_ppl_base.value) * log_ppl_base.uncertainty)
    denominator = log_ppl.uncertainty * log_ppl_base.uncertainty
    log_ratio = Estimate(
        log_ppl.value - log_ppl_base.value,
        math.sqrt(max(0.0, log_ppl.uncertainty**2 + log_ppl_base.uncertainty**2 - 2 * cov)))
    ratio = math.exp(log_ratio.value)
    ppl_cov = ppl.value * ppl_base.value * cov
    difference = Estimate(
        ppl.value - ppl_base.value,
        math.sqrt(max(0.0, ppl.uncertainty**2 + ppl_base.uncertainty**2 - 2 * ppl_cov)))

    delta_p = torch.exp(-nll) - torch.exp(-nll_base)  # (tokens,)
    mse_p = _mean_estimate(delta_p**2)
    rms = math.sqrt(mse_p.value)
    same_share = float(same.double().mean())
    sorted_kld, sorted_dp = torch.sort(kld).values, torch.sort(delta_p).values
    return KLDStatistics(
        tokens=n,
        perplexity=ppl,
        perplexity_base=ppl_base,
        log_perplexity_correlation=cov / denominator if denominator > 0 else 0.0,
        log_perplexity_ratio=log_ratio,
        perplexity_ratio=Estimate(ratio, ratio * log_ratio.uncertainty),
        perplexity_difference=difference,
        kld=_mean_estimate(kld),
        kld_median=_median(sorted_kld),
        kld_max=float(sorted_kld[-1]),
        kld_min=float(sorted_kld[0]),
        kld_percentiles={p: _percentile(sorted_kld, p / 100) for p in KLD_PERCENTILES},
        delta_p=_mean_estimate(delta_p),
        delta_p_median=_median(sorted_dp),
        delta_p_max=float(sorted_dp[-1]),
        delta_p_min=float(sorted_dp[0]),
        delta_p_percentiles={p: _percentile(sorted_dp, p / 100) for p in DELTA_P_PERCENTILES},
        delta_p_rms=Estimate(rms, 0.5 / rms * mse_p.uncertainty if rms > 0 else 0.0),
        same_top=Estimate(same_share, math.sqrt(same_share * (1 - same_share) / (n - 1))),
    )


def _mean_estimate(values: torch.Tensor) -> Estimate:
    # From the running sums, as llama-perplexity does: var = E[x^2] - E[x]^2, no uncertainty
    # claimed from 10 values or fewer.
    n = values.numel()
    mean = float(values.sum()) / n
    var = float((values**2).sum()) / n - mean * mean
    return Estimate(mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _covariance(a: torch.Tensor, b: torch.Tensor) -> float:
    # The covariance of the two means (hence the / (n - 1)); 0 below 10 values.
    n = a.numel()
    if n < 10:
        return 0.0
    return (float((a * b).sum()) / n - float(a.sum()) / n * float(b.sum()) / n) / (n - 1)


def _median(sorted_values: torch.Tensor) -> float:
    n = sorted_values.numel()
    if n % 2:
        return float(sorted_values[n // 2])
    return 0.5 * float(sorted_values[n // 2] + sorted_values[n // 2 - 1])


def _percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    n = sorted_values.numel()
    position = fraction * (n - 1)
    low = int(position)
    weight = position - low
    high = min(low + 1, n - 1)
    return float((1 - weight) * sorted_values[low] + weight * sorted_values[high])
