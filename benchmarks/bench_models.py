"""Quantized layers and whole models against float on the CPU, in one run at 2 threads.

1. One 4096x4096 Linear at batch 1 and 32: float32 F.linear, bfloat16, zeropoint int8 and int4.
   Then SmolLM2's own matmul shapes at batch 1: float32, torch's int8/int4 kernels, and
   zeropoint's C gemv path (nn/gemv.py) on one thread and with rows shared by two.
2. SmolLM2-135M greedy decoding at batch 1: tokens per second for float32, bfloat16, int8
   per-channel and int4 group-128 (every Linear but lm_head), each with lm_head kept float32 (the
   default recipe, and the issue's perplexity setting) and with lm_head quantized too (int8
   per-channel, or int4 group-128): the 49152x576 head is a fifth of the model's weights.
   The float32 baseline that every ratio divides by runs transformers' forward each token
   (greedy_generate's "hf" loop, or generate with --loop generate); the other rows run --loop:
   "compact" (default: nn/compact_runtime.py, the model's kernels without transformers' module
   tree), "hf" or "generate". With "compact", float32 through the compact loop is a row too, so
   that the loop's own share of the gain shows. The rows take turns, repeat after repeat, so
   that load from other work on the machine falls on all of them alike; medians are printed.
   Also the quantize time, the perplexity on the first 2,048 pydoc tokens (--no-ppl skips it),
   and llama.cpp on the same model as the anchor when llama-cpp-python is installed.
   The same table for Gemma 3 270M (--models), whose rows keep the float32 head of the default
   recipe (what `zeropoint quantize GEMMA.gguf --bits 4` writes) or quantize it, with llama.cpp
   on the very GGUF file the model was loaded from (Q4_K_M) and its Q8_0 requantization.
3. Tiny random-weight models of every family the compact decoder runs (Llama 3, Mistral, Qwen2,
   Qwen3, Gemma 2, Gemma 3, Phi-3): float32 through transformers against the compact decoder
   in float32, int8 and int4 (--skip-families skips it).

    .venv/bin/python benchmarks/bench_models.py [--tokens 64] [--repeat 5] [--loop compact]
        [--models smollm2,gemma3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from zeropoint import QTensor, QuantSpec, Recipe, Rule, quantize_model
from zeropoint.nn.generate import greedy_generate
from zeropoint import ckernels
from zeropoint.nn import gemv
from zeropoint.nn.gemv import GemvKernel
from zeropoint.nn.qlinear import QLinear

from timing import interleaved_medians, median_seconds  # benchmarks/timing.py

INT8 = QuantSpec(8, "symmetric", "per_channel")
INT4 = QuantSpec(4, "symmetric", "per_group", group_size=128)


def bench_layer(repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) * 0.02
    layers = {
        "float32": lambda x: F.linear(x, w),
        "bfloat16": (lambda wb: lambda x: F.linear(x.bfloat16(), wb))(w.bfloat16()),
        "zeropoint int8": QLinear(QTensor.quantize(w, INT8), None),
        "zeropoint int4 g128": QLinear(QTensor.quantize(w, INT4), None),
    }
    print("4096x4096 Linear, median ms (ratio = float32 time / this time)")
    print(f"{'':<22}{'batch 1':>10}{'ratio':>8}{'batch 32':>10}{'ratio':>8}")
    base = {}
    for name, layer in layers.items():
        line = f"{name:<22}"
        for batch in (1, 32):
            x = torch.randn(batch, 4096, generator=g)
            with torch.inference_mode():
                t = median_seconds(lambda: layer(x), repeat * 20)
            base.setdefault(batch, t)
            line += f"{t * 1e3:>10.3f}{base[batch] / t:>7.2f}x"
        print(line)


def decode_seconds(model, ids, tokens: int, loop: str) -> float:
    """Wall seconds of one greedy decode of `tokens` new tokens."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        if loop in ("compact", "hf"):
            greedy_generate(model, ids, tokens, loop=loop)
        else:
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - t0


def llama_cpp_tokens_per_second(path: str, prompt: str, tokens: int, repeat: int) -> float | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from zeropoint.gguf.llama_cpp import open_llama  # extra buffers off where llama.cpp's AMX crashes

    llm = open_llama(path, n_ctx=512, threads=2, logits_all=False)

    def run():
        llm.reset()
        llm(prompt, max_tokens=tokens, temperature=0.0, top_k=1)

    return tokens / median_seconds(run, repeat, warmup=1)


def llama_cpp_requantize(src: str, dst: str, ftype: int) -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, 2, True
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) == 0


# SmolLM2-135M's matmuls at decode time: (name, out_features, in_features). q/k/v and gate/up
# run stacked (nn/fuse.py).
SMOLLM_SHAPES = (("o_proj", 576, 576), ("q/k/v", 960, 576), ("gate/up", 3072, 576),
                 ("down_proj", 576, 1536), ("lm_head", 49152, 576))


def bench_batch1(repeat: int) -> None:
    """One row through SmolLM2's shapes: float32, torch's int8/int4 kernels, and the C gemv
    path of nn/gemv.py on one thread and with rows split over two, interleaved."""
    lib = ckernels.library()
    if lib is None:
        print("\n(no C compiler: no gemv rows)")
        return
    g = torch.Generator().manual_seed(0)
    names = ["float32", "int8 torch", "int8 gemv", "int8 gemv 2t", "int4 torch", "int4 gemv",
             "int4 gemv 2t"]
    print(f"\nSmolLM2-135M shapes at batch 1, median us of {repeat} interleaved runs "
          "(torch = int8pack / int4pack; 2t = rows split over 2 threads)")
    print(f"{'':<20}" + "".join(f"{n:>13}" for n in names))
    for name, out_f, in_f in SMOLLM_SHAPES:
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        x = torch.randn(1, in_f, generator=g)
        fns = [lambda w=w: F.linear(x, w)]
        for spec in (INT8, INT4):
            q = QTensor.quantize(w, spec)
            torch_kernel = QLinear(q, None).kernel.fallback
            one = GemvKernel(q, torch_kernel, lib, threads=1)
            two = GemvKernel(q, torch_kernel, lib, threads=2, split_rows=0)
            fns += [(lambda k: lambda: k.linear(x))(k) for k in (torch_kernel, one, two)]
        with torch.inference_mode():
            t = interleaved_medians(fns, repeat * (2 if out_f > 10000 else 40))
        print(f"{name + f' {out_f}x{in_f}':<20}" + "".join(f"{v * 1e6:>13.1f}" for v in t))


# (row name, spec of every Linear but lm_head, spec of lm_head: None keeps it float32)
QUANTIZED_ROWS = (
    ("int8, lm_head f32", INT8, None),  # the default recipe's float head
    ("int8, lm_head int8", INT8, INT8),
    ("int4 g128, lm_head f32", INT4, None),
    ("int4 g128, lm_head int8", INT4, INT8),
    ("int4 g128, lm_head int4", INT4, INT4),
)


def decode_rows(model, loop: str, quantized_rows=QUANTIZED_ROWS, bfloat16: bool = True):
    """(name, model, quantize seconds, loop) for every row of the decode table; the first is
    the float32 baseline, through transformers' forward."""
    rows = [("float32", model, None, "generate" if loop == "generate" else "hf")]
    if loop == "compact":
        rows.append(("float32", model, None, loop))
    if bfloat16:
        rows.append(("bfloat16", copy.deepcopy(model).bfloat16(), None, loop))
    for name, spec, head_spec in quantized_rows:
        quantized = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_model(quantized, Recipe(spec, (Rule("lm_head", head_spec),)))
        rows.append((name, quantized, time.perf_counter() - t0, loop))
    return rows


def timed_rows(rows, ids, tokens: int, repeat: int) -> list[float]:
    """Median tokens/s of each row's greedy decode, the rows interleaved repeat after repeat."""
    seconds = [[] for _ in rows]
    for _, model, _, row_loop in rows:  # warm-up: allocator, thread pool, caches
        decode_seconds(model, ids, tokens, row_loop)
    for _ in range(repeat):  # interleaved: each repeat runs every row once
        for times, (_, model, _, row_loop) in zip(seconds, rows):
            times.append(decode_seconds(model, ids, tokens, row_loop))
    return [tokens / statistics.median(times) for times in seconds]


# The real models of the decode table: (title, path function's name in models.source, rows,
# bfloat16 row, llama.cpp's name for the file's own type). Gemma 3 270M's 262,144 x 640 tied
# head (168M of its 268M weights, 671 MB in float32) dominates its float32 decode, so its rows
# are those whose head is read in fewer bytes, beside the default recipe's float head.
DECODE_MODELS = {
    "smollm2": ("SmolLM2-135M", "default_model_path", QUANTIZED_ROWS, True, "Q4_1"),
    "gemma3": ("Gemma 3 270M (weights from a Q4_K_M file)", "gemma3_model_path",
               (QUANTIZED_ROWS[1], QUANTIZED_ROWS[2], QUANTIZED_ROWS[3], QUANTIZED_ROWS[4]),
               False, "Q4_K_M"),
}


def bench_decode(key: str, tokens: int, repeat: int, loop: str, ppl: bool) -> None:
    from zeropoint.models import source
    from zeropoint.models.evaluate import default_text, perplexity
    from zeropoint.models.load import load_model

    title, path_fn, quantized_rows, bfloat16, file_type = DECODE_MODELS[key]
    gguf = str(getattr(source, path_fn)())
    loaded = load_model(gguf, progress=False)
    prompt = "The history of the printing press"
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    rows = decode_rows(loaded.model, loop, quantized_rows, bfloat16)
    speeds = timed_rows(rows, ids, tokens, repeat)
    loop_names = {"compact": "compact (nn/compact_runtime.py)", "hf": "hf (transformers forward)",
                  "generate": "transformers generate"}
    print(f"\n{title} greedy decode, batch 1, {tokens} new tokens, median of {repeat} "
          f"interleaved runs; loop: {loop_names[loop]}, baseline: the first row")
    print(f"{'':<26}{'loop':>10}{'tokens/s':>10}{'vs float32':>12}{'quantize s':>12}"
          f"{'perplexity':>12}")
    base = speeds[0]
    text = default_text() if ppl else None
    for tps, (name, model, quantize_s, row_loop) in zip(speeds, rows):
        q = f"{quantize_s:>12.2f}" if quantize_s is not None else f"{'':>12}"
        p = f"{perplexity(model, loaded.tokenizer, text).perplexity:>12.2f}" if ppl else ""
        print(f"{name:<26}{row_loop:>10}{tps:>10.1f}{tps / base:>11.2f}x{q}{p}", flush=True)
    anchors = [(f"llama.cpp {file_type} (its file)", gguf)]
    with tempfile.TemporaryDirectory() as tmp:
        q8 = os.path.join(tmp, "q8_0.gguf")
        if llama_cpp_requantize(gguf, q8, 7):  # LLAMA_FTYPE_MOSTLY_Q8_0
            anchors.append(("llama.cpp Q8_0", q8))
        for name, path in anchors:
            tps = llama_cpp_tokens_per_second(path, prompt, tokens, repeat)
            if tps is None:
                print("(llama-cpp-python is not installed: no llama.cpp anchor)")
                break
            print(f"{name:<26}{tps:>10.1f}{tps / base:>11.2f}x")


# Tiny random-weight models of every family the compact decoder runs (the configs of
# tests/nn/test_compact_families.py, at a size where the matmuls count): the compact decoder's
# gain over float32 should not depend on the family.
FAMILY_SIZES = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=64, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                    max_position_embeddings=4096)
FAMILY_MODELS = {
    "llama 3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict()),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=32)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict()),
}


def bench_families(tokens: int, repeat: int) -> None:
    import transformers

    ids = torch.randint(0, 8192, (1, 8), generator=torch.Generator().manual_seed(0))
    print(f"\nTiny random models per family (hidden 512, 8 layers, vocab 8192), greedy decode, "
          f"batch 1, {tokens} new tokens, median of {repeat} interleaved runs; tokens/s and the "
          "ratio to float32 through transformers (hf)")
    print(f"{'':<10}{'float32 hf':>12}{'f32 compact':>14}{'int8 compact':>14}"
          f"{'int4 compact':>14}")
    for name, (config_class, model_class, extra) in FAMILY_MODELS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**{**FAMILY_SIZES, **extra})
        model = getattr(transformers, model_class)(config).float().eval()
        rows = decode_rows(model, "compact", (QUANTIZED_ROWS[1], QUANTIZED_ROWS[4]), False)
        speeds = timed_rows(rows, ids, tokens, repeat)
        print(f"{name:<10}{speeds[0]:>12.1f}" + "".join(
            f"{tps:>7.1f} {tps / speeds[0]:>5.2f}x" for tps in speeds[1:]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loop", choices=("compact", "hf", "generate"), default="compact",
                    help="decode loop of every row but the float32 baseline: greedy_generate's "
                    "compact decoder or its transformers loop, or generate")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity column")
    ap.add_argument("--split-rows", type=int, default=None,
                    help="share the rows of batch-1 matmuls with this many rows or more with a "
                    "second thread (default: nn/gemv.py PARALLEL_MIN_ROWS)")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--models", default="smollm2,gemma3",
                    help=f"real models of the decode table, of {', '.join(DECODE_MODELS)}")
    ap.add_argument("--skip-families", action="store_true",
                    help="skip the tiny per-family table")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.split_rows is not None:
        gemv.PARALLEL_MIN_ROWS = args.split_rows
    if not args.skip_layer:
        bench_layer(args.repeat)
        bench_batch1(args.repeat)
    if not args.skip_families:
        bench_families(args.tokens, args.repeat)
    if not args.skip_decode:
        for key in args.models.split(","):
            bench_decode(key, args.tokens, args.repeat, args.loop, not args.no_ppl)


if __name__ == "__main__":
    main()
