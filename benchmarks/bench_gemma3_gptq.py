"""Gemma 3 270M: zeropoint's GPTQ into a GGUF type against llama.cpp's own quantization of the
same file to the same type, by perplexity under llama.cpp.

The source is a Q4_K_M-mix GGUF (Q5_0, Q4_K, Q6_K, Q8_0 tensors), so the weights already lie on
several grids: both sides start from those dequantized weights. Types whose grid differs from
the source's are compared (Q4_0, Q3_K_M; not Q4_K_M, which gives back the source). GPTQ is
calibrated on gensim's lee.cor, perplexity scored on lee_background.cor (same corpus, no
overlap). Sizes are the files' bits per weight as llama.cpp counts them.

Measured 2026-12-03 on the shared 2-core sandbox (load average ~20), Q4_0 only, GPTQ calibrated
on 4,096 tokens of lee.cor, perplexity on the first 1,022 tokens of lee_background, source a
Q4_K_M-mix file: source 54.81; llama.cpp Q4_0 101.80; zeropoint GPTQ Q4_0 66.82, both files
241,408,704 bytes (7.009 bits/weight: the tied 262,144 x 640 embedding stays Q8_0); llama.cpp
Q3_K_M 64.29 at 7.025 bits/weight; zeropoint GPTQ Q3_K_M 58.34 at the same size (measured later
the same day on a quiet machine, `--types Q3_K_M --eval-tokens 1024`: GPTQ took 112 s).

    .venv/bin/python benchmarks/bench_gemma3_gptq.py [--types Q4_0 Q3_K_M] [--calib-tokens 4096]
        [--eval-tokens 2048] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from zeropoint.cli import main
from zeropoint.gguf.llama_cpp import gguf_size, llama_cpp_perplexity, llama_cpp_quantize
from zeropoint.models.source import gemma3_model_path


def lee(name: str) -> str:
    spec = importlib.util.find_spec("gensim")
    folder = Path(spec.submodule_search_locations[0]) / "test" / "test_data"
    return (folder / name).read_text(encoding="latin-1")  # lee.cor holds a few latin-1 bytes


def run(types, calib_tokens: int, eval_tokens: int, out: Path) -> None:
    source = gemma3_model_path()
    calib = out / "lee_calib.txt"
    calib.write_text(lee("lee.cor"), encoding="utf-8")
    text = lee("lee_background.cor")
    rows = [("source (Q4_K_M mix)", source, None)]
    for t in types:
        ref, ours = out / f"llama_{t}.gguf", out / f"gptq_{t}.gguf"
        llama_cpp_quantize(source, ref, t)
        started = time.perf_counter()
        rc = main(["quantize", str(source), "--type", t, "--method", "gptq", "--calib",
                   str(calib), "--calib-tokens", str(calib_tokens), "-o", str(ours), "--quiet",
                   "--force"])
        if rc:
            raise SystemExit(f"zeropoint quantize --method gptq --type {t} failed ({rc})")
        rows += [(f"llama.cpp {t}", ref, None),
                 (f"zeropoint GPTQ {t}", ours, time.perf_counter() - started)]
    print(f"Gemma 3 270M (source: a Q4_K_M-mix GGUF), perplexity under llama.cpp on "
          f"lee_background, {eval_tokens} tokens; GPTQ calibrated on {calib_tokens} tokens of "
          "lee.cor")
    for label, path, seconds in rows:
        ppl = llama_cpp_perplexity(path, text, max_tokens=eval_tokens)
        size, bpw = gguf_size(path)
        took = f"  ({seconds:.0f} s)" if seconds else ""
        print(f"  {label:24s} ppl {ppl.perplexity:9.3f}  {bpw:6.3f} bits/weight  "
              f"{size / 2**20:7.1f} MiB{took}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q3_K_M"])
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        run(a.types, a.calib_tokens, a.eval_tokens, a.out)
    else:
        with tempfile.TemporaryDirectory() as d:
            run(a.types, a.calib_tokens, a.eval_tokens, Path(d))
