"""Importance matrices: llama.cpp's two imatrix file formats in and out, as one value.

An importance matrix holds, for each weight matrix (by its GGUF tensor name), the sum over the
calibration tokens of x_j^2 for each input column j, and how many tokens were summed. The
quantizers weight each column's rounding error by the mean, sum / count.

API (numpy arrays; the other modules that quantize with an imatrix use only this):

    imat = read_imatrix("imatrix.gguf")           # or a legacy .dat file; the format is sniffed
    imat.importance("blk.0.ffn_down.weight")      # float32 mean of x^2, what llama-quantize passes
                                                  # its quantizers; None if the tensor has none
    imat.sums[name], imat.counts[name]            # float32 (n_cols,) or (n_mat, n_cols); int64 (n_mat,)
    imat.datasets, imat.chunk_count, imat.chunk_size
    write_imatrix("out.gguf", imat)               # format from the suffix (.dat -> legacy),
    write_imatrix("out.bin", imat, format="dat")  # or named

`importance(name)` follows tools/quantize/quantize.cpp's `load_imatrix`: sums / count per matrix
(per expert), in float32; a matrix (expert) that saw no token gets all ones. From a legacy file
it is the stored value / ncall (the stored value itself when ncall is 0). The result has the
shape of `sums`: (n_cols,) for a plain matrix, (n_experts, n_cols) for a merged-experts tensor
read from GGUF. A legacy file does not say how many experts a tensor has, so there it is flat,
(n_experts * n_cols,), expert after expert, as llama-quantize indexes it.

The two formats, as this llama.cpp (0.3.36's tools/imatrix/imatrix.cpp) writes them:
- GGUF: metadata `general.type` = "imatrix", `imatrix.datasets` (array of strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per entry, in sorted name order,
  `<name>.in_sum2` (F32, ne = (n_cols, n_mat)) and `<name>.counts` (F32, ne = (1, n_mat)),
  trailing dimensions of 1 dropped. Raw sums and token counts.
- .dat (legacy): i32 n_entries; per entry i32 name length, the name, i32 ncall, i32 nval,
  f32[nval] = sum / count * ncall, where ncall = ceil(max count / chunk_size); then an optional
  trailer: i32 chunk count, i32 length and the dataset name. All little-endian.
So a legacy file keeps means only; read back, its `counts` are its ncall and `chunk_size` is 0.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..atomic import atomic_path
from .metadata import MetaValue
from .reader import read_gguf
from .writer import TensorData, write_gguf

FORMATS = ("gguf", "dat")
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
_GGUF_MAGIC = b"GGUF"
_MAX_NAME = 1 << 16  # a tensor name longer than this marks a corrupt .dat file


class InvalidImatrixError(ValueError):
    """A file that is not a sound imatrix file; the message says which, where and why."""


@dataclass
class ImportanceMatrix:
    """Sums of x^2 per input column of each weight matrix, with their token counts.

    sums[name]: float32, (n_cols,) for a plain matrix, (n_mat, n_cols) for merged experts.
    counts[name]: int64, (n_mat,): tokens summed into each matrix (expert).
    chunk_size: tokens per chunk (the context size); 0 when unknown (read from a .dat file).
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self):
        if self.sums.keys() != self.counts.keys():
            raise ValueError("sums and counts must name the same tensors; only in one: "
                             f"{sorted(self.sums.keys() ^ self.counts.keys())[:5]}")
        for name in self.sums:
            sums = np.ascontiguousarray(self.sums[name], dtype=np.float32)
            counts = np.asarray(self.counts[name], dtype=np.int64).reshape(-1)
            n_mat = sums.shape[0] if sums.ndim == 2 else 1
            if sums.ndim not in (1, 2) or sums.size == 0 or counts.size != n_mat:
                raise ValueError(f"imatrix entry {name!r}: sums of shape {sums.shape} need "
                                 f"(n_cols,) or (n_mat, n_cols) with one count per matrix, got "
                                 f"{counts.size} counts")
            if (counts < 0).any():
                raise ValueError(f"imatrix entry {name!r}: negative count {counts.min()}")
            self.sums[name], self.counts[name] = sums, counts

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray | None:
        """The per-column mean of x^2 that llama-quantize hands its quantizers for tensor
        `name` (float32, the shape of sums[name]); None when the matrix has no entry."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts[name]
        rows = sums.reshape(counts.size, -1)  # (n_mat, n_cols)
        # float32 division, as quantize.cpp: sum / (float) count; an unseen matrix gets ones.
        seen = counts > 0
        denom = np.where(seen, counts, 1).astype(np.float32)[:, None]
        mean = np.where(seen[:, None], rows / denom, np.float32(1))
        return mean.astype(np.float32).reshape(sums.shape)


# ---------------------------------------------------------------------------------------- read
def read_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """Read an imatrix file in either format (a GGUF file by its magic, else legacy .dat)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imatrix file {str(path)!r} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == _GGUF_MAGIC else _read_dat(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    gf = read_gguf(path)
    where = repr(str(path))
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in gf.metadata]
    if missing:
        # llama-quantize refuses such a file too ("missing imatrix metadata").
        raise InvalidImatrixError(f"{where} is a GGUF file without the imatrix metadata "
                                  f"{', '.join(missing)}: not an imatrix file")
    pairs: dict[str, dict[str, object]] = {}
    for t in gf.tensors:
        for suffix, role in ((SUM_SUFFIX, "sums"), (COUNT_SUFFIX, "counts")):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[role] = t
    if not pairs:
        raise InvalidImatrixError(f"{where} holds no `<name>{SUM_SUFFIX}` tensors: no data")
    sums, counts = {}, {}
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise InvalidImatrixError(f"{where}: tensor {name!r} has "
                                      f"{'sums' if 'sums' in pair else 'counts'} but not "
                                      f"{'counts' if 'sums' in pair else 'sums'}")
        s, c = pair["sums"], pair["counts"]
        if s.type != "F32" or c.type != "F32":
            raise InvalidImatrixError(f"{where}: {name!r}'s sums and counts must be F32, got "
                                      f"{s.type} and {c.type}")
        n_mat = c.n_elements
        if n_mat == 0 or s.n_elements % n_mat:
            raise InvalidImatrixError(f"{where}: {name!r} has {s.n_elements} sums for {n_mat} "
                                      "counts; the sums must split evenly among the counts")
        values = gf.raw(s).view("<f4").copy()
        # counts are stored as floats; llama.cpp rounds them to the nearest integer (lround).
        tokens = np.floor(gf.raw(c).view("<f4").astype(np.float64) + 0.5).astype(np.int64)
        sums[name] = values if n_mat == 1 else values.reshape(n_mat, -1)  # (n_mat, n_cols)
        counts[name] = tokens
    datasets = gf.get(KEY_DATASETS)
    return ImportanceMatrix(sums, counts,
                            [d if isinstance(d, str) else d.decode("utf-8", "replace")
                             for d in (datasets if isinstance(datasets, list) else [])],
                            int(gf.get(KEY_CHUNK_COUNT)), int(gf.get(KEY_CHUNK_SIZE)))


class _DatReader:
    def __init__(self, data: bytes, where: str):
        self.data, self.at, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise InvalidImatrixError(f"{self.where}: the file ends inside {what} (byte "
                                      f"{self.at}); it is truncated or not an imatrix file")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(path: Path) -> ImportanceMatrix:
    r = _DatReader(path.read_bytes(), repr(str(path)))
    n_entries = r.i32("the entry count")
    if n_entries < 1:
        raise InvalidImatrixError(f"{r.where}: neither a GGUF file nor a legacy imatrix (its "
                                  f"first word, the entry count, is {n_entries})")
    sums, counts = {}, {}
    for i in range(n_entries):
        length = r.i32(f"entry {i}'s name length")
        if not 0 < length <= _MAX_NAME:
            raise InvalidImatrixError(f"{r.where}: entry {i}'s name length {length} is not in "
                                      f"1..{_MAX_NAME}; the file is corrupt")
        name = r.take(length, f"entry {i}'s name").decode("utf-8", "replace")
        ncall = r.i32(f"{name!r}'s call count")
        nval = r.i32(f"{name!r}'s value count")
        if nval < 1:
            raise InvalidImatrixError(f"{r.where}: entry {name!r} has {nval} values")
        sums[name] = np.frombuffer(r.take(4 * nval, f"{name!r}'s values"), "<f4").copy()
        # The stored values are mean * ncall; dividing by ncall gives the mean back (and a
        # file with ncall 0 hands its values on as they are, as llama-quantize does).
        counts[name] = np.array([ncall if ncall > 0 else 1], dtype=np.int64)
    chunk_count, datasets = 0, []
    if r.at < len(r.data):  # the optional trailer
        chunk_count = r.i32("the chunk count")
        if r.at + 4 <= len(r.data):
            length = r.i32("the dataset name's length")
            if length > 0:
                datasets.append(r.take(length, "the dataset name").decode("utf-8", "replace"))
    return ImportanceMatrix(sums, counts, datasets, chunk_count, 0)


# --------------------------------------------------------------------------------------- write
def write_imatrix(path: str | os.PathLike, imatrix: ImportanceMatrix,
                  format: str | None = None) -> None:
    """Write `imatrix` atomically as GGUF or legacy .dat. `format` None: "dat" for a path
    ending in .dat, else "gguf" (llama-imatrix's own default)."""
    fmt = format or ("dat" if str(path).endswith(".dat") else "gguf")
    if fmt not in FORMATS:
        raise ValueError(f"imatrix format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not len(imatrix):
        raise ValueError("the importance matrix has no entries; nothing to write")
    if fmt == "gguf":
        _write_gguf(Path(path), imatrix)
    else:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(dat_bytes(imatrix))


def _write_gguf(path: Path, imatrix: ImportanceMatrix) -> None:
    meta = {
        KEY_TYPE: MetaValue.string("imatrix"),
        KEY_DATASETS: MetaValue.array(imatrix.datasets, GGUFValueType.STRING),
        KEY_CHUNK_COUNT: MetaValue.u32(imatrix.chunk_count),
        KEY_CHUNK_SIZE: MetaValue.u32(imatrix.chunk_size),
    }
    tensors = []
    for name in imatrix.names():
        sums, counts = imatrix.sums[name], imatrix.counts[name]
        n_mat = counts.size
        # ggml drops trailing dimensions of 1: a plain matrix's entries are 1-D.
        sum_shape = sums.shape if n_mat > 1 else (sums.size,)
        count_shape = (n_mat, 1) if n_mat > 1 else (1,)
        tensors.append(TensorData(name + SUM_SUFFIX, "F32", sum_shape, sums.reshape(-1)))
        tensors.append(TensorData(name + COUNT_SUFFIX, "F32", count_shape,
                                  counts.astype(np.float32)))
    write_gguf(path, meta, tensors)


def dat_bytes(imatrix: ImportanceMatrix) -> bytes:
    """The legacy .dat encoding of `imatrix`, as llama-imatrix --output-format dat writes it.

    Entries whose matrices all saw no token are left out, and an unseen expert's values are
    stored as ncall (a mean of 1), as llama.cpp does. With chunk_size 0 (read from a .dat file)
    the counts already are ncall and the values are written back as they were read.
    """
    out = []
    names = [n for n in imatrix.names() if (imatrix.counts[n] > 0).any()]
    out.append(struct.pack("<i", len(names)))
    for name in names:
        sums, counts = imatrix.sums[name].reshape(-1), imatrix.counts[name]
        encoded = name.encode("utf-8")
        if imatrix.chunk_size > 0:
            ncall = -(-int(counts.max()) // imatrix.chunk_size)  # ceiling: never 0 for data
            rows = sums.reshape(counts.size, -1)  # (n_mat, n_cols)
            seen = (counts > 0)[:, None]
            denom = np.where(counts > 0, counts, 1).astype(np.float32)[:, None]
            # float32 arithmetic, as imatrix.cpp: (value / count) * ncall; unseen -> 1 * ncall
            values = np.where(seen, rows / denom, np.float32(1)) * np.float32(ncall)
            values = values.astype("<f4").reshape(-1)
        else:
            if counts.size != 1 and (counts != counts[0]).any():
                raise ValueError(f"imatrix entry {name!r}: without a chunk size the counts "
                                 f"must be one ncall, got {counts.tolist()}")
            ncall, values = int(counts[0]), sums.astype("<f4")
        out.append(struct.pack("<i", len(encoded)) + encoded)
        out.append(struct.pack("<ii", ncall, values.size))
        out.append(values.tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    out.append(struct.pack("<ii", imatrix.chunk_count, len(dataset)) + dataset)
    return b"".join(out)


__all__ = ["FORMATS", "ImportanceMatrix", "InvalidImatrixError", "dat_bytes",
           "read_imatrix", "write_imatrix"]
