"""The header of a GGUF file, parsed from its bytes with every length and count checked.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      (key: string, value type u32, value)
    n_tensors x (name: string, n_dims u32, ne[0..n_dims) u64, ggml type u32, offset u64)
    padding to `general.alignment` (32 unless the metadata says otherwise)
    tensor data, each at its offset from the start of this section, aligned and zero-padded

A string is a u64 length and UTF-8 bytes; an array is an element type u32, a count u64 and the
elements (arrays may nest). GGUF files come from strangers, so no field is trusted: a count of n
items is checked against the bytes left (n times the smallest such item) before anything is
allocated or looped over, and every fault is an InvalidGGUFError that names the file, the field
and the byte, never an overflow, a hang or an allocation the file's size does not pay for.
"""
from __future__ import annotations

import ctypes
import math
import struct

from .. import ckernels
from .constants import GGUF_MAGIC, GGUFValueType
from .layout import ALIGNMENT_KEY, MAX_DIMS, SUPPORTED_VERSIONS, data_alignment
from .metadata import ARRAY_DTYPE, SCALAR_FORMAT, Metadata, ReadValue

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import NoReturn

C_SKIP_MIN_STRINGS = 1024  # arrays this long are walked in C (csrc/gguf_scan.c) where it is built
MAX_ARRAY_DEPTH = 8  # arrays in arrays; llama.cpp reads none, gguf-py any (and overflows its stack)
INT64_MAX = 2**63 - 1  # ggml counts elements in an int64

_MIN_SIZE = {t: struct.calcsize(f) for t, f in SCALAR_FORMAT.items()}
_MIN_SIZE[GGUFValueType.STRING] = 8  # the length alone
_MIN_SIZE[GGUFValueType.ARRAY] = 4 + 8  # element type and count
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset

# Keys that llama.cpp and transformers take as they are. llama.cpp reads the scores and token
# types as raw float32 and int32 arrays of the vocabulary's length: declared narrower or
# shorter, it would read past them.
TOKENS_KEY = "tokenizer.ggml.tokens"
PER_TOKEN_KEYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
KEY_TYPES = {
    "general.architecture": (GGUFValueType.STRING, None),
    "tokenizer.ggml.model": (GGUFValueType.STRING, None),
    TOKENS_KEY: (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
}


class InvalidGGUFError(ValueError):
    """A file that is not a sound GGUF file; the one-line message says which, where and why."""


def quoted(name: str | bytes) -> str:
    """A key or tensor name for a message: repr'd (one line) and cut short, as a name may be as
    long as the file."""
    r = repr(name)
    return r if len(r) <= 80 else r[:76] + "...'"


def decode_array(encoded: bytes) -> list:
    """An array's value from the bytes after its type tag, which the header parser checked."""
    return HeaderParser(memoryview(encoded), "a metadata array").array("array", 1, True)[1]


def _type_name(vtype: GGUFValueType, sub: GGUFValueType | None) -> str:
    return f"an array of {sub.name}" if vtype == GGUFValueType.ARRAY else f"a {vtype.name}"


class HeaderParser:
    """Reads the header from a buffer, checking every read against its end."""

    def __init__(self, buf: memoryview, name: str):
        self.buf, self.name, self.pos = buf, name, 0
        self.size = len(buf)

    def fail(self, what: str, at: int | None = None) -> NoReturn:
        at = self.pos if at is None else at
        raise InvalidGGUFError(f"{self.name!r} is not a valid GGUF file: {what} (at byte {at} "
                               f"of {self.size})")

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

    def array(self, key: str, depth: int, build: bool) -> tuple[GGUFValueType, list | None]:
        """An array's element type, and its values if `build`; else it is only checked."""
        if depth > MAX_ARRAY_DEPTH:
            self.fail(f"{quoted(key)} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        sub = self.value_type(f"element type of {quoted(key)}")
        count = self.scalar("<Q", f"length of {quoted(key)}")
        if count * _MIN_SIZE[sub] > self.size - self.pos:
            noun = "strings" if sub == GGUFValueType.STRING else f"{sub.name} elements"
            self.fail(f"the {count} {noun} of {quoted(key)} run past the end of the file: the "
                      "file is truncated or corrupt")
        if sub in ARRAY_DTYPE:
            start = self.pos
            self.pos += count * _MIN_SIZE[sub]
            if not build:
                return sub, None
            import numpy as np  # only where a value is asked for: copying a header needs none

            arr = np.frombuffer(self.buf, ARRAY_DTYPE[sub], count, start)
            return sub, (arr.astype(bool) if sub == GGUFValueType.BOOL else arr).tolist()
        if sub == GGUFValueType.STRING:
            if not build:
                self.skip_strings(count, key)
                return sub, None
            return sub, self.strings(count, key)
        items = []
        for _ in range(count):
            inner = self.array(key, depth + 1, build)[1]
            if build:
                items.append(inner)
        return sub, items if build else None

    def skip_strings(self, count: int, key: str) -> None:
        """Past `count` strings, without decoding them: in C for a long array (a vocabulary of
        262k tokens took 0.08 s here), else in Python. The offset only grows, so one check at
        the end catches a string or length past the end of the file (a read past it fails
        first); checks per string doubled the time of this loop."""
        pos = self._skip_strings_c(count) if count >= C_SKIP_MIN_STRINGS else None
        if pos is None:
            pos = self._skip_strings_py(count)
        if pos < 0:
            pos = self.size + 1
        if pos > self.size:
            self.fail(f"the {count} strings of {quoted(key)} run past the end of the file: the "
                      "file is truncated")
        self.pos = pos

    def _skip_strings_py(self, count: int) -> int:
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # past the end, or past what an offset can be
            return -1
        return pos

    def _skip_strings_c(self, count: int) -> int | None:
        """The offset past `count` strings (-1: past the end), or None without the C kernels."""
        lib = ckernels.library()
        if lib is None:
            return None
        try:  # the caller's buffer, not a copy; a writable one (a mapped file) needs no numpy
            view = ctypes.c_char.from_buffer(self.buf)
            address = ctypes.addressof(view)
        except TypeError:  # read-only bytes
            import numpy as np

            view = np.frombuffer(self.buf, np.uint8)
            address = view.ctypes.data
        return lib.zp_skip_strings(address, self.size, self.pos, count)

    def strings(self, count: int, key: str) -> list:
        """`count` strings at once: the vocabulary's ~50k tokens and merges, in a tight loop."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.fail(f"the elements of {quoted(key)} run past the end of the file: "
                          "truncated")
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.fail(f"a string of {n} bytes in {quoted(key)} runs past the end of the "
                          "file: the file is truncated")
            try:
                out.append(str(buf[pos : pos + n], "utf-8"))
            except UnicodeDecodeError:
                out.append(bytes(buf[pos : pos + n]))
            pos += n
        self.pos = pos
        return out

    def key_value(self, i: int, metadata: Metadata, starts: dict[str, int]) -> None:
        at = self.pos
        key = self.string(f"metadata key {i}")
        if isinstance(key, bytes):
            self.fail(f"metadata key {i} is not UTF-8", at)
        if key in metadata:
            self.fail(f"duplicate metadata key {quoted(key)}", at)
        vtype = self.value_type(f"type of {quoted(key)}")
        start, sub, decode = self.pos, None, None
        if vtype == GGUFValueType.ARRAY:
            sub, value = self.array(key, 1, False)
            decode = decode_array
        elif vtype == GGUFValueType.STRING:
            value = self.string(f"value of {quoted(key)}")
        else:
            value = self.scalar(SCALAR_FORMAT[vtype], f"value of {quoted(key)}")
        metadata[key] = ReadValue(value, vtype, sub, bytes(self.buf[start : self.pos]), decode)
        starts[key] = at

    def check_key_types(self, metadata: Metadata, starts: dict[str, int]) -> None:
        for key, (vtype, sub) in KEY_TYPES.items():
            m = metadata.get(key)
            if m is not None and (m.type, m.sub_type) != (vtype, sub):
                self.fail(f"{key} is {_type_name(m.type, m.sub_type)}, not "
                          f"{_type_name(vtype, sub)}", starts[key])
        if TOKENS_KEY not in metadata:
            return
        n_tokens = _array_length(metadata[TOKENS_KEY])
        for key in PER_TOKEN_KEYS:
            if key in metadata and _array_length(metadata[key]) != n_tokens:
                self.fail(f"{key} has {_array_length(metadata[key])} entries for {n_tokens} "
                          "tokens", starts[key])

    def tensor_info(self, i: int) -> tuple[str, tuple[int, ...], int, int, int]:
        """(name, ne, ggml type id, offset in the data section, header byte of the entry)."""
        at = self.pos
        name = self.string(f"name of tensor {i}")
        if isinstance(name, bytes):
            self.fail(f"the name of tensor {i} is not UTF-8", at)
        n_dims = self.scalar("<I", f"dimension count of {quoted(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"tensor {quoted(name)} has {n_dims} dimensions; ggml allows 1..{MAX_DIMS}",
                      at)
        self.need(8 * n_dims, f"dimensions of {quoted(name)}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        if 0 in dims:
            self.fail(f"tensor {quoted(name)} has an empty dimension in {list(dims)}", at)
        if math.prod(dims) > INT64_MAX:
            self.fail(f"tensor {quoted(name)} has impossible dimensions {list(dims)}: more than "
                      "2^63 - 1 elements", at)
        type_id = self.scalar("<I", f"type of {quoted(name)}")
        offset = self.scalar("<Q", f"data offset of {quoted(name)}")
        return name, dims, type_id, offset, at

    def parse(self):
        """(version, metadata, tensor infos, alignment, data offset)."""
        if self.size < 4 or bytes(self.buf[:4]) != struct.pack("<I", GGUF_MAGIC):
            self.fail("it does not start with the magic bytes 'GGUF'", 0)
        self.pos = 4
        version = self.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            self.fail(f"version {version}{hint}; supported: {SUPPORTED_VERSIONS}", 4)
        n_tensors = self.scalar("<Q", "tensor count")
        n_kv = self.scalar("<Q", "metadata count")
        if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > self.size - self.pos:
            self.fail(f"counts of {n_kv} metadata keys and {n_tensors} tensors cannot fit in the "
                      "rest of the file: it is truncated or corrupt")

        metadata: Metadata = {}
        starts: dict[str, int] = {}
        for i in range(n_kv):
            self.key_value(i, metadata, starts)
        self.check_key_types(metadata, starts)
        try:
            alignment = data_alignment(metadata)
        except ValueError as e:
            self.fail(str(e), starts.get(ALIGNMENT_KEY))

        infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        return version, metadata, infos, alignment, data_offset


def _array_length(m: ReadValue) -> int:
    return struct.unpack_from("<Q", m.encoded, 4)[0]  # after the element type
