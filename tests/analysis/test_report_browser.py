"""Reports: the terminal table, JSON, and the HTML page opened in a real headless browser."""

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from zeropoint import QuantSpec
from zeropoint.analysis.layerwise import analyze_layers
from zeropoint.analysis.report import (
    fmt_db, json_records, render_html, worst_layers, worst_table, write_html, write_json,
)
from zeropoint.analysis.sensitivity import layer_sensitivity

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def deep_mlp(depth=14, width=48):
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 5))


@pytest.fixture(scope="module")
def analysis():
    model = deep_mlp()
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(0))
    specs = [QuantSpec(4, "symmetric", "per_tensor"), QuantSpec(4, "symmetric", "per_channel"),
             QuantSpec(8, "symmetric", "per_channel")]
    results = analyze_layers(model, [x[:128], x[128:]], specs, keep_float=["28"])
    sens = layer_sensitivity(model, [x], specs[0], keep_float=["28"], exact=4)
    return results, sens


def test_worst_table_lists_the_layers_that_make_the_most_error(analysis):
    results, _ = analysis
    result = results[0]
    worst = worst_layers(result, 10)
    assert len(worst) == 10 and all(r.spec != "float" for r in worst)
    made = sorted(r.isolated_sqnr_db for r in result.layers if r.spec != "float")
    assert [r.isolated_sqnr_db for r in worst] == made[:10]
    table = worst_table(result, 10)
    for r in worst:
        assert re.search(rf"^\s+{r.index}\s+{re.escape(r.name)}\s", table, re.M)
        assert f"{r.isolated_sqnr_db:.2f}" in table and fmt_db(r.input_sqnr_db) in table
    assert "receives" in table and "makes" in table


def test_infinite_sqnr_is_shown_as_exact_and_json_stays_strict(analysis):
    results, sens = analysis
    assert fmt_db(math.inf) == "exact" and fmt_db(12.345) == "12.35"
    records = json_records(results, sens)
    assert len(records) == 3 * 15
    text = json.dumps(records, allow_nan=False)
    first = records[0]
    assert first["input_sqnr_db"] == "inf"  # the model's input is never quantized
    assert {"layer", "index", "weight_sqnr_db", "isolated_sqnr_db", "accumulated_sqnr_db", "spec"} <= first.keys()
    assert "sensitivity_rank" in first and "sensitivity_rank" not in records[15]
    kept = [r for r in records if r["layer"] == "28"]
    assert all(r["spec"] == "float" and r["isolated_sqnr_db"] == "inf" for r in kept)
    assert "NaN" not in text


def test_html_is_self_contained(analysis, tmp_path):
    results, sens = analysis
    page = render_html(results, sens=sens, meta={"model": "deep <mlp>"})
    assert "deep &lt;mlp&gt;" in page  # escaped
    # nothing to fetch: no URL, every src is inline, no script, no external style sheet
    srcs = re.findall(r'src="([^"]*)"', page)
    outside_images = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', "", page)
    assert not re.search(r"(https?:)?//[a-z0-9]|url\(|@import", outside_images, re.I)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page and "<link" not in page
    for r in results[0].layers:
        assert f'<td class="name">{html.escape(r.name)}</td>' in page
    write_html(tmp_path / "r.html", results, sens=sens)
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    write_json(tmp_path / "r.json", json_records(results))
    assert len(json.loads((tmp_path / "r.json").read_text())) == 45


def run_chromium(*args, user_data_dir):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--no-first-run",
           "--disable-extensions", "--disable-sync", "--mute-audio", "--hide-scrollbars",
           f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it with "
                                              "scripts/install-chromium.sh)")
def test_html_renders_in_headless_chromium(analysis, tmp_path):
    results, sens = analysis
    page = tmp_path / "report.html"
    write_html(page, results, sens=sens, meta={"model": "deep mlp"})
    proc = run_chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
                        user_data_dir=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    rows = re.findall(r'<tr class="layer( worst)?">', dom)
    assert len(rows) == sum(len(r.layers) for r in results)
    assert sum(bool(w) for w in rows) == 3 * 10  # the ten worst of each spec, shaded
    for k, result in enumerate(results):
        assert f'id="layers-{k}"' in dom
        for r in result.layers:
            assert html.escape(r.name) in dom
    imgs = re.findall(r"<img[^>]*>", dom)
    assert len(imgs) == 2 and all('src="data:image/png;base64,' in i for i in imgs)

    # The page also paints: a screenshot of it is a real PNG with more than one colour in it.
    shot = tmp_path / "shot.png"
    proc = run_chromium(f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri(),
                        user_data_dir=tmp_path / "profile2")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1200, 1600)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # plots and table, not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it with "
                                              "scripts/install-chromium.sh)")
def test_images_decode_in_the_browser(analysis, tmp_path):
    """Every inline image has a real width once the page is loaded: the PNGs decode."""
    results, sens = analysis
    page = render_html(results, sens=sens)
    # A tiny inline script writes each image's natural width into the DOM (only in this test's
    # copy of the page; the report itself has no script).
    probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute("
             "'data-widths', Array.from(document.images).map(i => i.naturalWidth).join(',')); });"
             "</script>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = run_chromium("--virtual-time-budget=5000", "--dump-dom", (tmp_path / "probe.html").as_uri(),
                        user_data_dir=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    widths = re.search(r'data-widths="([^"]*)"', proc.stdout)
    assert widths, proc.stdout[:500]
    assert [int(w) > 300 for w in widths.group(1).split(",")] == [True, True]
