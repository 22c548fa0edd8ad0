"""Layer by layer: the error each Linear makes on its own, and the error it has gathered.

For every nn.Linear, in the order its forward hook fires:

- weight SQNR: the quantized weight against the float weight (from the QTensor);
- isolated SQNR: the layer's output when only this layer is quantized and its input is the float
  model's input, against the float output: F.linear(x_float, W_q) vs F.linear(x_float, W);
- accumulated SQNR: the layer's output when this layer and every layer before it are quantized,
  against the same output in the float model;
- input SQNR: the layer's input in the quantized model against the float model's: the error the
  layer receives from the layers before it.

Cost: per window of tokens, ONE float pass and ONE quantized pass per spec, with hooks. The float
pass computes every isolated output right in the hook (the float input is at hand there) and
keeps each layer's float input and output until the quantized passes of the same window have
compared with them; then they are dropped. They are kept by reference (the model made them and
lets go of them), and if the model changes one in place afterwards (an in-place activation), the
version counter shows it and the window runs again keeping float32 copies. Memory is one
window's inputs and outputs of every Linear, whatever the number of tokens: for SmolLM2-135M at
512 tokens about 0.5 GB. Error sums are float32 dot products added up in float64.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import power_ratio_db
from ..recipe import Recipe
from ..spec import QuantSpec
from .common import (
    Batch, analyzed_layers, as_recipe, final_output, one_thread, progress_bar, quantize_weight,
    run, swapped_weights,
)
from .specs import format_spec, label


@dataclass
class LayerError:
    index: int  # forward order: the order in which the layers' hooks first fired
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    spec: str  # e.g. 'int4 sym g128', or 'float' for a layer kept in float
    weight_sqnr_db: float
    isolated_sqnr_db: float  # the error this layer makes on its own
    accumulated_sqnr_db: float  # the error at its output with it and every layer before quantized
    input_sqnr_db: float  # the error it receives: its input in the quantized model
    signal_power: float  # mean square of the float output
    isolated_noise: float  # mean square error of the output, this layer alone quantized
    accumulated_noise: float  # mean square error of the output, all layers quantized
    nbytes: int | None  # bytes of the quantized weight (codes, scales, zero-points); None: float
    bits_per_weight: float | None
    calls: int  # forward calls per pass summed over windows (more than the windows: a shared layer)

    def to_dict(self) -> dict:
        """JSON-safe record: infinite SQNR (an exact layer) is written as the string 'inf'."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        for k, v in d.items():
            if isinstance(v, float) and math.isinf(v):
                d[k] = "inf" if v > 0 else "-inf"
        return d


@dataclass
class LayerwiseResult:
    spec: str  # label of the spec or recipe that was applied
    code: str  # the compact form of a uniform spec ('4:g128:sym'), or 'recipe'
    layers: list[LayerError]
    tokens: int  # rows of output per layer per pass: tokens for a language model
    seconds: float = 0.0  # wall time of the whole analysis (shared by every spec of one call)
    not_run: list[str] = field(default_factory=list)  # Linear layers the input never reached

    def records(self) -> list[dict]:
        return [dict(layer.to_dict(), spec_code=self.code) for layer in self.layers]


class _Acc:
    """Error sums for one layer under one spec (float64 Python floats)."""

    __slots__ = ("iso", "acc", "inp", "_mark")

    def __init__(self):
        self.iso = self.acc = self.inp = 0.0
        self._mark = (0.0, 0.0, 0.0)

    def mark(self):
        self._mark = (self.iso, self.acc, self.inp)

    def undo(self):
        self.iso, self.acc, self.inp = self._mark


class _FloatStats:
    """Signal sums for one layer over the float passes."""

    __slots__ = ("signal", "in_signal", "elements", "in_elements", "calls", "_mark")

    def __init__(self):
        self.signal = self.in_signal = 0.0
        self.elements = self.in_elements = self.calls = 0
        self._mark = (0.0, 0.0, 0, 0, 0)

    def mark(self):
        self._mark = (self.signal, self.in_signal, self.elements, self.in_elements, self.calls)

    def undo(self):
        self.signal, self.in_signal, self.elements, self.in_elements, self.calls = self._mark


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _sum_sq(t: torch.Tensor) -> float:
    with one_thread():
        t = _f32(t).reshape(-1)
        return float(torch.dot(t, t))


def _sq_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum((a - b)^2); exactly 0 when a and b are equal."""
    with one_thread():
        d = (_f32(a) - _f32(b)).reshape(-1)
        return float(torch.dot(d, d))


class _Once:
    """A value per distinct live tensor: q, k and v (gate and up) read one input tensor, whose
    figures are computed once. The weak reference and the version counter tell the same
    unchanged tensor from a new one that reuses a freed tensor's id, or one changed in place."""

    def __init__(self):
        self.seen: dict[int, tuple] = {}

    def get(self, t: torch.Tensor, compute):
        hit = self.seen.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        value = compute(t)
        self.seen[id(t)] = (weakref.ref(t), t._version, value)
        return value


def analyze_layers(
    model: nn.Module,
    batches: Sequence[Batch],
    specs: Sequence[QuantSpec | Recipe | None],
    *,
    keep_float: Sequence[str] = (),
    progress: bool = False,
) -> list[LayerwiseResult]:
    """Weight, isolated, accumulated and input SQNR of every Linear under each of `specs`.

    specs: uniform QuantSpecs (None: every layer float), or Recipes; `keep_float` name patterns
    stay float in all of them. One float pass per batch, shared by the specs, and one quantized
    pass per batch per spec. Returns one result per spec, layers in forward order.
    """
    if not specs:
        raise ValueError("give at least one spec to analyze")
    if not batches:
        raise ValueError("give at least one batch of calibration input")
    started = time.perf_counter()
    layers = analyzed_layers(model)
    names = {m: n for n, m in layers}
    plans: list[dict[nn.Module, torch.Tensor]] = []  # per spec: module -> dequantized weight
    weight_info: list[dict[nn.Module, tuple]] = []  # per spec: module -> (label, sqnr, bytes, bpw)
    for what in specs:
        plan, info = _quantize_weights(layers, as_recipe(what, keep_float).spec_for, progress)
        plans.append(plan)
        weight_info.append(info)

    order: list[nn.Module] = []
    stats = {m: _FloatStats() for _, m in layers}
    acc = [{m: _Acc() for _, m in layers} for _ in specs]
    tokens = 0
    steps = progress_bar(range(len(batches) * (1 + len(specs))), "analyze", progress)
    for batch in batches:
        stored, out = _float_pass(model, batch, layers, plans, stats, acc, order, copy=False)
        if not _unchanged(stored):
            # Something changed a layer's input or output in place after the layer ran (an
            # in-place activation, say): run this window again keeping copies instead.
            for st in stats.values():
                st.undo()
            for per_spec in acc:
                for a in per_spec.values():
                    a.undo()
            stored, out = _float_pass(model, batch, layers, plans, stats, acc, order, copy=True)
        tokens += _rows(out)
        del out
        steps.update()
        for k, plan in enumerate(plans):
            _quantized_pass(model, batch, layers, names, plan, stored, acc[k])
            steps.update()
        del stored
    steps.close()

    elapsed = time.perf_counter() - started
    results = []
    for k, what in enumerate(specs):
        rows = []
        for index, module in enumerate(order):
            s, a = stats[module], acc[k][module]
            spec_label, w_sqnr, nbytes, bpw = weight_info[k][module]
            n = max(1, s.elements)
            rows.append(LayerError(
                index=index,
                name=names[module],
                shape=tuple(module.weight.shape),
                spec=spec_label,
                weight_sqnr_db=w_sqnr,
                isolated_sqnr_db=power_ratio_db(s.signal, a.iso),
                accumulated_sqnr_db=power_ratio_db(s.signal, a.acc),
                input_sqnr_db=power_ratio_db(s.in_signal, a.inp),
                signal_power=s.signal / n,
                isolated_noise=a.iso / n,
                accumulated_noise=a.acc / n,
                nbytes=nbytes,
                bits_per_weight=bpw,
                calls=s.calls,
            ))
        if isinstance(what, Recipe):
            spec_text, code = "recipe", "recipe"
        else:
            spec_text, code = label(what), format_spec(what)
        kept = [n for n, _ in layers if any(fnmatchcase(n, p) for p in keep_float)]
        if kept and spec_text != "float":
            which = ", ".join(kept) if len(kept) <= 2 else f"{len(kept)} layers"
            spec_text += f" ({which} float)"
        not_run = [n for n, m in layers if stats[m].calls == 0]
        results.append(LayerwiseResult(spec_text, code, rows, tokens, elapsed, not_run))
    return results




def _quantize_weights(layers, spec_for, progress: bool):
    """(module -> dequantized weight for the quantized layers, module -> (label, weight SQNR,
    bytes, bits per weight) for all)."""
    plan, info = {}, {}
    with one_thread():
        for name, module in progress_bar(layers, "quantize weights", progress):
            spec = spec_for(name)
            if spec is None:
                info[module] = ("float", math.inf, None, None)
                continue
            try:
                q = quantize_weight(module, spec)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            w = module.weight.detach()
            w_q = q.dequantize().to(w.dtype)
            plan[module] = w_q
            info[module] = (label(spec), power_ratio_db(_sum_sq(w), _sq_err(w, w_q)), q.nbytes,
                            q.bits_per_weight)
    return plan, info

def _float_pass(model, batch, layers, plans, stats, acc, order, copy: bool):
    """Run the float model on `batch`, keeping each layer's input and output (by reference, or
    as float32 copies with `copy`) and adding up signal powers and isolated errors."""
    stored: dict[nn.Module, list] = {}
    in_power = _Once()
    for s in stats.values():
        s.mark()
    for per_spec in acc:
        for a in per_spec.values():
            a.mark()

    def hook(module, args, out):
        x = args[0]
        if module not in stored:
            stored[module] = []
            if module not in order:
                order.append(module)
        y = out.detach()
        if copy:
            x_keep, y_keep = x.detach().to(torch.float32, copy=True), y.to(torch.float32, copy=True)
        else:
            x_keep, y_keep = x, y
        stored[module].append((x_keep, x._version, y_keep, y._version))
        s = stats[module]
        s.calls += 1
        s.signal += _sum_sq(y)
        s.elements += y.numel()
        s.in_signal += in_power.get(x, _sum_sq)
        s.in_elements += x.numel()
        for k, plan in enumerate(plans):
            w_q = plan.get(module)
            if w_q is not None:
                y_iso = F.linear(x, w_q.to(x.dtype), module.bias)
                acc[k][module].iso += _sq_err(y_iso, y)

    with _hooks(layers, hook), torch.no_grad():
        out = run(model, batch)
    return stored, out


def _unchanged(stored) -> bool:
    return all(x._version == xv and y._version == yv
               for kept in stored.values() for x, xv, y, yv in kept)


def _quantized_pass(model, batch, layers, names, plan, stored, acc):
    """Run `batch` with every planned weight swapped for its quantized one and add up, per
    layer, the error of its output and of its input against the float pass."""
    calls = dict.fromkeys(stored, 0)
    in_noise = _Once()

    def hook(module, args, out):
        i = calls.get(module, 0)
        kept = stored.get(module, ())
        if i >= len(kept):
            raise RuntimeError(
                f"{names[module]} ran more often in the quantized pass than in the float pass: the "
                "model's control flow depends on its values, so its layers cannot be matched"
            )
        calls[module] = i + 1
        x_float, _, y_float, _ = kept[i]
        acc[module].acc += _sq_err(out, y_float)
        acc[module].inp += in_noise.get(args[0], lambda x: _sq_err(x, x_float))

    with swapped_weights(plan), _hooks(layers, hook), torch.no_grad():
        run(model, batch)

def _rows(out) -> int:
    y, _ = final_output(out)
    return int(y.shape[:-1].numel())


class _hooks:
    """Forward hooks on every Linear for the duration of a `with` block."""

    def __init__(self, layers, fn):
        self.layers, self.fn, self.handles = layers, fn, []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self.fn) for _, m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False
