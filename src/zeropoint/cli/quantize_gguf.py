"""`zeropoint quantize [MODEL] --type T -o out.gguf`: a GGUF file in ggml block formats.

MODEL is a .gguf file (requantized), a Hugging Face checkpoint directory (exported), or nothing
(the default SmolLM2 GGUF); T is a llama.cpp mix (Q4_K_M, Q8_0, ...), a single type (Q4_K), or a
recipe .json (see gguf.mixes). It prints the tensors per type, the file size, bits per weight and
every shape fallback, and with --eval the perplexity under llama.cpp before and after.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .calibration import gptq_calibration, gptq_solver
from .common import CommandError, mib, read_text, threads


def run(args, source) -> None:
    """args: quantize's, checked and with defaults; source: the models.ModelSource of MODEL."""
    if source.is_gguf and args.method == "rtn" and not args.eval:
        # numpy's OpenBLAS starts a thread per core on import, which this job (C kernels, no
        # BLAS) never uses: one thread is 0.03 s less start-up, and no thread to schedule.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..gguf.mixes import parse_target

    out = Path(args.output)
    if out.is_dir():
        raise CommandError(f"output {str(out)!r} is a directory; GGUF output is one file "
                           "(-o x.gguf)")
    if out.exists() and not args.force:
        raise CommandError(f"output {str(out)!r} already exists; pass --force to replace it")
    try:
        target = parse_target(args.type)
    except ValueError as e:
        raise CommandError(str(e)) from None
    src = source.path
    if out.exists() and out.resolve() == src.resolve():
        raise CommandError(f"output {str(out)!r} is the input file; write to another path")
    text = read_text(args.text) if args.eval else None
    try:
        report = _write(args, source, out, target)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.quiet:
        return
    print(f"\nwrote {out} from {src} in {report.seconds:.1f} s: {target.describe()}")
    if args.method == "hqq":
        from ..algorithms.sequential import peak_rss_bytes

        print(f"hqq: peak memory (VmHWM) {mib(peak_rss_bytes())}")
    print(report.table())
    falls = report.fallbacks
    if falls:
        print(f"\n{len(falls)} fallback(s), as llama.cpp makes them: the chosen type's blocks do "
              "not tile these rows")
        for line in fallback_lines(falls):
            print(f"  {line}")
    else:
        print("\nno fallbacks")
    if text is not None:
        _print_perplexities([src, out] if source.is_gguf else [out], text, args.max_tokens)


def _write(args, source, out: Path, target):
    """The QuantizeReport of writing `out` from `source` by args.method. A GGUF source by RTN
    imports no torch (gguf.requantize); the other ways import it."""
    from ..models.to_gguf import write_gguf

    shapes = []

    def calibration(loaded):
        ids = gptq_calibration(args, loaded)
        shapes.append(tuple(ids.shape))
        return ids

    with gptq_solver(args) as solver:
        report = write_gguf(source, out, target, args.method, progress=not args.quiet,
                            threads=threads(), calibration=calibration, solver=solver,
                            gptq_options=_gptq_options(args), **_importance(args))
    if args.method != "gptq":
        return report
    report, gptq = report
    if not args.quiet:
        sequences, length = shapes[0]
        print(f"gptq: {gptq.gptq_tensors} tensors, {sequences} x {length} calibration tokens, "
              f"{gptq.gptq_seconds:.1f} s, peak memory (VmHWM) {mib(gptq.peak_rss_bytes)}")
    return report


def _gptq_options(args):
    """GPTQ's options with --diagonal-shrink; None (gptq_gguf's default) without it."""
    shrink = getattr(args, "diagonal_shrink", None)
    if shrink is None:
        return None
    from dataclasses import replace

    from ..algorithms.sequential import MODEL_OPTIONS

    if not 0.0 <= shrink <= 1.0:
        raise CommandError(f"--diagonal-shrink must be in 0..1, got {shrink}")
    return replace(MODEL_OPTIONS, diagonal_shrink=shrink)


def _importance(args) -> dict:
    """With --imatrix FILE: write_gguf's `importance` (the file's per-tensor lookup) and
    `extra_metadata` (the keys llama-quantize records about it); else nothing."""
    if getattr(args, "imatrix", None) is None:
        return {}
    from ..gguf.imatrix import read_imatrix
    from ..gguf.weighted import imatrix_metadata

    try:
        imatrix = read_imatrix(args.imatrix)
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    if not args.quiet:
        print(f"importance matrix {args.imatrix}: {len(imatrix)} entries")
    return {"importance": imatrix.importance,
            "extra_metadata": imatrix_metadata(args.imatrix, imatrix)}


def _print_perplexities(paths, text: str, max_tokens: int) -> None:
    from ..gguf.llama_cpp import llama_cpp_perplexity

    try:
        rows = [(str(p), llama_cpp_perplexity(p, text, max_tokens=max_tokens, threads=threads()))
                for p in paths]
    except ValueError as e:
        raise CommandError(str(e)) from None
    print("\nperplexity with llama.cpp")
    for name, r in rows:
        print(f"  {r.perplexity:9.3f}  over {r.tokens} tokens  {name}")


def fallback_lines(fallbacks) -> list[str]:
    """Every fallback, grouped: 'Q4_K -> Q5_0 (rows of 576): blk.{0-29}.attn_q.weight (30)'."""
    groups: dict[tuple, dict[str, list[int]]] = {}
    for c in fallbacks:
        key = (c.wanted, c.type, c.shape[-1])
        m = re.match(r"blk\.(\d+)\.(.*)", c.name)
        stem, layer = (m.group(2), int(m.group(1))) if m else (c.name, None)
        groups.setdefault(key, {}).setdefault(stem, []).append(layer)
    lines = []
    for (wanted, chosen, cols), stems in groups.items():
        names = []
        for stem, layers in stems.items():
            if layers == [None]:
                names.append(stem)
            else:
                names.append(f"blk.{{{_ranges(sorted(set(layers)))}}}.{stem} ({len(layers)})")
        lines.append(f"{wanted} -> {chosen} (rows of {cols}): {', '.join(names)}")
    return lines


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
