"""Where quantization error comes from, layer by layer, and where the bits should go.

- layerwise: per Linear layer, in forward order, the SQNR of its quantized weight, of its output
  with only it quantized (isolated: the error it makes) and with it and every layer before it
  quantized (accumulated), from one float and one quantized pass with hooks.
- sensitivity: the damage each layer alone does to the final output (KL for language models,
  1 - cosine otherwise), estimated for all layers from the diagonal Fisher information and
  measured exactly on some of them.
- allocate: a spec per layer from a menu for the least estimated damage within a size budget.
- report: terminal tables, PNG plots, JSON records and a self-contained HTML page.
"""

from ..lazy import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "Allocation": ".allocate",
    "allocate": ".allocate",
    "LayerError": ".layerwise",
    "LayerwiseResult": ".layerwise",
    "analyze_layers": ".layerwise",
    "SensitivityResult": ".sensitivity",
    "fisher_diagonal": ".sensitivity",
    "layer_sensitivity": ".sensitivity",
    "format_spec": ".specs",
    "menu": ".specs",
    "parse_spec": ".specs",
    "parse_specs": ".specs",
}

__all__ = [
    "analyze_layers", "LayerError", "LayerwiseResult",
    "layer_sensitivity", "fisher_diagonal", "SensitivityResult",
    "allocate", "Allocation",
    "parse_spec", "parse_specs", "format_spec", "menu",
]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
