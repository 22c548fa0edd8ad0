"""Loading a GGUF file as a float32 transformers model and tokenizer, whole process: zeropoint's
`load_model` (models/gguf_load.py: one parse, C-kernel dequantization) against transformers' own
GGUF path (`AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained(gguf_file=)`,
what load_model called before), which builds the same model bit for bit
(tests/models/test_gguf_load.py). Each run is a fresh process that imports, loads and exits;
runs alternate (timing.interleaved_medians); medians and their ratio (below 1: zeropoint is
faster).

    .venv/bin/python benchmarks/bench_load.py [--models smollm2,gemma3] [--repeat 3]

Measured 2026-12-03, 2-vCPU VM at load 10-13 (read the ratios): SmolLM2-135M 8.6 s against
72.3 s (0.12, --repeat 3); Gemma 3 270M 21.5 s against 115.7 s (0.19, --repeat 1). What is left
of zeropoint's time is mostly importing torch and transformers; on Gemma, transformers' GGUF
tokenizer builder (deriving 262k merges from the vocabulary, ~4 s quiet) is the largest part.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved_medians  # noqa: E402  (benchmarks/timing.py)

from zeropoint.models.source import default_model_path, gemma3_model_path  # noqa: E402

MODELS = {"smollm2": default_model_path, "gemma3": gemma3_model_path}

ZEROPOINT = "from zeropoint.models import load_model; load_model({path!r}, progress=False)"
TRANSFORMERS = """
import os, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
p = Path({path!r})
config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, config=config,
                                     dtype=torch.float32)
AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TQDM_DISABLE="1")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        path = str(MODELS[name]())

        def run(code):
            def go():
                subprocess.run([sys.executable, "-c", code.format(path=path)], env=env,
                               check=True, capture_output=True)
            return go

        ours, theirs = interleaved_medians([run(ZEROPOINT), run(TRANSFORMERS)], args.repeat,
                                           warmup=0)
        rows.append((name, ours, theirs))
    print(f"GGUF -> float32 model + tokenizer, whole process, median of {args.repeat} "
          "alternated runs")
    print(f"{'model':10s} {'zeropoint s':>12s} {'transformers s':>15s} {'ratio':>6s}")
    for name, ours, theirs in rows:
        print(f"{name:10s} {ours:12.1f} {theirs:15.1f} {ours / theirs:6.2f}")


if __name__ == "__main__":
    main()
