"""Quantize models for CPU inference and measure what it costs: the zeropoint command line.

Nothing below this package imports it. One module per command, each with its add_parser(sub); common holds what they share. User errors
(bad arguments, bad input files) print one line and exit with code 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import analyze, exercise, generate, imatrix, quantize, sweep
from . import eval as eval_command  # the module name would hide the builtin here
from . import inspect as inspect_command  # and this one the standard library's inspect
from .common import CommandError

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropoint", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in (exercise, quantize, generate, inspect_command, eval_command, analyze,
                    imatrix, sweep):
        command.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CommandError as e:
        print(f"zeropoint {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
