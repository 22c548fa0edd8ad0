"""GGUF metadata values: a value and its GGUF type, made in code or read from a file.

A value read from a file keeps the bytes the file held after its type tag; the writer copies
them back as they are. Its arrays are decoded only when `value` is asked for: a 50k-token
vocabulary took 40 ms to decode and 40 ms to encode again, and requantizing a model never looks
at it.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType

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
