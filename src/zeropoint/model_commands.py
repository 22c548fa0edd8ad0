"""`zeropoint quantize` and `zeropoint eval`: the model-level commands behind cli.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .atomic import atomic_path
from .spec import QuantSpec

DEFAULT_MODEL = "default"  # the built-in SmolLM2-135M-Instruct GGUF


class CommandError(Exception):
    """A user error: cli.py prints it in one line and exits with code 2."""


def _quiet_libraries() -> None:
    # transformers and tokenizers talk a lot on load; zeropoint prints its own summary.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()


def open_model(path: str | None, progress: bool = False):
    """A float model (checkpoint dir, .gguf, or 'default') or a zeropoint directory."""
    from .modeldir.format import is_zeropoint_dir
    from .modeldir.load import load_quantized
    from .models.load import ModelLoadError, load_model

    _quiet_libraries()
    try:
        if path not in (None, DEFAULT_MODEL) and is_zeropoint_dir(path):
            return load_quantized(path)
        return load_model(None if path in (None, DEFAULT_MODEL) else path, progress=progress)
    except ModelLoadError as e:
        raise CommandError(str(e)) from None


def _recipe_from_args(args):
    from .recipe import Recipe

    try:
        if args.recipe:
            return Recipe.load(args.recipe)
        group = args.group_size if args.granularity == "per_group" else None
        spec = QuantSpec(args.bits, args.scheme, args.granularity, group_size=group)
        return Recipe.uniform(spec, keep_float=tuple(args.keep_float), activations=args.activations)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None


def _read_text(path: str | None) -> str:
    from .models.evaluate import default_text

    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read text file {path!r}: {e}") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _is_checkpoint_dir(path) -> bool:
    return path is not None and (Path(path) / "config.json").is_file()


def _write_quantized(args, recipe, out: Path):
    """Quantize args.model into `out` atomically. A Hugging Face checkpoint directory streams
    tensor by tensor (bounded memory); a GGUF file is loaded whole by transformers first."""
    from .modeldir.streaming import quantize_checkpoint
    from .modeldir.writer import save_quantized
    from .nn.quantize_model import quantize_model

    method = getattr(args, "method", "rtn")
    with atomic_path(out, directory=True) as tmp:
        try:
            if method == "rtn" and _is_checkpoint_dir(args.model):
                return quantize_checkpoint(args.model, tmp, recipe, progress=not args.quiet)
            loaded = open_model(args.model, progress=not args.quiet)
            if method == "gptq":  # error-correcting methods need the whole model in memory
                _gptq(args, loaded, recipe)
            elif method == "hqq":
                from .algorithms.hqq import hqq_quantize

                quantize_model(loaded.model, recipe, progress=not args.quiet,
                               quantize_fn=lambda name, w, spec: hqq_quantize(w, spec))
            else:
                quantize_model(loaded.model, recipe, progress=not args.quiet)
        except ValueError as e:
            raise CommandError(str(e)) from None
        return save_quantized(
            loaded.model, tmp, recipe=recipe, kind=loaded.kind, tokenizer=loaded.tokenizer,
            config=loaded.config, source=str(args.model or DEFAULT_MODEL), method=method,
        )


CALIB_SEQUENCE_TOKENS = 512  # GPTQ calibration sequences are cut to this many tokens


def gptq_calibration(args, loaded):
    """(sequences, length) calibration ids from --calib and --calib-tokens, for --method gptq."""
    from .algorithms.sequential import calibration_ids

    if loaded.kind != "causal-lm":
        raise CommandError("--method gptq needs a causal language model (llama family)")
    if args.calib_tokens < 2:
        raise CommandError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    length = min(CALIB_SEQUENCE_TOKENS, args.calib_tokens)
    try:
        return calibration_ids(loaded.tokenizer, _read_text(args.calib),
                               args.calib_tokens // length, length)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _gptq(args, loaded, recipe) -> None:
    from .algorithms.sequential import gptq_model

    ids = gptq_calibration(args, loaded)
    length = ids.shape[1]
    report = gptq_model(loaded.model, recipe, ids, progress=not args.quiet)
    if not args.quiet:
        print(f"gptq: {report.layers} layers, {report.sequences} x {length} calibration tokens, "
              f"{report.seconds:.1f} s, peak memory (VmHWM) {_mib(report.peak_rss_bytes)}")


def _evaluate_both(args, out: Path, text: str) -> tuple[str, str, str]:
    """(row name, float figure, quantized figure): perplexity, or cosine for an encoder."""
    from .models.evaluate import embedding_cosine, perplexity

    float_model = open_model(args.model)
    quantized = open_model(str(out))
    if float_model.kind == "encoder":
        cos = embedding_cosine(float_model.model, quantized.model, quantized.tokenizer, _sentences(text))
        return "embedding cosine vs float", "1", f"{cos:.5f}"
    before = perplexity(float_model.model, float_model.tokenizer, text, max_tokens=args.max_tokens)
    after = perplexity(quantized.model, quantized.tokenizer, text, max_tokens=args.max_tokens)
    return f"perplexity ({after.tokens} tokens)", f"{before.perplexity:.3f}", f"{after.perplexity:.3f}"


def cmd_quantize(args) -> None:
    from .modeldir.format import is_zeropoint_dir

    if args.type:  # a GGUF file out, in ggml block formats
        from .gguf.cli import quantize_gguf

        return quantize_gguf(args)
    out = Path(args.output)
    if args.model and is_zeropoint_dir(args.model):
        raise CommandError(f"{args.model!r} is already quantized; quantize its float source instead")
    if out.exists() and not args.force:
        raise CommandError(f"output {str(out)!r} already exists; pass --force to replace it")
    recipe = _recipe_from_args(args)
    text = _read_text(args.text) if args.eval else None
    _quiet_libraries()
    if args.budget_bpw is not None:  # a spec per layer, chosen to fit the size budget
        from .analysis.cli import allocate_recipe

        recipe = allocate_recipe(args, recipe)
    started = time.perf_counter()
    manifest = _write_quantized(args, recipe, out)
    elapsed = time.perf_counter() - started
    params = manifest.quantized_params + manifest.kept_params
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    rows = [
        ("size of weights", _mib(manifest.float_bytes), _mib(manifest.total_bytes)),
        ("bits per weight", f"{8 * manifest.float_bytes / params:.2f}", f"{manifest.bits_per_weight:.3f}"),
        ("quantized tensors", "", f"{len(manifest.quantized)} at {manifest.quantized_bits_per_weight:.3f} bits/weight"),
        ("safetensors on disk", "", _mib(on_disk)),
    ]
    if args.eval:
        rows.append(_evaluate_both(args, out, text))
    if not args.quiet:
        what = recipe.default.describe() if recipe.default else "float"
        if args.budget_bpw is not None:
            what = f"a spec per layer under a budget of {args.budget_bpw} bits/weight"
        print(f"\nwrote {out} in {elapsed:.1f} s ({what})")
        width = max(len(r[0]) for r in rows) + 2
        print(f"{'':<{width}}{'before':>14}{'after':>26}")
        for name, a, b in rows:
            print(f"{name:<{width}}{a:>14}{b:>26}")


def _sentences(text: str, limit: int = 64) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    return lines[:limit] or [text[:512]]


def _model_figures(loaded) -> dict:
    from .modeldir.format import is_zeropoint_dir, read_manifest
    from .nn.quantize_model import model_bytes

    if is_zeropoint_dir(loaded.source):
        m = read_manifest(loaded.source)
        return {"model": loaded.source, "bytes": m.total_bytes, "bits_per_weight": m.bits_per_weight}
    nbytes, params = model_bytes(loaded.model)
    return {"model": loaded.source, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params}


def cmd_eval(args) -> None:
    from .models.evaluate import embedding_cosine, perplexity

    if args.engine == "llama.cpp":
        from .gguf.cli import eval_gguf

        return eval_gguf(args)

    text = _read_text(args.text)
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
        print(f"{fig['model']}: {score}; {fig['bits_per_weight']:.3f} bits/weight, {_mib(fig['bytes'])}")
    if args.json:
        payload = dict(results[-1])
        if len(results) > 1:
            payload["reference"] = results[0]
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")


def add_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model into a zeropoint directory")
    q.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory or .gguf file (default: SmolLM2-135M)")
    q.add_argument("-o", "--output", required=True, help="output directory (a .gguf file with --type)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--scheme", default="symmetric", help="symmetric or asymmetric")
    q.add_argument("--granularity", default="per_group", help="per_group or per_channel")
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--keep-float", nargs="*", default=["lm_head"], metavar="PATTERN",
                   help="module-name patterns to keep in float (default: lm_head)")
    q.add_argument("--activations", choices=["int8-dynamic"], default=None,
                   help="also quantize activations at run time (needs --bits 8 --granularity per_channel)")
    q.add_argument("--recipe", metavar="FILE", help="a recipe JSON file (overrides the spec options)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.add_argument("--eval", action="store_true", help="measure perplexity (or cosine) before and after")
    q.add_argument("--text", metavar="FILE", help="evaluation text (default: Python's pydoc topics)")
    q.add_argument("--max-tokens", type=int, default=2048)
    q.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    q.add_argument("--type", metavar="GGML_TYPE",
                   help="write a GGUF file in this ggml type or llama.cpp mix (Q8_0, Q4_K_M, ...)")
    q.add_argument("--budget-bpw", type=float, metavar="BITS",
                   help="choose a spec per layer for this average bits per weight")
    q.add_argument("--recipe-out", metavar="FILE",
                   help="with --budget-bpw: where to write the chosen recipe (default: OUTPUT.recipe.json)")
    q.add_argument("--budget-tokens", type=int, default=1024,
                   help="with --budget-bpw: calibration tokens")
    q.add_argument("--method", choices=["rtn", "gptq", "hqq"], default="rtn",
                   help="rtn: round to nearest (streams checkpoints); gptq: error-correcting, needs "
                        "calibration text; hqq: calibration-free qparam fitting")
    q.add_argument("--calib", metavar="FILE",
                   help="gptq calibration text (default: Python's pydoc topics)")
    q.add_argument("--calib-tokens", type=int, default=65536, metavar="N",
                   help=f"gptq calibration tokens, in sequences of {CALIB_SEQUENCE_TOKENS} (default 65536)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (causal LMs) or embedding cosine (encoders)")
    e.add_argument("model", help="float model ('default', a checkpoint dir, a .gguf) or a zeropoint dir")
    e.add_argument("quantized", nargs="?", help="a zeropoint directory to compare with MODEL")
    e.add_argument("--text", metavar="FILE", help="text to score (default: Python's pydoc topics)")
    e.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    e.add_argument("--max-tokens", type=int, default=2048)
    e.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    e.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch",
                   help="run the model in PyTorch (default) or in llama.cpp (GGUF files)")
    e.set_defaults(func=cmd_eval)
