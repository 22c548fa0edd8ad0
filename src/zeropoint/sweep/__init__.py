"""`zeropoint sweep`: every (type, method) variant of one model, made and scored against the
source, the size/quality frontier drawn and a variant recommended for each memory budget.

variants (what to make, and the keys that make a sweep resumable) -> tasks (make one file, score
one file: plain functions a process pool or a Ray cluster runs) -> executors (the local pool, Ray)
-> frontier (Pareto set, budgets) -> report (table, CSV, JSON, PNG, HTML) -> run (the whole sweep).
"""

from .frontier import pareto_front, recommend
from .run import SweepResult, sweep
from .variants import SweepOptions, Variant, parse_variants

__all__ = ["SweepOptions", "SweepResult", "Variant", "parse_variants", "pareto_front",
           "recommend", "sweep"]
