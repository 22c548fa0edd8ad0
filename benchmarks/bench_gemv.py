"""The batch-1 gemv kernels (csrc/gemv.c) against the machine's memory read speed.

Decoding one token reads every weight once, so a gemv kernel is as fast as it can be when it
reads its bytes as fast as the memory delivers them. Per shape (the real models' matrices) and
per C path compiled in (AVX-512, AVX2, portable), on 1 and 2 threads: the kernel's GB/s of
weight bytes (codes, plus scales and zero-points) and its ratio to the peer, a plain float32
torch.sum over 256 MB on as many threads (the memory's read speed), measured in the same run,
calls alternated (timing.interleaved_medians). Shapes that fit the 32 MB L3 read faster than
memory: for them the ratio says how close to compute-bound the loop is.

    python benchmarks/bench_gemv.py [--shapes 262144x640,2048x640,640x2048,49152x576]
        [--paths best,avx2] [--repeat 9]
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import interleaved_medians  # benchmarks/timing.py

from zeropoint import ckernels
from zeropoint.nn.gemv import PATHS, paths_available

GROUP = 32  # int4 group size, float zero-points: today's default linears and candidate head


def kernels(lib, rows: int, cols: int, path: str, threads: int):
    """name -> (fn, bytes read): int8 per row, and int4 g32 float-zero-point on one matrix with
    float32 and with float16 scales and zero-points."""
    gen = torch.Generator().manual_seed(0)
    q8 = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen)
    s8 = torch.rand(rows, generator=gen)
    q4 = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    s4 = torch.rand(rows, cols // GROUP, generator=gen)
    z4 = torch.rand(rows, cols // GROUP, generator=gen) * 15
    x, y = torch.randn(cols, generator=gen), torch.empty(rows)
    s4h, z4h = s4.half(), z4.half()
    code = PATHS[path]
    keep = (q8, s8, q4, s4, z4, s4h, z4h, x, y)  # the pointers below point into these

    def int8():
        lib.zp_gemv_q8(x.data_ptr(), q8.data_ptr(), s8.data_ptr(), y.data_ptr(), cols, rows,
                       threads, code)

    def int4():
        lib.zp_gemv_q4(x.data_ptr(), q4.data_ptr(), s4.data_ptr(), z4.data_ptr(), y.data_ptr(),
                       cols, GROUP, rows, threads, code, 0)

    def int4_half():
        lib.zp_gemv_q4(x.data_ptr(), q4.data_ptr(), s4h.data_ptr(), z4h.data_ptr(),
                       y.data_ptr(), cols, GROUP, rows, threads, code, 3)

    int8.keep = int4.keep = int4_half.keep = keep
    return {"int8/row": (int8, q8.nbytes + s8.nbytes),
            f"int4 g{GROUP} fzp f32": (int4, q4.nbytes + s4.nbytes + z4.nbytes),
            f"int4 g{GROUP} fzp f16": (int4_half, q4.nbytes + s4h.nbytes + z4h.nbytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="262144x640,2048x640,640x2048,49152x576")
    parser.add_argument("--paths", default="best,avx2")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    lib = ckernels.library()
    if lib is None:
        raise SystemExit("no C compiler here: the gemv kernels are not built")
    have = paths_available(lib)
    paths = [p for p in args.paths.split(",") if p in have]
    print(f"load average {os.getloadavg()[0]:.2f}; paths compiled in: {', '.join(have)}; "
          f"flags {' '.join(f for f in ckernels.cflags() if f.startswith('-m'))}")
    memory = torch.rand(64 << 20)  # 256 MB of float32
    print(f"{'shape':>12} {'kernel':>18} {'path':>8} {'threads':>7} {'ms':>8} {'GB/s':>6} "
          f"{'memory GB/s':>11} {'ratio':>6}")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        for threads in (1, 2):
            def read_memory(threads=threads):
                torch.set_num_threads(threads)
                memory.sum()
            runs = {"memory": (read_memory, memory.nbytes)}
            for path in paths:
                for name, run in kernels(lib, rows, cols, path, threads).items():
                    runs[(name, path)] = run
            repeat = args.repeat if rows * cols > 1 << 24 else args.repeat * 20
            fns = [fn for fn, _ in runs.values()]
            seconds = dict(zip(runs, interleaved_medians(fns, repeat)))
            peer = runs["memory"][1] / seconds["memory"] / 1e9
            for key, (_, nbytes) in runs.items():
                if key == "memory":
                    continue
                gbs = nbytes / seconds[key] / 1e9
                print(f"{shape:>12} {key[0]:>18} {key[1]:>8} {threads:>7} "
                      f"{seconds[key] * 1e3:8.3f} {gbs:6.1f} {peer:11.1f} {gbs / peer:6.2f}")
    torch.set_num_threads(os.cpu_count() or 1)


if __name__ == "__main__":
    main()
