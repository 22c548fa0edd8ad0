"""`zeropoint eval`: perplexity (causal LMs) or embedding cosine against a quantized copy
(encoders) in PyTorch, or with --engine llama.cpp the perplexity of one GGUF file under llama.cpp
(its own logits and tokenizer, by models.evaluate.perplexity's protocol) and a short greedy
generation. With --kld: the KL-divergence statistics of `llama-perplexity --kl-divergence`
(cli/eval_kld.py)."""

from __future__ import annotations

from .common import (
    CommandError,
    HelpFormatter,
    mib,
    open_model,
    read_text,
    resolve,
    threads,
    write_json,
)

EPILOG = """examples:
  zeropoint eval default out/smollm2-int4               (float, then the quantized directory)
  zeropoint eval out/smollm2-int4 --text held-out.txt --json ppl.json
  zeropoint eval smollm2-q4_k_m.gguf --engine llama.cpp
  zeropoint eval default smollm2-q4_0.gguf --kld --engine llama.cpp --save-base base.kld
  zeropoint eval smollm2-iq4_xs.gguf --kld --base-logits base.kld --engine llama.cpp
"""


def add_parser(sub) -> None:
    from .eval_kld import add_kld_arguments

    e = sub.add_parser(
        "eval", help="perplexity (causal LMs) or embedding cosine (encoders); --kld: "
                     "KL-divergence of QUANTIZED from MODEL",
        description="Score a model: the perplexity of a causal LM on a text (in PyTorch, or\n"
                    "with --engine llama.cpp in llama.cpp), or an encoder's embedding cosine\n"
                    "against a quantized copy; with --kld, how far QUANTIZED's next-token\n"
                    "distributions are from MODEL's, as llama-perplexity --kl-divergence.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    e.add_argument("model", help="float model ('default', a checkpoint dir, a .gguf) or a zeropoint dir")
    e.add_argument("quantized", nargs="?", help="a model to compare with MODEL (a zeropoint "
                   "directory; with --kld any model zeropoint loads)")
    e.add_argument("--text", metavar="FILE", help="text to score (default: Python's pydoc topics)")
    e.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    e.add_argument("--max-tokens", type=int, default=2048)
    e.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    e.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch",
                   help="run the model in PyTorch (default) or in llama.cpp (GGUF files)")
    add_kld_arguments(e)
    e.set_defaults(func=run)


def run(args) -> None:
    if args.kld:
        from .eval_kld import run_kld

        return run_kld(args)
    if args.save_base or args.base_logits:
        raise CommandError("--save-base and --base-logits go with --kld")
    if args.engine == "llama.cpp":
        return _run_llama_cpp(args)
    from ..models.evaluate import embedding_cosine, perplexity

    text = read_text(args.text)
    models = [open_model(p, progress=False) for p in [args.model] + ([args.quantized] if args.quantized else [])]
    results = []
    for loaded in models:
        fig = _model_figures(loaded)
        if loaded.kind == "causal-lm":
            r = perplexity(loaded.model, loaded.tokenizer, text, window=args.window, max_tokens=args.max_tokens)
            fig.update(perplexity=r.perplexity, tokens=r.tokens)
        results.append(fig)
    if models[0].kind == "encoder":
        if len(models) < 2:
            raise CommandError("an encoder is scored by cosine against a quantized copy: give MODEL QUANTIZED")
        sentences = _sentences(text)
        cos = embedding_cosine(models[0].model, models[1].model, models[1].tokenizer, sentences)
        results[1].update(cosine=cos, tokens=sum(len(models[1].tokenizer(s)["input_ids"]) for s in sentences))
    for fig in results:
        score = f"perplexity {fig['perplexity']:.3f} over {fig['tokens']} tokens" if "perplexity" in fig \
            else (f"cosine {fig['cosine']:.5f}" if "cosine" in fig else "reference")
        print(f"{fig['model']}: {score}; {fig['bits_per_weight']:.3f} bits/weight, {mib(fig['bytes'])}")
    if args.json:
        payload = dict(results[-1])
        if len(results) > 1:
            payload["reference"] = results[0]
        write_json(args.json, payload)


def before_and_after(model: str | None, quantized: str, text: str, max_tokens: int):
    """(row name, float figure, quantized figure) for `quantize --eval`: perplexity, or cosine
    for an encoder."""
    from ..models.evaluate import embedding_cosine, perplexity

    float_model = open_model(model)
    q = open_model(quantized)
    if float_model.kind == "encoder":
        cos = embedding_cosine(float_model.model, q.model, q.tokenizer, _sentences(text))
        return "embedding cosine vs float", "1", f"{cos:.5f}"
    before = perplexity(float_model.model, float_model.tokenizer, text, max_tokens=max_tokens)
    after = perplexity(q.model, q.tokenizer, text, max_tokens=max_tokens)
    return f"perplexity ({after.tokens} tokens)", f"{before.perplexity:.3f}", f"{after.perplexity:.3f}"


def _sentences(text: str, limit: int = 64) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    return lines[:limit] or [text[:512]]


def _model_figures(loaded) -> dict:
    from ..modeldir.format import is_zeropoint_dir, read_manifest
    from ..nn.quantize_model import model_bytes

    if is_zeropoint_dir(loaded.source):
        m = read_manifest(loaded.source)
        return {"model": loaded.source, "bytes": m.total_bytes, "bits_per_weight": m.bits_per_weight}
    nbytes, params = model_bytes(loaded.model)
    return {"model": loaded.source, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params}


def _run_llama_cpp(args) -> None:
    from ..gguf.llama_cpp import (
        DEFAULT_PROMPT,
        gguf_size,
        llama_cpp_generate,
        llama_cpp_perplexity,
        open_llama,
    )

    if args.quantized:
        raise CommandError("eval --engine llama.cpp scores one GGUF file; give it alone")
    source = resolve(args.model)
    if not source.is_gguf:
        raise CommandError(f"eval --engine llama.cpp needs a .gguf file, got {args.model!r}; "
                           "write one with: zeropoint quantize MODEL --type F32 -o model.gguf")
    path, n_threads = source.path, threads()
    text = read_text(args.text)
    try:
        nbytes, bpw = gguf_size(path)
        llm = open_llama(path, max(2, args.window), n_threads, logits_all=True)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        r = llama_cpp_perplexity(path, text, window=args.window, max_tokens=args.max_tokens,
                                 threads=n_threads, llm=llm)
        sample = llama_cpp_generate(llm)
    except ValueError as e:
        raise CommandError(str(e)) from None
    finally:
        llm.close()
    print(f"{path}: perplexity {r.perplexity:.3f} over {r.tokens} tokens (llama.cpp); "
          f"{bpw:.3f} bits/weight, {mib(nbytes)}")
    print(f"sample: {DEFAULT_PROMPT}{sample}")
    if args.json:
        write_json(args.json, {
            "model": str(path), "engine": "llama.cpp", "perplexity": r.perplexity, "nll": r.nll,
            "tokens": r.tokens, "window": args.window, "max_tokens": args.max_tokens,
            "bits_per_weight": bpw, "bytes": nbytes, "prompt": DEFAULT_PROMPT, "sample": sample,
        })
