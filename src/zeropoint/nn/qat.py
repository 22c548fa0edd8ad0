"""Quantization-aware training: Linear layers that train through fake-quantized weights.

core.fake_quantize already passes gradients straight through (identity inside the code range,
zero outside). This module adds a learnable step size, LSQ (Esser et al. 2019, "Learned Step
Size Quantization", ICLR 2020): the scale is a parameter whose gradient says whether a larger
step (less clipping) or a smaller one (less rounding error) lowers the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..calibrate.estimators import RangeMethod, estimate_qparams
from ..core import (
    BlockView,
    check_float_tensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)
from ..spec import QuantSpec, parse_enum

# A step size must stay positive; below this the layer's weights would all round to 0 anyway.
MIN_SCALE = 1e-8


class LSQFakeQuantize(torch.autograd.Function):
    """Fake quantization with gradients for x and for the step size s (Esser et al. 2019, eq. 3).

    With v = x / s, code q = clamp(round(v) + z, qmin, qmax) and x_hat = (q - z) s:
      d x_hat / d x = 1 inside the code range, 0 where clamped (straight-through);
      d x_hat / d s = round(v) - v inside, (qmin - z) or (qmax - z) where clamped;
    the scale's gradient, summed over its block, is multiplied by g = 1 / sqrt(N * Qp)
    (Section 2.2: it keeps the step's updates in proportion to the weights' updates), with N the
    elements sharing the scale and Qp = qmax the positive levels. The zero-point stays fixed.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec, grad_scale: float):
        codes = quantize(x.detach(), spec, scale.detach(), zero_point)
        zp = zero_point if zero_point is not None else scale.new_zeros(())
        ctx.save_for_backward(x, scale, zp)
        ctx.spec, ctx.grad_scale = spec, grad_scale
        return dequantize(codes, spec, scale.detach(), zero_point, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        spec = ctx.spec
        view = BlockView.of(tuple(x.shape), spec.block_size(tuple(x.shape)))
        s = scale.detach().reshape(view.scale_shape).to(x.dtype)
        z = zero_point.to(x.dtype)
        if z.dim():
            z = z.reshape(view.scale_shape)
        v = x.detach().reshape(view.shape) / s
        r = torch.round(v)
        q = r + z
        below, above = q < spec.qmin, q > spec.qmax
        inside = ~(below | above)
        g = grad.reshape(view.shape)
        grad_x = (g * inside).reshape(x.shape)
        dq_ds = torch.where(inside, r - v, torch.where(below, spec.qmin - z, spec.qmax - z))
        grad_s = (g * dq_ds).sum(dim=view.block_dims, keepdim=True) * ctx.grad_scale
        return grad_x, grad_s.reshape(scale.shape).to(scale.dtype), None, None, None


def lsq_grad_scale(x_shape, spec: QuantSpec) -> float:
    """g = 1 / sqrt(N * Qp): N the elements that share one scale, Qp = qmax (Esser et al. 2.2)."""
    view = BlockView.of(tuple(x_shape), spec.block_size(tuple(x_shape)))
    per_block = math.prod(view.shape) // math.prod(view.grid)
    return 1.0 / math.sqrt(per_block * max(spec.qmax, 1))


def lsq_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point=None):
    """Fake-quantize x with a learnable, grid-shaped `scale` (LSQ), differentiable in both."""
    check_float_tensor(x)
    s = scale.clamp(min=MIN_SCALE)  # the gradient passes unchanged above the floor
    return LSQFakeQuantize.apply(x, s, zero_point, spec, lsq_grad_scale(x.shape, spec))


class QATLinear(nn.Module):
    """A Linear that computes with fake-quantized weights, to fine-tune for quantization.

    learn_scale=True: the scale is an LSQ parameter, initialised by the `init` range method
    (mse by default: the best fixed clipping, which LSQ then refines); the zero-point is frozen at
    its initial value. learn_scale=False: min/max scales of the current weights each step, with
    the straight-through gradient of core.fake_quantize.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, learn_scale: bool = True,
                 init: RangeMethod | str = RangeMethod.MSE):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear wraps an nn.Linear, got {type(linear).__name__}")
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.learn_scale = learn_scale
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if learn_scale:
            method = parse_enum(RangeMethod, init, "init")
            scale, zp = estimate_qparams(self.weight.detach(), spec, method)
            self.scale = nn.Parameter(scale.to(self.weight.dtype))
            self.register_buffer("zero_point", None if spec.symmetric else zp)
        else:
            self.scale = None
            self.register_buffer("zero_point", None)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight this layer computes with (differentiable)."""
        if self.learn_scale:
            return lsq_fake_quantize(self.weight, self.spec, self.scale, self.zero_point)
        return fake_quantize(self.weight, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def qparams(self):
        """(scale, zero_point) of the weight as it is now quantized."""
        if self.learn_scale:
            return self.scale.detach().clamp(min=MIN_SCALE).float(), self.zero_point
        return choose_qparams(self.weight.detach(), self.spec)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the quantized weights (on the code grid), for evaluation."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.quantized_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.spec.describe()}, learn_scale={self.learn_scale}")


def _replace(model: nn.Module, make) -> nn.Module:
    for name, child in model.named_children():
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace(child, make)
    return model


def prepare_qat(model: nn.Module, spec: QuantSpec, learn_scale: bool = True,
                init: RangeMethod | str = RangeMethod.MSE) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QATLinear; returns the model."""
    def make(m):
        return QATLinear(m, spec, learn_scale, init) if isinstance(m, nn.Linear) else None

    return _replace(model, make)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every QATLinear (in place) by a plain Linear with its quantized weights."""
    return _replace(model, lambda m: m.to_linear() if isinstance(m, QATLinear) else None)
