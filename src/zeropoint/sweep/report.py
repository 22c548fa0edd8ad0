"""A sweep's results as a terminal table, CSV, JSON, a PNG of quality against size with the
Pareto frontier drawn, and one self-contained HTML page holding the table and the plot."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..atomic import atomic_path

# (key, heading, format) of every column, in order; a row lacking a key shows '-'.
COLUMNS = (
    ("variant", "variant", "{}"),
    ("bytes", "MiB", "{:.1f}"),
    ("bits_per_weight", "bits/w", "{:.3f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl ratio", "{:.4f}"),
    ("kld_mean", "mean KLD", "{:.4f}"),
    ("same_top", "same top %", "{:.2f}"),
    ("tokens_per_second", "tok/s", "{:.1f}"),
    ("frontier", "frontier", "{}"),
)


def _cell(row: Mapping, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "bytes":
        value = value / 2**20
    if key == "same_top":
        value = 100 * value
    if key == "frontier":
        return "*" if value else ""
    return fmt.format(value)


def table(rows: Sequence[Mapping]) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, payload) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


def plot_png(rows: Sequence[Mapping], front: Sequence[Mapping], loss: str, title: str) -> bytes:
    """Quality (`loss`, lower is better) against size in MiB; the frontier joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        x, y = r["bytes"] / 2**20, r[loss]
        ax.scatter(x, y, color="tab:red" if r.get("frontier") else "tab:gray", zorder=3)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([r["bytes"] / 2**20 for r in front], [r[loss] for r in front], color="tab:red",
            label="Pareto frontier")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(loss.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_html(path: Path, rows: Sequence[Mapping], png: bytes, title: str,
               recommendations: Sequence[str]) -> None:
    """One file, no external assets: the table, the plot inlined as a data URI, the budgets."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, k, f))}</td>"
                                    for k, _, f in COLUMNS) + "</tr>" for r in rows)
    recs = "".join(f"<li>{html.escape(line)}</li>" for line in recommendations)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
</style></head><body><h1>{html.escape(title)}</h1>
<img alt="quality against size" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Variants</h2><table><tr>{head}</tr>{body}</table>
<h2>Best variant for each budget</h2><ul>{recs}</ul></body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
