"""A sweep's importance matrix (`--imatrix FILE|auto`): which variants use it, the matrix `auto`
computes once for all of them, and the types that cannot be made without one.

A variant uses the matrix exactly where `zeropoint quantize --type T --imatrix FILE` would: RTN
(llama-quantize --imatrix's weighted rounding, i-quants) and GPTQ (onto the weighted block
scales); HQQ fits its own scales and takes none. The file's path is recorded in each file it
weights (as llama-quantize records it), and its content hash is in each such variant's resume
key: another matrix redoes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path

from ..atomic import atomic_path
from .variants import SweepOptions, Variant, fingerprint, zeropoint_version

IMATRIX_METHODS = ("rtn", "gptq")  # quantize --imatrix's methods
AUTO = "auto"
AUTO_FILE = "imatrix.gguf"  # inside the sweep's records folder


def uses_imatrix(options: SweepOptions, variant: Variant) -> bool:
    return options.imatrix is not None and variant.method in IMATRIX_METHODS


def imatrix_key(options: SweepOptions, variant: Variant) -> list | None:
    """What of the matrix a variant's file depends on: its path as recorded, its content."""
    if not uses_imatrix(options, variant):
        return None
    p = Path(options.imatrix)
    return [options.imatrix, content_digest(str(p.resolve()), p.stat().st_size,
                                            p.stat().st_mtime_ns)]


@cache
def content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file (cached by path, size and modification time: read once a run)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_imatrix(options: SweepOptions, records: Path,
                    log: Callable[[str], None]) -> SweepOptions:
    """`options` with imatrix 'auto' replaced by the matrix computed for it (once: kept in
    `records` with the key of what it was computed from, and reused while that holds); a FILE
    must exist. ValueError otherwise."""
    if options.imatrix is None:
        return options
    if options.imatrix != AUTO:
        if not Path(options.imatrix).is_file():
            raise ValueError(f"--imatrix file {options.imatrix!r} does not exist")
        return options
    path = records / AUTO_FILE
    key = hashlib.sha256(json.dumps([
        "imatrix", fingerprint(options.source), options.calib and fingerprint(options.calib),
        options.calib_tokens, zeropoint_version()]).encode()).hexdigest()[:16]
    stamp = records / (AUTO_FILE + ".key")
    if not (path.is_file() and stamp.is_file() and stamp.read_text().strip() == key):
        log(f"imatrix auto: computing it from {options.calib or 'the default calibration mix'} "
            f"({options.calib_tokens} tokens) into {path}")
        write_auto_imatrix(options, path)
        with atomic_path(stamp) as tmp:
            tmp.write_text(key + "\n")
    return replace(options, imatrix=str(path))


def write_auto_imatrix(options: SweepOptions, path: Path) -> None:
    """What `zeropoint imatrix SOURCE [--calib FILE] --calib-tokens N -o path` writes."""
    from ..calibrate.texts import DEFAULT_CALIBRATION_NAME, default_calibration_text
    from ..gguf.imatrix import write_imatrix
    from ..models.imatrix import compute_imatrix
    from ..models.load import load_model
    from ..models.source import resolve_model

    source = resolve_model(options.source)
    text = Path(options.calib).read_text(encoding="utf-8") if options.calib \
        else default_calibration_text()
    loaded = load_model(source.path, progress=False)
    run = compute_imatrix(loaded, source, text, options.calib or DEFAULT_CALIBRATION_NAME,
                          options.calib_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_imatrix(path, run.imatrix, None)


def unmakeable(options: SweepOptions, variants: Sequence[Variant]) -> list[str]:
    """One line for each requested type a variant cannot be made in without an importance
    matrix (llama-quantize refuses the i-quants below IQ3_S without one), saying why."""
    from ..gguf.mixes import NEED_IMATRIX, parse_target

    lines, checked = [], {}
    for v in variants:
        if uses_imatrix(options, v):
            continue
        if v.type not in checked:
            checked[v.type] = _needing(options.source, parse_target(v.type), NEED_IMATRIX)
        needing = checked[v.type]
        if needing:
            why = "no --imatrix was given" if options.imatrix is None else \
                f"--method {v.method} takes no importance matrix"
            lines.append(f"{v.name}: {needing} needs an importance matrix and {why}; llama.cpp "
                         f"refuses {', '.join(NEED_IMATRIX)} without one")
    return lines


def _needing(source: str, target, need: Sequence[str]) -> str | None:
    """'blk.0.attn_q.weight (IQ2_XS)' for the first tensor of the source that `target` gives a
    type needing importance, planned as without one; None when none does. A Hugging Face
    directory is judged by the target's default type alone."""
    from ..gguf.mixes import ModelParams, needs_imatrix, plan_types
    from ..gguf.reader import read_gguf

    if not os.path.isfile(source):
        return f"its default type {target.default_type}" if target.default_type in need else None
    with read_gguf(source) as f:
        tensors = [(t.name, t.type, tuple(t.shape)) for t in f.tensors]
        params = ModelParams.from_metadata(f.metadata)
    plan = plan_types(tensors, target, params, has_imatrix=False)
    bad = [c for c in plan.choices if needs_imatrix(c)]
    return f"{bad[0].name} ({bad[0].type}, and {len(bad) - 1} more)" if bad else None
