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

from .allocate import Allocation, allocate
from .layerwise import LayerError, LayerwiseResult, analyze_layers
from .sensitivity import SensitivityResult, fisher_diagonal, layer_sensitivity
from .specs import format_spec, menu, parse_spec, parse_specs

__all__ = [
    "analyze_layers", "LayerError", "LayerwiseResult",
    "layer_sensitivity", "fisher_diagonal", "SensitivityResult",
    "allocate", "Allocation",
    "parse_spec", "parse_specs", "format_spec", "menu",
]
