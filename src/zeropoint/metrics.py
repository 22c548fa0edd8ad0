"""Error metrics between a reference tensor and its reconstruction.

All reductions run in float64 so that the metric of a float16 tensor is not itself rounded.
"""

from __future__ import annotations

import math

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
