"""The README's main job on both real models, beside llama.cpp's own quantizations of the same
source: what a user gets from `zeropoint quantize MODEL -o OUT` (the default spec, whatever it is
today) against llama.cpp's Q4_K_M (and, on Gemma 3, whose source already is a Q4_K_M mix, its
Q4_0 and IQ4_XS too).

Per model, one table: float (the source as zeropoint loads it), zeropoint's output and each
llama.cpp file, with
- weights: bytes of the weights only (tensor bytes; no GGUF header or vocabulary, no safetensors
  header), and bits per weight over every weight;
- perplexity on held-out text (gensim's lee_background.cor, first --tokens tokens, windows of
  512; models.evaluate.perplexity's protocol) with every model run in torch (GGUF files
  dequantized by transformers), so the rows differ only by their weights;
- decode tokens/s at batch 1: float and zeropoint's output as `zeropoint generate` runs them
  (nn.generate.TorchDecoder: the compact decoder where the family allows), llama.cpp's files
  in llama.cpp (gguf.llama_cpp.LlamaCppDecoder), all through the same stream_tokens loop;
  rows alternate, medians of --repeat runs; the ratio is against llama.cpp's Q4_K_M;
- the time the quantization took (zeropoint's command line; llama-quantize).

--tables candidates also measures candidate default specs in memory on the loaded float model
(asymmetric/symmetric, groups of 32/64/128, HQQ, a quantized embedding and tied head): weights,
bits per weight and perplexity for each, to choose a default by measurement.

    .venv/bin/python benchmarks/bench_main_job.py [--models smollm2,gemma3] [--tokens 2048]
        [--gen-tokens 64] [--repeat 3] [--tables main,candidates] [--no-speed]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import interleaved_medians  # benchmarks/timing.py

from zeropoint.models.main_job import PROMPT, gguf_weights


def source_of(name: str) -> Path:
    from zeropoint.models.source import default_model_path, gemma3_model_path

    return {"smollm2": default_model_path, "gemma3": gemma3_model_path}[name]()


def zeropoint_quantize(src: Path, out: Path) -> float:
    """The main job, as a user runs it (without --eval, which this script does itself)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zeropoint.cli", "quantize", str(src), "-o", str(out),
                    "--force", "--quiet"], check=True)
    return time.perf_counter() - started


def llama_quantize(src: Path, out: Path, target: str) -> float:
    from zeropoint.gguf.llama_tools import run_tool

    started = time.perf_counter()
    run_tool("llama-quantize", "--allow-requantize", src, out, target, "2")
    return time.perf_counter() - started


def float_weights(model) -> tuple[int, int]:
    from zeropoint.nn.quantize_model import model_bytes

    return model_bytes(model)


def ppl(model, tokenizer, text: str, tokens: int) -> float:
    from zeropoint.models.evaluate import perplexity

    return perplexity(model, tokenizer, text, max_tokens=tokens).perplexity


def decode_run(decoder, prompt: list[int], n: int):
    from zeropoint.nn.generate import Sampler, stream_tokens

    sampler = Sampler()
    return lambda: sum(1 for _ in stream_tokens(decoder, prompt, n, sampler))


def bench_model(name: str, args, work: Path) -> None:
    from zeropoint.models.evaluate import lee_text
    from zeropoint.models.load import load_model

    src = source_of(name)
    text = lee_text()
    float_model = load_model(src, progress=False)
    if "main" in args.tables:
        main_table(name, src, float_model, text, args, work)
    if "candidates" in args.tables:
        print(f"\n{name}: {src.name}")
        candidates(float_model, text, args.tokens)


def main_table(name: str, src: Path, float_model, text: str, args, work: Path) -> None:
    from zeropoint.gguf.llama_cpp import LlamaCppDecoder
    from zeropoint.modeldir.format import read_manifest
    from zeropoint.models.load import load_model
    from zeropoint.models.quantized import load_quantized
    from zeropoint.nn.generate import TorchDecoder

    rows = []  # name, weight bytes, weights, perplexity, model or GGUF path, seconds to make
    nbytes, params = float_weights(float_model.model)
    rows.append(["float32", nbytes, params, ppl(float_model.model, float_model.tokenizer, text,
                                                args.tokens), float_model, None])
    out = work / f"{name}-zeropoint"
    made = zeropoint_quantize(src, out)
    manifest = read_manifest(out)
    zp = load_quantized(out)
    rows.append([f"zeropoint default ({_default_spec(out)})", manifest.total_bytes,
                 manifest.quantized_params + manifest.kept_params,
                 ppl(zp.model, zp.tokenizer, text, args.tokens), zp, made])
    targets = ["Q4_K_M"] + (["Q4_0", "IQ4_XS"] if name == "gemma3" else [])
    for target in targets:
        path = work / f"{name}-{target}.gguf"
        made = llama_quantize(src, path, target)
        nbytes, params = gguf_weights(path)
        loaded = load_model(path, progress=False)
        rows.append([f"llama.cpp {target}", nbytes, params,
                     ppl(loaded.model, loaded.tokenizer, text, args.tokens), path, made])
        del loaded
    speeds = {}
    if not args.no_speed:
        prompt = zp.tokenizer(PROMPT)["input_ids"]
        runs, names = [], []
        for row in rows:
            what = row[4]
            if isinstance(what, Path):
                if not row[0].endswith("Q4_K_M"):
                    continue
                decoder = LlamaCppDecoder(what, n_ctx=256, threads=2)
            else:
                decoder = TorchDecoder(what.model)
            runs.append(decode_run(decoder, prompt, args.gen_tokens))
            names.append(row[0])
        medians = interleaved_medians(runs, repeat=args.repeat)
        speeds = {n: args.gen_tokens / s for n, s in zip(names, medians)}
    peer = speeds.get("llama.cpp Q4_K_M")
    print(f"\n{name}: {src.name}; perplexity on lee_background.cor, {args.tokens} tokens, "
          f"in torch; decode {args.gen_tokens} tokens at batch 1 (ratio: / llama.cpp Q4_K_M)")
    print(f"{'':<36}{'weights':>12}{'bits/w':>8}{'ppl':>9}{'tok/s':>8}{'ratio':>7}{'made in':>9}")
    for label, nbytes, params, p, _, made in rows:
        speed = speeds.get(label)
        s = f"{speed:8.1f}{speed / peer:7.2f}" if speed and peer else f"{'-':>8}{'-':>7}"
        m = f"{made:8.1f}s" if made is not None else f"{'-':>9}"
        print(f"{label:<36}{nbytes / 2**20:>8.1f} MiB{8 * nbytes / params:>8.3f}{p:>9.3f}{s}{m}",
              flush=True)


def _default_spec(out: Path) -> str:
    recipe = json.loads((out / "zeropoint.json").read_text()).get("recipe", {})
    from zeropoint.spec import QuantSpec

    spec = recipe.get("default")
    return QuantSpec.from_dict(spec).describe() if spec else "float"


def candidates(float_model, text: str, tokens: int) -> None:
    """Candidate default specs, each quantized in memory from the float model."""
    from zeropoint import QuantSpec, Recipe, quantize_model
    from zeropoint.algorithms.hqq import hqq_quantize

    def recipe(bits, scheme, group, head=False, embed=False):
        spec = QuantSpec(bits, scheme, "per_group", group_size=group)
        return Recipe.uniform(spec, keep_float=() if head else ("lm_head",),
                              quantize_embeddings=embed)

    hqq = lambda name, w, spec: hqq_quantize(w, spec)  # noqa: E731
    cases = [(f"int4 {s} g{g}", recipe(4, scheme, g), None)
             for scheme, s in (("symmetric", "sym"), ("asymmetric", "asym"))
             for g in (128, 64, 32)]
    cases += [("int4 asym g64 hqq", recipe(4, "asymmetric", 64), hqq),
              ("int4 asym g32 hqq", recipe(4, "asymmetric", 32), hqq),
              ("int4 asym g32 + embedding", recipe(4, "asymmetric", 32, embed=True), None),
              ("int4 asym g32 + embedding + head", recipe(4, "asymmetric", 32, head=True,
                                                          embed=True), None)]
    print(f"\ncandidate specs (in memory; perplexity on lee_background.cor, {tokens} tokens)")
    print(f"{'':<36}{'weights':>12}{'bits/w':>8}{'ppl':>9}{'secs':>7}")
    for label, r, fn in cases:
        model = copy.deepcopy(float_model.model)
        started = time.perf_counter()
        try:
            report = (quantize_model(model, r, quantize_fn=fn) if fn
                      else quantize_model(model, r))
        except (ValueError, TypeError) as e:
            print(f"{label:<36} not measured: {e}", flush=True)
            continue
        secs = time.perf_counter() - started
        nbytes, params = report.stored_bytes, report.params  # as saved: packed + float tensors
        p = ppl(model, float_model.tokenizer, text, tokens)
        print(f"{label:<36}{nbytes / 2**20:>8.1f} MiB{8 * nbytes / params:>8.3f}{p:>9.3f}"
              f"{secs:>7.1f}", flush=True)
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", type=int, default=2048, help="perplexity tokens")
    ap.add_argument("--gen-tokens", type=int, default=64, help="decoded tokens per timed run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tables", default="main",
                    help="comma list: main (the main job beside llama.cpp), candidates (candidate "
                         "default specs)")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    args = ap.parse_args()
    args.tables = {t.strip() for t in args.tables.split(",")}
    unknown = args.tables - {"main", "candidates"}
    if unknown:
        ap.error(f"unknown table(s) {sorted(unknown)}; accepted: main, candidates")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="zeropoint-main-job-") as tmp:
        for name in args.models.split(","):
            bench_model(name.strip(), args, Path(tmp))


if __name__ == "__main__":
    main()
