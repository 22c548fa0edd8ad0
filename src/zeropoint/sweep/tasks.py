"""The units of a sweep's work, as plain module-level functions so a process pool or a Ray
cluster can run them anywhere the source path and the output folder are visible: make one
variant's file, score one file, score the reference. Each writes its record under
OUT/.sweep/ (atomically, after its file), which is what lets a killed sweep resume."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .importance import uses_imatrix
from .variants import SweepOptions, Variant, make_key, score_key

RECORDS = ".sweep"  # the folder of per-task records inside the output folder
REFERENCE = "reference"  # the record name of the source model's own scores


def variant_path(out_dir: Path, options: SweepOptions, variant: Variant) -> Path:
    stem = Path(options.source).name.removesuffix(".gguf")
    return out_dir / f"{stem}-{variant.name}.gguf"


def record_path(out_dir: Path, name: str, stage: str) -> Path:
    return out_dir / RECORDS / f"{name}.{stage}.json"


def read_record(out_dir: Path, name: str, stage: str, key: str) -> dict | None:
    """The record of a finished task with this key, or None (missing, stale or unreadable)."""
    try:
        record = json.loads(record_path(out_dir, name, stage).read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    file = record.get("file")
    if file and not (Path(file).is_file() and Path(file).stat().st_size == record["bytes"]):
        return None  # the file was removed or replaced since
    if "base_logits" in record and not Path(record["base_logits"]).is_file():
        return None
    return record


def _write_record(out_dir: Path, name: str, stage: str, record: dict) -> dict:
    with atomic_path(record_path(out_dir, name, stage)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def make_variant(options: SweepOptions, variant: Variant, out_dir: str,
                 gptq_on_ray: bool = False) -> dict:
    """Write the variant's GGUF file (the bytes `zeropoint quantize --type T --method M
    [--imatrix FILE]` writes) and its record: file, bytes, bits per weight, fallbacks, seconds.
    `gptq_on_ray`: this task runs on a Ray cluster, and GPTQ solves each layer's Linears as
    tasks of their own there (the same bytes)."""
    from ..gguf.mixes import parse_target
    from ..models.source import resolve_model
    from ..models.to_gguf import write_gguf

    if gptq_on_ray:
        from ..algorithms.solvers import make_solver
    out_dir = Path(out_dir)
    path = variant_path(out_dir, options, variant)
    source = resolve_model(options.source)
    if variant.method == "gptq":
        _set_torch_threads(options.threads)
    start = time.perf_counter()
    # On Ray, the task's own cluster ('auto': this process is connected already).
    with make_solver("auto") if gptq_on_ray else nullcontext(None) as solver:
        report = write_gguf(source, path, parse_target(variant.type), variant.method,
                            calibration=lambda loaded: _calibration(options, loaded),
                            threads=options.threads, solver=solver,
                            **_importance(options, variant))
    if variant.method == "gptq":
        report = report[0]
    return _write_record(out_dir, variant.name, "make", {
        "key": make_key(options, variant), "variant": variant.name, "type": variant.type,
        "method": variant.method, "file": str(path), "bytes": path.stat().st_size,
        "bits_per_weight": report.bits_per_weight, "fallbacks": len(report.fallbacks),
        "make_seconds": time.perf_counter() - start,
    })


def score_variant(options: SweepOptions, variant: Variant, out_dir: str, made: dict,
                  reference: dict) -> dict:
    """Score the variant's file under llama.cpp against the reference, by llama-perplexity
    --kl-divergence's protocol (models/kld.py): mean KLD with its uncertainty, its 99th
    percentile, same-top-token share, RMS Δp, perplexity and its ratio to the reference's; and
    decode tokens/s. Needs the make record (`made`) and the reference's scores."""
    from ..models.base_logits import load_base_logits
    from ..models.kld import LlamaCppLogits, kl_divergence, kld_report

    start = time.perf_counter()
    base = load_base_logits(reference["base_logits"])
    runner = LlamaCppLogits(made["file"], options.window, options.threads)
    try:
        stats = kld_report(kl_divergence(runner, base, _scoring_text(options)))
        speed = _decode_speed(runner.llm, options.decode_tokens)
    finally:
        runner.close()
    key = score_key(options, made["key"])
    return _write_record(Path(out_dir), variant.name, "score", {
        "key": key, "perplexity": stats.perplexity.value,
        "perplexity_ratio": stats.perplexity_ratio.value, "kld_mean": stats.kld.value,
        "kld_uncertainty": stats.kld.uncertainty, "kld_p99": stats.kld_percentiles.get(99.0),
        "same_top": stats.same_top.value, "delta_p_rms": stats.delta_p_rms.value,
        "scored_tokens": stats.tokens, "tokens_per_second": speed,
        "score_seconds": time.perf_counter() - start})


def score_reference(options: SweepOptions, out_dir: str, made: dict | None) -> dict:
    """The reference's own scores and its compact next-token distributions (models/base_logits),
    saved once for every variant's KL-divergence: the source itself when it is a GGUF file, else
    its float16 GGUF (`made`, a make record)."""
    from ..gguf.llama_cpp import gguf_size
    from ..models.base_logits import save_base_logits
    from ..models.kld import LlamaCppLogits, compute_base_logits

    start = time.perf_counter()
    path = Path(made["file"]) if made else Path(options.source)
    nbytes, bpw = gguf_size(path)
    runner = LlamaCppLogits(path, options.window, options.threads)
    try:
        base = compute_base_logits(runner, _scoring_text(options), options.window,
                                   max(1, options.max_tokens // options.window), cap_chunks=True)
        speed = _decode_speed(runner.llm, options.decode_tokens)
    finally:
        runner.close()
    base_path = record_path(Path(out_dir), REFERENCE, "base-logits").with_suffix(".npz")
    save_base_logits(base_path, base)
    key = score_key(options, made["key"] if made else REFERENCE)
    return _write_record(Path(out_dir), REFERENCE, "score", {
        "key": key, "variant": REFERENCE, "file": str(path), "bytes": nbytes,
        "bits_per_weight": bpw, "perplexity": float(np.exp(base.rows.nll.mean())),
        "scored_tokens": int(base.rows.nll.size), "tokens_per_second": speed,
        "base_logits": str(base_path), "score_seconds": time.perf_counter() - start})


def _importance(options: SweepOptions, variant: Variant) -> dict:
    """write_gguf's importance and extra_metadata, as quantize --imatrix FILE gives them."""
    if not uses_imatrix(options, variant):
        return {}
    from ..gguf.imatrix import read_imatrix
    from ..gguf.weighted import imatrix_metadata

    imatrix = read_imatrix(options.imatrix)
    return {"importance": imatrix.importance,
            "extra_metadata": imatrix_metadata(options.imatrix, imatrix)}


def _decode_speed(llm, n: int) -> float:
    """Tokens per second of greedy batch-1 decoding, after the first token (which includes the
    prompt's evaluation)."""
    from ..gguf.llama_cpp import DEFAULT_PROMPT

    if n < 2:
        return math.nan
    llm.reset()
    prompt = llm.tokenize(DEFAULT_PROMPT.encode(), add_bos=True)
    tokens = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
    next(tokens)
    start = time.perf_counter()
    for _ in range(n - 1):
        next(tokens)
    return (n - 1) / (time.perf_counter() - start)


def _scoring_text(options: SweepOptions) -> str:
    from ..models.evaluate import default_text

    return Path(options.text).read_text(encoding="utf-8") if options.text else default_text()


def _calibration(options: SweepOptions, loaded):
    """GPTQ calibration ids, in quantize's sequences, from quantize's default text."""
    from ..algorithms.sequential import CALIB_SEQUENCE_TOKENS, calibration_ids
    from ..calibrate.texts import default_calibration_text

    text = Path(options.calib).read_text(encoding="utf-8") if options.calib \
        else default_calibration_text()
    length = min(CALIB_SEQUENCE_TOKENS, options.calib_tokens)
    return calibration_ids(loaded.tokenizer, text, max(1, options.calib_tokens // length), length)


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
