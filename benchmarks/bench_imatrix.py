"""`zeropoint imatrix` against `llama-imatrix`, whole process, on the same model, tokens and
threads: SmolLM2-135M (the default Q4_1 GGUF), the default calibration mix, windows of 512,
--tokens in all. llama-imatrix runs with --no-ppl (zeropoint computes no perplexity either) and
its other defaults; each process starts cold, loads the model, tokenizes, runs and writes its
file. Medians of --repeat interleaved runs (timing.interleaved_medians) and their ratio.
Target: zeropoint no slower (ratio <= 1).

    .venv/bin/python benchmarks/bench_imatrix.py [--tokens 8192] [--threads 2] [--repeat 3]

Measured 2026-12-03 (2-vCPU VM at load ~20, --tokens 4096 --repeat 3): zeropoint 363.6 s,
llama-imatrix 207.9 s, ratio 1.75: target not met. Most of zeropoint's time was loading the GGUF
through transformers (it parses the file three times and dequantizes in numpy).
With zeropoint's own GGUF loader (models/gguf_load.py), same day, same arguments, load 7-12:
zeropoint 79.9 s, llama-imatrix 102.8 s, ratio 0.78: target met. The forward skips the output
matrix that llama-imatrix computes for every token.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import interleaved_medians

from zeropoint.calibrate.texts import default_calibration_text
from zeropoint.gguf.llama_tools import tool_path
from zeropoint.models.source import default_model_path

CTX = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp, "calib.txt")
        text.write_text(default_calibration_text(), encoding="utf-8")
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        zeropoint = [sys.executable, "-m", "zeropoint.cli", "imatrix", str(model), "--calib",
                     str(text), "--ctx", str(CTX), "--calib-tokens", str(args.tokens),
                     "--threads", str(args.threads), "-o", str(Path(tmp, "zp.gguf")), "--quiet"]
        llama = [str(tool_path("llama-imatrix")), "-m", str(model), "-f", str(text), "-c",
                 str(CTX), "--chunks", str(args.tokens // CTX), "-t", str(args.threads),
                 "--no-ppl", "-o", str(Path(tmp, "llama.gguf"))]

        def run(cmd):
            def go():
                subprocess.run(cmd, check=True, capture_output=True, env=env)
            return go

        zp_s, llama_s = interleaved_medians([run(zeropoint), run(llama)], args.repeat,
                                            warmup=0)
    print(f"imatrix of SmolLM2-135M (Q4_1 GGUF), {args.tokens} tokens in windows of {CTX}, "
          f"{args.threads} threads, whole process, median of {args.repeat} interleaved runs")
    print(f"  zeropoint imatrix  {zp_s:8.1f} s  ({args.tokens / zp_s:6.0f} tokens/s)")
    print(f"  llama-imatrix      {llama_s:8.1f} s  ({args.tokens / llama_s:6.0f} tokens/s)")
    print(f"  ratio zeropoint / llama.cpp: {zp_s / llama_s:.2f}  (target <= 1)")


if __name__ == "__main__":
    main()
