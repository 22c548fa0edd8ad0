"""`zeropoint eval BASE QUANTIZED --kld` against `llama-perplexity --kl-divergence`, whole
processes, on the same tokens and threads.

The peer is what a llama.cpp user runs: llama-perplexity over the base model writing its
base-logits file, then llama-perplexity over the quantized model reading it. zeropoint runs
once, as a user would: both models in one process, the base kept compact in memory. Two
zeropoint rows: --engine llama.cpp (llama.cpp's kernels through llama-cpp-python, the same GGUF
files) and the default torch engine (models/gguf_load.py dequantizes each GGUF file to a
float32 transformers model).
SmolLM2-135M's default GGUF (Q4_1) is the base, llama-quantize's Q4_0 of it the quantized
model, gensim's Lee corpus the text. Rows take turns, repeat after repeat; medians; the ratio is
peer seconds / zeropoint seconds (above 1: zeropoint is faster).

    .venv/bin/python benchmarks/bench_kld.py [--chunks 4] [--repeat 3] [--threads 2]

Measured 2026-12-03, 2-vCPU VM under load (read the ratios): with zeropoint's GGUF loader,
load 11-13, llama-perplexity 57.0 s, --engine llama.cpp 70.4 s, torch 66.9 s; then with the
torch engine's single-threaded chunk workers, load 12-15 (--rows torch), llama-perplexity
80.3 s, torch 76.5 s: ratio 1.05 (zeropoint 0.95x the peer's time), target met.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved_medians  # noqa: E402  (benchmarks/timing.py)

from zeropoint.gguf.llama_tools import run_tool, tool_path  # noqa: E402
from zeropoint.models.evaluate import lee_text  # noqa: E402
from zeropoint.models.source import default_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="llama.cpp,torch",
                    help="zeropoint engines to time, comma-separated")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-kld-"))
    base, quant, text = default_model_path(), work / "q4_0.gguf", work / "lee.txt"
    text.write_text(lee_text())
    run_tool("llama-quantize", "--allow-requantize", base, quant, "Q4_0", str(args.threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    common = ["-c", str(args.window), "--chunks", str(args.chunks), "-t", str(args.threads)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")

    def peer():
        # run_tool adds --no-repack where zeropoint keeps llama.cpp's extra buffers off, so
        # both sides run the same kernels.
        run_tool("llama-perplexity", "-m", base, "-f", text, *common,
                 "--kl-divergence-base", work / "base.kld", env=env)
        run_tool("llama-perplexity", "-m", quant, *common, "--kl-divergence-base",
                 work / "base.kld", "--kl-divergence", env=env)

    def zeropoint(engine):
        cmd = [sys.executable, "-m", "zeropoint.cli", "eval", str(base), str(quant), "--kld",
               "--engine", engine, "--text", str(text), "--window", str(args.window),
               "--chunks", str(args.chunks)]

        def run():
            subprocess.run(cmd, env=env, check=True, capture_output=True)
        return run

    engines = [e for e in args.rows.split(",") if e]
    names = ["llama-perplexity"] + [f"zeropoint --engine {e}" for e in engines]

    def shown(name, fn):
        # Each run is long: print it as it ends, so a run cut short still says something.
        def run():
            t0 = time.perf_counter()
            fn()
            print(f"  {name}: {time.perf_counter() - t0:.2f} s", flush=True)
        return run

    fns = [shown(n, f) for n, f in zip(names, [peer] + [zeropoint(e) for e in engines])]
    medians = interleaved_medians(fns, repeat=args.repeat, warmup=0)
    scored = args.chunks * (args.window - 1 - args.window // 2)
    print(f"KL-divergence, SmolLM2-135M Q4_1 base vs Q4_0, {args.chunks} chunks of "
          f"{args.window} ({scored} scored tokens), {args.threads} threads, median of "
          f"{args.repeat}; {tool_path('llama-perplexity')}")
    print(f"{'row':44s} {'seconds':>8s} {'ratio':>6s}")
    print(f"{'llama-perplexity (base file + --kl-divergence)':44s} {medians[0]:8.2f} {'1.00':>6s}")
    for engine, t in zip(engines, medians[1:]):
        print(f"{'zeropoint eval --kld --engine ' + engine:44s} {t:8.2f} {medians[0] / t:6.2f}")
    base_file = work / "base.kld"
    if base_file.exists():
        print(f"llama.cpp base-logits file: {base_file.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
