"""Quantize a 4096 x 4096 float32 matrix to each legacy ggml block type: zeropoint vs gguf-py.

Both run in the same process on the same data; the table gives the median of several runs,
GB/s of float32 input consumed, and zeropoint's speed-up. Bytes are checked equal as well.

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

from zeropoint.gguf import FORMATS, quantize_blocks

from timing import median_seconds  # benchmarks/timing.py




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
          f"torch threads = {args.threads}, median of {args.runs} runs, "
          f"torch {torch.__version__}, gguf-py {version('gguf')}")
    # Other processes on the machine skew both columns (torch's thread pool the most).
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    header = f"{'type':<6} {'zeropoint ms':>13} {'GB/s':>7} {'gguf-py ms':>11} {'GB/s':>7} " \
             f"{'speed-up':>9} {'same bytes':>11}"
    print(header)
    print("-" * len(header))
    for name in (n for n, f in FORMATS.items() if f.block_size == 32):  # K types: their own bench
        qtype = gguf.GGMLQuantizationType[name]
        ours = median_seconds(lambda: quantize_blocks(x, name), args.runs)
        theirs = median_seconds(lambda: gguf_quantize(x_np, qtype), args.runs)
        same = np.array_equal(quantize_blocks(x, name).numpy(), gguf_quantize(x_np, qtype))
        print(f"{name:<6} {ours * 1e3:>13.1f} {gbytes / ours:>7.2f} {theirs * 1e3:>11.1f} "
              f"{gbytes / theirs:>7.2f} {theirs / ours:>8.1f}x {str(same):>11}")


if __name__ == "__main__":
    main()
