"""GGUF files out: metadata and tensors written atomically, tensor data in place.

The header is written here (metadata.encode_value encodes the values), into a temporary file
renamed into place only when the whole file is written; tensor data goes in with one positioned
write per tensor (or piece), from several threads at once if asked, and tensors that are ranges
of another file (FileRange) are copied by the kernel, a run of them that lies in its source as
in the output as one range: a requantization that keeps every type copies its whole data section
at once, on one thread. Metadata values read from a file keep their bytes and are written back
as they are, so requantizing never pays for encoding a vocabulary again.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..atomic import atomic_path
from ..filecopy import copy_range, pwrite_all
from .constants import GGUF_MAGIC, GGUF_VERSION
from .layout import MAX_DIMS, data_alignment, tensor_nbytes
from .metadata import MetaValue, encode_value, gc_paused
from .types import ggml_type

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class FileRange:
    """`nbytes` bytes at `offset` of the file at `path`, which the kernel copies into the output
    (copy_file_range): a tensor that keeps its type never passes through this process's memory,
    where reading it through a memory map cost a page fault per 4 KiB and as much resident
    memory as the tensor."""

    path: Path
    offset: int
    nbytes: int


# Neither torch nor numpy is imported here: a file whose tensors are all FileRanges (a
# requantization that keeps every type) is written by the standard library alone.
if TYPE_CHECKING:  # an alias for annotations only
    from typing import Union

    TensorBytes = Union[np.ndarray, torch.Tensor, bytes, FileRange]


@dataclass
class TensorData:
    """A tensor to write: its bytes (or a FileRange of another file's), or a function that makes
    them when the writer gets there (so a whole model never has to sit in memory at once). The function may return the bytes or
    an iterator of consecutive pieces of them; each piece is stored before the next is asked for,
    so a piece may be a view of a buffer the function then reuses."""

    name: str
    type: str  # ggml type name
    shape: tuple[int, ...]  # torch order, as TensorInfo.shape
    data: TensorBytes | Callable[[], TensorBytes | Iterator[TensorBytes]]

    @cached_property  # asked for five times a tensor; type and shape do not change
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape)


def _as_bytes(data: TensorBytes) -> np.ndarray:
    """Any of the accepted byte containers -> flat uint8 array (no copy where possible)."""
    import numpy as np

    torch = sys.modules.get("torch")  # a tensor means torch is loaded
    if torch is not None and isinstance(data, torch.Tensor):
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
    alignment = data_alignment(meta)
    names = set()
    for t in tensors:
        if t.name in names:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
        if not 1 <= len(t.shape) <= MAX_DIMS:
            raise ValueError(f"tensor {t.name!r}: shape {t.shape} must have 1..{MAX_DIMS} dims")
        t.nbytes  # noqa: B018 - checks the type name and that rows tile into blocks

    with atomic_path(path) as tmp:
        with gc_paused():
            data_offset = _write_header(tmp, meta, tensors, alignment)
        # Each tensor at data_offset + the sum of the padded sizes before it, as the tensor
        # infos (written by gguf-py) say; the zero padding is what the file holds past its end.
        padded = [-(-t.nbytes // alignment) * alignment for t in tensors]
        starts = [data_offset + s for s in itertools.accumulate([0, *padded[:-1]])]
        size = data_offset + sum(padded)
        _store_tensors(tmp, tensors, starts, size, threads,
                       _progress(len(tensors), progress, progress_desc))
    return size


def _write_header(path: Path, meta: Mapping[str, MetaValue], tensors: list[TensorData],
                  alignment: int) -> int:
    """Header, metadata and tensor infos, padded to the alignment; returns the data offset.
    Written piece by piece, never joined: a vocabulary's megabytes were copied three times over
    when gguf-py's writer gathered them into one buffer (0.15 s of a 2 s requantization)."""
    pieces = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(meta))]
    for key, m in meta.items():
        if not isinstance(m, MetaValue):
            raise TypeError(f"metadata {key!r} must be a MetaValue, got {type(m).__name__}")
        pieces.append(_string(key) + struct.pack("<I", m.type))
        pieces.append(encode_value(m))
    offset = 0
    for t in tensors:
        dims = tuple(reversed(t.shape))  # ggml's order: ne[0] is the row length
        pieces.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                    ggml_type(t.type).id, offset))
        offset += -(-t.nbytes // alignment) * alignment
    size = sum(len(p) for p in pieces)
    data_offset = -(-size // alignment) * alignment
    pieces.append(bytes(data_offset - size))  # the data section starts aligned
    with open(path, "wb") as f:
        for piece in pieces:
            f.write(piece)
    return data_offset


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _store_tensors(path: Path, tensors: list[TensorData], starts: list[int], size: int,
                   threads: int, bar) -> None:
    """Write each tensor's bytes at its offset, in a file first extended to `size` (so padding
    reads back as zeros): large positioned writes, made in parallel when threads > 1. Tensors
    given as FileRanges are copied by the kernel on this thread, meanwhile: a copy gains
    nothing from a second thread (both wait on the file's lock; 2 threads were 1.25x slower)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        _allocate(fd, size)
        copies = [(t, at, k) for k, (t, at) in enumerate(zip(tensors, starts))
                  if isinstance(t.data, FileRange)]
        made = [(t, at) for t, at in zip(tensors, starts) if not isinstance(t.data, FileRange)]
        for t, _, _ in copies:
            if t.data.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name!r} ({t.type}, shape {t.shape}) needs "
                                 f"{t.nbytes} bytes, its source range has {t.data.nbytes}")

        def store(t: TensorData, start: int) -> None:
            data = t.data() if callable(t.data) else t.data
            pieces = data if isinstance(data, Iterator) else (data,)
            at = start
            for piece in pieces:
                if isinstance(piece, FileRange):
                    _copy_ranges(fd, [(piece, at, 0)])
                    at += piece.nbytes
                else:
                    at += pwrite_all(fd, _as_bytes(piece), at)
            if at - start != t.nbytes:
                raise ValueError(f"tensor {t.name!r} ({t.type}, shape {t.shape}) needs "
                                 f"{t.nbytes} bytes, got {at - start}")

        if threads <= 1 or len(made) <= 1:
            _copy_ranges(fd, [(t.data, at, k) for t, at, k in copies])
            bar.update(len(copies))
            for t, start in made:
                store(t, start)
                bar.update()
            return
        from concurrent.futures import ThreadPoolExecutor  # threads only for tensors to make

        with ThreadPoolExecutor(threads, thread_name_prefix="zeropoint-gguf") as pool:
            futures = [pool.submit(store, t, start) for t, start in made]
            try:
                _copy_ranges(fd, [(t.data, at, k) for t, at, k in copies])
                bar.update(len(copies))
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


def _copy_ranges(fd: int, ranges: list[tuple[FileRange, int, int]]) -> None:
    """Copy each (FileRange, offset in fd, place in the file's tensor order) by the kernel where
    it can (filecopy). Ranges of tensors that follow each other in the output and lie in their
    source as they will there (same file, same distances apart: a file's tensors copied in their
    order) are copied as one range, a whole data section at once rather than 272 tensors' opens
    and calls. The padding between them is then the source's, so it is zeroed after. Tensors
    between them in the output (made by other threads meanwhile) end a run, even where their
    sizes would keep the distances."""
    sources: dict[Path, int] = {}
    try:
        i = 0
        while i < len(ranges):
            first, first_at, _ = ranges[i]
            j, gaps = i + 1, []
            while j < len(ranges):
                (prev, prev_at, prev_k), (r, at, k) = ranges[j - 1], ranges[j]
                # `is` first: one file's ranges share its Path, and Path == builds strings
                if (k != prev_k + 1 or (r.path is not first.path and r.path != first.path)
                        or r.offset - prev.offset != at - prev_at):
                    break
                if at > prev_at + prev.nbytes:
                    gaps.append((prev_at + prev.nbytes, at - prev_at - prev.nbytes))
                j += 1
            last, last_at, _ = ranges[j - 1]
            if first.path not in sources:
                sources[first.path] = os.open(first.path, os.O_RDONLY)
            try:
                copy_range(sources[first.path], fd, last_at + last.nbytes - first_at,
                           first.offset, first_at)
            except EOFError:
                raise ValueError(f"{str(first.path)!r} ends before byte "
                                 f"{last.offset + last.nbytes}") from None
            for at, n in gaps:
                pwrite_all(fd, bytes(n), at)
            i = j
    finally:
        for src in sources.values():
            os.close(src)


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
