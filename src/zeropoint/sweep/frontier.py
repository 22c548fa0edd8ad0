"""The size/quality frontier of a sweep: the variants no other variant beats on both size and
quality, and the best variant that fits each memory budget."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def pareto_front(rows: Sequence[Mapping], size: str = "bytes", loss: str = "perplexity") -> list:
    """The rows that no other row dominates (no larger and no worse, one of them strictly), by
    increasing size. Lower `loss` is better."""
    front = []
    for row in sorted(rows, key=lambda r: (r[size], r[loss])):
        if not front or row[loss] < front[-1][loss]:
            front.append(row)
    return front


def recommend(rows: Sequence[Mapping], budgets: Sequence[int], size: str = "bytes",
              loss: str = "perplexity") -> dict[int, Mapping | None]:
    """For each budget in bytes, the lowest-loss row that fits in it (None when none fits)."""
    return {b: min((r for r in rows if r[size] <= b), key=lambda r: (r[loss], r[size]),
                   default=None) for b in budgets}


def parse_budgets(text: str) -> list[int]:
    """'100MB,1.5GiB,2000000' -> bytes. ValueError for anything else, naming the units."""
    budgets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", item)
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"budget {item!r} is not a size; accepted: a number with an optional "
                             f"unit ({', '.join(u for u in _UNITS if u)}), e.g. 100MB or 1.5GiB")
        budgets.append(int(float(m.group(1)) * _UNITS[unit]))
    if not budgets:
        raise ValueError(f"--budget needs at least one size, got {text!r}")
    return budgets
