"""`zeropoint quantize`: an option that the chosen output or method would not read is an error
naming it, never silently ignored."""

import pytest

from zeropoint.cli import build_parser, main
from zeropoint.cli.quantize import DEFAULTS, check_options

DIRECTORY_ONLY = [
    ["--bits", "3"], ["--scheme", "asymmetric"], ["--granularity", "per_channel"],
    ["--group-size", "64"], ["--keep-float", "lm_head"], ["--recipe", "r.json"],
    ["--activations", "int8-dynamic"], ["--budget-bpw", "4.5"], ["--recipe-out", "r.json"],
    ["--budget-tokens", "512"],
]


def parse(*args):
    return build_parser().parse_args(["quantize", "-o", "OUT", *args])


def refused(tmp_path, monkeypatch, capsys, *args) -> str:
    """The one-line error of `quantize ... -o OUT` run in tmp_path; OUT must not be written."""
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", *args, "-o", "OUT"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeropoint quantize: error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    return err


@pytest.mark.parametrize("option", DIRECTORY_ONLY, ids=lambda o: o[0])
def test_directory_options_with_type_are_errors(tmp_path, monkeypatch, capsys, option):
    err = refused(tmp_path, monkeypatch, capsys, "--type", "Q4_K_M", *option)
    assert f"{option[0]} is for zeropoint directories, not GGUF output" in err


@pytest.mark.parametrize("option", [["--bits", str(DEFAULTS["bits"])],
                                    ["--granularity", DEFAULTS["granularity"]],
                                    ["--keep-float", *DEFAULTS["keep_float"]], ["--keep-float"]],
                         ids=lambda o: " ".join(o))
def test_an_option_given_at_its_default_value_is_still_given(tmp_path, monkeypatch, capsys,
                                                              option):
    err = refused(tmp_path, monkeypatch, capsys, "--type", "Q8_0", *option)
    assert option[0] in err


@pytest.mark.parametrize("args,message", [
    (["--calib", "c.txt"], "--calib is calibration text for --method gptq or --budget-bpw"),
    (["--method", "hqq", "--calib", "c.txt"], "--calib is calibration text"),
    (["--calib-tokens", "1024"], "--calib-tokens is for --method gptq, not --method rtn"),
    (["--budget-bpw", "4.5", "--calib-tokens", "1024"], "--calib-tokens is for --method gptq"),
    (["--type", "Q4_0", "--method", "hqq", "--calib-tokens", "1024"], "--calib-tokens"),
    (["--recipe", "r.json", "--bits", "3"], "--bits conflicts with --recipe"),
    (["--recipe", "r.json", "--keep-float"], "--keep-float conflicts with --recipe"),
    (["--granularity", "per_channel", "--group-size", "32"],
     "--group-size is for --granularity per_group, not per_channel"),
    (["--recipe-out", "r.json"], "--recipe-out is for --budget-bpw"),
    (["--budget-tokens", "512"], "--budget-tokens is for --budget-bpw"),
    (["--text", "t.txt"], "--text is for --eval"),
    (["--type", "Q8_0", "--max-tokens", "128"], "--max-tokens is for --eval"),
])
def test_options_nothing_reads_are_errors(tmp_path, monkeypatch, capsys, args, message):
    assert message in refused(tmp_path, monkeypatch, capsys, *args)


@pytest.mark.parametrize("args", [
    [],
    ["--type", "Q4_K_M", "--method", "gptq", "--calib", "c.txt", "--calib-tokens", "256"],
    ["--type", "Q4_0", "--method", "hqq", "--eval", "--text", "t.txt", "--max-tokens", "128"],
    ["--bits", "8", "--granularity", "per_channel", "--activations", "int8-dynamic"],
    ["--budget-bpw", "4.5", "--calib", "c.txt", "--budget-tokens", "512", "--recipe-out", "r"],
    ["--recipe", "r.json", "--budget-bpw", "4.5"],
    ["--method", "gptq", "--calib", "c.txt", "--calib-tokens", "1024", "--group-size", "32"],
])
def test_options_that_are_read_pass(args):
    check_options(parse(*args))


@pytest.mark.parametrize("args", [["--type", "Q4_0"], ["--method", "gptq"]],
                         ids=["rtn", "gptq-directory"])
def test_diagonal_shrink_needs_gptq_into_gguf(tmp_path, monkeypatch, capsys, args):
    err = refused(tmp_path, monkeypatch, capsys, *args, "--diagonal-shrink", "0.5")
    assert "--diagonal-shrink is for --method gptq with --type" in err


def test_diagonal_shrink_out_of_range_is_refused(tmp_path, monkeypatch, capsys):
    err = refused(tmp_path, monkeypatch, capsys, "--type", "Q4_0", "--method", "gptq",
                  "--diagonal-shrink", "2")
    assert "--diagonal-shrink must be in 0..1, got 2.0" in err
