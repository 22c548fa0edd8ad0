"""Calibration: choosing the range each block is quantized over, from data.

Estimators look at one tensor (minmax, percentile, MSE-optimal clipping, entropy); observers
gather statistics over many batches and then give the same kind of qparams.
"""

from .estimators import (
    DEFAULT_PERCENTILE,
    RangeMethod,
    entropy_qparams,
    estimate_qparams,
    minmax_qparams,
    mse_qparams,
    percentile_qparams,
)
from .observers import (
    HistogramConfig,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
)
from .search import EntropySearch, MSESearch

__all__ = [
    "RangeMethod", "MSESearch", "EntropySearch", "DEFAULT_PERCENTILE",
    "minmax_qparams", "percentile_qparams", "mse_qparams", "entropy_qparams", "estimate_qparams",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver",
    "HistogramConfig",
]
