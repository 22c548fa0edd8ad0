"""quantize_model: replace a model's Linear (and optionally Embedding) layers with packed ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from ..qtensor import QTensor
from ..recipe import Recipe
from .fuse import fuse_shared_inputs
from .layers import module_kind, replace_module
from .qlinear import QEmbedding, QLinear


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    spec: str
    bytes: int  # codes + scales + zero-points
    bits_per_weight: float
    kernel: str


@dataclass
class ModelReport:
    layers: list[LayerReport] = field(default_factory=list)
    params: int = 0  # parameters of the float model (tied ones once)
    float_bytes: int = 0  # measured: bytes of the float model's parameters and buffers
    resident_bytes: int = 0  # measured: what the quantized model holds, kernel copies included
    stored_bytes: int = 0  # what its weights take on disk: packed layers plus float tensors

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per parameter over the whole model, float layers and scales included."""
        return 8.0 * self.stored_bytes / max(1, self.params)


def storage_key(t) -> tuple:
    """Equal for tensors that are views of the same memory (tied weights)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def distinct_tensors(tensors):
    """Each tensor once, however many names share it (tied weights)."""
    seen = set()
    for t in tensors:
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            yield t


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, elements) of the distinct tensors a model holds: parameters, buffers and the
    packed weights of quantized layers. Tied parameters count once."""
    total = elements = 0
    for t in distinct_tensors(list(model.parameters()) + list(model.buffers())):
        total += t.nbytes
        elements += t.numel()
    for m in model.modules():
        if isinstance(m, (QLinear, QEmbedding)):
            total += m.resident_bytes() - (m.bias.nbytes if getattr(m, "bias", None) is not None else 0)
            elements += m.weight_q.numel
    return total, elements


def _targets(model: nn.Module, recipe: Recipe):
    for name, module in model.named_modules():
        spec = recipe.spec_for(name, module_kind(module))
        if spec is not None:
            yield name, module, spec


def quantize_model(model: nn.Module, recipe: Recipe | None = None, *, progress: bool = False,
                   backend: str = "auto", quantize_fn=None, fuse: bool = True) -> ModelReport:
    """Replace, in place, every Linear (and Embedding, if the recipe says so) that the recipe
    gives a spec with a QLinear/QEmbedding holding the packed weight. Returns what it did and
    the measured sizes.

    quantize_fn(name, weight, spec) -> QTensor lets error-correcting methods supply the codes;
    the default is round-to-nearest with min/max scales. fuse: give sibling layers that read the
    same input (q/k/v, gate/up) one matmul, with bit-identical outputs (see fuse.py).
    """
    recipe = recipe or Recipe.chosen()
    params = sum(t.numel() for t in distinct_tensors(model.parameters()))
    report = ModelReport(params=params, float_bytes=model_bytes(model)[0])
    targets = list(_targets(model, recipe))
    # A weight tied between modules (an embedding that is also the output head) with one spec
    # is quantized once and shared, so that it is stored once (modeldir/writer.py).
    done: dict[tuple, QTensor] = {}
    for name, module, spec in tqdm(targets, desc="quantize", unit="tensor", disable=not progress):
        w = module.weight.detach()
        key = (*storage_key(w), spec)
        tied = key in done
        try:
            if tied:
                q = done[key]
            else:
                q = quantize_fn(name, w, spec) if quantize_fn else QTensor.quantize(w, spec)
        except ValueError as e:
            raise ValueError(f"{name}.weight {tuple(w.shape)}: {e}") from None
        done[key] = q
        if isinstance(module, nn.Linear):
            new = QLinear(q, module.bias, recipe.activations, backend)
            kernel = new.kernel.backend
        else:
            new = QEmbedding.replacing(module, q)
            kernel = "lookup"
        replace_module(model, name, new)
        report.layers.append(LayerReport(name, q.shape, spec.describe(), 0 if tied else q.nbytes,
                                         q.bits_per_weight, kernel))
    if fuse:
        fuse_shared_inputs(model, backend)
    report.resident_bytes, _ = model_bytes(model)
    stored_float = sum(t.nbytes for t in distinct_tensors(model.parameters()))
    report.stored_bytes = sum(layer.bytes for layer in report.layers) + stored_float
    return report


def importance_quantize_fn(importance):
    """A quantize_fn (see quantize_model) for round-to-nearest under an importance matrix:
    `importance(name)` -> the layer's weight per input column (gguf.imatrix's mean x^2), or None
    where it has no entry. Each block's scale and zero-point are then the clip of its range that
    minimises the importance-weighted squared error (calibrate.mse_qparams); a layer without an
    entry keeps plain min/max, as llama-quantize quantizes one plainly."""
    from ..calibrate.estimators import mse_qparams

    def quantize(name: str, w, spec):
        imp = importance(name)
        if imp is None:
            return QTensor.quantize(w, spec)
        return QTensor.quantize(w, spec, *mse_qparams(w, spec, importance=imp))

    return quantize


def fitted_quantize_fn(name: str, w, spec):
    """A quantize_fn (see quantize_model) for round-to-nearest with each block's scale and
    minimum searched for least squared error (calibrate.fit) where the spec has a float
    zero-point; min/max elsewhere."""
    from ..calibrate.fit import fitted_qparams

    if not spec.float_zero_point:
        return QTensor.quantize(w, spec)
    return QTensor.quantize(w, spec, *fitted_qparams(w, spec))


def quantized_layers(model: nn.Module):
    """(name, module) of every QLinear/QEmbedding in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))]
