"""Quantized Linear kernels against float32 F.linear on the CPU, at batch 1 and batch 32.

A 4096x4096 layer, 2 threads. Every method runs in each round, in turn, so that a noisy
neighbour on a shared machine slows them all alike; the figure is the median over rounds.
Two settings: "hot", the same layer called again with its weights still in the cache, and
"cold", the cache flushed first, as in a model whose weights do not fit in it (the usual case
for LLM decoding, where each step streams every weight from memory once).

    python benchmarks/bench_kernels.py [--rounds 15] [--size 4096] [--group-size 128]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from zeropoint.nn.kernels import Int4Weight, Int8Weight


def make_methods(size: int, group_size: int, gen: torch.Generator):
    """name -> fn(x) for one (size, size) layer quantized to 8 and 4 bits."""
    weight = torch.randn(size, size, generator=gen) * 0.02  # (out_features, in_features)
    weight_bf16 = weight.bfloat16()

    # Symmetric per-channel int8 and asymmetric group-wise 4-bit codes, by round to nearest.
    scale8 = weight.abs().amax(dim=1) / 127  # (out_features,)
    codes8 = torch.round(weight / scale8[:, None]).clamp(-127, 127).to(torch.int8)
    groups = weight.reshape(size, size // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (out_features, in_features // group_size)
    scale4 = (hi - lo) / 15
    zp4 = torch.round(-lo / scale4).clamp(0, 15)
    codes4 = torch.round(groups / scale4[..., None] + zp4[..., None]).clamp(0, 15)
    codes4 = codes4.reshape(size, size).to(torch.uint8)

    int8 = Int8Weight.prepare(codes8, scale8)
    int4 = Int4Weight.prepare(codes4, scale4, zp4, group_size)
    int8_fallback = Int8Weight.prepare(codes8, scale8, backend="fallback")
    int4_fallback = Int4Weight.prepare(codes4, scale4, zp4, group_size, backend="fallback")

    # What the issue measured: dequantize on every call, then a float32 matmul. For float32
    # activations this is also what the Int4Weight fallback does.
    def naive_int8(x):
        return F.linear(x, int8_fallback.dequantize())

    def naive_int4(x):
        return F.linear(x, int4_fallback.dequantize(torch.float32))

    return {
        "float32 F.linear": lambda x: F.linear(x, weight),
        "bfloat16 F.linear": lambda x: F.linear(x.bfloat16(), weight_bf16),
        f"Int8Weight ({int8.backend})": int8.linear,
        f"Int4Weight g{group_size} ({int4.backend})": int4.linear,
        "Int8Weight (fallback)": int8_fallback.linear,
        "naive int8 dequantize + F.linear": naive_int8,
        "Int4Weight (fallback): dequant+linear": naive_int4,
    }


def time_methods(methods: dict, x: torch.Tensor, rounds: int, flush: torch.Tensor | None) -> dict:
    """Median seconds per call of each method; every method is timed in every round.

    hot (flush is None): two untimed calls bring the weights into the cache, then 3 timed calls.
    cold: before the one timed call, `flush` is overwritten: it is larger than the last-level
    cache, so the weights come from memory, as they do for a model too big for the cache.
    """
    samples = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm up: packing caches, thread pool, page faults
            fn(x)
        for r in range(rounds):
            for name, fn in methods.items():
                if flush is None:
                    fn(x)
                    fn(x)
                    calls = 3
                else:
                    flush.fill_(r)
                    calls = 1
                start = time.perf_counter()
                for _ in range(calls):
                    fn(x)
                samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-mb", type=int, default=1024,
                        help="cold runs overwrite this much memory first; make it > the L3 cache")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    methods = make_methods(args.size, args.group_size, gen)
    flush = torch.empty(args.flush_mb * 2**20 // 4, dtype=torch.float32)
    print(
        f"# {args.size}x{args.size} linear, {args.threads} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, median of {args.rounds} rounds"
    )
    for batch in (1, 32):
        x = torch.randn(batch, args.size, generator=gen)
        hot = time_methods(methods, x, args.rounds, flush=None)
        cold = time_methods(methods, x, args.rounds, flush=flush)
        hot_base, cold_base = hot["float32 F.linear"], cold["float32 F.linear"]
        print(f"\nbatch {batch}")
        head = ("method", "hot ms", "vs f32", "cold ms", "vs f32")
        print(f"| {head[0]:<38} | " + " | ".join(f"{h:>7}" for h in head[1:]) + " |")
        print(f"|{'-' * 40}|" + "|".join(['-' * 9] * 4) + "|")
        for name in methods:
            print(
                f"| {name:<38} | {hot[name] * 1e3:7.3f} | {hot_base / hot[name]:6.2f}x "
                f"| {cold[name] * 1e3:7.3f} | {cold_base / cold[name]:6.2f}x |"
            )
    print("\n'vs f32' > 1 means faster than float32 F.linear. hot: weights in cache (same layer"
          " again); cold: weights read from memory (a model larger than the cache).")


if __name__ == "__main__":
    main()
