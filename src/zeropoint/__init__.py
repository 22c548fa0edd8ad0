"""zeropoint: quantize tensors and models to low-bit integers, and measure what it costs."""

from .core import choose_qparams, dequantize, fake_quantize, qparams_from_range, quantize
from .metrics import cosine, max_abs_error, mse, sqnr_db, uniform_noise_mse
from .qtensor import QTensor
from .quantizer import Quantizer
from .spec import Granularity, QuantSpec, Scheme
from .recipe import Recipe, Rule
from .nn.quantize_model import quantize_model
from .models.quantized import load_quantized as load

__all__ = [
    "QuantSpec", "Scheme", "Granularity", "Quantizer", "QTensor",
    "choose_qparams", "quantize", "dequantize", "fake_quantize", "qparams_from_range",
    "mse", "sqnr_db", "max_abs_error", "cosine", "uniform_noise_mse",
    "quantize_model", "Recipe", "Rule", "load",
]
