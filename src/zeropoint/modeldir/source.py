"""A Hugging Face safetensors checkpoint, read without loading it: the tensors of its files
from their headers, rows of one tensor with pread, and its Linear/Embedding modules from a
skeleton of the model built on the meta device.

Tensor bytes are read with `os.pread` into buffers this module allocates, never through a
memory map: safetensors' `safe_open` maps the file, and every page touched through the map
counts as resident memory until the file is closed, so reading a whole 1-GB shard through it
makes the process 1 GB larger.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..nn.layers import module_kind
from .format import INDEX, SAFETENSORS_DTYPES

_ACCEPTED = "accepted: a Hugging Face checkpoint directory (config.json + *.safetensors)"
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor of a safetensors file lies."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of its first byte

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return prod(self.shape[1:]) if self.shape else 1


def source_tensors(src_dir) -> list[SourceTensor]:
    """Every tensor of the checkpoint's safetensors files, file by file, in file order.

    Reads only the headers. ValueError for a missing directory, no config.json, no safetensors
    files, a file an index names but that is missing, or a tensor found twice.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ValueError(f"checkpoint directory {str(src_dir)!r} does not exist; {_ACCEPTED}")
    if not (src_dir / "config.json").is_file():
        raise ValueError(f"directory {str(src_dir)!r} has no config.json; {_ACCEPTED}")
    index = src_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src_dir / f).is_file()]
        if missing:
            raise ValueError(f"{index} names files that are missing: {', '.join(missing)}")
        paths = [src_dir / f for f in files]
    elif (src_dir / "model.safetensors").is_file():
        paths = [src_dir / "model.safetensors"]
    else:
        paths = sorted(src_dir.glob("*.safetensors"))
    if not paths:
        others = sorted(p.name for p in src_dir.glob("*.bin"))
        hint = f" (it holds {', '.join(others)}: save it with safe_serialization)" if others else ""
        raise ValueError(
            f"directory {str(src_dir)!r} has no *.safetensors weights{hint}; {_ACCEPTED}"
        )
    tensors: dict[str, SourceTensor] = {}
    for path in paths:
        for t in read_header(path):
            if t.name in tensors:
                first = tensors[t.name].path.name
                raise ValueError(f"tensor {t.name} is in both {first} and {path.name}")
            tensors[t.name] = t
    return list(tensors.values())


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit: a larger header is no real checkpoint


def read_header(path) -> list[SourceTensor]:
    """The tensors of one safetensors file, in the order of their data. ValueError if the header
    is not valid: 8-byte little-endian length, JSON {name: {dtype, shape, data_offsets}}, every
    tensor's bytes inside the data section and no two tensors sharing a byte. The checks come
    before any read: files from strangers are read here."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size "
                             f"{size}; a header holds 2 bytes to {MAX_HEADER_BYTES} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header: a JSON "
                         f"{type(header).__name__}, not an object of tensors")
    start = 8 + n
    out = []
    for name, entry in header.items():
        if name != "__metadata__":
            out.append(_header_entry(path, name, entry, start, size))
    out.sort(key=lambda t: t.offset)
    for a, b in zip(out, out[1:]):
        if a.offset + a.nbytes > b.offset:
            raise ValueError(f"{path}: tensors {a.name} and {b.name} share bytes")
    return out


def _header_entry(path: Path, name: str, entry, start: int, size: int) -> SourceTensor:
    """One tensor's header entry, checked: a known dtype, a shape of non-negative integers, and
    data_offsets [begin, end] inside the data section whose length the shape and dtype give."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} has a header entry that is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _TORCH_DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r}; known dtypes: {', '.join(_TORCH_DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ValueError(f"{where} has data_offsets {offsets!r}; they are [begin, end], two "
                         "non-negative integers")
    begin, end = offsets
    t = SourceTensor(name, path, _TORCH_DTYPES[dtype], tuple(shape), start + begin)
    if not begin <= end <= size - start or end - begin != t.nbytes:
        raise ValueError(f"{where} has data_offsets [{begin}, {end}] that do not match shape "
                         f"{shape} of {dtype} inside a {size}-byte file")
    return t


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_rows(fd: int, t: SourceTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `t` in its own dtype, read with pread into a fresh buffer."""
    nbytes = (stop - start) * t.row_numel * t.dtype.itemsize
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    offset = t.offset + start * t.row_numel * t.dtype.itemsize
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(f"{t.path} ends inside tensor {t.name}")
        done += n
    shape = (stop - start, *t.shape[1:]) if t.shape else ()
    return buf.view(t.dtype).view(shape)


def weight_modules(src_dir) -> tuple[dict[str, str], str]:
    """{module name: "linear" or "embedding"} of the model that config.json describes, and the
    model's base_model_prefix. The model is built on the meta device: no weight is allocated.

    The class is the one `models.load.load_model` would load (AutoModelForCausalLM for causal
    LMs, else AutoModel), so module names are those a quantizer of the loaded model sees.
    ValueError, naming the architecture, if transformers cannot build it.
    """
    src_dir = Path(src_dir)
    try:
        raw = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {src_dir / 'config.json'}: {e}") from None
    archs = list(raw.get("architectures") or []) if isinstance(raw, dict) else []
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    label = f"{', '.join(archs) or 'none named'} (model_type {model_type!r})"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(src_dir, local_files_only=True)
    except Exception as e:  # transformers says "unrecognized model type" in several exception types
        raise ValueError(
            f"cannot build architecture {label} from {src_dir / 'config.json'}: transformers "
            f"{transformers.__version__} does not know it ({type(e).__name__}: {e})"
        ) from e
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = any(a in causal for a in archs) or (
        not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    autos = [transformers.AutoModelForCausalLM, transformers.AutoModel]
    if not is_causal:
        autos.reverse()
    errors = []
    for auto in autos:
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except Exception as e:  # any failure to build means: not this auto class
            errors.append(f"{auto.__name__}: {type(e).__name__}: {e}")
    else:
        raise ValueError(
            f"cannot build architecture {label} from {src_dir / 'config.json'}: "
            + "; ".join(errors)
        )
    kinds = {name: module_kind(m) for name, m in model.named_modules()}
    kinds = {name: kind for name, kind in kinds.items() if kind is not None}
    return kinds, getattr(model, "base_model_prefix", "") or ""
