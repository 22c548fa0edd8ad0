"""`zeropoint exercise`: the MSE of symmetric vs asymmetric quantization on synthetic data."""

from __future__ import annotations

import argparse

from ..atomic import atomic_path
from .common import CommandError, HelpFormatter, write_json

EPILOG = """examples:
  zeropoint exercise                                  (4, 6 and 8 bits, normal data)
  zeropoint exercise --bits 2,3,4,8 --dist relu --granularity per_tensor,per_group
  zeropoint exercise --range minmax,percentile,mse --json rows.json --plot none
"""


def add_parser(sub) -> None:
    ex = sub.add_parser(
        "exercise", help="the chapter's exercise: MSE of symmetric vs asymmetric",
        description="Quantize synthetic data symmetrically and asymmetrically at several bit\n"
                    "widths and compare the MSE with the theory curve, as a table and a plot.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    ex.add_argument("--bits", type=_int_list, default=(4, 6, 8), help="bit widths, e.g. 2,3,4,8")
    ex.add_argument("--dist", default="normal",
                    help="normal, uniform, laplace, student-t or relu (skewed)")
    ex.add_argument("--granularity", type=_str_list, default=("per_tensor",),
                    help="comma list of per_tensor, per_channel, per_group (on a 2-D matrix)")
    ex.add_argument("--group-size", type=int, default=128)
    ex.add_argument("--range", type=_str_list, default=("minmax",),
                    help="comma list of range methods: minmax, percentile, mse, entropy")
    ex.add_argument("--percentile", type=float, default=99.99,
                    help="percentile for --range percentile, in (0, 100]")
    ex.add_argument("--n", type=int, default=1_000_000, help="number of samples")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ex.add_argument("--plot", metavar="PATH", default="zeropoint-exercise.png",
                    help="PNG plot path, or 'none'")
    ex.set_defaults(func=run)


def run(args) -> None:
    from .. import exercise

    try:
        cfg = exercise.ExerciseConfig(
            n=args.n, bits=args.bits, dist=args.dist, granularities=args.granularity,
            group_size=args.group_size, seed=args.seed, ranges=args.range,
            percentile=args.percentile,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    rows = exercise.run_exercise(cfg)
    print(f"{cfg.n:,} float32 samples of {cfg.dist}, seed {cfg.seed}\n")
    print(exercise.format_table(rows))
    print()
    print(exercise.interpret(rows, cfg))
    if args.json:
        write_json(args.json, exercise.rows_as_dicts(rows))
        print(f"\nrows written to {args.json}")
    if args.plot != "none":
        with atomic_path(args.plot) as tmp:
            exercise.plot(rows, cfg, tmp)
        print(f"plot written to {args.plot}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,6,8, got {text!r}") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())
