"""Importance: the sum of x^2 of each input column of chosen layers over calibration tokens,
collected by forward hooks, and the calibration windows llama-imatrix feeds its model.

llama.cpp's importance matrix (tools/imatrix) is exactly these sums with their token counts;
quantizers weight each column's rounding error by the mean, sum / count. It is the diagonal of
GPTQ's Hessian X X^T / n (times 2), at a cost of one multiply-add per input element instead of
a matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


class SquaredInputs:
    """Forward pre-hooks that add up x^2 per input column of each module in `modules`.

    `with SquaredInputs(modules) as acc: model(...)`; then acc.sums[name] is float64 (in,) and
    acc.counts[name] the number of tokens (rows of the flattened input) seen. The hooks read the
    module's first positional input, of shape (..., in); modules fed the same tensor (q/k/v,
    gate/up) share one reduction.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.modules}
        self._handles: list = []
        # (input, its column sums): holding the input keeps its identity from being reused
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> SquaredInputs:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _hook_for(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor as first input, got {type(x).__name__}")
            if self._last is not None and self._last[0] is x:
                col = self._last[1]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
                col = (flat * flat).sum(0).double()  # (in,)
                self._last = (x, col)
            if name in self.sums:
                self.sums[name] += col
            else:
                self.sums[name] = col.clone()
            self.counts[name] += x.numel() // x.shape[-1]
        return hook


def imatrix_windows(ids: torch.Tensor, n_ctx: int, bos_id: int | None,
                    max_windows: int | None = None) -> torch.Tensor:
    """(n_windows, n_ctx) token ids cut from `ids` as llama-imatrix cuts them.

    `ids`: the whole text's ids, 1-D, with a leading BOS when the model adds one (llama.cpp
    tokenizes with its special tokens). Consecutive windows of n_ctx from the start, the rest
    dropped; at least 2 windows' worth of tokens are required. With `bos_id` (the model adds a
    BOS) each window's first token is replaced by BOS.
    """
    if n_ctx < 2:
        raise ValueError(f"the context must be at least 2 tokens, got {n_ctx}")
    ids = ids.reshape(-1)
    if ids.numel() < 2 * n_ctx:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; a context of {n_ctx} "
                         f"needs at least {2 * n_ctx} (as llama-imatrix): give a longer text "
                         "or a smaller context")
    n = ids.numel() // n_ctx
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"need at least one window, got {max_windows}")
        n = min(n, max_windows)
    windows = ids[: n * n_ctx].reshape(n, n_ctx).clone()  # (n_windows, n_ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


@torch.inference_mode()
def collect_squared_inputs(forward: Callable[[torch.Tensor], object],
                           modules: Mapping[str, nn.Module], windows: torch.Tensor,
                           batch: int = 1, progress: bool = False) -> SquaredInputs:
    """Run `forward(ids)` over `windows` (n, n_ctx), `batch` windows at a time, each window an
    independent sequence, and return the sums of x^2 of every module in `modules`."""
    from tqdm.auto import tqdm

    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    starts = range(0, windows.shape[0], batch)
    with SquaredInputs(modules) as acc:
        for start in tqdm(starts, desc="imatrix", unit="batch", disable=not progress):
            forward(windows[start : start + batch])
    return acc
