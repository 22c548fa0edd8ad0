"""GGUF files in and out: metadata, tensor infos, alignment and raw tensor bytes.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      (key: string, value type u32, value)
    n_tensors x (name: string, n_dims u32, ne[0..n_dims) u64, ggml type u32, offset u64)
    padding to `general.alignment` (32 unless the metadata says otherwise)
    tensor data, each at its offset from the start of this section, aligned and zero-padded

A string is a u64 length and UTF-8 bytes; an array is an element type u32, a count u64 and the
elements. ggml's ne[0] is the row length (the fastest dimension): `TensorInfo.shape` gives the
dimensions in torch order, ne reversed, so `shape[-1]` is the row that ggml blocks tile.

Writing goes through gguf-py's `GGUFWriter` for the header, into a temporary file renamed into place
only when the whole file is written; tensor data goes in with one positioned write per tensor (or
piece), from several threads at once if asked. Metadata values read from a file keep their bytes and
are written back as they are, and an array of strings (a vocabulary) is decoded only when its value
is asked for: requantizing never pays for either. Reading is zeropoint's own parser (gguf-py's
`GGUFReader` builds a numpy view for every string and takes seconds over a 49k-token vocabulary;
this one takes a fraction of that) that checks every length and offset against the file, so a
truncated or corrupt file is a `ValueError` that says what is wrong and where, never a crash or a
silent short read. The tests compare it with `GGUFReader`.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf import GGUFValueType, GGUFWriter

from ..atomic import atomic_path

ALIGNMENT_KEY = "general.alignment"
SUPPORTED_VERSIONS = (2, 3)  # version 1 (2023) used u32 counts; llama.cpp no longer reads it
MAX_DIMS = 4  # GGML_MAX_DIMS

_SCALAR = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
_NUMPY = {  # value type -> numpy dtype, for reading whole numeric arrays at once
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "<u1",
}


# --- metadata values ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetaValue:
    """One metadata value and its GGUF type; `sub_type` is an array's element type."""

    value: Any  # int, float, bool, str (bytes if not UTF-8), or a list of those
    type: GGUFValueType
    sub_type: GGUFValueType | None = None

    # Equal by content, whether made here or read from a file (_ReadValue).
    def __eq__(self, other):
        if not isinstance(other, MetaValue):
            return NotImplemented
        return (self.type, self.sub_type, self.value) == (other.type, other.sub_type, other.value)

    def __hash__(self):
        return hash((self.type, self.sub_type, self.value))

    @staticmethod
    def u32(v: int) -> MetaValue:
        return MetaValue(int(v), GGUFValueType.UINT32)

    @staticmethod
    def i32(v: int) -> MetaValue:
        return MetaValue(int(v), GGUFValueType.INT32)

    @staticmethod
    def f32(v: float) -> MetaValue:
        return MetaValue(float(v), GGUFValueType.FLOAT32)

    @staticmethod
    def bool_(v: bool) -> MetaValue:
        return MetaValue(bool(v), GGUFValueType.BOOL)

    @staticmethod
    def string(v: str) -> MetaValue:
        return MetaValue(str(v), GGUFValueType.STRING)

    @staticmethod
    def array(values: Iterable[Any], sub_type: GGUFValueType) -> MetaValue:
        return MetaValue(list(values), GGUFValueType.ARRAY, sub_type)


class _ReadValue(MetaValue):
    """A MetaValue read from a file. It keeps the bytes the file held after the type tag, which
    the writer copies back as they are, and decodes an array of strings only when its `value` is
    asked for: a 50k-token vocabulary took 40 ms to decode and 40 ms to encode again, and
    requantizing a model never looks at it."""

    def __init__(self, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None,
                 encoded: bytes, key: str = ""):
        for name, v in (("_value", value), ("type", vtype), ("sub_type", sub_type),
                        ("encoded", encoded), ("_key", key)):
            object.__setattr__(self, name, v)

    @property
    def value(self) -> Any:
        if self._value is _NOT_DECODED:  # a string array: sub type u32, count u64, strings
            buf = memoryview(self.encoded)
            count = struct.unpack_from("<Q", buf, 4)[0]
            parser = _Parser(buf, Path(self._key))
            parser.pos = 12
            object.__setattr__(self, "_value", parser.strings(count, self._key))
        return self._value


_NOT_DECODED = object()


class _Encoded(bytes):
    """Value bytes to write as they are (a _ReadValue's), in place of a value to encode."""


Metadata = dict[str, MetaValue]  # insertion order is file order


# --- ggml types -------------------------------------------------------------------------------


def ggml_type(name: str) -> GGMLQuantizationType:
    """'Q8_0' -> GGMLQuantizationType.Q8_0; an unknown name is a ValueError listing the known."""
    try:
        return GGMLQuantizationType[name]
    except KeyError:
        known = ", ".join(t.name for t in GGMLQuantizationType)
        raise ValueError(f"unknown ggml type {name!r}; known: {known}") from None


def tensor_nbytes(type_name: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ggml type `type_name` and torch-order `shape` (row = shape[-1])."""
    shape = tuple(int(s) for s in shape)
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    if not shape or shape[-1] % block:
        raise ValueError(f"a {type_name} tensor's rows must be a multiple of {block} values, "
                         f"got shape {shape}")
    return math.prod(shape) // block * size


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file describes it."""

    name: str
    type: str  # ggml type name: "F32", "Q4_1", ...
    shape: tuple[int, ...]  # torch order: ggml's ne reversed, shape[-1] = ne[0] = row length
    offset: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """A parsed GGUF file: `metadata`, `tensors` (file order), and their bytes through `raw()`.

    The tensor data stays on disk (memory-mapped); `raw()` returns views into it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF file {str(self.path)!r} does not exist or is not a file")
        self.file_size = self.path.stat().st_size
        if self.file_size == 0:
            raise ValueError(f"{str(self.path)!r} is empty, not a GGUF file")
        # Copy-on-write: views are writable (torch takes them without a warning), and nothing
        # written to them ever reaches the file.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        parser = _Parser(memoryview(self._map), self.path)
        with gc_paused():
            self.version, self.metadata, infos, self.alignment, self.data_offset = parser.parse()
        self.tensors: list[TensorInfo] = self._check_tensors(infos)
        self._by_name = {t.name: t for t in self.tensors}

    def _check_tensors(self, infos) -> list[TensorInfo]:
        tensors, seen = [], set()
        for name, dims, type_id, rel_offset, at in infos:
            where = f"{str(self.path)!r}: tensor {name!r} (header byte {at})"
            if name in seen:
                raise ValueError(f"{where}: duplicate tensor name; the file is corrupt")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(type_id)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValueError(f"{where}: unknown ggml type id {type_id}; the file is corrupt "
                                 "or from a newer ggml than gguf-py knows") from None
            if dims and dims[0] % block:
                raise ValueError(f"{where}: row length {dims[0]} is not a multiple of "
                                 f"{qtype.name}'s block size {block}; the file is corrupt")
            if rel_offset % self.alignment:
                raise ValueError(f"{where}: data offset {rel_offset} is not a multiple of the "
                                 f"alignment {self.alignment}; the file is corrupt")
            shape = tuple(reversed(dims))
            nbytes = math.prod(shape) // block * size
            start = self.data_offset + rel_offset
            if start + nbytes > self.file_size:
                raise ValueError(f"{where}: its {nbytes} bytes at file offset {start} run past the "
                                 f"end of the file ({self.file_size} bytes): the file is truncated")
            tensors.append(TensorInfo(name, qtype.name, shape, start, nbytes))
        return tensors

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {str(self.path)!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (plain Python), or `default` when the key is absent."""
        meta = self.metadata.get(key)
        return default if meta is None else meta.value

    def raw(self, tensor: TensorInfo | str) -> np.ndarray:
        """The tensor's bytes as a flat uint8 array: a copy-on-write view of the mapped file."""
        t = self[tensor] if isinstance(tensor, str) else tensor
        return self._map[t.offset : t.offset + t.nbytes]

    def close(self) -> None:
        """Drop the memory map (views from raw() keep it alive until they go too)."""
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse `path`'s header; ValueError, saying what and where, if it is not a sound GGUF file."""
    return GGUFFile(path)


class _Parser:
    """Reads the header from a buffer, checking every read against its end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0
        self.size = len(buf)

    def fail(self, what: str, at: int | None = None):
        at = self.pos if at is None else at
        raise ValueError(f"{str(self.path)!r} is not a valid GGUF file: {what} (at byte {at} of "
                         f"{self.size})")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            self.fail(f"{what} runs past the end of the file: the file is truncated")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str | bytes:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # kept as bytes and written back unchanged

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        t = self.scalar("<I", what)
        try:
            return GGUFValueType(t)
        except ValueError:
            self.fail(f"{what} is {t}, not a GGUF value type (0..12): the file is corrupt", at)

    def value(self, vtype: GGUFValueType, key: str):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], f"value of {key!r}"), None
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}"), None
        # An array: element type, count, elements.
        sub = self.value_type(f"element type of {key!r}")
        count = self.scalar("<Q", f"length of {key!r}")
        if vtype == GGUFValueType.ARRAY and sub in _NUMPY:
            width = np.dtype(_NUMPY[sub]).itemsize
            self.need(count * width, f"the {count} elements of {key!r}")
            arr = np.frombuffer(self.buf, _NUMPY[sub], count, self.pos)
            self.pos += count * width
            values = arr.astype(bool) if sub == GGUFValueType.BOOL else arr
            return values.tolist(), sub
        if count > self.size - self.pos:  # every element takes at least one byte
            self.fail(f"{key!r} claims {count} elements, more than the rest of the file could "
                      "hold: the file is truncated or corrupt")
        if sub == GGUFValueType.STRING:
            self.skip_strings(count, key)
            return _NOT_DECODED, sub  # decoded when asked for (_ReadValue.value)
        return [self.value(sub, key)[0] for _ in range(count)], sub

    def skip_strings(self, count: int, key: str) -> None:
        """Past `count` strings, without decoding them. The offset only grows, so one check at
        the end catches a string or length past the end of the file (a read past it fails
        first); checks per string doubled the time of this loop."""
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:  # a length field itself lies past the end
            pos = self.size + 1
        if pos > self.size:
            self.fail(f"the {count} strings of {key!r} run past the end of the file: the file is "
                      "truncated")
        self.pos = pos

    def strings(self, count: int, key: str) -> list:
        """`count` strings at once: the vocabulary's ~50k tokens and merges, in a tight loop."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.fail(f"the elements of {key!r} run past the end of the file: truncated")
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.fail(f"a string of {n} bytes in {key!r} runs past the end of the file: "
                          "the file is truncated")
            try:
                out.append(str(buf[pos : pos + n], "utf-8"))
            except UnicodeDecodeError:
                out.append(bytes(buf[pos : pos + n]))
            pos += n
        self.pos = pos
        return out

    def parse(self):
        if self.size < 4 or bytes(self.buf[:4]) != struct.pack("<I", GGUF_MAGIC):
            self.fail("it does not start with the magic bytes 'GGUF'", 0)
        self.pos = 4
        version = self.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            self.fail(f"version {version}{hint}; supported: {SUPPORTED_VERSIONS}", 4)
        n_tensors = self.scalar("<Q", "tensor count")
        n_kv = self.scalar("<Q", "metadata count")
        if n_kv > self.size or n_tensors > self.size:
            self.fail(f"counts of {n_kv} metadata keys and {n_tensors} tensors cannot fit in the "
                      "file")

        metadata: Metadata = {}
        for i in range(n_kv):
            at = self.pos
            key = self.string(f"metadata key {i}")
            if isinstance(key, bytes):
                self.fail(f"metadata key {i} is not UTF-8", at)
            if key in metadata:
                self.fail(f"duplicate metadata key {key!r}", at)
            vtype = self.value_type(f"type of {key!r}")
            start = self.pos
            value, sub = self.value(vtype, key)
            metadata[key] = _ReadValue(value, vtype, sub, bytes(self.buf[start : self.pos]), key)

        alignment = GGUF_DEFAULT_ALIGNMENT
        if ALIGNMENT_KEY in metadata:
            meta = metadata[ALIGNMENT_KEY]
            v = meta.value
            if meta.type != GGUFValueType.UINT32 or v <= 0 or v & (v - 1):
                self.fail(f"{ALIGNMENT_KEY} must be a u32 power of two, got {meta.value!r}")
            alignment = meta.value

        infos = []
        for i in range(n_tensors):
            at = self.pos
            name = self.string(f"name of tensor {i}")
            if isinstance(name, bytes):
                self.fail(f"the name of tensor {i} is not UTF-8", at)
            n_dims = self.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1..{MAX_DIMS}", at)
            dims = [self.scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
            if math.prod(dims) > 2**62:
                self.fail(f"tensor {name!r} has impossible dimensions {dims}", at)
            type_id = self.scalar("<I", f"type of {name!r}")
            offset = self.scalar("<Q", f"data offset of {name!r}")
            infos.append((name, dims, type_id, offset, at))
        data_offset = -(-self.pos // alignment) * alignment
        return version, metadata, infos, alignment, data_offset


# --- writing ----------------------------------------------------------------------------------

TensorBytes = Union[np.ndarray, torch.Tensor, bytes]


@dataclass
class TensorData:
    """A tensor to write: its bytes, or a function that makes them when the writer gets there
    (so a whole model never has to sit in memory at once). The function may return the bytes or
    an iterator of consecutive pieces of them; each piece is stored before the next is asked for,
    so a piece may be a view of a buffer the function then reuses."""

    name: str
    type: str  # ggml type name
    shape: tuple[int, ...]  # torch order, as TensorInfo.shape
    data: TensorBytes | Callable[[], TensorBytes | Iterator[TensorBytes]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape)


class _Writer(GGUFWriter):
    """GGUFWriter, plus empty arrays (legal GGUF, and llama.cpp reads them; gguf-py refuses)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        # Arrays of strings and numbers in one go (same bytes as gguf-py's item-by-item packing,
        # 10x faster on a 50k-token vocabulary), and empty arrays.
        if isinstance(val, _Encoded):
            return (struct.pack("<I", vtype) if add_vtype else b"") + val
        if vtype == GGUFValueType.ARRAY and sub_type is not None and (
                not val or sub_type == GGUFValueType.STRING or sub_type in _NUMPY):
            head = struct.pack("<I", vtype) if add_vtype else b""
            head += struct.pack("<IQ", sub_type, len(val))
            if sub_type == GGUFValueType.STRING:
                items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
                return head + b"".join(struct.pack("<Q", len(b)) + b for b in items)
            return head + np.asarray(val, dtype=_NUMPY[sub_type]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _as_bytes(data: TensorBytes) -> np.ndarray:
    """Any of the accepted byte containers -> flat uint8 array (no copy where possible)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, MetaValue],
    tensors: Iterable[TensorData],
    *,
    progress: bool = False,
    progress_desc: str = "writing",
    threads: int = 1,
) -> int:
    """Write a GGUF file atomically; returns its size in bytes.

    `metadata` is written in its order, `tensors` in theirs. The data alignment is the metadata's
    `general.alignment` (a u32 power of two) or 32. A tensor's `data` may be a function: it is
    called when that tensor's turn comes, and if it (or anything else) raises, no file is left
    behind. With `threads` > 1 that many tensors are made at once, each stored at its own offset
    by the thread that made it (the functions must then be safe to run side by side).
    `progress` shows a bar over the tensors.
    """
    tensors = list(tensors)
    meta = dict(metadata)
    alignment = GGUF_DEFAULT_ALIGNMENT
    if ALIGNMENT_KEY in meta:
        a = meta[ALIGNMENT_KEY]
        if a.type != GGUFValueType.UINT32 or not isinstance(a.value, int) or a.value <= 0 \
                or a.value & (a.value - 1):
            raise ValueError(f"{ALIGNMENT_KEY} must be a u32 power of two, got {a.value!r}")
        alignment = a.value
    names = set()
    for t in tensors:
        if t.name in names:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
        if not 1 <= len(t.shape) <= MAX_DIMS:
            raise ValueError(f"tensor {t.name!r}: shape {t.shape} must have 1..{MAX_DIMS} dims")
        t.nbytes  # noqa: B018 - checks the type name and that rows tile into blocks

    with atomic_path(path) as tmp:
        writer = _Writer(tmp, arch="")  # arch "" adds no key: metadata keeps its own order
        writer.data_alignment = alignment
        with gc_paused():
            data_offset = _write_header(writer, meta, tensors)
        # Each tensor at data_offset + the sum of the padded sizes before it, as the tensor
        # infos (written by gguf-py) say; the zero padding is what the file holds past its end.
        padded = [-(-t.nbytes // alignment) * alignment for t in tensors]
        starts = [data_offset + s for s in itertools.accumulate([0, *padded[:-1]])]
        size = data_offset + sum(padded)
        _store_tensors(tmp, tensors, starts, size, threads,
                       _progress(len(tensors), progress, progress_desc))
    return size


def _write_header(writer: _Writer, meta: Mapping[str, MetaValue],
                  tensors: list[TensorData]) -> int:
    """Header, metadata and tensor infos, padded to the alignment; returns the data offset."""
    try:
        for key, m in meta.items():
            if not isinstance(m, MetaValue):
                raise TypeError(f"metadata {key!r} must be a MetaValue, got {type(m).__name__}")
            value = _Encoded(m.encoded) if isinstance(m, _ReadValue) else m.value
            writer.add_key_value(key, value, m.type, sub_type=m.sub_type)
        for t in tensors:
            # A non-uint8 dtype makes gguf-py take `shape` as elements, not bytes.
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=ggml_type(t.type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())  # the data section starts aligned
        data_offset = fout.tell()
        writer.flush()
    finally:
        writer.close()
    return data_offset


@contextmanager
def gc_paused():
    """Python's cycle collector off for a burst of allocations that makes no cycles (a
    vocabulary's tens of thousands of entries): every collection walks all of the process's
    objects, torch's included, and such a burst set off enough of them to cost ~0.1 s."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _store_tensors(path: Path, tensors: list[TensorData], starts: list[int], size: int,
                   threads: int, bar) -> None:
    """Write each tensor's bytes at its offset, in a file first extended to `size` (so padding
    reads back as zeros): large positioned writes, made in parallel when threads > 1."""
    fd = os.open(path, os.O_WRONLY)
    try:
        _allocate(fd, size)

        def store(t: TensorData, start: int) -> None:
            data = t.data() if callable(t.data) else t.data
            pieces = data if isinstance(data, Iterator) else (data,)
            at = start
            for piece in pieces:
                at += _pwrite_all(fd, _as_bytes(piece), at)
            if at - start != t.nbytes:
                raise ValueError(f"tensor {t.name!r} ({t.type}, shape {t.shape}) needs "
                                 f"{t.nbytes} bytes, got {at - start}")

        if threads <= 1 or len(tensors) <= 1:
            for t, start in zip(tensors, starts):
                store(t, start)
                bar.update()
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="zeropoint-gguf") as pool:
            futures = [pool.submit(store, t, start) for t, start in zip(tensors, starts)]
            try:
                for f in futures:  # in order: the first tensor that failed is the one reported
                    f.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        os.close(fd)
        bar.close()


def _allocate(fd: int, size: int) -> None:
    """Extend the file to `size` bytes that read as zeros, with its blocks reserved when the
    file system can (Linux fallocate): ext4 otherwise allocates blocks inside each write, under
    the inode's lock, and two threads writing one file ran 2x slower than one. Not
    posix_fallocate, whose fallback writes zeros over the whole file where the call is missing."""
    if _fallocate is not None and _fallocate(fd, 0, 0, ctypes.c_int64(size)) == 0:
        return
    os.ftruncate(fd, size)


def _libc_fallocate():
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux/glibc: ftruncate alone
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def _pwrite_all(fd: int, data: np.ndarray, at: int) -> int:
    """os.pwrite until all of `data` is written (one call may write less); returns its size."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
    return len(view)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)
