"""GGUF files in: the metadata, the tensors, and each tensor's bytes as a view of the mapped file.

zeropoint's own reader (gguf-py's `GGUFReader` builds a numpy view for every string and takes
seconds over a 49k-token vocabulary; this one takes a fraction of that, and gguf-py 0.19 hangs on
a 49-byte file that declares an array of 2^63 elements). The header is parsed by header.py; here
every tensor is checked against the file: a known ggml type, rows that tile into its blocks, an
aligned offset, bytes inside the file and overlapping no other tensor's. So a truncated, corrupt
or hostile file is an InvalidGGUFError that says what is wrong and where, and a tensor's bytes
handed on (to numpy, torch or a C kernel) are exactly as many as its type and shape need. The
tests compare it with `GGUFReader`.
"""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from .header import HeaderParser, InvalidGGUFError, quoted
from .metadata import gc_paused
from .types import ggml_type

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import Any

    import numpy as np


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

    The tensor data stays on disk (memory-mapped); `raw()` returns views into it. The map is
    the standard library's, and numpy is imported only by `raw()`: a requantization that copies
    every tensor (FileRange) reads the header and never needs numpy.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidGGUFError(f"GGUF file {str(self.path)!r} does not exist or is not a "
                                   "file")
        self.file_size = self.path.stat().st_size
        if self.file_size == 0:
            raise InvalidGGUFError(f"{str(self.path)!r} is empty, not a GGUF file")
        # Copy-on-write: views are writable (torch takes them without a warning), and nothing
        # written to them ever reaches the file.
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._array = None  # numpy's uint8 view of the whole map, made by the first raw()
        parser = HeaderParser(memoryview(self._mmap), str(self.path))
        with gc_paused():
            self.version, self.metadata, infos, self.alignment, self.data_offset = parser.parse()
        self.tensors: list[TensorInfo] = self._check_tensors(infos)
        self._check_overlaps()
        self._by_name = {t.name: t for t in self.tensors}

    def _where(self, name: str, at: int) -> str:
        return f"{str(self.path)!r}: tensor {quoted(name)} (header byte {at})"

    def _check_tensors(self, infos) -> list[TensorInfo]:
        tensors, seen = [], set()
        for name, dims, type_id, rel_offset, at in infos:
            where = self._where(name, at)
            if name in seen:
                raise InvalidGGUFError(f"{where}: duplicate tensor name; the file is corrupt")
            seen.add(name)
            try:
                qtype = ggml_type(type_id)
            except ValueError:
                raise InvalidGGUFError(f"{where}: unknown ggml type id {type_id}; the file is "
                                       "corrupt or from a newer ggml than zeropoint knows") from None
            block, size = qtype.block_size, qtype.type_size
            if dims[0] % block:
                raise InvalidGGUFError(f"{where}: row length {dims[0]} is not a multiple of "
                                       f"{qtype.name}'s block size {block}; the file is corrupt")
            if rel_offset % self.alignment:
                raise InvalidGGUFError(f"{where}: data offset {rel_offset} is not a multiple of "
                                       f"the alignment {self.alignment}; the file is corrupt")
            shape = tuple(reversed(dims))
            nbytes = math.prod(shape) // block * size
            start = self.data_offset + rel_offset
            if start + nbytes > self.file_size:
                raise InvalidGGUFError(f"{where}: its {nbytes} bytes at file offset {start} run "
                                       f"past the end of the file ({self.file_size} bytes): the "
                                       "file is truncated")
            tensors.append(TensorInfo(name, qtype.name, shape, start, nbytes))
        return tensors

    def _check_overlaps(self) -> None:
        # One tensor's bytes inside another's would make writing one change the other.
        by_offset = sorted(self.tensors, key=lambda t: t.offset)
        for before, t in zip(by_offset, by_offset[1:]):
            if t.offset < before.offset + before.nbytes:
                raise InvalidGGUFError(
                    f"{str(self.path)!r}: tensor {quoted(t.name)} at file offset {t.offset} "
                    f"overlaps tensor {quoted(before.name)} ({before.nbytes} bytes at "
                    f"{before.offset}); the file is corrupt")

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
        if self._array is None:
            import numpy as np

            self._array = np.frombuffer(self._mmap, np.uint8)
        return self._array[t.offset : t.offset + t.nbytes]

    def release(self, tensor: TensorInfo | str) -> None:
        """Let go of the tensor's pages that raw() views mapped: the next read maps them again
        from the page cache. Without it a requantization's resident memory grew to the size of
        the whole source file. Only whole pages inside the tensor, which no other tensor
        shares; a no-op where madvise is missing."""
        t = self[tensor] if isinstance(tensor, str) else tensor
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start, end = -(-t.offset // page) * page, (t.offset + t.nbytes) // page * page
        if end > start:
            # Pages never written (raw() views are only read): nothing is lost.
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop the memory map (views from raw() keep it alive until they go too)."""
        self._mmap = self._array = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse `path`'s header; InvalidGGUFError (a ValueError), saying what and where, if it is
    not a sound GGUF file."""
    return GGUFFile(path)
