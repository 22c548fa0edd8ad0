"""i-quant quantization speed: zeropoint vs llama.cpp, the same rows, importance and threads.

Per type: a rows x cols float32 matrix with an importance vector, quantized by
gguf.iquants.quantize (csrc/iquants.c) and by ggml_quantize_chunk of the libggml-base that
llama-cpp-python ships (ggml-quants.c's quantize_iq*, the very function llama-quantize calls for
each chunk of rows). Both on one thread (llama-quantize splits rows among its threads the same
way zeropoint does), timed alternately, medians; each side's one-off table building (ggml's
neighbour lists, zeropoint's) runs before the timing. The bytes are compared too.

With --model, also the whole process: `llama-quantize --imatrix` against `zeropoint`'s requantize
(in this process, file written) on a GGUF model and an importance matrix, for each mix given,
--threads threads each, one run of each (a real model takes long).

    python benchmarks/bench_iquants.py [--rows 512] [--cols 4096] [--runs 3]
        [--model M.gguf --imatrix I.gguf --mixes IQ4_XS IQ2_M --threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zeropoint.gguf import iquants
from zeropoint.gguf.layout import tensor_nbytes
from zeropoint.gguf.types import TYPES

from timing import interleaved_medians  # benchmarks/timing.py


def ggml_quantizer():
    spec = importlib.util.find_spec("llama_cpp")
    lib = ctypes.CDLL(str(Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(x, qtype, imp, out):
        fn(TYPES[qtype].id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
           imp.ctypes.data)
    return quantize


def kernels(args) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, (args.rows, args.cols)) * 0.02).astype(np.float32)
    imp = rng.gamma(0.5, 2, args.cols).astype(np.float32)
    ggml = ggml_quantizer()
    print(f"{args.rows} x {args.cols} float32 rows, importance, 1 thread; "
          f"{platform.processor() or platform.machine()}")
    print(f"{'type':8} {'zeropoint s':>12} {'llama.cpp s':>12} {'ratio':>7}  bytes")
    torch.set_num_threads(1)  # ckernels.threads: zeropoint's kernels on one thread too
    for qtype in iquants.IQ_TYPES:
        theirs = np.empty((args.rows, tensor_nbytes(qtype, (args.cols,))), np.uint8)
        ggml(x[:1], qtype, imp, theirs)  # its tables, built once, before the timing
        iquants.quantize(x[:1], qtype, imp)
        ours_s, theirs_s = interleaved_medians(
            [lambda: iquants.quantize(x, qtype, imp), lambda: ggml(x, qtype, imp, theirs)],
            repeat=args.runs)
        same = np.array_equal(iquants.quantize(x, qtype, imp), theirs)
        print(f"{qtype:8} {ours_s:12.3f} {theirs_s:12.3f} {ours_s / theirs_s:7.2f}  "
              f"{'identical' if same else 'DIFFER'}")


def whole_process(args) -> None:
    from zeropoint.gguf.imatrix import read_imatrix
    from zeropoint.gguf.llama_tools import tool_path
    from zeropoint.gguf.requantize import requantize

    imatrix = read_imatrix(args.imatrix)
    print(f"\nwhole model {Path(args.model).name}, --imatrix, {args.threads} threads, one run")
    print(f"{'mix':8} {'zeropoint s':>12} {'llama-quantize s':>17} {'ratio':>7}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for mix in args.mixes:
            t0 = time.perf_counter()
            subprocess.run([str(tool_path("llama-quantize")), "--allow-requantize", "--imatrix",
                            args.imatrix, args.model, f"{tmp}/theirs.gguf", mix,
                            str(args.threads)], check=True, capture_output=True)
            t1 = time.perf_counter()
            requantize(args.model, f"{tmp}/ours.gguf", mix, importance=imatrix.importance)
            t2 = time.perf_counter()
            same = Path(f"{tmp}/ours.gguf").read_bytes() == Path(f"{tmp}/theirs.gguf").read_bytes()
            print(f"{mix:8} {t2 - t1:12.2f} {t1 - t0:17.2f} {(t2 - t1) / (t1 - t0):7.2f}  "
                  f"{'same file' if same else 'files differ'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model")
    p.add_argument("--imatrix")
    p.add_argument("--mixes", nargs="+", default=["IQ4_XS", "IQ2_M"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    kernels(args)
    if args.model:
        whole_process(args)


if __name__ == "__main__":
    main()
