"""Whole commands, from start to exit, as a user runs them: each zeropoint command in a fresh
process against its nearest llama.cpp peer on the same work, alternated run by run (zeropoint,
peer, peer, zeropoint, ...) so a change in the machine's load hits both; the median wall time and
the median peak RSS (GNU time's %M of that very command) and CPU seconds (user + system, all
threads: the cost of the job whatever the machine's load) of each, and their ratios.

Rows (issue 18):
  requantize    `zeropoint quantize X.gguf --type T -o out.gguf` against `llama-quantize
                --allow-requantize X.gguf out.gguf T THREADS` (`--pure` for the single K types),
                for every type and mix zeropoint writes, on SmolLM2-135M (Q4_1 source) and
                Gemma 3 270M (Q4_K_M source); outputs checked byte for byte. Targets: time
                <= llama-quantize's, peak RSS <= 1.5x.
  help          `zeropoint --help` (no peer; target < 0.3 s).
  quantize RTN  `zeropoint quantize X.gguf --bits 4 -o DIR` (round to nearest into a zeropoint
                directory, through transformers) against llama-quantize to Q4_0.
  eval          `zeropoint eval X.gguf --max-tokens N` (transformers, windows of 512) against
                `llama-perplexity -m X.gguf -f TEXT -c 512 --chunks N/512` on the same text;
                each tokenizes it itself, so the tokens are the same count of the same text.
  exercise      `zeropoint exercise --plot none` (no peer; target < 2 s).

    python benchmarks/bench_process.py [--runs 5] [--threads 2] [--models smollm2,gemma3]
                                       [--types all|Q4_0,Q4_K_M,...] [--rows requantize,help,...]

zeropoint is run as `python -m zeropoint.cli` with this checkout's src first on PYTHONPATH and
OMP_NUM_THREADS = --threads; llama.cpp's tools are scripts/build-llama-tools.sh's.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from zeropoint.gguf.llama_tools import tool_path  # noqa: E402
from zeropoint.gguf.mixes import MIXES, PURE_TYPES  # noqa: E402
from zeropoint.gguf.types import WRITABLE_TYPES  # noqa: E402

TIME = "/usr/bin/time"  # GNU time: the child's peak RSS (%M, KiB)
TIME_RATIO, RSS_RATIO = 1.0, 1.5  # issue 18: no slower than llama-quantize, at most 1.5x memory


@dataclass
class Run:
    seconds: float
    rss_bytes: int
    cpu_seconds: float  # user + system, all threads: what the job costs, whatever the load


def run_once(argv: list[str], env: dict, check: bool = True) -> Run:
    """Time argv from start to exit; its peak RSS as /usr/bin/time measures it. Not this
    process's wait4: a child started by vfork keeps the parent's high-water mark across exec."""
    # Output goes to a file: a pipe read only after exit would fill and stall the child.
    with tempfile.NamedTemporaryFile() as rss, tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%M %U %S", "-o", rss.name, *map(str, argv)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        if check and done.returncode != 0:
            log.seek(0)
            said = log.read().decode(errors="replace")
            raise RuntimeError(f"{' '.join(map(str, argv))} exited with {done.returncode}:\n"
                               f"{said[-2000:]}")
        kib, user, system = Path(rss.name).read_text().split()[-3:]
    return Run(seconds, int(kib) * 1024, float(user) + float(system))


@dataclass
class Row:
    name: str
    ours: list[Run] = field(default_factory=list)
    peer: list[Run] = field(default_factory=list)
    same_bytes: bool | None = None

    @staticmethod
    def median(runs: list[Run]) -> tuple[float, float, float]:
        return (statistics.median(r.seconds for r in runs),
                statistics.median(r.rss_bytes for r in runs) / 2**20,
                statistics.median(r.cpu_seconds for r in runs))


def alternate(row: Row, ours, peer, runs: int, cleanup, check=None) -> None:
    """ours() and peer() (each returning a Run), alternated, after one untimed warm-up each
    (page cache, compiled kernels), whose outputs check(), if given, compares; cleanup()
    between runs, untimed."""
    calls = [ours] + ([peer] if peer else [])
    for fn in calls:
        fn()
    if check is not None:
        check()
    cleanup()
    for r in range(runs):
        order = calls if r % 2 == 0 else calls[::-1]
        for fn in order:
            result = fn()
            (row.ours if fn is ours else row.peer).append(result)
            cleanup()


def zeropoint_argv(*args) -> list[str]:
    return [sys.executable, "-m", "zeropoint.cli", *map(str, args)]


def llama_type(target: str) -> tuple[list[str], str]:
    """llama-quantize's flags and type name for a zeropoint --type."""
    if target in PURE_TYPES:  # a single K type: its _M file type, every tensor pure
        return ["--pure"], f"{target}_M"
    return [], target


def requantize_targets(which: str) -> list[str]:
    every = [t for t, (_, base) in MIXES.items() if base in WRITABLE_TYPES]
    every += [t for t in PURE_TYPES if t in WRITABLE_TYPES]
    return every if which == "all" else which.split(",")


def print_row(row: Row, target: str = "") -> bool:
    t, m, c = Row.median(row.ours)
    if not row.peer:
        print(f"{row.name:<34}{t:>8.3f}{c:>7.2f}{m:>8.1f}{'':>8}{'':>7}{'':>8}{'':>8}{'':>8}"
              f"{'':>8}  {target}")
        return True
    pt, pm, pc = Row.median(row.peer)
    ok = t <= pt * TIME_RATIO and m <= pm * RSS_RATIO
    same = "" if row.same_bytes is None else ("same" if row.same_bytes else "DIFFER")
    print(f"{row.name:<34}{t:>8.3f}{c:>7.2f}{m:>8.1f}{pt:>8.3f}{pc:>7.2f}{pm:>8.1f}"
          f" {t / pt:>6.2f}x {c / pc:>6.2f}x {m / pm:>6.2f}x  "
          f"{target or ('met' if ok else 'NOT met')} {same}".rstrip())
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--types", default="all")
    parser.add_argument("--rows", default="requantize,help,quantize,eval,exercise")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    args = parser.parse_args()
    rows = args.rows.split(",")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "OMP_NUM_THREADS": str(args.threads)}
    # An installed zeropoint has its bytecode compiled (pip does it, as for numpy here); a
    # checkout run with PYTHONDONTWRITEBYTECODE (this sandbox sets it) compiled every module at
    # every start, ~40 ms the user never pays. The warm-up run compiles them into a cache
    # outside the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    pycache = tempfile.TemporaryDirectory(prefix="bench_process_pyc_")
    env["PYTHONPYCACHEPREFIX"] = pycache.name
    from zeropoint.models.source import default_model_path, gemma3_model_path

    models = {"smollm2": default_model_path, "gemma3": gemma3_model_path}
    quantize_tool = str(tool_path("llama-quantize"))
    print(f"whole processes, median of {args.runs} alternated runs after one warm-up each; "
          f"{args.threads} threads each; {platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'command':<34}{'zp s':>8}{'cpu s':>7}{'MiB':>8}{'peer s':>8}{'cpu s':>7}{'MiB':>8}"
          f"{'time':>8}{'cpu':>8}{'RSS':>8}  target (time and RSS)")
    met = True
    with tempfile.TemporaryDirectory(prefix="bench_process_") as tmp:
        work = Path(tmp)

        def cleanup():
            for p in work.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

        if "requantize" in rows:
            for model in args.models.split(","):
                src = models[model]()
                for target in requantize_targets(args.types):
                    row = Row(f"requantize {model} -> {target}")
                    flags, ltype = llama_type(target)
                    outs = {}

                    def ours(target=target, src=src):
                        outs["zp"] = work / "zp.gguf"
                        return run_once(zeropoint_argv("quantize", src, "--type", target, "-o",
                                                       outs["zp"], "--quiet"), env)

                    def peer(flags=flags, ltype=ltype, src=src):
                        outs["ll"] = work / "ll.gguf"
                        return run_once([quantize_tool, "--allow-requantize", *flags, str(src),
                                         str(outs["ll"]), ltype, str(args.threads)], env)

                    def check(row=row):
                        row.same_bytes = filecmp.cmp(work / "zp.gguf", work / "ll.gguf",
                                                     shallow=False)

                    alternate(row, ours, peer, args.runs, cleanup, check)
                    met &= print_row(row)
        smol = default_model_path()
        if "help" in rows:
            row = Row("zeropoint --help")
            alternate(row, lambda: run_once(zeropoint_argv("--help"), env), None, args.runs,
                      cleanup)
            print_row(row, "target < 0.3 s")
        if "quantize" in rows:
            row = Row("quantize --bits 4 vs Q4_0 (smollm2)")
            alternate(row, lambda: run_once(zeropoint_argv(
                          "quantize", smol, "--bits", "4", "-o", work / "zpdir", "--quiet"), env),
                      lambda: run_once([quantize_tool, "--allow-requantize", str(smol),
                                        str(work / "ll.gguf"), "Q4_0", str(args.threads)], env),
                      args.runs, cleanup)
            print_row(row, "(no target)")
        if "eval" in rows:
            from zeropoint.models.evaluate import default_text

            text = Path(tmp).parent / f"bench_process_text_{os.getpid()}.txt"
            text.write_text(default_text())
            chunks = args.eval_tokens // 512
            row = Row(f"eval {args.eval_tokens} tokens (smollm2)")
            try:
                alternate(row, lambda: run_once(zeropoint_argv(
                              "eval", smol, "--text", text, "--max-tokens", args.eval_tokens),
                              env),
                          lambda: run_once([str(tool_path("llama-perplexity")), "-m", str(smol),
                                            "-f", str(text), "-c", "512", "--chunks",
                                            str(chunks), "-t", str(args.threads), "-nr"], env),
                          args.runs, cleanup)
            finally:
                text.unlink()
            print_row(row, "(no target)")
        if "exercise" in rows:
            row = Row("exercise")
            alternate(row, lambda: run_once(zeropoint_argv("exercise", "--plot", "none"), env),
                      None, args.runs, cleanup)
            print_row(row, "target < 2 s")
    if "requantize" in rows:
        print(f"\nrequantize targets (time <= {TIME_RATIO:g}x llama-quantize, peak RSS <= "
              f"{RSS_RATIO:g}x): {'met on every row' if met else 'NOT met on every row'}")


if __name__ == "__main__":
    main()
