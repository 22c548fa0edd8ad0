"""The main job's table (`zeropoint quantize ... --eval`, benchmarks/bench_main_job.py): the
float model, zeropoint's output and llama.cpp's Q4_K_M of the same source, side by side.

Per row: weight bytes (tensor bytes only: no GGUF header or vocabulary, no safetensors header;
a tied table once) and bits per weight over every weight; perplexity on the same text in torch
(GGUF files dequantized by transformers), so the rows differ only by their weights; decode
tokens/s at batch 1 as `zeropoint generate` runs each (the compact decoder for float and
zeropoint's output, llama.cpp through llama-cpp-python for the GGUF file), the same prompt and
number of tokens, greedy, the runs of the rows alternated, the median of `repeat`.
The Q4_K_M file is written by zeropoint's own GGUF writer (models.to_gguf.write_gguf), which
makes llama-quantize's bytes.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT = "The history of the city begins"
PEER_TYPE = "Q4_K_M"


@dataclass
class JobRow:
    label: str
    weight_bytes: int
    weights: int
    perplexity: float | None = None
    tokens_per_s: float | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / max(1, self.weights)


def gguf_weights(path) -> tuple[int, int]:
    """(tensor bytes, weights) of a GGUF file."""
    from ..gguf.reader import read_gguf

    f = read_gguf(path)
    return sum(t.nbytes for t in f.tensors), sum(t.n_elements for t in f.tensors)


def decode_seconds(decoders, prompt: list[int], tokens: int, repeat: int) -> list[float]:
    """Median seconds to decode `tokens` greedy tokens after `prompt`, per decoder; one
    untimed warm-up each, then the decoders' runs alternated `repeat` times."""
    from statistics import median

    from ..nn.generate import Sampler, stream_tokens

    def run(decoder) -> float:
        started = time.perf_counter()
        for _ in stream_tokens(decoder, prompt, tokens, Sampler()):
            pass
        return time.perf_counter() - started

    for d in decoders:
        run(d)
    times = [[] for _ in decoders]
    for _ in range(repeat):
        for i, d in enumerate(decoders):
            times[i].append(run(d))
    return [median(t) for t in times]


def main_job_rows(source, quantized_dir, text: str, max_tokens: int, *, gen_tokens: int = 32,
                  repeat: int = 3, threads: int | None = None) -> list[JobRow]:
    """Rows for float (`source`, a models.ModelSource), zeropoint's output (`quantized_dir`) and
    llama.cpp's Q4_K_M of `source` (when it is a GGUF file or a checkpoint that exports)."""
    from ..gguf.llama_cpp import LlamaCppDecoder
    from ..gguf.mixes import parse_target
    from ..modeldir.format import read_manifest
    from ..nn.generate import TorchDecoder
    from ..nn.quantize_model import model_bytes
    from .evaluate import perplexity
    from .load import load_model
    from .quantized import load_quantized
    from .to_gguf import write_gguf

    threads = threads or min(2, os.cpu_count() or 1)
    fl = load_model(source.path, progress=False)
    nbytes, params = model_bytes(fl.model)
    rows = [JobRow("float32", nbytes, params,
                   perplexity(fl.model, fl.tokenizer, text, max_tokens=max_tokens).perplexity)]
    manifest = read_manifest(quantized_dir)
    zp = load_quantized(quantized_dir)
    rows.append(JobRow("zeropoint (this output)", manifest.total_bytes,
                       manifest.quantized_params + manifest.kept_params,
                       perplexity(zp.model, zp.tokenizer, text, max_tokens=max_tokens).perplexity))
    decoders = [TorchDecoder(fl.model), TorchDecoder(zp.model)]
    with tempfile.TemporaryDirectory(prefix="zeropoint-peer-") as tmp:
        peer = Path(tmp) / f"peer-{PEER_TYPE}.gguf"
        try:
            write_gguf(source, peer, parse_target(PEER_TYPE), "rtn", threads=threads)
        except ValueError as e:  # a model the GGUF export does not take: a row saying why
            rows.append(JobRow(f"llama.cpp {PEER_TYPE}: not made ({e})", 0, 0))
            peer = None
        if peer is not None:
            nbytes, params = gguf_weights(peer)
            loaded = load_model(peer, progress=False)
            rows.append(JobRow(f"llama.cpp {PEER_TYPE}", nbytes, params, perplexity(
                loaded.model, loaded.tokenizer, text, max_tokens=max_tokens).perplexity))
            del loaded
            decoders.append(LlamaCppDecoder(peer, n_ctx=256, threads=threads))
        prompt = zp.tokenizer(PROMPT)["input_ids"]
        seconds = decode_seconds(decoders, prompt, gen_tokens, repeat)
        del decoders
    for row, s in zip([r for r in rows if r.weights], seconds):
        row.tokens_per_s = gen_tokens / s
    return rows


def format_rows(rows: list[JobRow], tokens: int | None = None) -> str:
    """The table as text; the last column is tokens/s against llama.cpp's row."""
    peer = rows[-1].tokens_per_s
    lines = [f"{'':<26}{'weights':>12}{'bits/w':>8}{'perplexity':>12}{'tokens/s':>10}"
             f"{'x peer':>8}"]
    for r in rows:
        if not r.weights:
            lines.append(r.label)
            continue
        ppl = f"{r.perplexity:12.3f}" if r.perplexity is not None else f"{'-':>12}"
        speed = (f"{r.tokens_per_s:10.1f}{r.tokens_per_s / peer:8.2f}"
                 if r.tokens_per_s and peer else f"{'-':>10}{'-':>8}")
        lines.append(f"{r.label:<26}{r.weight_bytes / 2**20:>8.1f} MiB{r.bits_per_weight:>8.2f}"
                     f"{ppl}{speed}")
    return "\n".join(lines)
