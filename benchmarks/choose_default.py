"""Candidate defaults for `zeropoint quantize MODEL -o OUT`, measured on both real models beside
llama.cpp's own quantizations of the same source, to choose the default recipe by measurement.

Per model: the float model (the source as zeropoint loads it) is the base; every candidate is
quantized in memory from it (method x linear spec x embedding-and-head spec) and scored on
`models.evaluate.wikipedia_text()` (held out from the calibration mix) by models/kld.py's
protocol (llama-perplexity's: windows of 512, the second half scored): mean KL-divergence from
the float model and perplexity, all in torch, so that rows differ only by their weights.
llama.cpp's files (Q4_K_M for SmolLM2; Q4_0 and IQ4_XS for Gemma 3, whose source already is a
Q4_K_M mix) are made by llama-quantize and scored the same way (dequantized by transformers).

weights: tensor bytes as stored (codes, scales, zero-points, float tensors; a tied table once),
no file headers or vocabulary. secs: the in-memory quantization alone (no model load).

Candidate set (a subset of the full product, and why):
- first the default's own candidates (models/choose.py), with and without the least-squares
  search of each float-minimum group (calibrate/fit.py, method "fit"): R1 = linears int4 g32
  float-minimum, table int8 per row; R2 = linears int8 per channel, table int4 g32
  float-minimum (R3 = R2 searched); `--pick 0,1,2,3` measures these alone;
- rtn with integer and with float zero-points, groups of 32/64/128, symmetric g128 (the old
  default, head in float) and symmetric g32: the spec axes at round-to-nearest, which is what
  fits SmolLM2's two-minute budget on 2 cores with room to spare;
- hqq on the asymmetric integer-zero-point g32 spec (HQQ fits integer zero-points only here);
- gptq on the chosen spec (SmolLM2 only with --gptq: a sequential pass over 30 layers is
  minutes on 2 cores, outside the default's budget);
- the embedding and tied head: float, int8 per row (the compact decoder's int8 gemv), int8 g32
  with float16 scales (Q8_0's form), int4 g32 float-zero-point.

    .venv/bin/python benchmarks/choose_default.py [--models smollm2,gemma3] [--chunks 4] [--gptq]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

PEERS = {"smollm2": ("Q4_K_M",), "gemma3": ("Q4_0", "IQ4_XS")}


def source_of(name: str) -> Path:
    from zeropoint.models.source import default_model_path, gemma3_model_path

    return {"smollm2": default_model_path, "gemma3": gemma3_model_path}[name]()


def specs():
    from zeropoint import QuantSpec

    def g(bits, scheme, group, zp="integer", scales="float16"):
        return QuantSpec(bits, scheme, "per_group", group_size=group, scale_dtype=scales,
                         zero_point=zp)

    return {
        "int4 sym g128 (old default)": QuantSpec(4, "symmetric", "per_group", group_size=128),
        "int4 sym g32 f16": g(4, "symmetric", 32),
        "int4 asym g32 f16": g(4, "asymmetric", 32),
        "int4 asym g32 fzp f16": g(4, "asymmetric", 32, "float"),
        "int4 asym g64 fzp f16": g(4, "asymmetric", 64, "float"),
        "int4 asym g128 fzp f16": g(4, "asymmetric", 128, "float"),
        "int8 per row": QuantSpec(8, "symmetric", "per_channel"),
        "int8 g32 f16 (Q8_0 form)": g(8, "symmetric", 32),
        "int6 asym g32 fzp f16": g(6, "asymmetric", 32, "float"),
        "int4 asym g32 fzp f16 table": g(4, "asymmetric", 32, "float"),
    }


def recipe_of(linear, table):
    """linears get `linear`; the embedding and output head `table` (None: float)."""
    from zeropoint import Recipe
    from zeropoint.recipe import EMBEDDING_PATTERNS, Rule

    rules = tuple(Rule(p, table) for p in ("lm_head",) + EMBEDDING_PATTERNS)
    return Recipe(linear, rules, quantize_embeddings=table is not None)


def candidates(gptq: bool):
    s = specs()
    # The candidates of models/choose.py first (R1, R1 searched, R2, R3 = R2 searched), then the
    # earlier survey's rows.
    rows = [
        ("rtn", "int4 asym g32 fzp f16", "int8 per row"),
        ("fit", "int4 asym g32 fzp f16", "int8 per row"),
        ("rtn", "int8 per row", "int4 asym g32 fzp f16 table"),
        ("fit", "int8 per row", "int4 asym g32 fzp f16 table"),
        ("rtn", "int4 sym g128 (old default)", None),
        ("rtn", "int4 sym g32 f16", "int8 per row"),
        ("rtn", "int4 asym g32 f16", "int8 per row"),
        ("rtn", "int4 asym g128 fzp f16", "int8 per row"),
        ("rtn", "int4 asym g64 fzp f16", "int8 per row"),
        ("rtn", "int4 asym g32 fzp f16", "int8 per row"),
        ("rtn", "int4 asym g32 fzp f16", "int8 g32 f16 (Q8_0 form)"),
        ("rtn", "int4 asym g32 fzp f16", "int6 asym g32 fzp f16"),
        ("rtn", "int4 asym g32 fzp f16", "int4 asym g32 fzp f16 table"),
        ("hqq", "int4 asym g32 f16", "int8 per row"),
    ]
    if gptq:
        rows.append(("gptq", "int4 asym g32 fzp f16", "int8 per row"))
    for method, linear, table in rows:
        yield method, linear, table, recipe_of(s[linear], s[table] if table else None)


def quantize(model, recipe, method: str, tokenizer):
    from zeropoint import quantize_model

    if method == "hqq":
        from zeropoint.algorithms.hqq import hqq_quantize

        return quantize_model(model, recipe, quantize_fn=lambda n, w, spec: hqq_quantize(w, spec))
    if method == "fit":  # float-zero-point groups searched (calibrate/fit.py)
        from zeropoint.nn.quantize_model import fitted_quantize_fn

        return quantize_model(model, recipe, quantize_fn=fitted_quantize_fn)
    if method == "gptq":
        from zeropoint.algorithms.sequential import gptq_model
        from zeropoint.calibrate.texts import default_calibration_text

        ids = tokenizer(default_calibration_text(), return_tensors="pt")["input_ids"][:, :2048]
        gptq_model(model, recipe, ids.view(4, -1))
        return None
    return quantize_model(model, recipe)


def score(model, tokenizer, base, text, source):
    from zeropoint.models.kld import TorchLogits, kl_divergence, kld_report

    stats = kld_report(kl_divergence(TorchLogits(model, tokenizer, source), base, text))
    return stats.perplexity.value, stats.kld.value


def bench_model(name: str, args, work: Path) -> None:
    from zeropoint.gguf.llama_tools import run_tool
    from zeropoint.models.evaluate import wikipedia_text
    from zeropoint.models.kld import TorchLogits, compute_base_logits
    from zeropoint.models.load import load_model
    from zeropoint.models.main_job import gguf_weights
    from zeropoint.nn.quantize_model import model_bytes

    src = source_of(name)
    text = wikipedia_text()
    fl = load_model(src, progress=False)
    base = compute_base_logits(TorchLogits(fl.model, fl.tokenizer, str(src)), text,
                               chunks=args.chunks)
    print(f"\n{name}: {src.name}; KLD from float and perplexity on wikipedia_text(), "
          f"{args.chunks} windows of 512 (llama-perplexity's protocol)")
    print(f"{'method':<6}{'linears':<28}{'embedding+head':<28}{'weights':>12}{'bits/w':>8}"
          f"{'ppl':>9}{'KLD':>9}{'secs':>7}", flush=True)

    def row(method, linear, table, nbytes, params, p, kld, secs):
        s = f"{secs:7.1f}" if secs is not None else f"{'-':>7}"
        print(f"{method:<6}{linear:<28}{table:<28}{nbytes / 2**20:>8.1f} MiB"
              f"{8 * nbytes / params:>8.3f}{p:>9.3f}{kld:>9.4f}{s}", flush=True)

    nbytes, params = model_bytes(fl.model)
    p, kld = score(fl.model, fl.tokenizer, base, text, str(src))
    row("-", "float32", "float32", nbytes, params, p, kld, None)
    for target in PEERS[name]:
        path = work / f"{name}-{target}.gguf"
        started = time.perf_counter()
        run_tool("llama-quantize", "--allow-requantize", src, path, target, "2")
        secs = time.perf_counter() - started
        nbytes, params = gguf_weights(path)
        loaded = load_model(path, progress=False)
        p, kld = score(loaded.model, loaded.tokenizer, base, text, str(path))
        row("llama", f"llama.cpp {target}", "(its mix)", nbytes, params, p, kld, secs)
        del loaded
    chosen = list(candidates(args.gptq and name == "smollm2"))
    if args.pick:
        chosen = [chosen[int(i)] for i in args.pick.split(",")]
    for method, linear, table, recipe in chosen:
        model = copy.deepcopy(fl.model)
        started = time.perf_counter()
        try:
            quantize(model, recipe, method, fl.tokenizer)
        except (ValueError, TypeError) as e:
            print(f"{method:<6}{linear:<28}{table or 'float32':<28} not measured: {e}", flush=True)
            continue
        secs = time.perf_counter() - started
        from zeropoint.nn.quantize_model import distinct_tensors, quantized_layers

        stored = {id(m.weight_q): m.weight_q.nbytes for _, m in quantized_layers(model)}
        nbytes = sum(stored.values()) + sum(t.nbytes for t in distinct_tensors(model.parameters()))
        p, kld = score(model, fl.tokenizer, base, text, name)
        row(method, linear, table or "float32", nbytes, params, p, kld, secs)
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--chunks", type=int, default=4, help="windows of 512 tokens scored")
    ap.add_argument("--gptq", action="store_true", help="also GPTQ on SmolLM2 (minutes)")
    ap.add_argument("--pick", help="comma list of candidate indices (0-based) to measure only")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="zeropoint-choose-default-") as tmp:
        for name in args.models.split(","):
            bench_model(name.strip(), args, Path(tmp))


if __name__ == "__main__":
    main()
