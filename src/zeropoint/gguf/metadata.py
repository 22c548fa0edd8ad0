"""GGUF metadata values: a value and its GGUF type, made in code or read from a file.

A value read from a file keeps the bytes the file held after its type tag; the writer copies
them back as they are. Its arrays are decoded only when `value` is asked for: a 50k-token
vocabulary took 40 ms to decode and 40 ms to encode again, and requantizing a model never looks
at it.
"""
from __future__ import annotations

import gc
import struct
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

from .constants import GGUFValueType

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import Any

SCALAR_FORMAT = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
ARRAY_DTYPE = {  # value type -> numpy dtype, for reading and writing whole numeric arrays
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "<u1",
}


@dataclass(frozen=True, eq=False)
class MetaValue:
    """One metadata value and its GGUF type; `sub_type` is an array's element type."""

    value: Any  # int, float, bool, str (bytes if not UTF-8), or a list of those
    type: GGUFValueType
    sub_type: GGUFValueType | None = None

    # Equal by content, whether made here or read from a file (ReadValue).
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


class ReadValue(MetaValue):
    """A MetaValue read from a file: `encoded` holds the bytes after its type tag. Made with
    `decode` (a function of those bytes) in place of a value, it decodes on first use."""

    def __init__(self, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None,
                 encoded: bytes, decode: Callable[[bytes], Any] | None = None):
        for name, v in (("_value", value), ("type", vtype), ("sub_type", sub_type),
                        ("encoded", encoded), ("_decode", decode)):
            object.__setattr__(self, name, v)

    @property
    def value(self) -> Any:
        if self._decode is not None:
            object.__setattr__(self, "_value", self._decode(self.encoded))
            object.__setattr__(self, "_decode", None)
        return self._value


Metadata = dict[str, MetaValue]  # insertion order is file order


def encode_value(m: MetaValue) -> bytes:
    """The bytes of `m` after its type tag, as GGUF stores them: a read value's own bytes; else
    scalars, strings and arrays of them encoded here (an array of strings or numbers in one go:
    10x faster than gguf-py's item by item on a 50k-token vocabulary), and arrays of arrays by
    gguf-py."""
    if isinstance(m, ReadValue):
        return m.encoded
    if m.type in SCALAR_FORMAT:
        return struct.pack(SCALAR_FORMAT[m.type], m.value)
    if m.type == GGUFValueType.STRING:
        return _string(m.value)
    if m.type != GGUFValueType.ARRAY or m.sub_type is None:
        raise ValueError(f"cannot encode a {m.type!r} value of sub-type {m.sub_type!r}")
    head = struct.pack("<IQ", m.sub_type, len(m.value))
    if not m.value:  # legal GGUF, and llama.cpp reads it; gguf-py refuses
        return head
    if m.sub_type == GGUFValueType.STRING:
        return head + b"".join(_string(v) for v in m.value)
    if m.sub_type in ARRAY_DTYPE:
        import numpy as np  # a value made in code; copying a file's values needs none

        return head + np.asarray(m.value, dtype=ARRAY_DTYPE[m.sub_type]).tobytes()
    from gguf import GGUFWriter  # arrays of arrays: rare enough to leave to gguf-py

    return GGUFWriter(None, arch="")._pack_val(m.value, m.type, add_vtype=False,
                                               sub_type=m.sub_type)


def _string(v: str | bytes) -> bytes:
    raw = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return struct.pack("<Q", len(raw)) + raw


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
