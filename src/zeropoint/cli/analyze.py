"""`zeropoint analyze` and the `quantize --budget-bpw` hook (allocate_recipe).

    zeropoint analyze [MODEL] [--spec 4:g128:sym | --compare 4:g128:sym,4:channel:sym,4:tensor:sym]
                      [--text FILE] [--max-tokens 2048] [--window 512] [--keep-float lm_head ...]
                      [--sensitivity] [--json PATH] [--plot PATH|none] [--html PATH] [--quiet]

MODEL is a Hugging Face checkpoint directory, a .gguf file, nothing (the default SmolLM2), or a
.pt/.pth file holding a whole pickled torch.nn.Module (trusted files only: unpickling runs code),
fed the tensor in --inputs (rows are samples) or, without it, standard normal rows.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..analysis.specs import SYNTAX
from ..models.source import FLOAT_KINDS
from .common import CommandError, HelpFormatter, open_model, read_text, resolve, text_source

DEFAULT_BUDGET_TOKENS = 1024  # --budget-tokens: calibration tokens of the bit allocation

EPILOG = """examples:
  zeropoint analyze                                    (the default model at 4:g128:sym)
  zeropoint analyze --compare 4:tensor:sym,4:channel:sym,4:g128:sym --html report.html
  zeropoint analyze path/to/checkpoint --spec 4:g32:asym --sensitivity
"""


def add_parser(sub) -> None:
    a = sub.add_parser(
        "analyze", help="layer-by-layer quantization error: isolated vs accumulated, sensitivity",
        description="Run calibration text through the model once in float and once quantized,\n"
                    "and report for every Linear layer, in forward order: the SQNR of its\n"
                    "quantized weight, of its output with only it quantized (isolated), and of\n"
                    "its output with it and every layer before it quantized (accumulated).",
        epilog=EPILOG, formatter_class=HelpFormatter)
    a.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory, .gguf file, .pt file holding a pickled "
                        "torch.nn.Module, or nothing for the default SmolLM2-135M")
    a.add_argument("--spec", default="4:g128:sym", help=f"the spec to analyze: {SYNTAX}; 'float' "
                   "keeps every layer float (default 4:g128:sym)")
    a.add_argument("--compare", metavar="SPECS",
                   help="comma list of specs side by side in one report (instead of --spec), e.g. "
                        "4:tensor:sym,4:channel:sym,4:g128:sym")
    a.add_argument("--text", metavar="FILE", help="calibration text (default: Python's pydoc topics)")
    a.add_argument("--inputs", metavar="FILE",
                   help="for a .pt module: its input, a tensor saved with torch.save (rows are samples)")
    a.add_argument("--max-tokens", type=int, default=2048, help="tokens (or input rows) to run")
    a.add_argument("--window", type=int, default=512,
                   help="tokens per forward pass; activations of one window are held in memory")
    a.add_argument("--keep-float", nargs="*", default=["lm_head"], metavar="PATTERN",
                   help="module-name patterns kept in float (default: lm_head)")
    a.add_argument("--top", type=int, default=10, help="rows of the terminal tables")
    a.add_argument("--sensitivity", action="store_true",
                   help="also rank the layers by the damage each alone does to the final output")
    a.add_argument("--sensitivity-tokens", type=int, default=512,
                   help="tokens (or rows) for the sensitivity estimate (default 512)")
    a.add_argument("--exact", default="8",
                   help="layers whose sensitivity is also measured exactly, one forward pass each "
                        "(a count or 'all'; default 8)")
    a.add_argument("--json", metavar="PATH", help="write one record per layer (and spec) as JSON")
    a.add_argument("--plot", metavar="PATH", default="zeropoint-analysis.png",
                   help="PNG plot of SQNR against depth, or 'none'")
    a.add_argument("--html", metavar="PATH",
                   help="write a self-contained HTML report (plots inline, the full table)")
    a.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    a.add_argument("--quiet", action="store_true", help="no progress bars, no tables")
    a.set_defaults(func=run)


def _specs(args):
    from ..analysis.specs import parse_spec, parse_specs

    try:
        return parse_specs(args.compare) if args.compare else [parse_spec(args.spec)]
    except ValueError as e:
        raise CommandError(str(e)) from None


class _Subject:
    """The model under analysis and how to feed it."""

    def __init__(self, model, kind: str, source: str, tokenizer=None, config=None, inputs=None):
        self.model, self.kind, self.source = model, kind, source
        self.tokenizer, self.config, self.inputs = tokenizer, config, inputs

    def batches(self, text: str | None, max_tokens: int, window: int):
        from ..analysis.common import text_batches

        if self.tokenizer is None:
            rows = self.inputs[:max_tokens]
            return [rows[i:i + window] for i in range(0, rows.shape[0], window)]
        if self.kind == "encoder":
            limit = getattr(self.config, "max_position_embeddings", None)
            if limit and window > limit:
                window = limit
        return text_batches(self.tokenizer, text, window=window, max_tokens=max_tokens,
                            causal=self.kind == "causal-lm")


def _open_subject(args, quiet: bool) -> _Subject:
    import torch

    path = args.model
    source = resolve(path, (*FLOAT_KINDS, "module"))
    if source.kind != "module":
        if args.inputs:
            raise CommandError("--inputs feeds a .pt module; a language model reads --text")
        loaded = open_model(path, progress=not quiet)
        return _Subject(loaded.model, loaded.kind, loaded.source, loaded.tokenizer, loaded.config)
    if args.text:
        raise CommandError("--text is for language models; a .pt module is fed --inputs")
    try:
        module = torch.load(source.path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CommandError(f"cannot load {path!r} as a torch module: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise CommandError(f"{path!r} holds a {type(module).__name__}, not a torch.nn.Module; save one "
                           "with torch.save(model, path)")
    module.eval()
    if args.inputs:
        try:
            inputs = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise CommandError(f"cannot load inputs {args.inputs!r}: {e}") from None
        if not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point()
                and inputs.dim() >= 2):
            raise CommandError(f"{args.inputs!r} must hold a float tensor of shape (rows, features)")
    else:
        first = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
        if first is None:
            raise CommandError(f"{path!r} has no torch.nn.Linear layer to analyze")
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(args.max_tokens, first.in_features, generator=gen)
        if not quiet:
            print(f"no --inputs: feeding {args.max_tokens} rows of standard normal noise of width "
                  f"{first.in_features}")
    return _Subject(module, "module", str(path), inputs=inputs.float())


def run(args) -> None:
    import torch

    from ..analysis.layerwise import analyze_layers
    from ..analysis.report import (
        json_records,
        plot_layerwise,
        plot_sensitivity,
        sensitivity_table,
        summary_line,
        worst_table,
        write_html,
        write_json,
        write_png,
    )
    from ..analysis.sensitivity import layer_sensitivity

    specs = _specs(args)
    for name, value in (("--max-tokens", args.max_tokens), ("--window", args.window),
                        ("--top", args.top), ("--sensitivity-tokens", args.sensitivity_tokens)):
        if value < 1:
            raise CommandError(f"{name} must be a positive count, got {value}")
    exact = args.exact.strip().lower()
    if exact != "all":
        try:
            exact = int(exact)
        except ValueError:
            raise CommandError(f"--exact takes a count or 'all', got {args.exact!r}") from None
        if exact < 0:
            raise CommandError(f"--exact must be >= 0, got {exact}")
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    quiet = args.quiet
    subject = _open_subject(args, quiet)
    if subject.tokenizer is None:
        text, text_from = None, "--inputs"
    else:
        text, text_from = read_text(args.text), text_source(args.text)
    started = time.perf_counter()
    try:
        batches = subject.batches(text, args.max_tokens, args.window)
        results = analyze_layers(subject.model, batches, specs, keep_float=args.keep_float,
                                 progress=not quiet)
        sens = None
        if args.sensitivity:
            first = next((s for s in specs if s is not None), None)
            if first is None:
                raise ValueError("--sensitivity needs a spec that quantizes something, not 'float'")
            sens_batches = subject.batches(text, args.sensitivity_tokens, args.window)
            sens = layer_sensitivity(subject.model, sens_batches, first, keep_float=args.keep_float,
                                     exact=exact, progress=not quiet)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    elapsed = time.perf_counter() - started
    meta = {"model": subject.source,
            "calibration": f"{results[0].tokens} rows from {text_from}",
            "specs": ", ".join(r.spec for r in results),
            "kept in float": ", ".join(args.keep_float) or "none",
            "time": f"{elapsed:.1f} s"}
    if not quiet:
        print(f"\n{subject.source}: {len(results[0].layers)} Linear layers, {results[0].tokens} rows "
              f"of {text_from}, {elapsed:.1f} s\n")
        for result in results:
            print(worst_table(result, args.top))
            print()
        for result in results:
            print(summary_line(result))
        if results[0].not_run:
            print(f"not reached by the input (left out): {', '.join(results[0].not_run)}")
        if sens is not None:
            print()
            print(sensitivity_table(sens, args.top))
    written = []
    if args.plot and args.plot.lower() != "none":
        write_png(plot_layerwise, args.plot, results)
        written.append(args.plot)
        if sens is not None:
            sens_path = str(Path(args.plot).with_name(Path(args.plot).stem + "-sensitivity.png"))
            write_png(plot_sensitivity, sens_path, sens)
            written.append(sens_path)
    if args.json:
        write_json(args.json, json_records(results, sens))
        written.append(args.json)
    if args.html:
        write_html(args.html, results, sens=sens, meta=meta, top=args.top,
                   title=f"zeropoint analyze: {Path(subject.source).name}")
        written.append(args.html)
    if written and not quiet:
        print("\nwritten: " + ", ".join(written))


# --- quantize --budget-bpw -------------------------------------------------------------------------


def recipe_path(args) -> Path:
    """Where the chosen recipe goes: --recipe-out, else beside the output as OUTPUT.recipe.json."""
    if args.recipe_out:
        return Path(args.recipe_out)
    out = Path(args.output)
    return out.with_name(out.name + ".recipe.json")


def allocate_recipe(args, recipe):
    """The recipe for `zeropoint quantize --budget-bpw BITS`: a spec per Linear layer that the
    base `recipe` quantizes, chosen from the menu (2..8 bits; groups of 32, 64, 128 or one scale
    per output channel; symmetric or asymmetric) for the least estimated damage to the final
    output with BITS average bits per weight over those layers, scales and zero-points included.

    Calibrates on --calib (default: the calibration mix), --budget-tokens tokens (default
    1024), and writes the recipe as JSON (to --recipe-out, or beside the output as
    OUTPUT.recipe.json), a file that `quantize --recipe` takes."""
    from ..analysis.allocate import allocate
    from ..analysis.specs import label
    from ..spec import QuantSpec

    quiet = args.quiet
    budget = args.budget_bpw
    if not budget > 0:
        raise CommandError(f"--budget-bpw must be a positive number of bits per weight, got {budget}")
    # --calib is the calibration text that quantize shares with gptq; its --calib-tokens default
    # is sized for gptq (65536), so the allocation has its own count, --budget-tokens.
    from .calibration import calibration_source, calibration_text

    text, source = calibration_text(args.calib), calibration_source(args.calib)
    tokens = DEFAULT_BUDGET_TOKENS if args.budget_tokens is None else args.budget_tokens
    if tokens < 2:
        raise CommandError(f"--budget-tokens must be at least 2, got {tokens}")
    started = time.perf_counter()
    loaded = open_model(args.model, progress=not quiet)
    subject = _Subject(loaded.model, loaded.kind, loaded.source, loaded.tokenizer, loaded.config)
    try:
        batches = subject.batches(text, tokens, 512)
        alloc = allocate(loaded.model, batches, budget, recipe=recipe, progress=not quiet)
        chosen = alloc.recipe(recipe)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    path = recipe_path(args)
    chosen.save(path)
    if not quiet:
        metric = "KL (nats/token)" if alloc.metric == "kl" else "1 - cosine"
        n_layers, numel = len(alloc.layers), alloc.numel
        print(f"\nbit allocation: {n_layers} Linear layers ({numel:,} weights; layers the recipe "
              f"keeps in float are not counted), calibrated on {alloc.rows} tokens of {source}, "
              f"{time.perf_counter() - started:.0f} s")
        print("bits per weight = 8 x (codes + scales + zero-points bytes) / weights of those layers")
        print(f"  {'':<28}{'bits/weight':>12}{'est. ' + metric:>26}")
        print(f"  {'budget ' + format(budget, 'g'):<28}{alloc.budget_bpw:>12.3f}")
        print(f"  {'allocation':<28}{alloc.bits_per_weight:>12.3f}{alloc.total_error:>26.4f}")
        anchors = [QuantSpec(4, "symmetric", "per_group", group_size=128)]
        if recipe.default is not None and recipe.default not in anchors:
            anchors.append(recipe.default)
        for spec in anchors:
            try:
                nbytes, err = alloc.uniform(spec)
            except ValueError:
                continue
            print(f"  {'uniform ' + label(spec):<28}{8 * nbytes / numel:>12.3f}{err:>26.4f}")
        print("  specs chosen: " + "; ".join(f"{s} x{n} ({w / numel:.0%} of weights)"
                                            for s, n, w in alloc.spec_counts()))
        for note in alloc.notes:
            print(f"  {note}")
        print(f"recipe written to {path} (zeropoint quantize --recipe {path})")
    return chosen
