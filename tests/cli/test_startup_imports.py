"""The command line starts without torch or transformers: building the parser, --help (of the
program and of each command) and argument errors import neither (issue 18). Each case runs in a
fresh interpreter, whose sys.modules is the oracle; no timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
HEAVY = ("torch", "transformers")

# Run main(argv) in a fresh interpreter; print the exit code and which HEAVY modules got loaded.
_PROBE = """
import contextlib, io, json, sys
import zeropoint.cli as cli
argv = json.loads(sys.argv[1])
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = cli.main(argv) if argv is not None else (cli.build_parser(), 0)[1]
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules],
                  "said": out.getvalue()}))
""" % (HEAVY,)


def probe(argv) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    None,  # build_parser() alone
    ["--help"],
    ["quantize", "--help"],
    ["eval", "--help"],
    ["analyze", "--help"],
    ["exercise", "--help"],
])
def test_help_imports_no_torch(argv):
    r = probe(argv)
    assert r["code"] == 0, r["said"]
    assert r["loaded"] == [], f"{argv} imported {r['loaded']}"
    if argv:
        assert "usage: zeropoint" in r["said"]


@pytest.mark.parametrize("argv, complaint", [
    (["quantize", "--bogus", "-o", "x"], "unrecognized arguments: --bogus"),
    (["quantize"], "the following arguments are required: -o/--output"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["quantize", "-o", "x.gguf", "--type", "Q4_0", "--bits", "3"], "--bits is for zeropoint"),
    (["quantize", "missing.gguf", "-o", "x.gguf", "--type", "Q4_0"], "does not exist"),
])
def test_argument_errors_import_no_torch(argv, complaint):
    r = probe(argv)
    assert r["code"] == 2, r["said"]
    assert complaint in r["said"]
    assert r["loaded"] == [], f"{argv} imported {r['loaded']}"


_OTHER_COMMANDS_PROBE = """
import contextlib, io, json, sys
import zeropoint.cli as cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        cli.main(json.loads(sys.argv[1]))
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("zeropoint.cli."))))
"""


@pytest.mark.parametrize("command", ["quantize", "inspect", "exercise"])
def test_a_command_imports_no_other_command(command):
    """`zeropoint CMD ...` builds CMD's parser alone: the other commands' modules (and what their
    options need, e.g. eval's KLD defaults from models.base_logits) stay unloaded."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _OTHER_COMMANDS_PROBE,
                           json.dumps([command, "--help"])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    others = {f"zeropoint.cli.{c}" for c in ("analyze", "eval", "eval_kld", "generate",
                                             "imatrix", "inspect", "sweep", "exercise",
                                             "quantize")} - {f"zeropoint.cli.{command}"}
    assert not loaded & others, f"{command} --help loaded {sorted(loaded & others)}"
    assert f"zeropoint.cli.{command}" in loaded
