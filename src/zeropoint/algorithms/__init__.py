"""Quantization algorithms that do better than round-to-nearest, as plain functions from weights
(and statistics) to codes: GPTQ (gptq.py, with sequential.py for whole decoder models) and HQQ
(hqq.py). GPTQ rounds onto a grid (grids.py): zeropoint's QuantSpec, or a ggml block type
(zeropoint.gguf.gptq_grids)."""

from .gptq import GPTQOptions, GPTQResult, HessianAccumulator, gptq, gptq_columns, gptq_quantize
from .grids import SpecGrid
from .hqq import hqq_qparams, hqq_quantize
from .sequential import SequentialReport, calibration_ids, gptq_model, run_sequential

__all__ = [
    "gptq", "gptq_quantize", "gptq_columns", "GPTQOptions", "GPTQResult", "HessianAccumulator",
    "SpecGrid",
    "hqq_qparams", "hqq_quantize",
    "gptq_model", "run_sequential", "calibration_ids", "SequentialReport",
]
