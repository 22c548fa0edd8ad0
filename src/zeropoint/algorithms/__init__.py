"""Quantization algorithms that do better than round-to-nearest, as plain functions from weights
(and statistics) to codes: GPTQ (gptq.py, with sequential.py for whole decoder models) and HQQ
(hqq.py). Each returns a QTensor in zeropoint's own quantizer semantics."""

from .gptq import GPTQResult, HessianAccumulator, gptq, gptq_quantize
from .hqq import hqq_qparams, hqq_quantize
from .sequential import SequentialReport, calibration_ids, gptq_model

__all__ = [
    "gptq", "gptq_quantize", "GPTQResult", "HessianAccumulator",
    "hqq_qparams", "hqq_quantize",
    "gptq_model", "calibration_ids", "SequentialReport",
]
