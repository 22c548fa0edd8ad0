"""The per-sub-block scale searches of ggml's K-quants, in float32 torch, equal bit for bit to
llama.cpp's `make_qkx2_quants`, `make_qx_quants` and `make_q3_quants` (ggml-quants.c).

Every function works on a *transposed* batch: `xt` is (n, S), column s holding sub-block s, so
element i of all S sub-blocks is the contiguous row `xt[i]`. The C code sums its n elements one
after another in float32; float addition is not associative, so the sums here loop over the n
rows in the same order (a Python loop over n <= 32 rows, each step vectorized over all S
sub-blocks), never torch.sum, whose pairwise/SIMD order (or float64 accumulator) differs.

Products and quotients are written exactly as the C groups them (`w*l*x` is `(w*l)*x`), one
torch op per C operation, each rounded to float32. That matches llama.cpp where its compiler
keeps a*b + c as two roundings: true of the x86-64 libggml-base that llama-cpp-python builds
(baseline SSE2, not one fma instruction in its disassembly). A build that contracts a*b + c
into an fma (gcc's default wherever the target has fma, e.g. aarch64 or -march=native) rounds
some sums differently and may choose another grid for a few sub-blocks.
"""
from __future__ import annotations

import numpy as np
import torch

_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer in the low mantissa
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's "all zero" threshold on max |x|


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32, ggml's nearest_int: round half to even through the magic-number add.

    Out of its |v| < 2^22 range ggml returns the low mantissa bits; so does this, bit for bit,
    which keeps even pathological blocks (a scale near zero) identical after clamping."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def round_clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """nearest_int(v) clipped to lo..hi, as float32 (the C converts its int codes back to float
    for the sums; small integers are exact either way)."""
    return nearest_int(v).clamp_(lo, hi).to(torch.float32)


def seq_sum(t: torch.Tensor, start_at_zero: bool = True) -> torch.Tensor:
    """(n, ...) -> (...): ((0 + t[0]) + t[1]) + ... in float32, the C loop's order.

    start_at_zero=False folds from t[0] itself, as make_qkx2_quants' `sum_w = weights[0]`;
    the two differ only in the sign of an all-zero sum."""
    acc = t[0] + 0.0 if start_at_zero else t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """float32(c) / t, correctly rounded. (`c / t` is reciprocal-then-multiply in torch.)"""
    return torch.full_like(t, c).div_(t)


def signed_absmax(xt: torch.Tensor) -> torch.Tensor:
    """(n, S) -> (S,): the first x of largest |x|, as ggml's `if (ax > amax)` loop picks it."""
    idx = xt.abs().argmax(0, keepdim=True)  # argmax returns the first of equal maxima
    return xt.gather(0, idx)[0]


# --- make_qkx2_quants: codes 0..nmax with a scale and a min, weighted error search -------------


def make_qkx2(xt, wt, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """(n, S) values and weights -> codes (n, S) float32 0..nmax, scale (S,), the_min (S,).

    x ~ scale * code - the_min. Starts from the min/max grid, then tries nstep + 1 grids of
    (nmax + rmin + rdelta * k) steps, each refit by weighted least squares for scale and min,
    and keeps whichever has the smallest weighted error (|diff| when use_mad, else diff^2)."""
    lo = torch.clamp(xt.amin(0), max=0.0)  # (S,): the min is never above 0
    hi = xt.amax(0)
    flat = hi == lo  # a constant (or all-zero) sub-block: codes 0, scale 0, the min as found
    flat_min = lo
    sum_w = seq_sum(wt, start_at_zero=False)
    sum_x = seq_sum(wt * xt, start_at_zero=False)

    iscale = rdiv(float(nmax), hi - lo)
    scale = iscale.reciprocal()
    codes = round_clamp(iscale * (xt - lo), 0, nmax)
    best = _weighted_error(xt, wt, codes, scale, lo, use_mad)

    for k in range(nstep + 1):
        # (rmin + rdelta*k) + nmax, each step rounded to float32 as the C constant expression.
        steps = (np.float32(rmin) + np.float32(rdelta) * np.float32(k)) + np.float32(nmax)
        # The min moves when a grid wins, and the next grids are laid from the new one.
        trial = round_clamp(rdiv(float(steps), hi - lo) * (xt - lo), 0, nmax)
        wl = wt * trial
        sums = seq_sum(torch.stack([wl, wl * trial, wl * xt], 1))  # (n, 3, S) -> (3, S)
        sum_l, sum_l2, sum_xl = sums
        det = sum_w * sum_l2 - sum_l * sum_l
        t_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        t_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = t_min > 0  # a min above 0 is refit as a scale alone, min 0
        t_scale = torch.where(positive, sum_xl / sum_l2, t_scale)
        t_min = torch.where(positive, 0.0, t_min)
        err = _weighted_error(xt, wt, trial, t_scale, t_min, use_mad)
        better = (det > 0) & (err < best)
        codes = torch.where(better, trial, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, t_scale, scale)
        lo = torch.where(better, t_min, lo)

    codes = codes.masked_fill_(flat, 0.0)
    return codes, scale.masked_fill_(flat, 0.0), -torch.where(flat, flat_min, lo)


def _weighted_error(xt, wt, codes, scale, lo, use_mad: bool) -> torch.Tensor:
    """sum_i w_i * f(scale * code_i + min - x_i) in C order; f = |.| or square. (S,)"""
    diff = scale * codes
    diff += lo
    diff -= xt
    diff = diff.abs_() if use_mad else diff * diff
    return seq_sum(wt * diff)


# --- make_qx_quants (rmse_type 1, no importance): signed codes, symmetric scale search --------


def make_qx(xt, nmax: int):
    """(n, S) -> codes (n, S) float32 0..2*nmax-1 (code - nmax is the signed level), scale (S,).

    Weights x^2. Tries the grid with the largest |x| on level -nmax, then 18 nearby grids
    (nmax +- 0.1 * k), keeping the one of largest sum(wlx)^2 / sum(wl^2) (least-squares gain)."""
    mx = signed_absmax(xt)  # (S,)
    w = xt * xt
    wx = w * xt

    def trial(iscale):
        levels = round_clamp(iscale * xt, -nmax, nmax - 1)
        sumlx, suml2 = seq_sum(torch.stack([wx * levels, (w * levels) * levels], 1))
        return levels, sumlx, suml2

    levels, sumlx, suml2 = trial(rdiv(float(-nmax), mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for k in (*range(-9, 0), *range(1, 10)):
        steps = np.float32(nmax) + np.float32(0.1) * np.float32(k)
        t_levels, t_sumlx, t_suml2 = trial(rdiv(float(-steps), mx))
        better = (t_suml2 > 0) & (t_sumlx * t_sumlx > best * t_suml2)
        levels = torch.where(better, t_levels, levels)
        scale = torch.where(better, t_sumlx / t_suml2, scale)
        best = torch.where(better, scale * t_sumlx, best)

    zero = mx.abs() < GROUP_MAX_EPS  # all (nearly) zero: codes 0, not the middle level
    codes = (levels + nmax).masked_fill_(zero, 0.0)
    return codes, scale.masked_fill_(zero, 0.0)


# --- make_q3_quants (do_rmse): signed codes, greedy one-at-a-time refinement ---------------


def make_q3(xt, nmax: int, passes: int = 5):
    """(n, S) -> codes (n, S) float32 0..2*nmax-1, scale (S,).

    Weights x^2. From the grid with the largest |x| on level -nmax, moves one value at a time
    to the level its least-squares scale asks for, keeping the move if sum(wlx)^2 / sum(wl^2)
    grows. Each move changes the sums the next value sees, so values go in order i = 0..n-1.
    ggml stops early after a pass without a move; that pass left the state as it was, so every
    later pass repeats it exactly and running all passes gives the same result."""
    mx = signed_absmax(xt)
    w = xt * xt
    wx = w * xt
    levels = round_clamp(rdiv(float(-nmax), mx) * xt, -nmax, nmax - 1)  # (n, S)
    sumlx, suml2 = seq_sum(torch.stack([wx * levels, (w * levels) * levels], 1))

    for _ in range(passes):
        for i in range(xt.shape[0]):
            old = levels[i]
            slx = sumlx - wx[i] * old
            sl2 = suml2 - (w[i] * old) * old
            new = round_clamp((xt[i] * sl2) / slx, -nmax, nmax - 1)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + (w[i] * new) * new
            take = (slx > 0) & (new != old) & (sl2_new > 0)
            take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
            levels[i] = torch.where(take, new, old)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)

    zero = mx.abs() < GROUP_MAX_EPS
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0).masked_fill_(zero, 0.0)
    return (levels + nmax).masked_fill_(zero, 0.0), scale
