"""A real sweep of SmolLM2: its files are the single command's, its frontier is the
non-dominated set, Ray makes the same bytes, and a killed sweep resumes where it stopped."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zeropoint.cli import main
from zeropoint.models.source import default_model_path
from zeropoint.sweep import SweepOptions, parse_variants, sweep

pytestmark = pytest.mark.slow

TYPES, METHODS = "Q4_0,Q5_1,Q8_0", "rtn,hqq"


def _options(**kw):
    return SweepOptions(source=str(default_model_path()), max_tokens=256, window=128,
                        decode_tokens=4, threads=2, **kw)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.gguf")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-local")
    result = sweep(_options(), parse_variants(TYPES, METHODS), out, budgets=[60 * 2**20, 2**30],
                   jobs=1, log=lambda line: None)
    return out, result


def test_each_variant_is_the_file_quantize_writes(local_sweep, tmp_path):
    out, result = local_sweep
    assert len(result.rows) == 7 and len(result.ran) == 13  # reference + 6 makes + 6 scores
    for row in result.rows[1:]:
        single = tmp_path / f"{row['variant']}.gguf"
        assert main(["quantize", "--type", row["type"], "--method", row["method"], "-o",
                     str(single), "--quiet"]) == 0
        assert Path(row["file"]).read_bytes() == single.read_bytes(), row["variant"]


def test_frontier_and_reports(local_sweep):
    out, result = local_sweep
    rows = result.rows[1:]
    assert result.loss == "kld_mean"
    for r in rows:
        dominated = any(o["bytes"] <= r["bytes"] and o["kld_mean"] < r["kld_mean"] or
                        o["bytes"] < r["bytes"] and o["kld_mean"] <= r["kld_mean"] for o in rows)
        assert r["frontier"] == (not dominated), r["variant"]
    kld = {r["variant"]: r["kld_mean"] for r in rows}
    assert kld["Q8_0-rtn"] < kld["Q5_1-rtn"] < kld["Q4_0-rtn"]  # sanity of the scores themselves
    assert all(0 < r["same_top"] <= 1 for r in rows)
    best = result.recommendations[2**30]
    assert best["kld_mean"] == min(kld.values())
    doc = json.loads((out / "sweep.json").read_text())
    assert set(doc["frontier"]) == {r["variant"] for r in rows if r["frontier"]}
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 7
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "sweep.html").read_text()
    again = sweep(_options(), parse_variants(TYPES, METHODS), out, jobs=1, log=lambda line: None)
    assert again.ran == [] and again.rows == result.rows  # all done: nothing is redone


def test_a_ray_cluster_makes_the_same_bytes(local_sweep, tmp_path, ray_cluster):
    result = sweep(_options(), parse_variants(TYPES, METHODS), tmp_path,
                   ray_address=ray_cluster, log=lambda line: None)
    assert len(result.ran) == 13
    assert _digests(tmp_path) == _digests(local_sweep[0])


def test_a_killed_sweep_redoes_only_what_was_not_finished(tmp_path):
    cmd = [sys.executable, "-m", "zeropoint.cli", "sweep", "--types", "Q4_0,Q8_0",
           "--methods", "rtn,hqq", "--max-tokens", "256", "--window", "128", "-o", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = tmp_path / ".sweep"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(records.glob("*.make.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers too
    proc.wait()
    finished = {p.name.removesuffix(".json").replace(".", " ", 1) for p in records.glob("*.json")}
    finished = {" ".join(reversed(n.split(" "))) for n in finished}  # "make Q4_0-rtn"
    assert finished and len(finished) < 9
    result = sweep(SweepOptions(source=str(default_model_path()), max_tokens=256, window=128,
                                threads=os.cpu_count()), parse_variants("Q4_0,Q8_0", "rtn,hqq"),
                   tmp_path, jobs=1, log=lambda line: None)
    assert set(result.ran).isdisjoint(finished)
    assert set(result.ran) | finished == {f"{s} {v}" for s in ("make", "score") for v in
                                          ("Q4_0-rtn", "Q4_0-hqq", "Q8_0-rtn", "Q8_0-hqq")} | \
        {"score reference"}
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]
