"""`zeropoint sweep` against the single commands it replaces, whole processes, on the default
model: (a) one `zeropoint eval default --kld --save-base` of the source, then for every variant
`zeropoint quantize --type T --method M` and `zeropoint eval FILE --kld --base-logits` (all with
--engine llama.cpp, the sweep's scoring), one after another; (b) one `zeropoint
sweep` of the same variants in the local pool; (c) the same sweep on a local Ray cluster
(`--ray local`, which starts and stops the cluster inside the timing). Each sweep writes into a
fresh folder, so nothing is resumed. Medians of alternated runs; ratios printed.

    python benchmarks/bench_sweep.py [--types Q4_0,Q5_1,Q8_0] [--methods rtn,hqq] [--runs 3]
                                     [--max-tokens 1024]

Targets (issue #17): the sweep no slower than the single commands; Ray's overhead over the local
pool under 20%. Ray's figure includes starting the cluster (about 15 s here), which a user of a
standing cluster does not pay; the printout gives it with and without that start.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import interleaved_medians

ZP = [sys.executable, "-m", "zeropoint.cli"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q4_0,Q5_1,Q8_0")
    p.add_argument("--methods", default="rtn,hqq")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=1024)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    scoring = ["--max-tokens", str(args.max_tokens), "--window", "512"]
    variants = [(t, m) for t in args.types.split(",") for m in args.methods.split(",")]
    counter = iter(range(10**6))

    def fresh() -> Path:
        return work / f"run{next(counter)}"

    def singles() -> None:
        out = fresh()
        out.mkdir()
        base = out / "base.kld"
        kld = ["--kld", "--engine", "llama.cpp"] + scoring
        _run(ZP + ["eval", "default", "--save-base", str(base)] + kld)
        for t, m in variants:
            f = out / f"{t}-{m}.gguf"
            _run(ZP + ["quantize", "--type", t, "--method", m, "-o", str(f), "--quiet"])
            _run(ZP + ["eval", str(f), "--base-logits", str(base)] + kld)

    def sweep(*extra: str):
        def go() -> None:
            _run(ZP + ["sweep", "--types", args.types, "--methods", args.methods, "-o",
                       str(fresh()), "--quiet"] + scoring + list(extra))
        return go

    ray_start = _ray_start_seconds()
    try:
        t_single, t_local, t_ray = interleaved_medians(
            [singles, sweep(), sweep("--ray", "local")], repeat=args.runs, warmup=0,
            before=lambda: shutil.rmtree(work, ignore_errors=True) or work.mkdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(variants)
    print(f"{n} variants of the default model ({args.types} x {args.methods}), "
          f"{args.max_tokens} scored tokens, medians of {args.runs}")
    print(f"  {n} quantize + {n + 1} eval --kld commands {t_single:6.1f} s")
    print(f"  zeropoint sweep (local pool)    {t_local:8.1f} s   {t_single / t_local:.2f}x "
          f"faster than the single commands (target >= 1)")
    print(f"  zeropoint sweep --ray local     {t_ray:8.1f} s   overhead over the pool "
          f"{t_ray / t_local - 1:+.0%}; without the cluster's start ({ray_start:.1f} s) "
          f"{(t_ray - ray_start) / t_local - 1:+.0%} (target < +20%)")


def _ray_start_seconds() -> float:
    """Seconds to start and stop a local Ray instance, alone."""
    code = ("import ray; ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); "
            "ray.shutdown()")
    t0 = time.perf_counter()
    _run([sys.executable, "-c", code])
    return time.perf_counter() - t0


def _run(cmd) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
