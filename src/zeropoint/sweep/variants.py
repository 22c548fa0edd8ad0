"""What a sweep makes: one Variant per (ggml type or mix, method), and the keys that say whether a
variant already on disk was made from the same source, options and zeropoint version."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

METHODS = ("rtn", "hqq", "gptq")  # models.to_gguf.METHODS; repeated here to parse without torch


@dataclass(frozen=True)
class Variant:
    type: str  # a llama.cpp mix or ggml type name, upper case: Q4_K_M, Q8_0, ...
    method: str  # rtn, hqq or gptq

    @property
    def name(self) -> str:
        return f"{self.type}-{self.method}"


@dataclass(frozen=True)
class SweepOptions:
    """Everything that changes a variant's file or its scores (and so its resume key)."""

    source: str  # the model's path, as models.source.resolve_model found it
    text: str | None = None  # scoring text file; None: Python's pydoc topics
    window: int = 512  # tokens per scored window, as eval's
    max_tokens: int = 4096  # scored tokens: 8 windows of 512, enough to rank neighbouring types
    calib: str | None = None  # GPTQ calibration text file; None: the default calibration text
    calib_tokens: int = 16384  # GPTQ calibration tokens: a quarter of quantize's default, per variant
    decode_tokens: int = 64  # tokens generated greedily to time decoding
    threads: int = 1  # per task; the executor runs several tasks at once
    # An importance matrix file, as given (its path is recorded in the files it weights), for
    # the rtn and gptq variants; 'auto' until run.sweep computes one (sweep/importance.py)
    imatrix: str | None = None
    extra: dict = field(default_factory=dict)  # room for options added later (kld)


def parse_variants(types: str, methods: str) -> list[Variant]:
    """The variants of comma-separated `types` x `methods`, in that order, without duplicates.
    ValueError names an unknown type or method and lists the accepted ones."""
    from ..gguf.mixes import parse_target

    type_names = _split(types, "types")
    for t in type_names:
        parse_target(t)  # raises ValueError naming the accepted mixes and types
    method_names = [m.lower() for m in _split(methods, "methods")]
    for m in method_names:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; accepted: {', '.join(METHODS)}")
    seen: dict[Variant, None] = {}
    for t in type_names:
        for m in method_names:
            seen.setdefault(Variant(t.upper(), m))
    return list(seen)


def _split(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--{what} needs at least one name, got {text!r}")
    return items


def make_key(options: SweepOptions, variant: Variant) -> str:
    """What the variant's file depends on: source, type, method, calibration, the importance
    matrix it uses (path and content), version."""
    calib = ((options.calib and fingerprint(options.calib)), options.calib_tokens) \
        if variant.method == "gptq" else None
    from .importance import imatrix_key

    return _digest(["make", fingerprint(options.source), variant.type, variant.method, calib,
                    imatrix_key(options, variant), options.extra.get("make"),
                    zeropoint_version()])


def score_key(options: SweepOptions, file_key: str) -> str:
    """What the variant's scores depend on: its file, the reference, the text and protocol."""
    text = options.text and fingerprint(options.text)
    return _digest(["score", file_key, fingerprint(options.source), text, options.window,
                    options.max_tokens, options.decode_tokens, options.extra.get("score"),
                    zeropoint_version()])


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(path: str | os.PathLike) -> list:
    """A file's or directory's identity: path, and for every file size and modification time (a
    changed file changes it; hashing 100s of GB of weights on every resume would not pay)."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p)] + [[str(f.relative_to(p.parent)), f.stat().st_size, f.stat().st_mtime_ns]
                       for f in files]


@cache
def zeropoint_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zeropoint")
    except PackageNotFoundError:
        return "unknown"


def options_dict(options: SweepOptions) -> dict:
    return asdict(options)
