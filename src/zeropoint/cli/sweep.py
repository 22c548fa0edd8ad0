"""`zeropoint sweep`: make every (type, method) variant of a model, score each against the model
itself, and draw the size/quality frontier, locally or on a Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

from .common import CommandError, HelpFormatter, resolve

EPILOG = """example:
  zeropoint sweep --types Q3_K_M,Q4_0,Q4_K_M,Q8_0 --methods rtn,hqq --budget 80MB,120MB -o sweeps/smollm2
  zeropoint sweep model.gguf --types Q4_0 --methods rtn,gptq --ray local -o sweeps/model
  zeropoint sweep --types IQ4_XS,IQ3_M,Q4_K_M --methods rtn,gptq --imatrix auto -o sweeps/iq

Writes DIR/<model>-<TYPE>-<method>.gguf for every variant, and sweep.csv, sweep.json,
frontier.png and sweep.html. Rerun the same command to resume: finished variants are kept."""


def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="every type x method variant, scored, with its frontier",
                       description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=HelpFormatter)
    s.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, a Hugging Face checkpoint directory, or nothing for the "
                        "default SmolLM2-135M")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="the sweep's folder")
    s.add_argument("--types", default="Q2_K,Q3_K_M,Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0",
                   help="comma list of llama.cpp mixes or ggml types (default: %(default)s)")
    s.add_argument("--methods", default="rtn", help="comma list of rtn, hqq, gptq (default: rtn)")
    s.add_argument("--text", metavar="FILE", help="scoring text (default: Python's pydoc topics)")
    s.add_argument("--max-tokens", type=int, default=4096, help="tokens scored (default 4096)")
    s.add_argument("--window", type=int, default=512, help="tokens per scored window")
    s.add_argument("--calib", metavar="FILE", help="gptq calibration text")
    s.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help="gptq calibration tokens (default 16384)")
    s.add_argument("--imatrix", metavar="FILE|auto",
                   help="an importance matrix for the rtn and gptq variants (weighted rounding, "
                        "i-quants, GPTQ onto weighted block scales), as quantize --imatrix; "
                        "'auto' computes one once from --calib (default: the calibration mix), "
                        "as zeropoint imatrix --calib-tokens N does")
    s.add_argument("--budget", metavar="SIZES",
                   help="comma list of memory budgets (100MB, 1.5GiB): the best variant for each")
    s.add_argument("--jobs", type=int, metavar="N",
                   help="tasks at once in the local process pool (default: cores / --threads)")
    s.add_argument("--threads", type=int, metavar="N",
                   help="threads per task (default: all cores, one task at a time)")
    s.add_argument("--ray", metavar="ADDRESS",
                   help="run the tasks on a Ray cluster (HOST:PORT, 'auto', or 'local' to start "
                        "one here), GPTQ variants with each layer's Linears as tasks too; the "
                        "model and DIR must be at paths every node sees")
    s.add_argument("--quiet", action="store_true", help="no per-task lines")
    s.set_defaults(func=run)


def run(args) -> None:
    from ..sweep import SweepOptions, parse_variants, sweep
    from ..sweep.frontier import parse_budgets
    from ..sweep.report import table
    from ..sweep.run import recommendation_lines

    if args.ray and args.jobs:
        raise CommandError("--jobs is for the local pool; on Ray, the cluster's CPUs decide")
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads),
                        ("--max-tokens", args.max_tokens), ("--calib-tokens", args.calib_tokens)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be at least 1, got {value}")
    if args.window < 2:
        raise CommandError(f"--window must be at least 2, got {args.window}")
    imatrix = None if args.imatrix in (None, "auto") else args.imatrix
    for flag, path in (("--text", args.text), ("--calib", args.calib), ("--imatrix", imatrix)):
        if path and not Path(path).is_file():
            raise CommandError(f"{flag} file {path!r} does not exist")
    try:
        variants = parse_variants(args.types, args.methods)
        budgets = parse_budgets(args.budget) if args.budget else []
    except ValueError as e:
        raise CommandError(str(e)) from None
    source = resolve(args.model, ("default", "gguf", "hf"))
    cpus = os.cpu_count() or 1
    options = SweepOptions(
        source=str(source.path), text=args.text, window=args.window, max_tokens=args.max_tokens,
        calib=args.calib, calib_tokens=args.calib_tokens, imatrix=args.imatrix,
        threads=args.threads or max(1, cpus // (args.jobs or 1)),
    )
    try:
        result = sweep(options, variants, args.output, budgets=budgets, jobs=args.jobs,
                       ray_address=args.ray, log=(lambda line: None) if args.quiet else print)
    except (ValueError, ImportError) as e:
        raise CommandError(str(e)) from None
    print()
    print(table(result.rows))
    print(f"\nfrontier by {result.loss}: {', '.join(r['variant'] for r in result.front)}")
    for line in recommendation_lines(result):
        print(f"budget {line}")
    print(f"\n{len(result.ran)} task(s) run, the rest were done before; wrote "
          f"{Path(args.output) / 'sweep.html'}")
