"""`zeropoint quantize`: a model into a zeropoint directory, or with --type into a GGUF file
(quantize_gguf). Options that the chosen output or method does not read are errors, not silence."""

from __future__ import annotations

import time
from pathlib import Path

from ..atomic import atomic_path
from ..models.source import FLOAT_KINDS
from . import quantize_gguf
from .calibration import DEFAULT_CALIB_TOKENS, gptq_calibration, gptq_solver
from .common import (
    CommandError,
    HelpFormatter,
    mib,
    open_model,
    quiet_libraries,
    read_text,
    resolve,
)

EPILOG = """examples:
  zeropoint quantize -o out/smollm2-int4 --force --eval      (the default model and recipe)
  zeropoint quantize gemma-3-270m.gguf -o out/gemma3   (the default: chosen by size and KLD)
  zeropoint quantize path/to/checkpoint -o out/int4-g32 --scheme asymmetric --group-size 32
  zeropoint quantize default -o out/gptq --method gptq --calib notes.txt
  zeropoint quantize default --type Q4_K_M -o smollm2-q4_k_m.gguf
  zeropoint quantize model.gguf --type Q4_K_M --method gptq --ray HEAD_IP:6379 -o m-gptq.gguf
  zeropoint quantize default -o out/mixed --budget-bpw 4.5
  zeropoint quantize default -o out/int4-imatrix --imatrix imatrix.gguf  (weighted scales)
"""


def add_parser(sub) -> None:
    # Options default to None so that "given" can be told from "left alone" (check_options);
    # DEFAULTS fills in the real values afterwards.
    q = sub.add_parser(
        "quantize", help="quantize a model into a zeropoint directory",
        description="Quantize a model (a Hugging Face checkpoint directory, a .gguf file or the\n"
                    "default SmolLM2-135M) into a zeropoint directory, or with --type into a\n"
                    "GGUF file that llama.cpp runs.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    q.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory or .gguf file (default: SmolLM2-135M)")
    q.add_argument("-o", "--output", required=True, help="output directory (a .gguf file with --type)")
    q.add_argument("--bits", type=int)
    q.add_argument("--scheme", help="symmetric or asymmetric")
    q.add_argument("--granularity", help="per_group or per_channel")
    q.add_argument("--group-size", type=int)
    q.add_argument("--keep-float", nargs="*", metavar="PATTERN",
                   help="module-name patterns to keep in float (default: lm_head)")
    q.add_argument("--activations", choices=["int8-dynamic"], default=None,
                   help="also quantize activations at run time (needs --bits 8 --granularity per_channel)")
    q.add_argument("--recipe", metavar="FILE", help="a recipe JSON file (instead of the spec options)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.add_argument("--eval", action="store_true",
                   help="a table of size, perplexity and tokens/s: float, this output and "
                        "llama.cpp's Q4_K_M of the same model (an encoder: cosine)")
    q.add_argument("--text", metavar="FILE", help="evaluation text (default: Python's pydoc topics)")
    q.add_argument("--max-tokens", type=int)
    q.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    q.add_argument("--type", metavar="GGML_TYPE",
                   help="write a GGUF file in this ggml type or llama.cpp mix (Q8_0, Q4_K_M, ...)")
    q.add_argument("--budget-bpw", type=float, metavar="BITS",
                   help="choose a spec per layer for this average bits per weight")
    q.add_argument("--recipe-out", metavar="FILE",
                   help="with --budget-bpw: where to write the chosen recipe (default: OUTPUT.recipe.json)")
    q.add_argument("--budget-tokens", type=int,
                   help="with --budget-bpw: calibration tokens")
    q.add_argument("--method", choices=["rtn", "gptq", "hqq"], default="rtn",
                   help="rtn: round to nearest (streams checkpoints); gptq: error-correcting, needs "
                        "calibration text; hqq: calibration-free qparam fitting")
    q.add_argument("--calib", metavar="FILE",
                   help="gptq calibration text (default: zeropoint's calibration mix)")
    q.add_argument("--imatrix", metavar="FILE",
                   help="an importance matrix (llama-imatrix's or zeropoint imatrix's .gguf or "
                        ".dat) that weights each block's rounding: with --type as llama-quantize "
                        "--imatrix; with --bits each group's scale (and zero-point) minimises the "
                        "importance-weighted error (with --method gptq: the scales GPTQ rounds "
                        "onto)")
    q.add_argument("--calib-tokens", type=int, metavar="N",
                   help=f"gptq calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    q.add_argument("--ray", metavar="ADDRESS",
                   help="with --method gptq: solve each decoder layer's Linears as parallel "
                        "tasks on a Ray cluster (HOST:PORT, 'auto', or 'local' to start one "
                        "here); the same bytes as without")
    q.add_argument("--diagonal-shrink", type=float, metavar="S",
                   help="gptq into GGUF: shrink the Hessian's correlations towards its diagonal, "
                        "0 (full GPTQ) .. 1 (nearest rounding); default 0, 0.5 with --imatrix")
    q.set_defaults(func=run)


# Spec options given alone fill in the rest from here (a uniform spec, the head in float); none
# given: the default, chosen for the model by models/choose.py (R1: int4 g32 float16 scale and
# minimum linears, int8-per-row table; or R2: int8 linears, int4 g32 table), within the size of
# llama.cpp's Q4_K_M of the same model.
DEFAULTS = {
    "bits": 4, "scheme": "symmetric", "granularity": "per_group", "group_size": 128,
    "keep_float": ("lm_head",), "max_tokens": 2048, "calib_tokens": DEFAULT_CALIB_TOKENS,
}  # budget_tokens: allocate_recipe's own default

_DIRECTORY_OPTIONS = ("bits", "scheme", "granularity", "group_size", "keep_float", "recipe",
                      "activations", "budget_bpw", "recipe_out", "budget_tokens")
_SPEC_OPTIONS = ("bits", "scheme", "granularity", "group_size", "keep_float", "activations")

# (options, whether these arguments read them, the error when one is given but not read);
# the first rule broken is reported.
_RULES = (
    (_DIRECTORY_OPTIONS, lambda a: a.type is None,
     "{flag} is for zeropoint directories, not GGUF output; for per-tensor GGUF types pass a "
     "recipe .json as --type"),
    (_SPEC_OPTIONS, lambda a: a.recipe is None,
     "{flag} conflicts with --recipe, whose file sets every spec; put it in the recipe instead"),
    (("group_size",), lambda a: a.granularity in (None, "per_group"),
     "--group-size is for --granularity per_group, not {args.granularity}"),
    (("recipe_out", "budget_tokens"), lambda a: a.budget_bpw is not None,
     "{flag} is for --budget-bpw, which is not given"),
    (("calib",), lambda a: a.method == "gptq" or a.budget_bpw is not None,
     "--calib is calibration text for --method gptq or --budget-bpw, and neither is given"),
    (("calib_tokens",), lambda a: a.method == "gptq",
     "--calib-tokens is for --method gptq, not --method {args.method} (--budget-bpw calibrates "
     "on --budget-tokens)"),
    (("diagonal_shrink",), lambda a: a.method == "gptq" and a.type is not None,
     "--diagonal-shrink is for --method gptq with --type"),
    (("text", "max_tokens"), lambda a: a.eval, "{flag} is for --eval, which is not given"),
    (("ray",), lambda a: a.method == "gptq",
     "--ray runs GPTQ's per-layer solves on a Ray cluster: it needs --method gptq, not "
     "--method {args.method}"),
    (("imatrix",), lambda a: a.method in ("rtn", "gptq"),
     "--imatrix weights the rounding of --method rtn or gptq; HQQ fits its scales by a loss of "
     "its own, unweighted"),
)


def check_options(args) -> None:
    """CommandError naming the first option given that these arguments would not read."""
    for options, read, error in _RULES:
        if read(args):
            continue
        for dest in options:
            if getattr(args, dest) is not None:
                raise CommandError(error.format(flag="--" + dest.replace("_", "-"), args=args))


def run(args) -> None:
    check_options(args)
    # No spec option given: the default chosen per model (models/choose.py), not a uniform
    # spec; --budget-bpw allocates from the uniform base, with the head in float.
    # HQQ and GPTQ fit integer zero-points: they keep the uniform base too.
    args.default_recipe = args.recipe is None and args.budget_bpw is None and args.method == "rtn" and all(
        getattr(args, dest) is None for dest in _SPEC_OPTIONS)
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    source = resolve(args.model, FLOAT_KINDS)
    if args.type:
        return quantize_gguf.run(args, source)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise CommandError(f"output {str(out)!r} already exists; pass --force to replace it")
    recipe = _recipe_from_args(args)
    text = read_text(args.text) if args.eval else None
    quiet_libraries()
    if args.budget_bpw is not None:  # a spec per layer, chosen to fit the size budget
        from .analyze import allocate_recipe

        recipe = allocate_recipe(args, recipe)
    started = time.perf_counter()
    manifest, choice = _write_quantized(args, source, recipe, out)
    elapsed = time.perf_counter() - started
    params = manifest.quantized_params + manifest.kept_params
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    rows = [
        ("size of weights", mib(manifest.float_bytes), mib(manifest.total_bytes)),
        ("bits per weight", f"{8 * manifest.float_bytes / params:.2f}", f"{manifest.bits_per_weight:.3f}"),
        ("quantized tensors", "", f"{len(manifest.quantized)} at {manifest.quantized_bits_per_weight:.3f} bits/weight"),
        ("safetensors on disk", "", mib(on_disk)),
    ]
    job_rows = None
    if args.eval and manifest.extra.get("kind", "causal-lm") == "causal-lm":
        from ..models.main_job import main_job_rows

        job_rows = main_job_rows(source, out, text, args.max_tokens)
    elif args.eval:
        from .eval import before_and_after

        rows.append(before_and_after(args.model, str(out), text, args.max_tokens))
    if not args.quiet:
        what = recipe.default.describe() if recipe.default else "float"
        if choice is not None:
            what = f"the default, {choice.chosen.name}: {choice.chosen.summary}"
        if args.budget_bpw is not None:
            what = f"a spec per layer under a budget of {args.budget_bpw} bits/weight"
        print(f"\nwrote {out} in {elapsed:.1f} s ({what})")
        width = max(len(r[0]) for r in rows) + 2
        print(f"{'':<{width}}{'before':>14}{'after':>26}")
        for name, a, b in rows:
            print(f"{name:<{width}}{a:>14}{b:>26}")
    if job_rows is not None:
        from ..models.main_job import PROMPT, format_rows

        print(f"\nbeside llama.cpp: perplexity on {args.max_tokens} tokens of the --eval text "
              f"in torch; tokens/s decoding after {PROMPT!r} at batch 1 as `zeropoint generate` "
              "runs each (llama.cpp for the GGUF file)")
        print(format_rows(job_rows))


def _recipe_from_args(args):
    from ..recipe import Recipe
    from ..spec import QuantSpec

    try:
        if args.recipe:
            return Recipe.load(args.recipe)
        if getattr(args, "default_recipe", False):
            return Recipe.chosen()
        group = args.group_size if args.granularity == "per_group" else None
        spec = QuantSpec(args.bits, args.scheme, args.granularity, group_size=group)
        return Recipe.uniform(spec, keep_float=tuple(args.keep_float), activations=args.activations)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None


def _write_quantized(args, source, recipe, out: Path):
    """Quantize the model into `out` atomically. A Hugging Face checkpoint directory streams
    tensor by tensor (bounded memory); a GGUF file is loaded whole by transformers first."""
    from ..modeldir.streaming import quantize_checkpoint
    from ..modeldir.writer import save_quantized
    from ..models.source import DEFAULT_MODEL
    from ..nn.quantize_model import quantize_model

    choice = None
    with atomic_path(out, directory=True) as tmp:
        try:
            # The streaming path reads no module names: a weighted run loads the model, and so
            # does the default, which measures its candidates on it.
            if (args.method == "rtn" and source.kind == "hf" and args.imatrix is None
                    and not args.default_recipe):
                return quantize_checkpoint(source.path, tmp, recipe, progress=not args.quiet), None
            loaded = open_model(args.model, progress=not args.quiet)
            importance = None
            if args.imatrix is not None:
                from .importance import module_importance

                importance = module_importance(args.imatrix, loaded.model, recipe, args.quiet)
            if args.default_recipe and importance is None:
                choice = _choose_default(args, loaded)
                recipe = choice.chosen.recipe
                if choice.model is not None:  # measured: the winner is quantized already
                    loaded.model, choice.model = choice.model, None
                else:
                    choice.chosen.quantize(loaded.model, progress=not args.quiet)
            elif args.method == "gptq":  # error-correcting methods need the whole model in memory
                _gptq(args, loaded, recipe, importance)
            elif importance is not None:
                from ..nn.quantize_model import importance_quantize_fn

                quantize_model(loaded.model, recipe, progress=not args.quiet,
                               quantize_fn=importance_quantize_fn(importance))
            elif args.method == "hqq":
                from ..algorithms.hqq import hqq_quantize

                quantize_model(loaded.model, recipe, progress=not args.quiet,
                               quantize_fn=lambda name, w, spec: hqq_quantize(w, spec))
            else:
                quantize_model(loaded.model, recipe, progress=not args.quiet)
        except ValueError as e:
            raise CommandError(str(e)) from None
        extra = {"default_choice": choice.to_dict()} if choice is not None else {}
        return save_quantized(
            loaded.model, tmp, recipe=recipe, kind=loaded.kind, tokenizer=loaded.tokenizer,
            config=loaded.config, source=str(args.model or DEFAULT_MODEL), method=args.method,
            **extra,
        ), choice


def _choose_default(args, loaded):
    """models.choose's pick for this model, printed with its sizes and measured errors."""
    from ..models.choose import CANDIDATES, Choice, calibration_ids, choose, peer_budget_bytes

    try:
        budget = peer_budget_bytes(loaded)
    except ValueError as e:  # a model llama.cpp's mixes do not take: no budget to size against
        choice = Choice(CANDIDATES[0], 0, [],
                        f"no llama.cpp Q4_K_M of this model to size against ({e}): the first "
                        "candidate")
    else:
        if not args.quiet:
            print(f"choosing the default among {len(CANDIDATES)} candidates", flush=True)
        choice = choose(loaded.model, budget, calibration_ids(loaded.tokenizer),
                        progress=not args.quiet)
    if not args.quiet:
        print(choice.describe(), flush=True)
    return choice


def _gptq(args, loaded, recipe, importance=None) -> None:
    from ..algorithms.sequential import gptq_model

    ids = gptq_calibration(args, loaded)
    length = ids.shape[1]
    with gptq_solver(args) as solver:
        report = gptq_model(loaded.model, recipe, ids, progress=not args.quiet, solver=solver,
                            importance=importance)
    if not args.quiet:
        print(f"gptq: {report.layers} layers, {report.sequences} x {length} calibration tokens, "
              f"{report.seconds:.1f} s, peak memory (VmHWM) {mib(report.peak_rss_bytes)}")
