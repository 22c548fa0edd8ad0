"""Issue 14's accuracy race: llama.cpp with and without an importance matrix against zeropoint's
methods, per model and ggml type, by the KL-divergence of each file's next-token distributions
from the source model's on held-out text, at equal file size.

Rows (methods), each a GGUF file quantized from the model's source GGUF:
- llama:            llama-quantize (no imatrix)
- llama-imatrix:    llama-imatrix on the calibration text, then llama-quantize --imatrix
- zp-rtn:           zeropoint quantize --method rtn (bytes as llama-quantize's)
- zp-hqq:           zeropoint quantize --method hqq
- zp-rtn-imatrix:   zeropoint imatrix on the same text, then zeropoint quantize --imatrix
- zp-gptq:          zeropoint quantize --method gptq
- zp-gptq-imatrix:  GPTQ onto llama's importance-weighted block scales (zeropoint's imatrix),
                    the Hessian shrunk towards its diagonal by gptq_gguf's default; a suffix
                    @S (zp-gptq-imatrix@0) passes --diagonal-shrink S

Calibration: the first --calib-tokens tokens of zeropoint's default mix
(calibrate.texts.default_calibration_text) for both imatrix tools (windows of 512, llama-imatrix
--chunks N/512, zeropoint imatrix --calib-tokens N), and the same count for GPTQ (N/512 windows
of 512 spread evenly over the mix: the mix deals its kinds out in turn, so both samples hold
them in equal shares). Scoring: models.evaluate.wikipedia_text() (held out; not in the mix),
--chunks windows of --window tokens, llama-perplexity's protocol (eval --kld --engine
llama.cpp), the source's distributions computed once per model (--save-base).

Measured 2026-12-03 on the shared 2-core sandbox (load 7-15), SmolLM2 Q4_0, 32,768 calibration
tokens, --imatrix-from llama: llama.cpp 0.3292 ± 0.0052 (PPL 28.43), llama.cpp --imatrix
0.2005 ± 0.0034 (25.10), zeropoint GPTQ --imatrix (diagonal shrink 0.5) 0.1425 ± 0.0028
(24.34), 87.64 MiB both; the GPTQ pass took 39 minutes under that load.

Everything is cached under --work (files, imatrices, one JSON per row): rerunning skips what is
done, so a long run can be stopped and resumed. It runs on 2 cores for hours; run it in the
background:

    PYTHONPATH=src nohup .venv/bin/python benchmarks/bench_imatrix_race.py --work race \
        --models smollm2 --types Q4_0 Q4_K_M > race.log 2>&1 &
    .venv/bin/python benchmarks/bench_imatrix_race.py --work race --report-only --json race.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from zeropoint.gguf.llama_tools import run_tool

METHODS = ("llama", "llama-imatrix", "zp-rtn", "zp-hqq", "zp-rtn-imatrix", "zp-gptq",
           "zp-gptq-imatrix")
DEFAULT_METHODS = ("llama", "llama-imatrix", "zp-gptq-imatrix")
WINDOW = 512


def model_path(name: str) -> Path:
    from zeropoint.models.source import default_model_path, gemma3_model_path

    return {"smollm2": default_model_path, "gemma3": gemma3_model_path}[name]()


def zeropoint(*args) -> float:
    """Run the zeropoint CLI in a fresh process (each GPTQ run frees its model); seconds taken."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "zeropoint.cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"zeropoint {' '.join(map(str, args[:3]))} failed:\n{tail}")
    return time.perf_counter() - started


class Race:
    def __init__(self, work: Path, calib_tokens: int, chunks: int, threads: int,
                 imatrix_from: str = "zeropoint"):
        self.work, self.calib_tokens, self.chunks = work, calib_tokens, chunks
        self.imatrix_from = imatrix_from
        self.threads = str(threads)
        work.mkdir(parents=True, exist_ok=True)
        self.calib = work / "calibration-mix.txt"
        self.text = work / "wikipedia.txt"
        if not self.calib.exists():
            from zeropoint.calibrate.texts import default_calibration_text

            self.calib.write_text(default_calibration_text(), encoding="utf-8")
        if not self.text.exists():
            from zeropoint.models.evaluate import wikipedia_text

            self.text.write_text(wikipedia_text(), encoding="utf-8")

    def folder(self, model: str) -> Path:
        d = self.work / model
        d.mkdir(exist_ok=True)
        return d

    def base_logits(self, model: str) -> Path:
        path = self.folder(model) / "base.kld"
        if not path.exists():
            zeropoint("eval", model_path(model), "--kld", "--engine", "llama.cpp", "--text",
                      self.text, "--window", WINDOW, "--chunks", self.chunks, "--save-base",
                      path)
        return path

    def llama_imatrix(self, model: str) -> Path:
        path = self.folder(model) / "imatrix-llama.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp.gguf")
            run_tool("llama-imatrix", "-m", model_path(model), "-f", self.calib, "-c", WINDOW,
                     "-b", WINDOW, "--chunks", self.calib_tokens // WINDOW, "-t", self.threads,
                     "-o", tmp)
            tmp.rename(path)
        return path

    def zp_imatrix(self, model: str) -> Path:
        path = self.folder(model) / "imatrix-zeropoint.gguf"
        if not path.exists():
            zeropoint("imatrix", model_path(model), "--calib", self.calib, "--calib-tokens",
                      self.calib_tokens, "--ctx", WINDOW, "-o", path, "--quiet")
        return path

    def quantize(self, model: str, method: str, qtype: str, out: Path) -> None:
        src = model_path(model)
        if method in ("llama", "llama-imatrix"):
            imatrix = ["--imatrix", self.llama_imatrix(model)] if method == "llama-imatrix" else []
            run_tool("llama-quantize", "--allow-requantize", *imatrix, src, out, qtype,
                     self.threads)
            return
        args = ["quantize", src, "--type", qtype, "-o", out, "--quiet", "--force"]
        method, _, shrink = method.partition("@")
        if shrink:
            args += ["--diagonal-shrink", shrink]
        zp_method = method.split("-")[1]
        args += ["--method", zp_method]
        if zp_method == "gptq":
            args += ["--calib", self.calib, "--calib-tokens", self.calib_tokens]
        if method.endswith("-imatrix"):
            use_llamas = self.imatrix_from == "llama"
            args += ["--imatrix", self.llama_imatrix(model) if use_llamas else
                     self.zp_imatrix(model)]
        zeropoint(*args)

    def row(self, model: str, method: str, qtype: str) -> dict:
        folder = self.folder(model)
        result = folder / f"{method}_{qtype}.json"  # the imatrix's maker is in the row
        if result.exists():
            return json.loads(result.read_text())
        out = folder / f"{method}_{qtype}.gguf"
        started = time.perf_counter()
        if not out.exists():
            tmp = out.with_suffix(".tmp.gguf")
            self.quantize(model, method, qtype, tmp)
            tmp.rename(out)
        seconds = time.perf_counter() - started
        stats = folder / f"{method}_{qtype}.kld.json"
        zeropoint("eval", out, "--kld", "--engine", "llama.cpp", "--text", self.text,
                  "--window", WINDOW, "--base-logits", self.base_logits(model), "--json", stats)
        s = json.loads(stats.read_text())
        row = {"model": model, "method": method, "type": qtype,
               "kld": s["kld"]["value"], "kld_pm": s["kld"]["uncertainty"],
               "same_top": s["same_top"]["value"], "same_top_pm": s["same_top"]["uncertainty"],
               "ppl": s["perplexity"]["value"], "ppl_pm": s["perplexity"]["uncertainty"],
               "ppl_base": s["perplexity_base"]["value"],
               "mib": out.stat().st_size / 2**20, "quantize_seconds": round(seconds, 1),
               "calib_tokens": self.calib_tokens, "chunks": s["chunks"], "window": s["window"],
               "imatrix": None if "imatrix" not in method else
               "llama" if method.startswith("llama") else self.imatrix_from}
        result.write_text(json.dumps(row, indent=1))
        out.unlink()  # the figures are kept; the files are large (rerun to remake them)
        return row


def print_table(rows: list[dict]) -> None:
    print(f"{'model':8} {'type':7} {'method':16} {'mean KLD':>17} {'same top %':>13} "
          f"{'PPL':>14} {'MiB':>7}")
    for r in rows:
        print(f"{r['model']:8} {r['type']:7} {r['method']:16} {r['kld']:8.4f} ± {r['kld_pm']:.4f}"
              f" {100 * r['same_top']:6.2f} ± {100 * r['same_top_pm']:.2f} "
              f"{r['ppl']:7.2f} ± {r['ppl_pm']:.2f} {r['mib']:7.2f}")


def markdown_table(rows: list[dict]) -> str:
    """The rows as the README's table: per type, llama.cpp plain / imatrix / zeropoint."""
    names = {"llama": "llama.cpp", "llama-imatrix": "llama.cpp --imatrix"}
    lines = ["| model | type | method | mean KLD | same top % | perplexity | MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['type']} | {names.get(r['method'], r['method'])} | "
                     f"{r['kld']:.4f} ± {r['kld_pm']:.4f} | {100 * r['same_top']:.2f} | "
                     f"{r['ppl']:.2f} | {r['mib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="cache folder (resumable)")
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"],
                   choices=["smollm2", "gemma3"])
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"of {', '.join(METHODS)} (default: %(default)s)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--chunks", type=int, default=24, help="scored windows of 512 tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--imatrix-from", choices=["zeropoint", "llama"], default="zeropoint",
                   help="whose importance matrix zeropoint's rows use (the same text either way; "
                        "llama: the very matrix llama-quantize gets, so only the method differs)")
    p.add_argument("--report-only", action="store_true", help="print the cached rows only")
    p.add_argument("--json", type=Path, help="write every row as JSON")
    p.add_argument("--markdown", action="store_true", help="also print the rows as a table")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m.partition("@")[0] not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; accepted: {', '.join(METHODS)} (gptq ones +@S)")
    race = Race(args.work, args.calib_tokens, args.chunks, args.threads, args.imatrix_from)
    rows = []
    for model in args.models:
        for qtype in args.types:
            for method in args.methods:
                cached = race.folder(model) / f"{method}_{qtype}.json"
                if args.report_only:
                    if cached.exists():
                        rows.append(json.loads(cached.read_text()))
                    continue
                try:
                    rows.append(race.row(model, method, qtype))
                except RuntimeError as e:
                    print(f"{model} {qtype} {method}: {e}", flush=True)
                    continue
                r = rows[-1]
                print(f"{model} {qtype} {method}: KLD {r['kld']:.4f} ± {r['kld_pm']:.4f}, "
                      f"PPL {r['ppl']:.2f}, {r['mib']:.2f} MiB ({r['quantize_seconds']} s)",
                      flush=True)
    print(f"\nmean KLD against the source GGUF on wikipedia_text(), {args.chunks} x {WINDOW} "
          f"tokens; calibration: {args.calib_tokens} tokens of the default mix; zeropoint's rows "
          f"use {args.imatrix_from}'s importance matrix")
    print_table(rows)
    if args.markdown:
        print("\n" + markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
