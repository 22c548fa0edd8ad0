"""Quantize models for CPU inference and measure what it costs: the zeropoint command line.

Nothing below this package imports it. One module per command, each with its add_parser(sub); common holds what they share. User errors
(bad arguments, bad input files) print one line and exit with code 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import CommandError, HelpFormatter

# Command -> its module here, in the order --help lists them. A module is imported only when its
# parser is built (see build_parser).
COMMANDS = {"exercise": "exercise", "quantize": "quantize", "generate": "generate",
            "inspect": "inspect", "eval": "eval", "analyze": "analyze", "imatrix": "imatrix",
            "sweep": "sweep"}

EPILOG = """the user's path, one command each (zeropoint COMMAND --help shows its examples):
  zeropoint exercise                              learn: symmetric vs asymmetric, by MSE
  zeropoint quantize -o out/smollm2-int4 --eval   quantize the default model, score it
  zeropoint inspect out/smollm2-int4              see what is inside a file or directory
  zeropoint generate out/smollm2-int4 --prompt "The three primary colors are"
  zeropoint eval default out/smollm2-int4         perplexity before and after
  zeropoint eval default out/smollm2-int4 --kld   KL-divergence from the float model
  zeropoint imatrix -o imatrix.gguf               importance matrix, as llama-imatrix
  zeropoint analyze                               layer-by-layer error of a spec
  zeropoint sweep -o sweeps/smollm2               every type x method variant, its frontier
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `only` (one of COMMANDS), of that command alone: a
    command's run then imports neither the modules of the others nor what their options'
    defaults and help need (e.g. a requantization never loads the analysis or KLD code)."""
    p = argparse.ArgumentParser(prog="zeropoint", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command, module in COMMANDS.items():
        if only is None or command == only:
            importlib.import_module(f".{module}", __name__).add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Where argv names a command, its parser alone parses it; anything else (--help, a wrong
    # command name) gets the full parser, which lists or suggests every command.
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        args.func(args)
    except CommandError as e:
        print(f"zeropoint {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
