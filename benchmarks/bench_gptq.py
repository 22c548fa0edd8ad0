"""GPTQ, HQQ and round-to-nearest on the default model (SmolLM2-135M), at 2 threads.

    .venv/bin/python benchmarks/bench_gptq.py [--sequences 128] [--length 512] [--ppl]

Each method runs in a fresh process, so that its peak resident memory (VmHWM) is its own: the
loaded float model plus what the method adds. The float model's own size is printed beside.
The peer is torchao's HQQ (`_choose_qparams_and_quantize_affine_hqq`, asymmetric, fractional
zero-points) on the same weights; torchao's GPTQ runs on CUDA only, so GPTQ has no CPU peer here.

Targets (issue #7): GPTQ with 128 sequences of 512 tokens under 10 minutes and under 3x the float
model's size in peak memory; HQQ under 1 minute. On a machine shared with other jobs the
timings can be several times slower: rerun when it is quiet.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _run(method: str, opts: dict) -> dict:
    """In a fresh process: load the model, quantize it with `method`, measure."""
    import torch

    torch.set_num_threads(opts["threads"])
    from zeropoint import QTensor, QuantSpec, Recipe, quantize_model
    from zeropoint.algorithms.sequential import peak_rss_bytes
    from zeropoint.models.evaluate import default_text, lee_text, perplexity
    from zeropoint.models.load import load_model
    from zeropoint.nn.quantize_model import model_bytes

    loaded = load_model(None, progress=False)
    model = loaded.model
    float_bytes = model_bytes(model)[0]
    load_peak = peak_rss_bytes()
    spec = QuantSpec(opts["bits"], opts["scheme"], "per_group", group_size=opts["group_size"])
    recipe = Recipe.uniform(spec)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and recipe.spec_for(n) is not None}
    errors = {}
    started = time.perf_counter()
    if method == "rtn":
        quantize_model(model, recipe)
    elif method == "hqq":
        from zeropoint.algorithms.hqq import hqq_quantize

        quantize_model(model, recipe, quantize_fn=lambda n, w, s: hqq_quantize(w, s))
    elif method == "gptq":
        from zeropoint.algorithms.sequential import calibration_ids, gptq_model

        ids = calibration_ids(loaded.tokenizer, default_text(), opts["sequences"], opts["length"])
        gptq_model(model, recipe, ids, progress=not opts["quiet"])
    elif method == "torchao-hqq":
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

        spent = 0.0  # only the quantizer calls are timed, not the error sums
        for name, w in originals.items():
            t0 = time.perf_counter()
            q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                w, nbits=opts["bits"], group_size=opts["group_size"], axis=1,
                compute_dtype=torch.float32, device="cpu", raw_output=True)
            spent += time.perf_counter() - t0
            w_hat = ((q.float().view(-1, opts["group_size"]) - zero.reshape(-1, 1))
                     * scale.reshape(-1, 1)).view(w.shape)
            errors[name] = float(((w.double() - w_hat.double()) ** 2).sum())
    seconds = spent if method == "torchao-hqq" else time.perf_counter() - started
    result = {"method": method, "seconds": seconds, "peak": peak_rss_bytes(), "load_peak": load_peak,
              "float_bytes": float_bytes}
    if method != "torchao-hqq":
        for name, module in model.named_modules():
            if name in originals:
                w_hat = module.weight_q.dequantize() if hasattr(module, "weight_q") else module.weight
                errors[name] = float(((originals[name].double() - w_hat.double()) ** 2).sum())
    total = sum(float((w.double() ** 2).sum()) for w in originals.values())
    result["weight_nmse"] = sum(errors.values()) / total
    if opts["ppl"] and method != "torchao-hqq":
        result["ppl"] = perplexity(model, loaded.tokenizer, lee_text()).perplexity
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--scheme", default="symmetric")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--methods", default="rtn,hqq,gptq,hqq-asym,torchao-hqq",
                   help="rtn, hqq, gptq; a -asym suffix forces the asymmetric scheme; torchao-hqq "
                        "(the peer) is always asymmetric")
    p.add_argument("--ppl", action="store_true", help="also perplexity on lee_text (2048 tokens)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    opts = vars(args)
    ctx = mp.get_context("spawn")
    rows = []
    for label in args.methods.split(","):
        asym = label.endswith("-asym") or label == "torchao-hqq"
        method = label.removesuffix("-asym")
        with ctx.Pool(1) as pool:
            r = pool.apply(_run, (method, dict(opts, scheme="asymmetric") if asym else opts))
        r["method"] = label
        rows.append(r)
        print(f"{label}: {r['seconds']:.1f} s", flush=True)
    mib = 2**20
    f = rows[0]["float_bytes"]
    print(f"\nSmolLM2-135M, int{args.bits} {args.scheme} g{args.group_size}, {args.threads} threads; "
          f"GPTQ calibration {args.sequences} x {args.length} tokens of default_text")
    print(f"float model: {f / mib:.0f} MiB; peak after loading it alone: {rows[0]['load_peak'] / mib:.0f} MiB\n")
    print(f"{'method':<12}{'seconds':>10}{'peak MiB':>10}{'x float':>9}{'weight nmse':>13}{'ppl lee':>9}")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        print(f"{r['method']:<12}{r['seconds']:>10.1f}{r['peak'] / mib:>10.0f}{r['peak'] / f:>9.2f}"
              f"{r['weight_nmse']:>13.3e}{ppl:>9}")
    by = {r["method"]: r for r in rows}
    if "hqq-asym" in by and "torchao-hqq" in by:
        a, b = by["hqq-asym"], by["torchao-hqq"]
        print(f"\nhqq-asym vs torchao-hqq (both asymmetric): time {a['seconds'] / b['seconds']:.2f}x, "
              f"weight error {a['weight_nmse'] / b['weight_nmse']:.2f}x")


if __name__ == "__main__":
    main()
