"""What the commands share: the user-error type, the evaluation text, JSON output, model opening."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..atomic import atomic_path


class CommandError(Exception):
    """A problem with what the user asked for: main() prints it in one line and exits with 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help formatter: descriptions and epilogs as written, lines as wide as the
    terminal. argparse makes one for every add_argument, and its own asks shutil for the width
    each time: shutil's import (with bz2 and lzma) and 140 terminal queries were 7 ms of a
    0.1 s requantization. The width is found here once, by shutil.get_terminal_size's rules."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


def _terminal_columns() -> int:
    """$COLUMNS, else the width of the terminal on stdout, else 80 (shutil's fallback)."""
    global _columns
    if _columns is None:
        try:
            _columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            _columns = 0
        if _columns <= 0:
            try:
                _columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                _columns = 0
        if _columns <= 0:
            _columns = 80
    return _columns


_columns: int | None = None


def read_text(path: str | None) -> str:
    """The text in the file at `path`, or Python's pydoc topics when `path` is None."""
    from ..models.evaluate import default_text

    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read text file {str(path)!r}: {e}") from None


def text_source(path: str | None) -> str:
    """Where read_text(path) reads from, for reports."""
    return "Python's pydoc topics" if path is None else str(path)


def write_json(path: str, payload) -> None:
    import json  # only where a command writes JSON

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def threads() -> int:
    """Threads for llama.cpp and the GGUF writers: torch's count where torch is loaded (else
    what it would choose: ckernels.default_threads), at most one per core."""
    from ..ckernels import default_threads

    return max(1, min(default_threads(), os.cpu_count() or 1))


def quiet_libraries() -> None:
    # transformers and tokenizers talk a lot on load; zeropoint prints its own summary.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()


def resolve(path: str | None, accept=None):
    """models.source.resolve_model, its ModelLoadError as a CommandError."""
    from ..models.source import SOURCE_KINDS, ModelLoadError, resolve_model

    try:
        return resolve_model(path, accept or SOURCE_KINDS)
    except ModelLoadError as e:
        raise CommandError(str(e)) from None


def open_model(path: str | None, progress: bool = False):
    """models.LoadedModel of a float model (checkpoint dir, .gguf, 'default') or a zeropoint
    directory, quantized as it was saved."""
    from ..models.load import load_model
    from ..models.source import FLOAT_KINDS, ModelLoadError

    source = resolve(path, (*FLOAT_KINDS, "zeropoint"))
    quiet_libraries()
    try:
        if source.kind == "zeropoint":
            from ..models.quantized import load_quantized

            return load_quantized(source.path)
        return load_model(source.path, progress=progress)
    except ModelLoadError as e:
        raise CommandError(str(e)) from None
