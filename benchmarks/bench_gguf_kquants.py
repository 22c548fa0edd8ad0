"""Quantize a 4096 x 4096 float32 matrix to each K-quant type: zeropoint vs llama.cpp.

zeropoint: quantize_blocks on the tensor in memory (the C kernel; --eager adds the torch path).
llama.cpp: llama_model_quantize on a float32 GGUF holding the same matrix, nthread = threads,
timed as a whole (reading the file and writing the result included, nothing subtracted) --
what a user of llama.cpp's quantize waits for. Medians of several runs; GB/s of float32 input.
The bytes of the two are compared as well.

    python benchmarks/bench_gguf_kquants.py [--rows 4096] [--cols 4096] [--runs 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from zeropoint import ckernels
from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.kquants import K_FORMATS

from timing import median_seconds  # benchmarks/timing.py

FTYPE = {"Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}  # llama_ftype, `pure`


def write_f32_gguf(path: Path, x: np.ndarray) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 256), (w.add_head_count, 2),
                   (w.add_embedding_length, 256), (w.add_feed_forward_length, 256),
                   (w.add_head_count_kv, 2), (w.add_file_type, 0)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("blk.0.ffn_down.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(llama_cpp, src: Path, dst: Path, qtype: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.pure = threads, FTYPE[qtype], True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {qtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="also time the eager torch path")
    args = parser.parse_args()

    import llama_cpp  # imported late: it installs its log callback, silenced here

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    x_np = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    x = torch.from_numpy(x_np)
    gbytes = x_np.nbytes / 1e9
    has_c = ckernels.library() is not None

    print(f"{args.rows} x {args.cols} float32 ({x_np.nbytes / 2**20:.0f} MiB), threads = "
          f"{args.threads}, median of {args.runs} runs, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}, C kernel {'on' if has_c else 'OFF'}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    header = (f"{'type':<6} {'zeropoint ms':>13} {'GB/s':>6} {'llama.cpp ms':>13} {'GB/s':>6} "
              f"{'speed-up':>9} {'same bytes':>11}" + (f" {'eager ms':>9}" if args.eager else ""))
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f32.gguf", Path(tmp) / "out.gguf"
        write_f32_gguf(src, x_np)
        for qtype in K_FORMATS:
            ours = median_seconds(lambda: quantize_blocks(x, qtype), args.runs)
            run_llama = lambda: llama_quantize(llama_cpp, src, dst, qtype, args.threads)  # noqa: E731
            theirs = median_seconds(run_llama, args.runs)
            ref = np.array(gguf.GGUFReader(dst).tensors[0].data)
            same = np.array_equal(quantize_blocks(x, qtype).numpy(), ref)
            line = (f"{qtype:<6} {ours * 1e3:>13.1f} {gbytes / ours:>6.2f} {theirs * 1e3:>13.1f} "
                    f"{gbytes / theirs:>6.2f} {theirs / ours:>8.1f}x {str(same):>11}")
            if args.eager:
                with ckernels.disabled():
                    line += f" {median_seconds(lambda: quantize_blocks(x, qtype), 1) * 1e3:>9.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
