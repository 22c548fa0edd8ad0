"""A model into one GGUF file by one method: round-to-nearest (llama.cpp's own quantizers), HQQ
(its fitted scales in the same block formats) or GPTQ (error-correcting, calibrated). The one
place `quantize --type` and `sweep` make GGUF files, so a sweep's variant is byte for byte the
file the single command writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .source import ModelSource

METHODS = ("rtn", "hqq", "gptq")


def write_gguf(
    source: ModelSource,
    out: str | os.PathLike,
    target,
    method: str = "rtn",
    *,
    calibration: Callable | None = None,
    progress: bool = False,
    threads: int = 1,
    importance=None,
    extra_metadata=None,
    solver=None,
    gptq_options=None,
):
    """Write `source` (a GGUF file, a Hugging Face directory or the default model) to `out` in
    `target` (a gguf.mixes.Target) by `method`. GPTQ needs `calibration(loaded) -> ids`
    (sequences, length) from the loaded float model. Returns the gguf QuantizeReport, and for
    GPTQ also its GPTQGGUFReport as (report, gptq_report). `importance` (an importance matrix's
    lookup by GGUF name) weights the rounding as llama-quantize --imatrix does, and
    `extra_metadata` holds the keys it records about the matrix (gguf.weighted.imatrix_metadata).
    `solver` (algorithms/solvers.py): where GPTQ's per-Linear solves run (a RaySolver: tasks on
    a cluster); the same bytes wherever they run. `gptq_options` (algorithms.gptq.GPTQOptions):
    GPTQ's, else gguf.gptq.gptq_gguf's default."""
    weighting = {"importance": importance, "extra_metadata": extra_metadata}
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "gptq":
        return _gptq(source, out, target, calibration, progress, threads, weighting, solver,
                     gptq_options)
    encoder = None
    if method == "hqq":
        from ..gguf.hqq import hqq_encode as encoder
    if source.is_gguf:
        from ..gguf.requantize import requantize

        return requantize(source.path, out, target, progress=progress, encoder=encoder,
                          **weighting)
    from ..gguf.export import export_hf

    return export_hf(source.path, out, target, progress=progress, threads=threads,
                     encoder=encoder, **weighting)


def _gptq(source: ModelSource, out, target, calibration, progress: bool, threads: int,
          weighting: dict, solver, options=None):
    from ..gguf.gptq import gptq_gguf
    from .load import load_model

    if calibration is None:
        raise ValueError("method gptq needs calibration: a function from the loaded model to ids")
    loaded = load_model(source.path, progress=progress)
    ids = calibration(loaded)
    report = gptq_gguf(loaded, Path(out), target, ids, options, progress=progress,
                       threads=threads, solver=solver, **weighting)
    return report.write, report
