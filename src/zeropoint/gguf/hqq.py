"""HQQ into ggml block types: each block's stored scales (and minimums) fitted to its weights
alone, calibration-free, so that the file stays a valid tensor of its type.

HQQ's half-quadratic alternation (algorithms/hqq.py) runs on the type's own parameters:

    W_e    <- shrink_lp(W - dequant, beta)            the outliers the grid should not stretch for
    params <- least squares of W - W_e given the codes, stored as the type stores them (fit.refit:
              fp16 d and m for the legacy types; the 6-bit sub-block codes and fp16 super-scales
              of the K types)
    codes  <- the type's own rounding of W on the stored grid (fit.round_cols)

starting from the type's own choice (the bytes llama.cpp writes). Every block keeps the iterate of
least squared error, compared in float64 on exactly what ggml dequantizes, so no block ends worse
than the type's own quantization of it. The iterations stop early, as HQQ's do, once the tensor's
error no longer falls.
"""

from __future__ import annotations

import numpy as np
import torch

from ..algorithms.hqq import MIN_GAIN, shrink_lp
from .blocks import dequantize_blocks, quantize_blocks
from .convert import quantize_tensor
from .gptq_grids import GRID_TYPES, block_grid
from .types import TYPES


def hqq_blocks(w: torch.Tensor, qtype: str, *, lp_norm: float = 0.7, beta: float = 10.0,
               kappa: float = 1.01, iters: int = 20) -> torch.Tensor:
    """(rows, n) floats -> (rows, n / block * type_size) uint8 bytes of `qtype` (one of
    GRID_TYPES), n a multiple of the type's block size. HQQ's defaults (p = 0.7, beta = 10,
    kappa = 1.01, 20 iterations) as in algorithms/hqq.py."""
    if qtype not in GRID_TYPES:  # GPTQ's IQ4 grids have no parameter step to refit
        raise ValueError(f"HQQ cannot write ggml type {qtype}; accepted: {', '.join(GRID_TYPES)}")
    grid = block_grid(qtype)
    block = TYPES[qtype].block_size
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"{qtype} takes rows of whole blocks of {block} values, got shape "
                         f"{tuple(w.shape)}")
    n_rows = w.shape[0]
    x = w.detach().to(torch.float32).reshape(-1, block)  # (rows * blocks, block): one block a row
    # The type's own bytes (llama.cpp's): its quantizer also refuses NaN, inf and blocks whose
    # scales overflow fp16, naming them.
    own = quantize_blocks(x, qtype).view(x.shape[0], -1)  # (blocks, type_size)
    fit = grid.fit(x, 0)  # the same scales; rows are independent: one fit covers every block
    codes, w_hat = fit.round_cols(x)
    own_hat, best = w_hat, own.clone()
    best_err = _errors(x, w_hat)
    last_total = float(best_err.sum())
    threshold = beta ** (-1.0 / (2.0 - lp_norm))  # |e| below it shrinks to exactly 0
    for _ in range(iters):
        e = x - w_hat
        target = x - shrink_lp(e, beta, lp_norm) if float(e.abs().max()) > threshold else x
        fit = fit.refit(target, codes)
        codes, w_hat = fit.round_cols(x)
        err = _errors(x, w_hat)
        better = err < best_err
        best[better] = grid.pack([fit], codes)[better]
        best_err = torch.where(better, err, best_err)
        total = float(err.sum())
        if total >= last_total:
            break  # HQQ's early stop: the tensor's error no longer falls
        last_total = total
        beta *= kappa
    # The iterates were ranked in float32; settle each block against the type's own exactly.
    best_hat = dequantize_blocks(best.view(-1), qtype, x.shape)
    keep = _exact_errors(x, best_hat) < _exact_errors(x, own_hat) * (1 - MIN_GAIN)
    return torch.where(keep.unsqueeze(1), best, own).view(n_rows, -1)


def _errors(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """(blocks,) float32 squared error of each block."""
    e = x - w_hat
    return e.mul_(e).sum(1)  # 3x faster than vecdot on rows of 32


def _exact_errors(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """(blocks,) float64 squared error of each block, the differences taken in float64."""
    return (x.double() - w_hat.double()).square_().sum(1)


def hqq_encode(x: torch.Tensor, qtype: str, name: str = "tensor") -> np.ndarray:
    """convert.quantize_tensor with HQQ for the block types that have a grid (GRID_TYPES);
    other types (F32, F16, ...) as quantize_tensor writes them."""
    if qtype not in GRID_TYPES:
        return quantize_tensor(x, qtype, name)
    try:
        out = hqq_blocks(x.reshape(-1, x.shape[-1]), qtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return out.contiguous().view(-1).numpy()
