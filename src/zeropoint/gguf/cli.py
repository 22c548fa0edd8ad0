"""`zeropoint quantize ... --type T -o out.gguf` and `zeropoint eval out.gguf --engine llama.cpp`.

quantize_gguf: MODEL is a .gguf file (requantized), a Hugging Face checkpoint directory
(exported), or nothing (the default SmolLM2 GGUF); T is a llama.cpp mix (Q4_K_M, Q8_0, ...), a
single type (Q4_K), or a recipe .json (see mixes). It prints the tensors per type, the file size,
bits per weight and every shape fallback.

eval_gguf: perplexity with llama.cpp's own logits and tokenizer, by models.evaluate.perplexity's
protocol (first max_tokens tokens, independent windows, first token of each window unscored),
and a short greedy generation.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..model_commands import DEFAULT_MODEL, CommandError, _read_text

DEFAULT_PROMPT = "The three primary colors are"


def _threads() -> int:
    import torch

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _source(model: str | None) -> tuple[str, Path]:
    """('gguf' | 'hf', path) for MODEL; CommandError for anything else."""
    from ..modeldir.format import is_zeropoint_dir
    from ..models.load import ModelLoadError, default_model_path

    if model in (None, DEFAULT_MODEL):
        try:
            return "gguf", default_model_path()
        except ModelLoadError as e:
            raise CommandError(str(e)) from None
    p = Path(model)
    if not p.exists():
        raise CommandError(f"model path {model!r} does not exist; accepted: a .gguf file, a "
                           "Hugging Face checkpoint directory, or nothing for the default model")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CommandError(f"{model!r} is not a .gguf file; accepted: a .gguf file, a Hugging "
                               "Face checkpoint directory, or nothing for the default model")
        return "gguf", p
    if is_zeropoint_dir(p):
        raise CommandError(f"{model!r} is a zeropoint directory; GGUF output starts from a float "
                           "checkpoint or a GGUF file")
    if not (p / "config.json").is_file():
        raise CommandError(f"directory {model!r} has no config.json: not a Hugging Face checkpoint")
    return "hf", p


def quantize_gguf(args) -> None:
    from .export import export_hf
    from .mixes import parse_target
    from .requantize import requantize

    for flag, what in (("recipe", "--recipe"), ("budget_bpw", "--budget-bpw"),
                       ("activations", "--activations")):
        if getattr(args, flag, None):
            raise CommandError(f"{what} is for zeropoint directories, not GGUF output; for "
                               "per-tensor GGUF types pass a recipe .json as --type")
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
    kind, src = _source(args.model)
    if out.exists() and out.resolve() == src.resolve():
        raise CommandError(f"output {str(out)!r} is the input file; write to another path")
    text = _read_text(getattr(args, "text", None)) if getattr(args, "eval", False) else None
    try:
        method = getattr(args, "method", "rtn")
        if method == "gptq":
            from .gptq import gptq_gguf_command

            report = gptq_gguf_command(args, src, target)
        else:
            encoder = None
            if method == "hqq":
                from .hqq import hqq_encode as encoder
            if kind == "gguf":
                report = requantize(src, out, target, progress=not args.quiet, encoder=encoder)
            else:
                report = export_hf(src, out, target, progress=not args.quiet, threads=_threads(),
                                   encoder=encoder)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.quiet:
        return
    print(f"\nwrote {out} from {src} in {report.seconds:.1f} s: {target.describe()}")
    if method == "hqq":
        from ..algorithms.sequential import peak_rss_bytes

        print(f"hqq: peak memory (VmHWM) {peak_rss_bytes() / 2**20:,.1f} MiB")
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
        scored = [src, out] if kind == "gguf" else [out]
        try:
            rows = [(str(p), llama_cpp_perplexity(p, text, max_tokens=args.max_tokens,
                                                  threads=_threads())) for p in scored]
        except ValueError as e:
            raise CommandError(str(e)) from None
        print("\nperplexity with llama.cpp")
        for name, r in rows:
            print(f"  {r.perplexity:9.3f}  over {r.tokens} tokens  {name}")


def fallback_lines(fallbacks) -> list[str]:
    """Every fallback, grouped: 'Q4_K -> Q5_0 (rows of 576): blk.{0-29}.attn_q.weight (30)'."""
    import re

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


# --- llama.cpp evaluation -----------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCppPerplexity:
    perplexity: float
    nll: float
    tokens: int  # predicted (scored) tokens


def _amx_cpu() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextmanager
def _extra_buffers(enabled: bool):
    """llama-cpp-python's Llama() has no switch for llama.cpp's extra weight buffers (AMX tiles,
    repacked layouts); this sets the model-params default it starts from while inside."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = enabled
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = original


def open_llama(path, n_ctx: int = 512, threads: int = 2, logits_all: bool = True):
    """llama_cpp.Llama for the GGUF file at `path`, quiet. ValueError for a bad file.

    On CPUs with AMX, llama.cpp's AMX matmul (one of its extra buffer types) segfaulted on every
    quantized model on the machine zeropoint was built on (a sandbox that does not grant AMX tile
    state), so extra buffers are off there unless ZEROPOINT_LLAMA_EXTRA_BUFFERS=1. Plain ggml
    kernels compute the same dot products, a little slower.
    """
    from llama_cpp import Llama

    from .reader import read_gguf

    path = Path(path)
    read_gguf(path)  # a clear error for a bad file, before llama.cpp's terse one
    env = os.environ.get("ZEROPOINT_LLAMA_EXTRA_BUFFERS")
    extra = env == "1" if env in ("0", "1") else not _amx_cpu()
    try:
        with _extra_buffers(extra):
            return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                         n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                         verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"llama.cpp cannot load {str(path)!r}: {e}") from None


def _open_llama(path, n_ctx: int, threads: int, logits_all: bool):
    try:
        return open_llama(path, n_ctx, threads, logits_all)
    except ValueError as e:
        raise CommandError(str(e)) from None


def llama_cpp_perplexity(
    path, text: str, window: int = 512, max_tokens: int = 2048, threads: int = 2, llm=None
) -> LlamaCppPerplexity:
    """Perplexity of the GGUF model at `path` under llama.cpp, by models.evaluate.perplexity's
    protocol, with llama.cpp's tokenizer (no BOS) and logits."""
    import torch
    import torch.nn.functional as F

    if window < 2 or max_tokens < 2:
        raise ValueError(f"window and max_tokens must be at least 2, got {window}, {max_tokens}")
    llm = llm or open_llama(path, window, threads, logits_all=True)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} token(s); perplexity needs at least 2")
    total, predicted = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(llm.scores[: len(chunk) - 1].copy()).float()  # (n - 1, vocab)
        total += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        predicted += len(chunk) - 1
    nll = total / predicted
    return LlamaCppPerplexity(math.exp(nll), nll, predicted)


def llama_cpp_generate(llm, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16) -> str:
    """Greedy continuation of `prompt` by llama.cpp."""
    out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def gguf_size(path) -> tuple[int, float]:
    """(file bytes, bits per weight: tensor bytes * 8 / weights, llama.cpp's figure)."""
    from .reader import read_gguf

    f = read_gguf(path)
    return f.file_size, 8 * sum(t.nbytes for t in f.tensors) / sum(t.n_elements for t in f.tensors)


def eval_gguf(args) -> None:
    if getattr(args, "quantized", None):
        raise CommandError("eval --engine llama.cpp scores one GGUF file; give it alone")
    kind, path = _source(args.model)
    if kind != "gguf":
        raise CommandError(f"eval --engine llama.cpp needs a .gguf file, got directory "
                           f"{args.model!r}; write one with: zeropoint quantize MODEL --type F32 "
                           "-o model.gguf")
    text = _read_text(args.text)
    try:
        nbytes, bpw = gguf_size(path)
    except ValueError as e:
        raise CommandError(str(e)) from None
    threads = _threads()
    llm = _open_llama(path, max(2, args.window), threads, logits_all=True)
    try:
        r = llama_cpp_perplexity(path, text, window=args.window, max_tokens=args.max_tokens,
                                 threads=threads, llm=llm)
        sample = llama_cpp_generate(llm)
    except ValueError as e:
        raise CommandError(str(e)) from None
    finally:
        llm.close()
    print(f"{path}: perplexity {r.perplexity:.3f} over {r.tokens} tokens (llama.cpp); "
          f"{bpw:.3f} bits/weight, {nbytes / 2**20:,.1f} MiB")
    print(f"sample: {DEFAULT_PROMPT}{sample}")
    if args.json:
        from ..atomic import atomic_path

        payload = {
            "model": str(path), "engine": "llama.cpp", "perplexity": r.perplexity, "nll": r.nll,
            "tokens": r.tokens, "window": args.window, "max_tokens": args.max_tokens,
            "bits_per_weight": bpw, "bytes": nbytes, "prompt": DEFAULT_PROMPT, "sample": sample,
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
