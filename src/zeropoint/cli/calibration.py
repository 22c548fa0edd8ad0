"""Calibration text and ids: --calib's file, or zeropoint's default calibration mix
(calibrate/texts.py); the ids for `quantize --method gptq`, into a zeropoint directory or a GGUF
file."""

from __future__ import annotations

from .common import CommandError, read_text

DEFAULT_CALIB_TOKENS = 65536


def gptq_calibration(args, loaded):
    """(sequences, length) calibration ids from --calib and --calib-tokens."""
    from ..algorithms.sequential import CALIB_SEQUENCE_TOKENS, calibration_ids

    if loaded.kind != "causal-lm":
        raise CommandError("--method gptq needs a causal language model")
    if args.calib_tokens < 2:
        raise CommandError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    length = min(CALIB_SEQUENCE_TOKENS, args.calib_tokens)
    try:
        return calibration_ids(loaded.tokenizer, calibration_text(args.calib),
                               args.calib_tokens // length, length)
    except ValueError as e:
        raise CommandError(str(e)) from None


def calibration_text(path: str | None) -> str:
    """The text in the file at `path`, or zeropoint's default calibration set when None."""
    if path is not None:
        return read_text(path)
    from ..calibrate.texts import default_calibration_text

    return default_calibration_text()


def calibration_source(path: str | None) -> str:
    """Where calibration_text(path) comes from, for reports and imatrix files."""
    from ..calibrate.texts import DEFAULT_CALIBRATION_NAME

    return DEFAULT_CALIBRATION_NAME if path is None else str(path)


def gptq_solver(args):
    """Where GPTQ's solves run, as a context manager giving the solver: with --ray ADDRESS a
    RaySolver (algorithms/solvers.py), else None (here). CommandError when Ray is missing;
    without --ray nothing is imported (requantizing imports no torch)."""
    from contextlib import nullcontext

    address = getattr(args, "ray", None)
    if address is None:
        return nullcontext(None)
    from ..algorithms.solvers import make_solver

    try:
        return make_solver(address)
    except ImportError as e:
        raise CommandError(str(e)) from None
