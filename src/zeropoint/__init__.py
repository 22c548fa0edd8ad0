"""zeropoint: quantize tensors and models to low-bit integers, and measure what it costs."""

from .lazy import lazy_exports

_EXPORTS = {  # name -> the module that defines it ("module:name" where it is named otherwise)
    "choose_qparams": ".core",
    "dequantize": ".core",
    "fake_quantize": ".core",
    "qparams_from_range": ".core",
    "quantize": ".core",
    "cosine": ".metrics",
    "max_abs_error": ".metrics",
    "mse": ".metrics",
    "sqnr_db": ".metrics",
    "uniform_noise_mse": ".metrics",
    "QTensor": ".qtensor",
    "Quantizer": ".quantizer",
    "Granularity": ".spec",
    "QuantSpec": ".spec",
    "Scheme": ".spec",
    "Recipe": ".recipe",
    "Rule": ".recipe",
    "quantize_model": ".nn.quantize_model",
    "load": ".models.quantized:load_quantized",
}

__all__ = [
    "QuantSpec", "Scheme", "Granularity", "Quantizer", "QTensor",
    "choose_qparams", "quantize", "dequantize", "fake_quantize", "qparams_from_range",
    "mse", "sqnr_db", "max_abs_error", "cosine", "uniform_noise_mse",
    "quantize_model", "Recipe", "Rule", "load",
]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
