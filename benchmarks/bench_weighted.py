"""Weighted requantization (an importance matrix) of the default model (SmolLM2-135M) and of
Gemma 3 270M: zeropoint's requantize(importance=...) vs llama-quantize --imatrix (its own
process, nthread = --threads), end to end (read, dequantize, quantize, write), interleaved within
every repeat so a change in the machine's load hits both; medians and the ratio (llama-quantize's
time / zeropoint's: above 1, zeropoint is faster). Both files are checked to be the same bytes
once per type.

The importance matrix is llama-imatrix's, on a few KB of pydoc text (made once per model into a
temporary folder).

    python benchmarks/bench_weighted.py [--models smollm2,gemma3] [--types Q4_0,Q4_K_M,Q6_K]
                                        [--runs 3] [--threads 2]

Target (issue #14): weighted quantization no slower than llama-quantize.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_gguf.py

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pydoc_data.topics  # noqa: E402
import torch  # noqa: E402

from timing import interleaved_medians  # noqa: E402  (benchmarks/timing.py)
from zeropoint.gguf.imatrix import read_imatrix  # noqa: E402
from zeropoint.gguf.llama_tools import run_tool  # noqa: E402
from zeropoint.gguf.requantize import requantize  # noqa: E402
from zeropoint.gguf.weighted import imatrix_metadata  # noqa: E402


def model_path(name: str) -> Path:
    from zeropoint.models.source import default_model_path, gemma3_model_path

    return default_model_path() if name == "smollm2" else gemma3_model_path()


def make_imatrix(model: Path, folder: Path) -> Path:
    text = folder / "calib.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:20])[:12000])
    out = folder / f"{model.stem}.imatrix.gguf"
    run_tool("llama-imatrix", "-m", model, "-f", text, "-c", "128", "-b", "128", "--chunks", "2",
             "--no-ppl", "-t", "2", "-o", out,
             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # no spinning on a busy machine
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q6_K")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {args.threads}, median of {args.runs}")
    print(f"{'model':<8} {'type':<7} {'zeropoint s':>12} {'llama s':>9} {'ratio':>7} {'same':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            model = model_path(name)
            imat_path = make_imatrix(model, folder)
            imat = read_imatrix(imat_path)
            extra = imatrix_metadata(str(imat_path), imat)
            for qtype in args.types.split(","):
                count = iter(range(1_000_000))

                def ours():
                    out = folder / f"zp{next(count)}.gguf"
                    requantize(model, out, qtype, importance=imat.importance,
                               extra_metadata=extra)
                    return out

                def theirs():
                    out = folder / f"ll{next(count)}.gguf"
                    run_tool("llama-quantize", "--allow-requantize", "--imatrix", imat_path,
                             model, out, qtype, str(args.threads))
                    return out

                def clean():
                    for f in folder.glob("zp*.gguf"):
                        f.unlink()
                    for f in folder.glob("ll*.gguf"):
                        f.unlink()

                same = ours().read_bytes() == theirs().read_bytes()
                clean()
                t_ours, t_theirs = interleaved_medians([ours, theirs], args.runs, warmup=0,
                                                       before=clean)
                print(f"{name:<8} {qtype:<7} {t_ours:>12.2f} {t_theirs:>9.2f} "
                      f"{t_theirs / t_ours:>7.2f} {'yes' if same else 'NO':>5}", flush=True)


if __name__ == "__main__":
    main()
