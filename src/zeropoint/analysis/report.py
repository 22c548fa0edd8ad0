"""Reports of a layer-by-layer analysis: a terminal table, PNG plots, JSON records, one HTML file.

The HTML page is self-contained: the plots are inline base64 PNG images (data: URIs) and the
style sheet is inline; it references nothing outside itself, so it opens offline in any browser.
An infinite SQNR (a layer that reproduces the float output exactly) is shown as 'exact'.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence

from ..atomic import atomic_path
from .layerwise import LayerError, LayerwiseResult
from .sensitivity import SensitivityResult


def fmt_db(v: float | None, width: int = 0) -> str:
    if v is None:
        text = "-"
    elif math.isinf(v):
        text = "exact" if v > 0 else "-inf"
    else:
        text = f"{v:.2f}"
    return f"{text:>{width}}" if width else text


def _fmt_damage(v: float | None) -> str:
    return "-" if v is None else f"{v:.3e}"


def worst_layers(result: LayerwiseResult, top: int = 10) -> list[LayerError]:
    """The `top` layers that make the most error on their own (lowest isolated SQNR); layers
    kept in float make none and are left out."""
    made = [r for r in result.layers if r.spec != "float"]
    return sorted(made, key=lambda r: (r.isolated_sqnr_db, r.index))[:top]


def worst_table(result: LayerwiseResult, top: int = 10) -> str:
    """Terminal table: the worst layers, the error they make and the error they receive."""
    rows = worst_layers(result, top)
    head = f"{result.spec}: the {len(rows)} layers that make the most error (SQNR in dB; lower is worse)"
    if not rows:
        return head + "\n  every layer is kept in float: no quantization error anywhere"
    name_w = max(5, *(len(r.name) for r in rows))
    lines = [head,
             f"  {'depth':>5}  {'layer':<{name_w}}  {'weight':>7}  {'makes':>7}  {'receives':>8}  "
             f"{'accumulated':>11}",
             ]
    for r in rows:
        lines.append(f"  {r.index:>5}  {r.name:<{name_w}}  {fmt_db(r.weight_sqnr_db, 7)}  "
                     f"{fmt_db(r.isolated_sqnr_db, 7)}  {fmt_db(r.input_sqnr_db, 8)}  "
                     f"{fmt_db(r.accumulated_sqnr_db, 11)}")
    lines.append("  makes: this layer alone quantized, float input. receives: its input in the "
                 "quantized model.\n  accumulated: its output with it and every layer before it "
                 "quantized.")
    return "\n".join(lines)


def summary_line(result: LayerwiseResult) -> str:
    q = [r for r in result.layers if r.spec != "float"]
    last = result.layers[-1]
    iso = sorted(r.isolated_sqnr_db for r in q)
    median = fmt_db(iso[len(iso) // 2]) if iso else "-"
    nbytes = sum(r.nbytes for r in q)
    numel = sum(r.shape[0] * r.shape[1] for r in q)
    bpw = f"{8 * nbytes / numel:.3f} bits/weight over {len(q)} quantized layers" if q else "all float"
    return (f"{result.spec}: {bpw}; median isolated {median} dB; output of the last layer "
            f"({last.name}) {fmt_db(last.accumulated_sqnr_db)} dB accumulated")


def sensitivity_table(sens: SensitivityResult, top: int = 10) -> str:
    rows = sens.layers[:top]
    name_w = max(5, *(len(r.name) for r in rows))
    lines = [f"Sensitivity ({sens.spec}, one layer quantized at a time; {sens.metric_name} of the "
             f"final output over {sens.rows} rows): the {len(rows)} most damaging layers, ranked "
             f"by the {sens.ranked_by} damage",
             f"  {'rank':>4}  {'depth':>5}  {'layer':<{name_w}}  {'estimated':>10}  {'measured':>10}"]
    for r in rows:
        lines.append(f"  {r.rank:>4}  {r.index:>5}  {r.name:<{name_w}}  {_fmt_damage(r.estimated):>10}  "
                     f"{_fmt_damage(r.measured):>10}")
    measured = sum(r.measured is not None for r in sens.layers)
    if sens.spearman is not None:
        lines.append(f"  estimate vs exact measure on {measured} layers: Spearman rank correlation "
                     f"{sens.spearman:.3f}")
    lines += [f"  {n}" for n in sens.notes]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values):
    """Infinite SQNR (exact) cannot be drawn; it leaves a gap in the line instead."""
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def plot_layerwise(results: Sequence[LayerwiseResult], path_or_file, title: str = "") -> None:
    """SQNR in dB against depth: accumulated (solid) and isolated (dashed), a colour per spec."""
    plt = _pyplot()
    width = min(16.0, max(7.0, 0.05 * max(len(r.layers) for r in results) + 5))
    fig, ax = plt.subplots(figsize=(width, 4.8))
    exact_specs = []
    for i, result in enumerate(results):
        color = f"C{i % 10}"
        x = [r.index for r in result.layers]
        acc = _finite(r.accumulated_sqnr_db for r in result.layers)
        iso = _finite(r.isolated_sqnr_db for r in result.layers)
        if all(math.isnan(v) for v in acc + iso):
            exact_specs.append(result.spec)
        ax.plot(x, acc, "-", color=color, lw=1.6, label=result.spec)
        ax.plot(x, iso, "--", color=color, lw=1.0, alpha=0.75)
    if exact_specs:
        ax.text(0.5, 0.5, "exact (infinite SQNR) everywhere:\n" + "\n".join(exact_specs),
                transform=ax.transAxes, ha="center", va="center", fontsize=10)
    ax.set_xlabel("depth (Linear layers in forward order)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title or "Quantization error by depth: isolated (dashed) vs accumulated (solid)")
    ax.grid(True, alpha=0.3)
    ax.plot([], [], "-", color="0.4", label="accumulated: this layer and all before quantized")
    ax.plot([], [], "--", color="0.4", label="isolated: only this layer quantized")
    ax.legend(fontsize=7, ncol=2 if len(results) > 2 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path_or_file, dpi=100, format="png")
    plt.close(fig)


def plot_sensitivity(sens: SensitivityResult, path_or_file) -> None:
    """Damage per layer against depth (log scale): estimated (line), measured (dots)."""
    plt = _pyplot()
    by_depth = sorted(sens.layers, key=lambda r: r.index)
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.05 * len(by_depth) + 5)), 4.2))
    est = [r.estimated if r.estimated > 0 else float("nan") for r in by_depth]
    ax.plot([r.index for r in by_depth], est, "-", color="C0", lw=1.2, label="estimated (Fisher)")
    measured = [(r.index, r.measured) for r in by_depth if r.measured is not None and r.measured > 0]
    if measured:
        ax.plot(*zip(*measured), "o", color="C3", ms=5, label="measured exactly")
    if any(math.isfinite(v) for v in est) or measured:
        ax.set_yscale("log")
    ax.set_xlabel("depth (Linear layers in forward order)")
    ax.set_ylabel(sens.metric_name)
    ax.set_title(f"Damage to the final output with one layer quantized ({sens.spec})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_or_file, dpi=100, format="png")
    plt.close(fig)


def write_png(plot_fn, path, *args) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            plot_fn(*args, f)


def _png_data_uri(plot_fn, *args) -> str:
    buf = io.BytesIO()
    plot_fn(*args, buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- JSON ------------------------------------------------------------------------------------------


def json_records(results: Sequence[LayerwiseResult],
                 sens: SensitivityResult | None = None) -> list[dict]:
    """One record per layer per spec (see LayerError.to_dict; 'inf' marks an exact layer), with
    the sensitivity of the layer under the first spec when it was computed."""
    records = []
    by_name = {r.name: r for r in sens.layers} if sens else {}
    for k, result in enumerate(results):
        for layer, record in zip(result.layers, result.records()):
            record = {"layer": record.pop("name"), **record}
            if k == 0 and layer.name in by_name:
                s = by_name[layer.name]
                record.update(sensitivity_metric=sens.metric, sensitivity_rank=s.rank,
                              sensitivity_estimated=s.estimated, sensitivity_measured=s.measured)
            records.append(record)
    return records


def write_json(path, records) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.name { text-align: left; font-family: monospace; }
tr.worst td { background: #fde8e8; }
img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #555; font-size: 0.9em; }
"""


def render_html(results: Sequence[LayerwiseResult], *, sens: SensitivityResult | None = None,
                title: str = "zeropoint analyze", meta: dict | None = None, top: int = 10) -> str:
    """The whole report as one HTML string with the plots inline (nothing fetched)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if meta:
        items = (f"<b>{e(str(k))}</b>: {e(str(v))}" for k, v in meta.items())
        parts.append("<p>" + "<br>".join(items) + "</p>")
    parts.append('<p class="note">SQNR = 10 log10(signal power / error power) of each Linear '
                 "layer's output against the float model, in dB (higher is better; 'exact' means no "
                 "error at all). <b>isolated</b>: only this layer quantized, fed the float model's "
                 "input: the error the layer makes. <b>input</b>: the layer's input in the quantized "
                 "model: the error it receives. <b>accumulated</b>: this layer and every layer "
                 "before it quantized.</p>")
    plot = _png_data_uri(plot_layerwise, results)
    parts.append(f'<img id="plot-layerwise" alt="SQNR by depth" src="{plot}">')
    parts.append("<ul>" + "".join(f"<li>{e(summary_line(r))}</li>" for r in results) + "</ul>")
    if sens is not None:
        parts.append("<h2>Sensitivity</h2>")
        parts.append(f'<p class="note">{e(sens.metric_name)} of the final output with only one layer '
                     f"quantized ({e(sens.spec)}), mean over {sens.rows} rows; every layer estimated "
                     "from the diagonal Fisher information, some measured exactly"
                     + (f"; Spearman rank correlation of the two: {sens.spearman:.3f}"
                        if sens.spearman is not None else "") + ".</p>")
        parts.append(f'<img id="plot-sensitivity" alt="sensitivity by depth" '
                     f'src="{_png_data_uri(plot_sensitivity, sens)}">')
        parts.append('<table id="sensitivity"><thead><tr><th>rank</th><th>depth</th><th>layer</th>'
                     "<th>spec</th><th>estimated</th><th>measured</th></tr></thead><tbody>")
        for r in sens.layers:
            parts.append(f'<tr class="sensitivity"><td>{r.rank}</td><td>{r.index}</td>'
                         f'<td class="name">{e(r.name)}</td><td>{e(r.spec)}</td>'
                         f"<td>{_fmt_damage(r.estimated)}</td><td>{_fmt_damage(r.measured)}</td></tr>")
        parts.append("</tbody></table>")
    for k, result in enumerate(results):
        worst = {r.name for r in worst_layers(result, top)}
        parts.append(f"<h2>All layers: {e(result.spec)}</h2>")
        parts.append(f'<p class="note">{result.tokens} rows (tokens) per layer; the {len(worst)} '
                     "layers that make the most error are shaded.</p>")
        parts.append(f'<table id="layers-{k}" class="layers"><thead><tr><th>depth</th><th>layer</th>'
                     "<th>shape</th><th>spec</th><th>bits/weight</th><th>weight dB</th>"
                     "<th>isolated dB</th><th>input dB</th><th>accumulated dB</th></tr></thead><tbody>")
        for r in result.layers:
            cls = "layer worst" if r.name in worst else "layer"
            bpw = "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}"
            parts.append(
                f'<tr class="{cls}"><td>{r.index}</td><td class="name">{e(r.name)}</td>'
                f"<td>{r.shape[0]}x{r.shape[1]}</td><td>{e(r.spec)}</td><td>{bpw}</td>"
                f"<td>{fmt_db(r.weight_sqnr_db)}</td><td>{fmt_db(r.isolated_sqnr_db)}</td>"
                f"<td>{fmt_db(r.input_sqnr_db)}</td><td>{fmt_db(r.accumulated_sqnr_db)}</td></tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path, results, **kw) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(results, **kw), encoding="utf-8")
