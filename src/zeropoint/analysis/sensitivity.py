"""Sensitivity: how much the model's final output suffers when only one layer is quantized.

Damage is measured on the final output against the float model, averaged over output rows
(tokens): for a language model the KL divergence KL(p_float || p_quantized) of the next-token
distribution, in nats; for an encoder (or any other module) 1 - cosine between the float and the
quantized output row (the last hidden state of each token).

Measuring it exactly costs one forward pass per layer (210 for SmolLM2). So every layer gets a
second-order estimate from ONE forward and backward pass, and a few layers get the exact
measure, which validates the estimate (rank correlation) where it matters.

The estimate. Both damages vanish with a zero gradient at the float output, so to second order
damage = 1/2 d^T M d, with d the change of the output row and M the Hessian of the damage there:
diag(p) - p p^T for KL over logits (Fisher information of the softmax), (I - h h^T / |h|^2) / |h|^2
for 1 - cos(h, h + d). Draw z with covariance M (z = onehot(y) - p with y ~ p; z = the part of a
Gaussian orthogonal to h, over |h|) and back-propagate z . output: the squared weight gradient
is then an unbiased estimate of the diagonal of M pulled back to the weights, the diagonal Fisher
information F (as in SqueezeLLM, Kim et al. 2023, section 3.1). A quantized weight W_q changes
the damage by about 1/2 sum F (W - W_q)^2 per row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe import Recipe
from ..spec import QuantSpec
from .common import (
    Batch, analyzed_layers, as_recipe, final_output, frozen, one_thread, progress_bar,
    quantize_weight, run, swapped_weights,
)
from .specs import label

METRIC_NAMES = {"kl": "KL divergence (nats)", "cosine": "1 - cosine"}


@dataclass
class Fisher:
    """Diagonal Fisher information of each Linear weight for the final-output damage."""

    diagonal: dict[str, torch.Tensor]  # name -> (out_features, in_features), summed over rows
    rows: int  # output rows (tokens) the sums run over
    metric: str  # 'kl' or 'cosine'
    order: list[str]  # layer names in forward order
    samples: int = 1

    def damage(self, name: str, weight: torch.Tensor, weight_q: torch.Tensor) -> float:
        """Estimated mean damage per output row when `weight` becomes `weight_q`."""
        d = (weight.detach().float() - weight_q.float()).square_()
        return 0.5 * float(torch.dot(d.reshape(-1), self.diagonal[name].reshape(-1))) / self.rows


def fisher_diagonal(
    model: nn.Module,
    batches: Sequence[Batch],
    names: Sequence[str] | None = None,
    *,
    samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> Fisher:
    """Diagonal Fisher information of the Linear weights `names` (default: every Linear), from
    one forward and `samples` backward passes per batch. Parameters are left as they were."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    layers = analyzed_layers(model)
    wanted = set(names) if names is not None else {n for n, _ in layers}
    targets = [(n, m) for n, m in layers if n in wanted]
    if not targets:
        raise ValueError("no Linear layer to estimate sensitivity for")
    gen = torch.Generator().manual_seed(seed)
    diag = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in targets}
    order: list[str] = []
    by_module = {m: n for n, m in targets}

    def record_order(module, args, out):
        name = by_module[module]
        if name not in order:
            order.append(name)

    rows, metric = 0, None
    # Fresh weight Parameters that need grad, sharing the weights' storage: only these get a
    # gradient, and a tied weight (lm_head / embedding) gets only its own use's gradient.
    fresh = {m: m.weight.detach() for _, m in targets}
    handles = [m.register_forward_hook(record_order) for _, m in targets]
    try:
        with frozen(model), swapped_weights(fresh, requires_grad=True), torch.enable_grad():
            for batch in progress_bar(batches, "fisher", progress):
                y, metric = final_output(run(model, batch))
                y2 = y.reshape(-1, y.shape[-1])  # (rows, features)
                rows += y2.shape[0]
                for s in range(samples):
                    z = _probe(y2.detach().float(), metric, gen)
                    (y2 * z.to(y2.dtype)).sum().backward(retain_graph=s < samples - 1)
                    with one_thread():
                        for _, m in targets:
                            if m.weight.grad is not None:
                                diag[by_module[m]].addcmul_(m.weight.grad, m.weight.grad)
                                m.weight.grad = None
                del y, y2
    finally:
        for h in handles:
            h.remove()
    for d in diag.values():
        d.div_(samples)
    return Fisher(diag, rows, metric or "kl", order, samples)


def _probe(y: torch.Tensor, metric: str, gen: torch.Generator) -> torch.Tensor:
    """A random z (rows, features) whose covariance, row by row, is the Hessian of the damage."""
    if metric == "kl":
        p = torch.softmax(y, dim=-1)
        picked = torch.multinomial(p, 1, generator=gen)  # (rows, 1): y ~ p
        return (-p).scatter_add_(1, picked, torch.ones_like(picked, dtype=p.dtype))
    norm = y.norm(dim=-1, keepdim=True)
    unit = y / norm.clamp_min(torch.finfo(y.dtype).tiny)
    u = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    z = (u - (u * unit).sum(-1, keepdim=True) * unit) / norm.clamp_min(torch.finfo(y.dtype).tiny)
    return torch.where(norm > 0, z, torch.zeros_like(z))


class _Reference:
    """The float model's final outputs on the batches, in the form the damage needs."""

    def __init__(self, model, batches):
        self.items, self.metric = [], None
        with torch.no_grad():
            for batch in batches:
                y, self.metric = final_output(run(model, batch))
                self.items.append(_prepare(y.float(), self.metric))

    def damage(self, model, batches) -> float:
        """Mean damage per output row of `model` (as it is now) against the float reference."""
        total, rows = 0.0, 0
        with torch.no_grad():
            for batch, ref in zip(batches, self.items):
                y, _ = final_output(run(model, batch))
                y = _prepare(y.float(), self.metric)
                if self.metric == "kl":
                    # sum_v p_f (log p_f - log p_q), rows where both agree give exactly 0
                    per_row = F.kl_div(y, ref, log_target=True, reduction="none").sum(-1)
                else:
                    per_row = 1.0 - (y * ref).sum(-1)
                total += float(per_row.double().sum())
                rows += per_row.numel()
        return total / max(1, rows)


def _prepare(y: torch.Tensor, metric: str) -> torch.Tensor:
    y = y.reshape(-1, y.shape[-1])
    if metric == "kl":
        return torch.log_softmax(y, dim=-1)
    return F.normalize(y, dim=-1)


@dataclass
class LayerSensitivity:
    name: str
    index: int  # forward order
    spec: str
    estimated: float  # second-order estimate of the damage with only this layer quantized
    measured: float | None = None  # the exact damage, for the layers that were measured
    rank: int = 0  # 1: the most damaging layer

    def to_dict(self) -> dict:
        return {"layer": self.name, "index": self.index, "spec": self.spec, "rank": self.rank,
                "estimated": self.estimated, "measured": self.measured}


@dataclass
class SensitivityResult:
    metric: str  # 'kl' or 'cosine'
    layers: list[LayerSensitivity]  # most damaging first
    rows: int  # output rows (tokens) the damage is averaged over
    spec: str
    spearman: float | None = None  # rank correlation of estimated vs measured, measured layers
    seconds: float = 0.0
    ranked_by: str = "estimated"
    notes: list[str] = field(default_factory=list)

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]


def layer_sensitivity(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: QuantSpec | Recipe,
    *,
    keep_float: Sequence[str] = (),
    exact: int | str = 8,
    samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SensitivityResult:
    """Damage to the final output when only one layer is quantized, for every layer `spec`
    quantizes, ranked from most to least damaging.

    Every layer gets the Fisher estimate; `exact` layers (an int, or 'all') are also measured
    exactly, one forward pass each over the batches: half of them the layers estimated worst,
    the rest spread evenly over the ranking, so that the rank correlation means something.
    """
    started = time.perf_counter()
    spec_for = as_recipe(spec, keep_float).spec_for
    layers = [(n, m, spec_for(n)) for n, m in analyzed_layers(model)]
    layers = [(n, m, s) for n, m, s in layers if s is not None]
    if not layers:
        raise ValueError("the spec keeps every layer in float: there is no layer to rank")
    fisher = fisher_diagonal(model, batches, [n for n, _, _ in layers], samples=samples,
                             seed=seed, progress=progress)
    position = {n: i for i, n in enumerate(fisher.order)}
    rows, quantized = [], {}
    with one_thread():
        for name, module, s in layers:
            if name not in position:
                continue  # the input never reaches it
            w_q = quantize_weight(module, s).dequantize().to(module.weight.dtype)
            quantized[name] = (module, w_q)
            damage = fisher.damage(name, module.weight, w_q)
            rows.append(LayerSensitivity(name, position[name], label(s), damage))
    rows.sort(key=lambda r: r.estimated, reverse=True)

    chosen = _pick_exact(len(rows), exact)
    notes = []
    if chosen:
        reference = _Reference(model, batches)
        for i in progress_bar(chosen, "exact sensitivity", progress):
            module, w_q = quantized[rows[i].name]
            with swapped_weights({module: w_q}):
                rows[i].measured = reference.damage(model, batches)
    measured = [r for r in rows if r.measured is not None]
    rho = spearman([r.estimated for r in measured], [r.measured for r in measured]) \
        if len(measured) >= 3 else None
    ranked_by = "estimated"
    if len(measured) == len(rows):
        rows.sort(key=lambda r: r.measured, reverse=True)
        ranked_by = "measured"
    for rank, r in enumerate(rows, 1):
        r.rank = rank
    if fisher.metric == "kl" and measured:
        ratio = [r.measured / r.estimated for r in measured if r.estimated > 0]
        if ratio:
            ratio.sort()
            notes.append(f"measured / estimated: median {ratio[len(ratio) // 2]:.2f} over "
                         f"{len(ratio)} measured layers")
    spec_text = "recipe" if isinstance(spec, Recipe) else label(spec)
    return SensitivityResult(fisher.metric, rows, fisher.rows, spec_text, rho,
                             time.perf_counter() - started, ranked_by, notes)


def _pick_exact(n: int, exact) -> list[int]:
    """Ranks (0 = estimated worst) to measure exactly: the worst half, the rest spread out."""
    if exact == "all":
        return list(range(n))
    if isinstance(exact, bool) or not isinstance(exact, int) or exact < 0:
        raise ValueError(f"exact must be a count >= 0 or 'all', got {exact!r}")
    k = min(exact, n)
    if k == 0:
        return []
    top = list(range((k + 1) // 2))
    rest = k - len(top)
    if rest:
        lo = len(top)
        span = n - 1 - lo
        top += sorted({lo + round(span * (j + 1) / rest) for j in range(rest)})
    return sorted(set(top))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
