"""GGUF files from strangers: mutated and crafted headers get a clean one-line InvalidGGUFError, or
parse into tensors that lie inside the file and decode; never a traceback, a hang or a kernel
reading past its buffer."""
from __future__ import annotations

import random
import struct
import subprocess
import sys
import textwrap
import traceback

import numpy as np
import pytest
import torch
from gguf import GGUFValueType as V
from gguf_samples import header, string, tensor_info

from zeropoint.gguf import dequantize_blocks, quantize_blocks
from zeropoint.gguf.header import MAX_ARRAY_DEPTH, InvalidGGUFError
from zeropoint.gguf.layout import tensor_nbytes
from zeropoint.gguf.metadata import SCALAR_FORMAT, MetaValue
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.writer import TensorData, write_gguf

# Types whose bytes zeropoint's own kernels (torch and C) decode: the ones to try on every
# tensor a mutated file still yields.
KERNEL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

U64 = (0, 1, 2, 7, 8, 12, 13, 32, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
U32 = (0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 2**31, 2**32 - 1)


def _q(v: int) -> bytes:
    return struct.pack("<Q", v)


def _i(v: int) -> bytes:
    return struct.pack("<I", v)


def _sample_file(path) -> bytes:
    """A small sound GGUF: every value type, string, nested and per-token arrays, an explicit
    alignment, and F32, Q8_0 and Q4_K tensors."""
    gen = torch.Generator().manual_seed(0)
    meta = {
        "general.architecture": MetaValue.string("llama"),
        "general.alignment": MetaValue.u32(32),
        **{f"v.{t.name.lower()}": MetaValue(1, t) for t in SCALAR_FORMAT if t != V.FLOAT32},
        "v.f32": MetaValue.f32(0.5),
        "v.str": MetaValue.string("héllo"),
        "v.empty": MetaValue.array([], V.INT32),
        "v.nested": MetaValue([[1, 2], [3]], V.ARRAY, V.ARRAY),
        "v.nested_str": MetaValue([["a"], ["b", "c"]], V.ARRAY, V.ARRAY),
        "tokenizer.ggml.tokens": MetaValue.array(["<s>", "a", "b"], V.STRING),
        "tokenizer.ggml.scores": MetaValue.array([0.0, -1.0, -2.0], V.FLOAT32),
        "tokenizer.ggml.token_type": MetaValue.array([3, 1, 1], V.INT32),
    }
    tensors = [
        TensorData("f32", "F32", (2, 4), torch.randn(2, 4, generator=gen)),
        TensorData("q8_0", "Q8_0", (2, 32), quantize_blocks(torch.randn(2, 32, generator=gen),
                                                            "Q8_0")),
        TensorData("q4_k", "Q4_K", (1, 256), quantize_blocks(torch.randn(1, 256, generator=gen),
                                                             "Q4_K")),
    ]
    write_gguf(path, meta, tensors)
    return path.read_bytes()


def _fields(blob: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, what) of every number in the header: counts, lengths, types, values,
    dimensions and offsets, found by walking the sound file."""
    pos, out = 24, [(4, 4, "version"), (8, 8, "tensor count"), (16, 8, "kv count")]

    def number(width, what):
        nonlocal pos
        out.append((pos, width, what))
        (v,) = struct.unpack_from({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width], blob, pos)
        pos += width
        return v

    def text(what):
        nonlocal pos
        n = number(8, f"length of {what}")
        pos += n
        return blob[pos - n : pos].decode()

    def value(vtype, what):
        if vtype == V.STRING:
            text(what)
        elif vtype == V.ARRAY:
            sub = number(4, f"element type of {what}")
            for i in range(number(8, f"count of {what}")):
                value(V(sub), f"{what}[{i}]")
        else:
            number(struct.calcsize(SCALAR_FORMAT[vtype]), f"value of {what}")

    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)
    for i in range(n_kv):
        key = text(f"key {i}")
        value(V(number(4, f"type of {key}")), key)
    for i in range(n_tensors):
        name = text(f"tensor {i}")
        for d in range(number(4, f"n_dims of {name}")):
            number(8, f"ne[{d}] of {name}")
        number(4, f"type of {name}")
        number(8, f"offset of {name}")
    return out


def _boundary(rng: random.Random, width: int, old: int) -> int:
    pick = rng.random()
    if pick < 0.15:
        v = old + rng.choice((-1, 1, -8, 8))
    elif pick < 0.25:
        v = rng.getrandbits(8 * width)
    else:
        v = rng.choice(U64 if width == 8 else U32)
    return v % (1 << (8 * width))


def _mutate(rng: random.Random, blob: bytes, fields, header_end: int) -> tuple[bytes, str]:
    data, done = bytearray(blob), []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.6:
            at, width, what = rng.choice(fields)
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
            v = _boundary(rng, width, struct.unpack_from(fmt, data, at)[0])
            struct.pack_into(fmt, data, at, v)
            done.append(f"{what} (byte {at}) = {v}")
        elif kind < 0.8:
            at = rng.randrange(header_end)
            data[at] ^= 1 << rng.randrange(8)
            done.append(f"bit flip at byte {at}")
        elif kind < 0.9:
            at = rng.randrange(header_end)
            data[at] = rng.randrange(256)
            done.append(f"byte {at} = {data[at]}")
        else:  # the header shifts: later fields land on other fields' bytes
            at, n = rng.randrange(header_end), rng.randrange(1, 9)
            if rng.random() < 0.5:
                data[at:at] = bytes(rng.randrange(256) for _ in range(n))
                done.append(f"{n} bytes inserted at {at}")
            else:
                del data[at : at + n]
                data += bytes(n)  # the same length, so that every field offset stays in range
                done.append(f"{n} bytes deleted at {at}")
    if rng.random() < 0.1:
        cut = rng.randrange(len(data))
        del data[cut:]
        done.append(f"cut at {cut}")
    return bytes(data), "; ".join(done)


def _check(path, blob: bytes) -> str:
    """'error' or 'ok'; an assertion error or any other exception is a failure."""
    path.write_bytes(blob)
    try:
        f = read_gguf(path)
    except InvalidGGUFError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        assert len(message) < 400 + len(str(path)), message
        return "error"
    for meta in f.metadata.values():
        meta.value  # noqa: B018 - arrays are decoded on first use
    spans = []
    for t in f.tensors:
        assert f.data_offset <= t.offset and t.offset + t.nbytes <= len(blob), t
        assert t.nbytes == tensor_nbytes(t.type, t.shape), t
        raw = f.raw(t)
        assert len(raw) == t.nbytes, t
        if t.type == "F32":
            torch.from_numpy(raw.view(np.float32)).view(t.shape)
        elif t.type in KERNEL_TYPES:
            assert dequantize_blocks(torch.from_numpy(raw), t.type, t.shape).shape == t.shape
        spans.append((t.offset, t.offset + t.nbytes))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans
    f.close()
    return "ok"


def test_thousands_of_mutated_headers_are_clean_errors_or_sound_files(tmp_path):
    blob = _sample_file(tmp_path / "sound.gguf")
    fields = _fields(blob)
    header_end = read_gguf(tmp_path / "sound.gguf").data_offset
    assert _check(tmp_path / "check.gguf", blob) == "ok"
    rng, outcomes, failures = random.Random(20261127), {"ok": 0, "error": 0}, []
    for case in range(4000):
        bad, what = _mutate(rng, blob, fields, header_end)
        try:
            outcomes[_check(tmp_path / "mutated.gguf", bad)] += 1
        except Exception as e:  # noqa: BLE001 - every other exception is what this test finds
            failures.append(f"case {case} ({what}): "
                            + "".join(traceback.format_exception_only(e)).strip())
    assert not failures, f"{len(failures)} of 4000 mutations failed:\n" + "\n".join(failures[:20])
    assert outcomes["error"] > 2000 and outcomes["ok"] > 100, outcomes  # both sides exercised


# --- crafted files: what hit other GGUF parsers ---------------------------------------------------

ALIGN = string(b"general.alignment")
TOKENS = string(b"tokenizer.ggml.tokens") + _i(9) + _i(8) + _q(2) + string(b"a") + string(b"b")
ARRAY_OF_2_63 = header(n_kv=1, kvs=string(b"a") + _i(9) + _i(0) + _q(2**63))  # 49 bytes

CRAFTED = {
    "kv count 2^63": (header(n_kv=2**63), "cannot fit"),
    "tensor count 2^64-1": (header(n_tensors=2**64 - 1), "cannot fit"),
    "key length 2^63": (header(n_kv=1, kvs=_q(2**63) + bytes(16)), "metadata key 0"),
    "string length 2^64-1": (header(n_kv=1, kvs=string(b"k") + _i(8) + _q(2**64 - 1)),
                             "value of 'k'"),
    "array of 2^63 u8": (ARRAY_OF_2_63, "9223372036854775808 UINT8 elements of 'a'"),
    "array of 2^63 strings": (header(n_kv=1, kvs=string(b"k") + _i(9) + _i(8) + _q(2**63)),
                              "9223372036854775808 strings"),
    # The crash that started this: a string length near 2^64 inside an array of strings.
    "string of 2^64-1 bytes in an array": (
        header(n_kv=1, kvs=string(b"k") + _i(9) + _i(8) + _q(2) + _q(2**64 - 1) + _q(0)),
        "the 2 strings of 'k' run past the end"),
    "strings of 2^63-9 and 2^63 bytes in an array": (
        header(n_kv=1, kvs=string(b"k") + _i(9) + _i(8) + _q(3) + _q(2**63 - 9) + _q(2**63)
               + bytes(20)), "the 3 strings of 'k' run past the end"),
    "array of 2^62 arrays": (header(n_kv=1, kvs=string(b"k") + _i(9) + _i(9) + _q(2**62)
                                    + _i(0) + _q(0)), "4611686018427387904 ARRAY elements"),
    "arrays nested 5000 deep": (header(n_kv=1, kvs=string(b"k") + _i(9) + (_i(9) + _q(1)) * 5000
                                       + _i(0) + _q(0)), "nests arrays more than 8 deep"),
    "unknown value type": (header(n_kv=1, kvs=string(b"k") + _i(13) + bytes(8)),
                           "13, not a GGUF value type"),
    "unknown element type": (header(n_kv=1, kvs=string(b"k") + _i(9) + _i(2**31) + _q(0)),
                             "2147483648, not a GGUF value type"),
    "key not UTF-8": (header(n_kv=1, kvs=string(b"\xff\xfe") + _i(0) + b"\x01"), "not UTF-8"),
    "duplicate key": (header(n_kv=2, kvs=(string(b"k") + _i(0) + b"\x01") * 2),
                      "duplicate metadata key 'k'"),
    "alignment 0": (header(n_kv=1, kvs=ALIGN + _i(4) + _i(0)), "power of two, got 0"),
    "alignment 48": (header(n_kv=1, kvs=ALIGN + _i(4) + _i(48)), "power of two, got 48"),
    "alignment as u64": (header(n_kv=1, kvs=ALIGN + _i(10) + _q(32)), "got a UINT64"),
    "alignment as a string": (header(n_kv=1, kvs=ALIGN + _i(8) + string(b"32\n" * 1000)),
                              "got a STRING"),
    "alignment 2^31": (header(n_kv=1, n_tensors=1, kvs=ALIGN + _i(4) + _i(2**31),
                              infos=tensor_info()) + bytes(256), "run past the end of the file"),
    "tokens as u8": (header(n_kv=1, kvs=string(b"tokenizer.ggml.tokens") + _i(9) + _i(0) + _q(2)
                            + b"ab"), "tokenizer.ggml.tokens is an array of UINT8"),
    "scores as i8": (header(n_kv=2, kvs=TOKENS + string(b"tokenizer.ggml.scores") + _i(9) + _i(1)
                            + _q(2) + b"\x01\x02"), "tokenizer.ggml.scores is an array of INT8"),
    "token types shorter than the tokens": (
        header(n_kv=2, kvs=TOKENS + string(b"tokenizer.ggml.token_type") + _i(9) + _i(5) + _q(1)
               + _i(1)), "token_type has 1 entries for 2 tokens"),
    "architecture as u32": (header(n_kv=1, kvs=string(b"general.architecture") + _i(4) + _i(7)),
                            "general.architecture is a UINT32"),
    "n_dims 2^32-1": (header(n_tensors=1, infos=string(b"w") + _i(2**32 - 1) + bytes(64)),
                      "4294967295 dimensions"),
    "9 dimensions": (header(n_tensors=1, infos=tensor_info(dims=(1,) * 9)), "9 dimensions"),
    "dimensions whose product overflows": (
        header(n_tensors=1, infos=tensor_info(dims=(2**32, 2**32, 4))) + bytes(64),
        "impossible dimensions"),
    "a dimension of 2^64-1": (header(n_tensors=1, infos=tensor_info(dims=(2**64 - 1,))) + bytes(64),
                              "impossible dimensions"),
    "a zero dimension": (header(n_tensors=1, infos=tensor_info(dims=(32, 0))) + bytes(64),
                         "empty dimension"),
    "unknown ggml type 2^32-1": (header(n_tensors=1, infos=tensor_info(type_id=2**32 - 1))
                                 + bytes(64), "unknown ggml type id 4294967295"),
    "tensor name not UTF-8": (header(n_tensors=1, infos=tensor_info(name=b"\xc3")) + bytes(64),
                              "not UTF-8"),
    "offset 2^64-32": (header(n_tensors=1, infos=tensor_info(offset=2**64 - 32)) + bytes(64),
                       "run past the end of the file"),
    "misaligned offset": (header(n_tensors=1, infos=tensor_info(offset=4)) + bytes(300),
                          "not a multiple of the alignment"),
    "overlapping tensors": (header(n_tensors=2, infos=tensor_info(b"a", dims=(32,))
                                   + tensor_info(b"b", dims=(8,))) + bytes(400),
                            "tensor 'b' .* overlaps tensor 'a'"),
    "duplicate tensor names": (header(n_tensors=2, infos=tensor_info() + tensor_info(offset=128))
                               + bytes(400), "duplicate tensor name"),
    "a name 10000 characters long": (header(n_kv=2, kvs=(string(b"k\n" * 5000) + _i(0) + b"\1")
                                            * 2), r"duplicate metadata key 'k\\nk\\n.*\.\.\.'"),
}


@pytest.mark.parametrize("blob, message", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_files_are_one_line_errors(tmp_path, blob, message):
    bad = tmp_path / "crafted.gguf"
    bad.write_bytes(blob)
    with pytest.raises(InvalidGGUFError, match=message) as e:
        read_gguf(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and len(str(e.value)) < 400


def test_nested_arrays_are_read_to_their_depth_limit(tmp_path):
    def nested(depth):
        inner = _i(8) + _q(1) + string(b"x")  # the innermost array: one string
        return _i(9) + (_i(9) + _q(1)) * (depth - 1) + inner

    path = tmp_path / "nested.gguf"
    path.write_bytes(header(n_kv=1, kvs=string(b"k") + nested(MAX_ARRAY_DEPTH)))
    value = read_gguf(path).get("k")
    for _ in range(MAX_ARRAY_DEPTH - 1):
        assert len(value) == 1
        value = value[0]
    assert value == ["x"]  # strings inside nested arrays are decoded too
    path.write_bytes(header(n_kv=1, kvs=string(b"k") + nested(MAX_ARRAY_DEPTH + 1)))
    with pytest.raises(InvalidGGUFError, match="more than 8 deep"):
        read_gguf(path)


def test_loading_a_hostile_gguf_fails_fast_before_transformers_reads_it(tmp_path):
    # gguf 0.19's GGUFReader loops without end over this array, taking memory as it goes; run in
    # a child with a memory cap and a time limit, so that a regression fails instead of hanging.
    bad = tmp_path / "array_of_2_63.gguf"
    bad.write_bytes(ARRAY_OF_2_63)
    child = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from zeropoint.models.load import ModelLoadError, load_model
        try:
            load_model(sys.argv[1], progress=False)
        except ModelLoadError as e:
            print("ModelLoadError:", e)
    """)
    done = subprocess.run([sys.executable, "-c", child, str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ModelLoadError:") and str(bad) in done.stdout
    assert "9223372036854775808 UINT8 elements" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
