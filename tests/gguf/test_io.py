"""GGUF files in and out (zeropoint.gguf.io), checked against gguf-py's GGUFReader."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFValueType as V

from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.io import MetaValue, TensorData, read_gguf, tensor_nbytes, write_gguf

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]

METADATA = {
    "general.architecture": MetaValue.string("llama"),
    "general.alignment": MetaValue.u32(64),
    "test.u8": MetaValue(200, V.UINT8),
    "test.i8": MetaValue(-100, V.INT8),
    "test.u16": MetaValue(60000, V.UINT16),
    "test.i16": MetaValue(-30000, V.INT16),
    "test.u32": MetaValue.u32(4_000_000_000),
    "test.i32": MetaValue.i32(-2_000_000_000),
    "test.u64": MetaValue(2**63 + 5, V.UINT64),
    "test.i64": MetaValue(-(2**62), V.INT64),
    "test.f32": MetaValue.f32(0.25),
    "test.f64": MetaValue(1 / 3, V.FLOAT64),
    "test.true": MetaValue.bool_(True),
    "test.false": MetaValue.bool_(False),
    "test.str": MetaValue.string("héllo, wörld ✓"),
    "test.empty_str": MetaValue.string(""),
    "test.arr_i32": MetaValue.array([1, -2, 3], V.INT32),
    "test.arr_u8": MetaValue.array([0, 255, 7], V.UINT8),
    "test.arr_f32": MetaValue.array([0.5, -1.25], V.FLOAT32),
    "test.arr_f64": MetaValue.array([0.1, 1e300], V.FLOAT64),
    "test.arr_bool": MetaValue.array([True, False, True], V.BOOL),
    "test.arr_str": MetaValue.array(["a", "", "Ġthe", "<|im_end|>"], V.STRING),
    "test.arr_u64": MetaValue.array([2**64 - 1, 0], V.UINT64),
}


def _tensors(gen):
    out = [
        TensorData("f32_matrix", "F32", (3, 5), torch.randn(3, 5, generator=gen)),
        TensorData("f16_vector", "F16", (7,), torch.randn(7, generator=gen).half()),
    ]
    for i, qtype in enumerate(LEGACY):
        x = torch.randn(4 + i, 64, generator=gen)
        out.append(TensorData(f"blk.{i}.{qtype.lower()}.weight", qtype, (4 + i, 64),
                              quantize_blocks(x, qtype)))
    out.append(TensorData("lazy_3d", "Q8_0", (2, 3, 32),
                          lambda: quantize_blocks(torch.ones(2, 3, 32), "Q8_0")))
    return out


def _bytes(data) -> bytes:
    data = data() if callable(data) else data
    if isinstance(data, torch.Tensor):
        data = data.contiguous().view(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(data).view(np.uint8).tobytes()


@pytest.fixture
def written(tmp_path, gen):
    tensors = _tensors(gen)
    path = tmp_path / "t.gguf"
    size = write_gguf(path, METADATA, tensors)
    assert size == path.stat().st_size
    return path, tensors


def test_write_then_gguf_reader_reads_every_value_and_tensor(written):
    path, tensors = written
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(METADATA)  # same keys, same order
    for key, meta in METADATA.items():
        f = fields[key]
        assert f.types[0] == meta.type, key
        if meta.type == V.ARRAY:
            assert f.types[-1] == meta.sub_type, key
        got = f.contents()
        if meta.type == V.FLOAT32 or meta.sub_type == V.FLOAT32:
            assert np.allclose(got, meta.value), key
        else:
            assert got == meta.value, key
    assert reader.alignment == 64 and reader.data_offset % 64 == 0
    assert [t.name for t in reader.tensors] == [t.name for t in tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert theirs.tensor_type.name == ours.type
        assert tuple(reversed(theirs.shape.tolist())) == ours.shape
        assert theirs.data_offset % 64 == 0
        assert np.asarray(theirs.data).tobytes() == _bytes(ours.data), ours.name


def test_our_reader_agrees_with_gguf_reader(written):
    path, tensors = written
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert ours.version == 3 and ours.alignment == 64 and ours.data_offset == theirs.data_offset
    assert list(ours.metadata) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, meta in METADATA.items():
        got = ours.metadata[key]
        assert (got.type, got.sub_type) == (meta.type, meta.sub_type), key
        if meta.type == V.FLOAT32 or meta.sub_type == V.FLOAT32:
            assert np.allclose(got.value, meta.value)
        else:
            assert got.value == meta.value, key
    for a, b, t in zip(ours.tensors, theirs.tensors, tensors):
        assert (a.name, a.type, a.offset, a.nbytes) == (b.name, b.tensor_type.name, b.data_offset,
                                                          b.n_bytes)
        assert a.shape == t.shape and a.nbytes == tensor_nbytes(t.type, t.shape)
        assert ours.raw(a).tobytes() == _bytes(t.data)


def test_rewriting_what_was_read_gives_the_same_file(written, tmp_path):
    path, _ = written
    f = read_gguf(path)
    copy = tmp_path / "copy.gguf"
    write_gguf(copy, f.metadata, [TensorData(t.name, t.type, t.shape, f.raw(t)) for t in f.tensors])
    assert copy.read_bytes() == path.read_bytes()


def _fresh(metadata):
    """The same values as plain MetaValues: written by encoding, not by copying read bytes."""
    return {k: MetaValue(m.value, m.type, m.sub_type) for k, m in metadata.items()}


def test_read_values_are_copied_as_a_fresh_encoding_would_write_them(written, tmp_path):
    path, tensors = written
    f = read_gguf(path)
    assert f.metadata == METADATA and METADATA == f.metadata  # equal across both classes
    tensor_data = [TensorData(t.name, t.type, t.shape, f.raw(t)) for t in f.tensors]
    copied, encoded = tmp_path / "copied.gguf", tmp_path / "encoded.gguf"
    write_gguf(copied, read_gguf(path).metadata, tensor_data)  # string arrays never decoded
    write_gguf(encoded, _fresh(f.metadata), tensor_data)
    assert copied.read_bytes() == encoded.read_bytes() == path.read_bytes()


def test_files_are_the_same_where_fallocate_is_missing(written, tmp_path, monkeypatch):
    from zeropoint.gguf import io

    path, tensors = written
    monkeypatch.setattr(io, "_fallocate", None)  # ftruncate alone: padding must still be zeros
    again = tmp_path / "again.gguf"
    write_gguf(again, METADATA, tensors)
    assert again.read_bytes() == path.read_bytes()


def test_default_alignment_empty_array_and_non_utf8_string(tmp_path):
    meta = {"a.empty": MetaValue.array([], V.INT32), "a.bytes": MetaValue(b"\xff\xfe", V.STRING),
            "a.str_bytes": MetaValue.array([b"\xc3", "ok"], V.STRING)}
    path = tmp_path / "e.gguf"
    write_gguf(path, meta, [TensorData("x", "F32", (3,), np.arange(3, dtype=np.float32))])
    f = read_gguf(path)
    assert f.alignment == 32 and f.data_offset % 32 == 0
    assert f.metadata["a.empty"] == MetaValue([], V.ARRAY, V.INT32)
    assert f.get("a.bytes") == b"\xff\xfe" and f.get("a.str_bytes") == [b"\xc3", "ok"]
    assert gguf.GGUFReader(path).tensors[0].data.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_default_model_header_matches_gguf_reader_and_copies_byte_for_byte(tmp_path):
    from zeropoint.models.source import default_model_path

    src = default_model_path()
    ours, theirs = read_gguf(src), gguf.GGUFReader(src)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.get(key) == field.contents(), key
    assert [(t.name, t.type, t.shape, t.offset) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset)
        for t in theirs.tensors]
    tensor_data = [TensorData(t.name, t.type, t.shape, ours.raw(t)) for t in ours.tensors]
    copy, encoded = tmp_path / "copy.gguf", tmp_path / "encoded.gguf"
    write_gguf(copy, read_gguf(src).metadata, tensor_data)
    assert copy.read_bytes() == src.read_bytes()
    write_gguf(encoded, _fresh(ours.metadata), tensor_data)  # the vocabulary encoded anew
    assert encoded.read_bytes() == src.read_bytes()


# --- bad input --------------------------------------------------------------------------------


def test_truncated_files_are_clear_errors(written, tmp_path):
    path, _ = written
    data = path.read_bytes()
    f = read_gguf(path)
    last = f.tensors[-1]
    cuts = [0, 3, 10, 30, 100, 300, f.data_offset - 1, last.offset + last.nbytes - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|empty|magic") as e:
            read_gguf(bad)
        assert str(bad) in str(e.value)


def _header(version=3, n_tensors=0, kvs=b"", infos=b"", n_kv=None):
    head = struct.pack("<4sIQQ", b"GGUF", version, n_tensors, n_kv if n_kv is not None else 0)
    return head + kvs + infos


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _info(name=b"w", dims=(32,), type_id=0, offset=0):
    packed = struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    return _str(name) + packed + struct.pack("<IQ", type_id, offset)


@pytest.mark.parametrize(("blob", "message"), [
    (b"GGML" + bytes(20), "magic"),
    (_header(version=1), "version 1"),
    (_header(version=2**24), "big-endian"),
    (_header(n_kv=1, kvs=_str(b"k") + struct.pack("<I", 99)), "not a GGUF value type"),
    (_header(n_kv=2, kvs=(_str(b"k") + struct.pack("<IB", 0, 1)) * 2), "duplicate metadata key"),
    (_header(n_kv=1, kvs=_str(b"general.alignment") + struct.pack("<II", 4, 48)), "power of two"),
    (_header(n_tensors=1, infos=_info(type_id=999)) + bytes(200), "unknown ggml type id 999"),
    (_header(n_tensors=1, infos=_info(dims=(1, 1, 1, 1, 1))), "5 dimensions"),
    (_header(n_tensors=1, infos=_info(dims=(48,), type_id=8)) + bytes(200), "block size"),
    (_header(n_tensors=1, infos=_info(offset=8)) + bytes(300), "not a multiple of the alignment"),
    (_header(n_tensors=2, infos=_info() + _info()) + bytes(400), "duplicate tensor name"),
    (_header(n_tensors=1, infos=_info(dims=(2**40,))) + bytes(64), "truncated"),
    (_header(n_kv=2**40), "cannot fit"),
    # A string array is checked when the file is read, though decoded only when used.
    (_header(n_kv=1, kvs=_str(b"k") + struct.pack("<IIQ", 9, 8, 2) + _str(b"ab")
             + struct.pack("<Q", 50) + b"xy"), "the 2 strings of 'k' run past the end"),
    (_header(n_kv=1, kvs=_str(b"k") + struct.pack("<IIQ", 9, 8, 3) + _str(b"ab") + b"\x01"),
     "the 3 strings of 'k' run past the end"),
])
def test_corrupt_files_are_clear_errors(tmp_path, blob, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        read_gguf(bad)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")


def test_a_failed_write_leaves_nothing_behind_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")

    def boom():
        raise RuntimeError("quantizer failed")

    tensors = [TensorData("a", "F32", (4,), np.zeros(4, np.float32)),
               TensorData("b", "F32", (4,), boom)]
    with pytest.raises(RuntimeError, match="quantizer failed"):
        write_gguf(path, {}, tensors)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


@pytest.mark.parametrize(("tensors", "message"), [
    ([TensorData("a", "F32", (4,), np.zeros(3, np.float32))], "needs 16 bytes, got 12"),
    ([TensorData("a", "Q4_0", (4, 48), np.zeros(1, np.uint8))], "multiple of 32"),
    ([TensorData("a", "Q9_9", (32,), b"")], "unknown ggml type 'Q9_9'"),
    ([TensorData("a", "F32", (1,), b"\0" * 4)] * 2, "duplicate tensor name"),
    ([TensorData("a", "F32", (1, 1, 1, 1, 1), b"\0" * 4)], "1..4 dims"),
])
def test_bad_tensors_are_rejected_before_or_while_writing(tmp_path, tensors, message):
    with pytest.raises(ValueError, match=message):
        write_gguf(tmp_path / "x.gguf", {}, tensors)
    assert not list(tmp_path.iterdir())


def test_bad_alignment_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        write_gguf(tmp_path / "x.gguf", {"general.alignment": MetaValue.u32(24)}, [])
