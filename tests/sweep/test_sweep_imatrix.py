"""`sweep --imatrix FILE|auto` on SmolLM2: each rtn variant is the file `quantize --type T
--imatrix FILE` writes, hqq variants take no matrix (as quantize refuses one), `auto` is
`zeropoint imatrix` then FILE, a changed matrix redoes exactly the variants it weights, and
types that need a matrix are refused up front without one."""

import shutil
from pathlib import Path

import pytest

from zeropoint.cli import main
from zeropoint.models.source import default_model_path
from zeropoint.sweep import SweepOptions, parse_variants, sweep

CALIB_TOKENS = 1024  # two windows of 512: the least zeropoint imatrix takes


def _options(**kw):
    return SweepOptions(source=str(default_model_path()), max_tokens=256, window=128,
                        decode_tokens=4, threads=2, calib_tokens=CALIB_TOKENS, **kw)


def _quantize(out: Path, type_: str, method: str, imatrix: str | None = None) -> bytes:
    extra = ["--imatrix", imatrix] if imatrix else []
    assert main(["quantize", "--type", type_, "--method", method, "-o", str(out), "--quiet",
                 *extra]) == 0
    return out.read_bytes()


def test_types_that_need_a_matrix_are_refused_without_one(tmp_path):
    variants = parse_variants("Q4_0,IQ2_XS", "rtn")
    with pytest.raises(ValueError, match=r"IQ2_XS-rtn: blk\.\d+\.ffn_down\.weight \(IQ2_XS.*no --imatrix was given"):
        sweep(_options(), variants, tmp_path, log=lambda line: None)
    assert not list(tmp_path.glob("*.gguf"))  # refused before anything was made


@pytest.mark.slow
def test_sweep_with_an_imatrix_file_makes_quantizes_files(tmp_path):
    imatrix = tmp_path / "smollm2.imatrix.gguf"
    assert main(["imatrix", "--calib-tokens", str(CALIB_TOKENS), "-o", str(imatrix),
                 "--quiet"]) == 0
    out = tmp_path / "sweep"
    variants = parse_variants("IQ3_XXS,Q4_0", "rtn") + parse_variants("Q4_0", "hqq")
    result = sweep(_options(imatrix=str(imatrix)), variants, out, jobs=1, log=lambda line: None)
    for row in result.rows[1:]:
        weighted = str(imatrix) if row["method"] == "rtn" else None
        single = _quantize(tmp_path / f"{row['variant']}.gguf", row["type"], row["method"],
                           weighted)
        assert Path(row["file"]).read_bytes() == single, row["variant"]

    # Another matrix at the same path: the variants it weights are redone, hqq is not.
    shutil.copy(imatrix, tmp_path / "first.gguf")
    assert main(["imatrix", "--calib-tokens", str(2 * CALIB_TOKENS), "-o", str(imatrix),
                 "--quiet"]) == 0
    again = sweep(_options(imatrix=str(imatrix)), variants, out, jobs=1, log=lambda line: None)
    assert set(again.ran) == {f"{s} {v}" for s in ("make", "score")
                              for v in ("IQ3_XXS-rtn", "Q4_0-rtn")}


@pytest.mark.slow
def test_auto_is_zeropoint_imatrix_then_file(tmp_path):
    out = tmp_path / "sweep"
    result = sweep(_options(imatrix="auto"), parse_variants("IQ4_XS", "rtn"), out, jobs=1,
                   log=lambda line: None)
    auto = out / ".sweep" / "imatrix.gguf"
    by_command = tmp_path / "imatrix.gguf"
    assert main(["imatrix", "--calib-tokens", str(CALIB_TOKENS), "-o", str(by_command),
                 "--quiet"]) == 0
    assert auto.read_bytes() == by_command.read_bytes()
    row = result.rows[1]
    assert Path(row["file"]).read_bytes() == _quantize(tmp_path / "single.gguf", "IQ4_XS",
                                                       "rtn", str(auto))
    again = sweep(_options(imatrix="auto"), parse_variants("IQ4_XS", "rtn"), out, jobs=1,
                  log=lambda line: None)
    assert again.ran == []  # the matrix is computed once and kept, like the variants
