"""`zeropoint analyze` against one float forward pass, and bit allocation against uniform 4-bit.

1. Speed. The whole layer-by-layer analysis of SmolLM2-135M for one spec (int4 sym g128, lm_head
   float) on 2,048 tokens of pydoc text (4 windows of 512) at 2 threads, against one float forward
   pass over the same windows. Target: within 4x. Both are medians of repeated runs in this
   process, interleaved, so that a noisy machine slows both alike.
2. Allocation (--allocation). A budget allocation calibrated on pydoc (--calib-tokens) against
   uniform int4 sym g128 at the same bytes, perplexity on the Lee corpus (--eval-tokens, text
   not used for the allocation), bits per weight over the Linear weights but lm_head, from the
   real bytes (codes + scales + zero-points). Anchor: llama.cpp's hand-made Q4_K_M mix on the
   same tensors, when llama-cpp-python is installed.

    .venv/bin/python benchmarks/bench_analysis.py [--tokens 2048] [--repeat 3] [--allocation]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zeropoint import QuantSpec, Recipe, quantize_model
from zeropoint.analysis.allocate import allocate, qtensor_nbytes
from zeropoint.analysis.common import run, text_batches
from zeropoint.analysis.layerwise import analyze_layers
from zeropoint.gguf.llama_cpp import llama_cpp_quantize
from zeropoint.models.evaluate import default_text, lee_text, perplexity
from zeropoint.models.load import load_model
from zeropoint.models.source import default_model_path

INT4_G128 = QuantSpec(4, "symmetric", "per_group", group_size=128)
LINEAR_GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def bench_speed(model, tokenizer, tokens: int, repeat: int) -> None:
    batches = text_batches(tokenizer, default_text(), window=512, max_tokens=tokens)

    def float_pass():
        with torch.inference_mode():
            for b in batches:
                run(model, b)

    def analysis():
        analyze_layers(model, batches, [INT4_G128], keep_float=["lm_head"])

    float_pass()  # warm up
    analysis()
    floats, analyses = [], []
    for _ in range(repeat):  # interleaved: a burst of load hits both
        t0 = time.perf_counter()
        float_pass()
        floats.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        analysis()
        analyses.append(time.perf_counter() - t0)
    f, a = statistics.median(floats), statistics.median(analyses)
    n = sum(b["input_ids"].numel() for b in batches)
    print(f"\n1. analysis speed: SmolLM2-135M, {n} tokens in {len(batches)} windows of 512, "
          f"{torch.get_num_threads()} threads, median of {repeat}")
    print(f"   one float forward pass         {f:8.2f} s   (runs: {', '.join(f'{t:.1f}' for t in floats)})")
    print(f"   analysis, int4 sym g128        {a:8.2f} s   (runs: {', '.join(f'{t:.1f}' for t in analyses)})")
    print(f"   ratio                          {a / f:8.2f} x   (target: 4x or less)")


def held_out_kl(reference, quantized, batches) -> float:
    """Mean KL(p_float || p_quantized) of the next-token distribution per token."""
    total, rows = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            p = torch.log_softmax(run(reference, b).logits.float(), -1)
            q = torch.log_softmax(run(quantized, b).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum())
            rows += p.shape[0] * p.shape[1]
    return total / rows


def q4_k_m_anchor() -> str:
    """Bits per weight of llama.cpp's Q4_K_M mix on the same Linear tensors, from its GGUF."""
    try:
        import llama_cpp  # noqa: F401
        from gguf import GGUFReader
    except ImportError:
        return "llama-cpp-python is not installed: no Q4_K_M anchor"
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "q4_k_m.gguf"
        try:  # requantizes: the default model is stored as Q4_1
            llama_cpp_quantize(default_model_path(), dst, "Q4_K_M", nthread=2)
        except RuntimeError:
            return "llama_model_quantize failed: no Q4_K_M anchor"
        reader = GGUFReader(str(dst))
        nbytes = numel = 0
        types = {}
        for t in reader.tensors:
            if t.name.split(".")[-2] in LINEAR_GGUF_NAMES:
                nbytes += int(t.n_bytes)
                numel += int(t.n_elements)
                types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        whole = dst.stat().st_size
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
    return (f"llama.cpp Q4_K_M: {8 * nbytes / numel:.3f} bits/weight over the same {sum(types.values())} "
            f"tensors ({mix}; hidden size 576 is not a multiple of 256, so most fall back from "
            f"K-quants); whole file {whole / 2**20:.1f} MiB")


def bench_allocation(loaded, calib_tokens: int, eval_tokens: int) -> None:
    model, tok = loaded.model, loaded.tokenizer
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    numel = sum(m.weight.numel() for _, m in linears)
    uniform_bytes = sum(qtensor_nbytes(tuple(m.weight.shape), INT4_G128) for _, m in linears)
    base = Recipe.uniform(INT4_G128)
    batches = text_batches(tok, default_text(), window=512, max_tokens=calib_tokens)
    held_out = lee_text()
    held_out_batches = text_batches(tok, held_out, window=512, max_tokens=eval_tokens)

    def evaluate(recipe):
        q = copy.deepcopy(model)
        report = quantize_model(q, recipe)
        nbytes = sum(layer.bytes for layer in report.layers)
        ppl = perplexity(q, tok, held_out, max_tokens=eval_tokens).perplexity
        return ppl, held_out_kl(model, q, held_out_batches), 8 * nbytes / numel

    rows = [("float32", perplexity(model, tok, held_out, max_tokens=eval_tokens).perplexity, 0.0,
             32.0)]
    rows.append(("uniform int4 sym g128", *evaluate(base)))
    asym = QuantSpec(4, "asymmetric", "per_group", group_size=128)
    rows.append(("uniform int4 asym g128", *evaluate(Recipe.uniform(asym))))
    for budget in (8 * uniform_bytes / numel, 4.5):
        t0 = time.perf_counter()
        alloc = allocate(model, batches, budget, recipe=base)
        seconds = time.perf_counter() - t0
        rows.append((f"allocation, budget {budget:.3f} ({seconds:.0f} s)", *evaluate(alloc.recipe(base))))
    print(f"\n2. bit allocation: calibrated on {calib_tokens} tokens of pydoc, perplexity on "
          f"{eval_tokens} tokens of the Lee corpus (held out); bits per weight over the "
          f"{len(linears)} Linear weights but lm_head ({numel:,} weights), scales and zero-points "
          "included; lm_head and embeddings float in all")
    print(f"   {'':<38} {'perplexity':>10} {'KL/token':>9} {'bits/weight':>12}")
    for name, ppl, kl, bpw in rows:
        print(f"   {name:<38} {ppl:10.3f} {kl:9.4f} {bpw:12.3f}")
    print("   anchor: " + q4_k_m_anchor())
    print("   llama.cpp's --target-bpw: not in the llama.cpp that llama-cpp-python 0.3.36 vendors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocation", action="store_true", help="also run the allocation comparison")
    p.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None, progress=False)
    if not args.no_speed:
        bench_speed(loaded.model, loaded.tokenizer, args.tokens, args.repeat)
    if args.allocation:
        bench_allocation(loaded, args.calib_tokens, args.eval_tokens)


if __name__ == "__main__":
    main()
