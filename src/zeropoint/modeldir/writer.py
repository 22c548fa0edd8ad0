"""Writing zeropoint's model directory (format.py): CheckpointWriter streams tensors into
shards; save_quantized writes a model that quantize_model quantized."""

from __future__ import annotations

import json
from collections.abc import Iterable
from math import prod
from pathlib import Path

import torch
from torch import nn

from ..filecopy import copy_range
from ..nn.quantize_model import distinct_tensors, quantized_layers
from ..qtensor import QTensor
from ..recipe import Recipe
from .format import FORMAT, INDEX, MANIFEST, SAFETENSORS_DTYPES, Manifest

# Largest shard file. The writer streams tensors to disk as they come, so this bounds file
# sizes, not memory.
DEFAULT_SHARD_BYTES = 256 << 20


class CheckpointWriter:
    """Collects tensors into shards of bounded size inside `directory` (a fresh, temporary one:
    the caller renames it into place when everything is written).

    Tensor bytes go to disk as soon as they are added (to a spool file per shard; the shard is
    assembled, header first, when it is full), so the writer holds no tensor in memory and
    `add_kept_chunks` can store a tensor larger than memory piece by piece."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.manifest = Manifest()
        self._entries: dict[str, dict] = {}  # safetensors header entries of the open shard
        self._spool = None  # the open shard's tensor data, in order; opened on the first tensor
        self._spool_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard

    def add_quantized(self, name: str, q: QTensor, source_bytes: int) -> None:
        self.manifest.quantized[name] = q.metadata()
        self.manifest.quantized_bytes += q.nbytes
        self.manifest.quantized_params += q.numel
        self.manifest.float_bytes += source_bytes
        for key, t in q.state_dict(name + ".").items():
            self._add(key, t)

    def add_kept(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        self.add_kept_chunks(name, t.dtype, tuple(t.shape), (t,))

    def add_kept_chunks(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]
    ) -> None:
        """Store a tensor of `dtype` and `shape` given as pieces whose bytes, in order, are its
        C-order data (e.g. blocks of rows). Only one piece is in memory at a time."""
        nbytes = prod(shape) * dtype.itemsize
        self.manifest.kept_bytes += nbytes
        self.manifest.kept_params += prod(shape)
        self.manifest.float_bytes += nbytes
        self._add_chunks(name, dtype, tuple(shape), chunks)

    def _add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        self._add_chunks(key, t.dtype, tuple(t.shape), (t,))

    def _add_chunks(self, key: str, dtype: torch.dtype, shape: tuple, chunks) -> None:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        nbytes = prod(shape) * dtype.itemsize
        # Flush first, so that a shard stays within max_shard_bytes unless one tensor is larger.
        if self._entries and self._spool_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._spool is None:
            self._spool = open(self._spool_path(len(self._shards)), "wb")
        begin = self._spool_bytes
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise TypeError(f"{key}: a piece has dtype {chunk.dtype}, expected {dtype}")
            data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._spool.write(memoryview(data.numpy()))
            self._spool_bytes += data.numel()
        if self._spool_bytes - begin != nbytes:
            raise ValueError(
                f"{key}: the pieces hold {self._spool_bytes - begin} bytes; shape {list(shape)} "
                f"of {dtype} needs {nbytes}"
            )
        self._entries[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
            "data_offsets": [begin, self._spool_bytes],
        }

    def close(self) -> None:
        """Close the open shard's spool file without writing the shard (after a failure; the
        caller discards the directory)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _spool_path(self, index: int) -> Path:
        return self.directory / f".shard-{index:05d}.data"

    def _flush(self) -> None:
        """Write the open shard: 8-byte header length, JSON header, then the spooled data."""
        if not self._entries:
            return
        self._spool.close()
        self._spool = None
        index = len(self._shards)
        header = json.dumps({"__metadata__": {"format": FORMAT}, **self._entries}).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads with spaces to align the data
        spool = self._spool_path(index)
        with open(self.directory / f"shard-{index:05d}.safetensors", "wb") as out:
            out.write(len(header).to_bytes(8, "little") + header)
            _copy_file(spool, out, self._spool_bytes)
        spool.unlink()
        self._shards.append(list(self._entries))
        self._entries, self._spool_bytes = {}, 0

    def finish(self, **extra) -> Manifest:
        """Write the last shard, name the shards as Hugging Face does, and write the manifest."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i:05d}.safetensors").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            (self.directory / INDEX).write_text(
                json.dumps({"metadata": {"format": FORMAT}, "weight_map": weight_map}, indent=1)
            )
        self.manifest.extra.update(extra)
        (self.directory / MANIFEST).write_text(json.dumps(self.manifest.to_dict(), indent=1) + "\n")
        return self.manifest


def save_quantized(model: nn.Module, directory, *, recipe: Recipe, kind: str, tokenizer=None,
                   config=None, **extra) -> Manifest:
    """Write `model` into the (new, empty) `directory`. Tied tensors are written once."""
    directory = Path(directory)
    writer = CheckpointWriter(directory)
    written = set()  # ids of the QTensors written: a tied table is shared, and stored once
    for name, module in quantized_layers(model):
        q = module.weight_q
        if id(q) in written:
            continue  # the loader ties it again, as the architecture does (models/quantized.py)
        written.add(id(q))
        writer.add_quantized(name + ".weight", q, source_bytes=q.numel * torch.finfo(q.dtype).bits // 8)
    state = model.state_dict()
    # A tied weight is written under its first name; the architecture ties it again on load.
    for t in distinct_tensors(state.values()):
        writer.add_kept(next(k for k, v in state.items() if v is t), t)
    if config is not None:
        config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return writer.finish(recipe=recipe.to_dict(), kind=kind, **extra)


def _copy_file(src: Path, dst, nbytes: int) -> None:
    """Append the first `nbytes` of file `src` to the open binary file `dst`, in the kernel where
    the platform can (filecopy.copy_range)."""
    dst.flush()
    start = dst.tell()
    with open(src, "rb") as f:
        try:
            copy_range(f.fileno(), dst.fileno(), nbytes, 0, start)
        except EOFError:
            raise OSError(f"{src} is shorter than {nbytes} bytes") from None
    dst.seek(start + nbytes)