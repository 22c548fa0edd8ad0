"""Quantize a 4096 x 4096 float32 matrix to each legacy ggml block type: zeropoint vs gguf-py.

Both run in the same process on the same data, interleaved (zeropoint, gguf-py, zeropoint, ...)
so that a change in the machine's load hits both; the table gives the median of each, GB/s of
float32 input consumed and zeropoint's speed-up, and whether it meets issue #6's target of at
least 10x. Bytes are checked equal as well.

    python benchmarks/bench_gguf_blocks.py [--rows 4096] [--cols 4096] [--runs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
from importlib.metadata import version

import gguf
import numpy as np
import torch

from gguf.quants import quantize as gguf_quantize

from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.blocks import LEGACY_TYPES

from timing import interleaved_medians  # benchmarks/timing.py

TARGET = 10.0  # issue #6: at least 10x faster than gguf-py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    x_np = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    x = torch.from_numpy(x_np)
    gbytes = x_np.nbytes / 1e9

    print(f"{args.rows} x {args.cols} float32 ({x_np.nbytes / 2**20:.0f} MiB), "
          f"torch threads = {args.threads}, median of {args.runs} interleaved runs, "
          f"torch {torch.__version__}, gguf-py {version('gguf')}")
    # Other processes on the machine skew both columns; the ratio is what to read.
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load()} at start")
    header = f"{'type':<6} {'zeropoint ms':>13} {'GB/s':>7} {'gguf-py ms':>11} {'GB/s':>7} " \
             f"{'speed-up':>9} {'>= 10x':>7} {'same bytes':>11}"
    print(header)
    print("-" * len(header))
    met = []
    for name in LEGACY_TYPES:  # K types: their own bench
        qtype = gguf.GGMLQuantizationType[name]
        ours, theirs = interleaved_medians(
            [lambda: quantize_blocks(x, name), lambda: gguf_quantize(x_np, qtype)], args.runs)
        same = np.array_equal(quantize_blocks(x, name).numpy(), gguf_quantize(x_np, qtype))
        ratio = theirs / ours
        met.append(ratio >= TARGET)
        print(f"{name:<6} {ours * 1e3:>13.1f} {gbytes / ours:>7.2f} {theirs * 1e3:>11.1f} "
              f"{gbytes / theirs:>7.2f} {ratio:>8.1f}x {'yes' if met[-1] else 'NO':>7} "
              f"{str(same):>11}")
    print(f"load average {load()} at end; target (>= {TARGET:g}x gguf-py) met for {sum(met)} "
          f"of {len(met)} types{'' if all(met) else ': NOT met for all'}")


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
