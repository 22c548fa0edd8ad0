"""GGUF -> GGUF in other ggml types, the way llama.cpp's llama_model_quantize does it.

Each tensor is converted to the type `mixes.plan_types` chose for it (gguf.convert: a few rows at
a time, by the numpy codecs and the C kernels); a tensor already in its chosen type is copied as
is (by the kernel, FileRange), and tensors that are not 2-D weights (norms) are kept. This path
imports neither torch nor gguf-py, and numpy only when a tensor changes type: a requantization
that copies every tensor runs on the standard library alone. torch comes in only for an
`encoder` (HQQ's) or where the C kernels are missing (gguf.blocks' torch code).
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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .. import ckernels
from ..threads import torch_threads
from .constants import GGML_QUANT_VERSION
from .layout import tensor_nbytes
from .metadata import Metadata, MetaValue
from .mixes import NEED_IMATRIX, ModelParams, Plan, Target, needs_imatrix, parse_target, plan_types
from .reader import GGUFFile, read_gguf
from .types import WRITABLE_TYPES
from .writer import FileRange, TensorData, write_gguf

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    import numpy as np

    from .convert import Encoder

QUANTIZATION_VERSION_KEY = "general.quantization_version"
FILE_TYPE_KEY = "general.file_type"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

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
    read: Callable[[], "np.ndarray"]  # flat uint8: the tensor's bytes in `type`
    location: FileRange | None = None
    release: Callable[[], None] | None = None


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
            n = math.prod(c.shape)
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
        if imp is not None:
            from .weighted import IGNORES_IMPORTANCE, weighted_encoder

            if c.type not in IGNORES_IMPORTANCE:
                encoders[c.name] = weighted_encoder(imp)
        elif imp is None and needs_imatrix(c) and (importance is None or not c.copied):
            raise ValueError(_missing_importance(c, importance is None))

    if not all(c.copied for c in plan.choices):
        from .convert import convert  # numpy's import, paid only where a type changes

    def produce(choice) -> FileRange | Callable[[], np.ndarray | Iterator[np.ndarray]]:
        src = by_name[choice.name]
        if choice.copied:  # the kernel copies it from the file, else its bytes are written
            return src.location if src.location is not None else src.read

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
        n_elements=sum(math.prod(c.shape) for c in plan.choices),
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
    import numpy as np

    from .weighted import check_importance

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
    "Importance", "QuantizeReport", "SourceTensor", "gguf_sources", "output_metadata",
    "requantize", "tensor_importance", "write_quantized",
]
