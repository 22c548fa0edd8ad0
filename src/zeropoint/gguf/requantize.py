"""GGUF -> GGUF in other ggml types, the way llama.cpp's llama_model_quantize does it.

Each tensor is read, dequantized to float32 a few rows at a time, and quantized to the type
`mixes.plan_types` chose for it, by the numpy codecs of codecs.py (between two legacy types both
steps are one pass in C, `codecs.transcode`, whose floats never leave L1); a tensor already in its
chosen type is copied as is, and tensors that are not 2-D weights (norms) are kept. This path
imports neither torch nor gguf-py: a GGUF-to-GGUF requantization is numpy and the C kernels.
torch comes in only for an `encoder` (HQQ's) or where the C kernels are missing (gguf.blocks'
torch code).
Metadata and tokenizer are copied; as in llama.cpp, `general.quantization_version` and
`general.file_type` are set (and moved last) and split keys are dropped, and the tensors are
written in llama.cpp's order. For the legacy types the result is the same file as llama.cpp's,
byte for byte.

`write_quantized` is the shared back half: `export.py` feeds it float tensors from a Hugging Face
checkpoint instead of a GGUF file.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import ckernels
from ..threads import torch_threads
from . import codecs
from .constants import GGML_QUANT_VERSION
from .layout import tensor_nbytes
from .metadata import Metadata, MetaValue
from .mixes import NEED_IMATRIX, ModelParams, Plan, Target, needs_imatrix, parse_target, plan_types
from .reader import GGUFFile, read_gguf
from .types import WRITABLE_TYPES
from .weighted import IGNORES_IMPORTANCE, check_importance, weighted_encoder
from .writer import FileRange, TensorData, write_gguf

if TYPE_CHECKING:
    import torch

QUANTIZATION_VERSION_KEY = "general.quantization_version"
FILE_TYPE_KEY = "general.file_type"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_CHUNK_VALUES = 1 << 18  # 1 MiB of float32 rows per step of `convert`: they stay in L2 cache
_TRANSCODE_VALUES = 1 << 20  # values per step when no float32 rows are made (at most 1 MiB out)


# float32 rows (rows, n), ggml type, tensor name -> flat uint8 bytes (`quantize_tensor` is the
# default)
Encoder = Callable[["torch.Tensor", str, str], np.ndarray]
# GGUF tensor name -> its importance (float32, one per column) or None: an importance matrix's
# lookup, e.g. gguf.imatrix.ImportanceMatrix.importance
Importance = Callable[[str], "np.ndarray | None"]


@dataclass
class SourceTensor:
    """A tensor to convert: its name, ggml type, torch-order shape, and a reader of its bytes;
    from a file, also where its bytes lie (copied there by the kernel if its type stays) and a
    function that lets go of the memory `read` mapped, called once the tensor is converted."""

    name: str
    type: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # flat uint8: the tensor's bytes in `type`
    location: FileRange | None = None
    release: Callable[[], None] | None = None


# --- one tensor -------------------------------------------------------------------------------


def dequantize_tensor(data: np.ndarray, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Bytes of a `qtype` tensor -> float32 tensor of `shape`.

    zeropoint's torch kernels where it has the type (bit-identical to gguf-py and to ggml's
    dequantize_row_*); gguf-py's `gguf.quants.dequantize` for the rest.
    """
    import torch

    from . import blocks

    shape = tuple(int(s) for s in shape)
    data = np.ascontiguousarray(data).reshape(-1)
    if qtype == "F32":
        return torch.from_numpy(data.view(np.float32)).view(shape)
    if qtype == "F16":
        return torch.from_numpy(data.view(np.float16)).to(torch.float32).view(shape)
    if qtype == "BF16":  # bf16 is the top half of a float32
        wide = data.view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(wide.view(np.float32)).view(shape)
    if qtype in blocks.BLOCK_TYPES:
        return blocks.dequantize_blocks(torch.from_numpy(data), qtype, shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        out = dequantize(data, GGMLQuantizationType[qtype])
    except (KeyError, NotImplementedError) as e:
        raise ValueError(f"cannot dequantize ggml type {qtype}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


def quantize_tensor(x: torch.Tensor, qtype: str, name: str = "tensor") -> np.ndarray:
    """float32 tensor (rows = last dim) -> flat uint8 bytes of ggml type `qtype`."""
    import torch

    from . import blocks

    if qtype == "F32":
        out = x.to(torch.float32)
    elif qtype in ("F16", "BF16"):
        out = x.to(torch.float16 if qtype == "F16" else torch.bfloat16)  # round to nearest even
        if not torch.isfinite(out).all():
            big = float(x.abs().max())
            raise ValueError(f"{name}: values up to {big:.4g} are not finite in {qtype}")
        out = out.view(torch.int16)
    else:
        try:
            out = blocks.quantize_blocks(x.reshape(-1, x.shape[-1]), qtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out.contiguous().view(-1).view(torch.uint8).numpy()


def convert(data: np.ndarray, src_type: str, shape: Sequence[int], dst_type: str,
            name: str = "tensor", encoder: Encoder | None = None) -> Iterator[np.ndarray]:
    """Bytes of a `src_type` tensor -> its bytes in `dst_type`, yielded a few rows at a time.

    Rows are dequantized and quantized again in chunks of about _CHUNK_VALUES, so the float32
    rows stay in cache and reuse the same memory; a whole tensor in float32 would be fresh memory
    for every tensor, whose page faults cost more than the quantization itself. A piece may be a
    view of a buffer the next piece reuses (as TensorData allows): use it, or copy it, before
    asking for the next. `encoder` (default `quantize_tensor`) turns float32 rows into bytes:
    another one (gguf.hqq's) must treat rows independently, as the pieces split the tensor by
    rows."""
    shape = tuple(int(s) for s in shape)
    data = np.ascontiguousarray(data).reshape(-1)
    rows, row_values = math.prod(shape[:-1]), shape[-1]
    row_bytes = tensor_nbytes(src_type, (row_values,))
    if len(data) != rows * row_bytes:
        raise ValueError(f"{name}: {src_type} shape {shape} needs {rows * row_bytes} bytes, "
                         f"got {len(data)}")
    if encoder is None and codecs.can_transcode(src_type, dst_type):
        yield from _transcode(data, src_type, rows, row_values, dst_type, name)
        return
    if encoder is None and codecs.supported(src_type) and codecs.supported(dst_type):
        yield from _convert_rows(data, src_type, rows, row_values, dst_type, name)
        return
    if getattr(encoder, "takes_numpy", False) and codecs.supported(src_type):
        yield from _convert_rows(data, src_type, rows, row_values, dst_type, name,
                                 lambda x: encoder(x, dst_type, name))
        return
    encoder = encoder or quantize_tensor
    step = max(1, _CHUNK_VALUES // row_values)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        x = dequantize_tensor(data[first * row_bytes : (first + n) * row_bytes], src_type,
                              (n, row_values))
        try:
            yield encoder(x, dst_type, name)
        except ValueError:
            # Encode the whole tensor to raise its error with the tensor's own block numbers.
            encoder(dequantize_tensor(data, src_type, shape), dst_type, name)
            raise


def _convert_rows(data: np.ndarray, src_type: str, rows: int, row_values: int, dst_type: str,
                  name: str, quantize: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> Iterator[np.ndarray]:
    """convert() by the numpy codecs, _CHUNK_VALUES at a time; `quantize` (float32 rows ->
    bytes) replaces dst_type's codec, e.g. an importance-weighted encoder that takes numpy."""
    custom = quantize is not None
    quantize = quantize or (lambda x: codecs.quantize_rows(x, dst_type))
    row_bytes = tensor_nbytes(src_type, (row_values,))
    step = max(1, _CHUNK_VALUES // row_values)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        x = codecs.dequantize_rows(data[first * row_bytes : (first + n) * row_bytes], src_type,
                                   row_values)
        try:
            yield quantize(x)
        except ValueError:
            # Again over the whole tensor, to raise with the tensor's own block numbers.
            try:
                quantize(codecs.dequantize_rows(data, src_type, row_values))
            except ValueError as e:
                raise e if custom else ValueError(f"{name}: {e}") from None
            raise


_scratch = threading.local()  # each thread's output buffer, reused from piece to piece


def _claim_scratch(nbytes: int) -> tuple[np.ndarray, bool]:
    """This thread's reusable output buffer (at least `nbytes`) and True; or, while another
    convert() on this thread still holds it (generators taken in turns), a fresh one and False.
    One buffer per call was 10-15% slower on a whole model: fresh memory for every tensor."""
    if getattr(_scratch, "busy", False):
        return np.empty(nbytes, np.uint8), False
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(max(nbytes, _TRANSCODE_VALUES), np.uint8)
    _scratch.busy = True
    return buf, True


def _transcode(data: np.ndarray, src_type: str, rows: int, row_values: int, dst_type: str,
               name: str) -> Iterator[np.ndarray]:
    """convert() for two legacy types: codecs.transcode, _TRANSCODE_VALUES at a time, into the
    thread's reused buffer. A piece of ~1M values keeps the Python work per call negligible,
    and the piece in L2 for the write."""
    src_row, dst_row = (tensor_nbytes(t, (row_values,)) for t in (src_type, dst_type))
    step = max(1, _TRANSCODE_VALUES // row_values)
    buf, claimed = _claim_scratch(min(step, rows) * dst_row)
    try:
        for first in range(0, rows, step):
            n = min(step, rows - first)
            piece = data[first * src_row : (first + n) * src_row]
            try:
                out = codecs.transcode(piece, src_type, dst_type, buf[: n * dst_row])
            except ValueError:
                # Again over the whole tensor, to raise with the tensor's own block numbers.
                try:
                    codecs.transcode(data, src_type, dst_type)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                raise
            yield out
    finally:
        if claimed:
            _scratch.busy = False


# --- the report -------------------------------------------------------------------------------


@dataclass
class QuantizeReport:
    path: Path
    source: str
    plan: Plan
    file_bytes: int
    tensor_bytes: int  # sum of tensor data, no header or padding
    n_elements: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:  # llama.cpp's figure: tensor bytes over all elements
        return 8 * self.tensor_bytes / self.n_elements

    @property
    def fallbacks(self):
        return self.plan.fallbacks

    def rows(self) -> list[tuple[str, int, int, int]]:
        """(type, tensors, elements, bytes) per type written, largest share first."""
        acc: dict[str, list[int]] = {}
        for c in self.plan.choices:
            n = int(np.prod(c.shape))
            row = acc.setdefault(c.type, [0, 0, 0])
            row[0] += 1
            row[1] += n
            row[2] += tensor_nbytes(c.type, c.shape)
        return sorted(((t, *v) for t, v in acc.items()), key=lambda r: -r[3])

    def table(self) -> str:
        lines = [f"{'type':<6} {'tensors':>8} {'weights':>13} {'MiB':>9} {'bits/weight':>12}"]
        for qtype, count, n, nbytes in self.rows():
            lines.append(f"{qtype:<6} {count:>8} {n:>13,} {nbytes / 2**20:>9.2f} "
                         f"{8 * nbytes / n:>12.3f}")
        lines.append(f"{'total':<6} {len(self.plan.choices):>8} {self.n_elements:>13,} "
                     f"{self.tensor_bytes / 2**20:>9.2f} {self.bits_per_weight:>12.3f}")
        lines.append(f"file {self.file_bytes / 2**20:.2f} MiB ({self.file_bytes:,} bytes)")
        return "\n".join(lines)


# --- the pipeline -----------------------------------------------------------------------------


def output_metadata(metadata: Mapping[str, MetaValue], file_type: int,
                    extra: Mapping[str, MetaValue] | None = None) -> Metadata:
    """The source's metadata as llama.cpp writes it back: split keys dropped, quantization
    version and file type set and moved to the end, then `extra` (llama-quantize's overrides,
    e.g. the quantize.imatrix.* keys), each moved to the end in its order."""
    extra = dict(extra or {})
    out = {k: v for k, v in metadata.items()
           if k not in SPLIT_KEYS and k not in (QUANTIZATION_VERSION_KEY, FILE_TYPE_KEY)
           and k not in extra}
    out[QUANTIZATION_VERSION_KEY] = MetaValue.u32(GGML_QUANT_VERSION)
    out[FILE_TYPE_KEY] = MetaValue.u32(file_type)
    out.update(extra)
    return out


def check_writable(plan: Plan) -> None:
    """Fail before writing anything if a chosen type has no encoder here (yet)."""
    missing: dict[str, list[str]] = {}
    for c in plan.choices:
        if not c.copied and c.type not in WRITABLE_TYPES:
            missing.setdefault(c.type, []).append(c.name)
    if missing:
        detail = "; ".join(f"{t} for {len(n)} tensor(s), e.g. {n[0]}" for t, n in missing.items())
        raise ValueError(f"zeropoint cannot write {', '.join(missing)} yet ({detail}); "
                         f"types available: {', '.join(WRITABLE_TYPES)}")


def write_quantized(
    sources: Sequence[SourceTensor],
    metadata: Mapping[str, MetaValue],
    target: Target | str,
    out: str | os.PathLike,
    *,
    params: ModelParams | None = None,
    source_name: str = "",
    progress: bool = False,
    threads: int | None = None,
    encoder: Encoder | None = None,
    importance: Importance | None = None,
    extra_metadata: Mapping[str, MetaValue] | None = None,
) -> QuantizeReport:
    """Convert `sources` to the types `target` gives them and write a GGUF file atomically.
    `encoder`: see `convert` (a tensor already in its chosen type is copied as it is).
    `importance`: quantize as llama-quantize --imatrix does (see gguf.weighted): each tensor
    with an entry is weighted by it, one without is quantized plainly, and the mixes take
    llama.cpp's imatrix rules. `extra_metadata`: keys set last (see output_metadata).

    `threads` tensors (default: ckernels.default_threads()) are converted at once, each on one
    thread, which also stores it at its place in the file. One tensor per thread beats intra-op
    threads here: a model's tensors are small (~1M values), and on a busy machine an OpenMP team
    waiting at barriers for a descheduled member ran 20x slower.
    """
    started = time.perf_counter()
    target = parse_target(target) if isinstance(target, str) else target
    params = params or ModelParams.from_metadata(metadata)
    by_name = {s.name: s for s in sources}
    if len(by_name) != len(sources):
        raise ValueError("duplicate tensor names in the source")
    if importance is not None and encoder is not None:
        raise ValueError("an importance matrix and a custom encoder cannot be combined")
    plan = plan_types([(s.name, s.type, s.shape) for s in sources], target, params,
                      has_imatrix=importance is not None)
    check_writable(plan)
    encoders = {}  # a weighted encoder for each tensor the importance changes
    for c in plan.choices:
        imp = None if c.copied else tensor_importance(importance, c.name, c.shape)
        if imp is not None and c.type not in IGNORES_IMPORTANCE:
            encoders[c.name] = weighted_encoder(imp)
        elif imp is None and needs_imatrix(c) and (importance is None or not c.copied):
            raise ValueError(_missing_importance(c, importance is None))

    def produce(choice) -> Callable[[], np.ndarray | FileRange | Iterator[np.ndarray]]:
        src = by_name[choice.name]
        if choice.copied:
            return (lambda: src.location) if src.location is not None else src.read

        def pieces() -> Iterator[np.ndarray]:
            yield from convert(src.read(), src.type, src.shape, choice.type, choice.name,
                               encoders.get(choice.name, encoder))
            if src.release is not None:
                src.release()

        return pieces

    tensors = [TensorData(c.name, c.type, c.shape, produce(c)) for c in plan.choices]
    threads = max(1, threads or ckernels.default_threads())
    with torch_threads(1) if threads > 1 else nullcontext():
        size = write_gguf(out, output_metadata(metadata, target.file_type, extra_metadata),
                          tensors, progress=progress, progress_desc=f"quantizing to {target.name}",
                          threads=threads)
    return QuantizeReport(
        path=Path(out), source=source_name, plan=plan, file_bytes=size,
        tensor_bytes=sum(t.nbytes for t in tensors),
        n_elements=sum(int(np.prod(c.shape)) for c in plan.choices),
        seconds=time.perf_counter() - started,
    )


def _missing_importance(choice, no_matrix: bool) -> str:
    """llama-quantize's refusal of a very low-bit tensor without importance, in words."""
    why = ("no importance matrix was given (--imatrix FILE)" if no_matrix
           else "the importance matrix has no entry for it")
    return (f"{choice.name}: {choice.type} needs an importance matrix and {why}; llama.cpp "
            f"refuses these types without one, as the result would be garbage: "
            f"{', '.join(NEED_IMATRIX)}")


def tensor_importance(importance: Importance | None, name: str,
                      shape: Sequence[int]) -> np.ndarray | None:
    """The importance llama-quantize uses for tensor `name`: its entry, flattened; None without
    one. An entry of another length is an error (llama.cpp's), except for the token
    embeddings, which llama.cpp then quantizes plainly."""
    imp = None if importance is None else importance(name)
    if imp is None:
        return None
    imp = np.asarray(imp, dtype=np.float32).reshape(-1)
    if imp.size != shape[-1]:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None
        raise ValueError(f"{name}: the importance matrix has {imp.size} values for rows of "
                         f"{shape[-1]}; was it made for this model?")
    return check_importance(imp, shape[-1], name)


def gguf_sources(src: GGUFFile) -> list[SourceTensor]:
    return [SourceTensor(t.name, t.type, t.shape, (lambda t=t: src.raw(t)),
                         FileRange(src.path, t.offset, t.nbytes), (lambda t=t: src.release(t)))
            for t in src.tensors]


def requantize(
    src: str | os.PathLike | GGUFFile,
    out: str | os.PathLike,
    target: Target | str,
    *,
    progress: bool = False,
    encoder: Encoder | None = None,
    importance: Importance | None = None,
    extra_metadata: Mapping[str, MetaValue] | None = None,
) -> QuantizeReport:
    """Requantize the GGUF file `src` into `out` (a mix, a single type, or a recipe: see mixes);
    `encoder` as for `convert`, `importance` and `extra_metadata` as for `write_quantized`."""
    source = src if isinstance(src, GGUFFile) else read_gguf(src)
    if Path(out).resolve() == source.path.resolve():
        raise ValueError(f"output {str(out)!r} is the input file; write to another path")
    return write_quantized(gguf_sources(source), source.metadata, target, out,
                           source_name=str(source.path), progress=progress, encoder=encoder,
                           importance=importance, extra_metadata=extra_metadata)


__all__ = [
    "Importance", "QuantizeReport", "SourceTensor", "convert", "dequantize_tensor", "gguf_sources",
    "output_metadata", "quantize_tensor", "requantize", "tensor_importance", "write_quantized",
]
