"""Activation quantization for any model built from nn.Linear: the inputs of every Linear are
fake-quantized, with scales fixed by calibration (static) or computed on each call (dynamic).

An activation of shape (..., features) is viewed as (tokens, features): every leading dimension
is a token dimension. The spec is read on that view:
  per_tensor                  one scale for the whole activation;
  per_channel, axis 0         one scale per token (row): dynamic only, tokens change every call;
  per_channel, axis 1 or -1   one scale per feature (column);
  per_group, axis -1          per token, groups of features: dynamic only.

Static: calibrate_activations() hooks an observer onto every Linear's input, runs calibration
batches under inference_mode and freezes the observers into fixed scales; apply_static() then
fake-quantizes each input with them. Dynamic: apply_dynamic() computes min/max scales of each
input as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..calibrate.observers import MinMaxObserver, Observer
from ..core import choose_qparams, fake_quantize
from ..spec import Granularity, QuantSpec
from .layers import linear_layers

# Named in the error for a model without a Linear layer.
_NEEDED_FOR = "quantizing the inputs of Linear layers"


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., features) -> (tokens, features), a view where the layout allows."""
    return x.reshape(-1, x.shape[-1])


def _is_per_token(spec: QuantSpec) -> bool:
    if spec.granularity is Granularity.PER_GROUP:
        return True
    return spec.granularity is Granularity.PER_CHANNEL and spec.resolved_axis(2) == 0


def check_static_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if _is_per_token(spec):
        raise ValueError(
            f"{spec.describe()} (axis {spec.axis}) gives a scale per token, and tokens change "
            "from call to call: static activation scales take per_tensor or per_channel with "
            "axis=-1 (per feature); per-token scales are what apply_dynamic() is for"
        )


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class ActivationHooks:
    """Forward pre-hooks on a model's Linear layers; remove() takes them all off again.

    Usable as a context manager: `with apply_static(model, spec, qparams): model(x)`.
    """

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def calibrate_activations(
    model: nn.Module,
    batches: Iterable,
    spec: QuantSpec,
    observer: Callable[[QuantSpec], Observer] = MinMaxObserver,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Observe the input of every nn.Linear over `batches` and freeze it into fixed qparams.

    batches: model inputs, each a tensor (model(b)), a tuple/list (model(*b)) or a dict
    (model(**b)). observer: builds one observer per layer from the spec, e.g. MinMaxObserver,
    MovingAverageMinMaxObserver, or `lambda s: HistogramObserver(s, HistogramConfig("mse"))`.
    The model runs in eval mode (dropout off, as at inference) under inference_mode; its mode
    and hooks are restored afterwards. Returns {layer name: (scale, zero_point)}.
    """
    check_static_spec(spec)
    layers = linear_layers(model, _NEEDED_FOR)
    observers = {name: observer(spec) for name in layers}

    def hook_for(name):
        def hook(module, args):
            observers[name].update(_tokens(args[0]))
        return hook

    hooks = ActivationHooks([m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()])
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                _call(model, batch)
                seen += 1
    finally:
        hooks.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate_activations got no batches; it needs at least one")
    unused = [n for n, o in observers.items() if o.batches == 0]
    if unused:
        raise ValueError(f"these Linear layers never ran on the calibration batches: {unused}")
    return {name: obs.qparams() for name, obs in observers.items()}


def apply_static(
    model: nn.Module, spec: QuantSpec, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> ActivationHooks:
    """Fake-quantize the input of every calibrated Linear with its frozen (scale, zero_point).

    Values beyond the calibrated range saturate at the end codes, as on integer hardware.
    """
    check_static_spec(spec)
    layers = linear_layers(model, _NEEDED_FOR)
    missing = sorted(set(layers) - set(qparams))
    if missing:
        raise ValueError(
            f"no calibrated qparams for Linear layers {missing}; calibrate this model first"
        )

    def hook_for(scale, zp):
        def hook(module, args):
            x = args[0]
            xq = fake_quantize(_tokens(x), spec, scale, zp).view(x.shape)
            return (xq,) + tuple(args[1:])
        return hook

    return ActivationHooks(
        [m.register_forward_pre_hook(hook_for(*qparams[n])) for n, m in layers.items()]
    )


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize an activation with min/max scales of its own: per tensor, per token, per
    feature or per token-group, as the spec reads on the (tokens, features) view."""
    t = _tokens(x)
    scale, zp = choose_qparams(t.detach(), spec)
    return fake_quantize(t, spec, scale, zp).view(x.shape)


def apply_dynamic(model: nn.Module, spec: QuantSpec) -> ActivationHooks:
    """Fake-quantize the input of every Linear with scales computed from that input, per call."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")

    def hook(module, args):
        return (dynamic_fake_quantize(args[0], spec),) + tuple(args[1:])

    layers = linear_layers(model, _NEEDED_FOR).values()
    return ActivationHooks([m.register_forward_pre_hook(hook) for m in layers])
