"""How the C kernels are built and run: on torch's own OpenMP runtime, whatever else is loaded;
bound as csrc/zeropoint.h declares them; compiled once, with the host's flags, and pruned."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zeropoint import ckernels

# A second libgomp loaded first (sentencepiece ships one) must not decide the build: the kernels
# still link against torch's, load no runtime of their own, and split their work.
PROBE = """
import sentencepiece, torch
def gomps():
    return {l.split()[-1] for l in open("/proc/self/maps") if "/libgomp" in l}
before = gomps()
from zeropoint import ckernels
lib = ckernels.library()
print(lib.zp_openmp(), len(before), len(gomps() - before))
"""


def torch_libgomp() -> bool:
    root = Path(torch.__file__).resolve().parent
    return any(p.name.startswith("libgomp") for d in (root / "lib", root.parent / "torch.libs")
               if d.is_dir() for p in d.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_kernels_run_on_torchs_openmp_even_beside_another_libgomp():
    pytest.importorskip("sentencepiece")
    if ckernels.library() is None or not torch_libgomp():
        pytest.skip("no C kernels, or a torch without its own libgomp")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    openmp, runtimes_before, runtimes_added = map(int, out[-3:])
    assert runtimes_before == 2  # torch's and sentencepiece's: the case under test
    assert openmp == 1
    assert runtimes_added == 0


# --- the header and the bindings ----------------------------------------------------------------

C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "void": None}


def header_prototypes() -> dict[str, tuple]:
    """csrc/zeropoint.h's functions, in order: name -> (restype, argtypes) as ctypes spells
    them (every pointer a c_void_p)."""
    text = re.sub(r"/\*.*?\*/", "", (ckernels.CSRC / "zeropoint.h").read_text(), flags=re.S)
    found = {}
    for ret, name, args in re.findall(r"ZP_API\s+([\w\s*]+?)\s*\b(zp_\w+)\s*\(([^)]*)\)\s*;",
                                       text):
        def ctype(decl: str):
            decl = " ".join(decl.split())
            if "*" in decl:
                return ctypes.c_void_p
            return C_TYPES[decl.replace("const ", "").rsplit(" ", 1)[0] if " " in decl else decl]
        params = [] if args.strip() == "void" else [ctype(a) for a in args.split(",")]
        found[name] = (ctype(ret), params)
    return found


def test_bindings_match_the_header_one_to_one():
    header = header_prototypes()
    assert list(header) == list(ckernels.SIGNATURES)
    assert header == ckernels.SIGNATURES


def test_the_library_exports_the_header_and_nothing_else():
    lib = ckernels.library()
    if lib is None:
        pytest.skip("no C kernels here")
    assert all(hasattr(lib, name) for name in ckernels.SIGNATURES)
    for internal in ("zp_parallel", "zp_parallel_blocks", "non_finite", "half_bits"):
        assert not hasattr(lib, internal), internal


def test_every_source_is_built_and_includes_the_header():
    assert set(ckernels.CSRC.glob("*.c")) == set(ckernels.SOURCES)
    assert set(ckernels.CSRC.glob("*.h")) == set(ckernels.HEADERS)  # all in the cache key
    for source in ckernels.SOURCES:
        assert '#include "zeropoint.h"' in source.read_text(), source.name


# --- the build: compiler messages, flags, one compile at a time, pruning -------------------------

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no C compiler")


def fake_compiler(tmp_path: Path, body: str) -> Path:
    """A shell script standing in for CC: it appends its arguments to tmp_path/calls, then runs
    `body` with $out set to the file after -o."""
    script = tmp_path / "fake-cc"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{tmp_path / 'calls'}"
out=""; prev=""
for arg in "$@"; do [ "$prev" = "-o" ] && out="$arg"; prev="$arg"; done
{body}
""")
    script.chmod(0o755)
    return script


def compiler_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


@needs_cc
def test_a_failed_compile_shows_the_compilers_message(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("int zp_broken(void) { return undeclared_name_here; }\n")
    monkeypatch.setattr(ckernels, "SOURCES", [broken])
    monkeypatch.setattr(ckernels, "HEADERS", [])
    with pytest.warns(UserWarning, match="C kernels unavailable") as caught:
        assert ckernels.load_library(tmp_path / "cache") is None
    message = str(caught[0].message)
    assert "undeclared_name_here" in message and "error" in message
    assert not list((tmp_path / "cache").glob("*kernels-*.so"))


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "riscv64", "ppc64le"])
def test_x86_flags_only_on_x86(tmp_path, monkeypatch, machine):
    monkeypatch.setattr(ckernels, "_machine", lambda: machine)
    monkeypatch.setattr(ckernels, "_torch_openmp", lambda: [])
    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, "exit 1")))
    with pytest.raises(ckernels.CompileError):
        ckernels._build(tmp_path / "cache")
    (call,) = compiler_calls(tmp_path)
    assert "-mprefer-vector-width=512" not in call.split() and "-march=native" not in call.split()
    assert ("-mcpu=native" in call.split()) == (machine != "riscv64")


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_gets_its_flags(monkeypatch, machine):
    monkeypatch.setattr(ckernels, "_machine", lambda: machine)
    assert {"-march=native", "-mprefer-vector-width=512"} <= set(ckernels.cflags())


# Builds once both processes are ready, so that each looks for the library at the same moment.
RACER = """
import os, sys, time
from pathlib import Path
from zeropoint import ckernels
ckernels._torch_openmp = lambda: []  # one compile per build, whatever OpenMP this machine has
ready = Path(sys.argv[2])
(ready / str(os.getpid())).touch()
deadline = time.monotonic() + 60
while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print(ckernels._build(Path(sys.argv[1])))
"""


@pytest.mark.skipif(ckernels.fcntl is None, reason="no flock here")
def test_two_processes_starting_at_once_compile_once(tmp_path):
    # Each "compile" takes 2 s: long enough that both processes find no library and meet at
    # the lock.
    cc = fake_compiler(tmp_path, 'sleep 2; : > "$out"')
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "CC": str(cc)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "cache"), str(ready)],
                               env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=240)[0].split() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert outs[0][-1] == outs[1][-1]
    assert len(compiler_calls(tmp_path)) == 1


def test_a_build_prunes_libraries_unused_for_a_week_but_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ckernels, "_torch_openmp", lambda: [])
    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, ': > "$out"')))
    cache = tmp_path / "cache"
    cache.mkdir()
    month_ago = time.time() - 30 * 24 * 3600
    old, recent, killed = (cache / "kernels-0123456789abcdef.so",
                           cache / "kernels-fedcba9876543210.so", cache / ".kernels-x1y2z3.so")
    for path in (old, recent, killed):
        path.write_bytes(b"")
    os.utime(old, (month_ago, month_ago))  # another checkout's, unused since
    os.utime(killed, (month_ago, month_ago))  # a build killed mid-way
    built = ckernels._build(cache)
    assert built.exists() and built.name.startswith("kernels-")
    assert not old.exists() and not killed.exists()
    assert recent.exists()  # another checkout in use: kept
    # Found again: no compile, nothing pruned, and marked as used now.
    os.utime(built, (month_ago, month_ago))
    assert ckernels._build(cache) == built and built.exists() and recent.exists()
    assert len(compiler_calls(tmp_path)) == 1
    assert built.stat().st_mtime > month_ago


def test_a_changed_source_or_flag_gets_a_library_of_its_own(tmp_path, monkeypatch):
    # The cache key is a checksum of the sources and the build line: one byte of either changed
    # must name another library (a stale one would run old code), the same bytes the same one.
    monkeypatch.setattr(ckernels, "_torch_openmp", lambda: [])
    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, ': > "$out"')))
    source = tmp_path / "k.c"
    monkeypatch.setattr(ckernels, "SOURCES", [source])
    monkeypatch.setattr(ckernels, "HEADERS", [])
    names = []
    for text in ("int zp_a(void) { return 1; }\n", "int zp_a(void) { return 2; }\n",
                 "int zp_a(void) { return 1; }\n"):
        source.write_text(text)
        names.append(ckernels._build(tmp_path / "cache").name)
    monkeypatch.setattr(ckernels, "BASE_CFLAGS", [*ckernels.BASE_CFLAGS, "-DZP_OTHER"])
    names.append(ckernels._build(tmp_path / "cache").name)
    assert names[0] == names[2]
    assert len({names[0], names[1], names[3]}) == 3
    assert all(re.fullmatch(r"kernels-[0-9a-f]{16}\.so", n) for n in names)
    assert len(compiler_calls(tmp_path)) == 3
