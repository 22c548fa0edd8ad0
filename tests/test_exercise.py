import json
import math
import subprocess
import sys

import pytest
import torch

from zeropoint import exercise
from zeropoint.cli import main


def test_default_exercise_matches_theory(tmp_path, capsys):
    out_json, out_png = tmp_path / "rows.json", tmp_path / "plot.png"
    assert main(["exercise", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "MSE/theory" in text and "dB per added bit" in text
    rows = json.loads(out_json.read_text())
    assert {(r["scheme"], r["bits"]) for r in rows} == {
        (s, b) for s in ("symmetric", "asymmetric") for b in (4, 6, 8)
    }
    for r in rows:
        assert {"scheme", "bits", "granularity", "mse", "sqnr_db", "theory_mse"} <= r.keys()
        # Widrow's model, independent of the code: N(0,1) at 4+ bits is uniform rounding noise.
        assert r["mse"] == pytest.approx(r["theory_mse"], rel=0.03)
    sym = sorted((r for r in rows if r["scheme"] == "symmetric"), key=lambda r: r["bits"])
    slope = (sym[-1]["sqnr_db"] - sym[0]["sqnr_db"]) / (sym[-1]["bits"] - sym[0]["bits"])
    assert slope == pytest.approx(20 * math.log10(2), abs=0.5)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skewed_data_favours_asymmetric_and_granularities_differ():
    cfg = exercise.ExerciseConfig(n=200_000, bits=(2, 4), dist="relu",
                                  granularities=("per_tensor", "per_channel", "per_group"))
    rows = {(r.scheme, r.bits, r.granularity): r for r in exercise.run_exercise(cfg)}
    # On relu data symmetric wastes its negative half: asymmetric is about one bit (6 dB) better.
    gain = rows[("asymmetric", 4, "per_tensor")].sqnr_db - rows[("symmetric", 4, "per_tensor")].sqnr_db
    assert gain == pytest.approx(6.0, abs=1.0)
    assert rows[("asymmetric", 4, "per_group")].sqnr_db > rows[("asymmetric", 4, "per_channel")].sqnr_db \
        > rows[("asymmetric", 4, "per_tensor")].sqnr_db
    assert rows[("asymmetric", 4, "per_group")].bits_per_weight == pytest.approx(4 + 40 / 128)
    assert "skewed" in exercise.interpret(list(rows.values()), cfg)


@pytest.mark.parametrize("dist", exercise.DISTRIBUTIONS)
def test_distributions_are_seeded(dist):
    a, b = exercise.sample(dist, 1000, 3), exercise.sample(dist, 1000, 3)
    assert torch.equal(a, b) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert not torch.equal(a, exercise.sample(dist, 1000, 4))


def test_one_bit_runs_asymmetric_only(capsys):
    assert main(["exercise", "--bits", "1,2", "--n", "5000", "--plot", "none"]) == 0
    out = capsys.readouterr().out
    assert "asymmetric     1" in out and "symmetric      1" not in out


@pytest.mark.parametrize(
    "args,message",
    [(["--bits", "0,4"], "bits must be 1..8, got 0"), (["--dist", "cauchy"], "unknown distribution 'cauchy'"),
     (["--granularity", "per_row"], "unknown granularity 'per_row'")],
)
def test_bad_arguments_exit_2_without_traceback(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zeropoint.cli", "exercise", *args, "--plot", "none"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- range methods (issue #3) ----------------------------------------------------------------------


def test_default_rows_use_minmax_range():
    rows = exercise.run_exercise(exercise.ExerciseConfig(n=5000, bits=(4,)))
    assert {r.range_method for r in rows} == {"minmax"}


def test_student_t_mse_clipping_beats_minmax_by_3db():
    # The figure: 1,000,000 samples of Student-t (3 degrees of freedom) at 4 bits.
    # Min/max spends the 16 levels on a few outliers (|x| ~ 100) and rounds most values to 0.
    cfg = exercise.ExerciseConfig(n=1_000_000, bits=(4,), dist="student-t", ranges=("minmax", "mse"))
    rows = {(r.scheme, r.range_method): r for r in exercise.run_exercise(cfg)}
    for scheme in ("symmetric", "asymmetric"):
        gain = rows[(scheme, "mse")].sqnr_db - rows[(scheme, "minmax")].sqnr_db
        assert gain >= 3.0, (scheme, gain)
    text = exercise.interpret(list(rows.values()), cfg)
    sym_gain = rows[("symmetric", "mse")].sqnr_db - rows[("symmetric", "minmax")].sqnr_db
    assert f"mse {sym_gain:+.1f} dB" in text and "outliers" in text


def test_range_flag_compares_methods_in_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    assert main(["exercise", "--range", "minmax,percentile,mse,entropy", "--dist", "student-t",
                 "--bits", "4", "--n", "200000", "--json", str(out_json), "--plot", "none"]) == 0
    text = capsys.readouterr().out
    assert "range" in text.splitlines()[2] and "entropy" in text and "SQNR against minmax" in text
    rows = json.loads(out_json.read_text())
    assert {(r["scheme"], r["range_method"]) for r in rows} == {
        (s, m) for s in ("symmetric", "asymmetric") for m in ("minmax", "percentile", "mse", "entropy")
    }
    by = {(r["scheme"], r["range_method"]): r for r in rows}
    for s in ("symmetric", "asymmetric"):
        for m in ("percentile", "mse", "entropy"):  # every clipping method beats min/max on heavy tails
            assert by[(s, m)]["sqnr_db"] > by[(s, "minmax")]["sqnr_db"] + 2


def test_light_tails_gain_little_from_clipping():
    cfg = exercise.ExerciseConfig(n=200_000, bits=(8,), dist="uniform", ranges=("minmax", "mse"),
                                  schemes=("asymmetric",))
    rows = exercise.run_exercise(cfg)
    assert "the tails are light" in exercise.interpret(rows, cfg)


@pytest.mark.parametrize(
    "args,message",
    [(["--range", "minmax,max"], "unknown range method 'max'"),
     (["--range", "percentile", "--percentile", "100.5"], r"percentile must be in (0, 100]")],
)
def test_bad_range_arguments_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zeropoint.cli", "exercise", *args, "--plot", "none",
                           "--n", "1000"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
