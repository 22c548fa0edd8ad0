"""GPTQ into a GGUF file: a loaded model (the default GGUF, or a Hugging Face llama checkpoint)
quantized layer by layer with GPTQ inside each tensor's ggml block layout, then written through
the same path as every other GGUF zeropoint writes (requantize.write_quantized).

1. The tensors are named and planned as the export does (export.gguf_name, mixes.plan_types):
   each gets the ggml type llama.cpp would give it, fallbacks included (Q3_K rows of 576 values
   become Q4_0).
2. The decoder's Linears go through sequential GPTQ (algorithms.sequential.run_sequential) onto
   their planned type's grid (gptq_grids); each Linear keeps its dequantized GPTQ weights, so
   later layers calibrate on what llama.cpp will compute.
3. Their bytes are written as they are; q/k rows are permuted into ggml's order afterwards, which
   is exact because GPTQ rounds every row on its own. Every other tensor (embeddings, norms) is
   quantized by the type's own quantizer, as a plain export would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..algorithms.gptq import GPTQOptions, InverseHessian, gptq_columns, inverse_hessian
from ..algorithms.sequential import MODEL_OPTIONS, peak_rss_bytes, run_sequential
from ..algorithms.solvers import SolveJob
from .blocks import dequantize_blocks
from .export import (
    check_architecture,
    export_metadata,
    extra_sources,
    gguf_name,
    hparams,
    model_params,
    tensor_transform,
)
from .families import Family, family_of_arch
from .gptq_grids import GPTQ_TYPES, block_grid
from .metadata import MetaValue
from .mixes import ModelParams, Target, parse_target, plan_types
from .reader import read_gguf
from .requantize import (
    Importance,
    QuantizeReport,
    SourceTensor,
    tensor_importance,
    write_quantized,
)
from .types import is_quantized

# With an importance matrix, the Hessian's correlations are shrunk halfway towards its diagonal
# (GPTQOptions.diagonal_shrink). Layer by layer on SmolLM2 (blk 3 and 15 ffn_down, Q4_0 on
# llama's weighted scales, 8,192 tokens of the calibration mix), GPTQ at no shrink halves the
# layer error under the calibration text's Hessian but has 1.08-1.30x weighted rounding's under
# a held-out text's (Wikipedia): the correlations it fits do not carry over, the diagonal does.
IMATRIX_SHRINK = 0.5


@dataclass
class GPTQGGUFReport:
    write: QuantizeReport  # the file: types, sizes, fallbacks
    gptq_tensors: int  # tensors whose bytes GPTQ wrote
    gptq_seconds: float  # the sequential GPTQ pass alone
    peak_rss_bytes: int


def gptq_gguf(
    loaded,
    out: str | os.PathLike,
    target: Target | str,
    calib_ids: torch.Tensor,
    options: GPTQOptions | None = None,
    *,
    progress: bool = False,
    threads: int | None = None,
    importance: Importance | None = None,
    extra_metadata: Mapping[str, MetaValue] | None = None,
    solver=None,
) -> GPTQGGUFReport:
    """Write `loaded` (models.load.LoadedModel of a llama-architecture causal LM: the default
    model, a .gguf or a checkpoint directory) as a GGUF file of `target`, its decoder Linears
    quantized by GPTQ calibrated on `calib_ids` (sequences, length). The model is changed in
    place (its Linears end up holding their dequantized GPTQ weights).

    options.act_order (default): columns by descending Hessian diagonal, each block's scales fitted up
    front from the original weights, so they are the very scales the type's own quantizer
    picks. Without it each block's scales are fitted from the weights GPTQ has updated, whose
    largest values the updates tend to grow: on SmolLM2 Q4_0 (calibrated on lee.cor, scored on
    lee_background) 37.8 without act-order, 34.9 with it, llama.cpp's own 37.6.
    `importance` (an importance matrix's lookup by GGUF name, requantize.Importance): the
    block scales are llama-quantize --imatrix's (gptq_grids.block_grid),
    the mixes take llama.cpp's imatrix rules, and the tensors GPTQ does not write are
    quantized weighted; `extra_metadata` as for requantize.write_quantized.
    `solver` (algorithms/solvers.py): where each Linear's GPTQ runs, here by default or as Ray
    tasks (RaySolver), the same bytes either way. `options` default: MODEL_OPTIONS, with
    diagonal_shrink IMATRIX_SHRINK given `importance`.
    Raises ValueError when the target gives a decoder Linear a type GPTQ cannot write
    (gptq_grids.GPTQ_TYPES), naming it.
    """
    target = parse_target(target) if isinstance(target, str) else target
    if options is None:
        options = MODEL_OPTIONS if importance is None else replace(
            MODEL_OPTIONS, diagonal_shrink=IMATRIX_SHRINK)
    metadata, params, hp = _metadata(loaded)
    family: Family = hp["family"]
    tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
    state = {n: t for n, t in loaded.model.state_dict().items()
             if not (tied and n == "lm_head.weight")}
    names = {n: g for n, g in ((n, gguf_name(n, family)) for n in state) if g is not None}
    plan = plan_types([(g, "F32", tuple(state[n].shape)) for n, g in names.items()], target,
                      params, has_imatrix=importance is not None)
    types = plan.types()  # gguf name -> ggml type
    _check_gptq_types(loaded.model, names, types)

    written: dict[str, tuple[str, torch.Tensor]] = {}  # gguf name -> (type, (out, row bytes))

    def solve(layer, prefix, members, H):
        by_type: dict[str, list[str]] = {}
        for member in members:
            qtype = types[gguf_name(f"{prefix}{member}.weight", family)]
            if is_quantized(qtype):
                by_type.setdefault(qtype, []).append(member)
        inverse = inverse_hessian(H, options) if by_type else None  # shared by the members
        jobs = []
        for qtype, batch in by_type.items():
            # One input, so one importance for the members (q, k, v; gate, up): the first's.
            imp = tensor_importance(importance, gguf_name(f"{prefix}{batch[0]}.weight", family),
                                    tuple(layer.get_submodule(batch[0]).weight.shape))
            for member in batch:
                lin = layer.get_submodule(member)
                name = gguf_name(f"{prefix}{member}.weight", family)

                def apply(rows, lin=lin, name=name, qtype=qtype):
                    w_hat = dequantize_blocks(rows.contiguous().view(-1), qtype, lin.weight.shape)
                    lin.weight.data.copy_(w_hat)
                    written[name] = (qtype, rows)

                jobs.append(SolveJob(name, gptq_block_rows, lin.weight.detach(), inverse,
                                     (qtype, imp, options), apply))
        return jobs

    started = time.perf_counter()
    run_sequential(loaded.model, calib_ids, solve, progress=progress, solver=solver)
    gptq_seconds = time.perf_counter() - started

    sources = []
    for hf_name, name in names.items():
        # Block rows permute as whole rows (every row is quantized alone); GPTQ only writes
        # Linears, which get no norm offset.
        change = tensor_transform(hf_name, name, hp)
        if name in written:
            qtype, rows = written[name]
            sources.append(SourceTensor(name, qtype, tuple(state[hf_name].shape),
                                        _reader(rows, change, raw=True)))
        else:
            sources.append(SourceTensor(name, "F32", tuple(state[hf_name].shape),
                                        _reader(state[hf_name], change, raw=False)))
    sources += _unmodelled_tensors(loaded, hp, {s.name for s in sources})
    report = write_quantized(sources, metadata, target, out, params=params,
                             source_name=str(loaded.source), progress=progress, threads=threads,
                             importance=importance, extra_metadata=extra_metadata)
    return GPTQGGUFReport(report, len(written), gptq_seconds, peak_rss_bytes())


def gptq_block_rows(weight: torch.Tensor, inverse: InverseHessian, qtype: str,
                    importance: np.ndarray | None, options: GPTQOptions) -> torch.Tensor:
    """A SolveJob's function: one Linear's GPTQ onto `qtype`'s blocks (with `importance`, onto
    llama-quantize --imatrix's block scales); its ggml bytes, (out, row bytes) uint8."""
    grid = block_grid(qtype, weight, importance)
    r = gptq_columns(weight.to(torch.float32), inverse, grid, options)
    return grid.pack(r.fits, r.codes)


def _reader(t: torch.Tensor, change, raw: bool):
    """A SourceTensor reader: `change` (export.tensor_transform: q/k rows into ggml's order,
    norm offsets) applied, as flat bytes; float tensors as float32."""

    def read() -> np.ndarray:
        x = t if raw else t.detach().to(torch.float32)
        if change is not None:
            x = change(x)
        return x.contiguous().view(-1).view(torch.uint8).numpy()

    return read


def _metadata(loaded):
    """(GGUF metadata, ModelParams, export hparams): the source file's own metadata for a .gguf
    model; the export's (config.json, tokenizer.json) for a checkpoint directory."""
    source = Path(loaded.source)
    family = check_architecture(loaded.config, source)
    hp = hparams(loaded.config, family)
    if source.is_file():
        metadata = read_gguf(source).metadata
        params = ModelParams.from_metadata(metadata)
        if family_of_arch(params.arch, f"{str(source)!r}").arch != family.arch:
            raise ValueError(f"{str(source)!r} is a {params.arch} file but transformers read it "
                             f"as {family.name}")
        return metadata, params, hp
    metadata = export_metadata(source, loaded.config, hp, None)
    return metadata, model_params(hp), hp


def _unmodelled_tensors(loaded, hp: dict, have: set[str]) -> list[SourceTensor]:
    """Tensors llama.cpp needs that the torch model does not hold (Llama 3.1's rope_freqs): the
    source file's own bytes for a .gguf model, the export's for a checkpoint directory."""
    source = Path(loaded.source)
    if not source.is_file():
        return [s for s in extra_sources(hp) if s.name not in have]
    f = read_gguf(source)
    return [SourceTensor(t.name, t.type, tuple(t.shape), lambda t=t: np.array(f.raw(t)))
            for t in f.tensors if t.name not in have and t.name != "output.weight"]


def _check_gptq_types(model: torch.nn.Module, names: dict[str, str], types: dict[str, str]):
    """Every decoder Linear's planned type must have a GPTQ grid; say which do not."""
    bad: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        name = names.get(f"{module_name}.weight")
        if (isinstance(module, torch.nn.Linear) and name is not None and name.startswith("blk.")
                and is_quantized(types[name]) and types[name] not in GPTQ_TYPES):
            bad.setdefault(types[name], []).append(name)
    if bad:
        detail = "; ".join(f"{t} for {len(n)} tensor(s), e.g. {n[0]}" for t, n in bad.items())
        raise ValueError(f"GPTQ cannot write {', '.join(bad)} yet ({detail}); GPTQ writes "
                         f"{', '.join(GPTQ_TYPES)}: use a target whose decoder tensors get those")

