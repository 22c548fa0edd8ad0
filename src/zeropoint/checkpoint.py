"""zeropoint's model directory: packed safetensors shards plus a JSON manifest.

Layout of a directory that `zeropoint quantize` writes:

    zeropoint.json                 manifest: format, version, every quantized tensor's spec, shape
                                   and dtype, the recipe, sizes; see `Manifest`
    model.safetensors              or model-00001-of-0000N.safetensors + model.safetensors.index.json
    config.json, tokenizer files   copied from the source model

A quantized tensor `<module>.weight` is stored as `<module>.weight.packed` (uint8 bit stream),
`<module>.weight.scale` (float32, one per block) and, for the asymmetric scheme,
`<module>.weight.zero_point` (uint8). Every other tensor keeps its name and dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open

from .qtensor import QTensor

FORMAT = "zeropoint"
FORMAT_VERSION = 1
MANIFEST = "zeropoint.json"
INDEX = "model.safetensors.index.json"
# Largest shard file. The writer streams tensors to disk as they come, so this bounds file
# sizes, not memory.
DEFAULT_SHARD_BYTES = 256 << 20
# safetensors dtype names (the header's "dtype" field) of the torch dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _torch_name, _st_name in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[getattr(torch, _torch_name)] = _st_name


@dataclass
class Manifest:
    quantized: dict[str, dict] = field(default_factory=dict)  # tensor name -> QTensor metadata
    float_bytes: int = 0  # size of the source's float weights
    quantized_bytes: int = 0  # bytes of codes + scales + zero-points of quantized tensors
    kept_bytes: int = 0  # bytes of tensors stored as they were
    quantized_params: int = 0
    kept_params: int = 0
    extra: dict = field(default_factory=dict)  # recipe, source, method...

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.kept_bytes

    @property
    def bits_per_weight(self) -> float:
        """Average over every parameter, float ones included."""
        return 8.0 * self.total_bytes / max(1, self.quantized_params + self.kept_params)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Average over the quantized tensors only: codes, scales and zero-points."""
        return 8.0 * self.quantized_bytes / max(1, self.quantized_params)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "quantized": self.quantized,
            "float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes,
            "kept_bytes": self.kept_bytes, "quantized_params": self.quantized_params,
            "kept_params": self.kept_params, **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a zeropoint manifest (format {d.get('format')!r})")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"zeropoint format version {d['version']} is newer than this zeropoint reads "
                f"({FORMAT_VERSION}); upgrade zeropoint"
            )
        known = {"format", "version", "quantized", "float_bytes", "quantized_bytes", "kept_bytes",
                 "quantized_params", "kept_params"}
        return cls(
            d["quantized"], d["float_bytes"], d["quantized_bytes"], d["kept_bytes"],
            d["quantized_params"], d["kept_params"], {k: v for k, v in d.items() if k not in known},
        )


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


def read_manifest(directory) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a zeropoint model directory (no {MANIFEST})")
    return Manifest.from_dict(json.loads(path.read_text()))


def is_zeropoint_dir(directory) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_tensors(directory) -> tuple[Manifest, dict[str, QTensor], dict[str, torch.Tensor]]:
    """The manifest, the quantized tensors by name and the kept tensors by name."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    quantized = {
        name: QTensor.from_state_dict(raw, meta, name + ".") for name, meta in manifest.quantized.items()
    }
    owned = {name + "." + part for name in quantized for part in ("packed", "scale", "zero_point")}
    kept = {k: v for k, v in raw.items() if k not in owned}
    return manifest, quantized, kept


def _copy_file(src: Path, dst, nbytes: int) -> None:
    """Append the first `nbytes` of file `src` to the open binary file `dst`, in the kernel where
    the platform can (os.copy_file_range), else through an 8 MiB buffer."""
    dst.flush()
    start = dst.tell()
    done = 0
    with open(src, "rb") as f:
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(
                        f.fileno(), dst.fileno(), nbytes - done, done, start + done
                    )
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass  # a file system or kernel without it: copy the rest through a buffer
        dst.seek(start + done)
        while done < nbytes:
            block = os.pread(f.fileno(), min(8 << 20, nbytes - done), done)
            if not block:
                raise OSError(f"{src} ended after {done} of {nbytes} bytes")
            dst.write(block)
            done += len(block)
