"""Bit allocation: a spec per layer, from a menu, for the least output damage within a size budget.

Bits per weight here are averaged over the weights of the Linear layers being allocated (the
ones the base recipe quantizes; lm_head stays float by default), with every byte counted: packed
codes, float32 scales and uint8 zero-points, as `QTensor.nbytes` reports them for that shape.
This is the figure `zeropoint quantize` prints as "quantized tensors ... bits/weight".

Each layer's error for each menu spec is the estimated damage to the final output (KL divergence
of the next-token distribution for a language model) when only that layer is quantized with that
spec: 1/2 sum F (W - W_q)^2 with F the diagonal Fisher information (see sensitivity.py), computed
from the real round-to-nearest weights of the spec. Assuming the layers' damages add up, the
problem is a multiple-choice knapsack: minimise sum of errors subject to sum of bytes <= budget.
It is solved the Lagrangian way: every layer walks up the lower convex hull of its (bytes, error)
options, the steps with the best error saved per byte first, and the bytes left over then go to
the single changes that save the most error.
"""

from __future__ import annotations

import glob
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import core
from ..qtensor import qtensor_nbytes
from ..recipe import Recipe, Rule
from ..spec import Granularity, QuantSpec
from .common import Batch, analyzed_layers, as_recipe, one_thread, progress_bar
from .sensitivity import Fisher, fisher_diagonal
from .specs import label
from .specs import menu as default_menu


@dataclass(frozen=True)
class Option:
    spec: QuantSpec
    nbytes: int  # real bytes of the quantized weight: codes + scales + zero-points
    error: float  # estimated damage to the final output with only this layer at this spec


@dataclass
class LayerOptions:
    name: str
    shape: tuple[int, int]
    options: list[Option]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def option(self, spec: QuantSpec) -> Option | None:
        return next((o for o in self.options if o.spec == spec), None)


@dataclass
class Allocation:
    layers: list[LayerOptions]
    chosen: dict[str, Option]  # layer name -> the option picked
    budget_bytes: int
    metric: str = "kl"
    rows: int = 0  # calibration rows (tokens) behind the error estimates
    notes: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.chosen.values())

    @property
    def total_error(self) -> float:
        return sum(o.error for o in self.chosen.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.numel

    @property
    def budget_bpw(self) -> float:
        return 8.0 * self.budget_bytes / self.numel

    def uniform(self, spec: QuantSpec) -> tuple[int, float]:
        """(bytes, estimated error) of `spec` on every allocated layer, for comparison."""
        total_bytes, total_error = 0, 0.0
        for layer in self.layers:
            o = layer.option(spec)
            if o is None:
                raise ValueError(f"{spec.describe()} is not on the menu")
            total_bytes += o.nbytes
            total_error += o.error
        return total_bytes, total_error

    def spec_counts(self) -> list[tuple[str, int, int]]:
        """(spec label, layers, weights) for each spec chosen, most weights first."""
        layers, weights = Counter(), Counter()
        shapes = {layer.name: layer.numel for layer in self.layers}
        for name, o in self.chosen.items():
            layers[label(o.spec)] += 1
            weights[label(o.spec)] += shapes[name]
        return sorted(((k, layers[k], weights[k]) for k in layers), key=lambda t: -t[2])

    def recipe(self, base: Recipe | None = None) -> Recipe:
        """`base` plus one exact-name rule per allocated layer (the rules come last, so they win)."""
        base = base or Recipe()
        if base.activations is not None:
            raise ValueError(
                f"a bit allocation mixes specs per layer, which activation mode "
                f"{base.activations!r} cannot take (it needs 8-bit per-channel weights everywhere)"
            )
        rules = tuple(Rule(glob.escape(name), o.spec) for name, o in self.chosen.items())
        return base.with_rules(rules)


def _row_local(spec: QuantSpec) -> bool:
    """True when every scale block lies within one row of a 2-D weight."""
    if spec.granularity is Granularity.PER_TENSOR:
        return False
    axis = spec.resolved_axis(2)
    return (spec.granularity is Granularity.PER_CHANNEL and axis == 0) or \
        (spec.granularity is Granularity.PER_GROUP and axis == 1)


def _round_trip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero_point = core.choose_qparams(w, spec)
    codes = core.quantize(w, spec, scale, zero_point)
    return core.dequantize(codes, spec, scale, zero_point, w.dtype)


def option_table(
    model: nn.Module,
    fisher: Fisher,
    names: Sequence[str],
    menu: Sequence[QuantSpec],
    *,
    row_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = False,
) -> list[LayerOptions]:
    """Bytes and estimated error of every menu spec for every layer in `names`.

    The error is a sum over the weight's rows, so with `row_fraction` < 1 it is estimated from a
    random subset of rows (scaled up; the same rows for every spec of a layer): the estimate is
    unbiased and cuts the time of quantizing the weights at every menu spec. Specs whose blocks
    span rows (per-tensor) use the whole weight."""
    if not 0 < row_fraction <= 1:
        raise ValueError(f"row_fraction must be in (0, 1], got {row_fraction}")
    modules = dict(analyzed_layers(model))
    gen = torch.Generator().manual_seed(seed)
    table = []
    with one_thread():
        for name in progress_bar(names, "menu errors", progress):
            table.append(_layer_options(name, modules[name], fisher, menu, row_fraction, gen))
    return table


def _layer_options(name, module, fisher: Fisher, menu, row_fraction: float, gen) -> LayerOptions:
    w = module.weight.detach().float()
    diag = fisher.diagonal[name]  # (out_features, in_features)
    n_rows = w.shape[0]
    keep = max(1, min(n_rows, round(n_rows * row_fraction)))
    rows = torch.randperm(n_rows, generator=gen)[:keep].sort().values if keep < n_rows else None
    w_rows = w if rows is None else w[rows]
    d_rows = diag if rows is None else diag[rows]
    options = []
    for spec in menu:
        if rows is not None and _row_local(spec):
            sq = (w_rows - _round_trip(w_rows, spec)).square_()
            damage = float(torch.dot(sq.reshape(-1), d_rows.reshape(-1))) * n_rows / keep
        else:
            sq = (w - _round_trip(w, spec)).square_()
            damage = float(torch.dot(sq.reshape(-1), diag.reshape(-1)))
        error = 0.5 * damage / fisher.rows
        options.append(Option(spec, qtensor_nbytes(tuple(w.shape), spec), error))
    return LayerOptions(name, tuple(w.shape), options)


def solve(layers: Sequence[LayerOptions], budget_bytes: int) -> dict[str, Option]:
    """The option per layer with the least total error whose total bytes fit `budget_bytes`
    (multiple-choice knapsack: greedy on each layer's lower convex hull, then the leftover)."""
    hulls = {layer.name: _hull(layer.options) for layer in layers}
    chosen = {name: hull[0] for name, hull in hulls.items()}
    total = sum(o.nbytes for o in chosen.values())
    if total > budget_bytes:
        numel = sum(layer.numel for layer in layers)
        raise ValueError(
            f"a budget of {8 * budget_bytes / numel:.3f} bits per weight is below the smallest "
            f"the menu can reach, {8 * total / numel:.3f} (every layer at its cheapest spec)"
        )
    heap, step = [], {name: 0 for name in hulls}

    def push(name):
        hull, i = hulls[name], step[name]
        if i + 1 < len(hull):
            a, b = hull[i], hull[i + 1]
            heapq.heappush(heap, (-(a.error - b.error) / (b.nbytes - a.nbytes), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], step[name]
        extra = hull[i + 1].nbytes - hull[i].nbytes
        if total + extra > budget_bytes:
            continue  # the later steps of this hull cost more still
        total += extra
        step[name] = i + 1
        chosen[name] = hull[i + 1]
        push(name)
    # Bytes left over: take, one at a time, the change that saves the most error and fits.
    by_name = {layer.name: layer for layer in layers}
    while True:
        slack = budget_bytes - total
        best, best_gain = None, 0.0
        for name, current in chosen.items():
            for o in by_name[name].options:
                gain = current.error - o.error
                if gain > best_gain and o.nbytes - current.nbytes <= slack:
                    best, best_gain = (name, o), gain
        if best is None:
            return chosen
        name, o = best
        total += o.nbytes - chosen[name].nbytes
        chosen[name] = o


def _hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), cheapest first, error falling."""
    pareto: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if not pareto or o.error < pareto[-1].error:
            if pareto and o.nbytes == pareto[-1].nbytes:
                continue
            pareto.append(o)
    hull: list[Option] = []
    for c in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord from a to c: a step through b saves less per byte
            rise_ab = (b.error - a.error) * (c.nbytes - b.nbytes)
            if rise_ab >= (c.error - b.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate(
    model: nn.Module,
    batches: Sequence[Batch],
    budget_bpw: float,
    *,
    recipe: Recipe | None = None,
    menu: Sequence[QuantSpec] | None = None,
    samples: int = 1,
    row_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = False,
) -> Allocation:
    """Choose a spec per Linear layer that `recipe` quantizes (default: every Linear but
    lm_head), from `menu` (default: specs.menu()), for the least estimated damage to the final
    output at `budget_bpw` average bits per weight over those layers, scales included."""
    if isinstance(budget_bpw, bool) or not isinstance(budget_bpw, (int, float)) or not budget_bpw > 0:
        raise ValueError(
            f"the budget must be a positive number of bits per weight, got {budget_bpw!r}")
    recipe = recipe or Recipe()
    menu = list(menu) if menu is not None else default_menu()
    spec_for = as_recipe(recipe).spec_for
    names = [n for n, m in analyzed_layers(model)
             if spec_for(n) is not None and m.weight.dim() == 2]
    if not names:
        raise ValueError("the recipe keeps every Linear layer in float: there is nothing to allocate")
    fisher = fisher_diagonal(model, batches, names, samples=samples, seed=seed, progress=progress)
    reached = [n for n in names if n in set(fisher.order)]
    notes = []
    if len(reached) < len(names):
        skipped = [n for n in names if n not in set(fisher.order)]
        notes.append(f"{len(skipped)} layer(s) the calibration input never reached keep the "
                     f"recipe's spec: {', '.join(skipped[:5])}")
    table = option_table(model, fisher, reached, menu, row_fraction=row_fraction, seed=seed,
                         progress=progress)
    numel = sum(layer.numel for layer in table)
    budget_bytes = int(budget_bpw * numel / 8)
    chosen = solve(table, budget_bytes)
    return Allocation(table, chosen, budget_bytes, fisher.metric, fisher.rows, notes)
